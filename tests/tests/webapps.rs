//! Web apps: a real PocketBase server, started by the harness with its own folder,
//! a superuser, a `customers` collection and hooks that post signed webhooks,
//! kept in two-way sync with a SQLite database by two agents over real QUIC. The
//! database names its columns differently (a mapping); PocketBase assigns the ids
//! of records Concord creates; webhooks wake the agent at once, polling alone also
//! converges, deletes go both ways, a 429 storm slows the agent without losing a
//! record, a record the app refuses becomes a dead letter with the app's message,
//! and everything goes quiet.

use std::time::{Duration, Instant};

use anyhow::Context;
use concord_tests::pocketbase::{PocketBase, Reach};
use concord_tests::{Node, admin, eventually, free_udp_addr};
use serde_json::{Value, json};

/// The office database: customers with its own column names.
const OFFICE_SCHEMA: &str = "CREATE TABLE customers (
    id INTEGER PRIMARY KEY,
    full_name TEXT,
    mail TEXT,
    town TEXT,
    years INTEGER
)";

/// The office's tool: its columns mapped to the canonical fields.
const OFFICE_TOOL: &str = "[[tool]]\nname = \"office\"\nkind = \"sqlite\"\npath = \"app.db\"\n\n\
    [[tool.collection]]\nname = \"customers\"\ntable = \"customers\"\nprimary_key = \"id\"\n\n\
    [[tool.collection.field]]\ncolumn = \"full_name\"\nfield = \"name\"\n\n\
    [[tool.collection.field]]\ncolumn = \"mail\"\nfield = \"email\"\n\n\
    [[tool.collection.field]]\ncolumn = \"town\"\nfield = \"city\"\n\n\
    [[tool.collection.field]]\ncolumn = \"years\"\nfield = \"age\"\n";

/// An office agent with SQLite and a web agent with PocketBase, peers of each other.
struct Pair {
    office: Node,
    web: Node,
    app: PocketBase,
}

async fn pair(root: &std::path::Path, reach: Reach) -> anyhow::Result<Pair> {
    let app = PocketBase::start(root, "pocketbase").await?;
    let mut office = Node::with_schema(root, "office", OFFICE_SCHEMA)?;
    let mut web = Node::new(root, "web")?;
    let (addr_o, addr_w) = (free_udp_addr()?, free_udp_addr()?);
    office.configure_with(&addr_o, &[(web.id(), Some(addr_w.clone()))], OFFICE_TOOL)?;
    web.configure_with(
        &addr_w,
        &[(office.id(), Some(addr_o))],
        &app.rest_tool("crm", reach),
    )?;
    Ok(Pair { office, web, app })
}

/// An office row: full name, mail, town, years.
type OfficeRow = (Option<String>, Option<String>, Option<String>, Option<i64>);

fn office_rows(node: &Node) -> anyhow::Result<Vec<OfficeRow>> {
    let db = node.db()?;
    let mut statement =
        db.prepare("SELECT full_name, mail, town, years FROM customers ORDER BY full_name")?;
    let rows = statement
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))?
        .collect::<Result<_, _>>()?;
    Ok(rows)
}

/// The app's customers as office rows, sorted the same way.
async fn app_rows(app: &PocketBase) -> anyhow::Result<Vec<OfficeRow>> {
    let mut rows: Vec<OfficeRow> = app
        .list()
        .await?
        .iter()
        .map(|r| {
            let text = |f: &str| r[f].as_str().map(str::to_owned);
            (text("name"), text("email"), text("city"), r["age"].as_i64())
        })
        .collect();
    rows.sort();
    Ok(rows)
}

/// Waits until office and app hold the same customers, `count` of them.
async fn agree(pair: &Pair, count: usize, what: &str) -> anyhow::Result<Vec<OfficeRow>> {
    eventually(what, async || {
        let (office, app) = (office_rows(&pair.office)?, app_rows(&pair.app).await?);
        Ok((office == app && office.len() == count).then_some(office))
    })
    .await
}

fn row(name: &str, mail: &str, town: &str, years: i64) -> OfficeRow {
    (
        Some(name.to_owned()),
        Some(mail.to_owned()),
        Some(town.to_owned()),
        Some(years),
    )
}

/// Waits until the office database holds `expected` among its rows.
async fn office_holds(pair: &Pair, expected: OfficeRow, what: &str) -> anyhow::Result<()> {
    eventually(what, async || {
        Ok(office_rows(&pair.office)?.contains(&expected).then_some(()))
    })
    .await
}

async fn find(app: &PocketBase, name: &str) -> anyhow::Result<Option<Value>> {
    Ok(app.list().await?.into_iter().find(|r| r["name"] == name))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sqlite_and_pocketbase_sync_both_ways_through_webhooks() -> anyhow::Result<()> {
    let root = tempfile::tempdir()?;
    // Polls an hour apart: after the first listing, only webhooks can carry a change.
    let reach = Reach {
        poll_ms: 3_600_000,
        reconcile_ms: 3_600_000,
        webhooks: true,
    };
    let pair = pair(root.path(), reach).await?;
    let (_office, web) = (pair.office.start().await?, pair.web.start().await?);
    pair.app.hook_to(&pair.web.admin_url()?, "crm").await?;

    // A customer inserted in the office database is created in the app, which
    // assigns its id; the database keeps its own.
    pair.office.db()?.execute(
        "INSERT INTO customers (full_name, mail, town, years) VALUES ('Ada', 'ada@example.com', 'London', 36)",
        [],
    )?;
    agree(&pair, 1, "Ada in the app").await?;
    let ada = find(&pair.app, "Ada").await?.context("Ada")?;
    let ada_id = ada["id"].as_str().context("an id")?.to_owned();
    assert_eq!(ada_id.len(), 15, "PocketBase's own id: {ada_id}");
    let office_id: i64 = pair
        .office
        .db()?
        .query_row("SELECT id FROM customers", [], |r| r.get(0))?;
    assert_eq!(office_id, 1);

    // A customer created in the app reaches the database through its webhook.
    let started = Instant::now();
    pair.app
        .create(
            json!({"name": "Grace", "email": "grace@example.com", "city": "New York", "age": 45}),
        )
        .await?;
    agree(&pair, 2, "Grace in the office").await?;
    println!("app → office through a webhook: {:?}", started.elapsed());

    // Edits both ways.
    pair.app.update(&ada_id, json!({"city": "Paris"})).await?;
    office_holds(
        &pair,
        row("Ada", "ada@example.com", "Paris", 36),
        "Ada's move in the office",
    )
    .await?;
    pair.office.db()?.execute(
        "UPDATE customers SET years = 46 WHERE full_name = 'Grace'",
        [],
    )?;
    agree(&pair, 2, "Grace's birthday in the app").await?;
    assert!(app_rows(&pair.app).await?.contains(&row(
        "Grace",
        "grace@example.com",
        "New York",
        46
    )));

    // Deletes both ways: in the app (its delete webhook), and in the office.
    pair.app.delete(&ada_id).await?;
    agree(&pair, 1, "Ada gone from the office").await?;
    pair.office
        .db()?
        .execute("DELETE FROM customers WHERE full_name = 'Grace'", [])?;
    agree(&pair, 0, "Grace gone from the app").await?;

    // An agent polling an hour apart stops at once (it used to wait out its poll).
    tokio::time::timeout(Duration::from_secs(10), web.shutdown())
        .await
        .context("the agent did not stop within 10 s")?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn with_webhooks_off_polling_converges_and_goes_quiet() -> anyhow::Result<()> {
    let root = tempfile::tempdir()?;
    let reach = Reach {
        poll_ms: 200,
        reconcile_ms: 1_000,
        webhooks: false,
    };
    let pair = pair(root.path(), reach).await?;
    // Records the app held before the agent came: the first listing takes them.
    for (name, city) in [("Linus", "Helsinki"), ("Margaret", "Boston")] {
        pair.app
            .create(json!({"name": name, "email": format!("{}@example.com", name.to_lowercase()), "city": city, "age": 50}))
            .await?;
    }
    let (_office, _web) = (pair.office.start().await?, pair.web.start().await?);
    agree(&pair, 2, "the app's customers in the office").await?;

    pair.office.db()?.execute(
        "INSERT INTO customers (full_name, mail, town, years) VALUES ('Barbara', 'barbara@example.com', 'Boston', 80)",
        [],
    )?;
    agree(&pair, 3, "Barbara in the app").await?;
    let linus = find(&pair.app, "Linus").await?.context("Linus")?;
    let linus_id = linus["id"].as_str().context("id")?.to_owned();
    pair.app
        .update(&linus_id, json!({"city": "Portland"}))
        .await?;
    office_holds(
        &pair,
        row("Linus", "linus@example.com", "Portland", 50),
        "Linus's move in the office",
    )
    .await?;
    // A delete in the app, which sends no webhook: found by reconciling ids.
    pair.app.delete(&linus_id).await?;
    let rows = agree(&pair, 2, "Linus gone from the office").await?;

    // Quiet: the agent keeps polling, and neither side changes.
    let updated = |records: &[Value]| -> Vec<String> {
        records
            .iter()
            .map(|r| format!("{}@{}", r["id"], r["updated"]))
            .collect()
    };
    let before = updated(&pair.app.list().await?);
    let (_, requests_before) = pair.app.stats().await?;
    let db = pair.office.db()?;
    let data_version: i64 = db.query_row("PRAGMA data_version", [], |r| r.get(0))?;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (_, requests_after) = pair.app.stats().await?;
    assert!(
        requests_after >= requests_before + 5,
        "the agent polled ({requests_before} → {requests_after} requests)"
    );
    assert_eq!(
        updated(&pair.app.list().await?),
        before,
        "no record was written again"
    );
    let after: i64 = db.query_row("PRAGMA data_version", [], |r| r.get(0))?;
    assert_eq!(after, data_version, "the office database was not written");
    assert_eq!(office_rows(&pair.office)?, rows);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_429_storm_slows_the_agent_down_without_losing_anything() -> anyhow::Result<()> {
    let root = tempfile::tempdir()?;
    let reach = Reach {
        poll_ms: 200,
        reconcile_ms: 3_600_000,
        webhooks: false,
    };
    let pair = pair(root.path(), reach).await?;
    let (_office, _web) = (pair.office.start().await?, pair.web.start().await?);
    agree(&pair, 0, "a first listing").await.ok();

    pair.app.storm(3_000).await?;
    let storm_started = Instant::now();
    {
        let db = pair.office.db()?;
        for i in 0..30 {
            db.execute(
                "INSERT INTO customers (full_name, mail, town, years) VALUES (?1, ?2, 'Storm', ?3)",
                rusqlite::params![format!("c{i:02}"), format!("c{i}@example.com"), i],
            )?;
        }
    }
    // Nothing can land while the storm lasts; everything lands after it, once.
    let rows = eventually("the 30 customers in the app", async || {
        if storm_started.elapsed() < Duration::from_secs(3) {
            return Ok(None);
        }
        let rows = app_rows(&pair.app).await?;
        Ok((rows.len() >= 30).then_some(rows))
    })
    .await?;
    assert_eq!(rows.len(), 30, "each customer once: {rows:?}");
    let (served_429, requests) = pair.app.stats().await?;
    println!("429s served: {served_429}, requests: {requests}");
    assert!(served_429 > 0, "the storm was met");
    // Honouring `Retry-After: 1` for every request in flight: a handful of 429s
    // per second of storm, not a retry loop's hundreds.
    assert!(
        served_429 <= 40,
        "{served_429} answers of 429 in a 3 s storm"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_record_the_app_refuses_becomes_a_dead_letter_with_the_apps_message() -> anyhow::Result<()>
{
    let root = tempfile::tempdir()?;
    let reach = Reach {
        poll_ms: 200,
        reconcile_ms: 3_600_000,
        webhooks: false,
    };
    let pair = pair(root.path(), reach).await?;
    let (_office, _web) = (pair.office.start().await?, pair.web.start().await?);

    pair.office.db()?.execute(
        "INSERT INTO customers (full_name, mail, town, years) VALUES ('Eve', 'not an address', 'Nowhere', 30)",
        [],
    )?;
    pair.office.db()?.execute(
        "INSERT INTO customers (full_name, mail, town, years) VALUES ('Frank', 'frank@example.com', 'Rome', 31)",
        [],
    )?;
    let client = admin(&pair.web)?;
    let letter = eventually("Eve's dead letter", async || {
        let letters = client.dead_letters().await?;
        Ok(letters.into_iter().find(|l| l.kind == "rejected"))
    })
    .await?;
    assert_eq!(letter.tool, "crm");
    assert!(
        letter
            .reason
            .contains("email: Must be a valid email address."),
        "the app's message: {}",
        letter.reason
    );
    // The other record went through; Eve's did not.
    eventually("Frank in the app", async || {
        Ok(find(&pair.app, "Frank").await?.map(|_| ()))
    })
    .await?;
    assert!(find(&pair.app, "Eve").await?.is_none());

    // Corrected at the source, the record goes through and the letter clears.
    pair.office.db()?.execute(
        "UPDATE customers SET mail = 'eve@example.com' WHERE full_name = 'Eve'",
        [],
    )?;
    agree(&pair, 2, "Eve in the app").await?;
    eventually("the letter cleared", async || {
        Ok(client.dead_letters().await?.is_empty().then_some(()))
    })
    .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_template_naming_an_unknown_value_is_refused_at_start_with_its_line() -> anyhow::Result<()>
{
    let root = tempfile::tempdir()?;
    let app = PocketBase::start(root.path(), "pocketbase").await?;
    let reach = Reach {
        poll_ms: 1_000,
        reconcile_ms: 60_000,
        webhooks: true,
    };
    let tool = app.rest_tool("crm", reach).replace(
        "filter=(updated>='{{ since }}')",
        "filter=(updated>='{{ snice }}')",
    );
    let mut web = Node::new(root.path(), "web")?;
    web.configure_with(&free_udp_addr()?, &[], &tool)?;
    let error = web.start().await.expect_err("an unknown template value");
    let message = format!("{error:#}");
    assert!(
        message.contains("`tool[0].collection[0].api.list`: undefined value"),
        "{message}"
    );
    assert!(
        message.contains("concord.toml:"),
        "names the file and line: {message}"
    );
    Ok(())
}
