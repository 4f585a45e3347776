//! The MMIO bus: guest-physical ranges outside RAM mapped to devices.

use std::sync::{Arc, Mutex};

/// A device behind an MMIO range. `offset` is relative to its base.
pub trait MmioDevice: Send {
    fn read(&mut self, offset: u64, data: &mut [u8]);
    fn write(&mut self, offset: u64, data: &[u8]);
}

struct Entry {
    base: u64,
    len: u64,
    device: Arc<Mutex<dyn MmioDevice>>,
}

#[derive(Default)]
pub struct MmioBus {
    entries: Vec<Entry>,
}

impl MmioBus {
    pub fn insert(&mut self, base: u64, len: u64, device: Arc<Mutex<dyn MmioDevice>>) {
        self.entries.push(Entry { base, len, device });
        self.entries.sort_by_key(|e| e.base);
    }

    fn find(&self, addr: u64) -> Option<(&Entry, u64)> {
        let idx = self.entries.partition_point(|e| e.base <= addr).checked_sub(1)?;
        let e = &self.entries[idx];
        let off = addr - e.base;
        (off < e.len).then_some((e, off))
    }

    /// Reads a claimed address; `false` if no device is there.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.find(addr) {
            Some((e, off)) => {
                e.device.lock().unwrap_or_else(|p| p.into_inner()).read(off, data);
                true
            }
            None => false,
        }
    }

    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.find(addr) {
            Some((e, off)) => {
                e.device.lock().unwrap_or_else(|p| p.into_inner()).write(off, data);
                true
            }
            None => false,
        }
    }
}
