//! How a vCPU is made: the same for the vCPUs created at boot and for those
//! the host adds later (`vm.resize`), so a hot-added CPU sees the CPUID,
//! topology, MSRs and LAPIC wiring of the others.

use hypervisor::{CpuidEntry, Vcpu};

use super::cpuid;
use crate::config::CpuTopology;

/// Everything needed to create vCPU `id` of a VM.
pub struct VcpuSetup {
    pub supported: Vec<CpuidEntry>,
    /// Leaves added to every vCPU's CPUID (heki's).
    pub extra_leaves: Vec<CpuidEntry>,
    pub topology: CpuTopology,
    /// heki or an agent reads registers at exits: KVM syncs them in the run page.
    pub register_sync: bool,
}

impl VcpuSetup {
    /// vCPU `id`'s CPUID: its APIC id and topology, the TSC leaf, heki's leaves.
    pub fn cpuid(&self, id: u8, tsc_khz: Option<u32>) -> Vec<CpuidEntry> {
        let mut extra = self.extra_leaves.clone();
        extra.extend(tsc_khz.and_then(cpuid::tsc_frequency_leaf));
        cpuid::vcpu_cpuid(&self.supported, id, &self.topology, &extra)
    }

    /// Creates and sets up vCPU `id`; it waits for INIT and SIPI unless it
    /// is the boot vCPU, whose registers the caller sets. Returns it with
    /// its CPUID.
    pub fn create(&self, vm: &hypervisor::Vm, id: u8) -> Result<(Vcpu, Vec<CpuidEntry>), hypervisor::HypervisorError> {
        let mut vcpu = vm.create_vcpu(id)?;
        if self.register_sync {
            vcpu.enable_register_sync();
        }
        let leaves = self.cpuid(id, vcpu.tsc_khz().ok());
        vcpu.set_cpuid(&leaves)?;
        vcpu.setup_lapic_lints()?;
        vcpu.reset_fpu()?;
        vcpu.set_msrs(&[(hypervisor::msr_index::IA32_MISC_ENABLE, 1)])?;
        Ok((vcpu, leaves))
    }
}
