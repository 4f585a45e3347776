//! vCPUs the guest gave back (CPU hot-unplug). KVM cannot destroy a vCPU,
//! so a removed vCPU's thread rests here, outside `KVM_RUN`, until the host
//! adds it again; it then starts over as a CPU waiting for INIT and SIPI.
//! Parking and unparking are the VMM thread's; resting is the vCPU's own.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// How long a resting vCPU sleeps before it looks at the VM's state again.
const REST_SLICE: Duration = Duration::from_millis(50);

#[derive(Default)]
struct ParkState {
    /// The vCPU thread is resting (out of `KVM_RUN`).
    resting: [u64; 4],
    /// The vCPU was added again and must start over.
    restart: [u64; 4],
}

fn bit(set: &mut [u64; 4], id: u8) -> (&mut u64, u64) {
    (&mut set[usize::from(id / 64)], 1u64 << (id % 64))
}

fn has(set: &[u64; 4], id: u8) -> bool {
    set[usize::from(id / 64)] & (1u64 << (id % 64)) != 0
}

fn put(set: &mut [u64; 4], id: u8, on: bool) {
    let (word, mask) = bit(set, id);
    if on {
        *word |= mask;
    } else {
        *word &= !mask;
    }
}

#[derive(Default)]
pub struct VcpuParking {
    /// Bit per vCPU id: the host wants it out of the guest. Atomic: every
    /// vCPU looks at its bit before each `KVM_RUN`.
    parked: [AtomicU64; 4],
    state: Mutex<ParkState>,
    changed: Condvar,
}

impl VcpuParking {
    fn state(&self) -> MutexGuard<'_, ParkState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn parked_word(&self, id: u8) -> (&AtomicU64, u64) {
        (&self.parked[usize::from(id / 64)], 1u64 << (id % 64))
    }

    /// The host takes vCPU `id` out of the guest (kick it afterwards).
    pub fn park(&self, id: u8) {
        let (word, mask) = self.parked_word(id);
        word.fetch_or(mask, Ordering::SeqCst);
    }

    /// The host adds vCPU `id` again: it leaves its rest and starts over.
    pub fn unpark(&self, id: u8) {
        let mut state = self.state();
        let (word, mask) = self.parked_word(id);
        word.fetch_and(!mask, Ordering::SeqCst);
        put(&mut state.restart, id, true);
        drop(state);
        self.changed.notify_all();
    }

    pub fn is_parked(&self, id: u8) -> bool {
        let (word, mask) = self.parked_word(id);
        word.load(Ordering::SeqCst) & mask != 0
    }

    /// Wakes every resting vCPU so it looks at the VM's state (teardown).
    pub fn wake_all(&self) {
        self.changed.notify_all();
    }

    /// Waits up to `timeout` until vCPU `id`'s thread rests.
    pub fn wait_resting(&self, id: u8, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut state = self.state();
        while !has(&state.resting, id) {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            state = self.changed.wait_timeout(state, left).unwrap_or_else(|p| p.into_inner()).0;
        }
        true
    }

    /// The vCPU thread of `id` rests while parked and `keep_resting` holds,
    /// calling `serve` at each wake-up (requests posted for it). Returns
    /// whether the vCPU must start over (it was added again).
    pub fn rest(&self, id: u8, keep_resting: impl Fn() -> bool, mut serve: impl FnMut()) -> bool {
        let mut state = self.state();
        put(&mut state.resting, id, true);
        self.changed.notify_all();
        while self.is_parked(id) && keep_resting() {
            drop(state);
            serve();
            state = self.state();
            if !self.is_parked(id) {
                break;
            }
            state = self.changed.wait_timeout(state, REST_SLICE).unwrap_or_else(|p| p.into_inner()).0;
        }
        put(&mut state.resting, id, false);
        let restart = has(&state.restart, id);
        put(&mut state.restart, id, false);
        restart
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn a_parked_vcpu_rests_until_unparked_and_then_starts_over() {
        let parking = Arc::new(VcpuParking::default());
        parking.park(200);
        let vcpu = {
            let parking = parking.clone();
            std::thread::spawn(move || parking.rest(200, || true, || {}))
        };
        assert!(parking.wait_resting(200, Duration::from_secs(10)));
        assert!(parking.is_parked(200));
        parking.unpark(200);
        assert!(vcpu.join().expect("vCPU thread"), "an unparked vCPU starts over");
        assert!(!parking.is_parked(200));
        assert!(!parking.wait_resting(200, Duration::from_millis(1)));
    }

    #[test]
    fn a_stopping_vm_ends_the_rest_without_a_restart() {
        let parking = VcpuParking::default();
        parking.park(3);
        let mut served = 0;
        assert!(!parking.rest(3, || false, || served += 1));
        assert!(!parking.rest(4, || true, || served += 1), "vCPU 4 is not parked");
        assert_eq!(served, 0);
    }
}
