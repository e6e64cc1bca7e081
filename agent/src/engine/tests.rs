//! The engine's decisions on real fjall stores.

use std::collections::HashMap;

use connectors::{CaptureBatch, CapturedChange, Cursor, OpOutcome, RowState, WriteOp};
use crdt_model::{DocId, Edit, Record, RecordDoc, Value};

use super::*;
use crate::config::{MatchWins, Normalize};
use crate::engine::{RemoteError, WireEntry};
use crate::store::DOC_CACHE_MAX;

fn engine(dir: &std::path::Path) -> Result<Engine, StoreError> {
    let collections = BTreeMap::from([(
        "customers".to_owned(),
        CollectionInfo {
            mapping: Mapping::plain(&["name".to_owned()]),
            natural_key: None,
            identity: RecordIdentity::SharedKey,
        },
    )]);
    Engine::new(Store::open(dir)?, vec![tool(collections)], [])
}

fn tool(collections: BTreeMap<String, CollectionInfo>) -> ToolSpec {
    ToolSpec {
        name: "sqlite".to_owned(),
        uid: "agent.sqlite".to_owned(),
        collections,
    }
}

/// Stages `changes` as one capture of the engine's tool ending at outbox seq `seq`.
fn capture(
    engine: &mut Engine,
    batch: &mut Batch,
    changes: Vec<CapturedChange>,
    seq: u64,
) -> Result<(), StoreError> {
    let captured = CaptureBatch {
        changes,
        cursor: Cursor(seq.to_be_bytes().to_vec()),
        rescan: false,
    };
    engine.capture(batch, 0, captured, seq, 0)
}

fn captured(key: &str, name: &str) -> CapturedChange {
    CapturedChange {
        collection: "customers".to_owned(),
        key: key.to_owned(),
        previous_key: None,
        state: RowState::Present(Record::from([(
            "name".to_owned(),
            Value::Text(name.to_owned()),
        )])),
    }
}

/// A change whose dependencies never arrived (a gap no cursor can see) is
/// repaired by exchanging the document's heads.
#[test]
fn a_document_with_missing_dependencies_is_repaired_by_a_heads_exchange()
-> Result<(), Box<dyn std::error::Error>> {
    let (dir_a, dir_b) = (tempfile::tempdir()?, tempfile::tempdir()?);
    let (mut a, mut b) = (engine(dir_a.path())?, engine(dir_b.path())?);
    for (cursor, name) in [(1, "Ada"), (2, "Ada Lovelace")] {
        let mut batch = a.store().batch();
        capture(&mut a, &mut batch, vec![captured("1", name)], cursor)?;
        a.store().commit(batch)?;
    }
    let log = a.store().reader().log_from("customers", 1, 10)?;
    assert_eq!(log.len(), 2);
    let id = DocId(log[1].1.doc);

    // B gets only the second entry.
    let second = WireEntry {
        seq: 2,
        doc: log[1].1.doc,
        changes: log[1].1.changes.clone(),
    };
    let mut batch = b.store().batch();
    let outcome = b.apply_remote(
        &mut batch,
        a.store().actor(),
        "customers",
        Some(2),
        vec![second],
    )?;
    b.store().commit(batch)?;
    assert_eq!(outcome.missing, vec![id]);

    let heads = b.heads(id)?;
    let repair = a
        .changes_since("customers", id, &heads)?
        .ok_or("A knows the document")?;
    assert_eq!(repair.collection, "customers");
    let entry = WireEntry {
        seq: 0,
        doc: id.0,
        changes: repair.changes,
    };
    let mut batch = b.store().batch();
    let outcome = b.apply_remote(
        &mut batch,
        a.store().actor(),
        "customers",
        None,
        vec![entry],
    )?;
    b.store().commit(batch)?;
    assert!(outcome.missing.is_empty());
    assert_eq!(b.heads(id)?, a.heads(id)?);
    let state = b.store().doc(id)?.read()?;
    assert_eq!(state.fields["name"], Value::Text("Ada Lovelace".to_owned()));
    Ok(())
}

/// A peer cannot put a record into a document whose id belongs to another.
#[test]
fn changes_under_a_foreign_document_id_are_refused() -> Result<(), Box<dyn std::error::Error>> {
    let (dir_a, dir_b) = (tempfile::tempdir()?, tempfile::tempdir()?);
    let (mut a, mut b) = (engine(dir_a.path())?, engine(dir_b.path())?);
    let mut batch = a.store().batch();
    capture(&mut a, &mut batch, vec![captured("1", "Ada")], 1)?;
    a.store().commit(batch)?;
    let log = a.store().reader().log_from("customers", 1, 10)?;
    let forged = WireEntry {
        seq: 1,
        doc: DocId::of("customers", "2").0,
        changes: log[0].1.changes.clone(),
    };
    let mut batch = b.store().batch();
    let result = b.apply_remote(
        &mut batch,
        a.store().actor(),
        "customers",
        Some(1),
        vec![forged],
    );
    assert!(
        matches!(result, Err(RemoteError::WrongIdentity { .. })),
        "{result:?}"
    );
    Ok(())
}

type TestResult = Result<(), Box<dyn std::error::Error>>;

fn name_of(engine: &mut Engine, key: &str) -> Result<Option<Value>, Box<dyn std::error::Error>> {
    let state = engine.store().doc(DocId::of("customers", key))?.read()?;
    Ok(state.fields.get("name").cloned())
}

/// A log entry of `key` made by a foreign store, as a peer would send it.
fn remote_edit(
    actor: u8,
    key: &str,
    base: &[Vec<u8>],
    name: &str,
) -> Result<WireEntry, Box<dyn std::error::Error>> {
    let mut doc = RecordDoc::new(&[actor; 16]);
    doc.apply(base)?;
    let mut edit = Edit::default();
    edit.fields
        .insert("name".to_owned(), Value::Text(name.to_owned()));
    let change = doc.edit("customers", key, &edit)?.ok_or("a change")?;
    Ok(WireEntry {
        seq: 1,
        doc: DocId::of("customers", key).0,
        changes: vec![change],
    })
}

/// Regression (read-your-writes inside a group commit): a `WritesDone` and the next
/// `Capture` shared a batch; the capture read the committed shadow, took the
/// agent's own just-written value for a user edit and reverted a remote edit that
/// arrived meanwhile.
#[test]
fn a_capture_in_the_same_batch_as_the_write_back_sees_its_shadow() -> TestResult {
    let dir = tempfile::tempdir()?;
    let mut a = engine(dir.path())?;
    let mut batch = a.store().batch();
    capture(&mut a, &mut batch, vec![captured("1", "Ada")], 1)?;
    a.store().commit(batch)?;
    let base: Vec<Vec<u8>> = a
        .store()
        .reader()
        .log_from("customers", 1, 10)?
        .into_iter()
        .flat_map(|(_, e)| e.changes)
        .collect();

    // A peer renames the record; the agent plans and writes "Grace" into the tool.
    let peer = [9; 16];
    let mut batch = a.store().batch();
    a.apply_remote(
        &mut batch,
        peer,
        "customers",
        Some(1),
        vec![remote_edit(9, "1", &base, "Grace")?],
    )?;
    a.store().commit(batch)?;
    let mut batch = a.store().batch();
    let plan = a.plan_writes(&mut batch, 0, 10, 0)?;
    a.store().commit(batch)?;
    assert_eq!(plan.writes.len(), 1);

    // Meanwhile the peer renames it again. Then, in one group commit: the write-back
    // result, and a capture of the row that the write-back left holding "Grace".
    let newer = {
        let mut doc = RecordDoc::new(&[9; 16]);
        doc.apply(&base)?;
        let first = remote_edit(9, "1", &base, "Grace")?;
        doc.apply(&first.changes)?;
        let mut edit = Edit::default();
        edit.fields
            .insert("name".to_owned(), Value::Text("Grace Hopper".to_owned()));
        let change = doc.edit("customers", "1", &edit)?.ok_or("a change")?;
        WireEntry {
            seq: 2,
            doc: DocId::of("customers", "1").0,
            changes: vec![change],
        }
    };
    let mut batch = a.store().batch();
    a.apply_remote(&mut batch, peer, "customers", Some(2), vec![newer])?;
    a.store().commit(batch)?;
    let mut batch = a.store().batch();
    a.writes_done(&mut batch, plan, vec![OpOutcome::WRITTEN], 0)?;
    capture(&mut a, &mut batch, vec![captured("1", "Grace")], 2)?;
    a.store().commit(batch)?;
    assert_eq!(
        name_of(&mut a, "1")?,
        Some(Value::Text("Grace Hopper".to_owned())),
        "the agent's own write was captured as a user edit and reverted the peer's"
    );
    Ok(())
}

/// Regression: a batch that touched more documents than the cache holds evicted a
/// staged document, loaded its stale bytes from disk and staged them again, losing
/// a change.
#[test]
fn a_batch_larger_than_the_document_cache_loses_nothing() -> TestResult {
    let dir = tempfile::tempdir()?;
    let mut a = engine(dir.path())?;
    let mut batch = a.store().batch();
    capture(&mut a, &mut batch, vec![captured("0", "first")], 1)?;
    a.store().commit(batch)?;
    let mut batch = a.store().batch();
    capture(&mut a, &mut batch, vec![captured("0", "second")], 2)?;
    let others: Vec<CapturedChange> = (1..=DOC_CACHE_MAX + 10)
        .map(|i| captured(&i.to_string(), "x"))
        .collect();
    capture(&mut a, &mut batch, others, 3)?;
    capture(&mut a, &mut batch, vec![captured("0", "third")], 4)?;
    a.store().commit(batch)?;
    drop(a);
    let mut a = engine(dir.path())?;
    assert_eq!(name_of(&mut a, "0")?, Some(Value::Text("third".to_owned())));
    let doc = a.store().doc(DocId::of("customers", "0"))?;
    assert_eq!(
        doc.automerge().get_changes(&[]).len(),
        3,
        "a change was lost"
    );
    Ok(())
}

/// Regression: one value from a peer that Concord cannot read (a counter) was
/// stored and made every later start abort in planning. It is refused, the
/// document is quarantined, and the agent goes on.
#[test]
fn an_unreadable_value_from_a_peer_is_refused_and_quarantined() -> TestResult {
    use automerge::transaction::Transactable;
    let dir = tempfile::tempdir()?;
    let mut a = engine(dir.path())?;
    let mut doc = RecordDoc::new(&[9; 16]);
    doc.edit("customers", "1", &Edit::default())?;
    doc.automerge().put(
        automerge::ROOT,
        "f:name",
        automerge::ScalarValue::counter(1),
    )?;
    doc.automerge().commit();
    let changes: Vec<Vec<u8>> = doc
        .automerge()
        .get_changes(&[])
        .iter()
        .map(|c| c.raw_bytes().to_vec())
        .collect();
    let entry = WireEntry {
        seq: 1,
        doc: DocId::of("customers", "1").0,
        changes,
    };
    let mut batch = a.store().batch();
    let result = a.apply_remote(&mut batch, [9; 16], "customers", Some(1), vec![entry]);
    assert!(
        matches!(result, Err(RemoteError::UnreadableValue { .. })),
        "{result:?}"
    );
    a.store().commit(batch)?;
    let quarantined = a.reader().quarantined()?;
    assert_eq!(quarantined.len(), 1);
    assert!(
        quarantined[0].reason.contains("name"),
        "{:?}",
        quarantined[0]
    );
    assert_eq!(quarantined[0].peer, Some([9; 16]));
    // Nothing of it is kept: planning works, now and after a restart.
    let mut batch = a.store().batch();
    assert!(a.plan_writes(&mut batch, 0, 10, 0)?.writes.is_empty());
    a.store().commit(batch)?;
    drop(a);
    let mut a = engine(dir.path())?;
    let mut batch = a.store().batch();
    assert!(a.plan_writes(&mut batch, 0, 10, 0)?.writes.is_empty());
    assert!(!a.store().has_doc(DocId::of("customers", "1"))?);
    Ok(())
}

/// Regression (a re-inserted key inherited the deleted record): the new row starts
/// the record anew; fields it lacks are empty.
#[test]
fn a_row_created_after_a_delete_starts_from_the_row() -> TestResult {
    let dir = tempfile::tempdir()?;
    let collections = BTreeMap::from([(
        "customers".to_owned(),
        CollectionInfo {
            mapping: Mapping::plain(&["name".to_owned(), "email".to_owned()]),
            natural_key: None,
            identity: RecordIdentity::SharedKey,
        },
    )]);
    let mut a = Engine::new(Store::open(dir.path())?, vec![tool(collections)], [])?;
    let row = |name: &str, email: Option<&str>| CapturedChange {
        collection: "customers".to_owned(),
        key: "5".to_owned(),
        previous_key: None,
        state: RowState::Present(Record::from([
            ("name".to_owned(), Value::Text(name.to_owned())),
            (
                "email".to_owned(),
                email.map_or(Value::Null, |e| Value::Text(e.to_owned())),
            ),
        ])),
    };
    let steps = [
        row("Old Name", Some("old@example.com")),
        CapturedChange {
            collection: "customers".to_owned(),
            key: "5".to_owned(),
            previous_key: None,
            state: RowState::Absent,
        },
        row("New Person", None),
    ];
    for (cursor, change) in (1..).zip(steps) {
        let mut batch = a.store().batch();
        capture(&mut a, &mut batch, vec![change], cursor)?;
        a.store().commit(batch)?;
    }
    let state = a.store().doc(DocId::of("customers", "5"))?.read()?;
    assert!(!state.deleted);
    assert_eq!(
        state.fields.get("email"),
        None,
        "the dead record's email came back"
    );
    let mut batch = a.store().batch();
    assert!(
        a.plan_writes(&mut batch, 0, 10, 0)?.writes.is_empty(),
        "the tool already holds it"
    );
    Ok(())
}

/// A write refused as stale leaves its document pending; the others are done.
#[test]
fn stale_writes_stay_pending_and_the_rest_are_done() -> TestResult {
    let dir = tempfile::tempdir()?;
    let mut a = engine(dir.path())?;
    let peer = [9; 16];
    let mut batch = a.store().batch();
    let entries = vec![
        remote_edit(9, "1", &[], "One")?,
        WireEntry {
            seq: 2,
            ..remote_edit(9, "2", &[], "Two")?
        },
    ];
    a.apply_remote(&mut batch, peer, "customers", Some(2), entries)?;
    a.store().commit(batch)?;
    let mut batch = a.store().batch();
    let plan = a.plan_writes(&mut batch, 0, 10, 0)?;
    assert_eq!(plan.writes.len(), 2);
    let keys: HashMap<DocId, usize> = plan
        .writes
        .iter()
        .enumerate()
        .map(|(i, w)| (w.doc, i))
        .collect();
    let mut outcomes = vec![OpOutcome::WRITTEN; 2];
    outcomes[keys[&DocId::of("customers", "1")]] = OpOutcome::Stale;
    a.writes_done(&mut batch, plan, outcomes, 0)?;
    a.store().commit(batch)?;
    let mut batch = a.store().batch();
    let again = a.plan_writes(&mut batch, 0, 10, 0)?;
    assert_eq!(again.writes.len(), 1);
    assert_eq!(again.writes[0].doc, DocId::of("customers", "1"));
    assert!(matches!(again.writes[0].op, WriteOp::Upsert { .. }));
    Ok(())
}

/// An engine whose tool `name` (id in documents `uid`) syncs customers by tool ids.
fn tool_ids_engine(dir: &std::path::Path, name: &str, uid: &str) -> Result<Engine, StoreError> {
    let collections = BTreeMap::from([(
        "customers".to_owned(),
        CollectionInfo {
            mapping: Mapping::plain(&["name".to_owned()]),
            natural_key: None,
            identity: RecordIdentity::ToolIds,
        },
    )]);
    let tool = ToolSpec {
        name: name.to_owned(),
        uid: uid.to_owned(),
        collections,
    };
    Engine::new(Store::open(dir)?, vec![tool], [])
}

/// Under tool ids a captured row gets a minted document without an identity key;
/// a store whose tool never held the record plans an insert without a key, links
/// the key the tool assigned, and records it in the document under its own tool
/// id, beside the first tool's: two agents' tools named alike never overwrite each
/// other's ids.
#[test]
fn tool_ids_insert_with_the_assigned_key_and_keep_each_tools_id()
-> Result<(), Box<dyn std::error::Error>> {
    let (dir_a, dir_b) = (tempfile::tempdir()?, tempfile::tempdir()?);
    let mut a = tool_ids_engine(dir_a.path(), "crm", "aaaaaaaa.crm")?;
    let mut b = tool_ids_engine(dir_b.path(), "crm", "bbbbbbbb.crm")?;
    let mut batch = a.store().batch();
    capture(&mut a, &mut batch, vec![captured("6", "Alice")], 1)?;
    a.store().commit(batch)?;
    let log = a.store().reader().log_from("customers", 1, 10)?;
    let id = DocId(log[0].1.doc);
    assert_ne!(
        id,
        DocId::of("customers", "6"),
        "the id is minted, not derived"
    );
    assert_eq!(a.store().doc(id)?.read()?.key, "", "no identity key");

    let entry = WireEntry {
        seq: 1,
        doc: id.0,
        changes: log[0].1.changes.clone(),
    };
    let mut batch = b.store().batch();
    b.apply_remote(
        &mut batch,
        a.store().actor(),
        "customers",
        Some(1),
        vec![entry],
    )?;
    b.store().commit(batch)?;
    let mut batch = b.store().batch();
    let plan = b.plan_writes(&mut batch, 0, 10, 0)?;
    b.store().commit(batch)?;
    assert_eq!(plan.writes.len(), 1);
    assert!(
        matches!(&plan.writes[0].op, WriteOp::Insert { fields, .. } if fields["name"] == Value::Text("Alice".to_owned())),
        "{:?}",
        plan.writes[0].op
    );
    let mut batch = b.store().batch();
    let written = OpOutcome::Written {
        key: Some("7".to_owned()),
        version: None,
    };
    b.writes_done(&mut batch, plan, vec![written], 0)?;
    b.store().commit(batch)?;
    assert_eq!(b.store().linked_doc("crm", "customers", "7")?, Some(id));
    assert_eq!(b.store().linked_key("crm", id)?.as_deref(), Some("7"));
    let ids = b.store().doc(id)?.read()?.external_ids;
    assert_eq!(ids.get("aaaaaaaa.crm").map(String::as_str), Some("6"));
    assert_eq!(ids.get("bbbbbbbb.crm").map(String::as_str), Some("7"));

    // B's user edits row 7: the edit reaches the same document.
    let mut batch = b.store().batch();
    capture(&mut b, &mut batch, vec![captured("7", "Alice B.")], 1)?;
    b.store().commit(batch)?;
    let state = b.store().doc(id)?.read()?;
    assert_eq!(state.fields["name"], Value::Text("Alice B.".to_owned()));
    Ok(())
}

/// Regression: a key the tool handed out again (SQLite reuses the rowid of a
/// deleted last row) stayed linked to the record it named before, so a later
/// change of that record wrote over, or deleted, the new record's row.
#[test]
fn a_reused_key_unlinks_the_record_it_named_before() -> Result<(), Box<dyn std::error::Error>> {
    let dir = tempfile::tempdir()?;
    let mut b = tool_ids_engine(dir.path(), "crm", "bbbbbbbb.crm")?;
    let (x, y) = (DocId([1; 16]), DocId([2; 16]));
    let mut batch = b.store().batch();
    b.store()
        .stage_link(&mut batch, "crm", "customers", "7", x)?;
    b.store()
        .stage_link(&mut batch, "crm", "customers", "7", y)?;
    assert_eq!(b.store().linked_key("crm", x)?, None, "within the batch");
    b.store().commit(batch)?;
    assert_eq!(b.store().linked_key("crm", x)?, None);
    assert_eq!(b.store().linked_key("crm", y)?.as_deref(), Some("7"));
    assert_eq!(b.store().linked_doc("crm", "customers", "7")?, Some(y));
    Ok(())
}

/// An engine whose tool `name` syncs customers (name, email) matched by e-mail.
fn natural_engine(
    dir: &std::path::Path,
    uid: &str,
    on_match: MatchWins,
) -> Result<Engine, StoreError> {
    let collections = BTreeMap::from([(
        "customers".to_owned(),
        CollectionInfo {
            mapping: Mapping::plain(&["name".to_owned(), "email".to_owned()]).joining(on_match),
            identity: RecordIdentity::NaturalKey,
            natural_key: Some(NaturalKey::new(vec![(
                "email".to_owned(),
                vec![Normalize::Trim, Normalize::Lowercase],
            )])),
        },
    )]);
    let tool = ToolSpec {
        name: "crm".to_owned(),
        uid: uid.to_owned(),
        collections,
    };
    Engine::new(Store::open(dir)?, vec![tool], [])
}

fn customer(key: &str, name: &str, email: &str) -> CapturedChange {
    CapturedChange {
        collection: "customers".to_owned(),
        key: key.to_owned(),
        previous_key: None,
        state: RowState::Present(Record::from([
            ("name".to_owned(), Value::Text(name.to_owned())),
            ("email".to_owned(), Value::Text(email.to_owned())),
        ])),
    }
}

/// Commits `changes` as one capture made at `now_ms`.
fn capture_at(engine: &mut Engine, changes: Vec<CapturedChange>, now_ms: i64) -> TestResult {
    let mut batch = engine.store().batch();
    let seq = engine.stats().captured + 1;
    let captured = CaptureBatch {
        changes,
        cursor: Cursor(seq.to_be_bytes().to_vec()),
        rescan: false,
    };
    engine.capture(&mut batch, 0, captured, seq, now_ms)?;
    engine.store().commit(batch)?;
    Ok(())
}

/// Everything `from` logged, applied to `to` as a peer's changes.
fn replicate(from: &mut Engine, to: &mut Engine) -> TestResult {
    replicate_from(from, to, 1)
}

/// Sends `to` the entries of `from`'s log from seq `first` on.
fn replicate_from(from: &mut Engine, to: &mut Engine, first: u64) -> TestResult {
    let log = from.reader().log_from("customers", first, 1000)?;
    let upto = log.last().map(|(seq, _)| *seq);
    let entries = log
        .into_iter()
        .map(|(seq, entry)| WireEntry {
            seq,
            doc: entry.doc,
            changes: entry.changes,
        })
        .collect();
    let mut batch = to.store().batch();
    to.apply_remote(&mut batch, from.store_id(), "customers", upto, entries)?;
    to.store().commit(batch)?;
    Ok(())
}

fn ada() -> DocId {
    DocId::natural("customers", "ada@example.com")
}

#[test]
fn two_sites_creating_the_same_customer_offline_grow_one_document() -> TestResult {
    let (dir_a, dir_b) = (tempfile::tempdir()?, tempfile::tempdir()?);
    let mut a = natural_engine(dir_a.path(), "a.crm", MatchWins::Others)?;
    let mut b = natural_engine(dir_b.path(), "b.crm", MatchWins::Others)?;
    capture_at(&mut a, vec![customer("1", "Ada", "Ada@Example.com")], 1)?;
    capture_at(&mut b, vec![customer("7", "Ada", " ada@example.com")], 1)?;
    replicate(&mut a, &mut b)?;
    replicate(&mut b, &mut a)?;
    // The two spellings of the e-mail conflict: each side settles it the same way
    // (latest edit, tie broken alike), and once the decisions crossed, both hold one
    // document with one value.
    replicate(&mut a, &mut b)?;
    for engine in [&mut a, &mut b] {
        assert!(engine.store().has_doc(ada())?);
        assert_eq!(engine.reader().doc_ids()?, vec![ada()], "one document");
    }
    let state = a.store().doc(ada())?.read()?;
    assert_eq!(state.external_ids.len(), 2, "{:?}", state.external_ids);
    assert_eq!(state.fields, b.store().doc(ada())?.read()?.fields);
    assert!(a.store().doc(ada())?.contested()?.is_empty());
    Ok(())
}

#[test]
fn a_tool_joining_links_its_records_and_the_values_win_as_configured() -> TestResult {
    for (on_match, b_at, name) in [
        (MatchWins::Others, 5, "Ada Lovelace"),
        (MatchWins::Tool, 5, "Ada King"),
        (MatchWins::Newest, 5, "Ada King"),
        (MatchWins::Newest, 0, "Ada Lovelace"),
    ] {
        let (dir_a, dir_b) = (tempfile::tempdir()?, tempfile::tempdir()?);
        let mut a = natural_engine(dir_a.path(), "a.crm", MatchWins::Others)?;
        let mut b = natural_engine(dir_b.path(), "b.crm", on_match)?;
        capture_at(
            &mut a,
            vec![customer("1", "Ada Lovelace", "ada@example.com")],
            1,
        )?;
        replicate(&mut a, &mut b)?;
        capture_at(
            &mut b,
            vec![
                customer("7", "Ada King", "ADA@example.com"),
                customer("8", "Bob", "bob@example.com"),
            ],
            b_at,
        )?;
        let state = b.store().doc(ada())?.read()?;
        assert_eq!(
            state.fields["name"],
            Value::Text(name.to_owned()),
            "{on_match:?} at {b_at}"
        );
        assert_eq!(b.reader().shadows("crm", "customers")?.len(), 2);
        // The tool's row takes the merged values; Bob is its own record.
        let mut batch = b.store().batch();
        let plan = b.plan_writes(&mut batch, 0, 10, 10)?;
        let expected = usize::from(name != "Ada King");
        assert_eq!(
            plan.writes.len(),
            expected,
            "{on_match:?}: {:?}",
            plan.writes
        );
        if let Some(write) = plan.writes.first() {
            assert_eq!(write.doc, ada());
            assert!(matches!(&write.op, WriteOp::Upsert { key, .. } if key == "7"));
        }
    }
    Ok(())
}

#[test]
fn natural_keys_not_unique_in_a_tool_are_reported_and_matched_to_nothing() -> TestResult {
    let (dir_a, dir_b) = (tempfile::tempdir()?, tempfile::tempdir()?);
    let mut a = natural_engine(dir_a.path(), "a.crm", MatchWins::Others)?;
    let mut b = natural_engine(dir_b.path(), "b.crm", MatchWins::Others)?;
    capture_at(&mut a, vec![customer("1", "Ada", "ada@example.com")], 1)?;
    replicate(&mut a, &mut b)?;
    // Two of B's rows have Ada's e-mail, in one batch: neither joins her record.
    capture_at(
        &mut b,
        vec![
            customer("7", "Ada", "ada@example.com"),
            customer("8", "Ada Two", "ADA@example.com"),
        ],
        2,
    )?;
    let mut reported = b.reader().ambiguous()?;
    reported.sort_by(|x, y| x.key.cmp(&y.key));
    assert_eq!(reported.len(), 2, "{reported:?}");
    assert_eq!(reported[0].key, "7");
    assert_eq!(reported[0].others, ["8"]);
    assert_eq!(reported[0].natural_key, "ada@example.com");
    assert_eq!(
        b.store().linked_key("crm", ada())?,
        None,
        "not merged silently"
    );
    // A third, in a later batch, is reported against the first.
    capture_at(&mut a, vec![customer("2", "Bea", "bea@example.com")], 3)?;
    replicate(&mut a, &mut b)?;
    capture_at(&mut b, vec![customer("9", "Bea", "bea@example.com")], 4)?;
    capture_at(&mut b, vec![customer("10", "Bea B.", "BEA@example.com")], 5)?;
    let bea = DocId::natural("customers", "bea@example.com");
    assert_eq!(b.store().linked_key("crm", bea)?.as_deref(), Some("9"));
    let reported = b.reader().ambiguous()?;
    assert!(
        reported.iter().any(|r| r.key == "10" && r.others == ["9"]),
        "{reported:?}"
    );
    Ok(())
}

#[test]
fn an_edit_of_the_key_field_after_linking_does_not_fork_the_record() -> TestResult {
    let dir = tempfile::tempdir()?;
    let mut a = natural_engine(dir.path(), "a.crm", MatchWins::Others)?;
    capture_at(&mut a, vec![customer("1", "Ada", "ada@example.com")], 1)?;
    capture_at(&mut a, vec![customer("1", "Ada", "ada@lovelace.org")], 2)?;
    let state = a.store().doc(ada())?.read()?;
    assert_eq!(
        state.fields["email"],
        Value::Text("ada@lovelace.org".to_owned())
    );
    assert_eq!(a.reader().log_head("customers")?, 2);
    assert!(
        !a.store()
            .has_doc(DocId::natural("customers", "ada@lovelace.org"))?
    );
    // A new record with the old e-mail is a new record, not the renamed one.
    capture_at(&mut a, vec![customer("2", "Other", "ada@example.com")], 3)?;
    assert_eq!(a.store().linked_key("crm", ada())?.as_deref(), Some("1"));
    assert_eq!(a.reader().shadows("crm", "customers")?.len(), 2);
    assert!(a.reader().ambiguous()?.is_empty());
    Ok(())
}

/// An engine whose tool holds only active customers, and leaves the others as
/// `exit` says.
fn filtered_engine(
    dir: &std::path::Path,
    exit: &str,
) -> Result<Engine, Box<dyn std::error::Error>> {
    let text = format!(
        "data_dir = \"d\"\nkey_file = \"k\"\nlisten = \"127.0.0.1:1\"\n\n[[tool]]\nname = \"crm\"\n\
         kind = \"sqlite\"\npath = \"a.db\"\n\n[[tool.collection]]\nname = \"customers\"\n\
         table = \"customers\"\nprimary_key = \"id\"\ncolumns = [\"name\", \"status\"]\n\
         filter = 'status == \"active\"'\non_filter_exit = \"{exit}\"\n"
    );
    let config = crate::config::Config::parse(std::path::Path::new("a.toml"), text)?;
    let mapping = crate::mapping::collection_mapping(&config, 0, 0, None)?;
    let collections = BTreeMap::from([(
        "customers".to_owned(),
        CollectionInfo {
            mapping,
            identity: RecordIdentity::ToolIds,
            natural_key: None,
        },
    )]);
    Ok(Engine::new(Store::open(dir)?, vec![tool(collections)], [])?)
}

/// A remote edit of the record with minted id `id`, made by store `actor`.
fn remote_status(
    actor: u8,
    id: DocId,
    base: &[Vec<u8>],
    status: &str,
) -> Result<WireEntry, Box<dyn std::error::Error>> {
    let mut doc = RecordDoc::new(&[actor; 16]);
    doc.apply(base)?;
    let mut edit = Edit::default();
    edit.fields
        .insert("name".to_owned(), Value::Text("Ada".to_owned()));
    edit.fields
        .insert("status".to_owned(), Value::Text(status.to_owned()));
    let change = doc.edit("customers", "", &edit)?.ok_or("a change")?;
    Ok(WireEntry {
        seq: 1,
        doc: id.0,
        changes: vec![change],
    })
}

/// Runs one plan of the engine's tool, every op written (inserts get key "1").
fn write_all(engine: &mut Engine) -> Result<Vec<WriteOp>, Box<dyn std::error::Error>> {
    let mut batch = engine.store().batch();
    let plan = engine.plan_writes(&mut batch, 0, 10, 0)?;
    let ops: Vec<WriteOp> = plan.writes.iter().map(|w| w.op.clone()).collect();
    let outcomes = ops
        .iter()
        .map(|op| match op {
            WriteOp::Insert { .. } => OpOutcome::Written {
                key: Some("1".to_owned()),
                version: None,
            },
            _ => OpOutcome::WRITTEN,
        })
        .collect();
    engine.writes_done(&mut batch, plan, outcomes, 0)?;
    engine.store().commit(batch)?;
    Ok(ops)
}

#[test]
fn a_record_leaving_the_filter_is_removed_from_that_tool_or_kept_as_configured() -> TestResult {
    for exit in ["remove", "keep"] {
        let dir = tempfile::tempdir()?;
        let mut a = filtered_engine(dir.path(), exit)?;
        let id = DocId([7; 16]);
        let first = remote_status(9, id, &[], "active")?;
        let mut changes = first.changes.clone();
        let mut batch = a.store().batch();
        a.apply_remote(&mut batch, [9; 16], "customers", Some(1), vec![first])?;
        a.store().commit(batch)?;
        let ops = write_all(&mut a)?;
        assert!(matches!(ops[..], [WriteOp::Insert { .. }]), "{ops:?}");

        let inactive = WireEntry {
            seq: 2,
            ..remote_status(9, id, &changes, "inactive")?
        };
        changes.extend(inactive.changes.clone());
        let mut batch = a.store().batch();
        a.apply_remote(&mut batch, [9; 16], "customers", Some(2), vec![inactive])?;
        a.store().commit(batch)?;
        let ops = write_all(&mut a)?;
        match exit {
            "remove" => {
                assert!(
                    matches!(&ops[..], [WriteOp::Delete { key, .. }] if key == "1"),
                    "{ops:?}"
                );
                assert_eq!(
                    a.store().linked_key("sqlite", id)?,
                    None,
                    "no longer linked"
                );
            }
            _ => assert!(ops.is_empty(), "kept, and no longer written: {ops:?}"),
        }
        // The record was deleted nowhere: its document is alive.
        assert!(!a.store().doc(id)?.read()?.deleted);

        let active = WireEntry {
            seq: 3,
            ..remote_status(9, id, &changes, "active")?
        };
        let mut batch = a.store().batch();
        a.apply_remote(&mut batch, [9; 16], "customers", Some(3), vec![active])?;
        a.store().commit(batch)?;
        let ops = write_all(&mut a)?;
        match exit {
            "remove" => assert!(
                matches!(ops[..], [WriteOp::Insert { .. }]),
                "comes back: {ops:?}"
            ),
            // The kept row still holds what it held: nothing to write.
            _ => assert!(ops.is_empty(), "{ops:?}"),
        }
    }
    Ok(())
}

fn attendees(entries: &[(&str, &str)]) -> Value {
    Value::Map(
        entries
            .iter()
            .map(|(k, v)| ((*k).to_owned(), Value::Text((*v).to_owned())))
            .collect(),
    )
}

/// Regression (nested maps on capture): a tool's map field (a calendar event's
/// attendees) was written into the document whole, so an entry a peer had just
/// added, not yet written back into the tool, was removed by the tool's next edit
/// of another entry.
#[test]
fn a_captured_map_keeps_entries_the_tool_has_not_seen_yet() -> TestResult {
    let dir = tempfile::tempdir()?;
    let collections = BTreeMap::from([(
        "customers".to_owned(),
        CollectionInfo {
            mapping: Mapping::plain(&["name".to_owned()]),
            natural_key: None,
            identity: RecordIdentity::SharedKey,
        },
    )]);
    let mut a = Engine::new(Store::open(dir.path())?, vec![tool(collections)], [])?;
    let row = |map: Value| CapturedChange {
        collection: "customers".to_owned(),
        key: "1".to_owned(),
        previous_key: None,
        state: RowState::Present(Record::from([("name".to_owned(), map)])),
    };
    let mut batch = a.store().batch();
    let before = attendees(&[("ada", "tentative")]);
    capture(&mut a, &mut batch, vec![row(before.clone())], 1)?;
    a.store().commit(batch)?;
    let base: Vec<Vec<u8>> = a
        .store()
        .reader()
        .log_from("customers", 1, 10)?
        .into_iter()
        .flat_map(|(_, e)| e.changes)
        .collect();

    // A peer adds Grace; before it reaches the tool, the tool's user accepts for Ada.
    let mut doc = RecordDoc::new(&[9; 16]);
    doc.apply(&base)?;
    let mut edit = Edit::default();
    edit.fields.insert(
        "name".to_owned(),
        attendees(&[("ada", "tentative"), ("grace", "needs-action")]),
    );
    let change = doc.edit("customers", "1", &edit)?.ok_or("a change")?;
    let mut batch = a.store().batch();
    let entry = WireEntry {
        seq: 1,
        doc: DocId::of("customers", "1").0,
        changes: vec![change],
    };
    a.apply_remote(&mut batch, [9; 16], "customers", Some(1), vec![entry])?;
    a.store().commit(batch)?;
    let mut batch = a.store().batch();
    capture(
        &mut a,
        &mut batch,
        vec![row(attendees(&[("ada", "accepted")]))],
        2,
    )?;
    a.store().commit(batch)?;
    assert_eq!(
        name_of(&mut a, "1")?,
        Some(attendees(&[("ada", "accepted"), ("grace", "needs-action")])),
        "the peer's new entry was removed by the tool's edit of another"
    );

    // An entry the tool removes is removed.
    let mut batch = a.store().batch();
    capture(&mut a, &mut batch, vec![row(attendees(&[]))], 3)?;
    a.store().commit(batch)?;
    assert_eq!(
        name_of(&mut a, "1")?,
        Some(attendees(&[("grace", "needs-action")]))
    );
    Ok(())
}

/// Log entries older than the newest `log_raw_keep` keep only their document, and a
/// peer reading them from the start gets every record as it is now.
#[test]
fn old_log_entries_are_read_as_their_documents_changes() -> TestResult {
    let (dir_a, dir_b) = (tempfile::tempdir()?, tempfile::tempdir()?);
    let (mut a, mut b) = (engine(dir_a.path())?, engine(dir_b.path())?);
    a.store().set_log_raw_keep(2);
    let edits = [
        ("1", "Ada"),
        ("2", "Grace"),
        ("1", "Ada L."),
        ("3", "Edsger"),
        ("2", "Grace H."),
    ];
    for (seq, (key, name)) in (1..).zip(edits) {
        let mut batch = a.store().batch();
        capture(&mut a, &mut batch, vec![captured(key, name)], seq)?;
        a.store().commit(batch)?;
    }
    let log = a.reader().log_from("customers", 1, 10)?;
    let seqs: Vec<u64> = log.iter().map(|(seq, _)| *seq).collect();
    let raw: Vec<usize> = log.iter().map(|(_, e)| e.changes.len()).collect();
    // Entries 1–3 were trimmed and are read from their documents, which hold two
    // changes each by then; entries 4 and 5 keep the bytes they were logged with.
    // Entry 3 is record 1's again: trimmed, it stands for entry 1, which is gone.
    assert_eq!(seqs, vec![2, 3, 4, 5]);
    assert_eq!(raw, vec![2, 2, 1, 1]);
    replicate(&mut a, &mut b)?;
    for (key, name) in [("1", "Ada L."), ("2", "Grace H."), ("3", "Edsger")] {
        let state = b.store().doc(DocId::of("customers", key))?.read()?;
        assert_eq!(
            state.fields["name"],
            Value::Text(name.to_owned()),
            "record {key}"
        );
    }
    Ok(())
}

/// The seqs of `engine`'s log entries of record `key`, oldest first.
fn entries_of(engine: &mut Engine, key: &str) -> Result<Vec<u64>, Box<dyn std::error::Error>> {
    let doc = DocId::of("customers", key).0;
    Ok(engine
        .reader()
        .log_from("customers", 1, 10_000)?
        .into_iter()
        .filter(|(_, entry)| entry.doc == doc)
        .map(|(seq, _)| seq)
        .collect())
}

/// Regression (the log grew by an entry per update, forever): a record updated
/// 30 times kept 30 entries of ~11 bytes each on disk, more than its document. Now
/// an entry read as its document stands for the entries before it, which go, also
/// when the updates span a restart; a peer reading from the start gets the record
/// as it is.
#[test]
fn a_record_updated_many_times_keeps_one_log_entry_beyond_the_newest() -> TestResult {
    let (dir_a, dir_b) = (tempfile::tempdir()?, tempfile::tempdir()?);
    let names: Vec<String> = (1..=30).map(|i| format!("Ada {i}")).collect();
    {
        let mut a = engine(dir_a.path())?;
        a.store().set_log_raw_keep(3);
        let mut batch = a.store().batch();
        capture(&mut a, &mut batch, vec![captured("2", "Grace")], 1)?;
        a.store().commit(batch)?;
        for (seq, name) in (2..).zip(&names[..15]) {
            let mut batch = a.store().batch();
            capture(&mut a, &mut batch, vec![captured("1", name)], seq)?;
            a.store().commit(batch)?;
        }
    }
    let mut a = engine(dir_a.path())?;
    a.store().set_log_raw_keep(3);
    for (seq, name) in (17..).zip(&names[15..]) {
        let mut batch = a.store().batch();
        capture(&mut a, &mut batch, vec![captured("1", name)], seq)?;
        a.store().commit(batch)?;
    }
    // Seqs 2–31 are Ada's. The newest three keep their bytes; 28 is read as her
    // document and stands for 2–27.
    assert_eq!(entries_of(&mut a, "1")?, vec![28, 29, 30, 31]);
    assert_eq!(entries_of(&mut a, "2")?, vec![1]);
    let mut b = engine(dir_b.path())?;
    replicate(&mut a, &mut b)?;
    assert_eq!(name_of(&mut b, "1")?, Some(Value::Text("Ada 30".into())));
    assert_eq!(name_of(&mut b, "2")?, Some(Value::Text("Grace".into())));
    Ok(())
}

/// An entry learned from a peer is not sent back to it, so a later entry of the
/// agent's own stands for it; but a later entry learned from a peer does not stand
/// for one of the agent's own: that peer is never sent the later entry, and an
/// entry of its own is all that carries the agent's change to it. A record edited
/// on both sides in turn still keeps one entry: the agent's next own entry stands
/// for both.
#[test]
fn an_entry_learned_from_a_peer_stands_only_for_entries_from_the_same_peer() -> TestResult {
    let (dir_a, dir_b) = (tempfile::tempdir()?, tempfile::tempdir()?);
    let (mut a, mut b) = (engine(dir_a.path())?, engine(dir_b.path())?);
    a.store().set_log_raw_keep(2);
    // B creates her (A logs 1, from B); A renames her (2, its own); B hears of it
    // and renames her again (3, from B).
    let mut batch = b.store().batch();
    capture(&mut b, &mut batch, vec![captured("1", "Ada")], 1)?;
    b.store().commit(batch)?;
    replicate(&mut b, &mut a)?;
    let mut batch = a.store().batch();
    capture(&mut a, &mut batch, vec![captured("1", "Ada L.")], 1)?;
    a.store().commit(batch)?;
    replicate_from(&mut a, &mut b, 2)?;
    let mut batch = b.store().batch();
    capture(&mut b, &mut batch, vec![captured("1", "Ada K.")], 2)?;
    b.store().commit(batch)?;
    replicate_from(&mut b, &mut a, 3)?;
    assert_eq!(name_of(&mut a, "1")?, Some(Value::Text("Ada K.".into())));
    // Two more records push all three out of the newest two.
    for (seq, (key, name)) in (2..).zip([("2", "Grace"), ("3", "Edsger")]) {
        let mut batch = a.store().batch();
        capture(&mut a, &mut batch, vec![captured(key, name)], seq)?;
        a.store().commit(batch)?;
    }
    assert_eq!(entries_of(&mut a, "1")?, vec![2, 3]);
    // A session to B sends entry 2, read as her document, and not entry 3.
    let to_b: Vec<u64> = a
        .reader()
        .log_from("customers", 1, 10)?
        .into_iter()
        .filter(|(_, entry)| entry.origin != Some(b.store_id()) && !entry.changes.is_empty())
        .map(|(seq, _)| seq)
        .collect();
    assert_eq!(to_b, vec![2, 4, 5]);
    // A renames her once more (6, its own): that entry reaches every peer, so once
    // two more records push it out of the newest two, it stands for both before it.
    let mut batch = a.store().batch();
    capture(&mut a, &mut batch, vec![captured("1", "Ada B.")], 4)?;
    a.store().commit(batch)?;
    for (seq, (key, name)) in (5..).zip([("4", "Barbara"), ("5", "Frances")]) {
        let mut batch = a.store().batch();
        capture(&mut a, &mut batch, vec![captured(key, name)], seq)?;
        a.store().commit(batch)?;
    }
    assert_eq!(entries_of(&mut a, "1")?, vec![6]);
    replicate_from(&mut a, &mut b, 4)?;
    assert_eq!(name_of(&mut b, "1")?, Some(Value::Text("Ada B.".into())));
    Ok(())
}

/// Change bytes are kept for the newest entries only, and never for a document's
/// first entry (the document is stored as just those), also across a restart.
#[test]
fn change_bytes_are_kept_for_the_newest_entries_but_first_ones() -> TestResult {
    let dir = tempfile::tempdir()?;
    let edits = [
        ("1", "Ada"),
        ("1", "Ada L."),
        ("2", "Grace"),
        ("2", "Grace H."),
        ("1", "Ada Lovelace"),
    ];
    {
        let mut a = engine(dir.path())?;
        a.store().set_log_raw_keep(3);
        for (seq, (key, name)) in (1..).zip(&edits[..4]) {
            let mut batch = a.store().batch();
            capture(&mut a, &mut batch, vec![captured(key, name)], seq)?;
            a.store().commit(batch)?;
        }
        // Entries 1 and 3 are first entries; 2 and 4 keep their bytes.
        assert_eq!(a.store().kept_raw_seqs("customers")?, vec![2, 4]);
    }
    let mut a = engine(dir.path())?;
    a.store().set_log_raw_keep(3);
    let mut batch = a.store().batch();
    capture(
        &mut a,
        &mut batch,
        vec![captured(edits[4].0, edits[4].1)],
        5,
    )?;
    a.store().commit(batch)?;
    // Entry 5 pushed entry 2 out of the newest three, after the restart too.
    assert_eq!(a.store().kept_raw_seqs("customers")?, vec![4, 5]);
    Ok(())
}

/// Regression (one decision per agent): every agent that saw a conflict wrote a
/// decision of its own, so one conflict seen by N agents made N changes, each of
/// which all N agents then applied.
#[test]
fn agents_that_settle_the_same_conflict_write_one_decision_between_them() -> TestResult {
    let dirs = [
        tempfile::tempdir()?,
        tempfile::tempdir()?,
        tempfile::tempdir()?,
    ];
    let (mut a, mut b, mut c) = (
        engine(dirs[0].path())?,
        engine(dirs[1].path())?,
        engine(dirs[2].path())?,
    );
    let mut batch = a.store().batch();
    capture(&mut a, &mut batch, vec![captured("1", "Ada")], 1)?;
    a.store().commit(batch)?;
    replicate(&mut a, &mut b)?;
    replicate(&mut a, &mut c)?;
    // A and B rename her concurrently, then each learns the other's name.
    let mut batch = a.store().batch();
    capture(&mut a, &mut batch, vec![captured("1", "Ada L.")], 2)?;
    a.store().commit(batch)?;
    let mut batch = b.store().batch();
    capture(&mut b, &mut batch, vec![captured("1", "Ada K.")], 1)?;
    b.store().commit(batch)?;
    // Each reads the other's log past the creation, as a session past its cursor.
    replicate_from(&mut a, &mut b, 2)?;
    replicate_from(&mut b, &mut a, 2)?;
    assert_eq!((a.stats().decided, b.stats().decided), (1, 1));
    let id = DocId::of("customers", "1");
    assert_eq!(a.store().doc(id)?.heads(), b.store().doc(id)?.heads());
    // C hears of it from both, past the creation it has (a read from the creation
    // would send the document whole). It decides too, on applying the second name,
    // before the others' decision arrives: the very same change. The record holds
    // the creation, two names and one decision.
    replicate_from(&mut a, &mut c, 2)?;
    replicate_from(&mut b, &mut c, 2)?;
    assert_eq!(c.stats().decided, 1);
    let doc = c.store().doc(id)?;
    assert_eq!(doc.automerge().get_changes(&[]).len(), 4);
    assert!(doc.contested()?.is_empty());
    assert_eq!(name_of(&mut c, "1")?, name_of(&mut a, "1")?);
    Ok(())
}

/// Regression (trimmed entries of one document from different peers): a log read
/// expanded a trimmed document at its first entry and left its later entries empty,
/// even when that first entry came from the very peer being sent to, which never
/// gets its own entries back: the later entries' changes, made here, never went out.
#[test]
fn a_trimmed_document_first_learned_from_a_peer_still_reaches_that_peer() -> TestResult {
    let (dir_a, dir_b) = (tempfile::tempdir()?, tempfile::tempdir()?);
    let (mut a, mut b) = (engine(dir_a.path())?, engine(dir_b.path())?);
    let mut batch = b.store().batch();
    capture(&mut b, &mut batch, vec![captured("1", "Ada")], 1)?;
    b.store().commit(batch)?;
    replicate(&mut b, &mut a)?;
    // A renames her, then captures other records, so both entries of record 1 lose
    // their bytes.
    a.store().set_log_raw_keep(1);
    for (seq, (key, name)) in (1..).zip([("1", "Ada L."), ("2", "Grace"), ("3", "Edsger")]) {
        let mut batch = a.store().batch();
        capture(&mut a, &mut batch, vec![captured(key, name)], seq)?;
        a.store().commit(batch)?;
    }
    // What a session to B sends: everything but the entries B itself sent.
    let log = a.reader().log_from("customers", 1, 10)?;
    let upto = log.last().map(|(seq, _)| *seq);
    let entries = log
        .into_iter()
        .filter(|(_, entry)| entry.origin != Some(b.store_id()) && !entry.changes.is_empty())
        .map(|(seq, entry)| WireEntry {
            seq,
            doc: entry.doc,
            changes: entry.changes,
        })
        .collect();
    let mut batch = b.store().batch();
    b.apply_remote(&mut batch, a.store_id(), "customers", upto, entries)?;
    b.store().commit(batch)?;
    assert_eq!(name_of(&mut b, "1")?, Some(Value::Text("Ada L.".into())));
    Ok(())
}

/// A record updated many times is stored as its first change with every update
/// appended; a tick that finds the agent idle saves it again as one document,
/// smaller, which reads the same, syncs whole to a new peer, and takes further
/// changes. A record of one change is left as it is.
#[test]
fn an_idle_tick_saves_a_document_of_many_changes_again_as_one() -> TestResult {
    use crate::core::{Core, CoreRequest};
    let (dir_a, dir_b) = (tempfile::tempdir()?, tempfile::tempdir()?);
    let (ada, grace) = (DocId::of("customers", "1"), DocId::of("customers", "2"));
    let before = {
        let mut a = engine(dir_a.path())?;
        let mut changes = vec![captured("2", "Grace")];
        for seq in 1..=20 {
            changes.push(captured("1", &format!("Ada {seq}")));
            let mut batch = a.store().batch();
            capture(&mut a, &mut batch, std::mem::take(&mut changes), seq)?;
            a.store().commit(batch)?;
        }
        (
            a.store().stored_doc(ada)?.ok_or("Ada stored")?,
            a.store().stored_doc(grace)?.ok_or("Grace stored")?,
        )
    };
    assert_eq!(RecordDoc::stored_chunks(&before.0), 20);
    // Opened again, nothing is cached: the tick compacts what is on disk.
    let mut core = Core::new(engine(dir_a.path())?);
    let heads = core.engine().store().committed_digest("customers", ada)?;
    let now = 1_000_000;
    core.step(vec![CoreRequest::Tick], now)?;
    assert_eq!(core.engine().stats().docs_compacted, 1);
    let after = core.engine().store().stored_doc(ada)?.ok_or("Ada stored")?;
    assert_eq!(RecordDoc::stored_chunks(&after), 1);
    assert!(
        after.len() * 2 < before.0.len(),
        "{} bytes saved, {} appended",
        after.len(),
        before.0.len()
    );
    assert_eq!(core.engine().store().stored_doc(grace)?, Some(before.1));
    assert_eq!(
        core.engine().store().committed_digest("customers", ada)?,
        heads
    );
    assert_eq!(
        name_of(core.engine(), "1")?,
        Some(Value::Text("Ada 20".into()))
    );

    // A new peer reads the log from its start: the first entry expands to the saved
    // document, the rest to their own changes.
    let mut b = engine(dir_b.path())?;
    replicate(core.engine(), &mut b)?;
    assert_eq!(name_of(&mut b, "1")?, Some(Value::Text("Ada 20".into())));
    assert_eq!(b.store().committed_digest("customers", ada)?, heads);

    // The saved document takes the next change, which reaches the peer.
    let mut batch = core.engine().store().batch();
    capture(core.engine(), &mut batch, vec![captured("1", "Ada 21")], 21)?;
    core.engine().store().commit(batch)?;
    replicate_from(core.engine(), &mut b, 21)?;
    assert_eq!(name_of(&mut b, "1")?, Some(Value::Text("Ada 21".into())));
    Ok(())
}

/// The idle compaction walks the documents again only after one changed, and
/// leaves a document that does not load as it is (reading it quarantines it), with
/// the core going on.
#[test]
fn idle_compaction_waits_for_a_change_and_passes_over_a_damaged_document() -> TestResult {
    use crate::core::{Core, CoreRequest, DOC_COMPACT_PASS_PAUSE_MS};
    let dir = tempfile::tempdir()?;
    let (ada, grace) = (DocId::of("customers", "1"), DocId::of("customers", "2"));
    let appended = {
        let mut a = engine(dir.path())?;
        for seq in 1..=10 {
            let mut batch = a.store().batch();
            capture(
                &mut a,
                &mut batch,
                vec![captured("1", &format!("Ada {seq}"))],
                seq,
            )?;
            a.store().commit(batch)?;
        }
        a.store().stored_doc(ada)?.ok_or("Ada stored")?
    };
    let mut core = Core::new(engine(dir.path())?);
    let now = 1_000_000;
    core.step(vec![CoreRequest::Tick], now)?;
    assert_eq!(core.engine().stats().docs_compacted, 1);

    // Grace's document, many chunks, one of them damaged, and a copy of Ada's
    // under a third id, both put where no change was logged.
    let mut damaged = appended.clone();
    let middle = damaged.len() / 2;
    damaged[middle] ^= 0xff;
    core.engine().store().put_stored_doc(grace, &damaged)?;
    let copy = DocId::of("customers", "copy");
    core.engine().store().put_stored_doc(copy, &appended)?;
    let chunks = |core: &mut Core, id| -> Result<usize, Box<dyn std::error::Error>> {
        let stored = core.engine().store().stored_doc(id)?.ok_or("stored")?;
        Ok(RecordDoc::stored_chunks(&stored))
    };
    // No document changed since the last pass: the pause alone starts none.
    core.step(vec![CoreRequest::Tick], now + DOC_COMPACT_PASS_PAUSE_MS)?;
    assert_eq!(chunks(&mut core, copy)?, 10);
    let mut mark = 10u64;
    let mut capture_one = |core: &mut Core, at| -> TestResult {
        mark += 1;
        let (reply, _answer) = tokio::sync::oneshot::channel();
        let batch = CaptureBatch {
            changes: vec![captured(&mark.to_string(), "Hedy")],
            cursor: Cursor(mark.to_be_bytes().to_vec()),
            rescan: false,
        };
        core.step(
            vec![CoreRequest::Capture {
                tool: 0,
                batch,
                mark,
                reply,
            }],
            at,
        )?;
        Ok(())
    };
    capture_one(&mut core, now + DOC_COMPACT_PASS_PAUSE_MS)?;
    let second = now + DOC_COMPACT_PASS_PAUSE_MS + 1;
    core.step(vec![CoreRequest::Tick], second)?;
    assert_eq!(core.engine().stats().docs_compacted, 2);
    assert_eq!(chunks(&mut core, copy)?, 1);
    assert_eq!(core.engine().store().stored_doc(grace)?, Some(damaged));

    // A change right after a pass waits for the pause.
    core.engine().store().put_stored_doc(copy, &appended)?;
    capture_one(&mut core, second)?;
    core.step(vec![CoreRequest::Tick], second + 1)?;
    assert_eq!(chunks(&mut core, copy)?, 10);
    core.step(vec![CoreRequest::Tick], second + DOC_COMPACT_PASS_PAUSE_MS)?;
    assert_eq!(chunks(&mut core, copy)?, 1);
    Ok(())
}
