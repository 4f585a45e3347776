//! An instruction KVM cannot emulate that writes protected memory is a heki
//! violation, not the end of the VM: the write is skipped and judged.

use heki::Policy;
use hypervisor::Vcpu;

use super::runtime::{HekiAction, HekiRuntime, action_name, policy_action};
use super::violations::Violation;

impl HekiRuntime {
    /// Returns `None` when the failure is not a write to protected memory
    /// (the caller then reports it as fatal).
    pub fn on_emulation_failure(&self, vcpu: &Vcpu, insn: &[u8]) -> Option<HekiAction> {
        let mut regs = vcpu.regs().ok()?;
        let sregs = vcpu.sregs().ok()?;
        let gprs = [
            regs.rax, regs.rcx, regs.rdx, regs.rbx, regs.rsp, regs.rbp, regs.rsi, regs.rdi, regs.r8, regs.r9, regs.r10,
            regs.r11, regs.r12, regs.r13, regs.r14, regs.r15,
        ];
        let op = heki::insn::decode_memory_write(insn, regs.rip, &gprs, sregs.fs.base, sregs.gs.base)?;
        let gpa = vcpu.translate_gva(op.address).ok()??;
        let check = self.state_check_write(gpa, op.size.min(64) as usize);
        if check.allowed() {
            return None;
        }
        let policy = self.policy();
        // KVM could not carry the write out, so not even `log` performs it.
        let action = if policy == Policy::Log { "denied" } else { action_name(policy) };
        let mut record = Violation::new("write", action);
        record.vcpu = Some(vcpu.id());
        record.gpa = Some(gpa);
        record.rip = Some(regs.rip);
        record.size = Some(op.size);
        record.details.insert("emulation", "failed".into());
        self.violations.record(record);
        regs.rip = regs.rip.wrapping_add(op.length as u64);
        vcpu.set_regs(&regs).ok()?;
        Some(policy_action(policy))
    }
}
