//! x86-64 guest page-table walks, for translation-integrity checks: does a
//! kernel virtual address still reach the guest-physical page the guest
//! locked, with the locked permissions?
//!
//! Everything here reads guest-controlled tables. Walks are bounded (at most
//! five levels, no recursion), reads go through `PhysRead`, and range walks
//! step by the leaf size and stop after `MAX_RANGE_LEAVES` leaves.
//!
//! The flags reported are those of the page tables alone: `writable` is what
//! user mode and a supervisor with CR0.WP = 1 see (heki pins CR0.WP), and
//! protection keys, SMEP/SMAP and MTRR/PAT types are out of scope.
// Decodes guest-supplied entries: no unchecked arithmetic here.
#![deny(clippy::arithmetic_side_effects)]

use std::cell::Cell;
use std::collections::BTreeSet;
use std::fmt;

use crate::abi::GuestMemoryReader;

/// Reads guest-physical memory for the walker.
pub trait PhysRead {
    /// The little-endian u64 at `gpa` (8-byte aligned); None if not RAM.
    fn read_u64(&self, gpa: u64) -> Option<u64>;
}

/// Any reader of the page-list decoder can serve the walker too.
impl<T: GuestMemoryReader + ?Sized> PhysRead for T {
    fn read_u64(&self, gpa: u64) -> Option<u64> {
        let mut buf = [0u8; 8];
        self.read(gpa, &mut buf).then(|| u64::from_le_bytes(buf))
    }
}

/// Most leaves one `walk_range` or `check_range` visits (4 GiB of 4 KiB pages).
pub const MAX_RANGE_LEAVES: u64 = 1 << 20;

const CR0_PG: u64 = 1 << 31;
const CR4_PAE: u64 = 1 << 5;
const CR4_LA57: u64 = 1 << 12;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;
const EFER_NXE: u64 = 1 << 11;

const PTE_PRESENT: u64 = 1 << 0;
const PTE_RW: u64 = 1 << 1;
const PTE_US: u64 = 1 << 2;
const PTE_PS: u64 = 1 << 7;
const PTE_NX: u64 = 1 << 63;
/// Bits 12..=51: the widest physical address an entry or CR3 can hold.
const ADDR_MASK: u64 = 0x000f_ffff_ffff_f000;
/// Reserved in a 1 GiB leaf: bits 13..=29 (bit 12 is PAT).
const RSVD_1G: u64 = 0x3fff_e000;
/// Reserved in a 2 MiB leaf: bits 13..=20 (bit 12 is PAT).
const RSVD_2M: u64 = 0x001f_e000;

/// A page-table level, named as in the SDM.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Level {
    Pt,
    Pd,
    Pdpt,
    Pml4,
    Pml5,
}

impl Level {
    /// Lowest VA bit this level's index selects.
    pub fn shift(self) -> u32 {
        match self {
            Level::Pt => 12,
            Level::Pd => 21,
            Level::Pdpt => 30,
            Level::Pml4 => 39,
            Level::Pml5 => 48,
        }
    }

    /// The level a non-leaf entry of this level points to.
    pub fn below(self) -> Option<Level> {
        match self {
            Level::Pt => None,
            Level::Pd => Some(Level::Pt),
            Level::Pdpt => Some(Level::Pd),
            Level::Pml4 => Some(Level::Pdpt),
            Level::Pml5 => Some(Level::Pml4),
        }
    }
}

impl fmt::Display for Level {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Level::Pt => "PT",
            Level::Pd => "PD",
            Level::Pdpt => "PDPT",
            Level::Pml4 => "PML4",
            Level::Pml5 => "PML5",
        })
    }
}

/// Why a translation failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum WalkError {
    #[error("paging is disabled")]
    PagingDisabled,
    #[error("unsupported paging mode: {0}")]
    UnsupportedMode(&'static str),
    #[error("MAXPHYADDR {0} is out of range (32..=52)")]
    BadMaxPhyAddr(u8),
    #[error("CR3 {0:#x} points above MAXPHYADDR")]
    BadCr3(u64),
    #[error("virtual address {0:#x} is not canonical")]
    NonCanonical(u64),
    #[error("range of {len:#x} bytes at {va:#x} wraps around the address space")]
    RangeOverflow { va: u64, len: u64 },
    #[error("range needs more than {MAX_RANGE_LEAVES} leaves")]
    TooManyLeaves,
    #[error("{level} entry for {va:#x} is not present")]
    NotPresent { level: Level, va: u64 },
    #[error("{level} entry {entry:#x} for {va:#x} has reserved bits set")]
    ReservedBits { level: Level, va: u64, entry: u64 },
    #[error("{level} entry for {va:#x} at {gpa:#x} is outside guest RAM")]
    Unreadable { level: Level, va: u64, gpa: u64 },
}

/// The paging mode of a vCPU, from its control registers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PagingMode {
    la57: bool,
    nxe: bool,
    maxphyaddr: u8,
}

impl PagingMode {
    pub const DEFAULT_MAXPHYADDR: u8 = 52;

    /// 4-level (or 5-level with `la57`) long-mode paging, MAXPHYADDR 52.
    pub fn long_mode(la57: bool, nxe: bool) -> Self {
        PagingMode { la57, nxe, maxphyaddr: Self::DEFAULT_MAXPHYADDR }
    }

    /// The mode CR0, CR4 and EFER select. Only long-mode paging is
    /// supported (EFER.LME with CR0.PG and CR4.PAE makes LMA, so either counts).
    pub fn from_regs(cr0: u64, cr4: u64, efer: u64) -> Result<Self, WalkError> {
        if cr0 & CR0_PG == 0 {
            return Err(WalkError::PagingDisabled);
        }
        if cr4 & CR4_PAE == 0 {
            return Err(WalkError::UnsupportedMode("32-bit paging"));
        }
        if efer & (EFER_LME | EFER_LMA) == 0 {
            return Err(WalkError::UnsupportedMode("PAE paging outside long mode"));
        }
        Ok(Self::long_mode(cr4 & CR4_LA57 != 0, efer & EFER_NXE != 0))
    }

    /// The same mode with the CPU's MAXPHYADDR (CPUID 0x80000008 EAX[7:0]).
    pub fn with_maxphyaddr(self, bits: u8) -> Result<Self, WalkError> {
        if !(32..=52).contains(&bits) {
            return Err(WalkError::BadMaxPhyAddr(bits));
        }
        Ok(PagingMode { maxphyaddr: bits, ..self })
    }

    pub fn la57(&self) -> bool {
        self.la57
    }

    pub fn nxe(&self) -> bool {
        self.nxe
    }

    pub fn maxphyaddr(&self) -> u8 {
        self.maxphyaddr
    }

    fn top_level(&self) -> Level {
        if self.la57 { Level::Pml5 } else { Level::Pml4 }
    }

    /// Whether bits 63..=47 (63..=56 with LA57) all equal.
    pub fn is_canonical(&self, va: u64) -> bool {
        let top = va.checked_shr(if self.la57 { 56 } else { 47 }).unwrap_or(0);
        let ones = if self.la57 { 0xff } else { 0x1_ffff };
        top == 0 || top == ones
    }

    /// Bits 12..MAXPHYADDR: where a table or page address may lie.
    fn phys_mask(&self) -> u64 {
        let below = u64::MAX.checked_shr(64u32.saturating_sub(u32::from(self.maxphyaddr))).unwrap_or(0);
        below & ADDR_MASK
    }

    /// Bits reserved in every entry: MAXPHYADDR..=51, and NX without EFER.NXE.
    fn reserved_mask(&self) -> u64 {
        let nx = if self.nxe { 0 } else { PTE_NX };
        (ADDR_MASK & !self.phys_mask()) | nx
    }
}

/// Size of a leaf page.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum PageSize {
    Size4K,
    Size2M,
    Size1G,
}

impl PageSize {
    pub fn bytes(self) -> u64 {
        match self {
            PageSize::Size4K => 1 << 12,
            PageSize::Size2M => 1 << 21,
            PageSize::Size1G => 1 << 30,
        }
    }

    /// Low-address mask: the offset bits within a page of this size.
    fn offset_mask(self) -> u64 {
        self.bytes().saturating_sub(1)
    }
}

/// Effective permissions of a translation, accumulated over every level.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct PageFlags {
    /// R/W set at every level.
    pub writable: bool,
    /// U/S set at every level.
    pub user: bool,
    /// NX clear at every level (always, without EFER.NXE).
    pub executable: bool,
}

impl fmt::Display for PageFlags {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let w = if self.writable { 'w' } else { '-' };
        let x = if self.executable { 'x' } else { '-' };
        let u = if self.user { 'u' } else { 's' };
        write!(f, "r{w}{x}{u}")
    }
}

/// Where one virtual address leads.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Translation {
    /// The guest-physical address of the byte at `va`.
    pub gpa: u64,
    pub page_size: PageSize,
    pub flags: PageFlags,
    /// Guest-physical addresses of the table pages read, root first.
    pub table_pages: Vec<u64>,
}

/// The leaf a walk ends on, without the table list.
struct Leaf {
    gpa: u64,
    page_size: PageSize,
    flags: PageFlags,
}

/// Translates `va` as the vCPU with `cr3` in `mode` would. CR3's PCID, flag,
/// LAM and no-flush bits are ignored.
pub fn walk<M: PhysRead + ?Sized>(mem: &M, cr3: u64, mode: PagingMode, va: u64) -> Result<Translation, WalkError> {
    let mut table_pages = Vec::with_capacity(5);
    let leaf = walk_with(mem, cr3, mode, va, |t| table_pages.push(t))?;
    Ok(Translation { gpa: leaf.gpa, page_size: leaf.page_size, flags: leaf.flags, table_pages })
}

/// The walk itself; `visit` sees each table page before it is read.
fn walk_with<M: PhysRead + ?Sized>(
    mem: &M,
    cr3: u64,
    mode: PagingMode,
    va: u64,
    mut visit: impl FnMut(u64),
) -> Result<Leaf, WalkError> {
    if !mode.is_canonical(va) {
        return Err(WalkError::NonCanonical(va));
    }
    let phys = mode.phys_mask();
    let reserved = mode.reserved_mask();
    let mut table = cr3 & ADDR_MASK;
    if table & !phys != 0 {
        return Err(WalkError::BadCr3(cr3));
    }
    let mut flags = PageFlags { writable: true, user: true, executable: true };
    let mut level = mode.top_level();
    // One iteration per level: at most five reads, whatever the tables hold.
    loop {
        visit(table);
        let index = va.checked_shr(level.shift()).unwrap_or(0) & 0x1ff;
        // `table` is page-aligned and index * 8 < 4096: OR is addition here.
        let gpa = table | index.checked_shl(3).unwrap_or(0);
        let entry = mem.read_u64(gpa).ok_or(WalkError::Unreadable { level, va, gpa })?;
        if entry & PTE_PRESENT == 0 {
            return Err(WalkError::NotPresent { level, va });
        }
        let large = entry & PTE_PS != 0;
        let size = match level {
            Level::Pt => Some(PageSize::Size4K),
            Level::Pd if large => Some(PageSize::Size2M),
            Level::Pdpt if large => Some(PageSize::Size1G),
            _ => None,
        };
        let level_reserved = match (level, size) {
            (Level::Pml5 | Level::Pml4, _) => PTE_PS,
            (_, Some(PageSize::Size1G)) => RSVD_1G,
            (_, Some(PageSize::Size2M)) => RSVD_2M,
            _ => 0,
        };
        if entry & (reserved | level_reserved) != 0 {
            return Err(WalkError::ReservedBits { level, va, entry });
        }
        flags.writable &= entry & PTE_RW != 0;
        flags.user &= entry & PTE_US != 0;
        flags.executable &= !mode.nxe || entry & PTE_NX == 0;
        match (size, level.below()) {
            (None, Some(below)) => {
                table = entry & phys;
                level = below;
            }
            // A PT entry is always a leaf (size is Some there).
            (size, _) => {
                let page_size = size.unwrap_or(PageSize::Size4K);
                let base = entry & phys & !page_size.offset_mask();
                return Ok(Leaf { gpa: base | (va & page_size.offset_mask()), page_size, flags });
            }
        }
    }
}

/// A run of virtual addresses mapping contiguous guest-physical addresses
/// with the same flags.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Mapping {
    pub va: u64,
    pub gpa: u64,
    pub len: u64,
    pub flags: PageFlags,
}

impl Mapping {
    /// Extends this run by `len` bytes at `va`→`gpa` if they continue it.
    fn try_extend(&mut self, va: u64, gpa: u64, len: u64, flags: PageFlags) -> bool {
        let continues = self.flags == flags
            && self.va.checked_add(self.len) == Some(va)
            && self.gpa.checked_add(self.len) == Some(gpa);
        match self.len.checked_add(len) {
            Some(total) if continues => {
                self.len = total;
                true
            }
            _ => false,
        }
    }
}

/// Everything a VA range maps to, and the tables that say so.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RangeMap {
    /// Maximal runs, in VA order, covering the range exactly.
    pub mappings: Vec<Mapping>,
    /// Guest-physical addresses of every table page read, sorted, unique:
    /// the pages to lock read-only so the translation cannot change.
    pub table_pages: Vec<u64>,
}

/// Steps through [va_start, va_start + len) one leaf at a time, calling
/// `each(va, chunk_len, leaf)` for the part of each leaf inside the range.
fn for_each_leaf<M: PhysRead + ?Sized, E>(
    mem: &M,
    cr3: u64,
    mode: PagingMode,
    va_start: u64,
    len: u64,
    mut visit: impl FnMut(u64),
    mut each: impl FnMut(u64, u64, Result<Leaf, WalkError>) -> Result<(), E>,
) -> Result<(), E> {
    let Some(len_minus_one) = len.checked_sub(1) else {
        return Ok(());
    };
    let Some(last) = va_start.checked_add(len_minus_one) else {
        return each(va_start, len, Err(WalkError::RangeOverflow { va: va_start, len }));
    };
    let mut va = va_start;
    let mut leaves = 0u64;
    loop {
        leaves = leaves.saturating_add(1);
        if leaves > MAX_RANGE_LEAVES {
            return each(va, 0, Err(WalkError::TooManyLeaves));
        }
        let leaf = match walk_with(mem, cr3, mode, va, &mut visit) {
            Ok(leaf) => leaf,
            Err(e) => return each(va, 0, Err(e)),
        };
        let chunk_last = (va | leaf.page_size.offset_mask()).min(last);
        // chunk_last >= va, and chunk_last < last <= u64::MAX below.
        let chunk_len = chunk_last.saturating_sub(va).saturating_add(1);
        each(va, chunk_len, Ok(leaf))?;
        if chunk_last == last {
            return Ok(());
        }
        va = chunk_last.saturating_add(1);
    }
}

/// Translates a whole VA range, one walk per leaf: a 2 MiB page costs one
/// walk, not 512. Fails with the first address that does not translate.
pub fn walk_range<M: PhysRead + ?Sized>(
    mem: &M,
    cr3: u64,
    mode: PagingMode,
    va_start: u64,
    len: u64,
) -> Result<RangeMap, WalkError> {
    let mut tables = BTreeSet::new();
    let mut mappings: Vec<Mapping> = Vec::new();
    for_each_leaf(
        mem,
        cr3,
        mode,
        va_start,
        len,
        |t| {
            tables.insert(t);
        },
        |va, len, leaf| {
            let leaf = leaf?;
            let extended = mappings.last_mut().is_some_and(|m| m.try_extend(va, leaf.gpa, len, leaf.flags));
            if !extended {
                mappings.push(Mapping { va, gpa: leaf.gpa, len, flags: leaf.flags });
            }
            Ok(())
        },
    )?;
    Ok(RangeMap { mappings, table_pages: tables.into_iter().collect() })
}

/// What a check found where the expected mapping should be.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Found {
    /// The address maps elsewhere or with other flags.
    Mapped { gpa: u64, flags: PageFlags },
    /// The address no longer translates.
    Fault(WalkError),
    /// The translation is right but reads a table page outside the locked set.
    UnlockedTable(u64),
}

impl fmt::Display for Found {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Found::Mapped { gpa, flags } => write!(f, "{gpa:#x} {flags}"),
            Found::Fault(e) => write!(f, "a fault: {e}"),
            Found::UnlockedTable(gpa) => write!(f, "a walk through unlocked table page {gpa:#x}"),
        }
    }
}

/// The first place a range no longer translates as recorded.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{va:#x} should map {expected_gpa:#x} {expected_flags}, found {found}")]
pub struct Mismatch {
    pub va: u64,
    pub expected_gpa: u64,
    pub expected_flags: PageFlags,
    pub found: Found,
}

/// Re-walks every run of `expected` (from `walk_range`) and reports the first
/// address, in run order, whose gpa or flags changed, that no longer
/// translates, or whose walk reads a table page not in `expected.table_pages`.
/// Costs one walk per current leaf; nothing is allocated.
pub fn check_range<M: PhysRead + ?Sized>(
    mem: &M,
    cr3: u64,
    mode: PagingMode,
    expected: &RangeMap,
) -> Result<(), Mismatch> {
    let mut budget = MAX_RANGE_LEAVES;
    for m in &expected.mappings {
        // Set by the table visitor, read by the leaf check.
        let unlocked = Cell::new(None);
        let mut walked = 0u64;
        let result = for_each_leaf(
            mem,
            cr3,
            mode,
            m.va,
            m.len,
            |t| {
                if unlocked.get().is_none() && expected.table_pages.binary_search(&t).is_err() {
                    unlocked.set(Some(t));
                }
            },
            |va, _, leaf| {
                walked = walked.saturating_add(1);
                let expected_gpa = m.gpa.wrapping_add(va.wrapping_sub(m.va));
                let mismatch = |found| Err(Mismatch { va, expected_gpa, expected_flags: m.flags, found });
                let found = match leaf {
                    Err(e) => Found::Fault(e),
                    Ok(_) if walked > budget => Found::Fault(WalkError::TooManyLeaves),
                    Ok(leaf) if leaf.gpa != expected_gpa || leaf.flags != m.flags => {
                        Found::Mapped { gpa: leaf.gpa, flags: leaf.flags }
                    }
                    Ok(_) => match unlocked.get() {
                        Some(table) => Found::UnlockedTable(table),
                        None => return Ok(()),
                    },
                };
                mismatch(found)
            },
        );
        result?;
        budget = budget.saturating_sub(walked);
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::arithmetic_side_effects)]
mod tests {
    use std::collections::HashMap;

    use proptest::prelude::*;

    use super::*;

    const P: u64 = PTE_PRESENT;
    const RW: u64 = PTE_RW;
    const US: u64 = PTE_US;
    const PS: u64 = PTE_PS;
    const NX: u64 = PTE_NX;
    const TABLE: u64 = P | RW | US;
    const ROOT: u64 = 0x10_0000;

    /// Guest RAM made of page-table pages; everything else is not RAM.
    #[derive(Default)]
    struct FakeMem {
        pages: HashMap<u64, Box<[u64; 512]>>,
        next: u64,
        reads: Cell<u64>,
    }

    impl PhysRead for FakeMem {
        fn read_u64(&self, gpa: u64) -> Option<u64> {
            self.reads.set(self.reads.get() + 1);
            self.pages.get(&(gpa & !0xfff)).map(|p| p[((gpa & 0xfff) >> 3) as usize])
        }
    }

    impl FakeMem {
        fn new() -> Self {
            let mut mem = FakeMem { next: ROOT, ..Default::default() };
            mem.alloc();
            mem
        }

        fn alloc(&mut self) -> u64 {
            let t = self.next;
            self.pages.insert(t, Box::new([0; 512]));
            self.next += 0x1000;
            t
        }

        fn index(va: u64, level: Level) -> usize {
            ((va >> level.shift()) & 0x1ff) as usize
        }

        /// Writes `leaf` as the `level` entry for `va`, creating missing tables
        /// with `upper(level)` flags. Returns the table pages on the path.
        fn map(&mut self, la57: bool, va: u64, level: Level, leaf: u64, upper: impl Fn(Level) -> u64) -> Vec<u64> {
            let mut at = if la57 { Level::Pml5 } else { Level::Pml4 };
            let mut table = ROOT;
            let mut path = vec![ROOT];
            while at != level {
                let i = Self::index(va, at);
                let entry = self.pages[&table][i];
                table = if entry & P == 0 {
                    let t = self.alloc();
                    self.pages.get_mut(&table).expect("table")[i] = t | upper(at);
                    t
                } else {
                    entry & ADDR_MASK
                };
                path.push(table);
                at = at.below().expect("leaf level is below");
            }
            self.pages.get_mut(&table).expect("table")[Self::index(va, level)] = leaf;
            path
        }

        /// Location of the `level` entry for `va` (tables must exist).
        fn entry_mut(&mut self, la57: bool, va: u64, level: Level) -> &mut u64 {
            let mut at = if la57 { Level::Pml5 } else { Level::Pml4 };
            let mut table = ROOT;
            while at != level {
                table = self.pages[&table][Self::index(va, at)] & ADDR_MASK;
                at = at.below().expect("level is below");
            }
            &mut self.pages.get_mut(&table).expect("table")[Self::index(va, level)]
        }
    }

    fn mode4() -> PagingMode {
        PagingMode::long_mode(false, true)
    }

    const KVA: u64 = 0xffff_ffff_8000_0000;

    fn rwx() -> PageFlags {
        PageFlags { writable: true, user: false, executable: true }
    }

    #[test]
    fn a_4k_leaf_translates_and_lists_every_table() {
        let mut mem = FakeMem::new();
        let path = mem.map(false, KVA, Level::Pt, 0x5000 | P | RW, |_| TABLE);
        let t = walk(&mem, ROOT, mode4(), KVA + 0x123).expect("mapped");
        assert_eq!(t.gpa, 0x5123);
        assert_eq!(t.page_size, PageSize::Size4K);
        assert_eq!(t.flags, rwx());
        assert_eq!(t.table_pages, path);
        assert_eq!(t.table_pages.len(), 4);
    }

    #[test]
    fn a_2m_leaf_translates_and_pat_is_not_address() {
        let mut mem = FakeMem::new();
        mem.map(false, KVA, Level::Pd, 0x4020_0000 | 0x1000 | PS | P, |_| TABLE);
        let t = walk(&mem, ROOT, mode4(), KVA + 0x1f_fff8).expect("mapped");
        assert_eq!(t.gpa, 0x403f_fff8);
        assert_eq!(t.page_size, PageSize::Size2M);
        assert!(!t.flags.writable);
        assert_eq!(t.table_pages.len(), 3);
    }

    #[test]
    fn a_1g_leaf_translates() {
        let mut mem = FakeMem::new();
        mem.map(false, 0x40_0000_0000, Level::Pdpt, 0x8_4000_0000 | PS | P | RW | US, |_| TABLE);
        let t = walk(&mem, ROOT, mode4(), 0x40_1234_5678).expect("mapped");
        assert_eq!(t.gpa, 0x8_5234_5678);
        assert_eq!(t.page_size, PageSize::Size1G);
        assert_eq!(t.flags, PageFlags { writable: true, user: true, executable: true });
        assert_eq!(t.table_pages.len(), 2);
    }

    #[test]
    fn nx_at_any_level_forbids_execution_only_with_efer_nxe() {
        let mut mem = FakeMem::new();
        mem.map(false, KVA, Level::Pt, 0x5000 | P, |l| if l == Level::Pd { TABLE | NX } else { TABLE });
        let t = walk(&mem, ROOT, mode4(), KVA).expect("mapped");
        assert!(!t.flags.executable);
        let no_nxe = PagingMode::long_mode(false, false);
        assert_eq!(
            walk(&mem, ROOT, no_nxe, KVA),
            Err(WalkError::ReservedBits { level: Level::Pd, va: KVA, entry: (ROOT + 0x3000) | TABLE | NX })
        );
    }

    #[test]
    fn rw_and_us_are_the_and_of_every_level() {
        let mut mem = FakeMem::new();
        mem.map(false, KVA, Level::Pt, 0x5000 | P | RW | US, |l| if l == Level::Pml4 { P | US } else { P | RW });
        let t = walk(&mem, ROOT, mode4(), KVA).expect("mapped");
        assert_eq!(t.flags, PageFlags { writable: false, user: false, executable: true });
    }

    #[test]
    fn five_level_paging_walks_pml5() {
        let mode = PagingMode::long_mode(true, true);
        let va = 0xff12_3456_7800_0000; // canonical only with LA57
        let mut mem = FakeMem::new();
        mem.map(true, va, Level::Pd, 0x20_0000 | PS | P | RW, |_| TABLE);
        let t = walk(&mem, ROOT, mode, va + 0x10).expect("mapped");
        assert_eq!(t.gpa, 0x20_0010);
        assert_eq!(t.table_pages.len(), 4);
        assert_eq!(walk(&mem, ROOT, mode4(), va), Err(WalkError::NonCanonical(va)));
    }

    #[test]
    fn non_canonical_addresses_are_refused() {
        let mem = FakeMem::new();
        for va in [0x0000_8000_0000_0000, 0xffff_7fff_ffff_ffff, 0x1234_0000_0000_0000] {
            assert_eq!(walk(&mem, ROOT, mode4(), va), Err(WalkError::NonCanonical(va)));
        }
        let la57 = PagingMode::long_mode(true, true);
        assert_eq!(walk(&mem, ROOT, la57, 1 << 56), Err(WalkError::NonCanonical(1 << 56)));
    }

    #[test]
    fn not_present_names_the_level() {
        let mut mem = FakeMem::new();
        assert_eq!(walk(&mem, ROOT, mode4(), KVA), Err(WalkError::NotPresent { level: Level::Pml4, va: KVA }));
        mem.map(false, KVA, Level::Pt, 0x5000, |_| TABLE);
        assert_eq!(walk(&mem, ROOT, mode4(), KVA), Err(WalkError::NotPresent { level: Level::Pt, va: KVA }));
        *mem.entry_mut(false, KVA, Level::Pd) &= !P;
        assert_eq!(walk(&mem, ROOT, mode4(), KVA), Err(WalkError::NotPresent { level: Level::Pd, va: KVA }));
        let la57 = PagingMode::long_mode(true, true);
        let empty = FakeMem::new();
        assert_eq!(walk(&empty, ROOT, la57, KVA), Err(WalkError::NotPresent { level: Level::Pml5, va: KVA }));
    }

    #[test]
    fn reserved_bits_are_refused() {
        let narrow = mode4().with_maxphyaddr(40).expect("valid");
        let mut mem = FakeMem::new();
        mem.map(false, KVA, Level::Pt, (1 << 45) | 0x5000 | P, |_| TABLE);
        assert_eq!(walk(&mem, ROOT, mode4(), KVA).map(|t| t.gpa), Ok((1 << 45) | 0x5000));
        let err = walk(&mem, ROOT, narrow, KVA);
        assert!(matches!(err, Err(WalkError::ReservedBits { level: Level::Pt, .. })), "{err:?}");

        // PS in a PML4 entry, and low bits of large-page frames.
        let mut mem = FakeMem::new();
        mem.map(false, KVA, Level::Pml4, 0x7000 | PS | TABLE, |_| TABLE);
        assert!(matches!(walk(&mem, ROOT, mode4(), KVA), Err(WalkError::ReservedBits { level: Level::Pml4, .. })));
        let mut mem = FakeMem::new();
        mem.map(false, KVA, Level::Pd, 0x20_0000 | 0x2000 | PS | P, |_| TABLE);
        assert!(matches!(walk(&mem, ROOT, mode4(), KVA), Err(WalkError::ReservedBits { level: Level::Pd, .. })));
        let mut mem = FakeMem::new();
        mem.map(false, KVA, Level::Pdpt, 0x4000_0000 | 0x20_0000 | PS | P, |_| TABLE);
        assert!(matches!(walk(&mem, ROOT, mode4(), KVA), Err(WalkError::ReservedBits { level: Level::Pdpt, .. })));
    }

    #[test]
    fn pcid_flag_and_no_flush_bits_in_cr3_are_ignored() {
        let mut mem = FakeMem::new();
        mem.map(false, KVA, Level::Pt, 0x5000 | P, |_| TABLE);
        let plain = walk(&mem, ROOT, mode4(), KVA).expect("mapped");
        let cr3 = ROOT | 0xabc | (1 << 63) | (1 << 62) | (1 << 61);
        assert_eq!(walk(&mem, cr3, mode4(), KVA), Ok(plain));
        let narrow = mode4().with_maxphyaddr(36).expect("valid");
        assert_eq!(walk(&mem, ROOT | (1 << 40), narrow, KVA), Err(WalkError::BadCr3(ROOT | (1 << 40))));
    }

    #[test]
    fn a_table_outside_ram_is_reported_not_panicked_on() {
        let mut mem = FakeMem::new();
        mem.map(false, KVA, Level::Pdpt, 0xdead_0000 | TABLE, |_| TABLE);
        assert_eq!(
            walk(&mem, ROOT, mode4(), KVA),
            Err(WalkError::Unreadable { level: Level::Pd, va: KVA, gpa: 0xdead_0000 })
        );
    }

    #[test]
    fn a_cyclic_table_ends_after_the_last_level() {
        // Every entry of the root points at the root itself.
        let mut mem = FakeMem::new();
        mem.pages.get_mut(&ROOT).expect("root").fill(ROOT | TABLE);
        let t = walk(&mem, ROOT, mode4(), KVA).expect("self-map reaches a leaf");
        assert_eq!(t.gpa, ROOT);
        assert_eq!(t.table_pages, vec![ROOT; 4]);
        assert_eq!(mem.reads.get(), 4);
        let r = walk_range(&mem, ROOT, mode4(), KVA, 1 << 20).expect("self-map");
        assert_eq!(r.mappings.len(), 256, "every page maps the root: no runs merge");
        assert_eq!(r.table_pages, vec![ROOT]);
    }

    #[test]
    fn mode_comes_from_control_registers() {
        let (pg, pae, lme, lma) = (CR0_PG | 1, CR4_PAE, EFER_LME, EFER_LMA);
        assert_eq!(PagingMode::from_regs(1, pae, lme | lma), Err(WalkError::PagingDisabled));
        assert!(matches!(PagingMode::from_regs(pg, 0, 0), Err(WalkError::UnsupportedMode(_))));
        assert!(matches!(PagingMode::from_regs(pg, pae, 0), Err(WalkError::UnsupportedMode(_))));
        assert_eq!(PagingMode::from_regs(pg, pae, lme | lma), Ok(PagingMode::long_mode(false, false)));
        let mode = PagingMode::from_regs(pg, pae | CR4_LA57, lma | EFER_NXE).expect("long mode");
        assert!(mode.la57() && mode.nxe());
        assert_eq!(mode.maxphyaddr(), 52);
        assert_eq!(mode.with_maxphyaddr(31), Err(WalkError::BadMaxPhyAddr(31)));
        assert_eq!(mode.with_maxphyaddr(53), Err(WalkError::BadMaxPhyAddr(53)));
    }

    #[test]
    fn walk_range_walks_a_2m_page_once_and_merges_contiguous_pages() {
        let mut mem = FakeMem::new();
        // 2 MiB at KVA, then 4 KiB pages continuing it, then one read-only page.
        mem.map(false, KVA, Level::Pd, 0x20_0000 | PS | P | RW, |_| TABLE);
        for i in 0..3 {
            mem.map(false, KVA + 0x20_0000 + i * 0x1000, Level::Pt, (0x40_0000 + i * 0x1000) | P | RW, |_| TABLE);
        }
        mem.map(false, KVA + 0x20_3000, Level::Pt, 0x40_3000 | P, |_| TABLE);
        mem.reads.set(0);
        let r = walk_range(&mem, ROOT, mode4(), KVA + 0x10, 0x20_3ff0).expect("mapped");
        assert_eq!(mem.reads.get(), 3 + 4 * 4, "one walk for the 2 MiB page, one per 4 KiB page");
        let ro = PageFlags { writable: false, ..rwx() };
        assert_eq!(
            r.mappings,
            vec![
                Mapping { va: KVA + 0x10, gpa: 0x20_0010, len: 0x20_2ff0, flags: rwx() },
                Mapping { va: KVA + 0x20_3000, gpa: 0x40_3000, len: 0x1000, flags: ro },
            ]
        );
        assert_eq!(r.table_pages.len(), 4, "root, PDPT, PD, PT");
        assert_eq!(check_range(&mem, ROOT, mode4(), &r), Ok(()));
    }

    #[test]
    fn walk_range_fails_at_the_first_hole_and_refuses_wrapping() {
        let mut mem = FakeMem::new();
        mem.map(false, KVA, Level::Pt, 0x5000 | P, |_| TABLE);
        assert_eq!(
            walk_range(&mem, ROOT, mode4(), KVA, 0x1001),
            Err(WalkError::NotPresent { level: Level::Pt, va: KVA + 0x1000 })
        );
        assert_eq!(walk_range(&mem, ROOT, mode4(), KVA, 0), Ok(RangeMap::default()));
        assert_eq!(
            walk_range(&mem, ROOT, mode4(), u64::MAX, 2),
            Err(WalkError::RangeOverflow { va: u64::MAX, len: 2 })
        );
        assert!(walk_range(&mem, ROOT, mode4(), u64::MAX, 1).is_err(), "no panic at the top");
    }

    #[test]
    fn check_range_reports_remaps_faults_and_unlocked_tables() {
        let mut mem = FakeMem::new();
        mem.map(false, KVA, Level::Pd, 0x20_0000 | PS | P | RW, |_| TABLE);
        mem.map(false, KVA + 0x20_0000, Level::Pt, 0x40_0000 | P | RW, |_| TABLE);
        let locked = walk_range(&mem, ROOT, mode4(), KVA, 0x20_1000).expect("mapped");
        assert_eq!(check_range(&mem, ROOT, mode4(), &locked), Ok(()));

        // The 4 KiB page made read-only.
        *mem.entry_mut(false, KVA + 0x20_0000, Level::Pt) &= !RW;
        let m = check_range(&mem, ROOT, mode4(), &locked).expect_err("flags changed");
        assert_eq!((m.va, m.expected_gpa), (KVA + 0x20_0000, 0x40_0000));
        assert_eq!(m.found, Found::Mapped { gpa: 0x40_0000, flags: PageFlags { writable: false, ..rwx() } });
        *mem.entry_mut(false, KVA + 0x20_0000, Level::Pt) |= RW;

        // The 2 MiB page split into a new (unlocked) page table, same mapping.
        let pt = mem.alloc();
        for i in 0..512u64 {
            mem.pages.get_mut(&pt).expect("pt")[i as usize] = (0x20_0000 + i * 0x1000) | P | RW;
        }
        *mem.entry_mut(false, KVA, Level::Pd) = pt | TABLE;
        assert_eq!(walk_range(&mem, ROOT, mode4(), KVA, 0x20_1000).expect("mapped").mappings, locked.mappings);
        let m = check_range(&mem, ROOT, mode4(), &locked).expect_err("new table");
        assert_eq!((m.va, m.found), (KVA, Found::UnlockedTable(pt)));

        // Unmapped.
        *mem.entry_mut(false, KVA, Level::Pd) = 0;
        let m = check_range(&mem, ROOT, mode4(), &locked).expect_err("unmapped");
        assert_eq!(m.found, Found::Fault(WalkError::NotPresent { level: Level::Pd, va: KVA }));
        assert!(m.to_string().contains("not present"), "{m}");
    }

    #[test]
    fn a_guest_memory_reader_serves_as_phys_read() {
        struct Bytes(Vec<u8>);
        impl GuestMemoryReader for Bytes {
            fn read(&self, gpa: u64, buf: &mut [u8]) -> bool {
                let s = gpa as usize;
                self.0.get(s..s + buf.len()).map(|src| buf.copy_from_slice(src)).is_some()
            }
        }
        let mut bytes = vec![0u8; 16];
        bytes[8..].copy_from_slice(&0x1122_3344_5566_7788u64.to_le_bytes());
        let mem = Bytes(bytes);
        assert_eq!(PhysRead::read_u64(&mem, 8), Some(0x1122_3344_5566_7788));
        assert_eq!(PhysRead::read_u64(&mem, 16), None);
    }

    // ---- Property test against an independent reference model ----

    /// Indices the generator picks at each level: both address-space halves
    /// and table edges, so leaves share tables and collide often.
    const INDICES: [u64; 6] = [0, 1, 255, 256, 510, 511];
    const LEVELS: [Level; 5] = [Level::Pml5, Level::Pml4, Level::Pdpt, Level::Pd, Level::Pt];
    /// Bits every entry may carry without effect: A, D, G, AVL, PK, high AVL.
    const IGNORED: u64 = 0x7ff0_0000_0000_0f60;

    fn splitmix(x: u64) -> u64 {
        let mut z = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn sign_extend(lin: u64, bits: u32) -> u64 {
        (((lin << (64 - bits)) as i64) >> (64 - bits)) as u64
    }

    /// Flags of the non-leaf entry at `level` covering `va`: a fixed function
    /// of the seed, so the encoder and the model agree without sharing tables.
    fn upper_flags(seed: u64, nxe: bool, level: Level, va: u64) -> u64 {
        let h = splitmix(seed ^ splitmix((va >> level.shift()) ^ ((level as u64) << 60)));
        let mut f = P | (h & IGNORED);
        if h & 3 != 0 {
            f |= RW;
        }
        if h & 0xc != 0 {
            f |= US;
        }
        if nxe && h & 0x30 == 0 {
            f |= NX;
        }
        f
    }

    #[derive(Clone, Debug)]
    struct ModelLeaf {
        va: u64,
        size: u64,
        gpa: u64,
        rw: bool,
        us: bool,
        nx: bool,
    }

    impl ModelLeaf {
        fn last(&self) -> u64 {
            self.va + (self.size - 1)
        }
    }

    /// Leaves generated first, then encoded into tables; the model answers
    /// from the leaf list and `upper_flags` alone.
    struct World {
        mem: FakeMem,
        la57: bool,
        nxe: bool,
        seed: u64,
        leaves: Vec<ModelLeaf>,
        /// Table pages the encoder put on each leaf's path.
        paths: Vec<Vec<u64>>,
    }

    /// (leaf size, indices from the top, run length, frame, contiguous gpa, rw/us/nx, noise)
    type Group = (usize, [usize; 5], u64, u64, bool, (bool, bool, bool), u64);

    fn group() -> impl Strategy<Value = Group> {
        (
            0..3usize,
            proptest::array::uniform5(0..INDICES.len()),
            1..5u64,
            any::<u64>(),
            any::<bool>(),
            any::<(bool, bool, bool)>(),
            any::<u64>(),
        )
    }

    impl World {
        fn bits(&self) -> u32 {
            if self.la57 { 57 } else { 48 }
        }

        fn top(&self) -> Level {
            if self.la57 { Level::Pml5 } else { Level::Pml4 }
        }

        fn mode(&self) -> PagingMode {
            PagingMode::long_mode(self.la57, self.nxe)
        }

        fn build(la57: bool, nxe: bool, seed: u64, groups: &[Group]) -> World {
            let mut w = World { mem: FakeMem::new(), la57, nxe, seed, leaves: Vec::new(), paths: Vec::new() };
            let mut noises = Vec::new();
            for &(size_sel, idx, count, frame, contiguous, (rw, us, nx), noise) in groups {
                let level = [Level::Pt, Level::Pd, Level::Pdpt][size_sel];
                let size = 1u64 << level.shift();
                let lin = LEVELS
                    .iter()
                    .filter(|l| l.shift() <= w.top().shift() && l.shift() >= level.shift())
                    .zip(idx)
                    .fold(0, |n, (l, i)| n | INDICES[i] << l.shift());
                let base = (frame % ((1 << 36) / size)) * size;
                for k in 0..count {
                    let lin = lin + k * size;
                    if lin >> w.bits() != 0 {
                        break;
                    }
                    let gpa = base + if contiguous { k } else { 2 * k } * size;
                    let leaf = ModelLeaf { va: sign_extend(lin, w.bits()), size, gpa, rw, us, nx: nx && nxe };
                    if w.leaves.iter().all(|o| o.va > leaf.last() || leaf.va > o.last()) {
                        w.leaves.push(leaf);
                        noises.push(splitmix(noise ^ k) & IGNORED);
                    }
                }
            }
            for (leaf, noise) in w.leaves.iter().zip(noises) {
                let level = LEVELS.into_iter().find(|l| 1u64 << l.shift() == leaf.size).expect("leaf size");
                let mut entry = leaf.gpa | P | noise;
                entry |= if leaf.rw { RW } else { 0 } | if leaf.us { US } else { 0 } | if leaf.nx { NX } else { 0 };
                entry |= if level == Level::Pt { 0 } else { PS };
                let (seed, va) = (w.seed, leaf.va);
                w.paths.push(w.mem.map(la57, va, level, entry, |l| upper_flags(seed, nxe, l, va)));
            }
            w
        }

        /// The model's translation: (gpa, flags, leaf's last va, leaf index).
        fn lookup(&self, va: u64) -> Result<(u64, PageFlags, u64, usize), WalkError> {
            let bits = self.bits();
            if sign_extend(va & ((1 << bits) - 1), bits) != va {
                return Err(WalkError::NonCanonical(va));
            }
            let upper = |l: &Level| l.shift() <= self.top().shift();
            if let Some(i) = self.leaves.iter().position(|l| l.va <= va && va <= l.last()) {
                let leaf = &self.leaves[i];
                let mut flags = PageFlags { writable: leaf.rw, user: leaf.us, executable: !leaf.nx };
                for level in LEVELS.iter().filter(|l| upper(l) && 1u64 << l.shift() > leaf.size) {
                    let f = upper_flags(self.seed, self.nxe, *level, va);
                    flags.writable &= f & RW != 0;
                    flags.user &= f & US != 0;
                    flags.executable &= f & NX == 0;
                }
                return Ok((leaf.gpa + (va - leaf.va), flags, leaf.last(), i));
            }
            // An entry exists exactly when some leaf lies in the span it covers.
            for level in LEVELS.into_iter().filter(upper) {
                let lo = va & !((1u64 << level.shift()) - 1);
                let hi = lo + ((1u64 << level.shift()) - 1);
                if !self.leaves.iter().any(|l| l.va <= hi && lo <= l.last()) {
                    return Err(WalkError::NotPresent { level, va });
                }
            }
            unreachable!("an address no leaf covers is missing at some level")
        }

        /// The model's runs over [start, start + len), and the tables used.
        fn range(&self, start: u64, len: u64) -> Result<RangeMap, WalkError> {
            let last = start.checked_add(len - 1).ok_or(WalkError::RangeOverflow { va: start, len })?;
            let mut mappings: Vec<Mapping> = Vec::new();
            let mut tables = BTreeSet::new();
            let mut va = start;
            loop {
                let (gpa, flags, leaf_last, i) = self.lookup(va)?;
                tables.extend(self.paths[i].iter().copied());
                let end = leaf_last.min(last);
                let len = end - va + 1;
                match mappings.last_mut() {
                    Some(m) if m.va + m.len == va && m.gpa + m.len == gpa && m.flags == flags => m.len += len,
                    _ => mappings.push(Mapping { va, gpa, len, flags }),
                }
                if end == last {
                    return Ok(RangeMap { mappings, table_pages: tables.into_iter().collect() });
                }
                va = end + 1;
            }
        }

        /// A probe address: in or just past a leaf, near the leaves, or anywhere.
        fn probe(&self, kind: u8, pick: prop::sample::Index, r: u64) -> u64 {
            let near = |leaf: &ModelLeaf| match kind {
                0 => leaf.va + r % leaf.size,
                _ => leaf.last().wrapping_add(1 + r % 0x3000),
            };
            match (kind, self.leaves.is_empty()) {
                (0 | 1, false) => near(&self.leaves[pick.index(self.leaves.len())]),
                (3, _) => r,
                _ => {
                    let lin = LEVELS
                        .iter()
                        .enumerate()
                        .filter(|(_, l)| l.shift() <= self.top().shift())
                        .fold(r & 0xfff, |n, (k, l)| n | INDICES[((r >> (12 + 3 * k)) % 6) as usize] << l.shift());
                    sign_extend(lin, self.bits())
                }
            }
        }
    }

    fn lengths() -> impl Strategy<Value = u64> {
        prop_oneof![1u64..0x3000, 1u64..0x60_0000, 1u64..0x1_8000_0000]
    }

    proptest! {
        /// `walk`, `walk_range` and `check_range` agree with a model built from
        /// the leaf list alone, on random 4- and 5-level tables.
        #[test]
        fn walks_agree_with_a_reference_model(
            la57 in any::<bool>(),
            nxe in any::<bool>(),
            seed in any::<u64>(),
            groups in proptest::collection::vec(group(), 1..12),
            probes in proptest::collection::vec((0..4u8, any::<prop::sample::Index>(), any::<u64>(), lengths()), 1..16),
            cr3_low in 0u64..0x1000,
        ) {
            let mut w = World::build(la57, nxe, seed, &groups);
            let mode = w.mode();
            let cr3 = ROOT | cr3_low | (seed & (1 << 63));
            for (kind, pick, r, len) in probes {
                let va = w.probe(kind, pick, r);
                let expected = w.lookup(va);
                let got = walk(&w.mem, cr3, mode, va);
                match (&got, &expected) {
                    (Ok(t), Ok((gpa, flags, _, i))) => {
                        prop_assert_eq!((t.gpa, t.flags), (*gpa, *flags), "va {:#x}", va);
                        prop_assert_eq!(t.page_size.bytes(), w.leaves[*i].size);
                        prop_assert_eq!(&t.table_pages, &w.paths[*i]);
                    }
                    _ => prop_assert_eq!(got.map(|t| t.gpa), expected.map(|e| e.0), "va {:#x}", va),
                }

                let range = walk_range(&w.mem, cr3, mode, va, len);
                prop_assert_eq!(&range, &w.range(va, len), "range {:#x}+{:#x}", va, len);
                let Ok(range) = range else { continue };
                prop_assert_eq!(check_range(&w.mem, cr3, mode, &range), Ok(()));

                // Remap, then unmap, the leaf holding `va`: the check catches it there.
                let (gpa, flags, _, i) = expected.expect("walk_range succeeded");
                let leaf = w.leaves[i].clone();
                let level = LEVELS.into_iter().find(|l| 1u64 << l.shift() == leaf.size).expect("leaf size");
                let entry = *w.mem.entry_mut(la57, leaf.va, level);
                *w.mem.entry_mut(la57, leaf.va, level) = entry ^ leaf.size;
                let found = Found::Mapped { gpa: gpa ^ leaf.size, flags };
                let m = Mismatch { va, expected_gpa: gpa, expected_flags: flags, found };
                prop_assert_eq!(check_range(&w.mem, cr3, mode, &range), Err(m));
                *w.mem.entry_mut(la57, leaf.va, level) = entry & !P;
                let found = Found::Fault(WalkError::NotPresent { level, va });
                prop_assert_eq!(check_range(&w.mem, cr3, mode, &range), Err(Mismatch { found, ..m }));
                *w.mem.entry_mut(la57, leaf.va, level) = entry;
            }
        }
    }
}
