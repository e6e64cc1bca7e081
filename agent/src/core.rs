//! The core thread: the single writer of the store.
//!
//! Capture batches from the connector, entries from peer sessions and write-back
//! results arrive on one bounded queue. The core drains what is queued (up to
//! [`GROUP_COMMIT_REQUESTS_MAX`]), stages it all into one batch, commits it with one
//! fsync (group commit), and only then replies, announces new log entries to the
//! sessions and plans the next write-back.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::SyncSender;

use connectors::sqlite::{CaptureBatch, WriteOutcome};
use crdt_model::{ChangeHash, DocId};
use tokio::sync::{mpsc, oneshot, watch};

use crate::engine::{ApplyOutcome, DocChanges, Engine, EngineStats, WireEntry, WritePlan};
use crate::store::StoreId;

/// Requests queued for the core at most.
pub const CORE_QUEUE_MAX: usize = 256;
/// Requests staged into one commit at most.
pub const GROUP_COMMIT_REQUESTS_MAX: usize = 64;
/// Writes planned for the tool in one write-back at most.
pub const WRITE_BACK_BATCH_MAX: usize = 512;
/// Write-back plans handed to the tool and not finished, at most.
pub const WRITE_BACK_PLANS_IN_FLIGHT_MAX: usize = 1;

/// A request to the core.
#[derive(Debug)]
pub enum CoreRequest {
    /// The connector captured changes; reply once they are durable.
    Capture {
        /// What was captured.
        batch: CaptureBatch,
        /// Answered after the commit.
        reply: oneshot::Sender<()>,
    },
    /// A peer session received entries of `origin`'s log.
    Apply {
        /// The peer store the entries come from.
        origin: StoreId,
        /// Their collection.
        collection: String,
        /// Every seq up to this one was seen (`None` for a repair).
        upto: Option<u64>,
        /// The entries.
        entries: Vec<WireEntry>,
        /// Answered after the commit, or with the reason the entries were refused.
        reply: oneshot::Sender<Result<ApplyOutcome, String>>,
    },
    /// A peer asks for the changes of a document it lacks.
    ChangesSince {
        /// The document.
        doc: DocId,
        /// The peer's heads.
        heads: Vec<ChangeHash>,
        /// The document's collection and the changes, if the document is known.
        reply: oneshot::Sender<Option<DocChanges>>,
    },
    /// The heads of a document, to ask a peer for what is missing.
    Heads {
        /// The document.
        doc: DocId,
        /// Its heads.
        reply: oneshot::Sender<Vec<ChangeHash>>,
    },
    /// The digests of the children of a node of the digest tree (anti-entropy).
    DigestChildren {
        /// The collection.
        collection: String,
        /// The node's depth.
        depth: u8,
        /// The node's prefix.
        prefix: u32,
        /// The digests, or `None` for a node outside the tree.
        reply: oneshot::Sender<Option<Vec<u64>>>,
    },
    /// Sets cursors (a peer cursor and its anti-entropy mark) durably.
    SetCursors {
        /// (cursor name, value).
        cursors: Vec<(String, u64)>,
        /// Answered after the commit.
        reply: oneshot::Sender<()>,
    },
    /// The connector finished (or refused) a write-back plan.
    WritesDone {
        /// The plan.
        plan: WritePlan,
        /// What the connector did.
        outcome: WriteOutcome,
    },
    /// Counters, for status and tests.
    Stats {
        /// The counters.
        reply: oneshot::Sender<EngineStats>,
    },
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
    /// Write-back plans for the connector (capacity [`WRITE_BACK_PLANS_IN_FLIGHT_MAX`]).
    pub write_back: SyncSender<WritePlan>,
    /// Commits done, for status.
    pub commits: Arc<AtomicU64>,
}

/// Creates the core's queue.
pub fn channel() -> (CoreHandle, mpsc::Receiver<CoreRequest>) {
    let (tx, rx) = mpsc::channel(CORE_QUEUE_MAX);
    (CoreHandle { tx }, rx)
}

/// The wall clock in milliseconds since the Unix epoch (0 if the clock is before it).
fn now_ms() -> i64 {
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

/// Runs the core until every handle is dropped. A store failure aborts the process.
pub fn run(mut engine: Engine, mut rx: mpsc::Receiver<CoreRequest>, outputs: CoreOutputs) {
    let mut write_back_in_flight = false;
    let mut plan_needed = true;
    loop {
        if plan_needed && !write_back_in_flight {
            plan_needed = false;
            let mut batch = engine.store().batch();
            let plan = engine
                .plan_writes(&mut batch, WRITE_BACK_BATCH_MAX)
                .unwrap_or_else(|e| fatal(&e));
            if !batch.is_empty() {
                engine.store().commit(batch).unwrap_or_else(|e| fatal(&e));
            }
            if !plan.writes.is_empty() {
                write_back_in_flight = true;
                if outputs.write_back.try_send(plan).is_err() {
                    // The connector is gone; nothing will write back.
                    write_back_in_flight = false;
                }
            }
        }
        let Some(first) = rx.blocking_recv() else {
            return;
        };
        let mut requests = vec![first];
        while requests.len() < GROUP_COMMIT_REQUESTS_MAX {
            match rx.try_recv() {
                Ok(request) => requests.push(request),
                Err(_) => break,
            }
        }
        let mut batch = engine.store().batch();
        let mut replies: Vec<Box<dyn FnOnce()>> = Vec::new();
        for request in requests {
            match request {
                CoreRequest::Capture {
                    batch: captured,
                    reply,
                } => {
                    engine
                        .capture(&mut batch, captured.changes, captured.cursor, now_ms())
                        .unwrap_or_else(|e| fatal(&e));
                    plan_needed = true;
                    replies.push(Box::new(move || {
                        let _ = reply.send(());
                    }));
                }
                CoreRequest::Apply {
                    origin,
                    collection,
                    upto,
                    entries,
                    reply,
                } => {
                    let result =
                        match engine.apply_remote(&mut batch, origin, &collection, upto, entries) {
                            Ok(outcome) => Ok(outcome),
                            Err(crate::engine::RemoteError::Store(e)) => fatal(&e),
                            Err(e) => Err(e.to_string()),
                        };
                    plan_needed = true;
                    replies.push(Box::new(move || {
                        let _ = reply.send(result);
                    }));
                }
                CoreRequest::ChangesSince { doc, heads, reply } => {
                    // Answered after the commit: what is sent must be durable here first.
                    let changes = engine
                        .changes_since(doc, &heads)
                        .unwrap_or_else(|e| fatal(&e));
                    replies.push(Box::new(move || {
                        let _ = reply.send(changes);
                    }));
                }
                CoreRequest::DigestChildren {
                    collection,
                    depth,
                    prefix,
                    reply,
                } => {
                    let digests = engine
                        .store()
                        .digest_children(&collection, depth, prefix)
                        .unwrap_or_else(|e| fatal(&e));
                    replies.push(Box::new(move || {
                        let _ = reply.send(digests);
                    }));
                }
                CoreRequest::SetCursors { cursors, reply } => {
                    for (name, value) in &cursors {
                        engine.store().stage_cursor(&mut batch, name, *value);
                    }
                    replies.push(Box::new(move || {
                        let _ = reply.send(());
                    }));
                }
                CoreRequest::Heads { doc, reply } => {
                    let heads = engine.heads(doc).unwrap_or_else(|e| fatal(&e));
                    replies.push(Box::new(move || {
                        let _ = reply.send(heads);
                    }));
                }
                CoreRequest::WritesDone { plan, outcome } => {
                    engine
                        .writes_done(&mut batch, plan, outcome)
                        .unwrap_or_else(|e| fatal(&e));
                    write_back_in_flight = false;
                    plan_needed = true;
                }
                CoreRequest::Stats { reply } => {
                    let _ = reply.send(engine.stats().clone());
                }
            }
        }
        let appended = if batch.is_empty() {
            Vec::new()
        } else {
            outputs.commits.fetch_add(1, Ordering::Relaxed);
            engine.store().commit(batch).unwrap_or_else(|e| fatal(&e))
        };
        for reply in replies {
            reply();
        }
        if !appended.is_empty() {
            outputs
                .log_version
                .send_modify(|version| *version += appended.len() as u64);
        }
    }
}
