//! Which guest pages have their reads judged (heki: private pages), one
//! bit each, for device reads that check without the epoch's lock.

use std::sync::atomic::{AtomicU64, Ordering};

/// One bit per guest page, readable without a lock; written only during an
/// epoch change while no lock-free access is in flight.
pub(super) struct PageBits {
    words: Box<[AtomicU64]>,
}

impl PageBits {
    pub(super) fn new(pages: u64) -> Self {
        let words = pages.div_ceil(64);
        PageBits { words: (0..words).map(|_| AtomicU64::new(0)).collect() }
    }

    /// The bit of `page`; `None` beyond the map (not RAM).
    pub(super) fn get(&self, page: u64) -> Option<bool> {
        let word = self.words.get(usize::try_from(page / 64).ok()?)?;
        Some(word.load(Ordering::Relaxed) & (1 << (page % 64)) != 0)
    }

    /// The shared (clear) pages around `page`, at most `reach` on each side:
    /// `[first, end)`; `None` if `page` itself is read-judged or beyond the map.
    pub(super) fn shared_run(&self, page: u64, reach: u64) -> Option<(u64, u64)> {
        if self.get(page)? {
            return None;
        }
        let mut first = page;
        while first > page.saturating_sub(reach) && first.checked_sub(1).and_then(|p| self.get(p)) == Some(false) {
            first = first.saturating_sub(1);
        }
        let mut end = page.saturating_add(1);
        while end < page.saturating_add(reach) && self.get(end) == Some(false) {
            end = end.saturating_add(1);
        }
        Some((first, end))
    }

    pub(super) fn set_range(&self, start: u64, end: u64, value: bool) {
        for page in start..end {
            let Some(word) = usize::try_from(page / 64).ok().and_then(|i| self.words.get(i)) else { return };
            let bit = 1 << (page % 64);
            if value {
                word.fetch_or(bit, Ordering::Relaxed);
            } else {
                word.fetch_and(!bit, Ordering::Relaxed);
            }
        }
    }
}
