//! Exit hooks: what watches and polices a vCPU's exits (introspection, heki)
//! plugs in here, in one fixed order that `vm.rs` sets. The vCPU loop asks
//! each hook in turn; the first that handles an exit ends the chain, and what
//! no hook handled gets the default treatment in `vcpu_thread.rs`. Exits are
//! completed in one place each: an MSR write by `complete_msr_write`, port
//! and MMIO exits by KVM on re-entry.

use hypervisor::Vcpu;

use super::exit::{ExitOutcome, VcpuEvent};

/// What to do with a filtered `wrmsr`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MsrDecision {
    /// Write the value (the filter kept KVM from doing it).
    Write,
    /// Refuse it: the guest gets #GP and the MSR keeps its value.
    Refuse,
}

/// What a hook made of an exit.
#[derive(Debug, PartialEq, Eq)]
pub enum Hooked {
    /// Not handled here: the next hook (then the default) sees it.
    Pass(ExitOutcome),
    /// Handled; nothing is left to complete.
    Done,
    /// A decision on a filtered `wrmsr`, completed by the loop.
    Msr(MsrDecision),
    /// The vCPU stops and reports this.
    Stop(VcpuEvent),
}

/// One party that sees every vCPU's exits.
pub trait ExitHook: Send + Sync {
    /// Serves what was posted for this vCPU (before each entry, and while
    /// the vCPU is held out of guest mode).
    fn serve(&self, _vcpu: &mut Vcpu) {}

    /// Whether something waits to be served on vCPU `id` (wakes it when parked).
    fn has_request(&self, _id: u8) -> bool {
        false
    }

    /// One exit; see `Hooked`.
    fn on_exit(&self, vcpu: &mut Vcpu, outcome: ExitOutcome) -> Hooked;

    /// After every exit (kicks included): register checks.
    fn after_exit(&self, _vcpu: &Vcpu) {}
}

/// Completes a filtered `wrmsr` exit: the one place that does.
pub fn complete_msr_write(vcpu: &mut Vcpu, index: u32, value: u64, decision: MsrDecision) {
    let written = decision == MsrDecision::Write && vcpu.set_msrs(&[(index, value)]).is_ok();
    vcpu.complete_msr_exit(!written);
}
