use kvm_ioctls::{Cap, Kvm};

use crate::cpuid::{CpuidEntry, from_kvm_cpuid};
use crate::error::{HypervisorError, Result, ioctl_err};
use crate::vm::Vm;

/// Overrides the KVM device path (tests use it to simulate a host without KVM).
pub const KVM_DEVICE_ENV: &str = "HEKIVISOR_KVM_DEVICE";

/// An open `/dev/kvm`.
pub struct Hypervisor {
    kvm: Kvm,
}

impl Hypervisor {
    /// Opens `/dev/kvm` (or `$HEKIVISOR_KVM_DEVICE`, for tests), turning the
    /// usual failures into messages a user can act on.
    pub fn new() -> Result<Self> {
        let path = std::env::var_os(KVM_DEVICE_ENV).unwrap_or_else(|| "/dev/kvm".into());
        let display = path.to_string_lossy().into_owned();
        let c_path = std::ffi::CString::new(path.into_encoded_bytes())
            .map_err(|_| HypervisorError::KvmMissing(display.clone()))?;
        let kvm = Kvm::new_with_path(&c_path).map_err(|e| match e.errno() {
            libc::ENOENT => HypervisorError::KvmMissing(display.clone()),
            libc::EACCES | libc::EPERM => HypervisorError::KvmPermission(display.clone()),
            errno => HypervisorError::KvmOpen(display.clone(), std::io::Error::from_raw_os_error(errno)),
        })?;
        // A file that is not the KVM device fails its first ioctl.
        let version = kvm.get_api_version();
        if version < 0 {
            return Err(HypervisorError::NotKvm(display));
        }
        if version != kvm_bindings::KVM_API_VERSION as i32 {
            return Err(HypervisorError::ApiVersion(version));
        }
        for (cap, name) in [
            (Cap::Irqchip, "KVM_CAP_IRQCHIP"),
            (Cap::UserMemory, "KVM_CAP_USER_MEMORY"),
            (Cap::SetTssAddr, "KVM_CAP_SET_TSS_ADDR"),
            (Cap::ExtCpuid, "KVM_CAP_EXT_CPUID"),
        ] {
            if !kvm.check_extension(cap) {
                return Err(HypervisorError::MissingCapability(name));
            }
        }
        Ok(Hypervisor { kvm })
    }

    /// Creates an empty VM.
    pub fn create_vm(&self) -> Result<Vm> {
        let fd = self.kvm.create_vm().map_err(ioctl_err("KVM_CREATE_VM"))?;
        Ok(Vm::new(fd, self.max_memslots(), self.kvm.check_extension(Cap::ReadonlyMem)))
    }

    /// The CPUID leaves KVM can present to a guest on this host.
    pub fn supported_cpuid(&self) -> Result<Vec<CpuidEntry>> {
        let cpuid = self
            .kvm
            .get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
            .map_err(ioctl_err("KVM_GET_SUPPORTED_CPUID"))?;
        Ok(from_kvm_cpuid(&cpuid))
    }

    /// How many memslots a VM may use (`KVM_CAP_NR_MEMSLOTS`).
    pub fn max_memslots(&self) -> usize {
        self.kvm.get_nr_memslots()
    }

    /// Whether read-only memslots work (`KVM_CAP_READONLY_MEM`): heki page
    /// protection depends on them.
    pub fn has_readonly_memory(&self) -> bool {
        self.kvm.check_extension(Cap::ReadonlyMem)
    }

    /// Whether MSR writes can be filtered to user space (`KVM_CAP_X86_MSR_FILTER`).
    pub fn has_msr_filter(&self) -> bool {
        self.kvm.check_extension(Cap::X86MsrFilter) && self.kvm.check_extension(Cap::X86UserSpaceMsr)
    }

    /// Whether `KVM_SET_GUEST_DEBUG` works (`KVM_CAP_SET_GUEST_DEBUG`):
    /// single-step and hardware breakpoints.
    pub fn has_guest_debug(&self) -> bool {
        self.kvm.check_extension(Cap::SetGuestDebug)
    }
}
