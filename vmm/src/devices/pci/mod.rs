//! PCI: a host bridge on bus 0, configuration through ports 0xCF8/0xCFC
//! (mechanism #1) and through the ECAM window described by the MCFG table.

// Guest-supplied offsets: no unchecked arithmetic here.
#![deny(clippy::arithmetic_side_effects)]

use std::sync::{Arc, Mutex, RwLock};

pub mod bar_window;
pub use bar_window::BarWindow;

mod segments;

pub use segments::{PciSegments, PlacementError};

use super::mmio_bus::MmioDevice;
use super::{DeviceAction, PioDevice};

/// A function on bus 0. `offset` is a byte offset in its configuration space.
pub trait PciDevice: Send {
    fn config_read(&mut self, offset: u16, data: &mut [u8]);
    fn config_write(&mut self, offset: u16, data: &[u8]);
}

pub const SLOTS: usize = 32;

/// The host bridge: identifies itself and nothing more.
struct HostBridge;

impl PciDevice for HostBridge {
    fn config_read(&mut self, offset: u16, data: &mut [u8]) {
        // Vendor 0x1b36 (Red Hat), device 0x0008 (PCIe host bridge), class 06/00.
        let mut space = [0u8; 64];
        space[0..4].copy_from_slice(&0x0008_1b36u32.to_le_bytes());
        space[0x0a] = 0x00;
        space[0x0b] = 0x06;
        fill(&space, offset, data);
    }

    fn config_write(&mut self, _offset: u16, _data: &[u8]) {}
}

/// Copies `data.len()` bytes of `space` at `offset` (zeros past its end).
pub fn fill(space: &[u8], offset: u16, data: &mut [u8]) {
    for (i, b) in data.iter_mut().enumerate() {
        *b = space.get(usize::from(offset).saturating_add(i)).copied().unwrap_or(0);
    }
}

type Slot = Option<Arc<Mutex<dyn PciDevice>>>;

/// Bus 0: one function per slot. Slots change at run time (hotplug), so
/// they sit behind a lock that configuration accesses only read.
pub struct PciBus {
    slots: RwLock<Vec<Slot>>,
}

impl Default for PciBus {
    fn default() -> Self {
        let mut slots: Vec<Slot> = (0..SLOTS).map(|_| None).collect();
        slots[0] = Some(Arc::new(Mutex::new(HostBridge)));
        PciBus { slots: RwLock::new(slots) }
    }
}

impl PciBus {
    fn slots(&self) -> std::sync::RwLockReadGuard<'_, Vec<Slot>> {
        self.slots.read().unwrap_or_else(|p| p.into_inner())
    }

    /// Puts a device in the first free slot; returns the slot.
    pub fn add(&self, device: Arc<Mutex<dyn PciDevice>>) -> Option<u8> {
        let mut slots = self.slots.write().unwrap_or_else(|p| p.into_inner());
        let slot = slots.iter().position(Option::is_none)?;
        slots[slot] = Some(device);
        u8::try_from(slot).ok()
    }

    /// The first free slot, without taking it.
    pub fn free_slot(&self) -> Option<u8> {
        self.slots().iter().position(Option::is_none).and_then(|s| u8::try_from(s).ok())
    }

    /// One bit per occupied slot (the host bridge's, bit 0, included).
    pub fn occupied(&self) -> u32 {
        self.slots()
            .iter()
            .enumerate()
            .filter(|(_, s)| s.is_some())
            .fold(0, |bits, (i, _)| bits | u32::try_from(i).ok().and_then(|i| 1u32.checked_shl(i)).unwrap_or(0))
    }

    /// Empties `slot` (never the host bridge's); the guest then reads all ones there.
    pub fn remove(&self, slot: u8) -> bool {
        if slot == 0 {
            return false;
        }
        let mut slots = self.slots.write().unwrap_or_else(|p| p.into_inner());
        slots.get_mut(usize::from(slot)).and_then(Option::take).is_some()
    }

    fn access(&self, bus: u8, slot: u8, function: u8) -> Option<Arc<Mutex<dyn PciDevice>>> {
        if bus != 0 || function != 0 {
            return None;
        }
        self.slots().get(usize::from(slot))?.clone()
    }

    pub fn read(&self, bus: u8, slot: u8, function: u8, offset: u16, data: &mut [u8]) {
        match self.access(bus, slot, function) {
            Some(d) => d.lock().unwrap_or_else(|p| p.into_inner()).config_read(offset, data),
            None => data.fill(0xff),
        }
    }

    pub fn write(&self, bus: u8, slot: u8, function: u8, offset: u16, data: &[u8]) {
        if let Some(d) = self.access(bus, slot, function) {
            d.lock().unwrap_or_else(|p| p.into_inner()).config_write(offset, data);
        }
    }
}

/// Ports 0xCF8 (address) and 0xCFC..0xCFF (data).
pub struct PciConfigIo {
    bus: Arc<PciBus>,
    address: u32,
}

impl PciConfigIo {
    pub fn new(bus: Arc<PciBus>) -> Self {
        PciConfigIo { bus, address: 0 }
    }

    fn target(&self, data_offset: u16) -> Option<(u8, u8, u8, u16)> {
        if self.address & 0x8000_0000 == 0 {
            return None;
        }
        let bus = (self.address >> 16) as u8;
        let slot = ((self.address >> 11) & 0x1f) as u8;
        let function = ((self.address >> 8) & 7) as u8;
        let register = ((self.address & 0xfc) as u16).saturating_add(data_offset);
        Some((bus, slot, function, register))
    }
}

impl PioDevice for PciConfigIo {
    fn read(&mut self, offset: u16, data: &mut [u8]) {
        match offset {
            0..=3 => fill(&self.address.to_le_bytes(), offset, data),
            4..=7 => match self.target(offset.saturating_sub(4)) {
                Some((b, s, f, r)) => self.bus.read(b, s, f, r, data),
                None => data.fill(0xff),
            },
            _ => data.fill(0xff),
        }
    }

    fn write(&mut self, offset: u16, data: &[u8]) -> DeviceAction {
        match offset {
            0 if data.len() == 4 => {
                self.address = u32::from_le_bytes([data[0], data[1], data[2], data[3]]);
            }
            4..=7 => {
                if let Some((b, s, f, r)) = self.target(offset.saturating_sub(4)) {
                    self.bus.write(b, s, f, r, data);
                }
            }
            _ => {}
        }
        DeviceAction::None
    }
}

/// The ECAM window: bus << 20 | slot << 15 | function << 12 | register.
pub struct PciConfigMmio {
    bus: Arc<PciBus>,
}

impl PciConfigMmio {
    pub fn new(bus: Arc<PciBus>) -> Self {
        PciConfigMmio { bus }
    }
}

fn ecam(offset: u64) -> (u8, u8, u8, u16) {
    ((offset >> 20) as u8, ((offset >> 15) & 0x1f) as u8, ((offset >> 12) & 7) as u8, (offset & 0xfff) as u16)
}

impl MmioDevice for PciConfigMmio {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let (b, s, f, r) = ecam(offset);
        self.bus.read(b, s, f, r, data);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let (b, s, f, r) = ecam(offset);
        self.bus.write(b, s, f, r, data);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_bridge_answers_at_0_0_0_and_empty_slots_read_all_ones() {
        let bus = Arc::new(PciBus::default());
        let mut io = PciConfigIo::new(bus.clone());
        io.write(0, &0x8000_0000u32.to_le_bytes());
        let mut id = [0u8; 4];
        io.read(4, &mut id);
        assert_eq!(u32::from_le_bytes(id), 0x0008_1b36);
        io.write(0, &(0x8000_0000u32 | (3 << 11)).to_le_bytes());
        io.read(4, &mut id);
        assert_eq!(id, [0xff; 4]);
        let mut ecam = PciConfigMmio::new(bus);
        let mut class = [0u8; 1];
        ecam.read(0x0b, &mut class);
        assert_eq!(class, [6]);
    }
}
