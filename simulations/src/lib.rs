//! Deterministic simulation of many Concord agents under injected faults, in the
//! tradition of FoundationDB's simulator and TigerBeetle's VOPR.
//!
//! One seed drives one exact run of the agent's real loops: the real [`Core`] (its
//! group commit over the real engine and a real fjall store), the real peer policy
//! and replication [`Session`], the real tool loop ([`ToolLoop`]) and the real
//! `crdt-model`, with a simulated clock, a simulated network and simulated tools
//! ([`tool::SimTool`]). Only the pumps are the simulator's own: it moves frames,
//! hands requests to each agent's core queue and decides when the core drains it,
//! so batches of many sizes and mixes happen, as they do under load. Nothing reads
//! the wall clock or a socket, and nothing runs on another thread, so the same seed
//! gives the same trace hash.
//!
//! A run has two phases. During the **fault phase** users edit their tools (single
//! edits, deletes, re-inserts of deleted keys, bulk imports larger than the
//! document cache, and orders whose ids each tool assigns, colliding across tools) while faults, mixed per seed (swarm testing), hit the cluster:
//! symmetric and one-way partitions; message loss, duplication, reordering and
//! delay; crashes with restarts; store wipes; clock skew; a core that falls behind
//! its queue. In the **heal phase** faults stop, every agent runs and every link is
//! up, and the cluster must converge within [`Config::heal_bound_ms`] and then stay
//! quiet. Then two probes run on the healed cluster: a record deleted and created
//! again must start clean everywhere, and a tool that commits without pause must
//! still receive remote edits. Every run checks the invariants listed on [`Report`].
//!
//! ```no_run
//! let report = simulations::run(7, &simulations::Config::default());
//! assert!(report.failure.is_none(), "{:?}", report.failure);
//! ```

pub mod rng;
pub mod tool;

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, VecDeque};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use concord_agent::agent::RETRY_TICK_MS;
use concord_agent::config::Normalize;
use concord_agent::core::{Core, CoreRequest, GROUP_COMMIT_REQUESTS_MAX};
use concord_agent::engine::{
    CollectionInfo, CollectionPolicy, Engine, FieldPolicy, RecordIdentity, RemoteError, ToolSpec,
    WritePlan,
};
use concord_agent::mapping::{Mapping, NaturalKey};
use concord_agent::peers::EVENTS_IN_FLIGHT_MAX;
use concord_agent::replication::{Action, Following, Session};
use concord_agent::store::{Store, StoreId};
use concord_agent::tool::{CAPTURE_BATCH_MAX, ToolLoop, all_stale};
use connectors::{Connector, OpOutcome, WriteOp};
use crdt_model::{ChangeHash, DocId, Record, Value};
use sha2::{Digest, Sha256};
use tokio::sync::oneshot;

use crate::rng::Rng;
use crate::tool::{COLLECTION, COLLECTIONS, COLUMNS, ORDERS, SimTool};

/// Simulated milliseconds per step of the clock.
pub const TICK_MS: u64 = 5;
/// Clusters of more agents than this are linked through hubs (see `Sim::new`).
pub const WIDE_AGENTS_MIN: usize = 12;
/// Keys users pick from: few enough that agents create the same key offline.
pub const KEYS_MAX: u64 = 24;
/// Documents each simulated store caches: small, so that a bulk import touches more
/// documents in one group commit than the cache holds, as a large one does in an
/// agent with the real bound.
pub const SIM_DOC_CACHE_MAX: usize = 64;
/// Log entries that keep their change bytes in a simulated store (a real one keeps
/// `LOG_RAW_KEEP`): fewer than a run appends, so peers that fall behind read entries
/// without them, and more than one step appends, so the echo check, which reads
/// each entry once after the step that committed it, still sees its own changes.
pub const SIM_LOG_RAW_KEEP: u64 = 1024;
/// Rows of a bulk import: more than the document cache holds.
pub const BULK_ROWS: u64 = 150;
/// How long a link may see nothing in one direction before it is closed (QUIC's idle timeout).
pub const LINK_IDLE_TIMEOUT_MS: u64 = 10_000;
/// Capture batches handed to an agent's core and not yet durable, at most.
pub const CAPTURES_IN_FLIGHT_MAX: usize = 256;
/// The chance that a user answers a row the agent just wrote: low enough that
/// answers to answers die out instead of flooding the cluster (in a cluster of up
/// to [`BUSY_AGENTS_MAX`]; wider ones scale it down, see [`Sim::busy_share`]).
const ANSWER_CHANCE: f64 = 0.1;
/// How often each user edits, on average, in clusters of up to [`BUSY_AGENTS_MAX`].
const USER_EDIT_MS: f64 = 2_000.0;
/// The widest cluster whose users edit at the full rate. In a wider one each user
/// edits, and answers, that much less often, so the cluster as a whole edits as
/// this many agents do. Otherwise an edit's answers grow with the agents (every
/// agent writes every edit back, and each write is answered at [`ANSWER_CHANCE`]):
/// past ten agents each edit brought more than one answer, the answers never died
/// out, and a wide run flooded itself instead of testing its width.
pub const BUSY_AGENTS_MAX: usize = 8;
/// How long the probe's user commits without pause.
pub const HOT_PROBE_MS: u64 = 5_000;
/// The simulated wall clock starts here (2026-01-01), in ms since the Unix epoch.
pub const EPOCH_MS: i64 = 1_767_225_600_000;
/// Values a user writes carry the user's agent number times this, so the simulator
/// can tell whose edit a value is.
const VALUE_AGENT_STRIDE: i64 = 1_000_000;
/// Names of orders that users on different sites create alike, under a natural key.
const SHARED_ORDER_NAMES: u64 = 4;

/// How a run is shaped.
#[derive(Debug, Clone)]
pub struct Config {
    /// Agents in the cluster; 0 picks 3 to 7 from the seed.
    pub agents: usize,
    /// Length of the fault phase, in simulated ms.
    pub fault_ms: u64,
    /// The healed cluster must converge within this many simulated ms.
    pub heal_bound_ms: u64,
    /// After converging, nothing may happen for this many simulated ms.
    pub quiet_ms: u64,
    /// Keep a readable trace of every event.
    pub trace: bool,
}

impl Default for Config {
    fn default() -> Config {
        Config {
            agents: 0,
            fault_ms: 600_000,
            heal_bound_ms: 120_000,
            quiet_ms: 30_000,
            trace: false,
        }
    }
}

/// The policies of policy set `set` (from the seed): 0 latest edit everywhere; 1
/// agent 0's tool is the system of record for `qty`; 2 `note` waits for a person
/// (manual: the latest edit meanwhile); 3 latest edit, and an edit concurrent with a
/// delete brings the record back.
fn policies(set: u64) -> BTreeMap<String, CollectionPolicy> {
    let mut policy = CollectionPolicy::default();
    match set {
        1 => {
            policy.fields.insert(
                "qty".to_owned(),
                FieldPolicy::SystemOfRecord("agent0.tool".to_owned()),
            );
        }
        2 => {
            policy.fields.insert("note".to_owned(), FieldPolicy::Manual);
        }
        3 => policy.deletes = concord_agent::config::DeletePolicy::EditWins,
        _ => {}
    }
    COLLECTIONS
        .iter()
        .map(|c| ((*c).to_owned(), policy.clone()))
        .collect()
}

/// The outcome of one run. Checked on every run: (1) convergence: identical
/// documents on all agents and every tool holding their projection; (2) no lost
/// acknowledged write: every change a capture committed is in every agent's
/// document; (3) no duplicates: one document per key, holding its own identity;
/// (4) quiet: no change, capture or write for [`Config::quiet_ms`] after converging,
/// and no more writes per tool than captured edits; (5) no echo: a capture never
/// records, as a local edit, a value the local user did not write; (6) a record
/// deleted and created again starts from the new row on every agent; (7) a tool
/// that commits all the time still receives remote edits; (8) determinism, by
/// replaying a seed and comparing [`Report::trace_hash`].
#[derive(Debug, Clone)]
pub struct Report {
    /// The seed.
    pub seed: u64,
    /// Agents simulated.
    pub agents: usize,
    /// Simulated time, in ms.
    pub sim_ms: u64,
    /// Faults injected, by kind.
    pub faults: BTreeMap<&'static str, u64>,
    /// User edits made.
    pub edits: u64,
    /// Invariant checks that ran (and passed, unless `failure` says otherwise).
    pub checks: u64,
    /// Group commits of more than one request.
    pub group_commits: u64,
    /// Stored documents the cores' idle compaction saved again as one.
    pub docs_compacted: u64,
    /// Frames the sessions sent (lost ones included), and their bytes.
    pub frames: u64,
    pub frame_bytes: u64,
    /// How long the cluster took to converge once healed, in simulated ms.
    pub heal_ms: u64,
    /// The hash of everything that happened.
    pub trace_hash: [u8; 32],
    /// The first invariant violated, if any.
    pub failure: Option<String>,
    /// The readable trace, if asked for.
    pub trace: Vec<String>,
}

/// Which faults a seed enables and how often they strike.
#[derive(Debug, Clone, Default)]
struct Swarm {
    /// Per-tick chance of each fault kind (0 when disabled).
    partition: f64,
    oneway: f64,
    crash: f64,
    wipe: f64,
    /// Orders are matched by a natural key (their name, trimmed and lower-cased)
    /// instead of tool ids, and users sometimes give orders names other sites use.
    natural_orders: bool,
    /// Which conflict and delete policies the collections use (see [`policies`]).
    policies: u64,
    loss: f64,
    duplicate: f64,
    reorder: f64,
    /// Per-tick chance that an agent's core leaves its queue for later.
    core_pause: f64,
    /// Per-tick chance of a bulk import (one agent, once per run at most).
    bulk: f64,
    slow: bool,
    skew: bool,
    topology: &'static str,
}

/// A session event's answer, awaited from the core.
type PendingActions = oneshot::Receiver<Result<Vec<Action>, RemoteError>>;

struct Agent {
    dir: PathBuf,
    core: Option<Core>,
    tool: SimTool,
    tool_loop: ToolLoop,
    /// The core's queue.
    queue: VecDeque<CoreRequest>,
    /// Answers to the captures handed to the core, in order.
    captures: VecDeque<oneshot::Receiver<()>>,
    /// A write-back plan on its way to the tool, and when it arrives.
    plan: Option<(WritePlan, u64)>,
    skew_ms: i64,
    restart_at: Option<u64>,
    /// Bumped whenever the agent's log grows, as the real core announces it.
    log_version: u64,
    /// The agent's log of each collection ([`COLLECTIONS`]) read up to here for
    /// acknowledged changes.
    acked_seq: [u64; 2],
    /// Values this agent's user wrote, counted to make each one unique.
    values: i64,
    /// Keys of rows the agent wrote in its last write-back: users answer what they
    /// just received, while the agent's own bookkeeping of the write may still wait
    /// in the core's queue.
    just_written: Vec<String>,
    /// The stores whose logs the agent follows live, as the QUIC driver keeps them
    /// (session ids are link indexes).
    following: Following,
}

/// A frame in flight: (arrival ms, send order, bytes).
type InFlight = (u64, u64, Vec<u8>);

struct Link {
    a: usize,
    b: usize,
    /// The two ends' sessions while connected: [a's, b's].
    ends: Option<[Session; 2]>,
    /// Each end's events handed to its core, awaiting their actions, in order.
    pending: [VecDeque<PendingActions>; 2],
    /// Frames in flight: [a→b, b→a], ordered by arrival time, then send order.
    queues: [BinaryHeap<Reverse<InFlight>>; 2],
    /// The last arrival time queued per direction (FIFO unless reordered).
    last_arrival: [u64; 2],
    /// The log version each end's session last read at.
    log_seen: [u64; 2],
    /// Whether each end's session is in its agent's [`Following`].
    follows: [bool; 2],
    /// The [`Following::version`] each end's session was last told.
    follow_seen: [Option<u64>; 2],
    partitioned_until: u64,
    /// A one-way block: direction and until when.
    oneway: Option<(usize, u64, u64)>,
    reconnect_at: u64,
}

struct Sim {
    config: Config,
    rng: Rng,
    now: u64,
    base: Instant,
    _root: tempfile::TempDir,
    agents: Vec<Agent>,
    links: Vec<Link>,
    swarm: Swarm,
    faults: BTreeMap<&'static str, u64>,
    hasher: Sha256,
    trace: Option<Vec<String>>,
    /// Changes captures committed: (document, change, the store that made it).
    acknowledged: Vec<(DocId, ChangeHash, Vec<u8>)>,
    frame_seq: u64,
    frames: u64,
    frame_bytes: u64,
    heal_ms: u64,
    checks: u64,
    group_commits: u64,
    docs_compacted: u64,
    /// The first invariant broken while running (checked as it happens).
    broken: Option<String>,
}

/// Runs the simulation of `seed`.
pub fn run(seed: u64, config: &Config) -> Report {
    let mut sim = match Sim::new(seed, config) {
        Ok(sim) => sim,
        Err(e) => return Report::failed(seed, config, format!("setup: {e}")),
    };
    let failure = sim.run().err();
    Report {
        seed,
        agents: sim.agents.len(),
        sim_ms: sim.now,
        faults: sim.faults.clone(),
        edits: sim.agents.iter().map(|a| a.tool.edits).sum(),
        checks: sim.checks,
        group_commits: sim.group_commits,
        docs_compacted: sim.docs_compacted,
        frames: sim.frames,
        frame_bytes: sim.frame_bytes,
        heal_ms: sim.heal_ms,
        trace_hash: sim.hasher.clone().finalize().into(),
        failure,
        trace: sim.trace.take().unwrap_or_default(),
    }
}

impl Report {
    fn failed(seed: u64, config: &Config, failure: String) -> Report {
        Report {
            seed,
            agents: config.agents,
            sim_ms: 0,
            faults: BTreeMap::new(),
            edits: 0,
            checks: 0,
            group_commits: 0,
            docs_compacted: 0,
            frames: 0,
            frame_bytes: 0,
            heal_ms: 0,
            trace_hash: [0; 32],
            failure: Some(failure),
            trace: Vec::new(),
        }
    }
}

/// A directory for the stores: memory-backed when the machine has one, so that
/// fsync costs nothing.
fn scratch_dir() -> std::io::Result<tempfile::TempDir> {
    let shm = std::path::Path::new("/dev/shm");
    if shm.is_dir()
        && let Ok(dir) = tempfile::Builder::new()
            .prefix("concord-sim-")
            .tempdir_in(shm)
    {
        return Ok(dir);
    }
    tempfile::Builder::new().prefix("concord-sim-").tempdir()
}

/// Why pumping a link stopped.
enum Pump {
    /// The session broke: close the link, reconnect later.
    Closed(String),
    /// The store failed or an invariant broke: the run is over.
    Fatal(String),
}

impl Sim {
    fn new(seed: u64, config: &Config) -> anyhow::Result<Sim> {
        let mut rng = Rng::new(seed);
        let agents = if config.agents == 0 {
            rng.range(3, 7) as usize
        } else {
            config.agents
        };
        let mut swarm = Swarm::default();
        let on = |rng: &mut Rng, rate: f64| if rng.chance(0.5) { rate } else { 0.0 };
        swarm.partition = on(&mut rng, 0.0004);
        swarm.oneway = on(&mut rng, 0.0002);
        swarm.crash = on(&mut rng, 0.0002);
        swarm.wipe = on(&mut rng, 0.00005);
        swarm.loss = on(&mut rng, 0.002);
        swarm.duplicate = on(&mut rng, 0.002);
        swarm.reorder = on(&mut rng, 0.002);
        swarm.core_pause = on(&mut rng, 0.6);
        swarm.bulk = on(&mut rng, 0.0002);
        swarm.slow = rng.chance(0.5);
        swarm.skew = rng.chance(0.5);
        swarm.topology = ["mesh", "line", "star"][rng.below(3) as usize];
        if agents > WIDE_AGENTS_MIN {
            // A wide cluster is linked as users link one: a few hubs meshed with each
            // other, every other agent on one hub (a mesh of 100 agents would be
            // 4,950 links, a line 99 hops).
            swarm.topology = "hubs";
        }
        // From the seed, not the generator, so other seeds replay as before.
        swarm.natural_orders = seed % 2 == 1;
        swarm.policies = (seed / 2) % 4;
        let root = scratch_dir()?;
        let mut sim_agents = Vec::with_capacity(agents);
        for i in 0..agents {
            let skew_ms = if swarm.skew {
                rng.range(0, 600_000) as i64 - 300_000
            } else {
                0
            };
            sim_agents.push(Agent {
                dir: root.path().join(format!("agent-{i}")),
                core: None,
                tool: SimTool::default(),
                tool_loop: ToolLoop::new(connectors::Cursor::start()),
                queue: VecDeque::new(),
                captures: VecDeque::new(),
                plan: None,
                skew_ms,
                restart_at: Some(0),
                log_version: 0,
                acked_seq: [0; 2],
                values: 0,
                just_written: Vec::new(),
                following: Following::default(),
            });
        }
        let mut links = Vec::new();
        let hubs = agents.isqrt();
        for a in 0..agents {
            for b in a + 1..agents {
                let linked = match swarm.topology {
                    "hubs" => a < hubs && (b < hubs || b % hubs == a),
                    "line" => b == a + 1,
                    "star" => a == 0,
                    _ => true,
                };
                if linked {
                    links.push(Link {
                        a,
                        b,
                        ends: None,
                        pending: [VecDeque::new(), VecDeque::new()],
                        queues: [BinaryHeap::new(), BinaryHeap::new()],
                        last_arrival: [0, 0],
                        log_seen: [0, 0],
                        follows: [false, false],
                        follow_seen: [None, None],
                        partitioned_until: 0,
                        oneway: None,
                        reconnect_at: 0,
                    });
                }
            }
        }
        let mut sim = Sim {
            config: config.clone(),
            rng,
            now: 0,
            base: Instant::now(),
            _root: root,
            agents: sim_agents,
            links,
            swarm,
            faults: BTreeMap::new(),
            hasher: Sha256::new(),
            trace: config.trace.then(Vec::new),
            acknowledged: Vec::new(),
            frame_seq: 0,
            frames: 0,
            frame_bytes: 0,
            heal_ms: 0,
            checks: 0,
            group_commits: 0,
            docs_compacted: 0,
            broken: None,
        };
        let swarm = format!("{:?}", sim.swarm);
        sim.log(format!("seed {seed}: {agents} agents, {swarm}"));
        if sim.swarm.slow {
            sim.fault("delay", "every link 20-400 ms".to_owned());
        }
        for i in 0..agents {
            let skew = sim.agents[i].skew_ms;
            if skew != 0 {
                sim.fault("clock skew", format!("agent {i} {skew:+} ms"));
            }
        }
        Ok(sim)
    }

    fn log(&mut self, line: String) {
        self.hasher.update(self.now.to_le_bytes());
        self.hasher.update(line.as_bytes());
        if let Some(trace) = &mut self.trace {
            trace.push(format!("{:>9} ms  {line}", self.now));
        }
    }

    fn fault(&mut self, kind: &'static str, line: String) {
        *self.faults.entry(kind).or_default() += 1;
        self.log(format!("FAULT {kind}: {line}"));
    }

    fn instant(&self) -> Instant {
        self.base + Duration::from_millis(self.now)
    }

    fn wall_ms(&self, i: usize) -> i64 {
        EPOCH_MS + self.now as i64 + self.agents[i].skew_ms
    }

    fn run(&mut self) -> Result<(), String> {
        while self.now < self.config.fault_ms {
            self.inject_faults();
            self.workload();
            self.tick()?;
        }
        self.heal();
        let healed = self.now;
        self.converge()?;
        self.heal_ms = self.now - healed;
        self.checks += 1;
        self.log("CONVERGED".to_owned());
        self.check_acknowledged()?;
        self.check_identities()?;
        self.check_orders_once()?;
        self.check_quiet()?;
        self.probe_reinsert()?;
        self.probe_hot_tool()?;
        let heads = self.final_heads()?;
        self.hasher.update(heads);
        Ok(())
    }

    /// No more faults or edits; every agent up, every link allowed.
    fn heal(&mut self) {
        self.log("HEAL".to_owned());
        for i in 0..self.agents.len() {
            if self.agents[i].core.is_none() {
                self.agents[i].restart_at = Some(self.now);
            }
        }
        for link in &mut self.links {
            link.partitioned_until = 0;
            link.oneway = None;
        }
        self.swarm.loss = 0.0;
        self.swarm.duplicate = 0.0;
        self.swarm.reorder = 0.0;
    }

    /// Ticks until the cluster converged, within the heal bound.
    fn converge(&mut self) -> Result<(), String> {
        let deadline = self.now + self.config.heal_bound_ms;
        let mut last_mismatch = String::new();
        loop {
            self.tick()?;
            if self.now.is_multiple_of(500) {
                match self.converged() {
                    Ok(()) => return Ok(()),
                    Err(why) => last_mismatch = why,
                }
            }
            if self.now >= deadline {
                return Err(format!(
                    "no convergence within {} ms of healing: {last_mismatch}",
                    self.config.heal_bound_ms
                ));
            }
        }
    }

    /// Nothing may happen any more, and no tool got more writes than edits made.
    fn check_quiet(&mut self) -> Result<(), String> {
        let before = self.activity()?;
        let until = self.now + self.config.quiet_ms;
        while self.now < until {
            self.tick()?;
        }
        let after = self.activity()?;
        if before != after {
            return Err(format!(
                "not quiet after converging: activity {before:?} became {after:?}"
            ));
        }
        self.checks += 1;
        let captured: u64 = self.agents.iter().map(|a| a.tool.edits).sum();
        for (i, agent) in self.agents.iter().enumerate() {
            if agent.tool.writes > captured {
                return Err(format!(
                    "agent {i}'s tool got {} writes for {captured} edits in all",
                    agent.tool.writes
                ));
            }
        }
        self.checks += 1;
        Ok(())
    }

    /// One step of the clock.
    fn tick(&mut self) -> Result<(), String> {
        for i in 0..self.agents.len() {
            if self.agents[i].restart_at.is_some_and(|t| t <= self.now) {
                self.start_agent(i)?;
            }
        }
        let now = self.instant();
        for agent in &mut self.agents {
            agent.following.poll(now);
        }
        for l in 0..self.links.len() {
            self.step_link(l)?;
        }
        if self.now.is_multiple_of(RETRY_TICK_MS) {
            // As the agent's timer does: dead letters due are retried, and an idle
            // core compacts documents.
            for agent in &mut self.agents {
                if agent.core.is_some() {
                    agent.queue.push_back(CoreRequest::Tick);
                }
            }
        }
        for i in 0..self.agents.len() {
            self.step_tool(i);
            self.step_core(i)?;
        }
        if let Some(broken) = self.broken.take() {
            return Err(broken);
        }
        self.now += TICK_MS;
        Ok(())
    }

    fn start_agent(&mut self, i: usize) -> Result<(), String> {
        let actor = self.rng.bytes16();
        let agent = &mut self.agents[i];
        agent.restart_at = None;
        // A new process: it follows nothing and has walked with no peer yet.
        agent.following = Following::default();
        let mut store =
            Store::open_with(&agent.dir, || actor).map_err(|e| format!("agent {i}: {e}"))?;
        store.set_doc_cache_max(SIM_DOC_CACHE_MAX);
        store.set_log_raw_keep(SIM_LOG_RAW_KEEP);
        let columns: Vec<String> = COLUMNS.iter().map(|c| (*c).to_owned()).collect();
        let info = |identity, natural_key| CollectionInfo {
            mapping: Mapping::plain(&columns),
            identity,
            natural_key,
        };
        let orders = if self.swarm.natural_orders {
            let key = NaturalKey::new(vec![(
                "name".to_owned(),
                vec![Normalize::Trim, Normalize::Lowercase],
            )]);
            info(RecordIdentity::NaturalKey, Some(key))
        } else {
            info(RecordIdentity::ToolIds, None)
        };
        let collections = BTreeMap::from([
            (COLLECTION.to_owned(), info(RecordIdentity::SharedKey, None)),
            (ORDERS.to_owned(), orders),
        ]);
        let tool = ToolSpec {
            name: "tool".to_owned(),
            uid: format!("agent{i}.tool"),
            collections,
        };
        let engine = Engine::new(store, vec![tool], [])
            .map_err(|e| format!("agent {i}: {e}"))?
            .with_policies(format!("agent{i}"), policies(self.swarm.policies));
        agent
            .tool
            .claim(&engine.store_id())
            .map_err(|e| format!("agent {i}: {e}"))?;
        agent.tool_loop = ToolLoop::new(engine.captured(0).clone());
        for (c, collection) in COLLECTIONS.iter().enumerate() {
            agent.acked_seq[c] = engine
                .reader()
                .log_head(collection)
                .map_err(|e| e.to_string())?;
        }
        let store = concord_agent::store::hex(&engine.store_id()[..4]);
        agent.core = Some(Core::new(engine));
        self.log(format!("agent {i} starts (store {store})"));
        Ok(())
    }

    fn crash_agent(&mut self, i: usize) {
        let down_ms = self.rng.range(500, 30_000);
        let agent = &mut self.agents[i];
        if agent.core.take().is_none() {
            return;
        }
        // What the core had not committed is lost with the process.
        agent.queue.clear();
        agent.captures.clear();
        agent.plan = None;
        agent.restart_at = Some(self.now + down_ms);
        for l in 0..self.links.len() {
            if self.links[l].a == i || self.links[l].b == i {
                self.close(l, "peer crashed");
            }
        }
        self.fault("crash", format!("agent {i} for {down_ms} ms"));
    }

    /// Crashes agent `i` and deletes its store: it comes back with a new actor id.
    /// Acknowledged changes no other agent holds (running, or down with its store on
    /// disk) are lost with the disk, so they leave the acknowledged set.
    fn wipe_agent(&mut self, i: usize) {
        if self.agents[i].core.is_none() {
            return;
        }
        self.crash_agent(i);
        let _ = std::fs::remove_dir_all(&self.agents[i].dir);
        let acknowledged = std::mem::take(&mut self.acknowledged);
        let mut held = vec![false; acknowledged.len()];
        for (j, other) in self.agents.iter_mut().enumerate() {
            if j == i {
                continue;
            }
            // A down agent's store is read from its folder; a wiped one has none.
            let mut opened = None;
            let engine = match other.core.as_mut() {
                Some(core) => core.engine(),
                None if other.dir.exists() => {
                    let Ok(store) = Store::open_with(&other.dir, || [0; 16]) else {
                        continue;
                    };
                    let Ok(engine) = Engine::new(store, Vec::new(), []) else {
                        continue;
                    };
                    opened.insert(engine)
                }
                None => continue,
            };
            for (k, (doc, hash, _)) in acknowledged.iter().enumerate() {
                if !held[k]
                    && engine.store().has_doc(*doc).unwrap_or(false)
                    && engine
                        .store()
                        .doc(*doc)
                        .is_ok_and(|d| d.automerge().get_missing_deps(&[*hash]).is_empty())
                {
                    held[k] = true;
                }
            }
        }
        self.acknowledged = acknowledged
            .into_iter()
            .zip(held)
            .filter(|(_, h)| *h)
            .map(|(a, _)| a)
            .collect();
        self.fault("store wipe", format!("agent {i}"));
    }

    /// The tool thread's work, through the real tool loop: note durable captures,
    /// capture what is new, trim, and run a write-back plan that arrived.
    fn step_tool(&mut self, i: usize) {
        if self.agents[i].core.is_none() {
            return;
        }
        let agent = &mut self.agents[i];
        while let Some(reply) = agent.captures.front_mut() {
            match reply.try_recv() {
                Ok(()) => {
                    agent.captures.pop_front();
                    let durable = agent.tool_loop.durable().clone();
                    if let Err(e) = agent.tool.acknowledge(&durable) {
                        unreachable!("the simulated tool never fails: {e}");
                    }
                }
                Err(_) => break,
            }
        }
        let changed = agent.tool.changed().unwrap_or(true);
        if agent.tool_loop.wants_capture(changed) {
            self.capture_all(i);
        }
        let agent = &mut self.agents[i];
        let due = agent.plan.as_ref().is_some_and(|(_, at)| *at <= self.now);
        if due {
            self.write_back(i);
        }
    }

    /// Captures everything new, handing each batch to the core's queue.
    fn capture_all(&mut self, i: usize) {
        let agent = &mut self.agents[i];
        while agent.captures.len() < CAPTURES_IN_FLIGHT_MAX {
            let after = agent.tool_loop.capture_after().clone();
            let Ok(batch) = agent.tool.capture(&after, CAPTURE_BATCH_MAX) else {
                unreachable!("the simulated tool never fails");
            };
            let Some(mark) = agent.tool_loop.captured(&batch) else {
                return;
            };
            let (reply, answer) = oneshot::channel();
            agent.queue.push_back(CoreRequest::Capture {
                tool: 0,
                batch,
                mark,
                reply,
            });
            agent.captures.push_back(answer);
        }
    }

    fn write_back(&mut self, i: usize) {
        let Some((plan, _)) = self.agents[i].plan.take() else {
            return;
        };
        let agent = &mut self.agents[i];
        let ops: Vec<WriteOp> = plan.writes.iter().map(|w| w.op.clone()).collect();
        let outcomes = match agent.tool_loop.changed_since(plan.mark) {
            Some(changed) => match agent.tool.write_back(&plan.captured, &changed, &ops) {
                Ok(outcomes) => outcomes,
                Err(e) => unreachable!("the simulated tool never fails: {e}"),
            },
            None => all_stale(ops.len()),
        };
        let stale = outcomes.iter().filter(|o| **o == OpOutcome::Stale).count();
        agent.just_written = ops
            .iter()
            .zip(&outcomes)
            .filter(|(_, o)| matches!(o, OpOutcome::Written { .. }))
            .filter_map(|(op, _)| match op {
                WriteOp::Upsert { key, .. } => Some(key.clone()),
                WriteOp::Delete { .. } | WriteOp::Insert { .. } => None,
            })
            .collect();
        // As the tool thread: report at once; stale records are captured at the
        // next step (`plan_done` asks for it).
        agent.tool_loop.plan_done(plan.mark, stale > 0);
        self.agents[i].queue.push_back(CoreRequest::WritesDone {
            plan,
            outcomes: Some(outcomes),
        });
        self.log(format!(
            "agent {i} write-back of {} ops ({stale} stale)",
            ops.len()
        ));
    }

    /// The core thread's work: drain the queue in group commits of random sizes
    /// (unless it falls behind this tick), then plan the next write-back.
    fn step_core(&mut self, i: usize) -> Result<(), String> {
        if self.agents[i].core.is_none() {
            return Ok(());
        }
        let pause = self.rng.chance(self.swarm.core_pause);
        let wall = self.wall_ms(i);
        let rescanning = self.agents[i]
            .tool
            .rescanning(self.agents[i].tool_loop.cursor());
        let mut committed = false;
        while !pause && !self.agents[i].queue.is_empty() {
            let len = self.agents[i].queue.len().min(GROUP_COMMIT_REQUESTS_MAX);
            let n = self.rng.range(1, len as u64) as usize;
            let agent = &mut self.agents[i];
            let requests: Vec<CoreRequest> = agent.queue.drain(..n).collect();
            let core = agent.core.as_mut().expect("running");
            let compacted = core.engine().stats().docs_compacted;
            let result = core.step(requests, wall).map_err(|e| e.to_string())?;
            self.docs_compacted += core.engine().stats().docs_compacted - compacted;
            if n > 1 {
                self.group_commits += 1;
            }
            if result.appended > 0 {
                agent.log_version += 1;
            }
            committed = true;
        }
        if committed {
            self.record_acknowledged(i, rescanning)?;
        }
        let delay = self.rng.range(0, 20);
        let agent = &mut self.agents[i];
        let core = agent.core.as_mut().expect("running");
        if let Some(plan) = core.plan(wall).map_err(|e| e.to_string())?.pop() {
            agent.plan = Some((plan, self.now + delay));
        }
        Ok(())
    }

    /// Reads the changes agent `i` committed since the last look: its own are
    /// acknowledged (durable), and each must put only values its own user wrote
    /// (no echo), unless they come from a rescan of the tool.
    fn record_acknowledged(&mut self, i: usize, rescanning: bool) -> Result<(), String> {
        let agent = &mut self.agents[i];
        let Some(core) = agent.core.as_mut() else {
            return Ok(());
        };
        let actor = core.engine().store_id();
        let reader = core.engine().reader();
        let mut new_acks = Vec::new();
        let mut echo = None;
        for (c, collection) in COLLECTIONS.iter().enumerate() {
            let head = reader.log_head(collection).map_err(|e| e.to_string())?;
            let mut from = agent.acked_seq[c] + 1;
            while from <= head {
                let entries = reader
                    .log_from(collection, from, 512)
                    .map_err(|e| e.to_string())?;
                let Some(&(last, _)) = entries.last() else {
                    break;
                };
                for (_, entry) in entries {
                    if entry.origin.is_some() {
                        continue;
                    }
                    for bytes in &entry.changes {
                        let change = automerge::Change::from_bytes(bytes.clone())
                            .map_err(|e| e.to_string())?;
                        if change.actor_id().to_bytes() != actor {
                            continue;
                        }
                        // A policy's decision writes other agents' values on purpose.
                        let decision = crdt_model::Provenance::decode(change.message())
                            .decision
                            .is_some();
                        if !rescanning && echo.is_none() && !decision {
                            echo = foreign_value(&change, i).map(|v| (DocId(entry.doc), v));
                        }
                        new_acks.push((DocId(entry.doc), change.hash(), actor.to_vec()));
                    }
                }
                from = last + 1;
            }
            agent.acked_seq[c] = head;
        }
        for (doc, hash, actor) in new_acks {
            self.log(format!("agent {i} acknowledged change {hash} of {doc}"));
            self.acknowledged.push((doc, hash, actor));
        }
        if let Some((doc, value)) = echo
            && self.broken.is_none()
        {
            self.broken = Some(format!(
                "agent {i} captured {value} in {doc} as its user's edit, but its user never wrote it (an echo of a write-back)"
            ));
        }
        Ok(())
    }

    /// Simulated users edit their tools (their agents may be down: the tool is not).
    fn workload(&mut self) {
        for i in 0..self.agents.len() {
            // Users answer what they just received, or not at all.
            let written = std::mem::take(&mut self.agents[i].just_written);
            if !written.is_empty() && self.rng.chance(ANSWER_CHANCE * self.busy_share()) {
                let key = written[self.rng.below(written.len() as u64) as usize].clone();
                if self.agents[i].tool.rows.contains_key(&key) {
                    let field = ["name", "qty", "note"][self.rng.below(3) as usize];
                    let edit = Record::from([(field.to_owned(), self.user_value(i, field))]);
                    self.log(format!("agent {i} user answers {key}: {edit:?}"));
                    self.agents[i].tool.user_edit(&key, Some(edit));
                }
            }
            if !self
                .rng
                .chance(TICK_MS as f64 / USER_EDIT_MS * self.busy_share())
            {
                continue;
            }
            // Orders (tool ids) are left out of runs that wipe stores: a rebuilt
            // store does not relink its tool's rows to their documents yet.
            if self.swarm.wipe == 0.0 && self.rng.chance(0.5) {
                self.order_edit(i);
                continue;
            }
            let key = format!("k{}", self.rng.below(KEYS_MAX));
            let exists = self.agents[i].tool.rows.contains_key(&key);
            let roll = self.rng.below(10);
            let edit = if exists && roll < 2 {
                None
            } else {
                let field = ["name", "qty", "note"][self.rng.below(3) as usize];
                Some(Record::from([(
                    field.to_owned(),
                    self.user_value(i, field),
                )]))
            };
            self.log(format!("agent {i} user edits {key}: {edit:?}"));
            self.agents[i].tool.user_edit(&key, edit);
        }
        if self.rng.chance(self.swarm.bulk) {
            self.swarm.bulk = 0.0;
            let i = self.rng.below(self.agents.len() as u64) as usize;
            self.log(format!(
                "agent {i} user imports {BULK_ROWS} rows, then updates them all"
            ));
            for k in 0..BULK_ROWS {
                let value = self.user_value(i, "name");
                self.agents[i].tool.user_edit(
                    &format!("b{k}"),
                    Some(Record::from([("name".to_owned(), value)])),
                );
            }
            for k in 0..BULK_ROWS {
                let value = self.user_value(i, "qty");
                self.agents[i].tool.user_edit(
                    &format!("b{k}"),
                    Some(Record::from([("qty".to_owned(), value)])),
                );
            }
        }
    }

    /// The share of the full edit and answer rates each user works at: 1 up to
    /// [`BUSY_AGENTS_MAX`] agents, less beyond.
    fn busy_share(&self) -> f64 {
        (BUSY_AGENTS_MAX as f64 / self.agents.len() as f64).min(1.0)
    }

    /// Agent `i`'s user creates an order (its tool gives it the next id, which the
    /// other agents' tools may have given to theirs), or edits or deletes one.
    fn order_edit(&mut self, i: usize) {
        let keys: Vec<String> = self.agents[i].tool.orders.keys().cloned().collect();
        let roll = self.rng.below(10);
        if keys.is_empty() || roll < 4 {
            let mut fields: Record = COLUMNS
                .iter()
                .map(|c| ((*c).to_owned(), self.user_value(i, c)))
                .collect();
            // Under a natural key, sites create the same order (by name, whatever
            // its case and spacing) now and then.
            if self.swarm.natural_orders && self.rng.chance(0.3) {
                let n = self.rng.below(SHARED_ORDER_NAMES);
                let name = match self.rng.below(3) {
                    0 => format!("Shared order {n}"),
                    1 => format!("SHARED ORDER {n}"),
                    _ => format!("  shared order {n} "),
                };
                fields.insert("name".to_owned(), Value::Text(name));
            }
            let key = self.agents[i].tool.user_insert_order(fields.clone());
            self.log(format!("agent {i} user creates order {key}: {fields:?}"));
            return;
        }
        let key = keys[self.rng.below(keys.len() as u64) as usize].clone();
        let edit = if roll < 6 {
            None
        } else {
            let field = COLUMNS[self.rng.below(COLUMNS.len() as u64) as usize];
            Some(Record::from([(
                field.to_owned(),
                self.user_value(i, field),
            )]))
        };
        self.log(format!("agent {i} user edits order {key}: {edit:?}"));
        self.agents[i].tool.user_edit_in(ORDERS, &key, edit);
    }

    /// A value for `field` that only agent `i`'s user writes.
    fn user_value(&mut self, i: usize, field: &str) -> Value {
        self.agents[i].values += 1;
        let n = self.agents[i].values;
        match field {
            "qty" => Value::Int(i as i64 * VALUE_AGENT_STRIDE + n),
            "note" => Value::Text(format!("note {i}:{n}")),
            _ => Value::Text(format!("n{i}:{n}")),
        }
    }

    fn inject_faults(&mut self) {
        let n = self.agents.len();
        if self.rng.chance(self.swarm.crash) {
            let i = self.rng.below(n as u64) as usize;
            self.crash_agent(i);
        }
        if self.rng.chance(self.swarm.wipe) {
            let i = self.rng.below(n as u64) as usize;
            self.wipe_agent(i);
        }
        if !self.links.is_empty() && self.rng.chance(self.swarm.partition) {
            // Cut the cluster in two for a while.
            let cut = self.rng.range(1, n as u64 - 1) as usize;
            let until = self.now + self.rng.range(1_000, 90_000);
            for l in 0..self.links.len() {
                let (a, b) = (self.links[l].a, self.links[l].b);
                if (a < cut) != (b < cut) {
                    self.links[l].partitioned_until = until;
                    self.close(l, "partition");
                }
            }
            self.fault(
                "partition",
                format!("agents 0..{cut} | {cut}..{n} until {until} ms"),
            );
        }
        if !self.links.is_empty() && self.rng.chance(self.swarm.oneway) {
            let l = self.rng.below(self.links.len() as u64) as usize;
            let dir = self.rng.below(2) as usize;
            let until = self.now + self.rng.range(1_000, 60_000);
            self.links[l].oneway = Some((dir, self.now, until));
            let (a, b) = (self.links[l].a, self.links[l].b);
            let (from, to) = if dir == 0 { (a, b) } else { (b, a) };
            self.fault(
                "one-way partition",
                format!("{from} -> {to} dropped until {until} ms"),
            );
        }
    }

    fn close(&mut self, l: usize, why: &str) {
        let backoff = self.rng.range(100, 2_000);
        let link = &mut self.links[l];
        if link.ends.take().is_none() {
            return;
        }
        link.queues = [BinaryHeap::new(), BinaryHeap::new()];
        link.pending = [VecDeque::new(), VecDeque::new()];
        link.last_arrival = [0, 0];
        link.reconnect_at = self.now + backoff;
        link.follows = [false, false];
        link.follow_seen = [None, None];
        let (a, b) = (link.a, link.b);
        let now = self.instant();
        for i in [a, b] {
            self.agents[i].following.remove(l as u64, now);
        }
        self.log(format!("link {a}-{b} closed: {why}"));
    }

    fn step_link(&mut self, l: usize) -> Result<(), String> {
        let (a, b) = (self.links[l].a, self.links[l].b);
        let up = self.agents[a].core.is_some() && self.agents[b].core.is_some();
        if let Some((_, since, until)) = self.links[l].oneway {
            if self.now >= until {
                self.links[l].oneway = None;
            } else if self.now >= since + LINK_IDLE_TIMEOUT_MS {
                // Nothing came through one way for the idle timeout: QUIC gives up.
                self.close(l, "idle timeout (one-way partition)");
            }
        }
        if self.links[l].ends.is_none() {
            let allowed = self.now >= self.links[l].partitioned_until
                && self.now >= self.links[l].reconnect_at;
            if !(up && allowed) {
                return Ok(());
            }
            let now = self.instant();
            let (ha, hb) = (self.hello(a)?, self.hello(b)?);
            self.links[l].ends =
                Some([Session::new(ha.0, ha.1, now), Session::new(hb.0, hb.1, now)]);
            self.links[l].log_seen = [0, 0];
            self.log(format!("link {a}-{b} connected"));
        }
        let mut ends = self.links[l].ends.take().expect("connected");
        match self.pump(l, &mut ends) {
            Ok(()) => {
                self.links[l].ends = Some(ends);
                Ok(())
            }
            Err(Pump::Closed(why)) => {
                self.links[l].ends = Some(ends);
                self.close(l, &why);
                Ok(())
            }
            Err(Pump::Fatal(e)) => Err(e),
        }
    }

    /// Agent `i`'s store id and log heads, for a new session.
    fn hello(&mut self, i: usize) -> Result<(StoreId, Vec<(String, u64)>), String> {
        let core = self.agents[i].core.as_mut().ok_or("agent down")?;
        let engine = core.engine();
        let mut heads = Vec::with_capacity(COLLECTIONS.len());
        for collection in COLLECTIONS {
            let head = engine
                .reader()
                .log_head(collection)
                .map_err(|e| e.to_string())?;
            heads.push((collection.to_owned(), head));
        }
        Ok((engine.store_id(), heads))
    }

    /// Delivers due frames to both ends and hands their events to the cores, acts
    /// on the cores' answers, lets time pass and queues what the sessions send: the
    /// QUIC driver's pump, step by step.
    fn pump(&mut self, l: usize, ends: &mut [Session; 2]) -> Result<(), Pump> {
        let agents = [self.links[l].a, self.links[l].b];
        let now = self.instant();
        for side in 0..2 {
            let dir = 1 - side; // frames travelling towards `side`
            while self.links[l].pending[side].len() < EVENTS_IN_FLIGHT_MAX {
                let due = matches!(self.links[l].queues[dir].peek(), Some(Reverse((t, _, _))) if *t <= self.now);
                if !due {
                    break;
                }
                let Reverse((_, _, frame)) = self.links[l].queues[dir].pop().expect("peeked");
                if matches!(self.links[l].oneway, Some((d, _, _)) if d == dir) {
                    continue;
                }
                self.log(format!("{} receives {} bytes", agents[side], frame.len()));
                ends[side]
                    .handle(now, &frame)
                    .map_err(|e| Pump::Closed(format!("{} refused a frame: {e}", agents[side])))?;
                self.hand_events(l, side, agents[side], &mut ends[side])?;
            }
        }
        for side in 0..2 {
            self.take_actions(l, side, &mut ends[side])?;
            self.follow(l, side, agents[side], &mut ends[side]);
            ends[side]
                .handle_timeout(now)
                .map_err(|e| Pump::Closed(format!("{}: {e}", agents[side])))?;
            self.hand_events(l, side, agents[side], &mut ends[side])?;
            let version = self.agents[agents[side]].log_version;
            if self.links[l].log_seen[side] != version {
                self.links[l].log_seen[side] = version;
                ends[side].log_grew();
            }
            let core = self.agents[agents[side]]
                .core
                .as_mut()
                .ok_or(Pump::Closed("agent down".into()))?;
            let reader = core.engine().reader();
            for (collection, from, max) in ends[side].wants() {
                let read = reader
                    .log_from(&collection, from, max)
                    .map_err(|e| Pump::Fatal(e.to_string()))?;
                ends[side].send_entries(now, &collection, read, max);
            }
            while let Some(frame) = ends[side].poll_transmit() {
                self.transmit(l, side, frame);
            }
        }
        Ok(())
    }

    /// Keeps agent `i`'s [`Following`] and its session on link `l` in step, as the
    /// QUIC driver does: the session joins once it subscribed, and is told (after
    /// the hello) whenever the agent's following changed.
    fn follow(&mut self, l: usize, side: usize, i: usize, session: &mut Session) {
        if !self.links[l].follows[side]
            && let Some((peer, collections)) = session.following()
        {
            self.links[l].follows[side] = true;
            let collections = collections.to_vec();
            self.agents[i].following.add(l as u64, peer, collections);
        }
        let version = self.agents[i].following.version();
        if session.peer().is_some() && self.links[l].follow_seen[side] != Some(version) {
            self.links[l].follow_seen[side] = Some(version);
            session.follow(&self.agents[i].following);
        }
        if let Some(peer) = session.peer() {
            if session.caught_up() {
                self.agents[i].following.caught_up(peer);
            }
            if session.caught_up_walk_done() {
                self.agents[i].following.walked(peer);
            }
        }
    }

    /// Hands the session's events to agent `i`'s core queue.
    fn hand_events(
        &mut self,
        l: usize,
        side: usize,
        i: usize,
        session: &mut Session,
    ) -> Result<(), Pump> {
        while let Some(event) = session.poll_event() {
            let peer = session
                .peer()
                .ok_or(Pump::Closed("an event before hello".into()))?;
            let (reply, answer) = oneshot::channel();
            self.agents[i]
                .queue
                .push_back(CoreRequest::Peer { peer, event, reply });
            self.links[l].pending[side].push_back(answer);
        }
        Ok(())
    }

    /// Carries out, in order, the actions the core answered so far.
    fn take_actions(&mut self, l: usize, side: usize, session: &mut Session) -> Result<(), Pump> {
        let now = self.instant();
        while let Some(answer) = self.links[l].pending[side].front_mut() {
            let actions = match answer.try_recv() {
                Ok(Ok(actions)) => actions,
                Ok(Err(e)) => return Err(Pump::Closed(format!("bad data from the peer: {e}"))),
                Err(oneshot::error::TryRecvError::Empty) => return Ok(()),
                Err(oneshot::error::TryRecvError::Closed) => {
                    return Err(Pump::Closed("agent down".into()));
                }
            };
            self.links[l].pending[side].pop_front();
            for action in actions {
                session.act(now, action);
            }
        }
        Ok(())
    }

    fn transmit(&mut self, l: usize, side: usize, frame: Vec<u8>) {
        self.frames += 1;
        self.frame_bytes += frame.len() as u64;
        let (a, b) = (self.links[l].a, self.links[l].b);
        let (from, to) = if side == 0 { (a, b) } else { (b, a) };
        if self.rng.chance(self.swarm.loss) {
            self.fault(
                "message loss",
                format!("{from} -> {to}, {} bytes", frame.len()),
            );
            return;
        }
        let latency = if self.swarm.slow {
            self.rng.range(20, 400)
        } else {
            self.rng.range(1, 30)
        };
        let mut arrival = self.now + latency;
        if self.rng.chance(self.swarm.reorder) {
            self.fault(
                "reordering",
                format!("{from} -> {to}, {} bytes", frame.len()),
            );
        } else {
            arrival = arrival.max(self.links[l].last_arrival[side]);
            self.links[l].last_arrival[side] = arrival;
        }
        self.frame_seq += 1;
        if self.rng.chance(self.swarm.duplicate) {
            self.fault(
                "duplication",
                format!("{from} -> {to}, {} bytes", frame.len()),
            );
            self.frame_seq += 1;
            self.links[l].queues[side].push(Reverse((arrival, self.frame_seq, frame.clone())));
        }
        self.hasher.update((frame.len() as u64).to_le_bytes());
        self.links[l].queues[side].push(Reverse((arrival, self.frame_seq, frame)));
    }

    /// Every document's heads on every running agent, or why they differ.
    fn converged(&mut self) -> Result<(), String> {
        let mut reference: Option<BTreeMap<DocId, Vec<ChangeHash>>> = None;
        let mut settled: Option<BTreeMap<String, Record>> = None;
        for i in 0..self.agents.len() {
            let agent = &mut self.agents[i];
            if agent.plan.is_some()
                || !agent.queue.is_empty()
                || !agent.captures.is_empty()
                || agent
                    .tool
                    .changed_since(tool::seq(agent.tool_loop.cursor()))
            {
                return Err(format!("agent {i} has work in flight"));
            }
            let Some(core) = agent.core.as_mut() else {
                return Err(format!("agent {i} is down"));
            };
            let engine = core.engine();
            let ids = engine.reader().doc_ids().map_err(|e| e.to_string())?;
            let mut heads = BTreeMap::new();
            let mut projection = BTreeMap::new();
            let mut orders: Vec<Record> = Vec::new();
            for id in ids {
                let mut h = engine.heads(id).map_err(|e| e.to_string())?;
                h.sort();
                heads.insert(id, h);
                // As the policies settle it: every agent must pick the same winners.
                let state = engine
                    .record(id)
                    .map_err(|e| e.to_string())?
                    .ok_or_else(|| format!("agent {i}: document {id} cannot be read"))?;
                if !state.deleted {
                    let row: Record = COLUMNS
                        .iter()
                        .map(|c| {
                            (
                                (*c).to_owned(),
                                state.fields.get(*c).cloned().unwrap_or(Value::Null),
                            )
                        })
                        .collect();
                    if state.collection == ORDERS {
                        orders.push(row);
                    } else {
                        projection.insert(state.key.clone(), row);
                    }
                }
            }
            // Orders have each tool's own ids: the tool holds each live order once,
            // whatever its key.
            orders.sort_by_key(|row| format!("{row:?}"));
            let mut held: Vec<Record> = agent.tool.orders.values().cloned().collect();
            held.sort_by_key(|row| format!("{row:?}"));
            if orders != held {
                return Err(format!(
                    "agent {i}'s tool holds {} orders, its documents {} live ones, or their fields differ",
                    held.len(),
                    orders.len()
                ));
            }
            if projection != agent.tool.rows {
                let key = projection
                    .keys()
                    .chain(agent.tool.rows.keys())
                    .find(|k| projection.get(*k) != agent.tool.rows.get(*k))
                    .cloned()
                    .unwrap_or_default();
                return Err(format!(
                    "agent {i}'s tool does not hold the projection of its documents: {key}: tool {:?}, documents {:?}",
                    agent.tool.rows.get(&key),
                    projection.get(&key)
                ));
            }
            match &settled {
                None => settled = Some(projection.clone()),
                Some(first) if *first != projection => {
                    return Err(format!(
                        "agent {i} settles the same documents differently from agent 0"
                    ));
                }
                Some(_) => {}
            }
            match &reference {
                None => reference = Some(heads),
                Some(r) if *r != heads => {
                    let differing = r
                        .iter()
                        .find(|(id, h)| heads.get(*id) != Some(*h))
                        .map(|(id, _)| *id);
                    return Err(format!(
                        "agent {i}'s documents differ from agent 0's ({} vs {} documents; first differing: {differing:?})",
                        heads.len(),
                        r.len()
                    ));
                }
                Some(_) => {}
            }
        }
        Ok(())
    }

    fn check_acknowledged(&mut self) -> Result<(), String> {
        let acknowledged = std::mem::take(&mut self.acknowledged);
        for (i, agent) in self.agents.iter_mut().enumerate() {
            let core = agent.core.as_mut().ok_or("agent down after healing")?;
            for (doc, hash, _) in &acknowledged {
                let am = core
                    .engine()
                    .store()
                    .doc(*doc)
                    .map_err(|e| e.to_string())?
                    .automerge();
                if am.get_change_by_hash(hash).is_none() {
                    let queued = am.get_missing_deps(&[]);
                    return Err(format!(
                        "agent {i} lacks acknowledged change {hash} of document {doc} (changes waiting for {queued:?})"
                    ));
                }
            }
        }
        self.checks += 1;
        self.acknowledged = acknowledged;
        Ok(())
    }

    fn check_identities(&mut self) -> Result<(), String> {
        for (i, agent) in self.agents.iter_mut().enumerate() {
            let engine = agent
                .core
                .as_mut()
                .ok_or("agent down after healing")?
                .engine();
            for id in engine.reader().doc_ids().map_err(|e| e.to_string())? {
                let doc = engine.store().doc(id).map_err(|e| e.to_string())?;
                let (collection, key) = doc
                    .identity()
                    .map_err(|e| e.to_string())?
                    .ok_or("a document without identity")?;
                // Under tool ids a document has no key of its own (a minted id).
                if collection == ORDERS && key.is_empty() {
                    continue;
                }
                if DocId::of(&collection, &key) != id {
                    return Err(format!(
                        "agent {i}: document {id} holds ({collection}, {key})"
                    ));
                }
            }
        }
        self.checks += 1;
        Ok(())
    }

    /// No order is duplicated: orders the users created in their tools, with ids each
    /// tool assigned (often the same ids in different tools), each become one
    /// document, and no two live orders hold the same fields (every value a user
    /// writes is unique, so equal rows are one order twice). Not checked after a
    /// store wipe: a rebuilt store does not relink its tool's rows to their
    /// documents yet and captures them as new orders.
    fn check_orders_once(&mut self) -> Result<(), String> {
        if self.faults.contains_key("store wipe") {
            self.log("orders-once check skipped: a store was wiped".to_owned());
            return Ok(());
        }
        let created: u64 = self.agents.iter().map(|a| a.tool.orders_created).sum();
        let engine = self.agents[0]
            .core
            .as_mut()
            .ok_or("agent down after healing")?
            .engine();
        let mut documents = 0u64;
        let mut live: BTreeMap<String, DocId> = BTreeMap::new();
        for id in engine.reader().doc_ids().map_err(|e| e.to_string())? {
            let state = engine
                .store()
                .doc(id)
                .map_err(|e| e.to_string())?
                .read()
                .map_err(|e| e.to_string())?;
            if state.collection != ORDERS {
                continue;
            }
            documents += 1;
            if state.deleted {
                continue;
            }
            if let Some(other) = live.insert(format!("{:?}", state.fields), id) {
                return Err(format!(
                    "orders {other} and {id} hold the same fields {:?}: one order became two",
                    state.fields
                ));
            }
        }
        if documents > created {
            return Err(format!(
                "{documents} order documents for {created} orders the users created"
            ));
        }
        self.checks += 1;
        Ok(())
    }

    /// Probe on the healed cluster: a record deleted and created again with fewer
    /// fields holds only the new row's fields, in every tool.
    fn probe_reinsert(&mut self) -> Result<(), String> {
        let h = self.rng.below(self.agents.len() as u64) as usize;
        let key = "probe";
        self.log(format!(
            "PROBE agent {h} creates, deletes and re-creates {key}"
        ));
        let full: Record = COLUMNS
            .iter()
            .map(|c| ((*c).to_owned(), self.user_value(h, c)))
            .collect();
        self.agents[h].tool.user_edit(key, Some(full));
        self.converge()?;
        self.agents[h].tool.user_edit(key, None);
        self.converge()?;
        let name = self.user_value(h, "name");
        self.agents[h]
            .tool
            .user_edit(key, Some(Record::from([("name".to_owned(), name.clone())])));
        self.converge()?;
        let expected: Record = COLUMNS
            .iter()
            .map(|c| {
                (
                    (*c).to_owned(),
                    if *c == "name" {
                        name.clone()
                    } else {
                        Value::Null
                    },
                )
            })
            .collect();
        for (j, agent) in self.agents.iter().enumerate() {
            if agent.tool.rows.get(key) != Some(&expected) {
                return Err(format!(
                    "a record created again after a delete inherited the dead record: agent {j}'s tool holds {:?}, the new row is {expected:?}",
                    agent.tool.rows.get(key)
                ));
            }
        }
        self.checks += 1;
        Ok(())
    }

    /// Probe on the healed cluster: while one user commits every tick, another
    /// agent's edits still reach that user's tool (write-back is not starved).
    fn probe_hot_tool(&mut self) -> Result<(), String> {
        let n = self.agents.len() as u64;
        let hot = self.rng.below(n) as usize;
        let other = (hot + 1 + self.rng.below(n - 1) as usize) % self.agents.len();
        self.log(format!(
            "PROBE agent {hot}'s user commits every tick while agent {other}'s edits"
        ));
        let mut wanted = BTreeMap::new();
        for k in 0..5 {
            let key = format!("p{k}");
            let value = self.user_value(other, "name");
            self.agents[other].tool.user_edit(
                &key,
                Some(Record::from([("name".to_owned(), value.clone())])),
            );
            wanted.insert(key, value);
        }
        let until = self.now + HOT_PROBE_MS;
        while self.now < until {
            let value = self.user_value(hot, "qty");
            self.agents[hot]
                .tool
                .user_edit("hot", Some(Record::from([("qty".to_owned(), value)])));
            self.tick()?;
            let rows = &self.agents[hot].tool.rows;
            if wanted
                .iter()
                .all(|(key, value)| rows.get(key).and_then(|r| r.get("name")) == Some(value))
            {
                self.checks += 1;
                return Ok(());
            }
        }
        Err(format!(
            "agent {hot}'s tool, committing every {TICK_MS} ms, did not receive agent {other}'s edits within {HOT_PROBE_MS} ms (write-back starved)"
        ))
    }

    /// Counters that must not move once the cluster is quiet.
    fn activity(&mut self) -> Result<Vec<u64>, String> {
        let mut out = Vec::new();
        for agent in &mut self.agents {
            let engine = agent.core.as_mut().ok_or("agent down")?.engine();
            for collection in COLLECTIONS {
                out.push(
                    engine
                        .reader()
                        .log_head(collection)
                        .map_err(|e| e.to_string())?,
                );
            }
            let stats = engine.stats().clone();
            out.extend([
                stats.captured,
                stats.applied,
                stats.writes,
                agent.tool.writes,
                agent.tool.edits,
            ]);
        }
        Ok(out)
    }

    fn final_heads(&mut self) -> Result<Vec<u8>, String> {
        let mut out = Vec::new();
        if let Some(core) = self.agents[0].core.as_mut() {
            let engine = core.engine();
            for id in engine.reader().doc_ids().map_err(|e| e.to_string())? {
                out.extend_from_slice(&id.0);
                for h in engine.heads(id).map_err(|e| e.to_string())? {
                    out.extend_from_slice(&h.0);
                }
            }
        }
        Ok(out)
    }
}

/// A field value that `change` puts and that agent `agent`'s user never wrote, if any.
fn foreign_value(change: &automerge::Change, agent: usize) -> Option<String> {
    use automerge::ScalarValue;
    use automerge::legacy::{Key, OpType};
    for op in change.decode().operations {
        let (Key::Map(key), OpType::Put(value)) = (&op.key, &op.action) else {
            continue;
        };
        if !key.starts_with("f:") {
            continue;
        }
        let own = match value {
            ScalarValue::Str(text) => {
                text.starts_with(&format!("n{agent}:"))
                    || text.starts_with(&format!("note {agent}:"))
                    // Every site's users write the shared order names.
                    || text.to_lowercase().contains("shared order")
            }
            ScalarValue::Int(qty) => qty.div_euclid(VALUE_AGENT_STRIDE) == agent as i64,
            ScalarValue::Null => true,
            _ => false,
        };
        if !own {
            return Some(format!("{key} = {value}"));
        }
    }
    None
}
