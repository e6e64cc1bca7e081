//! Natural keys: which document a tool's new record belongs to, and whose values win
//! when it joins a record other tools already hold.

use std::collections::HashMap;

use connectors::{CapturedChange, RowState};
use crdt_model::{DocId, Record, Value};

use super::capture::Row;
use super::{CollectionInfo, Engine, ToolIx, tombstoned};
use crate::config::MatchWins;
use crate::mapping::NaturalKey;
use crate::store::{Ambiguous, Batch, StoreError};

/// Per (collection, natural key), the keys of the captured batch's new records that
/// share it: they are matched to no existing record.
pub(super) type SharedKeys = HashMap<(String, String), Vec<String>>;

/// Where a tool's new record goes.
#[derive(Debug, Clone, Copy)]
pub(super) struct Placement {
    /// Its document.
    pub(super) id: DocId,
    /// The document already held a record (other tools'): the new record joins it,
    /// and the collection's `on_match` says whose values win.
    pub(super) joins: bool,
}

impl Engine {
    /// The natural keys that several new (unlinked) records of `changes` share.
    pub(super) fn shared_natural_keys(
        &self,
        tool: ToolIx,
        changes: &[CapturedChange],
    ) -> Result<SharedKeys, StoreError> {
        let state = &self.tools[tool];
        let mut seen: SharedKeys = HashMap::new();
        for change in changes {
            let Some(info) = state.collections.get(&change.collection) else {
                continue;
            };
            let (Some(natural), RowState::Present(row)) = (&info.natural_key, &change.state) else {
                continue;
            };
            if self
                .store
                .linked_doc(&state.name, &change.collection, &change.key)?
                .is_some()
            {
                continue;
            }
            if let Some(key) = natural_key_of(info, natural, row) {
                seen.entry((change.collection.clone(), key))
                    .or_default()
                    .push(change.key.clone());
            }
        }
        seen.retain(|_, keys| keys.len() > 1);
        Ok(seen)
    }

    /// The document of `tool`'s new record `key` with fields `row`, in a collection
    /// with a natural key: the document of records with its natural key, unless
    /// another record of this tool has that key too (then the record is reported and
    /// gets a document of its own), the record under that key was deleted (a record
    /// created again starts clean), or the record there now has another key (its key
    /// field was edited).
    #[expect(
        clippy::too_many_arguments,
        reason = "one call site, each argument distinct"
    )]
    pub(super) fn natural_doc(
        &mut self,
        batch: &mut Batch,
        tool: ToolIx,
        info: &CollectionInfo,
        natural: &NaturalKey,
        captured: &Row<'_>,
        row: &Record,
        shared: &SharedKeys,
    ) -> Result<Placement, StoreError> {
        let (collection, key) = (captured.collection, captured.key);
        let (name, uid) = (self.tools[tool].name.clone(), self.tools[tool].uid.clone());
        let own = |engine: &Engine, previous| Placement {
            id: DocId::minted(&engine.store.actor(), &uid, collection, key, previous),
            joins: false,
        };
        let Some(natural_key) = natural_key_of(info, natural, row) else {
            return Ok(own(self, None));
        };
        if let Some(keys) = shared.get(&(collection.to_owned(), natural_key.clone())) {
            let others = keys.iter().filter(|k| *k != key).cloned().collect();
            self.report_ambiguous(batch, &name, collection, key, natural_key, others);
            return Ok(own(self, None));
        }
        let id = DocId::natural(collection, &natural_key);
        if self.store.doc(id)?.is_empty() {
            return Ok(Placement { id, joins: false });
        }
        if tombstoned(self.store.doc(id)?) {
            return Ok(own(self, Some(id)));
        }
        let holds_key = match self.store.doc(id)?.read() {
            Ok(state) => natural.of(&state.fields).as_deref() == Some(natural_key.as_str()),
            Err(_) => false,
        };
        if !holds_key {
            return Ok(own(self, None));
        }
        if let Some(other) = self.store.linked_key(&name, id)?
            && other != key
        {
            self.report_ambiguous(batch, &name, collection, key, natural_key, vec![other]);
            return Ok(own(self, None));
        }
        Ok(Placement { id, joins: true })
    }

    /// The fields of a tool's record joining document `id` that the collection's
    /// `on_match` lets through: all of them (`tool`), those the document lacks
    /// (`others`), or those the tool changed after the document's value was written
    /// (`newest`, at `row_ms`).
    pub(super) fn joining_fields(
        &mut self,
        id: DocId,
        on_match: MatchWins,
        fields: Record,
        row_ms: i64,
    ) -> Result<Record, StoreError> {
        let doc = self.store.doc(id)?;
        let keep: Box<dyn Fn(&str) -> bool> = match on_match {
            MatchWins::Tool => return Ok(fields),
            MatchWins::Others => {
                let held = doc.read().map(|s| s.fields).unwrap_or_default();
                Box::new(move |field| held.get(field).is_none_or(|v| *v == Value::Null))
            }
            MatchWins::Newest => {
                let times = doc.field_times().unwrap_or_default();
                Box::new(move |field| times.get(field).is_none_or(|t| *t < row_ms))
            }
        };
        Ok(fields.into_iter().filter(|(f, _)| keep(f)).collect())
    }

    fn report_ambiguous(
        &mut self,
        batch: &mut Batch,
        tool: &str,
        collection: &str,
        key: &str,
        natural_key: String,
        others: Vec<String>,
    ) {
        tracing::warn!(%tool, %collection, %key, natural_key = %natural_key.replace('\u{1f}', " | "), others = ?others, "natural key is not unique in the tool: the record syncs unmatched until resolved");
        let ambiguous = Ambiguous {
            tool: tool.to_owned(),
            collection: collection.to_owned(),
            key: key.to_owned(),
            natural_key,
            others,
        };
        self.store.stage_ambiguous(batch, &ambiguous);
        self.stats.ambiguous += 1;
    }
}

/// The natural key of a tool's row, read through the tool's mapping.
fn natural_key_of(info: &CollectionInfo, natural: &NaturalKey, row: &Record) -> Option<String> {
    let fields = info.mapping.read(row, None).ok()?;
    natural.of(&fields)
}
