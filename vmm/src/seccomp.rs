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
//! numbers from `devices::virtio::tap`. `mmap` and `mprotect` are allowed
//! only without `PROT_EXEC`, `socket` only for `AF_INET` datagram sockets
//! (TAP addresses) and Unix sockets (the API).
//!
//! The mode is set once for the process (`set_mode`, from `--seccomp`); until
//! it is set no filter is installed, so library users and in-process tests
//! run unfiltered.

use std::collections::BTreeMap;
use std::sync::OnceLock;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter, SeccompRule,
};
use thiserror::Error;

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

impl std::str::FromStr for SeccompMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "true" | "on" => Ok(SeccompMode::Enforce),
            "false" | "off" => Ok(SeccompMode::Off),
            "log" => Ok(SeccompMode::Log),
            _ => Err(format!("'{s}': expected true, false or log")),
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

type Rules = BTreeMap<i64, Vec<SeccompRule>>;
type Built<T> = Result<T, seccompiler::BackendError>;

/// What every thread needs: memory (the allocator, thread stacks, the host
/// view's `mprotect`), locks, time, logging, signals (the vCPU kick, the
/// host-view fault report) and its own end.
const BASE: &[i64] = &[
    libc::SYS_brk,
    libc::SYS_clock_gettime,
    libc::SYS_clock_nanosleep,
    libc::SYS_close,
    libc::SYS_exit,
    libc::SYS_exit_group,
    libc::SYS_futex,
    libc::SYS_getpid,
    libc::SYS_getrandom,
    libc::SYS_gettid,
    libc::SYS_madvise,
    libc::SYS_munmap,
    libc::SYS_mremap,
    libc::SYS_nanosleep,
    libc::SYS_restart_syscall,
    libc::SYS_rseq,
    libc::SYS_rt_sigaction,
    libc::SYS_rt_sigprocmask,
    libc::SYS_rt_sigreturn,
    libc::SYS_sched_yield,
    libc::SYS_sigaltstack,
    // pthread_kill: the vCPU kick (a heki pause from any thread), abort.
    libc::SYS_tgkill,
    // Log lines, eventfd wake-ups.
    libc::SYS_write,
];

/// Per-kind additions to `BASE`, without argument conditions.
fn plain(kind: ThreadKind) -> &'static [i64] {
    match kind {
        ThreadKind::Vmm => &[
            libc::SYS_accept4,
            libc::SYS_bind,
            // The mode of the sockets it creates (API, introspection agent).
            libc::SYS_chmod,
            libc::SYS_clone,
            libc::SYS_clone3,
            // Probing whether an introspection socket at the path is live.
            libc::SYS_connect,
            libc::SYS_dup,
            libc::SYS_epoll_create1,
            libc::SYS_epoll_ctl,
            libc::SYS_epoll_pwait,
            libc::SYS_epoll_wait,
            libc::SYS_eventfd2,
            libc::SYS_fallocate,
            libc::SYS_fchmod,
            libc::SYS_fchmodat,
            libc::SYS_fdatasync,
            libc::SYS_fstat,
            libc::SYS_fsync,
            libc::SYS_ftruncate,
            libc::SYS_getcwd,
            libc::SYS_getdents64,
            libc::SYS_getsockname,
            libc::SYS_getsockopt,
            libc::SYS_landlock_add_rule,
            libc::SYS_landlock_create_ruleset,
            libc::SYS_landlock_restrict_self,
            libc::SYS_listen,
            libc::SYS_lseek,
            libc::SYS_memfd_create,
            libc::SYS_newfstatat,
            libc::SYS_open,
            libc::SYS_openat,
            libc::SYS_poll,
            libc::SYS_ppoll,
            // Each thread started here installs its own filter.
            libc::SYS_prctl,
            libc::SYS_pread64,
            libc::SYS_preadv,
            libc::SYS_pwrite64,
            libc::SYS_pwritev,
            libc::SYS_read,
            libc::SYS_readlink,
            libc::SYS_readv,
            libc::SYS_recvfrom,
            libc::SYS_recvmsg,
            libc::SYS_sched_getaffinity,
            libc::SYS_seccomp,
            libc::SYS_sendmsg,
            libc::SYS_sendto,
            libc::SYS_set_robust_list,
            // Introspection agent socket: write timeouts (SO_SNDTIMEO, SO_RCVTIMEO).
            libc::SYS_setsockopt,
            libc::SYS_shutdown,
            libc::SYS_socketpair,
            libc::SYS_statx,
            libc::SYS_umask,
            libc::SYS_unlink,
            libc::SYS_unlinkat,
            libc::SYS_writev,
        ],
        // Serial output, irqfd and wake-up eventfds; MSI-X programming and heki
        // calls go through ioctls (below).
        // sendto: a vCPU writes its own introspection events to the agent socket.
        ThreadKind::Vcpu => &[
            libc::SYS_read,
            libc::SYS_writev,
            // The introspection agent's socket: a vCPU sends an event and
            // waits, bounded, for the agent's reply.
            libc::SYS_poll,
            libc::SYS_ppoll,
            libc::SYS_recvfrom,
            libc::SYS_recvmsg,
            libc::SYS_sendmsg,
            libc::SYS_sendto,
            // A failed write to the agent closes its socket, so that
            // introspect-rx sees the end and undoes the agent's tracking.
            libc::SYS_shutdown,
        ],
        // tokio's current-thread runtime over a Unix listener.
        ThreadKind::Api => &[
            libc::SYS_accept4,
            libc::SYS_epoll_ctl,
            libc::SYS_epoll_pwait,
            libc::SYS_epoll_wait,
            libc::SYS_getsockopt,
            libc::SYS_read,
            libc::SYS_readv,
            libc::SYS_recvfrom,
            libc::SYS_recvmsg,
            libc::SYS_sendmsg,
            libc::SYS_sendto,
            libc::SYS_shutdown,
            libc::SYS_writev,
        ],
        // Queue notifications (poll, eventfd reads), the block file, the TAP,
        // the rng source, the console output.
        ThreadKind::DeviceWorker => &[
            libc::SYS_fdatasync,
            libc::SYS_fsync,
            libc::SYS_lseek,
            libc::SYS_poll,
            libc::SYS_ppoll,
            libc::SYS_pread64,
            libc::SYS_preadv,
            libc::SYS_pwrite64,
            libc::SYS_pwritev,
            libc::SYS_read,
            libc::SYS_readv,
            libc::SYS_writev,
        ],
        // Queue notifications, the epoll set of its Unix sockets, non-blocking
        // stream I/O; socket() itself is limited to AF_UNIX below.
        ThreadKind::VsockWorker => &[
            libc::SYS_accept4,
            libc::SYS_connect,
            libc::SYS_epoll_ctl,
            libc::SYS_epoll_pwait,
            libc::SYS_epoll_wait,
            libc::SYS_poll,
            libc::SYS_ppoll,
            libc::SYS_read,
            libc::SYS_recvfrom,
            libc::SYS_sendto,
            libc::SYS_shutdown,
        ],
        ThreadKind::EventMonitor => &[libc::SYS_fdatasync, libc::SYS_fsync, libc::SYS_writev],
        ThreadKind::CrCheck => &[libc::SYS_poll, libc::SYS_ppoll],
        // signal-hook's self-pipe: the handler sends, the thread receives.
        ThreadKind::Signal => {
            &[libc::SYS_poll, libc::SYS_ppoll, libc::SYS_read, libc::SYS_recvfrom, libc::SYS_recvmsg, libc::SYS_sendto]
        }
        ThreadKind::Stdin => &[libc::SYS_read],
        // The accept thread starts the rx and tx threads of each agent, which
        // inherit this filter and install it again (prctl, seccomp).
        ThreadKind::Introspection => &[
            libc::SYS_accept4,
            libc::SYS_clone,
            libc::SYS_clone3,
            // Each agent's inbox wakes its rx thread through an eventfd.
            libc::SYS_eventfd2,
            libc::SYS_getsockopt,
            libc::SYS_poll,
            libc::SYS_ppoll,
            libc::SYS_prctl,
            libc::SYS_read,
            libc::SYS_readv,
            libc::SYS_recvfrom,
            libc::SYS_recvmsg,
            libc::SYS_sched_getaffinity,
            libc::SYS_seccomp,
            libc::SYS_sendmsg,
            libc::SYS_sendto,
            libc::SYS_set_robust_list,
            libc::SYS_setsockopt,
            libc::SYS_shutdown,
            libc::SYS_writev,
        ],
    }
}

/// The ioctl request numbers each kind may issue.
fn ioctls(kind: ThreadKind) -> Vec<u64> {
    match kind {
        ThreadKind::Vmm => {
            let mut all = hypervisor::ioctl_numbers::vmm_thread_ioctls();
            all.extend(crate::devices::virtio::tap::SETUP_IOCTLS);
            // Set-up of the API listener and terminal checks by the logger.
            all.extend([libc::FIONBIO, libc::FIOCLEX, libc::TCGETS, libc::TIOCGWINSZ]);
            // The console's pseudo-terminal: unlock it, learn its number, open its peer, make it raw.
            all.extend([libc::TIOCSPTLCK, libc::TIOCGPTN, libc::TIOCGPTPEER, libc::TCSETS]);
            all
        }
        ThreadKind::Vcpu => hypervisor::ioctl_numbers::vcpu_thread_ioctls(),
        // Tracking changes memslots and the MSR filter, as heki does from the VMM thread.
        ThreadKind::Introspection => hypervisor::ioctl_numbers::vmm_thread_ioctls(),
        ThreadKind::Api => vec![libc::FIONBIO],
        _ => Vec::new(),
    }
}

fn cond(arg: u8, op: SeccompCmpOp, value: u64) -> Built<SeccompCondition> {
    SeccompCondition::new(arg, SeccompCmpArgLen::Dword, op, value)
}

/// The allow-list of `kind`, as seccompiler rules.
pub fn rules(kind: ThreadKind) -> Built<Rules> {
    let mut rules: Rules = BASE.iter().chain(plain(kind)).map(|&nr| (nr, Vec::new())).collect();
    // mmap/mprotect: anything but executable memory.
    let no_exec = || -> Built<Vec<SeccompRule>> {
        Ok(vec![SeccompRule::new(vec![cond(2, SeccompCmpOp::MaskedEq(libc::PROT_EXEC as u64), 0)?])?])
    };
    rules.insert(libc::SYS_mmap, no_exec()?);
    // fcntl: descriptor flags and duplicates (EventFd::try_clone; debug
    // builds check a descriptor is open before closing it), nothing else
    // (no locks, no leases, no pipe resizing, no owner changes).
    let fcntl = [libc::F_GETFD, libc::F_SETFD, libc::F_GETFL, libc::F_SETFL, libc::F_DUPFD_CLOEXEC]
        .into_iter()
        .map(|cmd| SeccompRule::new(vec![cond(1, SeccompCmpOp::Eq, cmd as u64)?]))
        .collect::<Built<Vec<_>>>()?;
    rules.insert(libc::SYS_fcntl, fcntl);
    rules.insert(libc::SYS_mprotect, no_exec()?);
    let numbers = ioctls(kind);
    if !numbers.is_empty() {
        let allowed = numbers
            .into_iter()
            .map(|n| SeccompRule::new(vec![cond(1, SeccompCmpOp::Eq, n)?]))
            .collect::<Built<Vec<_>>>()?;
        rules.insert(libc::SYS_ioctl, allowed);
    }
    if kind == ThreadKind::Vmm {
        let family =
            |f: libc::c_int| -> Built<SeccompRule> { SeccompRule::new(vec![cond(0, SeccompCmpOp::Eq, f as u64)?]) };
        rules.insert(libc::SYS_socket, vec![family(libc::AF_INET)?, family(libc::AF_UNIX)?]);
    }
    if kind == ThreadKind::VsockWorker {
        rules.insert(libc::SYS_socket, vec![SeccompRule::new(vec![cond(0, SeccompCmpOp::Eq, libc::AF_UNIX as u64)?])?]);
    }
    Ok(rules)
}

/// The system call numbers of `kind`'s list (for documentation and tests).
pub fn syscalls(kind: ThreadKind) -> Built<Vec<i64>> {
    Ok(rules(kind)?.into_keys().collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What the child did: exited with a status, or was killed by a signal.
    #[derive(Debug, PartialEq, Eq)]
    enum End {
        Exited(i32),
        Killed(i32),
    }

    /// Forks; the child installs `kind`'s enforcing filter, runs `call` and
    /// exits 0. The filter is built before the fork: the child only makes
    /// system calls.
    fn in_filtered_child(kind: ThreadKind, call: impl Fn()) -> End {
        let program = filter(kind, SeccompMode::Enforce).expect("filter builds").expect("enforce has a filter");
        // SAFETY: the child runs only system calls (prctl, seccomp, the call
        // under test) and _exit, all async-signal-safe.
        let child = unsafe { libc::fork() };
        assert!(child >= 0, "fork: {}", std::io::Error::last_os_error());
        if child == 0 {
            let code = if seccompiler::apply_filter(&program).is_ok() {
                call();
                0
            } else {
                99
            };
            // SAFETY: _exit ends the child without running the parent's destructors.
            unsafe { libc::_exit(code) };
        }
        let mut status = 0;
        // SAFETY: waits for our own child; `status` is a valid out-pointer.
        assert_eq!(unsafe { libc::waitpid(child, &mut status, 0) }, child);
        if libc::WIFSIGNALED(status) {
            End::Killed(libc::WTERMSIG(status))
        } else {
            End::Exited(libc::WEXITSTATUS(status))
        }
    }

    fn open_passwd() {
        // SAFETY: a NUL-terminated path; the result is only compared.
        let fd = unsafe { libc::open(c"/etc/passwd".as_ptr(), libc::O_RDONLY) };
        if fd >= 0 {
            // SAFETY: our own descriptor.
            unsafe { libc::close(fd) };
        }
    }

    fn ioctl(request: u64) {
        // SAFETY: an ioctl on an invalid descriptor touches no memory; it fails with EBADF if allowed.
        unsafe { libc::ioctl(-1, request as libc::c_ulong, 0) };
    }

    fn inet_socket() {
        // SAFETY: socket() has no memory preconditions; a descriptor would be left to the child's exit.
        unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0) };
    }

    fn exec_true() {
        let argv = [c"true".as_ptr(), std::ptr::null()];
        // SAFETY: NUL-terminated path and a NULL-terminated argv; on success the child becomes `true` (status 0).
        unsafe { libc::execv(c"/bin/true".as_ptr(), argv.as_ptr()) };
    }

    fn executable_mapping() {
        // SAFETY: an anonymous mapping, unmapped if it is ever made.
        unsafe {
            let p = libc::mmap(
                std::ptr::null_mut(),
                4096,
                libc::PROT_READ | libc::PROT_EXEC,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            );
            if p != libc::MAP_FAILED {
                libc::munmap(p, 4096);
            }
        }
    }

    fn harmless() {
        // SAFETY: getpid and a write of nothing to an invalid fd have no memory effects.
        unsafe {
            libc::getpid();
            libc::write(-1, std::ptr::null(), 0);
        }
    }

    const KILLED: End = End::Killed(libc::SIGSYS);

    #[test]
    fn every_kind_allows_its_ordinary_calls() {
        for kind in ThreadKind::ALL {
            assert_eq!(in_filtered_child(kind, harmless), End::Exited(0), "{kind:?}");
        }
    }

    #[test]
    fn no_thread_may_execute_a_program_or_map_executable_memory() {
        for kind in ThreadKind::ALL {
            assert_eq!(in_filtered_child(kind, exec_true), KILLED, "{kind:?}: execve");
            assert_eq!(in_filtered_child(kind, executable_mapping), KILLED, "{kind:?}: PROT_EXEC mmap");
        }
    }

    #[test]
    fn only_the_vmm_thread_opens_files() {
        assert_eq!(in_filtered_child(ThreadKind::Vmm, open_passwd), End::Exited(0));
        for kind in ThreadKind::ALL.into_iter().filter(|k| *k != ThreadKind::Vmm) {
            assert_eq!(in_filtered_child(kind, open_passwd), KILLED, "{kind:?}: open");
        }
    }

    #[test]
    fn ioctls_are_allowed_by_request_number() {
        use hypervisor::ioctl_numbers::{KVM_CREATE_VM, KVM_RUN};
        let (run, create_vm) = (KVM_RUN(), KVM_CREATE_VM());
        // A vCPU runs its vCPU but cannot create a VM; the VMM thread can do both.
        assert_eq!(in_filtered_child(ThreadKind::Vcpu, || ioctl(run)), End::Exited(0));
        assert_eq!(in_filtered_child(ThreadKind::Vcpu, || ioctl(create_vm)), KILLED);
        assert_eq!(in_filtered_child(ThreadKind::Vmm, || ioctl(create_vm)), End::Exited(0));
        // Nobody else talks to KVM.
        for kind in [ThreadKind::Api, ThreadKind::DeviceWorker, ThreadKind::EventMonitor, ThreadKind::CrCheck] {
            assert_eq!(in_filtered_child(kind, || ioctl(run)), KILLED, "{kind:?}: KVM_RUN");
        }
        // An ioctl number nobody uses (TIOCSTI: push input into a terminal).
        assert_eq!(in_filtered_child(ThreadKind::Vmm, || ioctl(libc::TIOCSTI)), KILLED);
    }

    #[test]
    fn sockets_are_limited_to_what_each_thread_needs() {
        // The VMM thread configures TAPs through an AF_INET socket; a device worker makes none.
        assert_eq!(in_filtered_child(ThreadKind::Vmm, inet_socket), End::Exited(0));
        assert_eq!(in_filtered_child(ThreadKind::DeviceWorker, inet_socket), KILLED);
        // The vsock worker connects to Unix sockets only.
        assert_eq!(in_filtered_child(ThreadKind::VsockWorker, inet_socket), KILLED);
        // SAFETY: as inet_socket.
        let unix_socket = || unsafe {
            libc::socket(libc::AF_UNIX, libc::SOCK_STREAM, 0);
        };
        assert_eq!(in_filtered_child(ThreadKind::VsockWorker, unix_socket), End::Exited(0));
        assert_eq!(in_filtered_child(ThreadKind::DeviceWorker, unix_socket), KILLED);
        assert_eq!(in_filtered_child(ThreadKind::Vcpu, inet_socket), KILLED);
        // SAFETY: as inet_socket.
        let netlink = || unsafe {
            libc::socket(libc::AF_NETLINK, libc::SOCK_RAW, 0);
        };
        assert_eq!(in_filtered_child(ThreadKind::Vmm, netlink), KILLED);
    }

    #[test]
    fn log_mode_builds_a_filter_and_off_builds_none() {
        for kind in ThreadKind::ALL {
            assert!(filter(kind, SeccompMode::Log).expect("builds").is_some());
            assert!(filter(kind, SeccompMode::Off).expect("builds").is_none());
        }
        assert_eq!("log".parse(), Ok(SeccompMode::Log));
        assert_eq!("true".parse(), Ok(SeccompMode::Enforce));
        assert_eq!("false".parse(), Ok(SeccompMode::Off));
        assert!("maybe".parse::<SeccompMode>().is_err());
    }
}
