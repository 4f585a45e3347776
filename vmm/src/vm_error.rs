//! Why a VM cannot be built, started or paused.

use thiserror::Error;

use crate::cpu::run_control::PauseError;
use crate::memory;

#[derive(Debug, Error)]
pub enum VmError {
    #[error("KVM setup failed")]
    Hypervisor(#[from] hypervisor::HypervisorError),
    #[error(transparent)]
    Memory(#[from] memory::MemoryError),
    #[error(transparent)]
    Boot(#[from] crate::boot::BootError),
    #[error("cannot write ACPI tables")]
    Acpi(#[from] crate::acpi::AcpiError),
    #[error("cannot set up the boot vCPU registers")]
    BootRegisters(#[source] vm_memory::GuestMemoryError),
    #[error("cannot create an eventfd")]
    EventFd(#[source] std::io::Error),
    #[error("cannot start vCPU thread")]
    SpawnVcpu(#[source] std::io::Error),
    #[error(transparent)]
    Pause(#[from] PauseError),
    #[error("device setup failed: {0}")]
    Device(String),
    #[error(
        "the guest did not release vCPU {id} within {timeout:?} (its ACPI processor driver answers the eject request; \
         without ACPI CPU hotplug in the guest a vCPU cannot be removed); it stays"
    )]
    VcpuNotReleased { id: u8, timeout: std::time::Duration },
    #[error(
        "vCPU {id} did not leave the guest within {timeout:?} after its eject (is an introspection agent holding it?); it stays, and the guest is told it is back"
    )]
    VcpuNotParked { id: u8, timeout: std::time::Duration },
}
