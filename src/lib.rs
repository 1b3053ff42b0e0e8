//! Hyperion's Rust core: sockets, HTTP/1.1 (hyper), request bodies and the
//! queue that feeds Ruby threads. Everything outside `ruby/` is plain Rust that
//! `cargo test` exercises without a Ruby VM; `ruby/` is the thin magnus layer
//! that exposes `Hyperion::Worker` (built with `--features ruby`).

pub mod access_log;
pub mod body;
pub mod connection;
pub mod control;
pub mod dispatch;
pub mod error;
pub mod exchange;
pub mod fiber_reactor;
pub mod file_body;
pub mod fork_safe;
pub mod h2_settings;
pub mod health;
pub mod hijack;
pub mod hijack_bridge;
pub mod host;
pub mod http2;
pub mod interim;
pub mod limits;
pub mod listener;
pub mod logging;
pub mod malloc_arenas;
pub mod metrics;
pub mod proxy_protocol;
pub mod remote_address;
pub mod request;
pub mod request_service;
pub mod response;
pub mod sendfile;
pub mod server;
pub mod session;
pub mod stats;
pub mod stop;
pub mod takeover;
pub mod tls;
pub mod utc_time;
pub mod wait;
pub mod written;

#[cfg(feature = "ruby")]
mod ruby;
