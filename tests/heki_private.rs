//! Private guest memory: the guest keeps its RAM private from the host and
//! shares only what devices need (docs/protected-memory.md).

mod common;

use common::guests;

fn private_events(events: &[serde_json::Value]) -> Vec<&serde_json::Value> {
    events.iter().filter(|e| e["event"] == "violation" && e["properties"]["kind"] == "private-access").collect()
}

#[test]
fn devices_reach_only_what_the_guest_shares() {
    require_kvm!();
    let (run, events) = common::run_vm_with_events(
        "heki-private",
        &guests::build("heki_private"),
        &["--heki", "enabled=on", "--rng", "src=/dev/urandom"],
    );
    assert!(run.status.success(), "stderr: {}\nserial: {}", run.stderr, run.serial);
    let s = &run.serial;
    for line in [
        "at start: private=0\n",
        "feature shared_memory=1\n",
        "set_shared before private: -1\n",
        "private_memory(2): -22\n",
        "private_memory(1): 0\n",
        "private_memory(1) again: 0\n",
        "unaligned: -22\n",
        "zero length: -22\n",
        "bad arg2: -22\n",
        "outside ram: -14\n",
        "share rings: 0 0 0\n",
        // This host keeps a (PROT_NONE) mapping: private, but not unmapped.
        "query secret: private=1 unmapped=0\n",
        "query bounce: private=0\n",
        "status=f\n",
        "into private: len=0 nonzero=0\n",
        "into shared bounce: len=64 nonzero=1\n",
        "copied into private: nonzero=1\n",
        "unshare bounce: 0 query private=1\n",
        "private rings: needs_reset=1\n",
        "private scenario done\n",
    ] {
        assert!(s.contains(line), "{line:?} missing from:\n{s}");
    }
    let refused = private_events(&events);
    assert_eq!(refused.len(), 2, "the private buffer and the private rings: {refused:?}");
    assert_eq!(refused[0]["properties"]["device"], "_rng");
    assert_eq!(refused[0]["properties"]["size"], "64");
    assert_eq!(refused[0]["properties"]["action"], "denied");
    let private = events.iter().filter(|e| e["event"] == "private-memory").count();
    assert_eq!(private, 1, "one private-memory event: the second call changes nothing");
}

#[test]
fn a_guest_reset_makes_all_memory_shared_again() {
    require_kvm!();
    let dir = common::temp_dir("heki-private-reboot");
    let serial = dir.join("serial.log");
    let events = dir.join("events.json");
    let mut child = std::process::Command::new(common::hekivisor_bin())
        .args(["--kernel", guests::build("heki_private").to_str().expect("path"), "--cmdline", "reboot"])
        .args(["--heki", "enabled=on", "--rng", "src=/dev/urandom"])
        .args(["--serial", &format!("file={}", serial.display())])
        .args(["--event-monitor", &format!("path={}", events.display())])
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("start hekivisor");
    let boots = || std::fs::read_to_string(&serial).unwrap_or_default().matches("at start: private=").count();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while boots() < 2 && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
    let text = std::fs::read_to_string(&serial).unwrap_or_default();
    assert_eq!(text.matches("at start: private=0\n").count(), 2, "the second boot finds memory shared:\n{text}");
    assert!(text.contains("private scenario done"), "{text}");
    let all = event_monitor::parse_events(&std::fs::read_to_string(&events).unwrap_or_default()).unwrap_or_default();
    let reset = all.iter().find(|e| e["source"] == "heki" && e["event"] == "reset").expect("a heki reset event");
    assert!(reset["properties"]["reason"].as_str().is_some_and(|r| r.contains("shared")), "{reset}");
}

/// Issue 20, break 1: a guest that turns private memory on while a device
/// reads guest memory must not end its VMM. The change waits for the copy in
/// flight; the device's later accesses (buffer and rings are private now)
/// are refused and reported. Several boots, each with its own delay.
#[test]
fn private_memory_turned_on_during_a_device_read_never_ends_the_vmm() {
    require_kvm!();
    let dir = common::temp_dir("private-race");
    let disk = dir.join("disk.img");
    std::fs::write(&disk, vec![0u8; 2 << 20]).expect("disk image");
    let disk_arg = format!("path={}", disk.display());
    let guest = guests::build("private_race");
    for boot in 0..4 {
        let (run, events) = common::run_vm_with_events(
            "private-race",
            &guest,
            &["--heki", "enabled=on", "--cpus", "boot=2", "--memory", "size=256M", "--disk", &disk_arg],
        );
        let s = &run.serial;
        assert!(run.status.success(), "boot {boot}: status {:?}, stderr: {}\nserial:\n{s}", run.status, run.stderr);
        assert!(s.contains("cpus=2\n"), "{s}");
        assert!(s.contains("private_memory(1) with a transfer in flight: 0\n"), "boot {boot}:\n{s}");
        assert!(s.contains("after: query=200\n") && s.contains("vmm survived\n"), "boot {boot}:\n{s}");
        for refused in private_events(&events) {
            assert_eq!(refused["properties"]["device"], "_disk0", "only the disk was refused: {refused}");
        }
    }
}
