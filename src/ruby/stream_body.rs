//! Rack 3 streaming bodies: a body that responds to `call` and not `each`
//! is called with a stream.
//!
//! - Usually the head goes out at once and the stream is a
//!   `Hyperion::Stream`: `write`/`<<` queue each chunk for the socket as it
//!   comes (HTTP/1.1 chunked unless the app set Content-Length; HTTP/2 DATA
//!   frames), through the same bounded channel as an `each` body, so bytes
//!   reach the client as soon as the I/O side can write them (`flush` has
//!   nothing left to push); a slow client makes `write` wait without the
//!   GVL; a gone client makes it raise `Hyperion::ClientDisconnected` (an
//!   IOError). `read` reads the request body (`rack.input`).
//! - A `101 Switching Protocols` over HTTP/1.1 takes the connection over, as
//!   a partial hijack does: the head is written outside hyper and the body is
//!   called with the connection's own IO (raw bytes both ways).
//!
//! The stream lasts as long as `call`: when it returns (or raises) the
//! response ends and the stream is closed, so a later `write` raises
//! IOError. An app that wants the connection beyond `call` hijacks it.

use std::sync::{Arc, Mutex};

use http::{HeaderMap, StatusCode};
use magnus::prelude::*;
use magnus::typed_data::Obj;
use magnus::value::Opaque;
use magnus::{gc, method, DataTypeFunctions, Error, RModule, RString, Ruby, TypedData, Value};

use super::errors::{is_non_local_exit, log_exception, CLIENT_DISCONNECTED};
use super::response::{send_chunk, send_error, Reply};
use crate::fork_safe::ForkSafe;
use crate::response::{AppResponse, BodySender, ResponseBody};
use crate::takeover::http1_head;

struct State {
    /// `None` once closed for writing (the body has ended).
    sender: Option<Arc<BodySender>>,
    read_closed: bool,
}

/// The stream a Rack 3 streaming body is called with (see the module docs).
#[derive(TypedData)]
#[magnus(class = "Hyperion::Stream", free_immediately, mark, size)]
pub(crate) struct Stream {
    /// Not dropped in a forked child (see `fork_safe`).
    state: ForkSafe<Mutex<State>>,
    runtime: ForkSafe<tokio::runtime::Handle>,
    /// rack.input, which `read` reads.
    input: Opaque<Value>,
}

impl DataTypeFunctions for Stream {
    fn mark(&self, marker: &gc::Marker) {
        marker.mark(self.input);
    }
}

fn io_error(ruby: &Ruby, message: &'static str) -> Error {
    Error::new(ruby.exception_io_error(), message)
}

impl Stream {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// `write(data)`: queues `data.to_s` for the client; returns its byte
    /// size. Waits without the GVL while the client is slow.
    fn write(ruby: &Ruby, rb_self: &Self, data: Value) -> Result<usize, Error> {
        let text = match RString::from_value(data) {
            Some(text) => text,
            None => data.funcall::<_, _, RString>("to_s", ())?,
        };
        // Cloned out of the lock before waiting: other threads may write or
        // close meanwhile.
        let sender = rb_self
            .lock()
            .sender
            .clone()
            .ok_or_else(|| io_error(ruby, "not opened for writing"))?;
        let length = text.len();
        if length > 0 {
            let chunk = super::pinned::body_chunk(text)?;
            send_chunk(ruby, &sender, &rb_self.runtime, chunk)?;
        }
        Ok(length)
    }

    /// `<<(data)`: `write`, returning the stream.
    fn append(ruby: &Ruby, rb_self: Obj<Self>, data: Value) -> Result<Obj<Self>, Error> {
        Stream::write(ruby, &rb_self, data)?;
        Ok(rb_self)
    }

    /// `flush`: nothing is buffered on this side; every write is already
    /// queued for the socket.
    fn flush(ruby: &Ruby, rb_self: Obj<Self>) -> Result<Obj<Self>, Error> {
        if rb_self.lock().sender.is_none() {
            return Err(io_error(ruby, "not opened for writing"));
        }
        Ok(rb_self)
    }

    /// `read(length = nil, buffer = nil)`: reads the request body.
    fn read(ruby: &Ruby, rb_self: &Self, args: &[Value]) -> Result<Value, Error> {
        if rb_self.lock().read_closed {
            return Err(io_error(ruby, "not opened for reading"));
        }
        ruby.get_inner(rb_self.input).funcall("read", args)
    }

    fn close_read(&self) {
        self.lock().read_closed = true;
    }

    /// Ends the response body (the client sees its end once every write in
    /// progress is done).
    fn close_write(&self) {
        let sender = self.lock().sender.take();
        drop(sender);
    }

    fn close(&self) {
        let sender = {
            let mut state = self.lock();
            state.read_closed = true;
            state.sender.take()
        };
        drop(sender);
    }

    fn is_closed(&self) -> bool {
        let state = self.lock();
        state.read_closed && state.sender.is_none()
    }

    /// Closes the stream once `call` is over; returns its sender if the app
    /// had not closed it, to end the body as failed when `call` raised.
    fn end(&self) -> Option<Arc<BodySender>> {
        let mut state = self.lock();
        state.read_closed = true;
        state.sender.take()
    }
}

/// Sends a response whose body is a Rack 3 streaming body (see the module
/// docs). Returns a non-local exit to pass on; an exception that cut the
/// response short is logged and reported through `reply.failure`.
pub(crate) fn respond(
    ruby: &Ruby,
    status: StatusCode,
    headers: HeaderMap,
    body: Value,
    reply: Reply<'_>,
) -> Result<(), Error> {
    if status == StatusCode::SWITCHING_PROTOCOLS {
        return switch_protocols(ruby, headers, body, reply);
    }
    let (sender, response_body) = ResponseBody::channel();
    let mut response = AppResponse::new(status, headers, response_body);
    response.written = reply.written;
    let _ = reply.sender.send(response);
    let stream = ruby.obj_wrap(Stream {
        state: ForkSafe::new(Mutex::new(State {
            sender: Some(Arc::new(sender)),
            read_closed: false,
        })),
        runtime: ForkSafe::new(reply.runtime.clone()),
        input: reply.input.into(),
    });
    let called = body.funcall::<_, _, Value>("call", (stream,));
    let sender = stream.end();
    let abort = || {
        if let Some(sender) = &sender {
            sender.abort();
        }
    };
    match called {
        Ok(_) => Ok(()),
        Err(e) if is_non_local_exit(&e) => {
            abort();
            Err(e)
        }
        Err(e) if e.is_kind_of(ruby.get_inner(&CLIENT_DISCONNECTED)) => {
            tracing::debug!("client went away while the body was streaming");
            reply.failure.set(e.value());
            Ok(())
        }
        Err(e) => {
            log_exception("streaming body raised; connection aborted", &e);
            abort();
            reply.failure.set(e.value());
            Ok(())
        }
    }
}

/// A 101 with a streaming body: the connection is taken over and the body
/// gets its IO (HTTP/1.1 only: HTTP/2 has no 101).
fn switch_protocols(
    ruby: &Ruby,
    headers: HeaderMap,
    body: Value,
    reply: Reply<'_>,
) -> Result<(), Error> {
    let Some(takeover) = reply.takeover else {
        send_error(
            reply.sender,
            "a 101 Switching Protocols response cannot be sent over HTTP/2",
        );
        return Ok(());
    };
    let head = http1_head(
        takeover.version(),
        StatusCode::SWITCHING_PROTOCOLS,
        &headers,
    );
    // Kept until the connection is taken: dropping it would answer 503.
    let _held = reply.sender;
    let io = match super::hijack::take_socket(ruby, takeover, head, reply.runtime) {
        Ok(io) => io,
        Err(e) if is_non_local_exit(&e) => return Err(e),
        Err(e) => {
            tracing::debug!("101 streaming body: {e}");
            reply.failure.set(e.value());
            return Ok(());
        }
    };
    // The head is written; what follows is the body's.
    if let Some(written) = reply.written {
        written.fire();
    }
    let called = body.funcall::<_, _, Value>("call", (io,));
    // The stream lasts as long as `call` (see the module docs).
    let _ = io.funcall::<_, _, Value>("close", ());
    match called {
        Ok(_) => Ok(()),
        Err(e) if is_non_local_exit(&e) => Err(e),
        Err(e) => {
            log_exception("streaming body raised after 101", &e);
            reply.failure.set(e.value());
            Ok(())
        }
    }
}

pub(crate) fn init(ruby: &Ruby, module: RModule) -> Result<(), Error> {
    let class = module.define_class("Stream", ruby.class_object())?;
    class.undef_default_alloc_func();
    class.define_method("write", method!(Stream::write, 1))?;
    class.define_method("<<", method!(Stream::append, 1))?;
    class.define_method("flush", method!(Stream::flush, 0))?;
    class.define_method("read", method!(Stream::read, -1))?;
    class.define_method("close_read", method!(Stream::close_read, 0))?;
    class.define_method("close_write", method!(Stream::close_write, 0))?;
    class.define_method("close", method!(Stream::close, 0))?;
    class.define_method("closed?", method!(Stream::is_closed, 0))?;
    Ok(())
}
