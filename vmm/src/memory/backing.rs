//! What backs guest RAM: a memfd of ordinary pages, or of huge pages from the
//! host's hugetlbfs pool, and how it is mapped.
//!
//! A hugetlbfs page that cannot be allocated when the guest first touches it
//! raises SIGBUS in whoever touches it: a vCPU thread inside `KVM_RUN`, a
//! device worker, the VMM itself. So huge pages are never mapped on hope:
//! the pool is checked first (a clear error naming the shortfall), and the
//! mapping is made without `MAP_NORESERVE`, so the kernel reserves every
//! page at `mmap` time (or fails it) and no later fault can find the pool
//! empty.

use std::fs::File;
use std::os::fd::{FromRawFd, OwnedFd};
use std::path::Path;
use std::sync::Arc;

use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{FileOffset, GuestAddress, GuestMemoryMmap, GuestRegionMmap};

use super::{MemoryError, RamRegion};
use crate::config::MemoryConfig;

/// How guest RAM is backed and mapped.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RamBacking {
    /// Huge pages of this size (bytes); `None`: ordinary pages.
    pub huge_page_size: Option<u64>,
    /// Fault every page in at mapping time (`MAP_POPULATE`).
    pub prefault: bool,
}

impl RamBacking {
    /// The backing `memory` asks for; the default huge page size is the host's.
    pub fn for_config(memory: &MemoryConfig) -> Result<RamBacking, MemoryError> {
        let huge_page_size = match (memory.hugepages, memory.hugepage_size) {
            (false, _) => None,
            (true, Some(size)) => Some(size),
            (true, None) => Some(host_default_huge_page_size()?),
        };
        Ok(RamBacking { huge_page_size, prefault: memory.prefault })
    }

    /// The granule regions of this backing must be aligned to.
    pub fn page_size(&self) -> u64 {
        self.huge_page_size.unwrap_or(4096)
    }
}

/// `Hugepagesize` of /proc/meminfo, in bytes.
pub fn host_default_huge_page_size() -> Result<u64, MemoryError> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").map_err(MemoryError::Memfd)?;
    meminfo
        .lines()
        .find_map(|l| l.strip_prefix("Hugepagesize:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map(|kb| kb * 1024)
        .ok_or(MemoryError::NoHugePages { reason: "the host reports no huge page size (/proc/meminfo)".into() })
}

/// The host's pool of huge pages of one size.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HugePagePool {
    pub page_size: u64,
    /// Pages neither in use nor reserved by another mapping.
    pub available: u64,
}

/// Reads `/sys/kernel/mm/hugepages/hugepages-<kB>kB/{free,resv}_hugepages`.
pub fn huge_page_pool(page_size: u64) -> Result<HugePagePool, MemoryError> {
    let dir = format!("/sys/kernel/mm/hugepages/hugepages-{}kB", page_size / 1024);
    let read = |name: &str| -> Result<u64, MemoryError> {
        let path = Path::new(&dir).join(name);
        let text = std::fs::read_to_string(&path).map_err(|e| MemoryError::NoHugePages {
            reason: format!("the host offers no {} kB huge pages ({}: {e})", page_size / 1024, path.display()),
        })?;
        text.trim().parse().map_err(|_| MemoryError::NoHugePages {
            reason: format!("{} holds '{}', not a count", path.display(), text.trim()),
        })
    };
    let (free, reserved) = (read("free_hugepages")?, read("resv_hugepages")?);
    Ok(HugePagePool { page_size, available: free.saturating_sub(reserved) })
}

/// Fails, naming the shortfall, unless the pool can back `bytes` now.
pub fn check_huge_page_pool(page_size: u64, bytes: u64) -> Result<(), MemoryError> {
    let pool = huge_page_pool(page_size)?;
    let needed = bytes.div_ceil(page_size);
    if pool.available < needed {
        return Err(MemoryError::HugePageShortfall { needed, available: pool.available, page_kb: page_size / 1024 });
    }
    Ok(())
}

/// A new memfd of `size` bytes with the backing's page size.
pub fn create_memfd(size: u64, backing: &RamBacking) -> Result<File, MemoryError> {
    let mut flags = libc::MFD_CLOEXEC;
    if let Some(page) = backing.huge_page_size {
        if !size.is_multiple_of(page) {
            return Err(MemoryError::NoHugePages {
                reason: format!("{size} bytes of RAM is not a whole number of {} kB huge pages", page / 1024),
            });
        }
        check_huge_page_pool(page, size)?;
        // MFD_HUGE_* encode log2(page size) at MFD_HUGE_SHIFT.
        flags |= libc::MFD_HUGETLB | (page.trailing_zeros() << libc::MFD_HUGE_SHIFT);
    }
    // SAFETY: memfd_create takes a NUL-terminated name and flags; it returns a new fd or -1.
    let fd = unsafe { libc::memfd_create(c"hekivisor-guest-ram".as_ptr(), flags) };
    if fd < 0 {
        return Err(MemoryError::Memfd(std::io::Error::last_os_error()));
    }
    // SAFETY: `fd` was just created and is owned by nobody else.
    let file = File::from(unsafe { OwnedFd::from_raw_fd(fd) });
    file.set_len(size).map_err(MemoryError::Memfd)?;
    Ok(file)
}

/// Maps `regions` of `file` (laid out one after another from `file_offset`)
/// as one guest memory. `populate` faults the pages in now.
pub fn map_regions(
    file: &File,
    file_offset: u64,
    regions: &[RamRegion],
    backing: &RamBacking,
    populate: bool,
) -> Result<GuestMemoryMmap, MemoryError> {
    let total: u64 = regions.iter().map(|r| r.size).sum();
    let mapped = map_region_list(file, file_offset, regions, backing, populate)?;
    GuestMemoryMmap::from_arc_regions(mapped).map_err(|e| MemoryError::Map { size: total, reason: e.to_string() })
}

/// `map_regions`, one guest region per RAM region.
pub fn map_region_list(
    file: &File,
    file_offset: u64,
    regions: &[RamRegion],
    backing: &RamBacking,
    populate: bool,
) -> Result<Vec<Arc<GuestRegionMmap>>, MemoryError> {
    let total: u64 = regions.iter().map(|r| r.size).sum();
    let mut offset = file_offset;
    let mut mapped = Vec::with_capacity(regions.len());
    for r in regions {
        let region_file = file.try_clone().map_err(MemoryError::Memfd)?;
        // Ordinary pages keep vm-memory's MAP_NORESERVE (a memfd page is
        // allocated at first touch, as anonymous memory is); huge pages are
        // reserved now (see the module comment).
        let mut flags = libc::MAP_SHARED;
        if backing.huge_page_size.is_none() {
            flags |= libc::MAP_NORESERVE;
        }
        if populate {
            flags |= libc::MAP_POPULATE;
        }
        let size = usize::try_from(r.size).map_err(|_| MemoryError::TooLarge { size: r.size })?;
        let mapping = MmapRegionBuilder::new(size)
            .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
            .with_mmap_flags(flags)
            .with_file_offset(FileOffset::new(region_file, offset))
            .with_hugetlbfs(backing.huge_page_size.is_some())
            .build()
            .map_err(|e| MemoryError::Map { size: total, reason: e.to_string() })?;
        let region = GuestRegionMmap::new(mapping, GuestAddress(r.start))
            .ok_or(MemoryError::Map { size: total, reason: format!("region at {:#x} overflows", r.start) })?;
        mapped.push(Arc::new(region));
        offset = offset.saturating_add(r.size);
    }
    Ok(mapped)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_pool_is_a_clear_error() {
        // 4 MiB pages do not exist on x86-64.
        let err = check_huge_page_pool(4 << 20, 4 << 20).expect_err("no such pool").to_string();
        assert!(err.contains("4096 kB huge pages"), "{err}");
    }

    #[test]
    fn the_shortfall_names_pages_needed_and_available() {
        let pool = huge_page_pool(2 << 20).expect("2 MiB pool exists on x86-64");
        let want = (pool.available + 3) * (2 << 20);
        let err = check_huge_page_pool(2 << 20, want).expect_err("more than the pool").to_string();
        assert!(err.contains(&format!("{} huge pages of 2048 kB", pool.available + 3)), "{err}");
        assert!(err.contains(&format!("only {} are available", pool.available)), "{err}");
    }

    #[test]
    fn ordinary_pages_map_twice_onto_the_same_memory() {
        use vm_memory::Bytes;
        let regions = [RamRegion { start: 0, size: 1 << 20 }];
        let backing = RamBacking { huge_page_size: None, prefault: true };
        let file = create_memfd(1 << 20, &backing).expect("memfd");
        let a = map_regions(&file, 0, &regions, &backing, true).expect("first");
        let b = map_regions(&file, 0, &regions, &backing, false).expect("second");
        a.write_obj(0x1234_5678u32, GuestAddress(0x800)).expect("write");
        assert_eq!(b.read_obj::<u32>(GuestAddress(0x800)).expect("read"), 0x1234_5678);
    }
}
