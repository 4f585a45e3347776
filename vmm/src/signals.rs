//! SIGTERM and SIGINT: the first one shuts the VM down cleanly, a second one
//! forces the exit.
//!
//! `block_termination_signals` runs first thing in `main`, before any thread
//! exists, so every thread inherits the blocked mask; only the
//! `signal-handler` thread unblocks them, so the kernel delivers them there
//! and nowhere else (a vCPU in `KVM_RUN` or a device worker is never
//! interrupted by them). The handler (signal-hook's) wakes that thread, which
//! wakes the VMM thread's event loop through an eventfd.

use std::sync::atomic::{AtomicI32, Ordering};

use signal_hook::consts::{SIGINT, SIGTERM};
use signal_hook::iterator::Signals;
use vmm_sys_util::eventfd::EventFd;

/// The signals that shut the VMM down.
pub const TERMINATION_SIGNALS: [libc::c_int; 2] = [SIGTERM, SIGINT];

/// The first termination signal received (0: none yet).
static RECEIVED: AtomicI32 = AtomicI32::new(0);

fn sigset(signals: &[libc::c_int]) -> libc::sigset_t {
    // SAFETY: sigemptyset initialises the set before sigaddset reads it;
    // both only write to the local set.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for &signal in signals {
            libc::sigaddset(&mut set, signal);
        }
        set
    }
}

fn set_mask(how: libc::c_int) -> std::io::Result<()> {
    let set = sigset(&TERMINATION_SIGNALS);
    // SAFETY: `set` is an initialised sigset; the old mask is not asked for.
    let rc = unsafe { libc::pthread_sigmask(how, &set, std::ptr::null_mut()) };
    if rc == 0 { Ok(()) } else { Err(std::io::Error::from_raw_os_error(rc)) }
}

/// Blocks SIGTERM and SIGINT on the calling thread and so on every thread it
/// starts afterwards. Call it in `main` before starting any thread.
pub fn block_termination_signals() -> std::io::Result<()> {
    set_mask(libc::SIG_BLOCK)
}

/// The first termination signal received, if any.
pub fn received() -> Option<libc::c_int> {
    match RECEIVED.load(Ordering::Acquire) {
        0 => None,
        signal => Some(signal),
    }
}

/// The name of a termination signal, for logs and events.
pub fn name(signal: libc::c_int) -> &'static str {
    match signal {
        SIGTERM => "SIGTERM",
        SIGINT => "SIGINT",
        _ => "signal",
    }
}

/// Starts the `signal-handler` thread: the first signal writes `wake`, a
/// second one ends the process at once with status 128 + the signal.
pub(crate) fn start_signal_thread(wake: EventFd) -> std::io::Result<()> {
    // Registered here so a signal blocked since `main` started is not lost:
    // it stays pending until the thread unblocks it.
    let mut signals = Signals::new(TERMINATION_SIGNALS)?;
    std::thread::Builder::new().name("signal-handler".into()).spawn(move || {
        crate::seccomp::apply_or_exit(crate::seccomp::ThreadKind::Signal);
        if let Err(e) = set_mask(libc::SIG_UNBLOCK) {
            log::error!("cannot unblock SIGTERM and SIGINT; they will be ignored: {e}");
            return;
        }
        for signal in signals.forever() {
            if RECEIVED.compare_exchange(0, signal, Ordering::AcqRel, Ordering::Acquire).is_ok() {
                log::warn!("{}: shutting the VM down (a second signal forces the exit)", name(signal));
                let _ = wake.write(1);
            } else {
                eprintln!("hekivisor: {} again: exiting at once", name(signal));
                std::process::exit(128 + signal);
            }
        }
    })?;
    Ok(())
}
