//! REST handlers for `vm.heki*`: the API's side of heki, next to the
//! VMM's other request handlers (`vmm_requests.rs`); heki itself knows no
//! API types.

use heki::{AbiError, Permissions, ProtectRange};
use serde::Deserialize;
use serde_json::json;

use crate::api::{ApiError, ApiRequest, ApiResult};
use crate::config::HekiConfig;

use crate::heki::HekiRuntime;

const EXEC_REASON: &str = "execute permissions need kernel support (per-page EPT execute control) that upstream KVM does not offer; EXEC is recorded but not enforced";

/// What the heki REST handlers see of the VMM.
pub(crate) struct HekiApiContext<'a> {
    /// The VM's heki configuration; `None` when no VM was created.
    pub config: Option<&'a mut HekiConfig>,
    /// The running VM's heki state.
    pub runtime: Option<&'a HekiRuntime>,
    pub running: bool,
    pub vcpus: usize,
    /// Per-device I/O and refusal counters.
    pub devices: Option<serde_json::Value>,
}

pub(crate) fn handle(ctx: HekiApiContext<'_>, request: ApiRequest) -> ApiResult {
    let config = ctx.config.ok_or_else(|| ApiError::NotFound("no VM has been created".into()))?;
    let enabled = config.enabled;
    let runtime = ctx.runtime;
    match request {
        ApiRequest::VmHeki => Ok(Some(report(enabled, config.policy, runtime, ctx.devices))),
        ApiRequest::VmHekiPolicy(policy) => {
            config.policy = policy;
            if let Some(rt) = runtime {
                rt.set_policy(policy);
            }
            crate::events::emit("heki", "policy", &[("policy", policy.as_str().to_string())]);
            Ok(None)
        }
        ApiRequest::VmHekiViolations => {
            let rt = running(enabled, runtime)?;
            Ok(Some(json!({ "violations": rt.violations().recent() })))
        }
        ApiRequest::VmHekiProtect(body) => protect(running(enabled, runtime)?, body),
        ApiRequest::VmHekiPin(body) => {
            let rt = running(enabled, runtime)?;
            if !ctx.running {
                return Err(ApiError::Conflict("the VM must be running to read its registers".into()));
            }
            let request = pin_request(body)?;
            if !request.msrs.is_empty() && !rt.msr_pinning() {
                return Err(ApiError::Conflict("this host's KVM cannot filter MSR writes".into()));
            }
            rt.pin_from_host(request, ctx.vcpus).map_err(|e| ApiError::BadRequest(e.to_string()))?;
            Ok(None)
        }
        _ => Err(ApiError::Internal("not a heki request".into())),
    }
}

/// What stock KVM leaves open in translation integrity (docs/heki.md).
const TRANSLATION_REASON: &str = "the page tables below the top level of each locked range are locked read-only, so a change to them is denied at the write; a different top-level entry (another or a private CR3) is found at the next exit or check interval and put back. Memslots have no execute permission, so a remapped page can run until then; Intel HLAT or KVM memory attributes with execute control would close that window in hardware, and neither is used here";

fn running(enabled: bool, runtime: Option<&HekiRuntime>) -> Result<&HekiRuntime, ApiError> {
    if !enabled {
        return Err(ApiError::Conflict("heki is not enabled for this VM".into()));
    }
    runtime.ok_or_else(|| ApiError::Conflict("the VM is not running".into()))
}

fn report(
    enabled: bool,
    policy: heki::Policy,
    rt: Option<&HekiRuntime>,
    devices: Option<serde_json::Value>,
) -> serde_json::Value {
    let features = rt.map(|r| r.features()).unwrap_or(0);
    let status = |bit: u32, reason: &str| {
        if enabled && features & bit != 0 {
            json!({ "status": "enforced" })
        } else {
            json!({ "status": "unavailable", "reason": if enabled { reason } else { "heki is disabled for this VM" } })
        }
    };
    use heki::abi::feature;
    let mut value = json!({
        "enabled": enabled,
        "policy": policy.as_str(),
        "abi_version": heki::abi::ABI_VERSION,
        "features": {
            "protect_memory": status(feature::PROTECT_MEMORY, "KVM lacks read-only memslots"),
            "protect_bytes": status(feature::PROTECT_BYTES, "KVM lacks read-only memslots"),
            "exec": { "status": "unavailable", "reason": EXEC_REASON },
            "pin_cr": if enabled {
                json!({ "status": "detect-and-restore", "interval_ms": rt.map(|r| r.cr_check_interval_ms),
                        "reason": "KVM offers user space no CR-write interception; pinned bits are checked at every exit and at least every interval, then restored" })
            } else {
                json!({ "status": "unavailable", "reason": "heki is disabled for this VM" })
            },
            "pin_msr": status(feature::PIN_MSR, "KVM lacks the MSR filter with user-space MSR exits"),
            "dma_guard": status(feature::DMA_GUARD, "heki is disabled"),
            "translation": if enabled && features & feature::LOCK_MAPPINGS != 0 {
                json!({ "status": "lock-and-check", "interval_ms": rt.map(|r| r.cr_check_interval_ms),
                        "mechanism": "page tables",
                        "reason": TRANSLATION_REASON })
            } else {
                json!({ "status": "unavailable", "reason": if enabled { "turned off (heki.translation = false) or KVM lacks read-only memslots" } else { "heki is disabled for this VM" } })
            },
            "pin_dtr": if enabled {
                json!({ "status": "detect-and-restore", "interval_ms": rt.map(|r| r.cr_check_interval_ms),
                        "reason": "KVM offers user space no LIDT/LGDT interception; pinned IDTR/GDTR are checked at every exit and at least every interval, then restored" })
            } else {
                json!({ "status": "unavailable", "reason": "heki is disabled for this VM" })
            },
            "shared_memory": match rt {
                Some(rt) if enabled => json!({
                    "status": "enforced",
                    "mode": rt.private_mode().as_str(),
                    "reason": rt.private_mode().reason(),
                    "private": rt.private_memory_enabled(),
                }),
                _ => json!({ "status": "unavailable", "reason": if enabled { "the VM is not running" } else { "heki is disabled for this VM" } }),
            },
        },
    });
    if let Some(rt) = rt {
        let (pages, bytes, slots, max) = rt.stats();
        value["protected_pages"] = json!(pages);
        let (measured, kernel_sha256) = rt.measurements();
        value["protected_ranges"] = rt
            .protected_ranges()
            .iter()
            .map(|&(gpa, size, permissions)| {
                let mut range = json!({ "gpa": gpa, "size": size, "permissions": permissions.names() });
                let end = gpa.saturating_add(size);
                // One lock: its digest. Neighbouring locks with the same
                // permissions are listed as one range: the digest of each.
                match measured.iter().find(|m| m.start == gpa && m.end == end) {
                    Some(m) => range["sha256"] = json!(heki::image::hex(&m.sha256)),
                    None => {
                        let inside: Vec<_> = measured
                            .iter()
                            .filter(|m| gpa <= m.start && m.end <= end)
                            .map(|m| json!({ "gpa": m.start, "size": m.end - m.start, "sha256": heki::image::hex(&m.sha256) }))
                            .collect();
                        if !inside.is_empty() {
                            range["locks"] = json!(inside);
                        }
                    }
                }
                range
            })
            .collect();
        value["kernel_sha256"] = json!(kernel_sha256.map(|d| heki::image::hex(&d)));
        value["kernel_image"] = match rt.kernel_image() {
            Some(image) => {
                let (start, end) = image.span();
                json!({ "gpa": start, "size": end - start, "masked_bytes": image.mask_stats().total_bytes })
            }
            None => json!(null),
        };
        value["protected_bytes"] = json!(bytes);
        value["memslots"] = json!({ "used": slots, "limit": max });
        value["counters"] = counters(rt);
        value["translations"] = rt.translations().to_json();
        value["devices"] = devices.unwrap_or_default();
        value["pins"] = rt
            .pins()
            .snapshot()
            .iter()
            .enumerate()
            .map(|(vcpu, p)| {
                json!({
                    "vcpu": vcpu,
                    "cr0": format!("{:#x}", p.cr0),
                    "cr4": format!("{:#x}", p.cr4),
                    "msrs": p.msrs.iter().map(|(i, v)| json!({ "msr": format!("{i:#x}"), "value": format!("{v:#x}") })).collect::<Vec<_>>(),
                })
            })
            .collect();
    }
    value
}

/// Exact violation counters per kind, for `vm.heki` and `vm.counters`.
pub fn counters(rt: &HekiRuntime) -> serde_json::Value {
    let log = rt.violations();
    let mut value = serde_json::to_value(log.counts()).unwrap_or_default();
    value["violations"] = json!(log.total());
    value["events_suppressed"] = json!(log.suppressed_events());
    value
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ProtectBody {
    ranges: Vec<RangeBody>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RangeBody {
    gpa: u64,
    size: u64,
    permissions: Vec<String>,
}

fn protect(rt: &HekiRuntime, body: serde_json::Value) -> ApiResult {
    let body: ProtectBody =
        serde_json::from_value(body).map_err(|e| ApiError::BadRequest(format!("invalid vm.heki-protect body: {e}")))?;
    if body.ranges.is_empty() {
        return Err(ApiError::BadRequest("ranges is empty".into()));
    }
    let mut ranges = Vec::with_capacity(body.ranges.len());
    for (i, r) in body.ranges.iter().enumerate() {
        let perms =
            Permissions::from_names(&r.permissions).map_err(|e| ApiError::BadRequest(format!("ranges[{i}]: {e}")))?;
        let end = r
            .gpa
            .checked_add(r.size)
            .ok_or_else(|| ApiError::BadRequest(format!("ranges[{i}]: gpa + size overflows")))?;
        let range = ProtectRange::from_entry(r.gpa, end, perms.bits(), &rt.ram()).map_err(|e| abi_error(i, e))?;
        ranges.push(range);
    }
    rt.protect_pages(&ranges, "api").map_err(|e| abi_error(0, e).rename_all())?;
    Ok(None)
}

fn abi_error(index: usize, e: AbiError) -> ApiError {
    match e {
        AbiError::InvalidArgument => {
            ApiError::BadRequest(format!("ranges[{index}]: gpa and size must be page aligned and size non-zero"))
        }
        AbiError::BadAddress => ApiError::BadRequest(format!("ranges[{index}]: outside guest RAM")),
        AbiError::NotPermitted => ApiError::Conflict("the request touches an immutable page".into()),
        AbiError::NoSpace => ApiError::Conflict("KVM memslot budget exhausted".into()),
        other => ApiError::Internal(other.to_string()),
    }
}

trait RenameAll {
    fn rename_all(self) -> Self;
}

impl RenameAll for ApiError {
    /// Errors of the request as a whole do not name one range.
    fn rename_all(self) -> Self {
        match self {
            ApiError::BadRequest(m) => ApiError::BadRequest(m.replacen("ranges[0]: ", "", 1)),
            other => other,
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PinBody {
    #[serde(default)]
    cr0: Option<String>,
    #[serde(default)]
    cr4: Option<String>,
    #[serde(default)]
    msrs: Vec<String>,
}

fn parse_hex(field: &str, text: &str) -> Result<u64, ApiError> {
    let digits = text.strip_prefix("0x").or_else(|| text.strip_prefix("0X")).unwrap_or(text);
    u64::from_str_radix(digits, 16).map_err(|_| ApiError::BadRequest(format!("{field}: '{text}' is not a hex number")))
}

fn pin_request(body: serde_json::Value) -> Result<crate::heki::pin_state::PinRequest, ApiError> {
    let body: PinBody =
        serde_json::from_value(body).map_err(|e| ApiError::BadRequest(format!("invalid vm.heki-pin body: {e}")))?;
    let cr0 = body.cr0.as_deref().map(|v| parse_hex("cr0", v)).transpose()?.unwrap_or(0);
    let cr4 = body.cr4.as_deref().map(|v| parse_hex("cr4", v)).transpose()?.unwrap_or(0);
    use heki::pins::{CR0_PINNABLE, CR4_PINNABLE, PINNABLE_MSRS};
    if cr0 & !CR0_PINNABLE != 0 || cr4 & !CR4_PINNABLE != 0 {
        return Err(ApiError::BadRequest(
            "cr0/cr4: only WP (CR0) and UMIP, FSGSBASE, SMEP, SMAP, CET (CR4) can be pinned".into(),
        ));
    }
    let mut msrs = Vec::new();
    for m in &body.msrs {
        let index = u32::try_from(parse_hex("msrs", m)?).ok().filter(|i| PINNABLE_MSRS.contains(i));
        msrs.push(index.ok_or_else(|| ApiError::BadRequest(format!("msrs: {m} cannot be pinned")))?);
    }
    if cr0 == 0 && cr4 == 0 && msrs.is_empty() {
        return Err(ApiError::BadRequest("nothing to pin".into()));
    }
    Ok(crate::heki::pin_state::PinRequest { cr0, cr4, msrs, apply: false })
}
