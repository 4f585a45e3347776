//! The agent's commands, run on the `introspect-rx` thread. Commands on a
//! vCPU's registers run on that vCPU's own thread (`AgentLink::on_vcpu`).

use std::sync::Arc;
use std::sync::atomic::Ordering;

use hypervisor::{Regs, Segment, SpecialRegs, Vcpu};
use serde_json::{Map, Value, json};
use vm_memory::{Bytes, GuestAddress, GuestMemory, Permissions};

use super::{AgentLink, Hub};
use introspection_protocol::{AgentError, AgentResult, Args, MAX_MEMORY_ACCESS, PROTOCOL_VERSION, from_hex, to_hex};

fn no_vm() -> AgentError {
    AgentError::new("ENODEV", "no VM is running (boot it first)")
}

/// Runs one command.
pub fn run(hub: &Arc<Hub>, cmd: &str, args: &Map<String, Value>) -> AgentResult {
    let args = Args(args);
    args.only(known_args(cmd)?)?;
    let link = hub.link();
    let vm = || link.as_deref().ok_or_else(no_vm);
    match cmd {
        "hello" => Ok(hello(hub)),
        "stats" => Ok(hub.counters.to_json()),
        "tracking" => Ok(tracking_json(hub)),
        "pause" => pause(vm()?, &args),
        "resume" => resume(vm()?, &args),
        "get-registers" => {
            let vm = vm()?;
            vm.on_vcpu(args.vcpu(vm.vcpu_count())?, Box::new(|v| Ok(regs_json(&vcpu_regs(v)?))))
        }
        "set-registers" => set_registers(vm()?, &args),
        "get-sregs" => {
            let vm = vm()?;
            vm.on_vcpu(args.vcpu(vm.vcpu_count())?, Box::new(|v| Ok(sregs_json(&vcpu_sregs(v)?))))
        }
        "get-msrs" => get_msrs(vm()?, &args),
        "get-cpuid" => get_cpuid(vm()?, &args),
        "read-memory" => read_memory(vm()?, &args),
        "write-memory" => write_memory(vm()?, &args),
        "translate" => translate(vm()?, &args),
        "inject" => inject(vm()?, &args),
        "track-write" | "untrack-write" => track_write(hub, &args, cmd == "track-write"),
        "track-msr" | "untrack-msr" => track_msr(hub, &args, cmd == "track-msr"),
        "track-hypercall" => {
            let on = args.bool("enable", true)?;
            if on && !hypercalls_available(hub) {
                return Err(AgentError::new(
                    "EOPNOTSUPP",
                    "hypercalls reach the VMM only through heki's doorbell: this VM runs without heki",
                ));
            }
            hub.change_tracking(|t| {
                t.hypercalls = on;
                Ok(())
            })?;
            Ok(json!({"hypercalls": on}))
        }
        "track-cr" => {
            let on = args.bool("enable", true)?;
            // The baseline is each vCPU's CRs now, so the first change is reported too.
            if let Some(link) = &link {
                if on && !hub.tracking().crs {
                    link.take_cr_baselines()?;
                } else if !on {
                    link.clear_cr_baselines();
                }
            }
            hub.change_tracking(|t| {
                t.crs = on;
                Ok(())
            })?;
            Ok(json!({"crs": on, "mode": "detected"}))
        }
        "single-step" | "breakpoints" => debug(hub, &args, cmd == "single-step"),
        _ => Err(AgentError::new("ENOSYS", format!("unknown command '{cmd}'"))),
    }
}

/// The arguments each command takes; anything else is refused (`EINVAL`).
fn known_args(cmd: &str) -> Result<&'static [&'static str], AgentError> {
    Ok(match cmd {
        "hello" | "stats" | "tracking" => &[],
        "pause" | "resume" | "get-registers" | "get-sregs" => &["vcpu"],
        "set-registers" => &["vcpu", "regs"],
        "get-msrs" => &["vcpu", "indices"],
        "get-cpuid" => &["vcpu", "leaf", "index"],
        "read-memory" => &["gpa", "size"],
        "write-memory" => &["gpa", "data"],
        "translate" => &["vcpu", "gva"],
        "inject" => &["vcpu", "vector", "error_code"],
        "track-write" | "untrack-write" => &["gpa", "pages"],
        "track-msr" | "untrack-msr" => &["index"],
        "track-hypercall" | "track-cr" => &["enable"],
        "single-step" => &["vcpu", "enable"],
        "breakpoints" => &["vcpu", "addresses"],
        _ => return Err(AgentError::new("ENOSYS", format!("unknown command '{cmd}'"))),
    })
}

/// The handshake: protocol version, the VM's shape and each capability.
pub fn hello(hub: &Hub) -> Value {
    let (vcpus, ram) = hub.vm_shape.lock().map(|s| s.clone()).unwrap_or_default();
    let link = hub.link();
    let heki = link.as_ref().and_then(|l| l.heki.clone());
    let heki = heki.is_some() || (link.is_none() && hub.heki_configured.load(Ordering::Relaxed));
    let caps = hub.caps;
    let cap = |on: bool, mode: &str, why_not: &str| {
        if on { json!({"status": mode}) } else { json!({"status": "unavailable", "reason": why_not}) }
    };
    let hypercall_reason =
        "the heki doorbell port exists only with heki enabled (vmcall/vmmcall never exit on this host's KVM)";
    json!({
        "version": PROTOCOL_VERSION,
        "vm": {
            "state": if link.is_some() { "running" } else { "not-booted" },
            "vcpus": vcpus,
            "memory": ram.iter().map(|&(start, end)| json!({"gpa": start, "size": end - start})).collect::<Vec<_>>(),
            "heki": heki,
            "reply_timeout_ms": hub.reply_timeout.as_millis() as u64,
            "reply_poll_us": hub.reply_poll.as_micros() as u64,
        },
        "capabilities": {
            "pause": {"status": "enforced"},
            "registers": {"status": "enforced"},
            "memory": {"status": "enforced", "note": "through heki-checked memory: heki-locked pages are read-only for the agent too, and no byte of a page the guest keeps private reaches it (reads and writes refused, write events without their value)"},
            "translate": {"status": "enforced"},
            "inject": {"status": "enforced"},
            "write-tracking": cap(caps.readonly_memory, "enforced", "KVM has no read-only memslots (KVM_CAP_READONLY_MEM)"),
            "msr-write": cap(caps.msr_filter, "enforced", "KVM has no MSR filter with user-space exits"),
            "hypercall": cap(hypercalls_available(hub), "enforced", hypercall_reason),
            "single-step": cap(caps.guest_debug, "enforced", "KVM_CAP_SET_GUEST_DEBUG is missing"),
            "breakpoints": cap(caps.guest_debug, "enforced", "KVM_CAP_SET_GUEST_DEBUG is missing"),
            "cr": {"status": "detected", "reason": "upstream KVM gives user space no CR-write exits: changes are observed at the vCPU's next exit"},
            "read-tracking": {"status": "unavailable", "reason": "a stock KVM has no per-page read permission for user space: a read-only memslot traps writes only, and removing the page would make every access MMIO with no instruction to complete"},
            "exec-tracking": {"status": "unavailable", "reason": "a stock KVM has no per-page execute permission (KVMI needs a patched kernel); up to four execute addresses can be watched with hardware breakpoints"},
            "descriptor-table": {"status": "unavailable", "reason": "upstream KVM does not exit on LGDT/LIDT/LLDT/LTR to user space"},
        },
    })
}

/// Whether the VM (running, or configured when none runs yet) has heki's
/// doorbell, the only way hypercalls reach the VMM on this host.
fn hypercalls_available(hub: &Hub) -> bool {
    match hub.link() {
        Some(link) => link.heki.is_some(),
        None => hub.heki_configured.load(Ordering::Relaxed),
    }
}

fn tracking_json(hub: &Hub) -> Value {
    let t = hub.tracking();
    json!({
        "pages": t.pages.iter().map(|p| p << heki::PAGE_SHIFT).collect::<Vec<_>>(),
        "msrs": t.msrs.iter().collect::<Vec<_>>(),
        "hypercalls": t.hypercalls,
        "crs": t.crs,
        "debug": t.debug.iter().map(|(v, (s, b))| json!({"vcpu": v, "single_step": s, "breakpoints": b})).collect::<Vec<_>>(),
    })
}

fn pause(vm: &AgentLink, args: &Args<'_>) -> AgentResult {
    if let Some(id) = args.opt_vcpu(vm.vcpu_count())? {
        return vm.pause_vcpu(id);
    }
    let mut paused = vm.vm_paused.lock().unwrap_or_else(|p| p.into_inner());
    if !*paused {
        vm.control
            .vcpus
            .hold(crate::cpu::run_control::VCPU_STOP_TIMEOUT)
            .map_err(|e| AgentError::new("ETIMEDOUT", e.to_string()))?;
        *paused = true;
    }
    Ok(json!({"paused": true}))
}

fn resume(vm: &AgentLink, args: &Args<'_>) -> AgentResult {
    if let Some(id) = args.opt_vcpu(vm.vcpu_count())? {
        vm.resume_vcpu(id);
        return Ok(json!({"vcpu": id, "paused": false}));
    }
    let mut paused = vm.vm_paused.lock().unwrap_or_else(|p| p.into_inner());
    if std::mem::replace(&mut *paused, false) {
        vm.control.vcpus.release();
    }
    Ok(json!({"paused": false}))
}

fn host_err(e: impl std::fmt::Display) -> AgentError {
    AgentError::new("EIO", e.to_string())
}

fn vcpu_regs(v: &Vcpu) -> Result<Regs, AgentError> {
    v.regs().map_err(|e| host_err(crate::error_chain(&e)))
}

fn vcpu_sregs(v: &Vcpu) -> Result<SpecialRegs, AgentError> {
    v.sregs().map_err(|e| host_err(crate::error_chain(&e)))
}

const GPRS: [&str; 18] = [
    "rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp", "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15",
    "rip", "rflags",
];

fn gpr_mut<'a>(r: &'a mut Regs, name: &str) -> Option<&'a mut u64> {
    Some(match name {
        "rax" => &mut r.rax,
        "rbx" => &mut r.rbx,
        "rcx" => &mut r.rcx,
        "rdx" => &mut r.rdx,
        "rsi" => &mut r.rsi,
        "rdi" => &mut r.rdi,
        "rsp" => &mut r.rsp,
        "rbp" => &mut r.rbp,
        "r8" => &mut r.r8,
        "r9" => &mut r.r9,
        "r10" => &mut r.r10,
        "r11" => &mut r.r11,
        "r12" => &mut r.r12,
        "r13" => &mut r.r13,
        "r14" => &mut r.r14,
        "r15" => &mut r.r15,
        "rip" => &mut r.rip,
        "rflags" => &mut r.rflags,
        _ => return None,
    })
}

fn regs_json(r: &Regs) -> Value {
    let mut copy = *r;
    let mut map = Map::new();
    for name in GPRS {
        if let Some(v) = gpr_mut(&mut copy, name) {
            map.insert(name.into(), json!(*v));
        }
    }
    Value::Object(map)
}

fn set_registers(vm: &AgentLink, args: &Args<'_>) -> AgentResult {
    let id = args.vcpu(vm.vcpu_count())?;
    let Some(Value::Object(wanted)) = args.0.get("regs") else {
        return Err(AgentError::inval("regs: an object of register names and values"));
    };
    let mut changes = Vec::new();
    for (name, value) in wanted {
        let value =
            introspection_protocol::number(value).ok_or_else(|| AgentError::inval(format!("regs.{name}: a number")))?;
        if !GPRS.contains(&name.as_str()) {
            return Err(AgentError::inval(format!("regs.{name}: not a general register")));
        }
        changes.push((name.clone(), value));
    }
    vm.on_vcpu(
        id,
        Box::new(move |v| {
            let mut regs = vcpu_regs(v)?;
            for (name, value) in &changes {
                if let Some(slot) = gpr_mut(&mut regs, name) {
                    *slot = *value;
                }
            }
            v.set_regs(&regs).map_err(|e| host_err(crate::error_chain(&e)))?;
            Ok(regs_json(&regs))
        }),
    )
}

fn segment_json(s: &Segment) -> Value {
    json!({
        "base": s.base, "limit": s.limit, "selector": s.selector, "type": s.type_, "present": s.present,
        "dpl": s.dpl, "db": s.db, "s": s.s, "l": s.l, "g": s.g, "avl": s.avl, "unusable": s.unusable,
    })
}

fn sregs_json(s: &SpecialRegs) -> Value {
    json!({
        "cs": segment_json(&s.cs), "ds": segment_json(&s.ds), "es": segment_json(&s.es),
        "fs": segment_json(&s.fs), "gs": segment_json(&s.gs), "ss": segment_json(&s.ss),
        "tr": segment_json(&s.tr), "ldt": segment_json(&s.ldt),
        "gdt": {"base": s.gdt.base, "limit": s.gdt.limit},
        "idt": {"base": s.idt.base, "limit": s.idt.limit},
        "cr0": s.cr0, "cr2": s.cr2, "cr3": s.cr3, "cr4": s.cr4, "cr8": s.cr8,
        "efer": s.efer, "apic_base": s.apic_base, "cpl": s.cpl(),
    })
}

fn get_msrs(vm: &AgentLink, args: &Args<'_>) -> AgentResult {
    let id = args.vcpu(vm.vcpu_count())?;
    let indices = args.u64_list("indices")?;
    if indices.is_empty() || indices.len() > 64 {
        return Err(AgentError::inval("indices: 1 to 64 MSR indices"));
    }
    let indices: Vec<u32> = indices
        .into_iter()
        .map(|i| u32::try_from(i).map_err(|_| AgentError::inval(format!("indices: {i:#x} is not an MSR index"))))
        .collect::<Result<_, _>>()?;
    vm.on_vcpu(
        id,
        Box::new(move |v| {
            let mut out = Vec::new();
            for index in indices {
                let value = v.msr(index).map_err(|e| AgentError::new("EINVAL", crate::error_chain(&e)))?;
                out.push(json!({"index": index, "value": value}));
            }
            Ok(Value::Array(out))
        }),
    )
}

fn get_cpuid(vm: &AgentLink, args: &Args<'_>) -> AgentResult {
    let id = args.vcpu(vm.vcpu_count())?;
    let leaf = args.u64("leaf")?;
    let index = args.opt_u64("index")?.unwrap_or(0);
    let entries = vm.cpuid.get(usize::from(id)).ok_or_else(no_vm)?;
    let found = entries
        .iter()
        .find(|e| u64::from(e.function) == leaf && (u64::from(e.index) == index || e.flags & 1 == 0))
        .ok_or_else(|| AgentError::new("ENOENT", format!("CPUID leaf {leaf:#x}.{index} is not set")))?;
    Ok(json!({"leaf": leaf, "index": index, "eax": found.eax, "ebx": found.ebx, "ecx": found.ecx, "edx": found.edx}))
}

fn memory_range(args: &Args<'_>, size: u64) -> Result<u64, AgentError> {
    let gpa = args.u64("gpa")?;
    if size == 0 || size > MAX_MEMORY_ACCESS {
        return Err(AgentError::inval(format!("size: 1 to {MAX_MEMORY_ACCESS} bytes")));
    }
    gpa.checked_add(size).ok_or_else(|| AgentError::inval("gpa + size overflows"))?;
    Ok(gpa)
}

fn read_memory(vm: &AgentLink, args: &Args<'_>) -> AgentResult {
    let size = args.u64("size")?;
    let gpa = memory_range(args, size)?;
    let mut buf = vec![0u8; size as usize];
    if !vm.traps.ram().contains(gpa, size) {
        return Err(AgentError::new("EFAULT", format!("{gpa:#x}+{size:#x} is not guest RAM")));
    }
    // Refused for private pages, like a device read.
    if !vm.memory.check_range(GuestAddress(gpa), size as usize, Permissions::Read) {
        return Err(AgentError::new("EPERM", "the guest keeps this memory private"));
    }
    vm.memory.read_slice(&mut buf, GuestAddress(gpa)).map_err(|e| AgentError::new("EPERM", e.to_string()))?;
    Ok(json!({"gpa": gpa, "size": size, "data": to_hex(&buf)}))
}

fn write_memory(vm: &AgentLink, args: &Args<'_>) -> AgentResult {
    let data = from_hex(args.str("data")?)?;
    let size = data.len() as u64;
    let gpa = memory_range(args, size)?;
    if !vm.traps.ram().contains(gpa, size) {
        return Err(AgentError::new("EFAULT", format!("{gpa:#x}+{size:#x} is not guest RAM")));
    }
    // A heki-locked page is read-only for the agent too (checked first, so a
    // mistaken write is an error reply rather than a violation under the policy).
    if !vm.memory.check_range(GuestAddress(gpa), data.len(), Permissions::Write) {
        return Err(AgentError::new("EPERM", "heki protects this memory (or the guest keeps it private)"));
    }
    vm.memory.write_slice(&data, GuestAddress(gpa)).map_err(|e| AgentError::new("EPERM", e.to_string()))?;
    Ok(json!({"gpa": gpa, "size": size}))
}

fn translate(vm: &AgentLink, args: &Args<'_>) -> AgentResult {
    let id = args.vcpu(vm.vcpu_count())?;
    let gva = args.u64("gva")?;
    vm.on_vcpu(
        id,
        Box::new(move |v| {
            let gpa = v.translate_gva(gva).map_err(|e| host_err(crate::error_chain(&e)))?;
            Ok(json!({"gva": gva, "gpa": gpa}))
        }),
    )
}

fn inject(vm: &AgentLink, args: &Args<'_>) -> AgentResult {
    let id = args.vcpu(vm.vcpu_count())?;
    let vector = args.u64("vector")?;
    let vector = u8::try_from(vector).ok().filter(|v| *v < 32).ok_or_else(|| AgentError::inval("vector: 0 to 31"))?;
    let error_code = args
        .opt_u64("error_code")?
        .map(|c| u32::try_from(c).map_err(|_| AgentError::inval("error_code: 32 bits")))
        .transpose()?;
    vm.on_vcpu(
        id,
        Box::new(move |v| {
            v.inject_exception(vector, error_code).map_err(|e| host_err(crate::error_chain(&e)))?;
            Ok(json!({"vcpu": v.id(), "vector": vector}))
        }),
    )
}

/// Most pages the agent may track (each may split a memslot).
const MAX_TRACKED_PAGES: usize = 4096;

fn track_write(hub: &Hub, args: &Args<'_>, track: bool) -> AgentResult {
    let gpa = args.u64("gpa")?;
    let pages = args.opt_u64("pages")?.unwrap_or(1);
    if pages == 0 || pages > MAX_TRACKED_PAGES as u64 {
        return Err(AgentError::inval(format!("pages: 1 to {MAX_TRACKED_PAGES}")));
    }
    let first = gpa >> heki::PAGE_SHIFT;
    let link = hub.link();
    if let Some(link) = &link
        && !link.traps.ram().contains(first << heki::PAGE_SHIFT, pages << heki::PAGE_SHIFT)
    {
        return Err(AgentError::new("EFAULT", "the pages are not guest RAM"));
    }
    if track && !hub.caps.readonly_memory {
        return Err(AgentError::new("EOPNOTSUPP", "KVM has no read-only memslots"));
    }
    hub.change_tracking(|t| {
        for page in first..first + pages {
            if track {
                t.pages.insert(page);
            } else {
                t.pages.remove(&page);
            }
        }
        if t.pages.len() > MAX_TRACKED_PAGES {
            return Err(AgentError::new("ENOSPC", format!("at most {MAX_TRACKED_PAGES} tracked pages")));
        }
        Ok(())
    })?;
    Ok(json!({"gpa": first << heki::PAGE_SHIFT, "pages": pages, "tracked": track}))
}

fn track_msr(hub: &Hub, args: &Args<'_>, track: bool) -> AgentResult {
    let index = args.u64("index")?;
    let index = u32::try_from(index).map_err(|_| AgentError::inval("index: a 32-bit MSR index"))?;
    if track && !hub.caps.msr_filter {
        return Err(AgentError::new("EOPNOTSUPP", "KVM has no MSR filter"));
    }
    hub.change_tracking(|t| {
        if track {
            t.msrs.insert(index);
        } else {
            t.msrs.remove(&index);
        }
        // KVM takes at most 16 filter ranges, heki's pins included.
        if t.msrs.len() > 8 {
            return Err(AgentError::new("ENOSPC", "at most 8 intercepted MSRs"));
        }
        Ok(())
    })?;
    Ok(json!({"index": index, "tracked": track}))
}

fn debug(hub: &Hub, args: &Args<'_>, single_step: bool) -> AgentResult {
    if !hub.caps.guest_debug {
        return Err(AgentError::new("EOPNOTSUPP", "KVM_SET_GUEST_DEBUG is not available"));
    }
    let vcpus = hub.link().map(|l| l.vcpu_count()).unwrap_or_else(|| hub.vm_shape.lock().map(|s| s.0).unwrap_or(0));
    let id = args.vcpu(vcpus)?;
    let (mut step, mut bps) = hub.tracking().debug.get(&id).cloned().unwrap_or_default();
    if single_step {
        step = args.bool("enable", true)?;
    } else {
        bps = args.u64_list("addresses")?;
        if bps.len() > 4 {
            return Err(AgentError::inval("addresses: at most 4 hardware breakpoints"));
        }
    }
    let setting = (step, bps.clone());
    hub.change_tracking(|t| {
        if setting.0 || !setting.1.is_empty() {
            t.debug.insert(id, setting);
        } else {
            t.debug.remove(&id);
        }
        Ok(())
    })?;
    Ok(json!({"vcpu": id, "single_step": step, "breakpoints": bps}))
}
