//! The PCI configuration space of a virtio function: the type 0 header, the
//! four virtio capabilities pointing into BAR 0, and the MSI-X capability.
//! Only the command register, BAR sizing and MSI-X message control are
//! writable; the VMM places the BAR.
// Guest-supplied numbers: no unchecked arithmetic here.
#![deny(clippy::arithmetic_side_effects)]

use super::layout::{BAR_SIZE, COMMON, DEVICE_CONFIG, ISR, MSIX_PBA, MSIX_TABLE, NOTIFY, NOTIFY_MULTIPLIER};
use crate::devices::pci::fill;
use crate::devices::virtio::{DEVICE_ID_BASE, VENDOR_ID};

const SPACE_SIZE: usize = 256;
const COMMAND: usize = 0x04;
const BAR0: usize = 0x10;
const BAR1: usize = 0x14;
/// Where the virtio vendor capabilities start, one every 16 bytes.
const FIRST_CAP: u8 = 0x40;
const MSIX_CAP: usize = 0x90;
const MSIX_CONTROL: usize = MSIX_CAP + 2;
const MSIX_ENABLE: u16 = 0x8000;
const MSIX_FUNCTION_MASK: u16 = 0x4000;
/// The table-size field of message control, read-only.
const MSIX_TABLE_SIZE_MASK: u16 = 0x07ff;
/// BAR 0's size bits as the sizing protocol reads them back, with the 64-bit type.
const BAR0_SIZE_MASK: u32 = !(BAR_SIZE as u32).wrapping_sub(1) | 0x4;

/// virtio_pci_cap cfg_type values.
const CAP_COMMON: u8 = 1;
const CAP_NOTIFY: u8 = 2;
const CAP_ISR: u8 = 3;
const CAP_DEVICE: u8 = 4;

pub struct ConfigSpace {
    bytes: [u8; SPACE_SIZE],
    /// Whether the driver wrote all ones to BAR 0 / BAR 1 to learn the size.
    bar_probe: [bool; 2],
}

/// What a configuration write changed that the transport must act on.
pub enum ConfigChange {
    None,
    /// MSI-X message control: (enabled, function masked).
    Msix(bool, bool),
}

impl ConfigSpace {
    pub fn new(device_type: u16, class: u32, bar_address: u64, vectors: usize) -> Self {
        let mut bytes = [0u8; SPACE_SIZE];
        let mut put = |off: usize, data: &[u8]| fill_at(&mut bytes, off, data);
        put(0x00, &VENDOR_ID.to_le_bytes());
        put(0x02, &DEVICE_ID_BASE.saturating_add(device_type).to_le_bytes());
        put(0x06, &0x0010u16.to_le_bytes()); // status: capability list
        put(0x08, &[0x01]); // revision 1: modern only
        put(0x09, &class.to_le_bytes()[..3]);
        put(BAR0, &((bar_address as u32) | 0x4).to_le_bytes()); // 64-bit memory BAR
        put(BAR1, &((bar_address >> 32) as u32).to_le_bytes());
        put(0x2c, &VENDOR_ID.to_le_bytes()); // subsystem vendor
        put(0x2e, &0x0040u16.to_le_bytes()); // subsystem id
        put(0x34, &[FIRST_CAP]);
        put(0x3c, &[0xff]); // no INTx line
        // virtio_pci_cap: vndr, next, len, cfg_type, bar, id, pad[2], offset, length;
        // the notify capability adds the queue notify offset multiplier.
        let caps: [(u8, u8, u64, u32); 4] = [
            (CAP_COMMON, 0x50, COMMON, 0x38),
            (CAP_ISR, 0x60, ISR, 4),
            (CAP_DEVICE, 0x70, DEVICE_CONFIG, 0x100),
            (CAP_NOTIFY, MSIX_CAP as u8, NOTIFY, 0x1000),
        ];
        for (i, (kind, next, offset, length)) in caps.into_iter().enumerate() {
            let at = usize::from(FIRST_CAP).saturating_add(i.saturating_mul(16));
            let len = if kind == CAP_NOTIFY { 20 } else { 16 };
            put(at, &[0x09, next, len, kind, 0, 0, 0, 0]);
            put(at.saturating_add(8), &(offset as u32).to_le_bytes());
            put(at.saturating_add(12), &length.to_le_bytes());
            if kind == CAP_NOTIFY {
                put(at.saturating_add(16), &NOTIFY_MULTIPLIER.to_le_bytes());
            }
        }
        // MSI-X: id 0x11, last capability, table size - 1, table and PBA in BAR 0.
        let table_size =
            u16::try_from(vectors.saturating_sub(1)).unwrap_or(MSIX_TABLE_SIZE_MASK) & MSIX_TABLE_SIZE_MASK;
        put(MSIX_CAP, &[0x11, 0x00]);
        put(MSIX_CONTROL, &table_size.to_le_bytes());
        put(MSIX_CAP.saturating_add(4), &(MSIX_TABLE as u32).to_le_bytes());
        put(MSIX_CAP.saturating_add(8), &(MSIX_PBA as u32).to_le_bytes());
        ConfigSpace { bytes, bar_probe: [false; 2] }
    }

    /// Where BAR 0 now is (the guest moved it, `device_manager/relocation.rs`).
    pub fn set_bar_address(&mut self, address: u64) {
        fill_at(&mut self.bytes, BAR0, &((address as u32) | 0x4).to_le_bytes());
        fill_at(&mut self.bytes, BAR1, &((address >> 32) as u32).to_le_bytes());
    }

    pub fn read(&self, offset: u16, data: &mut [u8]) {
        let mut space = self.bytes;
        for (i, probing) in self.bar_probe.iter().enumerate() {
            if *probing {
                let mask: u32 = if i == 0 { BAR0_SIZE_MASK } else { 0xffff_ffff };
                fill_at(&mut space, BAR0.saturating_add(i.saturating_mul(4)), &mask.to_le_bytes());
            }
        }
        fill(&space, offset, data);
    }

    pub fn write(&mut self, offset: u16, data: &[u8]) -> ConfigChange {
        let offset = usize::from(offset);
        match (offset, data.len()) {
            (COMMAND, 2 | 4) => fill_at(&mut self.bytes, COMMAND, &data[..2]),
            (MSIX_CAP | MSIX_CONTROL, _) => {
                let control = if offset == MSIX_CAP { data.get(2..4) } else { data.get(0..2) };
                let Some(&[lo, hi]) = control else { return ConfigChange::None };
                let value = u16::from_le_bytes([lo, hi]);
                let size = u16::from_le_bytes([self.bytes[MSIX_CONTROL], self.bytes[MSIX_CONTROL + 1]]);
                let stored = (value & (MSIX_ENABLE | MSIX_FUNCTION_MASK)) | (size & MSIX_TABLE_SIZE_MASK);
                fill_at(&mut self.bytes, MSIX_CONTROL, &stored.to_le_bytes());
                return ConfigChange::Msix(value & MSIX_ENABLE != 0, value & MSIX_FUNCTION_MASK != 0);
            }
            (BAR0 | BAR1, 4) => {
                // BARs are placed by the VMM; only the sizing protocol is honoured.
                let i = usize::from(offset == BAR1);
                self.bar_probe[i] = data == [0xff; 4];
            }
            _ => {}
        }
        ConfigChange::None
    }
}

fn fill_at(space: &mut [u8; SPACE_SIZE], offset: usize, data: &[u8]) {
    if let Some(dst) = space.get_mut(offset..offset.saturating_add(data.len())) {
        dst.copy_from_slice(data);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read32(space: &ConfigSpace, offset: u16) -> u32 {
        let mut data = [0u8; 4];
        space.read(offset, &mut data);
        u32::from_le_bytes(data)
    }

    #[test]
    fn bar_sizing_reads_the_size_then_the_address_again() {
        let mut space = ConfigSpace::new(4, 0xff_00_00, 0xc000_0000, 2);
        space.write(0x10, &[0xff; 4]);
        assert_eq!(read32(&space, 0x10), BAR0_SIZE_MASK);
        space.write(0x10, &0xc000_0000u32.to_le_bytes());
        assert_eq!(read32(&space, 0x10), 0xc000_0004, "the VMM's address, not the driver's");
    }

    #[test]
    fn msix_control_keeps_the_table_size_and_reports_enable_and_mask() {
        let mut space = ConfigSpace::new(2, 0x01_80_00, 0, 3);
        let change = space.write(0x92, &0xffffu16.to_le_bytes());
        assert!(matches!(change, ConfigChange::Msix(true, true)));
        assert_eq!(read32(&space, 0x90) >> 16, 0xc002, "enable, mask, table size 3 - 1");
    }
}
