//! What can go wrong loading a payload, one type per input.

use std::path::PathBuf;

use thiserror::Error;

use super::image::ImageError;

#[derive(Debug, Error)]
pub enum BootError {
    #[error("kernel {path}")]
    Kernel {
        path: PathBuf,
        #[source]
        source: KernelError,
    },
    #[error("initramfs {path}")]
    Initramfs {
        path: PathBuf,
        #[source]
        source: InitramfsError,
    },
    #[error("command line")]
    Cmdline(#[source] CmdlineError),
    #[error("no kernel configured (payload.kernel is missing)")]
    NoKernel,
    #[error("cannot write boot structures to guest memory")]
    GuestMemory(#[source] vm_memory::GuestMemoryError),
}

/// Why a kernel image cannot be loaded.
#[derive(Debug, Error)]
pub enum KernelError {
    #[error("cannot open")]
    Open(#[source] std::io::Error),
    #[error("cannot stat")]
    Stat(#[source] std::io::Error),
    #[error("cannot read")]
    Read(#[source] std::io::Error),
    #[error("image is {file_size} bytes, larger than the {ram_size} bytes of guest memory")]
    TooLarge { file_size: u64, ram_size: u64 },
    #[error("truncated ELF header")]
    TruncatedElfHeader,
    #[error("file is truncated ({0} bytes): not an ELF vmlinux or a bzImage")]
    Truncated(usize),
    #[error("not an ELF vmlinux (no ELF magic) or a bzImage (no HdrS header)")]
    UnknownFormat,
    #[error("a segment does not fit in guest memory or the file is truncated")]
    SegmentDoesNotFit,
    #[error("invalid ELF image")]
    InvalidElf(#[source] linux_loader::loader::Error),
    #[error("ELF image has no PVH entry note (XEN_ELFNOTE_PHYS32_ENTRY); build the kernel with CONFIG_PVH=y")]
    NoPvhEntry,
    #[error("invalid bzImage")]
    InvalidBzImage(#[source] linux_loader::loader::Error),
    #[error("bzImage has no setup header")]
    NoSetupHeader,
    #[error("boot protocol {0:#x} is too old (need 2.06 or newer)")]
    OldBootProtocol(u16),
    #[error("bzImage has no 64-bit entry point (XLF_KERNEL_64 not set)")]
    No64BitEntry,
    #[error("cannot parse the ELF image for heki")]
    Image(#[source] ImageError),
}

/// Why an initramfs cannot be loaded.
#[derive(Debug, Error)]
pub enum InitramfsError {
    #[error("cannot open")]
    Open(#[source] std::io::Error),
    #[error("cannot stat")]
    Stat(#[source] std::io::Error),
    #[error("{size} bytes do not fit in guest memory between the kernel end ({kernel_end:#x}) and {low_ram_end:#x}")]
    DoesNotFit { size: u64, kernel_end: u64, low_ram_end: u64 },
    #[error("cannot read into guest memory")]
    Read(#[source] vm_memory::GuestMemoryError),
}

/// Why a kernel command line cannot be passed.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum CmdlineError {
    #[error("contains a NUL byte")]
    Nul,
    #[error("{len} bytes exceeds the {max}-byte limit")]
    TooLong { len: u64, max: u64 },
    #[error("{len} bytes is longer than the kernel accepts ({max})")]
    LongerThanKernelAccepts { len: u64, max: u64 },
}
