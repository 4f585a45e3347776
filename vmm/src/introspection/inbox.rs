//! The agent's incoming lines, read by whichever thread needs them next.
//!
//! Usually that is `introspect-rx`. But a vCPU that has just sent an event
//! borrows the reader and reads its own reply, so the answer wakes that vCPU
//! directly instead of passing through `introspect-rx` (one thread hand-off
//! fewer on the hottest path). A borrowing vCPU handles only replies to
//! events: the first other line (a command, a bad message, the end of the
//! connection) goes back to `introspect-rx` with the reader, and the agent's
//! lines are still handled in the order they were sent.

use std::collections::VecDeque;
use std::io;
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::Duration;

use rustix::event::{EventfdFlags, PollFd, PollFlags, Timespec};
use rustix::net::RecvFlags;

use introspection_protocol::MAX_LINE;

/// One line from the agent.
#[derive(Debug, PartialEq, Eq)]
pub enum Line {
    /// A line without its newline.
    Text(Vec<u8>),
    /// A line longer than `MAX_LINE`, skipped up to its newline.
    TooLong,
    /// The agent closed the connection (or it failed).
    End,
}

/// Bytes received from the agent and not yet handed out as lines.
#[derive(Default)]
pub struct LineReader {
    buf: Vec<u8>,
    /// Start of the unread part of `buf`.
    start: usize,
    /// Inside a line longer than `MAX_LINE`: dropped up to its newline.
    skipping: bool,
    ended: bool,
    /// Receive buffer, kept between receives.
    scratch: Vec<u8>,
}

/// Bytes one receive takes at most.
const RECEIVE_CHUNK: usize = 64 << 10;

impl LineReader {
    /// The next whole line received, if any.
    pub fn next_line(&mut self) -> Option<Line> {
        let unread = &self.buf[self.start..];
        match unread.iter().position(|&b| b == b'\n') {
            Some(newline) => {
                let too_long = std::mem::replace(&mut self.skipping, false) || newline > MAX_LINE;
                let line = if too_long { Line::TooLong } else { Line::Text(unread[..newline].to_vec()) };
                self.start += newline + 1;
                Some(line)
            }
            None if self.ended => {
                let rest = std::mem::take(&mut self.buf).split_off(self.start);
                self.start = 0;
                if std::mem::replace(&mut self.skipping, false) || rest.len() > MAX_LINE {
                    return Some(Line::TooLong);
                }
                // The last line needs no newline; after it, the end.
                Some(if rest.is_empty() { Line::End } else { Line::Text(rest) })
            }
            None => {
                if unread.len() > MAX_LINE {
                    self.skipping = true;
                    self.buf.clear();
                    self.start = 0;
                }
                None
            }
        }
    }

    /// Whether bytes are waiting here (a line may be ready without a receive).
    pub fn has_unread(&self) -> bool {
        self.start < self.buf.len() || self.ended
    }

    /// Takes what the socket holds now, without waiting.
    pub fn receive(&mut self, stream: &UnixStream) -> io::Result<()> {
        if self.ended {
            return Ok(());
        }
        if self.start > 0 {
            self.buf.drain(..self.start);
            self.start = 0;
        }
        self.scratch.resize(RECEIVE_CHUNK, 0);
        match rustix::net::recv(stream, &mut self.scratch[..], RecvFlags::DONTWAIT) {
            Ok((_, 0)) => self.ended = true,
            Ok((_, n)) => self.buf.extend_from_slice(&self.scratch[..n]),
            Err(rustix::io::Errno::AGAIN | rustix::io::Errno::INTR) => {}
            Err(e) => {
                self.ended = true;
                return Err(e.into());
            }
        }
        Ok(())
    }

    #[cfg(test)]
    fn push(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }
}

/// Waits until `stream` has bytes (or is closed), or `timeout` passes;
/// `extra` is another descriptor that ends the wait when readable.
fn wait_readable(stream: &UnixStream, extra: Option<&OwnedFd>, timeout: Option<Duration>) {
    let mut fds = vec![PollFd::new(stream, PollFlags::IN)];
    if let Some(extra) = extra {
        fds.push(PollFd::new(extra, PollFlags::IN));
    }
    let timeout = timeout.map(|t| Timespec::try_from(t).unwrap_or(Timespec { tv_sec: 1, tv_nsec: 0 }));
    // An error (EINTR) only ends this wait early; callers loop.
    let _ = rustix::event::poll(&mut fds, timeout.as_ref());
}

#[derive(Default)]
struct InboxState {
    /// `None` while a vCPU borrows it.
    reader: Option<LineReader>,
    /// Lines a vCPU read but left to `introspect-rx`, oldest first.
    left: VecDeque<Line>,
}

/// The reading side of one agent connection.
pub struct Inbox {
    stream: UnixStream,
    state: Mutex<InboxState>,
    returned: Condvar,
    /// Tells `introspect-rx` that a vCPU left it lines.
    rx_wake: OwnedFd,
}

impl Inbox {
    pub fn new(stream: UnixStream) -> io::Result<Inbox> {
        Ok(Inbox {
            stream,
            state: Mutex::new(InboxState { reader: Some(LineReader::default()), left: VecDeque::new() }),
            returned: Condvar::new(),
            rx_wake: rustix::event::eventfd(0, EventfdFlags::NONBLOCK | EventfdFlags::CLOEXEC)?,
        })
    }

    fn lock(&self) -> MutexGuard<'_, InboxState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The reader for a vCPU that waits for its reply; `None` while another
    /// thread reads, or while older lines still wait for `introspect-rx`.
    pub fn try_borrow(&self) -> Option<LineReader> {
        let mut state = self.lock();
        if !state.left.is_empty() {
            return None;
        }
        state.reader.take()
    }

    /// Returns a borrowed reader, with the line the vCPU did not handle.
    pub fn give_back(&self, reader: LineReader, unhandled: Option<Line>) {
        let wake_rx = unhandled.is_some() || reader.has_unread();
        {
            let mut state = self.lock();
            state.left.extend(unhandled);
            state.reader = Some(reader);
        }
        self.returned.notify_all();
        if wake_rx {
            let _ = rustix::io::write(&self.rx_wake, &1u64.to_ne_bytes());
        }
    }

    /// Whether the agent closed its end: the socket reports a hang-up
    /// (both directions shut) even while lines it sent are still unread.
    pub fn hung_up(&self) -> bool {
        let mut fds = [PollFd::new(&self.stream, PollFlags::IN)];
        let now = Timespec { tv_sec: 0, tv_nsec: 0 };
        rustix::event::poll(&mut fds, Some(&now)).is_ok_and(|n| n > 0)
            && fds[0].revents().intersects(PollFlags::HUP | PollFlags::ERR)
    }

    /// Waits until the socket has bytes, for at most `timeout`.
    pub fn wait(&self, timeout: Duration) {
        wait_readable(&self.stream, None, Some(timeout));
    }

    /// Receives into a borrowed reader without waiting.
    pub fn receive(&self, reader: &mut LineReader) -> io::Result<()> {
        reader.receive(&self.stream)
    }

    /// `introspect-rx`: every line in order, until the connection ends.
    pub fn read_loop(&self, mut handle: impl FnMut(Line)) {
        loop {
            wait_readable(&self.stream, Some(&self.rx_wake), None);
            let _ = rustix::io::read(&self.rx_wake, &mut [0u8; 8]);
            let (mut reader, left) = {
                let mut state = self.lock();
                // A vCPU reading its reply holds it until then (bounded by the reply timeout).
                loop {
                    if let Some(reader) = state.reader.take() {
                        break (reader, std::mem::take(&mut state.left));
                    }
                    state = self.returned.wait(state).unwrap_or_else(|p| p.into_inner());
                }
            };
            // A closed connection drops what it queued: its replies have no
            // reader, and the next agent must not wait for them.
            let mut ended = false;
            for line in left {
                ended |= line == Line::End || self.hung_up();
                if ended {
                    break;
                }
                handle(line);
            }
            if !ended {
                if let Err(e) = reader.receive(&self.stream) {
                    log::info!("introspection: the agent's connection failed: {e}");
                }
                while let Some(line) = reader.next_line() {
                    if line == Line::End || self.hung_up() {
                        ended = true;
                        break;
                    }
                    handle(line);
                }
            }
            self.lock().reader = Some(reader);
            if ended {
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn text(s: &str) -> Option<Line> {
        Some(Line::Text(s.as_bytes().to_vec()))
    }

    #[test]
    fn lines_split_across_receives_come_out_whole() {
        let mut reader = LineReader::default();
        reader.push(b"{\"a\":");
        assert_eq!(reader.next_line(), None);
        reader.push(b"1}\n{\"b\":2}\n{\"c\"");
        assert_eq!(reader.next_line(), text("{\"a\":1}"));
        assert_eq!(reader.next_line(), text("{\"b\":2}"));
        assert_eq!(reader.next_line(), None);
        assert!(reader.has_unread());
    }

    #[test]
    fn an_oversized_line_is_skipped_and_the_next_one_is_read() {
        let mut reader = LineReader::default();
        reader.push(&vec![b'x'; MAX_LINE + 10]);
        assert_eq!(reader.next_line(), None, "no newline yet");
        reader.push(b"xxxx\n{\"id\":1}\n");
        assert_eq!(reader.next_line(), Some(Line::TooLong));
        assert_eq!(reader.next_line(), text("{\"id\":1}"));
        assert_eq!(reader.next_line(), None);
    }

    #[test]
    fn an_oversized_line_that_arrives_whole_is_refused_too() {
        let mut reader = LineReader::default();
        let mut bytes = vec![b'x'; MAX_LINE + 1];
        bytes.extend_from_slice(b"\n{\"id\":2}\n");
        reader.push(&bytes);
        assert_eq!(reader.next_line(), Some(Line::TooLong));
        assert_eq!(reader.next_line(), text("{\"id\":2}"));
        let mut exact = vec![b' '; MAX_LINE];
        exact.push(b'\n');
        reader.push(&exact);
        assert!(
            matches!(reader.next_line(), Some(Line::Text(line)) if line.len() == MAX_LINE),
            "MAX_LINE itself is allowed"
        );
    }

    #[test]
    fn the_last_line_needs_no_newline_and_the_end_follows_it() {
        let (mut agent, vmm) = UnixStream::pair().expect("socketpair");
        agent.write_all(b"{\"id\":1}\n{\"id\":2}").expect("write");
        drop(agent);
        let mut reader = LineReader::default();
        reader.receive(&vmm).expect("receive");
        reader.receive(&vmm).expect("receive");
        assert_eq!(reader.next_line(), text("{\"id\":1}"));
        assert_eq!(reader.next_line(), text("{\"id\":2}"));
        assert_eq!(reader.next_line(), Some(Line::End));
    }

    #[test]
    fn receiving_from_a_quiet_socket_returns_at_once() {
        let (_agent, vmm) = UnixStream::pair().expect("socketpair");
        let mut reader = LineReader::default();
        reader.receive(&vmm).expect("receive");
        assert_eq!(reader.next_line(), None);
        assert!(!reader.has_unread());
    }

    #[test]
    fn lines_a_vcpu_leaves_reach_the_reader_thread_in_order() {
        let (mut agent, vmm) = UnixStream::pair().expect("socketpair");
        let inbox = std::sync::Arc::new(Inbox::new(vmm).expect("inbox"));
        let mut borrowed = inbox.try_borrow().expect("free");
        assert!(inbox.try_borrow().is_none(), "one reader at a time");
        agent.write_all(b"{\"reply\":1,\"action\":\"continue\"}\n{\"id\":7}\n{\"id\":8}\n").expect("write");
        inbox.wait(Duration::from_secs(5));
        inbox.receive(&mut borrowed).expect("receive");
        assert_eq!(borrowed.next_line(), text("{\"reply\":1,\"action\":\"continue\"}"));
        let left = borrowed.next_line();
        inbox.give_back(borrowed, left);
        assert!(inbox.try_borrow().is_none(), "older lines wait for introspect-rx");
        // Half-closed: the agent still reads the replies, so its lines run.
        agent.shutdown(std::net::Shutdown::Write).expect("shutdown");
        let rx = inbox.clone();
        let seen = std::thread::spawn(move || {
            let mut seen = Vec::new();
            rx.read_loop(|line| seen.push(line));
            seen
        })
        .join()
        .expect("rx thread");
        assert_eq!(seen, vec![text("{\"id\":7}").unwrap(), text("{\"id\":8}").unwrap()]);
    }

    #[test]
    fn lines_queued_by_an_agent_that_closed_are_dropped() {
        let (mut agent, vmm) = UnixStream::pair().expect("socketpair");
        let inbox = Inbox::new(vmm).expect("inbox");
        agent.write_all(b"{\"id\":1,\"cmd\":\"pause\"}\n{\"id\":2,\"cmd\":\"pause\"}\n").expect("write");
        assert!(!inbox.hung_up());
        drop(agent);
        assert!(inbox.hung_up());
        let mut seen = Vec::new();
        inbox.read_loop(|line| seen.push(line));
        assert_eq!(seen, Vec::<Line>::new(), "nothing runs for a closed connection");
    }
}
