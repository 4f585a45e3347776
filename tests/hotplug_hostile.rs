//! Attacks on vCPU and memory hotplug (`vm.resize`): a guest that writes
//! garbage to the slot controllers (ports 0xcd8 and 0xce0), ejects what
//! nobody asked for and points DMA into the unplugged hotplug window; an API
//! client that sends bad, repeated and concurrent resizes in every VM state.
//! Each must leave the VMM running and `vm.info` telling the truth.

mod common;

use std::time::{Duration, Instant};

use api_client::ApiClient;
use serde_json::{Value, json};

const MIB: u64 = 1 << 20;

struct Vmm(common::ApiProcess);

impl Vmm {
    fn start(test: &str) -> Vmm {
        Vmm(common::ApiProcess::start(test, &[("HEKIVISOR_API_TIMEOUT_MS", "2000")]))
    }

    fn put(&self, command: &str, body: Value) -> (u16, String) {
        put(&self.0.socket, command, &body.to_string())
    }

    fn info(&self) -> Value {
        let body = ApiClient::new(&self.0.socket).call("GET", "vm.info", None).expect("GET").expect("body");
        serde_json::from_str(&body).expect("JSON")
    }

    fn create(&self, guest: &str, boot_vcpus: u8, heki: bool) {
        self.create_with(guest, boot_vcpus, heki, Value::Null);
    }

    fn create_with(&self, guest: &str, boot_vcpus: u8, heki: bool, introspection: Value) {
        let config = json!({
            "cpus": {"boot_vcpus": boot_vcpus, "max_vcpus": 2},
            "memory": {"size": 128 * MIB, "hotplug_size": 256 * MIB},
            "payload": {"kernel": common::guests::build(guest)},
            "serial": {"mode": "File", "file": self.0.serial},
            "rng": {"src": "/dev/urandom"},
            "heki": {"enabled": heki, "policy": "deny"},
            "introspection": introspection,
        });
        let (status, body) = self.put("vm.create", config);
        assert_eq!(status, 204, "{body}");
    }

    fn boot(&self, guest: &str, boot_vcpus: u8, heki: bool) {
        self.create(guest, boot_vcpus, heki);
        let (status, body) = self.put("vm.boot", json!(null));
        assert_eq!(status, 204, "{body}");
    }

    fn serial(&self) -> String {
        std::fs::read_to_string(&self.0.serial).unwrap_or_default()
    }

    fn wait_for_serial(&self, needle: &str) {
        let deadline = Instant::now() + Duration::from_secs(120);
        while !self.serial().contains(needle) {
            self.assert_alive();
            assert!(Instant::now() < deadline, "no {needle:?} on the serial port:\n{}", self.serial());
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn assert_alive(&self) {
        let pid = self.0.child.id();
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        let state = stat.rsplit(") ").next().and_then(|s| s.chars().next());
        assert!(
            matches!(state, Some('R' | 'S' | 'D')),
            "the VMM is gone ({state:?}); stderr:\n{}",
            std::fs::read_to_string(&self.0.stderr).unwrap_or_default()
        );
    }

    /// `vm.info`'s sizes agree with each other and with what we expect.
    fn assert_sizes(&self, vcpus: u64, hotplugged: u64) {
        let info = self.info();
        let memory = &info["config"]["memory"];
        assert_eq!(info["config"]["cpus"]["boot_vcpus"], vcpus, "{info:#}");
        assert_eq!(memory["hotplugged_size"].as_u64().unwrap_or(0), hotplugged, "{info:#}");
        assert_eq!(
            info["memory_actual_size"].as_u64(),
            Some(memory["size"].as_u64().expect("size") + hotplugged),
            "{info:#}"
        );
    }
}

fn put(socket: &std::path::Path, command: &str, body: &str) -> (u16, String) {
    let r = ApiClient::new(socket).request("PUT", command, Some(body)).expect("request");
    (r.status, r.body)
}

fn assert_status(got: (u16, String), status: u16, needle: &str) {
    assert!(got.0 == status && got.1.contains(needle), "wanted {status} with {needle:?}, got {got:?}");
}

/// The guest hammers both slot controllers at every width and offset, ejects
/// vCPU 0 and slots nobody asked for, selects slots far out of range, then
/// points virtio-rng buffers and rings into the unplugged window and across
/// the end of what was plugged. It ejects vCPU 1 only when asked.
#[test]
fn a_hostile_guest_neither_ends_the_vmm_nor_removes_a_vcpu_nor_reaches_unplugged_memory() {
    require_kvm!();
    let vmm = Vmm::start("hotplug-hostile-guest");
    vmm.boot("hotplug_hostile", 2, true);
    vmm.wait_for_serial("waiting for memory");
    let serial = vmm.serial();
    for line in
        ["after hammering: cpu0=1 cpu1=1 mem0=0", "unplugged: len=0", "below the window: len=0", "normal: len=16"]
    {
        assert!(serial.contains(line), "{line}\n{serial}");
    }
    vmm.assert_sizes(2, 0);

    assert_eq!(vmm.put("vm.resize", json!({"desired_ram": 256 * MIB})), (204, String::new()));
    vmm.assert_sizes(2, 128 * MIB);
    vmm.wait_for_serial("waiting for a removal");
    let serial = vmm.serial();
    for line in [
        "plugged: mem0=1 mem1=0",
        "after hammering plugged: mem0=1 mem1=0",
        "into plugged: len=16",
        "straddling the plugged end: len=0",
        "past the plugged end: len=0",
        "rings unplugged: needs_reset=1",
        "after restart: len=16",
    ] {
        assert!(serial.contains(line), "{line}\n{serial}");
    }

    vmm.assert_sizes(2, 128 * MIB);
    // The removal the host asks for, which the guest answers.
    assert_eq!(vmm.put("vm.resize", json!({"desired_vcpus": 1})), (204, String::new()));
    vmm.wait_for_serial("hostile done");
    assert!(vmm.serial().contains("ejected: cpu0=1 cpu1=0"), "{}", vmm.serial());
    vmm.assert_sizes(1, 128 * MIB);
    // Back again, and the VMM still answers and runs.
    assert_eq!(vmm.put("vm.resize", json!({"desired_vcpus": 2})), (204, String::new()));
    vmm.assert_sizes(2, 128 * MIB);
    assert_eq!(vmm.info()["state"], "Running");
    vmm.assert_alive();
}

/// Bad values answer 400 and change nothing; a smaller size is no error.
#[test]
fn bad_resize_values_are_refused_and_change_nothing() {
    require_kvm!();
    let vmm = Vmm::start("hotplug-hostile-values");
    vmm.boot("ticker", 1, true);
    let vcpus = "desired_vcpus: must be 1..=2";
    for (body, status, needle) in [
        (r#"{"desired_vcpus": 0}"#, 400, vcpus),
        (r#"{"desired_vcpus": 3}"#, 400, vcpus),
        (r#"{"desired_vcpus": 258}"#, 400, vcpus),
        (r#"{"desired_vcpus": 4294967295}"#, 400, vcpus),
        (r#"{"desired_vcpus": -1}"#, 400, ""),
        (r#"{"desired_vcpus": 1.5}"#, 400, ""),
        (r#"{"desired_ram": 18446744073709551615}"#, 400, "desired_ram"),
        (r#"{"desired_ram": 18446744073709551616}"#, 400, ""),
        (r#"{"desired_ram": 134217729}"#, 400, "desired_ram"),
        (r#"{"desired_ram": 402653185}"#, 400, "desired_ram"),
        (r#"{"desired_ram": 536870912}"#, 400, "desired_ram"),
        (r#"{"desired_ram": -134217728}"#, 400, ""),
    ] {
        assert_status(put(&vmm.0.socket, "vm.resize", body), status, needle);
        vmm.assert_sizes(1, 0);
    }
    // Less than the VM has, or nothing at all: left as it is.
    for body in [r#"{"desired_ram": 0}"#, r#"{"desired_ram": 4096}"#, r#"{}"#, r#"{"desired_vcpus": 1}"#] {
        assert_eq!(put(&vmm.0.socket, "vm.resize", body), (204, String::new()), "{body}");
        vmm.assert_sizes(1, 0);
    }
    // The whole window in one go, then nothing more fits.
    assert_eq!(vmm.put("vm.resize", json!({"desired_ram": 384 * MIB})), (204, String::new()));
    vmm.assert_sizes(1, 256 * MIB);
    assert_eq!(vmm.put("vm.resize", json!({"desired_ram": 384 * MIB})), (204, String::new()), "repeated");
    assert_status(vmm.put("vm.resize", json!({"desired_ram": 512 * MIB})), 400, "desired_ram");
    vmm.assert_sizes(1, 256 * MIB);
    vmm.assert_alive();
}

/// A request that is refused changes nothing, even the part of it that was
/// good: a client that hears 400 must not find a vCPU added.
#[test]
fn a_refused_resize_adds_no_vcpu_on_the_way() {
    require_kvm!();
    let vmm = Vmm::start("hotplug-hostile-combined");
    vmm.boot("ticker", 1, false);
    assert_status(vmm.put("vm.resize", json!({"desired_vcpus": 2, "desired_ram": 128 * MIB + 1})), 400, "desired_ram");
    vmm.assert_sizes(1, 0);
}

/// Many clients resizing at once: each hears 204 or 400, and `vm.info`
/// ends with one of the sizes asked for.
#[test]
fn concurrent_resizes_answer_each_client_and_leave_vm_info_consistent() {
    require_kvm!();
    let vmm = Vmm::start("hotplug-hostile-concurrent");
    vmm.boot("ticker", 1, true);
    let socket = vmm.0.socket.clone();
    let clients: Vec<_> = (0..6u64)
        .map(|i| {
            let socket = socket.clone();
            std::thread::spawn(move || {
                // Only additions: this guest never gives a vCPU back.
                let body = match i % 3 {
                    0 => json!({"desired_ram": 256 * MIB, "desired_vcpus": 2}),
                    1 => json!({"desired_ram": 384 * MIB}),
                    _ => json!({"desired_ram": 256 * MIB + 1, "desired_vcpus": 2}),
                };
                put(&socket, "vm.resize", &body.to_string())
            })
        })
        .collect();
    for client in clients {
        let (status, body) = client.join().expect("client");
        assert!(status == 204 || status == 400, "{status} {body}");
    }
    let info = vmm.info();
    let hotplugged = info["config"]["memory"]["hotplugged_size"].as_u64().unwrap_or(0);
    assert!([0, 128 * MIB, 256 * MIB].contains(&hotplugged), "{info:#}");
    let vcpus = info["config"]["cpus"]["boot_vcpus"].as_u64().expect("boot_vcpus");
    vmm.assert_sizes(vcpus, hotplugged);
    vmm.assert_alive();
}

/// Resize while paused (adding works, removing says to resume), then around
/// reboot, shutdown and delete.
#[test]
fn resize_while_paused_and_around_reboot_shutdown_and_delete() {
    require_kvm!();
    let vmm = Vmm::start("hotplug-hostile-states");
    vmm.boot("ticker", 1, true);
    assert_eq!(vmm.put("vm.pause", json!(null)).0, 204);
    assert_eq!(vmm.put("vm.resize", json!({"desired_vcpus": 2, "desired_ram": 256 * MIB})), (204, String::new()));
    vmm.assert_sizes(2, 128 * MIB);
    assert_eq!(vmm.info()["state"], "Paused");
    // At once, not after the eject timeout: a paused guest cannot answer.
    // (Cloud Hypervisor's status for a state conflict is 500; docs/api.md.)
    let started = Instant::now();
    assert_status(vmm.put("vm.resize", json!({"desired_vcpus": 1})), 500, "resume it first");
    assert!(started.elapsed() < Duration::from_secs(5), "it waited {:?}", started.elapsed());
    vmm.assert_sizes(2, 128 * MIB);
    assert_eq!(vmm.put("vm.resume", json!(null)).0, 204);
    assert_eq!(vmm.info()["state"], "Running");

    // A reboot builds the VM again: the vCPUs stay, the plugged memory goes.
    assert_eq!(vmm.put("vm.reboot", json!(null)).0, 204);
    // docs/api.md: "A reboot starts again from the boot size."
    vmm.assert_sizes(2, 0);
    assert_eq!(vmm.put("vm.resize", json!({"desired_ram": 384 * MIB})).0, 204);
    vmm.assert_sizes(2, 256 * MIB);

    assert_eq!(vmm.put("vm.shutdown", json!(null)).0, 204);
    let (status, body) = vmm.put("vm.resize", json!({"desired_vcpus": 1}));
    assert!(status == 204 || (400..500).contains(&status), "{status} {body}");
    let info = vmm.info();
    let hotplugged = info["config"]["memory"]["hotplugged_size"].as_u64().unwrap_or(0);
    assert_eq!(hotplugged, 0, "a shut-down VM has nothing plugged in: {info:#}");
    vmm.assert_sizes(if status == 204 { 1 } else { 2 }, 0);

    assert_eq!(vmm.put("vm.delete", json!(null)).0, 204);
    assert_status(vmm.put("vm.resize", json!({"desired_vcpus": 1})), 404, "no VM");
    vmm.assert_alive();
}

/// A hot-added vCPU that the guest keeps in real mode gets vCPU 0's CR pins
/// all the same once the grace has passed since it started, and it is
/// reported (it was a break: the grace only started in long mode).
#[test]
fn a_hot_added_vcpu_kept_in_real_mode_still_ends_up_pinned_or_reported() {
    require_kvm!();
    let vmm = Vmm::start("hotplug-hostile-realmode");
    vmm.boot("hotplug_realmode", 1, true);
    vmm.wait_for_serial("waiting for vCPU 1");
    assert!(vmm.serial().contains("pin WP rc=0"), "{}", vmm.serial());
    assert_eq!(vmm.put("vm.resize", json!({"desired_vcpus": 2})), (204, String::new()));
    vmm.wait_for_serial("vCPU 1 started in real mode");
    // Well past the 2 s grace.
    std::thread::sleep(Duration::from_secs(5));
    let get = |what: &str| -> Value {
        let r = ApiClient::new(&vmm.0.socket).request("GET", what, None).expect(what);
        serde_json::from_str(&r.body).expect("JSON")
    };
    // It runs: its loop's port writes exit, second after second.
    let exits = || get("vm.counters")["vcpu1"]["pio_exits"].as_u64().unwrap_or(0);
    let before = exits();
    std::thread::sleep(Duration::from_millis(500));
    assert!(before > 100 && exits() > before, "vCPU 1 does not run its loop: {before}");
    let heki = get("vm.heki");
    let pinned = heki["pins"][1]["cr0"] == heki["pins"][0]["cr0"];
    let reported = heki["counters"]["violations"].as_u64().unwrap_or(0) > 0;
    assert!(pinned || reported, "vCPU 1 runs unpinned and unreported: {heki:#}\n{:#}", get("vm.heki-violations"));
}

/// Before the boot, resize sets the boot sizes: a size no VM can boot with
/// is refused there, not at the boot.
#[test]
fn bad_resize_values_before_the_boot_are_refused_and_the_vm_still_boots() {
    require_kvm!();
    let vmm = Vmm::start("hotplug-hostile-preboot");
    vmm.create("ticker", 1, true);
    for body in [
        r#"{"desired_vcpus": 0}"#,
        r#"{"desired_vcpus": 3}"#,
        r#"{"desired_ram": 0}"#,
        r#"{"desired_ram": 1}"#,
        r#"{"desired_ram": 18446744073709551615}"#,
        r#"{"desired_ram": 9223372036854775808}"#,
    ] {
        let (status, answer) = put(&vmm.0.socket, "vm.resize", body);
        assert_eq!(status, 400, "{body}: {answer}");
        vmm.assert_sizes(1, 0);
        assert_eq!(vmm.info()["config"]["memory"]["size"], 128 * MIB, "{body}");
    }
    let (status, body) = vmm.put("vm.boot", json!(null));
    assert_eq!(status, 204, "{body}");
    assert_eq!(vmm.info()["state"], "Running");
}

/// While the VMM waits for a guest that will not eject, other clients are
/// answered (at worst with the API timeout), and the end state is consistent.
#[test]
fn clients_during_a_removal_the_guest_ignores_get_a_clear_answer() {
    require_kvm!();
    let vmm = Vmm::start("hotplug-hostile-waiting");
    vmm.boot("ticker", 2, true);
    let socket = vmm.0.socket.clone();
    let removal = std::thread::spawn(move || put(&socket, "vm.resize", r#"{"desired_vcpus": 1}"#));
    std::thread::sleep(Duration::from_millis(500));
    let started = Instant::now();
    let (status, body) = put(&vmm.0.socket, "vm.resize", r#"{"desired_ram": 268435456}"#);
    assert!(started.elapsed() < Duration::from_secs(12), "{:?}", started.elapsed());
    assert!(status == 204 || (500..600).contains(&status) || status == 409, "{status} {body}");
    let (status, body) = removal.join().expect("removal");
    assert!(status == 500 && body.contains("did not release vCPU 1"), "{status} {body}");
    let info = vmm.info();
    let hotplugged = info["config"]["memory"]["hotplugged_size"].as_u64().unwrap_or(0);
    vmm.assert_sizes(2, hotplugged);
    assert_eq!(vmm.info()["state"], "Running");
    vmm.assert_alive();
}

/// An introspection agent holds vCPU 1 (per-vCPU pause) while the host
/// removes it and the guest ejects it: the removal must either wait for the
/// agent or fail without leaving the guest and `vm.info` at odds; and once
/// the agent lets go, the host can give the guest its vCPU back.
#[test]
fn a_removal_while_the_agent_holds_the_vcpu_leaves_guest_and_host_agreeing() {
    require_kvm!();
    let vmm = Vmm::start("hotplug-hostile-agent");
    let agent_socket = vmm.0.dir.join("agent.sock");
    vmm.create_with("hotplug_eject", 2, true, json!({"socket": agent_socket}));
    assert_eq!(vmm.put("vm.boot", json!(null)).0, 204);
    vmm.wait_for_serial("ready to eject");
    let mut agent = connect_agent(&agent_socket);
    let paused = agent.call("pause", json!({"vcpu": 1})).expect("pause vCPU 1");
    assert_eq!(paused["paused"], true, "{paused}");

    let (status, body) = vmm.put("vm.resize", json!({"desired_vcpus": 1}));
    vmm.wait_for_serial("ejected vCPU 1");
    agent.call("resume", json!({"vcpu": 1})).expect("resume vCPU 1");
    let vcpus = vmm.info()["config"]["cpus"]["boot_vcpus"].as_u64().expect("boot_vcpus");
    assert!(
        (status == 204 && vcpus == 1) || (status != 204 && vcpus == 2),
        "answered {status} {body} with boot_vcpus {vcpus}"
    );
    // Whatever happened, asking for 2 again must give the guest vCPU 1:
    // the slot is enabled (the guest would see it) and its thread runs.
    let first = (status, body);
    let (status, body) = vmm.put("vm.resize", json!({"desired_vcpus": 2}));
    assert_eq!(status, 204, "{body}");
    vmm.assert_sizes(2, 0);
    std::thread::sleep(Duration::from_millis(500));
    let (status, body) = first;
    let serial = vmm.serial();
    let last = serial.lines().rev().find(|l| l.starts_with("slot 1 enabled="));
    assert!(
        last.is_none_or(|l| l == "slot 1 enabled=1"),
        "the guest sees vCPU 1 gone while vm.info counts it (first answer {status} {body}):\n{serial}"
    );
    let regs = agent.call("get-registers", json!({"vcpu": 1}));
    assert!(regs.is_ok(), "vCPU 1 does not answer: {regs:?}");
    vmm.assert_alive();
}

/// With heki on and an agent attached, the agent's reads and writes of the
/// unplugged window fail as outside RAM (and the VMM lives on); memory
/// plugged in is the agent's at once, up to the plugged end and no further.
#[test]
fn an_agent_reaches_plugged_memory_and_nothing_of_the_unplugged_window() {
    require_kvm!();
    let vmm = Vmm::start("hotplug-hostile-agent-memory");
    let agent_socket = vmm.0.dir.join("agent.sock");
    vmm.create_with("hotplug_eject", 1, true, json!({"socket": agent_socket}));
    assert_eq!(vmm.put("vm.boot", json!(null)).0, 204);
    vmm.wait_for_serial("ready to eject");
    let mut agent = connect_agent(&agent_socket);
    // CR tracking on a VM with room for more vCPUs (it timed out waiting
    // for vCPU 1, which does not exist yet).
    let started = Instant::now();
    agent.call("track-cr", json!({"enable": true})).expect("track-cr");
    assert!(started.elapsed() < Duration::from_secs(2), "track-cr took {:?}", started.elapsed());
    const WINDOW: u64 = 1 << 32;
    let errno = |r: Result<Value, api_client::introspect::Error>| match r {
        Err(api_client::introspect::Error::Refused { errno, .. }) => errno,
        other => panic!("expected a refusal, got {other:?}"),
    };
    let read = |agent: &mut api_client::introspect::Agent, gpa: u64, size: u64| {
        agent.call("read-memory", json!({"gpa": gpa, "size": size}))
    };
    let write = |agent: &mut api_client::introspect::Agent, gpa: u64| {
        agent.call("write-memory", json!({"gpa": gpa, "data": "5a5a5a5a5a5a5a5a"}))
    };
    for gpa in [WINDOW, WINDOW + 0x1000, WINDOW + 256 * MIB - 8, WINDOW - 4] {
        assert_eq!(errno(read(&mut agent, gpa, 8)), "EFAULT", "read {gpa:#x}");
        assert_eq!(errno(write(&mut agent, gpa)), "EFAULT", "write {gpa:#x}");
    }
    vmm.assert_alive();

    assert_eq!(vmm.put("vm.resize", json!({"desired_ram": 256 * MIB})), (204, String::new()));
    vmm.assert_sizes(1, 128 * MIB);
    write(&mut agent, WINDOW + 0x1000).expect("write plugged memory");
    let data = read(&mut agent, WINDOW + 0x1000, 8).expect("read plugged memory");
    assert_eq!(data["data"], "5a5a5a5a5a5a5a5a", "{data}");
    for gpa in [WINDOW + 128 * MIB - 4, WINDOW + 128 * MIB] {
        assert_eq!(errno(read(&mut agent, gpa, 8)), "EFAULT", "read {gpa:#x}");
        assert_eq!(errno(write(&mut agent, gpa)), "EFAULT", "write {gpa:#x}");
    }
    // No event came of any of it, and the VM runs on.
    assert!(agent.next_event(Some(Duration::from_millis(300))).expect("events").is_none());
    assert_eq!(vmm.info()["state"], "Running");
    vmm.assert_alive();
}

/// The guest maps the window itself: its accesses before the plug reach no
/// RAM (and the VMM lives on); after the plug it has fresh RAM there, and a
/// heki lock on it holds against its own writes and a device's DMA.
#[test]
fn the_guests_own_accesses_to_the_window_and_a_heki_lock_on_plugged_memory() {
    require_kvm!();
    let vmm = Vmm::start("hotplug-hostile-window");
    vmm.boot("hotplug_window", 1, true);
    vmm.wait_for_serial("waiting for memory");
    vmm.assert_alive();
    assert_eq!(vmm.info()["state"], "Running");
    assert_eq!(vmm.put("vm.resize", json!({"desired_ram": 256 * MIB})), (204, String::new()));
    vmm.wait_for_serial("window done");
    let serial = vmm.serial();
    for line in [
        "before the plug: read=ffffffffffffffff",
        "after the plug: read=0\n",
        "written: read=1122334455667788",
        "protect rc=0",
        "locked after a write: 77",
        "dma into locked: len=0 value=77",
        "dma into plugged: len=16",
    ] {
        assert!(serial.contains(line), "{line}\n{serial}");
    }
    vmm.assert_sizes(1, 128 * MIB);
    vmm.assert_alive();
}

/// vCPU 1 ejects itself as soon as asked, while vCPU 0 sends ejects nobody
/// asked for (of vCPU 0, of vCPU 1, of no slot) in a loop: only the host's
/// removal happens, and vCPU 1 stops running guest code.
#[test]
fn a_vcpu_that_ejects_itself_while_another_hammers_ejects_is_removed_once_and_only_when_asked() {
    require_kvm!();
    let vmm = Vmm::start("hotplug-hostile-self-eject");
    vmm.boot("hotplug_self_eject", 2, true);
    vmm.wait_for_serial("vCPU 1 runs");
    let counters = || -> Value {
        let r = ApiClient::new(&vmm.0.socket).request("GET", "vm.counters", None).expect("counters");
        serde_json::from_str(&r.body).expect("JSON")
    };
    std::thread::sleep(Duration::from_millis(300));
    vmm.assert_sizes(2, 0);
    let (status, body) = vmm.put("vm.resize", json!({"desired_vcpus": 1}));
    assert_eq!((status, body.as_str()), (204, ""));
    vmm.assert_sizes(1, 0);
    let exits = |c: Value| c["vcpu1"]["exits"].as_u64().unwrap_or(0);
    let before = exits(counters());
    assert!(before > 0, "vCPU 1 ran before its removal");
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(exits(counters()), before, "vCPU 1 still runs guest code after its removal");
    // vCPU 0 keeps ejecting: nothing more goes, and the host can add vCPU 1 back.
    vmm.assert_sizes(1, 0);
    assert_eq!(vmm.put("vm.resize", json!({"desired_vcpus": 2})), (204, String::new()));
    vmm.assert_sizes(2, 0);
    assert_eq!(vmm.info()["state"], "Running");
    vmm.assert_alive();
}

/// virtio-blk buffers in the unplugged window, across its plugged end and
/// in memory just plugged: the bad ones fail (no byte of the disk or of
/// guest memory changes), the good ones work, and the VMM lives on.
#[test]
fn virtio_blk_buffers_in_the_window_fail_until_plugged_and_work_after() {
    require_kvm!();
    let vmm = Vmm::start("hotplug-hostile-blk");
    let image = vmm.0.dir.join("disk.img");
    let mut bytes = vec![0u8; 1 << 20];
    bytes[..13].copy_from_slice(b"SECTOR ZERO\0\0");
    bytes[1024..1035].copy_from_slice(b"SECTOR TWO\0");
    std::fs::write(&image, &bytes).expect("disk image");
    vmm.create("hotplug_blk_window", 1, true);
    assert_eq!(vmm.put("vm.add-disk", json!({"path": image})).0, 204);
    assert_eq!(vmm.put("vm.boot", json!(null)).0, 204);
    vmm.wait_for_serial("waiting for memory");
    let serial = vmm.serial();
    let status = |serial: &str, what: &str| -> u32 {
        let line = serial.lines().find(|l| l.starts_with(what)).unwrap_or_else(|| panic!("no {what}:\n{serial}"));
        line[what.len()..].split_whitespace().next().and_then(|n| n.parse().ok()).expect("status")
    };
    for what in ["unplugged read: ", "unplugged write: ", "straddling read: "] {
        assert_ne!(status(&serial, what), 0, "{what}\n{serial}");
    }
    assert!(serial.contains("normal read: 0 data=SECTOR ZERO"), "{serial}");
    assert_eq!(vmm.put("vm.resize", json!({"desired_ram": 256 * MIB})), (204, String::new()));
    vmm.wait_for_serial("blk window done");
    let serial = vmm.serial();
    assert_eq!(status(&serial, "plugged read: "), 0, "{serial}");
    assert_eq!(status(&serial, "plugged write: "), 0, "{serial}");
    assert!(serial.contains("sector 3: 0 data=SECTOR ZERO"), "plugged memory carried the data: {serial}");
    for what in ["across the plugged end: ", "past the plugged end: "] {
        assert_ne!(status(&serial, what), 0, "{what}\n{serial}");
    }
    let after = std::fs::read(&image).expect("image");
    assert_eq!(&after[1024..1035], b"SECTOR TWO\0", "a write from unplugged memory reached the disk");
    vmm.assert_alive();
}

/// The introspection agent, once its socket listens.
fn connect_agent(socket: &std::path::Path) -> api_client::introspect::Agent {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        match api_client::introspect::Agent::connect(socket) {
            Ok(agent) => return agent,
            Err(e) => {
                assert!(std::time::Instant::now() < deadline, "no agent socket at {}: {e}", socket.display());
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }
}
