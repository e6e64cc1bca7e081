//! The SQLite connector against real database files. A second connection plays the
//! user's tool.

use std::collections::HashSet;
use std::path::PathBuf;

use connectors::sqlite::{
    CollectionSpec, FieldType, OpOutcome, OutboxBatch, RowState, SqliteConnector, SqliteError,
    WriteOp,
};
use crdt_model::{Decimal, Record, Timestamp, Value};
use rusqlite::Connection;
use tempfile::TempDir;

/// A database file in a temporary directory and the user's tool connected to it.
struct Fixture {
    _dir: TempDir,
    path: PathBuf,
    tool: Connection,
}

fn fixture(schema: &str) -> Fixture {
    let dir = tempfile::tempdir().expect("temporary directory");
    let path = dir.path().join("tool.db");
    let tool = Connection::open(&path).expect("open the tool's connection");
    tool.execute_batch(schema).expect("create the schema");
    Fixture {
        _dir: dir,
        path,
        tool,
    }
}

fn spec(table: &str, key: &str, columns: &[&str]) -> CollectionSpec {
    CollectionSpec {
        collection: table.to_owned(),
        table: table.to_owned(),
        primary_key: key.to_owned(),
        columns: columns.iter().map(|c| (*c).to_owned()).collect(),
    }
}

fn record(fields: &[(&str, Value)]) -> Record {
    fields
        .iter()
        .map(|(name, value)| ((*name).to_owned(), value.clone()))
        .collect()
}

fn text(s: &str) -> Value {
    Value::Text(s.to_owned())
}

fn decimal(s: &str) -> Value {
    Value::Decimal(Decimal::parse(s).expect("valid decimal"))
}

fn upsert(collection: &str, key: &str, fields: &[(&str, Value)]) -> WriteOp {
    WriteOp::Upsert {
        collection: collection.to_owned(),
        key: key.to_owned(),
        fields: record(fields),
    }
}

/// The (key, state) pairs of a batch.
fn states(batch: &OutboxBatch) -> Vec<(&str, &RowState)> {
    batch
        .changes
        .iter()
        .map(|change| (change.key.as_str(), &change.state))
        .collect()
}

/// The rejected ops of a write-back, as (index, reason); no op may be stale.
fn written(outcomes: Vec<OpOutcome>) -> Vec<(usize, String)> {
    outcomes
        .into_iter()
        .enumerate()
        .filter_map(|(index, outcome)| match outcome {
            OpOutcome::Written { .. } => None,
            OpOutcome::Rejected(rejection) => Some((index, rejection.to_string())),
            OpOutcome::Stale => panic!("op {index} was refused as stale"),
        })
        .collect()
}

/// No records captured after the plan's cursor.
fn none() -> HashSet<(String, String)> {
    HashSet::new()
}

const CUSTOMERS: &str =
    "CREATE TABLE customers (id INTEGER PRIMARY KEY, name TEXT, age INTEGER, note TEXT);";

/// A `customers` row as the tool sees it: id, name, age, note.
type CustomerRow = (i64, Option<String>, Option<i64>, Option<String>);

fn customers() -> CollectionSpec {
    spec("customers", "id", &["name", "age"])
}

fn open(fx: &Fixture, specs: Vec<CollectionSpec>) -> SqliteConnector {
    SqliteConnector::open(&fx.path, specs).expect("open the connector")
}

fn open_err(fx: &Fixture, specs: Vec<CollectionSpec>) -> SqliteError {
    match SqliteConnector::open(&fx.path, specs) {
        Ok(_) => panic!("open succeeded"),
        Err(error) => error,
    }
}

mod capture {
    use super::*;

    /// A database captured by an earlier Concord has an outbox without `old_key`:
    /// opening adds the column and keeps the entries waiting in it.
    #[test]
    fn an_outbox_from_before_old_key_is_upgraded_with_its_entries() {
        let fx = fixture(CUSTOMERS);
        fx.tool
            .execute_batch(
                "CREATE TABLE _concord_outbox (seq INTEGER PRIMARY KEY AUTOINCREMENT, \
                 tbl TEXT NOT NULL, key TEXT NOT NULL);
                 INSERT INTO customers (id, name) VALUES (1, 'Ada');
                 INSERT INTO _concord_outbox (tbl, key) VALUES ('customers', '1');",
            )
            .expect("an old outbox");
        let mut connector = open(&fx, vec![customers()]);
        let batch = connector.capture(0, u64::MAX, 10).expect("capture");
        assert_eq!(batch.changes[0].key, "1", "the waiting entry is kept");
        fx.tool
            .execute("UPDATE customers SET id = 2 WHERE id = 1", [])
            .expect("key change");
        let moved = connector
            .capture(batch.cursor, u64::MAX, 10)
            .expect("capture");
        assert_eq!(moved.changes[0].previous_key.as_deref(), Some("1"));
    }

    #[test]
    fn a_key_change_is_one_change_naming_the_old_key() {
        let fx = fixture(CUSTOMERS);
        let mut connector = open(&fx, vec![customers()]);
        fx.tool
            .execute("INSERT INTO customers (id, name) VALUES (1, 'Ada')", [])
            .expect("insert");
        let cursor = connector.capture(0, u64::MAX, 10).expect("capture").cursor;
        fx.tool
            .execute("UPDATE customers SET name = 'Ada L.' WHERE id = 1", [])
            .expect("update");
        fx.tool
            .execute("UPDATE customers SET id = 9 WHERE id = 1", [])
            .expect("key change");
        let batch = connector.capture(cursor, u64::MAX, 10).expect("capture");
        assert_eq!(batch.changes.len(), 1, "{:?}", batch.changes);
        let change = &batch.changes[0];
        assert_eq!(change.key, "9");
        assert_eq!(change.previous_key.as_deref(), Some("1"));
        assert_eq!(
            change.state,
            RowState::Present(record(&[("name", text("Ada L.")), ("age", Value::Null)]))
        );
    }

    #[test]
    fn insert_update_delete_are_captured_in_order_with_current_state() {
        let fx = fixture(CUSTOMERS);
        let mut connector = open(&fx, vec![customers()]);
        assert_eq!(connector.outbox_head().expect("head"), 0);

        fx.tool
            .execute_batch(
                "INSERT INTO customers (id, name, age) VALUES (1, 'Ada', 36);
                 INSERT INTO customers (id, name, age) VALUES (2, 'Bob', 41);",
            )
            .expect("insert");
        let batch = connector.capture(0, u64::MAX, 100).expect("capture");
        let ada = record(&[("name", text("Ada")), ("age", Value::Int(36))]);
        let bob = record(&[("name", text("Bob")), ("age", Value::Int(41))]);
        assert_eq!(
            states(&batch),
            vec![
                ("1", &RowState::Present(ada)),
                ("2", &RowState::Present(bob.clone()))
            ]
        );
        assert!(batch.changes.iter().all(|c| c.collection == "customers"));
        assert_eq!(batch.cursor, 2);
        assert_eq!(connector.outbox_head().expect("head"), 2);

        fx.tool
            .execute_batch(
                "UPDATE customers SET age = 37 WHERE id = 1;
                 DELETE FROM customers WHERE id = 2;",
            )
            .expect("update and delete");
        let batch = connector.capture(2, u64::MAX, 100).expect("capture");
        let ada = record(&[("name", text("Ada")), ("age", Value::Int(37))]);
        assert_eq!(
            states(&batch),
            vec![("1", &RowState::Present(ada)), ("2", &RowState::Absent)]
        );
        assert_eq!(batch.cursor, 4);

        let empty = connector.capture(4, u64::MAX, 100).expect("capture");
        assert!(empty.changes.is_empty());
        assert_eq!(empty.cursor, 4);
    }

    #[test]
    fn capture_reads_at_most_max_entries_and_folds_repeated_rows() {
        let fx = fixture(CUSTOMERS);
        let mut connector = open(&fx, vec![customers()]);
        fx.tool
            .execute_batch(
                "INSERT INTO customers (id, name) VALUES (1, 'a');
                 UPDATE customers SET name = 'b' WHERE id = 1;
                 INSERT INTO customers (id, name) VALUES (2, 'c');
                 UPDATE customers SET name = 'd' WHERE id = 1;",
            )
            .expect("edits");

        let first = connector.capture(0, u64::MAX, 3).expect("capture");
        let one = RowState::Present(record(&[("name", text("d")), ("age", Value::Null)]));
        let two = RowState::Present(record(&[("name", text("c")), ("age", Value::Null)]));
        assert_eq!(states(&first), vec![("1", &one), ("2", &two)]);
        assert_eq!(first.cursor, 3);

        let rest = connector
            .capture(first.cursor, u64::MAX, 3)
            .expect("capture");
        assert_eq!(states(&rest), vec![("1", &one)]);
        assert_eq!(rest.cursor, 4);

        let none = connector.capture(0, u64::MAX, 0).expect("capture nothing");
        assert!(none.changes.is_empty());
        assert_eq!(none.cursor, 0);
    }

    #[test]
    fn primary_key_update_reports_the_new_key_naming_the_old_one() {
        let fx = fixture(CUSTOMERS);
        let mut connector = open(&fx, vec![customers()]);
        fx.tool
            .execute("INSERT INTO customers (id, name) VALUES (1, 'Ada')", [])
            .expect("insert");
        let cursor = connector.capture(0, u64::MAX, 10).expect("capture").cursor;

        fx.tool
            .execute("UPDATE customers SET id = 9 WHERE id = 1", [])
            .expect("rekey");
        let batch = connector.capture(cursor, u64::MAX, 10).expect("capture");
        let ada = record(&[("name", text("Ada")), ("age", Value::Null)]);
        assert_eq!(states(&batch), vec![("9", &RowState::Present(ada))]);
        assert_eq!(batch.changes[0].previous_key.as_deref(), Some("1"));
    }

    #[test]
    fn text_keys_and_listed_key_columns_are_captured() {
        let fx = fixture("CREATE TABLE tags (code VARCHAR(20) PRIMARY KEY, label TEXT);");
        let mut connector = open(&fx, vec![spec("tags", "code", &["code", "label"])]);
        fx.tool
            .execute("INSERT INTO tags VALUES ('it''s', 'quoted')", [])
            .expect("insert");
        let batch = connector.capture(0, u64::MAX, 10).expect("capture");
        let row = record(&[("code", text("it's")), ("label", text("quoted"))]);
        assert_eq!(states(&batch), vec![("it's", &RowState::Present(row))]);
    }

    #[test]
    fn value_that_does_not_fit_makes_only_its_row_invalid() {
        let fx = fixture(CUSTOMERS);
        let mut connector = open(&fx, vec![customers()]);
        fx.tool
            .execute_batch(
                "INSERT INTO customers (id, name, age) VALUES (1, 'Ada', 36);
                 INSERT INTO customers (id, name, age) VALUES (7, 'Bob', 'abc');
                 INSERT INTO customers (id, name, age) VALUES (8, 'Cy', 5);",
            )
            .expect("insert");
        let batch = connector.capture(0, u64::MAX, 10).expect("capture");
        assert_eq!(batch.changes.len(), 3);
        assert!(matches!(batch.changes[0].state, RowState::Present(_)));
        assert!(matches!(batch.changes[2].state, RowState::Present(_)));
        let RowState::Invalid(invalid) = &batch.changes[1].state else {
            panic!("row 7 should be invalid: {:?}", batch.changes[1]);
        };
        assert_eq!(invalid.expected, FieldType::Integer);
        let reason = invalid.to_string();
        for part in ["customers", "key 7", "`age`", "'abc'", "integer", "INTEGER"] {
            assert!(reason.contains(part), "{reason:?} lacks {part:?}");
        }
    }

    #[test]
    fn stored_values_convert_per_field_type() {
        let fx = fixture(
            "CREATE TABLE t (id INTEGER PRIMARY KEY, i INTEGER, f REAL, d NUMERIC, b BOOLEAN,
                             ts TIMESTAMP, j JSON, s);",
        );
        let mut connector = open(
            &fx,
            vec![spec("t", "id", &["i", "f", "d", "b", "ts", "j", "s"])],
        );
        fx.tool
            .execute_batch(
                "INSERT INTO t VALUES (1, 3.0, 2, 12.5, 1, '2024-05-01 10:00:00', '7', 'x');
                 INSERT INTO t VALUES (2, '42', '1.5', '0.10', 'false', 1714557600, 'null', NULL);
                 INSERT INTO t VALUES (3, NULL, NULL, NULL, NULL, '2024-05-01', NULL, NULL);
                 INSERT INTO t VALUES (4, 1, 1, 1, 2, 'x', 'x', 1);",
            )
            .expect("insert");
        let ten = Value::Timestamp(Timestamp::from_micros(1_714_557_600_000_000));
        let batch = connector.capture(0, u64::MAX, 10).expect("capture");
        let expected_one = record(&[
            ("i", Value::Int(3)),
            ("f", Value::Float(2.0)),
            ("d", decimal("12.5")),
            ("b", Value::Bool(true)),
            ("ts", ten.clone()),
            ("j", Value::Int(7)),
            ("s", text("x")),
        ]);
        let expected_two = record(&[
            ("i", Value::Int(42)),
            ("f", Value::Float(1.5)),
            ("d", decimal("0.1")),
            ("b", Value::Bool(false)),
            ("ts", ten),
            ("j", Value::Null),
            ("s", Value::Null),
        ]);
        let expected_three = record(&[
            ("i", Value::Null),
            ("f", Value::Null),
            ("d", Value::Null),
            ("b", Value::Null),
            (
                "ts",
                Value::Timestamp(Timestamp::from_micros(1_714_521_600_000_000)),
            ),
            ("j", Value::Null),
            ("s", Value::Null),
        ]);
        assert_eq!(batch.changes[0].state, RowState::Present(expected_one));
        assert_eq!(batch.changes[1].state, RowState::Present(expected_two));
        assert_eq!(batch.changes[2].state, RowState::Present(expected_three));
        let RowState::Invalid(invalid) = &batch.changes[3].state else {
            panic!("row 4 should be invalid: {:?}", batch.changes[3]);
        };
        let reason = invalid.to_string();
        assert!(
            reason.contains("`b`") && reason.contains("integer 2"),
            "{reason}"
        );
    }

    #[test]
    fn tables_not_configured_are_not_captured_but_advance_the_cursor() {
        let fx = fixture(
            "CREATE TABLE customers (id INTEGER PRIMARY KEY, name TEXT, age INTEGER);
             CREATE TABLE orders (id INTEGER PRIMARY KEY, total REAL);",
        );
        drop(open(
            &fx,
            vec![customers(), spec("orders", "id", &["total"])],
        ));
        let mut connector = open(&fx, vec![customers()]);
        fx.tool
            .execute("INSERT INTO orders VALUES (1, 2.5)", [])
            .expect("insert order");
        assert_eq!(
            connector.outbox_len().expect("len"),
            0,
            "stale trigger fired"
        );

        fx.tool
            .execute(
                "INSERT INTO _concord_outbox (tbl, key) VALUES ('orders', '1')",
                [],
            )
            .expect("stale entry");
        fx.tool
            .execute("INSERT INTO customers (id, name) VALUES (1, 'Ada')", [])
            .expect("insert customer");
        let batch = connector.capture(0, u64::MAX, 10).expect("capture");
        assert_eq!(batch.changes.len(), 1);
        assert_eq!(batch.changes[0].key, "1");
        assert_eq!(batch.cursor, 2);
    }

    #[test]
    fn changed_reports_commits_by_other_connections_once() {
        let fx = fixture(CUSTOMERS);
        let mut connector = open(&fx, vec![customers()]);
        assert!(!connector.changed().expect("changed"));
        fx.tool
            .execute("INSERT INTO customers (id, name) VALUES (1, 'Ada')", [])
            .expect("insert");
        assert!(connector.changed().expect("changed"));
        assert!(!connector.changed().expect("changed"));

        let cursor = connector.capture(0, u64::MAX, 10).expect("capture").cursor;
        let ops = [upsert("customers", "1", &[("name", text("Ada L."))])];
        written(
            connector
                .write_back(cursor, &none(), &ops)
                .expect("write back"),
        );
        assert!(!connector.changed().expect("changed"), "own write counted");
    }

    #[test]
    fn trim_outbox_removes_entries_up_to_the_cursor() {
        let fx = fixture(CUSTOMERS);
        let mut connector = open(&fx, vec![customers()]);
        for id in 1..=5 {
            fx.tool
                .execute("INSERT INTO customers (id) VALUES (?1)", [id])
                .expect("insert");
        }
        assert_eq!(connector.outbox_len().expect("len"), 5);
        connector.trim_outbox(3).expect("trim");
        assert_eq!(connector.outbox_len().expect("len"), 2);
        assert_eq!(connector.outbox_head().expect("head"), 5);
        let batch = connector.capture(0, u64::MAX, 10).expect("capture");
        let keys: Vec<&str> = batch.changes.iter().map(|c| c.key.as_str()).collect();
        assert_eq!(keys, ["4", "5"]);
        connector.trim_outbox(batch.cursor).expect("trim");
        assert_eq!(connector.outbox_len().expect("len"), 0);
        assert_eq!(
            connector.outbox_head().expect("head"),
            5,
            "the head survives a trim"
        );
    }

    #[test]
    fn rows_present_before_the_first_install_are_imported_once() {
        let fx = fixture(CUSTOMERS);
        fx.tool
            .execute_batch(
                "INSERT INTO customers (id, name, age) VALUES (2, 'Bob', 41);
                 INSERT INTO customers (id, name, age) VALUES (1, 'Ada', 36);",
            )
            .expect("insert");
        let mut connector = open(&fx, vec![customers()]);
        let batch = connector.capture(0, u64::MAX, 10).expect("capture");
        let keys: Vec<&str> = batch.changes.iter().map(|c| c.key.as_str()).collect();
        assert_eq!(keys, ["1", "2"]);
        drop(connector);
        let mut connector = open(&fx, vec![customers()]);
        assert_eq!(
            connector.outbox_head().expect("head"),
            2,
            "a re-open imports nothing again"
        );
    }
}

mod write_back {
    use super::*;

    /// Regression: an op on a key the user had just changed was not stale (the key
    /// change is recorded under the new key), so its upsert recreated the old row.
    #[test]
    fn an_op_on_a_key_the_user_just_changed_is_stale() {
        let fx = fixture(CUSTOMERS);
        let mut connector = open(&fx, vec![customers()]);
        fx.tool
            .execute("INSERT INTO customers (id, name) VALUES (1, 'Ada')", [])
            .expect("insert");
        let cursor = connector.capture(0, u64::MAX, 10).expect("capture").cursor;
        fx.tool
            .execute("UPDATE customers SET id = 9 WHERE id = 1", [])
            .expect("key change");
        let outcomes = connector
            .write_back(
                cursor,
                &HashSet::new(),
                &[upsert("customers", "1", &[("age", Value::Int(36))])],
            )
            .expect("write-back");
        assert_eq!(outcomes, [OpOutcome::Stale]);
        let ids: Vec<i64> = fx
            .tool
            .prepare("SELECT id FROM customers")
            .expect("prepare")
            .query_map([], |r| r.get(0))
            .expect("query")
            .collect::<Result<_, _>>()
            .expect("ids");
        assert_eq!(ids, [9], "the old row came back");
    }

    #[test]
    fn an_insert_takes_the_key_sqlite_assigns_and_is_not_captured() {
        let fx = fixture(CUSTOMERS);
        let mut connector = open(&fx, vec![customers()]);
        fx.tool
            .execute("INSERT INTO customers (id, name) VALUES (6, 'Ada')", [])
            .expect("insert");
        let cursor = connector.capture(0, u64::MAX, 10).expect("capture").cursor;
        let insert = WriteOp::Insert {
            collection: "customers".to_owned(),
            token: "doc-1".to_owned(),
            fields: record(&[("name", text("Grace"))]),
        };
        let outcomes = connector
            .write_back(cursor, &HashSet::new(), std::slice::from_ref(&insert))
            .expect("write-back");
        assert_eq!(
            outcomes,
            [OpOutcome::Written {
                key: Some("7".to_owned()),
                version: None
            }]
        );
        // The agent crashed before recording key 7 and plans the insert again: the
        // tool answers with the same row instead of a second one.
        let again = connector
            .write_back(cursor, &HashSet::new(), &[insert])
            .expect("write-back");
        assert_eq!(again, outcomes);
        let rows: i64 = fx
            .tool
            .query_row("SELECT COUNT(*) FROM customers", [], |r| r.get(0))
            .expect("count");
        assert_eq!(rows, 2, "the retried insert made a second row");
        let name: String = fx
            .tool
            .query_row("SELECT name FROM customers WHERE id = 7", [], |r| r.get(0))
            .expect("the inserted row");
        assert_eq!(name, "Grace");
        assert!(
            connector
                .capture(cursor, u64::MAX, 10)
                .expect("capture")
                .changes
                .is_empty(),
            "an insert of the agent's is not captured"
        );
        assert!(<SqliteConnector as connectors::Connector>::assigns_keys(
            &connector,
            "customers"
        ));
    }

    /// Regression (a retried insert kept old fields): the agent crashed after the
    /// tool committed an insert and before it recorded the key; meanwhile the record
    /// changed, and the insert planned again carries the new fields. The tool
    /// answered with the first row's key and left its old fields, while the agent
    /// recorded the new ones as written.
    #[test]
    fn a_retried_insert_writes_the_fields_it_carries_now() {
        let fx = fixture(CUSTOMERS);
        let mut connector = open(&fx, vec![customers()]);
        let insert = |name: &str| WriteOp::Insert {
            collection: "customers".to_owned(),
            token: "doc-1".to_owned(),
            fields: record(&[("name", text(name)), ("age", Value::Int(36))]),
        };
        let first = connector
            .write_back(0, &HashSet::new(), &[insert("Ada")])
            .expect("write-back");
        let again = connector
            .write_back(0, &HashSet::new(), &[insert("Ada L.")])
            .expect("write-back");
        assert_eq!(again, first, "the same row");
        let rows: Vec<(i64, String)> = fx
            .tool
            .prepare("SELECT id, name FROM customers")
            .expect("prepare")
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
            .expect("query")
            .collect::<Result<_, _>>()
            .expect("rows");
        assert_eq!(rows, [(1, "Ada L.".to_owned())]);
    }

    /// Regression (a record that left a tool and came back was never inserted
    /// again): its insert token named a row deleted since, and the insert answered
    /// with that row's key without writing anything.
    #[test]
    fn an_insert_whose_row_is_gone_inserts_anew() {
        let fx = fixture(CUSTOMERS);
        let mut connector = open(&fx, vec![customers()]);
        let insert = |name: &str| WriteOp::Insert {
            collection: "customers".to_owned(),
            token: "doc-1".to_owned(),
            fields: record(&[("name", text(name))]),
        };
        connector
            .write_back(0, &HashSet::new(), &[insert("Ada")])
            .expect("write-back");
        let delete = WriteOp::Delete {
            collection: "customers".to_owned(),
            key: "1".to_owned(),
        };
        connector
            .write_back(0, &HashSet::new(), &[delete])
            .expect("write-back");
        fx.tool
            .execute(
                "INSERT INTO customers (id, name) VALUES (1, 'someone else')",
                [],
            )
            .expect("the key is given out again");
        fx.tool
            .execute("DELETE FROM customers WHERE id = 1", [])
            .expect("and freed");
        let again = connector
            .write_back(0, &HashSet::new(), &[insert("Ada again")])
            .expect("write-back");
        assert!(
            matches!(&again[0], OpOutcome::Written { key: Some(_), .. }),
            "{again:?}"
        );
        let names: Vec<String> = fx
            .tool
            .prepare("SELECT name FROM customers")
            .expect("prepare")
            .query_map([], |r| r.get(0))
            .expect("query")
            .collect::<Result<_, _>>()
            .expect("rows");
        assert_eq!(names, ["Ada again"]);
    }

    #[test]
    fn an_insert_into_a_table_whose_keys_sqlite_does_not_assign_is_rejected() {
        let fx = fixture("CREATE TABLE codes (code TEXT PRIMARY KEY, label TEXT)");
        let mut connector = open(&fx, vec![spec("codes", "code", &["label"])]);
        assert!(!<SqliteConnector as connectors::Connector>::assigns_keys(
            &connector, "codes"
        ));
        let insert = WriteOp::Insert {
            collection: "codes".to_owned(),
            token: "doc-1".to_owned(),
            fields: record(&[("label", text("x"))]),
        };
        let outcomes = connector
            .write_back(0, &HashSet::new(), &[insert])
            .expect("write-back");
        assert!(
            matches!(&outcomes[0], OpOutcome::Rejected(r) if r.to_string().contains("not assigned by the tool")),
            "{outcomes:?}"
        );
    }

    #[test]
    fn writes_only_the_given_fields_and_leaves_no_outbox_entries() {
        let fx = fixture(CUSTOMERS);
        let mut connector = open(&fx, vec![customers()]);
        fx.tool
            .execute(
                "INSERT INTO customers (id, name, age, note) VALUES (1, 'Ada', 36, 'keep')",
                [],
            )
            .expect("insert");
        let cursor = connector.capture(0, u64::MAX, 10).expect("capture").cursor;
        connector.trim_outbox(cursor).expect("trim");
        assert!(connector.changed().expect("changed"), "the user's insert");

        let ops = [
            upsert("customers", "1", &[("age", Value::Int(37))]),
            upsert("customers", "2", &[("name", text("Bob"))]),
            upsert("customers", "3", &[]),
        ];
        assert!(
            written(
                connector
                    .write_back(cursor, &none(), &ops)
                    .expect("write back")
            )
            .is_empty()
        );
        assert_eq!(connector.outbox_len().expect("len"), 0, "write-back echoed");
        assert!(!connector.changed().expect("changed"));

        let rows: Vec<CustomerRow> = fx
            .tool
            .prepare("SELECT id, name, age, note FROM customers ORDER BY id")
            .expect("prepare")
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))
            .expect("query")
            .collect::<Result<_, _>>()
            .expect("rows");
        assert_eq!(
            rows,
            vec![
                (1, Some("Ada".into()), Some(37), Some("keep".into())),
                (2, Some("Bob".into()), None, None),
                (3, None, None, None),
            ]
        );

        let delete = [WriteOp::Delete {
            collection: "customers".into(),
            key: "2".into(),
        }];
        assert!(
            written(
                connector
                    .write_back(cursor, &none(), &delete)
                    .expect("delete")
            )
            .is_empty()
        );
        assert_eq!(connector.outbox_len().expect("len"), 0, "delete echoed");
        let count: i64 = fx
            .tool
            .query_row("SELECT COUNT(*) FROM customers", [], |r| r.get(0))
            .expect("count");
        assert_eq!(count, 2);

        // The user's next edit is still captured: the echo flag was cleared.
        fx.tool
            .execute("UPDATE customers SET name = 'Ada L.' WHERE id = 1", [])
            .expect("user edit");
        let batch = connector.capture(cursor, u64::MAX, 10).expect("capture");
        assert_eq!(batch.changes.len(), 1);
    }

    /// Regression (write-back starved): any outbox entry after the plan's cursor
    /// refused the whole plan. Only the records the tool changed since are stale.
    #[test]
    fn an_uncaptured_user_edit_makes_only_its_own_record_stale() {
        let fx = fixture(CUSTOMERS);
        let mut connector = open(&fx, vec![customers()]);
        fx.tool
            .execute("INSERT INTO customers (id, name) VALUES (1, 'Ada')", [])
            .expect("insert");
        let ops = [
            upsert("customers", "1", &[("name", text("Agent"))]),
            upsert("customers", "2", &[("name", text("Grace"))]),
        ];
        let outcomes = connector.write_back(0, &none(), &ops).expect("write back");
        assert_eq!(outcomes, [OpOutcome::Stale, OpOutcome::WRITTEN]);
        let name: String = fx
            .tool
            .query_row("SELECT name FROM customers WHERE id = 1", [], |r| r.get(0))
            .expect("name");
        assert_eq!(name, "Ada", "a stale op writes nothing");
        let grace: String = fx
            .tool
            .query_row("SELECT name FROM customers WHERE id = 2", [], |r| r.get(0))
            .expect("name");
        assert_eq!(grace, "Grace");

        let cursor = connector.capture(0, u64::MAX, 10).expect("capture").cursor;
        assert!(
            written(
                connector
                    .write_back(cursor, &none(), &ops[..1])
                    .expect("write back")
            )
            .is_empty()
        );
        let name: String = fx
            .tool
            .query_row("SELECT name FROM customers WHERE id = 1", [], |r| r.get(0))
            .expect("name");
        assert_eq!(name, "Agent");
    }

    /// Regression: a plan made before an edit was captured must stay stale after the
    /// capture trimmed the outbox, or it would overwrite the edit. The caller names
    /// the records it captured since the plan's cursor.
    #[test]
    fn a_plan_older_than_a_trimmed_capture_is_still_refused() {
        let fx = fixture(CUSTOMERS);
        let mut connector = open(&fx, vec![customers()]);
        fx.tool
            .execute("INSERT INTO customers (id, name) VALUES (1, 'Ada')", [])
            .expect("insert");
        let cursor = connector.capture(0, u64::MAX, 10).expect("capture").cursor;
        connector.trim_outbox(cursor).expect("trim");
        let ops = [upsert("customers", "1", &[("name", text("Agent"))])];
        let captured = HashSet::from([("customers".to_owned(), "1".to_owned())]);
        assert_eq!(
            connector
                .write_back(0, &captured, &ops)
                .expect("write back"),
            [OpOutcome::Stale]
        );
        assert!(
            written(
                connector
                    .write_back(cursor, &none(), &ops)
                    .expect("write back")
            )
            .is_empty()
        );
    }

    /// Regression: capture batches crossed the end of a rescan when the outbox
    /// started after a gap of trimmed entries. The upper bound holds whatever the gap.
    #[test]
    fn capture_stops_at_the_upper_bound_after_a_gap_of_trimmed_entries() {
        let fx = fixture(CUSTOMERS);
        let mut connector = open(&fx, vec![customers()]);
        for id in 1..=50 {
            fx.tool
                .execute("INSERT INTO customers (id, name) VALUES (?1, 'x')", [id])
                .expect("insert");
        }
        let cursor = connector.capture(0, u64::MAX, 100).expect("capture").cursor;
        connector.trim_outbox(cursor).expect("trim");
        let rescan_upto = connector.claim(&[7; 16]).expect("claim a new store");
        assert_eq!(rescan_upto, 0, "the first claim rescans nothing");
        let rescan_upto = connector.claim(&[8; 16]).expect("claim by a wiped store");
        assert_eq!(
            rescan_upto, 100,
            "50 rows queued again after 50 trimmed entries"
        );
        fx.tool
            .execute("INSERT INTO customers (id, name) VALUES (51, 'after')", [])
            .expect("insert");
        // A wiped store starts from 0 and asks for at most what is left of the rescan.
        let batch = connector.capture(0, rescan_upto, 1024).expect("capture");
        assert_eq!(batch.cursor, rescan_upto);
        assert_eq!(batch.changes.len(), 50);
        let rest = connector
            .capture(batch.cursor, u64::MAX, 1024)
            .expect("capture");
        assert_eq!(rest.changes.len(), 1);
    }

    #[test]
    fn ops_that_do_not_fit_are_rejected_and_the_rest_commit() {
        let fx = fixture(CUSTOMERS);
        let mut connector = open(&fx, vec![customers()]);
        let ops = [
            upsert("customers", "1", &[("age", text("old"))]),
            upsert("customers", "2", &[("name", text("ok"))]),
            upsert("customers", "3", &[("note", text("not configured"))]),
            upsert("customers", "x", &[("name", text("bad key"))]),
            upsert("nobody", "1", &[]),
            upsert("customers", "4", &[("id", Value::Int(5))]),
            upsert(
                "customers",
                "6",
                &[("id", Value::Int(6)), ("age", Value::Int(1))],
            ),
        ];
        let rejected = written(connector.write_back(0, &none(), &ops).expect("write back"));
        let indexes: Vec<usize> = rejected.iter().map(|(i, _)| *i).collect();
        assert_eq!(indexes, [0, 2, 3, 4, 5], "{rejected:?}");
        for part in ["customers", "key 1", "`age`", "integer"] {
            assert!(
                rejected[0].1.contains(part),
                "{:?} lacks {part:?}",
                rejected[0].1
            );
        }
        assert!(rejected[1].1.contains("`note`"), "{}", rejected[1].1);
        assert!(
            rejected[2].1.contains("not an integer"),
            "{}",
            rejected[2].1
        );
        assert!(rejected[3].1.contains("`nobody`"), "{}", rejected[3].1);

        let ids: Vec<i64> = fx
            .tool
            .prepare("SELECT id FROM customers ORDER BY id")
            .expect("prepare")
            .query_map([], |r| r.get(0))
            .expect("query")
            .collect::<Result<_, _>>()
            .expect("ids");
        assert_eq!(ids, [2, 6]);
    }

    #[test]
    fn constraint_failures_reject_their_op_only() {
        let fx = fixture(
            "CREATE TABLE items (id INTEGER PRIMARY KEY, sku TEXT NOT NULL UNIQUE, qty INTEGER);
             CREATE TABLE strict_items (id INTEGER PRIMARY KEY, sku TEXT NOT NULL ON CONFLICT ROLLBACK);",
        );
        let mut connector = open(
            &fx,
            vec![
                spec("items", "id", &["sku", "qty"]),
                spec("strict_items", "id", &["sku"]),
            ],
        );
        let ops = [
            upsert("items", "1", &[("sku", text("A"))]),
            upsert("items", "2", &[("sku", text("A"))]),
            upsert("items", "3", &[("qty", Value::Int(1))]),
            upsert("strict_items", "1", &[("sku", Value::Null)]),
            upsert("items", "4", &[("sku", text("B"))]),
        ];
        let rejected = written(connector.write_back(0, &none(), &ops).expect("write back"));
        let indexes: Vec<usize> = rejected.iter().map(|(i, _)| *i).collect();
        assert_eq!(indexes, [1, 2, 3], "{rejected:?}");
        assert!(rejected[0].1.contains("UNIQUE"), "{}", rejected[0].1);
        assert!(
            rejected[2].1.contains("strict_items key 1"),
            "{}",
            rejected[2].1
        );

        let skus: Vec<String> = fx
            .tool
            .prepare("SELECT sku FROM items ORDER BY id")
            .expect("prepare")
            .query_map([], |r| r.get(0))
            .expect("query")
            .collect::<Result<_, _>>()
            .expect("skus");
        assert_eq!(skus, ["A", "B"]);
        assert_eq!(connector.outbox_len().expect("len"), 0);
        let echo: i64 = fx
            .tool
            .query_row("SELECT active FROM _concord_echo", [], |r| r.get(0))
            .expect("echo flag");
        assert_eq!(echo, 0);
    }

    #[test]
    fn decimals_stay_exact() {
        let fx = fixture(
            "CREATE TABLE prices (id INTEGER PRIMARY KEY, exact DECIMAL_TEXT, rounded DECIMAL(38,9));",
        );
        let mut connector = open(&fx, vec![spec("prices", "id", &["exact", "rounded"])]);
        assert_eq!(
            connector.field_types("prices").and_then(|t| t.get("exact")),
            Some(&FieldType::Decimal)
        );
        let long = "12345678901234567890.123456789";
        let ops = [
            upsert(
                "prices",
                "1",
                &[("exact", decimal(long)), ("rounded", decimal("1234.56"))],
            ),
            upsert("prices", "2", &[("rounded", decimal(long))]),
        ];
        let rejected = written(connector.write_back(0, &none(), &ops).expect("write back"));
        assert_eq!(rejected.len(), 1, "{rejected:?}");
        assert_eq!(rejected[0].0, 1);
        assert!(
            rejected[0].1.contains("`rounded`") && rejected[0].1.contains("NUMERIC"),
            "{}",
            rejected[0].1
        );

        let stored: String = fx
            .tool
            .query_row("SELECT exact FROM prices WHERE id = 1", [], |r| r.get(0))
            .expect("stored text");
        assert_eq!(stored, long);

        // A user edit makes the row captured again; both values read back exactly.
        fx.tool
            .execute("UPDATE prices SET id = id WHERE id = 1", [])
            .expect("touch");
        let batch = connector.capture(0, u64::MAX, 10).expect("capture");
        let row = record(&[("exact", decimal(long)), ("rounded", decimal("1234.56"))]);
        assert_eq!(states(&batch), vec![("1", &RowState::Present(row))]);
    }

    #[test]
    fn timestamps_and_json_round_trip() {
        let fx = fixture(
            "CREATE TABLE events (id TEXT PRIMARY KEY, at TIMESTAMP, day DATE, data JSON, ok BOOLEAN, score REAL);",
        );
        let columns = ["at", "day", "data", "ok", "score"];
        let mut connector = open(&fx, vec![spec("events", "id", &columns)]);
        let at = Value::Timestamp(Timestamp::from_micros(1_714_557_600_123_456));
        let day = Value::Timestamp(Timestamp::from_micros(1_714_521_600_000_000));
        let data = Value::Map(
            [
                (
                    "tags".to_owned(),
                    Value::List(vec![text("a"), Value::Int(2), Value::Null]),
                ),
                ("ratio".to_owned(), Value::Float(0.5)),
                (
                    "nested".to_owned(),
                    Value::Map([("ok".to_owned(), Value::Bool(true))].into()),
                ),
            ]
            .into(),
        );
        let fields = [
            ("at", at),
            ("day", day),
            ("data", data),
            ("ok", Value::Bool(true)),
            ("score", Value::Int(3)),
        ];
        let ops = [upsert("events", "e-1", &fields)];
        assert!(written(connector.write_back(0, &none(), &ops).expect("write back")).is_empty());

        let (at_text, day_text): (String, String) = fx
            .tool
            .query_row("SELECT at, day FROM events", [], |r| {
                Ok((r.get(0)?, r.get(1)?))
            })
            .expect("stored text");
        // An empty column takes SQLite's own format, with the digits the instant needs.
        assert_eq!(at_text, "2024-05-01 10:00:00.123456");
        assert_eq!(day_text, "2024-05-01");

        fx.tool
            .execute("UPDATE events SET id = id", [])
            .expect("touch");
        let batch = connector.capture(0, u64::MAX, 10).expect("capture");
        let mut expected = record(&fields);
        expected.insert("score".to_owned(), Value::Float(3.0));
        assert_eq!(states(&batch), vec![("e-1", &RowState::Present(expected))]);

        let bad = [upsert(
            "events",
            "e-2",
            &[("data", Value::List(vec![decimal("1.5")]))],
        )];
        let rejected = written(
            connector
                .write_back(batch.cursor, &none(), &bad)
                .expect("write back"),
        );
        assert_eq!(rejected.len(), 1);
        assert!(rejected[0].1.contains("decimal"), "{}", rejected[0].1);
    }
}

mod open {
    use super::*;

    #[test]
    fn table_without_primary_key_is_refused_by_name() {
        let fx = fixture("CREATE TABLE ledger (entry TEXT, amount INTEGER);");
        let error = open_err(&fx, vec![spec("ledger", "entry", &["amount"])]);
        assert!(matches!(&error, SqliteError::NoPrimaryKey { table } if table == "ledger"));
        let message = error.to_string();
        assert!(
            message.contains("`ledger`") && message.contains("PRIMARY KEY"),
            "{message}"
        );
    }

    #[test]
    fn schema_errors_name_table_and_column() {
        let fx = fixture(
            "CREATE TABLE customers (id INTEGER PRIMARY KEY, name TEXT, photo BLOB);
             CREATE TABLE pairs (a INTEGER, b INTEGER, PRIMARY KEY (a, b));
             CREATE VIEW adults AS SELECT * FROM customers;",
        );
        let error = open_err(&fx, vec![spec("clients", "id", &[])]);
        assert!(matches!(&error, SqliteError::MissingTable { table } if table == "clients"));
        assert!(error.to_string().contains("`clients`"));

        let error = open_err(&fx, vec![spec("customers", "id", &["name", "email"])]);
        assert!(matches!(&error, SqliteError::MissingColumn { column, .. } if column == "email"));
        let message = error.to_string();
        assert!(
            message.contains("`customers`") && message.contains("`email`"),
            "{message}"
        );

        let error = open_err(&fx, vec![spec("customers", "id", &["photo"])]);
        assert!(matches!(&error, SqliteError::UnsupportedType { column, .. } if column == "photo"));
        assert!(error.to_string().contains("BLOB"));

        let error = open_err(&fx, vec![spec("customers", "name", &[])]);
        assert!(matches!(&error, SqliteError::PrimaryKeyMismatch { actual, .. } if actual == "id"));

        let error = open_err(&fx, vec![spec("pairs", "a", &[])]);
        assert!(
            matches!(&error, SqliteError::CompositePrimaryKey { table, .. } if table == "pairs")
        );

        let error = open_err(&fx, vec![spec("adults", "id", &[])]);
        assert!(matches!(&error, SqliteError::NotATable { .. }));

        let error = open_err(&fx, vec![spec("_concord_outbox", "seq", &[])]);
        assert!(matches!(&error, SqliteError::ReservedTable { .. }));

        let error = open_err(
            &fx,
            vec![spec("customers", "id", &[]), spec("CUSTOMERS", "id", &[])],
        );
        assert!(matches!(&error, SqliteError::DuplicateTable { .. }));
    }

    #[test]
    fn connector_can_move_to_its_own_thread() {
        fn assert_send<T: Send>() {}
        assert_send::<SqliteConnector>();
    }

    #[test]
    fn field_types_describe_configured_columns() {
        let fx = fixture(
            "CREATE TABLE t (id INTEGER PRIMARY KEY, a BIGINT, b DOUBLE, c MONEY, d VARCHAR(9),
                             e BOOL, f DATETIME, g JSON, h);",
        );
        let columns = ["a", "b", "c", "d", "e", "f", "g", "h"];
        let connector = open(&fx, vec![spec("t", "id", &columns)]);
        let types = connector.field_types("t").expect("configured collection");
        let expected = [
            FieldType::Integer,
            FieldType::Float,
            FieldType::Decimal,
            FieldType::Text,
            FieldType::Bool,
            FieldType::Timestamp,
            FieldType::Json,
            FieldType::Text,
        ];
        let actual: Vec<FieldType> = columns.iter().map(|c| types[*c]).collect();
        assert_eq!(actual, expected);
        assert!(!types.contains_key("id"));
        assert!(connector.field_types("other").is_none());
    }

    #[test]
    fn reopening_is_idempotent() {
        let fx = fixture(CUSTOMERS);
        drop(open(&fx, vec![customers()]));
        drop(open(&fx, vec![customers()]));
        let mut connector = open(&fx, vec![customers()]);
        let triggers: i64 = fx
            .tool
            .query_row(
                "SELECT COUNT(*) FROM sqlite_schema WHERE type = 'trigger'",
                [],
                |r| r.get(0),
            )
            .expect("count triggers");
        assert_eq!(triggers, 3);

        fx.tool
            .execute_batch(
                "INSERT INTO customers (id, name) VALUES (1, 'Ada');
                 UPDATE customers SET age = 3 WHERE id = 1;
                 DELETE FROM customers WHERE id = 1;",
            )
            .expect("edits");
        assert_eq!(
            connector.outbox_len().expect("len"),
            3,
            "one entry per edit"
        );

        // Entries survive a re-open, and the schema change is picked up.
        drop(connector);
        fx.tool
            .execute("ALTER TABLE customers ADD COLUMN email TEXT", [])
            .expect("alter");
        let mut connector = open(&fx, vec![spec("customers", "id", &["name", "email"])]);
        assert_eq!(connector.outbox_len().expect("len"), 3);
        fx.tool
            .execute("INSERT INTO customers (id, email) VALUES (2, 'b@x')", [])
            .expect("insert");
        let batch = connector.capture(3, u64::MAX, 10).expect("capture");
        let row = record(&[("name", Value::Null), ("email", text("b@x"))]);
        assert_eq!(states(&batch), vec![("2", &RowState::Present(row))]);
    }
}

mod ownership {
    use super::*;

    #[test]
    fn a_new_store_claiming_the_database_queues_every_row_again() {
        let fx = fixture(CUSTOMERS);
        fx.tool
            .execute_batch("INSERT INTO customers (id, name) VALUES (1, 'Ada'), (2, 'Bob');")
            .expect("insert");
        let mut connector = open(&fx, vec![customers()]);
        assert_eq!(
            connector.claim(&[1; 16]).expect("claim"),
            0,
            "the first store imports nothing more"
        );
        let cursor = connector.capture(0, u64::MAX, 10).expect("capture").cursor;
        connector.trim_outbox(cursor).expect("trim");
        assert_eq!(connector.claim(&[1; 16]).expect("claim"), 0);

        // The store was lost: a new one claims the database.
        let upto = connector.claim(&[2; 16]).expect("claim");
        assert_eq!(upto, cursor + 2);
        let batch = connector.capture(cursor, u64::MAX, 10).expect("capture");
        let keys: Vec<&str> = batch.changes.iter().map(|c| c.key.as_str()).collect();
        assert_eq!(keys, ["1", "2"]);
        drop(connector);
        let mut connector = open(&fx, vec![customers()]);
        assert_eq!(
            connector.claim(&[2; 16]).expect("claim"),
            upto,
            "the boundary survives a restart"
        );
    }
}

/// Regression: a failed start (a missing table) left an empty database file behind,
/// or a database switched to WAL. Concord never creates the user's database and
/// changes nothing in it before the configuration is known to fit.
mod failed_open {
    use super::*;

    #[test]
    fn a_missing_database_is_refused_and_not_created() {
        let dir = tempfile::tempdir().expect("temporary directory");
        let path = dir.path().join("missing.db");
        let err = SqliteConnector::open(&path, vec![customers()]).expect_err("no database");
        assert!(
            matches!(&err, SqliteError::MissingDatabase { path: p } if *p == path),
            "{err}"
        );
        assert!(!path.exists(), "the database file was created");
    }

    #[test]
    fn a_missing_table_leaves_the_database_as_it_was() {
        let fx = fixture(CUSTOMERS);
        let spec = spec("clients", "id", &["name"]);
        let err = SqliteConnector::open(&fx.path, vec![spec]).expect_err("no such table");
        assert!(matches!(err, SqliteError::MissingTable { .. }), "{err}");
        let mode: String = fx
            .tool
            .query_row("PRAGMA journal_mode", [], |r| r.get(0))
            .expect("journal mode");
        assert_eq!(mode, "delete", "the journal mode was changed");
        let ours: i64 = fx
            .tool
            .query_row(
                "SELECT count(*) FROM sqlite_schema WHERE name LIKE '\\_concord\\_%' ESCAPE '\\'",
                [],
                |r| r.get(0),
            )
            .expect("schema");
        assert_eq!(ours, 0, "Concord's tables were installed");
    }

    /// Regression (durability of write-back): with `synchronous = NORMAL` in WAL
    /// mode a committed write-back could roll back at a power cut while the agent's
    /// fsynced shadow said the tool held it.
    #[test]
    fn write_back_commits_are_fsynced() {
        let fx = fixture(CUSTOMERS);
        let connector = open(&fx, vec![customers()]);
        assert_eq!(
            connector.synchronous().expect("pragma"),
            2,
            "synchronous = FULL"
        );
    }
}
