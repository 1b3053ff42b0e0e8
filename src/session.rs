//! Which HTTP a connection speaks (ALPN under TLS, the client's first bytes
//! on a plain socket), hyper's HTTP/1.1 connection as a
//! `connection::Session`, and the response body wrapper that tells the
//! connection when an HTTP/1.1 response is done. HTTP/2 is in `http2`.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::HttpService;
use hyper_util::rt::TokioTimer;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite};

use crate::connection::{Activity, Session, SessionResult, WatchedIo};
use crate::exchange::Exchange;
use crate::interim::{InterimIo, InterimQueue};
use crate::response::{ResponseBody, StreamAborted};
use crate::server::ServerOptions;
use crate::written::WrittenNotice;

/// Which HTTP a connection speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    Http1,
    Http2,
}

/// What an HTTP/2 client sends first (RFC 9113 §3.4).
pub const H2_PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Reads just enough of a plaintext connection to tell HTTP/2 with prior
/// knowledge (h2c) from HTTP/1.1. Returns the bytes read, to be replayed.
/// `None`: nothing usable arrived within `within` (or the client left).
pub async fn sniff<S: AsyncRead + Unpin>(
    stream: &mut S,
    within: Duration,
) -> Option<(Protocol, Bytes)> {
    let mut seen = BytesMut::with_capacity(H2_PREFACE.len());
    let reading = async {
        loop {
            let mut chunk = [0u8; 24];
            let wanted = H2_PREFACE.len() - seen.len();
            let n = stream.read(&mut chunk[..wanted]).await.ok()?;
            if n == 0 {
                return None;
            }
            seen.extend_from_slice(&chunk[..n]);
            if !H2_PREFACE.starts_with(&seen) {
                return Some(Protocol::Http1);
            }
            if seen.len() == H2_PREFACE.len() {
                return Some(Protocol::Http2);
            }
        }
    };
    let protocol = tokio::time::timeout(within, reading).await.ok()??;
    Some((protocol, seen.freeze()))
}

/// hyper's HTTP/1.1 connection as a `connection::Session`, with the queue
/// of interim bytes its IO writes (when early hints are on).
pub struct Http1Session<S, Svc>(
    http1::Connection<InterimIo<WatchedIo<S>>, Svc>,
    Option<Arc<InterimQueue>>,
)
where
    Svc: HttpService<Incoming>;

/// Builds HTTP/1.1 sessions with the server's settings. (HTTP/2 sessions are
/// `http2::H2Session`.) `interim`: the connection's queue of 103 Early Hints
/// bytes, when early hints are on.
pub fn http1_starter<S, Svc>(
    options: &ServerOptions,
    interim: Option<Arc<InterimQueue>>,
    service: Svc,
) -> impl Fn(WatchedIo<S>) -> Http1Session<S, Svc>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    Svc: HttpService<Incoming, ResBody = TrackedBody> + Clone + Send + 'static,
    Svc::Future: Send + 'static,
{
    let mut h1 = http1::Builder::new();
    h1.timer(TokioTimer::new())
        // Head timing is enforced by `connection::serve`, which answers 408
        // where hyper would only close.
        .header_read_timeout(None)
        .max_headers(options.limits.max_headers)
        .max_header_size(options.limits.max_header_bytes)
        .keep_alive(true);
    move |io| {
        let io = InterimIo::new(io, interim.clone());
        Http1Session(h1.serve_connection(io, service.clone()), interim.clone())
    }
}

impl<S, Svc> std::future::Future for Http1Session<S, Svc>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    Svc: HttpService<Incoming, ResBody = TrackedBody> + Unpin + Send + 'static,
    Svc::Future: Send + 'static,
    Svc::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    type Output = SessionResult;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<SessionResult> {
        Pin::new(&mut self.0).poll(cx).map_err(Into::into)
    }
}

impl<S, Svc> Session<S> for Http1Session<S, Svc>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    Svc: HttpService<Incoming, ResBody = TrackedBody> + Unpin + Send + 'static,
    Svc::Future: Send + 'static,
    Svc::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    fn graceful_shutdown(&mut self) {
        Pin::new(&mut self.0).graceful_shutdown();
    }

    fn into_io(self) -> Option<(WatchedIo<S>, Bytes)> {
        let parts = self.0.into_parts();
        Some((parts.io.into_inner(), parts.read_buf))
    }

    fn take_unwritten(&mut self) -> Bytes {
        self.1
            .as_ref()
            .map_or_else(Bytes::new, |queue| queue.take_unwritten())
    }
}

/// A response body that tells the connection when hyper is done with it, so
/// the idle timer starts then; its exchange (stats, access log) ends then
/// too; and, when someone waits for the response to be written (`written`),
/// it hands their notice to the connection once hyper has taken the last
/// frame.
pub struct TrackedBody {
    body: ResponseBody,
    activity: Arc<Activity>,
    exchange: Exchange,
    written: Option<WrittenNotice>,
    /// The body yielded its end (a stream's end is only seen by polling).
    ended: bool,
}

impl TrackedBody {
    pub fn new(
        body: ResponseBody,
        activity: Arc<Activity>,
        exchange: Exchange,
        written: Option<WrittenNotice>,
    ) -> Self {
        Self {
            body,
            activity,
            exchange,
            written,
            ended: false,
        }
    }
}

impl Drop for TrackedBody {
    fn drop(&mut self) {
        if let Some(notice) = self.written.take() {
            // Dropped before its end: the response was cut short, and the
            // notice goes unfired.
            if self.ended || self.body.is_end_stream() {
                self.activity.notify_at_next_flush(notice);
            }
        }
        self.activity.response_finished();
    }
}

impl Body for TrackedBody {
    type Data = Bytes;
    type Error = StreamAborted;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, StreamAborted>>> {
        let frame = Pin::new(&mut self.body).poll_frame(cx);
        match &frame {
            Poll::Ready(None) => self.ended = true,
            Poll::Ready(Some(Ok(frame))) => match frame.data_ref() {
                Some(data) => {
                    let sent = data.len();
                    self.exchange.sent(sent);
                }
                None => self.ended = frame.is_trailers(),
            },
            _ => {}
        }
        frame
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn sniff_tells_h2c_from_http1() {
        let (mut client, mut server) = tokio::io::duplex(64);
        tokio::io::AsyncWriteExt::write_all(&mut client, H2_PREFACE)
            .await
            .unwrap();
        let (protocol, seen) = sniff(&mut server, Duration::from_secs(1)).await.unwrap();
        assert_eq!((protocol, &seen[..]), (Protocol::Http2, &H2_PREFACE[..]));

        let (mut client, mut server) = tokio::io::duplex(64);
        tokio::io::AsyncWriteExt::write_all(&mut client, b"POST / HTTP/1.1\r\n")
            .await
            .unwrap();
        let (protocol, seen) = sniff(&mut server, Duration::from_secs(1)).await.unwrap();
        assert_eq!(protocol, Protocol::Http1);
        assert_eq!(
            &seen[..],
            b"POST / HTTP/1.1\r\n",
            "what was read is replayed to hyper"
        );

        let (_client, mut server) = tokio::io::duplex(64);
        assert!(sniff(&mut server, Duration::from_millis(20))
            .await
            .is_none());
    }
}
