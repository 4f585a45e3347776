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
