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

mod connection;
pub mod muxer;
pub mod packet;

use std::path::Path;
use std::sync::atomic::Ordering;

use virtio_queue::DescriptorChain;

use super::{DeviceMemory, VirtioDevice};
use crate::guest_access::CheckedMemory;
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
#[allow(clippy::arithmetic_side_effects)]
mod tests {
    use std::sync::Arc;

    use heki::{Permissions, PlannedSlot, Policy, ProtectRange, ViolationKind};
    use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

    use super::*;
    use crate::devices::gate::DeviceGate;
    use crate::devices::mmio_bus::MmioDevice;
    use crate::devices::virtio::pci::VirtioPci;
    use crate::guest_access::Accessor;
    use crate::heki::HekiSettings;
    use crate::heki::{Enforcer, HekiRuntime};
    use crate::testing::{RecordingControl, RecordingSlots};
    use packet::{HOST_CID, TYPE_STREAM, op};

    /// Queue q's rings: descriptors, available and used ring, a page each.
    fn rings(q: u64) -> (u64, u64, u64) {
        let base = 0x1_0000 + q * 0x3000;
        (base, base + 0x1000, base + 0x2000)
    }
    const TX_BUFFER: u64 = 0x2_0000;
    const RX_BUFFER: u64 = 0x3_0000;
    const RX_BUFFER_2: u64 = 0x3_2000;

    /// A vsock device under heki (deny), started by a minimal driver: three queues of 4.
    fn started_vsock(socket: &Path) -> (GuestMemoryMmap, Arc<HekiRuntime>, VirtioPci) {
        let ram =
            crate::memory::create_guest_ram(&[crate::memory::RamRegion { start: 0, size: 1 << 20 }]).expect("memory");
        let mem = ram.host.clone();
        let enforcer = Arc::new(Enforcer::new(Policy::Deny, Arc::new(RecordingControl::default())));
        let config = HekiSettings::default();
        let boot = [(PlannedSlot { gpa: 0, size: 1 << 20, readonly: false }, 0)];
        let heki =
            Arc::new(HekiRuntime::new(&config, enforcer.clone(), Arc::new(RecordingSlots::default()), &ram, &boot, 1));
        let memory = DeviceMemory::new(
            CheckedMemory::new(mem.clone(), enforcer, Arc::new(Accessor::new("_vsock"))),
            Arc::default(),
        );
        let device = Vsock::new(3, socket).expect("vsock");
        let mut dev = VirtioPci::new(Box::new(device), 0, memory, 0, None).expect("transport");
        let w32 = |dev: &mut VirtioPci, off: u64, v: u32| dev.write(off, &v.to_le_bytes());
        dev.write(0x14, &[3]);
        w32(&mut dev, 0x08, 1);
        w32(&mut dev, 0x0c, 1);
        dev.write(0x14, &[11]);
        for q in 0..3u16 {
            dev.write(0x16, &q.to_le_bytes());
            dev.write(0x18, &4u16.to_le_bytes());
            let (desc, avail, used) = rings(u64::from(q));
            for (off, addr) in [(0x20, desc), (0x28, avail), (0x30, used)] {
                w32(&mut dev, off, addr as u32);
            }
            dev.write(0x1c, &1u16.to_le_bytes());
        }
        dev.write(0x14, &[15]);
        (mem, heki, dev)
    }

    /// Offers one buffer (descriptor `n`) on queue `q` and lets the worker drain it.
    fn offer(mem: &GuestMemoryMmap, dev: &VirtioPci, q: usize, n: u16, addr: u64, len: u32, writable: bool) {
        let (desc, avail, _) = rings(q as u64);
        let at = desc + 16 * u64::from(n);
        mem.write_obj(addr, GuestAddress(at)).expect("desc addr");
        mem.write_obj(len, GuestAddress(at + 8)).expect("desc len");
        mem.write_obj(if writable { 2u16 } else { 0 }, GuestAddress(at + 12)).expect("desc flags");
        mem.write_obj(n, GuestAddress(avail + 4 + 2 * u64::from(n))).expect("ring");
        mem.write_obj(n + 1, GuestAddress(avail + 2)).expect("avail idx");
        let gate = DeviceGate::default();
        assert!(dev.process_queue(q, &gate));
    }

    /// Queue q's used entry `n`: (used index, length).
    fn used(mem: &GuestMemoryMmap, q: usize, n: u64) -> (u16, u32) {
        let (_, _, used) = rings(q as u64);
        let idx = mem.read_obj::<u16>(GuestAddress(used + 2)).expect("used idx");
        (idx, mem.read_obj::<u32>(GuestAddress(used + 4 + 8 * n + 4)).expect("used len"))
    }

    fn request_to(port: u32) -> Header {
        Header {
            src_cid: 3,
            dst_cid: HOST_CID,
            src_port: 5000,
            dst_port: port,
            type_: TYPE_STREAM,
            op: op::REQUEST,
            buf_alloc: 65536,
            ..Header::default()
        }
    }

    fn socket_path(test: &str) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("hk-vsock-dev-{test}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        dir.join("v.sock")
    }

    #[test]
    fn a_guest_connection_reaches_the_host_listener_through_guest_memory() {
        let socket = socket_path("connect");
        let listener = std::os::unix::net::UnixListener::bind(format!("{}_1234", socket.display())).expect("listener");
        let (mem, _heki, mut dev) = started_vsock(&socket);
        let mut config = [0u8; 8];
        dev.read(0x3000, &mut config);
        assert_eq!(u64::from_le_bytes(config), 3, "guest_cid");
        mem.write_slice(&request_to(1234).to_bytes(), GuestAddress(TX_BUFFER)).expect("packet");
        offer(&mem, &dev, TX_QUEUE, 0, TX_BUFFER, HEADER_LEN as u32, false);
        assert_eq!(used(&mem, TX_QUEUE, 0), (1, 0));
        listener.accept().expect("the VMM connected to <socket>_1234");
        offer(&mem, &dev, RX_QUEUE, 0, RX_BUFFER, 4096, true);
        assert_eq!(used(&mem, RX_QUEUE, 0), (1, HEADER_LEN as u32));
        let mut raw = [0u8; HEADER_LEN];
        mem.read_slice(&mut raw, GuestAddress(RX_BUFFER)).expect("answer");
        let answer = Header::parse(&raw).expect("header");
        assert_eq!((answer.op, answer.src_port, answer.dst_port, answer.dst_cid), (op::RESPONSE, 1234, 5000, 3));
    }

    #[test]
    fn a_receive_buffer_heki_locked_is_refused_and_the_packet_waits_for_the_next() {
        let socket = socket_path("locked");
        let (mem, heki, dev) = started_vsock(&socket);
        // Nobody listens on port 77: the answer is an RST.
        mem.write_slice(&request_to(77).to_bytes(), GuestAddress(TX_BUFFER)).expect("packet");
        offer(&mem, &dev, TX_QUEUE, 0, TX_BUFFER, HEADER_LEN as u32, false);
        let range = ProtectRange { start: RX_BUFFER >> 12, end: (RX_BUFFER >> 12) + 1, perms: Permissions::READ };
        heki.protect_pages(&[range], "guest").expect("lock the buffer");
        let before = {
            let mut page = vec![0u8; 4096];
            mem.read_slice(&mut page, GuestAddress(RX_BUFFER)).expect("page");
            page
        };
        offer(&mem, &dev, RX_QUEUE, 0, RX_BUFFER, 4096, true);
        assert_eq!(used(&mem, RX_QUEUE, 0), (1, 0), "completed empty");
        let mut after = vec![0u8; 4096];
        mem.read_slice(&mut after, GuestAddress(RX_BUFFER)).expect("page");
        assert_eq!(after, before, "not one byte of the locked page changed");
        assert!(heki.violations().recent().iter().any(|v| v.kind == ViolationKind::DmaWrite));
        offer(&mem, &dev, RX_QUEUE, 1, RX_BUFFER_2, 4096, true);
        assert_eq!(used(&mem, RX_QUEUE, 1), (2, HEADER_LEN as u32));
        let mut raw = [0u8; HEADER_LEN];
        mem.read_slice(&mut raw, GuestAddress(RX_BUFFER_2)).expect("answer");
        assert_eq!(Header::parse(&raw).map(|h| (h.op, h.src_port, h.dst_port)), Some((op::RST, 77, 5000)));
    }

    #[test]
    fn pieces_split_a_range_across_descriptors() {
        let descs = [(0x1000, 10), (0x2000, 4), (0x3000, 100)];
        assert_eq!(pieces(&descs, 8, 10), Ok(vec![(0x1008, 0, 2), (0x2000, 2, 4), (0x3000, 6, 4)]));
        assert_eq!(pieces(&descs, 0, 0), Ok(vec![]));
        assert_eq!(pieces(&descs, 100, 15), Err(()), "beyond the buffer");
        assert_eq!(pieces(&[(u64::MAX, 10)], 5, 1), Err(()), "address overflow");
    }
}
