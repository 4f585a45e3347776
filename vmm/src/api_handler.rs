//! The VMM-thread side of the REST API: turns requests into lifecycle actions.

use std::os::unix::net::UnixListener;
use std::sync::mpsc::{Receiver, channel};

use serde_json::json;
use vmm_sys_util::eventfd::EventFd;

use crate::api::{ApiError, ApiMessage, ApiRequest, ApiResult};
use crate::vmm::{VmState, Vmm, VmmError};

pub(crate) struct ApiEndpoint {
    requests: Receiver<ApiMessage>,
}

/// Starts the HTTP server thread; returns the receiving end and its wake fd.
pub(crate) fn start(listener: UnixListener) -> Result<(ApiEndpoint, EventFd), VmmError> {
    let wake = EventFd::new(libc::EFD_NONBLOCK).map_err(VmmError::EventLoop)?;
    let (tx, rx) = channel();
    let server_wake = wake.try_clone().map_err(VmmError::EventLoop)?;
    crate::api::start_api_server(listener, tx, server_wake).map_err(VmmError::EventLoop)?;
    Ok((ApiEndpoint { requests: rx }, wake))
}

impl ApiEndpoint {
    /// Answers every queued request.
    pub(crate) fn drain(&self, vmm: &mut Vmm) {
        while let Ok(message) = self.requests.try_recv() {
            let result = handle(vmm, message.request);
            // The client may have gone away; nothing to do then.
            let _ = message.reply.send(result);
        }
    }
}

fn no_vm() -> ApiError {
    ApiError::NotFound("no VM has been created".into())
}

fn conflict(action: &str, state: VmState) -> ApiError {
    ApiError::Conflict(format!("cannot {action} a VM in state {}", state.as_str()))
}

fn handle(vmm: &mut Vmm, request: ApiRequest) -> ApiResult {
    match request {
        ApiRequest::VmmPing => Ok(Some(json!({
            "build_version": env!("CARGO_PKG_VERSION"),
            "version": env!("CARGO_PKG_VERSION"),
            "pid": std::process::id(),
            "features": ["heki"],
        }))),
        ApiRequest::VmmShutdown => {
            vmm.shutdown_vm();
            vmm.exit_status = Some(Ok(0));
            Ok(None)
        }
        ApiRequest::VmCreate(config) => {
            if vmm.config.is_some() {
                return Err(ApiError::Conflict("a VM already exists; delete it first".into()));
            }
            vmm.create(*config);
            crate::events::emit("vm", "created", &[]);
            Ok(None)
        }
        ApiRequest::VmBoot => match current_state(vmm)? {
            VmState::Created | VmState::Shutdown => boot(vmm),
            state => Err(conflict("boot", state)),
        },
        ApiRequest::VmShutdown => match current_state(vmm)? {
            VmState::Running | VmState::Paused => {
                vmm.shutdown_vm();
                Ok(None)
            }
            state => Err(conflict("shut down", state)),
        },
        ApiRequest::VmReboot => match current_state(vmm)? {
            VmState::Running | VmState::Paused => vmm.reboot().map(|_| None).map_err(internal),
            state => Err(conflict("reboot", state)),
        },
        ApiRequest::VmPause => match current_state(vmm)? {
            VmState::Running => vmm.pause().map(|_| None).map_err(internal),
            state => Err(conflict("pause", state)),
        },
        ApiRequest::VmResume => match current_state(vmm)? {
            VmState::Paused => {
                vmm.resume();
                Ok(None)
            }
            state => Err(conflict("resume", state)),
        },
        ApiRequest::VmPowerButton => match current_state(vmm)? {
            // No ACPI power button device yet: the guest cannot be asked, so say so.
            VmState::Running => {
                Err(ApiError::NotImplemented("the guest has no ACPI power button device yet; use vm.shutdown".into()))
            }
            state => Err(conflict("press the power button of", state)),
        },
        ApiRequest::VmDelete => {
            current_state(vmm)?;
            vmm.shutdown_vm();
            vmm.config = None;
            vmm.console_pty = None;
            vmm.state = VmState::Shutdown;
            crate::events::emit("vm", "deleted", &[]);
            Ok(None)
        }
        ApiRequest::VmInfo => {
            let state = current_state(vmm)?;
            let config = vmm.config.as_ref().ok_or_else(no_vm)?;
            Ok(Some(json!({
                // Every Cloud Hypervisor section and field, as its vm.info reports them.
                "config": crate::config::to_cloud_hypervisor_json(config),
                "state": state.as_str(),
                "memory_actual_size": config.memory.size,
            })))
        }
        ApiRequest::VmCounters => {
            current_state(vmm)?;
            Ok(Some(vmm.counters()))
        }
        ApiRequest::VmHeki
        | ApiRequest::VmHekiProtect(_)
        | ApiRequest::VmHekiPolicy(_)
        | ApiRequest::VmHekiViolations
        | ApiRequest::VmHekiPin(_) => {
            let running = vmm.state == VmState::Running;
            let vm = vmm.vm.as_ref();
            let context = crate::heki::api::HekiApiContext {
                config: vmm.config.as_mut().map(|c| &mut c.heki),
                runtime: vm.and_then(|vm| vm.heki()).map(|rt| rt.as_ref()),
                running,
                vcpus: vm.map_or(0, |vm| vm.vcpu_count()),
                devices: vm.map(|vm| vm.device_counters()),
            };
            crate::heki::api::handle(context, request)
        }
    }
}

fn current_state(vmm: &Vmm) -> Result<VmState, ApiError> {
    if vmm.config.is_none() {
        return Err(no_vm());
    }
    Ok(vmm.state)
}

fn boot(vmm: &mut Vmm) -> ApiResult {
    vmm.boot().map(|_| None).map_err(|e| match e {
        // A bad kernel path or image is the caller's mistake, not ours.
        VmmError::Vm(crate::vm::VmError::Boot(b)) => ApiError::BadRequest(error_lines(&b)),
        other => internal(other),
    })
}

fn internal(e: VmmError) -> ApiError {
    ApiError::Internal(error_lines(&e))
}

/// An error and its causes, one per line: the API sends each line as one
/// string of its error chain.
fn error_lines(e: &dyn std::error::Error) -> String {
    let mut message = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        message.push('\n');
        message.push_str(&cause.to_string());
        source = cause.source();
    }
    message
}

/// An error with its causes, for messages that leave the process.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut message = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        message.push_str(": ");
        message.push_str(&cause.to_string());
        source = cause.source();
    }
    message
}
