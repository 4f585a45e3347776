//! The project's Linux guest (drivers flavour) sees devices added and
//! removed at run time: a TAP handed over with `vm.add-net` as SCM_RIGHTS
//! carries a ping, a disk added with `vm.add-disk` is read, released by the
//! guest and removed with `vm.remove-device` (its worker and image closed),
//! and the next disk takes its slot. Booted with `acpi=off`, the guest hears
//! of nothing and the host tells it when to rescan (docs/api.md); with ACPI,
//! its acpiphp finds an added disk and lets a removed one go through the
//! GED and the DSDT's hotplug slots (docs/platform.md). Commands go to the guest's
//! init (scripts/linux-guest/drivers-init.sh, `hk_hotplug=1`) on the serial
//! console.

mod common;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::time::{Duration, Instant};

use api_client::ApiClient;
use serde_json::{Value, json};
use vmm::devices::virtio::tap::Tap;

const CMDLINE: &str = "console=ttyS0 noxsave clearcpuid=smap,popcnt,cx16 panic=-1 hk_hotplug=1";
/// The guest's ACPI left out: no hotplug notifications, as in a guest without ACPI.
const NO_ACPI: &str = "acpi=off";
/// The VMM's wait for an ACPI guest's eject (device_manager's `EJECT_TIMEOUT`).
const EJECT_TIMEOUT: Duration = Duration::from_secs(10);
const TIMEOUT: Duration = Duration::from_secs(240);

fn linux_guest() -> PathBuf {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/linux-guest/build.sh");
    let out = Command::new(&script).arg("drivers").stderr(Stdio::piped()).output().expect("run build.sh");
    assert!(out.status.success(), "build.sh drivers failed:\n{}", String::from_utf8_lossy(&out.stderr));
    PathBuf::from(String::from_utf8_lossy(&out.stdout).lines().last().unwrap_or_default())
}

struct Guest {
    child: Child,
    stdin: ChildStdin,
    socket: PathBuf,
    serial: PathBuf,
    stderr: PathBuf,
    dir: PathBuf,
}

impl Guest {
    fn start(test: &str, extra_cmdline: &str) -> Guest {
        Guest::start_with(test, extra_cmdline, &[])
    }

    fn start_with(test: &str, extra_cmdline: &str, extra_args: &[&str]) -> Guest {
        let guest = linux_guest();
        let dir = common::temp_dir(test);
        let (socket, serial, stderr) = (dir.join("api.sock"), dir.join("serial.log"), dir.join("stderr.log"));
        let mut child = Command::new(common::hekivisor_bin())
            .arg("--kernel")
            .arg(guest.join("vmlinux"))
            .arg("--initramfs")
            .arg(guest.join("initramfs.cpio"))
            .args(["--cmdline", &format!("{CMDLINE} {extra_cmdline}"), "--no-reboot", "--serial", "tty"])
            .args(if extra_args.contains(&"--memory") { &[][..] } else { &["--memory", "size=256M"][..] })
            .args(["--heki", "enabled=on,policy=deny"])
            .args(extra_args)
            .arg("--api-socket")
            .arg(format!("path={}", socket.display()))
            .stdin(Stdio::piped())
            .stdout(std::fs::File::create(&serial).expect("serial file"))
            .stderr(std::fs::File::create(&stderr).expect("stderr file"))
            .spawn()
            .expect("start hekivisor");
        let stdin = child.stdin.take().expect("stdin pipe");
        Guest { child, stdin, socket, serial, stderr, dir }
    }

    fn serial(&self) -> String {
        String::from_utf8_lossy(&std::fs::read(&self.serial).unwrap_or_default()).into_owned()
    }

    fn report(&self) -> String {
        format!("serial:\n{}\nstderr:\n{}", self.serial(), std::fs::read_to_string(&self.stderr).unwrap_or_default())
    }

    /// The guest's answers so far ("hotplug: ..." lines, from "hotplug:" on).
    fn answers(&self) -> Vec<String> {
        self.serial()
            .split_inclusive('\n')
            .filter(|l| l.ends_with('\n'))
            .filter_map(|l| l.find("hotplug: ").map(|at| l[at..].trim_end().to_string()))
            .collect()
    }

    fn wait_for_answers(&mut self, count: usize) -> String {
        let deadline = Instant::now() + TIMEOUT;
        loop {
            if let Some(answer) = self.answers().get(count - 1) {
                return answer.clone();
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("hekivisor ended ({status}) while waiting for answer {count}\n{}", self.report());
            }
            assert!(Instant::now() < deadline, "no answer {count} within {TIMEOUT:?}\n{}", self.report());
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Sends one command line to the guest's init and returns its answer.
    fn command(&mut self, line: &str) -> String {
        self.command_lines(line, 1).remove(0)
    }

    /// Sends one command line and returns its `count` answer lines.
    fn command_lines(&mut self, line: &str, count: usize) -> Vec<String> {
        let before = self.answers().len();
        writeln!(self.stdin, "{line}").expect("write to the serial console");
        self.stdin.flush().expect("flush");
        self.wait_for_answers(before + count);
        self.answers()[before..before + count].to_vec()
    }

    fn put(&self, command: &str, body: Value) -> (u16, Value) {
        let r = ApiClient::new(&self.socket).request("PUT", command, Some(&body.to_string())).expect("request");
        (r.status, serde_json::from_str(&r.body).unwrap_or(Value::String(r.body.clone())))
    }

    /// Asks `line` until the guest answers `wanted`, as the guest finds
    /// things out on its own.
    fn wait_for_answer(&mut self, line: &str, wanted: &str) {
        let deadline = Instant::now() + TIMEOUT;
        while self.command(line) != wanted {
            assert!(Instant::now() < deadline, "no {wanted:?} within {TIMEOUT:?}\n{}", self.report());
            std::thread::sleep(Duration::from_millis(500));
        }
    }

    fn pid(&self) -> u32 {
        self.child.id()
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

impl Drop for Guest {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn disk_image(dir: &Path, name: &str, pattern: &[u8; 22]) -> PathBuf {
    let path = dir.join(name);
    let mut image = vec![0u8; 1 << 20];
    image[..22].copy_from_slice(pattern);
    std::fs::write(&path, image).expect("disk image");
    path.canonicalize().expect("absolute path")
}

#[test]
fn linux_sees_a_tap_and_a_disk_added_at_run_time_and_the_disk_go() {
    require_kvm!();
    let mut guest = Guest::start("linux-hotplug", NO_ACPI);
    assert_eq!(guest.wait_for_answers(1), "hotplug: ready");

    // A TAP of this process's own, opened and addressed here (as Kata does),
    // handed over as SCM_RIGHTS. The body's ip/mask are not applied to it.
    let id = std::process::id() % 250;
    let tap = Tap::open(&format!("hkhp{id}")).expect("open a TAP (needs CAP_NET_ADMIN)");
    let host_ip = format!("10.248.{id}.1").parse().expect("address");
    tap.configure(host_ip, "255.255.255.0".parse().expect("mask")).expect("address the TAP");
    let body = json!({"mac": "52:54:00:4b:48:99", "ip": format!("10.249.{id}.1"), "mask": "255.255.255.0"});
    let r = ApiClient::new(&guest.socket)
        .request_with_fds("PUT", "vm.add-net", Some(&body.to_string()), &[tap.as_fd()])
        .expect("vm.add-net");
    assert_eq!(r.status, 200, "{}\n{}", r.body, guest.report());
    let net: Value = serde_json::from_str(&r.body).expect("PciDeviceInfo");
    assert_eq!(net["id"], "_net0");
    let addresses = Command::new("ip").args(["-4", "addr", "show", "dev", &tap.name]).output().expect("ip");
    let addresses = String::from_utf8_lossy(&addresses.stdout);
    assert!(addresses.contains(&format!("10.248.{id}.1")) && !addresses.contains("10.249."), "{addresses}");
    assert_eq!(guest.command("rescan"), "hotplug: rescanned");
    assert_eq!(guest.command(&format!("ping 10.248.{id}")), "hotplug: ping: ok", "{}", guest.report());

    // A disk: added, read, released by the guest, removed by the host.
    let image = disk_image(&guest.dir, "hot.img", b"hekivisor-hotplug-disk");
    let (status, disk) = guest.put("vm.add-disk", json!({"path": image}));
    assert_eq!(status, 200, "{disk}\n{}", guest.report());
    assert_eq!(disk["id"], "_disk0");
    assert_eq!(guest.command("rescan"), "hotplug: rescanned");
    assert_eq!(guest.command("read vda"), "hotplug: read: hekivisor-hotplug-disk", "{}", guest.report());
    assert_eq!(guest.command("release vda"), "hotplug: released vda", "{}", guest.report());
    assert_eq!(guest.put("vm.remove-device", json!({"id": "_disk0"})).0, 204);
    assert!(!guest.threads().contains(&"_disk0".to_string()), "the worker ended: {:?}", guest.threads());
    assert_eq!(guest.fds_on(&image), 0, "the image is closed");
    // A rescan finds nothing in its slot any more.
    assert_eq!(guest.command("rescan"), "hotplug: rescanned");
    assert_eq!(guest.command("check vda"), "hotplug: vda absent", "{}", guest.report());

    // The next disk takes the freed slot, and works.
    let second = disk_image(&guest.dir, "second.img", b"second-hotplugged-disk");
    let (status, again) = guest.put("vm.add-disk", json!({"path": second}));
    assert_eq!(status, 200, "{again}");
    assert_eq!(again["bdf"], disk["bdf"], "the freed slot is reused");
    assert_eq!(guest.command("rescan"), "hotplug: rescanned");
    assert_eq!(guest.command("read vda"), "hotplug: read: second-hotplugged-disk", "{}", guest.report());

    assert_eq!(guest.command("end"), "hotplug: done");
    // The guest's reboot ends the VM (--no-reboot); the VMM serves its API until told to go.
    let deadline = Instant::now() + Duration::from_secs(60);
    let client = ApiClient::new(&guest.socket);
    let state = || client.call("GET", "vm.info", None).ok().flatten().unwrap_or_default();
    while !state().contains("\"state\":\"Shutdown\"") {
        assert!(Instant::now() < deadline, "the guest did not end the VM\n{}", guest.report());
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(guest.put("vmm.shutdown", json!(null)).0, 204);
    let (status, timed_out) = common::wait_with_timeout(&mut guest.child, Duration::from_secs(30));
    assert!(!timed_out && status.success(), "the VMM exits cleanly ({status})\n{}", guest.report());
}

#[test]
fn linux_with_acpi_finds_an_added_disk_and_lets_a_removed_one_go_unprompted() {
    require_kvm!();
    let mut guest = Guest::start("linux-acpi-hotplug", "");
    assert_eq!(guest.wait_for_answers(1), "hotplug: ready");
    // acpiphp took the DSDT's slots 1-31 as hotplug slots.
    assert_eq!(guest.command("slots"), "hotplug: slots: 31", "{}", guest.report());

    // Added: the GED interrupt, a device check on its slot, acpiphp scans it. No rescan.
    let image = disk_image(&guest.dir, "hot.img", b"hekivisor-hotplug-disk");
    let (status, disk) = guest.put("vm.add-disk", json!({"path": image}));
    assert_eq!(status, 200, "{disk}\n{}", guest.report());
    guest.wait_for_answer("check vda", "hotplug: vda present");
    assert_eq!(guest.command("read vda"), "hotplug: read: hekivisor-hotplug-disk", "{}", guest.report());

    // Removed: an eject request on its slot; acpiphp lets the device go and
    // calls _EJ0, and only then does the VMM take it away. The guest is not
    // told to release it; a VMM that gave up waiting would answer after
    // EJECT_TIMEOUT and leave the guest a dead /dev/vda.
    let asked = Instant::now();
    assert_eq!(guest.put("vm.remove-device", json!({"id": "_disk0"})).0, 204);
    let took = asked.elapsed();
    assert!(took < EJECT_TIMEOUT, "the guest ejected the slot (the removal took {took:?})\n{}", guest.report());
    assert_eq!(guest.command("check vda"), "hotplug: vda absent", "{}", guest.report());
    assert!(!guest.threads().contains(&"_disk0".to_string()), "the worker ended: {:?}", guest.threads());
    assert_eq!(guest.fds_on(&image), 0, "the image is closed");

    // The next disk takes the freed slot and is found the same way.
    let second = disk_image(&guest.dir, "second.img", b"second-hotplugged-disk");
    let (status, again) = guest.put("vm.add-disk", json!({"path": second}));
    assert_eq!(status, 200, "{again}");
    assert_eq!(again["bdf"], disk["bdf"], "the freed slot is reused");
    guest.wait_for_answer("check vda", "hotplug: vda present");
    assert_eq!(guest.command("read vda"), "hotplug: read: second-hotplugged-disk", "{}", guest.report());
    eprintln!("removal answered after {took:?}");
    assert_eq!(guest.command("end"), "hotplug: done");
}

/// `vm.resize` gives a running Linux guest more vCPUs and takes them back
/// through ACPI CPU hotplug; each added vCPU sits where the configured
/// topology says (two threads per core, two cores); a removed one is
/// ejected by the guest and parked, and comes back as a new CPU. heki stays
/// on throughout with no violation. `noreplace-smp` keeps the kernel's LOCK
/// prefixes, which a kernel booted on one CPU would otherwise strip and
/// could not put back under heki's text lock (docs/linux-guest.md).
#[test]
fn linux_gets_vcpus_added_and_removed_by_resize_where_the_topology_puts_them() {
    let cpus = ["--cpus", "boot=1,max=4,topology=2:2:1:1"];
    let mut guest = Guest::start_with("linux-cpu-hotplug", "noreplace-smp", &cpus);
    assert_eq!(guest.wait_for_answers(1), "hotplug: ready");
    assert_eq!(guest.command("cpus"), "hotplug: cpus: present=0 online=0");

    let (status, body) = guest.put("vm.resize", json!({"desired_vcpus": 3}));
    assert_eq!(status, 204, "{body}");
    guest.wait_for_answer("cpus", "hotplug: cpus: present=0-2 online=0");
    assert_eq!(guest.command("online 1"), "hotplug: cpu1 online");
    assert_eq!(guest.command("online 2"), "hotplug: cpu2 online");
    let topology = guest.command_lines("topology", 3);
    let line = |cpu: u8, core: u8, threads: &str| {
        format!("hotplug: topology: /sys/devices/system/cpu/cpu{cpu} package=0 die=0 core={core} threads={threads}")
    };
    assert_eq!(topology, [line(0, 0, "0-1"), line(1, 0, "0-1"), line(2, 1, "2")], "{}", guest.report());
    let info = |guest: &Guest| {
        let r = ApiClient::new(&guest.socket).request("GET", "vm.info", None).expect("vm.info");
        serde_json::from_str::<Value>(&r.body).expect("vm.info JSON")["config"]["cpus"]["boot_vcpus"].clone()
    };
    assert_eq!(info(&guest), 3);

    // Back to two: the guest offlines and ejects vCPU 2 before the answer.
    let (status, body) = guest.put("vm.resize", json!({"desired_vcpus": 2}));
    assert_eq!(status, 204, "{body}");
    assert_eq!(guest.command("cpus"), "hotplug: cpus: present=0-1 online=0-1");
    assert_eq!(info(&guest), 2);
    assert!(guest.threads().iter().any(|t| t == "vcpu2"), "the parked vCPU keeps its thread");

    // vCPU 2 again, and vCPU 3: a parked vCPU starts over from INIT and SIPI.
    let (status, body) = guest.put("vm.resize", json!({"desired_vcpus": 4}));
    assert_eq!(status, 204, "{body}");
    guest.wait_for_answer("cpus", "hotplug: cpus: present=0-3 online=0-1");
    assert_eq!(guest.command("online 2"), "hotplug: cpu2 online");
    assert_eq!(guest.command("online 3"), "hotplug: cpu3 online");
    assert_eq!(guest.command("cpus"), "hotplug: cpus: present=0-3 online=0-3");
    assert_eq!(guest.command_lines("topology", 4)[3], line(3, 1, "2-3"));

    let (status, body) = guest.put("vm.resize", json!({"desired_vcpus": 5}));
    assert_eq!(status, 400, "above max_vcpus: {body}");
    assert!(body.to_string().contains("max_vcpus"), "{body}");
    let r = ApiClient::new(&guest.socket).request("GET", "vm.heki", None).expect("vm.heki");
    let heki: Value = serde_json::from_str(&r.body).expect("vm.heki JSON");
    let violations = ApiClient::new(&guest.socket).request("GET", "vm.heki-violations", None).expect("violations");
    assert_eq!(heki["counters"]["violations"], 0, "{}", violations.body);
    // Each added vCPU took vCPU 0's CR pins (the kernel had set the bits).
    let boot_pins = &heki["pins"][0];
    for id in 1..4 {
        let pins = &heki["pins"][id];
        assert_eq!((&pins["cr0"], &pins["cr4"]), (&boot_pins["cr0"], &boot_pins["cr4"]), "vCPU {id}: {heki}");
    }
    assert_eq!(guest.command("end"), "hotplug: done");
}

/// `vm.resize` with `desired_ram` plugs memory into a running Linux guest
/// through ACPI memory devices, a 128 MiB slot at a time; the kernel adds
/// and onlines each block, with heki on and no violation. Less than the
/// guest has changes nothing (as in Cloud Hypervisor); an amount that is
/// not whole slots, or more than the window holds, is refused by name.
#[test]
fn linux_gets_memory_plugged_in_by_resize_and_onlines_it() {
    let memory = ["--memory", "size=256M,hotplug_size=512M"];
    let mut guest = Guest::start_with("linux-memory-hotplug", "", &memory);
    assert_eq!(guest.wait_for_answers(1), "hotplug: ready");
    let total_kb = |answer: &str| -> u64 {
        answer.split("total_kb=").nth(1).and_then(|r| r.split(' ').next()).and_then(|n| n.parse().ok()).unwrap_or(0)
    };
    let before = guest.command("memory");
    assert!(before.ends_with("blocks_online=2"), "{before}");
    const MIB: u64 = 1 << 20;

    let (status, body) = guest.put("vm.resize", json!({"desired_ram": 384 * MIB}));
    assert_eq!(status, 204, "{body}");
    let wanted = format!("hotplug: memory: total_kb={} blocks_online=3", total_kb(&before) + 128 * 1024);
    guest.wait_for_answer("memory", &wanted);
    let info = |guest: &Guest| {
        let r = ApiClient::new(&guest.socket).request("GET", "vm.info", None).expect("vm.info");
        serde_json::from_str::<Value>(&r.body).expect("vm.info JSON")
    };
    let now = info(&guest);
    assert_eq!(now["config"]["memory"]["size"], 256 * MIB, "the boot size stays, as in Cloud Hypervisor");
    assert_eq!(now["config"]["memory"]["hotplugged_size"], 128 * MIB);
    assert_eq!(now["memory_actual_size"], 384 * MIB);

    let (status, body) = guest.put("vm.resize", json!({"desired_ram": 385 * MIB}));
    assert_eq!(status, 400, "{body}");
    assert!(body.to_string().contains("slots of 134217728 bytes"), "{body}");
    let (status, body) = guest.put("vm.resize", json!({"desired_ram": 768 * MIB}));
    assert_eq!(status, 204, "{body}");
    let wanted = format!("hotplug: memory: total_kb={} blocks_online=6", total_kb(&before) + 512 * 1024);
    guest.wait_for_answer("memory", &wanted);
    let (status, body) = guest.put("vm.resize", json!({"desired_ram": 896 * MIB}));
    assert_eq!(status, 400, "{body}");
    assert!(body.to_string().contains("0 bytes of memory.hotplug_size are left"), "{body}");
    assert_eq!(guest.put("vm.resize", json!({"desired_ram": 256 * MIB})).0, 204, "less: nothing changes");
    assert_eq!(info(&guest)["memory_actual_size"], 768 * MIB);

    let r = ApiClient::new(&guest.socket).request("GET", "vm.heki", None).expect("vm.heki");
    let heki: Value = serde_json::from_str(&r.body).expect("vm.heki JSON");
    assert_eq!(heki["counters"]["violations"], 0, "{heki}");
    assert_eq!(guest.command("end"), "hotplug: done");
}
