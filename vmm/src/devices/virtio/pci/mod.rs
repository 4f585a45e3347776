//! The virtio 1.x modern PCI transport. Configuration space
//! (`config_space.rs`) carries the four virtio capabilities and MSI-X
//! (`msix.rs`); BAR 0 (`layout.rs`) holds the common configuration
//! (`common_config.rs`), the notify registers, the ISR and the device
//! configuration. At DRIVER_OK the queues go to the device's workers
//! (`data_path.rs`, `worker.rs`); a vCPU's register access never waits for
//! their disk or network I/O.

mod common_config;
mod config_space;
mod data_path;
mod layout;
mod msix;
#[cfg(test)]
mod tests;
mod worker;

use std::sync::Arc;
use std::thread::JoinHandle;

use vmm_sys_util::eventfd::EventFd;

use self::common_config::CommonConfig;
use self::config_space::{ConfigChange, ConfigSpace};
use self::data_path::DataPath;
pub use self::layout::BAR_SIZE;
use self::layout::{
    COMMON, DEVICE_CONFIG, DEVICE_CONFIG_SIZE, ISR, MSIX_PBA, MSIX_TABLE, NOTIFY, notified_queue, notify_address,
};
use self::msix::Msix;
use self::worker::WorkerPlan;
use super::{DeviceMemory, VirtioDevice};
use crate::devices::gate::DeviceGate;
use crate::devices::mmio_bus::MmioDevice;
use crate::devices::msi::MsiRoutes;
use crate::devices::pci::{PciDevice, fill};

pub struct VirtioPci {
    config: ConfigSpace,
    bar_address: u64,
    common: CommonConfig,
    /// The device's configuration, fixed for its life (capacity, MAC, CID,
    /// tag...), read once so that a vCPU never takes the device's lock.
    device_config: Vec<u8>,
    data: Arc<DataPath>,
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
        let num_queues = device.num_queues();
        let common = CommonConfig::new(device.features(), num_queues, device.queue_max_size())?;
        let mut device_config = vec![0u8; DEVICE_CONFIG_SIZE];
        device.read_config(0, &mut device_config);
        let notify = (0..num_queues).map(|_| EventFd::new(libc::EFD_NONBLOCK)).collect::<Result<Vec<_>, _>>()?;
        // One vector per queue plus one for configuration changes.
        let vectors = num_queues.saturating_add(1);
        let config = ConfigSpace::new(device.device_type(), class, bar_address, vectors);
        let msix = Msix::new(vectors, routes)?;
        let kicks = notify.iter().map(EventFd::try_clone).collect::<Result<Vec<_>, _>>()?;
        let data = Arc::new(DataPath::new(device, memory, msix, kicks));
        Ok(VirtioPci { config, bar_address, common, device_config, data, notify })
    }

    /// Where BAR 0 sits now.
    pub fn bar_address(&self) -> u64 {
        self.bar_address
    }

    /// Moves BAR 0 (the guest reprogrammed it); the caller moves the MMIO
    /// range and the ioeventfds (`notifiers` answers the new addresses).
    pub fn set_bar_address(&mut self, address: u64) {
        self.bar_address = address;
        self.config.set_bar_address(address);
    }

    /// Undoes what `new` set up in KVM for the interrupts (the device is
    /// being removed): each vector's MSI route and irqfd; its GSIs become free.
    pub fn release_interrupts(&self) {
        self.data.msix.release();
    }

    /// Each queue's notify register address and eventfd (for ioeventfds).
    pub fn notifiers(&self) -> impl Iterator<Item = (u64, &EventFd)> {
        self.notify.iter().enumerate().map(|(i, fd)| (notify_address(self.bar_address, i), fd))
    }

    /// Drains queue `index` as its worker would (tests and fuzzing drive the
    /// data path without threads). False if a pause cut the work short.
    pub fn process_queue(&self, index: usize, gate: &DeviceGate) -> bool {
        self.data.process_queue(index, gate)
    }

    /// The device's host fd and the queue it feeds, while it has one to poll.
    pub fn extra_fd(&self) -> Option<(libc::c_int, usize)> {
        self.data.extra_fd()
    }

    /// device_status as the driver reads it.
    pub fn status(&self) -> u8 {
        self.common.status(&self.data)
    }

    /// Starts the workers: one per queue that has a handler of its own, and
    /// one for the other queues and the device's host fd. Each drains a
    /// queue when the guest notifies it, never while the VM is paused. None
    /// for an `external` device, whose backend drains the queues.
    pub fn spawn_workers(
        &self,
        name: &str,
        stop: &EventFd,
        gate: &Arc<DeviceGate>,
    ) -> std::io::Result<Vec<JoinHandle<()>>> {
        let (external, kind, extra) = {
            let device = self.data.device();
            (device.external(), device.thread_kind(), device.extra_fd())
        };
        if external {
            return Ok(Vec::new());
        }
        let own = self.data.own_worker_queues();
        let notify = |i: usize| self.notify[i].try_clone().map(|fd| (i, fd));
        let mut plans: Vec<WorkerPlan> = Vec::new();
        for &i in &own {
            // The first queue's worker keeps the device's name.
            let name = if i == 0 { name.to_string() } else { format!("{name}-q{i}") };
            plans.push(WorkerPlan { name, queues: vec![notify(i)?], extra: None, kind });
        }
        let shared: Vec<(usize, EventFd)> =
            (0..self.notify.len()).filter(|i| !own.contains(i)).map(notify).collect::<std::io::Result<_>>()?;
        if !shared.is_empty() || extra.is_some() {
            plans.push(WorkerPlan { name: name.to_string(), queues: shared, extra, kind });
        }
        let mut workers = Vec::with_capacity(plans.len());
        for plan in plans {
            let stop = stop.try_clone()?;
            workers.push(worker::spawn(plan, self.data.clone(), stop, gate.clone())?);
        }
        Ok(workers)
    }
}

impl PciDevice for VirtioPci {
    fn config_read(&mut self, offset: u16, data: &mut [u8]) {
        self.config.read(offset, data);
    }

    fn config_write(&mut self, offset: u16, data: &[u8]) {
        if let ConfigChange::Msix(enabled, function_masked) = self.config.write(offset, data) {
            self.data.msix.set_control(enabled, function_masked);
        }
    }
}

impl MmioDevice for VirtioPci {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        match offset {
            COMMON..NOTIFY => self.common.read(&self.data, offset - COMMON, data),
            ISR..DEVICE_CONFIG => data.fill(0), // MSI-X only: the ISR is never set
            DEVICE_CONFIG..MSIX_TABLE => fill(&self.device_config, (offset - DEVICE_CONFIG) as u16, data),
            MSIX_TABLE..MSIX_PBA => self.data.msix.read_table(offset - MSIX_TABLE, data),
            _ => data.fill(0),
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        match offset {
            COMMON..NOTIFY => self.common.write(&self.data, offset - COMMON, data),
            // Normally consumed by the ioeventfd in KVM; forwarded if it reaches us.
            NOTIFY..ISR => {
                if let Some(fd) = self.notify.get(notified_queue(offset - NOTIFY)) {
                    let _ = fd.write(1);
                }
            }
            MSIX_TABLE..MSIX_PBA => self.data.msix.write_table(offset - MSIX_TABLE, data),
            _ => {}
        }
    }
}
