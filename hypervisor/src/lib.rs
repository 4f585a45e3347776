//! A safe layer over KVM for Hekivisor.
//!
//! This is the only crate that talks to `/dev/kvm`. Everything above it sees
//! our own types: [`Hypervisor`], [`Vm`], [`Vcpu`], the [`VmExit`] enum and
//! plain register structs, so no KVM type leaks into the VMM.

mod cpuid;
mod error;
mod exit;
pub mod ioctl_numbers;
mod pit;
mod regs;
mod system;
mod teardown;
mod vcpu;
mod vm;

pub use cpuid::CpuidEntry;
pub use error::{HypervisorError, Result};
pub use exit::{EmulationFailure, MsrRead, MsrWrite, SystemEventKind, VmExit};
pub use pit::{PitChannel, PitState};
pub use regs::{DescriptorTable, Regs, Segment, SpecialRegs};
pub use system::{Hypervisor, KVM_DEVICE_ENV};
pub use teardown::tear_down_vms_in_background_on_this_thread;
pub use vcpu::{Vcpu, request_immediate_exit_on_this_thread};
pub use vm::{MemSlot, Vm};

/// EFER bits the boot code and heki care about.
pub mod efer {
    pub const SCE: u64 = 1 << 0;
    pub const LME: u64 = 1 << 8;
    pub const LMA: u64 = 1 << 10;
    pub const NX: u64 = 1 << 11;
}

/// MSR indices used by the VMM.
pub mod msr_index {
    pub const IA32_SYSENTER_CS: u32 = 0x174;
    pub const IA32_SYSENTER_ESP: u32 = 0x175;
    pub const IA32_SYSENTER_EIP: u32 = 0x176;
    pub const IA32_MISC_ENABLE: u32 = 0x1a0;
    pub const IA32_TSC: u32 = 0x10;
    pub const IA32_EFER: u32 = 0xc000_0080;
    pub const IA32_STAR: u32 = 0xc000_0081;
    pub const IA32_LSTAR: u32 = 0xc000_0082;
    pub const IA32_CSTAR: u32 = 0xc000_0083;
    pub const IA32_FMASK: u32 = 0xc000_0084;
    pub const IA32_KERNEL_GS_BASE: u32 = 0xc000_0102;
}
