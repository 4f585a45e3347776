//! Memory plugged into a running VM (`vm.resize` with `desired_ram`),
//! through ACPI memory devices (`acpi_memory_hotplug.rs`).
//!
//! The window is mapped since boot (`memory/hotplug.rs`). Plugging a range
//! makes the host view of it accessible, gives it a KVM memslot (through
//! the trap layer's plan when heki or an agent owns the memslots, so their
//! read-only pages stay), lets devices reach it, and only then tells the
//! guest, one device check per slot. Memory is never taken back: a smaller
//! `desired_ram` leaves the VM as it is, as Cloud Hypervisor does.

use std::sync::Arc;

use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

use super::VmError;
use crate::devices::PioBus;
use crate::devices::hotplug_slots::{HotplugSlotPorts, HotplugSlots};
use crate::guest_access::AccessPolicy;
use crate::heki::Enforcer;
use crate::layout::ports;
use crate::memory::{GuestRam, HotplugWindow};
use crate::traps::VmTraps;

/// Why memory could not be plugged in; `vm.resize` answers 400 with it,
/// except `Failed` (500).
#[derive(Debug, thiserror::Error)]
pub enum MemoryResizeError {
    #[error(
        "no memory can be added: memory.hotplug_size reserves no address space for it{0} \
         (set memory.hotplug_size at vm.create)"
    )]
    NoWindow(&'static str),
    #[error(
        "{added} bytes cannot be added: memory is added in slots of {slot} bytes, and {left} bytes of \
         memory.hotplug_size are left"
    )]
    BadAmount { added: u64, slot: u64, left: u64 },
    #[error("the guest made its memory private; memory cannot be added to it")]
    PrivateMemory,
    #[error("cannot plug memory in: {0}")]
    Failed(String),
}

/// The window and what is plugged into it.
pub(super) struct MemoryPlug {
    window: HotplugWindow,
    controller: Arc<HotplugSlots>,
    ram: GuestRam,
    traps: Option<Arc<VmTraps>>,
    enforcer: Arc<Enforcer>,
    kvm_vm: Arc<hypervisor::Vm>,
    /// Bytes plugged in, from the window's start.
    plugged: u64,
    /// The next memslot id when no trap layer plans the memslots.
    next_slot: u32,
}

impl MemoryPlug {
    /// The controller for `window`'s slots on the port bus (None without a window).
    #[allow(clippy::too_many_arguments)]
    pub(super) fn install(
        kvm_vm: &Arc<hypervisor::Vm>,
        window: Option<HotplugWindow>,
        ram: &GuestRam,
        traps: Option<Arc<VmTraps>>,
        enforcer: Arc<Enforcer>,
        boot_slots: usize,
        pio: &mut PioBus,
    ) -> Result<Option<MemoryPlug>, VmError> {
        let Some(window) = window else { return Ok(None) };
        let interrupt = EventFd::new(libc::EFD_NONBLOCK).map_err(VmError::EventFd)?;
        kvm_vm.register_irqfd(&interrupt, ports::GED_IRQ)?;
        let controller = Arc::new(HotplugSlots::new("memory slot", 0, window.slots(), interrupt));
        let ports = Arc::new(std::sync::Mutex::new(HotplugSlotPorts(controller.clone())));
        pio.insert(ports::MEMORY_HOTPLUG, ports::MEMORY_HOTPLUG_LEN, ports);
        Ok(Some(MemoryPlug {
            window,
            controller,
            ram: GuestRam { kvm: ram.kvm.clone(), host: ram.host.clone() },
            traps,
            enforcer,
            kvm_vm: kvm_vm.clone(),
            plugged: 0,
            next_slot: u32::try_from(boot_slots).unwrap_or(u32::MAX),
        }))
    }

    pub(super) fn plugged(&self) -> u64 {
        self.plugged
    }

    /// Whether `added` more bytes could be plugged in (nothing is done).
    fn check(&self, added: u64, private_memory: bool) -> Result<(), MemoryResizeError> {
        let slot = self.window.slot_size();
        let left = self.window.size - self.plugged;
        if added == 0 {
            return Ok(());
        }
        if added > left || (!added.is_multiple_of(slot) && added != left) {
            return Err(MemoryResizeError::BadAmount { added, slot, left });
        }
        if private_memory {
            return Err(MemoryResizeError::PrivateMemory);
        }
        Ok(())
    }

    /// Plugs in `added` more bytes (a whole number of slots, or the rest of
    /// the window) and tells the guest.
    pub(super) fn plug(&mut self, added: u64, private_memory: bool) -> Result<(), MemoryResizeError> {
        self.check(added, private_memory)?;
        if added == 0 {
            return Ok(());
        }
        let slot = self.window.slot_size();
        let start = self.window.start + self.plugged;
        let failed = |e: &dyn std::fmt::Display| MemoryResizeError::Failed(format!("{start:#x}+{added:#x}: {e}"));
        crate::host_view::set_access(&self.ram.host, start, added, true).map_err(|e| failed(&e))?;
        match &self.traps {
            Some(traps) => traps.add_ram(start, added).map_err(|e| failed(&e))?,
            None => {
                register(&self.kvm_vm, &self.ram.kvm, start, added, self.next_slot).map_err(|e| failed(&e))?;
                self.next_slot += 1;
            }
        }
        self.enforcer.epoch().unplugged().plug_up_to(start + added);
        let first = u32::try_from(self.plugged / slot).unwrap_or(u32::MAX);
        self.plugged += added;
        let last = u32::try_from(self.plugged.div_ceil(slot)).unwrap_or(u32::MAX);
        for index in first..last {
            self.controller.announce_added(index);
        }
        log::info!("memory hotplug: {added} bytes at {start:#x} plugged in (slots {first}..{last})");
        crate::events::emit("vm", "memory-plugged", &[("gpa", format!("{start:#x}")), ("size", added.to_string())]);
        Ok(())
    }
}

fn register(vm: &hypervisor::Vm, kvm: &GuestMemoryMmap, gpa: u64, size: u64, slot: u32) -> Result<(), String> {
    crate::memory::register_range(vm, kvm, gpa, size, slot).map(|_| ()).map_err(|e| e.to_string())
}

impl super::Vm {
    /// Gives the guest `desired` bytes of RAM in all (`boot` at boot plus what
    /// is plugged in); less than it has is left as it is.
    pub fn resize_memory(&mut self, boot: u64, desired: u64) -> Result<(), MemoryResizeError> {
        let current = boot + self.hotplugged_memory();
        if desired <= current {
            return Ok(());
        }
        let private = self.heki.as_ref().is_some_and(|h| h.private_memory_enabled());
        let plug = self.memory.as_mut().ok_or(MemoryResizeError::NoWindow(""))?;
        plug.plug(desired - current, private)
    }

    /// What `resize_memory` would answer, without plugging anything in (so a
    /// request that also changes vCPUs is refused before it changes them).
    pub fn check_memory_resize(&self, boot: u64, desired: u64) -> Result<(), MemoryResizeError> {
        let current = boot + self.hotplugged_memory();
        if desired <= current {
            return Ok(());
        }
        let private = self.heki.as_ref().is_some_and(|h| h.private_memory_enabled());
        let plug = self.memory.as_ref().ok_or(MemoryResizeError::NoWindow(""))?;
        plug.check(desired - current, private)
    }

    /// Bytes plugged in since boot (`vm.info`'s `memory.hotplugged_size`).
    pub fn hotplugged_memory(&self) -> u64 {
        self.memory.as_ref().map_or(0, MemoryPlug::plugged)
    }
}
