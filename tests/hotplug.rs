//! Devices added and removed over the API while a VM runs (`vm.add-disk`,
//! `vm.add-net` with SCM_RIGHTS descriptors, `vm.remove-device`) and
//! `vm.resize`; docs/api.md. The Linux guest's view is in tests/linux_hotplug.rs.

mod common;

use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use api_client::ApiClient;
use serde_json::{Value, json};

struct Vmm(common::ApiProcess);

impl Vmm {
    fn start(test: &str) -> Vmm {
        Vmm(common::ApiProcess::start(test, &[("HEKIVISOR_API_TIMEOUT_MS", "2000")]))
    }

    fn pid(&self) -> u32 {
        self.0.child.id()
    }

    fn put(&self, command: &str, body: Value) -> (u16, String) {
        let r = ApiClient::new(&self.0.socket).request("PUT", command, Some(&body.to_string())).expect("request");
        (r.status, r.body)
    }

    fn get(&self, command: &str) -> Value {
        let body = ApiClient::new(&self.0.socket).call("GET", command, None).expect("GET").expect("body");
        serde_json::from_str(&body).expect("JSON")
    }

    /// Creates and boots `guest` with heki on.
    fn boot(&self, guest: &str) {
        let config = json!({
            "cpus": {"boot_vcpus": 1, "max_vcpus": 2},
            "memory": {"size": 134217728},
            "payload": {"kernel": common::guests::build(guest)},
            "serial": {"mode": "File", "file": self.0.serial},
            "heki": {"enabled": true, "policy": "deny"},
        });
        assert_eq!(self.put("vm.create", config).0, 204);
        assert_eq!(self.put("vm.boot", json!(null)).0, 204);
    }

    fn serial(&self) -> String {
        std::fs::read_to_string(&self.0.serial).unwrap_or_default()
    }

    fn wait_for_serial(&self, needle: &str) {
        let deadline = Instant::now() + Duration::from_secs(60);
        while !self.serial().contains(needle) {
            assert!(Instant::now() < deadline, "no {needle:?} on the serial port:\n{}", self.serial());
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Names of the VMM's threads (a device worker is named after its device).
    fn threads(&self) -> Vec<String> {
        common::thread_names(self.pid())
    }

    /// How many of the VMM's descriptors are open on `path`.
    fn fds_on(&self, path: &Path) -> usize {
        common::fds_open_on(self.pid(), path)
    }
}

fn disk_image(dir: &Path, name: &str, first_bytes: &[u8]) -> PathBuf {
    let path = dir.join(name);
    let mut image = vec![0u8; 1 << 20];
    image[..first_bytes.len()].copy_from_slice(first_bytes);
    std::fs::write(&path, image).expect("disk image");
    path.canonicalize().expect("absolute path")
}

fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn a_hot_added_disk_serves_the_guest_under_the_dma_guard_and_its_removal_frees_slot_worker_and_image() {
    require_kvm!();
    let vmm = Vmm::start("hotplug-disk");
    vmm.boot("hotplug_blk");
    vmm.wait_for_serial("waiting for a disk");
    let image = disk_image(&vmm.0.dir, "hot.img", b"HOTPLUGGED sector zero");

    let (status, body) = vmm.put("vm.add-disk", json!({"path": image, "readonly": false}));
    assert_eq!(status, 200, "{body}");
    let info: Value = serde_json::from_str(&body).expect("PciDeviceInfo");
    assert_eq!(info, json!({"id": "_disk0", "bdf": "0000:00:01.0"}), "the first free slot, the first free id");

    // The guest found it and used it; its read into a page heki locked was refused.
    vmm.wait_for_serial("hotplug dma done");
    let serial = vmm.serial();
    for line in ["protect rc=0", "found a disk in slot 1", "status=f", "read: 0 data=HOTPLUGGED sector zero"] {
        assert!(serial.contains(line), "{line}\n{serial}");
    }
    assert!(serial.contains("read into protected: 1 page=LOCKED PAGE"), "{serial}");
    let counters = vmm.get("vm.counters");
    assert_eq!(counters["_disk0"]["dma_refused"], 1, "{counters:#}");
    let listed = vmm.get("vm.info")["config"]["disks"].clone();
    assert_eq!(listed[0]["id"], "_disk0", "vm.info lists the added disk: {listed:#}");
    assert!(vmm.threads().contains(&"_disk0".to_string()), "{:?}", vmm.threads());
    assert_eq!(vmm.fds_on(&image), 1, "the image is open once");

    assert_eq!(vmm.put("vm.remove-device", json!({"id": "_disk0"})).0, 204);
    wait_until("the worker to end", || !vmm.threads().contains(&"_disk0".to_string()));
    assert_eq!(vmm.fds_on(&image), 0, "the image is closed");
    assert!(vmm.get("vm.counters").get("_disk0").is_none());
    assert_eq!(vmm.get("vm.info")["config"]["disks"], json!([]), "gone from the config");
    let (status, body) = vmm.put("vm.remove-device", json!({"id": "_disk0"}));
    assert_eq!(status, 404, "{body}");
    assert!(body.contains("no removable device with id _disk0"), "{body}");

    // The slot and the id are free again.
    let (status, body) = vmm.put("vm.add-disk", json!({"path": image}));
    assert_eq!(
        (status, serde_json::from_str::<Value>(&body).ok()),
        (200, Some(json!({"id": "_disk0", "bdf": "0000:00:01.0"})))
    );
    let (status, body) = vmm.put("vm.add-disk", json!({"path": image, "id": "second"}));
    assert_eq!(
        (status, serde_json::from_str::<Value>(&body).ok()),
        (200, Some(json!({"id": "second", "bdf": "0000:00:02.0"})))
    );
    let (status, body) = vmm.put("vm.add-disk", json!({"path": image, "id": "second"}));
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("id second exists already"), "{body}");
    let (status, body) = vmm.put("vm.add-disk", json!({"path": vmm.0.dir.join("missing.img")}));
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("missing.img"), "{body}");

    // A reboot builds the added devices again, at the same addresses.
    assert_eq!(vmm.put("vm.reboot", json!(null)).0, 204);
    let counters = vmm.get("vm.counters");
    assert!(counters.get("_disk0").is_some() && counters.get("second").is_some(), "{counters:#}");
    assert_eq!(vmm.fds_on(&image), 2, "one descriptor per disk on the image");
    // Not while paused (a paused worker could not be stopped); after the resume, yes.
    assert_eq!(vmm.put("vm.pause", json!(null)).0, 204);
    let (status, body) = vmm.put("vm.remove-device", json!({"id": "second"}));
    assert!(status == 500 && body.contains("resume it first"), "{status} {body}");
    assert_eq!(vmm.put("vm.resume", json!(null)).0, 204);
    assert_eq!(vmm.put("vm.remove-device", json!({"id": "second"})).0, 204);
    wait_until("the image to close", || vmm.fds_on(&image) == 1);
    assert_eq!(vmm.put("vm.shutdown", json!(null)).0, 204);
}

#[test]
fn add_net_takes_its_tap_descriptor_from_scm_rights_and_refuses_a_count_that_differs() {
    require_kvm!();
    let vmm = Vmm::start("hotplug-net-fds");
    vmm.boot("ticker");
    let client = ApiClient::new(&vmm.0.socket);
    let null = std::fs::File::open("/dev/null").expect("open");
    // The VMM's stdin and stdout are /dev/null too; the descriptors we send must not add to them.
    let dev_null = Path::new("/dev/null");
    let before = vmm.fds_on(dev_null);

    // Two listed, one sent.
    let body = json!({"mac": "52:54:00:12:34:56", "fds": [3, 4]}).to_string();
    let r = client.request_with_fds("PUT", "vm.add-net", Some(&body), &[null.as_fd()]).expect("request");
    assert_eq!(r.status, 400, "{}", r.body);
    assert!(r.body.contains("fds: the body lists 2 descriptors but 1 came with the request"), "{}", r.body);
    // Descriptors on a request that takes none are closed too.
    let r = client.request_with_fds("GET", "vm.info", None, &[null.as_fd(), null.as_fd()]).expect("request");
    assert_eq!(r.status, 200);
    // A descriptor that is not a TAP: the device cannot be built, the caller hears why.
    let body = json!({"mac": "52:54:00:12:34:56"}).to_string();
    let r = client.request_with_fds("PUT", "vm.add-net", Some(&body), &[null.as_fd()]).expect("request");
    assert_eq!(r.status, 400, "{}", r.body);
    assert!(r.body.contains("net 0"), "{}", r.body);
    wait_until("the received descriptors to close", || vmm.fds_on(dev_null) == before);
    assert!(vmm.get("vm.info")["config"]["net"].is_null(), "nothing was added");
}

/// vCPUs come and go through ACPI CPU hotplug (tests/linux_hotplug.rs has
/// the Linux guest's view); this guest has no ACPI, so it never gives a vCPU
/// back, and the removal says so after the eject timeout.
#[test]
fn resize_adds_vcpus_and_names_what_a_change_needs() {
    require_kvm!();
    let vmm = Vmm::start("hotplug-resize");
    vmm.boot("ticker");
    assert_eq!(vmm.put("vm.resize", json!({"desired_vcpus": 1})).0, 204, "Kata's resize to the boot count");
    assert_eq!(vmm.put("vm.resize", json!({"desired_ram": 134217728})).0, 204);
    let (status, body) = vmm.put("vm.resize", json!({"desired_vcpus": 2}));
    assert_eq!(status, 204, "{body}");
    assert_eq!(vmm.get("vm.info")["config"]["cpus"]["boot_vcpus"], 2);
    // A thread names itself once it runs.
    wait_until("vCPU 1's thread", || vmm.threads().iter().any(|t| t == "vcpu1"));
    assert!(vmm.get("vm.counters").get("vcpu1").is_some());
    let started = std::time::Instant::now();
    let (status, body) = vmm.put("vm.resize", json!({"desired_vcpus": 1}));
    // Cloud Hypervisor's status for a request the VM's state refuses (docs/api.md).
    assert_eq!(status, 500, "{body}");
    assert!(body.contains("did not release vCPU 1 within 10s"), "{body}");
    assert!(started.elapsed() >= std::time::Duration::from_secs(10), "it waited for the eject");
    assert_eq!(vmm.get("vm.info")["config"]["cpus"]["boot_vcpus"], 2, "the vCPU stays");
    let (status, body) = vmm.put("vm.resize", json!({"desired_vcpus": 3}));
    assert!(status == 400 && body.contains("must be 1..=2 (max_vcpus)"), "{body}");
    let (status, body) = vmm.put("vm.resize", json!({"desired_ram": 268435456}));
    assert!(
        status == 400 && body.contains("desired_ram") && body.contains("memory.hotplug_size reserves no"),
        "{body}"
    );
    let (status, body) = vmm.put("vm.resize", json!({"desired_balloon": 1}));
    assert!(status == 400 && body.contains("virtio-balloon"), "{body}");
}

#[test]
fn a_disk_added_before_the_boot_joins_the_config_and_the_boot() {
    require_kvm!();
    let vmm = Vmm::start("hotplug-before-boot");
    let config = json!({
        "payload": {"kernel": common::guests::build("ticker")},
        "serial": {"mode": "File", "file": vmm.0.serial},
    });
    assert_eq!(vmm.put("vm.create", config).0, 204);
    let image = disk_image(&vmm.0.dir, "cold.img", b"x");
    assert_eq!(vmm.put("vm.add-disk", json!({"path": image})), (204, String::new()));
    assert_eq!(vmm.put("vm.resize", json!({"desired_vcpus": 1, "desired_ram": 268435456})).0, 204);
    assert_eq!(vmm.put("vm.boot", json!(null)).0, 204);
    let info = vmm.get("vm.info");
    assert_eq!(info["config"]["disks"][0]["id"], "_disk0");
    assert_eq!(info["config"]["memory"]["size"], 268435456);
    assert!(vmm.get("vm.counters").get("_disk0").is_some());
    assert_eq!(vmm.fds_on(&image), 1);
}

/// Runs hk-remote against `vmm` with `stdin` as its descriptor 0.
fn hk_remote(vmm: &Vmm, args: &[&str], stdin: std::process::Stdio) -> (bool, String, String) {
    let out = std::process::Command::new(common::hk_remote_bin())
        .arg("--api-socket")
        .arg(&vmm.0.socket)
        .args(args)
        .stdin(stdin)
        .output()
        .expect("run hk-remote");
    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    (out.status.success(), text(&out.stdout), text(&out.stderr))
}

#[test]
fn hk_remote_adds_and_removes_devices_in_ch_remote_syntax() {
    require_kvm!();
    let vmm = Vmm::start("hotplug-hk-remote");
    vmm.boot("ticker");
    let null = || std::process::Stdio::null();
    let image = disk_image(&vmm.0.dir, "hk.img", b"x");
    let (ok, out, err) = hk_remote(&vmm, &["add-disk", &format!("path={},id=data", image.display())], null());
    assert!(ok, "{err}");
    assert_eq!(serde_json::from_str::<Value>(&out).ok(), Some(json!({"id": "data", "bdf": "0000:00:01.0"})));

    // fd=[0]: hk-remote's stdin travels as SCM_RIGHTS. A TAP is taken ...
    let tap = vmm::devices::virtio::tap::Tap::open(&format!("hkhr{}", std::process::id() % 250))
        .expect("open a TAP (needs CAP_NET_ADMIN)");
    let fd = tap.as_fd().try_clone_to_owned().expect("dup");
    let (ok, out, err) = hk_remote(&vmm, &["add-net", "fd=[0],mac=52:54:00:4b:48:20"], fd.into());
    assert!(ok, "{err}");
    assert_eq!(serde_json::from_str::<Value>(&out).ok(), Some(json!({"id": "_net0", "bdf": "0000:00:02.0"})));
    assert_eq!(vmm.get("vm.info")["config"]["net"][0]["mac"], "52:54:00:4b:48:20");
    // ... anything else is refused, and said so.
    let (ok, _, err) = hk_remote(&vmm, &["add-net", "fd=[0]"], null());
    assert!(!ok && err.contains("not a TAP device"), "{err}");
    let (ok, _, err) = hk_remote(&vmm, &["add-net", "fd=[0,x]"], null());
    assert!(!ok && err.contains("'x' is not a descriptor number"), "{err}");

    let (ok, _, err) = hk_remote(&vmm, &["resize", "--cpus", "1", "--memory", "128M"], null());
    assert!(ok, "{err}");
    let (ok, _, err) = hk_remote(&vmm, &["resize", "--cpus", "2"], null());
    assert!(ok, "{err}");
    assert_eq!(vmm.get("vm.info")["config"]["cpus"]["boot_vcpus"], 2);
    let (ok, _, err) = hk_remote(&vmm, &["resize", "--memory", "1G"], null());
    assert!(!ok && err.contains("memory.hotplug_size"), "{err}");
    for id in ["data", "_net0"] {
        let (ok, out, err) = hk_remote(&vmm, &["remove-device", id], null());
        assert!(ok && out.is_empty(), "{err}");
    }
    let (ok, _, err) = hk_remote(&vmm, &["remove-device", "data"], null());
    assert!(!ok && err.contains("no removable device with id data"), "{err}");
    let socket = vmm.0.dir.join("vsock.sock");
    let (ok, out, err) = hk_remote(&vmm, &["add-vsock", &format!("cid=3,socket={}", socket.display())], null());
    assert!(ok, "{err}");
    assert_eq!(serde_json::from_str::<Value>(&out).ok(), Some(json!({"id": "_vsock", "bdf": "0000:00:01.0"})));
    let (ok, _, err) = hk_remote(&vmm, &["add-vsock", &format!("cid=4,socket={}", socket.display())], null());
    assert!(!ok && err.contains("one per VM"), "{err}");
    // virtio-fs needs shared memory without heki: refused by name on this VM.
    let (ok, _, err) = hk_remote(&vmm, &["add-fs", "tag=share,socket=/tmp/nowhere.sock"], null());
    assert!(!ok && err.contains("fs: not available with heki enabled"), "{err}");
}

#[test]
fn a_virtio_fs_share_added_at_run_time_connects_to_its_backend_and_its_removal_lets_it_go() {
    require_kvm!();
    let vmm = Vmm::start("hotplug-fs");
    let config = json!({
        "memory": {"size": 134217728, "shared": true},
        "payload": {"kernel": common::guests::build("ticker")},
        "serial": {"mode": "File", "file": vmm.0.serial},
    });
    assert_eq!(vmm.put("vm.create", config).0, 204);
    assert_eq!(vmm.put("vm.boot", json!(null)).0, 204);
    let share = vmm.0.dir.join("share");
    std::fs::create_dir_all(&share).expect("share");
    let mut backend = common::virtiofsd::Virtiofsd::start(&vmm.0.dir, &share);
    let (status, body) = vmm.put("vm.add-fs", json!({"tag": "hkshare", "socket": backend.socket}));
    assert_eq!(status, 200, "{body}");
    assert_eq!(serde_json::from_str::<Value>(&body).ok(), Some(json!({"id": "_fs0", "bdf": "0000:00:01.0"})));
    std::thread::sleep(Duration::from_millis(300));
    assert!(backend.child.try_wait().expect("wait").is_none(), "the backend serves the VM:\n{}", backend.log());
    assert_eq!(vmm.put("vm.remove-device", json!({"id": "_fs0"})).0, 204);
    // The VMM closed its vhost-user connection: virtiofsd ends, as with its VM.
    assert!(backend.wait_for_exit(Duration::from_secs(10)), "virtiofsd is let go:\n{}", backend.log());
}
