//! The control listener (Puma's control app): `/stats`, `/metrics`, `/ready`,
//! and the commands `/restart`, `/phased-restart`, `/stop`, `/halt`,
//! `/gc-stats`, `/thread-backtraces`, on a socket of its own.
//!
//! - `route`: the token check and which endpoint a request names; shared by
//!   both servers below;
//! - `server`: a worker's control listener on its own tokio runtime.
//!   `/stats`, `/metrics` and `/ready` are answered there from the worker's
//!   stats page, without an app thread; the commands that need Ruby go
//!   through `commands` to a Ruby thread that is not an app thread;
//! - in a cluster the master serves the control listener instead, with a Ruby
//!   thread of its own (lib/hyperion/control_server.rb): the master runs no
//!   tokio runtime, since it forks. It parses heads with `route::parse_head`
//!   and renders `/metrics` with `crate::metrics`, summing the workers' pages.

pub mod commands;
pub mod route;
pub mod server;
