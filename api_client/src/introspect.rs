//! A blocking client for the introspection agent socket (`docs/introspection.md`):
//! JSON lines, commands with ids, events with sequence numbers and replies.
//!
//! ```no_run
//! use api_client::introspect::{Agent, Action};
//! let mut agent = Agent::connect("/tmp/hk-agent.sock")?;
//! agent.call("track-write", serde_json::json!({"gpa": 0x10_0000}))?;
//! while let Some(event) = agent.next_event(None)? {
//!     if let Some(seq) = event.get("seq").and_then(|s| s.as_u64()) {
//!         if event["reply_required"] == true {
//!             agent.reply(seq, Action::Deny)?;
//!         }
//!     }
//! }
//! # Ok::<(), api_client::introspect::Error>(())
//! ```

use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("introspection socket I/O failed")]
    Io(#[from] std::io::Error),
    #[error("the VMM closed the introspection connection")]
    Closed,
    #[error("malformed message from the VMM: {0}")]
    Protocol(String),
    /// The VMM refused a command: an errno name and a message.
    #[error("{errno}: {message}")]
    Refused { errno: String, message: String },
}

pub use introspection_protocol::{Action, from_hex, to_hex};

/// Sees every message the VMM sends, with the name of the command a reply
/// answers when this agent sent it (see `Agent::connect_observed`).
pub type Observer = Box<dyn FnMut(&Value, Option<&str>) + Send>;

/// One connection to a VMM's introspection socket.
pub struct Agent {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    /// The VMM's `hello`: version, VM shape, capabilities.
    pub hello: Value,
    next_id: u64,
    /// Events read while waiting for a command's reply.
    events: VecDeque<Value>,
    /// Lines that were neither events nor the awaited reply (errors for replies).
    pub stray: Vec<Value>,
    /// The socket's read timeout, once set.
    read_timeout: Option<Option<Duration>>,
    /// How long `next_event` polls before it sleeps (see `set_event_poll`).
    event_poll: Duration,
    observer: Option<Observer>,
    /// Commands sent and not yet answered, by id (kept only with an observer).
    sent: std::collections::HashMap<String, String>,
}

impl Agent {
    /// Connects and reads the `hello`.
    pub fn connect(path: impl AsRef<Path>) -> Result<Agent, Error> {
        Self::connect_with(path, None)
    }

    /// Connects with an observer that sees every message from the VMM, the
    /// `hello` included (tests check each against the protocol's schema).
    pub fn connect_observed(path: impl AsRef<Path>, observer: Observer) -> Result<Agent, Error> {
        Self::connect_with(path, Some(observer))
    }

    fn connect_with(path: impl AsRef<Path>, observer: Option<Observer>) -> Result<Agent, Error> {
        let stream = UnixStream::connect(path)?;
        let writer = stream.try_clone()?;
        let mut agent = Agent {
            reader: BufReader::new(stream),
            writer,
            hello: Value::Null,
            next_id: 1,
            events: VecDeque::new(),
            stray: Vec::new(),
            read_timeout: None,
            event_poll: Duration::ZERO,
            observer,
            sent: std::collections::HashMap::new(),
        };
        let first = agent.read_message(Some(Duration::from_secs(10)))?.ok_or(Error::Closed)?;
        if let Some(error) = first.get("error") {
            return Err(refusal(error));
        }
        agent.hello =
            first.get("hello").cloned().ok_or_else(|| Error::Protocol(format!("expected hello, got {first}")))?;
        Ok(agent)
    }

    /// Sends one raw line (tests send malformed ones), in one write so the
    /// VMM's reader wakes once per line.
    pub fn send_raw(&mut self, line: &[u8]) -> Result<(), Error> {
        if self.observer.is_some()
            && let Ok(Value::Object(message)) = serde_json::from_slice::<Value>(line)
            && let (Some(id), Some(Value::String(cmd))) = (message.get("id"), message.get("cmd"))
        {
            self.sent.insert(id.to_string(), cmd.clone());
        }
        let mut buf = Vec::with_capacity(line.len() + 1);
        buf.extend_from_slice(line);
        buf.push(b'\n');
        self.writer.write_all(&buf)?;
        Ok(())
    }

    /// Reads the next message of any kind.
    pub fn read_message(&mut self, timeout: Option<Duration>) -> Result<Option<Value>, Error> {
        // One system call less per message when the timeout is the one in place.
        if self.read_timeout != Some(timeout) {
            self.reader.get_ref().set_read_timeout(timeout)?;
            self.read_timeout = Some(timeout);
        }
        let mut line = String::new();
        match self.reader.read_line(&mut line) {
            Ok(0) => Err(Error::Closed),
            Ok(_) => {
                let message: Value =
                    serde_json::from_str(&line).map_err(|e| Error::Protocol(format!("{e}: {line}")))?;
                if let Some(observer) = self.observer.as_mut() {
                    let cmd = message.get("id").and_then(|id| self.sent.remove(&id.to_string()));
                    observer(&message, cmd.as_deref());
                }
                Ok(Some(message))
            }
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// Runs a command and returns its result; events that arrive meanwhile are kept for `next_event`.
    pub fn call(&mut self, cmd: &str, args: Value) -> Result<Value, Error> {
        let id = self.next_id;
        self.next_id += 1;
        let message = introspection_protocol::command(id, cmd, args);
        self.send_raw(message.to_string().as_bytes())?;
        self.wait_reply(&json!(id))
    }

    /// Waits for the reply to command `id`.
    pub fn wait_reply(&mut self, id: &Value) -> Result<Value, Error> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let left =
                deadline.checked_duration_since(Instant::now()).ok_or(Error::Protocol("no reply in 30 s".into()))?;
            let Some(message) = self.read_message(Some(left))? else { continue };
            if message.get("event").is_some() {
                self.events.push_back(message);
            } else if message.get("id") == Some(id) {
                if let Some(error) = message.get("error") {
                    return Err(refusal(error));
                }
                return Ok(message.get("result").cloned().unwrap_or(Value::Null));
            } else {
                self.stray.push(message);
            }
        }
    }

    /// Lets `next_event` poll the socket for up to `window` before it
    /// sleeps. An agent that answers a stream of events sees the next one
    /// without being woken from sleep (tens of microseconds on a busy or
    /// virtualised host), at the price of that much CPU time per event.
    pub fn set_event_poll(&mut self, window: Duration) {
        self.event_poll = window;
    }

    /// Polls for up to the event-poll window; true once bytes are waiting.
    fn poll_for_bytes(&self) -> bool {
        if !self.reader.buffer().is_empty() {
            return true;
        }
        let until = Instant::now() + self.event_poll;
        let now = rustix::event::Timespec { tv_sec: 0, tv_nsec: 0 };
        while Instant::now() < until {
            let mut fds = [rustix::event::PollFd::new(self.reader.get_ref(), rustix::event::PollFlags::IN)];
            if rustix::event::poll(&mut fds, Some(&now)).is_ok_and(|n| n > 0) {
                return true;
            }
            std::hint::spin_loop();
        }
        false
    }

    /// The next event, waiting up to `timeout` (`None`: forever).
    pub fn next_event(&mut self, timeout: Option<Duration>) -> Result<Option<Value>, Error> {
        if let Some(event) = self.events.pop_front() {
            return Ok(Some(event));
        }
        if !self.event_poll.is_zero() {
            self.poll_for_bytes();
        }
        let deadline = timeout.map(|t| Instant::now() + t);
        loop {
            let left = match deadline {
                Some(d) => match d.checked_duration_since(Instant::now()) {
                    Some(left) if !left.is_zero() => Some(left),
                    _ => return Ok(None),
                },
                None => None,
            };
            match self.read_message(left)? {
                Some(message) if message.get("event").is_some() => return Ok(Some(message)),
                Some(message) => self.stray.push(message),
                None => return Ok(None),
            }
        }
    }

    /// Answers event `seq` (formatted directly: this is an agent's hot path).
    pub fn reply(&mut self, seq: u64, action: Action) -> Result<(), Error> {
        self.writer.write_all(introspection_protocol::reply_line(seq, action).as_bytes())?;
        Ok(())
    }
}

fn refusal(error: &Value) -> Error {
    Error::Refused {
        errno: error.get("errno").and_then(Value::as_str).unwrap_or("EIO").to_string(),
        message: error.get("message").and_then(Value::as_str).unwrap_or("").to_string(),
    }
}
