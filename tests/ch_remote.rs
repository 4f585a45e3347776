//! Cloud Hypervisor's real `ch-remote`, unmodified, against Hekivisor.
//!
//! Runs only when `CH_REMOTE` names a `ch-remote` binary; build one from a
//! local Cloud Hypervisor checkout with `scripts/build-ch-remote.sh`:
//!
//! ```sh
//! CH_REMOTE=$(scripts/build-ch-remote.sh ../cloud-hypervisor) cargo test --test ch_remote -- --nocapture
//! ```
//!
//! Without it the test says so and passes. The matrix drives every command
//! `ch-remote` has for the lifecycle, in the right state and the wrong ones,
//! and checks what a user sees: the exit code, the JSON on stdout, and on
//! stderr the status `ch-remote` names (`Server responded with BadRequest`,
//! `NotFound`, `InternalServerError`, `NotImplemented`; never `Unknown`)
//! followed by our message. `--nocapture` prints one line per command.

mod common;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

/// The `ch-remote` binary to drive, or why the test cannot run.
fn ch_remote_bin() -> Result<PathBuf, String> {
    let Some(path) = std::env::var_os("CH_REMOTE") else {
        return Err("CH_REMOTE is not set; build ch-remote with scripts/build-ch-remote.sh CH_CHECKOUT \
                    and set CH_REMOTE to the path it prints"
            .into());
    };
    let path = PathBuf::from(path);
    // A named binary that is missing is a broken setup, not a reason to skip.
    assert!(path.is_file(), "CH_REMOTE={} is not a file", path.display());
    Ok(path)
}

/// What `ch-remote` did for one command.
#[derive(Debug)]
struct Outcome {
    success: bool,
    stdout: String,
    stderr: String,
}

struct ChRemote {
    bin: PathBuf,
    socket: PathBuf,
    /// One line per command, printed at the end.
    log: Vec<String>,
}

impl ChRemote {
    fn run(&mut self, args: &[&str], stdin: Option<&str>) -> Outcome {
        self.run_with(args, stdin, None)
    }

    /// Runs with `fd` as ch-remote's descriptor 0 (for `add-net fd=[0]`).
    fn run_with_fd(&mut self, args: &[&str], fd: std::os::fd::OwnedFd) -> Outcome {
        self.run_with(args, None, Some(fd))
    }

    fn run_with(&mut self, args: &[&str], stdin: Option<&str>, fd: Option<std::os::fd::OwnedFd>) -> Outcome {
        let input = match (stdin, fd) {
            (_, Some(fd)) => Stdio::from(fd),
            (Some(_), None) => Stdio::piped(),
            (None, None) => Stdio::null(),
        };
        let mut child = Command::new(&self.bin)
            .arg("--api-socket")
            .arg(&self.socket)
            .args(args)
            .stdin(input)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start ch-remote");
        if let Some(input) = stdin {
            let mut pipe = child.stdin.take().expect("stdin pipe");
            pipe.write_all(input.as_bytes()).expect("write ch-remote's stdin");
        }
        let out = child.wait_with_output().expect("ch-remote output");
        let outcome = Outcome {
            success: out.status.success(),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        };
        let shown = if outcome.success {
            let body = outcome.stdout.trim();
            if body.is_empty() { "ok".to_string() } else { format!("ok, {} bytes of JSON", body.len()) }
        } else {
            let status = outcome.stderr.lines().find_map(|l| l.split("Server responded with ").nth(1));
            // The last line of the chain, without ch-remote's "N: " prefix.
            let last = outcome.stderr.lines().last().unwrap_or("").trim();
            let last = last.split_once(": ").filter(|(n, _)| n.parse::<u32>().is_ok()).map_or(last, |(_, m)| m);
            format!("failed, {} / {last}", status.unwrap_or("no answer"))
        };
        let via = if stdin.is_some() { " <stdin" } else { "" };
        // Config files by name only, to keep the lines short.
        let args: Vec<&str> = args
            .iter()
            .map(|a| {
                if Path::new(a).is_file() { Path::new(a).file_name().and_then(|n| n.to_str()).unwrap_or(a) } else { a }
            })
            .collect();
        self.log.push(format!("ch-remote {}{via} -> {shown}", args.join(" ")));
        outcome
    }

    /// The command succeeds and prints nothing (a 204).
    fn done(&mut self, args: &[&str]) {
        let out = self.run(args, None);
        assert!(out.success && out.stdout.trim().is_empty(), "{args:?}: {out:?}");
    }

    /// The command succeeds and prints a JSON object.
    fn json(&mut self, args: &[&str]) -> Value {
        let out = self.run(args, None);
        assert!(out.success, "{args:?}: {out:?}");
        serde_json::from_str(out.stdout.trim()).unwrap_or_else(|e| panic!("{args:?} printed no JSON ({e}): {out:?}"))
    }

    /// The command fails, and `ch-remote` names `status` and prints `needle`.
    fn refused(&mut self, args: &[&str], stdin: Option<&str>, status: &str, needle: &str) -> Outcome {
        let out = self.run(args, stdin);
        assert!(!out.success, "{args:?} succeeded: {out:?}");
        assert!(out.stderr.contains(&format!("Server responded with {status}\n")), "{args:?}: {}", out.stderr);
        assert!(out.stderr.contains("Error from API"), "{args:?}: {}", out.stderr);
        assert!(out.stderr.contains(needle), "{args:?}: {} lacks {needle:?}", out.stderr);
        assert!(!out.stderr.contains("Unknown"), "{args:?}: a status ch-remote cannot name: {}", out.stderr);
        assert!(!out.stderr.contains("Can't get remote's error messages"), "{args:?}: {}", out.stderr);
        out
    }

    fn state(&mut self) -> String {
        self.json(&["info"])["state"].as_str().expect("state is a string").to_string()
    }
}

/// `add-disk`, `add-net fd=[...]` (the TAP travels as SCM_RIGHTS),
/// `remove-device` and `resize`, in ch-remote's own syntax, on a running VM
/// whose slot 1 holds its rng.
fn check_hotplug(ch: &mut ChRemote, dir: &Path) {
    ch.done(&["resize", "--cpus", "1"]);
    ch.refused(&["resize", "--cpus", "2"], None, "BadRequest", "desired_vcpus: must be 1..=1 (max_vcpus)");
    ch.refused(&["resize", "--memory", "256M"], None, "BadRequest", "memory.hotplug_size reserves no address space");
    let image = dir.join("hot.img");
    std::fs::write(&image, vec![0u8; 1 << 20]).expect("disk image");
    let disk_arg = format!("path={}", image.display());
    let disk = ch.json(&["add-disk", &disk_arg]);
    assert_eq!(disk, serde_json::json!({"id": "_disk0", "bdf": "0000:00:02.0"}));
    ch.refused(&["add-disk", "path=/nonexistent/hk.img"], None, "BadRequest", "/nonexistent/hk.img");
    let tap = vmm::devices::virtio::tap::Tap::open(&format!("hkch{}", std::process::id() % 250))
        .expect("open a TAP (needs CAP_NET_ADMIN)");
    let out =
        ch.run_with_fd(&["add-net", "fd=[0],mac=52:54:00:4b:48:10"], tap.as_fd().try_clone_to_owned().expect("dup"));
    assert!(out.success, "{out:?}");
    let net: Value = serde_json::from_str(out.stdout.trim()).expect("PciDeviceInfo");
    assert_eq!(net, serde_json::json!({"id": "_net0", "bdf": "0000:00:03.0"}));
    let null = std::fs::File::open("/dev/null").expect("/dev/null");
    let out = ch.run_with_fd(&["add-net", "fd=[0]"], null.into());
    assert!(!out.success && out.stderr.contains("not a TAP device"), "{out:?}");
    ch.done(&["remove-device", "_disk0"]);
    ch.refused(&["remove-device", "_disk0"], None, "NotFound", "no removable device with id _disk0");
    assert_eq!(ch.json(&["add-disk", &disk_arg])["bdf"], "0000:00:02.0", "the freed slot is reused");
    ch.done(&["remove-device", "_disk0"]);
    ch.done(&["remove-device", "_net0"]);
    let vsock_arg = format!("cid=3,socket={}", dir.join("vsock.sock").display());
    assert_eq!(ch.json(&["add-vsock", &vsock_arg]), serde_json::json!({"id": "_vsock", "bdf": "0000:00:02.0"}));
    ch.refused(&["add-vsock", &vsock_arg], None, "BadRequest", "one per VM");
    ch.done(&["remove-device", "_vsock"]);
    // This VM's memory is not shared: a virtio-fs share is refused, naming why.
    ch.refused(&["add-fs", "tag=share,socket=/tmp/nowhere.sock"], None, "BadRequest", "memory.shared");
}

#[test]
fn the_real_ch_remote_drives_the_whole_matrix() {
    let bin = match ch_remote_bin() {
        Ok(bin) => bin,
        Err(reason) => {
            eprintln!("SKIPPED: {reason}");
            return;
        }
    };
    require_kvm!();
    let mut process = common::ApiProcess::start("ch-remote", &[]);
    let mut ch = ChRemote { bin, socket: process.socket.clone(), log: Vec::new() };
    let kernel = common::guests::build("ticker");
    let config = common::cloud_hypervisor_config(&kernel, &process.serial);
    let config_file = process.dir.join("vm.json");
    std::fs::write(&config_file, &config).expect("write the config");
    let config_path = config_file.to_str().expect("UTF-8 path");
    let write = |name: &str, text: &str| {
        let path = process.dir.join(name);
        std::fs::write(&path, text).expect("write a config");
        path.to_str().expect("UTF-8 path").to_string()
    };

    // No VM yet: ping answers, everything else is NotFound.
    let version = Command::new(&ch.bin).arg("--version").output().expect("ch-remote --version");
    assert!(version.status.success(), "{version:?}");
    println!("{}", String::from_utf8_lossy(&version.stdout).trim());
    let ping = ch.json(&["ping"]);
    assert_eq!(ping["pid"], process.child.id(), "{ping}");
    for command in ["info", "counters", "boot", "pause", "resume", "reboot", "power-button", "shutdown", "delete"] {
        ch.refused(&[command], None, "NotFound", "no VM has been created");
    }

    // Bad configs: 400, naming what is wrong; the VMM lives on.
    let bad_json = write("bad.json", "{\"cpus\": {");
    ch.refused(&["create", &bad_json], None, "BadRequest", "invalid JSON");
    let typo = write("typo.json", &config.replace("\"boot_vcpus\"", "\"boot_vcpu\""));
    ch.refused(&["create", &typo], None, "BadRequest", "cpus.boot_vcpu: unknown field");
    let unsupported = write("mergeable.json", &config.replace("\"mergeable\":false", "\"mergeable\":true"));
    ch.refused(&["create", &unsupported], None, "BadRequest", "memory.mergeable: not supported by Hekivisor");
    let wrong_type = write("type.json", &config.replace("\"size\":134217728", "\"size\":\"big\""));
    ch.refused(&["create", &wrong_type], None, "BadRequest", "memory.size");
    ch.refused(&["create", "-"], Some(""), "BadRequest", "invalid JSON");
    // Kata's body is created as it comes; vm.info reports its segments and hotplug window.
    let kata = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/kata-clh-vm-create.json");
    ch.done(&["create", kata]);
    let info = ch.json(&["info"]);
    assert_eq!(info["config"]["platform"]["num_pci_segments"], 2, "{info}");
    assert_eq!(info["config"]["fs"][0]["pci_segment"], 1, "{info}");
    assert_eq!(info["config"]["memory"]["hotplug_size"], 17179869184u64, "{info}");
    ch.done(&["delete"]);

    // Created, from a file.
    ch.done(&["create", config_path]);
    ch.refused(&["create", config_path], None, "InternalServerError", "a VM already exists");
    assert_eq!(ch.state(), "Created");
    ch.refused(&["pause"], None, "InternalServerError", "cannot pause a VM in state Created");
    ch.refused(&["resume"], None, "InternalServerError", "cannot resume a VM in state Created");
    ch.refused(&["shutdown"], None, "InternalServerError", "cannot shut down a VM in state Created");
    ch.refused(&["reboot"], None, "InternalServerError", "cannot reboot a VM in state Created");

    // Running.
    ch.done(&["boot"]);
    assert_eq!(ch.state(), "Running");
    ch.refused(&["boot"], None, "InternalServerError", "cannot boot a VM in state Running");
    ch.refused(&["resume"], None, "InternalServerError", "cannot resume a VM in state Running");
    let counters = ch.json(&["counters"]);
    assert!(counters["vcpu0"]["exits"].as_u64().is_some_and(|n| n > 0), "{counters}");
    ch.refused(&["power-button"], None, "NotImplemented", "no ACPI power button device");
    ch.refused(&["snapshot", "file:///tmp/hk-snapshot"], None, "NotImplemented", "does not implement vm.snapshot");
    check_hotplug(&mut ch, &process.dir);
    ch.refused(&["nmi"], None, "NotImplemented", "does not implement vm.nmi");

    // Paused and resumed.
    ch.done(&["pause"]);
    assert_eq!(ch.state(), "Paused");
    ch.refused(&["pause"], None, "InternalServerError", "cannot pause a VM in state Paused");
    ch.done(&["resume"]);
    assert_eq!(ch.state(), "Running");

    // Reboot, shut down, boot again, delete.
    ch.done(&["reboot"]);
    assert_eq!(ch.state(), "Running");
    ch.done(&["shutdown"]);
    assert_eq!(ch.state(), "Shutdown");
    ch.refused(&["reboot"], None, "InternalServerError", "cannot reboot a VM in state Shutdown");
    ch.refused(&["pause"], None, "InternalServerError", "cannot pause a VM in state Shutdown");
    ch.done(&["boot"]);
    assert_eq!(ch.state(), "Running");
    ch.done(&["delete"]);
    ch.refused(&["info"], None, "NotFound", "no VM has been created");

    // Created from stdin, both spellings; the config vm.info reports goes back in.
    let out = ch.run(&["create", "-"], Some(&config));
    assert!(out.success && out.stdout.trim().is_empty(), "{out:?}");
    let reported = ch.json(&["info"])["config"].to_string();
    ch.done(&["delete"]);
    let out = ch.run(&["create"], Some(&reported));
    assert!(out.success, "vm.info's config, through stdin: {out:?}");
    assert_eq!(ch.state(), "Created");
    ch.done(&["boot"]);
    assert_eq!(ch.state(), "Running");

    // The VMM goes away on shutdown-vmm, with the VM running.
    ch.done(&["shutdown-vmm"]);
    let deadline = Instant::now() + Duration::from_secs(10);
    while process.child.try_wait().expect("wait").is_none() {
        assert!(Instant::now() < deadline, "shutdown-vmm ends the process");
        std::thread::sleep(Duration::from_millis(10));
    }
    let out = ch.run(&["ping"], None);
    assert!(!out.success && out.stderr.contains("Error opening HTTP socket"), "{out:?}");

    println!("{}", ch.log.join("\n"));
    println!("ch-remote matrix: {} commands, each answered as expected", ch.log.len());
}
