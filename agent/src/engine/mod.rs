//! The agent's decisions, without threads or sockets: what a captured change, a
//! remote change or a finished write-back does to the store.
//!
//! The core calls the engine with a [`Batch`] and commits it; the engine never
//! commits by itself, so each step's writes land atomically. Within one group commit
//! every read sees what earlier steps staged (the store's overlay), so a step never
//! acts on state another step of the same batch already replaced.
//!
//! By concern: [`capture`](Engine::capture) (the local tool's changes),
//! [`apply_remote`](Engine::apply_remote) and the repair answers (peers' changes),
//! [`plan_writes`](Engine::plan_writes) and [`writes_done`](Engine::writes_done)
//! (write-back).

mod capture;
pub mod conflicts;
mod deletes;
mod letters;
mod matching;
mod remote;
mod write_back;

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::Arc;

use crdt_model::{DocId, Provenance, Record, RecordDoc, RecordState};

use connectors::Cursor;

use crate::config::FilterExit;
use crate::mapping::{Mapping, NaturalKey, Projection};
use crate::store::{Batch, Quarantined, Store, StoreError, StoreId, StoreReader};

pub use conflicts::{CollectionPolicy, FieldPolicy};
pub use letters::{
    ActionError, DEAD_LETTER_RETRIES_MAX, DEAD_LETTER_RETRY_FIRST_MS, DEAD_LETTER_RETRY_MAX_MS,
};
pub use remote::{ApplyOutcome, DocChanges, RemoteError, WireEntry};
pub use write_back::{
    PlannedWrite, WRITE_BACK_STALE_RETRIES_MAX, WRITE_BACK_STALE_WAIT_MAX_MS,
    WRITE_BACK_STALE_WAIT_MS, WritePlan,
};

/// One collection a tool syncs.
#[derive(Debug, Clone)]
pub struct CollectionInfo {
    /// How the tool's columns map to the canonical fields, with its filter.
    pub mapping: Mapping,
    /// What makes two records of the collection the same.
    pub identity: RecordIdentity,
    /// The fields that identify a record, for [`RecordIdentity::NaturalKey`].
    pub natural_key: Option<NaturalKey>,
}

/// What makes two records of a collection the same record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RecordIdentity {
    /// Each tool keeps the ids it assigns: a record created in one tool gets a new
    /// document (a minted id) and is inserted into the others with the ids they
    /// assign; the links between tool records and documents are the authority. Two
    /// records are never merged because two tools gave them the same id.
    ToolIds,
    /// The key means the same record everywhere: the document id derives from
    /// (collection, key), and every tool holds the record under that key.
    SharedKey,
    /// Normalised canonical fields identify a record: a tool's new record joins the
    /// document of records with its natural key (derived from it, so two sites that
    /// create the same record offline grow one document); once linked, the tool's
    /// record stays with its document as under tool ids, whatever its fields become.
    NaturalKey,
}

/// One tool of this agent, as the engine knows it.
#[derive(Debug, Clone)]
pub struct ToolSpec {
    /// The tool's name in this agent (unique here): it keys the tool's shadows,
    /// cursor, pending marks and dead letters in the store.
    pub name: String,
    /// The tool's id in documents, unique among all agents (this agent's peer id,
    /// shortened, and the name): it keys the record's external id in that tool.
    pub uid: String,
    /// The collections it syncs.
    pub collections: BTreeMap<String, CollectionInfo>,
}

/// The index of a tool among the engine's tools.
pub type ToolIx = usize;

/// Counters of what the engine did, for status and tests.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EngineStats {
    /// Captured row changes that changed a document.
    pub captured: u64,
    /// Remote log entries that brought new changes.
    pub applied: u64,
    /// Decisions written for contested fields and tombstones.
    pub decided: u64,
    /// Rows written, updated or deleted in the local tool.
    pub writes: u64,
    /// Records set aside as dead letters.
    pub dead_letters: u64,
    /// Write-back ops refused as stale (the tool changed the record since).
    pub stale_writes: u64,
    /// Documents quarantined because they could not be read.
    pub quarantined: u64,
    /// New records left unmatched because their natural key is not unique in their tool.
    pub ambiguous: u64,
    /// Stored documents saved again as one, smaller, by the idle compaction.
    pub docs_compacted: u64,
}

/// The agent's decision logic over its store.
#[derive(Debug)]
pub struct Engine {
    store: Store,
    tools: Vec<ToolState>,
    /// Every collection this agent syncs (its tools' and those it only relays), with
    /// the tools syncing each.
    collections: BTreeMap<String, Vec<ToolIx>>,
    stats: EngineStats,
    /// The agent's name in provenance (the first characters of its peer id).
    agent: String,
    /// Conflict and delete policies by collection (defaults for those not listed).
    policies: BTreeMap<String, CollectionPolicy>,
    /// Fields of documents with a conflict waiting for a person: the stored queue,
    /// mirrored in memory.
    open_conflicts: BTreeMap<DocId, BTreeSet<String>>,
    /// The time of the step being staged (ms since the epoch), set by the core.
    now_ms: i64,
}

/// What the engine keeps per tool.
#[derive(Debug)]
struct ToolState {
    /// Shared, so the hot paths take it without copying the text.
    name: Arc<str>,
    uid: Arc<str>,
    collections: BTreeMap<String, Arc<CollectionInfo>>,
    /// The capture cursor committed last (or staged in the open batch).
    captured: Cursor,
    /// The tool loop's number of the capture committed last (see [`WritePlan::mark`]).
    captured_mark: u64,
    /// Documents awaiting write-back to this tool: the stored set, mirrored in
    /// memory so that planning does not scan the keyspace.
    pending: BTreeSet<DocId>,
    /// Documents in the write-back plan on its way to the tool.
    in_flight: BTreeSet<DocId>,
    /// Those of them marked pending again since the plan was made.
    changed_in_flight: BTreeSet<DocId>,
    /// Per document, write-backs refused as stale in a row, and until when (ms since
    /// the epoch) it waits before the next attempt once there were too many.
    stale: HashMap<DocId, (u32, i64)>,
    /// What the tool's edits record as their provenance.
    provenance: Provenance,
    /// Writes in one write-back plan at most ([`connectors::Connector::writes_per_plan`]).
    writes_per_plan: usize,
    /// Documents whose delete from this tool waits for approval: not written to it.
    held: HashMap<DocId, String>,
    /// Documents whose write-back this tool refused (dead letters), with the
    /// record's collection and key and when it is retried.
    letters: HashMap<DocId, Letter>,
    /// What was done with this tool since start.
    counts: ToolCounts,
    /// The (collection, key) of every dead letter of this tool: the stored set,
    /// mirrored so that a capture clears a letter only where there is one.
    lettered: HashSet<(String, String)>,
}

/// What the engine did with one tool since the agent started.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ToolCounts {
    /// Captured row changes that changed a document.
    pub captured: u64,
    /// Rows written, updated or deleted in the tool.
    pub written: u64,
    /// Writes refused as stale (the tool changed the record since).
    pub stale: u64,
    /// Records set aside as dead letters (each time).
    pub dead_lettered: u64,
}

impl Engine {
    /// An engine over `store` for `tools`, also relaying the collections in `relayed`
    /// (a hub has no tool and relays only).
    pub fn new(
        mut store: Store,
        tools: Vec<ToolSpec>,
        relayed: impl IntoIterator<Item = String>,
    ) -> Result<Engine, StoreError> {
        if let Some(first) = tools.first() {
            store.migrate_pending(&first.name)?;
        }
        let reader = store.reader();
        let mut collections: BTreeMap<String, Vec<ToolIx>> =
            relayed.into_iter().map(|c| (c, Vec::new())).collect();
        let mut states = Vec::with_capacity(tools.len());
        for (ix, tool) in tools.into_iter().enumerate() {
            for collection in tool.collections.keys() {
                collections.entry(collection.clone()).or_default().push(ix);
            }
            let names: Vec<&str> = tool.collections.keys().map(String::as_str).collect();
            store.join_tool(&tool.name, &names)?;
            let held = reader
                .held_deletes()?
                .into_iter()
                .filter(|h| h.tool == tool.name)
                .map(|h| (DocId(h.doc), h.key))
                .collect();
            let tool_letters: Vec<_> = reader
                .dead_letters()?
                .into_iter()
                .filter(|l| l.tool == tool.name)
                .collect();
            let lettered = tool_letters
                .iter()
                .map(|l| (l.collection.clone(), l.key.clone()))
                .collect();
            let letters = tool_letters
                .into_iter()
                .filter_map(|l| {
                    let letter = Letter {
                        collection: l.collection,
                        key: l.key,
                        retry_at_ms: l.retry_at_ms,
                    };
                    Some((DocId(l.doc?), letter))
                })
                .collect();
            let provenance = Provenance {
                agent: tool.uid.split('.').next().unwrap_or_default().to_owned(),
                tool: tool.name.clone(),
                decision: None,
            };
            states.push(ToolState {
                writes_per_plan: connectors::WRITES_PER_PLAN,
                counts: ToolCounts::default(),
                lettered,
                provenance,
                held,
                letters,
                captured: reader.tool_cursor(&tool.name)?,
                captured_mark: 0,
                pending: reader
                    .pending(&tool.name, usize::MAX)?
                    .into_iter()
                    .collect(),
                in_flight: BTreeSet::new(),
                changed_in_flight: BTreeSet::new(),
                stale: HashMap::new(),
                collections: tool
                    .collections
                    .into_iter()
                    .map(|(name, info)| (name, Arc::new(info)))
                    .collect(),
                name: tool.name.into(),
                uid: tool.uid.into(),
            });
        }
        // A store written before records were counted counts them once.
        for collection in collections.keys() {
            store.recount_records(collection)?;
        }
        let mut open_conflicts: BTreeMap<DocId, BTreeSet<String>> = BTreeMap::new();
        for conflict in reader.conflicts()? {
            open_conflicts
                .entry(DocId(conflict.doc))
                .or_default()
                .insert(conflict.field);
        }
        let agent = states
            .first()
            .map(|s| s.provenance.agent.clone())
            .unwrap_or_else(|| crate::store::hex(&store.actor()[..4]));
        Ok(Engine {
            store,
            tools: states,
            collections,
            stats: EngineStats::default(),
            agent,
            policies: BTreeMap::new(),
            open_conflicts,
            now_ms: 0,
        })
    }

    /// Sets the agent's name in provenance and the collections' policies.
    pub fn with_policies(
        mut self,
        agent: String,
        policies: BTreeMap<String, CollectionPolicy>,
    ) -> Engine {
        self.agent = agent;
        self.policies = policies;
        self
    }

    /// Sets the time of the step being staged (ms since the epoch).
    pub fn set_now(&mut self, now_ms: i64) {
        self.now_ms = now_ms;
    }

    /// The store, for commits.
    pub fn store(&mut self) -> &mut Store {
        &mut self.store
    }

    /// Read access to the committed store.
    pub fn reader(&self) -> StoreReader {
        self.store.reader()
    }

    /// Counts documents the idle compaction saved again as one.
    pub fn docs_compacted(&mut self, n: u64) {
        self.stats.docs_compacted += n;
    }

    /// The id of the engine's store (its actor id).
    pub fn store_id(&self) -> StoreId {
        self.store.actor()
    }

    /// Every collection this agent syncs with its peers.
    pub fn collections(&self) -> impl Iterator<Item = &str> {
        self.collections.keys().map(String::as_str)
    }

    /// How many tools the engine writes to.
    pub fn tool_count(&self) -> usize {
        self.tools.len()
    }

    /// Plans for `tool` hold at most `writes` writes (its connector's
    /// [`connectors::Connector::writes_per_plan`]; [`connectors::WRITES_PER_PLAN`]
    /// until set).
    pub fn set_writes_per_plan(&mut self, tool: ToolIx, writes: usize) {
        self.tools[tool].writes_per_plan = writes.max(1);
    }

    /// Writes in one write-back plan for `tool` at most.
    pub fn writes_per_plan(&self, tool: ToolIx) -> usize {
        self.tools[tool].writes_per_plan
    }

    /// What the engine did so far.
    pub fn stats(&self) -> &EngineStats {
        &self.stats
    }

    /// What the agent's status shows of the engine now: per tool what it did and
    /// what waits, per collection its records and log head.
    pub fn snapshot(&mut self) -> Result<crate::telemetry::CoreSnapshot, StoreError> {
        let tools = self
            .tools
            .iter()
            .map(|t| crate::telemetry::ToolSnapshot {
                name: t.name.to_string(),
                counts: t.counts,
                pending: t.pending.len() as u64,
                held_deletes: t.held.len() as u64,
                dead_letters: t.lettered.len() as u64,
            })
            .collect();
        let mut collections = Vec::with_capacity(self.collections.len());
        for name in self.collections.keys() {
            collections.push(crate::telemetry::CollectionSnapshot {
                name: name.clone(),
                records: self.store.records(name)?,
                log_head: self.store.log_head(name)?,
            });
        }
        Ok(crate::telemetry::CoreSnapshot {
            tools,
            collections,
            conflicts: self.open_conflicts.values().map(|f| f.len() as u64).sum(),
            stats: self.stats.clone(),
            commits: 0,
        })
    }

    /// Tool `tool`'s capture cursor, committed (or staged in the open batch).
    pub fn captured(&self, tool: ToolIx) -> &Cursor {
        &self.tools[tool].captured
    }

    /// Marks or unmarks a document as awaiting write-back to `tool`, staging only
    /// real changes.
    fn set_pending(&mut self, batch: &mut Batch, tool: ToolIx, id: DocId, pending: bool) {
        let state = &mut self.tools[tool];
        if pending && state.in_flight.contains(&id) {
            state.changed_in_flight.insert(id);
        }
        let changed = if pending {
            state.pending.insert(id)
        } else {
            state.pending.remove(&id)
        };
        if changed {
            self.store.stage_pending(batch, &state.name, id, pending);
        }
        if !pending {
            state.stale.remove(&id);
        }
    }

    /// Marks document `id` of `collection` as awaiting write-back to every tool that
    /// syncs the collection, except `but`.
    fn set_pending_all(
        &mut self,
        batch: &mut Batch,
        collection: &str,
        id: DocId,
        but: Option<ToolIx>,
    ) {
        let count = self.collections.get(collection).map_or(0, Vec::len);
        for k in 0..count {
            let tool = self.collections[collection][k];
            if Some(tool) != but {
                self.set_pending(batch, tool, id, true);
            }
        }
    }

    /// Reads document `id`; a document that cannot be read is quarantined with the
    /// reason (it stops being pending) and `None` is returned. Bad data is never a
    /// storage failure.
    fn read_or_quarantine(
        &mut self,
        batch: &mut Batch,
        id: DocId,
    ) -> Result<Option<RecordState>, StoreError> {
        if let Some(state) = self.store.remembered_read(id) {
            return self.settled(id, state).map(Some);
        }
        let doc = self.store.doc(id)?;
        match doc.read() {
            Ok(state) => self.settled(id, state).map(Some),
            Err(e) => {
                let collection = match doc.identity() {
                    Ok(Some((collection, _))) => collection,
                    _ => String::new(),
                };
                self.quarantine(batch, id, &collection, None, e.to_string());
                Ok(None)
            }
        }
    }

    /// Sets document `id` aside with `reason`: it is not written back any more.
    fn quarantine(
        &mut self,
        batch: &mut Batch,
        id: DocId,
        collection: &str,
        peer: Option<StoreId>,
        reason: String,
    ) {
        tracing::warn!(%collection, doc = %id, %reason, "document quarantined");
        let quarantined = Quarantined {
            collection: collection.to_owned(),
            doc: id.0,
            peer,
            reason,
        };
        self.store.stage_quarantine(batch, &quarantined);
        for tool in 0..self.tools.len() {
            self.set_pending(batch, tool, id, false);
        }
        self.stats.quarantined += 1;
    }
}

/// A dead letter of a refused write-back, as the engine keeps it in memory.
#[derive(Debug, Clone)]
struct Letter {
    collection: String,
    key: String,
    /// When it is retried (ms since the epoch); `None`: not automatically.
    retry_at_ms: Option<i64>,
}

/// Whether the record is deleted (tombstoned); a document that cannot be read counts
/// as not deleted.
fn tombstoned(doc: &RecordDoc) -> bool {
    !doc.is_empty() && doc.is_deleted().unwrap_or(false)
}

/// Whether a tool holding `held` (its shadow of the record, `None` when it holds
/// none) must be written for the merged record `state`. A record the mapping cannot
/// project needs a write, which planning turns into a dead letter.
fn needs_write(info: &CollectionInfo, state: &RecordState, held: Option<&Record>) -> bool {
    match info.mapping.project(state) {
        Ok(Projection::Deleted) => held.is_some(),
        Ok(Projection::Outside) => {
            held.is_some() && info.mapping.on_filter_exit() == FilterExit::Remove
        }
        Ok(Projection::Held(target)) => match held {
            None => true,
            Some(_) => !info.mapping.writes(&target, &state.fields, held).is_empty(),
        },
        Err(_) => true,
    }
}

#[cfg(test)]
mod tests;
