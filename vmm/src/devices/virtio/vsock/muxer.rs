//! The host side of hybrid vsock: one Unix listener at `socket` for
//! host-initiated connections (`CONNECT <port>\n`, answered `OK <hostport>\n`
//! once the guest accepts), a connection to `<socket>_<port>` for each
//! guest-initiated one, and the stream state machine (virtio 1.2 §5.10.6)
//! between them and the guest's packets.
//!
//! Everything is non-blocking and driven from the device's worker through
//! one epoll descriptor (the device's `extra_fd`). What a guest or a host
//! client can make the VMM hold is bounded: `MAX_CONNECTIONS` connections,
//! `BUF_ALLOC` bytes from the guest per connection (the credit the guest is
//! given, so a guest that keeps to the protocol never exceeds it and one
//! that does not is reset), `RX_CHUNK` bytes read from a host stream per
//! packet and only when the guest has credit for them, a `LINE_MAX`-byte
//! handshake line, and `MAX_CONTROL` queued control packets.
// Guest-supplied numbers: no unchecked arithmetic here.
#![deny(clippy::arithmetic_side_effects)]

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::ops::Bound;
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};

use rustix::event::epoll;
use rustix::io::Errno;

pub use super::connection::Key;
use super::connection::{Conn, State};
use super::packet::{HOST_CID, Header, SHUTDOWN_RCV, SHUTDOWN_SEND, TYPE_STREAM, op};

/// Connections at once, host- and guest-initiated, handshakes included.
pub const MAX_CONNECTIONS: usize = 256;
/// The receive buffer each connection offers the guest (its credit).
pub const BUF_ALLOC: u32 = 256 * 1024;
/// The largest payload a guest packet may carry (Linux sends at most 64 KiB).
pub const MAX_PAYLOAD: u32 = 64 * 1024;
/// Host bytes read for one packet to the guest.
pub const RX_CHUNK: usize = 4096;
/// Control packets waiting for guest receive buffers.
pub const MAX_CONTROL: usize = 1024;
/// `CONNECT 4294967295\n` and some slack.
pub const LINE_MAX: usize = 32;
/// Host ports given to host-initiated connections count up from here.
const LOCAL_PORT_BASE: u32 = 1 << 30;
/// Host stream events handled per poll.
const EVENTS: usize = 32;

const LISTENER: u64 = u64::MAX;
const WAKE: u64 = u64::MAX - 1;

#[derive(Debug, thiserror::Error)]
pub enum VsockError {
    #[error("cannot listen on {}", path.display())]
    Listen {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot set up the vsock event loop")]
    Events(#[source] std::io::Error),
}

/// A packet for the guest, waiting for a receive buffer.
#[derive(Debug, PartialEq, Eq)]
pub struct Outgoing {
    pub key: Key,
    pub op: u16,
    pub flags: u32,
    pub data: Vec<u8>,
}

pub struct Muxer {
    cid: u64,
    socket: PathBuf,
    listener: UnixListener,
    epoll: OwnedFd,
    /// Readable while packets wait that the guest's transmissions produced.
    wake: OwnedFd,
    conns: BTreeMap<RawFd, Conn>,
    by_key: HashMap<Key, RawFd>,
    control: VecDeque<(Key, u16, u32)>,
    staged: Option<Outgoing>,
    next_port: u32,
    /// Round-robin position among streams with data.
    cursor: RawFd,
}

fn io(e: Errno) -> std::io::Error {
    std::io::Error::from(e)
}

impl Muxer {
    /// Listens on `socket` (mode 0600; a stale socket file there is replaced).
    pub fn new(cid: u64, socket: &Path) -> Result<Muxer, VsockError> {
        let listen_err = |source| VsockError::Listen { path: socket.to_path_buf(), source };
        if std::fs::symlink_metadata(socket).is_ok_and(|m| m.file_type().is_socket()) {
            std::fs::remove_file(socket).map_err(listen_err)?;
        }
        let listener = UnixListener::bind(socket).map_err(listen_err)?;
        listener.set_nonblocking(true).map_err(listen_err)?;
        std::fs::set_permissions(socket, std::fs::Permissions::from_mode(0o600)).map_err(listen_err)?;
        let epoll = epoll::create(epoll::CreateFlags::CLOEXEC).map_err(|e| VsockError::Events(io(e)))?;
        let wake =
            rustix::event::eventfd(0, rustix::event::EventfdFlags::NONBLOCK | rustix::event::EventfdFlags::CLOEXEC)
                .map_err(|e| VsockError::Events(io(e)))?;
        for (fd, token) in [(listener.as_fd(), LISTENER), (wake.as_fd(), WAKE)] {
            epoll::add(&epoll, fd, epoll::EventData::new_u64(token), epoll::EventFlags::IN)
                .map_err(|e| VsockError::Events(io(e)))?;
        }
        Ok(Muxer {
            cid,
            socket: socket.to_path_buf(),
            listener,
            epoll,
            wake,
            conns: BTreeMap::new(),
            by_key: HashMap::new(),
            control: VecDeque::new(),
            staged: None,
            next_port: LOCAL_PORT_BASE,
            cursor: -1,
        })
    }

    /// Readable when the host side has work for the guest's receive queue.
    pub fn epoll_fd(&self) -> RawFd {
        self.epoll.as_raw_fd()
    }

    pub fn connections(&self) -> usize {
        self.conns.len()
    }

    /// Whether a packet for the guest is ready (handles host events first).
    pub fn has_packet(&mut self) -> bool {
        if self.staged.is_none() {
            self.poll_host();
            self.staged = self.next_packet();
        }
        self.staged.is_some()
    }

    /// The ready packet, cut to a receive buffer of `room` bytes (the rest
    /// stays ready); `None` if none is ready or `room` cannot hold a header.
    pub fn take_packet(&mut self, room: usize) -> Option<(Header, Vec<u8>)> {
        let fit = room.checked_sub(super::packet::HEADER_LEN)?;
        let mut out = self.staged.take()?;
        let data = if out.data.len() > fit {
            let rest = out.data.split_off(fit);
            let first = std::mem::replace(&mut out.data, rest);
            let (key, kind, flags) = (out.key, out.op, out.flags);
            self.staged = Some(out);
            self.header_data(key, kind, flags, first)
        } else {
            self.header_data(out.key, out.op, out.flags, out.data)
        };
        Some(data)
    }

    /// Returns a packet the guest's buffer could not take (heki refused it).
    pub fn put_back(&mut self, header: &Header, mut data: Vec<u8>) {
        if let Some(rest) = self.staged.take() {
            data.extend_from_slice(&rest.data);
        }
        let key = (header.src_port, header.dst_port);
        self.staged = Some(Outgoing { key, op: header.op, flags: header.flags, data });
    }

    fn header_data(&mut self, key: Key, op: u16, flags: u32, data: Vec<u8>) -> (Header, Vec<u8>) {
        let mut header = Header {
            src_cid: HOST_CID,
            dst_cid: self.cid,
            src_port: key.0,
            dst_port: key.1,
            len: u32::try_from(data.len()).unwrap_or(u32::MAX),
            type_: TYPE_STREAM,
            op,
            flags,
            buf_alloc: BUF_ALLOC,
            fwd_cnt: 0,
        };
        if let Some(c) = self.by_key.get(&key).and_then(|fd| self.conns.get_mut(fd)) {
            // Every packet tells the guest its credit.
            header.fwd_cnt = c.fwd_cnt;
            c.last_fwd_sent = c.fwd_cnt;
            c.credit_update = false;
        }
        (header, data)
    }

    fn wake(&self) {
        let _ = rustix::io::write(&self.wake, &1u64.to_ne_bytes());
    }

    fn push_control(&mut self, key: Key, op: u16, flags: u32) {
        if self.control.len() >= MAX_CONTROL {
            crate::rate_limited!(warn, "vsock: control queue full; packet for port {} dropped", key.1);
            return;
        }
        self.control.push_back((key, op, flags));
        self.wake();
    }

    /// Closes the connection `key` (if any) and tells the guest.
    fn reset(&mut self, key: Key) {
        if let Some(&fd) = self.by_key.get(&key) {
            self.remove(fd);
        }
        self.push_control(key, op::RST, 0);
    }

    fn remove(&mut self, fd: RawFd) {
        let Some(conn) = self.conns.remove(&fd) else { return };
        if !conn.interest.is_empty() {
            let _ = epoll::delete(&self.epoll, &conn.stream);
        }
        if let Some(key) = conn.key {
            self.by_key.remove(&key);
            if self.staged.as_ref().is_some_and(|s| s.key == key && s.op == op::RW) {
                self.staged = None;
            }
        }
    }

    fn insert(&mut self, conn: Conn) -> RawFd {
        let fd = conn.stream.as_raw_fd();
        if let Some(key) = conn.key {
            self.by_key.insert(key, fd);
        }
        self.conns.insert(fd, conn);
        self.update_interest(fd);
        fd
    }

    fn update_interest(&mut self, fd: RawFd) {
        let Some(c) = self.conns.get_mut(&fd) else { return };
        let want = c.wanted();
        if want == c.interest {
            return;
        }
        let data = epoll::EventData::new_u64(fd as u64);
        let done = if want.is_empty() {
            epoll::delete(&self.epoll, &c.stream)
        } else if c.interest.is_empty() {
            epoll::add(&self.epoll, &c.stream, data, want)
        } else {
            epoll::modify(&self.epoll, &c.stream, data, want)
        };
        match done {
            Ok(()) => c.interest = want,
            Err(e) => crate::rate_limited!(warn, "vsock: epoll_ctl: {e}"),
        }
    }

    /// The next packet for the guest: control packets, credit updates, then
    /// host data, taking the streams in turn.
    fn next_packet(&mut self) -> Option<Outgoing> {
        loop {
            if let Some((key, op, flags)) = self.control.pop_front() {
                return Some(Outgoing { key, op, flags, data: Vec::new() });
            }
            if let Some(c) = self.conns.values_mut().find(|c| c.credit_update && c.key.is_some()) {
                c.credit_update = false;
                let key = c.key?;
                return Some(Outgoing { key, op: op::CREDIT_UPDATE, flags: 0, data: Vec::new() });
            }
            let after = (Bound::Excluded(self.cursor), Bound::Unbounded);
            let fd = self
                .conns
                .range(after)
                .chain(self.conns.range(..=self.cursor))
                .find(|(_, c)| c.data_ready())
                .map(|(&fd, _)| fd)?;
            self.cursor = fd;
            if let Some(out) = self.read_host(fd) {
                return Some(out);
            }
        }
    }

    /// Handles one packet the guest sent. Anything that is not a valid step
    /// of a stream connection is answered with RST (and ends that connection).
    pub fn handle_tx(&mut self, h: &Header, payload: &[u8]) {
        let key = (h.dst_port, h.src_port);
        let addressed = h.src_cid == self.cid && h.dst_cid == HOST_CID && h.type_ == TYPE_STREAM;
        if h.op == op::RST {
            // Never answered, whatever it says.
            if addressed && let Some(&fd) = self.by_key.get(&key) {
                self.remove(fd);
            }
            return;
        }
        if !addressed || usize::try_from(h.len).ok() != Some(payload.len()) {
            crate::rate_limited!(debug, "vsock: malformed packet from the guest: {h:?}");
            return self.reset(key);
        }
        let Some(&fd) = self.by_key.get(&key) else {
            if h.op == op::REQUEST {
                return self.connect_host(key, h);
            }
            return self.reset(key);
        };
        let Some(c) = self.conns.get_mut(&fd) else { return self.reset(key) };
        c.peer_buf_alloc = h.buf_alloc;
        c.peer_fwd_cnt = h.fwd_cnt;
        match h.op {
            op::RESPONSE if c.state == State::Connecting => {
                c.state = State::Established;
                c.reply = format!("OK {}\n", key.0).into_bytes();
                self.flush(fd);
            }
            op::RW if c.state == State::Established && c.guest_shutdown & SHUTDOWN_SEND == 0 => {
                if c.to_host.len().saturating_add(payload.len()) > BUF_ALLOC as usize {
                    crate::rate_limited!(warn, "vsock: guest port {} sent beyond its credit; reset", key.1);
                    return self.reset(key);
                }
                c.to_host.extend(payload);
                self.flush(fd);
            }
            op::CREDIT_UPDATE if c.state == State::Established => {}
            op::CREDIT_REQUEST if c.state == State::Established => {
                c.credit_update = true;
                self.wake();
            }
            op::SHUTDOWN if c.state == State::Established => {
                c.guest_shutdown |= h.flags & (SHUTDOWN_RCV | SHUTDOWN_SEND);
                self.settle(fd);
            }
            _ => return self.reset(key),
        }
        // The guest's credit may have changed what to wait for.
        self.update_interest(fd);
    }
}

mod host_streams;

#[cfg(test)]
#[path = "muxer_tests.rs"]
mod tests;
