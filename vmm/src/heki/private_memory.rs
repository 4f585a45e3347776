//! PRIVATE_MEMORY and SET_SHARED: pages the guest takes away from the host
//! (and the devices), and how this host keeps them away.

use heki::{AbiError, PAGE_SHIFT};

use crate::guest_access::AccessPolicy;
use crate::host_view;

use super::runtime::HekiRuntime;

/// How private pages are kept from the host.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PrivateMode {
    /// The host kernel maps them for KVM only; the VMM has no mapping.
    Kernel,
    /// The VMM's own view has them `PROT_NONE`; KVM's mapping remains.
    VmmView,
}

impl PrivateMode {
    pub fn as_str(self) -> &'static str {
        match self {
            PrivateMode::Kernel => "kernel",
            PrivateMode::VmmView => "vmm-view",
        }
    }

    /// Why this mode, for `vm.heki`.
    pub fn reason(self) -> &'static str {
        match self {
            PrivateMode::Kernel => "KVM maps private pages from a guest_memfd; the VMM has no mapping of them",
            PrivateMode::VmmView => {
                "this host's KVM has no private memory attributes (KVM_CAP_MEMORY_ATTRIBUTES = 0) and still needs the VMM's mapping for a guest_memfd slot, so private pages are PROT_NONE in the VMM's own view of RAM; KVM's mapping remains"
            }
        }
    }
}

impl HekiRuntime {
    /// Pages up to the end of the highest RAM region.
    fn ram_pages(&self) -> u64 {
        self.ram().regions.iter().map(|&(_, end)| end >> PAGE_SHIFT).max().unwrap_or(0)
    }

    /// Whether the guest made its memory private.
    pub fn private_memory_enabled(&self) -> bool {
        self.enforcer.protections().private.is_enabled()
    }

    /// Where private pages are kept out of the host's reach.
    pub fn private_mode(&self) -> PrivateMode {
        PrivateMode::VmmView
    }

    /// PRIVATE_MEMORY(1): every page not shared becomes inaccessible to the VMM.
    pub fn enable_private_memory(&self) -> Result<(), AbiError> {
        if self.view_has_huge_pages() {
            return Err(AbiError::NotImplemented);
        }
        let ram = (*self.ram()).clone();
        let newly_private = std::cell::RefCell::new(Vec::new());
        self.update_with_view(
            |p| {
                if !p.private.is_enabled() {
                    p.private.enable();
                    *newly_private.borrow_mut() = p.private.private_ranges(&ram);
                }
                Ok(())
            },
            |view| {
                // One mprotect per contiguous private run.
                for &(start, end) in newly_private.borrow().iter() {
                    host_view::set_access(view, start << PAGE_SHIFT, (end - start) << PAGE_SHIFT, false)?;
                    self.enforcer.epoch().mark_reads_judged(self.ram_pages(), start, end, true);
                }
                Ok(())
            },
        )?;
        // Idempotent: only the call that turned it on is reported.
        if !newly_private.borrow().is_empty() {
            crate::events::emit("heki", "private-memory", &[("mode", self.private_mode().as_str().to_string())]);
        }
        Ok(())
    }

    /// SET_SHARED: shares `[gpa, gpa + len)` with the host, or makes it private
    /// again (returning only once no device access to it is in flight).
    pub fn set_shared(&self, gpa: u64, len: u64, share: u64) -> Result<(), AbiError> {
        let ram = (*self.ram()).clone();
        self.update_with_view(
            |p| p.private.set_shared(&ram, gpa, len, share),
            |view| {
                host_view::set_access(view, gpa, len, share == 1)?;
                let pages = (gpa >> PAGE_SHIFT, (gpa + len) >> PAGE_SHIFT);
                self.enforcer.epoch().mark_reads_judged(self.ram_pages(), pages.0, pages.1, share == 0);
                Ok(())
            },
        )?;
        let what = if share == 1 { "shared" } else { "private" };
        crate::events::emit("heki", what, &[("gpa", format!("{gpa:#x}")), ("size", len.to_string())]);
        Ok(())
    }

    /// Whether `[gpa, gpa + len)` touches a page the guest keeps private
    /// (its bytes must then reach no event, reply or log).
    pub fn range_is_private(&self, gpa: u64, len: usize) -> bool {
        !self.enforcer.protections().private.range_shared(gpa, len as u64)
    }
}
