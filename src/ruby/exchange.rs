//! One request on its app thread, around `app.call`: the env keys Hyperion
//! adds for it (`rack.hijack?` and `rack.hijack`, the callback Arrays), the
//! response, and what follows the response.
//!
//! After `app.call`:
//! - the app raised: 500; the callbacks get `nil, nil, exception`;
//! - the app took the connection (`rack.hijack`): nothing is sent, whatever
//!   it returned; its body is closed;
//! - otherwise the response is sent (`super::response::respond`, which also
//!   handles partial hijacks and streaming bodies) and, when callbacks wait
//!   for it, written (`super::callbacks`);
//!
//! then the callbacks run, on every path.

use std::cell::Cell;

use http::StatusCode;
use magnus::prelude::*;
use magnus::typed_data::Obj;
use magnus::{Error, RArray, RHash, Ruby, Value};
use tokio::sync::oneshot;

use super::callbacks::{wait_written, Callbacks};
use super::errors::{is_non_local_exit, log_exception, CLIENT_DISCONNECTED, HYPERION_ERROR};
use super::hijack::Hijack;
use super::keys::{RACK_HIJACK, RACK_HIJACK_P, RACK_INPUT};
use super::response::{close_body, respond, Reply};
use crate::response::AppResponse;
use crate::takeover::TakeoverHandle;
use crate::written::Written;

/// A request's Ruby side beyond its env. Lives on the app thread's stack,
/// where the GC sees the Ruby values it holds.
pub(crate) struct Exchange {
    env: RHash,
    /// `rack.input` as the request came (a streaming body reads it).
    input: Value,
    /// HTTP/1.x: the request may take its connection over.
    takeover: Option<TakeoverHandle>,
    hijack: Option<Obj<Hijack>>,
    callbacks: Callbacks,
    /// The exception that ended the response, for `rack.response_finished`.
    failure: Cell<Option<Value>>,
}

impl Exchange {
    /// Adds the request's hijack and callback keys to its fresh `env`.
    /// `rack.hijack?` is true on HTTP/1.x (`takeover`), false on HTTP/2,
    /// where `rack.hijack` is absent (Rack's Lint requires that).
    pub(crate) fn begin(
        ruby: &Ruby,
        env: RHash,
        takeover: Option<TakeoverHandle>,
        runtime: &tokio::runtime::Handle,
    ) -> Result<Self, Error> {
        let hijack = takeover
            .as_ref()
            .map(|takeover| Hijack::wrap(ruby, env, takeover.clone(), runtime));
        env.aset(ruby.get_inner(&RACK_HIJACK_P), hijack.is_some())?;
        if let Some(hijack) = hijack {
            env.aset(ruby.get_inner(&RACK_HIJACK), hijack)?;
        }
        let callbacks = Callbacks::install(ruby, env)?;
        let input = env.aref(ruby.get_inner(&RACK_INPUT))?;
        Ok(Self {
            env,
            input,
            takeover,
            hijack,
            callbacks,
            failure: Cell::new(None),
        })
    }

    pub(crate) fn env(&self) -> RHash {
        self.env
    }

    fn hijacked(&self) -> bool {
        self.hijack.is_some_and(|hijack| hijack.taken())
    }

    /// Answers the request once `app.call` returned (or raised) `called`,
    /// then runs the callbacks (see the module docs). Returns the non-local
    /// exit to pass on, if any.
    pub(crate) fn finish(
        self,
        ruby: &Ruby,
        called: Result<Value, Error>,
        sender: oneshot::Sender<AppResponse>,
        runtime: &tokio::runtime::Handle,
        head_only: bool,
    ) -> Result<(), Error> {
        let nil = ruby.qnil().as_value();
        let mut exit = None;
        let (status, headers) = match called {
            Err(error) => {
                let _ = sender.send(AppResponse::plain(StatusCode::INTERNAL_SERVER_ERROR, false));
                if is_non_local_exit(&error) {
                    self.failure.set(hyperion_error(
                        ruby,
                        "the request was ended by Thread#kill, exit or throw",
                    ));
                    exit = Some(error);
                } else {
                    log_exception("app raised", &error);
                    self.failure.set(error.value());
                }
                (nil, nil)
            }
            Ok(response) if self.hijacked() => {
                // The connection is the app's: nothing is sent.
                drop(sender);
                let (status, headers, body) = triple(ruby, response);
                exit = close_body(body).err();
                (status, headers)
            }
            Ok(response) => {
                let (status, headers, _) = triple(ruby, response);
                let (written, wait) = self.callbacks.written_notice().unzip();
                let reply = Reply {
                    sender,
                    runtime,
                    head_only,
                    takeover: self.takeover.as_ref(),
                    written,
                    input: self.input,
                    failure: &self.failure,
                };
                exit = respond(ruby, response, reply).err();
                if let Some(wait) = wait {
                    match wait_written(runtime, wait) {
                        Ok(Written::Yes) => {}
                        Ok(Written::No) => {
                            if self.failure.get().is_none() {
                                self.failure.set(client_gone(ruby));
                            }
                        }
                        Err(e) if is_non_local_exit(&e) => {
                            exit.get_or_insert(e);
                        }
                        Err(e) => log_exception(
                            "an exception was raised into an app thread waiting for its response to be written",
                            &e,
                        ),
                    }
                }
                (status, headers)
            }
        };
        let error = self.failure.get().unwrap_or(nil);
        let callbacks = self.callbacks.run(self.env, status, headers, error);
        match exit {
            Some(exit) => Err(exit),
            None => callbacks,
        }
    }
}

/// Status, headers and body of a Rack response, each `nil` when it is not
/// a triple (read without calling into the app).
fn triple(ruby: &Ruby, response: Value) -> (Value, Value, Value) {
    let nil = ruby.qnil().as_value();
    match RArray::from_value(response) {
        Some(triple) if triple.len() == 3 => (
            triple.entry(0).unwrap_or(nil),
            triple.entry(1).unwrap_or(nil),
            triple.entry(2).unwrap_or(nil),
        ),
        _ => (nil, nil, nil),
    }
}

fn hyperion_error(ruby: &Ruby, message: &str) -> Option<Value> {
    ruby.get_inner(&HYPERION_ERROR)
        .new_instance((message,))
        .ok()
        .map(|e| e.as_value())
}

fn client_gone(ruby: &Ruby) -> Option<Value> {
    ruby.get_inner(&CLIENT_DISCONNECTED)
        .new_instance(("the client went away before the response was written",))
        .ok()
        .map(|e| e.as_value())
}
