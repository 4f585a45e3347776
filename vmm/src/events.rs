//! VMM-side helpers for the event monitor.

use std::fs::File;
use std::os::fd::FromRawFd;
use std::time::Duration;

use crate::config::EventMonitorSpec;

/// Emits an event with string properties.
pub fn emit(source: &str, event: &str, properties: &[(&str, String)]) {
    log::debug!("event {source}/{event} {properties:?}");
    event_monitor::emit_strings(source, event, properties);
}

/// Blocks until queued events are written (bounded wait).
pub fn flush() {
    event_monitor::flush(Duration::from_secs(2));
}

/// Opens the event destination and starts the monitor.
pub fn start_event_monitor(spec: &EventMonitorSpec) -> std::io::Result<()> {
    let file = match spec {
        EventMonitorSpec::Path(path) => File::create(path)?,
        EventMonitorSpec::Fd(fd) => {
            // Refuse fds that are not open rather than adopting a number we do not own.
            // SAFETY: fcntl(F_GETFD) only queries the descriptor.
            if unsafe { libc::fcntl(*fd, libc::F_GETFD) } < 0 {
                return Err(std::io::Error::last_os_error());
            }
            // SAFETY: the fd is open and was handed to us by the parent for events.
            unsafe { File::from_raw_fd(*fd) }
        }
    };
    event_monitor::set_monitor_with_thread_start(Box::new(file), || {
        crate::seccomp::apply_or_exit(crate::seccomp::ThreadKind::EventMonitor)
    });
    Ok(())
}
