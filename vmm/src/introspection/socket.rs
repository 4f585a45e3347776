//! The agent's socket: created mode 0600, one agent at a time, a reader
//! thread per connection that answers commands and delivers event replies,
//! and a writer thread for asynchronous events.

use std::io::Write;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::sync::mpsc::{Receiver, sync_channel};
use std::time::Duration;

use serde_json::{Value, json};

use super::inbox::{Inbox, Line};
use introspection_protocol::{self as protocol, AgentError, Incoming, MAX_LINE};

use crate::config::IntrospectionConfig;

/// Asynchronous events queued for the agent before newer ones are dropped (counted).
use super::commands;
use super::{ASYNC_QUEUE, HostCaps, Hub, IntrospectionError, lock};

/// The agent channel, owned by the VMM.
pub struct Introspection {
    hub: Arc<Hub>,
}

impl Introspection {
    /// Creates the socket (mode 0600) and starts accepting agents.
    pub fn start(config: &IntrospectionConfig, caps: HostCaps) -> Result<Introspection, IntrospectionError> {
        let listener = bind(&config.socket)?;
        let hub = Arc::new(Hub::new(config, caps));
        let accept_hub = hub.clone();
        std::thread::Builder::new()
            .name("introspect-accept".into())
            .spawn(move || {
                // Its own filter, which the agents' rx and tx threads inherit.
                crate::seccomp::apply_or_exit(crate::seccomp::ThreadKind::Introspection);
                accept_loop(&accept_hub, listener)
            })
            .map_err(IntrospectionError::Spawn)?;
        Ok(Introspection { hub })
    }

    pub fn socket(&self) -> &Path {
        &self.hub.socket
    }

    pub fn hub(&self) -> &Arc<Hub> {
        &self.hub
    }

    /// Records the shape of the VM about to be built (for `hello` before boot).
    pub fn set_vm_shape(&self, vcpus: usize, ram: Vec<(u64, u64)>, heki: bool) {
        self.hub.set_vm_shape(vcpus, ram, heki);
    }
}

fn bind(path: &Path) -> Result<UnixListener, IntrospectionError> {
    let err = |source| IntrospectionError::Bind { path: path.to_path_buf(), source };
    if std::fs::symlink_metadata(path).is_ok_and(|m| std::os::unix::fs::FileTypeExt::is_socket(&m.file_type())) {
        // Removed only when stale (nobody listens: ECONNREFUSED); a live
        // socket belongs to someone else, whose agent must not be cut off.
        match UnixStream::connect(path) {
            Ok(_) => return Err(IntrospectionError::InUse { path: path.to_path_buf() }),
            Err(e) if e.raw_os_error() == Some(libc::ECONNREFUSED) => std::fs::remove_file(path).map_err(err)?,
            Err(e) => return Err(err(e)),
        }
    }
    // Created under a 0177 umask so it is never open to others, not even briefly.
    // SAFETY: umask only changes this process's file-creation mask; it is restored at once.
    let old = unsafe { libc::umask(0o177) };
    let bound = UnixListener::bind(path);
    // SAFETY: as above.
    unsafe { libc::umask(old) };
    // The umask made it 0600 (no chmod: the VMM thread's seccomp filter has none).
    bound.map_err(err)
}

fn accept_loop(hub: &Arc<Hub>, listener: UnixListener) {
    for stream in listener.incoming() {
        let Ok(mut stream) = stream else { continue };
        if hub.connection().is_some() {
            let busy = protocol::reply(
                &Value::Null,
                &Err(AgentError::new("EBUSY", "another agent is connected; one agent at a time")),
            );
            let _ = stream.set_write_timeout(Some(Duration::from_secs(1)));
            let _ = writeln!(stream, "{busy}");
            continue;
        }
        if let Err(e) = start_connection(hub, stream) {
            log::error!("introspection: cannot serve the agent: {e}");
        }
    }
}

fn start_connection(hub: &Arc<Hub>, stream: UnixStream) -> std::io::Result<()> {
    stream.set_write_timeout(Some(hub.reply_timeout.max(Duration::from_millis(100))))?;
    let writer = stream.try_clone()?;
    let inbox = Arc::new(Inbox::new(stream)?);
    let (async_tx, async_rx) = sync_channel(ASYNC_QUEUE);
    *lock(&hub.out) = Some(writer);
    {
        let mut c = lock(&hub.connection);
        c.generation += 1;
        c.connected = true;
        c.async_tx = Some(async_tx);
        c.inbox = Some(inbox.clone());
    }
    hub.counters.connections.fetch_add(1, Ordering::Relaxed);
    crate::events::emit("introspection", "connected", &[]);
    hub.write_line(json!({"hello": commands::hello(hub)}).to_string());
    let tx_hub = hub.clone();
    std::thread::Builder::new().name("introspect-tx".into()).spawn(move || async_writer(&tx_hub, async_rx))?;
    let rx_hub = hub.clone();
    std::thread::Builder::new().name("introspect-rx".into()).spawn(move || {
        inbox.read_loop(|line| handle_incoming(&rx_hub, line));
        rx_hub.unhook();
    })?;
    Ok(())
}

fn async_writer(hub: &Hub, rx: Receiver<String>) {
    // Ends when the connection drops its sender.
    while let Ok(line) = rx.recv() {
        if !hub.write_line(line) {
            break;
        }
    }
}

/// One line from the agent, on `introspect-rx`.
fn handle_incoming(hub: &Arc<Hub>, line: Line) {
    match line {
        Line::Text(text) if text.iter().all(u8::is_ascii_whitespace) => {}
        Line::Text(text) => handle_line(hub, &text),
        Line::TooLong => {
            hub.counters.bad_messages.fetch_add(1, Ordering::Relaxed);
            let e = AgentError::new("E2BIG", format!("a message is at most {MAX_LINE} bytes"));
            hub.write_line(protocol::reply(&Value::Null, &Err(e)).to_string());
        }
        Line::End => {}
    }
}

fn handle_line(hub: &Arc<Hub>, line: &[u8]) {
    match protocol::parse_line(line) {
        Err((id, e)) => {
            hub.counters.bad_messages.fetch_add(1, Ordering::Relaxed);
            hub.write_line(protocol::reply(&id, &Err(e)).to_string());
        }
        Ok(Incoming::Reply { seq, action }) => hub.deliver_reply(seq, action),
        Ok(Incoming::Command { id, cmd, args }) => {
            let result = commands::run(hub, &cmd, &args);
            if result.is_err() {
                hub.counters.bad_messages.fetch_add(1, Ordering::Relaxed);
            }
            hub.write_line(protocol::reply(&id, &result).to_string());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_live_socket_at_the_path_is_refused_and_keeps_working() {
        let dir = std::env::temp_dir().join(format!("hk-introspect-live-{}", std::process::id()));
        let _ = std::fs::create_dir_all(&dir);
        let path = dir.join("agent.sock");
        let first = UnixListener::bind(&path).expect("the first VMM's socket");
        let err = bind(&path).expect_err("a live socket must not be replaced");
        assert!(matches!(&err, IntrospectionError::InUse { path: p } if *p == path), "{err:?}");
        assert!(err.to_string().contains(&path.display().to_string()), "{err}");
        // The first owner still accepts: the probe's connection, then a new one.
        first.set_nonblocking(true).expect("nonblocking");
        let _probe = first.accept();
        let _client = UnixStream::connect(&path).expect("the first socket still answers");
        assert!(first.accept().is_ok());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_stale_socket_at_the_path_is_replaced() {
        let dir = std::env::temp_dir().join(format!("hk-introspect-stale-{}", std::process::id()));
        let _ = std::fs::create_dir_all(&dir);
        let path = dir.join("agent.sock");
        // Dropping a listener leaves its file behind: nobody answers there.
        drop(UnixListener::bind(&path).expect("bind"));
        let listener = bind(&path).expect("a stale socket is replaced");
        let _client = UnixStream::connect(&path).expect("the new socket answers");
        assert!(listener.accept().is_ok());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn the_socket_is_created_mode_0600() {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("hk-introspect-{}", std::process::id()));
        let _ = std::fs::create_dir_all(&dir);
        let path = dir.join("agent.sock");
        let _listener = bind(&path).expect("bind");
        let mode = std::fs::metadata(&path).expect("socket").permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
