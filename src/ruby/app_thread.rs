//! The Ruby threads that run the app. Each waits for a job without the GVL,
//! then builds the env, calls the app and hands the response back, all under
//! the GVL. Jobs already queued are taken without releasing the GVL between
//! them.

use std::sync::Arc;

use magnus::prelude::*;
use magnus::value::Opaque;
use magnus::{Error, Ruby, Value};

use super::env::{build_env, EnvFlags};
use super::errors::log_exception;
use super::nogvl::wait_interruptibly;
use super::response::{respond, Reply};
use crate::queue::Pop;
use crate::request::Job;
use crate::response::AppResponse;
use crate::server::Shared;
use http::StatusCode;

pub(crate) struct AppContext {
    pub shared: Arc<Shared>,
    pub runtime: tokio::runtime::Handle,
    /// Marked by the Worker that owns this context, which outlives the threads.
    pub app: Opaque<Value>,
    pub env_flags: EnvFlags,
}

/// Body of each app thread; returns when the queue closes, or with the error
/// of an interrupt that ends the thread (Thread#kill, an exception raised
/// into it).
pub(crate) fn serve(ruby: &Ruby, context: &AppContext) -> Result<(), Error> {
    let app = ruby.get_inner(context.app);
    let queue = &context.shared.queue;
    loop {
        let job = match queue.try_pop() {
            Some(job) => job,
            None => {
                let next = wait_interruptibly(
                    |flag| match queue.pop(flag) {
                        Pop::Job(job) => Some(Some(job)),
                        Pop::Closed => Some(None),
                        Pop::Interrupted => None,
                    },
                    |flag| queue.interrupt(flag),
                )?;
                match next {
                    Some(job) => job,
                    None => return Ok(()),
                }
            }
        };
        run_job(ruby, context, app, job)?;
    }
}

/// Answers one job. An app exception becomes a 500; a non-local exit such as
/// Thread#kill also answers 500 but is then passed on to end the thread.
fn run_job(ruby: &Ruby, context: &AppContext, app: Value, job: Job) -> Result<(), Error> {
    let Job { request, reply } = job;
    let head_only = request.is_head();
    let result = build_env(ruby, request, context.env_flags, &context.runtime)
        .and_then(|env| app.funcall::<_, _, Value>("call", (env,)));
    match result {
        Ok(rack_response) => {
            let reply = Reply {
                sender: reply,
                runtime: &context.runtime,
                head_only,
            };
            respond(ruby, rack_response, reply);
            Ok(())
        }
        Err(error) => {
            let _ = reply.send(AppResponse::plain(StatusCode::INTERNAL_SERVER_ERROR, false));
            if error.value().is_none() {
                return Err(error);
            }
            log_exception("app raised", &error);
            Ok(())
        }
    }
}
