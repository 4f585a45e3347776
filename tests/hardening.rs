//! Hardening of the VMM process: every thread runs under its seccomp filter,
//! SIGTERM/SIGINT shut the VM down cleanly and a second signal forces the exit.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::guests;

/// A `hekivisor` booting the hardening guest with every kind of thread:
/// vCPU, API, event monitor, device workers (rng, disk, console), the CR
/// checker (heki on), the signal handler and stdin (serial on the terminal).
struct Vmm {
    child: Child,
    dir: PathBuf,
    socket: PathBuf,
    events: PathBuf,
    stdout: PathBuf,
    disk: PathBuf,
}

impl Vmm {
    fn start(test: &str, extra: &[&str]) -> Vmm {
        let dir = common::temp_dir(test);
        let (socket, events, stdout, disk) =
            (dir.join("api.sock"), dir.join("events.json"), dir.join("stdout.log"), dir.join("disk.img"));
        std::fs::File::create(&disk).and_then(|f| f.set_len(1 << 20)).expect("disk image");
        let child = Command::new(common::hekivisor_bin())
            .arg("--kernel")
            .arg(guests::build("hardening"))
            .args(["--serial", "tty", "--heki", "enabled=on", "--rng", "src=/dev/urandom"])
            .arg("--disk")
            // Two queues: the second has a worker of its own, under the same filter.
            .arg(format!("path={},num_queues=2", disk.display()))
            .arg("--console")
            .arg(format!("file={}", dir.join("console.log").display()))
            .arg("--api-socket")
            .arg(format!("path={}", socket.display()))
            .arg("--event-monitor")
            .arg(format!("path={}", events.display()))
            .args(extra)
            // A pipe that stays open keeps the stdin thread reading.
            .stdin(Stdio::piped())
            .stdout(std::fs::File::create(&stdout).expect("stdout file"))
            .stderr(std::fs::File::create(dir.join("stderr.log")).expect("stderr file"))
            .spawn()
            .expect("start hekivisor");
        let vmm = Vmm { child, dir, socket, events, stdout, disk };
        vmm.wait_for_serial("devices done");
        vmm
    }

    fn serial(&self) -> String {
        std::fs::read_to_string(&self.stdout).unwrap_or_default()
    }

    fn stderr(&self) -> String {
        std::fs::read_to_string(self.dir.join("stderr.log")).unwrap_or_default()
    }

    fn wait_for_serial(&self, text: &str) {
        let deadline = Instant::now() + Duration::from_secs(60);
        while !self.serial().contains(text) {
            assert!(Instant::now() < deadline, "no '{text}' on the serial port: {}\n{}", self.serial(), self.stderr());
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn signal(&self, signal: libc::c_int) {
        // SAFETY: kill() on our own child's pid.
        assert_eq!(unsafe { libc::kill(self.child.id() as libc::pid_t, signal) }, 0);
    }

    /// Waits for the exit; returns (exit code or 128 + signal, how long it took).
    fn wait(&mut self, timeout: Duration) -> (i32, Duration) {
        let start = Instant::now();
        let (status, timed_out) = common::wait_with_timeout(&mut self.child, timeout);
        assert!(!timed_out, "hekivisor did not exit within {timeout:?}: {}", self.stderr());
        let code =
            status.code().unwrap_or_else(|| 128 + std::os::unix::process::ExitStatusExt::signal(&status).unwrap_or(0));
        (code, start.elapsed())
    }

    fn events(&self) -> Vec<serde_json::Value> {
        let text = std::fs::read_to_string(&self.events).unwrap_or_default();
        event_monitor::parse_events(&text).expect("valid event stream")
    }
}

impl Drop for Vmm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// (thread name, Seccomp mode, number of filters) of every thread of `pid`.
fn threads(pid: u32) -> Vec<(String, u32, u32)> {
    let mut all = Vec::new();
    for entry in std::fs::read_dir(format!("/proc/{pid}/task")).expect("task list").flatten() {
        let status = std::fs::read_to_string(entry.path().join("status")).unwrap_or_default();
        let field = |name: &str| -> Option<String> {
            status.lines().find_map(|l| l.strip_prefix(name)).map(|v| v.trim().to_string())
        };
        let (Some(name), Some(mode)) = (field("Name:"), field("Seccomp:")) else { continue };
        let filters = field("Seccomp_filters:").and_then(|v| v.parse().ok()).unwrap_or(0);
        all.push((name, mode.parse().unwrap_or(0), filters));
    }
    all
}

fn has_event(events: &[serde_json::Value], source: &str, event: &str) -> bool {
    events.iter().any(|e| e["source"] == source && e["event"] == event)
}

#[test]
fn every_thread_runs_under_a_seccomp_filter_and_sigterm_shuts_down_cleanly() {
    require_kvm!();
    let mut vmm = Vmm::start("hardening-seccomp", &[]);
    let pid = vmm.child.id();
    let threads = threads(pid);
    let names: Vec<&str> = threads.iter().map(|(n, _, _)| n.as_str()).collect();
    for expected in [
        "hekivisor",
        "vcpu0",
        "http-api",
        "event-monitor",
        "_rng",
        "_disk0",
        "_disk0-q1",
        "_console",
        "heki-cr-check",
        "signal-handler",
        "stdin",
    ] {
        assert!(names.contains(&expected), "no {expected} thread among {names:?}");
    }
    for (name, mode, filters) in &threads {
        // 2: SECCOMP_MODE_FILTER.
        assert_eq!(*mode, 2, "{name} runs without a seccomp filter ({threads:?})");
        assert!(*filters >= 1, "{name}: {filters} filters");
    }
    // Threads the VMM thread starts run under its filter and their own.
    for (name, _, filters) in threads.iter().filter(|(n, _, _)| n.starts_with("vcpu") || n.starts_with('_')) {
        assert_eq!(*filters, 2, "{name}");
    }

    vmm.signal(libc::SIGTERM);
    let (code, took) = vmm.wait(Duration::from_secs(20));
    assert_eq!(code, 0, "exit status after SIGTERM (took {took:?}): {}", vmm.stderr());
    let events = vmm.events();
    assert!(has_event(&events, "vmm", "signal"), "{events:?}");
    assert!(has_event(&events, "vm", "shutdown"), "{events:?}");
    let last = events.last().expect("events");
    assert_eq!((last["source"].as_str(), last["event"].as_str()), (Some("vmm"), Some("shutdown")), "{events:?}");
    assert!(!vmm.socket.exists(), "the API socket is left behind");
    let image = std::fs::read(&vmm.disk).expect("disk image");
    assert_eq!(&image[..14], b"HARDENING DISK", "the guest's write reached the disk");
    assert!(!vmm.stderr().contains("seccomp"), "{}", vmm.stderr());
}

#[test]
fn a_second_signal_forces_the_exit() {
    require_kvm!();
    let mut vmm = Vmm::start("hardening-second-signal", &[]);
    // An open API connection holds a clean shutdown for up to 5 s (the VMM
    // waits for connections to drain), long enough for a second signal.
    let mut connection = std::os::unix::net::UnixStream::connect(&vmm.socket).expect("connect");
    std::io::Write::write_all(&mut connection, b"GET /api/v1/vmm.ping HTTP/1.1\r\nHost: x\r\n")
        .expect("partial request");
    std::thread::sleep(Duration::from_millis(100));
    vmm.signal(libc::SIGINT);
    std::thread::sleep(Duration::from_millis(500));
    vmm.signal(libc::SIGINT);
    let (code, took) = vmm.wait(Duration::from_secs(20));
    assert_eq!(code, 128 + libc::SIGINT, "forced exit status (took {took:?}): {}", vmm.stderr());
    assert!(took < Duration::from_secs(3), "the second signal did not force the exit at once: {took:?}");
    assert!(vmm.stderr().contains("SIGINT again"), "{}", vmm.stderr());
}

#[test]
fn sigterm_stops_an_idle_api_server_and_removes_its_socket() {
    let dir = common::temp_dir("hardening-idle");
    let socket = dir.join("api.sock");
    let mut child = Command::new(common::hekivisor_bin())
        .arg("--api-socket")
        .arg(format!("path={}", socket.display()))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start hekivisor");
    wait_for_socket(&socket);
    // SAFETY: kill() on our own child's pid.
    assert_eq!(unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) }, 0);
    let (status, timed_out) = common::wait_with_timeout(&mut child, Duration::from_secs(20));
    assert!(!timed_out && status.success(), "{status:?}");
    assert!(!socket.exists(), "the API socket is left behind");
}

#[test]
fn seccomp_false_installs_no_filter() {
    let dir = common::temp_dir("hardening-seccomp-off");
    let socket = dir.join("api.sock");
    let mut child = Command::new(common::hekivisor_bin())
        .arg("--api-socket")
        .arg(format!("path={}", socket.display()))
        .args(["--seccomp", "false"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start hekivisor");
    wait_for_socket(&socket);
    let threads = threads(child.id());
    let _ = child.kill();
    let _ = child.wait();
    assert!(threads.iter().all(|(_, mode, _)| *mode == 0), "{threads:?}");
}

fn wait_for_socket(socket: &Path) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::os::unix::net::UnixStream::connect(socket).is_err() {
        assert!(Instant::now() < deadline, "API socket never appeared");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// landlock on (`landlock_enable` over the API): the VM boots, its devices
/// work and it reboots; a kernel the configuration did not name cannot be
/// opened afterwards, but a path given in `landlock_rules` can.
#[test]
fn landlock_keeps_the_configured_files_and_refuses_any_other() {
    require_kvm!();
    let vmm = common::ApiProcess::start("hardening-landlock", &[]);
    let dir = &vmm.dir;
    let disk = dir.join("disk.img");
    std::fs::File::create(&disk).and_then(|f| f.set_len(1 << 20)).expect("disk image");
    let kernel = guests::build("hardening");
    // Same kernel, at paths landlock was not told about / was told about.
    let other = dir.join("other");
    let allowed = dir.join("allowed");
    for d in [&other, &allowed] {
        std::fs::create_dir_all(d).expect("dir");
        std::fs::copy(&kernel, d.join("kernel.elf")).expect("copy kernel");
    }
    let config = |kernel: &Path| {
        format!(
            r#"{{"memory":{{"size":134217728}},"payload":{{"kernel":"{}","cmdline":"reboot=kbd"}},
               "serial":{{"mode":"File","file":"{}"}},"console":{{"mode":"File","file":"{}"}},
               "rng":{{"src":"/dev/urandom"}},"disks":[{{"path":"{}"}}],
               "landlock_enable":true,"landlock_rules":[{{"path":"{}","access":"r"}}]}}"#,
            kernel.display(),
            vmm.serial.display(),
            dir.join("console.log").display(),
            disk.display(),
            allowed.display()
        )
    };
    let client = api_client::ApiClient::new(&vmm.socket);
    let call = |method: &str, command: &str, body: Option<&str>| {
        let r = client.request(method, command, body).expect("request");
        (r.status, r.body)
    };
    assert_eq!(call("PUT", "vm.create", Some(&config(&kernel))).0, 204);
    assert_eq!(call("PUT", "vm.boot", None).0, 204);
    // Each boot runs rng, disk and console, then reboots: three rounds.
    let deadline = Instant::now() + Duration::from_secs(60);
    let serial = || std::fs::read_to_string(&vmm.serial).unwrap_or_default();
    while serial().matches("devices done").count() < 3 {
        assert!(Instant::now() < deadline, "reboots under landlock: {}", serial());
        std::thread::sleep(Duration::from_millis(20));
    }
    let s = serial();
    assert!(s.contains("rng: 32") && s.contains("disk: write 0 flush 0") && s.contains("console: 0"), "{s}");
    // A kernel the configuration never named: refused by landlock.
    assert_eq!(call("PUT", "vm.shutdown", None).0, 204);
    assert_eq!(call("PUT", "vm.delete", None).0, 204);
    assert_eq!(call("PUT", "vm.create", Some(&config(&other.join("kernel.elf")))).0, 204);
    let (status, body) = call("PUT", "vm.boot", None);
    assert_ne!(status, 204, "a kernel outside the landlock rules booted");
    assert!(body.contains("Permission denied") || body.contains("denied"), "{body}");
    // One under a landlock_rules path: allowed.
    assert_eq!(call("PUT", "vm.delete", None).0, 204);
    assert_eq!(call("PUT", "vm.create", Some(&config(&allowed.join("kernel.elf")))).0, 204);
    let (status, body) = call("PUT", "vm.boot", None);
    assert_eq!(status, 204, "{body}");
}

/// Runs `ip ARGS...`; false if it failed (no iproute2, or no right to do it).
fn ip(args: &[&str]) -> bool {
    Command::new("ip").args(args).stderr(Stdio::null()).status().is_ok_and(|s| s.success())
}

const CAP_NET_ADMIN: libc::c_ulong = 12;

/// Boots the virtio-net guest with `net` in a process without
/// CAP_NET_ADMIN (dropped from its bounding set before exec), keeping `fd` open.
fn run_without_cap_net_admin(test: &str, net: &str, fd: Option<libc::c_int>) -> common::Run {
    use std::os::unix::process::CommandExt;
    let dir = common::temp_dir(test);
    let serial = dir.join("serial.log");
    let mut command = Command::new(common::hekivisor_bin());
    command
        .arg("--kernel")
        .arg(guests::build("virtio_net"))
        .arg("--serial")
        .arg(format!("file={}", serial.display()))
        .args(["--net", net])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    // SAFETY: between fork and exec the closure makes only async-signal-safe
    // system calls (fcntl, prctl) on descriptors and state of the child.
    unsafe {
        command.pre_exec(move || {
            if let Some(fd) = fd
                && libc::fcntl(fd, libc::F_SETFD, 0) < 0
            {
                return Err(std::io::Error::last_os_error());
            }
            if libc::prctl(libc::PR_CAPBSET_DROP, CAP_NET_ADMIN, 0, 0, 0) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = command.spawn().expect("start hekivisor");
    let (status, timed_out) = common::wait_with_timeout(&mut child, Duration::from_secs(60));
    let mut stderr = String::new();
    if let Some(mut err) = child.stderr.take() {
        let _ = std::io::Read::read_to_string(&mut err, &mut stderr);
    }
    common::Run { status, serial: std::fs::read_to_string(&serial).unwrap_or_default(), stderr, timed_out }
}

/// Least privilege for networking: a TAP created and opened beforehand is
/// passed in as `--net fd=N`, and the VMM, without CAP_NET_ADMIN, moves real
/// packets through it; without the descriptor it could not create a TAP.
#[test]
fn a_pre_opened_tap_needs_no_cap_net_admin() {
    require_kvm!();
    let name = format!("hkfd{}", std::process::id() % 100_000);
    if !ip(&["tuntap", "add", "dev", &name, "mode", "tap"]) {
        eprintln!("SKIPPED: cannot create a TAP here (needs iproute2 and CAP_NET_ADMIN)");
        return;
    }
    struct Cleanup(String);
    impl Drop for Cleanup {
        fn drop(&mut self) {
            ip(&["tuntap", "del", "dev", &self.0, "mode", "tap"]);
        }
    }
    let _cleanup = Cleanup(name.clone());
    assert!(ip(&["addr", "add", "192.168.249.1/24", "dev", &name]) && ip(&["link", "set", &name, "up"]));
    // Open it as a TAP (IFF_TAP | IFF_NO_PI), the way a privileged helper would.
    let tun = std::fs::OpenOptions::new().read(true).write(true).open("/dev/net/tun").expect("/dev/net/tun");
    let mut ifreq = [0u8; 40];
    ifreq[..name.len()].copy_from_slice(name.as_bytes());
    ifreq[16..18].copy_from_slice(&(0x0002i16 | 0x1000).to_ne_bytes());
    let fd = std::os::fd::AsRawFd::as_raw_fd(&tun);
    // SAFETY: TUNSETIFF reads and writes a 40-byte struct ifreq, which `ifreq` is.
    assert_eq!(unsafe { libc::ioctl(fd, 0x4004_54ca, ifreq.as_mut_ptr()) }, 0, "TUNSETIFF");

    let run = run_without_cap_net_admin("hardening-tap-fd", &format!("fd={fd}"), Some(fd));
    assert!(run.status.success(), "stderr: {}", run.stderr);
    assert!(run.serial.contains("arp reply from 192.168.249.1 is-at "), "{}", run.serial);

    let denied = run_without_cap_net_admin("hardening-tap-name", &format!("tap={name}x"), None);
    assert!(!denied.status.success(), "created a TAP without CAP_NET_ADMIN: {}", denied.serial);
    assert!(denied.stderr.contains("Operation not permitted"), "{}", denied.stderr);
}
