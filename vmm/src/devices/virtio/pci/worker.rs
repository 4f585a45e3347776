//! A device worker thread: it waits for the notifications of the queues it
//! serves (and for a host fd's readiness, for a device that has one), and
//! drains each notified queue through the data path, never while the VM is
//! paused. A device whose queues have handlers of their own gets one worker
//! per such queue, so a slow disk request on one queue never holds another.

use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::thread::JoinHandle;

use vmm_sys_util::eventfd::EventFd;

use super::data_path::DataPath;
use crate::devices::gate::DeviceGate;

/// What one worker thread serves.
pub struct WorkerPlan {
    pub name: String,
    /// (queue index, its notify eventfd).
    pub queues: Vec<(usize, EventFd)>,
    /// The device's host fd and the queue it feeds.
    pub extra: Option<(libc::c_int, usize)>,
    pub kind: crate::seccomp::ThreadKind,
}

pub fn spawn(
    plan: WorkerPlan,
    data: Arc<DataPath>,
    stop: EventFd,
    gate: Arc<DeviceGate>,
) -> std::io::Result<JoinHandle<()>> {
    let WorkerPlan { name, queues, extra, kind } = plan;
    std::thread::Builder::new().name(name).spawn(move || {
        crate::seccomp::apply_or_exit(kind);
        serve(&queues, extra, &data, &stop, &gate);
    })
}

fn serve(
    queues: &[(usize, EventFd)],
    extra: Option<(libc::c_int, usize)>,
    data: &DataPath,
    stop: &EventFd,
    gate: &DeviceGate,
) {
    let mut fds: Vec<libc::pollfd> = queues
        .iter()
        .map(|(_, fd)| fd.as_raw_fd())
        .chain(std::iter::once(stop.as_raw_fd()))
        .chain(extra.map(|(fd, _)| fd))
        .map(|fd| libc::pollfd { fd, events: libc::POLLIN, revents: 0 })
        .collect();
    let stop_index = queues.len();
    let extra_index = queues.len().saturating_add(1);
    let mut extra_ended = false;
    // Drains a queue, across a pause if one cuts in; false at teardown.
    let drain = |index: usize| loop {
        let Some(_active) = gate.begin() else { return false };
        if data.process_queue(index, gate) {
            return true;
        }
    };
    loop {
        // SAFETY: `fds` is a valid array of pollfd for the duration of the call.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, -1) };
        if n < 0 {
            continue;
        }
        if fds[stop_index].revents != 0 {
            return;
        }
        for (slot, (index, fd)) in queues.iter().enumerate() {
            if fds[slot].revents != 0 {
                let _ = fd.read();
                if !drain(*index) {
                    return;
                }
            }
        }
        let Some((fd, queue)) = extra else { continue };
        if fds[extra_index].revents != 0 {
            if !drain(queue) {
                return;
            }
            if data.extra_fd().is_none() {
                // The input ended: a hung-up descriptor would wake poll forever.
                extra_ended = true;
                fds[extra_index].fd = -1;
            } else if !data.queue_has_room(queue) {
                // Data the guest has no buffers for yet: wait for its next
                // notify (a negative fd is ignored by poll, hang-ups included).
                fds[extra_index].fd = -1;
            } else {
                fds[extra_index].fd = fd;
            }
        }
        if !extra_ended && fds[..stop_index].iter().any(|f| f.revents != 0) {
            fds[extra_index].fd = fd;
        }
    }
}
