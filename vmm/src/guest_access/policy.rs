//! The question the guest-access layer asks before a device touches guest
//! memory, in the spirit of vm-memory's `Iommu`: the policy owner (heki's
//! enforcer) answers, and the layer never names it.

use super::epoch::AccessEpoch;

/// One device access of `[gpa, gpa + len)`, by the accessor named `accessor`.
#[derive(Clone, Copy, Debug)]
pub struct DeviceAccess<'a> {
    pub accessor: &'a str,
    pub gpa: u64,
    pub len: u64,
    pub write: bool,
}

/// A policy's answer to one device access.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    /// The access must not happen (the policy has already reported it).
    Refuse,
    /// The access may happen; with `whole_page`, any write to the same page
    /// may until the next change of the epoch, so the layer can remember it.
    Allow { whole_page: bool },
}

impl Decision {
    pub fn allows(self) -> bool {
        matches!(self, Decision::Allow { .. })
    }
}

/// What decides which device accesses of guest memory may happen.
pub trait AccessPolicy: Send + Sync {
    /// The epoch that this policy's changes go through: a change waits for
    /// every access judged under the previous answers.
    fn epoch(&self) -> &AccessEpoch;

    /// Judges an access, reporting a refusal (or an allowed violation) itself.
    /// Called with the epoch held, so the answer stands until the copy is done.
    fn judge(&self, access: DeviceAccess<'_>) -> Decision;

    /// Whether the access would be allowed, without reporting anything
    /// (vm-memory's `check_range`).
    fn permits(&self, gpa: u64, len: u64, write: bool) -> bool;
}
