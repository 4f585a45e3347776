//! A virtio device as the PCI bus sees it, with a BAR the guest may move.
//! Linux assigns a new address to the BAR of a device it finds on a rescan
//! (how a hot-added device appears without ACPI hotplug, docs/api.md) and
//! writes it into the BAR register; the MMIO map and the queues' ioeventfds
//! follow it here.

use std::sync::{Arc, Mutex};

use crate::devices::pci::{BarWindow, PciDevice};
use crate::devices::virtio::pci::{BAR_SIZE, VirtioPci};

/// BAR 0 is 64-bit: its low half at 0x10, its high half at 0x14.
const BAR0_LOW: u16 = 0x10;
const BAR0_HIGH: u16 = 0x14;

pub struct RelocatableDevice {
    pub device: Arc<Mutex<VirtioPci>>,
    pub slot: u8,
    pub bars: Arc<BarWindow>,
    pub kvm_vm: Arc<hypervisor::Vm>,
}

/// The BAR address after the guest wrote `value` to the register at `offset`.
fn new_address(current: u64, offset: u16, value: u32) -> u64 {
    if offset == BAR0_LOW {
        (current & !0xffff_ffff) | (u64::from(value) & !(BAR_SIZE - 1) & 0xffff_ffff)
    } else {
        (current & 0xffff_ffff) | (u64::from(value) << 32)
    }
}

impl RelocatableDevice {
    fn lock(&self) -> std::sync::MutexGuard<'_, VirtioPci> {
        self.device.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl PciDevice for RelocatableDevice {
    fn config_read(&mut self, offset: u16, data: &mut [u8]) {
        self.lock().config_read(offset, data);
    }

    fn config_write(&mut self, offset: u16, data: &[u8]) {
        let mut device = self.lock();
        if let (BAR0_LOW | BAR0_HIGH, Ok(bytes)) = (offset, <[u8; 4]>::try_from(data))
            && bytes != [0xff; 4]
        {
            let old = device.bar_address();
            let new = new_address(old, offset, u32::from_le_bytes(bytes));
            if new != old {
                // The guest updates one half at a time: the address in between
                // is transient, and a clash with another device's notify
                // address there is only logged.
                for (address, fd) in device.notifiers() {
                    if let Err(e) = self.kvm_vm.unregister_mmio_ioevent(fd, address) {
                        log::debug!("slot {}: no ioeventfd at {address:#x} to move: {e}", self.slot);
                    }
                }
                device.set_bar_address(new);
                for (address, fd) in device.notifiers() {
                    if let Err(e) = self.kvm_vm.register_mmio_ioevent(fd, address) {
                        log::debug!("slot {}: cannot put an ioeventfd at {address:#x}: {e}", self.slot);
                    }
                }
                self.bars.relocate(self.slot, new);
                log::debug!("slot {}: BAR 0 moved from {old:#x} to {new:#x}", self.slot);
            }
        }
        device.config_write(offset, data);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_half_of_a_64_bit_bar_write_changes_its_half_of_the_address() {
        assert_eq!(new_address(0xc000_4000, BAR0_LOW, 0x0000_8004), 0x8000);
        assert_eq!(new_address(0x8000, BAR0_HIGH, 1), 0x1_0000_8000);
        assert_eq!(new_address(0x1_0000_8000, BAR0_LOW, 0xc000_4004), 0x1_c000_4000, "flag bits are not address");
    }
}
