//! The DMA guard: the one path by which device emulation writes guest
//! memory. A write into memory heki forbids is refused and reported.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::heki::HekiRuntime;
use crate::heki::violations::Violation;

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
    pub dma_refused: AtomicU64,
}

impl DeviceCounters {
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "requests": self.requests.load(Ordering::Relaxed),
            "bytes_written_to_guest": self.bytes_written.load(Ordering::Relaxed),
            "bytes_read_from_guest": self.bytes_read.load(Ordering::Relaxed),
            "errors": self.errors.load(Ordering::Relaxed),
            "dma_refused": self.dma_refused.load(Ordering::Relaxed),
        })
    }
}

pub struct DmaGuard {
    pub mem: GuestMemoryMmap,
    pub heki: Option<Arc<HekiRuntime>>,
    pub device: String,
    pub counters: Arc<DeviceCounters>,
}

impl DmaGuard {
    /// Whether the device may write `[gpa, gpa + len)`; reports a violation if not.
    pub fn check_write(&self, gpa: u64, len: u64) -> Result<(), DmaError> {
        let Some(heki) = &self.heki else { return Ok(()) };
        if heki.range_writable(gpa, len) {
            return Ok(());
        }
        self.counters.dma_refused.fetch_add(1, Ordering::Relaxed);
        let mut v = Violation::new("dma-write", "denied");
        v.gpa = Some(gpa);
        v.size = Some(len);
        v.details.insert("device", self.device.clone());
        heki.violations.record(v);
        Err(DmaError::Protected(gpa))
    }

    /// Writes device data into guest memory, unless heki forbids it.
    pub fn write(&self, gpa: u64, data: &[u8]) -> Result<(), DmaError> {
        self.check_write(gpa, data.len() as u64)?;
        self.mem.write_slice(data, GuestAddress(gpa)).map_err(|_| DmaError::OutOfRange(gpa))?;
        self.counters.bytes_written.fetch_add(data.len() as u64, Ordering::Relaxed);
        Ok(())
    }

    /// Device reads of guest memory are always allowed (protected memory included).
    pub fn read(&self, gpa: u64, buf: &mut [u8]) -> Result<(), DmaError> {
        self.mem.read_slice(buf, GuestAddress(gpa)).map_err(|_| DmaError::OutOfRange(gpa))?;
        self.counters.bytes_read.fetch_add(buf.len() as u64, Ordering::Relaxed);
        Ok(())
    }
}
