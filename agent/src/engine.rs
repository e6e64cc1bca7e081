//! The agent's decisions, without threads or sockets: what a captured change, a
//! remote change or a finished write-back does to the store.
//!
//! The core thread calls the engine with a [`Batch`] and commits it; the engine
//! never commits by itself, so each step's writes land atomically.

use std::collections::{BTreeMap, BTreeSet};

use connectors::sqlite::{CapturedChange, RowState, WriteOp, WriteOutcome};
use crdt_model::{DocId, Edit, Record, RecordState, Value};

use crate::store::{Batch, DeadLetter, Store, StoreError, StoreId, StoreReader, tool_cursor};

/// One configured collection of the local tool.
#[derive(Debug, Clone)]
pub struct CollectionInfo {
    /// The columns synced, by name (the fields of the canonical record).
    pub columns: Vec<String>,
}

/// A change received from a peer, as it travels on the wire.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct WireEntry {
    /// The entry's seq in the sender's log.
    pub seq: u64,
    /// The document.
    pub doc: [u8; 16],
    /// Automerge change bytes.
    pub changes: Vec<Vec<u8>>,
}

/// Changes of one document, for a peer that lacks them.
#[derive(Debug, Clone, PartialEq)]
pub struct DocChanges {
    /// The document's collection.
    pub collection: String,
    /// Automerge change bytes.
    pub changes: Vec<Vec<u8>>,
}

/// What applying a peer's entries found.
#[derive(Debug, Default)]
pub struct ApplyOutcome {
    /// Documents left with changes whose dependencies are missing: ask the peer for them.
    pub missing: Vec<DocId>,
}

/// A peer sent something that cannot be right; its session is closed.
#[derive(Debug, thiserror::Error)]
pub enum RemoteError {
    /// The entry's changes are not valid Automerge changes.
    #[error("document {doc}: {reason}")]
    BadChange {
        /// The document named by the entry.
        doc: DocId,
        /// What was wrong.
        reason: String,
    },
    /// The changes describe a record whose id is not the document's.
    #[error("document {doc} holds record ({collection:?}, {key:?}) whose id differs")]
    WrongIdentity {
        /// The document named by the entry.
        doc: DocId,
        /// The collection found in it.
        collection: String,
        /// The key found in it.
        key: String,
    },
    /// The store failed (fatal).
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// One write planned for the local tool, with what the tool will hold after it.
#[derive(Debug, Clone)]
pub struct PlannedWrite {
    /// The document projected.
    pub doc: DocId,
    /// The operation for the connector.
    pub op: WriteOp,
    /// The record the tool holds once the op is done (`None` after a delete).
    pub after: Option<Record>,
}

/// A batch of planned writes, stamped with the capture cursor it was planned at.
#[derive(Debug, Clone)]
pub struct WritePlan {
    /// Everything up to this outbox seq was captured when the plan was made; if the
    /// tool has newer edits, the plan is stale and must not run.
    pub captured_upto: u64,
    /// The writes.
    pub writes: Vec<PlannedWrite>,
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
}

/// The agent's decision logic over its store.
#[derive(Debug)]
pub struct Engine {
    store: Store,
    reader: StoreReader,
    tool: String,
    collections: BTreeMap<String, CollectionInfo>,
    captured_upto: u64,
    /// Documents awaiting write-back: the stored set, mirrored in memory so that
    /// planning does not scan the keyspace.
    pending: BTreeSet<DocId>,
    /// Documents in the write-back plan on its way to the tool.
    in_flight: BTreeSet<DocId>,
    /// Those of them marked pending again since the plan was made.
    changed_in_flight: BTreeSet<DocId>,
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
        Ok(Engine {
            store,
            reader,
            tool,
            collections,
            captured_upto,
            pending,
            in_flight: BTreeSet::new(),
            changed_in_flight: BTreeSet::new(),
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

    /// Read access to the store.
    pub fn reader(&self) -> &StoreReader {
        &self.reader
    }

    /// The id of the engine's store (its actor id).
    pub fn store_id(&self) -> StoreId {
        self.store.actor()
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
    }

    /// Stages captured changes of the local tool, made at `now_ms` (milliseconds since
    /// the Unix epoch), and the new capture cursor.
    ///
    /// Only fields that differ from the shadow (what the tool was known to hold) are
    /// written, so a capture never reverts a remote edit not yet written back.
    pub fn capture(
        &mut self,
        batch: &mut Batch,
        changes: Vec<CapturedChange>,
        cursor: u64,
        now_ms: i64,
    ) -> Result<(), StoreError> {
        let rescan = cursor <= self.rescan_upto;
        for change in changes {
            self.capture_one(batch, change, now_ms, rescan)?;
        }
        self.store
            .stage_cursor(batch, &tool_cursor(&self.tool), cursor);
        self.captured_upto = self.captured_upto.max(cursor);
        Ok(())
    }

    fn capture_one(
        &mut self,
        batch: &mut Batch,
        change: CapturedChange,
        now_ms: i64,
        rescan: bool,
    ) -> Result<(), StoreError> {
        let CapturedChange {
            collection,
            key,
            state,
        } = change;
        let Some(info) = self.collections.get(&collection) else {
            return Ok(());
        };
        let shadow = self.reader.shadow(&self.tool, &collection, &key)?;
        let (edit, after) = match state {
            RowState::Invalid(reason) => {
                tracing::warn!(tool = %self.tool, %collection, %key, %reason, "row set aside as a dead letter");
                let letter = DeadLetter {
                    tool: self.tool.clone(),
                    collection: collection.clone(),
                    key: key.clone(),
                    reason,
                };
                self.store
                    .stage_dead_letter(batch, &self.tool, &collection, &key, Some(&letter));
                self.stats.dead_letters += 1;
                return Ok(());
            }
            RowState::Absent => match shadow {
                None => return Ok(()),
                Some(_) => (
                    Edit {
                        deleted: Some(true),
                        time_ms: now_ms,
                        ..Edit::default()
                    },
                    None,
                ),
            },
            RowState::Present(record) => {
                // A new row's empty columns are not written: two sites creating the
                // same record offline then merge what each knew instead of one site's
                // nulls hiding the other's values.
                let created = shadow.is_none();
                let fields: Record = record
                    .iter()
                    .filter(|(name, value)| match &shadow {
                        Some(shadow) => shadow.get(*name) != Some(*value),
                        None => **value != Value::Null,
                    })
                    .map(|(name, value)| (name.clone(), value.clone()))
                    .collect();
                let edit = Edit {
                    fields,
                    external_id: created.then(|| (self.tool.clone(), key.clone())),
                    // A row the tool created revives its record; a row found by a
                    // rescan does not overrule a delete made elsewhere.
                    deleted: (created && !rescan).then_some(false),
                    time_ms: now_ms,
                };
                (edit, Some(record))
            }
        };
        let id = DocId::of(&collection, &key);
        self.store
            .stage_dead_letter(batch, &self.tool, &collection, &key, None);
        if after.is_some() && edit.external_id.is_some() {
            self.store
                .stage_external_id(batch, &self.tool, &collection, &key, id);
        }
        self.store
            .stage_shadow(batch, &self.tool, &collection, &key, after.as_ref());
        let doc = self.store.doc(id)?;
        let was_empty = doc.is_empty();
        let change = doc
            .edit(&collection, &key, &edit)
            .map_err(|e| StoreError::Corrupt {
                what: "document",
                reason: format!("{id}: {e}"),
            })?;
        // The merged record may differ from what the tool holds (a concurrent remote
        // edit won, or the record is deleted): then the tool needs a write-back. A
        // document this capture created holds exactly the tool's record.
        if !was_empty {
            let state = read_state(doc, id)?;
            let differs = project(&state, info).as_ref() != after.as_ref();
            self.set_pending(batch, id, differs);
        }
        if let Some(change) = change {
            self.store
                .stage_doc(batch, id, &collection, vec![change], None)?;
            self.stats.captured += 1;
        }
        Ok(())
    }

    /// Stages entries of `origin`'s log of `collection` and, when every seq up to
    /// `upto` was seen, the new cursor into that log (repairs come without one).
    pub fn apply_remote(
        &mut self,
        batch: &mut Batch,
        origin: StoreId,
        collection: &str,
        upto: Option<u64>,
        entries: Vec<WireEntry>,
    ) -> Result<ApplyOutcome, RemoteError> {
        let mut outcome = ApplyOutcome::default();
        for entry in entries {
            let id = DocId(entry.doc);
            let result = self.apply_entry(batch, origin, collection, id, &entry.changes);
            match result {
                Ok(missing) => {
                    if missing {
                        outcome.missing.push(id);
                    }
                }
                Err(e) => {
                    // Drop whatever the bad entry did to the cached document.
                    self.store.forget(id);
                    return Err(e);
                }
            }
        }
        if let Some(upto) = upto {
            let cursor = crate::store::peer_cursor(&origin, collection);
            if upto + 1 > self.reader.cursor(&cursor)? {
                self.store.stage_cursor(batch, &cursor, upto + 1);
            }
        }
        Ok(outcome)
    }

    fn apply_entry(
        &mut self,
        batch: &mut Batch,
        origin: StoreId,
        collection: &str,
        id: DocId,
        changes: &[Vec<u8>],
    ) -> Result<bool, RemoteError> {
        let doc = self.store.doc(id)?;
        let applied = doc.apply(changes).map_err(|e| RemoteError::BadChange {
            doc: id,
            reason: e.to_string(),
        })?;
        if applied.new_changes.is_empty() {
            return Ok(applied.missing_deps);
        }
        let (found, key) = doc
            .identity()
            .map_err(|e| RemoteError::BadChange {
                doc: id,
                reason: e.to_string(),
            })?
            .unwrap_or_default();
        if DocId::of(&found, &key) != id || found != collection {
            return Err(RemoteError::WrongIdentity {
                doc: id,
                collection: found,
                key,
            });
        }
        // Entries learned from a peer are not sent back to it, unless the apply also
        // released changes that came earlier from elsewhere (they waited for a
        // dependency): that peer may lack those.
        let origin = (!applied.released_earlier).then_some(origin);
        self.store
            .stage_doc(batch, id, collection, applied.new_changes, origin)?;
        if self.collections.contains_key(collection) {
            self.set_pending(batch, id, true);
        }
        self.stats.applied += 1;
        Ok(applied.missing_deps)
    }

    /// All changes of document `id` that a peer with `heads` lacks (heads unknown here are ignored).
    /// Returns the document's collection too; `None` if the document is unknown here.
    pub fn changes_since(
        &mut self,
        id: DocId,
        heads: &[crdt_model::ChangeHash],
    ) -> Result<Option<DocChanges>, StoreError> {
        if !self.store.has_doc(id)? {
            return Ok(None);
        }
        let doc = self.store.doc(id)?;
        let Some((collection, _)) = doc.identity().map_err(|e| StoreError::Corrupt {
            what: "document",
            reason: format!("{id}: {e}"),
        })?
        else {
            return Ok(None);
        };
        let am = doc.automerge();
        let missing = am.get_missing_deps(heads);
        let known: Vec<_> = heads
            .iter()
            .copied()
            .filter(|h| !missing.contains(h))
            .collect();
        let changes = am
            .get_changes(&known)
            .into_iter()
            .map(|c| c.raw_bytes().to_vec())
            .collect();
        Ok(Some(DocChanges {
            collection,
            changes,
        }))
    }

    /// The heads of document `id` (empty if unknown).
    pub fn heads(&mut self, id: DocId) -> Result<Vec<crdt_model::ChangeHash>, StoreError> {
        if !self.store.has_doc(id)? {
            return Ok(Vec::new());
        }
        Ok(self.store.doc(id)?.heads())
    }

    /// Plans up to `max` writes that bring the local tool in line with the merged
    /// documents, skipping documents whose projection the tool already holds.
    pub fn plan_writes(&mut self, batch: &mut Batch, max: usize) -> Result<WritePlan, StoreError> {
        let mut writes = Vec::new();
        let ids: Vec<DocId> = self.pending.iter().take(max).copied().collect();
        for id in ids {
            let state = read_state(self.store.doc(id)?, id)?;
            let Some(info) = self.collections.get(&state.collection) else {
                self.set_pending(batch, id, false);
                continue;
            };
            let shadow = self
                .reader
                .shadow(&self.tool, &state.collection, &state.key)?;
            let projected = project(&state, info);
            let op = match (&projected, &shadow) {
                (None, None) => None,
                (None, Some(_)) => Some(WriteOp::Delete {
                    collection: state.collection.clone(),
                    key: state.key.clone(),
                }),
                (Some(record), shadow) => {
                    let fields: Record = record
                        .iter()
                        .filter(|(name, value)| {
                            shadow.as_ref().and_then(|s| s.get(*name)) != Some(*value)
                        })
                        .map(|(name, value)| (name.clone(), value.clone()))
                        .collect();
                    (!fields.is_empty()).then(|| WriteOp::Upsert {
                        collection: state.collection.clone(),
                        key: state.key.clone(),
                        fields,
                    })
                }
            };
            match op {
                Some(op) => writes.push(PlannedWrite {
                    doc: id,
                    op,
                    after: projected,
                }),
                None => self.set_pending(batch, id, false),
            }
        }
        self.in_flight = writes.iter().map(|w| w.doc).collect();
        self.changed_in_flight.clear();
        Ok(WritePlan {
            captured_upto: self.captured_upto,
            writes,
        })
    }

    /// Stages the result of a write-back: shadows of written records, dead letters of
    /// rejected ones. A stale plan (the tool had uncaptured edits) leaves all pending.
    pub fn writes_done(
        &mut self,
        batch: &mut Batch,
        plan: WritePlan,
        outcome: WriteOutcome,
    ) -> Result<(), StoreError> {
        let rejected: BTreeMap<usize, String> = match outcome {
            WriteOutcome::CaptureFirst => {
                self.in_flight.clear();
                self.changed_in_flight.clear();
                return Ok(());
            }
            WriteOutcome::Written { rejected } => rejected.into_iter().collect(),
        };
        self.in_flight.clear();
        let changed_in_flight = std::mem::take(&mut self.changed_in_flight);
        for (index, write) in plan.writes.into_iter().enumerate() {
            let (collection, key) = match &write.op {
                WriteOp::Upsert {
                    collection, key, ..
                }
                | WriteOp::Delete { collection, key } => (collection, key),
            };
            match rejected.get(&index) {
                Some(reason) => {
                    tracing::warn!(tool = %self.tool, %collection, %key, %reason, "write-back set aside as a dead letter");
                    let letter = DeadLetter {
                        tool: self.tool.clone(),
                        collection: collection.clone(),
                        key: key.clone(),
                        reason: reason.clone(),
                    };
                    self.store
                        .stage_dead_letter(batch, &self.tool, collection, key, Some(&letter));
                    self.stats.dead_letters += 1;
                }
                None => {
                    self.store.stage_shadow(
                        batch,
                        &self.tool,
                        collection,
                        key,
                        write.after.as_ref(),
                    );
                    self.stats.writes += 1;
                    // The document changed again while the plan was on its way (a
                    // peer's change arrived): it stays pending.
                    if changed_in_flight.contains(&write.doc) {
                        continue;
                    }
                }
            }
            self.set_pending(batch, write.doc, false);
        }
        Ok(())
    }
}

fn read_state(doc: &crdt_model::RecordDoc, id: DocId) -> Result<RecordState, StoreError> {
    doc.read().map_err(|e| StoreError::Corrupt {
        what: "document",
        reason: format!("{id}: {e}"),
    })
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
mod tests {
    use super::*;

    fn engine(dir: &std::path::Path) -> Result<Engine, StoreError> {
        let collections = BTreeMap::from([(
            "customers".to_owned(),
            CollectionInfo {
                columns: vec!["name".to_owned()],
            },
        )]);
        Engine::new(Store::open(dir)?, "sqlite".to_owned(), collections)
    }

    fn captured(key: &str, name: &str) -> CapturedChange {
        CapturedChange {
            collection: "customers".to_owned(),
            key: key.to_owned(),
            state: RowState::Present(Record::from([(
                "name".to_owned(),
                Value::Text(name.to_owned()),
            )])),
        }
    }

    /// A change whose dependencies never arrived (a gap no cursor can see) is
    /// repaired by exchanging the document's heads.
    #[test]
    fn a_document_with_missing_dependencies_is_repaired_by_a_heads_exchange()
    -> Result<(), Box<dyn std::error::Error>> {
        let (dir_a, dir_b) = (tempfile::tempdir()?, tempfile::tempdir()?);
        let (mut a, mut b) = (engine(dir_a.path())?, engine(dir_b.path())?);
        for (cursor, name) in [(1, "Ada"), (2, "Ada Lovelace")] {
            let mut batch = a.store().batch();
            a.capture(&mut batch, vec![captured("1", name)], cursor, 0)?;
            a.store().commit(batch)?;
        }
        let log = a.store().reader().log_from("customers", 1, 10)?;
        assert_eq!(log.len(), 2);
        let id = DocId(log[1].1.doc);

        // B gets only the second entry.
        let second = WireEntry {
            seq: 2,
            doc: log[1].1.doc,
            changes: log[1].1.changes.clone(),
        };
        let mut batch = b.store().batch();
        let outcome = b.apply_remote(
            &mut batch,
            a.store().actor(),
            "customers",
            Some(2),
            vec![second],
        )?;
        b.store().commit(batch)?;
        assert_eq!(outcome.missing, vec![id]);

        let heads = b.heads(id)?;
        let repair = a.changes_since(id, &heads)?.ok_or("A knows the document")?;
        assert_eq!(repair.collection, "customers");
        let entry = WireEntry {
            seq: 0,
            doc: id.0,
            changes: repair.changes,
        };
        let mut batch = b.store().batch();
        let outcome = b.apply_remote(
            &mut batch,
            a.store().actor(),
            "customers",
            None,
            vec![entry],
        )?;
        b.store().commit(batch)?;
        assert!(outcome.missing.is_empty());
        assert_eq!(b.heads(id)?, a.heads(id)?);
        let state = b.store().doc(id)?.read()?;
        assert_eq!(state.fields["name"], Value::Text("Ada Lovelace".to_owned()));
        Ok(())
    }

    /// A peer cannot put a record into a document whose id belongs to another.
    #[test]
    fn changes_under_a_foreign_document_id_are_refused() -> Result<(), Box<dyn std::error::Error>> {
        let (dir_a, dir_b) = (tempfile::tempdir()?, tempfile::tempdir()?);
        let (mut a, mut b) = (engine(dir_a.path())?, engine(dir_b.path())?);
        let mut batch = a.store().batch();
        a.capture(&mut batch, vec![captured("1", "Ada")], 1, 0)?;
        a.store().commit(batch)?;
        let log = a.store().reader().log_from("customers", 1, 10)?;
        let forged = WireEntry {
            seq: 1,
            doc: DocId::of("customers", "2").0,
            changes: log[0].1.changes.clone(),
        };
        let mut batch = b.store().batch();
        let result = b.apply_remote(
            &mut batch,
            a.store().actor(),
            "customers",
            Some(1),
            vec![forged],
        );
        assert!(
            matches!(result, Err(RemoteError::WrongIdentity { .. })),
            "{result:?}"
        );
        Ok(())
    }
}
