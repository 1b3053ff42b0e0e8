//! Ruby bindings (magnus). One file per concern; no server logic lives here.

mod app_thread;
mod block;
mod callbacks;
mod control;
mod early_hints;
mod env;
mod errors;
mod exchange;
mod fiber_loop;
mod hijack;
mod keys;
mod nogvl;
mod options;
mod pinned;
mod remote_address;
mod response;
mod rust_thread;
mod scheduler;
mod stats;
mod stream_body;
mod stream_input;
mod worker;

use magnus::{Error, Ruby};

#[magnus::init(name = "hyperion_native")]
fn init(ruby: &Ruby) -> Result<(), Error> {
    keys::check_constants(ruby)?;
    let module = ruby.define_module("Hyperion")?;
    stream_input::init(ruby, module)?;
    early_hints::init(ruby, module)?;
    hijack::init(ruby, module)?;
    stream_body::init(ruby, module)?;
    pinned::init(ruby, module)?;
    stats::init(ruby, module)?;
    control::init(module)?;
    scheduler::init(ruby, module)?;
    worker::init(ruby, module)
}
