//! Kata's `vm.create` body, field by field, end to end: PCI segments, the
//! memory hotplug window, and guest RAM on huge pages (with heki).

mod common;

use std::io::Write;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::time::{Duration, Instant};

use api_client::ApiClient;
use common::guests;
use serde_json::{Value, json};

const HUGE_PAGE: u64 = 2 << 20;

fn wait_for(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn request(socket: &Path, method: &str, command: &str, body: Option<&str>) -> (u16, String) {
    let r = ApiClient::new(socket).request(method, command, body).expect("request");
    (r.status, r.body)
}

#[test]
fn a_virtio_rng_on_segment_1_is_found_through_mcfg_and_works() {
    require_kvm!();
    let run = common::run_vm(
        "pci-segment-rng",
        &guests::build("pci_segments"),
        &["--platform", "num_pci_segments=2", "--rng", "src=/dev/urandom,pci_segment=1"],
    );
    let s = &run.serial;
    assert!(run.status.success(), "stderr: {}\nserial: {s}", run.stderr);
    assert!(s.contains("mcfg segments=2\n"), "{s}");
    assert!(s.contains("segment 0 ecam=e0000000\n") && s.contains("segment 1 ecam=e0100000\n"), "{s}");
    // Each segment has its host bridge; the rng sits on segment 1 with a BAR in segment 1's window.
    assert!(s.contains("segment 1 slot 0 id=81b36"), "{s}");
    assert!(s.contains("segment 1 slot 1 id=10441af4 bar=c2000000\n"), "{s}");
    assert!(!s.contains("segment 0 slot 1"), "segment 0 has no device: {s}");
    // Port 0xCF8 reaches segment 0 only: a guest without ACPI cannot see the rng.
    assert!(!s.contains("cf8 slot 1"), "{s}");
    assert!(s.contains("rng via ecam=e0100000 status=f len=64 random=1\n"), "{s}");
}

#[test]
fn a_device_on_a_segment_the_platform_lacks_is_refused_by_the_cli() {
    let run = common::run_hekivisor(&["--kernel", "k", "--rng", "src=/dev/urandom,pci_segment=1"]);
    assert!(!run.status.success());
    assert!(run.stderr.contains("rng.pci_segment: device 0 asks for segment 1"), "{}", run.stderr);
}

/// Kata's body as it comes (`tests/fixtures/kata-clh-vm-create.json`), with
/// the host paths pointed at this test's files and the serial port on, is
/// created and booted: the guest finds the virtio-fs share on segment 1 and
/// the disk, rng and vsock on segment 0, and `vm.info` reports every field.
#[test]
fn kata_body_boots_with_the_share_on_segment_1() {
    require_kvm!();
    let vmm = common::ApiProcess::start("kata-body", &[]);
    let share = vmm.dir.join("share");
    std::fs::create_dir_all(&share).expect("share dir");
    let virtiofsd = common::virtiofsd::Virtiofsd::start(&vmm.dir, &share);
    let image = vmm.dir.join("kata-containers.img");
    std::fs::write(&image, vec![0u8; 1 << 20]).expect("disk image");

    let mut body: Value =
        serde_json::from_str(include_str!("fixtures/kata-clh-vm-create.json")).expect("the fixture is JSON");
    body["payload"]["kernel"] = json!(guests::build("pci_segments"));
    body["disks"][0]["path"] = json!(image);
    body["fs"][0]["socket"] = json!(virtiofsd.socket);
    body["vsock"]["socket"] = json!(vmm.dir.join("clh.sock"));
    body["serial"] = json!({"mode": "File", "file": vmm.serial, "iommu": false});
    let (status, answer) = request(&vmm.socket, "PUT", "vm.create", Some(&body.to_string()));
    assert_eq!(status, 204, "{answer}");

    let (_, info) = request(&vmm.socket, "GET", "vm.info", None);
    let info: Value = serde_json::from_str(&info).expect("vm.info");
    let config = &info["config"];
    assert_eq!(config["platform"]["num_pci_segments"], 2, "{info}");
    assert_eq!(config["fs"][0]["pci_segment"], 1);
    assert_eq!(config["memory"]["hotplug_size"], 17179869184u64);
    assert_eq!(config["memory"]["hotplug_method"], "Acpi");
    assert_eq!(config["memory"]["shared"], true);
    assert_eq!(config["cpus"]["topology"]["cores_per_die"], 8);
    // 2 GiB of RAM ends below 4 GiB: the 16 GiB window starts at 4 GiB.
    assert_eq!(info["memory_hotplug_window"], json!({"start": 4u64 << 30, "size": 16u64 << 30}));

    let (status, answer) = request(&vmm.socket, "PUT", "vm.boot", None);
    assert_eq!(status, 204, "{answer}");
    let serial = || std::fs::read_to_string(&vmm.serial).unwrap_or_default();
    // The report's last line, whole: the serial file may end mid-line.
    wait_for("the guest's report", || {
        serial().split_inclusive('\n').any(|l| l.starts_with("rng via ecam") && l.ends_with('\n'))
    });
    let s = serial();
    assert!(s.contains("mcfg segments=2\n"), "{s}");
    assert!(s.contains("segment 1 slot 1 id=105a1af4 bar=c2000000\n"), "virtio-fs on segment 1: {s}");
    for device in ["10421af4", "10441af4", "10531af4"] {
        let on_segment_0 = s.lines().any(|l| l.starts_with("segment 0 slot") && l.contains(device));
        assert!(on_segment_0, "{device} on segment 0: {s}");
    }
    assert!(!s.lines().any(|l| l.starts_with("segment 1") && l.contains("10421af4")), "{s}");
    assert!(s.contains("rng via ecam=e0000000 status=f len=64 random=1\n"), "{s}");
}

/// Serializes the tests that change the host's huge page pool, and puts the
/// pool back as it was when dropped.
struct HugePagePool {
    _lock: std::fs::File,
    original: u64,
}

const POOL: &str = "/sys/kernel/mm/hugepages/hugepages-2048kB";

fn pool_value(name: &str) -> u64 {
    std::fs::read_to_string(format!("{POOL}/{name}")).ok().and_then(|v| v.trim().parse().ok()).unwrap_or(0)
}

fn available_huge_pages() -> u64 {
    pool_value("free_hugepages").saturating_sub(pool_value("resv_hugepages"))
}

impl HugePagePool {
    /// Makes at least `pages` more 2 MiB pages available; `None` (the test
    /// then skips) when this host will not give them.
    fn reserve(pages: u64) -> Option<HugePagePool> {
        let lock = std::fs::File::create(std::env::temp_dir().join("hekivisor-hugepages.lock")).ok()?;
        // SAFETY: flock on a descriptor we own; it blocks until other tests release it.
        if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX) } != 0 {
            return None;
        }
        let original = pool_value("nr_hugepages");
        let pool = HugePagePool { _lock: lock, original };
        let wanted = original + pages;
        let written = std::fs::OpenOptions::new()
            .write(true)
            .open(format!("{POOL}/nr_hugepages"))
            .and_then(|mut f| f.write_all(wanted.to_string().as_bytes()));
        if let Err(e) = written {
            eprintln!("SKIPPED: cannot reserve huge pages ({e}); run as root");
            return None;
        }
        if available_huge_pages() < pages {
            eprintln!("SKIPPED: the host gave only {} of {pages} huge pages", available_huge_pages());
            return None;
        }
        Some(pool)
    }
}

impl Drop for HugePagePool {
    fn drop(&mut self) {
        let _ = std::fs::write(format!("{POOL}/nr_hugepages"), self.original.to_string());
    }
}

/// Bytes of hugetlb pages a process has mapped and touched, from its smaps.
fn hugetlb_in_use(pid: u32) -> (u64, u64) {
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).unwrap_or_default();
    let (mut mapped, mut touched, mut in_huge) = (0, 0, false);
    let kb = |line: &str| line.split_whitespace().nth(1).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0) * 1024;
    let mut size = 0;
    for line in smaps.lines() {
        if line.starts_with("Size:") {
            size = kb(line);
        } else if line.starts_with("KernelPageSize:") {
            in_huge = kb(line) == HUGE_PAGE;
            if in_huge {
                mapped += size;
            }
        } else if in_huge && (line.starts_with("Shared_Hugetlb:") || line.starts_with("Private_Hugetlb:")) {
            touched += kb(line);
        }
    }
    (mapped, touched)
}

#[test]
fn hugepage_backed_ram_boots_and_is_served_from_the_pool() {
    require_kvm!();
    let ram = 64u64 << 20;
    let Some(_pool) = HugePagePool::reserve(ram / HUGE_PAGE + 8) else { return };
    let vmm = common::ApiProcess::start("hugepages-boot", &[]);
    let body = json!({
        "cpus": {"boot_vcpus": 1, "max_vcpus": 1},
        "memory": {"size": ram, "hugepages": true},
        "payload": {"kernel": guests::build("ticker")},
        "serial": {"mode": "File", "file": vmm.serial},
        // A device keeps the host view of RAM mapped (the VM drops it when nothing uses it).
        "rng": {"src": "/dev/urandom"},
    });
    assert_eq!(request(&vmm.socket, "PUT", "vm.create", Some(&body.to_string())).0, 204);
    let before = available_huge_pages();
    let (status, answer) = request(&vmm.socket, "PUT", "vm.boot", None);
    assert_eq!(status, 204, "{answer}");
    wait_for("ticks", || std::fs::read_to_string(&vmm.serial).unwrap_or_default().contains("tick 3"));
    // Every page of guest RAM is reserved from the pool at boot...
    assert_eq!(before - available_huge_pages(), ram / HUGE_PAGE, "pages reserved for the VM");
    // ...mapped twice (KVM's view and the devices' host view), and the guest's pages are huge pages.
    let (mapped, touched) = hugetlb_in_use(vmm.child.id());
    assert_eq!(mapped, 2 * ram, "both views of RAM are hugetlb mappings");
    assert!(touched >= HUGE_PAGE, "the running guest touched huge pages ({touched} bytes)");
    let (_, info) = request(&vmm.socket, "GET", "vm.info", None);
    let info: Value = serde_json::from_str(&info).expect("vm.info");
    assert_eq!(info["config"]["memory"]["hugepages"], true);
    assert_eq!(info["config"]["memory"]["hugepage_size"], HUGE_PAGE, "the size in force: {info}");
    // A reboot builds fresh RAM after the old is released: the pool suffices again.
    let (status, answer) = request(&vmm.socket, "PUT", "vm.reboot", None);
    assert_eq!(status, 204, "{answer}");
    assert_eq!(before - available_huge_pages(), ram / HUGE_PAGE, "the same pages, not twice as many");
}

#[test]
fn too_few_huge_pages_is_a_client_error_naming_the_shortfall_and_the_vmm_lives_on() {
    require_kvm!();
    let lock = std::fs::File::create(std::env::temp_dir().join("hekivisor-hugepages.lock")).expect("lock file");
    // SAFETY: flock on a descriptor we own; the pool stays as it is while we look at it.
    assert_eq!(unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX) }, 0);
    let available = available_huge_pages();
    let wanted = available + 16;
    let ram = wanted * HUGE_PAGE;
    let shortfall = format!("{wanted} huge pages of 2048 kB are needed but only {available} are available");

    let vmm = common::ApiProcess::start("hugepages-short", &[]);
    let body = json!({
        "memory": {"size": ram, "hugepages": true, "hugepage_size": HUGE_PAGE},
        "payload": {"kernel": guests::build("hello")},
        "serial": {"mode": "File", "file": vmm.serial},
    });
    assert_eq!(request(&vmm.socket, "PUT", "vm.create", Some(&body.to_string())).0, 204);
    let (status, answer) = request(&vmm.socket, "PUT", "vm.boot", None);
    assert_eq!(status, 400, "{answer}");
    assert!(answer.contains(&shortfall) && answer.contains("memory.hugepages"), "{answer}");
    assert_eq!(request(&vmm.socket, "GET", "vmm.ping", None).0, 200, "the VMM lives on");
    let (_, info) = request(&vmm.socket, "GET", "vm.info", None);
    assert!(info.contains(r#""state":"Created""#), "{info}");

    let size = format!("size={ram},hugepages=on");
    let run = common::run_hekivisor(&["--kernel", guests::build("hello").to_str().unwrap_or(""), "--memory", &size]);
    assert!(!run.status.success(), "the CLI fails");
    assert!(run.stderr.contains(&shortfall), "{}", run.stderr);
}

#[test]
fn heki_locks_hold_on_hugepage_backed_ram() {
    require_kvm!();
    let ram = 64u64 << 20;
    let Some(_pool) = HugePagePool::reserve(ram / HUGE_PAGE + 8) else { return };
    let run = common::run_vm(
        "heki-hugepages",
        &guests::build("heki_write"),
        &["--heki", "enabled=on", "--memory", "size=64M,hugepages=on,hugepage_size=2M"],
    );
    let s = &run.serial;
    assert!(run.status.success(), "stderr: {}\nserial: {s}", run.stderr);
    assert!(s.contains("protect rc=0\n"), "{s}");
    assert!(s.contains("widths byte=11 word=1111 dword=11111111 qword=1111111111111111"), "{s}");
    assert!(s.contains("rep stosb changed=0"), "{s}");
    assert!(s.contains("straddle low=22,22 lockedlow=11 lockedhigh=11 high=33"), "{s}");
    assert!(s.contains("bytes 15=44 16=11 17=11 18=44"), "{s}");
    assert!(s.contains("attack done"), "{s}");
}

/// heki's private memory hides 4 KiB pages of the VMM's view with mprotect,
/// which huge pages cannot split: on huge-page RAM the feature is not
/// offered and asking for it is -ENOSYS, and the guest goes on.
#[test]
fn private_memory_is_not_offered_on_hugepage_backed_ram() {
    require_kvm!();
    let ram = 64u64 << 20;
    let Some(_pool) = HugePagePool::reserve(ram / HUGE_PAGE + 8) else { return };
    let run = common::run_vm(
        "heki-private-hugepages",
        &guests::build("heki_private"),
        &["--heki", "enabled=on", "--rng", "src=/dev/urandom", "--memory", "size=64M,hugepages=on"],
    );
    let s = &run.serial;
    assert!(run.status.success(), "stderr: {}\nserial: {s}", run.stderr);
    assert!(s.contains("feature shared_memory=0\n"), "{s}");
    assert!(s.contains("private_memory(1): -38\n"), "{s}");
    assert!(s.contains("query secret: private=0"), "{s}");
    assert!(s.contains("private scenario done"), "{s}");
    assert!(!run.stderr.contains("cannot change the VMM's view"), "{}", run.stderr);
}
