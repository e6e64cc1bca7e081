//! Conflicts: which of a field's concurrent values wins, by the collection's policy.
//!
//! A field edited concurrently on two agents holds both values (Automerge keeps
//! them). The field's policy picks the winner from the values and where each came
//! from ([`Candidate`]), so every agent picks the same one whatever order the
//! changes arrived in. The winner is then written as a decision: one change that
//! supersedes the concurrent values, carrying the winner's own provenance and time,
//! so that a decision weighs exactly what the value it chose weighed. A value that
//! is already a decision is never decided again: agents whose decisions cross
//! settle by reading, and two agents with different policies never ping-pong.
//! Under `manual`, the latest edit stays in the tools and the conflict waits in a
//! queue until a person picks a value ([`Engine::resolve`]).

use std::collections::{BTreeMap, BTreeSet};

use crdt_model::{Candidate, Contested, Decision, DocId, Provenance, RecordState, Value};

use super::Engine;
use super::letters::ActionError;
use crate::config::DeletePolicy;
use crate::store::{Batch, ConflictValue, OpenConflict, StoreError};

/// How concurrent values of one field settle.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum FieldPolicy {
    /// The value with the latest edit time; ties broken by agent, tool and value.
    #[default]
    LatestEdit,
    /// The value from this tool (its name, or `<agent>.<name>`); the latest edit
    /// among the others when none came from it.
    SystemOfRecord(String),
    /// The latest edit until a person decides.
    Manual,
}

impl FieldPolicy {
    /// The policy's name in decisions and in the config.
    pub fn name(&self) -> &'static str {
        match self {
            FieldPolicy::LatestEdit => "latest_edit",
            FieldPolicy::SystemOfRecord(_) => "system_of_record",
            FieldPolicy::Manual => "manual",
        }
    }
}

/// What settles conflicts and deletes in one collection.
#[derive(Debug, Clone, Default)]
pub struct CollectionPolicy {
    /// The policy of fields without their own.
    pub conflicts: FieldPolicy,
    /// Fields with their own policy.
    pub fields: BTreeMap<String, FieldPolicy>,
    /// What settles a delete concurrent with an edit.
    pub deletes: DeletePolicy,
    /// Names of this agent's tools whose deletes wait for approval (`*`: all).
    pub hold_deletes: BTreeSet<String>,
}

impl CollectionPolicy {
    /// The policy of `field`.
    pub fn field(&self, field: &str) -> &FieldPolicy {
        self.fields.get(field).unwrap_or(&self.conflicts)
    }

    /// Whether deletes captured from the tool named `tool` are held.
    pub fn holds_deletes_of(&self, tool: &str) -> bool {
        self.hold_deletes.contains("*") || self.hold_deletes.contains(tool)
    }
}

/// The winner among `candidates` (at least one) under `policy`, and whether the
/// conflict stays open for a person.
pub fn settle(policy: &FieldPolicy, candidates: &[Candidate]) -> (usize, bool) {
    match policy {
        FieldPolicy::LatestEdit => (latest(candidates, |_| true), false),
        FieldPolicy::SystemOfRecord(tool) => {
            let from_it = |c: &Candidate| {
                c.provenance.tool == *tool
                    || format!("{}.{}", c.provenance.agent, c.provenance.tool) == *tool
            };
            if candidates.iter().any(from_it) {
                (latest(candidates, from_it), false)
            } else {
                (latest(candidates, |_| true), false)
            }
        }
        FieldPolicy::Manual => (latest(candidates, |_| true), true),
    }
}

/// The winner of a contested tombstone: the latest delete (`delete_wins`) or the
/// latest revival (`edit_wins`), else the latest of all.
pub fn settle_tombstone(policy: DeletePolicy, candidates: &[Candidate]) -> usize {
    let wanted = Value::Bool(policy == DeletePolicy::DeleteWins);
    if candidates.iter().any(|c| c.value == wanted) {
        latest(candidates, |c| c.value == wanted)
    } else {
        latest(candidates, |_| true)
    }
}

/// The index of the latest edit among the candidates `among` keeps: by edit time,
/// then agent, tool and value, so that every agent breaks a tie the same way.
fn latest(candidates: &[Candidate], among: impl Fn(&Candidate) -> bool) -> usize {
    let order = |c: &Candidate| {
        (
            c.time_ms,
            c.provenance.agent.clone(),
            c.provenance.tool.clone(),
            format!("{:?}", c.value),
        )
    };
    candidates
        .iter()
        .enumerate()
        .filter(|(_, c)| among(c))
        .max_by_key(|(_, c)| order(c))
        .map_or(0, |(i, _)| i)
}

impl Engine {
    /// The policy of `collection`.
    pub(super) fn policy(&self, collection: &str) -> &CollectionPolicy {
        static DEFAULT: std::sync::OnceLock<CollectionPolicy> = std::sync::OnceLock::new();
        self.policies
            .get(collection)
            .unwrap_or_else(|| DEFAULT.get_or_init(CollectionPolicy::default))
    }

    /// Settles what document `id` holds concurrently, after peers' changes arrived:
    /// writes a decision for each contested field whose winner is an edit, revives a
    /// record deleted concurrently with an edit under `edit_wins`, and queues the
    /// conflicts of `manual` fields (clearing those no longer open).
    pub(super) fn settle_doc(
        &mut self,
        batch: &mut Batch,
        id: DocId,
        collection: &str,
        now_ms: i64,
    ) -> Result<(), StoreError> {
        let policy = self.policy(collection).clone();
        let me = self.agent.clone();
        let doc = self.store.doc(id)?;
        let contested = doc.contested().unwrap_or_default();
        if contested.is_empty()
            && !(policy.deletes == DeletePolicy::EditWins && doc.is_deleted().unwrap_or(false))
            && !self.open_conflicts.contains_key(&id)
        {
            return Ok(());
        }
        let mut changes = Vec::new();
        let mut open = BTreeMap::new();
        for (key, candidates) in contested {
            let (winner, name) = match &key {
                Contested::Field(field) => {
                    let field_policy = policy.field(field);
                    let (winner, is_open) = settle(field_policy, &candidates);
                    if is_open {
                        open.insert(
                            field.clone(),
                            open_conflict(collection, id, field, &candidates, winner),
                        );
                        continue;
                    }
                    (winner, field_policy.name())
                }
                Contested::Tombstone => {
                    let name = match policy.deletes {
                        DeletePolicy::DeleteWins => "delete_wins",
                        DeletePolicy::EditWins => "edit_wins",
                    };
                    (settle_tombstone(policy.deletes, &candidates), name)
                }
            };
            let chosen = &candidates[winner];
            if chosen.provenance.decision.is_some() {
                continue;
            }
            // Every agent that sees this conflict chooses the same value: they all
            // write the same change, which counts once.
            let provenance = Provenance {
                decision: Some(Decision {
                    policy: name.to_owned(),
                    by: String::new(),
                }),
                ..chosen.provenance.clone()
            };
            if let Ok(Some(change)) =
                doc.decide_shared(&key, &chosen.value, &provenance, chosen.time_ms)
            {
                changes.push(change);
            }
        }
        if policy.deletes == DeletePolicy::EditWins
            && doc.is_deleted().unwrap_or(false)
            && doc.edited_concurrently_with_delete().unwrap_or(false)
        {
            let provenance = Provenance {
                agent: me.clone(),
                tool: String::new(),
                decision: Some(Decision {
                    policy: "edit_wins".to_owned(),
                    by: me,
                }),
            };
            if let Ok(Some(change)) = doc.decide(
                &Contested::Tombstone,
                &Value::Bool(false),
                &provenance,
                now_ms,
            ) {
                changes.push(change);
            }
        }
        if !changes.is_empty() {
            self.stats.decided += changes.len() as u64;
            self.store.stage_doc(batch, id, collection, changes, None)?;
            self.set_pending_all(batch, collection, id, None);
        }
        self.queue_conflicts(batch, id, open);
        Ok(())
    }

    /// Records the open conflicts of document `id` (clearing those that closed).
    fn queue_conflicts(
        &mut self,
        batch: &mut Batch,
        id: DocId,
        open: BTreeMap<String, OpenConflict>,
    ) {
        let before = self.open_conflicts.remove(&id).unwrap_or_default();
        for field in before.iter().filter(|f| !open.contains_key(*f)) {
            self.store.stage_conflict(batch, id, field, None);
        }
        for (field, conflict) in &open {
            if !before.contains(field) {
                tracing::warn!(collection = %conflict.collection, doc = %id, %field, "conflict waits for a person");
            }
            self.store.stage_conflict(batch, id, field, Some(conflict));
        }
        if !open.is_empty() {
            self.open_conflicts.insert(id, open.into_keys().collect());
        }
    }

    /// Document `id` as every agent reads it: the merged record with each contested
    /// field set to its policy's winner. `None` if it cannot be read.
    pub fn record(&mut self, id: DocId) -> Result<Option<RecordState>, StoreError> {
        match self.store.doc(id)?.read() {
            Ok(state) => self.settled(id, state).map(Some),
            Err(_) => Ok(None),
        }
    }

    /// The merged record with each contested field (and the tombstone) set to its
    /// policy's winner, as every agent reads it.
    pub(super) fn settled(
        &mut self,
        id: DocId,
        mut state: RecordState,
    ) -> Result<RecordState, StoreError> {
        if !state.contested {
            return Ok(state);
        }
        let policy = self.policy(&state.collection).clone();
        let contested = self.store.doc(id)?.contested().unwrap_or_default();
        for (key, candidates) in contested {
            match key {
                Contested::Field(field) => {
                    let (winner, _) = settle(policy.field(&field), &candidates);
                    state.fields.insert(field, candidates[winner].value.clone());
                }
                Contested::Tombstone => {
                    let winner = settle_tombstone(policy.deletes, &candidates);
                    state.deleted = candidates[winner].value == Value::Bool(true);
                }
            }
        }
        Ok(state)
    }

    /// A person settles the open conflict of `field` in document `id` on `value`: a
    /// decision that every agent and tool takes.
    pub fn resolve(
        &mut self,
        batch: &mut Batch,
        id: DocId,
        field: &str,
        value: &Value,
    ) -> Result<Result<(), ActionError>, StoreError> {
        if !self
            .open_conflicts
            .get(&id)
            .is_some_and(|f| f.contains(field))
        {
            return Ok(Err(ActionError::NotFound(format!(
                "no open conflict of field {field:?} in record {id}"
            ))));
        }
        let now_ms = self.now_ms;
        let me = self.agent.clone();
        let doc = self.store.doc(id)?;
        let Ok(Some((collection, _))) = doc.identity() else {
            return Ok(Err(ActionError::NotFound(format!(
                "record {id} cannot be read"
            ))));
        };
        let provenance = Provenance {
            agent: me.clone(),
            tool: String::new(),
            decision: Some(Decision {
                policy: "manual".to_owned(),
                by: me,
            }),
        };
        let key = Contested::Field(field.to_owned());
        if let Ok(Some(change)) = doc.decide(&key, value, &provenance, now_ms) {
            self.store
                .stage_doc(batch, id, &collection, vec![change], None)?;
            self.set_pending_all(batch, &collection, id, None);
        }
        self.settle_doc(batch, id, &collection, now_ms)?;
        Ok(Ok(()))
    }
}

fn open_conflict(
    collection: &str,
    id: DocId,
    field: &str,
    candidates: &[Candidate],
    interim: usize,
) -> OpenConflict {
    OpenConflict {
        collection: collection.to_owned(),
        doc: id.0,
        field: field.to_owned(),
        candidates: candidates
            .iter()
            .map(|c| ConflictValue {
                value: c.value.clone(),
                agent: c.provenance.agent.clone(),
                tool: c.provenance.tool.clone(),
                time_ms: c.time_ms,
            })
            .collect(),
        interim,
    }
}
