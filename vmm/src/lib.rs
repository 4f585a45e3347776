//! The Hekivisor VMM: configuration, boot, devices, vCPU loop and API.

pub mod config;
pub mod layout;
