//! virtio devices over PCI, with every device write to guest memory policed
//! by heki's DMA guard.

mod common;

use common::guests;

#[test]
fn rng_fills_normal_memory_refuses_protected_memory_and_survives_bad_chains() {
    require_kvm!();
    let (run, all_events) = common::run_vm_with_events(
        "virtio-rng",
        &guests::build("virtio_rng"),
        &["--heki", "enabled=on", "--rng", "src=/dev/urandom"],
    );
    assert!(run.status.success(), "stderr: {}", run.stderr);
    let s = &run.serial;
    for line in [
        "status=f\n",
        "normal: len=64 nonzero=1",
        "protect rc=0",
        "protected: len=0 nonzero=0",
        "outside ram: len=0",
        "oversized: len=65536",
        "still working: len=32",
        "ring in protected memory: needs_reset=1",
    ] {
        assert!(s.contains(line), "{line}: {s}");
    }
    // A looping chain is cut at the queue size: it ends, with bounded work.
    assert!(s.contains("loop: len=128"), "{s}");
    let events = all_events;
    let dma: Vec<_> =
        events.iter().filter(|e| e["event"] == "violation" && e["properties"]["kind"] == "dma-write").collect();
    assert_eq!(dma.len(), 2, "the protected buffer and the protected ring: {dma:?}");
    assert_eq!(dma[0]["properties"]["device"], "_rng");
    assert_eq!(dma[0]["properties"]["size"], "64");
    assert!(dma[0]["properties"]["gpa"].as_str().is_some_and(|g| g.starts_with("0x")));
}

#[test]
fn without_heki_the_rng_writes_anywhere_the_guest_asks() {
    require_kvm!();
    let run = common::run_vm("virtio-rng-noheki", &guests::build("virtio_rng"), &["--rng", "src=/dev/urandom"]);
    assert!(run.status.success(), "stderr: {}", run.stderr);
    assert!(run.serial.contains("normal: len=64 nonzero=1"), "{}", run.serial);
}

fn disk_image(test: &str, bytes: u64) -> std::path::PathBuf {
    let path = common::temp_dir(test).join("disk.img");
    std::fs::File::create(&path).and_then(|f| f.set_len(bytes)).expect("disk image");
    path
}

#[test]
fn block_reads_writes_and_refuses_reads_into_protected_memory() {
    require_kvm!();
    let disk = disk_image("virtio-blk", 1 << 20);
    let disk_arg = format!("path={},id=bootdisk", disk.display());
    let run =
        common::run_vm("virtio-blk", &guests::build("virtio_blk"), &["--heki", "enabled=on", "--disk", &disk_arg]);
    assert!(run.status.success(), "stderr: {}", run.stderr);
    let s = &run.serial;
    for line in [
        "status=f capacity=2048",
        "write: 0",
        "read: 0 data=HEKIDISK sector zero",
        "get-id: 0 id=bootdisk",
        "flush: 0",
        "out of bounds: 1",
        "unsupported: 2",
        // IOERR, and the protected page keeps its contents.
        "read into protected: 1 page=LOCKED PAGE",
        // Reading protected memory is fine for a device.
        "write from protected: 0",
        "sector 1=LOCKED PAGE",
    ] {
        assert!(s.contains(line), "{line}: {s}");
    }
    let image = std::fs::read(&disk).expect("image");
    assert_eq!(&image[..20], b"HEKIDISK sector zero", "the write reached the host file");
    assert_eq!(&image[512..523], b"LOCKED PAGE");
}

#[test]
fn two_disk_queues_serve_requests_at_once_and_each_refuses_dma_into_a_locked_page() {
    require_kvm!();
    let disk = disk_image("virtio-blk-mq", 1 << 20);
    let disk_arg = format!("path={},num_queues=2,queue_size=1024", disk.display());
    let run = common::run_vm(
        "virtio-blk-mq",
        &guests::build("virtio_blk_mq"),
        &["--heki", "enabled=on", "--disk", &disk_arg],
    );
    assert!(run.status.success(), "stderr: {}", run.stderr);
    let s = &run.serial;
    for line in [
        "num_queues=2 config num_queues=2",
        "status=f",
        "writes on both queues ok=16",
        // Each queue reads back what the other wrote.
        "reads on both queues ok=16 match=16",
        "protect rc=0",
        // IOERR on queue 1, and the locked page keeps its contents.
        "queue 1 read into protected: 1 page=LOCKED PAGE",
        "queue 0 after: 0 data=queue 0 request 1",
    ] {
        assert!(s.contains(line), "{line}: {s}");
    }
    let image = std::fs::read(&disk).expect("image");
    assert_eq!(&image[16 * 512..16 * 512 + 17], b"queue 1 request 0", "queue 1's write reached the host file");
}

#[test]
fn a_readonly_disk_refuses_writes() {
    require_kvm!();
    let disk = disk_image("virtio-blk-ro", 1 << 20);
    let disk_arg = format!("path={},readonly=on", disk.display());
    let run = common::run_vm("virtio-blk-ro", &guests::build("virtio_blk"), &["--disk", &disk_arg]);
    assert!(run.status.success(), "stderr: {}", run.stderr);
    assert!(run.serial.contains("write: 1\n"), "{}", run.serial);
    assert!(std::fs::read(&disk).expect("image").iter().all(|b| *b == 0), "nothing written");
}

#[test]
fn console_output_reaches_the_configured_file() {
    require_kvm!();
    let dir = common::temp_dir("virtio-console");
    let out = dir.join("console.log");
    let arg = format!("file={}", out.display());
    let run = common::run_vm("virtio-console", &guests::build("virtio_console"), &["--console", &arg]);
    assert!(run.status.success(), "stderr: {}", run.stderr);
    assert!(run.serial.contains("status=f queues=2"), "{}", run.serial);
    assert!(run.serial.contains("sent: 0"), "{}", run.serial);
    assert_eq!(std::fs::read_to_string(&out).expect("console file"), "hello from the virtio console\n");
}

/// Starts the console guest in echo mode with `console` as its `--console`
/// and `extra` arguments; stdin, stdout and stderr are pipes. Returns the child and its serial log.
fn start_console_echo(test: &str, console: &str, extra: &[&str]) -> (std::process::Child, std::path::PathBuf) {
    let serial = common::temp_dir(test).join("serial.log");
    let mut command = std::process::Command::new(common::hekivisor_bin());
    command
        .arg("--kernel")
        .arg(guests::build("virtio_console"))
        .args(["--cmdline", "echo", "--serial", &format!("file={}", serial.display()), "--console", console])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .args(extra)
        .stderr(std::process::Stdio::piped());
    (command.spawn().expect("start hekivisor"), serial)
}

fn read_all(mut from: impl std::io::Read) -> String {
    let mut text = String::new();
    let _ = from.read_to_string(&mut text);
    text
}

#[test]
fn console_tty_feeds_stdin_to_the_guest_even_before_it_posts_buffers() {
    require_kvm!();
    let (mut child, serial) = start_console_echo("virtio-console-stdin", "tty", &[]);
    {
        use std::io::Write;
        // Written at once, long before the guest has a receive buffer; then end of input.
        let mut stdin = child.stdin.take().expect("stdin");
        stdin.write_all(b"ping from the host\n").expect("write stdin");
    }
    let stdout = child.stdout.take().expect("stdout");
    let stdout = std::thread::spawn(move || read_all(stdout));
    let (status, timed_out) = common::wait_with_timeout(&mut child, std::time::Duration::from_secs(60));
    let stderr = read_all(child.stderr.take().expect("stderr"));
    assert!(!timed_out && status.success(), "{status:?} stderr: {stderr}");
    let serial = std::fs::read_to_string(&serial).unwrap_or_default();
    assert!(serial.contains("echo: ping from the host\n"), "{serial}");
    assert!(serial.contains("echoed: 0"), "{serial}");
    // The console's output is stdout: the greeting, then the echo.
    let stdout = stdout.join().expect("stdout reader");
    assert_eq!(stdout, "hello from the virtio console\nping from the host\n");
}

#[test]
fn console_pty_carries_input_to_the_guest_and_its_output_back() {
    require_kvm!();
    use std::io::{BufRead, Read, Write};
    // With landlock on: the pty is opened before the VMM restricts itself.
    let (mut child, serial) = start_console_echo("virtio-console-pty", "pty", &["-v", "--landlock"]);
    // The path is logged (info) at boot.
    let mut stderr = std::io::BufReader::new(child.stderr.take().expect("stderr"));
    let mut log = String::new();
    let path = loop {
        let mut line = String::new();
        if stderr.read_line(&mut line).unwrap_or(0) == 0 {
            let _ = child.kill();
            panic!("no pty path logged: {log}");
        }
        log.push_str(&line);
        if let Some(at) = line.find("virtio console: pty ") {
            break line[at + "virtio console: pty ".len()..].trim().to_string();
        }
    };
    let stderr = std::thread::spawn(move || read_all(stderr));
    let mut pty = std::fs::OpenOptions::new().read(true).write(true).open(&path).expect("open the pty");
    pty.write_all(b"ping over the pty\n").expect("type into the pty");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut seen = Vec::new();
        let mut buf = [0u8; 256];
        while let Ok(n) = pty.read(&mut buf) {
            if n == 0 {
                break;
            }
            seen.extend_from_slice(&buf[..n]);
            let _ = tx.send(String::from_utf8_lossy(&seen).into_owned());
        }
    });
    let want = "hello from the virtio console\nping over the pty\n";
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    let mut output = String::new();
    while output != want && std::time::Instant::now() < deadline {
        if let Ok(more) = rx.recv_timeout(std::time::Duration::from_millis(100)) {
            output = more;
        }
    }
    let (status, timed_out) = common::wait_with_timeout(&mut child, std::time::Duration::from_secs(60));
    let stderr = stderr.join().expect("stderr reader");
    assert!(!timed_out && status.success(), "{status:?} stderr: {log}{stderr}");
    assert_eq!(output, want, "the guest's console output, raw, on the pty");
    let serial = std::fs::read_to_string(&serial).unwrap_or_default();
    assert!(serial.contains("echo: ping over the pty\n"), "{serial}");
}

/// TAP tests need /dev/net/tun and the right to create interfaces.
fn tap_missing() -> Option<String> {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/net/tun")
        .err()
        .map(|e| format!("this test needs /dev/net/tun ({e})"))
}

#[test]
fn net_moves_real_packets_between_guest_and_host_over_a_tap() {
    require_kvm!();
    if let Some(reason) = tap_missing() {
        eprintln!("SKIPPED: {reason}");
        return;
    }
    let net = "tap=hknet0,ip=192.168.249.1,mask=255.255.255.0,mac=52:54:00:12:34:56";
    let run = common::run_vm("virtio-net", &guests::build("virtio_net"), &["--net", net]);
    assert!(run.status.success(), "stderr: {}", run.stderr);
    assert!(run.serial.contains("mac=52:54:0:12:34:56"), "{}", run.serial);
    // The host kernel answered the guest's ARP request through the TAP.
    assert!(run.serial.contains("arp reply from 192.168.249.1 is-at "), "{}", run.serial);
}

#[test]
fn net_drops_and_reports_packets_bound_for_protected_buffers() {
    require_kvm!();
    if let Some(reason) = tap_missing() {
        eprintln!("SKIPPED: {reason}");
        return;
    }
    let net = "tap=hknet1,ip=192.168.248.1,mask=255.255.255.0";
    let (run, all_events) = common::run_vm_with_events(
        "virtio-net-protected",
        &guests::build("virtio_net"),
        &["--net", net, "--heki", "enabled=on", "--cmdline", "protect-rx"],
    );
    assert!(run.status.success(), "stderr: {}", run.stderr);
    assert!(run.serial.contains("protect rx rc=0"), "{}", run.serial);
    assert!(run.serial.contains("no arp reply"), "{}", run.serial);
    let events = all_events;
    assert!(
        events.iter().any(|e| e["properties"]["kind"] == "dma-write" && e["properties"]["device"] == "_net0"),
        "a dma-write violation for the NIC"
    );
}

#[test]
fn msix_delivers_a_completion_interrupt_per_request() {
    require_kvm!();
    let run = common::run_vm("virtio-msix", &guests::build("virtio_msix"), &["--rng", "src=/dev/urandom"]);
    assert!(run.status.success(), "stderr: {}", run.stderr);
    assert!(run.serial.contains("msix=0\nstatus=f vector=0"), "{}", run.serial);
    for i in 1..=3 {
        assert!(run.serial.contains(&format!("request {i}: len=64 irqs={i}")), "{}", run.serial);
    }
}
