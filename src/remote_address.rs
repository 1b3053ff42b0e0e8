//! Where REMOTE_ADDR comes from, as Puma's `set_remote_address` chooses: the
//! socket's peer (the default), a fixed value, the first address of a request
//! header that a trusted proxy sets, or the PROXY protocol header that opens
//! each connection (`proxy_protocol`).

use std::sync::Arc;

use http::{HeaderMap, HeaderName};

use crate::proxy_protocol;

/// What Puma reports when the header is missing or empty.
const LOCALHOST: &str = "127.0.0.1";

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum RemoteAddress {
    /// The socket's peer ("127.0.0.1" for unix sockets, as Puma).
    #[default]
    Socket,
    /// The same value for every request (`:localhost`, or any String).
    Fixed(Arc<str>),
    /// The first address in this request header. Only safe behind a proxy
    /// that overwrites the header: a client can send any value.
    Header(HeaderName),
    /// From the PROXY protocol header of each connection.
    ProxyProtocol(proxy_protocol::Version),
}

impl RemoteAddress {
    /// The header name for `Header`, from Puma's spelling: any case, and
    /// `_` taken as `-` (Puma maps both to the same env key).
    pub fn header(name: &str) -> Result<Self, String> {
        let name = name.replace('_', "-");
        HeaderName::from_bytes(name.as_bytes())
            .map(Self::Header)
            .map_err(|_| format!("{name:?} is not a header name"))
    }

    /// Which PROXY protocol header connections must open with, if any.
    pub fn proxy_protocol(&self) -> Option<proxy_protocol::Version> {
        match self {
            Self::ProxyProtocol(version) => Some(*version),
            _ => None,
        }
    }

    /// REMOTE_ADDR for one request; `peer` is the connection's address (its
    /// socket's, or its PROXY header's).
    pub fn for_request(&self, headers: &HeaderMap, peer: &Arc<str>) -> Arc<str> {
        match self {
            Self::Socket | Self::ProxyProtocol(_) => peer.clone(),
            Self::Fixed(value) => value.clone(),
            Self::Header(name) => {
                let value = headers.get(name).map_or(&b""[..], |v| v.as_bytes());
                match first_address(value) {
                    Some(address) => Arc::from(String::from_utf8_lossy(address)),
                    None => Arc::from(LOCALHOST),
                }
            }
        }
    }
}

/// Puma's rule for the header's value: its first word, as separated by
/// whitespace or commas (`X-Forwarded-For: client, proxy1` → `client`).
/// `None` when that word is empty.
pub fn first_address(value: &[u8]) -> Option<&[u8]> {
    // Ruby's /[\s,]/: space, \t, \n, \v, \f, \r and the comma.
    let separator = |b: &u8| matches!(b, b' ' | b'\t' | b'\n' | 0x0b | 0x0c | b'\r' | b',');
    let end = value.iter().position(separator).unwrap_or(value.len());
    (end > 0).then(|| &value[..end])
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.append(
                HeaderName::from_bytes(name.as_bytes()).unwrap(),
                value.parse().unwrap(),
            );
        }
        map
    }

    #[test]
    fn the_header_gives_its_first_address_as_puma_does() {
        let peer: Arc<str> = Arc::from("10.0.0.1");
        let xff = RemoteAddress::header("X-Forwarded-For").unwrap();
        let of = |pairs: &[(&str, &str)]| xff.for_request(&headers(pairs), &peer);
        assert_eq!(&*of(&[("x-forwarded-for", "203.0.113.7")]), "203.0.113.7");
        assert_eq!(
            &*of(&[("x-forwarded-for", "203.0.113.7, 10.0.0.2")]),
            "203.0.113.7"
        );
        assert_eq!(&*of(&[("x-forwarded-for", "2001:db8::1 x")]), "2001:db8::1");
        // Repeated lines: the first line's first address.
        assert_eq!(
            &*of(&[
                ("x-forwarded-for", "1.1.1.1"),
                ("x-forwarded-for", "2.2.2.2")
            ]),
            "1.1.1.1"
        );
        // Missing or empty: 127.0.0.1, not the socket's peer (Puma's choice).
        assert_eq!(&*of(&[]), "127.0.0.1");
        assert_eq!(&*of(&[("x-forwarded-for", ", 1.1.1.1")]), "127.0.0.1");
        // Another header does not count.
        assert_eq!(&*of(&[("x-real-ip", "9.9.9.9")]), "127.0.0.1");
    }

    #[test]
    fn header_names_are_taken_in_puma_s_spellings() {
        assert_eq!(
            RemoteAddress::header("X_Real_IP").unwrap(),
            RemoteAddress::header("x-real-ip").unwrap()
        );
        assert!(RemoteAddress::header("X Real IP").is_err());
        assert!(RemoteAddress::header("").is_err());
    }

    #[test]
    fn socket_fixed_and_proxy_protocol() {
        let peer: Arc<str> = Arc::from("10.0.0.1");
        let with_header = headers(&[("x-real-ip", "9.9.9.9")]);
        assert_eq!(
            &*RemoteAddress::Socket.for_request(&with_header, &peer),
            "10.0.0.1"
        );
        let fixed = RemoteAddress::Fixed(Arc::from("127.0.0.1"));
        assert_eq!(&*fixed.for_request(&with_header, &peer), "127.0.0.1");
        let proxied = RemoteAddress::ProxyProtocol(proxy_protocol::Version::V2);
        assert_eq!(&*proxied.for_request(&with_header, &peer), "10.0.0.1");
        assert_eq!(proxied.proxy_protocol(), Some(proxy_protocol::Version::V2));
        assert_eq!(RemoteAddress::Socket.proxy_protocol(), None);
    }

    proptest! {
        #[test]
        fn the_first_address_is_the_longest_separator_free_prefix(
            value in proptest::collection::vec(any::<u8>(), 0..40),
        ) {
            let is_separator = |b: &u8| b" \t\n\x0b\x0c\r,".contains(b);
            match first_address(&value) {
                Some(address) => {
                    prop_assert!(value.starts_with(address) && !address.is_empty());
                    prop_assert!(!address.iter().any(is_separator));
                    prop_assert!(value.get(address.len()).map_or(true, is_separator));
                }
                None => prop_assert!(value.first().map_or(true, is_separator)),
            }
        }
    }
}
