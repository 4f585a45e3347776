#![forbid(unsafe_code)]
//! heki: hypervisor-enforced kernel integrity, the pure policy engine.
//!
//! No KVM, no threads, no clock, no logger: the VMM feeds guest requests and
//! exits in, and applies the verdicts that come out.

pub mod abi;
pub mod counters;
pub mod image;
pub mod insn;
pub mod memslot_plan;
pub mod page_walk;
pub mod permission_map;
pub mod perms;
pub mod pins;
pub mod policy;
pub mod private;
pub mod rate_limit;
pub mod string_op;
pub mod translation;
pub mod verdict;

pub use abi::{AbiError, GuestMemoryReader, HekiCall, ProtectRange, RamLayout};
pub use counters::ViolationCounters;
pub use image::{KernelImage, Measurement, Measurements, Mismatch};
pub use memslot_plan::{PlannedSlot, SlotDiff, TooManySlots, diff_slots, plan_memslots};
pub use page_walk::{PagingMode, PhysRead, WalkError};
pub use permission_map::{ByteProtections, PAGE_SHIFT, PAGE_SIZE, PermissionMap};
pub use perms::Permissions;
pub use pins::VcpuPins;
pub use policy::Policy;
pub use private::PrivateMemory;
pub use rate_limit::{Admission, EventRateLimiter};
pub use verdict::{
    Access, Action, Breach, Outcome, Protections, RecordedAction, Verdict, ViolationKind, ViolationRecord, judge,
};

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

/// Which bytes of a longer vCPU write (a string instruction's run in one
/// page) a protection forbids.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SpanCheck {
    /// Bit `i % 64` of word `i / 64` set: byte i is forbidden.
    pub forbidden: Vec<u64>,
    /// Bytes judged.
    pub len: usize,
}

impl SpanCheck {
    pub fn is_forbidden(&self, i: usize) -> bool {
        self.forbidden.get(i / 64).is_some_and(|w| w & (1 << (i % 64)) != 0)
    }

    pub fn forbidden_count(&self) -> u64 {
        self.forbidden.iter().map(|w| u64::from(w.count_ones())).sum()
    }

    pub fn first_forbidden(&self) -> Option<usize> {
        self.forbidden.iter().enumerate().find(|(_, w)| **w != 0).map(|(i, w)| i * 64 + w.trailing_zeros() as usize)
    }

    /// The bytes that may land, as (offset, length) runs.
    pub fn allowed_runs(&self) -> Vec<(usize, usize)> {
        let mut runs: Vec<(usize, usize)> = Vec::new();
        for i in (0..self.len).filter(|&i| !self.is_forbidden(i)) {
            match runs.last_mut() {
                Some((start, len)) if *start + *len == i => *len += 1,
                _ => runs.push((i, 1)),
            }
        }
        runs
    }
}

/// Bits `offset .. offset + len` set (`offset + len <= 64`).
fn byte_mask(offset: usize, len: usize) -> u64 {
    let ones = if len >= 64 { u64::MAX } else { (1u64 << len) - 1 };
    ones << offset
}

/// The memory protections of one VM.
#[derive(Clone, Debug, Default)]
pub struct MemoryProtections {
    pub pages: PermissionMap,
    pub bytes: ByteProtections,
    /// Which pages the host may touch (all, until the guest asks for private memory).
    pub private: PrivateMemory,
    /// The SHA-256 of each locked range, as locked (the VMM measures).
    pub measurements: Measurements,
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
        self.bytes.protect(gpa, gpa.saturating_add(len));
        Ok(())
    }

    /// Forgets every protection (guest reboot).
    pub fn reset(&mut self) {
        *self = MemoryProtections::default();
    }

    /// QUERY: the page's permission bits, plus 0x100 if it holds protected
    /// bytes and 0x200 if it is private (the VMM adds 0x400 when the host
    /// keeps no mapping of private pages).
    pub fn query(&self, ram: &RamLayout, gpa: u64) -> Result<u64, AbiError> {
        if !ram.contains(gpa, 1) {
            return Err(AbiError::BadAddress);
        }
        let page = gpa >> PAGE_SHIFT;
        let bytes = if self.bytes.page_has_bytes(page) { abi::QUERY_BYTES_PROTECTED } else { 0 };
        let private = if self.private.is_private(page) { private::QUERY_PRIVATE } else { 0 };
        Ok(self.pages.get(page).bits() | bytes | private)
    }

    /// Judges a guest write of `len` bytes at `gpa`, byte by byte. Only the
    /// first `MAX_CHECKED_WRITE` bytes are judged (`WriteCheck::len` says how
    /// many); use `range_writable` for longer (device) writes.
    pub fn check_write(&self, gpa: u64, len: usize) -> WriteCheck {
        let len = len.min(MAX_CHECKED_WRITE);
        let mut forbidden = 0u64;
        // One lookup per page touched (at most two for an MMIO write).
        let mut offset = 0;
        while offset < len {
            let addr = gpa.wrapping_add(offset as u64);
            let in_page = (PAGE_SIZE.saturating_sub(addr & (PAGE_SIZE - 1)) as usize).min(len.saturating_sub(offset));
            if !self.pages.get(addr >> PAGE_SHIFT).writable() {
                forbidden |= byte_mask(offset, in_page);
            }
            offset = offset.saturating_add(in_page);
        }
        // Byte by byte only when some protected byte is near.
        let near_bytes = match gpa.checked_add(len as u64) {
            Some(end) => self.bytes.overlaps(gpa, end),
            None => !self.bytes.is_empty(),
        };
        if near_bytes {
            for i in 0..len {
                if self.bytes.is_protected(gpa.wrapping_add(i as u64)) {
                    forbidden |= 1 << i;
                }
            }
        }
        WriteCheck { forbidden, len }
    }

    /// `check_write` over any length, in `MAX_CHECKED_WRITE` steps.
    pub fn check_span(&self, gpa: u64, len: usize) -> SpanCheck {
        let mut forbidden = Vec::with_capacity(len.div_ceil(MAX_CHECKED_WRITE));
        let mut offset = 0;
        while offset < len {
            let step = (len - offset).min(MAX_CHECKED_WRITE);
            forbidden.push(self.check_write(gpa.wrapping_add(offset as u64), step).forbidden);
            offset += step;
        }
        SpanCheck { forbidden, len }
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
        let (first, last) = (gpa >> PAGE_SHIFT, end.saturating_sub(1) >> PAGE_SHIFT);
        // Device buffers span few pages: per-page lookups beat a scan of the map.
        let pages_ok = if last.saturating_sub(first) < 64 {
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
#[allow(clippy::arithmetic_side_effects)]
mod tests {
    use super::*;
    use proptest::prelude::*;

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
    fn an_entry_touching_a_page_locked_earlier_in_the_same_request_fails_it_all() {
        let mut p = MemoryProtections::default();
        assert_eq!(p.protect_pages(&[range(1, 3, 9), range(2, 4, 1)]), Err(AbiError::NotPermitted));
        assert!(p.pages.is_empty(), "nothing applied");
        p.protect_pages(&[range(1, 3, 1), range(2, 4, 9)]).expect("lock after a plain change is fine");
        assert_eq!(p.query(&ram(), 0x1000), Ok(1));
        assert_eq!(p.query(&ram(), 0x3000), Ok(9));
    }

    #[test]
    fn reset_forgets_every_protection() {
        let mut p = MemoryProtections::default();
        p.protect_pages(&[range(1, 2, 9)]).expect("valid");
        p.protect_bytes(&ram(), 0x5000, 4).expect("valid");
        p.reset();
        assert!(p.check_write(0x1000, 8).allowed());
        assert!(p.check_write(0x5000, 8).allowed());
        assert_eq!(p.query(&ram(), 0x1000), Ok(7));
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
    fn a_64_byte_write_is_judged_whole_and_longer_ones_are_cut() {
        let mut p = MemoryProtections::default();
        p.protect_pages(&[range(1, 2, 1)]).expect("valid");
        assert_eq!(p.check_write(0x1000, 64), WriteCheck { forbidden: u64::MAX, len: 64 });
        assert_eq!(p.check_write(0x1000 - 32, 100), WriteCheck { forbidden: u64::MAX << 32, len: 64 });
        assert!(p.check_write(u64::MAX - 3, 8).allowed(), "wrapping address is not protected RAM");
    }

    #[test]
    fn readonly_pages_include_byte_protected_pages() {
        let mut p = MemoryProtections::default();
        p.protect_pages(&[range(10, 12, 5)]).expect("valid");
        p.protect_bytes(&ram(), 12 * 4096 + 5, 1).expect("valid");
        assert_eq!(p.readonly_pages(), vec![(10, 13)]);
        assert_eq!(p.plan(&ram(), 8).expect("fits").len(), 3);
    }

    const MODEL_PAGES: u64 = 40;
    const MODEL_REGIONS: [(u64, u64); 2] = [(0, 16 * PAGE_SIZE), (24 * PAGE_SIZE, MODEL_PAGES * PAGE_SIZE)];

    #[derive(Clone, Debug)]
    enum Op {
        Pages(Vec<(u64, u64, u64)>),
        Bytes(u64, u64),
    }

    fn op() -> impl Strategy<Value = Op> {
        let bits = prop_oneof![Just(1u64), Just(3), Just(5), Just(7), Just(9), Just(13)];
        let entry = (0..MODEL_PAGES, 1u64..6, bits).prop_map(|(s, l, b)| (s, (s + l).min(MODEL_PAGES), b));
        prop_oneof![
            proptest::collection::vec(entry, 1..4).prop_map(Op::Pages),
            (0..MODEL_PAGES * PAGE_SIZE - 64, 1u64..64).prop_map(|(g, l)| Op::Bytes(g, l)),
        ]
    }

    /// A write of 1..=64 bytes, often straddling a page boundary.
    fn probe() -> impl Strategy<Value = (u64, usize)> {
        let offset = prop_oneof![0..PAGE_SIZE, PAGE_SIZE - 64..PAGE_SIZE];
        (0..MODEL_PAGES - 1, offset, 1usize..=64).prop_map(|(page, offset, len)| (page * PAGE_SIZE + offset, len))
    }

    /// Per-page permissions and per-byte protection, applied the slow way.
    struct Model {
        pages: Vec<u64>,
        bytes: Vec<bool>,
    }

    impl Model {
        fn protect_pages(&mut self, entries: &[(u64, u64, u64)]) -> Result<(), AbiError> {
            let mut next = self.pages.clone();
            for &(s, e, bits) in entries {
                if (s..e).any(|p| next[p as usize] & 8 != 0) {
                    return Err(AbiError::NotPermitted);
                }
                (s..e).for_each(|p| next[p as usize] = bits);
            }
            self.pages = next;
            Ok(())
        }

        fn readonly(&self, page: u64) -> bool {
            let bytes = (page * PAGE_SIZE..(page + 1) * PAGE_SIZE).any(|b| self.bytes[b as usize]);
            self.pages[page as usize] & 2 == 0 || bytes
        }
    }

    proptest! {
        /// Protections agree with a per-page, per-byte model on every answer
        /// the VMM uses: call results, QUERY, write checks and the memslot plan.
        #[test]
        fn protections_match_naive_model(ops in proptest::collection::vec(op(), 1..12), probes in proptest::collection::vec(probe(), 20)) {
            let ram = RamLayout { regions: MODEL_REGIONS.to_vec() };
            let mut p = MemoryProtections::default();
            let mut model = Model { pages: vec![7; MODEL_PAGES as usize], bytes: vec![false; (MODEL_PAGES * PAGE_SIZE) as usize] };
            for op in ops {
                match op {
                    Op::Pages(entries) => {
                        let ranges: Vec<ProtectRange> = entries.iter().map(|&(s, e, b)| range(s, e, b)).collect();
                        prop_assert_eq!(p.protect_pages(&ranges), model.protect_pages(&entries));
                    }
                    Op::Bytes(gpa, len) => {
                        let expected = if ram.contains(gpa, len) {
                            model.bytes[gpa as usize..(gpa + len) as usize].iter_mut().for_each(|b| *b = true);
                            Ok(())
                        } else {
                            Err(AbiError::BadAddress)
                        };
                        prop_assert_eq!(p.protect_bytes(&ram, gpa, len), expected);
                    }
                }
            }
            for page in 0..MODEL_PAGES {
                let gpa = page * PAGE_SIZE;
                let expected = if ram.contains(gpa, 1) {
                    let bytes = (gpa..gpa + PAGE_SIZE).any(|b| model.bytes[b as usize]);
                    Ok(model.pages[page as usize] | if bytes { abi::QUERY_BYTES_PROTECTED } else { 0 })
                } else {
                    Err(AbiError::BadAddress)
                };
                prop_assert_eq!(p.query(&ram, gpa + 123), expected);
            }
            for (gpa, len) in probes {
                let check = p.check_write(gpa, len);
                for i in 0..len as u64 {
                    let addr = gpa + i;
                    let forbidden = model.pages[(addr / PAGE_SIZE) as usize] & 2 == 0 || model.bytes[addr as usize];
                    prop_assert_eq!(check.forbidden & (1 << i) != 0, forbidden, "byte {:#x}", addr);
                }
                prop_assert_eq!(p.range_writable(gpa, len as u64), check.allowed());
            }
            let slots = p.plan(&ram, usize::MAX).expect("unbounded");
            // Every RAM page in one slot, read-only exactly when the model says so.
            for &(start, end) in &MODEL_REGIONS {
                for page in start / PAGE_SIZE..end / PAGE_SIZE {
                    let gpa = page * PAGE_SIZE;
                    let covering: Vec<_> = slots.iter().filter(|s| s.gpa <= gpa && gpa < s.gpa + s.size).collect();
                    prop_assert_eq!(covering.len(), 1);
                    prop_assert_eq!(covering[0].readonly, model.readonly(page), "page {}", page);
                }
            }
            // Fewest slots: one per run of equal writability in each region.
            let runs: usize = MODEL_REGIONS
                .iter()
                .map(|&(s, e)| {
                    let kinds: Vec<bool> = (s / PAGE_SIZE..e / PAGE_SIZE).map(|p| model.readonly(p)).collect();
                    1 + kinds.windows(2).filter(|w| w[0] != w[1]).count()
                })
                .sum();
            prop_assert_eq!(slots.len(), runs);
            if runs > 1 {
                prop_assert_eq!(p.plan(&ram, runs - 1), Err(TooManySlots { needed: runs, max: runs - 1 }));
            }
        }
    }
}
