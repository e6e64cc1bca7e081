//! Assembles a running agent from its configuration: store, core thread, one thread
//! per tool, QUIC transport and peer drivers.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use connectors::caldav::{CaldavConfig, CaldavConnector, CaldavError};
use connectors::csv::CsvConnector;
use connectors::postgres::{PostgresConfig, PostgresConnector, PostgresError};
use connectors::rest::RestConnector;
use connectors::sqlite::{SqliteConnector, SqliteError};
use connectors::{CollectionSpec, Connector, TableSchema};
use tokio::sync::{oneshot, watch};

use crate::apps::WebhookEndpoints;
use crate::config::{Config, ConfigError, ConflictPolicy, IdentityConfig, ToolConfig, ToolKind};
use crate::core::{self, CoreHandle, CoreOutputs, CoreRequest};
use crate::engine::{
    CollectionInfo, CollectionPolicy, Engine, EngineStats, FieldPolicy, RecordIdentity, ToolSpec,
};
use crate::identity::{Identity, IdentityError, PeerId};
use crate::mapping;
use crate::peers::{self, PeerContext, Registry, SharedFollowing};
use crate::store::{Store, StoreError, StoreReader};
use crate::telemetry::{AgentInfo, Telemetry, ToolInfo};
use crate::tool::{ToolLoop, ToolThread};
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
    /// A tool could not be used.
    #[error("tool `{tool}`: {source}")]
    Tool {
        /// The tool's name.
        tool: String,
        /// Why.
        source: Box<dyn std::error::Error + Send + Sync>,
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
    /// The admin API's address could not be used.
    #[error("admin API on {addr}: {source}")]
    Admin {
        /// The configured address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
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
    admin_addr: SocketAddr,
    /// The admin API and the retry clock: they hold core handles, so they end first.
    background: Vec<tokio::task::JoinHandle<()>>,
    core: CoreHandle,
    reader: StoreReader,
    ctx: Arc<PeerContext>,
    transport: Arc<Transport>,
    shutdown: watch::Sender<bool>,
    stop_tools: Arc<AtomicBool>,
    /// Wakes each tool thread, so that a stop is seen without waiting out its poll.
    tool_wakes: Vec<std::sync::mpsc::SyncSender<core::ToolEvent>>,
    core_thread: Option<std::thread::JoinHandle<()>>,
    tool_threads: Vec<std::thread::JoinHandle<()>>,
    commits: Arc<AtomicU64>,
    telemetry: Arc<Telemetry>,
}

/// Starts an agent. Must be called inside a tokio runtime.
pub async fn start(config: Config) -> Result<RunningAgent, StartError> {
    let identity = Identity::load(&config.key_file)?;
    let telemetry = Arc::new(new_telemetry(&config));
    let webhooks = Arc::new(crate::apps::webhook_endpoints(&config)?);
    // Tools block (and some run a driver runtime of their own): they are opened,
    // and the store with them, off the async runtime.
    let assembled = {
        let config = config.clone();
        let me = identity.peer_id();
        let telemetry = telemetry.clone();
        let webhooks = webhooks.clone();
        tokio::task::spawn_blocking(move || assemble(&config, &me, telemetry, &webhooks))
            .await
            .map_err(|e| StartError::Thread(std::io::Error::other(e.to_string())))??
    };
    let Assembled {
        threads,
        store_id,
        reader,
        collection_names,
    } = assembled;

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
        following: SharedFollowing::default(),
        shutdown: shutdown_rx,
        dials: AtomicU64::new(0),
        telemetry: telemetry.clone(),
    });
    tokio::spawn(peers::accept_loop(transport.clone(), ctx.clone()));
    for peer in &config.peers {
        if let (Some(addr), Ok(id)) = (peer.addr, peer.id.get_ref().parse::<PeerId>()) {
            tokio::spawn(peers::dial_loop(transport.clone(), id, addr, ctx.clone()));
        }
    }
    let admin_listener = crate::admin::bind(*config.admin.listen.get_ref(), &config.data_dir)
        .await
        .map_err(|source| StartError::Admin {
            addr: *config.admin.listen.get_ref(),
            source,
        })?;
    let admin_addr = admin_listener
        .local_addr()
        .map_err(|source| StartError::Admin {
            addr: *config.admin.listen.get_ref(),
            source,
        })?;
    let admin_state = crate::admin::AdminState {
        reader: reader.clone(),
        core: threads.core.clone(),
        token: config
            .admin
            .token
            .as_ref()
            .map(|t| t.get_ref().as_str().into()),
        tools: config
            .tools
            .iter()
            .map(|t| t.name.get_ref().clone())
            .collect(),
        telemetry: telemetry.clone(),
        webhooks,
    };
    let background = vec![
        tokio::spawn(crate::admin::serve(
            admin_listener,
            admin_state,
            shutdown.subscribe(),
        )),
        tokio::spawn(tick(threads.core.clone(), shutdown.subscribe())),
        tokio::spawn(sample(telemetry.clone(), shutdown.subscribe())),
    ];
    telemetry.started(AgentInfo {
        peer_id: identity.peer_id(),
        store: crate::store::hex(&store_id),
        listen: local_addr.to_string(),
    });
    tracing::info!(admin = %admin_addr, "admin API listening");
    tracing::info!(peer_id = %identity.peer_id(), listen = %local_addr, store = %crate::store::hex(&store_id), tools = config.tools.len(), "agent started");
    Ok(RunningAgent {
        peer_id: identity.peer_id(),
        local_addr,
        admin_addr,
        background,
        core: threads.core,
        reader,
        ctx,
        transport,
        shutdown,
        stop_tools: threads.stop_tools,
        tool_wakes: threads.tool_wakes,
        core_thread: Some(threads.core_thread),
        tool_threads: threads.tool_threads,
        commits: threads.commits,
        telemetry,
    })
}

/// The telemetry of the agent of `config`, with its tools and its peers.
fn new_telemetry(config: &Config) -> Telemetry {
    let tools = config
        .tools
        .iter()
        .map(|t| ToolInfo {
            name: t.name.get_ref().clone(),
            kind: t.kind.get_ref().name(),
            collections: t
                .collections
                .iter()
                .map(|c| c.name.get_ref().clone())
                .collect(),
        })
        .collect();
    let peers = config
        .peers
        .iter()
        .filter_map(|p| {
            let id = p.id.get_ref().parse::<PeerId>().ok()?;
            Some((id, p.addr.map(|a| a.to_string())))
        })
        .collect();
    Telemetry::new(tools, peers)
}

/// Takes a point of the throughput series every [`crate::telemetry::SERIES_INTERVAL_MS`],
/// until shutdown.
async fn sample(telemetry: Arc<Telemetry>, mut shutdown: watch::Receiver<bool>) {
    let period = std::time::Duration::from_millis(crate::telemetry::SERIES_INTERVAL_MS);
    let mut interval = tokio::time::interval(period);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = interval.tick() => telemetry.sample(),
            () = async { let _ = shutdown.wait_for(|stop| *stop).await; } => return,
        }
    }
}

/// How long `concord run` waits for a clean stop after SIGINT or SIGTERM before
/// exiting anyway (every commit is durable, so exiting loses nothing).
pub const SHUTDOWN_GRACE_MS: u64 = 10_000;

/// How often the core looks for dead letters due for a retry.
pub const RETRY_TICK_MS: u64 = 500;

/// Tells the core that time passed, until shutdown.
async fn tick(core: CoreHandle, mut shutdown: watch::Receiver<bool>) {
    let mut interval = tokio::time::interval(std::time::Duration::from_millis(RETRY_TICK_MS));
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = interval.tick() => {
                if core.send(CoreRequest::Tick).await.is_err() {
                    return;
                }
            }
            () = async { let _ = shutdown.wait_for(|stop| *stop).await; } => return,
        }
    }
}

/// What [`assemble`] made: the store and the threads that own it.
struct Assembled {
    threads: Threads,
    store_id: crate::store::StoreId,
    reader: StoreReader,
    collection_names: Vec<String>,
}

/// Opens the tools and the store, and starts the core and tool threads.
fn assemble(
    config: &Config,
    me: &PeerId,
    telemetry: Arc<Telemetry>,
    webhooks: &WebhookEndpoints,
) -> Result<Assembled, StartError> {
    let mut connectors = open_tools(config, webhooks)?;
    let schemas: Vec<ToolSchema> = connectors
        .iter()
        .zip(&config.tools)
        .map(|(c, tool)| ToolSchema::of(c.as_ref(), tool))
        .collect();
    // Checked before the store is created: a wrong identity leaves nothing behind.
    let specs = tool_specs(config, &uid_prefix(me), &schemas)?;
    std::fs::create_dir_all(&config.data_dir).map_err(|source| StartError::DataDir {
        path: config.data_dir.clone(),
        source,
    })?;
    let store = Store::open(&config.data_dir)?;
    let store_id = store.actor();
    let reader = store.reader();
    let mut loops = Vec::with_capacity(connectors.len());
    for (tool, connector) in config.tools.iter().zip(&mut connectors) {
        connector
            .claim(&store_id)
            .map_err(|source| StartError::Tool {
                tool: tool.name.get_ref().clone(),
                source: source.0,
            })?;
        loops.push(ToolLoop::new(reader.tool_cursor(tool.name.get_ref())?));
    }
    let engine = Engine::new(
        store,
        specs,
        config.collections.iter().map(|c| c.name.get_ref().clone()),
    )?
    .with_policies(uid_prefix(me), collection_policies(config));
    let collection_names: Vec<String> = engine.collections().map(str::to_owned).collect();
    let names = config.tools.iter().map(|t| t.name.get_ref().clone());
    let threads = spawn_threads(
        engine,
        connectors.into_iter().zip(names).zip(loops),
        telemetry,
    )?;
    Ok(Assembled {
        threads,
        store_id,
        reader,
        collection_names,
    })
}

/// Opens every configured tool and checks the configuration against it.
fn open_tools(
    config: &Config,
    webhooks: &WebhookEndpoints,
) -> Result<Vec<Box<dyn Connector>>, StartError> {
    config
        .tools
        .iter()
        .enumerate()
        .map(|(t, tool)| open_tool(config, t, tool, webhooks))
        .collect()
}

/// Opens one tool.
fn open_tool(
    config: &Config,
    t: usize,
    tool: &ToolConfig,
    webhooks: &WebhookEndpoints,
) -> Result<Box<dyn Connector>, StartError> {
    match tool.kind.get_ref() {
        ToolKind::Sqlite => {
            let path = sqlite_path(tool);
            match SqliteConnector::open(&path, collection_specs(config, t)?) {
                Ok(connector) => Ok(Box::new(connector)),
                Err(e) => Err(sqlite_error(config, t, tool, &path, e)),
            }
        }
        ToolKind::Postgres => {
            let pg = postgres_config(tool);
            match PostgresConnector::open(&pg, collection_specs(config, t)?) {
                Ok(connector) => Ok(Box::new(connector)),
                Err(e) => Err(postgres_error(config, t, tool, e)),
            }
        }
        ToolKind::Caldav => {
            let caldav = caldav_config(config, t, tool)?;
            match CaldavConnector::open(&caldav, collection_specs(config, t)?) {
                Ok(connector) => Ok(Box::new(connector)),
                Err(e) => Err(caldav_error(config, t, tool, e)),
            }
        }
        ToolKind::Rest => {
            let hooks = webhooks.get(tool.name.get_ref()).cloned();
            let rest = crate::apps::rest_config(config, t, tool, hooks)?;
            match RestConnector::open(&rest, crate::apps::rest_collections(config, t)?) {
                Ok(connector) => Ok(Box::new(connector)),
                Err(e) => Err(crate::apps::rest_error(config, t, tool, e)),
            }
        }
        ToolKind::Csv => {
            let csv = crate::apps::csv_config(config, tool);
            match CsvConnector::open(&csv, crate::apps::csv_collections(config, t)?) {
                Ok(connector) => Ok(Box::new(connector)),
                Err(e) => Err(crate::apps::csv_error(config, t, tool, e)),
            }
        }
    }
}

/// A `caldav` tool's settings; its state file lives in the agent's data folder.
pub(crate) fn caldav_config(
    config: &Config,
    t: usize,
    tool: &ToolConfig,
) -> Result<CaldavConfig, StartError> {
    let user = crate::apps::basic_auth(config, t, tool)?;
    Ok(CaldavConfig {
        url: tool
            .url
            .as_ref()
            .map(|u| u.get_ref().clone())
            .unwrap_or_default(),
        user,
        poll_interval: tool
            .poll_interval_ms
            .as_ref()
            .map_or(connectors::caldav::POLL_INTERVAL_DEFAULT, |ms| {
                std::time::Duration::from_millis(*ms.get_ref())
            }),
        state: config
            .data_dir
            .join("tools")
            .join(format!("{}.caldav", tool.name.get_ref())),
    })
}

/// Names the configuration entry behind a CalDAV connector's error at start.
pub(crate) fn caldav_error(
    config: &Config,
    t: usize,
    tool: &ToolConfig,
    error: CaldavError,
) -> StartError {
    let at = match &error {
        CaldavError::NoCalendar { calendar, .. } => Some((calendar.clone(), "table", None)),
        CaldavError::UnknownColumn {
            calendar, column, ..
        } => Some((calendar.clone(), "columns", Some(column.clone()))),
        CaldavError::PrimaryKey { calendar, .. } => Some((calendar.clone(), "primary_key", None)),
        _ => None,
    };
    tool_error(config, t, tool, at, error.to_string())
}

/// A `sqlite` tool's database file.
pub(crate) fn sqlite_path(tool: &ToolConfig) -> std::path::PathBuf {
    tool.path
        .as_ref()
        .map(|p| p.get_ref().clone())
        .unwrap_or_default()
}

/// A `postgres` tool's connection settings.
pub(crate) fn postgres_config(tool: &ToolConfig) -> PostgresConfig {
    PostgresConfig {
        url: tool
            .url
            .as_ref()
            .map(|u| u.get_ref().clone())
            .unwrap_or_default(),
        poll_interval: tool
            .poll_interval_ms
            .as_ref()
            .map_or(connectors::postgres::POLL_INTERVAL_DEFAULT, |ms| {
                std::time::Duration::from_millis(*ms.get_ref())
            }),
    }
}

/// Each listed collection's conflict and delete policies, from its `[[collection]]`.
pub fn collection_policies(config: &Config) -> BTreeMap<String, CollectionPolicy> {
    let field_policy = |policy: ConflictPolicy, tool: Option<&toml::Spanned<String>>| match policy {
        ConflictPolicy::LatestEdit => FieldPolicy::LatestEdit,
        ConflictPolicy::Manual => FieldPolicy::Manual,
        ConflictPolicy::SystemOfRecord => {
            FieldPolicy::SystemOfRecord(tool.map(|t| t.get_ref().clone()).unwrap_or_default())
        }
    };
    config
        .collections
        .iter()
        .map(|c| {
            let policy = CollectionPolicy {
                conflicts: field_policy(
                    c.conflicts
                        .as_ref()
                        .map(|p| *p.get_ref())
                        .unwrap_or_default(),
                    c.system_of_record.as_ref(),
                ),
                fields: c
                    .fields
                    .iter()
                    .map(|(field, p)| {
                        let policy =
                            field_policy(*p.conflicts.get_ref(), p.system_of_record.as_ref());
                        (field.clone(), policy)
                    })
                    .collect(),
                deletes: c.deletes.as_ref().map(|d| *d.get_ref()).unwrap_or_default(),
                hold_deletes: c
                    .hold_deletes
                    .as_ref()
                    .map(|h| h.get_ref().iter().cloned().collect())
                    .unwrap_or_default(),
            };
            (c.name.get_ref().clone(), policy)
        })
        .collect()
}

/// The collection specs of tool `t`: the columns its mappings read and write.
pub(crate) fn collection_specs(
    config: &Config,
    t: usize,
) -> Result<Vec<CollectionSpec>, StartError> {
    let tool = &config.tools[t];
    let mut specs = Vec::with_capacity(tool.collections.len());
    for (i, c) in tool.collections.iter().enumerate() {
        let mapping = mapping::collection_mapping(config, t, i, None)?;
        specs.push(CollectionSpec {
            collection: c.name.get_ref().clone(),
            table: c.table.get_ref().clone(),
            primary_key: c.primary_key.as_ref().map_or_else(
                || crate::apps::default_key(*tool.kind.get_ref()).to_owned(),
                |k| k.get_ref().clone(),
            ),
            columns: mapping.columns().to_vec(),
        });
    }
    Ok(specs)
}

/// Each tool as the engine knows it. A tool's id in documents joins this agent's
/// peer id (its first characters) and the tool's name, so two agents' tools of the
/// same name never share external ids. A collection's identity defaults to tool ids
/// where the tool assigns the keys, to a shared key elsewhere; tools of one agent
/// must agree on it.
pub(crate) fn tool_specs(
    config: &Config,
    agent: &str,
    schemas: &[ToolSchema],
) -> Result<Vec<ToolSpec>, StartError> {
    let mut chosen: BTreeMap<String, (RecordIdentity, String)> = BTreeMap::new();
    let mut specs = Vec::with_capacity(config.tools.len());
    for (t, (tool, schema)) in config.tools.iter().zip(schemas).enumerate() {
        let mut collections = BTreeMap::new();
        for (i, c) in tool.collections.iter().enumerate() {
            let name = c.name.get_ref();
            let table = &schema.tables[i];
            let assigns = table.assigns_keys;
            let field = format!("tool[{t}].collection[{i}].identity");
            let natural_key = mapping::natural_key(config, name)?;
            let identity = match c.identity.as_ref().map(|s| (*s.get_ref(), s.span())) {
                _ if natural_key.is_some() => {
                    natural_identity(config, c, &field, assigns, schema.kind)?
                }
                None if assigns => RecordIdentity::ToolIds,
                None => RecordIdentity::SharedKey,
                Some((IdentityConfig::SharedKey, _)) => RecordIdentity::SharedKey,
                Some((IdentityConfig::ToolIds, _)) if assigns => RecordIdentity::ToolIds,
                Some((IdentityConfig::ToolIds, span)) => {
                    return Err(StartError::Config(config.invalid(
                        span,
                        field,
                        format!(
                            "`tool_ids` needs keys the tool assigns, but the key of `{}` is not \
                             assigned by {} (use `shared_key`)",
                            c.table.get_ref(),
                            schema.kind
                        ),
                    )));
                }
            };
            if let Some((other, other_tool)) = chosen.get(name)
                && *other != identity
            {
                return Err(StartError::Config(config.invalid(
                    c.name.span(),
                    field,
                    format!(
                        "collection `{name}` is identified by {} here but by {} in tool \
                         `{other_tool}`; set the same `identity` for both",
                        identity_name(identity),
                        identity_name(*other)
                    ),
                )));
            }
            chosen.insert(name.clone(), (identity, tool.name.get_ref().clone()));
            // Checked again against the columns' real types.
            let mapping = mapping::collection_mapping(config, t, i, Some(&table.field_types))?;
            collections.insert(
                name.clone(),
                CollectionInfo {
                    mapping,
                    identity,
                    natural_key,
                },
            );
        }
        specs.push(ToolSpec {
            name: tool.name.get_ref().clone(),
            uid: format!("{agent}.{}", tool.name.get_ref()),
            collections,
        });
    }
    Ok(specs)
}

/// The identity of a tool's collection that has a natural key: each tool keeps the
/// keys it assigns, so the tool must assign them, and `identity` must not say
/// otherwise.
fn natural_identity(
    config: &Config,
    c: &crate::config::CollectionConfig,
    field: &str,
    assigns: bool,
    kind: &str,
) -> Result<RecordIdentity, StartError> {
    if let Some(identity) = &c.identity {
        return Err(StartError::Config(config.invalid(
            identity.span(),
            field.to_owned(),
            format!(
                "collection `{}` is identified by its `natural_key`: drop `identity`",
                c.name.get_ref()
            ),
        )));
    }
    if !assigns {
        return Err(StartError::Config(config.invalid(
            c.table.span(),
            field.to_owned(),
            format!(
                "records matched by a natural key keep the keys each tool assigns, but the \
                 key of `{}` is not assigned by {kind}",
                c.table.get_ref()
            ),
        )));
    }
    Ok(RecordIdentity::NaturalKey)
}

/// What the configuration is checked against of one tool: its kind and, per
/// configured collection in order, its table's schema.
#[derive(Debug)]
pub(crate) struct ToolSchema {
    pub(crate) kind: &'static str,
    pub(crate) tables: Vec<TableSchema>,
}

impl ToolSchema {
    /// The schema `connector`, open for `tool`, read.
    fn of(connector: &dyn Connector, tool: &ToolConfig) -> ToolSchema {
        let tables = tool
            .collections
            .iter()
            .map(|c| TableSchema {
                assigns_keys: connector.assigns_keys(c.name.get_ref()),
                field_types: connector
                    .field_types(c.name.get_ref())
                    .cloned()
                    .unwrap_or_default(),
            })
            .collect();
        ToolSchema {
            kind: connector.kind(),
            tables,
        }
    }
}

/// The first characters of the agent's peer id, which start its tools' ids in
/// documents.
fn uid_prefix(me: &PeerId) -> String {
    me.to_string().chars().take(TOOL_UID_AGENT_CHARS).collect()
}

/// How the config spells an identity.
fn identity_name(identity: RecordIdentity) -> &'static str {
    match identity {
        RecordIdentity::ToolIds => "`tool_ids`",
        RecordIdentity::SharedKey => "`shared_key`",
        RecordIdentity::NaturalKey => "a `natural_key`",
    }
}

/// Characters of the peer id in a tool's id in documents (40 bits).
pub const TOOL_UID_AGENT_CHARS: usize = 8;

/// The core and tool threads, and what the rest of the agent holds of them.
struct Threads {
    core: CoreHandle,
    log_version: watch::Receiver<u64>,
    commits: Arc<AtomicU64>,
    stop_tools: Arc<AtomicBool>,
    tool_wakes: Vec<std::sync::mpsc::SyncSender<core::ToolEvent>>,
    core_thread: std::thread::JoinHandle<()>,
    tool_threads: Vec<std::thread::JoinHandle<()>>,
}

fn spawn_threads(
    mut engine: Engine,
    tools: impl ExactSizeIterator<Item = ((Box<dyn Connector>, String), ToolLoop)>,
    telemetry: Arc<Telemetry>,
) -> Result<Threads, StartError> {
    let (core, core_rx) = core::channel();
    let (log_tx, log_version) = watch::channel(0u64);
    let commits = Arc::new(AtomicU64::new(0));
    let stop_tools = Arc::new(AtomicBool::new(false));
    let mut senders = Vec::with_capacity(tools.len());
    let mut pending_threads = Vec::with_capacity(tools.len());
    for (tool, ((connector, name), state)) in tools.enumerate() {
        engine.set_writes_per_plan(tool, connector.writes_per_plan());
        let (events_tx, events) = std::sync::mpsc::sync_channel(core::TOOL_EVENTS_MAX);
        senders.push(events_tx.clone());
        let thread = ToolThread {
            tool,
            name,
            connector,
            core: core.clone(),
            events,
            wake: events_tx,
            telemetry: telemetry.clone(),
        };
        pending_threads.push((thread, state));
    }
    let outputs = CoreOutputs {
        log_version: log_tx,
        write_back: senders.clone(),
        commits: commits.clone(),
        telemetry,
    };
    let core_thread = std::thread::Builder::new()
        .name("concord-core".into())
        .spawn(move || core::run(engine, core_rx, outputs))
        .map_err(StartError::Thread)?;
    let mut tool_threads = Vec::with_capacity(pending_threads.len());
    for (thread, state) in pending_threads {
        let stop = stop_tools.clone();
        let handle = std::thread::Builder::new()
            .name(format!("concord-tool-{}", thread.tool))
            .spawn(move || crate::tool::run(thread, state, stop))
            .map_err(StartError::Thread)?;
        tool_threads.push(handle);
    }
    Ok(Threads {
        core,
        log_version,
        commits,
        stop_tools,
        tool_wakes: senders,
        core_thread,
        tool_threads,
    })
}

/// Names the configuration entry behind a SQLite connector's error at start.
pub(crate) fn sqlite_error(
    config: &Config,
    t: usize,
    tool: &ToolConfig,
    path: &std::path::Path,
    error: SqliteError,
) -> StartError {
    let at = match &error {
        SqliteError::MissingTable { table }
        | SqliteError::NoPrimaryKey { table }
        | SqliteError::NotATable { table }
        | SqliteError::ReservedTable { table }
        | SqliteError::CompositePrimaryKey { table, .. } => Some((table.clone(), "table", None)),
        SqliteError::PrimaryKeyMismatch { table, .. } => Some((table.clone(), "primary_key", None)),
        SqliteError::MissingColumn { table, column }
        | SqliteError::UnsupportedType { table, column, .. } => {
            Some((table.clone(), "columns", Some(column.clone())))
        }
        _ => None,
    };
    let message = format!("{error} (database {})", path.display());
    tool_error(config, t, tool, at, message)
}

/// Names the configuration entry behind a PostgreSQL connector's error at start.
pub(crate) fn postgres_error(
    config: &Config,
    t: usize,
    tool: &ToolConfig,
    error: PostgresError,
) -> StartError {
    let at = match &error {
        PostgresError::MissingTable { table }
        | PostgresError::NoPrimaryKey { table }
        | PostgresError::NotATable { table, .. }
        | PostgresError::ReservedTable { table }
        | PostgresError::CompositePrimaryKey { table, .. } => Some((table.clone(), "table", None)),
        PostgresError::PrimaryKeyMismatch { table, .. } => {
            Some((table.clone(), "primary_key", None))
        }
        PostgresError::MissingColumn { table, column }
        | PostgresError::UnsupportedType { table, column, .. } => {
            Some((table.clone(), "columns", Some(column.clone())))
        }
        PostgresError::BadUrl(_) => {
            if let Some(url) = &tool.url {
                return StartError::Config(config.invalid(
                    url.span(),
                    format!("tool[{t}].url"),
                    error.to_string(),
                ));
            }
            None
        }
        _ => None,
    };
    tool_error(config, t, tool, at, error.to_string())
}

/// A tool's error at start: at the configuration entry of the table it names, if any.
pub(crate) fn tool_error(
    config: &Config,
    t: usize,
    tool: &ToolConfig,
    at: Option<(String, &str, Option<String>)>,
    message: String,
) -> StartError {
    if let Some((table, field, column)) = at {
        for (i, c) in tool.collections.iter().enumerate() {
            if *c.table.get_ref() != table {
                continue;
            }
            // A column of a `[[tool.collection.field]]` is named there.
            let mapped = c
                .fields
                .iter()
                .position(|f| Some(f.column.get_ref()) == column.as_ref());
            let (span, field) = match (field, mapped) {
                ("columns", Some(k)) => (c.fields[k].column.span(), format!("field[{k}].column")),
                ("primary_key", _) => (
                    c.primary_key.as_ref().map_or(c.table.span(), |k| k.span()),
                    field.to_owned(),
                ),
                ("columns", None) => (
                    c.columns.as_ref().map_or(c.table.span(), |c| c.span()),
                    field.to_owned(),
                ),
                _ => (c.table.span(), field.to_owned()),
            };
            return StartError::Config(config.invalid(
                span,
                format!("tool[{t}].collection[{i}].{field}"),
                message,
            ));
        }
    }
    StartError::Tool {
        tool: tool.name.get_ref().clone(),
        source: message.into(),
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

    /// The address of the admin API.
    pub fn admin_addr(&self) -> SocketAddr {
        self.admin_addr
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

    /// The agent's telemetry: status, metrics, activity.
    pub fn telemetry(&self) -> &Arc<Telemetry> {
        &self.telemetry
    }

    /// What the engine did so far.
    pub async fn stats(&self) -> Option<EngineStats> {
        let (reply, answer) = oneshot::channel();
        self.core.send(CoreRequest::Stats { reply }).await.ok()?;
        answer.await.ok()
    }

    /// Stops the agent: closes connections, stops the threads, flushes the store.
    pub async fn shutdown(mut self) {
        self.telemetry.stopping();
        let _ = self.shutdown.send(true);
        for task in std::mem::take(&mut self.background) {
            task.abort();
            let _ = task.await;
        }
        self.transport.close();
        self.stop_tools.store(true, Ordering::Relaxed);
        for wake in std::mem::take(&mut self.tool_wakes) {
            // Full means a wake-up is queued already.
            let _ = wake.try_send(core::ToolEvent::Wake);
        }
        let tools = std::mem::take(&mut self.tool_threads);
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
            for tool in tools {
                let _ = tool.join();
            }
            if let Some(core_thread) = core_thread {
                let _ = core_thread.join();
            }
        })
        .await;
    }
}
