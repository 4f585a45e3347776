//! Why `KVM_RUN` returned, in our own terms.

/// A vCPU exit. Data slices point into the vCPU's shared run page: for
/// reads, what the handler writes there is what the guest receives.
#[derive(Debug)]
pub enum VmExit<'a> {
    IoIn {
        port: u16,
        data: &'a mut [u8],
    },
    IoOut {
        port: u16,
        data: &'a [u8],
    },
    MmioRead {
        gpa: u64,
        data: &'a mut [u8],
    },
    MmioWrite {
        gpa: u64,
        data: &'a [u8],
    },
    /// A `rdmsr` forwarded to user space (filtered or unknown MSR).
    MsrRead(MsrRead<'a>),
    /// A `wrmsr` forwarded to user space (filtered or unknown MSR).
    MsrWrite(MsrWrite),
    /// `KVM_EXIT_HYPERCALL`: only for hypercalls KVM forwards (not on every host).
    Hypercall {
        nr: u64,
        args: [u64; 6],
    },
    Hlt,
    /// Triple fault: the x86 way of resetting.
    Shutdown,
    SystemEvent(SystemEventKind),
    /// The in-kernel emulator could not handle an instruction.
    EmulationFailure(EmulationFailure),
    /// Any other `KVM_EXIT_INTERNAL_ERROR`.
    InternalError {
        suberror: u32,
        data: Vec<u64>,
    },
    /// The hardware refused to enter the guest.
    FailEntry {
        reason: u64,
        cpu: u32,
    },
    /// `KVM_EXIT_DEBUG`: a single step (`exception` 1, DR6.BS) or a hardware
    /// breakpoint (`exception` 1, DR6.B0-B3) set with `Vcpu::set_guest_debug`.
    Debug {
        exception: u32,
        pc: u64,
        dr6: u64,
    },
    /// `KVM_RUN` was interrupted by a signal (a kick) or `immediate_exit`.
    Interrupted,
    /// An exit reason this VMM does not handle.
    Unhandled(String),
}

#[derive(Debug)]
pub struct MsrRead<'a> {
    pub index: u32,
    pub(crate) data: &'a mut u64,
    pub(crate) error: &'a mut u8,
}

impl MsrRead<'_> {
    /// Completes the `rdmsr` with this value.
    pub fn complete(&mut self, value: u64) {
        *self.data = value;
        *self.error = 0;
    }

    /// Makes the `rdmsr` raise #GP in the guest.
    pub fn inject_gp(&mut self) {
        *self.error = 1;
    }
}

/// A filtered `wrmsr`. KVM does not perform it: user space writes the MSR
/// (or not) and completes the exit with `Vcpu::complete_msr_exit`.
#[derive(Debug)]
pub struct MsrWrite {
    pub index: u32,
    pub value: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SystemEventKind {
    Shutdown,
    Reset,
    Crash,
    Other(u32),
}

/// An instruction the in-kernel emulator gave up on.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EmulationFailure {
    /// The instruction bytes, when KVM reports them.
    pub insn_bytes: Option<Vec<u8>>,
}
