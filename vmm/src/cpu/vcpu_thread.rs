//! The vCPU thread: run the guest, dispatch exits, report what stops it.
//! Heki verdicts that stop the VM act through the run control's gates, so
//! this loop only needs to ask the gate before each `KVM_RUN`.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use hypervisor::{Vcpu, VmExit};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::exit::{ExitOutcome, VcpuEvent, handle_exit};
use super::gate::Entry;
use crate::devices::{MmioBus, PioBus};
use crate::heki::{HekiRuntime, doorbell};
use crate::introspection::{AgentLink, Intercepted};
use crate::run_control::VmControl;

/// What every vCPU thread of a VM shares.
pub struct VcpuContext {
    pub pio: PioBus,
    pub mmio: MmioBus,
    /// Read-only use: the instruction bytes of an emulation failure.
    pub mem: GuestMemoryMmap,
    pub control: Arc<VmControl>,
    pub heki_port: Option<u16>,
    pub heki: Option<Arc<HekiRuntime>>,
    /// The introspection agent's view of this VM, when configured.
    pub agent: Option<Arc<AgentLink>>,
    /// Exit counters, indexed by vCPU id.
    pub counters: Vec<ExitCounters>,
}

/// Lock-free per-vCPU exit counters for `vm.counters`.
#[derive(Default)]
pub struct ExitCounters {
    pub exits: AtomicU64,
    pub pio: AtomicU64,
    pub mmio: AtomicU64,
}

impl ExitCounters {
    fn count(&self, exit: &VmExit<'_>) {
        self.exits.fetch_add(1, Ordering::Relaxed);
        match exit {
            VmExit::IoIn { .. } | VmExit::IoOut { .. } => self.pio.fetch_add(1, Ordering::Relaxed),
            VmExit::MmioRead { .. } | VmExit::MmioWrite { .. } => self.mmio.fetch_add(1, Ordering::Relaxed),
            _ => 0,
        };
    }

    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "exits": self.exits.load(Ordering::Relaxed),
            "pio_exits": self.pio.load(Ordering::Relaxed),
            "mmio_exits": self.mmio.load(Ordering::Relaxed),
        })
    }
}

/// Exits that KVM finishes only on the next `KVM_RUN` (the KVM API requires
/// that re-entry before the vCPU state is complete).
fn needs_completion(exit: &VmExit<'_>) -> bool {
    matches!(
        exit,
        VmExit::IoIn { .. }
            | VmExit::IoOut { .. }
            | VmExit::MmioRead { .. }
            | VmExit::MmioWrite { .. }
            | VmExit::MsrRead(_)
            | VmExit::MsrWrite(_)
    )
}

/// Runs one vCPU until the VM stops or the vCPU reports a stopping event.
pub fn run_vcpu(mut vcpu: Vcpu, ctx: Arc<VcpuContext>) {
    let id = vcpu.id();
    let gate = &ctx.control.vcpus;
    let mut pending_completion = false;
    loop {
        if let Some(heki) = &ctx.heki {
            heki.serve_pin_request(&vcpu);
        }
        if let Some(agent) = &ctx.agent {
            agent.serve(&mut vcpu);
        }
        let completing = match gate.enter(pending_completion) {
            Entry::Stop => return,
            Entry::Wait => {
                let (heki, agent) = (ctx.heki.as_deref(), ctx.agent.as_deref());
                gate.wait(|| {
                    heki.is_some_and(|h| h.pins().has_request(id)) || agent.is_some_and(|a| a.has_request(id))
                });
                continue;
            }
            Entry::Run(guard) => (false, guard),
            Entry::Complete(guard) => (true, guard),
        };
        let (completing, in_guest) = completing;
        if completing {
            vcpu.set_immediate_exit(true);
        }
        let result = vcpu.run();
        let outcome = match result {
            Ok(exit) => {
                drop(in_guest);
                pending_completion = needs_completion(&exit);
                if let Some(counters) = ctx.counters.get(usize::from(id)) {
                    counters.count(&exit);
                }
                handle_exit(exit, id, &ctx.pio, &ctx.mmio, ctx.heki_port)
            }
            Err(e) => ExitOutcome::Stop(VcpuEvent::Failed { vcpu: id, error: format!("{e}") }),
        };
        if completing {
            vcpu.set_immediate_exit(false);
        }
        if !apply_outcome(&ctx, &mut vcpu, outcome) {
            return;
        }
        // Pinned CR bits are checked at every exit, kicks included.
        if let Some(heki) = &ctx.heki {
            heki.check_crs(&vcpu);
        }
        if let Some(agent) = &ctx.agent {
            agent.check_crs(&vcpu);
        }
    }
}

/// Carries out one exit's outcome; false when the vCPU must stop.
fn apply_outcome(ctx: &VcpuContext, vcpu: &mut Vcpu, outcome: ExitOutcome) -> bool {
    let id = vcpu.id();
    // The agent sees tracked writes, MSR writes, hypercalls and debug stops first.
    let outcome = match &ctx.agent {
        Some(agent) => match agent.intercept(vcpu, outcome) {
            Intercepted::Handled => return true,
            Intercepted::Crash(event) => {
                ctx.control.report(event);
                return false;
            }
            Intercepted::Pass(outcome) => outcome,
        },
        None => outcome,
    };
    match (outcome, &ctx.heki) {
        (ExitOutcome::Continue | ExitOutcome::Debug { .. }, _) => {}
        (ExitOutcome::MsrWrite { index, value }, Some(heki)) => heki.on_msr_write(vcpu, index, value),
        (ExitOutcome::MsrWrite { .. }, None) => vcpu.complete_msr_exit(true),
        (ExitOutcome::HekiCall, Some(heki)) => doorbell::handle_doorbell(vcpu, heki),
        (ExitOutcome::HekiCall, None) => {}
        (ExitOutcome::UnclaimedMmioWrite { gpa, data }, Some(heki)) => {
            heki.on_unclaimed_mmio_write(id, gpa, &data, || crate::heki::ExitSite::of(&*vcpu));
        }
        (ExitOutcome::UnclaimedMmioWrite { .. }, None) => {}
        (ExitOutcome::EmulationFailure { insn_bytes }, heki) => {
            let bytes = insn_bytes.or_else(|| instruction_at_rip(vcpu, &ctx.mem));
            let judged = match (heki, &bytes) {
                (Some(heki), Some(bytes)) => heki.on_emulation_failure(vcpu, bytes),
                _ => false,
            };
            if !judged {
                // Private guest memory stays private in the failure report too.
                let private = heki.as_deref().is_some_and(|h| instruction_is_private(vcpu, h));
                let error = describe_emulation_failure(vcpu, bytes, private);
                ctx.control.report(VcpuEvent::Failed { vcpu: id, error });
                return false;
            }
        }
        (ExitOutcome::Stop(event), _) => {
            ctx.control.report(event);
            return false;
        }
    }
    true
}

/// The bytes at the guest RIP, read through the guest's page tables.
fn instruction_at_rip(vcpu: &Vcpu, mem: &GuestMemoryMmap) -> Option<Vec<u8>> {
    let rip = vcpu.regs().ok()?.rip;
    let gpa = vcpu.translate_gva(rip).ok().flatten()?;
    let mut buf = [0u8; 15];
    mem.read_slice(&mut buf, GuestAddress(gpa)).ok()?;
    Some(buf.to_vec())
}

/// Whether the instruction at RIP may lie in a page the guest keeps private
/// (an untranslatable RIP counts as private once private memory is on).
fn instruction_is_private(vcpu: &Vcpu, heki: &HekiRuntime) -> bool {
    if !heki.private_memory_enabled() {
        return false;
    }
    let gpa = vcpu.regs().ok().and_then(|r| vcpu.translate_gva(r.rip).ok().flatten());
    gpa.is_none_or(|gpa| heki.range_is_private(gpa, 15))
}

/// "KVM could not emulate ... at RIP 0x…: instruction bytes 0f c7 …".
fn describe_emulation_failure(vcpu: &Vcpu, bytes: Option<Vec<u8>>, private: bool) -> String {
    let rip = match vcpu.regs() {
        Ok(regs) => regs.rip,
        Err(e) => {
            return format!("KVM could not emulate a guest instruction (registers unavailable: {e})");
        }
    };
    let bytes = match bytes {
        Some(_) if private => "withheld, the guest keeps this memory private".into(),
        Some(b) => b.iter().map(|x| format!("{x:02x}")).collect::<Vec<_>>().join(" "),
        None => "unavailable".into(),
    };
    format!("KVM could not emulate the guest instruction at RIP {rip:#x} (instruction bytes: {bytes})")
}
