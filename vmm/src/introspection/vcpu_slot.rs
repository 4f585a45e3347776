//! One vCPU's mailbox with the agent: requests to run on its thread, the
//! event it waits on, pause and debug settings.

use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::Duration;

use hypervisor::Vcpu;
use introspection_protocol::{Action, AgentResult};

/// A waiting vCPU re-checks the connection and the VM's state this often.
pub(super) const WAIT_SLICE: Duration = Duration::from_millis(50);

/// Work for one vCPU's own thread (its registers are only reachable there).
pub type Request = Box<dyn FnOnce(&mut Vcpu) -> AgentResult + Send>;

#[derive(Default)]
pub(super) struct SlotState {
    pub(super) request: Option<Request>,
    pub(super) result: Option<AgentResult>,
    /// The event this vCPU waits on, and the agent's answer once it came.
    pub(super) waiting: Option<u64>,
    pub(super) answer: Option<Action>,
    /// Paused by the agent; `parked` once the vCPU thread noticed.
    pub(super) paused: bool,
    pub(super) parked: bool,
    /// Debug settings to apply before the next entry.
    pub(super) debug: Option<(bool, Vec<u64>)>,
    /// The debug settings in force on the vCPU (single-step, breakpoints).
    pub(super) applied: (bool, Vec<u64>),
    /// Stepping over a breakpoint just answered: breakpoints are off for
    /// one single step, then `applied` is put back.
    pub(super) stepping_over: bool,
    /// CR0, CR3, CR4 last seen (CR tracking).
    pub(super) crs: Option<[u64; 3]>,
    /// A vCPU thread serves this slot (not yet for a vCPU the host may add later).
    pub(super) has_thread: bool,
}

#[derive(Default)]
pub(super) struct VcpuSlot {
    pub(super) state: Mutex<SlotState>,
    pub(super) changed: Condvar,
}

impl VcpuSlot {
    pub(super) fn lock(&self) -> MutexGuard<'_, SlotState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}
