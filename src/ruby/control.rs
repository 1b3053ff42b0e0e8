//! The Ruby half of the control listener (`crate::control`).
//!
//! - The worker's control thread (`hyperion-control`, not an app thread)
//!   answers the endpoints that need Ruby: it waits for a command without
//!   the GVL, calls the handler Ruby gave `Worker.new(control:)` with the
//!   endpoint's name, and sends back what it returns (a JSON body, as
//!   Puma's control app answers): `[status, body]`, or
//!   `[status, body, after]`, where `after` is called once the response has
//!   been written (so `/halt` answers before the process ends).
//! - `Hyperion::Control.parse_head(head, token)` decides a request head for
//!   the cluster master's Ruby control server: the endpoint's name, `nil`
//!   while the head is incomplete, or `[status, body]` to refuse it.

use std::sync::Arc;
use std::time::Duration;

use magnus::prelude::*;
use magnus::value::Opaque;
use magnus::{function, Error, IntoValue, RArray, RModule, RString, Ruby, Value};

use super::errors::{is_non_local_exit, log_exception};
use super::nogvl::{run_bounded_without_gvl, wait_interruptibly};
use crate::control::commands::{Command, CommandQueue, Reply};
use crate::control::route::{parse_head, Auth};
use crate::wait::Waited;

/// How long the control thread waits for a response to be written before
/// it runs the command's `after` anyway.
const WRITTEN_TIMEOUT: Duration = Duration::from_secs(2);

/// The control thread's loop; returns when the queue closes, or with the
/// non-local exit that ends the thread.
pub(crate) fn serve_commands(
    ruby: &Ruby,
    queue: &Arc<CommandQueue>,
    handler: Opaque<Value>,
) -> Result<(), Error> {
    loop {
        let next = wait_interruptibly(
            |flag| match queue.next(flag) {
                Waited::Ready(command) => Some(command),
                Waited::Interrupted => None,
            },
            |flag| queue.interrupt(flag),
        );
        match next {
            Ok(Some(command)) => answer(ruby.get_inner(handler), command)?,
            Ok(None) => return Ok(()),
            Err(e) if is_non_local_exit(&e) => return Err(e),
            Err(e) => log_exception("an exception was raised into the control thread", &e),
        }
    }
}

fn answer(handler: Value, command: Command) -> Result<(), Error> {
    let answered = handler
        .funcall::<_, _, RArray>("call", (command.endpoint.name(),))
        .and_then(|answer| {
            let status: u16 = answer.entry(0)?;
            let body: RString = answer.entry(1)?;
            let after: Value = answer.entry(2)?;
            // SAFETY: the bytes are copied before any other Ruby call.
            let body = unsafe { body.as_slice() }.to_vec();
            Ok((status, body, (!after.is_nil()).then_some(after)))
        });
    let (status, body, after) = match answered {
        Ok(answer) => answer,
        Err(e) => {
            let _ = command
                .reply
                .send(text_reply(500, "The control handler raised"));
            if is_non_local_exit(&e) {
                return Err(e);
            }
            log_exception("the control handler raised", &e);
            return Ok(());
        }
    };
    let (written, was_written) = match after {
        Some(_) => {
            let (sender, receiver) = std::sync::mpsc::sync_channel(1);
            (Some(sender), Some(receiver))
        }
        None => (None, None),
    };
    let sent = command.reply.send(Reply {
        status,
        content_type: "application/json".into(),
        body,
        written,
    });
    if let (Some(after), Some(was_written), Ok(())) = (after, was_written, sent) {
        run_bounded_without_gvl(|| {
            let _ = was_written.recv_timeout(WRITTEN_TIMEOUT);
        })?;
        if let Err(e) = after.funcall::<_, _, Value>("call", ()) {
            if is_non_local_exit(&e) {
                return Err(e);
            }
            log_exception("a control command raised", &e);
        }
    }
    Ok(())
}

fn text_reply(status: u16, body: &str) -> Reply {
    Reply {
        status,
        content_type: "text/plain".into(),
        body: body.as_bytes().to_vec(),
        written: None,
    }
}

/// `Hyperion::Control.parse_head(head, token)`.
fn parse_head_for_ruby(ruby: &Ruby, head: RString, token: Option<String>) -> Result<Value, Error> {
    // SAFETY: the bytes are read before any Ruby call that could move or
    // change the String.
    let decided = parse_head(unsafe { head.as_slice() }, &Auth::new(token.as_deref()));
    Ok(match decided {
        Ok(Some(endpoint)) => ruby.str_new(endpoint.name()).as_value(),
        Ok(None) => ruby.qnil().as_value(),
        Err(refusal) => ruby
            .ary_new_from_values(&[
                refusal.status().into_value_with(ruby),
                ruby.str_new(refusal.body()).as_value(),
            ])
            .as_value(),
    })
}

pub(crate) fn init(module: RModule) -> Result<(), Error> {
    let control = module.define_module("Control")?;
    control.define_singleton_method("parse_head", function!(parse_head_for_ruby, 2))?;
    Ok(())
}
