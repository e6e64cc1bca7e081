//! SQLite and PostgreSQL kept in sync by real agents over real QUIC: both ways with
//! the ids each tool assigns, the offline autoincrement case, one agent with both
//! tools, a hub, a server restart during a burst and a killed agent.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::bail;
use concord_tests::postgres::Postgres;
use concord_tests::{COLUMNS, CONVERGE_TIMEOUT, Node, Process, rows, sqlite_tool};
use tokio_postgres::Client;

/// The PostgreSQL twin of the test's SQLite customers table.
const PG_CUSTOMERS: &str = "CREATE TABLE customers (
    id bigserial PRIMARY KEY,
    name text,
    email text,
    city text,
    age integer
)";

/// A customer without its id (ids differ between tools): name, email, city, age.
type Customer = (Option<String>, Option<String>, Option<String>, Option<i64>);

/// A server with database `crm` holding the customers table.
fn server() -> anyhow::Result<Postgres> {
    let pg = Postgres::start()?;
    pg.create_database("crm")?;
    pg.psql("crm", PG_CUSTOMERS)?;
    Ok(pg)
}

/// The customers of a SQLite database, by name.
fn sqlite_customers(path: &Path) -> anyhow::Result<Vec<Customer>> {
    let mut customers: Vec<Customer> = rows(path)?
        .into_iter()
        .map(|(_, name, email, city, age)| (name, email, city, age))
        .collect();
    customers.sort();
    Ok(customers)
}

/// The customers of a PostgreSQL database, by name.
async fn pg_customers(client: &Client) -> anyhow::Result<Vec<Customer>> {
    let mut customers: Vec<Customer> = client
        .query("SELECT name, email, city, age::bigint FROM customers", &[])
        .await?
        .into_iter()
        .map(|row| (row.get(0), row.get(1), row.get(2), row.get(3)))
        .collect();
    customers.sort();
    Ok(customers)
}

/// Waits until every SQLite database and every PostgreSQL database holds the same
/// customers, and returns them.
async fn same_customers(sqlite: &[&Path], pg: &[&Client]) -> anyhow::Result<Vec<Customer>> {
    let deadline = Instant::now() + CONVERGE_TIMEOUT;
    loop {
        let mut all = Vec::new();
        for path in sqlite {
            all.push(sqlite_customers(path)?);
        }
        for client in pg {
            all.push(pg_customers(client).await?);
        }
        if all.windows(2).all(|pair| pair[0] == pair[1]) {
            return Ok(all.swap_remove(0));
        }
        if Instant::now() > deadline {
            bail!(
                "timed out after {CONVERGE_TIMEOUT:?} waiting for the tools to converge: {all:#?}"
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn customer(name: &str, city: Option<&str>, age: Option<i64>) -> Customer {
    (Some(name.to_owned()), None, city.map(str::to_owned), age)
}

/// The entries waiting in a PostgreSQL outbox.
async fn outbox_len(client: &Client) -> anyhow::Result<i64> {
    Ok(client
        .query_one("SELECT count(*) FROM _concord.outbox", &[])
        .await?
        .get(0))
}

/// Agent A beside a SQLite database and agent B beside a PostgreSQL one, peers,
/// and a connection to B's database playing the user's tool.
struct Pair {
    pg: Postgres,
    a: Node,
    b: Node,
    agent_a: concord_agent::agent::RunningAgent,
    agent_b: concord_agent::agent::RunningAgent,
    erp: Client,
}

async fn pair(root: &Path) -> anyhow::Result<Pair> {
    let pg = server()?;
    let mut a = Node::new(root, "a")?;
    let mut b = Node::new(root, "b")?;
    a.configure_with(
        "127.0.0.1:0",
        &[(b.id(), None)],
        &sqlite_tool("crm", "app.db"),
    )?;
    let agent_a = a.start().await?;
    let addr_a = Some(agent_a.local_addr().to_string());
    b.configure_with(
        "127.0.0.1:0",
        &[(a.id(), addr_a)],
        &pg.tool("erp", "crm", "customers", &COLUMNS),
    )?;
    let agent_b = b.start().await?;
    let erp = pg.connect("crm").await?;
    Ok(Pair {
        pg,
        a,
        b,
        agent_a,
        agent_b,
        erp,
    })
}

/// SQLite ↔ PostgreSQL both ways: inserts get the ids each tool assigns, updates
/// and deletes follow each record, and afterwards both agents go quiet: the
/// PostgreSQL outbox is drained and no change is captured or written again.
#[tokio::test(flavor = "multi_thread")]
async fn sqlite_and_postgres_sync_both_ways_and_go_quiet() -> anyhow::Result<()> {
    let tmp = tempfile::tempdir()?;
    let Pair {
        pg: _server,
        a,
        b: _,
        agent_a,
        agent_b,
        erp,
    } = pair(tmp.path()).await?;

    a.db()?.execute(
        "INSERT INTO customers (name, age) VALUES ('Ada', 36), ('Grace', 45)",
        [],
    )?;
    erp.batch_execute("INSERT INTO customers (name, city) VALUES ('Linus', 'Helsinki')")
        .await?;
    let all = same_customers(&[&a.files.db], &[&erp]).await?;
    assert_eq!(
        all,
        [
            customer("Ada", None, Some(36)),
            customer("Grace", None, Some(45)),
            customer("Linus", Some("Helsinki"), None),
        ]
    );
    // Each tool assigned its own ids: the PostgreSQL rows are 1 (Linus), 2, 3.
    let ids: Vec<i64> = erp
        .query("SELECT id FROM customers ORDER BY id", &[])
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(ids, [1, 2, 3]);

    erp.batch_execute("UPDATE customers SET city = 'London' WHERE name = 'Ada'")
        .await?;
    a.db()?
        .execute("UPDATE customers SET age = 55 WHERE name = 'Linus'", [])?;
    erp.batch_execute("DELETE FROM customers WHERE name = 'Grace'")
        .await?;
    let all = same_customers(&[&a.files.db], &[&erp]).await?;
    assert_eq!(
        all,
        [
            customer("Ada", Some("London"), Some(36)),
            customer("Linus", Some("Helsinki"), Some(55)),
        ]
    );

    // Quiet: the outbox drains, and nothing more is captured or written.
    let deadline = Instant::now() + CONVERGE_TIMEOUT;
    while outbox_len(&erp).await? != 0 {
        if Instant::now() > deadline {
            bail!("the PostgreSQL outbox was never drained");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut last = (agent_a.commits(), agent_b.commits());
    let mut stable = 0;
    for _ in 0..50 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let now = (agent_a.commits(), agent_b.commits());
        stable = if now == last { stable + 1 } else { 0 };
        last = now;
        if stable == 5 {
            break;
        }
    }
    assert_eq!(stable, 5, "the stores kept committing after the last edit");
    let stats = agent_b.stats().await.expect("stats");
    assert_eq!(
        stats.captured, 3,
        "B captured Linus's insert, Ada's city and Grace's delete"
    );
    assert_eq!(
        stats.writes, 3,
        "B wrote Ada's and Grace's inserts and Linus's age, once each"
    );
    assert_eq!(outbox_len(&erp).await?, 0, "no echo of the write-back");
    agent_a.shutdown().await;
    agent_b.shutdown().await;
    Ok(())
}

/// Regression (branch offices lose a customer), SQLite ↔ PostgreSQL: offline, each
/// site adds a customer and both get id 6. Both customers survive on both sides,
/// each site giving the other's its own next id, with no duplicates.
#[tokio::test(flavor = "multi_thread")]
async fn the_offline_autoincrement_case_keeps_both_records_with_postgres() -> anyhow::Result<()> {
    let tmp = tempfile::tempdir()?;
    let Pair {
        pg: _server,
        a,
        b,
        agent_a,
        agent_b,
        erp,
    } = pair(tmp.path()).await?;
    for i in 1..=5 {
        a.db()?.execute(
            "INSERT INTO customers (id, name) VALUES (?1, ?2)",
            rusqlite::params![i, format!("customer {i}")],
        )?;
    }
    let first = same_customers(&[&a.files.db], &[&erp]).await?;
    assert_eq!(first.len(), 5);

    agent_b.shutdown().await;
    a.db()?.execute(
        "INSERT INTO customers (name, city) VALUES ('Alice at A', 'Lyon')",
        [],
    )?;
    erp.batch_execute("INSERT INTO customers (name, city) VALUES ('Bob at B', 'Oslo')")
        .await?;
    let pg_id = async |name: &str| -> anyhow::Result<i64> {
        Ok(erp
            .query_one("SELECT id FROM customers WHERE name = $1", &[&name])
            .await?
            .get(0))
    };
    let sqlite_id = |name: &str| -> anyhow::Result<i64> {
        Ok(a.db()?
            .query_row("SELECT id FROM customers WHERE name = ?1", [name], |r| {
                r.get(0)
            })?)
    };
    assert_eq!(sqlite_id("Alice at A")?, 6);
    assert_eq!(pg_id("Bob at B").await?, 6);

    let agent_b = b.start().await?;
    let all = same_customers(&[&a.files.db], &[&erp]).await?;
    assert_eq!(all.len(), 7, "both customers, once each: {all:#?}");
    assert_eq!(sqlite_id("Bob at B")?, 7);
    assert_eq!(pg_id("Alice at A").await?, 7);
    agent_a.shutdown().await;
    agent_b.shutdown().await;
    Ok(())
}

/// One agent with a SQLite tool and a PostgreSQL tool keeps them in sync locally,
/// with no peer.
#[tokio::test(flavor = "multi_thread")]
async fn one_agent_keeps_sqlite_and_postgres_in_sync() -> anyhow::Result<()> {
    let tmp = tempfile::tempdir()?;
    let pg = server()?;
    let mut node = Node::new(tmp.path(), "a")?;
    let body = format!(
        "{}{}",
        sqlite_tool("crm", "app.db"),
        pg.tool("erp", "crm", "customers", &COLUMNS)
    );
    node.configure_with("127.0.0.1:0", &[], &body)?;
    let agent = node.start().await?;
    let erp = pg.connect("crm").await?;
    node.db()?
        .execute("INSERT INTO customers (name, age) VALUES ('Ada', 36)", [])?;
    erp.batch_execute("INSERT INTO customers (name) VALUES ('Grace')")
        .await?;
    same_customers(&[&node.files.db], &[&erp]).await?;
    erp.batch_execute("UPDATE customers SET city = 'London' WHERE name = 'Ada'")
        .await?;
    node.db()?
        .execute("DELETE FROM customers WHERE name = 'Grace'", [])?;
    let all = same_customers(&[&node.files.db], &[&erp]).await?;
    assert_eq!(all, [customer("Ada", Some("London"), Some(36))]);
    agent.shutdown().await;
    Ok(())
}

/// A hub with no tool relays between two SQLite agents and a PostgreSQL agent:
/// an edit anywhere reaches the other two.
#[tokio::test(flavor = "multi_thread")]
async fn a_hub_relays_between_sqlite_and_postgres_agents() -> anyhow::Result<()> {
    let tmp = tempfile::tempdir()?;
    let pg = server()?;
    let mut hub = Node::new(tmp.path(), "hub")?;
    let mut a = Node::new(tmp.path(), "a")?;
    let mut b = Node::new(tmp.path(), "b")?;
    let mut c = Node::new(tmp.path(), "c")?;
    hub.configure_with(
        "127.0.0.1:0",
        &[(a.id(), None), (b.id(), None), (c.id(), None)],
        "[[collection]]\nname = \"customers\"\n",
    )?;
    let agent_hub = hub.start().await?;
    let addr = Some(agent_hub.local_addr().to_string());
    a.configure_with(
        "127.0.0.1:0",
        &[(hub.id(), addr.clone())],
        &sqlite_tool("crm", "app.db"),
    )?;
    b.configure_with(
        "127.0.0.1:0",
        &[(hub.id(), addr.clone())],
        &sqlite_tool("crm", "app.db"),
    )?;
    c.configure_with(
        "127.0.0.1:0",
        &[(hub.id(), addr)],
        &pg.tool("erp", "crm", "customers", &COLUMNS),
    )?;
    let agents = [a.start().await?, b.start().await?, c.start().await?];
    let erp = pg.connect("crm").await?;
    a.db()?
        .execute("INSERT INTO customers (name) VALUES ('from a')", [])?;
    b.db()?
        .execute("INSERT INTO customers (name) VALUES ('from b')", [])?;
    erp.batch_execute("INSERT INTO customers (name) VALUES ('from c')")
        .await?;
    let all = same_customers(&[&a.files.db, &b.files.db], &[&erp]).await?;
    assert_eq!(all.len(), 3);
    erp.batch_execute("UPDATE customers SET age = 1 WHERE name = 'from a'")
        .await?;
    b.db()?
        .execute("DELETE FROM customers WHERE name = 'from c'", [])?;
    let all = same_customers(&[&a.files.db, &b.files.db], &[&erp]).await?;
    assert_eq!(
        all,
        [
            customer("from a", None, Some(1)),
            customer("from b", None, None)
        ]
    );
    for agent in agents {
        agent.shutdown().await;
    }
    agent_hub.shutdown().await;
    Ok(())
}

/// The server restarts in the middle of a burst of edits on both sides: the agent
/// reconnects, and nothing is lost or repeated.
#[tokio::test(flavor = "multi_thread")]
async fn a_server_restart_during_a_burst_loses_and_repeats_nothing() -> anyhow::Result<()> {
    let tmp = tempfile::tempdir()?;
    let Pair {
        pg,
        a,
        b: _,
        agent_a,
        agent_b,
        erp,
    } = pair(tmp.path()).await?;
    erp.batch_execute("INSERT INTO customers (name) VALUES ('before')")
        .await?;
    same_customers(&[&a.files.db], &[&erp]).await?;

    let db = a.db()?;
    for i in 0..400 {
        db.execute(
            "INSERT INTO customers (name, age) VALUES (?1, ?2)",
            rusqlite::params![format!("burst {i:03}"), i],
        )?;
        if i == 150 {
            pg.stop_server("fast")?;
        }
        if i == 250 {
            pg.start_server()?;
        }
    }
    let erp = pg.connect("crm").await?;
    for i in 0..50 {
        erp.execute(
            "INSERT INTO customers (name, age) VALUES ($1, $2)",
            &[&format!("after {i:02}"), &i],
        )
        .await?;
    }
    let all = same_customers(&[&a.files.db], &[&erp]).await?;
    assert_eq!(all.len(), 451, "every row, each once");
    let mut counts: BTreeMap<Option<String>, usize> = BTreeMap::new();
    for (name, ..) in &all {
        *counts.entry(name.clone()).or_default() += 1;
    }
    assert!(counts.values().all(|n| *n == 1), "no duplicates");
    agent_a.shutdown().await;
    agent_b.shutdown().await;
    Ok(())
}

/// The PostgreSQL agent is killed (`kill -9`) in the middle of a burst on both
/// sides: once restarted, nothing is lost and nothing is duplicated.
#[tokio::test(flavor = "multi_thread")]
async fn a_killed_postgres_agent_loses_and_duplicates_nothing() -> anyhow::Result<()> {
    let tmp = tempfile::tempdir()?;
    let pg = server()?;
    let mut a = Node::new(tmp.path(), "a")?;
    let mut b = Node::new(tmp.path(), "b")?;
    let tool = pg.tool("erp", "crm", "customers", &COLUMNS);
    b.configure_with("127.0.0.1:0", &[(a.id(), None)], &tool)?;
    let proc_b = Process::start(&b)?;
    b.configure_with(&proc_b.addr, &[(a.id(), None)], &tool)?;
    a.configure_with(
        "127.0.0.1:0",
        &[(b.id(), Some(proc_b.addr.clone()))],
        &sqlite_tool("crm", "app.db"),
    )?;
    let proc_a = Process::start(&a)?;
    let erp = pg.connect("crm").await?;

    let db = a.db()?;
    for i in 0..300 {
        db.execute(
            "INSERT INTO customers (name) VALUES (?1)",
            [format!("sqlite {i:03}")],
        )?;
        erp.execute(
            "INSERT INTO customers (name) VALUES ($1)",
            &[&format!("pg {i:03}")],
        )
        .await?;
    }
    proc_b.kill9()?;
    for i in 300..400 {
        erp.execute(
            "INSERT INTO customers (name) VALUES ($1)",
            &[&format!("pg {i:03}")],
        )
        .await?;
    }
    let proc_b = Process::start(&b)?;
    let all = same_customers(&[&a.files.db], &[&erp]).await?;
    assert_eq!(all.len(), 700, "every row, each once");
    let mut counts: BTreeMap<Option<String>, usize> = BTreeMap::new();
    for (name, ..) in &all {
        *counts.entry(name.clone()).or_default() += 1;
    }
    assert!(counts.values().all(|n| *n == 1), "no duplicates");
    proc_a.stop()?;
    proc_b.stop()?;
    Ok(())
}

/// A config error for a PostgreSQL tool names the file, the line and the table:
/// an unsupported column type, a missing table; and a wrong password or a server
/// that is down names the tool and the server.
#[tokio::test(flavor = "multi_thread")]
async fn bad_postgres_config_is_named_at_start() -> anyhow::Result<()> {
    let tmp = tempfile::tempdir()?;
    let pg = server()?;
    pg.psql("crm", "ALTER TABLE customers ADD COLUMN photo bytea")?;
    let mut node = Node::new(tmp.path(), "a")?;
    let start = async |node: &mut Node, body: &str| -> anyhow::Result<String> {
        node.configure_with("127.0.0.1:0", &[], body)?;
        match node.start().await {
            Ok(agent) => {
                agent.shutdown().await;
                bail!("the agent started with {body}")
            }
            Err(e) => Ok(format!("{e:#}")),
        }
    };
    let err = start(
        &mut node,
        &pg.tool("erp", "crm", "customers", &["name", "photo"]),
    )
    .await?;
    assert!(
        err.contains("concord.toml:")
            && err.contains("tool[0].collection[0].columns")
            && err.contains("`photo`")
            && err.contains("bytea"),
        "{err}"
    );
    let err = start(&mut node, &pg.tool("erp", "crm", "orders", &["name"])).await?;
    assert!(
        err.contains("tool[0].collection[0].table") && err.contains("`orders` does not exist"),
        "{err}"
    );
    let wrong = pg
        .tool("erp", "crm", "customers", &["name"])
        .replace("password=", "password=x");
    let err = start(&mut node, &wrong).await?;
    assert!(
        err.contains("tool `erp`") && err.contains("password authentication failed"),
        "{err}"
    );
    let body = pg.tool("erp", "crm", "customers", &["name"]);
    drop(pg);
    let err = start(&mut node, &body).await?;
    assert!(
        err.contains("tool `erp`") && err.contains("cannot connect to PostgreSQL at 127.0.0.1:"),
        "{err}"
    );
    Ok(())
}
