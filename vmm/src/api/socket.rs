//! Binding the API socket: mode 0600, stale sockets replaced, live ones refused.

use std::os::fd::FromRawFd;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

use thiserror::Error;

use crate::config::ApiSocketSpec;

#[derive(Debug, Error)]
pub enum ApiServerError {
    #[error("API socket {0} is in use by a running process (another hekivisor?)")]
    InUse(PathBuf),
    #[error("{0} exists and is not a socket; refusing to replace it")]
    NotASocket(PathBuf),
    #[error("cannot create API socket {path}")]
    Bind {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("API socket fd {0} is not an open listening socket")]
    BadFd(i32),
}

pub fn bind_api_socket(spec: &ApiSocketSpec) -> Result<UnixListener, ApiServerError> {
    match spec {
        ApiSocketSpec::Path(path) => bind_path(path),
        ApiSocketSpec::Fd(fd) => {
            // SAFETY: fcntl(F_GETFD) only queries the descriptor.
            if unsafe { libc::fcntl(*fd, libc::F_GETFD) } < 0 {
                return Err(ApiServerError::BadFd(*fd));
            }
            // SAFETY: the fd is open and was handed to us to serve the API on.
            Ok(unsafe { UnixListener::from_raw_fd(*fd) })
        }
    }
}

fn bind_path(path: &Path) -> Result<UnixListener, ApiServerError> {
    use std::os::unix::fs::FileTypeExt;
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if !meta.file_type().is_socket() {
            return Err(ApiServerError::NotASocket(path.to_path_buf()));
        }
        if UnixStream::connect(path).is_ok() {
            return Err(ApiServerError::InUse(path.to_path_buf()));
        }
        // Nobody listens: a leftover from a process that died.
        let _ = std::fs::remove_file(path);
    }
    let bind_err = |source| ApiServerError::Bind { path: path.to_path_buf(), source };
    // Create with 0600 from the start: no window where others can connect.
    // SAFETY: umask only changes this process's file creation mask.
    let old = unsafe { libc::umask(0o177) };
    let bound = UnixListener::bind(path);
    // SAFETY: restores the previous mask.
    unsafe { libc::umask(old) };
    let listener = bound.map_err(bind_err)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(bind_err)?;
    Ok(listener)
}
