//! Per-kind rate limiting of violation events, so a guest hammering a
//! protected page cannot flood the event monitor. A token bucket per kind;
//! the caller passes the time (any monotonic clock's reading since a fixed
//! start), so this stays clock-free and testable.

use std::time::Duration;

use crate::verdict::ViolationKind;

/// Default: 10 events per second per kind ...
pub const DEFAULT_EVENTS_PER_SECOND: u32 = 10;
/// ... with bursts of up to 10.
pub const DEFAULT_BURST: u32 = 10;

const NANOS_PER_SECOND: u64 = 1_000_000_000;

/// Whether to emit the event of one violation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Admission {
    /// Emit it; `suppressed_before` violations of this kind were held back
    /// since the last emitted one (report them as a summary first).
    Emit { suppressed_before: u64 },
    /// Count it only.
    Suppress,
}

#[derive(Clone, Copy, Debug, Default)]
struct Bucket {
    /// Credit in nanoseconds of refill time; one event costs `cost_ns`.
    credit_ns: u64,
    last: Option<Duration>,
    suppressed: u64,
}

/// Token buckets for every violation kind.
#[derive(Clone, Debug)]
pub struct EventRateLimiter {
    cost_ns: u64,
    capacity_ns: u64,
    buckets: [Bucket; ViolationKind::ALL.len()],
}

impl Default for EventRateLimiter {
    fn default() -> Self {
        EventRateLimiter::new(DEFAULT_EVENTS_PER_SECOND, DEFAULT_BURST)
    }
}

impl EventRateLimiter {
    /// `per_second` and `burst` are raised to at least 1.
    pub fn new(per_second: u32, burst: u32) -> Self {
        let cost_ns = NANOS_PER_SECOND / u64::from(per_second.max(1));
        EventRateLimiter { cost_ns, capacity_ns: cost_ns * u64::from(burst.max(1)), buckets: Default::default() }
    }

    /// Decides for one violation of `kind` at time `now`.
    pub fn admit(&mut self, kind: ViolationKind, now: Duration) -> Admission {
        let bucket = &mut self.buckets[kind.index()];
        bucket.credit_ns = match bucket.last {
            // The first event of a kind finds a full bucket.
            None => self.capacity_ns,
            // A clock read out of order refills nothing.
            Some(last) => {
                let elapsed = u64::try_from(now.saturating_sub(last).as_nanos()).unwrap_or(u64::MAX);
                bucket.credit_ns.saturating_add(elapsed).min(self.capacity_ns)
            }
        };
        bucket.last = Some(bucket.last.map_or(now, |last| last.max(now)));
        if bucket.credit_ns >= self.cost_ns {
            bucket.credit_ns -= self.cost_ns;
            Admission::Emit { suppressed_before: std::mem::take(&mut bucket.suppressed) }
        } else {
            bucket.suppressed += 1;
            Admission::Suppress
        }
    }

    /// Takes the per-kind counts still held back (for a summary at shutdown
    /// or on a timer), leaving them at zero.
    pub fn take_suppressed(&mut self) -> Vec<(ViolationKind, u64)> {
        ViolationKind::ALL
            .into_iter()
            .filter_map(|kind| {
                let held = std::mem::take(&mut self.buckets[kind.index()].suppressed);
                (held > 0).then_some((kind, held))
            })
            .collect()
    }
}

#[cfg(test)]
#[allow(clippy::arithmetic_side_effects)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    fn emitted(limiter: &mut EventRateLimiter, kind: ViolationKind, times: impl Iterator<Item = Duration>) -> usize {
        times.filter(|t| matches!(limiter.admit(kind, *t), Admission::Emit { .. })).count()
    }

    #[test]
    fn a_burst_passes_then_events_are_suppressed() {
        let mut limiter = EventRateLimiter::default();
        let at = Duration::from_secs(5);
        assert_eq!(emitted(&mut limiter, ViolationKind::Write, std::iter::repeat_n(at, 100)), 10);
    }

    #[test]
    fn a_sustained_flood_emits_ten_per_second() {
        let mut limiter = EventRateLimiter::default();
        // 1,000 violations a second from 0 s to 10 s: the burst plus 10/s.
        let n = emitted(&mut limiter, ViolationKind::Write, (0..=10_000).map(|i| i * MS));
        assert_eq!(n, 10 + 100);
    }

    #[test]
    fn the_next_emitted_event_carries_the_suppressed_count() {
        let mut limiter = EventRateLimiter::new(1, 1);
        assert_eq!(limiter.admit(ViolationKind::Msr, Duration::ZERO), Admission::Emit { suppressed_before: 0 });
        for i in 1..=4 {
            assert_eq!(limiter.admit(ViolationKind::Msr, i * 100 * MS), Admission::Suppress);
        }
        assert_eq!(limiter.admit(ViolationKind::Msr, 1000 * MS), Admission::Emit { suppressed_before: 4 });
        assert_eq!(limiter.admit(ViolationKind::Msr, 1001 * MS), Admission::Suppress);
        assert_eq!(limiter.take_suppressed(), vec![(ViolationKind::Msr, 1)]);
        assert!(limiter.take_suppressed().is_empty());
    }

    #[test]
    fn kinds_have_separate_buckets() {
        let mut limiter = EventRateLimiter::new(1, 1);
        assert!(matches!(limiter.admit(ViolationKind::Write, Duration::ZERO), Admission::Emit { .. }));
        assert_eq!(limiter.admit(ViolationKind::Write, Duration::ZERO), Admission::Suppress);
        assert!(matches!(limiter.admit(ViolationKind::DmaWrite, Duration::ZERO), Admission::Emit { .. }));
    }

    #[test]
    fn a_clock_going_backwards_grants_no_credit() {
        let mut limiter = EventRateLimiter::new(1, 1);
        assert!(matches!(limiter.admit(ViolationKind::Cr, Duration::from_secs(10)), Admission::Emit { .. }));
        assert_eq!(limiter.admit(ViolationKind::Cr, Duration::ZERO), Admission::Suppress);
        assert_eq!(limiter.admit(ViolationKind::Cr, Duration::from_millis(10_500)), Admission::Suppress);
        assert!(matches!(limiter.admit(ViolationKind::Cr, Duration::from_secs(11)), Admission::Emit { .. }));
    }
}
