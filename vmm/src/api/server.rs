//! The HTTP server thread (hyper on a current-thread tokio runtime).
//!
//! The wire format is Cloud Hypervisor's, because its `ch-remote` and
//! `api_client` parse responses by hand: the status line carries the code and
//! no reason phrase (`HTTP/1.1 404 \r\n`, they parse everything after
//! `HTTP/1.1 ` as an integer), header names are title-cased (they search for
//! `Content-Length: ` case-sensitively), and an error body is a JSON array of
//! strings, the error chain from the outside in, which `ch-remote` prints
//! line by line. All three are hyper features: `ReasonPhrase`, the HTTP/1
//! builder's `title_case_headers`, and an ordinary body.

use std::convert::Infallible;
use std::os::unix::net::UnixListener as StdUnixListener;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::Sender;
use std::time::Duration;

use http_body_util::{BodyExt, Full, Limited};
use hyper::body::{Bytes, Incoming};
use hyper::ext::ReasonPhrase;
use hyper::header::{ALLOW, CONNECTION, CONTENT_TYPE, HeaderValue, SERVER};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use vmm_sys_util::eventfd::EventFd;

use super::fd_stream::{FdStash, FdStream};
use super::routes::{Dialect, Resolved, resolve};
use super::{ApiError, ApiMessage, ApiResult};

/// Limits that protect the VMM from misbehaving clients.
#[derive(Clone, Copy, Debug)]
pub struct ServerLimits {
    pub max_body: usize,
    /// Time allowed for the request headers, and again for the body.
    pub read_timeout: Duration,
}

/// Overrides the read timeout in milliseconds (tests use a short one).
pub const TIMEOUT_ENV: &str = "HEKIVISOR_API_TIMEOUT_MS";

impl Default for ServerLimits {
    fn default() -> Self {
        let read_timeout = std::env::var(TIMEOUT_ENV)
            .ok()
            .and_then(|ms| ms.parse::<u64>().ok())
            .map(Duration::from_millis)
            .unwrap_or(Duration::from_secs(10));
        ServerLimits { max_body: 4 << 20, read_timeout }
    }
}

/// Open connections; the VMM waits for them to drain before exiting so a
/// `vmm.shutdown` caller still gets its answer.
static OPEN_CONNECTIONS: AtomicUsize = AtomicUsize::new(0);

/// Waits (bounded) until every open API connection has been answered and closed.
pub fn drain_connections(timeout: Duration) {
    let deadline = std::time::Instant::now() + timeout;
    while OPEN_CONNECTIONS.load(Ordering::Acquire) > 0 && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(2));
    }
}

struct Shared {
    to_vmm: Sender<ApiMessage>,
    wake_vmm: EventFd,
    limits: ServerLimits,
}

pub fn start_api_server(
    listener: StdUnixListener,
    to_vmm: Sender<ApiMessage>,
    wake_vmm: EventFd,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    start_api_server_with(listener, to_vmm, wake_vmm, ServerLimits::default())
}

pub fn start_api_server_with(
    listener: StdUnixListener,
    to_vmm: Sender<ApiMessage>,
    wake_vmm: EventFd,
    limits: ServerLimits,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    listener.set_nonblocking(true)?;
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let shared = Arc::new(Shared { to_vmm, wake_vmm, limits });
    std::thread::Builder::new().name("http-api".into()).spawn(move || {
        crate::seccomp::apply_or_exit(crate::seccomp::ThreadKind::Api);
        runtime.block_on(async move {
            let listener = match tokio::net::UnixListener::from_std(listener) {
                Ok(l) => l,
                Err(e) => {
                    log::error!("API socket unusable: {e}");
                    return;
                }
            };
            loop {
                let stream = match listener.accept().await {
                    Ok((stream, _)) => stream,
                    Err(e) => {
                        log::warn!("API accept failed: {e}");
                        tokio::time::sleep(Duration::from_millis(10)).await;
                        continue;
                    }
                };
                let shared = shared.clone();
                let header_timeout = shared.limits.read_timeout;
                OPEN_CONNECTIONS.fetch_add(1, Ordering::AcqRel);
                tokio::spawn(async move {
                    // Descriptors sent as SCM_RIGHTS wait here for the request they came with.
                    let stash = FdStash::default();
                    let stream = FdStream::new(stream, stash.clone());
                    let service = service_fn(move |req| handle(req, shared.clone(), stash.clone()));
                    let connection = http1::Builder::new()
                        .timer(TokioTimer::new())
                        .title_case_headers(true)
                        .header_read_timeout(header_timeout)
                        .serve_connection(TokioIo::new(stream), service);
                    if let Err(e) = connection.await {
                        log::debug!("API connection ended: {e}");
                    }
                    OPEN_CONNECTIONS.fetch_sub(1, Ordering::AcqRel);
                });
            }
        });
    })
}

/// What the server says its name is (Cloud Hypervisor sends `Cloud Hypervisor API`).
const SERVER_NAME: &str = "Hekivisor API";
/// The first line of every error chain, as Cloud Hypervisor's.
pub const ERROR_CHAIN_HEAD: &str = "Error from API";

fn respond(status: StatusCode, body: Option<serde_json::Value>) -> Response<Full<Bytes>> {
    let body = match body {
        Some(json) => Full::new(Bytes::from(json.to_string())),
        None => Full::new(Bytes::new()),
    };
    let mut response = Response::new(body);
    *response.status_mut() = status;
    // `HTTP/1.1 204 \r\n`: the code alone, as Cloud Hypervisor's clients parse it.
    response.extensions_mut().insert(ReasonPhrase::from_static(b""));
    let headers = response.headers_mut();
    headers.insert(SERVER, HeaderValue::from_static(SERVER_NAME));
    if status != StatusCode::NO_CONTENT {
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    }
    response
}

/// An error answer: the chain from the outside in, one string per cause.
/// `context` says which request failed; `message` may hold several causes,
/// one per line.
fn error_response(status: u16, context: &str, message: &str) -> Response<Full<Bytes>> {
    let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let mut chain = vec![ERROR_CHAIN_HEAD.to_string(), context.to_string()];
    chain.extend(message.lines().filter(|l| !l.is_empty()).map(str::to_string));
    respond(status, Some(serde_json::Value::from(chain)))
}

fn api_error(context: &str, e: &ApiError, dialect: Dialect) -> Response<Full<Bytes>> {
    error_response(e.status(dialect), context, &e.to_string())
}

/// Marks a response as the connection's last: the rest of the request body
/// was not read, so the stream cannot carry another request.
fn closing(mut response: Response<Full<Bytes>>) -> Response<Full<Bytes>> {
    response.headers_mut().insert(CONNECTION, HeaderValue::from_static("close"));
    response
}

/// Whether the client keeps the connection (HTTP/1.1 without `Connection: close`).
fn client_keeps_alive<B>(req: &Request<B>) -> bool {
    let close = req
        .headers()
        .get_all(CONNECTION)
        .iter()
        .any(|v| v.to_str().is_ok_and(|v| v.split(',').any(|token| token.trim().eq_ignore_ascii_case("close"))));
    req.version() == hyper::Version::HTTP_11 && !close
}

/// Adds `Connection: keep-alive`, as Cloud Hypervisor does, unless the
/// connection ends with this response.
fn keep_alive_header(mut response: Response<Full<Bytes>>, keep: bool) -> Response<Full<Bytes>> {
    if keep && !response.headers().contains_key(CONNECTION) {
        response.headers_mut().insert(CONNECTION, HeaderValue::from_static("keep-alive"));
    }
    response
}

async fn handle(
    req: Request<Incoming>,
    shared: Arc<Shared>,
    stash: FdStash,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let keep = client_keeps_alive(&req);
    let response = answer(req, shared, &stash).await;
    // Descriptors no request took (a route that takes none) are closed here.
    drop(super::fd_stream::take(&stash));
    Ok(keep_alive_header(response, keep))
}

async fn answer(req: Request<Incoming>, shared: Arc<Shared>, stash: &FdStash) -> Response<Full<Bytes>> {
    let path = req.uri().path().to_string();
    let method = req.method().clone();
    let resolved = resolve(method.as_str(), &path);
    let context = match &resolved {
        Resolved::Request(route) => format!("{} failed", route.path),
        Resolved::NotImplemented(name, _) => format!("{name} failed"),
        Resolved::NotFound => format!("unknown endpoint {path}"),
        Resolved::MethodNotAllowed(_) => format!("{method} {path} failed"),
    };
    // The whole body is read before any answer, even one that does not need
    // it: Cloud Hypervisor's client writes its headers and its body in
    // separate writes, and a connection closed before the body arrived makes
    // it fail with EPIPE instead of printing our answer.
    let limits = shared.limits;
    let body = Limited::new(req.into_body(), limits.max_body);
    let bytes = match tokio::time::timeout(limits.read_timeout, body.collect()).await {
        Err(_) => return closing(error_response(408, &context, "timed out reading the request body")),
        Ok(Err(e)) if e.downcast_ref::<http_body_util::LengthLimitError>().is_some() => {
            let message = format!("request body exceeds {} bytes", limits.max_body);
            return closing(error_response(413, &context, &message));
        }
        Ok(Err(e)) => return error_response(400, &context, &format!("cannot read the request body: {e}")),
        Ok(Ok(collected)) => collected.to_bytes(),
    };
    let route = match resolved {
        Resolved::Request(route) => route,
        Resolved::NotFound => return error_response(404, &context, ""),
        Resolved::NotImplemented(name, feature) => {
            let message = format!("Hekivisor does not implement {name} ({feature}), a Cloud Hypervisor endpoint");
            return error_response(501, &context, &message);
        }
        Resolved::MethodNotAllowed(allow) => {
            let mut response = error_response(405, &context, &format!("{method} is not allowed here; use {allow}"));
            response.headers_mut().insert(ALLOW, HeaderValue::from_static(allow));
            return response;
        }
    };
    // The whole request has arrived, and with it any descriptors sent along.
    let request = match route.decode(&bytes, super::fd_stream::take(stash)) {
        Ok(r) => r,
        Err(e) => return api_error(&context, &e, route.dialect()),
    };
    let (reply_tx, reply_rx) = tokio::sync::oneshot::channel();
    let sent = shared.to_vmm.send(ApiMessage { request, reply: reply_tx }).is_ok();
    if !sent || shared.wake_vmm.write(1).is_err() {
        return error_response(503, &context, "the VMM is shutting down");
    }
    let result: ApiResult = match reply_rx.await {
        Ok(result) => result,
        Err(_) => Err(ApiError::Internal("the VMM dropped the request".into())),
    };
    match result {
        Ok(Some(json)) => respond(StatusCode::OK, Some(json)),
        Ok(None) => respond(StatusCode::NO_CONTENT, None),
        Err(e) => api_error(&context, &e, route.dialect()),
    }
}
