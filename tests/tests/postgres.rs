//! The PostgreSQL connector against a throwaway server the harness starts itself:
//! capture, commit order, TRUNCATE, per-record staleness and rejections, inserts
//! done once, wake-ups, and clear errors for bad input.

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use concord_tests::postgres::Postgres;
use concord_tests::wait_for;
use connectors::postgres::{PostgresConfig, PostgresConnector, PostgresError};
use connectors::{
    CaptureBatch, CollectionSpec, Connector, Cursor, OpOutcome, Rejection, RowState, WriteOp,
};
use crdt_model::{Decimal, Record, Timestamp, Value};

const CUSTOMERS: &str = "CREATE TABLE customers (
    id bigserial PRIMARY KEY,
    name text,
    email varchar(40),
    age integer CHECK (age >= 0)
)";

fn spec(table: &str, columns: &[&str]) -> CollectionSpec {
    CollectionSpec {
        collection: table.to_owned(),
        table: table.to_owned(),
        primary_key: "id".to_owned(),
        columns: columns.iter().map(|c| (*c).to_owned()).collect(),
    }
}

fn config(pg: &Postgres, db: &str) -> PostgresConfig {
    PostgresConfig {
        url: pg.url(db),
        poll_interval: Duration::from_millis(100),
    }
}

/// A server with database `crm` holding `schema`.
fn server(schema: &str) -> anyhow::Result<Postgres> {
    let pg = Postgres::start()?;
    pg.create_database("crm")?;
    pg.psql("crm", schema)?;
    Ok(pg)
}

/// Opens the connector off the async runtime (it runs a driver runtime of its own).
async fn open(
    pg: &Postgres,
    specs: Vec<CollectionSpec>,
) -> anyhow::Result<Result<PostgresConnector, PostgresError>> {
    let config = config(pg, "crm");
    Ok(tokio::task::spawn_blocking(move || PostgresConnector::open(&config, specs)).await?)
}

/// Runs `work` on the connector off the async runtime and hands it back.
async fn with<T: Send + 'static>(
    mut connector: PostgresConnector,
    work: impl FnOnce(&mut PostgresConnector) -> T + Send + 'static,
) -> anyhow::Result<(PostgresConnector, T)> {
    Ok(tokio::task::spawn_blocking(move || {
        let value = work(&mut connector);
        (connector, value)
    })
    .await?)
}

fn text(value: &str) -> Value {
    Value::Text(value.to_owned())
}

fn keys(batch: &CaptureBatch) -> Vec<String> {
    batch.changes.iter().map(|c| c.key.clone()).collect()
}

/// Captures, reading after `after`, as the agent's tool loop would.
fn capture(connector: &mut PostgresConnector, after: &Cursor) -> anyhow::Result<CaptureBatch> {
    Ok(connector.capture(after, 1000)?)
}

/// The harness starts its own server on a free loopback port, which keeps data
/// across a clean restart and forgets nothing committed across a crash.
#[test]
fn a_throwaway_server_starts_keeps_data_and_restarts() -> anyhow::Result<()> {
    let pg = Postgres::start()?;
    pg.create_database("crm")?;
    pg.psql(
        "crm",
        "CREATE TABLE customers (id bigserial PRIMARY KEY, name text); \
         INSERT INTO customers (name) VALUES ('Ada')",
    )?;
    assert_eq!(pg.psql("crm", "SELECT id, name FROM customers")?, "1|Ada");
    pg.stop_server("immediate")?;
    pg.start_server()?;
    assert_eq!(pg.psql("crm", "SELECT name FROM customers")?, "Ada");
    let other = Postgres::start()?;
    assert_ne!(pg.port, other.port, "two servers, two ports");
    Ok(())
}

/// Inserts, updates and deletes are captured with the rows' current state; the
/// agent's own write-back is not captured back; acknowledged entries are trimmed.
#[tokio::test(flavor = "multi_thread")]
async fn changes_are_captured_and_write_back_does_not_echo() -> anyhow::Result<()> {
    let pg = server(CUSTOMERS)?;
    pg.psql(
        "crm",
        "INSERT INTO customers (name, age) VALUES ('before', 1)",
    )?;
    let connector = open(&pg, vec![spec("customers", &["name", "age"])]).await??;
    let (connector, batch) = with(connector, |c| capture(c, &Cursor::start())).await?;
    let batch = batch?;
    assert_eq!(keys(&batch), ["1"], "rows present at install are imported");
    let tool = pg.connect("crm").await?;
    tool.batch_execute(
        "INSERT INTO customers (name, age) VALUES ('Ada', 36);
         UPDATE customers SET name = 'Before' WHERE id = 1;
         INSERT INTO customers (name) VALUES ('gone'); DELETE FROM customers WHERE name = 'gone';",
    )
    .await?;
    let after = batch.cursor.clone();
    let (connector, second) = with(connector, move |c| capture(c, &after)).await?;
    let second = second?;
    assert_eq!(keys(&second), ["2", "1", "3"]);
    assert_eq!(
        second.changes[0].state,
        RowState::Present(Record::from([
            ("name".to_owned(), text("Ada")),
            ("age".to_owned(), Value::Int(36)),
        ]))
    );
    assert_eq!(second.changes[2].state, RowState::Absent);

    let cursor = second.cursor.clone();
    let ops = vec![
        WriteOp::Upsert {
            collection: "customers".into(),
            key: "2".into(),
            fields: Record::from([("name".to_owned(), text("Ada L."))]),
        },
        WriteOp::Upsert {
            collection: "customers".into(),
            key: "40".into(),
            fields: Record::from([("name".to_owned(), text("Grace"))]),
        },
        WriteOp::Delete {
            collection: "customers".into(),
            key: "1".into(),
        },
    ];
    let (mut connector, outcomes) = with(connector, move |c| {
        let outcomes = c.write_back(&cursor, &HashSet::new(), &ops);
        c.acknowledge(&cursor).map(|()| outcomes)
    })
    .await?;
    assert_eq!(outcomes??, vec![OpOutcome::WRITTEN; 3]);
    assert_eq!(
        pg.psql("crm", "SELECT id, name FROM customers ORDER BY id")?,
        "2|Ada L.\n40|Grace"
    );
    let after = second.cursor.clone();
    let third = tokio::task::block_in_place(|| capture(&mut connector, &after))?;
    assert!(third.changes.is_empty(), "no echo: {:?}", third.changes);
    assert_eq!(tokio::task::block_in_place(|| connector.outbox_len())?, 0);
    Ok(())
}

/// Commit order is not sequence order: a transaction that took an earlier outbox
/// entry commits after a later one. Capture holds the later one back rather than
/// move its cursor past the earlier, so both are captured.
#[tokio::test(flavor = "multi_thread")]
async fn a_transaction_that_commits_late_is_never_skipped() -> anyhow::Result<()> {
    let pg = server(CUSTOMERS)?;
    let connector = open(&pg, vec![spec("customers", &["name"])]).await??;
    let long = pg.connect("crm").await?;
    let short = pg.connect("crm").await?;
    long.batch_execute("BEGIN; INSERT INTO customers (id, name) VALUES (1, 'long')")
        .await?;
    short
        .batch_execute("INSERT INTO customers (id, name) VALUES (2, 'short')")
        .await?;
    let mut seen = Vec::new();
    let (connector, first) = with(connector, |c| capture(c, &Cursor::start())).await?;
    let first = first?;
    seen.extend(keys(&first));
    long.batch_execute("COMMIT").await?;
    let after = first.cursor.clone();
    let (_connector, second) = with(connector, move |c| capture(c, &after)).await?;
    seen.extend(keys(&second?));
    seen.sort();
    assert_eq!(seen, ["1", "2"], "both transactions are captured");
    Ok(())
}

/// A TRUNCATE of a synced table is captured as a delete of every row it held.
#[tokio::test(flavor = "multi_thread")]
async fn truncate_is_captured_as_deletes() -> anyhow::Result<()> {
    let pg = server(CUSTOMERS)?;
    pg.psql("crm", "INSERT INTO customers (name) VALUES ('a'), ('b')")?;
    let connector = open(&pg, vec![spec("customers", &["name"])]).await??;
    let (connector, first) = with(connector, |c| capture(c, &Cursor::start())).await?;
    let first = first?;
    pg.psql("crm", "TRUNCATE customers")?;
    let after = first.cursor.clone();
    let (_connector, second) = with(connector, move |c| capture(c, &after)).await?;
    let second = second.map_err(|e| anyhow::anyhow!("capture after TRUNCATE: {e}"))?;
    let mut truncated = keys(&second);
    truncated.sort();
    assert_eq!(truncated, ["1", "2"]);
    assert!(second.changes.iter().all(|c| c.state == RowState::Absent));
    Ok(())
}

/// Staleness and rejections are per record: an op on a record the user changed
/// since the capture is stale, an op the server refuses (a CHECK constraint, a
/// varchar limit) is rejected with its reason, and the other ops commit.
#[tokio::test(flavor = "multi_thread")]
async fn stale_and_rejected_ops_are_per_record() -> anyhow::Result<()> {
    let pg = server(CUSTOMERS)?;
    pg.psql(
        "crm",
        "INSERT INTO customers (id, name) VALUES (1, 'a'), (2, 'b'), (3, 'c')",
    )?;
    let connector = open(&pg, vec![spec("customers", &["name", "email", "age"])]).await??;
    let (connector, batch) = with(connector, |c| capture(c, &Cursor::start())).await?;
    let cursor = batch?.cursor;
    pg.psql("crm", "UPDATE customers SET name = 'edited' WHERE id = 1")?;
    let upsert = |key: &str, field: &str, value: Value| WriteOp::Upsert {
        collection: "customers".into(),
        key: key.into(),
        fields: Record::from([(field.to_owned(), value)]),
    };
    let ops = vec![
        upsert("1", "name", text("merged")),
        upsert("2", "age", Value::Int(-5)),
        upsert("3", "email", text(&"x".repeat(41))),
        upsert("3", "name", text("written")),
    ];
    let (_connector, outcomes) = with(connector, move |c| {
        c.write_back(&cursor, &HashSet::new(), &ops)
    })
    .await?;
    let outcomes = outcomes?;
    assert_eq!(outcomes[0], OpOutcome::Stale);
    match &outcomes[1] {
        OpOutcome::Rejected(Rejection::Refused { message, .. }) => {
            assert!(message.contains("check constraint"), "{message}");
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    match &outcomes[2] {
        OpOutcome::Rejected(Rejection::ValueDoesNotFit { problem, .. }) => {
            assert!(problem.contains("at most 40 characters"), "{problem}");
        }
        other => panic!("expected a value that does not fit, got {other:?}"),
    }
    assert_eq!(outcomes[3], OpOutcome::WRITTEN);
    assert_eq!(
        pg.psql("crm", "SELECT id, name, age FROM customers ORDER BY id")?,
        "1|edited|\n2|b|\n3|written|"
    );
    Ok(())
}

/// An insert whose key the server assigns returns the key; the same insert again
/// (the agent crashed before recording the key) returns the same key and inserts
/// nothing.
#[tokio::test(flavor = "multi_thread")]
async fn an_insert_is_done_once_per_token() -> anyhow::Result<()> {
    let pg = server(CUSTOMERS)?;
    let connector = open(&pg, vec![spec("customers", &["name"])]).await??;
    assert!(connector.assigns_keys("customers"));
    let insert = WriteOp::Insert {
        collection: "customers".into(),
        token: "doc-1".into(),
        fields: Record::from([("name".to_owned(), text("Ada"))]),
    };
    let ops = vec![insert.clone()];
    let (connector, first) = with(connector, move |c| {
        c.write_back(&Cursor::start(), &HashSet::new(), &ops)
    })
    .await?;
    let ops = vec![insert];
    let (connector, again) = with(connector, move |c| {
        c.write_back(&Cursor::start(), &HashSet::new(), &ops)
    })
    .await?;
    let written = OpOutcome::Written {
        key: Some("1".to_owned()),
        version: None,
    };
    assert_eq!(first?, std::slice::from_ref(&written));
    assert_eq!(again?, std::slice::from_ref(&written));
    assert_eq!(pg.psql("crm", "SELECT id, name FROM customers")?, "1|Ada");
    // Regression (a retried insert kept old fields): planned again after the record
    // changed, the insert writes its new fields into the row it made.
    let ops = vec![WriteOp::Insert {
        collection: "customers".into(),
        token: "doc-1".into(),
        fields: Record::from([("name".to_owned(), text("Ada L."))]),
    }];
    let (connector, changed) = with(connector, move |c| {
        c.write_back(&Cursor::start(), &HashSet::new(), &ops)
    })
    .await?;
    assert_eq!(changed?, [written]);
    assert_eq!(
        pg.psql("crm", "SELECT id, name FROM customers")?,
        "1|Ada L."
    );
    // Regression (a record that left a tool and came back was never inserted
    // again): once its row is gone, the same token inserts a new row.
    pg.psql("crm", "DELETE FROM customers")?;
    let ops = vec![WriteOp::Insert {
        collection: "customers".into(),
        token: "doc-1".into(),
        fields: Record::from([("name".to_owned(), text("Ada again"))]),
    }];
    let (_connector, back) = with(connector, move |c| {
        c.write_back(&Cursor::start(), &HashSet::new(), &ops)
    })
    .await?;
    assert_eq!(
        back?,
        [OpOutcome::Written {
            key: Some("2".to_owned()),
            version: None,
        }]
    );
    assert_eq!(
        pg.psql("crm", "SELECT id, name FROM customers")?,
        "2|Ada again"
    );
    Ok(())
}

/// A commit by the user's tool wakes the agent through LISTEN/NOTIFY; the
/// agent's own write-back does not.
#[tokio::test(flavor = "multi_thread")]
async fn a_commit_wakes_the_agent() -> anyhow::Result<()> {
    let pg = server(CUSTOMERS)?;
    let connector = open(&pg, vec![spec("customers", &["name"])]).await??;
    let wakes = Arc::new(AtomicUsize::new(0));
    let counter = wakes.clone();
    let (_connector, subscribed) = with(connector, move |c| {
        c.subscribe(Arc::new(move || {
            counter.fetch_add(1, Ordering::SeqCst);
        }))
    })
    .await?;
    subscribed?;
    // Subscribing wakes once: changes may have come before it listened.
    wait_for("the first wake-up", Duration::from_secs(10), || {
        Ok(wakes.load(Ordering::SeqCst) >= 1)
    })
    .await?;
    let before = wakes.load(Ordering::SeqCst);
    pg.psql("crm", "INSERT INTO customers (name) VALUES ('Ada')")?;
    wait_for("a wake-up after a commit", Duration::from_secs(10), || {
        Ok(wakes.load(Ordering::SeqCst) > before)
    })
    .await?;
    Ok(())
}

/// Every type round trips exactly: read from what PostgreSQL stores, written back
/// into another row, read again the same, and stored the same.
#[tokio::test(flavor = "multi_thread")]
async fn every_supported_type_round_trips() -> anyhow::Result<()> {
    let pg = server(
        "CREATE TABLE items (
            id integer PRIMARY KEY,
            small smallint, big bigint, amount numeric(12,2), exact numeric,
            ratio real, score double precision, active boolean, note text,
            code varchar(8), at timestamp, seen timestamptz, born date,
            ref uuid, doc jsonb, raw json
        )",
    )?;
    let columns = [
        "small", "big", "amount", "exact", "ratio", "score", "active", "note", "code", "at",
        "seen", "born", "ref", "doc", "raw",
    ];
    let long_note = "é".repeat(5000);
    pg.psql(
        "crm",
        &format!(
            "INSERT INTO items VALUES (1, -7, 9007199254740993, 1234567890.50,
                 123456789012345678901234567890.000000000001, 0.1, 2.5e-300, true, '{long_note}',
                 'ABC', '2024-05-01 10:00:00.123456', '2024-05-01 12:00:00.5+02', '2024-02-29',
                 'A0EEBC99-9C0B-4EF8-BB6D-6BB9BD380A11', '{{\"b\": [1, 2.5, null], \"a\": \"x\"}}',
                 '{{\"z\": 1}}')"
        ),
    )?;
    let mut item = spec("items", &columns);
    item.collection = "items".into();
    let connector = open(&pg, vec![item]).await??;
    let (connector, batch) = with(connector, |c| capture(c, &Cursor::start())).await?;
    let batch = batch?;
    let RowState::Present(record) = &batch.changes[0].state else {
        panic!("row 1 is present: {:?}", batch.changes[0].state);
    };
    let decimal = |t: &str| Value::Decimal(Decimal::parse(t).expect("decimal"));
    assert_eq!(record["small"], Value::Int(-7));
    assert_eq!(record["big"], Value::Int(9_007_199_254_740_993));
    assert_eq!(record["amount"], decimal("1234567890.5"));
    assert_eq!(
        record["exact"],
        decimal("123456789012345678901234567890.000000000001")
    );
    assert_eq!(record["ratio"], Value::Float(0.1));
    assert_eq!(record["score"], Value::Float(2.5e-300));
    assert_eq!(record["active"], Value::Bool(true));
    assert_eq!(record["note"], Value::Text(long_note.clone()));
    assert_eq!(
        record["at"],
        Value::Timestamp(Timestamp::from_micros(1_714_557_600_123_456))
    );
    assert_eq!(
        record["seen"],
        Value::Timestamp(Timestamp::from_micros(1_714_557_600_500_000)),
        "a timestamptz written in another zone is the same instant"
    );
    assert_eq!(
        record["born"],
        Value::Timestamp(Timestamp::from_micros(1_709_164_800_000_000))
    );
    assert_eq!(record["ref"], text("a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11"));
    let fields = record.clone();
    let cursor = batch.cursor.clone();
    let ops = vec![WriteOp::Upsert {
        collection: "items".into(),
        key: "2".into(),
        fields,
    }];
    let (connector, outcomes) = with(connector, move |c| {
        c.write_back(&cursor, &HashSet::new(), &ops)
    })
    .await?;
    assert_eq!(outcomes?, [OpOutcome::WRITTEN]);
    // `json` keeps the text it was given; compare it as a value.
    let all = columns.join(", ").replace("raw", "raw::jsonb");
    let stored = pg.psql(
        "crm",
        &format!(
            "SELECT {all} FROM items WHERE id = 1 UNION ALL SELECT {all} FROM items WHERE id = 2"
        ),
    )?;
    let rows: Vec<&str> = stored.lines().collect();
    assert_eq!(rows.len(), 2);
    assert_eq!(rows[0], rows[1], "row 2 is stored exactly as row 1");
    // And read back, the written row is the same record.
    pg.psql("crm", "UPDATE items SET small = small WHERE id = 2")?;
    let after = batch.cursor.clone();
    let (_connector, again) = with(connector, move |c| capture(c, &after)).await?;
    let again = again?;
    assert_eq!(again.changes[0].state, RowState::Present(record.clone()));
    Ok(())
}

/// Bad input at start is a clear error naming what and where: an unsupported
/// column type, a missing table, a wrong password, a server that is down.
#[tokio::test(flavor = "multi_thread")]
async fn bad_input_at_start_is_named() -> anyhow::Result<()> {
    let pg = server(
        "CREATE TABLE files (id integer PRIMARY KEY, body bytea, name text);
         CREATE VIEW recent AS SELECT * FROM files",
    )?;
    let err = open(&pg, vec![spec("files", &["name", "body"])])
        .await?
        .expect_err("bytea");
    let message = err.to_string();
    assert!(
        message.contains("`files`") && message.contains("`body`") && message.contains("bytea"),
        "{message}"
    );
    let err = open(&pg, vec![spec("orders", &["name"])])
        .await?
        .expect_err("missing");
    assert!(
        err.to_string().contains("table `orders` does not exist"),
        "{err}"
    );
    let err = open(&pg, vec![spec("recent", &["name"])])
        .await?
        .expect_err("view");
    assert!(err.to_string().contains("view"), "{err}");

    let wrong = PostgresConfig {
        url: pg.url("crm").replace("password=", "password=wrong"),
        poll_interval: Duration::from_secs(1),
    };
    let err = tokio::task::spawn_blocking(move || {
        PostgresConnector::open(&wrong, vec![spec("files", &["name"])])
    })
    .await?
    .expect_err("wrong password");
    let message = err.to_string();
    assert!(
        message.contains("refused") && message.contains("password authentication failed"),
        "{message}"
    );
    assert!(
        !message.contains("wrong"),
        "the password is never shown: {message}"
    );

    let down = Postgres::start()?;
    let url = down.url("postgres");
    down.stop_server("fast")?;
    let config = PostgresConfig {
        url,
        poll_interval: Duration::from_secs(1),
    };
    let err = tokio::task::spawn_blocking(move || {
        PostgresConnector::open(&config, vec![spec("files", &["name"])])
    })
    .await?
    .expect_err("down");
    let message = err.to_string();
    assert!(
        message.contains("cannot connect to PostgreSQL at 127.0.0.1:"),
        "{message}"
    );
    Ok(())
}
