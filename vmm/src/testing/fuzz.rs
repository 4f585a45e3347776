//! Drives the parsers that see guest or network bytes from one byte string,
//! without a VM: the fuzz targets in `fuzz/` call these, and so do the
//! regression tests of what the fuzzers found (in the normal suite, on stable).
//!
//! Each function documents how it reads its input. None may panic, whatever
//! the bytes; the virtio one also checks that no device wrote to a page heki
//! protects.

use std::io::Write;
use std::os::fd::OwnedFd;
use std::sync::{Arc, Mutex, OnceLock};

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::devices::gate::DeviceGate;
use crate::devices::pci::{PciBus, PciConfigIo, PciConfigMmio};
use crate::devices::virtio::pci::{BAR_SIZE, VirtioPci};
use crate::devices::virtio::{
    DeviceCounters, DeviceMemory, VirtioDevice, block::Block, console::Console, net::Net, rng::Rng, tap::Tap,
};
use crate::devices::{MmioDevice, PioDevice};
use crate::guest_access::{Accessor, CheckedMemory};
use crate::heki::HekiSettings;
use crate::heki::{Enforcer, HekiRuntime};
use crate::memory::GuestRam;
use crate::testing::{RecordingControl, RecordingSlots};

/// Guest RAM of the virtio fixture.
const RAM_SIZE: u64 = 1 << 20;
/// The input is laid out from GPA 0: descriptor table at 0, available ring
/// at 0x1000, used ring at 0x2000, buffers anywhere the descriptors say.
const INPUT_WINDOW: u64 = 0x4000;
const AVAIL: u64 = 0x1000;
const USED: u64 = 0x2000;
/// A page heki protects (read-only for devices); its bytes must never change.
pub const PROTECTED_PAGE: u64 = 0x8000;
const PROTECTED_FILL: u8 = 0x5a;
/// Queue size the driver side programs.
const QUEUE_SIZE: u16 = 16;
const BLOCK_IMAGE_SIZE: u64 = 64 << 10;

struct VirtioFixture {
    _ram: GuestRam,
    mem: GuestMemoryMmap,
    /// One checked view for every device the inputs build: each new view
    /// registers an accessor with the enforcer for good (as a device does
    /// for the life of its VM), so one per input would grow without bound.
    checked: CheckedMemory,
    _heki: Arc<HekiRuntime>,
    image: std::fs::File,
    entropy: std::fs::File,
}

fn virtio_fixture() -> &'static VirtioFixture {
    static FIXTURE: OnceLock<VirtioFixture> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let regions = crate::memory::ram_regions(RAM_SIZE);
        let ram = crate::memory::create_guest_ram(&regions).expect("fixture: guest RAM");
        let mem = ram.host.clone();
        let slots = crate::memory::boot_slot_plan(&regions);
        let enforcer = Arc::new(Enforcer::new(heki::Policy::Deny, Arc::new(RecordingControl::default())));
        let heki = Arc::new(HekiRuntime::new(
            &HekiSettings::default(),
            enforcer.clone(),
            Arc::new(RecordingSlots::default()),
            &ram,
            &slots,
            0,
        ));
        mem.write_slice(&[PROTECTED_FILL; 4096], GuestAddress(PROTECTED_PAGE)).expect("fixture: fill");
        let range = heki::ProtectRange {
            start: PROTECTED_PAGE / 4096,
            end: PROTECTED_PAGE / 4096 + 1,
            perms: heki::Permissions::READ,
        };
        heki.protect_pages(&[range], "fuzz").expect("fixture: protect a page");
        let image = tempfile_in_memory("hekivisor-fuzz-disk");
        image.set_len(BLOCK_IMAGE_SIZE).expect("fixture: disk size");
        let entropy = std::fs::File::open("/dev/urandom").expect("fixture: /dev/urandom");
        let checked = CheckedMemory::new(mem.clone(), enforcer, Arc::new(Accessor::new("fuzz")));
        VirtioFixture { _ram: ram, mem, checked, _heki: heki, image, entropy }
    })
}

/// An anonymous file (memfd): no file left behind.
fn tempfile_in_memory(name: &str) -> std::fs::File {
    let name = std::ffi::CString::new(name).expect("no NUL in the name");
    // SAFETY: memfd_create takes a NUL-terminated name and flags; it returns a new fd or -1.
    let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
    // SAFETY: `fd` is a fresh descriptor we own.
    std::fs::File::from(unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) })
}

fn socketpair() -> (OwnedFd, OwnedFd) {
    let mut fds = [0; 2];
    // SAFETY: `fds` has room for the two descriptors socketpair writes.
    let rc = unsafe { libc::socketpair(libc::AF_UNIX, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0, fds.as_mut_ptr()) };
    assert_eq!(rc, 0, "socketpair: {}", std::io::Error::last_os_error());
    // SAFETY: both descriptors are fresh and ours.
    unsafe {
        (
            <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fds[0]),
            <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fds[1]),
        )
    }
}

/// The devices a chain can go through.
#[derive(Clone, Copy, Debug)]
pub enum DeviceKind {
    Rng,
    Block,
    Net,
    Console,
}

impl DeviceKind {
    fn from_byte(b: u8) -> DeviceKind {
        match b % 4 {
            0 => DeviceKind::Rng,
            1 => DeviceKind::Block,
            2 => DeviceKind::Net,
            _ => DeviceKind::Console,
        }
    }
}

/// Virtqueue descriptor chains through one device, over heki-checked memory.
///
/// Input: byte 0 picks the device (rng, block, net, console), byte 1 the
/// queue, byte 2 how many entries the available ring offers, byte 3 the
/// frame length the host side of a net device sends; the rest is copied to
/// guest memory from GPA 0 (descriptor table, available ring at 0x1000,
/// used ring at 0x2000, buffers). Panics if a device changed the protected page.
pub fn virtio_queue(data: &[u8]) {
    let _ = virtio_queue_used(data);
}

/// `virtio_queue`, returning the used ring's entries (descriptor id, used
/// length) afterwards, so a test can check what a device reported.
pub fn virtio_queue_used(data: &[u8]) -> Vec<(u32, u32)> {
    let [device, queue, offered, frame_len, image @ ..] = data else { return Vec::new() };
    let fixture = virtio_fixture();
    let mem = &fixture.mem;
    let mut window = vec![0u8; INPUT_WINDOW as usize];
    let n = image.len().min(window.len());
    window[..n].copy_from_slice(&image[..n]);
    // The available ring's index: how many entries the driver offers.
    window[(AVAIL + 2) as usize..(AVAIL + 4) as usize].copy_from_slice(&u16::from(*offered).to_le_bytes());
    mem.write_slice(&window, GuestAddress(0)).expect("the window is in RAM");

    let kind = DeviceKind::from_byte(*device);
    let mut host_end = None;
    let device: Box<dyn VirtioDevice> = match kind {
        DeviceKind::Rng => Box::new(Rng::new(fixture.entropy.try_clone().expect("clone entropy"))),
        DeviceKind::Block => {
            Box::new(Block::new(fixture.image.try_clone().expect("clone image"), false, "fuzz".into()).expect("block"))
        }
        DeviceKind::Net => {
            let (guest_side, host_side) = socketpair();
            let tap = Tap::from_datagram_socket(guest_side, "fuzz").expect("stand-in TAP");
            host_end = Some(host_side);
            Box::new(Net::new(tap, [0x52, 0x54, 0, 0, 0, 1]))
        }
        DeviceKind::Console => Box::new(Console::new(Box::new(std::io::sink()))),
    };
    let queues = device.num_queues();
    let index = usize::from(*queue) % queues.max(1);
    let memory = DeviceMemory::new(fixture.checked.clone(), Arc::new(DeviceCounters::default()));
    let Ok(mut dev) = VirtioPci::new(device, 0xc000_0000, memory, 0xff_00_00, None) else { return Vec::new() };
    let w16 = |dev: &mut VirtioPci, off: u64, v: u16| dev.write(off, &v.to_le_bytes());
    let w32 = |dev: &mut VirtioPci, off: u64, v: u32| dev.write(off, &v.to_le_bytes());
    // Driver side: reset, ACKNOWLEDGE|DRIVER, VERSION_1, FEATURES_OK, one queue, DRIVER_OK.
    dev.write(0x14, &[0]);
    dev.write(0x14, &[3]);
    w32(&mut dev, 0x08, 1);
    w32(&mut dev, 0x0c, 1);
    dev.write(0x14, &[11]);
    w16(&mut dev, 0x16, index as u16);
    w16(&mut dev, 0x18, QUEUE_SIZE);
    for (off, addr) in [(0x20, 0), (0x28, AVAIL), (0x30, USED)] {
        w32(&mut dev, off, addr as u32);
        w32(&mut dev, off + 4, 0);
    }
    w16(&mut dev, 0x1c, 1);
    dev.write(0x14, &[15]);
    if let Some(host) = &host_end {
        // A frame from the host for the receive queue.
        let frame = vec![0xabu8; usize::from(*frame_len) * 8];
        let _ = std::fs::File::from(host.try_clone().expect("clone socket")).write(&frame);
    }
    let gate = DeviceGate::default();
    dev.process_queue(index, &gate);
    // A second notification with nothing new must be harmless too.
    dev.process_queue(index, &gate);

    let mut page = [0u8; 4096];
    mem.read_slice(&mut page, GuestAddress(PROTECTED_PAGE)).expect("the protected page is in RAM");
    assert!(page.iter().all(|b| *b == PROTECTED_FILL), "a {kind:?} device wrote to a protected page");
    let used_idx: u16 = mem.read_obj(GuestAddress(USED + 2)).expect("the used ring is in RAM");
    (0..u64::from(used_idx).min(u64::from(QUEUE_SIZE)))
        .map(|i| {
            let elem = USED + 4 + 8 * i;
            let id: u32 = mem.read_obj(GuestAddress(elem)).expect("used ring");
            let len: u32 = mem.read_obj(GuestAddress(elem + 4)).expect("used ring");
            (id, len)
        })
        .collect()
}

/// PCI configuration space (ports 0xCF8/0xCFC, the ECAM window) and BAR 0
/// of a virtio device, driven by a sequence of accesses.
///
/// Input: records of 8 bytes: kind (config port / config data port / ECAM /
/// BAR, read or write), size (1, 2, 4, 8), a 16- or 20-bit offset, and 4
/// bytes of data.
pub fn pci_accesses(data: &[u8]) {
    let fixture = virtio_fixture();
    let memory = DeviceMemory::new(fixture.checked.clone(), Arc::new(DeviceCounters::default()));
    let rng = Box::new(Rng::new(fixture.entropy.try_clone().expect("clone entropy")));
    let Ok(device) = VirtioPci::new(rng, crate::layout::PCI_BAR_START, memory, 0xff_00_00, None) else { return };
    let device = Arc::new(Mutex::new(device));
    let bus = PciBus::default();
    if bus.add(device.clone()).is_none() {
        return;
    }
    let bus = Arc::new(bus);
    let mut io = PciConfigIo::new(bus.clone());
    let mut ecam = PciConfigMmio::new(bus);
    for record in data.chunks_exact(8) {
        let size = [1usize, 2, 4, 8][usize::from(record[1] & 3)];
        let offset = u64::from(u32::from_le_bytes([record[2], record[3], record[4] & 0x0f, 0]));
        let mut bytes = [0u8; 8];
        bytes[..3].copy_from_slice(&record[5..8]);
        bytes[3] = record[4];
        let is_write = record[0] & 1 == 1;
        let buf = &mut bytes[..size];
        match (record[0] >> 1) % 4 {
            0 => {
                let port = (offset % 8) as u16;
                if is_write {
                    io.write(port, buf);
                } else {
                    io.read(port, buf);
                }
            }
            1 => {
                // Select a register, then access it, as a guest does.
                io.write(0, &(0x8000_0000u32 | (offset as u32 & 0x00ff_fffc)).to_le_bytes());
                let port = 4 + (offset % 4) as u16;
                if is_write {
                    io.write(port, buf);
                } else {
                    io.read(port, buf);
                }
            }
            2 => {
                if is_write {
                    ecam.write(offset, buf);
                } else {
                    ecam.read(offset, buf);
                }
            }
            _ => {
                let offset = offset % BAR_SIZE;
                let mut dev = device.lock().unwrap_or_else(|p| p.into_inner());
                if is_write {
                    dev.write(offset, buf);
                } else {
                    dev.read(offset, buf);
                }
            }
        }
    }
}

/// The unemulable-instruction decoder: up to 15 instruction bytes after a
/// 16-byte header (RIP, then FS base and GS base folded into 4 bytes each).
pub fn instruction(data: &[u8]) {
    let Some((header, bytes)) = data.split_first_chunk::<16>() else { return };
    let rip = u64::from_le_bytes(header[0..8].try_into().expect("8 bytes"));
    let fs = u64::from(u32::from_le_bytes(header[8..12].try_into().expect("4 bytes"))) << 12;
    let gs = u64::from(u32::from_le_bytes(header[12..16].try_into().expect("4 bytes"))) << 12;
    let mut regs = [0u64; 16];
    for (i, r) in regs.iter_mut().enumerate() {
        *r = rip.rotate_left(i as u32 * 7) ^ (i as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    }
    let bytes = &bytes[..bytes.len().min(15)];
    if let Some(op) = heki::insn::decode_memory_write(bytes, rip, &regs, fs, gs) {
        assert!(op.length <= bytes.len(), "instruction longer than its bytes");
        assert!(op.length > 0, "empty instruction");
    }
}

/// One REST request through the router: the method (GET or PUT by the first
/// byte), the path up to the first NUL, the body after it.
pub fn http_request(data: &[u8]) {
    let [method, rest @ ..] = data else { return };
    let method = if method & 1 == 0 { "GET" } else { "PUT" };
    let (path, body) = match rest.iter().position(|b| *b == 0) {
        Some(at) => (&rest[..at], &rest[at + 1..]),
        None => (rest, &[][..]),
    };
    let Ok(path) = std::str::from_utf8(path) else { return };
    if let crate::api::Resolved::Request(route) = crate::api::resolve(method, path) {
        let _ = route.decode(body, Default::default());
    }
}

/// `vm.create` bodies.
pub fn vm_config_json(data: &[u8]) {
    let _ = crate::config::vm_config_from_json(data);
}

/// Kernel loading (ELF with a PVH note, bzImage): the input is the kernel
/// file, loaded into 64 MiB of guest RAM.
pub fn kernel_image(data: &[u8]) {
    // The image heki keeps is parsed from the same bytes: never a panic.
    let _ = crate::boot::image::kernel_image(data);
    static MEM: OnceLock<(GuestMemoryMmap, Vec<crate::memory::RamRegion>)> = OnceLock::new();
    let (mem, regions) = MEM.get_or_init(|| {
        let regions = crate::memory::ram_regions(64 << 20);
        (crate::memory::create_guest_memory(&regions).expect("fixture: guest memory"), regions)
    });
    let mut file = tempfile_in_memory("hekivisor-fuzz-kernel");
    if file.write_all(data).is_err() {
        return;
    }
    let path = std::path::PathBuf::from(format!("/proc/self/fd/{}", std::os::fd::AsRawFd::as_raw_fd(&file)));
    let inputs = crate::boot::BootInputs {
        kernel: &path,
        initramfs: None,
        cmdline: "console=ttyS0",
        ram: regions,
        rsdp: 0x000e_0000,
        keep_image: true,
    };
    let _ = crate::boot::load_payload(mem, &inputs);
}

/// The introspection protocol: `data` is one line from an agent (a command
/// or a reply to an event), as the channel's reader hands it over.
pub fn introspection_line(data: &[u8]) {
    match introspection_protocol::parse_line(data) {
        Ok(_) => {}
        // An error reply must always be writable as JSON.
        Err((id, error)) => {
            let _ = serde_json::to_string(&id);
            let _ = format!("{error:?}");
        }
    }
}
