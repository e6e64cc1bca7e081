//! Web-app benchmark: two offices, each a SQLite database with its own agent, share
//! their customers through one real PocketBase server and nothing else (the agents
//! are not peers). It prints the first sync of N records SQLite A → PocketBase →
//! SQLite B beside the floor of a plain client creating the same records, and the
//! latency of one edit SQLite A → PocketBase → SQLite B, with webhooks and with
//! polling only.
//!
//! `cargo run --release -p concord-tests --bin webapp-bench -- --records 10000 --edits 20`

use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Parser;
use concord_tests::pocketbase::{PocketBase, Reach};
use concord_tests::{Node, free_udp_addr, sqlite_tool};
use reqwest::Method;

#[derive(Parser)]
struct Args {
    /// Records in office A's database at the start.
    #[arg(long, default_value_t = 10_000)]
    records: usize,
    /// Edits timed one after the other, with webhooks and then with polling only.
    #[arg(long, default_value_t = 20)]
    edits: usize,
    /// Office B's polling interval when webhooks are off, in milliseconds.
    #[arg(long, default_value_t = 500)]
    poll_ms: u64,
}

/// How long the first sync may take before the benchmark gives up.
const SYNC_TIMEOUT: Duration = Duration::from_secs(900);
/// How long one edit may take.
const EDIT_TIMEOUT: Duration = Duration::from_secs(30);
/// Requests a plain client keeps in flight for the floor, as the agent does.
const FLOOR_CONCURRENCY: usize = 4;

/// Customers the app holds.
async fn count(app: &PocketBase) -> anyhow::Result<usize> {
    let (_, page) = app
        .send(
            Method::GET,
            "/api/collections/customers/records?perPage=1",
            None,
        )
        .await?;
    Ok(page["totalItems"].as_u64().context("totalItems")? as usize)
}

fn office_count(node: &Node) -> anyhow::Result<usize> {
    Ok(node
        .db()?
        .query_row("SELECT count(*) FROM customers", [], |r| r.get::<_, i64>(0))? as usize)
}

/// The floor: a plain client creating `n` records, [`FLOOR_CONCURRENCY`] at a time.
async fn floor(root: &std::path::Path, n: usize) -> anyhow::Result<f64> {
    let app = std::sync::Arc::new(PocketBase::start(root, "floor").await?);
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for lane in 0..FLOOR_CONCURRENCY {
        let app = app.clone();
        tasks.spawn(async move {
            for i in (lane..n).step_by(FLOOR_CONCURRENCY) {
                app.create(serde_json::json!({
                    "name": format!("Customer {i}"),
                    "email": format!("c{i}@example.com"),
                    "city": "Lyon",
                    "age": (i % 90) as i64
                }))
                .await?;
            }
            anyhow::Ok(())
        });
    }
    while let Some(done) = tasks.join_next().await {
        done??;
    }
    Ok(started.elapsed().as_secs_f64())
}

/// Times `edits` edits of office A's database until office B holds them.
async fn edits(
    a: &Node,
    b: &Node,
    edits: usize,
    records: usize,
    tag: &str,
) -> anyhow::Result<Vec<Duration>> {
    let mut latencies = Vec::with_capacity(edits);
    let (db_a, db_b) = (a.db()?, b.db()?);
    for n in 0..edits {
        let id = 1 + (n * 7919) % records;
        let city = format!("{tag} {n}");
        let started = Instant::now();
        db_a.execute(
            "UPDATE customers SET city = ?1 WHERE id = ?2",
            rusqlite::params![city, id as i64],
        )?;
        let name = format!("Customer {id}");
        loop {
            let found: Option<String> = db_b
                .query_row("SELECT city FROM customers WHERE name = ?1", [&name], |r| {
                    r.get(0)
                })
                .ok();
            if found.as_deref() == Some(city.as_str()) {
                break;
            }
            if started.elapsed() > EDIT_TIMEOUT {
                bail!("edit {n} did not reach office B within {EDIT_TIMEOUT:?}");
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        latencies.push(started.elapsed());
    }
    latencies.sort();
    Ok(latencies)
}

fn report(latencies: &[Duration], how: &str) {
    if latencies.is_empty() {
        return;
    }
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    println!(
        "one edit SQLite A -> PocketBase -> SQLite B ({how}, {} edits): p50 {:.0} ms, max {:.0} ms",
        latencies.len(),
        ms(latencies[latencies.len() / 2]),
        ms(latencies[latencies.len() - 1])
    );
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if args.records == 0 {
        bail!("--records is at least 1");
    }
    let root = tempfile::tempdir()?;
    let floor_secs = floor(root.path(), args.records).await?;
    println!(
        "floor: a plain client creates {} records in PocketBase, {FLOOR_CONCURRENCY} at a time, in {floor_secs:.2} s ({:.0} records/s)",
        args.records,
        args.records as f64 / floor_secs
    );

    let app = PocketBase::start(root.path(), "pocketbase").await?;
    let mut a = Node::new(root.path(), "a")?;
    let mut b = Node::new(root.path(), "b")?;
    {
        let mut db = a.db()?;
        let tx = db.transaction()?;
        for i in 1..=args.records {
            tx.execute(
                "INSERT INTO customers (id, name, email, city, age) VALUES (?1, ?2, ?3, 'Lyon', ?4)",
                rusqlite::params![
                    i as i64,
                    format!("Customer {i}"),
                    format!("c{i}@example.com"),
                    (i % 90) as i64
                ],
            )?;
        }
        tx.commit()?;
    }
    let quiet = Reach {
        poll_ms: 3_600_000,
        reconcile_ms: 3_600_000,
        webhooks: false,
    };
    let pushed = Reach {
        webhooks: true,
        ..quiet
    };
    let body = |reach: Reach| {
        format!(
            "{}{}",
            sqlite_tool("office", "app.db"),
            app.rest_tool("crm", reach)
        )
    };
    a.configure_with(&free_udp_addr()?, &[], &body(quiet))?;
    b.configure_with(&free_udp_addr()?, &[], &body(pushed))?;

    let started = Instant::now();
    let agent_b = b.start().await?;
    app.hook_to(&b.admin_url()?, "crm").await?;
    let agent_a = a.start().await?;
    let mut in_app = None;
    loop {
        if in_app.is_none() && count(&app).await? >= args.records {
            in_app = Some(started.elapsed().as_secs_f64());
        }
        if office_count(&b)? >= args.records {
            break;
        }
        if started.elapsed() > SYNC_TIMEOUT {
            bail!("office B did not fill within {SYNC_TIMEOUT:?}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let first = started.elapsed().as_secs_f64();
    let in_app = in_app.unwrap_or(first);
    println!(
        "first sync SQLite A -> PocketBase: {} records in {in_app:.2} s ({:.0} records/s, {:.2}x the plain client's floor)",
        args.records,
        args.records as f64 / in_app,
        floor_secs / in_app
    );
    println!(
        "first sync SQLite A -> PocketBase -> SQLite B (webhooks): {} records in {first:.2} s ({:.0} records/s)",
        args.records,
        args.records as f64 / first
    );

    let pushed_latencies = edits(&a, &b, args.edits, args.records, "Webhook").await?;
    report(&pushed_latencies, "webhooks");

    // Office B again, without webhooks: polling alone.
    agent_b.shutdown().await;
    app.webhooks_off().await?;
    let polled = Reach {
        poll_ms: args.poll_ms,
        ..quiet
    };
    b.configure_with(&free_udp_addr()?, &[], &body(polled))?;
    let agent_b = b.start().await?;
    let polled_latencies = edits(&a, &b, args.edits, args.records, "Polled").await?;
    report(
        &polled_latencies,
        &format!("polling every {} ms, no webhooks", args.poll_ms),
    );
    agent_a.shutdown().await;
    agent_b.shutdown().await;
    Ok(())
}
