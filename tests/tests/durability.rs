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

/// A user who keeps editing one database on a thread until told to stop.
struct Editor {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: std::thread::JoinHandle<anyhow::Result<u64>>,
}

/// Edits made by the editor at most.
const EDITS_MAX: u64 = 50_000;

impl Editor {
    fn start(node: &Node) -> anyhow::Result<Editor> {
        use std::sync::atomic::Ordering;
        let db = node.db()?;
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut rng = 0x2545_f491_4f6c_dd1du64;
            let mut edits = 0;
            while !flag.load(Ordering::Relaxed) && edits < EDITS_MAX {
                rng ^= rng << 13;
                rng ^= rng >> 7;
                rng ^= rng << 17;
                let id = (rng % 200) as i64;
                match rng % 5 {
                    0 => db.execute("DELETE FROM customers WHERE id = ?1", [id])?,
                    1 | 2 => db.execute(
                        "INSERT INTO customers (id, name, age) VALUES (?1, 'edit', ?2)
                         ON CONFLICT (id) DO UPDATE SET age = excluded.age",
                        rusqlite::params![id, (rng >> 8) as i64 % 100],
                    )?,
                    _ => db.execute(
                        "UPDATE customers SET city = ?2 WHERE id = ?1",
                        rusqlite::params![id, format!("c{}", rng % 1000)],
                    )?,
                };
                edits += 1;
                std::thread::sleep(std::time::Duration::from_micros(500));
            }
            Ok(edits)
        });
        Ok(Editor { stop, thread })
    }

    fn stop(self) -> anyhow::Result<u64> {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.thread
            .join()
            .map_err(|_| anyhow::anyhow!("the editor panicked"))?
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_hundred_kill_9s_at_random_moments_lose_and_duplicate_nothing() -> anyhow::Result<()> {
    const KILLS: usize = 100;
    let tmp = tempfile::tempdir()?;
    let mut a = Node::new(tmp.path(), "a")?;
    let mut b = Node::new(tmp.path(), "b")?;
    b.configure("127.0.0.1:0", &[(a.id(), None)])?;
    let mut proc_b = Process::start(&b)?;
    b.configure(&proc_b.addr, &[(a.id(), None)])?;
    a.configure("127.0.0.1:0", &[(b.id(), Some(proc_b.addr.clone()))])?;
    let mut proc_a = Process::start(&a)?;

    // Both users edit all along; the agents die at pseudo-random moments, in turn.
    let editor_a = Editor::start(&a)?;
    let mut rng = 0x9e37_79b9_7f4a_7c15u64;
    for kill in 0..KILLS {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        tokio::time::sleep(std::time::Duration::from_millis(10 + rng % 190)).await;
        if kill % 2 == 0 {
            proc_a.kill9()?;
            proc_a = Process::start(&a)?;
        } else {
            proc_b.kill9()?;
            if kill % 10 == 1 {
                b.db()?.execute(
                    "UPDATE customers SET name = 'from b' WHERE id = ?1",
                    [kill as i64 % 200],
                )?;
            }
            proc_b = Process::start(&b)?;
        }
    }
    let edits = editor_a.stop()?;
    assert!(edits > 100, "the editor made only {edits} edits");
    let rows = converged(&[&a, &b]).await?;
    assert!(!rows.is_empty());
    proc_a.stop()?;
    proc_b.stop()?;
    // One document per key on both sides, the same on both: nothing duplicated.
    let mut counts = Vec::new();
    for node in [&a, &b] {
        let store = concord_agent::store::Store::open(&node.files.dir.join("data"))?;
        counts.push(store.reader().doc_count()?);
    }
    assert_eq!(counts[0], counts[1]);
    assert!(counts[0] <= 200, "{} documents for 200 keys", counts[0]);
    Ok(())
}
