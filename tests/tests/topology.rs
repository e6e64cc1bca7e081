//! More than two agents: relaying through the middle of a line.

use concord_tests::{Node, converged};

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
