//! The 8254 PIT, created in the kernel on the guest's first use.
//!
//! KVM's PIT costs a VM 8-16 ms at close (its teardown waits for SRCU grace
//! periods) and a kernel thread at creation, which is most of a small
//! guest's boot. So the VM starts without one, and this device claims the
//! PIT's ports (0x40-0x43, 0x61) on the I/O bus. The first access to any of
//! them creates the in-kernel PIT, exactly as it would have been at boot;
//! that access, which KVM did not see, is applied to the new PIT's state
//! (`registers`), and from then on KVM answers the ports itself, without
//! exits. A guest that never touches the ports never gets a PIT, and loses
//! nothing: KVM's PIT raises no interrupt until a guest programs it.
//!
//! If KVM cannot create the PIT, the ports behave as an open bus (reads
//! 0xff, writes dropped) and the failure is logged once; the VM runs on.

mod registers;

use std::sync::{Arc, Mutex};

use hypervisor::PitState;

use super::{DeviceAction, PioBus, PioDevice};
pub use registers::{PIT_BASE, PIT_PORTS, SPEAKER_PORT};

/// What the device needs from KVM; `hypervisor::Vm` in the VMM, a fake in tests.
pub trait PitBackend: Send + Sync {
    fn create_pit(&self) -> hypervisor::Result<()>;
    fn pit_state(&self) -> hypervisor::Result<PitState>;
    fn set_pit_state(&self, state: &PitState) -> hypervisor::Result<()>;
}

impl PitBackend for hypervisor::Vm {
    fn create_pit(&self) -> hypervisor::Result<()> {
        hypervisor::Vm::create_pit(self)
    }
    fn pit_state(&self) -> hypervisor::Result<PitState> {
        hypervisor::Vm::pit_state(self)
    }
    fn set_pit_state(&self, state: &PitState) -> hypervisor::Result<()> {
        hypervisor::Vm::set_pit_state(self, state)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    NotCreated,
    InKernel,
    Failed,
}

/// The PIT's ports until the in-kernel PIT exists.
pub struct OnDemandPit {
    backend: Arc<dyn PitBackend>,
    phase: Phase,
}

impl OnDemandPit {
    pub fn new(backend: Arc<dyn PitBackend>) -> Self {
        OnDemandPit { backend, phase: Phase::NotCreated }
    }

    /// Claims 0x40-0x43 and 0x61 on `bus`.
    pub fn attach(self, bus: &mut PioBus) {
        let pit = Arc::new(Mutex::new(self));
        bus.insert(PIT_BASE, PIT_PORTS, Arc::new(Mutex::new(PitPort { base: PIT_BASE, pit: pit.clone() })));
        bus.insert(SPEAKER_PORT, 1, Arc::new(Mutex::new(PitPort { base: SPEAKER_PORT, pit })));
    }

    /// Creates the in-kernel PIT and applies this access to it. After the
    /// first access KVM handles the ports; a later call only comes from a
    /// vCPU whose exit raced with the creation, and is applied the same way.
    /// Returns the byte a read gets, or `None` for an open bus.
    fn access(&mut self, port: u16, write: Option<u8>) -> Option<u8> {
        if self.phase == Phase::NotCreated {
            self.phase = match self.backend.create_pit() {
                Ok(()) => {
                    log::debug!("in-kernel PIT created at the guest's first access (port {port:#x})");
                    Phase::InKernel
                }
                Err(e) => {
                    log::warn!("cannot create the in-kernel PIT; its ports read as an open bus: {e}");
                    Phase::Failed
                }
            };
        }
        if self.phase == Phase::Failed {
            return None;
        }
        match self.replay(port, write) {
            Ok(value) => Some(value),
            Err(e) => {
                log::warn!("cannot apply the guest's access to port {port:#x} to the PIT: {e}");
                None
            }
        }
    }

    fn replay(&self, port: u16, write: Option<u8>) -> hypervisor::Result<u8> {
        let mut state = self.backend.pit_state()?;
        let outcome = registers::apply(&mut state, port, write);
        if outcome.changed {
            self.backend.set_pit_state(&state)?;
        }
        Ok(outcome.value)
    }
}

/// One of the PIT's two port ranges on the bus; offsets become port numbers.
struct PitPort {
    base: u16,
    pit: Arc<Mutex<OnDemandPit>>,
}

impl PitPort {
    fn pit(&self) -> std::sync::MutexGuard<'_, OnDemandPit> {
        // A poisoned lock means another vCPU panicked mid-access; the phase is still valid.
        self.pit.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl PioDevice for PitPort {
    fn read(&mut self, offset: u16, data: &mut [u8]) {
        // KVM's PIT answers one byte; wider reads get zeros above it, as from KVM.
        match self.pit().access(self.base + offset, None) {
            Some(value) => {
                data.fill(0);
                if let Some(first) = data.first_mut() {
                    *first = value;
                }
            }
            None => data.fill(0xff),
        }
    }

    fn write(&mut self, offset: u16, data: &[u8]) -> DeviceAction {
        if let Some(&byte) = data.first() {
            self.pit().access(self.base + offset, Some(byte));
        }
        DeviceAction::None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[derive(Default)]
    struct FakeKvm {
        creations: AtomicUsize,
        refuse: bool,
        state: Mutex<Option<PitState>>,
    }

    fn einval(op: &'static str) -> hypervisor::HypervisorError {
        hypervisor::HypervisorError::Ioctl { op, source: std::io::Error::from_raw_os_error(libc::EINVAL) }
    }

    impl PitBackend for FakeKvm {
        fn create_pit(&self) -> hypervisor::Result<()> {
            self.creations.fetch_add(1, Ordering::SeqCst);
            if self.refuse {
                return Err(einval("KVM_CREATE_PIT2"));
            }
            let mut s = PitState::default();
            for (i, c) in s.channels.iter_mut().enumerate() {
                c.mode = 0xff;
                c.gate = u8::from(i != 2);
                c.count = 0x10000;
            }
            *self.state.lock().expect("lock") = Some(s);
            Ok(())
        }
        fn pit_state(&self) -> hypervisor::Result<PitState> {
            (*self.state.lock().expect("lock")).ok_or_else(|| einval("KVM_GET_PIT2"))
        }
        fn set_pit_state(&self, state: &PitState) -> hypervisor::Result<()> {
            *self.state.lock().expect("lock") = Some(*state);
            Ok(())
        }
    }

    fn bus_with(kvm: &Arc<FakeKvm>) -> PioBus {
        let mut bus = PioBus::default();
        OnDemandPit::new(kvm.clone()).attach(&mut bus);
        bus
    }

    #[test]
    fn no_pit_until_the_guest_touches_its_ports() {
        let kvm = Arc::new(FakeKvm::default());
        let bus = bus_with(&kvm);
        let mut data = [0u8];
        bus.read(0x3f8, &mut data);
        assert_eq!(kvm.creations.load(Ordering::SeqCst), 0);
        bus.read(SPEAKER_PORT, &mut data);
        assert_eq!(kvm.creations.load(Ordering::SeqCst), 1);
        assert_eq!(data, [0], "a fresh PIT: speaker off, gate 2 low, output low");
    }

    #[test]
    fn the_first_access_lands_in_the_new_pit() {
        let kvm = Arc::new(FakeKvm::default());
        let bus = bus_with(&kvm);
        bus.write(0x43, &[0x34]);
        let state = kvm.pit_state().expect("created");
        assert_eq!((state.channels[0].mode, state.channels[0].rw_mode), (2, 3));
        // A vCPU that raced the creation is applied to the same state, not to a second PIT.
        bus.write(0x40, &[0x9c]);
        bus.write(0x40, &[0x2e]);
        assert_eq!(kvm.pit_state().expect("created").channels[0].count, 0x2e9c);
        assert_eq!(kvm.creations.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn a_pit_kvm_refuses_leaves_an_open_bus_and_is_not_retried() {
        let kvm = Arc::new(FakeKvm { refuse: true, ..Default::default() });
        let bus = bus_with(&kvm);
        let mut data = [0u8; 2];
        bus.read(0x40, &mut data);
        assert_eq!(data, [0xff, 0xff]);
        assert_eq!(bus.write(0x43, &[0x34]), DeviceAction::None);
        assert_eq!(kvm.creations.load(Ordering::SeqCst), 1);
    }
}
