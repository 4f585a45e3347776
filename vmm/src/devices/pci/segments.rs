//! PCI segments (PCI domains): one bus 0 per segment, each with its own ECAM
//! window and 32 MiB of BAR space (`layout.rs`). Segment 0 is also reachable
//! through configuration mechanism #1 (ports 0xCF8/0xCFC), as PC firmware
//! has it; the other segments only through their ECAM window, which the
//! guest learns from the MCFG table. A guest without ACPI therefore sees
//! segment 0 only (`docs/platform.md`).

use std::sync::{Arc, Mutex};

use super::bar_window::{BarWindow, BarWindowDevice};
use super::{PciBus, PciConfigIo, PciConfigMmio, SLOTS};
use crate::devices::virtio::pci::BAR_SIZE;
use crate::devices::{MmioBus, PioBus};
use crate::layout::{PCI_MMCONFIG_BUS0_SIZE, pci_segment_bar_window, pci_segment_ecam, ports};

/// Why a device could not be placed.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PlacementError {
    #[error("PCI segment {segment} does not exist (the VM has {count})")]
    NoSuchSegment { segment: u16, count: usize },
    #[error("PCI segment {segment} has no free slot")]
    SegmentFull { segment: u16 },
}

/// One segment: its bus 0 and where the BARs of its devices sit.
pub struct PciSegment {
    pub bus: Arc<PciBus>,
    pub bars: Arc<BarWindow>,
}

/// The segments of a VM, wired into the port and MMIO buses.
pub struct PciSegments {
    segments: Vec<PciSegment>,
}

impl PciSegments {
    /// `count` segments (at least one), each with its configuration
    /// mechanisms and its BAR window on the buses: 0xCF8 for segment 0, an
    /// ECAM window for each segment.
    pub fn install(count: u16, pio: &mut PioBus, mmio: &mut MmioBus) -> PciSegments {
        let segments = (0..count.max(1))
            .map(|segment| {
                let bus = Arc::new(PciBus::default());
                let (bar_start, bar_window) = pci_segment_bar_window(segment);
                let bars = Arc::new(BarWindow::new(bar_start, BAR_SIZE, SLOTS));
                debug_assert!(bars.window_len() <= bar_window, "a segment's BARs fit its window");
                if segment == 0 {
                    pio.insert(ports::PCI_CONFIG_ADDRESS, 8, Arc::new(Mutex::new(PciConfigIo::new(bus.clone()))));
                }
                mmio.insert(
                    pci_segment_ecam(segment),
                    PCI_MMCONFIG_BUS0_SIZE,
                    Arc::new(Mutex::new(PciConfigMmio::new(bus.clone()))),
                );
                let window = BarWindowDevice { map: bars.clone(), start: bar_start };
                mmio.insert(bar_start, bars.window_len(), Arc::new(Mutex::new(window)));
                PciSegment { bus, bars }
            })
            .collect();
        PciSegments { segments }
    }

    /// Segment `segment`, or why there is none.
    pub fn get(&self, segment: u16) -> Result<&PciSegment, PlacementError> {
        self.segments
            .get(usize::from(segment))
            .ok_or(PlacementError::NoSuchSegment { segment, count: self.segments.len() })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::pci::{PciDevice, fill};

    /// A device that answers its vendor/device id.
    struct Tagged(u32);

    impl PciDevice for Tagged {
        fn config_read(&mut self, offset: u16, data: &mut [u8]) {
            fill(&self.0.to_le_bytes(), offset, data);
        }
        fn config_write(&mut self, _offset: u16, _data: &[u8]) {}
    }

    #[test]
    fn each_segment_places_bars_in_its_own_window_and_a_missing_one_is_named() {
        let (mut pio, mut mmio) = (PioBus::default(), MmioBus::default());
        let segments = PciSegments::install(2, &mut pio, &mut mmio);
        assert_eq!(segments.get(0).expect("0").bars.bar_address(1), Some(pci_segment_bar_window(0).0));
        assert_eq!(segments.get(1).expect("1").bars.bar_address(1), Some(pci_segment_bar_window(1).0));
        assert_eq!(segments.get(2).err(), Some(PlacementError::NoSuchSegment { segment: 2, count: 2 }));
    }

    #[test]
    fn a_device_on_segment_1_answers_in_its_ecam_window_and_not_on_segment_0() {
        let (mut pio, mut mmio) = (PioBus::default(), MmioBus::default());
        let segments = PciSegments::install(2, &mut pio, &mut mmio);
        let slot = segments.get(1).expect("1").bus.add(Arc::new(Mutex::new(Tagged(0x1044_1af4)))).expect("placed");
        assert_eq!(slot, 1, "slot 0 is the host bridge");
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
