//! Builds a fresh Rack env Hash per request: the superset that Rack 2.2 and
//! Rack 3 apps both accept (see the README's env table).

use std::os::fd::{FromRawFd, IntoRawFd};

use http::{HeaderMap, Method, Version};
use magnus::prelude::*;
use magnus::value::{Lazy, ReprValue};
use magnus::{Error, IntoValue, RHash, RString, Ruby, Value};

use super::keys::*;
use crate::body::RequestBody;
use crate::host::{env_header_key, request_authority, server_name_and_port, EnvHeaderKey};
use crate::request::RequestData;

/// Per-worker values that every env carries.
#[derive(Debug, Clone, Copy)]
pub(crate) struct EnvFlags {
    pub multithread: bool,
    pub multiprocess: bool,
}

pub(crate) fn build_env(
    ruby: &Ruby,
    request: RequestData,
    flags: EnvFlags,
    runtime: &tokio::runtime::Handle,
) -> Result<RHash, Error> {
    let RequestData {
        head,
        body,
        remote_addr,
        client_cert,
        server,
        early_hints,
        // `super::exchange` adds rack.hijack? and rack.hijack.
        takeover: _,
    } = request;
    let env = ruby.hash_new();
    let set = |key: &Lazy<RString>, value: Value| env.aset(ruby.get_inner(key), value);
    let bytes = |b: &[u8]| ruby.str_from_slice(b).as_value();

    set(&REQUEST_METHOD, method_value(ruby, &head.method))?;
    set(&SCRIPT_NAME, ruby.get_inner(&EMPTY).as_value())?;
    let path = if head.uri.path().is_empty() {
        "/"
    } else {
        head.uri.path()
    };
    set(&PATH_INFO, bytes(path.as_bytes()))?;
    set(&REQUEST_PATH, bytes(path.as_bytes()))?;
    set(
        &QUERY_STRING,
        bytes(head.uri.query().unwrap_or("").as_bytes()),
    )?;
    let target = head
        .uri
        .path_and_query()
        .map(|pq| pq.as_str())
        .unwrap_or(path);
    set(&REQUEST_URI, bytes(target.as_bytes()))?;
    set(&SERVER_PROTOCOL, protocol_value(ruby, head.version))?;
    set(&SERVER_SOFTWARE, ruby.get_inner(&SOFTWARE).as_value())?;
    set(&REMOTE_ADDR, bytes(remote_addr.as_bytes()))?;

    let (name, port) = server_name_and_port(
        request_authority(&head),
        server.default_port(),
        &server.host,
        server.port,
    );
    set(&SERVER_NAME, bytes(name.as_bytes()))?;
    set(&SERVER_PORT, bytes(port.as_bytes()))?;

    set_headers(ruby, env, &head.headers, &body)?;
    // The target's authority (absolute form, HTTP/2's :authority) wins over
    // a Host header (RFC 9112 §3.2.2), and is HTTP/2's only host.
    if let Some(authority) = head.uri.authority() {
        set(&HTTP_HOST, bytes(authority.as_str().as_bytes()))?;
    }

    set(
        &RACK_VERSION,
        ruby.get_inner(&RACK_VERSION_VALUE).as_value(),
    )?;
    if server.scheme == "https" {
        set(&RACK_URL_SCHEME, ruby.get_inner(&HTTPS).as_value())?;
        set(&HTTPS_KEY, ruby.get_inner(&ON).as_value())?;
    } else {
        set(&RACK_URL_SCHEME, ruby.get_inner(&HTTP).as_value())?;
    }
    if let Some(pem) = client_cert {
        set(&SSL_CLIENT_CERT, bytes(pem.as_bytes()))?;
    }
    set(&RACK_INPUT, input_value(ruby, body, runtime)?)?;
    set(&RACK_ERRORS, stderr())?;
    set(&RACK_MULTITHREAD, flags.multithread.into_value_with(ruby))?;
    set(&RACK_MULTIPROCESS, flags.multiprocess.into_value_with(ruby))?;
    set(&RACK_RUN_ONCE, ruby.qfalse().as_value())?;
    if let Some(hints) = early_hints {
        let callable = ruby.obj_wrap(super::early_hints::EarlyHints::new(hints));
        set(&RACK_EARLY_HINTS, callable.as_value())?;
    }
    Ok(env)
}

fn method_value(ruby: &Ruby, method: &Method) -> Value {
    let interned = match *method {
        Method::GET => &GET,
        Method::POST => &POST,
        Method::HEAD => &HEAD,
        _ => return ruby.str_new(method.as_str()).as_value(),
    };
    ruby.get_inner(interned).as_value()
}

fn protocol_value(ruby: &Ruby, version: Version) -> Value {
    let interned = match version {
        Version::HTTP_10 => &HTTP_VERSION_1_0,
        Version::HTTP_2 => &HTTP_VERSION_2,
        _ => &HTTP_VERSION_1_1,
    };
    ruby.get_inner(interned).as_value()
}

/// Interned keys for the most common headers, so they are not rebuilt per request.
fn common_header_key(name: &str) -> Option<&'static Lazy<RString>> {
    Some(match name {
        "host" => &HTTP_HOST,
        "user-agent" => &HTTP_USER_AGENT,
        "accept" => &HTTP_ACCEPT,
        "accept-encoding" => &HTTP_ACCEPT_ENCODING,
        "accept-language" => &HTTP_ACCEPT_LANGUAGE,
        "connection" => &HTTP_CONNECTION,
        "cookie" => &HTTP_COOKIE,
        _ => return None,
    })
}

fn set_headers(
    ruby: &Ruby,
    env: RHash,
    headers: &HeaderMap,
    body: &RequestBody,
) -> Result<(), Error> {
    let mut content_length_seen = false;
    for name in headers.keys() {
        let key: Value = match common_header_key(name.as_str()) {
            Some(key) => ruby.get_inner(key).as_value(),
            None => match env_header_key(name.as_str()) {
                EnvHeaderKey::ContentType => ruby.get_inner(&CONTENT_TYPE).as_value(),
                EnvHeaderKey::ContentLength => {
                    content_length_seen = true;
                    ruby.get_inner(&CONTENT_LENGTH).as_value()
                }
                EnvHeaderKey::Http(key) => ruby.str_new(&key).as_value(),
                EnvHeaderKey::Dropped => continue,
            },
        };
        // Repeated fields are joined as RFC 9110 says; cookies use "; ".
        let separator: &[u8] = if name == http::header::COOKIE {
            b"; "
        } else {
            b", "
        };
        let mut values = headers.get_all(name).iter();
        let value = ruby.str_from_slice(values.next().map(|v| v.as_bytes()).unwrap_or_default());
        for more in values {
            value.cat(separator);
            value.cat(more.as_bytes());
        }
        env.aset(key, value)?;
    }
    // A chunked body was read whole, so its length is known: give it to the
    // app as Puma does (and drop the now-meaningless transfer coding).
    if let Some(length) = body.known_len().filter(|&n| n > 0 && !content_length_seen) {
        env.aset(
            ruby.get_inner(&CONTENT_LENGTH),
            ruby.str_new(&length.to_string()),
        )?;
        env.delete::<_, Value>(ruby.str_new("HTTP_TRANSFER_ENCODING"))?;
    }
    Ok(())
}

/// rack.input: a shared empty reader, a binary StringIO, or the spilled
/// temporary file (opened binary, positioned at the start).
fn input_value(
    ruby: &Ruby,
    body: RequestBody,
    runtime: &tokio::runtime::Handle,
) -> Result<Value, Error> {
    match body {
        RequestBody::Empty => Ok(ruby.get_inner(&NULL_INPUT)),
        RequestBody::Stream(stream) => Ok(ruby
            .obj_wrap(super::stream_input::StreamInput::new(
                stream,
                runtime.clone(),
            ))
            .as_value()),
        RequestBody::Memory(bytes) => ruby
            .get_inner(&STRING_IO)
            .new_instance((ruby.str_from_slice(&bytes),)),
        RequestBody::File { file, .. } => spilled_body_file(file),
    }
}

/// Wraps a spilled body's descriptor in a binary Ruby File that owns it.
/// Made with `rb_io_fdopen`, which runs no Ruby code and checks no
/// interrupts: `File.for_fd` could raise (a `Thread#raise` arriving) either
/// before it took the descriptor, leaking it, or after, and then closing it
/// here would close it twice.
fn spilled_body_file(file: std::fs::File) -> Result<Value, Error> {
    let fd = file.into_raw_fd();
    let io = magnus::rb_sys::protect(|| {
        // SAFETY: called with the GVL held; `fd` is an open descriptor that
        // nothing else owns; the path is a NUL-terminated literal that Ruby
        // copies. A raise (only NoMemoryError) is caught by rb_protect.
        unsafe {
            rb_sys::rb_io_fdopen(
                fd,
                nix::libc::O_RDONLY,
                c"rack.input (unlinked temporary file)".as_ptr(),
            )
        }
    })
    .inspect_err(|_| {
        // SAFETY: the File was not created, so `fd` is still ours alone.
        drop(unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) });
    })?;
    // From here the File owns the descriptor (closed when it is collected).
    magnus::rb_sys::protect(|| {
        // SAFETY: `io` is the live File just created (on this stack); with
        // the GVL held. Makes reads return binary (ASCII-8BIT) Strings.
        unsafe { rb_sys::rb_io_ascii8bit_binmode(io) }
    })?;
    // SAFETY: `io` is a live VALUE on this stack.
    Ok(unsafe { <Value as magnus::rb_sys::FromRawValue>::from_raw(io) })
}

fn stderr() -> Value {
    // SAFETY: rb_gv_get is called with the GVL held and a NUL-terminated name;
    // reading $stderr cannot raise.
    let raw = unsafe { rb_sys::rb_gv_get(c"$stderr".as_ptr()) };
    // SAFETY: rb_gv_get returns a live VALUE, now on this thread's stack.
    unsafe { <Value as magnus::rb_sys::FromRawValue>::from_raw(raw) }
}
