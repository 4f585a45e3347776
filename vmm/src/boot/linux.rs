//! The Linux x86 boot protocol for bzImage, entered at the 64-bit entry point.

use std::fs::File;

use linux_loader::loader::bootparam::{boot_e820_entry, boot_params, setup_header};
use linux_loader::loader::{BzImage, KernelLoader};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::{BootInputs, InitramfsPlacement, KernelError, e820_map};
use crate::layout::{BOOT_PARAMS_START, CMDLINE_START, HIGH_RAM_START};

/// `xloadflags`: the kernel has a 64-bit entry point at load address + 0x200.
const XLF_KERNEL_64: u16 = 1 << 0;
/// Offset of the 64-bit entry point from the protected-mode kernel start.
const STARTUP_64_OFFSET: u64 = 0x200;
/// Boot protocol 2.06 is the oldest with the fields we fill in.
const MIN_BOOT_PROTOCOL: u16 = 0x0206;
/// `type_of_loader`: "undefined" boot loader.
const LOADER_TYPE_UNDEFINED: u8 = 0xff;
/// `loadflags`: CAN_USE_HEAP.
const CAN_USE_HEAP: u8 = 0x80;

pub(super) struct LoadedBzImage {
    pub entry: u64,
    pub kernel_end: u64,
    pub header: setup_header,
}

pub(super) fn load_bzimage(mem: &GuestMemoryMmap, file: &mut File) -> Result<LoadedBzImage, KernelError> {
    let loaded =
        BzImage::load(mem, None, file, Some(GuestAddress(HIGH_RAM_START))).map_err(KernelError::InvalidBzImage)?;
    let header = loaded.setup_header.ok_or(KernelError::NoSetupHeader)?;
    if header.version < MIN_BOOT_PROTOCOL {
        return Err(KernelError::OldBootProtocol(header.version));
    }
    if header.xloadflags & XLF_KERNEL_64 == 0 {
        return Err(KernelError::No64BitEntry);
    }
    let load = loaded.kernel_load.0;
    let kernel_end = loaded.kernel_end.max(load + u64::from(header.init_size));
    Ok(LoadedBzImage { entry: load + STARTUP_64_OFFSET, kernel_end, header })
}

/// Fills the zero page; returns its address.
pub(super) fn write_boot_params(
    mem: &GuestMemoryMmap,
    inputs: &BootInputs<'_>,
    loaded: &LoadedBzImage,
    cmdline_len: u64,
    initramfs: Option<InitramfsPlacement>,
) -> Result<u64, vm_memory::GuestMemoryError> {
    let mut params = boot_params { hdr: loaded.header, ..Default::default() };
    params.hdr.type_of_loader = LOADER_TYPE_UNDEFINED;
    params.hdr.loadflags |= CAN_USE_HEAP;
    params.hdr.cmd_line_ptr = CMDLINE_START as u32;
    params.hdr.cmdline_size = cmdline_len as u32;
    if let Some(initramfs) = initramfs {
        params.hdr.ramdisk_image = initramfs.addr as u32;
        params.hdr.ramdisk_size = initramfs.size as u32;
        params.ext_ramdisk_image = (initramfs.addr >> 32) as u32;
        params.ext_ramdisk_size = (initramfs.size >> 32) as u32;
    }
    params.acpi_rsdp_addr = inputs.rsdp;
    let map = e820_map(inputs.ram);
    for (slot, entry) in params.e820_table.iter_mut().zip(map.iter()) {
        *slot = boot_e820_entry { addr: entry.addr, size: entry.size, r#type: entry.kind };
    }
    params.e820_entries = map.len().min(params.e820_table.len()) as u8;
    mem.write_obj(params, GuestAddress(BOOT_PARAMS_START))?;
    Ok(BOOT_PARAMS_START)
}
