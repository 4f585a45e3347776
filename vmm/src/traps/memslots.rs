//! Installing a memslot layout: heki plans it and diffs it against what is
//! installed (`heki::diff_slots`); this table only tracks slot ids and asks
//! the host to remove and add the slots that changed. The caller keeps
//! vCPUs out of guest mode around `apply`.

use std::collections::BTreeMap;

use heki::{PlannedSlot, diff_slots};

use super::ports::{HostError, VmSlots};

#[derive(Debug, thiserror::Error)]
pub enum MemslotError {
    #[error("no free KVM memslot id")]
    NoSlotId,
    #[error("KVM refused the memslot change")]
    Host(#[from] HostError),
}

/// The slots currently installed, with their KVM slot ids.
pub struct MemslotTable {
    installed: BTreeMap<PlannedSlot, u32>,
    /// Ids released by removed slots, reused first.
    released: Vec<u32>,
    /// Ids at or above this were never used.
    next_unused: u32,
    max_slots: u32,
}

impl MemslotTable {
    /// Starts from the boot layout (slot, id).
    pub fn new(initial: &[(PlannedSlot, u32)], max_slots: usize) -> Self {
        let installed: BTreeMap<PlannedSlot, u32> = initial.iter().copied().collect();
        let next_unused = installed.values().map(|id| id + 1).max().unwrap_or(0);
        MemslotTable {
            installed,
            released: Vec::new(),
            next_unused,
            max_slots: u32::try_from(max_slots).unwrap_or(u32::MAX),
        }
    }

    pub fn slot_count(&self) -> usize {
        self.installed.len()
    }

    pub fn max_slots(&self) -> usize {
        self.max_slots as usize
    }

    /// Whether `wanted` differs from what is installed.
    pub fn differs(&self, wanted: &[PlannedSlot]) -> bool {
        !diff_slots(&self.installed.keys().copied().collect::<Vec<_>>(), wanted).is_empty()
    }

    /// Replaces the installed layout by `wanted`, touching only what differs.
    pub fn apply(&mut self, host: &dyn VmSlots, wanted: &[PlannedSlot]) -> Result<(), MemslotError> {
        let installed: Vec<PlannedSlot> = self.installed.keys().copied().collect();
        let diff = diff_slots(&installed, wanted);
        for slot in &diff.remove {
            if let Some(id) = self.installed.remove(slot) {
                host.remove_slot(id, slot.gpa)?;
                self.released.push(id);
            }
        }
        for slot in &diff.add {
            let id = self.take_id().ok_or(MemslotError::NoSlotId)?;
            host.install_slot(id, slot.gpa, slot.size, slot.readonly)?;
            self.installed.insert(*slot, id);
        }
        Ok(())
    }

    fn take_id(&mut self) -> Option<u32> {
        if let Some(id) = self.released.pop() {
            return Some(id);
        }
        let id = self.next_unused;
        (id < self.max_slots).then(|| {
            self.next_unused += 1;
            id
        })
    }
}
