//! What the VMM side of heki needs from KVM and from the VM's run control,
//! as small traits. Production passes the KVM objects (`KvmSlots`,
//! `hypervisor::Vcpu`) and the VM's control; unit tests pass fakes, so a
//! trapped write, a DMA, a pin and a pause can be driven without a VM.

use std::sync::Arc;

use heki::Outcome;
use hypervisor::{MemSlot, Regs, SpecialRegs};
use vm_memory::GuestMemoryMmap;

/// A failed host operation, as text (the KVM error chain).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct HostError(pub String);

impl From<hypervisor::HypervisorError> for HostError {
    fn from(e: hypervisor::HypervisorError) -> Self {
        HostError(crate::error_chain(&e))
    }
}

/// The VM-wide knobs heki turns: memslots and the MSR write filter.
pub trait VmSlots: Send + Sync {
    fn max_memslots(&self) -> usize;
    fn has_readonly_memory(&self) -> bool;
    /// Maps guest `[gpa, gpa + size)` onto the RAM that backs it, as slot `id`.
    fn install_slot(&self, id: u32, gpa: u64, size: u64, readonly: bool) -> Result<(), HostError>;
    fn remove_slot(&self, id: u32, gpa: u64) -> Result<(), HostError>;
    /// Makes filtered MSR writes exit to user space.
    fn enable_msr_exits(&self) -> Result<(), HostError>;
    fn set_msr_write_filter(&self, msrs: &[u32]) -> Result<(), HostError>;
}

/// One vCPU's state, read and written by its own thread.
pub trait VcpuAccess {
    fn id(&self) -> u8;
    fn regs(&self) -> Result<Regs, HostError>;
    fn set_regs(&self, regs: &Regs) -> Result<(), HostError>;
    fn sregs(&self) -> Result<SpecialRegs, HostError>;
    fn set_sregs(&self, sregs: &SpecialRegs) -> Result<(), HostError>;
    fn msr(&self, index: u32) -> Result<u64, HostError>;
    fn set_msr(&self, index: u32, value: u64) -> Result<(), HostError>;
    fn translate_gva(&self, gva: u64) -> Result<Option<u64>, HostError>;
    /// The guest RIP at the current exit (cheap where KVM syncs registers).
    fn exit_rip(&self) -> Option<u64>;
    /// The guest's privilege level at the current exit (CS.DPL).
    fn exit_cpl(&self) -> Option<u8>;
    /// Whether the vCPU runs code of its own: false while it waits for the
    /// INIT and SIPI that start an added CPU (its registers are not yet its own).
    fn has_started(&self) -> bool {
        true
    }
}

/// What completing a string instruction at its first trapped element needs
/// besides `VcpuAccess`.
pub trait StringExitAccess: VcpuAccess {
    /// Finishes the half-done exit without entering the guest, so the
    /// registers may be changed (`KVM_RUN` with `immediate_exit`). A store
    /// wider than one exit hands back its next piece (GPA, bytes): call
    /// again until `None`.
    fn complete_pending_exit(&mut self) -> Result<Option<(u64, Vec<u8>)>, HostError>;
    /// Whether single instructions are watched (guest debugging, or guest
    /// breakpoints armed in DR7): then each element must run on its own.
    fn instructions_watched(&self) -> Result<bool, HostError>;
}

/// Why vCPUs could not be held out of guest mode.
#[derive(Debug, thiserror::Error)]
#[error("vCPUs did not leave guest mode within {0:?}")]
pub struct HoldTimeout(pub std::time::Duration);

/// Stopping and holding the VM.
pub trait RunControl: Send + Sync {
    /// Keeps every vCPU out of guest mode until `release_vcpus` (holds nest).
    /// Held vCPUs still serve requests posted for them (`notify_vcpus`).
    fn hold_vcpus(&self) -> Result<(), HoldTimeout>;
    fn release_vcpus(&self);
    /// Wakes waiting vCPUs so they look at their requests, and kicks running ones.
    fn notify_vcpus(&self);
    /// Applies a violation's outcome (policy `pause` or `shutdown`) for the
    /// whole VM at once, from any thread. Idempotent: one pause however many
    /// vCPUs and devices trap together.
    fn stop_for_violation(&self, outcome: Outcome, source: &str);
}

/// The KVM implementation of `VmSlots`: slots map ranges of this VM's RAM.
pub struct KvmSlots {
    pub vm: Arc<hypervisor::Vm>,
    pub ram: GuestMemoryMmap,
}

impl VmSlots for KvmSlots {
    fn max_memslots(&self) -> usize {
        self.vm.max_memslots()
    }

    fn has_readonly_memory(&self) -> bool {
        self.vm.has_readonly_memory()
    }

    fn install_slot(&self, id: u32, gpa: u64, size: u64, readonly: bool) -> Result<(), HostError> {
        let not_ram = || HostError(format!("guest range {gpa:#x}+{size:#x} is not one piece of RAM"));
        let last = gpa.checked_add(size).and_then(|end| end.checked_sub(1)).ok_or_else(not_ram)?;
        let host_addr = crate::memory::host_address(&self.ram, gpa).ok_or_else(not_ram)?;
        // One contiguous mapping: the last byte sits where the first one says.
        let host_last = crate::memory::host_address(&self.ram, last).ok_or_else(not_ram)?;
        if host_last.checked_sub(host_addr) != Some(last - gpa) {
            return Err(not_ram());
        }
        let slot = MemSlot { slot: id, guest_addr: gpa, size, host_addr, readonly };
        // SAFETY: the whole range lies in one contiguous piece of this VM's guest RAM
        // mapping (checked above), which lives as long as the VM and its slots.
        unsafe { self.vm.set_memslot(&slot) }?;
        Ok(())
    }

    fn remove_slot(&self, id: u32, gpa: u64) -> Result<(), HostError> {
        Ok(self.vm.remove_memslot(id, gpa)?)
    }

    fn enable_msr_exits(&self) -> Result<(), HostError> {
        Ok(self.vm.enable_msr_filter_exits()?)
    }

    fn set_msr_write_filter(&self, msrs: &[u32]) -> Result<(), HostError> {
        Ok(self.vm.set_msr_write_filter(msrs)?)
    }
}

impl VcpuAccess for hypervisor::Vcpu {
    fn id(&self) -> u8 {
        hypervisor::Vcpu::id(self)
    }
    fn regs(&self) -> Result<Regs, HostError> {
        Ok(hypervisor::Vcpu::regs(self)?)
    }
    fn set_regs(&self, regs: &Regs) -> Result<(), HostError> {
        Ok(hypervisor::Vcpu::set_regs(self, regs)?)
    }
    fn sregs(&self) -> Result<SpecialRegs, HostError> {
        Ok(hypervisor::Vcpu::sregs(self)?)
    }
    fn set_sregs(&self, sregs: &SpecialRegs) -> Result<(), HostError> {
        Ok(hypervisor::Vcpu::set_sregs(self, sregs)?)
    }
    fn msr(&self, index: u32) -> Result<u64, HostError> {
        Ok(hypervisor::Vcpu::msr(self, index)?)
    }
    fn set_msr(&self, index: u32, value: u64) -> Result<(), HostError> {
        Ok(self.set_msrs(&[(index, value)])?)
    }
    fn translate_gva(&self, gva: u64) -> Result<Option<u64>, HostError> {
        Ok(hypervisor::Vcpu::translate_gva(self, gva)?)
    }
    fn exit_rip(&self) -> Option<u64> {
        hypervisor::Vcpu::exit_rip(self).ok()
    }
    fn exit_cpl(&self) -> Option<u8> {
        hypervisor::Vcpu::exit_cpl(self).ok()
    }
    fn has_started(&self) -> bool {
        // If KVM cannot say, count it as started: pins then arm sooner, never later.
        hypervisor::Vcpu::has_started(self).unwrap_or(true)
    }
}

impl StringExitAccess for hypervisor::Vcpu {
    fn complete_pending_exit(&mut self) -> Result<Option<(u64, Vec<u8>)>, HostError> {
        Ok(hypervisor::Vcpu::complete_pending_exit(self)?)
    }
    fn instructions_watched(&self) -> Result<bool, HostError> {
        Ok(hypervisor::Vcpu::instructions_watched(self)?)
    }
}
