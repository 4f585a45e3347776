//! A small blocking HTTP/1.1 client for the Hekivisor API over a Unix socket,
//! shared by `hk-remote`, the tests and the API benchmark.
//!
//! Requests carry `Content-Length` bodies. Responses are read by
//! `Content-Length`, chunked encoding, or until the server closes.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::BorrowedFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use thiserror::Error;

pub mod introspect;

/// The API's path prefix.
pub const API_PREFIX: &str = "/api/v1/";
/// Responses larger than this are refused rather than buffered.
const MAX_RESPONSE_BODY: usize = 64 << 20;
/// Longest status or header line accepted.
const MAX_LINE: u64 = 16 << 10;

#[derive(Debug, Error)]
pub enum Error {
    #[error("cannot connect to the API socket {path}")]
    Connect {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("API request failed")]
    Io(#[from] std::io::Error),
    #[error("malformed HTTP response: {0}")]
    BadResponse(String),
    /// The server answered with an error status; `message` is its error text:
    /// the causes of a Cloud Hypervisor-style `["Error from API", ...]` chain
    /// joined with ": ", or the text of an `{"error": ...}` body.
    #[error("HTTP {status}: {message}")]
    Server { status: u16, message: String },
}

impl Error {
    /// The HTTP status, when the server answered with an error.
    pub fn status(&self) -> Option<u16> {
        match self {
            Error::Server { status, .. } => Some(*status),
            _ => None,
        }
    }
}

/// A parsed response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl Response {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }

    pub fn is_success(&self) -> bool {
        (200..300).contains(&self.status)
    }

    /// The server's message for an error response: the causes of an error
    /// chain (`["Error from API", "vm.info failed", "no VM has been created"]`
    /// gives `vm.info failed: no VM has been created`), the text of
    /// `{"error": "..."}`, or else the raw body.
    pub fn error_message(&self) -> String {
        if let Some(chain) = self.error_chain() {
            let causes: Vec<&str> =
                chain.iter().map(String::as_str).skip_while(|line| *line == ERROR_CHAIN_HEAD).collect();
            return causes.join(": ");
        }
        extract_error(&self.body).unwrap_or_else(|| self.body.clone())
    }

    /// The error chain of a Cloud Hypervisor-style error body (a JSON array
    /// of strings, outermost first), if the body is one.
    pub fn error_chain(&self) -> Option<Vec<String>> {
        parse_string_array(&self.body)
    }

    /// `Ok(Some(body))` for a success with a body, `Ok(None)` for one without,
    /// `Err(Error::Server)` for an error status.
    pub fn into_result(self) -> Result<Option<String>, Error> {
        if !self.is_success() {
            return Err(Error::Server { status: self.status, message: self.error_message() });
        }
        Ok((!self.body.is_empty()).then_some(self.body))
    }

    fn wants_close(&self) -> bool {
        self.header("connection").is_some_and(|v| v.eq_ignore_ascii_case("close"))
    }
}

/// The first line of a Cloud Hypervisor error chain, which says only that
/// the API answered with an error.
pub const ERROR_CHAIN_HEAD: &str = "Error from API";

/// Finds the string value of the top-level `"error"` key without a JSON parser.
fn extract_error(body: &str) -> Option<String> {
    let start = body.find("\"error\"")?;
    let rest = &body[start + 7..];
    let rest = rest.trim_start().strip_prefix(':')?.trim_start().strip_prefix('"')?;
    parse_string_rest(&mut rest.chars())
}

/// Parses a JSON array of strings (`["a", "b"]`) without a JSON parser.
fn parse_string_array(body: &str) -> Option<Vec<String>> {
    let mut rest = body.trim().strip_prefix('[')?.trim_start();
    let mut out = Vec::new();
    if let Some(after) = rest.strip_prefix(']') {
        return after.trim().is_empty().then_some(out);
    }
    loop {
        let mut chars = rest.strip_prefix('"')?.chars();
        out.push(parse_string_rest(&mut chars)?);
        rest = chars.as_str().trim_start();
        if let Some(after) = rest.strip_prefix(']') {
            return after.trim().is_empty().then_some(out);
        }
        rest = rest.strip_prefix(',')?.trim_start();
    }
}

/// Reads a JSON string's content after its opening quote, through the closing one.
fn parse_string_rest(chars: &mut std::str::Chars<'_>) -> Option<String> {
    let mut out = String::new();
    while let Some(c) = chars.next() {
        match c {
            '\\' => match chars.next()? {
                'n' => out.push('\n'),
                't' => out.push('\t'),
                'u' => {
                    let hex: String = chars.by_ref().take(4).collect();
                    out.push(u32::from_str_radix(&hex, 16).ok().and_then(char::from_u32).unwrap_or('\u{fffd}'));
                }
                other => out.push(other),
            },
            '"' => return Some(out),
            c => out.push(c),
        }
    }
    None
}

fn write_request(
    out: &mut impl Write,
    method: &str,
    command: &str,
    body: Option<&str>,
    keep_alive: bool,
) -> std::io::Result<()> {
    out.write_all(request_text(method, command, body, keep_alive).as_bytes())?;
    out.flush()
}

fn request_text(method: &str, command: &str, body: Option<&str>, keep_alive: bool) -> String {
    let connection = if keep_alive { "keep-alive" } else { "close" };
    let mut request =
        format!("{method} {API_PREFIX}{command} HTTP/1.1\r\nHost: localhost\r\nConnection: {connection}\r\n");
    if let Some(body) = body {
        request.push_str(&format!("Content-Type: application/json\r\nContent-Length: {}\r\n\r\n", body.len()));
        request.push_str(body);
    } else if method != "GET" {
        request.push_str("Content-Length: 0\r\n\r\n");
    } else {
        request.push_str("\r\n");
    }
    request
}

/// Writes the whole request in one `sendmsg` carrying `fds` as `SCM_RIGHTS`
/// (how Cloud Hypervisor's clients and Kata hand over TAP descriptors).
fn send_request_with_fds(
    socket: &UnixStream,
    method: &str,
    command: &str,
    body: Option<&str>,
    fds: &[BorrowedFd<'_>],
) -> Result<(), Error> {
    use rustix::net::{SendAncillaryBuffer, SendAncillaryMessage, SendFlags, sendmsg};
    let text = request_text(method, command, body, false);
    let mut space = vec![std::mem::MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(fds.len().max(1)))];
    let mut control = SendAncillaryBuffer::new(&mut space);
    if !fds.is_empty() && !control.push(SendAncillaryMessage::ScmRights(fds)) {
        return Err(Error::BadResponse("too many descriptors for one message".into()));
    }
    let sent = sendmsg(socket, &[std::io::IoSlice::new(text.as_bytes())], &mut control, SendFlags::NOSIGNAL)
        .map_err(std::io::Error::from)?;
    // The descriptors went with the first bytes; the rest, if any, follows plainly.
    let mut rest = socket;
    rest.write_all(&text.as_bytes()[sent..])?;
    Ok(())
}

fn read_line(reader: &mut impl BufRead) -> Result<String, Error> {
    let mut line = String::new();
    let n = reader.by_ref().take(MAX_LINE).read_line(&mut line)?;
    if n as u64 == MAX_LINE && !line.ends_with('\n') {
        return Err(Error::BadResponse("header line too long".into()));
    }
    Ok(line)
}

/// Reads one response. `Ok(None)` means the server closed before sending anything.
fn read_response(reader: &mut impl BufRead, method: &str) -> Result<Option<Response>, Error> {
    let status_line = read_line(reader)?;
    if status_line.is_empty() {
        return Ok(None);
    }
    let status = status_line
        .strip_prefix("HTTP/1.")
        .and_then(|rest| rest.split_whitespace().nth(1))
        .and_then(|s| s.parse::<u16>().ok())
        .ok_or_else(|| Error::BadResponse(format!("status line {:?}", status_line.trim_end())))?;
    let mut headers = Vec::new();
    loop {
        let line = read_line(reader)?;
        if line.is_empty() {
            return Err(Error::BadResponse("connection closed inside the headers".into()));
        }
        let line = line.trim_end();
        if line.is_empty() {
            break;
        }
        let (k, v) = line.split_once(':').ok_or_else(|| Error::BadResponse(format!("header {line:?}")))?;
        headers.push((k.trim().to_string(), v.trim().to_string()));
    }
    let mut response = Response { status, headers, body: String::new() };
    let no_body = method == "HEAD" || status == 204 || status == 304 || (100..200).contains(&status);
    let body = if no_body {
        Vec::new()
    } else if response.header("transfer-encoding").is_some_and(|v| v.eq_ignore_ascii_case("chunked")) {
        read_chunked(reader)?
    } else if let Some(length) = response.header("content-length") {
        let length: usize = length.parse().map_err(|_| Error::BadResponse(format!("Content-Length {length:?}")))?;
        if length > MAX_RESPONSE_BODY {
            return Err(Error::BadResponse(format!("body of {length} bytes is too large")));
        }
        let mut body = vec![0; length];
        reader.read_exact(&mut body)?;
        body
    } else {
        let mut body = Vec::new();
        reader.take(MAX_RESPONSE_BODY as u64 + 1).read_to_end(&mut body)?;
        if body.len() > MAX_RESPONSE_BODY {
            return Err(Error::BadResponse("body too large".into()));
        }
        body
    };
    response.body = String::from_utf8(body).map_err(|_| Error::BadResponse("body is not UTF-8".into()))?;
    Ok(Some(response))
}

fn read_chunked(reader: &mut impl BufRead) -> Result<Vec<u8>, Error> {
    let mut body = Vec::new();
    loop {
        let line = read_line(reader)?;
        let size = line.trim_end().split(';').next().unwrap_or("");
        let size = usize::from_str_radix(size.trim(), 16)
            .map_err(|_| Error::BadResponse(format!("chunk size {:?}", line.trim_end())))?;
        if size == 0 {
            // Trailers, then the final blank line.
            while !read_line(reader)?.trim_end().is_empty() {}
            return Ok(body);
        }
        if body.len() + size > MAX_RESPONSE_BODY {
            return Err(Error::BadResponse("body too large".into()));
        }
        let start = body.len();
        body.resize(start + size, 0);
        reader.read_exact(&mut body[start..])?;
        let mut crlf = [0u8; 2];
        reader.read_exact(&mut crlf)?;
    }
}

/// Sends `METHOD /api/v1/<full_command>` on an open connection and reads the
/// answer, leaving the connection open for the next request.
/// Returns the body of a success (`None` when empty); an HTTP error status
/// becomes `Error::Server` with the server's message.
pub fn simple_api_command(
    socket: &mut UnixStream,
    method: &str,
    full_command: &str,
    body: Option<&str>,
) -> Result<Option<String>, Error> {
    write_request(socket, method, full_command, body, true)?;
    let mut reader = BufReader::new(socket);
    read_response(&mut reader, method)?
        .ok_or_else(|| Error::BadResponse("connection closed without a response".into()))?
        .into_result()
}

/// A client for one API socket.
///
/// `ApiClient::new` opens a connection per request (`Connection: close`);
/// `ApiClient::connect` keeps one connection open across requests.
pub struct ApiClient {
    path: PathBuf,
    timeout: Duration,
    /// The kept-alive connection; `None` in per-request mode.
    persistent: Option<Mutex<Option<BufReader<UnixStream>>>>,
}

impl ApiClient {
    /// A client that connects anew for every request.
    pub fn new(path: impl AsRef<Path>) -> Self {
        ApiClient { path: path.as_ref().to_path_buf(), timeout: Duration::from_secs(60), persistent: None }
    }

    /// Connects now and keeps the connection for later requests (reconnecting
    /// if the server closed it while idle).
    pub fn connect(path: impl AsRef<Path>) -> Result<Self, Error> {
        let mut client = ApiClient::new(path);
        let stream = client.open()?;
        client.persistent = Some(Mutex::new(Some(BufReader::new(stream))));
        Ok(client)
    }

    /// How long to wait for the server on each read and write (default 60 s).
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    fn open(&self) -> Result<UnixStream, Error> {
        let stream =
            UnixStream::connect(&self.path).map_err(|source| Error::Connect { path: self.path.clone(), source })?;
        stream.set_read_timeout(Some(self.timeout))?;
        stream.set_write_timeout(Some(self.timeout))?;
        Ok(stream)
    }

    /// Sends `METHOD /api/v1/<command>` with an optional JSON body and returns
    /// the response whatever its status.
    pub fn request(&self, method: &str, command: &str, body: Option<&str>) -> Result<Response, Error> {
        let Some(persistent) = &self.persistent else {
            let mut stream = self.open()?;
            write_request(&mut stream, method, command, body, false)?;
            return read_response(&mut BufReader::new(stream), method)?
                .ok_or_else(|| Error::BadResponse("connection closed without a response".into()));
        };
        let mut slot = persistent.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        // A kept connection the server closed while idle shows up as an
        // immediate EOF; only then, and only for GET, is retrying safe.
        let mut reused = slot.is_some();
        loop {
            let reader = match slot.take() {
                Some(reader) => slot.insert(reader),
                None => slot.insert(BufReader::new(self.open()?)),
            };
            let sent = write_request(reader.get_mut(), method, command, body, true);
            let answer = match sent {
                Ok(()) => read_response(reader, method),
                Err(e) => Err(e.into()),
            };
            match answer {
                Ok(Some(response)) => {
                    if response.wants_close() {
                        *slot = None;
                    }
                    return Ok(response);
                }
                Ok(None) | Err(Error::Io(_)) if reused && method == "GET" => {
                    *slot = None;
                    reused = false;
                }
                Ok(None) => {
                    *slot = None;
                    return Err(Error::BadResponse("connection closed without a response".into()));
                }
                Err(e) => {
                    *slot = None;
                    return Err(e);
                }
            }
        }
    }

    /// Sends a request with `fds` attached as `SCM_RIGHTS` on a connection of
    /// its own, and returns the response whatever its status.
    pub fn request_with_fds(
        &self,
        method: &str,
        command: &str,
        body: Option<&str>,
        fds: &[BorrowedFd<'_>],
    ) -> Result<Response, Error> {
        let stream = self.open()?;
        send_request_with_fds(&stream, method, command, body, fds)?;
        read_response(&mut BufReader::new(stream), method)?
            .ok_or_else(|| Error::BadResponse("connection closed without a response".into()))
    }

    /// Like `request`, but an HTTP error status becomes `Error::Server`.
    pub fn call(&self, method: &str, command: &str, body: Option<&str>) -> Result<Option<String>, Error> {
        self.request(method, command, body)?.into_result()
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::net::UnixListener;

    use super::*;

    #[test]
    fn error_messages_are_extracted_from_json() {
        assert_eq!(extract_error(r#"{"error":"no VM has been created"}"#).as_deref(), Some("no VM has been created"));
        assert_eq!(extract_error(r#"{"error": "say \"hi\"\n"}"#).as_deref(), Some("say \"hi\"\n"));
        assert_eq!(extract_error(r#"{"error":"caf\u00e9"}"#).as_deref(), Some("café"));
        assert_eq!(extract_error("plain"), None);
    }

    #[test]
    fn cloud_hypervisor_error_chains_are_read() {
        let r = Response {
            status: 404,
            headers: Vec::new(),
            body: r#"["Error from API","vm.info failed","no VM has been created"]"#.into(),
        };
        assert_eq!(r.error_chain().expect("chain").len(), 3);
        assert_eq!(r.error_message(), "vm.info failed: no VM has been created");
        assert_eq!(parse_string_array(r#" [ "a\"b" , "c\u00e9" ] "#), Some(vec!["a\"b".into(), "cé".into()]));
        assert_eq!(parse_string_array("[]"), Some(Vec::new()));
        for bad in ["", "[", r#"["a""#, r#"["a",]"#, r#"["a"] x"#, "[1]", r#"{"error":"x"}"#] {
            assert_eq!(parse_string_array(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn status_lines_without_reason_phrase_are_read() {
        let raw = "HTTP/1.1 409 \r\nServer: Hekivisor API\r\nContent-Length: 2\r\n\r\n[]";
        let r = parse(raw, "GET").expect("ok").expect("some");
        assert_eq!((r.status, r.body.as_str()), (409, "[]"));
        let r = parse("HTTP/1.1 204 \r\n\r\n", "PUT").expect("ok").expect("some");
        assert_eq!(r.status, 204);
    }

    fn parse(raw: &str, method: &str) -> Result<Option<Response>, Error> {
        read_response(&mut BufReader::new(raw.as_bytes()), method)
    }

    #[test]
    fn bodies_are_read_by_length_chunks_or_until_close() {
        let r = parse("HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhelloEXTRA", "GET").expect("ok").expect("some");
        assert_eq!((r.status, r.body.as_str()), (200, "hello"));
        let r =
            parse("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2;x=y\r\nde\r\n0\r\n\r\n", "GET")
                .expect("ok")
                .expect("some");
        assert_eq!(r.body, "abcde");
        let r = parse("HTTP/1.0 200 OK\r\n\r\nuntil close", "GET").expect("ok").expect("some");
        assert_eq!(r.body, "until close");
        let r = parse("HTTP/1.1 204 No Content\r\n\r\n", "PUT").expect("ok").expect("some");
        assert_eq!((r.status, r.body.as_str()), (204, ""));
        assert!(parse("", "GET").expect("eof is not an error").is_none());
    }

    #[test]
    fn malformed_responses_are_errors() {
        for raw in [
            "garbage\r\n\r\n",
            "HTTP/1.1 abc OK\r\n\r\n",
            "HTTP/1.1 200 OK\r\nno colon\r\n\r\n",
            "HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n",
            "HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort",
            "HTTP/1.1 200 OK\r\nContent-Length: 99999999999\r\n\r\n",
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
            "HTTP/1.1 200 OK\r\nContent-Le",
        ] {
            assert!(parse(raw, "GET").is_err(), "{raw:?} must be refused");
        }
    }

    /// A one-thread server answering `answers.len()` requests in order; each
    /// entry is the raw response for one request on one connection.
    fn serve(answers: Vec<Vec<&'static str>>) -> (PathBuf, std::thread::JoinHandle<Vec<String>>) {
        let dir =
            std::env::temp_dir().join(format!("api-client-{}-{:?}", std::process::id(), std::thread::current().id()));
        let _ = std::fs::create_dir_all(&dir);
        let path = dir.join("s.sock");
        let _ = std::fs::remove_file(&path);
        let listener = UnixListener::bind(&path).expect("bind");
        let server = std::thread::spawn(move || {
            let mut requests = Vec::new();
            for connection in answers {
                let (conn, _) = listener.accept().expect("accept");
                let mut reader = BufReader::new(conn);
                for answer in connection {
                    let mut head = String::new();
                    let mut length = 0;
                    loop {
                        let mut line = String::new();
                        reader.read_line(&mut line).expect("read request");
                        if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                            length = v.trim().parse().expect("length");
                        }
                        head.push_str(&line);
                        if line == "\r\n" {
                            break;
                        }
                    }
                    let mut body = vec![0; length];
                    reader.read_exact(&mut body).expect("body");
                    requests.push(head + &String::from_utf8(body).expect("utf-8"));
                    reader.get_mut().write_all(answer.as_bytes()).expect("write");
                }
            }
            requests
        });
        (path, server)
    }

    #[test]
    fn http_errors_carry_status_and_server_message() {
        let (path, server) = serve(vec![vec![
            "HTTP/1.1 404 Not Found\r\nContent-Type: application/json\r\nContent-Length: 19\r\n\r\n{\"error\":\"nothing\"}",
        ]]);
        let err = ApiClient::new(&path).call("GET", "vm.info", None).expect_err("404");
        let requests = server.join().expect("server");
        assert!(matches!(err, Error::Server { status: 404, ref message } if message == "nothing"), "{err}");
        assert_eq!(err.status(), Some(404));
        assert!(requests[0].starts_with("GET /api/v1/vm.info HTTP/1.1\r\n"), "{}", requests[0]);
        assert!(requests[0].contains("Connection: close"));
    }

    #[test]
    fn simple_api_command_reuses_one_connection() {
        let ok = "HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}";
        let (path, server) = serve(vec![vec![ok, "HTTP/1.1 204 No Content\r\n\r\n", ok]]);
        let mut socket = UnixStream::connect(&path).expect("connect");
        assert_eq!(simple_api_command(&mut socket, "GET", "vmm.ping", None).expect("ping").as_deref(), Some("{}"));
        assert_eq!(simple_api_command(&mut socket, "PUT", "vm.create", Some("{\"a\":1}")).expect("create"), None);
        assert!(simple_api_command(&mut socket, "GET", "vm.info", None).is_ok());
        let requests = server.join().expect("server");
        assert_eq!(requests.len(), 3);
        assert!(requests[1].starts_with("PUT /api/v1/vm.create"));
        assert!(requests[1].contains("Content-Length: 7\r\n"));
        assert!(requests[1].ends_with("\r\n\r\n{\"a\":1}"));
    }

    #[test]
    fn persistent_client_reconnects_after_the_server_closes_an_idle_connection() {
        let ok = "HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok";
        // First connection answers once and closes; the second serves the rest.
        let (path, server) = serve(vec![vec![ok], vec![ok, ok]]);
        let client = ApiClient::connect(&path).expect("connect");
        assert_eq!(client.call("GET", "vmm.ping", None).expect("1").as_deref(), Some("ok"));
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(client.call("GET", "vmm.ping", None).expect("2 after reconnect").as_deref(), Some("ok"));
        assert_eq!(client.call("GET", "vmm.ping", None).expect("3").as_deref(), Some("ok"));
        assert_eq!(server.join().expect("server").len(), 3);
    }

    #[test]
    fn connect_to_a_missing_socket_names_the_path() {
        let err = ApiClient::connect("/nonexistent/hk.sock").err().expect("no socket");
        assert!(err.to_string().contains("/nonexistent/hk.sock"), "{err}");
    }
}
