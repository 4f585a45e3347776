//! Kata's Cloud Hypervisor driver (`clh.go`), replayed against Hekivisor:
//! the calls Kata makes to start a sandbox, hot-plug a container's disk,
//! resize and stop, with Kata's own bodies (tests/fixtures/kata-clh-vm-create.json
//! for vm.create, the Go client's defaults for the rest), TAP descriptors
//! sent as SCM_RIGHTS as Kata sends them. One line per call, with its
//! status; the test fails on any answer Kata would not accept.
//!
//! `cargo nextest run --test kata_replay --no-capture` prints the lines
//! (scripts/kata-replay.sh does that).

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use api_client::{ApiClient, Response};
use serde_json::{Value, json};

struct Replay {
    client: ApiClient,
    lines: Vec<String>,
}

impl Replay {
    /// Logs the call and checks its status is one Kata accepts.
    fn check(&mut self, call: &str, r: &Response, accepted: &[u16]) {
        let detail = if r.is_success() { String::new() } else { format!(" ({})", r.error_message()) };
        let verdict = if accepted.contains(&r.status) { "ok for Kata" } else { "NOT ACCEPTED by Kata" };
        let line = format!("kata-replay: {call} -> {}{detail}: {verdict}", r.status);
        println!("{line}");
        self.lines.push(line);
        assert!(accepted.contains(&r.status), "{call}: Kata accepts {accepted:?}, got {} {}", r.status, r.body);
    }

    fn call(&mut self, method: &str, command: &str, body: Option<&Value>, accepted: &[u16]) -> Response {
        let text = body.map(Value::to_string);
        let r = self.client.request(method, command, text.as_deref()).expect("request");
        self.check(&format!("{method} {command}"), &r, accepted);
        r
    }

    /// `vm.info` as Kata reads it (`clh.vmInfo`): the state and the sizes it uses.
    fn info(&mut self, state: &str) -> Value {
        let r = self.call("GET", "vm.info", None, &[200]);
        let info: Value = serde_json::from_str(&r.body).expect("VmInfo JSON");
        assert_eq!(info["state"], state, "{info:#}");
        for field in ["/config/cpus/boot_vcpus", "/config/cpus/max_vcpus", "/config/memory/size"] {
            assert!(info.pointer(field).is_some_and(Value::is_u64), "Kata reads {field}: {info:#}");
        }
        info
    }
}

/// Kata's body with this host's paths: the test kernel, a rootfs image, the
/// virtiofsd and vsock sockets.
fn kata_body(dir: &Path, fs_socket: &Path) -> Value {
    let fixture = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/kata-clh-vm-create.json");
    let mut body: Value = serde_json::from_str(&std::fs::read_to_string(fixture).expect("fixture")).expect("JSON");
    let rootfs = dir.join("kata-containers.img");
    std::fs::write(&rootfs, vec![0u8; 1 << 20]).expect("rootfs image");
    body["payload"]["kernel"] = json!(common::guests::build("ticker"));
    body["disks"][0]["path"] = json!(rootfs);
    body["fs"][0]["socket"] = json!(fs_socket);
    body["vsock"]["socket"] = json!(dir.join("clh.sock"));
    body
}

#[test]
fn kata_clh_sequence_is_answered_as_kata_expects() {
    require_kvm!();
    let process = common::ApiProcess::start("kata-replay", &[]);
    let share = process.dir.join("shared");
    std::fs::create_dir_all(&share).expect("share dir");
    let _virtiofsd = common::virtiofsd::Virtiofsd::start(&process.dir, &share);
    let mut replay = Replay { client: ApiClient::new(&process.socket), lines: Vec::new() };

    // isClhRunning, then bootVM: create, info, add-net, boot, info.
    replay.call("GET", "vmm.ping", None, &[200]);
    // Kata's body whole: every field is honoured (docs/api.md).
    let body = kata_body(&process.dir, &_virtiofsd.socket);
    replay.call("PUT", "vm.create", Some(&body), &[204]);
    replay.info("Created");

    // vmAddNetPut: a connection of its own, the TAP descriptor as SCM_RIGHTS,
    // the Go client's NetConfig defaults (ip/mask included, not applied).
    let tap = vmm::devices::virtio::tap::Tap::open(&format!("hkkata{}", std::process::id() % 250))
        .expect("open a TAP (needs CAP_NET_ADMIN)");
    let net = json!({"mac": "52:54:00:4b:48:30", "ip": "192.168.249.1", "mask": "255.255.255.0", "iommu": false,
        "num_queues": 2, "queue_size": 256, "vhost_user": false, "vhost_mode": "Client",
        "offload_tso": true, "offload_ufo": true, "offload_csum": true});
    let r = replay
        .client
        .request_with_fds("PUT", "vm.add-net", Some(&net.to_string()), &[tap.as_fd()])
        .expect("vm.add-net");
    replay.check("PUT vm.add-net (1 fd as SCM_RIGHTS)", &r, &[200, 204]);
    replay.call("PUT", "vm.boot", None, &[204]);
    let info = replay.info("Running");
    assert_eq!(info["config"]["net"][0]["mac"], "52:54:00:4b:48:30", "the net added before the boot is there");

    // hotplugAddBlockDevice: a container's disk.
    let image = process.dir.join("container.img");
    std::fs::write(&image, vec![0u8; 1 << 20]).expect("container image");
    let disk = json!({"path": image, "readonly": false, "direct": false, "iommu": false, "num_queues": 1,
        "queue_size": 1024, "vhost_user": false, "backing_files": false, "sparse": true, "image_type": "Raw"});
    let r = replay.call("PUT", "vm.add-disk", Some(&disk), &[200]);
    let pci: Value = serde_json::from_str(&r.body).expect("PciDeviceInfo");
    // clhPciInfoToPath: "0000:00:DD.0" and nothing else.
    let bdf = pci["bdf"].as_str().expect("bdf");
    let tokens: Vec<&str> = bdf.split([':', '.']).collect();
    assert!(
        tokens.len() == 4 && tokens[0] == "0000" && tokens[1] == "00" && tokens[2].len() == 2 && tokens[3] == "0",
        "{bdf}"
    );
    let id = pci["id"].as_str().expect("id").to_string();

    // ResizeVCPUs sends the count it wants even when it is the current one;
    // ResizeMemory makes a call when vm.info reports a hotplug_size.
    let vcpus = info["config"]["cpus"]["boot_vcpus"].as_u64().expect("boot_vcpus");
    replay.call("PUT", "vm.resize", Some(&json!({"desired_vcpus": vcpus})), &[204]);
    // A container asking for one CPU more: the vCPU is hot-added (ACPI CPU
    // hotplug; tests/linux_hotplug.rs has a Linux guest onlining it).
    if info["config"]["cpus"]["max_vcpus"].as_u64().is_some_and(|max| max > vcpus) {
        replay.call("PUT", "vm.resize", Some(&json!({"desired_vcpus": vcpus + 1})), &[204]);
        let now = replay.info("Running");
        assert_eq!(now["config"]["cpus"]["boot_vcpus"], vcpus + 1, "ResizeVCPUs reads the count back");
    }
    let hotplug = info["config"]["memory"]["hotplug_size"].as_u64().unwrap_or(0);
    if hotplug == 0 {
        let line = "kata-replay: ResizeMemory: no call (vm.info reports no memory.hotplug_size, as Kata checks)";
        println!("{line}");
        replay.lines.push(line.to_string());
    } else {
        // ResizeMemory: the current size plus one memory block (Kata aligns
        // to the guest's 128 MiB blocks), plugged in through ACPI.
        let size = info["config"]["memory"]["size"].as_u64().unwrap_or(0);
        replay.call("PUT", "vm.resize", Some(&json!({"desired_ram": size + (128 << 20)})), &[204]);
        let now = replay.info("Running");
        assert_eq!(now["config"]["memory"]["hotplugged_size"], 128u64 << 20, "{now}");
    }

    // HotplugRemoveDevice, then terminate: vmm.shutdown.
    replay.call("PUT", "vm.remove-device", Some(&json!({"id": id})), &[204]);
    replay.call("PUT", "vmm.shutdown", None, &[204]);
    let mut child = process;
    let deadline = Instant::now() + Duration::from_secs(20);
    while child.child.try_wait().expect("wait").is_none() {
        assert!(Instant::now() < deadline, "vmm.shutdown ends the VMM");
        std::thread::sleep(Duration::from_millis(10));
    }
    println!("kata-replay: {} calls, each answered as Kata accepts", replay.lines.len());
}
