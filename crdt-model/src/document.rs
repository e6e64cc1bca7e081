//! One canonical record as one Automerge document.
//!
//! Layout of the root map, chosen so that two sites creating the same record
//! offline merge field by field instead of one site's record hiding the other's:
//!
//! | key              | value                                           |
//! |------------------|-------------------------------------------------|
//! | `collection`     | the collection name                             |
//! | `key`            | the identity key                                |
//! | `deleted`        | the tombstone: `true` once the record is deleted |
//! | `x:<tool>`       | the record's external id in that tool           |
//! | `f:<field>`      | a field value                                   |
//!
//! Every key lives directly in the root map, which exists in every replica, so no
//! key is ever hidden by a concurrently created container. Decimals are stored as
//! Automerge bytes tagged `d` followed by their canonical text, so they are never
//! rounded through a float; timestamps are Automerge timestamps in microseconds.

use std::cell::OnceCell;
use std::collections::BTreeMap;
use std::fmt;
use std::num::NonZeroU64;
use std::ops::{Deref, DerefMut};

use automerge::legacy::{Key, OpId};
use automerge::transaction::Transactable;
use automerge::{
    ActorId, AutoCommit, Change, ChangeHash, ExpandedChange, ObjId, ObjType, ReadDoc, ScalarValue,
};
use sha2::{Digest, Sha256};

use crate::provenance::Provenance;
use crate::value::{Decimal, Record, Timestamp, Value};

const KEY_COLLECTION: &str = "collection";
const KEY_IDENTITY: &str = "key";
pub(crate) const KEY_DELETED: &str = "deleted";
pub(crate) const PREFIX_FIELD: &str = "f:";
const PREFIX_EXTERNAL: &str = "x:";
const DECIMAL_TAG: u8 = b'd';

/// Bytes of an Automerge actor id: 16 random bytes chosen per store, never reused.
pub type ActorBytes = [u8; 16];

/// Errors from reading or changing a record document.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// Automerge refused an operation or the bytes of a document or change.
    #[error("automerge: {0}")]
    Automerge(#[from] automerge::AutomergeError),
    /// Bytes received as a change are not an Automerge change.
    #[error("malformed change: {0}")]
    MalformedChange(#[from] automerge::LoadChangeError),
    /// The document holds a value Concord does not know how to read.
    #[error("field `{field}` holds a value of an unknown kind")]
    UnknownValue {
        /// The field holding it.
        field: String,
    },
}

/// The deterministic id of a record document, derived from (collection, identity key).
///
/// Two sites that create the same record key offline compute the same id, so they
/// grow one document instead of two.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct DocId(pub [u8; 16]);

impl DocId {
    /// The id of the record with identity `key` in `collection`.
    pub fn of(collection: &str, key: &str) -> DocId {
        DocId::derived(b"concord/doc/v1\0", collection, key)
    }

    /// SHA-256 over `tag`, the collection's length, the collection and `key`, cut to
    /// 16 bytes.
    fn derived(tag: &[u8], collection: &str, key: &str) -> DocId {
        let mut hasher = Sha256::new();
        hasher.update(tag);
        hasher.update((collection.len() as u64).to_be_bytes());
        hasher.update(collection.as_bytes());
        hasher.update(key.as_bytes());
        let digest = hasher.finalize();
        let mut id = [0u8; 16];
        id.copy_from_slice(&digest[..16]);
        DocId(id)
    }
}

impl DocId {
    /// The id of a record first captured from a tool that assigns its own ids (the
    /// *tool ids* identity): minted by the store `actor` for the record `key` of
    /// `collection` in the tool `tool`, after `previous` (the document a re-inserted
    /// key was linked to before). Distinct stores, tools, keys and predecessors give
    /// distinct ids, and a replay gives the same one.
    pub fn minted(
        actor: &[u8],
        tool: &str,
        collection: &str,
        key: &str,
        previous: Option<DocId>,
    ) -> DocId {
        let mut hasher = Sha256::new();
        hasher.update(b"concord/doc/minted/v1\0");
        for part in [
            actor,
            tool.as_bytes(),
            collection.as_bytes(),
            key.as_bytes(),
        ] {
            hasher.update((part.len() as u64).to_be_bytes());
            hasher.update(part);
        }
        if let Some(previous) = previous {
            hasher.update(previous.0);
        }
        let digest = hasher.finalize();
        let mut id = [0u8; 16];
        id.copy_from_slice(&digest[..16]);
        DocId(id)
    }
}

impl DocId {
    /// The id of the record whose normalised natural key is `key` in `collection`:
    /// two sites that create records with equal natural keys offline compute the same
    /// id, so they grow one document.
    pub fn natural(collection: &str, key: &str) -> DocId {
        DocId::derived(b"concord/doc/natural/v1\0", collection, key)
    }
}

impl fmt::Display for DocId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for byte in self.0 {
            write!(f, "{byte:02x}")?;
        }
        Ok(())
    }
}

/// A local edit of a record, as captured from one tool.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Edit {
    /// Fields whose value the tool changed (only these are written).
    pub fields: Record,
    /// The tool and the record's id in it, recorded once known.
    pub external_id: Option<(String, String)>,
    /// `Some(true)` deletes the record, `Some(false)` revives it (the tool created it again).
    pub deleted: Option<bool>,
    /// The record starts anew: every field not in `fields` is removed. A record
    /// created again after a delete holds what the tool's new row holds, never a
    /// value of the dead record.
    pub reset: bool,
    /// When the edit was made, in milliseconds since the Unix epoch (recorded in the
    /// change; passed in so that a replay makes the same bytes).
    pub time_ms: i64,
    /// Where the edit came from, recorded in the change's message (none: unknown).
    pub provenance: Option<Provenance>,
}

/// The merged state of a record, as read from its document.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RecordState {
    /// The collection the record belongs to.
    pub collection: String,
    /// The identity key of the record (empty for a record identified by tool ids).
    pub key: String,
    /// The merged field values.
    pub fields: Record,
    /// Whether the record is deleted (its tombstone is set).
    pub deleted: bool,
    /// The record's external id in each tool it reached.
    pub external_ids: BTreeMap<String, String>,
    /// Fields edited concurrently to different values: every value, Automerge's
    /// winner first.
    pub conflicts: BTreeMap<String, Vec<Value>>,
    /// Whether a field or the tombstone holds concurrent values (perhaps equal):
    /// [`RecordDoc::contested`] tells which and where each came from.
    pub contested: bool,
}

/// What applying remote changes did to a document.
#[derive(Debug, Default)]
pub struct Applied {
    /// The changes newly integrated, in causal order, as bytes (empty if none were new).
    pub new_changes: Vec<Vec<u8>>,
    /// True when some changes wait for dependencies this document lacks.
    pub missing_deps: bool,
    /// True when the new changes include some that were not given to this call:
    /// changes received earlier that waited for a dependency and are now released.
    pub released_earlier: bool,
}

/// One record as an Automerge document.
///
/// A document whose changes form one line of plain changes (each follows the one
/// before and only puts values into the root map over the values it saw: how a
/// record is created, then edited where nobody edits it concurrently) holds those
/// changes and what they read as, and builds its Automerge document only when
/// something needs it. Building one (its column indexes, ~20 KB) and dropping it
/// cost more than anything else per record when each record is created or updated
/// once, far more records than any cache holds: a first sync, or updates spread over
/// a large table.
#[derive(Debug)]
pub struct RecordDoc {
    /// The Automerge document; empty (and not built) while `held` holds the changes.
    pub(crate) doc: LazyDoc,
    /// The document's changes, not applied to `doc` (`None` once `doc` holds them,
    /// or while the document is empty).
    held: Option<Box<Held>>,
}

/// An Automerge document built on first use. A record whose changes are held
/// never uses one, and an empty `AutoCommit` costs a dozen allocations to make and
/// drop: 5% of an agent's time in a first sync, where every record is new.
#[derive(Debug)]
pub(crate) struct LazyDoc {
    /// The actor of local edits, until the document is built.
    actor: ActorId,
    built: OnceCell<AutoCommit>,
}

impl LazyDoc {
    fn new(actor: ActorId) -> LazyDoc {
        LazyDoc {
            actor,
            built: OnceCell::new(),
        }
    }

    fn built(doc: AutoCommit) -> LazyDoc {
        LazyDoc {
            actor: doc.get_actor().clone(),
            built: OnceCell::from(doc),
        }
    }

    /// Whether the document holds no change; one not built yet holds none.
    pub(crate) fn is_empty(&self) -> bool {
        self.built.get().is_none_or(AutoCommit::is_empty)
    }

    /// The actor of local edits.
    pub(crate) fn get_actor(&self) -> &ActorId {
        self.built.get().map_or(&self.actor, AutoCommit::get_actor)
    }
}

impl Deref for LazyDoc {
    type Target = AutoCommit;

    fn deref(&self) -> &AutoCommit {
        self.built
            .get_or_init(|| AutoCommit::new().with_actor(self.actor.clone()))
    }
}

impl DerefMut for LazyDoc {
    fn deref_mut(&mut self) -> &mut AutoCommit {
        let _ = Deref::deref(self);
        self.built.get_mut().expect("built just now")
    }
}

/// Plain changes in one line, and what they read as.
#[derive(Debug, Default)]
struct Held {
    /// The changes in order: the first depends on nothing, each later one on the
    /// one before.
    changes: Vec<Change>,
    /// Each root key and the op that put its value (the only op there: no two
    /// changes were concurrent). Keys are short and inline; the values are in
    /// `state`, and `deleted`.
    ops: Vec<(Key, OpId)>,
    /// The tombstone's value as put (`None`: never put).
    deleted: Option<Value>,
    /// What the changes read as.
    state: RecordState,
}

/// The puts of a change that extends a [`Held`] line: (key, value, op).
type Puts = Vec<(Key, Value, OpId)>;

/// The name of a map key (empty for a list position, which a held line never has).
fn key_name(key: &Key) -> &str {
    match key {
        Key::Map(name) => name,
        Key::Seq(_) => "",
    }
}

impl Held {
    /// The op that put the value of root key `name`.
    fn op_of(&self, name: &str) -> Option<&OpId> {
        self.ops
            .iter()
            .find(|(key, _)| key_name(key) == name)
            .map(|(_, op)| op)
    }

    /// Whether root key `name` holds `value`, compared as `put_value` compares.
    fn holds(&self, name: &str, value: &Value) -> bool {
        if self.op_of(name).is_none() {
            return false;
        }
        let text = |held: &str| matches!(value, Value::Text(text) if text == held);
        let state = &self.state;
        if name == KEY_COLLECTION {
            text(&state.collection)
        } else if name == KEY_IDENTITY {
            text(&state.key)
        } else if name == KEY_DELETED {
            self.deleted.as_ref() == Some(value)
        } else if let Some(tool) = name.strip_prefix(PREFIX_EXTERNAL) {
            state.external_ids.get(tool).is_some_and(|id| text(id))
        } else if let Some(field) = name.strip_prefix(PREFIX_FIELD) {
            state.fields.get(field) == Some(value)
        } else {
            false
        }
    }

    /// The changes `actor` made (a line holds at most a store's appends between
    /// whole saves, so counting them is cheap).
    fn seq_of(&self, actor: &ActorId) -> u64 {
        self.changes
            .iter()
            .filter(|change| change.actor_id() == actor)
            .map(Change::seq)
            .max()
            .unwrap_or(0)
    }

    /// The counter of the last op.
    fn max_op(&self) -> u64 {
        self.changes.last().map_or(0, Change::max_op)
    }

    /// The puts of `change` if it extends the line plainly: it depends on the last
    /// change alone (on nothing, for the first), is its actor's next, starts at the
    /// next op, and only puts scalar values that [`RecordDoc::read`] reads into
    /// distinct keys of the root map, each replacing exactly the value there.
    /// `None` for anything else, which Automerge applies as usual (and reports what
    /// is wrong with it).
    fn puts(&self, change: &ExpandedChange) -> Option<Puts> {
        use automerge::legacy::{ObjectId, OpType};
        let head = self.changes.last().map(Change::hash);
        if change.deps.as_slice() != head.as_slice()
            || change.seq != self.seq_of(&change.actor_id) + 1
            || change.start_op.get() != self.max_op() + 1
            || change.operations.is_empty()
        {
            return None;
        }
        let mut puts: Puts = Vec::with_capacity(change.operations.len());
        for (counter, op) in (change.start_op.get()..).zip(&change.operations) {
            let (ObjectId::Root, Key::Map(key), OpType::Put(scalar), false) =
                (&op.obj, &op.key, &op.action, op.insert)
            else {
                return None;
            };
            let name: &str = key;
            let replaced = self.op_of(name);
            if op.pred.len() != usize::from(replaced.is_some())
                || op.pred.get(0) != replaced
                || puts.iter().any(|(k, _, _)| key_name(k) == name)
            {
                return None;
            }
            let label = name.strip_prefix(PREFIX_FIELD).unwrap_or(name);
            let value = scalar_value(scalar, label).ok()?;
            let text_only =
                name == KEY_COLLECTION || name == KEY_IDENTITY || name.starts_with(PREFIX_EXTERNAL);
            if text_only && !matches!(value, Value::Text(_)) {
                return None;
            }
            puts.push((
                op.key.clone(),
                value,
                OpId(counter, change.actor_id.clone()),
            ));
        }
        Some(puts)
    }

    /// Appends `change`, whose puts are `puts` (from [`Held::puts`]).
    fn push(&mut self, change: Change, puts: Puts) {
        self.changes.push(change);
        let state = &mut self.state;
        for (key, value, op) in puts {
            let name = key_name(&key);
            let text = |value: Value| match value {
                Value::Text(text) => text,
                _ => String::new(),
            };
            if name == KEY_COLLECTION {
                state.collection = text(value);
            } else if name == KEY_IDENTITY {
                state.key = text(value);
            } else if name == KEY_DELETED {
                state.deleted = value == Value::Bool(true);
                self.deleted = Some(value);
            } else if let Some(tool) = name.strip_prefix(PREFIX_EXTERNAL) {
                state.external_ids.insert(tool.to_owned(), text(value));
            } else if let Some(field) = name.strip_prefix(PREFIX_FIELD) {
                state.fields.insert(field.to_owned(), value);
            }
            match self.ops.iter_mut().find(|(held, _)| *held == key) {
                Some((_, held)) => *held = op,
                None => self.ops.push((key, op)),
            }
        }
    }

    /// Appends the change `edit` makes, built by `actor` as a change rather than
    /// through a transaction: a ten-field record's first change takes 4 µs this way
    /// against 80 µs of transaction puts, each of which looks its key up. Returns
    /// its bytes (`Some(None)`: the line holds everything already), or `None` when
    /// the edit needs the Automerge document (a reset, or a nested value).
    fn edit(
        &mut self,
        actor: &ActorId,
        collection: &str,
        key: &str,
        edit: &Edit,
    ) -> Option<Option<Vec<u8>>> {
        use automerge::legacy::{ObjectId, Op, OpType};
        if edit.reset {
            return None;
        }
        let mut operations = Vec::with_capacity(edit.fields.len() + 4);
        // As `put_value`: only a value that differs from the one there is written.
        let mut put = |name: String, value: &Value| -> Option<()> {
            if self.holds(&name, value) {
                return Some(());
            }
            let current = self.op_of(&name);
            operations.push(Op {
                action: OpType::Put(scalar_of(value)?),
                obj: ObjectId::Root,
                key: Key::Map(name.into()),
                pred: current.cloned().into_iter().collect(),
                insert: false,
            });
            Some(())
        };
        if self.op_of(KEY_COLLECTION).is_none() {
            put(
                KEY_COLLECTION.to_owned(),
                &Value::Text(collection.to_owned()),
            )?;
            if !key.is_empty() {
                put(KEY_IDENTITY.to_owned(), &Value::Text(key.to_owned()))?;
            }
        }
        for (name, value) in &edit.fields {
            put(format!("{PREFIX_FIELD}{name}"), value)?;
        }
        if let Some((tool, id)) = &edit.external_id {
            put(format!("{PREFIX_EXTERNAL}{tool}"), &Value::Text(id.clone()))?;
        }
        if let Some(deleted) = edit.deleted {
            put(KEY_DELETED.to_owned(), &Value::Bool(deleted))?;
        }
        if operations.is_empty() {
            return Some(None);
        }
        let change = ExpandedChange {
            operations,
            actor_id: actor.clone(),
            hash: None,
            seq: self.seq_of(actor) + 1,
            start_op: NonZeroU64::new(self.max_op() + 1)?,
            time: edit.time_ms,
            message: edit.provenance.as_ref().map(Provenance::encode),
            deps: self.changes.last().map(Change::hash).into_iter().collect(),
            extra_bytes: Vec::new(),
            author: None,
        };
        let puts = self.puts(&change)?;
        let change = Change::from(change);
        let raw = change.raw_bytes().to_vec();
        self.push(change, puts);
        Some(Some(raw))
    }

    /// Appends `change` if it extends the line plainly; gives it back otherwise.
    fn extend(&mut self, change: Change) -> Result<(), Box<Change>> {
        match self.puts(&change.decode()) {
            Some(puts) => {
                self.push(change, puts);
                Ok(())
            }
            None => Err(Box::new(change)),
        }
    }
}

impl RecordDoc {
    /// An empty document whose local edits are made by `actor`.
    pub fn new(actor: &ActorBytes) -> RecordDoc {
        RecordDoc {
            doc: LazyDoc::new(ActorId::from(&actor[..])),
            held: None,
        }
    }

    /// Loads a document from bytes made by [`RecordDoc::save`], or by appending change bytes
    /// to those; local edits are made by `actor`.
    pub fn load(bytes: &[u8], actor: &ActorBytes) -> Result<RecordDoc, ModelError> {
        // Change chunks in one line of plain changes: held again.
        let mut held = Held::default();
        let mut rest = bytes;
        while let Some((CHUNK_CHANGE, chunk, tail)) = split_chunk(rest)
            && let Ok(change) = Change::from_bytes(chunk.to_vec())
            && held.extend(change).is_ok()
        {
            rest = tail;
        }
        if rest.is_empty() && !held.changes.is_empty() {
            let mut doc = RecordDoc::new(actor);
            doc.held = Some(Box::new(held));
            return Ok(doc);
        }
        let doc = AutoCommit::load(bytes)?.with_actor(ActorId::from(&actor[..]));
        Ok(RecordDoc {
            doc: LazyDoc::built(doc),
            held: None,
        })
    }

    /// How many chunks (a saved document, changes) a document's stored bytes hold,
    /// read from their headers alone; bytes that are not chunks count as one.
    pub fn stored_chunks(bytes: &[u8]) -> usize {
        let (mut chunks, mut rest) = (0, bytes);
        while let Some((_, _, tail)) = split_chunk(rest) {
            chunks += 1;
            rest = tail;
        }
        chunks.max(1)
    }

    /// A document's stored bytes saved again as one document, if that is smaller.
    /// Each appended change carries its own header, checksum and the hashes it
    /// depends on; a saved document holds the same history in columns (a record
    /// with 19 single-field updates: 1,397 bytes appended, 401 saved, each
    /// compressed). The history, and so the heads, stay as they were.
    pub fn compact_stored(bytes: &[u8]) -> Result<Option<Vec<u8>>, ModelError> {
        let saved = AutoCommit::load(bytes)?.save_nocompress();
        Ok((saved.len() < bytes.len()).then_some(saved))
    }

    /// The changes held in a document's stored bytes (change chunks, or a saved
    /// document with change chunks appended), each as raw change bytes. Change
    /// chunks are cut out as they are; a saved document is loaded and its changes
    /// encoded again.
    pub fn stored_changes(bytes: &[u8]) -> Result<Vec<Vec<u8>>, ModelError> {
        let mut changes = Vec::new();
        let mut rest = bytes;
        while !rest.is_empty() {
            match split_chunk(rest) {
                Some((CHUNK_CHANGE, chunk, tail)) => {
                    changes.push(chunk.to_vec());
                    rest = tail;
                }
                _ => {
                    let mut doc = AutoCommit::load(bytes)?;
                    return Ok(doc
                        .get_changes(&[])
                        .into_iter()
                        .map(|change| change.raw_bytes().to_vec())
                        .collect());
                }
            }
        }
        Ok(changes)
    }

    /// How many changes the document holds without having built its Automerge
    /// document (`None`: it is built, or empty).
    pub fn held_changes(&self) -> Option<usize> {
        self.held.as_ref().map(|held| held.changes.len())
    }

    /// Applies the changes held back, if any, to the Automerge document.
    pub(crate) fn materialize(&mut self) -> Result<(), ModelError> {
        if let Some(held) = self.held.take() {
            self.doc.apply_changes(held.changes)?;
        }
        Ok(())
    }

    /// The whole document in compact form (not deflated: the store compresses).
    pub fn save(&mut self) -> Vec<u8> {
        match self.materialize() {
            Ok(()) => self.doc.save_nocompress(),
            // Never reached (checked changes in one line apply to an empty document).
            Err(_) => Vec::new(),
        }
    }

    /// The document's current heads.
    pub fn heads(&mut self) -> Vec<ChangeHash> {
        match &self.held {
            Some(held) => held.changes.last().map(Change::hash).into_iter().collect(),
            None => self.doc.get_heads(),
        }
    }

    /// The underlying Automerge document, for the per-document sync protocol.
    pub fn automerge(&mut self) -> &mut AutoCommit {
        // Checked changes in one line always apply to an empty document; were one
        // refused, the document would read as empty, which a peer repairs.
        if let Err(e) = self.materialize() {
            debug_assert!(false, "a held change was refused: {e}");
        }
        &mut self.doc
    }

    /// Applies a local edit of the record `key` in `collection`, writing only what
    /// differs from the document. An empty `key` marks a record identified by tool
    /// ids (its document id is minted, [`DocId::minted`]): no identity key is
    /// written. Returns the bytes of the new change, or `None` when the document
    /// already held everything.
    pub fn edit(
        &mut self,
        collection: &str,
        key: &str,
        edit: &Edit,
    ) -> Result<Option<Vec<u8>>, ModelError> {
        if self.doc.is_empty() {
            let held = self.held.get_or_insert_default();
            let made = held.edit(self.doc.get_actor(), collection, key, edit);
            if held.changes.is_empty() {
                self.held = None;
            }
            if let Some(made) = made {
                return Ok(made);
            }
        }
        self.materialize()?;
        let root = ObjId::Root;
        if self.doc.get(&root, KEY_COLLECTION)?.is_none() {
            self.doc.put(&root, KEY_COLLECTION, collection)?;
            if !key.is_empty() {
                self.doc.put(&root, KEY_IDENTITY, key)?;
            }
        }
        if edit.reset {
            let stale: Vec<String> = self
                .doc
                .keys(&root)
                .filter(|key| {
                    key.strip_prefix(PREFIX_FIELD)
                        .is_some_and(|field| !edit.fields.contains_key(field))
                })
                .collect();
            for key in stale {
                self.doc.delete(&root, key.as_str())?;
            }
        }
        for (name, value) in &edit.fields {
            put_value(&mut self.doc, &root, format!("{PREFIX_FIELD}{name}"), value)?;
        }
        if let Some((tool, id)) = &edit.external_id {
            put_value(
                &mut self.doc,
                &root,
                format!("{PREFIX_EXTERNAL}{tool}"),
                &Value::Text(id.clone()),
            )?;
        }
        if let Some(deleted) = edit.deleted {
            put_value(
                &mut self.doc,
                &root,
                KEY_DELETED.to_owned(),
                &Value::Bool(deleted),
            )?;
        }
        let mut options = automerge::transaction::CommitOptions::default().with_time(edit.time_ms);
        if let Some(provenance) = &edit.provenance {
            options = options.with_message(provenance.encode());
        }
        if self.doc.commit_with(options).is_none() {
            return Ok(None);
        }
        Ok(self
            .doc
            .get_last_local_change()
            .map(|change| change.raw_bytes().to_vec()))
    }

    /// Applies change bytes received from a peer. Applying changes the document
    /// already holds does nothing, so replaying a message is harmless.
    pub fn apply(&mut self, changes: &[Vec<u8>]) -> Result<Applied, ModelError> {
        let mut decoded = changes
            .iter()
            .map(|bytes| Change::from_bytes(bytes.clone()))
            .collect::<Result<Vec<_>, _>>()?;
        let mut applied = Applied::default();
        if self.doc.is_empty() {
            // Changes that extend the held line are held too. The first that does not
            // (concurrent with one held, waiting for a dependency, or not plain) and
            // those after it take Automerge's path.
            let held = self.held.get_or_insert_default();
            let mut rest = Vec::new();
            for change in decoded {
                if !rest.is_empty() {
                    rest.push(change);
                    continue;
                }
                // Held already (a replayed or relayed message): nothing new.
                if held.changes.iter().any(|c| c.hash() == change.hash()) {
                    continue;
                }
                let raw = change.raw_bytes().to_vec();
                match held.extend(change) {
                    Ok(()) => applied.new_changes.push(raw),
                    Err(change) => rest.push(*change),
                }
            }
            if held.changes.is_empty() {
                self.held = None;
            }
            if rest.is_empty() {
                return Ok(applied);
            }
            decoded = rest;
        }
        self.materialize()?;
        let before = self.doc.get_heads();
        // The common case, one change into a document with none waiting for
        // dependencies: if the heads moved, that change is the one new change, and
        // reading it back out of the document (which re-encodes it) is not needed.
        let single = match (&decoded[..], self.doc.get_missing_deps(&[]).is_empty()) {
            ([change], true) => Some(change.raw_bytes().to_vec()),
            _ => None,
        };
        let given: Vec<ChangeHash> = match single {
            Some(_) => Vec::new(),
            None => decoded.iter().map(Change::hash).collect(),
        };
        self.doc.apply_changes(decoded)?;
        let after = self.doc.get_heads();
        if let Some(raw) = single {
            if before != after {
                applied.new_changes.push(raw);
            }
        } else if before != after {
            for change in self.doc.get_changes(&before) {
                applied.released_earlier |= !given.contains(&change.hash());
                applied.new_changes.push(change.raw_bytes().to_vec());
            }
        }
        applied.missing_deps = !self.doc.get_missing_deps(&[]).is_empty();
        Ok(applied)
    }

    /// The record's (collection, identity key), if the document holds them: cheaper
    /// than a full [`RecordDoc::read`]. The key is empty for a record identified by
    /// tool ids.
    pub fn identity(&self) -> Result<Option<(String, String)>, ModelError> {
        if let Some(held) = &self.held {
            let state = &held.state;
            return Ok(held
                .op_of(KEY_COLLECTION)
                .is_some()
                .then(|| (state.collection.clone(), state.key.clone())));
        }
        if self.doc.get(ObjId::Root, KEY_COLLECTION)?.is_none() {
            return Ok(None);
        }
        let key = match self.doc.get(ObjId::Root, KEY_IDENTITY)? {
            None => String::new(),
            Some(_) => read_text(&self.doc, KEY_IDENTITY)?,
        };
        Ok(Some((read_text(&self.doc, KEY_COLLECTION)?, key)))
    }

    /// When each field's current value was written: the time (milliseconds since
    /// the Unix epoch) of the change that wrote it, as recorded by [`Edit::time_ms`].
    /// Fields edited concurrently report the winning value's time.
    pub fn field_times(&mut self) -> Result<BTreeMap<String, i64>, ModelError> {
        self.materialize()?;
        let mut ops = Vec::new();
        for key in self.doc.keys(ObjId::Root) {
            if let Some(field) = key.strip_prefix(PREFIX_FIELD)
                && let Some((_, ObjId::Id(counter, actor, _))) =
                    self.doc.get(ObjId::Root, key.as_str())?
            {
                ops.push((field.to_owned(), counter, actor));
            }
        }
        let mut times = BTreeMap::new();
        if ops.is_empty() {
            return Ok(times);
        }
        for change in self.doc.get_changes(&[]) {
            let range = change.start_op().get()..=change.max_op();
            for (field, counter, actor) in &ops {
                if change.actor_id() == actor && range.contains(counter) {
                    times.insert(field.clone(), change.timestamp());
                }
            }
        }
        Ok(times)
    }

    /// Whether the document holds no change at all.
    pub fn is_empty(&self) -> bool {
        self.held.is_none() && self.doc.is_empty()
    }

    /// Whether the record's tombstone is set: it was deleted and not created again.
    pub fn is_deleted(&self) -> Result<bool, ModelError> {
        if let Some(held) = &self.held {
            return Ok(held.state.deleted);
        }
        Ok(matches!(
            read_value(&self.doc, &ObjId::Root, KEY_DELETED)?,
            Value::Bool(true)
        ))
    }

    /// Checks that every value the document holds is one [`RecordDoc::read`] can
    /// read, without building the record: cheaper than reading, for refusing a peer's
    /// change before it is stored.
    pub fn check_readable(&self) -> Result<(), ModelError> {
        if self.held.is_some() {
            // Every value was read when its change was held.
            return Ok(());
        }
        for item in self.doc.map_range(ObjId::Root, ..) {
            let key: &str = &item.key;
            let text_only = key == KEY_COLLECTION || key == KEY_IDENTITY;
            match &item.value {
                automerge::ValueRef::Scalar(scalar) if !item.conflict => {
                    if !readable_scalar(scalar, text_only) {
                        return Err(ModelError::UnknownValue {
                            field: key.to_owned(),
                        });
                    }
                }
                // Nested values and concurrent values: the full path, which is rare.
                _ => {
                    for (value, id) in self.doc.get_all(ObjId::Root, key)? {
                        let value = to_value(&self.doc, &value, &id, key)?;
                        if text_only && !matches!(value, Value::Text(_)) {
                            return Err(ModelError::UnknownValue {
                                field: key.to_owned(),
                            });
                        }
                    }
                }
            }
        }
        Ok(())
    }

    /// Reads the merged record and any concurrent values.
    pub fn read(&self) -> Result<RecordState, ModelError> {
        if let Some(held) = &self.held {
            return Ok(held.state.clone());
        }
        let mut state = RecordState::default();
        for item in self.doc.map_range(ObjId::Root, ..) {
            let name: &str = &item.key;
            // A value with no concurrent one is read from the range itself: looking
            // each key up again cost as much as applying the document's change.
            let single = match &item.value {
                automerge::ValueRef::Scalar(_) if !item.conflict => {
                    let value = automerge::Value::from(item.value.clone());
                    let label = name.strip_prefix(PREFIX_FIELD).unwrap_or(name);
                    Some(to_value(&self.doc, &value, &ObjId::Root, label)?)
                }
                _ => None,
            };
            let text = |single: Option<Value>| match single {
                Some(Value::Text(text)) => Ok(text),
                Some(_) => Err(ModelError::UnknownValue {
                    field: name.to_owned(),
                }),
                None => read_text(&self.doc, name),
            };
            if name == KEY_COLLECTION {
                state.collection = text(single)?;
            } else if name == KEY_IDENTITY {
                state.key = text(single)?;
            } else if name == KEY_DELETED {
                state.contested |= item.conflict;
                let value = match single {
                    Some(value) => value,
                    None => read_value(&self.doc, &ObjId::Root, name)?,
                };
                state.deleted = matches!(value, Value::Bool(true));
            } else if let Some(tool) = name.strip_prefix(PREFIX_EXTERNAL) {
                state.external_ids.insert(tool.to_owned(), text(single)?);
            } else if let Some(field) = name.strip_prefix(PREFIX_FIELD) {
                state.contested |= item.conflict;
                if let Some(value) = single {
                    state.fields.insert(field.to_owned(), value);
                    continue;
                }
                let all = self.doc.get_all(ObjId::Root, name)?;
                let mut values = Vec::with_capacity(all.len());
                for (value, id) in all.iter().rev() {
                    let value = to_value(&self.doc, value, id, field)?;
                    if !values.contains(&value) {
                        values.push(value);
                    }
                }
                let winner = read_value(&self.doc, &ObjId::Root, name)?;
                if let Some(pos) = values.iter().position(|v| *v == winner) {
                    values.swap(0, pos);
                }
                if values.len() > 1 {
                    state.conflicts.insert(field.to_owned(), values);
                }
                state.fields.insert(field.to_owned(), winner);
            }
        }
        Ok(state)
    }
}

/// Whether [`to_value`] reads `scalar` (as text, if `text_only`).
fn readable_scalar(scalar: &automerge::ScalarValueRef<'_>, text_only: bool) -> bool {
    use automerge::ScalarValueRef as S;
    match scalar {
        S::Str(_) => true,
        _ if text_only => false,
        S::Null | S::Boolean(_) | S::Int(_) | S::F64(_) | S::Timestamp(_) => true,
        S::Uint(u) => i64::try_from(*u).is_ok(),
        S::Bytes(bytes) => match bytes.split_first() {
            Some((&DECIMAL_TAG, text)) => std::str::from_utf8(text)
                .ok()
                .is_some_and(|text| Decimal::parse(text).is_ok()),
            _ => false,
        },
        S::Counter(_) | S::Unknown { .. } => false,
    }
}

fn read_text(doc: &AutoCommit, name: &str) -> Result<String, ModelError> {
    match read_value(doc, &ObjId::Root, name)? {
        Value::Text(text) => Ok(text),
        _ => Err(ModelError::UnknownValue {
            field: name.to_owned(),
        }),
    }
}

pub(crate) fn read_value(doc: &AutoCommit, obj: &ObjId, prop: &str) -> Result<Value, ModelError> {
    match doc.get(obj, prop)? {
        Some((value, id)) => to_value(doc, &value, &id, prop),
        None => Ok(Value::Null),
    }
}

pub(crate) fn to_value(
    doc: &AutoCommit,
    value: &automerge::Value<'_>,
    id: &ObjId,
    field: &str,
) -> Result<Value, ModelError> {
    Ok(match value {
        automerge::Value::Scalar(scalar) => scalar_value(scalar, field)?,
        automerge::Value::Object(ObjType::Map | ObjType::Table) => {
            let mut map = BTreeMap::new();
            for item in doc.map_range(id, ..) {
                let key = item.key.to_string();
                let value = read_value(doc, id, &key)?;
                map.insert(key, value);
            }
            Value::Map(map)
        }
        automerge::Value::Object(ObjType::List) => {
            let mut list = Vec::new();
            for index in 0..doc.length(id) {
                match doc.get(id, index)? {
                    Some((value, child)) => list.push(to_value(doc, &value, &child, field)?),
                    None => list.push(Value::Null),
                }
            }
            Value::List(list)
        }
        automerge::Value::Object(ObjType::Text) => Value::Text(doc.text(id)?),
    })
}

/// The value a scalar stands for; `field` names it in the error.
fn scalar_value(scalar: &ScalarValue, field: &str) -> Result<Value, ModelError> {
    let unknown = || ModelError::UnknownValue {
        field: field.to_owned(),
    };
    Ok(match scalar {
        ScalarValue::Null => Value::Null,
        ScalarValue::Boolean(b) => Value::Bool(*b),
        ScalarValue::Int(i) => Value::Int(*i),
        ScalarValue::Uint(u) => Value::Int(i64::try_from(*u).map_err(|_| unknown())?),
        ScalarValue::F64(f) => Value::Float(*f),
        ScalarValue::Str(s) => Value::Text(s.to_string()),
        ScalarValue::Timestamp(t) => Value::Timestamp(Timestamp::from_micros(*t)),
        ScalarValue::Bytes(bytes) => match bytes.split_first() {
            Some((&DECIMAL_TAG, text)) => {
                let text = std::str::from_utf8(text).map_err(|_| unknown())?;
                Value::Decimal(Decimal::parse(text).map_err(|_| unknown())?)
            }
            _ => return Err(unknown()),
        },
        ScalarValue::Counter(_) | ScalarValue::Unknown { .. } => return Err(unknown()),
    })
}

pub(crate) fn scalar_of(value: &Value) -> Option<ScalarValue> {
    Some(match value {
        Value::Null => ScalarValue::Null,
        Value::Bool(b) => ScalarValue::Boolean(*b),
        Value::Int(i) => ScalarValue::Int(*i),
        Value::Float(f) => ScalarValue::F64(*f),
        Value::Decimal(d) => {
            let mut bytes = Vec::with_capacity(d.as_str().len() + 1);
            bytes.push(DECIMAL_TAG);
            bytes.extend_from_slice(d.as_str().as_bytes());
            ScalarValue::Bytes(bytes)
        }
        Value::Text(s) => ScalarValue::Str(s.as_str().into()),
        Value::Timestamp(t) => ScalarValue::Timestamp(t.micros()),
        Value::List(_) | Value::Map(_) => return None,
    })
}

/// Where a value goes: a key of a map or an index of a list.
#[derive(Clone)]
enum Slot {
    Key(String),
    Index(usize),
}

impl From<Slot> for automerge::Prop {
    fn from(slot: Slot) -> automerge::Prop {
        match slot {
            Slot::Key(key) => automerge::Prop::Map(key),
            Slot::Index(index) => automerge::Prop::Seq(index),
        }
    }
}

/// Writes `value` at `prop` of map `obj` unless the document already holds it there.
pub(crate) fn put_value(
    doc: &mut AutoCommit,
    obj: &ObjId,
    prop: String,
    value: &Value,
) -> Result<(), ModelError> {
    let current = doc
        .get(obj, prop.as_str())?
        .map(|(value, id)| (value.into_owned(), id));
    write_slot(doc, obj, Slot::Key(prop), value, current)
}

fn write_slot(
    doc: &mut AutoCommit,
    obj: &ObjId,
    slot: Slot,
    value: &Value,
    current: Option<(automerge::Value<'static>, ObjId)>,
) -> Result<(), ModelError> {
    // Nested values are diffed in place so that concurrent edits of different
    // entries merge; a change of kind replaces the whole value.
    match (value, &current) {
        (Value::Map(entries), Some((automerge::Value::Object(ObjType::Map), child))) => {
            let child = child.clone();
            let existing: Vec<String> = doc.keys(&child).collect();
            for key in existing {
                if !entries.contains_key(&key) {
                    doc.delete(&child, key.as_str())?;
                }
            }
            for (key, entry) in entries {
                put_value(doc, &child, key.clone(), entry)?;
            }
            return Ok(());
        }
        (Value::List(items), Some((automerge::Value::Object(ObjType::List), child))) => {
            let child = child.clone();
            let len = doc.length(&child);
            for index in (items.len()..len).rev() {
                doc.delete(&child, index)?;
            }
            for (index, item) in items.iter().enumerate() {
                if index < len {
                    let current = doc.get(&child, index)?.map(|(v, id)| (v.into_owned(), id));
                    write_slot(doc, &child, Slot::Index(index), item, current)?;
                } else {
                    insert_value(doc, &child, index, item)?;
                }
            }
            return Ok(());
        }
        _ => {}
    }
    if let Some((current_value, id)) = &current {
        let field = match &slot {
            Slot::Key(key) => key.as_str(),
            Slot::Index(_) => "",
        };
        if to_value(doc, current_value, id, field).ok().as_ref() == Some(value) {
            return Ok(());
        }
    }
    match scalar_of(value) {
        Some(scalar) => doc.put(obj, slot, scalar)?,
        None => {
            let kind = if matches!(value, Value::List(_)) {
                ObjType::List
            } else {
                ObjType::Map
            };
            let child = doc.put_object(obj, slot, kind)?;
            fill_object(doc, &child, value)?;
        }
    }
    Ok(())
}

fn insert_value(
    doc: &mut AutoCommit,
    list: &ObjId,
    index: usize,
    value: &Value,
) -> Result<(), ModelError> {
    match scalar_of(value) {
        Some(scalar) => doc.insert(list, index, scalar)?,
        None => {
            let kind = if matches!(value, Value::List(_)) {
                ObjType::List
            } else {
                ObjType::Map
            };
            let child = doc.insert_object(list, index, kind)?;
            fill_object(doc, &child, value)?;
        }
    }
    Ok(())
}

pub(crate) fn fill_object(
    doc: &mut AutoCommit,
    obj: &ObjId,
    value: &Value,
) -> Result<(), ModelError> {
    match value {
        Value::Map(entries) => {
            for (key, entry) in entries {
                write_slot(doc, obj, Slot::Key(key.clone()), entry, None)?;
            }
        }
        Value::List(items) => {
            for (index, item) in items.iter().enumerate() {
                insert_value(doc, obj, index, item)?;
            }
        }
        _ => {}
    }
    Ok(())
}

/// The magic bytes that open every Automerge chunk.
const CHUNK_MAGIC: [u8; 4] = [0x85, 0x6f, 0x4a, 0x83];
/// The chunk type of an uncompressed change.
const CHUNK_CHANGE: u8 = 1;

/// The first chunk of `bytes` as (type, the chunk, what follows it), if `bytes`
/// open with a whole chunk header: magic, checksum, type and LEB128 body length.
fn split_chunk(bytes: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let header = bytes.get(..9)?;
    if header[..4] != CHUNK_MAGIC {
        return None;
    }
    let (mut len, mut shift, mut at) = (0u64, 0u32, 9usize);
    loop {
        let byte = *bytes.get(at)?;
        at += 1;
        len |= u64::from(byte & 0x7f).checked_shl(shift)?;
        if byte & 0x80 == 0 {
            break;
        }
        shift += 7;
        if shift > 63 {
            return None;
        }
    }
    let end = at.checked_add(usize::try_from(len).ok()?)?;
    let chunk = bytes.get(..end)?;
    Some((header[8], chunk, &bytes[end..]))
}
