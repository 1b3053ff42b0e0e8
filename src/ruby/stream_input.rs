//! `Hyperion::StreamInput`: rack.input for a request body that is still
//! arriving (gRPC-style streaming). Reads wait for the next chunk without the
//! GVL; everything read is kept, so `rewind` works as Rack 2 asks.

use std::sync::Mutex;

use bytes::Bytes;
use magnus::prelude::*;
use magnus::{method, Error, RModule, RString, Ruby, TryConvert, Value};
use tokio::sync::{mpsc, Notify};

use super::errors::hyperion_error;
use super::nogvl::wait_interruptibly;
use super::scheduler::FiberWait;
use crate::body::{BodyError, BodyStream};
use crate::fork_safe::ForkSafe;

struct State {
    /// `None` once the body has ended (or while a read waits for a chunk).
    chunks: Option<mpsc::Receiver<Result<Bytes, BodyError>>>,
    received: Vec<u8>,
    position: usize,
    ended: bool,
}

#[magnus::wrap(class = "Hyperion::StreamInput", free_immediately, size)]
pub(crate) struct StreamInput {
    /// Not dropped in a forked child (see `fork_safe`): the receiver would
    /// wake a task of a runtime that has no threads there.
    state: ForkSafe<Mutex<State>>,
    runtime: ForkSafe<tokio::runtime::Handle>,
}

enum Next {
    Chunk(Bytes),
    End,
    Failed(String),
}

impl From<Option<Result<Bytes, BodyError>>> for Next {
    fn from(chunk: Option<Result<Bytes, BodyError>>) -> Self {
        match chunk {
            Some(Ok(bytes)) => Next::Chunk(bytes),
            None => Next::End,
            Some(Err(BodyError::TooLarge)) => {
                Next::Failed("request body larger than max_body_bytes".into())
            }
            Some(Err(BodyError::Client(e))) => Next::Failed(format!("request body: {e}")),
            Some(Err(BodyError::Spill(e))) => Next::Failed(format!("request body: {e}")),
        }
    }
}

impl StreamInput {
    pub(crate) fn new(stream: BodyStream, runtime: tokio::runtime::Handle) -> Self {
        Self {
            state: ForkSafe::new(Mutex::new(State {
                chunks: Some(stream.chunks),
                received: Vec::new(),
                position: 0,
                ended: false,
            })),
            runtime: ForkSafe::new(runtime),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Waits (without the GVL, or in a request fiber only that fiber) for one
    /// more chunk; false at the end.
    fn fill_once(&self, ruby: &Ruby) -> Result<bool, Error> {
        let mut chunks = {
            let mut state = self.lock();
            if state.ended {
                return Ok(false);
            }
            // Taken out so that no lock is held while waiting.
            state
                .chunks
                .take()
                .ok_or_else(|| hyperion_error(ruby, "rack.input is being read by another thread"))?
        };
        // In a request fiber (async_io) only that fiber waits; the receiver
        // travels with the wait and comes back with the chunk.
        if let Some(fiber) = FiberWait::current() {
            let waited = fiber.wait(ruby, async move {
                let chunk = chunks.recv().await;
                (chunks, chunk)
            });
            let mut state = self.lock();
            let next = waited.map(|(chunks, chunk)| {
                state.chunks = Some(chunks);
                Next::from(chunk)
            });
            return Self::took(ruby, &mut state, next);
        }
        let cancel = Notify::new();
        let next = wait_interruptibly(
            |_| {
                self.runtime.block_on(async {
                    tokio::select! {
                        chunk = chunks.recv() => Some(Next::from(chunk)),
                        _ = cancel.notified() => None,
                    }
                })
            },
            |_| cancel.notify_one(),
        );
        let mut state = self.lock();
        state.chunks = Some(chunks);
        Self::took(ruby, &mut state, next)
    }

    /// Records what a wait for a chunk brought; false at the end.
    fn took(ruby: &Ruby, state: &mut State, next: Result<Next, Error>) -> Result<bool, Error> {
        match next? {
            Next::Chunk(bytes) => {
                state.received.extend_from_slice(&bytes);
                Ok(true)
            }
            Next::End => {
                state.ended = true;
                state.chunks = None;
                Ok(false)
            }
            Next::Failed(message) => {
                state.ended = true;
                state.chunks = None;
                Err(hyperion_error(ruby, message))
            }
        }
    }

    /// Takes up to `length` unread bytes (all of them for `None`), waiting
    /// for more while fewer are there and the body goes on.
    fn take(
        &self,
        ruby: &Ruby,
        length: Option<usize>,
        until_newline: bool,
    ) -> Result<Option<Vec<u8>>, Error> {
        loop {
            {
                let mut state = self.lock();
                let unread = &state.received[state.position..];
                let newline = until_newline
                    .then(|| unread.iter().position(|&b| b == b'\n'))
                    .flatten();
                let enough = match (newline, length) {
                    (Some(at), _) => Some(at + 1),
                    (None, Some(n)) if unread.len() >= n => Some(n),
                    _ if state.ended => Some(unread.len()),
                    _ => None,
                };
                if let Some(n) = enough {
                    if n == 0 && state.ended && (length.is_some_and(|n| n > 0) || until_newline) {
                        return Ok(None);
                    }
                    let taken = unread[..n].to_vec();
                    state.position += n;
                    return Ok(Some(taken));
                }
            }
            self.fill_once(ruby)?;
        }
    }

    fn read(ruby: &Ruby, rb_self: &Self, args: &[Value]) -> Result<Value, Error> {
        let length: Option<usize> = match args.first() {
            Some(v) if !v.is_nil() => Some(usize::try_convert(*v)?),
            _ => None,
        };
        let buffer = args.get(1).and_then(|v| RString::from_value(*v));
        if length == Some(0) {
            return Ok(ruby.str_new("").as_value());
        }
        let Some(bytes) = rb_self.take(ruby, length, false)? else {
            if let Some(buffer) = buffer {
                buffer.funcall::<_, _, Value>("clear", ())?;
            }
            return Ok(ruby.qnil().as_value());
        };
        match buffer {
            Some(buffer) => {
                buffer.funcall::<_, _, Value>("replace", (ruby.str_from_slice(&bytes),))?;
                Ok(buffer.as_value())
            }
            None => Ok(ruby.str_from_slice(&bytes).as_value()),
        }
    }

    fn gets(ruby: &Ruby, rb_self: &Self) -> Result<Option<RString>, Error> {
        Ok(rb_self
            .take(ruby, None, true)?
            .map(|bytes| ruby.str_from_slice(&bytes)))
    }

    /// Yields each chunk as it arrives.
    fn each(ruby: &Ruby, rb_self: &Self) -> Result<Value, Error> {
        loop {
            let unread = {
                let mut state = rb_self.lock();
                let unread = state.received[state.position..].to_vec();
                state.position = state.received.len();
                unread
            };
            if !unread.is_empty() {
                ruby.yield_value::<_, Value>(ruby.str_from_slice(&unread))?;
            } else if !rb_self.fill_once(ruby)? {
                return Ok(ruby.qnil().as_value());
            }
        }
    }

    fn rewind(&self) -> usize {
        self.lock().position = 0;
        0
    }

    fn close(&self) {}
}

pub(crate) fn init(ruby: &Ruby, module: RModule) -> Result<(), Error> {
    let class = module.define_class("StreamInput", ruby.class_object())?;
    class.undef_default_alloc_func();
    class.define_method("read", method!(StreamInput::read, -1))?;
    class.define_method("gets", method!(StreamInput::gets, 0))?;
    class.define_method("each", method!(StreamInput::each, 0))?;
    class.define_method("rewind", method!(StreamInput::rewind, 0))?;
    class.define_method("close", method!(StreamInput::close, 0))?;
    Ok(())
}
