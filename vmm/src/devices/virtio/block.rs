//! virtio-block over a raw image file: read, write, flush and get-id, with
//! sector bounds checked and read-only disks refusing writes. With more than
//! one request queue (VIRTIO_BLK_F_MQ), each queue has a handler of its own
//! on its own worker thread; they share the image through positioned I/O.
// Guest-supplied numbers: no unchecked arithmetic here.
#![deny(clippy::arithmetic_side_effects)]

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use crate::guest_access::CheckedMemory;
use virtio_queue::DescriptorChain;
use virtio_queue::desc::split::Descriptor;

use super::{DeviceMemory, QueueHandler, VirtioDevice};

pub const DEVICE_TYPE: u16 = 2;
const SECTOR_SIZE: u64 = 512;
const VIRTIO_BLK_F_RO: u64 = 1 << 5;
const VIRTIO_BLK_F_FLUSH: u64 = 1 << 9;
const VIRTIO_BLK_F_MQ: u64 = 1 << 12;
/// virtio_blk_config: capacity (u64) at 0, num_queues (u16) at 34.
const CONFIG_NUM_QUEUES: usize = 34;
const CONFIG_SIZE: usize = 36;
/// Entries per queue unless the configuration says otherwise.
pub const DEFAULT_QUEUE_SIZE: u16 = 256;
const T_IN: u32 = 0;
const T_OUT: u32 = 1;
const T_FLUSH: u32 = 4;
const T_GET_ID: u32 = 8;
const S_OK: u8 = 0;
const S_IOERR: u8 = 1;
const S_UNSUPP: u8 = 2;
/// Largest data transfer one request may ask for.
const MAX_TRANSFER: u64 = 1 << 20;
const ID_BYTES: usize = 20;

/// The image and what the guest may do with it, shared by the queues.
struct Disk {
    file: File,
    capacity_sectors: u64,
    readonly: bool,
    id: String,
}

impl Disk {
    /// Called when the VM is torn down (shutdown, signal, reboot): what the
    /// guest wrote reaches the disk before the VMM goes on or exits.
    fn flush_on_teardown(&self) {
        if !self.readonly
            && let Err(e) = self.file.sync_data()
        {
            log::warn!("{}: flush at teardown failed: {e}", self.id);
        }
    }
}

impl Drop for Disk {
    fn drop(&mut self) {
        self.flush_on_teardown();
    }
}

/// Serves the requests of one queue.
pub struct BlockQueue {
    disk: Arc<Disk>,
    /// Reused transfer buffer: no allocation on the data path.
    buffer: Vec<u8>,
}

pub struct Block {
    disk: Arc<Disk>,
    num_queues: usize,
    queue_size: u16,
    /// Serves a queue without a handler of its own (none once the transport took them).
    shared: BlockQueue,
}

impl Block {
    pub fn new(file: File, readonly: bool, id: String) -> std::io::Result<Self> {
        let size = file.metadata()?.len();
        let disk = Arc::new(Disk { file, capacity_sectors: size / SECTOR_SIZE, readonly, id });
        let shared = BlockQueue { disk: disk.clone(), buffer: Vec::new() };
        Ok(Block { disk, num_queues: 1, queue_size: DEFAULT_QUEUE_SIZE, shared })
    }

    /// `num_queues` request queues of `queue_size` entries (the configuration
    /// checked both: at least one queue, a power of two up to 32768).
    pub fn with_queues(mut self, num_queues: usize, queue_size: u32) -> Self {
        self.num_queues = num_queues.max(1);
        self.queue_size = u16::try_from(queue_size).unwrap_or(DEFAULT_QUEUE_SIZE);
        self
    }
}

impl BlockQueue {
    fn execute(&mut self, kind: u32, sector: u64, data: &[Descriptor], dma: &DeviceMemory) -> (u8, u32) {
        let total = data.iter().map(|d| u64::from(d.len())).fold(0u64, u64::saturating_add);
        // The byte offset where the transfer starts, if it fits the disk.
        let start = sector
            .checked_add(total.div_ceil(SECTOR_SIZE))
            .filter(|&end| total <= MAX_TRANSFER && end <= self.disk.capacity_sectors)
            .and_then(|_| sector.checked_mul(SECTOR_SIZE));
        match (kind, start) {
            (T_IN, Some(mut offset)) if data.iter().all(|d| d.is_write_only()) => {
                let mut written = 0u32;
                for d in data {
                    // Disk I/O into the bounce buffer first; heki checks and copies after.
                    let buf = scratch(&mut self.buffer, d.len());
                    if dma.io(|| self.disk.file.read_exact_at(buf, offset)).is_err()
                        || dma.write(d.addr().0, buf).is_err()
                    {
                        return (S_IOERR, written);
                    }
                    offset = offset.saturating_add(u64::from(d.len()));
                    written = written.saturating_add(d.len());
                }
                (S_OK, written)
            }
            (T_OUT, Some(mut offset)) if !self.disk.readonly && data.iter().all(|d| !d.is_write_only()) => {
                for d in data {
                    let buf = scratch(&mut self.buffer, d.len());
                    if dma.read(d.addr().0, buf).is_err()
                        || dma.io(|| self.disk.file.write_all_at(buf, offset)).is_err()
                    {
                        return (S_IOERR, 0);
                    }
                    offset = offset.saturating_add(u64::from(d.len()));
                }
                (S_OK, 0)
            }
            (T_IN | T_OUT, _) => (S_IOERR, 0),
            (T_FLUSH, _) => (if dma.io(|| self.disk.file.sync_data()).is_ok() { S_OK } else { S_IOERR }, 0),
            (T_GET_ID, _) => {
                let mut id = [0u8; ID_BYTES];
                let n = self.disk.id.len().min(ID_BYTES);
                id[..n].copy_from_slice(&self.disk.id.as_bytes()[..n]);
                match data.first() {
                    Some(d) if d.is_write_only() && d.len() as usize >= ID_BYTES => {
                        if dma.write(d.addr().0, &id).is_ok() { (S_OK, ID_BYTES as u32) } else { (S_IOERR, 0) }
                    }
                    _ => (S_IOERR, 0),
                }
            }
            _ => (S_UNSUPP, 0),
        }
    }
}

/// The first `len` bytes of the reusable buffer (length bounded by MAX_TRANSFER).
fn scratch(buffer: &mut Vec<u8>, len: u32) -> &mut [u8] {
    let len = len as usize;
    if buffer.len() < len {
        buffer.resize(len, 0);
    }
    &mut buffer[..len]
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u16 {
        DEVICE_TYPE
    }

    fn features(&self) -> u64 {
        let readonly = if self.disk.readonly { VIRTIO_BLK_F_RO } else { 0 };
        let mq = if self.num_queues > 1 { VIRTIO_BLK_F_MQ } else { 0 };
        VIRTIO_BLK_F_FLUSH | readonly | mq
    }

    fn num_queues(&self) -> usize {
        self.num_queues
    }

    fn queue_max_size(&self) -> u16 {
        self.queue_size
    }

    /// Every queue gets its own handler, so each runs on its own worker.
    fn queue_handler(&mut self, _queue: usize) -> Option<Box<dyn QueueHandler>> {
        Some(Box::new(BlockQueue { disk: self.disk.clone(), buffer: Vec::new() }))
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        // capacity in 512-byte sectors, then (with MQ) the number of queues.
        let mut config = [0u8; CONFIG_SIZE];
        config[..8].copy_from_slice(&self.disk.capacity_sectors.to_le_bytes());
        let queues = u16::try_from(self.num_queues).unwrap_or(u16::MAX);
        config[CONFIG_NUM_QUEUES..].copy_from_slice(&queues.to_le_bytes());
        for (i, b) in data.iter_mut().enumerate() {
            *b = config.get((offset as usize).saturating_add(i)).copied().unwrap_or(0);
        }
    }

    fn process(&mut self, _queue: usize, chain: DescriptorChain<&CheckedMemory>, dma: &DeviceMemory) -> u32 {
        self.shared.process(chain, dma)
    }
}

impl QueueHandler for BlockQueue {
    fn process(&mut self, chain: DescriptorChain<&CheckedMemory>, dma: &DeviceMemory) -> u32 {
        dma.counters.requests.fetch_add(1, Ordering::Relaxed);
        let descriptors: Vec<Descriptor> = chain.collect();
        // header (readable) + data... + status (one writable byte).
        let (Some(header), Some(status)) = (descriptors.first(), descriptors.last()) else { return 0 };
        if descriptors.len() < 2 || header.is_write_only() || header.len() < 16 || !status.is_write_only() {
            dma.counters.errors.fetch_add(1, Ordering::Relaxed);
            return 0;
        }
        let mut raw = [0u8; 16];
        if dma.read(header.addr().0, &mut raw).is_err() {
            return 0;
        }
        let kind = u32::from_le_bytes([raw[0], raw[1], raw[2], raw[3]]);
        let sector = u64::from_le_bytes([raw[8], raw[9], raw[10], raw[11], raw[12], raw[13], raw[14], raw[15]]);
        let data = descriptors.get(1..descriptors.len().saturating_sub(1)).unwrap_or(&[]);
        let (state, written) = self.execute(kind, sector, data, dma);
        if state != S_OK {
            dma.counters.errors.fetch_add(1, Ordering::Relaxed);
        }
        match dma.write(status.addr().0, &[state]) {
            Ok(()) => written.saturating_add(1),
            Err(_) => written,
        }
    }
}
