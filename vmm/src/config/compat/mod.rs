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

mod foreign;

use foreign::{
    NOT_REPORTED, Section, any_bool_accepted, first_difference, foreign_fields, unsupported, unsupported_modes,
};

/// Strips one object's Cloud Hypervisor fields; `path` prefixes error names.
/// A field that asks for something we lack is removed too, and recorded in
/// `problems`, so that one answer names every one of them.
fn strip_foreign(object: &mut Map<String, Value>, section: Section, path: &str, problems: &mut Vec<ConfigError>) {
    let name = |field: &str| if path.is_empty() { field.to_string() } else { format!("{path}.{field}") };
    for (field, default) in foreign_fields(section) {
        let Some(value) = object.remove(field) else { continue };
        if any_bool_accepted(section, field) && value.is_boolean() {
            continue;
        }
        if let Some(below) = first_difference(&value, &default) {
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
mod tests;
