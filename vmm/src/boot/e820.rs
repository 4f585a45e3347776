//! The guest's physical memory map, shared by the PVH and Linux boot paths.

use crate::layout::{EBDA_START, HIGH_RAM_START};
use crate::memory::RamRegion;

pub const E820_RAM: u32 = 1;
pub const E820_RESERVED: u32 = 2;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct E820Entry {
    pub addr: u64,
    pub size: u64,
    pub kind: u32,
}

/// RAM below the EBDA, the reserved legacy area (ACPI tables live there),
/// then the rest of RAM.
pub fn e820_map(ram: &[RamRegion]) -> Vec<E820Entry> {
    let mut map = Vec::new();
    for region in ram {
        if region.start == 0 {
            map.push(E820Entry { addr: 0, size: EBDA_START, kind: E820_RAM });
            map.push(E820Entry { addr: EBDA_START, size: HIGH_RAM_START - EBDA_START, kind: E820_RESERVED });
            if region.end() > HIGH_RAM_START {
                map.push(E820Entry { addr: HIGH_RAM_START, size: region.end() - HIGH_RAM_START, kind: E820_RAM });
            }
        } else {
            map.push(E820Entry { addr: region.start, size: region.size, kind: E820_RAM });
        }
    }
    map
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn legacy_hole_is_reserved_and_ram_is_complete() {
        let map = e820_map(&[RamRegion { start: 0, size: 64 << 20 }]);
        assert_eq!(map.len(), 3);
        assert_eq!(map[1], E820Entry { addr: EBDA_START, size: HIGH_RAM_START - EBDA_START, kind: E820_RESERVED });
        let ram: u64 = map.iter().filter(|e| e.kind == E820_RAM).map(|e| e.size).sum();
        assert_eq!(ram, (64 << 20) - (HIGH_RAM_START - EBDA_START));
    }
}
