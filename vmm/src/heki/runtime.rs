//! The per-VM heki state and the VMM side of its exit path: protections and
//! memslots change together, trapped writes are judged and applied, and
//! every verdict goes through the `Enforcer`.

use std::sync::{Arc, OnceLock};

use heki::abi::{self, feature};
use heki::{
    AbiError, Access, KernelImage, Measurement, MemoryProtections, Mismatch, PAGE_SHIFT, Permissions, PlannedSlot,
    Policy, ProtectRange, Protections, RamLayout, judge,
};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::Enforcer;
use super::pins::PinState;
use super::translation::TranslationState;
use super::violations::ViolationLog;
use crate::config::HekiConfig;
use crate::guest_access::AccessPolicy;
use crate::host_view;
use crate::layout::ports::HEKI_DOORBELL;
use crate::memory::GuestRam;
use crate::traps::VmTraps;
use crate::traps::memslots::MemslotError;
use crate::traps::ports::VmSlots;

/// Caps the memslot budget below KVM's (`KVM_CAP_NR_MEMSLOTS`); for tests.
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

pub const MEMSLOT_BUDGET_ENV: &str = "HEKIVISOR_MEMSLOT_BUDGET";

/// How private pages are kept from the host.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PrivateMode {
    /// The host kernel maps them for KVM only; the VMM has no mapping.
    Kernel,
    /// The VMM's own view has them `PROT_NONE`; KVM's mapping remains.
    VmmView,
}

impl PrivateMode {
    pub fn as_str(self) -> &'static str {
        match self {
            PrivateMode::Kernel => "kernel",
            PrivateMode::VmmView => "vmm-view",
        }
    }

    /// Why this mode, for `vm.heki`.
    pub fn reason(self) -> &'static str {
        match self {
            PrivateMode::Kernel => "KVM maps private pages from a guest_memfd; the VMM has no mapping of them",
            PrivateMode::VmmView => {
                "this host's KVM has no private memory attributes (KVM_CAP_MEMORY_ATTRIBUTES = 0) and still needs the VMM's mapping for a guest_memfd slot, so private pages are PROT_NONE in the VMM's own view of RAM; KVM's mapping remains"
            }
        }
    }
}

pub struct HekiRuntime {
    enforcer: Arc<Enforcer>,
    /// The installed memslots (shared with the introspection agent); their
    /// lock also serializes protection changes.
    traps: Arc<VmTraps>,
    /// The guest's own view of RAM, for the paths that act as its CPU: page
    /// lists it hands over, and the emulated part of trapped writes (judged
    /// under the enforcer's lock first).
    ram_mem: GuestMemoryMmap,
    /// The VMM's view, where private pages are made inaccessible.
    host_view: GuestMemoryMmap,
    ram: RamLayout,
    pub cr_check_interval_ms: u64,
    /// Whether LOCK_MAPPINGS is offered (`HekiConfig::translation`).
    translation: bool,
    pub(super) pin_state: PinState,
    msr_filter: bool,
    translations: TranslationState,
    /// The ELF kernel the VMM loaded, set once before the vCPUs start.
    kernel_image: OnceLock<KernelImage>,
}

/// What measuring one PROTECT_MEMORY request found.
#[derive(Default)]
struct LockReport {
    /// The digest of each entry, in request order (`None`: RAM unreadable).
    digests: Vec<Option<heki::image::Sha256Digest>>,
    /// Whether any EXEC range inside the image was compared.
    compared: bool,
    mismatches: Vec<Mismatch>,
}

/// Adapts guest memory for heki's page-list decoder.
pub(super) struct GuestReader<'a>(pub(super) &'a GuestMemoryMmap);

impl heki::GuestMemoryReader for GuestReader<'_> {
    fn read(&self, gpa: u64, buf: &mut [u8]) -> bool {
        self.0.read_slice(buf, GuestAddress(gpa)).is_ok()
    }
}

impl HekiRuntime {
    pub fn new(
        config: &HekiConfig,
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
        config: &HekiConfig,
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
        let ram = traps.ram().clone();
        HekiRuntime {
            enforcer,
            traps,
            ram_mem: guest_ram.kvm.clone(),
            host_view: guest_ram.host.clone(),
            ram,
            cr_check_interval_ms: config.cr_check_interval_ms,
            translation: config.translation,
            pin_state: PinState::new(vcpus),
            msr_filter,
            translations: TranslationState::default(),
            kernel_image: OnceLock::new(),
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
        memory | feature::PIN_CR | msr | feature::DMA_GUARD | feature::SHARED_MEMORY | mappings | feature::PIN_DTR
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

    pub fn ram(&self) -> &RamLayout {
        &self.ram
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
    fn update_measured(
        &self,
        change: impl FnOnce(&mut MemoryProtections) -> Result<(), AbiError>,
        measure: impl FnOnce(&mut MemoryProtections),
    ) -> Result<(), AbiError> {
        self.update_inner(change, measure, |_| Ok(()))
    }

    /// `update`, plus a change to the VMM's view of RAM made while no device
    /// access is in flight (so nothing lands in a page after it turns private).
    fn update_with_view(
        &self,
        change: impl FnOnce(&mut MemoryProtections) -> Result<(), AbiError>,
        view: impl FnOnce(&GuestMemoryMmap) -> std::io::Result<()>,
    ) -> Result<(), AbiError> {
        self.update_inner(change, |_| {}, view)
    }

    fn update_inner(
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
        let plan = slots.plan_with_heki(&self.ram, &heki_pages).map_err(|_| AbiError::NoSpace)?;
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

    /// PROTECT_MEMORY / `vm.heki-protect`: locks, then measures each range
    /// as locked (SHA-256, through KVM's view of RAM, under the same update)
    /// and compares EXEC ranges inside the loaded kernel image with it.
    pub fn protect_pages(&self, ranges: &[ProtectRange], who: &str) -> Result<(), AbiError> {
        let mut report = LockReport::default();
        let mut kernel_sha256 = None;
        self.update_measured(
            |p| p.protect_pages(ranges),
            |p| {
                report = self.measure(ranges, &mut p.measurements);
                kernel_sha256 = p.measurements.kernel_sha256();
            },
        )?;
        let pages: u64 = ranges.iter().map(|r| r.end.saturating_sub(r.start)).fold(0, u64::saturating_add);
        let list = |f: &dyn Fn(usize, &ProtectRange) -> String| {
            ranges.iter().enumerate().map(|(i, r)| f(i, r)).collect::<Vec<_>>().join(",")
        };
        let mut props = vec![
            ("by", who.to_string()),
            ("pages", pages.to_string()),
            ("ranges", list(&|_, r| format!("{:#x}-{:#x}", r.start << PAGE_SHIFT, r.end << PAGE_SHIFT))),
            (
                "sha256",
                list(&|i, _| {
                    report.digests.get(i).copied().flatten().map_or_else(String::new, |d| heki::image::hex(&d))
                }),
            ),
        ];
        if let Some(digest) = kernel_sha256 {
            props.push(("kernel_sha256", heki::image::hex(&digest)));
        }
        if report.compared {
            props.push(("image_mismatches", report.mismatches.len().to_string()));
        }
        crate::events::emit("heki", "protected", &props);
        for m in &report.mismatches {
            self.report_mismatch(m, who);
        }
        Ok(())
    }

    /// Digests every entry of a lock, records them, and compares EXEC ranges
    /// inside the image; called with the lock in place.
    fn measure(&self, ranges: &[ProtectRange], measurements: &mut heki::Measurements) -> LockReport {
        let image = self.kernel_image.get();
        let mut report = LockReport::default();
        for r in ranges {
            let (start, end) = (r.start << PAGE_SHIFT, r.end << PAGE_SHIFT);
            let text = r.perms.contains(Permissions::EXEC) && image.is_some_and(|i| i.overlaps(start, end));
            let mut content = vec![0u8; usize::try_from(end.saturating_sub(start)).unwrap_or(0)];
            if let Err(e) = self.ram_mem.read_slice(&mut content, GuestAddress(start)) {
                log::warn!("heki: cannot measure the lock at {start:#x}: {e}");
                report.digests.push(None);
                continue;
            }
            let sha256 = heki::image::sha256(&content);
            report.digests.push(Some(sha256));
            measurements.record(Measurement { start, end, perms: r.perms, sha256, kernel: text });
            if let Some(image) = image.filter(|_| text) {
                report.compared = true;
                report.mismatches.extend(image.compare(start, &content));
            }
        }
        report
    }

    /// One run of locked text that is not the image's, through the judge.
    fn report_mismatch(&self, m: &Mismatch, who: &str) {
        let memory = MemoryProtections::default();
        let access = Access::ImageText { offset: m.offset, len: m.len };
        let verdict = judge(access, Protections { memory: &memory, pins: None }, self.policy());
        if verdict.is_violation() {
            let source = if who == "guest" { "guest lock".to_string() } else { format!("{who} lock") };
            self.enforcer.enforce(&verdict, &source, |record| {
                record.gpa = Some(m.gpa);
                record.details.insert("va".into(), format!("{:#x}", m.va));
            });
        }
    }

    /// PROTECT_BYTES.
    pub fn protect_bytes(&self, gpa: u64, len: u64, who: &str) -> Result<(), AbiError> {
        let ram = self.ram.clone();
        self.update(|p| p.protect_bytes(&ram, gpa, len))?;
        crate::events::emit(
            "heki",
            "protected",
            &[("by", who.to_string()), ("bytes", len.to_string()), ("gpa", format!("{gpa:#x}"))],
        );
        Ok(())
    }

    pub fn query(&self, gpa: u64) -> Result<u64, AbiError> {
        let bits = self.enforcer.protections().query(&self.ram, gpa)?;
        // This host always keeps a (PROT_NONE) mapping of private pages.
        let unmapped = bits & heki::private::QUERY_PRIVATE != 0 && self.private_mode() == PrivateMode::Kernel;
        Ok(bits | if unmapped { heki::private::QUERY_UNMAPPED } else { 0 })
    }

    /// Pages up to the end of the highest RAM region.
    fn ram_pages(&self) -> u64 {
        self.ram.regions.iter().map(|&(_, end)| end >> PAGE_SHIFT).max().unwrap_or(0)
    }

    /// Whether the guest made its memory private.
    pub fn private_memory_enabled(&self) -> bool {
        self.enforcer.protections().private.is_enabled()
    }

    /// Where private pages are kept out of the host's reach.
    pub fn private_mode(&self) -> PrivateMode {
        PrivateMode::VmmView
    }

    /// PRIVATE_MEMORY(1): every page not shared becomes inaccessible to the VMM.
    pub fn enable_private_memory(&self) -> Result<(), AbiError> {
        let ram = self.ram.clone();
        let newly_private = std::cell::RefCell::new(Vec::new());
        self.update_with_view(
            |p| {
                if !p.private.is_enabled() {
                    p.private.enable();
                    *newly_private.borrow_mut() = p.private.private_ranges(&ram);
                }
                Ok(())
            },
            |view| {
                // One mprotect per contiguous private run.
                for &(start, end) in newly_private.borrow().iter() {
                    host_view::set_access(view, start << PAGE_SHIFT, (end - start) << PAGE_SHIFT, false)?;
                    self.enforcer.epoch().mark_reads_judged(self.ram_pages(), start, end, true);
                }
                Ok(())
            },
        )?;
        // Idempotent: only the call that turned it on is reported.
        if !newly_private.borrow().is_empty() {
            crate::events::emit("heki", "private-memory", &[("mode", self.private_mode().as_str().to_string())]);
        }
        Ok(())
    }

    /// SET_SHARED: shares `[gpa, gpa + len)` with the host, or makes it private
    /// again (returning only once no device access to it is in flight).
    pub fn set_shared(&self, gpa: u64, len: u64, share: u64) -> Result<(), AbiError> {
        let ram = self.ram.clone();
        self.update_with_view(
            |p| p.private.set_shared(&ram, gpa, len, share),
            |view| {
                host_view::set_access(view, gpa, len, share == 1)?;
                let pages = (gpa >> PAGE_SHIFT, (gpa + len) >> PAGE_SHIFT);
                self.enforcer.epoch().mark_reads_judged(self.ram_pages(), pages.0, pages.1, share == 0);
                Ok(())
            },
        )?;
        let what = if share == 1 { "shared" } else { "private" };
        crate::events::emit("heki", what, &[("gpa", format!("{gpa:#x}")), ("size", len.to_string())]);
        Ok(())
    }

    /// Decodes a page list from guest memory.
    pub fn decode_page_list(&self, list: u64) -> Result<Vec<ProtectRange>, AbiError> {
        abi::decode_page_list(&GuestReader(&self.ram_mem), &self.ram, list)
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

    /// Whether `[gpa, gpa + len)` touches a page the guest keeps private
    /// (its bytes must then reach no event, reply or log).
    pub fn range_is_private(&self, gpa: u64, len: usize) -> bool {
        !self.enforcer.protections().private.range_shared(gpa, len as u64)
    }

    fn trapped_write(&self, vcpu: u8, gpa: u64, data: &[u8], site: impl FnOnce() -> ExitSite, apply: bool) {
        let len = data.len();
        if !self.ram.contains(gpa, len as u64) {
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

    /// The page ranges whose permissions differ from the default, as
    /// (GPA, size in bytes, permissions), for `vm.heki`.
    pub fn protected_ranges(&self) -> Vec<(u64, u64, heki::Permissions)> {
        let protections = self.enforcer.protections();
        protections
            .pages
            .iter()
            .map(|(start, end, perms)| (start << PAGE_SHIFT, (end - start) << PAGE_SHIFT, perms))
            .collect()
    }

    /// The digests of the locked ranges (in GPA order), and the one over
    /// the kernel's ranges.
    pub fn measurements(&self) -> (Vec<Measurement>, Option<heki::image::Sha256Digest>) {
        let protections = self.enforcer.protections();
        (protections.measurements.iter().copied().collect(), protections.measurements.kernel_sha256())
    }

    /// Counts of protected pages and bytes, and memslot use.
    pub fn stats(&self) -> (u64, u64, usize, usize) {
        let (pages, bytes) = {
            let p = self.enforcer.protections();
            (p.pages.protected_pages(), p.bytes.total_bytes())
        };
        let slots = self.traps.slots();
        (pages, bytes, slots.slot_count(), slots.max_slots())
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
