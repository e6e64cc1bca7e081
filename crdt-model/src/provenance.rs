//! Where each value of a record came from, read back from the document's history.
//!
//! Every change Concord makes carries a [`Provenance`] in its message (the agent and
//! tool of the edit, and for a policy's decision, the policy and the deciding
//! agent); the change's time is the edit's time. Automerge keeps every change, so
//! the values a field held, and the concurrent values it holds now, can be told
//! apart by where they came from.

use std::collections::{HashMap, HashSet};

use automerge::transaction::Transactable;
use automerge::{ActorId, ChangeHash, ObjId, ObjType, ReadDoc};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::document::{
    KEY_DELETED, ModelError, PREFIX_FIELD, RecordDoc, fill_object, scalar_of, to_value,
};
use crate::value::Value;

/// Where a change came from. The edit's time is the change's time.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Provenance {
    /// The agent that captured the edit (the first characters of its peer id); for
    /// a policy's decision, the agent of the value it chose.
    #[serde(rename = "a", default, skip_serializing_if = "String::is_empty")]
    pub agent: String,
    /// The tool the edit came from, by its name in that agent; empty for a value a
    /// person typed.
    #[serde(rename = "t", default, skip_serializing_if = "String::is_empty")]
    pub tool: String,
    /// Set when a conflict policy (or a person) chose this value among concurrent ones.
    #[serde(rename = "d", default, skip_serializing_if = "Option::is_none")]
    pub decision: Option<Decision>,
}

/// A policy's decision between concurrent values.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Decision {
    /// The policy that decided (`latest_edit`, `system_of_record`, `manual`,
    /// `delete_wins`, `edit_wins`).
    #[serde(rename = "p")]
    pub policy: String,
    /// The agent that wrote the decision; empty for a policy's decision, which
    /// every agent writes alike ([`RecordDoc::decide_shared`]).
    #[serde(rename = "by", default, skip_serializing_if = "String::is_empty")]
    pub by: String,
}

impl Provenance {
    /// The change message recording this provenance: `<agent>.<tool>` for an edit
    /// (a dozen bytes on every change, so it is kept short), JSON for a decision.
    pub fn encode(&self) -> String {
        match &self.decision {
            None => format!("{}.{}", self.agent, self.tool),
            Some(_) => serde_json::to_string(self).unwrap_or_default(),
        }
    }

    /// The provenance a change message records; empty for a change without one
    /// (made before provenance was recorded, or by a foreign writer).
    pub fn decode(message: Option<&str>) -> Provenance {
        match message {
            Some(json) if json.starts_with('{') => serde_json::from_str(json).unwrap_or_default(),
            Some(short) => {
                let (agent, tool) = short.split_once('.').unwrap_or((short, ""));
                Provenance {
                    agent: agent.to_owned(),
                    tool: tool.to_owned(),
                    decision: None,
                }
            }
            None => Provenance::default(),
        }
    }
}

/// A part of a record that can hold concurrent values.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Contested {
    /// A field.
    Field(String),
    /// The tombstone: deleted (`true`) or alive (`false`).
    Tombstone,
}

impl Contested {
    fn prop(&self) -> String {
        match self {
            Contested::Field(field) => format!("{PREFIX_FIELD}{field}"),
            Contested::Tombstone => KEY_DELETED.to_owned(),
        }
    }

    fn of_prop(prop: &str) -> Option<Contested> {
        if prop == KEY_DELETED {
            Some(Contested::Tombstone)
        } else {
            prop.strip_prefix(PREFIX_FIELD)
                .map(|field| Contested::Field(field.to_owned()))
        }
    }
}

impl std::fmt::Display for Contested {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Contested::Field(field) => f.write_str(field),
            Contested::Tombstone => f.write_str("(deleted)"),
        }
    }
}

/// One of the concurrent values of a contested field, with where it came from.
#[derive(Debug, Clone, PartialEq)]
pub struct Candidate {
    /// The value.
    pub value: Value,
    /// Where it came from.
    pub provenance: Provenance,
    /// When it was written (milliseconds since the Unix epoch).
    pub time_ms: i64,
    /// The store (Automerge actor) that wrote it, in hex.
    pub actor: String,
}

/// One value a field (or the tombstone) was given, as the history tells it.
#[derive(Debug, Clone, PartialEq)]
pub struct HistoryEntry {
    /// The field.
    pub key: Contested,
    /// The value written; `None` when the field was removed.
    pub value: Option<Value>,
    /// Where it came from.
    pub provenance: Provenance,
    /// When (milliseconds since the Unix epoch).
    pub time_ms: i64,
    /// The store (Automerge actor) that wrote it, in hex.
    pub actor: String,
    /// The change that wrote it, in hex.
    pub change: String,
    /// Whether the record holds this value now (with others, if contested).
    pub current: bool,
}

/// Hashed before a document's heads into the actor of a shared decision.
const DECISION_ACTOR_DOMAIN: &[u8] = b"concord decision actor";

/// An op of a document: (counter, actor bytes).
type OpKey = (u64, Vec<u8>);

impl RecordDoc {
    /// The fields (and the tombstone) that hold concurrent values that differ, with
    /// every value and where it came from. Cheap when nothing is contested.
    pub fn contested(&mut self) -> Result<Vec<(Contested, Vec<Candidate>)>, ModelError> {
        if self.held_changes().is_some() {
            // Changes in one line hold no concurrent values.
            return Ok(Vec::new());
        }
        let conflicted: Vec<String> = self
            .doc
            .map_range(ObjId::Root, ..)
            .filter(|item| item.conflict)
            .map(|item| item.key.to_string())
            .collect();
        let mut contested = Vec::new();
        for prop in conflicted {
            let Some(key) = Contested::of_prop(&prop) else {
                continue;
            };
            let mut values = Vec::new();
            for (value, id) in self.doc.get_all(ObjId::Root, prop.as_str())? {
                if let ObjId::Id(_, actor, _) = &id {
                    let read = to_value(&self.doc, &value, &id, &prop)?;
                    values.push((read, id.clone(), actor.to_bytes().to_vec()));
                }
            }
            let first = values.first().map(|(v, _, _)| v.clone());
            if values.iter().all(|(v, _, _)| Some(v) == first.as_ref()) {
                continue;
            }
            let candidates = values
                .into_iter()
                .map(|(value, id, actor)| {
                    let (provenance, time_ms) = self.source(&id).unwrap_or_default();
                    Candidate {
                        value,
                        provenance,
                        time_ms,
                        actor: hex(&actor),
                    }
                })
                .collect();
            contested.push((key, candidates));
        }
        Ok(contested)
    }

    /// The provenance and time of the change that made the op `id`, found through
    /// the change graph: the document's history is not walked (it grows with every
    /// edit, and a record contested for long is settled on every change).
    fn source(&mut self, id: &ObjId) -> Option<(Provenance, i64)> {
        let hash = self.doc.hash_for_opid(id)?;
        let meta = self.doc.get_change_meta_by_hash(&hash)?;
        Some((Provenance::decode(meta.message.as_deref()), meta.timestamp))
    }

    /// Settles `key` on `value`: one change that supersedes every value `key` holds
    /// now (even one equal to `value`), recorded with `provenance` at `time_ms`.
    /// Returns the change's bytes.
    pub fn decide(
        &mut self,
        key: &Contested,
        value: &Value,
        provenance: &Provenance,
        time_ms: i64,
    ) -> Result<Option<Vec<u8>>, ModelError> {
        self.materialize()?;
        let prop = key.prop();
        // Cleared first, so the decision is a value of its own even when it repeats
        // one the field holds: Automerge would otherwise only delete the other
        // values, and two crossing decisions for different values would then delete
        // each other's and leave the field empty.
        if self.doc.get(ObjId::Root, prop.as_str())?.is_some() {
            self.doc.delete(ObjId::Root, prop.as_str())?;
        }
        match scalar_of(value) {
            Some(scalar) => self.doc.put(ObjId::Root, prop, scalar)?,
            None => {
                let kind = if matches!(value, Value::List(_)) {
                    ObjType::List
                } else {
                    ObjType::Map
                };
                let child = self.doc.put_object(ObjId::Root, prop, kind)?;
                fill_object(&mut self.doc, &child, value)?;
            }
        }
        let options = automerge::transaction::CommitOptions::default()
            .with_time(time_ms)
            .with_message(provenance.encode());
        if self.doc.commit_with(options).is_none() {
            return Ok(None);
        }
        Ok(self
            .doc
            .get_last_local_change()
            .map(|change| change.raw_bytes().to_vec()))
    }

    /// A policy's decision ([`RecordDoc::decide`]) written so that every agent
    /// deciding it from the same document writes the same change: its actor comes
    /// from the document's heads and everything the change holds (field, value,
    /// provenance, time), and `provenance` names no deciding agent. Automerge takes
    /// identical changes as one, so the agents that settle one conflict add one
    /// change between them instead of one each (which every other agent then
    /// applied: in a cluster of N, N decisions reaching N agents). Two decisions
    /// that differ in anything have different actors, so they never claim the same
    /// actor and sequence number.
    pub fn decide_shared(
        &mut self,
        key: &Contested,
        value: &Value,
        provenance: &Provenance,
        time_ms: i64,
    ) -> Result<Option<Vec<u8>>, ModelError> {
        self.materialize()?;
        let mut hasher = Sha256::new();
        hasher.update(DECISION_ACTOR_DOMAIN);
        for head in self.doc.get_heads() {
            hasher.update(head.0);
        }
        for part in [
            key.prop(),
            serde_json::to_string(value).unwrap_or_default(),
            provenance.encode(),
            time_ms.to_string(),
        ] {
            hasher.update((part.len() as u64).to_le_bytes());
            hasher.update(part.as_bytes());
        }
        let digest = hasher.finalize();
        let own = self.doc.get_actor().clone();
        self.doc.set_actor(ActorId::from(&digest[..16]));
        let made = self.decide(key, value, provenance, time_ms);
        self.doc.set_actor(own);
        made
    }

    /// Whether the record is deleted by a change that an edit of its fields did not
    /// know of (the edit was made concurrently): what *edit wins* revives. A
    /// policy's decision is not an edit.
    pub fn edited_concurrently_with_delete(&mut self) -> Result<bool, ModelError> {
        self.materialize()?;
        let deletes: Vec<OpKey> = self
            .doc
            .get_all(ObjId::Root, KEY_DELETED)?
            .into_iter()
            .filter(|(value, _)| value.as_bool() == Some(true))
            .filter_map(|(_, id)| match id {
                ObjId::Id(counter, actor, _) => Some((counter, actor.to_bytes().to_vec())),
                ObjId::Root => None,
            })
            .collect();
        if deletes.is_empty() {
            return Ok(false);
        }
        let changes = self.doc.get_changes(&[]);
        let index: HashMap<ChangeHash, usize> = changes
            .iter()
            .enumerate()
            .map(|(i, c)| (c.hash(), i))
            .collect();
        for (counter, actor) in deletes {
            let Some(d) = changes.iter().position(|c| {
                c.actor_id().to_bytes() == actor.as_slice()
                    && (c.start_op().get()..=c.max_op()).contains(&counter)
            }) else {
                continue;
            };
            // What the delete knew of, and what knew of it.
            let mut known = HashSet::from([d]);
            let mut stack = vec![d];
            while let Some(i) = stack.pop() {
                for dep in changes[i].deps() {
                    if let Some(&j) = index.get(dep)
                        && known.insert(j)
                    {
                        stack.push(j);
                    }
                }
            }
            let mut after = HashSet::from([d]);
            for (i, change) in changes.iter().enumerate() {
                if change
                    .deps()
                    .iter()
                    .any(|dep| index.get(dep).is_some_and(|j| after.contains(j)))
                {
                    after.insert(i);
                }
            }
            for (i, change) in changes.iter().enumerate() {
                if known.contains(&i) || after.contains(&i) {
                    continue;
                }
                let provenance = Provenance::decode(change.message());
                if provenance.decision.is_some() {
                    continue;
                }
                let edits_fields = change.decode().operations.iter().any(|op| {
                    op.obj == automerge::legacy::ObjectId::Root
                        && matches!(&op.key, automerge::legacy::Key::Map(k) if k.starts_with(PREFIX_FIELD))
                });
                if edits_fields {
                    return Ok(true);
                }
            }
        }
        Ok(false)
    }

    /// Every value each field and the tombstone were given, oldest first (in causal
    /// order), with where it came from and whether the record holds it now.
    pub fn history(&mut self) -> Result<Vec<HistoryEntry>, ModelError> {
        self.materialize()?;
        let mut current: HashSet<OpKey> = HashSet::new();
        let props: Vec<String> = self.doc.keys(ObjId::Root).collect();
        for prop in &props {
            if Contested::of_prop(prop).is_none() {
                continue;
            }
            for (_, id) in self.doc.get_all(ObjId::Root, prop.as_str())? {
                if let ObjId::Id(counter, actor, _) = id {
                    current.insert((counter, actor.to_bytes().to_vec()));
                }
            }
        }
        let mut entries = Vec::new();
        for change in self.doc.get_changes(&[]) {
            let provenance = Provenance::decode(change.message());
            let actor = change.actor_id().to_bytes().to_vec();
            let hash = change.hash();
            let start = change.start_op().get();
            for (i, op) in change.decode().operations.iter().enumerate() {
                let automerge::legacy::Key::Map(prop) = &op.key else {
                    continue;
                };
                if op.obj != automerge::legacy::ObjectId::Root {
                    continue;
                }
                let Some(key) = Contested::of_prop(prop) else {
                    continue;
                };
                let counter = start + i as u64;
                if matches!(op.action, automerge::legacy::OpType::Delete)
                    && provenance.decision.is_some()
                {
                    // A decision clears the values before it writes its own.
                    continue;
                }
                let value = match &op.action {
                    automerge::legacy::OpType::Put(scalar) => Some(to_value(
                        &self.doc,
                        &automerge::Value::Scalar(std::borrow::Cow::Owned(scalar.clone())),
                        &ObjId::Root,
                        prop,
                    )?),
                    automerge::legacy::OpType::Make(_) => self
                        .doc
                        .get_all_at(ObjId::Root, prop.as_str(), &[hash])?
                        .into_iter()
                        .find(|(_, id)| matches!(id, ObjId::Id(c, a, _) if *c == counter && a.to_bytes() == actor.as_slice()))
                        .map(|(value, id)| to_value(&self.doc, &value, &id, prop))
                        .transpose()?,
                    automerge::legacy::OpType::Delete => None,
                    _ => continue,
                };
                entries.push(HistoryEntry {
                    key,
                    value,
                    provenance: provenance.clone(),
                    time_ms: change.timestamp(),
                    actor: hex(&actor),
                    change: hash.to_string(),
                    current: current.contains(&(counter, actor.clone())),
                });
            }
        }
        Ok(entries)
    }
}

/// Lower-case hex of `bytes`.
fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
