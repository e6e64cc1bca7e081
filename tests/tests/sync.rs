//! Two agents, two databases: changes flow both ways, offline edits merge, no echo.

use concord_tests::{Node, converged};

/// A running pair: `a` accepts, `b` dials `a`.
async fn pair(
    root: &std::path::Path,
) -> anyhow::Result<(
    Node,
    Node,
    concord_agent::agent::RunningAgent,
    concord_agent::agent::RunningAgent,
)> {
    let mut a = Node::new(root, "a")?;
    let mut b = Node::new(root, "b")?;
    let (agent_a, agent_b) = start_pair(&mut a, &mut b).await?;
    Ok((a, b, agent_a, agent_b))
}

/// Configures `a` to accept `b` and `b` to dial `a`, and starts both.
async fn start_pair(
    a: &mut Node,
    b: &mut Node,
) -> anyhow::Result<(
    concord_agent::agent::RunningAgent,
    concord_agent::agent::RunningAgent,
)> {
    a.configure("127.0.0.1:0", &[(b.id(), None)])?;
    let agent_a = a.start().await?;
    b.configure(
        "127.0.0.1:0",
        &[(a.id(), Some(agent_a.local_addr().to_string()))],
    )?;
    let agent_b = b.start().await?;
    Ok((agent_a, agent_b))
}

#[tokio::test(flavor = "multi_thread")]
async fn insert_update_and_delete_flow_both_ways() -> anyhow::Result<()> {
    let tmp = tempfile::tempdir()?;
    let (a, b, agent_a, agent_b) = pair(tmp.path()).await?;

    a.db()?.execute(
        "INSERT INTO customers (id, name, email, age) VALUES (1, 'Ada', 'ada@x', 36)",
        [],
    )?;
    let rows = converged(&[&a, &b]).await?;
    assert_eq!(
        rows,
        vec![(1, Some("Ada".into()), Some("ada@x".into()), None, Some(36))]
    );

    b.db()?
        .execute("UPDATE customers SET city = 'London' WHERE id = 1", [])?;
    let rows = converged(&[&a, &b]).await?;
    assert_eq!(rows[0].3.as_deref(), Some("London"));

    b.db()?
        .execute("INSERT INTO customers (id, name) VALUES (2, 'Grace')", [])?;
    a.db()?
        .execute("UPDATE customers SET age = 37 WHERE id = 1", [])?;
    let rows = converged(&[&a, &b]).await?;
    assert_eq!(rows.len(), 2);
    assert_eq!(rows[0].4, Some(37));

    a.db()?.execute("DELETE FROM customers WHERE id = 2", [])?;
    let rows = converged(&[&a, &b]).await?;
    assert_eq!(rows.len(), 1);
    b.db()?.execute("DELETE FROM customers WHERE id = 1", [])?;
    let rows = converged(&[&a, &b]).await?;
    assert!(rows.is_empty());

    agent_a.shutdown().await;
    agent_b.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn offline_edits_of_different_fields_both_survive() -> anyhow::Result<()> {
    let tmp = tempfile::tempdir()?;
    let (a, b, agent_a, agent_b) = pair(tmp.path()).await?;
    a.db()?.execute(
        "INSERT INTO customers (id, name, city) VALUES (1, 'Ada', 'London')",
        [],
    )?;
    converged(&[&a, &b]).await?;

    // B goes offline; both sides edit a different field of the same record.
    agent_b.shutdown().await;
    a.db()?.execute(
        "UPDATE customers SET name = 'Ada Lovelace' WHERE id = 1",
        [],
    )?;
    b.db()?
        .execute("UPDATE customers SET city = 'Marylebone' WHERE id = 1", [])?;
    let agent_b = b.start().await?;

    let rows = converged(&[&a, &b]).await?;
    assert_eq!(
        rows,
        vec![(
            1,
            Some("Ada Lovelace".into()),
            None,
            Some("Marylebone".into()),
            None
        )]
    );
    agent_a.shutdown().await;
    agent_b.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn the_same_key_created_offline_on_both_sides_is_one_row_each() -> anyhow::Result<()> {
    let tmp = tempfile::tempdir()?;
    let (a, b, agent_a, agent_b) = pair(tmp.path()).await?;
    agent_b.shutdown().await;
    a.db()?.execute(
        "INSERT INTO customers (id, name, email) VALUES (7, 'Alan', 'alan@x')",
        [],
    )?;
    b.db()?.execute(
        "INSERT INTO customers (id, name, city) VALUES (7, 'Alan', 'Manchester')",
        [],
    )?;
    let agent_b = b.start().await?;
    let rows = converged(&[&a, &b]).await?;
    assert_eq!(
        rows,
        vec![(
            7,
            Some("Alan".into()),
            Some("alan@x".into()),
            Some("Manchester".into()),
            None
        )]
    );
    assert_eq!(agent_a.reader().doc_count()?, 1);
    assert_eq!(agent_b.reader().doc_count()?, 1);
    agent_a.shutdown().await;
    agent_b.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn after_the_edits_the_system_goes_quiet_with_one_write_per_edit() -> anyhow::Result<()> {
    let tmp = tempfile::tempdir()?;
    let (a, b, agent_a, agent_b) = pair(tmp.path()).await?;
    for id in 1..=20 {
        a.db()?
            .execute("INSERT INTO customers (id, name) VALUES (?1, 'n')", [id])?;
    }
    converged(&[&a, &b]).await?;
    for id in 1..=10 {
        b.db()?
            .execute("UPDATE customers SET age = ?1 WHERE id = ?1", [id])?;
    }
    a.db()?.execute("DELETE FROM customers WHERE id = 20", [])?;
    let rows = converged(&[&a, &b]).await?;
    assert_eq!(rows.len(), 19);

    // Quiet: once converged and settled, logs, outboxes and writes stop changing.
    let snapshot = || async {
        let (sa, sb) = (agent_a.stats().await, agent_b.stats().await);
        let heads = (
            agent_a.reader().log_head("customers"),
            agent_b.reader().log_head("customers"),
        );
        (sa, sb, heads.0.ok(), heads.1.ok())
    };
    concord_tests::wait_for(
        "the outboxes to be trimmed",
        concord_tests::CONVERGE_TIMEOUT,
        || Ok(outbox_len(&a)? == 0 && outbox_len(&b)? == 0),
    )
    .await?;
    // Messages in flight at convergence may still land; then nothing more may happen.
    let mut last = (agent_a.commits(), agent_b.commits());
    let mut stable = 0;
    for _ in 0..50 {
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        let now = (agent_a.commits(), agent_b.commits());
        stable = if now == last { stable + 1 } else { 0 };
        last = now;
        if stable == 5 {
            break;
        }
    }
    assert_eq!(stable, 5, "the stores kept committing after the last edit");
    let before = snapshot().await;
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    let after = snapshot().await;
    assert_eq!(before, after, "the agents kept working after the last edit");
    assert_eq!(
        last,
        (agent_a.commits(), agent_b.commits()),
        "the stores kept committing"
    );
    assert_eq!((outbox_len(&a)?, outbox_len(&b)?), (0, 0));

    // Each edit caused at most one write per tool, and none in the tool it came from.
    let (sa, sb) = (after.0.expect("stats"), after.1.expect("stats"));
    assert_eq!(sa.captured, 21, "A: 20 inserts and one delete");
    assert_eq!(sb.captured, 10, "B: 10 updates");
    assert_eq!(sa.writes, 10, "A wrote B's 10 updates once each");
    assert_eq!(
        sb.writes, 21,
        "B wrote A's 20 inserts and one delete once each"
    );
    assert_eq!(after.2, Some(31), "A's log: its 21 changes and B's 10");
    assert_eq!(
        after.3,
        Some(31),
        "B's log: the same 31 changes, none twice"
    );
    agent_a.shutdown().await;
    agent_b.shutdown().await;
    Ok(())
}

fn outbox_len(node: &Node) -> anyhow::Result<i64> {
    Ok(node
        .db()?
        .query_row("SELECT count(*) FROM _concord_outbox", [], |r| r.get(0))?)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_wiped_store_comes_back_with_a_new_actor_without_reviving_deletes() -> anyhow::Result<()>
{
    let tmp = tempfile::tempdir()?;
    let (a, b, agent_a, agent_b) = pair(tmp.path()).await?;
    for id in 1..=3 {
        a.db()?
            .execute("INSERT INTO customers (id, name) VALUES (?1, 'n')", [id])?;
    }
    converged(&[&a, &b]).await?;
    let old_actor = agent_b.store_id();
    agent_b.shutdown().await;
    std::fs::remove_dir_all(b.files.dir.join("data"))?;

    // While B's store is gone, A deletes one record and edits another.
    a.db()?.execute("DELETE FROM customers WHERE id = 2", [])?;
    a.db()?
        .execute("UPDATE customers SET city = 'Oslo' WHERE id = 1", [])?;
    let agent_b = b.start().await?;
    assert_ne!(
        agent_b.store_id(),
        old_actor,
        "a wiped store must not reuse its actor id"
    );
    let rows = converged(&[&a, &b]).await?;
    assert_eq!(
        rows.iter().map(|r| r.0).collect::<Vec<_>>(),
        [1, 3],
        "the delete was undone"
    );
    assert_eq!(rows[0].3.as_deref(), Some("Oslo"));
    agent_a.shutdown().await;
    agent_b.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_peer_that_lost_its_cursor_catches_up_by_digests() -> anyhow::Result<()> {
    use concord_agent::store::{Store, anti_entropy_mark, peer_cursor};
    let tmp = tempfile::tempdir()?;
    let (a, b, agent_a, agent_b) = pair(tmp.path()).await?;
    for id in 1..=40 {
        a.db()?
            .execute("INSERT INTO customers (id, name) VALUES (?1, 'n')", [id])?;
    }
    converged(&[&a, &b]).await?;
    let a_store = agent_a.store_id();
    agent_b.shutdown().await;

    // B loses its cursor into A's log while A's users go on editing.
    let dir = b.files.dir.join("data");
    {
        let mut store = Store::open(&dir)?;
        let mut batch = store.batch();
        store.stage_cursor(&mut batch, &peer_cursor(&a_store, "customers"), 0);
        store.commit(batch)?;
    }
    a.db()?
        .execute("UPDATE customers SET city = 'Lima' WHERE id = 7", [])?;
    a.db()?.execute("DELETE FROM customers WHERE id = 8", [])?;
    let agent_b = b.start().await?;
    let rows = converged(&[&a, &b]).await?;
    assert_eq!(rows.len(), 39);
    assert_eq!(rows[6].3.as_deref(), Some("Lima"));
    concord_tests::wait_for(
        "anti-entropy to finish",
        concord_tests::CONVERGE_TIMEOUT,
        || {
            Ok(agent_b
                .reader()
                .cursor(&anti_entropy_mark(&a_store, "customers"))?
                == 0)
        },
    )
    .await?;
    assert!(
        agent_b
            .reader()
            .cursor(&peer_cursor(&a_store, "customers"))?
            > 0
    );
    agent_a.shutdown().await;
    agent_b.shutdown().await;
    Ok(())
}

/// Regression (a re-inserted key inherited the deleted record): insert (5, 'Old
/// Name', 'old@example.com'), sync, delete, sync, insert (5, 'New Person') without
/// an email. Both databases used to end with `5|New Person|old@example.com`.
#[tokio::test(flavor = "multi_thread")]
async fn a_re_inserted_key_starts_from_the_new_row() -> anyhow::Result<()> {
    let tmp = tempfile::tempdir()?;
    let (a, b, agent_a, agent_b) = pair(tmp.path()).await?;
    a.db()?.execute(
        "INSERT INTO customers (id, name, email) VALUES (5, 'Old Name', 'old@example.com')",
        [],
    )?;
    let rows = converged(&[&a, &b]).await?;
    assert_eq!(rows.len(), 1);
    a.db()?.execute("DELETE FROM customers WHERE id = 5", [])?;
    let rows = converged(&[&a, &b]).await?;
    assert!(rows.is_empty());
    a.db()?.execute(
        "INSERT INTO customers (id, name) VALUES (5, 'New Person')",
        [],
    )?;
    // The new row must stay as the user wrote it, in A and in B.
    concord_tests::wait_for(
        "B to hold the new row",
        concord_tests::CONVERGE_TIMEOUT,
        || Ok(b.rows()?.len() == 1),
    )
    .await?;
    let rows = converged(&[&a, &b]).await?;
    assert_eq!(rows, vec![(5, Some("New Person".into()), None, None, None)]);
    agent_a.shutdown().await;
    agent_b.shutdown().await;
    Ok(())
}

/// Regression (write-back starved): any edit the tool committed after a plan's
/// cursor refused the whole plan, and capture-and-replan had no bound, so a tool that
/// commits every few milliseconds kept remote changes out for ever. Now only the
/// records it changed wait.
#[tokio::test(flavor = "multi_thread")]
async fn a_tool_that_commits_continuously_still_receives_remote_edits() -> anyhow::Result<()> {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    let tmp = tempfile::tempdir()?;
    let (a, b, agent_a, agent_b) = pair(tmp.path()).await?;
    b.db()?.execute(
        "INSERT INTO customers (id, name, age) VALUES (1, 'hot', 0)",
        [],
    )?;
    converged(&[&a, &b]).await?;

    // B's user commits without pause, one small transaction after another.
    let stop = Arc::new(AtomicBool::new(false));
    let commits = Arc::new(AtomicU64::new(0));
    let editor = {
        let (stop, commits) = (stop.clone(), commits.clone());
        let db = b.db()?;
        std::thread::spawn(move || -> anyhow::Result<()> {
            // Bounded: the test stops it, or it gives up after a minute's worth.
            while !stop.load(Ordering::Relaxed) && commits.load(Ordering::Relaxed) < 2_000_000 {
                db.execute("UPDATE customers SET age = age + 1 WHERE id = 1", [])?;
                commits.fetch_add(1, Ordering::Relaxed);
            }
            Ok(())
        })
    };
    concord_tests::wait_for(
        "B's user to be committing",
        concord_tests::CONVERGE_TIMEOUT,
        || Ok(commits.load(Ordering::Relaxed) >= 100),
    )
    .await?;
    let before = commits.load(Ordering::Relaxed);
    for id in 100..150 {
        a.db()?.execute(
            "INSERT INTO customers (id, name) VALUES (?1, 'remote')",
            [id],
        )?;
    }
    let arrived = concord_tests::wait_for(
        "A's 50 inserts in B while B's user keeps committing",
        concord_tests::CONVERGE_TIMEOUT,
        || Ok(b.rows()?.iter().filter(|r| r.0 >= 100).count() == 50),
    )
    .await;
    let during = commits.load(Ordering::Relaxed) - before;
    stop.store(true, Ordering::Relaxed);
    editor
        .join()
        .map_err(|_| anyhow::anyhow!("the editor panicked"))??;
    arrived?;
    assert!(
        during > 0,
        "B's user made no commit while the inserts arrived"
    );
    let rows = converged(&[&a, &b]).await?;
    assert_eq!(rows.len(), 51);
    agent_a.shutdown().await;
    agent_b.shutdown().await;
    Ok(())
}

/// Regression (fidelity of written values): a row written in A as `2024-03-01
/// 09:15:00` arrived in B as `2024-03-01T09:15:00.000000Z`. A value written back
/// takes the form its column uses in the receiving database.
#[tokio::test(flavor = "multi_thread")]
async fn written_timestamps_keep_the_receiving_columns_format() -> anyhow::Result<()> {
    const SCHEMA: &str =
        "CREATE TABLE customers (id INTEGER PRIMARY KEY, name TEXT, seen TIMESTAMP)";
    let tmp = tempfile::tempdir()?;
    let mut a = Node::with_schema(tmp.path(), "a", SCHEMA)?;
    let mut b = Node::with_schema(tmp.path(), "b", SCHEMA)?;
    // B's application writes RFC 3339 with milliseconds; A's writes SQLite's format.
    b.db()?.execute(
        "INSERT INTO customers (id, name, seen) VALUES (1, 'b', '2024-01-01T08:00:00.000Z')",
        [],
    )?;
    let columns = ["name", "seen"];
    a.configure_columns("127.0.0.1:0", &[(b.id(), None)], &columns)?;
    let agent_a = a.start().await?;
    b.configure_columns(
        "127.0.0.1:0",
        &[(a.id(), Some(agent_a.local_addr().to_string()))],
        &columns,
    )?;
    let agent_b = b.start().await?;
    a.db()?.execute(
        "INSERT INTO customers (id, name, seen) VALUES (2, 'a', '2024-03-01 09:15:00')",
        [],
    )?;
    let seen = |node: &Node, id: i64| -> anyhow::Result<Option<String>> {
        Ok(node
            .db()?
            .query_row("SELECT seen FROM customers WHERE id = ?1", [id], |r| {
                r.get(0)
            })
            .ok())
    };
    concord_tests::wait_for(
        "both rows on both sides",
        concord_tests::CONVERGE_TIMEOUT,
        || Ok(seen(&a, 1)?.is_some() && seen(&b, 2)?.is_some()),
    )
    .await?;
    assert_eq!(seen(&b, 2)?.as_deref(), Some("2024-03-01T09:15:00.000Z"));
    assert_eq!(seen(&a, 1)?.as_deref(), Some("2024-01-01 08:00:00"));
    agent_a.shutdown().await;
    agent_b.shutdown().await;
    Ok(())
}

/// Regression (a stall in the connection pump): the driver of a connection read no
/// frame while a frame it wrote waited for the peer's receive window. Two agents
/// each sending the other a backlog larger than what the peer buffers then both
/// waited to write, neither read, and the connection stopped for good while still
/// up. The backlogs here are a few times what one side buffers (its reader's frames,
/// the events with its core and the stream's window).
#[tokio::test(flavor = "multi_thread")]
async fn two_agents_sending_each_other_large_backlogs_at_once_do_not_stall() -> anyhow::Result<()> {
    const ROWS: usize = 500;
    const NAME_CHARS: usize = 128 * 1024;
    let tmp = tempfile::tempdir()?;
    let mut a = Node::new(tmp.path(), "a")?;
    let mut b = Node::new(tmp.path(), "b")?;
    // Names that do not compress, so each change stays about as large as its row.
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let mut name = || -> String {
        const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789";
        (0..NAME_CHARS)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                ALPHABET[(state % ALPHABET.len() as u64) as usize] as char
            })
            .collect()
    };
    for (node, first_id) in [(&a, 1), (&b, 1_000_001)] {
        let mut db = node.db()?;
        let tx = db.transaction()?;
        for i in 0..ROWS {
            tx.execute(
                "INSERT INTO customers (id, name, age) VALUES (?1, ?2, ?3)",
                (first_id + i as i64, name(), i as i64),
            )?;
        }
        tx.commit()?;
    }
    // Each agent captures its backlog alone first, so both start sending at once.
    for node in [&mut a, &mut b] {
        node.configure("127.0.0.1:0", &[])?;
        let agent = node.start().await?;
        concord_tests::eventually("the backlog to be captured", async || {
            Ok((agent.reader().log_head("customers")? >= ROWS as u64).then_some(()))
        })
        .await?;
        agent.shutdown().await;
    }
    let (agent_a, agent_b) = start_pair(&mut a, &mut b).await?;
    let rows = converged(&[&a, &b]).await?;
    assert_eq!(rows.len(), 2 * ROWS);
    agent_a.shutdown().await;
    agent_b.shutdown().await;
    Ok(())
}
