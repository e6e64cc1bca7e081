//! Conflicts, deletes and dead letters a person can see and decide, against real
//! agent processes over real QUIC with real SQLite and PostgreSQL: each conflict
//! policy with a same-field conflict made while the agents were apart (latest edit
//! with a skewed clock, system of record, manual resolved with the CLI), delete wins
//! and edit wins, held deletes approved and rejected, a PostgreSQL constraint that
//! turns a record into a dead letter until it is fixed and retried, `history`, and
//! the admin API's token.

use anyhow::Context;
use concord_agent::admin::{AdminClient, ClientError, HistoryView};
use concord_tests::postgres::Postgres;
use concord_tests::{COLUMNS, Node, Process, admin, cli, converged, eventually, free_udp_addr};

/// The one tool of every agent here, syncing customers by their shared id, and the
/// collection's policies (`policy`: lines of the `[[collection]]` table).
fn body(policy: &str) -> String {
    format!(
        "[[tool]]\nname = \"app\"\nkind = \"sqlite\"\npath = \"app.db\"\n\n\
         [[tool.collection]]\nname = \"customers\"\ntable = \"customers\"\nprimary_key = \"id\"\n\
         columns = [\"name\", \"email\", \"city\", \"age\"]\nidentity = \"shared_key\"\n\n\
         [[collection]]\nname = \"customers\"\n{policy}\n"
    )
}

/// Two agents that dial each other on fixed loopback ports (they keep them across
/// restarts), with the collection policies `policy_a` and `policy_b`.
fn pair(root: &std::path::Path, policy_a: &str, policy_b: &str) -> anyhow::Result<(Node, Node)> {
    let mut a = Node::new(root, "a")?;
    let mut b = Node::new(root, "b")?;
    let (addr_a, addr_b) = (free_udp_addr()?, free_udp_addr()?);
    a.configure_with(&addr_a, &[(b.id(), Some(addr_b.clone()))], &body(policy_a))?;
    b.configure_with(&addr_b, &[(a.id(), Some(addr_a))], &body(policy_b))?;
    Ok((a, b))
}

/// Creates customer 1 on A, waits until B holds it too, and stops both agents: from
/// here on they are apart.
async fn seed_and_part(a: &Node, b: &Node) -> anyhow::Result<()> {
    let (pa, pb) = (Process::start(a)?, Process::start(b)?);
    a.db()?.execute(
        "INSERT INTO customers (id, name, email, city, age) VALUES (1, 'Ada', 'ada@example.com', 'Paris', 36)",
        [],
    )?;
    let rows = converged(&[a, b]).await?;
    assert_eq!(rows.len(), 1);
    pa.stop()?;
    pb.stop()?;
    Ok(())
}

/// The history entries of `field` of customer 1 on `node`'s agent.
async fn field_history(node: &Node, field: &str) -> anyhow::Result<Vec<HistoryView>> {
    let history = admin(node)?.history("customers", "1", None).await?;
    Ok(history
        .entries
        .into_iter()
        .filter(|e| e.field == field)
        .collect())
}

/// Waits until `node`'s agent (running alone) captured `city` as customer 1's city.
async fn captured_city(node: &Node, city: &str) -> anyhow::Result<()> {
    let want = serde_json::Value::String(city.to_owned());
    eventually(&format!("the agent to capture city {city}"), async || {
        let entries = field_history(node, "city").await?;
        Ok(entries
            .iter()
            .any(|e| e.current && e.value.as_ref().is_some_and(|v| v.value == want))
            .then_some(()))
    })
    .await
}

/// The city of customer 1 in every node's database, once they agree.
async fn agreed_city(nodes: &[&Node]) -> anyhow::Result<Option<String>> {
    let rows = converged(nodes).await?;
    Ok(rows.first().and_then(|r| r.3.clone()))
}

/// Waits until every node's database holds `city` as customer 1's city. The tools
/// can agree on the old value for a moment after a decision commits, so waiting for
/// agreement alone would race the write-back.
async fn city_everywhere(nodes: &[&Node], city: &str) -> anyhow::Result<()> {
    eventually(&format!("city {city} in every tool"), async || {
        for node in nodes {
            let rows = node.rows()?;
            if rows.first().and_then(|r| r.3.as_deref()) != Some(city) {
                return Ok(None);
            }
        }
        Ok(Some(()))
    })
    .await
}

const FAKETIME_LIB: &str = "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1";

#[tokio::test(flavor = "multi_thread")]
async fn latest_edit_settles_a_same_field_conflict_by_recorded_time_even_with_a_skewed_clock()
-> anyhow::Result<()> {
    anyhow::ensure!(
        std::path::Path::new(FAKETIME_LIB).exists(),
        "{FAKETIME_LIB} is missing: install Debian's `faketime` package"
    );
    let tmp = tempfile::tempdir()?;
    let (a, b) = pair(tmp.path(), "", "")?;
    seed_and_part(&a, &b).await?;
    // Apart, both change the city. B captures its edit first; A, whose clock is an
    // hour behind, captures its own later in real time but an hour earlier by its
    // clock.
    a.db()?
        .execute("UPDATE customers SET city = 'Lyon' WHERE id = 1", [])?;
    b.db()?
        .execute("UPDATE customers SET city = 'Nice' WHERE id = 1", [])?;
    let pb = Process::start(&b)?;
    captured_city(&b, "Nice").await?;
    let skewed = [
        ("LD_PRELOAD", FAKETIME_LIB),
        ("FAKETIME", "-3600"),
        ("FAKETIME_DONT_FAKE_MONOTONIC", "1"),
    ];
    let pa = Process::start_with_env(&a, Some("warn"), std::process::Stdio::inherit(), &skewed)?;
    // The latest recorded edit wins on both sides, and both tools hold it.
    city_everywhere(&[&a, &b], "Nice").await?;
    // `history` tells why: A's value was recorded an hour in the past, and the
    // latest edit policy chose B's.
    let now = concord_agent::core::now_ms();
    for node in [&a, &b] {
        let city = eventually("the decision in the history", async || {
            let entries = field_history(node, "city").await?;
            let decided = entries.iter().any(|e| {
                e.current
                    && e.decided_by_policy.as_deref() == Some("latest_edit")
                    && e.value.as_ref().is_some_and(|v| v.display == "\"Nice\"")
            });
            Ok(decided.then_some(entries))
        })
        .await?;
        let lyon = city
            .iter()
            .find(|e| e.value.as_ref().is_some_and(|v| v.display == "\"Lyon\""))
            .context("A's value is in the history")?;
        assert!(
            lyon.time_ms < now - 30 * 60 * 1000,
            "A's edit was recorded by its skewed clock: {lyon:?}"
        );
        assert!(!lyon.current);
        assert_eq!(lyon.tool, "app");
    }
    pa.stop()?;
    pb.stop()?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn system_of_record_wins_a_same_field_conflict_whoever_edited_last() -> anyhow::Result<()> {
    let tmp = tempfile::tempdir()?;
    let (mut a, mut b) = pair(tmp.path(), "", "")?;
    // A's tool is the system of record for the whole collection.
    let agent_a: String = a.id().to_string().chars().take(8).collect();
    let policy =
        format!("conflicts = \"system_of_record\"\nsystem_of_record = \"{agent_a}.app\"\n");
    let (addr_a, addr_b) = (
        a.config.as_ref().context("a")?.listen.to_string(),
        b.config.as_ref().context("b")?.listen.to_string(),
    );
    a.configure_with(&addr_a, &[(b.id(), Some(addr_b.clone()))], &body(&policy))?;
    b.configure_with(&addr_b, &[(a.id(), Some(addr_a))], &body(&policy))?;
    seed_and_part(&a, &b).await?;
    // A edits first, B after: the latest edit is B's, but A's tool decides.
    a.db()?
        .execute("UPDATE customers SET city = 'Lyon' WHERE id = 1", [])?;
    let pa = Process::start(&a)?;
    captured_city(&a, "Lyon").await?;
    b.db()?
        .execute("UPDATE customers SET city = 'Nice' WHERE id = 1", [])?;
    let pb = Process::start(&b)?;
    city_everywhere(&[&a, &b], "Lyon").await?;
    let entries = field_history(&b, "city").await?;
    assert!(
        entries.iter().any(|e| e.current
            && e.decided_by_policy.as_deref() == Some("system_of_record")
            && e.agent == agent_a),
        "{entries:#?}"
    );
    pa.stop()?;
    pb.stop()?;
    Ok(())
}

/// Two agents whose `city` is settled by a person, each of which set customer 1's
/// city (Lyon on A, Nice on B) while apart, running again.
async fn manual_city_conflict(
    root: &std::path::Path,
) -> anyhow::Result<(Node, Node, Process, Process)> {
    let manual = "[collection.fields.city]\nconflicts = \"manual\"\n";
    let (a, b) = pair(root, manual, manual)?;
    seed_and_part(&a, &b).await?;
    a.db()?
        .execute("UPDATE customers SET city = 'Lyon' WHERE id = 1", [])?;
    b.db()?
        .execute("UPDATE customers SET city = 'Nice' WHERE id = 1", [])?;
    let (pa, pb) = (Process::start(&a)?, Process::start(&b)?);
    Ok((a, b, pa, pb))
}

#[tokio::test(flavor = "multi_thread")]
async fn a_manual_conflict_waits_in_the_queue_until_resolved_with_the_cli() -> anyhow::Result<()> {
    let tmp = tempfile::tempdir()?;
    let (a, b, pa, pb) = manual_city_conflict(tmp.path()).await?;
    // Both agents list the conflict; meanwhile the tools agree on one value.
    for node in [&a, &b] {
        eventually("the conflict in the queue", async || {
            Ok((admin(node)?.conflicts().await?.len() == 1).then_some(()))
        })
        .await?;
    }
    let interim = agreed_city(&[&a, &b]).await?;
    assert!(
        matches!(interim.as_deref(), Some("Lyon" | "Nice")),
        "{interim:?}"
    );
    let listed = cli(&a, &["conflicts", "list"])?;
    let id = listed
        .lines()
        .find(|l| l.contains("customers.city"))
        .and_then(|l| l.split_whitespace().next())
        .with_context(|| format!("a conflict listed: {listed}"))?
        .to_owned();
    assert!(
        listed.contains("\"Lyon\"") && listed.contains("\"Nice\""),
        "{listed}"
    );
    let shown = cli(&a, &["conflicts", "show", &id])?;
    assert!(shown.contains("history of the field"), "{shown}");
    // A person types a third value: every tool takes it, and both queues empty.
    cli(&a, &["conflicts", "resolve", &id, "--value", "Marseille"])?;
    city_everywhere(&[&a, &b], "Marseille").await?;
    for node in [&a, &b] {
        eventually("the queue to empty", async || {
            Ok(admin(node)?.conflicts().await?.is_empty().then_some(()))
        })
        .await?;
    }
    // Named by its key in the tool too: a shared key needs no link to find it.
    for args in [
        &["history", "customers", "1"][..],
        &["history", "customers", "1", "--tool", "app"],
    ] {
        let history = cli(&b, args)?;
        assert!(
            history.lines().any(|l| l.contains("Marseille")
                && l.contains("chosen by manual")
                && l.contains("<- current")),
            "{args:?}: {history}"
        );
    }
    // Resolving it again is refused with a clear message.
    let again = cli(&a, &["conflicts", "resolve", &id, "--pick", "0"]);
    assert!(
        again
            .as_ref()
            .is_err_and(|e| e.to_string().contains("no open conflict")),
        "{again:?}"
    );
    pa.stop()?;
    pb.stop()?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_delete_concurrent_with_an_edit_settles_by_the_delete_policy() -> anyhow::Result<()> {
    for (policy, survives) in [
        ("deletes = \"delete_wins\"", false),
        ("deletes = \"edit_wins\"", true),
    ] {
        let tmp = tempfile::tempdir()?;
        let (a, b) = pair(tmp.path(), policy, policy)?;
        seed_and_part(&a, &b).await?;
        a.db()?.execute("DELETE FROM customers WHERE id = 1", [])?;
        b.db()?
            .execute("UPDATE customers SET name = 'Ada B' WHERE id = 1", [])?;
        let (pa, pb) = (Process::start(&a)?, Process::start(&b)?);
        // Both captured and exchanged before the outcome is judged.
        for node in [&a, &b] {
            eventually("both changes in the history", async || {
                let history = admin(node)?.history("customers", "1", None).await?;
                let deleted = history.entries.iter().any(|e| e.field == "(deleted)");
                let edited = history
                    .entries
                    .iter()
                    .any(|e| e.value.as_ref().is_some_and(|v| v.display == "\"Ada B\""));
                Ok((deleted && edited).then_some(()))
            })
            .await?;
        }
        let rows = converged(&[&a, &b]).await?;
        if survives {
            assert_eq!(rows.len(), 1, "{policy}: {rows:?}");
            assert_eq!(rows[0].1.as_deref(), Some("Ada B"), "{policy}");
            assert_eq!(
                rows[0].3.as_deref(),
                Some("Paris"),
                "{policy}: the record comes back whole"
            );
        } else {
            assert!(rows.is_empty(), "{policy}: {rows:?}");
        }
        pa.stop()?;
        pb.stop()?;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn held_deletes_wait_for_approval_and_a_rejected_one_is_restored() -> anyhow::Result<()> {
    let tmp = tempfile::tempdir()?;
    let (a, b) = pair(tmp.path(), "hold_deletes = [\"app\"]", "")?;
    let (pa, pb) = (Process::start(&a)?, Process::start(&b)?);
    a.db()?.execute_batch(
        "INSERT INTO customers (id, name, city) VALUES (1, 'Ada', 'Paris');
         INSERT INTO customers (id, name, city) VALUES (2, 'Bob', 'Oslo');",
    )?;
    assert_eq!(converged(&[&a, &b]).await?.len(), 2);
    a.db()?.execute("DELETE FROM customers", [])?;
    eventually("two held deletes", async || {
        Ok((admin(&a)?.held_deletes().await?.len() == 2).then_some(()))
    })
    .await?;
    assert_eq!(b.rows()?.len(), 2, "held deletes do not leave A");
    let listed = cli(&a, &["deletes", "list"])?;
    assert!(
        listed.contains("app/customers/1") && listed.contains("app/customers/2"),
        "{listed}"
    );
    cli(&a, &["deletes", "approve", "app/customers/1"])?;
    cli(&a, &["deletes", "reject", "app/customers/2"])?;
    // The approved delete reaches B; the rejected one comes back in A.
    let rows = converged(&[&a, &b]).await?;
    assert_eq!(rows.len(), 1, "{rows:?}");
    assert_eq!(
        (rows[0].0, rows[0].1.as_deref(), rows[0].3.as_deref()),
        (2, Some("Bob"), Some("Oslo"))
    );
    assert!(admin(&a)?.held_deletes().await?.is_empty());
    let unknown = cli(&a, &["deletes", "approve", "app/customers/9"]);
    assert!(
        unknown
            .as_ref()
            .is_err_and(|e| e.to_string().contains("no held delete")),
        "{unknown:?}"
    );
    pa.stop()?;
    pb.stop()?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_record_postgres_refuses_is_a_dead_letter_until_fixed_and_retried() -> anyhow::Result<()>
{
    let pg = Postgres::start()?;
    pg.create_database("crm")?;
    pg.psql(
        "crm",
        "CREATE TABLE customers (id bigserial PRIMARY KEY, name text, email text, city text,
           age integer CONSTRAINT age_not_negative CHECK (age >= 0))",
    )?;
    let tmp = tempfile::tempdir()?;
    let mut a = Node::new(tmp.path(), "a")?;
    let mut b = Node::new(tmp.path(), "b")?;
    let (addr_a, addr_b) = (free_udp_addr()?, free_udp_addr()?);
    a.configure_with(
        &addr_a,
        &[(b.id(), Some(addr_b.clone()))],
        &concord_tests::sqlite_tool("app", "app.db"),
    )?;
    b.configure_with(
        &addr_b,
        &[(a.id(), Some(addr_a))],
        &pg.tool("crm", "crm", "customers", &COLUMNS),
    )?;
    let (pa, pb) = (Process::start(&a)?, Process::start(&b)?);
    let client = pg.connect("crm").await?;
    a.db()?.execute_batch(
        "INSERT INTO customers (name, age) VALUES ('Negative', -5);
         INSERT INTO customers (name, age) VALUES ('Fine', 30);",
    )?;
    // The refused record waits as a dead letter with PostgreSQL's reason, retried
    // automatically with growing waits; the other record syncs.
    let letter = eventually("a dead letter retried once", async || {
        let letters = admin(&b)?.dead_letters().await?;
        Ok(letters.into_iter().find(|l| l.attempts >= 2))
    })
    .await?;
    assert_eq!(letter.kind, "rejected");
    assert!(letter.reason.contains("age_not_negative"), "{letter:?}");
    assert!(letter.retry_at.is_some());
    let names: Vec<String> = client
        .query("SELECT name FROM customers", &[])
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(names, vec!["Fine".to_owned()]);
    let listed = cli(&b, &["dead-letters", "list"])?;
    assert!(
        listed.contains("[rejected]") && listed.contains(&letter.id),
        "{listed}"
    );
    // The cause is fixed; a person retries it at once.
    client
        .batch_execute("ALTER TABLE customers DROP CONSTRAINT age_not_negative")
        .await?;
    match cli(&b, &["dead-letters", "retry", &letter.id]) {
        Ok(_) => {}
        // The automatic retry came first: the letter is gone already.
        Err(e) if e.to_string().contains("no dead letter") => {}
        Err(e) => return Err(e),
    }
    eventually("the record in PostgreSQL", async || {
        let count: i64 = client
            .query_one(
                "SELECT count(*) FROM customers WHERE name = 'Negative' AND age = -5",
                &[],
            )
            .await?
            .get(0);
        Ok((count == 1).then_some(()))
    })
    .await?;
    eventually("the letter cleared", async || {
        Ok(admin(&b)?.dead_letters().await?.is_empty().then_some(()))
    })
    .await?;
    pa.stop()?;
    pb.stop()?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn the_admin_api_needs_its_token_and_a_token_off_loopback() -> anyhow::Result<()> {
    let tmp = tempfile::tempdir()?;
    let mut a = Node::new(tmp.path(), "a")?;
    // Off loopback without a token: refused, naming the key and its line.
    let open = format!("{}\n[admin]\nlisten = \"0.0.0.0:7391\"\n", body(""));
    let refused = a.configure_with("127.0.0.1:0", &[], &open);
    let message = format!("{:#}", refused.err().context("refused")?);
    assert!(
        message.contains("admin.token") && message.contains("not a loopback"),
        "{message}"
    );
    // With a token it is accepted (not started here: tests stay on loopback).
    let guarded = format!("{open}token = \"s3cret\"\n");
    a.configure_with("127.0.0.1:0", &[], &guarded)?;
    // On loopback with a token, every request must carry it.
    let local = format!(
        "{}\n[admin]\nlisten = \"127.0.0.1:0\"\ntoken = \"s3cret\"\n",
        body("")
    );
    a.configure_with("127.0.0.1:0", &[], &local)?;
    let agent = a.start().await?;
    for token in [None, Some("wrong".to_owned())] {
        let answer = AdminClient::new(agent.admin_addr(), token)
            .conflicts()
            .await;
        assert!(
            matches!(answer, Err(ClientError::Api { status: 401, .. })),
            "{answer:?}"
        );
    }
    let answer = AdminClient::new(agent.admin_addr(), Some("s3cret".to_owned()))
        .conflicts()
        .await?;
    assert!(answer.is_empty());
    // The CLI reads the token and the address from the config.
    let listed = cli(&a, &["conflicts", "list"])?;
    assert!(listed.contains("no conflicts"), "{listed}");
    agent.shutdown().await;
    Ok(())
}

/// The dashboard in a real headless Chromium: it shows the peer connected and the
/// conflict, and a click on one of the values settles it, in the page and in the
/// tools.
#[tokio::test(flavor = "multi_thread")]
async fn the_dashboard_shows_a_conflict_and_a_click_resolves_it() -> anyhow::Result<()> {
    use fantoccini::Locator;
    let tmp = tempfile::tempdir()?;
    let (a, b, pa, pb) = manual_city_conflict(tmp.path()).await?;
    let conflict = eventually("the conflict in A's queue", async || {
        Ok(admin(&a)?.conflicts().await?.into_iter().next())
    })
    .await?;
    let browser = concord_tests::browser::Browser::start().await?;
    let page = browser.client.clone();
    page.goto(&format!("{}/", a.admin_url()?)).await?;
    let wait = || page.wait().at_most(concord_tests::CONVERGE_TIMEOUT);
    // The peer, connected.
    let state = format!("#peers tr[data-peer=\"{}\"] td.state", b.id());
    eventually("the peer shown connected", async || {
        let cell = wait().for_element(Locator::Css(&state)).await?;
        Ok((cell.text().await? == "connected").then_some(()))
    })
    .await?;
    // The conflict, with both values; pick Lyon.
    let item = format!("#conflicts [data-conflict=\"{}\"]", conflict.id);
    let item = wait().for_element(Locator::Css(&item)).await?;
    let mut picked = false;
    for value in item.find_all(Locator::Css("li")).await? {
        let text = value.text().await?;
        if text.contains("Lyon") {
            value
                .find(Locator::Css("button.pick"))
                .await?
                .click()
                .await?;
            picked = true;
            break;
        }
    }
    assert!(
        picked,
        "a value Lyon is listed: {}",
        item.html(false).await?
    );
    // Gone from the page, from both queues, and Lyon in both tools.
    wait().for_element(Locator::Css("#no-conflicts")).await?;
    city_everywhere(&[&a, &b], "Lyon").await?;
    for node in [&a, &b] {
        eventually("the queue to empty", async || {
            Ok(admin(node)?.conflicts().await?.is_empty().then_some(()))
        })
        .await?;
    }
    let activity = page.find(Locator::Css("#activity")).await?.text().await?;
    assert!(activity.contains("resolved"), "{activity}");
    browser.close().await?;
    pa.stop()?;
    pb.stop()?;
    Ok(())
}
