//! HTTP/2, driven with the `h2` crate rather than through hyper, for what
//! hyper's server does not expose: informational responses (103 Early
//! Hints), per-stream flow-control stalls and the GOAWAY error code.
//!
//! - `session`: the connection as a `connection::Session` (timeouts and drain
//!   as for HTTP/1.1), polling its streams from its own task;
//! - `stream`: one exchange: the app's response, its head, its body within
//!   the client's flow-control windows;
//! - `recv_body`: a request body as an `http_body::Body`, so request handling
//!   (request_service.rs) is shared with HTTP/1.1;
//! - `control_budget`: GOAWAY for a client that floods PING, SETTINGS and
//!   other frames without request work, counted by `frame_scanner` as h2
//!   reads them;
//! - `date`: the `date` header, formatted once per second.

mod control_budget;
mod date;
pub(crate) use date::now as http_date;
mod frame_scanner;
mod recv_body;
mod session;
mod stream;

pub use recv_body::RecvBody;
pub use session::H2Session;
pub(crate) use stream::strip_connection_fields;
