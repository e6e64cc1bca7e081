//! The SQLite connector: captures the changes a user's tool makes to SQLite tables and
//! writes merged records back, without echoing its own writes.
//!
//! # Capture
//!
//! [`SqliteConnector::open`] installs three triggers on every configured table. Each
//! insert, update or delete by any connection appends `(table, key)` to the outbox
//! table `_concord_outbox`, whose `seq` grows with every change and is never reused.
//! The outbox holds keys, not values: [`SqliteConnector::capture`] reads the entries
//! after a cursor and the *current* state of each row, so a row edited ten times
//! before capture is read once, in its final state.
//!
//! The agent persists the batch's cursor first and then calls
//! [`SqliteConnector::trim_outbox`], so a crash between the two repeats a capture but
//! never loses one.
//!
//! # Write-back without echo
//!
//! [`SqliteConnector::write_back`] sets the flag in `_concord_echo` at the start of its
//! transaction and clears it before the commit; the triggers record nothing while the
//! flag is set. Other connections never see the flag set, so their edits are always
//! captured. Inside the same write transaction it reads the outbox entries after the
//! plan's capture cursor: an op whose record has one (or that the caller names as
//! captured since) is refused as [`OpOutcome::Stale`] and writes nothing, so the agent
//! never overwrites an edit it has not seen, and a tool that commits all the time holds
//! back only the records it keeps changing. Commits use `synchronous = FULL`: a
//! write-back is durable before the agent records what the tool holds.
//!
//! # Keys and types
//!
//! Each table needs a single-column PRIMARY KEY. Keys cross the connector boundary as
//! text: the decimal digits of an integer key, the text of a text key. Each configured
//! column gets a [`FieldType`] from its declared SQL type, and values convert as
//! follows (NULL is `Value::Null` for every type):
//!
//! | Field type  | Read from SQLite                                                    | Written to SQLite                 |
//! |-------------|---------------------------------------------------------------------|-----------------------------------|
//! | `Integer`   | INTEGER; a REAL holding a whole number; text of an `i64`             | `Int` as INTEGER                  |
//! | `Float`     | INTEGER, REAL, text of a finite float                               | `Float` or exact `Int` as REAL    |
//! | `Decimal`   | INTEGER; text of a decimal; a REAL as its shortest round-trip text  | `Decimal` as canonical text; `Int`|
//! | `Text`      | TEXT                                                                | `Text` as TEXT                    |
//! | `Bool`      | INTEGER 0 or 1; text `true` or `false`                              | `Bool` as 0 or 1                  |
//! | `Timestamp` | RFC 3339, `YYYY-MM-DD HH:MM:SS[.f]` or `YYYY-MM-DD` (UTC); INTEGER Unix seconds | in the form the column's values use (separator, fraction digits, zone suffix, date alone, Unix seconds), else `2024-05-01 10:00:00` (`2024-05-01` in a `DATE` column); never less precise than the instant |
//! | `Json`      | JSON text (numbers that fit `i64` become `Int`); a bare number      | `List`, `Map`, `Bool`, `Int`, `Float`, `Text` as JSON text |
//!
//! A stored value that does not fit is captured as [`RowState::Invalid`] with a reason
//! naming table, key, column, declared type and value. A written value that does not
//! fit rejects that op alone; the rest of the batch commits.
//!
//! SQLite gives `DECIMAL`, `NUMERIC` and `MONEY` columns NUMERIC affinity: it stores
//! text that looks like a number as a 64-bit float, keeping about 15 significant
//! digits. Write-back therefore rejects a longer decimal for such a column rather than
//! let SQLite round it. A column declared with TEXT affinity and a `DEC` in its type,
//! such as `DECIMAL_TEXT`, keeps decimals of any length exactly.
//!
//! # Limits
//!
//! While write-back runs, the user's own triggers still fire, but changes they make
//! to configured tables are not captured. Rows whose key is NULL are never captured.

mod convert;
mod error;
mod schema;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::Path;
use std::time::Duration;

use crdt_model::Record;

use crate::values::key_text;
use crate::{ChangeFeed, Connector, ConnectorError, Cursor, RecordKey, TableSchema};
use rusqlite::types::{ToSqlOutput, Value as SqlValue, ValueRef};
use rusqlite::{
    Connection, ErrorCode, OpenFlags, OptionalExtension, TransactionBehavior, params_from_iter,
};

pub use crate::{
    CaptureBatch, CapturedChange, CollectionSpec, FieldType, InvalidValue, OpOutcome, Rejection,
    RowState, WriteOp,
};
pub use error::SqliteError;
use schema::Table;

/// How long a statement waits for another connection's lock before failing.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// Prepared statements each connection keeps: a few per table plus one pair per
/// combination of fields that write-back updates.
const STATEMENTS_CACHED_MAX: usize = 256;

const DATA_VERSION_SQL: &str = "PRAGMA data_version";
const OUTBOX_READ_SQL: &str = "SELECT seq, tbl, key, old_key FROM _concord_outbox
     WHERE seq > ?1 AND seq <= ?2 ORDER BY seq LIMIT ?3";
/// The keys of the outbox entries after `?1`: rows the tool changed since.
/// A key change counts for both keys: an op on the old key must not recreate the row.
const OUTBOX_SINCE_SQL: &str = "SELECT tbl, key FROM _concord_outbox WHERE seq > ?1
     UNION SELECT tbl, old_key FROM _concord_outbox WHERE seq > ?1 AND old_key IS NOT NULL";
/// The highest seq ever given out, even if trimmed since (AUTOINCREMENT keeps it).
const OUTBOX_HEAD_SQL: &str =
    "SELECT COALESCE((SELECT seq FROM sqlite_sequence WHERE name = '_concord_outbox'), 0)";
const OUTBOX_LEN_SQL: &str = "SELECT COUNT(*) FROM _concord_outbox";
const OUTBOX_TRIM_SQL: &str = "DELETE FROM _concord_outbox WHERE seq <= ?1";
const ECHO_SET_SQL: &str = "UPDATE _concord_echo SET active = ?1 WHERE id = 1";
/// The key an insert with this token got, if it was done before.
const INSERTED_READ_SQL: &str = "SELECT key FROM _concord_inserted WHERE token = ?1 AND tbl = ?2";
const INSERTED_WRITE_SQL: &str =
    "INSERT OR REPLACE INTO _concord_inserted (token, tbl, key) VALUES (?1, ?2, ?3)";

/// How often the agent checks for new commits while the tool is busy.
pub const CAPTURE_POLL_US: u64 = 250;
/// How often it checks once the tool has been quiet: an idle agent wakes 500 times
/// a second instead of 4,000.
pub const CAPTURE_POLL_IDLE_US: u64 = 2_000;
/// Acknowledged outbox entries that trigger a trim of the outbox (a drained outbox
/// is trimmed at once).
pub const OUTBOX_TRIM_EVERY: u64 = 256;

/// One connection to a SQLite database, capturing and writing the configured tables.
///
/// It blocks; the agent gives it a dedicated thread.
#[derive(Debug)]
pub struct SqliteConnector {
    conn: Connection,
    tables: Vec<Table>,
    /// Table index by table name as configured (what the triggers write).
    by_table: HashMap<String, usize>,
    /// Table index by lower-cased table name, for outbox entries written under an
    /// earlier spelling of the name (SQLite table names ignore case).
    by_table_folded: HashMap<String, usize>,
    by_collection: HashMap<String, usize>,
    /// The last `PRAGMA data_version` seen by [`SqliteConnector::changed`].
    data_version: i64,
    /// Outbox entries up to here belong to a rescan (see [`SqliteConnector::claim`]).
    rescan_upto: u64,
    /// The outbox is trimmed up to here.
    trimmed: u64,
}

/// The changes read by one [`SqliteConnector::capture`], with the outbox seq they
/// end at.
#[derive(Debug, Clone, PartialEq)]
pub struct OutboxBatch {
    /// Changed rows in outbox order, each with its current state, each row once.
    pub changes: Vec<CapturedChange>,
    /// The highest outbox sequence number read; the `after` passed in when none was.
    pub cursor: u64,
}

/// Reads what the database at `path` says of each spec's table, changing nothing:
/// the same checks as [`SqliteConnector::open`], for checking a configuration.
pub fn inspect(path: &Path, specs: &[CollectionSpec]) -> Result<Vec<TableSchema>, SqliteError> {
    if !path.is_file() {
        return Err(SqliteError::MissingDatabase {
            path: path.to_owned(),
        });
    }
    let flags = OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX;
    let conn = Connection::open_with_flags(path, flags)?;
    conn.busy_timeout(BUSY_TIMEOUT)?;
    specs
        .iter()
        .map(|spec| {
            let table = Table::validate(&conn, spec)?;
            Ok(TableSchema {
                assigns_keys: table.assigns_keys,
                field_types: table.field_types,
            })
        })
        .collect()
}

impl SqliteConnector {
    /// Opens (or creates) the database at `path`, validates every spec against its
    /// schema and installs the outbox, echo flag and capture triggers.
    ///
    /// The database must exist: it is never created. The specs are checked before
    /// anything is changed; then the database is switched to WAL (a lasting change of
    /// the file), and the connection uses `synchronous = FULL` and a 5 s busy timeout.
    /// Opening again is idempotent: the triggers are dropped and recreated from the
    /// current specs and schema, and the outbox keeps its entries.
    pub fn open(path: &Path, specs: Vec<CollectionSpec>) -> Result<SqliteConnector, SqliteError> {
        let mut by_collection = HashMap::with_capacity(specs.len());
        let mut by_table = HashMap::with_capacity(specs.len());
        let mut by_table_folded = HashMap::with_capacity(specs.len());
        for (index, spec) in specs.iter().enumerate() {
            if by_collection
                .insert(spec.collection.clone(), index)
                .is_some()
            {
                return Err(SqliteError::DuplicateCollection {
                    collection: spec.collection.clone(),
                });
            }
            if by_table_folded
                .insert(spec.table.to_ascii_lowercase(), index)
                .is_some()
            {
                return Err(SqliteError::DuplicateTable {
                    table: spec.table.clone(),
                });
            }
            by_table.insert(spec.table.clone(), index);
        }

        // Never create the user's database: a missing file is a configuration error.
        if !path.is_file() {
            return Err(SqliteError::MissingDatabase {
                path: path.to_owned(),
            });
        }
        let flags = OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX;
        let mut conn = Connection::open_with_flags(path, flags)?;
        conn.busy_timeout(BUSY_TIMEOUT)?;
        conn.set_prepared_statement_cache_capacity(STATEMENTS_CACHED_MAX);
        // Check the specs before changing anything in the database, so a start that
        // fails leaves the user's file as it was.
        {
            let tx = conn.transaction()?;
            for spec in &specs {
                Table::validate(&tx, spec)?;
            }
            tx.commit()?;
        }
        let journal_mode: String =
            conn.query_row("PRAGMA journal_mode = WAL", [], |row| row.get(0))?;
        if !journal_mode.eq_ignore_ascii_case("wal") {
            tracing::warn!(
                path = %path.display(),
                journal_mode,
                "SQLite did not switch to WAL; readers and writers will block each other"
            );
        }
        // A write-back is durable before its commit returns: the agent records what
        // the tool holds only after that, so a power cut cannot leave the shadow ahead
        // of the database.
        conn.pragma_update(None, "synchronous", "FULL")?;
        // Read before installing, so a commit that races with the install still makes
        // the first `changed` return true.
        let data_version = read_data_version(&conn)?;

        // Validate and install in one write transaction, so the schema cannot change
        // between the check and the triggers.
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let tables = specs
            .iter()
            .map(|spec| Table::validate(&tx, spec))
            .collect::<Result<Vec<_>, _>>()?;
        tx.execute_batch(schema::BOOKKEEPING_SQL)?;
        schema::add_old_key_column(&tx)?;
        let installed = schema::trigger_names(&tx)?;
        schema::drop_triggers(&tx)?;
        for table in &tables {
            if !installed.contains(&table.insert_trigger_name()) {
                // First install for this table: rows it already holds are captured too.
                let queued = tx.execute(&table.import_sql(), [])?;
                tracing::info!(table = %table.name, rows = queued, "initial import queued");
            }
            tx.execute_batch(&table.triggers_sql())?;
            learn_timestamp_styles(&tx, table)?;
        }
        tx.commit()?;
        tracing::debug!(path = %path.display(), tables = tables.len(), "capture triggers installed");

        Ok(SqliteConnector {
            conn,
            tables,
            by_table,
            by_table_folded,
            by_collection,
            data_version,
            rescan_upto: 0,
            trimmed: 0,
        })
    }

    /// Returns true when another connection committed since the last call (or since
    /// opening). Cheap enough to poll every millisecond; the connector's own
    /// write-backs do not count.
    pub fn changed(&mut self) -> Result<bool, SqliteError> {
        let version = read_data_version(&self.conn)?;
        let changed = version != self.data_version;
        self.data_version = version;
        Ok(changed)
    }

    /// Reads up to `max` outbox entries with a sequence number after `after` and at
    /// most `upto`, and the current state of each row they name, all in one read
    /// transaction. `upto` keeps a batch from crossing a boundary such as the end of
    /// a rescan (pass `u64::MAX` for none).
    ///
    /// Entries for tables no longer configured are skipped, and an entry for a row
    /// already in the batch is folded into it (both would report the same state), so
    /// the batch may hold fewer than `max` changes; its cursor still covers every
    /// entry read.
    pub fn capture(
        &mut self,
        after: u64,
        upto: u64,
        max: usize,
    ) -> Result<OutboxBatch, SqliteError> {
        let mut batch = OutboxBatch {
            changes: Vec::new(),
            cursor: after,
        };
        if max == 0 {
            return Ok(batch);
        }
        let tx = self.conn.transaction()?;
        let entries: Vec<(i64, String, String, Option<String>)> = tx
            .prepare_cached(OUTBOX_READ_SQL)?
            .query_map(
                [seq_param(after), seq_param(upto), count_param(max)],
                |row| Ok((row.get(0)?, row.get(1)?, row.get(2)?, row.get(3)?)),
            )?
            .collect::<Result<_, _>>()?;
        batch.changes.reserve(entries.len());
        // Keys that a later entry of this batch moved away from: their own entries
        // would report the row gone, while it lives on under its new key.
        let moved_away: HashSet<(&str, &str)> = entries
            .iter()
            .filter_map(|(_, table, _, old)| Some((table.as_str(), old.as_deref()?)))
            .collect();
        let mut seen: HashSet<(usize, &str)> = HashSet::with_capacity(entries.len());
        for (seq, table_name, key, old_key) in &entries {
            batch.cursor = u64::try_from(*seq).unwrap_or(batch.cursor);
            let index = match self.by_table.get(table_name) {
                Some(index) => *index,
                None => match self.by_table_folded.get(&table_name.to_ascii_lowercase()) {
                    Some(index) => *index,
                    None => continue,
                },
            };
            let table = &self.tables[index];
            let state = read_row(&tx, table, key)?;
            if old_key.is_none()
                && state == RowState::Absent
                && moved_away.contains(&(table_name.as_str(), key.as_str()))
            {
                continue;
            }
            // A key change is reported even if the new key was seen: the move matters.
            if !seen.insert((index, key.as_str())) && old_key.is_none() {
                continue;
            }
            batch.changes.push(CapturedChange {
                collection: table.collection.clone(),
                key: key.clone(),
                previous_key: old_key.clone(),
                state,
            });
        }
        tx.commit()?;
        Ok(batch)
    }

    /// The highest outbox sequence number ever given out (trimmed entries included), 0
    /// before the first.
    pub fn outbox_head(&mut self) -> Result<u64, SqliteError> {
        let head: i64 = self
            .conn
            .prepare_cached(OUTBOX_HEAD_SQL)?
            .query_row([], |row| row.get(0))?;
        Ok(u64::try_from(head).unwrap_or(0))
    }

    /// The connection's `PRAGMA synchronous` (2 is FULL: every commit is fsynced).
    pub fn synchronous(&self) -> Result<i64, SqliteError> {
        Ok(self
            .conn
            .query_row("PRAGMA synchronous", [], |row| row.get(0))?)
    }

    /// The number of entries in the outbox.
    pub fn outbox_len(&mut self) -> Result<u64, SqliteError> {
        let len: i64 = self
            .conn
            .prepare_cached(OUTBOX_LEN_SQL)?
            .query_row([], |row| row.get(0))?;
        Ok(u64::try_from(len).unwrap_or(0))
    }

    /// Records `store` as the agent store capturing this database and returns the
    /// outbox seq up to which entries belong to a **rescan** (0 if none).
    ///
    /// When another store captured this database before (the agent's store was lost
    /// and recreated), every row of every configured table is queued again, in the
    /// same transaction, so the new store learns what the tool holds; the agent
    /// captures those entries without reviving records deleted elsewhere. The
    /// boundary is kept here, beside the entries, so a crash cannot separate them.
    pub fn claim(&mut self, store: &[u8]) -> Result<u64, SqliteError> {
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        let owner: Option<(Vec<u8>, i64)> = tx
            .query_row(
                "SELECT store, rescan_upto FROM _concord_owner WHERE id = 1",
                [],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()?;
        let rescan_upto = match owner {
            Some((owner, upto)) if owner == store => upto,
            None => 0,
            Some(_) => {
                for table in &self.tables {
                    let queued = tx.execute(&table.import_sql(), [])?;
                    tracing::warn!(
                        table = %table.name,
                        rows = queued,
                        "this database was captured by another store; rows queued again"
                    );
                }
                tx.query_row(OUTBOX_HEAD_SQL, [], |r| r.get(0))?
            }
        };
        tx.execute(
            "INSERT INTO _concord_owner (id, store, rescan_upto) VALUES (1, ?1, ?2)
             ON CONFLICT (id) DO UPDATE SET store = excluded.store, rescan_upto = excluded.rescan_upto",
            rusqlite::params![store, rescan_upto],
        )?;
        tx.commit()?;
        Ok(u64::try_from(rescan_upto).unwrap_or(0))
    }

    /// Deletes the outbox entries up to and including `upto`. Call it once the capture
    /// cursor `upto` is durably stored.
    pub fn trim_outbox(&mut self, upto: u64) -> Result<(), SqliteError> {
        // A trim lost at a power cut only makes entries come back, and capture is
        // idempotent: it need not wait for the disk.
        self.conn.pragma_update(None, "synchronous", "NORMAL")?;
        let trimmed = self
            .conn
            .prepare_cached(OUTBOX_TRIM_SQL)
            .and_then(|mut statement| statement.execute([seq_param(upto)]));
        self.conn.pragma_update(None, "synchronous", "FULL")?;
        trimmed?;
        Ok(())
    }

    /// Applies `ops` in one transaction whose changes the capture triggers ignore,
    /// with an outcome per op.
    ///
    /// An op is [`OpOutcome::Stale`], and nothing of it is written, when its record
    /// changed in the tool after the capture it was planned from: the outbox holds an
    /// entry for it after `captured_upto`, or `changed_since` names it (the caller's
    /// list of records captured after `captured_upto`, whose outbox entries may be
    /// trimmed). Staleness is per record, so a tool that commits all the time holds
    /// back only the records it keeps changing. An op naming an unknown collection, a
    /// key that does not fit the key column, a field that is not a configured column
    /// or a value that does not fit its column is rejected, as is one SQLite refuses
    /// (a constraint or a user trigger); the other ops commit.
    pub fn write_back(
        &mut self,
        captured_upto: u64,
        changed_since: &HashSet<(String, String)>,
        ops: &[WriteOp],
    ) -> Result<Vec<OpOutcome>, SqliteError> {
        let mut outcomes = vec![OpOutcome::WRITTEN; ops.len()];
        let mut plans: Vec<Option<Plan<'_>>> = ops
            .iter()
            .enumerate()
            .map(|(index, op)| match self.plan(op) {
                Ok(plan) => Some(plan),
                Err(rejection) => {
                    outcomes[index] = OpOutcome::Rejected(rejection);
                    None
                }
            })
            .collect();
        // An op whose failure rolls back the whole transaction (ON CONFLICT ROLLBACK,
        // RAISE(ROLLBACK)) is dropped and the rest retried; each retry drops one op, so
        // this runs at most ops.len() + 1 times.
        let mut stale = Vec::new();
        loop {
            match self.attempt(captured_upto, changed_since, &mut plans, &mut stale)? {
                Attempt::Committed { refused, assigned } => {
                    for (index, rejection) in refused {
                        outcomes[index] = OpOutcome::Rejected(rejection);
                    }
                    for (index, key) in assigned {
                        outcomes[index] = OpOutcome::Written {
                            key: Some(key),
                            version: None,
                        };
                    }
                    for index in stale {
                        outcomes[index] = OpOutcome::Stale;
                    }
                    break;
                }
                Attempt::RolledBack(index, rejection) => {
                    plans[index] = None;
                    outcomes[index] = OpOutcome::Rejected(rejection);
                }
            }
        }
        tracing::debug!(ops = ops.len(), "write-back committed");
        Ok(outcomes)
    }

    /// The field type of each configured column of `collection`, or `None` when the
    /// collection is not configured.
    pub fn field_types(&self, collection: &str) -> Option<&BTreeMap<String, FieldType>> {
        let index = self.by_collection.get(collection)?;
        Some(&self.tables[*index].field_types)
    }

    /// Checks and converts one op without touching the database; the error is the
    /// reason the op is rejected.
    fn plan<'a>(&self, op: &'a WriteOp) -> Result<Plan<'a>, Rejection> {
        let collection = op.collection();
        let index =
            *self
                .by_collection
                .get(collection)
                .ok_or_else(|| Rejection::UnknownCollection {
                    collection: collection.to_owned(),
                })?;
        let table = &self.tables[index];
        let (WriteOp::Upsert { key, .. } | WriteOp::Delete { key, .. }) = op else {
            return self.plan_insert(index, op);
        };
        let short_key = || convert::shorten(key);
        let key_param = match key_param(table, key) {
            KeyParam::Int(i) => ToSqlOutput::Owned(SqlValue::Integer(i)),
            KeyParam::Text(text) if table.key.field_type != FieldType::Integer => {
                ToSqlOutput::Borrowed(ValueRef::Text(text.as_bytes()))
            }
            KeyParam::Text(_) => {
                return Err(Rejection::KeyNotInteger {
                    table: table.name.clone(),
                    key: short_key(),
                    column: table.key.field.clone(),
                    declared: table.key.declared_phrase(),
                });
            }
        };
        let action = match op {
            WriteOp::Delete { .. } | WriteOp::Insert { .. } => Action::Delete(key_param),
            WriteOp::Upsert { fields, .. } => {
                let mut params = Vec::with_capacity(fields.len() + 1);
                let mut assignments = String::new();
                let mut names = String::new();
                let mut placeholders = String::new();
                for (field, value) in fields {
                    if field.eq_ignore_ascii_case(&table.key.field) {
                        if key_text(value).as_deref() != Some(key.as_str()) {
                            return Err(Rejection::KeyFieldMismatch {
                                table: table.name.clone(),
                                key: short_key(),
                                field: field.clone(),
                                value: convert::shorten(&value.to_string()),
                            });
                        }
                        continue;
                    }
                    let column = table
                        .columns
                        .iter()
                        .find(|column| column.field == *field)
                        .ok_or_else(|| Rejection::UnknownColumn {
                            table: table.name.clone(),
                            key: short_key(),
                            field: field.clone(),
                        })?;
                    let param = convert::write_value(column, value).map_err(|problem| {
                        Rejection::ValueDoesNotFit {
                            table: table.name.clone(),
                            key: short_key(),
                            column: field.clone(),
                            problem,
                        }
                    })?;
                    params.push(param);
                    let n = params.len();
                    let separator = if n == 1 { "" } else { ", " };
                    let name = &column.sql_name;
                    assignments.push_str(&format!("{separator}{name} = ?{n}"));
                    names.push_str(&format!(", {name}"));
                    placeholders.push_str(&format!(", ?{n}"));
                }
                if params.is_empty() {
                    Action::InsertKey(key_param)
                } else {
                    params.push(key_param);
                    let n = params.len();
                    let (table_name, key_name) = (&table.sql_name, &table.key.sql_name);
                    Action::Upsert {
                        update_sql: format!(
                            "UPDATE {table_name} SET {assignments} WHERE {key_name} = ?{n}"
                        ),
                        insert_sql: format!(
                            "INSERT INTO {table_name} ({key_name}{names}) VALUES (?{n}{placeholders})"
                        ),
                        params,
                    }
                }
            }
        };
        Ok(Plan {
            table: index,
            key,
            action,
        })
    }

    /// Checks and converts an insert whose key SQLite assigns.
    fn plan_insert<'a>(&self, index: usize, op: &'a WriteOp) -> Result<Plan<'a>, Rejection> {
        let table = &self.tables[index];
        let WriteOp::Insert { fields, token, .. } = op else {
            unreachable!("plan_insert takes inserts only");
        };
        if !table.assigns_keys {
            return Err(Rejection::KeyNotAssigned {
                table: table.name.clone(),
                column: table.key.field.clone(),
            });
        }
        let mut params = Vec::with_capacity(fields.len());
        let mut names = Vec::with_capacity(fields.len());
        for (field, value) in fields {
            let column = table
                .columns
                .iter()
                .find(|column| column.field == *field)
                .ok_or_else(|| Rejection::UnknownColumn {
                    table: table.name.clone(),
                    key: "(new)".to_owned(),
                    field: field.clone(),
                })?;
            let param = convert::write_value(column, value).map_err(|problem| {
                Rejection::ValueDoesNotFit {
                    table: table.name.clone(),
                    key: "(new)".to_owned(),
                    column: field.clone(),
                    problem,
                }
            })?;
            params.push(param);
            names.push(column.sql_name.as_str());
        }
        let key = &table.key.sql_name;
        // A repeated insert writes the fields it carries now into the row it made.
        let update_sql = (!names.is_empty()).then(|| {
            let assignments: Vec<String> = names
                .iter()
                .enumerate()
                .map(|(n, name)| format!("{name} = ?{}", n + 1))
                .collect();
            format!(
                "UPDATE {} SET {} WHERE {key} = ?{}",
                table.sql_name,
                assignments.join(", "),
                names.len() + 1
            )
        });
        let sql = if names.is_empty() {
            format!(
                "INSERT INTO {} DEFAULT VALUES RETURNING CAST({key} AS TEXT)",
                table.sql_name
            )
        } else {
            let placeholders: Vec<String> = (1..=names.len()).map(|n| format!("?{n}")).collect();
            format!(
                "INSERT INTO {} ({}) VALUES ({}) RETURNING CAST({key} AS TEXT)",
                table.sql_name,
                names.join(", "),
                placeholders.join(", ")
            )
        };
        Ok(Plan {
            table: index,
            key: "",
            action: Action::Insert {
                sql,
                update_sql,
                params,
                token,
            },
        })
    }

    /// Runs one write-back transaction over the plans still standing; plans found
    /// stale are taken out.
    fn attempt(
        &mut self,
        captured_upto: u64,
        changed_since: &HashSet<(String, String)>,
        plans: &mut [Option<Plan<'_>>],
        stale: &mut Vec<usize>,
    ) -> Result<Attempt, SqliteError> {
        let tables = &self.tables;
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        // Inside the write transaction no user edit can slip in between this read
        // and the writes.
        let uncaptured: HashSet<(String, String)> = tx
            .prepare_cached(OUTBOX_SINCE_SQL)?
            .query_map([seq_param(captured_upto)], |row| {
                Ok((row.get(0)?, row.get(1)?))
            })?
            .collect::<Result<_, _>>()?;
        for (index, slot) in plans.iter_mut().enumerate() {
            let Some(plan) = slot else { continue };
            let table = &tables[plan.table];
            // A new record (an insert) cannot have changed in the tool.
            let inserts = matches!(plan.action, Action::Insert { .. });
            let changed = !inserts
                && (uncaptured.contains(&(table.name.clone(), plan.key.to_owned()))
                    || changed_since.contains(&(table.collection.clone(), plan.key.to_owned())));
            if changed {
                stale.push(index);
                *slot = None;
            }
        }
        tx.prepare_cached(ECHO_SET_SQL)?.execute([1])?;
        let mut refused = Vec::new();
        let mut assigned = Vec::new();
        for (index, plan) in plans.iter().enumerate() {
            let Some(plan) = plan else { continue };
            let table = &tables[plan.table];
            let error = match execute(&tx, table, &plan.action) {
                Ok(Some(key)) => {
                    assigned.push((index, key));
                    continue;
                }
                Ok(None) => continue,
                Err(error) => error,
            };
            let Some(message) = record_fault(&error) else {
                return Err(error.into());
            };
            let rejection = Rejection::Refused {
                tool: "SQLite".to_owned(),
                table: table.name.clone(),
                key: convert::shorten(plan.key),
                message,
            };
            if tx.is_autocommit() {
                return Ok(Attempt::RolledBack(index, rejection));
            }
            refused.push((index, rejection));
        }
        tx.prepare_cached(ECHO_SET_SQL)?.execute([0])?;
        tx.commit()?;
        Ok(Attempt::Committed { refused, assigned })
    }
}

/// The SQLite connector under the common contract. Its cursor is the outbox seq as
/// 8 big-endian bytes (empty: 0).
impl Connector for SqliteConnector {
    fn kind(&self) -> &'static str {
        "sqlite"
    }

    /// One SQLite transaction per plan.
    fn writes_per_plan(&self) -> usize {
        crate::BULK_WRITES_PER_PLAN
    }

    fn assigns_keys(&self, collection: &str) -> bool {
        self.by_collection
            .get(collection)
            .is_some_and(|index| self.tables[*index].assigns_keys)
    }

    fn field_types(&self, collection: &str) -> Option<&BTreeMap<String, FieldType>> {
        self.field_types(collection)
    }

    fn change_feed(&self) -> ChangeFeed {
        // SQLite cannot signal another process: `PRAGMA data_version` is cheap to poll.
        ChangeFeed::Poll {
            interval: Duration::from_micros(CAPTURE_POLL_US),
            idle: Duration::from_micros(CAPTURE_POLL_IDLE_US),
        }
    }

    fn claim(&mut self, store: &[u8]) -> Result<(), ConnectorError> {
        self.rescan_upto = SqliteConnector::claim(self, store)?;
        Ok(())
    }

    fn changed(&mut self) -> Result<bool, ConnectorError> {
        Ok(SqliteConnector::changed(self)?)
    }

    fn capture(&mut self, after: &Cursor, max: usize) -> Result<CaptureBatch, ConnectorError> {
        let after = seq_of(after)?;
        // A batch never crosses the end of the rescan, whatever gap of trimmed
        // entries lies before it.
        let rescan = after < self.rescan_upto;
        let upto = if rescan { self.rescan_upto } else { u64::MAX };
        let batch = SqliteConnector::capture(self, after, upto, max)?;
        Ok(CaptureBatch {
            changes: batch.changes,
            cursor: cursor_of(batch.cursor),
            rescan,
        })
    }

    fn backlog(&mut self, after: &Cursor) -> Result<Option<u64>, ConnectorError> {
        let after = seq_of(after)?;
        Ok(Some(self.outbox_head()?.saturating_sub(after)))
    }

    fn acknowledge(&mut self, durable: &Cursor) -> Result<(), ConnectorError> {
        let upto = seq_of(durable)?;
        if upto <= self.trimmed {
            return Ok(());
        }
        // Trim in chunks, or at once when the outbox is drained (asked only then).
        if upto - self.trimmed >= OUTBOX_TRIM_EVERY || self.outbox_head()? == upto {
            self.trim_outbox(upto)?;
            self.trimmed = upto;
        }
        Ok(())
    }

    fn write_back(
        &mut self,
        captured: &Cursor,
        changed_since: &HashSet<RecordKey>,
        ops: &[WriteOp],
    ) -> Result<Vec<OpOutcome>, ConnectorError> {
        let captured = seq_of(captured)?;
        Ok(SqliteConnector::write_back(
            self,
            captured,
            changed_since,
            ops,
        )?)
    }
}

/// The outbox seq a cursor stands for.
fn seq_of(cursor: &Cursor) -> Result<u64, SqliteError> {
    match cursor.as_bytes() {
        [] => Ok(0),
        bytes => {
            Ok(u64::from_be_bytes(bytes.try_into().map_err(|_| {
                SqliteError::BadCursor { len: bytes.len() }
            })?))
        }
    }
}

/// The cursor of an outbox seq.
pub fn cursor_of(seq: u64) -> Cursor {
    Cursor(seq.to_be_bytes().to_vec())
}

/// One op, checked and converted, ready to run.
struct Plan<'a> {
    table: usize,
    key: &'a str,
    action: Action<'a>,
}

/// The statements one op runs.
enum Action<'a> {
    /// Updates the row, or inserts it when no row was updated. `params` holds the
    /// field values, then the key.
    Upsert {
        update_sql: String,
        insert_sql: String,
        params: Vec<ToSqlOutput<'a>>,
    },
    /// Inserts a row holding only the key, unless the row exists.
    InsertKey(ToSqlOutput<'a>),
    /// Inserts a row whose key SQLite assigns, returning the key, unless the insert
    /// with this token was done before: then it updates that row with the fields
    /// (`update_sql`, the field values then the key) and returns its key.
    Insert {
        sql: String,
        update_sql: Option<String>,
        params: Vec<ToSqlOutput<'a>>,
        token: &'a str,
    },
    /// Deletes the row.
    Delete(ToSqlOutput<'a>),
}

/// How one write-back transaction ended.
enum Attempt {
    /// Committed; the ops SQLite refused without ending the transaction, and the
    /// keys it assigned to inserted rows.
    Committed {
        refused: Vec<(usize, Rejection)>,
        assigned: Vec<(usize, String)>,
    },
    /// SQLite rolled the whole transaction back because of this op.
    RolledBack(usize, Rejection),
}

/// A key as a statement parameter.
enum KeyParam<'a> {
    Int(i64),
    Text(&'a str),
}

/// The connection's `PRAGMA data_version`, which changes when another connection
/// commits.
fn read_data_version(conn: &Connection) -> Result<i64, SqliteError> {
    Ok(conn
        .prepare_cached(DATA_VERSION_SQL)?
        .query_row([], |row| row.get(0))?)
}

/// The parameter for `key`: an integer for an integer key column when the text is
/// one, the text otherwise (SQLite's column affinity converts it as it would any
/// value compared with the column).
fn key_param<'a>(table: &Table, key: &'a str) -> KeyParam<'a> {
    if table.key.field_type == FieldType::Integer
        && let Ok(i) = key.parse()
    {
        return KeyParam::Int(i);
    }
    KeyParam::Text(key)
}

/// Reads the row with `key` and converts its configured columns.
fn read_row(conn: &Connection, table: &Table, key: &str) -> Result<RowState, SqliteError> {
    let mut statement = conn.prepare_cached(&table.select_sql)?;
    let mut rows = match key_param(table, key) {
        KeyParam::Int(i) => statement.query([i])?,
        KeyParam::Text(text) => statement.query([text])?,
    };
    let Some(row) = rows.next()? else {
        return Ok(RowState::Absent);
    };
    let mut record = Record::new();
    for (index, column) in table.columns.iter().enumerate() {
        let raw = row.get_ref(index)?;
        let Some(value) = convert::read_value(column, raw) else {
            return Ok(RowState::Invalid(InvalidValue {
                table: table.name.clone(),
                key: convert::shorten(key),
                column: column.field.clone(),
                found: convert::describe(raw),
                expected: column.field_type,
                declared: column.declared_phrase(),
            }));
        };
        record.insert(column.field.clone(), value);
    }
    Ok(RowState::Present(record))
}

/// Sets the write style of each timestamp column from a value it holds.
fn learn_timestamp_styles(conn: &Connection, table: &Table) -> rusqlite::Result<()> {
    for column in &table.columns {
        if column.field_type != FieldType::Timestamp {
            continue;
        }
        let sql = format!(
            "SELECT {name} FROM {table} WHERE {name} IS NOT NULL LIMIT 1",
            name = column.sql_name,
            table = table.sql_name
        );
        let mut statement = conn.prepare(&sql)?;
        let mut rows = statement.query([])?;
        if let Some(row) = rows.next()? {
            // Reading a value records its style; a value that does not parse is
            // reported when its row is captured.
            let _ = convert::read_value(column, row.get_ref(0)?);
        }
    }
    Ok(())
}

/// Runs the statements of one op; an insert returns the key SQLite assigned.
fn execute(
    conn: &Connection,
    table: &Table,
    action: &Action<'_>,
) -> rusqlite::Result<Option<String>> {
    match action {
        Action::Insert {
            sql,
            update_sql,
            params,
            token,
        } => {
            let done: Option<String> = conn
                .prepare_cached(INSERTED_READ_SQL)?
                .query_row([*token, table.name.as_str()], |row| row.get(0))
                .optional()?;
            if let Some(key) = done {
                // The row this token inserted, if it still exists, takes the fields;
                // a row deleted since (the record left the tool and came back) is
                // inserted anew.
                let exists = match update_sql {
                    Some(update_sql) => {
                        let with_key = params
                            .iter()
                            .map(|p| p as &dyn rusqlite::ToSql)
                            .chain(std::iter::once(&key as &dyn rusqlite::ToSql));
                        conn.prepare_cached(update_sql)?
                            .execute(params_from_iter(with_key))?
                            > 0
                    }
                    None => conn.prepare_cached(&table.select_sql)?.exists([&key])?,
                };
                if exists {
                    return Ok(Some(key));
                }
            }
            let key: String = conn
                .prepare_cached(sql)?
                .query_row(params_from_iter(params), |row| row.get(0))?;
            conn.prepare_cached(INSERTED_WRITE_SQL)?.execute([
                *token,
                table.name.as_str(),
                key.as_str(),
            ])?;
            return Ok(Some(key));
        }
        Action::Upsert {
            update_sql,
            insert_sql,
            params,
        } => {
            let updated = conn
                .prepare_cached(update_sql)?
                .execute(params_from_iter(params))?;
            if updated == 0 {
                conn.prepare_cached(insert_sql)?
                    .execute(params_from_iter(params))?;
            }
        }
        Action::InsertKey(key) => {
            conn.prepare_cached(&table.insert_key_sql)?.execute([key])?;
        }
        Action::Delete(key) => {
            conn.prepare_cached(&table.delete_sql)?.execute([key])?;
        }
    }
    Ok(None)
}

/// The message of a failure caused by the written record itself (a constraint, a
/// user trigger, a type or size SQLite refuses), as opposed to a failing database.
fn record_fault(error: &rusqlite::Error) -> Option<String> {
    match error {
        rusqlite::Error::SqliteFailure(failure, message)
            if matches!(
                failure.code,
                ErrorCode::ConstraintViolation | ErrorCode::TypeMismatch | ErrorCode::TooBig
            ) =>
        {
            Some(message.clone().unwrap_or_else(|| failure.to_string()))
        }
        _ => None,
    }
}

/// A sequence number as an SQLite integer; beyond `i64::MAX` means "all of them".
fn seq_param(seq: u64) -> i64 {
    i64::try_from(seq).unwrap_or(i64::MAX)
}

/// A count as an SQLite integer.
fn count_param(count: usize) -> i64 {
    i64::try_from(count).unwrap_or(i64::MAX)
}
