//! heki as an exit hook (`cpu::hook`): doorbell calls, trapped writes to
//! locked pages, filtered MSR writes, emulation failures on locked pages,
//! and the register checks after every exit.

use hypervisor::Vcpu;

use super::{ExitSite, HekiRuntime, doorbell};
use crate::cpu::hook::{ExitHook, Hooked};
use crate::cpu::{ExitOutcome, VcpuEvent};

impl ExitHook for HekiRuntime {
    fn serve(&self, vcpu: &mut Vcpu) {
        self.serve_pin_request(&*vcpu);
    }

    fn has_request(&self, id: u8) -> bool {
        self.pins().has_request(id)
    }

    fn on_exit(&self, vcpu: &mut Vcpu, outcome: ExitOutcome) -> Hooked {
        match outcome {
            ExitOutcome::HekiCall => {
                doorbell::handle_doorbell(&*vcpu, self);
                Hooked::Done
            }
            ExitOutcome::MsrWrite { index, value } => Hooked::Msr(self.on_msr_write(&*vcpu, index, value)),
            ExitOutcome::UnclaimedMmioWrite { gpa, data } => {
                // One element of a `rep stos`/`rep movs`: the rest of its run
                // in the page is completed now, not one exit per element.
                if !self.complete_string_write(vcpu, gpa, &data) {
                    self.on_unclaimed_mmio_write(vcpu.id(), gpa, &data, || ExitSite::of(&*vcpu));
                }
                Hooked::Done
            }
            ExitOutcome::EmulationFailure { insn_bytes: Some(bytes) } => {
                if self.on_emulation_failure(&*vcpu, &bytes) {
                    return Hooked::Done;
                }
                // Not aimed at a locked page: a fatal failure, reported
                // without bytes the guest keeps private.
                let bytes = (!self.instruction_is_private(vcpu)).then_some(bytes);
                Hooked::Stop(VcpuEvent::Failed {
                    vcpu: vcpu.id(),
                    error: crate::cpu::describe_emulation_failure(vcpu, bytes),
                })
            }
            other => Hooked::Pass(other),
        }
    }

    fn after_exit(&self, vcpu: &Vcpu) {
        self.check_crs(vcpu);
    }
}

impl HekiRuntime {
    /// Whether the instruction at RIP may lie in a page the guest keeps
    /// private (an untranslatable RIP counts as private once memory is).
    fn instruction_is_private(&self, vcpu: &Vcpu) -> bool {
        if !self.private_memory_enabled() {
            return false;
        }
        let gpa = vcpu.regs().ok().and_then(|r| vcpu.translate_gva(r.rip).ok().flatten());
        gpa.is_none_or(|gpa| self.range_is_private(gpa, 15))
    }
}
