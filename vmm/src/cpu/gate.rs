//! Keeping vCPUs out of guest mode: for VM pause and for memslot changes.
//!
//! A vCPU holds a read guard of `in_guest` for exactly the duration of
//! `KVM_RUN`. `pause_all` raises the pause count, then kicks vCPU threads with
//! a signal until it can take the write guard: at that moment no vCPU is in
//! guest mode, and none can re-enter until the count drops to zero.

use std::sync::{Condvar, Mutex, RwLock, RwLockReadGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use vmm_sys_util::signal::Killable;

use super::kick::kick_signal;

const KICK_RETRY: Duration = Duration::from_micros(200);

#[derive(Debug, thiserror::Error)]
#[error("vCPUs did not leave guest mode within {0:?}")]
pub struct GateTimeout(pub Duration);

#[derive(Default)]
pub struct VcpuGate {
    in_guest: RwLock<()>,
    pause_depth: Mutex<u32>,
    resumed: Condvar,
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

    fn threads_lock(&self) -> std::sync::MutexGuard<'_, Vec<libc::pthread_t>> {
        self.threads.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn depth(&self) -> std::sync::MutexGuard<'_, u32> {
        self.pause_depth.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Called by a vCPU thread before `KVM_RUN`: waits while paused, then
    /// returns the guard to hold across the run.
    pub fn enter_guest(&self) -> RwLockReadGuard<'_, ()> {
        loop {
            {
                let mut depth = self.depth();
                while *depth > 0 {
                    depth = self.resumed.wait(depth).unwrap_or_else(|p| p.into_inner());
                }
            }
            let guard = self.in_guest.read().unwrap_or_else(|p| p.into_inner());
            if *self.depth() == 0 {
                return guard;
            }
        }
    }

    /// Whether a pause is requested (a vCPU thread checks this after a kick).
    pub fn pause_requested(&self) -> bool {
        *self.depth() > 0
    }

    /// Stops all vCPUs from running guest code; returns once none is in guest mode.
    pub fn pause_all(&self, timeout: Duration) -> Result<(), GateTimeout> {
        *self.depth() += 1;
        let deadline = Instant::now() + timeout;
        loop {
            if self.in_guest.try_write().is_ok() {
                return Ok(());
            }
            for &thread in self.threads_lock().iter() {
                kick_thread(thread);
            }
            if Instant::now() >= deadline {
                self.resume_all();
                return Err(GateTimeout(timeout));
            }
            std::thread::sleep(KICK_RETRY);
        }
    }

    /// Undoes one `pause_all`.
    pub fn resume_all(&self) {
        let mut depth = self.depth();
        *depth = depth.saturating_sub(1);
        if *depth == 0 {
            self.resumed.notify_all();
        }
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

    #[test]
    fn pause_blocks_entry_until_resume() {
        let gate = Arc::new(VcpuGate::default());
        gate.pause_all(Duration::from_secs(1)).expect("no vCPU is running");
        let entered = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (g, e) = (gate.clone(), entered.clone());
        let t = std::thread::spawn(move || {
            let _guard = g.enter_guest();
            e.store(true, std::sync::atomic::Ordering::SeqCst);
        });
        std::thread::sleep(Duration::from_millis(50));
        assert!(!entered.load(std::sync::atomic::Ordering::SeqCst));
        gate.resume_all();
        t.join().expect("thread");
        assert!(entered.load(std::sync::atomic::Ordering::SeqCst));
    }

    #[test]
    fn pause_times_out_while_a_vcpu_stays_in_guest() {
        let gate = VcpuGate::default();
        let _in_guest = gate.enter_guest();
        assert!(gate.pause_all(Duration::from_millis(20)).is_err());
        assert!(!gate.pause_requested());
    }
}
