//! What the device's workers own once the driver started it: the queues as
//! the driver set them up (handed over at DRIVER_OK, taken back at reset),
//! the device, and the MSI-X vectors they raise. The vCPU-side registers
//! (`common_config.rs`) never hold a lock that a worker holds across disk
//! or network I/O: each queue has its own lock, held by its worker for a
//! pass and taken by a vCPU only to start or reset the device.
//!
//! Lock order: a queue's slot, then the device; the MSI-X table is taken
//! last and alone. A reset takes the slots one by one before the device.
// Guest-supplied numbers: no unchecked arithmetic here.
#![deny(clippy::arithmetic_side_effects)]

use std::sync::atomic::{AtomicBool, AtomicU16, Ordering};
use std::sync::{Mutex, MutexGuard};

use virtio_queue::{DescriptorChain, Queue, QueueT};
use vmm_sys_util::eventfd::EventFd;

use super::msix::{Msix, NO_VECTOR};
use crate::devices::gate::DeviceGate;
use crate::devices::virtio::{DeviceMemory, QueueHandler, QueueHandoff, VirtioDevice};
use crate::guest_access::CheckedMemory;

/// One queue: its running state while the device is started, and the
/// handler that serves it on a worker of its own, if the device gave one.
struct QueueSlot {
    active: Option<Queue>,
    handler: Option<Box<dyn QueueHandler>>,
}

pub struct DataPath {
    device: Mutex<Box<dyn VirtioDevice>>,
    slots: Vec<Mutex<QueueSlot>>,
    /// Each queue's MSI-X vector; the driver may change it at any time.
    queue_vectors: Vec<AtomicU16>,
    pub msix: Msix,
    pub memory: DeviceMemory,
    /// Set by a worker that cannot write a used ring, or by a failed start;
    /// reads back as NEEDS_RESET in device_status.
    needs_reset: AtomicBool,
    /// device_status has DRIVER_OK: a driver that clears it (against the
    /// spec, without a reset) stops the queues, which keep their place.
    driver_ok: AtomicBool,
    /// A driver reset is waiting for the workers: they stop after the chain in hand.
    resetting: AtomicBool,
    /// The queues' notify eventfds, for a device whose backend takes them (`external`).
    kicks: Vec<EventFd>,
}

/// Who serves a queue's chains during a pass.
enum Server<'a> {
    Own(&'a mut dyn QueueHandler),
    Device(MutexGuard<'a, Box<dyn VirtioDevice>>, usize),
}

impl Server<'_> {
    fn ready(&mut self) -> bool {
        match self {
            Server::Own(_) => true,
            Server::Device(device, index) => device.ready(*index),
        }
    }

    fn process(&mut self, chain: DescriptorChain<&CheckedMemory>, dma: &DeviceMemory) -> u32 {
        match self {
            Server::Own(handler) => handler.process(chain, dma),
            Server::Device(device, index) => device.process(*index, chain, dma),
        }
    }
}

impl DataPath {
    pub fn new(mut device: Box<dyn VirtioDevice>, memory: DeviceMemory, msix: Msix, kicks: Vec<EventFd>) -> Self {
        let count = device.num_queues();
        let slots =
            (0..count).map(|i| Mutex::new(QueueSlot { active: None, handler: device.queue_handler(i) })).collect();
        let queue_vectors = (0..count).map(|_| AtomicU16::new(NO_VECTOR)).collect();
        DataPath {
            device: Mutex::new(device),
            slots,
            queue_vectors,
            msix,
            memory,
            needs_reset: AtomicBool::new(false),
            driver_ok: AtomicBool::new(false),
            resetting: AtomicBool::new(false),
            kicks,
        }
    }

    pub fn device(&self) -> MutexGuard<'_, Box<dyn VirtioDevice>> {
        lock(&self.device)
    }

    fn slot(&self, index: usize) -> Option<MutexGuard<'_, QueueSlot>> {
        self.slots.get(index).map(lock)
    }

    /// Queues served by a handler of their own, each on its own worker.
    pub fn own_worker_queues(&self) -> Vec<usize> {
        (0..self.slots.len()).filter(|&i| self.slot(i).is_some_and(|s| s.handler.is_some())).collect()
    }

    pub fn needs_reset(&self) -> bool {
        self.needs_reset.load(Ordering::Acquire)
    }

    pub fn set_driver_ok(&self, on: bool) {
        self.driver_ok.store(on, Ordering::Release);
    }

    /// Whether the workers may use the queues now.
    fn running(&self) -> bool {
        self.driver_ok.load(Ordering::Acquire) && !self.needs_reset()
    }

    pub fn set_needs_reset(&self) {
        self.needs_reset.store(true, Ordering::Release);
    }

    pub fn queue_vector(&self, index: usize) -> u16 {
        self.queue_vectors.get(index).map_or(NO_VECTOR, |v| v.load(Ordering::Relaxed))
    }

    pub fn set_queue_vector(&self, index: usize, vector: u16) {
        if let Some(v) = self.queue_vectors.get(index) {
            v.store(self.msix.vector_or_none(vector), Ordering::Relaxed);
        }
    }

    /// DRIVER_OK: the ready queues go to the workers (or, for an `external`
    /// device, to its backend). False if the device cannot start.
    pub fn activate(&self, queues: &[Queue], features: u64) -> bool {
        for (index, queue) in queues.iter().enumerate().filter(|(_, q)| q.ready()) {
            let Some(copy) = worker_copy(queue) else { return false };
            if let Some(mut slot) = self.slot(index) {
                // Set again after being cleared: the queue goes on where it was.
                slot.active.get_or_insert(copy);
            }
        }
        let mut device = self.device();
        if !device.external() {
            return true;
        }
        let handoffs: Vec<QueueHandoff<'_>> = queues
            .iter()
            .enumerate()
            .filter(|(_, q)| q.ready())
            .filter_map(|(index, q)| {
                Some(QueueHandoff {
                    index,
                    size: q.size(),
                    desc_table: q.desc_table(),
                    avail_ring: q.avail_ring(),
                    used_ring: q.used_ring(),
                    kick: self.kicks.get(index)?,
                    call: self.msix.irqfd(self.queue_vector(index)),
                })
            })
            .collect();
        match device.activate(features, &handoffs) {
            Ok(()) => true,
            Err(e) => {
                crate::rate_limited!(
                    warn,
                    "{}: cannot start the backend: {}; device needs reset",
                    self.memory.device(),
                    crate::errors::error_chain(&e)
                );
                false
            }
        }
    }

    /// The driver reset the device: each worker finishes the chain in
    /// progress (the spec wants no ring access after the reset), then the
    /// queues come back; a started device is told.
    pub fn reset(&self, was_started: bool) {
        self.resetting.store(true, Ordering::Release);
        for index in 0..self.slots.len() {
            if let Some(mut slot) = self.slot(index) {
                slot.active = None;
            }
        }
        self.resetting.store(false, Ordering::Release);
        if was_started {
            self.device().reset();
        }
        self.queue_vectors.iter().for_each(|v| v.store(NO_VECTOR, Ordering::Relaxed));
        self.needs_reset.store(false, Ordering::Release);
        self.driver_ok.store(false, Ordering::Release);
    }

    /// The device's host fd and the queue it feeds, while it has one to poll.
    pub fn extra_fd(&self) -> Option<(libc::c_int, usize)> {
        self.device().extra_fd()
    }

    /// Whether the guest has made buffers available on `index` that the
    /// device has not used and may use now (started, no reset pending).
    pub fn queue_has_room(&self, index: usize) -> bool {
        if !self.running() {
            return false;
        }
        let mem = &self.memory.mem;
        self.slot(index).is_some_and(|slot| {
            slot.active
                .as_ref()
                .is_some_and(|q| q.avail_idx(mem, Ordering::Acquire).is_ok_and(|i| i.0 != q.next_avail()))
        })
    }

    /// Drains queue `index`'s available ring (its worker). Returns false if
    /// a pause cut the work short (the rest waits for the resume).
    pub fn process_queue(&self, index: usize, gate: &DeviceGate) -> bool {
        let Some(mut slot) = self.slot(index) else { return true };
        let QueueSlot { active, handler } = &mut *slot;
        let Some(queue) = active.as_mut() else { return true };
        if !self.running() {
            return true;
        }
        let mut server = match handler {
            Some(handler) => Server::Own(handler.as_mut()),
            None => {
                let device = self.device();
                if !device.handles_queue(index) {
                    return true;
                }
                Server::Device(device, index)
            }
        };
        let finished = self.drain(index, queue, &mut server, gate);
        drop(server);
        finished
    }

    fn drain(&self, index: usize, queue: &mut Queue, server: &mut Server<'_>, gate: &DeviceGate) -> bool {
        let mem = &self.memory.mem;
        let mut completed = false;
        let mut finished = true;
        // Ring and buffer accesses are held once for the pass (the device's
        // disk or network I/O runs outside it; a protection change waits at
        // most until the next chain).
        let batch = mem.batch();
        while server.ready() {
            if gate.is_paused() {
                finished = false;
                break;
            }
            if self.resetting.load(Ordering::Acquire) {
                break;
            }
            batch.checkpoint();
            let Some(chain) = queue.pop_descriptor_chain(mem) else { break };
            let head = chain.head_index();
            let written = server.process(chain, &self.memory);
            // The used ring is written through heki like any buffer: a ring
            // locked after DRIVER_OK stops the queue here.
            if queue.add_used(mem, head, written).is_err() {
                crate::rate_limited!(warn, "{}: cannot write the used ring; device needs reset", self.memory.device());
                self.set_needs_reset();
                break;
            }
            completed = true;
        }
        drop(batch);
        if completed {
            self.msix.signal(self.queue_vector(index));
        }
        finished
    }
}

/// The worker's own copy of a queue the driver set up: same size and rings,
/// indices from zero.
fn worker_copy(queue: &Queue) -> Option<Queue> {
    let mut copy = Queue::new(queue.max_size()).ok()?;
    copy.set_size(queue.size());
    let split = |gpa: u64| (Some(gpa as u32), Some((gpa >> 32) as u32));
    let (lo, hi) = split(queue.desc_table());
    copy.set_desc_table_address(lo, hi);
    let (lo, hi) = split(queue.avail_ring());
    copy.set_avail_ring_address(lo, hi);
    let (lo, hi) = split(queue.used_ring());
    copy.set_used_ring_address(lo, hi);
    copy.set_ready(true);
    Some(copy)
}

fn lock<T: ?Sized>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}
