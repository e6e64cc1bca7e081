//! Tests of the CSV connector against files in a temporary folder.

#![expect(clippy::unwrap_used, reason = "tests fail loudly")]

use std::fs;
use std::sync::mpsc;
use std::time::Instant;

use crdt_model::{Record, Value};

use super::*;
use crate::contract::RowState;
use crate::values::to_text;

const FILE: &str = "customers.csv";

fn config(dir: &Path) -> CsvConfig {
    CsvConfig {
        folder: dir.to_owned(),
        state: dir.join("state").join("csv.shadow"),
        debounce: Duration::ZERO,
        poll_interval: POLL_INTERVAL_DEFAULT,
    }
}

fn customers(columns: &[&str], types: &[(&str, FieldType)]) -> CsvCollection {
    CsvCollection {
        spec: CollectionSpec {
            collection: "customers".to_owned(),
            table: FILE.to_owned(),
            primary_key: "id".to_owned(),
            columns: columns.iter().map(|c| (*c).to_owned()).collect(),
        },
        types: types.iter().map(|(c, t)| ((*c).to_owned(), *t)).collect(),
        delimiter: None,
    }
}

fn open(dir: &Path) -> CsvConnector {
    CsvConnector::open(&config(dir), vec![customers(&["name"], &[])]).unwrap()
}

fn put(dir: &Path, text: &str) {
    fs::write(dir.join(FILE), text).unwrap();
}

fn bytes(dir: &Path) -> Vec<u8> {
    fs::read(dir.join(FILE)).unwrap()
}

/// Each change as `key state`: `7 Ada|x` (the fields' text), `7 gone`, `7 invalid
/// column`.
fn summary(batch: &CaptureBatch) -> Vec<String> {
    batch
        .changes
        .iter()
        .map(|change| match &change.state {
            RowState::Present(record) => {
                let values: Vec<String> = record.values().map(to_text).collect();
                format!("{} {}", change.key, values.join("|"))
            }
            RowState::Absent => format!("{} gone", change.key),
            RowState::Invalid(invalid) => format!("{} invalid {}", change.key, invalid.column),
        })
        .collect()
}

/// Captures everything new and acknowledges it.
fn capture(connector: &mut CsvConnector, after: &Cursor) -> (Vec<String>, Cursor) {
    let batch = connector.capture(after, 100).unwrap();
    connector.acknowledge(&batch.cursor).unwrap();
    (summary(&batch), batch.cursor)
}

fn upsert(key: &str, fields: &[(&str, &str)]) -> WriteOp {
    WriteOp::Upsert {
        collection: "customers".to_owned(),
        key: key.to_owned(),
        fields: fields
            .iter()
            .map(|(f, v)| ((*f).to_owned(), Value::Text((*v).to_owned())))
            .collect(),
    }
}

fn delete(key: &str) -> WriteOp {
    WriteOp::Delete {
        collection: "customers".to_owned(),
        key: key.to_owned(),
    }
}

#[test]
fn a_round_trip_keeps_the_file_format_byte_for_byte() {
    let dir = tempfile::tempdir().unwrap();
    let original = "\u{feff}\"id\";\"name\";\"notes\";\"email\"\r\n\
                    \"1\";\"Ada\";\"likes \"\"tea\"\"; and cake\";\"ada@example.com\"\r\n\
                    2;\"Bob\";;bob@example.com\r\n";
    put(dir.path(), original);
    let collection = customers(&["name", "email"], &[]);
    let mut connector = CsvConnector::open(&config(dir.path()), vec![collection]).unwrap();
    let (changes, cursor) = capture(&mut connector, &Cursor::start());
    assert_eq!(changes, ["1 ada@example.com|Ada", "2 bob@example.com|Bob"]);

    let outcomes = connector
        .write_back(
            &cursor,
            &HashSet::new(),
            &[upsert("1", &[("name", "Ada L.")])],
        )
        .unwrap();

    assert_eq!(outcomes, [OpOutcome::WRITTEN]);
    // The written row is quoted as the header is; the other row keeps its bytes.
    let expected = "\u{feff}\"id\";\"name\";\"notes\";\"email\"\r\n\
                    \"1\";\"Ada L.\";\"likes \"\"tea\"\"; and cake\";\"ada@example.com\"\r\n\
                    2;\"Bob\";;bob@example.com\r\n";
    assert_eq!(String::from_utf8(bytes(dir.path())).unwrap(), expected);
}

#[test]
fn appended_rows_follow_the_file_format_and_deleted_rows_go() {
    let dir = tempfile::tempdir().unwrap();
    put(dir.path(), "id\tname\tnotes\n1\tAda\tx\n2\tBob\ty");
    let mut connector = open(dir.path());
    let (_, cursor) = capture(&mut connector, &Cursor::start());

    let ops = [delete("1"), upsert("3", &[("name", "Cy\tD")]), delete("9")];
    let outcomes = connector
        .write_back(&cursor, &HashSet::new(), &ops)
        .unwrap();

    assert_eq!(
        outcomes,
        [OpOutcome::WRITTEN, OpOutcome::WRITTEN, OpOutcome::WRITTEN]
    );
    // Tab-delimited, no line break at the end, the new row's unmapped cell empty.
    assert_eq!(
        String::from_utf8(bytes(dir.path())).unwrap(),
        "id\tname\tnotes\n2\tBob\ty\n3\t\"Cy\tD\"\t"
    );
}

#[test]
fn a_missing_file_is_created_with_a_header_line() {
    let dir = tempfile::tempdir().unwrap();
    let collection = customers(&["name", "email"], &[]);
    CsvConnector::open(&config(dir.path()), vec![collection]).unwrap();
    assert_eq!(bytes(dir.path()), b"id,name,email\n");
}

#[test]
fn capture_reports_added_changed_and_deleted_rows_once() {
    let dir = tempfile::tempdir().unwrap();
    put(dir.path(), "id,name\n1,Ada\n2,Bob\n3,Cy\n");
    let mut connector = open(dir.path());
    let (changes, cursor) = capture(&mut connector, &Cursor::start());
    assert_eq!(changes, ["1 Ada", "2 Bob", "3 Cy"]);

    put(dir.path(), "id,name\n1,Ada\n2,Bobby\n4,Di\n");
    assert!(connector.changed().unwrap());
    let (changes, cursor) = capture(&mut connector, &cursor);
    assert_eq!(changes, ["2 Bobby", "4 Di", "3 gone"]);

    let again = connector.capture(&cursor, 100).unwrap();
    assert!(again.changes.is_empty());
    assert_eq!(again.cursor, cursor, "nothing new keeps the cursor");
}

#[test]
fn an_edit_of_the_same_length_right_after_a_capture_is_seen() {
    let dir = tempfile::tempdir().unwrap();
    put(dir.path(), "id,name\n1,Ada\n");
    let mut connector = open(dir.path());
    let (_, cursor) = capture(&mut connector, &Cursor::start());
    // Same length, same file, and the same modification time, as a file system
    // with a coarse clock keeps it.
    let modified = fs::metadata(dir.path().join(FILE))
        .unwrap()
        .modified()
        .unwrap();
    put(dir.path(), "id,name\n1,Eve\n");
    let file = fs::File::options()
        .write(true)
        .open(dir.path().join(FILE))
        .unwrap();
    file.set_modified(modified).unwrap();
    drop(file);
    assert!(connector.changed().unwrap());
    assert_eq!(capture(&mut connector, &cursor).0, ["1 Eve"]);
}

#[test]
fn a_capture_is_cut_at_max_and_goes_on_next_time() {
    let dir = tempfile::tempdir().unwrap();
    put(dir.path(), "id,name\n1,Ada\n2,Bob\n3,Cy\n");
    let mut connector = open(dir.path());
    let first = connector.capture(&Cursor::start(), 2).unwrap();
    assert_eq!(summary(&first), ["1 Ada", "2 Bob"]);
    assert!(connector.changed().unwrap(), "the rest waits");
    let second = connector.capture(&first.cursor, 2).unwrap();
    assert_eq!(summary(&second), ["3 Cy"]);
    let third = connector.capture(&second.cursor, 2).unwrap();
    assert!(third.changes.is_empty());
}

#[test]
fn an_acknowledged_capture_survives_reopening_and_an_unacknowledged_one_is_repeated() {
    let dir = tempfile::tempdir().unwrap();
    put(dir.path(), "id,name\n1,Ada\n2,Bob\n");
    let mut connector = open(dir.path());
    let (_, acknowledged) = capture(&mut connector, &Cursor::start());
    put(dir.path(), "id,name\n1,Ada\n2,Bobby\n");
    let unacknowledged = connector.capture(&acknowledged, 100).unwrap();
    assert_eq!(summary(&unacknowledged), ["2 Bobby"]);
    drop(connector);

    // The agent stored only the first batch: it captures after it again.
    let mut connector = open(dir.path());
    let batch = connector.capture(&acknowledged, 100).unwrap();
    assert_eq!(summary(&batch), ["2 Bobby"]);
    assert!(sequence(&batch.cursor).unwrap() > sequence(&acknowledged).unwrap());
    connector.acknowledge(&batch.cursor).unwrap();
    drop(connector);

    let mut connector = open(dir.path());
    assert!(
        connector
            .capture(&batch.cursor, 100)
            .unwrap()
            .changes
            .is_empty()
    );
}

#[test]
fn a_renamed_column_is_a_clear_error_at_open_capture_and_write() {
    let dir = tempfile::tempdir().unwrap();
    put(dir.path(), "id,name,mail\n1,Ada,a@example.com\n");
    let collection = customers(&["name", "email"], &[]);
    let message = "customers.csv: no column `email` in the header (columns: id, name, mail)";
    let error = CsvConnector::open(&config(dir.path()), vec![collection.clone()]).unwrap_err();
    assert_eq!(error.to_string(), message);
    let error = inspect(&config(dir.path()), std::slice::from_ref(&collection)).unwrap_err();
    assert_eq!(error.to_string(), message);

    put(dir.path(), "id,name,email\n1,Ada,a@example.com\n");
    let mut connector = CsvConnector::open(&config(dir.path()), vec![collection]).unwrap();
    let (_, cursor) = capture(&mut connector, &Cursor::start());
    put(dir.path(), "id,name,mail\n1,Ada,a@example.com\n");
    let error = connector.capture(&cursor, 100).unwrap_err();
    assert_eq!(error.to_string(), message);
    let op = upsert("1", &[("name", "Ada L.")]);
    let error = connector
        .write_back(&cursor, &HashSet::new(), &[op])
        .unwrap_err();
    assert_eq!(error.to_string(), message);
    assert_eq!(bytes(dir.path()), b"id,name,mail\n1,Ada,a@example.com\n");
}

#[test]
fn a_malformed_integer_is_invalid_naming_the_column_and_reported_once() {
    let dir = tempfile::tempdir().unwrap();
    put(dir.path(), "id,name,age\n1,Ada,36\n2,Bob,4x2\n");
    let collection = customers(&["name", "age"], &[("age", FieldType::Integer)]);
    let mut connector = CsvConnector::open(&config(dir.path()), vec![collection]).unwrap();
    let batch = connector.capture(&Cursor::start(), 100).unwrap();
    assert_eq!(summary(&batch), ["1 36|Ada", "2 invalid age"]);
    let RowState::Invalid(invalid) = &batch.changes[1].state else {
        unreachable!("checked by the summary")
    };
    assert_eq!(
        invalid.to_string(),
        "customers.csv key 2: column `age` holds \"4x2\" (line 3), expected integer \
         (declared integer in the config)"
    );
    connector.acknowledge(&batch.cursor).unwrap();

    put(dir.path(), "id,name,age\n1,Ada,37\n2,Bob,4x2\n");
    let (changes, cursor) = capture(&mut connector, &batch.cursor);
    assert_eq!(
        changes,
        ["1 37|Ada"],
        "the invalid row is not reported again"
    );

    put(dir.path(), "id,name,age\n1,Ada,37\n2,Bob,42\n");
    assert_eq!(capture(&mut connector, &cursor).0, ["2 42|Bob"]);
}

#[test]
fn duplicate_and_empty_keys_are_invalid() {
    let dir = tempfile::tempdir().unwrap();
    put(dir.path(), "id,name\n1,Ada\n1,Eve\n,Nobody\n2,Bob\n");
    let mut connector = open(dir.path());
    let (changes, cursor) = capture(&mut connector, &Cursor::start());
    // The first row of a key wins; the duplicate is reported once the winner is.
    assert_eq!(changes, ["1 Ada", "2 Bob", " invalid id"]);
    let batch = connector.capture(&cursor, 100).unwrap();
    assert_eq!(summary(&batch), ["1 invalid id"]);
    let RowState::Invalid(invalid) = &batch.changes[0].state else {
        unreachable!("checked by the summary")
    };
    assert!(
        invalid
            .to_string()
            .contains("a second row with this key (line 3)")
    );
    connector.acknowledge(&batch.cursor).unwrap();
    assert!(
        connector
            .capture(&batch.cursor, 100)
            .unwrap()
            .changes
            .is_empty()
    );

    // Fixed: the record is reported valid again, the keyless row gone.
    put(dir.path(), "id,name\n1,Ada\n2,Bob\n");
    assert_eq!(capture(&mut connector, &batch.cursor).0, ["1 Ada", " gone"]);
}

#[test]
fn a_half_written_file_reports_nothing_until_it_is_complete() {
    let dir = tempfile::tempdir().unwrap();
    put(dir.path(), "id,name\n1,Ada\n2,Bob\n");
    let mut connector = open(dir.path());
    let (_, cursor) = capture(&mut connector, &Cursor::start());

    put(dir.path(), "id,name\n1,\"Ada");
    let batch = connector.capture(&cursor, 100).unwrap();
    assert!(batch.changes.is_empty(), "no row of it is read as gone");
    assert_eq!(batch.cursor, cursor);
    assert!(connector.changed().unwrap(), "it is tried again");

    put(dir.path(), "id,name\n1,\"Ada, L.\"\n2,Bob\n");
    assert_eq!(capture(&mut connector, &cursor).0, ["1 Ada, L."]);
}

#[test]
fn an_empty_file_just_written_is_not_read_as_deletes() {
    let dir = tempfile::tempdir().unwrap();
    put(dir.path(), "id,name\n1,Ada\n");
    let config = CsvConfig {
        debounce: Duration::from_secs(60),
        ..config(dir.path())
    };
    let mut connector = CsvConnector::open(&config, vec![customers(&["name"], &[])]).unwrap();
    let (_, cursor) = capture(&mut connector, &Cursor::start());
    put(dir.path(), "");
    let batch = connector.capture(&cursor, 100).unwrap();
    assert!(batch.changes.is_empty());
    put(dir.path(), "id,name\n");
    assert!(connector.changed().unwrap());
    let batch = connector.capture(&cursor, 100).unwrap();
    assert!(
        batch.changes.is_empty(),
        "a row gone from a file just written waits"
    );
}

#[test]
fn a_lock_file_makes_write_back_an_error_and_leaves_the_file() {
    let dir = tempfile::tempdir().unwrap();
    put(dir.path(), "id,name\n1,Ada\n");
    let mut connector = open(dir.path());
    let (_, cursor) = capture(&mut connector, &Cursor::start());
    for lock in [".~lock.customers.csv#", "~$customers.csv"] {
        fs::write(dir.path().join(lock), "user").unwrap();
        let op = upsert("1", &[("name", "Ada L.")]);
        let error = connector
            .write_back(&cursor, &HashSet::new(), &[op])
            .unwrap_err();
        assert!(
            error
                .to_string()
                .contains("locked by a spreadsheet program"),
            "{error}"
        );
        assert_eq!(bytes(dir.path()), b"id,name\n1,Ada\n");
        fs::remove_file(dir.path().join(lock)).unwrap();
    }
}

#[test]
fn an_outside_edit_after_capture_makes_its_op_stale_and_is_kept() {
    let dir = tempfile::tempdir().unwrap();
    put(dir.path(), "id,name\n1,Ada\n2,Bob\n3,Cy\n");
    let mut connector = open(dir.path());
    let (_, cursor) = capture(&mut connector, &Cursor::start());
    put(dir.path(), "id,name\n1,Ada (edited)\n2,Bob\n3,Cy\n");

    let ops = [
        upsert("1", &[("name", "Ada L.")]),
        upsert("2", &[("name", "Bob B.")]),
        upsert("3", &[("name", "Cy C.")]),
    ];
    let changed_since = HashSet::from([("customers".to_owned(), "3".to_owned())]);
    let outcomes = connector.write_back(&cursor, &changed_since, &ops).unwrap();

    assert_eq!(
        outcomes,
        [OpOutcome::Stale, OpOutcome::WRITTEN, OpOutcome::Stale]
    );
    assert_eq!(
        bytes(dir.path()),
        b"id,name\n1,Ada (edited)\n2,Bob B.\n3,Cy\n"
    );
    assert_eq!(capture(&mut connector, &cursor).0, ["1 Ada (edited)"]);
}

#[test]
fn own_writes_are_not_captured_back() {
    let dir = tempfile::tempdir().unwrap();
    put(dir.path(), "id,name\n1,Ada\n2,Bob\n");
    let mut connector = open(dir.path());
    let (_, cursor) = capture(&mut connector, &Cursor::start());

    let ops = [
        upsert("1", &[("name", "Ada L.")]),
        delete("2"),
        upsert("3", &[("name", "Cy")]),
    ];
    let outcomes = connector
        .write_back(&cursor, &HashSet::new(), &ops)
        .unwrap();
    assert_eq!(
        outcomes,
        [OpOutcome::WRITTEN, OpOutcome::WRITTEN, OpOutcome::WRITTEN]
    );
    assert_eq!(bytes(dir.path()), b"id,name\n1,Ada L.\n3,Cy\n");

    let batch = connector.capture(&cursor, 100).unwrap();
    assert!(batch.changes.is_empty(), "{:?}", summary(&batch));
    assert_eq!(batch.cursor, cursor);
    drop(connector);
    // Written is durable: nothing comes back after reopening either.
    let mut connector = open(dir.path());
    assert!(connector.capture(&cursor, 100).unwrap().changes.is_empty());
}

#[test]
fn ops_the_file_cannot_take_are_rejected() {
    let dir = tempfile::tempdir().unwrap();
    put(dir.path(), "id,name,age\n1,Ada,36\n");
    let collection = customers(&["name", "age"], &[("age", FieldType::Integer)]);
    let mut connector = CsvConnector::open(&config(dir.path()), vec![collection]).unwrap();
    let (_, cursor) = capture(&mut connector, &Cursor::start());
    let ops = [
        WriteOp::Insert {
            collection: "customers".to_owned(),
            token: "t".to_owned(),
            fields: Record::new(),
        },
        upsert("1", &[("phone", "555")]),
        upsert("1", &[("age", "old")]),
        upsert("1", &[("id", "2")]),
        upsert("", &[("name", "Nobody")]),
        delete("9"),
        WriteOp::Delete {
            collection: "orders".to_owned(),
            key: "1".to_owned(),
        },
    ];
    let outcomes = connector
        .write_back(&cursor, &HashSet::new(), &ops)
        .unwrap();
    let reasons: Vec<String> = outcomes
        .iter()
        .map(|o| match o {
            OpOutcome::Rejected(rejection) => rejection.to_string(),
            other => format!("{other:?}"),
        })
        .collect();
    assert_eq!(
        reasons,
        [
            "customers.csv: the primary key `id` is not assigned by the tool, so a record without a key cannot be inserted",
            "customers.csv key 1: `phone` is not a configured column",
            "customers.csv key 1: column `age` is declared integer in the config, but the value holds \"old\", which is not an integer",
            "customers.csv key 1: field `id` holds \"2\", which is not the key",
            "customers.csv key : column `id` is empty, and every row needs a key",
            "Written { key: None, version: None }",
            "unknown collection `orders`",
        ]
    );
    assert_eq!(bytes(dir.path()), b"id,name,age\n1,Ada,36\n");
}

#[test]
fn a_claim_by_another_store_rescans_every_row() {
    let dir = tempfile::tempdir().unwrap();
    put(dir.path(), "id,name\n1,Ada\n2,Bob\n");
    let mut connector = open(dir.path());
    connector.claim(b"one").unwrap();
    let (_, cursor) = capture(&mut connector, &Cursor::start());
    connector.claim(b"one").unwrap();
    assert!(connector.capture(&cursor, 100).unwrap().changes.is_empty());

    connector.claim(b"two").unwrap();
    assert!(connector.changed().unwrap());
    let batch = connector.capture(&cursor, 100).unwrap();
    assert!(batch.rescan);
    assert_eq!(summary(&batch), ["1 Ada", "2 Bob"]);
    assert!(!connector.capture(&batch.cursor, 100).unwrap().rescan);
}

#[test]
fn a_file_event_wakes_the_agent_after_the_debounce() {
    let dir = tempfile::tempdir().unwrap();
    put(dir.path(), "id,name\n1,Ada\n");
    let config = CsvConfig {
        debounce: Duration::from_millis(20),
        ..config(dir.path())
    };
    let mut connector = CsvConnector::open(&config, vec![customers(&["name"], &[])]).unwrap();
    let (_, cursor) = capture(&mut connector, &Cursor::start());
    let (woken, wakes) = mpsc::channel();
    let woken = std::sync::Mutex::new(woken);
    connector
        .subscribe(Arc::new(move || {
            let _ = woken.lock().map(|w| w.send(()));
        }))
        .unwrap();

    // Saved as spreadsheet programs do: a new file renamed over the old one.
    let started = Instant::now();
    fs::write(dir.path().join("new.tmp"), "id,name\n1,Ada\n2,Bob\n").unwrap();
    fs::rename(dir.path().join("new.tmp"), dir.path().join(FILE)).unwrap();
    wakes.recv_timeout(Duration::from_secs(5)).unwrap();
    assert!(started.elapsed() >= config.debounce);
    assert!(connector.changed().unwrap());
    assert_eq!(capture(&mut connector, &cursor).0, ["2 Bob"]);
}

#[test]
fn check_reads_headers_only_and_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let collections = [customers(&["name", "age"], &[("age", FieldType::Integer)])];
    let schemas = inspect(&config(dir.path()), &collections).unwrap();
    assert_eq!(
        schemas,
        [TableSchema {
            assigns_keys: false,
            field_types: BTreeMap::from([
                ("age".to_owned(), FieldType::Integer),
                ("name".to_owned(), FieldType::Text),
            ]),
        }]
    );
    assert!(!dir.path().join(FILE).exists());
    assert!(!dir.path().join("state").exists());
}
