//! Test doubles and harnesses, compiled only for tests and for the
//! `test-harness` feature (benchmarks, the fuzz crate, the integration
//! tests): never part of a release build of the VMM.
//!
//! Stand-ins for KVM and the VM's run control, so the heki exit path can be
//! driven without a VM; `fuzz` drives the parsers from one byte string.

pub mod fuzz;

use std::sync::Mutex;

use heki::Outcome;
use hypervisor::{Regs, SpecialRegs};

use crate::traps::ports::{HoldTimeout, HostError, RunControl, VcpuAccess, VmSlots};

/// Memslots and the MSR filter, recorded instead of installed.
#[derive(Default)]
pub struct RecordingSlots {
    /// (id, gpa, size, readonly) of the installed slots.
    pub slots: Mutex<Vec<(u32, u64, u64, bool)>>,
    pub msr_filter: Mutex<Vec<u32>>,
}

impl VmSlots for RecordingSlots {
    fn max_memslots(&self) -> usize {
        32_764
    }
    fn has_readonly_memory(&self) -> bool {
        true
    }
    fn install_slot(&self, id: u32, gpa: u64, size: u64, readonly: bool) -> Result<(), HostError> {
        lock(&self.slots).push((id, gpa, size, readonly));
        Ok(())
    }
    fn remove_slot(&self, id: u32, _gpa: u64) -> Result<(), HostError> {
        lock(&self.slots).retain(|s| s.0 != id);
        Ok(())
    }
    fn enable_msr_exits(&self) -> Result<(), HostError> {
        Ok(())
    }
    fn set_msr_write_filter(&self, msrs: &[u32]) -> Result<(), HostError> {
        *lock(&self.msr_filter) = msrs.to_vec();
        Ok(())
    }
}

/// What the heki side asked of the VM's run control.
#[derive(Default)]
pub struct RecordingControl {
    pub holds: Mutex<i64>,
    pub max_holds: Mutex<i64>,
    pub stops: Mutex<Vec<(Outcome, String)>>,
}

impl RunControl for RecordingControl {
    fn hold_vcpus(&self) -> Result<(), HoldTimeout> {
        let mut holds = lock(&self.holds);
        *holds += 1;
        let mut max = lock(&self.max_holds);
        *max = (*max).max(*holds);
        Ok(())
    }
    fn release_vcpus(&self) {
        *lock(&self.holds) -= 1;
    }
    fn notify_vcpus(&self) {}
    fn stop_for_violation(&self, outcome: Outcome, source: &str) {
        lock(&self.stops).push((outcome, source.to_string()));
    }
}

/// A vCPU with registers and MSRs in memory.
#[derive(Default)]
pub struct FakeVcpu {
    pub id: u8,
    pub regs: Mutex<Regs>,
    pub sregs: Mutex<SpecialRegs>,
    pub msrs: Mutex<std::collections::BTreeMap<u32, u64>>,
}

impl VcpuAccess for FakeVcpu {
    fn id(&self) -> u8 {
        self.id
    }
    fn regs(&self) -> Result<Regs, HostError> {
        Ok(*lock(&self.regs))
    }
    fn set_regs(&self, regs: &Regs) -> Result<(), HostError> {
        *lock(&self.regs) = *regs;
        Ok(())
    }
    fn sregs(&self) -> Result<SpecialRegs, HostError> {
        Ok(*lock(&self.sregs))
    }
    fn set_sregs(&self, sregs: &SpecialRegs) -> Result<(), HostError> {
        *lock(&self.sregs) = *sregs;
        Ok(())
    }
    fn msr(&self, index: u32) -> Result<u64, HostError> {
        Ok(lock(&self.msrs).get(&index).copied().unwrap_or(0))
    }
    fn set_msr(&self, index: u32, value: u64) -> Result<(), HostError> {
        lock(&self.msrs).insert(index, value);
        Ok(())
    }
    fn translate_gva(&self, gva: u64) -> Result<Option<u64>, HostError> {
        Ok(Some(gva))
    }
    fn exit_rip(&self) -> Option<u64> {
        Some(lock(&self.regs).rip)
    }
    fn exit_cpl(&self) -> Option<u8> {
        Some(0)
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}
