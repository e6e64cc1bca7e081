//! Progress of long first steps (the first import of a tool's records, the first
//! sync with a peer): a bar with rate and time left on a terminal, a log line every
//! [`PROGRESS_LOG_INTERVAL_MS`] otherwise.
//!
//! Bars are drawn only when the process enabled them ([`enable_bars`]: `concord run`
//! with text logs on a terminal); log lines are then printed above the bars through
//! [`LogWriter`], so neither garbles the other.

use std::io::Write;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use indicatif::{MultiProgress, ProgressBar, ProgressStyle};

/// How often a progress line is logged when no bar is drawn.
pub const PROGRESS_LOG_INTERVAL_MS: u64 = 10_000;
/// Steps smaller than this many items show no progress (they end too soon to need it).
pub const PROGRESS_ITEMS_MIN: u64 = 1_000;

/// The bars of this process, if it draws any.
static BARS: OnceLock<MultiProgress> = OnceLock::new();

/// Draws progress bars on standard error from now on, if it is a terminal. Returns
/// whether bars will be drawn.
pub fn enable_bars() -> bool {
    let bars = MultiProgress::new();
    if bars.is_hidden() {
        return false;
    }
    BARS.set(bars).is_ok()
}

/// A log writer that prints above the progress bars (plain standard error when no
/// bar is drawn).
#[derive(Debug, Clone, Copy, Default)]
pub struct LogWriter;

impl Write for LogWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match BARS.get() {
            Some(bars) => bars.suspend(|| std::io::stderr().write_all(buf))?,
            None => std::io::stderr().write_all(buf)?,
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        std::io::stderr().flush()
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for LogWriter {
    type Writer = LogWriter;

    fn make_writer(&'a self) -> LogWriter {
        LogWriter
    }
}

/// The progress of one long step with a known size.
#[derive(Debug)]
pub struct Progress {
    what: String,
    total: u64,
    done: u64,
    started: Instant,
    last_line: Instant,
    bar: Option<ProgressBar>,
}

impl Progress {
    /// Starts showing the progress of `what` over `total` items, or returns `None`
    /// when there are too few to need it.
    pub fn start(what: String, total: u64) -> Option<Progress> {
        if total < PROGRESS_ITEMS_MIN {
            return None;
        }
        let bar = BARS.get().map(|bars| {
            let bar = bars.add(ProgressBar::new(total));
            let style = ProgressStyle::with_template(
                "{msg} {bar:30} {human_pos}/{human_len} {per_sec} eta {eta}",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar());
            bar.set_style(style);
            bar.set_message(what.clone());
            bar
        });
        tracing::info!(total, "{what}: started");
        let now = Instant::now();
        Some(Progress {
            what,
            total,
            done: 0,
            started: now,
            last_line: now,
            bar,
        })
    }

    /// `items` more are done.
    pub fn advance(&mut self, items: u64) {
        self.done += items;
        if let Some(bar) = &self.bar {
            bar.inc(items);
            return;
        }
        if self.last_line.elapsed() >= Duration::from_millis(PROGRESS_LOG_INTERVAL_MS) {
            self.last_line = Instant::now();
            let rate = self.rate();
            let left = self.total.saturating_sub(self.done);
            let eta_s = if rate > 0.0 { left as f64 / rate } else { 0.0 };
            tracing::info!(
                done = self.done,
                total = self.total,
                per_second = rate.round(),
                seconds_left = eta_s.round(),
                "{}: {}/{} ({:.0}/s, about {:.0} s left)",
                self.what,
                self.done,
                self.total,
                rate,
                eta_s
            );
        }
    }

    /// Items done so far.
    pub fn done(&self) -> u64 {
        self.done
    }

    /// The step ended: everything (or all there was) is done.
    pub fn finish(self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
        let seconds = self.started.elapsed().as_secs_f64();
        tracing::info!(
            done = self.done,
            seconds = (seconds * 10.0).round() / 10.0,
            per_second = self.rate().round(),
            "{}: done, {} in {:.1} s ({:.0}/s)",
            self.what,
            self.done,
            seconds,
            self.rate()
        );
    }

    fn rate(&self) -> f64 {
        let seconds = self.started.elapsed().as_secs_f64();
        if seconds > 0.0 {
            self.done as f64 / seconds
        } else {
            0.0
        }
    }
}
