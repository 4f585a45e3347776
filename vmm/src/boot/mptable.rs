//! The Intel MultiProcessor Specification 1.4 table, for kernels without ACPI.
//!
//! Without an MP table (or ACPI), Linux looks for one by mapping and
//! unmapping BIOS memory 16 bytes at a time, which takes seconds on a
//! software KVM. The floating pointer sits at the start of the EBDA
//! (0x9FC00), the second place Linux looks; the configuration table is in
//! the reserved legacy hole at 0xF0000. It describes the same machine as the
//! MADT: one enabled processor per vCPU (APIC id = vCPU index, the first one
//! the BSP), the IOAPIC with the id after the last vCPU's, and the ISA interrupts routed as
//! on KVM's in-kernel IOAPIC (IRQ 0, the PIT, on pin 2).

use thiserror::Error;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::layout::{APIC_START, IOAPIC_START, MPTABLE_CONFIG_END, MPTABLE_CONFIG_START, MPTABLE_FLOATING_START};

const SPEC_REVISION: u8 = 4;
const APIC_VERSION: u8 = 0x14;
const IOAPIC_VERSION: u8 = 0x11;
const CPU_ENABLED: u8 = 1;
const CPU_BOOTPROCESSOR: u8 = 2;
/// Family 6, with an FPU and an on-chip APIC (CPUID leaf 1 EAX and EDX).
const CPU_SIGNATURE: u32 = 0x600;
const CPU_FEATURES: u32 = 0x201;
const ISA_BUS: u8 = 0;
const INT: u8 = 0;
const NMI: u8 = 1;
const EXTINT: u8 = 3;
const ALL_LAPICS: u8 = 0xff;

/// The vCPUs the firmware tables describe: `boot` running ones, and up to
/// `max` in all; those above `boot` are present but not started (for hotplug).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CpuCounts {
    pub boot: u8,
    pub max: u8,
}

impl CpuCounts {
    /// `n` vCPUs, all started.
    pub fn all(n: u8) -> CpuCounts {
        CpuCounts { boot: n, max: n }
    }
}

#[derive(Debug, Error)]
pub enum MpTableError {
    #[error("the MP table for {cpus} vCPUs needs {needed} bytes, only {available} are reserved")]
    TooLarge { cpus: u8, needed: usize, available: u64 },
    #[error("cannot write the MP table to guest memory")]
    GuestMemory(#[source] vm_memory::GuestMemoryError),
}

fn checksum(bytes: &[u8]) -> u8 {
    bytes.iter().fold(0u8, |sum, b| sum.wrapping_sub(*b))
}

/// The configuration table (header and entries), checksummed. vCPUs above
/// `cpus.boot` are listed as not enabled (the MP specification has no
/// hotplug; a kernel without ACPI never starts them).
pub fn config_table(cpus: CpuCounts) -> Vec<u8> {
    let mut entries = Vec::new();
    let mut count: u16 = 0;
    for cpu in 0..cpus.max {
        let flags = match cpu {
            0 => CPU_ENABLED | CPU_BOOTPROCESSOR,
            cpu if cpu < cpus.boot => CPU_ENABLED,
            _ => 0,
        };
        entries.extend_from_slice(&[0, cpu, APIC_VERSION, flags]);
        entries.extend_from_slice(&CPU_SIGNATURE.to_le_bytes());
        entries.extend_from_slice(&CPU_FEATURES.to_le_bytes());
        entries.extend_from_slice(&[0; 8]);
        count += 1;
    }
    entries.extend_from_slice(&[1, ISA_BUS]);
    entries.extend_from_slice(b"ISA   ");
    let ioapic_id = cpus.max;
    entries.extend_from_slice(&[2, ioapic_id, IOAPIC_VERSION, 1]);
    entries.extend_from_slice(&(IOAPIC_START as u32).to_le_bytes());
    count += 2;
    for irq in 0..16u8 {
        // IRQ 2 is the PIC cascade; IRQ 0 (the PIT) arrives on pin 2.
        if irq == 2 {
            continue;
        }
        let pin = if irq == 0 { 2 } else { irq };
        entries.extend_from_slice(&[3, INT, 0, 0, ISA_BUS, irq, ioapic_id, pin]);
        count += 1;
    }
    // Local interrupts: the PIC on LINT0 (virtual wire), NMI on LINT1.
    entries.extend_from_slice(&[4, EXTINT, 0, 0, ISA_BUS, 0, ALL_LAPICS, 0]);
    entries.extend_from_slice(&[4, NMI, 0, 0, ISA_BUS, 0, ALL_LAPICS, 1]);
    count += 2;

    let length = u16::try_from(44 + entries.len()).expect("at most 255 vCPUs fit in 64 KiB");
    let mut table = Vec::with_capacity(usize::from(length));
    table.extend_from_slice(b"PCMP");
    table.extend_from_slice(&length.to_le_bytes());
    table.extend_from_slice(&[SPEC_REVISION, 0]);
    table.extend_from_slice(b"HEKIVISR");
    table.extend_from_slice(b"HEKIVISOR   ");
    table.extend_from_slice(&0u32.to_le_bytes()); // OEM table pointer
    table.extend_from_slice(&0u16.to_le_bytes()); // OEM table size
    table.extend_from_slice(&count.to_le_bytes());
    table.extend_from_slice(&(APIC_START as u32).to_le_bytes());
    table.extend_from_slice(&[0; 4]); // no extended table
    table.extend_from_slice(&entries);
    table[7] = checksum(&table);
    table
}

/// The 16-byte floating pointer structure, pointing at the configuration table.
pub fn floating_pointer(config: u32) -> [u8; 16] {
    let mut mpf = [0u8; 16];
    mpf[..4].copy_from_slice(b"_MP_");
    mpf[4..8].copy_from_slice(&config.to_le_bytes());
    mpf[8] = 1; // length in 16-byte units
    mpf[9] = SPEC_REVISION;
    // Feature bytes 0: a configuration table is present; no IMCR.
    mpf[10] = checksum(&mpf);
    mpf
}

/// Writes the floating pointer and the configuration table into guest memory.
pub fn write_mptable(mem: &GuestMemoryMmap, cpus: CpuCounts) -> Result<(), MpTableError> {
    let config = config_table(cpus);
    let available = MPTABLE_CONFIG_END - MPTABLE_CONFIG_START;
    if config.len() as u64 > available {
        return Err(MpTableError::TooLarge { cpus: cpus.max, needed: config.len(), available });
    }
    mem.write_slice(&config, GuestAddress(MPTABLE_CONFIG_START)).map_err(MpTableError::GuestMemory)?;
    let config_address = u32::try_from(MPTABLE_CONFIG_START).expect("below 1 MiB");
    mem.write_slice(&floating_pointer(config_address), GuestAddress(MPTABLE_FLOATING_START))
        .map_err(MpTableError::GuestMemory)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sums_to_zero(bytes: &[u8]) -> bool {
        bytes.iter().fold(0u8, |a, b| a.wrapping_add(*b)) == 0
    }

    /// The entries after the 44-byte header (processors take 20 bytes, the rest 8).
    fn entries(config: &[u8]) -> Vec<&[u8]> {
        let mut out = Vec::new();
        let mut off = 44;
        while off < config.len() {
            let len = match config[off] {
                0 => 20,
                1..=4 => 8,
                other => panic!("unknown entry type {other}"),
            };
            out.push(&config[off..off + len]);
            off += len;
        }
        assert_eq!(off, config.len(), "entries end with the table");
        out
    }

    #[test]
    fn floating_pointer_and_table_checksum_to_zero() {
        let config = config_table(CpuCounts::all(4));
        assert!(sums_to_zero(&config));
        assert_eq!(usize::from(u16::from_le_bytes([config[4], config[5]])), config.len());
        let mpf = floating_pointer(MPTABLE_CONFIG_START as u32);
        assert!(sums_to_zero(&mpf));
        assert_eq!(&mpf[..4], b"_MP_");
    }

    #[test]
    fn one_enabled_processor_per_vcpu_and_only_the_first_boots() {
        for cpus in [1u8, 2, 8, 254] {
            let config = config_table(CpuCounts::all(cpus));
            let all = entries(&config);
            assert_eq!(all.len(), usize::from(u16::from_le_bytes([config[34], config[35]])));
            let processors: Vec<_> = all.iter().filter(|e| e[0] == 0).collect();
            assert_eq!(processors.len(), usize::from(cpus));
            for (index, p) in processors.iter().enumerate() {
                assert_eq!(usize::from(p[1]), index, "APIC id = vCPU index");
                assert_ne!(p[3] & CPU_ENABLED, 0);
                assert_eq!(p[3] & CPU_BOOTPROCESSOR != 0, index == 0);
            }
        }
    }

    #[test]
    fn vcpus_above_boot_are_listed_disabled() {
        let config = config_table(CpuCounts { boot: 2, max: 4 });
        let flags: Vec<u8> = entries(&config).iter().filter(|e| e[0] == 0).map(|p| p[3]).collect();
        assert_eq!(flags, [CPU_ENABLED | CPU_BOOTPROCESSOR, CPU_ENABLED, 0, 0]);
        let ioapic = entries(&config).into_iter().find(|e| e[0] == 2).expect("IOAPIC entry")[1];
        assert_eq!(ioapic, 4, "IOAPIC id after every vCPU, started or not");
    }

    #[test]
    fn isa_irq_0_the_pit_arrives_on_ioapic_pin_2() {
        let config = config_table(CpuCounts::all(1));
        let all = entries(&config);
        let ioapic = all.iter().find(|e| e[0] == 2).expect("IOAPIC entry");
        assert_eq!(ioapic[1], 1, "IOAPIC id after the vCPUs");
        let irq0 = all.iter().find(|e| e[0] == 3 && e[5] == 0).expect("ISA IRQ 0 entry");
        assert_eq!((irq0[6], irq0[7]), (1, 2));
        let irq4 = all.iter().find(|e| e[0] == 3 && e[5] == 4).expect("ISA IRQ 4 entry");
        assert_eq!(irq4[7], 4, "COM1");
    }

    #[test]
    fn the_largest_table_fits_its_reserved_area() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).expect("memory");
        write_mptable(&mem, CpuCounts::all(254)).expect("fits");
        let mut signature = [0u8; 4];
        mem.read_slice(&mut signature, GuestAddress(MPTABLE_FLOATING_START)).expect("read");
        assert_eq!(&signature, b"_MP_");
        mem.read_slice(&mut signature, GuestAddress(MPTABLE_CONFIG_START)).expect("read");
        assert_eq!(&signature, b"PCMP");
    }
}
