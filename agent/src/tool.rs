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
use std::time::Duration;

use connectors::sqlite::{SqliteConnector, SqliteError, WriteOp, WriteOutcome};
use tokio::sync::oneshot;

use crate::core::{CoreHandle, CoreRequest, CoreStopped};
use crate::engine::WritePlan;

/// How often the connector checks the tool for new commits (a check costs a few
/// microseconds: about 1% of a core).
pub const CAPTURE_POLL_US: u64 = 250;
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
    stop: Arc<AtomicBool>,
) {
    let mut trimmed = 0u64;
    let mut delay_ms = 10;
    // The first step captures whatever the outbox holds from before a restart.
    let mut force = true;
    while !stop.load(Ordering::Relaxed) {
        match step(
            &mut connector,
            &core,
            &plans,
            &mut cursor,
            &mut trimmed,
            force,
        ) {
            Ok(()) => {
                delay_ms = 10;
                force = false;
            }
            Err(StepError::Core(_)) => return,
            Err(StepError::Tool(e)) => {
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

fn step(
    connector: &mut SqliteConnector,
    core: &CoreHandle,
    plans: &Receiver<WritePlan>,
    cursor: &mut u64,
    trimmed: &mut u64,
    force: bool,
) -> Result<(), StepError> {
    if connector.changed()? || force {
        capture_all(connector, core, cursor)?;
    }
    if *cursor > *trimmed
        && (*cursor - *trimmed >= OUTBOX_TRIM_EVERY || connector.outbox_head()? == *cursor)
    {
        connector.trim_outbox(*cursor)?;
        *trimmed = *cursor;
    }
    match plans.recv_timeout(Duration::from_micros(CAPTURE_POLL_US)) {
        Ok(plan) => {
            let ops: Vec<WriteOp> = plan.writes.iter().map(|w| w.op.clone()).collect();
            let outcome = connector.write_back(plan.captured_upto, &ops)?;
            tracing::debug!(ops = ops.len(), ?outcome, "wrote back");
            if outcome == WriteOutcome::CaptureFirst {
                capture_all(connector, core, cursor)?;
            }
            core.blocking_send(CoreRequest::WritesDone { plan, outcome })?;
        }
        Err(RecvTimeoutError::Timeout) => {}
        Err(RecvTimeoutError::Disconnected) => return Err(CoreStopped.into()),
    }
    Ok(())
}

/// Captures everything in the outbox past `cursor`, waiting for each batch to be durable.
fn capture_all(
    connector: &mut SqliteConnector,
    core: &CoreHandle,
    cursor: &mut u64,
) -> Result<(), StepError> {
    loop {
        let batch = connector.capture(*cursor, CAPTURE_BATCH_MAX)?;
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
