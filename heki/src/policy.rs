//! What the VMM does when the guest breaks a protection.

use serde::{Deserialize, Serialize};

/// The per-VM response to a heki violation.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Policy {
    /// Drop the forbidden write and let the guest continue.
    #[default]
    Deny,
    /// Audit mode: perform the write and report it.
    Log,
    /// Drop the write and pause the VM for inspection.
    Pause,
    /// Drop the write and stop the VM.
    Shutdown,
}

impl Policy {
    /// The name used on the CLI, in JSON and in events.
    pub fn as_str(self) -> &'static str {
        match self {
            Policy::Deny => "deny",
            Policy::Log => "log",
            Policy::Pause => "pause",
            Policy::Shutdown => "shutdown",
        }
    }

    /// Whether the forbidden access is carried out anyway.
    pub fn performs_access(self) -> bool {
        self == Policy::Log
    }
}

impl std::str::FromStr for Policy {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "deny" => Ok(Policy::Deny),
            "log" => Ok(Policy::Log),
            "pause" => Ok(Policy::Pause),
            "shutdown" => Ok(Policy::Shutdown),
            other => Err(format!("unknown heki policy '{other}' (expected deny, log, pause or shutdown)")),
        }
    }
}
