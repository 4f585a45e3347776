//! PCI segments (PCI domains): one bus 0 per segment, each with its own ECAM
//! window and 32 MiB of BAR space (`layout.rs`). Segment 0 is also reachable
//! through configuration mechanism #1 (ports 0xCF8/0xCFC), as PC firmware
//! has it; the other segments only through their ECAM window, which the
//! guest learns from the MCFG table. A guest without ACPI therefore sees
//! segment 0 only (`docs/platform.md`).

use std::sync::{Arc, Mutex};

use super::{PciBus, PciConfigIo, PciConfigMmio, PciDevice};
use crate::devices::{MmioBus, PioBus};
use crate::layout::{PCI_MMCONFIG_BUS0_SIZE, pci_segment_bar_window, pci_segment_ecam, ports};

/// Why a device could not be placed.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PlacementError {
    #[error("PCI segment {segment} does not exist (the VM has {count})")]
    NoSuchSegment { segment: u16, count: usize },
    #[error("PCI segment {segment} has no free slot")]
    SegmentFull { segment: u16 },
    #[error("PCI segment {segment} has no BAR space left")]
    NoBarSpace { segment: u16 },
}

/// The buses of every segment, and the next free BAR address of each.
pub struct PciSegments {
    buses: Vec<PciBus>,
    next_bar: Vec<u64>,
}

impl PciSegments {
    pub fn new(count: u16) -> PciSegments {
        let count = count.max(1);
        PciSegments {
            buses: (0..count).map(|_| PciBus::default()).collect(),
            next_bar: (0..count).map(|s| pci_segment_bar_window(s).0).collect(),
        }
    }

    /// Takes `size` bytes of `segment`'s BAR window (naturally aligned).
    pub fn allocate_bar(&mut self, segment: u16, size: u64) -> Result<u64, PlacementError> {
        let count = self.next_bar.len();
        let next =
            self.next_bar.get_mut(usize::from(segment)).ok_or(PlacementError::NoSuchSegment { segment, count })?;
        let (start, window) = pci_segment_bar_window(segment);
        let bar = next.next_multiple_of(size.max(1));
        let end = bar.saturating_add(size);
        if end > start.saturating_add(window) {
            return Err(PlacementError::NoBarSpace { segment });
        }
        *next = end;
        Ok(bar)
    }

    /// Puts `device` in the first free slot of `segment`'s bus 0; returns the slot.
    pub fn add(&mut self, segment: u16, device: Arc<Mutex<dyn PciDevice>>) -> Result<u8, PlacementError> {
        let count = self.buses.len();
        let bus = self.buses.get_mut(usize::from(segment)).ok_or(PlacementError::NoSuchSegment { segment, count })?;
        bus.add(device).ok_or(PlacementError::SegmentFull { segment })
    }

    /// Puts the configuration mechanisms on the buses: 0xCF8 for segment 0,
    /// an ECAM window for each segment.
    pub fn install(self, pio: &mut PioBus, mmio: &mut MmioBus) {
        for (segment, bus) in (0u16..).zip(self.buses) {
            let bus = Arc::new(bus);
            if segment == 0 {
                pio.insert(ports::PCI_CONFIG_ADDRESS, 8, Arc::new(Mutex::new(PciConfigIo::new(bus.clone()))));
            }
            mmio.insert(
                pci_segment_ecam(segment),
                PCI_MMCONFIG_BUS0_SIZE,
                Arc::new(Mutex::new(PciConfigMmio::new(bus))),
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::pci::fill;

    /// A device that answers its vendor/device id.
    struct Tagged(u32);

    impl PciDevice for Tagged {
        fn config_read(&mut self, offset: u16, data: &mut [u8]) {
            fill(&self.0.to_le_bytes(), offset, data);
        }
        fn config_write(&mut self, _offset: u16, _data: &[u8]) {}
    }

    #[test]
    fn bars_come_from_each_segments_own_window() {
        let mut segments = PciSegments::new(2);
        assert_eq!(segments.allocate_bar(0, 0x4000), Ok(pci_segment_bar_window(0).0));
        assert_eq!(segments.allocate_bar(1, 0x4000), Ok(pci_segment_bar_window(1).0));
        assert_eq!(segments.allocate_bar(1, 0x4000), Ok(pci_segment_bar_window(1).0 + 0x4000));
        assert_eq!(segments.allocate_bar(2, 0x4000), Err(PlacementError::NoSuchSegment { segment: 2, count: 2 }));
        let window = pci_segment_bar_window(0).1;
        assert_eq!(segments.allocate_bar(0, window), Err(PlacementError::NoBarSpace { segment: 0 }));
    }

    #[test]
    fn a_device_on_segment_1_answers_in_its_ecam_window_and_not_on_segment_0() {
        let mut segments = PciSegments::new(2);
        let slot = segments.add(1, Arc::new(Mutex::new(Tagged(0x1044_1af4)))).expect("placed");
        assert_eq!(slot, 1, "slot 0 is the host bridge");
        let mut mmio = MmioBus::default();
        let mut pio = PioBus::default();
        segments.install(&mut pio, &mut mmio);
        let read = |segment: u16, slot: u64| {
            let mut id = [0u8; 4];
            assert!(mmio.read(pci_segment_ecam(segment) + (slot << 15), &mut id), "ECAM mapped");
            u32::from_le_bytes(id)
        };
        assert_eq!(read(1, 1), 0x1044_1af4);
        assert_eq!(read(0, 1), 0xffff_ffff, "segment 0's slot 1 is empty");
        assert_eq!(read(1, 0), 0x0008_1b36, "each segment has its host bridge");
    }
}
