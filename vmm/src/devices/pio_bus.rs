//! The I/O port bus: port ranges mapped to devices (a `Bus`).

use std::sync::{Arc, Mutex};

use super::DeviceAction;
use super::bus::Bus;

/// A device behind I/O ports. `offset` is relative to its base port.
pub trait PioDevice: Send {
    fn read(&mut self, offset: u16, data: &mut [u8]);
    fn write(&mut self, offset: u16, data: &[u8]) -> DeviceAction;
}

/// Port ranges mapped to devices.
pub type PioBus = Bus<dyn PioDevice>;

impl Bus<dyn PioDevice> {
    /// Adds a device; panics on overlap, which is a wiring bug in the VMM.
    pub fn insert(&mut self, base: u16, len: u16, device: Arc<Mutex<dyn PioDevice>>) {
        assert!(
            !self.overlaps(u64::from(base), u64::from(len)),
            "I/O port range {base:#x}+{len} overlaps another device"
        );
        self.add(u64::from(base), u64::from(len), device);
    }

    /// Reads from a port; unclaimed ports read as all ones, like an open bus.
    pub fn read(&self, port: u16, data: &mut [u8]) {
        match self.device_at(u64::from(port)) {
            Some((mut device, offset)) => device.read(offset as u16, data),
            None => data.fill(0xff),
        }
    }

    /// Writes to a port; writes to unclaimed ports are dropped.
    pub fn write(&self, port: u16, data: &[u8]) -> DeviceAction {
        match self.device_at(u64::from(port)) {
            Some((mut device, offset)) => device.write(offset as u16, data),
            None => DeviceAction::None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Recorder(Vec<(u16, u8)>);

    impl PioDevice for Recorder {
        fn read(&mut self, offset: u16, data: &mut [u8]) {
            data.fill(offset as u8);
        }
        fn write(&mut self, offset: u16, data: &[u8]) -> DeviceAction {
            self.0.push((offset, data[0]));
            DeviceAction::None
        }
    }

    #[test]
    fn ports_route_to_the_owning_device_with_relative_offsets() {
        let dev = Arc::new(Mutex::new(Recorder(Vec::new())));
        let mut bus = PioBus::default();
        bus.insert(0x3f8, 8, dev.clone());
        let mut data = [0u8; 1];
        bus.read(0x3fd, &mut data);
        assert_eq!(data, [5]);
        bus.write(0x3f8, b"x");
        assert_eq!(dev.lock().expect("lock").0, vec![(0, b'x')]);
    }

    #[test]
    fn unclaimed_ports_read_all_ones() {
        let bus = PioBus::default();
        let mut data = [0u8; 2];
        bus.read(0x1234, &mut data);
        assert_eq!(data, [0xff, 0xff]);
        assert_eq!(bus.write(0x1234, &[1]), DeviceAction::None);
    }
}
