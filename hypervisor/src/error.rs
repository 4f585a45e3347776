use thiserror::Error;

pub type Result<T> = std::result::Result<T, HypervisorError>;

/// Failures of KVM operations, each naming the operation.
#[derive(Debug, Error)]
pub enum HypervisorError {
    #[error(
        "{0} does not exist: KVM is not available on this host (load the kvm module, or use a machine with virtualization enabled)"
    )]
    KvmMissing(String),
    #[error("permission denied opening {0}: add your user to the 'kvm' group or run as root")]
    KvmPermission(String),
    #[error("cannot open {0}")]
    KvmOpen(String, #[source] std::io::Error),
    #[error("{0} is not a usable KVM device")]
    NotKvm(String),
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
pub(crate) fn ioctl_err(op: &'static str) -> impl FnOnce(vmm_sys_util::errno::Error) -> HypervisorError {
    move |e| HypervisorError::Ioctl { op, source: std::io::Error::from_raw_os_error(e.errno()) }
}
