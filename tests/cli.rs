//! Command-line errors: one line naming the file or option and the reason,
//! a non-zero status, and never a panic.

mod common;

fn assert_clean_failure(run: &common::Run, needle: &str) {
    assert!(!run.status.success(), "must fail");
    assert!(run.stderr.contains(needle), "stderr lacks '{needle}': {}", run.stderr);
    assert!(!run.stderr.contains("panicked"), "panic: {}", run.stderr);
    assert_eq!(run.stderr.trim_end().lines().count(), 1, "one line: {}", run.stderr);
}

#[test]
fn kernel_errors_name_the_file_and_the_reason() {
    require_kvm!();
    let dir = common::temp_dir("cli-kernel");
    let no_pvh = dir.join("no-pvh.elf");
    // A valid ELF without the PVH note: the guest ELF with its note section stripped.
    let status = std::process::Command::new("objcopy")
        .args(["--remove-section", ".note.Xen"])
        .arg(common::guests::build("hello"))
        .arg(&no_pvh)
        .status()
        .expect("objcopy");
    assert!(status.success());
    let truncated = dir.join("truncated.elf");
    let full = std::fs::read(common::guests::build("hello")).expect("read guest");
    std::fs::write(&truncated, &full[..100]).expect("write truncated");
    let huge = dir.join("huge.bin");
    std::fs::File::create(&huge).and_then(|f| f.set_len(64 << 20)).expect("sparse file");
    let missing = dir.join("missing.elf");

    let cases: [(&std::path::Path, &[&str], &str); 4] = [
        (&no_pvh, &[], "no PVH entry note"),
        (&truncated, &[], "truncated.elf"),
        (&huge, &["--memory", "size=16M"], "larger than the"),
        (&missing, &[], "cannot open"),
    ];
    for (kernel, extra, needle) in cases {
        let mut args = vec!["--kernel", kernel.to_str().expect("utf-8"), "--serial", "null"];
        args.extend_from_slice(extra);
        let run = common::run_hekivisor(&args);
        assert_clean_failure(&run, needle);
        assert!(run.stderr.contains(kernel.file_name().and_then(|n| n.to_str()).expect("name")), "{}", run.stderr);
    }
}

#[test]
fn bad_options_are_rejected_with_the_option_named() {
    for (args, needle) in [
        (&["--kernel", "k", "--cpus", "boot=0"][..], "boot_vcpus"),
        (&["--kernel", "k", "--memory", "size=lots"][..], "--memory"),
        (&["--kernel", "k", "--serial", "fancy"][..], "--serial"),
        (&["--kernel", "k", "--heki", "policy=maybe"][..], "heki policy"),
        (&[][..], "nothing to do"),
    ] {
        assert_clean_failure(&common::run_hekivisor(args), needle);
    }
}

#[test]
fn missing_or_unusable_kvm_is_a_clear_error() {
    let hello = common::guests::build("hello");
    for (device, needle) in [("/nonexistent/kvm", "does not exist"), ("/dev/null", "not a usable KVM device")] {
        let mut child = std::process::Command::new(common::hekivisor_bin())
            .args(["--kernel", hello.to_str().expect("path"), "--serial", "null"])
            .env("HEKIVISOR_KVM_DEVICE", device)
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("start");
        let (status, _) = common::wait_with_timeout(&mut child, std::time::Duration::from_secs(10));
        let mut stderr = String::new();
        std::io::Read::read_to_string(&mut child.stderr.take().expect("stderr"), &mut stderr).expect("read");
        assert!(!status.success());
        assert!(stderr.contains(needle), "{device}: {stderr}");
    }
}

#[test]
fn help_explains_the_product_and_the_option_syntax() {
    let run = common::run_hekivisor(&["--help"]);
    assert!(run.status.success());
    for needle in [
        "kernel integrity",
        "--kernel",
        "--cpus",
        "boot=N",
        "--memory",
        "--serial",
        "--heki",
        "--api-socket",
        "--no-reboot",
    ] {
        assert!(run.serial.contains(needle), "help lacks {needle}");
    }
}
