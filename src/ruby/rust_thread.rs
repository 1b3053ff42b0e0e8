//! Ruby threads that run a Rust closure, without instance variables.
//!
//! magnus' `thread_create_from_fn` keeps its closure alive through an
//! instance variable on the Thread, a generic ivar, which Ruby 3.1's
//! compaction mishandles (see `block`). Here the closure is boxed, and the
//! thread takes it out of the box as it starts: from then on it lives on the
//! thread's stack, where Ruby's conservative stack scan marks (and pins) any
//! Ruby value it holds. Until then, Ruby values it captures must be kept
//! alive by their owner (the Worker marks everything its threads use).

use std::ffi::c_void;
use std::panic::AssertUnwindSafe;

use magnus::prelude::*;
use magnus::rb_sys::{catch_unwind, protect, resume_error, FromRawValue};
use magnus::{Error, Ruby, Value};
use rb_sys::VALUE;

/// Starts a Ruby thread named `name` running `body`. An `Err` that `body`
/// returns ends the thread as that exception (or `throw`, or kill) would.
pub fn spawn<F>(ruby: &Ruby, name: &str, body: F) -> Result<Value, Error>
where
    F: FnOnce(&Ruby) -> Result<(), Error> + Send + 'static,
{
    let boxed = Box::into_raw(Box::new(body));
    // SAFETY: `start::<F>` matches rb_thread_create's function type and
    // takes ownership of `boxed` (exactly once: Ruby calls it once).
    let created = protect(|| unsafe { rb_sys::rb_thread_create(Some(start::<F>), boxed.cast()) });
    let thread = match created {
        // SAFETY: a Thread just returned by Ruby, on this stack.
        Ok(thread) => unsafe { Value::from_raw(thread) },
        Err(e) => {
            // SAFETY: the thread was not created, so nothing else owns it.
            drop(unsafe { Box::from_raw(boxed) });
            return Err(e);
        }
    };
    thread.funcall::<_, _, Value>("name=", (ruby.str_new(name),))?;
    Ok(thread)
}

/// The thread's function: runs the closure, re-raising its error.
unsafe extern "C" fn start<F>(arg: *mut c_void) -> VALUE
where
    F: FnOnce(&Ruby) -> Result<(), Error>,
{
    let result = {
        // SAFETY: `arg` is the box `spawn` leaked for this thread alone.
        let body = *Box::from_raw(arg.cast::<F>());
        // SAFETY: Ruby runs this on the new Ruby thread, holding the GVL.
        let ruby = Ruby::get_unchecked();
        catch_unwind(AssertUnwindSafe(|| body(&ruby))).and_then(|r| r)
    };
    match result {
        Ok(()) => rb_sys::Qnil as VALUE,
        // SAFETY: everything in this frame was dropped or moved into the
        // error, so unwinding past it through Ruby is sound.
        Err(e) => resume_error(e),
    }
}
