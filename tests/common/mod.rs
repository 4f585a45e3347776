//! Shared helpers for the integration tests: building guests, running
//! `hekivisor`, and skipping cleanly where `/dev/kvm` is missing.
#![allow(dead_code)]

pub mod guests;
pub mod json_schema;
pub mod virtiofsd;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// Returns early from a test (with a printed reason) on hosts without KVM.
#[macro_export]
macro_rules! require_kvm {
    () => {
        if let Some(reason) = $crate::common::kvm_missing() {
            eprintln!("SKIPPED: {reason}");
            return;
        }
    };
}

/// Why KVM tests cannot run here, if they cannot.
pub fn kvm_missing() -> Option<String> {
    match std::fs::OpenOptions::new().read(true).write(true).open("/dev/kvm") {
        Ok(_) => None,
        Err(e) => Some(format!("this test needs /dev/kvm ({e})")),
    }
}

pub fn hekivisor_bin() -> &'static str {
    env!("CARGO_BIN_EXE_hekivisor")
}

pub fn hk_remote_bin() -> &'static str {
    env!("CARGO_BIN_EXE_hk-remote")
}

/// A fresh directory under target/ for one test.
pub fn temp_dir(test: &str) -> PathBuf {
    static COUNTER: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("target/test-tmp")
        .join(format!("{test}-{}-{n}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("create test dir");
    dir
}

/// The outcome of one `hekivisor` run.
#[derive(Debug)]
pub struct Run {
    pub status: ExitStatus,
    pub serial: String,
    pub stderr: String,
    pub timed_out: bool,
}

/// Waits for a child with a deadline; kills it when the deadline passes.
pub fn wait_with_timeout(child: &mut Child, timeout: Duration) -> (ExitStatus, bool) {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait().expect("wait for hekivisor") {
            return (status, false);
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            return (child.wait().expect("reap hekivisor"), true);
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Boots `kernel` with extra CLI arguments; serial output goes to a file that is read back.
pub fn run_vm(test: &str, kernel: &Path, extra: &[&str]) -> Run {
    let dir = temp_dir(test);
    let serial = dir.join("serial.log");
    let serial_arg = format!("file={}", serial.display());
    let mut child = Command::new(hekivisor_bin())
        .arg("--kernel")
        .arg(kernel)
        .args(["--serial", &serial_arg])
        .args(extra)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start hekivisor");
    let (status, timed_out) = wait_with_timeout(&mut child, Duration::from_secs(60));
    let mut stderr = String::new();
    if let Some(mut err) = child.stderr.take() {
        use std::io::Read;
        let _ = err.read_to_string(&mut stderr);
    }
    Run { status, serial: std::fs::read_to_string(&serial).unwrap_or_default(), stderr, timed_out }
}

/// Runs `hekivisor` with exactly these arguments (for CLI error cases).
pub fn run_hekivisor(args: &[&str]) -> Run {
    let mut child = Command::new(hekivisor_bin())
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start hekivisor");
    let (status, timed_out) = wait_with_timeout(&mut child, Duration::from_secs(30));
    let mut stdout = String::new();
    let mut stderr = String::new();
    use std::io::Read;
    if let Some(mut o) = child.stdout.take() {
        let _ = o.read_to_string(&mut stdout);
    }
    if let Some(mut e) = child.stderr.take() {
        let _ = e.read_to_string(&mut stderr);
    }
    Run { status, serial: stdout, stderr, timed_out }
}

/// Boots `kernel` with an event monitor file; returns the run and its parsed events.
pub fn run_vm_with_events(test: &str, kernel: &Path, extra: &[&str]) -> (Run, Vec<serde_json::Value>) {
    let events = temp_dir(test).join("events.json");
    let monitor = format!("path={}", events.display());
    let mut args = extra.to_vec();
    args.extend_from_slice(&["--event-monitor", &monitor]);
    let run = run_vm(test, kernel, &args);
    let text = std::fs::read_to_string(&events).unwrap_or_default();
    (run, event_monitor::parse_events(&text).expect("valid event stream"))
}

/// A `hekivisor` serving its REST API and writing events, killed when dropped.
/// Its stderr goes to a file, for failure messages.
pub struct ApiProcess {
    pub child: Child,
    pub dir: PathBuf,
    pub socket: PathBuf,
    pub events: PathBuf,
    pub serial: PathBuf,
    pub stderr: PathBuf,
}

impl ApiProcess {
    /// Starts it with these extra environment variables; returns once the socket answers.
    pub fn start(test: &str, env: &[(&str, &str)]) -> ApiProcess {
        let dir = temp_dir(test);
        let socket = dir.join("api.sock");
        let events = dir.join("events.json");
        let stderr = dir.join("stderr.log");
        let child = Command::new(hekivisor_bin())
            .arg("--api-socket")
            .arg(format!("path={}", socket.display()))
            .arg("--event-monitor")
            .arg(format!("path={}", events.display()))
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&stderr).expect("stderr file"))
            .spawn()
            .expect("start hekivisor");
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::os::unix::net::UnixStream::connect(&socket).is_err() {
            assert!(Instant::now() < deadline, "API socket never appeared");
            std::thread::sleep(Duration::from_millis(5));
        }
        let serial = dir.join("serial.log");
        ApiProcess { child, dir, socket, events, serial, stderr }
    }
}

impl Drop for ApiProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The `config` Cloud Hypervisor's `vm.info` reports for a plain VM (kernel,
/// rng, serial to a file, console off), every section present, as an
/// orchestrator would keep it and send it back.
pub fn cloud_hypervisor_config(kernel: &Path, serial: &Path) -> String {
    serde_json::json!({
        "cpus": {"boot_vcpus": 1, "max_vcpus": 1, "topology": null, "kvm_hyperv": false, "max_phys_bits": 46,
                 "affinity": null, "features": {"amx": false}, "nested": true, "core_scheduling": "Vm",
                 "profile": "Host"},
        "memory": {"size": 134217728, "mergeable": false, "hotplug_method": "Acpi", "hotplug_size": null,
                   "hotplugged_size": null, "shared": false, "hugepages": false, "hugepage_size": null,
                   "prefault": false, "reserve": false, "zones": null, "thp": true},
        "payload": {"firmware": null, "kernel": kernel, "cmdline": null, "initramfs": null},
        "rate_limit_groups": null, "disks": null, "net": null,
        "rng": {"src": "/dev/urandom", "iommu": false, "id": null, "pci_segment": 0, "pci_device_id": null},
        "balloon": null, "fs": null, "pmem": null,
        "serial": {"file": serial, "mode": "File", "iommu": false, "socket": null},
        "console": {"file": null, "mode": "Off", "iommu": false, "socket": null, "id": null, "pci_segment": 0},
        "debug_console": {"file": null, "mode": "Off", "iobase": 233},
        "devices": null, "user_devices": null, "vdpa": null, "vsock": null, "pvpanic": false, "iommu": false,
        "numa": null, "watchdog": false, "platform": null, "tpm": null, "preserved_fds": null,
        "landlock_enable": false, "landlock_rules": null
    })
    .to_string()
}

/// Names of process `pid`'s threads (a device worker is named after its device).
#[allow(dead_code)]
pub fn thread_names(pid: u32) -> Vec<String> {
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).expect("tasks");
    tasks
        .flatten()
        .filter_map(|t| std::fs::read_to_string(t.path().join("comm")).ok())
        .map(|c| c.trim().into())
        .collect()
}

/// How many of process `pid`'s descriptors are open on `path`.
#[allow(dead_code)]
pub fn fds_open_on(pid: u32, path: &std::path::Path) -> usize {
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).expect("fds");
    fds.flatten().filter(|fd| std::fs::read_link(fd.path()).is_ok_and(|target| target == path)).count()
}
