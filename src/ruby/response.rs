//! Turns a Rack response triple into an `AppResponse` for the tokio side.
//! Whatever happens, the body's `close` is called exactly once.
//!
//! A response that breaks the Rack SPEC, or whose objects raise while it is
//! converted, becomes a 500 (or an aborted stream once bytes went out). A
//! non-local exit inside the app's objects (`Thread#kill` or process exit in
//! a body's `each`/`to_ary`/`close` or a headers `each`) is never swallowed:
//! the body is closed, then the exit is returned so it ends the thread.

use std::os::unix::ffi::OsStrExt;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http::header::{HeaderName, HeaderValue, CONTENT_LENGTH};
use http::{HeaderMap, StatusCode};
use magnus::prelude::*;
use magnus::r_hash::ForEach;
use magnus::value::Opaque;
use magnus::{Error, Integer, RArray, RHash, RString, Ruby, Symbol, TryConvert, Value};
use tokio::sync::{oneshot, Notify};

use super::errors::{class_of, is_non_local_exit, log_exception, CLIENT_DISCONNECTED};
use super::nogvl::wait_interruptibly;
use crate::file_body::FileBody;
use crate::fork_safe::ForkSafe;
use crate::response::{AppResponse, BodySender, ResponseBody, SendError};

/// Where the response goes, and what the tokio side needs to stream it.
pub(crate) struct Reply<'a> {
    pub sender: oneshot::Sender<AppResponse>,
    pub runtime: &'a tokio::runtime::Handle,
    /// HEAD: headers only, the body is closed without being iterated.
    pub head_only: bool,
}

/// A Rack response that breaks the SPEC, answered with 500.
struct Invalid(String);

/// Why a response cannot go out as the app gave it.
enum Failure {
    Invalid(String),
    /// A non-local exit inside the app's objects, to be passed on.
    Exit(Error),
}

impl From<Invalid> for Failure {
    fn from(Invalid(message): Invalid) -> Self {
        Failure::Invalid(message)
    }
}

/// An error from calling into the app's objects: an exit is passed on, an
/// exception makes the response invalid.
fn failure(context: &str, error: Error) -> Failure {
    if is_non_local_exit(&error) {
        Failure::Exit(error)
    } else {
        Failure::Invalid(format!("{context}: {error}"))
    }
}

/// Sends the app's response (or a 500 if it is not valid Rack), then closes
/// the body. Returns the non-local exit that happened on the way, if any.
pub(crate) fn respond(ruby: &Ruby, rack_response: Value, reply: Reply<'_>) -> Result<(), Error> {
    let (status, headers, body) = match unpack(rack_response) {
        Ok(parts) => parts,
        Err(failed) => return answer_failure(reply.sender, failed),
    };
    let head = convert_status(status)
        .map_err(Failure::from)
        .and_then(|status| Ok((status, convert_headers(ruby, headers)?)));
    let exit = match head {
        Ok((status, headers)) => send_body(ruby, status, headers, body, reply).err(),
        Err(failed) => answer_failure(reply.sender, failed).err(),
    };
    let closed = close_body(body);
    exit.map_or(closed, Err)
}

fn unpack(rack_response: Value) -> Result<(Value, Value, Value), Failure> {
    let not_a_triple = || {
        Failure::Invalid(format!(
            "app returned {}, expected [status, headers, body]",
            class_of(rack_response)
        ))
    };
    let triple = match RArray::try_convert(rack_response) {
        Ok(triple) if triple.len() == 3 => triple,
        Ok(_) => return Err(not_a_triple()),
        Err(e) if is_non_local_exit(&e) => return Err(Failure::Exit(e)),
        Err(_) => return Err(not_a_triple()),
    };
    match (triple.entry(0), triple.entry(1), triple.entry(2)) {
        (Ok(s), Ok(h), Ok(b)) => Ok((s, h, b)),
        _ => Err(Failure::Invalid(
            "app returned an unreadable response array".into(),
        )),
    }
}

/// Answers a response that cannot be sent: 500, and an exit passed on.
fn answer_failure(sender: oneshot::Sender<AppResponse>, failed: Failure) -> Result<(), Error> {
    match failed {
        Failure::Invalid(message) => {
            send_error(sender, &message);
            Ok(())
        }
        Failure::Exit(exit) => {
            let _ = sender.send(AppResponse::plain(StatusCode::INTERNAL_SERVER_ERROR, false));
            Err(exit)
        }
    }
}

/// Header fields from a Rack headers object, converted and checked as a
/// response's are (for `rack.early_hints`): what is invalid raises
/// ArgumentError; a non-local exit passes through.
pub(crate) fn header_fields(ruby: &Ruby, headers: Value) -> Result<HeaderMap, Error> {
    convert_headers(ruby, headers).map_err(|failed| match failed {
        Failure::Invalid(message) => Error::new(ruby.exception_arg_error(), message),
        Failure::Exit(exit) => exit,
    })
}

fn send_error(sender: oneshot::Sender<AppResponse>, message: &str) {
    tracing::error!("invalid Rack response: {message}");
    let _ = sender.send(AppResponse::plain(StatusCode::INTERNAL_SERVER_ERROR, false));
}

/// Calls `close` once; an exception is logged, an exit returned.
fn close_body(body: Value) -> Result<(), Error> {
    if !body.respond_to("close", false).unwrap_or(false) {
        return Ok(());
    }
    match body.funcall::<_, _, Value>("close", ()) {
        Ok(_) => Ok(()),
        Err(e) if is_non_local_exit(&e) => Err(e),
        Err(e) => {
            log_exception("response body #close raised", &e);
            Ok(())
        }
    }
}

fn convert_status(status: Value) -> Result<StatusCode, Invalid> {
    let code = Integer::from_value(status)
        .and_then(|i| i.to_u16().ok())
        .ok_or_else(|| {
            Invalid(format!(
                "status must be an Integer, got {}",
                class_of(status)
            ))
        })?;
    StatusCode::from_u16(code)
        .ok()
        .filter(|s| s.as_u16() >= 100)
        .ok_or_else(|| Invalid(format!("status {code} is out of range")))
}

fn convert_headers(ruby: &Ruby, headers: Value) -> Result<HeaderMap, Failure> {
    let mut map = HeaderMap::new();
    let mut problem = None;
    let mut add = |name: Value, value: Value| match add_header(&mut map, name, value) {
        Ok(()) => ForEach::Continue,
        Err(failed) => {
            problem = Some(failed);
            ForEach::Stop
        }
    };
    let iterated = if let Some(hash) = RHash::from_value(headers) {
        hash.foreach(|name: Value, value: Value| Ok(add(name, value)))
    } else if headers.respond_to("each", false).unwrap_or(false) {
        // Rack 2 allows any object whose #each yields pairs. They are
        // gathered into a Ruby Array (on this stack, so marked) first.
        let pairs = ruby.ary_new();
        let collected = Opaque::from(pairs);
        let collect = ruby.proc_from_fn(move |ruby, args: &[Value], _block| {
            let pair = match args {
                [single] => *single,
                _ => ruby.ary_new_from_values(args).as_value(),
            };
            ruby.get_inner(collected).push(pair)
        });
        headers
            .funcall_with_block::<_, _, Value>("each", (), collect)
            .and_then(|_| {
                array_items(pairs).try_for_each(|pair| {
                    let pair = RArray::try_convert(pair?)?;
                    if let ForEach::Stop = add(pair.entry(0)?, pair.entry(1)?) {
                        return Err(Error::new(
                            ruby.exception_stop_iteration(),
                            "invalid header",
                        ));
                    }
                    Ok(())
                })
            })
    } else {
        return Err(Failure::Invalid(format!(
            "headers must be a Hash (or respond to #each), got {}",
            class_of(headers)
        )));
    };
    if let Some(failed) = problem {
        return Err(failed);
    }
    iterated.map_err(|e| failure("headers could not be iterated", e))?;
    Ok(map)
}

fn add_header(map: &mut HeaderMap, name: Value, value: Value) -> Result<(), Failure> {
    let Some(name) = RString::from_value(name) else {
        return Err(Failure::Invalid(format!(
            "header name must be a String, got {}",
            class_of(name)
        )));
    };
    // SAFETY: the slice is copied into a HeaderName before any Ruby code runs.
    let name_bytes = unsafe { name.as_slice() }.to_vec();
    let lowered = name_bytes.to_ascii_lowercase();
    if lowered.starts_with(b"rack.") || lowered == b"status" {
        return Ok(());
    }
    let header = HeaderName::from_bytes(&name_bytes).map_err(|_| {
        Failure::Invalid(format!(
            "header name {:?} is not a valid token",
            String::from_utf8_lossy(&name_bytes)
        ))
    })?;
    let mut lines = Vec::new();
    collect_header_lines(&header, value, &mut lines)?;
    for line in lines {
        let value = HeaderValue::from_maybe_shared(line).map_err(|_| {
            Failure::Invalid(format!(
                "header {header} has a value with CR, NUL or another control character"
            ))
        })?;
        map.append(header.clone(), value);
    }
    Ok(())
}

/// String values are split on "\n" (Rack 2's multi-value form); Arrays give
/// one line per element; Integers and Symbols are written with `to_s`, as
/// Puma does; nil adds nothing.
fn collect_header_lines(
    header: &HeaderName,
    value: Value,
    lines: &mut Vec<Bytes>,
) -> Result<(), Failure> {
    if value.is_nil() {
        return Ok(());
    }
    if let Some(text) = RString::from_value(value) {
        // SAFETY: copied out before any Ruby code runs.
        let bytes = unsafe { text.as_slice() };
        lines.extend(bytes.split(|&b| b == b'\n').map(Bytes::copy_from_slice));
        return Ok(());
    }
    if let Some(array) = RArray::from_value(value) {
        for item in array_items(array) {
            let item = item.map_err(|e| failure("header value", e))?;
            if RArray::from_value(item).is_some() {
                return Err(Failure::Invalid(format!(
                    "header {header} has a nested Array value"
                )));
            }
            collect_header_lines(header, item, lines)?;
        }
        return Ok(());
    }
    if Integer::from_value(value).is_some() || Symbol::from_value(value).is_some() {
        let text: String = value
            .funcall("to_s", ())
            .map_err(|e| failure("header value", e))?;
        lines.push(Bytes::from(text));
        return Ok(());
    }
    Err(Failure::Invalid(format!(
        "header {header} must be a String or an Array of Strings, got {}",
        class_of(value)
    )))
}

fn chunk_bytes(chunk: Value) -> Result<Bytes, Invalid> {
    let text = RString::from_value(chunk).ok_or_else(|| {
        Invalid(format!(
            "body yielded a {}, expected String chunks",
            class_of(chunk)
        ))
    })?;
    super::pinned::body_chunk(text).map_err(|e| Invalid(format!("body chunk: {e}")))
}

/// The trailing header fields of a body that has `trailers` (Rack 3), as
/// gRPC uses for `grpc-status`.
fn trailers(ruby: &Ruby, body: Value) -> Result<Option<HeaderMap>, Failure> {
    if !body.respond_to("trailers", false).unwrap_or(false) {
        return Ok(None);
    }
    let fields: Value = body
        .funcall("trailers", ())
        .map_err(|e| failure("body#trailers raised", e))?;
    if fields.is_nil() {
        return Ok(None);
    }
    convert_headers(ruby, fields).map(Some)
}

/// Statuses whose responses carry no content (RFC 9110 §6.4.1, §15.3.6).
fn is_bodiless(status: StatusCode) -> bool {
    status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::RESET_CONTENT
        || status == StatusCode::NOT_MODIFIED
}

/// The file of a body that answers `to_path` (Rack::Files, `send_file`),
/// for the I/O side to read. `None` (iterate `each` instead) for a 206, or
/// when the file cannot be opened or its size differs from the
/// Content-Length the app declared: the app framed the body otherwise, and
/// it is sent as framed, never the whole file.
fn file_body(
    body: Value,
    status: StatusCode,
    headers: &HeaderMap,
) -> Result<Option<FileBody>, Failure> {
    if status == StatusCode::PARTIAL_CONTENT || !body.respond_to("to_path", false).unwrap_or(false)
    {
        return Ok(None);
    }
    let path: Value = body
        .funcall("to_path", ())
        .map_err(|e| failure("body#to_path", e))?;
    let Some(path) = RString::from_value(path) else {
        return Ok(None);
    };
    // SAFETY: copied out before any Ruby code runs.
    let path = std::ffi::OsStr::from_bytes(unsafe { path.as_slice() }).to_owned();
    let file = match FileBody::open(std::path::Path::new(&path)) {
        Ok(file) => file,
        Err(e) => {
            tracing::debug!(error = %e, "to_path body not opened; iterating it instead");
            return Ok(None);
        }
    };
    let declared = headers
        .get(CONTENT_LENGTH)
        .map(|v| v.to_str().ok().and_then(|v| v.trim().parse::<u64>().ok()));
    match declared {
        Some(Some(length)) if length == file.remaining() => Ok(Some(file)),
        None => Ok(Some(file)),
        _ => Ok(None),
    }
}

/// The body as an Array, when it is one or has `to_ary`.
fn body_array(body: Value) -> Result<Option<RArray>, Failure> {
    if let Some(array) = RArray::from_value(body) {
        return Ok(Some(array));
    }
    if !body.respond_to("to_ary", false).unwrap_or(false) {
        return Ok(None);
    }
    body.funcall::<_, _, RArray>("to_ary", ())
        .map(Some)
        .map_err(|e| failure("body#to_ary", e))
}

/// Sends head and body; a body that cannot be sent is answered with 500.
/// Returns a non-local exit that happened on the way.
fn send_body(
    ruby: &Ruby,
    status: StatusCode,
    mut headers: HeaderMap,
    body: Value,
    reply: Reply<'_>,
) -> Result<(), Error> {
    let respond = |body: ResponseBody, headers: HeaderMap, sender: oneshot::Sender<AppResponse>| {
        let _ = sender.send(AppResponse {
            status,
            headers,
            body,
        });
        Ok(())
    };
    if status == StatusCode::RESET_CONTENT {
        // 205 must say it has no content, whatever the app declared.
        headers.insert(CONTENT_LENGTH, HeaderValue::from(0));
    }
    if reply.head_only || is_bodiless(status) {
        // HEAD announces the length a GET would get, when it is cheap to
        // know (an Array body); the body itself is never iterated.
        let array_length = RArray::from_value(body).and_then(|array| {
            array_items(array)
                .map(|chunk| chunk.ok().and_then(RString::from_value).map(|s| s.len()))
                .sum::<Option<usize>>()
        });
        if let (true, Some(length), false) = (
            reply.head_only,
            array_length,
            headers.contains_key(CONTENT_LENGTH),
        ) {
            headers.insert(CONTENT_LENGTH, HeaderValue::from(length));
        }
        return respond(ResponseBody::Empty, headers, reply.sender);
    }
    match file_body(body, status, &headers) {
        Ok(Some(file)) => return respond(ResponseBody::File(file), headers, reply.sender),
        Ok(None) => {}
        Err(failed) => return answer_failure(reply.sender, failed),
    }
    let array = match body_array(body) {
        Ok(array) => array,
        Err(failed) => return answer_failure(reply.sender, failed),
    };
    if let Some(array) = array {
        let response_body = array_items(array)
            .map(|chunk| {
                chunk
                    .map_err(|e| failure("body element", e))
                    .and_then(|chunk| chunk_bytes(chunk).map_err(Failure::from))
            })
            .collect::<Result<Vec<Bytes>, Failure>>()
            .and_then(|chunks| {
                let known = ResponseBody::from_chunks(chunks);
                Ok(match trailers(ruby, body)? {
                    Some(fields) => known.with_trailers(fields),
                    None => known,
                })
            });
        return match response_body {
            Ok(response_body) => respond(response_body, headers, reply.sender),
            Err(failed) => answer_failure(reply.sender, failed),
        };
    }
    if !body.respond_to("each", false).unwrap_or(false) {
        let message = format!("body must respond to #each, got {}", class_of(body));
        send_error(reply.sender, &message);
        return Ok(());
    }
    stream_each(ruby, status, headers, body, reply)
}

/// State of a body streamed through `#each`. The lock around it is never
/// held while waiting for the client: a block handed to other Ruby threads
/// may be called from several at once.
enum Stream {
    /// No chunk yet: a failure can still become a clean 500, and a body with
    /// no chunks gets Content-Length: 0.
    Pending {
        sender: oneshot::Sender<AppResponse>,
        status: StatusCode,
        headers: HeaderMap,
    },
    Started(Arc<BodySender>),
    Done,
}

impl Stream {
    fn take(&mut self) -> Stream {
        std::mem::replace(self, Stream::Done)
    }

    /// The body's sender, sending the head first if this is the first chunk;
    /// `None` once the stream is over.
    fn sender(&mut self) -> Option<Arc<BodySender>> {
        if let Stream::Pending { .. } = self {
            let Stream::Pending {
                sender,
                status,
                headers,
            } = self.take()
            else {
                unreachable!("matched above");
            };
            let (body_sender, body) = ResponseBody::channel();
            let _ = sender.send(AppResponse {
                status,
                headers,
                body,
            });
            *self = Stream::Started(Arc::new(body_sender));
        }
        match self {
            Stream::Started(sender) => Some(sender.clone()),
            _ => None,
        }
    }
}

/// Iterates `body.each`, sending the head with the first chunk and each chunk
/// as it comes (chunked on the wire unless the app set Content-Length).
/// Returns a non-local exit that cut the iteration short.
fn stream_each(
    ruby: &Ruby,
    status: StatusCode,
    headers: HeaderMap,
    body: Value,
    reply: Reply<'_>,
) -> Result<(), Error> {
    let state = Arc::new(Mutex::new(Stream::Pending {
        sender: reply.sender,
        status,
        headers,
    }));
    // The block's Proc is freed by Ruby, also at exit in a forked child,
    // where what it holds must not be dropped (see `fork_safe`).
    let runtime = ForkSafe::new(reply.runtime.clone());
    let block_state = ForkSafe::new(state.clone());
    let block = ruby.proc_from_fn(move |ruby, args, _block| -> Result<(), Error> {
        let chunk = args
            .first()
            .copied()
            .unwrap_or_else(|| ruby.qnil().as_value());
        let chunk =
            chunk_bytes(chunk).map_err(|Invalid(m)| Error::new(ruby.exception_type_error(), m))?;
        // Taken out of the lock before waiting without the GVL.
        let sender = lock(&block_state).sender();
        match sender {
            Some(sender) => send_chunk(ruby, &sender, &runtime, chunk),
            None => Err(disconnected(ruby)),
        }
    });
    let result = body.funcall_with_block::<_, _, Value>("each", (), block);
    let state = lock(&state).take();
    match (result, state) {
        (
            Ok(_),
            Stream::Pending {
                sender,
                status,
                headers,
            },
        ) => {
            let body = match trailers(ruby, body) {
                Ok(Some(fields)) => ResponseBody::from_chunks(Vec::new()).with_trailers(fields),
                Ok(None) => ResponseBody::Empty,
                Err(failed) => return answer_failure(sender, failed),
            };
            let _ = sender.send(AppResponse {
                status,
                headers,
                body,
            });
            Ok(())
        }
        (Ok(_), Stream::Started(sender)) => match trailers(ruby, body) {
            Ok(Some(fields)) => {
                sender.finish(fields);
                Ok(())
            }
            Ok(None) => Ok(()),
            Err(failed) => {
                sender.abort();
                match failed {
                    Failure::Invalid(message) => {
                        tracing::error!("invalid Rack response: {message}; connection aborted");
                        Ok(())
                    }
                    Failure::Exit(exit) => Err(exit),
                }
            }
        },
        (Ok(_), Stream::Done) => Ok(()),
        (Err(e), state) if is_non_local_exit(&e) => {
            match state {
                Stream::Pending { sender, .. } => {
                    let _ =
                        sender.send(AppResponse::plain(StatusCode::INTERNAL_SERVER_ERROR, false));
                }
                Stream::Started(sender) => sender.abort(),
                Stream::Done => {}
            }
            Err(e)
        }
        (Err(e), _) if e.is_kind_of(ruby.get_inner(&CLIENT_DISCONNECTED)) => {
            tracing::debug!("client went away while the body was streaming");
            Ok(())
        }
        (Err(e), Stream::Pending { sender, .. }) => {
            log_exception("response body raised", &e);
            send_error(sender, "response body raised before its first chunk");
            Ok(())
        }
        (Err(e), Stream::Started(sender)) => {
            log_exception("response body raised mid-stream; connection aborted", &e);
            sender.abort();
            Ok(())
        }
        (Err(e), Stream::Done) => {
            log_exception("response body raised", &e);
            Ok(())
        }
    }
}

/// The elements of an Array, read by index: no copy of the Array is made,
/// and an element that is gone (the app shrank the Array) ends the walk.
fn array_items(array: RArray) -> impl Iterator<Item = Result<Value, Error>> {
    (0..array.len()).map(move |i| array.entry::<Value>(i as isize))
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn disconnected(ruby: &Ruby) -> Error {
    Error::new(ruby.get_inner(&CLIENT_DISCONNECTED), "client disconnected")
}

/// Queues a chunk, waiting without the GVL while the client is slow.
fn send_chunk(
    ruby: &Ruby,
    sender: &BodySender,
    runtime: &tokio::runtime::Handle,
    chunk: Bytes,
) -> Result<(), Error> {
    let chunk = match sender.try_send(chunk) {
        Ok(()) => return Ok(()),
        Err(Err(_closed)) => return Err(disconnected(ruby)),
        Err(Ok(chunk)) => chunk,
    };
    // In a request fiber (async_io) only that fiber waits for the client.
    if let Some(fiber) = super::scheduler::FiberWait::current() {
        return fiber
            .wait(ruby, sender.send_later(chunk))?
            .map_err(|_closed| disconnected(ruby));
    }
    let mut chunk = Some(chunk);
    let cancel = Notify::new();
    let outcome = wait_interruptibly(
        |_flag| match sender.send_blocking(runtime, chunk.take()?, &cancel) {
            Ok(()) => Some(Ok(())),
            Err(SendError::Closed) => Some(Err(())),
            Err(SendError::Cancelled(back)) => {
                chunk = Some(back);
                None
            }
        },
        |_flag| cancel.notify_one(),
    )?;
    outcome.map_err(|()| disconnected(ruby))
}
