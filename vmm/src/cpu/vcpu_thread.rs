//! The vCPU thread: run the guest, dispatch exits, report what stops it.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::Sender;

use hypervisor::{Vcpu, VmExit};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use super::exit::{ExitOutcome, VcpuEvent, handle_exit};
use super::gate::VcpuGate;
use crate::devices::{MmioBus, PioBus};
use crate::heki::{HekiAction, HekiRuntime, doorbell};

/// What every vCPU thread of a VM shares.
pub struct VcpuContext {
    pub pio: PioBus,
    pub mmio: MmioBus,
    pub mem: GuestMemoryMmap,
    pub gate: VcpuGate,
    /// Set when the VM is being torn down.
    pub stop: AtomicBool,
    pub events: std::sync::Mutex<Sender<VcpuEvent>>,
    pub events_wake: EventFd,
    pub heki_port: Option<u16>,
    pub heki: Option<Arc<HekiRuntime>>,
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

impl VcpuContext {
    fn report(&self, event: VcpuEvent) {
        let sent = self.events.lock().map(|tx| tx.send(event).is_ok()).unwrap_or(false);
        if sent {
            let _ = self.events_wake.write(1);
        }
    }
}

/// Runs one vCPU until the VM stops or the vCPU reports a stopping event.
pub fn run_vcpu(mut vcpu: Vcpu, ctx: Arc<VcpuContext>) {
    let id = vcpu.id();
    loop {
        if ctx.stop.load(Ordering::Acquire) {
            return;
        }
        if let Some(heki) = &ctx.heki {
            heki.serve_pin_request(&vcpu);
        }
        let in_guest = ctx.gate.enter_guest();
        if ctx.stop.load(Ordering::Acquire) {
            return;
        }
        let outcome = match vcpu.run() {
            Ok(exit) => {
                drop(in_guest);
                if let Some(counters) = ctx.counters.get(usize::from(id)) {
                    counters.count(&exit);
                }
                handle_exit(exit, id, &ctx.pio, &ctx.mmio, ctx.heki_port)
            }
            Err(e) => ExitOutcome::Stop(VcpuEvent::Failed { vcpu: id, error: format!("{e}") }),
        };
        let keep_going = match outcome {
            ExitOutcome::Continue => true,
            ExitOutcome::MsrWrite { index, value } => match &ctx.heki {
                Some(heki) => {
                    let action = heki.on_msr_write(&mut vcpu, index, value);
                    apply_heki_action(&ctx, id, action)
                }
                None => {
                    vcpu.complete_msr_exit(true);
                    true
                }
            },
            ExitOutcome::HekiCall => match &ctx.heki {
                Some(heki) => apply_heki_action(&ctx, id, doorbell::handle_doorbell(&vcpu, heki, &ctx.gate)),
                None => true,
            },
            ExitOutcome::ProtectedWrite { gpa, data } => match &ctx.heki {
                Some(heki) => {
                    let action = heki.on_guest_write(id, gpa, &data, || vcpu.exit_rip().ok());
                    apply_heki_action(&ctx, id, action)
                }
                None => true,
            },
            ExitOutcome::EmulationFailure { insn_bytes } => {
                let bytes = insn_bytes.or_else(|| instruction_at_rip(&vcpu, &ctx.mem));
                let verdict = match (&ctx.heki, &bytes) {
                    (Some(heki), Some(bytes)) => heki.on_emulation_failure(&vcpu, bytes),
                    _ => None,
                };
                match verdict {
                    Some(action) => apply_heki_action(&ctx, id, action),
                    None => {
                        let error = describe_emulation_failure(&vcpu, bytes);
                        ctx.report(VcpuEvent::Failed { vcpu: id, error });
                        false
                    }
                }
            }
            ExitOutcome::Stop(event) => {
                ctx.report(event);
                false
            }
        };
        if !keep_going {
            return;
        }
        // Pinned CR bits are checked at every exit, kicks included.
        if let Some(heki) = &ctx.heki
            && !apply_heki_action(&ctx, id, heki.check_crs(&vcpu))
        {
            return;
        }
    }
}

/// Carries out a heki policy; false when the vCPU must stop.
fn apply_heki_action(ctx: &VcpuContext, id: u8, action: HekiAction) -> bool {
    match action {
        HekiAction::Continue => true,
        HekiAction::Paused => {
            // Hold every vCPU before telling the VMM thread, so nothing runs on.
            match ctx.gate.pause_all(crate::vm::VCPU_STOP_TIMEOUT) {
                Ok(()) => ctx.report(VcpuEvent::HekiPaused { vcpu: id }),
                Err(e) => log::error!("heki: cannot pause the VM: {e}"),
            }
            true
        }
        HekiAction::Shutdown => {
            ctx.report(VcpuEvent::HekiShutdown { vcpu: id });
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
fn describe_emulation_failure(vcpu: &Vcpu, bytes: Option<Vec<u8>>) -> String {
    let rip = match vcpu.regs() {
        Ok(regs) => regs.rip,
        Err(e) => {
            return format!("KVM could not emulate a guest instruction (registers unavailable: {e})");
        }
    };
    let bytes = match bytes {
        Some(b) => b.iter().map(|x| format!("{x:02x}")).collect::<Vec<_>>().join(" "),
        None => "unavailable".into(),
    };
    format!("KVM could not emulate the guest instruction at RIP {rip:#x} (instruction bytes: {bytes})")
}
