//! Heki's side of guest access: the memory protections behind their lock,
//! the violation policy, and the `AccessPolicy` the guest-access layer asks
//! before every device access.

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, OnceLock, RwLock, RwLockReadGuard, RwLockWriteGuard};

use heki::{Access, MemoryProtections, Outcome, Policy, Protections, Verdict, ViolationRecord, judge};

use super::violations::ViolationLog;
use crate::guest_access::{AccessEpoch, AccessPolicy, Decision, DeviceAccess, EpochChange};
use crate::traps::ports::RunControl;

/// Told of each recorded violation (the introspection agent's events); must not block.
pub type ViolationObserver = Box<dyn Fn(&ViolationRecord) + Send + Sync>;

/// Applies heki's verdicts: the policy, the violation log, the VM's run
/// control, and the memory protections behind their read/write lock.
pub struct Enforcer {
    memory: RwLock<MemoryProtections>,
    /// Device accesses meet protection changes here.
    epoch: AccessEpoch,
    policy: AtomicU8,
    pub violations: ViolationLog,
    control: Arc<dyn RunControl>,
    /// Told of every violation recorded (the introspection agent's events).
    observer: OnceLock<ViolationObserver>,
}

impl Enforcer {
    pub fn new(policy: Policy, control: Arc<dyn RunControl>) -> Self {
        Enforcer {
            memory: RwLock::default(),
            epoch: AccessEpoch::default(),
            policy: AtomicU8::new(policy_code(policy)),
            violations: ViolationLog::default(),
            control,
            observer: OnceLock::new(),
        }
    }

    pub fn policy(&self) -> Policy {
        match self.policy.load(Ordering::Relaxed) {
            1 => Policy::Log,
            2 => Policy::Pause,
            3 => Policy::Shutdown,
            _ => Policy::Deny,
        }
    }

    pub fn set_policy(&self, policy: Policy) {
        self.policy.store(policy_code(policy), Ordering::Relaxed);
    }

    pub fn control(&self) -> &dyn RunControl {
        self.control.as_ref()
    }

    pub fn control_arc(&self) -> Arc<dyn RunControl> {
        self.control.clone()
    }

    /// The protections, for a check made on a vCPU's exit.
    pub(super) fn protections(&self) -> RwLockReadGuard<'_, MemoryProtections> {
        self.memory.read().unwrap_or_else(|p| p.into_inner())
    }

    /// Waits for every device access in flight, then lets the caller change
    /// the protections while no new access can be judged.
    pub(super) fn protections_mut(&self) -> ProtectionsWriter<'_> {
        let change = self.epoch.change();
        let guard = self.memory.write().unwrap_or_else(|p| p.into_inner());
        ProtectionsWriter { guard, _change: change }
    }

    /// Sets the one observer of recorded violations (it must not block).
    pub fn set_observer(&self, observer: ViolationObserver) {
        let _ = self.observer.set(observer);
    }

    /// Records a violation verdict (the caller fills in who and where) and
    /// applies its outcome to the whole VM.
    pub fn enforce(&self, verdict: &Verdict, source: &str, fill: impl FnOnce(&mut ViolationRecord)) {
        if let Some(mut record) = verdict.record() {
            fill(&mut record);
            if let Some(observer) = self.observer.get() {
                observer(&record);
            }
            self.violations.record(record);
        }
        if verdict.outcome() != Outcome::Continue {
            self.control.stop_for_violation(verdict.outcome(), source);
        }
    }
}

impl AccessPolicy for Enforcer {
    fn epoch(&self) -> &AccessEpoch {
        &self.epoch
    }

    fn judge(&self, access: DeviceAccess<'_>) -> Decision {
        let DeviceAccess { accessor, gpa, len, write } = access;
        let protections = self.protections();
        let kind = if write { Access::DmaWrite { gpa, len } } else { Access::DmaRead { gpa, len } };
        let verdict = judge(kind, Protections { memory: &protections, pins: None }, self.policy());
        if verdict.is_violation() {
            self.enforce(&verdict, accessor, |record| {
                record.gpa = Some(gpa);
                record.size = Some(len);
                record.details.insert("device".into(), accessor.to_string());
                if !write {
                    record.details.insert("access".into(), "read".into());
                }
            });
            if !verdict.performs_access() {
                return Decision::Refuse;
            }
            return Decision::Allow { whole_page: false };
        }
        // A page with protected bytes is judged at every write.
        let page = gpa >> heki::PAGE_SHIFT;
        Decision::Allow { whole_page: !protections.bytes.page_has_bytes(page) }
    }

    fn permits(&self, gpa: u64, len: u64, write: bool) -> bool {
        let protections = self.protections();
        protections.private.range_shared(gpa, len) && (!write || protections.range_writable(gpa, len))
    }
}

fn policy_code(policy: Policy) -> u8 {
    match policy {
        Policy::Deny => 0,
        Policy::Log => 1,
        Policy::Pause => 2,
        Policy::Shutdown => 3,
    }
}

/// The write side of the protections, inside an epoch change: device
/// accesses stay held off until dropped.
pub(super) struct ProtectionsWriter<'a> {
    // Dropped first: the protections are released before the change ends.
    guard: RwLockWriteGuard<'a, MemoryProtections>,
    _change: EpochChange<'a>,
}

impl std::ops::Deref for ProtectionsWriter<'_> {
    type Target = MemoryProtections;
    fn deref(&self) -> &MemoryProtections {
        &self.guard
    }
}

impl std::ops::DerefMut for ProtectionsWriter<'_> {
    fn deref_mut(&mut self) -> &mut MemoryProtections {
        &mut self.guard
    }
}
