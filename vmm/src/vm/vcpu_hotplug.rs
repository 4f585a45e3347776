//! vCPUs added and removed while the VM runs (`vm.resize`), through ACPI
//! CPU hotplug (`devices/cpu_hotplug.rs`, `acpi_cpu_hotplug.rs`).
//!
//! Added: the vCPU is created as at boot (`cpu/setup.rs`), or a parked one
//! restarts, and waits for the INIT and SIPI with which the guest brings it
//! up after the device check. Removed (highest first): the guest is asked to
//! eject it, and only after its eject is the vCPU parked out of the guest
//! (`cpu/parking.rs`) and its heki pins forgotten. vCPUs `0..live` are
//! always the ones the guest has.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use vmm_sys_util::eventfd::EventFd;

use super::{Vm, VmError};
use crate::config::VmConfig;
use crate::cpu::{VcpuSetup, run_vcpu};
use crate::devices::PioBus;
use crate::devices::hotplug_slots::{HotplugSlotPorts, HotplugSlots};
use crate::layout::ports;

/// The controller on the port bus, its interrupt on the GED's line.
pub(super) fn install(
    kvm_vm: &hypervisor::Vm,
    config: &VmConfig,
    pio: &mut PioBus,
) -> Result<Arc<HotplugSlots>, VmError> {
    let interrupt = EventFd::new(libc::EFD_NONBLOCK).map_err(VmError::EventFd)?;
    kvm_vm.register_irqfd(&interrupt, ports::GED_IRQ)?;
    let controller = Arc::new(HotplugSlots::new(
        "vCPU",
        u32::from(config.cpus.boot_vcpus),
        u32::from(config.cpus.max_vcpus),
        interrupt,
    ));
    pio.insert(
        ports::CPU_HOTPLUG,
        ports::CPU_HOTPLUG_LEN,
        Arc::new(std::sync::Mutex::new(HotplugSlotPorts(controller.clone()))),
    );
    Ok(controller)
}

/// Which vCPUs exist and how to make more.
pub(super) struct VcpuSlots {
    setup: VcpuSetup,
    controller: Arc<HotplugSlots>,
    /// vCPUs with a KVM fd and a thread (running or parked).
    created: u8,
    /// vCPUs the guest has: `0..live`.
    live: u8,
}

impl VcpuSlots {
    pub(super) fn new(setup: VcpuSetup, controller: Arc<HotplugSlots>, boot: u8) -> VcpuSlots {
        VcpuSlots { setup, controller, created: boot, live: boot }
    }

    pub(super) fn live(&self) -> u8 {
        self.live
    }

    pub(super) fn created(&self) -> u8 {
        self.created
    }
}

impl Vm {
    /// Starts vCPU `vcpu`'s thread.
    pub(super) fn spawn_vcpu(&mut self, vcpu: hypervisor::Vcpu) -> Result<(), VmError> {
        let ctx = self.ctx.clone();
        let (done, starter) = (self.vcpus_done.clone(), std::thread::current());
        let handle = std::thread::Builder::new()
            .name(format!("vcpu{}", vcpu.id()))
            .spawn(move || {
                crate::seccomp::apply_or_exit(crate::seccomp::ThreadKind::Vcpu);
                run_vcpu(vcpu, ctx);
                done.fetch_add(1, Ordering::Release);
                starter.unpark();
            })
            .map_err(VmError::SpawnVcpu)?;
        self.ctx.control.vcpus.register_thread(&handle);
        self.threads.push(handle);
        Ok(())
    }

    /// Gives the guest `target` vCPUs (1..=max_vcpus, checked by the caller).
    /// Adding returns once the guest is told; removing once the guest has
    /// ejected each vCPU, or with an error naming the one it kept.
    pub fn resize_vcpus(&mut self, target: u8, eject_timeout: Duration) -> Result<(), VmError> {
        while self.vcpus.live < target {
            let id = self.vcpus.live;
            if id < self.vcpus.created {
                self.ctx.parking.unpark(id);
            } else {
                let (vcpu, _) = self.vcpus.setup.create(&self.kvm_vm, id)?;
                self.spawn_vcpu(vcpu)?;
                self.vcpus.created = id + 1;
            }
            self.vcpus.live = id + 1;
            // The kernel that brings it up may be compromised by now: heki
            // pins it like vCPU 0 once it runs in long mode.
            if let Some(heki) = &self.heki {
                heki.pins().expect_inheritance(id);
            }
            log::info!("CPU hotplug: vCPU {id} added");
            crate::events::emit("vm", "vcpu-added", &[("vcpu", id.to_string())]);
            self.vcpus.controller.announce_added(u32::from(id));
        }
        while self.vcpus.live > target.max(1) {
            let id = self.vcpus.live - 1;
            if !self.vcpus.controller.request_eject(u32::from(id), eject_timeout) {
                return Err(VmError::VcpuNotReleased { id, timeout: eject_timeout });
            }
            self.ctx.parking.park(id);
            self.ctx.control.vcpus.kick_all();
            let timeout = crate::cpu::run_control::VCPU_STOP_TIMEOUT;
            if !self.ctx.parking.wait_resting(id, timeout) {
                // Held elsewhere (an agent's pause): it stays the guest's,
                // and the guest, which ejected it, is told it is back.
                self.ctx.parking.unpark(id);
                self.vcpus.controller.announce_added(u32::from(id));
                return Err(VmError::VcpuNotParked { id, timeout });
            }
            // Out of the guest for good: a later vCPU `id` is a new CPU.
            if let Some(heki) = &self.heki {
                heki.pins().forget_vcpu(id);
            }
            self.vcpus.live = id;
            log::info!("CPU hotplug: vCPU {id} removed");
            crate::events::emit("vm", "vcpu-removed", &[("vcpu", id.to_string())]);
        }
        Ok(())
    }
}
