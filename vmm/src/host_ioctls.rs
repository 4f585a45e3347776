//! Host ioctl request numbers the VMM issues outside KVM (KVM's are in
//! `hypervisor::ioctl_numbers`): used by the code that issues them and by
//! the seccomp allow-lists, which sit below the devices.

/// `TUNSETIFF`: attach to (or create) a TAP by name.
pub const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
/// `TUNGETIFF`: the name of a TAP passed in as a file descriptor.
pub const TUNGETIFF: libc::c_ulong = 0x8004_54d2;

/// The ioctls that open and configure a TAP (for the VMM thread's seccomp filter).
pub const TAP_SETUP_IOCTLS: [libc::c_ulong; 6] =
    [TUNSETIFF, TUNGETIFF, libc::SIOCSIFADDR, libc::SIOCSIFNETMASK, libc::SIOCGIFFLAGS, libc::SIOCSIFFLAGS];
