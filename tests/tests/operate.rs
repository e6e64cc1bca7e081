//! Operating an agent, against real agent processes over real QUIC with real SQLite
//! and PostgreSQL: `/metrics` values checked against known activity, `/healthz`
//! following a tool that goes down, `concord status` and `concord peers`, JSON logs
//! with their spans and the progress of a first import, and SIGTERM under load
//! followed by a restart with exact counts.

use std::time::Duration;

use anyhow::Context;
use concord_tests::postgres::Postgres;
use concord_tests::{
    COLUMNS, Node, Process, admin, cli, converged, eventually, free_udp_addr, metric, sqlite_tool,
};

/// Two agents that dial each other on fixed loopback ports, each with a SQLite tool
/// of customers.
fn pair(root: &std::path::Path) -> anyhow::Result<(Node, Node)> {
    let mut a = Node::new(root, "a")?;
    let mut b = Node::new(root, "b")?;
    let (addr_a, addr_b) = (free_udp_addr()?, free_udp_addr()?);
    // Rows are compared id for id: both tools use the same keys.
    let tool = format!(
        "{}identity = \"shared_key\"\n",
        sqlite_tool("app", "app.db")
    );
    a.configure_with(&addr_a, &[(b.id(), Some(addr_b.clone()))], &tool)?;
    b.configure_with(&addr_b, &[(a.id(), Some(addr_a))], &tool)?;
    Ok((a, b))
}

/// Waits until `node`'s metric `name` with `labels` is `want`; fails naming the last
/// value seen.
async fn metric_is(
    node: &Node,
    name: &str,
    labels: &[(&str, &str)],
    want: f64,
) -> anyhow::Result<()> {
    let mut last = None;
    let found = eventually(&format!("{name}{labels:?} = {want}"), async || {
        let text = admin(node)?.metrics().await?;
        last = metric(&text, name, labels);
        Ok((last == Some(want)).then_some(()))
    })
    .await;
    found.with_context(|| format!("last value of {name}{labels:?}: {last:?}"))
}

/// Inserts customers `from..to` into `node`'s database, one transaction each.
fn insert(node: &Node, from: usize, to: usize) -> anyhow::Result<()> {
    let db = node.db()?;
    for i in from..to {
        db.execute(
            "INSERT INTO customers (name, email, city, age) VALUES (?1, ?2, 'Oslo', 30)",
            (format!("c{i}"), format!("c{i}@example.com")),
        )?;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn metrics_status_and_peers_report_known_activity() -> anyhow::Result<()> {
    let tmp = tempfile::tempdir()?;
    let (a, b) = pair(tmp.path())?;
    let (id_a, id_b) = (a.id().to_string(), b.id().to_string());
    let pa = Process::start(&a)?;
    let pb = Process::start(&b)?;
    metric_is(&a, "concord_peer_connected", &[("peer", &id_b)], 1.0).await?;
    // 50 inserts on A, 10 deletes on B.
    insert(&a, 0, 50)?;
    assert_eq!(converged(&[&a, &b]).await?.len(), 50);
    b.db()?
        .execute("DELETE FROM customers WHERE id <= 10", [])?;
    assert_eq!(converged(&[&a, &b]).await?.len(), 40);
    let records = [("collection", "customers")];
    let app = [("tool", "app")];
    for node in [&a, &b] {
        metric_is(node, "concord_records", &records, 40.0).await?;
        metric_is(node, "concord_log_head", &records, 60.0).await?;
        metric_is(
            node,
            "concord_changes_written_total",
            &app,
            if node.id() == a.id() { 10.0 } else { 50.0 },
        )
        .await?;
        metric_is(
            node,
            "concord_changes_captured_total",
            &app,
            if node.id() == a.id() { 50.0 } else { 10.0 },
        )
        .await?;
    }
    metric_is(&a, "concord_changes_sent_total", &[("peer", &id_b)], 50.0).await?;
    metric_is(
        &a,
        "concord_changes_received_total",
        &[("peer", &id_b)],
        10.0,
    )
    .await?;
    metric_is(
        &b,
        "concord_changes_received_total",
        &[("peer", &id_a)],
        50.0,
    )
    .await?;
    metric_is(&b, "concord_changes_sent_total", &[("peer", &id_a)], 10.0).await?;
    metric_is(&a, "concord_peer_changes_behind", &[("peer", &id_b)], 0.0).await?;
    metric_is(&a, "concord_peer_seconds_behind", &[("peer", &id_b)], 0.0).await?;
    // Every entry B acknowledged is one latency sample on A: 50 in all.
    let latency = "concord_replication_latency_seconds";
    metric_is(&a, &format!("{latency}_count"), &[("peer", &id_b)], 50.0).await?;
    let text = admin(&a)?.metrics().await?;
    let within_10s = metric(
        &text,
        &format!("{latency}_bucket"),
        &[("peer", &id_b), ("le", "10")],
    );
    assert_eq!(within_10s, Some(50.0), "{text}");
    for (name, labels) in [
        (
            "concord_peer_bytes_received_total",
            [("peer", id_b.as_str())],
        ),
        ("concord_peer_bytes_sent_total", [("peer", id_b.as_str())]),
    ] {
        let bytes = metric(&text, name, &labels).context(name)?;
        assert!(bytes > 1000.0, "{name}: {bytes}");
    }
    for (name, want) in [("concord_open_conflicts", 0.0), ("concord_ready", 1.0)] {
        assert_eq!(metric(&text, name, &[]), Some(want), "{name}: {text}");
    }
    for name in [
        "concord_dead_letters",
        "concord_held_deletes",
        "concord_pending_writes",
        "concord_tool_errors_total",
    ] {
        assert_eq!(metric(&text, name, &app), Some(0.0), "{name}: {text}");
    }

    // The JSON status and the CLI tell the same.
    let status = admin(&a)?.status().await?;
    assert!(status.agent.ready);
    assert_eq!(status.agent.peer_id, id_a);
    assert_eq!(status.collections[0].records, 40);
    assert_eq!(
        (status.tools[0].captured, status.tools[0].written),
        (50, 10)
    );
    let peer = &status.peers[0];
    assert_eq!(
        (peer.id.as_str(), peer.connected, peer.changes_behind),
        (id_b.as_str(), true, Some(0))
    );
    let printed = cli(&a, &["status"])?;
    let short: String = id_b.chars().take(12).collect();
    assert!(
        printed
            .lines()
            .any(|l| l.contains(&short) && l.contains("connected") && !l.contains("disconnected")),
        "{printed}"
    );
    assert!(
        printed
            .lines()
            .any(|l| l.split_whitespace().collect::<Vec<_>>() == ["customers", "40", "60"]),
        "{printed}"
    );
    let peers = cli(&a, &["peers"])?;
    assert!(
        peers
            .lines()
            .any(|l| l.starts_with(&id_b) && l.contains(" connected")),
        "{peers}"
    );
    let healthz = reqwest_get(&a, "/healthz").await?;
    assert_eq!(healthz.0, 200, "{}", healthz.1);

    // B stops: A sees it gone, and its edits pile up behind it, with their age.
    pb.signal("TERM", Duration::from_secs(15))?;
    metric_is(&a, "concord_peer_connected", &[("peer", &id_b)], 0.0).await?;
    insert(&a, 50, 55)?;
    metric_is(&a, "concord_peer_changes_behind", &[("peer", &id_b)], 5.0).await?;
    let lag = eventually("the lag to grow past a second", async || {
        let peers = admin(&a)?.peers().await?;
        Ok(peers[0].seconds_behind.filter(|s| *s >= 1.0))
    })
    .await?;
    assert!(lag < 30.0, "{lag}");
    let printed = cli(&a, &["peers"])?;
    assert!(
        printed
            .lines()
            .any(|l| l.starts_with(&id_b) && l.contains("disconnected")),
        "{printed}"
    );
    pa.stop()?;
    Ok(())
}

/// GETs `path` of `node`'s admin API: status and body.
async fn reqwest_get(node: &Node, path: &str) -> anyhow::Result<(u16, String)> {
    let response = reqwest::get(format!("{}{path}", node.admin_url()?)).await?;
    Ok((response.status().as_u16(), response.text().await?))
}

#[tokio::test(flavor = "multi_thread")]
async fn healthz_and_metrics_follow_a_postgres_tool_that_goes_down() -> anyhow::Result<()> {
    let pg = Postgres::start()?;
    pg.create_database("crm")?;
    pg.psql(
        "crm",
        "CREATE TABLE customers (id bigserial PRIMARY KEY, name text, email text, city text, age integer)",
    )?;
    let tmp = tempfile::tempdir()?;
    let mut a = Node::new(tmp.path(), "a")?;
    a.configure_with(
        &free_udp_addr()?,
        &[],
        &pg.tool("crm", "crm", "customers", &COLUMNS),
    )?;
    let pa = Process::start(&a)?;
    assert_eq!(reqwest_get(&a, "/healthz").await?.0, 200);
    pg.stop_server("fast")?;
    let reasons = eventually("healthz to say the tool is down", async || {
        let (status, body) = reqwest_get(&a, "/healthz").await?;
        Ok((status == 503).then_some(body))
    })
    .await?;
    assert!(reasons.contains("tool `crm` is unreachable"), "{reasons}");
    let text = admin(&a)?.metrics().await?;
    let tool = [("tool", "crm")];
    assert_eq!(metric(&text, "concord_tool_up", &tool), Some(0.0), "{text}");
    assert!(
        metric(&text, "concord_tool_errors_total", &tool).is_some_and(|e| e >= 1.0),
        "{text}"
    );
    assert_eq!(metric(&text, "concord_ready", &[]), Some(0.0), "{text}");
    let printed = cli(&a, &["status"])?;
    assert!(
        printed.contains("NOT READY") && printed.contains("DOWN"),
        "{printed}"
    );
    pg.start_server()?;
    eventually("healthz to recover", async || {
        Ok((reqwest_get(&a, "/healthz").await?.0 == 200).then_some(()))
    })
    .await?;
    let activity = admin(&a)?
        .get::<Vec<concord_agent::telemetry::Activity>>("/api/activity")
        .await?;
    assert!(
        activity
            .iter()
            .any(|l| l.message.contains("tool `crm` failed")),
        "{activity:?}"
    );
    assert!(
        activity
            .iter()
            .any(|l| l.message.contains("tool `crm` is reachable again")),
        "{activity:?}"
    );
    pa.stop()?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn json_logs_carry_spans_and_a_first_import_shows_its_progress() -> anyhow::Result<()> {
    let tmp = tempfile::tempdir()?;
    let (a, b) = pair(tmp.path())?;
    insert(&a, 0, 3000)?;
    let log_path = tmp.path().join("a.log");
    let log = std::fs::File::create(&log_path)?;
    let pa = Process::start_with(&a, Some("info"), log, &[], &["--log-format", "json"])?;
    let pb = Process::start(&b)?;
    assert_eq!(converged(&[&a, &b]).await?.len(), 3000);
    pb.signal("TERM", Duration::from_secs(15))?;
    let (status, _) = pa.signal("TERM", Duration::from_secs(15))?;
    assert!(status.success(), "{status}");
    let text = std::fs::read_to_string(&log_path)?;
    let lines: Vec<serde_json::Value> = text
        .lines()
        .map(serde_json::from_str)
        .collect::<Result<_, _>>()
        .with_context(|| format!("every line is JSON: {text}"))?;
    let message = |l: &serde_json::Value| {
        l["fields"]["message"]
            .as_str()
            .unwrap_or_default()
            .to_owned()
    };
    let id_b = b.id().to_string();
    assert!(
        lines
            .iter()
            .any(|l| message(l) == "peer connected" && l["span"]["peer"] == id_b.as_str()),
        "{text}"
    );
    let started = lines
        .iter()
        .find(|l| message(l).starts_with("first import from tool `app`: started"))
        .with_context(|| format!("the import's first line: {text}"))?;
    assert_eq!(started["fields"]["total"], 3000);
    assert_eq!(started["span"]["tool"], "app");
    let done = lines
        .iter()
        .find(|l| message(l).starts_with("first import from tool `app`: done"))
        .with_context(|| format!("the import's last line: {text}"))?;
    assert_eq!(done["fields"]["done"], 3000);
    assert!(
        lines.iter().any(|l| message(l) == "stopped cleanly"),
        "{text}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_under_load_then_a_restart_resends_nothing_and_loses_nothing() -> anyhow::Result<()>
{
    const ROWS: usize = 3000;
    let tmp = tempfile::tempdir()?;
    let (a, b) = pair(tmp.path())?;
    let id_a = a.id().to_string();
    let pa = Process::start(&a)?;
    let pb = Process::start(&b)?;
    // A writer keeps inserting into A's database while A is stopped and restarted.
    // It waits after half the rows until A is about to be stopped, so the stop comes
    // under load however slowly the agents start.
    let (go, resume) = std::sync::mpsc::channel::<()>();
    let writer = {
        let db = a.files.db.clone();
        std::thread::spawn(move || -> anyhow::Result<()> {
            let db = rusqlite::Connection::open(db)?;
            db.busy_timeout(Duration::from_secs(10))?;
            for i in 0..ROWS {
                if i == ROWS / 2 {
                    resume.recv_timeout(Duration::from_secs(60))?;
                }
                db.execute(
                    "INSERT INTO customers (name, email, city, age) VALUES (?1, ?2, 'Oslo', 30)",
                    (format!("c{i}"), format!("c{i}@example.com")),
                )?;
                if i % 100 == 99 {
                    std::thread::sleep(Duration::from_millis(100));
                }
            }
            Ok(())
        })
    };
    eventually("B to receive a third of the rows", async || {
        Ok((b.rows()?.len() >= ROWS / 3).then_some(()))
    })
    .await?;
    go.send(())?;
    let (status, took) = pa.signal("TERM", Duration::from_secs(15))?;
    assert!(status.success(), "SIGTERM: {status}");
    writer
        .join()
        .map_err(|_| anyhow::anyhow!("the writer panicked"))??;
    let pa = Process::start(&a)?;
    assert_eq!(converged(&[&a, &b]).await?.len(), ROWS);
    // Exactly one log entry per insert on each side, each received by B once and
    // written into B once: nothing was resent, nothing lost.
    let records = [("collection", "customers")];
    let rows = ROWS as f64;
    for node in [&a, &b] {
        metric_is(node, "concord_log_head", &records, rows).await?;
        metric_is(node, "concord_records", &records, rows).await?;
    }
    metric_is(
        &b,
        "concord_changes_received_total",
        &[("peer", &id_a)],
        rows,
    )
    .await?;
    metric_is(
        &b,
        "concord_changes_written_total",
        &[("tool", "app")],
        rows,
    )
    .await?;
    metric_is(
        &b,
        "concord_changes_captured_total",
        &[("tool", "app")],
        0.0,
    )
    .await?;
    let (status, _) = pb.signal("INT", Duration::from_secs(15))?;
    assert!(status.success(), "SIGINT: {status}");
    pa.stop()?;
    assert!(took < Duration::from_secs(10), "SIGTERM took {took:?}");
    Ok(())
}
