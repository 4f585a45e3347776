//! Applying a memslot layout to KVM: only the slots that changed, with every
//! vCPU held out of guest mode so none sees RAM vanish or a write slip through.

use std::collections::BTreeMap;

use hypervisor::{MemSlot, Vm};
use vm_memory::GuestMemoryMmap;

use crate::cpu::VcpuGate;
use crate::memory::host_address;
use crate::vm::VCPU_STOP_TIMEOUT;

/// One slot of a desired layout.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct SlotSpec {
    pub gpa: u64,
    pub size: u64,
    pub readonly: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum MemslotError {
    #[error("guest address {0:#x} is not backed by RAM")]
    NotRam(u64),
    #[error("no free KVM memslot id")]
    NoSlotId,
    #[error(transparent)]
    Pause(#[from] crate::cpu::gate::GateTimeout),
    #[error("KVM refused the memslot change")]
    Kvm(#[from] hypervisor::HypervisorError),
}

/// The slots currently installed, keyed by their layout.
pub struct MemslotTable {
    installed: BTreeMap<SlotSpec, u32>,
    /// Ids released by removed slots, reused first.
    released: Vec<u32>,
    /// Ids at or above this were never used.
    next_unused: u32,
    max_slots: u32,
}

impl MemslotTable {
    /// Starts from the boot layout: each RAM region in slot 0..n.
    pub fn new(initial: &[MemSlot], max_slots: usize) -> Self {
        let installed: BTreeMap<SlotSpec, u32> = initial
            .iter()
            .map(|s| (SlotSpec { gpa: s.guest_addr, size: s.size, readonly: s.readonly }, s.slot))
            .collect();
        let next_unused = installed.values().map(|id| id + 1).max().unwrap_or(0);
        MemslotTable {
            installed,
            released: Vec::new(),
            next_unused,
            max_slots: max_slots.min(u32::MAX as usize) as u32,
        }
    }

    pub fn slot_count(&self) -> usize {
        self.installed.len()
    }

    pub fn max_slots(&self) -> usize {
        self.max_slots as usize
    }

    /// Replaces the installed layout by `wanted`, touching only what differs.
    /// With `gate`, vCPUs are paused around the change (the caller may itself
    /// be a vCPU thread: it is out of guest mode while it calls this).
    pub fn apply(
        &mut self,
        vm: &Vm,
        mem: &GuestMemoryMmap,
        wanted: &[SlotSpec],
        gate: Option<&VcpuGate>,
    ) -> Result<(), MemslotError> {
        let wanted_set: std::collections::BTreeSet<SlotSpec> = wanted.iter().copied().collect();
        let remove: Vec<(SlotSpec, u32)> =
            self.installed.iter().filter(|(spec, _)| !wanted_set.contains(spec)).map(|(s, id)| (*s, *id)).collect();
        let add: Vec<SlotSpec> = wanted.iter().filter(|spec| !self.installed.contains_key(spec)).copied().collect();
        if remove.is_empty() && add.is_empty() {
            return Ok(());
        }
        let hosts: Vec<u64> = add
            .iter()
            .map(|s| host_address(mem, s.gpa).ok_or(MemslotError::NotRam(s.gpa)))
            .collect::<Result<_, _>>()?;
        if let Some(gate) = gate {
            gate.pause_all(VCPU_STOP_TIMEOUT)?;
        }
        let result = self.swap(vm, &remove, &add, &hosts);
        if let Some(gate) = gate {
            gate.resume_all();
        }
        result
    }

    fn swap(
        &mut self,
        vm: &Vm,
        remove: &[(SlotSpec, u32)],
        add: &[SlotSpec],
        hosts: &[u64],
    ) -> Result<(), MemslotError> {
        for (spec, id) in remove {
            vm.remove_memslot(*id, spec.gpa)?;
            self.installed.remove(spec);
            self.released.push(*id);
        }
        for (spec, host_addr) in add.iter().zip(hosts) {
            let id = self.take_id().ok_or(MemslotError::NoSlotId)?;
            let slot = MemSlot {
                slot: id,
                guest_addr: spec.gpa,
                size: spec.size,
                host_addr: *host_addr,
                readonly: spec.readonly,
            };
            // SAFETY: host_addr is inside guest RAM's mapping (checked above), which
            // lives as long as the VM.
            unsafe { vm.set_memslot(&slot) }?;
            self.installed.insert(*spec, id);
        }
        Ok(())
    }

    fn take_id(&mut self) -> Option<u32> {
        if let Some(id) = self.released.pop() {
            return Some(id);
        }
        let id = self.next_unused;
        (id < self.max_slots).then(|| {
            self.next_unused += 1;
            id
        })
    }
}
