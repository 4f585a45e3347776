//! The route table and request decoding.

use serde::Deserialize;

use super::fd_stream::ReceivedFds;
use super::hotplug::{
    decode_add_disk, decode_add_fs, decode_add_net, decode_add_vsock, decode_remove_device, decode_resize,
};
use super::{ApiError, ApiRequest};
use crate::config::vm_config_from_json;

/// HTTP method of a route.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Method {
    Get,
    Put,
}

impl Method {
    pub fn as_str(self) -> &'static str {
        match self {
            Method::Get => "GET",
            Method::Put => "PUT",
        }
    }
}

/// Whose endpoint a route is, which decides the status of a state conflict
/// (`ApiError::status`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dialect {
    /// Cloud Hypervisor's endpoint: its status codes, so its clients read ours.
    CloudHypervisor,
    /// Hekivisor's own (`vm.heki*`): plain HTTP codes (409 for a conflict).
    Hekivisor,
}

pub struct Route {
    /// The path below `/api/v1/`.
    pub path: &'static str,
    pub method: Method,
    /// Builds the request from the body (already size-limited) and the
    /// descriptors that came with it (closed unless the request keeps them).
    decode: fn(&[u8], ReceivedFds) -> Result<ApiRequest, ApiError>,
}

macro_rules! plain {
    ($variant:ident) => {
        |_body: &[u8], _fds: ReceivedFds| -> Result<ApiRequest, ApiError> { Ok(ApiRequest::$variant) }
    };
}

fn json_value(body: &[u8]) -> Result<serde_json::Value, ApiError> {
    serde_json::from_slice(body).map_err(|e| ApiError::BadRequest(format!("invalid JSON body: {e}")))
}

fn decode_create(body: &[u8], _fds: ReceivedFds) -> Result<ApiRequest, ApiError> {
    vm_config_from_json(body)
        .map(|c| ApiRequest::VmCreate(Box::new(c)))
        .map_err(|e| ApiError::BadRequest(e.to_string()))
}

fn decode_policy(body: &[u8], _fds: ReceivedFds) -> Result<ApiRequest, ApiError> {
    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Body {
        policy: heki::Policy,
    }
    let b: Body =
        serde_json::from_slice(body).map_err(|e| ApiError::BadRequest(format!("invalid policy body: {e}")))?;
    Ok(ApiRequest::VmHekiPolicy(b.policy))
}

fn decode_protect(body: &[u8], _fds: ReceivedFds) -> Result<ApiRequest, ApiError> {
    json_value(body).map(ApiRequest::VmHekiProtect)
}

fn decode_pin(body: &[u8], _fds: ReceivedFds) -> Result<ApiRequest, ApiError> {
    json_value(body).map(ApiRequest::VmHekiPin)
}

/// Every route the server serves (the OpenAPI spec must list exactly these).
pub static ROUTES: &[Route] = &[
    Route { path: "vmm.ping", method: Method::Get, decode: plain!(VmmPing) },
    Route { path: "vmm.shutdown", method: Method::Put, decode: plain!(VmmShutdown) },
    Route { path: "vm.create", method: Method::Put, decode: decode_create },
    Route { path: "vm.boot", method: Method::Put, decode: plain!(VmBoot) },
    Route { path: "vm.shutdown", method: Method::Put, decode: plain!(VmShutdown) },
    Route { path: "vm.reboot", method: Method::Put, decode: plain!(VmReboot) },
    Route { path: "vm.pause", method: Method::Put, decode: plain!(VmPause) },
    Route { path: "vm.resume", method: Method::Put, decode: plain!(VmResume) },
    Route { path: "vm.power-button", method: Method::Put, decode: plain!(VmPowerButton) },
    Route { path: "vm.delete", method: Method::Put, decode: plain!(VmDelete) },
    Route { path: "vm.info", method: Method::Get, decode: plain!(VmInfo) },
    Route { path: "vm.counters", method: Method::Get, decode: plain!(VmCounters) },
    Route { path: "vm.heki", method: Method::Get, decode: plain!(VmHeki) },
    Route { path: "vm.heki-protect", method: Method::Put, decode: decode_protect },
    Route { path: "vm.heki-policy", method: Method::Put, decode: decode_policy },
    Route { path: "vm.heki-violations", method: Method::Get, decode: plain!(VmHekiViolations) },
    Route { path: "vm.heki-pin", method: Method::Put, decode: decode_pin },
    Route { path: "vm.add-disk", method: Method::Put, decode: decode_add_disk },
    Route { path: "vm.add-net", method: Method::Put, decode: decode_add_net },
    Route { path: "vm.add-fs", method: Method::Put, decode: decode_add_fs },
    Route { path: "vm.add-vsock", method: Method::Put, decode: decode_add_vsock },
    Route { path: "vm.remove-device", method: Method::Put, decode: decode_remove_device },
    Route { path: "vm.resize", method: Method::Put, decode: decode_resize },
];

/// Cloud Hypervisor endpoints Hekivisor does not implement, with what they do.
/// They answer 501 (Not Implemented, a status `ch-remote` names) naming the
/// missing feature, not a bare "unknown endpoint".
pub static NOT_IMPLEMENTED: &[(&str, &str)] = &[
    ("vm.resize-disk", "disk resize"),
    ("vm.resize-zone", "memory zones"),
    ("vm.add-device", "VFIO device hotplug"),
    ("vm.add-user-device", "vfio-user device hotplug"),
    ("vm.add-generic-vhost-user", "vhost-user devices"),
    ("vm.add-pmem", "virtio-pmem"),
    ("vm.add-vdpa", "vDPA"),
    ("vm.balloon-stats", "virtio-balloon"),
    ("vm.snapshot", "snapshot"),
    ("vm.restore", "restore"),
    ("vm.coredump", "guest core dumps"),
    ("vm.nmi", "NMI injection"),
    ("vm.send-migration", "live migration"),
    ("vm.receive-migration", "live migration"),
];

/// What the router decided for a (method, path).
pub enum Resolved {
    Request(&'static Route),
    NotFound,
    /// A Cloud Hypervisor endpoint we lack: (path, feature).
    NotImplemented(&'static str, &'static str),
    /// The path exists with other methods (for the `Allow` header).
    MethodNotAllowed(&'static str),
}

pub fn resolve(method: &str, full_path: &str) -> Resolved {
    let Some(path) = full_path.strip_prefix("/api/v1/") else {
        return Resolved::NotFound;
    };
    let mut found = None;
    for route in ROUTES.iter().filter(|r| r.path == path) {
        if route.method.as_str() == method {
            return Resolved::Request(route);
        }
        found = Some(route.method.as_str());
    }
    if let Some(allow) = found {
        return Resolved::MethodNotAllowed(allow);
    }
    match NOT_IMPLEMENTED.iter().find(|(p, _)| *p == path) {
        Some((path, feature)) => Resolved::NotImplemented(path, feature),
        None => Resolved::NotFound,
    }
}

impl Route {
    pub fn dialect(&self) -> Dialect {
        if self.path.starts_with("vm.heki") { Dialect::Hekivisor } else { Dialect::CloudHypervisor }
    }

    pub fn decode(&self, body: &[u8], fds: ReceivedFds) -> Result<ApiRequest, ApiError> {
        (self.decode)(body, fds)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;

    /// The OpenAPI spec lists exactly the routes the server serves.
    #[test]
    fn openapi_spec_matches_the_route_table() {
        let text = include_str!("openapi/hekivisor.yaml");
        let spec: serde_yaml::Value = serde_yaml::from_str(text).expect("valid YAML");
        let mut in_spec = BTreeSet::new();
        for (path, item) in spec["paths"].as_mapping().expect("paths") {
            let path = path.as_str().expect("path").trim_start_matches('/').to_string();
            for (method, operation) in item.as_mapping().expect("methods") {
                let method = method.as_str().expect("method").to_uppercase();
                // Every operation documents the errors the server itself produces.
                let responses = operation["responses"].as_mapping().expect("responses");
                for code in ["400", "404", "405", "408", "413", "500", "503"] {
                    let code = serde_yaml::Value::String(code.into());
                    assert!(responses.contains_key(&code), "{method} {path} lacks {code:?}");
                }
                in_spec.insert((method, path.clone()));
            }
        }
        let served: BTreeSet<(String, String)> =
            ROUTES.iter().map(|r| (r.method.as_str().to_string(), r.path.to_string())).collect();
        assert_eq!(in_spec, served);
    }

    /// Every field `vm.create` accepts (and `vm.info` returns) is in the spec's `VmConfig`.
    #[test]
    fn openapi_vm_config_names_every_config_field() {
        let text = include_str!("openapi/hekivisor.yaml");
        let spec: serde_yaml::Value = serde_yaml::from_str(text).expect("valid YAML");
        let schema = &spec["components"]["schemas"]["VmConfig"]["properties"];
        let config = crate::config::VmConfig {
            introspection: Some(crate::config::IntrospectionConfig {
                socket: "/run/agent.sock".into(),
                reply_timeout_ms: 1000,
                reply_poll_us: 50,
            }),
            ..Default::default()
        };
        let serde_json::Value::Object(fields) = serde_json::to_value(&config).expect("serialize") else {
            panic!("VmConfig is an object")
        };
        for name in fields.keys() {
            assert!(!schema[name.as_str()].is_null(), "VmConfig.{name} is missing from the OpenAPI spec");
        }
        let agent = &schema["introspection"]["properties"];
        for name in ["socket", "reply_timeout_ms", "reply_poll_us"] {
            assert!(!agent[name].is_null(), "introspection.{name} is missing from the OpenAPI spec");
        }
    }

    #[test]
    fn resolve_distinguishes_unknown_paths_from_wrong_methods() {
        assert!(matches!(resolve("GET", "/api/v1/vm.info"), Resolved::Request(_)));
        assert!(matches!(resolve("GET", "/api/v1/vm.boot"), Resolved::MethodNotAllowed("PUT")));
        assert!(matches!(resolve("GET", "/api/v1/nope"), Resolved::NotFound));
        assert!(matches!(resolve("GET", "/vm.info"), Resolved::NotFound));
        assert!(matches!(resolve("PUT", "/api/v1/vm.snapshot"), Resolved::NotImplemented("vm.snapshot", _)));
        for (path, _) in NOT_IMPLEMENTED {
            assert!(!ROUTES.iter().any(|r| r.path == *path), "{path} is served and listed as missing");
        }
    }
}
