//! Device batches: a pass over a queue holds its accesses once, and an
//! access inside it checks only its page (a window of shared pages for
//! reads, the memo for writes).

use std::cell::Cell;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use super::{CheckedMemory, PAGE_SHIFT, single_page};

thread_local! {
    /// The accessor whose batch this thread is in (its address; 0: none).
    static BATCH: Cell<usize> = const { Cell::new(0) };
    /// Guest-physical bytes `[start, end)` this thread found shared, for
    /// `WINDOW_OWNER`'s accessor in epoch generation `WINDOW_GENERATION`.
    static WINDOW: Cell<(u64, u64)> = const { Cell::new((0, 0)) };
    static WINDOW_OWNER: Cell<usize> = const { Cell::new(0) };
    static WINDOW_GENERATION: Cell<u64> = const { Cell::new(0) };
}

/// How far a shared window reaches on each side of the page that opened it.
const WINDOW_REACH_PAGES: u64 = 4096;

/// A device's batch of accesses (one pass over a queue): while it lasts,
/// this thread's accesses through the accessor count as in flight once, so
/// each access only checks its page. A protection change waits for the
/// batch's memory work up to its next checkpoint (between descriptor
/// chains) or I/O: disk and network transfers run outside it
/// (`outside_batch`), and a batch is not re-entered while a change is pending.
pub struct Batch<'a> {
    memory: &'a CheckedMemory,
    active: bool,
}

impl Drop for Batch<'_> {
    fn drop(&mut self) {
        if self.active && self.memory.in_batch() {
            self.memory.leave_batch();
        }
    }
}

impl Batch<'_> {
    /// A point between two units of work (descriptor chains): a protection
    /// change pending now is let through before the batch goes on.
    pub fn checkpoint(&self) {
        if !self.active {
            return;
        }
        if !self.memory.in_batch() {
            self.memory.enter_batch();
        } else if self.memory.epoch().writers.load(Ordering::SeqCst) != 0 {
            self.memory.leave_batch();
        }
    }
}

impl CheckedMemory {
    /// Starts a batch; a no-op while a protection change is pending or this
    /// thread is in a batch already.
    pub fn batch(&self) -> Batch<'_> {
        // Not nested: an outer batch of this thread stays the one that holds.
        let active = BATCH.get() == 0;
        if active {
            self.enter_batch();
        }
        Batch { memory: self, active }
    }

    /// Runs `io` (a disk or network transfer, no guest memory) outside this
    /// thread's batch, so that a protection change need not wait for it.
    pub fn outside_batch<R>(&self, io: impl FnOnce() -> R) -> R {
        if !self.in_batch() {
            return io();
        }
        self.leave_batch();
        let result = io();
        // A change pending by now keeps the batch off: accesses take the usual path.
        self.enter_batch();
        result
    }

    fn accessor_id(&self) -> usize {
        Arc::as_ptr(&self.accessor) as usize
    }

    pub(super) fn in_batch(&self) -> bool {
        BATCH.get() == self.accessor_id()
    }

    /// As `lock_free`, once for the whole batch.
    pub(super) fn enter_batch(&self) -> bool {
        self.accessor.in_flight.fetch_add(1, Ordering::SeqCst);
        if self.epoch().writers.load(Ordering::SeqCst) != 0 {
            self.accessor.in_flight.fetch_sub(1, Ordering::SeqCst);
            return false;
        }
        BATCH.set(self.accessor_id());
        // The policy cannot change during the batch; a window from an
        // older generation (or another device) is forgotten now.
        let generation = self.epoch().generation.load(Ordering::SeqCst);
        if WINDOW_OWNER.get() != self.accessor_id() || WINDOW_GENERATION.get() != generation {
            WINDOW.set((0, 0));
            WINDOW_OWNER.set(self.accessor_id());
            WINDOW_GENERATION.set(generation);
        }
        true
    }

    /// Ends the batch. Every access in it is complete: each copies before it returns.
    pub(super) fn leave_batch(&self) {
        BATCH.set(0);
        self.accessor.in_flight.fetch_sub(1, Ordering::SeqCst);
    }

    /// Inside a batch no protection can change, so a page found good (a
    /// shared page for a read, a remembered page for a write) needs no more.
    pub(super) fn good_in_batch(&self, gpa: u64, len: usize, write: bool) -> bool {
        if !write {
            let (start, end) = WINDOW.get();
            if gpa >= start && (len as u64) <= end.saturating_sub(gpa) {
                return true;
            }
        }
        let (page, one_page) = single_page(gpa, len as u64);
        if !one_page {
            return false;
        }
        if write {
            return self.accessor.memo.knows(page, self.epoch().generation.load(Ordering::Relaxed));
        }
        // A new window: the run of shared pages around this one.
        let Some(bits) = self.epoch().read_judged_pages.get() else { return false };
        let Some((first, end)) = bits.shared_run(page, WINDOW_REACH_PAGES) else { return false };
        WINDOW.set((first << PAGE_SHIFT, end << PAGE_SHIFT));
        true
    }
}
