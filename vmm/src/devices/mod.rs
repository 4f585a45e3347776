//! Platform devices on the I/O port bus.

mod acpi_pm;
mod bus;
mod cmos;
mod dword_registers;
pub mod gate;
pub mod hotplug_slots;
mod i8042;
pub mod mmio_bus;
pub mod msi;
pub mod pci;
pub mod pci_hotplug;
mod pio_bus;
mod pit;
mod serial;
pub mod virtio;

pub use acpi_pm::{AcpiPmDevice, S5_SLEEP_TYPE};
pub use bus::Bus;
pub use cmos::CmosRtc;
pub use i8042::I8042Device;
pub use mmio_bus::{MmioBus, MmioDevice};
pub use pio_bus::{PioBus, PioDevice};
pub use pit::OnDemandPit;
pub use serial::{SerialDevice, SerialOutput};

/// What a device access asks of the VM as a whole.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeviceAction {
    None,
    PowerOff,
    Reset,
}
