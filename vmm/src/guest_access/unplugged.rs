//! Address space reserved for memory hotplug that holds no RAM yet. The
//! VMM maps the whole reserved window at boot (so every holder of guest
//! memory sees plugged RAM without being told), but until `vm.resize` plugs
//! a range in, an access there fails as one outside RAM: no copy, no event.

use std::sync::atomic::{AtomicU64, Ordering};

/// `[start, end)` is reserved and not plugged in; plugging moves `start` up.
#[derive(Default)]
pub struct UnpluggedRange {
    start: AtomicU64,
    end: AtomicU64,
}

impl UnpluggedRange {
    /// Reserves `[start, end)` (at boot, before any device runs).
    pub fn reserve(&self, start: u64, end: u64) {
        self.start.store(start, Ordering::SeqCst);
        self.end.store(end, Ordering::SeqCst);
    }

    /// Memory up to `end` is plugged in (after its mappings and memslots exist).
    pub fn plug_up_to(&self, end: u64) {
        self.start.fetch_max(end, Ordering::SeqCst);
    }

    /// Whether `[gpa, gpa + len)` touches reserved, unplugged address space.
    pub fn touches(&self, gpa: u64, len: u64) -> bool {
        let (start, end) = (self.start.load(Ordering::Acquire), self.end.load(Ordering::Acquire));
        let last = gpa.saturating_add(len.max(1));
        start < end && gpa < end && start < last
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_unplugged_part_of_the_window_is_refused() {
        let range = UnpluggedRange::default();
        assert!(!range.touches(0, u64::MAX), "nothing reserved");
        range.reserve(0x1_0000_0000, 0x2_0000_0000);
        assert!(range.touches(0x1_0000_0000, 1));
        assert!(range.touches(0xffff_f000, 0x2000), "straddles into the window");
        assert!(!range.touches(0xffff_f000, 0x1000));
        range.plug_up_to(0x1_0800_0000);
        assert!(!range.touches(0x1_0000_0000, 0x800_0000));
        assert!(range.touches(0x1_07ff_f000, 0x2000));
        assert!(!range.touches(0x2_0000_0000, 4096), "above the window");
        range.plug_up_to(0x1_0000_0000);
        assert!(!range.touches(0x1_0000_0000, 4096), "plugging never goes back");
    }
}
