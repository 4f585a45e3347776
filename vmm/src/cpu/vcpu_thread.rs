//! The vCPU thread: run the guest, dispatch exits, report what stops it.
//! Heki verdicts that stop the VM act through the run control's gates, so
//! this loop only needs to ask the gate before each `KVM_RUN`.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use hypervisor::{Vcpu, VmExit};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::exit::{ExitOutcome, VcpuEvent, handle_exit};
use super::gate::Entry;
use super::hook::{ExitHook, Hooked, MsrDecision, complete_msr_write};
use super::run_control::VmControl;
use crate::devices::{MmioBus, PioBus};

/// What every vCPU thread of a VM shares.
pub struct VcpuContext {
    pub pio: PioBus,
    pub mmio: MmioBus,
    /// Read-only use: the instruction bytes of an emulation failure.
    pub mem: GuestMemoryMmap,
    pub control: Arc<VmControl>,
    pub heki_port: Option<u16>,
    /// Who sees exits, in order (`vm.rs`): the introspection agent, then heki.
    pub hooks: Vec<Arc<dyn ExitHook>>,
    /// Exit counters, indexed by vCPU id (every possible vCPU).
    pub counters: Vec<ExitCounters>,
    /// vCPUs the guest gave back, resting until the host adds them again.
    pub parking: super::parking::VcpuParking,
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
        if ctx.parking.is_parked(id) {
            let restart = ctx.parking.rest(
                id,
                || !gate.is_stopping(),
                || ctx.hooks.iter().for_each(|hook| hook.serve(&mut vcpu)),
            );
            if gate.is_stopping() {
                return;
            }
            if restart {
                // A CPU the guest will bring up again from INIT and SIPI.
                pending_completion = false;
                if let Err(e) = vcpu.wait_for_startup() {
                    ctx.control.report(VcpuEvent::Failed { vcpu: id, error: format!("{e}") });
                    return;
                }
            }
            continue;
        }
        for hook in &ctx.hooks {
            hook.serve(&mut vcpu);
        }
        let completing = match gate.enter(pending_completion) {
            Entry::Stop => return,
            Entry::Wait => {
                gate.wait(|| ctx.hooks.iter().any(|h| h.has_request(id)));
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
        // Registers are checked at every exit, kicks included.
        for hook in &ctx.hooks {
            hook.after_exit(&vcpu);
        }
    }
}

/// Carries out one exit's outcome; false when the vCPU must stop. The
/// hooks see it in order; what none of them handles gets the default here.
fn apply_outcome(ctx: &VcpuContext, vcpu: &mut Vcpu, outcome: ExitOutcome) -> bool {
    let id = vcpu.id();
    let mut outcome = match outcome {
        // The instruction bytes, for the hooks and the report.
        ExitOutcome::EmulationFailure { insn_bytes } => {
            ExitOutcome::EmulationFailure { insn_bytes: insn_bytes.or_else(|| instruction_at_rip(vcpu, &ctx.mem)) }
        }
        other => other,
    };
    for hook in &ctx.hooks {
        let msr = match outcome {
            ExitOutcome::MsrWrite { index, value } => Some((index, value)),
            _ => None,
        };
        outcome = match hook.on_exit(vcpu, outcome) {
            Hooked::Pass(outcome) => outcome,
            Hooked::Done => return true,
            Hooked::Msr(decision) => {
                if let Some((index, value)) = msr {
                    complete_msr_write(vcpu, index, value, decision);
                }
                return true;
            }
            Hooked::Stop(event) => {
                ctx.control.report(event);
                return false;
            }
        };
    }
    match outcome {
        ExitOutcome::Continue | ExitOutcome::Debug { .. } | ExitOutcome::HekiCall => true,
        // An unclaimed write with nobody to judge it: nothing is there.
        ExitOutcome::UnclaimedMmioWrite { .. } => true,
        // Filtered, and nobody allowed it.
        ExitOutcome::MsrWrite { index, value } => {
            complete_msr_write(vcpu, index, value, MsrDecision::Refuse);
            true
        }
        ExitOutcome::EmulationFailure { insn_bytes } => {
            let error = describe_emulation_failure(vcpu, insn_bytes);
            ctx.control.report(VcpuEvent::Failed { vcpu: id, error });
            false
        }
        ExitOutcome::Stop(event) => {
            ctx.control.report(event);
            false
        }
    }
}

/// The bytes at the guest RIP, read through the guest's page tables.
fn instruction_at_rip(vcpu: &Vcpu, mem: &GuestMemoryMmap) -> Option<Vec<u8>> {
    let rip = vcpu.regs().ok()?.rip;
    let gpa = vcpu.translate_gva(rip).ok().flatten()?;
    let mut buf = [0u8; 15];
    mem.read_slice(&mut buf, GuestAddress(gpa)).ok()?;
    Some(buf.to_vec())
}

/// "KVM could not emulate ... at RIP 0x…: instruction bytes 0f c7 …".
/// `bytes` is `None` when unavailable or withheld (private guest memory).
pub fn describe_emulation_failure(vcpu: &Vcpu, bytes: Option<Vec<u8>>) -> String {
    let rip = match vcpu.regs() {
        Ok(regs) => regs.rip,
        Err(e) => {
            return format!("KVM could not emulate a guest instruction (registers unavailable: {e})");
        }
    };
    let bytes = match bytes {
        Some(b) => b.iter().map(|x| format!("{x:02x}")).collect::<Vec<_>>().join(" "),
        None => "unavailable or withheld (private guest memory)".into(),
    };
    format!("KVM could not emulate the guest instruction at RIP {rip:#x} (instruction bytes: {bytes})")
}
