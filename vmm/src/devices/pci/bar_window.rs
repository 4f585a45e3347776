//! Where each PCI device's BAR 0 sits, for MMIO dispatch. The VMM places
//! slot `n`'s BAR at `base + (n - 1) * BAR_SIZE`, but the guest may move it:
//! Linux reassigns the BARs of a device it finds on a rescan (a hot-added
//! device), and writes the new address into the BAR register. The map
//! follows (`relocate`), so the MMIO bus, built once per VM, routes whole
//! windows here (`BarWindowDevice`), and only the map changes when devices
//! come, go or move.

use std::sync::{Arc, Mutex, RwLock};

use crate::devices::mmio_bus::MmioDevice;

struct Bar {
    base: u64,
    device: Arc<Mutex<dyn MmioDevice>>,
}

pub struct BarWindow {
    base: u64,
    bar_size: u64,
    /// Indexed by slot - 1 (slot 0 is the host bridge, which has no BAR).
    bars: RwLock<Vec<Option<Bar>>>,
}

impl BarWindow {
    pub fn new(base: u64, bar_size: u64, slots: usize) -> Self {
        let bars = (1..slots).map(|_| None).collect();
        BarWindow { base, bar_size, bars: RwLock::new(bars) }
    }

    /// The length of the window the VMM places BARs in.
    pub fn window_len(&self) -> u64 {
        self.bar_size.saturating_mul(self.read().len() as u64)
    }

    /// Where the VMM places slot `slot`'s BAR 0; `None` for slot 0 and past the bus.
    pub fn bar_address(&self, slot: u8) -> Option<u64> {
        let index = usize::from(slot).checked_sub(1).filter(|&i| i < self.read().len())?;
        Some(self.base.saturating_add(self.bar_size.saturating_mul(index as u64)))
    }

    /// Maps slot `slot`'s BAR at `base`.
    pub fn insert(&self, slot: u8, base: u64, device: Arc<Mutex<dyn MmioDevice>>) {
        if let Some(bar) = self.entry(slot).as_mut() {
            **bar = Some(Bar { base, device });
        }
    }

    /// Moves slot `slot`'s BAR to `base`.
    pub fn relocate(&self, slot: u8, base: u64) {
        if let Some(Some(bar)) = self.entry(slot).as_deref_mut() {
            bar.base = base;
        }
    }

    pub fn remove(&self, slot: u8) {
        if let Some(bar) = self.entry(slot).as_mut() {
            **bar = None;
        }
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Vec<Option<Bar>>> {
        self.bars.read().unwrap_or_else(|p| p.into_inner())
    }

    fn entry(&self, slot: u8) -> Option<SlotGuard<'_>> {
        let index = usize::from(slot).checked_sub(1)?;
        let guard = self.bars.write().unwrap_or_else(|p| p.into_inner());
        (index < guard.len()).then_some(SlotGuard { guard, index })
    }

    /// The device whose BAR holds guest-physical `addr`, and the offset inside it.
    fn target(&self, addr: u64) -> Option<(Arc<Mutex<dyn MmioDevice>>, u64)> {
        let bars = self.read();
        bars.iter().flatten().find_map(|bar| {
            let offset = addr.checked_sub(bar.base).filter(|&o| o < self.bar_size)?;
            Some((bar.device.clone(), offset))
        })
    }
}

/// One slot of the map, written under the lock.
struct SlotGuard<'a> {
    guard: std::sync::RwLockWriteGuard<'a, Vec<Option<Bar>>>,
    index: usize,
}

impl std::ops::Deref for SlotGuard<'_> {
    type Target = Option<Bar>;
    fn deref(&self) -> &Option<Bar> {
        &self.guard[self.index]
    }
}

impl std::ops::DerefMut for SlotGuard<'_> {
    fn deref_mut(&mut self) -> &mut Option<Bar> {
        &mut self.guard[self.index]
    }
}

/// A guest-physical range the MMIO bus routes to the map (`start` is where
/// the bus's offsets begin). The map's own lock is dropped before the device
/// is locked, so a BAR move from a configuration write (which holds the
/// device) cannot deadlock with an access to the BAR.
pub struct BarWindowDevice {
    pub map: Arc<BarWindow>,
    pub start: u64,
}

impl MmioDevice for BarWindowDevice {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        match self.map.target(self.start.saturating_add(offset)) {
            Some((device, at)) => device.lock().unwrap_or_else(|p| p.into_inner()).read(at, data),
            None => data.fill(0xff),
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let Some((device, at)) = self.map.target(self.start.saturating_add(offset)) {
            device.lock().unwrap_or_else(|p| p.into_inner()).write(at, data);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Echo(u8);

    impl MmioDevice for Echo {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data.fill(self.0.wrapping_add(offset as u8));
        }
        fn write(&mut self, _offset: u64, _data: &[u8]) {}
    }

    #[test]
    fn each_slot_owns_its_bar_a_moved_bar_answers_at_its_new_address_and_a_removed_one_reads_all_ones() {
        let window = Arc::new(BarWindow::new(0xc000_0000, 0x4000, 32));
        assert_eq!(window.window_len(), 31 * 0x4000);
        assert_eq!(window.bar_address(0), None);
        assert_eq!(window.bar_address(1), Some(0xc000_0000));
        assert_eq!(window.bar_address(3), Some(0xc000_8000));
        assert_eq!(window.bar_address(32), None);
        window.insert(3, 0xc000_8000, Arc::new(Mutex::new(Echo(0x10))));
        let mut low = BarWindowDevice { map: window.clone(), start: 0xc000_0000 };
        let mut high = BarWindowDevice { map: window.clone(), start: 0x1_0000_0000 };
        let mut byte = [0u8];
        low.read(0x8000 + 2, &mut byte);
        assert_eq!(byte, [0x12], "slot 3's BAR, offset 2");
        low.read(0x4000, &mut byte);
        assert_eq!(byte, [0xff], "slot 2 is empty");
        window.relocate(3, 0x1_0000_4000);
        low.read(0x8000, &mut byte);
        assert_eq!(byte, [0xff], "the old address is free");
        high.read(0x4001, &mut byte);
        assert_eq!(byte, [0x11], "the new address answers");
        window.remove(3);
        high.read(0x4000, &mut byte);
        assert_eq!(byte, [0xff], "slot 3 was removed");
    }
}
