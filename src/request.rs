//! What crosses from the tokio side to a Ruby thread: plain Rust data only.

use std::sync::Arc;

use tokio::sync::oneshot;

use crate::body::RequestBody;
use crate::interim::EarlyHints;
use crate::response::AppResponse;
use crate::takeover::TakeoverHandle;

/// Facts about the listener a request arrived on, shared by all requests.
#[derive(Debug)]
pub struct ServerInfo {
    /// "http" (or "https" once TLS lands).
    pub scheme: &'static str,
    /// Bound host as it appears in SERVER_NAME (IPv6 in brackets).
    pub host: String,
    pub port: u16,
}

impl ServerInfo {
    pub fn default_port(&self) -> u16 {
        if self.scheme == "https" {
            443
        } else {
            80
        }
    }
}

/// A fully read request, ready for the Rack env.
#[derive(Debug)]
pub struct RequestData {
    pub head: http::request::Parts,
    pub body: RequestBody,
    /// The peer's IP address; "127.0.0.1" for unix-socket peers, as Puma does.
    pub remote_addr: Arc<str>,
    /// PEM of the client's verified TLS certificate, when it sent one.
    pub client_cert: Option<Arc<str>>,
    pub server: Arc<ServerInfo>,
    /// `rack.early_hints`, when enabled (inert for an HTTP/1.0 client).
    pub early_hints: Option<EarlyHints>,
    /// HTTP/1.x: the request may take its connection over (`rack.hijack`).
    pub takeover: Option<TakeoverHandle>,
}

impl RequestData {
    pub fn is_head(&self) -> bool {
        self.head.method == http::Method::HEAD
    }
}

/// A request waiting for a Ruby thread, and where to send the answer.
#[derive(Debug)]
pub struct Job {
    pub request: RequestData,
    pub reply: oneshot::Sender<AppResponse>,
}
