//! The signal used to kick a vCPU thread out of `KVM_RUN`.

use std::sync::Once;

use vmm_sys_util::signal::{SIGRTMIN, register_signal_handler};

/// The kick is the first real-time signal.
pub fn kick_signal() -> libc::c_int {
    SIGRTMIN()
}

extern "C" fn on_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // In KVM_RUN the signal alone makes it return EINTR; just before it, the
    // run page's immediate_exit makes the next KVM_RUN return at once.
    hypervisor::request_immediate_exit_on_this_thread();
}

/// Installs the no-op handler once per process.
pub fn install_kick_handler() -> std::io::Result<()> {
    static INSTALL: Once = Once::new();
    let mut result = Ok(());
    INSTALL.call_once(|| {
        result =
            register_signal_handler(kick_signal(), on_kick).map_err(|e| std::io::Error::from_raw_os_error(e.errno()));
    });
    result
}
