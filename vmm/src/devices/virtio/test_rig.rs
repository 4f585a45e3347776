//! A virtio device on its PCI transport, started by a minimal driver over
//! heki-checked memory, for the devices' unit tests.

use std::sync::Arc;

use heki::{PlannedSlot, Policy};
use vm_memory::GuestMemoryMmap;

use super::pci::VirtioPci;
use super::{DeviceMemory, VirtioDevice};
use crate::devices::mmio_bus::MmioDevice;
use crate::guest_access::{Accessor, CheckedMemory};
use crate::heki::HekiSettings;
use crate::heki::{Enforcer, HekiRuntime};
use crate::testing::{RecordingControl, RecordingSlots};

/// Where the rig's driver puts the queue: each part in its own page.
pub const DESC: u64 = 0x1_0000;
pub const AVAIL: u64 = 0x1_1000;
pub const USED: u64 = 0x1_2000;
const RAM: u64 = 1 << 20;

/// How far apart the rings of the n-th started queue sit from the first's.
pub const QUEUE_STRIDE: u64 = 0x3000;

/// `device` as accessor `name` in 1 MiB of RAM, heki on (policy deny),
/// queue `queue` (4 entries) started by the driver.
pub fn started(
    device: Box<dyn VirtioDevice>,
    name: &str,
    queue: u16,
) -> (GuestMemoryMmap, Arc<HekiRuntime>, VirtioPci) {
    started_queues(device, name, &[queue])
}

/// As `started`, with each of `queues` (4 entries each) set up: the n-th at
/// DESC, AVAIL and USED plus n * QUEUE_STRIDE.
pub fn started_queues(
    device: Box<dyn VirtioDevice>,
    name: &str,
    queues: &[u16],
) -> (GuestMemoryMmap, Arc<HekiRuntime>, VirtioPci) {
    let ram = crate::memory::create_guest_ram(&[crate::memory::RamRegion { start: 0, size: RAM }]).expect("memory");
    let mem = ram.host.clone();
    let enforcer = Arc::new(Enforcer::new(Policy::Deny, Arc::new(RecordingControl::default())));
    let config = HekiSettings::default();
    let boot = [(PlannedSlot { gpa: 0, size: RAM, readonly: false }, 0)];
    let heki =
        Arc::new(HekiRuntime::new(&config, enforcer.clone(), Arc::new(RecordingSlots::default()), &ram, &boot, 1));
    let memory =
        DeviceMemory::new(CheckedMemory::new(mem.clone(), enforcer, Arc::new(Accessor::new(name))), Arc::default());
    let mut dev = VirtioPci::new(device, 0, memory, 0, None).expect("transport");
    let w32 = |dev: &mut VirtioPci, off: u64, v: u32| dev.write(off, &v.to_le_bytes());
    // ACKNOWLEDGE|DRIVER, VERSION_1, FEATURES_OK, the queue, DRIVER_OK.
    dev.write(0x14, &[3]);
    w32(&mut dev, 0x08, 1);
    w32(&mut dev, 0x0c, 1);
    dev.write(0x14, &[11]);
    for (n, queue) in queues.iter().enumerate() {
        let shift = n as u64 * QUEUE_STRIDE;
        dev.write(0x16, &queue.to_le_bytes());
        dev.write(0x18, &4u16.to_le_bytes());
        for (off, addr) in [(0x20, DESC), (0x28, AVAIL), (0x30, USED)] {
            w32(&mut dev, off, (addr + shift) as u32);
        }
        dev.write(0x1c, &1u16.to_le_bytes());
    }
    dev.write(0x14, &[15]);
    (mem, heki, dev)
}
