//! Provenance: where each value came from, contested values, decisions, history.

use crdt_model::{Contested, Decision, Edit, ModelError, Provenance, RecordDoc, Value};

fn from(agent: &str, tool: &str) -> Provenance {
    Provenance {
        agent: agent.to_owned(),
        tool: tool.to_owned(),
        decision: None,
    }
}

fn edit(field: &str, value: &str, time_ms: i64, provenance: Provenance) -> Edit {
    let mut edit = Edit {
        time_ms,
        provenance: Some(provenance),
        ..Edit::default()
    };
    edit.fields
        .insert(field.to_owned(), Value::Text(value.to_owned()));
    edit
}

fn changes(doc: &mut RecordDoc) -> Vec<Vec<u8>> {
    doc.automerge()
        .get_changes(&[])
        .into_iter()
        .map(|c| c.raw_bytes().to_vec())
        .collect()
}

/// Two replicas of one record, both holding `name = "Ada"` from agent a.
fn pair() -> Result<(RecordDoc, RecordDoc), ModelError> {
    let mut a = RecordDoc::new(&[1; 16]);
    a.edit("people", "1", &edit("name", "Ada", 1_000, from("a", "crm")))?;
    let mut b = RecordDoc::new(&[2; 16]);
    b.apply(&changes(&mut a))?;
    Ok((a, b))
}

/// [`pair`], then A names her "Ada L." at 2 s and B, concurrently, "Ada K." at 3 s;
/// neither has the other's edit yet.
fn crossing_names() -> Result<(RecordDoc, RecordDoc), ModelError> {
    let (mut a, mut b) = pair()?;
    a.edit(
        "people",
        "1",
        &edit("name", "Ada L.", 2_000, from("a", "crm")),
    )?;
    b.edit(
        "people",
        "1",
        &edit("name", "Ada K.", 3_000, from("b", "erp")),
    )?;
    Ok((a, b))
}

#[test]
fn concurrent_values_are_contested_with_their_provenance_and_time() -> Result<(), ModelError> {
    let (mut a, mut b) = crossing_names()?;
    a.apply(&changes(&mut b))?;
    let contested = a.contested()?;
    assert_eq!(contested.len(), 1);
    let (key, mut candidates) = contested.into_iter().next().expect("one");
    assert_eq!(key, Contested::Field("name".into()));
    candidates.sort_by_key(|c| c.time_ms);
    assert_eq!(candidates[0].value, Value::Text("Ada L.".into()));
    assert_eq!(candidates[0].provenance, from("a", "crm"));
    assert_eq!(candidates[0].time_ms, 2_000);
    assert_eq!(candidates[1].value, Value::Text("Ada K.".into()));
    assert_eq!(candidates[1].provenance, from("b", "erp"));
    assert_eq!(candidates[1].time_ms, 3_000);
    Ok(())
}

#[test]
fn a_decision_settles_a_contest_and_equal_decisions_do_not_contest() -> Result<(), ModelError> {
    let (mut a, mut b) = crossing_names()?;
    let (from_a, from_b) = (changes(&mut a), changes(&mut b));
    a.apply(&from_b)?;
    b.apply(&from_a)?;
    let decided = |by: &str| Provenance {
        decision: Some(Decision {
            policy: "latest_edit".into(),
            by: by.into(),
        }),
        ..from("b", "erp")
    };
    // Both agents decide at once, for the same value: the decisions are concurrent
    // but equal, so nothing is contested any more.
    let winner = Value::Text("Ada K.".into());
    a.decide(
        &Contested::Field("name".into()),
        &winner,
        &decided("a"),
        3_000,
    )?;
    b.decide(
        &Contested::Field("name".into()),
        &winner,
        &decided("b"),
        3_000,
    )?;
    let (from_a, from_b) = (changes(&mut a), changes(&mut b));
    a.apply(&from_b)?;
    b.apply(&from_a)?;
    assert!(a.contested()?.is_empty());
    assert_eq!(a.read()?.fields["name"], winner);
    assert_eq!(a.heads(), b.heads());
    assert_eq!(a.read()?, b.read()?);
    Ok(())
}

/// The decision of a conflict policy: no deciding agent, so every agent writes it alike.
fn shared_decision(policy: &str, chosen: Provenance) -> Provenance {
    Provenance {
        decision: Some(Decision {
            policy: policy.into(),
            by: String::new(),
        }),
        ..chosen
    }
}

#[test]
fn agents_settling_one_conflict_alike_write_one_change_between_them() -> Result<(), ModelError> {
    // Regression: every agent that saw a conflict wrote its own decision, so a
    // conflict seen by N agents made N changes, each applied by all N agents.
    let (mut a, mut b) = crossing_names()?;
    let (from_a, from_b) = (changes(&mut a), changes(&mut b));
    a.apply(&from_b)?;
    b.apply(&from_a)?;
    let winner = Value::Text("Ada K.".into());
    let name = Contested::Field("name".into());
    let by_policy = shared_decision("latest_edit", from("b", "erp"));
    let made_a = a.decide_shared(&name, &winner, &by_policy, 3_000)?;
    let made_b = b.decide_shared(&name, &winner, &by_policy, 3_000)?;
    assert!(made_a.is_some());
    assert_eq!(
        made_a, made_b,
        "the same decision from the same document is one change"
    );
    let applied = a.apply(&changes(&mut b))?;
    assert!(
        applied.new_changes.is_empty(),
        "b's decision is already a's"
    );
    assert_eq!(a.heads(), b.heads());
    assert!(a.contested()?.is_empty());
    assert_eq!(a.read()?.fields["name"], winner);
    // The deciding agents' own edits go on under their own actors.
    a.edit("people", "1", &edit("name", "Ada", 4_000, from("a", "crm")))?;
    let last = a.automerge().get_last_local_change().expect("an edit");
    assert_eq!(last.actor_id().to_bytes(), &[1; 16]);
    Ok(())
}

#[test]
fn shared_decisions_that_differ_are_two_changes_that_both_apply() -> Result<(), ModelError> {
    // Agents whose policies differ by mistake choose different values from the
    // same document: their decisions must not claim one actor and sequence number
    // (Automerge would refuse the second), but stay two values, contested again.
    let (mut a, mut b) = crossing_names()?;
    let (from_a, from_b) = (changes(&mut a), changes(&mut b));
    a.apply(&from_b)?;
    b.apply(&from_a)?;
    let name = Contested::Field("name".into());
    a.decide_shared(
        &name,
        &Value::Text("Ada K.".into()),
        &shared_decision("latest_edit", from("b", "erp")),
        3_000,
    )?;
    b.decide_shared(
        &name,
        &Value::Text("Ada L.".into()),
        &shared_decision("system_of_record", from("a", "crm")),
        2_000,
    )?;
    let (from_a, from_b) = (changes(&mut a), changes(&mut b));
    a.apply(&from_b)?;
    b.apply(&from_a)?;
    assert_eq!(a.heads(), b.heads());
    assert_eq!(a.contested()?.len(), 1);
    assert_eq!(a.contested()?[0].1.len(), 2);
    Ok(())
}

#[test]
fn a_delete_concurrent_with_an_edit_is_told_apart_from_one_made_after_it() -> Result<(), ModelError>
{
    let delete = |time_ms| Edit {
        deleted: Some(true),
        time_ms,
        provenance: Some(from("a", "crm")),
        ..Edit::default()
    };
    // Sequential: the edit was known when the record was deleted.
    let (mut a, mut b) = pair()?;
    b.edit(
        "people",
        "1",
        &edit("name", "Ada K.", 2_000, from("b", "erp")),
    )?;
    a.apply(&changes(&mut b))?;
    a.edit("people", "1", &delete(3_000))?;
    assert!(!a.edited_concurrently_with_delete()?);
    // Concurrent: the edit was made while the delete was unknown.
    let (mut a, mut b) = pair()?;
    a.edit("people", "1", &delete(2_000))?;
    b.edit(
        "people",
        "1",
        &edit("name", "Ada K.", 3_000, from("b", "erp")),
    )?;
    a.apply(&changes(&mut b))?;
    assert!(a.is_deleted()?);
    assert!(a.edited_concurrently_with_delete()?);
    Ok(())
}

#[test]
fn history_lists_every_value_with_where_it_came_from() -> Result<(), ModelError> {
    let (mut a, _) = pair()?;
    a.edit(
        "people",
        "1",
        &edit("name", "Ada L.", 2_000, from("a", "erp")),
    )?;
    let history = a.history()?;
    let names: Vec<_> = history
        .iter()
        .filter(|h| h.key == Contested::Field("name".into()))
        .map(|h| {
            (
                h.value.clone(),
                h.provenance.tool.clone(),
                h.time_ms,
                h.current,
            )
        })
        .collect();
    assert_eq!(
        names,
        vec![
            (
                Some(Value::Text("Ada".into())),
                "crm".to_owned(),
                1_000,
                false
            ),
            (
                Some(Value::Text("Ada L.".into())),
                "erp".to_owned(),
                2_000,
                true
            ),
        ]
    );
    Ok(())
}

#[test]
fn a_decision_for_a_value_already_held_shows_in_the_history_with_that_value()
-> Result<(), ModelError> {
    let (mut a, mut b) = crossing_names()?;
    a.apply(&changes(&mut b))?;
    let decided = Provenance {
        decision: Some(Decision {
            policy: "latest_edit".into(),
            by: "a".into(),
        }),
        ..from("b", "erp")
    };
    let winner = Value::Text("Ada K.".into());
    a.decide(&Contested::Field("name".into()), &winner, &decided, 3_000)?;
    assert!(a.contested()?.is_empty());
    let last = a.history()?.pop().expect("entries");
    assert_eq!(last.value, Some(winner));
    assert_eq!(last.provenance, decided);
    assert!(last.current, "{last:?}");
    Ok(())
}

/// Regression: a decision for a value the field already held was written by
/// Automerge as a delete of the other values only, so two people settling one
/// conflict on different values at once deleted both and emptied the field.
#[test]
fn crossing_decisions_for_different_values_keep_both_values() -> Result<(), ModelError> {
    let (mut a, mut b) = crossing_names()?;
    let (from_a, from_b) = (changes(&mut a), changes(&mut b));
    a.apply(&from_b)?;
    b.apply(&from_a)?;
    let manual = |by: &str| Provenance {
        decision: Some(Decision {
            policy: "manual".into(),
            by: by.into(),
        }),
        ..from(by, "")
    };
    let name = Contested::Field("name".into());
    a.decide(&name, &Value::Text("Ada L.".into()), &manual("a"), 4_000)?;
    b.decide(&name, &Value::Text("Ada K.".into()), &manual("b"), 4_000)?;
    let (from_a, from_b) = (changes(&mut a), changes(&mut b));
    a.apply(&from_b)?;
    let contested = a.contested()?;
    assert_eq!(contested.len(), 1, "both decisions stay: {contested:?}");
    assert_eq!(contested[0].1.len(), 2);
    assert!(a.read()?.fields.contains_key("name"));
    b.apply(&from_a)?;
    assert_eq!(a.read()?, b.read()?);
    Ok(())
}

#[test]
fn provenance_round_trips_through_the_change_message() {
    let edit = from("abcdefgh", "crm");
    assert_eq!(edit.encode(), "abcdefgh.crm");
    let decided = Provenance {
        decision: Some(Decision {
            policy: "manual".into(),
            by: "ijklmnop".into(),
        }),
        ..from("abcdefgh", "")
    };
    for p in [edit, decided, Provenance::default()] {
        assert_eq!(Provenance::decode(Some(&p.encode())), p);
    }
    assert_eq!(Provenance::decode(None), Provenance::default());
}
