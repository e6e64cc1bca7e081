//! `concord demo`: two agents on loopback keep two sample SQLite databases in sync.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use rusqlite::Connection;

use crate::agent;
use crate::config::Config;
use crate::identity::{Identity, PeerId};

/// The sample schema: customers with text, decimal and timestamp columns.
pub const CUSTOMERS_SCHEMA: &str = "CREATE TABLE IF NOT EXISTS customers (
    id INTEGER PRIMARY KEY,
    name TEXT,
    email TEXT,
    city TEXT,
    balance DECIMAL(12,2),
    updated TIMESTAMP
)";

/// How long the demo waits for the databases to converge at most.
pub const CONVERGE_TIMEOUT_MS: u64 = 20_000;

/// One agent's files in a folder: its key, config and database.
#[derive(Debug)]
pub struct AgentFiles {
    /// The folder.
    pub dir: PathBuf,
    /// The agent's identity.
    pub identity: Identity,
    /// The SQLite database.
    pub db: PathBuf,
}

impl AgentFiles {
    /// Creates `dir` with a fresh key and an empty database holding `schema`.
    pub fn create(dir: &Path, schema: &str) -> anyhow::Result<AgentFiles> {
        std::fs::create_dir_all(dir)?;
        let identity = Identity::generate()?;
        identity.save(&dir.join("concord.key"))?;
        let db = dir.join("app.db");
        Connection::open(&db)?.execute_batch(schema)?;
        Ok(AgentFiles {
            dir: dir.to_owned(),
            identity,
            db,
        })
    }

    /// Writes the config (listening on `listen`, trusting `peers` as (id, address to
    /// dial)) syncing the `customers` table, and returns it loaded.
    pub fn config(
        &self,
        listen: &str,
        peers: &[(PeerId, Option<String>)],
        columns: &[&str],
    ) -> anyhow::Result<Config> {
        let columns: Vec<String> = columns.iter().map(|c| format!("\"{c}\"")).collect();
        let tool = format!(
            "[[tool]]\nname = \"app\"\nkind = \"sqlite\"\npath = \"app.db\"\n\n[[tool.collection]]\nname = \"customers\"\ntable = \"customers\"\nprimary_key = \"id\"\ncolumns = [{}]\nidentity = \"shared_key\"\n",
            columns.join(", ")
        );
        self.config_with(listen, peers, &tool)
    }

    /// Writes a config listening on `listen` and trusting `peers`, whose tools and
    /// collections are `body` (TOML), and returns it loaded.
    pub fn config_with(
        &self,
        listen: &str,
        peers: &[(PeerId, Option<String>)],
        body: &str,
    ) -> anyhow::Result<Config> {
        let mut text =
            format!("data_dir = \"data\"\nkey_file = \"concord.key\"\nlisten = \"{listen}\"\n\n");
        for (id, addr) in peers {
            text.push_str(&format!("[[peer]]\nid = \"{id}\"\n"));
            if let Some(addr) = addr {
                text.push_str(&format!("addr = \"{addr}\"\n"));
            }
        }
        text.push('\n');
        text.push_str(body);
        let path = self.dir.join("concord.toml");
        std::fs::write(&path, text)?;
        Ok(Config::load(&path)?)
    }
}

/// Reads every customer row as text, ordered by id.
pub fn rows(db: &Path) -> anyhow::Result<Vec<Vec<String>>> {
    let conn = Connection::open(db)?;
    let mut stmt = conn.prepare(
        "SELECT id, coalesce(name,''), coalesce(email,''), coalesce(city,''), coalesce(CAST(balance AS TEXT),'') FROM customers ORDER BY id",
    )?;
    let rows = stmt.query_map([], |r| {
        Ok(vec![
            r.get::<_, i64>(0)?.to_string(),
            r.get(1)?,
            r.get(2)?,
            r.get(3)?,
            r.get(4)?,
        ])
    })?;
    Ok(rows.collect::<Result<_, _>>()?)
}

/// Waits until both databases hold the same rows, up to [`CONVERGE_TIMEOUT_MS`].
pub async fn converge(a: &Path, b: &Path) -> anyhow::Result<Duration> {
    let start = Instant::now();
    let deadline = start + Duration::from_millis(CONVERGE_TIMEOUT_MS);
    loop {
        if rows(a)? == rows(b)? {
            return Ok(start.elapsed());
        }
        if Instant::now() > deadline {
            bail!("the databases did not converge within {CONVERGE_TIMEOUT_MS} ms");
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

fn print_rows(title: &str, rows: &[Vec<String>]) {
    println!("  {title}");
    println!(
        "    {:<4} {:<18} {:<24} {:<10} {:>10}",
        "id", "name", "email", "city", "balance"
    );
    for row in rows {
        println!(
            "    {:<4} {:<18} {:<24} {:<10} {:>10}",
            row[0], row[1], row[2], row[3], row[4]
        );
    }
}

/// Runs the demo and prints its report.
pub async fn run() -> anyhow::Result<()> {
    let tmp = tempfile::tempdir().context("creating a temporary directory")?;
    let a = AgentFiles::create(&tmp.path().join("crm"), CUSTOMERS_SCHEMA)?;
    let b = AgentFiles::create(&tmp.path().join("erp"), CUSTOMERS_SCHEMA)?;
    {
        let conn = Connection::open(&a.db)?;
        conn.execute_batch(
            "INSERT INTO customers (id, name, email, city, balance, updated) VALUES
             (1, 'Ada Lovelace', 'ada@example.com', 'London', '1250.50', '2026-11-01T09:00:00Z'),
             (2, 'Grace Hopper', 'grace@example.com', 'New York', '980.00', '2026-11-02T10:30:00Z'),
             (3, 'Alan Turing', 'alan@example.com', 'Manchester', '15.75', '2026-11-03T11:00:00Z'),
             (4, 'Edsger Dijkstra', 'edsger@example.com', 'Eindhoven', '0.10', '2026-11-04T12:00:00Z');",
        )?;
    }
    let columns = ["name", "email", "city", "balance", "updated"];
    let started = Instant::now();
    let config_a = a.config("127.0.0.1:0", &[(b.identity.peer_id(), None)], &columns)?;
    let agent_a = agent::start(config_a).await?;
    let config_b = b.config(
        "127.0.0.1:0",
        &[(a.identity.peer_id(), Some(agent_a.local_addr().to_string()))],
        &columns,
    )?;
    let agent_b = agent::start(config_b).await?;
    println!("Concord demo: two agents on loopback, QUIC with pinned keys");
    println!(
        "  crm agent {} on {}",
        agent_a.peer_id(),
        agent_a.local_addr()
    );
    println!(
        "  erp agent {} on {}",
        agent_b.peer_id(),
        agent_b.local_addr()
    );

    let initial = converge(&a.db, &b.db).await?;
    println!(
        "\n1. initial sync: {} customers copied from crm to erp in {:.1} ms",
        rows(&b.db)?.len(),
        ms(initial)
    );

    let (ca, cb) = (Connection::open(&a.db)?, Connection::open(&b.db)?);
    ca.execute(
        "UPDATE customers SET name = 'Ada King, Countess of Lovelace' WHERE id = 1",
        [],
    )?;
    cb.execute("UPDATE customers SET city = 'Marylebone' WHERE id = 1", [])?;
    cb.execute("DELETE FROM customers WHERE id = 3", [])?;
    cb.execute(
        "INSERT INTO customers (id, name, email, city, balance) VALUES (5, 'Barbara Liskov', 'barbara@example.com', 'Boston', '42.00')",
        [],
    )?;
    ca.execute(
        "UPDATE customers SET balance = '1000000000000.01' WHERE id = 2",
        [],
    )?;
    let edits = converge(&a.db, &b.db).await?;
    println!(
        "2. edits on both sides (name in crm and city in erp of one customer, a delete and an insert in erp, a decimal in crm): converged in {:.1} ms",
        ms(edits)
    );
    let final_a = rows(&a.db)?;
    print_rows("crm (same as erp):", &final_a);
    let ada = final_a
        .iter()
        .find(|r| r[0] == "1")
        .context("customer 1 is missing")?;
    if ada[1] != "Ada King, Countess of Lovelace" || ada[3] != "Marylebone" {
        bail!("the concurrent edits of customer 1 did not both survive: {ada:?}");
    }
    if final_a.iter().any(|r| r[0] == "3") {
        bail!("the deleted customer 3 came back");
    }
    let (sa, sb) = (
        agent_a.stats().await.unwrap_or_default(),
        agent_b.stats().await.unwrap_or_default(),
    );
    println!(
        "\n3. report: {} rows each side; crm captured {} changes and wrote {} rows; erp captured {} and wrote {}; {} dead letters; {:.0} ms in all",
        final_a.len(),
        sa.captured,
        sa.writes,
        sb.captured,
        sb.writes,
        sa.dead_letters + sb.dead_letters,
        ms(started.elapsed())
    );
    agent_a.shutdown().await;
    agent_b.shutdown().await;
    Ok(())
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}
