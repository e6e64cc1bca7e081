//! Write-back: planning what the local tool must hold, and learning what it did.

use connectors::{Cursor, OpOutcome, WriteOp};
use crdt_model::{DocId, Edit, Record, Value};

use super::{CollectionInfo, Engine, RecordIdentity, ToolIx};
use crate::config::FilterExit;
use crate::mapping::Projection;
use crate::store::{Batch, LetterReason, StoreError};

/// Write-backs of one document refused as stale in a row before it waits between
/// attempts: a record the user keeps changing does not hold up the others.
pub const WRITE_BACK_STALE_RETRIES_MAX: u32 = 8;
/// The first wait after [`WRITE_BACK_STALE_RETRIES_MAX`] stale refusals; it doubles
/// with each further one, up to [`WRITE_BACK_STALE_WAIT_MAX_MS`].
pub const WRITE_BACK_STALE_WAIT_MS: i64 = 10;
/// The longest wait between write-back attempts of a document refused as stale.
pub const WRITE_BACK_STALE_WAIT_MAX_MS: i64 = 1_000;

/// One write planned for a tool, with what the tool will hold after it.
#[derive(Debug, Clone)]
pub struct PlannedWrite {
    /// The document projected.
    pub doc: DocId,
    /// The operation for the connector.
    pub op: WriteOp,
    /// The record the tool holds once the op is done (`None` after a delete).
    pub after: Option<Record>,
    /// The op deletes the record from this tool only, because it no longer passes
    /// the tool's filter: once written, the tool's record is no longer linked.
    pub leaves: bool,
}

/// A batch of planned writes for one tool, stamped with the capture it was planned at.
#[derive(Debug, Clone)]
pub struct WritePlan {
    /// The tool to write.
    pub tool: ToolIx,
    /// The tool's capture cursor when the plan was made: a record the tool changed
    /// after it is stale and must not be written.
    pub captured: Cursor,
    /// The tool loop's number of the last capture committed when the plan was made
    /// (numbers restart with the process, like the loop): records the loop captured
    /// after it are stale too, even once the tool forgot them.
    pub mark: u64,
    /// The writes.
    pub writes: Vec<PlannedWrite>,
}

impl Engine {
    /// Plans up to `max` writes that bring `tool` in line with the merged documents,
    /// skipping documents whose projection the tool already holds and documents
    /// waiting after repeated stale refusals (until `now_ms`).
    pub fn plan_writes(
        &mut self,
        batch: &mut Batch,
        tool: ToolIx,
        max: usize,
        now_ms: i64,
    ) -> Result<WritePlan, StoreError> {
        let state = &self.tools[tool];
        debug_assert!(state.in_flight.is_empty(), "one write-back plan at a time");
        let waiting = |id: &DocId| {
            state
                .stale
                .get(id)
                .is_some_and(|&(_, until)| until > now_ms)
        };
        let ids: Vec<DocId> = state
            .pending
            .iter()
            .filter(|id| !waiting(id))
            .take(max)
            .copied()
            .collect();
        let mut writes = Vec::with_capacity(ids.len());
        for id in ids {
            if let Some(write) = self.plan_one(batch, tool, id)? {
                writes.push(write);
            }
        }
        let state = &mut self.tools[tool];
        state.in_flight = writes.iter().map(|w| w.doc).collect();
        state.changed_in_flight.clear();
        Ok(WritePlan {
            tool,
            captured: state.captured.clone(),
            mark: state.captured_mark,
            writes,
        })
    }

    /// The write that brings the tool in line with document `id`, if one is needed;
    /// otherwise the document stops being pending.
    fn plan_one(
        &mut self,
        batch: &mut Batch,
        tool: ToolIx,
        id: DocId,
    ) -> Result<Option<PlannedWrite>, StoreError> {
        if self.tools[tool].held.contains_key(&id) {
            // The tool's delete of it waits for a person.
            self.set_pending(batch, tool, id, false);
            return Ok(None);
        }
        let Some(state) = self.read_or_quarantine(batch, id)? else {
            return Ok(None);
        };
        let Some(info) = self.tools[tool].collections.get(&state.collection).cloned() else {
            self.set_pending(batch, tool, id, false);
            return Ok(None);
        };
        let name = self.tools[tool].name.clone();
        let collection = state.collection.clone();
        // The record's key in this tool: the linked one, else (shared key) the
        // record's own; a record of tool ids that this tool never held has none yet.
        let key = match info.identity {
            RecordIdentity::SharedKey if !state.key.is_empty() => Some(state.key.clone()),
            _ => self.store.linked_key(&name, id)?,
        };
        let projected = match info.mapping.project(&state) {
            Ok(projected) => projected,
            Err(e) => {
                let key = key.unwrap_or_else(|| id_as_key(id));
                self.dead_letter(
                    batch,
                    tool,
                    &collection,
                    &key,
                    LetterReason::Mapping(e),
                    Some(id),
                )?;
                self.set_pending(batch, tool, id, false);
                return Ok(None);
            }
        };
        let write = match (projected, key) {
            (Projection::Deleted | Projection::Outside, None) => None,
            (Projection::Held(record), None) => match info.identity {
                RecordIdentity::ToolIds | RecordIdentity::NaturalKey => Some(PlannedWrite {
                    doc: id,
                    op: WriteOp::Insert {
                        collection: collection.clone(),
                        token: id.to_string(),
                        fields: record
                            .iter()
                            .filter(|(_, value)| **value != Value::Null)
                            .map(|(name, value)| (name.clone(), value.clone()))
                            .collect(),
                    },
                    after: Some(held_after(&info, None, record)),
                    leaves: false,
                }),
                RecordIdentity::SharedKey => {
                    // A record created under tool ids elsewhere has no key here.
                    let key = id_as_key(id);
                    self.dead_letter(
                        batch,
                        tool,
                        &collection,
                        &key,
                        LetterReason::NoKey,
                        Some(id),
                    )?;
                    self.set_pending(batch, tool, id, false);
                    return Ok(None);
                }
            },
            (projected, Some(key)) => {
                let shadow = self.store.shadow(&name, &collection, &key)?;
                let delete = |leaves| PlannedWrite {
                    doc: id,
                    op: WriteOp::Delete {
                        collection: collection.clone(),
                        key: key.clone(),
                    },
                    after: None,
                    leaves,
                };
                match (projected, shadow) {
                    (Projection::Deleted | Projection::Outside, None) => None,
                    (Projection::Deleted, Some(_)) => Some(delete(false)),
                    (Projection::Outside, Some(_)) => {
                        (info.mapping.on_filter_exit() == FilterExit::Remove).then(|| delete(true))
                    }
                    (Projection::Held(record), shadow) => {
                        let fields = info.mapping.writes(&record, &state.fields, shadow.as_ref());
                        (!fields.is_empty()).then(|| PlannedWrite {
                            doc: id,
                            after: Some(held_after(&info, shadow, fields.clone())),
                            op: WriteOp::Upsert {
                                collection: collection.clone(),
                                key: key.clone(),
                                fields,
                            },
                            leaves: false,
                        })
                    }
                }
            }
        };
        if write.is_none() {
            self.set_pending(batch, tool, id, false);
        }
        Ok(write)
    }

    /// Stages what the tool did with a plan, one outcome per write: shadows of
    /// written records, dead letters of rejected ones; stale ones stay pending.
    pub fn writes_done(
        &mut self,
        batch: &mut Batch,
        plan: WritePlan,
        outcomes: Vec<OpOutcome>,
        now_ms: i64,
    ) -> Result<(), StoreError> {
        debug_assert_eq!(plan.writes.len(), outcomes.len(), "one outcome per write");
        let tool = plan.tool;
        let name = self.tools[tool].name.clone();
        self.tools[tool].in_flight.clear();
        let changed_in_flight = std::mem::take(&mut self.tools[tool].changed_in_flight);
        for (write, outcome) in plan.writes.into_iter().zip(outcomes) {
            let collection = write.op.collection();
            let key = match (write.op.key(), &outcome) {
                (Some(key), _) => key.to_owned(),
                (None, OpOutcome::Written { key: Some(key), .. }) => key.clone(),
                (None, _) => id_as_key(write.doc),
            };
            if let (WriteOp::Insert { .. }, OpOutcome::Written { key: Some(_), .. }) =
                (&write.op, &outcome)
            {
                self.linked_by_insert(batch, tool, collection, &key, write.doc, now_ms)?;
            }
            let key = key.as_str();
            match outcome {
                OpOutcome::Written { key: None, .. } if write.op.key().is_none() => {
                    // The tool inserted a record but did not say its key: the link
                    // cannot be made, and writing again would duplicate the record.
                    tracing::error!(tool = %name, %collection, doc = %write.doc, "the tool did not return the key of an inserted record");
                    self.dead_letter(
                        batch,
                        tool,
                        collection,
                        key,
                        LetterReason::NoKey,
                        Some(write.doc),
                    )?;
                    self.set_pending(batch, tool, write.doc, false);
                }
                OpOutcome::Written { .. } => {
                    self.store
                        .stage_shadow(batch, &name, collection, key, write.after.as_ref());
                    if write.leaves {
                        self.store
                            .stage_unlink_record(batch, &name, collection, key);
                        self.store.stage_unlink_doc(batch, &name, write.doc);
                    }
                    self.stats.writes += 1;
                    self.tools[tool].counts.written += 1;
                    self.tools[tool].stale.remove(&write.doc);
                    self.clear_letter(batch, tool, write.doc);
                    // The document changed again while the plan was on its way (a
                    // peer's change arrived): it stays pending.
                    if !changed_in_flight.contains(&write.doc) {
                        self.set_pending(batch, tool, write.doc, false);
                    }
                }
                OpOutcome::Stale => {
                    self.stats.stale_writes += 1;
                    self.tools[tool].counts.stale += 1;
                    self.note_stale(tool, write.doc, now_ms);
                }
                OpOutcome::Rejected(rejection) => {
                    let reason = LetterReason::Rejected(rejection);
                    self.dead_letter(batch, tool, collection, key, reason, Some(write.doc))?;
                    self.tools[tool].stale.remove(&write.doc);
                    self.set_pending(batch, tool, write.doc, false);
                }
            }
        }
        Ok(())
    }

    /// Links the record the tool inserted under `key` to document `id`, and records
    /// the tool's id for it in the document.
    fn linked_by_insert(
        &mut self,
        batch: &mut Batch,
        tool: ToolIx,
        collection: &str,
        key: &str,
        id: DocId,
        now_ms: i64,
    ) -> Result<(), StoreError> {
        let (name, uid) = (self.tools[tool].name.clone(), self.tools[tool].uid.clone());
        self.store.stage_link(batch, &name, collection, key, id)?;
        let edit = Edit {
            external_id: Some((uid.to_string(), key.to_owned())),
            time_ms: now_ms,
            provenance: Some(self.tools[tool].provenance.clone()),
            ..Edit::default()
        };
        match self.store.doc(id)?.edit(collection, "", &edit) {
            Ok(Some(change)) => {
                self.store
                    .stage_doc(batch, id, collection, vec![change], None)?;
            }
            Ok(None) => {}
            Err(e) => {
                self.store.forget(id);
                self.quarantine(batch, id, collection, None, e.to_string());
            }
        }
        Ok(())
    }

    /// Hands `tool`'s plan back unwritten (the tool failed): its documents stay pending.
    pub fn writes_failed(&mut self, tool: ToolIx) {
        self.tools[tool].in_flight.clear();
        self.tools[tool].changed_in_flight.clear();
    }

    /// Counts a stale refusal of document `id`; after too many in a row it waits.
    fn note_stale(&mut self, tool: ToolIx, id: DocId, now_ms: i64) {
        let entry = self.tools[tool].stale.entry(id).or_insert((0, 0));
        entry.0 += 1;
        if let Some(over) = entry.0.checked_sub(WRITE_BACK_STALE_RETRIES_MAX) {
            let wait = WRITE_BACK_STALE_WAIT_MS
                .saturating_mul(1 << over.min(16))
                .min(WRITE_BACK_STALE_WAIT_MAX_MS);
            entry.1 = now_ms.saturating_add(wait);
        }
    }
}

/// What the tool holds after `written` is written over `shadow` (nothing, for a
/// new record): every column of the mapping, null where the tool was given nothing.
fn held_after(info: &CollectionInfo, shadow: Option<Record>, written: Record) -> Record {
    let mut after = shadow.unwrap_or_else(|| {
        info.mapping
            .columns()
            .iter()
            .map(|c| (c.clone(), Value::Null))
            .collect()
    });
    after.extend(written);
    after
}

/// The name a record without a key goes by in dead letters: its document id.
fn id_as_key(id: DocId) -> String {
    id.to_string()
}
