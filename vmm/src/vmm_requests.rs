//! The VMM as the API's `RequestHandler`: each request becomes a lifecycle
//! action on the VMM thread, and the VMM's errors become API errors here.

use serde_json::Value;

use crate::api::{ApiError, ApiRequest, ApiResult};
use crate::api_handler::RequestHandler;
use crate::config::VmConfig;
use crate::errors::error_lines;
use crate::vmm::{VmState, Vmm, VmmError};

fn internal(e: VmmError) -> ApiError {
    ApiError::Internal(error_lines(&e))
}

impl RequestHandler for Vmm {
    fn vm_state(&self) -> Option<VmState> {
        self.config.as_ref().map(|_| self.state())
    }

    fn vm_config(&self) -> Option<&VmConfig> {
        self.config.as_ref()
    }

    fn hotplugged_memory(&self) -> u64 {
        self.vm.as_ref().map_or(0, |vm| vm.hotplugged_memory())
    }

    fn create_vm(&mut self, config: VmConfig) {
        self.create(config);
        crate::events::emit("vm", "created", &[]);
    }

    fn boot_vm(&mut self) -> Result<(), ApiError> {
        self.boot().map_err(|e| match e {
            // A bad kernel path or image is the caller's mistake, not ours.
            VmmError::Vm(crate::vm::VmError::Boot(b)) => ApiError::BadRequest(error_lines(&b)),
            // So is asking for more huge pages than the host has reserved.
            VmmError::Vm(crate::vm::VmError::Memory(m)) if m.is_host_shortfall() => {
                ApiError::BadRequest(error_lines(&m))
            }
            other => internal(other),
        })
    }

    fn shutdown_vm(&mut self) {
        Vmm::shutdown_vm(self);
    }

    fn reboot_vm(&mut self) -> Result<(), ApiError> {
        self.reboot().map_err(internal)
    }

    fn pause_vm(&mut self) -> Result<(), ApiError> {
        self.pause().map_err(internal)
    }

    fn resume_vm(&mut self) {
        self.resume();
    }

    fn delete_vm(&mut self) {
        Vmm::shutdown_vm(self);
        self.config = None;
        self.console_pty = None;
        self.hotplug_fds.clear();
        self.state = VmState::Shutdown;
        crate::events::emit("vm", "deleted", &[]);
    }

    fn vm_counters(&self) -> Value {
        self.counters()
    }

    fn heki_request(&mut self, request: ApiRequest) -> ApiResult {
        let running = self.state() == VmState::Running;
        let vm = self.vm.as_ref();
        let context = crate::heki_api::HekiApiContext {
            config: self.config.as_mut().map(|c| &mut c.heki),
            runtime: vm.and_then(|vm| vm.heki()).map(|rt| rt.as_ref()),
            running,
            vcpus: vm.map_or(0, |vm| vm.vcpu_count()),
            devices: vm.map(|vm| vm.device_counters()),
        };
        crate::heki_api::handle(context, request)
    }

    fn hotplug_request(&mut self, request: ApiRequest) -> ApiResult {
        crate::vmm_hotplug::handle(self, request)
    }

    fn shutdown_vmm(&mut self) {
        // The process exits after this: KVM may tear the VM down after it.
        hypervisor::tear_down_vms_in_background_on_this_thread();
        Vmm::shutdown_vm(self);
        self.exit_status = Some(Ok(0));
    }
}
