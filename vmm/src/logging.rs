//! Rate limits for log lines a guest can trigger at will (a ring placed in
//! protected memory at every DRIVER_OK, MSI-X programming that KVM refuses,
//! ...): each call site may log `BURST` lines per `WINDOW`; the lines it held
//! back are counted and reported with the next line it logs. See
//! `docs/logging.md` for what each level means.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

/// Lines one call site may log per window.
pub const BURST: u64 = 10;
/// The window, in milliseconds.
pub const WINDOW_MS: u64 = 5_000;

fn now_ms() -> u64 {
    static START: OnceLock<Instant> = OnceLock::new();
    u64::try_from(START.get_or_init(Instant::now).elapsed().as_millis()).unwrap_or(u64::MAX)
}

/// The state of one call site: lock-free, so logging from a vCPU never waits.
pub struct LogLimiter {
    /// Start of the current window (ms since the first limited line), plus one (0: none yet).
    window: AtomicU64,
    logged: AtomicU64,
    suppressed: AtomicU64,
}

impl Default for LogLimiter {
    fn default() -> Self {
        Self::new()
    }
}

impl LogLimiter {
    pub const fn new() -> Self {
        LogLimiter { window: AtomicU64::new(0), logged: AtomicU64::new(0), suppressed: AtomicU64::new(0) }
    }

    /// Whether to log a line now: `Some(n)` with the lines suppressed since
    /// the last one logged, or `None` (the line is counted).
    pub fn admit(&self) -> Option<u64> {
        self.admit_at(now_ms())
    }

    fn admit_at(&self, now: u64) -> Option<u64> {
        let window = self.window.load(Ordering::Acquire);
        if window == 0 || now.saturating_sub(window - 1) >= WINDOW_MS {
            // A new window; one thread wins the reset, the others count in it.
            if self.window.compare_exchange(window, now.saturating_add(1), Ordering::AcqRel, Ordering::Acquire).is_ok()
            {
                self.logged.store(0, Ordering::Release);
            }
        }
        if self.logged.fetch_add(1, Ordering::AcqRel) < BURST {
            Some(self.suppressed.swap(0, Ordering::AcqRel))
        } else {
            self.suppressed.fetch_add(1, Ordering::AcqRel);
            None
        }
    }
}

/// `log::warn!` (or another level) limited per call site:
/// `rate_limited!(warn, "{dev}: ring in protected memory")`.
#[macro_export]
macro_rules! rate_limited {
    ($level:ident, $($arg:tt)+) => {{
        static LIMITER: $crate::logging::LogLimiter = $crate::logging::LogLimiter::new();
        if let Some(suppressed) = LIMITER.admit() {
            if suppressed > 0 {
                log::$level!("{suppressed} similar messages suppressed");
            }
            log::$level!($($arg)+);
        }
    }};
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_is_logged_then_lines_are_counted_until_the_next_window() {
        let limiter = LogLimiter::new();
        let admitted = (0..100).filter(|_| limiter.admit_at(1_000).is_some()).count();
        assert_eq!(admitted as u64, BURST);
        // The next window logs again and reports what was held back.
        assert_eq!(limiter.admit_at(1_000 + WINDOW_MS), Some(100 - BURST));
        assert_eq!(limiter.admit_at(1_000 + WINDOW_MS), Some(0));
    }

    #[test]
    fn the_first_line_at_time_zero_is_logged() {
        let limiter = LogLimiter::new();
        assert_eq!(limiter.admit_at(0), Some(0));
    }
}
