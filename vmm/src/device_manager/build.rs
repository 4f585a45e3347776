//! Virtio devices from their configuration: the same code builds the devices
//! of a boot and the ones `vm.add-*` adds to a running VM.

use std::os::fd::AsFd;

use vm_memory::GuestMemoryMmap;

use crate::config::{ConsoleOutputMode, DiskConfig, FsConfig, NetConfig, VmConfig, VsockConfig};
use crate::devices::virtio::console::{Console, ConsoleHost};
use crate::devices::virtio::{VirtioDevice, block::Block, fs::Fs, net::Net, rng::Rng, tap::Tap, vsock::Vsock};
use crate::memory;
use crate::vm_error::VmError;

/// PCI class codes (class, subclass, prog-if) as the config space stores them.
const CLASS_OTHER: u32 = 0xff_00_00;
/// Mass storage, other.
const CLASS_STORAGE: u32 = 0x01_80_00;
/// Ethernet controller.
const CLASS_NETWORK: u32 = 0x02_00_00;
/// Simple communication controller, other.
const CLASS_COMMUNICATION: u32 = 0x07_80_00;

/// A device ready to be put on the PCI bus.
pub struct NewDevice {
    /// Its id: the configured one or `_<kind><n>`.
    pub name: String,
    pub device: Box<dyn VirtioDevice>,
    pub class: u32,
    /// The PCI segment it asked for.
    pub segment: u16,
}

/// Every virtio device of `config`, in the order a boot places them on the bus.
pub fn boot_devices(
    config: &VmConfig,
    mem: &GuestMemoryMmap,
    console_host: ConsoleHost<'_>,
) -> Result<Vec<NewDevice>, VmError> {
    let mut wanted = Vec::new();
    if let Some(rng) = &config.rng {
        let source = std::fs::File::open(&rng.src)
            .map_err(|e| VmError::Device(format!("rng source {}: {e}", rng.src.display())))?;
        wanted.push(NewDevice {
            name: "_rng".into(),
            device: Box::new(Rng::new(source)),
            class: CLASS_OTHER,
            segment: rng.pci_segment,
        });
    }
    for (i, net_config) in config.net.iter().flatten().enumerate() {
        wanted.push(net(net_config, i)?);
    }
    if let Some(console) = console_device(&config.console, console_host)? {
        // The console stays on segment 0 (config refuses another).
        wanted.push(NewDevice {
            name: "_console".into(),
            device: Box::new(console),
            class: CLASS_COMMUNICATION,
            segment: 0,
        });
    }
    for (i, disk_config) in config.disks.iter().flatten().enumerate() {
        wanted.push(disk(disk_config, i)?);
    }
    if let Some(vsock_config) = &config.vsock {
        wanted.push(vsock(vsock_config)?);
    }
    for (i, share) in config.fs.iter().flatten().enumerate() {
        // validate() holds this too; the memfd's descriptor leaves the VMM only when asked.
        if !config.memory.shared || config.heki.enabled {
            return Err(VmError::Device("fs needs memory.shared=true and heki disabled".into()));
        }
        wanted.push(fs(share, i, mem)?);
    }
    Ok(wanted)
}

/// A virtio-net device on the TAP of `config` (`index` names it without an id).
pub fn net(config: &NetConfig, index: usize) -> Result<NewDevice, VmError> {
    let device_err = |e: std::io::Error| VmError::Device(format!("net {index}: {e}"));
    let inherited = config.fds.as_deref().and_then(|fds| fds.first().copied());
    let tap = match inherited {
        // Each VM (a reboot builds a new one) adopts its own duplicate.
        Some(fd) => Tap::from_fd(crate::devices::virtio::tap::duplicate(fd).map_err(device_err)?),
        None => Tap::open(config.tap.as_deref().unwrap_or("hktap%d")),
    }
    .map_err(device_err)?;
    // A TAP handed over as a descriptor belongs to whoever opened it (Kata
    // configures it, and sends ip/mask only for its own records): never touch it.
    if inherited.is_none()
        && let (Some(ip), Some(mask)) = (config.ip, config.mask)
    {
        tap.configure(ip, mask).map_err(device_err)?;
    }
    let mac = config.mac_bytes(index).map_err(|e| VmError::Device(e.to_string()))?;
    let name = config.id.clone().unwrap_or_else(|| format!("_net{index}"));
    log::info!("{name}: TAP {}", tap.name);
    Ok(NewDevice { name, device: Box::new(Net::new(tap, mac)), class: CLASS_NETWORK, segment: config.pci_segment })
}

/// A virtio-blk device on the image of `config`.
pub fn disk(config: &DiskConfig, index: usize) -> Result<NewDevice, VmError> {
    let failed = |e: std::io::Error| VmError::Device(format!("disk {}: {e}", config.path.display()));
    let file = std::fs::OpenOptions::new().read(true).write(!config.readonly).open(&config.path).map_err(failed)?;
    let name = config.id.clone().unwrap_or_else(|| format!("_disk{index}"));
    let block = Block::new(file, config.readonly, name.clone())
        .map_err(failed)?
        .with_queues(config.num_queues, config.queue_size);
    Ok(NewDevice { name, device: Box::new(block), class: CLASS_STORAGE, segment: config.pci_segment })
}

pub fn vsock(config: &VsockConfig) -> Result<NewDevice, VmError> {
    let device = Vsock::new(config.cid, &config.socket).map_err(|e| VmError::Device(crate::error_chain(&e)))?;
    let name = config.id.clone().unwrap_or_else(|| "_vsock".to_string());
    log::info!("{name}: guest CID {}, host socket {}", config.cid, config.socket.display());
    Ok(NewDevice { name, device: Box::new(device), class: CLASS_COMMUNICATION, segment: config.pci_segment })
}

/// A virtio-fs device served by the vhost-user backend of `share`; needs shared guest memory.
pub fn fs(share: &FsConfig, index: usize, mem: &GuestMemoryMmap) -> Result<NewDevice, VmError> {
    let name = share.id.clone().unwrap_or_else(|| format!("_fs{index}"));
    let regions = memory::shared_regions(mem)?;
    let fs = Fs::new(share, regions)
        .map_err(|e| VmError::Device(format!("fs {}: {}", share.tag, crate::errors::error_chain(&e))))?;
    log::info!("{name}: virtio-fs '{}' served by {}", share.tag, share.socket.display());
    Ok(NewDevice { name, device: Box::new(fs), class: CLASS_STORAGE, segment: share.pci_segment })
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
