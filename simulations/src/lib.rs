//! Deterministic simulation of many Concord agents under injected faults, in the
//! tradition of FoundationDB's simulator and TigerBeetle's VOPR.
//!
//! One seed drives one exact run: the real [`Engine`] (capture, merge, write-back and
//! its echo rules over a real fjall store), the real replication [`Session`] and the
//! real `crdt-model`, with a simulated clock, a simulated network and simulated tools
//! ([`tool::SimTool`]). Nothing reads the wall clock or a socket, and nothing runs
//! on another thread, so the same seed gives the same trace hash.
//!
//! A run has two phases. During the **fault phase** users edit their tools while
//! faults, mixed per seed (swarm testing), hit the cluster: symmetric and one-way
//! partitions; message loss, duplication, reordering and delay; crashes with
//! restarts; clock skew. In the **heal phase** faults stop, every agent runs and
//! every link is up, and the cluster must converge within [`Config::heal_bound_ms`]
//! and then stay quiet. Every run checks the invariants listed on [`Report`].
//!
//! ```no_run
//! let report = simulations::run(7, &simulations::Config::default());
//! assert!(report.failure.is_none(), "{:?}", report.failure);
//! ```

pub mod rng;
pub mod tool;

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use concord_agent::engine::{CollectionInfo, Engine, RemoteError, WireEntry, WritePlan};
use concord_agent::replication::{Event, Session};
use concord_agent::store::{Store, StoreId};
use connectors::sqlite::{WriteOp, WriteOutcome};
use crdt_model::{ChangeHash, DocId, Record, Value};
use sha2::{Digest, Sha256};

use crate::rng::Rng;
use crate::tool::{COLLECTION, COLUMNS, SimTool};

/// Simulated milliseconds per step of the clock.
pub const TICK_MS: u64 = 5;
/// Keys users pick from: few enough that agents create the same key offline.
pub const KEYS_MAX: u64 = 24;
/// How long a link may see nothing in one direction before it is closed (QUIC's idle timeout).
pub const LINK_IDLE_TIMEOUT_MS: u64 = 10_000;
/// Outbox entries captured per step at most.
pub const CAPTURE_BATCH_MAX: usize = 64;
/// Writes planned per step at most.
pub const WRITE_BACK_BATCH_MAX: usize = 64;
/// The simulated wall clock starts here (2026-01-01), in ms since the Unix epoch.
pub const EPOCH_MS: i64 = 1_767_225_600_000;

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

/// The outcome of one run. Checked on every run: (1) convergence: identical
/// documents on all agents and every tool holding their projection; (2) no lost
/// acknowledged write: every change a capture committed is in every agent's
/// document; (3) no duplicates: one document per key, holding its own identity;
/// (4) quiet: no change, capture or write for [`Config::quiet_ms`] after converging,
/// and no more writes per tool than captured edits; (5) determinism, by replaying a
/// seed and comparing [`Report::trace_hash`].
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
    loss: f64,
    duplicate: f64,
    reorder: f64,
    slow: bool,
    skew: bool,
    topology: &'static str,
}

struct Agent {
    dir: PathBuf,
    engine: Option<Engine>,
    tool: SimTool,
    /// The connector's capture cursor (what it knows is durable).
    cursor: u64,
    /// A write-back plan on its way to the tool, and when it arrives.
    plan: Option<(WritePlan, u64)>,
    skew_ms: i64,
    restart_at: Option<u64>,
    /// Bumped whenever the agent's log grows, as the real core announces it.
    log_version: u64,
    /// The end of the tool's rescan entries.
    rescan_upto: u64,
}

/// A frame in flight: (arrival ms, send order, bytes).
type InFlight = (u64, u64, Vec<u8>);

struct Link {
    a: usize,
    b: usize,
    /// The two ends' sessions while connected: [a's, b's].
    ends: Option<[Session; 2]>,
    /// Frames in flight: [a→b, b→a], ordered by arrival time, then send order.
    queues: [BinaryHeap<Reverse<InFlight>>; 2],
    /// The last arrival time queued per direction (FIFO unless reordered).
    last_arrival: [u64; 2],
    /// The log version each end's session last read at.
    log_seen: [u64; 2],
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
    checks: u64,
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
        swarm.slow = rng.chance(0.5);
        swarm.skew = rng.chance(0.5);
        swarm.topology = ["mesh", "line", "star"][rng.below(3) as usize];
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
                engine: None,
                tool: SimTool::default(),
                cursor: 0,
                plan: None,
                skew_ms,
                restart_at: Some(0),
                log_version: 0,
                rescan_upto: 0,
            });
        }
        let mut links = Vec::new();
        for a in 0..agents {
            for b in a + 1..agents {
                let linked = match swarm.topology {
                    "line" => b == a + 1,
                    "star" => a == 0,
                    _ => true,
                };
                if linked {
                    links.push(Link {
                        a,
                        b,
                        ends: None,
                        queues: [BinaryHeap::new(), BinaryHeap::new()],
                        last_arrival: [0, 0],
                        log_seen: [0, 0],
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
            checks: 0,
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

    fn run(&mut self) -> Result<(), String> {
        while self.now < self.config.fault_ms {
            self.inject_faults();
            self.workload();
            self.tick()?;
        }
        // Heal: no more faults or edits; every agent up, every link allowed.
        self.log("HEAL".to_owned());
        for i in 0..self.agents.len() {
            if self.agents[i].engine.is_none() {
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
        let deadline = self.now + self.config.heal_bound_ms;
        let mut last_mismatch = String::new();
        loop {
            self.tick()?;
            if self.now.is_multiple_of(500) {
                match self.converged() {
                    Ok(()) => break,
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
        self.checks += 1;
        self.log("CONVERGED".to_owned());
        self.check_acknowledged()?;
        self.check_identities()?;
        // Quiet: nothing may happen any more.
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
        let heads = self.final_heads()?;
        self.hasher.update(heads);
        Ok(())
    }

    /// One step of the clock.
    fn tick(&mut self) -> Result<(), String> {
        for i in 0..self.agents.len() {
            if self.agents[i].restart_at.is_some_and(|t| t <= self.now) {
                self.start_agent(i)?;
            }
        }
        for l in 0..self.links.len() {
            self.step_link(l)?;
        }
        for i in 0..self.agents.len() {
            self.step_agent(i)?;
        }
        self.now += TICK_MS;
        Ok(())
    }

    fn start_agent(&mut self, i: usize) -> Result<(), String> {
        let actor = self.rng.bytes16();
        let agent = &mut self.agents[i];
        agent.restart_at = None;
        let store =
            Store::open_with(&agent.dir, || actor).map_err(|e| format!("agent {i}: {e}"))?;
        let collections = BTreeMap::from([(
            COLLECTION.to_owned(),
            CollectionInfo {
                columns: COLUMNS.iter().map(|c| (*c).to_owned()).collect(),
            },
        )]);
        let mut engine = Engine::new(store, "tool".to_owned(), collections)
            .map_err(|e| format!("agent {i}: {e}"))?;
        agent.rescan_upto = agent.tool.claim(engine.store_id());
        engine.set_rescan_upto(agent.rescan_upto);
        agent.cursor = engine.captured_upto();
        agent.engine = Some(engine);
        let store = concord_agent::store::hex(
            &self.agents[i]
                .engine
                .as_ref()
                .map(|e| e.store_id())
                .unwrap_or_default()[..4],
        );
        self.log(format!("agent {i} starts (store {store})"));
        Ok(())
    }

    fn crash_agent(&mut self, i: usize) {
        let down_ms = self.rng.range(500, 30_000);
        let agent = &mut self.agents[i];
        if agent.engine.take().is_none() {
            return;
        }
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
        if self.agents[i].engine.is_none() {
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
            let engine = match other.engine.as_mut() {
                Some(engine) => engine,
                None if other.dir.exists() => {
                    let Ok(store) = Store::open_with(&other.dir, || [0; 16]) else {
                        continue;
                    };
                    let Ok(engine) = Engine::new(store, "tool".to_owned(), BTreeMap::new()) else {
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

    fn wall_ms(&self, i: usize) -> i64 {
        EPOCH_MS + self.now as i64 + self.agents[i].skew_ms
    }

    /// The tool thread's work: capture, trim, plan and run write-backs.
    fn step_agent(&mut self, i: usize) -> Result<(), String> {
        if self.agents[i].engine.is_none() {
            return Ok(());
        }
        self.capture(i)?;
        let now = self.now;
        let due = self.agents[i]
            .plan
            .as_ref()
            .is_some_and(|(_, at)| *at <= now);
        if due {
            let (plan, _) = self.agents[i].plan.take().expect("due");
            let ops: Vec<WriteOp> = plan.writes.iter().map(|w| w.op.clone()).collect();
            let outcome = self.agents[i].tool.write_back(plan.captured_upto, &ops);
            if outcome == WriteOutcome::CaptureFirst {
                self.capture(i)?;
            }
            self.log(format!(
                "agent {i} write-back of {} ops: {outcome:?}",
                ops.len()
            ));
            let engine = self.agents[i].engine.as_mut().expect("running");
            let mut batch = engine.store().batch();
            engine
                .writes_done(&mut batch, plan, outcome)
                .map_err(|e| e.to_string())?;
            engine.store().commit(batch).map_err(|e| e.to_string())?;
        }
        if self.agents[i].plan.is_none() {
            let delay = self.rng.range(0, 20);
            let engine = self.agents[i].engine.as_mut().expect("running");
            let mut batch = engine.store().batch();
            let plan = engine
                .plan_writes(&mut batch, WRITE_BACK_BATCH_MAX)
                .map_err(|e| e.to_string())?;
            if !batch.is_empty() {
                engine.store().commit(batch).map_err(|e| e.to_string())?;
            }
            if !plan.writes.is_empty() {
                self.agents[i].plan = Some((plan, self.now + delay));
            }
        }
        Ok(())
    }

    fn capture(&mut self, i: usize) -> Result<(), String> {
        let wall = self.wall_ms(i);
        let mut new_acks = Vec::new();
        let agent = &mut self.agents[i];
        let Some(engine) = agent.engine.as_mut() else {
            return Ok(());
        };
        while agent.tool.changed_since(agent.cursor) {
            let max = match agent.rescan_upto.checked_sub(agent.cursor) {
                Some(left) if left > 0 => CAPTURE_BATCH_MAX.min(left as usize),
                _ => CAPTURE_BATCH_MAX,
            };
            let captured = agent.tool.capture(agent.cursor, max);
            let cursor = captured.cursor;
            let mut batch = engine.store().batch();
            engine
                .capture(&mut batch, captured.changes, cursor, wall)
                .map_err(|e| e.to_string())?;
            let appended = engine.store().commit(batch).map_err(|e| e.to_string())?;
            if !appended.is_empty() {
                agent.log_version += 1;
            }
            let reader = engine.store().reader();
            for (collection, seq) in appended {
                for (_, entry) in reader
                    .log_from(&collection, seq, 1)
                    .map_err(|e| e.to_string())?
                {
                    for bytes in &entry.changes {
                        let change = automerge::Change::from_bytes(bytes.clone())
                            .map_err(|e| e.to_string())?;
                        let actor = change.actor_id().to_bytes().to_vec();
                        new_acks.push((DocId(entry.doc), change.hash(), actor));
                    }
                }
            }
            agent.cursor = cursor;
            agent.tool.trim(cursor);
        }
        for (doc, hash, actor) in new_acks {
            self.log(format!("agent {i} acknowledged change {hash} of {doc}"));
            self.acknowledged.push((doc, hash, actor));
        }
        Ok(())
    }

    /// Simulated users edit their tools (their agents may be down: the tool is not).
    fn workload(&mut self) {
        for i in 0..self.agents.len() {
            if !self.rng.chance(TICK_MS as f64 / 2_000.0) {
                continue;
            }
            let key = format!("k{}", self.rng.below(KEYS_MAX));
            let exists = self.agents[i].tool.rows.contains_key(&key);
            let roll = self.rng.below(10);
            let edit = if exists && roll < 2 {
                None
            } else {
                let mut fields = Record::new();
                match self.rng.below(3) {
                    0 => fields.insert(
                        "name".into(),
                        Value::Text(format!("n{}", self.rng.below(1000))),
                    ),
                    1 => fields.insert("qty".into(), Value::Int(self.rng.below(100) as i64)),
                    _ => fields.insert(
                        "note".into(),
                        Value::Text(format!("note {}", self.rng.below(1000))),
                    ),
                };
                Some(fields)
            };
            self.log(format!("agent {i} user edits {key}: {edit:?}"));
            self.agents[i].tool.user_edit(&key, edit);
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
        link.last_arrival = [0, 0];
        link.reconnect_at = self.now + backoff;
        let (a, b) = (link.a, link.b);
        self.log(format!("link {a}-{b} closed: {why}"));
    }

    fn step_link(&mut self, l: usize) -> Result<(), String> {
        let (a, b) = (self.links[l].a, self.links[l].b);
        let up = self.agents[a].engine.is_some() && self.agents[b].engine.is_some();
        if let Some((dir, since, until)) = self.links[l].oneway {
            if self.now >= until {
                self.links[l].oneway = None;
            } else if self.now >= since + LINK_IDLE_TIMEOUT_MS {
                // Nothing came through one way for the idle timeout: QUIC gives up.
                let _ = dir;
                self.close(l, "idle timeout (one-way partition)");
            }
        }
        if self.links[l].ends.is_none() {
            let allowed = self.now >= self.links[l].partitioned_until
                && self.now >= self.links[l].reconnect_at;
            if up && allowed {
                let store = |i: usize| self.agents[i].engine.as_ref().map(|e| e.store_id());
                let (Some(sa), Some(sb)) = (store(a), store(b)) else {
                    return Ok(());
                };
                let now = self.instant();
                let heads = |i: usize| -> Result<Vec<(String, u64)>, String> {
                    let engine = self.agents[i].engine.as_ref().ok_or("agent down")?;
                    let head = engine
                        .reader()
                        .log_head(COLLECTION)
                        .map_err(|e| e.to_string())?;
                    Ok(vec![(COLLECTION.to_owned(), head)])
                };
                let (ha, hb) = (heads(a)?, heads(b)?);
                self.links[l].ends = Some([Session::new(sa, ha, now), Session::new(sb, hb, now)]);
                self.links[l].log_seen = [0, 0];
                self.log(format!("link {a}-{b} connected"));
            } else {
                return Ok(());
            }
        }
        let mut ends = self.links[l].ends.take().expect("connected");
        let result = self.pump(l, &mut ends);
        match result {
            Ok(()) => {
                if self.links[l].ends.is_none() && self.links[l].reconnect_at <= self.now {
                    self.links[l].ends = Some(ends);
                }
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

    /// Delivers due frames to both ends, acts on their events, lets time pass and
    /// queues what they send.
    fn pump(&mut self, l: usize, ends: &mut [Session; 2]) -> Result<(), Pump> {
        let agents = [self.links[l].a, self.links[l].b];
        let now = self.instant();
        for side in 0..2 {
            let dir = 1 - side; // frames travelling towards `side`
            loop {
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
                self.events(agents[side], &mut ends[side])?;
            }
        }
        for side in 0..2 {
            ends[side]
                .handle_timeout(now)
                .map_err(|e| Pump::Closed(format!("{}: {e}", agents[side])))?;
            self.events(agents[side], &mut ends[side])?;
            let version = self.agents[agents[side]].log_version;
            if self.links[l].log_seen[side] != version {
                self.links[l].log_seen[side] = version;
                ends[side].log_grew();
            }
            let engine = self.agents[agents[side]]
                .engine
                .as_mut()
                .ok_or(Pump::Closed("agent down".into()))?;
            let reader = engine.store().reader();
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

    fn transmit(&mut self, l: usize, side: usize, frame: Vec<u8>) {
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

    /// Acts on a session's events against its agent's engine.
    fn events(&mut self, i: usize, session: &mut Session) -> Result<(), Pump> {
        let mut lines: Vec<String> = Vec::new();
        let now = self.instant();
        while let Some(event) = session.poll_event() {
            let engine = self.agents[i]
                .engine
                .as_mut()
                .ok_or(Pump::Closed("agent down".into()))?;
            match event {
                Event::PeerHello { store } => {
                    let fatal = |e: concord_agent::store::StoreError| Pump::Fatal(e.to_string());
                    let reader = engine.store().reader();
                    let name = concord_agent::store::peer_cursor(&store, COLLECTION);
                    let mark = concord_agent::store::anti_entropy_mark(&store, COLLECTION);
                    let (cursor, walk) = session.subscription(
                        COLLECTION,
                        reader.cursor(&name).map_err(fatal)?,
                        reader.cursor(&mark).map_err(fatal)? == 1,
                        reader.log_head(COLLECTION).map_err(fatal)? > 0,
                    );
                    if walk {
                        let mut batch = engine.store().batch();
                        engine.store().stage_cursor(&mut batch, &name, cursor);
                        engine.store().stage_cursor(&mut batch, &mark, 1);
                        engine.store().commit(batch).map_err(fatal)?;
                    }
                    session.subscribe(vec![(COLLECTION.to_owned(), cursor)]);
                    lines.push(format!(
                        "agent {i} subscribes to {} from {cursor} (anti-entropy: {})",
                        concord_agent::store::hex(&store[..4]),
                        walk
                    ));
                    if walk {
                        session.start_anti_entropy(COLLECTION.to_owned());
                    }
                }
                Event::DigestQuery {
                    collection,
                    depth,
                    prefix,
                } => {
                    let digests = engine
                        .store()
                        .digest_children(&collection, depth, prefix)
                        .map_err(|e| Pump::Fatal(e.to_string()))?
                        .ok_or(Pump::Closed("a digest query outside the tree".into()))?;
                    session.digests(collection, depth, prefix, digests);
                }
                Event::BucketQuery { collection, bucket } => {
                    let docs = engine
                        .reader()
                        .bucket_docs(&collection, bucket)
                        .map_err(|e| Pump::Fatal(e.to_string()))?;
                    session.bucket(collection, bucket, docs);
                }
                Event::Digests {
                    collection,
                    depth,
                    prefix,
                    digests,
                } => {
                    let ours = engine
                        .store()
                        .digest_children(&collection, depth, prefix)
                        .map_err(|e| Pump::Fatal(e.to_string()))?
                        .ok_or(Pump::Closed("digests outside the tree".into()))?;
                    session.compare_digests(&collection, depth, prefix, &digests, &ours);
                }
                Event::Bucket {
                    collection,
                    bucket: _,
                    docs,
                } => {
                    for (doc, theirs) in docs {
                        let ours = engine
                            .reader()
                            .doc_digest(&collection, DocId(doc))
                            .map_err(|e| Pump::Fatal(e.to_string()))?;
                        if ours != theirs {
                            lines.push(format!("agent {i} repairs {}", DocId(doc)));
                            let heads = engine
                                .heads(DocId(doc))
                                .map_err(|e| Pump::Fatal(e.to_string()))?;
                            session.repair(
                                collection.clone(),
                                doc,
                                heads.iter().map(|h| h.0).collect(),
                            );
                        }
                    }
                    session.answered(&collection);
                }
                Event::AntiEntropyDone { collection } => {
                    lines.push(format!("agent {i} anti-entropy done"));
                    if let Some(store) = session.peer() {
                        let mark = concord_agent::store::anti_entropy_mark(&store, &collection);
                        let mut batch = engine.store().batch();
                        engine.store().stage_cursor(&mut batch, &mark, 0);
                        engine
                            .store()
                            .commit(batch)
                            .map_err(|e| Pump::Fatal(e.to_string()))?;
                    }
                }
                Event::Apply {
                    collection,
                    upto,
                    entries,
                } => {
                    let count = entries.len();
                    let (missing, grew) = apply(engine, session, &collection, Some(upto), entries)?;
                    if grew {
                        self.agents[i].log_version += 1;
                    }
                    let engine = self.agents[i]
                        .engine
                        .as_mut()
                        .ok_or(Pump::Closed("agent down".into()))?;
                    session.applied(now, collection.clone(), upto, count);
                    for doc in missing {
                        let heads = engine.heads(doc).map_err(|e| Pump::Fatal(e.to_string()))?;
                        session.need_doc(
                            collection.clone(),
                            doc.0,
                            heads.iter().map(|h| h.0).collect(),
                        );
                    }
                }
                Event::DocChanges {
                    collection,
                    doc,
                    changes,
                } => {
                    let entry = WireEntry {
                        seq: 0,
                        doc,
                        changes,
                    };
                    let n = entry.changes.len();
                    let (_, grew) = apply(engine, session, &collection, None, vec![entry])?;
                    lines.push(format!(
                        "agent {i} got {n} changes of {} (new: {grew})",
                        DocId(doc)
                    ));
                    if grew {
                        self.agents[i].log_version += 1;
                    }
                    session.repaired(doc);
                }
                Event::NeedDoc {
                    collection,
                    doc,
                    heads,
                } => {
                    let heads: Vec<ChangeHash> = heads.into_iter().map(ChangeHash).collect();
                    match engine
                        .changes_since(DocId(doc), &heads)
                        .map_err(|e| Pump::Fatal(e.to_string()))?
                    {
                        Some(found) => session.doc_changes(found.collection, doc, found.changes),
                        None => session.doc_changes(collection, doc, Vec::new()),
                    }
                }
            }
        }
        for line in lines {
            self.log(line);
        }
        Ok(())
    }

    /// Every document's heads on every running agent, or why they differ.
    fn converged(&mut self) -> Result<(), String> {
        let mut reference: Option<BTreeMap<DocId, Vec<ChangeHash>>> = None;
        for i in 0..self.agents.len() {
            let agent = &mut self.agents[i];
            if agent.plan.is_some() || agent.tool.changed_since(agent.cursor) {
                return Err(format!("agent {i} has work in flight"));
            }
            let Some(engine) = agent.engine.as_mut() else {
                return Err(format!("agent {i} is down"));
            };
            let ids = engine
                .store()
                .reader()
                .doc_ids()
                .map_err(|e| e.to_string())?;
            let mut heads = BTreeMap::new();
            let mut projection = BTreeMap::new();
            for id in ids {
                let mut h = engine.heads(id).map_err(|e| e.to_string())?;
                h.sort();
                heads.insert(id, h);
                let state = engine
                    .store()
                    .doc(id)
                    .map_err(|e| e.to_string())?
                    .read()
                    .map_err(|e| e.to_string())?;
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
                    projection.insert(state.key.clone(), row);
                }
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
            match &reference {
                None => reference = Some(heads),
                Some(r) if *r != heads => {
                    let differing = r
                        .iter()
                        .find(|(id, h)| heads.get(*id) != Some(*h))
                        .map(|(id, _)| *id);
                    let detail = match differing {
                        Some(id) => {
                            let am = engine
                                .store()
                                .doc(id)
                                .map_err(|e| e.to_string())?
                                .automerge();
                            format!(
                                "{id}: heads {:?} vs {:?}, agent {i} waits for {:?}",
                                heads.get(&id),
                                r.get(&id),
                                am.get_missing_deps(&[])
                            )
                        }
                        None => String::new(),
                    };
                    return Err(format!(
                        "agent {i}'s documents differ from agent 0's ({} vs {} documents; {detail}; first differing: {differing:?})",
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
            let engine = agent.engine.as_mut().ok_or("agent down after healing")?;
            for (doc, hash, _) in &acknowledged {
                let am = engine
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
            let engine = agent.engine.as_mut().ok_or("agent down after healing")?;
            for id in engine
                .store()
                .reader()
                .doc_ids()
                .map_err(|e| e.to_string())?
            {
                let doc = engine.store().doc(id).map_err(|e| e.to_string())?;
                let (collection, key) = doc
                    .identity()
                    .map_err(|e| e.to_string())?
                    .ok_or("a document without identity")?;
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

    /// Counters that must not move once the cluster is quiet.
    fn activity(&mut self) -> Result<Vec<u64>, String> {
        let mut out = Vec::new();
        for agent in &mut self.agents {
            let engine = agent.engine.as_mut().ok_or("agent down")?;
            let head = engine
                .store()
                .reader()
                .log_head(COLLECTION)
                .map_err(|e| e.to_string())?;
            let stats = engine.stats().clone();
            out.extend([
                head,
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
        if let Some(engine) = self.agents[0].engine.as_mut() {
            for id in engine
                .store()
                .reader()
                .doc_ids()
                .map_err(|e| e.to_string())?
            {
                out.extend_from_slice(&id.0);
                for h in engine.heads(id).map_err(|e| e.to_string())? {
                    out.extend_from_slice(&h.0);
                }
            }
        }
        Ok(out)
    }
}

/// Why pumping a link stopped.
enum Pump {
    /// The session broke: close the link, reconnect later.
    Closed(String),
    /// The store failed: the run is broken.
    Fatal(String),
}

fn apply(
    engine: &mut Engine,
    session: &Session,
    collection: &str,
    upto: Option<u64>,
    entries: Vec<WireEntry>,
) -> Result<(Vec<DocId>, bool), Pump> {
    let origin: StoreId = session
        .peer()
        .ok_or(Pump::Closed("entries before hello".into()))?;
    let mut batch = engine.store().batch();
    let outcome = match engine.apply_remote(&mut batch, origin, collection, upto, entries) {
        Ok(outcome) => outcome,
        Err(RemoteError::Store(e)) => return Err(Pump::Fatal(e.to_string())),
        Err(e) => return Err(Pump::Closed(e.to_string())),
    };
    let appended = engine
        .store()
        .commit(batch)
        .map_err(|e| Pump::Fatal(e.to_string()))?;
    Ok((outcome.missing, !appended.is_empty()))
}
