//! Bridges the API server thread to the VMM thread.

use std::os::unix::net::UnixListener;

use vmm_sys_util::eventfd::EventFd;

use crate::vmm::{Vmm, VmmError};

pub(crate) struct ApiEndpoint;

impl ApiEndpoint {
    pub(crate) fn drain(&self, _vmm: &mut Vmm) {}
}

pub(crate) fn start(_listener: UnixListener) -> Result<(ApiEndpoint, EventFd), VmmError> {
    let wake = EventFd::new(libc::EFD_NONBLOCK).map_err(VmmError::EventLoop)?;
    Ok((ApiEndpoint, wake))
}
