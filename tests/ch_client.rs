//! Cloud Hypervisor's own client against Hekivisor.
//!
//! `ChClient` reads responses exactly as Cloud Hypervisor's `api_client`
//! crate (and so `ch-remote`) does: the status is everything after
//! `HTTP/1.1 ` up to `\r`, trimmed and parsed as an integer; the body length
//! comes from a case-sensitive search for `Content-Length: `; a status other
//! than 100, 200 or 204 is an error whose body, a JSON array of strings, is
//! printed one line per string. Requests are built the same way: no
//! `Connection` header, and no `Content-Length` without a body. The whole
//! endpoint matrix goes through it, in the right and the wrong states.

mod common;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::Value;

/// Cloud Hypervisor's `StatusCode`: the codes its client names.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ChStatus {
    Continue,
    Ok,
    NoContent,
    BadRequest,
    NotFound,
    TooManyRequests,
    InternalServerError,
    NotImplemented,
    Unknown,
}

impl ChStatus {
    fn from_raw(code: usize) -> ChStatus {
        match code {
            100 => ChStatus::Continue,
            200 => ChStatus::Ok,
            204 => ChStatus::NoContent,
            400 => ChStatus::BadRequest,
            404 => ChStatus::NotFound,
            429 => ChStatus::TooManyRequests,
            500 => ChStatus::InternalServerError,
            501 => ChStatus::NotImplemented,
            _ => ChStatus::Unknown,
        }
    }

    fn is_server_error(self) -> bool {
        !matches!(self, ChStatus::Ok | ChStatus::Continue | ChStatus::NoContent)
    }
}

/// Cloud Hypervisor's client errors, as `ch-remote` prints them.
#[derive(Debug)]
enum ChError {
    Socket(std::io::Error),
    StatusCodeParsing(std::num::ParseIntError),
    MissingProtocol,
    ContentLengthParsing(std::num::ParseIntError),
    ServerResponse(ChStatus, Option<String>),
}

impl std::fmt::Display for ChError {
    /// The messages `ch-remote` prints.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ChError::Socket(e) => write!(f, "Error writing to or reading from HTTP socket: {e}"),
            ChError::StatusCodeParsing(e) => write!(f, "Error parsing HTTP status code: {e}"),
            ChError::MissingProtocol => write!(f, "HTTP output is missing protocol statement"),
            ChError::ContentLengthParsing(e) => write!(f, "Error parsing HTTP Content-Length field: {e}"),
            ChError::ServerResponse(status, body) => write!(f, "Server responded with error {status:?}: {body:?}"),
        }
    }
}

/// Its `get_header`: the first `Name: ` anywhere in the text, case-sensitive.
fn get_header<'a>(res: &'a str, header: &str) -> Option<&'a str> {
    let needle = format!("{header}: ");
    let at = res.find(&needle)?;
    let end = res[at..].find('\r')?;
    Some(&res[at + needle.len()..at + end])
}

/// Its `get_status_code`: the text between `HTTP/1.1 ` and `\r`, as an integer.
fn get_status_code(res: &str) -> Result<ChStatus, ChError> {
    let at = res.find("HTTP/1.1").ok_or(ChError::MissingProtocol)?;
    let end = res[at..].find('\r').ok_or(ChError::MissingProtocol)?;
    let code: usize = res[at + "HTTP/1.1 ".len()..at + end].trim().parse().map_err(ChError::StatusCodeParsing)?;
    Ok(ChStatus::from_raw(code))
}

/// Its `parse_http_response`: 256-byte reads until the head, then the body by length.
fn parse_http_response(socket: &mut impl Read) -> Result<Option<String>, ChError> {
    let mut res = String::new();
    let mut body_offset = None;
    let mut content_length: Option<usize> = None;
    loop {
        let mut bytes = [0u8; 256];
        let count = socket.read(&mut bytes).map_err(ChError::Socket)?;
        if count == 0 {
            break;
        }
        res.push_str(std::str::from_utf8(&bytes[..count]).expect("UTF-8 response"));
        if let Some(o) = res.find("\r\n\r\n") {
            body_offset = Some(o + 4);
            content_length = match get_header(&res, "Content-Length") {
                Some(length) => Some(length.trim().parse().map_err(ChError::ContentLengthParsing)?),
                None => None,
            };
            if content_length.is_none() {
                break;
            }
        }
        if let (Some(offset), Some(length)) = (body_offset, content_length)
            && res.len() >= offset + length
        {
            break;
        }
    }
    let body = content_length.and(body_offset.map(|o| res[o..].to_string()));
    let status = get_status_code(&res)?;
    if status.is_server_error() { Err(ChError::ServerResponse(status, body)) } else { Ok(body) }
}

/// Its request format, on a fresh connection (as `ch-remote` makes one per command).
fn ch_command(socket: &Path, method: &str, command: &str, body: Option<&str>) -> Result<Option<String>, ChError> {
    let mut stream = UnixStream::connect(socket).map_err(ChError::Socket)?;
    stream.set_read_timeout(Some(Duration::from_secs(30))).map_err(ChError::Socket)?;
    let mut request = format!("{method} /api/v1/{command} HTTP/1.1\r\nHost: localhost\r\nAccept: */*\r\n");
    if let Some(body) = body {
        request.push_str(&format!("Content-Length: {}\r\n", body.len()));
    }
    request.push_str("\r\n");
    request.push_str(body.unwrap_or(""));
    stream.write_all(request.as_bytes()).map_err(ChError::Socket)?;
    parse_http_response(&mut stream)
}

/// What `ch-remote` shows for an answer: `Ok(body)` (printed as is), or the
/// status and the server's error chain, one line per string.
fn ch_remote(result: Result<Option<String>, ChError>) -> Result<Option<String>, (ChStatus, Vec<String>)> {
    match result {
        Ok(body) => Ok(body),
        Err(ChError::ServerResponse(status, body)) => {
            let body = body.unwrap_or_default();
            let lines: Vec<String> = serde_json::from_str(&body)
                .unwrap_or_else(|e| panic!("ch-remote cannot read the error body ({e}): {body:?}"));
            Err((status, lines))
        }
        Err(other) => panic!("ch-remote fails before reading an answer: {other}"),
    }
}

struct Api {
    process: common::ApiProcess,
}

impl Api {
    fn ok(&self, method: &str, command: &str, body: Option<&str>) -> Option<String> {
        let answer = ch_remote(ch_command(&self.process.socket, method, command, body));
        answer.unwrap_or_else(|(status, lines)| panic!("{method} {command}: {status:?} {lines:?}"))
    }

    fn json(&self, command: &str) -> Value {
        let body = self.ok("GET", command, None).unwrap_or_else(|| panic!("{command} has a body"));
        serde_json::from_str(&body).expect("JSON")
    }

    /// The command fails with `status` and the chain names `needle`.
    fn refused(&self, method: &str, command: &str, body: Option<&str>, status: ChStatus, needle: &str) {
        match ch_remote(ch_command(&self.process.socket, method, command, body)) {
            Ok(body) => panic!("{method} {command} succeeded: {body:?}"),
            Err((got, lines)) => {
                assert_eq!(got, status, "{method} {command}: {lines:?}");
                assert_eq!(lines.first().map(String::as_str), Some("Error from API"), "{lines:?}");
                assert!(lines.iter().any(|l| l.contains(needle)), "{method} {command}: {lines:?} lacks {needle:?}");
            }
        }
    }
}

/// Reads one raw response head (up to the blank line).
fn raw_head(socket: &Path, request: &[u8]) -> String {
    let mut stream = UnixStream::connect(socket).expect("connect");
    stream.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
    stream.write_all(request).expect("send");
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") && stream.read(&mut byte).expect("read") == 1 {
        head.push(byte[0]);
    }
    String::from_utf8(head).expect("ASCII head")
}

#[test]
fn status_lines_and_header_names_are_what_cloud_hypervisors_client_parses() {
    require_kvm!();
    let api = Api { process: common::ApiProcess::start("ch-wire", &[]) };
    let socket = &api.process.socket;
    let head = raw_head(socket, b"GET /api/v1/vmm.ping HTTP/1.1\r\nHost: localhost\r\nAccept: */*\r\n\r\n");
    assert!(head.starts_with("HTTP/1.1 200 \r\n"), "{head:?}");
    for name in ["Server: ", "Connection: keep-alive\r\n", "Content-Type: application/json\r\n", "Content-Length: "] {
        assert!(head.contains(name), "{name:?} in {head:?}");
    }
    let head = raw_head(socket, b"GET /api/v1/vm.info HTTP/1.1\r\nHost: localhost\r\nAccept: */*\r\n\r\n");
    assert!(head.starts_with("HTTP/1.1 404 \r\n") && head.contains("Content-Length: "), "{head:?}");
    let head = raw_head(socket, b"PUT /api/v1/vm.create HTTP/1.1\r\nHost: localhost\r\nAccept: */*\r\n\r\n");
    assert!(head.starts_with("HTTP/1.1 400 \r\n"), "an empty vm.create body: {head:?}");
    let ping = api.json("vmm.ping");
    assert_eq!(ping["pid"], api.process.child.id());
}

#[test]
fn the_endpoint_matrix_through_cloud_hypervisors_client() {
    require_kvm!();
    // A short body timeout so the 408 case is quick.
    let mut api = Api { process: common::ApiProcess::start("ch-matrix", &[("HEKIVISOR_API_TIMEOUT_MS", "1000")]) };
    let kernel = common::guests::build("ticker");
    let config = common::cloud_hypervisor_config(&kernel, &api.process.serial);
    use ChStatus::*;

    // No VM yet.
    assert!(api.json("vmm.ping")["version"].is_string());
    for (method, command) in [
        ("GET", "vm.info"),
        ("GET", "vm.counters"),
        ("PUT", "vm.boot"),
        ("PUT", "vm.pause"),
        ("PUT", "vm.resume"),
        ("PUT", "vm.reboot"),
        ("PUT", "vm.power-button"),
        ("PUT", "vm.shutdown"),
        ("PUT", "vm.delete"),
    ] {
        api.refused(method, command, None, NotFound, "no VM has been created");
    }
    api.refused("PUT", "vm.create", Some("{"), BadRequest, "invalid JSON");
    api.refused(
        "PUT",
        "vm.create",
        Some(&config.replace("\"nested\":true", "\"nested\":false")),
        BadRequest,
        "cpus.nested",
    );
    api.refused("GET", "vm.boot", None, Unknown, "use PUT");
    api.refused(
        "PUT",
        "vm.snapshot",
        Some(r#"{"destination_url":"file:///tmp/s"}"#),
        NotImplemented,
        "does not implement",
    );
    api.refused("PUT", "vm.nonsense", None, NotFound, "unknown endpoint");

    // Created.
    assert_eq!(api.ok("PUT", "vm.create", Some(&config)), None, "204 prints nothing");
    api.refused("PUT", "vm.create", Some(&config), InternalServerError, "already exists");
    let info = api.json("vm.info");
    assert_eq!(info["state"], "Created");
    for (section, field) in [("console", "pci_segment"), ("rng", "pci_segment"), ("cpus", "profile"), ("memory", "thp")]
    {
        assert!(info["config"][section].get(field).is_some(), "vm.info config lacks {section}.{field}: {info}");
    }
    api.refused("PUT", "vm.pause", None, InternalServerError, "cannot pause a VM in state Created");
    api.refused("PUT", "vm.resume", None, InternalServerError, "cannot resume");
    api.refused("PUT", "vm.shutdown", None, InternalServerError, "cannot shut down");

    // Running.
    assert_eq!(api.ok("PUT", "vm.boot", None), None);
    api.refused("PUT", "vm.boot", None, InternalServerError, "cannot boot a VM in state Running");
    assert_eq!(api.json("vm.info")["state"], "Running");
    api.refused("PUT", "vm.resume", None, InternalServerError, "cannot resume a VM in state Running");
    api.refused("PUT", "vm.power-button", None, NotImplemented, "no ACPI power button");
    assert!(api.json("vm.counters")["vcpu0"].is_object());

    // Paused.
    assert_eq!(api.ok("PUT", "vm.pause", None), None);
    api.refused("PUT", "vm.pause", None, InternalServerError, "cannot pause a VM in state Paused");
    assert_eq!(api.json("vm.info")["state"], "Paused");
    assert_eq!(api.ok("PUT", "vm.resume", None), None);

    // Reboot, shut down, boot again, delete.
    assert_eq!(api.ok("PUT", "vm.reboot", None), None);
    assert_eq!(api.json("vm.info")["state"], "Running");
    assert_eq!(api.ok("PUT", "vm.shutdown", None), None);
    api.refused("PUT", "vm.reboot", None, InternalServerError, "cannot reboot a VM in state Shutdown");
    assert_eq!(api.json("vm.info")["state"], "Shutdown");
    assert_eq!(api.ok("PUT", "vm.delete", None), None);
    api.refused("GET", "vm.info", None, NotFound, "no VM has been created");

    // What vm.info reported is accepted back unchanged.
    assert_eq!(api.ok("PUT", "vm.create", Some(&config)), None);
    let reported = api.json("vm.info")["config"].to_string();
    assert_eq!(api.ok("PUT", "vm.delete", None), None);
    assert_eq!(api.ok("PUT", "vm.create", Some(&reported)), None, "vm.info's config round-trips");

    // Our stricter codes still carry a message ch-remote prints: 413 and 408.
    let big = format!("\"{}\"", "x".repeat(4 << 20));
    api.refused("PUT", "vm.heki-protect", Some(&big), Unknown, "exceeds");
    let mut slow = UnixStream::connect(&api.process.socket).expect("connect");
    slow.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
    slow.write_all(b"PUT /api/v1/vm.create HTTP/1.1\r\nHost: localhost\r\nContent-Length: 100\r\n\r\n{")
        .expect("partial body");
    match ch_remote(parse_http_response(&mut slow)) {
        Err((Unknown, lines)) => assert!(lines.iter().any(|l| l.contains("timed out")), "{lines:?}"),
        other => panic!("408 expected: {other:?}"),
    }

    assert_eq!(api.ok("PUT", "vmm.shutdown", None), None);
    let deadline = Instant::now() + Duration::from_secs(10);
    while api.process.child.try_wait().expect("wait").is_none() {
        assert!(Instant::now() < deadline, "vmm.shutdown ends the process");
        std::thread::sleep(Duration::from_millis(10));
    }
}
