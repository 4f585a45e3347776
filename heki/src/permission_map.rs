//! Page permissions and byte protections: range maps with O(log n) lookup.

use std::collections::BTreeMap;

use crate::perms::Permissions;

pub const PAGE_SHIFT: u32 = 12;
pub const PAGE_SIZE: u64 = 1 << PAGE_SHIFT;

/// Permissions of guest pages, stored as disjoint page ranges that differ
/// from the default (RWX). Neighbouring ranges with equal permissions merge.
#[derive(Clone, Debug, Default)]
pub struct PermissionMap {
    /// start page → (end page, exclusive; permissions)
    ranges: BTreeMap<u64, (u64, Permissions)>,
    /// A flat copy for lookups on the exit path, rebuilt by `seal` after a
    /// batch of changes: range starts in Eytzinger (BFS) order, whose search
    /// touches few cache lines, plus each one's rank in sorted order.
    eytzinger: Vec<u64>,
    rank: Vec<u32>,
    spans: Vec<(u64, Permissions)>,
    sealed: bool,
}

fn build_eytzinger(sorted: &[u64], tree: &mut [u64], rank: &mut [u32], next: &mut usize, k: usize) {
    if k < tree.len() {
        build_eytzinger(sorted, tree, rank, next, 2 * k);
        tree[k] = sorted[*next];
        rank[k] = *next as u32;
        *next += 1;
        build_eytzinger(sorted, tree, rank, next, 2 * k + 1);
    }
}

impl PartialEq for PermissionMap {
    fn eq(&self, other: &Self) -> bool {
        self.ranges == other.ranges
    }
}

impl Eq for PermissionMap {}

impl PermissionMap {
    /// Permissions of one page.
    #[inline]
    pub fn get(&self, page: u64) -> Permissions {
        if self.sealed {
            // Descend to the first start > page, then step to its predecessor.
            let n = self.eytzinger.len();
            let mut k = 1;
            while k < n {
                k = 2 * k + usize::from(self.eytzinger[k] <= page);
            }
            k >>= k.trailing_ones() + 1;
            let predecessor =
                if k == 0 { self.spans.len().checked_sub(1) } else { (self.rank[k] as usize).checked_sub(1) };
            return match predecessor.map(|i| self.spans[i]) {
                Some((end, perms)) if page < end => perms,
                _ => Permissions::DEFAULT,
            };
        }
        match self.ranges.range(..=page).next_back() {
            Some((_, &(end, perms))) if page < end => perms,
            _ => Permissions::DEFAULT,
        }
    }

    /// Rebuilds the lookup index after a batch of `set` calls.
    pub fn seal(&mut self) {
        let sorted: Vec<u64> = self.ranges.keys().copied().collect();
        self.eytzinger = vec![0; sorted.len() + 1];
        self.rank = vec![0; sorted.len() + 1];
        build_eytzinger(&sorted, &mut self.eytzinger, &mut self.rank, &mut 0, 1);
        self.spans = self.ranges.values().copied().collect();
        self.sealed = true;
    }

    /// Ranges overlapping [start, end), in order.
    fn overlapping(&self, start: u64, end: u64) -> Vec<(u64, u64, Permissions)> {
        let mut found: Vec<(u64, u64, Permissions)> = self
            .ranges
            .range(..end)
            .rev()
            .take_while(|(_, (e, _))| *e > start)
            .map(|(s, (e, p))| (*s, *e, *p))
            .collect();
        found.reverse();
        found
    }

    /// Whether any page in [start, end) is IMMUTABLE.
    pub fn any_immutable(&self, start: u64, end: u64) -> bool {
        self.overlapping(start, end).iter().any(|(_, _, p)| p.immutable())
    }

    /// Sets [start, end) to exactly `perms`.
    pub fn set(&mut self, start: u64, end: u64, perms: Permissions) {
        if start >= end {
            return;
        }
        self.sealed = false;
        for (s, e, p) in self.overlapping(start, end) {
            self.ranges.remove(&s);
            if s < start {
                self.ranges.insert(s, (start, p));
            }
            if e > end {
                self.ranges.insert(end, (e, p));
            }
        }
        if perms == Permissions::DEFAULT {
            return;
        }
        let (mut new_start, mut new_end) = (start, end);
        if let Some((&s, &(e, p))) = self.ranges.range(..start).next_back()
            && e == start
            && p == perms
        {
            self.ranges.remove(&s);
            new_start = s;
        }
        if let Some(&(e, p)) = self.ranges.get(&end)
            && p == perms
        {
            self.ranges.remove(&end);
            new_end = e;
        }
        self.ranges.insert(new_start, (new_end, perms));
    }

    /// (start page, end page, permissions) of every non-default range.
    pub fn iter(&self) -> impl Iterator<Item = (u64, u64, Permissions)> + '_ {
        self.ranges.iter().map(|(s, (e, p))| (*s, *e, *p))
    }

    /// Number of stored ranges.
    pub fn len(&self) -> usize {
        self.ranges.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ranges.is_empty()
    }

    /// Pages whose permissions differ from the default.
    pub fn protected_pages(&self) -> u64 {
        self.ranges.iter().map(|(s, (e, _))| e.saturating_sub(*s)).fold(0, u64::saturating_add)
    }
}

/// Write-protected byte ranges, merged and disjoint.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ByteProtections {
    /// start address → end address (exclusive)
    ranges: BTreeMap<u64, u64>,
}

impl ByteProtections {
    pub fn protect(&mut self, start: u64, end: u64) {
        if start >= end {
            return;
        }
        let (mut new_start, mut new_end) = (start, end);
        let touching: Vec<(u64, u64)> =
            self.ranges.range(..=end).rev().take_while(|(_, e)| **e >= start).map(|(s, e)| (*s, *e)).collect();
        for (s, e) in touching {
            self.ranges.remove(&s);
            new_start = new_start.min(s);
            new_end = new_end.max(e);
        }
        self.ranges.insert(new_start, new_end);
    }

    pub fn is_protected(&self, addr: u64) -> bool {
        matches!(self.ranges.range(..=addr).next_back(), Some((_, &e)) if addr < e)
    }

    /// Whether any byte of [start, end) is protected.
    pub fn overlaps(&self, start: u64, end: u64) -> bool {
        matches!(self.ranges.range(..end).next_back(), Some((_, &e)) if e > start)
    }

    pub fn page_has_bytes(&self, page: u64) -> bool {
        let start = page << PAGE_SHIFT;
        self.overlaps(start, start.saturating_add(PAGE_SIZE))
    }

    /// Pages that hold protected bytes, as merged (start, end) page ranges.
    pub fn pages(&self) -> Vec<(u64, u64)> {
        let mut pages: Vec<(u64, u64)> = Vec::new();
        for (&s, &e) in &self.ranges {
            let (ps, pe) = (s >> PAGE_SHIFT, (e.saturating_sub(1) >> PAGE_SHIFT).saturating_add(1));
            match pages.last_mut() {
                Some(last) if last.1 >= ps => last.1 = last.1.max(pe),
                _ => pages.push((ps, pe)),
            }
        }
        pages
    }

    pub fn total_bytes(&self) -> u64 {
        self.ranges.iter().map(|(s, e)| e.saturating_sub(*s)).fold(0, u64::saturating_add)
    }

    pub fn len(&self) -> usize {
        self.ranges.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ranges.is_empty()
    }
}

#[cfg(test)]
#[allow(clippy::arithmetic_side_effects)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const RO: Permissions = Permissions::READ;

    fn perms(bits: u64) -> Permissions {
        Permissions::from_abi(bits).expect("valid permissions")
    }

    #[test]
    fn unset_pages_are_rwx() {
        assert_eq!(PermissionMap::default().get(42), Permissions::DEFAULT);
    }

    #[test]
    fn set_splits_and_merges_ranges() {
        let mut map = PermissionMap::default();
        map.set(10, 20, RO);
        map.set(14, 16, Permissions::DEFAULT);
        assert_eq!(map.len(), 2);
        assert_eq!(map.get(15), Permissions::DEFAULT);
        assert_eq!(map.get(13), RO);
        map.set(14, 16, RO);
        assert_eq!(map.len(), 1, "equal neighbours merge");
        assert_eq!(map.protected_pages(), 10);
    }

    #[test]
    fn immutable_pages_are_found_in_any_overlap() {
        let mut map = PermissionMap::default();
        map.set(100, 101, perms(9));
        assert!(map.any_immutable(50, 101));
        assert!(!map.any_immutable(101, 200));
    }

    #[test]
    fn byte_protections_merge_and_answer_exactly() {
        let mut b = ByteProtections::default();
        b.protect(0x1008, 0x1010);
        b.protect(0x1010, 0x1012);
        assert_eq!(b.len(), 1);
        assert!(b.is_protected(0x1011));
        assert!(!b.is_protected(0x1012));
        assert!(!b.is_protected(0x1007));
        assert!(b.overlaps(0x1000, 0x1009));
        assert!(!b.overlaps(0x1012, 0x2000));
        assert_eq!(b.pages(), vec![(1, 2)]);
        b.protect(0x2ff0, 0x3010);
        assert_eq!(b.pages(), vec![(1, 4)], "touching pages merge");
    }

    proptest! {
        /// The map agrees with a naive per-page array after any sequence of sets.
        #[test]
        fn map_matches_naive_model(ops in proptest::collection::vec((0u64..64, 1u64..16, 0usize..4), 1..40)) {
            let choices = [Permissions::DEFAULT, RO, perms(5), perms(3)];
            let mut map = PermissionMap::default();
            let mut model = [Permissions::DEFAULT; 80];
            for (start, len, choice) in ops {
                let end = (start + len).min(80);
                map.set(start, end, choices[choice]);
                for page in model.iter_mut().take(end as usize).skip(start as usize) {
                    *page = choices[choice];
                }
            }
            let mut sealed = map.clone();
            sealed.seal();
            for (page, expected) in model.iter().enumerate() {
                prop_assert_eq!(map.get(page as u64), *expected);
                prop_assert_eq!(sealed.get(page as u64), *expected, "sealed index");
            }
            // Stored ranges are disjoint, non-default and never equal neighbours.
            let ranges: Vec<_> = map.iter().collect();
            for pair in ranges.windows(2) {
                prop_assert!(pair[0].1 <= pair[1].0);
                prop_assert!(!(pair[0].1 == pair[1].0 && pair[0].2 == pair[1].2));
            }
            prop_assert!(ranges.iter().all(|r| r.2 != Permissions::DEFAULT));
        }

        #[test]
        fn bytes_match_naive_model(ops in proptest::collection::vec((0u64..500, 1u64..40), 1..30)) {
            let mut b = ByteProtections::default();
            let mut model = vec![false; 600];
            for (start, len) in ops {
                b.protect(start, start + len);
                for byte in model.iter_mut().skip(start as usize).take(len as usize) {
                    *byte = true;
                }
            }
            for (addr, expected) in model.iter().enumerate() {
                prop_assert_eq!(b.is_protected(addr as u64), *expected);
            }
            prop_assert_eq!(b.total_bytes(), model.iter().filter(|x| **x).count() as u64);
        }
    }
}
