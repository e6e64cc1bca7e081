//! Behaviour of record documents: identity, merging, conflicts, typed values.

use std::collections::BTreeMap;

use crdt_model::{Decimal, DocId, Edit, ModelError, Record, RecordDoc, Timestamp, Value};

fn fields(pairs: &[(&str, Value)]) -> Record {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), v.clone()))
        .collect()
}

fn edit(pairs: &[(&str, Value)]) -> Edit {
    Edit {
        fields: fields(pairs),
        ..Edit::default()
    }
}

fn text(s: &str) -> Value {
    Value::Text(s.to_owned())
}

/// Exchanges all changes between two documents.
fn sync(a: &mut RecordDoc, b: &mut RecordDoc) -> Result<(), ModelError> {
    let a_changes: Vec<Vec<u8>> = a
        .automerge()
        .get_changes(&[])
        .into_iter()
        .map(|c| c.raw_bytes().to_vec())
        .collect();
    let b_changes: Vec<Vec<u8>> = b
        .automerge()
        .get_changes(&[])
        .into_iter()
        .map(|c| c.raw_bytes().to_vec())
        .collect();
    a.apply(&b_changes)?;
    b.apply(&a_changes)?;
    Ok(())
}

#[test]
fn doc_id_is_deterministic_and_separates_collections() {
    assert_eq!(DocId::of("customers", "42"), DocId::of("customers", "42"));
    assert_ne!(DocId::of("customers", "42"), DocId::of("customers", "43"));
    assert_ne!(DocId::of("customers", "42"), DocId::of("orders", "42"));
    // The length prefix keeps ("ab", "c") and ("a", "bc") apart.
    assert_ne!(DocId::of("ab", "c"), DocId::of("a", "bc"));
}

#[test]
fn unchanged_edit_makes_no_change() -> Result<(), ModelError> {
    let mut doc = RecordDoc::new(&[1; 16]);
    let e = edit(&[("name", text("Ada")), ("age", Value::Int(36))]);
    assert!(doc.edit("customers", "1", &e)?.is_some());
    assert!(doc.edit("customers", "1", &e)?.is_none());
    let state = doc.read()?;
    assert_eq!(state.collection, "customers");
    assert_eq!(state.key, "1");
    assert_eq!(state.fields, e.fields);
    Ok(())
}

#[test]
fn concurrent_creation_of_one_key_merges_into_one_record() -> Result<(), ModelError> {
    let mut a = RecordDoc::new(&[1; 16]);
    let mut b = RecordDoc::new(&[2; 16]);
    a.edit(
        "customers",
        "ada@example.com",
        &edit(&[("name", text("Ada")), ("city", text("London"))]),
    )?;
    b.edit(
        "customers",
        "ada@example.com",
        &edit(&[("name", text("Ada")), ("phone", text("555"))]),
    )?;
    sync(&mut a, &mut b)?;
    let (sa, sb) = (a.read()?, b.read()?);
    assert_eq!(sa, sb);
    assert_eq!(sa.fields.len(), 3);
    assert!(
        sa.conflicts.is_empty(),
        "equal values are no conflict: {:?}",
        sa.conflicts
    );
    Ok(())
}

#[test]
fn concurrent_edits_of_different_fields_merge_and_of_one_field_conflict() -> Result<(), ModelError>
{
    let mut a = RecordDoc::new(&[1; 16]);
    a.edit(
        "customers",
        "1",
        &edit(&[("name", text("Ada")), ("city", text("London"))]),
    )?;
    let mut b = RecordDoc::new(&[2; 16]);
    sync(&mut a, &mut b)?;
    a.edit("customers", "1", &edit(&[("name", text("Ada Lovelace"))]))?;
    b.edit(
        "customers",
        "1",
        &edit(&[("city", text("Paris")), ("name", text("A. Lovelace"))]),
    )?;
    sync(&mut a, &mut b)?;
    let (sa, sb) = (a.read()?, b.read()?);
    assert_eq!(sa, sb);
    assert_eq!(sa.fields["city"], text("Paris"));
    let values = &sa.conflicts["name"];
    assert_eq!(values.len(), 2);
    assert_eq!(values[0], sa.fields["name"], "the winner comes first");
    assert!(values.contains(&text("Ada Lovelace")) && values.contains(&text("A. Lovelace")));
    Ok(())
}

#[test]
fn typed_values_round_trip() -> Result<(), ModelError> {
    let decimal = Decimal::parse("12345678901234567890.123456789")
        .map_err(|_| ModelError::UnknownValue { field: "d".into() })?;
    let attendees = Value::List(vec![
        Value::Map(BTreeMap::from([
            ("email".to_owned(), text("a@x")),
            ("rsvp".to_owned(), Value::Bool(true)),
        ])),
        Value::Map(BTreeMap::from([
            ("email".to_owned(), text("b@x")),
            ("rsvp".to_owned(), Value::Null),
        ])),
    ]);
    let e = edit(&[
        ("null", Value::Null),
        ("flag", Value::Bool(true)),
        ("count", Value::Int(-7)),
        ("ratio", Value::Float(0.25)),
        ("amount", Value::Decimal(decimal)),
        ("note", text("héllo")),
        (
            "at",
            Value::Timestamp(Timestamp::from_micros(1_700_000_000_123_456)),
        ),
        ("attendees", attendees),
    ]);
    let mut a = RecordDoc::new(&[1; 16]);
    a.edit("events", "e1", &e)?;
    let mut b = RecordDoc::load(&a.save(), &[2; 16])?;
    assert_eq!(b.read()?.fields, e.fields);
    assert!(
        b.edit("events", "e1", &e)?.is_none(),
        "an equal nested value is no change"
    );
    Ok(())
}

#[test]
fn concurrent_edits_inside_a_nested_list_merge() -> Result<(), ModelError> {
    let person = |email: &str, rsvp: bool| {
        Value::Map(BTreeMap::from([
            ("email".to_owned(), text(email)),
            ("rsvp".to_owned(), Value::Bool(rsvp)),
        ]))
    };
    let mut a = RecordDoc::new(&[1; 16]);
    a.edit(
        "events",
        "e1",
        &edit(&[(
            "attendees",
            Value::List(vec![person("a@x", false), person("b@x", false)]),
        )]),
    )?;
    let mut b = RecordDoc::new(&[2; 16]);
    sync(&mut a, &mut b)?;
    a.edit(
        "events",
        "e1",
        &edit(&[(
            "attendees",
            Value::List(vec![person("a@x", true), person("b@x", false)]),
        )]),
    )?;
    b.edit(
        "events",
        "e1",
        &edit(&[(
            "attendees",
            Value::List(vec![person("a@x", false), person("b@x", true)]),
        )]),
    )?;
    sync(&mut a, &mut b)?;
    assert_eq!(
        a.read()?.fields["attendees"],
        Value::List(vec![person("a@x", true), person("b@x", true)])
    );
    assert_eq!(a.read()?, b.read()?);
    Ok(())
}

#[test]
fn delete_wins_over_a_concurrent_field_edit_and_external_ids_accumulate() -> Result<(), ModelError>
{
    let mut a = RecordDoc::new(&[1; 16]);
    let mut first = edit(&[("name", text("Ada"))]);
    first.external_id = Some(("crm".into(), "17".into()));
    a.edit("customers", "1", &first)?;
    let mut b = RecordDoc::new(&[2; 16]);
    sync(&mut a, &mut b)?;
    a.edit(
        "customers",
        "1",
        &Edit {
            deleted: Some(true),
            ..Edit::default()
        },
    )?;
    let mut second = edit(&[("name", text("Ada L."))]);
    second.external_id = Some(("erp".into(), "C-9".into()));
    b.edit("customers", "1", &second)?;
    sync(&mut a, &mut b)?;
    let state = a.read()?;
    assert!(state.deleted);
    assert_eq!(state.external_ids.len(), 2);
    assert_eq!(state, b.read()?);
    Ok(())
}

#[test]
fn applying_twice_is_harmless_and_reports_only_new_changes() -> Result<(), ModelError> {
    let mut a = RecordDoc::new(&[1; 16]);
    let c1 = a
        .edit("customers", "1", &edit(&[("name", text("Ada"))]))?
        .expect("change");
    let c2 = a
        .edit("customers", "1", &edit(&[("name", text("Ada L."))]))?
        .expect("change");
    let mut b = RecordDoc::new(&[2; 16]);
    assert_eq!(b.apply(std::slice::from_ref(&c1))?.new_changes.len(), 1);
    assert!(b.apply(std::slice::from_ref(&c1))?.new_changes.is_empty());
    let out_of_order = b.apply(std::slice::from_ref(&c2))?;
    assert_eq!(out_of_order.new_changes.len(), 1);
    let mut c = RecordDoc::new(&[3; 16]);
    let waiting = c.apply(&[c2])?;
    assert!(waiting.new_changes.is_empty() && waiting.missing_deps);
    let both = c.apply(&[c1])?;
    assert_eq!(both.new_changes.len(), 2);
    assert!(both.released_earlier, "c2 came in an earlier call");
    assert!(!out_of_order.released_earlier);
    assert!(!both.missing_deps);
    assert_eq!(c.read()?.fields["name"], text("Ada L."));
    Ok(())
}

#[test]
fn garbage_change_bytes_are_an_error() {
    let mut doc = RecordDoc::new(&[1; 16]);
    assert!(doc.apply(&[vec![0xde, 0xad, 0xbe, 0xef]]).is_err());
}

/// A record created again after a delete holds only what the new row holds: the
/// dead record's other fields are gone, on every replica.
#[test]
fn a_reset_edit_removes_the_fields_of_the_dead_record() -> Result<(), ModelError> {
    let mut a = RecordDoc::new(&[1; 16]);
    a.edit(
        "customers",
        "5",
        &edit(&[
            ("name", text("Old Name")),
            ("email", text("old@example.com")),
        ]),
    )?;
    a.edit(
        "customers",
        "5",
        &Edit {
            deleted: Some(true),
            ..Edit::default()
        },
    )?;
    assert!(a.is_deleted()?);
    let mut b = RecordDoc::new(&[2; 16]);
    sync(&mut a, &mut b)?;
    a.edit(
        "customers",
        "5",
        &Edit {
            fields: fields(&[("name", text("New Person"))]),
            deleted: Some(false),
            reset: true,
            ..Edit::default()
        },
    )?;
    sync(&mut a, &mut b)?;
    for doc in [&a, &b] {
        let state = doc.read()?;
        assert!(!state.deleted);
        assert!(!doc.is_deleted()?);
        assert_eq!(state.fields, fields(&[("name", text("New Person"))]));
    }
    Ok(())
}

/// A value Concord cannot read (here a counter) makes `read` fail with the field's
/// name, so the agent can refuse the change that put it there.
#[test]
fn a_value_of_an_unknown_kind_is_an_error_naming_the_field() -> Result<(), ModelError> {
    use automerge::transaction::Transactable;
    let mut doc = RecordDoc::new(&[1; 16]);
    doc.edit("customers", "1", &edit(&[("name", text("Ada"))]))?;
    doc.automerge().put(
        automerge::ROOT,
        "f:visits",
        automerge::ScalarValue::counter(1),
    )?;
    let err = doc.read().expect_err("a counter is not a Concord value");
    assert!(
        err.to_string().contains("f:visits") || err.to_string().contains("visits"),
        "{err}"
    );
    Ok(())
}

/// Document ids are part of the wire and store format: agents of different
/// versions must derive the same id for the same record.
#[test]
fn derived_doc_ids_never_change() {
    assert_eq!(
        DocId::of("customers", "1").to_string(),
        "d218eeda0095c37f01aba3853800b8b0"
    );
    assert_eq!(
        DocId::natural("customers", "ada@example.com").to_string(),
        "013e172d52cd5937b0aed7d49a534b14"
    );
    assert_ne!(
        DocId::natural("customers", "1"),
        DocId::of("customers", "1")
    );
}

/// `field_times` reports the time of the change that wrote each field's value.
#[test]
fn field_times_are_those_of_the_changes_that_wrote_the_values() -> Result<(), ModelError> {
    let mut doc = RecordDoc::new(&[1; 16]);
    let mut first = edit(&[("name", text("Ada")), ("city", text("London"))]);
    first.time_ms = 1_000;
    doc.edit("customers", "1", &first)?;
    let mut second = edit(&[("city", text("Paris"))]);
    second.time_ms = 5_000;
    doc.edit("customers", "1", &second)?;
    let times = doc.field_times()?;
    assert_eq!(times.get("name"), Some(&1_000));
    assert_eq!(times.get("city"), Some(&5_000));
    Ok(())
}

#[test]
fn stored_bytes_give_back_every_change_whether_appended_or_saved() -> Result<(), ModelError> {
    let mut a = RecordDoc::new(&[1; 16]);
    let mut appended = Vec::new();
    let mut changes = Vec::new();
    for (i, name) in ["Ada", "Ada L.", "Ada Lovelace"].iter().enumerate() {
        let change = a
            .edit("customers", "1", &edit(&[("name", text(name))]))?
            .expect("change");
        if i == 1 {
            // The store saves a document whole now and then, and appends after it.
            appended = a.save();
        } else if i == 2 {
            appended.extend_from_slice(&change);
        }
        changes.push(change);
    }
    let cut = RecordDoc::stored_changes(&changes.concat())?;
    assert_eq!(cut, changes, "change chunks are cut out as they are");
    let loaded = RecordDoc::stored_changes(&appended)?;
    assert_eq!(loaded.len(), 3, "a saved document gives its changes too");
    for stored in [cut, loaded] {
        let mut b = RecordDoc::new(&[2; 16]);
        b.apply(&stored)?;
        assert_eq!(b.read()?.fields["name"], text("Ada Lovelace"));
    }
    assert!(RecordDoc::stored_changes(&[0x85, 0x6f, 0x4a]).is_err());
    Ok(())
}

/// A ten-field record as the tools hand it over, every kind of scalar.
fn sample_edit() -> Edit {
    Edit {
        fields: fields(&[
            ("name", text("Ada")),
            (
                "balance",
                Value::Decimal(Decimal::parse("12.50").expect("a decimal")),
            ),
            ("score", Value::Float(0.5)),
            ("visits", Value::Int(3)),
            ("active", Value::Bool(true)),
            (
                "created",
                Value::Timestamp(Timestamp::from_micros(1_700_000_000_000_000)),
            ),
            ("note", Value::Null),
        ]),
        external_id: Some(("crm".into(), "7".into())),
        deleted: Some(false),
        time_ms: 1_000,
        ..Edit::default()
    }
}

/// A document that took `change` through Automerge itself, not held.
fn applied_whole(change: &[u8]) -> Result<RecordDoc, ModelError> {
    let mut doc = RecordDoc::new(&[9; 16]);
    doc.automerge()
        .apply_changes([automerge::Change::from_bytes(change.to_vec())?])?;
    Ok(doc)
}

#[test]
fn a_held_first_change_reads_as_the_document_that_applied_it() -> Result<(), ModelError> {
    let mut author = RecordDoc::new(&[1; 16]);
    let change = author
        .edit("customers", "7", &sample_edit())?
        .expect("a new record makes a change");
    let mut held = RecordDoc::new(&[2; 16]);
    let applied = held.apply(std::slice::from_ref(&change))?;
    assert_eq!(applied.new_changes, vec![change.clone()]);
    let mut whole = applied_whole(&change)?;
    // Stored as its change alone, the record loads held again.
    let mut loaded = RecordDoc::load(&change, &[3; 16])?;
    for doc in [&mut author, &mut held, &mut loaded] {
        assert_eq!(doc.read()?, whole.read()?);
        assert_eq!(doc.identity()?, whole.identity()?);
        assert_eq!(doc.heads(), whole.heads());
        assert_eq!(doc.is_deleted()?, whole.is_deleted()?);
        assert!(!doc.is_empty());
        doc.check_readable()?;
        assert!(doc.contested()?.is_empty());
        assert_eq!(doc.field_times()?, whole.field_times()?);
        assert_eq!(
            RecordDoc::load(&doc.save(), &[3; 16])?.read()?,
            whole.read()?
        );
    }
    // Replayed: nothing new.
    assert!(held.apply(&[change])?.new_changes.is_empty());
    Ok(())
}

#[test]
fn a_held_first_change_takes_later_edits_and_changes_of_peers() -> Result<(), ModelError> {
    let mut a = RecordDoc::new(&[1; 16]);
    let first = a.edit("customers", "7", &sample_edit())?.expect("a change");
    let mut b = RecordDoc::new(&[2; 16]);
    b.apply(&[first])?;
    // Both edit the held record: A's second change follows its first, B's
    // follows A's; each takes the other's.
    let from_a = a.edit("customers", "7", &edit(&[("visits", Value::Int(4))]))?;
    let from_b = b.edit("customers", "7", &edit(&[("name", text("Ada L."))]))?;
    b.apply(&[from_a.expect("a change")])?;
    a.apply(&[from_b.expect("a change")])?;
    let (sa, sb) = (a.read()?, b.read()?);
    assert_eq!(sa, sb);
    assert_eq!(sa.fields["visits"], Value::Int(4));
    assert_eq!(sa.fields["name"], text("Ada L."));
    assert_eq!(a.heads(), b.heads());
    Ok(())
}

#[test]
fn a_first_change_that_is_not_plain_is_applied_whole() -> Result<(), ModelError> {
    // A nested value: the document makes the change through a transaction.
    let nested = Edit {
        fields: fields(&[("tags", Value::List(vec![text("a"), text("b")]))]),
        ..Edit::default()
    };
    let mut a = RecordDoc::new(&[1; 16]);
    let change = a.edit("customers", "1", &nested)?.expect("a change");
    let mut b = RecordDoc::new(&[2; 16]);
    b.apply(&[change])?;
    assert_eq!(b.read()?.fields["tags"], nested.fields["tags"]);
    // A first change that replaces a value it wrote (an op with a predecessor):
    // applied whole, it reads as Automerge reads it.
    let mut c = RecordDoc::new(&[3; 16]);
    let am = c.automerge();
    automerge::transaction::Transactable::put(am, automerge::ROOT, "collection", "customers")?;
    automerge::transaction::Transactable::put(am, automerge::ROOT, "f:name", "x")?;
    automerge::transaction::Transactable::put(am, automerge::ROOT, "f:name", "y")?;
    am.commit();
    let change = am
        .get_last_local_change()
        .expect("a change")
        .raw_bytes()
        .to_vec();
    let mut d = RecordDoc::new(&[4; 16]);
    d.apply(&[change])?;
    assert_eq!(d.read()?.fields["name"], text("y"));
    Ok(())
}

/// A document that took `changes` through Automerge itself, in order, not held.
fn applied_all(changes: &[Vec<u8>]) -> Result<RecordDoc, ModelError> {
    let mut doc = RecordDoc::new(&[9; 16]);
    for change in changes {
        doc.automerge()
            .apply_changes([automerge::Change::from_bytes(change.clone())?])?;
    }
    Ok(doc)
}

/// Asserts that `doc` answers as `whole`, a document that applied the same changes.
fn assert_reads_as(doc: &mut RecordDoc, whole: &mut RecordDoc) -> Result<(), ModelError> {
    assert_eq!(doc.read()?, whole.read()?);
    assert_eq!(doc.identity()?, whole.identity()?);
    assert_eq!(doc.heads(), whole.heads());
    assert_eq!(doc.is_deleted()?, whole.is_deleted()?);
    assert_eq!(doc.is_empty(), whole.is_empty());
    doc.check_readable()?;
    assert_eq!(doc.contested()?.len(), whole.contested()?.len());
    assert_eq!(doc.field_times()?, whole.field_times()?);
    Ok(())
}

#[test]
fn a_held_line_of_edits_reads_as_the_document_that_applied_it() -> Result<(), ModelError> {
    // A creates the record and edits it in turn: a field, an external id, a
    // field back to a value it held, then the tombstone; B edits it once between.
    let mut a = RecordDoc::new(&[1; 16]);
    let mut b = RecordDoc::new(&[2; 16]);
    let mut changes = vec![a.edit("customers", "7", &sample_edit())?.expect("a change")];
    b.apply(&changes[..1])?;
    let steps = [
        edit(&[("visits", Value::Int(4))]),
        Edit {
            external_id: Some(("erp".into(), "E-7".into())),
            ..Edit::default()
        },
        edit(&[("visits", Value::Int(3)), ("name", text("Ada L."))]),
    ];
    for step in &steps {
        let change = a.edit("customers", "7", step)?.expect("a change");
        assert_eq!(
            b.apply(std::slice::from_ref(&change))?.new_changes,
            vec![change.clone()]
        );
        changes.push(change);
    }
    let from_b = b.edit("customers", "7", &edit(&[("city", text("Paris"))]))?;
    changes.push(from_b.expect("a change"));
    a.apply(&changes[changes.len() - 1..])?;
    let deleted = Edit {
        deleted: Some(true),
        ..Edit::default()
    };
    changes.push(a.edit("customers", "7", &deleted)?.expect("a change"));
    b.apply(&changes[changes.len() - 1..])?;
    // Nothing new: an edit of values the record holds makes no change.
    assert!(a.edit("customers", "7", &steps[2])?.is_none());
    let mut whole = applied_all(&changes)?;
    // Stored as its changes one after another, the record loads held again.
    let mut loaded = RecordDoc::load(&changes.concat(), &[3; 16])?;
    assert_eq!(loaded.held_changes(), Some(changes.len()));
    for doc in [&mut a, &mut b, &mut loaded] {
        assert_eq!(doc.held_changes(), Some(changes.len()));
        assert_reads_as(doc, &mut whole)?;
        // Replayed, in a message with every change: nothing new.
        assert!(doc.apply(&changes)?.new_changes.is_empty());
        assert_eq!(
            RecordDoc::load(&doc.save(), &[3; 16])?.read()?,
            whole.read()?
        );
    }
    let state = whole.read()?;
    assert!(state.deleted);
    assert_eq!(state.fields["visits"], Value::Int(3));
    assert_eq!(state.fields["city"], text("Paris"));
    assert_eq!(state.external_ids["erp"], "E-7");
    Ok(())
}

#[test]
fn changes_that_leave_the_held_line_take_automerges_path() -> Result<(), ModelError> {
    let mut a = RecordDoc::new(&[1; 16]);
    let first = a.edit("customers", "7", &sample_edit())?.expect("a change");
    let mut b = RecordDoc::new(&[2; 16]);
    b.apply(std::slice::from_ref(&first))?;
    // Concurrent edits of one field: each side takes the other's, and both read
    // as Automerge reads them, the conflict included.
    let from_a = a.edit("customers", "7", &edit(&[("visits", Value::Int(4))]))?;
    let from_b = b.edit("customers", "7", &edit(&[("visits", Value::Int(5))]))?;
    let (from_a, from_b) = (from_a.expect("a change"), from_b.expect("a change"));
    assert_eq!(
        b.apply(std::slice::from_ref(&from_a))?.new_changes,
        vec![from_a.clone()]
    );
    a.apply(std::slice::from_ref(&from_b))?;
    assert_eq!(a.held_changes(), None);
    let mut whole = applied_all(&[first.clone(), from_a.clone(), from_b.clone()])?;
    for doc in [&mut a, &mut b] {
        assert_reads_as(doc, &mut whole)?;
        assert_eq!(doc.read()?.conflicts["visits"].len(), 2);
    }
    // Stored one after another, the changes do not form a line: loaded whole.
    let stored = [first.clone(), from_a.clone(), from_b.clone()].concat();
    let mut loaded = RecordDoc::load(&stored, &[3; 16])?;
    assert_eq!(loaded.held_changes(), None);
    assert_reads_as(&mut loaded, &mut whole)?;
    // A change ahead of the one it depends on waits for it, then both apply.
    let second = a.edit("customers", "7", &edit(&[("city", text("Oslo"))]))?;
    let third = a.edit("customers", "7", &edit(&[("city", text("Rome"))]))?;
    let (second, third) = (second.expect("a change"), third.expect("a change"));
    let mut c = RecordDoc::new(&[4; 16]);
    c.apply(&[first, from_a, from_b])?;
    assert!(c.apply(std::slice::from_ref(&third))?.missing_deps);
    let applied = c.apply(std::slice::from_ref(&second))?;
    assert!(!applied.missing_deps);
    assert!(applied.released_earlier);
    assert_eq!(c.read()?.fields["city"], text("Rome"));
    Ok(())
}

#[test]
fn a_held_line_waits_for_a_change_it_lacks() -> Result<(), ModelError> {
    let mut a = RecordDoc::new(&[1; 16]);
    let first = a.edit("customers", "7", &sample_edit())?.expect("a change");
    let second = a.edit("customers", "7", &edit(&[("visits", Value::Int(4))]))?;
    let second = second.expect("a change");
    let mut b = RecordDoc::new(&[2; 16]);
    // The second change first: it waits, and the record reads as nothing yet.
    let early = b.apply(std::slice::from_ref(&second))?;
    assert!(early.missing_deps);
    assert!(early.new_changes.is_empty());
    let late = b.apply(std::slice::from_ref(&first))?;
    assert!(!late.missing_deps);
    assert_eq!(late.new_changes.len(), 2);
    let mut whole = applied_all(&[first, second])?;
    assert_reads_as(&mut b, &mut whole)?;
    assert_eq!(b.read()?.fields["visits"], Value::Int(4));
    Ok(())
}

#[test]
fn a_peers_put_that_replaces_no_value_it_saw_is_concurrent() -> Result<(), ModelError> {
    // A change that depends on the held line but puts a key without replacing the
    // value there (no predecessor) leaves two values, as Automerge reads it.
    let mut a = RecordDoc::new(&[1; 16]);
    let first = a.edit("customers", "7", &sample_edit())?.expect("a change");
    let mut odd = applied_all(std::slice::from_ref(&first))?;
    let am = odd.automerge();
    let heads = am.get_heads();
    let next_op = automerge::Change::from_bytes(first.clone())?.max_op() + 1;
    let change = automerge::Change::from(automerge::ExpandedChange {
        operations: vec![automerge::legacy::Op {
            action: automerge::legacy::OpType::Put(automerge::ScalarValue::Int(99)),
            obj: automerge::legacy::ObjectId::Root,
            key: automerge::legacy::Key::Map("f:visits".into()),
            pred: Vec::new().into(),
            insert: false,
        }],
        actor_id: automerge::ActorId::from(&[5u8; 16][..]),
        hash: None,
        seq: 1,
        // The next op, as a change made after the first would start: only the
        // missing predecessor sets it apart.
        start_op: std::num::NonZeroU64::new(next_op).expect("not zero"),
        time: 0,
        message: None,
        deps: heads,
        extra_bytes: Vec::new(),
        author: None,
    });
    let change = change.raw_bytes().to_vec();
    let mut whole = applied_all(&[first.clone(), change.clone()])?;
    let mut b = RecordDoc::new(&[2; 16]);
    b.apply(&[first])?;
    b.apply(&[change])?;
    assert_eq!(b.held_changes(), None);
    assert_reads_as(&mut b, &mut whole)?;
    assert_eq!(b.read()?.conflicts["visits"].len(), 2);
    Ok(())
}

/// A small deterministic generator for the randomized test below.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: usize) -> usize {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 % n as u64) as usize
    }
}

/// A random edit: fields, an external id, the tombstone, now and then a reset or
/// a nested value (which take Automerge's path).
fn random_edit(rng: &mut Rng) -> Edit {
    let names = ["name", "city", "visits"];
    let values = [
        text("a"),
        text("b"),
        Value::Int(1),
        Value::Int(2),
        Value::Null,
    ];
    let mut edit = Edit::default();
    for _ in 0..=rng.below(3) {
        let value = values[rng.below(values.len())].clone();
        edit.fields
            .insert(names[rng.below(names.len())].to_owned(), value);
    }
    match rng.below(12) {
        0 => edit.external_id = Some(("crm".into(), rng.below(3).to_string())),
        1 => edit.deleted = Some(true),
        2 => edit.deleted = Some(false),
        3 => edit.reset = true,
        4 => {
            edit.fields
                .insert("tags".into(), Value::List(vec![text("x")]));
        }
        _ => {}
    }
    edit
}

#[test]
fn held_documents_answer_as_automerge_under_random_edits_and_deliveries() -> Result<(), ModelError>
{
    const REPLICAS: usize = 3;
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let mut held_steps = 0;
    for _ in 0..60 {
        let actor = |r: usize| [r as u8 + 1; 16];
        // Each replica, the same changes applied by Automerge alone, and its stored
        // bytes (changes appended as a store appends them).
        let mut docs: Vec<RecordDoc> = (0..REPLICAS).map(|r| RecordDoc::new(&actor(r))).collect();
        let mut wholes: Vec<RecordDoc> = (0..REPLICAS).map(|_| RecordDoc::new(&[9; 16])).collect();
        let mut stored: Vec<Vec<u8>> = vec![Vec::new(); REPLICAS];
        let mut made: Vec<Vec<u8>> = Vec::new();
        for _ in 0..40 {
            let r = rng.below(REPLICAS);
            match rng.below(5) {
                0 | 1 => {
                    let edit = random_edit(&mut rng);
                    if let Some(change) = docs[r].edit("customers", "7", &edit)? {
                        wholes[r]
                            .automerge()
                            .apply_changes([automerge::Change::from_bytes(change.clone())?])?;
                        stored[r].extend_from_slice(&change);
                        made.push(change);
                    }
                }
                2 | 3 if !made.is_empty() => {
                    let mut given = Vec::new();
                    for _ in 0..=rng.below(3) {
                        let change = made[rng.below(made.len())].clone();
                        if !given.contains(&change) {
                            given.push(change);
                        }
                    }
                    let applied = docs[r].apply(&given)?;
                    for change in &applied.new_changes {
                        stored[r].extend_from_slice(change);
                    }
                    let decoded = given
                        .iter()
                        .map(|c| automerge::Change::from_bytes(c.clone()))
                        .collect::<Result<Vec<_>, _>>()?;
                    wholes[r].automerge().apply_changes(decoded)?;
                }
                _ => {
                    // A restart: both load what was stored (changes still waiting
                    // for a dependency are not stored, and are sent again).
                    docs[r] = RecordDoc::load(&stored[r], &actor(r))?;
                    wholes[r] = RecordDoc::new(&[9; 16]);
                    wholes[r].automerge().load_incremental(&stored[r])?;
                }
            }
            held_steps += usize::from(docs[r].held_changes().is_some());
            let (doc, whole) = (&mut docs[r], &mut wholes[r]);
            assert_eq!(doc.read()?, whole.read()?);
            let (mut heads, mut whole_heads) = (doc.heads(), whole.heads());
            heads.sort();
            whole_heads.sort();
            assert_eq!(heads, whole_heads);
            assert_eq!(doc.identity()?, whole.identity()?);
            assert_eq!(doc.is_deleted()?, whole.is_deleted()?);
        }
    }
    // Both forms were compared many times: documents held, and documents built
    // once changes were concurrent (about a quarter of steps held, with this seed).
    assert!(
        (400..60 * 40 - 400).contains(&held_steps),
        "{held_steps} steps held"
    );
    Ok(())
}

#[test]
fn a_change_after_one_the_held_line_lacks_waits_even_when_its_ops_fit() -> Result<(), ModelError> {
    // A creates; B edits after it; C edits after B. A edits concurrently with B,
    // so A's next op is the one B's took, and C's change starts right after A's
    // line: only its dependency on B's change tells it apart.
    let mut a = RecordDoc::new(&[1; 16]);
    let first = a.edit("customers", "7", &sample_edit())?.expect("a change");
    let (mut b, mut c) = (RecordDoc::new(&[2; 16]), RecordDoc::new(&[3; 16]));
    b.apply(std::slice::from_ref(&first))?;
    let from_b = b.edit("customers", "7", &edit(&[("city", text("Oslo"))]))?;
    let from_b = from_b.expect("a change");
    c.apply(&[first.clone(), from_b.clone()])?;
    let from_c = c.edit("customers", "7", &edit(&[("name", text("Ada L."))]))?;
    let from_c = from_c.expect("a change");
    let from_a = a.edit("customers", "7", &edit(&[("visits", Value::Int(4))]))?;
    let from_a = from_a.expect("a change");
    let applied = a.apply(std::slice::from_ref(&from_c))?;
    assert!(applied.missing_deps, "C's change waits for B's");
    assert_eq!(a.read()?.fields["name"], sample_edit().fields["name"]);
    a.apply(std::slice::from_ref(&from_b))?;
    let mut whole = applied_all(&[first, from_a, from_b, from_c])?;
    assert_reads_as(&mut a, &mut whole)?;
    assert_eq!(a.read()?.fields["name"], text("Ada L."));
    Ok(())
}
