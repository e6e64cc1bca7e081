//! A tool's loop: capture and write-back, as a sans-IO [`ToolLoop`] that the tool
//! thread ([`run`]) and the simulator drive alike.
//!
//! The loop captures whenever the connector says the tool changed (it waits on the
//! connector's push signal, or polls at the interval the connector names), hands
//! each batch to the core, and acknowledges a cursor to the connector only once the
//! core made it durable. When the core's write-back plan arrives, the loop tells the
//! connector which records it captured since the capture the plan was made from
//! (the tool may have forgotten them); the connector adds the ones it still knows
//! of, and refuses those records as stale, one by one. The loop reports the outcome
//! at once (so the links of inserted rows are known before a capture sees them)
//! and, after a stale refusal, captures at its next step, so the core plans again
//! from what the tool now holds.
//!
//! Cursors are the connector's opaque bytes, so the loop numbers its captures
//! itself ("marks", restarting with the process) to know which came after a plan.

use std::collections::{HashSet, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender};
use std::time::{Duration, Instant};

use connectors::{
    CaptureBatch, ChangeFeed, Connector, ConnectorError, Cursor, OpOutcome, RecordKey, WriteOp,
};
use tokio::sync::oneshot;

use crate::core::{CoreHandle, CoreRequest, CoreStopped, ToolEvent};
use crate::engine::{ToolIx, WritePlan};
use crate::progress::Progress;
use crate::telemetry::Telemetry;

/// How long after the last capture that found changes a polled tool counts as busy
/// (it is polled at the connector's busy interval, then at its idle one). A
/// write-back does not count: it is the agent's own work, not the tool's users',
/// and every agent of a mesh writes each change back.
pub const CAPTURE_BUSY_WINDOW_MS: u64 = 2_000;
/// Changes captured in one batch at most.
pub const CAPTURE_BATCH_MAX: usize = 1024;
/// Batches captured in a row at most before the loop looks at its plans: a tool
/// that commits faster than the agent captures never holds write-back up.
pub const CAPTURE_BATCHES_PER_STEP_MAX: usize = 16;
/// Longest wait before retrying after the tool failed.
pub const TOOL_RETRY_DELAY_MAX_MS: u64 = 5_000;
/// Records remembered as captured after the last plan's capture, at most. Beyond it
/// the oldest are forgotten, and a plan older than them is refused whole as stale.
pub const CAPTURED_KEYS_REMEMBERED_MAX: usize = 16_384;

/// The tool loop's state and decisions, without threads or IO.
#[derive(Debug)]
pub struct ToolLoop {
    /// The capture cursor durable in the store.
    cursor: Cursor,
    /// Capture even if the tool reports no change.
    force: bool,
    /// The mark the next capture gets.
    next_mark: u64,
    /// Captured batches handed to the core and not durable yet, in order: mark and
    /// cursor.
    in_flight: VecDeque<(u64, Cursor)>,
    /// Records captured, by the mark of their batch, since the last plan's mark.
    recent: VecDeque<(u64, Vec<RecordKey>)>,
    /// Records in `recent`.
    recent_len: usize,
    /// Batches up to this mark were forgotten from `recent`.
    forgotten_upto: u64,
    /// Once a capture found nothing new since the loop started, the mark of the
    /// last capture before that: everything the tool held at start (an initial
    /// import) is in the captures up to it.
    start_captured: Option<u64>,
}

impl ToolLoop {
    /// A loop whose durable capture cursor is `cursor`. It captures once at start,
    /// whatever the tool says.
    pub fn new(cursor: Cursor) -> ToolLoop {
        ToolLoop {
            cursor,
            force: true,
            next_mark: 1,
            in_flight: VecDeque::new(),
            recent: VecDeque::new(),
            recent_len: 0,
            forgotten_upto: 0,
            start_captured: None,
        }
    }

    /// The durable capture cursor.
    pub fn cursor(&self) -> &Cursor {
        &self.cursor
    }

    /// Whether to capture now, given whether the tool changed since the last look.
    pub fn wants_capture(&self, changed: bool) -> bool {
        changed || self.force
    }

    /// Where the next capture starts: after what was read last.
    pub fn capture_after(&self) -> &Cursor {
        self.in_flight
            .back()
            .map_or(&self.cursor, |(_, cursor)| cursor)
    }

    /// A capture read `batch`. Returns its mark when it must go to the core (then
    /// call [`ToolLoop::durable`] once the core committed it); `None` when the tool
    /// held nothing new: the loop is caught up.
    pub fn captured(&mut self, batch: &CaptureBatch) -> Option<u64> {
        if batch.cursor == *self.capture_after() {
            debug_assert!(batch.changes.is_empty(), "changes without a new cursor");
            self.force = false;
            self.start_captured.get_or_insert(self.next_mark - 1);
            return None;
        }
        let mark = self.next_mark;
        self.next_mark += 1;
        // A key change counts for the old key too: a plan must not write it.
        let keys: Vec<RecordKey> = batch
            .changes
            .iter()
            .flat_map(|c| {
                let moved = c
                    .previous_key
                    .as_ref()
                    .map(|old| (c.collection.clone(), old.clone()));
                std::iter::once((c.collection.clone(), c.key.clone())).chain(moved)
            })
            .collect();
        self.recent_len += keys.len();
        self.recent.push_back((mark, keys));
        while self.recent_len > CAPTURED_KEYS_REMEMBERED_MAX {
            let Some((mark, keys)) = self.recent.pop_front() else {
                break;
            };
            self.recent_len -= keys.len();
            self.forgotten_upto = mark;
        }
        self.in_flight.push_back((mark, batch.cursor.clone()));
        Some(mark)
    }

    /// The oldest capture handed to the core is durable; returns its cursor, which
    /// the connector may now be told.
    pub fn durable(&mut self) -> &Cursor {
        if let Some((_, cursor)) = self.in_flight.pop_front() {
            self.cursor = cursor;
        }
        &self.cursor
    }

    /// The records captured after the capture numbered `mark` (a plan's): a plan
    /// must not write them. `None` when some of them were forgotten, or when the
    /// plan was made before everything the tool held at start was captured (a new
    /// record could be one the tool already holds, uncaptured, under a natural
    /// key): refuse the whole plan.
    pub fn changed_since(&self, mark: u64) -> Option<HashSet<RecordKey>> {
        let before_start = self.start_captured.is_none_or(|start| mark < start);
        if mark < self.forgotten_upto || before_start {
            return None;
        }
        Some(
            self.recent
                .iter()
                .filter(|(m, _)| *m > mark)
                .flat_map(|(_, keys)| keys.iter().cloned())
                .collect(),
        )
    }

    /// A plan made at `mark` was written: later plans are made at that mark or
    /// after, so records captured up to it need not be remembered. `any_stale` says
    /// whether it refused some records as stale: then capture first.
    pub fn plan_done(&mut self, mark: u64, any_stale: bool) {
        while let Some((m, keys)) = self.recent.front() {
            if *m > mark {
                break;
            }
            self.recent_len -= keys.len();
            self.recent.pop_front();
        }
        self.force |= any_stale;
    }

    /// The tool failed: the failed step may have consumed its change signal.
    pub fn failed(&mut self) {
        self.force = true;
    }
}

/// Every op of a plan refused as stale (the plan is older than what is remembered).
pub fn all_stale(ops: usize) -> Vec<OpOutcome> {
    vec![OpOutcome::Stale; ops]
}

/// One tool's thread: its connector, the core, and the events it waits on.
#[derive(Debug)]
pub struct ToolThread {
    /// The tool's index among the agent's tools.
    pub tool: ToolIx,
    /// The tool's name, for logs.
    pub name: String,
    /// The connector.
    pub connector: Box<dyn Connector>,
    /// The core.
    pub core: CoreHandle,
    /// Plans from the core and wake-ups from the connector.
    pub events: Receiver<ToolEvent>,
    /// Where wake-ups are sent.
    pub wake: SyncSender<ToolEvent>,
    /// Where the tool's health is reported.
    pub telemetry: Arc<Telemetry>,
}

/// Runs until `stop` is set or the core stops.
pub fn run(thread: ToolThread, mut state: ToolLoop, stop: Arc<AtomicBool>) {
    let ToolThread {
        tool,
        name,
        mut connector,
        core,
        events,
        wake,
        telemetry,
    } = thread;
    let _span = tracing::info_span!("tool", tool = %name).entered();
    let health = telemetry.tool(tool);
    let mut import = start_import(connector.as_mut(), &state, &name);
    // A wake-up is queued only when none is: they coalesce, and the queue stays bounded.
    let woken = Arc::new(AtomicBool::new(false));
    let on_wake = {
        let woken = woken.clone();
        Arc::new(move || {
            if !woken.swap(true, Ordering::AcqRel) {
                let _ = wake.try_send(ToolEvent::Wake);
            }
        })
    };
    let feed = connector.change_feed();
    let mut delay_ms = 10;
    let mut subscribed = false;
    let mut last_busy = Instant::now();
    let io = Io {
        tool,
        core: &core,
        events: &events,
    };
    while !stop.load(Ordering::Relaxed) {
        if !subscribed {
            // Tried once per start and after each tool failure: without a
            // subscription the loop still polls at the feed's interval.
            subscribed = true;
            if let Err(e) = connector.subscribe(on_wake.clone()) {
                tracing::warn!(error = %e, "cannot subscribe to the tool's changes; polling");
            }
        }
        let wait = match feed {
            ChangeFeed::Push { fallback } => fallback,
            ChangeFeed::Poll { interval, idle } => {
                if last_busy.elapsed() < Duration::from_millis(CAPTURE_BUSY_WINDOW_MS) {
                    interval
                } else {
                    idle
                }
            }
        };
        match step(
            connector.as_mut(),
            &io,
            &mut state,
            wait,
            &woken,
            &mut import,
        ) {
            Ok(busy) => {
                if !health.reachable() {
                    tracing::info!("the tool is reachable again");
                    telemetry.note("tool", format!("tool `{name}` is reachable again"));
                }
                health.ok();
                delay_ms = 10;
                if busy {
                    last_busy = Instant::now();
                }
            }
            Err(StepError::Core(_)) => return,
            Err(StepError::Tool(e)) => {
                if health.reachable() {
                    telemetry.note("tool", format!("tool `{name}` failed: {e}"));
                }
                health.failed(&e.to_string());
                state.failed();
                subscribed = false;
                tracing::error!(error = %e, retry_in_ms = delay_ms, "the tool failed; retrying");
                std::thread::sleep(Duration::from_millis(delay_ms));
                delay_ms = (delay_ms * 2).min(TOOL_RETRY_DELAY_MAX_MS);
            }
        }
    }
}

/// What a step talks to besides the connector.
struct Io<'a> {
    tool: ToolIx,
    core: &'a CoreHandle,
    events: &'a Receiver<ToolEvent>,
}

#[derive(Debug, thiserror::Error)]
enum StepError {
    #[error(transparent)]
    Tool(#[from] ConnectorError),
    #[error(transparent)]
    Core(#[from] CoreStopped),
}

/// One round: capture what is new, then run a plan if one comes within `wait`.
/// Returns whether the tool had changes to capture.
fn step(
    connector: &mut dyn Connector,
    io: &Io<'_>,
    state: &mut ToolLoop,
    wait: Duration,
    woken: &AtomicBool,
    import: &mut Option<Progress>,
) -> Result<bool, StepError> {
    let mut busy = false;
    let mut wait = wait;
    if state.wants_capture(connector.changed()?) {
        let progress = capture_all(connector, io, state, import)?;
        busy |= progress.captured;
        if progress.caught_up
            && let Some(import) = import.take()
        {
            import.finish();
        }
        if !progress.caught_up {
            // More to capture: look at the plans without waiting, then go on.
            state.force = true;
            wait = Duration::ZERO;
        }
    }
    match io.events.recv_timeout(wait) {
        Ok(ToolEvent::Plan(plan)) => write_back(connector, io, state, plan)?,
        Ok(ToolEvent::Wake) => {
            woken.store(false, Ordering::Release);
            state.force = true;
        }
        Err(RecvTimeoutError::Timeout) => {}
        Err(RecvTimeoutError::Disconnected) => return Err(CoreStopped.into()),
    }
    Ok(busy)
}

/// The progress of capturing what the tool holds at start, when that is a lot: all
/// of it on a first import, what changed while the agent was away otherwise.
fn start_import(connector: &mut dyn Connector, state: &ToolLoop, name: &str) -> Option<Progress> {
    let backlog = match connector.backlog(state.cursor()) {
        Ok(backlog) => backlog?,
        Err(e) => {
            tracing::debug!(error = %e, "cannot tell how much there is to capture");
            return None;
        }
    };
    let what = if state.cursor().as_bytes().is_empty() {
        format!("first import from tool `{name}`")
    } else {
        format!("catching up with tool `{name}`")
    };
    Progress::start(what, backlog)
}

/// Runs a plan and reports the outcome; records changed since its capture are
/// refused as stale, and are captured before the outcome goes back.
fn write_back(
    connector: &mut dyn Connector,
    io: &Io<'_>,
    state: &mut ToolLoop,
    plan: WritePlan,
) -> Result<(), StepError> {
    let ops: Vec<WriteOp> = plan.writes.iter().map(|w| w.op.clone()).collect();
    let outcomes = match state.changed_since(plan.mark) {
        Some(changed) => match connector.write_back(&plan.captured, &changed, &ops) {
            Ok(outcomes) => outcomes,
            Err(e) => {
                // Nothing was written: hand the plan back (its documents stay
                // pending) so the core plans again once the tool recovers.
                io.core.blocking_send(CoreRequest::WritesDone {
                    plan,
                    outcomes: None,
                })?;
                return Err(e.into());
            }
        },
        None => all_stale(ops.len()),
    };
    let stale = outcomes.iter().filter(|o| **o == OpOutcome::Stale).count();
    tracing::debug!(ops = ops.len(), stale, "wrote back");
    // What the tool did goes to the core first, whatever happens next: the links
    // of inserted records must be known before any capture sees those rows, and a
    // failing capture must not leave the plan unreported. Stale records are
    // captured at the next step (`plan_done` asks for it); a plan made before that
    // refuses them again, as the tool still lists them.
    state.plan_done(plan.mark, stale > 0);
    io.core.blocking_send(CoreRequest::WritesDone {
        plan,
        outcomes: Some(outcomes),
    })?;
    Ok(())
}

/// What one round of capturing did.
struct Captured {
    /// Something was captured.
    captured: bool,
    /// The tool holds nothing more to capture (as of the last read).
    caught_up: bool,
}

/// Captures what is new, up to [`CAPTURE_BATCHES_PER_STEP_MAX`] batches, waiting
/// for each batch to be durable, then acknowledges the durable cursor to the
/// connector.
fn capture_all(
    connector: &mut dyn Connector,
    io: &Io<'_>,
    state: &mut ToolLoop,
    import: &mut Option<Progress>,
) -> Result<Captured, StepError> {
    let mut progress = Captured {
        captured: false,
        caught_up: false,
    };
    for _ in 0..CAPTURE_BATCHES_PER_STEP_MAX {
        let batch = connector.capture(state.capture_after(), CAPTURE_BATCH_MAX)?;
        let Some(mark) = state.captured(&batch) else {
            progress.caught_up = true;
            break;
        };
        progress.captured = true;
        if let Some(import) = import {
            import.advance(batch.changes.len() as u64);
        }
        tracing::debug!(
            changes = batch.changes.len(),
            rescan = batch.rescan,
            "captured"
        );
        let (reply, done) = oneshot::channel();
        io.core.blocking_send(CoreRequest::Capture {
            tool: io.tool,
            batch,
            mark,
            reply,
        })?;
        done.blocking_recv().map_err(|_| CoreStopped)?;
        state.durable();
    }
    if progress.captured {
        connector.acknowledge(state.cursor())?;
    }
    Ok(progress)
}

#[cfg(test)]
mod tests {
    use connectors::{CapturedChange, RowState};

    use super::*;

    fn batch(cursor: u64, keys: &[&str]) -> CaptureBatch {
        CaptureBatch {
            changes: keys
                .iter()
                .map(|key| CapturedChange {
                    collection: "c".to_owned(),
                    key: (*key).to_owned(),
                    previous_key: None,
                    state: RowState::Absent,
                })
                .collect(),
            cursor: Cursor(cursor.to_be_bytes().to_vec()),
            rescan: false,
        }
    }

    #[test]
    fn records_captured_after_a_plan_are_stale_for_it() {
        let mut state = ToolLoop::new(Cursor(10u64.to_be_bytes().to_vec()));
        assert_eq!(state.captured(&batch(10, &[])), None, "caught up");
        let first = state.captured(&batch(12, &["a"])).expect("new");
        state.durable();
        let second = state.captured(&batch(15, &["b"])).expect("new");
        state.durable();
        assert!(second > first);
        let changed = state.changed_since(first).expect("remembered");
        assert_eq!(changed, HashSet::from([("c".to_owned(), "b".to_owned())]));
        assert_eq!(state.changed_since(0).map(|c| c.len()), Some(2));
        state.plan_done(first, false);
        assert_eq!(state.changed_since(first).map(|c| c.len()), Some(1));
    }

    /// Regression (a record was inserted into a tool that already held it, not yet
    /// captured, under the same natural key): nothing is written into a tool before
    /// everything it held at start is captured.
    #[test]
    fn plans_are_refused_until_the_first_capture_is_caught_up() {
        let mut state = ToolLoop::new(Cursor::start());
        assert!(state.changed_since(0).is_none(), "nothing captured yet");
        let import = state.captured(&batch(4, &["a"])).expect("new");
        state.durable();
        assert!(state.changed_since(import).is_none(), "more may follow");
        assert_eq!(state.captured(&batch(4, &[])), None);
        assert!(
            state.changed_since(0).is_none(),
            "planned before the import"
        );
        assert_eq!(state.changed_since(import).map(|c| c.len()), Some(0));
    }

    #[test]
    fn a_capture_is_durable_only_once_the_core_says_so() {
        let mut state = ToolLoop::new(Cursor::start());
        state.captured(&batch(3, &["a"])).expect("new");
        assert_eq!(state.cursor(), &Cursor::start(), "not durable yet");
        assert_eq!(state.capture_after(), &Cursor(3u64.to_be_bytes().to_vec()));
        assert_eq!(state.durable(), &Cursor(3u64.to_be_bytes().to_vec()));
    }

    #[test]
    fn a_plan_older_than_what_is_remembered_is_refused_whole() {
        let mut state = ToolLoop::new(Cursor(0u64.to_be_bytes().to_vec()));
        assert_eq!(state.captured(&batch(0, &[])), None, "caught up");
        let keys: Vec<String> = (0..CAPTURED_KEYS_REMEMBERED_MAX)
            .map(|i| i.to_string())
            .collect();
        let keys: Vec<&str> = keys.iter().map(String::as_str).collect();
        let first = state.captured(&batch(1, &keys)).expect("new");
        state.durable();
        state.captured(&batch(2, &["one more"])).expect("new");
        state.durable();
        assert!(state.changed_since(0).is_none());
        assert!(state.changed_since(first).is_some());
    }
}
