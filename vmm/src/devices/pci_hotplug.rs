//! The ACPI PCI hotplug controller of segment 0: the registers the DSDT's
//! methods (`acpi_hotplug.rs`) read and write, and the interrupt of the
//! Generic Event Device that tells the guest to look at them.
//!
//! Registers, 32 bits each, at `ports::PCI_HOTPLUG`:
//! - 0x0 slots up: bit n set when a device was added in slot n; reading clears it.
//! - 0x4 slots down: bit n set when the VMM asks the guest to let slot n go;
//!   reading clears it.
//! - 0x8 eject: the guest writes bit n once it has released slot n (`_EJ0`).
//! - 0xc present: one bit per occupied slot (the slots' `_STA`).
//!
//! A guest without ACPI never reads these registers; `guest_uses_acpi` tells
//! a removal whether to wait for an eject at all.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use vmm_sys_util::eventfd::EventFd;

use super::pci::PciBus;
use super::{DeviceAction, PioDevice};

pub const SLOTS_UP: u16 = 0x0;
pub const SLOTS_DOWN: u16 = 0x4;
pub const EJECT: u16 = 0x8;
pub const PRESENT: u16 = 0xc;

#[derive(Default)]
struct Pending {
    up: u32,
    down: u32,
    /// Slots the guest ejected that no removal has collected yet.
    ejected: u32,
}

/// State shared by the register block (vCPU threads) and the device
/// manager (the VMM thread, which waits for ejects).
pub struct PciHotplug {
    bus: Arc<PciBus>,
    interrupt: EventFd,
    pending: Mutex<Pending>,
    ejected: Condvar,
    guest_uses_acpi: AtomicBool,
}

impl PciHotplug {
    /// The controller of `bus`; `interrupt` is the GED's irqfd.
    pub fn new(bus: Arc<PciBus>, interrupt: EventFd) -> PciHotplug {
        PciHotplug {
            bus,
            interrupt,
            pending: Mutex::default(),
            ejected: Condvar::new(),
            guest_uses_acpi: AtomicBool::new(false),
        }
    }

    fn pending(&self) -> std::sync::MutexGuard<'_, Pending> {
        self.pending.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn raise(&self) {
        if let Err(e) = self.interrupt.write(1) {
            log::warn!("PCI hotplug: cannot raise the GED interrupt: {e}");
        }
    }

    /// Whether the guest's ACPI has read the registers (every ACPI guest
    /// does at boot, through the slots' `_STA`).
    pub fn guest_uses_acpi(&self) -> bool {
        self.guest_uses_acpi.load(Ordering::Relaxed)
    }

    /// A device now sits in `slot`: tell the guest.
    pub fn announce_added(&self, slot: u8) {
        let Some(bit) = slot_bit(slot) else { return };
        {
            let mut pending = self.pending();
            pending.up |= bit;
            pending.down &= !bit;
            pending.ejected &= !bit;
        }
        self.raise();
    }

    /// Asks the guest to release `slot`, and waits up to `timeout` for its
    /// eject. Returns whether the guest ejected it.
    pub fn request_eject(&self, slot: u8, timeout: Duration) -> bool {
        let Some(bit) = slot_bit(slot) else { return false };
        let mut pending = self.pending();
        pending.down |= bit;
        pending.up &= !bit;
        pending.ejected &= !bit;
        drop(pending);
        self.raise();
        let deadline = Instant::now() + timeout;
        let mut pending = self.pending();
        while pending.ejected & bit == 0 {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                // No eject is expected any more: a late one must not count for the next device.
                pending.down &= !bit;
                return false;
            }
            pending = self.ejected.wait_timeout(pending, left).unwrap_or_else(|p| p.into_inner()).0;
        }
        pending.ejected &= !bit;
        true
    }

    fn read(&self, offset: u16) -> u32 {
        self.guest_uses_acpi.store(true, Ordering::Relaxed);
        let mut pending = self.pending();
        match offset {
            SLOTS_UP => std::mem::take(&mut pending.up),
            SLOTS_DOWN => std::mem::take(&mut pending.down),
            PRESENT => self.bus.occupied(),
            _ => 0,
        }
    }

    fn eject(&self, bits: u32) {
        // Slot 0 is the host bridge: it never goes.
        let bits = bits & !1;
        if bits == 0 {
            return;
        }
        log::info!("PCI hotplug: the guest ejected slots {bits:#x}");
        self.pending().ejected |= bits;
        self.ejected.notify_all();
    }
}

fn slot_bit(slot: u8) -> Option<u32> {
    (1..32).contains(&slot).then(|| 1u32 << slot)
}

/// The register block on the I/O port bus.
pub struct PciHotplugPorts(pub Arc<PciHotplug>);

impl PioDevice for PciHotplugPorts {
    fn read(&mut self, offset: u16, data: &mut [u8]) {
        super::dword_registers::read(offset, data, |offset| self.0.read(offset));
    }

    fn write(&mut self, offset: u16, data: &[u8]) -> DeviceAction {
        if let (EJECT, Some(bits)) = (offset, super::dword_registers::written(offset, data)) {
            self.0.eject(bits);
        }
        DeviceAction::None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn controller() -> Arc<PciHotplug> {
        let irq = EventFd::new(libc::EFD_NONBLOCK).expect("eventfd");
        Arc::new(PciHotplug::new(Arc::new(PciBus::default()), irq))
    }

    fn read(ports: &mut PciHotplugPorts, offset: u16) -> u32 {
        let mut data = [0u8; 4];
        ports.read(offset, &mut data);
        u32::from_le_bytes(data)
    }

    #[test]
    fn an_added_slot_is_reported_once_and_raises_the_interrupt() {
        let hotplug = controller();
        let mut ports = PciHotplugPorts(hotplug.clone());
        assert!(!hotplug.guest_uses_acpi());
        hotplug.announce_added(3);
        assert_eq!(hotplug.interrupt.read().expect("raised"), 1);
        assert_eq!(read(&mut ports, SLOTS_UP), 1 << 3);
        assert_eq!(read(&mut ports, SLOTS_UP), 0, "reading clears it");
        assert_eq!(read(&mut ports, SLOTS_DOWN), 0);
        assert!(hotplug.guest_uses_acpi());
    }

    #[test]
    fn present_follows_the_bus() {
        let hotplug = controller();
        let mut ports = PciHotplugPorts(hotplug.clone());
        assert_eq!(read(&mut ports, PRESENT), 1, "the host bridge alone");
    }

    #[test]
    fn a_removal_waits_for_the_guests_eject() {
        let hotplug = controller();
        let mut ports = PciHotplugPorts(hotplug.clone());
        let guest = std::thread::spawn(move || {
            while read(&mut ports, SLOTS_DOWN) != 1 << 5 {
                std::thread::sleep(Duration::from_millis(1));
            }
            ports.write(EJECT, &(1u32 << 5).to_le_bytes());
        });
        assert!(hotplug.request_eject(5, Duration::from_secs(10)));
        guest.join().expect("guest thread");
    }

    #[test]
    fn a_removal_gives_up_after_its_timeout_and_a_late_or_bad_eject_changes_nothing() {
        let hotplug = controller();
        let mut ports = PciHotplugPorts(hotplug.clone());
        assert!(!hotplug.request_eject(6, Duration::from_millis(20)));
        assert_eq!(read(&mut ports, SLOTS_DOWN), 0, "the request is withdrawn");
        // Slot 0, short writes and other offsets are ignored.
        ports.write(EJECT, &1u32.to_le_bytes());
        ports.write(EJECT, &[0x40]);
        ports.write(SLOTS_UP, &u32::MAX.to_le_bytes());
        assert_eq!(hotplug.pending().ejected, 0);
        assert_eq!(read(&mut ports, SLOTS_UP), 0);
        let mut short = [0xaau8; 2];
        ports.read(PRESENT, &mut short);
        assert_eq!(short, [0, 0]);
    }
}
