//! Guest memory as devices see it: every access asks heki first, as an
//! IOMMU would, and the permission check and the copy happen under one read
//! lock that a new protection waits for. So once a lock call returns, no
//! access judged under the old permissions can still land.
//!
//! `CheckedMemory` implements vm-memory's access-checked `GuestMemory`
//! trait, so virtio-queue's descriptor reads and used-ring writes go through
//! it too. It never hands out the raw mapping (`physical_memory` is `None`).
// Guest-supplied numbers: no unchecked arithmetic here.
#![deny(clippy::arithmetic_side_effects)]

use std::iter::FusedIterator;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};

use heki::{Access, MemoryProtections, Outcome, Policy, Protections, Verdict, ViolationRecord, judge};
use vm_memory::bitmap::BS;
use vm_memory::guest_memory::GuestMemorySliceIterator;
use vm_memory::{GuestAddress, GuestMemory, GuestMemoryBackend, GuestMemoryError, GuestMemoryMmap, Permissions};

use super::ports::RunControl;
use super::violations::ViolationLog;

/// Applies heki's verdicts: the policy, the violation log, the VM's run
/// control, and the memory protections behind their read/write lock.
pub struct Enforcer {
    memory: RwLock<MemoryProtections>,
    /// Changes with every protection change (under the write lock), so
    /// per-device memos of writable pages know when they went stale.
    generation: AtomicU64,
    /// Set once the guest made memory private: reads must be judged from then on.
    private_memory: std::sync::atomic::AtomicBool,
    policy: AtomicU8,
    pub violations: ViolationLog,
    control: Arc<dyn RunControl>,
}

impl Enforcer {
    pub fn new(policy: Policy, control: Arc<dyn RunControl>) -> Self {
        Enforcer {
            memory: RwLock::default(),
            generation: AtomicU64::new(0),
            private_memory: std::sync::atomic::AtomicBool::new(false),
            policy: AtomicU8::new(policy_code(policy)),
            violations: ViolationLog::default(),
            control,
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

    /// The protections, held for the duration of one access.
    pub(super) fn protections(&self) -> RwLockReadGuard<'_, MemoryProtections> {
        self.memory.read().unwrap_or_else(|p| p.into_inner())
    }

    /// Waits for every access in flight, then lets the caller change the
    /// protections while no new access can be judged.
    pub(super) fn protections_mut(&self) -> RwLockWriteGuard<'_, MemoryProtections> {
        let guard = self.memory.write().unwrap_or_else(|p| p.into_inner());
        // Under the write lock: no reader can see the old generation with new protections.
        self.generation.fetch_add(1, Ordering::Release);
        guard
    }

    /// From now on device reads are judged too (set under the write lock).
    pub(super) fn note_private_memory(&self) {
        self.private_memory.store(true, Ordering::Release);
    }

    /// Records a violation verdict (the caller fills in who and where) and
    /// applies its outcome to the whole VM.
    pub fn enforce(&self, verdict: &Verdict, source: &str, fill: impl FnOnce(&mut ViolationRecord)) {
        if let Some(mut record) = verdict.record() {
            fill(&mut record);
            self.violations.record(record);
        }
        if verdict.outcome() != Outcome::Continue {
            self.control.stop_for_violation(verdict.outcome(), source);
        }
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

/// Who accesses memory through a `CheckedMemory`: named in violations.
#[derive(Debug, Default)]
pub struct Accessor {
    pub name: String,
    /// Accesses heki refused.
    pub refused: AtomicU64,
    /// Pages recently found writable, valid for one protections generation:
    /// devices write the same buffers, status bytes and rings over and over.
    memo: PageMemo,
    /// Pages recently found readable (shared), once memory is private.
    readable: PageMemo,
}

impl Accessor {
    pub fn new(name: impl Into<String>) -> Self {
        Accessor { name: name.into(), ..Accessor::default() }
    }
}

const MEMO_SLOTS: usize = 256;
const NO_PAGE: u64 = u64::MAX;

#[derive(Debug)]
struct PageMemo {
    generation: AtomicU64,
    pages: [AtomicU64; MEMO_SLOTS],
}

impl Default for PageMemo {
    fn default() -> Self {
        PageMemo { generation: AtomicU64::new(u64::MAX), pages: std::array::from_fn(|_| AtomicU64::new(NO_PAGE)) }
    }
}

impl PageMemo {
    fn slot(&self, page: u64) -> &AtomicU64 {
        // Fibonacci hashing spreads rings, headers and buffers that sit at
        // round addresses; the top 8 bits index the 256 slots.
        &self.pages[(page.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 56) as usize]
    }

    /// Whether `page` is known good in `generation` (the caller holds the
    /// read lock, so the generation cannot change meanwhile).
    fn knows(&self, page: u64, generation: u64) -> bool {
        if self.generation.load(Ordering::Acquire) != generation {
            self.pages.iter().for_each(|p| p.store(NO_PAGE, Ordering::Relaxed));
            self.generation.store(generation, Ordering::Release);
            return false;
        }
        self.slot(page).load(Ordering::Relaxed) == page
    }

    fn remember(&self, page: u64) {
        self.slot(page).store(page, Ordering::Relaxed);
    }
}

/// A device's view of guest RAM, policed by heki.
#[derive(Clone)]
pub struct CheckedMemory {
    ram: GuestMemoryMmap,
    enforcer: Arc<Enforcer>,
    accessor: Arc<Accessor>,
}

impl CheckedMemory {
    pub fn new(ram: GuestMemoryMmap, enforcer: Arc<Enforcer>, accessor: Arc<Accessor>) -> Self {
        CheckedMemory { ram, enforcer, accessor }
    }

    pub fn accessor(&self) -> &Accessor {
        &self.accessor
    }

    /// Judges a device write of `[gpa, gpa + len)`, reporting a violation;
    /// true if the write may be performed.
    fn judge_write(&self, protections: &MemoryProtections, gpa: u64, len: u64) -> bool {
        let page = gpa >> heki::PAGE_SHIFT;
        let last = len.checked_sub(1).and_then(|n| gpa.checked_add(n));
        let one_page = last.is_some_and(|last| last >> heki::PAGE_SHIFT == page);
        let memo = &self.accessor.memo;
        if one_page && memo.knows(page, self.enforcer.generation.load(Ordering::Acquire)) {
            return true;
        }
        let access = Access::DmaWrite { gpa, len };
        let verdict = judge(access, Protections { memory: protections, pins: None }, self.enforcer.policy());
        if verdict.is_violation() {
            if !verdict.performs_access() {
                self.accessor.refused.fetch_add(1, Ordering::Relaxed);
            }
            let device = &self.accessor.name;
            self.enforcer.enforce(&verdict, device, |record| {
                record.gpa = Some(gpa);
                record.size = Some(len);
                record.details.insert("device".into(), device.clone());
            });
        } else if one_page && !protections.bytes.page_has_bytes(page) {
            // Only whole writable pages: a page with protected bytes is judged each time.
            memo.remember(page);
        }
        verdict.performs_access()
    }

    /// Judges a device read; true if it may be performed.
    fn judge_read(&self, protections: &MemoryProtections, gpa: u64, len: u64) -> bool {
        let page = gpa >> heki::PAGE_SHIFT;
        let last = len.checked_sub(1).and_then(|n| gpa.checked_add(n));
        let one_page = last.is_some_and(|last| last >> heki::PAGE_SHIFT == page);
        let memo = &self.accessor.readable;
        if one_page && memo.knows(page, self.enforcer.generation.load(Ordering::Acquire)) {
            return true;
        }
        let access = Access::DmaRead { gpa, len };
        let verdict = judge(access, Protections { memory: protections, pins: None }, self.enforcer.policy());
        if verdict.is_violation() {
            self.accessor.refused.fetch_add(1, Ordering::Relaxed);
            let device = &self.accessor.name;
            self.enforcer.enforce(&verdict, device, |record| {
                record.gpa = Some(gpa);
                record.size = Some(len);
                record.details.insert("device".into(), device.clone());
                record.details.insert("access".into(), "read".into());
            });
        } else if one_page {
            memo.remember(page);
        }
        verdict.performs_access()
    }

    /// Asks whether the device may write `[gpa, gpa + len)` without writing
    /// (rings checked when the driver starts the device); a refusal is reported.
    pub fn probe_write(&self, gpa: u64, len: u64) -> bool {
        let protections = self.enforcer.protections();
        self.judge_write(&protections, gpa, len)
    }
}

/// Slices that keep the protections read-locked until a write is done.
struct HeldSlices<'a, I> {
    slices: I,
    _protections: Option<RwLockReadGuard<'a, MemoryProtections>>,
}

impl<I: Iterator> Iterator for HeldSlices<'_, I> {
    type Item = I::Item;
    fn next(&mut self) -> Option<I::Item> {
        self.slices.next()
    }
}

impl<I: FusedIterator> FusedIterator for HeldSlices<'_, I> {}

impl<'a, I: GuestMemorySliceIterator<'a, BS<'a, ()>>> GuestMemorySliceIterator<'a, BS<'a, ()>> for HeldSlices<'a, I> {}

fn refused(gpa: GuestAddress) -> GuestMemoryError {
    GuestMemoryError::IOError(std::io::Error::new(
        std::io::ErrorKind::PermissionDenied,
        format!("heki forbids this access at {:#x}", gpa.0),
    ))
}

/// Whether a guest-memory error is heki's refusal (rather than a bad address).
pub fn is_refusal(e: &GuestMemoryError) -> bool {
    matches!(e, GuestMemoryError::IOError(io) if io.kind() == std::io::ErrorKind::PermissionDenied)
}

impl GuestMemory for CheckedMemory {
    type PhysicalMemory = GuestMemoryMmap;
    type Bitmap = ();

    fn check_range(&self, addr: GuestAddress, count: usize, access: Permissions) -> bool {
        let protections = self.enforcer.protections();
        GuestMemoryBackend::check_range(&self.ram, addr, count)
            && protections.private.range_shared(addr.0, count as u64)
            && (!access.has_write() || protections.range_writable(addr.0, count as u64))
    }

    fn get_slices<'a>(
        &'a self,
        addr: GuestAddress,
        count: usize,
        access: Permissions,
    ) -> vm_memory::GuestMemoryResult<impl GuestMemorySliceIterator<'a, BS<'a, ()>>> {
        let slices = GuestMemoryBackend::get_slices(&self.ram, addr, count);
        if !access.has_write() && !self.enforcer.private_memory.load(Ordering::Acquire) {
            // Reads are refused only for private pages: until there are any, no lock.
            return Ok(HeldSlices { slices, _protections: None });
        }
        let protections = self.enforcer.protections();
        let allowed = if access.has_write() {
            self.judge_write(&protections, addr.0, count as u64)
        } else {
            self.judge_read(&protections, addr.0, count as u64)
        };
        if !allowed {
            return Err(refused(addr));
        }
        Ok(HeldSlices { slices, _protections: Some(protections) })
    }
}
