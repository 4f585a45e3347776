//! Cloud Hypervisor's device sections: `disks[]`, `net[]`, `fs[]`,
//! `landlock_rules[]`, `rng` and `vsock`.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::{ConfigError, invalid};

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
    /// The PCI segment the device sits on (`platform.num_pci_segments`).
    #[serde(default)]
    pub pci_segment: u16,
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

pub(crate) fn default_disk_num_queues() -> usize {
    1
}

pub(crate) fn default_disk_queue_size() -> u32 {
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
    /// The PCI segment the device sits on (`platform.num_pci_segments`).
    #[serde(default)]
    pub pci_segment: u16,
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
    /// The PCI segment the device sits on (`platform.num_pci_segments`).
    #[serde(default)]
    pub pci_segment: u16,
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
    /// The PCI segment the device sits on (`platform.num_pci_segments`).
    #[serde(default)]
    pub pci_segment: u16,
}

impl Default for RngConfig {
    fn default() -> Self {
        RngConfig { src: PathBuf::from("/dev/urandom"), iommu: false, pci_segment: 0 }
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
    /// The PCI segment the device sits on (`platform.num_pci_segments`).
    #[serde(default)]
    pub pci_segment: u16,
}

/// Guest CIDs 0-2 are reserved (hypervisor, local, host); u32::MAX means "any".
pub const MIN_VSOCK_CID: u64 = 3;
pub const MAX_VSOCK_CID: u64 = u32::MAX as u64 - 1;
/// `sun_path` holds 108 bytes with the terminating NUL; `_<port>` is added
/// for guest-initiated connections.
pub const MAX_VSOCK_SOCKET_PATH: usize = 107;
