//! A small blocking HTTP/1.1 client for the Hekivisor API over a Unix socket,
//! shared by `hk-remote` and the tests.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use thiserror::Error;

#[derive(Debug, Error)]
pub enum Error {
    #[error("cannot connect to the API socket {path}")]
    Connect {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("API request failed")]
    Io(#[from] std::io::Error),
    #[error("malformed HTTP response: {0}")]
    BadResponse(String),
    #[error("HTTP {status}: {message}")]
    Server { status: u16, message: String },
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

    /// The server's message for an error response (`{"error": "..."}`), or the raw body.
    pub fn error_message(&self) -> String {
        extract_error(&self.body).unwrap_or_else(|| self.body.clone())
    }
}

fn extract_error(body: &str) -> Option<String> {
    let start = body.find("\"error\"")?;
    let rest = &body[start + 7..];
    let open = rest.find('"')? + 1;
    let mut out = String::new();
    let mut chars = rest[open..].chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => out.push(chars.next()?),
            '"' => return Some(out),
            c => out.push(c),
        }
    }
    None
}

/// One connection per request (`Connection: close`): simple and robust.
pub struct ApiClient {
    path: String,
    timeout: Duration,
}

impl ApiClient {
    pub fn new(path: impl AsRef<Path>) -> Self {
        ApiClient { path: path.as_ref().display().to_string(), timeout: Duration::from_secs(60) }
    }

    /// Sends `METHOD /api/v1/<command>` with an optional JSON body.
    pub fn request(&self, method: &str, command: &str, body: Option<&str>) -> Result<Response, Error> {
        let mut stream =
            UnixStream::connect(&self.path).map_err(|source| Error::Connect { path: self.path.clone(), source })?;
        stream.set_read_timeout(Some(self.timeout))?;
        stream.set_write_timeout(Some(self.timeout))?;
        let body = body.unwrap_or("");
        let mut request = format!("{method} /api/v1/{command} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n");
        if !body.is_empty() || method == "PUT" {
            request.push_str(&format!("Content-Type: application/json\r\nContent-Length: {}\r\n", body.len()));
        }
        request.push_str("\r\n");
        request.push_str(body);
        stream.write_all(request.as_bytes())?;
        read_response(stream)
    }

    /// Like `request`, but an HTTP error status becomes `Error::Server`.
    pub fn call(&self, method: &str, command: &str, body: Option<&str>) -> Result<Option<String>, Error> {
        let response = self.request(method, command, body)?;
        if response.status >= 300 {
            return Err(Error::Server { status: response.status, message: response.error_message() });
        }
        Ok((!response.body.is_empty()).then_some(response.body))
    }
}

fn read_response(stream: UnixStream) -> Result<Response, Error> {
    let mut reader = BufReader::new(stream);
    let mut status_line = String::new();
    reader.read_line(&mut status_line)?;
    let status = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse::<u16>().ok())
        .ok_or_else(|| Error::BadResponse(format!("status line {status_line:?}")))?;
    let mut headers = Vec::new();
    let mut content_length = None;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 {
            break;
        }
        let line = line.trim_end();
        if line.is_empty() {
            break;
        }
        let (k, v) = line.split_once(':').ok_or_else(|| Error::BadResponse(format!("header {line:?}")))?;
        if k.eq_ignore_ascii_case("content-length") {
            content_length = v.trim().parse::<usize>().ok();
        }
        headers.push((k.trim().to_string(), v.trim().to_string()));
    }
    let mut body = Vec::new();
    match content_length {
        Some(n) => {
            body.resize(n, 0);
            reader.read_exact(&mut body)?;
        }
        None => {
            reader.read_to_end(&mut body)?;
        }
    }
    let body = String::from_utf8(body).map_err(|_| Error::BadResponse("body is not UTF-8".into()))?;
    Ok(Response { status, headers, body })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_messages_are_extracted_from_json() {
        assert_eq!(extract_error(r#"{"error":"no VM has been created"}"#).as_deref(), Some("no VM has been created"));
        assert_eq!(extract_error(r#"{"error":"say \"hi\""}"#).as_deref(), Some("say \"hi\""));
        assert_eq!(extract_error("plain"), None);
    }

    #[test]
    fn responses_are_parsed_from_a_live_socket() {
        let dir = std::env::temp_dir().join(format!("api-client-test-{}", std::process::id()));
        let _ = std::fs::create_dir_all(&dir);
        let path = dir.join("s.sock");
        let _ = std::fs::remove_file(&path);
        let listener = std::os::unix::net::UnixListener::bind(&path).expect("bind");
        let server = std::thread::spawn(move || {
            let (mut conn, _) = listener.accept().expect("accept");
            let mut buf = [0u8; 1024];
            let _ = conn.read(&mut buf).expect("read request");
            conn.write_all(b"HTTP/1.1 404 Not Found\r\nContent-Type: application/json\r\nContent-Length: 20\r\n\r\n{\"error\":\"nothing\"}\n")
                .expect("write");
        });
        let client = ApiClient::new(&path);
        let err = client.call("GET", "vm.info", None).expect_err("404");
        server.join().expect("server");
        assert!(matches!(err, Error::Server { status: 404, ref message } if message == "nothing"), "{err}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
