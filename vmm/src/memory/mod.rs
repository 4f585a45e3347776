//! Guest RAM: one memfd, mapped twice. KVM's memslots use one mapping (the
//! guest's own view); every other part of the VMM uses the other, in which
//! pages the guest made private are `PROT_NONE` (`host_view.rs`). The memfd
//! holds ordinary or huge pages (`backing.rs`); address space above RAM may
//! be reserved for memory added later (`hotplug.rs`).

mod backing;
mod hotplug;

use std::fs::File;

pub use backing::{HugePagePool, RamBacking, check_huge_page_pool, host_default_huge_page_size, huge_page_pool};
pub use hotplug::{HotplugWindow, in_window, map_window};

use hypervisor::{MemSlot, Vm};
use thiserror::Error;
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion, MemoryRegionAddress};

use crate::layout::{LOW_RAM_END, RAM_64BIT_START};

#[derive(Debug, Error)]
pub enum MemoryError {
    #[error("cannot allocate {size} bytes of guest memory")]
    Allocate {
        size: u64,
        #[source]
        source: vm_memory::mmap::FromRangesError,
    },
    #[error("cannot register guest memory with KVM")]
    Register(#[source] hypervisor::HypervisorError),
    #[error("cannot create the memfd that backs guest memory")]
    Memfd(#[source] std::io::Error),
    #[error("cannot map {size} bytes of guest memory: {reason}")]
    Map { size: u64, reason: String },
    #[error("a guest RAM region of {size} bytes does not fit this host's address space")]
    TooLarge { size: u64 },
    #[error(
        "memory.hugepages: {needed} huge pages of {page_kb} kB are needed but only {available} are available \
         (reserve more: echo N > /sys/kernel/mm/hugepages/hugepages-{page_kb}kB/nr_hugepages)"
    )]
    HugePageShortfall { needed: u64, available: u64, page_kb: u64 },
    #[error("memory.hugepages: {reason}")]
    NoHugePages { reason: String },
    #[error("memory hotplug: {0}")]
    Hotplug(String),
}

impl MemoryError {
    /// Whether the configuration asked for what this host cannot give (a
    /// client error), rather than the VMM failing.
    pub fn is_host_shortfall(&self) -> bool {
        matches!(self, MemoryError::HugePageShortfall { .. } | MemoryError::NoHugePages { .. })
    }
}

/// Guest RAM seen twice: the same pages, two mappings.
pub struct GuestRam {
    /// For KVM's memslots and for the vCPU paths that act as the guest's CPU.
    pub kvm: GuestMemoryMmap,
    /// For devices, loaders and the API: private pages are not accessible here.
    pub host: GuestMemoryMmap,
}

/// One contiguous range of guest RAM.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RamRegion {
    pub start: u64,
    pub size: u64,
}

impl RamRegion {
    pub fn end(&self) -> u64 {
        self.start + self.size
    }
}

/// Splits `size` bytes of RAM around the MMIO hole below 4 GiB.
pub fn ram_regions(size: u64) -> Vec<RamRegion> {
    if size <= LOW_RAM_END {
        vec![RamRegion { start: 0, size }]
    } else {
        vec![RamRegion { start: 0, size: LOW_RAM_END }, RamRegion { start: RAM_64BIT_START, size: size - LOW_RAM_END }]
    }
}

/// Maps guest RAM (anonymous, private) for the given regions.
pub fn create_guest_memory(regions: &[RamRegion]) -> Result<GuestMemoryMmap, MemoryError> {
    let ranges: Vec<(GuestAddress, usize)> = regions.iter().map(|r| (GuestAddress(r.start), r.size as usize)).collect();
    GuestMemoryMmap::from_ranges(&ranges)
        .map_err(|source| MemoryError::Allocate { size: regions.iter().map(|r| r.size).sum(), source })
}

/// Backs guest RAM with a memfd of ordinary pages and maps it twice.
pub fn create_guest_ram(regions: &[RamRegion]) -> Result<GuestRam, MemoryError> {
    create_guest_ram_backed(regions, &RamBacking::default())
}

/// Backs guest RAM with a memfd as `backing` says and maps it twice (shared
/// mappings). Pages are populated in the KVM view only: the host view maps
/// the same pages, so faulting them in once is enough.
pub fn create_guest_ram_backed(regions: &[RamRegion], backing: &RamBacking) -> Result<GuestRam, MemoryError> {
    let total: u64 = regions.iter().map(|r| r.size).sum();
    let file = backing::create_memfd(total, backing)?;
    Ok(GuestRam {
        kvm: backing::map_regions(&file, 0, regions, backing, backing.prefault)?,
        host: backing::map_regions(&file, 0, regions, backing, false)?,
    })
}

/// The boot memslot layout heki starts from: one writable slot per RAM
/// region, with ids 0..n (as `register_ram` installs them).
pub fn boot_slot_plan(regions: &[RamRegion]) -> Vec<(heki::PlannedSlot, u32)> {
    regions
        .iter()
        .zip(0..)
        .map(|(r, id)| (heki::PlannedSlot { gpa: r.start, size: r.size, readonly: false }, id))
        .collect()
}

/// One region of guest RAM as another process (a vhost-user backend) maps
/// it: the memfd and where the region starts in it. `host_addr` is where this
/// process maps the region; it only names the region in messages.
pub struct SharedRegion {
    pub gpa: u64,
    pub size: u64,
    pub host_addr: u64,
    pub file_offset: u64,
    pub file: File,
}

/// Guest RAM's regions with a descriptor of their memfd each, for handing to
/// a backend (`memory.shared`).
pub fn shared_regions(mem: &GuestMemoryMmap) -> Result<Vec<SharedRegion>, MemoryError> {
    let mut regions = Vec::new();
    for region in mem.iter() {
        let Some(backing) = region.file_offset() else {
            return Err(MemoryError::Memfd(std::io::Error::other("guest RAM is not backed by a memfd")));
        };
        let host = region
            .get_host_address(MemoryRegionAddress(0))
            .map_err(|e| MemoryError::Memfd(std::io::Error::other(e.to_string())))?;
        regions.push(SharedRegion {
            gpa: region.start_addr().0,
            size: region.len(),
            host_addr: host as u64,
            file_offset: backing.start(),
            file: backing.file().try_clone().map_err(MemoryError::Memfd)?,
        });
    }
    Ok(regions)
}

/// Host address of a guest physical address inside RAM.
pub fn host_address(mem: &GuestMemoryMmap, gpa: u64) -> Option<u64> {
    mem.get_host_address(GuestAddress(gpa)).ok().map(|p| p as u64)
}

/// Registers every RAM region as one writable memslot, slots 0..n; the
/// hotplug `window` gets none (memory plugged there gets its own).
pub fn register_ram(
    vm: &Vm,
    mem: &GuestMemoryMmap,
    window: Option<&HotplugWindow>,
) -> Result<Vec<MemSlot>, MemoryError> {
    let mut slots = Vec::new();
    for region in mem.iter().filter(|r| !in_window(window, r.start_addr().0)) {
        slots.push(register_range(vm, mem, region.start_addr().0, region.len(), slots.len() as u32)?);
    }
    Ok(slots)
}

/// Registers `[gpa, gpa + size)`, inside one region of `mem`, as writable memslot `slot`.
pub fn register_range(vm: &Vm, mem: &GuestMemoryMmap, gpa: u64, size: u64, slot: u32) -> Result<MemSlot, MemoryError> {
    let not_ram = || {
        MemoryError::Register(hypervisor::HypervisorError::Ioctl {
            op: "KVM_SET_USER_MEMORY_REGION",
            source: std::io::Error::other(format!("{gpa:#x}+{size:#x} is not one piece of RAM")),
        })
    };
    let (region, offset) = mem.to_region_addr(GuestAddress(gpa)).ok_or_else(not_ram)?;
    if offset.0.checked_add(size).is_none_or(|end| end > region.len()) {
        return Err(not_ram());
    }
    let host = region.get_host_address(offset).map_err(|_| not_ram())?;
    let memslot = MemSlot { slot, guest_addr: gpa, size, host_addr: host as u64, readonly: false };
    // SAFETY: the range lies inside one live region of `mem` (checked above),
    // which the VM keeps alive for as long as the VM (and so the slot) exists.
    unsafe { vm.set_memslot(&memslot) }.map_err(MemoryError::Register)?;
    Ok(memslot)
}

/// The hotplug window `config` reserves, if any.
pub fn hotplug_window(config: &crate::config::VmConfig) -> Option<HotplugWindow> {
    let size = config.memory.hotplug_size?;
    Some(HotplugWindow::above(&ram_regions(config.memory.size), size))
}

/// Fills in what `vm.info` would otherwise report as "the default": the
/// huge page size in force when `hugepages` is on without a size.
pub fn report_memory_in_force(config: &crate::config::VmConfig, reported: &mut serde_json::Value) {
    if config.memory.hugepages
        && config.memory.hugepage_size.is_none()
        && let Ok(size) = host_default_huge_page_size()
    {
        reported["memory"]["hugepage_size"] = serde_json::json!(size);
    }
}

/// Total RAM size.
pub fn ram_size(mem: &GuestMemoryMmap) -> u64 {
    mem.iter().map(|r| r.len()).sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_ram_is_one_region_from_zero() {
        assert_eq!(ram_regions(512 << 20), vec![RamRegion { start: 0, size: 512 << 20 }]);
    }

    #[test]
    fn large_ram_skips_the_mmio_hole() {
        let regions = ram_regions(4 << 30);
        assert_eq!(regions[0], RamRegion { start: 0, size: LOW_RAM_END });
        assert_eq!(regions[1], RamRegion { start: RAM_64BIT_START, size: (4 << 30) - LOW_RAM_END });
    }
}
