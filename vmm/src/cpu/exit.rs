//! Exit dispatch: a free function from (exit, context) to what happens next,
//! so tests can drive it with made-up exits.

use hypervisor::{SystemEventKind, VmExit};

use crate::devices::{DeviceAction, MmioBus, PioBus};

/// What a vCPU thread reports to the VMM thread.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum VcpuEvent {
    /// The guest asked to power off (ACPI S5).
    PowerOff { vcpu: u8 },
    /// The guest asked to reset (i8042, ACPI reset register, triple fault).
    Reset { vcpu: u8, cause: &'static str },
    /// The vCPU cannot continue.
    Failed { vcpu: u8, error: String },
    /// heki policy `pause`: the gates are already closed; `source` names the
    /// vCPU or device that broke a protection.
    HekiPaused { source: String },
    /// heki policy `shutdown`: stop the VM.
    HekiShutdown { source: String },
}

/// What the vCPU loop does after an exit.
#[derive(Debug, PartialEq, Eq)]
pub enum ExitOutcome {
    Continue,
    /// A heki doorbell call: handled by the loop, which owns the registers.
    HekiCall,
    /// An MMIO write no device claimed: heki decides whether it hit a
    /// read-only (protected) RAM page or nothing at all.
    UnclaimedMmioWrite {
        gpa: u64,
        data: Vec<u8>,
    },
    /// A guest `wrmsr` to a filtered (pinned) MSR; the loop decides, then
    /// completes the exit.
    MsrWrite {
        index: u32,
        value: u64,
    },
    /// A single step or hardware breakpoint the introspection agent set.
    Debug {
        pc: u64,
        dr6: u64,
    },
    /// An emulation failure: the loop adds the RIP and instruction bytes.
    EmulationFailure {
        insn_bytes: Option<Vec<u8>>,
    },
    Stop(VcpuEvent),
}

/// Dispatches one exit.
pub fn handle_exit(exit: VmExit<'_>, vcpu: u8, pio: &PioBus, mmio: &MmioBus, heki_port: Option<u16>) -> ExitOutcome {
    match exit {
        VmExit::IoIn { port, data } => {
            pio.read(port, data);
            ExitOutcome::Continue
        }
        VmExit::IoOut { port, .. } if Some(port) == heki_port => ExitOutcome::HekiCall,
        VmExit::IoOut { port, data } => match pio.write(port, data) {
            DeviceAction::None => ExitOutcome::Continue,
            DeviceAction::PowerOff => ExitOutcome::Stop(VcpuEvent::PowerOff { vcpu }),
            DeviceAction::Reset => ExitOutcome::Stop(VcpuEvent::Reset { vcpu, cause: "device" }),
        },
        VmExit::MmioRead { gpa, data } => {
            if !mmio.read(gpa, data) {
                data.fill(0xff);
            }
            ExitOutcome::Continue
        }
        VmExit::MmioWrite { gpa, data } if mmio.write(gpa, data) => ExitOutcome::Continue,
        VmExit::MmioWrite { gpa, data } => ExitOutcome::UnclaimedMmioWrite { gpa, data: data.to_vec() },
        VmExit::MsrRead(mut msr) => {
            msr.inject_gp();
            ExitOutcome::Continue
        }
        VmExit::MsrWrite(msr) => ExitOutcome::MsrWrite { index: msr.index, value: msr.value },
        VmExit::Debug { pc, dr6, .. } => ExitOutcome::Debug { pc, dr6 },
        VmExit::Hlt | VmExit::Interrupted | VmExit::Hypercall { .. } => ExitOutcome::Continue,
        VmExit::Shutdown => ExitOutcome::Stop(VcpuEvent::Reset { vcpu, cause: "triple fault" }),
        VmExit::SystemEvent(SystemEventKind::Reset) => {
            ExitOutcome::Stop(VcpuEvent::Reset { vcpu, cause: "system event" })
        }
        VmExit::SystemEvent(SystemEventKind::Shutdown) => ExitOutcome::Stop(VcpuEvent::PowerOff { vcpu }),
        VmExit::SystemEvent(kind) => {
            ExitOutcome::Stop(VcpuEvent::Failed { vcpu, error: format!("guest system event {kind:?}") })
        }
        VmExit::EmulationFailure(failure) => ExitOutcome::EmulationFailure { insn_bytes: failure.insn_bytes },
        VmExit::InternalError { suberror, data } => ExitOutcome::Stop(VcpuEvent::Failed {
            vcpu,
            error: format!("KVM internal error (suberror {suberror}, data {data:x?})"),
        }),
        VmExit::FailEntry { reason, cpu } => ExitOutcome::Stop(VcpuEvent::Failed {
            vcpu,
            error: format!("KVM could not enter the guest (hardware reason {reason:#x} on host CPU {cpu})"),
        }),
        VmExit::Unhandled(what) => {
            ExitOutcome::Stop(VcpuEvent::Failed { vcpu, error: format!("unhandled vCPU exit: {what}") })
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;
    use crate::devices::{AcpiPmDevice, I8042Device};
    use crate::layout::ports;

    fn platform_bus() -> PioBus {
        let mut bus = PioBus::default();
        bus.insert(ports::ACPI_SLEEP_CONTROL, 3, Arc::new(Mutex::new(AcpiPmDevice)));
        I8042Device::attach(&mut bus);
        bus
    }

    #[test]
    fn acpi_s5_write_stops_with_poweroff() {
        let exit = VmExit::IoOut { port: 0x600, data: &[0x34] };
        assert_eq!(
            handle_exit(exit, 1, &platform_bus(), &MmioBus::default(), None),
            ExitOutcome::Stop(VcpuEvent::PowerOff { vcpu: 1 })
        );
    }

    #[test]
    fn i8042_reset_and_triple_fault_are_resets() {
        let exit = VmExit::IoOut { port: 0x64, data: &[0xfe] };
        assert!(matches!(
            handle_exit(exit, 0, &platform_bus(), &MmioBus::default(), None),
            ExitOutcome::Stop(VcpuEvent::Reset { .. })
        ));
        assert!(matches!(
            handle_exit(VmExit::Shutdown, 0, &platform_bus(), &MmioBus::default(), None),
            ExitOutcome::Stop(VcpuEvent::Reset { cause: "triple fault", .. })
        ));
    }

    #[test]
    fn doorbell_port_is_a_heki_call_only_when_registered() {
        let bus = platform_bus();
        assert_eq!(
            handle_exit(VmExit::IoOut { port: 0x580, data: &[0; 4] }, 0, &bus, &MmioBus::default(), Some(0x580)),
            ExitOutcome::HekiCall
        );
        assert_eq!(
            handle_exit(VmExit::IoOut { port: 0x580, data: &[0; 4] }, 0, &bus, &MmioBus::default(), None),
            ExitOutcome::Continue
        );
    }

    #[test]
    fn unclaimed_port_reads_all_ones() {
        let mut data = [0u8; 4];
        let outcome =
            handle_exit(VmExit::IoIn { port: 0x1234, data: &mut data }, 0, &platform_bus(), &MmioBus::default(), None);
        assert_eq!(outcome, ExitOutcome::Continue);
        assert_eq!(data, [0xff; 4]);
    }
}
