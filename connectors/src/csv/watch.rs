//! Watching the folders of the synced files: an event for a file (or its lock file)
//! marks the file dirty at once, and wakes the agent once events have been quiet
//! for the debounce time.
//!
//! Folders are watched, not files: tools save by writing a new file and renaming it
//! over the old one, which a watch on the old file would not follow.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender};
use std::time::{Duration, Instant};

use notify::event::{AccessKind, AccessMode};
use notify::{Event, EventKind, RecommendedWatcher, RecursiveMode, Watcher};

use crate::contract::Wake;

/// Longest a stream of events delays the wake-up, in debounce times: a file written
/// to without pause is captured anyway.
const DEBOUNCE_ROUNDS_MAX: u32 = 10;

/// One watched file.
#[derive(Debug)]
pub(super) struct Target {
    /// The folder the file is in.
    pub(super) folder: PathBuf,
    /// The file's name.
    pub(super) name: String,
    /// Set when an event for the file or its lock file came.
    pub(super) dirty: Arc<AtomicBool>,
}

/// A running watch; dropping it stops the watch and its debounce thread.
pub(super) struct Watch {
    _watcher: RecommendedWatcher,
}

impl std::fmt::Debug for Watch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Watch").finish_non_exhaustive()
    }
}

/// Watches the folders of `targets`, calling `wake` after `debounce` of quiet
/// following events. Fails when a folder cannot be watched.
pub(super) fn start(
    targets: Vec<Target>,
    debounce: Duration,
    wake: Wake,
) -> Result<Watch, notify::Error> {
    // One pending signal is enough: the dirty flags say which files changed.
    let (signal, signals) = std::sync::mpsc::sync_channel::<()>(1);
    let mut folders: Vec<PathBuf> = targets.iter().map(|t| t.folder.clone()).collect();
    folders.sort();
    folders.dedup();
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<Event>| {
        on_event(&targets, &signal, event);
    })?;
    for folder in &folders {
        watcher.watch(folder, RecursiveMode::NonRecursive)?;
    }
    std::thread::Builder::new()
        .name("csv-watch".to_owned())
        .spawn(move || debounce_then_wake(&signals, debounce, &wake))
        .map_err(notify::Error::io)?;
    Ok(Watch { _watcher: watcher })
}

fn on_event(targets: &[Target], signal: &SyncSender<()>, event: notify::Result<Event>) {
    let mut hit = false;
    match event {
        Ok(event) => {
            if let EventKind::Access(kind) = event.kind
                && kind != AccessKind::Close(AccessMode::Write)
            {
                return;
            }
            for path in &event.paths {
                let Some(file_name) = path.file_name().map(|n| n.to_string_lossy()) else {
                    continue;
                };
                for target in targets {
                    if super::file::concerns(&file_name, &target.name) {
                        target.dirty.store(true, Ordering::Release);
                        hit = true;
                    }
                }
            }
        }
        Err(e) => {
            // Events may have been lost: every file is looked at again.
            tracing::debug!(error = %e, "file watch error");
            for target in targets {
                target.dirty.store(true, Ordering::Release);
            }
            hit = true;
        }
    }
    if hit {
        // Full: a wake-up is pending already. Disconnected: the watch is ending.
        let _ = signal.try_send(());
    }
}

/// Waits for a signal, then for `debounce` without one (at most
/// [`DEBOUNCE_ROUNDS_MAX`] debounce times), then wakes the agent; ends when the
/// watch is dropped.
fn debounce_then_wake(signals: &Receiver<()>, debounce: Duration, wake: &Wake) {
    while signals.recv().is_ok() {
        let deadline = Instant::now() + debounce.saturating_mul(DEBOUNCE_ROUNDS_MAX);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            match signals.recv_timeout(debounce.min(left)) {
                Ok(()) => {}
                Err(RecvTimeoutError::Timeout) => break,
                Err(RecvTimeoutError::Disconnected) => return,
            }
        }
        wake();
    }
}
