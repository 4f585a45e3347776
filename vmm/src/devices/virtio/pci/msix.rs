//! MSI-X of a virtio PCI function: the vector table the driver programs
//! (BAR 0), the enable and function-mask bits (configuration space), and
//! the irqfds the workers raise. The table sits behind its own small lock,
//! so a worker raising a vector never waits for a register access.
// Guest-supplied numbers: no unchecked arithmetic here.
#![deny(clippy::arithmetic_side_effects)]

use std::sync::{Arc, Mutex, MutexGuard};

use vmm_sys_util::eventfd::EventFd;

use crate::devices::msi::MsiRoutes;
use crate::devices::pci::fill;

/// The value of a queue or configuration vector register meaning "none".
pub const NO_VECTOR: u16 = 0xffff;
/// Bytes per table entry: address (low, high), data, vector control.
const ENTRY_SIZE: u64 = 16;

/// One table entry as the driver programmed it.
struct Entry {
    address: u64,
    data: u32,
    masked: bool,
}

struct Table {
    enabled: bool,
    function_masked: bool,
    entries: Vec<Entry>,
}

impl Table {
    fn deliverable(&self, index: usize) -> Option<&Entry> {
        self.entries.get(index).filter(|e| self.enabled && !self.function_masked && !e.masked)
    }
}

pub struct Msix {
    table: Mutex<Table>,
    /// One GSI and irqfd per vector; fixed for the device's life, so they are
    /// read (and handed to a vhost-user backend) without the table's lock.
    gsis: Vec<u32>,
    irqfds: Vec<EventFd>,
    routes: Option<Arc<MsiRoutes>>,
}

impl Msix {
    /// `count` vectors, each with an irqfd registered on a GSI of `routes`
    /// (none in unit tests, where nothing routes interrupts).
    pub fn new(count: usize, routes: Option<Arc<MsiRoutes>>) -> std::io::Result<Self> {
        let mut gsis = Vec::with_capacity(count);
        let mut irqfds = Vec::with_capacity(count);
        for _ in 0..count {
            let irqfd = EventFd::new(libc::EFD_NONBLOCK)?;
            let gsi = match &routes {
                Some(r) => {
                    let gsi = r.allocate();
                    r.vm().register_irqfd(&irqfd, gsi).map_err(|e| std::io::Error::other(e.to_string()))?;
                    gsi
                }
                None => 0,
            };
            gsis.push(gsi);
            irqfds.push(irqfd);
        }
        let entries = (0..count).map(|_| Entry { address: 0, data: 0, masked: true }).collect();
        let table = Mutex::new(Table { enabled: false, function_masked: false, entries });
        Ok(Msix { table, gsis, irqfds, routes })
    }

    /// Takes each vector's route and irqfd out of KVM and frees its GSI
    /// (the device is being removed).
    pub fn release(&self) {
        let Some(routes) = &self.routes else { return };
        for (&gsi, irqfd) in self.gsis.iter().zip(&self.irqfds) {
            routes.set(gsi, None);
            if let Err(e) = routes.vm().unregister_irqfd(irqfd, gsi) {
                log::warn!("cannot unregister the irqfd of GSI {gsi}: {e}");
            }
            routes.release(gsi);
        }
    }

    pub fn len(&self) -> usize {
        self.irqfds.len()
    }

    /// A vector the device has, or NO_VECTOR (which is also what the driver reads back).
    pub fn vector_or_none(&self, vector: u16) -> u16 {
        if usize::from(vector) < self.len() { vector } else { NO_VECTOR }
    }

    /// The irqfd of `vector`, for a backend that raises it itself.
    pub fn irqfd(&self, vector: u16) -> Option<&EventFd> {
        self.irqfds.get(usize::from(vector))
    }

    fn table(&self) -> MutexGuard<'_, Table> {
        self.table.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Raises `vector` if it can be delivered (masked interrupts are dropped:
    /// the drivers we serve poll the used ring when they unmask).
    pub fn signal(&self, vector: u16) {
        if self.table().deliverable(usize::from(vector)).is_some()
            && let Some(irqfd) = self.irqfds.get(usize::from(vector))
        {
            let _ = irqfd.write(1);
        }
    }

    /// The message control bits from configuration space: enable, function mask.
    pub fn set_control(&self, enabled: bool, function_masked: bool) {
        let mut table = self.table();
        table.enabled = enabled;
        table.function_masked = function_masked;
        (0..table.entries.len()).for_each(|i| self.reroute(&table, i));
    }

    /// Routes entry `index` to its message while it is deliverable, and nowhere otherwise.
    fn reroute(&self, table: &Table, index: usize) {
        let (Some(routes), Some(&gsi)) = (&self.routes, self.gsis.get(index)) else { return };
        routes.set(gsi, table.deliverable(index).map(|e| (e.address, e.data)));
    }

    /// A read of the table at `offset` (from the table's start).
    pub fn read_table(&self, offset: u64, data: &mut [u8]) {
        let table = self.table();
        let Some(e) = usize::try_from(offset / ENTRY_SIZE).ok().and_then(|i| table.entries.get(i)) else {
            return data.fill(0);
        };
        let words: [u32; 4] = [e.address as u32, (e.address >> 32) as u32, e.data, u32::from(e.masked)];
        let bytes: Vec<u8> = words.iter().flat_map(|w| w.to_le_bytes()).collect();
        fill(&bytes, (offset % ENTRY_SIZE) as u16, data);
    }

    /// A write to the table at `offset`: aligned 32-bit accesses only, as the
    /// PCI specification allows drivers to make.
    pub fn write_table(&self, offset: u64, data: &[u8]) {
        let Ok(&word) = <&[u8; 4]>::try_from(data) else { return };
        if !offset.is_multiple_of(4) {
            return;
        }
        let value = u32::from_le_bytes(word);
        let Ok(index) = usize::try_from(offset / ENTRY_SIZE) else { return };
        let mut table = self.table();
        let Some(e) = table.entries.get_mut(index) else { return };
        match offset % ENTRY_SIZE {
            0 => e.address = (e.address & !0xffff_ffff) | u64::from(value),
            4 => e.address = (e.address & 0xffff_ffff) | (u64::from(value) << 32),
            8 => e.data = value,
            _ => e.masked = value & 1 != 0,
        }
        self.reroute(&table, index);
    }
}

#[cfg(test)]
#[allow(clippy::arithmetic_side_effects)]
mod tests {
    use super::*;

    fn programmed(msix: &Msix, index: u64) {
        let at = index * ENTRY_SIZE;
        msix.write_table(at, &0xfee0_0000u32.to_le_bytes());
        msix.write_table(at + 8, &0x41u32.to_le_bytes());
        msix.write_table(at + 12, &0u32.to_le_bytes());
    }

    #[test]
    fn a_vector_fires_only_when_enabled_unmasked_and_programmed() {
        let msix = Msix::new(2, None).expect("irqfds");
        msix.signal(0);
        assert!(msix.irqfd(0).expect("fd").read().is_err(), "disabled: nothing raised");
        programmed(&msix, 0);
        msix.set_control(true, false);
        msix.signal(0);
        assert_eq!(msix.irqfd(0).expect("fd").read().expect("raised"), 1);
        msix.set_control(true, true);
        msix.signal(0);
        assert!(msix.irqfd(0).expect("fd").read().is_err(), "function masked: dropped");
        msix.signal(7);
        assert_eq!(msix.vector_or_none(7), NO_VECTOR);
    }

    #[test]
    fn the_table_reads_back_what_was_written_and_ignores_odd_accesses() {
        let msix = Msix::new(1, None).expect("irqfds");
        programmed(&msix, 0);
        msix.write_table(2, &[0xff; 4]);
        msix.write_table(0, &[0xff; 2]);
        let mut entry = [0u8; 16];
        msix.read_table(0, &mut entry);
        assert_eq!(&entry[..4], &0xfee0_0000u32.to_le_bytes());
        assert_eq!(&entry[8..12], &0x41u32.to_le_bytes());
        assert_eq!(&entry[12..], &0u32.to_le_bytes(), "unmasked");
        let mut beyond = [0xaau8; 4];
        msix.read_table(16, &mut beyond);
        assert_eq!(beyond, [0; 4]);
    }
}
