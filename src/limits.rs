//! Request checks that hyper leaves to the server: size limits, Host and
//! Expect rules, transfer codings we do not decode. Pure functions over a
//! parsed head, so they are unit- and property-tested without sockets.

use http::header::{CONTENT_LENGTH, EXPECT, HOST, TRANSFER_ENCODING};
use http::request::Parts;
use http::{StatusCode, Version};

use crate::host::parse_host_and_port;

/// Size limits. Defaults follow Puma's parser (12 KiB target, 112 KiB of
/// headers) and nginx's header-count sense; the body limit is generous
/// because uploads go to a temp file, not memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Longest request target (path and query) in bytes → 414.
    pub max_uri_bytes: usize,
    /// Largest header section in bytes → 431 (enforced by hyper).
    pub max_header_bytes: usize,
    /// Most header lines → 431 (enforced by hyper).
    pub max_headers: usize,
    /// Largest request body in bytes → 413.
    pub max_body_bytes: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_uri_bytes: 12 * 1024,
            max_header_bytes: 112 * 1024,
            max_headers: 100,
            max_body_bytes: 1024 * 1024 * 1024,
        }
    }
}

/// Why a request is refused before the app sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rejection {
    pub status: StatusCode,
    pub reason: &'static str,
}

const fn reject(status: StatusCode, reason: &'static str) -> Result<(), Rejection> {
    Err(Rejection { status, reason })
}

/// Checks a parsed request head. `Ok` means the body may be read (hyper
/// sends `100 Continue` then, if the client asked for it).
pub fn check_head(head: &Parts, limits: &Limits) -> Result<(), Rejection> {
    let target_len = head.uri.path_and_query().map_or(0, |pq| pq.as_str().len())
        + head.uri.authority().map_or(0, |a| a.as_str().len());
    if target_len > limits.max_uri_bytes {
        return reject(StatusCode::URI_TOO_LONG, "request target too long");
    }
    let hosts = head.headers.get_all(HOST).iter().count();
    if hosts > 1 {
        return reject(StatusCode::BAD_REQUEST, "more than one Host header");
    }
    if hosts == 0 && head.version == Version::HTTP_11 {
        return reject(StatusCode::BAD_REQUEST, "HTTP/1.1 request without Host");
    }
    // An empty Host is what a client sends for a target without authority
    // (RFC 9112 §3.2); anything else must be `host[:port]`.
    if let Some(host) = head.headers.get(HOST) {
        if !host.is_empty() && parse_host_and_port(host.as_bytes()).is_none() {
            return reject(StatusCode::BAD_REQUEST, "malformed Host header");
        }
    }
    // The same grammar for an absolute-form target (or HTTP/2's :authority),
    // which also refuses userinfo (RFC 9110 §4.2.4).
    if let Some(authority) = head.uri.authority() {
        if parse_host_and_port(authority.as_str().as_bytes()).is_none() {
            return reject(StatusCode::BAD_REQUEST, "malformed authority in the target");
        }
    }
    let mut expectations = head.headers.get_all(EXPECT).iter();
    if let Some(expect) = expectations.next() {
        if !expect.as_bytes().eq_ignore_ascii_case(b"100-continue") || expectations.next().is_some()
        {
            return reject(StatusCode::EXPECTATION_FAILED, "unsupported expectation");
        }
    }
    if let Some(coding) = unsupported_transfer_coding(head) {
        return Err(coding);
    }
    let declared = head
        .headers
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|length| length > limits.max_body_bytes) {
        return reject(
            StatusCode::PAYLOAD_TOO_LARGE,
            "declared body larger than max_body_bytes",
        );
    }
    Ok(())
}

/// hyper decodes `chunked` and refuses (400) a request whose final coding is
/// not chunked, as RFC 9112 §6.3 requires. Chunked applied twice
/// (`chunked, chunked`, or two such lines) cannot be framed as the client
/// meant (RFC 9112 §6.1 forbids it): 400. Any other coding before the final
/// chunked (`gzip, chunked`) would reach the app still encoded: 501, as §6.1
/// advises for a coding the server does not understand.
fn unsupported_transfer_coding(head: &Parts) -> Option<Rejection> {
    let codings = head
        .headers
        .get_all(TRANSFER_ENCODING)
        .iter()
        .flat_map(|value| value.as_bytes().split(|&b| b == b','))
        .map(|coding| coding.trim_ascii())
        .filter(|coding| !coding.is_empty());
    let (mut chunked, mut other) = (0, 0);
    for coding in codings {
        if coding.eq_ignore_ascii_case(b"chunked") {
            chunked += 1;
        } else {
            other += 1;
        }
    }
    if chunked > 1 {
        return Some(Rejection {
            status: StatusCode::BAD_REQUEST,
            reason: "chunked transfer coding applied more than once",
        });
    }
    (other > 0).then_some(Rejection {
        status: StatusCode::NOT_IMPLEMENTED,
        reason: "transfer coding other than chunked",
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn head(raw: &[(&str, &str)], target: &str, version: Version) -> Parts {
        let mut builder = http::Request::builder().uri(target).version(version);
        for (name, value) in raw {
            builder = builder.header(*name, *value);
        }
        builder.body(()).unwrap().into_parts().0
    }

    fn status(raw: &[(&str, &str)]) -> Option<StatusCode> {
        check_head(&head(raw, "/", Version::HTTP_11), &Limits::default())
            .err()
            .map(|r| r.status)
    }

    #[test]
    fn host_rules() {
        assert_eq!(status(&[("host", "a")]), None);
        assert_eq!(status(&[]), Some(StatusCode::BAD_REQUEST));
        assert_eq!(
            status(&[("host", "a"), ("host", "b")]),
            Some(StatusCode::BAD_REQUEST)
        );
        let http10 = head(&[], "/", Version::HTTP_10);
        assert!(check_head(&http10, &Limits::default()).is_ok());
        assert_eq!(
            status(&[("host", "")]),
            None,
            "empty: a target without authority"
        );
        assert_eq!(status(&[("host", "[::1]:80")]), None);
        for bad in ["a b", "a/b", "a@b", "x:abc", "x:99999", "[::1"] {
            assert_eq!(
                status(&[("host", bad)]),
                Some(StatusCode::BAD_REQUEST),
                "{bad}"
            );
        }
        let userinfo = head(&[("host", "a")], "http://u@a/", Version::HTTP_11);
        assert_eq!(
            check_head(&userinfo, &Limits::default())
                .unwrap_err()
                .status,
            StatusCode::BAD_REQUEST
        );
        let absolute = head(&[("host", "other")], "http://a:81/", Version::HTTP_11);
        assert!(check_head(&absolute, &Limits::default()).is_ok());
    }

    #[test]
    fn expectations() {
        assert_eq!(status(&[("host", "a"), ("expect", "100-Continue")]), None);
        assert_eq!(
            status(&[("host", "a"), ("expect", "fries")]),
            Some(StatusCode::EXPECTATION_FAILED)
        );
    }

    #[test]
    fn body_and_target_limits() {
        let limits = Limits {
            max_uri_bytes: 10,
            max_body_bytes: 100,
            ..Limits::default()
        };
        let long = head(&[("host", "a")], "/0123456789", Version::HTTP_11);
        assert_eq!(
            check_head(&long, &limits).unwrap_err().status,
            StatusCode::URI_TOO_LONG
        );
        let big = head(
            &[("host", "a"), ("content-length", "101")],
            "/",
            Version::HTTP_11,
        );
        assert_eq!(
            check_head(&big, &limits).unwrap_err().status,
            StatusCode::PAYLOAD_TOO_LARGE
        );
        let fits = head(
            &[("host", "a"), ("content-length", "100")],
            "/",
            Version::HTTP_11,
        );
        assert!(check_head(&fits, &limits).is_ok());
    }

    #[test]
    fn transfer_codings() {
        assert_eq!(
            status(&[("host", "a"), ("transfer-encoding", "chunked")]),
            None
        );
        assert_eq!(
            status(&[("host", "a"), ("transfer-encoding", "gzip, chunked")]),
            Some(StatusCode::NOT_IMPLEMENTED)
        );
        assert_eq!(
            status(&[
                ("host", "a"),
                ("transfer-encoding", "foo"),
                ("transfer-encoding", "chunked")
            ]),
            Some(StatusCode::NOT_IMPLEMENTED)
        );
        assert_eq!(
            status(&[("host", "a"), ("transfer-encoding", "chunked, Chunked")]),
            Some(StatusCode::BAD_REQUEST)
        );
        assert_eq!(
            status(&[
                ("host", "a"),
                ("transfer-encoding", "chunked"),
                ("transfer-encoding", "chunked")
            ]),
            Some(StatusCode::BAD_REQUEST)
        );
    }

    proptest! {
        #[test]
        fn any_declared_length_over_the_limit_is_413(limit in 0u64..1_000_000, extra in 1u64..1_000_000) {
            let limits = Limits { max_body_bytes: limit, ..Limits::default() };
            let length = (limit + extra).to_string();
            let big = head(&[("host", "a"), ("content-length", &length)], "/", Version::HTTP_11);
            prop_assert_eq!(check_head(&big, &limits).unwrap_err().status, StatusCode::PAYLOAD_TOO_LARGE);
        }

        #[test]
        fn any_target_decides_by_length(path in "/[a-zA-Z0-9/._~%-]{0,200}", max in 1usize..150) {
            let limits = Limits { max_uri_bytes: max, ..Limits::default() };
            let parts = head(&[("host", "a")], &path, Version::HTTP_11);
            let rejected = check_head(&parts, &limits).is_err();
            prop_assert_eq!(rejected, path.len() > max);
        }

        #[test]
        fn codings_decide_by_how_often_chunked_appears(codings in proptest::collection::vec(
            prop_oneof![Just("chunked"), Just("CHUNKED"), Just("gzip"), Just("x-custom")], 1..6)
        ) {
            let value = codings.join(", ");
            let chunked = codings.iter().filter(|c| c.eq_ignore_ascii_case("chunked")).count();
            let expected = if chunked > 1 {
                Some(StatusCode::BAD_REQUEST)
            } else if chunked < codings.len() {
                Some(StatusCode::NOT_IMPLEMENTED)
            } else {
                None
            };
            prop_assert_eq!(status(&[("host", "a"), ("transfer-encoding", &value)]), expected);
        }

        #[test]
        fn any_host_value_is_checked_without_panicking(host in proptest::collection::vec(any::<u8>(), 0..40)) {
            if let Ok(value) = http::HeaderValue::from_bytes(&host) {
                let mut parts = head(&[], "/", Version::HTTP_11);
                parts.headers.insert(HOST, value);
                let refused = check_head(&parts, &Limits::default()).is_err();
                prop_assert_eq!(refused, !host.is_empty() && parse_host_and_port(&host).is_none());
            }
        }

        #[test]
        fn arbitrary_codings_never_panic(te in "[ -~]{0,40}") {
            if let Ok(value) = http::HeaderValue::from_str(&te) {
                let mut parts = head(&[("host", "a")], "/", Version::HTTP_11);
                parts.headers.insert(TRANSFER_ENCODING, value);
                let _ = check_head(&parts, &Limits::default());
            }
        }
    }
}
