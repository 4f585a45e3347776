//! HTTP client over a Unix socket.
