//! Frozen, interned Ruby strings and objects reused by every request. `Lazy`
//! registers each with the GC as permanently live.

use magnus::prelude::*;
use magnus::value::Lazy;
use magnus::{RArray, RClass, RModule, RString, Ruby};

macro_rules! interned {
    ($($name:ident = $text:expr;)*) => {
        $(
            pub(crate) static $name: Lazy<RString> =
                Lazy::new(|ruby| ruby.str_new($text).to_interned_str().as_r_string());
        )*
    };
}

interned! {
    REQUEST_METHOD = "REQUEST_METHOD";
    SCRIPT_NAME = "SCRIPT_NAME";
    PATH_INFO = "PATH_INFO";
    QUERY_STRING = "QUERY_STRING";
    REQUEST_URI = "REQUEST_URI";
    REQUEST_PATH = "REQUEST_PATH";
    SERVER_NAME = "SERVER_NAME";
    SERVER_PORT = "SERVER_PORT";
    SERVER_PROTOCOL = "SERVER_PROTOCOL";
    SERVER_SOFTWARE = "SERVER_SOFTWARE";
    REMOTE_ADDR = "REMOTE_ADDR";
    CONTENT_TYPE = "CONTENT_TYPE";
    CONTENT_LENGTH = "CONTENT_LENGTH";
    RACK_VERSION = "rack.version";
    RACK_URL_SCHEME = "rack.url_scheme";
    RACK_INPUT = "rack.input";
    RACK_ERRORS = "rack.errors";
    RACK_MULTITHREAD = "rack.multithread";
    RACK_MULTIPROCESS = "rack.multiprocess";
    RACK_RUN_ONCE = "rack.run_once";
    RACK_HIJACK_P = "rack.hijack?";
    RACK_HIJACK = "rack.hijack";
    RACK_HIJACK_IO = "rack.hijack_io";
    RACK_AFTER_REPLY = "rack.after_reply";
    RACK_RESPONSE_FINISHED = "rack.response_finished";
    RACK_EARLY_HINTS = "rack.early_hints";
    HTTPS_KEY = "HTTPS";
    ON = "on";
    SSL_CLIENT_CERT = "SSL_CLIENT_CERT";
    HTTP_HOST = "HTTP_HOST";
    HTTP_USER_AGENT = "HTTP_USER_AGENT";
    HTTP_ACCEPT = "HTTP_ACCEPT";
    HTTP_ACCEPT_ENCODING = "HTTP_ACCEPT_ENCODING";
    HTTP_ACCEPT_LANGUAGE = "HTTP_ACCEPT_LANGUAGE";
    HTTP_CONNECTION = "HTTP_CONNECTION";
    HTTP_COOKIE = "HTTP_COOKIE";
    HTTP_VERSION_1_0 = "HTTP/1.0";
    HTTP_VERSION_1_1 = "HTTP/1.1";
    HTTP_VERSION_2 = "HTTP/2";
    EMPTY = "";
    HTTP = "http";
    HTTPS = "https";
    GET = "GET";
    POST = "POST";
    HEAD = "HEAD";
    SOFTWARE = concat!("hyperion ", env!("CARGO_PKG_VERSION"));
}

/// `[1, 3]`: Rack 3's env version, which Rack 2 apps accept too.
pub(crate) static RACK_VERSION_VALUE: Lazy<RArray> = Lazy::new(|ruby| {
    let version = ruby.ary_from_vec(vec![1i64, 3]);
    version.freeze();
    version
});

fn constant<T: magnus::TryConvert>(ruby: &Ruby, path: &str) -> T {
    // Presence is checked by `check_constants` when the extension loads, so a
    // missing constant here is a broken install, not a runtime condition.
    ruby.class_object()
        .funcall::<_, _, T>("const_get", (path,))
        .unwrap_or_else(|e| panic!("Ruby constant {path} is missing: {e}"))
}

pub(crate) static STRING_IO: Lazy<RClass> = Lazy::new(|ruby| constant(ruby, "StringIO"));
pub(crate) static HYPERION: Lazy<RModule> = Lazy::new(|ruby| constant(ruby, "Hyperion"));
pub(crate) static NULL_INPUT: Lazy<magnus::Value> =
    Lazy::new(|ruby| constant(ruby, "Hyperion::NULL_INPUT"));

/// Fails the extension load (instead of a later panic) if the Ruby side of the
/// gem did not define what the Rust side looks up.
pub(crate) fn check_constants(ruby: &Ruby) -> Result<(), magnus::Error> {
    for path in [
        "StringIO",
        "Hyperion::NULL_INPUT",
        "Hyperion::Config",
        "Hyperion::Error",
        "Hyperion::BindError",
        "Hyperion::TLSError",
        "Hyperion::ClientDisconnected",
        "TCPSocket",
        "UNIXSocket",
    ] {
        ruby.class_object()
            .funcall::<_, _, magnus::Value>("const_get", (path,))?;
    }
    Ok(())
}
