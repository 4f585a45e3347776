//! The table of Cloud Hypervisor fields Hekivisor does not implement, per
//! section, with the value Cloud Hypervisor reports when they are unused,
//! and why each is refused when a body asks for more.

use serde_json::{Value, json};

use crate::config::ConfigError;

/// Where a group of fields lives in the JSON document.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Section {
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
    Platform,
}

impl Section {
    pub(super) const ALL: [Section; 12] = [
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
        Section::Platform,
    ];

    pub(super) fn key(self) -> &'static str {
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
            Section::Platform => "platform",
        }
    }
}

/// The PCI placement field Cloud Hypervisor gives every PCI device that
/// Hekivisor does not honour (`pci_segment` is a field of each device's own
/// config, except the console's).
fn pci_common(fields: &mut Vec<(&'static str, Value)>) {
    fields.push(("pci_device_id", Value::Null));
}

/// Cloud Hypervisor fields Hekivisor does not implement, per section, with
/// the value Cloud Hypervisor reports for a VM that does not use them.
pub(super) fn foreign_fields(section: Section) -> Vec<(&'static str, Value)> {
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
            ("hotplugged_size", Value::Null),
            ("reserve", json!(false)),
            ("zones", Value::Null),
            ("thp", json!(true)),
        ],
        Section::Vsock => {
            let mut f = vec![("iommu", json!(false))];
            pci_common(&mut f);
            f
        }
        Section::Payload => vec![("firmware", Value::Null), ("igvm", Value::Null), ("host_data", Value::Null)],
        Section::Serial => vec![("iommu", json!(false)), ("socket", Value::Null)],
        Section::Console => {
            let mut f =
                vec![("iommu", json!(false)), ("socket", Value::Null), ("id", Value::Null), ("pci_segment", json!(0))];
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
                // What is in force: the device offers no offloads. `true`
                // (Cloud Hypervisor's default, which Kata sends) is accepted
                // too: a virtio feature is an offer the guest may decline,
                // and without it the guest segments and checksums itself.
                ("offload_tso", json!(false)),
                ("offload_ufo", json!(false)),
                ("offload_csum", json!(false)),
            ];
            pci_common(&mut f);
            f
        }
        Section::Fs => {
            let mut f = Vec::new();
            pci_common(&mut f);
            f
        }
        Section::Platform => vec![
            ("iommu_segments", Value::Null),
            ("iommu_address_width_bits", json!(64)),
            ("serial_number", Value::Null),
            ("uuid", Value::Null),
            ("oem_strings", Value::Null),
            ("system_serial_number", Value::Null),
            ("system_uuid", Value::Null),
            ("system_manufacturer", Value::Null),
            ("system_product_name", Value::Null),
            ("system_version", Value::Null),
            ("system_family", Value::Null),
            ("system_sku_number", Value::Null),
            ("chassis_asset_tag", Value::Null),
            ("tdx", json!(false)),
            ("sev_snp", json!(false)),
            ("iommufd", json!(false)),
            ("vfio_p2p_dma", json!(true)),
        ],
    };
    if section == Section::Root {
        // Build-feature fields a Cloud Hypervisor config may carry; accepted at
        // their defaults, never reported.
        // `generic-vhost-user` is how Cloud Hypervisor's OpenAPI spells the
        // section its serde calls `generic_vhost_user`.
        fields.extend([
            ("gdb", json!(false)),
            ("pvmemcontrol", Value::Null),
            ("ivshmem", Value::Null),
            ("generic-vhost-user", Value::Null),
        ]);
    }
    fields
}

/// Fields accepted at their default but left out of `vm.info` (build
/// features of Cloud Hypervisor that its plain build does not report).
/// Fields where any boolean is accepted (see the net offloads above).
pub(super) fn any_bool_accepted(section: Section, field: &str) -> bool {
    section == Section::Net && field.starts_with("offload_")
}

pub(super) const NOT_REPORTED: &[&str] = &["gdb", "pvmemcontrol", "ivshmem", "generic-vhost-user"];

/// Where `value` asks for more than `default`: `None` when it asks for
/// nothing beyond it (equal, `null` as Cloud Hypervisor's "unset", an empty
/// list, or an object whose every member is at the default's member of the
/// same name), else the path below the field of the first member that
/// differs (`""` for the field itself).
pub(super) fn first_difference(value: &Value, default: &Value) -> Option<String> {
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
        "memory.hotplugged_size" => "memory added before a snapshot; snapshot and restore are not implemented",
        "memory.zones" => "memory zones (file-backed or per-NUMA-node RAM) are not implemented; use memory.size",
        "memory.mergeable" => "KSM merging is not offered: it would share pages heki may lock",
        "memory.thp" => "transparent huge pages cannot be turned off; use memory.hugepages for hugetlbfs pages",
        "balloon" => "virtio-balloon is not implemented",
        "pmem" => "virtio-pmem is not implemented",
        "devices" | "user_devices" | "vdpa" => "device passthrough is not implemented",
        "generic_vhost_user" | "generic-vhost-user" => "only virtio-fs is served by a vhost-user backend",
        "tpm" => "no virtual TPM",
        "sgx_epc" => "SGX enclaves are not supported",
        "pci_segments" => "per-segment MMIO aperture weights are not supported; every segment gets 32 MiB",
        _ if field.ends_with(".pci_device_id") => "devices take the first free slot of their segment",
        "iommu" | "platform.iommu_segments" => "no virtual IOMMU",
        "console.pci_segment" => "the virtio console sits on segment 0",
        "numa" => "one NUMA node only",
        "rate_limit_groups" => "I/O rate limiting is not implemented",
        "payload.igvm" | "payload.firmware" | "payload.host_data" => {
            "only a kernel payload (ELF vmlinux or bzImage) boots"
        }
        "platform.tdx" | "platform.sev_snp" => "confidential guests are not supported",
        _ if field.ends_with(".rate_limiter_config") || field.ends_with(".rate_limit_group") => {
            "I/O rate limiting is not implemented"
        }
        _ if field.ends_with(".vhost_user") || field.ends_with(".vhost_socket") => {
            "vhost-user block and net are not implemented; the device is served in the VMM"
        }
        _ if field.ends_with(".direct") => "O_DIRECT disk access is not implemented",
        _ if field.ends_with(".iommu") => "no virtual IOMMU",
        _ => return None,
    })
}

pub(super) fn unsupported(field: String) -> ConfigError {
    let reason = reason(&field);
    ConfigError::Unsupported { field, reason }
}

/// Cloud Hypervisor console modes Hekivisor lacks (serde would only say
/// "unknown variant"), per section.
pub(super) fn unsupported_modes(section: Section) -> &'static [&'static str] {
    match section {
        Section::Serial => &["Pty", "Socket"],
        _ => &["Socket"],
    }
}
