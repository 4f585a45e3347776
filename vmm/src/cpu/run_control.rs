//! The VM's run control: the gates that keep vCPUs out of guest mode and
//! device workers off their queues, and the channel to the VMM thread, which
//! alone owns the run state (`VmState`). Any thread may ask for a pause or a
//! shutdown after a violation; asking twice is asking once.

use std::sync::mpsc::Sender;
use std::sync::{Arc, Mutex};

use heki::Outcome;
use vmm_sys_util::eventfd::EventFd;

use super::VcpuEvent;
use super::gate::{GateTimeout, VcpuGate};
use crate::devices::gate::{DeviceGate, DevicePauseTimeout};
use crate::traps::ports::{HoldTimeout, RunControl};

/// How long a pause, a hold or a teardown may wait for vCPUs and devices.
pub const VCPU_STOP_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum PauseError {
    #[error(transparent)]
    Vcpus(#[from] GateTimeout),
    #[error(transparent)]
    Devices(#[from] DevicePauseTimeout),
}

pub struct VmControl {
    pub vcpus: VcpuGate,
    pub devices: Arc<DeviceGate>,
    events: Mutex<Sender<VcpuEvent>>,
    events_wake: EventFd,
}

impl VmControl {
    pub fn new(events: Sender<VcpuEvent>, events_wake: EventFd) -> Self {
        VmControl { vcpus: VcpuGate::default(), devices: Arc::default(), events: Mutex::new(events), events_wake }
    }

    /// Tells the VMM thread.
    pub fn report(&self, event: VcpuEvent) {
        let sent = self.events.lock().map(|tx| tx.send(event).is_ok()).unwrap_or(false);
        if sent {
            let _ = self.events_wake.write(1);
        }
    }

    /// Stops the VM: vCPUs out of guest mode (half-done exits finished
    /// first) and device workers idle. Called by the VMM thread.
    pub fn pause(&self) -> Result<(), PauseError> {
        self.vcpus.pause();
        self.devices.close();
        let result = self
            .vcpus
            .wait_out_of_guest(VCPU_STOP_TIMEOUT)
            .map_err(PauseError::from)
            .and_then(|()| self.devices.pause(VCPU_STOP_TIMEOUT).map_err(PauseError::from));
        if result.is_err() {
            self.resume();
        }
        result
    }

    /// Whether the VM is paused, by `pause` or by a violation: the vCPU gate
    /// is the one record of it (the device gate follows it).
    pub fn is_paused(&self) -> bool {
        self.vcpus.is_paused()
    }

    pub fn resume(&self) {
        self.devices.resume();
        self.vcpus.resume();
    }

    /// Ends every vCPU and device wait for good (VM teardown).
    pub fn stop(&self) {
        self.vcpus.stop();
        self.devices.stop();
    }
}

impl RunControl for VmControl {
    fn hold_vcpus(&self) -> Result<(), HoldTimeout> {
        self.vcpus.hold(VCPU_STOP_TIMEOUT).map_err(|e| HoldTimeout(e.0))
    }

    fn release_vcpus(&self) {
        self.vcpus.release();
    }

    fn notify_vcpus(&self) {
        self.vcpus.notify();
    }

    fn stop_for_violation(&self, outcome: Outcome, source: &str) {
        // Close both gates at once, before the VMM thread hears of it, so the
        // guest and the devices do nothing more in between.
        let first = self.vcpus.pause();
        self.devices.close();
        match outcome {
            Outcome::Pause if first => self.report(VcpuEvent::HekiPaused { source: source.to_string() }),
            Outcome::Shutdown => self.report(VcpuEvent::HekiShutdown { source: source.to_string() }),
            Outcome::Pause | Outcome::Continue => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn control() -> (VmControl, std::sync::mpsc::Receiver<VcpuEvent>) {
        let (tx, rx) = std::sync::mpsc::channel();
        let wake = EventFd::new(libc::EFD_NONBLOCK).expect("eventfd");
        (VmControl::new(tx, wake), rx)
    }

    #[test]
    fn two_vcpus_trapping_at_once_make_one_pause_and_one_resume_continues() {
        let (control, events) = control();
        std::thread::scope(|s| {
            s.spawn(|| control.stop_for_violation(Outcome::Pause, "vcpu 0"));
            s.spawn(|| control.stop_for_violation(Outcome::Pause, "vcpu 1"));
        });
        let reported: Vec<_> = events.try_iter().collect();
        assert_eq!(reported.len(), 1, "one pause: {reported:?}");
        assert!(control.vcpus.is_paused() && control.devices.is_paused());
        control.resume();
        assert!(!control.vcpus.is_paused() && !control.devices.is_paused());
    }

    #[test]
    fn a_heki_pause_while_the_user_paused_adds_nothing_to_undo() {
        let (control, events) = control();
        control.pause().expect("no vCPU or device runs");
        control.stop_for_violation(Outcome::Pause, "_rng");
        assert_eq!(events.try_iter().count(), 0);
        control.resume();
        assert!(!control.vcpus.is_paused());
    }

    #[test]
    fn shutdown_closes_the_gates_and_tells_the_vmm_thread() {
        let (control, events) = control();
        control.stop_for_violation(Outcome::Shutdown, "_disk0");
        assert!(control.vcpus.is_paused() && control.devices.is_paused());
        assert!(matches!(events.try_recv(), Ok(VcpuEvent::HekiShutdown { source }) if source == "_disk0"));
    }
}
