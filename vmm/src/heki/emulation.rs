//! An instruction KVM cannot emulate that writes protected memory is a heki
//! violation, not the end of the VM: the write is skipped and judged.

use heki::{Access, Protections, judge};

use super::runtime::HekiRuntime;
use crate::traps::ports::VcpuAccess;

impl HekiRuntime {
    /// Returns false when the failure is not a write to protected memory
    /// (the caller then reports it as fatal).
    pub fn on_emulation_failure(&self, vcpu: &dyn VcpuAccess, insn: &[u8]) -> bool {
        let (Ok(mut regs), Ok(sregs)) = (vcpu.regs(), vcpu.sregs()) else { return false };
        let gprs = [
            regs.rax, regs.rcx, regs.rdx, regs.rbx, regs.rsp, regs.rbp, regs.rsi, regs.rdi, regs.r8, regs.r9, regs.r10,
            regs.r11, regs.r12, regs.r13, regs.r14, regs.r15,
        ];
        let Some(op) = heki::insn::decode_memory_write(insn, regs.rip, &gprs, sregs.fs.base, sregs.gs.base) else {
            return false;
        };
        let Ok(Some(gpa)) = vcpu.translate_gva(op.address) else { return false };
        let len = usize::try_from(op.size.min(64)).unwrap_or(64);
        let verdict = {
            let protections = self.enforcer().protections();
            judge(Access::UnemulableWrite { gpa, len }, Protections { memory: &protections, pins: None }, self.policy())
        };
        if !verdict.is_violation() {
            return false;
        }
        regs.rip = regs.rip.wrapping_add(op.length as u64);
        if vcpu.set_regs(&regs).is_err() {
            return false;
        }
        let id = vcpu.id();
        self.enforcer().enforce(&verdict, &format!("vcpu {id}"), |record| {
            record.vcpu = Some(u32::from(id));
            record.gpa = Some(gpa);
            record.rip = Some(regs.rip.wrapping_sub(op.length as u64));
            record.size = Some(op.size);
            record.details.insert("emulation".into(), "failed".into());
        });
        true
    }
}
