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
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use futures_util::stream::{FuturesUnordered, StreamExt};
use h2::server::{Connection, Handshake, SendResponse};
use h2::RecvStream;
use http::{Method, Request, Response};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::time::Instant;

use super::recv_body::RecvBody;
use super::stream::{ConnectionShared, Finished, StreamEnd, StreamTask};
use crate::connection::{Activity, Session, SessionResult, WatchedIo};
use crate::h2_settings::H2Settings;
use crate::response::ResponseBody;

/// What hyper's HTTP/2 server used, kept so nothing changes for clients: a
/// 1 MiB connection receive window and at most ~400 KiB buffered per stream.
const CONNECTION_WINDOW: u32 = 1024 * 1024;
const MAX_SEND_BUFFER: usize = 400 * 1024;
/// Rapid-reset protection, at h2's and hyper's defaults: streams the client
/// resets before they are accepted, and streams we must reset for its
/// protocol errors, before the connection is closed with ENHANCE_YOUR_CALM.
const MAX_PENDING_ACCEPT_RESET_STREAMS: usize = 20;
const MAX_LOCAL_ERROR_RESET_STREAMS: usize = 1024;

type Io<S> = TokioIo<WatchedIo<S>>;

enum State<S> {
    Handshaking(Handshake<Io<S>, Bytes>),
    Serving(Connection<Io<S>, Bytes>),
}

/// An HTTP/2 connection as a `connection::Session`. `handler` turns a request
/// (and when its head arrived) into the response future for it.
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
    H: FnMut(Request<RecvBody>, Instant) -> F,
    F: Future<Output = Response<ResponseBody>>,
{
    /// `io` must begin with the client's connection preface (already read
    /// bytes are in its prefix). `write_timeout`: how long a stream may wait
    /// for send window before it is reset.
    pub fn new(
        io: WatchedIo<S>,
        settings: &H2Settings,
        write_timeout: Duration,
        activity: Arc<Activity>,
        handler: H,
    ) -> Self {
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
        Self {
            state: State::Handshaking(builder.handshake(TokioIo::new(io))),
            streams: FuturesUnordered::new(),
            handler,
            shared: Arc::new(ConnectionShared {
                activity,
                write_timeout,
                sends: AtomicU64::new(0),
            }),
            shutdown_pending: false,
            going_away: false,
            stuck: Stuck::No,
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
        let response = (self.handler)(request, head_started);
        self.streams
            .push(StreamTask::new(respond, head_only, finished, response));
    }
}

impl<S, H, F> Future for H2Session<S, H, F>
where
    S: AsyncRead + AsyncWrite + Unpin,
    H: FnMut(Request<RecvBody>, Instant) -> F + Unpin,
    F: Future<Output = Response<ResponseBody>>,
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
            let State::Serving(connection) = &mut this.state else {
                unreachable!("the handshake is done");
            };
            if stuck && matches!(this.stuck, Stuck::No) {
                tracing::debug!("HTTP/2 connection made no progress within write_timeout; GOAWAY");
                let write_timeout = this.shared.write_timeout;
                this.stuck = Stuck::Closing(Box::pin(tokio::time::sleep(write_timeout)));
                if !this.going_away {
                    this.going_away = true;
                    connection.graceful_shutdown();
                }
            }
            if let Stuck::Closing(deadline) = &mut this.stuck {
                if deadline.as_mut().poll(cx).is_ready() {
                    tracing::debug!("stuck HTTP/2 connection did not close after GOAWAY; closing");
                    connection.abrupt_shutdown(h2::Reason::NO_ERROR);
                    this.stuck = Stuck::Closed;
                }
            }
            match connection.poll_accept(cx) {
                Poll::Ready(Some(Ok((request, respond)))) => this.accept(request, respond),
                Poll::Ready(Some(Err(e))) => return Poll::Ready(Err(e.into())),
                Poll::Ready(None) => return Poll::Ready(Ok(())),
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}

impl<S, H, F> Session<S> for H2Session<S, H, F>
where
    S: AsyncRead + AsyncWrite + Unpin,
    H: FnMut(Request<RecvBody>, Instant) -> F + Unpin,
    F: Future<Output = Response<ResponseBody>>,
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
    use http::{HeaderMap, HeaderValue, StatusCode};

    const WRITE_TIMEOUT: Duration = Duration::from_secs(3);

    /// Serves `handler` on one end of an in-memory pipe and returns an h2
    /// client for the other end, and its connection's task (which ends when
    /// the server closes the connection).
    async fn client_with<H, F>(
        client: &h2::client::Builder,
        handler: H,
    ) -> (h2::client::SendRequest<Bytes>, tokio::task::JoinHandle<()>)
    where
        H: FnMut(Request<RecvBody>, Instant) -> F + Unpin + Send + 'static,
        F: Future<Output = Response<ResponseBody>> + Send + 'static,
    {
        let (client_io, server_io) = tokio::io::duplex(1 << 20);
        let activity = Activity::new();
        let io = WatchedIo::new(server_io, activity.clone());
        let session = H2Session::new(io, &H2Settings::default(), WRITE_TIMEOUT, activity, handler);
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
        H: FnMut(Request<RecvBody>, Instant) -> F + Unpin + Send + 'static,
        F: Future<Output = Response<ResponseBody>> + Send + 'static,
    {
        client_with(&h2::client::Builder::new(), handler).await.0
    }

    fn request(method: Method, path: &str) -> Request<()> {
        Request::builder()
            .method(method)
            .uri(format!("http://test{path}"))
            .body(())
            .unwrap()
    }

    /// Answers with the request's method, path and body, and trailers for /grpc.
    async fn echo(request: Request<RecvBody>, _: Instant) -> Response<ResponseBody> {
        use http_body_util::BodyExt;
        let (head, body) = request.into_parts();
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
        let slow_app = |_request, _started| async {
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
}
