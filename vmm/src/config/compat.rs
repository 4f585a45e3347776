//! Cloud Hypervisor compatibility of the `VmConfig` JSON, both ways.
//!
//! Cloud Hypervisor's `vm.info` returns its whole normalized `VmConfig`: every
//! section, every field, defaults included. Orchestrators send such configs
//! back. One table (`foreign_fields`) lists, per section, each field Cloud
//! Hypervisor has and Hekivisor does not implement, with the value Cloud
//! Hypervisor reports by default. `vm.create` strips those fields when they
//! hold that value and refuses them, naming the field, when they ask for
//! something we lack; `vm.info` adds them back (`to_cloud_hypervisor_json`),
//! so a client reading Cloud Hypervisor's answer finds what it expects.
//! Anything neither we nor Cloud Hypervisor know is refused by serde
//! (`deny_unknown_fields`): a typo in a security setting must never vanish.

use serde_json::{Map, Value, json};

use super::{ConfigError, VmConfig};

/// Where a group of fields lives in the JSON document.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Section {
    Root,
    Cpus,
    Memory,
    Payload,
    Serial,
    Console,
    Rng,
    /// Each element of `disks`.
    Disk,
    /// Each element of `net`.
    Net,
    Vsock,
    /// Each element of `fs`.
    Fs,
}

impl Section {
    const ALL: [Section; 11] = [
        Section::Root,
        Section::Cpus,
        Section::Memory,
        Section::Payload,
        Section::Serial,
        Section::Console,
        Section::Rng,
        Section::Disk,
        Section::Net,
        Section::Vsock,
        Section::Fs,
    ];

    fn key(self) -> &'static str {
        match self {
            Section::Root => "",
            Section::Cpus => "cpus",
            Section::Memory => "memory",
            Section::Payload => "payload",
            Section::Serial => "serial",
            Section::Console => "console",
            Section::Rng => "rng",
            Section::Disk => "disks",
            Section::Net => "net",
            Section::Vsock => "vsock",
            Section::Fs => "fs",
        }
    }
}

/// The PCI placement fields Cloud Hypervisor gives every PCI device.
fn pci_common(fields: &mut Vec<(&'static str, Value)>) {
    fields.push(("pci_segment", json!(0)));
    fields.push(("pci_device_id", Value::Null));
}

/// Cloud Hypervisor fields Hekivisor does not implement, per section, with
/// the value Cloud Hypervisor reports for a VM that does not use them.
fn foreign_fields(section: Section) -> Vec<(&'static str, Value)> {
    let mut fields = match section {
        Section::Root => vec![
            ("rate_limit_groups", Value::Null),
            ("balloon", Value::Null),
            ("generic_vhost_user", Value::Null),
            ("pmem", Value::Null),
            ("debug_console", json!({"file": null, "mode": "Off", "iobase": 233})),
            ("devices", Value::Null),
            ("user_devices", Value::Null),
            ("vdpa", Value::Null),
            ("pvpanic", json!(false)),
            ("iommu", json!(false)),
            ("sgx_epc", Value::Null),
            ("numa", Value::Null),
            ("watchdog", json!(false)),
            ("rtc", Value::Null),
            ("pci_segments", Value::Null),
            ("platform", Value::Null),
            ("tpm", Value::Null),
            ("preserved_fds", Value::Null),
        ],
        Section::Cpus => vec![
            ("kvm_hyperv", json!(false)),
            ("max_phys_bits", json!(46)),
            ("affinity", Value::Null),
            ("features", json!({"amx": false})),
            ("nested", json!(true)),
            ("core_scheduling", json!("Vm")),
            ("profile", json!("Host")),
        ],
        Section::Memory => vec![
            ("mergeable", json!(false)),
            ("hotplug_method", json!("Acpi")),
            ("hotplug_size", Value::Null),
            ("hotplugged_size", Value::Null),
            ("hugepages", json!(false)),
            ("hugepage_size", Value::Null),
            ("prefault", json!(false)),
            ("reserve", json!(false)),
            ("zones", Value::Null),
            ("thp", json!(true)),
        ],
        Section::Vsock => vec![("iommu", json!(false)), ("pci_segment", json!(0))],
        Section::Payload => vec![("firmware", Value::Null), ("igvm", Value::Null), ("host_data", Value::Null)],
        Section::Serial => vec![("iommu", json!(false)), ("socket", Value::Null)],
        Section::Console => {
            let mut f = vec![("iommu", json!(false)), ("socket", Value::Null), ("id", Value::Null)];
            pci_common(&mut f);
            f
        }
        // `iommu` is a field of our own RngConfig (only `false` is accepted).
        Section::Rng => {
            let mut f = vec![("id", Value::Null)];
            pci_common(&mut f);
            f
        }
        Section::Disk => {
            let mut f = vec![
                ("direct", json!(false)),
                ("iommu", json!(false)),
                ("vhost_user", json!(false)),
                ("vhost_socket", Value::Null),
                ("rate_limit_group", Value::Null),
                ("rate_limiter_config", Value::Null),
                ("disable_io_uring", json!(false)),
                ("disable_aio", json!(false)),
                ("serial", Value::Null),
                ("queue_affinity", Value::Null),
                ("backing_files", json!(false)),
                ("sparse", json!(true)),
                ("image_type", json!("Raw")),
                ("lock_granularity", json!("ByteRange")),
            ];
            pci_common(&mut f);
            f
        }
        Section::Net => {
            let mut f = vec![
                ("host_mac", Value::Null),
                ("mtu", Value::Null),
                ("iommu", json!(false)),
                ("num_queues", json!(2)),
                ("queue_size", json!(256)),
                ("vhost_user", json!(false)),
                ("vhost_socket", Value::Null),
                ("vhost_mode", json!("Client")),
                ("rate_limiter_config", Value::Null),
                ("offload_tso", json!(true)),
                ("offload_ufo", json!(true)),
                ("offload_csum", json!(true)),
            ];
            pci_common(&mut f);
            f
        }
        Section::Fs => {
            let mut f = Vec::new();
            pci_common(&mut f);
            f
        }
    };
    if section == Section::Root {
        // Build-feature fields a Cloud Hypervisor config may carry; accepted at
        // their defaults, never reported.
        fields.extend([("gdb", json!(false)), ("pvmemcontrol", Value::Null), ("ivshmem", Value::Null)]);
    }
    fields
}

/// Fields accepted at their default but left out of `vm.info` (build
/// features of Cloud Hypervisor that its plain build does not report).
const NOT_REPORTED: &[&str] = &["gdb", "pvmemcontrol", "ivshmem"];

/// Whole-section values Cloud Hypervisor may also report for an unused
/// feature, besides `null` (a `platform` filled with its defaults).
fn default_alternatives(field: &str) -> Option<Value> {
    (field == "platform").then(|| {
        json!({
            "num_pci_segments": 1, "iommu_segments": null, "iommu_address_width_bits": 64,
            "serial_number": null, "uuid": null, "oem_strings": null,
            "system_serial_number": null, "system_uuid": null, "system_manufacturer": null,
            "system_product_name": null, "system_version": null, "system_family": null,
            "system_sku_number": null, "chassis_asset_tag": null,
            "tdx": false, "sev_snp": false, "iommufd": false, "vfio_p2p_dma": true
        })
    })
}

/// Where `value` asks for more than `default`: `None` when it asks for
/// nothing beyond it (equal, `null` as Cloud Hypervisor's "unset", an empty
/// list, or an object whose every member is at the default's member of the
/// same name), else the path below the field of the first member that
/// differs (`""` for the field itself).
fn first_difference(value: &Value, default: &Value) -> Option<String> {
    match (value, default) {
        (Value::Null, _) => None,
        (Value::Array(a), Value::Null) if a.is_empty() => None,
        (Value::Object(v), Value::Object(d)) => v.iter().find_map(|(k, member)| match d.get(k) {
            None => Some(format!(".{k}")),
            Some(dm) => first_difference(member, dm).map(|below| format!(".{k}{below}")),
        }),
        (Value::Number(a), Value::Number(b)) if a.as_f64() == b.as_f64() => None,
        (v, d) if v == d => None,
        _ => Some(String::new()),
    }
}

/// Why a Cloud Hypervisor field is refused, where there is more to say than
/// "not supported" (the issue that plans it, or what to do instead).
fn reason(field: &str) -> Option<&'static str> {
    Some(match field {
        "memory.hugepages" | "memory.hugepage_size" => "guest RAM is not backed by huge pages yet, #22",
        "memory.hotplug_size" | "memory.hotplugged_size" => "memory hotplug is planned, #19",
        "balloon" => "virtio-balloon is not implemented",
        "pmem" => "virtio-pmem is not implemented",
        "platform.num_pci_segments" => "one PCI segment only; more are planned, #22",
        "devices" | "user_devices" | "vdpa" => "device passthrough is not implemented",
        _ if field.ends_with(".pci_segment") => "one PCI segment only (segment 0); more are planned, #22",
        "numa" => "one NUMA node only",
        _ => return None,
    })
}

fn unsupported(field: String) -> ConfigError {
    let reason = reason(&field);
    ConfigError::Unsupported { field, reason }
}

/// Cloud Hypervisor console modes Hekivisor lacks (serde would only say
/// "unknown variant"), per section.
fn unsupported_modes(section: Section) -> &'static [&'static str] {
    match section {
        Section::Serial => &["Pty", "Socket"],
        _ => &["Socket"],
    }
}

/// Strips one object's Cloud Hypervisor fields; `path` prefixes error names.
/// A field that asks for something we lack is removed too, and recorded in
/// `problems`, so that one answer names every one of them.
fn strip_foreign(object: &mut Map<String, Value>, section: Section, path: &str, problems: &mut Vec<ConfigError>) {
    let name = |field: &str| if path.is_empty() { field.to_string() } else { format!("{path}.{field}") };
    for (field, default) in foreign_fields(section) {
        let Some(value) = object.remove(field) else { continue };
        let difference = first_difference(&value, &default);
        let alternative = default_alternatives(field).map(|alt| first_difference(&value, &alt));
        // Name the member that differs from the closest default (`platform.num_pci_segments`).
        let differs = match (difference, alternative) {
            (None, _) | (_, Some(None)) => None,
            (_, Some(Some(below))) => Some(below),
            (Some(below), None) => Some(below),
        };
        if let Some(below) = differs {
            problems.push(unsupported(format!("{}{below}", name(field))));
        }
    }
    if matches!(section, Section::Serial | Section::Console)
        && let Some(mode) = object.get("mode").and_then(Value::as_str)
        && unsupported_modes(section).contains(&mode)
    {
        let (field, supported) = match section {
            Section::Serial => ("serial.mode", "Off, Null, Tty, File are"),
            _ => ("console.mode", "Off, Null, Tty, File, Pty are"),
        };
        problems.push(ConfigError::Invalid {
            field,
            message: format!("mode {mode} is not supported by Hekivisor ({supported})"),
        });
        object.remove("mode");
    }
}

/// Parses a `vm.create` body: strips Cloud Hypervisor defaults, refuses the rest.
pub fn vm_config_from_json(body: &[u8]) -> Result<VmConfig, ConfigError> {
    let mut value: Value = serde_json::from_slice(body)
        .map_err(|e| ConfigError::Json { path: String::new(), message: format!("invalid JSON: {e}") })?;
    let root = value
        .as_object_mut()
        .ok_or_else(|| ConfigError::Json { path: String::new(), message: "expected a JSON object".into() })?;
    let mut problems = Vec::new();
    for section in Section::ALL {
        match section {
            Section::Root => strip_foreign(root, section, "", &mut problems),
            Section::Disk | Section::Net | Section::Fs => {
                if let Some(list) = root.get_mut(section.key()).and_then(Value::as_array_mut) {
                    for (i, item) in list.iter_mut().enumerate() {
                        if let Some(item) = item.as_object_mut() {
                            strip_foreign(item, section, &format!("{}[{i}]", section.key()), &mut problems);
                        }
                    }
                }
            }
            _ => {
                if let Some(object) = root.get_mut(section.key()).and_then(Value::as_object_mut) {
                    strip_foreign(object, section, section.key(), &mut problems);
                }
            }
        }
    }
    if let Some(cpus) = root.get_mut("cpus").and_then(Value::as_object_mut)
        && !cpus.contains_key("max_vcpus")
        && let Some(boot) = cpus.get("boot_vcpus").cloned()
    {
        // Cloud Hypervisor lets max_vcpus default to boot_vcpus.
        cpus.insert("max_vcpus".into(), boot);
    }
    // What is left is checked too, so one answer lists every problem.
    let parsed = serde_path_to_error::deserialize::<_, VmConfig>(value)
        .map_err(|e| ConfigError::Json {
            path: e.path().to_string().trim_start_matches('.').to_string(),
            message: e.into_inner().to_string(),
        })
        .and_then(|config| config.validate().map(|()| config));
    match parsed {
        Ok(config) if problems.is_empty() => Ok(config),
        Ok(_) => Err(several(problems)),
        // A serde error on a field we stripped is not possible: it is gone.
        Err(e) if problems.is_empty() => Err(e),
        Err(e) => {
            // Serde's and validate's complaints are about the remaining fields;
            // a `mode` we refused is gone, so its serde default is not misreported.
            problems.push(e);
            Err(several(problems))
        }
    }
}

fn several(mut problems: Vec<ConfigError>) -> ConfigError {
    if problems.len() == 1 { problems.remove(0) } else { ConfigError::Several(problems) }
}

/// Adds one object's Cloud Hypervisor fields at their defaults.
fn add_foreign(object: &mut Map<String, Value>, section: Section) {
    for (field, default) in foreign_fields(section) {
        if section == Section::Root && NOT_REPORTED.contains(&field) {
            continue;
        }
        object.entry(field).or_insert(default);
    }
}

/// The config as Cloud Hypervisor's `vm.info` reports one: ours, plus every
/// Cloud Hypervisor section and field at the value that says "not used".
///
/// One exception: without a virtio-rng device the `rng` section is left out.
/// Cloud Hypervisor always has one and cannot say "none"; a client that
/// reads the answer takes its default, and sending the answer back to
/// Hekivisor still creates no rng device.
pub fn to_cloud_hypervisor_json(config: &VmConfig) -> Value {
    let mut value = match serde_json::to_value(config) {
        Ok(v) => v,
        // Plain data with string keys always serializes; keep vm.info alive regardless.
        Err(e) => return json!({ "error": format!("cannot serialize the config: {e}") }),
    };
    let Some(root) = value.as_object_mut() else { return value };
    if root.get("rng").is_some_and(Value::is_null) {
        root.remove("rng");
    }
    for section in Section::ALL {
        match section {
            Section::Root => add_foreign(root, section),
            Section::Disk | Section::Net | Section::Fs => {
                if let Some(list) = root.get_mut(section.key()).and_then(Value::as_array_mut) {
                    for item in list.iter_mut().filter_map(Value::as_object_mut) {
                        add_foreign(item, section);
                    }
                }
            }
            _ => {
                if let Some(object) = root.get_mut(section.key()).and_then(Value::as_object_mut) {
                    add_foreign(object, section);
                }
            }
        }
    }
    value
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What Cloud Hypervisor's `vm.info` returns as `config` for a plain VM
    /// (kernel, rng, serial, console): every section, every default field.
    const CH_PLAIN_VM: &str = r#"{
      "cpus": {"boot_vcpus": 2, "max_vcpus": 2, "topology": null, "kvm_hyperv": false,
               "max_phys_bits": 46, "affinity": null, "features": {"amx": false}, "nested": true,
               "core_scheduling": "Vm", "profile": "Host"},
      "memory": {"size": 536870912, "mergeable": false, "hotplug_method": "Acpi", "hotplug_size": null,
                 "hotplugged_size": null, "shared": false, "hugepages": false, "hugepage_size": null,
                 "prefault": false, "reserve": false, "zones": null, "thp": true},
      "payload": {"firmware": null, "kernel": "/tmp/vmlinux", "cmdline": "console=ttyS0", "initramfs": null,
                  "igvm": null, "host_data": null},
      "rate_limit_groups": null, "disks": null, "net": null,
      "rng": {"src": "/dev/urandom", "iommu": false, "id": null, "pci_segment": 0, "pci_device_id": null},
      "balloon": null, "generic_vhost_user": null, "fs": null, "pmem": null,
      "serial": {"file": null, "mode": "Tty", "iommu": false, "socket": null},
      "console": {"file": null, "mode": "Off", "iommu": false, "socket": null, "id": null,
                  "pci_segment": 0, "pci_device_id": null},
      "debug_console": {"file": null, "mode": "Off", "iobase": 233},
      "devices": null, "user_devices": null, "vdpa": null, "vsock": null, "pvpanic": false,
      "iommu": false, "sgx_epc": null, "numa": null, "watchdog": false, "rtc": null, "pci_segments": null,
      "platform": null, "tpm": null, "preserved_fds": null, "landlock_enable": false, "landlock_rules": null
    }"#;

    #[test]
    fn cloud_hypervisor_plain_vm_config_is_accepted() {
        let config = vm_config_from_json(CH_PLAIN_VM.as_bytes()).expect("accepted");
        assert_eq!(config.cpus.boot_vcpus, 2);
        assert_eq!(config.memory.size, 512 << 20);
        assert_eq!(config.rng.as_ref().map(|r| r.src.clone()), Some("/dev/urandom".into()));
        assert_eq!(config.payload.and_then(|p| p.cmdline).as_deref(), Some("console=ttyS0"));
    }

    /// Every field name (with its path) of a JSON document.
    fn field_paths(value: &Value, prefix: &str, out: &mut Vec<String>) {
        if let Value::Object(map) = value {
            for (k, v) in map {
                let path = if prefix.is_empty() { k.clone() } else { format!("{prefix}.{k}") };
                field_paths(v, &path, out);
                out.push(path);
            }
        }
    }

    #[test]
    fn info_reports_every_cloud_hypervisor_field_and_round_trips() {
        let config = vm_config_from_json(CH_PLAIN_VM.as_bytes()).expect("accepted");
        let reported = to_cloud_hypervisor_json(&config);
        let ch: Value = serde_json::from_str(CH_PLAIN_VM).expect("fixture");
        let (mut want, mut have) = (Vec::new(), Vec::new());
        field_paths(&ch, "", &mut want);
        field_paths(&reported, "", &mut have);
        let missing: Vec<&String> = want.iter().filter(|p| !have.contains(p)).collect();
        assert!(missing.is_empty(), "vm.info lacks Cloud Hypervisor fields {missing:?}");
        for path in ["console.pci_segment", "cpus.profile", "memory.thp", "debug_console.iobase", "heki.policy"] {
            assert!(have.iter().any(|p| p == path), "{path} reported");
        }
        assert_eq!(reported["cpus"]["max_phys_bits"], 46);
        assert_eq!(reported["memory"]["hotplug_method"], "Acpi");
        // What vm.info reports is accepted back unchanged and means the same VM.
        let again = vm_config_from_json(reported.to_string().as_bytes()).expect("round trip");
        assert_eq!(again, config);
    }

    #[test]
    fn a_vm_without_rng_reports_no_rng_section_and_round_trips() {
        let config = vm_config_from_json(br#"{"payload": {"kernel": "/k"}}"#).expect("valid");
        let reported = to_cloud_hypervisor_json(&config);
        assert!(reported.get("rng").is_none(), "{reported}");
        assert_eq!(reported["serial"]["mode"], "Tty");
        assert_eq!(reported["console"]["mode"], "Off");
        let again = vm_config_from_json(reported.to_string().as_bytes()).expect("round trip");
        assert_eq!(again, config);
    }

    #[test]
    fn disks_and_nets_report_and_accept_their_cloud_hypervisor_fields() {
        let body = br#"{"payload": {"kernel": "/k"}, "disks": [{"path": "/d", "id": "data"}],
                        "net": [{"tap": "t0", "mac": "52:54:00:00:00:01"}]}"#;
        let config = vm_config_from_json(body).expect("valid");
        let reported = to_cloud_hypervisor_json(&config);
        assert_eq!(reported["disks"][0]["num_queues"], 1);
        assert_eq!(reported["disks"][0]["pci_segment"], 0);
        assert_eq!(reported["net"][0]["vhost_mode"], "Client");
        assert_eq!(vm_config_from_json(reported.to_string().as_bytes()).expect("round trip"), config);
    }

    #[test]
    fn disk_queues_up_to_the_spec_are_taken_and_others_refused_by_name() {
        let disk = |fields: &str| format!(r#"{{"payload": {{"kernel": "/k"}}, "disks": [{{"path": "/d"{fields}}}]}}"#);
        let config = vm_config_from_json(disk(r#", "num_queues": 2, "queue_size": 1024"#).as_bytes()).expect("valid");
        let d = &config.disks.as_ref().expect("disk")[0];
        assert_eq!((d.num_queues, d.queue_size), (2, 1024));
        for (fields, field) in [
            (r#", "queue_size": 1000"#, "disks.queue_size"),
            (r#", "queue_size": 65536"#, "disks.queue_size"),
            (r#", "queue_size": 0"#, "disks.queue_size"),
            (r#", "num_queues": 0"#, "disks.num_queues"),
            (r#", "num_queues": 17"#, "disks.num_queues"),
        ] {
            let err = vm_config_from_json(disk(fields).as_bytes()).expect_err(fields).to_string();
            assert!(err.contains(field), "{fields}: {err}");
        }
    }

    #[test]
    fn a_cloud_hypervisor_vsock_is_accepted_and_reported_back() {
        let body = br#"{"payload": {"kernel": "/k"},
                        "vsock": {"cid": 3, "socket": "/run/kata/vsock.sock", "iommu": false, "id": "vsock0", "pci_segment": 0}}"#;
        let config = vm_config_from_json(body).expect("valid");
        let vsock = config.vsock.clone().expect("vsock");
        assert_eq!(
            (vsock.cid, vsock.socket.to_str(), vsock.id.as_deref()),
            (3, Some("/run/kata/vsock.sock"), Some("vsock0"))
        );
        let reported = to_cloud_hypervisor_json(&config);
        assert_eq!(reported["vsock"]["pci_segment"], 0);
        assert_eq!(reported["vsock"]["iommu"], false);
        assert_eq!(vm_config_from_json(reported.to_string().as_bytes()).expect("round trip"), config);
    }

    #[test]
    fn a_platform_at_its_defaults_is_accepted() {
        let body = br#"{"payload": {"kernel": "/k"}, "platform": {"num_pci_segments": 1, "iommu_segments": null,
                        "serial_number": null, "uuid": null, "oem_strings": null}}"#;
        assert!(vm_config_from_json(body).is_ok());
        let body = br#"{"payload": {"kernel": "/k"}, "platform": {"num_pci_segments": 2}}"#;
        let err = vm_config_from_json(body).expect_err("two segments").to_string();
        assert!(err.starts_with("platform.num_pci_segments: not supported"), "the member is named: {err}");
    }

    #[test]
    fn unsupported_cloud_hypervisor_features_are_refused_by_name() {
        for (section, field) in [
            (r#""memory": {"size": 1048576, "hugepages": true}"#, "memory.hugepages"),
            (r#""memory": {"size": 1048576, "hotplug_size": 1073741824}"#, "memory.hotplug_size"),
            (r#""cpus": {"boot_vcpus": 1, "features": {"amx": true}}"#, "cpus.features.amx"),
            (r#""cpus": {"boot_vcpus": 1, "max_phys_bits": 40}"#, "cpus.max_phys_bits"),
            (r#""serial": {"mode": "Socket", "socket": "/s"}"#, "serial.socket"),
            (r#""disks": [{"path": "/x", "direct": true}]"#, "disks[0].direct"),
            (r#""net": [{"tap": "t0", "vhost_user": true}]"#, "net[0].vhost_user"),
            (r#""debug_console": {"mode": "Tty", "iobase": 233}"#, "debug_console.mode"),
            (r#""vsock": {"cid": 3, "socket": "/v", "iommu": true}"#, "vsock.iommu"),
            (r#""vsock": {"cid": 3, "socket": "/v", "pci_segment": 1}"#, "vsock.pci_segment"),
            (r#""vsock": {"cid": 2, "socket": "/v"}"#, "vsock.cid"),
            (r#""iommu": true"#, "iommu"),
            (r#""watchdog": true"#, "watchdog"),
            (r#""console": {"mode": "Off", "pci_segment": 1}"#, "console.pci_segment"),
            (r#""rng": {"src": "/dev/urandom", "pci_segment": 2}"#, "rng.pci_segment"),
            (r#""cpus": {"boot_vcpus": 1, "nested": false}"#, "cpus.nested"),
            (r#""cpus": {"boot_vcpus": 1, "core_scheduling": "Vcpu"}"#, "cpus.core_scheduling"),
            (r#""cpus": {"boot_vcpus": 1, "profile": "Skylake"}"#, "cpus.profile"),
            (r#""memory": {"size": 1048576, "thp": false}"#, "memory.thp"),
            (r#""pvpanic": true"#, "pvpanic"),
            (r#""serial": {"mode": "Pty"}"#, "serial.mode"),
            (r#""console": {"mode": "Socket"}"#, "console.mode"),
        ] {
            let body = format!(r#"{{"payload": {{"kernel": "/k"}}, {section}}}"#);
            let err = vm_config_from_json(body.as_bytes()).expect_err(&body).to_string();
            assert!(err.starts_with(&format!("{field}: ")), "'{err}' names {field}");
        }
    }

    #[test]
    fn the_console_takes_a_pty_and_its_reported_path_is_accepted_back() {
        let body = br#"{"payload": {"kernel": "/k"}, "console": {"mode": "Pty", "file": "/dev/pts/7"}}"#;
        let config = vm_config_from_json(body).expect("console pty");
        assert_eq!(config.console.mode, crate::config::ConsoleOutputMode::Pty);
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
            (r#"{"payload": {"kernel": "/k"}, "cpus": {"boot_vcpus": 4, "max_vcpus": 2}}"#, "cpus.max_vcpus"),
            (r#"{"payload": {"kernel": "/k"}, "cpus": {"boot_vcpus": 2, "max_vcpus": 255}}"#, "cpus.max_vcpus"),
            (
                r#"{"payload": {"kernel": "/k"}, "cpus": {"boot_vcpus": 1, "topology": {"threads_per_core": 2}}}"#,
                "cpus.topology",
            ),
            (
                r#"{"payload": {"kernel": "/k"}, "cpus": {"boot_vcpus": 4, "topology":
                   {"threads_per_core": 2, "cores_per_die": 1, "dies_per_package": 1, "packages": 1}}}"#,
                "cpus.topology: threads_per_core × cores_per_die × dies_per_package × packages is 2, but max_vcpus is 4",
            ),
            (
                r#"{"payload": {"kernel": "/k"}, "cpus": {"boot_vcpus": 6, "topology":
                   {"threads_per_core": 3, "cores_per_die": 2, "dies_per_package": 1, "packages": 1}}}"#,
                "cpus.topology: every level below the highest one above 1 needs a power-of-two count",
            ),
            (
                r#"{"payload": {"kernel": "/k"}, "cpus": {"boot_vcpus": 1, "topology":
                   {"threads_per_core": 0, "cores_per_die": 1, "dies_per_package": 1, "packages": 1}}}"#,
                "cpus.topology: every level",
            ),
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
    fn topology_and_vcpus_above_boot_are_accepted_and_reported() {
        let body = br#"{"payload": {"kernel": "/k"}, "cpus": {"boot_vcpus": 2, "max_vcpus": 8,
                        "topology": {"threads_per_core": 2, "cores_per_die": 2, "dies_per_package": 1, "packages": 2}}}"#;
        let config = vm_config_from_json(body).expect("accepted");
        let topology = config.cpus.topology.expect("kept");
        assert_eq!((config.cpus.boot_vcpus, config.cpus.max_vcpus, topology.packages), (2, 8, 2));
        let reported = to_cloud_hypervisor_json(&config);
        assert_eq!(reported["cpus"]["topology"]["threads_per_core"], 2);
        assert_eq!(reported["cpus"]["max_vcpus"], 8);
        assert_eq!(vm_config_from_json(reported.to_string().as_bytes()).expect("round trip"), config);
        // Without a topology, vm.info says null, as Cloud Hypervisor does.
        let plain = to_cloud_hypervisor_json(&vm_config_from_json(br#"{"payload": {"kernel": "/k"}}"#).expect("ok"));
        assert!(plain["cpus"]["topology"].is_null(), "{plain}");
    }

    /// Kata's `vm.create` body (`tests/fixtures/kata-clh-vm-create.json`, built
    /// as Kata's clh.go builds it with its default configuration: virtio-fs,
    /// an image disk, 8 possible vCPUs, memory hotplug). One answer names
    /// every field Hekivisor lacks, each with why; what it has is not named.
    #[test]
    fn kata_body_names_every_missing_feature_and_nothing_else() {
        let body = include_str!("../../../tests/fixtures/kata-clh-vm-create.json");
        let err = vm_config_from_json(body.as_bytes()).expect_err("Kata's body needs PCI segments");
        let lines: Vec<String> = err.to_string().lines().map(str::to_string).collect();
        let fields: Vec<&str> = lines.iter().map(|l| l.split(':').next().unwrap_or_default()).collect();
        assert_eq!(fields, ["platform.num_pci_segments", "memory.hotplug_size", "fs[0].pci_segment"], "{lines:?}");
        assert!(lines[2].contains("one PCI segment only"), "{lines:?}");
        // Without those, the rest of Kata's body is accepted as Kata means it.
        let mut kata: Value = serde_json::from_str(body).expect("fixture");
        let root = kata.as_object_mut().expect("object");
        root["platform"]["num_pci_segments"] = json!(1);
        root["fs"][0]["pci_segment"] = json!(0);
        root["memory"].as_object_mut().expect("memory").remove("hotplug_size");
        let config = vm_config_from_json(kata.to_string().as_bytes()).expect("the rest is accepted");
        assert_eq!((config.cpus.boot_vcpus, config.cpus.max_vcpus), (1, 8));
        assert_eq!(config.cpus.effective_topology().cores_per_die, 8);
        let disk = &config.disks.as_ref().expect("the image disk")[0];
        assert!(disk.readonly);
        assert_eq!(config.memory.size, 2 << 30);
        assert!(config.memory.shared);
        let fs = &config.fs.as_ref().expect("the share")[0];
        assert_eq!((fs.tag.as_str(), fs.num_queues, fs.queue_size), ("kataShared", 1, 1024));
        assert_eq!(config.serial.mode, crate::config::ConsoleOutputMode::Off);
        // Kata's agent channel, hybrid vsock, is honoured.
        let vsock = config.vsock.as_ref().expect("Kata's vsock");
        assert_eq!((vsock.cid, vsock.socket.to_str()), (3, Some("/run/vc/vm/3f0c6b1e9a2d/clh.sock")));
        // vm.info reports the share as Cloud Hypervisor does, and it round-trips.
        let reported = to_cloud_hypervisor_json(&config);
        assert_eq!(
            (reported["fs"][0]["pci_segment"].clone(), reported["memory"]["shared"].clone()),
            (json!(0), json!(true))
        );
        assert_eq!(vm_config_from_json(reported.to_string().as_bytes()).expect("round trip"), config);
    }

    #[test]
    fn virtio_fs_is_refused_under_heki_and_without_shared_memory() {
        let share = r#""fs": [{"tag": "t", "socket": "/s"}]"#;
        let heki = format!(
            r#"{{"payload": {{"kernel": "/k"}}, "memory": {{"size": 1048576, "shared": true}}, "heki": {{"enabled": true}}, {share}}}"#
        );
        let err = vm_config_from_json(heki.as_bytes()).expect_err("heki").to_string();
        assert!(err.starts_with("fs: not available with heki enabled"), "{err}");
        let private = format!(r#"{{"payload": {{"kernel": "/k"}}, {share}}}"#);
        let err = vm_config_from_json(private.as_bytes()).expect_err("not shared").to_string();
        assert!(err.starts_with("fs: needs memory.shared=true"), "{err}");
        let long_tag = r#"{"payload": {"kernel": "/k"}, "memory": {"size": 1048576, "shared": true},
                          "fs": [{"tag": "0123456789012345678901234567890123456", "socket": "/s"}]}"#;
        assert!(vm_config_from_json(long_tag.as_bytes()).expect_err("37 bytes").to_string().starts_with("fs.tag"));
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
