//! The throwaway PostgreSQL server the PostgreSQL tests run against: started by the
//! harness from the installed server binaries, never a shared one.

use concord_tests::postgres::Postgres;

/// The harness starts its own server on a free loopback port, which keeps data
/// across a clean restart and forgets nothing committed across a crash.
#[test]
fn a_throwaway_server_starts_keeps_data_and_restarts() -> anyhow::Result<()> {
    let pg = Postgres::start()?;
    pg.create_database("crm")?;
    pg.psql(
        "crm",
        "CREATE TABLE customers (id bigserial PRIMARY KEY, name text); \
         INSERT INTO customers (name) VALUES ('Ada')",
    )?;
    assert_eq!(pg.psql("crm", "SELECT id, name FROM customers")?, "1|Ada");
    pg.stop_server("immediate")?;
    pg.start_server()?;
    assert_eq!(pg.psql("crm", "SELECT name FROM customers")?, "Ada");
    let other = Postgres::start()?;
    assert_ne!(pg.port, other.port, "two servers, two ports");
    Ok(())
}
