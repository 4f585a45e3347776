//! Cloud Hypervisor's `memory` and `platform` sections: guest RAM (size,
//! sharing, huge pages, the hotplug window) and the PCI segments.

use serde::{Deserialize, Serialize};

use super::{ConfigError, DEFAULT_MEMORY_SIZE, MAX_MEMORY_SIZE, invalid};

/// The most PCI segments a VM may have: each takes one MiB of the ECAM
/// window and 32 MiB of the 32-bit BAR window (`layout.rs`).
pub const MAX_PCI_SEGMENTS: u16 = 16;

/// Huge page sizes x86-64 offers.
pub const HUGE_PAGE_SIZES: [u64; 2] = [2 << 20, 1 << 30];

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MemoryConfig {
    /// Guest RAM in bytes.
    pub size: u64,
    /// Whether guest RAM may be shared with another process: a vhost-user
    /// backend (`fs`) maps it through the memfd's descriptor. Guest RAM is
    /// always a `MAP_SHARED` memfd; this says whether its descriptor may
    /// leave the VMM, and `fs` needs it (as in Cloud Hypervisor).
    #[serde(default)]
    pub shared: bool,
    /// Back guest RAM with huge pages from the host's hugetlbfs pool
    /// (`memfd_create(MFD_HUGETLB)`); the pool must hold enough free pages
    /// at boot, which are then reserved for the VM.
    #[serde(default)]
    pub hugepages: bool,
    /// The huge page size in bytes (2 MiB or 1 GiB); default: the host's
    /// default huge page size.
    #[serde(default)]
    pub hugepage_size: Option<u64>,
    /// Fault every page of guest RAM in at boot (`MAP_POPULATE`) rather than
    /// at the guest's first touch.
    #[serde(default)]
    pub prefault: bool,
    /// Guest-physical address space reserved above RAM for memory added
    /// later (`vm.resize`); nothing backs it until then.
    #[serde(default)]
    pub hotplug_size: Option<u64>,
    /// How added memory reaches the guest. Only `Acpi` (Cloud Hypervisor's
    /// default) is accepted; `VirtioMem` is refused by name.
    #[serde(default)]
    pub hotplug_method: HotplugMethod,
}

impl Default for MemoryConfig {
    fn default() -> Self {
        MemoryConfig {
            size: DEFAULT_MEMORY_SIZE,
            shared: false,
            hugepages: false,
            hugepage_size: None,
            prefault: false,
            hotplug_size: None,
            hotplug_method: HotplugMethod::Acpi,
        }
    }
}

/// Cloud Hypervisor's `memory.hotplug_method` values.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum HotplugMethod {
    #[default]
    Acpi,
    VirtioMem,
}

/// Cloud Hypervisor's `platform` section: the members Hekivisor honours.
/// The others (SMBIOS strings, IOMMU segments, TDX, SEV-SNP...) are accepted
/// at their defaults only (`compat/foreign.rs`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PlatformConfig {
    /// PCI segments (PCI domains): segment N has its own ECAM window, MCFG
    /// entry and ACPI host bridge (`docs/platform.md`).
    #[serde(default = "one_segment")]
    pub num_pci_segments: u16,
}

fn one_segment() -> u16 {
    1
}

impl Default for PlatformConfig {
    fn default() -> Self {
        PlatformConfig { num_pci_segments: 1 }
    }
}

impl MemoryConfig {
    /// Checks sizes, huge pages and the hotplug window.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let size = self.size;
        if size < (1 << 20) || !size.is_multiple_of(4096) || size > MAX_MEMORY_SIZE {
            return Err(invalid(
                "memory.size",
                format!("must be a multiple of 4096 between 1 MiB and {MAX_MEMORY_SIZE} bytes, got {size}"),
            ));
        }
        if let Some(page) = self.hugepage_size {
            if !self.hugepages {
                return Err(invalid("memory.hugepage_size", "needs memory.hugepages=true"));
            }
            if !HUGE_PAGE_SIZES.contains(&page) {
                return Err(invalid(
                    "memory.hugepage_size",
                    format!("must be 2097152 (2 MiB) or 1073741824 (1 GiB), got {page}"),
                ));
            }
        }
        if self.hugepages {
            // The default size is the host's; 2 MiB divides both, so check that here
            // and the host's own size when the memory is mapped.
            let page = self.hugepage_size.unwrap_or(HUGE_PAGE_SIZES[0]);
            if !size.is_multiple_of(page) {
                return Err(invalid(
                    "memory.size",
                    format!("with huge pages it must be a multiple of the huge page size ({page}), got {size}"),
                ));
            }
        }
        if self.hotplug_method == HotplugMethod::VirtioMem {
            return Err(invalid(
                "memory.hotplug_method",
                "VirtioMem is not supported by Hekivisor (no virtio-mem device); Acpi is",
            ));
        }
        if let Some(hotplug) = self.hotplug_size {
            if hotplug == 0 || !hotplug.is_multiple_of(4096) {
                return Err(invalid(
                    "memory.hotplug_size",
                    format!("must be a non-zero multiple of 4096, got {hotplug}"),
                ));
            }
            if size.saturating_add(hotplug) > MAX_MEMORY_SIZE {
                return Err(invalid(
                    "memory.hotplug_size",
                    format!("size + hotplug_size must be at most {MAX_MEMORY_SIZE} bytes, got {}", size + hotplug),
                ));
            }
        }
        Ok(())
    }
}
