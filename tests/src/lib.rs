//! Helpers for the end-to-end tests: agents in folders, SQLite fixtures, the
//! `concord` binary, bounded waits.

pub use concord_agent::pg_server as postgres;

pub mod browser;
pub mod pocketbase;
pub mod radicale;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use concord_agent::agent::{self, RunningAgent};
use concord_agent::config::Config;
use concord_agent::demo::AgentFiles;
use concord_agent::identity::PeerId;
use rusqlite::Connection;

/// The customers table of every test.
pub const SCHEMA: &str = "CREATE TABLE customers (
    id INTEGER PRIMARY KEY,
    name TEXT,
    email TEXT,
    city TEXT,
    age INTEGER
)";

/// The synced columns.
pub const COLUMNS: [&str; 4] = ["name", "email", "city", "age"];

/// The longest any test waits for agents to converge.
pub const CONVERGE_TIMEOUT: Duration = Duration::from_secs(30);

/// An agent's folder, key and database, with its config once written.
#[derive(Debug)]
pub struct Node {
    /// Its files.
    pub files: AgentFiles,
    /// Its config, once written.
    pub config: Option<Config>,
}

impl Node {
    /// A fresh node in `root/name`.
    pub fn new(root: &Path, name: &str) -> anyhow::Result<Node> {
        Node::with_schema(root, name, SCHEMA)
    }

    /// A fresh node in `root/name` whose database holds `schema` (a `customers` table).
    pub fn with_schema(root: &Path, name: &str, schema: &str) -> anyhow::Result<Node> {
        Ok(Node {
            files: AgentFiles::create(&root.join(name), schema)?,
            config: None,
        })
    }

    /// Its peer id.
    pub fn id(&self) -> PeerId {
        self.files.identity.peer_id()
    }

    /// Writes its config: listen on `listen`, trust `peers` (id, address to dial).
    pub fn configure(
        &mut self,
        listen: &str,
        peers: &[(PeerId, Option<String>)],
    ) -> anyhow::Result<Config> {
        self.configure_columns(listen, peers, &COLUMNS)
    }

    /// Writes its config syncing `columns` of `customers`.
    pub fn configure_columns(
        &mut self,
        listen: &str,
        peers: &[(PeerId, Option<String>)],
        columns: &[&str],
    ) -> anyhow::Result<Config> {
        let config = self.files.config(listen, peers, columns)?;
        self.config = Some(config.clone());
        Ok(config)
    }

    /// Writes its config with `body` (TOML) as its tools and collections.
    pub fn configure_with(
        &mut self,
        listen: &str,
        peers: &[(PeerId, Option<String>)],
        body: &str,
    ) -> anyhow::Result<Config> {
        let config = self.files.config_with(listen, peers, body)?;
        self.config = Some(config.clone());
        Ok(config)
    }

    /// Starts an agent in this process with the written config.
    pub async fn start(&self) -> anyhow::Result<RunningAgent> {
        let config = self.config.clone().context("configure the node first")?;
        Ok(agent::start(config).await?)
    }

    /// A connection to its database, playing the user's tool.
    pub fn db(&self) -> anyhow::Result<Connection> {
        let conn = Connection::open(&self.files.db)?;
        conn.busy_timeout(Duration::from_secs(5))?;
        Ok(conn)
    }

    /// Every customer row, ordered by id.
    pub fn rows(&self) -> anyhow::Result<Vec<Row>> {
        rows(&self.files.db)
    }

    /// The base URL of its running agent's admin API, as the agent recorded it.
    pub fn admin_url(&self) -> anyhow::Result<String> {
        let config = self.config.as_ref().context("configure the node first")?;
        let file = config
            .data_dir
            .join(concord_agent::admin::ADMIN_ADDRESS_FILE);
        Ok(format!("http://{}", std::fs::read_to_string(file)?.trim()))
    }

    /// The config file's path.
    pub fn config_path(&self) -> PathBuf {
        self.files.dir.join("concord.toml")
    }
}

/// A customer row: id, name, email, city, age.
pub type Row = (
    i64,
    Option<String>,
    Option<String>,
    Option<String>,
    Option<i64>,
);

/// A `[[tool]]` of kind sqlite named `name` syncing the customers table of the
/// database at `path` (relative to the config), with the test columns.
pub fn sqlite_tool(name: &str, path: &str) -> String {
    let columns: Vec<String> = COLUMNS.iter().map(|c| format!("\"{c}\"")).collect();
    format!(
        "[[tool]]\nname = \"{name}\"\nkind = \"sqlite\"\npath = \"{path}\"\n\n\
         [[tool.collection]]\nname = \"customers\"\ntable = \"customers\"\n\
         primary_key = \"id\"\ncolumns = [{}]\n\n",
        columns.join(", ")
    )
}

/// Creates a SQLite database at `path` holding the test schema.
pub fn create_db(path: &Path) -> anyhow::Result<()> {
    Connection::open(path)?.execute_batch(SCHEMA)?;
    Ok(())
}

/// Waits until the databases at `paths` hold the same rows, and returns them.
pub async fn dbs_converged(paths: &[&Path]) -> anyhow::Result<Vec<Row>> {
    wait_for("the databases to converge", CONVERGE_TIMEOUT, || {
        let first = rows(paths[0])?;
        for path in &paths[1..] {
            if rows(path)? != first {
                return Ok(false);
            }
        }
        Ok(true)
    })
    .await?;
    rows(paths[0])
}

/// Every customer row of the database at `path`.
pub fn rows(path: &Path) -> anyhow::Result<Vec<Row>> {
    let conn = Connection::open(path)?;
    conn.busy_timeout(Duration::from_secs(5))?;
    let mut stmt = conn.prepare("SELECT id, name, email, city, age FROM customers ORDER BY id")?;
    let rows = stmt.query_map([], |r| {
        Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?))
    })?;
    Ok(rows.collect::<Result<_, _>>()?)
}

/// Waits until `check` holds, polling every 5 ms, up to `timeout`.
pub async fn wait_for(
    what: &str,
    timeout: Duration,
    mut check: impl FnMut() -> anyhow::Result<bool>,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        if check()? {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Polls `check` every 20 ms until it gives `Some`, up to [`CONVERGE_TIMEOUT`].
pub async fn eventually<T>(
    what: &str,
    mut check: impl AsyncFnMut() -> anyhow::Result<Option<T>>,
) -> anyhow::Result<T> {
    let deadline = Instant::now() + CONVERGE_TIMEOUT;
    loop {
        if let Some(found) = check().await? {
            return Ok(found);
        }
        if Instant::now() > deadline {
            bail!("timed out after {CONVERGE_TIMEOUT:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The admin client of a node's running agent.
pub fn admin(node: &Node) -> anyhow::Result<concord_agent::admin::AdminClient> {
    Ok(concord_agent::admin::AdminClient::for_config(
        node.config.as_ref().context("configured")?,
    )?)
}

/// The value of the sample `name` whose labels include every one of `labels`, in
/// Prometheus text `metrics`.
pub fn metric(metrics: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    metrics.lines().find_map(|line| {
        let (series, value) = line.rsplit_once(' ')?;
        let (sample, label_text) = match series.split_once('{') {
            Some((sample, rest)) => (sample, rest.strip_suffix('}')?),
            None => (series, ""),
        };
        let matches = sample == name
            && labels
                .iter()
                .all(|(k, v)| label_text.split(',').any(|l| l == format!("{k}=\"{v}\"")));
        if matches { value.parse().ok() } else { None }
    })
}

/// Waits until all nodes hold the same rows, and returns them.
pub async fn converged(nodes: &[&Node]) -> anyhow::Result<Vec<Row>> {
    wait_for("the databases to converge", CONVERGE_TIMEOUT, || {
        let first = nodes[0].rows()?;
        for node in &nodes[1..] {
            if node.rows()? != first {
                return Ok(false);
            }
        }
        Ok(true)
    })
    .await?;
    nodes[0].rows()
}

/// The path of the `concord` binary, built (or found up to date) once per test run.
pub fn concord_bin() -> anyhow::Result<PathBuf> {
    static BIN: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    BIN.get_or_init(|| {
        let exe = std::env::current_exe().map_err(|e| e.to_string())?;
        // target/<profile>/deps/<test> → target/<profile>/concord
        let profile_dir = exe
            .parent()
            .and_then(Path::parent)
            .ok_or("unexpected test binary location")?;
        let bin = profile_dir.join("concord");
        let mut build = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
        build.args(["build", "-q", "-p", "concord-agent", "--bin", "concord"]);
        // Cargo gives a running test its package's variables (CARGO_MANIFEST_DIR,
        // CARGO_PKG_NAME, ...). Build scripts such as ring's rerun when those change,
        // so passing them on would rebuild the TLS stack and the agent on every run.
        for (name, _) in std::env::vars_os() {
            let name = name.to_string_lossy();
            if [
                "CARGO_PKG_",
                "CARGO_MANIFEST_",
                "CARGO_CRATE_",
                "CARGO_BIN_",
            ]
            .iter()
            .any(|prefix| name.starts_with(prefix))
                || name == "CARGO_PRIMARY_PACKAGE"
                || name == "CARGO_TARGET_TMPDIR"
            {
                build.env_remove(name.as_ref());
            }
        }
        if !cfg!(debug_assertions) {
            build.arg("--release");
        }
        let status = build
            .status()
            .map_err(|e| format!("running cargo build: {e}"))?;
        if !status.success() || !bin.exists() {
            return Err(format!("could not build {}", bin.display()));
        }
        Ok(bin)
    })
    .clone()
    .map_err(anyhow::Error::msg)
}

/// A loopback UDP address free now, for an agent that must keep its port across
/// restarts.
pub fn free_udp_addr() -> anyhow::Result<String> {
    let socket = std::net::UdpSocket::bind("127.0.0.1:0")?;
    Ok(socket.local_addr()?.to_string())
}

/// Runs `concord ARGS --config <node's config>` and returns what it printed; fails
/// with its error output if it fails.
pub fn cli(node: &Node, args: &[&str]) -> anyhow::Result<String> {
    let output = Command::new(concord_bin()?)
        .args(args)
        .arg("--config")
        .arg(node.config_path())
        .env_remove("RUST_LOG")
        .output()?;
    if !output.status.success() {
        bail!(
            "concord {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok(String::from_utf8(output.stdout)?)
}

/// An agent running as its own process.
#[derive(Debug)]
pub struct Process {
    child: Child,
    /// The address it listens on.
    pub addr: String,
}

impl Process {
    /// Starts `concord run` with the node's config and waits for its listening line.
    pub fn start(node: &Node) -> anyhow::Result<Process> {
        Process::start_logging(node, Some("warn"), Stdio::inherit())
    }

    /// Starts `concord run` with `RUST_LOG` set to `log` (unset: the default) and
    /// its log written to `stderr`.
    pub fn start_logging(
        node: &Node,
        log: Option<&str>,
        stderr: impl Into<Stdio>,
    ) -> anyhow::Result<Process> {
        Process::start_with_env(node, log, stderr, &[])
    }

    /// Starts `concord run` as [`Process::start_logging`] does, with `env` set too.
    pub fn start_with_env(
        node: &Node,
        log: Option<&str>,
        stderr: impl Into<Stdio>,
        env: &[(&str, &str)],
    ) -> anyhow::Result<Process> {
        Process::start_with(node, log, stderr, env, &[])
    }

    /// Starts `concord run ARGS` as [`Process::start_with_env`] does.
    pub fn start_with(
        node: &Node,
        log: Option<&str>,
        stderr: impl Into<Stdio>,
        env: &[(&str, &str)],
        args: &[&str],
    ) -> anyhow::Result<Process> {
        use std::io::{BufRead, BufReader};
        let mut command = Command::new(concord_bin()?);
        command
            .args(["run", "--config"])
            .arg(node.config_path())
            .args(args)
            .env_remove("RUST_LOG")
            .envs(env.iter().copied())
            .stdout(Stdio::piped())
            .stderr(stderr);
        if let Some(log) = log {
            command.env("RUST_LOG", log);
        }
        let mut child = command.spawn()?;
        let stdout = child.stdout.take().context("stdout")?;
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line)?;
        let addr = line
            .trim()
            .rsplit(' ')
            .next()
            .unwrap_or_default()
            .to_owned();
        if !line.contains("listening on") {
            let _ = child.kill();
            bail!("the agent did not start: {line:?}");
        }
        Ok(Process { child, addr })
    }

    /// Kills the process with SIGKILL and reaps it.
    pub fn kill9(mut self) -> anyhow::Result<()> {
        self.child.kill()?;
        self.child.wait()?;
        Ok(())
    }

    /// Sends `signal` (`TERM`, `INT`) and waits up to `within` for the process to
    /// exit; returns its exit status and how long it took.
    pub fn signal(
        mut self,
        signal: &str,
        within: Duration,
    ) -> anyhow::Result<(std::process::ExitStatus, Duration)> {
        let sent = Instant::now();
        let status = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(self.child.id().to_string())
            .status()?;
        if !status.success() {
            bail!("kill -{signal} failed");
        }
        loop {
            if let Some(status) = self.child.try_wait()? {
                return Ok((status, sent.elapsed()));
            }
            if sent.elapsed() > within {
                bail!("the agent did not exit within {within:?} of SIG{signal}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Stops the process with SIGTERM and waits for it.
    pub fn stop(mut self) -> anyhow::Result<()> {
        let status = Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status()?;
        if !status.success() {
            bail!("kill -TERM failed");
        }
        self.child.wait()?;
        Ok(())
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
