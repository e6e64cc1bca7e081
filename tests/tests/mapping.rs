//! Tools that disagree about everything, kept in sync through mappings: SQLite and
//! PostgreSQL name, type and limit their customers differently, a hub relays, and a
//! filtered SQLite holds only the active customers. Real agents, QUIC, fjall,
//! SQLite files and a PostgreSQL server the harness starts.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::bail;
use concord_agent::agent::RunningAgent;
use concord_tests::postgres::Postgres;
use concord_tests::{CONVERGE_TIMEOUT, Node};
use tokio_postgres::Client;

/// The SQLite customers of the main site.
const SQLITE_CUSTOMERS: &str = "CREATE TABLE customers (
    id INTEGER PRIMARY KEY,
    full_name TEXT,
    email TEXT,
    amount_cents INTEGER,
    status TEXT,
    notes TEXT,
    updated_at TEXT
)";

/// The filtered site's customers: the same, with a computed label.
const FILTERED_CUSTOMERS: &str = "CREATE TABLE customers (
    id INTEGER PRIMARY KEY,
    full_name TEXT,
    email TEXT,
    amount_cents INTEGER,
    status TEXT,
    notes TEXT,
    updated_at TEXT,
    label TEXT
)";

/// The ERP's contacts in PostgreSQL.
const PG_CONTACTS: &str = "CREATE TABLE contacts (
    id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    name text,
    email text,
    amount numeric(12,2),
    state text,
    notes text,
    updated timestamptz
)";

/// Every agent's settings of the collection: customers are matched by e-mail.
const COLLECTION: &str = "[[collection]]\nname = \"customers\"\nnatural_key = [\"email\"]\n\n";

/// The SQLite mapping: cents, Berlin wall-clock text, renamed name.
const SQLITE_MAPPING: &str = r#"
[[tool.collection]]
name = "customers"
table = "customers"
primary_key = "id"
columns = ["email", "status", "notes"]

[[tool.collection.field]]
column = "full_name"
field = "name"

[[tool.collection.field]]
column = "amount_cents"
field = "amount"
convert = "minor_units"

[[tool.collection.field]]
column = "updated_at"
field = "updated"
convert = "timestamp"
format = "%Y-%m-%d %H:%M:%S"
timezone = "Europe/Berlin"
"#;

/// A long note: the filtered site keeps its first 40 characters.
const LONG_NOTE: &str = "Prefers e-mail; invoices go to the Zurich office, attention of accounts.";

fn sqlite_tool(mapping: &str) -> String {
    format!("{COLLECTION}[[tool]]\nname = \"crm\"\nkind = \"sqlite\"\npath = \"app.db\"\n{mapping}")
}

fn filtered_tool() -> String {
    let mapping = SQLITE_MAPPING.replace(
        "columns = [\"email\", \"status\", \"notes\"]",
        "columns = [\"email\", \"status\"]\nfilter = 'status == \"active\"'",
    ) + "\n[[tool.collection.field]]\ncolumn = \"notes\"\nmax_length = 40\n\n\
           [[tool.collection.field]]\ncolumn = \"label\"\ncompute = 'name + \" <\" + email + \">\"'\n";
    sqlite_tool(&mapping)
}

fn pg_tool(pg: &Postgres) -> String {
    format!(
        r#"{COLLECTION}[[tool]]
name = "erp"
kind = "postgres"
url = "{url}"
poll_interval_ms = 200

[[tool.collection]]
name = "customers"
table = "contacts"
primary_key = "id"
columns = ["name", "email", "amount", "notes", "updated"]
on_match = "others"

[[tool.collection.field]]
column = "state"
field = "status"
values = {{ open = "active", closed = "inactive" }}
default = "unknown"
"#,
        url = pg.url("erp")
    )
}

/// A customer as the SQLite sites hold it: full_name, email, amount_cents, status,
/// notes, updated_at.
type SqliteCustomer = (
    Option<String>,
    Option<String>,
    Option<i64>,
    Option<String>,
    Option<String>,
    Option<String>,
);

fn sqlite_customers(path: &Path) -> anyhow::Result<Vec<SqliteCustomer>> {
    let conn = rusqlite::Connection::open(path)?;
    conn.busy_timeout(Duration::from_secs(5))?;
    let mut stmt = conn.prepare(
        "SELECT full_name, email, amount_cents, status, notes, updated_at FROM customers \
         ORDER BY lower(trim(email)), full_name",
    )?;
    let rows = stmt.query_map([], |r| {
        Ok((
            r.get(0)?,
            r.get(1)?,
            r.get(2)?,
            r.get(3)?,
            r.get(4)?,
            r.get(5)?,
        ))
    })?;
    Ok(rows.collect::<Result<_, _>>()?)
}

/// A contact as PostgreSQL holds it: name, email, amount as text, state, notes,
/// updated in UTC as text.
type PgContact = (
    Option<String>,
    Option<String>,
    Option<String>,
    Option<String>,
    Option<String>,
    Option<String>,
);

async fn pg_contacts(client: &Client) -> anyhow::Result<Vec<PgContact>> {
    let rows = client
        .query(
            "SELECT name, email, amount::text, state, notes, \
             to_char(updated AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI:SS') \
             FROM contacts ORDER BY lower(trim(email)) COLLATE \"C\", name COLLATE \"C\"",
            &[],
        )
        .await?;
    Ok(rows
        .into_iter()
        .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3), r.get(4), r.get(5)))
        .collect())
}

/// Waits until `check` holds (polled every 20 ms), up to the converge timeout.
async fn eventually<F, Fut>(what: &str, mut check: F) -> anyhow::Result<()>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = anyhow::Result<Option<String>>>,
{
    let deadline = Instant::now() + CONVERGE_TIMEOUT;
    loop {
        let failure = check().await?;
        let Some(failure) = failure else {
            return Ok(());
        };
        if Instant::now() > deadline {
            bail!("timed out after {CONVERGE_TIMEOUT:?} waiting for {what}: {failure}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The expected value, or what differs.
fn differs<T: std::fmt::Debug + PartialEq>(found: &T, expected: &T) -> Option<String> {
    (found != expected).then(|| format!("found {found:?}, expected {expected:?}"))
}

fn text(s: &str) -> Option<String> {
    Some(s.to_owned())
}

/// Four agents — SQLite ↔ hub ↔ PostgreSQL, and a filtered SQLite — start from
/// overlapping customers: the first merge links equal e-mails (case aside) into
/// one record each and reports the ambiguous ones, values round trip exactly
/// through cents, decimals, time zones and a text limit, the filtered agent holds
/// exactly the active customers, an edit in each tool reaches every other in its
/// own form, and the system goes quiet.
#[tokio::test(flavor = "multi_thread")]
async fn four_agents_with_mappings_merge_filter_and_round_trip() -> anyhow::Result<()> {
    let tmp = tempfile::tempdir()?;
    let pg = Postgres::start()?;
    pg.create_database("erp")?;
    pg.psql("erp", PG_CONTACTS)?;
    pg.psql(
        "erp",
        "INSERT INTO contacts (name, email, amount, state, notes, updated) VALUES
         ('Ada Lovelace', 'ADA@example.com', 1.00, 'open', 'from the ERP', '2026-01-01 10:00:00+00'),
         ('Grace Hopper', 'grace@navy.mil', 2.00, 'open', NULL, '2026-01-01 10:00:00+00'),
         ('Only In ERP', 'erp@example.com', 3.50, 'open', NULL, '2026-01-02 08:15:00+00')",
    )?;

    let mut hub = Node::new(tmp.path(), "hub")?;
    let mut crm = Node::with_schema(tmp.path(), "crm", SQLITE_CUSTOMERS)?;
    let mut erp = Node::new(tmp.path(), "erp")?;
    let mut branch = Node::with_schema(tmp.path(), "branch", FILTERED_CUSTOMERS)?;
    crm.db()?.execute_batch(&format!(
        "INSERT INTO customers (full_name, email, amount_cents, status, notes, updated_at) VALUES
         ('Ada King', 'ada@example.com', 123456, 'active', '{LONG_NOTE}', '2026-03-29 03:30:00'),
         ('Grace H.', 'Grace@Navy.mil', 1000, 'inactive', NULL, '2026-03-01 12:00:00'),
         ('Bob', 'bob@example.com', 5000, 'active', NULL, '2026-10-25 02:30:00'),
         ('Bobby', ' BOB@example.com', 7000, 'active', NULL, NULL),
         ('Only In CRM', 'crm@example.com', 1, 'active', NULL, NULL);"
    ))?;

    // The hub relays; the CRM's records reach it first.
    hub.configure_with(
        "127.0.0.1:0",
        &[(crm.id(), None), (erp.id(), None), (branch.id(), None)],
        COLLECTION,
    )?;
    let agent_hub = hub.start().await?;
    let hub_addr = Some(agent_hub.local_addr().to_string());
    crm.configure_with(
        "127.0.0.1:0",
        &[(hub.id(), hub_addr.clone())],
        &sqlite_tool(SQLITE_MAPPING),
    )?;
    let agent_crm = crm.start().await?;
    eventually("the hub to hold the CRM's records", || async {
        Ok(differs(&agent_hub.reader().doc_count()?, &5))
    })
    .await?;
    // Bob's e-mail is on two CRM records: both are reported, each naming the
    // other, and neither is matched to anything.
    let mut ambiguous = agent_crm.reader().ambiguous()?;
    ambiguous.sort_by(|a, b| a.key.cmp(&b.key));
    let reported: Vec<(&str, &str, Vec<String>)> = ambiguous
        .iter()
        .map(|a| (a.key.as_str(), a.natural_key.as_str(), a.others.clone()))
        .collect();
    assert_eq!(
        reported,
        [
            ("3", "bob@example.com", vec!["4".to_owned()]),
            ("4", "bob@example.com", vec!["3".to_owned()]),
        ]
    );

    // The ERP joins an agent that already holds the records: its agent first
    // relays only, then restarts with the ERP as its tool.
    erp.configure_with("127.0.0.1:0", &[(hub.id(), hub_addr.clone())], COLLECTION)?;
    let relay = erp.start().await?;
    eventually("the ERP's agent to hold the records", || async {
        Ok(differs(&relay.reader().doc_count()?, &5))
    })
    .await?;
    relay.shutdown().await;
    erp.configure_with(
        "127.0.0.1:0",
        &[(hub.id(), hub_addr.clone())],
        &pg_tool(&pg),
    )?;
    let agent_erp = erp.start().await?;
    branch.configure_with("127.0.0.1:0", &[(hub.id(), hub_addr)], &filtered_tool())?;
    let agent_branch = branch.start().await?;
    let client = pg.connect("erp").await?;

    // The first merge: Ada and Grace are matched by e-mail whatever its case, and
    // the CRM's values win (the ERP's `on_match` is `others`); nothing is doubled.
    let crm_db = crm.files.db.clone();
    let expected_crm = vec![
        (
            text("Ada King"),
            text("ada@example.com"),
            Some(123_456),
            text("active"),
            text(LONG_NOTE),
            text("2026-03-29 03:30:00"),
        ),
        (
            text("Bob"),
            text("bob@example.com"),
            Some(5000),
            text("active"),
            None,
            text("2026-10-25 02:30:00"),
        ),
        (
            text("Bobby"),
            text(" BOB@example.com"),
            Some(7000),
            text("active"),
            None,
            None,
        ),
        (
            text("Only In CRM"),
            text("crm@example.com"),
            Some(1),
            text("active"),
            None,
            None,
        ),
        (
            text("Only In ERP"),
            text("erp@example.com"),
            Some(350),
            text("active"),
            None,
            text("2026-01-02 09:15:00"),
        ),
        (
            text("Grace H."),
            text("Grace@Navy.mil"),
            Some(1000),
            text("inactive"),
            None,
            text("2026-03-01 12:00:00"),
        ),
    ];
    eventually("the CRM to hold the merged customers", || async {
        Ok(differs(&sqlite_customers(&crm_db)?, &expected_crm))
    })
    .await?;
    // 03:30 in Berlin on the day summer time starts is 01:30 UTC; 02:30 on the day it
    // ends happens twice, and the earlier (summer) one is meant.
    let expected_erp = vec![
        (
            text("Ada King"),
            text("ada@example.com"),
            text("1234.56"),
            text("open"),
            text(LONG_NOTE),
            text("2026-03-29 01:30:00"),
        ),
        (
            text("Bob"),
            text("bob@example.com"),
            text("50.00"),
            text("open"),
            None,
            text("2026-10-25 00:30:00"),
        ),
        (
            text("Bobby"),
            text(" BOB@example.com"),
            text("70.00"),
            text("open"),
            None,
            None,
        ),
        (
            text("Only In CRM"),
            text("crm@example.com"),
            text("0.01"),
            text("open"),
            None,
            None,
        ),
        (
            text("Only In ERP"),
            text("erp@example.com"),
            text("3.50"),
            text("open"),
            None,
            text("2026-01-02 08:15:00"),
        ),
        (
            text("Grace H."),
            text("Grace@Navy.mil"),
            text("10.00"),
            text("closed"),
            None,
            text("2026-03-01 11:00:00"),
        ),
    ];
    eventually("the ERP to hold the merged contacts", || async {
        Ok(differs(&pg_contacts(&client).await?, &expected_erp))
    })
    .await?;
    // The filtered branch holds exactly the active customers, notes cut to 40
    // characters, and the computed label.
    let branch_db = branch.files.db.clone();
    let cut: String = LONG_NOTE.chars().take(40).collect();
    let expected_branch: Vec<SqliteCustomer> = expected_crm
        .iter()
        .filter(|c| c.3.as_deref() == Some("active"))
        .map(|c| {
            let mut c = c.clone();
            if c.4.is_some() {
                c.4 = Some(cut.clone());
            }
            c
        })
        .collect();
    eventually("the branch to hold the active customers", || async {
        Ok(differs(&sqlite_customers(&branch_db)?, &expected_branch))
    })
    .await?;
    let label: String = branch.db()?.query_row(
        "SELECT label FROM customers WHERE email = 'ada@example.com'",
        [],
        |r| r.get(0),
    )?;
    assert_eq!(label, "Ada King <ada@example.com>");

    // An edit in each tool reaches every other in its own representation.
    client
        .execute(
            "UPDATE contacts SET amount = 99.99, updated = '2026-11-23 12:00:00+00' \
             WHERE email = 'ada@example.com'",
            &[],
        )
        .await?;
    crm.db()?.execute(
        "UPDATE customers SET notes = 'call first' WHERE email = 'crm@example.com'",
        [],
    )?;
    branch.db()?.execute(
        "UPDATE customers SET full_name = 'Ada Lovelace King' WHERE email = 'ada@example.com'",
        [],
    )?;
    eventually("the edits to reach the CRM", || async {
        let rows = sqlite_customers(&crm_db)?;
        Ok(differs(
            &(
                rows[0].0.clone(),
                rows[0].2,
                rows[0].4.clone(),
                rows[0].5.clone(),
            ),
            &(
                text("Ada Lovelace King"),
                Some(9999),
                text(LONG_NOTE),
                text("2026-11-23 13:00:00"),
            ),
        ))
    })
    .await?;
    eventually("the edits to reach the ERP", || async {
        let rows = pg_contacts(&client).await?;
        Ok(differs(
            &(rows[0].0.clone(), rows[0].4.clone(), rows[3].4.clone()),
            &(
                text("Ada Lovelace King"),
                text(LONG_NOTE),
                text("call first"),
            ),
        ))
    })
    .await?;
    eventually("the edits to reach the branch", || async {
        let rows = sqlite_customers(&branch_db)?;
        Ok(differs(
            &(rows[0].2, rows[0].4.clone(), rows[3].4.clone()),
            &(Some(9999), Some(cut.clone()), text("call first")),
        ))
    })
    .await?;

    // Bob is closed in the ERP: he leaves the branch, and nowhere else.
    set_bob_state(&client, &branch_db, "closed").await?;
    eventually("Bob to be inactive in the CRM", || async {
        let bob = sqlite_customers(&crm_db)?
            .into_iter()
            .find(|c| c.1 == text("bob@example.com"));
        Ok(differs(&bob.map(|c| c.3), &Some(text("inactive"))))
    })
    .await?;
    assert_eq!(
        pg_contacts(&client).await?.len(),
        6,
        "nothing deleted in the ERP"
    );
    // Reopened, Bob comes back to the branch as a new row of its own; closed
    // again, he leaves again.
    set_bob_state(&client, &branch_db, "open").await?;
    set_bob_state(&client, &branch_db, "closed").await?;

    // Quiet: nothing is captured or written any more.
    let agents = [&agent_crm, &agent_erp, &agent_branch, &agent_hub];
    let before = stats(&agents).await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        stats(&agents).await?,
        before,
        "the agents kept working after the last edit"
    );
    // No duplicate appeared on the way.
    assert_eq!(sqlite_customers(&crm_db)?.len(), 6);
    assert_eq!(sqlite_customers(&branch_db)?.len(), 4);
    for agent in [&agent_crm, &agent_erp, &agent_branch] {
        assert!(
            agent.reader().dead_letters()?.is_empty(),
            "{:?}",
            agent.reader().dead_letters()?
        );
    }
    for agent in [agent_crm, agent_erp, agent_branch, agent_hub] {
        agent.shutdown().await;
    }
    Ok(())
}

/// Sets Bob's state in the ERP and waits until the filtered branch holds him as an
/// active customer (`open`) or not at all (`closed`).
async fn set_bob_state(client: &Client, branch_db: &Path, state: &str) -> anyhow::Result<()> {
    client
        .execute(
            "UPDATE contacts SET state = $1 WHERE email = 'bob@example.com'",
            &[&state],
        )
        .await?;
    let expected = (state == "open").then(|| (text("Bob"), text("active")));
    eventually(
        &format!("the branch to follow Bob's state {state}"),
        || async {
            let bob = sqlite_customers(branch_db)?
                .into_iter()
                .find(|c| c.1 == text("bob@example.com"));
            Ok(differs(&bob.map(|c| (c.0, c.3)), &expected))
        },
    )
    .await
}

async fn stats(
    agents: &[&RunningAgent],
) -> anyhow::Result<Vec<concord_agent::engine::EngineStats>> {
    let mut all = Vec::new();
    for agent in agents {
        all.push(
            agent
                .stats()
                .await
                .ok_or_else(|| anyhow::anyhow!("no stats"))?,
        );
    }
    Ok(all)
}

/// The mapping example in README.md, with the test server's address.
fn readme_example(pg: &Postgres) -> anyhow::Result<String> {
    let readme =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../README.md"))?;
    let Some((_, after)) = readme.split_once("<!-- mapping example -->\n```toml\n") else {
        bail!("README.md has no mapping example");
    };
    let Some((example, _)) = after.split_once("```") else {
        bail!("the mapping example is not closed");
    };
    Ok(example.replace(
        "postgresql://concord:secret@127.0.0.1:5432/erp",
        &pg.url("erp"),
    ))
}

/// `concord check` on `config`: whether it passed, and what it printed.
fn concord_check(config: &Path) -> anyhow::Result<(bool, String)> {
    let output = std::process::Command::new(concord_tests::concord_bin()?)
        .args(["check", "--config"])
        .arg(config)
        .output()?;
    let printed = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    Ok((output.status.success(), printed))
}

/// Writes `text` to `config` and runs `concord check` on it, which must refuse it;
/// returns what it printed.
fn refused(config: &Path, text: &str) -> anyhow::Result<String> {
    std::fs::write(config, text)?;
    let (ok, printed) = concord_check(config)?;
    if ok {
        bail!("concord check accepted a wrong config: {printed}");
    }
    Ok(printed)
}

/// The line number (1-based) of the first line of `text` holding `needle`.
fn line_of(text: &str, needle: &str) -> usize {
    text.lines()
        .position(|l| l.contains(needle))
        .map_or(0, |i| i + 1)
}

/// The README's complete mapping example is accepted by `concord check` against
/// real tools, and a mapping that does not fit the real schema is refused with the
/// file, the line and the entry, with nothing changed in the tools.
#[tokio::test(flavor = "multi_thread")]
async fn concord_check_accepts_the_readme_example_and_names_what_is_wrong() -> anyhow::Result<()> {
    let tmp = tempfile::tempdir()?;
    let pg = Postgres::start()?;
    pg.create_database("erp")?;
    pg.psql("erp", PG_CONTACTS)?;
    rusqlite::Connection::open(tmp.path().join("crm.db"))?.execute_batch(FILTERED_CUSTOMERS)?;
    let example = readme_example(&pg)?;
    let config = tmp.path().join("concord.toml");
    std::fs::write(&config, &example)?;
    let (ok, printed) = concord_check(&config)?;
    assert!(ok, "{printed}");
    assert!(printed.contains("ok (2 tools, 1 collections)"), "{printed}");
    // Checking changed nothing: no outbox, no triggers, in either tool.
    let tables: i64 = rusqlite::Connection::open(tmp.path().join("crm.db"))?.query_row(
        "SELECT count(*) FROM sqlite_master WHERE name LIKE '_concord%'",
        [],
        |r| r.get(0),
    )?;
    assert_eq!(tables, 0);
    let schemas = pg.psql(
        "erp",
        "SELECT count(*) FROM pg_namespace WHERE nspname = '_concord'",
    )?;
    assert!(schemas.trim().ends_with('0'), "{schemas}");

    // Cents into a text column: refused, naming file, line and entry.
    let wrong = example.replace(
        "max_length = 40",
        "max_length = 40\nconvert = \"minor_units\"",
    );
    let line = line_of(&wrong, "max_length = 40") + 1;
    let printed = refused(&config, &wrong)?;
    assert!(
        printed.contains(&format!("concord.toml:{line}:")),
        "{printed}"
    );
    assert!(
        printed.contains("column `notes` is text, and this needs an integer column"),
        "{printed}"
    );
    // A misspelt column of a field table is named at its own line.
    let wrong = example.replace("column = \"label\"", "column = \"lable\"");
    let line = line_of(&wrong, "\"lable\"");
    let printed = refused(&config, &wrong)?;
    let at = format!("concord.toml:{line}: `tool[0].collection[0].field[4].column`");
    assert!(printed.contains(&at), "{printed}");
    assert!(printed.contains("no column `lable`"), "{printed}");
    // A filter that does not compile names the tool, collection and expression.
    let wrong = example.replace("filter = 'status == \"active\"'", "filter = 'status =='");
    let printed = refused(&config, &wrong)?;
    assert!(
        printed.contains("tool `crm`, collection `customers`: the CEL expression `status ==`"),
        "{printed}"
    );
    Ok(())
}
