//! One VM seen by the agent: the vCPU side of introspection.
//!
//! vCPU threads call in at three points: before entering the guest
//! (`serve`: run the agent's register requests on their own thread, apply
//! debug settings, park while the agent pauses this vCPU), after an exit
//! (`intercept`: a tracked write, MSR write, hypercall or debug stop becomes
//! an event, and this vCPU alone waits for the reply), and after each exit
//! (`check_crs`, CR changes as detected). The agent's socket thread posts
//! requests and delivers replies through each vCPU's slot.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use hypervisor::{CpuidEntry, Vcpu};
use serde_json::{Value, json};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::Hub;
use super::agent_events::write_event;
use super::inbox::{Inbox, Line, LineReader};
use super::vcpu_slot::{SlotState, VcpuSlot, WAIT_SLICE};
use crate::cpu::hook::{ExitHook, Hooked, MsrDecision};
use crate::cpu::run_control::VmControl;
use crate::cpu::{ExitOutcome, VcpuEvent};
use crate::guest_access::CheckedMemory;
use crate::heki::HekiRuntime;
use crate::traps::VmTraps;
use crate::traps::ports::VcpuAccess;
use introspection_protocol::{self as protocol, Action, EventLine, Incoming};

/// DR6.BS: the debug exit is a single step.
const DR6_SINGLE_STEP: u64 = 1 << 14;

pub struct AgentLink {
    pub(super) hub: Arc<Hub>,
    pub(super) traps: Arc<VmTraps>,
    pub(super) memory: CheckedMemory,
    /// The guest's own view of RAM: tracked writes the agent let through
    /// land here (heki off; with heki on, heki writes them).
    pub(super) ram: GuestMemoryMmap,
    pub(super) control: Arc<VmControl>,
    pub(super) heki: Option<Arc<HekiRuntime>>,
    pub(super) cpuid: Vec<Vec<CpuidEntry>>,
    pub(super) slots: Vec<VcpuSlot>,
    /// Whether the agent holds every vCPU out of guest mode.
    pub(super) vm_paused: Mutex<bool>,
}

impl AgentLink {
    pub fn new(
        hub: Arc<Hub>,
        traps: Arc<VmTraps>,
        memory: CheckedMemory,
        ram: GuestMemoryMmap,
        control: Arc<VmControl>,
        heki: Option<Arc<HekiRuntime>>,
        cpuid: Vec<Vec<CpuidEntry>>,
    ) -> Self {
        let slots = (0..cpuid.len()).map(|_| VcpuSlot::default()).collect();
        AgentLink { hub, traps, memory, ram, control, heki, cpuid, slots, vm_paused: Mutex::new(false) }
    }

    /// Agent counters for `vm.counters`.
    pub fn counters(&self) -> Value {
        self.hub.counters.to_json()
    }

    /// The VM is being torn down: the agent no longer sees it.
    pub fn detach(&self) {
        self.hub.detach(self);
    }

    pub fn vcpu_count(&self) -> usize {
        self.slots.len()
    }

    pub(super) fn slot(&self, id: u8) -> Option<&VcpuSlot> {
        self.slots.get(usize::from(id))
    }

    /// Whether the agent posted work for vCPU `id` (wakes a waiting vCPU).
    pub fn has_request(&self, id: u8) -> bool {
        self.slot(id).is_some_and(|s| {
            let state = s.lock();
            state.request.is_some() || state.debug.is_some() || state.paused
        })
    }

    // ---- vCPU thread side ----

    /// Before each entry: serve requests, apply debug settings, and park
    /// while the agent pauses this vCPU (serving requests meanwhile).
    pub fn serve(&self, vcpu: &mut Vcpu) {
        // Events carry the CPL: while they can happen, KVM publishes it in the run page.
        vcpu.sync_special_registers(self.hub.events_armed());
        let Some(slot) = self.slot(vcpu.id()) else { return };
        let mut state = slot.lock();
        state.has_thread = true;
        loop {
            state = self.serve_locked(slot, state, vcpu);
            if !state.paused || self.control.vcpus.is_stopping() {
                break;
            }
            if !state.parked {
                state.parked = true;
                slot.changed.notify_all();
            }
            state = slot.changed.wait_timeout(state, WAIT_SLICE).unwrap_or_else(|p| p.into_inner()).0;
        }
        if state.parked {
            state.parked = false;
            slot.changed.notify_all();
        }
    }

    fn serve_locked<'a>(
        &self,
        slot: &'a VcpuSlot,
        mut state: MutexGuard<'a, SlotState>,
        vcpu: &mut Vcpu,
    ) -> MutexGuard<'a, SlotState> {
        if let Some((single_step, breakpoints)) = state.debug.take() {
            if let Err(e) = vcpu.set_guest_debug(single_step, &breakpoints) {
                log::warn!("introspection: vCPU {}: {e}", vcpu.id());
            }
            state.applied = (single_step, breakpoints);
            state.stepping_over = false;
        }
        if let Some(request) = state.request.take() {
            drop(state);
            let result = request(vcpu);
            state = slot.lock();
            state.result = Some(result);
            slot.changed.notify_all();
        }
        state
    }

    /// Handles an exit the agent may have asked to see.
    fn intercept(&self, vcpu: &mut Vcpu, outcome: ExitOutcome) -> Hooked {
        let tracking = self.hub.tracking();
        match outcome {
            ExitOutcome::UnclaimedMmioWrite { gpa, data } => {
                let len = data.len() as u64;
                let tracked = tracking.tracks_range(gpa, len);
                drop(tracking);
                if !tracked && self.heki.is_some() {
                    return Hooked::Pass(ExitOutcome::UnclaimedMmioWrite { gpa, data });
                }
                self.on_write(vcpu, gpa, &data, tracked)
            }
            ExitOutcome::MsrWrite { index, value } if tracking.msrs.contains(&index) => {
                drop(tracking);
                self.on_msr_write(vcpu, index, value)
            }
            ExitOutcome::MsrWrite { .. } if self.heki.is_none() => {
                // Only the agent filters MSRs here: an MSR it stopped tracking is written as asked.
                Hooked::Msr(MsrDecision::Write)
            }
            ExitOutcome::HekiCall if tracking.hypercalls => {
                drop(tracking);
                self.on_hypercall(vcpu)
            }
            ExitOutcome::Debug { pc, dr6 } => {
                drop(tracking);
                let single_step = dr6 & DR6_SINGLE_STEP != 0;
                if single_step && self.end_step_over(vcpu) {
                    return Hooked::Done;
                }
                let kind = if single_step { "single-step" } else { "breakpoint" };
                let event = EventLine::new(kind).num("dr6", dr6).num("pc", pc);
                match self.raise(vcpu, event) {
                    Some(Action::Crash) => self.crash(vcpu),
                    _ => {
                        if !single_step {
                            self.step_over(vcpu);
                        }
                        Hooked::Done
                    }
                }
            }
            other => Hooked::Pass(other),
        }
    }

    /// An execute breakpoint is a fault: RIP still points at the
    /// instruction, and re-entering would hit it again at once. As a
    /// debugger does, run that one instruction with breakpoints off and
    /// single-step on (RFLAGS.RF would do it on hardware, but not every KVM
    /// honours it), then put the settings back (`end_step_over`).
    fn step_over(&self, vcpu: &Vcpu) {
        let Some(slot) = self.slot(vcpu.id()) else { return };
        let mut state = slot.lock();
        match vcpu.set_guest_debug(true, &[]) {
            Ok(()) => state.stepping_over = true,
            Err(e) => log::warn!("introspection: vCPU {}: cannot step past a breakpoint: {e}", vcpu.id()),
        }
    }

    /// The single step of a step-over is done: the agent's settings return.
    /// True when the step is ours alone (the agent does not single-step).
    fn end_step_over(&self, vcpu: &Vcpu) -> bool {
        let Some(slot) = self.slot(vcpu.id()) else { return false };
        let mut state = slot.lock();
        if !std::mem::replace(&mut state.stepping_over, false) {
            return false;
        }
        let (single_step, breakpoints) = &state.applied;
        if let Err(e) = vcpu.set_guest_debug(*single_step, breakpoints) {
            log::warn!("introspection: vCPU {}: {e}", vcpu.id());
        }
        !*single_step
    }

    fn crash(&self, vcpu: &Vcpu) -> Hooked {
        crate::events::emit("introspection", "crash", &[("vcpu", vcpu.id().to_string())]);
        Hooked::Stop(VcpuEvent::Failed { vcpu: vcpu.id(), error: "the introspection agent answered crash".into() })
    }

    fn on_write(&self, vcpu: &mut Vcpu, gpa: u64, data: &[u8], tracked: bool) -> Hooked {
        let mut tracked = tracked;
        loop {
            let action = if tracked {
                let locked = self.heki.as_ref().is_some_and(|h| h.write_is_locked(gpa, data.len()));
                let private = self.heki.as_ref().is_some_and(|h| h.range_is_private(gpa, data.len()));
                self.raise(vcpu, write_event(gpa, data, locked, private))
            } else {
                None
            };
            match action {
                // No answer (no agent, a timeout, a disconnect): the VM's policy decides.
                None | Some(Action::Continue) => {
                    self.perform_write(vcpu, gpa, data);
                    return Hooked::Done;
                }
                Some(Action::Deny) => {
                    if let Some(heki) = &self.heki {
                        heki.on_denied_mmio_write(vcpu.id(), gpa, data, || crate::heki::ExitSite::of(&*vcpu));
                    }
                    return Hooked::Done;
                }
                Some(Action::Retry) => tracked = self.hub.tracking().tracks_range(gpa, data.len() as u64),
                Some(Action::Crash) => return self.crash(vcpu),
            }
        }
    }

    /// Performs a trapped write: heki judges it when enabled (a heki lock
    /// always holds); otherwise the bytes land in RAM.
    fn perform_write(&self, vcpu: &Vcpu, gpa: u64, data: &[u8]) {
        match &self.heki {
            Some(heki) => heki.on_unclaimed_mmio_write(vcpu.id(), gpa, data, || crate::heki::ExitSite::of(vcpu)),
            None => {
                if self.traps.ram().contains(gpa, data.len() as u64)
                    && let Err(e) = self.ram.write_slice(data, GuestAddress(gpa))
                {
                    log::warn!("introspection: cannot apply a tracked write at {gpa:#x}: {e}");
                }
            }
        }
    }

    fn on_msr_write(&self, vcpu: &mut Vcpu, index: u32, value: u64) -> Hooked {
        loop {
            let tracked = self.hub.tracking().msrs.contains(&index);
            let action = if tracked {
                self.raise(vcpu, EventLine::new("msr").num("msr", u64::from(index)).num("value", value))
            } else {
                None
            };
            match action {
                // heki, when on, has the last word on a pinned MSR.
                None | Some(Action::Continue) if self.heki.is_some() => {
                    return Hooked::Pass(ExitOutcome::MsrWrite { index, value });
                }
                None | Some(Action::Continue) => return Hooked::Msr(MsrDecision::Write),
                Some(Action::Deny) => return Hooked::Msr(MsrDecision::Refuse),
                Some(Action::Retry) => continue,
                Some(Action::Crash) => return self.crash(vcpu),
            }
        }
    }

    fn on_hypercall(&self, vcpu: &mut Vcpu) -> Hooked {
        loop {
            let tracked = self.hub.tracking().hypercalls;
            let action = if tracked {
                let regs = vcpu.exit_regs().unwrap_or_default();
                let event =
                    EventLine::new("hypercall").num("nr", regs.rax).nums("args", &[regs.rbx, regs.rcx, regs.rsi]);
                self.raise(vcpu, event)
            } else {
                None
            };
            match action {
                None | Some(Action::Continue) => return Hooked::Pass(ExitOutcome::HekiCall),
                Some(Action::Deny) => {
                    // Fresh, not the exit's copy: the agent may have set registers meanwhile.
                    let regs = vcpu.regs().unwrap_or_default();
                    let regs = hypervisor::Regs { rax: heki::AbiError::NotPermitted.errno() as u64, ..regs };
                    if let Err(e) = vcpu.set_regs(&regs) {
                        log::warn!("introspection: vCPU {}: {e}", vcpu.id());
                    }
                    return Hooked::Done;
                }
                Some(Action::Retry) => continue,
                Some(Action::Crash) => return self.crash(vcpu),
            }
        }
    }

    /// Sends an event and holds this vCPU (serving the agent's requests)
    /// until the reply; `None` without an agent, on a timeout or a disconnect.
    fn raise(&self, vcpu: &mut Vcpu, event: EventLine) -> Option<Action> {
        let id = vcpu.id();
        let slot = self.slot(id)?;
        // From the run page (synced registers): no ioctl on the hot path.
        let (rip, cpl) = (vcpu.exit_rip().unwrap_or(0), vcpu.exit_cpl().unwrap_or(0));
        let event = event.num("vcpu", u64::from(id)).num("rip", rip).num("cpl", u64::from(cpl));
        let seq = self.hub.next_seq();
        {
            let mut state = slot.lock();
            state.waiting = Some(seq);
            state.answer = None;
        }
        // Borrowed before the event goes out, so the reply cannot slip past.
        let reader = self.hub.inbox().and_then(|(connection, inbox)| {
            let reader = inbox.try_borrow()?;
            Some((connection, inbox, reader))
        });
        let Some(connection) = self.hub.send_event(seq, event) else {
            if let Some((_, inbox, reader)) = reader {
                inbox.give_back(reader, None);
            }
            return None;
        };
        let deadline = Instant::now() + self.hub.reply_timeout;
        if let Some((borrowed_for, inbox, reader)) = reader {
            if borrowed_for != connection {
                // The agent changed meanwhile: that reader is the old connection's.
                inbox.give_back(reader, None);
            } else if let Some(answer) = self.read_own_reply(&inbox, reader, seq, connection, deadline) {
                slot.lock().waiting = None;
                return Some(answer);
            }
        }
        let mut state = slot.lock();
        let answer = loop {
            if let Some(answer) = state.answer.take() {
                break Some(answer);
            }
            if self.hub.connection() != Some(connection) || self.control.vcpus.is_stopping() {
                break None;
            }
            let now = Instant::now();
            if now >= deadline {
                self.hub.note_timeout(id, seq);
                break None;
            }
            state = self.serve_locked(slot, state, vcpu);
            if state.answer.is_some() {
                continue;
            }
            let wait = (deadline - now).min(WAIT_SLICE);
            state = slot.changed.wait_timeout(state, wait).unwrap_or_else(|p| p.into_inner()).0;
        };
        state.waiting = None;
        answer
    }

    /// Reads the agent's lines on this vCPU's thread until the reply to
    /// `seq`. Replies to other vCPUs' events are delivered on the way; any
    /// other line, the end of the connection, the deadline or a VM stop
    /// hands the reader back to `introspect-rx`, and `None` sends the caller
    /// to the usual wait (which the agent can still answer).
    fn read_own_reply(
        &self,
        inbox: &Inbox,
        mut reader: LineReader,
        seq: u64,
        connection: u64,
        deadline: Instant,
    ) -> Option<Action> {
        // As KVM's halt polling: a reply that comes within `reply_poll` is
        // seen without this thread sleeping and being woken again.
        let poll_until = Instant::now() + self.hub.reply_poll;
        loop {
            while let Some(line) = reader.next_line() {
                let Line::Text(text) = &line else {
                    inbox.give_back(reader, Some(line));
                    return None;
                };
                match protocol::parse_line(text) {
                    Ok(Incoming::Reply { seq: replied, action }) if replied == seq => {
                        self.hub.counters.replies.fetch_add(1, Ordering::Relaxed);
                        inbox.give_back(reader, None);
                        return Some(action);
                    }
                    Ok(Incoming::Reply { seq: replied, action }) => self.hub.deliver_reply(replied, action),
                    _ => {
                        inbox.give_back(reader, Some(line));
                        return None;
                    }
                }
            }
            let now = Instant::now();
            if now >= deadline || self.hub.connection() != Some(connection) || self.control.vcpus.is_stopping() {
                inbox.give_back(reader, None);
                return None;
            }
            if now < poll_until {
                std::hint::spin_loop();
            } else {
                inbox.wait((deadline - now).min(WAIT_SLICE));
            }
            if inbox.receive(&mut reader).is_err() {
                // `reader` now ends with `Line::End`, which goes back to introspect-rx.
                continue;
            }
        }
    }

    /// CR changes, as detected at an exit (KVM gives user space no CR-write exits).
    pub fn check_crs(&self, vcpu: &Vcpu) {
        if !self.hub.tracking().crs {
            return;
        }
        let Some(slot) = self.slot(vcpu.id()) else { return };
        let Ok(sregs) = vcpu.sregs() else { return };
        let now = [sregs.cr0, sregs.cr3, sregs.cr4];
        let before = slot.lock().crs.replace(now);
        let Some(before) = before else { return };
        for (i, name) in ["cr0", "cr3", "cr4"].into_iter().enumerate() {
            if before[i] != now[i] {
                let rip = VcpuAccess::exit_rip(vcpu).unwrap_or(0);
                self.hub.send_async(json!({
                    "event": "cr", "vcpu": vcpu.id(), "register": name, "old": before[i], "new": now[i],
                    "rip": rip, "cpl": sregs.cpl(), "detected": true,
                }));
            }
        }
    }

    // ---- socket thread side ----
}

/// The agent sees exits before heki does (`vm.rs` orders the hooks): it may
/// hold a tracked write, MSR write or hypercall for its answer, and heki then
/// judges what the agent let through, so a heki lock holds whatever the agent says.
impl ExitHook for AgentLink {
    fn serve(&self, vcpu: &mut Vcpu) {
        AgentLink::serve(self, vcpu);
    }

    fn has_request(&self, id: u8) -> bool {
        AgentLink::has_request(self, id)
    }

    fn on_exit(&self, vcpu: &mut Vcpu, outcome: ExitOutcome) -> Hooked {
        self.intercept(vcpu, outcome)
    }

    fn after_exit(&self, vcpu: &Vcpu) {
        self.check_crs(vcpu);
    }
}
