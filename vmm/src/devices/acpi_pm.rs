//! ACPI hardware-reduced sleep control/status and reset registers.

use super::{DeviceAction, PioDevice};
use crate::layout::ports::{ACPI_RESET_REGISTER, ACPI_RESET_VALUE, ACPI_SLEEP_CONTROL};

const SLP_EN: u8 = 1 << 5;
const SLP_TYP_SHIFT: u8 = 2;
const SLP_TYP_MASK: u8 = 0x7;
/// The S5 (soft off) sleep type our DSDT's `_S5_` advertises.
pub const S5_SLEEP_TYPE: u8 = 5;

/// Covers the three registers at ports 0x600..0x603.
#[derive(Default)]
pub struct AcpiPmDevice;

impl PioDevice for AcpiPmDevice {
    fn read(&mut self, _offset: u16, data: &mut [u8]) {
        data.fill(0);
    }

    fn write(&mut self, offset: u16, data: &[u8]) -> DeviceAction {
        let Some(&value) = data.first() else {
            return DeviceAction::None;
        };
        match ACPI_SLEEP_CONTROL + offset {
            ACPI_SLEEP_CONTROL if value & SLP_EN != 0 && (value >> SLP_TYP_SHIFT) & SLP_TYP_MASK == S5_SLEEP_TYPE => {
                DeviceAction::PowerOff
            }
            ACPI_RESET_REGISTER if value == ACPI_RESET_VALUE => DeviceAction::Reset,
            _ => DeviceAction::None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn s5_with_slp_en_powers_off() {
        assert_eq!(AcpiPmDevice.write(0, &[0x34]), DeviceAction::PowerOff);
    }

    #[test]
    fn other_sleep_types_or_missing_slp_en_do_nothing() {
        assert_eq!(AcpiPmDevice.write(0, &[0x14]), DeviceAction::None);
        assert_eq!(AcpiPmDevice.write(0, &[0x24]), DeviceAction::None);
    }

    #[test]
    fn reset_register_resets() {
        assert_eq!(AcpiPmDevice.write(2, &[1]), DeviceAction::Reset);
        assert_eq!(AcpiPmDevice.write(2, &[2]), DeviceAction::None);
    }
}
