//! Held deletes: a delete captured from a tool whose deletes are held waits for a
//! person. Until then the record stays alive everywhere else, and nothing is written
//! to that tool for it. Approved, the delete goes out like any other; rejected, the
//! record is written back into the tool that deleted it.

use crdt_model::{DocId, Edit};

use super::letters::ActionError;
use super::{Engine, ToolIx, tombstoned};
use crate::store::{Batch, HeldDelete, StoreError};

impl Engine {
    /// Holds `tool`'s delete of record `key` (document `id`) if the collection holds
    /// that tool's deletes and the record is alive; returns whether it did.
    pub(super) fn hold_delete(
        &mut self,
        batch: &mut Batch,
        tool: ToolIx,
        collection: &str,
        key: &str,
        id: DocId,
    ) -> Result<bool, StoreError> {
        let name = self.tools[tool].name.clone();
        if !self.policy(collection).holds_deletes_of(&name) || tombstoned(self.store.doc(id)?) {
            return Ok(false);
        }
        tracing::info!(tool = %name, %collection, %key, "delete held for approval");
        let held = HeldDelete {
            tool: name.to_string(),
            collection: collection.to_owned(),
            key: key.to_owned(),
            doc: id.0,
            time_ms: self.now_ms,
        };
        self.store
            .stage_held(batch, &name, collection, key, Some(&held));
        self.store.stage_shadow(batch, &name, collection, key, None);
        self.tools[tool].held.insert(id, key.to_owned());
        self.set_pending(batch, tool, id, false);
        Ok(true)
    }

    /// The tool created record `key` (document `id`) again: a delete of it that
    /// waited for approval is void.
    pub(super) fn unhold(
        &mut self,
        batch: &mut Batch,
        tool: ToolIx,
        collection: &str,
        key: &str,
        id: DocId,
    ) {
        if self.tools[tool].held.get(&id).is_some_and(|k| k == key) {
            self.tools[tool].held.remove(&id);
            let name = self.tools[tool].name.clone();
            self.store.stage_held(batch, &name, collection, key, None);
        }
    }

    /// A person approves the held delete of record `key` of the tool named `tool`:
    /// the record is deleted, everywhere.
    pub fn approve_delete(
        &mut self,
        batch: &mut Batch,
        tool: &str,
        collection: &str,
        key: &str,
    ) -> Result<Result<(), ActionError>, StoreError> {
        let Some((ix, held)) = self.find_held(tool, collection, key)? else {
            return Ok(Err(not_held(tool, collection, key)));
        };
        let id = DocId(held.doc);
        let edit = Edit {
            deleted: Some(true),
            time_ms: held.time_ms,
            provenance: Some(self.tools[ix].provenance.clone()),
            ..Edit::default()
        };
        if let Ok(Some(change)) = self.store.doc(id)?.edit(collection, "", &edit) {
            self.store
                .stage_doc(batch, id, collection, vec![change], None)?;
            self.stats.captured += 1;
            self.tools[ix].counts.captured += 1;
            self.set_pending_all(batch, collection, id, Some(ix));
        }
        self.store.stage_held(batch, tool, collection, key, None);
        self.tools[ix].held.remove(&id);
        Ok(Ok(()))
    }

    /// A person rejects the held delete of record `key` of the tool named `tool`:
    /// the record is written back into that tool.
    pub fn reject_delete(
        &mut self,
        batch: &mut Batch,
        tool: &str,
        collection: &str,
        key: &str,
    ) -> Result<Result<(), ActionError>, StoreError> {
        let Some((ix, held)) = self.find_held(tool, collection, key)? else {
            return Ok(Err(not_held(tool, collection, key)));
        };
        let id = DocId(held.doc);
        self.store.stage_held(batch, tool, collection, key, None);
        self.tools[ix].held.remove(&id);
        self.set_pending(batch, ix, id, true);
        Ok(Ok(()))
    }

    fn find_held(
        &self,
        tool: &str,
        collection: &str,
        key: &str,
    ) -> Result<Option<(ToolIx, HeldDelete)>, StoreError> {
        let Some(ix) = self.tools.iter().position(|t| &*t.name == tool) else {
            return Ok(None);
        };
        Ok(self.store.held(tool, collection, key)?.map(|h| (ix, h)))
    }
}

fn not_held(tool: &str, collection: &str, key: &str) -> ActionError {
    ActionError::NotFound(format!(
        "no held delete of record {key:?} of {collection:?} in tool {tool:?}"
    ))
}
