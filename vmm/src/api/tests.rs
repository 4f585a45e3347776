//! The API server over a real Unix socket, with a fake VMM thread answering.

use std::io::{Read, Write};
use std::os::fd::IntoRawFd;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::mpsc::{Receiver, channel};
use std::time::{Duration, Instant};

use api_client::{ApiClient, Response};
use serde_json::{Value, json};
use vmm_sys_util::eventfd::EventFd;

use super::*;
use crate::config::ApiSocketSpec;

fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("hk-api-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("temp dir");
    dir
}

/// Answers like a VMM would, waking only on the eventfd (so a server that
/// forgot to write it would hang the test).
fn fake_vmm(requests: Receiver<ApiMessage>, wake: EventFd) {
    let mut created = false;
    loop {
        if wake.read().is_err() {
            return;
        }
        while let Ok(ApiMessage { request, reply }) = requests.try_recv() {
            let result = match request {
                ApiRequest::VmmPing => Ok(Some(json!({"version": "test", "pid": std::process::id()}))),
                ApiRequest::VmCreate(config) if !created => {
                    created = true;
                    assert!(config.validate().is_ok(), "the server validated the config");
                    Ok(None)
                }
                ApiRequest::VmCreate(_) => Err(ApiError::Conflict("a VM already exists".into())),
                ApiRequest::VmBoot => Ok(None),
                ApiRequest::VmInfo => Ok(Some(json!({"state": "Running"}))),
                ApiRequest::VmPause => Err(ApiError::Conflict("cannot pause a VM in state Created".into())),
                ApiRequest::VmResume => Err(ApiError::NotFound("no VM has been created".into())),
                ApiRequest::VmCounters => Err(ApiError::Internal("counters broke".into())),
                ApiRequest::VmHeki => Err(ApiError::Conflict("heki is not enabled for this VM".into())),
                ApiRequest::VmHekiPolicy(policy) => Ok(Some(json!({ "policy": policy }))),
                ApiRequest::VmHekiProtect(body) | ApiRequest::VmHekiPin(body) => Ok(Some(body)),
                // Drops the reply unanswered.
                ApiRequest::VmDelete => continue,
                ApiRequest::VmmShutdown => {
                    let _ = reply.send(Ok(None));
                    return;
                }
                _ => Ok(None),
            };
            let _ = reply.send(result);
        }
    }
}

struct TestServer {
    socket: PathBuf,
    dir: PathBuf,
}

impl TestServer {
    fn start(name: &str, read_timeout: Duration) -> TestServer {
        let dir = temp_dir(name);
        let socket = dir.join("api.sock");
        let listener = bind_api_socket(&ApiSocketSpec::Path(socket.clone())).expect("bind");
        Self::serve(listener, read_timeout);
        TestServer { socket, dir }
    }

    fn serve(listener: UnixListener, read_timeout: Duration) {
        let wake = EventFd::new(0).expect("eventfd");
        let (tx, rx) = channel();
        let limits = ServerLimits { read_timeout, ..ServerLimits::default() };
        start_api_server_with(listener, tx, wake.try_clone().expect("clone"), limits).expect("server");
        std::thread::spawn(move || fake_vmm(rx, wake));
    }

    fn request(&self, method: &str, command: &str, body: Option<&str>) -> Response {
        ApiClient::new(&self.socket).request(method, command, body).expect("answered")
    }

    /// Sends raw bytes and reads until the server closes.
    fn raw(&self, bytes: &[u8]) -> String {
        let mut stream = UnixStream::connect(&self.socket).expect("connect");
        stream.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
        let _ = stream.write_all(bytes);
        let mut out = Vec::new();
        let _ = stream.read_to_end(&mut out);
        String::from_utf8_lossy(&out).into_owned()
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// An error answer: the status, and a Cloud Hypervisor-style chain
/// (`["Error from API", "<request> failed", causes...]`) naming the problem.
fn assert_json_error(r: &Response, status: u16, needle: &str) {
    assert_eq!(r.status, status, "body: {}", r.body);
    assert_eq!(r.header("content-type"), Some("application/json"));
    let chain = r.error_chain().unwrap_or_else(|| panic!("error body is a JSON array of strings: {}", r.body));
    assert_eq!(chain.first().map(String::as_str), Some(ERROR_CHAIN_HEAD), "{chain:?}");
    assert!(chain.len() >= 2, "{chain:?}");
    assert!(chain.iter().any(|line| line.contains(needle)), "{chain:?} lacks '{needle}'");
}

const GOOD_CONFIG: &str = r#"{"cpus": {"boot_vcpus": 2}, "payload": {"kernel": "/k"}}"#;

#[test]
fn successes_are_200_with_json_or_204_without_body() {
    let server = TestServer::start("ok", Duration::from_secs(10));
    let ping = server.request("GET", "vmm.ping", None);
    assert_eq!(ping.status, 200);
    assert_eq!(ping.header("content-type"), Some("application/json"));
    let body: Value = serde_json::from_str(&ping.body).expect("JSON");
    assert_eq!(body["version"], "test", "the VMM's JSON is forwarded as is");

    let created = server.request("PUT", "vm.create", Some(GOOD_CONFIG));
    assert_eq!((created.status, created.body.as_str()), (204, ""));
    let policy = server.request("PUT", "vm.heki-policy", Some(r#"{"policy":"log"}"#));
    assert_eq!((policy.status, policy.body.as_str()), (200, r#"{"policy":"log"}"#));
    let protect = server.request("PUT", "vm.heki-protect", Some(r#"{"ranges":[]}"#));
    assert_eq!(protect.body, r#"{"ranges":[]}"#);
}

/// Reads one response on a kept-alive connection: the head as raw text, then
/// the body by its `Content-Length`.
fn raw_exchange(stream: &mut UnixStream, request: &[u8]) -> (String, String) {
    stream.write_all(request).expect("send");
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        assert_eq!(stream.read(&mut byte).expect("read head"), 1, "closed inside the head: {head:?}");
        head.push(byte[0]);
    }
    let head = String::from_utf8(head).expect("ASCII head");
    let length = head
        .split("\r\n")
        .find_map(|line| line.strip_prefix("Content-Length: "))
        .map_or(0, |n| n.parse::<usize>().expect("length"));
    let mut body = vec![0; length];
    stream.read_exact(&mut body).expect("body");
    (head, String::from_utf8(body).expect("UTF-8 body"))
}

#[test]
fn the_wire_format_is_cloud_hypervisors() {
    let server = TestServer::start("wire", Duration::from_secs(10));
    let mut stream = UnixStream::connect(&server.socket).expect("connect");
    stream.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
    // Exactly what Cloud Hypervisor's api_client sends: no Connection header.
    let ping = b"GET /api/v1/vmm.ping HTTP/1.1\r\nHost: localhost\r\nAccept: */*\r\n\r\n";
    let (head, body) = raw_exchange(&mut stream, ping);
    assert!(head.starts_with("HTTP/1.1 200 \r\n"), "code and no reason phrase: {head:?}");
    for header in ["Server: Hekivisor API\r\n", "Connection: keep-alive\r\n", "Content-Type: application/json\r\n"] {
        assert!(head.contains(header), "{header:?} in {head:?}");
    }
    assert!(head.contains(&format!("Content-Length: {}\r\n", body.len())), "{head:?}");
    assert!(!head.contains("content-length"), "title case only: {head:?}");
    // Same connection: a 204 has neither body nor Content-Length, and a bodiless PUT needs none.
    let (head, body) = raw_exchange(&mut stream, b"PUT /api/v1/vm.boot HTTP/1.1\r\nHost: localhost\r\n\r\n");
    assert!(head.starts_with("HTTP/1.1 204 \r\n"), "{head:?}");
    assert!(!head.contains("Content-Length") && body.is_empty(), "{head:?}");
    // Errors: status alone, then a JSON array of strings, outermost first.
    let (head, body) = raw_exchange(&mut stream, b"PUT /api/v1/vm.pause HTTP/1.1\r\nHost: localhost\r\n\r\n");
    assert!(head.starts_with("HTTP/1.1 500 \r\n"), "a state conflict answers as Cloud Hypervisor: {head:?}");
    let chain: Vec<String> = serde_json::from_str(&body).expect("array of strings");
    assert_eq!(chain, ["Error from API", "vm.pause failed", "cannot pause a VM in state Created"]);
    let (head, _) = raw_exchange(&mut stream, b"GET /api/v1/vm.nope HTTP/1.1\r\nHost: localhost\r\n\r\n");
    assert!(head.starts_with("HTTP/1.1 404 \r\n"), "{head:?}");
    // A client that asks to close is not told keep-alive.
    let out = server.raw(b"GET /api/v1/vmm.ping HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    assert!(out.starts_with("HTTP/1.1 200 \r\n") && !out.contains("keep-alive"), "{out}");
}

#[test]
fn vmm_errors_map_to_their_status_codes() {
    let server = TestServer::start("errors", Duration::from_secs(10));
    assert_eq!(server.request("PUT", "vm.create", Some(GOOD_CONFIG)).status, 204);
    // State conflicts on Cloud Hypervisor's endpoints answer as Cloud Hypervisor does.
    assert_json_error(&server.request("PUT", "vm.create", Some(GOOD_CONFIG)), 500, "already exists");
    assert_json_error(&server.request("PUT", "vm.pause", None), 500, "cannot pause");
    // On our own endpoints a conflict is a 409.
    assert_json_error(&server.request("GET", "vm.heki", None), 409, "heki is not enabled");
    // A Cloud Hypervisor endpoint we lack: 501, named.
    assert_json_error(&server.request("PUT", "vm.snapshot", Some("{}")), 501, "does not implement vm.snapshot");
    assert_json_error(&server.request("PUT", "vm.resume", None), 404, "no VM");
    assert_json_error(&server.request("GET", "vm.counters", None), 500, "counters broke");
    assert_json_error(&server.request("PUT", "vm.delete", None), 500, "dropped");
}

/// Cloud Hypervisor's client sends its headers and its body in separate
/// writes. Every answer, even one that does not need the body (an endpoint we
/// lack, a wrong method), waits for it, so the client's body write never
/// meets a closed connection and it reads our answer on the same connection.
#[test]
fn answers_that_ignore_the_body_still_wait_for_it() {
    let server = TestServer::start("late-body", Duration::from_secs(10));
    let body = r#"{"destination_url":"file:///tmp/snap"}"#;
    for (method, path, status) in [("PUT", "vm.snapshot", "501"), ("GET", "vm.boot", "405"), ("PUT", "vm.nope", "404")]
    {
        let mut stream = UnixStream::connect(&server.socket).expect("connect");
        stream.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
        let head = format!("{method} /api/v1/{path} HTTP/1.1\r\nHost: localhost\r\nAccept: */*\r\n");
        stream.write_all(head.as_bytes()).expect("request line");
        stream.write_all(format!("Content-Length: {}\r\n\r\n", body.len()).as_bytes()).expect("headers");
        std::thread::sleep(Duration::from_millis(100));
        stream.write_all(body.as_bytes()).expect("the body is still welcome after the headers were answered");
        let (head, answer) = raw_exchange(&mut stream, b"");
        assert!(head.starts_with(&format!("HTTP/1.1 {status} \r\n")), "{method} {path}: {head:?}");
        assert!(answer.starts_with("[\"Error from API\""), "{answer}");
        // The connection is still usable.
        let (head, _) = raw_exchange(&mut stream, b"GET /api/v1/vmm.ping HTTP/1.1\r\nHost: localhost\r\n\r\n");
        assert!(head.starts_with("HTTP/1.1 200 \r\n"), "{head:?}");
    }
}

#[test]
fn routing_errors_are_404_and_405_with_allow() {
    let server = TestServer::start("routing", Duration::from_secs(10));
    assert_json_error(&server.request("GET", "vm.nope", None), 404, "unknown endpoint");
    let r = ApiClient::new(&server.socket);
    let v2 = server.raw(b"GET /api/v2/vm.info HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    assert!(v2.starts_with("HTTP/1.1 404"), "{v2}");
    let wrong = r.request("GET", "vm.boot", None).expect("answered");
    assert_json_error(&wrong, 405, "use PUT");
    assert_eq!(wrong.header("allow"), Some("PUT"));
    let wrong = r.request("PUT", "vm.info", None).expect("answered");
    assert_eq!((wrong.status, wrong.header("allow")), (405, Some("GET")));
    let delete = r.request("DELETE", "vm.info", None).expect("answered");
    assert_eq!(delete.status, 405);
}

#[test]
fn bad_bodies_are_400_naming_the_problem() {
    let server = TestServer::start("bodies", Duration::from_secs(10));
    for (command, body, needle) in [
        ("vm.create", "{", "invalid JSON"),
        ("vm.create", "[]", "expected a JSON object"),
        ("vm.create", r#"{"memory": {"size": "big"}}"#, "memory.size"),
        ("vm.create", r#"{"memory": {"size": 184467440737095516160000}}"#, "memory.size"),
        ("vm.create", r#"{"memory": {"size": 1e400}}"#, "invalid JSON"),
        ("vm.create", r#"{"payload": {"kernel": "/k"}, "heki": {"enabeld": true}}"#, "heki.enabeld"),
        (
            "vm.create",
            r#"{"payload": {"kernel": "/k"}, "memory": {"size": 536870912, "mergeable": true}}"#,
            "memory.mergeable: not supported by Hekivisor",
        ),
        ("vm.create", r#"{"payload": {"kernel": "/k"}, "cpus": {"boot_vcpus": 0}}"#, "cpus.boot_vcpus"),
        ("vm.heki-policy", r#"{"policy": "maybe"}"#, "policy"),
        ("vm.heki-policy", r#"{"policy": "deny", "extra": 1}"#, "extra"),
        ("vm.heki-policy", "", "policy"),
        ("vm.heki-protect", "not json", "invalid JSON"),
        ("vm.heki-pin", "{\"cr0\": ", "invalid JSON"),
    ] {
        let r = server.request("PUT", command, Some(body));
        assert_json_error(&r, 400, needle);
    }
    // Invalid UTF-8 cannot go through the string-based client.
    let raw = server.raw(
        b"PUT /api/v1/vm.create HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nConnection: close\r\n\r\n\"\xff\xfe\"",
    );
    assert!(raw.starts_with("HTTP/1.1 400"), "{raw}");
    assert!(raw.contains("application/json"), "{raw}");
}

#[test]
fn bodies_over_4_mib_are_413() {
    let server = TestServer::start("large", Duration::from_secs(10));
    let body = "x".repeat((4 << 20) + 1);
    let mut stream = UnixStream::connect(&server.socket).expect("connect");
    stream.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
    let head = format!("PUT /api/v1/vm.create HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n", body.len());
    // The server may answer and close before taking the whole body.
    let mut writer = stream.try_clone().expect("clone");
    let sender = std::thread::spawn(move || {
        let _ = writer.write_all(head.as_bytes()).and_then(|()| writer.write_all(body.as_bytes()));
    });
    let start = Instant::now();
    let mut out = Vec::new();
    let _ = stream.read_to_end(&mut out);
    assert!(start.elapsed() < Duration::from_secs(5), "connection closed after {:?}", start.elapsed());
    let _ = sender.join();
    let out = String::from_utf8_lossy(&out);
    assert!(out.starts_with("HTTP/1.1 413"), "{out}");
    assert!(out.contains("exceeds"), "{out}");
    // Exactly 4 MiB is allowed through to JSON parsing.
    let r = server.request("PUT", "vm.heki-protect", Some(&format!("\"{}\"", "y".repeat((4 << 20) - 2))));
    assert_eq!(r.status, 200);
}

#[test]
fn slow_clients_are_timed_out_and_disconnected() {
    let timeout = Duration::from_millis(300);
    let server = TestServer::start("slow", timeout);
    // Headers that never finish: the connection is closed.
    let start = Instant::now();
    let out = server.raw(b"GET /api/v1/vmm.ping HTTP/1.1\r\nHost: x\r\n");
    assert!(!out.starts_with("HTTP/1.1 2"), "{out}");
    assert!(start.elapsed() < Duration::from_secs(5), "closed after {:?}", start.elapsed());
    // A body that never arrives: 408, then the connection is closed.
    let start = Instant::now();
    let out = server.raw(b"PUT /api/v1/vm.create HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{\"cpus\"");
    assert!(out.starts_with("HTTP/1.1 408"), "{out}");
    assert!(start.elapsed() >= timeout && start.elapsed() < Duration::from_secs(5));
    // A silent client is dropped too.
    let start = Instant::now();
    let out = server.raw(b"");
    assert_eq!(out, "");
    assert!(start.elapsed() < Duration::from_secs(5), "closed after {:?}", start.elapsed());
    // An idle kept-alive connection is closed as well.
    let mut idle = UnixStream::connect(&server.socket).expect("connect");
    api_client::simple_api_command(&mut idle, "GET", "vmm.ping", None).expect("ping");
    idle.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
    let start = Instant::now();
    let mut rest = Vec::new();
    assert_eq!(idle.read_to_end(&mut rest).expect("closed by the server"), 0);
    assert!(start.elapsed() < Duration::from_secs(5), "closed after {:?}", start.elapsed());
    // The server still serves others.
    assert_eq!(server.request("GET", "vmm.ping", None).status, 200);
}

#[test]
fn keep_alive_connections_serve_many_requests() {
    let server = TestServer::start("keepalive", Duration::from_secs(10));
    let mut stream = UnixStream::connect(&server.socket).expect("connect");
    for _ in 0..20 {
        let body = api_client::simple_api_command(&mut stream, "GET", "vm.info", None).expect("info");
        assert_eq!(body.as_deref(), Some(r#"{"state":"Running"}"#));
    }
    let err = api_client::simple_api_command(&mut stream, "PUT", "vm.pause", None).expect_err("conflict");
    assert_eq!(err.status(), Some(500));
}

#[test]
fn eight_concurrent_clients_get_every_answer() {
    let server = TestServer::start("concurrent", Duration::from_secs(10));
    let clients: Vec<_> = (0..8)
        .map(|i| {
            let socket = server.socket.clone();
            std::thread::spawn(move || {
                // Half the clients keep one connection, half connect per request.
                let client =
                    if i % 2 == 0 { ApiClient::connect(&socket).expect("connect") } else { ApiClient::new(&socket) };
                (0..250)
                    .filter(|n| {
                        let command = if n % 2 == 0 { "vmm.ping" } else { "vm.info" };
                        client.call("GET", command, None).is_ok_and(|body| body.is_some())
                    })
                    .count()
            })
        })
        .collect();
    let answered: usize = clients.into_iter().map(|c| c.join().expect("client")).sum();
    assert_eq!(answered, 8 * 250);
}

#[test]
fn a_vmm_that_stopped_listening_gives_503() {
    let server = TestServer::start("gone", Duration::from_secs(10));
    assert_eq!(server.request("PUT", "vmm.shutdown", None).status, 204);
    // The fake VMM has returned and dropped its receiver.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let r = server.request("GET", "vmm.ping", None);
        if r.status == 503 {
            assert_json_error(&r, 503, "shutting down");
            break;
        }
        assert!(Instant::now() < deadline, "still {}", r.status);
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).expect("socket exists").permissions().mode() & 0o777
}

#[test]
fn socket_is_private_stale_ones_replaced_live_ones_refused() {
    let dir = temp_dir("socket");
    let path = dir.join("api.sock");
    let spec = ApiSocketSpec::Path(path.clone());

    let listener = bind_api_socket(&spec).expect("bind");
    assert_eq!(mode(&path), 0o600);
    let err = bind_api_socket(&spec).expect_err("live socket refused");
    assert!(matches!(err, ApiServerError::InUse(_)), "{err}");
    assert!(err.to_string().contains("in use"), "{err}");

    // Closing the listener leaves a stale socket file that nobody answers.
    drop(listener);
    assert!(path.exists());
    let listener = bind_api_socket(&spec).expect("stale socket replaced");
    assert_eq!(mode(&path), 0o600);
    drop(listener);

    let file = dir.join("plain");
    std::fs::write(&file, "keep me").expect("file");
    let err = bind_api_socket(&ApiSocketSpec::Path(file.clone())).expect_err("not a socket");
    assert!(matches!(err, ApiServerError::NotASocket(_)), "{err}");
    assert_eq!(std::fs::read_to_string(&file).expect("untouched"), "keep me");

    let err = bind_api_socket(&ApiSocketSpec::Path(dir.join("missing/dir/api.sock"))).expect_err("no dir");
    assert!(matches!(err, ApiServerError::Bind { .. }), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn an_inherited_listening_fd_is_adopted() {
    let dir = temp_dir("fd");
    let path = dir.join("inherited.sock");
    let fd = UnixListener::bind(&path).expect("bind").into_raw_fd();
    let listener = bind_api_socket(&ApiSocketSpec::Fd(fd)).expect("adopted");
    TestServer::serve(listener, Duration::from_secs(10));
    let r = ApiClient::new(&path).request("GET", "vmm.ping", None).expect("answered");
    assert_eq!(r.status, 200);

    let err = bind_api_socket(&ApiSocketSpec::Fd(9999)).expect_err("closed fd");
    assert!(matches!(err, ApiServerError::BadFd(9999)), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}
