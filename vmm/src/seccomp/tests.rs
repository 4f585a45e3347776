//! The filters, tried in forked children: each kind may make its ordinary
//! calls, and what it must not do kills the child.

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
    if libc::WIFSIGNALED(status) { End::Killed(libc::WTERMSIG(status)) } else { End::Exited(libc::WEXITSTATUS(status)) }
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
