//! The one place that releases and re-acquires the GVL.
//!
//! Every wait without the GVL goes through [`wait_interruptibly`]: it passes
//! Ruby an unblock function, so signal traps, `Thread#kill`, `Thread#raise`
//! and process exit reach a waiting thread at once; it then runs those
//! interrupts under `rb_protect`, so an exception they raise comes back as a
//! `magnus::Error` instead of a longjmp through Rust frames.

use std::ffi::c_void;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::AtomicBool;

use magnus::{Error, Ruby};
use rb_sys::{rb_nogvl, rb_thread_check_ints, RB_NOGVL_INTR_FAIL};

struct Call<F, R> {
    func: Option<F>,
    result: Option<std::thread::Result<R>>,
}

unsafe extern "C" fn call_without_gvl<F, R>(data: *mut c_void) -> *mut c_void
where
    F: FnOnce() -> R,
{
    // SAFETY: `data` is the `&mut Call<F, R>` that `without_gvl` passed to
    // rb_nogvl; it lives on that caller's stack until rb_nogvl returns.
    let call = unsafe { &mut *(data as *mut Call<F, R>) };
    if let Some(func) = call.func.take() {
        // A panic must not unwind into Ruby's C frames; it is reported after
        // the GVL is back.
        call.result = Some(catch_unwind(AssertUnwindSafe(func)));
    }
    std::ptr::null_mut()
}

unsafe extern "C" fn call_unblock<U>(data: *mut c_void)
where
    U: Fn() + Sync,
{
    // SAFETY: `data` is the `&U` passed to rb_nogvl. Ruby only calls the
    // unblock function while the blocking region is active, i.e. before
    // rb_nogvl returns, so the borrow is still live.
    let unblock = unsafe { &*(data as *const U) };
    let _ = catch_unwind(AssertUnwindSafe(unblock));
}

/// Runs `func` with the GVL released; `unblock` is called (from another
/// thread) when Ruby wants this thread back. Returns `Ok(None)` when Ruby had
/// interrupts pending and did not run `func` at all.
///
/// `func` and `unblock` must not touch Ruby objects.
fn without_gvl<F, R, U>(func: F, unblock: &U) -> Result<Option<R>, Error>
where
    F: FnOnce() -> R,
    U: Fn() + Sync,
{
    let mut call = Call {
        func: Some(func),
        result: None,
    };
    // SAFETY: both trampolines match the signatures rb_nogvl expects and cast
    // their data pointers back to the types passed here, which outlive the
    // call. RB_NOGVL_INTR_FAIL makes rb_nogvl return instead of raising when
    // interrupts are pending, so no longjmp crosses this frame.
    unsafe {
        rb_nogvl(
            Some(call_without_gvl::<F, R>),
            &mut call as *mut Call<F, R> as *mut c_void,
            Some(call_unblock::<U>),
            unblock as *const U as *mut c_void,
            RB_NOGVL_INTR_FAIL as i32,
        );
    }
    match call.result {
        None => Ok(None),
        Some(Ok(value)) => Ok(Some(value)),
        Some(Err(panic)) => Err(panic_error(panic)),
    }
}

/// Runs pending interrupts (trap handlers, Thread#kill/raise) of the current
/// thread; an exception they raise is returned.
pub(crate) fn check_interrupts() -> Result<(), Error> {
    magnus::rb_sys::protect(|| {
        // SAFETY: called with the GVL held, from a Ruby thread; a raise inside
        // is caught by the surrounding rb_protect.
        unsafe { rb_thread_check_ints() };
        rb_sys::Qnil as rb_sys::VALUE
    })
    .map(|_| ())
}

/// Blocks without the GVL until `wait` yields a value. `wait` receives a flag;
/// `wake` must raise that flag and wake the waiter. Between waits, Ruby's
/// pending interrupts run with the GVL held; one that raises ends the wait.
pub(crate) fn wait_interruptibly<R>(
    mut wait: impl FnMut(&AtomicBool) -> Option<R>,
    wake: impl Fn(&AtomicBool) + Sync,
) -> Result<R, Error> {
    let flag = AtomicBool::new(false);
    loop {
        if let Some(Some(value)) = without_gvl(|| wait(&flag), &|| wake(&flag))? {
            return Ok(value);
        }
        check_interrupts()?;
    }
}

/// Runs `func` without the GVL even when interrupts are pending, for short
/// work that ends on its own (shutting the I/O runtime down, which waits at
/// most its own timeout) and must not hold the GVL while it blocks. Pending
/// interrupts are run first; an exception one of them raises is returned
/// after `func` has run, so it is neither lost nor a reason to skip `func`.
/// Ruby's unblock calls during `func` are ignored: it is bounded.
pub(crate) fn run_bounded_without_gvl(func: impl FnOnce()) -> Result<(), Error> {
    let mut func = Some(func);
    let mut raised = None;
    loop {
        let ran = without_gvl(
            || {
                if let Some(func) = func.take() {
                    func()
                }
            },
            &|| {},
        )?;
        if ran.is_some() {
            return raised.map_or(Ok(()), Err);
        }
        if let Err(e) = check_interrupts() {
            raised.get_or_insert(e);
        }
    }
}

fn panic_error(panic: Box<dyn std::any::Any + Send>) -> Error {
    let detail = panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".to_owned());
    let ruby = Ruby::get().expect("the GVL is held again here");
    Error::new(
        ruby.exception_runtime_error(),
        format!("hyperion internal error (a bug, please report): {detail}"),
    )
}
