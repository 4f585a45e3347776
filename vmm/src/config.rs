//! VM configuration: one `VmConfig`, built either from CLI flags or from the
//! REST API's JSON, so the two cannot drift. Field names follow Cloud Hypervisor.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

pub const DEFAULT_VCPUS: u8 = 1;
pub const DEFAULT_MEMORY_SIZE: u64 = 512 << 20;
pub const DEFAULT_CR_CHECK_INTERVAL_MS: u64 = 10;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CpusConfig {
    pub boot_vcpus: u8,
    pub max_vcpus: u8,
}

impl Default for CpusConfig {
    fn default() -> Self {
        CpusConfig {
            boot_vcpus: DEFAULT_VCPUS,
            max_vcpus: DEFAULT_VCPUS,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MemoryConfig {
    /// Guest RAM in bytes.
    pub size: u64,
}

impl Default for MemoryConfig {
    fn default() -> Self {
        MemoryConfig {
            size: DEFAULT_MEMORY_SIZE,
        }
    }
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PayloadConfig {
    pub kernel: Option<PathBuf>,
    pub cmdline: Option<String>,
    pub initramfs: Option<PathBuf>,
}

/// Where a console's output goes (Cloud Hypervisor's spelling).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum ConsoleOutputMode {
    Off,
    #[default]
    Null,
    Tty,
    File,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConsoleConfig {
    pub mode: ConsoleOutputMode,
    pub file: Option<PathBuf>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HekiConfig {
    pub enabled: bool,
    pub policy: heki::Policy,
    pub cr_check_interval_ms: u64,
}

impl Default for HekiConfig {
    fn default() -> Self {
        HekiConfig {
            enabled: false,
            policy: heki::Policy::Deny,
            cr_check_interval_ms: DEFAULT_CR_CHECK_INTERVAL_MS,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmConfig {
    pub cpus: CpusConfig,
    pub memory: MemoryConfig,
    pub payload: Option<PayloadConfig>,
    pub serial: ConsoleConfig,
    pub console: ConsoleConfig,
    pub heki: HekiConfig,
}

impl Default for VmConfig {
    fn default() -> Self {
        VmConfig {
            cpus: CpusConfig::default(),
            memory: MemoryConfig::default(),
            payload: None,
            serial: ConsoleConfig {
                mode: ConsoleOutputMode::Tty,
                file: None,
            },
            console: ConsoleConfig {
                mode: ConsoleOutputMode::Off,
                file: None,
            },
            heki: HekiConfig::default(),
        }
    }
}
