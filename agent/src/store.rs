//! The agent's durable state in fjall: documents, change logs, shadows, cursors.
//!
//! Keyspaces and their keys:
//!
//! | keyspace  | key                                   | value                              |
//! |-----------|---------------------------------------|------------------------------------|
//! | `meta`    | `actor`                               | this store's actor id (16 bytes)   |
//! | `docs`    | doc id (16 bytes)                     | a head naming the document's standing log entries ([`doc_head`]), then its saved document and appended changes |
//! | `log`     | collection, 0, seq (u64 BE)           | [`LogEntry`]                       |
//! | `log_raw` | collection, 0, seq (u64 BE)           | the newest entries' change bytes and the entries each supersedes |
//! | `ext`     | tool, 0, collection, 0, external id   | doc id (the record's document)     |
//! | `links`   | tool, 0, doc id                       | the external id of the document's record in the tool |
//! | `shadow`  | tool, 0, collection, 0, key           | the record the tool is known to hold |
//! | `cursors` | `tool/<tool>` or `peer/<store>/<collection>` | the connector's cursor; u64 BE |
//! | `pending` | tool, 0, doc id                       | empty: the doc awaits write-back to the tool |
//! | `dead`    | tool, 0, collection, 0, key           | [`DeadLetter`]                     |
//! | `digests` | collection, 0, doc id                 | the document's heads digest (u64 BE) |
//! | `quarantine` | doc id                             | [`Quarantined`]                    |
//! | `ambiguous` | tool, 0, collection, 0, key         | [`Ambiguous`]                      |
//! | `conflicts` | doc id, field                       | [`OpenConflict`]: waits for a person |
//! | `held`    | tool, 0, collection, 0, key           | [`HeldDelete`]: waits for approval |
//!
//! All writes of one step go into one [`Batch`], committed with fsync before the
//! step is acknowledged or anything of it is sent (Architecture Invariant). A failed
//! write or fsync is fatal: the caller crashes and recovers on restart.
//!
//! Documents are loaded on demand through a bounded LRU cache, so memory does not
//! grow with the number of records.

use std::collections::{HashMap, HashSet, VecDeque};
use std::num::NonZeroUsize;
use std::path::Path;

use connectors::Cursor;
use crdt_model::{ActorBytes, DocId, Record, RecordDoc, RecordState};
use fjall::config::PinningPolicy;
use fjall::{Database, Keyspace, KeyspaceCreateOptions, PersistMode, Readable};
use lru::LruCache;
use serde::{Deserialize, Serialize};

/// How many documents the cache holds at most (~20 KB each when loaded).
pub const DOC_CACHE_MAX: usize = 1024;
/// How many records read for a write-back are kept past their document's eviction
/// (about 3 KB each for a ten-field record, against ~20 KB for a built document).
pub const READ_CACHE_MAX: usize = 16_384;
/// fjall's block cache.
pub const STORE_CACHE_BYTES_MAX: u64 = 16 * 1024 * 1024;
/// Journal kept at most: beyond it the keyspaces holding its oldest writes are
/// flushed, which bounds what a start after a crash replays (fjall's least).
pub const STORE_JOURNAL_BYTES_MAX: u64 = 64 * 1024 * 1024;
/// One keyspace's memtable before it is flushed to disk: fewer, larger flushes
/// leave fjall's workers less to compact (4 MiB before: 300,000 records synced
/// 10-13% and updated 4-12% slower, for 70-95 MiB less RSS).
pub const STORE_MEMTABLE_BYTES_MAX: u64 = 16 * 1024 * 1024;
/// How many changes are appended to a stored document before it is saved whole again.
pub const DOC_APPENDS_MAX: u32 = 32;

/// Log entries of each collection, the newest, that keep their change bytes. An
/// older entry keeps only its document (`LogEntry::changes` empty) and is read as
/// that document's changes: the bytes are the document's already, and a peer that
/// far behind takes the document whole (applying what it holds is harmless).
pub const LOG_RAW_KEEP: u64 = 65_536;

/// Changes appended to a document loaded from disk before it is saved whole again.
pub const DOC_APPENDS_AFTER_LOAD_MAX: u32 = 4;
/// Documents one idle pass of [`Store::compact_docs`] looks at, at most.
pub const DOC_COMPACT_SCAN_MAX: usize = 4_096;
/// Documents one idle pass saves again, at most (each takes a load and a save,
/// some tens of µs, while a peer or tool may be waiting).
pub const DOC_COMPACT_REWRITE_MAX: usize = 64;
/// Chunks a stored document holds at least before [`Store::compact_docs`] saves it
/// again as one: a record's first change and one update are smaller as they are.
pub const DOC_COMPACT_CHUNKS_MIN: usize = 3;

/// Buckets of the anti-entropy digest tree: documents grouped by the first 16 bits
/// of their id. A bucket's digest is the XOR of its documents' heads digests.
pub const DIGEST_BUCKETS: usize = 1 << 16;
/// Levels of the digest tree, as bits of the bucket number each level adds.
pub const DIGEST_LEVEL_BITS: [u8; 3] = [6, 6, 4];

/// The id of a store: its actor id. A wiped store gets a new one, never an old one.
pub type StoreId = ActorBytes;

/// Errors of the store. All but [`StoreError::Corrupt`] mean the disk failed: fatal.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// fjall failed to read, write or fsync.
    #[error("storage: {0}")]
    Fjall(#[from] fjall::Error),
    /// A stored value could not be decoded.
    #[error("corrupt {what} in the store: {reason}")]
    Corrupt {
        /// Which kind of value.
        what: &'static str,
        /// Why it could not be read.
        reason: String,
    },
}

/// One entry of a collection's change log: the changes a step added to one document.
///
/// A new entry of a document supersedes the document's earlier entries that every
/// peer sent them is sent it too: all of them if it is the agent's own (no origin),
/// else the one from the same store ([`supersede`]). Once the superseding entry is
/// trimmed of its bytes, so that it reads as the whole document, the superseded
/// ones are removed: a record updated a thousand times keeps the newest few
/// entries and one, not a thousand.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LogEntry {
    /// The document the changes belong to.
    pub doc: [u8; 16],
    /// Automerge change bytes, in causal order. Stored apart (the `log_raw`
    /// keyspace) and dropped once the entry is older than the newest
    /// [`LOG_RAW_KEEP`], or never stored for a document's first changes (the
    /// document is stored as just those): [`StoreReader::log_from`] then reads the
    /// document's (and leaves it empty when an earlier entry of the same read and
    /// origin carries them).
    pub changes: Vec<Vec<u8>>,
    /// The store these changes were learned from, if they came from a peer; they are
    /// not sent back to it.
    pub origin: Option<StoreId>,
}

/// What one pass of [`Store::compact_docs`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DocCompaction {
    /// Documents saved again as one, smaller.
    pub rewritten: usize,
    /// Bytes they shrank by, in all (before fjall's own compression).
    pub bytes_saved: u64,
    /// Where the next pass goes on (`None`: this one reached the last document).
    pub next: Option<DocId>,
}

/// A record set aside because it could not be synced, with the reason.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeadLetter {
    /// The tool (connector) the record came from or was bound for.
    pub tool: String,
    /// The collection of the record.
    pub collection: String,
    /// The record's key.
    pub key: String,
    /// Why it was set aside.
    pub reason: LetterReason,
    /// The document a write-back was for; `None` for a row that could not be
    /// captured (it is read again when the tool changes it).
    pub doc: Option<[u8; 16]>,
    /// Write-backs refused so far.
    pub attempts: u32,
    /// When the write-back is tried again (ms since the epoch); `None` once the
    /// retries ran out, or for a captured row: then only a person retries it.
    pub retry_at_ms: Option<i64>,
    /// When the record was first set aside (ms since the epoch).
    pub since_ms: i64,
}

/// A same-field conflict that waits for a person: the field's policy is `manual`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OpenConflict {
    /// The collection.
    pub collection: String,
    /// The record's document.
    pub doc: [u8; 16],
    /// The field.
    pub field: String,
    /// The concurrent values, with where each came from.
    pub candidates: Vec<ConflictValue>,
    /// The candidate the tools hold meanwhile (the latest edit).
    pub interim: usize,
}

/// One of the values of a conflict.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ConflictValue {
    /// The value.
    pub value: crdt_model::Value,
    /// The agent whose tool gave it.
    pub agent: String,
    /// The tool that gave it (empty: a person).
    pub tool: String,
    /// When it was edited (ms since the epoch).
    pub time_ms: i64,
}

/// A delete captured from a tool whose deletes are held: the record stays alive
/// everywhere else until a person approves or rejects the delete.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HeldDelete {
    /// The tool the record was deleted from.
    pub tool: String,
    /// The collection.
    pub collection: String,
    /// The record's key in the tool.
    pub key: String,
    /// The record's document.
    pub doc: [u8; 16],
    /// When the delete was captured (ms since the epoch).
    pub time_ms: i64,
}

/// A record whose natural key another record of the same tool also has: it was not
/// matched to the record other tools hold under that key, and syncs as a record of
/// its own until a person resolves it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ambiguous {
    /// The tool holding both records.
    pub tool: String,
    /// The collection.
    pub collection: String,
    /// The record's key in the tool.
    pub key: String,
    /// The normalised natural key the records share.
    pub natural_key: String,
    /// The keys of the tool's other records with that natural key.
    pub others: Vec<String>,
}

/// Why a record became a dead letter, by kind.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum LetterReason {
    /// The tool's row holds a value that does not fit its column.
    #[error("{0}")]
    InvalidRow(connectors::InvalidValue),
    /// The tool refused the write-back.
    #[error("{0}")]
    Rejected(connectors::Rejection),
    /// The mapping cannot convert a value between the tool and the document.
    #[error("{0}")]
    Mapping(crate::mapping::MappingError),
    /// The record has no key this tool can use: it was created under tool ids and
    /// the tool's collection uses a shared key, or the tool did not return the key it
    /// assigned.
    #[error(
        "the record has no key this tool can use (created under tool ids elsewhere, or the tool did not return the key it assigned)"
    )]
    NoKey,
}

/// A document set aside because a peer's change made it unreadable: the change was
/// refused and the peer's session closed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Quarantined {
    /// The collection the peer sent it in.
    pub collection: String,
    /// The document.
    pub doc: [u8; 16],
    /// The peer store the change came from, if a peer sent it.
    pub peer: Option<StoreId>,
    /// What was wrong.
    pub reason: String,
}

struct CachedDoc {
    doc: RecordDoc,
    /// The value stored for this document: its head ([`doc_head`]), then its
    /// bytes. Empty for a document never stored.
    stored: Vec<u8>,
    /// The document's standing log entries, as its head names them.
    standing: Vec<Standing>,
    /// How many change chunks were appended to `stored` since the last whole save.
    appends: u32,
    /// Whether `stored` holds a live record (created and not deleted).
    alive: bool,
    /// The heads digest of `stored` (0: nothing stored), which the `digests`
    /// keyspace holds for it too: a document is staged with its digest in one batch,
    /// always under its own collection. Known here, a change needs no read of it.
    digest: u64,
}

/// The first byte of a document's value in `docs`: its head follows (a saved
/// document or change chunk, as stored before heads were, starts with Automerge's
/// magic bytes instead).
const DOC_HEAD_TAG: u8 = 1;
/// Standing entries a head names at most: past it the oldest is no longer named,
/// and so stays in the log for good (safe, only not reclaimed). One per peer store
/// that changed the document since the agent last did, so rarely more than two.
const DOC_STANDING_MAX: usize = 8;

/// A log entry of a document that no later entry stands for yet.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
struct Standing {
    seq: u64,
    /// The store its changes came from (`None`: the agent's own).
    origin: Option<StoreId>,
}

/// The head a document's value in `docs` starts with: [`DOC_HEAD_TAG`], then the
/// document's standing entries, oldest first (postcard: a count, then each seq as
/// a varint and its origin as an option). A change's entry learns from it, with no
/// read, which entries it supersedes ([`LogEntry`]). Six bytes for a document
/// whose newest entry is the agent's own, below seq 2^21.
fn doc_head(standing: &[Standing]) -> Vec<u8> {
    postcard::to_extend(standing, vec![DOC_HEAD_TAG]).expect("in-memory values always encode")
}

/// A stored document's value split into the standing entries its head names and
/// the document's bytes. A value with no head (stored before heads were), or one
/// whose head does not parse, is all document and names none.
fn split_doc_value(value: &[u8]) -> (Vec<Standing>, &[u8]) {
    value
        .strip_prefix(&[DOC_HEAD_TAG])
        .and_then(|rest| postcard::take_from_bytes::<Vec<Standing>>(rest).ok())
        .unwrap_or((Vec::new(), value))
}

/// A stored document's bytes, without its head.
fn doc_bytes(value: &[u8]) -> &[u8] {
    split_doc_value(value).1
}

/// The entries a new entry from `origin` supersedes among a document's `standing`
/// ones, which it leaves as they are after it (`seq`): every one if it is the
/// agent's own, sent to every peer; else the one from the same store, which the
/// same sessions skip. An entry from a peer never stands for one of another origin:
/// some peer is sent that one and not this.
fn supersede(standing: &mut Vec<Standing>, seq: u64, origin: Option<StoreId>) -> Vec<u64> {
    let mut superseded = Vec::new();
    standing.retain(|entry| {
        let goes = origin.is_none() || entry.origin == origin;
        if goes {
            superseded.push(entry.seq);
        }
        !goes
    });
    if standing.len() == DOC_STANDING_MAX {
        standing.remove(0);
    }
    standing.push(Standing { seq, origin });
    superseded
}

/// What `log_raw` holds for an entry: its change bytes, and the entries it
/// supersedes, removed with these bytes.
#[derive(Serialize, Deserialize)]
struct RawEntry {
    changes: Vec<Vec<u8>>,
    supersedes: Vec<u64>,
}

/// [`RawEntry`] read for what it supersedes, its change bytes not copied.
#[derive(Deserialize)]
struct RawEntryRef<'a> {
    #[serde(borrow)]
    _changes: Vec<&'a [u8]>,
    supersedes: Vec<u64>,
}

/// An entry's value in `log_raw`; one stored before entries superseded others holds
/// the change bytes alone (and so always fails to read as a [`RawEntry`], which
/// ends with what it supersedes).
fn decode_raw(bytes: &[u8]) -> Result<RawEntry, StoreError> {
    match postcard::from_bytes::<RawEntry>(bytes) {
        Ok(raw) => Ok(raw),
        Err(_) => Ok(RawEntry {
            changes: decode(bytes, "log entry's changes")?,
            supersedes: Vec::new(),
        }),
    }
}

/// The heads digest of `doc`, as stored under `id`.
fn digest_of(id: DocId, doc: &mut RecordDoc) -> u64 {
    let mut heads = doc.heads();
    heads.sort();
    heads_digest(id, &heads)
}

/// Whether `doc` holds a live record: created and not deleted.
fn alive(doc: &RecordDoc) -> bool {
    !doc.is_empty() && !doc.is_deleted().unwrap_or(false)
}

/// The agent's store. One writer (the core) changes it; readers share its keyspaces.
pub struct Store {
    db: Database,
    docs: Keyspace,
    log: Keyspace,
    /// The change bytes of the newest [`LOG_RAW_KEEP`] log entries, by log key.
    log_raw: Keyspace,
    ext: Keyspace,
    links: Keyspace,
    shadow: Keyspace,
    cursors: Keyspace,
    pending: Keyspace,
    dead: Keyspace,
    digests: Keyspace,
    quarantine: Keyspace,
    ambiguous: Keyspace,
    conflicts: Keyspace,
    held: Keyspace,
    /// Per collection, the XOR of heads digests in each bucket (built on first use).
    buckets: HashMap<String, Vec<u64>>,
    actor: StoreId,
    cache: LruCache<DocId, CachedDoc>,
    /// What each document read as when a peer's change made it pending, until the
    /// document is touched again: planning its write-back then needs no load of a
    /// document the cache evicted meanwhile (loading it again took half the
    /// receiving core when write-backs fell behind a first sync).
    reads: LruCache<DocId, RecordState>,
    /// Next sequence number of each collection's log.
    log_next: HashMap<String, u64>,
    /// Per collection, the seqs of the entries whose change bytes `log_raw` holds,
    /// oldest first (read from it on first use): only those are removed once older
    /// than the newest kept, so a document's first entry, which has none, costs no
    /// tombstone. Each with the entries it supersedes, removed with its bytes. At
    /// most [`LOG_RAW_KEEP`] seqs and a batch's.
    raw_seqs: HashMap<String, VecDeque<(u64, Vec<u64>)>>,
    /// Live records per collection, counting the open batch (committed in
    /// `cursors` under [`records_counter`]); read from disk on first use.
    records: HashMap<String, u64>,
    /// What the open batch staged, so that later steps of the same group commit
    /// read it (Architecture Invariant: staged state is visible to the rest of the
    /// batch).
    staged: Staged,
    /// Log entries of each collection that keep their change bytes.
    log_raw_keep: u64,
}

/// The state the open batch staged, read before the committed state.
#[derive(Default)]
struct Staged {
    /// The documents staged.
    doc_ids: HashSet<DocId>,
    /// The staged bytes of staged documents evicted from the cache before the
    /// commit: such a document reloads from here, never from its stale bytes on disk.
    docs: HashMap<DocId, Vec<u8>>,
    /// Shadows staged, encoded, by shadow key (`None`: removed).
    shadows: HashMap<Vec<u8>, Option<Vec<u8>>>,
    /// Cursors staged.
    cursors: HashMap<String, u64>,
    /// Heads digests staged.
    digests: HashMap<(String, DocId), u64>,
    /// Links from a tool's record to its document staged, by `ext` key (`None`:
    /// removed).
    ext: HashMap<Vec<u8>, Option<DocId>>,
    /// Links from a document to a tool's record staged, by `links` key (`None`:
    /// removed).
    links: HashMap<Vec<u8>, Option<String>>,
    /// Collections whose record count changed.
    records: HashSet<String>,
    /// The first log seq of each collection this batch appended.
    log_first: HashMap<String, u64>,
}

impl Staged {
    fn is_empty(&self) -> bool {
        self.doc_ids.is_empty()
            && self.shadows.is_empty()
            && self.cursors.is_empty()
            && self.digests.is_empty()
            && self.ext.is_empty()
            && self.links.is_empty()
            && self.records.is_empty()
    }
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("actor", &hex(&self.actor))
            .finish_non_exhaustive()
    }
}

/// Read access to the store for other tasks (log and cursor reads), without the cache.
#[derive(Clone)]
pub struct StoreReader {
    db: Database,
    log: Keyspace,
    log_raw: Keyspace,
    digests: Keyspace,
    cursors: Keyspace,
    shadow: Keyspace,
    dead: Keyspace,
    docs: Keyspace,
    pending: Keyspace,
    quarantine: Keyspace,
    ambiguous: Keyspace,
    conflicts: Keyspace,
    held: Keyspace,
    ext: Keyspace,
}

impl std::fmt::Debug for StoreReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoreReader").finish_non_exhaustive()
    }
}

/// The writes of one step, committed atomically with fsync by [`Store::commit`].
pub struct Batch {
    inner: fjall::OwnedWriteBatch,
    /// Log entries appended, as (collection, seq), to announce after the commit.
    pub appended: Vec<(String, u64)>,
    /// Writes of a peer cursor or an anti-entropy mark (`stage_cursor`): a batch of
    /// nothing else stores no change, so it is committed without its own fsync.
    cursor_writes: usize,
}

impl std::fmt::Debug for Batch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Batch")
            .field("len", &self.inner.len())
            .finish()
    }
}

impl Store {
    /// Opens (or creates) the store in `dir`. A new store draws a fresh random actor id.
    pub fn open(dir: &Path) -> Result<Store, StoreError> {
        Store::open_with(dir, random_actor)
    }

    /// Opens (or creates) the store in `dir`; a new store takes its actor id from
    /// `new_actor` (a simulation passes a seeded source, so a run replays exactly).
    pub fn open_with(dir: &Path, new_actor: impl FnOnce() -> StoreId) -> Result<Store, StoreError> {
        let db = Database::builder(dir)
            .cache_size(STORE_CACHE_BYTES_MAX)
            .max_journaling_size(STORE_JOURNAL_BYTES_MAX)
            .open()?;
        // Filters and indexes stay in memory at every level (about 2 bytes a key):
        // a lookup of a key that is not there, which every new record makes, then
        // reads no block, where the block cache would have lost them to data blocks.
        let options = || {
            KeyspaceCreateOptions::default()
                .max_memtable_size(STORE_MEMTABLE_BYTES_MAX)
                .filter_block_pinning_policy(PinningPolicy::all(true))
                .index_block_pinning_policy(PinningPolicy::all(true))
        };
        let open = |name: &str| db.keyspace(name, options);
        let meta = open("meta")?;
        let actor = match meta.get("actor")? {
            Some(bytes) => <StoreId>::try_from(&bytes[..]).map_err(|_| StoreError::Corrupt {
                what: "actor id",
                reason: format!("{} bytes instead of 16", bytes.len()),
            })?,
            None => {
                let actor = new_actor();
                meta.insert("actor", actor.to_vec())?;
                db.persist(PersistMode::SyncAll)?;
                actor
            }
        };
        let store = Store {
            docs: open("docs")?,
            log: open("log")?,
            log_raw: open("log_raw")?,
            ext: open("ext")?,
            links: open("links")?,
            shadow: open("shadow")?,
            cursors: open("cursors")?,
            pending: open("pending")?,
            dead: open("dead")?,
            digests: open("digests")?,
            quarantine: open("quarantine")?,
            ambiguous: open("ambiguous")?,
            conflicts: open("conflicts")?,
            held: open("held")?,
            buckets: HashMap::new(),
            db,
            actor,
            cache: LruCache::new(NonZeroUsize::new(DOC_CACHE_MAX).expect("DOC_CACHE_MAX > 0")),
            reads: LruCache::new(NonZeroUsize::new(READ_CACHE_MAX).expect("READ_CACHE_MAX > 0")),
            log_next: HashMap::new(),
            raw_seqs: HashMap::new(),
            records: HashMap::new(),
            staged: Staged::default(),
            log_raw_keep: LOG_RAW_KEEP,
        };
        Ok(store)
    }

    /// Bounds the document cache at `docs` documents (at least one). The simulator
    /// shrinks it so that small workloads reach what large ones do.
    pub fn set_doc_cache_max(&mut self, docs: usize) {
        self.cache
            .resize(NonZeroUsize::new(docs.max(1)).expect("at least one"));
    }

    /// Keeps the change bytes of only the newest `entries` log entries of each
    /// collection (at least one). The simulator shrinks it so that peers read
    /// entries without their bytes.
    pub fn set_log_raw_keep(&mut self, entries: u64) {
        self.log_raw_keep = entries.max(1);
    }

    /// The heads digest of document `id` of `collection`, as committed.
    #[cfg(test)]
    pub fn committed_digest(&self, collection: &str, id: DocId) -> Result<u64, StoreError> {
        committed_digest(&self.digests, collection, id)
    }

    /// The bytes stored for document `id`, as committed, without their head.
    #[cfg(test)]
    pub fn stored_doc(&self, id: DocId) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self.docs.get(id.0)?.map(|value| doc_bytes(&value).to_vec()))
    }

    /// Stores `bytes` as document `id`, as a damaged disk might have left them (with
    /// no head).
    #[cfg(test)]
    pub fn put_stored_doc(&self, id: DocId, bytes: &[u8]) -> Result<(), StoreError> {
        Ok(self.docs.insert(id.0, bytes)?)
    }

    /// The seqs of `collection`'s log entries whose change bytes are kept, as
    /// committed.
    #[cfg(test)]
    pub fn kept_raw_seqs(&self, collection: &str) -> Result<Vec<u64>, StoreError> {
        let mut fresh = HashMap::new();
        Ok(raw_seqs_of(&mut fresh, &self.log_raw, collection)?
            .iter()
            .map(|(seq, _)| *seq)
            .collect())
    }

    /// This store's actor id, which also names it to peers.
    pub fn actor(&self) -> StoreId {
        self.actor
    }

    /// Saves every document of many chunks again as one ([`Store::compact_docs`]),
    /// flushes every keyspace's memtable and compacts each into its last level, as
    /// the agent's idle passes and fjall's background compaction would in time;
    /// returns each keyspace's name and disk space after it, in bytes. For measuring
    /// what a record costs on disk.
    pub fn compact(&mut self) -> Result<Vec<(&'static str, u64)>, StoreError> {
        let mut from = None;
        loop {
            from = self
                .compact_docs(from, DOC_COMPACT_SCAN_MAX, DOC_COMPACT_SCAN_MAX)?
                .next;
            if from.is_none() {
                break;
            }
        }
        self.flush()?;
        let mut sizes = Vec::new();
        for (name, keyspace) in self.keyspaces() {
            keyspace.major_compact()?;
            sizes.push((name, keyspace.disk_space()));
        }
        Ok(sizes)
    }

    /// Saves stored documents of at least [`DOC_COMPACT_CHUNKS_MIN`] chunks again
    /// as one document each where that is smaller, looking at up to `scan_max`
    /// documents from `from` on and rewriting at most `rewrite_max`; commits what it
    /// rewrote (one batch of its own, so that nothing else of a step shares it).
    /// Documents in the cache are skipped: they are in use, and their next save
    /// comes with their next change. Their history, heads and digests stay as they
    /// were.
    pub fn compact_docs(
        &mut self,
        from: Option<DocId>,
        scan_max: usize,
        rewrite_max: usize,
    ) -> Result<DocCompaction, StoreError> {
        let start = from.map(|id| id.0).unwrap_or_default();
        let mut rewritten = Vec::new();
        let (mut scanned, mut next) = (0usize, None);
        for guard in self.docs.range(start..) {
            let (key, value) = guard.into_inner()?;
            let id = DocId(
                <[u8; 16]>::try_from(&key[..]).map_err(|_| StoreError::Corrupt {
                    what: "document id",
                    reason: format!("{} bytes instead of 16", key.len()),
                })?,
            );
            if scanned == scan_max || rewritten.len() == rewrite_max {
                next = Some(id);
                break;
            }
            scanned += 1;
            let bytes = doc_bytes(&value);
            if RecordDoc::stored_chunks(bytes) < DOC_COMPACT_CHUNKS_MIN || self.cache.contains(&id)
            {
                continue;
            }
            // A document that does not load is left as it is: reading it quarantines
            // it, as anywhere else.
            match RecordDoc::compact_stored(bytes) {
                Ok(Some(saved)) => {
                    let head = &value[..value.len() - bytes.len()];
                    rewritten.push((id, bytes.len() - saved.len(), [head, &saved].concat()))
                }
                Ok(None) => {}
                Err(e) => {
                    tracing::warn!(doc = %id, "left a document that does not load uncompacted: {e}")
                }
            }
        }
        let compaction = DocCompaction {
            rewritten: rewritten.len(),
            bytes_saved: rewritten.iter().map(|(_, saved, _)| *saved as u64).sum(),
            next,
        };
        if !rewritten.is_empty() {
            let mut batch = self.batch();
            for (id, _, saved) in rewritten {
                batch.inner.insert(&self.docs, id.0, saved);
            }
            self.commit(batch)?;
        }
        Ok(compaction)
    }

    /// Writes every keyspace's memtable out to disk and waits for it, so that the
    /// next open has no journal to replay.
    pub fn flush(&self) -> Result<(), StoreError> {
        for (_, keyspace) in self.keyspaces() {
            keyspace.rotate_memtable_and_wait()?;
        }
        Ok(())
    }

    /// Every keyspace with its name.
    fn keyspaces(&self) -> [(&'static str, &Keyspace); 14] {
        [
            ("docs", &self.docs),
            ("log", &self.log),
            ("log_raw", &self.log_raw),
            ("ext", &self.ext),
            ("links", &self.links),
            ("shadow", &self.shadow),
            ("cursors", &self.cursors),
            ("pending", &self.pending),
            ("dead", &self.dead),
            ("digests", &self.digests),
            ("quarantine", &self.quarantine),
            ("ambiguous", &self.ambiguous),
            ("conflicts", &self.conflicts),
            ("held", &self.held),
        ]
    }

    /// A read handle for other tasks.
    pub fn reader(&self) -> StoreReader {
        StoreReader {
            db: self.db.clone(),
            log: self.log.clone(),
            log_raw: self.log_raw.clone(),
            digests: self.digests.clone(),
            cursors: self.cursors.clone(),
            shadow: self.shadow.clone(),
            dead: self.dead.clone(),
            docs: self.docs.clone(),
            pending: self.pending.clone(),
            quarantine: self.quarantine.clone(),
            ambiguous: self.ambiguous.clone(),
            conflicts: self.conflicts.clone(),
            held: self.held.clone(),
            ext: self.ext.clone(),
        }
    }

    /// Starts a batch of writes. One batch is open at a time: the store's single
    /// writer commits it before starting the next (a batch left open is discarded).
    pub fn batch(&mut self) -> Batch {
        debug_assert!(self.staged.is_empty(), "a batch was left open");
        if !self.staged.is_empty() {
            self.discard_staged();
        }
        Batch {
            inner: self.db.batch().durability(Some(PersistMode::SyncAll)),
            appended: Vec::new(),
            cursor_writes: 0,
        }
    }

    /// Commits `batch` atomically and fsyncs it; returns the log entries it appended.
    pub fn commit(&mut self, mut batch: Batch) -> Result<Vec<(String, u64)>, StoreError> {
        for collection in &self.staged.records {
            let count = self.records.get(collection).copied().unwrap_or_default();
            batch.inner.insert(
                &self.cursors,
                records_counter(collection),
                count.to_be_bytes().to_vec(),
            );
        }
        if batch.inner.len() == batch.cursor_writes {
            // Only cursors moved (a peer's entries that were all known already, as
            // in a mesh where every change arrives from every peer): nothing stored
            // depends on them: a cursor lost in a crash only brings entries again,
            // which apply as nothing, and a lost mark only walks digests again.
            // The next fsynced batch persists them.
            batch.inner = batch.inner.durability(None);
        }
        if !batch.inner.is_empty() {
            batch.inner.commit()?;
        }
        self.staged = Staged::default();
        Ok(batch.appended)
    }

    fn discard_staged(&mut self) {
        let staged = std::mem::take(&mut self.staged);
        if staged.is_empty() {
            return;
        }
        for id in staged.doc_ids {
            self.cache.pop(&id);
            self.reads.pop(&id);
        }
        // Log seqs, bucket digests and record counts moved with what was staged:
        // rebuild them from disk.
        self.log_next.clear();
        self.raw_seqs.clear();
        self.buckets.clear();
        self.records.clear();
    }

    /// Loads the document `id` into the cache (creating an empty one if unknown) and
    /// returns it. The caller may change it, so the read remembered for it is
    /// dropped.
    pub fn doc(&mut self, id: DocId) -> Result<&mut RecordDoc, StoreError> {
        self.reads.pop(&id);
        self.cached(id).map(|cached| &mut cached.doc)
    }

    /// Remembers what document `id` reads as now, for [`Store::remembered_read`],
    /// until the document is next handed out by [`Store::doc`].
    pub fn remember_read(&mut self, id: DocId, state: RecordState) {
        self.reads.put(id, state);
    }

    /// What document `id` read as when remembered, if it was not handed out since;
    /// given away, not copied (a second tool planning the same document loads it).
    pub fn remembered_read(&mut self, id: DocId) -> Option<RecordState> {
        self.reads.pop(&id)
    }

    /// Whether the store holds the document `id`.
    pub fn has_doc(&self, id: DocId) -> Result<bool, StoreError> {
        Ok(self.cache.contains(&id)
            || self.staged.doc_ids.contains(&id)
            || self.docs.contains_key(id.0)?)
    }

    fn cached(&mut self, id: DocId) -> Result<&mut CachedDoc, StoreError> {
        if !self.cache.contains(&id) {
            let bytes = match self.staged.docs.remove(&id) {
                Some(staged) => Some(fjall::Slice::from(staged)),
                None => self.docs.get(id.0)?,
            };
            let entry = match bytes {
                Some(value) => {
                    let (standing, bytes) = split_doc_value(&value);
                    let mut doc =
                        RecordDoc::load(bytes, &self.actor).map_err(|e| StoreError::Corrupt {
                            what: "document",
                            reason: format!("{id}: {e}"),
                        })?;
                    // Changes held in one line are the stored bytes, chunk by chunk.
                    // Otherwise how many were appended is not known: compact soon.
                    let appends = match doc.held_changes() {
                        Some(held) => u32::try_from(held - 1).unwrap_or(DOC_APPENDS_MAX),
                        None => DOC_APPENDS_MAX - DOC_APPENDS_AFTER_LOAD_MAX,
                    };
                    CachedDoc {
                        alive: alive(&doc),
                        digest: digest_of(id, &mut doc),
                        doc,
                        stored: value.to_vec(),
                        standing,
                        appends,
                    }
                }
                None => CachedDoc {
                    doc: RecordDoc::new(&self.actor),
                    stored: Vec::new(),
                    standing: Vec::new(),
                    appends: 0,
                    alive: false,
                    digest: 0,
                },
            };
            if let Some((evicted, old)) = self.cache.push(id, entry)
                && evicted != id
                && self.staged.doc_ids.contains(&evicted)
            {
                // Staged and not committed: keep its bytes (moved, not copied).
                self.staged.docs.insert(evicted, old.stored);
            }
        }
        Ok(self.cache.get_mut(&id).expect("just inserted"))
    }

    /// Stages the document `id` (already changed in the cache by `changes`) and a log
    /// entry for the changes.
    pub fn stage_doc(
        &mut self,
        batch: &mut Batch,
        id: DocId,
        collection: &str,
        changes: Vec<Vec<u8>>,
        origin: Option<StoreId>,
    ) -> Result<(), StoreError> {
        let docs = self.docs.clone();
        let seq = self.next_seq(collection)?;
        // Staged before it changes, so that a batch given up drops the cached copy.
        self.staged.doc_ids.insert(id);
        let cached = self.cached(id)?;
        // A new document is stored as exactly these changes: the entry is read as
        // its document's, with no copy of its own.
        let first = cached.stored.is_empty();
        let supersedes = supersede(&mut cached.standing, seq, origin);
        let head = doc_head(&cached.standing);
        if cached.appends >= DOC_APPENDS_MAX {
            cached.stored = head;
            cached.stored.extend_from_slice(&cached.doc.save());
            cached.appends = 0;
        } else {
            // The head it had (none for a value stored before heads were).
            let old_head = cached.stored.len() - doc_bytes(&cached.stored).len();
            cached.stored.splice(..old_head, head);
            for change in &changes {
                cached.stored.extend_from_slice(change);
            }
            cached.appends += 1;
        }
        batch.inner.insert(&docs, id.0, cached.stored.as_slice());
        let digest = digest_of(id, &mut cached.doc);
        let old_digest = std::mem::replace(&mut cached.digest, digest);
        let now_alive = alive(&cached.doc);
        let was_alive = std::mem::replace(&mut cached.alive, now_alive);
        if now_alive != was_alive {
            self.count_record(collection, now_alive)?;
        }
        self.stage_digest(batch, collection, id, old_digest, digest)?;
        let first_staged = *self
            .staged
            .log_first
            .entry(collection.to_owned())
            .or_insert(seq);
        let key = log_key(collection, seq);
        let raw_seqs = raw_seqs_of(&mut self.raw_seqs, &self.log_raw, collection)?;
        if !first {
            let raw = RawEntry {
                changes,
                supersedes,
            };
            batch.inner.insert(&self.log_raw, key.clone(), encode(&raw));
            raw_seqs.push_back((seq, raw.supersedes));
        }
        let entry = LogEntry {
            doc: id.0,
            changes: Vec::new(),
            origin,
        };
        batch.inner.insert(&self.log, key, encode(&entry));
        batch.appended.push((collection.to_owned(), seq));
        // The change bytes of entries that fall out of the newest kept go; their
        // documents hold them too. Removed without reading them (reading each back
        // to rewrite it was 4% of a first sync). One staged in this batch waits for
        // a later one. An entry read as its document from now on stands for the
        // entry it supersedes, which goes (trimmed before it, or never kept).
        if let Some(old) = seq.checked_sub(self.log_raw_keep) {
            while let Some((front, _)) = raw_seqs.front()
                && *front <= old
                && *front < first_staged
            {
                let (front, superseded) = raw_seqs.pop_front().expect("just seen");
                batch
                    .inner
                    .remove(&self.log_raw, log_key(collection, front));
                for seq in superseded {
                    batch.inner.remove(&self.log, log_key(collection, seq));
                }
            }
        }
        Ok(())
    }

    /// A record of `collection` came alive (`true`) or was deleted.
    fn count_record(&mut self, collection: &str, alive: bool) -> Result<(), StoreError> {
        let count = self.records(collection)?;
        let count = if alive {
            count + 1
        } else {
            count.saturating_sub(1)
        };
        self.records.insert(collection.to_owned(), count);
        self.staged.records.insert(collection.to_owned());
        Ok(())
    }

    /// Live records of `collection` (created and not deleted), counting the open batch.
    pub fn records(&mut self, collection: &str) -> Result<u64, StoreError> {
        if let Some(count) = self.records.get(collection) {
            return Ok(*count);
        }
        let count = committed_cursor(&self.cursors, &records_counter(collection))?;
        self.records.insert(collection.to_owned(), count);
        Ok(count)
    }

    /// Counts the live records of `collection` by reading every document, for a store
    /// written before record counts were kept. Returns the count (and keeps it).
    pub fn recount_records(&mut self, collection: &str) -> Result<u64, StoreError> {
        if self.cursors.contains_key(records_counter(collection))?
            || committed_log_head(&self.log, collection)? == 0
        {
            return self.records(collection);
        }
        let prefix = log_prefix(collection);
        let mut count = 0u64;
        for guard in self.digests.prefix(&prefix) {
            let key = guard.key()?;
            let Ok(id) = <[u8; 16]>::try_from(&key[prefix.len()..]) else {
                continue;
            };
            if let Some(value) = self.docs.get(id)?
                && RecordDoc::load(doc_bytes(&value), &self.actor).is_ok_and(|doc| alive(&doc))
            {
                count += 1;
            }
        }
        self.cursors
            .insert(records_counter(collection), count.to_be_bytes().to_vec())?;
        self.records.insert(collection.to_owned(), count);
        Ok(count)
    }

    fn next_seq(&mut self, collection: &str) -> Result<u64, StoreError> {
        let next = match self.log_next.get(collection) {
            Some(next) => *next,
            None => committed_log_head(&self.log, collection)? + 1,
        };
        self.log_next.insert(collection.to_owned(), next + 1);
        Ok(next)
    }

    /// Stages the record `tool` is now known to hold (or `None`: it holds none).
    pub fn stage_shadow(
        &mut self,
        batch: &mut Batch,
        tool: &str,
        collection: &str,
        key: &str,
        record: Option<&Record>,
    ) {
        let k = record_key(tool, collection, key);
        let bytes = record.map(encode);
        match &bytes {
            Some(bytes) => batch
                .inner
                .insert(&self.shadow, k.clone(), bytes.as_slice()),
            None => batch.inner.remove(&self.shadow, k.clone()),
        }
        self.staged.shadows.insert(k, bytes);
    }

    /// The record `tool` is known to hold, if any, counting what the open batch staged.
    pub fn shadow(
        &self,
        tool: &str,
        collection: &str,
        key: &str,
    ) -> Result<Option<Record>, StoreError> {
        let k = record_key(tool, collection, key);
        match self.staged.shadows.get(&k) {
            Some(Some(bytes)) => Ok(Some(decode(bytes, "shadow record")?)),
            Some(None) => Ok(None),
            None => committed_shadow(&self.shadow, k),
        }
    }

    /// A cursor's value (0 if never set), counting what the open batch staged.
    pub fn cursor(&self, name: &str) -> Result<u64, StoreError> {
        match self.staged.cursors.get(name) {
            Some(value) => Ok(*value),
            None => committed_cursor(&self.cursors, name),
        }
    }

    /// Stages the link between the record `external` of `collection` in `tool` and
    /// document `id`, both ways: the `ext` index (record to document) and the
    /// `links` index (document to record).
    pub fn stage_link(
        &mut self,
        batch: &mut Batch,
        tool: &str,
        collection: &str,
        external: &str,
        id: DocId,
    ) -> Result<(), StoreError> {
        // A key the tool gives out again (a reused rowid) was linked to another
        // record: that record no longer names a row of this tool.
        if let Some(other) = self.linked_doc(tool, collection, external)?
            && other != id
        {
            self.stage_unlink_doc(batch, tool, other);
        }
        let k = record_key(tool, collection, external);
        batch.inner.insert(&self.ext, k.clone(), id.0.to_vec());
        self.staged.ext.insert(k, Some(id));
        let k = link_key(tool, id);
        batch
            .inner
            .insert(&self.links, k.clone(), external.as_bytes().to_vec());
        self.staged.links.insert(k, Some(external.to_owned()));
        Ok(())
    }

    /// Stages that the record `external` of `collection` in `tool` is linked to no
    /// document any more (its key changed).
    pub fn stage_unlink_record(
        &mut self,
        batch: &mut Batch,
        tool: &str,
        collection: &str,
        external: &str,
    ) {
        let k = record_key(tool, collection, external);
        batch.inner.remove(&self.ext, k.clone());
        self.staged.ext.insert(k, None);
    }

    /// Stages that document `id` is linked to no record of `tool` any more (the
    /// record was linked to a new document).
    pub fn stage_unlink_doc(&mut self, batch: &mut Batch, tool: &str, id: DocId) {
        let k = link_key(tool, id);
        batch.inner.remove(&self.links, k.clone());
        self.staged.links.insert(k, None);
    }

    /// The document the record `external` of `collection` in `tool` is linked to,
    /// counting what the open batch staged.
    pub fn linked_doc(
        &self,
        tool: &str,
        collection: &str,
        external: &str,
    ) -> Result<Option<DocId>, StoreError> {
        let k = record_key(tool, collection, external);
        if let Some(id) = self.staged.ext.get(&k) {
            return Ok(*id);
        }
        match self.ext.get(&k)? {
            Some(bytes) => Ok(Some(DocId(<[u8; 16]>::try_from(&bytes[..]).map_err(
                |_| StoreError::Corrupt {
                    what: "linked doc id",
                    reason: format!("{} bytes", bytes.len()),
                },
            )?))),
            None => Ok(None),
        }
    }

    /// The key of the record of `tool` linked to document `id`, counting what the
    /// open batch staged.
    pub fn linked_key(&self, tool: &str, id: DocId) -> Result<Option<String>, StoreError> {
        let k = link_key(tool, id);
        if let Some(key) = self.staged.links.get(&k) {
            return Ok(key.clone());
        }
        match self.links.get(&k)? {
            Some(bytes) => Ok(Some(String::from_utf8(bytes.to_vec()).map_err(|_| {
                StoreError::Corrupt {
                    what: "linked record key",
                    reason: "not UTF-8".to_owned(),
                }
            })?)),
            None => Ok(None),
        }
    }

    /// Stages a cursor value.
    pub fn stage_cursor(&mut self, batch: &mut Batch, name: &str, value: u64) {
        batch
            .inner
            .insert(&self.cursors, name, value.to_be_bytes().to_vec());
        batch.cursor_writes += 1;
        self.staged.cursors.insert(name.to_owned(), value);
    }

    /// Marks or unmarks the document as awaiting write-back to `tool`.
    pub fn stage_pending(&self, batch: &mut Batch, tool: &str, id: DocId, pending: bool) {
        let k = pending_key(tool, id);
        if pending {
            batch.inner.insert(&self.pending, k, []);
        } else {
            batch.inner.remove(&self.pending, k);
        }
    }

    /// Moves pending marks written before marks were kept per tool (a bare doc id)
    /// to `tool`, the one tool such a store knew.
    pub fn migrate_pending(&self, tool: &str) -> Result<(), StoreError> {
        let old: Vec<DocId> = self
            .pending
            .iter()
            .filter_map(|guard| guard.key().ok())
            .filter_map(|key| <[u8; 16]>::try_from(&key[..]).ok().map(DocId))
            .collect();
        if old.is_empty() {
            return Ok(());
        }
        let mut batch = self.db.batch().durability(Some(PersistMode::SyncAll));
        for id in old {
            batch.remove(&self.pending, id.0);
            batch.insert(&self.pending, pending_key(tool, id), []);
        }
        batch.commit()?;
        Ok(())
    }

    /// Marks every document of `collections` as awaiting write-back to `tool`, once:
    /// a tool added to an agent whose store already holds records gets all of them.
    /// Later calls for the same (tool, collection) do nothing. Returns the documents
    /// marked.
    pub fn join_tool(&self, tool: &str, collections: &[&str]) -> Result<Vec<DocId>, StoreError> {
        let mut batch = self.db.batch().durability(Some(PersistMode::SyncAll));
        let mut marked = Vec::new();
        for collection in collections {
            let joined = format!("joined/{tool}/{collection}");
            if self.cursors.get(&joined)?.is_some() {
                continue;
            }
            let prefix = log_prefix(collection);
            for guard in self.digests.prefix(&prefix) {
                let key = guard.key()?;
                let id = <[u8; 16]>::try_from(&key[prefix.len()..]).map_err(|_| {
                    StoreError::Corrupt {
                        what: "digest key",
                        reason: format!("{} bytes", key.len()),
                    }
                })?;
                batch.insert(&self.pending, pending_key(tool, DocId(id)), []);
                marked.push(DocId(id));
            }
            batch.insert(&self.cursors, joined, 1u64.to_be_bytes().to_vec());
        }
        if !batch.is_empty() {
            batch.commit()?;
        }
        Ok(marked)
    }

    /// Stages `tool`'s capture cursor (the connector's opaque bytes).
    pub fn stage_tool_cursor(&self, batch: &mut Batch, tool: &str, cursor: &Cursor) {
        batch
            .inner
            .insert(&self.cursors, tool_cursor(tool), cursor.as_bytes().to_vec());
    }

    /// Stages a quarantined document.
    pub fn stage_quarantine(&self, batch: &mut Batch, quarantined: &Quarantined) {
        batch
            .inner
            .insert(&self.quarantine, quarantined.doc, encode(quarantined));
    }

    /// Stages the report of a record whose natural key is not unique in its tool.
    pub fn stage_ambiguous(&self, batch: &mut Batch, ambiguous: &Ambiguous) {
        let k = record_key(&ambiguous.tool, &ambiguous.collection, &ambiguous.key);
        batch.inner.insert(&self.ambiguous, k, encode(ambiguous));
    }

    /// Stages the open conflict of `field` in document `doc`, or clears it with `None`.
    pub fn stage_conflict(
        &self,
        batch: &mut Batch,
        doc: DocId,
        field: &str,
        conflict: Option<&OpenConflict>,
    ) {
        let k = conflict_key(doc, field);
        match conflict {
            Some(conflict) => batch.inner.insert(&self.conflicts, k, encode(conflict)),
            None => batch.inner.remove(&self.conflicts, k),
        }
    }

    /// Stages a held delete, or clears the one of this record with `None`.
    pub fn stage_held(
        &self,
        batch: &mut Batch,
        tool: &str,
        collection: &str,
        key: &str,
        held: Option<&HeldDelete>,
    ) {
        let k = record_key(tool, collection, key);
        match held {
            Some(held) => batch.inner.insert(&self.held, k, encode(held)),
            None => batch.inner.remove(&self.held, k),
        }
    }

    /// The dead letter of record `key` of `tool`, as committed.
    pub fn dead_letter(
        &self,
        tool: &str,
        collection: &str,
        key: &str,
    ) -> Result<Option<DeadLetter>, StoreError> {
        get_decoded(&self.dead, record_key(tool, collection, key), "dead letter")
    }

    /// The delete of record `key` of `tool` waiting for approval, as committed.
    pub fn held(
        &self,
        tool: &str,
        collection: &str,
        key: &str,
    ) -> Result<Option<HeldDelete>, StoreError> {
        get_decoded(&self.held, record_key(tool, collection, key), "held delete")
    }

    /// Stages a dead letter (or clears the one for this record with `None`).
    pub fn stage_dead_letter(
        &self,
        batch: &mut Batch,
        tool: &str,
        collection: &str,
        key: &str,
        letter: Option<&DeadLetter>,
    ) {
        let k = record_key(tool, collection, key);
        match letter {
            Some(letter) => batch.inner.insert(&self.dead, k, encode(letter)),
            None => batch.inner.remove(&self.dead, k),
        }
    }
}

impl StoreReader {
    /// The record `tool` is known to hold, if any.
    pub fn shadow(
        &self,
        tool: &str,
        collection: &str,
        key: &str,
    ) -> Result<Option<Record>, StoreError> {
        committed_shadow(&self.shadow, record_key(tool, collection, key))
    }

    /// All shadows of `tool` in `collection`, as (key, record).
    pub fn shadows(
        &self,
        tool: &str,
        collection: &str,
    ) -> Result<Vec<(String, Record)>, StoreError> {
        let prefix = record_key(tool, collection, "");
        let mut out = Vec::new();
        for guard in self.shadow.prefix(&prefix) {
            let (k, v) = guard.into_inner()?;
            let key = String::from_utf8_lossy(&k[prefix.len()..]).into_owned();
            out.push((key, decode(&v, "shadow record")?));
        }
        Ok(out)
    }

    /// A cursor's value, 0 if never set.
    pub fn cursor(&self, name: &str) -> Result<u64, StoreError> {
        committed_cursor(&self.cursors, name)
    }

    /// Up to `max` entries of `collection`'s log with seq ≥ `from`, in order.
    ///
    /// An entry trimmed of its bytes is read as its document's changes, as stored
    /// now: those include every later entry's, so a later trimmed entry of the same
    /// document and the same origin in this read is left empty (there is nothing
    /// more to send for it). Only of the same origin: a session skips the entries
    /// its peer sent, and an entry of another origin stands for changes that peer
    /// may lack.
    pub fn log_from(
        &self,
        collection: &str,
        from: u64,
        max: usize,
    ) -> Result<Vec<(u64, LogEntry)>, StoreError> {
        let prefix = log_prefix(collection);
        let mut out = Vec::new();
        let mut expanded = HashSet::new();
        let range = log_key(collection, from)..log_key(collection, u64::MAX);
        // One snapshot for all three keyspaces: the commit that trims an entry of
        // its bytes removes the entry it supersedes, and a read that saw the one but
        // not the other would send neither the superseded changes nor the document.
        let snapshot = self.db.snapshot();
        // The entries' change bytes where still kept: the newest entries, so a
        // second walk in step with the first.
        let mut raw = snapshot.range(&self.log_raw, range.clone());
        let mut next_raw = raw.next().map(|g| g.into_inner()).transpose()?;
        for guard in snapshot.range(&self.log, range).take(max) {
            let (k, v) = guard.into_inner()?;
            let mut entry: LogEntry = decode(&v, "log entry")?;
            while let Some((rk, _)) = &next_raw
                && *rk < k
            {
                next_raw = raw.next().map(|g| g.into_inner()).transpose()?;
            }
            if let Some((rk, rv)) = &next_raw
                && *rk == k
            {
                entry.changes = decode_raw(rv)?.changes;
                next_raw = raw.next().map(|g| g.into_inner()).transpose()?;
            }
            if entry.changes.is_empty()
                && expanded.insert((entry.doc, entry.origin))
                && let Some(stored) = snapshot.get(&self.docs, entry.doc)?
            {
                entry.changes = RecordDoc::stored_changes(doc_bytes(&stored)).map_err(|e| {
                    StoreError::Corrupt {
                        what: "document",
                        reason: format!("{}: {e}", DocId(entry.doc)),
                    }
                })?;
            }
            out.push((decode_seq(&k[prefix.len()..])?, entry));
        }
        Ok(out)
    }

    /// The highest seq in `collection`'s log, 0 if empty.
    pub fn log_head(&self, collection: &str) -> Result<u64, StoreError> {
        committed_log_head(&self.log, collection)
    }

    /// All dead letters.
    pub fn dead_letters(&self) -> Result<Vec<DeadLetter>, StoreError> {
        self.dead
            .iter()
            .map(|guard| decode(&guard.value()?, "dead letter"))
            .collect()
    }

    /// All conflicts waiting for a person, by document and field.
    pub fn conflicts(&self) -> Result<Vec<OpenConflict>, StoreError> {
        self.conflicts
            .iter()
            .map(|guard| decode(&guard.value()?, "open conflict"))
            .collect()
    }

    /// The open conflict of `field` in document `doc`, if any.
    pub fn conflict(&self, doc: DocId, field: &str) -> Result<Option<OpenConflict>, StoreError> {
        get_decoded(&self.conflicts, conflict_key(doc, field), "open conflict")
    }

    /// All deletes waiting for approval.
    pub fn held_deletes(&self) -> Result<Vec<HeldDelete>, StoreError> {
        self.held
            .iter()
            .map(|guard| decode(&guard.value()?, "held delete"))
            .collect()
    }

    /// The document the record `key` of `tool` is linked to, if any (committed).
    pub fn linked_doc(
        &self,
        tool: &str,
        collection: &str,
        key: &str,
    ) -> Result<Option<DocId>, StoreError> {
        match self.ext.get(record_key(tool, collection, key))? {
            Some(bytes) => Ok(<[u8; 16]>::try_from(&bytes[..]).ok().map(DocId)),
            None => Ok(None),
        }
    }

    /// All records whose natural key is not unique in their tool.
    pub fn ambiguous(&self) -> Result<Vec<Ambiguous>, StoreError> {
        self.ambiguous
            .iter()
            .map(|guard| decode(&guard.value()?, "ambiguous record"))
            .collect()
    }

    /// All quarantined documents.
    pub fn quarantined(&self) -> Result<Vec<Quarantined>, StoreError> {
        self.quarantine
            .iter()
            .map(|guard| decode(&guard.value()?, "quarantined document"))
            .collect()
    }

    /// `tool`'s capture cursor (the start if never set).
    pub fn tool_cursor(&self, tool: &str) -> Result<Cursor, StoreError> {
        Ok(Cursor(
            self.cursors
                .get(tool_cursor(tool))?
                .map(|bytes| bytes.to_vec())
                .unwrap_or_default(),
        ))
    }

    /// The ids of documents awaiting write-back to `tool`, up to `max`.
    pub fn pending(&self, tool: &str, max: usize) -> Result<Vec<DocId>, StoreError> {
        let prefix = pending_key(tool, DocId([0; 16]));
        let prefix = &prefix[..prefix.len() - 16];
        let mut out = Vec::new();
        for guard in self.pending.prefix(prefix).take(max) {
            let key = guard.key()?;
            let id =
                <[u8; 16]>::try_from(&key[prefix.len()..]).map_err(|_| StoreError::Corrupt {
                    what: "pending doc id",
                    reason: format!("{} bytes", key.len()),
                })?;
            out.push(DocId(id));
        }
        Ok(out)
    }

    /// How many documents the store holds.
    pub fn doc_count(&self) -> Result<usize, StoreError> {
        Ok(self.docs.len()?)
    }

    /// Document `id` as committed, loaded read-only (local edits would be made by a
    /// zero actor: callers only read it).
    pub fn load_doc(&self, id: DocId) -> Result<Option<RecordDoc>, StoreError> {
        let Some(value) = self.docs.get(id.0)? else {
            return Ok(None);
        };
        RecordDoc::load(doc_bytes(&value), &[0; 16])
            .map(Some)
            .map_err(|e| StoreError::Corrupt {
                what: "document",
                reason: format!("{id}: {e}"),
            })
    }

    /// The ids of all documents, in order.
    pub fn doc_ids(&self) -> Result<Vec<DocId>, StoreError> {
        let mut ids = Vec::new();
        for guard in self.docs.iter() {
            let key = guard.key()?;
            let id = <[u8; 16]>::try_from(&key[..]).map_err(|_| StoreError::Corrupt {
                what: "document id",
                reason: format!("{} bytes", key.len()),
            })?;
            ids.push(DocId(id));
        }
        Ok(ids)
    }
}

/// The key of a document's link to a tool's record: tool, 0, doc id.
fn link_key(tool: &str, id: DocId) -> Vec<u8> {
    pending_key(tool, id)
}

/// The key of a pending mark: tool, 0, doc id.
fn pending_key(tool: &str, id: DocId) -> Vec<u8> {
    let mut k = Vec::with_capacity(tool.len() + 17);
    k.extend_from_slice(tool.as_bytes());
    k.push(0);
    k.extend_from_slice(&id.0);
    k
}

/// The name of a tool's capture cursor.
pub fn tool_cursor(tool: &str) -> String {
    format!("tool/{tool}")
}

/// The name of the counter of live records of `collection`, among the cursors.
fn records_counter(collection: &str) -> String {
    format!("records/{collection}")
}

/// The name of the cursor into a peer store's log of `collection`: the next seq to ask for.
pub fn peer_cursor(peer: &StoreId, collection: &str) -> String {
    format!("peer/{}/{collection}", hex(peer))
}

/// The name of the mark set while anti-entropy with a peer store's `collection` runs:
/// 1 until it finishes, so a crash in the middle makes the next session start over.
pub fn anti_entropy_mark(peer: &StoreId, collection: &str) -> String {
    format!("anti-entropy/{}/{collection}", hex(peer))
}

/// Lower-case hex of bytes.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn random_actor() -> StoreId {
    let mut actor = [0u8; 16];
    actor.copy_from_slice(automerge::ActorId::random().to_bytes());
    actor
}

fn log_prefix(collection: &str) -> Vec<u8> {
    let mut key = Vec::with_capacity(collection.len() + 1);
    key.extend_from_slice(collection.as_bytes());
    key.push(0);
    key
}

fn log_key(collection: &str, seq: u64) -> Vec<u8> {
    let mut key = log_prefix(collection);
    key.extend_from_slice(&seq.to_be_bytes());
    key
}

fn conflict_key(doc: DocId, field: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(16 + field.len());
    k.extend_from_slice(&doc.0);
    k.extend_from_slice(field.as_bytes());
    k
}

fn record_key(tool: &str, collection: &str, key: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(tool.len() + collection.len() + key.len() + 2);
    k.extend_from_slice(tool.as_bytes());
    k.push(0);
    k.extend_from_slice(collection.as_bytes());
    k.push(0);
    k.extend_from_slice(key.as_bytes());
    k
}

fn decode_seq(bytes: &[u8]) -> Result<u64, StoreError> {
    <[u8; 8]>::try_from(bytes)
        .map(u64::from_be_bytes)
        .map_err(|_| StoreError::Corrupt {
            what: "sequence number",
            reason: format!("{} bytes", bytes.len()),
        })
}

/// The value stored under `key` in `keyspace`, decoded, if any.
fn get_decoded<T: for<'de> Deserialize<'de>>(
    keyspace: &Keyspace,
    key: Vec<u8>,
    what: &'static str,
) -> Result<Option<T>, StoreError> {
    keyspace
        .get(key)?
        .map(|bytes| decode(&bytes, what))
        .transpose()
}

fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    postcard::to_stdvec(value).expect("in-memory values always encode")
}

fn decode<T: for<'de> Deserialize<'de>>(bytes: &[u8], what: &'static str) -> Result<T, StoreError> {
    postcard::from_bytes(bytes).map_err(|e| StoreError::Corrupt {
        what,
        reason: e.to_string(),
    })
}

impl Store {
    /// Records the heads digest of document `id`, `old` before, and updates its
    /// bucket.
    fn stage_digest(
        &mut self,
        batch: &mut Batch,
        collection: &str,
        id: DocId,
        old: u64,
        digest: u64,
    ) -> Result<(), StoreError> {
        let key = (collection.to_owned(), id);
        debug_assert_eq!(
            old,
            match self.staged.digests.get(&key) {
                Some(staged) => *staged,
                None => committed_digest(&self.digests, collection, id)?,
            },
            "the cached digest of {id} is the stored one"
        );
        self.load_buckets(collection)?;
        let buckets = self.buckets.get_mut(collection).expect("just loaded");
        buckets[bucket_of(id)] ^= old ^ digest;
        batch.inner.insert(
            &self.digests,
            digest_key(collection, id),
            digest.to_be_bytes().to_vec(),
        );
        self.staged.digests.insert(key, digest);
        Ok(())
    }

    fn load_buckets(&mut self, collection: &str) -> Result<(), StoreError> {
        if self.buckets.contains_key(collection) {
            return Ok(());
        }
        let mut buckets = vec![0u64; DIGEST_BUCKETS];
        let prefix = log_prefix(collection);
        for guard in self.digests.prefix(&prefix) {
            let (k, v) = guard.into_inner()?;
            let id = <[u8; 16]>::try_from(&k[prefix.len()..]).map_err(|_| StoreError::Corrupt {
                what: "digest key",
                reason: format!("{} bytes", k.len()),
            })?;
            buckets[bucket_of(DocId(id))] ^= decode_seq(&v)?;
        }
        self.buckets.insert(collection.to_owned(), buckets);
        Ok(())
    }

    /// The digests of the children of a node of the digest tree: the node covers the
    /// buckets whose number starts with the `depth` bits of `prefix`; `depth` is 0, 6
    /// or 12 (see [`DIGEST_LEVEL_BITS`]). `None` for another depth.
    pub fn digest_children(
        &mut self,
        collection: &str,
        depth: u8,
        prefix: u32,
    ) -> Result<Option<Vec<u64>>, StoreError> {
        let Some(bits) = child_bits(depth) else {
            return Ok(None);
        };
        if u64::from(prefix) >= 1u64 << depth {
            return Ok(None);
        }
        self.load_buckets(collection)?;
        let buckets = &self.buckets[collection];
        let span = 16 - depth - bits;
        let children = (0..1u32 << bits)
            .map(|child| {
                let first = (((prefix << bits) | child) << span) as usize;
                buckets[first..first + (1usize << span)]
                    .iter()
                    .fold(0, |acc, d| acc ^ d)
            })
            .collect();
        Ok(Some(children))
    }
}

impl Store {
    /// The documents of bucket `bucket` of `collection` with their heads digests,
    /// counting what the open batch staged.
    pub fn bucket_docs(
        &self,
        collection: &str,
        bucket: u16,
    ) -> Result<Vec<([u8; 16], u64)>, StoreError> {
        let mut docs: std::collections::BTreeMap<[u8; 16], u64> =
            committed_bucket_docs(&self.digests, collection, bucket)?
                .into_iter()
                .collect();
        for ((staged_collection, id), digest) in &self.staged.digests {
            if staged_collection == collection && bucket_of(*id) == usize::from(bucket) {
                docs.insert(id.0, *digest);
            }
        }
        Ok(docs.into_iter().collect())
    }

    /// The heads digest of document `id` in `collection` (0 if unknown), counting
    /// what the open batch staged.
    pub fn doc_digest(&self, collection: &str, id: DocId) -> Result<u64, StoreError> {
        match self.staged.digests.get(&(collection.to_owned(), id)) {
            Some(digest) => Ok(*digest),
            None => committed_digest(&self.digests, collection, id),
        }
    }

    /// The highest seq in `collection`'s log (0 if empty), counting what the open
    /// batch appended.
    pub fn log_head(&self, collection: &str) -> Result<u64, StoreError> {
        match self.log_next.get(collection) {
            Some(next) => Ok(next - 1),
            None => committed_log_head(&self.log, collection),
        }
    }
}

/// How many bits of the bucket number the children of a node at `depth` add.
pub fn child_bits(depth: u8) -> Option<u8> {
    let mut at = 0;
    for bits in DIGEST_LEVEL_BITS {
        if depth == at {
            return Some(bits);
        }
        at += bits;
    }
    None
}

impl StoreReader {
    /// The documents of bucket `bucket` of `collection`, with their heads digests.
    pub fn bucket_docs(
        &self,
        collection: &str,
        bucket: u16,
    ) -> Result<Vec<([u8; 16], u64)>, StoreError> {
        committed_bucket_docs(&self.digests, collection, bucket)
    }

    /// The heads digest of document `id` in `collection`, 0 if unknown.
    pub fn doc_digest(&self, collection: &str, id: DocId) -> Result<u64, StoreError> {
        committed_digest(&self.digests, collection, id)
    }
}

// Reads of the committed state, shared by the writer (under its overlay) and readers.

fn committed_shadow(shadow: &Keyspace, key: Vec<u8>) -> Result<Option<Record>, StoreError> {
    match shadow.get(key)? {
        Some(bytes) => Ok(Some(decode(&bytes, "shadow record")?)),
        None => Ok(None),
    }
}

fn committed_cursor(cursors: &Keyspace, name: &str) -> Result<u64, StoreError> {
    match cursors.get(name)? {
        Some(bytes) => decode_seq(&bytes),
        None => Ok(0),
    }
}

/// The seqs of `collection`'s entries whose change bytes `log_raw` holds, read from
/// it on first use.
fn raw_seqs_of<'a>(
    raw_seqs: &'a mut HashMap<String, VecDeque<(u64, Vec<u64>)>>,
    log_raw: &Keyspace,
    collection: &str,
) -> Result<&'a mut VecDeque<(u64, Vec<u64>)>, StoreError> {
    if !raw_seqs.contains_key(collection) {
        let prefix = log_prefix(collection);
        let mut seqs = VecDeque::new();
        for guard in log_raw.prefix(&prefix) {
            let (k, v) = guard.into_inner()?;
            let seq = decode_seq(&k[prefix.len()..])?;
            // Written before entries superseded others: none.
            let supersedes = postcard::from_bytes::<RawEntryRef<'_>>(&v)
                .map(|raw| raw.supersedes)
                .unwrap_or_default();
            seqs.push_back((seq, supersedes));
        }
        raw_seqs.insert(collection.to_owned(), seqs);
    }
    Ok(raw_seqs.get_mut(collection).expect("just filled"))
}

fn committed_log_head(log: &Keyspace, collection: &str) -> Result<u64, StoreError> {
    let prefix = log_prefix(collection);
    match log.prefix(&prefix).next_back() {
        Some(guard) => decode_seq(&guard.key()?[prefix.len()..]),
        None => Ok(0),
    }
}

fn committed_digest(digests: &Keyspace, collection: &str, id: DocId) -> Result<u64, StoreError> {
    match digests.get(digest_key(collection, id))? {
        Some(bytes) => decode_seq(&bytes),
        None => Ok(0),
    }
}

fn committed_bucket_docs(
    digests: &Keyspace,
    collection: &str,
    bucket: u16,
) -> Result<Vec<([u8; 16], u64)>, StoreError> {
    let mut prefix = log_prefix(collection);
    let start = prefix.len();
    prefix.extend_from_slice(&bucket.to_be_bytes());
    let mut out = Vec::new();
    for guard in digests.prefix(&prefix) {
        let (k, v) = guard.into_inner()?;
        let id = <[u8; 16]>::try_from(&k[start..]).map_err(|_| StoreError::Corrupt {
            what: "digest key",
            reason: format!("{} bytes", k.len()),
        })?;
        out.push((id, decode_seq(&v)?));
    }
    Ok(out)
}

/// The digest of a document's heads (sorted), as kept in the digest tree.
pub fn heads_digest(id: DocId, heads: &[crdt_model::ChangeHash]) -> u64 {
    use sha2::{Digest, Sha256};
    let mut hasher = Sha256::new();
    hasher.update(b"concord/heads/v1\0");
    hasher.update(id.0);
    for head in heads {
        hasher.update(head.0);
    }
    let digest = hasher.finalize();
    u64::from_be_bytes(digest[..8].try_into().expect("8 bytes"))
}

/// The bucket of a document: the first 16 bits of its id.
pub fn bucket_of(id: DocId) -> usize {
    usize::from(u16::from_be_bytes([id.0[0], id.0[1]]))
}

fn digest_key(collection: &str, id: DocId) -> Vec<u8> {
    let mut key = log_prefix(collection);
    key.extend_from_slice(&id.0);
    key
}

impl Batch {
    /// Whether nothing is staged.
    pub fn is_empty(&self) -> bool {
        self.inner.is_empty()
    }
}

impl Store {
    /// Drops the cached copy of document `id`, so the next use reloads what is
    /// stored or staged: changes made to it in memory and not staged are undone.
    pub fn forget(&mut self, id: DocId) {
        self.reads.pop(&id);
        if let Some(old) = self.cache.pop(&id)
            && self.staged.doc_ids.contains(&id)
        {
            // Its stored bytes are what the open batch staged.
            self.staged.docs.insert(id, old.stored);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A head names the standing entries and where each came from; a value stored
    /// before heads were, or one whose head is cut short, reads as all document.
    #[test]
    fn a_documents_head_names_its_standing_entries_and_the_rest_is_the_document() {
        let doc = [0x85, 0x6f, 0x4a, 0x83, 9, 9];
        let own = |seq| Standing { seq, origin: None };
        let from = |seq, store| Standing {
            seq,
            origin: Some([store; 16]),
        };
        for standing in [vec![], vec![own(1)], vec![from(300, 7), own(u64::MAX)]] {
            let mut value = doc_head(&standing);
            value.extend_from_slice(&doc);
            assert_eq!(split_doc_value(&value), (standing, &doc[..]));
        }
        assert_eq!(doc_head(&[own(2_000_000)]).len(), 6);
        assert_eq!(split_doc_value(&doc), (vec![], &doc[..]));
        let cut = &doc_head(&[from(300, 7)])[..10];
        assert_eq!(split_doc_value(cut), (vec![], cut));
    }

    /// The agent's own entry stands for every entry before it; a peer's, for the
    /// entry before it from the same peer only.
    #[test]
    fn an_entry_supersedes_what_every_peer_it_reaches_was_sent() {
        let (x, y) = (Some([1; 16]), Some([2; 16]));
        let mut standing = Vec::new();
        assert_eq!(supersede(&mut standing, 1, None), Vec::<u64>::new());
        assert_eq!(supersede(&mut standing, 2, x), Vec::<u64>::new());
        assert_eq!(supersede(&mut standing, 3, y), Vec::<u64>::new());
        assert_eq!(supersede(&mut standing, 4, x), vec![2]);
        let seqs = |standing: &[Standing]| standing.iter().map(|e| e.seq).collect::<Vec<_>>();
        assert_eq!(seqs(&standing), vec![1, 3, 4]);
        assert_eq!(supersede(&mut standing, 5, None), vec![1, 3, 4]);
        assert_eq!(seqs(&standing), vec![5]);
        // Past the most a head names, the oldest stays in the log for good.
        for (seq, store) in (6..).zip(1..=8u8) {
            supersede(&mut standing, seq, Some([store; 16]));
        }
        assert_eq!(standing.len(), DOC_STANDING_MAX);
        assert_eq!(standing[0].seq, 6);
    }
}
