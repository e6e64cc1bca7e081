//! Capture: the local tool's changed rows become changes of their documents.

use connectors::{CaptureBatch, CapturedChange, RowState};
use crdt_model::{DocId, Edit, Record, Value};

use super::matching::{Placement, SharedKeys};
use super::{CollectionInfo, Engine, RecordIdentity, ToolIx, needs_write, tombstoned};
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
        if let Some(ix) = self.tools.iter().position(|t| &*t.name == tool) {
            self.clear_row_letter(batch, ix, collection, from);
        }
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
        let name = self.tools[tool].name.clone();
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
        let row = Row {
            collection: &collection,
            key: &key,
            shadow: shadow.as_ref(),
            rescan,
        };
        let present = match &state {
            RowState::Present(fields) => Some(fields),
            _ => None,
        };
        let placement = self.place(batch, tool, &info, &row, present, shared)?;
        let Some(captured) =
            self.captured_edit(batch, tool, &info, &row, state, placement, now_ms)?
        else {
            return Ok(());
        };
        self.stage_captured(batch, tool, &info, &row, placement.id, captured)
    }

    /// The document of a captured row: derived from its key (shared key), the one
    /// it is linked to, or, for a row not linked yet, the one of its natural key or a
    /// newly minted one. A row created where its linked record is deleted is a new
    /// record (the tool reused the key): a new document, never the dead one.
    fn place(
        &mut self,
        batch: &mut Batch,
        tool: ToolIx,
        info: &CollectionInfo,
        row: &Row<'_>,
        present: Option<&Record>,
        shared: &SharedKeys,
    ) -> Result<Placement, StoreError> {
        let (name, uid) = (self.tools[tool].name.clone(), self.tools[tool].uid.clone());
        let (collection, key) = (row.collection, row.key);
        if info.identity == RecordIdentity::SharedKey {
            let id = DocId::of(collection, key);
            return Ok(Placement { id, joins: false });
        }
        let minted = |engine: &Engine, previous| {
            DocId::minted(&engine.store.actor(), &uid, collection, key, previous)
        };
        let id = match self.store.linked_doc(&name, collection, key)? {
            Some(old)
                if present.is_some()
                    && row.shadow.is_none()
                    && !row.rescan
                    && tombstoned(self.store.doc(old)?) =>
            {
                self.store.stage_unlink_doc(batch, &name, old);
                minted(self, Some(old))
            }
            Some(linked) => linked,
            None => match (present, &info.natural_key) {
                (Some(fields), Some(natural)) => {
                    return self.natural_doc(batch, tool, info, natural, row, fields, shared);
                }
                (Some(_), None) => minted(self, None),
                // A record never linked that is gone or unreadable: nothing to record
                // in a document (an invalid row still becomes a dead letter).
                (None, _) => DocId([0; 16]),
            },
        };
        Ok(Placement { id, joins: false })
    }

    /// The edit a captured row makes to its document, with what the tool holds
    /// after it (`None`: nothing); `None` when the row changes no document (gone and
    /// never held, invalid, or not convertible: the last two become dead letters).
    ///
    /// A new row's empty columns are not written: two sites creating the same record
    /// offline then merge what each knew instead of one site's nulls hiding the
    /// other's values. A row the tool created revives its record, and a reset removes
    /// every other field; a row found by a rescan does not overrule a delete made
    /// elsewhere.
    #[expect(
        clippy::too_many_arguments,
        reason = "one call site, each argument distinct"
    )]
    fn captured_edit(
        &mut self,
        batch: &mut Batch,
        tool: ToolIx,
        info: &CollectionInfo,
        row: &Row<'_>,
        state: RowState,
        placement: Placement,
        now_ms: i64,
    ) -> Result<Option<(Edit, Option<Record>)>, StoreError> {
        let uid = self.tools[tool].uid.clone();
        let record = match state {
            RowState::Invalid(invalid) => {
                let reason = LetterReason::InvalidRow(invalid);
                self.dead_letter(batch, tool, row.collection, row.key, reason, None)?;
                return Ok(None);
            }
            RowState::Absent if row.shadow.is_none() => return Ok(None),
            RowState::Absent => {
                if self.hold_delete(batch, tool, row.collection, row.key, placement.id)? {
                    return Ok(None);
                }
                let edit = Edit {
                    deleted: Some(true),
                    time_ms: now_ms,
                    provenance: Some(self.tools[tool].provenance.clone()),
                    ..Edit::default()
                };
                return Ok(Some((edit, None)));
            }
            RowState::Present(record) => record,
        };
        let created = row.shadow.is_none();
        if created {
            self.unhold(batch, tool, row.collection, row.key, placement.id);
        }
        let revive = created && !row.rescan;
        let reset = revive
            && info.identity == RecordIdentity::SharedKey
            && tombstoned(self.store.doc(placement.id)?);
        let row_ms = info.mapping.changed_at_ms(&record).unwrap_or(now_ms);
        let fields = match info.mapping.read(&record, row.shadow) {
            Ok(fields) if placement.joins => {
                let on_match = info.mapping.on_match();
                self.joining_fields(placement.id, on_match, fields, row_ms)?
            }
            Ok(fields) => self.rebase_maps(info, placement.id, row.shadow, fields)?,
            Err(e) => {
                // The shadow stays as it was, so the row is read again once it
                // changes.
                let reason = LetterReason::Mapping(e);
                self.dead_letter(batch, tool, row.collection, row.key, reason, None)?;
                return Ok(None);
            }
        };
        let edit = Edit {
            fields,
            external_id: created.then(|| (uid.to_string(), row.key.to_owned())),
            deleted: revive.then_some(false),
            reset,
            time_ms: row_ms,
            provenance: Some(self.tools[tool].provenance.clone()),
        };
        Ok(Some((edit, Some(record))))
    }

    /// A captured map field (a calendar's overrides, attendees) as an edit of the
    /// document's map: only the entries the tool changed since its shadow, so that
    /// entries the document gained meanwhile (a remote edit not yet written back)
    /// are kept rather than removed for the tool's not having them yet.
    fn rebase_maps(
        &mut self,
        info: &CollectionInfo,
        id: DocId,
        shadow: Option<&Record>,
        mut fields: Record,
    ) -> Result<Record, StoreError> {
        let Some(shadow) = shadow else {
            return Ok(fields);
        };
        if !fields.values().any(|v| matches!(v, Value::Map(_))) {
            return Ok(fields);
        }
        let Ok(old) = info.mapping.read(shadow, None) else {
            return Ok(fields);
        };
        let doc = self.store.doc(id)?;
        if doc.is_empty() {
            return Ok(fields);
        }
        let Ok(current) = doc.read() else {
            return Ok(fields);
        };
        for (name, new) in fields.iter_mut() {
            if let (Some(old), Some(current)) = (old.get(name), current.fields.get(name)) {
                *new = rebase(current, old, new);
            }
        }
        Ok(fields)
    }

    /// Stages a captured row's edit of document `id`: its link, shadow and change,
    /// and the write-backs it makes due.
    fn stage_captured(
        &mut self,
        batch: &mut Batch,
        tool: ToolIx,
        info: &CollectionInfo,
        row: &Row<'_>,
        id: DocId,
        (edit, after): (Edit, Option<Record>),
    ) -> Result<(), StoreError> {
        let name = self.tools[tool].name.clone();
        let (collection, key) = (row.collection, row.key);
        self.clear_row_letter(batch, tool, collection, key);
        // A shared key names its document itself: no link to keep.
        if after.is_some()
            && edit.external_id.is_some()
            && info.identity != RecordIdentity::SharedKey
        {
            self.store.stage_link(batch, &name, collection, key, id)?;
        }
        self.store
            .stage_shadow(batch, &name, collection, key, after.as_ref());
        let identity_key = match info.identity {
            RecordIdentity::SharedKey => key,
            RecordIdentity::ToolIds | RecordIdentity::NaturalKey => "",
        };
        let doc = self.store.doc(id)?;
        let was_empty = doc.is_empty();
        let change = match doc.edit(collection, identity_key, &edit) {
            Ok(change) => change,
            Err(e) => {
                // The document holds something the edit cannot work with: set it
                // aside rather than stop capturing everything else.
                self.store.forget(id);
                self.quarantine(batch, id, collection, None, e.to_string());
                return Ok(());
            }
        };
        if let Some(change) = change {
            self.store
                .stage_doc(batch, id, collection, vec![change], None)?;
            self.stats.captured += 1;
            self.tools[tool].counts.captured += 1;
            // The agent's other tools of this collection take the change too.
            self.set_pending_all(batch, collection, id, Some(tool));
        }
        // The merged record may differ from what the tool holds (a concurrent remote
        // edit won, or the record is deleted): then the tool needs a write-back. A
        // document this capture created holds exactly the tool's record.
        if !was_empty && let Some(state) = self.read_or_quarantine(batch, id)? {
            let differs = needs_write(info, &state, after.as_ref());
            self.set_pending(batch, tool, id, differs);
        }
        if self.open_conflicts.contains_key(&id) {
            self.settle_doc(batch, id, collection, self.now_ms)?;
        }
        Ok(())
    }
}

/// `new` (the tool's value) applied to `current` (the document's) as the change
/// from `old` (the tool's value before): for maps, entry by entry and recursively;
/// for anything else, `new`.
fn rebase(current: &Value, old: &Value, new: &Value) -> Value {
    let (Value::Map(current), Value::Map(old), Value::Map(new)) = (current, old, new) else {
        return new.clone();
    };
    let mut merged = current.clone();
    for (key, value) in new {
        match (old.get(key), current.get(key)) {
            (Some(before), _) if before == value => {}
            (Some(before), Some(now)) => {
                merged.insert(key.clone(), rebase(now, before, value));
            }
            _ => {
                merged.insert(key.clone(), value.clone());
            }
        }
    }
    for key in old.keys() {
        if !new.contains_key(key) {
            merged.remove(key);
        }
    }
    Value::Map(merged)
}

/// A captured row, as the steps of capturing it see it.
pub(super) struct Row<'a> {
    pub(super) collection: &'a str,
    pub(super) key: &'a str,
    /// What the tool was known to hold under the key.
    pub(super) shadow: Option<&'a Record>,
    /// The row was found by a rescan.
    pub(super) rescan: bool,
}
