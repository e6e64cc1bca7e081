//! The PostgreSQL connector: captures the changes a user's tool makes to PostgreSQL
//! tables and writes merged records back, without echoing its own writes.
//!
//! # Capture
//!
//! [`PostgresConnector::open`] creates the schema `_concord` (outbox, inserted-row
//! tokens, owner) and installs a row trigger and a TRUNCATE trigger on every
//! configured table. Each insert, update or delete appends `(table, key)` to
//! `_concord.outbox` with the writing transaction's id (`pg_current_xact_id()`, 64
//! bits, never wrapping) and a sequence number. A statement trigger on the outbox
//! sends `NOTIFY concord_outbox`, which wakes the agent through a second connection
//! that LISTENs; a notification is only a wake-up (it is lost when a connection
//! drops), so the connector also polls at the configured interval.
//!
//! **Commit order is not sequence order**: a transaction that took sequence number
//! 100 may commit after one that took 101. Capture therefore orders entries by
//! `(xid, id)` and reads only entries of transactions older than every transaction
//! still running (`xid < pg_snapshot_xmin(pg_current_snapshot())`), in the same
//! statement and snapshot: such a transaction has ended, so no entry can ever
//! appear before the cursor. A long transaction delays the capture of the ones that
//! committed after it began; it never makes capture skip them.
//!
//! A TRUNCATE of a synced table is captured as deletes of every row it held.
//!
//! # Write-back without echo
//!
//! [`PostgresConnector::write_back`] runs one `REPEATABLE READ` transaction per batch
//! with `SET LOCAL concord.writing = 'on'`, which the triggers check. Inside it, an
//! op is stale when the outbox holds an entry for its record after the plan's
//! capture cursor, or when the caller names the record as captured since; a record
//! another transaction changes concurrently makes PostgreSQL raise a serialization
//! failure, which also makes the op stale. An op PostgreSQL refuses (a constraint, a
//! value its type refuses, a user trigger) is rejected; the transaction is run again
//! without the stale or rejected op, so the rest commits.
//!
//! # Types
//!
//! | PostgreSQL type                      | Field type  | Notes                                           |
//! |--------------------------------------|-------------|-------------------------------------------------|
//! | `smallint`, `integer`, `bigint`      | `Integer`   | out-of-range writes are rejected                |
//! | `numeric(p,s)`, `numeric`            | `Decimal`   | exact; a value the scale would round is rejected|
//! | `real`, `double precision`           | `Float`     | finite values only                              |
//! | `boolean`                            | `Bool`      |                                                 |
//! | `text`, `varchar(n)`                 | `Text`      | a value longer than `n` characters is rejected  |
//! | `timestamp`                          | `Timestamp` | read and written as UTC                         |
//! | `timestamptz`                        | `Timestamp` | the instant, whatever zone it was written in    |
//! | `date`                               | `Timestamp` | midnight UTC; an instant with a time is rejected|
//! | `uuid`                               | `Text`      | lower-case hyphenated text                      |
//! | `json`, `jsonb`                      | `Json`      |                                                 |
//!
//! Domains over these types sync as their base type. Any other type is refused at
//! start, naming table and column. Keys are `smallint`, `integer`, `bigint`, `text`,
//! `varchar` or `uuid`; the server assigns them (for `tool_ids`) when the key column
//! is an identity or has a default (`serial`, `gen_random_uuid()`).
//!
//! # Connections
//!
//! The connector holds one connection for capture and write-back and, once
//! subscribed, one that listens. A dropped connection fails the current call (the
//! agent retries with backoff); the next call reconnects and logs it. An
//! uncommitted write-back is simply run again, and a write-back whose commit was
//! lost with the connection repeats harmlessly: updates and deletes are idempotent,
//! and an insert is recorded under its token in `_concord.inserted` in the same
//! transaction. The role needs to create a schema in the database and own the synced
//! tables (to create triggers on them). Connections are unencrypted: use a local
//! server, a Unix socket or a trusted network.

mod convert;
mod error;
mod schema;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use crdt_model::Record;
use tokio::runtime::Runtime;
use tokio_postgres::error::SqlState;
use tokio_postgres::types::ToSql;
use tokio_postgres::{AsyncMessage, Client, NoTls, Statement};

use crate::values::{key_text, quote_literal, shorten};
use crate::{
    CaptureBatch, CapturedChange, ChangeFeed, CollectionSpec, Connector, ConnectorError, Cursor,
    FieldType, InvalidValue, OpOutcome, RecordKey, Rejection, RowState, TableSchema, Wake, WriteOp,
};
pub use error::PostgresError;
use schema::Table;

/// How often the connector looks for changes when no notification came (a lost one,
/// or a transaction that held capture back ended), unless configured otherwise.
pub const POLL_INTERVAL_DEFAULT: Duration = Duration::from_secs(1);
/// Longest wait of the listening connection between reconnect attempts.
const LISTEN_RETRY_MAX: Duration = Duration::from_secs(5);
/// How often the listening thread looks whether it should stop.
const LISTEN_STOP_CHECK: Duration = Duration::from_millis(200);
/// How long connecting may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Serializes installs by several agents on one database (an arbitrary constant).
const INSTALL_LOCK_KEY: i64 = 0x0063_6f6e_636f_7264;

/// The session settings that fix how values print (see `convert`).
const SESSION_SQL: &str = "SET DateStyle = 'ISO, YMD'; SET TimeZone = 'UTC'; \
     SET extra_float_digits = 1; SET IntervalStyle = 'postgres'";

/// The outbox entries after `($1, $2)` and at most `($3, $4)`, of transactions that
/// ended, in order; read in one statement so the boundary and the rows share a
/// snapshot.
const OUTBOX_READ_SQL: &str = "SELECT xid, id, tbl, key, old_key FROM _concord.outbox
     WHERE xid < pg_snapshot_xmin(pg_current_snapshot())::text::bigint
       AND (xid, id) > ($1, $2) AND (xid, id) <= ($3, $4)
     ORDER BY xid, id LIMIT $5";
/// The records with outbox entries after `($1, $2)`: changed since that capture.
/// A key change counts for both keys.
const OUTBOX_SINCE_SQL: &str = "SELECT tbl, key FROM _concord.outbox WHERE (xid, id) > ($1, $2)
     UNION SELECT tbl, old_key FROM _concord.outbox
     WHERE (xid, id) > ($1, $2) AND old_key IS NOT NULL";
const OUTBOX_TRIM_SQL: &str = "DELETE FROM _concord.outbox WHERE (xid, id) <= ($1, $2)";
const OUTBOX_LEN_SQL: &str = "SELECT count(*) FROM _concord.outbox";

/// A position in the outbox: transaction id, then sequence number.
type Position = (i64, i64);

/// The position after which everything is read.
const END: Position = (i64::MAX, i64::MAX);

/// What the connector needs to reach the server.
#[derive(Clone)]
pub struct PostgresConfig {
    /// The connection string: `postgresql://user:password@host:port/db` or
    /// `host=... port=... user=... dbname=...`. Never logged.
    pub url: String,
    /// How often to look for changes when no notification came.
    pub poll_interval: Duration,
}

impl std::fmt::Debug for PostgresConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PostgresConfig")
            .field("poll_interval", &self.poll_interval)
            .finish_non_exhaustive()
    }
}

/// One connection to a PostgreSQL database, capturing and writing the configured
/// tables. It blocks (it runs the driver on a runtime of its own); the agent gives it
/// a dedicated thread.
pub struct PostgresConnector {
    conn: Conn,
    poll_interval: Duration,
    tables: Vec<Table>,
    by_table: HashMap<String, usize>,
    by_collection: HashMap<String, usize>,
    /// Entries up to here belong to a rescan (see [`Connector::claim`]).
    rescan_upto: Position,
    /// When the last capture ran, for the polling fallback.
    last_capture: Option<Instant>,
    /// The listening thread, once subscribed.
    listener: Option<Listener>,
}

/// The connection for capture and write-back, made again after it broke.
struct Conn {
    /// The driver's runtime; `None` only while dropping.
    runtime: Option<Runtime>,
    config: tokio_postgres::Config,
    /// Host, port and database, for messages.
    server: String,
    /// The connection; `None` after it broke, until the next call reconnects.
    client: Option<Client>,
    /// Prepared statements of `client`.
    statements: HashMap<String, Statement>,
}

impl Drop for Conn {
    fn drop(&mut self) {
        // Without waiting: the connector may be dropped inside an async context.
        self.client = None;
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

impl Conn {
    /// Runs `future` to completion on the driver's runtime.
    fn block_on<F: Future>(&self, future: F) -> Result<F::Output, PostgresError> {
        match &self.runtime {
            Some(runtime) => Ok(runtime.block_on(future)),
            None => Err(PostgresError::Postgres("the driver has stopped".to_owned())),
        }
    }

    /// Connects again when the connection broke.
    fn ensure(&mut self) -> Result<(), PostgresError> {
        if self.client.as_ref().is_none_or(Client::is_closed) {
            self.client = None;
            self.statements.clear();
            let client = self.block_on(connect(&self.config, &self.server))??;
            tracing::info!(server = %self.server, "reconnected to PostgreSQL");
            self.client = Some(client);
        }
        Ok(())
    }

    /// The prepared statement for `sql` on the current connection.
    fn statement(&mut self, sql: &str) -> Result<Statement, PostgresError> {
        self.ensure()?;
        if let Some(statement) = self.statements.get(sql) {
            return Ok(statement.clone());
        }
        let statement = self.run(async |client| client.prepare(sql).await)?;
        self.statements.insert(sql.to_owned(), statement.clone());
        Ok(statement)
    }

    /// Runs `work` on the connection. After a failure a transaction left open is
    /// rolled back, and a broken connection is dropped, to be made again at the
    /// next call.
    fn run<T>(
        &mut self,
        work: impl AsyncFnOnce(&Client) -> Result<T, tokio_postgres::Error>,
    ) -> Result<T, PostgresError> {
        self.ensure()?;
        let Some(client) = self.client.as_ref() else {
            return Err(PostgresError::Postgres("not connected".to_owned()));
        };
        let error = match self.block_on(work(client))? {
            Ok(value) => return Ok(value),
            Err(error) => error,
        };
        if error.is_closed() || client.is_closed() {
            self.client = None;
            self.statements.clear();
        } else {
            let _ = self.block_on(client.batch_execute("ROLLBACK"));
        }
        Err(error.into())
    }
}

impl std::fmt::Debug for PostgresConnector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PostgresConnector")
            .field("server", &self.conn.server)
            .field("tables", &self.tables.len())
            .finish_non_exhaustive()
    }
}

/// The thread holding the listening connection; stopped when dropped.
struct Listener {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for Listener {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl PostgresConnector {
    /// Connects, validates every spec against the catalog and installs the outbox
    /// and the capture triggers, in one transaction.
    ///
    /// Opening again is idempotent: the triggers are dropped and recreated from the
    /// current specs, and the outbox keeps its entries. The first install on a table
    /// queues every row it holds (the initial import).
    pub fn open(
        config: &PostgresConfig,
        specs: Vec<CollectionSpec>,
    ) -> Result<PostgresConnector, PostgresError> {
        let pg_config: tokio_postgres::Config = config
            .url
            .parse()
            .map_err(|e: tokio_postgres::Error| PostgresError::BadUrl(e.to_string()))?;
        let server = describe_server(&pg_config);
        let mut by_collection = HashMap::with_capacity(specs.len());
        let mut by_table = HashMap::with_capacity(specs.len());
        for (index, spec) in specs.iter().enumerate() {
            if by_collection
                .insert(spec.collection.clone(), index)
                .is_some()
            {
                return Err(PostgresError::DuplicateCollection {
                    collection: spec.collection.clone(),
                });
            }
            if by_table.insert(spec.table.clone(), index).is_some() {
                return Err(PostgresError::DuplicateTable {
                    table: spec.table.clone(),
                });
            }
        }
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| PostgresError::Postgres(format!("cannot start the driver: {e}")))?;
        let client = runtime.block_on(connect(&pg_config, &server))?;
        let tables = runtime.block_on(install(&client, &specs))?;
        tracing::debug!(server, tables = tables.len(), "capture triggers installed");
        Ok(PostgresConnector {
            conn: Conn {
                runtime: Some(runtime),
                config: pg_config,
                server,
                client: Some(client),
                statements: HashMap::new(),
            },
            poll_interval: config.poll_interval,
            tables,
            by_table,
            by_collection,
            rescan_upto: (0, 0),
            last_capture: None,
            listener: None,
        })
    }

    /// The field type of each configured column of `collection`, or `None` when the
    /// collection is not configured.
    pub fn field_types(&self, collection: &str) -> Option<&BTreeMap<String, FieldType>> {
        let index = self.by_collection.get(collection)?;
        Some(&self.tables[*index].field_types)
    }

    /// The number of entries in the outbox.
    pub fn outbox_len(&mut self) -> Result<u64, PostgresError> {
        let statement = self.conn.statement(OUTBOX_LEN_SQL)?;
        let row = self
            .conn
            .run(async |client| client.query_one(&statement, &[]).await)?;
        Ok(u64::try_from(row.get::<_, i64>(0)).unwrap_or(0))
    }

    /// Reads up to `max` outbox entries after `after` and at most `upto`, and the
    /// current state of each record they name, in one read-only snapshot.
    fn capture_range(
        &mut self,
        after: Position,
        upto: Position,
        max: usize,
    ) -> Result<(Vec<CapturedChange>, Position), PostgresError> {
        let read = self.conn.statement(OUTBOX_READ_SQL)?;
        let selects: Vec<Statement> = self
            .tables
            .iter()
            .map(|table| self.conn.statement(&table.select_sql))
            .collect::<Result<_, _>>()?;
        let limit = i64::try_from(max).unwrap_or(i64::MAX);
        let tables = &self.tables;
        let by_table = &self.by_table;
        self.conn.run(async |client| {
            client
                .batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
                .await?;
            let entries = client
                .query(&read, &[&after.0, &after.1, &upto.0, &upto.1, &limit])
                .await?;
            let mut cursor = after;
            // Keys per table whose rows to read.
            let mut wanted: Vec<Vec<String>> = vec![Vec::new(); tables.len()];
            let mut listed: Vec<(usize, String, Option<String>)> =
                Vec::with_capacity(entries.len());
            for entry in &entries {
                cursor = (entry.get(0), entry.get(1));
                let table: String = entry.get(2);
                let Some(index) = by_table.get(&table).copied() else {
                    continue;
                };
                let key: String = entry.get(3);
                let old_key: Option<String> = entry.get(4);
                wanted[index].push(key.clone());
                listed.push((index, key, old_key));
            }
            let mut rows: Vec<HashMap<String, Vec<Option<String>>>> =
                vec![HashMap::new(); tables.len()];
            for (index, keys) in wanted.iter().enumerate() {
                if keys.is_empty() {
                    continue;
                }
                for row in client.query(&selects[index], &[keys]).await? {
                    let key: String = row.get(0);
                    let values = (1..row.len()).map(|i| row.get(i)).collect();
                    rows[index].insert(key, values);
                }
            }
            client.batch_execute("COMMIT").await?;
            Ok((states(tables, listed, &rows), cursor))
        })
    }

    /// Records `store` as the agent store capturing this database and returns the
    /// position up to which entries belong to a **rescan** ((0, 0) if none): when
    /// another store captured it before, every row is queued again in the same
    /// transaction.
    fn claim_store(&mut self, store: &[u8]) -> Result<Position, PostgresError> {
        let imports: Vec<(String, String)> = self
            .tables
            .iter()
            .map(|table| (table.name.clone(), table.import_sql()))
            .collect();
        self.conn.run(async |client| {
            client.batch_execute("BEGIN").await?;
            let owner = client
                .query_opt(
                    "SELECT store, rescan_xid, rescan_id FROM _concord.owner WHERE id = 1 FOR UPDATE",
                    &[],
                )
                .await?;
            let upto: Position = match owner {
                Some(row) if row.get::<_, &[u8]>(0) == store => (row.get(1), row.get(2)),
                None => (0, 0),
                Some(_) => {
                    for (table, sql) in &imports {
                        let queued = client.execute(sql.as_str(), &[]).await?;
                        tracing::warn!(
                            table = %table,
                            rows = queued,
                            "this database was captured by another store; rows queued again"
                        );
                    }
                    let row = client
                        .query_one(
                            "SELECT pg_current_xact_id()::text::bigint,
                                    COALESCE((SELECT max(id) FROM _concord.outbox), 0)",
                            &[],
                        )
                        .await?;
                    (row.get(0), row.get(1))
                }
            };
            client
                .execute(
                    "INSERT INTO _concord.owner (id, store, rescan_xid, rescan_id)
                     VALUES (1, $1, $2, $3)
                     ON CONFLICT (id) DO UPDATE SET store = excluded.store,
                         rescan_xid = excluded.rescan_xid, rescan_id = excluded.rescan_id",
                    &[&store, &upto.0, &upto.1],
                )
                .await?;
            client.batch_execute("COMMIT").await?;
            Ok(upto)
        })
    }

    /// Applies `ops` in one transaction whose changes the triggers ignore, with an
    /// outcome per op; see the module documentation.
    fn write_ops(
        &mut self,
        captured: Position,
        changed_since: &HashSet<RecordKey>,
        ops: &[WriteOp],
    ) -> Result<Vec<OpOutcome>, PostgresError> {
        let mut outcomes = vec![OpOutcome::WRITTEN; ops.len()];
        let mut plans: Vec<Option<Plan>> = Vec::with_capacity(ops.len());
        for (index, op) in ops.iter().enumerate() {
            match self.plan(op) {
                Ok(plan) => plans.push(Some(plan)),
                Err(rejection) => {
                    outcomes[index] = OpOutcome::Rejected(rejection);
                    plans.push(None);
                }
            }
        }
        let since = self.conn.statement(OUTBOX_SINCE_SQL)?;
        // Prepare every statement first: the attempt runs inside one transaction.
        let mut statements: Vec<Vec<Statement>> = Vec::with_capacity(plans.len());
        for plan in &plans {
            let sqls = plan.as_ref().map(Plan::sqls).unwrap_or_default();
            statements.push(
                sqls.into_iter()
                    .map(|sql| self.conn.statement(&sql))
                    .collect::<Result<_, _>>()?,
            );
        }
        // Each failed attempt takes one op out, so this runs at most ops + 1 times.
        for _ in 0..=ops.len() {
            let tables = &self.tables;
            let attempt = self.conn.run(async |client| {
                attempt(
                    client,
                    tables,
                    captured,
                    changed_since,
                    &since,
                    &plans,
                    &statements,
                )
                .await
            })?;
            match attempt {
                Attempt::Committed { assigned } => {
                    for (index, key) in assigned {
                        outcomes[index] = OpOutcome::Written {
                            key: Some(key),
                            version: None,
                        };
                    }
                    tracing::debug!(ops = ops.len(), "write-back committed");
                    return Ok(outcomes);
                }
                Attempt::Stale(indexes) => {
                    for index in indexes {
                        outcomes[index] = OpOutcome::Stale;
                        plans[index] = None;
                    }
                }
                Attempt::Failed(index, outcome) => {
                    outcomes[index] = outcome;
                    plans[index] = None;
                }
            }
        }
        Err(PostgresError::Postgres(
            "write-back did not commit after taking out every failing op".to_owned(),
        ))
    }

    /// Checks and converts one op without touching the database; the error is the
    /// reason the op is rejected.
    fn plan(&self, op: &WriteOp) -> Result<Plan, Rejection> {
        let collection = op.collection();
        let index =
            *self
                .by_collection
                .get(collection)
                .ok_or_else(|| Rejection::UnknownCollection {
                    collection: collection.to_owned(),
                })?;
        let table = &self.tables[index];
        let key = op.key().unwrap_or("(new)");
        let short_key = || shorten(key);
        if let Some(key) = op.key()
            && table.key.pg_type.field_type() == FieldType::Integer
            && key.parse::<i64>().is_err()
        {
            return Err(Rejection::KeyNotInteger {
                table: table.name.clone(),
                key: short_key(),
                column: table.key.field.clone(),
                declared: format!("declared {}", table.key.declared),
            });
        }
        let fields = match op {
            WriteOp::Delete { key, .. } => {
                return Ok(Plan {
                    table: index,
                    key: key.clone(),
                    action: Action::Delete,
                });
            }
            WriteOp::Upsert { fields, .. } | WriteOp::Insert { fields, .. } => fields,
        };
        let mut columns = Vec::with_capacity(fields.len());
        let mut values = Vec::with_capacity(fields.len());
        for (field, value) in fields {
            if field.eq_ignore_ascii_case(&table.key.field) && op.key().is_some() {
                if key_text(value).as_deref() != Some(key) {
                    return Err(Rejection::KeyFieldMismatch {
                        table: table.name.clone(),
                        key: short_key(),
                        field: field.clone(),
                        value: shorten(&value.to_string()),
                    });
                }
                continue;
            }
            let column = table
                .columns
                .iter()
                .position(|column| column.field == *field)
                .ok_or_else(|| Rejection::UnknownColumn {
                    table: table.name.clone(),
                    key: short_key(),
                    field: field.clone(),
                })?;
            let text = convert::write_value(&table.columns[column], value).map_err(|problem| {
                Rejection::ValueDoesNotFit {
                    table: table.name.clone(),
                    key: short_key(),
                    column: field.clone(),
                    problem,
                }
            })?;
            columns.push(column);
            values.push(text);
        }
        let action = match op {
            WriteOp::Insert { token, .. } => {
                if !table.assigns_keys {
                    return Err(Rejection::KeyNotAssigned {
                        table: table.name.clone(),
                        column: table.key.field.clone(),
                    });
                }
                Action::Insert {
                    token: token.clone(),
                    sql: insert_sql(table, &columns),
                    values,
                }
            }
            _ if columns.is_empty() => Action::InsertKey,
            _ => Action::Upsert {
                update_sql: update_sql(table, &columns),
                insert_sql: upsert_insert_sql(table, &columns),
                values,
            },
        };
        Ok(Plan {
            table: index,
            key: key.to_owned(),
            action,
        })
    }

    /// Trims the outbox up to `upto`: everything there is stored by the agent.
    fn trim(&mut self, upto: Position) -> Result<(), PostgresError> {
        let statement = self.conn.statement(OUTBOX_TRIM_SQL)?;
        self.conn.run(async |client| {
            // A trim lost at a crash only makes entries come back, and capture is
            // idempotent: it need not wait for the disk.
            client
                .batch_execute("BEGIN; SET LOCAL synchronous_commit = off")
                .await?;
            client.execute(&statement, &[&upto.0, &upto.1]).await?;
            client.batch_execute("COMMIT").await
        })
    }
}

/// The PostgreSQL connector under the common contract. Its cursor is the outbox
/// position `(xid, id)` as 16 big-endian bytes (empty: before everything).
impl Connector for PostgresConnector {
    fn kind(&self) -> &'static str {
        "postgres"
    }

    /// One PostgreSQL transaction per plan.
    fn writes_per_plan(&self) -> usize {
        crate::BULK_WRITES_PER_PLAN
    }

    fn field_types(&self, collection: &str) -> Option<&BTreeMap<String, FieldType>> {
        self.field_types(collection)
    }

    fn change_feed(&self) -> ChangeFeed {
        ChangeFeed::Push {
            fallback: self.poll_interval,
        }
    }

    fn subscribe(&mut self, wake: Wake) -> Result<(), ConnectorError> {
        // A listener left from before (its thread reconnects by itself) is replaced.
        self.listener = None;
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let config = self.conn.config.clone();
            let server = self.conn.server.clone();
            let stop = stop.clone();
            std::thread::Builder::new()
                .name("concord-pg-listen".into())
                .spawn(move || listen(config, server, wake, stop))
                .map_err(|e| PostgresError::Postgres(format!("cannot start a thread: {e}")))?
        };
        self.listener = Some(Listener {
            stop,
            thread: Some(thread),
        });
        Ok(())
    }

    fn assigns_keys(&self, collection: &str) -> bool {
        self.by_collection
            .get(collection)
            .is_some_and(|index| self.tables[*index].assigns_keys)
    }

    fn claim(&mut self, store: &[u8]) -> Result<(), ConnectorError> {
        self.rescan_upto = self.claim_store(store)?;
        Ok(())
    }

    fn changed(&mut self) -> Result<bool, ConnectorError> {
        // Notifications make the agent capture; this is the polling fallback.
        Ok(self
            .last_capture
            .is_none_or(|last| last.elapsed() >= self.poll_interval))
    }

    fn capture(&mut self, after: &Cursor, max: usize) -> Result<CaptureBatch, ConnectorError> {
        let after = position_of(after)?;
        self.last_capture = Some(Instant::now());
        // A batch never crosses the end of the rescan.
        let rescan = after < self.rescan_upto;
        let upto = if rescan { self.rescan_upto } else { END };
        let (changes, cursor) = self.capture_range(after, upto, max)?;
        Ok(CaptureBatch {
            changes,
            cursor: if cursor == after {
                cursor_of_bytes(after)
            } else {
                cursor_of(cursor)
            },
            rescan,
        })
    }

    fn backlog(&mut self, _after: &Cursor) -> Result<Option<u64>, ConnectorError> {
        // Entries are trimmed once durable: what the outbox holds is what waits.
        Ok(Some(self.outbox_len()?))
    }

    fn acknowledge(&mut self, durable: &Cursor) -> Result<(), ConnectorError> {
        let upto = position_of(durable)?;
        if upto != (0, 0) {
            self.trim(upto)?;
        }
        Ok(())
    }

    fn write_back(
        &mut self,
        captured: &Cursor,
        changed_since: &HashSet<RecordKey>,
        ops: &[WriteOp],
    ) -> Result<Vec<OpOutcome>, ConnectorError> {
        let captured = position_of(captured)?;
        Ok(self.write_ops(captured, changed_since, ops)?)
    }
}

/// The cursor `after` came as: the empty cursor stays empty, so "nothing new" is
/// recognised by equality.
fn cursor_of_bytes(position: Position) -> Cursor {
    if position == (0, 0) {
        Cursor::start()
    } else {
        cursor_of(position)
    }
}

/// The cursor of an outbox position.
pub fn cursor_of(position: Position) -> Cursor {
    let mut bytes = Vec::with_capacity(16);
    bytes.extend_from_slice(&position.0.to_be_bytes());
    bytes.extend_from_slice(&position.1.to_be_bytes());
    Cursor(bytes)
}

/// The outbox position a cursor stands for.
fn position_of(cursor: &Cursor) -> Result<Position, PostgresError> {
    match cursor.as_bytes() {
        [] => Ok((0, 0)),
        bytes if bytes.len() == 16 => {
            let (xid, id) = bytes.split_at(8);
            let xid = i64::from_be_bytes(xid.try_into().unwrap_or_default());
            let id = i64::from_be_bytes(id.try_into().unwrap_or_default());
            Ok((xid, id))
        }
        bytes => Err(PostgresError::BadCursor { len: bytes.len() }),
    }
}

/// Connects and sets the session up; a refused login or a missing database is told
/// apart from an unreachable server.
async fn connect(config: &tokio_postgres::Config, server: &str) -> Result<Client, PostgresError> {
    let mut config = config.clone();
    if config.get_connect_timeout().is_none() {
        config.connect_timeout(CONNECT_TIMEOUT);
    }
    config.application_name("concord");
    let (client, connection) = config.connect(NoTls).await.map_err(|e| {
        if e.as_db_error().is_some() {
            PostgresError::Refused {
                server: server.to_owned(),
                message: error::describe(&e),
            }
        } else {
            PostgresError::Connect {
                server: server.to_owned(),
                message: error::describe(&e),
            }
        }
    })?;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::debug!(error = %e, "PostgreSQL connection ended");
        }
    });
    client.batch_execute(SESSION_SQL).await?;
    let version: i32 = client
        .query_one("SELECT current_setting('server_version_num')::int", &[])
        .await?
        .get(0);
    if version < 130_000 {
        let version: String = client
            .query_one("SELECT current_setting('server_version')", &[])
            .await?
            .get(0);
        return Err(PostgresError::TooOld { version });
    }
    Ok(client)
}

/// Validates the specs and installs bookkeeping and triggers in one transaction.
async fn install(client: &Client, specs: &[CollectionSpec]) -> Result<Vec<Table>, PostgresError> {
    client.batch_execute("BEGIN").await?;
    client
        .execute("SELECT pg_advisory_xact_lock($1)", &[&INSTALL_LOCK_KEY])
        .await?;
    let mut tables = Vec::with_capacity(specs.len());
    for spec in specs {
        match Table::validate(client, spec).await {
            Ok(table) => tables.push(table),
            Err(e) => {
                let _ = client.batch_execute("ROLLBACK").await;
                return Err(e);
            }
        }
    }
    client.batch_execute(schema::BOOKKEEPING_SQL).await?;
    let installed = schema::captured_tables(client).await?;
    schema::drop_triggers(client).await?;
    for table in &tables {
        if !installed.contains(&table.oid) {
            let queued = client.execute(table.import_sql().as_str(), &[]).await?;
            tracing::info!(table = %table.name, rows = queued, "initial import queued");
        }
        client.batch_execute(&table.triggers_sql()).await?;
    }
    client.batch_execute("COMMIT").await?;
    Ok(tables)
}

/// Reads what the server says of each spec's table, changing nothing: the same
/// checks as [`PostgresConnector::open`], for checking a configuration.
pub fn inspect(
    config: &PostgresConfig,
    specs: &[CollectionSpec],
) -> Result<Vec<TableSchema>, PostgresError> {
    let pg_config: tokio_postgres::Config = config
        .url
        .parse()
        .map_err(|e: tokio_postgres::Error| PostgresError::BadUrl(e.to_string()))?;
    let server = describe_server(&pg_config);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| PostgresError::Postgres(format!("cannot start the driver: {e}")))?;
    runtime.block_on(async {
        let client = connect(&pg_config, &server).await?;
        let mut schemas = Vec::with_capacity(specs.len());
        for spec in specs {
            let table = Table::validate(&client, spec).await?;
            schemas.push(TableSchema {
                assigns_keys: table.assigns_keys,
                field_types: table.field_types,
            });
        }
        Ok(schemas)
    })
}

/// Host, port and database of a connection string, for messages (never the password).
fn describe_server(config: &tokio_postgres::Config) -> String {
    use tokio_postgres::config::Host;
    let host = match config.get_hosts().first() {
        Some(Host::Tcp(host)) => host.clone(),
        #[cfg(unix)]
        Some(Host::Unix(path)) => path.display().to_string(),
        None => "localhost".to_owned(),
    };
    let port = config.get_ports().first().copied().unwrap_or(5432);
    let db = config.get_dbname().unwrap_or("(default database)");
    format!("{host}:{port}/{db}")
}

/// The listening connection's thread: LISTEN, wake the agent at each notification,
/// and reconnect with backoff when the connection drops (waking the agent then, as
/// notifications may have been lost).
fn listen(config: tokio_postgres::Config, server: String, wake: Wake, stop: Arc<AtomicBool>) {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            tracing::error!(error = %e, "cannot start the PostgreSQL listener; polling only");
            return;
        }
    };
    let mut delay = Duration::from_millis(50);
    let mut lost = false;
    while !stop.load(Ordering::Relaxed) {
        let result: Result<(), String> = runtime.block_on(async {
            let mut config = config.clone();
            config.connect_timeout(CONNECT_TIMEOUT);
            config.application_name("concord-listen");
            let (client, mut connection) = config
                .connect(NoTls)
                .await
                .map_err(|e| error::describe(&e))?;
            // The connection's messages (notifications among them) come through a
            // task of their own, which also drives the LISTEN below.
            let (messages, mut received) = tokio::sync::mpsc::unbounded_channel();
            tokio::spawn(async move {
                loop {
                    let message = std::future::poll_fn(|cx| connection.poll_message(cx)).await;
                    let end = !matches!(message, Some(Ok(_)));
                    if messages.send(message).is_err() || end {
                        break;
                    }
                }
            });
            client
                .batch_execute(&format!("LISTEN {}", schema::CHANNEL))
                .await
                .map_err(|e| error::describe(&e))?;
            if lost {
                tracing::info!(server = %server, "listening to PostgreSQL again");
            }
            lost = false;
            delay = Duration::from_millis(50);
            // Changes may have come while not listening.
            wake();
            while !stop.load(Ordering::Relaxed) {
                match tokio::time::timeout(LISTEN_STOP_CHECK, received.recv()).await {
                    Err(_) => {}
                    Ok(Some(Some(Ok(AsyncMessage::Notification(_))))) => wake(),
                    Ok(Some(Some(Ok(_)))) => {}
                    Ok(Some(Some(Err(e)))) => return Err(error::describe(&e)),
                    Ok(Some(None) | None) => return Err("the connection closed".to_owned()),
                }
            }
            drop(client);
            Ok(())
        });
        if let Err(message) = result {
            if !lost {
                tracing::warn!(server = %server, error = %message, retry_in_ms = delay.as_millis() as u64, "lost the PostgreSQL listening connection; polling until it is back");
            }
            lost = true;
            let deadline = Instant::now() + delay;
            while Instant::now() < deadline && !stop.load(Ordering::Relaxed) {
                std::thread::sleep(LISTEN_STOP_CHECK.min(delay));
            }
            delay = (delay * 2).min(LISTEN_RETRY_MAX);
        }
    }
}

/// The captured changes, each record once, in outbox order, with the state read.
fn states(
    tables: &[Table],
    listed: Vec<(usize, String, Option<String>)>,
    rows: &[HashMap<String, Vec<Option<String>>>],
) -> Vec<CapturedChange> {
    // Keys that a later entry moved away from: their own entries would report the
    // row gone, while it lives on under its new key.
    let moved_away: HashSet<(usize, String)> = listed
        .iter()
        .filter_map(|(index, _, old)| Some((*index, old.clone()?)))
        .collect();
    let mut seen: HashSet<(usize, String)> = HashSet::with_capacity(listed.len());
    let mut changes = Vec::with_capacity(listed.len());
    for (index, key, old_key) in listed {
        let table = &tables[index];
        let state = match rows[index].get(&key) {
            None => RowState::Absent,
            Some(values) => read_row(table, &key, values),
        };
        if old_key.is_none()
            && state == RowState::Absent
            && moved_away.contains(&(index, key.clone()))
        {
            continue;
        }
        if !seen.insert((index, key.clone())) && old_key.is_none() {
            continue;
        }
        changes.push(CapturedChange {
            collection: table.collection.clone(),
            key,
            previous_key: old_key,
            state,
        });
    }
    changes
}

/// Converts one row's printed values.
fn read_row(table: &Table, key: &str, values: &[Option<String>]) -> RowState {
    let mut record = Record::new();
    for (column, text) in table.columns.iter().zip(values) {
        let Some(value) = convert::read_value(column, text.as_deref()) else {
            return RowState::Invalid(InvalidValue {
                table: table.name.clone(),
                key: shorten(key),
                column: column.field.clone(),
                found: format!("'{}'", shorten(text.as_deref().unwrap_or("NULL"))),
                expected: column.pg_type.field_type(),
                declared: format!("declared {}", column.declared),
            });
        };
        record.insert(column.field.clone(), value);
    }
    RowState::Present(record)
}

/// One op, checked and converted.
struct Plan {
    table: usize,
    key: String,
    action: Action,
}

/// What one op runs.
enum Action {
    /// Update the row; insert it when no row was updated. `values` are the field
    /// values; the key comes last.
    Upsert {
        update_sql: String,
        insert_sql: String,
        values: Vec<Option<String>>,
    },
    /// Insert a row holding only the key, unless it exists.
    InsertKey,
    /// Insert a row whose key the server assigns, unless the insert with this token
    /// was done before (then update that row with the fields); returns the key.
    Insert {
        token: String,
        sql: String,
        values: Vec<Option<String>>,
    },
    /// Delete the row.
    Delete,
}

impl Plan {
    /// The statements the op runs, to prepare.
    fn sqls(&self) -> Vec<String> {
        match &self.action {
            Action::Upsert {
                update_sql,
                insert_sql,
                ..
            } => vec![update_sql.clone(), insert_sql.clone()],
            Action::Insert { sql, .. } => vec![sql.clone()],
            Action::InsertKey | Action::Delete => Vec::new(),
        }
    }
}

/// `UPDATE table SET c = $1, ... WHERE key = $n`.
fn update_sql(table: &Table, columns: &[usize]) -> String {
    let assignments: Vec<String> = columns
        .iter()
        .enumerate()
        .map(|(n, c)| {
            let column = &table.columns[*c];
            format!("{} = {}", column.sql_name, column.param(n + 1))
        })
        .collect();
    format!(
        "UPDATE {} SET {} WHERE {} = {}",
        table.sql_name,
        assignments.join(", "),
        table.key.sql_name,
        table.key.param(columns.len() + 1)
    )
}

/// `INSERT INTO table (c, ..., key) VALUES ($1, ..., $n)`.
fn upsert_insert_sql(table: &Table, columns: &[usize]) -> String {
    let mut names: Vec<&str> = columns
        .iter()
        .map(|c| table.columns[*c].sql_name.as_str())
        .collect();
    names.push(&table.key.sql_name);
    let mut params: Vec<String> = columns
        .iter()
        .enumerate()
        .map(|(n, c)| table.columns[*c].param(n + 1))
        .collect();
    params.push(table.key.param(columns.len() + 1));
    let overriding = if table.identity_always {
        " OVERRIDING SYSTEM VALUE"
    } else {
        ""
    };
    format!(
        "INSERT INTO {} ({}){overriding} VALUES ({})",
        table.sql_name,
        names.join(", "),
        params.join(", ")
    )
}

/// An insert whose key the server assigns, done once per token: `$1` is the token,
/// the field values follow. Returns the key, the first time and every time after.
fn insert_sql(table: &Table, columns: &[usize]) -> String {
    let names: Vec<&str> = columns
        .iter()
        .map(|c| table.columns[*c].sql_name.as_str())
        .collect();
    let params: Vec<String> = columns
        .iter()
        .enumerate()
        .map(|(n, c)| table.columns[*c].param(n + 2))
        .collect();
    let tbl = quote_literal(&table.name);
    let insert = if names.is_empty() {
        format!("INSERT INTO {} DEFAULT VALUES", table.sql_name)
    } else {
        format!(
            "INSERT INTO {} ({}) SELECT {} WHERE NOT EXISTS (SELECT 1 FROM done)",
            table.sql_name,
            names.join(", "),
            params.join(", ")
        )
    };
    // A repeated insert writes the fields it carries now into the row it made.
    let update = if names.is_empty() {
        String::new()
    } else {
        let assignments: Vec<String> = names
            .iter()
            .zip(&params)
            .map(|(name, param)| format!("{name} = {param}"))
            .collect();
        format!(
            "upd AS (UPDATE {} SET {} WHERE {key} = (SELECT CAST(key AS {cast}) FROM done)),",
            table.sql_name,
            assignments.join(", "),
            key = table.key.sql_name,
            cast = table.key.cast,
        )
    };
    // Without columns, DEFAULT VALUES cannot be made conditional: the caller
    // checks the token first (see `attempt`).
    format!(
        "WITH done AS ({done}),
              {update}
              ins AS ({insert} RETURNING {key}::text AS key),
              rec AS (INSERT INTO _concord.inserted (token, tbl, key)
                      SELECT $1::text, {tbl}, key FROM ins
                      ON CONFLICT (token, tbl) DO UPDATE SET key = EXCLUDED.key)
         SELECT key FROM done UNION ALL SELECT key FROM ins",
        done = inserted_sql(table, "$1::text"),
        key = table.key.sql_name
    )
}

/// The key of the row an insert with token `token` (a parameter) made, if the row
/// still exists: a row deleted since (the record left the tool and came back) is
/// inserted anew.
fn inserted_sql(table: &Table, token: &str) -> String {
    format!(
        "SELECT i.key FROM _concord.inserted i JOIN {table} t \
           ON t.{key} = CAST(i.key AS {cast}) \
         WHERE i.token = {token} AND i.tbl = {tbl}",
        table = table.sql_name,
        key = table.key.sql_name,
        cast = table.key.cast,
        tbl = quote_literal(&table.name),
    )
}

/// How one write-back transaction ended.
enum Attempt {
    /// Committed, with the keys the server assigned to inserted rows.
    Committed { assigned: Vec<(usize, String)> },
    /// Nothing committed: these ops' records changed since their capture.
    Stale(Vec<usize>),
    /// Nothing committed: this op failed with this outcome (stale, or rejected).
    Failed(usize, OpOutcome),
}

/// Runs one write-back transaction over the plans still standing.
#[allow(clippy::too_many_arguments)]
async fn attempt(
    client: &Client,
    tables: &[Table],
    captured: Position,
    changed_since: &HashSet<RecordKey>,
    since: &Statement,
    plans: &[Option<Plan>],
    statements: &[Vec<Statement>],
) -> Result<Attempt, tokio_postgres::Error> {
    client
        .batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ; SET LOCAL concord.writing = 'on'")
        .await?;
    let uncaptured: HashSet<(String, String)> = client
        .query(since, &[&captured.0, &captured.1])
        .await?
        .into_iter()
        .map(|row| (row.get(0), row.get(1)))
        .collect();
    let stale: Vec<usize> = plans
        .iter()
        .enumerate()
        .filter_map(|(index, plan)| {
            let plan = plan.as_ref()?;
            if matches!(plan.action, Action::Insert { .. }) {
                return None;
            }
            let table = &tables[plan.table];
            let changed = uncaptured.contains(&(table.name.clone(), plan.key.clone()))
                || changed_since.contains(&(table.collection.clone(), plan.key.clone()));
            changed.then_some(index)
        })
        .collect();
    if !stale.is_empty() {
        client.batch_execute("ROLLBACK").await?;
        return Ok(Attempt::Stale(stale));
    }
    let mut assigned = Vec::new();
    for (index, plan) in plans.iter().enumerate() {
        let Some(plan) = plan else { continue };
        let table = &tables[plan.table];
        match execute(client, table, plan, &statements[index]).await {
            Ok(Some(key)) => assigned.push((index, key)),
            Ok(None) => {}
            Err(error) => {
                let Some(outcome) = record_fault(table, plan, &error) else {
                    return Err(error);
                };
                client.batch_execute("ROLLBACK").await?;
                return Ok(Attempt::Failed(index, outcome));
            }
        }
    }
    client.batch_execute("COMMIT").await?;
    Ok(Attempt::Committed { assigned })
}

/// Runs the statements of one op; an insert returns the key the server assigned.
async fn execute(
    client: &Client,
    table: &Table,
    plan: &Plan,
    statements: &[Statement],
) -> Result<Option<String>, tokio_postgres::Error> {
    let key: &(dyn ToSql + Sync) = &plan.key;
    match &plan.action {
        Action::Upsert { values, .. } => {
            let mut params: Vec<&(dyn ToSql + Sync)> =
                values.iter().map(|v| v as &(dyn ToSql + Sync)).collect();
            params.push(key);
            let updated = client.execute(&statements[0], &params).await?;
            if updated == 0 {
                client.execute(&statements[1], &params).await?;
            }
            Ok(None)
        }
        Action::InsertKey => {
            client
                .execute(table.insert_key_sql.as_str(), &[key])
                .await?;
            Ok(None)
        }
        Action::Delete => {
            client.execute(table.delete_sql.as_str(), &[key]).await?;
            Ok(None)
        }
        Action::Insert { token, values, .. } => {
            let mut params: Vec<&(dyn ToSql + Sync)> = vec![token];
            params.extend(values.iter().map(|v| v as &(dyn ToSql + Sync)));
            if values.is_empty() {
                // DEFAULT VALUES cannot be made conditional in SQL: look first.
                let done = client
                    .query_opt(&inserted_sql(table, "$1::text"), &[token])
                    .await?;
                if let Some(row) = done {
                    return Ok(Some(row.get(0)));
                }
            }
            let row = client.query_one(&statements[0], &params).await?;
            Ok(Some(row.get(0)))
        }
    }
}

/// The outcome of an op whose statement failed because of the record itself: stale
/// for a serialization failure or a deadlock (the record changed concurrently) and
/// for a duplicate key (a concurrent insert of the same key), rejected for a value
/// or constraint the server refuses. `None` for a failing server or connection.
fn record_fault(table: &Table, plan: &Plan, error: &tokio_postgres::Error) -> Option<OpOutcome> {
    let db = error.as_db_error()?;
    let code = db.code();
    if *code == SqlState::T_R_SERIALIZATION_FAILURE || *code == SqlState::T_R_DEADLOCK_DETECTED {
        return Some(OpOutcome::Stale);
    }
    if *code == SqlState::UNIQUE_VIOLATION
        && db.constraint() == Some(table.key_constraint.as_str())
        && !matches!(plan.action, Action::Insert { .. })
    {
        return Some(OpOutcome::Stale);
    }
    // Class 22: data exception; 23: integrity constraint; P0: a user's RAISE;
    // 42: a value a cast or a domain refuses at execution.
    let class = &code.code()[..2];
    if matches!(class, "22" | "23" | "P0" | "42") {
        return Some(OpOutcome::Rejected(Rejection::Refused {
            tool: "PostgreSQL".to_owned(),
            table: table.name.clone(),
            key: shorten(&plan.key),
            message: error::describe(error),
        }));
    }
    None
}
