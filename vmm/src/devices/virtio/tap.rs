//! A TAP interface on the host: the other end of virtio-net.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;

use crate::host_ioctls::{TUNGETIFF, TUNSETIFF};

const IFF_TAP: libc::c_short = 0x0002;
const IFF_NO_PI: libc::c_short = 0x1000;
/// Frames carry a `virtio_net_hdr` (10 bytes unless `TUNSETVNETHDRSZ` says
/// otherwise). Kata opens its TAPs so.
const IFF_VNET_HDR: libc::c_short = 0x4000;
const VNET_HDR_LEN: usize = 10;

/// `struct ifreq` with the fields we use.
#[repr(C)]
struct IfReq {
    name: [u8; libc::IFNAMSIZ],
    data: [u8; 24],
}

impl IfReq {
    fn new(name: &str) -> std::io::Result<Self> {
        if name.is_empty() || name.len() >= libc::IFNAMSIZ {
            return Err(std::io::Error::other(format!("interface name '{name}' must be 1..15 bytes")));
        }
        let mut req = IfReq { name: [0; libc::IFNAMSIZ], data: [0; 24] };
        req.name[..name.len()].copy_from_slice(name.as_bytes());
        Ok(req)
    }
}

pub struct Tap {
    file: File,
    pub name: String,
    /// The TAP's own header before each frame (`IFF_VNET_HDR`), 0 without.
    /// No offload is ever enabled on it, so the header the TAP gives is
    /// all zeros and the one written is too; frames pass as plain Ethernet.
    vnet_header: usize,
    /// Header and frame, for a TAP with a header.
    scratch: Vec<u8>,
}

fn ioctl(fd: libc::c_int, request: libc::c_ulong, req: &mut IfReq) -> std::io::Result<()> {
    // SAFETY: `req` is a valid, writable ifreq-sized buffer for the duration of the call.
    let ret = unsafe { libc::ioctl(fd, request, req as *mut IfReq) };
    if ret < 0 { Err(std::io::Error::last_os_error()) } else { Ok(()) }
}

/// Duplicates an inherited descriptor (`--net fd=N`), refusing numbers that are not open.
pub fn duplicate(fd: libc::c_int) -> std::io::Result<OwnedFd> {
    // SAFETY: F_GETFD only queries the descriptor table.
    if unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `fd` is open (checked above) and stays open for the call: the
    // VMM never closes inherited descriptors.
    unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) }.try_clone_to_owned()
}

fn set_nonblocking(file: &File) -> std::io::Result<()> {
    // SAFETY: F_GETFL/F_SETFL only read and set the descriptor's status flags.
    let rc = unsafe {
        let flags = libc::fcntl(file.as_raw_fd(), libc::F_GETFL);
        if flags < 0 { flags } else { libc::fcntl(file.as_raw_fd(), libc::F_SETFL, flags | libc::O_NONBLOCK) }
    };
    if rc < 0 { Err(std::io::Error::last_os_error()) } else { Ok(()) }
}

fn sockaddr_in(addr: Ipv4Addr) -> [u8; 24] {
    let mut data = [0u8; 24];
    data[0..2].copy_from_slice(&(libc::AF_INET as u16).to_ne_bytes());
    data[4..8].copy_from_slice(&addr.octets());
    data
}

impl Tap {
    /// Opens (creating if needed) the TAP interface `name`, non-blocking.
    pub fn open(name: &str) -> std::io::Result<Tap> {
        let file = OpenOptions::new().read(true).write(true).custom_flags(libc::O_NONBLOCK).open("/dev/net/tun")?;
        let mut req = IfReq::new(name)?;
        req.data[..2].copy_from_slice(&(IFF_TAP | IFF_NO_PI).to_ne_bytes());
        ioctl(file.as_raw_fd(), TUNSETIFF, &mut req)?;
        // The kernel fills in the final name (patterns such as "hktap%d").
        let len = req.name.iter().position(|b| *b == 0).unwrap_or(req.name.len());
        Ok(Tap::plain(file, String::from_utf8_lossy(&req.name[..len]).into_owned()))
    }

    fn plain(file: File, name: String) -> Tap {
        Tap { file, name, vnet_header: 0, scratch: Vec::new() }
    }

    /// Adopts a TAP that was opened beforehand and passed in (`--net fd=N`),
    /// so the VMM needs no `CAP_NET_ADMIN`. The descriptor must be a TAP
    /// opened with `IFF_TAP | IFF_NO_PI`, with or without `IFF_VNET_HDR`
    /// (Kata's); it is made non-blocking.
    pub fn from_fd(fd: OwnedFd) -> std::io::Result<Tap> {
        let file = File::from(fd);
        let mut req = IfReq { name: [0; libc::IFNAMSIZ], data: [0; 24] };
        ioctl(file.as_raw_fd(), TUNGETIFF, &mut req).map_err(|e| {
            std::io::Error::new(std::io::ErrorKind::InvalidInput, format!("not a TAP device (TUNGETIFF: {e})"))
        })?;
        let flags = i16::from_ne_bytes([req.data[0], req.data[1]]);
        if flags & IFF_TAP == 0 || flags & IFF_NO_PI == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "the TAP must be opened with IFF_TAP | IFF_NO_PI",
            ));
        }
        set_nonblocking(&file)?;
        let len = req.name.iter().position(|b| *b == 0).unwrap_or(req.name.len());
        let mut tap = Tap::plain(file, String::from_utf8_lossy(&req.name[..len]).into_owned());
        if flags & IFF_VNET_HDR != 0 {
            tap.vnet_header = VNET_HDR_LEN;
        }
        Ok(tap)
    }

    /// A stand-in moving frames over any datagram descriptor (one end of a
    /// `socketpair`): for fuzzing and tests of virtio-net without a TAP.
    pub fn from_datagram_socket(fd: OwnedFd, name: &str) -> std::io::Result<Tap> {
        let file = File::from(fd);
        set_nonblocking(&file)?;
        Ok(Tap::plain(file, name.to_string()))
    }

    /// Gives the host side an address and brings the link up.
    pub fn configure(&self, ip: Ipv4Addr, mask: Ipv4Addr) -> std::io::Result<()> {
        // SAFETY: socket() has no memory-safety preconditions; the fd is owned below.
        let raw = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM, 0) };
        if raw < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: `raw` is a fresh socket we own.
        let sock = unsafe { OwnedFd::from_raw_fd(raw) };
        let mut req = IfReq::new(&self.name)?;
        req.data = sockaddr_in(ip);
        ioctl(sock.as_raw_fd(), libc::SIOCSIFADDR, &mut req)?;
        req.data = sockaddr_in(mask);
        ioctl(sock.as_raw_fd(), libc::SIOCSIFNETMASK, &mut req)?;
        req.data = [0; 24];
        ioctl(sock.as_raw_fd(), libc::SIOCGIFFLAGS, &mut req)?;
        let flags = i16::from_ne_bytes([req.data[0], req.data[1]]) | (libc::IFF_UP | libc::IFF_RUNNING) as i16;
        req.data[..2].copy_from_slice(&flags.to_ne_bytes());
        ioctl(sock.as_raw_fd(), libc::SIOCSIFFLAGS, &mut req)
    }

    /// The TAP's descriptor, to hand over (`vm.add-net` sends it as SCM_RIGHTS).
    pub fn as_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        std::os::fd::AsFd::as_fd(&self.file)
    }

    pub fn raw_fd(&self) -> libc::c_int {
        self.file.as_raw_fd()
    }

    /// Whether a frame is waiting.
    pub fn readable(&self) -> bool {
        let mut fd = libc::pollfd { fd: self.file.as_raw_fd(), events: libc::POLLIN, revents: 0 };
        // SAFETY: one valid pollfd, zero timeout.
        unsafe { libc::poll(&mut fd, 1, 0) > 0 }
    }

    pub fn read_frame(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if self.vnet_header == 0 {
            return self.file.read(buf);
        }
        self.scratch.resize(self.vnet_header.saturating_add(buf.len()), 0);
        let n = self.file.read(&mut self.scratch)?;
        let frame = self.scratch.get(self.vnet_header..n).unwrap_or_default();
        buf[..frame.len()].copy_from_slice(frame);
        Ok(frame.len())
    }

    pub fn write_frame(&mut self, frame: &[u8]) -> std::io::Result<()> {
        if self.vnet_header == 0 {
            return self.file.write_all(frame);
        }
        self.scratch.clear();
        self.scratch.resize(self.vnet_header, 0);
        self.scratch.extend_from_slice(frame);
        self.file.write_all(&self.scratch)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Opens TAP `name` with `flags`; `None` without the privilege to.
    fn open_with_flags(name: &str, flags: libc::c_short) -> Option<File> {
        let file = OpenOptions::new().read(true).write(true).open("/dev/net/tun").ok()?;
        let mut req = IfReq::new(name).ok()?;
        req.data[..2].copy_from_slice(&flags.to_ne_bytes());
        ioctl(file.as_raw_fd(), TUNSETIFF, &mut req).ok()?;
        Some(file)
    }

    #[test]
    fn a_tap_opened_with_a_vnet_header_as_kata_does_passes_plain_ethernet_frames() {
        let id = std::process::id() % 200;
        let name = format!("hkvh{id}");
        let Some(file) = open_with_flags(&name, IFF_TAP | IFF_NO_PI | IFF_VNET_HDR) else {
            eprintln!("SKIPPED: opening a TAP needs CAP_NET_ADMIN");
            return;
        };
        let mut tap = Tap::from_fd(OwnedFd::from(file)).expect("adopt the TAP");
        assert_eq!(tap.vnet_header, VNET_HDR_LEN);
        let host = Ipv4Addr::new(10, 250, id as u8, 1);
        tap.configure(host, Ipv4Addr::new(255, 255, 255, 0)).expect("address the TAP");
        // A datagram to a neighbour makes the host kernel ask for its MAC: an
        // ARP request, which must come out as a frame starting with its
        // broadcast destination, not with the TAP's header.
        let socket = std::net::UdpSocket::bind((host, 0)).expect("bind");
        socket.send_to(b"x", (Ipv4Addr::new(10, 250, id as u8, 2), 9)).expect("send");
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(3);
        let mut frame = [0u8; 2048];
        loop {
            assert!(std::time::Instant::now() < deadline, "no ARP request came out of the TAP");
            if !tap.readable() {
                std::thread::sleep(std::time::Duration::from_millis(5));
                continue;
            }
            let n = tap.read_frame(&mut frame).expect("read a frame");
            if n >= 42 && frame[12..14] == [0x08, 0x06] {
                assert_eq!(frame[..6], [0xff; 6], "broadcast destination first");
                assert_eq!(frame[38..42], [10, 250, id as u8, 2], "asks for the neighbour");
                break;
            }
        }
        // A frame written goes out with a header the TAP accepts (a short write would fail).
        let mut reply = [0u8; 42];
        reply[..6].copy_from_slice(&frame[6..12]);
        reply[12..14].copy_from_slice(&[0x08, 0x06]);
        tap.write_frame(&reply).expect("write a frame");
    }
}
