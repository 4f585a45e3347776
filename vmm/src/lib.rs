//! The Hekivisor VMM: configuration, boot, devices, vCPU loop and API.

pub mod acpi;
pub mod api;
mod api_handler;
pub mod boot;
pub mod config;
pub mod cpu;
pub mod devices;
mod heki;
mod events;
pub mod layout;
pub mod memory;
pub mod vm;
pub mod vmm;

pub use vmm::{VmState, VmmError, VmmRunConfig, run};
