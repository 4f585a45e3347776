//! The memslot layout: guest RAM cut into the fewest KVM slots such that every
//! page that must trap writes sits in a read-only slot.

use crate::permission_map::PAGE_SHIFT;

/// One planned KVM memslot (byte addresses).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct PlannedSlot {
    pub gpa: u64,
    pub size: u64,
    pub readonly: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("the layout needs {needed} memslots but KVM allows {max}")]
pub struct TooManySlots {
    pub needed: usize,
    pub max: usize,
}

/// Plans slots for RAM `regions` ([start, end) bytes, page aligned) given the
/// read-only page ranges (sorted, disjoint, merged).
pub fn plan_memslots(
    regions: &[(u64, u64)],
    readonly_pages: &[(u64, u64)],
    max_slots: usize,
) -> Result<Vec<PlannedSlot>, TooManySlots> {
    let mut slots = Vec::new();
    for &(start, end) in regions {
        let mut cursor = start;
        let first = readonly_pages.partition_point(|&(_, e)| (e << PAGE_SHIFT) <= start);
        for &(ps, pe) in &readonly_pages[first..] {
            let (ro_start, ro_end) = ((ps << PAGE_SHIFT).max(start), (pe << PAGE_SHIFT).min(end));
            if ro_start >= end {
                break;
            }
            if ro_start > cursor {
                slots.push(PlannedSlot { gpa: cursor, size: ro_start - cursor, readonly: false });
            }
            slots.push(PlannedSlot { gpa: ro_start, size: ro_end - ro_start, readonly: true });
            cursor = ro_end;
        }
        if cursor < end {
            slots.push(PlannedSlot { gpa: cursor, size: end - cursor, readonly: false });
        }
    }
    if slots.len() > max_slots {
        return Err(TooManySlots { needed: slots.len(), max: max_slots });
    }
    Ok(slots)
}

/// The change from one layout to another: slots equal in both stay untouched.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SlotDiff {
    /// Installed slots that are not in the new layout (remove these first).
    pub remove: Vec<PlannedSlot>,
    /// New slots that are not installed yet.
    pub add: Vec<PlannedSlot>,
}

impl SlotDiff {
    pub fn is_empty(&self) -> bool {
        self.remove.is_empty() && self.add.is_empty()
    }
}

/// Which slots to remove and add to go from `installed` to `wanted`, in
/// O(n log n): both are sorted and walked together.
pub fn diff_slots(installed: &[PlannedSlot], wanted: &[PlannedSlot]) -> SlotDiff {
    let (mut old, mut new) = (installed.to_vec(), wanted.to_vec());
    old.sort_unstable();
    new.sort_unstable();
    let mut diff = SlotDiff::default();
    let (mut i, mut j) = (0, 0);
    while i < old.len() || j < new.len() {
        match (old.get(i), new.get(j)) {
            (Some(a), Some(b)) if a == b => {
                i += 1;
                j += 1;
            }
            (Some(a), Some(b)) if a < b => {
                diff.remove.push(*a);
                i += 1;
            }
            (Some(a), None) => {
                diff.remove.push(*a);
                i += 1;
            }
            (_, Some(b)) => {
                diff.add.push(*b);
                j += 1;
            }
            (None, None) => break,
        }
    }
    diff
}

/// Merges sorted page ranges that touch or overlap.
pub fn merge_ranges(mut ranges: Vec<(u64, u64)>) -> Vec<(u64, u64)> {
    ranges.sort_unstable();
    let mut merged: Vec<(u64, u64)> = Vec::with_capacity(ranges.len());
    for (s, e) in ranges {
        match merged.last_mut() {
            Some(last) if last.1 >= s => last.1 = last.1.max(e),
            _ => merged.push((s, e)),
        }
    }
    merged
}

#[cfg(test)]
#[allow(clippy::arithmetic_side_effects)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const PAGE: u64 = 4096;

    #[test]
    fn no_protection_means_one_slot_per_region() {
        let slots = plan_memslots(&[(0, 64 * PAGE)], &[], 10).expect("fits");
        assert_eq!(slots, vec![PlannedSlot { gpa: 0, size: 64 * PAGE, readonly: false }]);
    }

    #[test]
    fn a_protected_range_splits_the_region_in_three() {
        let slots = plan_memslots(&[(0, 64 * PAGE)], &[(10, 12)], 10).expect("fits");
        assert_eq!(slots.len(), 3);
        assert_eq!(slots[1], PlannedSlot { gpa: 10 * PAGE, size: 2 * PAGE, readonly: true });
    }

    #[test]
    fn the_slot_budget_is_respected() {
        assert_eq!(plan_memslots(&[(0, 64 * PAGE)], &[(1, 2), (3, 4)], 4), Err(TooManySlots { needed: 5, max: 4 }));
    }

    fn slot(gpa: u64, pages: u64, readonly: bool) -> PlannedSlot {
        PlannedSlot { gpa: gpa * PAGE, size: pages * PAGE, readonly }
    }

    #[test]
    fn protecting_one_more_range_touches_only_the_slot_it_splits() {
        let before = plan_memslots(&[(0, 64 * PAGE)], &[(10, 12)], 10).expect("fits");
        let after = plan_memslots(&[(0, 64 * PAGE)], &[(10, 12), (40, 41)], 10).expect("fits");
        let diff = diff_slots(&before, &after);
        assert_eq!(diff.remove, vec![slot(12, 52, false)]);
        assert_eq!(diff.add, vec![slot(12, 28, false), slot(40, 1, true), slot(41, 23, false)]);
        assert!(diff_slots(&after, &after).is_empty());
    }

    #[test]
    fn a_slot_changing_only_its_writability_is_replaced() {
        let diff = diff_slots(&[slot(0, 4, false)], &[slot(0, 4, true)]);
        assert_eq!(diff, SlotDiff { remove: vec![slot(0, 4, false)], add: vec![slot(0, 4, true)] });
    }

    proptest! {
        /// Applying the diff to the old layout gives exactly the new one.
        #[test]
        fn diff_turns_old_into_new(
            old in proptest::collection::btree_set((0u64..20, 1u64..4, any::<bool>()), 0..12),
            new in proptest::collection::btree_set((0u64..20, 1u64..4, any::<bool>()), 0..12),
        ) {
            let old: Vec<PlannedSlot> = old.into_iter().map(|(g, s, r)| slot(g, s, r)).collect();
            let new: Vec<PlannedSlot> = new.into_iter().map(|(g, s, r)| slot(g, s, r)).collect();
            let diff = diff_slots(&old, &new);
            let mut result: Vec<PlannedSlot> = old.iter().filter(|s| !diff.remove.contains(s)).copied().collect();
            result.extend(&diff.add);
            result.sort_unstable();
            prop_assert_eq!(&result, &new);
            prop_assert!(diff.remove.iter().all(|s| !new.contains(s)), "a slot kept in both is never removed");
        }

        /// Every page is in exactly one slot, read-only exactly when the model
        /// says so, and neighbouring slots in a region never share a type.
        #[test]
        fn plan_matches_naive_model(ro in proptest::collection::vec((0u64..100, 1u64..8), 0..20)) {
            let ranges = merge_ranges(ro.iter().map(|&(s, l)| (s, s + l)).collect());
            let regions = [(0, 60 * PAGE), (80 * PAGE, 120 * PAGE)];
            let slots = plan_memslots(&regions, &ranges, usize::MAX).expect("unbounded");
            for &(start, end) in &regions {
                for page in start / PAGE..end / PAGE {
                    let covering: Vec<_> = slots.iter().filter(|s| s.gpa / PAGE <= page && page < (s.gpa + s.size) / PAGE).collect();
                    prop_assert_eq!(covering.len(), 1);
                    let expected = ranges.iter().any(|&(s, e)| s <= page && page < e);
                    prop_assert_eq!(covering[0].readonly, expected);
                }
            }
            for pair in slots.windows(2) {
                if pair[0].gpa + pair[0].size == pair[1].gpa {
                    prop_assert_ne!(pair[0].readonly, pair[1].readonly);
                }
            }
        }
    }
}
