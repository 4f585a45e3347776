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
