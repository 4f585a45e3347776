use thiserror::Error;

pub type Result<T> = std::result::Result<T, HypervisorError>;

/// Failures of KVM operations, each naming the operation.
#[derive(Debug, Error)]
pub enum HypervisorError {
    #[error(
        "/dev/kvm does not exist: KVM is not available on this host (load the kvm module, or run on a machine with virtualization)"
    )]
    KvmMissing,
    #[error("permission denied opening /dev/kvm: add your user to the 'kvm' group or run as root")]
    KvmPermission,
    #[error("cannot open /dev/kvm")]
    KvmOpen(#[source] std::io::Error),
    #[error("unsupported KVM API version {0} (expected 12)")]
    ApiVersion(i32),
    #[error("KVM lacks a required capability: {0}")]
    MissingCapability(&'static str),
    #[error("KVM ioctl {op} failed")]
    Ioctl {
        op: &'static str,
        #[source]
        source: std::io::Error,
    },
}

/// Wraps a kvm-ioctls error with the name of the operation that failed.
pub(crate) fn ioctl_err(
    op: &'static str,
) -> impl FnOnce(vmm_sys_util::errno::Error) -> HypervisorError {
    move |e| HypervisorError::Ioctl {
        op,
        source: std::io::Error::from_raw_os_error(e.errno()),
    }
}
