//! virtio-vsock with a hybrid (Unix socket) host end, as Firecracker and
//! Cloud Hypervisor offer it: the guest's stream sockets to CID 2 become
//! Unix stream connections on the host (`muxer.rs`). Queues: receive (0),
//! transmit (1) and event (2, never used: its buffers are kept).
//!
//! Packets are copied between guest memory and the host through the
//! device's checked view only; the worker reaches the host streams through
//! one epoll descriptor, readable when the receive queue has work.
// Guest-supplied numbers: no unchecked arithmetic here.
#![deny(clippy::arithmetic_side_effects)]

pub mod muxer;
pub mod packet;

use std::path::Path;
use std::sync::atomic::Ordering;

use virtio_queue::DescriptorChain;

use super::{DeviceMemory, VirtioDevice};
use crate::heki::CheckedMemory;
use muxer::{MAX_PAYLOAD, Muxer};
use packet::{HEADER_LEN, Header};

pub use muxer::VsockError;

/// virtio device type 19.
pub const DEVICE_TYPE: u16 = 19;
const RX_QUEUE: usize = 0;
const TX_QUEUE: usize = 1;
const EVENT_QUEUE: usize = 2;

pub struct Vsock {
    cid: u64,
    muxer: Muxer,
}

impl Vsock {
    /// The device for guest CID `cid`, listening on `socket`.
    pub fn new(cid: u64, socket: &Path) -> Result<Self, VsockError> {
        Ok(Vsock { cid, muxer: Muxer::new(cid, socket)? })
    }

    fn transmit(&mut self, chain: DescriptorChain<&CheckedMemory>, dma: &DeviceMemory) {
        let descs: Vec<(u64, u32)> = chain.readable().map(|d| (d.addr().0, d.len())).collect();
        let mut raw = [0u8; HEADER_LEN];
        if gather(&descs, dma, 0, &mut raw).is_err() {
            dma.counters.errors.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let Some(header) = Header::parse(&raw) else { return };
        let len = if header.len <= MAX_PAYLOAD { header.len as usize } else { 0 };
        let mut payload = vec![0u8; len];
        if gather(&descs, dma, HEADER_LEN, &mut payload).is_err() {
            dma.counters.errors.fetch_add(1, Ordering::Relaxed);
            // Cut to what the header promised: the muxer resets the connection.
            payload.clear();
        }
        dma.io(|| self.muxer.handle_tx(&header, &payload));
    }

    fn receive(&mut self, chain: DescriptorChain<&CheckedMemory>, dma: &DeviceMemory) -> u32 {
        let descs: Vec<(u64, u32)> = chain.writable().map(|d| (d.addr().0, d.len())).collect();
        let room = descs.iter().fold(0usize, |sum, &(_, len)| sum.saturating_add(len as usize));
        let Some((header, data)) = self.muxer.take_packet(room) else { return 0 };
        if scatter(&descs, dma, 0, &header.to_bytes()).is_err() || scatter(&descs, dma, HEADER_LEN, &data).is_err() {
            // Heki refused the buffer: the packet waits for the next one.
            dma.counters.errors.fetch_add(1, Ordering::Relaxed);
            self.muxer.put_back(&header, data);
            return 0;
        }
        u32::try_from(HEADER_LEN.saturating_add(data.len())).unwrap_or(0)
    }
}

/// The descriptors' pieces that cover bytes `start..start + len` of the buffer they form.
fn pieces(descs: &[(u64, u32)], start: usize, len: usize) -> Result<Vec<(u64, usize, usize)>, ()> {
    let mut out = Vec::new();
    let (mut skip, mut left, mut done) = (start, len, 0usize);
    for &(addr, size) in descs {
        if left == 0 {
            break;
        }
        let size = size as usize;
        if skip >= size {
            skip = skip.saturating_sub(size);
            continue;
        }
        let n = size.saturating_sub(skip).min(left);
        out.push((addr.checked_add(skip as u64).ok_or(())?, done, n));
        done = done.saturating_add(n);
        left = left.saturating_sub(n);
        skip = 0;
    }
    if left == 0 { Ok(out) } else { Err(()) }
}

/// Reads `out.len()` bytes from offset `start` of a chain's readable buffer.
fn gather(descs: &[(u64, u32)], dma: &DeviceMemory, start: usize, out: &mut [u8]) -> Result<(), ()> {
    for (gpa, at, n) in pieces(descs, start, out.len())? {
        let dst = out.get_mut(at..at.saturating_add(n)).ok_or(())?;
        dma.read(gpa, dst).map_err(|_| ())?;
    }
    Ok(())
}

/// Writes `data` at offset `start` of a chain's writable buffer.
fn scatter(descs: &[(u64, u32)], dma: &DeviceMemory, start: usize, data: &[u8]) -> Result<(), ()> {
    for (gpa, at, n) in pieces(descs, start, data.len())? {
        let src = data.get(at..at.saturating_add(n)).ok_or(())?;
        dma.write(gpa, src).map_err(|_| ())?;
    }
    Ok(())
}

impl VirtioDevice for Vsock {
    fn device_type(&self) -> u16 {
        DEVICE_TYPE
    }

    fn num_queues(&self) -> usize {
        3
    }

    /// The event queue's buffers are kept: no transport event is ever sent.
    fn handles_queue(&self, queue: usize) -> bool {
        queue != EVENT_QUEUE
    }

    /// Receive buffers are used only for a packet that is ready.
    fn ready(&mut self, queue: usize) -> bool {
        queue != RX_QUEUE || self.muxer.has_packet()
    }

    fn extra_fd(&self) -> Option<(libc::c_int, usize)> {
        Some((self.muxer.epoll_fd(), RX_QUEUE))
    }

    fn thread_kind(&self) -> crate::seccomp::ThreadKind {
        crate::seccomp::ThreadKind::VsockWorker
    }

    /// `guest_cid` (le64).
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let cid = self.cid.to_le_bytes();
        for (i, b) in data.iter_mut().enumerate() {
            let at = usize::try_from(offset).unwrap_or(usize::MAX).saturating_add(i);
            *b = cid.get(at).copied().unwrap_or(0);
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pieces_split_a_range_across_descriptors() {
        let descs = [(0x1000, 10), (0x2000, 4), (0x3000, 100)];
        assert_eq!(pieces(&descs, 8, 10), Ok(vec![(0x1008, 0, 2), (0x2000, 2, 4), (0x3000, 6, 4)]));
        assert_eq!(pieces(&descs, 0, 0), Ok(vec![]));
        assert_eq!(pieces(&descs, 100, 15), Err(()), "beyond the buffer");
        assert_eq!(pieces(&[(u64::MAX, 10)], 5, 1), Err(()), "address overflow");
    }
}
