//! The VM's lifecycle state, owned by the VMM thread (`vmm.rs`).

/// Lifecycle state, spelled as Cloud Hypervisor's `vm.info` does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VmState {
    Created,
    Running,
    Paused,
    Shutdown,
}

impl VmState {
    pub fn as_str(self) -> &'static str {
        match self {
            VmState::Created => "Created",
            VmState::Running => "Running",
            VmState::Paused => "Paused",
            VmState::Shutdown => "Shutdown",
        }
    }
}
