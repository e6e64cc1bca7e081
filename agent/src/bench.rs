//! `concord bench`: initial sync, the Automerge-only floor, edit latency, sustained
//! single-field updates and wire bytes, measured on real agent processes over QUIC
//! on loopback, printed as figures.
//!
//! The two agents run as separate `concord run` processes so each one's peak RSS is
//! its own; a UDP relay between them counts every byte on the wire. Agent A syncs a
//! SQLite database; agent B a SQLite database or, with `--postgres`, a table in a
//! throwaway PostgreSQL server the benchmark starts itself.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use crdt_model::{Decimal, Edit, Record, RecordDoc, Timestamp, Value};
use rusqlite::Connection;

use crate::demo::AgentFiles;

/// The benchmark table: a key and 10 fields of mixed types.
const SCHEMA: &str = "CREATE TABLE customers (
    id INTEGER PRIMARY KEY,
    name TEXT, email TEXT, city TEXT, country TEXT, phone TEXT,
    balance DECIMAL(12,2), score REAL, visits INTEGER, active BOOLEAN, created TIMESTAMP
)";
const COLUMNS: [&str; 10] = [
    "name", "email", "city", "country", "phone", "balance", "score", "visits", "active", "created",
];
/// Records in the initial sync unless told otherwise.
pub const DEFAULT_RECORDS: usize = 100_000;
/// Single-field edits timed for latency unless told otherwise.
pub const DEFAULT_EDITS: usize = 1_000;
/// How long the initial sync may take at most.
const SYNC_TIMEOUT_S: u64 = 1800;
/// The benchmark table in PostgreSQL.
const PG_SCHEMA: &str = "CREATE TABLE customers (
    id bigint PRIMARY KEY,
    name text, email text, city text, country text, phone text,
    balance numeric(12,2), score double precision, visits integer, active boolean,
    created timestamptz
)";
/// Agent B's table when the benchmark runs through a mapping: the name renamed, the
/// balance in cents, and a label computed from name and city.
const MAPPED_SCHEMA: &str = "CREATE TABLE customers (
    id INTEGER PRIMARY KEY,
    full_name TEXT, email TEXT, city TEXT, country TEXT, phone TEXT,
    balance_cents INTEGER, score REAL, visits INTEGER, active BOOLEAN, created TIMESTAMP,
    label TEXT
)";
/// Agent B's mapping onto [`MAPPED_SCHEMA`]: a rename, a conversion, a CEL filter
/// every sample record passes, and a computed field.
const MAPPED_COLLECTION: &str = r#"[[tool]]
name = "app"
kind = "sqlite"
path = "app.db"

[[tool.collection]]
name = "customers"
table = "customers"
primary_key = "id"
identity = "shared_key"
columns = ["email", "city", "country", "phone", "score", "visits", "active", "created"]
filter = 'visits >= 0'

[[tool.collection.field]]
column = "full_name"
field = "name"

[[tool.collection.field]]
column = "balance_cents"
field = "balance"
convert = "minor_units"

[[tool.collection.field]]
column = "label"
compute = 'name + " (" + city + ")"'
"#;
/// How long one edit may take to arrive at most.
const EDIT_TIMEOUT_MS: u64 = 10_000;
/// How long the sustained updates may take to drain after the writer stopped.
const DRAIN_TIMEOUT_S: u64 = 600;
/// Sustained updates set `visits` to this plus their sequence number, above any
/// sample value.
const VISITS_BASE: i64 = 1_000_000;
/// Shortest pause between two polls of B's whole table.
const POLL_MIN_MS: u64 = 10;
/// A poll of B's whole table (a count, a sum) waits this many times as long as the
/// poll took before the next, so the benchmark's own reads take at most about 5%
/// of a core from the agents it measures (a count of 1,000,000 rows takes tens of
/// milliseconds).
const POLL_SPACING: u32 = 20;

/// Waits after a poll of B's whole table that took `took`.
async fn pause_after(took: Duration) {
    let pause = (took * POLL_SPACING).max(Duration::from_millis(POLL_MIN_MS));
    tokio::time::sleep(pause).await;
}

/// What `concord bench` measures.
#[derive(Debug, Clone, Copy)]
pub struct Options {
    /// Records in the initial sync.
    pub records: usize,
    /// Single-field edits timed for latency.
    pub edits: usize,
    /// How long to run sustained single-field updates (zero: not run).
    pub sustain: Duration,
    /// Sync into PostgreSQL instead of SQLite on agent B.
    pub postgres: bool,
    /// Sync into a SQLite table of other names and types on agent B, through a
    /// mapping with a rename, a conversion, a CEL filter and a computed field.
    pub mapped: bool,
    /// After the sustained updates, run them again in rounds with and without both
    /// agents' `/metrics` scraped at this interval, and print what scraping costs.
    pub scrape: Option<Duration>,
}

/// Rounds of sustained updates with and without scraping, alternated.
const SCRAPE_ROUNDS: usize = 3;

/// Agent B's tool, read by the benchmark.
enum Sink {
    Sqlite {
        db: Connection,
        /// Whether B's table is [`MAPPED_SCHEMA`].
        mapped: bool,
    },
    Postgres {
        client: tokio_postgres::Client,
        _server: crate::pg_server::Postgres,
    },
}

impl Sink {
    fn label(&self) -> &'static str {
        match self {
            Sink::Sqlite { mapped: false, .. } => "SQLite -> SQLite",
            Sink::Sqlite { mapped: true, .. } => {
                "SQLite -> SQLite through a mapping (rename, cents, CEL filter, computed label)"
            }
            Sink::Postgres { .. } => "SQLite -> PostgreSQL",
        }
    }

    async fn count(&self) -> anyhow::Result<i64> {
        Ok(match self {
            Sink::Sqlite { db, .. } => {
                db.query_row("SELECT count(*) FROM customers", [], |r| r.get(0))?
            }
            Sink::Postgres { client, .. } => client
                .query_one("SELECT count(*) FROM customers", &[])
                .await?
                .get(0),
        })
    }

    async fn name(&self, id: i64) -> anyhow::Result<Option<String>> {
        Ok(match self {
            Sink::Sqlite { db, mapped: false } => db
                .prepare_cached("SELECT name FROM customers WHERE id = ?1")?
                .query_row([id], |r| r.get(0))?,
            Sink::Sqlite { db, mapped: true } => db
                .prepare_cached("SELECT full_name FROM customers WHERE id = ?1")?
                .query_row([id], |r| r.get(0))?,
            Sink::Postgres { client, .. } => client
                .query_one("SELECT name FROM customers WHERE id = $1", &[&id])
                .await?
                .get(0),
        })
    }

    /// The sum of `visits` over rows a sustained update reached.
    async fn visits_sum(&self) -> anyhow::Result<i64> {
        Ok(match self {
            Sink::Sqlite { db, .. } => db.query_row(
                "SELECT coalesce(sum(visits), 0) FROM customers WHERE visits >= ?1",
                [VISITS_BASE],
                |r| r.get(0),
            )?,
            Sink::Postgres { client, .. } => client
                .query_one(
                    "SELECT coalesce(sum(visits), 0)::bigint FROM customers WHERE visits >= $1",
                    &[&(VISITS_BASE as i32)],
                )
                .await?
                .get(0),
        })
    }
}

/// Runs the benchmark and prints its figures.
pub async fn run(options: Options) -> anyhow::Result<()> {
    let Options {
        records,
        edits,
        sustain,
        postgres,
        mapped,
        scrape,
    } = options;
    if mapped && postgres {
        bail!("--mapped runs SQLite -> SQLite; drop --postgres");
    }
    let tmp = tempfile::tempdir()?;
    let a = AgentFiles::create(&tmp.path().join("a"), SCHEMA)?;
    let b_schema = if mapped { MAPPED_SCHEMA } else { SCHEMA };
    let b = AgentFiles::create(&tmp.path().join("b"), b_schema)?;
    let rows: Vec<Record> = (0..records).map(sample).collect();
    fill(&a.db, &rows)?;

    let floor_built = floor(&rows, true)?;
    let floor = floor(&rows, false)?;
    let projection = if mapped {
        let config = crate::config::Config::parse(
            Path::new("bench.toml"),
            format!(
                "data_dir = \"d\"\nkey_file = \"k\"\nlisten = \"127.0.0.1:1\"\n\n{MAPPED_COLLECTION}"
            ),
        )?;
        let mapped = crate::mapping::collection_mapping(&config, 0, 0, None)?;
        let columns: Vec<String> = COLUMNS.iter().map(|c| (*c).to_owned()).collect();
        let plain = crate::mapping::Mapping::plain(&columns);
        Some((
            projection_time(&plain, &rows)?,
            projection_time(&mapped, &rows)?,
        ))
    } else {
        None
    };

    let peers = [(a.identity.peer_id(), None)];
    let (b_config, sink) = if postgres {
        let server = crate::pg_server::Postgres::start()?;
        server.create_database("bench")?;
        server.psql("bench", PG_SCHEMA)?;
        let columns: Vec<String> = COLUMNS.iter().map(|c| format!("\"{c}\"")).collect();
        let body = format!(
            "[[tool]]\nname = \"erp\"\nkind = \"postgres\"\nurl = \"{}\"\n\n\
             [[tool.collection]]\nname = \"customers\"\ntable = \"customers\"\n\
             primary_key = \"id\"\ncolumns = [{}]\nidentity = \"shared_key\"\n",
            server.url("bench"),
            columns.join(", ")
        );
        let config = b.config_with("127.0.0.1:0", &peers, &body)?;
        let client = server.connect("bench").await?;
        (
            config,
            Sink::Postgres {
                client,
                _server: server,
            },
        )
    } else {
        let config = if mapped {
            b.config_with("127.0.0.1:0", &peers, MAPPED_COLLECTION)?
        } else {
            b.config("127.0.0.1:0", &peers, &COLUMNS)?
        };
        let db = Connection::open(&b.db)?;
        db.busy_timeout(Duration::from_secs(10))?;
        (config, Sink::Sqlite { db, mapped })
    };
    let mut proc_b = AgentProcess::start(&b_config.path)?;
    let relay = Relay::start(proc_b.addr).await?;
    a.config(
        "127.0.0.1:0",
        &[(b.identity.peer_id(), Some(relay.addr.to_string()))],
        &COLUMNS,
    )?;
    let started = Instant::now();
    let mut proc_a = AgentProcess::start(&a.dir.join("concord.toml"))?;
    loop {
        let asked = Instant::now();
        let n = sink.count().await?;
        if n as usize >= records {
            break;
        }
        if started.elapsed() > Duration::from_secs(SYNC_TIMEOUT_S) {
            bail!("initial sync did not finish within {SYNC_TIMEOUT_S} s ({n} of {records} rows)");
        }
        pause_after(asked.elapsed()).await;
    }
    let sync_time = started.elapsed();
    let sync_bytes = relay.bytes.load(Ordering::Relaxed);
    let rate = records as f64 / sync_time.as_secs_f64();
    let (rss_a, rss_b) = (proc_a.peak_rss_kib()?, proc_b.peak_rss_kib()?);
    // CPU time is steadier than wall time on a shared machine, and says which side
    // costs what.
    let (cpu_a, cpu_b) = (proc_a.cpu_ms()?, proc_b.cpu_ms()?);

    // Edit latency: one field of one row in A, until B's row shows it.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let db_a = Connection::open(&a.db)?;
    db_a.busy_timeout(Duration::from_secs(10))?;
    let bytes_before = relay.bytes.load(Ordering::Relaxed);
    let mut latencies = Vec::with_capacity(edits);
    for i in 0..edits {
        let id = (i % records) as i64;
        let name = format!("edited {i}");
        db_a.execute(
            "UPDATE customers SET name = ?1 WHERE id = ?2",
            rusqlite::params![name, id],
        )?;
        let t0 = Instant::now();
        loop {
            let seen = sink.name(id).await?;
            if seen.as_deref() == Some(name.as_str()) {
                break;
            }
            if t0.elapsed() > Duration::from_millis(EDIT_TIMEOUT_MS) {
                bail!("edit {i} did not arrive within {EDIT_TIMEOUT_MS} ms");
            }
            std::thread::sleep(Duration::from_micros(50));
        }
        latencies.push(t0.elapsed());
    }
    // Let the last acknowledgements cross before counting.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let edit_bytes = relay.bytes.load(Ordering::Relaxed) - bytes_before;
    latencies.sort();
    let pct = |p: f64| {
        latencies
            .get(((latencies.len() as f64 * p) as usize).min(latencies.len().saturating_sub(1)))
    };
    let ms = |d: Option<&Duration>| d.map_or(f64::NAN, |d| d.as_secs_f64() * 1000.0);
    let sustained = if sustain.is_zero() || records == 0 {
        None
    } else {
        Some(sustained_updates(&a.db, &sink, records, sustain).await?)
    };
    let scraping = match scrape {
        Some(every) if !sustain.is_zero() && records > 0 => {
            let configs = [
                crate::config::Config::load(&a.dir.join("concord.toml"))?,
                crate::config::Config::load(&b_config.path)?,
            ];
            let clients = configs
                .iter()
                .map(crate::admin::AdminClient::for_config)
                .collect::<Result<Vec<_>, _>>()?;
            let procs = [&proc_a, &proc_b];
            Some(scrape_cost(&a.db, &sink, records, sustain, every, &clients, procs).await?)
        }
        _ => None,
    };
    let (rss_a_end, rss_b_end) = (proc_a.peak_rss_kib()?, proc_b.peak_rss_kib()?);
    let restart = if records > 0 {
        let config = a.dir.join("concord.toml");
        Some(restart(&mut proc_a, &config, &db_a, &sink, records).await?)
    } else {
        None
    };
    proc_a.stop();
    proc_b.stop();
    let disk_a = Disk::measure(&a.dir.join("data"))?;
    let disk_b = Disk::measure(&b.dir.join("data"))?;
    let json_bytes: usize = rows.iter().enumerate().map(|(i, r)| json_len(i, r)).sum();
    let json_per_record = json_bytes as f64 / records.max(1) as f64;

    let floor_rate = records as f64 / floor_built.as_secs_f64();
    let held_rate = records as f64 / floor.as_secs_f64();
    println!(
        "concord bench: {}, {records} records x 10 fields, {edits} single-field edits, 2 agent processes, QUIC on loopback",
        sink.label()
    );
    println!(
        "initial sync            {:>10.0} records/s  ({:.2} s)",
        rate,
        sync_time.as_secs_f64()
    );
    println!(
        "  bytes on the wire     {:>10} ({:.0} per record)",
        sync_bytes,
        sync_bytes as f64 / records as f64
    );
    let per_record_us = |ms: u64| ms as f64 * 1000.0 / records.max(1) as f64;
    println!(
        "  CPU per record        {:>10.1} µs  (agent A {:.1}, agent B {:.1}; the floor's serial time {:.1})",
        per_record_us(cpu_a + cpu_b),
        per_record_us(cpu_a),
        per_record_us(cpu_b),
        floor_built.as_secs_f64() * 1e6 / records.max(1) as f64
    );
    println!("  peak RSS agent A      {:>10} KiB", rss_a);
    println!("  peak RSS agent B      {:>10} KiB", rss_b);
    println!(
        "automerge-only floor    {:>10.0} records/s  ({:.2} s; each record's document built on both sides)",
        floor_rate,
        floor_built.as_secs_f64()
    );
    println!(
        "  ratio to the floor    {:>10.2}  (goal >= 1.0)",
        rate / floor_rate
    );
    println!(
        "  first changes held    {:>10.0} records/s  ({:.2} s; the agents' way, no document built; ratio {:.2})",
        held_rate,
        floor.as_secs_f64(),
        rate / held_rate
    );
    if let Some((plain, mapped)) = projection {
        let per = |d: Duration| d.as_secs_f64() * 1e6 / records.max(1) as f64;
        println!(
            "  projection per record {:>10.2} µs through the mapping, {:.2} µs plain ({:.1}% of the floor's time per record)",
            per(mapped),
            per(plain),
            (per(mapped) - per(plain)) * 100.0 / per(floor_built)
        );
    }
    println!(
        "edit latency A -> B     p50 {:.2} ms, p99 {:.2} ms  (goal p50 <= 2, p99 <= 10)",
        ms(pct(0.50)),
        ms(pct(0.99))
    );
    println!(
        "wire bytes per update   {:>10.0}  (goal <= 220)",
        edit_bytes as f64 / edits.max(1) as f64
    );
    if let Some((updates, elapsed, writing)) = sustained {
        let floors = update_floor(UPDATE_FLOOR_UPDATES)?;
        let per_s = |took: Duration| UPDATE_FLOOR_UPDATES as f64 / took.as_secs_f64();
        let (floor_rate, held_rate) = (per_s(floors.built), per_s(floors.held));
        let loaded_rate = per_s(floors.loaded);
        let rate = updates as f64 / elapsed.as_secs_f64();
        println!(
            "sustained updates       {:>10.0} updates/s  ({updates} updates written in {:.1} s at {:.0}/s, all in B after {:.1} s; goal >= {})",
            rate,
            writing.as_secs_f64(),
            updates as f64 / writing.as_secs_f64(),
            elapsed.as_secs_f64(),
            if postgres { "5,000" } else { "8,000" },
        );
        println!(
            "  automerge-only floor  {:>10.0} updates/s  (one field edited and applied, documents built and in memory; ratio {:.2})",
            floor_rate,
            rate / floor_rate
        );
        println!(
            "  changes held          {:>10.0} updates/s  (the agents' way, no document built; ratio {:.2})",
            held_rate,
            rate / held_rate
        );
        println!(
            "  loading each document {:>10.0} updates/s  (each loaded from its bytes first, as when the rows updated outgrow every cache; ratio {:.2})",
            loaded_rate,
            rate / loaded_rate
        );
    }
    println!(
        "peak RSS at the end     A {} KiB, B {} KiB  (goal <= 524,288 KiB)",
        rss_a_end, rss_b_end
    );
    if let Some(restart) = restart {
        println!(
            "restart of agent A      {:>10.3} s until it serves peers and its tool  (goal <= 1 s; {records} records)",
            restart.serving.as_secs_f64()
        );
        println!(
            "  first edit after it   {:>10.1} ms from the edit to B ({:.3} s from the restart)",
            restart.edit.as_secs_f64() * 1000.0,
            restart.edit_since_start.as_secs_f64()
        );
        println!("  peak RSS after it     {:>10} KiB", restart.rss_kib);
    }
    println!(
        "record as JSON          {:>10.0} bytes on average",
        json_per_record
    );
    for (name, disk) in [("A", &disk_a), ("B", &disk_b)] {
        disk.print(name, records, json_per_record);
    }
    if let Some(cost) = scraping {
        cost.print();
    }
    drop(sink);
    Ok(())
}

/// Sustained single-field updates: a writer updates `visits` of one row per
/// transaction in A's database, round robin over the rows, as fast as it can for
/// `duration`; the figure is the updates over the time until B holds the last value
/// of every row. Returns the updates, that time, and the writer's own time.
async fn sustained_updates(
    db: &Path,
    sink: &Sink,
    records: usize,
    duration: Duration,
) -> anyhow::Result<(u64, Duration, Duration)> {
    let db = db.to_owned();
    let started = Instant::now();
    let writer = tokio::task::spawn_blocking(move || -> anyhow::Result<(u64, i64, Duration)> {
        let conn = Connection::open(&db)?;
        conn.busy_timeout(Duration::from_secs(10))?;
        // An application's usual setting in WAL mode: no fsync per commit.
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        let mut update = conn.prepare("UPDATE customers SET visits = ?1 WHERE id = ?2")?;
        let mut last = vec![None; records];
        let mut n: u64 = 0;
        let started = Instant::now();
        while started.elapsed() < duration {
            let id = (n % records as u64) as usize;
            let visits = VISITS_BASE + n as i64;
            update.execute(rusqlite::params![visits, id as i64])?;
            last[id] = Some(visits);
            n += 1;
        }
        let expected: i64 = last.iter().flatten().sum();
        Ok((n, expected, started.elapsed()))
    });
    let (updates, expected, writing) = writer.await??;
    loop {
        let asked = Instant::now();
        if sink.visits_sum().await? == expected {
            break;
        }
        if started.elapsed() > duration + Duration::from_secs(DRAIN_TIMEOUT_S) {
            bail!("the sustained updates did not all arrive within {DRAIN_TIMEOUT_S} s");
        }
        pause_after(asked.elapsed()).await;
    }
    Ok((updates, started.elapsed(), writing))
}

/// What scraping `/metrics` costs the sync path, from rounds of sustained updates
/// with and without it.
#[derive(Debug, Default)]
struct ScrapeCost {
    every: Duration,
    /// Per round without and with scraping: updates per second, and both agents'
    /// CPU time per 1,000 updates.
    quiet: Vec<(f64, f64)>,
    scraped: Vec<(f64, f64)>,
    /// Scrapes done, and their answer times.
    scrape_times: Vec<Duration>,
    /// Bytes of the last answer.
    answer_bytes: usize,
    /// The agents' CPU time per scrape, measured on idle agents over many scrapes.
    cpu_per_scrape_ms: f64,
    /// Both agents' CPU time per second of sustained updates.
    sync_cpu_ms_per_s: f64,
}

/// Scrapes in a row for measuring the CPU time of one.
const SCRAPES_TIMED: usize = 500;

impl ScrapeCost {
    fn print(&self) {
        let mean = |v: &[(f64, f64)], f: fn(&(f64, f64)) -> f64| {
            v.iter().map(f).sum::<f64>() / v.len().max(1) as f64
        };
        let (rate_q, cpu_q) = (mean(&self.quiet, |r| r.0), mean(&self.quiet, |r| r.1));
        let (rate_s, cpu_s) = (mean(&self.scraped, |r| r.0), mean(&self.scraped, |r| r.1));
        let mut times = self.scrape_times.clone();
        times.sort();
        let p50 = times.get(times.len() / 2).copied().unwrap_or_default();
        let per_second = 1.0 / self.every.as_secs_f64();
        let scrape_ms_per_s = self.cpu_per_scrape_ms * per_second * 2.0;
        println!(
            "/metrics every {} ms    {:.3} ms of CPU per scrape ({} bytes): {:.2}% of the agents' CPU while syncing flat out (goal < 2%)",
            self.every.as_millis(),
            self.cpu_per_scrape_ms,
            self.answer_bytes,
            scrape_ms_per_s * 100.0 / self.sync_cpu_ms_per_s.max(1.0),
        );
        println!(
            "  under load            {} scrapes of both agents answered in p50 {:.2} ms",
            times.len(),
            p50.as_secs_f64() * 1000.0,
        );
        println!(
            "  sustained updates     {rate_q:>10.0}/s quiet, {rate_s:.0}/s scraped ({:+.1}%), {SCRAPE_ROUNDS} rounds each, alternated",
            (rate_s / rate_q - 1.0) * 100.0
        );
        println!(
            "  agents' CPU per 1,000 updates {cpu_q:.1} ms quiet, {cpu_s:.1} ms scraped ({:+.1}%, round-to-round noise included)",
            (cpu_s / cpu_q - 1.0) * 100.0
        );
    }
}

/// Runs [`SCRAPE_ROUNDS`] rounds of sustained updates without and with both agents'
/// `/metrics` scraped every `every`, alternated, measuring the agents' CPU time.
async fn scrape_cost(
    db: &Path,
    sink: &Sink,
    records: usize,
    sustain: Duration,
    every: Duration,
    clients: &[crate::admin::AdminClient],
    procs: [&AgentProcess; 2],
) -> anyhow::Result<ScrapeCost> {
    let mut cost = ScrapeCost {
        every,
        ..ScrapeCost::default()
    };
    for round in 0..SCRAPE_ROUNDS * 2 {
        let scraped = round % 2 == 1;
        let cpu_before: u64 = procs
            .iter()
            .map(|p| p.cpu_ms())
            .sum::<anyhow::Result<u64>>()?;
        let stop = Arc::new(AtomicBool::new(false));
        let scraper = scraped.then(|| {
            let clients = clients.to_vec();
            let stop = stop.clone();
            tokio::spawn(async move {
                let mut times = Vec::new();
                let mut bytes = 0;
                let mut interval = tokio::time::interval(every);
                while !stop.load(Ordering::Relaxed) {
                    interval.tick().await;
                    for client in &clients {
                        let t0 = Instant::now();
                        bytes = client.metrics().await.map(|m| m.len()).unwrap_or(0);
                        times.push(t0.elapsed());
                    }
                }
                (times, bytes)
            })
        });
        let (updates, elapsed, _) = sustained_updates(db, sink, records, sustain).await?;
        stop.store(true, Ordering::Relaxed);
        if let Some(scraper) = scraper {
            let (times, bytes) = scraper.await?;
            cost.scrape_times.extend(times);
            cost.answer_bytes = bytes;
        }
        let cpu: u64 = procs
            .iter()
            .map(|p| p.cpu_ms())
            .sum::<anyhow::Result<u64>>()?;
        if !scraped {
            cost.sync_cpu_ms_per_s = (cpu - cpu_before) as f64 / elapsed.as_secs_f64();
        }
        let figures = (
            updates as f64 / elapsed.as_secs_f64(),
            (cpu - cpu_before) as f64 * 1000.0 / updates.max(1) as f64,
        );
        if scraped {
            cost.scraped.push(figures);
        } else {
            cost.quiet.push(figures);
        }
    }
    // The CPU time of one scrape, on agents otherwise idle: many in a row, less what
    // the agents spend idle in the same time.
    let cpu = || -> anyhow::Result<u64> { procs.iter().map(|p| p.cpu_ms()).sum() };
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (idle_start, idle_cpu) = (Instant::now(), cpu()?);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let idle_ms_per_s = (cpu()? - idle_cpu) as f64 / idle_start.elapsed().as_secs_f64();
    let (start, before) = (Instant::now(), cpu()?);
    for _ in 0..SCRAPES_TIMED {
        for client in clients {
            client.metrics().await?;
        }
    }
    let spent = (cpu()? - before) as f64 - idle_ms_per_s * start.elapsed().as_secs_f64();
    cost.cpu_per_scrape_ms = spent.max(0.0) / (SCRAPES_TIMED * clients.len()) as f64;
    Ok(cost)
}

/// A sample record: 10 fields of mixed types.
fn sample(i: usize) -> Record {
    let mut r = BTreeMap::new();
    r.insert("name".to_owned(), Value::Text(format!("Customer {i}")));
    r.insert(
        "email".to_owned(),
        Value::Text(format!("customer{i}@example.com")),
    );
    r.insert(
        "city".to_owned(),
        Value::Text(["London", "Paris", "Berlin", "Madrid"][i % 4].to_owned()),
    );
    r.insert(
        "country".to_owned(),
        Value::Text(["UK", "FR", "DE", "ES"][i % 4].to_owned()),
    );
    r.insert(
        "phone".to_owned(),
        Value::Text(format!("+44 20 7946 {:04}", i % 10_000)),
    );
    let cents = (i * 37) % 100_000;
    let balance =
        Decimal::parse(&format!("{}.{:02}", cents / 100, cents % 100)).expect("a decimal");
    r.insert("balance".to_owned(), Value::Decimal(balance));
    r.insert("score".to_owned(), Value::Float((i % 1000) as f64 / 8.0));
    r.insert("visits".to_owned(), Value::Int((i % 500) as i64));
    r.insert("active".to_owned(), Value::Bool(!i.is_multiple_of(3)));
    r.insert(
        "created".to_owned(),
        Value::Timestamp(Timestamp::from_micros(
            1_700_000_000_000_000 + i as i64 * 1_000_000,
        )),
    );
    r
}

fn fill(db: &Path, rows: &[Record]) -> anyhow::Result<()> {
    let mut conn = Connection::open(db)?;
    let tx = conn.transaction()?;
    {
        let mut insert = tx.prepare(
            "INSERT INTO customers (id, name, email, city, country, phone, balance, score, visits, active, created)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)",
        )?;
        for (i, r) in rows.iter().enumerate() {
            let text = |k: &str| match &r[k] {
                Value::Text(s) => s.clone(),
                other => other.to_string(),
            };
            let (
                Value::Float(score),
                Value::Int(visits),
                Value::Bool(active),
                Value::Timestamp(created),
            ) = (&r["score"], &r["visits"], &r["active"], &r["created"])
            else {
                bail!("a sample record of the wrong shape");
            };
            let created = chrono::DateTime::from_timestamp_micros(created.micros())
                .context("timestamp out of range")?
                .format("%Y-%m-%dT%H:%M:%S%.6fZ")
                .to_string();
            insert.execute(rusqlite::params![
                i as i64,
                text("name"),
                text("email"),
                text("city"),
                text("country"),
                text("phone"),
                text("balance"),
                score,
                visits,
                active,
                created,
            ])?;
        }
    }
    tx.commit()?;
    Ok(())
}

/// The time to project every row through `mapping` into what a tool holds, as the
/// receiving agent does for each record it writes back (filter, conversions,
/// computed columns, and the columns to write).
fn projection_time(mapping: &crate::mapping::Mapping, rows: &[Record]) -> anyhow::Result<Duration> {
    let start = Instant::now();
    for row in rows {
        let state = crdt_model::RecordState {
            fields: row.clone(),
            ..crdt_model::RecordState::default()
        };
        if let crate::mapping::Projection::Held(target) = mapping.project(&state)? {
            std::hint::black_box(mapping.writes(&target, &state.fields, None));
        }
    }
    Ok(start.elapsed())
}

/// The Automerge-only floor: make each record's document and its change, then apply
/// the change into a second document set. With `built`, both documents are built as
/// Automerge documents (what a program using Automerge holds); without, they go the
/// agents' own way, where a record's first change is held and read without building
/// its document.
fn floor(rows: &[Record], built: bool) -> anyhow::Result<Duration> {
    let start = Instant::now();
    let mut changes = Vec::with_capacity(rows.len());
    for (i, r) in rows.iter().enumerate() {
        let mut doc = RecordDoc::new(&[1; 16]);
        let edit = Edit {
            fields: r.clone(),
            external_id: Some(("a".into(), i.to_string())),
            deleted: Some(false),
            reset: false,
            time_ms: 0,
            // The agent's own edits record where they came from: so does the floor.
            provenance: Some(crdt_model::Provenance {
                agent: "abcdefgh".into(),
                tool: "sqlite".into(),
                decision: None,
            }),
        };
        changes.push(
            doc.edit("customers", &i.to_string(), &edit)?
                .context("a new record makes a change")?,
        );
        if built {
            doc.automerge();
        }
    }
    for change in changes {
        let mut doc = RecordDoc::new(&[2; 16]);
        doc.apply(&[change])?;
        if built {
            doc.automerge();
        }
    }
    Ok(start.elapsed())
}

/// A `concord run` child process.
struct AgentProcess {
    child: Child,
    addr: SocketAddr,
}

impl AgentProcess {
    fn start(config: &Path) -> anyhow::Result<AgentProcess> {
        let mut child = Command::new(std::env::current_exe()?)
            .args(["run", "--config"])
            .arg(config)
            .env(
                "RUST_LOG",
                std::env::var("CONCORD_BENCH_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()?;
        let mut line = String::new();
        BufReader::new(child.stdout.take().context("agent stdout")?).read_line(&mut line)?;
        let addr = line.trim().rsplit(' ').next().unwrap_or_default().parse();
        match addr {
            Ok(addr) => Ok(AgentProcess { child, addr }),
            Err(_) => {
                let _ = child.kill();
                bail!("the agent did not start: {line:?}")
            }
        }
    }

    /// The process's CPU time so far (user and system), in milliseconds.
    fn cpu_ms(&self) -> anyhow::Result<u64> {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.child.id()))?;
        // The fields after the command name (which may hold spaces) are plain.
        let fields: Vec<&str> = stat
            .rsplit_once(')')
            .context("no command name")?
            .1
            .split_whitespace()
            .collect();
        let ticks: u64 = fields.get(11).context("utime")?.parse::<u64>()?
            + fields.get(12).context("stime")?.parse::<u64>()?;
        // Linux reports them in clock ticks of 1/100 s (USER_HZ).
        Ok(ticks * 10)
    }

    /// The process's peak resident set (VmHWM), in KiB.
    fn peak_rss_kib(&self) -> anyhow::Result<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))?;
        let line = status
            .lines()
            .find(|l| l.starts_with("VmHWM:"))
            .context("no VmHWM")?;
        Ok(line
            .split_whitespace()
            .nth(1)
            .context("VmHWM value")?
            .parse()?)
    }

    fn stop(&mut self) {
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status();
        let _ = self.child.wait();
    }
}

impl Drop for AgentProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A UDP relay in front of one agent that counts the bytes crossing it.
struct Relay {
    addr: SocketAddr,
    bytes: Arc<AtomicU64>,
}

impl Relay {
    async fn start(target: SocketAddr) -> anyhow::Result<Relay> {
        let front = tokio::net::UdpSocket::bind("127.0.0.1:0").await?;
        let back = tokio::net::UdpSocket::bind("127.0.0.1:0").await?;
        back.connect(target).await?;
        let addr = front.local_addr()?;
        let bytes = Arc::new(AtomicU64::new(0));
        let counter = bytes.clone();
        tokio::spawn(async move {
            let (mut up, mut down) = (vec![0u8; 65536], vec![0u8; 65536]);
            let mut client = None;
            loop {
                tokio::select! {
                    Ok((n, from)) = front.recv_from(&mut up) => {
                        client = Some(from);
                        counter.fetch_add(n as u64, Ordering::Relaxed);
                        let _ = back.send(&up[..n]).await;
                    }
                    Ok(n) = back.recv(&mut down) => {
                        counter.fetch_add(n as u64, Ordering::Relaxed);
                        if let Some(client) = client {
                            let _ = front.send_to(&down[..n], client).await;
                        }
                    }
                    else => return,
                }
            }
        });
        Ok(Relay { addr, bytes })
    }
}

/// Updates timed for the Automerge-only floor of sustained updates.
const UPDATE_FLOOR_UPDATES: usize = 50_000;
/// Documents the update floor edits round robin.
const UPDATE_FLOOR_DOCS: usize = 1_000;

/// The floors of sustained updates, each `updates` long.
struct UpdateFloors {
    /// Round robin over documents in memory, each one's Automerge document built.
    built: Duration,
    /// The same, the agents' way: changes held in one line, no document built.
    held: Duration,
    /// Over documents loaded from their bytes for each update (the bytes grow by
    /// the change, as a store appends it).
    loaded: Duration,
}

/// The floors of sustained updates: one field of a document edited and the change
/// applied to its replica, round robin over documents in memory (built, then held
/// as the agents hold them), then over documents loaded from their bytes for each
/// update.
fn update_floor(updates: usize) -> anyhow::Result<UpdateFloors> {
    let provenance = crdt_model::Provenance {
        agent: "abcdefgh".into(),
        tool: "sqlite".into(),
        decision: None,
    };
    let edit = |fields: Record| Edit {
        fields,
        external_id: None,
        deleted: None,
        reset: false,
        time_ms: 0,
        provenance: Some(provenance.clone()),
    };
    let mut docs = Vec::with_capacity(UPDATE_FLOOR_DOCS);
    for i in 0..UPDATE_FLOOR_DOCS {
        let (mut source, mut replica) = (RecordDoc::new(&[1; 16]), RecordDoc::new(&[2; 16]));
        let change = source
            .edit("customers", &i.to_string(), &edit(sample(i)))?
            .context("a new record makes a change")?;
        replica.apply(&[change])?;
        docs.push((source, replica));
    }
    let visits =
        |n: usize| BTreeMap::from([("visits".to_owned(), Value::Int(VISITS_BASE + n as i64))]);
    let round = |docs: &mut [(RecordDoc, RecordDoc)], offset: usize| -> anyhow::Result<Duration> {
        let start = Instant::now();
        for n in offset..offset + updates {
            let (source, replica) = &mut docs[n % UPDATE_FLOOR_DOCS];
            let change = source
                .edit("customers", "", &edit(visits(n)))?
                .context("a new value makes a change")?;
            replica.apply(&[change])?;
        }
        Ok(start.elapsed())
    };
    let held = round(&mut docs, 0)?;
    for (source, replica) in &mut docs {
        source.automerge();
        replica.automerge();
    }
    let built = round(&mut docs, updates)?;
    // Each document stored as bytes and loaded for its update, as when the records
    // updated are far more than any cache holds.
    let mut stored: Vec<(Vec<u8>, Vec<u8>)> = docs
        .iter_mut()
        .map(|(source, replica)| (source.save(), replica.save()))
        .collect();
    drop(docs);
    let start = Instant::now();
    for n in 0..updates {
        let (source_bytes, replica_bytes) = &mut stored[n % UPDATE_FLOOR_DOCS];
        let mut source = RecordDoc::load(source_bytes, &[1; 16])?;
        let change = source
            .edit("customers", "", &edit(visits(n)))?
            .context("a new value makes a change")?;
        let mut replica = RecordDoc::load(replica_bytes, &[2; 16])?;
        replica.apply(std::slice::from_ref(&change))?;
        source_bytes.extend_from_slice(&change);
        replica_bytes.extend_from_slice(&change);
    }
    Ok(UpdateFloors {
        built,
        held,
        loaded: start.elapsed(),
    })
}

/// What a restart of an agent holding every record costs.
struct Restart {
    /// From the start of the process until it serves peers and its tool (its store,
    /// tool and endpoint open: the line naming its address).
    serving: Duration,
    /// From an edit made once it serves until B holds it.
    edit: Duration,
    /// From the start of the process until B holds that edit.
    edit_since_start: Duration,
    /// Peak RSS of the restarted agent after the edit.
    rss_kib: u64,
}

/// Stops agent A, starts it again on the same store and database, and times it
/// until it serves and until an edit made then arrives in B.
async fn restart(
    proc: &mut AgentProcess,
    config: &Path,
    db: &Connection,
    sink: &Sink,
    records: usize,
) -> anyhow::Result<Restart> {
    // Updates coalesce per row: B can hold every row's last value while A still
    // walks outbox entries of rows it already captured. Let A finish them first, so
    // the edit after the restart does not queue behind them.
    let drain = Instant::now();
    while db.query_row("SELECT COUNT(*) FROM _concord_outbox", [], |row| {
        row.get::<_, i64>(0)
    })? > 0
    {
        if drain.elapsed() > Duration::from_secs(DRAIN_TIMEOUT_S) {
            bail!("agent A did not drain its outbox within {DRAIN_TIMEOUT_S} s");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    proc.stop();
    let started = Instant::now();
    *proc = AgentProcess::start(config)?;
    let serving = started.elapsed();
    let id = (records / 2) as i64;
    let name = "edited after a restart";
    db.execute(
        "UPDATE customers SET name = ?1 WHERE id = ?2",
        rusqlite::params![name, id],
    )?;
    let edited = Instant::now();
    loop {
        if sink.name(id).await?.as_deref() == Some(name) {
            break;
        }
        if edited.elapsed() > Duration::from_millis(EDIT_TIMEOUT_MS) {
            bail!("the edit after a restart did not arrive within {EDIT_TIMEOUT_MS} ms");
        }
        std::thread::sleep(Duration::from_micros(200));
    }
    Ok(Restart {
        serving,
        edit: edited.elapsed(),
        edit_since_start: started.elapsed(),
        rss_kib: proc.peak_rss_kib()?,
    })
}

/// An agent's store on disk, as left by the agent and after compaction.
struct Disk {
    /// Bytes in the data folder as the agent left it (journals included).
    left: u64,
    /// Each keyspace's bytes after its memtable is flushed and it is compacted.
    compacted: Vec<(&'static str, u64)>,
}

impl Disk {
    /// Measures the store in `dir` (no agent may hold it), then compacts it.
    fn measure(dir: &Path) -> anyhow::Result<Disk> {
        let left = dir_bytes(dir)?;
        let mut store = crate::store::Store::open(dir)?;
        let compacted = store.compact()?;
        Ok(Disk { left, compacted })
    }

    fn print(&self, agent: &str, records: usize, json_per_record: f64) {
        let per = |bytes: u64| bytes as f64 / records.max(1) as f64;
        let total: u64 = self.compacted.iter().map(|(_, b)| b).sum();
        println!(
            "disk of agent {agent}         {:>10.0} bytes per record as left, {:.0} after compaction ({:.2}x the JSON; goal <= 1.5x)",
            per(self.left),
            per(total),
            per(total) / json_per_record
        );
        let parts: Vec<String> = self
            .compacted
            .iter()
            .filter(|(_, bytes)| per(*bytes) >= 1.0)
            .map(|(name, bytes)| format!("{name} {:.0}", per(*bytes)))
            .collect();
        println!("  per record by keyspace  {}", parts.join(", "));
    }
}

/// The bytes of the files under `dir`.
fn dir_bytes(dir: &Path) -> anyhow::Result<u64> {
    let mut total = 0;
    for entry in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let entry = entry?;
        let meta = entry.metadata()?;
        total += if meta.is_dir() {
            dir_bytes(&entry.path())?
        } else {
            meta.len()
        };
    }
    Ok(total)
}

/// The length of record `i` as an application's JSON object: its id and fields,
/// numbers as numbers and times in RFC 3339.
fn json_len(i: usize, record: &Record) -> usize {
    let mut object = serde_json::Map::new();
    object.insert("id".into(), serde_json::Value::from(i));
    for (name, value) in record {
        let json = match value {
            Value::Bool(b) => serde_json::Value::Bool(*b),
            Value::Int(n) => serde_json::Value::from(*n),
            Value::Float(f) => serde_json::Value::from(*f),
            Value::Decimal(d) => d
                .to_string()
                .parse::<f64>()
                .map_or(serde_json::Value::Null, serde_json::Value::from),
            Value::Timestamp(t) => chrono::DateTime::from_timestamp_micros(t.micros()).map_or(
                serde_json::Value::Null,
                |t| {
                    serde_json::Value::String(
                        t.to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true),
                    )
                },
            ),
            other => serde_json::Value::String(other.to_string()),
        };
        object.insert(name.clone(), json);
    }
    serde_json::Value::Object(object).to_string().len()
}
