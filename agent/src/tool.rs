//! The thread that drives the local tool's connector: capture and write-back.
//!
//! It captures whenever the tool commits (polling `PRAGMA data_version` every
//! [`CAPTURE_POLL_US`]), hands each batch to the core and waits until it is durable
//! before trimming the outbox. It runs the core's write-back plans, refusing a plan
//! made before the latest user edit was captured: then it captures first and the
//! core plans again, so the agent never overwrites an edit it has not seen.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

use connectors::sqlite::{SqliteConnector, SqliteError, WriteOp, WriteOutcome};
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

/// Runs until `stop` is set or the core stops.
pub fn run(
    mut connector: SqliteConnector,
    core: CoreHandle,
    plans: Receiver<WritePlan>,
    mut cursor: u64,
    rescan_upto: u64,
    stop: Arc<AtomicBool>,
) {
    let mut trimmed = 0u64;
    let mut delay_ms = 10;
    // The first step captures whatever the outbox holds from before a restart.
    let mut force = true;
    let mut last_busy = Instant::now();
    while !stop.load(Ordering::Relaxed) {
        let poll = if last_busy.elapsed() < Duration::from_millis(CAPTURE_BUSY_WINDOW_MS) {
            Duration::from_micros(CAPTURE_POLL_US)
        } else {
            Duration::from_micros(CAPTURE_POLL_IDLE_US)
        };
        let mut state = StepState {
            cursor: &mut cursor,
            trimmed: &mut trimmed,
            force,
            poll,
            rescan_upto,
        };
        match step(&mut connector, &core, &plans, &mut state) {
            Ok(busy) => {
                delay_ms = 10;
                force = false;
                if busy {
                    last_busy = Instant::now();
                }
            }
            Err(StepError::Core(_)) => return,
            Err(StepError::Tool(e)) => {
                // The failed step may have consumed the tool's change signal.
                force = true;
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

/// Where the loop stands between steps.
struct StepState<'a> {
    /// The outbox seq captured and durable.
    cursor: &'a mut u64,
    /// The outbox seq trimmed.
    trimmed: &'a mut u64,
    /// Capture even if the tool reports no new commit.
    force: bool,
    /// How long to wait for a plan.
    poll: Duration,
    /// The end of the tool's rescan entries, which a capture batch must not straddle.
    rescan_upto: u64,
}

/// One round: capture what is new, trim, run a plan if one comes within the poll.
/// Returns whether anything happened.
fn step(
    connector: &mut SqliteConnector,
    core: &CoreHandle,
    plans: &Receiver<WritePlan>,
    state: &mut StepState<'_>,
) -> Result<bool, StepError> {
    let (cursor, trimmed) = (&mut *state.cursor, &mut *state.trimmed);
    let mut busy = false;
    if connector.changed()? || state.force {
        capture_all(connector, core, cursor, state.rescan_upto)?;
        busy = true;
    }
    if *cursor > *trimmed
        && (*cursor - *trimmed >= OUTBOX_TRIM_EVERY || connector.outbox_head()? == *cursor)
    {
        connector.trim_outbox(*cursor)?;
        *trimmed = *cursor;
    }
    match plans.recv_timeout(state.poll) {
        Ok(plan) => {
            busy = true;
            let ops: Vec<WriteOp> = plan.writes.iter().map(|w| w.op.clone()).collect();
            let outcome = match connector.write_back(plan.captured_upto, &ops) {
                Ok(outcome) => outcome,
                Err(e) => {
                    // Nothing was written: hand the plan back (its documents stay
                    // pending) so the core plans again once the tool recovers.
                    let outcome = WriteOutcome::CaptureFirst;
                    core.blocking_send(CoreRequest::WritesDone { plan, outcome })?;
                    return Err(e.into());
                }
            };
            tracing::debug!(ops = ops.len(), ?outcome, "wrote back");
            if outcome == WriteOutcome::CaptureFirst {
                capture_all(connector, core, cursor, state.rescan_upto)?;
            }
            core.blocking_send(CoreRequest::WritesDone { plan, outcome })?;
        }
        Err(RecvTimeoutError::Timeout) => {}
        Err(RecvTimeoutError::Disconnected) => return Err(CoreStopped.into()),
    }
    Ok(busy)
}

/// Captures everything in the outbox past `cursor`, waiting for each batch to be durable.
fn capture_all(
    connector: &mut SqliteConnector,
    core: &CoreHandle,
    cursor: &mut u64,
    rescan_upto: u64,
) -> Result<(), StepError> {
    loop {
        let max = match rescan_upto.checked_sub(*cursor) {
            Some(left) if left > 0 => CAPTURE_BATCH_MAX.min(left as usize),
            _ => CAPTURE_BATCH_MAX,
        };
        let batch = connector.capture(*cursor, max)?;
        if batch.cursor == *cursor {
            return Ok(());
        }
        let next = batch.cursor;
        tracing::debug!(changes = batch.changes.len(), cursor = next, "captured");
        let (reply, done) = oneshot::channel();
        core.blocking_send(CoreRequest::Capture { batch, reply })?;
        done.blocking_recv().map_err(|_| CoreStopped)?;
        *cursor = next;
    }
}
