//! The VMM's own view of guest RAM (`GuestRam::host`): private pages are
//! `PROT_NONE` there, so a device or API path that missed heki's check faults
//! instead of reading guest data. Such a fault is reported, then the process
//! stops: never a silent success.

use std::sync::Once;
use std::sync::atomic::{AtomicU64, Ordering};

use vm_memory::{GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion, MemoryRegionAddress};

/// Makes `[gpa, gpa + len)` accessible (read/write) or not in the host view:
/// one `mprotect` per RAM region the range touches.
pub fn set_access(host: &GuestMemoryMmap, gpa: u64, len: u64, accessible: bool) -> std::io::Result<()> {
    let end = gpa.saturating_add(len);
    for region in host.iter() {
        let (start, region_end) = (region.start_addr().0, region.start_addr().0.saturating_add(region.len()));
        let (from, to) = (gpa.max(start), end.min(region_end));
        if from >= to {
            continue;
        }
        let base = region
            .get_host_address(MemoryRegionAddress(from - start))
            .map_err(|e| std::io::Error::other(e.to_string()))?;
        let protection = if accessible { libc::PROT_READ | libc::PROT_WRITE } else { libc::PROT_NONE };
        // SAFETY: [base, base + (to - from)) lies inside this region's live mapping,
        // owned by `host`; changing its protection cannot invalidate Rust objects
        // (nothing borrows guest RAM across this call: devices copy under heki's
        // lock, which the caller holds for writing).
        let rc = unsafe { libc::mprotect(base.cast(), (to - from) as usize, protection) };
        if rc != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

const MAX_VIEW_RANGES: usize = 8;
/// Host address ranges of the current VM's host view, for the fault handler.
static VIEW: [(AtomicU64, AtomicU64); MAX_VIEW_RANGES] =
    [const { (AtomicU64::new(0), AtomicU64::new(0)) }; MAX_VIEW_RANGES];
static mut PREVIOUS_SEGV: Option<libc::sigaction> = None;
static INSTALL: Once = Once::new();

/// Registers the host view's address ranges and installs the fault reporter.
pub fn watch(host: &GuestMemoryMmap) {
    for slot in &VIEW {
        slot.0.store(0, Ordering::Relaxed);
        slot.1.store(0, Ordering::Relaxed);
    }
    for (slot, region) in VIEW.iter().zip(host.iter()) {
        if let Ok(base) = region.get_host_address(MemoryRegionAddress(0)) {
            slot.0.store(base as u64, Ordering::Relaxed);
            slot.1.store((base as u64).saturating_add(region.len()), Ordering::Release);
        }
    }
    INSTALL.call_once(install_handler);
}

fn in_view(address: u64) -> bool {
    VIEW.iter().any(|(start, end)| address >= start.load(Ordering::Acquire) && address < end.load(Ordering::Acquire))
}

fn install_handler() {
    // SAFETY: zeroed sigaction is a valid "no handler" value that we fill in;
    // sigaction reads `action` and writes the previous action into PREVIOUS_SEGV
    // once, before any fault can consult it.
    unsafe {
        let mut action: libc::sigaction = std::mem::zeroed();
        action.sa_sigaction = on_fault as *const () as usize;
        action.sa_flags = libc::SA_SIGINFO | libc::SA_ONSTACK;
        let mut previous: libc::sigaction = std::mem::zeroed();
        if libc::sigaction(libc::SIGSEGV, &action, &mut previous) == 0 {
            *std::ptr::addr_of_mut!(PREVIOUS_SEGV) = Some(previous);
        }
    }
}

extern "C" fn on_fault(signal: libc::c_int, info: *mut libc::siginfo_t, context: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo for SA_SIGINFO handlers.
    let address = unsafe { (*info).si_addr() } as u64;
    if in_view(address) {
        let mut message = *b"hekivisor: the VMM touched private guest memory (host address 0x0000000000000000); a heki check was missed. Stopping.\n";
        let digits = b"0123456789abcdef";
        // The 16 zeros after "0x" become the address.
        if let Some(at) = message.windows(2).position(|w| w == b"0x").map(|p| p + 2) {
            for i in 0..16 {
                message[at + i] = digits[((address >> (60 - 4 * i)) & 0xf) as usize];
            }
        }
        // SAFETY: write(2) and _exit(2) are async-signal-safe.
        unsafe {
            libc::write(2, message.as_ptr().cast(), message.len());
            libc::_exit(70);
        }
    }
    // Not ours: hand the fault to whoever handled SIGSEGV before (Rust's stack
    // overflow reporter, or the default action).
    // SAFETY: PREVIOUS_SEGV was written once before this handler was installed.
    let previous = unsafe { *std::ptr::addr_of!(PREVIOUS_SEGV) };
    match previous {
        Some(p) if p.sa_sigaction != libc::SIG_DFL && p.sa_sigaction != libc::SIG_IGN => {
            if p.sa_flags & libc::SA_SIGINFO != 0 {
                // SAFETY: the previous handler was installed with SA_SIGINFO and this signature.
                let handler: extern "C" fn(libc::c_int, *mut libc::siginfo_t, *mut libc::c_void) =
                    unsafe { std::mem::transmute(p.sa_sigaction) };
                handler(signal, info, context);
            } else {
                // SAFETY: the previous handler was installed without SA_SIGINFO.
                let handler: extern "C" fn(libc::c_int) = unsafe { std::mem::transmute(p.sa_sigaction) };
                handler(signal);
            }
        }
        _ => {
            // SAFETY: restoring the default action and returning re-runs the
            // faulting access, which then ends the process as it would have.
            unsafe {
                libc::signal(libc::SIGSEGV, libc::SIG_DFL);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::{RamRegion, create_guest_ram};
    use vm_memory::{Bytes, GuestAddress};

    #[test]
    fn the_two_views_share_the_same_pages() {
        let ram = create_guest_ram(&[RamRegion { start: 0, size: 1 << 20 }]).expect("guest RAM");
        ram.kvm.write_obj(0x1234_5678u32, GuestAddress(0x3000)).expect("guest view");
        assert_eq!(ram.host.read_obj::<u32>(GuestAddress(0x3000)).expect("host view"), 0x1234_5678);
        set_access(&ram.host, 0x2000, 0x2000, false).expect("mprotect");
        set_access(&ram.host, 0x2000, 0x2000, true).expect("mprotect");
        assert_eq!(ram.host.read_obj::<u32>(GuestAddress(0x3000)).expect("host view"), 0x1234_5678);
    }

    #[test]
    fn a_host_access_to_a_private_page_is_reported_and_stops_the_process() {
        let ram = create_guest_ram(&[RamRegion { start: 0, size: 1 << 20 }]).expect("guest RAM");
        watch(&ram.host);
        set_access(&ram.host, 0x5000, 0x1000, false).expect("mprotect");
        let target = ram.host.get_host_address(GuestAddress(0x5008)).expect("host address");
        let (mut read_end, write_end) = {
            let mut fds = [0; 2];
            // SAFETY: pipe writes two new fds into the array.
            assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
            (fds[0], fds[1])
        };
        // SAFETY: the child only redirects stderr, reads one address and exits;
        // every call it makes (dup2, the faulting read, the handler's write and
        // _exit) is async-signal-safe.
        let child = unsafe { libc::fork() };
        if child == 0 {
            // SAFETY: see above.
            unsafe {
                libc::dup2(write_end, 2);
                std::ptr::read_volatile(target);
                libc::_exit(0);
            }
        }
        // SAFETY: closing our copy of the write end.
        unsafe { libc::close(write_end) };
        let mut status = 0;
        // SAFETY: waits for the child we forked.
        unsafe { libc::waitpid(child, &mut status, 0) };
        let mut output = Vec::new();
        let mut buf = [0u8; 256];
        loop {
            // SAFETY: reads into a buffer we own.
            let n = unsafe { libc::read(read_end, buf.as_mut_ptr().cast(), buf.len()) };
            if n <= 0 {
                break;
            }
            output.extend_from_slice(&buf[..n as usize]);
        }
        // SAFETY: closing the read end.
        unsafe { libc::close(read_end) };
        read_end = -1;
        let _ = read_end;
        let text = String::from_utf8_lossy(&output);
        assert!(libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 70, "status {status:#x}: {text}");
        assert!(
            text.contains("touched private guest memory") && text.contains(&format!("{:016x}", target as u64)),
            "{text}"
        );
    }
}
