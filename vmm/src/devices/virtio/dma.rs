//! A device's access to guest memory: only through heki-checked memory
//! (`CheckedMemory`), which refuses, reports and, per policy, stops the VM
//! when a write would land in protected memory. There is no other path.
// Guest-supplied numbers: no unchecked arithmetic here.
#![deny(clippy::arithmetic_side_effects)]

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use vm_memory::{Bytes, GuestAddress};

use crate::guest_access::CheckedMemory;
use crate::guest_access::is_refusal;

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum DmaError {
    #[error("guest memory at {0:#x} is write-protected by heki")]
    Protected(u64),
    #[error("guest address {0:#x} is outside guest RAM")]
    OutOfRange(u64),
}

/// Per-device I/O counters for `vm.counters` and `vm.heki`.
#[derive(Default)]
pub struct DeviceCounters {
    pub requests: AtomicU64,
    pub bytes_written: AtomicU64,
    pub bytes_read: AtomicU64,
    pub errors: AtomicU64,
}

impl DeviceCounters {
    /// `refused`: accesses heki refused (kept by the device's checked memory).
    pub fn to_json(&self, refused: u64) -> serde_json::Value {
        serde_json::json!({
            "requests": self.requests.load(Ordering::Relaxed),
            "bytes_written_to_guest": self.bytes_written.load(Ordering::Relaxed),
            "bytes_read_from_guest": self.bytes_read.load(Ordering::Relaxed),
            "errors": self.errors.load(Ordering::Relaxed),
            "dma_refused": refused,
        })
    }
}

/// What a device holds of guest memory: its checked view and its counters.
pub struct DeviceMemory {
    pub mem: CheckedMemory,
    pub counters: Arc<DeviceCounters>,
}

impl DeviceMemory {
    pub fn new(mem: CheckedMemory, counters: Arc<DeviceCounters>) -> Self {
        DeviceMemory { mem, counters }
    }

    /// The device's name, as violations report it.
    pub fn device(&self) -> &str {
        &self.mem.accessor().name
    }

    /// Writes device data into guest memory, unless heki forbids it.
    pub fn write(&self, gpa: u64, data: &[u8]) -> Result<(), DmaError> {
        self.mem.write_slice(data, GuestAddress(gpa)).map_err(|e| classify(&e, gpa))?;
        self.counters.bytes_written.fetch_add(data.len() as u64, Ordering::Relaxed);
        Ok(())
    }

    /// Runs a disk or network transfer (no guest memory) outside the
    /// current batch, so a protection change does not wait for it.
    pub fn io<R>(&self, transfer: impl FnOnce() -> R) -> R {
        self.mem.outside_batch(transfer)
    }

    /// Reads guest memory for the device.
    pub fn read(&self, gpa: u64, buf: &mut [u8]) -> Result<(), DmaError> {
        self.mem.read_slice(buf, GuestAddress(gpa)).map_err(|e| classify(&e, gpa))?;
        self.counters.bytes_read.fetch_add(buf.len() as u64, Ordering::Relaxed);
        Ok(())
    }
}

fn classify(e: &vm_memory::GuestMemoryError, gpa: u64) -> DmaError {
    if is_refusal(e) { DmaError::Protected(gpa) } else { DmaError::OutOfRange(gpa) }
}
