//! The memory hotplug window (`memory.hotplug_size`): guest-physical address
//! space reserved above RAM, backed only when memory is added to it.
//!
//! The window starts at the first 1 GiB boundary at or above both the end of
//! RAM and 4 GiB, so it never meets the MMIO hole below 4 GiB (LAPIC,
//! IOAPIC, PCI BARs and ECAM all live there) and any huge page size fits its
//! start. Nothing is mapped or registered with KVM for it at boot; the e820
//! map and the ACPI tables do not list it, so the guest sees it only when
//! memory is plugged in.

use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

use super::backing::{RamBacking, create_memfd, map_region_list};
use super::{GuestRam, MemoryError, RamRegion};
use crate::layout::RAM_64BIT_START;

const WINDOW_ALIGNMENT: u64 = 1 << 30;

/// Reserved guest-physical addresses `[start, start + size)`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub struct HotplugWindow {
    pub start: u64,
    pub size: u64,
}

impl HotplugWindow {
    /// The window of `size` bytes above the boot RAM `ram`.
    pub fn above(ram: &[RamRegion], size: u64) -> HotplugWindow {
        let ram_end = ram.iter().map(RamRegion::end).max().unwrap_or(0);
        let start = ram_end.max(RAM_64BIT_START).next_multiple_of(WINDOW_ALIGNMENT);
        HotplugWindow { start, size }
    }

    pub fn end(&self) -> u64 {
        self.start.saturating_add(self.size)
    }

    fn contains(&self, region: &RamRegion) -> bool {
        region.start >= self.start && region.end() <= self.end() && region.end() > region.start
    }
}

/// Adds `region` of new RAM inside `window` to guest memory, for
/// `vm.resize`: a memfd of its own (huge pages as `backing` says), mapped
/// twice like boot RAM. Returns guest memory with the region in both views;
/// the caller swaps it in where devices and vCPU paths look, registers the
/// region's memslot with KVM (`super::register_region`) and tells heki's
/// memslot plan.
///
/// Refused: a region outside the window, empty, not aligned to the
/// backing's page size, or overlapping RAM already there.
pub fn add_hotplug_ram(
    ram: &GuestRam,
    window: &HotplugWindow,
    region: RamRegion,
    backing: &RamBacking,
) -> Result<GuestRam, MemoryError> {
    if !window.contains(&region) {
        return Err(MemoryError::Hotplug(format!(
            "{:#x}..{:#x} is not inside the hotplug window {:#x}..{:#x}",
            region.start,
            region.end(),
            window.start,
            window.end()
        )));
    }
    let page = backing.page_size();
    if !region.start.is_multiple_of(page) || !region.size.is_multiple_of(page) {
        return Err(MemoryError::Hotplug(format!(
            "{:#x}+{:#x} is not aligned to the {page}-byte page size",
            region.start, region.size
        )));
    }
    if let Some(taken) = ram.kvm.iter().find(|r| {
        let start = r.start_addr().0;
        start < region.end() && region.start < start.saturating_add(r.len())
    }) {
        return Err(MemoryError::Hotplug(format!(
            "{:#x}..{:#x} overlaps RAM at {:#x}",
            region.start,
            region.end(),
            taken.start_addr().0
        )));
    }
    let file = create_memfd(region.size, backing)?;
    let add = |memory: &vm_memory::GuestMemoryMmap, populate| -> Result<vm_memory::GuestMemoryMmap, MemoryError> {
        let mapped = map_region_list(&file, 0, &[region], backing, populate)?
            .pop()
            .ok_or_else(|| MemoryError::Hotplug("nothing was mapped".into()))?;
        memory.insert_region(mapped).map_err(|e| MemoryError::Hotplug(format!("cannot add {:#x}: {e}", region.start)))
    };
    Ok(GuestRam { kvm: add(&ram.kvm, backing.prefault)?, host: add(&ram.host, false)? })
}

#[cfg(test)]
mod tests {
    use vm_memory::{Bytes, GuestAddress};

    use super::*;
    use crate::layout::LOW_RAM_END;
    use crate::memory::{create_guest_ram, ram_regions};

    #[test]
    fn the_window_starts_at_4_gib_above_small_ram_and_on_a_gib_above_large_ram() {
        assert_eq!(HotplugWindow::above(&ram_regions(512 << 20), 1 << 30).start, 4 << 30);
        let big = ram_regions((4 << 30) + (1 << 20));
        let window = HotplugWindow::above(&big, 2 << 30);
        assert_eq!(window.start, 6 << 30, "RAM ends at 5 GiB + 1 MiB");
        assert!(window.start >= big.iter().map(RamRegion::end).max().unwrap_or(0));
        assert!(window.start > LOW_RAM_END, "never in the MMIO hole");
    }

    #[test]
    fn added_ram_is_seen_by_both_views_and_old_ram_is_kept() {
        let boot = ram_regions(2 << 20);
        let ram = create_guest_ram(&boot).expect("boot RAM");
        ram.host.write_obj(0xaau8, GuestAddress(0x1000)).expect("boot RAM writable");
        let window = HotplugWindow::above(&boot, 64 << 20);
        let region = RamRegion { start: window.start + (2 << 20), size: 4 << 20 };
        let grown = add_hotplug_ram(&ram, &window, region, &RamBacking::default()).expect("added");
        grown.host.write_obj(0x5eed_u64, GuestAddress(region.start + 8)).expect("new RAM writable");
        assert_eq!(grown.kvm.read_obj::<u64>(GuestAddress(region.start + 8)).expect("same pages"), 0x5eed);
        assert_eq!(grown.kvm.read_obj::<u8>(GuestAddress(0x1000)).expect("boot RAM kept"), 0xaa);
        assert_eq!(grown.kvm.iter().count(), 2);
    }

    #[test]
    fn regions_outside_the_window_unaligned_or_overlapping_are_refused() {
        let boot = ram_regions(2 << 20);
        let ram = create_guest_ram(&boot).expect("boot RAM");
        let window = HotplugWindow::above(&boot, 8 << 20);
        let backing = RamBacking::default();
        for (region, why) in [
            (RamRegion { start: 0, size: 1 << 20 }, "not inside"),
            (RamRegion { start: window.start + (6 << 20), size: 4 << 20 }, "not inside"),
            (RamRegion { start: window.start, size: 0 }, "not inside"),
            (RamRegion { start: window.start + 1, size: 4096 }, "aligned"),
        ] {
            let err = add_hotplug_ram(&ram, &window, region, &backing).err().expect("refused").to_string();
            assert!(err.contains(why), "{region:?}: {err}");
        }
        let first = RamRegion { start: window.start, size: 4 << 20 };
        let grown = add_hotplug_ram(&ram, &window, first, &backing).expect("first");
        let again = RamRegion { start: window.start + (2 << 20), size: 4 << 20 };
        let err = add_hotplug_ram(&grown, &window, again, &backing).err().expect("overlap").to_string();
        assert!(err.contains("overlaps"), "{err}");
    }
}
