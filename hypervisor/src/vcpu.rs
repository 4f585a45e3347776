use kvm_bindings::{
    KVM_INTERNAL_ERROR_EMULATION, KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES, Msrs, kvm_msr_entry, kvm_run,
};
use kvm_ioctls::{VcpuExit, VcpuFd};

use crate::cpuid::{CpuidEntry, to_kvm_cpuid};
use crate::error::{HypervisorError, Result, ioctl_err};
use crate::exit::{EmulationFailure, MsrRead, MsrWrite, SystemEventKind, VmExit};
use crate::regs::{Regs, SpecialRegs, merge_sregs};

/// Local APIC register offsets and delivery modes for LINT0/LINT1.
const APIC_LVT0: usize = 0x350;
const APIC_LVT1: usize = 0x360;
const APIC_MODE_EXTINT: u32 = 0x7;
const APIC_MODE_NMI: u32 = 0x4;

thread_local! {
    /// The run page of the vCPU this thread last ran, for the kick handler.
    static RUN_PAGE: std::cell::Cell<*mut kvm_run> = const { std::cell::Cell::new(std::ptr::null_mut()) };
}

/// For the kick signal handler: makes this thread's vCPU leave `KVM_RUN`,
/// or not enter it, so a kick that lands just before the ioctl is not lost.
pub fn request_immediate_exit_on_this_thread() {
    RUN_PAGE.with(|page| {
        let run = page.get();
        if !run.is_null() {
            // SAFETY: `Vcpu::run` stores its own mapped run page here on this thread
            // and `Drop` clears it, so the pointer is live; the handler runs on this
            // thread, which is interrupted and not touching the field meanwhile.
            unsafe { (*run).immediate_exit = 1 };
        }
    });
}

/// One virtual CPU. Owned by exactly one thread.
pub struct Vcpu {
    fd: VcpuFd,
    id: u8,
    /// KVM copies the general registers into the run page at every exit.
    synced_regs: bool,
    /// ... and the special registers (`sync_special_registers`).
    synced_sregs: bool,
    /// `set_guest_debug` turned single-stepping or breakpoints on.
    guest_debug: std::sync::atomic::AtomicBool,
}

impl Vcpu {
    pub(crate) fn new(fd: VcpuFd, id: u8) -> Self {
        Vcpu { fd, id, synced_regs: false, synced_sregs: false, guest_debug: Default::default() }
    }

    pub fn id(&self) -> u8 {
        self.id
    }

    /// Runs the guest until the next exit that needs the VMM.
    pub fn run(&mut self) -> Result<VmExit<'_>> {
        // Read after an internal error, when `exit` borrows nothing from the run page.
        let run_page: *mut kvm_run = self.fd.get_kvm_run();
        RUN_PAGE.with(|page| page.set(run_page));
        let exit = match self.fd.run() {
            Ok(exit) => exit,
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                // A kick asked for this exit; the next run enters the guest again.
                // SAFETY: the run page is mapped for the vCPU's lifetime and KVM does
                // not touch it while we are out of KVM_RUN.
                unsafe { (*run_page).immediate_exit = 0 };
                return Ok(VmExit::Interrupted);
            }
            Err(e) => return Err(ioctl_err("KVM_RUN")(e)),
        };
        Ok(match exit {
            VcpuExit::IoIn(port, data) => VmExit::IoIn { port, data },
            VcpuExit::IoOut(port, data) => VmExit::IoOut { port, data },
            VcpuExit::MmioRead(gpa, data) => VmExit::MmioRead { gpa, data },
            VcpuExit::MmioWrite(gpa, data) => VmExit::MmioWrite { gpa, data },
            VcpuExit::X86Rdmsr(m) => VmExit::MsrRead(MsrRead { index: m.index, data: m.data, error: m.error }),
            VcpuExit::X86Wrmsr(m) => VmExit::MsrWrite(MsrWrite { index: m.index, value: m.data }),
            VcpuExit::Hypercall(h) => VmExit::Hypercall { nr: h.nr, args: h.args },
            VcpuExit::Hlt => VmExit::Hlt,
            VcpuExit::Shutdown => VmExit::Shutdown,
            VcpuExit::SystemEvent(kind, _) => VmExit::SystemEvent(match kind {
                kvm_bindings::KVM_SYSTEM_EVENT_SHUTDOWN => SystemEventKind::Shutdown,
                kvm_bindings::KVM_SYSTEM_EVENT_RESET => SystemEventKind::Reset,
                kvm_bindings::KVM_SYSTEM_EVENT_CRASH => SystemEventKind::Crash,
                other => SystemEventKind::Other(other),
            }),
            VcpuExit::FailEntry(reason, cpu) => VmExit::FailEntry { reason, cpu },
            VcpuExit::Intr => VmExit::Interrupted,
            VcpuExit::Debug(arch) => VmExit::Debug { exception: arch.exception, pc: arch.pc, dr6: arch.dr6 },
            // SAFETY: the run page is mapped for the vCPU's lifetime and KVM does not
            // touch it while we are out of KVM_RUN.
            VcpuExit::InternalError => internal_error(unsafe { &*run_page }),
            other => VmExit::Unhandled(format!("{other:?}")),
        })
    }

    /// Finishes a pending `MsrWrite`/`MsrRead` exit after the exit itself was
    /// dropped: with `inject_gp` the guest's `wrmsr`/`rdmsr` raises #GP.
    pub fn complete_msr_exit(&mut self, inject_gp: bool) {
        let run = self.fd.get_kvm_run();
        if run.exit_reason == kvm_bindings::KVM_EXIT_X86_WRMSR || run.exit_reason == kvm_bindings::KVM_EXIT_X86_RDMSR {
            // SAFETY: the exit reason says `msr` is the active union member.
            let msr = unsafe { &mut run.__bindgen_anon_1.msr };
            msr.error = u8::from(inject_gp);
        }
    }

    /// Finishes the exit KVM left half-done (MMIO, PIO, MSR: the KVM API
    /// completes them only on the next `KVM_RUN`) without entering the guest,
    /// so the registers can then be changed: one `KVM_RUN` with
    /// `immediate_exit`, which returns `EINTR` once the completion ran.
    ///
    /// KVM checks `immediate_exit` only after the completion, and a store
    /// wider than 8 bytes exits in pieces: completing one piece hands back
    /// the next as `Some((gpa, data))`; call again until `None`.
    pub fn complete_pending_exit(&mut self) -> Result<Option<(u64, Vec<u8>)>> {
        self.fd.set_kvm_immediate_exit(1);
        let result = self.fd.run().map(|exit| match exit {
            VcpuExit::MmioWrite(gpa, data) => Ok((gpa, data.to_vec())),
            other => Err(format!("{other:?}")),
        });
        self.fd.set_kvm_immediate_exit(0);
        match result {
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => Ok(None),
            Err(e) => Err(ioctl_err("KVM_RUN")(e)),
            Ok(Ok(piece)) => Ok(Some(piece)),
            // No other exit can come back without entering the guest.
            Ok(Err(exit)) => Err(HypervisorError::Ioctl {
                op: "KVM_RUN (immediate_exit)",
                source: std::io::Error::other(format!("returned an exit: {exit}")),
            }),
        }
    }

    /// Whether single guest instructions are watched: guest debugging set by
    /// `set_guest_debug`, or breakpoints the guest armed in its own DR7.
    pub fn instructions_watched(&self) -> Result<bool> {
        if self.guest_debug.load(std::sync::atomic::Ordering::Relaxed) {
            return Ok(true);
        }
        let debug = self.fd.get_debug_regs().map_err(ioctl_err("KVM_GET_DEBUGREGS"))?;
        // DR7 bits 0-7: local and global enables of the four breakpoints.
        Ok(debug.dr7 & 0xff != 0)
    }

    /// Makes the next `run` return `Interrupted` at once; the caller clears it
    /// again after that `run`.
    pub fn set_immediate_exit(&mut self, on: bool) {
        self.fd.set_kvm_immediate_exit(u8::from(on));
    }

    /// Asks KVM to publish the general registers in the run page at every
    /// exit (`KVM_CAP_SYNC_REGS`), so reading RIP on a hot exit costs no ioctl.
    pub fn enable_register_sync(&mut self) {
        self.fd.set_sync_valid_reg(kvm_ioctls::SyncReg::Register);
        self.synced_regs = true;
    }

    /// Also publishes the special registers in the run page at every exit
    /// (`KVM_SYNC_X86_SREGS`), or stops doing so. Worth it only while exits
    /// need the CPL, as introspection events do: KVM then copies the
    /// segments and control registers at every exit.
    pub fn sync_special_registers(&mut self, on: bool) {
        if on == self.synced_sregs {
            return;
        }
        if on {
            self.fd.set_sync_valid_reg(kvm_ioctls::SyncReg::SystemRegister);
        } else {
            self.fd.clear_sync_valid_reg(kvm_ioctls::SyncReg::SystemRegister);
        }
        self.synced_sregs = on;
    }

    /// The guest RIP at the current exit.
    pub fn exit_rip(&self) -> Result<u64> {
        if self.synced_regs {
            return Ok(self.fd.sync_regs().regs.rip);
        }
        self.regs().map(|r| r.rip)
    }

    /// The general registers at the current exit: from the run page when
    /// KVM publishes them there (no ioctl), else `KVM_GET_REGS`.
    pub fn exit_regs(&self) -> Result<Regs> {
        if self.synced_regs {
            return Ok(Regs::from(self.fd.sync_regs().regs));
        }
        self.regs()
    }

    /// The guest's privilege level (CS.DPL) at the current exit: from the
    /// run page when the special registers are synced, else `KVM_GET_SREGS`.
    pub fn exit_cpl(&self) -> Result<u8> {
        if self.synced_sregs {
            return Ok(self.fd.sync_regs().sregs.cs.dpl);
        }
        self.sregs().map(|s| s.cpl())
    }

    pub fn regs(&self) -> Result<Regs> {
        self.fd.get_regs().map(Regs::from).map_err(ioctl_err("KVM_GET_REGS"))
    }

    pub fn set_regs(&self, regs: &Regs) -> Result<()> {
        self.fd.set_regs(&(*regs).into()).map_err(ioctl_err("KVM_SET_REGS"))
    }

    pub fn sregs(&self) -> Result<SpecialRegs> {
        self.fd.get_sregs().map(SpecialRegs::from).map_err(ioctl_err("KVM_GET_SREGS"))
    }

    pub fn set_sregs(&self, sregs: &SpecialRegs) -> Result<()> {
        let mut raw = self.fd.get_sregs().map_err(ioctl_err("KVM_GET_SREGS"))?;
        merge_sregs(&mut raw, sregs);
        self.fd.set_sregs(&raw).map_err(ioctl_err("KVM_SET_SREGS"))
    }

    /// Puts the vCPU back where an application processor starts: waiting for
    /// the INIT and SIPI with which the guest brings a CPU up. A vCPU the
    /// guest ejected and the host adds again starts from there.
    /// Until the INIT arrives, its control registers read as after a reset
    /// (not the long mode it left), so nothing takes it for a running CPU.
    pub fn wait_for_startup(&self) -> Result<()> {
        /// CR0 after reset: CD | NW | ET.
        const CR0_RESET: u64 = 0x6000_0010;
        let mut sregs = self.fd.get_sregs().map_err(ioctl_err("KVM_GET_SREGS"))?;
        (sregs.cr0, sregs.cr4, sregs.efer) = (CR0_RESET, 0, 0);
        // KVM refuses a 64-bit code segment outside long mode.
        (sregs.cs.l, sregs.cs.db) = (0, 0);
        self.fd.set_sregs(&sregs).map_err(ioctl_err("KVM_SET_SREGS"))?;
        let state = kvm_bindings::kvm_mp_state { mp_state: kvm_bindings::KVM_MP_STATE_UNINITIALIZED };
        self.fd.set_mp_state(state).map_err(ioctl_err("KVM_SET_MP_STATE"))
    }

    /// Whether the vCPU has left the wait for INIT and SIPI (`KVM_GET_MP_STATE`).
    pub fn has_started(&self) -> Result<bool> {
        let state = self.fd.get_mp_state().map_err(ioctl_err("KVM_GET_MP_STATE"))?;
        Ok(!matches!(
            state.mp_state,
            kvm_bindings::KVM_MP_STATE_UNINITIALIZED | kvm_bindings::KVM_MP_STATE_INIT_RECEIVED
        ))
    }

    /// Resets the FPU to its power-on state (x87 control word 0x37f, MXCSR 0x1f80).
    pub fn reset_fpu(&self) -> Result<()> {
        let fpu = kvm_bindings::kvm_fpu { fcw: 0x37f, mxcsr: 0x1f80, ..Default::default() };
        self.fd.set_fpu(&fpu).map_err(ioctl_err("KVM_SET_FPU"))
    }

    /// The guest TSC's frequency in kHz (`KVM_GET_TSC_KHZ`).
    pub fn tsc_khz(&self) -> Result<u32> {
        self.fd.get_tsc_khz().map_err(ioctl_err("KVM_GET_TSC_KHZ"))
    }

    pub fn set_cpuid(&self, entries: &[CpuidEntry]) -> Result<()> {
        let cpuid = to_kvm_cpuid(entries).map_err(|_| HypervisorError::Ioctl {
            op: "KVM_SET_CPUID2",
            source: std::io::Error::from_raw_os_error(libc::E2BIG),
        })?;
        self.fd.set_cpuid2(&cpuid).map_err(ioctl_err("KVM_SET_CPUID2"))
    }

    pub fn set_msrs(&self, msrs: &[(u32, u64)]) -> Result<()> {
        let entries: Vec<kvm_msr_entry> =
            msrs.iter().map(|&(index, data)| kvm_msr_entry { index, data, ..Default::default() }).collect();
        let kvm_msrs = Msrs::from_entries(&entries).map_err(|_| HypervisorError::Ioctl {
            op: "KVM_SET_MSRS",
            source: std::io::Error::from_raw_os_error(libc::E2BIG),
        })?;
        let written = self.fd.set_msrs(&kvm_msrs).map_err(ioctl_err("KVM_SET_MSRS"))?;
        if written != entries.len() {
            let index = entries[written].index;
            return Err(HypervisorError::Ioctl {
                op: "KVM_SET_MSRS",
                source: std::io::Error::other(format!("MSR {index:#x} was rejected")),
            });
        }
        Ok(())
    }

    /// Reads one MSR.
    pub fn msr(&self, index: u32) -> Result<u64> {
        let mut msrs = Msrs::from_entries(&[kvm_msr_entry { index, ..Default::default() }]).map_err(|_| {
            HypervisorError::Ioctl { op: "KVM_GET_MSRS", source: std::io::Error::other("bad MSR list") }
        })?;
        let read = self.fd.get_msrs(&mut msrs).map_err(ioctl_err("KVM_GET_MSRS"))?;
        if read != 1 {
            return Err(HypervisorError::Ioctl {
                op: "KVM_GET_MSRS",
                source: std::io::Error::other(format!("MSR {index:#x} is not readable")),
            });
        }
        Ok(msrs.as_slice()[0].data)
    }

    /// Routes LINT0 to ExtINT (the legacy PIC) and LINT1 to NMI, as firmware would.
    pub fn setup_lapic_lints(&self) -> Result<()> {
        let mut lapic = self.fd.get_lapic().map_err(ioctl_err("KVM_GET_LAPIC"))?;
        for (offset, mode) in [(APIC_LVT0, APIC_MODE_EXTINT), (APIC_LVT1, APIC_MODE_NMI)] {
            let mut bytes = [0u8; 4];
            for (i, b) in bytes.iter_mut().enumerate() {
                *b = lapic.regs[offset + i] as u8;
            }
            let value = (u32::from_le_bytes(bytes) & !0x700) | (mode << 8);
            for (i, b) in value.to_le_bytes().iter().enumerate() {
                lapic.regs[offset + i] = *b as libc::c_char;
            }
        }
        self.fd.set_lapic(&lapic).map_err(ioctl_err("KVM_SET_LAPIC"))
    }

    /// Translates a guest virtual address with the vCPU's current page tables.
    pub fn translate_gva(&self, gva: u64) -> Result<Option<u64>> {
        let t = self.fd.translate_gva(gva).map_err(ioctl_err("KVM_TRANSLATE"))?;
        Ok((t.valid != 0).then_some(t.physical_address))
    }

    /// `KVM_SET_GUEST_DEBUG`: single-step the guest and/or stop at up to four
    /// hardware execution breakpoints (guest virtual addresses); each stop is
    /// a `VmExit::Debug`. Nothing set turns guest debugging off.
    pub fn set_guest_debug(&self, single_step: bool, breakpoints: &[u64]) -> Result<()> {
        use kvm_bindings::{KVM_GUESTDBG_ENABLE, KVM_GUESTDBG_SINGLESTEP, KVM_GUESTDBG_USE_HW_BP, kvm_guest_debug};
        if breakpoints.len() > 4 {
            return Err(HypervisorError::Ioctl {
                op: "KVM_SET_GUEST_DEBUG",
                source: std::io::Error::from_raw_os_error(libc::E2BIG),
            });
        }
        let mut debug = kvm_guest_debug::default();
        let on = single_step || !breakpoints.is_empty();
        if on {
            debug.control = KVM_GUESTDBG_ENABLE;
        }
        if single_step {
            debug.control |= KVM_GUESTDBG_SINGLESTEP;
        }
        if !breakpoints.is_empty() {
            debug.control |= KVM_GUESTDBG_USE_HW_BP;
            let mut dr7 = 0u64;
            for (i, &address) in breakpoints.iter().enumerate() {
                debug.arch.debugreg[i] = address;
                // Local enable, condition 00 (execution), length 00.
                dr7 |= 1 << (2 * i);
            }
            debug.arch.debugreg[7] = dr7;
        }
        self.fd.set_guest_debug(&debug).map_err(ioctl_err("KVM_SET_GUEST_DEBUG"))?;
        self.guest_debug.store(on, std::sync::atomic::Ordering::Relaxed);
        Ok(())
    }

    /// Queues a hardware exception for delivery on the next entry.
    pub fn inject_exception(&self, vector: u8, error_code: Option<u32>) -> Result<()> {
        let mut events = self.fd.get_vcpu_events().map_err(ioctl_err("KVM_GET_VCPU_EVENTS"))?;
        events.exception.injected = 1;
        events.exception.nr = vector;
        events.exception.has_error_code = u8::from(error_code.is_some());
        events.exception.error_code = error_code.unwrap_or(0);
        self.fd.set_vcpu_events(&events).map_err(ioctl_err("KVM_SET_VCPU_EVENTS"))
    }
}

impl Drop for Vcpu {
    fn drop(&mut self) {
        let mine: *mut kvm_run = self.fd.get_kvm_run();
        RUN_PAGE.with(|page| {
            if page.get() == mine {
                page.set(std::ptr::null_mut());
            }
        });
    }
}

/// Decodes `KVM_EXIT_INTERNAL_ERROR`, including emulation failures.
fn internal_error(run: &kvm_run) -> VmExit<'static> {
    // SAFETY: exit_reason is KVM_EXIT_INTERNAL_ERROR, so `internal` is the active union member.
    let internal = unsafe { run.__bindgen_anon_1.internal };
    if internal.suberror == KVM_INTERNAL_ERROR_EMULATION {
        // SAFETY: for the emulation suberror KVM fills the `emulation_failure` view of the same union.
        let emu = unsafe { run.__bindgen_anon_1.emulation_failure };
        let has_bytes = u64::from(KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES);
        let insn_bytes = if emu.ndata >= 3 && emu.flags & has_bytes != 0 {
            // SAFETY: the flag says the instruction bytes are valid.
            let bytes = unsafe { emu.__bindgen_anon_1.__bindgen_anon_1 };
            let len = usize::from(bytes.insn_size).min(bytes.insn_bytes.len());
            Some(bytes.insn_bytes[..len].to_vec())
        } else {
            None
        };
        return VmExit::EmulationFailure(EmulationFailure { insn_bytes });
    }
    let n = (internal.ndata as usize).min(internal.data.len());
    VmExit::InternalError { suberror: internal.suberror, data: internal.data[..n].to_vec() }
}
