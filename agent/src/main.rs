//! The `concord` command line.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use concord_agent::config::{Config, LogFormat};
use concord_agent::identity::Identity;

/// mimalloc, not glibc's malloc: with documents held rather than built, allocating
/// and freeing was a third of each core thread's time, and mimalloc made initial sync
/// and sustained updates about 30% faster for about 70 MiB more RSS per agent
/// (BENCHMARKS.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Concord keeps records in two-way sync between tools, peer to peer.
#[derive(Debug, Parser)]
#[command(name = "concord", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Creates this agent's key, prints its peer id and writes a commented config.
    Init {
        /// The folder for the key and the config.
        #[arg(long, default_value = ".")]
        dir: PathBuf,
        /// The UDP address peers will reach this agent at.
        #[arg(long, default_value = "127.0.0.1:7400")]
        listen: SocketAddr,
    },
    /// Runs the agent until interrupted (SIGINT or SIGTERM: it finishes what is in
    /// flight, persists and closes its peers, within a bounded time).
    Run {
        /// The configuration file.
        #[arg(long)]
        config: PathBuf,
        /// How log lines are written (overrides `[log] format`).
        #[arg(long, value_enum)]
        log_format: Option<LogFormat>,
    },
    /// The running agent's tools, collections, peers with their lag, and what waits
    /// for a person.
    Status {
        /// Print the status as JSON.
        #[arg(long)]
        json: bool,
        /// The running agent's configuration file.
        #[arg(long, default_value = "concord.toml")]
        config: PathBuf,
    },
    /// The running agent's peers: connected or not, since when, lag and traffic.
    Peers {
        /// Print the peers as JSON.
        #[arg(long)]
        json: bool,
        /// The running agent's configuration file.
        #[arg(long, default_value = "concord.toml")]
        config: PathBuf,
    },
    /// Checks a configuration without running it: mappings, expressions, natural
    /// keys and identities, and every mapped column against the tool's real schema.
    Check {
        /// The configuration file.
        #[arg(long)]
        config: PathBuf,
    },
    /// Runs two agents on loopback over two sample SQLite databases and shows them converge.
    Demo,
    /// Same-field conflicts waiting for a person (fields whose policy is `manual`).
    Conflicts {
        #[command(subcommand)]
        action: ConflictsAction,
        /// The running agent's configuration file.
        #[arg(long, global = true, default_value = "concord.toml")]
        config: PathBuf,
    },
    /// Deletes held for approval.
    Deletes {
        #[command(subcommand)]
        action: QueueAction,
        /// The running agent's configuration file.
        #[arg(long, global = true, default_value = "concord.toml")]
        config: PathBuf,
    },
    /// Records a tool refused or the mapping could not convert.
    DeadLetters {
        #[command(subcommand)]
        action: LettersAction,
        /// The running agent's configuration file.
        #[arg(long, global = true, default_value = "concord.toml")]
        config: PathBuf,
    },
    /// Every value each field of a record had: when, from which agent and tool, and
    /// which policy chose it.
    History {
        /// The collection.
        collection: String,
        /// The record: its key in one of this agent's tools, its shared key, or its id.
        key: String,
        /// Look the key up in this tool only.
        #[arg(long)]
        tool: Option<String>,
        /// The running agent's configuration file.
        #[arg(long, default_value = "concord.toml")]
        config: PathBuf,
    },
    /// Measures initial sync, edit latency and wire bytes, and prints the figures.
    Bench {
        /// Records in the initial sync (default 100,000; 1,000 with `--mesh`).
        #[arg(long)]
        records: Option<usize>,
        /// Single-field edits timed for latency (default 1,000; 200 with `--mesh`).
        #[arg(long)]
        edits: Option<usize>,
        /// Seconds of sustained single-field updates (0: skip).
        #[arg(long, default_value_t = 30)]
        sustain_secs: u64,
        /// Sync into a throwaway PostgreSQL server (started from the installed
        /// server binaries) instead of a second SQLite database.
        #[arg(long)]
        postgres: bool,
        /// Sync into a SQLite table of other names and types through a mapping (a
        /// rename, a conversion, a CEL filter and a computed field).
        #[arg(long)]
        mapped: bool,
        /// Also measure what scraping both agents' `/metrics` every this many
        /// milliseconds costs the sustained updates.
        #[arg(long)]
        scrape_ms: Option<u64>,
        /// Instead of the two-agent figures, time one edit fanned out through a full
        /// mesh of this many agents in one process (`--records` rows each, default
        /// 1,000 here; `--edits` edits, default 200 here).
        #[arg(long)]
        mesh: Option<usize>,
    },
}

#[derive(Debug, Subcommand)]
enum ConflictsAction {
    /// Lists the open conflicts with their values.
    List,
    /// Shows one conflict and the history of its field.
    Show {
        /// The conflict (`<record id>/<field>`, as listed).
        id: String,
    },
    /// Settles a conflict on one of its values or on a new one.
    Resolve {
        /// The conflict (`<record id>/<field>`, as listed).
        id: String,
        /// The number of the value chosen, as listed.
        #[arg(long, conflicts_with = "value", required_unless_present = "value")]
        pick: Option<usize>,
        /// A new value, read as the type of the conflicting values.
        #[arg(long)]
        value: Option<String>,
    },
}

#[derive(Debug, Subcommand)]
enum QueueAction {
    /// Lists the held deletes.
    List,
    /// Lets a held delete go out to every tool.
    Approve {
        /// The delete (`<tool>/<collection>/<key>`, as listed).
        id: String,
    },
    /// Restores the record in the tool that deleted it.
    Reject {
        /// The delete (`<tool>/<collection>/<key>`, as listed).
        id: String,
    },
}

#[derive(Debug, Subcommand)]
enum LettersAction {
    /// Lists the dead letters with their reasons.
    List,
    /// Tries the record again now.
    Retry {
        /// The letter (`<tool>/<collection>/<key>`, as listed).
        id: String,
    },
    /// Drops the letter: the record is tried again only when it changes.
    Discard {
        /// The letter (`<tool>/<collection>/<key>`, as listed).
        id: String,
    },
}

/// Runs one admin command against the agent of `config`.
fn admin_command(config: &std::path::Path, command: AdminCommand) -> anyhow::Result<()> {
    use concord_agent::admin::{self, AdminClient, Resolution};
    init_logging(LogFormat::Text, "warn");
    let config = Config::load(config)?;
    let client = AdminClient::for_config(&config)?;
    runtime()?.block_on(async move {
        match command {
            AdminCommand::Conflicts(ConflictsAction::List) => {
                admin::print_conflicts(&client.conflicts().await?);
            }
            AdminCommand::Conflicts(ConflictsAction::Show { id }) => {
                admin::print_conflict(&client.conflict(&id).await?);
            }
            AdminCommand::Conflicts(ConflictsAction::Resolve { id, pick, value }) => {
                let value = value.map(serde_json::Value::String);
                client.resolve(&id, &Resolution { pick, value }).await?;
                println!("resolved {id}");
            }
            AdminCommand::Deletes(QueueAction::List) => {
                admin::print_held(&client.held_deletes().await?);
            }
            AdminCommand::Deletes(QueueAction::Approve { id }) => {
                client.decide_delete("approve", &id).await?;
                println!("approved the delete of {id}");
            }
            AdminCommand::Deletes(QueueAction::Reject { id }) => {
                client.decide_delete("reject", &id).await?;
                println!("rejected the delete of {id}: the record is restored");
            }
            AdminCommand::Letters(LettersAction::List) => {
                admin::print_letters(&client.dead_letters().await?);
            }
            AdminCommand::Letters(LettersAction::Retry { id }) => {
                client.act_on_letter("retry", &id).await?;
                println!("retrying {id}");
            }
            AdminCommand::Letters(LettersAction::Discard { id }) => {
                client.act_on_letter("discard", &id).await?;
                println!("discarded {id}");
            }
            AdminCommand::History {
                collection,
                key,
                tool,
            } => {
                admin::print_history(&client.history(&collection, &key, tool.as_deref()).await?);
            }
            AdminCommand::Status { json } => {
                let status = client.status().await?;
                if json {
                    println!("{}", serde_json::to_string_pretty(&status)?);
                } else {
                    admin::print_status(&status);
                }
            }
            AdminCommand::Peers { json } => {
                let peers = client.peers().await?;
                if json {
                    println!("{}", serde_json::to_string_pretty(&peers)?);
                } else {
                    admin::print_peers(&peers, concord_agent::core::now_ms());
                }
            }
        }
        Ok(())
    })
}

/// The admin subcommands, without their config.
enum AdminCommand {
    Conflicts(ConflictsAction),
    Deletes(QueueAction),
    Letters(LettersAction),
    History {
        collection: String,
        key: String,
        tool: Option<String>,
    },
    Status {
        json: bool,
    },
    Peers {
        json: bool,
    },
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Init { dir, listen } => init(dir, listen),
        Command::Run { config, log_format } => {
            let config = Config::load(&config)?;
            let format = log_format.unwrap_or(config.log.format);
            if format == LogFormat::Text {
                concord_agent::progress::enable_bars();
            }
            init_logging(format, "info");
            runtime()?.block_on(run(config))
        }
        Command::Status { json, config } => admin_command(&config, AdminCommand::Status { json }),
        Command::Peers { json, config } => admin_command(&config, AdminCommand::Peers { json }),
        Command::Check { config } => {
            init_logging(LogFormat::Text, "warn");
            let loaded = Config::load(&config)?;
            let report = concord_agent::check::check(&loaded)?;
            for note in &report.notes {
                println!("note: {note}");
            }
            println!(
                "{}: ok ({} tools, {} collections)",
                config.display(),
                report.tools,
                report.collections
            );
            Ok(())
        }
        Command::Conflicts { action, config } => {
            admin_command(&config, AdminCommand::Conflicts(action))
        }
        Command::Deletes { action, config } => {
            admin_command(&config, AdminCommand::Deletes(action))
        }
        Command::DeadLetters { action, config } => {
            admin_command(&config, AdminCommand::Letters(action))
        }
        Command::History {
            collection,
            key,
            tool,
            config,
        } => admin_command(
            &config,
            AdminCommand::History {
                collection,
                key,
                tool,
            },
        ),
        Command::Demo => {
            init_logging(LogFormat::Text, "warn");
            runtime()?.block_on(concord_agent::demo::run())
        }
        Command::Bench {
            records,
            edits,
            sustain_secs,
            postgres,
            mapped,
            scrape_ms,
            mesh,
        } => {
            init_logging(LogFormat::Text, "warn");
            if let Some(agents) = mesh {
                use concord_agent::bench_mesh::{DEFAULT_EDITS, DEFAULT_RECORDS, MeshOptions};
                return runtime()?.block_on(concord_agent::bench_mesh::run(MeshOptions {
                    agents,
                    records: records.unwrap_or(DEFAULT_RECORDS),
                    edits: edits.unwrap_or(DEFAULT_EDITS),
                }));
            }
            runtime()?.block_on(concord_agent::bench::run(concord_agent::bench::Options {
                records: records.unwrap_or(concord_agent::bench::DEFAULT_RECORDS),
                edits: edits.unwrap_or(concord_agent::bench::DEFAULT_EDITS),
                sustain: std::time::Duration::from_secs(sustain_secs),
                postgres,
                mapped,
                scrape: scrape_ms.map(std::time::Duration::from_millis),
            }))
        }
    }
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?)
}

/// The storage engine's own lines below this level are not shown unless `RUST_LOG`
/// asks for them.
const STORAGE_LOG_LEVEL: &str = "fjall=warn,lsm_tree=warn";

fn init_logging(format: LogFormat, default: &str) {
    use std::io::IsTerminal;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| {
        tracing_subscriber::EnvFilter::new(format!("{default},{STORAGE_LOG_LEVEL}"))
    });
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(concord_agent::progress::LogWriter);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

fn init(dir: PathBuf, listen: SocketAddr) -> anyhow::Result<()> {
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let key = dir.join("concord.key");
    let config = dir.join("concord.toml");
    let identity = Identity::generate()?;
    identity.save(&key)?;
    if config.exists() {
        eprintln!("{} exists; left as it is", config.display());
    } else {
        std::fs::write(
            &config,
            concord_agent::config::template(listen, &identity.peer_id()),
        )
        .with_context(|| format!("writing {}", config.display()))?;
        eprintln!("wrote {}", config.display());
    }
    println!("{}", identity.peer_id());
    Ok(())
}

async fn run(config: Config) -> anyhow::Result<()> {
    let agent = concord_agent::agent::start(config).await?;
    println!(
        "concord agent {} listening on {}",
        agent.peer_id(),
        agent.local_addr()
    );
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let signal = tokio::select! {
        _ = tokio::signal::ctrl_c() => "SIGINT",
        _ = term.recv() => "SIGTERM",
    };
    let started = std::time::Instant::now();
    tracing::info!(
        signal,
        "stopping: finishing what is in flight (a second signal stops at once)"
    );
    let grace = std::time::Duration::from_millis(concord_agent::agent::SHUTDOWN_GRACE_MS);
    tokio::select! {
        stopped = tokio::time::timeout(grace, agent.shutdown()) => match stopped {
            Ok(()) => {
                tracing::info!(elapsed_ms = started.elapsed().as_millis() as u64, "stopped cleanly");
                Ok(())
            }
            Err(_) => {
                // Every commit is durable: stopping here loses nothing, a restart
                // resumes from the store.
                tracing::warn!(grace_ms = grace.as_millis() as u64, "did not stop within the grace period; exiting");
                std::process::exit(1)
            }
        },
        _ = tokio::signal::ctrl_c() => std::process::exit(130),
        _ = term.recv() => std::process::exit(143),
    }
}
