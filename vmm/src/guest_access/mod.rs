//! Guest memory as devices, loaders, the API and the introspection agent
//! see it: every access asks an `AccessPolicy` first, as an IOMMU would,
//! and the answer and the copy happen inside one `AccessEpoch` that a
//! policy change waits for. So once a change returns, no access judged
//! under the old answers can still land.
//!
//! `CheckedMemory` implements vm-memory's access-checked `GuestMemory`
//! trait, so virtio-queue's descriptor reads and used-ring writes go through
//! it too. It never hands out the raw mapping (`physical_memory` is `None`).
//! This layer sits below both the devices and the policy (heki): it names
//! neither.
// Guest-supplied numbers: no unchecked arithmetic here.
#![deny(clippy::arithmetic_side_effects)]

use std::iter::FusedIterator;
use std::sync::atomic::Ordering;
use std::sync::{Arc, RwLockReadGuard};

use vm_memory::bitmap::BS;
use vm_memory::guest_memory::GuestMemorySliceIterator;
use vm_memory::{GuestAddress, GuestMemory, GuestMemoryBackend, GuestMemoryError, GuestMemoryMmap, Permissions};

use accessor::InFlight;

mod accessor;
mod batch;
mod epoch;
mod page_bits;
mod policy;
mod unplugged;

pub use accessor::Accessor;
pub use batch::Batch;
pub use epoch::{AccessEpoch, EpochChange};
pub use policy::{AccessPolicy, Decision, DeviceAccess};
pub use unplugged::UnpluggedRange;

/// The guest page size the layer's memos and maps work in.
const PAGE_SHIFT: u32 = 12;

/// A device's view of guest RAM, policed by an `AccessPolicy`.
#[derive(Clone)]
pub struct CheckedMemory {
    ram: GuestMemoryMmap,
    policy: Arc<dyn AccessPolicy>,
    accessor: Arc<Accessor>,
}

impl CheckedMemory {
    pub fn new(ram: GuestMemoryMmap, policy: Arc<dyn AccessPolicy>, accessor: Arc<Accessor>) -> Self {
        policy.epoch().register(&accessor);
        CheckedMemory { ram, policy, accessor }
    }

    fn epoch(&self) -> &AccessEpoch {
        self.policy.epoch()
    }

    /// The lock-free path: an access to one page this accessor already found
    /// good in the current generation, while no change is under way. The
    /// returned marker keeps a change waiting until the copy is done.
    /// (Dekker-style: we announce ourselves, then look for a writer; a writer
    /// announces itself, then waits for us. Both with SeqCst.)
    fn lock_free(&self, gpa: u64, len: usize, write: bool) -> Option<InFlight<'_>> {
        let (page, one_page) = single_page(gpa, len as u64);
        if !one_page {
            return None;
        }
        let marker = InFlight::enter(&self.accessor);
        let epoch = self.epoch();
        if epoch.writers.load(Ordering::SeqCst) != 0 {
            return None;
        }
        if !write {
            // Pages whose reads are not judged: no memo, one bit per page.
            let bits = epoch.read_judged_pages.get()?;
            return (bits.get(page) == Some(false)).then_some(marker);
        }
        self.accessor.memo.knows(page, epoch.generation.load(Ordering::SeqCst)).then_some(marker)
    }

    pub fn accessor(&self) -> &Accessor {
        &self.accessor
    }

    /// One device access inside the epoch: a memo hit, or the policy's
    /// decision (remembered if the whole page may be written).
    fn judge_access(&self, gpa: u64, len: u64, write: bool) -> bool {
        let memo = &self.accessor.memo;
        let (page, one_page) = single_page(gpa, len);
        let generation = self.epoch().generation.load(Ordering::Acquire);
        if write && one_page && memo.knows(page, generation) {
            return true;
        }
        let decision = self.policy.judge(DeviceAccess { accessor: &self.accessor.name, gpa, len, write });
        match decision {
            Decision::Refuse => {
                self.accessor.refused.fetch_add(1, Ordering::Relaxed);
            }
            Decision::Allow { whole_page: true } if write && one_page => memo.remember(page),
            Decision::Allow { .. } => {}
        }
        decision.allows()
    }

    /// Asks whether the device may write `[gpa, gpa + len)` without writing
    /// (rings checked when the driver starts the device); a refusal is reported.
    pub fn probe_write(&self, gpa: u64, len: u64) -> bool {
        let _held = self.epoch().hold();
        self.judge_access(gpa, len, true)
    }
}

/// What keeps a policy change from landing in the middle of an access.
enum Hold<'a> {
    /// Nothing to hold: an access inside a batch (which holds for it).
    None,
    /// The epoch's read side.
    Locked(#[allow(dead_code)] RwLockReadGuard<'a, ()>),
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
    let page = gpa >> PAGE_SHIFT;
    let last = len.checked_sub(1).and_then(|n| gpa.checked_add(n));
    (page, last.is_some_and(|last| last >> PAGE_SHIFT == page))
}

fn refused(gpa: GuestAddress) -> GuestMemoryError {
    GuestMemoryError::IOError(std::io::Error::new(
        std::io::ErrorKind::PermissionDenied,
        format!("the access policy forbids this access at {:#x}", gpa.0),
    ))
}

/// Whether a guest-memory error is the policy's refusal (rather than a bad address).
pub fn is_refusal(e: &GuestMemoryError) -> bool {
    matches!(e, GuestMemoryError::IOError(io) if io.kind() == std::io::ErrorKind::PermissionDenied)
}

impl GuestMemory for CheckedMemory {
    type PhysicalMemory = GuestMemoryMmap;
    type Bitmap = ();

    fn check_range(&self, addr: GuestAddress, count: usize, access: Permissions) -> bool {
        if self.epoch().unplugged().touches(addr.0, count as u64) {
            return false;
        }
        if self.in_batch() {
            self.leave_batch();
        }
        let _held = self.epoch().hold();
        GuestMemoryBackend::check_range(&self.ram, addr, count)
            && self.policy.permits(addr.0, count as u64, access.has_write())
    }

    fn get_slices<'a>(
        &'a self,
        addr: GuestAddress,
        count: usize,
        access: Permissions,
    ) -> vm_memory::GuestMemoryResult<impl GuestMemorySliceIterator<'a, BS<'a, ()>>> {
        // Reserved for hotplug and not plugged in: as if outside RAM.
        if self.epoch().unplugged().touches(addr.0, count as u64) {
            return Err(GuestMemoryError::InvalidGuestAddress(addr));
        }
        let slices = GuestMemoryBackend::get_slices(&self.ram, addr, count);
        let write = access.has_write();
        if !write && !self.epoch().reads_judged() {
            // Reads are refused only on pages whose reads are judged, and
            // there are none yet; but a change may be about to add some (and
            // take the pages away from this view), so the copy is still held:
            // by the batch this thread is in, or by an in-flight marker the
            // change waits for. A read that meets a pending change is judged
            // after it.
            if self.in_batch() {
                return Ok(HeldSlices { slices, _hold: Hold::None });
            }
            let marker = InFlight::enter(&self.accessor);
            if self.epoch().writers.load(Ordering::SeqCst) == 0 {
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
        let held = self.epoch().hold();
        if !self.judge_access(addr.0, count as u64, write) {
            return Err(refused(addr));
        }
        Ok(HeldSlices { slices, _hold: Hold::Locked(held) })
    }
}

#[cfg(test)]
mod tests;
