//! The VM's PCI devices: the bus, the BAR window, and each virtio device
//! with its worker. Devices are added at boot and, through `vm.add-*`,
//! while the VM runs; `vm.remove-device` takes one away again and frees
//! everything it held (worker, ioeventfds, irqfds and GSIs, BAR, slot, host
//! descriptors), so the next device added can take its slot.
//!
//! On segment 0 a guest with ACPI hears of both through the hotplug
//! controller (`devices/pci_hotplug.rs`): an added device is announced, and
//! a removal first asks the guest to release the device and waits for its
//! eject, up to `EJECT_TIMEOUT`.

pub mod build;
mod relocation;

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

use crate::devices::gate::DeviceGate;
use crate::devices::msi::MsiRoutes;
use crate::devices::pci::{PciSegments, PlacementError, bar_window::BarWindowDevice};
use crate::devices::pci_hotplug::{PciHotplug, PciHotplugPorts};
use crate::devices::virtio::pci::VirtioPci;
use crate::devices::virtio::{DeviceCounters, DeviceMemory};
use crate::devices::{MmioBus, PioBus};
use crate::guest_access::{Accessor, CheckedMemory};
use crate::heki::Enforcer;
use crate::layout;
use crate::vm_error::VmError;
pub use build::NewDevice;

/// The end of the high MMIO window (46 bits of physical address).
const HIGH_MMIO_END: u64 = 1 << 46;

/// The first address above RAM and above 4 GiB.
fn high_mmio_start(mem: &GuestMemoryMmap) -> u64 {
    use vm_memory::GuestMemoryBackend;
    mem.last_addr().0.saturating_add(1).max(layout::RAM_64BIT_START)
}

/// How long a removal waits for the device's worker to end.
const WORKER_STOP_TIMEOUT: Duration = Duration::from_secs(5);

/// How long a removal waits for an ACPI guest to eject the device before it
/// takes the device away regardless (as for a guest without ACPI). Linux's
/// acpiphp needs about a second on this project's emulated KVM.
const EJECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Where a device sits, as Cloud Hypervisor's `PciDeviceInfo` reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PciDeviceInfo {
    pub id: String,
    pub segment: u16,
    pub slot: u8,
}

impl PciDeviceInfo {
    /// `segment:bus:device.function`, as Cloud Hypervisor writes it.
    pub fn bdf(&self) -> String {
        format!("{:04x}:00:{:02x}.0", self.segment, self.slot)
    }

    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({ "id": self.id, "bdf": self.bdf() })
    }
}

/// A virtio device of this VM, for its worker thread and counters.
pub struct VirtioHandle {
    pub name: String,
    segment: u16,
    slot: u8,
    device: Arc<Mutex<VirtioPci>>,
    pub counters: Arc<DeviceCounters>,
    accessor: Arc<Accessor>,
    /// Ends this device's workers alone (a removal) or with the VM.
    stop: EventFd,
    /// One per queue with a handler of its own, plus one for the rest.
    workers: Vec<JoinHandle<()>>,
}

impl VirtioHandle {
    pub fn to_json(&self) -> serde_json::Value {
        self.counters.to_json(self.accessor.refused.load(Ordering::Relaxed))
    }
}

fn lock_device(device: &Mutex<VirtioPci>) -> std::sync::MutexGuard<'_, VirtioPci> {
    device.lock().unwrap_or_else(|p| p.into_inner())
}

/// The memory a device reaches the guest through: heki-checked, counted.
/// Boot-time and hot-added devices get it from here alike, so a hot-added
/// device cannot DMA where a boot-time one may not.
pub fn device_memory(
    mem: &GuestMemoryMmap,
    enforcer: &Arc<Enforcer>,
    name: &str,
) -> (DeviceMemory, Arc<DeviceCounters>, Arc<Accessor>) {
    let counters = Arc::new(DeviceCounters::default());
    let accessor = Arc::new(Accessor::new(name.to_string()));
    let checked = CheckedMemory::new(mem.clone(), enforcer.clone(), accessor.clone());
    (DeviceMemory::new(checked, counters.clone()), counters, accessor)
}

pub struct PciDevices {
    segments: PciSegments,
    routes: Arc<MsiRoutes>,
    kvm_vm: Arc<hypervisor::Vm>,
    mem: GuestMemoryMmap,
    enforcer: Arc<Enforcer>,
    gate: Arc<DeviceGate>,
    handles: Vec<VirtioHandle>,
    /// Segment 0's ACPI hotplug controller.
    hotplug: Arc<PciHotplug>,
    /// Whether workers run (the VM started): a device added later starts its own at once.
    started: bool,
}

impl PciDevices {
    /// `segment_count` PCI segments with `devices` on them, wired into the port and MMIO buses.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        segment_count: u16,
        kvm_vm: &Arc<hypervisor::Vm>,
        mem: &GuestMemoryMmap,
        enforcer: &Arc<Enforcer>,
        gate: Arc<DeviceGate>,
        pio: &mut PioBus,
        mmio: &mut MmioBus,
        devices: Vec<NewDevice>,
    ) -> Result<PciDevices, VmError> {
        let segments = PciSegments::install(segment_count, pio, mmio);
        let first = segments.get(0).map_err(|e| VmError::Device(e.to_string()))?;
        let ged_interrupt = EventFd::new(libc::EFD_NONBLOCK).map_err(VmError::EventFd)?;
        kvm_vm.register_irqfd(&ged_interrupt, layout::ports::GED_IRQ)?;
        let hotplug = Arc::new(PciHotplug::new(first.bus.clone(), ged_interrupt));
        let hotplug_ports = Arc::new(Mutex::new(PciHotplugPorts(hotplug.clone())));
        pio.insert(layout::ports::PCI_HOTPLUG, layout::ports::PCI_HOTPLUG_LEN, hotplug_ports);
        // Everything above RAM, where Linux puts the 64-bit BAR of a device
        // it finds on a rescan: a guest without ACPI sees segment 0 only.
        let high = high_mmio_start(mem);
        let bars = first.bars.clone();
        mmio.insert(high, HIGH_MMIO_END - high, Arc::new(Mutex::new(BarWindowDevice { map: bars, start: high })));
        let mut this = PciDevices {
            segments,
            routes: Arc::new(MsiRoutes::new(kvm_vm.clone())),
            kvm_vm: kvm_vm.clone(),
            mem: mem.clone(),
            enforcer: enforcer.clone(),
            gate,
            handles: Vec::new(),
            hotplug,
            started: false,
        };
        for device in devices {
            this.add(device)?;
        }
        Ok(this)
    }

    /// The host view of guest RAM (virtio-fs shares its regions with its backend).
    pub fn guest_memory(&self) -> &GuestMemoryMmap {
        &self.mem
    }

    pub fn handles(&self) -> &[VirtioHandle] {
        &self.handles
    }

    /// Puts `new` in the first free slot; its worker starts at once if the VM runs.
    pub fn add(&mut self, new: NewDevice) -> Result<PciDeviceInfo, VmError> {
        if self.handles.iter().any(|h| h.name == new.name) {
            return Err(VmError::Device(format!("a device with id {} exists already", new.name)));
        }
        let placement = |e: PlacementError| VmError::Device(format!("{}: {e}", new.name));
        let segment = self.segments.get(new.segment).map_err(placement)?;
        let full = || placement(PlacementError::SegmentFull { segment: new.segment });
        let slot = segment.bus.free_slot().ok_or_else(full)?;
        let bar = segment.bars.bar_address(slot).ok_or_else(full)?;
        let (bus, bars) = (segment.bus.clone(), segment.bars.clone());
        let stop = EventFd::new(libc::EFD_NONBLOCK).map_err(VmError::EventFd)?;
        let (memory, counters, accessor) = device_memory(&self.mem, &self.enforcer, &new.name);
        let device =
            VirtioPci::new(new.device, bar, memory, new.class, Some(self.routes.clone())).map_err(VmError::EventFd)?;
        let mut registered = Vec::new();
        for (address, fd) in device.notifiers() {
            if let Err(e) = self.kvm_vm.register_mmio_ioevent(fd, address) {
                for (address, fd) in device.notifiers().take(registered.len()) {
                    let _ = self.kvm_vm.unregister_mmio_ioevent(fd, address);
                }
                device.release_interrupts();
                return Err(e.into());
            }
            registered.push(address);
        }
        let device = Arc::new(Mutex::new(device));
        bars.insert(slot, bar, device.clone());
        let on_bus = relocation::RelocatableDevice { device: device.clone(), slot, bars, kvm_vm: self.kvm_vm.clone() };
        bus.add(Arc::new(Mutex::new(on_bus)));
        let segment = new.segment;
        let mut handle = VirtioHandle {
            name: new.name.clone(),
            segment,
            slot,
            device,
            counters,
            accessor,
            stop,
            workers: Vec::new(),
        };
        let started = if self.started { self.start_worker(&mut handle) } else { Ok(()) };
        self.handles.push(handle);
        if let Err(e) = started {
            // Off the bus again, with everything it took.
            self.detach(&new.name);
            return Err(e);
        }
        if self.started && segment == 0 {
            self.hotplug.announce_added(slot);
        }
        Ok(PciDeviceInfo { id: new.name, segment, slot })
    }

    fn start_worker(&self, handle: &mut VirtioHandle) -> Result<(), VmError> {
        handle.workers = lock_device(&handle.device)
            .spawn_workers(&handle.name, &handle.stop, &self.gate)
            .map_err(VmError::SpawnVcpu)?;
        Ok(())
    }

    /// Starts every device's worker (the VM starts).
    pub fn start(&mut self) -> Result<(), VmError> {
        self.started = true;
        let mut handles = std::mem::take(&mut self.handles);
        let result = handles.iter_mut().filter(|h| h.workers.is_empty()).try_for_each(|h| self.start_worker(h));
        self.handles = handles;
        result
    }

    /// Removes the device `id` (`vm.remove-device`); `None` if there is none.
    /// A guest that uses the hotplug controller releases it first.
    pub fn remove(&mut self, id: &str) -> Option<PciDeviceInfo> {
        let handle = self.handles.iter().find(|h| h.name == id)?;
        if self.started && handle.segment == 0 && self.hotplug.guest_uses_acpi() {
            if self.hotplug.request_eject(handle.slot, EJECT_TIMEOUT) {
                log::info!("{id}: the guest ejected slot {}", handle.slot);
            } else {
                log::warn!("{id}: no eject from the guest within {EJECT_TIMEOUT:?}; removing it regardless");
            }
        }
        self.detach(id)
    }

    /// Takes the device `id` off the bus and frees what it held; `None` if there is none.
    fn detach(&mut self, id: &str) -> Option<PciDeviceInfo> {
        let index = self.handles.iter().position(|h| h.name == id)?;
        let mut handle = self.handles.remove(index);
        // The guest can no longer reach it: no config space, no BAR.
        if let Ok(segment) = self.segments.get(handle.segment) {
            segment.bus.remove(handle.slot);
            segment.bars.remove(handle.slot);
        }
        stop_workers(std::slice::from_mut(&mut handle));
        let device = lock_device(&handle.device);
        for (address, fd) in device.notifiers() {
            if let Err(e) = self.kvm_vm.unregister_mmio_ioevent(fd, address) {
                log::warn!("{id}: cannot unregister the ioeventfd at {address:#x}: {e}");
            }
        }
        device.release_interrupts();
        drop(device);
        log::info!("{id}: removed from PCI slot {}", handle.slot);
        // Dropping the handle drops the device and, with it, its host
        // descriptors (image file, TAP, sockets): the worker held the last other reference.
        Some(PciDeviceInfo { id: handle.name, segment: handle.segment, slot: handle.slot })
    }

    /// Ends every worker (the VM stops).
    pub fn stop(&mut self) {
        stop_workers(&mut self.handles);
    }
}

/// Signals each worker to end and joins it within `WORKER_STOP_TIMEOUT`.
fn stop_workers(handles: &mut [VirtioHandle]) {
    for handle in handles.iter() {
        let _ = handle.stop.write(1);
    }
    let deadline = std::time::Instant::now() + WORKER_STOP_TIMEOUT;
    for handle in handles.iter_mut() {
        for worker in std::mem::take(&mut handle.workers) {
            while !worker.is_finished() && std::time::Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(1));
            }
            if worker.is_finished() {
                let _ = worker.join();
            } else {
                log::error!("{}: a device worker did not stop in time; leaving it detached", handle.name);
            }
        }
    }
}
