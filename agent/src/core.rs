//! The core: the single writer of the store.
//!
//! Capture batches from the tool, session events from peer drivers and write-back
//! results arrive on one bounded queue. The core drains what is queued (up to
//! [`GROUP_COMMIT_REQUESTS_MAX`]), stages it all into one batch, commits it with one
//! fsync (group commit), and only then replies, announces new log entries to the
//! sessions and plans the next write-back.
//!
//! [`Core`] is the loop's logic without the thread: [`run`] drives it from the
//! queue, and the simulator drives the very same [`Core::step`] from its own.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::SyncSender;

use connectors::{CaptureBatch, OpOutcome};
use tokio::sync::{mpsc, oneshot, watch};

use crate::engine::{ActionError, Engine, EngineStats, RemoteError, ToolIx, WritePlan};
use crate::replication::{Action, Event, policy};
use crate::store::{StoreError, StoreId};
use crate::telemetry::Telemetry;

/// Requests queued for the core at most.
pub const CORE_QUEUE_MAX: usize = 256;
/// Requests staged into one commit at most.
pub const GROUP_COMMIT_REQUESTS_MAX: usize = 64;
/// Write-back plans handed to one tool and not finished, at most.
pub const WRITE_BACK_PLANS_IN_FLIGHT_MAX: usize = 1;

/// A request to the core.
#[derive(Debug)]
pub enum CoreRequest {
    /// A tool's connector captured changes; reply once they are durable.
    Capture {
        /// The tool.
        tool: ToolIx,
        /// What was captured.
        batch: CaptureBatch,
        /// The tool loop's number of this capture.
        mark: u64,
        /// Answered after the commit.
        reply: oneshot::Sender<()>,
    },
    /// An event of the session with peer store `peer`: the core acts on it (the peer
    /// policy) and answers, after the commit, with what the session must do.
    Peer {
        /// The peer's store (from its hello).
        peer: StoreId,
        /// The event.
        event: Event,
        /// The session's actions, or why the peer's data was refused.
        reply: oneshot::Sender<Result<Vec<Action>, RemoteError>>,
    },
    /// A tool's connector finished a write-back plan (`None`: it failed, nothing was
    /// written).
    WritesDone {
        /// The plan.
        plan: WritePlan,
        /// One outcome per write.
        outcomes: Option<Vec<OpOutcome>>,
    },
    /// A person's action on a queue (from the admin API); answered after the commit.
    Admin {
        /// What to do.
        action: AdminAction,
        /// Done, or why not.
        reply: oneshot::Sender<Result<(), ActionError>>,
    },
    /// Time passed: dead letters whose retry is due are retried.
    Tick,
    /// Counters, for status and tests.
    Stats {
        /// The counters.
        reply: oneshot::Sender<EngineStats>,
    },
}

/// A person's action on one of the queues.
#[derive(Debug, Clone)]
pub enum AdminAction {
    /// Settle an open conflict on a value.
    Resolve {
        /// The record's document.
        doc: crdt_model::DocId,
        /// The field.
        field: String,
        /// The value chosen (one of the candidates, or a new one).
        value: crdt_model::Value,
    },
    /// Let a held delete go out.
    ApproveDelete(RecordRef),
    /// Restore the record a held delete removed from its tool.
    RejectDelete(RecordRef),
    /// Retry a dead letter now.
    RetryLetter(RecordRef),
    /// Drop a dead letter.
    DiscardLetter(RecordRef),
}

/// A record of one of this agent's tools.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RecordRef {
    /// The tool's name.
    pub tool: String,
    /// The collection.
    pub collection: String,
    /// The record's key in the tool.
    pub key: String,
}

impl std::fmt::Display for RecordRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}/{}", self.tool, self.collection, self.key)
    }
}

/// A handle to send requests to the core.
#[derive(Debug, Clone)]
pub struct CoreHandle {
    tx: mpsc::Sender<CoreRequest>,
}

/// The core is gone (the agent is shutting down or crashed).
#[derive(Debug, thiserror::Error)]
#[error("the agent core has stopped")]
pub struct CoreStopped;

impl CoreHandle {
    /// Sends a request, waiting for room in the queue (async callers).
    pub async fn send(&self, request: CoreRequest) -> Result<(), CoreStopped> {
        self.tx.send(request).await.map_err(|_| CoreStopped)
    }

    /// Sends a request, blocking for room in the queue (threads outside tokio).
    pub fn blocking_send(&self, request: CoreRequest) -> Result<(), CoreStopped> {
        self.tx.blocking_send(request).map_err(|_| CoreStopped)
    }
}

/// Where the core announces things.
#[derive(Debug)]
pub struct CoreOutputs {
    /// Bumped after every commit that appended log entries.
    pub log_version: watch::Sender<u64>,
    /// Write-back plans for each tool's loop, by tool.
    pub write_back: Vec<SyncSender<ToolEvent>>,
    /// Commits done, for status.
    pub commits: Arc<AtomicU64>,
    /// Where the core publishes its snapshot and the times of its commits.
    pub telemetry: Arc<Telemetry>,
}

/// How often the core publishes its snapshot while busy, at most; an idle core
/// publishes after each commit.
pub const SNAPSHOT_INTERVAL_MS: i64 = 100;

/// Creates the core's queue.
pub fn channel() -> (CoreHandle, mpsc::Receiver<CoreRequest>) {
    let (tx, rx) = mpsc::channel(CORE_QUEUE_MAX);
    (CoreHandle { tx }, rx)
}

/// The wall clock in milliseconds since the Unix epoch (0 if the clock is before it).
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// A store failure: the agent must crash and recover from what is on disk, so it
/// aborts the whole process rather than let other threads run on without a store.
fn fatal(error: &dyn std::fmt::Display) -> ! {
    tracing::error!(%error, "the store failed; aborting so that a restart recovers");
    eprintln!("concord: the store failed: {error}; aborting");
    std::process::abort()
}

/// What one [`Core::step`] committed.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Committed {
    /// Whether a batch was committed at all.
    pub batch: bool,
    /// Log entries appended.
    pub appended: usize,
    /// The last seq appended to each collection's log.
    pub heads: Vec<(String, u64)>,
}

/// What a tool's loop waits for: a plan from the core, or a wake-up from its
/// connector (the tool signalled a change).
#[derive(Debug)]
pub enum ToolEvent {
    /// Write this plan back.
    Plan(WritePlan),
    /// The tool may have changed: capture.
    Wake,
}

/// Events queued for one tool's loop at most: one plan (see
/// [`WRITE_BACK_PLANS_IN_FLIGHT_MAX`]) and one wake-up (wake-ups coalesce).
pub const TOOL_EVENTS_MAX: usize = WRITE_BACK_PLANS_IN_FLIGHT_MAX + 1;

/// The core's logic: group commits over the engine, and write-back planning.
#[derive(Debug)]
pub struct Core {
    engine: Engine,
    /// Per tool, whether a plan is on its way to the tool.
    write_back_in_flight: Vec<bool>,
    /// Per tool, whether something changed since its last plan.
    plan_needed: Vec<bool>,
    /// Where the idle compaction of documents goes on.
    doc_compaction: DocCompactionCursor,
    /// Whether a log entry was appended (so a document changed) since the last
    /// pass of the idle compaction started: without, a pass would find nothing.
    docs_changed: bool,
}

/// Where the idle compaction of stored documents ([`crate::store::Store::compact_docs`])
/// stands: a pass walks every document in slices, one per idle tick, and the next
/// pass starts [`DOC_COMPACT_PASS_PAUSE_MS`] after it ended, if a document changed
/// since the last started.
#[derive(Debug, Clone, Copy, Default)]
enum DocCompactionCursor {
    /// The next slice starts a pass at the first document.
    #[default]
    Start,
    /// The next slice starts at this document.
    At(crdt_model::DocId),
    /// A pass ended at this time (ms since the epoch).
    Ended(i64),
}

/// Time between two passes of the idle compaction of documents.
pub const DOC_COMPACT_PASS_PAUSE_MS: i64 = 60_000;

impl Core {
    /// A core over `engine`; the first [`Core::plan`] plans whatever is pending.
    pub fn new(engine: Engine) -> Core {
        let tools = engine.tool_count();
        Core {
            engine,
            write_back_in_flight: vec![false; tools],
            plan_needed: vec![true; tools],
            doc_compaction: DocCompactionCursor::default(),
            docs_changed: false,
        }
    }

    /// One slice of the idle compaction of documents, if a pass is due; run when a
    /// tick found nothing else to do.
    fn compact_docs_idle(&mut self, now_ms: i64) -> Result<(), StoreError> {
        use crate::store::{DOC_COMPACT_REWRITE_MAX, DOC_COMPACT_SCAN_MAX};
        let from = match self.doc_compaction {
            DocCompactionCursor::Start => None,
            DocCompactionCursor::At(id) => Some(id),
            DocCompactionCursor::Ended(at)
                if self.docs_changed && now_ms - at >= DOC_COMPACT_PASS_PAUSE_MS =>
            {
                None
            }
            DocCompactionCursor::Ended(_) => return Ok(()),
        };
        if from.is_none() {
            self.docs_changed = false;
        }
        let done = self.engine.store().compact_docs(
            from,
            DOC_COMPACT_SCAN_MAX,
            DOC_COMPACT_REWRITE_MAX,
        )?;
        if done.rewritten > 0 {
            tracing::debug!(
                rewritten = done.rewritten,
                bytes_saved = done.bytes_saved,
                "saved documents of many changes again as one"
            );
        }
        self.engine.docs_compacted(done.rewritten as u64);
        self.doc_compaction = match done.next {
            Some(id) => DocCompactionCursor::At(id),
            None => DocCompactionCursor::Ended(now_ms),
        };
        Ok(())
    }

    /// The engine, for reads between steps.
    pub fn engine(&mut self) -> &mut Engine {
        &mut self.engine
    }

    /// Plans the next write-back of every tool that has one due and none in flight;
    /// the caller hands each to its tool (or calls [`Core::plan_lost`] if it cannot).
    pub fn plan(&mut self, now_ms: i64) -> Result<Vec<WritePlan>, StoreError> {
        let mut plans = Vec::new();
        for tool in 0..self.plan_needed.len() {
            if !self.plan_needed[tool] || self.write_back_in_flight[tool] {
                continue;
            }
            self.plan_needed[tool] = false;
            self.engine.set_now(now_ms);
            let mut batch = self.engine.store().batch();
            let max = self.engine.writes_per_plan(tool);
            let plan = self.engine.plan_writes(&mut batch, tool, max, now_ms)?;
            self.engine.store().commit(batch)?;
            if !plan.writes.is_empty() {
                self.write_back_in_flight[tool] = true;
                plans.push(plan);
            }
        }
        Ok(plans)
    }

    /// `tool`'s plan could not be handed to it: nothing will write it back.
    pub fn plan_lost(&mut self, tool: ToolIx) {
        self.write_back_in_flight[tool] = false;
        self.engine.writes_failed(tool);
    }

    /// Every tool plans again (something may have changed for each).
    fn replan_all(&mut self) {
        self.plan_needed
            .iter_mut()
            .for_each(|needed| *needed = true);
    }

    fn act(
        &mut self,
        batch: &mut crate::store::Batch,
        action: AdminAction,
    ) -> Result<Result<(), ActionError>, StoreError> {
        let engine = &mut self.engine;
        match action {
            AdminAction::Resolve { doc, field, value } => {
                engine.resolve(batch, doc, &field, &value)
            }
            AdminAction::ApproveDelete(r) => {
                engine.approve_delete(batch, &r.tool, &r.collection, &r.key)
            }
            AdminAction::RejectDelete(r) => {
                engine.reject_delete(batch, &r.tool, &r.collection, &r.key)
            }
            AdminAction::RetryLetter(r) => {
                engine.retry_letter(batch, &r.tool, &r.collection, &r.key)
            }
            AdminAction::DiscardLetter(r) => {
                engine.discard_letter(batch, &r.tool, &r.collection, &r.key)
            }
        }
    }

    /// Stages every request into one batch, commits it with one fsync, then sends
    /// the replies. Later requests see what earlier ones staged.
    pub fn step(
        &mut self,
        requests: Vec<CoreRequest>,
        now_ms: i64,
    ) -> Result<Committed, StoreError> {
        debug_assert!(requests.len() <= GROUP_COMMIT_REQUESTS_MAX);
        let idle = requests.iter().all(|r| matches!(r, CoreRequest::Tick));
        self.engine.set_now(now_ms);
        let mut batch = self.engine.store().batch();
        let mut replies: Vec<Box<dyn FnOnce()>> = Vec::with_capacity(requests.len());
        for request in requests {
            match request {
                CoreRequest::Capture {
                    tool,
                    batch: captured,
                    mark,
                    reply,
                } => {
                    self.engine
                        .capture(&mut batch, tool, captured, mark, now_ms)?;
                    self.replan_all();
                    replies.push(Box::new(move || {
                        let _ = reply.send(());
                    }));
                }
                CoreRequest::Peer { peer, event, reply } => {
                    let result = match policy::on_event(&mut self.engine, &mut batch, peer, event) {
                        Err(RemoteError::Store(e)) => return Err(e),
                        result => result,
                    };
                    self.replan_all();
                    replies.push(Box::new(move || {
                        let _ = reply.send(result);
                    }));
                }
                CoreRequest::WritesDone { plan, outcomes } => {
                    let tool = plan.tool;
                    match outcomes {
                        Some(outcomes) => self
                            .engine
                            .writes_done(&mut batch, plan, outcomes, now_ms)?,
                        None => self.engine.writes_failed(tool),
                    }
                    self.write_back_in_flight[tool] = false;
                    self.plan_needed[tool] = true;
                }
                CoreRequest::Admin { action, reply } => {
                    let result = self.act(&mut batch, action)?;
                    self.replan_all();
                    replies.push(Box::new(move || {
                        let _ = reply.send(result);
                    }));
                }
                CoreRequest::Tick => {
                    if self.engine.retry_due(&mut batch) {
                        self.replan_all();
                    }
                }
                CoreRequest::Stats { reply } => {
                    let stats = self.engine.stats().clone();
                    replies.push(Box::new(move || {
                        let _ = reply.send(stats);
                    }));
                }
            }
        }
        let mut heads: Vec<(String, u64)> = Vec::new();
        for (collection, seq) in &batch.appended {
            match heads.iter_mut().find(|(c, _)| c == collection) {
                Some((_, head)) => *head = (*head).max(*seq),
                None => heads.push((collection.clone(), *seq)),
            }
        }
        let committed = Committed {
            batch: !batch.is_empty(),
            appended: batch.appended.len(),
            heads,
        };
        self.engine.store().commit(batch)?;
        self.docs_changed |= committed.appended > 0;
        for reply in replies {
            reply();
        }
        if idle && !self.write_back_in_flight.contains(&true) {
            self.compact_docs_idle(now_ms)?;
        }
        Ok(committed)
    }
}

/// Runs the core until every handle is dropped. A store failure aborts the process.
pub fn run(engine: Engine, mut rx: mpsc::Receiver<CoreRequest>, outputs: CoreOutputs) {
    let mut core = Core::new(engine);
    let mut published_ms = i64::MIN;
    loop {
        for plan in core.plan(now_ms()).unwrap_or_else(|e| fatal(&e)) {
            let tool = plan.tool;
            if outputs.write_back[tool]
                .try_send(ToolEvent::Plan(plan))
                .is_err()
            {
                // The tool's loop is gone; nothing will write back.
                core.plan_lost(tool);
            }
        }
        let Some(first) = rx.blocking_recv() else {
            // Stopping: memtables written out now are not replayed from the journal
            // at the next start.
            if let Err(e) = core.engine().store().flush() {
                tracing::warn!("could not flush the store on the way out: {e}");
            }
            return;
        };
        let mut requests = vec![first];
        while requests.len() < GROUP_COMMIT_REQUESTS_MAX {
            match rx.try_recv() {
                Ok(request) => requests.push(request),
                Err(_) => break,
            }
        }
        let now = now_ms();
        let committed = core.step(requests, now).unwrap_or_else(|e| fatal(&e));
        if committed.batch {
            outputs.commits.fetch_add(1, Ordering::Relaxed);
        }
        if committed.appended > 0 {
            outputs.telemetry.committed(&committed.heads, now);
            outputs
                .log_version
                .send_modify(|version| *version += committed.appended as u64);
        }
        if rx.is_empty() || now - published_ms >= SNAPSHOT_INTERVAL_MS {
            published_ms = now;
            let mut snapshot = core.engine().snapshot().unwrap_or_else(|e| fatal(&e));
            snapshot.commits = outputs.commits.load(Ordering::Relaxed);
            outputs.telemetry.publish(snapshot);
        }
    }
}
