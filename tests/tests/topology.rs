//! Topologies: relaying through the middle of a line, a hub with no tool of its
//! own, and one agent keeping two tools in sync.

use concord_tests::{Node, converged, create_db, dbs_converged, sqlite_tool};

#[tokio::test(flavor = "multi_thread")]
async fn three_agents_in_a_line_converge() -> anyhow::Result<()> {
    let tmp = tempfile::tempdir()?;
    let mut a = Node::new(tmp.path(), "a")?;
    let mut b = Node::new(tmp.path(), "b")?;
    let mut c = Node::new(tmp.path(), "c")?;
    // A – B – C: A and C know only B; B accepts both.
    b.configure("127.0.0.1:0", &[(a.id(), None), (c.id(), None)])?;
    let agent_b = b.start().await?;
    let addr_b = Some(agent_b.local_addr().to_string());
    a.configure("127.0.0.1:0", &[(b.id(), addr_b.clone())])?;
    c.configure("127.0.0.1:0", &[(b.id(), addr_b)])?;
    let agent_a = a.start().await?;
    let agent_c = c.start().await?;

    a.db()?
        .execute("INSERT INTO customers (id, name) VALUES (1, 'from a')", [])?;
    c.db()?
        .execute("INSERT INTO customers (id, name) VALUES (2, 'from c')", [])?;
    b.db()?
        .execute("INSERT INTO customers (id, name) VALUES (3, 'from b')", [])?;
    let rows = converged(&[&a, &b, &c]).await?;
    assert_eq!(rows.len(), 3);

    a.db()?
        .execute("UPDATE customers SET city = 'Paris' WHERE id = 2", [])?;
    c.db()?
        .execute("UPDATE customers SET age = 50 WHERE id = 1", [])?;
    let rows = converged(&[&a, &b, &c]).await?;
    assert_eq!(rows[0].4, Some(50));
    assert_eq!(rows[1].3.as_deref(), Some("Paris"));
    c.db()?.execute("DELETE FROM customers WHERE id = 3", [])?;
    let rows = converged(&[&a, &b, &c]).await?;
    assert_eq!(rows.len(), 2);

    for agent in [agent_a, agent_b, agent_c] {
        agent.shutdown().await;
    }
    Ok(())
}

/// One agent with two SQLite tools keeps them in sync with each other, both ways,
/// with no peer at all: inserts, updates and deletes, and then quiet.
#[tokio::test(flavor = "multi_thread")]
async fn one_agent_keeps_two_of_its_tools_in_sync() -> anyhow::Result<()> {
    let tmp = tempfile::tempdir()?;
    let mut node = Node::new(tmp.path(), "a")?;
    let crm = node.files.db.clone();
    let erp = node.files.dir.join("erp.db");
    create_db(&erp)?;
    // The same ids in both tools: a shared key (tool ids are the identity test's).
    let body = format!(
        "{}{}",
        sqlite_tool("crm", "app.db"),
        sqlite_tool("erp", "erp.db")
    )
    .replace("columns = [", "identity = \"shared_key\"\ncolumns = [");
    node.configure_with("127.0.0.1:0", &[], &body)?;
    let agent = node.start().await?;

    let db_crm = node.db()?;
    let db_erp = rusqlite::Connection::open(&erp)?;
    db_crm.execute(
        "INSERT INTO customers (id, name, age) VALUES (1, 'Ada', 36)",
        [],
    )?;
    db_erp.execute(
        "INSERT INTO customers (id, name, city) VALUES (2, 'Grace', 'Arlington')",
        [],
    )?;
    let rows = dbs_converged(&[&crm, &erp]).await?;
    assert_eq!(rows.len(), 2);
    assert_eq!(rows[0].1.as_deref(), Some("Ada"));
    assert_eq!(rows[1].3.as_deref(), Some("Arlington"));

    db_erp.execute(
        "UPDATE customers SET email = 'ada@example.com' WHERE id = 1",
        [],
    )?;
    db_crm.execute("DELETE FROM customers WHERE id = 2", [])?;
    let rows = dbs_converged(&[&crm, &erp]).await?;
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].2.as_deref(), Some("ada@example.com"));
    assert_eq!(rows[0].4, Some(36));

    // Quiet: no write goes back and forth between the two tools.
    let stats = agent
        .stats()
        .await
        .ok_or_else(|| anyhow::anyhow!("no stats"))?;
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    let later = agent
        .stats()
        .await
        .ok_or_else(|| anyhow::anyhow!("no stats"))?;
    assert_eq!(stats, later, "the agent kept working after the last edit");
    agent.shutdown().await;
    Ok(())
}

/// A hub with no tool of its own relays between agents that know only the hub.
#[tokio::test(flavor = "multi_thread")]
async fn a_hub_without_a_tool_relays_between_its_spokes() -> anyhow::Result<()> {
    let tmp = tempfile::tempdir()?;
    let mut hub = Node::new(tmp.path(), "hub")?;
    let mut a = Node::new(tmp.path(), "a")?;
    let mut b = Node::new(tmp.path(), "b")?;
    hub.configure_with(
        "127.0.0.1:0",
        &[(a.id(), None), (b.id(), None)],
        "[[collection]]\nname = \"customers\"\n",
    )?;
    let agent_hub = hub.start().await?;
    let addr = Some(agent_hub.local_addr().to_string());
    a.configure("127.0.0.1:0", &[(hub.id(), addr.clone())])?;
    b.configure("127.0.0.1:0", &[(hub.id(), addr)])?;
    let agent_a = a.start().await?;
    let agent_b = b.start().await?;

    a.db()?
        .execute("INSERT INTO customers (id, name) VALUES (1, 'from a')", [])?;
    b.db()?
        .execute("INSERT INTO customers (id, name) VALUES (2, 'from b')", [])?;
    let rows = converged(&[&a, &b]).await?;
    assert_eq!(rows.len(), 2);
    b.db()?
        .execute("UPDATE customers SET city = 'Oslo' WHERE id = 1", [])?;
    let rows = converged(&[&a, &b]).await?;
    assert_eq!(rows[0].3.as_deref(), Some("Oslo"));
    // The hub stores what it relays, and writes nowhere.
    assert_eq!(agent_hub.reader().doc_count()?, 2);
    assert_eq!(
        hub.rows()?.len(),
        0,
        "the hub's unused database stays untouched"
    );

    for agent in [agent_a, agent_b, agent_hub] {
        agent.shutdown().await;
    }
    Ok(())
}
