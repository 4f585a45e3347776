//! What makes the guest trap to user space, shared by heki and the
//! introspection agent: the read-only memslots and the MSR write filter.
//!
//! Each owner keeps its own list (heki: the pages its protections make
//! read-only and its pinned MSRs; the agent: the pages and MSRs it tracks),
//! and what is installed is always the union, planned by
//! `heki::plan_memslots`. A heki lock therefore never depends on the agent:
//! the agent removing its tracking leaves heki's pages read-only.

use std::sync::{Arc, Mutex, MutexGuard, RwLock};

pub mod memslots;
pub mod ports;

use heki::memslot_plan::merge_ranges;
use heki::{PlannedSlot, RamLayout, TooManySlots, plan_memslots};

use memslots::{MemslotError, MemslotTable};
use ports::{HostError, RunControl, VmSlots};

#[derive(Debug, thiserror::Error)]
pub enum TrapError {
    #[error(transparent)]
    TooManySlots(#[from] TooManySlots),
    #[error("vCPUs did not leave guest mode for the memslot change")]
    Hold(#[source] ports::HoldTimeout),
    #[error(transparent)]
    Memslots(#[from] MemslotError),
    #[error("cannot set the MSR filter")]
    Filter(#[source] HostError),
}

/// The installed memslots and the pages each owner wants read-only.
pub struct SlotState {
    table: MemslotTable,
    heki: Vec<(u64, u64)>,
    agent: Vec<(u64, u64)>,
}

impl SlotState {
    pub fn max_slots(&self) -> usize {
        self.table.max_slots()
    }

    pub fn slot_count(&self) -> usize {
        self.table.slot_count()
    }

    /// The layout for heki's read-only pages `heki` plus the agent's.
    pub fn plan_with_heki(&self, ram: &RamLayout, heki: &[(u64, u64)]) -> Result<Vec<PlannedSlot>, TooManySlots> {
        let union = merge_ranges(heki.iter().chain(&self.agent).copied().collect());
        plan_memslots(&ram.regions, &union, self.table.max_slots())
    }

    pub fn differs(&self, plan: &[PlannedSlot]) -> bool {
        self.table.differs(plan)
    }

    /// Installs `plan` (vCPUs held by the caller).
    pub fn apply(&mut self, host: &dyn VmSlots, plan: &[PlannedSlot]) -> Result<(), MemslotError> {
        self.table.apply(host, plan)
    }

    /// Whether the introspection agent tracks page `page` (its writes then
    /// go to the agent one by one).
    pub fn agent_tracks_page(&self, page: u64) -> bool {
        self.agent.iter().any(|&(start, end)| (start..end).contains(&page))
    }

    /// Records heki's read-only pages once its plan is installed.
    pub fn set_heki_pages(&mut self, pages: Vec<(u64, u64)>) {
        self.heki = pages;
    }
}

#[derive(Default)]
struct FilterState {
    heki: Vec<u32>,
    agent: Vec<u32>,
    exits_enabled: bool,
}

pub struct VmTraps {
    slots: Mutex<SlotState>,
    filter: Mutex<FilterState>,
    host: Arc<dyn VmSlots>,
    control: Arc<dyn RunControl>,
    /// Guest RAM: the boot regions, then what `vm.resize` plugged in.
    ram: RwLock<Arc<RamLayout>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl VmTraps {
    pub fn new(
        host: Arc<dyn VmSlots>,
        control: Arc<dyn RunControl>,
        boot_slots: &[(PlannedSlot, u32)],
        budget: usize,
    ) -> Self {
        let ram = RamLayout { regions: boot_slots.iter().map(|(s, _)| (s.gpa, s.gpa + s.size)).collect() };
        VmTraps {
            slots: Mutex::new(SlotState {
                table: MemslotTable::new(boot_slots, budget),
                heki: Vec::new(),
                agent: Vec::new(),
            }),
            filter: Mutex::default(),
            host,
            control,
            ram: RwLock::new(Arc::new(ram)),
        }
    }

    pub fn host(&self) -> &dyn VmSlots {
        self.host.as_ref()
    }

    pub fn ram(&self) -> Arc<RamLayout> {
        self.ram.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Memory hotplug: `[gpa, gpa + size)` becomes RAM and gets its memslot,
    /// planned with every owner's read-only pages; returns once no vCPU runs
    /// with the old layout. On failure nothing changes.
    pub fn add_ram(&self, gpa: u64, size: u64) -> Result<(), TrapError> {
        let mut slots = self.slots();
        let mut grown = (*self.ram()).clone();
        grown.regions.push((gpa, gpa.saturating_add(size)));
        grown.regions.sort_unstable();
        let union = merge_ranges(slots.heki.iter().chain(&slots.agent).copied().collect());
        let plan = plan_memslots(&grown.regions, &union, slots.table.max_slots())?;
        self.control.hold_vcpus().map_err(TrapError::Hold)?;
        let applied = slots.table.apply(self.host.as_ref(), &plan);
        if applied.is_ok() {
            *self.ram.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(grown);
        }
        self.control.release_vcpus();
        applied?;
        Ok(())
    }

    /// The slot state, locked: heki holds it across a protection change.
    pub fn slots(&self) -> MutexGuard<'_, SlotState> {
        lock(&self.slots)
    }

    /// Replaces the agent's tracked pages ([start, end) page numbers) and
    /// installs the union with heki's; returns once no vCPU runs with the
    /// old layout. On failure nothing changes.
    pub fn set_agent_pages(&self, pages: Vec<(u64, u64)>) -> Result<(), TrapError> {
        let mut slots = self.slots();
        let union = merge_ranges(slots.heki.iter().chain(&pages).copied().collect());
        let plan = plan_memslots(&self.ram().regions, &union, slots.table.max_slots())?;
        if slots.table.differs(&plan) {
            self.control.hold_vcpus().map_err(TrapError::Hold)?;
            let applied = slots.table.apply(self.host.as_ref(), &plan);
            self.control.release_vcpus();
            applied?;
        }
        slots.agent = merge_ranges(pages);
        Ok(())
    }

    /// Sets heki's pinned MSRs and installs the union filter.
    pub fn set_heki_msrs(&self, msrs: Vec<u32>) -> Result<(), HostError> {
        let mut filter = lock(&self.filter);
        filter.heki = msrs;
        self.install(&filter)
    }

    /// Sets the agent's intercepted MSRs and installs the union filter.
    pub fn set_agent_msrs(&self, msrs: Vec<u32>) -> Result<(), TrapError> {
        let mut filter = lock(&self.filter);
        if !filter.exits_enabled && !msrs.is_empty() {
            self.host.enable_msr_exits().map_err(TrapError::Filter)?;
            filter.exits_enabled = true;
        }
        let old = std::mem::replace(&mut filter.agent, msrs);
        if let Err(e) = self.install(&filter) {
            filter.agent = old;
            return Err(TrapError::Filter(e));
        }
        Ok(())
    }

    /// Heki enabled MSR exits itself.
    pub fn note_msr_exits_enabled(&self) {
        lock(&self.filter).exits_enabled = true;
    }

    fn install(&self, filter: &FilterState) -> Result<(), HostError> {
        let mut all: Vec<u32> = filter.heki.iter().chain(&filter.agent).copied().collect();
        all.sort_unstable();
        all.dedup();
        self.host.set_msr_write_filter(&all)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{RecordingControl, RecordingSlots};

    const PAGE: u64 = 4096;

    fn traps() -> (VmTraps, Arc<RecordingSlots>) {
        let host = Arc::new(RecordingSlots::default());
        let boot = [(PlannedSlot { gpa: 0, size: 256 * PAGE, readonly: false }, 0)];
        (VmTraps::new(host.clone(), Arc::new(RecordingControl::default()), &boot, 100), host)
    }

    fn readonly(host: &RecordingSlots) -> Vec<(u64, u64)> {
        let mut ro: Vec<(u64, u64)> =
            host.slots.lock().expect("slots").iter().filter(|s| s.3).map(|s| (s.1 / PAGE, s.2 / PAGE)).collect();
        ro.sort_unstable();
        ro
    }

    #[test]
    fn agent_pages_and_heki_pages_are_installed_together_and_removing_the_agent_keeps_heki() {
        let (traps, host) = traps();
        {
            let mut slots = traps.slots();
            let plan = slots.plan_with_heki(&traps.ram(), &[(10, 11)]).expect("fits");
            slots.apply(traps.host(), &plan).expect("installed");
            slots.set_heki_pages(vec![(10, 11)]);
        }
        traps.set_agent_pages(vec![(20, 22)]).expect("agent pages");
        assert_eq!(readonly(&host), vec![(10, 1), (20, 2)]);
        traps.set_agent_pages(Vec::new()).expect("unhook");
        assert_eq!(readonly(&host), vec![(10, 1)], "the heki page stays read-only");
    }

    #[test]
    fn the_msr_filter_is_the_union_of_heki_and_agent() {
        let (traps, host) = traps();
        traps.set_heki_msrs(vec![0xc000_0082]).expect("heki");
        traps.set_agent_msrs(vec![0x175, 0xc000_0082]).expect("agent");
        assert_eq!(*host.msr_filter.lock().expect("filter"), vec![0x175, 0xc000_0082]);
        traps.set_agent_msrs(Vec::new()).expect("unhook");
        assert_eq!(*host.msr_filter.lock().expect("filter"), vec![0xc000_0082]);
    }
}
