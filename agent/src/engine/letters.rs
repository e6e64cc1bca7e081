//! Dead letters: records a tool refused or the mapping could not convert, kept with
//! their reason and retried with exponential backoff, a bounded number of times.

use crdt_model::DocId;

use super::{Engine, Letter, ToolIx};
use crate::store::{Batch, DeadLetter, LetterReason, StoreError};

/// Automatic retries of a refused write-back before only a person retries it.
pub const DEAD_LETTER_RETRIES_MAX: u32 = 8;
/// The wait before the first retry; it doubles with each further one.
pub const DEAD_LETTER_RETRY_FIRST_MS: i64 = 1_000;
/// The longest wait between two retries.
pub const DEAD_LETTER_RETRY_MAX_MS: i64 = 5 * 60 * 1_000;

/// Why a person's action on a queue could not be done.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ActionError {
    /// Nothing of that name waits in the queue.
    #[error("not found: {0}")]
    NotFound(String),
    /// The action does not apply to it.
    #[error("{0}")]
    Refused(String),
}

impl Engine {
    /// Sets record `key` of `tool` aside as a dead letter with `reason`. A write-back
    /// of document `doc` refused by the tool or the mapping is retried after a wait
    /// that doubles each time, [`DEAD_LETTER_RETRIES_MAX`] times; a captured row
    /// (`doc` is `None`) is read again when the tool changes it.
    pub(super) fn dead_letter(
        &mut self,
        batch: &mut Batch,
        tool: ToolIx,
        collection: &str,
        key: &str,
        reason: LetterReason,
        doc: Option<DocId>,
    ) -> Result<(), StoreError> {
        let name = self.tools[tool].name.clone();
        let before = self.store.dead_letter(&name, collection, key)?;
        let attempts = before.as_ref().map_or(0, |l| l.attempts).saturating_add(1);
        let since_ms = before.map_or(self.now_ms, |l| l.since_ms);
        let retries = matches!(reason, LetterReason::Rejected(_) | LetterReason::Mapping(_));
        let retry_at_ms = (doc.is_some() && retries && attempts <= DEAD_LETTER_RETRIES_MAX)
            .then(|| self.now_ms.saturating_add(backoff(attempts)));
        tracing::warn!(tool = %name, %collection, %key, %reason, attempts, retry_in_ms = retry_at_ms.map(|at| at - self.now_ms), "record set aside as a dead letter");
        let letter = DeadLetter {
            tool: name.to_string(),
            collection: collection.to_owned(),
            key: key.to_owned(),
            reason,
            doc: doc.map(|d| d.0),
            attempts,
            retry_at_ms,
            since_ms,
        };
        self.store
            .stage_dead_letter(batch, &name, collection, key, Some(&letter));
        self.tools[tool]
            .lettered
            .insert((collection.to_owned(), key.to_owned()));
        if let Some(doc) = doc {
            let letter = Letter {
                collection: collection.to_owned(),
                key: key.to_owned(),
                retry_at_ms,
            };
            self.tools[tool].letters.insert(doc, letter);
        }
        self.stats.dead_letters += 1;
        self.tools[tool].counts.dead_lettered += 1;
        Ok(())
    }

    /// Document `id` was written to `tool`: its dead letter, if any, is cleared.
    pub(super) fn clear_letter(&mut self, batch: &mut Batch, tool: ToolIx, id: DocId) {
        if let Some(letter) = self.tools[tool].letters.remove(&id) {
            let name = self.tools[tool].name.clone();
            self.store
                .stage_dead_letter(batch, &name, &letter.collection, &letter.key, None);
            self.tools[tool]
                .lettered
                .remove(&(letter.collection, letter.key));
        }
    }

    /// Record `key` of `tool` was captured (or moved away from): a dead letter it
    /// has, if any, is cleared (the record is read afresh).
    pub(super) fn clear_row_letter(
        &mut self,
        batch: &mut Batch,
        tool: ToolIx,
        collection: &str,
        key: &str,
    ) {
        let state = &mut self.tools[tool];
        if state
            .lettered
            .remove(&(collection.to_owned(), key.to_owned()))
        {
            self.store
                .stage_dead_letter(batch, &state.name, collection, key, None);
        }
    }

    /// Marks the documents whose dead letters are due for a retry as pending; returns
    /// whether there were any.
    pub fn retry_due(&mut self, batch: &mut Batch) -> bool {
        let now = self.now_ms;
        let mut any = false;
        for tool in 0..self.tools.len() {
            let due: Vec<DocId> = self.tools[tool]
                .letters
                .iter()
                .filter(|(_, letter)| letter.retry_at_ms.is_some_and(|at| at <= now))
                .map(|(id, _)| *id)
                .collect();
            for id in due {
                if let Some(letter) = self.tools[tool].letters.get_mut(&id) {
                    letter.retry_at_ms = None;
                }
                self.set_pending(batch, tool, id, true);
                any = true;
            }
        }
        any
    }

    /// A person retries the dead letter of record `key` of the tool named `tool` now,
    /// with a fresh series of automatic retries.
    pub fn retry_letter(
        &mut self,
        batch: &mut Batch,
        tool: &str,
        collection: &str,
        key: &str,
    ) -> Result<Result<(), ActionError>, StoreError> {
        let Some((ix, letter)) = self.find_letter(tool, collection, key)? else {
            return Ok(Err(ActionError::NotFound(format!(
                "no dead letter for record {key:?} of {collection:?} in tool {tool:?}"
            ))));
        };
        let Some(doc) = letter.doc.map(DocId) else {
            return Ok(Err(ActionError::Refused(format!(
                "record {key:?} could not be read from tool {tool:?}: it is read again as soon \
                 as it changes there; fix it in the tool (or discard the letter)"
            ))));
        };
        let letter = DeadLetter {
            attempts: 0,
            retry_at_ms: Some(self.now_ms),
            ..letter
        };
        self.store
            .stage_dead_letter(batch, tool, collection, key, Some(&letter));
        let waiting = Letter {
            collection: collection.to_owned(),
            key: key.to_owned(),
            retry_at_ms: None,
        };
        self.tools[ix].letters.insert(doc, waiting);
        self.tools[ix].stale.remove(&doc);
        self.set_pending(batch, ix, doc, true);
        Ok(Ok(()))
    }

    /// A person discards the dead letter of record `key` of the tool named `tool`:
    /// the record is not retried until it changes again.
    pub fn discard_letter(
        &mut self,
        batch: &mut Batch,
        tool: &str,
        collection: &str,
        key: &str,
    ) -> Result<Result<(), ActionError>, StoreError> {
        let Some((ix, letter)) = self.find_letter(tool, collection, key)? else {
            return Ok(Err(ActionError::NotFound(format!(
                "no dead letter for record {key:?} of {collection:?} in tool {tool:?}"
            ))));
        };
        self.store
            .stage_dead_letter(batch, tool, collection, key, None);
        self.tools[ix]
            .lettered
            .remove(&(collection.to_owned(), key.to_owned()));
        if let Some(doc) = letter.doc {
            self.tools[ix].letters.remove(&DocId(doc));
        }
        Ok(Ok(()))
    }

    fn find_letter(
        &self,
        tool: &str,
        collection: &str,
        key: &str,
    ) -> Result<Option<(ToolIx, DeadLetter)>, StoreError> {
        let Some(ix) = self.tools.iter().position(|t| &*t.name == tool) else {
            return Ok(None);
        };
        Ok(self
            .store
            .dead_letter(tool, collection, key)?
            .map(|letter| (ix, letter)))
    }
}

/// The wait before retry number `attempt` (from 1).
fn backoff(attempt: u32) -> i64 {
    DEAD_LETTER_RETRY_FIRST_MS
        .saturating_mul(1 << attempt.saturating_sub(1).min(20))
        .min(DEAD_LETTER_RETRY_MAX_MS)
}
