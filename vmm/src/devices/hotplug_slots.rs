//! An ACPI hotplug controller of numbered slots, one per vCPU (CPU hotplug,
//! `ports::CPU_HOTPLUG`) or per block of hotplug memory (`ports::MEMORY_HOTPLUG`):
//! the registers the DSDT's methods (`acpi_cpu_hotplug.rs`,
//! `acpi_memory_hotplug.rs`) read and write, and the Generic Event Device's
//! interrupt that makes the guest look at them.
//!
//! Registers, 32 bits each:
//! - 0x0 select: the slot the status register speaks of.
//! - 0x4 status: reads bit 0 enabled (the slot's `_STA`), bit 1 insert
//!   pending, bit 2 remove pending; a write of bit 1 or bit 2 acknowledges
//!   that event, a write of bit 3 says the guest has let the slot go (`_EJ0`).
//!
//! The guest cannot remove anything on its own: an eject counts only for a
//! slot whose removal the host asked for, and never for slot 0 (the boot
//! vCPU). For CPUs, only the host (`vm.resize`) then parks the vCPU, and its
//! heki pins are forgotten only once it is parked.

use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use vmm_sys_util::eventfd::EventFd;

use super::{DeviceAction, PioDevice};

pub const SELECT: u16 = 0x0;
pub const STATUS: u16 = 0x4;
pub const ENABLED: u32 = 1 << 0;
pub const INSERT_PENDING: u32 = 1 << 1;
pub const REMOVE_PENDING: u32 = 1 << 2;
pub const EJECTED: u32 = 1 << 3;

#[derive(Clone, Copy, Default, Debug, PartialEq, Eq)]
struct Slot {
    enabled: bool,
    insert_pending: bool,
    remove_pending: bool,
    ejected: bool,
}

struct Registers {
    selected: u32,
    cpus: Vec<Slot>,
}

/// State shared by the register block (vCPU threads) and `vm.resize` (the
/// VMM thread, which waits for ejects).
pub struct HotplugSlots {
    /// What the slots hold, for the log ("vCPU", "memory slot").
    what: &'static str,
    interrupt: EventFd,
    registers: Mutex<Registers>,
    ejected: Condvar,
}

impl HotplugSlots {
    /// `count` slots of `what`, the first `enabled` of them enabled;
    /// `interrupt` is an irqfd on the GED's line.
    pub fn new(what: &'static str, enabled: u32, count: u32, interrupt: EventFd) -> HotplugSlots {
        let cpus = (0..count).map(|id| Slot { enabled: id < enabled, ..Default::default() }).collect();
        let registers = Mutex::new(Registers { selected: 0, cpus });
        HotplugSlots { what, interrupt, registers, ejected: Condvar::new() }
    }

    fn registers(&self) -> MutexGuard<'_, Registers> {
        self.registers.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn raise(&self) {
        if let Err(e) = self.interrupt.write(1) {
            log::warn!("{} hotplug: cannot raise the GED interrupt: {e}", self.what);
        }
    }

    /// Whether slot `id` is enabled (present for the guest).
    pub fn is_enabled(&self, id: u32) -> bool {
        self.registers().cpus.get(id as usize).is_some_and(|c| c.enabled)
    }

    /// Slot `id` is now filled: tell the guest.
    pub fn announce_added(&self, id: u32) {
        {
            let mut registers = self.registers();
            let Some(cpu) = registers.cpus.get_mut(id as usize) else { return };
            *cpu = Slot { enabled: true, insert_pending: true, ..Default::default() };
        }
        self.raise();
    }

    /// Asks the guest to let slot `id` go and waits up to `timeout` for its
    /// eject. True if the guest ejected it: the slot is then disabled (a
    /// vCPU's caller parks it). Otherwise the request is withdrawn.
    pub fn request_eject(&self, id: u32, timeout: Duration) -> bool {
        {
            let mut registers = self.registers();
            let Some(cpu) = registers.cpus.get_mut(id as usize) else { return false };
            if !cpu.enabled {
                return true;
            }
            cpu.remove_pending = true;
            cpu.insert_pending = false;
            cpu.ejected = false;
        }
        self.raise();
        let deadline = Instant::now() + timeout;
        let mut registers = self.registers();
        loop {
            let cpu = &mut registers.cpus[id as usize];
            if cpu.ejected {
                *cpu = Slot::default();
                return true;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                // A late eject must not count: the vCPU stays.
                cpu.remove_pending = false;
                return false;
            }
            registers = self.ejected.wait_timeout(registers, left).unwrap_or_else(|p| p.into_inner()).0;
        }
    }

    fn read(&self, offset: u16) -> u32 {
        let registers = self.registers();
        match offset {
            SELECT => registers.selected,
            STATUS => registers.cpus.get(registers.selected as usize).map_or(0, |cpu| {
                let bit = |on: bool, bit: u32| if on { bit } else { 0 };
                bit(cpu.enabled, ENABLED)
                    | bit(cpu.insert_pending, INSERT_PENDING)
                    | bit(cpu.remove_pending, REMOVE_PENDING)
            }),
            _ => 0,
        }
    }

    fn write(&self, offset: u16, value: u32) {
        let mut registers = self.registers();
        match offset {
            SELECT => registers.selected = value,
            STATUS => {
                let id = registers.selected;
                let Some(cpu) = registers.cpus.get_mut(id as usize) else { return };
                if value & INSERT_PENDING != 0 {
                    cpu.insert_pending = false;
                }
                if value & EJECTED != 0 {
                    if cpu.remove_pending && id != 0 {
                        log::info!("hotplug: the guest ejected {} {id}", self.what);
                        cpu.remove_pending = false;
                        cpu.ejected = true;
                        self.ejected.notify_all();
                    } else {
                        log::warn!(
                            "hotplug: the guest ejected {} {id}, which the host did not ask for; ignored",
                            self.what
                        );
                    }
                } else if value & REMOVE_PENDING != 0 {
                    // Acknowledged: the request stays until the eject or the host's timeout.
                }
            }
            _ => {}
        }
    }
}

/// The register block on the I/O port bus.
pub struct HotplugSlotPorts(pub std::sync::Arc<HotplugSlots>);

impl PioDevice for HotplugSlotPorts {
    fn read(&mut self, offset: u16, data: &mut [u8]) {
        super::dword_registers::read(offset, data, |offset| self.0.read(offset));
    }

    fn write(&mut self, offset: u16, data: &[u8]) -> DeviceAction {
        if let Some(value) = super::dword_registers::written(offset, data) {
            self.0.write(offset, value);
        }
        DeviceAction::None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn controller(boot: u32, max: u32) -> HotplugSlots {
        HotplugSlots::new("vCPU", boot, max, EventFd::new(libc::EFD_NONBLOCK).expect("eventfd"))
    }

    fn status(c: &HotplugSlots, id: u32) -> u32 {
        c.write(SELECT, id);
        c.read(STATUS)
    }

    #[test]
    fn boot_vcpus_are_enabled_and_an_added_one_raises_an_insert_until_acknowledged() {
        let c = controller(2, 4);
        assert_eq!((status(&c, 0), status(&c, 1), status(&c, 2)), (ENABLED, ENABLED, 0));
        c.announce_added(2);
        assert_eq!(c.interrupt.read().expect("interrupt raised"), 1);
        assert_eq!(status(&c, 2), ENABLED | INSERT_PENDING);
        c.write(STATUS, INSERT_PENDING);
        assert_eq!(status(&c, 2), ENABLED);
        // Out of range: nothing, and no panic.
        assert_eq!(status(&c, 200), 0);
        c.write(STATUS, EJECTED);
    }

    #[test]
    fn an_eject_counts_only_for_a_removal_the_host_asked_for() {
        let c = std::sync::Arc::new(controller(3, 3));
        // The guest ejects vCPU 2 unasked: it stays enabled.
        c.write(SELECT, 2);
        c.write(STATUS, EJECTED);
        assert_eq!(status(&c, 2), ENABLED);
        let guest = {
            let c = c.clone();
            std::thread::spawn(move || {
                while status(&c, 2) & REMOVE_PENDING == 0 {
                    std::thread::yield_now();
                }
                c.write(STATUS, REMOVE_PENDING);
                c.write(STATUS, EJECTED);
            })
        };
        assert!(c.request_eject(2, Duration::from_secs(10)));
        guest.join().expect("guest thread");
        assert!(!c.is_enabled(2));
        assert_eq!(status(&c, 2), 0);
    }

    #[test]
    fn a_guest_that_never_ejects_keeps_its_vcpu_and_a_late_eject_is_ignored() {
        let c = controller(2, 2);
        assert!(!c.request_eject(1, Duration::from_millis(20)));
        assert_eq!(status(&c, 1), ENABLED);
        c.write(STATUS, EJECTED);
        assert!(c.is_enabled(1));
        // vCPU 0 is never ejected, asked or not.
        c.write(SELECT, 0);
        c.write(STATUS, EJECTED);
        assert!(c.is_enabled(0));
    }
}
