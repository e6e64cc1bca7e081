//! Record identity: tools that assign their own ids never merge two records.

use std::collections::BTreeSet;

use concord_tests::{CONVERGE_TIMEOUT, Node, rows, sqlite_tool, wait_for};

/// The names in the customers table of the database at `path`.
fn names(path: &std::path::Path) -> anyhow::Result<Vec<String>> {
    Ok(rows(path)?.into_iter().filter_map(|r| r.1).collect())
}

/// Waits until both databases hold exactly `expected` names, each once.
async fn holding(a: &Node, b: &Node, expected: &[&str]) -> anyhow::Result<()> {
    let expected: BTreeSet<String> = expected.iter().map(|n| (*n).to_owned()).collect();
    wait_for(
        "both databases to hold the expected customers",
        CONVERGE_TIMEOUT,
        || {
            for node in [a, b] {
                let names = names(&node.files.db)?;
                let set: BTreeSet<String> = names.iter().cloned().collect();
                if names.len() != expected.len() || set != expected {
                    return Ok(false);
                }
            }
            Ok(true)
        },
    )
    .await
}

/// Regression (branch offices lose a customer): sites A and B are offline, each
/// adds a different customer to an autoincrement table, and both get id 6. With
/// the key as identity, both databases ended up holding A's customer and B's was
/// gone. With tool ids (the default for an `INTEGER PRIMARY KEY`), each site gives
/// the other's customer its own next id: both customers survive on both sides, no
/// duplicates, and later edits and deletes follow each record.
#[tokio::test(flavor = "multi_thread")]
async fn two_sites_that_assign_the_same_autoincrement_id_offline_keep_both_records()
-> anyhow::Result<()> {
    let tmp = tempfile::tempdir()?;
    let mut a = Node::new(tmp.path(), "a")?;
    let mut b = Node::new(tmp.path(), "b")?;
    for i in 1..=5 {
        a.db()?.execute(
            "INSERT INTO customers (id, name) VALUES (?1, ?2)",
            rusqlite::params![i, format!("customer {i}")],
        )?;
    }
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
        &sqlite_tool("crm", "app.db"),
    )?;
    let agent_b = b.start().await?;
    let first: Vec<String> = (1..=5).map(|i| format!("customer {i}")).collect();
    let first: Vec<&str> = first.iter().map(String::as_str).collect();
    holding(&a, &b, &first).await?;

    // B goes offline; each site's user adds a customer, and each database gives it
    // its next id: 6 on both sides.
    agent_b.shutdown().await;
    a.db()?.execute(
        "INSERT INTO customers (name, city) VALUES ('Alice at A', 'Lyon')",
        [],
    )?;
    b.db()?.execute(
        "INSERT INTO customers (name, city) VALUES ('Bob at B', 'Oslo')",
        [],
    )?;
    let id_of = |node: &Node, name: &str| -> anyhow::Result<i64> {
        Ok(node
            .db()?
            .query_row("SELECT id FROM customers WHERE name = ?1", [name], |r| {
                r.get(0)
            })?)
    };
    assert_eq!(id_of(&a, "Alice at A")?, 6);
    assert_eq!(id_of(&b, "Bob at B")?, 6);

    let agent_b = b.start().await?;
    let mut all = first.clone();
    all.extend(["Alice at A", "Bob at B"]);
    holding(&a, &b, &all).await?;
    // Each site kept its own id and gave the other's customer its next one.
    assert_eq!(id_of(&a, "Alice at A")?, 6);
    assert_eq!(id_of(&b, "Bob at B")?, 6);
    assert_eq!(id_of(&a, "Bob at B")?, 7);
    assert_eq!(id_of(&b, "Alice at A")?, 7);

    // Edits and deletes follow the record, whatever its id on each side.
    a.db()?.execute(
        "UPDATE customers SET email = 'bob@b.example' WHERE id = 7",
        [],
    )?;
    b.db()?.execute("DELETE FROM customers WHERE id = 7", [])?;
    let mut remaining = first.clone();
    remaining.push("Bob at B");
    holding(&a, &b, &remaining).await?;
    wait_for("Bob's e-mail in B", CONVERGE_TIMEOUT, || {
        Ok(b.db()?
            .query_row("SELECT email FROM customers WHERE id = 6", [], |r| {
                r.get::<_, Option<String>>(0)
            })?
            == Some("bob@b.example".to_owned()))
    })
    .await?;
    agent_a.shutdown().await;
    agent_b.shutdown().await;
    Ok(())
}

/// A row inserted where the tool reused the key of a deleted record is a new
/// record (tool ids): it reaches the other site as a new row, never reviving the
/// dead record there.
#[tokio::test(flavor = "multi_thread")]
async fn a_reused_autoincrement_id_is_a_new_record() -> anyhow::Result<()> {
    let tmp = tempfile::tempdir()?;
    let mut a = Node::new(tmp.path(), "a")?;
    let mut b = Node::new(tmp.path(), "b")?;
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
        &sqlite_tool("crm", "app.db"),
    )?;
    let agent_b = b.start().await?;

    a.db()?.execute(
        "INSERT INTO customers (name, email) VALUES ('Old Name', 'old@example.com')",
        [],
    )?;
    holding(&a, &b, &["Old Name"]).await?;
    a.db()?.execute("DELETE FROM customers WHERE id = 1", [])?;
    holding(&a, &b, &[]).await?;
    // SQLite hands out id 1 again: the highest id is gone.
    a.db()?
        .execute("INSERT INTO customers (name) VALUES ('New Person')", [])?;
    holding(&a, &b, &["New Person"]).await?;
    let email: Option<String> = b
        .db()?
        .query_row("SELECT email FROM customers", [], |r| r.get(0))?;
    assert_eq!(
        email, None,
        "the new record inherited the dead one's e-mail"
    );
    agent_a.shutdown().await;
    agent_b.shutdown().await;
    Ok(())
}

/// A record whose key the tool changes (an UPDATE of the primary key) stays one
/// record under tool ids: the other site keeps its row, with its own id and every
/// field, and later edits flow both ways.
#[tokio::test(flavor = "multi_thread")]
async fn a_changed_primary_key_keeps_one_record() -> anyhow::Result<()> {
    let tmp = tempfile::tempdir()?;
    let mut a = Node::new(tmp.path(), "a")?;
    let mut b = Node::new(tmp.path(), "b")?;
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
        &sqlite_tool("crm", "app.db"),
    )?;
    let agent_b = b.start().await?;

    a.db()?.execute(
        "INSERT INTO customers (id, name, email) VALUES (3, 'Ada', 'ada@example.com')",
        [],
    )?;
    a.db()?
        .execute("INSERT INTO customers (id, name) VALUES (5, 'Bob')", [])?;
    holding(&a, &b, &["Ada", "Bob"]).await?;
    // A delete and a new insert would give Ada a new id in B (SQLite hands out one
    // past the highest).
    let ada_in = |node: &Node| -> anyhow::Result<(i64, Option<String>, Option<String>)> {
        Ok(node.db()?.query_row(
            "SELECT id, email, city FROM customers WHERE name = 'Ada'",
            [],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
        )?)
    };
    let (id_in_b, _, _) = ada_in(&b)?;
    a.db()?.execute(
        "UPDATE customers SET id = 40, city = 'London' WHERE id = 3",
        [],
    )?;
    wait_for("the city in B", CONVERGE_TIMEOUT, || {
        Ok(ada_in(&b)?.2.as_deref() == Some("London"))
    })
    .await?;
    assert_eq!(rows(&b.files.db)?.len(), 2);
    let (id, email, _) = ada_in(&b)?;
    assert_eq!(id, id_in_b, "B's row kept its id");
    assert_eq!(email.as_deref(), Some("ada@example.com"));

    b.db()?
        .execute("UPDATE customers SET age = 36 WHERE id = ?1", [id_in_b])?;
    wait_for("the age in A under the new key", CONVERGE_TIMEOUT, || {
        Ok(a.db()?
            .query_row("SELECT age FROM customers WHERE id = 40", [], |r| {
                r.get::<_, Option<i64>>(0)
            })?
            == Some(36))
    })
    .await?;
    assert_eq!(rows(&a.files.db)?.len(), 2);
    agent_a.shutdown().await;
    agent_b.shutdown().await;
    Ok(())
}
