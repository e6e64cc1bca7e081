//! Capture: the local tool's changed rows become changes of their documents.

use connectors::{CaptureBatch, CapturedChange, RowState};
use crdt_model::{DocId, Edit};

use super::matching::SharedKeys;
use super::{Engine, RecordIdentity, ToolIx, needs_write, tombstoned};
use crate::store::{Batch, LetterReason, StoreError};

impl Engine {
    /// The tool changed the key of record `from` to `to`: its link and shadow
    /// follow, so the record stays one record (tool ids). A record never linked, or
    /// a new key already linked to another record, moves nothing.
    fn move_record(
        &mut self,
        batch: &mut Batch,
        tool: &str,
        collection: &str,
        from: &str,
        to: &str,
    ) -> Result<(), StoreError> {
        let Some(id) = self.store.linked_doc(tool, collection, from)? else {
            return Ok(());
        };
        if self.store.linked_doc(tool, collection, to)?.is_some() {
            return Ok(());
        }
        let shadow = self.store.shadow(tool, collection, from)?;
        self.store
            .stage_unlink_record(batch, tool, collection, from);
        self.store.stage_link(batch, tool, collection, to, id)?;
        self.store.stage_shadow(batch, tool, collection, from, None);
        self.store
            .stage_shadow(batch, tool, collection, to, shadow.as_ref());
        self.store
            .stage_dead_letter(batch, tool, collection, from, None);
        Ok(())
    }

    /// Stages the changes `tool` captured, made at `now_ms` (milliseconds since the
    /// Unix epoch), and its new capture cursor. `mark` is the tool loop's number of
    /// the capture (see [`super::WritePlan::mark`]).
    ///
    /// Only fields that differ from the shadow (what the tool was known to hold) are
    /// written, so a capture never reverts a remote edit not yet written back. A row
    /// created where the document is deleted starts the record anew: fields the row
    /// does not have are removed, so nothing of the dead record comes back.
    pub fn capture(
        &mut self,
        batch: &mut Batch,
        tool: ToolIx,
        captured: CaptureBatch,
        mark: u64,
        now_ms: i64,
    ) -> Result<(), StoreError> {
        let shared = self.shared_natural_keys(tool, &captured.changes)?;
        for change in captured.changes {
            self.capture_one(batch, tool, change, now_ms, captured.rescan, &shared)?;
        }
        let state = &mut self.tools[tool];
        self.store
            .stage_tool_cursor(batch, &state.name, &captured.cursor);
        state.captured = captured.cursor;
        state.captured_mark = state.captured_mark.max(mark);
        Ok(())
    }

    fn capture_one(
        &mut self,
        batch: &mut Batch,
        tool: ToolIx,
        change: CapturedChange,
        now_ms: i64,
        rescan: bool,
        shared: &SharedKeys,
    ) -> Result<(), StoreError> {
        let CapturedChange {
            collection,
            key,
            previous_key,
            state,
        } = change;
        let (name, uid) = (self.tools[tool].name.clone(), self.tools[tool].uid.clone());
        let Some(info) = self.tools[tool].collections.get(&collection).cloned() else {
            return Ok(());
        };
        if let Some(previous) = previous_key.filter(|p| *p != key) {
            match info.identity {
                // The record keeps its document under its new key.
                RecordIdentity::ToolIds | RecordIdentity::NaturalKey => {
                    self.move_record(batch, &name, &collection, &previous, &key)?;
                }
                // The key is the identity: the old record is gone, a new one begins.
                RecordIdentity::SharedKey => {
                    let gone = CapturedChange {
                        collection: collection.clone(),
                        key: previous,
                        previous_key: None,
                        state: RowState::Absent,
                    };
                    self.capture_one(batch, tool, gone, now_ms, rescan, shared)?;
                }
            }
        }
        let shadow = self.store.shadow(&name, &collection, &key)?;
        let present = matches!(state, RowState::Present(_));
        let mut joins = false;
        let (id, identity_key) = match info.identity {
            RecordIdentity::SharedKey => (DocId::of(&collection, &key), key.as_str()),
            RecordIdentity::ToolIds | RecordIdentity::NaturalKey => {
                let linked = self.store.linked_doc(&name, &collection, &key)?;
                let id = match linked {
                    // A row created where its linked record is deleted is a new
                    // record (the tool reused the key): a new document, never the
                    // dead one.
                    Some(old)
                        if present
                            && shadow.is_none()
                            && !rescan
                            && tombstoned(self.store.doc(old)?) =>
                    {
                        self.store.stage_unlink_doc(batch, &name, old);
                        DocId::minted(&self.store.actor(), &uid, &collection, &key, Some(old))
                    }
                    Some(linked) => linked,
                    None if present => match (&info.natural_key, &state) {
                        (Some(natural), RowState::Present(row)) => {
                            let placement = self.natural_doc(
                                batch,
                                tool,
                                &info,
                                natural,
                                &collection,
                                &key,
                                row,
                                shared,
                            )?;
                            joins = placement.joins;
                            placement.id
                        }
                        _ => DocId::minted(&self.store.actor(), &uid, &collection, &key, None),
                    },
                    // A record never linked that is gone or unreadable: nothing to
                    // record in a document (an invalid row still becomes a dead
                    // letter below).
                    None => DocId([0; 16]),
                };
                (id, "")
            }
        };
        let (edit, after) = match state {
            RowState::Invalid(invalid) => {
                let reason = LetterReason::InvalidRow(invalid);
                self.dead_letter(batch, &name, &collection, &key, reason);
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
                let created = shadow.is_none();
                // A row the tool created revives its record; a row found by a
                // rescan does not overrule a delete made elsewhere.
                let revive = created && !rescan;
                let reset = revive
                    && info.identity == RecordIdentity::SharedKey
                    && tombstoned(self.store.doc(id)?);
                // A new row's empty columns are not written: two sites creating the
                // same record offline then merge what each knew instead of one site's
                // nulls hiding the other's values. A reset removes every other field.
                let row_ms = info.mapping.changed_at_ms(&record).unwrap_or(now_ms);
                let fields = match info.mapping.read(&record, shadow.as_ref()) {
                    Ok(fields) if joins => {
                        self.joining_fields(id, info.mapping.on_match(), fields, row_ms)?
                    }
                    Ok(fields) => fields,
                    Err(e) => {
                        // The shadow stays as it was, so the row is read again
                        // once it changes.
                        let reason = LetterReason::Mapping(e);
                        self.dead_letter(batch, &name, &collection, &key, reason);
                        return Ok(());
                    }
                };
                let edit = Edit {
                    fields,
                    external_id: created.then(|| (uid.to_string(), key.clone())),
                    deleted: revive.then_some(false),
                    reset,
                    time_ms: row_ms,
                };
                (edit, Some(record))
            }
        };
        self.store
            .stage_dead_letter(batch, &name, &collection, &key, None);
        if after.is_some() && edit.external_id.is_some() {
            match info.identity {
                // The key names the document: the record index is enough.
                RecordIdentity::SharedKey => {
                    self.store
                        .stage_external_id(batch, &name, &collection, &key, id);
                }
                RecordIdentity::ToolIds | RecordIdentity::NaturalKey => {
                    self.store.stage_link(batch, &name, &collection, &key, id)?;
                }
            }
        }
        self.store
            .stage_shadow(batch, &name, &collection, &key, after.as_ref());
        let doc = self.store.doc(id)?;
        let was_empty = doc.is_empty();
        let change = match doc.edit(&collection, identity_key, &edit) {
            Ok(change) => change,
            Err(e) => {
                // The document holds something the edit cannot work with: set it
                // aside rather than stop capturing everything else.
                self.store.forget(id);
                self.quarantine(batch, id, &collection, None, e.to_string());
                return Ok(());
            }
        };
        if let Some(change) = change {
            self.store
                .stage_doc(batch, id, &collection, vec![change], None)?;
            self.stats.captured += 1;
            // The agent's other tools of this collection take the change too.
            self.set_pending_all(batch, &collection, id, Some(tool));
        }
        // The merged record may differ from what the tool holds (a concurrent remote
        // edit won, or the record is deleted): then the tool needs a write-back. A
        // document this capture created holds exactly the tool's record.
        if !was_empty && let Some(state) = self.read_or_quarantine(batch, id)? {
            let differs = needs_write(&info, &state, after.as_ref());
            self.set_pending(batch, tool, id, differs);
        }
        Ok(())
    }
}
