//! The MMIO bus: guest-physical ranges outside RAM mapped to devices (a `Bus`).

use std::sync::{Arc, Mutex};

use super::bus::Bus;

/// A device behind an MMIO range. `offset` is relative to its base.
pub trait MmioDevice: Send {
    fn read(&mut self, offset: u64, data: &mut [u8]);
    fn write(&mut self, offset: u64, data: &[u8]);
}

/// Guest-physical ranges mapped to devices.
pub type MmioBus = Bus<dyn MmioDevice>;

impl Bus<dyn MmioDevice> {
    pub fn insert(&mut self, base: u64, len: u64, device: Arc<Mutex<dyn MmioDevice>>) {
        self.add(base, len, device);
    }

    /// Reads a claimed address; `false` if no device is there.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        let Some((mut device, offset)) = self.device_at(addr) else { return false };
        device.read(offset, data);
        true
    }

    /// Writes a claimed address; `false` if no device is there.
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        let Some((mut device, offset)) = self.device_at(addr) else { return false };
        device.write(offset, data);
        true
    }
}
