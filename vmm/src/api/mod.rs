//! The REST API: Cloud Hypervisor's paths and semantics over HTTP/1.1 on a
//! Unix socket. The server runs on its own thread; each request travels to
//! the VMM thread as an `ApiMessage` (mpsc + eventfd) and waits for the reply.

pub mod fd_stream;
pub mod hotplug;
mod routes;
mod server;
mod socket;

use thiserror::Error;

use crate::config::VmConfig;

pub use routes::{Dialect, ROUTES, Resolved, Route, resolve};
pub use server::{
    ERROR_CHAIN_HEAD, ServerLimits, TIMEOUT_ENV, drain_connections, start_api_server, start_api_server_with,
};
pub use socket::{ApiServerError, bind_api_socket};

/// A request for the VMM thread.
#[derive(Debug)]
pub enum ApiRequest {
    VmmPing,
    VmmShutdown,
    VmCreate(Box<VmConfig>),
    VmBoot,
    VmShutdown,
    VmReboot,
    VmPause,
    VmResume,
    VmPowerButton,
    VmDelete,
    VmInfo,
    VmCounters,
    VmHeki,
    VmHekiProtect(serde_json::Value),
    VmHekiPolicy(heki::Policy),
    VmHekiViolations,
    VmHekiPin(serde_json::Value),
    VmAddDisk(Box<crate::config::DiskConfig>),
    VmAddNet(Box<hotplug::NetRequest>),
    VmAddFs(Box<crate::config::FsConfig>),
    VmAddVsock(Box<crate::config::VsockConfig>),
    VmRemoveDevice(String),
    VmResize(hotplug::ResizeRequest),
}

/// `Some(json)` answers 200 with a body, `None` answers 204.
pub type ApiResult = Result<Option<serde_json::Value>, ApiError>;

/// A request the VMM refused or failed. The message may hold several causes,
/// one per line, from the outside in; the server sends each line as one
/// string of the error chain.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum ApiError {
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    NotFound(String),
    /// Not possible in the VM's current state (pause a VM that is not
    /// running, create a second VM, change an immutable page).
    #[error("{0}")]
    Conflict(String),
    /// The endpoint exists but Hekivisor lacks what it needs (no such device yet).
    #[error("{0}")]
    NotImplemented(String),
    #[error("{0}")]
    Internal(String),
}

impl ApiError {
    /// The one place errors become HTTP status codes.
    ///
    /// A state conflict answers as the endpoint's owner would: Cloud
    /// Hypervisor's endpoints say 500, as Cloud Hypervisor does (its
    /// `ch-remote` names 400, 404, 429, 500 and 501 and nothing else, and
    /// clients written against it see the same answer from us); our own
    /// endpoints say 409. The message says which state was wrong either way.
    pub fn status(&self, dialect: Dialect) -> u16 {
        match self {
            ApiError::BadRequest(_) => 400,
            ApiError::NotFound(_) => 404,
            ApiError::Conflict(_) => match dialect {
                Dialect::CloudHypervisor => 500,
                Dialect::Hekivisor => 409,
            },
            ApiError::NotImplemented(_) => 501,
            ApiError::Internal(_) => 500,
        }
    }
}

pub struct ApiMessage {
    pub request: ApiRequest,
    pub reply: tokio::sync::oneshot::Sender<ApiResult>,
}

#[cfg(test)]
mod tests;
