//! `rack.hijack` on the Ruby side, over HTTP/1.x.
//!
//! - Full hijack: `Hyperion::Hijack` is `env["rack.hijack"]`; `call` takes
//!   the connection over (`crate::takeover`), waits for it without the GVL,
//!   and returns a real socket IO (a `TCPSocket`/`UNIXSocket` over the
//!   client's own socket, or over the app's end of a bridged socketpair, see
//!   `crate::hijack`), also stored in `env["rack.hijack_io"]`.
//! - Partial hijack: a `rack.hijack` response header holding a callable. The
//!   status and headers are written outside hyper, then the callable gets
//!   the IO (`partial`).
//!
//! Either way the connection is then the app's: Hyperion writes nothing
//! more on it and no longer times it out or counts it.

use std::os::fd::IntoRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use bytes::Bytes;
use http::{HeaderMap, StatusCode};
use magnus::prelude::*;
use magnus::typed_data::Obj;
use magnus::value::Opaque;
use magnus::{
    gc, method, DataTypeFunctions, Error, RClass, RHash, RModule, Ruby, TypedData, Value,
};
use tokio::sync::Notify;

use super::errors::{is_non_local_exit, log_exception, CLIENT_DISCONNECTED};
use super::keys::RACK_HIJACK_IO;
use super::nogvl::wait_interruptibly;
use crate::fork_safe::ForkSafe;
use crate::hijack::HandOver;
use crate::takeover::{http1_head, HandedSocket, SocketKind, TakeoverHandle};

/// `env["rack.hijack"]` on HTTP/1.x.
#[derive(TypedData)]
#[magnus(class = "Hyperion::Hijack", free_immediately, mark, size)]
pub(crate) struct Hijack {
    env: Opaque<RHash>,
    /// The IO once taken: `call` returns it again.
    io: Mutex<Option<Opaque<Value>>>,
    taken: AtomicBool,
    /// Not dropped in a forked child (see `fork_safe`).
    takeover: ForkSafe<TakeoverHandle>,
    runtime: ForkSafe<tokio::runtime::Handle>,
}

impl DataTypeFunctions for Hijack {
    fn mark(&self, marker: &gc::Marker) {
        marker.mark(self.env);
        if let Some(io) = *lock(&self.io) {
            marker.mark(io);
        }
    }
}

impl Hijack {
    pub(crate) fn wrap(
        ruby: &Ruby,
        env: RHash,
        takeover: TakeoverHandle,
        runtime: &tokio::runtime::Handle,
    ) -> Obj<Hijack> {
        ruby.obj_wrap(Hijack {
            env: env.into(),
            io: Mutex::new(None),
            taken: AtomicBool::new(false),
            takeover: ForkSafe::new(takeover),
            runtime: ForkSafe::new(runtime.clone()),
        })
    }

    /// Whether the app took the connection with `call`.
    pub(crate) fn taken(&self) -> bool {
        self.taken.load(Ordering::Acquire)
    }

    fn call(ruby: &Ruby, rb_self: &Self) -> Result<Value, Error> {
        if let Some(io) = *lock(&rb_self.io) {
            return Ok(ruby.get_inner(io));
        }
        let io = take_socket(ruby, &rb_self.takeover, Bytes::new(), &rb_self.runtime)?;
        rb_self.taken.store(true, Ordering::Release);
        *lock(&rb_self.io) = Some(io.into());
        ruby.get_inner(rb_self.env)
            .aset(ruby.get_inner(&RACK_HIJACK_IO), io)?;
        Ok(io)
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}

fn disconnected(ruby: &Ruby, message: &'static str) -> Error {
    Error::new(ruby.get_inner(&CLIENT_DISCONNECTED), message)
}

/// Takes the request's connection over, writing `head` first (unless
/// empty), and returns the app's IO. Waits for the connection's task
/// without the GVL. Raises `Hyperion::ClientDisconnected` (an IOError) when
/// the connection is gone or can no longer be taken (its response started).
pub(crate) fn take_socket(
    ruby: &Ruby,
    takeover: &TakeoverHandle,
    head: Bytes,
    runtime: &tokio::runtime::Handle,
) -> Result<Value, Error> {
    let (job, mut socket) = HandOver::new(head);
    if takeover.take_over(job).is_err() {
        return Err(disconnected(
            ruby,
            "rack.hijack: the connection is gone, or its response has already started",
        ));
    }
    let cancel = Notify::new();
    let handed = wait_interruptibly(
        |_| {
            runtime.block_on(async {
                tokio::select! {
                    handed = &mut socket => Some(handed),
                    _ = cancel.notified() => None,
                }
            })
        },
        |_| cancel.notify_one(),
    )?;
    match handed {
        Ok(Ok(socket)) => socket_io(ruby, socket),
        Ok(Err(e)) => Err(Error::new(
            ruby.get_inner(&CLIENT_DISCONNECTED),
            format!("rack.hijack: {e}"),
        )),
        Err(_) => Err(disconnected(
            ruby,
            "rack.hijack: the connection ended before it could be taken over",
        )),
    }
}

/// A Ruby socket object that owns `socket`'s descriptor.
fn socket_io(ruby: &Ruby, socket: HandedSocket) -> Result<Value, Error> {
    let class_name = match socket.kind {
        SocketKind::Tcp => "TCPSocket",
        SocketKind::Unix => "UNIXSocket",
    };
    // Looked up first: should it fail, the descriptor is still ours and
    // closes when `socket` drops.
    let class: RClass = ruby.class_object().const_get(class_name)?;
    let fd = socket.fd.into_raw_fd();
    // From here Ruby owns the descriptor. `for_fd` runs no Ruby code before
    // it wraps it; should it still raise (an interrupt checked on its
    // return), the object it made may own the descriptor and close it when
    // collected, so it is never closed here: a leak at worst, never a
    // double close of a number that may have been reused.
    class.funcall("for_fd", (fd,))
}

/// A partial hijack: writes `status` and `headers` outside hyper, then calls
/// `callable` with the connection's IO. Returns the exception to report to
/// `rack.response_finished` (the connection was gone, or the callable
/// raised), or a non-local exit to pass on.
pub(crate) fn partial(
    ruby: &Ruby,
    status: StatusCode,
    headers: &HeaderMap,
    callable: Value,
    takeover: &TakeoverHandle,
    runtime: &tokio::runtime::Handle,
) -> Result<Option<Value>, Error> {
    let head = http1_head(takeover.version(), status, headers);
    let io = match take_socket(ruby, takeover, head, runtime) {
        Ok(io) => io,
        Err(e) if is_non_local_exit(&e) => return Err(e),
        Err(e) => {
            tracing::debug!("partial hijack: {e}");
            return Ok(e.value());
        }
    };
    match callable.funcall::<_, _, Value>("call", (io,)) {
        Ok(_) => Ok(None),
        Err(e) => {
            // The app did not take the IO in hand: close it.
            let _ = io.funcall::<_, _, Value>("close", ());
            if is_non_local_exit(&e) {
                return Err(e);
            }
            log_exception("rack.hijack response callable raised", &e);
            Ok(e.value())
        }
    }
}

pub(crate) fn init(ruby: &Ruby, module: RModule) -> Result<(), Error> {
    let class = module.define_class("Hijack", ruby.class_object())?;
    class.undef_default_alloc_func();
    class.define_method("call", method!(Hijack::call, 0))?;
    Ok(())
}
