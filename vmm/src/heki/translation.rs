//! Translation integrity on the VMM side (LOCK_MAPPINGS): walks the calling
//! vCPU's page tables, locks the tables that translate the range, and checks
//! every vCPU's live CR3 against what was locked at each register check.
//! The decisions are heki's (`heki::translation`, `heki::judge`); this
//! module reads and writes guest memory and registers.

use std::sync::atomic::Ordering;

use heki::translation::{LockError, NewLock, expect};
use heki::{AbiError, Access, MemoryProtections, PagingMode, Permissions, ProtectRange, Protections, judge};
use vm_memory::{Bytes, GuestAddress};

use super::guest_reader::GuestReader;
use super::runtime::HekiRuntime;
use super::translation_state::{RECHECK, RESTORES_BEFORE_PAUSE};
use crate::traps::ports::VcpuAccess;

fn lock_errno(e: &LockError) -> AbiError {
    match e {
        LockError::InvalidArgument => AbiError::InvalidArgument,
        LockError::NotMapped(_) => AbiError::BadAddress,
        LockError::Expectation { .. } => AbiError::NotPermitted,
        LockError::NoSpace => AbiError::NoSpace,
    }
}

/// Page-table pages are locked readable and immutable: the kernel reads
/// them, nobody may change them.
fn table_permissions() -> Permissions {
    Permissions::from_abi(Permissions::READ.bits() | Permissions::IMMUTABLE.bits()).unwrap_or(Permissions::READ)
}

impl HekiRuntime {
    /// LOCK_MAPPINGS from the guest, on the calling vCPU's live page tables.
    pub fn lock_mappings(&self, vcpu: &dyn VcpuAccess, va: u64, len: u64, expectations: u64) -> Result<(), AbiError> {
        let sregs = vcpu.sregs().map_err(|_| AbiError::BadAddress)?;
        let mode = PagingMode::from_regs(sregs.cr0, sregs.cr4, sregs.efer).map_err(|_| AbiError::InvalidArgument)?;
        let reader = GuestReader(self.kvm_memory());
        let state = self.translations();
        let lock: NewLock = {
            let locks = state.locks.read().unwrap_or_else(|p| p.into_inner());
            locks.prepare(&reader, sregs.cr3, mode, va, len, expectations).map_err(|e| {
                log::warn!("heki: LOCK_MAPPINGS {va:#x}+{len:#x} refused: {e}");
                lock_errno(&e)
            })?
        };
        let ram = (*self.ram()).clone();
        let table_pages = lock.table_pages.clone();
        let top_entries = lock.top_entry_gpas.clone();
        let targets = lock.targets.clone();
        self.update(|p| {
            if expectations & expect::READ_ONLY != 0 && !targets_locked_read_only(p, &ram, &targets) {
                log::warn!("heki: LOCK_MAPPINGS {va:#x}+{len:#x}: the pages it reaches are not locked read-only");
                return Err(AbiError::NotPermitted);
            }
            // Tables shared with a range locked earlier are locked already.
            let ranges: Vec<ProtectRange> = table_pages
                .iter()
                .filter(|&&t| p.query(&ram, t).map_or(true, |bits| bits & Permissions::IMMUTABLE.bits() == 0))
                .map(|&t| ProtectRange {
                    start: t >> heki::PAGE_SHIFT,
                    end: (t >> heki::PAGE_SHIFT) + 1,
                    perms: table_permissions(),
                })
                .collect();
            p.protect_pages(&ranges)?;
            for &entry in &top_entries {
                if p.range_writable(entry, 8) {
                    p.protect_bytes(&ram, entry, 8)?;
                }
            }
            Ok(())
        })?;
        let (tables, tops) = (lock.table_pages.len(), lock.top_entry_gpas.len());
        state.locks.write().unwrap_or_else(|p| p.into_inner()).commit(lock, mode);
        state.active.store(true, Ordering::Relaxed);
        crate::events::emit(
            "heki",
            "mappings-locked",
            &[
                ("vcpu", vcpu.id().to_string()),
                ("va", format!("{va:#x}")),
                ("size", len.to_string()),
                ("table_pages", tables.to_string()),
                ("top_level_entries", tops.to_string()),
            ],
        );
        Ok(())
    }

    /// Checks the locked translations from this vCPU's live CR3. Under every
    /// policy but `log`, a changed top-level entry is written back and the
    /// vCPU's translation reloaded; true if `sregs` must be set again.
    pub(super) fn check_translations(&self, vcpu: &dyn VcpuAccess, sregs: &mut hypervisor::SpecialRegs) -> bool {
        let state = self.translations();
        if !state.is_active() {
            return false;
        }
        // A vCPU without paging (not started yet, or in real mode) has no
        // translation to check: its CR3 is not a page table.
        if PagingMode::from_regs(sregs.cr0, sregs.cr4, sregs.efer).is_err() {
            return false;
        }
        let id = usize::from(vcpu.id());
        let now = u64::try_from(state.clock.elapsed().as_nanos()).unwrap_or(u64::MAX);
        let recheck = u64::try_from(RECHECK.as_nanos()).unwrap_or(u64::MAX);
        if state.seen_cr3[id].load(Ordering::Relaxed) == sregs.cr3
            && now.saturating_sub(state.seen_at[id].load(Ordering::Relaxed)) < recheck
        {
            return false;
        }
        let remapped = {
            let locks = state.locks.read().unwrap_or_else(|p| p.into_inner());
            locks.check(&GuestReader(self.kvm_memory()), sregs.cr3)
        };
        let Some(remapped) = remapped else {
            if let Some(entry) = state.restores.lock().unwrap_or_else(|p| p.into_inner()).get_mut(&vcpu.id())
                && entry.0 == sregs.cr3
            {
                entry.1 = 0;
            }
            state.seen_cr3[id].store(sregs.cr3, Ordering::Relaxed);
            state.seen_at[id].store(now, Ordering::Relaxed);
            return false;
        };
        let memory = MemoryProtections::default();
        let verdict =
            judge(Access::Translation { intact: false }, Protections { memory: &memory, pins: None }, self.policy());
        if verdict.restores() {
            // Put back below: not trusted again until found intact.
            state.seen_cr3[id].store(u64::MAX, Ordering::Relaxed);
        } else {
            // Audit mode leaves the remap standing: walk it again at most
            // once per RECHECK, not at every exit.
            state.seen_cr3[id].store(sregs.cr3, Ordering::Relaxed);
            state.seen_at[id].store(now, Ordering::Relaxed);
            let mut last = state.last_logged.lock().unwrap_or_else(|p| p.into_inner());
            if last.insert(vcpu.id(), (remapped.cr3, remapped.va)) == Some((remapped.cr3, remapped.va)) {
                return false;
            }
        }
        let mut repaired = verdict.restores();
        // The VMM writes only where the guest could: never into a page heki
        // locked (a copy the attacker locked IMMUTABLE keeps its bytes; the
        // VM is paused instead, below).
        let writable = {
            let protections = self.enforcer().protections();
            remapped.repair.iter().all(|&(gpa, _)| protections.range_writable(gpa, 8))
        };
        let mut pause = repaired && !writable;
        if repaired && writable {
            // The VMM acts as the CPU here: it writes the guest's own top-level page.
            for &(gpa, value) in &remapped.repair {
                if let Err(e) = self.kvm_memory().write_obj(value, GuestAddress(gpa)) {
                    log::error!("heki: cannot restore the top-level entry at {gpa:#x}: {e}");
                    repaired = false;
                    pause = true;
                }
            }
        } else {
            repaired = false;
        }
        if verdict.restores() {
            // A guest that rewrites its entry after each restore keeps its
            // remapped code running between checks: stop it.
            let mut restores = state.restores.lock().unwrap_or_else(|p| p.into_inner());
            let entry = restores.entry(vcpu.id()).or_insert((remapped.cr3, 0));
            *entry = if entry.0 == remapped.cr3 { (entry.0, entry.1.saturating_add(1)) } else { (remapped.cr3, 1) };
            pause |= entry.1 >= RESTORES_BEFORE_PAUSE;
        }
        let id = vcpu.id();
        self.enforcer().enforce(&verdict, &format!("vcpu {id}"), |record| {
            record.vcpu = Some(u32::from(id));
            record.rip = vcpu.exit_rip();
            record.details.insert("cpl".into(), sregs.cpl().to_string());
            record.details.insert("va".into(), format!("{:#x}", remapped.va));
            record.details.insert("cr3".into(), format!("{:#x}", remapped.cr3));
            record.details.insert("expected_gpa".into(), format!("{:#x}", remapped.expected_gpa));
            record.details.insert("expected_flags".into(), remapped.expected_flags.to_string());
            record.details.insert("found".into(), remapped.found.clone());
        });
        if pause && self.policy() == heki::Policy::Deny {
            log::warn!(
                "heki: vCPU {id}: the translation of {:#x} (CR3 {:#x}) cannot be kept restored; pausing the VM",
                remapped.va,
                remapped.cr3
            );
            self.enforcer().control().stop_for_violation(heki::Outcome::Pause, &format!("vcpu {id}"));
        }
        if repaired {
            // KVM may hold the old translation (TLB, shadow pages): a paging
            // mode change makes it rebuild from the repaired tables.
            let mut toggled = *sregs;
            toggled.cr4 ^= CR4_PGE;
            if let Err(e) = vcpu.set_sregs(&toggled) {
                log::error!("heki: cannot reload vCPU {id}'s translation: {e}");
            }
        }
        repaired
    }
}

const CR4_PGE: u64 = 1 << 7;

/// Whether every page of `targets` is locked without WRITE.
fn targets_locked_read_only(p: &MemoryProtections, ram: &heki::RamLayout, targets: &[(u64, u64)]) -> bool {
    targets.iter().all(|&(gpa, len)| {
        let pages = len.div_ceil(heki::PAGE_SIZE);
        (0..pages).all(|i| {
            let page = gpa.saturating_add(i.saturating_mul(heki::PAGE_SIZE));
            p.query(ram, page).is_ok_and(|bits| bits & Permissions::WRITE.bits() == 0)
        })
    })
}
