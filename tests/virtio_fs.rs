//! virtio-fs through the vhost-user frontend, against a real virtiofsd and
//! against backends that misbehave; and its refusal under heki. The Linux
//! guest mounting a share is in tests/linux_guest.rs.

mod common;

use std::os::unix::net::UnixListener;
use std::time::Duration;

use api_client::ApiClient;
use serde_json::json;

/// A `vm.create` body with one share on `socket` and the tiny `hello` guest.
fn create_body(socket: &std::path::Path, heki: bool) -> String {
    json!({
        "payload": {"kernel": common::guests::build("hello")},
        "memory": {"size": 64 << 20, "shared": true},
        "serial": {"mode": "Null"},
        "heki": {"enabled": heki},
        "fs": [{"tag": "hkshare", "socket": socket, "num_queues": 1, "queue_size": 1024, "id": "share0"}]
    })
    .to_string()
}

/// heki cannot police a backend's writes to guest memory, so it refuses the
/// device at vm.create with a 400 that says why, and on the command line.
#[test]
fn with_heki_enabled_a_virtio_fs_share_is_refused_and_the_answer_says_why() {
    let vmm = common::ApiProcess::start("fs-heki", &[]);
    let socket = vmm.dir.join("nobody.sock");
    let r = ApiClient::new(&vmm.socket).request("PUT", "vm.create", Some(&create_body(&socket, true))).expect("answer");
    assert_eq!(r.status, 400, "{}", r.body);
    let why = r.error_chain().expect("an error chain").join("\n");
    assert!(why.contains("fs: not available with heki enabled"), "{why}");
    assert!(why.contains("outside the VMM, where heki's DMA guard cannot refuse"), "{why}");
    // Without heki the same body is accepted (the backend is met at boot).
    let r =
        ApiClient::new(&vmm.socket).request("PUT", "vm.create", Some(&create_body(&socket, false))).expect("answer");
    assert_eq!(r.status, 204, "{}", r.body);

    let run = common::run_hekivisor(&[
        "--kernel",
        "/nonexistent",
        "--heki",
        "enabled=on",
        "--memory",
        "size=64M,shared=on",
        "--fs",
        "tag=t,socket=/nonexistent.sock",
    ]);
    assert!(!run.status.success() && run.stderr.contains("fs: not available with heki enabled"), "{run:?}");
    let run = common::run_hekivisor(&["--kernel", "/nonexistent", "--fs", "tag=t,socket=/s"]);
    assert!(!run.status.success() && run.stderr.contains("fs: needs memory.shared=true"), "{run:?}");
}

/// A real virtiofsd completes the vhost-user handshake at boot, and exits
/// when the VM ends and the VMM closes the connection; landlock allows the socket.
#[test]
fn a_real_virtiofsd_completes_the_handshake_and_exits_with_the_vm() {
    require_kvm!();
    let dir = common::temp_dir("fs-handshake");
    let share = dir.join("share");
    std::fs::create_dir_all(&share).expect("share");
    let mut backend = common::virtiofsd::Virtiofsd::start(&dir, &share);
    let fs = format!("tag=hkshare,socket={}", backend.socket.display());
    let run = common::run_vm(
        "fs-handshake",
        &common::guests::build("hello"),
        &["--memory", "size=64M,shared=on", "--fs", &fs, "--landlock", "-v"],
    );
    assert!(run.status.success() && !run.timed_out, "{run:?}\n{}", backend.log());
    assert!(run.serial.contains("Hello from the hekivisor test guest"), "{run:?}");
    assert!(run.stderr.contains("virtio-fs 'hkshare' served by"), "{}", run.stderr);
    assert!(backend.wait_for_exit(Duration::from_secs(10)), "virtiofsd outlived the VM:\n{}", backend.log());
    let log = backend.log();
    assert!(log.contains("Client connected") && log.contains("Client disconnected"), "{log}");
}

/// A backend that hangs up at once, or never answers, fails `vm.boot` with
/// the vhost-user step named; the VMM lives on and serves the API.
#[test]
fn a_backend_that_hangs_up_or_never_answers_fails_the_boot_and_the_vmm_lives_on() {
    require_kvm!();
    let vmm = common::ApiProcess::start("fs-bad-backend", &[]);
    for (name, hang_up) in [("hangs-up", true), ("silent", false)] {
        let socket = vmm.dir.join(format!("{name}.sock"));
        let listener = UnixListener::bind(&socket).expect("bind");
        let server = std::thread::spawn(move || {
            let (stream, _) = listener.accept().expect("accept");
            if !hang_up {
                // Reads nothing and answers nothing until the VMM gives up.
                std::thread::sleep(Duration::from_secs(8));
            }
            drop(stream);
        });
        let client = ApiClient::new(&vmm.socket);
        let r = client.request("PUT", "vm.create", Some(&create_body(&socket, false))).expect("answer");
        assert_eq!(r.status, 204, "{name}: {}", r.body);
        let r = client.request("PUT", "vm.boot", None).expect("answer");
        assert!(!r.is_success(), "{name}: {}", r.body);
        assert!(r.body.contains("vhost-user") && r.body.contains("failed"), "{name}: {}", r.body);
        let r = client.request("PUT", "vm.delete", None).expect("answer");
        assert!(r.is_success(), "{name}: {}", r.body);
        server.join().expect("server thread");
    }
    let r = ApiClient::new(&vmm.socket).request("GET", "vmm.ping", None).expect("the VMM lives");
    assert!(r.is_success(), "{}", r.body);
}
