//! heki memory integrity, end to end: guests lock memory through the ABI and
//! attack it; the VMM must deny, report and keep running.

mod common;

use common::guests;

fn heki_events<'a>(all: &'a [serde_json::Value], event: &str) -> Vec<&'a serde_json::Value> {
    all.iter().filter(|e| e["source"] == "heki" && e["event"] == event).collect()
}

#[test]
fn abi_discovery_functions_and_error_codes_follow_the_contract() {
    require_kvm!();
    let run = common::run_vm("heki-abi", &guests::build("heki_abi"), &["--heki", "enabled=on"]);
    assert!(run.status.success(), "stderr: {}", run.stderr);
    assert!(!run.serial.contains("FAIL"), "serial:\n{}", run.serial);
    assert!(run.serial.contains("heki abi done failures=0"), "serial:\n{}", run.serial);
    assert!(run.serial.contains("doorbell port=580"));
    assert!(run.serial.lines().filter(|l| l.starts_with("ok ")).count() >= 30, "serial:\n{}", run.serial);
}

#[test]
fn a_call_from_user_mode_is_refused_and_reported() {
    require_kvm!();
    let (run, all_events) =
        common::run_vm_with_events("heki-cpl3", &guests::build("heki_abi"), &["--heki", "enabled=on"]);
    assert!(run.serial.contains("ok user mode call refused"), "serial:\n{}", run.serial);
    let all = all_events;
    let v = heki_events(&all, "violation");
    assert_eq!(v.len(), 2, "{v:?}");
    assert!(v.iter().all(|e| e["properties"]["kind"] == "hypercall" && e["properties"]["cpl"] == "3"));
}

#[test]
fn heki_disabled_hides_the_abi() {
    require_kvm!();
    let run = common::run_vm("heki-off", &guests::build("heki_abi"), &[]);
    assert!(run.status.success(), "stderr: {}", run.stderr);
    assert!(run.serial.contains("FAIL signature: got 0 want 1"), "serial:\n{}", run.serial);
    assert!(run.serial.contains("FAIL max leaf: got 0"), "serial:\n{}", run.serial);
}

#[test]
fn locked_memory_survives_every_write_width_string_and_straddling_write() {
    require_kvm!();
    let (run, all_events) =
        common::run_vm_with_events("heki-write", &guests::build("heki_write"), &["--heki", "enabled=on"]);
    assert!(run.status.success(), "stderr: {}", run.stderr);
    let s = &run.serial;
    assert!(s.contains("protect rc=0\n"), "{s}");
    assert!(s.contains("widths byte=11 word=1111 dword=11111111 qword=1111111111111111"), "{s}");
    assert!(s.contains("rep stosb changed=0"), "{s}");
    // The writable halves of straddling writes land; the locked halves do not.
    assert!(s.contains("straddle low=22,22 lockedlow=11 lockedhigh=11 high=33"), "{s}");
    // Byte protection: bytes 16 and 17 keep their value, their neighbours change.
    assert!(s.contains("bytes 15=44 16=11 17=11 18=44"), "{s}");
    assert!(s.contains("neighbour=55"), "{s}");
    assert!(s.contains("attack done"), "the guest keeps running after violations: {s}");

    let all = all_events;
    let protected = heki_events(&all, "protected");
    assert_eq!(protected.len(), 2, "page lock and byte lock");
    assert_eq!(protected[0]["properties"]["by"], "guest");
    assert_eq!(protected[0]["properties"]["pages"], "1");
    let violations = heki_events(&all, "violation");
    // A burst of 10, then 10 a second, per kind (heki's token bucket).
    let seconds = |e: &serde_json::Value| e["timestamp"]["secs"].as_f64().unwrap_or(0.0);
    let span = violations.last().map_or(0.0, |last| seconds(last) - seconds(violations[0])).ceil() as usize;
    assert!(!violations.is_empty() && violations.len() <= 10 + 10 * (span + 1), "rate limited: {}", violations.len());
    assert!(violations.len() < 4103 / 10, "far fewer events than violations: {}", violations.len());
    let first = &violations[0]["properties"];
    assert_eq!(first["kind"], "write");
    assert_eq!(first["action"], "denied");
    assert_eq!(first["vcpu"], "0");
    assert!(first["gpa"].as_str().is_some_and(|g| g.starts_with("0x")));
    assert!(first["rip"].as_str().is_some_and(|r| r.starts_with("0x1")));
    assert_eq!(first["size"], "1");
    // The `rep stosb` over the page is one violation carrying its 4096 bytes.
    let string = violations.iter().find(|v| v["properties"]["instruction"] == "rep stosb").expect("string record");
    assert_eq!(string["properties"]["size"], "4096");
    assert_eq!(string["properties"]["length"], "4096");
    // 4 widths + 1 string instruction + 2 straddles + 1 byte-protected write, each counted.
    let suppressed: u64 = heki_events(&all, "suppressed")
        .iter()
        .map(|e| e["properties"]["count"].as_str().and_then(|c| c.parse::<u64>().ok()).expect("count"))
        .sum();
    assert_eq!(violations.len() as u64 + suppressed, 4 + 1 + 2 + 1);
}

/// The `heki_string` guest's cases, each run on plain pages (the CPU's
/// answer) and on a locked page: "ok NAME" when registers and bytes agree.
const STRING_CASES: [&str; 20] = [
    "rep stosb page",
    "rep stosw page",
    "rep stosd page",
    "rep stosq page",
    "rep movsb page",
    "rep movsq page",
    "rep stosb unlocked-locked",
    "rep stosb locked-unlocked",
    "rep stosq split element",
    "rep movsb unaligned source",
    "rep stosb descending",
    "rep movsq descending",
    "rep movsb gs source",
    "rep movsb overlapping",
    "addr32 rep stosd",
    "addr32 rep stosb wrap",
    "rep stosb huge count",
    "stosq",
    "movsb",
    "rep stosb protected bytes",
];

fn assert_string_cases_pass(serial: &str) {
    assert!(serial.contains("protect rc=0 bytes rc=0"), "{serial}");
    assert!(!serial.contains("FAIL"), "{serial}");
    for case in STRING_CASES {
        assert!(serial.contains(&format!("ok {case}\n")), "{case}: {serial}");
    }
    assert!(serial.contains("string done failures=0"), "{serial}");
}

#[test]
fn string_instructions_on_locked_pages_compute_what_the_cpu_does_and_locked_bytes_stay() {
    require_kvm!();
    let (run, all) = common::run_vm_with_events(
        "heki-string-deny",
        &guests::build("heki_string"),
        &["--heki", "enabled=on", "--cmdline", "mmio-source"],
    );
    assert!(run.status.success(), "stderr: {}", run.stderr);
    assert_string_cases_pass(&run.serial);
    assert!(run.serial.contains("ok rep movsb mmio source"), "{}", run.serial);
    // One record per instruction and page, with the locked bytes it tried and all it wrote.
    let violations = heki_events(&all, "violation");
    let string = |name: &str| {
        violations
            .iter()
            .filter(|v| v["properties"]["instruction"] == name)
            .map(|v| (v["properties"]["size"].as_str().unwrap_or(""), v["properties"]["length"].as_str().unwrap_or("")))
            .collect::<Vec<_>>()
    };
    assert_eq!(string("rep stosq")[0], ("4096", "4096"), "{violations:?}");
    assert_eq!(string("rep movsb")[0], ("4096", "4096"));
    // Straddling: only the 100 locked bytes count; the page with two protected bytes: 2 of 4096.
    assert!(string("rep stosb").contains(&("100", "100")), "{violations:?}");
    assert!(string("rep stosb").contains(&("2", "4096")), "{violations:?}");
    let first = &violations[0]["properties"];
    assert_eq!((first["kind"].as_str(), first["action"].as_str()), (Some("write"), Some("denied")));
    assert_eq!(first["elements"], "4096");
}

#[test]
fn string_instructions_on_locked_pages_land_in_full_under_log() {
    require_kvm!();
    let run = common::run_vm(
        "heki-string-log",
        &guests::build("heki_string"),
        &["--heki", "enabled=on,policy=log", "--cmdline", "log"],
    );
    assert!(run.status.success(), "stderr: {}", run.stderr);
    assert_string_cases_pass(&run.serial);
}

#[test]
fn a_string_instruction_over_a_locked_page_costs_at_most_four_exits() {
    require_kvm!();
    let api = common::ApiProcess::start("heki-string-exits", &[]);
    let client = api_client::ApiClient::new(&api.socket);
    let config = serde_json::json!({
        "cpus": {"boot_vcpus": 1, "max_vcpus": 1},
        "memory": {"size": 67108864},
        "payload": {"kernel": guests::build("heki_string"), "cmdline": "hold"},
        "serial": {"mode": "File", "file": api.serial},
        "heki": {"enabled": true},
    })
    .to_string();
    let put = |command: &str, body: Option<&str>| client.request("PUT", command, body).expect("request").status;
    assert_eq!(put("vm.create", Some(&config)), 204);
    assert_eq!(put("vm.boot", None), 204);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    let serial = loop {
        let serial = std::fs::read_to_string(&api.serial).unwrap_or_default();
        if serial.contains("string done") {
            break serial;
        }
        assert!(std::time::Instant::now() < deadline, "the guest never finished: {serial}");
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    assert_string_cases_pass(&serial);
    let counters: serde_json::Value =
        serde_json::from_str(&client.call("GET", "vm.counters", None).expect("GET").expect("body")).expect("JSON");
    // The reference runs on plain pages exit nothing: every MMIO exit is a locked
    // page's. Each case touches one locked page once (the split element twice).
    let exits = counters["vcpu0"]["mmio_exits"].as_u64().expect("mmio_exits");
    assert!(exits <= 4 * STRING_CASES.len() as u64, "{exits} MMIO exits for {} cases", STRING_CASES.len());
    // One violation per case (each writes protected bytes), two for the split element.
    assert_eq!(counters["heki"]["write"], STRING_CASES.len() as u64 + 1, "{counters}");
}

fn attack(policy: &str) -> common::Run {
    let arg = format!("enabled=on,policy={policy}");
    common::run_vm(&format!("heki-policy-{policy}"), &guests::build("heki_attack"), &["--heki", &arg])
}

#[test]
fn deny_policy_drops_the_write_and_the_guest_continues() {
    require_kvm!();
    let run = attack("deny");
    assert!(run.status.success(), "stderr: {}", run.stderr);
    assert!(run.serial.contains("after attack value=11"), "serial: {}", run.serial);
}

#[test]
fn log_policy_performs_the_write_and_reports_it() {
    require_kvm!();
    let run = attack("log");
    assert!(run.status.success(), "stderr: {}", run.stderr);
    assert!(run.serial.contains("after attack value=99"), "serial: {}", run.serial);
}

#[test]
fn shutdown_policy_stops_the_vm_before_the_guest_goes_on() {
    require_kvm!();
    let run = attack("shutdown");
    assert_eq!(run.status.code(), Some(1), "stderr: {}", run.stderr);
    assert!(run.stderr.contains("heki policy 'shutdown' stopped the VM"), "stderr: {}", run.stderr);
    assert!(!run.serial.contains("after attack"), "serial: {}", run.serial);
}

#[test]
fn no_write_lands_after_the_lock_returns_while_another_vcpu_writes() {
    require_kvm!();
    for _ in 0..3 {
        let run = common::run_vm("heki-smp", &guests::build("heki_smp"), &["--heki", "enabled=on", "--cpus", "boot=2"]);
        assert!(run.status.success(), "stderr: {}", run.stderr);
        assert!(run.serial.contains("cpus=2 protect rc=0"), "serial: {}", run.serial);
        assert!(run.serial.contains("writer kept running=yes"), "serial: {}", run.serial);
        assert!(run.serial.contains("no write landed after the lock"), "serial: {}", run.serial);
    }
}

#[test]
fn an_unemulable_write_to_locked_memory_is_a_violation_and_the_vm_lives_on() {
    require_kvm!();
    let (run, all_events) =
        common::run_vm_with_events("heki-emulation", &guests::build("heki_emulation"), &["--heki", "enabled=on"]);
    assert!(run.status.success(), "stderr: {}", run.stderr);
    assert!(run.serial.contains("survived: memory=1111,2222"), "serial: {}", run.serial);
    let all = all_events;
    let v = heki_events(&all, "violation");
    assert_eq!(v.len(), 1);
    assert_eq!(v[0]["properties"]["kind"], "write");
    assert_eq!(v[0]["properties"]["emulation"], "failed");
    assert_eq!(v[0]["properties"]["size"], "16");
}

#[test]
fn running_out_of_memslots_is_enospc_and_nothing_is_applied() {
    require_kvm!();
    let mut child = std::process::Command::new(common::hekivisor_bin())
        .args(["--kernel", guests::build("heki_nospace").to_str().expect("path"), "--heki", "enabled=on"])
        .args(["--serial", "tty"])
        .env("HEKIVISOR_MEMSLOT_BUDGET", "16")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("start");
    let (status, _) = common::wait_with_timeout(&mut child, std::time::Duration::from_secs(30));
    let mut out = String::new();
    std::io::Read::read_to_string(&mut child.stdout.take().expect("stdout"), &mut out).expect("read");
    assert!(status.success());
    // One RAM region: k locked islands need 2k + 1 slots, so 7 fit in 16.
    assert!(out.contains("locked=7 rc=-28 query=7"), "{out}");
}
