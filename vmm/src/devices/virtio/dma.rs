//! The DMA guard: the one path by which device emulation writes guest
//! memory. A write into memory heki forbids is refused and reported.

use std::cell::RefCell;
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
    /// The protections this device last saw, valid while heki's generation
    /// holds: the data path takes no lock shared with other threads.
    cache: RefCell<Option<(u64, Arc<heki::MemoryProtections>)>>,
    /// Pages recently found writable in this generation (direct-mapped):
    /// devices write the same buffers and status bytes over and over.
    recent: RefCell<[u64; RECENT_PAGES]>,
}

const RECENT_PAGES: usize = 64;
const NO_PAGE: u64 = u64::MAX;

impl DmaGuard {
    pub fn new(
        mem: GuestMemoryMmap,
        heki: Option<Arc<HekiRuntime>>,
        device: String,
        counters: Arc<DeviceCounters>,
    ) -> Self {
        DmaGuard {
            mem,
            heki,
            device,
            counters,
            cache: RefCell::new(None),
            recent: RefCell::new([NO_PAGE; RECENT_PAGES]),
        }
    }

    /// Whether the device may write `[gpa, gpa + len)`; reports a violation if not.
    pub fn check_write(&self, gpa: u64, len: u64) -> Result<(), DmaError> {
        let Some(heki) = &self.heki else { return Ok(()) };
        let generation = heki.generation();
        let page = gpa >> heki::PAGE_SHIFT;
        let single_page = len > 0 && (gpa + len - 1) >> heki::PAGE_SHIFT == page;
        let writable = {
            let mut cache = self.cache.borrow_mut();
            let mut recent = self.recent.borrow_mut();
            let slot = (page as usize) % RECENT_PAGES;
            match &*cache {
                Some((g, _)) if *g == generation && single_page && recent[slot] == page => true,
                Some((g, p)) if *g == generation => p.range_writable(gpa, len),
                _ => {
                    let snapshot = heki.snapshot();
                    let writable = snapshot.range_writable(gpa, len);
                    *cache = Some((generation, snapshot));
                    *recent = [NO_PAGE; RECENT_PAGES];
                    writable
                }
            }
            .then(|| {
                // Only whole pages without byte protections can be remembered.
                if single_page && cache.as_ref().is_some_and(|(_, p)| !p.bytes.page_has_bytes(page)) {
                    recent[slot] = page;
                }
            })
            .is_some()
        };
        if writable {
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
