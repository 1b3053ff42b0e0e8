//! `rack.after_reply` and `rack.response_finished`: callables the app
//! registers in env Arrays, run by the app thread once the response is
//! over.
//!
//! - `rack.after_reply`: in order, with no arguments;
//! - `rack.response_finished`: in reverse order, with `env, status, headers,
//!   error` (status and headers `nil` when the app raised; `error` the
//!   exception, or a `Hyperion::ClientDisconnected` when the client went
//!   away before the response was written).
//!
//! They run after the response's last byte is written: when either Array
//! has entries once the app returns, the response carries a
//! `crate::written` notice and the thread waits for it, without the GVL,
//! before running them (a client that stops reading is dropped after
//! `write_timeout`, which ends the wait). With no entries (most requests)
//! nothing waits: the thread takes its next job at once. Callables added
//! later (by a body's `each` or `close`) run once the body has been handed
//! over, without waiting for the write.
//!
//! Each callable is rescued and logged on its own; the next still runs, and
//! nothing of it reaches the connection, whose next request hyper already
//! serves. A non-local exit (`Thread#kill`) inside one stops the rest and is
//! passed on.

use magnus::prelude::*;
use magnus::{Error, RArray, RHash, Ruby, Value};
use tokio::sync::Notify;

use super::errors::{is_non_local_exit, log_exception};
use super::keys::{RACK_AFTER_REPLY, RACK_RESPONSE_FINISHED};
use super::nogvl::wait_interruptibly;
use crate::written::{self, Written, WrittenNotice, WrittenWait};

/// One request's callback Arrays (on the app thread's stack, where the GC
/// sees them; the env holds them too).
pub(crate) struct Callbacks {
    after_reply: RArray,
    response_finished: RArray,
}

impl Callbacks {
    /// Puts fresh, empty Arrays into `env`.
    pub(crate) fn install(ruby: &Ruby, env: RHash) -> Result<Self, Error> {
        let callbacks = Self {
            after_reply: ruby.ary_new(),
            response_finished: ruby.ary_new(),
        };
        env.aset(ruby.get_inner(&RACK_AFTER_REPLY), callbacks.after_reply)?;
        env.aset(
            ruby.get_inner(&RACK_RESPONSE_FINISHED),
            callbacks.response_finished,
        )?;
        Ok(callbacks)
    }

    /// A notice for the response when callbacks wait for it to be written,
    /// and the wait.
    pub(crate) fn written_notice(&self) -> Option<(WrittenNotice, WrittenWait)> {
        (!self.after_reply.is_empty() || !self.response_finished.is_empty()).then(written::channel)
    }

    /// Runs every callable (see the module docs). Returns a non-local exit
    /// that happened inside one.
    pub(crate) fn run(
        &self,
        env: RHash,
        status: Value,
        headers: Value,
        error: Value,
    ) -> Result<(), Error> {
        let mut index = 0;
        while let Some(callable) = entry(self.after_reply, index) {
            call(callable, "rack.after_reply", ())?;
            index += 1;
        }
        let mut index = self.response_finished.len();
        while index > 0 {
            index -= 1;
            let Some(callable) = entry(self.response_finished, index) else {
                // The Array shrank under us; go on from its new end.
                index = index.min(self.response_finished.len());
                continue;
            };
            let args = (env, status, headers, error);
            call(callable, "rack.response_finished", args)?;
        }
        Ok(())
    }
}

/// Element `index` of `array` while it has one.
fn entry(array: RArray, index: usize) -> Option<Value> {
    (index < array.len())
        .then(|| array.entry::<Value>(index as isize).ok())
        .flatten()
}

fn call<A: magnus::ArgList>(callable: Value, list: &str, args: A) -> Result<(), Error> {
    match callable.funcall::<_, _, Value>("call", args) {
        Ok(_) => Ok(()),
        Err(e) if is_non_local_exit(&e) => Err(e),
        Err(e) => {
            log_exception(&format!("a {list} callable raised"), &e);
            Ok(())
        }
    }
}

/// Waits (without the GVL) until the response was written or never will
/// be. An exception raised into the thread meanwhile ends the wait and is
/// returned.
pub(crate) fn wait_written(
    runtime: &tokio::runtime::Handle,
    wait: WrittenWait,
) -> Result<Written, Error> {
    let mut waiting = std::pin::pin!(wait.wait());
    let cancel = Notify::new();
    wait_interruptibly(
        |_| {
            runtime.block_on(async {
                tokio::select! {
                    written = &mut waiting => Some(written),
                    _ = cancel.notified() => None,
                }
            })
        },
        |_| cancel.notify_one(),
    )
}
