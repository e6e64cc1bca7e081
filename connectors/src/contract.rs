//! The contract every connector implements, and the native types it speaks.

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::time::Duration;

use crdt_model::Record;
use serde::{Deserialize, Serialize};

/// A (collection, key) pair naming one record of a tool.
pub type RecordKey = (String, String);

/// Which table one collection syncs and which of its columns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CollectionSpec {
    /// The collection name the agent uses.
    pub collection: String,
    /// The table holding the collection's rows.
    pub table: String,
    /// The table's single-column PRIMARY KEY; it identifies rows and need not be listed
    /// in `columns`.
    pub primary_key: String,
    /// The columns that become record fields. The key is a field only if listed here.
    pub columns: Vec<String>,
}

/// What a tool's schema says of one synced table, read without changing the tool
/// (for checking a configuration).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableSchema {
    /// Whether the tool assigns the keys of new rows ([`Connector::assigns_keys`]).
    pub assigns_keys: bool,
    /// The field type of each configured column ([`Connector::field_types`]).
    pub field_types: BTreeMap<String, FieldType>,
}

/// A position in a tool's change feed, opaque to the agent: the connector defines
/// its bytes (an outbox seq, a sync token, an `updated_at` watermark), and the agent
/// stores it durably and hands it back. The empty cursor means "from the start".
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct Cursor(pub Vec<u8>);

impl Cursor {
    /// The cursor before any change.
    pub fn start() -> Cursor {
        Cursor(Vec::new())
    }

    /// The cursor's bytes.
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }
}

/// How a connector learns that its tool changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChangeFeed {
    /// The tool signals changes (a trigger with NOTIFY, a webhook, a file watch); the
    /// connector wakes the agent, and polls at `fallback` in case a signal was lost.
    Push {
        /// How often to look anyway.
        fallback: Duration,
    },
    /// The tool cannot signal: the connector checks at `interval` (cheaply, e.g.
    /// SQLite's `PRAGMA data_version`).
    Poll {
        /// How often to look while changes keep coming.
        interval: Duration,
        /// How often to look once the tool has been quiet for a while.
        idle: Duration,
    },
}

/// Wakes the agent's tool loop from any thread: the connector calls it when its tool
/// signals a change. A wake-up is only a hint; the change feed is the record.
pub type Wake = std::sync::Arc<dyn Fn() + Send + Sync>;

/// The changes read by one capture.
#[derive(Debug, Clone, PartialEq)]
pub struct CaptureBatch {
    /// Changed records in feed order, each with its current state, each record once.
    pub changes: Vec<CapturedChange>,
    /// Where the next capture starts; the `after` passed in when nothing was read.
    pub cursor: Cursor,
    /// The changes were found by a **rescan** of the tool (every record queued again
    /// because the tool was captured by another store before): they record what the
    /// tool holds without reviving records deleted elsewhere. A batch never mixes
    /// rescanned and ordinary changes.
    pub rescan: bool,
}

/// One changed record and its state at capture time.
#[derive(Debug, Clone, PartialEq)]
pub struct CapturedChange {
    /// The record's collection.
    pub collection: String,
    /// The record's key in the tool, as text.
    pub key: String,
    /// The key the record had before the tool changed it (an update of the primary
    /// key), when the change moved it: the record stays one record under its new key.
    pub previous_key: Option<String>,
    /// The record as it is now.
    pub state: RowState,
}

/// The state of a record at capture time.
#[derive(Debug, Clone, PartialEq)]
pub enum RowState {
    /// The record exists; its synced fields.
    Present(Record),
    /// No record has this key: it was deleted, or its key changed.
    Absent,
    /// The record holds a value that does not fit its field's type.
    Invalid(InvalidValue),
}

/// A stored value that does not fit its field's type: it names table, key, column,
/// the value and the type expected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
#[error("{table} key {key}: column `{column}` holds {found}, expected {expected} ({declared})")]
pub struct InvalidValue {
    /// The table.
    pub table: String,
    /// The record's key, shortened.
    pub key: String,
    /// The column.
    pub column: String,
    /// The value found, described and shortened.
    pub found: String,
    /// The field type expected.
    pub expected: FieldType,
    /// The column's declared type, as a phrase.
    pub declared: String,
}

/// The type of a synced field, derived from the tool's own type for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FieldType {
    /// A signed 64-bit integer.
    Integer,
    /// A 64-bit float.
    Float,
    /// An exact decimal.
    Decimal,
    /// UTF-8 text.
    Text,
    /// A boolean.
    Bool,
    /// An instant (or a date).
    Timestamp,
    /// A JSON document.
    Json,
}

impl FieldType {
    /// The lower-case name used in messages and reports.
    pub fn name(self) -> &'static str {
        match self {
            FieldType::Integer => "integer",
            FieldType::Float => "float",
            FieldType::Decimal => "decimal",
            FieldType::Text => "text",
            FieldType::Bool => "bool",
            FieldType::Timestamp => "timestamp",
            FieldType::Json => "json",
        }
    }
}

impl fmt::Display for FieldType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// One write the agent asks for.
#[derive(Debug, Clone, PartialEq)]
pub enum WriteOp {
    /// Sets the given fields of the record with `key`, inserting it if missing.
    /// Fields not given keep their values.
    Upsert {
        /// The collection to write.
        collection: String,
        /// The record's key as text.
        key: String,
        /// The fields to set.
        fields: Record,
    },
    /// Inserts a new record with the given fields; the tool assigns its key, which
    /// the outcome returns ([`OpOutcome::Written`]). Only for collections whose keys
    /// the tool assigns ([`Connector::assigns_keys`]).
    Insert {
        /// The collection to write.
        collection: String,
        /// Names the record for the agent (its document). An insert retried with the
        /// same token (the agent crashed after the tool committed it and before it
        /// recorded the key) returns the key of the row inserted the first time
        /// instead of inserting the record twice.
        token: String,
        /// The fields to set.
        fields: Record,
    },
    /// Deletes the record with `key`, if present.
    Delete {
        /// The collection to write.
        collection: String,
        /// The record's key as text.
        key: String,
    },
}

impl WriteOp {
    /// The collection the op writes.
    pub fn collection(&self) -> &str {
        let (WriteOp::Upsert { collection, .. }
        | WriteOp::Insert { collection, .. }
        | WriteOp::Delete { collection, .. }) = self;
        collection
    }

    /// The key of the record the op writes; `None` for an insert (the tool assigns it).
    pub fn key(&self) -> Option<&str> {
        match self {
            WriteOp::Upsert { key, .. } | WriteOp::Delete { key, .. } => Some(key),
            WriteOp::Insert { .. } => None,
        }
    }
}

/// What a write-back did with one op.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OpOutcome {
    /// The op was written and committed durably.
    Written {
        /// The key the tool assigned to an inserted record ([`WriteOp::Insert`]).
        key: Option<String>,
        /// The record's version in the tool after the write (an ETag, a revision),
        /// where the tool has one.
        version: Option<String>,
    },
    /// Nothing was written: the tool changed this record after the capture the op
    /// was planned from. Capture it, then plan again.
    Stale,
    /// The op cannot be written; the reason says what and where.
    Rejected(Rejection),
}

impl OpOutcome {
    /// Written, by a tool that keeps no record versions.
    pub const WRITTEN: OpOutcome = OpOutcome::Written {
        key: None,
        version: None,
    };
}

/// Why the tool refused one write: each variant is one kind, so refusals can be
/// grouped and counted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
pub enum Rejection {
    /// The op names a collection this connector does not sync.
    #[error("unknown collection `{collection}`")]
    UnknownCollection {
        /// The collection named.
        collection: String,
    },
    /// An insert asks the tool to assign a key, but this table's key is not one the
    /// tool assigns.
    #[error(
        "{table}: the primary key `{column}` is not assigned by the tool, so a record without a key cannot be inserted"
    )]
    KeyNotAssigned {
        /// The table.
        table: String,
        /// The key column.
        column: String,
    },
    /// The key is not an integer but the table's key column is.
    #[error(
        "{table} key {key}: the key is not an integer, but the primary key `{column}` is {declared}"
    )]
    KeyNotInteger {
        /// The table.
        table: String,
        /// The key, shortened.
        key: String,
        /// The key column.
        column: String,
        /// Its declared type, as a phrase.
        declared: String,
    },
    /// A field named like the key column holds another value than the key.
    #[error("{table} key {key}: field `{field}` holds {value}, which is not the key")]
    KeyFieldMismatch {
        /// The table.
        table: String,
        /// The key, shortened.
        key: String,
        /// The field.
        field: String,
        /// The value it holds, shortened.
        value: String,
    },
    /// A field that is not a configured column.
    #[error("{table} key {key}: `{field}` is not a configured column")]
    UnknownColumn {
        /// The table.
        table: String,
        /// The key, shortened.
        key: String,
        /// The field.
        field: String,
    },
    /// A value that does not fit its column's type.
    #[error("{table} key {key}: column `{column}` {problem}")]
    ValueDoesNotFit {
        /// The table.
        table: String,
        /// The key, shortened.
        key: String,
        /// The column.
        column: String,
        /// What does not fit, as the end of a sentence.
        problem: String,
    },
    /// The tool refused the write: a constraint or a trigger of the user's.
    #[error("{table} key {key}: {tool} refused the write: {message}")]
    Refused {
        /// The tool's kind (`SQLite`, `PostgreSQL`).
        tool: String,
        /// The table.
        table: String,
        /// The key, shortened.
        key: String,
        /// The tool's message.
        message: String,
    },
}

/// Why a connector could not capture or write: the tool is unreachable or failing.
/// The agent logs it, waits and retries; nothing captured or planned is lost.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ConnectorError(pub Box<dyn std::error::Error + Send + Sync>);

/// Writes in one write-back plan for a tool that writes records one by one.
pub const WRITES_PER_PLAN: usize = 512;
/// Writes in one write-back plan for a tool that writes a plan in one transaction.
pub const BULK_WRITES_PER_PLAN: usize = 4096;

/// The contract every connector implements.
///
/// A connector speaks native records and opaque cursors, never Automerge. It blocks;
/// the agent gives each tool a thread of its own, which loops:
///
/// 1. wait for a change signal ([`Connector::change_feed`], [`Connector::subscribe`])
///    or a poll tick, then ask [`Connector::changed`];
/// 2. [`Connector::capture`] after the durable cursor, hand the batch to the agent;
/// 3. once the agent stored the batch's cursor durably, [`Connector::acknowledge`] it
///    (the tool may forget what was captured);
/// 4. [`Connector::write_back`] merged records, one outcome per op, tagged so that
///    step 2 never sees them again.
///
/// Architecture Invariant: a connector never writes over an edit the agent has not
/// captured: an op whose record changed in the tool since the capture it was planned
/// from is refused as [`OpOutcome::Stale`], record by record.
pub trait Connector: Send + fmt::Debug {
    /// The tool's kind as users name it (`sqlite`, `postgres`).
    fn kind(&self) -> &'static str;

    /// Writes one write-back plan holds at most. A tool that writes a plan in one
    /// transaction takes [`BULK_WRITES_PER_PLAN`], so that writing back keeps up with
    /// a first sync; one that writes each record with a request of its own keeps
    /// plans small, so its loop gets back to capturing soon.
    fn writes_per_plan(&self) -> usize {
        WRITES_PER_PLAN
    }

    /// How the connector learns of changes.
    fn change_feed(&self) -> ChangeFeed;

    /// The type of each synced column of `collection`, as read from the tool's
    /// schema when the connector opened; `None` for a collection it does not sync.
    fn field_types(&self, collection: &str) -> Option<&BTreeMap<String, FieldType>>;

    /// Registers `wake`, to be called from any thread when the tool signals a change.
    /// Connectors whose feed is [`ChangeFeed::Poll`] never call it.
    fn subscribe(&mut self, wake: Wake) -> Result<(), ConnectorError> {
        let _ = wake;
        Ok(())
    }

    /// Whether the tool assigns the keys of new records of `collection` itself (an
    /// autoincrement or `INTEGER PRIMARY KEY`, a serial, server-side ids): such a
    /// collection can take [`WriteOp::Insert`].
    fn assigns_keys(&self, collection: &str) -> bool;

    /// Records `store` as the agent store capturing this tool. When another store
    /// captured it before (the agent's store was lost and recreated), the connector
    /// queues every record again, and the next captures report them as a rescan.
    fn claim(&mut self, store: &[u8]) -> Result<(), ConnectorError>;

    /// Whether the tool may have changed since the last call: cheap enough to call at
    /// every poll tick. Spurious `true` costs an empty capture, never a change.
    fn changed(&mut self) -> Result<bool, ConnectorError>;

    /// Reads up to `max` changes after `after`, each record in its current state.
    /// A batch with the cursor `after` holds nothing: the agent is caught up.
    fn capture(&mut self, after: &Cursor, max: usize) -> Result<CaptureBatch, ConnectorError>;

    /// Everything up to `durable` is stored by the agent: the tool may forget it.
    fn acknowledge(&mut self, durable: &Cursor) -> Result<(), ConnectorError>;

    /// About how many changes wait to be captured after `after` (at most that many),
    /// if the connector can tell cheaply: for showing the progress of a first import.
    fn backlog(&mut self, after: &Cursor) -> Result<Option<u64>, ConnectorError> {
        let _ = after;
        Ok(None)
    }

    /// Applies `ops`, with one outcome per op. An op is [`OpOutcome::Stale`], and
    /// nothing of it is written, when its record changed in the tool after the
    /// capture at `captured`, or when `changed_since` names it (records the agent
    /// captured after `captured`, which the tool may have forgotten).
    fn write_back(
        &mut self,
        captured: &Cursor,
        changed_since: &HashSet<RecordKey>,
        ops: &[WriteOp],
    ) -> Result<Vec<OpOutcome>, ConnectorError>;
}
