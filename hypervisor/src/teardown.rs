//! Letting the kernel tear a VM down after the process has gone.
//!
//! The thread that drops the last reference to a KVM VM runs its teardown:
//! each in-kernel device (PIC, IOAPIC, PIT) leaves the VM's I/O buses and
//! waits for an SRCU grace period, which the kernel spaces a jiffy apart:
//! 8-16 ms here, however small the guest. When the VMM is about to exit, that
//! wait sits between the guest's power-off and the exit status, and nothing
//! needs it: the guest's memory goes with the process either way.
//!
//! So at exit the VM file is put, together with one end of a fresh socket
//! pair, into that end's own receive queue: a cycle of in-flight files that
//! only the kernel's garbage collector for Unix sockets can free. Closing
//! the other end schedules the collector, which runs in a kernel worker
//! (`unix_gc` queues `unix_gc_work` in 6.12's source; this host runs 6.18);
//! the VM file it drops is released by another worker (`delayed_fput`), and
//! KVM's teardown runs there. The process holds no reference any more, and
//! its exit does not wait. No process is left behind; the VM's kernel
//! objects are gone a few milliseconds later. On a kernel whose collector ran
//! in the closing task, the cost would be what a plain close costs.

use std::cell::Cell;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixDatagram;

use vmm_sys_util::sock_ctrl_msg::ScmSocket;

thread_local! {
    static IN_BACKGROUND: Cell<bool> = const { Cell::new(false) };
}

/// From now on, a [`crate::Vm`] whose last reference this thread drops is
/// torn down by the kernel in the background instead of in the drop. For the
/// VMM's final shutdown only: a VM destroyed outside the process that made it
/// leaves KVM's private memslot mappings in that process, which is harmless
/// only because the process is exiting.
pub fn tear_down_vms_in_background_on_this_thread() {
    IN_BACKGROUND.with(|b| b.set(true));
}

pub(crate) fn in_background_on_this_thread() -> bool {
    IN_BACKGROUND.with(Cell::get)
}

/// Gives the kernel a reference to `fd`'s file that only its Unix-socket
/// garbage collector will drop; the caller still closes `fd` itself.
pub(crate) fn hand_to_collector(fd: RawFd) -> std::io::Result<()> {
    let (sender, carrier) = UnixDatagram::pair()?;
    sender
        .send_with_fds(&[[0u8].as_slice()], &[carrier.as_raw_fd(), fd])
        .map_err(|e| std::io::Error::from_raw_os_error(e.errno()))?;
    // Both ends close here; `carrier` lives on only in its own queue.
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;
    use std::os::fd::{FromRawFd, OwnedFd};
    use std::time::{Duration, Instant};

    fn pipe() -> (std::fs::File, OwnedFd) {
        let mut fds = [0; 2];
        // SAFETY: `fds` has room for the two descriptors pipe2 writes.
        assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_NONBLOCK | libc::O_CLOEXEC) }, 0);
        // SAFETY: pipe2 succeeded, so both descriptors are fresh and owned by nobody else.
        unsafe { (std::fs::File::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) }
    }

    /// Reads until EOF (every write end released) or the deadline.
    fn sees_eof_within(mut reader: &std::fs::File, limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        let mut buf = [0u8; 8];
        while Instant::now() < deadline {
            match reader.read(&mut buf) {
                Ok(0) => return true,
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => std::thread::sleep(Duration::from_millis(2)),
                Err(e) => panic!("read: {e}"),
            }
        }
        false
    }

    #[test]
    fn a_file_handed_to_the_collector_is_released_without_the_process() {
        let (reader, writer) = pipe();
        hand_to_collector(writer.as_raw_fd()).expect("hand over");
        drop(writer);
        assert!(sees_eof_within(&reader, Duration::from_secs(5)), "the kernel never released the write end");
    }

    #[test]
    fn a_file_still_reachable_in_a_live_socket_is_not_released() {
        // The control: the same message to a receiver that stays open keeps the file.
        let (reader, writer) = pipe();
        let (sender, receiver) = UnixDatagram::pair().expect("pair");
        sender.send_with_fds(&[[0u8].as_slice()], &[writer.as_raw_fd()]).expect("send");
        drop(writer);
        assert!(!sees_eof_within(&reader, Duration::from_millis(200)));
        drop(receiver);
        assert!(sees_eof_within(&reader, Duration::from_secs(5)));
    }

    #[test]
    fn only_the_thread_that_asked_defers() {
        std::thread::spawn(tear_down_vms_in_background_on_this_thread).join().expect("thread");
        assert!(!in_background_on_this_thread());
    }
}
