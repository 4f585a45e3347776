//! The muxer's host side: the listener's clients and their `CONNECT`
//! handshake, reading host streams for the guest as its credit allows,
//! writing the guest's bytes out, and connecting to `<socket>_<port>` for a
//! guest-initiated stream. Nothing here blocks.
// Guest-supplied numbers: no unchecked arithmetic here.
#![deny(clippy::arithmetic_side_effects)]

use std::os::fd::{OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::Path;

use rustix::event::epoll;
use rustix::io::Errno;
use rustix::net::{AddressFamily, RecvFlags, SendFlags, SocketAddrUnix, SocketFlags, SocketType};

use super::super::connection::{Conn, Key, State};
use super::super::packet::{Header, SHUTDOWN_RCV, SHUTDOWN_SEND, op};
use super::{BUF_ALLOC, EVENTS, LINE_MAX, LISTENER, LOCAL_PORT_BASE, MAX_CONNECTIONS, Muxer, Outgoing, RX_CHUNK, WAKE};

impl Muxer {
    /// Handles what is pending on the host side, without waiting.
    pub(super) fn poll_host(&mut self) {
        let mut events = Vec::with_capacity(EVENTS);
        let zero = rustix::event::Timespec { tv_sec: 0, tv_nsec: 0 };
        if epoll::wait(&self.epoll, rustix::buffer::spare_capacity(&mut events), Some(&zero)).is_err() {
            return;
        }
        for event in events {
            let (token, flags) = (event.data.u64(), event.flags);
            match token {
                WAKE => {
                    let _ = rustix::io::read(&self.wake, &mut [0u8; 8]);
                }
                LISTENER => self.accept(),
                fd => self.host_event(RawFd::try_from(fd).unwrap_or(-1), flags),
            }
        }
    }

    pub(super) fn accept(&mut self) {
        for _ in 0..EVENTS {
            let flags = SocketFlags::NONBLOCK | SocketFlags::CLOEXEC;
            let Ok(fd) = rustix::net::accept_with(&self.listener, flags) else { return };
            if self.conns.len() >= MAX_CONNECTIONS {
                crate::rate_limited!(warn, "vsock: {MAX_CONNECTIONS} connections open; host client refused");
                continue;
            }
            let fd = self.insert(Conn::new(UnixStream::from(fd), None, State::Handshake { line: Vec::new() }));
            // The line may be there already.
            self.read_line(fd);
        }
    }

    pub(super) fn host_event(&mut self, fd: RawFd, flags: epoll::EventFlags) {
        let Some(c) = self.conns.get_mut(&fd) else { return };
        let input = epoll::EventFlags::IN | epoll::EventFlags::HUP | epoll::EventFlags::ERR;
        match c.state {
            State::Handshake { .. } if flags.intersects(input) => return self.read_line(fd),
            State::Established if flags.intersects(input) && c.interest.contains(epoll::EventFlags::IN) => {
                // Read (and find the end or the error) when the guest has a buffer.
                c.readable = true;
            }
            _ => {}
        }
        if flags.intersects(epoll::EventFlags::OUT | epoll::EventFlags::HUP | epoll::EventFlags::ERR) {
            // Output waits, or the stream went away while only output was wanted:
            // the write says which.
            self.flush(fd);
        }
    }

    /// Reads the host client's `CONNECT <port>\n`, never past its newline.
    pub(super) fn read_line(&mut self, fd: RawFd) {
        let Some(c) = self.conns.get_mut(&fd) else { return };
        let State::Handshake { line } = &mut c.state else { return };
        let mut peek = [0u8; LINE_MAX + 1];
        let n = match rustix::net::recv(&c.stream, &mut peek[..], RecvFlags::PEEK | RecvFlags::DONTWAIT) {
            Ok((0, _)) => return self.remove(fd),
            Ok((n, _)) => n,
            Err(Errno::AGAIN | Errno::INTR) => return,
            Err(_) => return self.remove(fd),
        };
        let newline = peek[..n].iter().position(|&b| b == b'\n');
        let take = newline.map_or(n, |i| i.saturating_add(1));
        if line.len().saturating_add(take) > LINE_MAX {
            return self.remove(fd);
        }
        let mut buf = [0u8; LINE_MAX + 1];
        match rustix::net::recv(&c.stream, &mut buf[..take], RecvFlags::DONTWAIT) {
            Ok((got, _)) if got == take => line.extend_from_slice(&buf[..take]),
            _ => return self.remove(fd),
        }
        if newline.is_none() {
            return;
        }
        let Some(port) = parse_connect(line) else { return self.remove(fd) };
        let Some(local) = self.allocate_port() else { return self.remove(fd) };
        let Some(c) = self.conns.get_mut(&fd) else { return };
        let key = (local, port);
        c.key = Some(key);
        c.state = State::Connecting;
        self.by_key.insert(key, fd);
        self.update_interest(fd);
        self.push_control(key, op::REQUEST, 0);
    }

    pub(super) fn allocate_port(&mut self) -> Option<u32> {
        for _ in 0..=MAX_CONNECTIONS {
            let port = self.next_port;
            self.next_port = port.checked_add(1).unwrap_or(LOCAL_PORT_BASE);
            if !self.by_key.keys().any(|k| k.0 == port) {
                return Some(port);
            }
        }
        None
    }

    /// Writes what waits for the host; resets the connection if its stream failed.
    pub(super) fn flush(&mut self, fd: RawFd) {
        let Some(c) = self.conns.get_mut(&fd) else { return };
        let flags = SendFlags::NOSIGNAL | SendFlags::DONTWAIT;
        let mut failed = false;
        while !c.reply.is_empty() {
            match rustix::net::send(&c.stream, &c.reply, flags) {
                Ok(n) => drop(c.reply.drain(..n.min(c.reply.len()))),
                Err(Errno::AGAIN | Errno::INTR) => break,
                Err(_) => {
                    failed = true;
                    break;
                }
            }
        }
        while !failed && c.reply.is_empty() && !c.to_host.is_empty() {
            let (chunk, _) = c.to_host.as_slices();
            match rustix::net::send(&c.stream, chunk, flags) {
                Ok(n) => {
                    let n = n.min(chunk.len());
                    c.to_host.drain(..n);
                    c.fwd_cnt = c.fwd_cnt.wrapping_add(u32::try_from(n).unwrap_or(u32::MAX));
                }
                Err(Errno::AGAIN | Errno::INTR) => break,
                Err(_) => failed = true,
            }
        }
        if failed {
            if let Some(key) = c.key {
                return self.reset(key);
            }
            return self.remove(fd);
        }
        // Tell the guest its credit once half its window is free again.
        if c.fwd_cnt.wrapping_sub(c.last_fwd_sent) >= BUF_ALLOC / 2 && !c.credit_update {
            c.credit_update = true;
            self.wake();
        }
        self.settle(fd);
        self.update_interest(fd);
    }

    /// Carries out the guest's SHUTDOWN once what it sent has reached the host.
    pub(super) fn settle(&mut self, fd: RawFd) {
        let Some(c) = self.conns.get_mut(&fd) else { return };
        if !c.to_host.is_empty() || !c.reply.is_empty() {
            return;
        }
        if c.guest_shutdown & (SHUTDOWN_RCV | SHUTDOWN_SEND) == SHUTDOWN_RCV | SHUTDOWN_SEND {
            // Both ways closed: the connection ends with our RST.
            if let Some(key) = c.key {
                self.reset(key);
            }
            return;
        }
        if c.guest_shutdown & SHUTDOWN_SEND != 0 && !c.write_shut {
            c.write_shut = true;
            let _ = c.stream.shutdown(std::net::Shutdown::Write);
        }
    }

    /// Reads what the guest has credit for from a host stream. `None` when
    /// the stream had nothing after all (or failed: then an RST is queued).
    pub(super) fn read_host(&mut self, fd: RawFd) -> Option<Outgoing> {
        let c = self.conns.get_mut(&fd)?;
        let key = c.key?;
        let want = usize::try_from(c.peer_free()).unwrap_or(usize::MAX).min(RX_CHUNK);
        let mut data = vec![0u8; want];
        match rustix::net::recv(&c.stream, &mut data[..], RecvFlags::DONTWAIT) {
            Ok((0, _)) => {
                // The host will send no more; the guest reads its end.
                c.host_eof = true;
                c.readable = false;
                self.update_interest(fd);
                Some(Outgoing { key, op: op::SHUTDOWN, flags: SHUTDOWN_SEND, data: Vec::new() })
            }
            Ok((n, _)) => {
                data.truncate(n);
                c.tx_cnt = c.tx_cnt.wrapping_add(u32::try_from(n).unwrap_or(u32::MAX));
                self.update_interest(fd);
                Some(Outgoing { key, op: op::RW, flags: 0, data })
            }
            Err(Errno::AGAIN | Errno::INTR) => {
                c.readable = false;
                None
            }
            Err(_) => {
                self.reset(key);
                None
            }
        }
    }

    /// A guest connecting to host port `key.0`: connects to `<socket>_<port>`.
    pub(super) fn connect_host(&mut self, key: Key, h: &Header) {
        if self.conns.len() >= MAX_CONNECTIONS {
            crate::rate_limited!(warn, "vsock: {MAX_CONNECTIONS} connections open; guest request refused");
            return self.push_control(key, op::RST, 0);
        }
        let mut path = self.socket.clone().into_os_string();
        path.push(format!("_{}", key.0));
        let Some(stream) = connect_unix(Path::new(&path)) else {
            return self.push_control(key, op::RST, 0);
        };
        let mut conn = Conn::new(stream, Some(key), State::Established);
        conn.peer_buf_alloc = h.buf_alloc;
        conn.peer_fwd_cnt = h.fwd_cnt;
        self.insert(conn);
        self.push_control(key, op::RESPONSE, 0);
    }
}

/// `CONNECT <port>\n` → the port.
fn parse_connect(line: &[u8]) -> Option<u32> {
    let text = std::str::from_utf8(line).ok()?;
    text.strip_prefix("CONNECT ")?.trim_end_matches(['\n', '\r']).parse().ok()
}

/// A non-blocking connection to a Unix listener; `None` if there is none
/// listening or its backlog is full (waiting is not an option).
fn connect_unix(path: &Path) -> Option<UnixStream> {
    let flags = SocketFlags::NONBLOCK | SocketFlags::CLOEXEC;
    let fd: OwnedFd = rustix::net::socket_with(AddressFamily::UNIX, SocketType::STREAM, flags, None).ok()?;
    let addr = SocketAddrUnix::new(path).ok()?;
    rustix::net::connect(&fd, &addr).ok()?;
    Some(UnixStream::from(fd))
}
