//! The allow-lists themselves: system calls per kind of thread, with
//! argument conditions (no executable memory, `fcntl` and `socket` limited,
//! `ioctl` by request number).

use std::collections::BTreeMap;

use seccompiler::{SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompRule};

use super::ThreadKind;
use crate::host_ioctls::TAP_SETUP_IOCTLS;

pub(super) type Rules = BTreeMap<i64, Vec<SeccompRule>>;
pub(super) type Built<T> = Result<T, seccompiler::BackendError>;

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
            all.extend(TAP_SETUP_IOCTLS);
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
