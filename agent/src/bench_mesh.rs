//! `concord bench --mesh N`: one edit fanned out through a full mesh of N in-process
//! agents, printed as figures.
//!
//! N agents run in this process, each with its own key, store and SQLite database in
//! a temporary folder, every one trusting all the others: N x (N-1) / 2 QUIC
//! connections on loopback, each dialled once (agent i dials the agents of higher
//! index and accepts the others). Agent 0's database holds the records before the
//! agents start; once every database holds them all, single-field edits in agent 0's
//! database are timed until each other database shows them.
//!
//! Arrival times are found by polling the databases in turn, so they are as fine as
//! one sweep over them (a few tens of microseconds per database) plus
//! [`POLL_INTERVAL_US`].

use std::net::UdpSocket;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use rusqlite::{Connection, OptionalExtension};

use crate::agent::{self, RunningAgent};
use crate::demo::{AgentFiles, CUSTOMERS_SCHEMA};
use crate::identity::PeerId;

/// The synced columns of [`CUSTOMERS_SCHEMA`].
const COLUMNS: [&str; 5] = ["name", "email", "city", "balance", "updated"];
/// The cities of the sample customers.
const CITIES: [&str; 4] = ["London", "Paris", "Berlin", "Madrid"];
/// Agents in the mesh unless told otherwise.
pub const DEFAULT_AGENTS: usize = 32;
/// Records in agent 0's database unless told otherwise.
pub const DEFAULT_RECORDS: usize = 1_000;
/// Timed edits unless told otherwise.
pub const DEFAULT_EDITS: usize = 200;
/// How long the initial sync to every agent may take at most.
const SYNC_TIMEOUT_S: u64 = 120;
/// How often the initial sync is checked.
const SYNC_POLL_MS: u64 = 10;
/// How long every agent may take to be connected to all the others at most, once
/// the initial sync is done.
const MESH_TIMEOUT_S: u64 = 30;
/// How long the agents settle between the initial sync and the first edit.
const SETTLE_MS: u64 = 500;
/// How long one edit may take to reach every agent at most.
const EDIT_TIMEOUT_MS: u64 = 10_000;
/// The pause between two sweeps over the databases while an edit travels: a sweep
/// reads every database, so sweeping more often takes a good part of a core from
/// the agents measured.
const POLL_INTERVAL_US: u64 = 1_000;
/// The pause after an edit reached every agent, so that edits are independent.
const EDIT_SPACING_MS: u64 = 20;
/// How long the benchmark's own SQLite connections wait for a lock at most.
const BUSY_TIMEOUT_MS: u64 = 10_000;
/// The query that reads one customer's name.
const NAME_QUERY: &str = "SELECT name FROM customers WHERE id = ?1";

/// What `concord bench --mesh` measures.
#[derive(Debug, Clone, Copy)]
pub struct MeshOptions {
    /// Agents in the full mesh (at least 2).
    pub agents: usize,
    /// Records in agent 0's database, synced to all the others first.
    pub records: usize,
    /// Single-field edits in agent 0's database, timed until every agent shows them.
    pub edits: usize,
}

impl Default for MeshOptions {
    fn default() -> MeshOptions {
        MeshOptions {
            agents: DEFAULT_AGENTS,
            records: DEFAULT_RECORDS,
            edits: DEFAULT_EDITS,
        }
    }
}

/// What the benchmark measured, printed once the agents stopped.
#[derive(Debug)]
struct Report {
    /// The time from the first agent's start until the last one started.
    start_time: Duration,
    /// The time from the first agent's start until every database held every record.
    sync_time: Duration,
    /// Per edit, the time until each other agent (1 to N-1, in order) showed it.
    arrivals: Vec<Vec<Duration>>,
    /// The process's peak resident set (VmHWM), in KiB.
    peak_rss_kib: u64,
}

/// Runs the benchmark and prints its figures.
pub async fn run(options: MeshOptions) -> anyhow::Result<()> {
    let MeshOptions {
        agents: n,
        records,
        edits: _,
    } = options;
    if n < 2 {
        bail!("a mesh needs at least 2 agents, not {n}");
    }
    if records == 0 {
        bail!("the mesh benchmark needs at least 1 record to edit");
    }
    let tmp = tempfile::tempdir().context("creating a temporary directory")?;
    let files = (0..n)
        .map(|k| {
            AgentFiles::create(&tmp.path().join(format!("agent{k}")), CUSTOMERS_SCHEMA)
                .with_context(|| format!("creating agent {k}'s key and database"))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    fill(&files[0].db, records).context("filling agent 0's database")?;

    let ports = free_ports(n)?;
    let mut configs = Vec::with_capacity(n);
    for (i, own) in files.iter().enumerate() {
        // Agent i dials the agents of higher index and accepts the others: every
        // pair is connected once.
        let peers: Vec<(PeerId, Option<String>)> = files
            .iter()
            .enumerate()
            .filter(|(j, _)| *j != i)
            .map(|(j, other)| {
                (
                    other.identity.peer_id(),
                    (j > i).then(|| format!("127.0.0.1:{}", ports[j])),
                )
            })
            .collect();
        let config = own
            .config(&format!("127.0.0.1:{}", ports[i]), &peers, &COLUMNS)
            .with_context(|| format!("writing agent {i}'s config"))?;
        configs.push(config);
    }

    // The highest index first: each agent starts after every agent it dials.
    let started = Instant::now();
    let mut running = Vec::with_capacity(n);
    for (k, config) in configs.into_iter().enumerate().rev() {
        match agent::start(config)
            .await
            .with_context(|| format!("starting agent {k}"))
        {
            Ok(started_agent) => running.push(started_agent),
            Err(e) => {
                stop(running).await;
                return Err(e);
            }
        }
    }
    running.reverse();
    let start_time = started.elapsed();

    let measured = measure(&running, &files, options, started, start_time).await;
    let stopping = Instant::now();
    stop(running).await;
    let stop_time = stopping.elapsed();
    let report = measured?;
    report.print(options, stop_time);
    drop(tmp);
    Ok(())
}

/// Waits for the initial sync and the full mesh, then times the edits.
async fn measure(
    agents: &[RunningAgent],
    files: &[AgentFiles],
    options: MeshOptions,
    started: Instant,
    start_time: Duration,
) -> anyhow::Result<Report> {
    let MeshOptions { records, edits, .. } = options;
    let mut dbs = Vec::with_capacity(files.len());
    for (k, f) in files.iter().enumerate() {
        let db = Connection::open(&f.db)
            .with_context(|| format!("opening agent {k}'s database {}", f.db.display()))?;
        db.busy_timeout(Duration::from_millis(BUSY_TIMEOUT_MS))
            .with_context(|| format!("setting the busy timeout of agent {k}'s database"))?;
        dbs.push(db);
    }
    initial_sync(&dbs, records).await?;
    let sync_time = started.elapsed();
    full_mesh(agents).await?;
    tokio::time::sleep(Duration::from_millis(SETTLE_MS)).await;

    let mut dbs = dbs.into_iter();
    let source = dbs.next().context("agent 0's database")?;
    let others: Vec<Connection> = dbs.collect();
    let arrivals = tokio::task::spawn_blocking(move || fan_out(&source, &others, records, edits))
        .await
        .context("the edit loop did not finish")??;
    Ok(Report {
        start_time,
        sync_time,
        arrivals,
        peak_rss_kib: peak_rss_kib()?,
    })
}

/// Waits until every database holds `records` customers, up to [`SYNC_TIMEOUT_S`].
async fn initial_sync(dbs: &[Connection], records: usize) -> anyhow::Result<()> {
    let want = records as i64;
    let deadline = Instant::now() + Duration::from_secs(SYNC_TIMEOUT_S);
    loop {
        let mut lagging = Vec::new();
        for (k, db) in dbs.iter().enumerate() {
            let held: i64 = db
                .query_row("SELECT count(*) FROM customers", [], |r| r.get(0))
                .with_context(|| format!("counting agent {k}'s customers"))?;
            if held < want {
                lagging.push(format!("agent {k} holds {held}"));
            }
        }
        if lagging.is_empty() {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!(
                "the initial sync of {records} records did not reach every agent within {SYNC_TIMEOUT_S} s: {}",
                lagging.join(", ")
            );
        }
        tokio::time::sleep(Duration::from_millis(SYNC_POLL_MS)).await;
    }
}

/// Waits until every agent is connected to all the others, up to [`MESH_TIMEOUT_S`].
async fn full_mesh(agents: &[RunningAgent]) -> anyhow::Result<()> {
    let others = agents.len().saturating_sub(1);
    let deadline = Instant::now() + Duration::from_secs(MESH_TIMEOUT_S);
    loop {
        let short: Vec<String> = agents
            .iter()
            .enumerate()
            .map(|(k, a)| (k, a.connected_peers().len()))
            .filter(|(_, connected)| *connected < others)
            .map(|(k, connected)| format!("agent {k} has {connected}"))
            .collect();
        if short.is_empty() {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!(
                "the agents were not all connected to their {others} peers within {MESH_TIMEOUT_S} s: {}",
                short.join(", ")
            );
        }
        tokio::time::sleep(Duration::from_millis(SYNC_POLL_MS)).await;
    }
}

/// Makes `edits` single-field edits in `source` (agent 0's database), one after the
/// other, and returns per edit the time from its commit until each database of
/// `others` showed it. Blocks: it polls every [`POLL_INTERVAL_US`].
fn fan_out(
    source: &Connection,
    others: &[Connection],
    records: usize,
    edits: usize,
) -> anyhow::Result<Vec<Vec<Duration>>> {
    let mut samples = Vec::with_capacity(edits);
    for i in 0..edits {
        let id = (i % records) as i64;
        let name = format!("edited {i}");
        source
            .execute(
                "UPDATE customers SET name = ?1 WHERE id = ?2",
                rusqlite::params![name, id],
            )
            .with_context(|| format!("edit {i}: updating customer {id} in agent 0"))?;
        let t0 = Instant::now();
        let mut arrived: Vec<Option<Duration>> = vec![None; others.len()];
        loop {
            for (k, (db, seen)) in others.iter().zip(arrived.iter_mut()).enumerate() {
                if seen.is_some() {
                    continue;
                }
                let value = name_of(db, id).with_context(|| {
                    format!("edit {i}: reading customer {id} in agent {}", k + 1)
                })?;
                if value.as_deref() == Some(name.as_str()) {
                    *seen = Some(t0.elapsed());
                }
            }
            if arrived.iter().all(Option::is_some) {
                break;
            }
            if t0.elapsed() > Duration::from_millis(EDIT_TIMEOUT_MS) {
                let missing: Vec<String> = arrived
                    .iter()
                    .enumerate()
                    .filter(|(_, seen)| seen.is_none())
                    .map(|(k, _)| (k + 1).to_string())
                    .collect();
                bail!(
                    "edit {i} (customer {id}) did not reach agents {} within {EDIT_TIMEOUT_MS} ms",
                    missing.join(", ")
                );
            }
            std::thread::sleep(Duration::from_micros(POLL_INTERVAL_US));
        }
        samples.push(
            arrived
                .into_iter()
                .collect::<Option<Vec<_>>>()
                .with_context(|| format!("edit {i}: an arrival went unrecorded"))?,
        );
        std::thread::sleep(Duration::from_millis(EDIT_SPACING_MS));
    }
    Ok(samples)
}

/// The name of customer `id` in `db` (`None` for a missing row or a null name).
fn name_of(db: &Connection, id: i64) -> rusqlite::Result<Option<String>> {
    Ok(db
        .prepare_cached(NAME_QUERY)?
        .query_row([id], |r| r.get::<_, Option<String>>(0))
        .optional()?
        .flatten())
}

/// Fills `db` with `records` sample customers, ids 0 to `records - 1`.
fn fill(db: &Path, records: usize) -> anyhow::Result<()> {
    let mut conn = Connection::open(db)?;
    let tx = conn.transaction()?;
    {
        let mut insert = tx.prepare(
            "INSERT INTO customers (id, name, email, city, balance, updated)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
        )?;
        for i in 0..records {
            let cents = (i * 37) % 100_000;
            insert.execute(rusqlite::params![
                i as i64,
                format!("Customer {i}"),
                format!("customer{i}@example.com"),
                CITIES[i % CITIES.len()],
                format!("{}.{:02}", cents / 100, cents % 100),
                format!(
                    "2026-11-{:02}T{:02}:{:02}:00Z",
                    1 + (i / 1440) % 28,
                    (i / 60) % 24,
                    i % 60
                ),
            ])?;
        }
    }
    tx.commit()?;
    Ok(())
}

/// `n` distinct free loopback UDP ports: bound all at once, then released for the
/// agents to bind.
fn free_ports(n: usize) -> anyhow::Result<Vec<u16>> {
    let sockets = (0..n)
        .map(|_| UdpSocket::bind("127.0.0.1:0"))
        .collect::<Result<Vec<_>, _>>()
        .context("binding a loopback UDP socket to find a free port")?;
    let ports = sockets
        .iter()
        .map(|s| s.local_addr().map(|a| a.port()))
        .collect::<Result<Vec<_>, _>>()
        .context("reading a loopback UDP socket's port")?;
    drop(sockets);
    Ok(ports)
}

/// Stops the agents one after the other.
async fn stop(agents: Vec<RunningAgent>) {
    for agent in agents {
        agent.shutdown().await;
    }
}

/// This process's peak resident set (VmHWM), in KiB.
fn peak_rss_kib() -> anyhow::Result<u64> {
    let status =
        std::fs::read_to_string("/proc/self/status").context("reading /proc/self/status")?;
    let line = status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .context("no VmHWM in /proc/self/status")?;
    line.split_whitespace()
        .nth(1)
        .context("no VmHWM value")?
        .parse::<u64>()
        .context("VmHWM is not a number")
}

/// The `p` quantile of `sorted` (`None` when empty).
fn percentile(sorted: &[Duration], p: f64) -> Option<Duration> {
    let last = sorted.len().checked_sub(1)?;
    sorted
        .get(((sorted.len() as f64 * p) as usize).min(last))
        .copied()
}

/// A duration in milliseconds (NaN for none).
fn ms(d: Option<Duration>) -> f64 {
    d.map_or(f64::NAN, |d| d.as_secs_f64() * 1000.0)
}

impl Report {
    /// Prints the figures, aligned as `concord bench` prints its own.
    fn print(&self, options: MeshOptions, stop_time: Duration) {
        let MeshOptions {
            agents: n,
            records,
            edits,
        } = options;
        let mut to_all: Vec<Duration> = self
            .arrivals
            .iter()
            .filter_map(|edit| edit.iter().max().copied())
            .collect();
        to_all.sort();
        let mut each: Vec<Duration> = self.arrivals.iter().flatten().copied().collect();
        each.sort();
        // The agent whose p99 arrival is the highest.
        let slowest = (0..n.saturating_sub(1))
            .filter_map(|k| {
                let mut times: Vec<Duration> = self
                    .arrivals
                    .iter()
                    .filter_map(|e| e.get(k).copied())
                    .collect();
                times.sort();
                percentile(&times, 0.99).map(|p99| (k + 1, p99))
            })
            .max_by_key(|(_, p99)| *p99);

        println!(
            "concord bench --mesh: {n} agents in one process, full mesh, QUIC on loopback, {records} records x {} fields, {edits} single-field edits in agent 0",
            COLUMNS.len()
        );
        println!("agents                  {n:>10}");
        println!(
            "QUIC connections        {:>10}  (N x (N-1) / 2, each pair dialled once, all up)",
            n * (n - 1) / 2
        );
        println!(
            "initial sync to all     {:>10.2} s  ({records} records from agent 0 to {} agents; all started in {:.2} s)",
            self.sync_time.as_secs_f64(),
            n - 1,
            self.start_time.as_secs_f64()
        );
        println!(
            "edit fan-out to all     p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms  (goal p99 <= 50 ms to all 32)",
            ms(percentile(&to_all, 0.50)),
            ms(percentile(&to_all, 0.99)),
            ms(to_all.last().copied())
        );
        println!(
            "  per-agent arrival     p50 {:.2} ms, p99 {:.2} ms  ({} samples: {} agents x {} edits)",
            ms(percentile(&each, 0.50)),
            ms(percentile(&each, 0.99)),
            each.len(),
            n - 1,
            self.arrivals.len()
        );
        if let Some((k, p99)) = slowest {
            println!(
                "  slowest agent         agent {k}, p99 {:.2} ms",
                ms(Some(p99))
            );
        }
        println!(
            "peak RSS                {:>10} KiB  ({:.0} KiB per agent, the whole process over {n})",
            self.peak_rss_kib,
            self.peak_rss_kib as f64 / n as f64
        );
        println!(
            "agents stopped in       {:>10.2} s",
            stop_time.as_secs_f64()
        );
    }
}
