//! `Hyperion::EarlyHints`: the callable in `env["rack.early_hints"]`.
//! `call(headers)` sends `103 Early Hints` with those fields, converted and
//! checked as response headers are (a String value with "\n" becomes several
//! fields; CR, NUL or a bad name raises ArgumentError). Once the final
//! response is on its way, or the client is gone, calls do nothing. It holds
//! only Rust data: the tokio side is reached through `interim::EarlyHints`,
//! kept in a `ForkSafe` like every Rust value a Ruby object owns.

use magnus::prelude::*;
use magnus::{method, Error, RModule, Ruby, Value};

use super::response::header_fields;
use crate::fork_safe::ForkSafe;
use crate::interim;

#[magnus::wrap(class = "Hyperion::EarlyHints", free_immediately, size)]
pub(crate) struct EarlyHints(ForkSafe<interim::EarlyHints>);

impl EarlyHints {
    pub(crate) fn new(hints: interim::EarlyHints) -> Self {
        Self(ForkSafe::new(hints))
    }

    fn call(ruby: &Ruby, rb_self: &Self, headers: Value) -> Result<(), Error> {
        rb_self.0.send(header_fields(ruby, headers)?);
        Ok(())
    }
}

pub(crate) fn init(ruby: &Ruby, module: RModule) -> Result<(), Error> {
    let class = module.define_class("EarlyHints", ruby.class_object())?;
    class.undef_default_alloc_func();
    class.define_method("call", method!(EarlyHints::call, 1))?;
    Ok(())
}
