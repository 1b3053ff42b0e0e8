//! Ruby-free pieces of the Rack env: CGI names for request headers and
//! SERVER_NAME / SERVER_PORT from the Host header.

/// How a request header appears in the Rack env.
#[derive(Debug, PartialEq, Eq)]
pub enum EnvHeaderKey {
    ContentType,
    ContentLength,
    /// `HTTP_` + upper-cased name with '-' turned into '_'.
    Http(String),
    /// Not passed to the app: a name containing '_' would alias the dashed
    /// header in env (`X_Forwarded_For` posing as `X-Forwarded-For`), so it is
    /// dropped, as nginx does by default.
    Dropped,
}

/// Maps a header name (as hyper stores it: lower-case token) to its env key.
pub fn env_header_key(name: &str) -> EnvHeaderKey {
    if name.eq_ignore_ascii_case("content-type") {
        return EnvHeaderKey::ContentType;
    }
    if name.eq_ignore_ascii_case("content-length") {
        return EnvHeaderKey::ContentLength;
    }
    if name.contains('_') {
        return EnvHeaderKey::Dropped;
    }
    let mut key = String::with_capacity(5 + name.len());
    key.push_str("HTTP_");
    key.extend(name.chars().map(|c| match c {
        '-' => '_',
        c => c.to_ascii_uppercase(),
    }));
    EnvHeaderKey::Http(key)
}

/// Splits an authority (`host`, `host:port`, `[v6]`, `[v6]:port`) into the
/// name and the port digits. IPv6 literals keep their brackets, as Rack
/// expects in SERVER_NAME. Returns `None` for a malformed authority.
pub fn split_authority(authority: &str) -> Option<(&str, Option<&str>)> {
    if authority.is_empty() {
        return None;
    }
    let (name, rest) = if authority.starts_with('[') {
        let close = authority.find(']')?;
        authority.split_at(close + 1)
    } else {
        match authority.rfind(':') {
            Some(colon) => authority.split_at(colon),
            None => (authority, ""),
        }
    };
    if name.is_empty() || (!name.starts_with('[') && name.contains(':')) {
        return None;
    }
    let port = match rest {
        "" => None,
        _ => {
            let digits = rest.strip_prefix(':')?;
            if digits.is_empty() || digits.len() > 5 || !digits.bytes().all(|b| b.is_ascii_digit())
            {
                return None;
            }
            Some(digits)
        }
    };
    Some((name, port))
}

/// SERVER_NAME and SERVER_PORT for a request: from the Host header (or the
/// absolute-form target's authority) when it is well formed, falling back to
/// the address the connection arrived on. A Host without a port means the
/// scheme's default port.
pub fn server_name_and_port(
    authority: Option<&str>,
    scheme_default_port: u16,
    local_name: &str,
    local_port: u16,
) -> (String, String) {
    match authority.and_then(split_authority) {
        Some((name, Some(port))) => (name.to_owned(), port.to_owned()),
        Some((name, None)) => (name.to_owned(), scheme_default_port.to_string()),
        None => (local_name.to_owned(), local_port.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn header_keys() {
        assert_eq!(env_header_key("content-type"), EnvHeaderKey::ContentType);
        assert_eq!(
            env_header_key("content-length"),
            EnvHeaderKey::ContentLength
        );
        assert_eq!(
            env_header_key("x-forwarded-for"),
            EnvHeaderKey::Http("HTTP_X_FORWARDED_FOR".into())
        );
        assert_eq!(env_header_key("x_forwarded_for"), EnvHeaderKey::Dropped);
        assert_eq!(
            env_header_key("host"),
            EnvHeaderKey::Http("HTTP_HOST".into())
        );
    }

    #[test]
    fn authorities() {
        assert_eq!(split_authority("example.com"), Some(("example.com", None)));
        assert_eq!(
            split_authority("example.com:8080"),
            Some(("example.com", Some("8080")))
        );
        assert_eq!(split_authority("[::1]:9292"), Some(("[::1]", Some("9292"))));
        assert_eq!(split_authority("[::1]"), Some(("[::1]", None)));
        assert_eq!(split_authority("::1"), None);
        assert_eq!(split_authority("host:"), None);
        assert_eq!(split_authority("host:12a"), None);
        assert_eq!(split_authority("[::1]x"), None);
        assert_eq!(split_authority(":80"), None);
        assert_eq!(split_authority(""), None);
    }

    #[test]
    fn server_name_falls_back_to_the_bound_address() {
        assert_eq!(
            server_name_and_port(Some("a.test"), 80, "127.0.0.1", 9000),
            ("a.test".into(), "80".into())
        );
        assert_eq!(
            server_name_and_port(Some("a.test:81"), 80, "127.0.0.1", 9000),
            ("a.test".into(), "81".into())
        );
        assert_eq!(
            server_name_and_port(None, 80, "127.0.0.1", 9000),
            ("127.0.0.1".into(), "9000".into())
        );
        assert_eq!(
            server_name_and_port(Some("bad:port"), 80, "[::1]", 9000),
            ("[::1]".into(), "9000".into())
        );
    }

    proptest! {
        #[test]
        fn split_never_panics_and_ports_are_digits(s in "\\PC{0,40}") {
            if let Some((name, port)) = split_authority(&s) {
                prop_assert!(!name.is_empty());
                if let Some(port) = port {
                    prop_assert!(port.bytes().all(|b| b.is_ascii_digit()));
                }
            }
        }

        #[test]
        fn server_name_is_the_host_or_the_bound_address(s in "\\PC{0,40}", port in 0u16..) {
            let (name, port_text) = server_name_and_port(Some(&s), 80, "127.0.0.1", port);
            prop_assert!(!name.is_empty());
            prop_assert!(port_text.parse::<u32>().is_ok());
            prop_assert!(s.starts_with(&name) || name == "127.0.0.1");
        }

        #[test]
        fn host_port_round_trips(name in "[a-z][a-z0-9.-]{0,30}", port in 0u16..) {
            let authority = format!("{name}:{port}");
            let port_text = port.to_string();
            prop_assert_eq!(split_authority(&authority), Some((name.as_str(), Some(port_text.as_str()))));
        }

        #[test]
        fn env_keys_are_cgi_safe(name in "[a-zA-Z0-9!#$%&'*+.^_`|~-]{1,40}") {
            match env_header_key(&name) {
                EnvHeaderKey::Http(key) => {
                    prop_assert!(key.starts_with("HTTP_"));
                    prop_assert!(!key.contains('-'));
                    prop_assert!(!name.contains('_'));
                }
                EnvHeaderKey::Dropped => prop_assert!(name.contains('_')),
                _ => {}
            }
        }
    }
}
