//! The virtio 1.x modern PCI transport: configuration space with the four
//! virtio capabilities, and BAR 0 holding common, notify, ISR and device
//! configuration. Queue work happens on the device's worker thread.
// Guest-supplied numbers: no unchecked arithmetic here.
#![deny(clippy::arithmetic_side_effects)]

use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;

use virtio_queue::{Queue, QueueT};
use vmm_sys_util::eventfd::EventFd;

use super::{DEVICE_ID_BASE, DeviceMemory, QueueHandoff, VENDOR_ID, VIRTIO_F_VERSION_1, VirtioDevice, status};
use crate::devices::gate::DeviceGate;
use crate::devices::mmio_bus::MmioDevice;
use crate::devices::msi::MsiRoutes;
use crate::devices::pci::{PciDevice, fill};

pub const BAR_SIZE: u64 = 0x4000;
const COMMON: u64 = 0x0000;
const NOTIFY: u64 = 0x1000;
const ISR: u64 = 0x2000;
const DEVICE_CONFIG: u64 = 0x3000;
const NOTIFY_MULTIPLIER: u32 = 4;
/// MSI-X table and pending-bit array, inside BAR 0 after the device configuration.
const MSIX_TABLE: u64 = 0x3800;
const MSIX_PBA: u64 = 0x3c00;
const MSIX_CAP: usize = 0x90;
const NO_VECTOR: u16 = 0xffff;
/// BAR 0's size bits as the sizing protocol reads them back.
const BAR_SIZE_MASK: u32 = !(BAR_SIZE as u32).wrapping_sub(1);

/// One MSI-X vector: its table entry, GSI and irqfd.
struct MsixVector {
    address: u64,
    data: u32,
    masked: bool,
    gsi: u32,
    irqfd: EventFd,
}

/// MSI-X state; interrupts flow only when the driver enabled it.
struct Msix {
    enabled: bool,
    function_masked: bool,
    vectors: Vec<MsixVector>,
    routes: Option<Arc<MsiRoutes>>,
}

impl Msix {
    fn reroute(&self, index: usize) {
        let (Some(routes), Some(v)) = (&self.routes, self.vectors.get(index)) else { return };
        let active = self.enabled && !self.function_masked && !v.masked;
        routes.set(v.gsi, active.then_some((v.address, v.data)));
    }

    fn reroute_all(&self) {
        (0..self.vectors.len()).for_each(|i| self.reroute(i));
    }

    /// Raises `vector` if it can be delivered (masked interrupts are dropped).
    fn signal(&self, vector: u16) {
        if let Some(v) = self.vectors.get(usize::from(vector))
            && self.enabled
            && !self.function_masked
            && !v.masked
        {
            let _ = v.irqfd.write(1);
        }
    }
}

/// What the vCPU (configuration) and the worker (queue) share.
pub struct TransportState {
    device: Box<dyn VirtioDevice>,
    pub status: u8,
    device_feature_select: u32,
    driver_feature_select: u32,
    driver_features: u64,
    queue_select: u16,
    queues: Vec<Queue>,
    queue_vectors: Vec<u16>,
    config_vector: u16,
    msix: Msix,
    config_generation: u8,
    memory: DeviceMemory,
    /// The queues' notify eventfds, for a device whose backend takes them (`external`).
    kicks: Vec<EventFd>,
}

impl TransportState {
    fn device_features(&self) -> u64 {
        VIRTIO_F_VERSION_1 | self.device.features()
    }

    fn reset(&mut self) {
        if self.status & status::DRIVER_OK != 0 {
            self.device.reset();
        }
        self.status = 0;
        self.driver_features = 0;
        self.device_feature_select = 0;
        self.driver_feature_select = 0;
        self.queue_select = 0;
        self.queues.iter_mut().for_each(Queue::reset);
        self.queue_vectors.iter_mut().for_each(|v| *v = NO_VECTOR);
        self.config_vector = NO_VECTOR;
    }

    /// A ring the device must write (used ring) or trusts (descriptors,
    /// available ring) may not sit in protected memory when the driver starts
    /// the device. Later locks are caught at each used-ring write.
    fn rings_allowed(&self, queue: &Queue) -> bool {
        let size = u64::from(queue.size());
        let rings = [
            (queue.desc_table(), size.saturating_mul(16), "descriptor table"),
            (queue.avail_ring(), size.saturating_mul(2).saturating_add(6), "available ring"),
            (queue.used_ring(), size.saturating_mul(8).saturating_add(6), "used ring"),
        ];
        rings.iter().all(|&(gpa, len, what)| {
            let ok = self.memory.mem.probe_write(gpa, len);
            if !ok {
                crate::rate_limited!(
                    warn,
                    "{}: {what} at {gpa:#x} is in protected memory; device needs reset",
                    self.memory.device()
                );
            }
            ok
        })
    }

    /// Whether the guest has made buffers available on `index` that the
    /// device has not used and may use now (driver ready, no reset pending).
    fn queue_has_room(&self, index: usize) -> bool {
        if self.status & status::DRIVER_OK == 0 || self.status & status::NEEDS_RESET != 0 {
            return false;
        }
        let mem = &self.memory.mem;
        self.queues.get(index).is_some_and(|q| {
            q.ready() && q.avail_idx(mem, std::sync::atomic::Ordering::Acquire).is_ok_and(|i| i.0 != q.next_avail())
        })
    }

    /// Hands the ready queues to an `external` device's backend; false if it failed.
    fn activate_external(&mut self) -> bool {
        let handoffs: Vec<QueueHandoff<'_>> = self
            .queues
            .iter()
            .enumerate()
            .filter(|(_, q)| q.ready())
            .filter_map(|(index, q)| {
                let vector = self.queue_vectors.get(index).copied().unwrap_or(NO_VECTOR);
                Some(QueueHandoff {
                    index,
                    size: q.size(),
                    desc_table: q.desc_table(),
                    avail_ring: q.avail_ring(),
                    used_ring: q.used_ring(),
                    kick: self.kicks.get(index)?,
                    call: self.msix.vectors.get(usize::from(vector)).map(|v| &v.irqfd),
                })
            })
            .collect();
        match self.device.activate(self.driver_features, &handoffs) {
            Ok(()) => true,
            Err(e) => {
                crate::rate_limited!(
                    warn,
                    "{}: cannot start the backend: {e}; device needs reset",
                    self.memory.device()
                );
                false
            }
        }
    }

    /// The device's host fd and the queue it feeds, while it has one to poll.
    pub fn extra_fd(&self) -> Option<(libc::c_int, usize)> {
        self.device.extra_fd()
    }

    fn selected(&self) -> Option<&Queue> {
        self.queues.get(usize::from(self.queue_select))
    }

    fn selected_mut(&mut self) -> Option<&mut Queue> {
        self.queues.get_mut(usize::from(self.queue_select))
    }

    /// Drains queue `index`'s available ring (worker thread). Returns false
    /// if a pause cut the work short (the rest waits for the resume).
    pub fn process_queue(&mut self, index: usize, gate: &DeviceGate) -> bool {
        if !self.device.handles_queue(index) {
            return true;
        }
        let Some(queue) = self.queues.get_mut(index) else { return true };
        if self.status & status::DRIVER_OK == 0 || self.status & status::NEEDS_RESET != 0 || !queue.ready() {
            return true;
        }
        let mem = self.memory.mem.clone();
        let mut completed = false;
        let mut finished = true;
        // Ring and buffer accesses are held once for the pass (the device's
        // disk or network I/O runs outside it; a protection change waits at
        // most until the next chain).
        let batch = mem.batch();
        while self.device.ready(index) {
            if gate.is_paused() {
                finished = false;
                break;
            }
            batch.checkpoint();
            let Some(chain) = queue.pop_descriptor_chain(&mem) else { break };
            let head = chain.head_index();
            let written = self.device.process(index, chain, &self.memory);
            // The used ring is written through heki like any buffer: a ring
            // locked after DRIVER_OK stops the queue here.
            if queue.add_used(&mem, head, written).is_err() {
                crate::rate_limited!(warn, "{}: cannot write the used ring; device needs reset", self.memory.device());
                self.status |= status::NEEDS_RESET;
                break;
            }
            completed = true;
        }
        if completed && let Some(&vector) = self.queue_vectors.get(index) {
            self.msix.signal(vector);
        }
        finished
    }
}

pub struct VirtioPci {
    config: [u8; 256],
    bar_address: u64,
    bar_probe: [bool; 2],
    state: Arc<Mutex<TransportState>>,
    /// One per queue; KVM signals it when the guest writes the queue's notify register.
    notify: Vec<EventFd>,
}

impl VirtioPci {
    pub fn new(
        device: Box<dyn VirtioDevice>,
        bar_address: u64,
        memory: DeviceMemory,
        class: u32,
        routes: Option<Arc<MsiRoutes>>,
    ) -> std::io::Result<Self> {
        let device_type = device.device_type();
        let queues = (0..device.num_queues())
            .map(|_| Queue::new(device.queue_max_size()).map_err(|e| std::io::Error::other(format!("{e:?}"))))
            .collect::<Result<Vec<_>, _>>()?;
        let notify = (0..queues.len()).map(|_| EventFd::new(libc::EFD_NONBLOCK)).collect::<Result<Vec<_>, _>>()?;
        // One vector per queue plus one for configuration changes.
        let vector_count = queues.len().saturating_add(1);
        let mut vectors = Vec::with_capacity(vector_count);
        for _ in 0..vector_count {
            let irqfd = EventFd::new(libc::EFD_NONBLOCK)?;
            let gsi = match &routes {
                Some(r) => {
                    let gsi = r.allocate();
                    r.vm().register_irqfd(&irqfd, gsi).map_err(|e| std::io::Error::other(e.to_string()))?;
                    gsi
                }
                None => 0,
            };
            vectors.push(MsixVector { address: 0, data: 0, masked: true, gsi, irqfd });
        }
        let queue_vectors = vec![NO_VECTOR; queues.len()];
        let msix = Msix { enabled: false, function_masked: false, vectors, routes };
        let kicks = notify.iter().map(EventFd::try_clone).collect::<Result<Vec<_>, _>>()?;
        let state = TransportState {
            device,
            status: 0,
            device_feature_select: 0,
            driver_feature_select: 0,
            driver_features: 0,
            queue_select: 0,
            queues,
            queue_vectors,
            config_vector: NO_VECTOR,
            msix,
            config_generation: 0,
            memory,
            kicks,
        };
        let mut config = [0u8; 256];
        let mut put = |off: usize, bytes: &[u8]| config[off..off.saturating_add(bytes.len())].copy_from_slice(bytes);
        put(0x00, &VENDOR_ID.to_le_bytes());
        put(0x02, &DEVICE_ID_BASE.saturating_add(device_type).to_le_bytes());
        put(0x06, &0x0010u16.to_le_bytes()); // capability list
        put(0x08, &[0x01]); // revision 1: modern
        put(0x09, &class.to_le_bytes()[..3]);
        put(0x10, &((bar_address as u32) | 0x4).to_le_bytes()); // 64-bit memory BAR
        put(0x14, &((bar_address >> 32) as u32).to_le_bytes());
        put(0x2c, &VENDOR_ID.to_le_bytes());
        put(0x2e, &0x0040u16.to_le_bytes());
        put(0x34, &[0x40]);
        put(0x3c, &[0xff]);
        // virtio_pci_cap: vndr, next, len, cfg_type, bar, id, pad[2], offset, length.
        let caps: [(u8, u8, u8, u64, u32); 4] = [
            (0x40, 0x50, 1, COMMON, 0x38),
            (0x50, 0x60, 3, ISR, 4),
            (0x60, 0x70, 4, DEVICE_CONFIG, 0x100),
            (0x70, MSIX_CAP as u8, 2, NOTIFY, 0x1000),
        ];
        for (at, next, kind, offset, length) in caps {
            let len = if kind == 2 { 20 } else { 16 };
            put(usize::from(at), &[0x09, next, len, kind, 0, 0, 0, 0]);
            put(usize::from(at) + 8, &(offset as u32).to_le_bytes());
            put(usize::from(at) + 12, &length.to_le_bytes());
        }
        put(0x80, &NOTIFY_MULTIPLIER.to_le_bytes());
        // MSI-X: table size - 1, table and PBA in BAR 0.
        put(MSIX_CAP, &[0x11, 0x00]);
        put(MSIX_CAP.saturating_add(2), &(queues_len_as_u16(vector_count.saturating_sub(1))).to_le_bytes());
        put(MSIX_CAP + 4, &(MSIX_TABLE as u32).to_le_bytes());
        put(MSIX_CAP + 8, &(MSIX_PBA as u32).to_le_bytes());
        Ok(VirtioPci { config, bar_address, bar_probe: [false; 2], state: Arc::new(Mutex::new(state)), notify })
    }

    /// Each queue's notify register address and eventfd (for ioeventfds).
    pub fn notifiers(&self) -> impl Iterator<Item = (u64, &EventFd)> {
        self.notify.iter().enumerate().map(|(i, fd)| (notify_address(self.bar_address, i), fd))
    }

    pub fn state(&self) -> Arc<Mutex<TransportState>> {
        self.state.clone()
    }

    fn lock(&self) -> MutexGuard<'_, TransportState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Starts the worker: it drains a queue each time the guest notifies it,
    /// never while the VM is paused. None for an `external` device, whose
    /// backend drains the queues.
    pub fn spawn_worker(
        &self,
        name: String,
        stop: EventFd,
        gate: Arc<DeviceGate>,
    ) -> std::io::Result<Option<JoinHandle<()>>> {
        if self.lock().device.external() {
            return Ok(None);
        }
        let state = self.state.clone();
        let notify = self.notify.iter().map(EventFd::try_clone).collect::<std::io::Result<Vec<_>>>()?;
        let (extra, kind) = {
            let s = self.lock();
            (s.device.extra_fd(), s.device.thread_kind())
        };
        let worker = std::thread::Builder::new().name(name).spawn(move || {
            crate::seccomp::apply_or_exit(kind);
            let mut fds: Vec<libc::pollfd> = notify
                .iter()
                .chain(std::iter::once(&stop))
                .map(|fd| fd.as_raw_fd())
                .chain(extra.map(|(fd, _)| fd))
                .map(|fd| libc::pollfd { fd, events: libc::POLLIN, revents: 0 })
                .collect();
            let extra_index = notify.len().saturating_add(1);
            let mut extra_ended = false;
            // Drains a queue, across a pause if one cuts in; false at teardown.
            let drain = |index: usize| loop {
                let Some(_active) = gate.begin() else { return false };
                if lock_state(&state).process_queue(index, &gate) {
                    return true;
                }
            };
            loop {
                // SAFETY: `fds` is a valid array of pollfd for the duration of the call.
                let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, -1) };
                if n < 0 {
                    continue;
                }
                if fds[notify.len()].revents != 0 {
                    return;
                }
                for (index, fd) in notify.iter().enumerate() {
                    if fds[index].revents != 0 {
                        let _ = fd.read();
                        if !drain(index) {
                            return;
                        }
                    }
                }
                if let Some((fd, queue)) = extra
                    && fds[extra_index].revents != 0
                {
                    if !drain(queue) {
                        return;
                    }
                    let s = lock_state(&state);
                    if s.extra_fd().is_none() {
                        // The input ended: a hung-up descriptor would wake poll forever.
                        extra_ended = true;
                        fds[extra_index].fd = -1;
                    } else if !s.queue_has_room(queue) {
                        // Data the guest has no buffers for yet: wait for its next
                        // notify (a negative fd is ignored by poll, hang-ups included).
                        fds[extra_index].fd = -1;
                    } else {
                        fds[extra_index].fd = fd;
                    }
                }
                if let Some((fd, _)) = extra
                    && !extra_ended
                    && fds[..notify.len()].iter().any(|f| f.revents != 0)
                {
                    fds[extra_index].fd = fd;
                }
            }
        })?;
        Ok(Some(worker))
    }

    fn read_msix_table(&self, offset: u64, data: &mut [u8]) {
        let s = self.lock();
        let Some(v) = s.msix.vectors.get((offset / 16) as usize) else { return data.fill(0) };
        let entry: [u32; 4] = [v.address as u32, (v.address >> 32) as u32, v.data, u32::from(v.masked)];
        let bytes: Vec<u8> = entry.iter().flat_map(|w| w.to_le_bytes()).collect();
        fill(&bytes, (offset % 16) as u16, data);
    }

    fn write_msix_table(&self, offset: u64, data: &[u8]) {
        if data.len() != 4 || !offset.is_multiple_of(4) {
            return;
        }
        let value = u32::from_le_bytes([data[0], data[1], data[2], data[3]]);
        let index = (offset / 16) as usize;
        let mut s = self.lock();
        let Some(v) = s.msix.vectors.get_mut(index) else { return };
        match offset % 16 {
            0 => v.address = (v.address & !0xffff_ffff) | u64::from(value),
            4 => v.address = (v.address & 0xffff_ffff) | (u64::from(value) << 32),
            8 => v.data = value,
            _ => v.masked = value & 1 != 0,
        }
        s.msix.reroute(index);
    }

    fn read_common(&self, offset: u64, data: &mut [u8]) {
        let s = self.lock();
        let value: u64 = match offset {
            0x00 => u64::from(s.device_feature_select),
            0x04 => match s.device_feature_select {
                0 => s.device_features() & 0xffff_ffff,
                1 => s.device_features() >> 32,
                _ => 0,
            },
            0x08 => u64::from(s.driver_feature_select),
            0x0c => match s.driver_feature_select {
                0 => s.driver_features & 0xffff_ffff,
                1 => s.driver_features >> 32,
                _ => 0,
            },
            0x10 => u64::from(s.config_vector),
            0x12 => s.queues.len() as u64,
            0x14 => u64::from(s.status),
            0x15 => u64::from(s.config_generation),
            0x16 => u64::from(s.queue_select),
            0x18 => s.selected().map_or(0, |q| u64::from(q.size())),
            0x1a => s.queue_vectors.get(usize::from(s.queue_select)).map_or(0xffff, |v| u64::from(*v)),
            0x1c => s.selected().map_or(0, |q| u64::from(q.ready())),
            0x1e => u64::from(s.queue_select),
            0x20 => s.selected().map_or(0, |q| q.desc_table()),
            0x24 => s.selected().map_or(0, |q| q.desc_table() >> 32),
            0x28 => s.selected().map_or(0, |q| q.avail_ring()),
            0x2c => s.selected().map_or(0, |q| q.avail_ring() >> 32),
            0x30 => s.selected().map_or(0, |q| q.used_ring()),
            0x34 => s.selected().map_or(0, |q| q.used_ring() >> 32),
            _ => 0,
        };
        fill(&value.to_le_bytes(), 0, data);
    }

    fn write_common(&self, offset: u64, data: &[u8]) {
        let mut raw = [0u8; 8];
        raw[..data.len().min(8)].copy_from_slice(&data[..data.len().min(8)]);
        let v = u64::from_le_bytes(raw);
        let mut s = self.lock();
        if offset == 0x1a {
            let (count, selected) = (s.msix.vectors.len(), usize::from(s.queue_select));
            if let Some(slot) = s.queue_vectors.get_mut(selected) {
                *slot = vector_or_none(v as u16, count);
            }
            return;
        }
        if offset <= 0x16 {
            match offset {
                0x00 => s.device_feature_select = v as u32,
                0x08 => s.driver_feature_select = v as u32,
                0x0c if s.status & status::FEATURES_OK == 0 => match s.driver_feature_select {
                    0 => s.driver_features = (s.driver_features & !0xffff_ffff) | (v & 0xffff_ffff),
                    1 => s.driver_features = (s.driver_features & 0xffff_ffff) | (v << 32),
                    _ => {}
                },
                0x10 => s.config_vector = vector_or_none(v as u16, s.msix.vectors.len()),
                0x14 => write_status(&mut s, v as u8),
                0x16 => s.queue_select = v as u16,
                _ => {}
            }
            return;
        }
        // Queue registers: only before DRIVER_OK, and only for an existing queue.
        if s.status & status::DRIVER_OK != 0 {
            return;
        }
        let Some(queue) = s.selected_mut() else { return };
        match offset {
            0x18 => queue.set_size(v as u16),
            0x1c if v == 1 => queue.set_ready(true),
            0x20 => queue.set_desc_table_address(Some(v as u32), None),
            0x24 => queue.set_desc_table_address(None, Some(v as u32)),
            0x28 => queue.set_avail_ring_address(Some(v as u32), None),
            0x2c => queue.set_avail_ring_address(None, Some(v as u32)),
            0x30 => queue.set_used_ring_address(Some(v as u32), None),
            0x34 => queue.set_used_ring_address(None, Some(v as u32)),
            _ => {}
        }
    }
}

/// The guest address of queue `index`'s notify register.
fn notify_address(bar: u64, index: usize) -> u64 {
    let offset = (index as u64).saturating_mul(u64::from(NOTIFY_MULTIPLIER));
    bar.saturating_add(NOTIFY).saturating_add(offset)
}

/// Vector counts are bounded by the queue count (a few).
fn queues_len_as_u16(n: usize) -> u16 {
    u16::try_from(n).unwrap_or(u16::MAX)
}

fn lock_state(state: &Mutex<TransportState>) -> MutexGuard<'_, TransportState> {
    state.lock().unwrap_or_else(|p| p.into_inner())
}

/// A vector the device has, or NO_VECTOR (which is also what the driver reads back).
fn vector_or_none(vector: u16, count: usize) -> u16 {
    if usize::from(vector) < count { vector } else { NO_VECTOR }
}

/// The device_status state machine, including reset and the checks at DRIVER_OK.
fn write_status(s: &mut TransportState, value: u8) {
    if value == 0 {
        s.reset();
        return;
    }
    let mut value = value;
    if value & status::FEATURES_OK != 0 && s.status & status::FEATURES_OK == 0 {
        let offered = s.device_features();
        if s.driver_features & !offered != 0 || s.driver_features & VIRTIO_F_VERSION_1 == 0 {
            value &= !status::FEATURES_OK;
        }
    }
    if value & status::DRIVER_OK != 0 && s.status & status::DRIVER_OK == 0 {
        // Rings first: a ring in protected memory is reported, not just invalid.
        let bad = s.queues.iter().any(|q| q.ready() && (!s.rings_allowed(q) || !q.is_valid(&s.memory.mem)));
        if bad || (s.device.external() && !s.activate_external()) {
            value |= status::NEEDS_RESET;
        }
    }
    s.status = value | (s.status & status::NEEDS_RESET);
}

impl PciDevice for VirtioPci {
    fn config_read(&mut self, offset: u16, data: &mut [u8]) {
        let mut space = self.config;
        for (i, probing) in self.bar_probe.iter().enumerate() {
            if *probing {
                let mask: u32 = if i == 0 { BAR_SIZE_MASK | 0x4 } else { 0xffff_ffff };
                let at = 0x10usize.saturating_add(i.saturating_mul(4));
                space[at..at.saturating_add(4)].copy_from_slice(&mask.to_le_bytes());
            }
        }
        fill(&space, offset, data);
    }

    fn config_write(&mut self, offset: u16, data: &[u8]) {
        match (offset, data.len()) {
            (0x04, 2) | (0x04, 4) => self.config[0x04..0x06].copy_from_slice(&data[..2]),
            (o, _) if usize::from(o) == MSIX_CAP + 2 || usize::from(o) == MSIX_CAP => {
                // Message control: bit 15 enable, bit 14 function mask.
                let control = if usize::from(o) == MSIX_CAP { data.get(2..4) } else { data.get(0..2) };
                if let Some(&[lo, hi]) = control {
                    let value = u16::from_le_bytes([lo, hi]);
                    let keep = self.config[MSIX_CAP + 2] as u16 | ((self.config[MSIX_CAP + 3] as u16 & 0x07) << 8);
                    let stored = (value & 0xc000) | (keep & 0x07ff);
                    self.config[MSIX_CAP + 2..MSIX_CAP + 4].copy_from_slice(&stored.to_le_bytes());
                    let mut s = self.lock();
                    s.msix.enabled = value & 0x8000 != 0;
                    s.msix.function_masked = value & 0x4000 != 0;
                    s.msix.reroute_all();
                }
            }
            (0x10 | 0x14, 4) => {
                // BARs are placed by the VMM; only the sizing protocol is honoured.
                let i = usize::from(offset.saturating_sub(0x10) / 4);
                self.bar_probe[i] = data == [0xff; 4];
            }
            _ => {}
        }
    }
}

impl MmioDevice for VirtioPci {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        match offset {
            COMMON..NOTIFY => self.read_common(offset - COMMON, data),
            ISR..DEVICE_CONFIG => data.fill(0), // polled drivers only: no interrupt pending
            MSIX_TABLE..MSIX_PBA => self.read_msix_table(offset.saturating_sub(MSIX_TABLE), data),
            MSIX_PBA..BAR_SIZE => data.fill(0),
            DEVICE_CONFIG..MSIX_TABLE => self.lock().device.read_config(offset.saturating_sub(DEVICE_CONFIG), data),
            _ => data.fill(0),
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        match offset {
            COMMON..NOTIFY => self.write_common(offset - COMMON, data),
            // Normally consumed by the ioeventfd in KVM; forwarded if it reaches us.
            MSIX_TABLE..MSIX_PBA => self.write_msix_table(offset.saturating_sub(MSIX_TABLE), data),
            NOTIFY..ISR => {
                let index = (offset.saturating_sub(NOTIFY) >> NOTIFY_MULTIPLIER.trailing_zeros()) as usize;
                if let Some(fd) = self.notify.get(index) {
                    let _ = fd.write(1);
                }
            }
            _ => {}
        }
    }
}

#[cfg(test)]
#[allow(clippy::arithmetic_side_effects)]
mod tests {
    use std::sync::{Arc, Mutex};

    use heki::{Permissions, ProtectRange, ViolationKind};
    use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

    use super::*;
    use crate::devices::virtio::rng::Rng;
    use crate::devices::virtio::test_rig::{AVAIL, DESC, USED, started};
    use crate::heki::HekiRuntime;

    const BUFFER: u64 = 0x2_0000;

    /// An rng device started by a minimal driver: one queue of 4 in its own pages.
    fn started_rng() -> (GuestMemoryMmap, Arc<HekiRuntime>, VirtioPci) {
        let source = std::fs::File::open("/dev/zero").expect("/dev/zero");
        started(Box::new(Rng::new(source)), "_rng", 0)
    }

    /// Makes one 16-byte write-only buffer available and lets the worker run.
    fn request(mem: &GuestMemoryMmap, dev: &VirtioPci, n: u16) {
        mem.write_obj(BUFFER, GuestAddress(DESC)).expect("desc addr");
        mem.write_obj(16u32, GuestAddress(DESC + 8)).expect("desc len");
        mem.write_obj(2u16, GuestAddress(DESC + 12)).expect("desc flags: write-only");
        mem.write_obj(0u16, GuestAddress(AVAIL + 4 + 2 * u64::from(n % 4))).expect("ring");
        mem.write_obj(n + 1, GuestAddress(AVAIL + 2)).expect("avail idx");
        let gate = DeviceGate::default();
        assert!(lock_state(&dev.state).process_queue(0, &gate));
    }

    fn used_page(mem: &GuestMemoryMmap) -> Vec<u8> {
        let mut page = vec![0u8; 4096];
        mem.read_slice(&mut page, GuestAddress(USED)).expect("used ring");
        page
    }

    /// An `external` device (as vhost-user devices are) that records what the transport hands it.
    struct Handed {
        log: Arc<Mutex<Vec<String>>>,
        fail: bool,
    }

    impl VirtioDevice for Handed {
        fn device_type(&self) -> u16 {
            26
        }
        fn external(&self) -> bool {
            true
        }
        fn activate(&mut self, features: u64, queues: &[QueueHandoff<'_>]) -> Result<(), String> {
            for q in queues {
                let (desc, avail, used, call) = (q.desc_table, q.avail_ring, q.used_ring, q.call.is_some());
                let line = format!("{features:#x} q{} n{} {desc:#x} {avail:#x} {used:#x} call={call}", q.index, q.size);
                self.log.lock().expect("log").push(line);
            }
            if self.fail { Err("backend gone".into()) } else { Ok(()) }
        }
        fn reset(&mut self) {
            self.log.lock().expect("log").push("reset".into());
        }
        fn process(
            &mut self,
            _: usize,
            _: virtio_queue::DescriptorChain<&crate::guest_access::CheckedMemory>,
            _: &DeviceMemory,
        ) -> u32 {
            unreachable!("an external device's queues are served elsewhere")
        }
    }

    fn started_external(fail: bool) -> (Arc<Mutex<Vec<String>>>, VirtioPci) {
        let log = Arc::new(Mutex::new(Vec::new()));
        let (_mem, _heki, dev) = started(Box::new(Handed { log: log.clone(), fail }), "_fs0", 0);
        (log, dev)
    }

    #[test]
    fn an_external_device_gets_its_rings_at_driver_ok_and_runs_no_worker() {
        let (log, dev) = started_external(false);
        let expected = format!("{VIRTIO_F_VERSION_1:#x} q0 n4 {DESC:#x} {AVAIL:#x} {USED:#x} call=false");
        assert_eq!(*log.lock().expect("log"), [expected]);
        assert_eq!(lock_state(&dev.state).status & status::NEEDS_RESET, 0);
        let stop = EventFd::new(libc::EFD_NONBLOCK).expect("eventfd");
        let worker = dev.spawn_worker("_fs0".into(), stop, Arc::new(DeviceGate::default())).expect("spawn");
        assert!(worker.is_none(), "the backend drains the queues, not a worker of ours");
    }

    #[test]
    fn a_failed_hand_over_needs_reset_and_a_driver_reset_takes_the_queues_back() {
        let (log, mut dev) = started_external(true);
        assert_ne!(lock_state(&dev.state).status & status::NEEDS_RESET, 0);
        dev.write(0x14, &[0]);
        assert_eq!(lock_state(&dev.state).status, 0);
        assert_eq!(log.lock().expect("log").last().map(String::as_str), Some("reset"));
    }

    #[test]
    fn a_used_ring_locked_after_driver_ok_is_never_written_again() {
        let (mem, heki, dev) = started_rng();
        request(&mem, &dev, 0);
        assert_eq!(mem.read_obj::<u16>(GuestAddress(USED + 2)).expect("idx"), 1, "the device works");
        let range = ProtectRange { start: USED >> 12, end: (USED >> 12) + 1, perms: Permissions::READ };
        heki.protect_pages(&[range], "guest").expect("lock the used ring");
        let before = used_page(&mem);
        request(&mem, &dev, 1);
        assert_eq!(used_page(&mem), before, "not one byte of the locked ring changed");
        assert_ne!(lock_state(&dev.state).status & status::NEEDS_RESET, 0);
        let recent = heki.violations().recent();
        assert!(
            recent.iter().any(|v| v.kind == ViolationKind::DmaWrite && v.gpa.is_some_and(|g| g >> 12 == USED >> 12))
        );
    }

    #[test]
    fn a_paused_device_takes_no_request_until_resumed() {
        let (mem, _heki, dev) = started_rng();
        mem.write_obj(1u16, GuestAddress(AVAIL + 2)).expect("avail idx");
        mem.write_obj(BUFFER, GuestAddress(DESC)).expect("desc addr");
        mem.write_obj(16u32, GuestAddress(DESC + 8)).expect("desc len");
        mem.write_obj(2u16, GuestAddress(DESC + 12)).expect("write-only");
        let gate = DeviceGate::default();
        gate.close();
        assert!(!lock_state(&dev.state).process_queue(0, &gate), "cut short by the pause");
        assert_eq!(mem.read_obj::<u16>(GuestAddress(USED + 2)).expect("idx"), 0);
        gate.resume();
        assert!(lock_state(&dev.state).process_queue(0, &gate));
        assert_eq!(mem.read_obj::<u16>(GuestAddress(USED + 2)).expect("idx"), 1);
    }
}
