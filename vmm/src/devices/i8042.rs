//! Just enough of the i8042 keyboard controller for the classic reset.

use std::sync::{Arc, Mutex};

use super::{DeviceAction, PioBus, PioDevice};
use crate::layout::ports;

const CMD_RESET_CPU: u8 = 0xfe;

/// One of the controller's two ports, each on the bus on its own: port 0x61
/// between them belongs to the PIT (`pit.rs`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum I8042Device {
    /// Port 0x60.
    Data,
    /// Port 0x64.
    Command,
}

impl I8042Device {
    /// Claims ports 0x60 and 0x64 on `bus`.
    pub fn attach(bus: &mut PioBus) {
        bus.insert(ports::I8042_DATA, 1, Arc::new(Mutex::new(I8042Device::Data)));
        bus.insert(ports::I8042_COMMAND, 1, Arc::new(Mutex::new(I8042Device::Command)));
    }
}

impl PioDevice for I8042Device {
    fn read(&mut self, _offset: u16, data: &mut [u8]) {
        // Status: output buffer empty, input buffer empty; no keyboard data.
        data.fill(0);
    }

    fn write(&mut self, _offset: u16, data: &[u8]) -> DeviceAction {
        if *self == I8042Device::Command && data.first() == Some(&CMD_RESET_CPU) {
            DeviceAction::Reset
        } else {
            DeviceAction::None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reset_command_on_port_0x64_resets() {
        assert_eq!(I8042Device::Command.write(0, &[0xfe]), DeviceAction::Reset);
        assert_eq!(I8042Device::Data.write(0, &[0xfe]), DeviceAction::None);
    }
}
