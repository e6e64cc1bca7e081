//! Bad input gets a clear error naming what and where; nothing else stops.

use concord_agent::agent::{self, StartError};
use concord_agent::config::Config;
use concord_agent::store::LetterReason;
use concord_tests::{Node, converged};

#[test]
fn a_config_with_an_unknown_key_names_file_line_and_key() -> anyhow::Result<()> {
    let tmp = tempfile::tempdir()?;
    let mut a = Node::new(tmp.path(), "a")?;
    a.configure("127.0.0.1:0", &[])?;
    let path = a.config_path();
    let text = std::fs::read_to_string(&path)?.replace(
        "primary_key = \"id\"",
        "primary_key = \"id\"\nprimary_kee = \"id\"",
    );
    std::fs::write(&path, text)?;
    let err = Config::load(&path)
        .expect_err("an unknown key must be refused")
        .to_string();
    assert!(
        err.contains(&path.display().to_string()),
        "file not named: {err}"
    );
    assert!(err.contains("line 15"), "line not named: {err}");
    assert!(err.contains("primary_kee"), "key not named: {err}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_missing_table_names_file_line_and_field() -> anyhow::Result<()> {
    let tmp = tempfile::tempdir()?;
    let mut a = Node::new(tmp.path(), "a")?;
    a.configure("127.0.0.1:0", &[])?;
    let path = a.config_path();
    let text =
        std::fs::read_to_string(&path)?.replace("table = \"customers\"", "table = \"clients\"");
    std::fs::write(&path, text)?;
    let err = agent::start(Config::load(&path)?)
        .await
        .expect_err("a missing table must be refused");
    assert!(matches!(err, StartError::Config(_)), "{err:?}");
    let err = err.to_string();
    assert!(
        err.contains(&format!("{}:13:", path.display())),
        "file and line not named: {err}"
    );
    assert!(
        err.contains("tool[0].collection[0].table"),
        "field not named: {err}"
    );
    assert!(err.contains("clients"), "table not named: {err}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_table_without_a_primary_key_is_refused_clearly() -> anyhow::Result<()> {
    let tmp = tempfile::tempdir()?;
    let mut a = Node::new(tmp.path(), "a")?;
    a.db()?.execute_batch("DROP TABLE customers; CREATE TABLE customers (id INTEGER, name TEXT, email TEXT, city TEXT, age INTEGER);")?;
    a.configure("127.0.0.1:0", &[])?;
    let err = a
        .start()
        .await
        .expect_err("a table without a primary key must be refused")
        .to_string();
    assert!(
        err.contains("customers") && err.contains("PRIMARY KEY"),
        "{err}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_row_that_does_not_fit_its_type_is_set_aside_and_the_rest_syncs() -> anyhow::Result<()> {
    let tmp = tempfile::tempdir()?;
    let mut a = Node::new(tmp.path(), "a")?;
    let mut b = Node::new(tmp.path(), "b")?;
    a.configure("127.0.0.1:0", &[(b.id(), None)])?;
    let agent_a = a.start().await?;
    b.configure(
        "127.0.0.1:0",
        &[(a.id(), Some(agent_a.local_addr().to_string()))],
    )?;
    let agent_b = b.start().await?;

    let db = a.db()?;
    db.execute(
        "INSERT INTO customers (id, name, age) VALUES (1, 'good', 30)",
        [],
    )?;
    db.execute(
        "INSERT INTO customers (id, name, age) VALUES (2, 'bad', 'thirty')",
        [],
    )?;
    db.execute(
        "INSERT INTO customers (id, name, age) VALUES (3, 'good too', 31)",
        [],
    )?;
    concord_tests::wait_for("rows 1 and 3 in B", concord_tests::CONVERGE_TIMEOUT, || {
        Ok(b.rows()?.iter().map(|r| r.0).collect::<Vec<_>>() == [1, 3])
    })
    .await?;
    let letters = agent_a.reader().dead_letters()?;
    assert_eq!(letters.len(), 1, "{letters:?}");
    assert_eq!(
        (letters[0].collection.as_str(), letters[0].key.as_str()),
        ("customers", "2")
    );
    let reason = letters[0].reason.to_string();
    assert!(
        matches!(letters[0].reason, LetterReason::InvalidRow(_)),
        "{reason}"
    );
    assert!(
        reason.contains("age") && reason.contains("thirty"),
        "{reason}"
    );

    // Fixing the row takes it out of the dead letters and syncs it.
    db.execute("UPDATE customers SET age = 30 WHERE id = 2", [])?;
    let rows = converged(&[&a, &b]).await?;
    assert_eq!(rows.len(), 3);
    assert!(agent_a.reader().dead_letters()?.is_empty());
    agent_a.shutdown().await;
    agent_b.shutdown().await;
    Ok(())
}

/// Regression: a failed start left an empty database file behind. A database that
/// does not exist is refused, named, and not created.
#[tokio::test(flavor = "multi_thread")]
async fn a_missing_database_is_refused_and_not_created() -> anyhow::Result<()> {
    let tmp = tempfile::tempdir()?;
    let mut a = Node::new(tmp.path(), "a")?;
    a.configure("127.0.0.1:0", &[])?;
    let path = a.config_path();
    let text = std::fs::read_to_string(&path)?.replace("app.db", "missing.db");
    std::fs::write(&path, text)?;
    let err = agent::start(Config::load(&path)?)
        .await
        .expect_err("a missing database must be refused")
        .to_string();
    assert!(
        err.contains("missing.db") && err.contains("does not exist"),
        "{err}"
    );
    assert!(
        !a.files.dir.join("missing.db").exists(),
        "the database file was created"
    );
    Ok(())
}

/// `tool_ids` on a table whose keys the tool does not assign is refused at start,
/// naming the file, line, field and table, before the store is created.
#[tokio::test(flavor = "multi_thread")]
async fn tool_ids_on_a_key_the_tool_does_not_assign_is_refused() -> anyhow::Result<()> {
    let tmp = tempfile::tempdir()?;
    let mut a = Node::with_schema(
        tmp.path(),
        "a",
        "CREATE TABLE customers (id TEXT PRIMARY KEY, name TEXT, email TEXT, city TEXT, age INTEGER)",
    )?;
    let body = concord_tests::sqlite_tool("crm", "app.db")
        .replace("columns = [", "identity = \"tool_ids\"\ncolumns = [");
    a.configure_with("127.0.0.1:0", &[], &body)?;
    let err = a
        .start()
        .await
        .expect_err("tool_ids on a text key")
        .to_string();
    assert!(err.contains("tool[0].collection[0].identity"), "{err}");
    assert!(err.contains("`customers`"), "{err}");
    assert!(err.contains("shared_key"), "{err}");
    assert!(
        !a.files.dir.join("data").exists(),
        "the store was created before the configuration was checked"
    );
    Ok(())
}
