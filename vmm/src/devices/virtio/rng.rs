//! virtio-rng: fills the guest's buffers from a host entropy source.
// Guest-supplied numbers: no unchecked arithmetic here.
#![deny(clippy::arithmetic_side_effects)]

use std::fs::File;
use std::io::Read;
use std::sync::atomic::Ordering;

use crate::guest_access::CheckedMemory;
use virtio_queue::DescriptorChain;

use super::{DeviceMemory, VirtioDevice};

pub const DEVICE_TYPE: u16 = 4;
/// The most bytes one request gets (bounds host work per guest request).
const MAX_REQUEST: u32 = 64 << 10;

pub struct Rng {
    source: File,
}

impl Rng {
    pub fn new(source: File) -> Self {
        Rng { source }
    }
}

impl VirtioDevice for Rng {
    fn device_type(&self) -> u16 {
        DEVICE_TYPE
    }

    fn process(&mut self, _queue: usize, chain: DescriptorChain<&CheckedMemory>, dma: &DeviceMemory) -> u32 {
        dma.counters.requests.fetch_add(1, Ordering::Relaxed);
        let mut written = 0u32;
        for desc in chain.writable() {
            let len = desc.len().min(MAX_REQUEST.saturating_sub(written));
            let mut buf = vec![0u8; len as usize];
            if dma.io(|| self.source.read_exact(&mut buf)).is_err() {
                dma.counters.errors.fetch_add(1, Ordering::Relaxed);
                break;
            }
            // A refused buffer ends the request: the used length counts the
            // buffers filled before it (a prefix, as virtio requires), so the
            // driver never takes bytes it did not get, nor loses the ones it did.
            if dma.write(desc.addr().0, &buf).is_err() {
                dma.counters.errors.fetch_add(1, Ordering::Relaxed);
                break;
            }
            written = written.saturating_add(len);
            if written >= MAX_REQUEST {
                break;
            }
        }
        written
    }
}
