//! The per-VM heki state and the actions that apply heki's verdicts: memslot
//! relayout, guest memory writes, registers, events.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use heki::abi::{self, feature};
use heki::{AbiError, MemoryProtections, Policy, ProtectRange, RamLayout};
use hypervisor::MemSlot;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::memslots::{MemslotError, MemslotTable, SlotSpec};
use super::pins::PinState;
use super::violations::{Violation, ViolationLog};
use crate::config::HekiConfig;
use crate::cpu::VcpuGate;
use crate::layout::ports::HEKI_DOORBELL;

/// Caps the memslot budget below KVM's (`KVM_CAP_NR_MEMSLOTS`); for tests.
pub const MEMSLOT_BUDGET_ENV: &str = "HEKIVISOR_MEMSLOT_BUDGET";

/// What the vCPU loop must do after heki handled an exit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HekiAction {
    Continue,
    /// Policy `pause`: the VM is already held; tell the VMM thread.
    Paused,
    /// Policy `shutdown`: stop the VM.
    Shutdown,
}

pub struct HekiRuntime {
    policy: Mutex<Policy>,
    /// Protections and the installed memslots change together, under one lock.
    state: Mutex<(MemoryProtections, MemslotTable)>,
    /// A read-only copy of the protections for device workers, with a
    /// generation that changes on every update (lock-free fast path).
    snapshot: Mutex<Arc<MemoryProtections>>,
    generation: AtomicU64,
    kvm_vm: Arc<hypervisor::Vm>,
    mem: GuestMemoryMmap,
    ram: RamLayout,
    pub violations: ViolationLog,
    pub cr_check_interval_ms: u64,
    pub(super) pin_state: PinState,
    msr_filter: bool,
}

/// Adapts guest memory for heki's page-list decoder.
struct GuestReader<'a>(&'a GuestMemoryMmap);

impl heki::GuestMemoryReader for GuestReader<'_> {
    fn read(&self, gpa: u64, buf: &mut [u8]) -> bool {
        self.0.read_slice(buf, GuestAddress(gpa)).is_ok()
    }
}

impl HekiRuntime {
    pub fn new(
        config: &HekiConfig,
        kvm_vm: Arc<hypervisor::Vm>,
        mem: GuestMemoryMmap,
        ram: RamLayout,
        boot_slots: &[MemSlot],
        vcpus: usize,
    ) -> Self {
        // Pinned MSRs need filtered writes to exit to user space.
        let msr_filter = match kvm_vm.enable_msr_filter_exits() {
            Ok(()) => true,
            Err(e) => {
                log::warn!("heki: MSR pinning unavailable: {e}");
                false
            }
        };
        // Tests shrink the budget to reach -ENOSPC without thousands of calls.
        let budget = std::env::var(MEMSLOT_BUDGET_ENV)
            .ok()
            .and_then(|v| v.parse::<usize>().ok())
            .map_or(kvm_vm.max_memslots(), |b| b.min(kvm_vm.max_memslots()));
        let table = MemslotTable::new(boot_slots, budget);
        HekiRuntime {
            policy: Mutex::new(config.policy),
            state: Mutex::new((MemoryProtections::default(), table)),
            snapshot: Mutex::new(Arc::new(MemoryProtections::default())),
            generation: AtomicU64::new(0),
            kvm_vm,
            mem,
            ram,
            violations: ViolationLog::default(),
            cr_check_interval_ms: config.cr_check_interval_ms,
            pin_state: PinState::new(vcpus),
            msr_filter,
        }
    }

    pub(super) fn kvm_vm(&self) -> &hypervisor::Vm {
        &self.kvm_vm
    }

    /// Whether pinned MSRs are enforced (the host has the MSR filter).
    pub fn msr_pinning(&self) -> bool {
        self.msr_filter
    }

    pub fn pins(&self) -> &PinState {
        &self.pin_state
    }

    /// Feature bits this VMM implements on this host.
    pub fn features(&self) -> u32 {
        let memory =
            if self.kvm_vm.has_readonly_memory() { feature::PROTECT_MEMORY | feature::PROTECT_BYTES } else { 0 };
        let msr = if self.msr_filter { feature::PIN_MSR } else { 0 };
        // Every device write to guest memory goes through the DMA guard.
        memory | feature::PIN_CR | msr | feature::DMA_GUARD
    }

    /// The CPUID leaves advertising the ABI.
    pub fn cpuid_leaves(enabled: bool, features: u32) -> [(u32, [u32; 4]); 2] {
        abi::cpuid_leaves(enabled, features, HEKI_DOORBELL)
    }

    pub fn policy(&self) -> Policy {
        *self.policy.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn set_policy(&self, policy: Policy) {
        *self.policy.lock().unwrap_or_else(|p| p.into_inner()) = policy;
    }

    fn state(&self) -> MutexGuard<'_, (MemoryProtections, MemslotTable)> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn ram(&self) -> &RamLayout {
        &self.ram
    }

    /// Applies new protections and the memslot layout they need, atomically.
    fn update(
        &self,
        gate: Option<&VcpuGate>,
        change: impl FnOnce(&mut MemoryProtections) -> Result<(), AbiError>,
    ) -> Result<(), AbiError> {
        let mut state = self.state();
        let (protections, table) = &mut *state;
        let mut next = protections.clone();
        change(&mut next)?;
        let plan = next.plan(&self.ram, table.max_slots()).map_err(|_| AbiError::NoSpace)?;
        let wanted: Vec<SlotSpec> =
            plan.iter().map(|s| SlotSpec { gpa: s.gpa, size: s.size, readonly: s.readonly }).collect();
        table.apply(&self.kvm_vm, &self.mem, &wanted, gate).map_err(|e| {
            log::error!("heki: memslot update failed: {e}");
            match e {
                MemslotError::NoSlotId => AbiError::NoSpace,
                _ => AbiError::BadAddress,
            }
        })?;
        *self.snapshot.lock().unwrap_or_else(|p| p.into_inner()) = Arc::new(next.clone());
        *protections = next;
        self.generation.fetch_add(1, Ordering::Release);
        Ok(())
    }

    /// PROTECT_MEMORY / `vm.heki-protect`.
    pub fn protect_pages(&self, ranges: &[ProtectRange], who: &str, gate: Option<&VcpuGate>) -> Result<(), AbiError> {
        self.update(gate, |p| p.protect_pages(ranges))?;
        let pages: u64 = ranges.iter().map(|r| r.end - r.start).sum();
        crate::events::emit("heki", "protected", &[("by", who.to_string()), ("pages", pages.to_string())]);
        Ok(())
    }

    /// PROTECT_BYTES.
    pub fn protect_bytes(&self, gpa: u64, len: u64, who: &str, gate: Option<&VcpuGate>) -> Result<(), AbiError> {
        let ram = self.ram.clone();
        self.update(gate, |p| p.protect_bytes(&ram, gpa, len))?;
        crate::events::emit(
            "heki",
            "protected",
            &[("by", who.to_string()), ("bytes", len.to_string()), ("gpa", format!("{gpa:#x}"))],
        );
        Ok(())
    }

    /// Changes whenever the protections change.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// The current protections, for callers that cache them per generation.
    pub fn snapshot(&self) -> Arc<MemoryProtections> {
        self.snapshot.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Whether a device may write `[gpa, gpa + len)` (the DMA guard's question).
    pub fn range_writable(&self, gpa: u64, len: u64) -> bool {
        self.state().0.range_writable(gpa, len)
    }

    /// Judges a write against the current protections.
    pub(super) fn state_check_write(&self, gpa: u64, len: usize) -> heki::WriteCheck {
        self.state().0.check_write(gpa, len)
    }

    pub fn query(&self, gpa: u64) -> Result<u64, AbiError> {
        self.state().0.query(&self.ram, gpa)
    }

    /// Decodes a page list from guest memory.
    pub fn decode_page_list(&self, list: u64) -> Result<Vec<ProtectRange>, AbiError> {
        abi::decode_page_list(&GuestReader(&self.mem), &self.ram, list)
    }

    /// A guest write that a read-only memslot turned into an MMIO exit.
    /// Applies what may land, reports what may not, and says what follows.
    pub fn on_guest_write(&self, vcpu: u8, gpa: u64, data: &[u8], rip: impl FnOnce() -> Option<u64>) -> HekiAction {
        if !self.ram.contains(gpa, data.len() as u64) {
            // Not RAM: an MMIO access to a device we lack; dropped as before.
            return HekiAction::Continue;
        }
        let policy = self.policy();
        let check = self.state().0.check_write(gpa, data.len());
        if check.allowed() || policy.performs_access() {
            self.write_guest(gpa, data);
        } else {
            for (offset, len) in check.allowed_runs() {
                self.write_guest(gpa + offset as u64, &data[offset..offset + len]);
            }
        }
        if check.allowed() {
            return HekiAction::Continue;
        }
        let forbidden = u64::from(check.forbidden.count_ones());
        let first = gpa + u64::from(check.forbidden.trailing_zeros());
        let mut v = Violation::new("write", action_name(policy));
        v.vcpu = Some(vcpu);
        v.gpa = Some(first);
        v.rip = rip();
        v.size = Some(forbidden);
        self.violations.record(v);
        policy_action(policy)
    }

    /// The VMM's own write into guest RAM on the guest's behalf: the emulated
    /// part of a trapped write. Going straight to the mapping is the point.
    fn write_guest(&self, gpa: u64, bytes: &[u8]) {
        if let Err(e) = self.mem.write_slice(bytes, GuestAddress(gpa)) {
            log::warn!("heki: cannot apply guest write at {gpa:#x}: {e}");
        }
    }

    /// A heki call made from CPL != 0.
    pub fn on_unprivileged_call(&self, vcpu: u8, rip: u64, cpl: u8) -> HekiAction {
        let policy = self.policy();
        let mut v = Violation::new("hypercall", action_name(policy));
        v.vcpu = Some(vcpu);
        v.rip = Some(rip);
        v.details.insert("cpl", cpl.to_string());
        self.violations.record(v);
        policy_action(policy)
    }

    /// Counts of protected pages and bytes, and memslot use.
    pub fn stats(&self) -> (u64, u64, usize, usize) {
        let state = self.state();
        (state.0.pages.protected_pages(), state.0.bytes.total_bytes(), state.1.slot_count(), state.1.max_slots())
    }
}

pub(super) fn action_name(policy: Policy) -> &'static str {
    match policy {
        Policy::Deny => "denied",
        Policy::Log => "logged",
        Policy::Pause => "paused",
        Policy::Shutdown => "shutdown",
    }
}

pub(super) fn policy_action(policy: Policy) -> HekiAction {
    match policy {
        Policy::Deny | Policy::Log => HekiAction::Continue,
        Policy::Pause => HekiAction::Paused,
        Policy::Shutdown => HekiAction::Shutdown,
    }
}
