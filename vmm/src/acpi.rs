//! ACPI tables: RSDP → XSDT → FADT (hardware-reduced, with DSDT) and MADT.
//!
//! The FADT's sleep control register is I/O port 0x600 (write SLP_TYP 5 |
//! SLP_EN = 0x34 to power off) and its reset register is I/O port 0x602
//! (write 1). The tables live in the reserved legacy area below 1 MiB.

use acpi_tables::Aml;
use acpi_tables::aml;
use acpi_tables::rsdp::Rsdp;
use acpi_tables::sdt::{GenericAddress, Sdt};
use thiserror::Error;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use zerocopy::IntoBytes;

use crate::boot::mptable::CpuCounts;
use crate::devices::S5_SLEEP_TYPE;
use crate::layout::{ACPI_TABLES_END, APIC_START, IOAPIC_START, RSDP_START, ports};

const OEM_ID: [u8; 6] = *b"HEKIVI";
const OEM_TABLE_ID: [u8; 8] = *b"HEKIVISR";
const OEM_REVISION: u32 = 1;

#[derive(Debug, Error)]
pub enum AcpiError {
    #[error("ACPI tables need {needed} bytes but only {available} are reserved")]
    TooLarge { needed: u64, available: u64 },
    #[error("cannot write ACPI tables to guest memory")]
    GuestMemory(#[source] vm_memory::GuestMemoryError),
    #[error("MP table")]
    MpTable(#[from] crate::boot::mptable::MpTableError),
}

/// One table and where it goes.
pub struct PlacedTable {
    pub signature: String,
    pub addr: u64,
    pub bytes: Vec<u8>,
}

/// FADT offsets (ACPI 6.5, table 5.9).
mod fadt {
    pub const LENGTH: u32 = 276;
    pub const REVISION: u8 = 6;
    pub const MINOR_VERSION: u8 = 5;
    pub const DSDT: usize = 40;
    pub const IAPC_BOOT_ARCH: usize = 109;
    pub const FLAGS: usize = 112;
    pub const RESET_REG: usize = 116;
    pub const RESET_VALUE: usize = 128;
    pub const MINOR_VERSION_OFFSET: usize = 131;
    pub const X_DSDT: usize = 140;
    pub const SLEEP_CONTROL_REG: usize = 244;
    pub const SLEEP_STATUS_REG: usize = 256;
    pub const HYPERVISOR_VENDOR: usize = 268;
    pub const FLAG_RESET_REG_SUP: u32 = 1 << 10;
    pub const FLAG_HW_REDUCED_ACPI: u32 = 1 << 20;
    /// 8042 present, no VGA (bit 5, "CMOS RTC not present", stays clear:
    /// `devices/cmos.rs` answers at ports 0x70/0x71).
    pub const BOOT_ARCH: u16 = (1 << 1) | (1 << 2);
}

fn dsdt(machine: Machine) -> Sdt {
    let Machine { cpus, pci_segments, memory_window } = machine;
    let mut dsdt = Sdt::new(*b"DSDT", 36, 6, OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    let mut body = Vec::new();
    // \_S5_: the sleep type the guest writes to power off.
    aml::Name::new("_S5_".into(), &aml::Package::new(vec![&S5_SLEEP_TYPE, &0u8, &0u8, &0u8])).to_aml_bytes(&mut body);
    let hid = aml::EISAName::new("PNP0501");
    let io = aml::IO::new(ports::COM1, ports::COM1, 1, 8);
    let irq = aml::Interrupt::new(true, true, false, false, ports::COM1_IRQ);
    let crs = aml::ResourceTemplate::new(vec![&io, &irq]);
    let hid_name = aml::Name::new("_HID".into(), &hid);
    let uid_name = aml::Name::new("_UID".into(), &aml::ZERO);
    let crs_name = aml::Name::new("_CRS".into(), &crs);
    let com1 = aml::Device::new("COM1".into(), vec![&hid_name, &uid_name, &crs_name]);
    aml::Scope::new("_SB_".into(), vec![&com1]).to_aml_bytes(&mut body);
    crate::acpi_pci::append_pci_aml(pci_segments, &mut body);
    let mut scans = vec![crate::acpi_cpu_hotplug::SCAN_METHOD];
    if memory_window.is_some() {
        scans.push(crate::acpi_memory_hotplug::SCAN_METHOD);
    }
    crate::acpi_hotplug::append_hotplug_aml(&mut body, &scans);
    crate::acpi_cpu_hotplug::append_cpu_hotplug_aml(cpus.max, &mut body);
    if let Some(window) = &memory_window {
        crate::acpi_memory_hotplug::append_memory_hotplug_aml(window, &mut body);
    }
    dsdt.append_slice(&body);
    dsdt
}

fn fadt(dsdt_addr: u64) -> Sdt {
    let mut fadt = Sdt::new(*b"FACP", fadt::LENGTH, fadt::REVISION, OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    fadt.write_u32(fadt::DSDT, dsdt_addr as u32);
    fadt.write_u64(fadt::X_DSDT, dsdt_addr);
    fadt.write_u16(fadt::IAPC_BOOT_ARCH, fadt::BOOT_ARCH);
    fadt.write_u32(fadt::FLAGS, fadt::FLAG_HW_REDUCED_ACPI | fadt::FLAG_RESET_REG_SUP);
    fadt.write(fadt::RESET_REG, GenericAddress::io_port_address::<u8>(ports::ACPI_RESET_REGISTER));
    fadt.write_u8(fadt::RESET_VALUE, ports::ACPI_RESET_VALUE);
    fadt.write_u8(fadt::MINOR_VERSION_OFFSET, fadt::MINOR_VERSION);
    fadt.write(fadt::SLEEP_CONTROL_REG, GenericAddress::io_port_address::<u8>(ports::ACPI_SLEEP_CONTROL));
    fadt.write(fadt::SLEEP_STATUS_REG, GenericAddress::io_port_address::<u8>(ports::ACPI_SLEEP_STATUS));
    fadt.write_u64(fadt::HYPERVISOR_VENDOR, u64::from_le_bytes(*b"HEKIVISR"));
    fadt.update_checksum();
    fadt
}

fn madt(cpus: CpuCounts) -> Sdt {
    const PCAT_COMPAT: u32 = 1;
    const LAPIC_ENABLED: u32 = 1;
    /// ACPI 6.3: not enabled now, may be enabled later (hotplug).
    const LAPIC_ONLINE_CAPABLE: u32 = 1 << 1;
    let mut madt = Sdt::new(*b"APIC", 44, 5, OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    madt.write_u32(36, APIC_START as u32);
    madt.write_u32(40, PCAT_COMPAT);
    for cpu in 0..cpus.max {
        // Processor Local APIC: type 0, length 8, UID, APIC id (= vCPU index), flags.
        madt.append_slice(&[0, 8, cpu, cpu]);
        let flags = if cpu < cpus.boot { LAPIC_ENABLED } else { LAPIC_ONLINE_CAPABLE };
        madt.append_slice(&flags.to_le_bytes());
    }
    // I/O APIC: type 1, length 12, id, reserved, address, GSI base.
    madt.append_slice(&[1, 12, cpus.max, 0]);
    madt.append_slice(&(IOAPIC_START as u32).to_le_bytes());
    madt.append_slice(&0u32.to_le_bytes());
    // Interrupt source override: ISA IRQ 0 (PIT) is GSI 2 on KVM's IOAPIC.
    madt.append_slice(&[2, 10, 0, 0]);
    madt.append_slice(&2u32.to_le_bytes());
    madt.append_slice(&0u16.to_le_bytes());
    madt.update_checksum();
    madt
}

fn xsdt(entries: &[u64]) -> Sdt {
    let mut xsdt = Sdt::new(*b"XSDT", 36, 1, OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    for addr in entries {
        xsdt.append(*addr);
    }
    xsdt.update_checksum();
    xsdt
}

fn align16(addr: u64) -> u64 {
    (addr + 15) & !15
}

/// What the firmware tables describe: the vCPUs, the PCI segments and the
/// memory hotplug window, if memory can be plugged in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Machine {
    pub cpus: CpuCounts,
    pub pci_segments: u16,
    pub memory_window: Option<crate::memory::HotplugWindow>,
}

impl From<CpuCounts> for Machine {
    fn from(cpus: CpuCounts) -> Machine {
        Machine { cpus, pci_segments: 1, memory_window: None }
    }
}

/// Builds every table and its address, starting with the RSDP at `RSDP_START`.
pub fn build_acpi_tables(machine: impl Into<Machine>) -> Result<Vec<PlacedTable>, AcpiError> {
    let machine = machine.into();
    let Machine { cpus, pci_segments, .. } = machine;
    let mut next = align16(RSDP_START + Rsdp::len() as u64);
    let mut place = |bytes: &[u8]| {
        let addr = next;
        next = align16(addr + bytes.len() as u64);
        addr
    };
    let dsdt = dsdt(machine);
    let dsdt_addr = place(dsdt.as_slice());
    let fadt = fadt(dsdt_addr);
    let fadt_addr = place(fadt.as_slice());
    let madt = madt(cpus);
    let madt_addr = place(madt.as_slice());
    let mcfg = crate::acpi_pci::mcfg(pci_segments, OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    let mcfg_addr = place(mcfg.as_slice());
    let xsdt = xsdt(&[fadt_addr, madt_addr, mcfg_addr]);
    let xsdt_addr = place(xsdt.as_slice());
    if next > ACPI_TABLES_END {
        return Err(AcpiError::TooLarge { needed: next - RSDP_START, available: ACPI_TABLES_END - RSDP_START });
    }
    let rsdp = Rsdp::new(OEM_ID, xsdt_addr);
    let table =
        |signature: &str, addr, bytes: &[u8]| PlacedTable { signature: signature.into(), addr, bytes: bytes.to_vec() };
    Ok(vec![
        table("RSDP", RSDP_START, rsdp.as_bytes()),
        table("DSDT", dsdt_addr, dsdt.as_slice()),
        table("FACP", fadt_addr, fadt.as_slice()),
        table("APIC", madt_addr, madt.as_slice()),
        table("MCFG", mcfg_addr, mcfg.as_slice()),
        table("XSDT", xsdt_addr, xsdt.as_slice()),
    ])
}

/// Writes the tables into guest memory, and the MP table that describes the
/// same machine to kernels without ACPI (`boot/mptable.rs`); returns the
/// RSDP address.
pub fn create_acpi_tables(mem: &GuestMemoryMmap, machine: impl Into<Machine>) -> Result<GuestAddress, AcpiError> {
    let machine = machine.into();
    let cpus = machine.cpus;
    for table in build_acpi_tables(machine)? {
        mem.write_slice(&table.bytes, GuestAddress(table.addr)).map_err(AcpiError::GuestMemory)?;
    }
    crate::boot::mptable::write_mptable(mem, cpus)?;
    Ok(GuestAddress(RSDP_START))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn checksum_ok(bytes: &[u8]) -> bool {
        bytes.iter().fold(0u8, |a, b| a.wrapping_add(*b)) == 0
    }

    #[test]
    fn every_table_checksums_to_zero() {
        for table in build_acpi_tables(CpuCounts { boot: 2, max: 4 }).expect("tables") {
            let len = if table.signature == "RSDP" { 20 } else { table.bytes.len() };
            assert!(checksum_ok(&table.bytes[..len]), "{} checksum", table.signature);
        }
    }

    /// (APIC id, flags) of every Local APIC entry, and the I/O APIC's id.
    fn madt_entries(cpus: CpuCounts) -> (Vec<(u8, u32)>, u8) {
        let tables = build_acpi_tables(cpus).expect("tables");
        let madt = tables.iter().find(|t| t.signature == "APIC").expect("MADT");
        let (mut lapics, mut ioapic) = (Vec::new(), None);
        let mut off = 44;
        while off < madt.bytes.len() {
            let (kind, len) = (madt.bytes[off], usize::from(madt.bytes[off + 1]));
            let entry = &madt.bytes[off..off + len];
            match kind {
                0 => lapics.push((entry[3], u32::from_le_bytes(entry[4..8].try_into().expect("4 bytes")))),
                1 => ioapic = Some(entry[2]),
                _ => {}
            }
            off += len;
        }
        (lapics, ioapic.expect("an I/O APIC"))
    }

    #[test]
    fn madt_has_one_enabled_lapic_per_vcpu() {
        for cpus in [1u8, 2, 8, 254] {
            let (lapics, ioapic) = madt_entries(CpuCounts::all(cpus));
            let expected: Vec<(u8, u32)> = (0..cpus).map(|id| (id, 1)).collect();
            assert_eq!(lapics, expected);
            assert_eq!(ioapic, cpus, "the I/O APIC id follows the last APIC id");
        }
    }

    #[test]
    fn vcpus_above_boot_are_present_online_capable_and_disabled() {
        let (lapics, ioapic) = madt_entries(CpuCounts { boot: 2, max: 5 });
        assert_eq!(lapics, [(0, 1), (1, 1), (2, 2), (3, 2), (4, 2)]);
        assert_eq!(ioapic, 5);
    }

    #[test]
    fn pointers_resolve_in_guest_memory() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 2 << 20)]).expect("memory");
        let rsdp = create_acpi_tables(&mem, CpuCounts::all(2)).expect("written");
        let xsdt: u64 = mem.read_obj(GuestAddress(rsdp.0 + 24)).expect("xsdt pointer");
        let mut sig = [0u8; 4];
        mem.read_slice(&mut sig, GuestAddress(xsdt)).expect("xsdt");
        assert_eq!(&sig, b"XSDT");
        let fadt: u64 = mem.read_obj(GuestAddress(xsdt + 36)).expect("fadt pointer");
        mem.read_slice(&mut sig, GuestAddress(fadt)).expect("fadt");
        assert_eq!(&sig, b"FACP");
        let dsdt: u64 = mem.read_obj(GuestAddress(fadt + 140)).expect("x_dsdt");
        mem.read_slice(&mut sig, GuestAddress(dsdt)).expect("dsdt");
        assert_eq!(&sig, b"DSDT");
        let sleep_port: u64 = mem.read_obj(GuestAddress(fadt + 244 + 4)).expect("sleep control address");
        assert_eq!(sleep_port, 0x600);
    }

    /// Debian's iasl must disassemble every table without errors or warnings.
    /// (iasl cannot read a bare RSDP file; the RSDP is checked above and by
    /// the guest that walks RSDP → XSDT → MADT.)
    #[test]
    fn iasl_disassembles_every_table_cleanly() {
        if std::env::var_os("HEKI_SKIP_IASL").is_some() {
            eprintln!("SKIPPED: HEKI_SKIP_IASL is set");
            return;
        }
        let dir = std::env::temp_dir().join(format!("hekivisor-acpi-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let window = crate::memory::HotplugWindow { start: 4 << 30, size: 512 << 20 };
        let two_segments =
            Machine { cpus: CpuCounts { boot: 2, max: 4 }, pci_segments: 2, memory_window: Some(window) };
        for table in build_acpi_tables(two_segments).expect("tables").into_iter().filter(|t| t.signature != "RSDP") {
            let path = dir.join(format!("{}.dat", table.signature.to_lowercase()));
            std::fs::write(&path, &table.bytes).expect("write table");
            let out = std::process::Command::new("iasl")
                .arg("-d")
                .arg(&path)
                .current_dir(&dir)
                .output()
                .expect("iasl is missing: install acpica-tools (scripts/install-deps.sh)");
            let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
            assert!(out.status.success(), "iasl failed on {}:\n{text}", table.signature);
            let lower = text.to_lowercase();
            for bad in ["error", "warning"] {
                let complaint =
                    lower.lines().any(|l| l.contains(bad) && !l.contains("0 error") && !l.contains("0 warning"));
                assert!(!complaint, "iasl reports a {bad} for {}:\n{text}", table.signature);
            }
            let dsl = std::fs::read_to_string(path.with_extension("dsl")).expect("disassembly written");
            if std::env::var_os("HEKI_PRINT_DSL").is_some() {
                eprintln!("{dsl}");
            }
            assert!(dsl.contains(&format!("\"{}\"", table.signature)), "{dsl}");
            if table.signature == "DSDT" {
                // Both host bridges, with their segment numbers, as iasl reads them.
                for (bridge, segment) in [("PC00", "Zero"), ("PC01", "One")] {
                    let at = dsl.find(&format!("Device ({bridge})")).unwrap_or_else(|| panic!("{bridge}:\n{dsl}"));
                    let device = &dsl[at..];
                    assert!(device.contains("EisaId (\"PNP0A08\")"), "{dsl}");
                    let seg = device.find("Name (_SEG, ").map(|i| &device[i..i + 20]).unwrap_or_default();
                    assert!(seg.contains(segment), "{bridge} _SEG: {seg}\n{dsl}");
                }
                assert!(dsl.contains("EisaId (\"PNP0C02\")"), "the ECAM reservation:\n{dsl}");
                // CPU hotplug: the controller's scan, each vCPU's device and its notification.
                for cpu in [
                    "Method (CSCN, 0, Serialized)",
                    "Device (C003)",
                    "Name (_HID, \"ACPI0010\"",
                    "Notify (C003, Arg1)",
                    "\\_SB.CPHP.CSCN ()",
                    "\\_SB.MHPC.MSCN ()",
                    "Device (M003)",
                    "Name (_HID, EisaId (\"PNP0C80\")",
                    "0x0000000117FFFFFF, // Range Maximum",
                ] {
                    assert!(dsl.contains(cpu), "{cpu} missing:\n{dsl}");
                }
                // PCI hotplug: the GED, the slots and their notifications.
                for hotplug in [
                    "Name (_HID, \"ACPI0013\"",
                    "Device (SL1F)",
                    "Method (_EJ0, 1, NotSerialized)",
                    "Notify (SL01, One)",
                    "Notify (SL1F, 0x03)",
                    "OperationRegion (PHPR, SystemIO, 0xAE00, 0x10)",
                ] {
                    assert!(dsl.contains(hotplug), "no {hotplug}:\n{dsl}");
                }
            }
            if table.signature == "MCFG" {
                assert!(dsl.contains("00000000E0100000"), "segment 1's ECAM base:\n{dsl}");
            }
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
}
