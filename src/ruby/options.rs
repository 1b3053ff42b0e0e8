//! `Worker.new` keyword validation. Every message names the keyword.

use std::time::Duration;

use magnus::prelude::*;
use magnus::{Error, Float, Integer, RArray, RHash, RString, Ruby, Symbol, Value};

use super::errors::class_of;
use crate::h2_settings::H2Settings;
use crate::server::ServerOptions;
use crate::tls::{Certificate, ClientAuth, TlsSettings};

pub(crate) fn type_error(ruby: &Ruby, key: &str, expected: &str, got: Value) -> Error {
    Error::new(
        ruby.exception_type_error(),
        format!("{key}: expected {expected}, got {}", class_of(got)),
    )
}

fn arg_error(ruby: &Ruby, message: String) -> Error {
    Error::new(ruby.exception_arg_error(), message)
}

pub(crate) fn integer(
    ruby: &Ruby,
    key: &str,
    value: Value,
    min: i64,
    max: i64,
) -> Result<i64, Error> {
    let n = Integer::from_value(value)
        .ok_or_else(|| type_error(ruby, key, "an Integer", value))?
        .to_i64()?;
    if !(min..=max).contains(&n) {
        return Err(arg_error(
            ruby,
            format!("{key}: must be between {min} and {max}, got {n}"),
        ));
    }
    Ok(n)
}

pub(crate) fn optional_integer(
    ruby: &Ruby,
    key: &str,
    value: Option<Value>,
    min: i64,
    max: i64,
) -> Result<Option<i64>, Error> {
    match value {
        Some(v) if !v.is_nil() => integer(ruby, key, v, min, max).map(Some),
        _ => Ok(None),
    }
}

/// A positive number of seconds (Integer or Float).
pub(crate) fn seconds(ruby: &Ruby, key: &str, value: Value) -> Result<Duration, Error> {
    let secs = if let Some(i) = Integer::from_value(value) {
        i.to_i64()? as f64
    } else if let Some(f) = Float::from_value(value) {
        f.to_f64()
    } else {
        return Err(type_error(ruby, key, "a number of seconds", value));
    };
    if !(secs > 0.0 && secs.is_finite() && secs <= 86_400.0 * 365.0) {
        return Err(arg_error(
            ruby,
            format!("{key}: must be a positive number of seconds, got {secs}"),
        ));
    }
    Ok(Duration::from_secs_f64(secs))
}

pub(crate) fn string(ruby: &Ruby, key: &str, value: Value) -> Result<String, Error> {
    RString::from_value(value)
        .ok_or_else(|| type_error(ruby, key, "a String", value))?
        .to_string()
}

pub(crate) fn boolean(ruby: &Ruby, key: &str, value: Option<Value>) -> Result<Option<bool>, Error> {
    match value {
        None => Ok(None),
        Some(v) if v.is_nil() => Ok(None),
        Some(v) if v.is_kind_of(ruby.class_true_class()) => Ok(Some(true)),
        Some(v) if v.is_kind_of(ruby.class_false_class()) => Ok(Some(false)),
        Some(v) => Err(type_error(ruby, key, "true, false or nil", v)),
    }
}

/// Calls `each` with every entry of an options Hash, its key as a string
/// (Symbol or String keys accepted). Values are converted inside the
/// iteration, while the Hash holds them: a Value copied out to the Rust heap
/// is invisible to the GC, which may move it (compaction) as soon as a
/// conversion allocates.
fn for_each_entry(
    ruby: &Ruby,
    key: &str,
    value: Value,
    mut each: impl FnMut(String, Value) -> Result<(), Error>,
) -> Result<(), Error> {
    let hash = RHash::from_value(value).ok_or_else(|| type_error(ruby, key, "a Hash", value))?;
    hash.foreach(|name: Value, v: Value| {
        let name = if let Some(sym) = Symbol::from_value(name) {
            sym.name()?.into_owned()
        } else {
            string(ruby, key, name)?
        };
        each(name, v)?;
        Ok(magnus::r_hash::ForEach::Continue)
    })
}

/// The sockets `listener:` hands in: nil (the worker binds host:port itself),
/// one server socket, or an Array of one or more.
pub(crate) struct Listeners {
    /// A private, frozen copy holding every socket (the caller's Array may
    /// change later); `None` when the worker binds its own socket.
    pub sockets: Option<RArray>,
    /// Whether `listener:` was an Array (which allows an Array `tls:`).
    pub given_as_array: bool,
}

impl Listeners {
    /// How many sockets will be served (one when the worker binds its own).
    pub fn count(&self) -> usize {
        self.sockets.map_or(1, |sockets| sockets.len())
    }
}

const LISTENER_EXPECTED: &str = "a TCPServer or UNIXServer";

/// `listener: nil | socket | [socket, ...]`; a socket is anything with a
/// `fileno` (TCPServer, UNIXServer, Socket). Whether it listens is checked
/// by `run`.
pub(crate) fn listeners(ruby: &Ruby, value: Option<Value>) -> Result<Listeners, Error> {
    let Some(value) = value.filter(|v| !v.is_nil()) else {
        return Ok(Listeners {
            sockets: None,
            given_as_array: false,
        });
    };
    let Some(given) = RArray::from_value(value) else {
        if !value.respond_to("fileno", false)? {
            return Err(type_error(ruby, "listener", LISTENER_EXPECTED, value));
        }
        let sockets = ruby.ary_new_from_values(&[value]);
        sockets.freeze();
        return Ok(Listeners {
            sockets: Some(sockets),
            given_as_array: false,
        });
    };
    let sockets = given.dup();
    if sockets.is_empty() {
        return Err(arg_error(
            ruby,
            format!("listener: the Array is empty; give at least one {LISTENER_EXPECTED}, or nil to bind host:port"),
        ));
    }
    for index in 0..sockets.len() {
        let socket: Value = sockets.entry(index as isize)?;
        if socket.is_nil() || !socket.respond_to("fileno", false)? {
            return Err(type_error(
                ruby,
                &format!("listener: element {index}"),
                LISTENER_EXPECTED,
                socket,
            ));
        }
    }
    sockets.freeze();
    Ok(Listeners {
        sockets: Some(sockets),
        given_as_array: true,
    })
}

/// `tls: nil | Hash | [Hash or nil, ...]`, one entry per listener in the
/// result: nil serves plain HTTP everywhere, a Hash applies to every
/// listener, an Array (only with an Array `listener:` of the same length)
/// gives each listener its own setting, nil for plain.
pub(crate) fn tls_per_listener(
    ruby: &Ruby,
    value: Option<Value>,
    listeners: &Listeners,
) -> Result<Vec<Option<TlsSettings>>, Error> {
    let count = listeners.count();
    let Some(value) = value.filter(|v| !v.is_nil()) else {
        return Ok(vec![None; count]);
    };
    let Some(per_listener) = RArray::from_value(value) else {
        return Ok(vec![Some(tls(ruby, "tls", value)?); count]);
    };
    if !listeners.given_as_array {
        return Err(arg_error(
            ruby,
            "tls: an Array (one entry per listener) needs listener: to be an Array of sockets; give a Hash to apply to every listener".into(),
        ));
    }
    if per_listener.len() != count {
        return Err(arg_error(
            ruby,
            format!(
                "tls: the Array has {} entries but listener: has {count} sockets; give one Hash or nil per listener",
                per_listener.len()
            ),
        ));
    }
    let mut settings = Vec::with_capacity(count);
    for index in 0..count {
        let entry: Value = per_listener.entry(index as isize)?;
        settings.push(if entry.is_nil() {
            None
        } else {
            Some(tls(ruby, &format!("tls: element {index}"), entry)?)
        });
    }
    Ok(settings)
}

/// One TLS Hash: `{ cert:, key: }` or `{ self_signed: true }`, plus optional
/// `ca:` and `verify_mode: :none | :peer | :force_peer` for client
/// certificates. Files are read (and checked) when `run` starts. `key`
/// starts every error message ("tls", or "tls: element 1").
fn tls(ruby: &Ruby, key: &str, value: Value) -> Result<TlsSettings, Error> {
    let (mut cert, mut key_file, mut ca, mut verify, mut self_signed) =
        (None, None, None, None, false);
    for_each_entry(ruby, key, value, |name, v| {
        match name.as_str() {
            "cert" => cert = Some(string(ruby, &format!("{key}: cert"), v)?),
            "key" => key_file = Some(string(ruby, &format!("{key}: key"), v)?),
            "ca" => ca = Some(string(ruby, &format!("{key}: ca"), v)?),
            "verify_mode" => {
                verify = Some(match Symbol::from_value(v) {
                    Some(sym) => sym.name()?.into_owned(),
                    None => string(ruby, &format!("{key}: verify_mode"), v)?,
                })
            }
            "self_signed" => {
                self_signed =
                    boolean(ruby, &format!("{key}: self_signed"), Some(v))?.unwrap_or(false)
            }
            other => {
                return Err(arg_error(
                    ruby,
                    format!("{key}: unknown key :{other} (known: :cert, :key, :self_signed, :ca, :verify_mode)"),
                ))
            }
        }
        Ok(())
    })?;
    let certificate = match (cert, key_file, self_signed) {
        (None, None, true) => Certificate::SelfSigned,
        (Some(_), _, true) | (_, Some(_), true) => {
            return Err(arg_error(
                ruby,
                format!("{key}: give either :cert and :key, or self_signed: true, not both"),
            ))
        }
        (Some(cert), Some(key_file), false) => Certificate::Files {
            cert: cert.into(),
            key: key_file.into(),
        },
        (None, _, false) => {
            return Err(arg_error(
                ruby,
                format!("{key}: :cert is missing (give the PEM certificate path)"),
            ))
        }
        (_, None, false) => {
            return Err(arg_error(
                ruby,
                format!("{key}: :key is missing (give the PEM private key path)"),
            ))
        }
    };
    let client_auth = match (verify.as_deref().unwrap_or("none"), ca) {
        ("none", _) => ClientAuth::None,
        ("peer", Some(ca)) => ClientAuth::Optional(ca.into()),
        ("force_peer", Some(ca)) => ClientAuth::Required(ca.into()),
        ("peer" | "force_peer", None) => {
            return Err(arg_error(
                ruby,
                format!("{key}: verify_mode needs :ca, the PEM file of the CAs that sign client certificates"),
            ))
        }
        (other, _) => {
            return Err(arg_error(
                ruby,
                format!("{key}: verify_mode must be :none, :peer or :force_peer, got {other:?}"),
            ))
        }
    };
    Ok(TlsSettings {
        certificate,
        client_auth,
    })
}

pub(crate) fn h2_settings(ruby: &Ruby, value: Option<Value>) -> Result<Option<H2Settings>, Error> {
    let Some(value) = value.filter(|v| !v.is_nil()) else {
        return Ok(None);
    };
    let mut settings = H2Settings::default();
    for_each_entry(ruby, "h2_settings", value, |name, v| {
        let n = integer(ruby, &format!("h2_settings: {name}"), v, i64::MIN, i64::MAX)?;
        settings.set(&name, n).map_err(|m| arg_error(ruby, m))
    })?;
    Ok(Some(settings))
}

/// Worker keywords beyond the seed API: the limits and timeouts of
/// docs/configuration.md, `early_hints` and `max_fibers`.
pub(crate) const LIMIT_KEYWORDS: [&str; 11] = [
    "max_body_bytes",
    "max_uri_bytes",
    "max_header_bytes",
    "max_headers",
    "idle_timeout",
    "write_timeout",
    "graceful_timeout",
    "max_keepalive_requests",
    "max_connections",
    "early_hints",
    "max_fibers",
];

/// Applies the limit keywords left over after the seed ones; any other key is
/// an unknown keyword.
pub(crate) fn apply_limit_keywords(
    ruby: &Ruby,
    rest: RHash,
    options: &mut ServerOptions,
) -> Result<(), Error> {
    rest.foreach(|key: Symbol, value: Value| {
        let key = key.name()?.into_owned();
        apply_limit_keyword(ruby, &key, value, options)?;
        Ok(magnus::r_hash::ForEach::Continue)
    })
}

fn apply_limit_keyword(
    ruby: &Ruby,
    key: &str,
    value: Value,
    options: &mut ServerOptions,
) -> Result<(), Error> {
    let limits = &mut options.limits;
    match key {
        "max_body_bytes" => limits.max_body_bytes = integer(ruby, key, value, 0, i64::MAX)? as u64,
        "max_uri_bytes" => limits.max_uri_bytes = integer(ruby, key, value, 16, 1 << 20)? as usize,
        "max_header_bytes" => {
            limits.max_header_bytes = integer(ruby, key, value, 1024, 16 << 20)? as usize
        }
        "max_headers" => limits.max_headers = integer(ruby, key, value, 1, 10_000)? as usize,
        "idle_timeout" => options.idle_timeout = seconds(ruby, key, value)?,
        "write_timeout" => options.write_timeout = seconds(ruby, key, value)?,
        "graceful_timeout" => options.graceful_timeout = seconds(ruby, key, value)?,
        // 0 means no limit.
        "max_keepalive_requests" => {
            options.max_keepalive_requests = match integer(ruby, key, value, 0, u32::MAX as i64)? {
                0 => None,
                max => Some(max as u32),
            }
        }
        // nil means no limit.
        "max_connections" => {
            options.max_connections = optional_integer(ruby, key, Some(value), 1, u32::MAX as i64)?
                .map(|max| max as usize)
        }
        "early_hints" => options.early_hints = boolean(ruby, key, Some(value))?.unwrap_or(false),
        "max_fibers" => options.max_fibers = integer(ruby, key, value, 1, 1_000_000)? as usize,
        _ => {
            return Err(arg_error(
                ruby,
                format!(
                    "unknown keyword: :{key} (limits accepted: {}; also {})",
                    LIMIT_KEYWORDS.join(", "),
                    OPERATIONS_KEYWORDS.join(", ")
                ),
            ))
        }
    }
    Ok(())
}

/// The operations keywords (access log, drain delay, control listener, a
/// stats page from the master), taken out of the keywords beyond the seed
/// API before the limits are applied.
pub(crate) struct Operations {
    pub log_requests: bool,
    /// `None`: JSON unless stdout is a terminal.
    pub log_format: Option<crate::access_log::Format>,
    pub drain_delay: Option<Duration>,
    pub control: Option<ControlKeyword>,
    pub stats: Option<std::sync::Arc<crate::stats::StatsPage>>,
}

/// `control: { listener:, auth_token:, handler: }`. The Values are the
/// caller's objects; `Worker.new` keeps them on its stack until the Worker
/// that marks them exists.
pub(crate) struct ControlKeyword {
    pub listener: Value,
    pub auth_token: Option<String>,
    pub handler: Option<Value>,
}

pub(crate) const OPERATIONS_KEYWORDS: [&str; 5] = [
    "log_requests",
    "log_format",
    "drain_delay",
    "control",
    "stats",
];

pub(crate) fn take_operations(ruby: &Ruby, rest: RHash) -> Result<Operations, Error> {
    let take = |key: &str| -> Result<Option<Value>, Error> {
        let value: Value = rest.delete(Symbol::new(key))?;
        Ok((!value.is_nil()).then_some(value))
    };
    let log_requests = boolean(ruby, "log_requests", take("log_requests")?)?.unwrap_or(false);
    let log_format = match take("log_format")? {
        None => None,
        Some(v) => {
            let name = match Symbol::from_value(v) {
                Some(sym) => sym.name()?.into_owned(),
                None => string(ruby, "log_format", v)?,
            };
            Some(match name.as_str() {
                "text" => crate::access_log::Format::Text,
                "json" => crate::access_log::Format::Json,
                other => {
                    return Err(arg_error(
                        ruby,
                        format!("log_format: must be :text or :json, got {other:?}"),
                    ))
                }
            })
        }
    };
    let drain_delay = take("drain_delay")?
        .map(|v| seconds_or_zero(ruby, "drain_delay", v))
        .transpose()?
        .filter(|delay| !delay.is_zero());
    let control = take("control")?.map(|v| control(ruby, v)).transpose()?;
    let stats = match take("stats")? {
        None => None,
        Some(v) => Some(
            <&super::stats::RubyStatsPage>::try_convert(v)
                .map_err(|_| type_error(ruby, "stats", "a Hyperion::StatsPage", v))?
                .page(),
        ),
    };
    Ok(Operations {
        log_requests,
        log_format,
        drain_delay,
        control,
        stats,
    })
}

/// Seconds ≥ 0 (Integer or Float: the CLI's `--drain-delay 0` arrives as 0.0).
fn seconds_or_zero(ruby: &Ruby, key: &str, value: Value) -> Result<Duration, Error> {
    let zero = Integer::from_value(value).is_some_and(|i| i.to_i64().ok() == Some(0))
        || Float::from_value(value).is_some_and(|f| f.to_f64() == 0.0);
    if zero {
        return Ok(Duration::ZERO);
    }
    seconds(ruby, key, value).map_err(|_| {
        arg_error(
            ruby,
            format!("{key}: must be a number of seconds, 0 or more"),
        )
    })
}

fn control(ruby: &Ruby, value: Value) -> Result<ControlKeyword, Error> {
    let (mut listener, mut auth_token, mut handler) = (None, None, None);
    for_each_entry(ruby, "control", value, |name, v| {
        match name.as_str() {
            "listener" => listener = Some(v),
            "auth_token" if v.is_nil() => {}
            "auth_token" => auth_token = Some(string(ruby, "control: auth_token", v)?),
            "handler" if v.is_nil() => {}
            "handler" => {
                if !v.respond_to("call", false)? {
                    return Err(type_error(
                        ruby,
                        "control: handler",
                        "an object that responds to #call",
                        v,
                    ));
                }
                handler = Some(v)
            }
            other => {
                return Err(arg_error(
                    ruby,
                    format!(
                        "control: unknown key :{other} (known: :listener, :auth_token, :handler)"
                    ),
                ))
            }
        }
        Ok(())
    })?;
    let Some(listener) = listener.filter(|l| !l.is_nil()) else {
        return Err(arg_error(
            ruby,
            "control: :listener is missing (a TCPServer or UNIXServer for the control listener)"
                .into(),
        ));
    };
    if !listener.respond_to("fileno", false)? {
        return Err(type_error(
            ruby,
            "control: listener",
            LISTENER_EXPECTED,
            listener,
        ));
    }
    let fd: i32 = listener.funcall("fileno", ())?;
    // SAFETY: the fd belongs to the live Ruby socket `listener`, borrowed
    // for this call only.
    let borrowed = unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) };
    let is_unix = socket2::SockRef::from(&borrowed)
        .local_addr()
        .map(|address| address.is_unix())
        .unwrap_or(false);
    if !is_unix && auth_token.as_deref().map_or(true, str::is_empty) {
        return Err(arg_error(
            ruby,
            "control: a TCP control listener needs auth_token: (anyone who can connect could stop the server); or listen on a unix socket".into(),
        ));
    }
    Ok(ControlKeyword {
        listener,
        auth_token,
        handler,
    })
}
