//! virtio-fs (device type 26) through a vhost-user backend such as virtiofsd:
//! the backend serves the queues; the VMM provides the configuration space
//! (tag and request-queue count) and hands the queues over at DRIVER_OK.

use virtio_queue::DescriptorChain;

use super::vhost_user::{SharedRegion, VhostUserConnection, VhostUserError};
use super::{ActivateError, DeviceMemory, QueueHandoff, VirtioDevice};
use crate::config::{FS_TAG_MAX, FsConfig};
use crate::guest_access::CheckedMemory;

pub const DEVICE_TYPE_FS: u16 = 26;

pub struct Fs {
    /// tag[36] (NUL-padded) then num_request_queues (le32).
    config: [u8; FS_TAG_MAX + 4],
    queues: usize,
    queue_size: u16,
    backend: VhostUserConnection,
}

impl Fs {
    /// Connects to the share's backend; `regions` is guest RAM as the backend maps it.
    pub fn new(share: &FsConfig, regions: Vec<SharedRegion>) -> Result<Fs, VhostUserError> {
        // One high-priority queue, then the request queues.
        let queues = share.num_queues.saturating_add(1);
        let backend = VhostUserConnection::connect(&share.socket, queues, regions)?;
        let mut config = [0u8; FS_TAG_MAX + 4];
        let tag = share.tag.as_bytes();
        let len = tag.len().min(FS_TAG_MAX);
        config[..len].copy_from_slice(&tag[..len]);
        let requests = u32::try_from(share.num_queues).unwrap_or(u32::MAX);
        config[FS_TAG_MAX..].copy_from_slice(&requests.to_le_bytes());
        Ok(Fs { config, queues, queue_size: share.queue_size, backend })
    }
}

impl VirtioDevice for Fs {
    fn device_type(&self) -> u16 {
        DEVICE_TYPE_FS
    }

    fn features(&self) -> u64 {
        self.backend.features()
    }

    fn queue_max_size(&self) -> u16 {
        self.queue_size
    }

    fn num_queues(&self) -> usize {
        self.queues
    }

    fn external(&self) -> bool {
        true
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        crate::devices::pci::fill(&self.config, u16::try_from(offset).unwrap_or(u16::MAX), data);
    }

    fn activate(&mut self, features: u64, queues: &[QueueHandoff<'_>]) -> Result<(), ActivateError> {
        self.backend.activate(features, queues).map_err(|e| ActivateError(Box::new(e)))
    }

    fn reset(&mut self) {
        self.backend.deactivate();
    }

    /// Never called: the backend serves the queues (`external`).
    fn process(&mut self, _queue: usize, _chain: DescriptorChain<&CheckedMemory>, _dma: &DeviceMemory) -> u32 {
        0
    }
}
