//! Cloud Hypervisor compatibility for `vm.create` bodies.
//!
//! A config produced by Cloud Hypervisor's own `vm.info` carries many fields
//! we do not implement. Those at their default values are accepted and
//! dropped; one that asks for something we lack is refused, naming the field.
//! Anything neither we nor Cloud Hypervisor know is refused by serde
//! (`deny_unknown_fields`): a typo in a security setting must never vanish.

use serde_json::{Map, Value};

use super::{ConfigError, VmConfig};

/// (section, field, default). `None` means "null, false, 0 or empty".
type Known = (&'static str, &'static str, Option<&'static str>);

/// Cloud Hypervisor fields Hekivisor does not implement, with their defaults.
const CH_DEFAULTS: &[Known] = &[
    ("", "rate_limit_groups", None),
    ("", "balloon", None),
    ("", "fs", None),
    ("", "pmem", None),
    ("", "devices", None),
    ("", "user_devices", None),
    ("", "vdpa", None),
    ("", "vsock", None),
    ("", "pvpanic", None),
    ("", "iommu", None),
    ("", "sgx_epc", None),
    ("", "numa", None),
    ("", "watchdog", None),
    ("", "platform", None),
    ("", "tpm", None),
    ("", "preserved_fds", None),
    ("", "landlock_enable", None),
    ("", "landlock_rules", None),
    ("", "pci_segments", None),
    ("cpus", "topology", None),
    ("cpus", "kvm_hyperv", None),
    ("cpus", "max_phys_bits", Some("46")),
    ("cpus", "affinity", None),
    ("cpus", "features", Some("{}")),
    ("cpus", "nested", Some("true")),
    ("memory", "mergeable", None),
    ("memory", "hotplug_method", Some("\"Acpi\"")),
    ("memory", "hotplug_size", None),
    ("memory", "hotplugged_size", None),
    ("memory", "shared", None),
    ("memory", "hugepages", None),
    ("memory", "hugepage_size", None),
    ("memory", "prefault", None),
    ("memory", "zones", None),
    ("memory", "thp", Some("true")),
    ("payload", "firmware", None),
    ("payload", "igvm", None),
    ("payload", "host_data", None),
    ("serial", "iommu", None),
    ("serial", "socket", None),
    ("console", "iommu", None),
    ("console", "socket", None),
];

/// Cloud Hypervisor disk fields Hekivisor does not implement, with defaults.
const DISK_DEFAULTS: &[(&str, Option<&str>)] = &[
    ("direct", None),
    ("iommu", None),
    ("num_queues", Some("1")),
    ("queue_size", Some("128")),
    ("vhost_user", None),
    ("vhost_socket", None),
    ("rate_limit_group", None),
    ("rate_limiter_config", None),
    ("pci_segment", None),
    ("serial", None),
    ("queue_affinity", None),
    ("disable_io_uring", None),
    ("disable_aio", None),
    ("sparse", Some("true")),
    ("image_type", Some("\"Raw\"")),
];

/// Cloud Hypervisor net fields Hekivisor does not implement, with defaults.
const NET_DEFAULTS: &[(&str, Option<&str>)] = &[
    ("host_mac", None),
    ("mtu", None),
    ("iommu", None),
    ("num_queues", Some("2")),
    ("queue_size", Some("256")),
    ("vhost_user", None),
    ("vhost_socket", None),
    ("vhost_mode", Some("\"Client\"")),
    ("fds", None),
    ("rate_limiter_config", None),
    ("pci_segment", None),
    ("offload_tso", Some("true")),
    ("offload_ufo", Some("true")),
    ("offload_csum", Some("true")),
];

/// Sections whose whole value may be Cloud Hypervisor's default.
const CH_DEFAULT_SECTIONS: &[(&str, &str)] = &[("debug_console", r#"{"file":null,"mode":"Off","iobase":233}"#)];

fn is_empty_default(v: &Value) -> bool {
    match v {
        Value::Null | Value::Bool(false) => true,
        Value::Number(n) => n.as_u64() == Some(0),
        Value::Array(a) => a.is_empty(),
        Value::Object(o) => o.is_empty() || o.values().all(is_empty_default),
        Value::String(s) => s.is_empty(),
        Value::Bool(true) => false,
    }
}

fn matches_default(value: &Value, default: Option<&str>) -> bool {
    match default {
        None => is_empty_default(value),
        Some(text) => {
            let default: Value = serde_json::from_str(text).unwrap_or(Value::Null);
            match (&default, value) {
                // `features: {}` also accepts all-false feature flags.
                (Value::Object(d), Value::Object(_)) if d.is_empty() => is_empty_default(value),
                _ => *value == default || value.is_null(),
            }
        }
    }
}

fn unsupported(field: String) -> ConfigError {
    ConfigError::Unsupported { field }
}

/// Parses a `vm.create` body: strips Cloud Hypervisor defaults, refuses the rest.
pub fn vm_config_from_json(body: &[u8]) -> Result<VmConfig, ConfigError> {
    let mut value: Value = serde_json::from_slice(body)
        .map_err(|e| ConfigError::Json { path: String::new(), message: format!("invalid JSON: {e}") })?;
    let root = value
        .as_object_mut()
        .ok_or_else(|| ConfigError::Json { path: String::new(), message: "expected a JSON object".into() })?;
    for (section, default) in CH_DEFAULT_SECTIONS {
        if let Some(v) = root.get(*section) {
            let default: Value = serde_json::from_str(default).unwrap_or(Value::Null);
            if v.is_null() || strip_nulls(v) == strip_nulls(&default) {
                root.remove(*section);
            } else {
                return Err(unsupported((*section).to_string()));
            }
        }
    }
    for (section, field, default) in CH_DEFAULTS {
        let container: Option<&mut Map<String, Value>> =
            if section.is_empty() { Some(&mut *root) } else { root.get_mut(*section).and_then(Value::as_object_mut) };
        let Some(container) = container else { continue };
        if let Some(v) = container.get(*field) {
            let path = if section.is_empty() { (*field).to_string() } else { format!("{section}.{field}") };
            if !matches_default(v, *default) {
                return Err(unsupported(path));
            }
            container.remove(*field);
        }
    }
    // Cloud Hypervisor's per-disk fields we do not implement: defaults only.
    if let Some(disks) = root.get_mut("disks").and_then(Value::as_array_mut) {
        for (i, disk) in disks.iter_mut().enumerate() {
            let Some(disk) = disk.as_object_mut() else { continue };
            for (field, default) in DISK_DEFAULTS {
                if let Some(v) = disk.get(*field) {
                    if !matches_default(v, *default) {
                        return Err(unsupported(format!("disks[{i}].{field}")));
                    }
                    disk.remove(*field);
                }
            }
        }
    }
    if let Some(nets) = root.get_mut("net").and_then(Value::as_array_mut) {
        for (i, net) in nets.iter_mut().enumerate() {
            let Some(net) = net.as_object_mut() else { continue };
            for (field, default) in NET_DEFAULTS {
                if let Some(v) = net.get(*field) {
                    if !matches_default(v, *default) {
                        return Err(unsupported(format!("net[{i}].{field}")));
                    }
                    net.remove(*field);
                }
            }
        }
    }
    // Cloud Hypervisor lets max_vcpus default to boot_vcpus.
    if let Some(cpus) = root.get_mut("cpus").and_then(Value::as_object_mut)
        && !cpus.contains_key("max_vcpus")
        && let Some(boot) = cpus.get("boot_vcpus").cloned()
    {
        cpus.insert("max_vcpus".into(), boot);
    }
    let config: VmConfig = serde_path_to_error::deserialize(value).map_err(|e| ConfigError::Json {
        path: e.path().to_string().trim_start_matches('.').to_string(),
        message: e.into_inner().to_string(),
    })?;
    config.validate()?;
    Ok(config)
}

fn strip_nulls(v: &Value) -> Value {
    match v {
        Value::Object(o) => {
            Value::Object(o.iter().filter(|(_, v)| !v.is_null()).map(|(k, v)| (k.clone(), strip_nulls(v))).collect())
        }
        other => other.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What Cloud Hypervisor's `vm.info` returns as `config` for a plain VM.
    const CH_PLAIN_VM: &str = r#"{
      "cpus": {"boot_vcpus": 2, "max_vcpus": 2, "topology": null, "kvm_hyperv": false,
               "max_phys_bits": 46, "affinity": null, "features": {"amx": false}},
      "memory": {"size": 536870912, "mergeable": false, "hotplug_method": "Acpi", "hotplug_size": null,
                 "hotplugged_size": null, "shared": false, "hugepages": false, "hugepage_size": null,
                 "prefault": false, "zones": null, "thp": true},
      "payload": {"firmware": null, "kernel": "/tmp/vmlinux", "cmdline": "console=ttyS0", "initramfs": null},
      "rate_limit_groups": null, "disks": null, "net": null,
      "rng": {"src": "/dev/urandom", "iommu": false},
      "balloon": null, "fs": null, "pmem": null,
      "serial": {"file": null, "mode": "Tty", "iommu": false, "socket": null},
      "console": {"file": null, "mode": "Off", "iommu": false, "socket": null},
      "debug_console": {"file": null, "mode": "Off", "iobase": 233},
      "devices": null, "user_devices": null, "vdpa": null, "vsock": null, "pvpanic": false,
      "iommu": false, "sgx_epc": null, "numa": null, "watchdog": false, "platform": null,
      "tpm": null, "preserved_fds": null, "landlock_enable": false, "landlock_rules": null
    }"#;

    #[test]
    fn cloud_hypervisor_plain_vm_config_is_accepted() {
        let config = vm_config_from_json(CH_PLAIN_VM.as_bytes()).expect("accepted");
        assert_eq!(config.cpus.boot_vcpus, 2);
        assert_eq!(config.memory.size, 512 << 20);
        assert_eq!(config.payload.and_then(|p| p.cmdline).as_deref(), Some("console=ttyS0"));
    }

    #[test]
    fn unsupported_cloud_hypervisor_features_are_refused_by_name() {
        for (section, field) in [
            (r#""memory": {"size": 1048576, "hugepages": true}"#, "memory.hugepages"),
            (r#""memory": {"size": 1048576, "hotplug_size": 1073741824}"#, "memory.hotplug_size"),
            (r#""cpus": {"boot_vcpus": 1, "features": {"amx": true}}"#, "cpus.features"),
            (r#""cpus": {"boot_vcpus": 1, "max_phys_bits": 40}"#, "cpus.max_phys_bits"),
            (r#""cpus": {"boot_vcpus": 1, "topology": {"threads_per_core": 2}}"#, "cpus.topology"),
            (r#""serial": {"mode": "Socket", "socket": "/s"}"#, "serial.socket"),
            (r#""disks": [{"path": "/x", "direct": true}]"#, "disks[0].direct"),
            (r#""net": [{"tap": "t0", "vhost_user": true}]"#, "net[0].vhost_user"),
            (r#""debug_console": {"mode": "Tty", "iobase": 233}"#, "debug_console"),
            (r#""vsock": {"cid": 3, "socket": "/v"}"#, "vsock"),
            (r#""iommu": true"#, "iommu"),
            (r#""watchdog": true"#, "watchdog"),
            (r#""landlock_enable": true"#, "landlock_enable"),
        ] {
            let body = format!(r#"{{"payload": {{"kernel": "/k"}}, {section}}}"#);
            let err = vm_config_from_json(body.as_bytes()).expect_err(&body).to_string();
            assert!(err.starts_with(&format!("{field}: ")), "'{err}' names {field}");
        }
    }

    #[test]
    fn typos_are_refused_not_dropped() {
        let err = vm_config_from_json(br#"{"payload": {"kernel": "/k"}, "heki": {"enabeld": true}}"#)
            .expect_err("typo refused")
            .to_string();
        assert!(err.starts_with("heki.enabeld: unknown field"), "{err}");
        let err =
            vm_config_from_json(br#"{"payload": {"kernel": "/k"}, "hekki": {}}"#).expect_err("refused").to_string();
        assert!(err.starts_with("hekki: unknown field"), "{err}");
    }

    #[test]
    fn type_errors_name_the_field_path() {
        for (body, path) in [
            (r#"{"cpus": {"boot_vcpus": 300, "max_vcpus": 300}}"#, "cpus.boot_vcpus: "),
            (r#"{"memory": {"size": "big"}}"#, "memory.size: "),
            (r#"{"memory": {"size": 99999999999999999999999}}"#, "memory.size: "),
            (r#"{"heki": {"policy": "maybe"}}"#, "heki.policy: "),
            (r#"{"disks": [{"path": "/a"}, {"path": 7}]}"#, "disks[1].path: "),
            (r#"{"serial": {"mode": "Pty"}}"#, "serial.mode: "),
        ] {
            let err = vm_config_from_json(body.as_bytes()).expect_err(body).to_string();
            assert!(err.starts_with(path), "{body}: '{err}' should start with '{path}'");
        }
    }

    #[test]
    fn range_errors_name_the_field() {
        for (body, path) in [
            (r#"{"payload": {"kernel": "/k"}, "cpus": {"boot_vcpus": 0}}"#, "cpus.boot_vcpus"),
            (r#"{"payload": {"kernel": "/k"}, "cpus": {"boot_vcpus": 2, "max_vcpus": 4}}"#, "cpus.max_vcpus"),
            (r#"{"payload": {"kernel": "/k"}, "memory": {"size": 4096}}"#, "memory.size"),
            (r#"{"payload": {"kernel": "/k"}, "memory": {"size": 1048577}}"#, "memory.size"),
            (r#"{"payload": {"kernel": "/k"}, "memory": {"size": 2199023255552}}"#, "memory.size"),
            (r#"{"payload": {"kernel": "/k"}, "console": {"mode": "File"}}"#, "console.file"),
            (r#"{"payload": {"cmdline": "x"}}"#, "payload.kernel"),
        ] {
            let err = vm_config_from_json(body.as_bytes()).expect_err(body).to_string();
            assert!(err.starts_with(path), "{body}: '{err}' should start with '{path}'");
        }
    }

    #[test]
    fn missing_sections_get_defaults_and_bad_json_is_an_error() {
        let config = vm_config_from_json(br#"{"payload": {"kernel": "/k"}}"#).expect("defaults");
        assert_eq!(config.cpus.boot_vcpus, 1);
        assert!(vm_config_from_json(b"{").is_err());
        assert!(vm_config_from_json(b"[]").is_err());
        assert!(vm_config_from_json(br#"{"memory": {"size": 1e400}}"#).is_err());
        assert!(vm_config_from_json(br#"{"memory": {"size": "big"}}"#).is_err());
        assert!(vm_config_from_json(br#"{"cpus": {"boot_vcpus": 300, "max_vcpus": 300}}"#).is_err());
    }

    proptest::proptest! {
        /// Arbitrary bytes and near-valid JSON never panic the parser.
        #[test]
        fn arbitrary_bodies_never_panic(body in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..512)) {
            let _ = vm_config_from_json(&body);
        }

        #[test]
        fn mutated_configs_never_panic(cut in 0usize..CH_PLAIN_VM.len(), byte in proptest::prelude::any::<u8>()) {
            let mut body = CH_PLAIN_VM.as_bytes().to_vec();
            body[cut] = byte;
            let _ = vm_config_from_json(&body);
            let _ = vm_config_from_json(&body[..cut]);
        }
    }
}
