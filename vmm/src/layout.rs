//! Guest physical memory map and I/O port map of the Hekivisor platform.
//!
//! RAM starts at 0. Below 1 MiB, a few fixed pages hold boot structures; the
//! legacy hole 0xA0000..0x100000 is reserved in the e820 map and holds the ACPI
//! tables. The kernel loads at 1 MiB. RAM above `LOW_RAM_END` continues at 4 GiB,
//! leaving a 1 GiB hole for MMIO (LAPIC, IOAPIC, PCI).

/// Real-mode IVT and BIOS data area: left zeroed.
pub const ZERO_PAGE_START: u64 = 0x0;
/// Identity page tables for the 64-bit Linux boot protocol (PML4, PDPT, PD).
pub const BOOT_PML4_START: u64 = 0x9000;
pub const BOOT_PDPTE_START: u64 = 0xa000;
pub const BOOT_PDE_START: u64 = 0xb000;
/// GDT used by the boot vCPU state.
pub const BOOT_GDT_START: u64 = 0x500;
pub const BOOT_IDT_START: u64 = 0x520;
/// PVH `hvm_start_info` and its module list / memory map follow it.
pub const PVH_INFO_START: u64 = 0x6000;
pub const PVH_MODLIST_START: u64 = 0x6040;
pub const PVH_MEMMAP_START: u64 = 0x6100;
/// Linux `boot_params` (the "zero page") for bzImage boot.
pub const BOOT_PARAMS_START: u64 = 0x7000;
/// Kernel command line, NUL terminated.
pub const CMDLINE_START: u64 = 0x20000;
pub const CMDLINE_MAX_SIZE: u64 = 0x10000;
/// Initial stack pointer for the 64-bit Linux boot protocol.
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
/// End of conventional memory: 0xA0000..0x100000 is reserved.
pub const EBDA_START: u64 = 0x9fc00;
pub const LEGACY_HOLE_START: u64 = 0xa0000;
pub const LEGACY_HOLE_END: u64 = 0x10_0000;
/// ACPI tables live in the reserved legacy hole; RSDP first.
pub const RSDP_START: u64 = 0xe0000;
pub const ACPI_TABLES_END: u64 = 0xf0000;
/// MP table (`boot/mptable.rs`): the floating pointer at the start of the
/// EBDA, where Linux looks second, and the configuration table after the
/// ACPI tables.
pub const MPTABLE_FLOATING_START: u64 = EBDA_START;
pub const MPTABLE_CONFIG_START: u64 = 0xf0000;
pub const MPTABLE_CONFIG_END: u64 = 0x10_0000;
/// Where kernels are loaded.
pub const HIGH_RAM_START: u64 = 0x10_0000;
/// RAM below 4 GiB ends here; the rest of RAM starts at `RAM_64BIT_START`.
pub const LOW_RAM_END: u64 = 0xc000_0000;
pub const RAM_64BIT_START: u64 = 0x1_0000_0000;
/// MMIO hole below 4 GiB.
pub const MMIO_HOLE_START: u64 = LOW_RAM_END;
pub const IOAPIC_START: u64 = 0xfec0_0000;
pub const APIC_START: u64 = 0xfee0_0000;
/// PCI ECAM window (MCFG); bus 0 uses its first MiB.
pub const PCI_MMCONFIG_START: u64 = 0xe000_0000;
pub const PCI_MMCONFIG_SIZE: u64 = 0x1000_0000;
pub const PCI_MMCONFIG_BUS0_SIZE: u64 = 0x10_0000;
/// Where the VMM places PCI BARs (one 16 KiB BAR per virtio device).
pub const PCI_BAR_START: u64 = 0xc000_0000;
/// Each PCI segment has 32 MiB of the BAR area, in segment order; sixteen
/// segments fill it up to the ECAM window.
pub const PCI_SEGMENT_BAR_WINDOW: u64 = 0x200_0000;

/// Segment `segment`'s ECAM window (bus 0 only): one MiB each, segment 0 first.
pub const fn pci_segment_ecam(segment: u16) -> u64 {
    PCI_MMCONFIG_START + PCI_MMCONFIG_BUS0_SIZE * segment as u64
}

/// Segment `segment`'s 32-bit BAR window: (start, size).
pub const fn pci_segment_bar_window(segment: u16) -> (u64, u64) {
    (PCI_BAR_START + PCI_SEGMENT_BAR_WINDOW * segment as u64, PCI_SEGMENT_BAR_WINDOW)
}
/// KVM needs three pages for the TSS and one for the identity map (Intel).
pub const KVM_TSS_ADDRESS: u64 = 0xfffb_d000;
pub const KVM_IDENTITY_MAP_ADDRESS: u64 = 0xfffb_c000;

/// I/O ports.
pub mod ports {
    /// 16550 UART, COM1 (IRQ 4).
    pub const COM1: u16 = 0x3f8;
    pub const COM1_IRQ: u32 = 4;
    /// i8042 keyboard controller: data and command ports. Writing 0xFE to 0x64 resets.
    pub const I8042_DATA: u16 = 0x60;
    pub const I8042_COMMAND: u16 = 0x64;
    /// CMOS real-time clock: index port, then the data port at 0x71.
    pub const CMOS_INDEX: u16 = 0x70;
    /// POST diagnostic port: writes ignored.
    pub const POST_CODE: u16 = 0x80;
    /// ACPI hardware-reduced sleep control register (write 0x34 = S5 + SLP_EN)
    /// and reset register (write `ACPI_RESET_VALUE`).
    pub const ACPI_SLEEP_CONTROL: u16 = 0x600;
    /// ACPI sleep status register.
    pub const ACPI_SLEEP_STATUS: u16 = 0x601;
    pub const ACPI_RESET_REGISTER: u16 = 0x602;
    pub const ACPI_RESET_VALUE: u8 = 0x1;
    /// heki guest ABI doorbell: a 32-bit OUT here is a heki call.
    pub const HEKI_DOORBELL: u16 = 0x580;
    /// PCI configuration mechanism #1: address at 0xCF8, data at 0xCFC..0xCFF.
    pub const PCI_CONFIG_ADDRESS: u16 = 0xcf8;
    /// ACPI PCI hotplug registers (`devices/pci_hotplug.rs`): four 32-bit registers.
    pub const PCI_HOTPLUG: u16 = 0xae00;
    pub const PCI_HOTPLUG_LEN: u16 = 16;
    /// ACPI CPU hotplug registers (`devices/cpu_hotplug.rs`): select and status.
    pub const CPU_HOTPLUG: u16 = 0x0cd8;
    pub const CPU_HOTPLUG_LEN: u16 = 8;
    /// ACPI memory hotplug registers (`devices/hotplug_slots.rs`): select and status.
    pub const MEMORY_HOTPLUG: u16 = 0x0ce0;
    pub const MEMORY_HOTPLUG_LEN: u16 = 8;
    /// The ACPI Generic Event Device's interrupt (an ISA IRQ nothing else uses).
    pub const GED_IRQ: u32 = 5;
}
