//! heki register integrity: pinned CR bits and syscall-entry MSRs.

mod common;

use common::guests;

#[test]
fn guest_pins_hold_and_every_error_case_is_einval() {
    require_kvm!();
    let (run, all_events) = common::run_vm_with_events(
        "heki-pins",
        &guests::build("heki_pins"),
        &["--heki", "enabled=on", "--cpus", "boot=2"],
    );
    assert!(run.status.success(), "stderr: {}", run.stderr);
    assert!(!run.serial.contains("FAIL"), "serial:\n{}", run.serial);
    assert!(run.serial.contains("heki pins done failures=0"), "serial:\n{}", run.serial);
    for line in [
        "ok WP restored",
        "ok hooking LSTAR faults",
        "ok LSTAR unchanged",
        "ok writing the pinned value is fine",
        "ok unpinned MSR unaffected",
        "ok other vCPU may write LSTAR",
        "ok other vCPU may clear WP",
    ] {
        assert!(run.serial.contains(line), "{line}:\n{}", run.serial);
    }
    let events = all_events;
    let violations: Vec<_> = events.iter().filter(|e| e["source"] == "heki" && e["event"] == "violation").collect();
    let cr: Vec<_> = violations.iter().filter(|e| e["properties"]["kind"] == "cr").collect();
    let msr: Vec<_> = violations.iter().filter(|e| e["properties"]["kind"] == "msr").collect();
    let smep_smap = run.serial.contains("ok SMEP and SMAP restored");
    // Exactly one detection per cleared pin: WP, plus SMEP|SMAP where the CPU has them.
    assert_eq!(cr.len(), if smep_smap { 2 } else { 1 }, "{cr:?}");
    let wp = &cr[0]["properties"];
    assert_eq!(
        (wp["register"].as_str(), wp["pinned"].as_str(), wp["action"].as_str()),
        (Some("cr0"), Some("0x10000"), Some("restored"))
    );
    assert_eq!(wp["vcpu"], "0");
    assert!(wp["value"].as_str().is_some() && wp["rip"].as_str().is_some());
    assert_eq!(msr.len(), 1, "{msr:?}");
    let m = &msr[0]["properties"];
    assert_eq!(
        (m["msr"].as_str(), m["value"].as_str(), m["action"].as_str()),
        (Some("0xc0000082"), Some("0xdeadbeef000"), Some("denied"))
    );
    assert_eq!(m["pinned"], "0xffffffff80001000");
}

/// Issue 19: a rootkit that remaps instead of writing. LOCK_MAPPINGS locks
/// the tables under a virtual range (a PTE write and a top-level entry
/// write are dropped), a private CR3 is found and put back, and a pinned
/// IDTR is restored after `lidt`; each is reported.
#[test]
fn remapping_a_locked_range_or_reloading_the_idt_is_stopped_and_reported() {
    require_kvm!();
    let (run, events) = common::run_vm_with_events(
        "heki-translation",
        &guests::build("heki_translation"),
        &["--heki", "enabled=on,policy=deny"],
    );
    let s = &run.serial;
    assert!(run.status.success(), "stderr: {}\nserial:\n{s}", run.stderr);
    assert!(s.contains("revision=1 lock_mappings=1 pin_dtr=1\n"), "{s}");
    assert!(s.contains("heki translation done failures=0\n"), "{s}");
    let violations: Vec<&serde_json::Value> = events.iter().filter(|e| e["event"] == "violation").collect();
    let kinds: Vec<&str> = violations.iter().filter_map(|e| e["properties"]["kind"].as_str()).collect();
    assert!(kinds.iter().filter(|k| **k == "write").count() >= 2, "the PTE and top-level writes: {kinds:?}");
    let remap = violations
        .iter()
        .find(|e| e["properties"]["kind"] == "translation")
        .unwrap_or_else(|| panic!("no translation violation in {kinds:?}"));
    assert_eq!(remap["properties"]["va"], "0xffff800000000000", "{remap}");
    assert_eq!(remap["properties"]["action"], "restored", "{remap}");
    assert!(remap["properties"]["found"].as_str().is_some_and(|f| f.contains("gpa=")), "{remap}");
    let idt = violations
        .iter()
        .find(|e| e["properties"]["kind"] == "descriptor-table")
        .unwrap_or_else(|| panic!("no descriptor-table violation in {kinds:?}"));
    assert_eq!(idt["properties"]["register"], "idtr", "{idt}");
    assert_eq!(idt["properties"]["action"], "restored", "{idt}");
    assert!(events.iter().any(|e| e["event"] == "mappings-locked"), "the lock is reported");
}

/// Found by a hostile review of translation locks: the check must not treat
/// a vCPU without paging (a second vCPU not started yet: CR3 = 0) as having
/// a page table (it "restored" an entry into guest memory at GPA 0x800), must
/// never write into a page the guest locked (a private top-level copy locked
/// IMMUTABLE), and under `deny` must stop a remap it cannot keep restored:
/// the VM is paused instead.
#[test]
fn a_remap_that_cannot_be_restored_pauses_the_vm_and_nothing_is_written_where_it_must_not_be() {
    require_kvm!();
    let dir = common::temp_dir("heki-translation-fight");
    let serial = dir.join("serial.log");
    let events = dir.join("events.json");
    let mut child = std::process::Command::new(common::hekivisor_bin())
        .arg("--kernel")
        .arg(guests::build("heki_translation_fight"))
        .args(["--cpus", "boot=2", "--heki", "enabled=on,policy=deny", "--serial"])
        .arg(format!("file={}", serial.display()))
        .arg("--event-monitor")
        .arg(format!("path={}", events.display()))
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("start hekivisor");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    let paused = loop {
        let text = std::fs::read_to_string(&events).unwrap_or_default();
        let all = event_monitor::parse_events(&text).unwrap_or_default();
        if let Some(e) = all.iter().find(|e| e["source"] == "vm" && e["event"] == "paused") {
            break Some((e.clone(), all));
        }
        if std::time::Instant::now() > deadline || child.try_wait().ok().flatten().is_some() {
            break None;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    let _ = child.kill();
    let _ = child.wait();
    let s = std::fs::read_to_string(&serial).unwrap_or_default();
    let (pause, all) = paused.unwrap_or_else(|| panic!("the VM was not paused; serial:\n{s}"));
    assert_eq!(pause["properties"]["cause"], "heki", "{pause}");
    // GPA 0x800 (the "top-level entry" of CR3 0) is untouched.
    let before = s.lines().find_map(|l| l.strip_prefix("gpa0x800 before=")).expect("before line");
    let after = s.lines().find_map(|l| l.strip_prefix("gpa0x800 after=")).expect("after line");
    assert!(after.starts_with(&format!("{before} ")), "the VMM wrote at 0x800:\n{s}");
    assert!(!s.contains("vmm_wrote_immutable=1"), "the VMM wrote into a locked page:\n{s}");
    let translation: Vec<_> =
        all.iter().filter(|e| e["event"] == "violation" && e["properties"]["kind"] == "translation").collect();
    assert!(!translation.is_empty(), "the remap was reported");
    assert!(translation.iter().all(|e| e["properties"]["cr3"] != "0x0"), "no check without paging: {translation:?}");
}
