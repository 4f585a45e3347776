//! seccomp filters, one allow-list per kind of thread.
//!
//! Every thread the VMM starts installs the filter of its kind as its first
//! act (`apply_or_exit`). Filters stack: a thread started by the VMM thread
//! (vCPUs, device workers, the CR checker) runs under the VMM thread's filter
//! and its own, so a system call must be in both lists. The VMM thread's list
//! is therefore the union of what it and the threads it starts need; each of
//! those narrows it.
//!
//! `ioctl` is allowed by request number only: KVM's numbers come from
//! `hypervisor::ioctl_numbers` (the one crate that talks to KVM), TAP set-up
//! numbers from `host_ioctls`. `mmap` and `mprotect` are allowed
//! only without `PROT_EXEC`, `socket` only for `AF_INET` datagram sockets
//! (TAP addresses) and Unix sockets (the API).
//!
//! The mode is set once for the process (`set_mode`, from `--seccomp`); until
//! it is set no filter is installed, so library users and in-process tests
//! run unfiltered.

use std::sync::OnceLock;

use seccompiler::{BpfProgram, SeccompAction, SeccompFilter};
use thiserror::Error;

mod allow_lists;

pub use allow_lists::{rules, syscalls};

/// What `--seccomp` asks for (Cloud Hypervisor's spelling: true, false, log).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SeccompMode {
    /// No filters.
    Off,
    /// A system call outside the thread's list kills the process (SIGSYS).
    Enforce,
    /// A system call outside the list is allowed and logged by the kernel
    /// (`audit: type=1326 ... comm="vcpu0" ... syscall=N` in dmesg).
    Log,
}

/// A `--seccomp` value that is none of the modes.
#[derive(Debug, Error, PartialEq, Eq)]
#[error("'{0}': expected true, false or log")]
pub struct UnknownSeccompMode(pub String);

impl std::str::FromStr for SeccompMode {
    type Err = UnknownSeccompMode;
    fn from_str(s: &str) -> Result<Self, UnknownSeccompMode> {
        match s {
            "true" | "on" => Ok(SeccompMode::Enforce),
            "false" | "off" => Ok(SeccompMode::Off),
            "log" => Ok(SeccompMode::Log),
            _ => Err(UnknownSeccompMode(s.to_string())),
        }
    }
}

/// The kinds of thread, each with its own allow-list.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ThreadKind {
    /// The main thread: owns the VM, builds it at boot and reboot, serves API requests.
    Vmm,
    /// `vcpuN`: runs the guest, handles its exits and heki calls.
    Vcpu,
    /// `http-api`: the hyper server.
    Api,
    /// `_rng`, `_disk0`, ...: one virtio device's queues.
    DeviceWorker,
    /// `_vsock`: a device worker that also serves the hybrid vsock's Unix
    /// sockets (accepts host clients, connects to `<socket>_<port>`).
    VsockWorker,
    /// `event-monitor`: writes the event stream.
    EventMonitor,
    /// `heki-cr-check`: kicks vCPUs.
    CrCheck,
    /// `signal-handler`: turns SIGTERM/SIGINT into a shutdown.
    Signal,
    /// `stdin`: forwards input to the serial port.
    Stdin,
    /// `introspect-accept`, `-rx`, `-tx`: the agent's socket, its commands
    /// (memslot and MSR-filter changes for tracking) and its events.
    Introspection,
}

impl ThreadKind {
    pub const ALL: [ThreadKind; 10] = [
        ThreadKind::Vmm,
        ThreadKind::Vcpu,
        ThreadKind::Api,
        ThreadKind::DeviceWorker,
        ThreadKind::VsockWorker,
        ThreadKind::EventMonitor,
        ThreadKind::CrCheck,
        ThreadKind::Signal,
        ThreadKind::Stdin,
        ThreadKind::Introspection,
    ];
}

#[derive(Debug, Error)]
pub enum SeccompError {
    #[error("cannot build the seccomp filter for the {0:?} thread")]
    Build(ThreadKind, #[source] seccompiler::BackendError),
    #[error("cannot compile the seccomp filter for the {0:?} thread")]
    Compile(ThreadKind, #[source] seccompiler::BackendError),
    #[error("cannot install the seccomp filter of the {0:?} thread")]
    Apply(ThreadKind, #[source] seccompiler::Error),
}

static MODE: OnceLock<SeccompMode> = OnceLock::new();

/// Sets the process's mode; the first call wins.
pub fn set_mode(mode: SeccompMode) {
    let _ = MODE.set(mode);
}

/// The process's mode (`Off` until `set_mode`).
pub fn mode() -> SeccompMode {
    MODE.get().copied().unwrap_or(SeccompMode::Off)
}

/// Call first thing in `main`, before any thread starts: keeps the C
/// library from making system calls the filters refuse. glibc gives threads
/// their own malloc arenas, and the first time it shrinks one it reads
/// `/proc/sys/vm/overcommit_memory` from whichever thread freed the memory;
/// only the VMM thread may open files. One arena (small allocations still
/// go through each thread's lock-free cache) means no such read.
pub fn prepare_process() {
    // SAFETY: mallopt only sets an allocator parameter; no thread is running yet.
    unsafe { libc::mallopt(libc::M_ARENA_MAX, 1) };
}

/// Installs the filter of `kind` on the calling thread, per the process's mode.
pub fn apply(kind: ThreadKind) -> Result<(), SeccompError> {
    match filter(kind, mode())? {
        Some(program) => seccompiler::apply_filter(&program).map_err(|e| SeccompError::Apply(kind, e)),
        None => Ok(()),
    }
}

/// `apply` for a thread that must not run unconfined: on failure the process exits.
pub fn apply_or_exit(kind: ThreadKind) {
    if let Err(e) = apply(kind) {
        log::error!("{}", crate::error_chain(&e));
        eprintln!("hekivisor: {}", crate::error_chain(&e));
        std::process::exit(1);
    }
}

/// The BPF program for `kind` under `mode` (`None` for `Off`).
pub fn filter(kind: ThreadKind, mode: SeccompMode) -> Result<Option<BpfProgram>, SeccompError> {
    let mismatch = match mode {
        SeccompMode::Off => return Ok(None),
        SeccompMode::Enforce => SeccompAction::KillProcess,
        SeccompMode::Log => SeccompAction::Log,
    };
    let arch = seccompiler::TargetArch::x86_64;
    let filter = SeccompFilter::new(
        rules(kind).map_err(|e| SeccompError::Build(kind, e))?,
        mismatch,
        SeccompAction::Allow,
        arch,
    )
    .map_err(|e| SeccompError::Build(kind, e))?;
    let program: BpfProgram = filter.try_into().map_err(|e| SeccompError::Compile(kind, e))?;
    Ok(Some(program))
}

#[cfg(test)]
mod tests;
