//! The HTTP server thread (hyper on a current-thread tokio runtime).

use std::convert::Infallible;
use std::os::unix::net::UnixListener as StdUnixListener;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::Sender;
use std::time::Duration;

use http_body_util::{BodyExt, Full, Limited};
use hyper::body::{Bytes, Incoming};
use hyper::header::{ALLOW, CONNECTION, CONTENT_TYPE};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use serde_json::json;
use vmm_sys_util::eventfd::EventFd;

use super::routes::{Resolved, resolve};
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
                    let service = service_fn(move |req| handle(req, shared.clone()));
                    let connection = http1::Builder::new()
                        .timer(TokioTimer::new())
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

fn respond(status: StatusCode, body: Option<serde_json::Value>) -> Response<Full<Bytes>> {
    let mut builder = Response::builder().status(status);
    let body = match body {
        Some(json) => {
            builder = builder.header(CONTENT_TYPE, "application/json");
            Full::new(Bytes::from(json.to_string()))
        }
        None => Full::new(Bytes::new()),
    };
    builder.body(body).unwrap_or_else(|_| Response::new(Full::new(Bytes::new())))
}

fn error_response(status: u16, message: &str) -> Response<Full<Bytes>> {
    let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    respond(status, Some(json!({ "error": message })))
}

/// Marks a response as the connection's last: the rest of the request body
/// was not read, so the stream cannot carry another request.
fn closing(mut response: Response<Full<Bytes>>) -> Response<Full<Bytes>> {
    response.headers_mut().insert(CONNECTION, hyper::header::HeaderValue::from_static("close"));
    response
}

async fn handle(req: Request<Incoming>, shared: Arc<Shared>) -> Result<Response<Full<Bytes>>, Infallible> {
    let route = match resolve(req.method().as_str(), req.uri().path()) {
        Resolved::Request(route) => route,
        Resolved::NotFound => {
            return Ok(error_response(404, &format!("unknown endpoint {}", req.uri().path())));
        }
        Resolved::MethodNotAllowed(allow) => {
            let mut response = error_response(405, &format!("{} is not allowed here; use {allow}", req.method()));
            response.headers_mut().insert(ALLOW, hyper::header::HeaderValue::from_static(allow));
            return Ok(response);
        }
    };
    let limits = shared.limits;
    let body = Limited::new(req.into_body(), limits.max_body);
    let bytes = match tokio::time::timeout(limits.read_timeout, body.collect()).await {
        Err(_) => return Ok(closing(error_response(408, "timed out reading the request body"))),
        Ok(Err(e)) if e.downcast_ref::<http_body_util::LengthLimitError>().is_some() => {
            return Ok(closing(error_response(413, &format!("request body exceeds {} bytes", limits.max_body))));
        }
        Ok(Err(e)) => {
            return Ok(error_response(400, &format!("cannot read the request body: {e}")));
        }
        Ok(Ok(collected)) => collected.to_bytes(),
    };
    let request = match route.decode(&bytes) {
        Ok(r) => r,
        Err(e) => return Ok(error_response(e.status(), &e.to_string())),
    };
    let (reply_tx, reply_rx) = tokio::sync::oneshot::channel();
    let sent = shared.to_vmm.send(ApiMessage { request, reply: reply_tx }).is_ok();
    if !sent || shared.wake_vmm.write(1).is_err() {
        return Ok(error_response(503, "the VMM is shutting down"));
    }
    let result: ApiResult = match reply_rx.await {
        Ok(result) => result,
        Err(_) => Err(ApiError::Internal("the VMM dropped the request".into())),
    };
    Ok(match result {
        Ok(Some(json)) => respond(StatusCode::OK, Some(json)),
        Ok(None) => respond(StatusCode::NO_CONTENT, None),
        Err(e) => error_response(e.status(), &e.to_string()),
    })
}
