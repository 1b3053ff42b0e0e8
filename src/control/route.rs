//! Who may ask the control listener what, and what a request asks for.
//!
//! The token is Puma's: `?token=T` in the query (what `pumactl` sends), or
//! `Authorization: Bearer T` (what a Prometheus scrape config sends). A wrong
//! or missing token is refused with 403 on every endpoint but `/ready`, which
//! answers without one: it tells a load balancer one bit (send traffic or
//! not), and health checkers such as HAProxy's `option httpchk GET /ready`
//! cannot always send a secret. A *wrong* token is refused there too, so a
//! misconfigured checker is noticed. Without a token at all the listener is
//! open, which the configuration allows only on a unix socket (its file
//! permissions guard it).

/// What a control request asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    Stats,
    Metrics,
    Ready,
    Restart,
    PhasedRestart,
    Stop,
    Halt,
    GcStats,
    ThreadBacktraces,
}

impl Endpoint {
    const ALL: [Endpoint; 9] = [
        Endpoint::Stats,
        Endpoint::Metrics,
        Endpoint::Ready,
        Endpoint::Restart,
        Endpoint::PhasedRestart,
        Endpoint::Stop,
        Endpoint::Halt,
        Endpoint::GcStats,
        Endpoint::ThreadBacktraces,
    ];

    /// The path's name, as Puma spells it (and `hyperionctl` takes it).
    pub fn name(self) -> &'static str {
        match self {
            Endpoint::Stats => "stats",
            Endpoint::Metrics => "metrics",
            Endpoint::Ready => "ready",
            Endpoint::Restart => "restart",
            Endpoint::PhasedRestart => "phased-restart",
            Endpoint::Stop => "stop",
            Endpoint::Halt => "halt",
            Endpoint::GcStats => "gc-stats",
            Endpoint::ThreadBacktraces => "thread-backtraces",
        }
    }

    /// Endpoints answered by Ruby code (a command, or Ruby's own state).
    pub fn needs_ruby(self) -> bool {
        !matches!(self, Endpoint::Stats | Endpoint::Metrics | Endpoint::Ready)
    }

    fn from_path(path: &str) -> Option<Endpoint> {
        let name = path.strip_prefix('/')?;
        Endpoint::ALL.into_iter().find(|e| e.name() == name)
    }
}

/// Why a control request is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// 403: wrong or missing token.
    Forbidden,
    /// 404: no such endpoint.
    NotFound,
    /// 405: only GET, HEAD and POST are answered.
    MethodNotAllowed,
    /// 400: not an HTTP request head.
    BadRequest,
}

impl Refusal {
    pub fn status(self) -> u16 {
        match self {
            Refusal::Forbidden => 403,
            Refusal::NotFound => 404,
            Refusal::MethodNotAllowed => 405,
            Refusal::BadRequest => 400,
        }
    }

    /// Puma's bodies for 403 and 404.
    pub fn body(self) -> &'static str {
        match self {
            Refusal::Forbidden => "Invalid auth token",
            Refusal::NotFound => "Unsupported action",
            Refusal::MethodNotAllowed => "Use GET",
            Refusal::BadRequest => "Bad request",
        }
    }
}

/// The control listener's token; `None`: no token (a unix socket only).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Auth {
    token: Option<Vec<u8>>,
}

impl Auth {
    pub fn new(token: Option<&str>) -> Self {
        Self {
            token: token.map(|t| t.as_bytes().to_vec()),
        }
    }
}

/// Decides a request: its method, its target's path and query, and its
/// `Authorization` header.
pub fn route(
    method: &str,
    path: &str,
    query: Option<&str>,
    authorization: Option<&[u8]>,
    auth: &Auth,
) -> Result<Endpoint, Refusal> {
    let endpoint = Endpoint::from_path(path);
    if let Some(expected) = &auth.token {
        let presented = presented_token(query, authorization);
        let allowed = match presented {
            Some(token) => constant_time_eq(&token, expected),
            None => endpoint == Some(Endpoint::Ready),
        };
        if !allowed {
            return Err(Refusal::Forbidden);
        }
    }
    if !matches!(method, "GET" | "HEAD" | "POST") {
        return Err(Refusal::MethodNotAllowed);
    }
    endpoint.ok_or(Refusal::NotFound)
}

/// A request head of the cluster master's control listener, parsed with
/// httparse and decided by `route`. `Ok(None)`: the head is not complete.
pub fn parse_head(head: &[u8], auth: &Auth) -> Result<Option<Endpoint>, Refusal> {
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut request = httparse::Request::new(&mut headers);
    match request.parse(head) {
        Ok(httparse::Status::Complete(_)) => {}
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(_) => return Err(Refusal::BadRequest),
    }
    let (Some(method), Some(target)) = (request.method, request.path) else {
        return Err(Refusal::BadRequest);
    };
    let (path, query) = match target.split_once('?') {
        Some((path, query)) => (path, Some(query)),
        None => (target, None),
    };
    let authorization = request
        .headers
        .iter()
        .find(|h| h.name.eq_ignore_ascii_case("authorization"))
        .map(|h| h.value);
    route(method, path, query, authorization, auth).map(Some)
}

/// The token a request presents: `token=` in the query (percent-decoded), or
/// a bearer token.
fn presented_token(query: Option<&str>, authorization: Option<&[u8]>) -> Option<Vec<u8>> {
    let from_query = query.and_then(|query| {
        query
            .split('&')
            .find_map(|pair| pair.strip_prefix("token="))
            .map(percent_decode)
    });
    from_query.or_else(|| {
        let value = authorization?;
        let scheme_end = value.iter().position(|&b| b == b' ')?;
        let (scheme, token) = value.split_at(scheme_end);
        scheme
            .eq_ignore_ascii_case(b"bearer")
            .then(|| token.trim_ascii().to_vec())
    })
}

/// `%XX` to bytes and `+` to a space, as in a form-encoded query; a `%` not
/// followed by two hex digits stays as it is.
fn percent_decode(text: &str) -> Vec<u8> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        match bytes[i] {
            b'%' if i + 2 < bytes.len() => match (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                (Some(high), Some(low)) => {
                    out.push((high * 16 + low) as u8);
                    i += 3;
                    continue;
                }
                _ => out.push(b'%'),
            },
            b'+' => out.push(b' '),
            b => out.push(b),
        }
        i += 1;
    }
    out
}

/// Compares without stopping at the first difference, so the time taken
/// does not tell an attacker how much of a guess was right.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn with_token() -> Auth {
        Auth::new(Some("s3cret"))
    }

    #[test]
    fn the_token_comes_from_the_query_or_a_bearer_header() {
        let auth = with_token();
        assert_eq!(
            route("GET", "/stats", Some("token=s3cret"), None, &auth),
            Ok(Endpoint::Stats)
        );
        assert_eq!(
            route("GET", "/metrics", Some("a=1&token=s3cret"), None, &auth),
            Ok(Endpoint::Metrics)
        );
        assert_eq!(
            route("GET", "/metrics", None, Some(b"Bearer s3cret"), &auth),
            Ok(Endpoint::Metrics)
        );
        assert_eq!(
            route("GET", "/stats", Some("token=s3cre"), None, &auth),
            Err(Refusal::Forbidden)
        );
        assert_eq!(
            route("GET", "/stats", None, None, &auth),
            Err(Refusal::Forbidden)
        );
        assert_eq!(
            route("GET", "/stats", None, Some(b"Basic s3cret"), &auth),
            Err(Refusal::Forbidden)
        );
        assert_eq!(
            route("GET", "/nope", None, None, &auth),
            Err(Refusal::Forbidden),
            "nothing is told without the token, not even what exists"
        );
        assert_eq!(
            route("GET", "/nope", Some("token=s3cret"), None, &auth),
            Err(Refusal::NotFound)
        );
    }

    #[test]
    fn ready_needs_no_token_but_refuses_a_wrong_one() {
        let auth = with_token();
        assert_eq!(
            route("GET", "/ready", None, None, &auth),
            Ok(Endpoint::Ready)
        );
        assert_eq!(
            route("GET", "/ready", Some("token=wrong"), None, &auth),
            Err(Refusal::Forbidden)
        );
    }

    #[test]
    fn without_a_token_everything_is_open() {
        let open = Auth::new(None);
        assert_eq!(route("GET", "/halt", None, None, &open), Ok(Endpoint::Halt));
        assert_eq!(
            route("DELETE", "/halt", None, None, &open),
            Err(Refusal::MethodNotAllowed)
        );
    }

    #[test]
    fn heads_as_pumactl_and_haproxy_send_them() {
        let auth = with_token();
        assert_eq!(
            parse_head(b"GET /phased-restart?token=s3cret HTTP/1.0\r\n\r\n", &auth),
            Ok(Some(Endpoint::PhasedRestart))
        );
        assert_eq!(
            parse_head(b"GET /ready HTTP/1.0\r\n\r\n", &auth),
            Ok(Some(Endpoint::Ready))
        );
        assert_eq!(
            parse_head(
                b"GET /stats HTTP/1.1\r\nHost: x\r\nauthorization: bearer s3cret\r\n\r\n",
                &auth
            ),
            Ok(Some(Endpoint::Stats))
        );
        assert_eq!(parse_head(b"GET /stats HTTP/1.1\r\nHo", &auth), Ok(None));
        assert_eq!(
            parse_head(b"\x16\x03\x01garbage\r\n\r\n", &auth),
            Err(Refusal::BadRequest)
        );
    }

    #[test]
    fn percent_encoded_tokens() {
        let auth = Auth::new(Some("a/b+c=="));
        assert_eq!(
            route("GET", "/stats", Some("token=a%2Fb%2Bc%3D%3D"), None, &auth),
            Ok(Endpoint::Stats)
        );
        assert_eq!(percent_decode("100%"), b"100%");
        assert_eq!(percent_decode("%4"), b"%4");
        assert_eq!(percent_decode("%zz%41"), b"%zzA");
    }

    proptest! {
        /// Any token, percent-encoded into the query, is accepted; any other
        /// value is refused; nothing panics on any head.
        #[test]
        fn tokens_round_trip_and_only_the_right_one_passes(
            token in proptest::collection::vec(any::<u8>(), 1..40),
            other in proptest::collection::vec(any::<u8>(), 0..40),
        ) {
            let text = String::from_utf8_lossy(&token).into_owned();
            let auth = Auth::new(Some(&text));
            let encoded: String = text.bytes().map(|b| format!("%{b:02X}")).collect();
            let query = format!("x=1&token={encoded}");
            prop_assert_eq!(route("GET", "/stats", Some(&query), None, &auth), Ok(Endpoint::Stats));
            let other_text = String::from_utf8_lossy(&other).into_owned();
            if other_text != text {
                let encoded: String = other_text.bytes().map(|b| format!("%{b:02X}")).collect();
                let query = format!("token={encoded}");
                prop_assert_eq!(route("GET", "/stats", Some(&query), None, &auth), Err(Refusal::Forbidden));
            }
        }

        #[test]
        fn any_head_is_decided_without_panicking(head in proptest::collection::vec(any::<u8>(), 0..300)) {
            let _ = parse_head(&head, &with_token());
            let _ = parse_head(&head, &Auth::new(None));
        }

        #[test]
        fn any_query_is_decided_without_panicking(query in ".*", header in proptest::collection::vec(any::<u8>(), 0..60)) {
            let _ = route("GET", "/stats", Some(&query), Some(&header), &with_token());
        }
    }
}
