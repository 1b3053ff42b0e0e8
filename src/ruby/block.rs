//! Calling a Ruby method with a block that runs Rust code, without a Proc.
//!
//! magnus' `proc_from_fn` keeps its closure alive through an instance
//! variable on the Proc. A Proc's instance variables live in Ruby's generic
//! ivar table, and Ruby 3.1 updates that table wrongly during compaction
//! (fixed upstream by ruby/ruby#6494): with `GC.auto_compact` on, a worker
//! crashed in reference updating every few dozen runs of the compaction
//! spec pass. `rb_block_call` needs no Proc: the closure stays on this
//! stack, reached through the call's data pointer, for exactly the call.

use std::os::raw::c_int;
use std::panic::AssertUnwindSafe;

use magnus::rb_sys::{catch_unwind, protect, resume_error, AsRawId, AsRawValue, FromRawValue};
use magnus::{Error, Ruby, Value};
use rb_sys::VALUE;

/// Calls `receiver.method` (no arguments) with a block that runs `yielded`
/// for each `yield`, with the yielded values. An error `yielded` returns is
/// raised in the method, as a block's exception would be; whatever ends the
/// call early (an exception, `throw`, `break`) comes back as the `Err`.
pub fn call_with_block<F>(
    ruby: &Ruby,
    receiver: Value,
    method: &str,
    mut yielded: F,
) -> Result<Value, Error>
where
    F: FnMut(&Ruby, &[Value]) -> Result<(), Error>,
{
    let method = ruby.intern(method).as_raw();
    let data = &mut yielded as *mut F as VALUE;
    let returned = protect(|| {
        // SAFETY: `receiver` is a live Value on this stack; the block
        // function matches `rb_block_call_func`, and `data` points to
        // `yielded`, which outlives the call (Ruby passes `data` only to
        // blocks run during it; a Proc made from this block with `&block`
        // and kept would outlive it, which the callers' methods (`each`) do
        // not do).
        unsafe {
            rb_sys::rb_block_call(
                receiver.as_raw(),
                method,
                0,
                std::ptr::null(),
                Some(trampoline::<F>),
                data,
            )
        }
    })?;
    // SAFETY: the method's return value, live on Ruby's stack as we return it.
    Ok(unsafe { Value::from_raw(returned) })
}

/// The C block: runs the closure behind `data`, raising its error.
unsafe extern "C" fn trampoline<F>(
    _first: VALUE,
    data: VALUE,
    argc: c_int,
    argv: *const VALUE,
    _block: VALUE,
) -> VALUE
where
    F: FnMut(&Ruby, &[Value]) -> Result<(), Error>,
{
    let result = {
        // SAFETY: `data` is the `&mut F` `call_with_block` passed, alive
        // and not otherwise borrowed for the call's duration; Ruby calls
        // blocks one at a time on this thread.
        let yielded = &mut *(data as *mut F);
        let args: &[Value] = match usize::try_from(argc) {
            // SAFETY: Ruby passes `argc` live VALUEs at `argv`; `Value` is a
            // transparent wrapper around VALUE.
            Ok(count) if count > 0 && !argv.is_null() => {
                std::slice::from_raw_parts(argv.cast::<Value>(), count)
            }
            _ => &[],
        };
        // SAFETY: Ruby called this block, so this is a Ruby thread holding
        // the GVL.
        let ruby = Ruby::get_unchecked();
        catch_unwind(AssertUnwindSafe(|| yielded(&ruby, args))).and_then(|r| r)
    };
    match result {
        Ok(()) => rb_sys::Qnil as VALUE,
        // SAFETY: nothing in this frame needs dropping (the error is moved
        // into the raise), so unwinding past it through Ruby is sound.
        Err(e) => resume_error(e),
    }
}
