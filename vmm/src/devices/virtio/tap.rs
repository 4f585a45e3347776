//! A TAP interface on the host: the other end of virtio-net.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;

const IFF_TAP: libc::c_short = 0x0002;
const IFF_NO_PI: libc::c_short = 0x1000;
const TUNSETIFF: libc::c_ulong = 0x4004_54ca;

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
}

fn ioctl(fd: libc::c_int, request: libc::c_ulong, req: &mut IfReq) -> std::io::Result<()> {
    // SAFETY: `req` is a valid, writable ifreq-sized buffer for the duration of the call.
    let ret = unsafe { libc::ioctl(fd, request, req as *mut IfReq) };
    if ret < 0 { Err(std::io::Error::last_os_error()) } else { Ok(()) }
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
        Ok(Tap { file, name: String::from_utf8_lossy(&req.name[..len]).into_owned() })
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
        self.file.read(buf)
    }

    pub fn write_frame(&mut self, frame: &[u8]) -> std::io::Result<()> {
        self.file.write_all(frame)
    }
}
