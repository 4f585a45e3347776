//! What the string-write path (`string_write.rs`) remembers per vCPU, held
//! by the runtime: a file of its own so that the runtime and the path that
//! uses the runtime do not import each other.

use std::sync::atomic::{AtomicU64, Ordering};

/// Per vCPU, the last RIP found not to hold a REP string instruction, so a
/// loop of plain writes to a trapped page pays for one decode, not one per
/// exit. A stale entry only sends a write down the per-element path.
pub struct StringWriteMemo {
    not_string: Vec<AtomicU64>,
}

impl StringWriteMemo {
    pub fn new(vcpus: usize) -> Self {
        StringWriteMemo { not_string: (0..vcpus).map(|_| AtomicU64::new(u64::MAX)).collect() }
    }

    pub(super) fn knows_not_string(&self, vcpu: u8, rip: u64) -> bool {
        self.not_string.get(usize::from(vcpu)).is_some_and(|r| r.load(Ordering::Relaxed) == rip)
    }

    pub(super) fn note_not_string(&self, vcpu: u8, rip: u64) {
        if let Some(r) = self.not_string.get(usize::from(vcpu)) {
            r.store(rip, Ordering::Relaxed);
        }
    }
}
