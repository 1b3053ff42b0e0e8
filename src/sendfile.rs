//! A file sent with sendfile(2) on a plain HTTP/1.x connection.
//!
//! A `to_path` body the app framed as the whole file (`file_body::FileBody`)
//! would otherwise be read into 128 KiB buffers and written by hyper. On a
//! plain TCP or Unix socket the kernel can move it from the page cache to the
//! socket itself: the request takes its connection over from hyper
//! (`takeover`), and `SendFile` writes the head as hyper would have written
//! it, then the file with sendfile(2), on the connection's own task, waiting
//! for writability through tokio. Then hyper serves the connection again
//! (`AfterTakeover::Resume`, the bytes it had read past the request first),
//! or it is closed, as hyper would have decided from the request's and the
//! response's `Connection` fields.
//!
//! Under TLS and HTTP/2 the bytes must go through the protocol, so the read
//! loop stays. Files under `SENDFILE_MIN` stay on hyper's path too: a
//! takeover ends hyper's session and starts a new one, a fixed cost that a
//! small copy does not repay (at 64 KiB the server's CPU per response
//! measured about the same both ways, on a shared 2-core machine).
//!
//! Everything hyper's path does per response happens here too: the exchange
//! (stats, access log) records the status and the body bytes sent; a
//! `WrittenNotice` fires once the last byte is in the socket; a client that
//! accepts nothing for `write_timeout` is dropped; a file that shrinks while
//! it is sent ends the connection (never a short body that looks complete).

use std::future::poll_fn;
use std::io;
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::header::{CONNECTION, CONTENT_LENGTH, DATE, TRAILER, TRANSFER_ENCODING};
use http::{HeaderMap, HeaderValue, Method, Response, StatusCode, Version};
use nix::sys::socket::MsgFlags;
use tokio::io::AsyncWriteExt;

use crate::exchange::Exchange;
use crate::file_body::FileBody;
use crate::response::ResponseBody;
use crate::stats::StatsPage;
use crate::takeover::{AfterTakeover, ConnectionStream, JobFuture, Taken, TakeoverJob};
use crate::written::WrittenNotice;

/// Files smaller than this stay on hyper's path (see the module docs).
pub const SENDFILE_MIN: u64 = 64 * 1024;

/// Whether hyper keeps the connection alive after answering a request with
/// this version and these header fields, before the response has a say
/// (hyper's own rule: HTTP/1.1 unless `close`; HTTP/1.0 only with
/// `keep-alive`; never after a request framed by both Transfer-Encoding and
/// Content-Length).
pub fn request_keeps_alive(version: Version, headers: &HeaderMap) -> bool {
    let mut keep_alive = version == Version::HTTP_11;
    for value in headers.get_all(CONNECTION) {
        if has_token(value, "close") {
            return false;
        }
        keep_alive = keep_alive || has_token(value, "keep-alive");
    }
    keep_alive && !(headers.contains_key(TRANSFER_ENCODING) && headers.contains_key(CONTENT_LENGTH))
}

/// Whether a request's answer may go out with sendfile: a method whose
/// response carries its body as framed (not HEAD, not CONNECT), and a
/// request body already read whole (none of it left on the socket, where the
/// next session would take it for a request).
pub fn request_allows(method: &Method, body_read_whole: bool) -> bool {
    body_read_whole && method != Method::HEAD && method != Method::CONNECT
}

/// The file of a response that goes out with sendfile: a to_path body of
/// at least `SENDFILE_MIN` bytes, with a head hyper would frame by its
/// length alone (no Transfer-Encoding or Trailer field from the app, no
/// status without a body).
pub fn wants_sendfile(response: &Response<ResponseBody>) -> bool {
    let ResponseBody::File(file) = response.body() else {
        return false;
    };
    let status = response.status();
    let headers = response.headers();
    file.remaining() >= SENDFILE_MIN
        && !status.is_informational()
        && status != StatusCode::NO_CONTENT
        && status != StatusCode::NOT_MODIFIED
        && !headers.contains_key(TRANSFER_ENCODING)
        && !headers.contains_key(TRAILER)
}

fn has_token(value: &HeaderValue, token: &str) -> bool {
    value.to_str().is_ok_and(|text| {
        text.split(',')
            .any(|item| item.trim().eq_ignore_ascii_case(token))
    })
}

/// A response head as hyper writes it for a body of `length` bytes to a
/// request of `version` (keeping alive per `request_keep_alive`), and
/// whether the connection stays open after it. As hyper: the status line
/// has the request's version and the canonical reason; fields come in the
/// app's order, lowercase, one line per value, except `connection`, whose
/// values share one line; `connection: close` is added when HTTP/1.1 closes
/// and `connection: keep-alive` when HTTP/1.0 stays open; the app's
/// `content-length` (checked equal to the file's) is written once where the
/// app put it, or one is added; then `date`, unless the app gave one.
pub fn file_response_head(
    version: Version,
    status: StatusCode,
    headers: &HeaderMap,
    length: u64,
    request_keep_alive: bool,
) -> (Bytes, bool) {
    let connection = headers.get_all(CONNECTION);
    let response_closes = connection.iter().any(|v| has_token(v, "close"));
    let keep_alive = request_keep_alive && !response_closes;
    let mut added_connection = None;
    if version == Version::HTTP_10 {
        if keep_alive && !connection.iter().any(|v| has_token(v, "keep-alive")) {
            added_connection = Some("keep-alive");
        }
    } else if !keep_alive && !response_closes {
        added_connection = Some("close");
    }

    let mut out = BytesMut::with_capacity(128 + headers.len() * 32);
    crate::takeover::status_line(&mut out, version, status);
    let mut line = |name: &str, values: &mut dyn Iterator<Item = &[u8]>| {
        out.extend_from_slice(name.as_bytes());
        out.extend_from_slice(b": ");
        for (i, value) in values.enumerate() {
            if i > 0 {
                out.extend_from_slice(b", ");
            }
            out.extend_from_slice(value);
        }
        out.extend_from_slice(b"\r\n");
    };
    for name in headers.keys() {
        let values = headers.get_all(name).iter().map(HeaderValue::as_bytes);
        if name == CONNECTION {
            let added = added_connection.take().map(str::as_bytes);
            line(name.as_str(), &mut values.chain(added));
        } else if name == CONTENT_LENGTH {
            line(name.as_str(), &mut values.take(1));
        } else {
            for value in values {
                line(name.as_str(), &mut std::iter::once(value));
            }
        }
    }
    if let Some(added) = added_connection {
        line("connection", &mut std::iter::once(added.as_bytes()));
    }
    if !headers.contains_key(CONTENT_LENGTH) {
        let length = length.to_string();
        line("content-length", &mut std::iter::once(length.as_bytes()));
    }
    if !headers.contains_key(DATE) {
        let date = crate::http2::http_date();
        line("date", &mut std::iter::once(date.as_bytes()));
    }
    out.extend_from_slice(b"\r\n");
    (out.freeze(), keep_alive)
}

/// The takeover job that writes a response whose body is a file (see the
/// module docs).
pub struct SendFile {
    version: Version,
    request_keep_alive: bool,
    response: Response<ResponseBody>,
    exchange: Exchange,
    stats: Arc<StatsPage>,
}

impl SendFile {
    /// `response` must have a `ResponseBody::File` body (`wants_sendfile`);
    /// `exchange` has recorded its status.
    pub fn new(
        version: Version,
        request_keep_alive: bool,
        response: Response<ResponseBody>,
        exchange: Exchange,
        stats: Arc<StatsPage>,
    ) -> Box<Self> {
        Box::new(Self {
            version,
            request_keep_alive,
            response,
            exchange,
            stats,
        })
    }

    /// The response and exchange back, for hyper to send after all (the
    /// connection could not be taken over).
    pub fn into_parts(self) -> (Response<ResponseBody>, Exchange) {
        (self.response, self.exchange)
    }
}

impl TakeoverJob for SendFile {
    fn run(self: Box<Self>, taken: Taken) -> JobFuture {
        Box::pin(self.send(taken))
    }
}

impl SendFile {
    async fn send(self, mut taken: Taken) -> AfterTakeover {
        let SendFile {
            version,
            request_keep_alive,
            response,
            mut exchange,
            stats,
        } = self;
        let (mut parts, body) = response.into_parts();
        let ResponseBody::File(mut file) = body else {
            tracing::error!("a sendfile job without a file; connection closed");
            return AfterTakeover::Released;
        };
        let written = parts.extensions.remove::<WrittenNotice>();
        let (head, keep_alive) = file_response_head(
            version,
            parts.status,
            &parts.headers,
            file.remaining(),
            request_keep_alive,
        );
        stats.sendfile_started();
        let sent = write_response(&mut taken, &head, &mut file, |n| {
            exchange.sent(n);
            stats.sendfile_sent(n);
        })
        .await;
        if let Err(e) = sent {
            // Dropping the stream closes the connection: the client sees a
            // broken response, never a short one. The notice goes unfired.
            tracing::debug!(error = %e, "sending a file failed; connection closed");
            return AfterTakeover::Released;
        }
        if let Some(written) = written {
            written.fire();
        }
        drop(exchange);
        if keep_alive {
            return AfterTakeover::Resume(taken);
        }
        // As hyper closes: FIN after the response, within write_timeout.
        let _ = tokio::time::timeout(taken.write_timeout, taken.stream.shutdown()).await;
        AfterTakeover::Released
    }
}

/// Writes `head`, then the file, to the connection; `sent` learns each
/// step of body bytes written. Each wait for the client is bounded by the
/// connection's `write_timeout`.
async fn write_response(
    taken: &mut Taken,
    head: &[u8],
    file: &mut FileBody,
    mut sent: impl FnMut(usize) + Send,
) -> io::Result<()> {
    let write_timeout = taken.write_timeout;
    let stream = &mut taken.stream;
    if stream.socket().is_none() {
        // Not a plain socket after all: the bytes go through the stream.
        within(write_timeout, stream.write_all(head)).await?;
        while let Some(chunk) = file.next_chunk()? {
            within(write_timeout, stream.write_all(&chunk)).await?;
            sent(chunk.len());
        }
        return within(write_timeout, stream.flush()).await;
    }
    let mut at = 0;
    while at < head.len() {
        // MSG_MORE: the head leaves in one packet with the file's first bytes.
        let flags = MsgFlags::from_bits_retain(nix::libc::MSG_MORE) | MsgFlags::MSG_NOSIGNAL;
        at += write_socket(stream, write_timeout, |socket| {
            nix::sys::socket::send(socket.as_raw_fd(), &head[at..], flags).map_err(io::Error::from)
        })
        .await?;
    }
    while file.remaining() > 0 {
        let n = write_socket(stream, write_timeout, |socket| file.sendfile_to(socket)).await?;
        sent(n);
    }
    Ok(())
}

/// One write of `write`'s to the plain socket, waiting at most
/// `write_timeout` for the client to make room.
async fn write_socket(
    stream: &mut Box<dyn ConnectionStream>,
    write_timeout: Duration,
    mut write: impl FnMut(std::os::fd::BorrowedFd<'_>) -> io::Result<usize> + Send,
) -> io::Result<usize> {
    within(
        write_timeout,
        poll_fn(move |cx| stream.poll_write_socket(cx, &mut write)),
    )
    .await
}

async fn within<T>(
    limit: Duration,
    writing: impl std::future::Future<Output = io::Result<T>>,
) -> io::Result<T> {
    tokio::time::timeout(limit, writing)
        .await
        .unwrap_or_else(|_| {
            Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "the client accepted no response bytes within write_timeout",
            ))
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use tokio::io::AsyncReadExt;

    fn fields(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.append(*name, HeaderValue::from_static(value));
        }
        map
    }

    #[test]
    fn requests_keep_alive_by_hypers_rules() {
        let keeps = |version, pairs: &[(&'static str, &'static str)]| {
            request_keeps_alive(version, &fields(pairs))
        };
        assert!(keeps(Version::HTTP_11, &[]));
        assert!(!keeps(Version::HTTP_11, &[("connection", "Close")]));
        assert!(!keeps(
            Version::HTTP_11,
            &[("connection", "upgrade, close")]
        ));
        assert!(
            !keeps(
                Version::HTTP_11,
                &[("connection", "close"), ("connection", "keep-alive")]
            ),
            "a later keep-alive does not undo close"
        );
        assert!(!keeps(Version::HTTP_10, &[]));
        assert!(keeps(Version::HTTP_10, &[("connection", "Keep-Alive")]));
        assert!(!keeps(
            Version::HTTP_11,
            &[("transfer-encoding", "chunked"), ("content-length", "3")]
        ));
    }

    #[test]
    fn only_whole_files_of_sendfile_size_answering_plain_requests_qualify() {
        let file = temp_file(&vec![b'x'; SENDFILE_MIN as usize]);
        let response = |status: u16, pairs: &[(&'static str, &'static str)]| {
            let mut response =
                Response::new(ResponseBody::File(FileBody::open(file.path()).unwrap()));
            *response.status_mut() = StatusCode::from_u16(status).unwrap();
            *response.headers_mut() = fields(pairs);
            response
        };
        assert!(wants_sendfile(&response(200, &[])));
        assert!(wants_sendfile(&response(404, &[])));
        assert!(!wants_sendfile(&response(
            200,
            &[("transfer-encoding", "chunked")]
        )));
        assert!(!wants_sendfile(&response(200, &[("trailer", "x-sum")])));
        assert!(!wants_sendfile(&response(304, &[])));
        let small = temp_file(&vec![b'x'; SENDFILE_MIN as usize - 1]);
        let small = Response::new(ResponseBody::File(FileBody::open(small.path()).unwrap()));
        assert!(!wants_sendfile(&small), "small files stay with hyper");
        assert!(!wants_sendfile(&Response::new(ResponseBody::Empty)));

        assert!(request_allows(&Method::GET, true));
        assert!(request_allows(&Method::POST, true));
        assert!(!request_allows(&Method::HEAD, true));
        assert!(!request_allows(&Method::CONNECT, true));
        assert!(
            !request_allows(&Method::POST, false),
            "an unread request body would be parsed as the next request"
        );
    }

    #[test]
    fn a_head_is_written_as_hyper_writes_it() {
        let app = fields(&[
            ("content-type", "text/plain"),
            ("x-multi", "a"),
            ("x-multi", "b"),
            ("date", "Sun, 06 Nov 1994 08:49:37 GMT"),
        ]);
        let text = |version, headers: &HeaderMap, keep_alive| {
            let (head, keeps) =
                file_response_head(version, StatusCode::OK, headers, 42, keep_alive);
            (String::from_utf8(head.to_vec()).unwrap(), keeps)
        };
        assert_eq!(
            text(Version::HTTP_11, &app, true),
            (
                "HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\nx-multi: a\r\nx-multi: b\r\n\
                 date: Sun, 06 Nov 1994 08:49:37 GMT\r\ncontent-length: 42\r\n\r\n"
                    .to_owned(),
                true
            )
        );
        // The request closes: HTTP/1.1 says so.
        let (closing, keeps) = text(Version::HTTP_11, &app, false);
        assert!(
            // hyper adds the field to the map: it comes before the length.
            closing.ends_with("connection: close\r\ncontent-length: 42\r\n\r\n"),
            "{closing}"
        );
        assert!(!keeps);
        // HTTP/1.0 kept alive says so; closed, it says nothing.
        let (ten, keeps) = text(Version::HTTP_10, &app, true);
        assert!(ten.starts_with("HTTP/1.0 200 OK\r\n"), "{ten}");
        assert!(
            ten.contains("\r\nconnection: keep-alive\r\n") && keeps,
            "{ten}"
        );
        let (ten, keeps) = text(Version::HTTP_10, &app, false);
        assert!(!ten.contains("connection") && !keeps, "{ten}");

        // The app's connection values share a line (hyper's "close" joins
        // them); its content-length is written once, where it put it; a
        // date is added when it gave none.
        let app = fields(&[
            ("content-length", "42"),
            ("connection", "keep-alive"),
            ("connection", "x-trace"),
        ]);
        let (head, keeps) = text(Version::HTTP_11, &app, false);
        assert!(
            head.starts_with(
                "HTTP/1.1 200 OK\r\ncontent-length: 42\r\n\
                 connection: keep-alive, x-trace, close\r\ndate: "
            ),
            "{head}"
        );
        assert!(head.ends_with(" GMT\r\n\r\n") && !keeps, "{head}");
        let (head, keeps) = text(Version::HTTP_11, &fields(&[("connection", "close")]), true);
        assert!(
            head.contains("\r\nconnection: close\r\ncontent-length: 42\r\n") && !keeps,
            "the app's close closes: {head}"
        );
        let (head, _) = file_response_head(
            Version::HTTP_11,
            StatusCode::from_u16(299).unwrap(),
            &HeaderMap::new(),
            1,
            true,
        );
        assert!(head.starts_with(b"HTTP/1.1 299 <none>\r\n"));
    }

    /// A `Taken` over a real TCP connection, and the client's end.
    async fn tcp_taken(write_timeout: Duration) -> (Taken, tokio::net::TcpStream) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = tokio::net::TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (server, _) = listener.accept().await.unwrap();
        let taken = Taken {
            stream: Box::new(server),
            leftover: Bytes::from_static(b"GET /next"),
            write_timeout,
        };
        (taken, client)
    }

    /// A temporary file holding `content`.
    fn temp_file(content: &[u8]) -> tempfile::NamedTempFile {
        let mut file = tempfile::NamedTempFile::new().unwrap();
        file.write_all(content).unwrap();
        file
    }

    /// A job sending `path` (opened now) to an HTTP/1.1 request, recorded in
    /// `stats`, and the wait for its written notice.
    fn sendfile_job(
        path: &std::path::Path,
        request_keep_alive: bool,
        stats: &Arc<StatsPage>,
    ) -> (Box<SendFile>, crate::written::WrittenWait) {
        let (notice, written) = crate::written::channel();
        let mut response = Response::new(ResponseBody::File(FileBody::open(path).unwrap()));
        response.extensions_mut().insert(notice);
        let job = SendFile::new(
            Version::HTTP_11,
            request_keep_alive,
            response,
            exchange(stats),
            stats.clone(),
        );
        (job, written)
    }

    fn exchange(stats: &Arc<StatsPage>) -> Exchange {
        let request = http::Request::get("/f").body(()).unwrap();
        let mut exchange = Exchange::begin(
            stats,
            None,
            &request,
            &Arc::from("127.0.0.1"),
            tokio::time::Instant::now(),
        );
        exchange.responded(&Response::new(()));
        exchange
    }

    #[tokio::test]
    async fn the_file_follows_the_head_and_http_resumes_with_the_bytes_read_ahead() {
        let content: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
        let file = temp_file(&content);
        let stats = Arc::new(StatsPage::new(false).unwrap());
        let (job, written) = sendfile_job(file.path(), true, &stats);
        let (taken, mut client) = tcp_taken(Duration::from_secs(10)).await;
        let reading = tokio::spawn(async move {
            // The head, the file, and nothing more before the connection
            // is HTTP's again.
            let mut got = Vec::new();
            let mut buf = vec![0; 65536];
            let complete = |got: &[u8]| {
                got.windows(4)
                    .position(|w| w == b"\r\n\r\n")
                    .is_some_and(|at| got.len() >= at + 4 + 3_000_000)
            };
            while !complete(&got) {
                let n = client.read(&mut buf).await.unwrap();
                assert!(n > 0, "closed early");
                got.extend_from_slice(&buf[..n]);
            }
            got
        });
        let AfterTakeover::Resume(taken) = job.run(taken).await else {
            panic!("a kept-alive connection must resume");
        };
        assert_eq!(&taken.leftover[..], b"GET /next");
        assert_eq!(written.wait().await, crate::written::Written::Yes);
        let got = reading.await.unwrap();
        let split = got.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
        assert!(got.starts_with(b"HTTP/1.1 200 OK\r\ncontent-length: 3000000\r\n"));
        assert!(got[split..] == content[..], "the file, byte for byte");
        let seen = stats.snapshot();
        assert_eq!(
            (seen.sendfile_responses, seen.sendfile_bytes),
            (1, 3_000_000)
        );
        assert_eq!(seen.responses[1], 1, "the exchange is recorded");
    }

    #[tokio::test]
    async fn a_client_that_stops_reading_is_dropped_after_write_timeout() {
        // Far more than the socket buffers on both sides hold.
        let file = temp_file(&vec![b'x'; 64 << 20]);
        let stats = Arc::new(StatsPage::new(false).unwrap());
        let (job, written) = sendfile_job(file.path(), true, &stats);
        let (taken, _client) = tcp_taken(Duration::from_millis(300)).await;
        let outcome = tokio::time::timeout(Duration::from_secs(60), job.run(taken))
            .await
            .expect("a stalled client must not hold the job");
        assert!(matches!(outcome, AfterTakeover::Released));
        assert_eq!(written.wait().await, crate::written::Written::No);
        assert!(stats.snapshot().sendfile_bytes < 64 << 20);
    }

    #[tokio::test]
    async fn a_file_that_shrinks_ends_the_connection_and_closing_requests_close() {
        let file = temp_file(&vec![b'y'; 1 << 20]);
        let stats = Arc::new(StatsPage::new(false).unwrap());
        let (job, _) = sendfile_job(file.path(), true, &stats);
        file.as_file().set_len(1000).unwrap();
        let (taken, mut client) = tcp_taken(Duration::from_secs(10)).await;
        assert!(matches!(job.run(taken).await, AfterTakeover::Released));
        let mut got = Vec::new();
        client.read_to_end(&mut got).await.unwrap();
        assert!(got.ends_with(&[b'y'; 1000]) && !got.ends_with(&[b'y'; 1001]));

        // Whole, but the request asked to close: FIN after the file.
        let file = temp_file(&vec![b'z'; 100_000]);
        let (job, _) = sendfile_job(file.path(), false, &stats);
        let (taken, mut client) = tcp_taken(Duration::from_secs(10)).await;
        let reading = tokio::spawn(async move {
            let mut got = Vec::new();
            client.read_to_end(&mut got).await.unwrap();
            got
        });
        assert!(matches!(job.run(taken).await, AfterTakeover::Released));
        let got = reading.await.unwrap();
        let text = String::from_utf8(got).unwrap();
        assert!(text.contains("\r\nconnection: close\r\n"), "{text:.200}");
        assert!(text.ends_with(&"z".repeat(100_000)));
    }
}
