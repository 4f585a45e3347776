//! The VM's state as the API reports it. The VMM thread (`vmm.rs`) owns the
//! lifecycle; whether a running VM is paused is the run control's
//! (`cpu/run_control.rs`), and `Vmm::state` combines the two.

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
