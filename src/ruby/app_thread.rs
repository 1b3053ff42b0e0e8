//! The Ruby threads that run the app. Each waits for a job without the GVL,
//! then builds the env, calls the app and hands the response back, all under
//! the GVL. Jobs already queued are taken without releasing the GVL between
//! them; which thread is woken for a new job is `crate::dispatch`'s policy.
//!
//! An app thread outlives every exception: one raised into it while it idles
//! (`Thread#raise`, a late `Timeout`, rack-timeout) is logged and it goes on
//! waiting; one raised while the app runs becomes a 500. Only a non-local exit
//! (`Thread#kill`, process exit) ends it, after the response's body is
//! closed. A thread that ends while the worker still serves tells the worker
//! (through its event queue), which starts another in its place.
//!
//! With `async_io` the thread runs each job in a fiber of its own instead
//! (`fiber_loop`, `scheduler`); `run_job` is the same in both modes.

use std::sync::Arc;

use magnus::prelude::*;
use magnus::value::Opaque;
use magnus::{Error, Ruby, Value};

use super::env::{build_env, EnvFlags};
use super::errors::{is_non_local_exit, log_exception};
use super::exchange::Exchange;
use super::nogvl::wait_interruptibly;
use crate::dispatch::{Consumer, Pop};
use crate::fiber_reactor::FiberSlots;
use crate::request::Job;
use crate::response::AppResponse;
use crate::server::Shared;
use http::StatusCode;

pub(crate) struct AppContext {
    pub shared: Arc<Shared>,
    pub runtime: tokio::runtime::Handle,
    /// Marked by the Worker that owns this context, which outlives the threads.
    pub app: Opaque<Value>,
    /// The Worker's event queue (a Thread::Queue), also marked by the Worker:
    /// an app thread that ends while the worker serves pushes its index there.
    pub events: Opaque<Value>,
    pub env_flags: EnvFlags,
    /// `async_io`: run each job in a fiber, within the worker's `max_fibers`.
    pub fibers: Option<Arc<FiberSlots>>,
}

/// Body of app thread `index`. Returns when the queue closes, or with the
/// non-local exit that ends the thread.
pub(crate) fn serve(ruby: &Ruby, context: &Arc<AppContext>, index: usize) -> Result<(), Error> {
    let result = {
        let _alive = context.shared.health.app_thread();
        match &context.fibers {
            Some(slots) => super::fiber_loop::serve(ruby, context, slots),
            None => serve_jobs(ruby, context),
        }
    };
    if !context.shared.stop.is_stopped() {
        tracing::warn!(
            "app thread hyperion-app-{index} ended while the worker serves; replacing it"
        );
        let events = ruby.get_inner(context.events);
        if let Err(e) = events.funcall::<_, _, Value>("push", (index,)) {
            log_exception("could not ask for a replacement app thread", &e);
        }
    }
    result
}

fn serve_jobs(ruby: &Ruby, context: &AppContext) -> Result<(), Error> {
    let app = ruby.get_inner(context.app);
    let consumer = context.shared.queue.consumer();
    loop {
        match next_job(context, &consumer) {
            Ok(Some(job)) => run_job(ruby, context, app, job)?,
            Ok(None) => return Ok(()),
            Err(e) if is_non_local_exit(&e) => return Err(e),
            Err(e) => log_exception(
                "an exception was raised into an idle app thread; it keeps serving",
                &e,
            ),
        }
    }
}

/// The next job: one already queued is taken with the GVL still held (this
/// thread stays the hot one, see `crate::dispatch`); otherwise waits for one
/// without the GVL. `None` once the queue is closed. An error is what an
/// interrupt raised during the wait.
fn next_job(context: &AppContext, consumer: &Consumer<'_, Job>) -> Result<Option<Job>, Error> {
    let queue = &context.shared.queue;
    if let Some(job) = queue.try_pop(consumer) {
        return Ok(Some(job));
    }
    let _idle = context.shared.health.idle_thread();
    wait_interruptibly(
        |flag| match queue.pop(consumer, flag) {
            Pop::Job(job) => Some(Some(job)),
            Pop::Closed => Some(None),
            Pop::Interrupted => None,
        },
        |flag| queue.interrupt(consumer, flag),
    )
}

/// Answers one job (`Exchange`: the response, hijack, callbacks). An app
/// exception becomes a 500; a non-local exit also answers 500 (or cuts the
/// response short) and is then passed on to end the thread.
pub(crate) fn run_job(
    ruby: &Ruby,
    context: &AppContext,
    app: Value,
    job: Job,
) -> Result<(), Error> {
    let Job { mut request, reply } = job;
    let head_only = request.is_head();
    let takeover = request.takeover.take();
    let exchange = build_env(ruby, request, context.env_flags, &context.runtime)
        .and_then(|env| Exchange::begin(ruby, env, takeover, &context.runtime));
    let exchange = match exchange {
        Ok(exchange) => exchange,
        Err(error) => {
            let _ = reply.send(AppResponse::plain(StatusCode::INTERNAL_SERVER_ERROR, false));
            if is_non_local_exit(&error) {
                return Err(error);
            }
            log_exception("could not build the env", &error);
            return Ok(());
        }
    };
    let called = app.funcall::<_, _, Value>("call", (exchange.env(),));
    exchange.finish(ruby, called, reply, &context.runtime, head_only)
}
