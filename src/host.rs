//! Ruby-free pieces of the Rack env: CGI names for request headers, and the
//! `host[:port]` parser that both validates Host (and a target's authority)
//! and yields SERVER_NAME / SERVER_PORT.

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

/// Parses `uri-host [ ":" port ]`, the form of a Host header and of a request
/// target's authority (RFC 9110 §4.2.1 and §7.2, RFC 3986 §3.2.2-3.2.3): a
/// reg-name (which covers IPv4 addresses) or a bracketed IPv6/IPvFuture
/// literal, then optionally ':' and a port of at most 65535 (`host:` means no
/// port). Returns the host as written (IPv6 keeps its brackets, as Rack
/// expects in SERVER_NAME) and the port. `None` for anything else: an empty
/// host, userinfo (`user@host`), a path, spaces, non-ASCII bytes, a bad port.
pub fn parse_host_and_port(value: &[u8]) -> Option<(&str, Option<u16>)> {
    let host_len = if value.first() == Some(&b'[') {
        let close = value.iter().position(|&b| b == b']')?;
        if !is_ip_literal(&value[1..close]) {
            return None;
        }
        close + 1
    } else {
        let end = value.iter().position(|&b| b == b':').unwrap_or(value.len());
        if !is_reg_name(&value[..end]) {
            return None;
        }
        end
    };
    let (host, rest) = value.split_at(host_len);
    let port = match rest {
        [] => None,
        [b':', digits @ ..] => parse_port(digits)?,
        _ => return None,
    };
    // Every byte accepted above is ASCII.
    Some((std::str::from_utf8(host).ok()?, port))
}

/// `*DIGIT` up to 65535; `Some(None)` for an empty port.
fn parse_port(digits: &[u8]) -> Option<Option<u16>> {
    if digits.is_empty() {
        return Some(None);
    }
    let mut port: u32 = 0;
    for &digit in digits {
        if !digit.is_ascii_digit() {
            return None;
        }
        port = port * 10 + u32::from(digit - b'0');
        if port > u32::from(u16::MAX) {
            return None;
        }
    }
    Some(Some(port as u16))
}

fn is_unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

fn is_sub_delim(b: u8) -> bool {
    matches!(
        b,
        b'!' | b'$' | b'&' | b'\'' | b'(' | b')' | b'*' | b'+' | b',' | b';' | b'='
    )
}

/// `reg-name = *( unreserved / pct-encoded / sub-delims )`, but not empty: an
/// http URI with an empty host is invalid (RFC 9110 §4.2.1).
fn is_reg_name(name: &[u8]) -> bool {
    let mut rest = name;
    while let Some((&b, tail)) = rest.split_first() {
        rest = match (b, tail) {
            (b'%', [high, low, after @ ..])
                if high.is_ascii_hexdigit() && low.is_ascii_hexdigit() =>
            {
                after
            }
            _ if is_unreserved(b) || is_sub_delim(b) => tail,
            _ => return false,
        };
    }
    !name.is_empty()
}

/// What goes between the brackets: an IPv6 address (std's parser follows
/// RFC 4291 §2.2), or `IPvFuture = "v" 1*HEXDIG "." 1*( unreserved /
/// sub-delims / ":" )`.
fn is_ip_literal(inner: &[u8]) -> bool {
    match inner {
        [b'v' | b'V', rest @ ..] => {
            let Some(dot) = rest.iter().position(|&b| b == b'.') else {
                return false;
            };
            let (version, address) = (&rest[..dot], &rest[dot + 1..]);
            !version.is_empty()
                && version.iter().all(u8::is_ascii_hexdigit)
                && !address.is_empty()
                && address
                    .iter()
                    .all(|&b| is_unreserved(b) || is_sub_delim(b) || b == b':')
        }
        _ => {
            std::str::from_utf8(inner).is_ok_and(|text| text.parse::<std::net::Ipv6Addr>().is_ok())
        }
    }
}

/// The authority a request is addressed to: the target's (absolute form, or
/// HTTP/2's `:authority`), which wins over Host (RFC 9112 §3.2.2), else the
/// Host header.
pub fn request_authority(head: &http::request::Parts) -> Option<&str> {
    match head.uri.authority() {
        Some(authority) => Some(authority.as_str()),
        None => head
            .headers
            .get(http::header::HOST)
            .and_then(|host| host.to_str().ok()),
    }
}

/// SERVER_NAME and SERVER_PORT for a request: from its authority (see
/// `request_authority`) when it is well formed, falling back to the address
/// the connection arrived on. An authority without a port means the scheme's
/// default port.
pub fn server_name_and_port(
    authority: Option<&str>,
    scheme_default_port: u16,
    local_name: &str,
    local_port: u16,
) -> (String, String) {
    match authority.and_then(|a| parse_host_and_port(a.as_bytes())) {
        Some((name, port)) => (
            name.to_owned(),
            port.unwrap_or(scheme_default_port).to_string(),
        ),
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

    fn parse(value: &str) -> Option<(&str, Option<u16>)> {
        parse_host_and_port(value.as_bytes())
    }

    #[test]
    fn hosts_and_ports() {
        assert_eq!(parse("example.com"), Some(("example.com", None)));
        assert_eq!(parse("example.com:8080"), Some(("example.com", Some(8080))));
        assert_eq!(parse("[::1]:9292"), Some(("[::1]", Some(9292))));
        assert_eq!(parse("[::1]"), Some(("[::1]", None)));
        assert_eq!(parse("[::ffff:1.2.3.4]"), Some(("[::ffff:1.2.3.4]", None)));
        assert_eq!(parse("[v7.fe:x]:1"), Some(("[v7.fe:x]", Some(1))));
        assert_eq!(parse("127.0.0.1:0"), Some(("127.0.0.1", Some(0))));
        assert_eq!(parse("x:65535"), Some(("x", Some(65535))));
        assert_eq!(parse("x:0080"), Some(("x", Some(80))));
        assert_eq!(
            parse("host:"),
            Some(("host", None)),
            "an empty port is no port"
        );
        assert_eq!(
            parse("a-b_c.~!$&'()*+,;=%4a"),
            Some(("a-b_c.~!$&'()*+,;=%4a", None))
        );
        for bad in [
            "",
            ":80",
            "::1",
            "x:12a",
            "x:65536",
            "x:99999",
            "x:1:2",
            "[::1",
            "[::1]x",
            "[::1]:x",
            "[]",
            "[1.2.3.4]",
            "[v.x]",
            "[v1.]",
            "[vz.x]",
            "[::1%25eth0]",
            "a b",
            "a/b",
            "a@b",
            "user@a:80",
            "a?b",
            "a#b",
            "a\\b",
            "a%4",
            "%zz",
            "a\tb",
            "h\u{e9}.example",
            "a]b",
            "[",
        ] {
            assert_eq!(parse(bad), None, "{bad:?} should be refused");
        }
    }

    #[test]
    fn the_targets_authority_wins_over_host() {
        let head = |target: &str, host: &str| {
            http::Request::get(target)
                .header("host", host)
                .body(())
                .unwrap()
                .into_parts()
                .0
        };
        assert_eq!(
            request_authority(&head("http://a.example:81/x", "other")),
            Some("a.example:81")
        );
        assert_eq!(request_authority(&head("/x", "other:82")), Some("other:82"));
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
            server_name_and_port(Some(""), 443, "[::1]", 9000),
            ("[::1]".into(), "9000".into())
        );
    }

    /// A reg-name built from the grammar: unreserved, sub-delims and
    /// pct-encoded pieces.
    fn reg_name() -> impl Strategy<Value = String> {
        let piece = prop_oneof!["[a-zA-Z0-9._~-]", "[!$&'()*+,;=]", "%[0-9a-fA-F]{2}",];
        proptest::collection::vec(piece, 1..20).prop_map(|pieces| pieces.concat())
    }

    /// Any well-formed host: a reg-name, an IPv4 or IPv6 address.
    fn host() -> impl Strategy<Value = String> {
        prop_oneof![
            reg_name(),
            any::<std::net::Ipv4Addr>().prop_map(|ip| ip.to_string()),
            any::<std::net::Ipv6Addr>().prop_map(|ip| format!("[{ip}]")),
        ]
    }

    proptest! {
        #[test]
        fn parsing_never_panics_and_returns_a_prefix(value in proptest::collection::vec(any::<u8>(), 0..40)) {
            if let Some((name, _port)) = parse_host_and_port(&value) {
                prop_assert!(!name.is_empty());
                prop_assert!(value.starts_with(name.as_bytes()));
                prop_assert!(name.is_ascii());
            }
        }

        #[test]
        fn every_grammatical_host_and_port_is_accepted(host in host(), port in proptest::option::of(any::<u16>())) {
            let value = match port {
                Some(port) => format!("{host}:{port}"),
                None => host.clone(),
            };
            prop_assert_eq!(parse(&value), Some((host.as_str(), port)));
        }

        #[test]
        fn a_byte_outside_the_grammar_is_refused(
            name in reg_name(),
            at in any::<proptest::sample::Index>(),
            bad in prop_oneof![
                Just(b' '), Just(b'/'), Just(b'@'), Just(b'?'), Just(b'#'), Just(b'['), Just(b']'),
                Just(b'\\'), Just(b'"'), Just(b'<'), Just(b'>'), Just(b'^'), Just(b'`'), Just(b'{'),
                Just(b'|'), Just(b'}'), 0u8..0x20, 0x7fu8..=0xff,
            ],
        ) {
            let mut value = name.into_bytes();
            value.insert(at.index(value.len() + 1), bad);
            prop_assert_eq!(parse_host_and_port(&value), None);
        }

        #[test]
        fn ports_above_65535_are_refused(name in reg_name(), port in 65_536u64..10_000_000_000) {
            let value = format!("{name}:{port}");
            prop_assert_eq!(parse(&value), None);
        }

        #[test]
        fn server_name_is_the_host_or_the_bound_address(s in "\\PC{0,40}", port in 0u16..) {
            let (name, port_text) = server_name_and_port(Some(&s), 80, "127.0.0.1", port);
            prop_assert!(!name.is_empty());
            prop_assert!(port_text.parse::<u16>().is_ok());
            prop_assert!(s.starts_with(&name) || name == "127.0.0.1");
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
