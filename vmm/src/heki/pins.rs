//! Register integrity on the VMM side: pinned CR bits (checked at every exit
//! and at least every `cr_check_interval_ms`) and pinned MSRs (enforced by
//! the KVM MSR filter: writes exit to us). Heki's `judge` decides; this
//! module reads and writes the registers.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use heki::pins::{ControlRegister, DescriptorTable, PINNABLE_MSRS, PinError};
use heki::{AbiError, Access, MemoryProtections, Policy, Protections, VcpuPins, judge};

use super::ports::VcpuAccess;
use super::runtime::HekiRuntime;

/// How long a host-side pin waits for the vCPUs to answer.
const PIN_ANSWER_TIMEOUT: Duration = Duration::from_secs(5);

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

/// A descriptor-table register and the (base, limit) last reported for it.
type LoggedDtr = (DescriptorTable, (u64, u16));

/// Per-vCPU pin state plus the mailbox for host-side requests.
pub struct PinState {
    pins: Vec<Mutex<VcpuPins>>,
    has_cr_pins: Vec<AtomicBool>,
    /// Last CR violation reported per vCPU under `log`, to report changes once.
    last_logged: Vec<Mutex<Option<(ControlRegister, u64)>>>,
    /// The same for descriptor-table registers.
    last_logged_dtr: Vec<Mutex<Option<LoggedDtr>>>,
    mailbox: Mutex<Mailbox>,
    answered: Condvar,
    /// Serializes computing and installing the VM-wide MSR filter: a guest
    /// pin and a host pin at once must not install a filter missing one MSR.
    filter: Mutex<()>,
}

#[derive(Default)]
struct Mailbox {
    requests: Vec<Option<PinRequest>>,
    results: Vec<Option<Result<(), String>>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl PinState {
    pub fn new(vcpus: usize) -> Self {
        PinState {
            pins: (0..vcpus).map(|_| Mutex::default()).collect(),
            has_cr_pins: (0..vcpus).map(|_| AtomicBool::new(false)).collect(),
            last_logged: (0..vcpus).map(|_| Mutex::default()).collect(),
            last_logged_dtr: (0..vcpus).map(|_| Mutex::default()).collect(),
            mailbox: Mutex::new(Mailbox { requests: vec![None; vcpus], results: vec![None; vcpus] }),
            answered: Condvar::new(),
            filter: Mutex::new(()),
        }
    }

    fn pins(&self, vcpu: u8) -> Option<MutexGuard<'_, VcpuPins>> {
        self.pins.get(usize::from(vcpu)).map(lock)
    }

    pub fn any_cr_pins(&self) -> bool {
        self.has_cr_pins.iter().any(|b| b.load(Ordering::Relaxed))
    }

    /// Every vCPU's pins, for `vm.heki`.
    pub fn snapshot(&self) -> Vec<VcpuPins> {
        self.pins.iter().map(|m| lock(m).clone()).collect()
    }

    /// Whether a host request waits for vCPU `id`.
    pub fn has_request(&self, id: u8) -> bool {
        lock(&self.mailbox).requests.get(usize::from(id)).is_some_and(Option::is_some)
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
    fn install_msr_filter(&self) -> Result<(), super::ports::HostError> {
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
        if !has_pins && !self.translations().is_active() {
            return;
        }
        let Ok(mut sregs) = vcpu.sregs() else { return };
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

    /// A guest `wrmsr` to a filtered MSR: judge it, then complete the exit.
    pub fn on_msr_write(&self, vcpu: &mut dyn VcpuAccess, index: u32, value: u64) {
        let id = vcpu.id();
        let verdict = {
            let pins = self.pin_state.pins(id);
            let memory = MemoryProtections::default();
            let protections = Protections { memory: &memory, pins: pins.as_deref() };
            judge(Access::MsrWrite { index, value }, protections, self.policy())
        };
        // A filtered write never reaches the MSR by itself: carry out the allowed ones.
        let written = verdict.performs_access() && vcpu.set_msr(index, value).is_ok();
        vcpu.complete_msr_exit(!written);
        if verdict.is_violation() {
            self.enforcer().enforce(&verdict, &format!("vcpu {id}"), |record| {
                record.vcpu = Some(u32::from(id));
                super::ExitSite::of(&*vcpu).fill(record);
                record.details.insert("msr".into(), format!("{index:#x}"));
                record.details.insert("value".into(), format!("{value:#x}"));
            });
        }
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

    fn apply_pin_request(&self, vcpu: &dyn VcpuAccess, request: &PinRequest) -> Result<(), String> {
        let id = vcpu.id();
        let sregs = vcpu.sregs().map_err(|e| e.to_string())?;
        let mut trial = self.pin_state.pins(id).map(|p| p.clone()).unwrap_or_default();
        for (register, mask, current) in
            [(ControlRegister::Cr0, request.cr0, sregs.cr0), (ControlRegister::Cr4, request.cr4, sregs.cr4)]
        {
            if mask != 0 {
                trial.pin_cr(register, mask, current).map_err(|e| format!("vCPU {id}: {}: {e}", register.name()))?;
            }
        }
        for &index in &request.msrs {
            let value = vcpu.msr(index).map_err(|e| format!("vCPU {id}: MSR {index:#x}: {e}"))?;
            trial.pin_msr(index, value).map_err(|e| format!("vCPU {id}: {e}"))?;
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
    pub fn pin_from_host(&self, request: PinRequest, vcpus: usize) -> Result<(), String> {
        let control = self.enforcer().control();
        control.hold_vcpus().map_err(|e| e.to_string())?;
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

    fn pin_held(&self, request: &PinRequest, vcpus: usize) -> Result<(), String> {
        for apply in [false, true] {
            self.ask_every_vcpu(PinRequest { apply, ..request.clone() }, vcpus)?;
        }
        if !request.msrs.is_empty() {
            self.install_msr_filter().map_err(|e| e.to_string())?;
        }
        Ok(())
    }

    /// Posts `round` to every vCPU and waits for every answer.
    fn ask_every_vcpu(&self, round: PinRequest, vcpus: usize) -> Result<(), String> {
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
                return Err("vCPUs did not answer the pin request (is the VM running?)".into());
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
