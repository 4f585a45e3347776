//! Loading a kernel and describing the machine to it: PVH for ELF vmlinux,
//! the Linux 64-bit boot protocol for bzImage.

mod e820;
mod errors;
pub mod image;
mod linux;
pub mod mptable;
mod pvh;

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

pub use e820::{E820_RAM, E820_RESERVED, E820Entry, e820_map};
pub use errors::{BootError, CmdlineError, InitramfsError, KernelError};

use crate::layout::{CMDLINE_MAX_SIZE, CMDLINE_START, HIGH_RAM_START, LOW_RAM_END};
use crate::memory::RamRegion;

/// How the boot vCPU must be started.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EntryPoint {
    /// 32-bit protected mode, paging off, EBX = `start_info`.
    Pvh { entry: u64, start_info: u64 },
    /// 64-bit long mode with identity paging, RSI = `boot_params`.
    Linux64 { entry: u64, boot_params: u64 },
}

/// What the loaded payload asks of the machine.
pub struct BootInputs<'a> {
    pub kernel: &'a Path,
    pub initramfs: Option<&'a Path>,
    pub cmdline: &'a str,
    pub ram: &'a [RamRegion],
    pub rsdp: u64,
    /// Keep the loaded image for heki's lock-time comparison (ELF only).
    pub keep_image: bool,
}

/// What `load_payload` loaded.
pub struct Loaded {
    pub entry: EntryPoint,
    /// The ELF image, when asked for (`keep_image`); a bzImage unpacks itself
    /// in the guest, so there is no image to compare with.
    pub image: Option<heki::KernelImage>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum KernelFormat {
    Elf,
    BzImage,
}

/// Loads kernel, initramfs and command line, and writes the boot structures.
pub fn load_payload(mem: &GuestMemoryMmap, inputs: &BootInputs<'_>) -> Result<Loaded, BootError> {
    let kernel_err = |source: KernelError| BootError::Kernel { path: inputs.kernel.to_path_buf(), source };
    let mut file = File::open(inputs.kernel).map_err(|e| kernel_err(KernelError::Open(e)))?;
    let file_size = file.metadata().map_err(|e| kernel_err(KernelError::Stat(e)))?.len();
    let ram_size: u64 = inputs.ram.iter().map(|r| r.size).sum();
    if file_size > ram_size.saturating_sub(HIGH_RAM_START) {
        return Err(kernel_err(KernelError::TooLarge { file_size, ram_size }));
    }
    let format = detect_format(&mut file).map_err(kernel_err)?;
    let cmdline_len = write_cmdline(mem, inputs.cmdline)?;
    match format {
        KernelFormat::Elf => {
            let loaded = pvh::load_elf(mem, &mut file).map_err(kernel_err)?;
            let initramfs = load_initramfs(mem, inputs, loaded.kernel_end, LOW_RAM_END)?;
            let start_info = pvh::write_start_info(mem, inputs, initramfs).map_err(BootError::GuestMemory)?;
            let image = if inputs.keep_image {
                let mut data = Vec::new();
                file.seek(SeekFrom::Start(0))
                    .and_then(|_| file.read_to_end(&mut data))
                    .map_err(|e| kernel_err(KernelError::Read(e)))?;
                Some(image::kernel_image(&data).map_err(|e| kernel_err(KernelError::Image(e)))?)
            } else {
                None
            };
            Ok(Loaded { entry: EntryPoint::Pvh { entry: loaded.entry, start_info }, image })
        }
        KernelFormat::BzImage => {
            let loaded = linux::load_bzimage(mem, &mut file).map_err(kernel_err)?;
            let header = loaded.header;
            let max_cmdline = u64::from(header.cmdline_size);
            if max_cmdline != 0 && cmdline_len > max_cmdline {
                return Err(BootError::Cmdline(CmdlineError::LongerThanKernelAccepts {
                    len: cmdline_len,
                    max: max_cmdline,
                }));
            }
            let limit = u64::from(header.initrd_addr_max).saturating_add(1).min(LOW_RAM_END);
            let initramfs = load_initramfs(mem, inputs, loaded.kernel_end, limit)?;
            let boot_params = linux::write_boot_params(mem, inputs, &loaded, cmdline_len, initramfs)
                .map_err(BootError::GuestMemory)?;
            Ok(Loaded { entry: EntryPoint::Linux64 { entry: loaded.entry, boot_params }, image: None })
        }
    }
}

fn detect_format(file: &mut File) -> Result<KernelFormat, KernelError> {
    let mut head = [0u8; 0x206];
    file.seek(SeekFrom::Start(0)).map_err(KernelError::Read)?;
    let n = read_up_to(file, &mut head).map_err(KernelError::Read)?;
    if n >= 4 && head[..4] == *b"\x7fELF" {
        if n < 64 {
            return Err(KernelError::TruncatedElfHeader);
        }
        return Ok(KernelFormat::Elf);
    }
    if n >= 0x206 && head[0x202..0x206] == *b"HdrS" {
        return Ok(KernelFormat::BzImage);
    }
    if n < 0x206 {
        return Err(KernelError::Truncated(n));
    }
    Err(KernelError::UnknownFormat)
}

fn read_up_to(file: &mut File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match file.read(&mut buf[filled..])? {
            0 => break,
            n => filled += n,
        }
    }
    Ok(filled)
}

/// Writes the NUL-terminated command line; returns its length with the NUL.
fn write_cmdline(mem: &GuestMemoryMmap, cmdline: &str) -> Result<u64, BootError> {
    if cmdline.as_bytes().contains(&0) {
        return Err(BootError::Cmdline(CmdlineError::Nul));
    }
    let len = cmdline.len() as u64 + 1;
    if len > CMDLINE_MAX_SIZE {
        return Err(BootError::Cmdline(CmdlineError::TooLong { len, max: CMDLINE_MAX_SIZE }));
    }
    let mut bytes = cmdline.as_bytes().to_vec();
    bytes.push(0);
    mem.write_slice(&bytes, GuestAddress(CMDLINE_START)).map_err(BootError::GuestMemory)?;
    Ok(len)
}

/// Where the initramfs landed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct InitramfsPlacement {
    pub addr: u64,
    pub size: u64,
}

/// Places the initramfs at the top of low RAM (below `limit`), page aligned,
/// above the kernel.
fn load_initramfs(
    mem: &GuestMemoryMmap,
    inputs: &BootInputs<'_>,
    kernel_end: u64,
    limit: u64,
) -> Result<Option<InitramfsPlacement>, BootError> {
    let Some(path) = inputs.initramfs else {
        return Ok(None);
    };
    let err = |source: InitramfsError| BootError::Initramfs { path: path.to_path_buf(), source };
    let mut file = File::open(path).map_err(|e| err(InitramfsError::Open(e)))?;
    let size = file.metadata().map_err(|e| err(InitramfsError::Stat(e)))?.len();
    let low_ram_end = inputs.ram.first().map(|r| r.end()).unwrap_or(0).min(limit);
    let addr = low_ram_end
        .checked_sub(size)
        .map(|a| a & !0xfff)
        .filter(|&a| a >= kernel_end)
        .ok_or_else(|| err(InitramfsError::DoesNotFit { size, kernel_end, low_ram_end }))?;
    mem.read_volatile_from(GuestAddress(addr), &mut file, size as usize).map_err(|e| err(InitramfsError::Read(e)))?;
    Ok(Some(InitramfsPlacement { addr, size }))
}
