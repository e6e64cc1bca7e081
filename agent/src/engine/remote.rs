//! Peers' changes: applying their log entries and repairs, and answering theirs.

use crdt_model::{ChangeHash, DocId};

use super::Engine;
use crate::store::{Batch, StoreError, StoreId, peer_cursor};

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

/// A peer sent something that cannot be right; its session is closed. Nothing of
/// the bad entry is kept.
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
    /// The changes put a value Concord cannot read into the document (a counter, an
    /// unknown scalar kind, untagged bytes); the document is quarantined.
    #[error("document {doc}: {reason}")]
    UnreadableValue {
        /// The document named by the entry.
        doc: DocId,
        /// What could not be read.
        reason: String,
    },
    /// The store failed (fatal).
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl Engine {
    /// Stages entries of `origin`'s log of `collection` and, when every seq up to
    /// `upto` was seen, the new cursor into that log (repairs come without one).
    ///
    /// A bad entry stops the apply: what it did to its document is undone, a document
    /// it made unreadable is quarantined with the reason, and the error closes the
    /// peer's session. Entries before it stay staged; the cursor does not move.
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
            match self.apply_entry(batch, origin, collection, id, &entry.changes) {
                Ok(true) => outcome.missing.push(id),
                Ok(false) => {}
                Err(e) => {
                    // Drop whatever the bad entry did to the cached document.
                    self.store.forget(id);
                    if let RemoteError::UnreadableValue { reason, .. } = &e {
                        self.quarantine(batch, id, collection, Some(origin), reason.clone());
                    }
                    return Err(e);
                }
            }
        }
        if let Some(upto) = upto {
            let cursor = peer_cursor(&origin, collection);
            if upto + 1 > self.store.cursor(&cursor)? {
                self.store.stage_cursor(batch, &cursor, upto + 1);
            }
        }
        Ok(outcome)
    }

    /// Applies one entry; returns whether the document waits for missing changes.
    fn apply_entry(
        &mut self,
        batch: &mut Batch,
        origin: StoreId,
        collection: &str,
        id: DocId,
        changes: &[Vec<u8>],
    ) -> Result<bool, RemoteError> {
        let bad = |e: crdt_model::ModelError| RemoteError::BadChange {
            doc: id,
            reason: e.to_string(),
        };
        let doc = self.store.doc(id)?;
        let applied = doc.apply(changes).map_err(bad)?;
        if applied.new_changes.is_empty() {
            return Ok(applied.missing_deps);
        }
        let (found, key) = doc.identity().map_err(bad)?.unwrap_or_default();
        // A shared key names its document; a document minted for tool ids has no key.
        if found != collection || (!key.is_empty() && DocId::of(&found, &key) != id) {
            return Err(RemoteError::WrongIdentity {
                doc: id,
                collection: found,
                key,
            });
        }
        // Every value must be readable, or planning and projecting the document
        // would fail on every start: refuse the change now.
        if let Err(e) = doc.check_readable() {
            return Err(RemoteError::UnreadableValue {
                doc: id,
                reason: e.to_string(),
            });
        }
        // Entries learned from a peer are not sent back to it, unless the apply also
        // released changes that came earlier from elsewhere (they waited for a
        // dependency): that peer may lack those.
        let origin = (!applied.released_earlier).then_some(origin);
        self.store
            .stage_doc(batch, id, collection, applied.new_changes, origin)?;
        self.set_pending_all(batch, collection, id, None);
        self.stats.applied += 1;
        self.settle_doc(batch, id, collection, self.now_ms)?;
        // Its write-back is planned later, maybe after the cache evicted the
        // document: keep what it reads as (readable: checked above). An agent with
        // no tool of the collection writes nothing back.
        if self
            .collections
            .get(collection)
            .is_some_and(|t| !t.is_empty())
            && let Ok(state) = self.store.doc(id)?.read()
        {
            self.store.remember_read(id, state);
        }
        Ok(applied.missing_deps)
    }

    /// All changes of document `id` in `collection` that a peer with `heads` lacks
    /// (heads unknown here are ignored). `None` if this store holds no such document
    /// in that collection.
    pub fn changes_since(
        &mut self,
        collection: &str,
        id: DocId,
        heads: &[ChangeHash],
    ) -> Result<Option<DocChanges>, StoreError> {
        if !self.store.has_doc(id)? {
            return Ok(None);
        }
        let doc = self.store.doc(id)?;
        let Ok(Some((found, _))) = doc.identity() else {
            return Ok(None);
        };
        if found != collection {
            return Ok(None);
        }
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
            collection: found,
            changes,
        }))
    }

    /// The heads of document `id` (empty if unknown).
    pub fn heads(&mut self, id: DocId) -> Result<Vec<ChangeHash>, StoreError> {
        if !self.store.has_doc(id)? {
            return Ok(Vec::new());
        }
        Ok(self.store.doc(id)?.heads())
    }
}
