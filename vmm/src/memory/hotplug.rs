//! The memory hotplug window (`memory.hotplug_size`): guest-physical address
//! space reserved above RAM, plugged in by `vm.resize`.
//!
//! The window starts at the first 1 GiB boundary at or above both the end of
//! RAM and 4 GiB, so it never meets the MMIO hole below 4 GiB (LAPIC,
//! IOAPIC, PCI BARs and ECAM all live there) and any huge page size fits its
//! start. The e820 map does not list it; the guest learns of plugged memory
//! from ACPI memory devices (`acpi_memory_hotplug.rs`).
//!
//! The whole window is one memfd of its own, mapped in both views at boot
//! (`map_window`), so every holder of guest memory (devices, the agent,
//! heki, a vhost-user backend) already has the mapping when memory is
//! plugged and nothing must be handed a new memory map. Nothing backs it
//! until written (the memfd is sparse); KVM gets no memslot and the host
//! view stays `PROT_NONE` until a range is plugged, and the guest-access
//! layer refuses device accesses to the unplugged rest (`UnpluggedRange`).
//! Huge pages are not offered here: a hugetlbfs window would have to
//! reserve all its pages at boot.

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

    /// The size of one ACPI memory device: Linux's memory block (128 MiB),
    /// doubled until at most `MAX_SLOTS` cover the window. Plugged memory
    /// grows a slot at a time.
    pub fn slot_size(&self) -> u64 {
        let mut size = MIN_SLOT_SIZE;
        while self.size.div_ceil(size) > MAX_SLOTS {
            size *= 2;
        }
        size
    }

    /// How many slots cover the window (the last may be short).
    pub fn slots(&self) -> u32 {
        u32::try_from(self.size.div_ceil(self.slot_size())).unwrap_or(u32::MAX)
    }

    /// Slot `index`'s range.
    pub fn slot(&self, index: u32) -> RamRegion {
        let start = self.start.saturating_add(u64::from(index).saturating_mul(self.slot_size()));
        RamRegion { start, size: self.slot_size().min(self.end().saturating_sub(start)) }
    }
}

/// Linux's memory block on x86-64 below 64 GiB of RAM: the smallest unit it adds.
const MIN_SLOT_SIZE: u64 = 128 << 20;
/// Memory devices in the DSDT at most (each costs about 100 bytes of AML).
const MAX_SLOTS: u64 = 128;

/// Maps `window` in both views of `ram`, after boot RAM: the KVM view
/// read-write (no memslot yet), the host view `PROT_NONE` until plugged.
pub fn map_window(ram: &GuestRam, window: &HotplugWindow, backing: &RamBacking) -> Result<GuestRam, MemoryError> {
    if backing.huge_page_size.is_some() {
        return Err(MemoryError::Hotplug(
            "memory.hotplug_size with memory.hugepages: a hugetlbfs window would reserve all its huge pages at boot"
                .into(),
        ));
    }
    let region = RamRegion { start: window.start, size: window.size };
    if let Some(taken) = ram.kvm.iter().find(|r| r.start_addr().0.saturating_add(r.len()) > region.start) {
        return Err(MemoryError::Hotplug(format!(
            "the window at {:#x} overlaps RAM at {:#x}",
            region.start,
            taken.start_addr().0
        )));
    }
    let file = create_memfd(region.size, backing)?;
    let add = |memory: &vm_memory::GuestMemoryMmap| -> Result<vm_memory::GuestMemoryMmap, MemoryError> {
        let mapped = map_region_list(&file, 0, &[region], backing, false)?
            .pop()
            .ok_or_else(|| MemoryError::Hotplug("nothing was mapped".into()))?;
        memory.insert_region(mapped).map_err(|e| MemoryError::Hotplug(format!("cannot add {:#x}: {e}", region.start)))
    };
    let grown = GuestRam { kvm: add(&ram.kvm)?, host: add(&ram.host)? };
    crate::host_view::set_access(&grown.host, region.start, region.size, false)
        .map_err(|e| MemoryError::Hotplug(format!("cannot protect the window: {e}")))?;
    Ok(grown)
}

/// Whether `gpa` is inside `window` (a region `map_window` added).
pub fn in_window(window: Option<&HotplugWindow>, gpa: u64) -> bool {
    window.is_some_and(|w| (w.start..w.end()).contains(&gpa))
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
    fn the_window_is_in_both_views_and_only_the_kvm_view_reaches_it_before_plugging() {
        let boot = ram_regions(2 << 20);
        let ram = create_guest_ram(&boot).expect("boot RAM");
        ram.host.write_obj(0xaau8, GuestAddress(0x1000)).expect("boot RAM writable");
        let window = HotplugWindow::above(&boot, 64 << 20);
        let grown = map_window(&ram, &window, &RamBacking::default()).expect("mapped");
        assert_eq!(grown.kvm.iter().count(), 2);
        assert_eq!(grown.host.iter().count(), 2);
        assert_eq!(grown.kvm.read_obj::<u8>(GuestAddress(0x1000)).expect("boot RAM kept"), 0xaa);
        grown.kvm.write_obj(0x5eed_u64, GuestAddress(window.start + 8)).expect("the KVM view maps it");
        crate::host_view::set_access(&grown.host, window.start, 4096, true).expect("plug a page");
        assert_eq!(grown.host.read_obj::<u64>(GuestAddress(window.start + 8)).expect("same pages"), 0x5eed);
        assert!(in_window(Some(&window), window.start) && !in_window(Some(&window), window.end()));
    }

    #[test]
    fn slots_are_memory_blocks_until_the_window_needs_more_than_128() {
        let boot = ram_regions(2 << 30);
        let kata = HotplugWindow::above(&boot, 16 << 30);
        assert_eq!((kata.slot_size(), kata.slots()), (128 << 20, 128));
        assert_eq!(kata.slot(1), RamRegion { start: (4 << 30) + (128 << 20), size: 128 << 20 });
        let big = HotplugWindow::above(&boot, 1 << 40);
        assert_eq!((big.slot_size(), big.slots()), (8 << 30, 128));
        let odd = HotplugWindow::above(&boot, 300 << 20);
        assert_eq!(odd.slots(), 3);
        assert_eq!(odd.slot(2).size, 44 << 20, "the last slot is short");
    }

    #[test]
    fn a_window_with_huge_pages_is_refused() {
        let boot = ram_regions(2 << 20);
        let ram = create_guest_ram(&boot).expect("boot RAM");
        let window = HotplugWindow::above(&boot, 1 << 30);
        let huge = RamBacking { huge_page_size: Some(2 << 20), ..RamBacking::default() };
        let err = map_window(&ram, &window, &huge).err().expect("refused").to_string();
        assert!(err.contains("hugepages"), "{err}");
    }
}
