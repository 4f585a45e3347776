//! The PCI segments as ACPI describes them: one MCFG entry per segment (its
//! ECAM window, bus 0 only), one PCI Express host bridge per segment in the
//! DSDT (`PNP0A08` with `_SEG`, `_BBN` and `_CRS`), and a motherboard
//! resource (`PNP0C02`) that reserves the ECAM windows, which Linux wants
//! before it trusts MCFG.

use acpi_tables::Aml;
use acpi_tables::aml;
use acpi_tables::sdt::Sdt;

use crate::layout::{PCI_MMCONFIG_BUS0_SIZE, pci_segment_bar_window, pci_segment_ecam};

/// MCFG: one configuration space base address allocation per segment.
pub fn mcfg(segments: u16, oem_id: [u8; 6], oem_table_id: [u8; 8], oem_revision: u32) -> Sdt {
    let mut mcfg = Sdt::new(*b"MCFG", 44, 1, oem_id, oem_table_id, oem_revision);
    for segment in 0..segments {
        // Base address, segment group, start bus 0, end bus 0, 4 reserved bytes.
        mcfg.append(pci_segment_ecam(segment));
        mcfg.append(segment);
        mcfg.append_slice(&[0, 0, 0, 0, 0, 0]);
    }
    mcfg.update_checksum();
    mcfg
}

/// The DSDT's `\_SB_` scope with a host bridge per segment and the ECAM reservation.
pub fn append_pci_aml(segments: u16, body: &mut Vec<u8>) {
    let bridges: Vec<HostBridge> = (0..segments).map(HostBridge::new).collect();
    let ecam_len = (PCI_MMCONFIG_BUS0_SIZE * u64::from(segments)) as u32;
    let ecam = aml::Memory32Fixed::new(false, pci_segment_ecam(0) as u32, ecam_len);
    let ecam_crs = aml::ResourceTemplate::new(vec![&ecam]);
    let (hid, uid, crs) = (
        aml::Name::new("_HID".into(), &aml::EISAName::new("PNP0C02")),
        aml::Name::new("_UID".into(), &aml::ZERO),
        aml::Name::new("_CRS".into(), &ecam_crs),
    );
    let reservation = aml::Device::new("MCFR".into(), vec![&hid, &uid, &crs]);
    let mut children: Vec<&dyn Aml> = bridges.iter().map(|b| b as &dyn Aml).collect();
    children.push(&reservation);
    aml::Scope::new("_SB_".into(), children).to_aml_bytes(body);
}

/// One segment's host bridge, bus 0 only.
struct HostBridge {
    segment: u16,
}

impl HostBridge {
    fn new(segment: u16) -> HostBridge {
        HostBridge { segment }
    }
}

impl Aml for HostBridge {
    fn to_aml_bytes(&self, sink: &mut dyn acpi_tables::AmlSink) {
        let (bars, bars_size) = pci_segment_bar_window(self.segment);
        let bus = aml::AddressSpace::new_bus_number(0u16, 0u16);
        let memory = aml::AddressSpace::new_memory(
            aml::AddressSpaceCacheable::NotCacheable,
            true,
            bars as u32,
            (bars + bars_size - 1) as u32,
            None,
        );
        // Segment 0 also owns configuration mechanism #1 (0xCF8) and the
        // rest of the I/O port space; no other segment has I/O resources.
        let config_ports = aml::IO::new(0xcf8, 0xcf8, 1, 8);
        let io_low = aml::AddressSpace::new_io(0u16, 0xcf7u16, None);
        let io_high = aml::AddressSpace::new_io(0xd00u16, 0xffffu16, None);
        let resources: Vec<&dyn Aml> =
            if self.segment == 0 { vec![&bus, &config_ports, &io_low, &io_high, &memory] } else { vec![&bus, &memory] };
        let crs = aml::ResourceTemplate::new(resources);
        let hid = aml::Name::new("_HID".into(), &aml::EISAName::new("PNP0A08"));
        let cid = aml::Name::new("_CID".into(), &aml::EISAName::new("PNP0A03"));
        let uid = aml::Name::new("_UID".into(), &self.segment);
        let seg = aml::Name::new("_SEG".into(), &self.segment);
        let bbn = aml::Name::new("_BBN".into(), &aml::ZERO);
        let crs = aml::Name::new("_CRS".into(), &crs);
        let name = format!("PC{:02X}", self.segment);
        aml::Device::new(name.as_str().into(), vec![&hid, &cid, &uid, &seg, &bbn, &crs]).to_aml_bytes(sink);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mcfg_has_one_entry_per_segment_at_its_ecam_window() {
        let mcfg = mcfg(3, *b"HEKIVI", *b"HEKIVISR", 1);
        let bytes = mcfg.as_slice();
        assert_eq!(bytes.len(), 44 + 3 * 16);
        for segment in 0..3u16 {
            let entry = &bytes[44 + 16 * usize::from(segment)..][..16];
            assert_eq!(u64::from_le_bytes(entry[0..8].try_into().expect("8 bytes")), pci_segment_ecam(segment));
            assert_eq!(u16::from_le_bytes([entry[8], entry[9]]), segment);
            assert_eq!((entry[10], entry[11]), (0, 0), "bus 0 only");
        }
    }

    #[test]
    fn every_segment_gets_a_host_bridge_with_its_segment_number() {
        let mut body = Vec::new();
        append_pci_aml(2, &mut body);
        let find = |needle: &[u8]| body.windows(needle.len()).filter(|w| *w == needle).count();
        assert_eq!(find(b"PC00"), 1);
        assert_eq!(find(b"PC01"), 1);
        assert_eq!(find(b"_SEG"), 2);
        assert_eq!(find(b"_BBN"), 2);
        assert_eq!(find(b"MCFR"), 1);
    }
}
