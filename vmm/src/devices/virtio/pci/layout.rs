//! BAR 0 of a virtio PCI function: where each virtio structure sits.

pub const BAR_SIZE: u64 = 0x4000;
/// virtio_pci_common_cfg.
pub const COMMON: u64 = 0x0000;
/// Queue notify registers, `NOTIFY_MULTIPLIER` bytes apart.
pub const NOTIFY: u64 = 0x1000;
pub const ISR: u64 = 0x2000;
pub const DEVICE_CONFIG: u64 = 0x3000;
/// MSI-X table and pending-bit array, after the device configuration.
pub const MSIX_TABLE: u64 = 0x3800;
pub const MSIX_PBA: u64 = 0x3c00;
pub const NOTIFY_MULTIPLIER: u32 = 4;
/// The device configuration the transport keeps (up to the MSI-X table).
pub const DEVICE_CONFIG_SIZE: usize = (MSIX_TABLE - DEVICE_CONFIG) as usize;

/// The guest address of queue `index`'s notify register.
pub fn notify_address(bar: u64, index: usize) -> u64 {
    let offset = (index as u64).saturating_mul(u64::from(NOTIFY_MULTIPLIER));
    bar.saturating_add(NOTIFY).saturating_add(offset)
}

/// The queue a write at `offset` (from NOTIFY) notifies.
pub fn notified_queue(offset: u64) -> usize {
    usize::try_from(offset >> NOTIFY_MULTIPLIER.trailing_zeros()).unwrap_or(usize::MAX)
}
