//! Who touches guest memory through a `CheckedMemory`, and what the layer
//! remembers per accessor: its lock-free accesses under way and the pages
//! it recently found writable.

use std::sync::atomic::{AtomicU64, Ordering};

/// Who accesses memory through a `CheckedMemory`: named in violations.
#[derive(Debug, Default)]
pub struct Accessor {
    pub name: String,
    /// Accesses the policy refused.
    pub refused: AtomicU64,
    /// Lock-free accesses under way (a memo hit), which a change waits for.
    pub(super) in_flight: AtomicU64,
    /// Pages recently found writable, valid for one epoch generation:
    /// devices write the same buffers, status bytes and rings over and over.
    pub(super) memo: PageMemo,
}

impl Accessor {
    pub fn new(name: impl Into<String>) -> Self {
        Accessor { name: name.into(), ..Accessor::default() }
    }

    /// Waits until no lock-free access of this accessor is under way.
    pub(super) fn wait_idle(&self) {
        // A lock-free access is one copy of at most 1 MiB: spin briefly, then yield.
        let mut spins = 0u32;
        while self.in_flight.load(Ordering::SeqCst) != 0 {
            spins = spins.saturating_add(1);
            if spins < 64 {
                std::hint::spin_loop();
            } else {
                std::thread::yield_now();
            }
        }
    }
}

const MEMO_SLOTS: usize = 256;
const NO_PAGE: u64 = u64::MAX;

#[derive(Debug)]
pub(super) struct PageMemo {
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
    /// epoch, so the generation cannot change meanwhile).
    pub(super) fn knows(&self, page: u64, generation: u64) -> bool {
        if self.generation.load(Ordering::Acquire) != generation {
            self.pages.iter().for_each(|p| p.store(NO_PAGE, Ordering::Relaxed));
            self.generation.store(generation, Ordering::Release);
            return false;
        }
        self.slot(page).load(Ordering::Relaxed) == page
    }

    pub(super) fn remember(&self, page: u64) {
        self.slot(page).store(page, Ordering::Relaxed);
    }
}

/// A lock-free access under way; a change waits for its drop.
pub(super) struct InFlight<'a>(&'a Accessor);

impl<'a> InFlight<'a> {
    pub(super) fn enter(accessor: &'a Accessor) -> Self {
        accessor.in_flight.fetch_add(1, Ordering::SeqCst);
        InFlight(accessor)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}
