//! An HTTP/2 connection driven with the `h2` crate: one task polls the
//! connection (reading frames, writing what the streams queued) and every
//! stream of it (`FuturesUnordered`), so a stream costs no task of its own.
//!
//! A stream that gets no send window for `write_timeout` is reset by itself
//! (stream.rs). When that happens while no stream of the connection has sent
//! anything since the stall began, the client is holding the whole
//! connection: it gets GOAWAY, and the connection closes once the streams it
//! has are done (each one either finishes or stalls out too), or after
//! another `write_timeout` at the latest (h2 completes a graceful GOAWAY only
//! once the client answers its PING).

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use futures_util::stream::{FuturesUnordered, StreamExt};
use h2::server::{Connection, Handshake, SendResponse};
use h2::RecvStream;
use http::{Method, Request};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::time::Instant;

use super::control_budget::BudgetedIo;
use super::recv_body::RecvBody;
use super::stream::{Exchanged, Finished, StreamEnd, StreamTask};
use crate::connection::{Activity, Session, SessionResult, WatchedIo};
use crate::interim::{self, EarlyHints};
use crate::server::ServerOptions;

/// What hyper's HTTP/2 server used, kept so nothing changes for clients: a
/// 1 MiB connection receive window and at most ~400 KiB buffered per stream.
const CONNECTION_WINDOW: u32 = 1024 * 1024;
const MAX_SEND_BUFFER: usize = 400 * 1024;
/// Rapid-reset protection, at h2's and hyper's defaults: streams the client
/// resets before they are accepted, and streams we must reset for its
/// protocol errors, before the connection is closed with ENHANCE_YOUR_CALM.
const MAX_PENDING_ACCEPT_RESET_STREAMS: usize = 20;
const MAX_LOCAL_ERROR_RESET_STREAMS: usize = 1024;

type Io<S> = BudgetedIo<TokioIo<WatchedIo<S>>>;

/// What the streams and the reading side of one connection share with it.
pub(super) struct ConnectionShared {
    pub(super) activity: Arc<Activity>,
    /// How long a stream may have data to send and no capacity to send it.
    pub(super) write_timeout: Duration,
    /// Pieces of body handed to h2 by any stream: a stream that stalls out
    /// while this has not moved shows that the whole connection is stuck.
    pub(super) sends: AtomicU64,
    /// The client went over its control-frame budget (`control_budget`).
    pub(super) control_flood: AtomicBool,
}

enum State<S> {
    Handshaking(Handshake<Io<S>, Bytes>),
    Serving(Connection<Io<S>, Bytes>),
}

/// An HTTP/2 connection as a `connection::Session`. `handler` turns a request
/// (with when its head arrived, and its `rack.early_hints` when enabled) into
/// the response future for it.
pub struct H2Session<S, H, F> {
    state: State<S>,
    streams: FuturesUnordered<StreamTask<F>>,
    handler: H,
    shared: Arc<ConnectionShared>,
    /// A stop arrived during the handshake: GOAWAY as soon as it is done.
    shutdown_pending: bool,
    /// GOAWAY was sent.
    going_away: bool,
    stuck: Stuck,
    /// The control-frame flood was answered with GOAWAY.
    flood_answered: bool,
    /// Streams get `rack.early_hints`.
    early_hints: bool,
}

/// Whether the client was found holding the whole connection (see the
/// module docs).
enum Stuck {
    No,
    /// GOAWAY sent; closed at this deadline at the latest.
    Closing(Pin<Box<tokio::time::Sleep>>),
    Closed,
}

impl<S, H, F> H2Session<S, H, F>
where
    S: AsyncRead + AsyncWrite + Unpin,
    H: FnMut(Request<RecvBody>, Instant, Option<EarlyHints>) -> F,
    F: Future<Output = Exchanged>,
{
    /// `io` must begin with the client's connection preface (already read
    /// bytes are in its prefix). From `options`: the SETTINGS (`h2`),
    /// `write_timeout` (how long a stream may wait for send window before it
    /// is reset) and `early_hints`.
    pub fn new(
        io: WatchedIo<S>,
        options: &ServerOptions,
        activity: Arc<Activity>,
        handler: H,
    ) -> Self {
        let settings = &options.h2;
        let mut builder = h2::server::Builder::new();
        builder
            .max_concurrent_streams(settings.max_concurrent_streams)
            .initial_window_size(settings.initial_window_size)
            .max_frame_size(settings.max_frame_size)
            .max_header_list_size(settings.max_header_list_size)
            .initial_connection_window_size(CONNECTION_WINDOW)
            .max_send_buffer_size(MAX_SEND_BUFFER)
            .max_pending_accept_reset_streams(MAX_PENDING_ACCEPT_RESET_STREAMS)
            .max_local_error_reset_streams(Some(MAX_LOCAL_ERROR_RESET_STREAMS));
        let shared = Arc::new(ConnectionShared {
            activity,
            write_timeout: options.write_timeout,
            sends: AtomicU64::new(0),
            control_flood: AtomicBool::new(false),
        });
        let io = BudgetedIo::new(TokioIo::new(io), shared.clone());
        Self {
            state: State::Handshaking(builder.handshake(io)),
            streams: FuturesUnordered::new(),
            handler,
            shared,
            shutdown_pending: false,
            going_away: false,
            stuck: Stuck::No,
            flood_answered: false,
            early_hints: options.early_hints,
        }
    }

    fn accept(&mut self, request: Request<RecvStream>, respond: SendResponse<Bytes>) {
        let head_started = self.shared.activity.request_started();
        let finished = Finished(self.shared.clone());
        let (head, stream) = request.into_parts();
        let content_length = head
            .headers
            .get(http::header::CONTENT_LENGTH)
            .and_then(|value| value.to_str().ok())
            .and_then(|value| value.parse().ok());
        let head_only = head.method == Method::HEAD;
        let request = Request::from_parts(head, RecvBody::new(stream, content_length));
        let (early_hints, hints) = if self.early_hints {
            let (early_hints, hints) = interim::channel();
            (Some(early_hints), Some(hints))
        } else {
            (None, None)
        };
        let response = (self.handler)(request, head_started, early_hints);
        self.streams.push(StreamTask::new(
            respond, head_only, finished, hints, response,
        ));
    }
}

impl<S, H, F> Future for H2Session<S, H, F>
where
    S: AsyncRead + AsyncWrite + Unpin,
    H: FnMut(Request<RecvBody>, Instant, Option<EarlyHints>) -> F + Unpin,
    F: Future<Output = Exchanged>,
{
    type Output = SessionResult;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<SessionResult> {
        let this = self.get_mut();
        if let State::Handshaking(handshake) = &mut this.state {
            let mut connection = match Pin::new(handshake).poll(cx) {
                Poll::Ready(Ok(connection)) => connection,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e.into())),
                Poll::Pending => return Poll::Pending,
            };
            if this.shutdown_pending {
                this.going_away = true;
                connection.graceful_shutdown();
            }
            this.state = State::Serving(connection);
        }
        loop {
            // Streams first: what they queue is written by the connection
            // poll below, in the same turn.
            let mut stuck = false;
            while let Poll::Ready(Some(end)) = this.streams.poll_next_unpin(cx) {
                if let StreamEnd::StalledOut { sends } = end {
                    stuck |= this.shared.sends.load(Ordering::Relaxed) == sends;
                }
            }
            if stuck {
                this.found_stuck();
            }
            this.poll_stuck_deadline(cx);
            let State::Serving(connection) = &mut this.state else {
                unreachable!("the handshake is done");
            };
            let accepted = connection.poll_accept(cx);
            if this.shared.control_flood.load(Ordering::Relaxed) && !this.flood_answered {
                // The reading side stopped feeding h2; GOAWAY and close.
                tracing::debug!(
                    "HTTP/2 client went over its control-frame budget; GOAWAY ENHANCE_YOUR_CALM"
                );
                this.flood_answered = true;
                connection.abrupt_shutdown(h2::Reason::ENHANCE_YOUR_CALM);
                continue;
            }
            match accepted {
                Poll::Ready(Some(Ok((request, respond)))) => this.accept(request, respond),
                Poll::Ready(Some(Err(e))) => return Poll::Ready(Err(e.into())),
                Poll::Ready(None) => return Poll::Ready(Ok(())),
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}

impl<S, H, F> H2Session<S, H, F>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    /// A stream stalled out while nothing else on the connection moved:
    /// GOAWAY now, and a deadline for the close.
    fn found_stuck(&mut self) {
        if !matches!(self.stuck, Stuck::No) {
            return;
        }
        tracing::debug!("HTTP/2 connection made no progress within write_timeout; GOAWAY");
        let write_timeout = self.shared.write_timeout;
        self.stuck = Stuck::Closing(Box::pin(tokio::time::sleep(write_timeout)));
        if let State::Serving(connection) = &mut self.state {
            if !self.going_away {
                self.going_away = true;
                connection.graceful_shutdown();
            }
        }
    }

    fn poll_stuck_deadline(&mut self, cx: &mut Context<'_>) {
        let (Stuck::Closing(deadline), State::Serving(connection)) =
            (&mut self.stuck, &mut self.state)
        else {
            return;
        };
        if deadline.as_mut().poll(cx).is_ready() {
            tracing::debug!("stuck HTTP/2 connection did not close after GOAWAY; closing");
            connection.abrupt_shutdown(h2::Reason::NO_ERROR);
            self.stuck = Stuck::Closed;
        }
    }
}

impl<S, H, F> Session<S> for H2Session<S, H, F>
where
    S: AsyncRead + AsyncWrite + Unpin,
    H: FnMut(Request<RecvBody>, Instant, Option<EarlyHints>) -> F + Unpin,
    F: Future<Output = Exchanged>,
{
    /// GOAWAY: streams in flight finish, new ones are refused.
    fn graceful_shutdown(&mut self) {
        match &mut self.state {
            State::Handshaking(_) => self.shutdown_pending = true,
            State::Serving(_) if self.going_away => {}
            State::Serving(connection) => {
                self.going_away = true;
                connection.graceful_shutdown();
            }
        }
    }

    fn into_io(self) -> Option<(WatchedIo<S>, Bytes)> {
        None
    }

    fn multiplexed(&self) -> bool {
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::exchange::Exchange;
    use crate::response::ResponseBody;
    use crate::stats::StatsPage;
    use http::{HeaderMap, HeaderValue, Response, StatusCode};

    fn options(early_hints: bool) -> ServerOptions {
        ServerOptions {
            write_timeout: WRITE_TIMEOUT,
            early_hints,
            ..ServerOptions::default()
        }
    }

    const WRITE_TIMEOUT: Duration = Duration::from_secs(3);

    /// Serves `handler` on one end of an in-memory pipe and returns an h2
    /// client for the other end, and its connection's task (which ends when
    /// the server closes the connection).
    async fn client_with<H, F>(
        client: &h2::client::Builder,
        handler: H,
    ) -> (h2::client::SendRequest<Bytes>, tokio::task::JoinHandle<()>)
    where
        H: FnMut(Request<RecvBody>, Instant, Option<EarlyHints>) -> F + Unpin + Send + 'static,
        F: Future<Output = Response<ResponseBody>> + Send + 'static,
    {
        client_recorded(client, handler, Arc::new(StatsPage::new(false).unwrap())).await
    }

    /// As `client_with`, each stream's exchange recorded in `stats`.
    async fn client_recorded<H, F>(
        client: &h2::client::Builder,
        handler: H,
        stats: Arc<StatsPage>,
    ) -> (h2::client::SendRequest<Bytes>, tokio::task::JoinHandle<()>)
    where
        H: FnMut(Request<RecvBody>, Instant, Option<EarlyHints>) -> F + Unpin + Send + 'static,
        F: Future<Output = Response<ResponseBody>> + Send + 'static,
    {
        let (client_io, server_io) = tokio::io::duplex(1 << 20);
        let activity = Activity::new();
        let io = WatchedIo::new(server_io, activity.clone());
        let session = H2Session::new(io, &options(true), activity, recorded(stats, handler));
        tokio::spawn(async move {
            let _ = session.await;
        });
        let (sender, connection) = client.handshake(client_io).await.unwrap();
        let connection = tokio::spawn(async move {
            let _ = connection.await;
        });
        (sender, connection)
    }

    async fn client_for<H, F>(handler: H) -> h2::client::SendRequest<Bytes>
    where
        H: FnMut(Request<RecvBody>, Instant, Option<EarlyHints>) -> F + Unpin + Send + 'static,
        F: Future<Output = Response<ResponseBody>> + Send + 'static,
    {
        client_with(&h2::client::Builder::new(), handler).await.0
    }

    type Recorded = Pin<Box<dyn Future<Output = Exchanged> + Send>>;

    /// Wraps a handler so each stream's response carries an exchange
    /// recorded in `stats`, as request_service.rs does for HTTP/1.1.
    fn recorded<H, F>(
        stats: Arc<StatsPage>,
        mut handler: H,
    ) -> impl FnMut(Request<RecvBody>, Instant, Option<EarlyHints>) -> Recorded + Unpin + Send + 'static
    where
        H: FnMut(Request<RecvBody>, Instant, Option<EarlyHints>) -> F + Unpin + Send + 'static,
        F: Future<Output = Response<ResponseBody>> + Send + 'static,
    {
        let remote: Arc<str> = Arc::from("127.0.0.1");
        move |request, started, hints| {
            let exchange = Exchange::begin(&stats, None, &request, &remote, started);
            let response = handler(request, started, hints);
            Box::pin(async move { (response.await, exchange) })
        }
    }

    fn request(method: Method, path: &str) -> Request<()> {
        Request::builder()
            .method(method)
            .uri(format!("http://test{path}"))
            .body(())
            .unwrap()
    }

    /// Answers with the request's method, path and body, trailers for
    /// /grpc, and a 103 Early Hints first for /hints.
    async fn echo(
        request: Request<RecvBody>,
        _: Instant,
        early_hints: Option<EarlyHints>,
    ) -> Response<ResponseBody> {
        use http_body_util::BodyExt;
        let (head, body) = request.into_parts();
        if head.uri.path() == "/hints" {
            let mut fields = HeaderMap::new();
            fields.append("link", HeaderValue::from_static("</a.css>; rel=preload"));
            fields.append("link", HeaderValue::from_static("</b.js>; rel=preload"));
            assert!(early_hints.unwrap().send(fields));
        }
        let received = body.collect().await.unwrap().to_bytes();
        let text = format!("{} {} {}", head.method, head.uri.path(), received.len());
        let mut body = ResponseBody::from_chunks(vec![Bytes::from(text)]);
        if head.uri.path() == "/grpc" {
            let mut fields = HeaderMap::new();
            fields.insert("grpc-status", HeaderValue::from_static("0"));
            body = body.with_trailers(fields);
        }
        let mut response = Response::new(body);
        response
            .headers_mut()
            .insert("connection", HeaderValue::from_static("keep-alive"));
        response
    }

    #[tokio::test]
    async fn streams_are_answered_with_date_length_body_and_trailers() {
        let mut client = client_for(echo).await;
        let (response, mut upload) = client
            .send_request(request(Method::POST, "/grpc"), false)
            .unwrap();
        upload
            .send_data(Bytes::from(vec![b'x'; 100_000]), true)
            .unwrap();
        let (head, mut body) = response.await.unwrap().into_parts();
        assert_eq!(head.status, StatusCode::OK);
        assert!(head.headers.contains_key("date"), "{:?}", head.headers);
        assert!(!head.headers.contains_key("connection"));
        assert_eq!(head.headers["content-length"], "17");
        let data = body.data().await.unwrap().unwrap();
        assert_eq!(&data[..], b"POST /grpc 100000");
        let trailers = body.trailers().await.unwrap().unwrap();
        assert_eq!(trailers["grpc-status"], "0");
    }

    #[tokio::test]
    async fn every_stream_is_recorded_with_its_status_when_it_ends() {
        let stats = Arc::new(StatsPage::new(false).unwrap());
        let (mut client, _) =
            client_recorded(&h2::client::Builder::new(), echo, stats.clone()).await;
        for path in ["/a", "/b"] {
            let (response, _) = client
                .send_request(request(Method::GET, path), true)
                .unwrap();
            let mut body = response.await.unwrap().into_body();
            while body.data().await.is_some() {}
        }
        let mut recorded = stats.snapshot();
        for _ in 0..100 {
            if recorded.duration.count == 2 {
                break;
            }
            tokio::task::yield_now().await;
            recorded = stats.snapshot();
        }
        assert_eq!(recorded.responses[1], 2, "{recorded:?}");
    }

    #[tokio::test]
    async fn head_gets_the_head_only() {
        let mut client = client_for(echo).await;
        let (response, _) = client
            .send_request(request(Method::HEAD, "/x"), true)
            .unwrap();
        let response = response.await.unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        assert!(response.body().is_end_stream(), "no DATA after the head");
    }

    #[tokio::test(start_paused = true)]
    async fn a_stream_without_send_window_is_reset_after_write_timeout_and_the_stuck_connection_closed(
    ) {
        let mut no_window = h2::client::Builder::new();
        no_window.initial_window_size(0);
        let (mut client, connection) = client_with(&no_window, echo).await;
        let started = Instant::now();
        let (response, _) = client
            .send_request(request(Method::GET, "/"), true)
            .unwrap();
        let mut body = response.await.unwrap().into_body();
        let error = tokio::time::timeout(WRITE_TIMEOUT * 2, body.data())
            .await
            .expect("the stream is reset within write_timeout")
            .unwrap()
            .unwrap_err();
        assert_eq!(error.reason(), Some(h2::Reason::CANCEL));
        assert!(started.elapsed() >= WRITE_TIMEOUT);
        // Nothing else moved: the server sent GOAWAY and closed.
        tokio::time::timeout(WRITE_TIMEOUT, connection)
            .await
            .expect("the connection closes")
            .unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn a_body_waiting_on_the_app_is_never_cut() {
        let slow_app = |_request, _started, _hints| async {
            let (sender, body) = ResponseBody::channel();
            tokio::spawn(async move {
                tokio::time::sleep(WRITE_TIMEOUT * 3).await;
                sender.try_send(Bytes::from_static(b"late")).unwrap();
                sender.finish(HeaderMap::new());
            });
            Response::new(body)
        };
        let mut client = client_for(slow_app).await;
        let (response, _) = client
            .send_request(request(Method::GET, "/"), true)
            .unwrap();
        let mut body = response.await.unwrap().into_body();
        assert_eq!(&body.data().await.unwrap().unwrap()[..], b"late");
    }

    /// A raw HTTP/2 frame.
    fn frame(kind: u8, flags: u8, stream_id: u32, payload: &[u8]) -> Vec<u8> {
        let mut out = (payload.len() as u32).to_be_bytes()[1..].to_vec();
        out.extend([kind, flags]);
        out.extend(stream_id.to_be_bytes());
        out.extend(payload);
        out
    }

    /// Sends `frames` after the preface to a fresh session and returns the
    /// GOAWAY codes it answered with, and whether it closed the connection.
    async fn goaways_after(frames: Vec<u8>) -> (Vec<u32>, bool) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (mut client, server_io) = tokio::io::duplex(1 << 16);
        let activity = Activity::new();
        let io = WatchedIo::new(server_io, activity.clone());
        let stats = Arc::new(StatsPage::new(false).unwrap());
        let session = H2Session::new(io, &options(false), activity, recorded(stats, echo));
        tokio::spawn(async move {
            let _ = session.await;
        });
        let mut stream = crate::session::H2_PREFACE.to_vec();
        stream.extend(frame(0x4, 0, 0, b""));
        stream.extend(frames);
        let writer = tokio::spawn(async move {
            let _ = client.write_all(&stream).await;
            let mut answer = Vec::new();
            let closed =
                tokio::time::timeout(Duration::from_secs(10), client.read_to_end(&mut answer))
                    .await
                    .is_ok();
            (answer, closed)
        });
        let (answer, closed) = writer.await.unwrap();
        let mut codes = Vec::new();
        let mut at = 0;
        while at + 9 <= answer.len() {
            let length =
                u32::from_be_bytes([0, answer[at], answer[at + 1], answer[at + 2]]) as usize;
            if answer[at + 3] == 0x7 && at + 9 + 8 <= answer.len() {
                let code = &answer[at + 13..at + 17];
                codes.push(u32::from_be_bytes(code.try_into().unwrap()));
            }
            at += 9 + length;
        }
        (codes, closed)
    }

    #[tokio::test]
    async fn a_ping_flood_gets_goaway_enhance_your_calm_and_the_connection_closes() {
        let pings: Vec<u8> = (0..5_000u64)
            .flat_map(|n| frame(0x6, 0, 0, &n.to_be_bytes()))
            .collect();
        let (goaways, closed) = goaways_after(pings).await;
        assert_eq!(goaways, vec![u32::from(h2::Reason::ENHANCE_YOUR_CALM)]);
        assert!(closed, "the server closed the connection");
    }

    #[tokio::test]
    async fn a_few_control_frames_are_fine() {
        let mut frames: Vec<u8> = (0..50u64)
            .flat_map(|n| frame(0x6, 0, 0, &n.to_be_bytes()))
            .collect();
        frames.extend(frame(0x2, 0, 1, &[0, 0, 0, 0, 16]));
        frames.extend(frame(0x4, 0, 0, &[0, 3, 0, 0, 0, 50]));
        frames.extend(frame(0x7, 0, 0, &[0, 0, 0, 0, 0, 0, 0, 0]));
        let (goaways, _) = goaways_after(frames).await;
        assert!(
            !goaways.contains(&u32::from(h2::Reason::ENHANCE_YOUR_CALM)),
            "{goaways:?}"
        );
    }

    #[tokio::test]
    async fn early_hints_go_out_as_informational_headers_before_the_response() {
        let mut client = client_for(echo).await;
        let (mut response, _) = client
            .send_request(request(Method::GET, "/hints"), true)
            .unwrap();
        let hint = std::future::poll_fn(|cx| response.poll_informational(cx))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(hint.status(), StatusCode::EARLY_HINTS);
        let links: Vec<_> = hint.headers().get_all("link").iter().collect();
        assert_eq!(links, ["</a.css>; rel=preload", "</b.js>; rel=preload"]);
        assert_eq!(response.await.unwrap().status(), StatusCode::OK);
    }
}
