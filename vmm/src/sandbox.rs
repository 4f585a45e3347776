//! landlock: the VMM keeps access to the files its VM configuration names,
//! and to nothing else.
//!
//! `restrict` runs on the VMM thread just before the first VM is built
//! (`landlock_enable`). landlock binds the calling thread and the threads it
//! starts later: the vCPUs, device workers, the CR checker and stdin. The
//! threads started before it (event monitor, API server, signal handler)
//! are not bound, but their seccomp filters forbid `open` altogether; only
//! the VMM thread may open files, and it is bound.
//!
//! Allowed, for reboots and for the VMM's own exit: the kernel and initramfs
//! (read), each disk (read, and write unless read-only), the rng source
//! (read), the serial and console files (write, truncate), `/dev/net/tun`
//! for a TAP opened by name (read, write, ioctl), each virtio-fs backend's
//! socket (read, write), removing the API socket at exit, and each
//! `landlock_rules` entry.

use std::path::{Path, PathBuf};

use landlock::{
    ABI, Access, AccessFs, BitFlags, PathBeneath, PathFd, Ruleset, RulesetAttr, RulesetCreatedAttr, RulesetStatus,
};
use thiserror::Error;

use crate::config::{ConsoleOutputMode, VmConfig};

/// The newest landlock ABI we know; older kernels get what they support.
const ABI_VERSION: ABI = ABI::V5;

#[derive(Debug, Error)]
pub enum SandboxError {
    #[error("landlock rule for {path}")]
    Rule {
        path: PathBuf,
        #[source]
        source: landlock::RulesetError,
    },
    #[error("cannot open {path} for a landlock rule")]
    Open {
        path: PathBuf,
        #[source]
        source: landlock::PathFdError,
    },
    #[error("cannot create the landlock ruleset")]
    Ruleset(#[source] landlock::RulesetError),
    #[error("cannot prepare {path} for landlock")]
    Prepare {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("landlock is not supported by this kernel; refusing to run without it (--landlock was asked for)")]
    NotEnforced,
}

/// What a path may be used for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Use {
    Read,
    Write,
    ReadWrite,
    /// A device node: read, write and ioctl.
    Device,
    /// A directory where the VMM removes a file it created (the API socket).
    RemoveIn,
    /// A directory where the VMM creates (and replaces) a Unix socket (vsock).
    SocketIn,
}

impl Use {
    fn access(self, is_dir: bool) -> BitFlags<AccessFs> {
        let abi = ABI_VERSION;
        let file_only = AccessFs::from_file(abi);
        let wanted = match self {
            Use::Read => AccessFs::from_read(abi),
            Use::Write => AccessFs::from_write(abi),
            Use::ReadWrite | Use::Device => AccessFs::from_all(abi),
            Use::RemoveIn => BitFlags::from(AccessFs::RemoveFile),
            Use::SocketIn => AccessFs::MakeSock | AccessFs::RemoveFile,
        };
        if is_dir { wanted } else { wanted & file_only }
    }
}

/// The (path, use) pairs `config` needs; `api_socket` is the socket file to remove at exit.
pub fn rules(config: &VmConfig, api_socket: Option<&Path>) -> Vec<(PathBuf, Use)> {
    let mut rules = Vec::new();
    if let Some(payload) = &config.payload {
        rules.extend(payload.kernel.iter().chain(payload.initramfs.iter()).map(|p| (p.clone(), Use::Read)));
    }
    for disk in config.disks.iter().flatten() {
        rules.push((disk.path.clone(), if disk.readonly { Use::Read } else { Use::ReadWrite }));
    }
    if let Some(rng) = &config.rng {
        rules.push((rng.src.clone(), Use::Read));
    }
    for console in [&config.serial, &config.console] {
        if console.mode == ConsoleOutputMode::File
            && let Some(file) = &console.file
        {
            rules.push((file.clone(), Use::Write));
        }
    }
    // A vhost-user backend's socket, connected to again at each reboot.
    for share in config.fs.iter().flatten() {
        rules.push((share.socket.clone(), Use::ReadWrite));
    }
    if config.net.iter().flatten().any(|n| n.fds.is_none()) {
        rules.push((PathBuf::from("/dev/net/tun"), Use::Device));
    }
    if let Some(dir) = config.vsock.as_ref().and_then(|v| v.socket.parent()) {
        // A rebuilt VM (reboot) binds its socket again.
        rules.push((dir.to_path_buf(), Use::SocketIn));
    }
    if let Some(dir) = api_socket.and_then(Path::parent) {
        rules.push((dir.to_path_buf(), Use::RemoveIn));
    }
    for rule in config.landlock_rules.iter().flatten() {
        let how = match rule.access.as_str() {
            "r" => Use::Read,
            "w" => Use::Write,
            _ => Use::ReadWrite,
        };
        rules.push((rule.path.clone(), how));
    }
    rules
}

/// Restricts the calling thread (and the threads it starts) to `rules`.
/// Output files that do not exist yet are created first, so a rule can name them.
pub fn restrict(rules: &[(PathBuf, Use)]) -> Result<(), SandboxError> {
    let mut ruleset = Ruleset::default()
        .handle_access(AccessFs::from_all(ABI_VERSION))
        .and_then(|r| r.create())
        .map_err(SandboxError::Ruleset)?;
    for (path, how) in rules {
        if *how == Use::Write && !path.exists() {
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .map_err(|source| SandboxError::Prepare { path: path.clone(), source })?;
        }
        let fd = PathFd::new(path).map_err(|source| SandboxError::Open { path: path.clone(), source })?;
        let access = how.access(path.is_dir());
        ruleset = ruleset
            .add_rule(PathBeneath::new(fd, access))
            .map_err(|source| SandboxError::Rule { path: path.clone(), source })?;
    }
    let status = ruleset.restrict_self().map_err(SandboxError::Ruleset)?;
    if status.ruleset == RulesetStatus::NotEnforced {
        return Err(SandboxError::NotEnforced);
    }
    log::info!("landlock: {} rules, {:?}", rules.len(), status.ruleset);
    Ok(())
}
