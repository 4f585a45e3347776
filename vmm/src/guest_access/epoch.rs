//! Where permission changes and device accesses meet. A change of the
//! access policy goes through the epoch: it waits for every access judged
//! under the old answers (locked or lock-free) and holds new ones off, so
//! once a change returns no access judged before it can still land.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock, RwLockReadGuard, RwLockWriteGuard, Weak};

use super::accessor::Accessor;
use super::page_bits::PageBits;
use super::unplugged::UnpluggedRange;

/// The shared state of one VM's guest-access layer.
#[derive(Default)]
pub struct AccessEpoch {
    /// Held for reading across each judged access and its copy; for writing
    /// across a change.
    lock: RwLock<()>,
    /// Changes in progress: accesses take the locked path meanwhile.
    pub(super) writers: AtomicU64,
    /// Bumped by every change, so per-accessor memos of writable pages know
    /// when they went stale.
    pub(super) generation: AtomicU64,
    /// Every accessor, so a change can wait for their lock-free accesses.
    accessors: Mutex<Vec<Weak<Accessor>>>,
    /// Set once some page has its reads judged; until then reads are not.
    reads_judged: AtomicBool,
    /// One bit per RAM page, set while its reads are judged: a device read
    /// checks it without the lock (allocated on first use).
    pub(super) read_judged_pages: OnceLock<PageBits>,
    /// Reserved hotplug address space without RAM yet.
    unplugged: UnpluggedRange,
}

/// A change under way: no device access is judged or copying until dropped.
pub struct EpochChange<'a> {
    _lock: RwLockWriteGuard<'a, ()>,
    writers: &'a AtomicU64,
}

impl Drop for EpochChange<'_> {
    fn drop(&mut self) {
        self.writers.fetch_sub(1, Ordering::SeqCst);
    }
}

impl AccessEpoch {
    /// Hotplug address space without RAM: devices may not reach it.
    pub fn unplugged(&self) -> &UnpluggedRange {
        &self.unplugged
    }

    /// Waits for every access in flight, then holds new ones off until the
    /// returned change is dropped.
    pub fn change(&self) -> EpochChange<'_> {
        // Announce first: from here on, accesses take the locked path...
        self.writers.fetch_add(1, Ordering::SeqCst);
        let lock = self.lock.write().unwrap_or_else(|p| p.into_inner());
        // ...and the lock-free ones already under way finish their copy.
        self.wait_for_lock_free_accesses();
        // Memos of the old generation are now stale.
        self.generation.fetch_add(1, Ordering::SeqCst);
        EpochChange { _lock: lock, writers: &self.writers }
    }

    /// Held across one judged access and its copy.
    pub(super) fn hold(&self) -> RwLockReadGuard<'_, ()> {
        self.lock.read().unwrap_or_else(|p| p.into_inner())
    }

    /// From now on device reads are judged too (call during a change).
    pub fn judge_reads(&self) {
        self.reads_judged.store(true, Ordering::Release);
    }

    pub(super) fn reads_judged(&self) -> bool {
        self.reads_judged.load(Ordering::Acquire)
    }

    /// Records pages `[start, end)` as judged on read or not, for the
    /// lock-free read check (call during a change); `pages` sizes the map
    /// the first time.
    pub fn mark_reads_judged(&self, pages: u64, start: u64, end: u64, judged: bool) {
        self.read_judged_pages.get_or_init(|| PageBits::new(pages)).set_range(start, end, judged);
    }

    fn wait_for_lock_free_accesses(&self) {
        let accessors: Vec<Arc<Accessor>> = {
            let mut list = self.accessors.lock().unwrap_or_else(|p| p.into_inner());
            list.retain(|a| a.strong_count() > 0);
            list.iter().filter_map(Weak::upgrade).collect()
        };
        for accessor in accessors {
            accessor.wait_idle();
        }
    }

    pub(super) fn register(&self, accessor: &Arc<Accessor>) {
        let mut list = self.accessors.lock().unwrap_or_else(|p| p.into_inner());
        // Forget accessors that are gone, so the list stays as long as the live ones.
        list.retain(|a| a.strong_count() > 0);
        list.push(Arc::downgrade(accessor));
    }
}
