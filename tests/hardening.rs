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
            .arg(format!("path={}", disk.display()))
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
