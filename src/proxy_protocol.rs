//! The PROXY protocol (HAProxy's; v1 is a text line, v2 binary): a load
//! balancer that forwards raw TCP (HAProxy `send-proxy`, nginx's stream
//! `proxy_protocol on`, AWS NLB) opens each connection with a header naming
//! the client, which becomes REMOTE_ADDR. When it is on, every connection must
//! open with a header of the configured version, before TLS and before HTTP;
//! one without is refused (closed): taking plain connections as well would
//! let any client that reaches the port directly pose as any address.
//!
//! The header is read without taking a byte past it, so what follows (a TLS
//! ClientHello, an HTTP/1 request, the HTTP/2 preface) stays on the socket for
//! the usual path: a v2 header states its length in its first 16 bytes; a v1
//! line ends at CRLF within 107 bytes, found by peeking (`MSG_PEEK`) at what
//! has arrived and then taking exactly the line. The framing is ours; the
//! header itself is decoded by the `ppp` crate.

use std::fmt;
use std::future::Future;
use std::io;
use std::net::IpAddr;
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt};
use tracing::{debug, warn};

/// Which header a connection must open with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Version {
    V1,
    V2,
}

impl Version {
    /// `"v1"` or `"v2"`, as the config and the command line spell it.
    pub fn from_name(name: &str) -> Option<Self> {
        match name {
            "v1" => Some(Self::V1),
            "v2" => Some(Self::V2),
            _ => None,
        }
    }
}

impl fmt::Display for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::V1 => "v1",
            Self::V2 => "v2",
        })
    }
}

/// The longest v1 header, CRLF included (the specification's bound).
pub const V1_MAX_BYTES: usize = 107;
const V1_PREFIX: &[u8] = b"PROXY ";
/// A v2 header's fixed part: signature, version and command, address family
/// and transport, and the length of the rest.
const V2_FIXED_BYTES: usize = 16;
const V2_SIGNATURE: &[u8; 12] = b"\r\n\r\n\0\r\nQUIT\n";

/// Why a connection was refused.
#[derive(Debug)]
pub enum Refusal {
    /// The client left (or the read failed) before a whole header arrived.
    Io(io::Error),
    /// The connection does not open with a header of this version.
    NotAHeader(Version),
    /// A v1 line with no CRLF within 107 bytes.
    TooLong,
    /// A header of the right version that does not decode.
    Malformed(String),
    /// No whole header within the read timeout.
    TimedOut,
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Io(e) => write!(f, "the connection ended before its PROXY header: {e}"),
            Self::NotAHeader(version) => {
                write!(
                    f,
                    "the connection does not open with a PROXY protocol {version} header"
                )
            }
            Self::TooLong => write!(f, "PROXY protocol v1 line longer than {V1_MAX_BYTES} bytes"),
            Self::Malformed(why) => write!(f, "malformed PROXY protocol header: {why}"),
            Self::TimedOut => write!(f, "no PROXY protocol header within the read timeout"),
        }
    }
}

impl From<io::Error> for Refusal {
    fn from(e: io::Error) -> Self {
        Self::Io(e)
    }
}

/// A socket whose arrived bytes can be looked at without taking them.
pub trait Peek {
    /// Copies bytes that have arrived into `buf` and leaves them on the
    /// socket; waits until at least one has. 0 means the peer closed.
    fn peek<'a>(&'a self, buf: &'a mut [u8])
        -> impl Future<Output = io::Result<usize>> + Send + 'a;
}

impl Peek for tokio::net::TcpStream {
    fn peek<'a>(
        &'a self,
        buf: &'a mut [u8],
    ) -> impl Future<Output = io::Result<usize>> + Send + 'a {
        tokio::net::TcpStream::peek(self, buf)
    }
}

impl Peek for tokio::net::UnixStream {
    // tokio has no peek for unix streams: recv(MSG_PEEK) when readable.
    async fn peek(&self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            self.readable().await?;
            let peeked = self.try_io(tokio::io::Interest::READABLE, || {
                nix::sys::socket::recv(self.as_raw_fd(), buf, nix::sys::socket::MsgFlags::MSG_PEEK)
                    .map_err(io::Error::from)
            });
            match peeked {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                other => return other,
            }
        }
    }
}

/// What the bytes seen so far say about a v1 header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum V1Framing {
    /// The header is the first this many bytes (CRLF included).
    Line(usize),
    /// So far a header's beginning; read on.
    NeedMore,
    NotAHeader,
    TooLong,
}

/// Frames a v1 header at the start of `seen`: `PROXY ` and then anything up
/// to the first CRLF, 107 bytes at most. The line's fields are ppp's to check.
pub fn frame_v1(seen: &[u8]) -> V1Framing {
    let prefix = seen.len().min(V1_PREFIX.len());
    if seen[..prefix] != V1_PREFIX[..prefix] {
        return V1Framing::NotAHeader;
    }
    let window = &seen[..seen.len().min(V1_MAX_BYTES)];
    match window.windows(2).position(|pair| pair == b"\r\n") {
        Some(cr) => V1Framing::Line(cr + 2),
        None if seen.len() >= V1_MAX_BYTES => V1Framing::TooLong,
        None => V1Framing::NeedMore,
    }
}

/// Takes a v1 line off `stream`, and nothing after it.
async fn read_v1<S>(stream: &mut S) -> Result<Vec<u8>, Refusal>
where
    S: Peek + AsyncRead + Unpin,
{
    let mut line = vec![0u8; V1_MAX_BYTES];
    // Bytes taken off the socket so far: all of them belong to the line.
    let mut taken = 0;
    loop {
        let arrived = stream.peek(&mut line[taken..]).await?;
        if arrived == 0 {
            return Err(io::Error::from(io::ErrorKind::UnexpectedEof).into());
        }
        match frame_v1(&line[..taken + arrived]) {
            V1Framing::Line(len) => {
                stream.read_exact(&mut line[taken..len]).await?;
                line.truncate(len);
                return Ok(line);
            }
            V1Framing::NeedMore => {
                // Take what was peeked, so the next peek waits for new bytes.
                stream.read_exact(&mut line[taken..taken + arrived]).await?;
                taken += arrived;
            }
            V1Framing::NotAHeader => return Err(Refusal::NotAHeader(Version::V1)),
            V1Framing::TooLong => return Err(Refusal::TooLong),
        }
    }
}

/// Takes a v2 header off `stream` into `header` (empty), and nothing after it.
async fn read_v2<S: AsyncRead + Unpin>(
    stream: &mut S,
    header: &mut Vec<u8>,
) -> Result<(), Refusal> {
    header.resize(V2_FIXED_BYTES, 0);
    stream.read_exact(header).await?;
    if header[..V2_SIGNATURE.len()] != V2_SIGNATURE[..] {
        return Err(Refusal::NotAHeader(Version::V2));
    }
    let rest = u16::from_be_bytes([header[14], header[15]]) as u64;
    // The buffer grows with what arrives: 16 bytes claiming 64 KiB to come
    // must not cost 64 KiB while the client waits out the read timeout.
    let read = (&mut *stream).take(rest).read_to_end(header).await?;
    if (read as u64) < rest {
        return Err(io::Error::from(io::ErrorKind::UnexpectedEof).into());
    }
    Ok(())
}

/// The client a whole header names. `None`: it names none, and the socket's
/// address stands: v1 `UNKNOWN`; v2 `LOCAL` (the proxy's own connection,
/// such as a health check) or an unspecified or unix address family.
pub fn decode(version: Version, header: &[u8]) -> Result<Option<IpAddr>, Refusal> {
    let malformed = |e: &dyn fmt::Display| Refusal::Malformed(e.to_string());
    match version {
        Version::V1 => {
            let parsed = ppp::v1::Header::try_from(header).map_err(|e| malformed(&e))?;
            if parsed.header.len() != header.len() {
                return Err(Refusal::Malformed("a CR inside the v1 line".into()));
            }
            Ok(match parsed.addresses {
                ppp::v1::Addresses::Tcp4(a) => Some(a.source_address.into()),
                ppp::v1::Addresses::Tcp6(a) => Some(a.source_address.into()),
                ppp::v1::Addresses::Unknown => None,
            })
        }
        Version::V2 => {
            let parsed = ppp::v2::Header::try_from(header).map_err(|e| malformed(&e))?;
            if parsed.header.len() != header.len() {
                return Err(Refusal::Malformed("length mismatch".into()));
            }
            if parsed.command == ppp::v2::Command::Local {
                return Ok(None);
            }
            Ok(match parsed.addresses {
                ppp::v2::Addresses::IPv4(a) => Some(a.source_address.into()),
                ppp::v2::Addresses::IPv6(a) => Some(a.source_address.into()),
                ppp::v2::Addresses::Unspecified | ppp::v2::Addresses::Unix(_) => None,
            })
        }
    }
}

/// Reads and decodes the header that must open the connection, leaving
/// every byte after it on `stream`.
pub async fn read_header<S>(stream: &mut S, version: Version) -> Result<Option<IpAddr>, Refusal>
where
    S: Peek + AsyncRead + Unpin,
{
    let header = match version {
        Version::V1 => read_v1(stream).await?,
        Version::V2 => {
            let mut header = Vec::new();
            read_v2(stream, &mut header).await?;
            header
        }
    };
    decode(version, &header)
}

/// With the PROXY protocol on (`version`), reads the connection's header
/// within `within` and sets `remote_addr` to the client it names. False: the
/// connection is refused (the reason is logged) and must be closed.
pub async fn take_header<S>(
    stream: &mut S,
    version: Option<Version>,
    within: Duration,
    remote_addr: &mut Arc<str>,
) -> bool
where
    S: Peek + AsyncRead + Unpin,
{
    let Some(version) = version else {
        return true;
    };
    let read = tokio::time::timeout(within, read_header(stream, version))
        .await
        .unwrap_or(Err(Refusal::TimedOut));
    match read {
        Ok(Some(client)) => *remote_addr = Arc::from(client.to_string()),
        Ok(None) => {}
        // Port scanners and silent clients: not worth a warning each.
        Err(refusal @ (Refusal::Io(_) | Refusal::TimedOut)) => {
            debug!(peer = %remote_addr, "connection refused: {refusal}");
            return false;
        }
        Err(refusal) => {
            warn!(peer = %remote_addr, "connection refused: {refusal} (PROXY protocol {version} is on)");
            return false;
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::FutureExt;
    use proptest::prelude::*;
    use std::collections::VecDeque;
    use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
    use std::pin::Pin;
    use std::sync::Mutex;
    use std::task::{Context, Poll};

    /// A socket stand-in whose bytes arrive in the given chunks: a peek or a
    /// read sees only what has arrived; the next chunk arrives once every
    /// arrived byte was read. Never pending, so futures finish at once.
    struct Arrivals(Mutex<(Vec<u8>, VecDeque<Vec<u8>>)>);

    impl Arrivals {
        fn new(chunks: Vec<Vec<u8>>) -> Self {
            Self(Mutex::new((Vec::new(), chunks.into())))
        }

        /// Copies (and with `take`, removes) arrived bytes into `buf`.
        fn deliver(&self, buf: &mut [u8], take: bool) -> usize {
            let mut state = self.0.lock().unwrap();
            let (arrived, pending) = &mut *state;
            while arrived.is_empty() {
                match pending.pop_front() {
                    Some(chunk) => *arrived = chunk,
                    None => return 0,
                }
            }
            let n = buf.len().min(arrived.len());
            buf[..n].copy_from_slice(&arrived[..n]);
            if take {
                arrived.drain(..n);
            }
            n
        }

        /// Every byte not yet read.
        fn unread(&self) -> Vec<u8> {
            let state = self.0.lock().unwrap();
            let mut rest = state.0.clone();
            state
                .1
                .iter()
                .for_each(|chunk| rest.extend_from_slice(chunk));
            rest
        }
    }

    impl Peek for Arrivals {
        fn peek<'a>(
            &'a self,
            buf: &'a mut [u8],
        ) -> impl Future<Output = io::Result<usize>> + Send + 'a {
            std::future::ready(Ok(self.deliver(buf, false)))
        }
    }

    impl AsyncRead for Arrivals {
        fn poll_read(
            self: Pin<&mut Self>,
            _cx: &mut Context<'_>,
            buf: &mut tokio::io::ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            let n = self.deliver(buf.initialize_unfilled(), true);
            buf.advance(n);
            Poll::Ready(Ok(()))
        }
    }

    /// Splits `bytes` at the `cuts` (positions taken modulo its length).
    fn chunked(bytes: &[u8], cuts: &[usize]) -> Vec<Vec<u8>> {
        let mut at: Vec<usize> = cuts
            .iter()
            .map(|c| c % (bytes.len() + 1))
            .chain([0, bytes.len()])
            .collect();
        at.sort_unstable();
        at.dedup();
        at.windows(2).map(|w| bytes[w[0]..w[1]].to_vec()).collect()
    }

    fn read_all_at_once(
        version: Version,
        chunks: Vec<Vec<u8>>,
    ) -> (Result<Option<IpAddr>, Refusal>, Vec<u8>) {
        let mut stream = Arrivals::new(chunks);
        let result = read_header(&mut stream, version)
            .now_or_never()
            .expect("the stand-in socket never waits");
        (result, stream.unread())
    }

    fn v2_header(command: ppp::v2::Command, client: SocketAddr, server: SocketAddr) -> Vec<u8> {
        let addresses: ppp::v2::Addresses = match (client, server) {
            (SocketAddr::V4(c), SocketAddr::V4(s)) => {
                ppp::v2::IPv4::new(*c.ip(), *s.ip(), c.port(), s.port()).into()
            }
            (SocketAddr::V6(c), SocketAddr::V6(s)) => {
                ppp::v2::IPv6::new(*c.ip(), *s.ip(), c.port(), s.port()).into()
            }
            _ => unreachable!("one family per header"),
        };
        ppp::v2::Builder::with_addresses(
            ppp::v2::Version::Two | command,
            ppp::v2::Protocol::Stream,
            addresses,
        )
        .write_tlv(ppp::v2::Type::Authority, b"example.com")
        .unwrap()
        .build()
        .unwrap()
    }

    #[test]
    fn v1_framing() {
        use V1Framing::*;
        assert_eq!(frame_v1(b"PRO"), NeedMore);
        assert_eq!(frame_v1(b"PROXY TCP4 1.2.3.4"), NeedMore);
        assert_eq!(frame_v1(b"PROXY UNKNOWN\r\nGET"), Line(15));
        assert_eq!(frame_v1(b"GET / HTTP/1.1\r\n"), NotAHeader);
        assert_eq!(frame_v1(b"PROXX"), NotAHeader);
        let mut long = b"PROXY UNKNOWN ".to_vec();
        long.resize(V1_MAX_BYTES, b'x');
        assert_eq!(frame_v1(&long), TooLong);
        // 107 bytes with CRLF at the very end is the longest allowed line.
        long[V1_MAX_BYTES - 2..].copy_from_slice(b"\r\n");
        assert_eq!(frame_v1(&long), Line(V1_MAX_BYTES));
    }

    #[test]
    fn v1_headers_name_the_client_and_leave_the_rest_on_the_socket() {
        let cases: [(&[u8], Option<IpAddr>); 3] = [
            (
                b"PROXY TCP4 203.0.113.7 10.0.0.1 51234 443\r\n",
                Some(Ipv4Addr::new(203, 0, 113, 7).into()),
            ),
            (
                b"PROXY TCP6 2001:db8::7 2001:db8::1 51234 443\r\n",
                Some("2001:db8::7".parse::<Ipv6Addr>().unwrap().into()),
            ),
            (b"PROXY UNKNOWN\r\n", None),
        ];
        for (header, client) in cases {
            let stream = [header, b"\x16\x03\x01 TLS or HTTP after it"].concat();
            // One byte at a time: the line is found across many peeks.
            let chunks = stream.iter().map(|b| vec![*b]).collect();
            let (result, rest) = read_all_at_once(Version::V1, chunks);
            assert_eq!(result.unwrap(), client);
            assert_eq!(rest, b"\x16\x03\x01 TLS or HTTP after it");
        }
    }

    #[test]
    fn v2_headers_name_the_client_and_local_keeps_the_socket_address() {
        let client: SocketAddr = "198.51.100.9:40000".parse().unwrap();
        let server: SocketAddr = "10.0.0.1:443".parse().unwrap();
        let proxy = v2_header(ppp::v2::Command::Proxy, client, server);
        let (result, rest) = read_all_at_once(Version::V2, vec![[&proxy[..], b"GET /"].concat()]);
        assert_eq!(result.unwrap(), Some(client.ip()));
        assert_eq!(rest, b"GET /");

        let local = v2_header(ppp::v2::Command::Local, client, server);
        let (result, rest) = read_all_at_once(Version::V2, vec![local, b"GET /".to_vec()]);
        assert_eq!(result.unwrap(), None);
        assert_eq!(rest, b"GET /");
    }

    #[test]
    fn connections_without_a_valid_header_of_the_version_are_refused() {
        let refused = |version, bytes: &[u8]| {
            let (result, _) = read_all_at_once(version, vec![bytes.to_vec()]);
            result.expect_err("should be refused")
        };
        let request = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n";
        assert!(matches!(
            refused(Version::V1, request),
            Refusal::NotAHeader(Version::V1)
        ));
        assert!(matches!(
            refused(Version::V2, request),
            Refusal::NotAHeader(Version::V2)
        ));
        let v1 = b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r\n";
        assert!(matches!(refused(Version::V2, v1), Refusal::NotAHeader(_)));
        let client: SocketAddr = "1.2.3.4:1".parse().unwrap();
        let v2 = v2_header(ppp::v2::Command::Proxy, client, client);
        assert!(matches!(refused(Version::V1, &v2), Refusal::NotAHeader(_)));
        for bad in [
            &b"PROXY TCP4 1.2.3.400 5.6.7.8 1 2\r\n"[..],
            b"PROXY TCP4 2001:db8::1 5.6.7.8 1 2\r\n",
            b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 3\r\n",
            b"PROXY TCP4  1.2.3.4 5.6.7.8 1 2\r\n",
            b"PROXY TCP5 1.2.3.4 5.6.7.8 1 2\r\n",
            b"PROXY TCP4 1.2.3.4 5.6.7.8 1\r2\r\n",
        ] {
            let refusal = refused(Version::V1, bad);
            assert!(matches!(refusal, Refusal::Malformed(_)), "{refusal:?}");
        }
        let mut long = b"PROXY UNKNOWN ".to_vec();
        long.resize(200, b'x');
        assert!(matches!(refused(Version::V1, &long), Refusal::TooLong));
        // The client leaves mid-header.
        let half = &v2[..20];
        assert!(matches!(refused(Version::V2, half), Refusal::Io(_)));
        assert!(matches!(
            refused(Version::V1, b"PROXY TCP4 1.2"),
            Refusal::Io(_)
        ));
    }

    #[test]
    fn a_v2_header_s_buffer_grows_with_what_arrives_not_with_what_it_claims() {
        let mut claim = V2_SIGNATURE.to_vec();
        claim.extend([0x21, 0x11, 0xff, 0xff]);
        let mut stream = Arrivals::new(vec![claim, vec![0; 12]]);
        let mut header = Vec::new();
        let read = read_v2(&mut stream, &mut header).now_or_never().unwrap();
        assert!(matches!(read, Err(Refusal::Io(_))), "{read:?}");
        assert_eq!(header.len(), V2_FIXED_BYTES + 12);
        assert!(
            header.capacity() < 1024,
            "{} bytes reserved for 28 received",
            header.capacity()
        );
    }

    #[tokio::test]
    async fn a_real_socket_keeps_the_bytes_after_the_header_and_a_silent_one_times_out() {
        use tokio::io::AsyncWriteExt;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut client = tokio::net::TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (mut server, _) = listener.accept().await.unwrap();
        client.write_all(b"PROXY TCP4 192.0.2.1 ").await.unwrap();
        let reading = tokio::spawn(async move {
            let mut remote: Arc<str> = Arc::from("127.0.0.1");
            let ok = take_header(
                &mut server,
                Some(Version::V1),
                Duration::from_secs(10),
                &mut remote,
            )
            .await;
            let mut rest = [0u8; 5];
            server.read_exact(&mut rest).await.unwrap();
            (ok, remote, rest)
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        client
            .write_all(b"192.0.2.2 1000 80\r\nGET /")
            .await
            .unwrap();
        let (ok, remote, rest) = reading.await.unwrap();
        assert!(ok);
        assert_eq!(&*remote, "192.0.2.1");
        assert_eq!(&rest, b"GET /");

        let (a, b) = tokio::net::UnixStream::pair().unwrap();
        let mut b = b;
        let mut remote: Arc<str> = Arc::from("127.0.0.1");
        let ok = take_header(
            &mut b,
            Some(Version::V1),
            Duration::from_millis(50),
            &mut remote,
        )
        .await;
        assert!(!ok, "nothing arrived: refused once the wait is over");
        assert_eq!(&*remote, "127.0.0.1");
        drop(a);
    }

    #[tokio::test]
    async fn unix_sockets_are_peeked_too() {
        use tokio::io::AsyncWriteExt;
        let (mut client, mut server) = tokio::net::UnixStream::pair().unwrap();
        client
            .write_all(b"PROXY TCP6 ::1 ::2 5 6\r\nrest")
            .await
            .unwrap();
        let mut remote: Arc<str> = Arc::from("127.0.0.1");
        assert!(
            take_header(
                &mut server,
                Some(Version::V1),
                Duration::from_secs(10),
                &mut remote
            )
            .await
        );
        assert_eq!(&*remote, "::1");
        let mut rest = [0u8; 4];
        server.read_exact(&mut rest).await.unwrap();
        assert_eq!(&rest, b"rest");
    }

    fn socket_pair() -> impl Strategy<Value = (SocketAddr, SocketAddr)> {
        prop_oneof![
            (
                any::<[u8; 4]>(),
                any::<[u8; 4]>(),
                any::<u16>(),
                any::<u16>()
            )
                .prop_map(|(c, s, cp, sp)| (
                    (Ipv4Addr::from(c), cp).into(),
                    (Ipv4Addr::from(s), sp).into()
                )),
            (
                any::<[u8; 16]>(),
                any::<[u8; 16]>(),
                any::<u16>(),
                any::<u16>()
            )
                .prop_map(|(c, s, cp, sp)| (
                    (Ipv6Addr::from(c), cp).into(),
                    (Ipv6Addr::from(s), sp).into()
                )),
        ]
    }

    proptest! {
        #[test]
        fn framing_never_panics_and_a_line_ends_at_the_first_crlf_within_107_bytes(
            seen in proptest::collection::vec(any::<u8>(), 0..200),
        ) {
            match frame_v1(&seen) {
                V1Framing::Line(len) => {
                    prop_assert!(len <= V1_MAX_BYTES && seen.starts_with(b"PROXY "));
                    prop_assert_eq!(&seen[len - 2..len], b"\r\n");
                    prop_assert!(!seen[..len - 1].windows(2).any(|w| w == b"\r\n"));
                }
                V1Framing::NeedMore => prop_assert!(seen.len() < V1_MAX_BYTES),
                V1Framing::TooLong => prop_assert!(seen.len() >= V1_MAX_BYTES),
                V1Framing::NotAHeader => {
                    let n = seen.len().min(V1_PREFIX.len());
                    prop_assert_ne!(&seen[..n], &V1_PREFIX[..n]);
                }
            }
        }

        #[test]
        fn any_split_of_a_v1_header_yields_its_client_and_keeps_every_later_byte(
            (client, server) in socket_pair(),
            after in proptest::collection::vec(any::<u8>(), 0..64),
            cuts in proptest::collection::vec(any::<usize>(), 0..8),
        ) {
            let family = if client.is_ipv4() { "TCP4" } else { "TCP6" };
            let header = format!("PROXY {family} {} {} {} {}\r\n", client.ip(), server.ip(), client.port(), server.port());
            let stream = [header.as_bytes(), &after].concat();
            let (result, rest) = read_all_at_once(Version::V1, chunked(&stream, &cuts));
            prop_assert_eq!(result.unwrap(), Some(client.ip()));
            prop_assert_eq!(rest, after);
        }

        #[test]
        fn any_split_of_a_v2_header_yields_its_client_and_keeps_every_later_byte(
            (client, server) in socket_pair(),
            local in any::<bool>(),
            after in proptest::collection::vec(any::<u8>(), 0..64),
            cuts in proptest::collection::vec(any::<usize>(), 0..8),
        ) {
            let command = if local { ppp::v2::Command::Local } else { ppp::v2::Command::Proxy };
            let stream = [v2_header(command, client, server), after.clone()].concat();
            let (result, rest) = read_all_at_once(Version::V2, chunked(&stream, &cuts));
            prop_assert_eq!(result.unwrap(), (!local).then(|| client.ip()));
            prop_assert_eq!(rest, after);
        }

        #[test]
        fn any_v2_header_of_a_consistent_length_decodes_or_is_refused_without_panic(
            command in any::<u8>(),
            family in any::<u8>(),
            body in proptest::collection::vec(any::<u8>(), 0..300),
            after in proptest::collection::vec(any::<u8>(), 0..16),
        ) {
            let mut header = V2_SIGNATURE.to_vec();
            header.extend([command, family]);
            header.extend((body.len() as u16).to_be_bytes());
            header.extend(&body);
            let (result, rest) = read_all_at_once(Version::V2, vec![[&header[..], &after].concat()]);
            prop_assert_eq!(rest, after, "exactly the header is taken, valid or not");
            if let Ok(Some(client)) = result {
                prop_assert_eq!(command, 0x21);
                prop_assert!(matches!((family >> 4, client), (1, IpAddr::V4(_)) | (2, IpAddr::V6(_))));
            }
        }

        #[test]
        fn arbitrary_bytes_never_panic_and_v1_never_takes_more_than_107_bytes(
            v1 in any::<bool>(),
            prefix in prop_oneof![Just(b"PROXY ".to_vec()), Just(V2_SIGNATURE.to_vec()), Just(Vec::new())],
            bytes in proptest::collection::vec(any::<u8>(), 0..300),
            cuts in proptest::collection::vec(any::<usize>(), 0..8),
        ) {
            let stream = [prefix, bytes].concat();
            let version = if v1 { Version::V1 } else { Version::V2 };
            let (result, rest) = read_all_at_once(version, chunked(&stream, &cuts));
            let taken = stream.len() - rest.len();
            prop_assert_eq!(&stream[taken..], &rest[..]);
            if v1 {
                prop_assert!(taken <= V1_MAX_BYTES);
            }
            if result.is_ok() && v1 {
                prop_assert_eq!(&stream[taken - 2..taken], b"\r\n");
            }
        }
    }
}
