//! vCPUs: initial state, the per-vCPU thread, exit dispatch, and the gate
//! that keeps them out of guest mode when the VM is changed under them.

mod boot_state;
pub mod cpuid;
pub mod exit;
pub mod gate;
pub mod hook;
pub mod kick;
pub mod parking;
pub mod run_control;
mod setup;
mod topology;
mod vcpu_thread;

pub use boot_state::boot_registers;
pub use exit::{ExitOutcome, VcpuEvent, handle_exit};
pub use gate::{Entry, VcpuGate};
pub use setup::VcpuSetup;
pub use vcpu_thread::{ExitCounters, VcpuContext, describe_emulation_failure, run_vcpu};
