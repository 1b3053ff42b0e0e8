//! Turns a Rack response triple into an `AppResponse` for the tokio side.
//! Whatever happens, the body's `close` is called exactly once.
//!
//! Two responses leave hyper's path: a `rack.hijack` header (partial
//! hijack, `super::hijack`) and a body that responds to `call` and not
//! `each` (Rack 3 streaming, `super::stream_body`).
//!
//! A response that breaks the Rack SPEC, or whose objects raise while it is
//! converted, becomes a 500 (or an aborted stream once bytes went out). A
//! non-local exit inside the app's objects (`Thread#kill` or process exit in
//! a body's `each`/`to_ary`/`close` or a headers `each`) is never swallowed:
//! the body is closed, then the exit is returned so it ends the thread.

use std::cell::Cell;
use std::os::unix::ffi::OsStrExt;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http::header::{HeaderName, HeaderValue, CONTENT_LENGTH};
use http::{HeaderMap, StatusCode};
use magnus::prelude::*;
use magnus::r_hash::ForEach;
use magnus::{Error, Integer, RArray, RHash, RString, Ruby, Symbol, TryConvert, Value};
use tokio::sync::{oneshot, Notify};

use super::block::call_with_block;
use super::errors::{
    class_of, is_non_local_exit, log_exception, CLIENT_DISCONNECTED, HYPERION_ERROR,
};
use super::nogvl::wait_interruptibly;
use crate::file_body::FileBody;
use crate::response::{AppResponse, BodySender, ResponseBody, SendError};
use crate::takeover::TakeoverHandle;
use crate::written::WrittenNotice;

/// Where the response goes, and what the tokio side needs to stream it.
pub(crate) struct Reply<'a> {
    pub sender: oneshot::Sender<AppResponse>,
    pub runtime: &'a tokio::runtime::Handle,
    /// HEAD: headers only, the body is closed without being iterated.
    pub head_only: bool,
    /// HTTP/1.x: the request may take its connection over (a partial
    /// hijack, a 101 with a streaming body).
    pub takeover: Option<&'a TakeoverHandle>,
    /// Rides with the response when callbacks wait for it to be written.
    pub written: Option<WrittenNotice>,
    /// `rack.input`, which a streaming body's `read` reads.
    pub input: Value,
    /// Set to the exception that cut the response short (a 500 for an
    /// invalid response, a body that raised, a client gone), for
    /// `rack.response_finished`.
    pub failure: &'a Cell<Option<Value>>,
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
        Err(failed) => return answer_failure(reply.sender, reply.failure, failed),
    };
    let mut hijack = None;
    let head = convert_status(status)
        .map_err(Failure::from)
        .and_then(|status| Ok((status, convert_headers(ruby, headers, Some(&mut hijack))?)));
    let exit = match (head, hijack) {
        (Ok((status, headers)), None) => send_body(ruby, status, headers, body, reply).err(),
        (Ok((status, headers)), Some(callable)) => {
            partial_hijack(ruby, status, &headers, callable, reply).err()
        }
        (Err(failed), _) => answer_failure(reply.sender, reply.failure, failed).err(),
    };
    let closed = close_body(body);
    exit.map_or(closed, Err)
}

/// A response with a `rack.hijack` header: its status and headers go out,
/// then the callable gets the connection (`super::hijack::partial`). The body
/// is ignored (and closed by the caller).
fn partial_hijack(
    ruby: &Ruby,
    status: StatusCode,
    headers: &HeaderMap,
    callable: Value,
    reply: Reply<'_>,
) -> Result<(), Error> {
    let Some(takeover) = reply.takeover else {
        send_error(
            reply.sender,
            "rack.hijack is not available over HTTP/2 (a rack.hijack response header was given)",
        );
        reply
            .failure
            .set(invalid_error("rack.hijack is not available over HTTP/2"));
        return Ok(());
    };
    // Kept until the connection is taken: dropping it would answer 503.
    let _held = reply.sender;
    let failed = super::hijack::partial(ruby, status, headers, callable, takeover, reply.runtime)?;
    match (failed, reply.written) {
        (Some(failed), _) => reply.failure.set(Some(failed)),
        // The head went out before the callable was called: what Hyperion
        // had to write is written.
        (None, Some(written)) => written.fire(),
        (None, None) => {}
    }
    Ok(())
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

/// Answers a response that cannot be sent: 500 (reported through
/// `failure`), and an exit passed on.
fn answer_failure(
    sender: oneshot::Sender<AppResponse>,
    failure: &Cell<Option<Value>>,
    failed: Failure,
) -> Result<(), Error> {
    match failed {
        Failure::Invalid(message) => {
            send_error(sender, &message);
            failure.set(invalid_error(&message));
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
    convert_headers(ruby, headers, None).map_err(|failed| match failed {
        Failure::Invalid(message) => Error::new(ruby.exception_arg_error(), message),
        Failure::Exit(exit) => exit,
    })
}

pub(crate) fn send_error(sender: oneshot::Sender<AppResponse>, message: &str) {
    tracing::error!("invalid Rack response: {message}");
    let _ = sender.send(AppResponse::plain(StatusCode::INTERNAL_SERVER_ERROR, false));
}

/// A `Hyperion::Error` saying why a response was refused, for
/// `rack.response_finished`.
fn invalid_error(message: &str) -> Option<Value> {
    let ruby = Ruby::get().ok()?;
    ruby.get_inner(&HYPERION_ERROR)
        .new_instance((format!("invalid Rack response: {message}"),))
        .ok()
        .map(|e| e.as_value())
}

/// Calls `close` once; an exception is logged, an exit returned.
pub(crate) fn close_body(body: Value) -> Result<(), Error> {
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

/// Converts a Rack headers object. `hijack`, when given, receives the value
/// of a `rack.hijack` entry (a partial hijack's callable).
fn convert_headers(
    ruby: &Ruby,
    headers: Value,
    mut hijack: Option<&mut Option<Value>>,
) -> Result<HeaderMap, Failure> {
    let mut map = HeaderMap::new();
    let mut problem = None;
    let mut add = |name: Value, value: Value| match add_header(
        &mut map,
        name,
        value,
        hijack.as_deref_mut(),
    ) {
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
        call_with_block(ruby, headers, "each", |ruby, args| {
            let pair = match args {
                [single] => *single,
                _ => ruby.ary_new_from_values(args).as_value(),
            };
            pairs.push(pair)
        })
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

fn add_header(
    map: &mut HeaderMap,
    name: Value,
    value: Value,
    hijack: Option<&mut Option<Value>>,
) -> Result<(), Failure> {
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
        if let (b"rack.hijack", Some(hijack)) = (lowered.as_slice(), hijack) {
            if !value.is_nil() {
                *hijack = Some(value);
            }
        }
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
    convert_headers(ruby, fields, None).map(Some)
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
    let reported = reply.failure;
    let written = reply.written.clone();
    let respond = |body: ResponseBody, headers: HeaderMap, sender: oneshot::Sender<AppResponse>| {
        let mut response = AppResponse::new(status, headers, body);
        response.written = written;
        let _ = sender.send(response);
        Ok(())
    };
    let streamed_by_call = !body.respond_to("each", false).unwrap_or(false)
        && body.respond_to("call", false).unwrap_or(false);
    if streamed_by_call && status == StatusCode::SWITCHING_PROTOCOLS && !reply.head_only {
        return super::stream_body::respond(ruby, status, headers, body, reply);
    }
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
    if streamed_by_call {
        return super::stream_body::respond(ruby, status, headers, body, reply);
    }
    match file_body(body, status, &headers) {
        Ok(Some(file)) => return respond(ResponseBody::File(file), headers, reply.sender),
        Ok(None) => {}
        Err(failed) => return answer_failure(reply.sender, reported, failed),
    }
    let array = match body_array(body) {
        Ok(array) => array,
        Err(failed) => return answer_failure(reply.sender, reported, failed),
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
            Err(failed) => answer_failure(reply.sender, reported, failed),
        };
    }
    if !body.respond_to("each", false).unwrap_or(false) {
        let message = format!(
            "body must respond to #each or #call, got {}",
            class_of(body)
        );
        send_error(reply.sender, &message);
        reported.set(invalid_error(&message));
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
        written: Option<WrittenNotice>,
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
                written,
            } = self.take()
            else {
                unreachable!("matched above");
            };
            let (body_sender, body) = ResponseBody::channel();
            let mut response = AppResponse::new(status, headers, body);
            response.written = written;
            let _ = sender.send(response);
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
    let reported = reply.failure;
    let state = Mutex::new(Stream::Pending {
        sender: reply.sender,
        status,
        headers,
        written: reply.written,
    });
    let runtime = reply.runtime;
    let result = call_with_block(ruby, body, "each", |ruby, args| {
        let chunk = args
            .first()
            .copied()
            .unwrap_or_else(|| ruby.qnil().as_value());
        let chunk =
            chunk_bytes(chunk).map_err(|Invalid(m)| Error::new(ruby.exception_type_error(), m))?;
        // Taken out of the lock before waiting without the GVL.
        let sender = lock(&state).sender();
        match sender {
            Some(sender) => send_chunk(ruby, &sender, runtime, chunk),
            None => Err(disconnected(ruby)),
        }
    });
    let state = lock(&state).take();
    match (result, state) {
        (
            Ok(_),
            Stream::Pending {
                sender,
                status,
                headers,
                written,
            },
        ) => {
            let body = match trailers(ruby, body) {
                Ok(Some(fields)) => ResponseBody::from_chunks(Vec::new()).with_trailers(fields),
                Ok(None) => ResponseBody::Empty,
                Err(failed) => return answer_failure(sender, reported, failed),
            };
            let mut response = AppResponse::new(status, headers, body);
            response.written = written;
            let _ = sender.send(response);
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
                        reported.set(invalid_error(&message));
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
            reported.set(e.value());
            Ok(())
        }
        (Err(e), Stream::Pending { sender, .. }) => {
            log_exception("response body raised", &e);
            send_error(sender, "response body raised before its first chunk");
            reported.set(e.value());
            Ok(())
        }
        (Err(e), Stream::Started(sender)) => {
            log_exception("response body raised mid-stream; connection aborted", &e);
            sender.abort();
            reported.set(e.value());
            Ok(())
        }
        (Err(e), Stream::Done) => {
            log_exception("response body raised", &e);
            reported.set(e.value());
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
pub(crate) fn send_chunk(
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
