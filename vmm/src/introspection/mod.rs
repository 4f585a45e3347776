//! Host introspection: a live agent on a Unix socket, in the spirit of KVMI
//! (`docs/introspection.md`).
//!
//! The `Hub` outlives VMs (a guest reboot builds a new VM; the agent stays
//! connected and its tracking is applied to the new VM before its vCPUs
//! start). Threads: `introspect-accept` accepts agents (one at a time; a
//! second one gets an `EBUSY` error line), `introspect-rx` reads one agent's
//! messages and runs its commands, `introspect-tx` writes asynchronous
//! events. vCPU threads write their own synchronous events and wait only for
//! their own replies; the VMM thread never touches the socket.

mod agent_events;
mod commands;
mod inbox;
pub mod link;
mod socket;
mod vcpu_requests;
mod vcpu_slot;

use std::collections::BTreeSet;
use std::io::Write;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{SyncSender, TrySendError};
use std::sync::{Arc, Mutex, MutexGuard, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::Duration;

use serde_json::{Value, json};

use inbox::Inbox;
use introspection_protocol::{self as protocol, AgentError, EventLine};
pub use link::AgentLink;
pub use socket::Introspection;

use crate::config::IntrospectionConfig;
use crate::heki::Enforcer;

/// Asynchronous events queued for the agent before newer ones are dropped (counted).
const ASYNC_QUEUE: usize = 1024;

#[derive(Debug, thiserror::Error)]
pub enum IntrospectionError {
    #[error("cannot create the introspection socket {path}")]
    Bind {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the introspection socket {path} is in use: another process (another VMM?) answers on it")]
    InUse { path: PathBuf },
    #[error("cannot start the introspection thread")]
    Spawn(#[source] std::io::Error),
}

/// What the host offers, for `hello`.
#[derive(Clone, Copy, Debug, Default)]
pub struct HostCaps {
    pub readonly_memory: bool,
    pub msr_filter: bool,
    pub guest_debug: bool,
}

/// Everything the agent asked to see; undone when it disconnects.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Tracking {
    /// Write-tracked guest page numbers.
    pub pages: BTreeSet<u64>,
    pub msrs: BTreeSet<u32>,
    pub hypercalls: bool,
    pub crs: bool,
    /// Per vCPU: single-step, hardware breakpoints (GVAs).
    pub debug: std::collections::BTreeMap<u8, (bool, Vec<u64>)>,
}

impl Tracking {
    pub fn tracks_range(&self, gpa: u64, len: u64) -> bool {
        let first = gpa >> heki::PAGE_SHIFT;
        let last = gpa.saturating_add(len.max(1) - 1) >> heki::PAGE_SHIFT;
        self.pages.range(first..=last).next().is_some()
    }

    /// Whether vCPU exits may become events (CR tracking reports at exits too).
    pub fn raises_events(&self) -> bool {
        !self.pages.is_empty() || !self.msrs.is_empty() || self.hypercalls || self.crs || !self.debug.is_empty()
    }

    /// The tracked pages as merged [start, end) ranges.
    pub fn page_ranges(&self) -> Vec<(u64, u64)> {
        let mut ranges: Vec<(u64, u64)> = Vec::new();
        for &page in &self.pages {
            match ranges.last_mut() {
                Some(last) if last.1 == page => last.1 = page + 1,
                _ => ranges.push((page, page + 1)),
            }
        }
        ranges
    }
}

/// Agent counters, for `vm.counters` and the `stats` command.
#[derive(Default)]
pub struct Counters {
    pub events: AtomicU64,
    pub replies: AtomicU64,
    pub timeouts: AtomicU64,
    pub dropped: AtomicU64,
    pub connections: AtomicU64,
    pub bad_messages: AtomicU64,
}

impl Counters {
    pub fn to_json(&self) -> Value {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        json!({
            "events": get(&self.events),
            "replies": get(&self.replies),
            "agent_timeouts": get(&self.timeouts),
            "events_dropped": get(&self.dropped),
            "connections": get(&self.connections),
            "bad_messages": get(&self.bad_messages),
        })
    }
}

#[derive(Default)]
struct Connection {
    /// Bumped at every connect and disconnect.
    generation: u64,
    connected: bool,
    async_tx: Option<SyncSender<String>>,
    /// The agent's incoming lines (a waiting vCPU may read its own reply).
    inbox: Option<Arc<Inbox>>,
}

/// The agent channel of one VMM.
pub struct Hub {
    pub(crate) reply_timeout: Duration,
    /// How long a vCPU polls for its reply before it sleeps.
    pub(crate) reply_poll: Duration,
    pub(crate) caps: HostCaps,
    socket: PathBuf,
    connection: Mutex<Connection>,
    /// Writes to the agent: one line at a time.
    out: Mutex<Option<UnixStream>>,
    tracking: RwLock<Tracking>,
    link: RwLock<Option<Arc<AgentLink>>>,
    /// Configured vCPUs and RAM (for `hello` before boot).
    pub(crate) vm_shape: Mutex<(usize, Vec<(u64, u64)>)>,
    /// Whether the configured VM runs heki (its doorbell carries hypercalls).
    pub(crate) heki_configured: AtomicBool,
    seq: AtomicU64,
    /// `Tracking::raises_events` of the current tracking.
    armed: AtomicBool,
    pub counters: Counters,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Hub {
    fn new(config: &IntrospectionConfig, caps: HostCaps) -> Hub {
        Hub {
            reply_timeout: Duration::from_millis(config.reply_timeout_ms),
            reply_poll: Duration::from_micros(config.reply_poll_us),
            caps,
            socket: config.socket.clone(),
            connection: Mutex::default(),
            out: Mutex::new(None),
            tracking: RwLock::default(),
            link: RwLock::new(None),
            vm_shape: Mutex::new((0, Vec::new())),
            heki_configured: AtomicBool::new(false),
            seq: AtomicU64::new(0),
            armed: AtomicBool::new(false),
            counters: Counters::default(),
        }
    }

    /// Records the shape of the VM about to be built (for `hello` before boot).
    fn set_vm_shape(&self, vcpus: usize, ram: Vec<(u64, u64)>, heki: bool) {
        *lock(&self.vm_shape) = (vcpus, ram);
        self.heki_configured.store(heki, Ordering::Relaxed);
    }

    pub fn tracking(&self) -> RwLockReadGuard<'_, Tracking> {
        self.tracking.read().unwrap_or_else(|p| p.into_inner())
    }

    fn tracking_mut(&self) -> RwLockWriteGuard<'_, Tracking> {
        self.tracking.write().unwrap_or_else(|p| p.into_inner())
    }

    pub fn link(&self) -> Option<Arc<AgentLink>> {
        self.link.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn next_seq(&self) -> u64 {
        self.seq.fetch_add(1, Ordering::Relaxed) + 1
    }

    /// The live connection's generation, if an agent is connected.
    fn connection(&self) -> Option<u64> {
        let c = lock(&self.connection);
        c.connected.then_some(c.generation)
    }

    /// The live connection's generation and incoming lines.
    fn inbox(&self) -> Option<(u64, Arc<Inbox>)> {
        let c = lock(&self.connection);
        if !c.connected {
            return None;
        }
        c.inbox.clone().map(|inbox| (c.generation, inbox))
    }

    /// Whether the agent has closed its connection (or there is none):
    /// work it queued is then dropped, as nobody can read its replies.
    pub(crate) fn agent_gone(&self) -> bool {
        self.inbox().is_none_or(|(_, inbox)| inbox.hung_up())
    }

    /// Writes one line to the agent, in one write (the agent wakes once);
    /// a failed write drops the connection.
    fn write_line(&self, mut line: String) -> bool {
        line.push('\n');
        let mut out = lock(&self.out);
        let Some(stream) = out.as_mut() else { return false };
        let ok = stream.write_all(line.as_bytes()).is_ok();
        if !ok {
            // The reader thread sees the shutdown and unhooks.
            let _ = stream.shutdown(std::net::Shutdown::Both);
            *out = None;
        }
        ok
    }

    /// Sends a synchronous event from a vCPU thread; the connection it went to.
    fn send_event(&self, seq: u64, event: EventLine) -> Option<u64> {
        let connection = self.connection()?;
        self.counters.events.fetch_add(1, Ordering::Relaxed);
        self.write_line(event.num("seq", seq).flag("reply_required", true).finish()).then_some(connection)
    }

    /// Whether the agent's tracking can raise events at vCPU exits (vCPUs
    /// then have KVM publish the CPL in the run page).
    pub fn events_armed(&self) -> bool {
        self.armed.load(Ordering::Relaxed)
    }

    /// Queues an event that needs no reply; never blocks (dropped and counted when full).
    pub fn send_async(&self, mut event: Value) {
        let connection = lock(&self.connection);
        let Some(tx) = connection.async_tx.as_ref() else { return };
        if let Value::Object(fields) = &mut event {
            fields.insert("seq".into(), json!(self.next_seq()));
        }
        match tx.try_send(event.to_string()) {
            Ok(()) => {
                self.counters.events.fetch_add(1, Ordering::Relaxed);
            }
            Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => {
                self.counters.dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// Hands a reply to the vCPU waiting on event `seq`; the agent hears
    /// when none does (late, or a wrong seq).
    fn deliver_reply(&self, seq: u64, action: protocol::Action) {
        let delivered = self.link().is_some_and(|link| link.deliver(seq, action));
        if delivered {
            self.counters.replies.fetch_add(1, Ordering::Relaxed);
        } else {
            self.counters.bad_messages.fetch_add(1, Ordering::Relaxed);
            let e = AgentError::new("ENOENT", format!("no vCPU waits for a reply to event {seq}"));
            self.write_line(json!({"reply": seq, "error": e.to_json()}).to_string());
        }
    }

    fn note_timeout(&self, vcpu: u8, seq: u64) {
        self.counters.timeouts.fetch_add(1, Ordering::Relaxed);
        log::warn!("introspection: the agent did not answer event {seq} (vCPU {vcpu}); the VM's policy decides");
        crate::events::emit("introspection", "agent-timeout", &[("vcpu", vcpu.to_string()), ("seq", seq.to_string())]);
    }

    /// Installs the agent's write tracking and MSR interception in `link`'s VM.
    fn apply_tracking(&self, link: &AgentLink, tracking: &Tracking) -> Result<(), AgentError> {
        link.traps
            .set_agent_pages(tracking.page_ranges())
            .map_err(|e| AgentError::new("ENOSPC", crate::error_chain(&e)))?;
        link.traps
            .set_agent_msrs(tracking.msrs.iter().copied().collect())
            .map_err(|e| AgentError::new("EIO", crate::error_chain(&e)))?;
        Ok(())
    }

    /// Changes the tracking atomically: applied to the VM first, recorded only if that worked.
    fn change_tracking(&self, change: impl FnOnce(&mut Tracking) -> Result<(), AgentError>) -> Result<(), AgentError> {
        let mut tracking = self.tracking_mut();
        let mut next = tracking.clone();
        change(&mut next)?;
        if let Some(link) = self.link() {
            if let Err(e) = self.apply_tracking(&link, &next) {
                // Put back what was installed.
                let _ = self.apply_tracking(&link, &tracking);
                return Err(e);
            }
            let vcpus: BTreeSet<u8> = next.debug.keys().chain(tracking.debug.keys()).copied().collect();
            for vcpu in vcpus {
                let wanted = next.debug.get(&vcpu).cloned().unwrap_or_default();
                if tracking.debug.get(&vcpu).cloned().unwrap_or_default() != wanted {
                    link.set_debug(vcpu, wanted.0, wanted.1);
                }
            }
        }
        self.armed.store(next.raises_events(), Ordering::Relaxed);
        *tracking = next;
        Ok(())
    }

    /// KVMI's unhook: everything the agent set is undone; waiting vCPUs resume.
    fn unhook(&self) {
        {
            let mut c = lock(&self.connection);
            c.connected = false;
            c.generation += 1;
            c.async_tx = None;
            c.inbox = None;
        }
        if let Some(stream) = lock(&self.out).take() {
            let _ = stream.shutdown(std::net::Shutdown::Both);
        }
        let mut tracking = self.tracking_mut();
        *tracking = Tracking::default();
        self.armed.store(false, Ordering::Relaxed);
        if let Some(link) = self.link() {
            if let Err(e) = self.apply_tracking(&link, &tracking) {
                log::error!("introspection: cannot undo the agent's tracking: {e}");
            }
            link.unhook();
        }
        crate::events::emit("introspection", "disconnected", &[]);
    }
}

impl Hub {
    /// Connects a freshly built VM (before its vCPUs run): the agent's
    /// tracking is installed and the violations `enforcer` records are forwarded.
    pub fn attach(self: &Arc<Self>, link: Arc<AgentLink>, enforcer: &Enforcer) {
        let tracking = self.tracking().clone();
        if let Err(e) = self.apply_tracking(&link, &tracking) {
            log::error!("introspection: cannot install the agent's tracking in the new VM: {e}");
        }
        for (&vcpu, (step, bps)) in &tracking.debug {
            link.set_debug(vcpu, *step, bps.clone());
        }
        let hub = Arc::downgrade(self);
        enforcer.set_observer(Box::new(move |record| {
            if let Some(hub) = hub.upgrade() {
                hub.send_async(violation_event(record));
            }
        }));
        *self.link.write().unwrap_or_else(|p| p.into_inner()) = Some(link);
        self.send_async(json!({"event": "vm", "state": "created"}));
    }

    /// The VM is gone (shutdown or reboot).
    pub fn detach(&self, link: &AgentLink) {
        let mut current = self.link.write().unwrap_or_else(|p| p.into_inner());
        if current.as_ref().is_some_and(|l| std::ptr::eq(Arc::as_ptr(l), link)) {
            *current = None;
            drop(current);
            self.send_async(json!({"event": "vm", "state": "stopped"}));
        }
    }
}

/// A heki violation as the agent sees it: the fields every event has, as
/// numbers (`vcpu`, `rip`, `cpl` when a vCPU caused it and they are known),
/// and heki's details with numbers as numbers.
fn violation_event(record: &heki::ViolationRecord) -> Value {
    let mut event = serde_json::Map::new();
    event.insert("event".into(), json!("heki-violation"));
    event.insert("kind".into(), json!(record.kind.as_str()));
    event.insert("action".into(), json!(record.action.as_str()));
    let fields = [
        ("vcpu", record.vcpu.map(u64::from)),
        ("rip", record.rip),
        ("gpa", record.gpa),
        ("size", record.size),
        ("length", record.length),
    ];
    for (name, value) in fields {
        if let Some(value) = value {
            event.insert(name.into(), json!(value));
        }
    }
    for (name, value) in &record.details {
        // heki writes numbers in its details as hex ("0x…") or decimal strings.
        let number = match value.strip_prefix("0x") {
            Some(hex) => u64::from_str_radix(hex, 16).ok(),
            None => value.parse::<u64>().ok(),
        };
        let value = match number {
            Some(n) if name != "device" => json!(n),
            _ => json!(value),
        };
        event.entry(name.clone()).or_insert(value);
    }
    Value::Object(event)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tracked_ranges_cover_every_page_a_write_touches() {
        let tracking = Tracking { pages: [5, 6, 9].into_iter().collect(), ..Tracking::default() };
        assert!(tracking.tracks_range(0x5ff8, 8));
        assert!(tracking.tracks_range(0x4ffc, 8), "straddles into page 5");
        assert!(!tracking.tracks_range(0x7000, 8));
        assert_eq!(tracking.page_ranges(), vec![(5, 7), (9, 10)]);
    }

    #[test]
    fn a_violation_event_has_numbers_as_numbers() {
        let mut record = heki::ViolationRecord::new(heki::ViolationKind::Hypercall, heki::RecordedAction::Denied);
        record.vcpu = Some(1);
        record.rip = Some(0xffff_ffff_8100_0000);
        record.details.insert("cpl".into(), "3".into());
        record.details.insert("device".into(), "_rng".into());
        record.details.insert("pinned".into(), "0x10".into());
        assert_eq!(
            violation_event(&record),
            json!({"event": "heki-violation", "kind": "hypercall", "action": "denied", "vcpu": 1,
                   "rip": 0xffff_ffff_8100_0000_u64, "cpl": 3, "device": "_rng", "pinned": 16})
        );
    }
}
