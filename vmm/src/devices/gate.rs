//! Keeping device workers from processing queues while the VM is paused.
//! A worker brackets each batch of work with `begin`; `pause` waits until no
//! batch is in progress, and `begin` blocks while paused.

use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

const WAIT_SLICE: Duration = Duration::from_millis(100);

#[derive(Debug, thiserror::Error)]
#[error("device workers did not finish their requests within {0:?}")]
pub struct DevicePauseTimeout(pub Duration);

#[derive(Default)]
struct State {
    paused: bool,
    stopping: bool,
    active: u32,
}

#[derive(Default)]
pub struct DeviceGate {
    state: Mutex<State>,
    changed: Condvar,
}

/// One batch of device work; the gate counts it until dropped.
pub struct Active<'a>(&'a DeviceGate);

impl Drop for Active<'_> {
    fn drop(&mut self) {
        let mut state = self.0.state();
        state.active = state.active.saturating_sub(1);
        drop(state);
        self.0.changed.notify_all();
    }
}

impl DeviceGate {
    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Starts a batch of work, waiting while the VM is paused; `None` once
    /// the VM is being torn down.
    pub fn begin(&self) -> Option<Active<'_>> {
        let mut state = self.state();
        while state.paused && !state.stopping {
            // Bounded waits: a missed wake-up costs a slice, never a hang.
            state = self.changed.wait_timeout(state, WAIT_SLICE).unwrap_or_else(|p| p.into_inner()).0;
        }
        if state.stopping {
            return None;
        }
        state.active += 1;
        Some(Active(self))
    }

    /// Whether a worker should stop taking requests (checked between requests).
    pub fn is_paused(&self) -> bool {
        let state = self.state();
        state.paused || state.stopping
    }

    /// Stops new work at once; does not wait (a worker may call this itself).
    pub fn close(&self) {
        self.state().paused = true;
    }

    /// Stops new work and waits until no batch is in progress.
    pub fn pause(&self, timeout: Duration) -> Result<(), DevicePauseTimeout> {
        let deadline = Instant::now() + timeout;
        let mut state = self.state();
        state.paused = true;
        while state.active > 0 {
            let now = Instant::now();
            if now >= deadline {
                return Err(DevicePauseTimeout(timeout));
            }
            state = self.changed.wait_timeout(state, deadline - now).unwrap_or_else(|p| p.into_inner()).0;
        }
        Ok(())
    }

    pub fn resume(&self) {
        self.state().paused = false;
        self.changed.notify_all();
    }

    /// Releases every waiting worker for good (VM teardown).
    pub fn stop(&self) {
        self.state().stopping = true;
        self.changed.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn pause_waits_for_the_batch_in_progress_and_blocks_the_next() {
        let gate = Arc::new(DeviceGate::default());
        let batch = gate.begin().expect("running");
        assert!(gate.pause(Duration::from_millis(20)).is_err(), "a batch is in progress");
        drop(batch);
        gate.pause(Duration::from_secs(1)).expect("idle now");
        let g = gate.clone();
        let worker = std::thread::spawn(move || g.begin().is_some());
        std::thread::sleep(Duration::from_millis(30));
        assert!(!worker.is_finished(), "no work while paused");
        gate.resume();
        assert!(worker.join().expect("worker"));
    }

    #[test]
    fn stop_releases_a_paused_worker_without_work() {
        let gate = DeviceGate::default();
        gate.close();
        gate.stop();
        assert!(gate.begin().is_none());
        assert!(gate.is_paused());
    }
}
