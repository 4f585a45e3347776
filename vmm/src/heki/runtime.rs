//! The per-VM heki state and the VMM side of its exit path: protections and
//! memslots change together, trapped writes are judged and applied, and
//! every verdict goes through the `Enforcer`.

use std::sync::{Arc, OnceLock};

use heki::abi::{self, feature};
use heki::{AbiError, Access, KernelImage, MemoryProtections, PlannedSlot, Policy, Protections, RamLayout, judge};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::Enforcer;
use super::pin_state::PinState;
use super::string_memo::StringWriteMemo;
use super::translation_state::TranslationState;
use super::violations::ViolationLog;
use crate::guest_access::AccessPolicy;
use crate::layout::ports::HEKI_DOORBELL;
use crate::memory::GuestRam;
use crate::traps::VmTraps;
use crate::traps::memslots::MemslotError;
use crate::traps::ports::VmSlots;

/// Where in the guest a vCPU violation happened, read only when one is
/// recorded (the CPL may cost a `KVM_GET_SREGS`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ExitSite {
    pub rip: Option<u64>,
    pub cpl: Option<u8>,
}

impl ExitSite {
    pub fn of(vcpu: &dyn crate::traps::ports::VcpuAccess) -> Self {
        ExitSite { rip: vcpu.exit_rip(), cpl: vcpu.exit_cpl() }
    }

    /// Fills a violation record's RIP and CPL.
    pub fn fill(self, record: &mut heki::ViolationRecord) {
        record.rip = self.rip;
        if let Some(cpl) = self.cpl {
            record.details.insert("cpl".into(), cpl.to_string());
        }
    }
}

/// Caps the memslot budget below KVM's (`KVM_CAP_NR_MEMSLOTS`); for tests.
pub const MEMSLOT_BUDGET_ENV: &str = "HEKIVISOR_MEMSLOT_BUDGET";

pub struct HekiRuntime {
    pub(super) enforcer: Arc<Enforcer>,
    /// The installed memslots (shared with the introspection agent); their
    /// lock also serializes protection changes.
    pub(super) traps: Arc<VmTraps>,
    /// The guest's own view of RAM, for the paths that act as its CPU: page
    /// lists it hands over, and the emulated part of trapped writes (judged
    /// under the enforcer's lock first).
    pub(super) ram_mem: GuestMemoryMmap,
    /// The VMM's view, where private pages are made inaccessible.
    pub(super) host_view: GuestMemoryMmap,
    pub cr_check_interval_ms: u64,
    /// Whether LOCK_MAPPINGS is offered (`HekiSettings::translation`).
    pub(super) translation: bool,
    pub(super) pin_state: PinState,
    pub(super) msr_filter: bool,
    pub(super) translations: TranslationState,
    /// The ELF kernel the VMM loaded, set once before the vCPUs start.
    pub(super) kernel_image: OnceLock<KernelImage>,
    string_memo: StringWriteMemo,
}

/// What heki takes from the VM's configuration (its `heki` section), as
/// plain values: heki does not read the configuration itself.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HekiSettings {
    /// How often the vCPUs' control registers and translations are checked.
    pub cr_check_interval_ms: u64,
    /// Whether LOCK_MAPPINGS is offered (translation integrity).
    pub translation: bool,
}

impl Default for HekiSettings {
    /// The configuration's defaults: a 10 ms check, translation checks on.
    fn default() -> Self {
        HekiSettings { cr_check_interval_ms: 10, translation: true }
    }
}

impl HekiRuntime {
    pub fn new(
        config: &HekiSettings,
        enforcer: Arc<Enforcer>,
        host: Arc<dyn VmSlots>,
        guest_ram: &GuestRam,
        boot_slots: &[(PlannedSlot, u32)],
        vcpus: usize,
    ) -> Self {
        let budget = memslot_budget(host.as_ref());
        let traps = Arc::new(VmTraps::new(host, enforcer.control_arc(), boot_slots, budget));
        Self::with_traps(config, enforcer, traps, guest_ram, vcpus)
    }

    /// Like `new`, sharing the VM's memslots and MSR filter with the agent.
    pub fn with_traps(
        config: &HekiSettings,
        enforcer: Arc<Enforcer>,
        traps: Arc<VmTraps>,
        guest_ram: &GuestRam,
        vcpus: usize,
    ) -> Self {
        // Pinned MSRs need filtered writes to exit to user space.
        let msr_filter = match traps.host().enable_msr_exits() {
            Ok(()) => {
                traps.note_msr_exits_enabled();
                true
            }
            Err(e) => {
                log::warn!("heki: MSR pinning unavailable: {e}");
                false
            }
        };
        HekiRuntime {
            enforcer,
            traps,
            ram_mem: guest_ram.kvm.clone(),
            host_view: guest_ram.host.clone(),
            cr_check_interval_ms: config.cr_check_interval_ms,
            translation: config.translation,
            pin_state: PinState::new(vcpus),
            msr_filter,
            translations: TranslationState::default(),
            kernel_image: OnceLock::new(),
            string_memo: StringWriteMemo::new(vcpus),
        }
    }

    /// Keeps the loaded ELF kernel for the lock-time comparison (once).
    pub fn set_kernel_image(&self, image: KernelImage) {
        let _ = self.kernel_image.set(image);
    }

    pub fn kernel_image(&self) -> Option<&KernelImage> {
        self.kernel_image.get()
    }

    pub fn enforcer(&self) -> &Arc<Enforcer> {
        &self.enforcer
    }

    pub fn violations(&self) -> &ViolationLog {
        &self.enforcer.violations
    }

    pub(super) fn host(&self) -> &dyn VmSlots {
        self.traps.host()
    }

    /// The VM's memslots and MSR filter, shared with the introspection agent.
    pub fn traps(&self) -> &Arc<VmTraps> {
        &self.traps
    }

    /// Whether pinned MSRs are enforced (the host has the MSR filter).
    pub fn msr_pinning(&self) -> bool {
        self.msr_filter
    }

    pub fn pins(&self) -> &PinState {
        &self.pin_state
    }

    /// The translation locks (LOCK_MAPPINGS).
    pub fn translations(&self) -> &TranslationState {
        &self.translations
    }

    /// Guest RAM as KVM maps it: the view of the paths that act as the guest's CPU.
    pub(super) fn kvm_memory(&self) -> &GuestMemoryMmap {
        &self.ram_mem
    }

    /// What the string-write path remembers per vCPU.
    pub(super) fn string_memo(&self) -> &StringWriteMemo {
        &self.string_memo
    }

    /// Whether the periodic register check has anything to check.
    pub fn needs_register_checks(&self) -> bool {
        self.pin_state.any_cr_pins() || self.translations.is_active()
    }

    /// Feature bits this VMM implements on this host.
    pub fn features(&self) -> u32 {
        let memory =
            if self.host().has_readonly_memory() { feature::PROTECT_MEMORY | feature::PROTECT_BYTES } else { 0 };
        let msr = if self.msr_filter { feature::PIN_MSR } else { 0 };
        // Devices reach guest RAM only through heki-checked memory.
        // Translation locks lock page tables: they need read-only memory too.
        let mappings = if memory != 0 && self.translation { feature::LOCK_MAPPINGS } else { 0 };
        let shared = if self.view_has_huge_pages() { 0 } else { feature::SHARED_MEMORY };
        memory | feature::PIN_CR | msr | feature::DMA_GUARD | shared | mappings | feature::PIN_DTR
    }

    /// Private memory hides 4 KiB pages of the host view with `mprotect`,
    /// which a hugetlbfs mapping (`memory.hugepages`) cannot split: such a
    /// VM offers no private memory rather than a promise it cannot keep.
    pub(super) fn view_has_huge_pages(&self) -> bool {
        use vm_memory::GuestMemoryBackend;
        self.host_view.iter().any(|r| r.is_hugetlbfs() == Some(true))
    }

    /// The CPUID leaves advertising the ABI.
    pub fn cpuid_leaves(enabled: bool, features: u32) -> [(u32, [u32; 4]); 2] {
        abi::cpuid_leaves(enabled, features, HEKI_DOORBELL)
    }

    pub fn policy(&self) -> Policy {
        self.enforcer.policy()
    }

    pub fn set_policy(&self, policy: Policy) {
        self.enforcer.set_policy(policy);
    }

    /// Guest RAM as the guest has it now (boot regions plus plugged memory).
    pub fn ram(&self) -> Arc<RamLayout> {
        self.traps.ram()
    }

    /// Applies new protections and the memslot layout they need, atomically.
    /// Returns once no device access judged under the old protections can
    /// still land and no vCPU runs with the old memslots.
    pub(super) fn update(
        &self,
        change: impl FnOnce(&mut MemoryProtections) -> Result<(), AbiError>,
    ) -> Result<(), AbiError> {
        self.update_with_view(change, |_| Ok(()))
    }

    /// `update_with_view`, with a step that sees the new protections once the
    /// new memslots are in place and while no device access is in flight: what
    /// it reads of guest memory is what the lock covers.
    pub(super) fn update_measured(
        &self,
        change: impl FnOnce(&mut MemoryProtections) -> Result<(), AbiError>,
        measure: impl FnOnce(&mut MemoryProtections),
    ) -> Result<(), AbiError> {
        self.update_inner(change, measure, |_| Ok(()))
    }

    /// `update`, plus a change to the VMM's view of RAM made while no device
    /// access is in flight (so nothing lands in a page after it turns private).
    pub(super) fn update_with_view(
        &self,
        change: impl FnOnce(&mut MemoryProtections) -> Result<(), AbiError>,
        view: impl FnOnce(&GuestMemoryMmap) -> std::io::Result<()>,
    ) -> Result<(), AbiError> {
        self.update_inner(change, |_| {}, view)
    }

    pub(super) fn update_inner(
        &self,
        change: impl FnOnce(&mut MemoryProtections) -> Result<(), AbiError>,
        measure: impl FnOnce(&mut MemoryProtections),
        view: impl FnOnce(&GuestMemoryMmap) -> std::io::Result<()>,
    ) -> Result<(), AbiError> {
        let mut slots = self.traps.slots();
        let mut next = self.enforcer.protections().clone();
        change(&mut next)?;
        // heki's read-only pages plus the pages the introspection agent tracks.
        let heki_pages = next.readonly_pages();
        let plan = slots.plan_with_heki(&self.ram(), &heki_pages).map_err(|_| AbiError::NoSpace)?;
        // Waits for device accesses in flight; new ones wait for us.
        let mut protections = self.enforcer.protections_mut();
        if slots.differs(&plan) {
            let control = self.enforcer.control();
            control.hold_vcpus().map_err(|e| {
                log::error!("heki: {e}");
                AbiError::BadAddress
            })?;
            let applied = slots.apply(self.traps.host(), &plan);
            control.release_vcpus();
            applied.map_err(|e| {
                log::error!("heki: memslot update failed: {e}");
                match e {
                    MemslotError::NoSlotId => AbiError::NoSpace,
                    MemslotError::Host(_) => AbiError::BadAddress,
                }
            })?;
        }
        // Written pages are read-only now (vCPU writes trap and wait for the
        // protections lock we hold), and no device access is in flight.
        measure(&mut next);
        if next.private.is_enabled() {
            // Before the view changes; every read is held either way (see `CheckedMemory::get_slices`).
            self.enforcer.epoch().judge_reads();
        }
        view(&self.host_view).map_err(|e| {
            log::error!("heki: cannot change the VMM's view of guest memory: {e}");
            AbiError::BadAddress
        })?;
        slots.set_heki_pages(heki_pages);
        *protections = next;
        Ok(())
    }

    /// An MMIO write no device claimed: if it hit RAM, a read-only memslot
    /// trapped it. Heki judges it; the allowed bytes are written here, under
    /// the same lock as the judgement, and a violation is enforced.
    pub fn on_unclaimed_mmio_write(&self, vcpu: u8, gpa: u64, data: &[u8], site: impl FnOnce() -> ExitSite) {
        self.trapped_write(vcpu, gpa, data, site, true);
    }

    /// A trapped write the introspection agent denied: nothing is written,
    /// but a heki lock it touched is still judged and enforced (recorded,
    /// and the policy's pause or shutdown applies).
    pub fn on_denied_mmio_write(&self, vcpu: u8, gpa: u64, data: &[u8], site: impl FnOnce() -> ExitSite) {
        self.trapped_write(vcpu, gpa, data, site, false);
    }

    /// Whether a write of `len` bytes at `gpa` touches a heki-locked byte.
    pub fn write_is_locked(&self, gpa: u64, len: usize) -> bool {
        !self.enforcer.protections().check_write(gpa, len).allowed()
    }

    pub(super) fn trapped_write(&self, vcpu: u8, gpa: u64, data: &[u8], site: impl FnOnce() -> ExitSite, apply: bool) {
        let len = data.len();
        if !self.ram().contains(gpa, len as u64) {
            // Not RAM: an access to a device we lack; dropped.
            return;
        }
        let verdict = {
            let protections = self.enforcer.protections();
            let access = Access::VcpuWrite { gpa, len };
            let verdict = judge(access, Protections { memory: &protections, pins: None }, self.policy());
            let runs = if apply { verdict.bytes_to_apply(len) } else { Vec::new() };
            for (offset, run) in runs {
                let Some(bytes) = data.get(offset..offset.saturating_add(run)) else { continue };
                let at = gpa.saturating_add(offset as u64);
                if let Err(e) = self.ram_mem.write_slice(bytes, GuestAddress(at)) {
                    crate::rate_limited!(warn, "heki: cannot apply guest write at {at:#x}: {e}");
                }
            }
            verdict
        };
        if verdict.is_violation() {
            let first = gpa.saturating_add(verdict.first_forbidden().unwrap_or(0));
            self.enforcer.enforce(&verdict, &format!("vcpu {vcpu}"), |record| {
                record.vcpu = Some(u32::from(vcpu));
                record.gpa = Some(first);
                site().fill(record);
            });
        }
    }

    /// A heki call made at `cpl`; true if it may run (CPL 0).
    pub fn on_call(&self, vcpu: u8, rip: u64, cpl: u8) -> bool {
        let memory = MemoryProtections::default();
        let verdict = judge(Access::Call { cpl }, Protections { memory: &memory, pins: None }, self.policy());
        if verdict.is_violation() {
            self.enforcer.enforce(&verdict, &format!("vcpu {vcpu}"), |record| {
                record.vcpu = Some(u32::from(vcpu));
                record.rip = Some(rip);
                record.details.insert("cpl".into(), cpl.to_string());
            });
        }
        verdict.performs_access()
    }
}

/// KVM's memslot budget, or less for tests (`HEKIVISOR_MEMSLOT_BUDGET`), so
/// they reach -ENOSPC without thousands of calls.
pub fn memslot_budget(host: &dyn VmSlots) -> usize {
    std::env::var(MEMSLOT_BUDGET_ENV)
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
        .map_or(host.max_memslots(), |b| b.min(host.max_memslots()))
}
