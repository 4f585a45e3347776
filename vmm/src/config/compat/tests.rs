//! The Cloud Hypervisor compatibility of `vm.create` and `vm.info`.

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
fn a_platform_at_its_defaults_is_accepted_and_segments_are_honoured() {
    let body = br#"{"payload": {"kernel": "/k"}, "platform": {"num_pci_segments": 1, "iommu_segments": null,
                    "serial_number": null, "uuid": null, "oem_strings": null}}"#;
    assert_eq!(vm_config_from_json(body).expect("defaults").pci_segments(), 1);
    let body = br#"{"payload": {"kernel": "/k"}, "platform": {"num_pci_segments": 3},
                    "rng": {"src": "/dev/urandom", "pci_segment": 2}, "disks": [{"path": "/d", "pci_segment": 1}]}"#;
    let config = vm_config_from_json(body).expect("three segments");
    assert_eq!(config.pci_segments(), 3);
    assert_eq!(config.rng.as_ref().map(|r| r.pci_segment), Some(2));
    let reported = to_cloud_hypervisor_json(&config);
    assert_eq!(reported["platform"]["num_pci_segments"], 3);
    assert_eq!(reported["platform"]["iommu_address_width_bits"], 64, "{reported}");
    assert_eq!(reported["disks"][0]["pci_segment"], 1);
    assert_eq!(vm_config_from_json(reported.to_string().as_bytes()).expect("round trip"), config);
}

#[test]
fn a_device_on_a_segment_the_platform_lacks_is_refused_by_name() {
    for (body, field) in [
        (
            r#""fs": [{"tag": "t", "socket": "/s", "pci_segment": 1}], "memory": {"size": 1048576, "shared": true}"#,
            "fs.pci_segment",
        ),
        (r#""rng": {"src": "/dev/urandom", "pci_segment": 1}"#, "rng.pci_segment"),
        (
            r#""platform": {"num_pci_segments": 2}, "vsock": {"cid": 3, "socket": "/v", "pci_segment": 2}"#,
            "vsock.pci_segment",
        ),
        (r#""platform": {"num_pci_segments": 17}"#, "platform.num_pci_segments"),
        (r#""platform": {"num_pci_segments": 0}"#, "platform.num_pci_segments"),
    ] {
        let body = format!(r#"{{"payload": {{"kernel": "/k"}}, {body}}}"#);
        let err = vm_config_from_json(body.as_bytes()).expect_err(&body).to_string();
        assert!(err.starts_with(&format!("{field}: ")), "'{err}' names {field}");
    }
}

#[test]
fn hugepages_prefault_and_the_hotplug_window_are_accepted_and_reported() {
    let body = br#"{"payload": {"kernel": "/k"}, "memory": {"size": 1073741824, "hugepages": true,
                    "hugepage_size": 2097152, "prefault": true, "hotplug_size": 4294967296, "hotplug_method": "Acpi"}}"#;
    let config = vm_config_from_json(body).expect("accepted");
    let m = &config.memory;
    assert_eq!((m.hugepages, m.hugepage_size, m.prefault, m.hotplug_size), (true, Some(2 << 20), true, Some(4 << 30)));
    let reported = to_cloud_hypervisor_json(&config);
    assert_eq!(reported["memory"]["hugepages"], true);
    assert_eq!(reported["memory"]["hugepage_size"], 2 << 20);
    assert_eq!(reported["memory"]["hotplug_size"], 4u64 << 30);
    assert_eq!(reported["memory"]["hotplug_method"], "Acpi");
    assert_eq!(vm_config_from_json(reported.to_string().as_bytes()).expect("round trip"), config);
}

#[test]
fn memory_values_hekivisor_cannot_honour_are_refused_by_name() {
    for (memory, field) in [
        (r#"{"size": 1048576, "hugepage_size": 2097152}"#, "memory.hugepage_size: needs memory.hugepages"),
        (r#"{"size": 1073741824, "hugepages": true, "hugepage_size": 4096}"#, "memory.hugepage_size: must be"),
        (r#"{"size": 3145728, "hugepages": true, "hugepage_size": 1073741824}"#, "memory.size: with huge pages"),
        (r#"{"size": 1048576, "hotplug_method": "VirtioMem"}"#, "memory.hotplug_method: VirtioMem"),
        (r#"{"size": 1048576, "hotplug_size": 0}"#, "memory.hotplug_size: must be"),
        (r#"{"size": 1048576, "hotplug_size": 1099511627776}"#, "memory.hotplug_size: size + hotplug_size"),
        (r#"{"size": 1048576, "hotplugged_size": 1048576}"#, "memory.hotplugged_size: not supported"),
        (r#"{"size": 1048576, "zones": [{"id": "mem0", "size": 1048576}]}"#, "memory.zones: not supported"),
    ] {
        let body = format!(r#"{{"payload": {{"kernel": "/k"}}, "memory": {memory}}}"#);
        let err = vm_config_from_json(body.as_bytes()).expect_err(&body).to_string();
        assert!(err.starts_with(field), "'{err}' should start with '{field}'");
    }
}

#[test]
fn unsupported_cloud_hypervisor_features_are_refused_by_name() {
    for (section, field) in [
        (r#""memory": {"size": 1048576, "mergeable": true}"#, "memory.mergeable"),
        (r#""balloon": {"size": 0, "free_page_reporting": true}"#, "balloon"),
        (r#""platform": {"num_pci_segments": 2, "iommu_segments": [0]}"#, "platform.iommu_segments"),
        (r#""payload": {"kernel": "/k", "igvm": "/i"}"#, "payload.igvm"),
        (r#""rate_limit_groups": [{"id": "g"}]"#, "rate_limit_groups"),
        (
            r#""disks": [{"path": "/x", "rate_limiter_config": {"ops": {"size": 1, "refill_time": 1}}}]"#,
            "disks[0].rate_limiter_config",
        ),
        (
            r#""net": [{"tap": "t0", "rate_limiter_config": {"ops": {"size": 1, "refill_time": 1}}}]"#,
            "net[0].rate_limiter_config",
        ),
        (r#""pmem": [{"file": "/p"}]"#, "pmem"),
        (r#""cpus": {"boot_vcpus": 1, "features": {"amx": true}}"#, "cpus.features.amx"),
        (r#""cpus": {"boot_vcpus": 1, "max_phys_bits": 40}"#, "cpus.max_phys_bits"),
        (r#""serial": {"mode": "Socket", "socket": "/s"}"#, "serial.socket"),
        (r#""disks": [{"path": "/x", "direct": true}]"#, "disks[0].direct"),
        (r#""net": [{"tap": "t0", "vhost_user": true}]"#, "net[0].vhost_user"),
        (r#""debug_console": {"mode": "Tty", "iobase": 233}"#, "debug_console.mode"),
        (r#""vsock": {"cid": 3, "socket": "/v", "iommu": true}"#, "vsock.iommu"),
        (r#""vsock": {"cid": 2, "socket": "/v"}"#, "vsock.cid"),
        (r#""iommu": true"#, "iommu"),
        (r#""watchdog": true"#, "watchdog"),
        (r#""console": {"mode": "Off", "pci_segment": 1}"#, "console.pci_segment"),
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
    let err = vm_config_from_json(br#"{"payload": {"kernel": "/k"}, "hekki": {}}"#).expect_err("refused").to_string();
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
/// as Kata's clh.go builds it with its default configuration: virtio-fs on
/// PCI segment 1 of 2, an image disk, 8 possible vCPUs, a memory hotplug
/// window) is accepted whole, each field as Kata means it, and `vm.info`
/// reports every one back.
#[test]
fn kata_body_is_accepted_whole_and_reported_back() {
    let body = include_str!("../../../../tests/fixtures/kata-clh-vm-create.json");
    let config = vm_config_from_json(body.as_bytes()).expect("Kata's body is accepted");
    assert_eq!((config.cpus.boot_vcpus, config.cpus.max_vcpus), (1, 8));
    assert_eq!(config.cpus.effective_topology().cores_per_die, 8);
    let disk = &config.disks.as_ref().expect("the image disk")[0];
    assert!(disk.readonly);
    assert_eq!(config.memory.size, 2 << 30);
    assert!(config.memory.shared);
    assert!(!config.memory.hugepages);
    assert_eq!(config.memory.hotplug_size, Some(16 << 30));
    assert_eq!(config.pci_segments(), 2);
    let fs = &config.fs.as_ref().expect("the share")[0];
    assert_eq!((fs.tag.as_str(), fs.num_queues, fs.queue_size, fs.pci_segment), ("kataShared", 1, 1024, 1));
    assert_eq!(config.serial.mode, crate::config::ConsoleOutputMode::Off);
    // Kata's agent channel, hybrid vsock, is honoured.
    let vsock = config.vsock.as_ref().expect("Kata's vsock");
    assert_eq!((vsock.cid, vsock.socket.to_str()), (3, Some("/run/vc/vm/3f0c6b1e9a2d/clh.sock")));
    let reported = to_cloud_hypervisor_json(&config);
    assert_eq!(
        (
            reported["fs"][0]["pci_segment"].clone(),
            reported["memory"]["shared"].clone(),
            reported["memory"]["hotplug_size"].clone(),
            reported["platform"]["num_pci_segments"].clone(),
        ),
        (json!(1), json!(true), json!(17179869184u64), json!(2))
    );
    assert_eq!(vm_config_from_json(reported.to_string().as_bytes()).expect("round trip"), config);
}

/// What Kata adds in other configurations is refused, one line per field,
/// each naming why.
#[test]
fn kata_options_hekivisor_lacks_are_each_named_with_a_reason() {
    let body = include_str!("../../../../tests/fixtures/kata-clh-vm-create.json");
    let mut kata: Value = serde_json::from_str(body).expect("fixture");
    let root = kata.as_object_mut().expect("object");
    // reclaim_guest_freed_memory, enable_iommu, disk rate limiting.
    root.insert("balloon".into(), json!({"size": 0, "free_page_reporting": true}));
    root["platform"]["iommu_segments"] = json!([0]);
    root["disks"][0]["rate_limiter_config"] = json!({"bandwidth": {"size": 1000, "refill_time": 1000}});
    let err = vm_config_from_json(kata.to_string().as_bytes()).expect_err("refused").to_string();
    let lines: Vec<&str> = err.lines().collect();
    let fields: Vec<&str> = lines.iter().map(|l| l.split(':').next().unwrap_or_default()).collect();
    assert_eq!(fields, ["balloon", "disks[0].rate_limiter_config", "platform.iommu_segments"], "{lines:?}");
    assert!(lines[0].contains("virtio-balloon is not implemented"), "{lines:?}");
    assert!(lines[1].contains("rate limiting"), "{lines:?}");
    assert!(lines[2].contains("no virtual IOMMU"), "{lines:?}");
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
