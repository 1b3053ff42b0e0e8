//! Maps core errors to the exception classes defined in
//! `lib/hyperion/errors.rb`, and logs Ruby exceptions through tracing.

use magnus::error::ErrorType;
use magnus::prelude::*;
use magnus::value::Lazy;
use magnus::{Error, ExceptionClass, Module, RArray, Ruby, Value};

use crate::error::Error as CoreError;

fn exception_class(ruby: &Ruby, name: &str) -> ExceptionClass {
    ruby.get_inner(&super::keys::HYPERION)
        .const_get(name)
        .unwrap_or_else(|e| panic!("Hyperion::{name} is missing: {e}"))
}

pub(crate) static HYPERION_ERROR: Lazy<ExceptionClass> =
    Lazy::new(|ruby| exception_class(ruby, "Error"));
pub(crate) static BIND_ERROR: Lazy<ExceptionClass> =
    Lazy::new(|ruby| exception_class(ruby, "BindError"));
pub(crate) static TLS_ERROR: Lazy<ExceptionClass> =
    Lazy::new(|ruby| exception_class(ruby, "TLSError"));
pub(crate) static CLIENT_DISCONNECTED: Lazy<ExceptionClass> =
    Lazy::new(|ruby| exception_class(ruby, "ClientDisconnected"));

pub(crate) fn to_ruby(ruby: &Ruby, error: CoreError) -> Error {
    let class = if error.is_bind() {
        ruby.get_inner(&BIND_ERROR)
    } else if error.is_tls() {
        ruby.get_inner(&TLS_ERROR)
    } else {
        ruby.get_inner(&HYPERION_ERROR)
    };
    Error::new(class, error.to_string())
}

pub(crate) fn hyperion_error(
    ruby: &Ruby,
    message: impl Into<std::borrow::Cow<'static, str>>,
) -> Error {
    Error::new(ruby.get_inner(&HYPERION_ERROR), message)
}

/// "Class: message" and the backtrace, one frame per line.
pub(crate) fn describe(error: &Error) -> (String, String) {
    let Some(exception) = error.value() else {
        return (format!("{error}"), String::new());
    };
    let class = class_name(exception);
    let message: String = exception
        .funcall("message", ())
        .unwrap_or_else(|_| "(message raised)".to_owned());
    let backtrace = exception
        .funcall::<_, _, Option<RArray>>("backtrace", ())
        .ok()
        .flatten()
        .and_then(|frames| frames.to_vec::<String>().ok())
        .map(|frames| frames.join("\n\t"))
        .unwrap_or_default();
    (format!("{class}: {message}"), backtrace)
}

fn class_name(value: Value) -> String {
    value
        .class()
        .funcall::<_, _, Option<String>>("name", ())
        .ok()
        .flatten()
        .unwrap_or_else(|| "(anonymous class)".to_owned())
}

/// Whether `error` is a non-local exit (`Thread#kill`, process exit, `throw`
/// to a `catch` further up) rather than an exception: it must be passed on,
/// never logged and swallowed.
pub(crate) fn is_non_local_exit(error: &Error) -> bool {
    matches!(error.error_type(), ErrorType::Jump(_))
}

/// Logs an exception raised by application code (app, body, hook).
pub(crate) fn log_exception(context: &str, error: &Error) {
    let (summary, backtrace) = describe(error);
    tracing::error!("{context}: {summary}\n\t{backtrace}");
}

/// Name of a value's class, for messages about wrong types.
pub(crate) fn class_of(value: Value) -> String {
    class_name(value)
}
