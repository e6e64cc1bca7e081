//! Nothing lost on crash: `kill -9` of real agent processes during a burst of edits.

use concord_tests::{Node, Process, converged};

/// Edits in a burst: inserts, then updates of every other row, then deletes.
fn burst(node: &Node, from: i64, count: i64) -> anyhow::Result<()> {
    let db = node.db()?;
    for id in from..from + count {
        db.execute(
            "INSERT INTO customers (id, name, age) VALUES (?1, 'burst', ?1)",
            [id],
        )?;
    }
    for id in (from..from + count).step_by(2) {
        db.execute("UPDATE customers SET city = 'updated' WHERE id = ?1", [id])?;
    }
    for id in (from..from + count).step_by(5) {
        db.execute("DELETE FROM customers WHERE id = ?1", [id])?;
    }
    Ok(())
}

/// Every row as expected after `burst`.
fn expected(from: i64, count: i64) -> Vec<concord_tests::Row> {
    (from..from + count)
        .filter(|id| (id - from) % 5 != 0)
        .map(|id| {
            let city = ((id - from) % 2 == 0).then(|| "updated".to_owned());
            (id, Some("burst".to_owned()), None, city, Some(id))
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn kill_9_right_after_a_burst_loses_and_duplicates_nothing() -> anyhow::Result<()> {
    let tmp = tempfile::tempdir()?;
    let mut a = Node::new(tmp.path(), "a")?;
    let mut b = Node::new(tmp.path(), "b")?;
    b.configure("127.0.0.1:0", &[(a.id(), None)])?;
    let proc_b = Process::start(&b)?;
    // B restarts on the same port, so A can redial it.
    b.configure(&proc_b.addr, &[(a.id(), None)])?;
    a.configure("127.0.0.1:0", &[(b.id(), Some(proc_b.addr.clone()))])?;
    let proc_a = Process::start(&a)?;

    // The editing side dies right after its burst.
    burst(&a, 1, 300)?;
    proc_a.kill9()?;
    let proc_a = Process::start(&a)?;
    let rows = converged(&[&a, &b]).await?;
    assert_eq!(rows, expected(1, 300));

    // The receiving side dies in the middle of the next burst.
    burst(&a, 1000, 300)?;
    proc_b.kill9()?;
    burst(&b, 2000, 100)?;
    let proc_b = Process::start(&b)?;
    let rows = converged(&[&a, &b]).await?;
    let mut want = expected(1, 300);
    want.extend(expected(1000, 300));
    want.extend(expected(2000, 100));
    assert_eq!(rows, want);

    proc_a.stop()?;
    proc_b.stop()?;
    // One document per record, the same on both sides: nothing duplicated. (A row
    // deleted before it was captured never became a document.)
    let mut counts = Vec::new();
    for node in [&a, &b] {
        let store = concord_agent::store::Store::open(&node.files.dir.join("data"))?;
        counts.push(store.reader().doc_count()?);
    }
    assert_eq!(counts[0], counts[1], "documents per side");
    assert!(
        (rows.len()..=700).contains(&counts[0]),
        "{} documents for {} rows",
        counts[0],
        rows.len()
    );
    Ok(())
}
