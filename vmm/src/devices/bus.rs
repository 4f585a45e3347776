//! The one bus type behind both the I/O port bus (`pio_bus.rs`) and the MMIO
//! bus (`mmio_bus.rs`): sorted address ranges, each mapped to a device that
//! sees offsets relative to its base.

use std::sync::{Arc, Mutex, MutexGuard};

struct BusEntry<D: ?Sized> {
    base: u64,
    len: u64,
    device: Arc<Mutex<D>>,
}

/// Address ranges mapped to devices of one kind (`D`: a device trait).
pub struct Bus<D: ?Sized> {
    entries: Vec<BusEntry<D>>,
}

impl<D: ?Sized> Default for Bus<D> {
    fn default() -> Self {
        Bus { entries: Vec::new() }
    }
}

impl<D: ?Sized> Bus<D> {
    /// Whether `[base, base + len)` meets a range already on the bus.
    pub fn overlaps(&self, base: u64, len: u64) -> bool {
        let end = base.saturating_add(len);
        self.entries.iter().any(|e| base < e.base.saturating_add(e.len) && e.base < end)
    }

    /// Maps `[base, base + len)` to `device`.
    pub fn add(&mut self, base: u64, len: u64, device: Arc<Mutex<D>>) {
        self.entries.push(BusEntry { base, len, device });
        self.entries.sort_by_key(|e| e.base);
    }

    /// The device that claims `addr`, locked, and the offset of `addr` in its range.
    pub fn device_at(&self, addr: u64) -> Option<(MutexGuard<'_, D>, u64)> {
        let idx = self.entries.partition_point(|e| e.base <= addr).checked_sub(1)?;
        let entry = &self.entries[idx];
        let offset = addr - entry.base;
        // A poisoned device lock only means another vCPU thread panicked
        // mid-access; the device state is still usable.
        (offset < entry.len).then(|| (entry.device.lock().unwrap_or_else(|p| p.into_inner()), offset))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    trait Named: Send {
        fn name(&self) -> &'static str;
    }

    struct Device(&'static str);

    impl Named for Device {
        fn name(&self) -> &'static str {
            self.0
        }
    }

    fn bus() -> Bus<dyn Named> {
        let mut bus: Bus<dyn Named> = Bus::default();
        bus.add(0x2000, 0x100, Arc::new(Mutex::new(Device("high"))));
        bus.add(0x1000, 0x10, Arc::new(Mutex::new(Device("low"))));
        bus
    }

    #[test]
    fn an_address_finds_the_range_that_holds_it_with_its_offset() {
        let bus = bus();
        let (device, offset) = bus.device_at(0x100f).expect("claimed");
        assert_eq!((device.name(), offset), ("low", 0xf));
        drop(device);
        let (device, offset) = bus.device_at(0x2000).expect("claimed");
        assert_eq!((device.name(), offset), ("high", 0));
    }

    #[test]
    fn addresses_between_and_around_ranges_are_unclaimed() {
        let bus = bus();
        for addr in [0, 0xfff, 0x1010, 0x1fff, 0x2100, u64::MAX] {
            assert!(bus.device_at(addr).is_none(), "{addr:#x}");
        }
    }

    #[test]
    fn overlap_is_any_shared_address() {
        let bus = bus();
        assert!(bus.overlaps(0x100f, 1));
        assert!(bus.overlaps(0x0, 0x1001));
        assert!(bus.overlaps(0x20ff, u64::MAX));
        assert!(!bus.overlaps(0x1010, 0xff0));
        assert!(!bus.overlaps(0x2100, 0x10));
    }
}
