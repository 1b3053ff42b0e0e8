//! The `remote_address:` and `proxy_protocol:` keywords of `Worker.new` (see
//! `crate::remote_address`). `remote_address:` takes the argument of the
//! config file's `set_remote_address` as it is; `proxy_protocol: :v1` is
//! short for `remote_address: { proxy_protocol: :v1 }`.

use std::sync::Arc;

use magnus::prelude::*;
use magnus::{Error, RHash, RString, Ruby, Symbol, Value};

use super::errors::class_of;
use crate::proxy_protocol::Version;
use crate::remote_address::RemoteAddress;

const FORMS: &str =
    ":socket, :localhost, a String, { header: \"X-Real-IP\" } or { proxy_protocol: :v1 or :v2 }";

fn arg_error(ruby: &Ruby, message: String) -> Error {
    Error::new(ruby.exception_arg_error(), message)
}

/// Removes both keywords from `keywords` (the rest are limits) and returns
/// the setting they make together.
pub(crate) fn take_keywords(ruby: &Ruby, keywords: RHash) -> Result<RemoteAddress, Error> {
    let given: Value = keywords.delete(ruby.to_symbol("remote_address"))?;
    let remote_address = if given.is_nil() {
        RemoteAddress::Socket
    } else {
        remote_address(ruby, given)?
    };
    let given: Value = keywords.delete(ruby.to_symbol("proxy_protocol"))?;
    if given.is_nil() || given.is_kind_of(ruby.class_false_class()) {
        return Ok(remote_address);
    }
    let version = version(ruby, "proxy_protocol", given)?;
    match remote_address {
        RemoteAddress::Socket => Ok(RemoteAddress::ProxyProtocol(version)),
        RemoteAddress::ProxyProtocol(same) if same == version => Ok(remote_address),
        _ => Err(arg_error(
            ruby,
            "proxy_protocol: given together with another remote_address:; give one of them".into(),
        )),
    }
}

fn remote_address(ruby: &Ruby, value: Value) -> Result<RemoteAddress, Error> {
    if let Some(symbol) = Symbol::from_value(value) {
        return match &*symbol.name()? {
            "socket" => Ok(RemoteAddress::Socket),
            "localhost" => Ok(RemoteAddress::Fixed(Arc::from("127.0.0.1"))),
            other => Err(arg_error(
                ruby,
                format!("remote_address: expected {FORMS}, got :{other}"),
            )),
        };
    }
    if let Some(string) = RString::from_value(value) {
        let fixed = string.to_string()?;
        if fixed.is_empty() {
            return Err(arg_error(
                ruby,
                "remote_address: the String is empty; give the value REMOTE_ADDR should have"
                    .into(),
            ));
        }
        return Ok(RemoteAddress::Fixed(Arc::from(fixed)));
    }
    let Some(hash) = RHash::from_value(value) else {
        return Err(Error::new(
            ruby.exception_type_error(),
            format!("remote_address: expected {FORMS}, got {}", class_of(value)),
        ));
    };
    if hash.len() != 1 {
        return Err(arg_error(
            ruby,
            format!(
                "remote_address: give one of header: or proxy_protocol:, got {} keys",
                hash.len()
            ),
        ));
    }
    let mut setting = None;
    hash.foreach(|key: Value, value: Value| {
        let key = match Symbol::from_value(key) {
            Some(symbol) => symbol.name()?.into_owned(),
            None => key.to_r_string()?.to_string()?,
        };
        setting = Some(match key.as_str() {
            "header" => {
                let name = RString::from_value(value).ok_or_else(|| {
                    Error::new(
                        ruby.exception_type_error(),
                        format!(
                            "remote_address: header: expected a String, got {}",
                            class_of(value)
                        ),
                    )
                })?;
                RemoteAddress::header(&name.to_string()?)
                    .map_err(|why| arg_error(ruby, format!("remote_address: header: {why}")))?
            }
            "proxy_protocol" => RemoteAddress::ProxyProtocol(version(
                ruby,
                "remote_address: proxy_protocol",
                value,
            )?),
            other => {
                return Err(arg_error(
                    ruby,
                    format!(
                        "remote_address: unknown key :{other} (use header: or proxy_protocol:)"
                    ),
                ))
            }
        });
        Ok(magnus::r_hash::ForEach::Continue)
    })?;
    Ok(setting.unwrap_or_default())
}

/// `:v1`, `:v2`, or the same as a String, in any case (as Puma reads it).
fn version(ruby: &Ruby, key: &str, value: Value) -> Result<Version, Error> {
    let name = if let Some(symbol) = Symbol::from_value(value) {
        symbol.name()?.into_owned()
    } else if let Some(string) = RString::from_value(value) {
        string.to_string()?
    } else {
        return Err(Error::new(
            ruby.exception_type_error(),
            format!("{key}: expected :v1 or :v2, got {}", class_of(value)),
        ));
    };
    Version::from_name(&name.to_ascii_lowercase())
        .ok_or_else(|| arg_error(ruby, format!("{key}: expected :v1 or :v2, got {name:?}")))
}
