//! Assembles a running agent from its configuration: store, core thread, tool
//! thread, QUIC transport and peer drivers.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use connectors::sqlite::{CollectionSpec, SqliteConnector, SqliteError};
use tokio::sync::{oneshot, watch};

use crate::config::{Config, ConfigError};
use crate::core::{self, CoreHandle, CoreOutputs, CoreRequest};
use crate::engine::{CollectionInfo, Engine, EngineStats};
use crate::identity::{Identity, IdentityError, PeerId};
use crate::peers::{self, PeerContext, Registry};
use crate::store::{Store, StoreError, StoreReader, tool_cursor};
use crate::transport::{PinnedPeers, Transport, TransportError};

/// Why an agent could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The configuration is wrong.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The key file could not be used.
    #[error("key file: {0}")]
    Identity(#[from] IdentityError),
    /// The tool's database could not be used.
    #[error("{}: {source}", path.display())]
    Tool {
        /// The database.
        path: std::path::PathBuf,
        /// Why.
        source: SqliteError,
    },
    /// The store's folder could not be created.
    #[error("data directory {}: {source}", path.display())]
    DataDir {
        /// The folder.
        path: std::path::PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The store could not be opened.
    #[error("store: {0}")]
    Store(#[from] StoreError),
    /// The listening socket could not be set up.
    #[error("transport: {0}")]
    Transport(#[from] TransportError),
    /// A thread could not be started.
    #[error("cannot start a thread: {0}")]
    Thread(std::io::Error),
}

/// A running agent. Dropping it without [`RunningAgent::shutdown`] leaves threads
/// to die with the process.
#[derive(Debug)]
pub struct RunningAgent {
    peer_id: PeerId,
    local_addr: SocketAddr,
    core: CoreHandle,
    reader: StoreReader,
    ctx: Arc<PeerContext>,
    transport: Arc<Transport>,
    shutdown: watch::Sender<bool>,
    stop_tool: Arc<AtomicBool>,
    core_thread: Option<std::thread::JoinHandle<()>>,
    tool_thread: Option<std::thread::JoinHandle<()>>,
    commits: Arc<AtomicU64>,
}

/// Starts an agent. Must be called inside a tokio runtime.
pub async fn start(config: Config) -> Result<RunningAgent, StartError> {
    let identity = Identity::load(&config.key_file)?;
    let mut connector = open_tool(&config)?;
    std::fs::create_dir_all(&config.data_dir).map_err(|source| StartError::DataDir {
        path: config.data_dir.clone(),
        source,
    })?;
    let store = Store::open(&config.data_dir)?;
    let store_id = store.actor();
    let reader = store.reader();
    let tool = config.sqlite.name.clone();
    let cursor = reader.cursor(&tool_cursor(&tool))?;
    let collections = collections(&config);
    let collection_names: Vec<String> = collections.keys().cloned().collect();
    let rescan_upto = connector
        .claim(&store_id)
        .map_err(|e| tool_error(&config, e))?;
    let mut engine = Engine::new(store, tool, collections)?;
    engine.set_rescan_upto(rescan_upto);
    let threads = spawn_threads(
        engine,
        connector,
        crate::tool::ToolLoop::new(cursor, rescan_upto),
    )?;

    let pinned = Arc::new(PinnedPeers::new(config.peer_ids()));
    let transport = Arc::new(Transport::bind(&identity, config.listen, pinned)?);
    let local_addr = transport.local_addr()?;
    let (shutdown, shutdown_rx) = watch::channel(false);
    let ctx = Arc::new(PeerContext {
        me: identity.peer_id(),
        store: store_id,
        collections: collection_names,
        core: threads.core.clone(),
        reader: reader.clone(),
        log_version: threads.log_version,
        registry: Registry::default(),
        shutdown: shutdown_rx,
        dials: AtomicU64::new(0),
    });
    tokio::spawn(peers::accept_loop(transport.clone(), ctx.clone()));
    for peer in &config.peers {
        if let (Some(addr), Ok(id)) = (peer.addr, peer.id.get_ref().parse::<PeerId>()) {
            tokio::spawn(peers::dial_loop(transport.clone(), id, addr, ctx.clone()));
        }
    }
    tracing::info!(peer_id = %identity.peer_id(), listen = %local_addr, store = %crate::store::hex(&store_id), "agent started");
    Ok(RunningAgent {
        peer_id: identity.peer_id(),
        local_addr,
        core: threads.core,
        reader,
        ctx,
        transport,
        shutdown,
        stop_tool: threads.stop_tool,
        core_thread: Some(threads.core_thread),
        tool_thread: Some(threads.tool_thread),
        commits: threads.commits,
    })
}

/// Opens the configured database and checks the configuration against it.
fn open_tool(config: &Config) -> Result<SqliteConnector, StartError> {
    let specs: Vec<CollectionSpec> = config
        .sqlite
        .collections
        .iter()
        .map(|c| CollectionSpec {
            collection: c.name.get_ref().clone(),
            table: c.table.get_ref().clone(),
            primary_key: c.primary_key.get_ref().clone(),
            columns: c.columns.get_ref().clone(),
        })
        .collect();
    SqliteConnector::open(&config.sqlite.path, specs).map_err(|e| tool_error(config, e))
}

/// The configured collections, as the engine knows them.
fn collections(config: &Config) -> BTreeMap<String, CollectionInfo> {
    config
        .sqlite
        .collections
        .iter()
        .map(|c| {
            (
                c.name.get_ref().clone(),
                CollectionInfo {
                    columns: c.columns.get_ref().clone(),
                },
            )
        })
        .collect()
}

/// The core and tool threads, and what the rest of the agent holds of them.
struct Threads {
    core: CoreHandle,
    log_version: watch::Receiver<u64>,
    commits: Arc<AtomicU64>,
    stop_tool: Arc<AtomicBool>,
    core_thread: std::thread::JoinHandle<()>,
    tool_thread: std::thread::JoinHandle<()>,
}

fn spawn_threads(
    engine: Engine,
    connector: SqliteConnector,
    state: crate::tool::ToolLoop,
) -> Result<Threads, StartError> {
    let (core, core_rx) = core::channel();
    let (log_tx, log_version) = watch::channel(0u64);
    let (plan_tx, plan_rx) = std::sync::mpsc::sync_channel(core::WRITE_BACK_PLANS_IN_FLIGHT_MAX);
    let commits = Arc::new(AtomicU64::new(0));
    let outputs = CoreOutputs {
        log_version: log_tx,
        write_back: plan_tx,
        commits: commits.clone(),
    };
    let core_thread = std::thread::Builder::new()
        .name("concord-core".into())
        .spawn(move || core::run(engine, core_rx, outputs))
        .map_err(StartError::Thread)?;
    let stop_tool = Arc::new(AtomicBool::new(false));
    let tool_thread = {
        let core = core.clone();
        let stop = stop_tool.clone();
        std::thread::Builder::new()
            .name("concord-tool".into())
            .spawn(move || crate::tool::run(connector, core, plan_rx, state, stop))
            .map_err(StartError::Thread)?
    };
    Ok(Threads {
        core,
        log_version,
        commits,
        stop_tool,
        core_thread,
        tool_thread,
    })
}

/// Names the configuration entry behind a connector error.
fn tool_error(config: &Config, error: SqliteError) -> StartError {
    let message = error.to_string();
    let table = match &error {
        SqliteError::MissingTable { table }
        | SqliteError::NoPrimaryKey { table }
        | SqliteError::CompositePrimaryKey { table, .. } => Some((table.clone(), "table")),
        SqliteError::PrimaryKeyMismatch { table, .. } => Some((table.clone(), "primary_key")),
        SqliteError::MissingColumn { table, .. } | SqliteError::UnsupportedType { table, .. } => {
            Some((table.clone(), "columns"))
        }
        _ => None,
    };
    if let Some((table, field)) = table {
        for (i, c) in config.sqlite.collections.iter().enumerate() {
            if *c.table.get_ref() == table {
                let span = match field {
                    "primary_key" => c.primary_key.span(),
                    "columns" => c.columns.span(),
                    _ => c.table.span(),
                };
                let message = format!("{message} (database {})", config.sqlite.path.display());
                return StartError::Config(config.invalid(
                    span,
                    format!("sqlite.collection[{i}].{field}"),
                    message,
                ));
            }
        }
    }
    StartError::Tool {
        path: config.sqlite.path.clone(),
        source: error,
    }
}

impl RunningAgent {
    /// This agent's peer id.
    pub fn peer_id(&self) -> PeerId {
        self.peer_id
    }

    /// This agent's store id (its Automerge actor id).
    pub fn store_id(&self) -> crate::store::StoreId {
        self.ctx.store
    }

    /// The address peers reach this agent at.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Read access to the store (log heads, cursors, dead letters).
    pub fn reader(&self) -> &StoreReader {
        &self.reader
    }

    /// The peers connected now.
    pub fn connected_peers(&self) -> Vec<PeerId> {
        self.ctx.registry.peers()
    }

    /// Dial attempts made so far.
    pub fn dials(&self) -> u64 {
        self.ctx.dials.load(Ordering::Relaxed)
    }

    /// Store commits so far.
    pub fn commits(&self) -> u64 {
        self.commits.load(Ordering::Relaxed)
    }

    /// What the engine did so far.
    pub async fn stats(&self) -> Option<EngineStats> {
        let (reply, answer) = oneshot::channel();
        self.core.send(CoreRequest::Stats { reply }).await.ok()?;
        answer.await.ok()
    }

    /// Stops the agent: closes connections, stops the threads, flushes the store.
    pub async fn shutdown(mut self) {
        let _ = self.shutdown.send(true);
        self.transport.close();
        self.stop_tool.store(true, Ordering::Relaxed);
        let tool = self.tool_thread.take();
        let core_thread = self.core_thread.take();
        // The core ends once every handle is gone: ours, the tool's, the drivers'.
        let RunningAgent {
            core,
            ctx,
            transport,
            ..
        } = self;
        drop(core);
        drop(ctx);
        transport.wait_idle().await;
        drop(transport);
        let _ = tokio::task::spawn_blocking(move || {
            if let Some(tool) = tool {
                let _ = tool.join();
            }
            if let Some(core_thread) = core_thread {
                let _ = core_thread.join();
            }
        })
        .await;
    }
}
