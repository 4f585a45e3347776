//! Translation integrity: the kernel virtual ranges a guest locked with
//! LOCK_MAPPINGS, what they translated to when locked, and the cheap check
//! that a vCPU's live CR3 still reaches them that way.
//!
//! Everything below the top level of the paging structures is locked
//! read-only when a range is locked, so the only way left to change the
//! translation is a different top-level entry: in the top-level page of
//! another process, or of a private CR3 an attacker loads. The steady-state
//! check therefore reads one top-level entry per covered slot of the live
//! CR3 (usually one or two reads) and walks in full only when an entry
//! differs, to report what the range reaches now.
// Guest-supplied numbers: no unchecked arithmetic here.
#![deny(clippy::arithmetic_side_effects)]

use serde::Serialize;

use crate::page_walk::{self, Found, PageFlags, PagingMode, PhysRead, RangeMap, WalkError};

/// LOCK_MAPPINGS' arg2 bits.
pub mod expect {
    /// No page of the range may be writable through the mapping, and each
    /// page it reaches must be locked without WRITE.
    pub const READ_ONLY: u64 = 1 << 0;
    /// No page of the range may be executable.
    pub const NO_EXEC: u64 = 1 << 1;
    pub const ALL: u64 = READ_ONLY | NO_EXEC;
}

/// Longest range one call locks.
pub const MAX_RANGE_LEN: u64 = 1 << 30;
/// Most ranges a guest may lock.
pub const MAX_RANGES: usize = 64;
/// Most recorded mapping runs over all ranges (bounds the VMM's memory: a
/// range of scattered 4 KiB pages records one run per page).
pub const MAX_MAPPINGS: usize = 1 << 16;

const PAGE_MASK: u64 = 0xfff;
/// Physical-address bits of CR3 and of a table entry (bits 12..51).
const ADDR_MASK: u64 = 0x000f_ffff_ffff_f000;
/// The top-level entry bits that decide the translation: present, RW, US,
/// PWT, PCD, PS, the address and NX. Accessed and the ignored bits may
/// differ between copies of the same entry.
const ENTRY_MASK: u64 = 0x800f_ffff_ffff_f09f;

/// Why LOCK_MAPPINGS refused a range (the guest sees the errno).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum LockError {
    #[error("unaligned, empty, too long or non-canonical range, or unknown expectation bits")]
    InvalidArgument,
    #[error("the range is not mapped: {0}")]
    NotMapped(WalkError),
    #[error("the mapping at {va:#x} is {flags}, against the expectations")]
    Expectation { va: u64, flags: PageFlags },
    #[error("too many locked ranges")]
    NoSpace,
}

/// One locked range and what it translated to.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct LockedRange {
    pub va: u64,
    pub len: u64,
    pub expect: u64,
    #[serde(skip)]
    pub map: RangeMap,
}

/// A top-level entry the locked ranges go through: its slot and the value
/// it had when locked.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct TopEntry {
    pub index: u64,
    pub value: u64,
}

/// What a new lock needs the caller to protect.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NewLock {
    pub range: LockedRange,
    /// Page-table pages below the top level (lock READ|IMMUTABLE).
    pub table_pages: Vec<u64>,
    /// Guest-physical addresses of the 8-byte top-level entries in the
    /// locking vCPU's top-level page (byte-protect).
    pub top_entry_gpas: Vec<u64>,
    /// The guest-physical pages the range reaches, as (gpa, len) runs.
    pub targets: Vec<(u64, u64)>,
    top_entries: Vec<TopEntry>,
}

/// A locked range found translated otherwise from some CR3.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Remapped {
    pub cr3: u64,
    pub va: u64,
    pub expected_gpa: u64,
    pub expected_flags: PageFlags,
    /// What the range reaches now, or why it does not.
    pub found: String,
    /// The top-level entries to write back into this CR3's top-level page:
    /// (guest-physical address, value).
    pub repair: Vec<(u64, u64)>,
}

/// All translation locks of a VM.
#[derive(Clone, Debug, Default)]
pub struct TranslationLocks {
    ranges: Vec<LockedRange>,
    top: Vec<TopEntry>,
    mode: Option<PagingMode>,
    /// Every table page below the top level, sorted (for full checks).
    tables: Vec<u64>,
}

fn top_shift(mode: PagingMode) -> u32 {
    if mode.la57() { 48 } else { 39 }
}

fn top_index(mode: PagingMode, va: u64) -> u64 {
    va.checked_shr(top_shift(mode)).unwrap_or(0) & 0x1ff
}

impl TranslationLocks {
    pub fn is_empty(&self) -> bool {
        self.ranges.is_empty()
    }

    pub fn ranges(&self) -> &[LockedRange] {
        &self.ranges
    }

    pub fn top_entries(&self) -> &[TopEntry] {
        &self.top
    }

    /// Walks `[va, va + len)` from `cr3` and says what locking it takes;
    /// nothing changes until `commit`.
    pub fn prepare<M: PhysRead + ?Sized>(
        &self,
        mem: &M,
        cr3: u64,
        mode: PagingMode,
        va: u64,
        len: u64,
        expect: u64,
    ) -> Result<NewLock, LockError> {
        let end = va.checked_add(len).ok_or(LockError::InvalidArgument)?;
        let last = end.checked_sub(1).ok_or(LockError::InvalidArgument)?;
        if va & PAGE_MASK != 0
            || len & PAGE_MASK != 0
            || len == 0
            || len > MAX_RANGE_LEN
            || expect & !expect::ALL != 0
            || !mode.is_canonical(va)
            || !mode.is_canonical(last)
        {
            return Err(LockError::InvalidArgument);
        }
        if self.ranges.len() >= MAX_RANGES {
            return Err(LockError::NoSpace);
        }
        if self.mode.is_some_and(|m| m != mode) {
            // One paging mode per VM: the kernel does not switch it after boot.
            return Err(LockError::InvalidArgument);
        }
        let map = page_walk::walk_range(mem, cr3, mode, va, len).map_err(LockError::NotMapped)?;
        let recorded: usize = self.ranges.iter().map(|r| r.map.mappings.len()).sum();
        if recorded.saturating_add(map.mappings.len()) > MAX_MAPPINGS {
            return Err(LockError::NoSpace);
        }
        for m in &map.mappings {
            let writable = expect & expect::READ_ONLY != 0 && m.flags.writable;
            let executable = expect & expect::NO_EXEC != 0 && m.flags.executable;
            if writable || executable {
                return Err(LockError::Expectation { va: m.va, flags: m.flags });
            }
        }
        let top_page = cr3 & ADDR_MASK;
        let table_pages: Vec<u64> = map.table_pages.iter().copied().filter(|&t| t != top_page).collect();
        let mut indices: Vec<u64> = vec![top_index(mode, va), top_index(mode, last)];
        indices.dedup();
        let mut top_entries = Vec::new();
        let mut top_entry_gpas = Vec::new();
        for index in indices {
            let gpa = top_page | index.checked_shl(3).unwrap_or(0);
            let value = mem.read_u64(gpa).ok_or(LockError::NotMapped(WalkError::BadCr3(cr3)))?;
            top_entries.push(TopEntry { index, value });
            top_entry_gpas.push(gpa);
        }
        let targets = map.mappings.iter().map(|m| (m.gpa, m.len)).collect();
        Ok(NewLock { range: LockedRange { va, len, expect, map }, table_pages, top_entry_gpas, targets, top_entries })
    }

    /// Records a prepared lock once its pages are protected.
    pub fn commit(&mut self, lock: NewLock, mode: PagingMode) {
        self.mode = Some(mode);
        for entry in lock.top_entries {
            if !self.top.iter().any(|t| t.index == entry.index) {
                self.top.push(entry);
            }
        }
        for table in lock.table_pages {
            if let Err(at) = self.tables.binary_search(&table) {
                self.tables.insert(at, table);
            }
        }
        self.ranges.push(lock.range);
    }

    /// The steady-state check from a vCPU's live CR3: the recorded top-level
    /// entries, then (only if one differs) a full walk of the ranges behind
    /// it. `None` while every locked range translates as locked.
    pub fn check<M: PhysRead + ?Sized>(&self, mem: &M, cr3: u64) -> Option<Remapped> {
        let mode = self.mode?;
        let top_page = cr3 & ADDR_MASK;
        let changed: Vec<TopEntry> = self
            .top
            .iter()
            .copied()
            .filter(|t| {
                let found = mem.read_u64(top_page | t.index.checked_shl(3).unwrap_or(0));
                found.is_none_or(|v| v & ENTRY_MASK != t.value & ENTRY_MASK)
            })
            .collect();
        if changed.is_empty() {
            return None;
        }
        let repair: Vec<(u64, u64)> =
            changed.iter().map(|t| (top_page | t.index.checked_shl(3).unwrap_or(0), t.value)).collect();
        // The tables this CR3 may use: the locked ones and its own top page.
        let mut tables = self.tables.clone();
        if let Err(at) = tables.binary_search(&top_page) {
            tables.insert(at, top_page);
        }
        for range in &self.ranges {
            if !changed
                .iter()
                .any(|t| t.index == top_index(mode, range.va) || t.index == top_index(mode, last_va(range)))
            {
                continue;
            }
            let expected = RangeMap { mappings: range.map.mappings.clone(), table_pages: tables.clone() };
            if let Err(m) = page_walk::check_range(mem, cr3, mode, &expected) {
                let found = match m.found {
                    Found::Mapped { gpa, flags } => format!("gpa={gpa:#x} flags={flags}"),
                    Found::Fault(e) => format!("fault: {e}"),
                    Found::UnlockedTable(t) => format!("through an unlocked page table at {t:#x}"),
                };
                return Some(Remapped {
                    cr3,
                    va: m.va,
                    expected_gpa: m.expected_gpa,
                    expected_flags: m.expected_flags,
                    found,
                    repair,
                });
            }
        }
        // An entry differs in bits that matter, but every range still
        // reaches its pages through locked tables (say, a copy with other
        // cache bits): still not the locked entry, so still reported.
        let first = changed.first().copied()?;
        let range = self.ranges.iter().find(|r| top_index(mode, r.va) == first.index)?;
        let found = mem
            .read_u64(top_page | first.index.checked_shl(3).unwrap_or(0))
            .map_or_else(|| "unreadable top-level entry".to_string(), |v| format!("top-level entry {v:#x}"));
        let expected = range.map.mappings.first()?;
        Some(Remapped { cr3, va: range.va, expected_gpa: expected.gpa, expected_flags: expected.flags, found, repair })
    }
}

fn last_va(range: &LockedRange) -> u64 {
    range.va.saturating_add(range.len.saturating_sub(1))
}

#[cfg(test)]
#[allow(clippy::arithmetic_side_effects)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    const P: u64 = 1;
    const RW: u64 = 2;
    const NX: u64 = 1 << 63;
    const KERNEL_VA: u64 = 0xffff_ffff_8100_0000;

    /// Guest memory as 4 KiB tables, allocated from 0x10_0000 up.
    #[derive(Default)]
    struct Mem {
        pages: HashMap<u64, [u64; 512]>,
        next: u64,
    }

    impl PhysRead for Mem {
        fn read_u64(&self, gpa: u64) -> Option<u64> {
            self.pages.get(&(gpa & !0xfff)).map(|p| p[((gpa & 0xfff) >> 3) as usize])
        }
    }

    impl Mem {
        fn alloc(&mut self) -> u64 {
            self.next = self.next.max(0x10_0000) + 0x1000;
            self.pages.insert(self.next, [0; 512]);
            self.next
        }
        fn set(&mut self, table: u64, index: u64, value: u64) {
            self.pages.get_mut(&table).expect("table")[index as usize] = value;
        }
        fn get(&self, table: u64, index: u64) -> u64 {
            self.pages[&table][index as usize]
        }
        /// Maps `pages` 4 KiB pages at `va` to `gpa` with `flags` under root `cr3`.
        fn map(&mut self, cr3: u64, va: u64, gpa: u64, pages: u64, flags: u64) {
            for i in 0..pages {
                let va = va + i * 0x1000;
                let mut table = cr3;
                for shift in [39u32, 30, 21] {
                    let index = (va >> shift) & 0x1ff;
                    let entry = self.get(table, index);
                    table = if entry & P == 0 {
                        let next = self.alloc();
                        self.set(table, index, next | P | RW);
                        next
                    } else {
                        entry & ADDR_MASK
                    };
                }
                self.set(table, (va >> 12) & 0x1ff, (gpa + i * 0x1000) | flags);
            }
        }
    }

    fn mode() -> PagingMode {
        PagingMode::long_mode(false, true)
    }

    fn locked(mem: &Mem, cr3: u64) -> TranslationLocks {
        let mut locks = TranslationLocks::default();
        let lock = locks.prepare(mem, cr3, mode(), KERNEL_VA, 0x4000, expect::READ_ONLY).expect("lock");
        locks.commit(lock, mode());
        locks
    }

    #[test]
    fn a_lock_names_the_tables_below_the_top_and_the_top_entry() {
        let mut mem = Mem::default();
        let cr3 = mem.alloc();
        mem.map(cr3, KERNEL_VA, 0x20_0000, 4, P);
        let lock =
            TranslationLocks::default().prepare(&mem, cr3, mode(), KERNEL_VA, 0x4000, expect::READ_ONLY).expect("ok");
        assert_eq!(lock.table_pages.len(), 3, "PDPT, PD and PT; the top page is byte-locked instead");
        assert!(!lock.table_pages.contains(&cr3));
        assert_eq!(lock.top_entry_gpas, [cr3 + 511 * 8]);
        assert_eq!(lock.targets, [(0x20_0000, 0x4000)]);
    }

    #[test]
    fn expectations_and_arguments_are_checked() {
        let mut mem = Mem::default();
        let cr3 = mem.alloc();
        mem.map(cr3, KERNEL_VA, 0x20_0000, 1, P | RW | NX);
        let locks = TranslationLocks::default();
        let ro = locks.prepare(&mem, cr3, mode(), KERNEL_VA, 0x1000, expect::READ_ONLY);
        assert!(matches!(ro, Err(LockError::Expectation { va: KERNEL_VA, .. })), "{ro:?}");
        assert!(locks.prepare(&mem, cr3, mode(), KERNEL_VA, 0x1000, expect::NO_EXEC).is_ok());
        for (va, len, expect) in [(KERNEL_VA + 1, 0x1000, 0), (KERNEL_VA, 0, 0), (KERNEL_VA, 0x1000, 4)] {
            assert_eq!(locks.prepare(&mem, cr3, mode(), va, len, expect), Err(LockError::InvalidArgument));
        }
        assert!(matches!(
            locks.prepare(&mem, cr3, mode(), KERNEL_VA + 0x1000, 0x1000, 0),
            Err(LockError::NotMapped(_))
        ));
    }

    #[test]
    fn a_process_copy_of_the_top_entry_passes_with_two_reads_of_nothing_else() {
        let mut mem = Mem::default();
        let cr3 = mem.alloc();
        mem.map(cr3, KERNEL_VA, 0x20_0000, 4, P);
        let locks = locked(&mem, cr3);
        // Another process: its own top page with the kernel entry copied (accessed bit set).
        let process = mem.alloc();
        mem.set(process, 511, mem.get(cr3, 511) | 0x20);
        assert_eq!(locks.check(&mem, process | 0x5), None, "PCID bits in CR3 are ignored");
        assert_eq!(locks.check(&mem, cr3), None);
    }

    #[test]
    fn a_private_cr3_with_its_own_tables_is_found_and_repaired() {
        let mut mem = Mem::default();
        let cr3 = mem.alloc();
        mem.map(cr3, KERNEL_VA, 0x20_0000, 4, P);
        let locks = locked(&mem, cr3);
        // The attacker's private tables map the first page to a writable copy.
        let private = mem.alloc();
        mem.map(private, KERNEL_VA, 0x20_0000, 4, P);
        mem.map(private, KERNEL_VA, 0x30_0000, 1, P | RW);
        let found = locks.check(&mem, private).expect("remapped");
        assert_eq!((found.va, found.expected_gpa), (KERNEL_VA, 0x20_0000));
        assert!(found.found.contains("gpa=0x300000"), "{}", found.found);
        assert_eq!(found.repair, [(private + 511 * 8, mem.get(cr3, 511))]);
        // The private tables mapping the same pages are still not the locked ones.
        let copy = mem.alloc();
        mem.map(copy, KERNEL_VA, 0x20_0000, 4, P);
        let found = locks.check(&mem, copy).expect("unlocked tables");
        assert!(found.found.contains("unlocked page table"), "{}", found.found);
    }

    #[test]
    fn scattered_pages_beyond_the_mapping_budget_are_refused_not_recorded() {
        let mut mem = Mem::default();
        let cr3 = mem.alloc();
        // 512 pages of one PT, each pointing at the same frame: 512 runs.
        for i in 0..512 {
            mem.map(cr3, KERNEL_VA + i * 0x1000, 0x20_0000, 1, P);
        }
        let mut locks = TranslationLocks::default();
        let mut locked = 0;
        loop {
            match locks.prepare(&mem, cr3, mode(), KERNEL_VA, 512 * 0x1000, 0) {
                Ok(lock) => {
                    locks.commit(lock, mode());
                    locked += 1;
                }
                Err(e) => {
                    assert_eq!(e, LockError::NoSpace);
                    break;
                }
            }
        }
        assert_eq!(locked, MAX_RANGES.min(MAX_MAPPINGS / 512));
    }

    #[test]
    fn an_unmapped_top_entry_is_reported_as_a_fault() {
        let mut mem = Mem::default();
        let cr3 = mem.alloc();
        mem.map(cr3, KERNEL_VA, 0x20_0000, 4, P);
        let locks = locked(&mem, cr3);
        let empty = mem.alloc();
        let found = locks.check(&mem, empty).expect("unmapped");
        assert!(found.found.starts_with("fault"), "{}", found.found);
        assert_eq!(locks.check(&mem, 0xdead_0000), locks.check(&mem, 0xdead_0000), "a CR3 outside RAM does not panic");
        assert!(locks.check(&mem, 0xdead_0000).is_some());
    }
}
