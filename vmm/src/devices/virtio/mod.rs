//! virtio 1.x devices on the modern PCI transport. Each device's data path
//! runs on its own worker thread, woken by an ioeventfd on its notify
//! address; every guest-memory write goes through the DMA guard.

pub mod block;
pub mod console;
pub mod dma;
pub mod fs;
pub mod net;
pub mod pci;
pub mod rng;
pub mod tap;
#[cfg(test)]
mod test_rig;
pub mod vhost_user;
pub mod vsock;

use crate::guest_access::CheckedMemory;
use virtio_queue::{DescriptorChain, Queue};
use vmm_sys_util::eventfd::EventFd;

pub use dma::{DeviceCounters, DeviceMemory};

pub const VENDOR_ID: u16 = 0x1af4;
/// Modern device ids are 0x1040 + the virtio device type.
pub const DEVICE_ID_BASE: u16 = 0x1040;
pub const VIRTIO_F_VERSION_1: u64 = 1 << 32;

/// device_status bits.
pub mod status {
    pub const ACKNOWLEDGE: u8 = 1;
    pub const DRIVER: u8 = 2;
    pub const DRIVER_OK: u8 = 4;
    pub const FEATURES_OK: u8 = 8;
    pub const NEEDS_RESET: u8 = 0x40;
    pub const FAILED: u8 = 0x80;
}

/// One queue as the driver set it up, for a device whose queues another
/// process serves (vhost-user). Ring addresses are guest-physical.
pub struct QueueHandoff<'a> {
    pub index: usize,
    pub size: u16,
    pub desc_table: u64,
    pub avail_ring: u64,
    pub used_ring: u64,
    /// Signalled by KVM when the guest notifies the queue (its ioeventfd).
    pub kick: &'a EventFd,
    /// Raises the queue's MSI-X vector (its irqfd); none without a vector.
    pub call: Option<&'a EventFd>,
}

/// Serves one queue's chains on that queue's own worker thread, without the
/// device's lock: what a device gives for queues that may run in parallel
/// (each of virtio-blk's request queues).
pub trait QueueHandler: Send {
    /// Handles one request; returns the number of bytes written to the guest.
    fn process(&mut self, chain: DescriptorChain<&CheckedMemory>, dma: &DeviceMemory) -> u32;
}

/// Why a device could not take its queues at DRIVER_OK (the transport then
/// sets NEEDS_RESET).
#[derive(Debug, thiserror::Error)]
#[error("the device's backend cannot take its queues")]
pub struct ActivateError(#[source] pub Box<dyn std::error::Error + Send + Sync>);

/// What a virtio device does with one descriptor chain.
pub trait VirtioDevice: Send {
    fn device_type(&self) -> u16;
    /// Feature bits besides VIRTIO_F_VERSION_1.
    fn features(&self) -> u64 {
        0
    }
    fn queue_max_size(&self) -> u16 {
        256
    }
    fn num_queues(&self) -> usize {
        1
    }
    /// A handler serving `queue` on a worker of its own (asked once, when the
    /// transport is built); `None`: the device's shared worker serves it
    /// through `process`.
    fn queue_handler(&mut self, _queue: usize) -> Option<Box<dyn QueueHandler>> {
        None
    }
    /// Whether the worker drains this queue (a device may hold buffers, e.g. console input).
    fn handles_queue(&self, _queue: usize) -> bool {
        true
    }
    /// Whether the device can use one more chain from `queue` now (a receive
    /// queue waits for data rather than completing buffers empty).
    fn ready(&mut self, _queue: usize) -> bool {
        true
    }
    /// A host fd whose readiness means "drain this queue" (a TAP for receive).
    fn extra_fd(&self) -> Option<(libc::c_int, usize)> {
        None
    }
    /// The seccomp allow-list of the device's worker thread.
    fn thread_kind(&self) -> crate::seccomp::ThreadKind {
        crate::seccomp::ThreadKind::DeviceWorker
    }
    /// Reads the device-specific configuration space. It must not change
    /// over the device's life: the transport reads it once, at creation.
    fn read_config(&self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }
    /// Whether another process serves every queue (vhost-user): the transport
    /// then runs no worker and hands the queues over at DRIVER_OK (`activate`).
    fn external(&self) -> bool {
        false
    }
    /// DRIVER_OK with every ring valid: an `external` device hands its queues
    /// over. An error puts the device in NEEDS_RESET.
    fn activate(&mut self, _features: u64, _queues: &[QueueHandoff<'_>]) -> Result<(), ActivateError> {
        Ok(())
    }
    /// The driver reset the device after DRIVER_OK: an `external` device takes its queues back.
    fn reset(&mut self) {}
    /// Handles one request; returns the number of bytes written to the guest.
    fn process(&mut self, queue: usize, chain: DescriptorChain<&CheckedMemory>, dma: &DeviceMemory) -> u32;
}

pub type VirtioQueue = Queue;
