//! Violation bookkeeping with heki's own parts: exact per-kind counters, the
//! last 1024 records for REST, and a per-kind token bucket so a guest
//! hammering a page cannot flood the event monitor.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::Instant;

use heki::{Admission, EventRateLimiter, ViolationCounters, ViolationKind, ViolationRecord};

/// How many violation records `vm.heki-violations` keeps.
pub const VIOLATION_LOG_SIZE: usize = 1024;

struct Inner {
    next_seq: u64,
    counts: ViolationCounters,
    log: VecDeque<ViolationRecord>,
    limiter: EventRateLimiter,
    suppressed_total: u64,
}

pub struct ViolationLog {
    inner: Mutex<Inner>,
    started: Instant,
}

impl Default for ViolationLog {
    fn default() -> Self {
        ViolationLog {
            inner: Mutex::new(Inner {
                next_seq: 0,
                counts: ViolationCounters::default(),
                log: VecDeque::new(),
                limiter: EventRateLimiter::default(),
                suppressed_total: 0,
            }),
            started: Instant::now(),
        }
    }
}

impl ViolationLog {
    fn inner(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Numbers and keeps a violation, and emits its event unless the kind is over its rate.
    pub fn record(&self, mut violation: ViolationRecord) {
        let admission = {
            let mut inner = self.inner();
            inner.next_seq += 1;
            violation.seq = inner.next_seq;
            inner.counts.record(violation.kind);
            if inner.log.len() == VIOLATION_LOG_SIZE {
                inner.log.pop_front();
            }
            inner.log.push_back(violation.clone());
            let admission = inner.limiter.admit(violation.kind, self.started.elapsed());
            if admission == Admission::Suppress {
                inner.suppressed_total += 1;
            }
            admission
        };
        if let Admission::Emit { suppressed_before } = admission {
            if suppressed_before > 0 {
                emit_suppressed(violation.kind, suppressed_before);
            }
            crate::events::emit("heki", "violation", &violation.properties());
        }
    }

    /// Reports what the rate limiter is still holding back (at shutdown).
    pub fn flush_suppressed(&self) {
        let pending = self.inner().limiter.take_suppressed();
        for (kind, count) in pending {
            emit_suppressed(kind, count);
        }
    }

    pub fn counts(&self) -> ViolationCounters {
        self.inner().counts
    }

    pub fn total(&self) -> u64 {
        self.inner().next_seq
    }

    pub fn suppressed_events(&self) -> u64 {
        self.inner().suppressed_total
    }

    pub fn recent(&self) -> Vec<ViolationRecord> {
        self.inner().log.iter().cloned().collect()
    }
}

fn emit_suppressed(kind: ViolationKind, count: u64) {
    crate::events::emit("heki", "suppressed", &[("kind", kind.as_str().to_string()), ("count", count.to_string())]);
}

#[cfg(test)]
mod tests {
    use super::*;
    use heki::RecordedAction;

    fn violation(kind: ViolationKind) -> ViolationRecord {
        ViolationRecord::new(kind, RecordedAction::Denied)
    }

    #[test]
    fn counters_stay_exact_while_events_are_limited() {
        let log = ViolationLog::default();
        for _ in 0..100 {
            log.record(violation(ViolationKind::Write));
        }
        assert_eq!(log.counts().get(ViolationKind::Write), 100);
        assert_eq!(log.suppressed_events(), 100 - u64::from(heki::rate_limit::DEFAULT_BURST));
        assert_eq!(log.recent().last().map(|v| v.seq), Some(100));
    }

    #[test]
    fn log_keeps_the_last_1024_records() {
        let log = ViolationLog::default();
        for _ in 0..(VIOLATION_LOG_SIZE + 5) {
            log.record(violation(ViolationKind::Msr));
        }
        let recent = log.recent();
        assert_eq!(recent.len(), VIOLATION_LOG_SIZE);
        assert_eq!(recent[0].seq, 6);
    }
}
