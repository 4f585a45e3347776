//! virtio-console: the guest's transmit queue (1) goes to the configured
//! output; bytes from the configured input (stdin or a pseudo-terminal) fill
//! the guest's receive buffers (queue 0).
//!
//! Input is read only when the guest has a receive buffer to put it in or
//! when the worker finds the input readable; bytes the guest has no buffer
//! for yet stay in `pending` until its next notify, so none are lost. The
//! input descriptor is polled before each read, so a read never blocks the
//! worker, and at end of input the device stops offering its descriptor to
//! the worker's poll.
// Guest-supplied numbers: no unchecked arithmetic here.
#![deny(clippy::arithmetic_side_effects)]

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd};
use std::path::PathBuf;
use std::sync::atomic::Ordering;

use crate::guest_access::CheckedMemory;
use virtio_queue::DescriptorChain;

use super::{DeviceMemory, VirtioDevice};

pub const DEVICE_TYPE: u16 = 3;
const RECEIVE_QUEUE: usize = 0;
const TRANSMIT_QUEUE: usize = 1;
/// Largest buffer one descriptor may hand the console.
const MAX_CHUNK: u32 = 64 << 10;
/// Input read from the host at once.
const INPUT_CHUNK: usize = 4096;

/// The host side of the console's input.
struct Input {
    source: File,
    /// Bytes read from `source` that no guest buffer has taken yet.
    pending: Vec<u8>,
    /// `source` reached its end (or failed): nothing more will be read.
    ended: bool,
}

impl Input {
    /// Reads what `source` has now, without blocking; false if nothing is pending after it.
    fn fill(&mut self) -> bool {
        if !self.pending.is_empty() {
            return true;
        }
        if self.ended {
            return false;
        }
        let mut fd = libc::pollfd { fd: self.source.as_raw_fd(), events: libc::POLLIN, revents: 0 };
        // SAFETY: one valid pollfd, zero timeout.
        if unsafe { libc::poll(&mut fd, 1, 0) } <= 0 {
            return false;
        }
        // Readable, hung up or failed: the read says which, and does not block.
        let mut buf = [0u8; INPUT_CHUNK];
        match self.source.read(&mut buf) {
            Ok(0) => {
                log::info!("virtio-console: end of input");
                self.ended = true;
            }
            Ok(n) => self.pending.extend_from_slice(buf.get(..n).unwrap_or_default()),
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::Interrupted) => {}
            Err(e) => {
                log::warn!("virtio-console: input ends: {e}");
                self.ended = true;
            }
        }
        !self.pending.is_empty()
    }
}

pub struct Console {
    out: Box<dyn Write + Send>,
    input: Option<Input>,
}

impl Console {
    /// A console without input: receive buffers stay with the device.
    pub fn new(out: Box<dyn Write + Send>) -> Self {
        Console { out, input: None }
    }

    /// A console whose receive queue is fed from `input` (stdin, a pty master).
    pub fn with_input(out: Box<dyn Write + Send>, input: File) -> Self {
        Console { out, input: Some(Input { source: input, pending: Vec::new(), ended: false }) }
    }

    fn transmit(&mut self, chain: DescriptorChain<&CheckedMemory>, dma: &DeviceMemory) {
        for desc in chain.readable() {
            let mut buf = vec![0u8; desc.len().min(MAX_CHUNK) as usize];
            if dma.read(desc.addr().0, &mut buf).is_err() || dma.io(|| self.out.write_all(&buf)).is_err() {
                dma.counters.errors.fetch_add(1, Ordering::Relaxed);
                break;
            }
        }
        let _ = dma.io(|| self.out.flush());
    }

    /// Copies pending input into the chain's writable buffers; returns the
    /// bytes written. A buffer the DMA guard refuses ends the request there;
    /// what was not written stays pending for the next buffer.
    fn receive(&mut self, chain: DescriptorChain<&CheckedMemory>, dma: &DeviceMemory) -> u32 {
        let Some(input) = self.input.as_mut() else { return 0 };
        let mut written = 0usize;
        for desc in chain.writable() {
            let rest = input.pending.get(written..).unwrap_or_default();
            if rest.is_empty() {
                break;
            }
            let n = rest.len().min(desc.len() as usize);
            if dma.write(desc.addr().0, rest.get(..n).unwrap_or_default()).is_err() {
                dma.counters.errors.fetch_add(1, Ordering::Relaxed);
                break;
            }
            written = written.saturating_add(n);
        }
        input.pending.drain(..written.min(input.pending.len()));
        // At most INPUT_CHUNK bytes are pending.
        u32::try_from(written).unwrap_or(u32::MAX)
    }
}

impl VirtioDevice for Console {
    fn device_type(&self) -> u16 {
        DEVICE_TYPE
    }

    fn num_queues(&self) -> usize {
        2
    }

    /// Without input, receive buffers are kept, never completed empty.
    fn handles_queue(&self, queue: usize) -> bool {
        queue == TRANSMIT_QUEUE || self.input.is_some()
    }

    /// A receive buffer is used only when input is waiting.
    fn ready(&mut self, queue: usize) -> bool {
        queue != RECEIVE_QUEUE || self.input.as_mut().is_some_and(Input::fill)
    }

    /// The input, until it ends (then the worker stops polling it).
    fn extra_fd(&self) -> Option<(libc::c_int, usize)> {
        self.input.as_ref().filter(|i| !i.ended).map(|i| (i.source.as_raw_fd(), RECEIVE_QUEUE))
    }

    fn process(&mut self, queue: usize, chain: DescriptorChain<&CheckedMemory>, dma: &DeviceMemory) -> u32 {
        dma.counters.requests.fetch_add(1, Ordering::Relaxed);
        match queue {
            TRANSMIT_QUEUE => {
                self.transmit(chain, dma);
                0
            }
            _ => self.receive(chain, dma),
        }
    }
}

/// What the VMM lends a VM's console besides its configuration.
#[derive(Clone, Copy, Default)]
pub struct ConsoleHost<'a> {
    /// The pseudo-terminal of mode `Pty` (opened once per VM configuration).
    pub pty: Option<&'a Pty>,
    /// Whether mode `Tty` reads stdin (false when the serial port already does).
    pub stdin: bool,
}

/// A pseudo-terminal for `--console pty`: the VMM keeps both ends open, so
/// the terminal lives (and buffers) whether or not anyone has it open, and a
/// user attaches to `path` (`screen`, `minicom`, ...).
pub struct Pty {
    /// Non-blocking: output is dropped rather than stall the worker when nobody reads.
    master: File,
    /// Held so the master never sees a hang-up when a user detaches.
    _peer: File,
    pub path: PathBuf,
}

impl Pty {
    /// Opens a new pseudo-terminal in raw mode (no echo, no line editing, no CR/LF translation).
    pub fn open() -> std::io::Result<Pty> {
        let flags = libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC | libc::O_NONBLOCK;
        // SAFETY: a NUL-terminated path; the result is checked.
        let fd = unsafe { libc::open(c"/dev/ptmx".as_ptr(), flags) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: `fd` was just opened and is owned by nothing else.
        let master = unsafe { File::from_raw_fd(fd) };
        let unlock: libc::c_int = 0;
        // SAFETY: TIOCSPTLCK reads one int from a valid pointer.
        if unsafe { libc::ioctl(master.as_raw_fd(), libc::TIOCSPTLCK, &unlock) } < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let mut number: libc::c_uint = 0;
        // SAFETY: TIOCGPTN writes one unsigned int to a valid pointer.
        if unsafe { libc::ioctl(master.as_raw_fd(), libc::TIOCGPTN, &mut number) } < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let path = PathBuf::from(format!("/dev/pts/{number}"));
        // The peer through the master: no second open by path.
        let peer_flags = libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC;
        // SAFETY: TIOCGPTPEER takes open flags by value and returns a new descriptor.
        let fd = unsafe { libc::ioctl(master.as_raw_fd(), libc::TIOCGPTPEER, peer_flags) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: `fd` was just returned by the kernel and is owned by nothing else.
        let peer = unsafe { File::from_raw_fd(fd) };
        make_raw(&peer)?;
        Ok(Pty { master, _peer: peer, path })
    }

    /// The console's output and input: two handles on the master.
    pub fn endpoints(&self) -> std::io::Result<(File, File)> {
        Ok((self.master.try_clone()?, self.master.try_clone()?))
    }
}

/// cfmakeraw on `tty`.
fn make_raw(tty: &File) -> std::io::Result<()> {
    // SAFETY: termios is plain data; tcgetattr fills it before it is used.
    let mut t: libc::termios = unsafe { std::mem::zeroed() };
    // SAFETY: a valid descriptor and a valid termios pointer.
    if unsafe { libc::tcgetattr(tty.as_raw_fd(), &mut t) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: cfmakeraw only changes fields of the termios it is given.
    unsafe { libc::cfmakeraw(&mut t) };
    // SAFETY: a valid descriptor and a valid termios pointer.
    if unsafe { libc::tcsetattr(tty.as_raw_fd(), libc::TCSANOW, &t) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::arithmetic_side_effects)]
mod tests {
    use std::io::Write;
    use std::os::fd::OwnedFd;
    use std::sync::Arc;

    use heki::{Permissions, ProtectRange, ViolationKind};
    use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

    use super::*;
    use crate::devices::gate::DeviceGate;
    use crate::devices::virtio::pci::VirtioPci;
    use crate::devices::virtio::test_rig::{AVAIL, DESC, USED, started};
    use crate::heki::HekiRuntime;

    const BUFFER: u64 = 0x2_0000;
    const LOCKED: u64 = 0x3_0000;

    /// A console fed from a pipe, its receive queue (4 entries) started by a
    /// minimal driver, heki on with policy deny.
    fn started_console() -> (GuestMemoryMmap, Arc<HekiRuntime>, VirtioPci, std::io::PipeWriter) {
        let (reader, writer) = std::io::pipe().expect("pipe");
        let console = Console::with_input(Box::new(std::io::sink()), File::from(OwnedFd::from(reader)));
        let (mem, heki, dev) = started(Box::new(console), "_console", RECEIVE_QUEUE as u16);
        (mem, heki, dev, writer)
    }

    /// Makes available the chain of writable buffers `bufs` (descriptors 0..) as request `n`.
    fn post(mem: &GuestMemoryMmap, n: u16, bufs: &[(u64, u32)]) {
        for (i, &(addr, len)) in bufs.iter().enumerate() {
            let desc = DESC + 16 * i as u64;
            let last = i + 1 == bufs.len();
            mem.write_obj(addr, GuestAddress(desc)).expect("desc addr");
            mem.write_obj(len, GuestAddress(desc + 8)).expect("desc len");
            mem.write_obj(if last { 2u16 } else { 3u16 }, GuestAddress(desc + 12)).expect("write-only, next");
            mem.write_obj(i as u16 + 1, GuestAddress(desc + 14)).expect("next");
        }
        mem.write_obj(0u16, GuestAddress(AVAIL + 4 + 2 * u64::from(n % 4))).expect("ring");
        mem.write_obj(n + 1, GuestAddress(AVAIL + 2)).expect("avail idx");
    }

    fn drain(dev: &VirtioPci) {
        assert!(dev.process_queue(RECEIVE_QUEUE, &DeviceGate::default()));
    }

    /// (used idx, length of used element `n`).
    fn used(mem: &GuestMemoryMmap, n: u64) -> (u16, u32) {
        let idx = mem.read_obj::<u16>(GuestAddress(USED + 2)).expect("used idx");
        (idx, mem.read_obj::<u32>(GuestAddress(USED + 4 + 8 * (n % 4) + 4)).expect("used len"))
    }

    fn bytes(mem: &GuestMemoryMmap, gpa: u64, len: usize) -> Vec<u8> {
        let mut buf = vec![0u8; len];
        mem.read_slice(&mut buf, GuestAddress(gpa)).expect("read");
        buf
    }

    #[test]
    fn a_refused_receive_buffer_ends_the_request_and_keeps_the_rest_of_the_input() {
        let (mem, heki, dev, mut input) = started_console();
        let range = ProtectRange { start: LOCKED >> 12, end: (LOCKED >> 12) + 1, perms: Permissions::READ };
        heki.protect_pages(&[range], "guest").expect("lock a page");
        input.write_all(b"hello world").expect("input");
        post(&mem, 0, &[(BUFFER, 4), (LOCKED, 16)]);
        drain(&dev);
        assert_eq!(used(&mem, 0), (1, 4), "used length: the bytes written before the refused buffer");
        assert_eq!(bytes(&mem, BUFFER, 4), b"hell");
        assert!(bytes(&mem, LOCKED, 16).iter().all(|&b| b == 0), "nothing lands in the locked page");
        assert!(heki.violations().recent().iter().any(|v| v.kind == ViolationKind::DmaWrite));
        post(&mem, 1, &[(BUFFER + 0x100, 64)]);
        drain(&dev);
        assert_eq!(used(&mem, 1), (2, 7), "the refused bytes go to the next buffer");
        assert_eq!(bytes(&mem, BUFFER + 0x100, 7), b"o world");
    }

    #[test]
    fn input_waits_for_a_buffer_and_buffers_wait_for_input() {
        let (mem, _heki, dev, mut input) = started_console();
        post(&mem, 0, &[(BUFFER, 64)]);
        drain(&dev);
        assert_eq!(used(&mem, 0).0, 0, "no input: the buffer stays with the device");
        input.write_all(b"abc").expect("input");
        drain(&dev);
        assert_eq!(used(&mem, 0), (1, 3));
        assert_eq!(bytes(&mem, BUFFER, 3), b"abc");
        input.write_all(b"later").expect("input");
        drain(&dev);
        assert_eq!(used(&mem, 0).0, 1, "no buffer: the input is kept");
        post(&mem, 1, &[(BUFFER + 0x100, 64)]);
        drain(&dev);
        assert_eq!(used(&mem, 1), (2, 5));
        assert_eq!(bytes(&mem, BUFFER + 0x100, 5), b"later");
    }

    #[test]
    fn at_end_of_input_the_device_stops_offering_its_descriptor() {
        let (mem, _heki, dev, input) = started_console();
        assert!(dev.extra_fd().is_some(), "the input is polled");
        drop(input);
        post(&mem, 0, &[(BUFFER, 64)]);
        drain(&dev);
        assert_eq!(used(&mem, 0).0, 0, "no buffer is completed empty");
        assert!(dev.extra_fd().is_none(), "a hung-up input is no longer polled");
    }

    #[test]
    fn a_pty_carries_bytes_both_ways() {
        let pty = Pty::open().expect("pty");
        let (mut out, mut input) = pty.endpoints().expect("endpoints");
        let mut user = std::fs::OpenOptions::new().read(true).write(true).open(&pty.path).expect("open the pty");
        user.write_all(b"typed").expect("type");
        std::thread::sleep(std::time::Duration::from_millis(50));
        let mut buf = [0u8; 16];
        assert_eq!(input.read(&mut buf).ok(), Some(5));
        assert_eq!(&buf[..5], b"typed", "raw mode: no echo, no line buffering");
        out.write_all(b"shown\n").expect("output");
        let n = user.read(&mut buf).expect("read the output");
        assert_eq!(&buf[..n], b"shown\n", "raw mode: no CR added");
    }
}
