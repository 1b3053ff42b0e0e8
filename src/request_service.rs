//! A connection's requests, from the protocol being chosen to the app's
//! answer: the hyper service (HTTP/1.1) or the h2 session (HTTP/2) of one
//! connection, and for each request the checks, the body, the job queued
//! for the Ruby threads, and what the response needs on the way out (early
//! hints, a takeover for `rack.hijack`, sendfile, the exchange for stats and
//! the access log).

use std::convert::Infallible;
use std::future::Future;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body::Body;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use tokio::sync::oneshot;
use tokio::time::{timeout_at, Instant};
use tracing::{debug, error};

use crate::body::{discard_briefly, read_body, stream_body, BodyError, RequestBody};
use crate::connection::{serve, Activity, Timeouts, WatchedIo};
use crate::dispatch::PushError;
use crate::exchange::Exchange;
use crate::http2::H2Session;
use crate::interim::{self, EarlyHints, InterimQueue};
use crate::limits::check_head;
use crate::request::{Job, RequestData, ServerInfo};
use crate::response::{plain_response, ResponseBody};
use crate::sendfile::{self, SendFile};
use crate::server::{Peer, Shared};
use crate::session::{http1_starter, Protocol, TrackedBody};
use crate::takeover::{ConnectionStream, OpenRequest, TakeoverHandle, TakeoverPoint};
use crate::written::WrittenNotice;

/// What the requests of one connection share.
struct ConnectionContext {
    peer: Peer,
    info: Arc<ServerInfo>,
    shared: Arc<Shared>,
    activity: Arc<Activity>,
    /// HTTP/1.1 requests answered so far (`max_keepalive_requests`).
    served: AtomicU32,
    /// HTTP/1.1 with early hints on: the interim bytes the requests queue
    /// for the connection's `InterimIo`.
    interim: Option<Arc<InterimQueue>>,
    /// HTTP/1.x: where a request asks to take the connection over
    /// (`rack.hijack`, sendfile).
    takeover: Option<Arc<TakeoverPoint>>,
    /// HTTP/1.x on a plain socket: large files go out with sendfile(2).
    sendfile: bool,
}

impl ConnectionContext {
    /// Answers an HTTP/1.1 request from hyper.
    fn respond_http1(
        self: &Arc<Self>,
        request: Request<Incoming>,
    ) -> impl Future<Output = Result<Response<TrackedBody>, Infallible>> {
        let options = &self.shared.options;
        let last = options.max_keepalive_requests.is_some_and(|max| {
            self.served
                .fetch_add(1, Ordering::Relaxed)
                .saturating_add(1)
                >= max
        });
        let started = self.activity.request_started();
        let deadline = started + options.max_request_read;
        let exchange = self.exchange(&request, started);
        let (early_hints, hints) = match &self.interim {
            None => (None, None),
            Some(_) if request.version() < http::Version::HTTP_11 => {
                (Some(EarlyHints::inert()), None)
            }
            Some(_) => {
                let (early_hints, hints) = interim::channel();
                (Some(early_hints), Some(hints))
            }
        };
        let (takeover, open) = match &self.takeover {
            Some(point) => {
                let (handle, open) = point.open(request.version());
                (Some(handle), Some(open))
            }
            None => (None, None),
        };
        // What sendfile needs to know of the request once it is gone.
        let sendfile = (self.sendfile
            && sendfile::request_allows(
                request.method(),
                !is_streaming_rpc(request.headers()) || request.body().is_end_stream(),
            ))
        .then(|| {
            let keep_alive = sendfile::request_keeps_alive(request.version(), request.headers());
            (takeover.clone(), keep_alive)
        });
        let context = self.clone();
        let mut awaiting = AwaitingResponse {
            exchange: Some(exchange),
            open,
        };
        async move {
            let response = handle_request(request, deadline, &context, early_hints, takeover);
            let mut response = match (hints, &context.interim) {
                (Some(hints), Some(queue)) => interim::http1_exchange(queue, hints, response).await,
                _ => response.await,
            };
            // A stop has begun: tell a keep-alive client before closing.
            if last || context.shared.stop.is_stopped() {
                response.headers_mut().insert(
                    http::header::CONNECTION,
                    http::HeaderValue::from_static("close"),
                );
            }
            if let Some((Some(handle), keep_alive)) = sendfile {
                if sendfile::wants_sendfile(&response) {
                    response = awaiting.send_file(&handle, keep_alive, response, &context);
                }
            }
            if awaiting.open.as_ref().is_some_and(|open| !open.close()) {
                // The request is taking the connection over: the task takes
                // it from hyper, dropping this future with `awaiting`.
                std::future::pending::<()>().await;
            }
            let mut exchange = awaiting.finish();
            exchange.responded(&response);
            let activity = context.activity.clone();
            let written = response.extensions_mut().remove::<WrittenNotice>();
            Ok(response.map(|body| TrackedBody::new(body, activity, exchange, written)))
        }
    }

    /// Starts recording a request for the stats and the access log.
    fn exchange<B>(&self, request: &Request<B>, started: Instant) -> Exchange {
        let shared = &self.shared;
        Exchange::begin(
            &shared.stats,
            shared.options.access_log,
            request,
            &self.peer.remote_addr,
            started,
        )
    }
}

/// An HTTP/1.x request's exchange while its response is awaited. When the
/// app takes the connection over (`rack.hijack`), the connection's task
/// drops the service future holding this: the exchange is then recorded as
/// handed over, not as a client that left.
struct AwaitingResponse {
    exchange: Option<Exchange>,
    open: Option<OpenRequest>,
}

impl AwaitingResponse {
    /// Hands `response` (a file) to a sendfile job that takes the connection
    /// over, with the exchange; or gives it back when the connection cannot
    /// be taken (the app took it already), for hyper to send or drop.
    fn send_file(
        &mut self,
        takeover: &TakeoverHandle,
        request_keep_alive: bool,
        response: Response<ResponseBody>,
        context: &ConnectionContext,
    ) -> Response<ResponseBody> {
        let Some(mut exchange) = self.exchange.take() else {
            return response;
        };
        exchange.responded(&response);
        let job = SendFile::new(
            takeover.version(),
            request_keep_alive,
            response,
            exchange,
            context.shared.stats.clone(),
        );
        match takeover.take_over_typed(job) {
            // Sent by the job; `open.close()` now says so.
            Ok(()) => Response::new(ResponseBody::Empty),
            Err(job) => {
                let (response, exchange) = job.into_parts();
                self.exchange = Some(exchange);
                response
            }
        }
    }

    /// The response is ready and will be sent.
    fn finish(&mut self) -> Exchange {
        self.open = None;
        match self.exchange.take() {
            Some(exchange) => exchange,
            // `finish` is called once, from the one place that sends.
            None => unreachable!("a request's exchange finished twice"),
        }
    }
}

impl Drop for AwaitingResponse {
    fn drop(&mut self) {
        if let (Some(exchange), Some(open)) = (&mut self.exchange, &self.open) {
            if open.taken_over() {
                exchange.handed_over();
            }
        }
    }
}

/// Serves one connection until it ends, in `protocol` (HTTP/1.1 or 2);
/// `prefix` holds bytes already read from it.
pub(crate) async fn serve_connection<S>(
    stream: S,
    protocol: Protocol,
    prefix: Bytes,
    peer: Peer,
    info: Arc<ServerInfo>,
    shared: Arc<Shared>,
) where
    S: ConnectionStream,
{
    let activity = Activity::new();
    let context = Arc::new(ConnectionContext {
        peer,
        info,
        shared: shared.clone(),
        activity: activity.clone(),
        served: AtomicU32::new(0),
        interim: (protocol == Protocol::Http1 && shared.options.early_hints)
            .then(|| Arc::new(InterimQueue::default())),
        takeover: (protocol == Protocol::Http1).then(TakeoverPoint::new),
        sendfile: protocol == Protocol::Http1 && stream.socket().is_some(),
    });
    let options = &shared.options;
    let timeouts = Timeouts {
        read: options.read_timeout,
        max_request_read: options.max_request_read,
        idle: options.idle_timeout,
        write: options.write_timeout,
    };
    let io = WatchedIo::with_prefix(stream, activity.clone(), prefix);
    let stop = &shared.stop;
    let _open = shared.stats.connection_opened(match protocol {
        Protocol::Http1 => 0,
        Protocol::Http2 => 1,
    });
    match protocol {
        Protocol::Http1 => {
            let interim = context.interim.clone();
            let takeover = context.takeover.clone();
            let service = service_fn(move |request| context.respond_http1(request));
            let start = http1_starter(options, interim, service);
            serve(io, start, activity, timeouts, stop, takeover.as_deref()).await;
        }
        Protocol::Http2 => {
            let start = |io| {
                let context = context.clone();
                let respond = move |request, head_started: Instant, early_hints| {
                    let deadline = head_started + context.shared.options.max_request_read;
                    let exchange = context.exchange(&request, head_started);
                    let context = context.clone();
                    async move {
                        let response =
                            handle_request(request, deadline, &context, early_hints, None).await;
                        (response, exchange)
                    }
                };
                H2Session::new(io, options, activity.clone(), respond)
            };
            serve(io, start, activity.clone(), timeouts, stop, None).await;
        }
    }
}

/// Requests whose body the app reads while it still arrives (gRPC over
/// HTTP/2: `content-type: application/grpc`, `application/grpc+proto`...).
fn is_streaming_rpc(headers: &http::HeaderMap) -> bool {
    headers
        .get(http::header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"))
}

/// Reads a request body whole (memory, then a temp file), or the response
/// that refuses it.
async fn read_whole_body<B>(
    body: B,
    shared: &Shared,
    deadline: Instant,
) -> Result<RequestBody, Response<ResponseBody>>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: std::fmt::Display,
{
    let limits = &shared.options.limits;
    let reading = read_body(
        body,
        shared.options.body_memory_limit,
        limits.max_body_bytes,
    );
    match timeout_at(deadline, reading).await {
        Ok(Ok(body)) => Ok(body),
        Ok(Err(BodyError::TooLarge)) => Err(plain_response(StatusCode::PAYLOAD_TOO_LARGE, true)),
        Ok(Err(BodyError::Client(e))) => {
            debug!(error = %e, "bad request body");
            Err(plain_response(StatusCode::BAD_REQUEST, true))
        }
        Ok(Err(BodyError::Spill(e))) => {
            error!(error = %e, "could not buffer the request body to a temporary file");
            Err(plain_response(StatusCode::INTERNAL_SERVER_ERROR, true))
        }
        Err(_) => Err(plain_response(StatusCode::REQUEST_TIMEOUT, true)),
    }
}

/// How much of a refused HTTP/2 request body is taken before answering (the
/// default initial stream window), and for how long at most.
const REFUSED_H2_BODY_BYTES: u64 = 65_535;
const REFUSED_H2_BODY_TIME: Duration = Duration::from_secs(1);

/// Answers one request of either HTTP version: checks it, reads its body
/// (or starts streaming it), queues it for the Ruby threads and waits for
/// their answer. `deadline`: when the whole request (counted from its head's
/// first byte) must have arrived. `early_hints`: the app's
/// `rack.early_hints`, when enabled; `takeover`: the request's right to
/// take its HTTP/1.x connection over (`rack.hijack`).
async fn handle_request<B>(
    request: Request<B>,
    deadline: Instant,
    context: &ConnectionContext,
    early_hints: Option<EarlyHints>,
    takeover: Option<TakeoverHandle>,
) -> Response<ResponseBody>
where
    B: Body<Data = Bytes> + Unpin + Send + 'static,
    B::Error: std::fmt::Display,
{
    let shared = &context.shared;
    let (head, body) = request.into_parts();
    let limits = &shared.options.limits;
    if let Err(rejection) = check_head(&head, limits) {
        debug!(status = %rejection.status, reason = rejection.reason, "request refused");
        if head.version == http::Version::HTTP_2 && !body.is_end_stream() {
            discard_briefly(body, REFUSED_H2_BODY_BYTES, REFUSED_H2_BODY_TIME).await;
        }
        // Closing keeps an unread body from ever being parsed as a request.
        return plain_response(rejection.status, true);
    }
    let body = if is_streaming_rpc(&head.headers) && !body.is_end_stream() {
        // gRPC-style: the app starts now and reads DATA as it arrives.
        RequestBody::Stream(stream_body(body, limits.max_body_bytes, deadline))
    } else {
        match read_whole_body(body, shared, deadline).await {
            Ok(body) => body,
            Err(response) => return response,
        }
    };
    let remote_addr = shared
        .options
        .remote_address
        .for_request(&head.headers, &context.peer.remote_addr);
    let (reply, response) = oneshot::channel();
    let job = Job {
        request: RequestData {
            head,
            body,
            remote_addr,
            client_cert: context.peer.client_cert.clone(),
            server: context.info.clone(),
            early_hints,
            takeover,
        },
        reply,
    };
    match shared.queue.push(job) {
        Ok(()) => {}
        Err(PushError::Full(_)) => {
            return plain_response(StatusCode::SERVICE_UNAVAILABLE, false);
        }
        Err(PushError::Closed(_)) => {
            return plain_response(StatusCode::SERVICE_UNAVAILABLE, true);
        }
    }
    match response.await {
        Ok(app_response) => app_response.into_http(),
        // The job was dropped unanswered: the worker is shutting down.
        Err(_) => plain_response(StatusCode::SERVICE_UNAVAILABLE, true),
    }
}
