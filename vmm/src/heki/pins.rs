//! Register integrity on the VMM side: pinned CR bits (checked at every exit
//! and at least every `cr_check_interval_ms`) and pinned MSRs (enforced by
//! the KVM MSR filter: writes exit to us). Heki's `judge` decides; this
//! module reads and writes the registers.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use heki::pins::{ControlRegister, DescriptorTable, PINNABLE_MSRS, PinError};
use heki::{AbiError, Access, MemoryProtections, Policy, Protections, judge};

use super::pin_state::{HostPinError, PinRequest, lock};
use super::runtime::HekiRuntime;
use crate::cpu::hook::MsrDecision;
use crate::traps::ports::VcpuAccess;

/// How long a host-side pin waits for the vCPUs to answer.
const PIN_ANSWER_TIMEOUT: Duration = Duration::from_secs(5);

/// How long a vCPU the host added may run before it must have vCPU 0's
/// pinned CR bits (Linux sets them within its first steps in long mode).
pub(super) const INHERIT_GRACE: Duration = Duration::from_secs(2);

fn pin_errno(_: PinError) -> AbiError {
    AbiError::InvalidArgument
}

impl HekiRuntime {
    /// PIN_CR from the guest, on the calling vCPU.
    pub fn pin_cr(&self, vcpu: &dyn VcpuAccess, register: u64, mask: u64) -> Result<(), AbiError> {
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

    /// PIN_MSR from the guest: pins the calling vCPU's current value. The
    /// filter is in place before this vCPU runs guest code again.
    pub fn pin_msr(&self, vcpu: &dyn VcpuAccess, index: u64) -> Result<(), AbiError> {
        let index = u32::try_from(index).ok().filter(|i| PINNABLE_MSRS.contains(i)).ok_or(AbiError::InvalidArgument)?;
        let value = vcpu.msr(index).map_err(|_| AbiError::InvalidArgument)?;
        self.pin_state.pins(vcpu.id()).ok_or(AbiError::InvalidArgument)?.pin_msr(index, value).map_err(pin_errno)?;
        self.install_msr_filter().map_err(|e| {
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

    /// Installs the filter for every MSR pinned on any vCPU.
    fn install_msr_filter(&self) -> Result<(), crate::traps::ports::HostError> {
        let _one_at_a_time = lock(&self.pin_state.filter);
        // The installed filter also holds the MSRs the introspection agent intercepts.
        self.traps().set_heki_msrs(self.pin_state.filtered_msrs())
    }

    /// PIN_DTR from the guest: pins the calling vCPU's IDTR or GDTR as it is now.
    pub fn pin_dtr(&self, vcpu: &dyn VcpuAccess, table: u64) -> Result<(), AbiError> {
        let table = DescriptorTable::from_number(table).map_err(pin_errno)?;
        let sregs = vcpu.sregs().map_err(|_| AbiError::BadAddress)?;
        let current = match table {
            DescriptorTable::Idtr => (sregs.idt.base, sregs.idt.limit),
            DescriptorTable::Gdtr => (sregs.gdt.base, sregs.gdt.limit),
        };
        self.pin_state.pins(vcpu.id()).ok_or(AbiError::InvalidArgument)?.pin_dtr(table, current);
        // Checked with the CR pins, at every exit and every tick.
        self.pin_state.has_cr_pins[usize::from(vcpu.id())].store(true, Ordering::Relaxed);
        crate::events::emit(
            "heki",
            "pinned",
            &[
                ("vcpu", vcpu.id().to_string()),
                ("register", table.name().into()),
                ("base", format!("{:#x}", current.0)),
                ("limit", format!("{:#x}", current.1)),
            ],
        );
        Ok(())
    }

    /// Checks this vCPU's pinned registers (CR bits, IDTR, GDTR) and locked
    /// translations; puts them back unless the policy is `log`.
    pub fn check_crs(&self, vcpu: &dyn VcpuAccess) {
        let id = vcpu.id();
        let has_pins = self.pin_state.has_cr_pins.get(usize::from(id)).is_some_and(|b| b.load(Ordering::Relaxed));
        let inheriting = self.pin_state.inheriting.get(usize::from(id)).is_some_and(|b| b.load(Ordering::Relaxed));
        if !has_pins && !inheriting && !self.translations().is_active() {
            return;
        }
        let Ok(mut sregs) = vcpu.sregs() else { return };
        let has_pins = has_pins || (inheriting && self.inherit_cr_pins(vcpu, &sregs));
        let mut restore = false;
        if has_pins {
            restore |= self.check_pinned_crs(vcpu, &mut sregs);
            restore |= self.check_pinned_dtrs(vcpu, &mut sregs);
        }
        restore |= self.check_translations(vcpu, &mut sregs);
        if restore && let Err(e) = vcpu.set_sregs(&sregs) {
            log::error!("heki: cannot restore pinned registers on vCPU {id}: {e}");
        }
    }

    /// A vCPU the host added takes vCPU 0's CR pins once it runs in long
    /// mode with paging and has every pinned bit set, which the kernel does
    /// early in bringing a CPU up (its real-mode and 32-bit start
    /// legitimately runs without them); or, whatever mode it is in,
    /// `INHERIT_GRACE` after it started running: then the pins are taken
    /// anyway and the check that follows restores the bits and reports it.
    /// True once the vCPU has the pins.
    fn inherit_cr_pins(&self, vcpu: &dyn VcpuAccess, sregs: &hypervisor::SpecialRegs) -> bool {
        const EFER_LMA: u64 = 1 << 10;
        const CR0_PG: u64 = 1 << 31;
        let id = vcpu.id();
        let index = usize::from(id);
        if !vcpu.has_started() {
            // Still waiting for INIT and SIPI: the clock has not started.
            return false;
        }
        let template = self.pin_state.pins(0).map(|p| (p.cr0, p.cr4)).unwrap_or_default();
        let stop_inheriting = || self.pin_state.inheriting[index].store(false, Ordering::Relaxed);
        if id == 0 || template == (0, 0) {
            // vCPU 0 pinned nothing: there is nothing to take.
            stop_inheriting();
            return false;
        }
        let long_mode = sregs.efer & EFER_LMA != 0 && sregs.cr0 & CR0_PG != 0;
        let reached = long_mode && sregs.cr0 & template.0 == template.0 && sregs.cr4 & template.1 == template.1;
        let mut since = lock(&self.pin_state.running_since[index]);
        let started = *since.get_or_insert_with(Instant::now);
        if !reached && started.elapsed() < INHERIT_GRACE {
            return false;
        }
        *since = None;
        drop(since);
        let Some(mut pins) = self.pin_state.pins(id) else { return false };
        pins.cr0 |= template.0;
        pins.cr4 |= template.1;
        drop(pins);
        self.pin_state.has_cr_pins[index].store(true, Ordering::Relaxed);
        stop_inheriting();
        crate::events::emit(
            "heki",
            "pins-inherited",
            &[
                ("vcpu", id.to_string()),
                ("cr0", format!("{:#x}", template.0)),
                ("cr4", format!("{:#x}", template.1)),
                ("bits_were_set", reached.to_string()),
            ],
        );
        true
    }

    /// CR0/CR4 pins; true if `sregs` was changed to restore them.
    fn check_pinned_crs(&self, vcpu: &dyn VcpuAccess, sregs: &mut hypervisor::SpecialRegs) -> bool {
        let id = vcpu.id();
        let Some(pins) = self.pin_state.pins(id) else { return false };
        let memory = MemoryProtections::default();
        let access = Access::ControlRegisters { cr0: sregs.cr0, cr4: sregs.cr4 };
        let verdict = judge(access, Protections { memory: &memory, pins: Some(&pins) }, self.policy());
        drop(pins);
        let heki::Breach::Crs(found) = &verdict.breach else { return false };
        if self.policy() == Policy::Log {
            // Audit mode leaves the change in place: report each new value once.
            let mut last = lock(&self.pin_state.last_logged[usize::from(id)]);
            let key = found.first().map(|v| (v.register, v.value));
            if *last == key {
                return false;
            }
            *last = key;
        }
        for restore in verdict.restored_crs() {
            match restore.register {
                ControlRegister::Cr0 => sregs.cr0 = restore.restored,
                ControlRegister::Cr4 => sregs.cr4 = restore.restored,
            }
        }
        self.enforcer().enforce(&verdict, &format!("vcpu {id}"), |record| {
            record.vcpu = Some(u32::from(id));
            record.rip = vcpu.exit_rip();
            record.details.insert("cpl".into(), sregs.cpl().to_string());
        });
        !verdict.restored_crs().is_empty()
    }

    /// IDTR/GDTR pins; true if `sregs` was changed to restore them.
    fn check_pinned_dtrs(&self, vcpu: &dyn VcpuAccess, sregs: &mut hypervisor::SpecialRegs) -> bool {
        let id = vcpu.id();
        let Some(pins) = self.pin_state.pins(id) else { return false };
        if !pins.has_dtr_pins() {
            return false;
        }
        let memory = MemoryProtections::default();
        let access = Access::DescriptorTables {
            idtr: (sregs.idt.base, sregs.idt.limit),
            gdtr: (sregs.gdt.base, sregs.gdt.limit),
        };
        let verdict = judge(access, Protections { memory: &memory, pins: Some(&pins) }, self.policy());
        drop(pins);
        let heki::Breach::Dtrs(found) = &verdict.breach else { return false };
        if self.policy() == Policy::Log {
            let mut last = lock(&self.pin_state.last_logged_dtr[usize::from(id)]);
            let key = found.first().map(|v| (v.table, v.value));
            if *last == key {
                return false;
            }
            *last = key;
        }
        let restored = verdict.restored_dtrs();
        for dtr in &restored {
            let register = match dtr.table {
                DescriptorTable::Idtr => &mut sregs.idt,
                DescriptorTable::Gdtr => &mut sregs.gdt,
            };
            (register.base, register.limit) = dtr.pinned;
        }
        self.enforcer().enforce(&verdict, &format!("vcpu {id}"), |record| {
            record.vcpu = Some(u32::from(id));
            record.rip = vcpu.exit_rip();
            record.details.insert("cpl".into(), sregs.cpl().to_string());
        });
        !restored.is_empty()
    }

    /// A guest `wrmsr` to a filtered MSR: heki's decision (the vCPU loop
    /// completes the exit with it, `cpu::hook::complete_msr_write`).
    pub fn on_msr_write(&self, vcpu: &dyn VcpuAccess, index: u32, value: u64) -> MsrDecision {
        let id = vcpu.id();
        let verdict = {
            let pins = self.pin_state.pins(id);
            let memory = MemoryProtections::default();
            let protections = Protections { memory: &memory, pins: pins.as_deref() };
            judge(Access::MsrWrite { index, value }, protections, self.policy())
        };
        if verdict.is_violation() {
            self.enforcer().enforce(&verdict, &format!("vcpu {id}"), |record| {
                record.vcpu = Some(u32::from(id));
                super::ExitSite::of(vcpu).fill(record);
                record.details.insert("msr".into(), format!("{index:#x}"));
                record.details.insert("value".into(), format!("{value:#x}"));
            });
        }
        // A filtered write never reaches the MSR by itself: the allowed ones are written.
        if verdict.performs_access() { MsrDecision::Write } else { MsrDecision::Refuse }
    }

    /// The host-side request mailbox: served by each vCPU thread, also while held.
    pub fn serve_pin_request(&self, vcpu: &dyn VcpuAccess) {
        let id = usize::from(vcpu.id());
        let request = lock(&self.pin_state.mailbox).requests.get_mut(id).and_then(Option::take);
        let Some(request) = request else { return };
        let result = self.apply_pin_request(vcpu, &request);
        let mut mailbox = lock(&self.pin_state.mailbox);
        if let Some(slot) = mailbox.results.get_mut(id) {
            *slot = Some(result);
        }
        self.pin_state.answered.notify_all();
    }

    fn apply_pin_request(&self, vcpu: &dyn VcpuAccess, request: &PinRequest) -> Result<(), HostPinError> {
        let id = vcpu.id();
        let sregs = vcpu.sregs().map_err(|e| HostPinError::Registers { vcpu: id, reason: e.to_string() })?;
        let mut trial = self.pin_state.pins(id).map(|p| p.clone()).unwrap_or_default();
        for (register, mask, current) in
            [(ControlRegister::Cr0, request.cr0, sregs.cr0), (ControlRegister::Cr4, request.cr4, sregs.cr4)]
        {
            if mask != 0 {
                trial.pin_cr(register, mask, current).map_err(|source| HostPinError::Cr {
                    vcpu: id,
                    register: register.name(),
                    source,
                })?;
            }
        }
        for &index in &request.msrs {
            let value =
                vcpu.msr(index).map_err(|e| HostPinError::MsrUnreadable { vcpu: id, index, reason: e.to_string() })?;
            trial.pin_msr(index, value).map_err(|source| HostPinError::Msr { vcpu: id, source })?;
        }
        if request.apply {
            if let Some(mut pins) = self.pin_state.pins(id) {
                *pins = trial;
            }
            if request.cr0 | request.cr4 != 0 {
                self.pin_state.has_cr_pins[usize::from(id)].store(true, Ordering::Relaxed);
            }
        }
        Ok(())
    }

    /// `vm.heki-pin`: with every vCPU held out of guest mode, validate on
    /// every vCPU, pin on every vCPU, and install the MSR filter; only then
    /// do the vCPUs run again. The values reported are the live ones.
    pub fn pin_from_host(&self, request: PinRequest, vcpus: usize) -> Result<(), HostPinError> {
        let control = self.enforcer().control();
        control.hold_vcpus().map_err(|e| HostPinError::Hold(e.to_string()))?;
        let result = self.pin_held(&request, vcpus);
        control.release_vcpus();
        result?;
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

    fn pin_held(&self, request: &PinRequest, vcpus: usize) -> Result<(), HostPinError> {
        for apply in [false, true] {
            self.ask_every_vcpu(PinRequest { apply, ..request.clone() }, vcpus)?;
        }
        if !request.msrs.is_empty() {
            self.install_msr_filter().map_err(|e| HostPinError::Filter(e.to_string()))?;
        }
        Ok(())
    }

    /// Posts `round` to every vCPU and waits for every answer.
    fn ask_every_vcpu(&self, round: PinRequest, vcpus: usize) -> Result<(), HostPinError> {
        {
            let mut mailbox = lock(&self.pin_state.mailbox);
            let mailbox = &mut *mailbox;
            for (request, result) in mailbox.requests.iter_mut().zip(mailbox.results.iter_mut()).take(vcpus) {
                *request = Some(round.clone());
                *result = None;
            }
        }
        self.enforcer().control().notify_vcpus();
        let deadline = Instant::now() + PIN_ANSWER_TIMEOUT;
        let mut mailbox = lock(&self.pin_state.mailbox);
        while mailbox.results.iter().take(vcpus).any(Option::is_none) {
            let now = Instant::now();
            if now >= deadline {
                // Withdraw what was not served, so a late vCPU cannot apply half a request.
                mailbox.requests.iter_mut().for_each(|r| *r = None);
                return Err(HostPinError::NoAnswer);
            }
            mailbox =
                self.pin_state.answered.wait_timeout(mailbox, deadline - now).unwrap_or_else(|p| p.into_inner()).0;
        }
        match mailbox.results.iter().take(vcpus).find_map(|r| r.clone().and_then(Result::err)) {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }
}
