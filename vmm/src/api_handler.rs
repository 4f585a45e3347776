//! The VMM-thread side of the REST API: turns requests into lifecycle
//! actions through `RequestHandler`, which the VMM implements
//! (`vmm_requests.rs`), so this module knows the API and the lifecycle
//! rules but not the VMM's insides.

use std::os::unix::net::UnixListener;
use std::sync::mpsc::{Receiver, channel};

use serde_json::{Value, json};
use vmm_sys_util::eventfd::EventFd;

use crate::api::{ApiError, ApiMessage, ApiRequest, ApiResult};
use crate::config::VmConfig;
use crate::vm_state::VmState;

/// What the API asks of the VMM. Each call runs on the VMM thread.
pub(crate) trait RequestHandler {
    /// The VM's state; `None` while no VM was created.
    fn vm_state(&self) -> Option<VmState>;
    fn vm_config(&self) -> Option<&VmConfig>;
    /// Bytes of memory plugged into the running VM since its boot.
    fn hotplugged_memory(&self) -> u64;
    /// Records a configuration (state Created).
    fn create_vm(&mut self, config: VmConfig);
    fn boot_vm(&mut self) -> Result<(), ApiError>;
    /// Stops the VM; its configuration stays.
    fn shutdown_vm(&mut self);
    fn reboot_vm(&mut self) -> Result<(), ApiError>;
    fn pause_vm(&mut self) -> Result<(), ApiError>;
    fn resume_vm(&mut self);
    /// Stops the VM and forgets its configuration.
    fn delete_vm(&mut self);
    fn vm_counters(&self) -> Value;
    /// The `vm.heki*` endpoints.
    fn heki_request(&mut self, request: ApiRequest) -> ApiResult;
    /// `vm.add-*`, `vm.remove-device` and `vm.resize` (a VM exists).
    fn hotplug_request(&mut self, request: ApiRequest) -> ApiResult;
    /// Ends the VMM process (after shutting the VM down).
    fn shutdown_vmm(&mut self);
}

pub(crate) struct ApiEndpoint {
    requests: Receiver<ApiMessage>,
}

/// Starts the HTTP server thread; returns the receiving end and its wake fd.
pub(crate) fn start(listener: UnixListener) -> std::io::Result<(ApiEndpoint, EventFd)> {
    let wake = EventFd::new(libc::EFD_NONBLOCK)?;
    let (tx, rx) = channel();
    let server_wake = wake.try_clone()?;
    crate::api::start_api_server(listener, tx, server_wake)?;
    Ok((ApiEndpoint { requests: rx }, wake))
}

impl ApiEndpoint {
    /// Answers every queued request.
    pub(crate) fn drain(&self, handler: &mut dyn RequestHandler) {
        while let Ok(message) = self.requests.try_recv() {
            let result = handle(handler, message.request);
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

fn current_state(handler: &dyn RequestHandler) -> Result<VmState, ApiError> {
    handler.vm_state().ok_or_else(no_vm)
}

fn handle(vmm: &mut dyn RequestHandler, request: ApiRequest) -> ApiResult {
    match request {
        ApiRequest::VmmPing => Ok(Some(json!({
            "build_version": env!("CARGO_PKG_VERSION"),
            "version": env!("CARGO_PKG_VERSION"),
            "pid": std::process::id(),
            "features": ["heki"],
        }))),
        ApiRequest::VmmShutdown => {
            vmm.shutdown_vmm();
            Ok(None)
        }
        ApiRequest::VmCreate(config) => {
            if vmm.vm_state().is_some() {
                return Err(ApiError::Conflict("a VM already exists; delete it first".into()));
            }
            vmm.create_vm(*config);
            Ok(None)
        }
        ApiRequest::VmBoot => match current_state(vmm)? {
            VmState::Created | VmState::Shutdown => vmm.boot_vm().map(|_| None),
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
            VmState::Running | VmState::Paused => vmm.reboot_vm().map(|_| None),
            state => Err(conflict("reboot", state)),
        },
        ApiRequest::VmPause => match current_state(vmm)? {
            VmState::Running => vmm.pause_vm().map(|_| None),
            state => Err(conflict("pause", state)),
        },
        ApiRequest::VmResume => match current_state(vmm)? {
            VmState::Paused => {
                vmm.resume_vm();
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
            vmm.delete_vm();
            Ok(None)
        }
        ApiRequest::VmInfo => {
            let state = current_state(vmm)?;
            let config = vmm.vm_config().ok_or_else(no_vm)?;
            let mut reported = crate::config::to_cloud_hypervisor_json(config);
            crate::memory::report_memory_in_force(config, &mut reported);
            // Memory plugged in since boot, as Cloud Hypervisor reports it.
            let hotplugged = vmm.hotplugged_memory();
            if hotplugged > 0 {
                reported["memory"]["hotplugged_size"] = json!(hotplugged);
            }
            Ok(Some(json!({
                // Every Cloud Hypervisor section and field, as its vm.info reports them.
                "config": reported,
                "state": state.as_str(),
                "memory_actual_size": config.memory.size + hotplugged,
                // Hekivisor's own: where the hotplug window lies (null without one).
                "memory_hotplug_window": crate::memory::hotplug_window(config),
            })))
        }
        ApiRequest::VmCounters => {
            current_state(vmm)?;
            Ok(Some(vmm.vm_counters()))
        }
        request @ (ApiRequest::VmHeki
        | ApiRequest::VmHekiProtect(_)
        | ApiRequest::VmHekiPolicy(_)
        | ApiRequest::VmHekiViolations
        | ApiRequest::VmHekiPin(_)) => vmm.heki_request(request),
        request @ (ApiRequest::VmAddDisk(_)
        | ApiRequest::VmAddNet(_)
        | ApiRequest::VmAddFs(_)
        | ApiRequest::VmAddVsock(_)
        | ApiRequest::VmRemoveDevice(_)
        | ApiRequest::VmResize(_)) => {
            current_state(vmm)?;
            vmm.hotplug_request(request)
        }
    }
}
