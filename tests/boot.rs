//! Booting real VMs: the PVH and Linux boot paths, SMP, reboot, failures.

mod common;

use common::guests;

#[test]
fn hello_guest_prints_over_serial_and_powers_off() {
    require_kvm!();
    let run = common::run_vm("hello", &guests::build("hello"), &[]);
    assert!(run.status.success(), "exit status {:?}, stderr: {}", run.status, run.stderr);
    assert_eq!(run.serial, "Hello from the hekivisor test guest\n");
}

#[test]
fn every_vcpu_of_an_smp_guest_checks_in() {
    require_kvm!();
    let run = common::run_vm("smp", &guests::build("smp"), &["--cpus", "boot=4"]);
    assert!(run.status.success(), "stderr: {}", run.stderr);
    for cpu in 1..4 {
        assert!(run.serial.contains(&format!("cpu {cpu} checked in")), "serial: {}", run.serial);
    }
    assert!(run.serial.contains("all 4 cpus checked in"), "serial: {}", run.serial);
}

/// vCPUs above `boot_vcpus` exist only in the tables: a guest that starts
/// every enabled CPU of its MADT starts the boot ones, and nothing answers
/// for the others.
#[test]
fn vcpus_above_boot_are_not_started() {
    require_kvm!();
    let run = common::run_vm("smp-max", &guests::build("smp"), &["--cpus", "boot=2,max=4"]);
    assert!(run.status.success(), "stderr: {}", run.stderr);
    assert!(run.serial.contains("cpu 1 checked in"), "serial: {}", run.serial);
    assert!(run.serial.contains("all 2 cpus checked in"), "serial: {}", run.serial);
    assert!(!run.serial.contains("cpu 2 checked in"), "serial: {}", run.serial);
}

/// Boots the `bootinfo` guest with a command line and an initramfs and checks
/// what it read back through its boot protocol.
fn check_boot_info(test: &str, kernel: &std::path::Path, protocol: &str, cmdline: &str, initrd: &[u8]) {
    let dir = common::temp_dir(test);
    let initramfs = dir.join("initrd.img");
    std::fs::write(&initramfs, initrd).expect("write initramfs");
    let run =
        common::run_vm(test, kernel, &["--cmdline", cmdline, "--initramfs", initramfs.to_str().expect("utf-8 path")]);
    assert!(run.status.success(), "stderr: {}", run.stderr);
    let first8 = String::from_utf8_lossy(&initrd[..8]);
    for needle in [
        format!("boot protocol={protocol}"),
        format!("cmdline={cmdline}\n"),
        format!("size={} first8={first8}", initrd.len()),
        "rsdp=0xe0000".to_string(),
    ] {
        assert!(run.serial.contains(&needle), "{needle}: {}", run.serial);
    }
}

#[test]
fn pvh_guest_reads_cmdline_and_initramfs_from_start_info() {
    require_kvm!();
    check_boot_info(
        "pvh-bootinfo",
        &guests::build("bootinfo"),
        "pvh",
        "console=ttyS0 heki.test=1",
        b"INITRDv1 and more bytes",
    );
}

#[test]
fn bzimage_guest_boots_through_the_linux_protocol_with_cmdline_and_initramfs() {
    require_kvm!();
    check_boot_info(
        "bz-bootinfo",
        &guests::build_bzimage("bootinfo"),
        "linux",
        "root=/dev/vda quiet",
        b"BZINITRD payload",
    );
}

fn boots_counted(serial: &str) -> usize {
    serial.lines().filter(|l| *l == "boot").count()
}

#[test]
fn no_reboot_turns_each_kind_of_reset_into_a_clean_exit() {
    require_kvm!();
    for how in ["kbd", "acpi", "triple"] {
        let cmdline = format!("reboot={how}");
        let run = common::run_vm("no-reboot", &guests::build("reboot"), &["--cmdline", &cmdline, "--no-reboot"]);
        assert!(run.status.success(), "{how}: status {:?} stderr {}", run.status, run.stderr);
        assert_eq!(boots_counted(&run.serial), 1, "{how}: serial {}", run.serial);
    }
}

#[test]
fn reboot_loads_the_kernel_again_and_boots_it() {
    require_kvm!();
    // Without --no-reboot the guest reboots forever; stop it after a few boots.
    let dir = common::temp_dir("reboot-loop");
    let serial = dir.join("serial.log");
    let mut child = std::process::Command::new(common::hekivisor_bin())
        .args(["--kernel", guests::build("reboot").to_str().expect("path"), "--cmdline", "reboot=kbd"])
        .args(["--serial", &format!("file={}", serial.display())])
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("start hekivisor");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while boots_counted(&std::fs::read_to_string(&serial).unwrap_or_default()) < 3
        && std::time::Instant::now() < deadline
    {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
    let boots = boots_counted(&std::fs::read_to_string(&serial).unwrap_or_default());
    assert!(boots >= 3, "the guest booted {boots} times");
}

#[test]
fn guest_exception_is_reported_by_the_guest_runtime() {
    require_kvm!();
    let run = common::run_vm("exception", &guests::build("exception"), &[]);
    assert!(run.status.success(), "stderr: {}", run.stderr);
    assert!(run.serial.contains("EXCEPTION vec=6"), "serial: {}", run.serial);
    assert!(!run.serial.contains("not reached"));
}

#[test]
fn emulation_failure_is_a_clear_error_with_rip_and_instruction_bytes() {
    require_kvm!();
    let run = common::run_vm("emulation-failure", &guests::build("emulation_failure"), &[]);
    assert!(!run.timed_out, "the VMM must not hang");
    assert_eq!(run.status.code(), Some(1), "stderr: {}", run.stderr);
    assert!(run.stderr.contains("could not emulate the guest instruction at RIP 0x"), "stderr: {}", run.stderr);
    // lock cmpxchg16b: f0 48 0f c7 ...
    assert!(run.stderr.contains("f0 48 0f c7"), "stderr: {}", run.stderr);
    assert!(!run.stderr.contains("panicked"));
}

#[test]
fn guest_walks_rsdp_xsdt_madt_and_finds_every_vcpu() {
    require_kvm!();
    let run = common::run_vm("acpi", &guests::build("acpi"), &["--cpus", "boot=3"]);
    assert!(run.status.success(), "stderr: {}", run.stderr);
    assert!(run.serial.contains("rsdp revision=2 checksum=ok"), "serial: {}", run.serial);
    for table in ["XSDT", "FACP", "DSDT", "APIC", "MCFG"] {
        assert!(run.serial.contains(&format!("table {table} checksum=ok")), "{table}: {}", run.serial);
    }
    assert!(run.serial.contains("madt lapics=3 cpuid cpus=3"), "serial: {}", run.serial);
}

/// `cpus.topology` and `max_vcpus` above `boot_vcpus`, as the guest reads
/// them: 8 possible vCPUs (2 threads × 2 cores × 1 die × 2 packages), 2
/// started; the other 6 are in the MADT as online-capable, not enabled.
#[test]
fn guest_sees_the_configured_topology_and_the_vcpus_left_for_hotplug() {
    require_kvm!();
    let run = common::run_vm("topology", &guests::build("acpi"), &["--cpus", "boot=2,max=8,topology=2:2:1:2"]);
    assert!(run.status.success(), "stderr: {}", run.stderr);
    let serial = &run.serial;
    // Leaf 1 counts logical processors per package: 2 threads × 2 cores.
    assert!(serial.contains("madt lapics=2 cpuid cpus=4"), "serial: {serial}");
    assert!(serial.contains("madt online-capable=6"), "serial: {serial}");
    assert!(serial.contains("topology leaf=b level=0 type=1 shift=1 count=2 x2apic=0"), "serial: {serial}");
    assert!(serial.contains("topology leaf=b level=1 type=2 shift=2 count=4 x2apic=0"), "serial: {serial}");
    // Leaf 0x1F, where the host has it, says the same with one die per package.
    if !serial.contains("topology leaf=1f absent") {
        assert!(serial.contains("topology leaf=1f level=1 type=2 shift=2 count=4"), "serial: {serial}");
        assert!(!serial.contains("topology leaf=1f level=2"), "one die: no die level: {serial}");
    }
}

#[test]
fn the_boot_benchmark_guest_boots() {
    require_kvm!();
    let run = common::run_vm("tiny", &guests::build("tiny"), &["--memory", "size=128M"]);
    assert!(run.status.success(), "stderr: {}", run.stderr);
    assert_eq!(run.serial, "Hello from the tiny hekivisor benchmark guest\n");
}

#[test]
fn a_long_cr_check_interval_never_delays_a_reboot() {
    require_kvm!();
    // The CR checker waits 60 s between kicks; stopping the VM must not wait for it.
    let started = std::time::Instant::now();
    let run = common::run_vm(
        "reboot-cr-interval",
        &guests::build("reboot"),
        &["--cmdline", "reboot=kbd", "--no-reboot", "--heki", "enabled=on,cr_check_interval_ms=60000"],
    );
    assert!(run.status.success(), "status {:?} stderr {}", run.status, run.stderr);
    assert_eq!(boots_counted(&run.serial), 1, "{}", run.serial);
    assert!(started.elapsed() < std::time::Duration::from_secs(20), "took {:?}", started.elapsed());
}

/// The PIT is created on the guest's first access to its ports (it costs
/// every VM 8-16 ms at close otherwise): that first access must land in it,
/// and the PIT must then count and drive its output like the one Linux
/// calibrates against.
#[test]
fn the_pit_created_at_first_use_keeps_that_access_and_counts() {
    require_kvm!();
    let run = common::run_vm("pit", &guests::build("pit"), &[]);
    assert!(run.status.success(), "stderr: {}", run.stderr);
    for line in
        ["port 0x61 gate and speaker bits=1\n", "channel 2 counts down=1\n", "output 2 high at terminal count=1\n"]
    {
        assert!(run.serial.contains(line), "{line}: {}", run.serial);
    }
}
