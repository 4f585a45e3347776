#![forbid(unsafe_code)]
//! heki: hypervisor-enforced kernel integrity, the pure policy engine.
//!
//! No KVM, no threads, no clock, no logger: the VMM feeds guest requests and
//! exits in, and applies the verdicts that come out.

pub mod abi;
pub mod counters;
pub mod insn;
pub mod memslot_plan;
pub mod permission_map;
pub mod perms;
pub mod pins;
pub mod policy;
pub mod rate_limit;
pub mod verdict;

pub use abi::{AbiError, GuestMemoryReader, HekiCall, ProtectRange, RamLayout};
pub use counters::ViolationCounters;
pub use memslot_plan::{PlannedSlot, SlotDiff, TooManySlots, diff_slots, plan_memslots};
pub use permission_map::{ByteProtections, PAGE_SHIFT, PAGE_SIZE, PermissionMap};
pub use perms::Permissions;
pub use pins::VcpuPins;
pub use policy::Policy;
pub use rate_limit::{Admission, EventRateLimiter};
pub use verdict::{Action, RecordedAction, ViolationKind, ViolationRecord, WriteVerdict};

/// Longest write `check_write` judges byte by byte (MMIO exits carry at most 8).
pub const MAX_CHECKED_WRITE: usize = 64;

/// Which bytes of a guest write a protection forbids.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WriteCheck {
    /// Bit i set: byte i of the write is forbidden.
    pub forbidden: u64,
    /// Bytes judged: the write's length, at most `MAX_CHECKED_WRITE`.
    pub len: usize,
}

impl WriteCheck {
    pub fn allowed(&self) -> bool {
        self.forbidden == 0
    }

    /// The bytes that may land, as (offset, length) runs.
    pub fn allowed_runs(&self) -> Vec<(usize, usize)> {
        let mut runs = Vec::new();
        let mut i = 0;
        while i < self.len {
            if self.forbidden & (1 << i) == 0 {
                let start = i;
                while i < self.len && self.forbidden & (1 << i) == 0 {
                    i += 1;
                }
                runs.push((start, i - start));
            } else {
                i += 1;
            }
        }
        runs
    }
}

/// The memory protections of one VM.
#[derive(Clone, Debug, Default)]
pub struct MemoryProtections {
    pub pages: PermissionMap,
    pub bytes: ByteProtections,
}

impl MemoryProtections {
    /// Applies PROTECT_MEMORY entries atomically: all or none. Entries apply
    /// in order, so one that touches a page an earlier entry of the same
    /// request made IMMUTABLE fails the whole request too.
    pub fn protect_pages(&mut self, ranges: &[ProtectRange]) -> Result<(), AbiError> {
        let mut locked_by_request = PermissionMap::default();
        for r in ranges {
            if self.pages.any_immutable(r.start, r.end) || locked_by_request.any_immutable(r.start, r.end) {
                return Err(AbiError::NotPermitted);
            }
            if r.perms.immutable() {
                locked_by_request.set(r.start, r.end, r.perms);
            }
        }
        for r in ranges {
            self.pages.set(r.start, r.end, r.perms);
        }
        self.pages.seal();
        Ok(())
    }

    /// PROTECT_BYTES: [gpa, gpa + len) can never be written again.
    pub fn protect_bytes(&mut self, ram: &RamLayout, gpa: u64, len: u64) -> Result<(), AbiError> {
        if len == 0 || len > abi::MAX_PROTECT_BYTES {
            return Err(AbiError::InvalidArgument);
        }
        if !ram.contains(gpa, len) {
            return Err(AbiError::BadAddress);
        }
        self.bytes.protect(gpa, gpa + len);
        Ok(())
    }

    /// Forgets every protection (guest reboot).
    pub fn reset(&mut self) {
        *self = MemoryProtections::default();
    }

    /// QUERY: the page's permission bits, plus 0x100 if it holds protected bytes.
    pub fn query(&self, ram: &RamLayout, gpa: u64) -> Result<u64, AbiError> {
        if !ram.contains(gpa, 1) {
            return Err(AbiError::BadAddress);
        }
        let page = gpa >> PAGE_SHIFT;
        let bytes = if self.bytes.page_has_bytes(page) { abi::QUERY_BYTES_PROTECTED } else { 0 };
        Ok(self.pages.get(page).bits() | bytes)
    }

    /// Judges a guest write of `len` bytes at `gpa`, byte by byte. Only the
    /// first `MAX_CHECKED_WRITE` bytes are judged (`WriteCheck::len` says how
    /// many); use `range_writable` for longer (device) writes.
    pub fn check_write(&self, gpa: u64, len: usize) -> WriteCheck {
        let len = len.min(MAX_CHECKED_WRITE);
        let mut forbidden = 0u64;
        for i in 0..len {
            let addr = gpa.wrapping_add(i as u64);
            if !self.pages.get(addr >> PAGE_SHIFT).writable() || self.bytes.is_protected(addr) {
                forbidden |= 1 << i;
            }
        }
        WriteCheck { forbidden, len }
    }

    /// Whether any byte of a larger range (device DMA) is write-protected.
    #[inline]
    pub fn range_writable(&self, gpa: u64, len: u64) -> bool {
        let Some(end) = gpa.checked_add(len) else {
            return false;
        };
        if len == 0 {
            return true;
        }
        let (first, last) = (gpa >> PAGE_SHIFT, (end - 1) >> PAGE_SHIFT);
        // Device buffers span few pages: per-page lookups beat a scan of the map.
        let pages_ok = if last - first < 64 {
            (first..=last).all(|page| self.pages.get(page).writable())
        } else {
            self.pages.iter().all(|(s, e, p)| p.writable() || e <= first || s > last)
        };
        pages_ok && (self.bytes.is_empty() || !self.bytes.overlaps(gpa, end))
    }

    /// Pages that must trap writes: not writable, or holding protected bytes.
    pub fn readonly_pages(&self) -> Vec<(u64, u64)> {
        let mut ranges: Vec<(u64, u64)> =
            self.pages.iter().filter(|(_, _, p)| !p.writable()).map(|(s, e, _)| (s, e)).collect();
        ranges.extend(self.bytes.pages());
        memslot_plan::merge_ranges(ranges)
    }

    /// The memslot layout these protections need.
    pub fn plan(&self, ram: &RamLayout, max_slots: usize) -> Result<Vec<PlannedSlot>, TooManySlots> {
        plan_memslots(&ram.regions, &self.readonly_pages(), max_slots)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ram() -> RamLayout {
        RamLayout { regions: vec![(0, 1 << 20)] }
    }

    fn range(start: u64, end: u64, bits: u64) -> ProtectRange {
        ProtectRange { start, end, perms: Permissions::from_abi(bits).expect("valid") }
    }

    #[test]
    fn protection_is_atomic_and_immutability_is_final() {
        let mut p = MemoryProtections::default();
        p.protect_pages(&[range(1, 2, 9)]).expect("first lock");
        let before = p.pages.clone();
        assert_eq!(p.protect_pages(&[range(5, 6, 1), range(1, 3, 7)]), Err(AbiError::NotPermitted));
        assert_eq!(p.pages, before, "nothing applied");
    }

    #[test]
    fn byte_protection_forbids_exactly_those_bytes() {
        let mut p = MemoryProtections::default();
        p.protect_bytes(&ram(), 0x2004, 2).expect("valid");
        let check = p.check_write(0x2000, 8);
        assert_eq!(check.forbidden, 0b0011_0000);
        assert_eq!(check.allowed_runs(), vec![(0, 4), (6, 2)]);
        assert_eq!(p.query(&ram(), 0x2fff), Ok(7 | 0x100));
        assert_eq!(p.protect_bytes(&ram(), 0, 0), Err(AbiError::InvalidArgument));
        assert_eq!(p.protect_bytes(&ram(), 0, (1 << 20) + 1), Err(AbiError::InvalidArgument));
        assert_eq!(p.protect_bytes(&ram(), (1 << 20) - 1, 2), Err(AbiError::BadAddress));
    }

    #[test]
    fn straddling_write_forbids_only_the_protected_page_part() {
        let mut p = MemoryProtections::default();
        p.protect_pages(&[range(3, 4, 5)]).expect("valid");
        let check = p.check_write(0x3ffc, 8);
        assert_eq!(check.forbidden, 0b0000_1111);
        assert!(!p.range_writable(0x2000, 0x1001));
        assert!(p.range_writable(0x4000, 0x1000));
    }

    #[test]
    fn readonly_pages_include_byte_protected_pages() {
        let mut p = MemoryProtections::default();
        p.protect_pages(&[range(10, 12, 5)]).expect("valid");
        p.protect_bytes(&ram(), 12 * 4096 + 5, 1).expect("valid");
        assert_eq!(p.readonly_pages(), vec![(10, 13)]);
        assert_eq!(p.plan(&ram(), 8).expect("fits").len(), 3);
    }
}
