//! COM1: vm-superio's 16550 with its interrupt delivered through an irqfd.

use std::io::Write;

use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

use super::{DeviceAction, PioDevice};

/// Raises the serial IRQ by signalling an eventfd that KVM injects (irqfd).
pub struct IrqTrigger(pub EventFd);

impl Trigger for IrqTrigger {
    type E = std::io::Error;

    fn trigger(&self) -> std::io::Result<()> {
        self.0.write(1)
    }
}

/// Where guest serial output goes.
pub type SerialOutput = Box<dyn Write + Send>;

pub struct SerialDevice {
    uart: Serial<IrqTrigger, vm_superio::serial::NoEvents, SerialOutput>,
}

impl SerialDevice {
    pub fn new(irq: EventFd, out: SerialOutput) -> Self {
        SerialDevice { uart: Serial::new(IrqTrigger(irq), out) }
    }

    /// Feeds host input (stdin) to the guest.
    pub fn enqueue_input(&mut self, bytes: &[u8]) -> usize {
        self.uart.enqueue_raw_bytes(bytes).unwrap_or(0)
    }
}

impl PioDevice for SerialDevice {
    fn read(&mut self, offset: u16, data: &mut [u8]) {
        if let Some(first) = data.first_mut() {
            *first = self.uart.read(offset as u8);
        }
    }

    fn write(&mut self, offset: u16, data: &[u8]) -> DeviceAction {
        if let Some(&value) = data.first() {
            if let Err(e) = self.uart.write(offset as u8, value) {
                log::debug!("serial write failed: {e:?}");
            }
            if let Err(e) = self.uart.writer_mut().flush() {
                log::debug!("serial output flush failed: {e}");
            }
        }
        DeviceAction::None
    }
}
