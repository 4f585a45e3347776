//! PVH boot: an ELF vmlinux with a Xen PVH entry note, started in 32-bit
//! protected mode with `hvm_start_info` describing the machine.

use std::fs::File;

use linux_loader::loader::elf::start_info::{hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info};
use linux_loader::loader::{Elf, KernelLoader, PvhBootCapability};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::{BootInputs, InitramfsPlacement, KernelError, e820_map};
use crate::layout::{CMDLINE_START, HIGH_RAM_START, PVH_INFO_START, PVH_MEMMAP_START, PVH_MODLIST_START};

const XEN_HVM_START_MAGIC: u32 = 0x336e_c578;

pub(super) struct LoadedElf {
    pub entry: u64,
    pub kernel_end: u64,
}

pub(super) fn load_elf(mem: &GuestMemoryMmap, file: &mut File) -> Result<LoadedElf, KernelError> {
    let loaded = Elf::load(mem, None, file, Some(GuestAddress(HIGH_RAM_START))).map_err(|e| match e {
        linux_loader::loader::Error::Elf(linux_loader::loader::elf::Error::ReadKernelImage) => {
            KernelError::SegmentDoesNotFit
        }
        other => KernelError::InvalidElf(other),
    })?;
    match loaded.pvh_boot_cap {
        PvhBootCapability::PvhEntryPresent(entry) => Ok(LoadedElf { entry: entry.0, kernel_end: loaded.kernel_end }),
        _ => Err(KernelError::NoPvhEntry),
    }
}

/// Writes `hvm_start_info`, the module list and the memory map; returns the
/// address of `hvm_start_info`.
pub(super) fn write_start_info(
    mem: &GuestMemoryMmap,
    inputs: &BootInputs<'_>,
    initramfs: Option<InitramfsPlacement>,
) -> Result<u64, vm_memory::GuestMemoryError> {
    let memmap = e820_map(inputs.ram);
    for (i, entry) in memmap.iter().enumerate() {
        let raw = hvm_memmap_table_entry { addr: entry.addr, size: entry.size, type_: entry.kind, reserved: 0 };
        let at = PVH_MEMMAP_START + (i * std::mem::size_of::<hvm_memmap_table_entry>()) as u64;
        mem.write_obj(raw, GuestAddress(at))?;
    }
    let mut info = hvm_start_info {
        magic: XEN_HVM_START_MAGIC,
        version: 1,
        cmdline_paddr: CMDLINE_START,
        rsdp_paddr: inputs.rsdp,
        memmap_paddr: PVH_MEMMAP_START,
        memmap_entries: memmap.len() as u32,
        ..Default::default()
    };
    if let Some(initramfs) = initramfs {
        let module = hvm_modlist_entry { paddr: initramfs.addr, size: initramfs.size, ..Default::default() };
        mem.write_obj(module, GuestAddress(PVH_MODLIST_START))?;
        info.nr_modules = 1;
        info.modlist_paddr = PVH_MODLIST_START;
    }
    mem.write_obj(info, GuestAddress(PVH_INFO_START))?;
    Ok(PVH_INFO_START)
}
