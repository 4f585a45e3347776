//! Register integrity on the VMM side: pinned CR bits (checked at every exit
//! and at least every `cr_check_interval_ms`, restored under `deny`) and
//! pinned MSRs (enforced by the KVM MSR filter: writes exit to us).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Condvar, Mutex};
use std::time::Duration;

use heki::pins::{ControlRegister, MsrWriteVerdict, PINNABLE_MSRS, PinError};
use heki::{AbiError, Policy, VcpuPins};
use hypervisor::Vcpu;

use super::runtime::{HekiAction, HekiRuntime, action_name, policy_action};
use super::violations::Violation;

/// A host-side pin request (`vm.heki-pin`), served by each vCPU thread on its
/// own registers. `apply == false` only validates.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PinRequest {
    pub cr0: u64,
    pub cr4: u64,
    pub msrs: Vec<u32>,
    pub apply: bool,
}

/// Per-vCPU pin state plus the mailbox for host-side requests.
pub struct PinState {
    pins: Vec<Mutex<VcpuPins>>,
    has_cr_pins: Vec<AtomicBool>,
    /// Last CR violation reported per vCPU under `log`, to report changes once.
    last_logged: Vec<Mutex<Option<(ControlRegister, u64)>>>,
    requests: Mutex<Vec<Option<PinRequest>>>,
    results: Mutex<Vec<Option<Result<(), String>>>>,
    answered: Condvar,
}

impl PinState {
    pub fn new(vcpus: usize) -> Self {
        PinState {
            pins: (0..vcpus).map(|_| Mutex::default()).collect(),
            has_cr_pins: (0..vcpus).map(|_| AtomicBool::new(false)).collect(),
            last_logged: (0..vcpus).map(|_| Mutex::default()).collect(),
            requests: Mutex::new(vec![None; vcpus]),
            results: Mutex::new(vec![None; vcpus]),
            answered: Condvar::new(),
        }
    }

    fn pins(&self, vcpu: u8) -> Option<std::sync::MutexGuard<'_, VcpuPins>> {
        self.pins.get(usize::from(vcpu)).map(|m| m.lock().unwrap_or_else(|p| p.into_inner()))
    }

    pub fn any_cr_pins(&self) -> bool {
        self.has_cr_pins.iter().any(|b| b.load(Ordering::Relaxed))
    }

    /// Every vCPU's pins, for `vm.heki`.
    pub fn snapshot(&self) -> Vec<VcpuPins> {
        self.pins.iter().map(|m| m.lock().unwrap_or_else(|p| p.into_inner()).clone()).collect()
    }

    /// Union of pinned MSRs across vCPUs: the VM-wide write filter.
    fn filtered_msrs(&self) -> Vec<u32> {
        let mut all: Vec<u32> =
            self.snapshot().iter().flat_map(|p| p.msrs.keys().copied().collect::<Vec<_>>()).collect();
        all.sort_unstable();
        all.dedup();
        all
    }
}

fn pin_errno(_: PinError) -> AbiError {
    AbiError::InvalidArgument
}

impl HekiRuntime {
    /// PIN_CR from the guest, on the calling vCPU.
    pub fn pin_cr(&self, vcpu: &Vcpu, register: u64, mask: u64) -> Result<(), AbiError> {
        let register = ControlRegister::from_number(register).map_err(pin_errno)?;
        let sregs = vcpu.sregs().map_err(|_| AbiError::BadAddress)?;
        let current = match register {
            ControlRegister::Cr0 => sregs.cr0,
            ControlRegister::Cr4 => sregs.cr4,
        };
        let mut pins = self.pin_state.pins(vcpu.id()).ok_or(AbiError::InvalidArgument)?;
        pins.pin_cr(register, mask, current).map_err(pin_errno)?;
        self.pin_state.has_cr_pins[usize::from(vcpu.id())].store(true, Ordering::Relaxed);
        drop(pins);
        crate::events::emit(
            "heki",
            "pinned",
            &[("vcpu", vcpu.id().to_string()), ("register", register.name().into()), ("mask", format!("{mask:#x}"))],
        );
        Ok(())
    }

    /// PIN_MSR from the guest: pins the calling vCPU's current value.
    pub fn pin_msr(&self, vcpu: &Vcpu, index: u64) -> Result<(), AbiError> {
        let index = u32::try_from(index).ok().filter(|i| PINNABLE_MSRS.contains(i)).ok_or(AbiError::InvalidArgument)?;
        let value = vcpu.msr(index).map_err(|_| AbiError::InvalidArgument)?;
        self.pin_state.pins(vcpu.id()).ok_or(AbiError::InvalidArgument)?.pin_msr(index, value).map_err(pin_errno)?;
        self.kvm_vm().set_msr_write_filter(&self.pin_state.filtered_msrs()).map_err(|e| {
            log::error!("heki: cannot update the MSR filter: {e}");
            AbiError::NoSpace
        })?;
        crate::events::emit(
            "heki",
            "pinned",
            &[("vcpu", vcpu.id().to_string()), ("msr", format!("{index:#x}")), ("value", format!("{value:#x}"))],
        );
        Ok(())
    }

    /// Checks (and under deny/pause/shutdown restores) this vCPU's pinned CR bits.
    pub fn check_crs(&self, vcpu: &Vcpu) -> HekiAction {
        let id = vcpu.id();
        if !self.pin_state.has_cr_pins.get(usize::from(id)).is_some_and(|b| b.load(Ordering::Relaxed)) {
            return HekiAction::Continue;
        }
        let Ok(mut sregs) = vcpu.sregs() else {
            return HekiAction::Continue;
        };
        let found = match self.pin_state.pins(id) {
            Some(pins) => pins.check_crs(sregs.cr0, sregs.cr4),
            None => return HekiAction::Continue,
        };
        if found.is_empty() {
            return HekiAction::Continue;
        }
        let policy = self.policy();
        let mut action = HekiAction::Continue;
        for v in &found {
            if policy == Policy::Log {
                let mut last = self.pin_state.last_logged[usize::from(id)].lock().unwrap_or_else(|p| p.into_inner());
                if *last == Some((v.register, v.value)) {
                    continue;
                }
                *last = Some((v.register, v.value));
            }
            let mut record =
                Violation::new("cr", if policy == Policy::Deny { "restored" } else { action_name(policy) });
            record.vcpu = Some(id);
            record.rip = vcpu.regs().ok().map(|r| r.rip);
            record.details.insert("register", v.register.name().into());
            record.details.insert("pinned", format!("{:#x}", v.pinned));
            record.details.insert("value", format!("{:#x}", v.value));
            self.violations.record(record);
            if policy != Policy::Log {
                match v.register {
                    ControlRegister::Cr0 => sregs.cr0 = v.restored,
                    ControlRegister::Cr4 => sregs.cr4 = v.restored,
                }
            }
            action = policy_action(policy);
        }
        if policy != Policy::Log
            && let Err(e) = vcpu.set_sregs(&sregs)
        {
            log::error!("heki: cannot restore pinned CR bits on vCPU {id}: {e}");
        }
        action
    }

    /// A guest `wrmsr` to a filtered MSR: judge it, then complete the exit.
    pub fn on_msr_write(&self, vcpu: &mut Vcpu, index: u32, value: u64) -> HekiAction {
        let id = vcpu.id();
        let verdict =
            self.pin_state.pins(id).map(|p| p.check_msr_write(index, value)).unwrap_or(MsrWriteVerdict::NotPinned);
        let policy = self.policy();
        let (perform, action) = match verdict {
            MsrWriteVerdict::NotPinned | MsrWriteVerdict::SameValue => (true, HekiAction::Continue),
            MsrWriteVerdict::Violation { pinned } => {
                let mut record = Violation::new("msr", action_name(policy));
                record.vcpu = Some(id);
                record.rip = vcpu.regs().ok().map(|r| r.rip);
                record.details.insert("msr", format!("{index:#x}"));
                record.details.insert("pinned", format!("{pinned:#x}"));
                record.details.insert("value", format!("{value:#x}"));
                self.violations.record(record);
                (policy == Policy::Log, policy_action(policy))
            }
        };
        // A filtered write never reaches the MSR by itself: carry out the allowed ones.
        let written = perform && vcpu.set_msrs(&[(index, value)]).is_ok();
        vcpu.complete_msr_exit(!written);
        action
    }

    /// The host-side request mailbox: served by each vCPU thread between runs.
    pub fn serve_pin_request(&self, vcpu: &Vcpu) {
        let id = usize::from(vcpu.id());
        let request = {
            let mut requests = self.pin_state.requests.lock().unwrap_or_else(|p| p.into_inner());
            match requests.get_mut(id) {
                Some(slot) => slot.take(),
                None => None,
            }
        };
        let Some(request) = request else { return };
        let result = self.apply_pin_request(vcpu, &request);
        let mut results = self.pin_state.results.lock().unwrap_or_else(|p| p.into_inner());
        results[id] = Some(result);
        self.pin_state.answered.notify_all();
    }

    fn apply_pin_request(&self, vcpu: &Vcpu, request: &PinRequest) -> Result<(), String> {
        let sregs = vcpu.sregs().map_err(|e| e.to_string())?;
        let mut trial = self.pin_state.pins(vcpu.id()).map(|p| p.clone()).unwrap_or_default();
        for (register, mask, current) in
            [(ControlRegister::Cr0, request.cr0, sregs.cr0), (ControlRegister::Cr4, request.cr4, sregs.cr4)]
        {
            if mask != 0 {
                trial
                    .pin_cr(register, mask, current)
                    .map_err(|e| format!("vCPU {}: {}: {e}", vcpu.id(), register.name()))?;
            }
        }
        for &index in &request.msrs {
            let value = vcpu.msr(index).map_err(|e| format!("vCPU {}: MSR {index:#x}: {e}", vcpu.id()))?;
            trial.pin_msr(index, value).map_err(|e| format!("vCPU {}: {e}", vcpu.id()))?;
        }
        if request.apply {
            if let Some(mut pins) = self.pin_state.pins(vcpu.id()) {
                *pins = trial;
            }
            if request.cr0 | request.cr4 != 0 {
                self.pin_state.has_cr_pins[usize::from(vcpu.id())].store(true, Ordering::Relaxed);
            }
        }
        Ok(())
    }

    /// `vm.heki-pin`: validate on every vCPU, then pin on every vCPU.
    pub fn pin_from_host(&self, request: PinRequest, kick: impl Fn(), vcpus: usize) -> Result<(), String> {
        for apply in [false, true] {
            let round = PinRequest { apply, ..request.clone() };
            {
                let mut requests = self.pin_state.requests.lock().unwrap_or_else(|p| p.into_inner());
                let mut results = self.pin_state.results.lock().unwrap_or_else(|p| p.into_inner());
                for i in 0..vcpus {
                    requests[i] = Some(round.clone());
                    results[i] = None;
                }
            }
            let deadline = std::time::Instant::now() + Duration::from_secs(5);
            let mut results = self.pin_state.results.lock().unwrap_or_else(|p| p.into_inner());
            while results.iter().take(vcpus).any(Option::is_none) {
                if std::time::Instant::now() >= deadline {
                    return Err("vCPUs did not answer the pin request (is the VM running?)".into());
                }
                drop(results);
                kick();
                results = self.pin_state.results.lock().unwrap_or_else(|p| p.into_inner());
                results = self
                    .pin_state
                    .answered
                    .wait_timeout(results, Duration::from_millis(2))
                    .unwrap_or_else(|p| p.into_inner())
                    .0;
            }
            if let Some(Some(Err(e))) = results.iter().take(vcpus).find(|r| matches!(r, Some(Err(_)))).cloned() {
                return Err(e);
            }
        }
        if !request.msrs.is_empty() {
            self.kvm_vm().set_msr_write_filter(&self.pin_state.filtered_msrs()).map_err(|e| e.to_string())?;
        }
        crate::events::emit(
            "heki",
            "pinned",
            &[
                ("by", "api".into()),
                ("cr0", format!("{:#x}", request.cr0)),
                ("cr4", format!("{:#x}", request.cr4)),
                ("msrs", format!("{:x?}", request.msrs)),
            ],
        );
        Ok(())
    }
}
