//! The MMIO window holding every PCI device's BAR 0. Slot `n` owns the
//! `BAR_SIZE` bytes at `base + (n - 1) * BAR_SIZE`, so a device added at run
//! time finds its BAR free, and a removed device's range reads as nothing.
//! The MMIO bus is built once per VM; this window is its one entry for all
//! BARs, and only the window changes when devices come and go.

use std::sync::{Arc, Mutex, RwLock};

use crate::devices::mmio_bus::MmioDevice;

type Bar = Option<Arc<Mutex<dyn MmioDevice>>>;

pub struct BarWindow {
    base: u64,
    bar_size: u64,
    /// Indexed by slot - 1 (slot 0 is the host bridge, which has no BAR).
    bars: RwLock<Vec<Bar>>,
}

impl BarWindow {
    pub fn new(base: u64, bar_size: u64, slots: usize) -> Self {
        let bars = (1..slots).map(|_| None).collect();
        BarWindow { base, bar_size, bars: RwLock::new(bars) }
    }

    /// The window's length in bytes, for the MMIO bus.
    pub fn len(&self) -> u64 {
        self.bar_size.saturating_mul(self.read().len() as u64)
    }

    /// Where slot `slot`'s BAR 0 sits; `None` for slot 0 and past the bus.
    pub fn bar_address(&self, slot: u8) -> Option<u64> {
        let index = usize::from(slot).checked_sub(1).filter(|&i| i < self.read().len())?;
        Some(self.base.saturating_add(self.bar_size.saturating_mul(index as u64)))
    }

    pub fn insert(&self, slot: u8, device: Arc<Mutex<dyn MmioDevice>>) {
        if let Some(index) = usize::from(slot).checked_sub(1)
            && let Some(bar) = self.write_lock().get_mut(index)
        {
            *bar = Some(device);
        }
    }

    pub fn remove(&self, slot: u8) {
        if let Some(index) = usize::from(slot).checked_sub(1)
            && let Some(bar) = self.write_lock().get_mut(index)
        {
            *bar = None;
        }
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Vec<Bar>> {
        self.bars.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write_lock(&self) -> std::sync::RwLockWriteGuard<'_, Vec<Bar>> {
        self.bars.write().unwrap_or_else(|p| p.into_inner())
    }

    /// The device whose BAR holds `offset` (from the window's base), and the offset inside it.
    fn target(&self, offset: u64) -> Option<(Arc<Mutex<dyn MmioDevice>>, u64)> {
        let index = usize::try_from(offset / self.bar_size).ok()?;
        let device = self.read().get(index)?.clone()?;
        Some((device, offset % self.bar_size))
    }
}

/// The window as the MMIO bus sees it. A shared reference suffices: the bus
/// locks this adapter, the slot table has its own lock, and each device its mutex.
pub struct BarWindowDevice(pub Arc<BarWindow>);

impl MmioDevice for BarWindowDevice {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        match self.0.target(offset) {
            Some((device, at)) => device.lock().unwrap_or_else(|p| p.into_inner()).read(at, data),
            None => data.fill(0xff),
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let Some((device, at)) = self.0.target(offset) {
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
    fn each_slot_owns_its_bar_and_a_removed_bar_reads_all_ones() {
        let window = Arc::new(BarWindow::new(0xc000_0000, 0x4000, 32));
        assert_eq!(window.len(), 31 * 0x4000);
        assert_eq!(window.bar_address(0), None);
        assert_eq!(window.bar_address(1), Some(0xc000_0000));
        assert_eq!(window.bar_address(3), Some(0xc000_8000));
        assert_eq!(window.bar_address(32), None);
        window.insert(3, Arc::new(Mutex::new(Echo(0x10))));
        let mut dev = BarWindowDevice(window.clone());
        let mut byte = [0u8];
        dev.read(0x8000 + 2, &mut byte);
        assert_eq!(byte, [0x12], "slot 3's BAR, offset 2");
        dev.read(0x4000, &mut byte);
        assert_eq!(byte, [0xff], "slot 2 is empty");
        window.remove(3);
        dev.read(0x8000, &mut byte);
        assert_eq!(byte, [0xff], "slot 3 was removed");
    }
}
