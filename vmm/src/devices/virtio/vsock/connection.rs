//! One vsock stream as the muxer tracks it: its host socket, where it is in
//! the connection handshake, and the credit both sides have.
// Guest-supplied numbers: no unchecked arithmetic here.
#![deny(clippy::arithmetic_side_effects)]

use std::collections::VecDeque;
use std::os::unix::net::UnixStream;

use rustix::event::epoll;

use super::packet::SHUTDOWN_RCV;

/// A connection's ports: (host, guest).
pub type Key = (u32, u32);

#[derive(Debug, PartialEq, Eq)]
pub enum State {
    /// A host client that has not yet sent its `CONNECT` line.
    Handshake {
        line: Vec<u8>,
    },
    /// REQUEST sent to the guest; waiting for RESPONSE or RST.
    Connecting,
    Established,
}

pub struct Conn {
    pub stream: UnixStream,
    pub key: Option<Key>,
    pub state: State,
    /// The `OK <port>\n` not yet written to the host client.
    pub reply: Vec<u8>,
    /// Guest bytes not yet written to the host (at most `BUF_ALLOC`).
    pub to_host: VecDeque<u8>,
    /// Guest bytes written to the host, and the count last told the guest.
    pub fwd_cnt: u32,
    pub last_fwd_sent: u32,
    /// Host bytes sent to the guest.
    pub tx_cnt: u32,
    /// The guest's receive buffer and how much of it it has consumed.
    pub peer_buf_alloc: u32,
    pub peer_fwd_cnt: u32,
    /// The host stream has data (or its end) to read.
    pub readable: bool,
    pub host_eof: bool,
    /// SHUTDOWN flags the guest has sent.
    pub guest_shutdown: u32,
    pub write_shut: bool,
    pub credit_update: bool,
    /// Events registered with epoll (empty: not registered).
    pub interest: epoll::EventFlags,
}

impl Conn {
    pub fn new(stream: UnixStream, key: Option<Key>, state: State) -> Conn {
        Conn {
            stream,
            key,
            state,
            reply: Vec::new(),
            to_host: VecDeque::new(),
            fwd_cnt: 0,
            last_fwd_sent: 0,
            tx_cnt: 0,
            peer_buf_alloc: 0,
            peer_fwd_cnt: 0,
            readable: false,
            host_eof: false,
            guest_shutdown: 0,
            write_shut: false,
            credit_update: false,
            interest: epoll::EventFlags::empty(),
        }
    }

    /// Bytes the guest can take now.
    pub fn peer_free(&self) -> u32 {
        self.peer_buf_alloc.saturating_sub(self.tx_cnt.wrapping_sub(self.peer_fwd_cnt))
    }

    pub fn receiving(&self) -> bool {
        self.state == State::Established
            && !self.host_eof
            && self.guest_shutdown & SHUTDOWN_RCV == 0
            && self.peer_free() > 0
    }

    pub fn data_ready(&self) -> bool {
        self.readable && self.receiving()
    }

    /// What to wait for: input while it can go somewhere, output while some waits.
    /// A stream wanting nothing is taken out of epoll (a hang-up would wake it forever).
    pub fn wanted(&self) -> epoll::EventFlags {
        let mut events = epoll::EventFlags::empty();
        if matches!(self.state, State::Handshake { .. }) || self.receiving() {
            events |= epoll::EventFlags::IN;
        }
        if !self.reply.is_empty() || !self.to_host.is_empty() {
            events |= epoll::EventFlags::OUT;
        }
        events
    }
}
