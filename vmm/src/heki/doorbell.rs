//! The heki doorbell: a 32-bit OUT to the heki port is a call; RAX carries the result.

use heki::{AbiError, HekiCall};

use super::ports::VcpuAccess;
use super::runtime::HekiRuntime;

/// Handles one doorbell exit on `vcpu`: decode, check privilege, execute,
/// return the result in RAX (other registers untouched).
pub fn handle_doorbell(vcpu: &dyn VcpuAccess, heki: &HekiRuntime) {
    let (mut regs, sregs) = match (vcpu.regs(), vcpu.sregs()) {
        (Ok(r), Ok(s)) => (r, s),
        (Err(e), _) | (_, Err(e)) => {
            log::error!("heki: cannot read vCPU {} registers: {e}", vcpu.id());
            return;
        }
    };
    let result = if heki.on_call(vcpu.id(), regs.rip, sregs.cpl()) {
        let call = heki::abi::decode_call(regs.rax, regs.rbx, regs.rcx, regs.rsi);
        match execute(call, vcpu, heki) {
            Ok(value) => value as i64,
            Err(e) => e.errno(),
        }
    } else {
        AbiError::NotPermitted.errno()
    };
    regs.rax = result as u64;
    if let Err(e) = vcpu.set_regs(&regs) {
        log::error!("heki: cannot return the result to vCPU {}: {e}", vcpu.id());
    }
}

fn execute(call: HekiCall, vcpu: &dyn VcpuAccess, heki: &HekiRuntime) -> Result<u64, AbiError> {
    match call {
        HekiCall::Version => Ok(heki::abi::ABI_VERSION),
        HekiCall::ProtectMemory { list } => {
            let ranges = heki.decode_page_list(list)?;
            heki.protect_pages(&ranges, "guest").map(|_| 0)
        }
        HekiCall::ProtectBytes { gpa, len } => heki.protect_bytes(gpa, len, "guest").map(|_| 0),
        HekiCall::Query { gpa } => heki.query(gpa),
        HekiCall::PinCr { register, mask } => heki.pin_cr(vcpu, register, mask).map(|_| 0),
        HekiCall::PinMsr { index } if heki.msr_pinning() => heki.pin_msr(vcpu, index).map(|_| 0),
        HekiCall::PrivateMemory { arg: 1 } => heki.enable_private_memory().map(|_| 0),
        HekiCall::PrivateMemory { .. } => Err(AbiError::InvalidArgument),
        HekiCall::SetShared { gpa, len, share } => heki.set_shared(gpa, len, share).map(|_| 0),
        HekiCall::LockMappings { va, len, expect } if heki.features() & heki::abi::feature::LOCK_MAPPINGS != 0 => {
            heki.lock_mappings(vcpu, va, len, expect).map(|_| 0)
        }
        HekiCall::PinDtr { table } => heki.pin_dtr(vcpu, table).map(|_| 0),
        HekiCall::LockMappings { .. } => Err(AbiError::NotImplemented),
        HekiCall::PinMsr { .. } | HekiCall::Unknown(_) => Err(AbiError::NotImplemented),
    }
}
