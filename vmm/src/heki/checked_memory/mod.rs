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
use std::sync::{Arc, Mutex, RwLock, RwLockReadGuard, RwLockWriteGuard, Weak};

use heki::{Access, MemoryProtections, Outcome, Policy, Protections, Verdict, ViolationRecord, judge};
use vm_memory::bitmap::BS;
use vm_memory::guest_memory::GuestMemorySliceIterator;
use vm_memory::{GuestAddress, GuestMemory, GuestMemoryBackend, GuestMemoryError, GuestMemoryMmap, Permissions};

use super::violations::ViolationLog;
use crate::traps::ports::RunControl;
use page_bits::PageBits;

mod batch;
mod page_bits;

pub use batch::Batch;

/// Told of each recorded violation (the introspection agent's events); must not block.
pub type ViolationObserver = Box<dyn Fn(&ViolationRecord) + Send + Sync>;

/// Applies heki's verdicts: the policy, the violation log, the VM's run
/// control, and the memory protections behind their read/write lock.
pub struct Enforcer {
    memory: RwLock<MemoryProtections>,
    /// Changes with every protection change (under the write lock), so
    /// per-device memos of writable pages know when they went stale.
    generation: AtomicU64,
    /// Set once the guest made memory private: reads must be judged from then on.
    private_memory: std::sync::atomic::AtomicBool,
    /// One bit per RAM page, set while the page is private: a device read
    /// checks it without the lock (allocated when memory first goes private).
    private_pages: std::sync::OnceLock<PageBits>,
    /// Protection changes in progress: accesses take the locked path meanwhile.
    writers: AtomicU64,
    /// Every accessor, so a change can wait for their lock-free accesses.
    accessors: Mutex<Vec<Weak<Accessor>>>,
    policy: AtomicU8,
    pub violations: ViolationLog,
    control: Arc<dyn RunControl>,
    /// Told of every violation recorded (the introspection agent's events).
    observer: std::sync::OnceLock<ViolationObserver>,
}

impl Enforcer {
    pub fn new(policy: Policy, control: Arc<dyn RunControl>) -> Self {
        Enforcer {
            memory: RwLock::default(),
            generation: AtomicU64::new(0),
            private_memory: std::sync::atomic::AtomicBool::new(false),
            private_pages: std::sync::OnceLock::new(),
            writers: AtomicU64::new(0),
            accessors: Mutex::default(),
            policy: AtomicU8::new(policy_code(policy)),
            violations: ViolationLog::default(),
            control,
            observer: std::sync::OnceLock::new(),
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

    /// The protections, held for the duration of one access.
    pub(super) fn protections(&self) -> RwLockReadGuard<'_, MemoryProtections> {
        self.memory.read().unwrap_or_else(|p| p.into_inner())
    }

    /// Waits for every access in flight, then lets the caller change the
    /// protections while no new access can be judged.
    pub(super) fn protections_mut(&self) -> ProtectionsWriter<'_> {
        // Announce first: from here on, accesses take the locked path...
        self.writers.fetch_add(1, Ordering::SeqCst);
        let guard = self.memory.write().unwrap_or_else(|p| p.into_inner());
        // ...and the lock-free ones already under way finish their copy.
        self.wait_for_lock_free_accesses();
        // Memos of the old generation are now stale.
        self.generation.fetch_add(1, Ordering::SeqCst);
        ProtectionsWriter { guard, writers: &self.writers }
    }

    fn wait_for_lock_free_accesses(&self) {
        let accessors: Vec<Arc<Accessor>> = {
            let mut list = self.accessors.lock().unwrap_or_else(|p| p.into_inner());
            list.retain(|a| a.strong_count() > 0);
            list.iter().filter_map(Weak::upgrade).collect()
        };
        for accessor in accessors {
            // A lock-free access is one copy of at most 1 MiB: spin briefly, then yield.
            let mut spins = 0u32;
            while accessor.in_flight.load(Ordering::SeqCst) != 0 {
                spins = spins.saturating_add(1);
                if spins < 64 {
                    std::hint::spin_loop();
                } else {
                    std::thread::yield_now();
                }
            }
        }
    }

    fn register(&self, accessor: &Arc<Accessor>) {
        let mut list = self.accessors.lock().unwrap_or_else(|p| p.into_inner());
        // Forget accessors that are gone, so the list stays as long as the live ones.
        list.retain(|a| a.strong_count() > 0);
        list.push(Arc::downgrade(accessor));
    }

    /// From now on device reads are judged too (set under the write lock).
    pub(super) fn note_private_memory(&self) {
        self.private_memory.store(true, Ordering::Release);
    }

    /// Records pages `[start, end)` as private or shared for the lock-free
    /// read check. Called under the write lock, with the same change the
    /// protections get; `pages` sizes the map the first time.
    pub(super) fn mark_private(&self, pages: u64, start: u64, end: u64, private: bool) {
        self.private_pages.get_or_init(|| PageBits::new(pages)).set_range(start, end, private);
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

fn policy_code(policy: Policy) -> u8 {
    match policy {
        Policy::Deny => 0,
        Policy::Log => 1,
        Policy::Pause => 2,
        Policy::Shutdown => 3,
    }
}

/// The write side of the protections; accesses stay on the locked path until dropped.
pub(super) struct ProtectionsWriter<'a> {
    guard: RwLockWriteGuard<'a, MemoryProtections>,
    writers: &'a AtomicU64,
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

impl Drop for ProtectionsWriter<'_> {
    fn drop(&mut self) {
        self.writers.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Who accesses memory through a `CheckedMemory`: named in violations.
#[derive(Debug, Default)]
pub struct Accessor {
    pub name: String,
    /// Accesses heki refused.
    pub refused: AtomicU64,
    /// Lock-free accesses under way (a memo hit), which a protection change waits for.
    in_flight: AtomicU64,
    /// Pages recently found writable, valid for one protections generation:
    /// devices write the same buffers, status bytes and rings over and over.
    memo: PageMemo,
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
        enforcer.register(&accessor);
        CheckedMemory { ram, enforcer, accessor }
    }

    /// The lock-free path: an access to one page this accessor already found
    /// good in the current generation, while no protection change is under
    /// way. The returned marker keeps a change waiting until the copy is done.
    /// (Dekker-style: we announce ourselves, then look for a writer; a writer
    /// announces itself, then waits for us. Both with SeqCst.)
    fn lock_free(&self, gpa: u64, len: usize, write: bool) -> Option<InFlight<'_>> {
        let (page, one_page) = single_page(gpa, len as u64);
        if !one_page {
            return None;
        }
        let marker = InFlight::enter(&self.accessor);
        if self.enforcer.writers.load(Ordering::SeqCst) != 0 {
            return None;
        }
        if !write {
            // Shared pages are readable: no memo, one bit per page.
            let bits = self.enforcer.private_pages.get()?;
            return (bits.get(page) == Some(false)).then_some(marker);
        }
        self.accessor.memo.knows(page, self.enforcer.generation.load(Ordering::SeqCst)).then_some(marker)
    }

    pub fn accessor(&self) -> &Accessor {
        &self.accessor
    }

    pub fn enforcer(&self) -> &Arc<Enforcer> {
        &self.enforcer
    }

    /// Judges a device write of `[gpa, gpa + len)`, reporting a violation;
    /// true if the write may be performed.
    fn judge_write(&self, protections: &MemoryProtections, gpa: u64, len: u64) -> bool {
        self.judge_access(protections, gpa, len, true)
    }

    /// Judges a device read; true if it may be performed.
    fn judge_read(&self, protections: &MemoryProtections, gpa: u64, len: u64) -> bool {
        self.judge_access(protections, gpa, len, false)
    }

    /// One device access under the protections' read lock: a memo hit, or
    /// heki's verdict (reported if it is a violation, remembered if the whole
    /// page is good).
    fn judge_access(&self, protections: &MemoryProtections, gpa: u64, len: u64, write: bool) -> bool {
        let memo = &self.accessor.memo;
        let (page, one_page) = single_page(gpa, len);
        if write && one_page && memo.knows(page, self.enforcer.generation.load(Ordering::Acquire)) {
            return true;
        }
        let access = if write { Access::DmaWrite { gpa, len } } else { Access::DmaRead { gpa, len } };
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
                if !write {
                    record.details.insert("access".into(), "read".into());
                }
            });
        } else if write && one_page && !protections.bytes.page_has_bytes(page) {
            // A page with protected bytes is judged at every write.
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

/// A lock-free access under way; a protection change waits for its drop.
struct InFlight<'a>(&'a Accessor);

impl<'a> InFlight<'a> {
    fn enter(accessor: &'a Accessor) -> Self {
        accessor.in_flight.fetch_add(1, Ordering::SeqCst);
        InFlight(accessor)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

/// What keeps a protection change from landing in the middle of an access.
enum Hold<'a> {
    /// Nothing to hold: an access inside a batch (which holds for it).
    None,
    /// The protections' read lock.
    Locked(#[allow(dead_code)] RwLockReadGuard<'a, MemoryProtections>),
    /// A lock-free access the writer waits for.
    LockFree(#[allow(dead_code)] InFlight<'a>),
}

/// Slices that keep the access held (see `Hold`) until the copy is done.
struct HeldSlices<'a, I> {
    slices: I,
    _hold: Hold<'a>,
}

impl<I: Iterator> Iterator for HeldSlices<'_, I> {
    type Item = I::Item;
    fn next(&mut self) -> Option<I::Item> {
        self.slices.next()
    }
}

impl<I: FusedIterator> FusedIterator for HeldSlices<'_, I> {}

impl<'a, I: GuestMemorySliceIterator<'a, BS<'a, ()>>> GuestMemorySliceIterator<'a, BS<'a, ()>> for HeldSlices<'a, I> {}

/// The page of `gpa`, and whether `[gpa, gpa + len)` is non-empty and within it.
fn single_page(gpa: u64, len: u64) -> (u64, bool) {
    let page = gpa >> heki::PAGE_SHIFT;
    let last = len.checked_sub(1).and_then(|n| gpa.checked_add(n));
    (page, last.is_some_and(|last| last >> heki::PAGE_SHIFT == page))
}

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
        if self.in_batch() {
            self.leave_batch();
        }
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
        let write = access.has_write();
        if !write && !self.enforcer.private_memory.load(Ordering::Acquire) {
            // Reads are refused only for private pages, and there are none yet;
            // but a change may be about to make memory private (and take the
            // pages away from this view), so the copy is still held: by the
            // batch this thread is in, or by an in-flight marker the change
            // waits for. A read that meets a pending change is judged after it.
            if self.in_batch() {
                return Ok(HeldSlices { slices, _hold: Hold::None });
            }
            let marker = InFlight::enter(&self.accessor);
            if self.enforcer.writers.load(Ordering::SeqCst) == 0 {
                return Ok(HeldSlices { slices, _hold: Hold::LockFree(marker) });
            }
        }
        if self.in_batch() {
            if self.good_in_batch(addr.0, count, write) {
                return Ok(HeldSlices { slices, _hold: Hold::None });
            }
            // To be judged under the lock, which a batch must not wait for
            // (a pending change waits for the batch): the batch ends here.
            self.leave_batch();
        }
        if let Some(in_flight) = self.lock_free(addr.0, count, write) {
            return Ok(HeldSlices { slices, _hold: Hold::LockFree(in_flight) });
        }
        let protections = self.enforcer.protections();
        let allowed = if write {
            self.judge_write(&protections, addr.0, count as u64)
        } else {
            self.judge_read(&protections, addr.0, count as u64)
        };
        if !allowed {
            return Err(refused(addr));
        }
        Ok(HeldSlices { slices, _hold: Hold::Locked(protections) })
    }
}
