//! virtio-console: the guest's transmit queue goes to the configured output.
//! There is no input yet, so receive buffers stay with the device unused.
// Guest-supplied numbers: no unchecked arithmetic here.
#![deny(clippy::arithmetic_side_effects)]

use std::io::Write;
use std::sync::atomic::Ordering;

use crate::heki::CheckedMemory;
use virtio_queue::DescriptorChain;

use super::{DeviceMemory, VirtioDevice};

pub const DEVICE_TYPE: u16 = 3;
const TRANSMIT_QUEUE: usize = 1;
/// Largest buffer one descriptor may hand the console.
const MAX_CHUNK: u32 = 64 << 10;

pub struct Console {
    out: Box<dyn Write + Send>,
}

impl Console {
    pub fn new(out: Box<dyn Write + Send>) -> Self {
        Console { out }
    }
}

impl VirtioDevice for Console {
    fn device_type(&self) -> u16 {
        DEVICE_TYPE
    }

    fn num_queues(&self) -> usize {
        2
    }

    fn handles_queue(&self, queue: usize) -> bool {
        queue == TRANSMIT_QUEUE
    }

    fn process(&mut self, _queue: usize, chain: DescriptorChain<&CheckedMemory>, dma: &DeviceMemory) -> u32 {
        dma.counters.requests.fetch_add(1, Ordering::Relaxed);
        for desc in chain.readable() {
            let mut buf = vec![0u8; desc.len().min(MAX_CHUNK) as usize];
            if dma.read(desc.addr().0, &mut buf).is_err() || dma.io(|| self.out.write_all(&buf)).is_err() {
                dma.counters.errors.fetch_add(1, Ordering::Relaxed);
                break;
            }
        }
        let _ = dma.io(|| self.out.flush());
        0
    }
}
