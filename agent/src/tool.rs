//! The local tool's loop: capture and write-back, as a sans-IO [`ToolLoop`] that the
//! tool thread ([`run`]) and the simulator drive alike.
//!
//! The loop captures whenever the tool commits (the thread polls `PRAGMA
//! data_version` every [`CAPTURE_POLL_US`]), hands each batch to the core, and trims
//! the outbox only behind a cursor the core made durable. Captures never cross the
//! end of a rescan. When the core's write-back plan arrives, the loop tells the
//! connector which records changed since the capture the plan was made from (those
//! it captured itself, whose outbox entries may be trimmed); the connector adds the
//! ones still in its outbox, and refuses those records as stale, one by one. After
//! a stale refusal the loop captures before it reports the outcome, so the core
//! plans again from what the tool now holds.

use std::collections::{HashSet, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

use connectors::sqlite::{CaptureBatch, OpOutcome, SqliteConnector, SqliteError, WriteOp};
use tokio::sync::oneshot;

use crate::core::{CoreHandle, CoreRequest, CoreStopped};
use crate::engine::WritePlan;

/// How often the connector checks the tool for new commits while it is busy.
pub const CAPTURE_POLL_US: u64 = 250;
/// How often it checks once nothing happened for [`CAPTURE_BUSY_WINDOW_MS`]: an idle
/// agent wakes 500 times a second instead of 4,000.
pub const CAPTURE_POLL_IDLE_US: u64 = 2_000;
/// How long after the last capture or write-back the connector counts as busy.
pub const CAPTURE_BUSY_WINDOW_MS: u64 = 2_000;
/// Outbox entries captured in one batch at most.
pub const CAPTURE_BATCH_MAX: usize = 1024;
/// Captured outbox entries that trigger a trim of the outbox.
pub const OUTBOX_TRIM_EVERY: u64 = 256;
/// Longest wait before retrying after the tool failed.
pub const TOOL_RETRY_DELAY_MAX_MS: u64 = 5_000;
/// Records remembered as captured after the last plan's cursor, at most. Beyond it
/// the oldest are forgotten, and a plan older than them is refused whole as stale.
pub const CAPTURED_KEYS_REMEMBERED_MAX: usize = 16_384;

/// A (collection, key) pair naming one record of the tool.
pub type RecordKey = (String, String);

/// What the next capture reads: outbox entries after `after`, up to `upto`, at most `max`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CaptureBounds {
    /// The last outbox seq already captured.
    pub after: u64,
    /// The last outbox seq this capture may read (the end of a rescan, or `u64::MAX`).
    pub upto: u64,
    /// Entries at most.
    pub max: usize,
}

/// The tool loop's state and decisions, without threads or IO.
#[derive(Debug)]
pub struct ToolLoop {
    /// The outbox seq captured and durable in the store.
    cursor: u64,
    /// The outbox seq trimmed.
    trimmed: u64,
    /// The end of the tool's rescan entries, which a capture must not cross.
    rescan_upto: u64,
    /// Capture even if the tool reports no new commit.
    force: bool,
    /// Cursors of captured batches handed to the core and not durable yet, in order.
    in_flight: VecDeque<u64>,
    /// Records captured, by the cursor of their batch, since the last plan's cursor.
    recent: VecDeque<(u64, Vec<RecordKey>)>,
    /// Records in `recent`.
    recent_len: usize,
    /// Batches up to this cursor were forgotten from `recent`.
    forgotten_upto: u64,
}

impl ToolLoop {
    /// A loop whose durable capture cursor is `cursor`; the tool's rescan entries end
    /// at `rescan_upto` (0: none). It captures once at start, whatever the tool says.
    pub fn new(cursor: u64, rescan_upto: u64) -> ToolLoop {
        ToolLoop {
            cursor,
            trimmed: 0,
            rescan_upto,
            force: true,
            in_flight: VecDeque::new(),
            recent: VecDeque::new(),
            recent_len: 0,
            forgotten_upto: 0,
        }
    }

    /// The durable capture cursor.
    pub fn cursor(&self) -> u64 {
        self.cursor
    }

    /// Whether to capture now, given whether the tool committed since the last look.
    pub fn wants_capture(&self, changed: bool) -> bool {
        changed || self.force
    }

    /// The bounds of the next capture: after what was read last, never across the
    /// end of the rescan (whatever gap of trimmed entries lies before it).
    pub fn capture_bounds(&self) -> CaptureBounds {
        let after = self.in_flight.back().copied().unwrap_or(self.cursor);
        let upto = if after < self.rescan_upto {
            self.rescan_upto
        } else {
            u64::MAX
        };
        CaptureBounds {
            after,
            upto,
            max: CAPTURE_BATCH_MAX,
        }
    }

    /// A capture read `batch`. Returns true when it must go to the core (then call
    /// [`ToolLoop::durable`] once the core committed it); false when the outbox held
    /// nothing new: the loop is caught up.
    pub fn captured(&mut self, batch: &CaptureBatch) -> bool {
        let bounds = self.capture_bounds();
        if batch.cursor == bounds.after {
            self.force = false;
            return false;
        }
        debug_assert!(batch.cursor > bounds.after && batch.cursor <= bounds.upto);
        let keys: Vec<RecordKey> = batch
            .changes
            .iter()
            .map(|c| (c.collection.clone(), c.key.clone()))
            .collect();
        self.recent_len += keys.len();
        self.recent.push_back((batch.cursor, keys));
        while self.recent_len > CAPTURED_KEYS_REMEMBERED_MAX {
            let Some((cursor, keys)) = self.recent.pop_front() else {
                break;
            };
            self.recent_len -= keys.len();
            self.forgotten_upto = cursor;
        }
        self.in_flight.push_back(batch.cursor);
        true
    }

    /// The oldest capture handed to the core is durable.
    pub fn durable(&mut self) {
        if let Some(cursor) = self.in_flight.pop_front() {
            debug_assert!(cursor > self.cursor, "the capture cursor went backwards");
            self.cursor = cursor;
        }
    }

    /// The outbox seq to trim up to, if a trim is due; `drained` says whether the
    /// outbox holds nothing after the durable cursor.
    pub fn trim_due(&self, drained: bool) -> Option<u64> {
        let due = self.cursor > self.trimmed
            && (self.cursor - self.trimmed >= OUTBOX_TRIM_EVERY || drained);
        due.then_some(self.cursor)
    }

    /// The outbox was trimmed up to `upto`.
    pub fn trimmed(&mut self, upto: u64) {
        self.trimmed = self.trimmed.max(upto);
    }

    /// The records captured after `captured_upto` (a plan's cursor): a plan must not
    /// write them. `None` when some of them were forgotten: refuse the whole plan.
    pub fn changed_since(&self, captured_upto: u64) -> Option<HashSet<RecordKey>> {
        if captured_upto < self.forgotten_upto {
            return None;
        }
        Some(
            self.recent
                .iter()
                .filter(|(cursor, _)| *cursor > captured_upto)
                .flat_map(|(_, keys)| keys.iter().cloned())
                .collect(),
        )
    }

    /// A plan made at `captured_upto` was written: later plans are made at that
    /// cursor or after, so records captured up to it need not be remembered.
    /// `any_stale` says whether it refused some records as stale: then capture first.
    pub fn plan_done(&mut self, captured_upto: u64, any_stale: bool) {
        while let Some((cursor, keys)) = self.recent.front() {
            if *cursor > captured_upto {
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

/// Runs until `stop` is set or the core stops.
pub fn run(
    mut connector: SqliteConnector,
    core: CoreHandle,
    plans: Receiver<WritePlan>,
    mut state: ToolLoop,
    stop: Arc<AtomicBool>,
) {
    let mut delay_ms = 10;
    let mut last_busy = Instant::now();
    while !stop.load(Ordering::Relaxed) {
        let poll = if last_busy.elapsed() < Duration::from_millis(CAPTURE_BUSY_WINDOW_MS) {
            Duration::from_micros(CAPTURE_POLL_US)
        } else {
            Duration::from_micros(CAPTURE_POLL_IDLE_US)
        };
        match step(&mut connector, &core, &plans, &mut state, poll) {
            Ok(busy) => {
                delay_ms = 10;
                if busy {
                    last_busy = Instant::now();
                }
            }
            Err(StepError::Core(_)) => return,
            Err(StepError::Tool(e)) => {
                state.failed();
                tracing::error!(error = %e, retry_in_ms = delay_ms, "the tool failed; retrying");
                std::thread::sleep(Duration::from_millis(delay_ms));
                delay_ms = (delay_ms * 2).min(TOOL_RETRY_DELAY_MAX_MS);
            }
        }
    }
}

#[derive(Debug, thiserror::Error)]
enum StepError {
    #[error(transparent)]
    Tool(#[from] SqliteError),
    #[error(transparent)]
    Core(#[from] CoreStopped),
}

/// One round: capture what is new, trim, run a plan if one comes within `poll`.
/// Returns whether anything happened.
fn step(
    connector: &mut SqliteConnector,
    core: &CoreHandle,
    plans: &Receiver<WritePlan>,
    state: &mut ToolLoop,
    poll: Duration,
) -> Result<bool, StepError> {
    let mut busy = false;
    if state.wants_capture(connector.changed()?) {
        capture_all(connector, core, state)?;
        busy = true;
    }
    // Whether the outbox is drained is only asked when that alone would decide.
    let due = match state.trim_due(false) {
        Some(upto) => Some(upto),
        None if state.trim_due(true).is_some() => {
            let drained = connector.outbox_head()? == state.cursor();
            state.trim_due(drained)
        }
        None => None,
    };
    if let Some(upto) = due {
        connector.trim_outbox(upto)?;
        state.trimmed(upto);
    }
    match plans.recv_timeout(poll) {
        Ok(plan) => {
            write_back(connector, core, state, plan)?;
            busy = true;
        }
        Err(RecvTimeoutError::Timeout) => {}
        Err(RecvTimeoutError::Disconnected) => return Err(CoreStopped.into()),
    }
    Ok(busy)
}

/// Runs a plan and reports the outcome; records changed since its capture are
/// refused as stale, and are captured before the outcome goes back.
fn write_back(
    connector: &mut SqliteConnector,
    core: &CoreHandle,
    state: &mut ToolLoop,
    plan: WritePlan,
) -> Result<(), StepError> {
    let ops: Vec<WriteOp> = plan.writes.iter().map(|w| w.op.clone()).collect();
    let outcomes = match state.changed_since(plan.captured_upto) {
        Some(changed) => match connector.write_back(plan.captured_upto, &changed, &ops) {
            Ok(outcomes) => outcomes,
            Err(e) => {
                // Nothing was written: hand the plan back (its documents stay
                // pending) so the core plans again once the tool recovers.
                core.blocking_send(CoreRequest::WritesDone {
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
    state.plan_done(plan.captured_upto, stale > 0);
    if stale > 0 {
        capture_all(connector, core, state)?;
    }
    core.blocking_send(CoreRequest::WritesDone {
        plan,
        outcomes: Some(outcomes),
    })?;
    Ok(())
}

/// Captures everything in the outbox past the cursor, waiting for each batch to be
/// durable.
fn capture_all(
    connector: &mut SqliteConnector,
    core: &CoreHandle,
    state: &mut ToolLoop,
) -> Result<(), StepError> {
    loop {
        let bounds = state.capture_bounds();
        let batch = connector.capture(bounds.after, bounds.upto, bounds.max)?;
        if !state.captured(&batch) {
            return Ok(());
        }
        tracing::debug!(
            changes = batch.changes.len(),
            cursor = batch.cursor,
            "captured"
        );
        let (reply, done) = oneshot::channel();
        core.blocking_send(CoreRequest::Capture { batch, reply })?;
        done.blocking_recv().map_err(|_| CoreStopped)?;
        state.durable();
    }
}

#[cfg(test)]
mod tests {
    use connectors::sqlite::CapturedChange;

    use super::*;

    fn batch(cursor: u64, keys: &[&str]) -> CaptureBatch {
        CaptureBatch {
            changes: keys
                .iter()
                .map(|key| CapturedChange {
                    collection: "c".to_owned(),
                    key: (*key).to_owned(),
                    state: connectors::sqlite::RowState::Absent,
                })
                .collect(),
            cursor,
        }
    }

    /// Regression: the rescan boundary was crossed when a wiped store's outbox
    /// started after a gap of trimmed entries, because the batch size came from seq
    /// arithmetic (`rescan_upto - cursor`). The bound is the seq itself.
    #[test]
    fn a_capture_never_crosses_the_end_of_the_rescan() {
        let mut state = ToolLoop::new(0, 600);
        assert_eq!(
            state.capture_bounds(),
            CaptureBounds {
                after: 0,
                upto: 600,
                max: CAPTURE_BATCH_MAX
            }
        );
        assert!(state.captured(&batch(600, &["a"])));
        state.durable();
        assert_eq!(state.capture_bounds().upto, u64::MAX);
    }

    #[test]
    fn records_captured_after_a_plan_are_stale_for_it() {
        let mut state = ToolLoop::new(10, 0);
        assert!(state.captured(&batch(12, &["a"])));
        state.durable();
        assert!(state.captured(&batch(15, &["b"])));
        state.durable();
        let changed = state.changed_since(12).expect("remembered");
        assert_eq!(changed, HashSet::from([("c".to_owned(), "b".to_owned())]));
        assert_eq!(state.changed_since(10).map(|c| c.len()), Some(2));
        state.plan_done(12, false);
        assert_eq!(state.changed_since(12).map(|c| c.len()), Some(1));
        assert!(!state.captured(&batch(15, &[])), "nothing new: caught up");
    }

    #[test]
    fn a_plan_older_than_what_is_remembered_is_refused_whole() {
        let mut state = ToolLoop::new(0, 0);
        let keys: Vec<String> = (0..CAPTURED_KEYS_REMEMBERED_MAX)
            .map(|i| i.to_string())
            .collect();
        let keys: Vec<&str> = keys.iter().map(String::as_str).collect();
        assert!(state.captured(&batch(1, &keys)));
        state.durable();
        assert!(state.captured(&batch(2, &["one more"])));
        state.durable();
        assert!(state.changed_since(0).is_none());
        assert!(state.changed_since(1).is_some());
    }
}
