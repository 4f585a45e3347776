//! Keeping vCPUs out of guest mode: for a VM pause and for heki changes.
//!
//! A vCPU holds a read guard of `in_guest` for exactly the duration of
//! `KVM_RUN`. The gate is closed by a pause (a flag: pausing twice is one
//! pause, and one resume opens it) or by holds (counted: heki's memslot
//! changes and host pins nest). Closing kicks vCPU threads with a signal
//! until the write guard can be taken: then no vCPU is in guest mode, and
//! none re-enters until the gate opens. Waiting vCPUs still wake to serve
//! requests posted for them (`notify`).

use std::sync::{Condvar, Mutex, MutexGuard, RwLock, RwLockReadGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use vmm_sys_util::signal::Killable;

use super::kick::kick_signal;

const KICK_RETRY: Duration = Duration::from_micros(200);
/// A waiting vCPU re-checks its state at least this often.
const WAIT_SLICE: Duration = Duration::from_millis(100);

#[derive(Debug, thiserror::Error)]
#[error("vCPUs did not leave guest mode within {0:?}")]
pub struct GateTimeout(pub Duration);

#[derive(Default)]
struct GateState {
    paused: bool,
    holds: u32,
    stopping: bool,
    /// Bumped by `notify` so waiters see requests posted since they looked.
    generation: u64,
}

/// What a vCPU thread may do next.
pub enum Entry<'a> {
    /// Run the guest, holding the guard across `KVM_RUN`.
    Run(RwLockReadGuard<'a, ()>),
    /// The VM is paused: re-enter once with `immediate_exit` so KVM finishes
    /// the half-done exit, then wait.
    Complete(RwLockReadGuard<'a, ()>),
    /// Wait (`wait`), then ask again.
    Wait,
    /// The VM is being torn down.
    Stop,
}

#[derive(Default)]
pub struct VcpuGate {
    in_guest: RwLock<()>,
    state: Mutex<GateState>,
    changed: Condvar,
    threads: Mutex<Vec<libc::pthread_t>>,
}

impl VcpuGate {
    /// Registers a vCPU thread to be kicked.
    pub fn register_thread<T>(&self, handle: &JoinHandle<T>) {
        self.threads_lock().push(handle.pthread_handle());
    }

    pub fn clear_threads(&self) {
        self.threads_lock().clear();
    }

    fn threads_lock(&self) -> MutexGuard<'_, Vec<libc::pthread_t>> {
        self.threads.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn state(&self) -> MutexGuard<'_, GateState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Called by a vCPU thread before `KVM_RUN`. `needs_completion`: the last
    /// exit (PIO, MMIO, MSR) is only finished by the next `KVM_RUN`.
    pub fn enter(&self, needs_completion: bool) -> Entry<'_> {
        let guard = self.in_guest.read().unwrap_or_else(|p| p.into_inner());
        let state = self.state();
        match (state.stopping, state.holds, state.paused) {
            (true, _, _) => Entry::Stop,
            (false, 0, false) => Entry::Run(guard),
            (false, 0, true) if needs_completion => Entry::Complete(guard),
            _ => Entry::Wait,
        }
    }

    /// Blocks a vCPU thread until the gate opens, the VM stops, or `notify`
    /// is called (bounded, so callers re-check what they wait for).
    pub fn wait(&self, has_request: impl Fn() -> bool) {
        let mut state = self.state();
        let seen = state.generation;
        let deadline = Instant::now() + WAIT_SLICE;
        while !state.stopping && (state.paused || state.holds > 0) && state.generation == seen && !has_request() {
            let now = Instant::now();
            if now >= deadline {
                return;
            }
            state = self.changed.wait_timeout(state, deadline - now).unwrap_or_else(|p| p.into_inner()).0;
        }
    }

    /// Pauses the VM's vCPUs; true if this call closed the gate (a second
    /// pause is the same pause). Returns at once; `wait_out_of_guest` waits.
    pub fn pause(&self) -> bool {
        let was_paused = std::mem::replace(&mut self.state().paused, true);
        self.kick_all();
        !was_paused
    }

    pub fn is_paused(&self) -> bool {
        self.state().paused
    }

    /// Whether the VM is being torn down (waits elsewhere must end).
    pub fn is_stopping(&self) -> bool {
        self.state().stopping
    }

    /// Opens the gate after a pause (holds still apply).
    pub fn resume(&self) {
        self.state().paused = false;
        self.changed.notify_all();
    }

    /// Closes the gate for a change of the VM under the vCPUs; returns once
    /// none is in guest mode. Holds nest and do not touch the pause flag.
    pub fn hold(&self, timeout: Duration) -> Result<(), GateTimeout> {
        self.state().holds += 1;
        let result = self.wait_out_of_guest(timeout);
        if result.is_err() {
            self.release();
        }
        result
    }

    pub fn release(&self) {
        let mut state = self.state();
        state.holds = state.holds.saturating_sub(1);
        drop(state);
        self.changed.notify_all();
    }

    /// Kicks vCPUs until none is in guest mode (the gate must be closed).
    pub fn wait_out_of_guest(&self, timeout: Duration) -> Result<(), GateTimeout> {
        let deadline = Instant::now() + timeout;
        loop {
            if self.in_guest.try_write().is_ok() {
                return Ok(());
            }
            self.kick_all();
            if Instant::now() >= deadline {
                return Err(GateTimeout(timeout));
            }
            std::thread::sleep(KICK_RETRY);
        }
    }

    /// Wakes waiting vCPUs so they look at requests posted for them.
    pub fn notify(&self) {
        self.state().generation += 1;
        self.changed.notify_all();
    }

    /// Makes every vCPU thread return (VM teardown).
    pub fn stop(&self) {
        self.state().stopping = true;
        self.changed.notify_all();
        self.kick_all();
    }

    /// Kicks every vCPU out of `KVM_RUN` once (for exits and periodic checks).
    pub fn kick_all(&self) {
        for &thread in self.threads_lock().iter() {
            kick_thread(thread);
        }
    }
}

fn kick_thread(thread: libc::pthread_t) {
    // SAFETY: pthread_kill only sends a signal; the handler installed for the
    // kick signal does nothing but interrupt KVM_RUN. A thread that has exited
    // but not been joined still has a valid pthread_t.
    let _ = unsafe { libc::pthread_kill(thread, kick_signal()) };
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};

    fn runs(gate: &VcpuGate) -> bool {
        matches!(gate.enter(false), Entry::Run(_))
    }

    #[test]
    fn pause_blocks_entry_until_resume() {
        let gate = Arc::new(VcpuGate::default());
        assert!(gate.pause());
        let entered = Arc::new(AtomicBool::new(false));
        let (g, e) = (gate.clone(), entered.clone());
        let t = std::thread::spawn(move || {
            while !runs(&g) {
                g.wait(|| false);
            }
            e.store(true, Ordering::SeqCst);
        });
        std::thread::sleep(Duration::from_millis(50));
        assert!(!entered.load(Ordering::SeqCst));
        gate.resume();
        t.join().expect("thread");
        assert!(entered.load(Ordering::SeqCst));
    }

    #[test]
    fn two_pauses_are_one_pause_and_one_resume_opens() {
        let gate = VcpuGate::default();
        assert!(gate.pause(), "the first pause closes the gate");
        assert!(!gate.pause(), "the second is the same pause");
        gate.resume();
        assert!(runs(&gate));
    }

    #[test]
    fn a_hold_outlives_a_resume_and_holds_nest() {
        let gate = VcpuGate::default();
        gate.hold(Duration::from_secs(1)).expect("no vCPU runs");
        gate.hold(Duration::from_secs(1)).expect("nested");
        gate.pause();
        gate.resume();
        assert!(!runs(&gate), "still held");
        gate.release();
        assert!(!runs(&gate), "one hold left");
        gate.release();
        assert!(runs(&gate));
    }

    #[test]
    fn a_paused_vcpu_with_a_half_done_exit_completes_it_first() {
        let gate = VcpuGate::default();
        gate.pause();
        assert!(matches!(gate.enter(true), Entry::Complete(_)));
        assert!(matches!(gate.enter(false), Entry::Wait));
        gate.hold(Duration::from_secs(1)).expect("no vCPU runs");
        assert!(matches!(gate.enter(true), Entry::Wait), "not while held: memslots may be changing");
    }

    #[test]
    fn hold_times_out_while_a_vcpu_stays_in_guest_and_is_undone() {
        let gate = VcpuGate::default();
        let in_guest = gate.enter(false);
        assert!(gate.hold(Duration::from_millis(20)).is_err());
        drop(in_guest);
        assert!(runs(&gate), "the failed hold was released");
    }

    #[test]
    fn notify_wakes_a_waiting_vcpu_for_its_request() {
        let gate = Arc::new(VcpuGate::default());
        gate.hold(Duration::from_secs(1)).expect("no vCPU runs");
        let request = Arc::new(AtomicBool::new(false));
        let (g, r) = (gate.clone(), request.clone());
        let started = Instant::now();
        let t = std::thread::spawn(move || g.wait(|| r.load(Ordering::SeqCst)));
        std::thread::sleep(Duration::from_millis(10));
        request.store(true, Ordering::SeqCst);
        gate.notify();
        t.join().expect("thread");
        assert!(started.elapsed() < WAIT_SLICE, "woken by notify, not by the time slice");
    }

    #[test]
    fn stop_ends_every_wait() {
        let gate = VcpuGate::default();
        gate.pause();
        gate.stop();
        assert!(matches!(gate.enter(true), Entry::Stop));
    }
}
