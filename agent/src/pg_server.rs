//! A throwaway PostgreSQL server for a test or a benchmark: `initdb` and `pg_ctl` from the
//! installed server binaries, into a temporary directory, on a free loopback port.
//! It never touches a server someone else configured. As root, the server runs as
//! the `postgres` OS user (PostgreSQL refuses to run as root).

use std::path::PathBuf;
use std::process::{Command, Output};

use anyhow::{Context, bail};

/// Where Debian installs the server binaries, one folder per major version.
const DEBIAN_BIN_GLOB_ROOT: &str = "/usr/lib/postgresql";
/// The OS user the server runs as when the tests run as root.
const SERVER_USER: &str = "postgres";
/// The password of the `postgres` role: connections over TCP must give it.
pub const PASSWORD: &str = "concord-test";

/// A running PostgreSQL server, stopped and deleted on drop.
#[derive(Debug)]
pub struct Postgres {
    bin: PathBuf,
    root: tempfile::TempDir,
    /// The loopback port it listens on.
    pub port: u16,
    as_root: bool,
}

impl Postgres {
    /// Creates a cluster in a temporary directory and starts it on a free port.
    /// Fails with what to install when the server binaries are missing.
    pub fn start() -> anyhow::Result<Postgres> {
        let bin = server_bin()?;
        let as_root = is_root()?;
        let root = tempfile::Builder::new().prefix("concord-pg").tempdir()?;
        if as_root {
            run(Command::new("chown").arg(SERVER_USER).arg(root.path()))?;
        }
        let port = free_port()?;
        let pg = Postgres {
            bin,
            root,
            port,
            as_root,
        };
        let pwfile = pg.root.path().join("pwfile");
        std::fs::write(&pwfile, PASSWORD)?;
        if as_root {
            run(Command::new("chown").arg(SERVER_USER).arg(&pwfile))?;
        }
        pg.command("initdb")
            .args([
                "--auth-local=trust",
                "--auth-host=scram-sha-256",
                "--username=postgres",
                "--encoding=UTF8",
                "--no-sync",
                "-D",
            ])
            .arg(pg.data())
            .arg(format!("--pwfile={}", pwfile.display()))
            .output()
            .context("running initdb")
            .and_then(check)?;
        pg.start_server()?;
        Ok(pg)
    }

    fn data(&self) -> PathBuf {
        self.root.path().join("data")
    }

    /// The server's log file, for failure messages.
    pub fn log_path(&self) -> PathBuf {
        self.root.path().join("server.log")
    }

    /// A server binary's command, run as the server user when root.
    fn command(&self, name: &str) -> Command {
        let program = self.bin.join(name);
        if self.as_root {
            let mut command = Command::new("runuser");
            command.args(["-u", SERVER_USER, "--"]).arg(program);
            command
        } else {
            Command::new(program)
        }
    }

    /// Starts the server (again) and waits until it accepts connections.
    pub fn start_server(&self) -> anyhow::Result<()> {
        let options = format!(
            "-c listen_addresses=127.0.0.1 -p {} -k {} -c max_connections=50",
            self.port,
            self.root.path().display()
        );
        self.command("pg_ctl")
            .args(["-w", "-t", "30", "-D"])
            .arg(self.data())
            .arg("-l")
            .arg(self.log_path())
            .args(["-o", &options, "start"])
            .output()
            .context("running pg_ctl start")
            .and_then(check)
            .with_context(|| self.log_tail())?;
        Ok(())
    }

    /// Stops the server: `fast` lets it shut down cleanly, `immediate` is a crash.
    pub fn stop_server(&self, mode: &str) -> anyhow::Result<()> {
        self.command("pg_ctl")
            .args(["-w", "-t", "30", "-m", mode, "-D"])
            .arg(self.data())
            .arg("stop")
            .output()
            .context("running pg_ctl stop")
            .and_then(check)?;
        Ok(())
    }

    /// Creates the database `name`.
    pub fn create_database(&self, name: &str) -> anyhow::Result<()> {
        self.psql("postgres", &format!("CREATE DATABASE \"{name}\""))?;
        Ok(())
    }

    /// Runs `sql` in database `db` with psql and returns its unaligned output
    /// (fields separated by `|`, one row per line).
    pub fn psql(&self, db: &str, sql: &str) -> anyhow::Result<String> {
        let output = Command::new(self.bin.join("psql"))
            .env("PGPASSWORD", PASSWORD)
            .args([
                "-X",
                "-q",
                "-A",
                "-t",
                "-v",
                "ON_ERROR_STOP=1",
                "-h",
                "127.0.0.1",
            ])
            .args([
                "-p",
                &self.port.to_string(),
                "-U",
                "postgres",
                "-d",
                db,
                "-c",
                sql,
            ])
            .output()
            .context("running psql")?;
        let output = check(output).with_context(|| format!("psql: {sql}"))?;
        Ok(String::from_utf8_lossy(&output.stdout)
            .trim_end()
            .to_owned())
    }

    /// The connection string of database `db` (libpq key/value form).
    pub fn url(&self, db: &str) -> String {
        format!(
            "host=127.0.0.1 port={} user=postgres password={PASSWORD} dbname={db}",
            self.port
        )
    }

    /// A connection to database `db`, playing the user's tool. Its connection task
    /// runs on the caller's runtime.
    pub async fn connect(&self, db: &str) -> anyhow::Result<tokio_postgres::Client> {
        let (client, connection) = tokio_postgres::connect(&self.url(db), tokio_postgres::NoTls)
            .await
            .with_context(|| format!("connecting to {db} on port {}", self.port))?;
        tokio::spawn(async move {
            let _ = connection.await;
        });
        Ok(client)
    }

    /// A `[[tool]]` of kind postgres named `name` syncing `table` of database `db`
    /// as collection `collection`, with `columns`.
    pub fn tool(&self, name: &str, db: &str, table: &str, columns: &[&str]) -> String {
        let columns: Vec<String> = columns.iter().map(|c| format!("\"{c}\"")).collect();
        format!(
            "[[tool]]\nname = \"{name}\"\nkind = \"postgres\"\nurl = \"{url}\"\n\n\
             [[tool.collection]]\nname = \"{table}\"\ntable = \"{table}\"\n\
             primary_key = \"id\"\ncolumns = [{columns}]\n\n",
            url = self.url(db),
            columns = columns.join(", ")
        )
    }

    fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(self.log_path()).unwrap_or_default();
        let tail: Vec<&str> = log.lines().rev().take(20).collect();
        let tail: Vec<&str> = tail.into_iter().rev().collect();
        format!("server log:\n{}", tail.join("\n"))
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        let _ = self.stop_server("immediate");
    }
}

/// The folder of `initdb` and `pg_ctl`: `CONCORD_PG_BIN`, else the newest version
/// Debian installed.
fn server_bin() -> anyhow::Result<PathBuf> {
    if let Ok(dir) = std::env::var("CONCORD_PG_BIN") {
        return Ok(PathBuf::from(dir));
    }
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir(DEBIAN_BIN_GLOB_ROOT)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let version: u32 = entry.file_name().to_str()?.parse().ok()?;
            let bin = entry.path().join("bin");
            bin.join("initdb").is_file().then_some((version, bin))
        })
        .collect();
    versions.sort();
    match versions.pop() {
        Some((_, bin)) => Ok(bin),
        None => bail!(
            "the PostgreSQL server binaries (initdb, pg_ctl) are not installed: install \
             Debian's `postgresql` package (apt-get install postgresql), or set \
             CONCORD_PG_BIN to the folder holding them"
        ),
    }
}

fn is_root() -> anyhow::Result<bool> {
    let output = run(Command::new("id").arg("-u"))?;
    Ok(String::from_utf8_lossy(&output.stdout).trim() == "0")
}

/// A loopback TCP port nobody listens on now.
fn free_port() -> anyhow::Result<u16> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(listener.local_addr()?.port())
}

fn run(command: &mut Command) -> anyhow::Result<Output> {
    check(command.output()?)
}

fn check(output: Output) -> anyhow::Result<Output> {
    if !output.status.success() {
        bail!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok(output)
}
