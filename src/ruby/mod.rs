//! Ruby bindings (magnus). One file per concern; no server logic lives here.

mod app_thread;
mod early_hints;
mod env;
mod errors;
mod fiber_loop;
mod keys;
mod nogvl;
mod options;
mod pinned;
mod response;
mod scheduler;
mod stream_input;
mod worker;

use magnus::{Error, Ruby};

#[magnus::init(name = "hyperion_native")]
fn init(ruby: &Ruby) -> Result<(), Error> {
    keys::check_constants(ruby)?;
    let module = ruby.define_module("Hyperion")?;
    stream_input::init(ruby, module)?;
    early_hints::init(ruby, module)?;
    pinned::init(ruby, module)?;
    scheduler::init(ruby, module)?;
    worker::init(ruby, module)
}
