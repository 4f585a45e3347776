//! The heki guest ABI v1: discovery leaves, call decoding and the page-list
//! format. Everything here reads untrusted guest input; see docs/heki-abi.md.
// Decodes guest-supplied numbers: no unchecked arithmetic here.
#![deny(clippy::arithmetic_side_effects)]

use std::collections::BTreeSet;

use crate::permission_map::PAGE_SIZE;
use crate::perms::Permissions;

pub const ABI_VERSION: u64 = 1;
/// Additions to version 1 that old guests can ignore (CPUID 0x40000101 EDX):
/// revision 1 adds LOCK_MAPPINGS and PIN_DTR.
pub const ABI_REVISION: u32 = 1;
/// CPUID leaf with the signature; EAX = highest heki leaf.
pub const LEAF_SIGNATURE: u32 = 0x4000_0100;
/// CPUID leaf with version, features and the doorbell port.
pub const LEAF_FEATURES: u32 = 0x4000_0101;
/// "HekiVisorABI" as three little-endian words.
pub const SIGNATURE: [u32; 3] =
    [u32::from_le_bytes(*b"Heki"), u32::from_le_bytes(*b"Viso"), u32::from_le_bytes(*b"rABI")];

/// Feature bits in CPUID 0x40000101 EBX.
pub mod feature {
    pub const PROTECT_MEMORY: u32 = 1 << 0;
    pub const PROTECT_BYTES: u32 = 1 << 1;
    pub const EXEC_ENFORCED: u32 = 1 << 2;
    pub const PIN_CR: u32 = 1 << 3;
    pub const PIN_MSR: u32 = 1 << 4;
    pub const DMA_GUARD: u32 = 1 << 5;
    pub const SHARED_MEMORY: u32 = 1 << 6;
    pub const LOCK_MAPPINGS: u32 = 1 << 7;
    pub const PIN_DTR: u32 = 1 << 8;
}

/// Function numbers (RAX).
pub mod function {
    pub const VERSION: u64 = 0;
    pub const PROTECT_MEMORY: u64 = 1;
    pub const PROTECT_BYTES: u64 = 2;
    pub const PIN_CR: u64 = 3;
    pub const PIN_MSR: u64 = 4;
    pub const QUERY: u64 = 5;
    pub const SET_SHARED: u64 = 6;
    pub const PRIVATE_MEMORY: u64 = 7;
    pub const LOCK_MAPPINGS: u64 = 8;
    pub const PIN_DTR: u64 = 9;
}

/// Entries per page-list page: (4096 - 16) / 24.
pub const MAX_ENTRIES_PER_PAGE: u64 = 170;
/// Longest page list accepted.
pub const MAX_LIST_PAGES: usize = 1024;
/// Longest PROTECT_BYTES request.
pub const MAX_PROTECT_BYTES: u64 = 1 << 20;
/// QUERY's flag for "some byte of this page is byte-protected".
pub const QUERY_BYTES_PROTECTED: u64 = 0x100;

/// Why a call failed; the guest sees the negative errno.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum AbiError {
    #[error("invalid argument")]
    InvalidArgument,
    #[error("address outside guest RAM")]
    BadAddress,
    #[error("touches an immutable page")]
    NotPermitted,
    #[error("page list too long or cyclic")]
    TooBig,
    #[error("KVM memslot budget exhausted")]
    NoSpace,
    #[error("function not implemented")]
    NotImplemented,
}

impl AbiError {
    /// The value left in RAX.
    pub fn errno(self) -> i64 {
        match self {
            AbiError::NotPermitted => -1,     // EPERM
            AbiError::TooBig => -7,           // E2BIG
            AbiError::BadAddress => -14,      // EFAULT
            AbiError::InvalidArgument => -22, // EINVAL
            AbiError::NoSpace => -28,         // ENOSPC
            AbiError::NotImplemented => -38,  // ENOSYS
        }
    }
}

/// A decoded doorbell call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HekiCall {
    Version,
    ProtectMemory { list: u64 },
    ProtectBytes { gpa: u64, len: u64 },
    PinCr { register: u64, mask: u64 },
    PinMsr { index: u64 },
    Query { gpa: u64 },
    SetShared { gpa: u64, len: u64, share: u64 },
    PrivateMemory { arg: u64 },
    LockMappings { va: u64, len: u64, expect: u64 },
    PinDtr { table: u64 },
    Unknown(u64),
}

/// Decodes RAX (function) and RBX, RCX, RSI (arg0..arg2).
pub fn decode_call(rax: u64, rbx: u64, rcx: u64, rsi: u64) -> HekiCall {
    match rax {
        function::VERSION => HekiCall::Version,
        function::PROTECT_MEMORY => HekiCall::ProtectMemory { list: rbx },
        function::PROTECT_BYTES => HekiCall::ProtectBytes { gpa: rbx, len: rcx },
        function::PIN_CR => HekiCall::PinCr { register: rbx, mask: rcx },
        function::PIN_MSR => HekiCall::PinMsr { index: rbx },
        function::QUERY => HekiCall::Query { gpa: rbx },
        function::SET_SHARED => HekiCall::SetShared { gpa: rbx, len: rcx, share: rsi },
        function::PRIVATE_MEMORY => HekiCall::PrivateMemory { arg: rbx },
        function::LOCK_MAPPINGS => HekiCall::LockMappings { va: rbx, len: rcx, expect: rsi },
        function::PIN_DTR => HekiCall::PinDtr { table: rbx },
        other => HekiCall::Unknown(other),
    }
}

/// CPUID values (EAX, EBX, ECX, EDX) for the two heki leaves.
pub fn cpuid_leaves(enabled: bool, features: u32, doorbell_port: u16) -> [(u32, [u32; 4]); 2] {
    if !enabled {
        return [(LEAF_SIGNATURE, [0; 4]), (LEAF_FEATURES, [0; 4])];
    }
    [
        (LEAF_SIGNATURE, [LEAF_FEATURES, SIGNATURE[0], SIGNATURE[1], SIGNATURE[2]]),
        (LEAF_FEATURES, [ABI_VERSION as u32, features, u32::from(doorbell_port), ABI_REVISION]),
    ]
}

/// Guest RAM as [start, end) ranges.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RamLayout {
    pub regions: Vec<(u64, u64)>,
}

impl RamLayout {
    /// Whether [start, start + len) is all RAM (it may cross from one region
    /// into the next when they touch).
    pub fn contains(&self, start: u64, len: u64) -> bool {
        let Some(end) = start.checked_add(len) else {
            return false;
        };
        let mut cursor = start;
        // Each step moves into a region ending further on: at most one step per region.
        for _ in 0..=self.regions.len() {
            let Some(&(_, region_end)) = self.regions.iter().find(|&&(s, e)| s <= cursor && cursor < e) else {
                return len == 0 && self.regions.iter().any(|&(s, e)| s <= start && start <= e);
            };
            if end <= region_end {
                return true;
            }
            cursor = region_end;
        }
        false
    }
}

/// Reads guest memory for the decoder.
pub trait GuestMemoryReader {
    /// Fills `buf` from `gpa`; false if any byte is outside guest RAM.
    fn read(&self, gpa: u64, buf: &mut [u8]) -> bool;
}

/// One entry of a page list: pages [start, end) get exactly `perms`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProtectRange {
    pub start: u64,
    pub end: u64,
    pub perms: Permissions,
}

impl ProtectRange {
    /// Validates a guest entry (addresses in bytes).
    pub fn from_entry(pa: u64, epa: u64, bits: u64, ram: &RamLayout) -> Result<Self, AbiError> {
        if !pa.is_multiple_of(PAGE_SIZE) || !epa.is_multiple_of(PAGE_SIZE) || pa >= epa {
            return Err(AbiError::InvalidArgument);
        }
        let perms = Permissions::from_abi(bits).ok_or(AbiError::InvalidArgument)?;
        if !ram.contains(pa, epa.saturating_sub(pa)) {
            return Err(AbiError::BadAddress);
        }
        Ok(ProtectRange { start: pa / PAGE_SIZE, end: epa / PAGE_SIZE, perms })
    }
}

fn read_u64(mem: &impl GuestMemoryReader, gpa: u64) -> Result<u64, AbiError> {
    let mut buf = [0u8; 8];
    if mem.read(gpa, &mut buf) { Ok(u64::from_le_bytes(buf)) } else { Err(AbiError::BadAddress) }
}

/// Walks a PROTECT_MEMORY page list and validates every entry.
pub fn decode_page_list(
    mem: &impl GuestMemoryReader,
    ram: &RamLayout,
    first: u64,
) -> Result<Vec<ProtectRange>, AbiError> {
    let mut ranges = Vec::new();
    let mut visited = BTreeSet::new();
    let mut page = first;
    while page != 0 {
        if !page.is_multiple_of(PAGE_SIZE) {
            return Err(AbiError::InvalidArgument);
        }
        if !ram.contains(page, PAGE_SIZE) {
            return Err(AbiError::BadAddress);
        }
        if !visited.insert(page) || visited.len() > MAX_LIST_PAGES {
            return Err(AbiError::TooBig);
        }
        let next = read_u64(mem, page)?;
        let count = read_u64(mem, page.checked_add(8).ok_or(AbiError::BadAddress)?)?;
        if count > MAX_ENTRIES_PER_PAGE {
            return Err(AbiError::InvalidArgument);
        }
        for i in 0..count {
            // Entries of 24 bytes after the 16-byte header; count is bounded above.
            let field = |k: u64| {
                let offset = i.checked_mul(24).and_then(|o| o.checked_add(k).and_then(|o| o.checked_add(16)));
                offset.and_then(|o| page.checked_add(o)).ok_or(AbiError::BadAddress).and_then(|gpa| read_u64(mem, gpa))
            };
            let (pa, epa, bits) = (field(0)?, field(8)?, field(16)?);
            ranges.push(ProtectRange::from_entry(pa, epa, bits, ram)?);
        }
        page = next;
    }
    Ok(ranges)
}

#[cfg(test)]
#[allow(clippy::arithmetic_side_effects)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// A flat guest memory for tests.
    pub struct FlatMemory(pub Vec<u8>);

    impl GuestMemoryReader for FlatMemory {
        fn read(&self, gpa: u64, buf: &mut [u8]) -> bool {
            let start = gpa as usize;
            match self.0.get(start..start + buf.len()) {
                Some(src) => {
                    buf.copy_from_slice(src);
                    true
                }
                None => false,
            }
        }
    }

    const RAM_SIZE: u64 = 64 * PAGE_SIZE;

    fn ram() -> RamLayout {
        RamLayout { regions: vec![(0, RAM_SIZE)] }
    }

    fn put(mem: &mut FlatMemory, gpa: u64, v: u64) {
        mem.0[gpa as usize..gpa as usize + 8].copy_from_slice(&v.to_le_bytes());
    }

    fn list(mem: &mut FlatMemory, page: u64, next: u64, entries: &[(u64, u64, u64)]) {
        put(mem, page, next);
        put(mem, page + 8, entries.len() as u64);
        for (i, (pa, epa, p)) in entries.iter().enumerate() {
            let e = page + 16 + 24 * i as u64;
            put(mem, e, *pa);
            put(mem, e + 8, *epa);
            put(mem, e + 16, *p);
        }
    }

    fn memory() -> FlatMemory {
        FlatMemory(vec![0; RAM_SIZE as usize])
    }

    #[test]
    fn signature_spells_hekivisorabi() {
        let bytes: Vec<u8> = SIGNATURE.iter().flat_map(|w| w.to_le_bytes()).collect();
        assert_eq!(&bytes, b"HekiVisorABI");
        assert_eq!(cpuid_leaves(false, 3, 0x580)[0].1, [0; 4]);
        assert_eq!(cpuid_leaves(true, 3, 0x580)[1].1, [1, 3, 0x580, ABI_REVISION], "EDX: the revision");
    }

    #[test]
    fn ram_ranges_may_cross_touching_regions_but_not_holes() {
        let ram = RamLayout { regions: vec![(0x10000, 0x20000), (0, 0x10000), (0x30000, 0x40000)] };
        assert!(ram.contains(0xf000, 0x2000), "touching regions");
        assert!(ram.contains(0, 0x20000));
        assert!(!ram.contains(0x1f000, 0x2000), "runs into the hole");
        assert!(!ram.contains(0x20000, 1));
        assert!(ram.contains(0x3ffff, 1));
        assert!(!ram.contains(0x3ffff, 2));
        assert!(!ram.contains(u64::MAX, 2), "overflow");
    }

    #[test]
    fn a_chained_list_decodes_in_order() {
        let mut mem = memory();
        list(&mut mem, 0x1000, 0x2000, &[(0x10000, 0x12000, 5)]);
        list(&mut mem, 0x2000, 0, &[(0x20000, 0x21000, 9)]);
        let ranges = decode_page_list(&mem, &ram(), 0x1000).expect("valid list");
        assert_eq!(ranges.len(), 2);
        assert_eq!((ranges[0].start, ranges[0].end, ranges[0].perms.bits()), (0x10, 0x12, 5));
        assert_eq!(ranges[1].perms.bits(), 9);
    }

    #[test]
    fn every_error_rule_maps_to_its_errno() {
        type Entries = Vec<(u64, u64, u64)>;
        let cases: Vec<(Entries, AbiError)> = vec![
            (vec![(0x10001, 0x12000, 1)], AbiError::InvalidArgument),
            (vec![(0x10000, 0x10000, 1)], AbiError::InvalidArgument),
            (vec![(0x10000, 0x11000, 0x11)], AbiError::InvalidArgument),
            (vec![(0x10000, 0x11000, 4)], AbiError::InvalidArgument),
            (vec![(0x10000, RAM_SIZE + 0x1000, 1)], AbiError::BadAddress),
        ];
        for (entries, expected) in cases {
            let mut mem = memory();
            list(&mut mem, 0x1000, 0, &entries);
            assert_eq!(decode_page_list(&mem, &ram(), 0x1000), Err(expected), "{entries:x?}");
        }
        let mut mem = memory();
        list(&mut mem, 0x1000, 0, &[]);
        put(&mut mem, 0x1008, 171);
        assert_eq!(decode_page_list(&mem, &ram(), 0x1000), Err(AbiError::InvalidArgument));
        assert_eq!(decode_page_list(&mem, &ram(), 0x1008), Err(AbiError::InvalidArgument));
        assert_eq!(decode_page_list(&mem, &ram(), RAM_SIZE), Err(AbiError::BadAddress));
        // A cycle.
        let mut mem = memory();
        list(&mut mem, 0x1000, 0x2000, &[]);
        list(&mut mem, 0x2000, 0x1000, &[]);
        assert_eq!(decode_page_list(&mem, &ram(), 0x1000), Err(AbiError::TooBig));
        assert_eq!(AbiError::TooBig.errno(), -7);
        assert_eq!(AbiError::NotImplemented.errno(), -38);
    }

    #[test]
    fn more_than_1024_list_pages_is_too_big() {
        let pages = 1100u64;
        let mut mem = FlatMemory(vec![0; ((pages + 2) * PAGE_SIZE) as usize]);
        for i in 1..=pages {
            let next = if i == pages { 0 } else { (i + 1) * PAGE_SIZE };
            list(&mut mem, i * PAGE_SIZE, next, &[]);
        }
        let ram = RamLayout { regions: vec![(0, (pages + 2) * PAGE_SIZE)] };
        assert_eq!(decode_page_list(&mem, &ram, PAGE_SIZE), Err(AbiError::TooBig));
    }

    proptest! {
        /// Arbitrary guest bytes never panic the decoder, and what it accepts is valid.
        #[test]
        fn decoder_survives_arbitrary_memory(bytes in proptest::collection::vec(any::<u8>(), 0..16384), first in 0u64..20000) {
            let mut data = bytes;
            data.resize(16384, 0);
            let mem = FlatMemory(data);
            let ram = RamLayout { regions: vec![(0, 16384)] };
            if let Ok(ranges) = decode_page_list(&mem, &ram, first) {
                for r in ranges {
                    prop_assert!(r.start < r.end);
                    prop_assert!(r.end * PAGE_SIZE <= 16384);
                    prop_assert!(r.perms.contains(Permissions::READ));
                }
            }
        }
    }
}
