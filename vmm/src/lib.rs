//! The Hekivisor VMM: configuration, boot, devices, vCPU loop and API.

pub mod acpi;
mod acpi_cpu_hotplug;
mod acpi_hotplug;
mod acpi_memory_hotplug;
mod acpi_pci;
mod acpi_slots;
pub mod api;
mod api_handler;
pub mod boot;
pub mod config;
pub mod cpu;
pub mod device_manager;
pub mod devices;
mod errors;
mod events;
pub mod guest_access;
pub mod heki;
mod heki_api;
pub mod host_ioctls;
pub mod host_view;
pub mod introspection;
pub mod layout;
pub mod logging;
pub mod memory;
pub mod sandbox;
pub mod seccomp;
pub mod signals;
#[cfg(any(test, feature = "test-harness"))]
pub mod testing;
pub mod traps;
pub mod vm;
pub mod vm_error;
mod vm_state;
pub mod vmm;
mod vmm_hotplug;
mod vmm_requests;

pub use errors::error_chain;
pub use events::start_event_monitor;
pub use vmm::{VmState, VmmError, VmmRunConfig, run};
