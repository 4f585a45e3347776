//! VM configuration: one `VmConfig`, built either from CLI flags or from the
//! REST API's JSON, so the two cannot drift. Field names follow Cloud Hypervisor.

pub mod cli;
mod compat;
mod options;

use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use thiserror::Error;

pub use cli::{ApiSocketSpec, CliArgs, EventMonitorSpec, VmmOptions};
pub use compat::{to_cloud_hypervisor_json, vm_config_from_json};
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

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MemoryConfig {
    /// Guest RAM in bytes.
    pub size: u64,
    /// Whether guest RAM may be shared with another process: a vhost-user
    /// backend (`fs`) maps it through the memfd's descriptor. Guest RAM is
    /// always a `MAP_SHARED` memfd; this says whether its descriptor may
    /// leave the VMM, and `fs` needs it (as in Cloud Hypervisor).
    #[serde(default)]
    pub shared: bool,
}

impl Default for MemoryConfig {
    fn default() -> Self {
        MemoryConfig { size: DEFAULT_MEMORY_SIZE, shared: false }
    }
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

/// A virtio-block disk (Cloud Hypervisor's `disks[]`). Fields Cloud
/// Hypervisor defines beyond these are accepted at their defaults only.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiskConfig {
    pub path: PathBuf,
    #[serde(default)]
    pub readonly: bool,
    #[serde(default)]
    pub id: Option<String>,
    /// Request queues (VIRTIO_BLK_F_MQ when more than one), each served by its own worker.
    #[serde(default = "default_disk_num_queues")]
    pub num_queues: usize,
    /// Entries per queue: a power of two up to 32768 (wider than u16 so
    /// that 65536 is refused by name rather than by the JSON parser).
    #[serde(default = "default_disk_queue_size")]
    pub queue_size: u32,
}

/// Request queues per disk; each has an MSI-X vector.
pub const DISK_MAX_QUEUES: usize = 16;

fn default_disk_num_queues() -> usize {
    1
}

fn default_disk_queue_size() -> u32 {
    256
}

/// A virtio-net interface on a host TAP (Cloud Hypervisor's `net[]`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetConfig {
    /// TAP name; created if missing (default: the kernel picks `hktapN`).
    #[serde(default)]
    pub tap: Option<String>,
    /// Host-side address and netmask given to the TAP.
    #[serde(default)]
    pub ip: Option<std::net::Ipv4Addr>,
    #[serde(default)]
    pub mask: Option<std::net::Ipv4Addr>,
    /// Guest MAC address, `aa:bb:cc:dd:ee:ff`.
    #[serde(default)]
    pub mac: Option<String>,
    #[serde(default)]
    pub id: Option<String>,
    /// A TAP opened beforehand and inherited (Cloud Hypervisor's `fds`, one
    /// queue pair: one descriptor); then the VMM needs no `CAP_NET_ADMIN`.
    #[serde(default)]
    pub fds: Option<Vec<i32>>,
}

impl NetConfig {
    /// The guest MAC: configured, or a fixed locally administered default per index.
    pub fn mac_bytes(&self, index: usize) -> Result<[u8; 6], ConfigError> {
        let Some(text) = &self.mac else { return Ok([0x52, 0x54, 0x00, 0x4b, 0x48, index as u8]) };
        let parts: Vec<u8> = text.split(':').filter_map(|p| u8::from_str_radix(p, 16).ok()).collect();
        let mac: [u8; 6] =
            parts.try_into().map_err(|_| invalid("net.mac", format!("'{text}' is not a MAC address")))?;
        Ok(mac)
    }
}

/// A virtio-fs share served by a vhost-user backend such as virtiofsd
/// (Cloud Hypervisor's `fs[]`; `docs/devices.md`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FsConfig {
    /// The name the guest mounts (`mount -t virtiofs <tag> <dir>`), at most 36 bytes.
    pub tag: String,
    /// The backend's vhost-user socket, which the VMM connects to.
    pub socket: PathBuf,
    /// Request queues (the device also has one high-priority queue).
    #[serde(default = "default_fs_num_queues")]
    pub num_queues: usize,
    #[serde(default = "default_fs_queue_size")]
    pub queue_size: u16,
    #[serde(default)]
    pub id: Option<String>,
}

/// The tag's room in the virtio-fs configuration space.
pub const FS_TAG_MAX: usize = 36;
/// Request queues per virtio-fs device; each has an MSI-X vector.
pub const FS_MAX_QUEUES: usize = 16;

fn default_fs_num_queues() -> usize {
    1
}

fn default_fs_queue_size() -> u16 {
    1024
}

/// An extra landlock rule (Cloud Hypervisor's `landlock_rules[]`): `path`
/// (a file, or a directory and everything below it) and `access` (`r`, `w`
/// or `rw`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LandlockConfig {
    pub path: PathBuf,
    pub access: String,
}

/// virtio-rng (Cloud Hypervisor's `rng`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RngConfig {
    pub src: PathBuf,
    /// Accepted for Cloud Hypervisor compatibility; only `false` is supported.
    pub iommu: bool,
}

impl Default for RngConfig {
    fn default() -> Self {
        RngConfig { src: PathBuf::from("/dev/urandom"), iommu: false }
    }
}

/// virtio-vsock with a hybrid Unix-socket host end (Cloud Hypervisor's
/// `vsock`; `docs/devices.md`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VsockConfig {
    /// The guest's context id.
    pub cid: u64,
    /// Host clients connect here and send `CONNECT <port>\n`; a guest
    /// connection to host port P reaches the listener at `<socket>_<P>`.
    pub socket: PathBuf,
    #[serde(default)]
    pub id: Option<String>,
}

/// Guest CIDs 0-2 are reserved (hypervisor, local, host); u32::MAX means "any".
pub const MIN_VSOCK_CID: u64 = 3;
pub const MAX_VSOCK_CID: u64 = u32::MAX as u64 - 1;
/// `sun_path` holds 108 bytes with the terminating NUL; `_<port>` is added
/// for guest-initiated connections.
pub const MAX_VSOCK_SOCKET_PATH: usize = 107;

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
        }
    }
}

impl VmConfig {
    /// Checks the values a user can get wrong.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let cpus = &self.cpus;
        if cpus.boot_vcpus == 0 || cpus.boot_vcpus > MAX_VCPUS {
            return Err(invalid("cpus.boot_vcpus", format!("must be 1..={MAX_VCPUS}, got {}", cpus.boot_vcpus)));
        }
        if cpus.max_vcpus < cpus.boot_vcpus || cpus.max_vcpus > MAX_VCPUS {
            return Err(invalid(
                "cpus.max_vcpus",
                format!("must be boot_vcpus ({})..={MAX_VCPUS}, got {}", cpus.boot_vcpus, cpus.max_vcpus),
            ));
        }
        if let Some(t) = &cpus.topology {
            let levels = [t.threads_per_core, t.cores_per_die, t.dies_per_package, t.packages];
            if levels.contains(&0) {
                return Err(invalid("cpus.topology", "every level needs at least 1"));
            }
            if t.vcpus() != u32::from(cpus.max_vcpus) {
                return Err(invalid(
                    "cpus.topology",
                    format!(
                        "threads_per_core × cores_per_die × dies_per_package × packages is {}, but max_vcpus is {}",
                        t.vcpus(),
                        cpus.max_vcpus
                    ),
                ));
            }
            if !t.apic_ids_are_dense() {
                return Err(invalid(
                    "cpus.topology",
                    "every level below the highest one above 1 needs a power-of-two count \
                     (Hekivisor gives vCPU i APIC id i; sparse APIC ids are not supported yet)",
                ));
            }
        }
        let size = self.memory.size;
        if size < (1 << 20) || !size.is_multiple_of(4096) || size > MAX_MEMORY_SIZE {
            return Err(invalid(
                "memory.size",
                format!("must be a multiple of 4096 between 1 MiB and {MAX_MEMORY_SIZE} bytes, got {size}"),
            ));
        }
        if self.serial.mode == ConsoleOutputMode::Pty {
            return Err(invalid("serial.mode", "mode Pty is supported by the virtio console only"));
        }
        for (field, console) in [("serial.file", &self.serial), ("console.file", &self.console)] {
            if console.mode == ConsoleOutputMode::File && console.file.is_none() {
                return Err(invalid(field, "mode File needs a file"));
            }
        }

        let disks = self.disks.as_deref().unwrap_or_default();
        if disks.len() > 16 {
            return Err(invalid("disks", "at most 16 disks"));
        }
        for disk in disks {
            if disk.num_queues == 0 || disk.num_queues > DISK_MAX_QUEUES {
                let got = disk.num_queues;
                return Err(invalid("disks.num_queues", format!("must be 1..={DISK_MAX_QUEUES}, got {got}")));
            }
            if !disk.queue_size.is_power_of_two() || disk.queue_size > 32768 {
                let got = disk.queue_size;
                return Err(invalid("disks.queue_size", format!("must be a power of two up to 32768, got {got}")));
            }
        }
        for (i, net) in self.net.iter().flatten().enumerate() {
            net.mac_bytes(i)?;
            if net.ip.is_some() != net.mask.is_some() {
                return Err(invalid("net", "ip and mask go together"));
            }
            if let Some(fds) = &net.fds {
                if fds.len() != 1 || fds[0] < 0 {
                    return Err(invalid("net.fds", "one open TAP descriptor (one queue pair)"));
                }
                if net.tap.is_some() {
                    return Err(invalid("net.fds", "give a TAP name or a descriptor, not both"));
                }
            }
        }
        if let Some(vsock) = &self.vsock {
            if !(MIN_VSOCK_CID..=MAX_VSOCK_CID).contains(&vsock.cid) {
                return Err(invalid(
                    "vsock.cid",
                    format!("must be {MIN_VSOCK_CID}..={MAX_VSOCK_CID}, got {}", vsock.cid),
                ));
            }
            let len = vsock.socket.as_os_str().len();
            if len == 0 || len > MAX_VSOCK_SOCKET_PATH {
                return Err(invalid(
                    "vsock.socket",
                    format!("a Unix socket path of 1..={MAX_VSOCK_SOCKET_PATH} bytes"),
                ));
            }
        }
        self.validate_fs()?;
        if self.rng.as_ref().is_some_and(|r| r.iommu) {
            return Err(invalid("rng.iommu", "not supported by Hekivisor"));
        }
        if self.heki.cr_check_interval_ms == 0 || self.heki.cr_check_interval_ms > 60_000 {
            return Err(invalid("heki.cr_check_interval_ms", "must be 1..=60000"));
        }
        if let Some(agent) = &self.introspection
            && (agent.reply_timeout_ms == 0 || agent.reply_timeout_ms > 600_000)
        {
            return Err(invalid("introspection.reply_timeout_ms", "must be 1..=600000"));
        }
        if let Some(agent) = &self.introspection
            && agent.reply_poll_us > MAX_REPLY_POLL_US
        {
            return Err(invalid("introspection.reply_poll_us", format!("must be 0..={MAX_REPLY_POLL_US}")));
        }
        for rule in self.landlock_rules.iter().flatten() {
            if !matches!(rule.access.as_str(), "r" | "w" | "rw") {
                return Err(invalid("landlock_rules.access", format!("'{}': expected r, w or rw", rule.access)));
            }
        }
        if let Some(payload) = &self.payload
            && payload.kernel.is_none()
        {
            return Err(invalid("payload.kernel", "a kernel is required"));
        }
        Ok(())
    }

    /// virtio-fs shares: well-formed, on shared memory, and never under heki
    /// (`docs/heki.md`, "vhost-user devices").
    fn validate_fs(&self) -> Result<(), ConfigError> {
        let shares = self.fs.as_deref().unwrap_or_default();
        if shares.is_empty() {
            return Ok(());
        }
        if self.heki.enabled {
            return Err(invalid(
                "fs",
                "not available with heki enabled: a vhost-user backend maps all of guest RAM and writes it \
                 outside the VMM, where heki's DMA guard cannot refuse a write to locked or private memory",
            ));
        }
        if !self.memory.shared {
            return Err(invalid("fs", "needs memory.shared=true: the vhost-user backend maps guest RAM"));
        }
        if shares.len() > 8 {
            return Err(invalid("fs", "at most 8 virtio-fs devices"));
        }
        for fs in shares {
            if fs.tag.is_empty() || fs.tag.len() > FS_TAG_MAX {
                return Err(invalid("fs.tag", format!("'{}': 1 to {FS_TAG_MAX} bytes", fs.tag)));
            }
            if fs.num_queues == 0 || fs.num_queues > FS_MAX_QUEUES {
                return Err(invalid("fs.num_queues", format!("must be 1..={FS_MAX_QUEUES}, got {}", fs.num_queues)));
            }
            if !fs.queue_size.is_power_of_two() || fs.queue_size > 32768 {
                return Err(invalid(
                    "fs.queue_size",
                    format!("must be a power of two up to 32768, got {}", fs.queue_size),
                ));
            }
        }
        Ok(())
    }
}
