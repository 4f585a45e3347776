//! VM configuration: one `VmConfig`, built either from CLI flags or from the
//! REST API's JSON, so the two cannot drift. Field names follow Cloud Hypervisor.

pub mod cli;
mod cli_values;
mod compat;
mod devices;
mod memory;
mod options;
mod validate;

use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use thiserror::Error;

pub use cli::{ApiSocketSpec, CliArgs, EventMonitorSpec, VmmOptions};
pub use compat::{to_cloud_hypervisor_json, vm_config_from_json};
pub use devices::{
    DISK_MAX_QUEUES, DiskConfig, FS_MAX_QUEUES, FS_TAG_MAX, FsConfig, LandlockConfig, MAX_VSOCK_CID,
    MAX_VSOCK_SOCKET_PATH, MIN_VSOCK_CID, NetConfig, RngConfig, VsockConfig,
};
pub use memory::{HUGE_PAGE_SIZES, HotplugMethod, MAX_PCI_SEGMENTS, MemoryConfig, PlatformConfig};
pub use options::parse_size;

/// The most vCPUs a VM may have (APIC ids fit in 8 bits; 255 is broadcast).
pub const MAX_VCPUS: u8 = 254;
/// The most guest RAM we accept.
pub const MAX_MEMORY_SIZE: u64 = 1 << 40;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error("{option}: {message}")]
    Cli { option: &'static str, message: String },
    #[error("{field}: {message}")]
    Invalid { field: &'static str, message: String },
    #[error("{field}: not supported by Hekivisor{}", reason.map(|r| format!(" ({r})")).unwrap_or_default())]
    Unsupported { field: String, reason: Option<&'static str> },
    /// Several problems, one per line: Cloud Hypervisor fields we lack
    /// (top-level fields first, then section by section), then the rest.
    #[error("{}", .0.iter().map(ToString::to_string).collect::<Vec<_>>().join("\n"))]
    Several(Vec<ConfigError>),
    /// Malformed JSON, a wrong type or an unknown field; `path` is where (e.g. `heki.enabeld`).
    #[error("{}{message}", if path.is_empty() { String::new() } else { format!("{path}: ") })]
    Json { path: String, message: String },
}

fn invalid(field: &'static str, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid { field, message: message.into() }
}

pub const DEFAULT_VCPUS: u8 = 1;
pub const DEFAULT_MEMORY_SIZE: u64 = 512 << 20;
pub const DEFAULT_CR_CHECK_INTERVAL_MS: u64 = 10;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CpusConfig {
    pub boot_vcpus: u8,
    /// vCPUs the guest may have: those above `boot_vcpus` are listed in the
    /// MADT as present but disabled (online-capable) and are not started;
    /// bringing them up is hotplug (`vm.resize`, not implemented yet).
    pub max_vcpus: u8,
    /// How the `max_vcpus` vCPUs group into threads, cores, dies and
    /// packages (CPUID leaves 0x1, 0x4, 0xB, 0x1F). Default: one thread per
    /// core, all cores in one die of one package.
    pub topology: Option<CpuTopology>,
}

impl Default for CpusConfig {
    fn default() -> Self {
        CpusConfig { boot_vcpus: DEFAULT_VCPUS, max_vcpus: DEFAULT_VCPUS, topology: None }
    }
}

impl CpusConfig {
    /// The topology the guest sees: the configured one, or the flat default.
    pub fn effective_topology(&self) -> CpuTopology {
        self.topology.unwrap_or_else(|| CpuTopology::flat(self.max_vcpus))
    }
}

/// Cloud Hypervisor's `cpus.topology`; the product of the four must equal
/// `max_vcpus` (`cpu/topology.rs`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CpuTopology {
    pub threads_per_core: u8,
    pub cores_per_die: u8,
    pub dies_per_package: u8,
    pub packages: u8,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PayloadConfig {
    pub kernel: Option<PathBuf>,
    pub cmdline: Option<String>,
    pub initramfs: Option<PathBuf>,
}

/// Where a console's output goes and its input comes from (Cloud
/// Hypervisor's spelling). Input: `Tty` reads stdin, `Pty` the
/// pseudo-terminal; the others have none.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum ConsoleOutputMode {
    Off,
    #[default]
    Null,
    Tty,
    File,
    /// virtio-console only: a pseudo-terminal the VMM opens; `vm.info`
    /// reports its path as `console.file`.
    Pty,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ConsoleConfig {
    pub mode: ConsoleOutputMode,
    pub file: Option<PathBuf>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HekiConfig {
    pub enabled: bool,
    pub policy: heki::Policy,
    pub cr_check_interval_ms: u64,
    /// Whether LOCK_MAPPINGS is offered (translation integrity); off only
    /// to measure what the checks cost.
    pub translation: bool,
}

impl Default for HekiConfig {
    fn default() -> Self {
        HekiConfig {
            enabled: false,
            policy: heki::Policy::Deny,
            cr_check_interval_ms: DEFAULT_CR_CHECK_INTERVAL_MS,
            translation: true,
        }
    }
}

/// The introspection agent's channel (`docs/introspection.md`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IntrospectionConfig {
    /// Unix socket created with mode 0600; one agent at a time.
    pub socket: PathBuf,
    /// How long a vCPU held by an event waits for the agent's reply before
    /// the VM's heki policy decides instead (`agent-timeout`).
    #[serde(default = "default_reply_timeout_ms")]
    pub reply_timeout_ms: u64,
    /// How long a vCPU polls for the reply before it sleeps, as KVM's halt
    /// polling does: a prompt agent's answer then costs no wake-up. 0 turns
    /// polling off (no CPU time spent; every answer wakes the vCPU).
    #[serde(default = "default_reply_poll_us")]
    pub reply_poll_us: u64,
}

pub const DEFAULT_REPLY_TIMEOUT_MS: u64 = 1000;
pub const DEFAULT_REPLY_POLL_US: u64 = 50;
/// Polling longer than this is better spent asleep.
pub const MAX_REPLY_POLL_US: u64 = 10_000;

fn default_reply_poll_us() -> u64 {
    DEFAULT_REPLY_POLL_US
}

fn default_reply_timeout_ms() -> u64 {
    DEFAULT_REPLY_TIMEOUT_MS
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct VmConfig {
    pub cpus: CpusConfig,
    pub memory: MemoryConfig,
    pub payload: Option<PayloadConfig>,
    pub serial: ConsoleConfig,
    pub console: ConsoleConfig,
    pub heki: HekiConfig,
    pub rng: Option<RngConfig>,
    pub disks: Option<Vec<DiskConfig>>,
    pub net: Option<Vec<NetConfig>>,
    pub vsock: Option<VsockConfig>,
    pub fs: Option<Vec<FsConfig>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub introspection: Option<IntrospectionConfig>,
    /// Restrict the VMM's file access to the paths this configuration names
    /// (plus `landlock_rules`) from the boot on (`docs/security.md`).
    pub landlock_enable: bool,
    pub landlock_rules: Option<Vec<LandlockConfig>>,
    /// Cloud Hypervisor's `platform`: the PCI segments (`null`: one).
    pub platform: Option<PlatformConfig>,
}

impl Default for VmConfig {
    fn default() -> Self {
        VmConfig {
            cpus: CpusConfig::default(),
            memory: MemoryConfig::default(),
            payload: None,
            serial: ConsoleConfig { mode: ConsoleOutputMode::Tty, file: None },
            console: ConsoleConfig { mode: ConsoleOutputMode::Off, file: None },
            heki: HekiConfig::default(),
            rng: None,
            disks: None,
            net: None,
            vsock: None,
            fs: None,
            introspection: None,
            landlock_enable: false,
            landlock_rules: None,
            platform: None,
        }
    }
}

impl VmConfig {
    /// How many PCI segments the guest sees.
    pub fn pci_segments(&self) -> u16 {
        self.platform.as_ref().map_or(1, |p| p.num_pci_segments)
    }
}
