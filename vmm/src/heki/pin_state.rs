//! The pins' state: what each vCPU has pinned, and the mailbox through which
//! a host-side pin (`vm.heki-pin`) reaches the vCPU threads. `pins.rs`
//! checks and changes it on the exit path.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::Instant;

use heki::VcpuPins;
use heki::pins::{ControlRegister, DescriptorTable, PinError};

/// A host-side pin request (`vm.heki-pin`), served by each vCPU thread on its
/// own registers while every vCPU is held out of guest mode. `apply == false`
/// only validates.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PinRequest {
    pub cr0: u64,
    pub cr4: u64,
    pub msrs: Vec<u32>,
    pub apply: bool,
}

/// Why a host-side pin (`vm.heki-pin`) was refused; the API answers 400 with it.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum HostPinError {
    #[error("vCPU {vcpu}: cannot read its registers: {reason}")]
    Registers { vcpu: u8, reason: String },
    #[error("vCPU {vcpu}: {register}: {source}")]
    Cr { vcpu: u8, register: &'static str, source: PinError },
    #[error("vCPU {vcpu}: MSR {index:#x}: {reason}")]
    MsrUnreadable { vcpu: u8, index: u32, reason: String },
    #[error("vCPU {vcpu}: {source}")]
    Msr { vcpu: u8, source: PinError },
    #[error("{0}")]
    Hold(String),
    #[error("vCPUs did not answer the pin request (is the VM running?)")]
    NoAnswer,
    #[error("cannot install the MSR filter: {0}")]
    Filter(String),
}

/// A descriptor-table register and the (base, limit) last reported for it.
pub(super) type LoggedDtr = (DescriptorTable, (u64, u16));

/// Per-vCPU pin state plus the mailbox for host-side requests.
pub struct PinState {
    pub(super) pins: Vec<Mutex<VcpuPins>>,
    pub(super) has_cr_pins: Vec<AtomicBool>,
    /// vCPUs the host added after boot, to take vCPU 0's CR pins once they
    /// run the kernel in long mode (`pins.rs`, `inherit_cr_pins`).
    pub(super) inheriting: Vec<AtomicBool>,
    /// When each such vCPU was first seen running (after its INIT and SIPI).
    pub(super) running_since: Vec<Mutex<Option<Instant>>>,
    /// Last CR violation reported per vCPU under `log`, to report changes once.
    pub(super) last_logged: Vec<Mutex<Option<(ControlRegister, u64)>>>,
    /// The same for descriptor-table registers.
    pub(super) last_logged_dtr: Vec<Mutex<Option<LoggedDtr>>>,
    pub(super) mailbox: Mutex<Mailbox>,
    pub(super) answered: Condvar,
    /// Serializes computing and installing the VM-wide MSR filter: a guest
    /// pin and a host pin at once must not install a filter missing one MSR.
    pub(super) filter: Mutex<()>,
}

#[derive(Default)]
pub(super) struct Mailbox {
    pub(super) requests: Vec<Option<PinRequest>>,
    pub(super) results: Vec<Option<Result<(), HostPinError>>>,
}

pub(super) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl PinState {
    pub fn new(vcpus: usize) -> Self {
        PinState {
            pins: (0..vcpus).map(|_| Mutex::default()).collect(),
            has_cr_pins: (0..vcpus).map(|_| AtomicBool::new(false)).collect(),
            inheriting: (0..vcpus).map(|_| AtomicBool::new(false)).collect(),
            running_since: (0..vcpus).map(|_| Mutex::default()).collect(),
            last_logged: (0..vcpus).map(|_| Mutex::default()).collect(),
            last_logged_dtr: (0..vcpus).map(|_| Mutex::default()).collect(),
            mailbox: Mutex::new(Mailbox { requests: vec![None; vcpus], results: vec![None; vcpus] }),
            answered: Condvar::new(),
            filter: Mutex::new(()),
        }
    }

    pub(super) fn pins(&self, vcpu: u8) -> Option<MutexGuard<'_, VcpuPins>> {
        self.pins.get(usize::from(vcpu)).map(lock)
    }

    pub fn any_cr_pins(&self) -> bool {
        self.has_cr_pins.iter().any(|b| b.load(Ordering::Relaxed))
    }

    /// Every vCPU's pins, for `vm.heki`.
    pub fn snapshot(&self) -> Vec<VcpuPins> {
        self.pins.iter().map(|m| lock(m).clone()).collect()
    }

    /// vCPU `id` left the guest (CPU hot-unplug, after the guest ejected it
    /// and the host parked it): if it comes back it is a new CPU, which its
    /// kernel pins as it brings it online. The MSR filter keeps its MSRs
    /// (a filtered MSR nobody pins is only an exit more).
    pub fn forget_vcpu(&self, id: u8) {
        let id = usize::from(id);
        if let (Some(pins), Some(has_cr)) = (self.pins.get(id), self.has_cr_pins.get(id)) {
            *lock(pins) = VcpuPins::default();
            has_cr.store(false, Ordering::Relaxed);
        }
        if let Some(flag) = self.inheriting.get(id) {
            flag.store(false, Ordering::Relaxed);
        }
        if let Some(logged) = self.last_logged.get(id) {
            *lock(logged) = None;
        }
        if let Some(logged) = self.last_logged_dtr.get(id) {
            *lock(logged) = None;
        }
    }

    /// vCPU `id` was added by the host (`vm.resize`): it takes vCPU 0's CR
    /// pins as soon as it runs the kernel in long mode. A kernel that may be
    /// compromised by then brings the CPU up, so its own pinning cannot be
    /// relied on.
    pub fn expect_inheritance(&self, id: u8) {
        let id = usize::from(id);
        if let (Some(flag), Some(since)) = (self.inheriting.get(id), self.running_since.get(id)) {
            *lock(since) = None;
            flag.store(true, Ordering::Relaxed);
        }
    }

    /// Whether a host request waits for vCPU `id`.
    pub fn has_request(&self, id: u8) -> bool {
        lock(&self.mailbox).requests.get(usize::from(id)).is_some_and(Option::is_some)
    }

    /// Union of pinned MSRs across vCPUs: the VM-wide write filter.
    pub(super) fn filtered_msrs(&self) -> Vec<u32> {
        let mut all: Vec<u32> =
            self.snapshot().iter().flat_map(|p| p.msrs.keys().copied().collect::<Vec<_>>()).collect();
        all.sort_unstable();
        all.dedup();
        all
    }
}
