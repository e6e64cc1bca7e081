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
mod remote;
mod write_back;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

use crdt_model::{DocId, Record, RecordDoc, RecordState, Value};

use crate::store::{Batch, Quarantined, Store, StoreError, StoreId, StoreReader, tool_cursor};

pub use remote::{ApplyOutcome, DocChanges, RemoteError, WireEntry};
pub use write_back::{
    PlannedWrite, WRITE_BACK_STALE_RETRIES_MAX, WRITE_BACK_STALE_WAIT_MAX_MS,
    WRITE_BACK_STALE_WAIT_MS, WritePlan,
};

/// One configured collection of the local tool.
#[derive(Debug, Clone)]
pub struct CollectionInfo {
    /// The columns synced, by name (the fields of the canonical record).
    pub columns: Vec<String>,
}

/// Counters of what the engine did, for status and tests.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EngineStats {
    /// Captured row changes that changed a document.
    pub captured: u64,
    /// Remote log entries that brought new changes.
    pub applied: u64,
    /// Rows written, updated or deleted in the local tool.
    pub writes: u64,
    /// Records set aside as dead letters.
    pub dead_letters: u64,
    /// Write-back ops refused as stale (the tool changed the record since).
    pub stale_writes: u64,
    /// Documents quarantined because they could not be read.
    pub quarantined: u64,
}

/// The agent's decision logic over its store.
#[derive(Debug)]
pub struct Engine {
    store: Store,
    tool: String,
    collections: BTreeMap<String, Arc<CollectionInfo>>,
    captured_upto: u64,
    /// Documents awaiting write-back: the stored set, mirrored in memory so that
    /// planning does not scan the keyspace.
    pending: BTreeSet<DocId>,
    /// Documents in the write-back plan on its way to the tool.
    in_flight: BTreeSet<DocId>,
    /// Those of them marked pending again since the plan was made.
    changed_in_flight: BTreeSet<DocId>,
    /// Per document, write-backs refused as stale in a row, and until when (ms since
    /// the epoch) it waits before the next attempt once there were too many.
    stale: HashMap<DocId, (u32, i64)>,
    /// Outbox entries up to here belong to a rescan of the tool (see
    /// `SqliteConnector::claim`): rows the tool holds are recorded without reviving
    /// records deleted elsewhere.
    rescan_upto: u64,
    stats: EngineStats,
}

impl Engine {
    /// An engine over `store` for the local tool named `tool` with its collections.
    pub fn new(
        store: Store,
        tool: String,
        collections: BTreeMap<String, CollectionInfo>,
    ) -> Result<Engine, StoreError> {
        let reader = store.reader();
        let captured_upto = reader.cursor(&tool_cursor(&tool))?;
        let pending = reader.pending(usize::MAX)?.into_iter().collect();
        let collections = collections
            .into_iter()
            .map(|(name, info)| (name, Arc::new(info)))
            .collect();
        Ok(Engine {
            store,
            tool,
            collections,
            captured_upto,
            pending,
            in_flight: BTreeSet::new(),
            changed_in_flight: BTreeSet::new(),
            stale: HashMap::new(),
            rescan_upto: 0,
            stats: EngineStats::default(),
        })
    }

    /// The store, for commits.
    pub fn store(&mut self) -> &mut Store {
        &mut self.store
    }

    /// Sets the end of the tool's rescan entries; capture batches must not straddle it.
    pub fn set_rescan_upto(&mut self, upto: u64) {
        self.rescan_upto = upto;
    }

    /// Read access to the committed store.
    pub fn reader(&self) -> StoreReader {
        self.store.reader()
    }

    /// The id of the engine's store (its actor id).
    pub fn store_id(&self) -> StoreId {
        self.store.actor()
    }

    /// The collections of the local tool.
    pub fn collections(&self) -> impl Iterator<Item = &str> {
        self.collections.keys().map(String::as_str)
    }

    /// What the engine did so far.
    pub fn stats(&self) -> &EngineStats {
        &self.stats
    }

    /// The outbox seq up to which the tool's changes are captured and committed.
    pub fn captured_upto(&self) -> u64 {
        self.captured_upto
    }

    /// Marks or unmarks a document as awaiting write-back, staging only real changes.
    fn set_pending(&mut self, batch: &mut Batch, id: DocId, pending: bool) {
        if pending && self.in_flight.contains(&id) {
            self.changed_in_flight.insert(id);
        }
        let changed = if pending {
            self.pending.insert(id)
        } else {
            self.pending.remove(&id)
        };
        if changed {
            self.store.stage_pending(batch, id, pending);
        }
        if !pending {
            self.stale.remove(&id);
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
        let doc = self.store.doc(id)?;
        match doc.read() {
            Ok(state) => Ok(Some(state)),
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
        self.set_pending(batch, id, false);
        self.stats.quarantined += 1;
    }
}

/// Whether the record is deleted (tombstoned); a document that cannot be read counts
/// as not deleted.
fn tombstoned(doc: &RecordDoc) -> bool {
    !doc.is_empty() && doc.is_deleted().unwrap_or(false)
}

/// The record the local tool should hold for `state`: its configured columns (null
/// where the document has no value), or `None` when the record is deleted.
fn project(state: &RecordState, info: &CollectionInfo) -> Option<Record> {
    if state.deleted {
        return None;
    }
    Some(
        info.columns
            .iter()
            .map(|column| {
                (
                    column.clone(),
                    state.fields.get(column).cloned().unwrap_or(Value::Null),
                )
            })
            .collect(),
    )
}

#[cfg(test)]
mod tests;
