//! Violation bookkeeping: exact counters, the last 1024 records for REST, and
//! rate-limited events so a guest hammering a page cannot flood the monitor.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde::Serialize;

/// How many violation records `vm.heki-violations` keeps.
pub const VIOLATION_LOG_SIZE: usize = 1024;
/// Events per kind allowed per window; the rest are counted and summarised.
const EVENTS_PER_WINDOW: u64 = 10;
const WINDOW: Duration = Duration::from_secs(1);

/// One stopped (or, under `log`, audited) action of the guest or a device.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Violation {
    pub seq: u64,
    /// `write`, `hypercall`, `cr`, `msr` or `dma-write`.
    pub kind: &'static str,
    pub vcpu: Option<u8>,
    pub gpa: Option<u64>,
    pub rip: Option<u64>,
    pub size: Option<u64>,
    /// `denied`, `logged`, `paused`, `shutdown`, `restored`.
    pub action: &'static str,
    /// Extra properties (register names, MSR index, device id...).
    pub details: BTreeMap<&'static str, String>,
}

impl Violation {
    pub fn new(kind: &'static str, action: &'static str) -> Self {
        Violation { seq: 0, kind, vcpu: None, gpa: None, rip: None, size: None, action, details: BTreeMap::new() }
    }

    /// The event properties: hex strings for addresses, as the event list documents.
    pub fn properties(&self) -> Vec<(&str, String)> {
        let mut props = vec![("kind", self.kind.to_string()), ("action", self.action.to_string())];
        if let Some(v) = self.vcpu {
            props.push(("vcpu", v.to_string()));
        }
        if let Some(g) = self.gpa {
            props.push(("gpa", format!("{g:#x}")));
        }
        if let Some(r) = self.rip {
            props.push(("rip", format!("{r:#x}")));
        }
        if let Some(s) = self.size {
            props.push(("size", s.to_string()));
        }
        props.extend(self.details.iter().map(|(k, v)| (*k, v.clone())));
        props.push(("seq", self.seq.to_string()));
        props
    }
}

#[derive(Default)]
struct KindWindow {
    started: Option<Instant>,
    emitted: u64,
    suppressed: u64,
}

#[derive(Default)]
struct Inner {
    next_seq: u64,
    counts: BTreeMap<&'static str, u64>,
    log: VecDeque<Violation>,
    windows: BTreeMap<&'static str, KindWindow>,
    suppressed_total: u64,
}

#[derive(Default)]
pub struct ViolationLog {
    inner: Mutex<Inner>,
}

impl ViolationLog {
    /// Records a violation and emits its event unless the kind is over its rate.
    pub fn record(&self, mut violation: Violation) {
        let mut emit_suppressed = None;
        let emit;
        {
            let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
            inner.next_seq += 1;
            violation.seq = inner.next_seq;
            *inner.counts.entry(violation.kind).or_default() += 1;
            if inner.log.len() == VIOLATION_LOG_SIZE {
                inner.log.pop_front();
            }
            inner.log.push_back(violation.clone());
            let now = Instant::now();
            let window = inner.windows.entry(violation.kind).or_default();
            let expired = window.started.is_none_or(|s| now.duration_since(s) >= WINDOW);
            if expired {
                if window.suppressed > 0 {
                    emit_suppressed = Some(window.suppressed);
                }
                *window = KindWindow { started: Some(now), emitted: 0, suppressed: 0 };
            }
            emit = window.emitted < EVENTS_PER_WINDOW;
            if emit {
                window.emitted += 1;
            } else {
                window.suppressed += 1;
                inner.suppressed_total += 1;
            }
        }
        if let Some(count) = emit_suppressed {
            crate::events::emit(
                "heki",
                "suppressed",
                &[("kind", violation.kind.to_string()), ("count", count.to_string())],
            );
        }
        if emit {
            crate::events::emit("heki", "violation", &violation.properties());
        }
    }

    /// Reports what the rate limiter is still holding back (at shutdown or on query).
    pub fn flush_suppressed(&self) {
        let pending: Vec<(&'static str, u64)> = {
            let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
            inner
                .windows
                .iter_mut()
                .filter(|(_, w)| w.suppressed > 0)
                .map(|(k, w)| (*k, std::mem::take(&mut w.suppressed)))
                .collect()
        };
        for (kind, count) in pending {
            crate::events::emit("heki", "suppressed", &[("kind", kind.to_string()), ("count", count.to_string())]);
        }
    }

    pub fn counts(&self) -> BTreeMap<&'static str, u64> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner()).counts.clone()
    }

    pub fn total(&self) -> u64 {
        self.inner.lock().unwrap_or_else(|p| p.into_inner()).next_seq
    }

    pub fn suppressed_events(&self) -> u64 {
        self.inner.lock().unwrap_or_else(|p| p.into_inner()).suppressed_total
    }

    pub fn recent(&self) -> Vec<Violation> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner()).log.iter().cloned().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_stay_exact_while_events_are_limited() {
        let log = ViolationLog::default();
        for _ in 0..100 {
            log.record(Violation::new("write", "denied"));
        }
        assert_eq!(log.counts().get("write"), Some(&100));
        assert_eq!(log.suppressed_events(), 100 - EVENTS_PER_WINDOW);
        assert_eq!(log.recent().last().map(|v| v.seq), Some(100));
    }

    #[test]
    fn log_keeps_the_last_1024_records() {
        let log = ViolationLog::default();
        for _ in 0..(VIOLATION_LOG_SIZE + 5) {
            log.record(Violation::new("msr", "denied"));
        }
        let recent = log.recent();
        assert_eq!(recent.len(), VIOLATION_LOG_SIZE);
        assert_eq!(recent[0].seq, 6);
    }
}
