//! Request bodies of Cloud Hypervisor's hotplug endpoints: `vm.add-disk`,
//! `vm.add-net` (with TAP descriptors as `SCM_RIGHTS`), `vm.add-fs`,
//! `vm.add-vsock`, `vm.remove-device` and `vm.resize`. A device body is read
//! exactly as the same device in `vm.create` (Cloud Hypervisor's fields at
//! their defaults accepted, the rest refused by name).

use std::os::fd::{AsRawFd, OwnedFd};

use serde::Deserialize;
use serde_json::{Map, Value, json};

use super::fd_stream::{MAX_FDS, ReceivedFds};
use super::{ApiError, ApiRequest};
use crate::config::{DiskConfig, FsConfig, NetConfig, VmConfig, VsockConfig, vm_config_from_json};

/// A network device and the TAP descriptors that came with its request.
#[derive(Debug)]
pub struct NetRequest {
    /// `fds` holds the numbers of `tap_fds`, which keep them open.
    pub config: NetConfig,
    pub tap_fds: Vec<OwnedFd>,
}

/// `vm.resize`: Cloud Hypervisor's `VmResize`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResizeRequest {
    pub desired_vcpus: Option<u32>,
    pub desired_ram: Option<u64>,
    pub desired_balloon: Option<u64>,
}

fn bad(message: impl Into<String>) -> ApiError {
    ApiError::BadRequest(message.into())
}

fn object(body: &[u8], what: &str) -> Result<Map<String, Value>, ApiError> {
    match serde_json::from_slice(body) {
        Ok(Value::Object(map)) => Ok(map),
        Ok(_) => Err(bad(format!("the {what} body must be a JSON object"))),
        Err(e) => Err(bad(format!("invalid JSON body: {e}"))),
    }
}

/// Reads one device of `section` as `vm.create` would; errors name the
/// device's own fields (`queue_size`, not `disks[0].queue_size`).
fn device_config(section: &str, device: Map<String, Value>, extra: Value) -> Result<VmConfig, ApiError> {
    let mut wrapper = json!({ section: [Value::Object(device)] });
    if let (Value::Object(w), Value::Object(e)) = (&mut wrapper, extra) {
        w.extend(e);
    }
    let prefix = format!("{section}[0].");
    vm_config_from_json(wrapper.to_string().as_bytes()).map_err(|e| bad(e.to_string().replace(&prefix, "")))
}

/// Cloud Hypervisor's queue size is the largest ring the device offers;
/// ours offers its own fixed maximum and the driver picks at most that, so
/// any valid size is accepted (Kata asks for 1024).
fn accept_queue_size(device: &mut Map<String, Value>) -> Result<(), ApiError> {
    if let Some(size) = device.remove("queue_size")
        && !size.is_null()
    {
        let valid = size.as_u64().is_some_and(|n| n.is_power_of_two() && n <= 32768);
        if !valid {
            return Err(bad(format!("queue_size: must be a power of two up to 32768, got {size}")));
        }
    }
    Ok(())
}

pub fn decode_add_disk(body: &[u8], _fds: ReceivedFds) -> Result<ApiRequest, ApiError> {
    let mut device = object(body, "DiskConfig")?;
    accept_queue_size(&mut device)?;
    // `ch-remote add-disk` sends "Unknown" (detect the format); every image
    // is raw to Hekivisor, which reads no other format.
    if device.get("image_type").and_then(Value::as_str) == Some("Unknown") {
        device.insert("image_type".into(), json!("Raw"));
    }
    let config = device_config("disks", device, json!({}))?;
    let disk: DiskConfig = config.disks.into_iter().flatten().next().ok_or_else(|| bad("no disk in the body"))?;
    Ok(ApiRequest::VmAddDisk(Box::new(disk)))
}

pub fn decode_add_net(body: &[u8], received: ReceivedFds) -> Result<ApiRequest, ApiError> {
    if received.overflow {
        return Err(bad(format!("fds: more than {MAX_FDS} descriptors came with the request")));
    }
    let mut device = object(body, "NetConfig")?;
    accept_queue_size(&mut device)?;
    // Descriptor numbers in the body mean nothing in this process: only
    // descriptors sent with the request count, and their number must agree.
    let listed = match device.remove("fds") {
        None | Some(Value::Null) => None,
        Some(Value::Array(list)) => Some(list.len()),
        Some(other) => return Err(bad(format!("fds: expected a list of descriptors, got {other}"))),
    };
    let arrived = received.fds.len();
    match listed {
        Some(n) if n != arrived => {
            return Err(bad(format!(
                "fds: the body lists {n} descriptors but {arrived} came with the request (send them as SCM_RIGHTS)"
            )));
        }
        _ => {}
    }
    if arrived > 1 {
        return Err(bad(format!(
            "fds: {arrived} TAP descriptors; Hekivisor's virtio-net has one queue pair, so it takes one"
        )));
    }
    let config = device_config("net", device, json!({}))?;
    let mut net: NetConfig = config.net.into_iter().flatten().next().ok_or_else(|| bad("no net in the body"))?;
    if arrived == 1 && net.tap.is_some() {
        return Err(bad("fds: give a TAP name or a descriptor, not both"));
    }
    if arrived == 1 {
        net.fds = Some(received.fds.iter().map(AsRawFd::as_raw_fd).collect());
    }
    Ok(ApiRequest::VmAddNet(Box::new(NetRequest { config: net, tap_fds: received.fds })))
}

pub fn decode_add_fs(body: &[u8], _fds: ReceivedFds) -> Result<ApiRequest, ApiError> {
    let mut device = object(body, "FsConfig")?;
    accept_queue_size(&mut device)?;
    // The share needs shared memory without heki; the VMM checks the VM's own settings.
    let config = device_config("fs", device, json!({ "memory": { "size": 1 << 30, "shared": true } }))?;
    let fs: FsConfig = config.fs.into_iter().flatten().next().ok_or_else(|| bad("no fs in the body"))?;
    Ok(ApiRequest::VmAddFs(Box::new(fs)))
}

pub fn decode_add_vsock(body: &[u8], _fds: ReceivedFds) -> Result<ApiRequest, ApiError> {
    let device = object(body, "VsockConfig")?;
    let text = json!({ "vsock": Value::Object(device) }).to_string();
    let config = vm_config_from_json(text.as_bytes()).map_err(|e| bad(e.to_string().replace("vsock.", "")))?;
    let vsock: VsockConfig = config.vsock.ok_or_else(|| bad("no vsock in the body"))?;
    Ok(ApiRequest::VmAddVsock(Box::new(vsock)))
}

pub fn decode_remove_device(body: &[u8], _fds: ReceivedFds) -> Result<ApiRequest, ApiError> {
    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Body {
        id: String,
    }
    let b: Body = serde_json::from_slice(body).map_err(|e| bad(format!("invalid VmRemoveDevice body: {e}")))?;
    Ok(ApiRequest::VmRemoveDevice(b.id))
}

pub fn decode_resize(body: &[u8], _fds: ReceivedFds) -> Result<ApiRequest, ApiError> {
    let r: ResizeRequest = serde_json::from_slice(body).map_err(|e| bad(format!("invalid VmResize body: {e}")))?;
    Ok(ApiRequest::VmResize(r))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fds(n: usize) -> ReceivedFds {
        let fds = (0..n).map(|_| std::fs::File::open("/dev/null").expect("open").into()).collect();
        ReceivedFds { fds, overflow: false }
    }

    fn message(result: Result<ApiRequest, ApiError>) -> String {
        match result {
            Err(e) => e.to_string(),
            Ok(r) => panic!("accepted: {r:?}"),
        }
    }

    #[test]
    fn a_tap_descriptor_sent_with_the_request_becomes_the_devices_tap() {
        let body = br#"{"mac":"52:54:00:12:34:56","ip":"10.0.0.1","mask":"255.255.255.0","fds":null}"#;
        let ApiRequest::VmAddNet(net) = decode_add_net(body, fds(1)).expect("accepted") else { panic!() };
        assert_eq!(net.config.fds, Some(vec![net.tap_fds[0].as_raw_fd()]));
        assert_eq!(net.config.mac.as_deref(), Some("52:54:00:12:34:56"));
    }

    #[test]
    fn a_descriptor_count_that_differs_from_the_body_is_refused_naming_fds() {
        let text = message(decode_add_net(br#"{"fds":[3,4]}"#, fds(1)));
        assert!(text.starts_with("fds: the body lists 2 descriptors but 1 came"), "{text}");
        let text = message(decode_add_net(br#"{"fds":[3]}"#, fds(0)));
        assert!(text.contains("but 0 came with the request"), "{text}");
        let text = message(decode_add_net(br#"{}"#, fds(2)));
        assert!(text.contains("one queue pair"), "{text}");
        let text = message(decode_add_net(br#"{}"#, ReceivedFds { fds: Vec::new(), overflow: true }));
        assert!(text.contains("more than 16 descriptors"), "{text}");
    }

    #[test]
    fn kata_disk_body_is_accepted_and_unknown_fields_are_named() {
        let body = br#"{"path":"/tmp/x.img","readonly":false,"image_type":"Raw","vhost_user":false,
            "num_queues":1,"queue_size":1024,"iommu":false}"#;
        let ApiRequest::VmAddDisk(disk) = decode_add_disk(body, fds(0)).expect("accepted") else { panic!() };
        assert_eq!(disk.path, std::path::Path::new("/tmp/x.img"));
        let ch_remote = br#"{"pci_segment":0,"path":"/x","readonly":false,"direct":false,"num_queues":1,
            "queue_size":128,"vhost_user":false,"disable_io_uring":false,"disable_aio":false,"backing_files":false,
            "sparse":true,"image_type":"Unknown","lock_granularity":"ByteRange"}"#;
        assert!(decode_add_disk(ch_remote, fds(0)).is_ok(), "ch-remote add-disk path=/x");
        let text = message(decode_add_disk(br#"{"path":"/x","vhost_user":true}"#, fds(0)));
        assert!(text.contains("vhost_user: not supported"), "{text}");
        let text = message(decode_add_disk(br#"{"path":"/x","queue_size":1000}"#, fds(0)));
        assert!(text.starts_with("queue_size:"), "{text}");
    }

    #[test]
    fn remove_and_resize_bodies_are_cloud_hypervisors() {
        let ApiRequest::VmRemoveDevice(id) = decode_remove_device(br#"{"id":"_disk1"}"#, fds(0)).expect("ok") else {
            panic!()
        };
        assert_eq!(id, "_disk1");
        let body = br#"{"desired_vcpus":2,"desired_ram":null,"desired_balloon":null}"#;
        let ApiRequest::VmResize(r) = decode_resize(body, fds(0)).expect("ok") else { panic!() };
        assert_eq!(r, ResizeRequest { desired_vcpus: Some(2), ..Default::default() });
        assert!(decode_resize(br#"{"desired_cpus":2}"#, fds(0)).is_err());
    }
}
