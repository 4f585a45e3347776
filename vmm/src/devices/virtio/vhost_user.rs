//! A vhost-user frontend (rust-vmm's `vhost` crate): another process, the
//! backend, serves a device's queues. The VMM connects to the backend's
//! socket and negotiates features when the VM is built; at DRIVER_OK it hands
//! over guest RAM (the memfd's regions, by descriptor) and each queue's rings,
//! kick eventfd (the queue's ioeventfd) and call eventfd (its MSI-X irqfd).
//! From then on the VMM sees none of the queue traffic.
//!
//! The backend is untrusted input: every message has a deadline
//! (`SOCKET_TIMEOUT`), and a backend that fails or disappears puts the device
//! in NEEDS_RESET; it never stops the VMM.

use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use thiserror::Error;
use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};

use super::QueueHandoff;
pub use crate::memory::SharedRegion;

/// How long one request to the backend may take (a vCPU waits for the
/// hand-over at DRIVER_OK).
const SOCKET_TIMEOUT: Duration = Duration::from_secs(5);

/// Virtio features a vhost-user device may offer the driver, when the
/// backend offers them: the ring layouts the backend implements. Nothing
/// that changes how the VMM itself must behave (no ACCESS_PLATFORM).
const PASSED_FEATURES: u64 = (1 << 28) // VIRTIO_RING_F_INDIRECT_DESC
    | (1 << 29) // VIRTIO_RING_F_EVENT_IDX
    | super::VIRTIO_F_VERSION_1;

#[derive(Debug, Error)]
pub enum VhostUserError {
    #[error("cannot connect to the vhost-user backend at {path}")]
    Connect {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("vhost-user {step} failed")]
    Protocol {
        step: &'static str,
        #[source]
        source: vhost::Error,
    },
    #[error("the vhost-user backend serves {offered} queues; the device needs {wanted}")]
    TooFewQueues { offered: u64, wanted: usize },
    #[error("the vhost-user backend does not offer VIRTIO_F_VERSION_1")]
    NotModern,
    #[error("queue {queue}: ring at {gpa:#x} is outside guest RAM")]
    RingOutsideRam { queue: usize, gpa: u64 },
}

fn step(step: &'static str) -> impl FnOnce(vhost::Error) -> VhostUserError {
    move |source| VhostUserError::Protocol { step, source }
}

/// The connection to one backend.
pub struct VhostUserConnection {
    frontend: Frontend,
    /// The backend's virtio features, as it offered them.
    backend_features: u64,
    /// Whether VHOST_USER_F_PROTOCOL_FEATURES was negotiated (rings then
    /// start disabled and are enabled with SET_VRING_ENABLE).
    protocol: bool,
    regions: Vec<SharedRegion>,
    /// Queues handed over and not yet taken back. Dropping the connection
    /// closes the socket, which ends the session (virtiofsd then exits).
    active: Vec<usize>,
}

impl VhostUserConnection {
    /// Connects and negotiates everything that does not depend on the driver.
    pub fn connect(path: &Path, queues: usize, regions: Vec<SharedRegion>) -> Result<Self, VhostUserError> {
        let connect_err = |source| VhostUserError::Connect { path: path.display().to_string(), source };
        let stream = UnixStream::connect(path).map_err(connect_err)?;
        stream.set_read_timeout(Some(SOCKET_TIMEOUT)).map_err(connect_err)?;
        stream.set_write_timeout(Some(SOCKET_TIMEOUT)).map_err(connect_err)?;
        let mut frontend = Frontend::from_stream(stream, queues as u64);
        frontend.set_owner().map_err(step("SET_OWNER"))?;
        let backend_features = frontend.get_features().map_err(step("GET_FEATURES"))?;
        if backend_features & super::VIRTIO_F_VERSION_1 == 0 {
            return Err(VhostUserError::NotModern);
        }
        let protocol = backend_features & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() != 0;
        if protocol {
            let offered = frontend.get_protocol_features().map_err(step("GET_PROTOCOL_FEATURES"))?;
            let wanted = VhostUserProtocolFeatures::MQ | VhostUserProtocolFeatures::REPLY_ACK;
            let acked = offered & wanted;
            frontend.set_protocol_features(acked).map_err(step("SET_PROTOCOL_FEATURES"))?;
            if acked.contains(VhostUserProtocolFeatures::MQ) {
                let offered = frontend.get_queue_num().map_err(step("GET_QUEUE_NUM"))?;
                if offered < queues as u64 {
                    return Err(VhostUserError::TooFewQueues { offered, wanted: queues });
                }
            }
        }
        Ok(VhostUserConnection { frontend, backend_features, protocol, regions, active: Vec::new() })
    }

    /// The virtio features the device offers the driver.
    pub fn features(&self) -> u64 {
        self.backend_features & PASSED_FEATURES
    }

    /// Hands the queues to the backend (DRIVER_OK). `acked` is what the driver accepted.
    pub fn activate(&mut self, acked: u64, queues: &[QueueHandoff<'_>]) -> Result<(), VhostUserError> {
        // A device reset without DRIVER_OK in between leaves nothing to stop.
        self.deactivate();
        let protocol_bit = if self.protocol { VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() } else { 0 };
        self.frontend.set_features((acked & self.features()) | protocol_bit).map_err(step("SET_FEATURES"))?;
        let table: Vec<VhostUserMemoryRegionInfo> = self
            .regions
            .iter()
            .map(|r| VhostUserMemoryRegionInfo {
                guest_phys_addr: r.gpa,
                memory_size: r.size,
                userspace_addr: r.host_addr,
                mmap_offset: r.file_offset,
                mmap_handle: r.file.as_raw_fd(),
            })
            .collect();
        self.frontend.set_mem_table(&table).map_err(step("SET_MEM_TABLE"))?;
        for q in queues {
            let address =
                |gpa: u64| self.host_address(gpa).ok_or(VhostUserError::RingOutsideRam { queue: q.index, gpa });
            let rings = VringConfigData {
                queue_max_size: q.size,
                queue_size: q.size,
                flags: 0,
                desc_table_addr: address(q.desc_table)?,
                used_ring_addr: address(q.used_ring)?,
                avail_ring_addr: address(q.avail_ring)?,
                log_addr: None,
            };
            self.frontend.set_vring_num(q.index, q.size).map_err(step("SET_VRING_NUM"))?;
            self.frontend.set_vring_base(q.index, 0).map_err(step("SET_VRING_BASE"))?;
            self.frontend.set_vring_addr(q.index, &rings).map_err(step("SET_VRING_ADDR"))?;
            self.frontend.set_vring_kick(q.index, q.kick).map_err(step("SET_VRING_KICK"))?;
            if let Some(call) = q.call {
                self.frontend.set_vring_call(q.index, call).map_err(step("SET_VRING_CALL"))?;
            }
            if self.protocol {
                self.frontend.set_vring_enable(q.index, true).map_err(step("SET_VRING_ENABLE"))?;
            }
            self.active.push(q.index);
        }
        Ok(())
    }

    /// Takes the queues back (driver reset): the backend stops each ring.
    /// Errors are logged only: a backend that is gone has stopped anyway.
    pub fn deactivate(&mut self) {
        for index in std::mem::take(&mut self.active) {
            if self.protocol
                && let Err(e) = self.frontend.set_vring_enable(index, false)
            {
                log::warn!("vhost-user: cannot disable queue {index}: {e}");
            }
            // GET_VRING_BASE stops the ring (vhost-user specification).
            if let Err(e) = self.frontend.get_vring_base(index) {
                log::warn!("vhost-user: cannot stop queue {index}: {e}");
            }
        }
    }

    /// The address naming `gpa` in the memory table.
    fn host_address(&self, gpa: u64) -> Option<u64> {
        let r = self.regions.iter().find(|r| gpa >= r.gpa && gpa - r.gpa < r.size)?;
        r.host_addr.checked_add(gpa - r.gpa)
    }
}
