//! The agent's commands that act on vCPUs: requests run on a vCPU's own
//! thread, pause and resume, debug settings, CR baselines, event answers,
//! and unhooking when the agent goes.

use std::time::Instant;

use serde_json::json;

use introspection_protocol::{Action, AgentError, AgentResult};

use super::link::AgentLink;
use super::vcpu_slot::{Request, VcpuSlot, WAIT_SLICE};

impl AgentLink {
    /// CR tracking starts: each vCPU's CR0, CR3 and CR4 now are the
    /// baseline its first change is reported against (read on its own thread).
    pub(super) fn take_cr_baselines(&self) -> Result<(), AgentError> {
        for id in 0..self.slots.len() {
            let id = u8::try_from(id).map_err(|_| AgentError::new("ENOENT", "no such vCPU"))?;
            // A vCPU not added yet (max_vcpus) has no thread to answer; it
            // takes its baseline at its first check.
            if !self.slot(id).is_some_and(|s| s.lock().has_thread) {
                continue;
            }
            let crs = self.on_vcpu(
                id,
                Box::new(|v| {
                    let s = v.sregs().map_err(|e| AgentError::new("EIO", crate::error_chain(&e)))?;
                    Ok(json!([s.cr0, s.cr3, s.cr4]))
                }),
            )?;
            let crs: [u64; 3] =
                serde_json::from_value(crs).map_err(|e| AgentError::new("EIO", format!("vCPU {id}: {e}")))?;
            if let Some(slot) = self.slot(id) {
                slot.lock().crs = Some(crs);
            }
        }
        Ok(())
    }

    /// CR tracking stops: the next start takes fresh baselines.
    pub(super) fn clear_cr_baselines(&self) {
        for slot in &self.slots {
            slot.lock().crs = None;
        }
    }

    /// Delivers the agent's reply to the vCPU waiting on event `seq`.
    pub(super) fn deliver(&self, seq: u64, action: Action) -> bool {
        for slot in &self.slots {
            let mut state = slot.lock();
            if state.waiting == Some(seq) && state.answer.is_none() {
                state.answer = Some(action);
                // Unlocked first: the woken vCPU does not block again on this lock.
                drop(state);
                slot.changed.notify_all();
                return true;
            }
        }
        false
    }

    /// Runs `request` on vCPU `id`'s thread and waits for its result.
    pub(super) fn on_vcpu(&self, id: u8, request: Request) -> AgentResult {
        let slot = self.slot(id).ok_or_else(|| AgentError::new("ENOENT", format!("no vCPU {id}")))?;
        {
            let mut state = slot.lock();
            state.request = Some(request);
            state.result = None;
        }
        self.wake(slot);
        let deadline = Instant::now() + crate::cpu::run_control::VCPU_STOP_TIMEOUT;
        let mut state = slot.lock();
        loop {
            if let Some(result) = state.result.take() {
                return result;
            }
            let now = Instant::now();
            if now >= deadline || self.control.vcpus.is_stopping() {
                state.request = None;
                return Err(AgentError::new("ETIMEDOUT", format!("vCPU {id} did not answer")));
            }
            if self.hub.agent_gone() {
                // Nobody will read the result: the connection's work ends with it.
                state.request = None;
                return Err(AgentError::new("ECONNRESET", "the agent disconnected"));
            }
            state =
                slot.changed.wait_timeout(state, (deadline - now).min(WAIT_SLICE)).unwrap_or_else(|p| p.into_inner()).0;
        }
    }

    fn wake(&self, slot: &VcpuSlot) {
        slot.changed.notify_all();
        self.control.vcpus.notify();
        self.control.vcpus.kick_all();
    }

    /// Pauses one vCPU; returns once its thread is parked.
    pub(super) fn pause_vcpu(&self, id: u8) -> AgentResult {
        let slot = self.slot(id).ok_or_else(|| AgentError::new("ENOENT", format!("no vCPU {id}")))?;
        slot.lock().paused = true;
        self.wake(slot);
        let deadline = Instant::now() + crate::cpu::run_control::VCPU_STOP_TIMEOUT;
        let mut state = slot.lock();
        while !state.parked {
            let now = Instant::now();
            if now >= deadline || self.control.vcpus.is_stopping() || self.hub.agent_gone() {
                // A vCPU held elsewhere (an event, a VM pause) parks when it next reaches the gate.
                return Ok(json!({"vcpu": id, "paused": true, "parked": false}));
            }
            state =
                slot.changed.wait_timeout(state, (deadline - now).min(WAIT_SLICE)).unwrap_or_else(|p| p.into_inner()).0;
        }
        Ok(json!({"vcpu": id, "paused": true, "parked": true}))
    }

    pub(super) fn resume_vcpu(&self, id: u8) {
        if let Some(slot) = self.slot(id) {
            slot.lock().paused = false;
            slot.changed.notify_all();
        }
    }

    /// Posts debug settings for vCPU `id` (applied before its next entry).
    pub(super) fn set_debug(&self, id: u8, single_step: bool, breakpoints: Vec<u64>) {
        if let Some(slot) = self.slot(id) {
            slot.lock().debug = Some((single_step, breakpoints));
            self.wake(slot);
        }
    }

    /// Undoes what the agent did to this VM: vCPU pauses, the VM pause,
    /// debug settings; every waiting vCPU wakes and falls back to the policy.
    pub(super) fn unhook(&self) {
        for slot in &self.slots {
            let mut state = slot.lock();
            state.paused = false;
            state.crs = None;
            state.debug = Some((false, Vec::new()));
            slot.changed.notify_all();
        }
        self.control.vcpus.notify();
        self.control.vcpus.kick_all();
        let mut paused = self.vm_paused.lock().unwrap_or_else(|p| p.into_inner());
        if std::mem::replace(&mut *paused, false) {
            self.control.vcpus.release();
        }
    }
}
