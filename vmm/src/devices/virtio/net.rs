//! virtio-net over a TAP device: transmit queue → TAP, TAP → receive queue.
// Guest-supplied numbers: no unchecked arithmetic here.
#![deny(clippy::arithmetic_side_effects)]

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::guest_access::CheckedMemory;
use virtio_queue::DescriptorChain;

use super::tap::Tap;
use super::{DeviceMemory, VirtioDevice};

pub const DEVICE_TYPE: u16 = 1;
const VIRTIO_NET_F_MAC: u64 = 1 << 5;
const RX_QUEUE: usize = 0;
const TX_QUEUE: usize = 1;
/// virtio_net_hdr_v1: flags, gso_type, hdr_len, gso_size, csum_start, csum_offset, num_buffers.
const HEADER_LEN: usize = 12;
const MAX_FRAME: usize = 65_562;
/// A frame with its virtio-net header.
const FRAME_BUFFER: usize = HEADER_LEN + MAX_FRAME;

/// Packets dropped on receive (no room, or the DMA guard refused the buffer).
#[derive(Default)]
pub struct NetCounters {
    pub rx_packets: AtomicU64,
    pub tx_packets: AtomicU64,
    pub rx_dropped: AtomicU64,
}

pub struct Net {
    tap: Tap,
    mac: [u8; 6],
    frame: Vec<u8>,
    pub counters: Arc<NetCounters>,
}

impl Net {
    pub fn new(tap: Tap, mac: [u8; 6]) -> Self {
        Net { tap, mac, frame: vec![0; FRAME_BUFFER], counters: Arc::default() }
    }

    fn transmit(&mut self, chain: DescriptorChain<&CheckedMemory>, dma: &DeviceMemory) {
        let mut packet = Vec::new();
        for desc in chain.readable() {
            let start = packet.len();
            let Some(end) = start.checked_add(desc.len() as usize).filter(|&end| end <= FRAME_BUFFER) else { return };
            packet.resize(end, 0);
            if dma.read(desc.addr().0, &mut packet[start..]).is_err() {
                return;
            }
        }
        if packet.len() > HEADER_LEN && dma.io(|| self.tap.write_frame(&packet[HEADER_LEN..])).is_ok() {
            self.counters.tx_packets.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn receive(&mut self, chain: DescriptorChain<&CheckedMemory>, dma: &DeviceMemory) -> u32 {
        let len = match dma.io(|| self.tap.read_frame(&mut self.frame[HEADER_LEN..])) {
            Ok(n) => n,
            Err(_) => return 0,
        };
        self.frame[..HEADER_LEN].fill(0);
        self.frame[10] = 1; // num_buffers
        let mut packet = self.frame.get(..HEADER_LEN.saturating_add(len)).unwrap_or(&[]);
        let mut written = 0u32;
        for desc in chain.writable() {
            if packet.is_empty() {
                break;
            }
            let n = packet.len().min(desc.len() as usize);
            if dma.write(desc.addr().0, &packet[..n]).is_err() {
                self.counters.rx_dropped.fetch_add(1, Ordering::Relaxed);
                return 0;
            }
            packet = &packet[n..];
            written = written.saturating_add(u32::try_from(n).unwrap_or(u32::MAX));
        }
        if !packet.is_empty() {
            // The guest's buffer was too small: the frame is cut, and counted.
            self.counters.rx_dropped.fetch_add(1, Ordering::Relaxed);
            return 0;
        }
        self.counters.rx_packets.fetch_add(1, Ordering::Relaxed);
        written
    }
}

impl VirtioDevice for Net {
    fn device_type(&self) -> u16 {
        DEVICE_TYPE
    }

    fn features(&self) -> u64 {
        VIRTIO_NET_F_MAC
    }

    fn num_queues(&self) -> usize {
        2
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        for (i, b) in data.iter_mut().enumerate() {
            *b = self.mac.get((offset as usize).saturating_add(i)).copied().unwrap_or(0);
        }
    }

    /// Receive buffers are only consumed when a frame is waiting.
    fn ready(&mut self, queue: usize) -> bool {
        queue != RX_QUEUE || self.tap.readable()
    }

    fn extra_fd(&self) -> Option<(libc::c_int, usize)> {
        Some((self.tap.raw_fd(), RX_QUEUE))
    }

    fn process(&mut self, queue: usize, chain: DescriptorChain<&CheckedMemory>, dma: &DeviceMemory) -> u32 {
        dma.counters.requests.fetch_add(1, Ordering::Relaxed);
        match queue {
            TX_QUEUE => {
                self.transmit(chain, dma);
                0
            }
            _ => self.receive(chain, dma),
        }
    }
}
