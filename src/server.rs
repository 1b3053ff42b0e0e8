//! The accept loop and per-request handling on the tokio side. Tokio threads
//! never touch Ruby: they read the request (head and body), queue a `Job` for
//! the Ruby threads and write back whatever `AppResponse` comes out.

use std::convert::Infallible;
use std::io;
use std::sync::Arc;
use std::time::Duration;

use std::os::fd::{AsRawFd, RawFd};

use bytes::Bytes;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::runtime::{Handle, Runtime};
use tokio::sync::{oneshot, Notify};
use tokio::task::JoinHandle;
use tokio::time::{timeout, timeout_at, Instant};
use tracing::{debug, error, warn};

use crate::body::{read_body, stream_body, BodyError, RequestBody};
use crate::connection::{
    serve, write_request_timeout, Activity, ConnectionCount, Timeouts, WatchedIo,
};
use crate::error::Error;
use crate::h2_settings::H2Settings;
use crate::limits::{check_head, Limits};
use crate::listener::{AsyncListener, Listener};
use crate::queue::{JobQueue, PushError};
use crate::request::{Job, RequestData, ServerInfo};
use crate::response::{plain_response, ResponseBody};
use crate::session::{session_starter, sniff, Protocol, TrackedBody};
use crate::stop::StopSignal;
use http_body::Body as _;
use tokio_rustls::TlsAcceptor;

#[derive(Debug, Clone)]
pub struct ServerOptions {
    /// Time allowed for a request head to arrive (and for a new connection's
    /// first request).
    pub read_timeout: Duration,
    /// An idle keep-alive connection is closed after this.
    pub idle_timeout: Duration,
    /// A client that accepts no response bytes for this long is dropped.
    pub write_timeout: Duration,
    pub limits: Limits,
    /// HTTP/2 settings announced to clients.
    pub h2: H2Settings,
    /// Time allowed for a whole request (head and body).
    pub max_request_read: Duration,
    /// How long a stop waits for in-flight requests before giving up.
    pub graceful_timeout: Duration,
    /// Request bodies up to this size stay in memory.
    pub body_memory_limit: usize,
    /// Tokio worker threads for socket I/O.
    pub io_threads: usize,
}

impl Default for ServerOptions {
    fn default() -> Self {
        Self {
            read_timeout: Duration::from_secs(30),
            idle_timeout: Duration::from_secs(20),
            write_timeout: Duration::from_secs(10),
            limits: Limits::default(),
            h2: H2Settings::default(),
            max_request_read: Duration::from_secs(60),
            graceful_timeout: Duration::from_secs(30),
            body_memory_limit: crate::body::DEFAULT_MEMORY_LIMIT,
            io_threads: 1,
        }
    }
}

/// State shared by the tokio side and the Ruby threads.
pub struct Shared {
    pub queue: JobQueue<Job>,
    pub stop: StopSignal,
    pub options: ServerOptions,
}

impl Shared {
    pub fn new(options: ServerOptions, max_pending: Option<usize>) -> Arc<Self> {
        Arc::new(Self {
            queue: JobQueue::new(max_pending),
            stop: StopSignal::default(),
            options,
        })
    }
}

/// A running accept loop on its own tokio runtime.
pub struct Server {
    runtime: Runtime,
    accept_loop: JoinHandle<()>,
}

impl Server {
    /// Starts the runtime and the accept loop. Must run after any fork: the
    /// runtime's threads exist only in the process that calls this.
    /// With `tls`, every connection is a TLS connection (handshake inside
    /// its own task, bounded by `read_timeout`).
    pub fn start(
        listener: Listener,
        info: ServerInfo,
        shared: Arc<Shared>,
        tls: Option<TlsAcceptor>,
    ) -> Result<Server, Error> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(shared.options.io_threads.max(1))
            .thread_name("hyperion-io")
            .enable_all()
            .build()
            .map_err(Error::Runtime)?;
        let listener = {
            let _entered = runtime.enter();
            listener.into_async().map_err(Error::Runtime)?
        };
        let accept_loop = runtime.spawn(accept_loop(listener, Arc::new(info), shared, tls));
        Ok(Server {
            runtime,
            accept_loop,
        })
    }

    pub fn handle(&self) -> &Handle {
        self.runtime.handle()
    }

    /// Blocks until the accept loop has stopped and drained (after a stop was
    /// requested). Returns false if `cancel` was notified first.
    pub fn wait_stopped(&mut self, cancel: &Notify) -> bool {
        let accept_loop = &mut self.accept_loop;
        self.runtime.block_on(async {
            tokio::select! {
                _ = accept_loop => true,
                _ = cancel.notified() => false,
            }
        })
    }

    /// Stops the runtime; connections still open are dropped.
    pub fn shutdown(self) {
        self.accept_loop.abort();
        self.runtime.shutdown_timeout(Duration::from_secs(1));
    }
}

async fn accept_loop(
    listener: AsyncListener,
    info: Arc<ServerInfo>,
    shared: Arc<Shared>,
    tls: Option<TlsAcceptor>,
) {
    let connections = Arc::new(ConnectionCount::default());
    let stopped = shared.stop.stopped();
    tokio::pin!(stopped);
    loop {
        let accepted = tokio::select! {
            biased;
            _ = &mut stopped => break,
            accepted = accept(&listener) => accepted,
        };
        match accepted {
            Ok(Accepted::Tcp(stream, remote)) => {
                // Responses are written whole or in large chunks; Nagle only adds latency.
                let _ = stream.set_nodelay(true);
                let (info, shared, live) = (info.clone(), shared.clone(), connections.enter());
                let tls = tls.clone();
                tokio::spawn(async move {
                    let _live = live;
                    let peer = Peer {
                        remote_addr: remote,
                        client_cert: None,
                    };
                    match tls {
                        None => serve_plaintext(stream, peer, info, shared).await,
                        Some(acceptor) => serve_tls(acceptor, stream, peer, info, shared).await,
                    }
                });
            }
            Ok(Accepted::Unix(stream)) => {
                let (info, shared, live) = (info.clone(), shared.clone(), connections.enter());
                tokio::spawn(async move {
                    let _live = live;
                    let peer = Peer {
                        remote_addr: Arc::from("127.0.0.1"),
                        client_cert: None,
                    };
                    serve_plaintext(stream, peer, info, shared).await
                });
            }
            Err(e) => {
                // EMFILE and friends: back off briefly instead of spinning.
                warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    }
    // Closing the listener refuses new connections at once; the kernel
    // backlog of a shared (SO_REUSEPORT or inherited) socket stays with the
    // siblings that still listen.
    drop(listener);
    if timeout(shared.options.graceful_timeout, connections.drained())
        .await
        .is_err()
    {
        warn!(
            seconds = shared.options.graceful_timeout.as_secs_f64(),
            "graceful timeout reached; closing the remaining connections"
        );
    }
}

enum Accepted {
    Tcp(tokio::net::TcpStream, Arc<str>),
    Unix(tokio::net::UnixStream),
}

async fn accept(listener: &AsyncListener) -> io::Result<Accepted> {
    match listener {
        AsyncListener::Tcp(l) => {
            let (stream, peer) = l.accept().await?;
            Ok(Accepted::Tcp(stream, Arc::from(peer.ip().to_string())))
        }
        AsyncListener::Unix(l) => Ok(Accepted::Unix(l.accept().await?.0)),
    }
}

/// Who is on the other end of a connection, as the env reports it.
#[derive(Clone)]
struct Peer {
    remote_addr: Arc<str>,
    /// PEM of a verified client certificate (mTLS).
    client_cert: Option<Arc<str>>,
}

/// Serves a plaintext connection: HTTP/2 when it opens with the HTTP/2
/// preface (h2c with prior knowledge), HTTP/1.1 otherwise. A connection that
/// sends nothing within `read_timeout` gets 408.
async fn serve_plaintext<S>(mut stream: S, peer: Peer, info: Arc<ServerInfo>, shared: Arc<Shared>)
where
    S: AsyncRead + AsyncWrite + AsRawFd + Unpin + Send + 'static,
{
    let fd = stream.as_raw_fd();
    let Some((protocol, prefix)) = sniff(&mut stream, shared.options.read_timeout).await else {
        // SAFETY: `stream` owns the descriptor and is alive here.
        unsafe { write_request_timeout(fd) };
        return;
    };
    let raw_fd = (protocol == Protocol::Http1).then_some(fd);
    serve_connection(stream, protocol, prefix, raw_fd, peer, info, shared).await
}

/// Runs the TLS handshake (bounded by `read_timeout`), then serves. A failed
/// or stalled handshake only ends this connection.
async fn serve_tls(
    acceptor: TlsAcceptor,
    stream: tokio::net::TcpStream,
    mut peer: Peer,
    info: Arc<ServerInfo>,
    shared: Arc<Shared>,
) {
    let stream = match timeout(shared.options.read_timeout, acceptor.accept(stream)).await {
        Ok(Ok(stream)) => stream,
        Ok(Err(e)) => return debug!(error = %e, "TLS handshake failed"),
        Err(_) => return debug!("TLS handshake timed out"),
    };
    peer.client_cert = stream
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|chain| chain.first())
        .map(|leaf| Arc::from(crate::tls::pem(leaf)));
    let protocol = match stream.get_ref().1.alpn_protocol() {
        Some(b"h2") => Protocol::Http2,
        _ => Protocol::Http1,
    };
    // No raw 408 under TLS: it would have to be encrypted; a timed-out head
    // just closes.
    serve_connection(stream, protocol, Bytes::new(), None, peer, info, shared).await
}

/// Serves one connection until it ends, in `protocol` (HTTP/1.1 or 2);
/// `prefix` holds bytes already read from it. `plaintext_fd` is the socket's
/// descriptor when bytes can be written to it directly (not TLS).
#[allow(clippy::too_many_arguments)]
async fn serve_connection<S>(
    stream: S,
    protocol: Protocol,
    prefix: Bytes,
    plaintext_fd: Option<RawFd>,
    peer: Peer,
    info: Arc<ServerInfo>,
    shared: Arc<Shared>,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let activity = Activity::new();
    let service = {
        let (info, shared, activity) = (info.clone(), shared.clone(), activity.clone());
        service_fn(move |request| {
            let head_started = activity.request_started();
            let deadline = head_started + shared.options.max_request_read;
            let response = handle_request(
                request,
                deadline,
                peer.clone(),
                info.clone(),
                shared.clone(),
            );
            let activity = activity.clone();
            async move {
                let response = response.await?;
                Ok::<_, Infallible>(response.map(|body| TrackedBody { body, activity }))
            }
        })
    };
    let options = &shared.options;
    let start = session_starter(protocol, options, service);
    let timeouts = Timeouts {
        read: options.read_timeout,
        idle: options.idle_timeout,
        write: options.write_timeout,
    };
    let io = WatchedIo::with_prefix(stream, activity.clone(), prefix);
    serve(io, start, plaintext_fd, activity, timeouts, &shared.stop).await;
}

/// Requests whose body the app reads while it still arrives (gRPC over
/// HTTP/2: `content-type: application/grpc`, `application/grpc+proto`...).
fn is_streaming_rpc(head: &http::request::Parts) -> bool {
    head.headers
        .get(http::header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"))
}

/// Reads a request body whole (memory, then a temp file), or the response
/// that refuses it.
async fn read_whole_body(
    body: Incoming,
    shared: &Shared,
    deadline: Instant,
) -> Result<RequestBody, Response<ResponseBody>> {
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

/// `deadline`: when the whole request (counted from its head's first byte)
/// must have arrived.
async fn handle_request(
    request: Request<Incoming>,
    deadline: Instant,
    peer: Peer,
    server: Arc<ServerInfo>,
    shared: Arc<Shared>,
) -> Result<Response<ResponseBody>, Infallible> {
    let (head, body) = request.into_parts();
    let limits = &shared.options.limits;
    if let Err(rejection) = check_head(&head, limits) {
        debug!(status = %rejection.status, reason = rejection.reason, "request refused");
        // Closing keeps an unread body from ever being parsed as a request.
        return Ok(plain_response(rejection.status, true));
    }
    let body = if is_streaming_rpc(&head) && !body.is_end_stream() {
        // gRPC-style: the app starts now and reads DATA as it arrives.
        RequestBody::Stream(stream_body(body, limits.max_body_bytes, deadline))
    } else {
        match read_whole_body(body, &shared, deadline).await {
            Ok(body) => body,
            Err(response) => return Ok(response),
        }
    };
    let (reply, response) = oneshot::channel();
    let job = Job {
        request: RequestData {
            head,
            body,
            remote_addr: peer.remote_addr,
            client_cert: peer.client_cert,
            server,
        },
        reply,
    };
    match shared.queue.push(job) {
        Ok(()) => {}
        Err(PushError::Full(_)) => {
            return Ok(plain_response(StatusCode::SERVICE_UNAVAILABLE, false));
        }
        Err(PushError::Closed(_)) => {
            return Ok(plain_response(StatusCode::SERVICE_UNAVAILABLE, true));
        }
    }
    Ok(match response.await {
        Ok(app_response) => app_response.into_http(),
        // The job was dropped unanswered: the worker is shutting down.
        Err(_) => plain_response(StatusCode::SERVICE_UNAVAILABLE, true),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::queue::Pop;
    use crate::response::AppResponse;
    use bytes::Bytes;
    use std::io::{Read, Write};
    use std::net::TcpStream;
    use std::sync::atomic::AtomicBool;

    /// Starts a server whose "app" (a plain thread standing in for Ruby)
    /// answers with the method, path and body length it saw.
    fn echo_server() -> (Server, Arc<Shared>, u16, std::thread::JoinHandle<()>) {
        let listener = Listener::bind_reuseport("127.0.0.1", 0).unwrap();
        let port = listener.local_addr().unwrap().port();
        let shared = Shared::new(ServerOptions::default(), None);
        let info = ServerInfo {
            scheme: "http",
            host: "127.0.0.1".into(),
            port,
        };
        let server = Server::start(listener, info, shared.clone(), None).unwrap();
        let consumer = {
            let shared = shared.clone();
            std::thread::spawn(move || {
                let flag = AtomicBool::new(false);
                while let Pop::Job(job) = shared.queue.pop(&flag) {
                    let text = format!(
                        "{} {} {}",
                        job.request.head.method,
                        job.request.head.uri,
                        job.request.body.known_len().unwrap_or_default()
                    );
                    let _ = job.reply.send(AppResponse {
                        status: StatusCode::OK,
                        headers: Default::default(),
                        body: ResponseBody::from_chunks(vec![Bytes::from(text)]),
                    });
                }
            })
        };
        (server, shared, port, consumer)
    }

    fn exchange(port: u16, raw: &[u8]) -> String {
        let mut stream = TcpStream::connect(("127.0.0.1", port)).unwrap();
        stream.write_all(raw).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let mut out = String::new();
        let _ = stream.read_to_string(&mut out);
        out
    }

    #[test]
    fn pipelined_requests_and_chunked_bodies_are_answered_in_order() {
        let (mut server, shared, port, consumer) = echo_server();
        let out = exchange(
            port,
            b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n\
              POST /b HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n\
              GET /c HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        );
        let bodies: Vec<&str> = out
            .split("\r\n\r\n")
            .skip(1)
            .map(|rest| rest.split("HTTP/1.1").next().unwrap())
            .collect();
        assert_eq!(bodies, vec!["GET /a 0", "POST /b 5", "GET /c 0"], "{out}");
        assert!(out.contains("date: "), "hyper adds a Date header: {out}");
        shared.stop.stop();
        assert!(server.wait_stopped(&Notify::new()));
        shared.queue.close();
        consumer.join().unwrap();
        server.shutdown();
    }

    #[test]
    fn a_full_queue_answers_503_with_retry_after() {
        let listener = Listener::bind_reuseport("127.0.0.1", 0).unwrap();
        let port = listener.local_addr().unwrap().port();
        let shared = Shared::new(ServerOptions::default(), Some(1));
        let info = ServerInfo {
            scheme: "http",
            host: "127.0.0.1".into(),
            port,
        };
        let server = Server::start(listener, info, shared.clone(), None).unwrap();
        // No consumer: the first request fills the queue, the second is refused.
        let mut first = TcpStream::connect(("127.0.0.1", port)).unwrap();
        first
            .write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            .unwrap();
        while shared.queue.is_empty() {
            std::thread::sleep(Duration::from_millis(5));
        }
        let out = exchange(
            port,
            b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        );
        assert!(out.starts_with("HTTP/1.1 503"), "{out}");
        assert!(out.contains("retry-after: 1"), "{out}");
        drop(first);
        shared.stop.stop();
        server.shutdown();
    }
}
