//! What the agent tells its operators: status, metrics, recent activity and a
//! throughput series, for the admin API, the CLI and the dashboard.
//!
//! Nothing here goes through the core's work queue. The core publishes a
//! [`CoreSnapshot`] after its commits ([`Telemetry::publish`]) and notes when log
//! entries were committed ([`Telemetry::committed`]); each peer driver keeps its
//! peer's [`PeerStatus`] and each tool thread its tool's health. A scrape reads those
//! and renders them, with `metrics-exporter-prometheus`, into a recorder that belongs
//! to this agent alone (agents sharing a process keep their own figures).

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use metrics::{Histogram, Label, Recorder};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle, PrometheusRecorder};
use serde::{Deserialize, Serialize};

use crate::engine::{EngineStats, ToolCounts};
use crate::identity::PeerId;

/// Activity lines kept for the dashboard.
pub const ACTIVITY_MAX: usize = 200;
/// How often a point of the throughput series is taken.
pub const SERIES_INTERVAL_MS: u64 = 10_000;
/// Points of the throughput series kept: one hour.
pub const SERIES_POINTS_MAX: usize = 360;
/// Commits of each collection remembered with their time, for lag in seconds and
/// the latency histogram; commits closer than [`LOG_CLOCK_RESOLUTION_MS`] share one.
pub const LOG_CLOCK_MAX: usize = 8_192;
/// See [`LOG_CLOCK_MAX`].
pub const LOG_CLOCK_RESOLUTION_MS: i64 = 10;
/// Buckets of the capture-to-remote-commit latency histogram, in seconds.
pub const LATENCY_BUCKETS_S: [f64; 16] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0,
];
/// The name of the latency histogram.
pub const LATENCY_METRIC: &str = "concord_replication_latency_seconds";

/// What the core publishes after its commits.
#[derive(Debug, Clone, Default)]
pub struct CoreSnapshot {
    /// Per tool, in the agent's order.
    pub tools: Vec<ToolSnapshot>,
    /// Per collection this agent syncs or relays.
    pub collections: Vec<CollectionSnapshot>,
    /// Fields waiting for a person to settle their conflict.
    pub conflicts: u64,
    /// The engine's counters.
    pub stats: EngineStats,
    /// Store commits since start.
    pub commits: u64,
}

/// One tool, as the core sees it.
#[derive(Debug, Clone, Default)]
pub struct ToolSnapshot {
    /// The tool's name.
    pub name: String,
    /// What was done with it since start.
    pub counts: ToolCounts,
    /// Records waiting to be written to it.
    pub pending: u64,
    /// Deletes it made that wait for approval.
    pub held_deletes: u64,
    /// Its records set aside as dead letters.
    pub dead_letters: u64,
}

/// One collection, as the core sees it.
#[derive(Debug, Clone, Default)]
pub struct CollectionSnapshot {
    /// The collection.
    pub name: String,
    /// Live records (created and not deleted).
    pub records: u64,
    /// The last seq of its log.
    pub log_head: u64,
}

/// One tool's health, kept by its thread.
#[derive(Debug)]
pub struct ToolHealth {
    name: String,
    kind: &'static str,
    collections: Vec<String>,
    reachable: AtomicBool,
    errors: AtomicU64,
    last_error: Mutex<Option<String>>,
}

impl ToolHealth {
    /// The tool answered: it is reachable.
    pub fn ok(&self) {
        self.reachable.store(true, Ordering::Relaxed);
    }

    /// The tool failed with `error`.
    pub fn failed(&self, error: &str) {
        self.reachable.store(false, Ordering::Relaxed);
        self.errors.fetch_add(1, Ordering::Relaxed);
        *lock(&self.last_error) = Some(error.to_owned());
    }

    /// Whether the last step with the tool succeeded.
    pub fn reachable(&self) -> bool {
        self.reachable.load(Ordering::Relaxed)
    }
}

/// One collection stream to a peer, as its session last reported it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamProgress {
    /// The collection.
    pub collection: String,
    /// Entries sent and not acknowledged.
    pub in_flight: u64,
    /// The next seq of the local log to read for the peer.
    pub next: u64,
    /// The last seq the peer acknowledged.
    pub acked: u64,
}

/// What is known of one peer.
#[derive(Debug, Clone, Default)]
pub struct PeerStatus {
    /// The address dialed or last connected from.
    pub addr: Option<String>,
    /// Whether a session is up.
    pub connected: bool,
    /// Sessions up (two, briefly, when both sides dialed at once).
    pub sessions: u32,
    /// When the current session started (ms since the epoch).
    pub since_ms: Option<i64>,
    /// When the peer was last heard from.
    pub last_seen_ms: Option<i64>,
    /// Log entries sent to it since start.
    pub sent: u64,
    /// Log entries received from it since start.
    pub received: u64,
    /// Bytes received from it since start (QUIC datagrams).
    pub bytes_in: u64,
    /// Bytes sent to it since start.
    pub bytes_out: u64,
    /// The outbound streams, as of the last report (kept after a disconnect).
    pub streams: Vec<StreamProgress>,
    /// Entries of its logs it had when it said hello that this agent has not
    /// received yet.
    pub incoming_behind: Option<u64>,
}

/// One line of recent activity.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Activity {
    /// When (ms since the epoch).
    pub time_ms: i64,
    /// `agent`, `peer`, `tool`, `conflict`, `delete` or `letter`.
    pub kind: String,
    /// What happened.
    pub message: String,
}

/// One point of the throughput series: totals since start at one time.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SeriesPoint {
    /// When (ms since the epoch).
    pub time_ms: i64,
    /// Changes captured from the tools.
    pub captured: u64,
    /// Log entries received from peers.
    pub received: u64,
    /// Rows written to the tools.
    pub written: u64,
    /// Log entries sent to peers.
    pub sent: u64,
    /// The largest lag of a peer, in seconds.
    pub lag_seconds: f64,
}

/// The throughput series, as the API answers it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Series {
    /// The time between points.
    pub interval_ms: u64,
    /// The points, oldest first.
    pub points: Vec<SeriesPoint>,
}

/// The agent's status, as the API answers it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StatusView {
    /// The agent itself.
    pub agent: AgentView,
    /// Its tools.
    pub tools: Vec<ToolView>,
    /// Its collections.
    pub collections: Vec<CollectionView>,
    /// Its peers.
    pub peers: Vec<PeerView>,
    /// What waits for a person.
    pub queues: QueuesView,
}

/// The agent in its status.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AgentView {
    /// Its peer id.
    pub peer_id: String,
    /// Its store id.
    pub store: String,
    /// Where peers reach it.
    pub listen: String,
    /// Concord's version.
    pub version: String,
    /// When it started (ms since the epoch).
    pub started_ms: i64,
    /// Now, by its clock.
    pub now_ms: i64,
    /// Whether it is ready: store open, every tool reachable.
    pub ready: bool,
}

/// A tool in the status.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ToolView {
    /// Its name.
    pub name: String,
    /// Its kind.
    pub kind: String,
    /// Whether the last step with it succeeded.
    pub reachable: bool,
    /// Changes captured from it since start.
    pub captured: u64,
    /// Rows written to it since start.
    pub written: u64,
    /// Failures since start.
    pub errors: u64,
    /// The last failure.
    pub last_error: Option<String>,
    /// Records waiting to be written to it.
    pub pending: u64,
    /// Its records set aside as dead letters.
    pub dead_letters: u64,
    /// Its deletes waiting for approval.
    pub held_deletes: u64,
    /// The collections it syncs.
    pub collections: Vec<String>,
}

/// A collection in the status.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CollectionView {
    /// Its name.
    pub name: String,
    /// Live records.
    pub records: u64,
    /// The last seq of its log here.
    pub log_head: u64,
}

/// A peer in the status.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PeerView {
    /// Its peer id.
    pub id: String,
    /// The address dialed or last connected from.
    pub addr: Option<String>,
    /// Whether a session is up.
    pub connected: bool,
    /// When the current session started.
    pub since_ms: Option<i64>,
    /// When it was last heard from.
    pub last_seen_ms: Option<i64>,
    /// Entries of this agent's logs it has not acknowledged (unknown before the
    /// first session).
    pub changes_behind: Option<u64>,
    /// How long ago the oldest of them was committed here.
    pub seconds_behind: Option<f64>,
    /// Entries of its logs (as of its hello) not received yet.
    pub incoming_behind: Option<u64>,
    /// Log entries sent to it since start.
    pub sent: u64,
    /// Log entries received from it since start.
    pub received: u64,
    /// Bytes received from it since start.
    pub bytes_in: u64,
    /// Bytes sent to it since start.
    pub bytes_out: u64,
}

/// The queues in the status.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct QueuesView {
    /// Conflicts waiting for a person.
    pub conflicts: u64,
    /// Deletes waiting for approval.
    pub held_deletes: u64,
    /// Records set aside.
    pub dead_letters: u64,
}

/// Who the agent is, for its status.
#[derive(Debug, Clone)]
pub struct AgentInfo {
    /// Its peer id.
    pub peer_id: PeerId,
    /// Its store id, in hex.
    pub store: String,
    /// Where peers reach it.
    pub listen: String,
}

/// A tool as configured, for its health.
#[derive(Debug, Clone)]
pub struct ToolInfo {
    /// Its name.
    pub name: String,
    /// Its kind.
    pub kind: &'static str,
    /// The collections it syncs.
    pub collections: Vec<String>,
}

/// The agent's telemetry: shared by the core, the drivers, the tool threads and the
/// admin API.
pub struct Telemetry {
    agent: Mutex<Option<AgentInfo>>,
    started_ms: i64,
    ready: AtomicBool,
    core: Mutex<Arc<CoreSnapshot>>,
    tools: Vec<ToolHealth>,
    peers: Mutex<BTreeMap<PeerId, PeerStatus>>,
    activity: Mutex<VecDeque<Activity>>,
    series: Mutex<VecDeque<SeriesPoint>>,
    /// Per collection: (log head, when it was committed), oldest first.
    clock: Mutex<HashMap<String, VecDeque<(u64, i64)>>>,
    latency: Mutex<HashMap<PeerId, Histogram>>,
    recorder: PrometheusRecorder,
    handle: PrometheusHandle,
}

impl std::fmt::Debug for Telemetry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Telemetry").finish_non_exhaustive()
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Telemetry {
    /// The telemetry of an agent with `tools`, and `peers` configured (with the
    /// address each is dialed at, if any).
    pub fn new(tools: Vec<ToolInfo>, peers: Vec<(PeerId, Option<String>)>) -> Telemetry {
        let recorder = PrometheusBuilder::new()
            .set_buckets(&LATENCY_BUCKETS_S)
            .map(PrometheusBuilder::build_recorder)
            .unwrap_or_else(|_| PrometheusBuilder::new().build_recorder());
        let handle = recorder.handle();
        Telemetry {
            agent: Mutex::new(None),
            started_ms: crate::core::now_ms(),
            ready: AtomicBool::new(false),
            core: Mutex::new(Arc::default()),
            tools: tools
                .into_iter()
                .map(|t| ToolHealth {
                    name: t.name,
                    kind: t.kind,
                    collections: t.collections,
                    reachable: AtomicBool::new(true),
                    errors: AtomicU64::new(0),
                    last_error: Mutex::new(None),
                })
                .collect(),
            peers: Mutex::new(
                peers
                    .into_iter()
                    .map(|(id, addr)| {
                        let status = PeerStatus {
                            addr,
                            ..PeerStatus::default()
                        };
                        (id, status)
                    })
                    .collect(),
            ),
            activity: Mutex::new(VecDeque::new()),
            series: Mutex::new(VecDeque::new()),
            clock: Mutex::new(HashMap::new()),
            latency: Mutex::new(HashMap::new()),
            recorder,
            handle,
        }
    }

    /// The agent is up: store open, peers served.
    pub fn started(&self, agent: AgentInfo) {
        *lock(&self.agent) = Some(agent);
        self.ready.store(true, Ordering::Relaxed);
        self.note("agent", "agent started".to_owned());
    }

    /// Whether the agent is ready: started, and every tool reachable. Otherwise, why not.
    pub fn readiness(&self) -> Result<(), Vec<String>> {
        let mut reasons = Vec::new();
        if !self.ready.load(Ordering::Relaxed) {
            reasons.push("the agent is starting or stopping".to_owned());
        }
        for tool in &self.tools {
            if !tool.reachable() {
                let error = lock(&tool.last_error).clone().unwrap_or_default();
                reasons.push(format!("tool `{}` is unreachable: {error}", tool.name));
            }
        }
        if reasons.is_empty() {
            Ok(())
        } else {
            Err(reasons)
        }
    }

    /// The agent is stopping: no longer ready.
    pub fn stopping(&self) {
        self.ready.store(false, Ordering::Relaxed);
    }

    /// Tool `tool`'s health.
    pub fn tool(&self, tool: usize) -> &ToolHealth {
        &self.tools[tool]
    }

    /// The core's latest snapshot.
    pub fn core(&self) -> Arc<CoreSnapshot> {
        lock(&self.core).clone()
    }

    /// The core publishes what it holds now.
    pub fn publish(&self, snapshot: CoreSnapshot) {
        *lock(&self.core) = Arc::new(snapshot);
    }

    /// The core committed log entries up to `heads` (collection, last seq) at `now_ms`.
    pub fn committed(&self, heads: &[(String, u64)], now_ms: i64) {
        let mut clock = lock(&self.clock);
        for (collection, head) in heads {
            let commits = clock.entry(collection.clone()).or_default();
            match commits.back_mut() {
                Some((last, at)) if now_ms - *at < LOG_CLOCK_RESOLUTION_MS => {
                    *last = (*last).max(*head);
                }
                _ => {
                    commits.push_back((*head, now_ms));
                    if commits.len() > LOG_CLOCK_MAX {
                        commits.pop_front();
                    }
                }
            }
        }
    }

    /// When entry `seq` of `collection` was committed here, as far as remembered (at
    /// most [`LOG_CLOCK_RESOLUTION_MS`] late; the oldest time remembered for older
    /// entries).
    fn committed_at(
        clock: &HashMap<String, VecDeque<(u64, i64)>>,
        collection: &str,
        seq: u64,
    ) -> Option<i64> {
        let commits = clock.get(collection)?;
        let first = commits.partition_point(|(head, _)| *head < seq);
        commits.get(first).map(|(_, at)| *at)
    }

    /// Peer `peer` acknowledged the entries after `from` up to `upto` of
    /// `collection` at `now_ms`: each goes into the latency histogram.
    pub fn acked(&self, peer: PeerId, collection: &str, from: u64, upto: u64, now_ms: i64) {
        if upto <= from {
            return;
        }
        let histogram = lock(&self.latency)
            .entry(peer)
            .or_insert_with(|| {
                let key = metrics::Key::from_parts(
                    LATENCY_METRIC,
                    vec![Label::new("peer", peer.to_string())],
                );
                self.recorder.register_histogram(&key, &metadata())
            })
            .clone();
        let clock = lock(&self.clock);
        let Some(commits) = clock.get(collection) else {
            return;
        };
        // Each remembered commit covers the seqs after the one before it.
        let start = commits.partition_point(|(head, _)| *head <= from);
        let mut covered = from;
        for (head, at) in commits.iter().skip(start) {
            let last = (*head).min(upto);
            if last > covered {
                let seconds = (now_ms - at).max(0) as f64 / 1000.0;
                histogram.record_many(seconds, usize::try_from(last - covered).unwrap_or(0));
                covered = last;
            }
            if *head >= upto {
                break;
            }
        }
    }

    /// Runs `update` on peer `peer`'s status.
    pub fn peer(&self, peer: PeerId, update: impl FnOnce(&mut PeerStatus)) {
        update(lock(&self.peers).entry(peer).or_default());
    }

    /// Notes a line of activity.
    pub fn note(&self, kind: &str, message: String) {
        let mut activity = lock(&self.activity);
        activity.push_front(Activity {
            time_ms: crate::core::now_ms(),
            kind: kind.to_owned(),
            message,
        });
        activity.truncate(ACTIVITY_MAX);
    }

    /// The recent activity, newest first.
    pub fn activity(&self) -> Vec<Activity> {
        lock(&self.activity).iter().cloned().collect()
    }

    /// Takes a point of the throughput series now.
    pub fn sample(&self) {
        let now = crate::core::now_ms();
        let core = self.core();
        let peers = self.peer_views(&core, now);
        let point = SeriesPoint {
            time_ms: now,
            captured: core.tools.iter().map(|t| t.counts.captured).sum(),
            written: core.tools.iter().map(|t| t.counts.written).sum(),
            received: peers.iter().map(|p| p.received).sum(),
            sent: peers.iter().map(|p| p.sent).sum(),
            lag_seconds: peers
                .iter()
                .filter_map(|p| p.seconds_behind)
                .fold(0.0, f64::max),
        };
        let mut series = lock(&self.series);
        series.push_back(point);
        while series.len() > SERIES_POINTS_MAX {
            series.pop_front();
        }
    }

    /// The throughput series.
    pub fn series(&self) -> Series {
        Series {
            interval_ms: SERIES_INTERVAL_MS,
            points: lock(&self.series).iter().cloned().collect(),
        }
    }

    /// Each peer's view, from its status and the core's log heads.
    fn peer_views(&self, core: &CoreSnapshot, now_ms: i64) -> Vec<PeerView> {
        let heads: HashMap<&str, u64> = core
            .collections
            .iter()
            .map(|c| (c.name.as_str(), c.log_head))
            .collect();
        let peers = lock(&self.peers).clone();
        let clock = lock(&self.clock);
        peers
            .into_iter()
            .map(|(id, status)| {
                let (behind, oldest) = behind(&status.streams, &heads, &clock);
                let seconds_behind = match (behind, oldest) {
                    (Some(0), _) => Some(0.0),
                    (Some(_), Some(at)) => Some((now_ms - at).max(0) as f64 / 1000.0),
                    // Older than remembered: behind since start, at least.
                    (Some(_), None) => Some((now_ms - self.started_ms).max(0) as f64 / 1000.0),
                    (None, _) => None,
                };
                PeerView {
                    id: id.to_string(),
                    addr: status.addr,
                    connected: status.connected,
                    since_ms: status.since_ms,
                    last_seen_ms: status.last_seen_ms,
                    changes_behind: behind,
                    seconds_behind,
                    incoming_behind: status.incoming_behind,
                    sent: status.sent,
                    received: status.received,
                    bytes_in: status.bytes_in,
                    bytes_out: status.bytes_out,
                }
            })
            .collect()
    }

    /// The agent's status: the core's snapshot, the peers' and the tools'.
    pub fn status(&self) -> StatusView {
        let now = crate::core::now_ms();
        let core = self.core();
        let agent = lock(&self.agent).clone();
        let tools = self
            .tools
            .iter()
            .enumerate()
            .map(|(ix, health)| {
                let snapshot = core.tools.get(ix).cloned().unwrap_or_default();
                ToolView {
                    name: health.name.clone(),
                    kind: health.kind.to_owned(),
                    reachable: health.reachable(),
                    captured: snapshot.counts.captured,
                    written: snapshot.counts.written,
                    errors: health.errors.load(Ordering::Relaxed),
                    last_error: lock(&health.last_error).clone(),
                    pending: snapshot.pending,
                    dead_letters: snapshot.dead_letters,
                    held_deletes: snapshot.held_deletes,
                    collections: health.collections.clone(),
                }
            })
            .collect::<Vec<_>>();
        StatusView {
            agent: AgentView {
                peer_id: agent
                    .as_ref()
                    .map(|a| a.peer_id.to_string())
                    .unwrap_or_default(),
                store: agent.as_ref().map(|a| a.store.clone()).unwrap_or_default(),
                listen: agent.as_ref().map(|a| a.listen.clone()).unwrap_or_default(),
                version: env!("CARGO_PKG_VERSION").to_owned(),
                started_ms: self.started_ms,
                now_ms: now,
                ready: self.readiness().is_ok(),
            },
            queues: QueuesView {
                conflicts: core.conflicts,
                held_deletes: tools.iter().map(|t| t.held_deletes).sum(),
                dead_letters: tools.iter().map(|t| t.dead_letters).sum(),
            },
            tools,
            collections: core
                .collections
                .iter()
                .map(|c| CollectionView {
                    name: c.name.clone(),
                    records: c.records,
                    log_head: c.log_head,
                })
                .collect(),
            peers: self.peer_views(&core, now),
        }
    }

    /// The metrics in Prometheus' text format.
    pub fn render_metrics(&self) -> String {
        let status = self.status();
        let core = self.core();
        metrics::with_local_recorder(&self.recorder, || {
            metrics::gauge!("concord_ready").set(if status.agent.ready { 1.0 } else { 0.0 });
            metrics::counter!("concord_commits_total").absolute(core.commits);
            metrics::counter!("concord_docs_compacted_total").absolute(core.stats.docs_compacted);
            metrics::gauge!("concord_open_conflicts").set(status.queues.conflicts as f64);
            for c in &status.collections {
                let labels = [("collection", c.name.clone())];
                metrics::gauge!("concord_records", &labels).set(c.records as f64);
                metrics::gauge!("concord_log_head", &labels).set(c.log_head as f64);
            }
            for t in &status.tools {
                let labels = [("tool", t.name.clone())];
                metrics::counter!("concord_changes_captured_total", &labels).absolute(t.captured);
                metrics::counter!("concord_changes_written_total", &labels).absolute(t.written);
                metrics::counter!("concord_tool_errors_total", &labels).absolute(t.errors);
                metrics::gauge!("concord_tool_up", &labels).set(if t.reachable {
                    1.0
                } else {
                    0.0
                });
                metrics::gauge!("concord_pending_writes", &labels).set(t.pending as f64);
                metrics::gauge!("concord_dead_letters", &labels).set(t.dead_letters as f64);
                metrics::gauge!("concord_held_deletes", &labels).set(t.held_deletes as f64);
            }
            for p in &status.peers {
                let labels = [("peer", p.id.clone())];
                metrics::gauge!("concord_peer_connected", &labels).set(if p.connected {
                    1.0
                } else {
                    0.0
                });
                metrics::counter!("concord_changes_sent_total", &labels).absolute(p.sent);
                metrics::counter!("concord_changes_received_total", &labels).absolute(p.received);
                metrics::counter!("concord_peer_bytes_received_total", &labels)
                    .absolute(p.bytes_in);
                metrics::counter!("concord_peer_bytes_sent_total", &labels).absolute(p.bytes_out);
                if let Some(behind) = p.changes_behind {
                    metrics::gauge!("concord_peer_changes_behind", &labels).set(behind as f64);
                }
                if let Some(seconds) = p.seconds_behind {
                    metrics::gauge!("concord_peer_seconds_behind", &labels).set(seconds);
                }
                if let Some(incoming) = p.incoming_behind {
                    metrics::gauge!("concord_peer_incoming_behind", &labels).set(incoming as f64);
                }
            }
        });
        self.handle.render()
    }
}

fn metadata() -> metrics::Metadata<'static> {
    metrics::Metadata::new(module_path!(), metrics::Level::INFO, Some(module_path!()))
}

/// Entries of the local logs the peer has not acknowledged, by its last reported
/// streams (`None` before the first session), and when the oldest of them was
/// committed, if remembered.
fn behind(
    streams: &[StreamProgress],
    heads: &HashMap<&str, u64>,
    clock: &HashMap<String, VecDeque<(u64, i64)>>,
) -> (Option<u64>, Option<i64>) {
    if streams.is_empty() {
        return (None, None);
    }
    let mut total = 0u64;
    let mut oldest: Option<i64> = None;
    for stream in streams {
        let head = heads.get(stream.collection.as_str()).copied().unwrap_or(0);
        let unread = head.saturating_sub(stream.next.saturating_sub(1));
        let behind = stream.in_flight + unread;
        if behind == 0 {
            continue;
        }
        total += behind;
        let first = if stream.in_flight > 0 {
            stream.acked + 1
        } else {
            stream.next
        };
        if let Some(at) = Telemetry::committed_at(clock, &stream.collection, first) {
            oldest = Some(oldest.map_or(at, |o| o.min(at)));
        }
    }
    (Some(total), oldest)
}
