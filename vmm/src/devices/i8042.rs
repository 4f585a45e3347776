//! Just enough of the i8042 keyboard controller for the classic reset.

use super::{DeviceAction, PioDevice};

/// Command port offset relative to the data port (0x60 → 0x64).
const COMMAND_OFFSET: u16 = 4;
const CMD_RESET_CPU: u8 = 0xfe;

#[derive(Default)]
pub struct I8042Device;

impl PioDevice for I8042Device {
    fn read(&mut self, _offset: u16, data: &mut [u8]) {
        // Status: output buffer empty, input buffer empty; no keyboard data.
        data.fill(0);
    }

    fn write(&mut self, offset: u16, data: &[u8]) -> DeviceAction {
        if offset == COMMAND_OFFSET && data.first() == Some(&CMD_RESET_CPU) {
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
        assert_eq!(I8042Device.write(4, &[0xfe]), DeviceAction::Reset);
        assert_eq!(I8042Device.write(0, &[0xfe]), DeviceAction::None);
    }
}
