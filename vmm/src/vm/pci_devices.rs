//! The VM's PCI side: the host bridge, its configuration mechanisms, and the
//! virtio devices the configuration asks for (moved out of `vm.rs` as is).

use std::os::fd::AsFd;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use vm_memory::GuestMemoryMmap;

use crate::config::{ConsoleOutputMode, VmConfig};
use crate::devices::msi::MsiRoutes;
use crate::devices::pci::{PciBus, PciConfigIo, PciConfigMmio};
use crate::devices::virtio::pci::{BAR_SIZE, VirtioPci};
use crate::devices::virtio::{
    DeviceCounters, DeviceMemory, VirtioDevice,
    block::Block,
    console::{Console, ConsoleHost},
    fs::Fs,
    net::Net,
    rng::Rng,
    tap::Tap,
    vsock::Vsock,
};
use crate::devices::{MmioBus, PioBus};
use crate::guest_access::{Accessor, CheckedMemory};
use crate::heki::Enforcer;
use crate::layout::{self};
use crate::memory::{self};

use super::error::VmError;

/// A virtio device of this VM, for its worker thread and counters.
pub struct VirtioHandle {
    pub name: String,
    pub(super) device: Arc<Mutex<VirtioPci>>,
    pub counters: Arc<DeviceCounters>,
    accessor: Arc<Accessor>,
}

impl VirtioHandle {
    pub(super) fn to_json(&self) -> serde_json::Value {
        self.counters.to_json(self.accessor.refused.load(Ordering::Relaxed))
    }
}

pub(super) fn lock_device(device: &Mutex<VirtioPci>) -> std::sync::MutexGuard<'_, VirtioPci> {
    device.lock().unwrap_or_else(|p| p.into_inner())
}

/// PCI class codes (class, subclass, prog-if) as the config space stores them.
const CLASS_OTHER: u32 = 0xff_00_00;
/// Mass storage, other.
const CLASS_STORAGE: u32 = 0x01_80_00;
/// Ethernet controller.
const CLASS_NETWORK: u32 = 0x02_00_00;
/// Simple communication controller, other.
const CLASS_COMMUNICATION: u32 = 0x07_80_00;

/// The PCI host bridge, its configuration mechanisms, and the virtio devices.
pub(super) fn add_pci_devices(
    config: &VmConfig,
    kvm_vm: &Arc<hypervisor::Vm>,
    mem: &GuestMemoryMmap,
    enforcer: &Arc<Enforcer>,
    pio: &mut PioBus,
    mmio: &mut MmioBus,
    console_host: ConsoleHost<'_>,
) -> Result<Vec<VirtioHandle>, VmError> {
    let mut bus = PciBus::default();
    let mut wanted: Vec<(String, Box<dyn VirtioDevice>, u32)> = Vec::new();
    if let Some(rng) = &config.rng {
        let source = std::fs::File::open(&rng.src)
            .map_err(|e| VmError::Device(format!("rng source {}: {e}", rng.src.display())))?;
        wanted.push(("_rng".to_string(), Box::new(Rng::new(source)), CLASS_OTHER));
    }
    for (i, net) in config.net.iter().flatten().enumerate() {
        let device_err = |e: std::io::Error| VmError::Device(format!("net {i}: {e}"));
        let tap = match net.fds.as_deref() {
            // Each VM (a reboot builds a new one) adopts its own duplicate.
            Some([fd, ..]) => Tap::from_fd(crate::devices::virtio::tap::duplicate(*fd).map_err(device_err)?),
            _ => Tap::open(net.tap.as_deref().unwrap_or("hktap%d")),
        }
        .map_err(device_err)?;
        if let (Some(ip), Some(mask)) = (net.ip, net.mask) {
            tap.configure(ip, mask).map_err(device_err)?;
        }
        let mac = net.mac_bytes(i).map_err(|e| VmError::Device(e.to_string()))?;
        let name = net.id.clone().unwrap_or_else(|| format!("_net{i}"));
        log::info!("{name}: TAP {}", tap.name);
        wanted.push((name, Box::new(Net::new(tap, mac)), CLASS_NETWORK));
    }
    if let Some(console) = console_device(&config.console, console_host)? {
        wanted.push(("_console".to_string(), Box::new(console), CLASS_COMMUNICATION));
    }
    for (i, disk) in config.disks.iter().flatten().enumerate() {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(!disk.readonly)
            .open(&disk.path)
            .map_err(|e| VmError::Device(format!("disk {}: {e}", disk.path.display())))?;
        let name = disk.id.clone().unwrap_or_else(|| format!("_disk{i}"));
        let block = Block::new(file, disk.readonly, name.clone())
            .map_err(|e| VmError::Device(format!("disk {}: {e}", disk.path.display())))?;
        wanted.push((name, Box::new(block), CLASS_STORAGE));
    }
    if let Some(vsock) = &config.vsock {
        let device = Vsock::new(vsock.cid, &vsock.socket).map_err(|e| VmError::Device(crate::error_chain(&e)))?;
        let name = vsock.id.clone().unwrap_or_else(|| "_vsock".to_string());
        log::info!("{name}: guest CID {}, host socket {}", vsock.cid, vsock.socket.display());
        wanted.push((name, Box::new(device), CLASS_COMMUNICATION));
    }
    for (i, share) in config.fs.iter().flatten().enumerate() {
        // validate() holds this too; the memfd's descriptor leaves the VMM only when asked.
        if !config.memory.shared || config.heki.enabled {
            return Err(VmError::Device("fs needs memory.shared=true and heki disabled".into()));
        }
        let name = share.id.clone().unwrap_or_else(|| format!("_fs{i}"));
        let regions = memory::shared_regions(mem)?;
        let fs = Fs::new(share, regions)
            .map_err(|e| VmError::Device(format!("fs {}: {}", share.tag, crate::errors::error_chain(&e))))?;
        log::info!("{name}: virtio-fs '{}' served by {}", share.tag, share.socket.display());
        wanted.push((name, Box::new(fs), CLASS_STORAGE));
    }
    let mut handles = Vec::new();
    let routes = Arc::new(MsiRoutes::new(kvm_vm.clone()));
    for (name, device, class) in wanted {
        let counters = Arc::new(DeviceCounters::default());
        let accessor = Arc::new(Accessor::new(name.clone()));
        let checked = CheckedMemory::new(mem.clone(), enforcer.clone(), accessor.clone());
        let memory = DeviceMemory::new(checked, counters.clone());
        let bar = layout::PCI_BAR_START + BAR_SIZE * handles.len() as u64;
        let device = VirtioPci::new(device, bar, memory, class, Some(routes.clone())).map_err(VmError::EventFd)?;
        for (address, fd) in device.notifiers() {
            kvm_vm.register_mmio_ioevent(fd, address)?;
        }
        let device = Arc::new(Mutex::new(device));
        bus.add(device.clone()).ok_or_else(|| VmError::Device("no free PCI slot".into()))?;
        mmio.insert(bar, BAR_SIZE, device.clone());
        handles.push(VirtioHandle { name, device, counters, accessor });
    }
    let bus = Arc::new(bus);
    pio.insert(layout::ports::PCI_CONFIG_ADDRESS, 8, Arc::new(Mutex::new(PciConfigIo::new(bus.clone()))));
    mmio.insert(
        layout::PCI_MMCONFIG_START,
        layout::PCI_MMCONFIG_BUS0_SIZE,
        Arc::new(Mutex::new(PciConfigMmio::new(bus))),
    );
    Ok(handles)
}

/// The virtio console of `console`'s mode with its output and input; `None` for `Off` (no device).
fn console_device(console: &crate::config::ConsoleConfig, host: ConsoleHost<'_>) -> Result<Option<Console>, VmError> {
    let failed = |what: &str, e: std::io::Error| VmError::Device(format!("console {what}: {e}"));
    Ok(match console.mode {
        ConsoleOutputMode::Off => None,
        ConsoleOutputMode::Null => Some(Console::new(Box::new(std::io::sink()))),
        ConsoleOutputMode::Tty if host.stdin => {
            // A duplicate, so the device owns its descriptor; stdin's own flags are left as they are.
            let input = std::io::stdin().as_fd().try_clone_to_owned().map_err(|e| failed("stdin", e))?;
            Some(Console::with_input(Box::new(std::io::stdout()), std::fs::File::from(input)))
        }
        ConsoleOutputMode::Tty => Some(Console::new(Box::new(std::io::stdout()))),
        ConsoleOutputMode::Pty => {
            let pty = host.pty.ok_or_else(|| VmError::Device("console mode Pty needs a pseudo-terminal".into()))?;
            let (out, input) = pty.endpoints().map_err(|e| failed(&pty.path.display().to_string(), e))?;
            Some(Console::with_input(Box::new(out), input))
        }
        ConsoleOutputMode::File => {
            let path = console.file.as_ref().ok_or_else(|| VmError::Device("console mode File needs a file".into()))?;
            let file = std::fs::File::create(path)
                .map_err(|e| VmError::Device(format!("console file {}: {e}", path.display())))?;
            Some(Console::new(Box::new(file)))
        }
    })
}
