//! Devices added and removed while a VM exists (`vm.add-*`,
//! `vm.remove-device`) and `vm.resize`, on the VMM thread.
//!
//! The configuration is the record: a device added is appended to it (with
//! its id made explicit), so `vm.info` lists it and a reboot builds it
//! again; a device removed leaves it. With the VM running, the device is
//! put on (or taken off) the PCI bus at once; before the boot, only the
//! configuration changes, as Cloud Hypervisor does (answer 204).

use crate::api::hotplug::{NetRequest, ResizeRequest};
use crate::api::{ApiError, ApiRequest, ApiResult};
use crate::config::VmConfig;
use crate::device_manager::build;
use crate::vm::{MemoryResizeError, VmError};
use crate::vmm::{VmState, Vmm};

/// A device to add, as configured.
enum Wanted {
    Disk(crate::config::DiskConfig),
    Net(NetRequest),
    Fs(crate::config::FsConfig),
    Vsock(crate::config::VsockConfig),
}

pub(crate) fn handle(vmm: &mut Vmm, request: ApiRequest) -> ApiResult {
    match request {
        ApiRequest::VmAddDisk(disk) => add(vmm, Wanted::Disk(*disk)),
        ApiRequest::VmAddNet(net) => add(vmm, Wanted::Net(*net)),
        ApiRequest::VmAddFs(fs) => add(vmm, Wanted::Fs(*fs)),
        ApiRequest::VmAddVsock(vsock) => add(vmm, Wanted::Vsock(*vsock)),
        ApiRequest::VmRemoveDevice(id) => remove(vmm, &id),
        ApiRequest::VmResize(resize) => self::resize(vmm, resize),
        other => Err(ApiError::Internal(format!("not a hotplug request: {other:?}"))),
    }
}

fn no_vm() -> ApiError {
    ApiError::NotFound("no VM has been created".into())
}

fn bad(message: impl Into<String>) -> ApiError {
    ApiError::BadRequest(message.into())
}

/// Gives every device of `config` its id explicitly (the name a boot gives
/// it by position), so that adding or removing one never renames another.
fn freeze_ids(config: &mut VmConfig) {
    for (i, disk) in config.disks.iter_mut().flatten().enumerate() {
        disk.id.get_or_insert_with(|| format!("_disk{i}"));
    }
    for (i, net) in config.net.iter_mut().flatten().enumerate() {
        net.id.get_or_insert_with(|| format!("_net{i}"));
    }
    for (i, fs) in config.fs.iter_mut().flatten().enumerate() {
        fs.id.get_or_insert_with(|| format!("_fs{i}"));
    }
    if let Some(vsock) = &mut config.vsock {
        vsock.id.get_or_insert_with(|| "_vsock".to_string());
    }
}

/// Every device id of a frozen `config`, with the fixed ones.
fn device_ids(config: &VmConfig) -> Vec<String> {
    let mut ids: Vec<String> = ["_rng", "_console"].map(String::from).to_vec();
    ids.extend(config.disks.iter().flatten().filter_map(|d| d.id.clone()));
    ids.extend(config.net.iter().flatten().filter_map(|n| n.id.clone()));
    ids.extend(config.fs.iter().flatten().filter_map(|f| f.id.clone()));
    ids.extend(config.vsock.iter().filter_map(|v| v.id.clone()));
    ids
}

/// `_<kind><n>` with the smallest `n` no device uses.
fn fresh_id(ids: &[String], kind: &str) -> String {
    (0..).map(|n| format!("_{kind}{n}")).find(|id| !ids.contains(id)).unwrap_or_else(|| format!("_{kind}"))
}

fn add(vmm: &mut Vmm, wanted: Wanted) -> ApiResult {
    let current = vmm.config.as_ref().ok_or_else(no_vm)?;
    let mut config = current.clone();
    freeze_ids(&mut config);
    let ids = device_ids(&config);
    let mut taken_fds = Vec::new();
    // The id the device gets, and its config appended to `config`.
    let id = match wanted {
        Wanted::Disk(mut disk) => {
            let id = disk.id.get_or_insert_with(|| fresh_id(&ids, "disk")).clone();
            config.disks.get_or_insert_with(Vec::new).push(disk);
            id
        }
        Wanted::Net(NetRequest { config: mut net, tap_fds }) => {
            let id = net.id.get_or_insert_with(|| fresh_id(&ids, "net")).clone();
            config.net.get_or_insert_with(Vec::new).push(net);
            taken_fds = tap_fds;
            id
        }
        Wanted::Fs(mut fs) => {
            let id = fs.id.get_or_insert_with(|| fresh_id(&ids, "fs")).clone();
            config.fs.get_or_insert_with(Vec::new).push(fs);
            id
        }
        Wanted::Vsock(mut vsock) => {
            if config.vsock.is_some() {
                return Err(bad("the VM has a vsock device already (one per VM); remove it first"));
            }
            let id = vsock.id.get_or_insert_with(|| "_vsock".to_string()).clone();
            config.vsock = Some(vsock);
            id
        }
    };
    if ids.contains(&id) {
        return Err(bad(format!("id: a device with id {id} exists already")));
    }
    config.validate().map_err(|e| bad(e.to_string()))?;
    let running = matches!(vmm.state(), VmState::Running | VmState::Paused);
    let answer = match (&mut vmm.vm, running) {
        (Some(vm), true) => {
            let device = build_device(&config, &id, vm.guest_memory()).map_err(device_error)?;
            let info = vm.add_device(device).map_err(device_error)?;
            log::info!("{id}: added at {}", info.bdf());
            crate::events::emit("vm", "device-added", &[("id", id.clone()), ("bdf", info.bdf())]);
            Some(info.to_json())
        }
        // Before the boot (or after a shutdown) the next boot adds it.
        _ => None,
    };
    vmm.config = Some(config);
    if !taken_fds.is_empty() {
        vmm.hotplug_fds.insert(id, taken_fds);
    }
    Ok(answer)
}

/// Builds the device `id` of `config` (which holds it).
fn build_device(config: &VmConfig, id: &str, mem: &vm_memory::GuestMemoryMmap) -> Result<build::NewDevice, VmError> {
    let has = |other: &Option<String>| other.as_deref() == Some(id);
    if let Some((i, disk)) = config.disks.iter().flatten().enumerate().find(|(_, d)| has(&d.id)) {
        return build::disk(disk, i);
    }
    if let Some((i, net)) = config.net.iter().flatten().enumerate().find(|(_, n)| has(&n.id)) {
        return build::net(net, i);
    }
    if let Some((i, fs)) = config.fs.iter().flatten().enumerate().find(|(_, f)| has(&f.id)) {
        if !config.memory.shared || config.heki.enabled {
            return Err(VmError::Device("fs needs memory.shared=true and heki disabled".into()));
        }
        return build::fs(fs, i, mem);
    }
    match &config.vsock {
        Some(vsock) if has(&vsock.id) => build::vsock(vsock),
        _ => Err(VmError::Device(format!("no device {id} in the configuration"))),
    }
}

/// A device that cannot be built or placed: the caller's input (a path, a
/// socket, a descriptor, a full bus), so a 400 with the reason.
fn device_error(e: VmError) -> ApiError {
    match e {
        VmError::Device(_) | VmError::Memory(_) => bad(crate::errors::error_lines(&e)),
        other => ApiError::Internal(crate::errors::error_lines(&other)),
    }
}

fn remove(vmm: &mut Vmm, id: &str) -> ApiResult {
    let current = vmm.config.as_ref().ok_or_else(no_vm)?;
    if vmm.state() == VmState::Paused {
        // A paused device's worker may wait on the pause itself, where its
        // stop signal cannot reach it: it would outlive its removal.
        return Err(ApiError::Conflict("cannot remove a device while the VM is paused; resume it first".into()));
    }
    let mut config = current.clone();
    freeze_ids(&mut config);
    let is = |other: &Option<String>| other.as_deref() == Some(id);
    let before = device_ids(&config).len();
    if let Some(disks) = &mut config.disks {
        disks.retain(|d| !is(&d.id));
    }
    if let Some(nets) = &mut config.net {
        nets.retain(|n| !is(&n.id));
    }
    if let Some(shares) = &mut config.fs {
        shares.retain(|f| !is(&f.id));
    }
    if config.vsock.as_ref().is_some_and(|v| is(&v.id)) {
        config.vsock = None;
    }
    if device_ids(&config).len() == before {
        let removable: Vec<String> =
            device_ids(&config).into_iter().filter(|d| d != "_rng" && d != "_console").collect();
        return Err(ApiError::NotFound(format!(
            "no removable device with id {id} (removable: {})",
            if removable.is_empty() { "none".to_string() } else { removable.join(", ") }
        )));
    }
    if let Some(vm) = &mut vmm.vm
        && matches!(vmm.state, VmState::Running | VmState::Paused)
        && let Some(info) = vm.remove_device(id)
    {
        crate::events::emit("vm", "device-removed", &[("id", id.to_string()), ("bdf", info.bdf())]);
    }
    vmm.config = Some(config);
    // The TAP descriptors it came with close now.
    vmm.hotplug_fds.remove(id);
    Ok(None)
}

/// How long `vm.resize` waits for the guest to eject each vCPU it removes.
const VCPU_EJECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// `vm.resize`: before the boot, new boot sizes; while running, vCPUs are
/// added or removed through ACPI CPU hotplug and memory is plugged in
/// through ACPI memory devices.
fn resize(vmm: &mut Vmm, resize: ResizeRequest) -> ApiResult {
    // `state()`, not the `state` field: a paused VM is `Running` there.
    let state = vmm.state();
    let config = vmm.config.as_mut().ok_or_else(no_vm)?;
    if resize.desired_balloon.is_some() {
        return Err(bad("desired_balloon: Hekivisor has no virtio-balloon device"));
    }
    let running = matches!(state, VmState::Running | VmState::Paused);
    let mut next = config.clone();
    let ram_error = |e: MemoryResizeError| match e {
        MemoryResizeError::NoWindow(_) if next.memory.hugepages && next.memory.hotplug_size.is_some() => bad(format!(
            "desired_ram: {}",
            MemoryResizeError::NoWindow(
                " usable with memory.hugepages (a hugetlbfs window would reserve all its huge pages at boot)"
            )
        )),
        MemoryResizeError::Failed(_) => ApiError::Internal(format!("desired_ram: {e}")),
        e => bad(format!("desired_ram: {e}")),
    };
    // A request is refused whole: its memory is checked before any vCPU changes.
    if let (true, Some(ram), Some(vm)) = (running, resize.desired_ram, vmm.vm.as_ref()) {
        vm.check_memory_resize(next.memory.size, ram).map_err(ram_error)?;
    }
    if let Some(vcpus) = resize.desired_vcpus {
        let max = next.cpus.max_vcpus;
        let wanted = u8::try_from(vcpus)
            .ok()
            .filter(|n| (1..=max).contains(n))
            .ok_or_else(|| bad(format!("desired_vcpus: must be 1..={max} (max_vcpus), got {vcpus}")))?;
        if running && wanted != next.cpus.boot_vcpus {
            if state == VmState::Paused && wanted < next.cpus.boot_vcpus {
                return Err(ApiError::Conflict(
                    "desired_vcpus: the VM is paused; the guest must run to release a vCPU (resume it first)".into(),
                ));
            }
            let vm = vmm.vm.as_mut().ok_or_else(no_vm)?;
            let result = vm.resize_vcpus(wanted, VCPU_EJECT_TIMEOUT);
            // What the guest has now, whether or not every step succeeded.
            next.cpus.boot_vcpus = u8::try_from(vm.vcpu_count()).unwrap_or(wanted);
            config.cpus.boot_vcpus = next.cpus.boot_vcpus;
            result.map_err(|e| match e {
                crate::vm::VmError::VcpuNotReleased { .. } => ApiError::Conflict(format!("desired_vcpus: {e}")),
                other => ApiError::Internal(format!("desired_vcpus: {other}")),
            })?;
        }
        next.cpus.boot_vcpus = wanted;
    }
    if let Some(ram) = resize.desired_ram {
        if running {
            // Memory is plugged into the running VM; the boot size stays, as
            // Cloud Hypervisor's `memory.size` does (`hotplugged_size` says the rest).
            let vm = vmm.vm.as_mut().ok_or_else(no_vm)?;
            let boot = next.memory.size;
            vm.resize_memory(boot, ram).map_err(ram_error)?;
        } else {
            next.memory.size = ram;
        }
    }
    next.validate().map_err(|e| bad(e.to_string()))?;
    *config = next;
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::DiskConfig;

    fn disk(id: Option<&str>) -> DiskConfig {
        DiskConfig {
            path: "/tmp/x".into(),
            readonly: false,
            id: id.map(String::from),
            pci_segment: 0,
            num_queues: 1,
            queue_size: 256,
        }
    }

    #[test]
    fn ids_of_boot_devices_are_frozen_and_a_new_device_takes_the_first_free_name() {
        let mut config = VmConfig { disks: Some(vec![disk(None), disk(Some("_disk2"))]), ..Default::default() };
        freeze_ids(&mut config);
        let ids = device_ids(&config);
        assert!(ids.contains(&"_disk0".to_string()));
        assert_eq!(fresh_id(&ids, "disk"), "_disk1");
        assert_eq!(fresh_id(&ids, "net"), "_net0");
    }
}
