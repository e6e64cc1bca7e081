//! Logging helpers: a limiter for lines that would otherwise repeat endlessly.

use std::collections::HashMap;
use std::time::{Duration, Instant};

/// How often one kind of repeated line is logged at most.
pub const REPEAT_LOG_INTERVAL_MS: u64 = 60_000;
/// Kinds of repeated lines remembered at most; the oldest are forgotten beyond it.
pub const REPEAT_LOG_KINDS_MAX: usize = 1024;

/// Lets a repeated log line through once per [`REPEAT_LOG_INTERVAL_MS`] per key, and
/// counts the ones held back.
#[derive(Debug, Default)]
pub struct RepeatLimiter {
    seen: HashMap<String, (Instant, u64)>,
}

impl RepeatLimiter {
    /// Whether the line of `key` may be logged at `now`: `Some(n)` with the number of
    /// lines of that key held back since the last one logged, or `None`.
    pub fn allow(&mut self, key: String, now: Instant) -> Option<u64> {
        let interval = Duration::from_millis(REPEAT_LOG_INTERVAL_MS);
        if let Some((last, held)) = self.seen.get_mut(&key) {
            if now.duration_since(*last) < interval {
                *held += 1;
                return None;
            }
            let suppressed = *held;
            *last = now;
            *held = 0;
            return Some(suppressed);
        }
        if self.seen.len() >= REPEAT_LOG_KINDS_MAX {
            self.seen
                .retain(|_, (last, _)| now.duration_since(*last) < interval);
            if self.seen.len() >= REPEAT_LOG_KINDS_MAX {
                self.seen.clear();
            }
        }
        self.seen.insert(key, (now, 0));
        Some(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_repeated_line_passes_once_per_interval_with_the_count_held_back() {
        let mut limiter = RepeatLimiter::default();
        let start = Instant::now();
        assert_eq!(limiter.allow("a".into(), start), Some(0));
        for i in 1..=1000 {
            assert_eq!(
                limiter.allow("a".into(), start + Duration::from_millis(i)),
                None
            );
        }
        assert_eq!(
            limiter.allow("b".into(), start),
            Some(0),
            "other kinds pass"
        );
        let later = start + Duration::from_millis(REPEAT_LOG_INTERVAL_MS);
        assert_eq!(limiter.allow("a".into(), later), Some(1000));
    }
}
