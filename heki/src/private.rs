//! Private guest memory: once the guest calls PRIVATE_MEMORY, every page of
//! its RAM is private from the host except the ranges it shares with
//! SET_SHARED (virtio rings, DMA and bounce buffers). Devices and the VMM may
//! touch only shared pages.
// Decodes guest-supplied numbers: no unchecked arithmetic here.
#![deny(clippy::arithmetic_side_effects)]

use std::collections::BTreeMap;

use crate::abi::{AbiError, RamLayout};
use crate::permission_map::{PAGE_SHIFT, PAGE_SIZE};

/// QUERY's flag for "this page is private".
pub const QUERY_PRIVATE: u64 = 0x200;
/// QUERY's flag for "private, and the host process has no mapping of it".
pub const QUERY_UNMAPPED: u64 = 0x400;

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PrivateMemory {
    enabled: bool,
    /// Shared page ranges, start page → end page (exclusive); disjoint and merged.
    shared: BTreeMap<u64, u64>,
}

impl PrivateMemory {
    /// PRIVATE_MEMORY(1): idempotent; before it, all memory is shared.
    pub fn enable(&mut self) {
        self.enabled = true;
    }

    pub fn is_enabled(&self) -> bool {
        self.enabled
    }

    /// SET_SHARED: checks the arguments, then shares or unshares the pages.
    pub fn set_shared(&mut self, ram: &RamLayout, gpa: u64, len: u64, share: u64) -> Result<(), AbiError> {
        if !gpa.is_multiple_of(PAGE_SIZE) || !len.is_multiple_of(PAGE_SIZE) || len == 0 || share > 1 {
            return Err(AbiError::InvalidArgument);
        }
        if !ram.contains(gpa, len) {
            return Err(AbiError::BadAddress);
        }
        if !self.enabled {
            return Err(AbiError::NotPermitted);
        }
        let (start, end) = (gpa >> PAGE_SHIFT, gpa.saturating_add(len) >> PAGE_SHIFT);
        self.remove(start, end);
        if share == 1 {
            self.insert(start, end);
        }
        Ok(())
    }

    /// Removes `[start, end)` from the shared ranges, splitting as needed.
    fn remove(&mut self, start: u64, end: u64) {
        let touching: Vec<(u64, u64)> =
            self.shared.range(..end).filter(|(_, e)| **e > start).map(|(&s, &e)| (s, e)).collect();
        for (s, e) in touching {
            self.shared.remove(&s);
            if s < start {
                self.shared.insert(s, start);
            }
            if e > end {
                self.shared.insert(end, e);
            }
        }
    }

    /// Adds `[start, end)`, merging with neighbours it touches.
    fn insert(&mut self, mut start: u64, mut end: u64) {
        if let Some((&s, &e)) = self.shared.range(..=start).next_back()
            && e >= start
        {
            start = s;
            end = end.max(e);
            self.shared.remove(&s);
        }
        if let Some(&e) = self.shared.get(&end) {
            self.shared.remove(&end);
            end = e;
        }
        self.shared.insert(start, end);
    }

    /// Whether the host may not touch `page`.
    pub fn is_private(&self, page: u64) -> bool {
        self.enabled && !matches!(self.shared.range(..=page).next_back(), Some((_, &e)) if e > page)
    }

    /// Whether every page of `[gpa, gpa + len)` is shared (a wrapping range is not).
    pub fn range_shared(&self, gpa: u64, len: u64) -> bool {
        if !self.enabled || len == 0 {
            return true;
        }
        let Some(last) = len.checked_sub(1).and_then(|n| gpa.checked_add(n)) else { return false };
        let (first, last) = (gpa >> PAGE_SHIFT, last >> PAGE_SHIFT);
        matches!(self.shared.range(..=first).next_back(), Some((_, &e)) if e > last)
    }

    /// The private pages of RAM, as merged [start, end) page ranges.
    pub fn private_ranges(&self, ram: &RamLayout) -> Vec<(u64, u64)> {
        if !self.enabled {
            return Vec::new();
        }
        let mut ranges = Vec::new();
        for &(region_start, region_end) in &ram.regions {
            let mut page = region_start >> PAGE_SHIFT;
            let end = region_end >> PAGE_SHIFT;
            for (&s, &e) in self.shared.range(..end) {
                if e <= page {
                    continue;
                }
                if s > page {
                    ranges.push((page, s.min(end)));
                }
                page = page.max(e);
            }
            if page < end {
                ranges.push((page, end));
            }
        }
        ranges
    }
}

#[cfg(test)]
#[allow(clippy::arithmetic_side_effects)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn ram() -> RamLayout {
        RamLayout { regions: vec![(0, 64 * PAGE_SIZE), (80 * PAGE_SIZE, 100 * PAGE_SIZE)] }
    }

    #[test]
    fn before_private_memory_everything_is_shared_and_set_shared_is_eperm() {
        let mut p = PrivateMemory::default();
        assert!(!p.is_private(3) && p.range_shared(0, 64 * PAGE_SIZE));
        assert_eq!(p.set_shared(&ram(), 0, PAGE_SIZE, 1), Err(AbiError::NotPermitted));
        assert!(p.private_ranges(&ram()).is_empty());
    }

    #[test]
    fn every_bad_argument_has_its_errno() {
        let mut p = PrivateMemory::default();
        p.enable();
        let cases = [
            (1, PAGE_SIZE, 1, AbiError::InvalidArgument),
            (0, 100, 1, AbiError::InvalidArgument),
            (0, 0, 1, AbiError::InvalidArgument),
            (0, PAGE_SIZE, 2, AbiError::InvalidArgument),
            (64 * PAGE_SIZE, PAGE_SIZE, 1, AbiError::BadAddress),
            (63 * PAGE_SIZE, 2 * PAGE_SIZE, 1, AbiError::BadAddress),
            (u64::MAX - PAGE_SIZE + 1, PAGE_SIZE, 1, AbiError::BadAddress),
        ];
        for (gpa, len, share, err) in cases {
            assert_eq!(p.set_shared(&ram(), gpa, len, share), Err(err), "{gpa:#x} {len:#x} {share}");
        }
    }

    #[test]
    fn sharing_and_unsharing_split_and_merge_ranges() {
        let mut p = PrivateMemory::default();
        p.enable();
        assert!(p.is_private(0));
        p.set_shared(&ram(), 4 * PAGE_SIZE, 8 * PAGE_SIZE, 1).expect("share 4..12");
        p.set_shared(&ram(), 12 * PAGE_SIZE, 2 * PAGE_SIZE, 1).expect("share 12..14");
        assert!(p.range_shared(4 * PAGE_SIZE, 10 * PAGE_SIZE), "merged");
        p.set_shared(&ram(), 6 * PAGE_SIZE, PAGE_SIZE, 0).expect("unshare 6");
        assert!(p.is_private(6) && !p.is_private(5) && !p.is_private(7));
        assert!(!p.range_shared(5 * PAGE_SIZE, 2 * PAGE_SIZE));
        assert_eq!(p.private_ranges(&ram()), vec![(0, 4), (6, 7), (14, 64), (80, 100)]);
    }

    proptest! {
        /// Agrees with a per-page model after any sequence of calls.
        #[test]
        fn matches_a_per_page_model(ops in proptest::collection::vec((0u64..64, 1u64..10, 0u64..2), 1..20)) {
            let ram = RamLayout { regions: vec![(0, 64 * PAGE_SIZE)] };
            let mut p = PrivateMemory::default();
            p.enable();
            let mut model = [false; 64];
            for (page, pages, share) in ops {
                let result = p.set_shared(&ram, page * PAGE_SIZE, pages * PAGE_SIZE, share);
                if page + pages <= 64 {
                    prop_assert_eq!(result, Ok(()));
                    (page..page + pages).for_each(|i| model[i as usize] = share == 1);
                } else {
                    prop_assert_eq!(result, Err(AbiError::BadAddress));
                }
            }
            for page in 0..64u64 {
                prop_assert_eq!(p.is_private(page), !model[page as usize]);
            }
            let private: Vec<u64> = p.private_ranges(&ram).iter().flat_map(|&(s, e)| s..e).collect();
            let expected: Vec<u64> = (0..64).filter(|&i| !model[i as usize]).collect();
            prop_assert_eq!(private, expected);
        }
    }
}
