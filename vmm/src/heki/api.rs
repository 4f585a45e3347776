//! REST handlers for `vm.heki*`.

use heki::{AbiError, Permissions, ProtectRange};
use serde::Deserialize;
use serde_json::json;

use crate::api::{ApiError, ApiRequest, ApiResult};
use crate::vmm::Vmm;

use super::runtime::HekiRuntime;

const EXEC_REASON: &str = "execute permissions need kernel support (per-page EPT execute control) that upstream KVM does not offer; EXEC is recorded but not enforced";

pub(crate) fn handle(vmm: &mut Vmm, request: ApiRequest) -> ApiResult {
    let config = vmm
        .config
        .as_ref()
        .ok_or_else(|| ApiError::NotFound("no VM has been created".into()))?;
    let enabled = config.heki.enabled;
    let runtime = vmm.vm.as_ref().and_then(|vm| vm.heki().cloned());
    match request {
        ApiRequest::VmHeki => Ok(Some(report(
            enabled,
            config.heki.policy,
            runtime.as_deref(),
        ))),
        ApiRequest::VmHekiPolicy(policy) => {
            if let Some(config) = vmm.config.as_mut() {
                config.heki.policy = policy;
            }
            if let Some(rt) = &runtime {
                rt.set_policy(policy);
            }
            crate::events::emit("heki", "policy", &[("policy", policy.as_str().to_string())]);
            Ok(None)
        }
        ApiRequest::VmHekiViolations => {
            let rt = running(enabled, runtime.as_deref())?;
            Ok(Some(json!({ "violations": rt.violations.recent() })))
        }
        ApiRequest::VmHekiProtect(body) => {
            let rt = running(enabled, runtime.as_deref())?;
            let gate = vmm.vm.as_ref().map(|vm| vm.gate());
            protect(rt, body, gate)
        }
        ApiRequest::VmHekiPin(_) => Err(ApiError::Conflict(
            "register pinning is not available in this build".into(),
        )),
        _ => Err(ApiError::Internal("not a heki request".into())),
    }
}

fn running(enabled: bool, runtime: Option<&HekiRuntime>) -> Result<&HekiRuntime, ApiError> {
    if !enabled {
        return Err(ApiError::Conflict("heki is not enabled for this VM".into()));
    }
    runtime.ok_or_else(|| ApiError::Conflict("the VM is not running".into()))
}

fn report(enabled: bool, policy: heki::Policy, rt: Option<&HekiRuntime>) -> serde_json::Value {
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
            "pin_cr": { "status": "unavailable", "reason": "not implemented yet" },
            "pin_msr": { "status": "unavailable", "reason": "not implemented yet" },
            "dma_guard": { "status": "unavailable", "reason": "no DMA-capable devices yet" },
            "shared_memory": { "status": "unavailable", "reason": "needs KVM private memory (MEMORY_ATTRIBUTES) which this host lacks" },
        },
    });
    if let Some(rt) = rt {
        let (pages, bytes, slots, max) = rt.stats();
        value["protected_pages"] = json!(pages);
        value["protected_bytes"] = json!(bytes);
        value["memslots"] = json!({ "used": slots, "limit": max });
        value["counters"] = counters(rt);
    }
    value
}

/// Exact violation counters per kind, for `vm.heki` and `vm.counters`.
pub fn counters(rt: &HekiRuntime) -> serde_json::Value {
    let counts = rt.violations.counts();
    json!({
        "violations": rt.violations.total(),
        "write": counts.get("write").copied().unwrap_or(0),
        "hypercall": counts.get("hypercall").copied().unwrap_or(0),
        "cr": counts.get("cr").copied().unwrap_or(0),
        "msr": counts.get("msr").copied().unwrap_or(0),
        "dma-write": counts.get("dma-write").copied().unwrap_or(0),
        "events_suppressed": rt.violations.suppressed_events(),
    })
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

fn protect(
    rt: &HekiRuntime,
    body: serde_json::Value,
    gate: Option<&crate::cpu::VcpuGate>,
) -> ApiResult {
    let body: ProtectBody = serde_json::from_value(body)
        .map_err(|e| ApiError::BadRequest(format!("invalid vm.heki-protect body: {e}")))?;
    if body.ranges.is_empty() {
        return Err(ApiError::BadRequest("ranges is empty".into()));
    }
    let mut ranges = Vec::with_capacity(body.ranges.len());
    for (i, r) in body.ranges.iter().enumerate() {
        let perms = Permissions::from_names(&r.permissions)
            .map_err(|e| ApiError::BadRequest(format!("ranges[{i}]: {e}")))?;
        let end = r
            .gpa
            .checked_add(r.size)
            .ok_or_else(|| ApiError::BadRequest(format!("ranges[{i}]: gpa + size overflows")))?;
        let range = ProtectRange::from_entry(r.gpa, end, perms.bits(), rt.ram())
            .map_err(|e| abi_error(i, e))?;
        ranges.push(range);
    }
    rt.protect_pages(&ranges, "api", gate)
        .map_err(|e| abi_error(0, e).rename_all())?;
    Ok(None)
}

fn abi_error(index: usize, e: AbiError) -> ApiError {
    match e {
        AbiError::InvalidArgument => ApiError::BadRequest(format!(
            "ranges[{index}]: gpa and size must be page aligned and size non-zero"
        )),
        AbiError::BadAddress => ApiError::BadRequest(format!("ranges[{index}]: outside guest RAM")),
        AbiError::NotPermitted => {
            ApiError::Conflict("the request touches an immutable page".into())
        }
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
