//! The accept loop on the tokio side: listeners, the connection limit, the
//! PROXY header and TLS handshake, the choice of protocol; then each
//! connection goes to `request_service`. Tokio threads never touch Ruby:
//! they read the request (head and body), queue a `Job` for the Ruby threads
//! and write back whatever `AppResponse` comes out.

use std::io;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::runtime::{Handle, Runtime};
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinHandle;
use tokio::time::{timeout, timeout_at, Instant};
use tokio_rustls::TlsAcceptor;
use tracing::{debug, warn};

use crate::connection::{write_request_timeout, ConnectionCount, ConnectionGuard};
use crate::dispatch::{Dispatcher, Policy};
use crate::error::Error;
use crate::exchange::AccessLog;
use crate::h2_settings::H2Settings;
use crate::health::Health;
use crate::limits::Limits;
use crate::listener::{AsyncListener, Listener};
use crate::proxy_protocol::{take_header, Peek};
use crate::remote_address::RemoteAddress;
use crate::request::{Job, ServerInfo};
use crate::request_service::serve_connection;
use crate::session::{sniff, Protocol};
use crate::stats::StatsPage;
use crate::stop::StopSignal;
use crate::takeover::ConnectionStream;

/// nginx's `keepalive_requests` default.
pub const DEFAULT_MAX_KEEPALIVE_REQUESTS: u32 = 1000;

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
    /// An HTTP/1.1 connection is closed (`connection: close`) after this many
    /// requests, so keep-alive clients reconnect now and then and the kernel
    /// spreads them afresh across SO_REUSEPORT workers. None: no limit.
    pub max_keepalive_requests: Option<u32>,
    /// At most this many connections at once, over all listeners (an HTTP/2
    /// connection is one). At the limit nothing more is accepted until one
    /// closes: new connections wait in the kernel's backlog, where a sibling
    /// worker sharing the socket can take them. None: no limit.
    pub max_connections: Option<usize>,
    /// The app may send `103 Early Hints` (`rack.early_hints`).
    pub early_hints: bool,
    /// Where REMOTE_ADDR comes from; with the PROXY protocol, every
    /// connection must open with its header.
    pub remote_address: RemoteAddress,
    /// One access-log line per response (`crate::exchange`); None: off.
    pub access_log: Option<AccessLog>,
    /// With `async_io`: request fibers a worker runs at once (beyond it,
    /// requests wait in the queue).
    pub max_fibers: usize,
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
            max_keepalive_requests: Some(DEFAULT_MAX_KEEPALIVE_REQUESTS),
            max_connections: None,
            early_hints: false,
            remote_address: RemoteAddress::Socket,
            access_log: None,
            max_fibers: 1000,
        }
    }
}

/// State shared by the tokio side and the Ruby threads.
pub struct Shared {
    /// Requests waiting for an app thread, and the policy that wakes them.
    pub queue: Dispatcher<Job>,
    pub stop: StopSignal,
    pub options: ServerOptions,
    pub health: Health,
    /// The worker's counters (`crate::stats`), read by `/stats` and `/metrics`.
    pub stats: Arc<StatsPage>,
    /// A stop was asked for and `drain_delay` runs: the worker still serves,
    /// but the control listener's `/ready` already answers 503.
    pub draining: AtomicBool,
}

impl Shared {
    pub fn new(options: ServerOptions, max_pending: Option<usize>) -> Arc<Self> {
        let stats = StatsPage::new(false).expect("mapping one page for the worker's stats");
        Self::with_stats(options, max_pending, Arc::new(stats))
    }

    /// Shared state whose counters live in `stats` (a page the cluster
    /// master can read).
    pub fn with_stats(
        options: ServerOptions,
        max_pending: Option<usize>,
        stats: Arc<StatsPage>,
    ) -> Arc<Self> {
        Arc::new(Self {
            queue: Dispatcher::with_stats(max_pending, Policy::default(), stats.clone()),
            stop: StopSignal::default(),
            options,
            health: Health::default(),
            stats,
            draining: AtomicBool::new(false),
        })
    }

    /// Whether a load balancer should send this worker new requests: false
    /// from the moment a stop is asked for (`drain_delay` included).
    pub fn is_ready(&self) -> bool {
        !self.draining.load(Ordering::Acquire) && !self.stop.is_stopped()
    }
}

/// One listening socket to serve: what the Rack env reports for it
/// (`info`), and whether its connections are TLS (`tls`).
pub struct Endpoint {
    pub listener: Listener,
    pub info: ServerInfo,
    pub tls: Option<TlsAcceptor>,
}

/// The accept loop (over every endpoint) on its own tokio runtime.
pub struct Server {
    runtime: Runtime,
    /// Ends once the accept loop has stopped and the connections of all of
    /// them have drained (or `graceful_timeout` passed).
    accept_loop: JoinHandle<()>,
}

impl Server {
    /// Starts the runtime and the accept loop over all endpoints; all of them feed
    /// `shared.queue` and stop together on `shared.stop`. Must run after any
    /// fork: the runtime's threads exist only in the process that calls this.
    /// On an endpoint with `tls`, every connection is a TLS connection
    /// (handshake inside its own task, bounded by `read_timeout`).
    pub fn start(endpoints: Vec<Endpoint>, shared: Arc<Shared>) -> Result<Server, Error> {
        if endpoints.is_empty() {
            return Err(Error::Listener("no listening socket to serve".into()));
        }
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(shared.options.io_threads.max(1))
            .thread_name("hyperion-io")
            .enable_all()
            .build()
            .map_err(Error::Runtime)?;
        let endpoints = {
            let _entered = runtime.enter();
            endpoints
                .into_iter()
                .map(|e| {
                    let listener = e.listener.into_async().map_err(Error::Runtime)?;
                    Ok((listener, Arc::new(e.info), e.tls))
                })
                .collect::<Result<Vec<_>, Error>>()?
        };
        let accept_loop = runtime.spawn(serve_endpoints(endpoints, shared));
        Ok(Server {
            runtime,
            accept_loop,
        })
    }

    pub fn handle(&self) -> &Handle {
        self.runtime.handle()
    }

    /// Blocks until the accept loop has stopped and drained (after a stop
    /// was requested). Returns false if `cancel` was notified first.
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

/// A listener being served, with what its connections need.
type Serving = (AsyncListener, Arc<ServerInfo>, Option<TlsAcceptor>);

/// Accepts on every endpoint until a stop, closes the listeners, then waits
/// (until `graceful_timeout` after the stop began) for their connections to
/// finish.
async fn serve_endpoints(endpoints: Vec<Serving>, shared: Arc<Shared>) {
    let connections = Arc::new(ConnectionCount::default());
    accept_loop(&endpoints, &shared, &connections).await;
    // Closing the listeners refuses new connections at once; the kernel
    // backlog of a shared (SO_REUSEPORT or inherited) socket stays with the
    // siblings that still listen.
    drop(endpoints);
    let deadline = shared.stop.deadline(shared.options.graceful_timeout);
    if timeout_at(Instant::from_std(deadline), connections.drained())
        .await
        .is_err()
    {
        warn!(
            seconds = shared.options.graceful_timeout.as_secs_f64(),
            "graceful timeout reached; closing the remaining connections"
        );
    }
}

/// Accepts on all listeners until a stop, each connection in its own task.
/// With `max_connections`, a slot is taken before accepting, so at the limit
/// nothing is accepted until a connection closes and frees its slot. One
/// loop serves every listener (polled from a rotating start, so a busy one
/// cannot starve the others): a slot is never held by one listener's
/// accept while another listener has connections waiting.
async fn accept_loop(
    endpoints: &[Serving],
    shared: &Arc<Shared>,
    connections: &Arc<ConnectionCount>,
) {
    let slots = shared
        .options
        .max_connections
        .map(|max| Arc::new(Semaphore::new(max)));
    let stopped = shared.stop.stopped();
    tokio::pin!(stopped);
    let _running = shared.health.accept_loop();
    let mut next = 0;
    loop {
        let slot = match &slots {
            None => None,
            Some(slots) => tokio::select! {
                biased;
                _ = &mut stopped => break,
                // The semaphore is never closed, so this never fails.
                slot = slots.clone().acquire_owned() => slot.ok(),
            },
        };
        let (index, accepted) = tokio::select! {
            biased;
            _ = &mut stopped => break,
            accepted = accept_any(endpoints, &mut next) => accepted,
        };
        let (_, info, tls) = &endpoints[index];
        let held = (connections.enter(), slot);
        match accepted {
            Ok(Accepted::Tcp(stream, remote)) => {
                // Responses are written whole or in large chunks; Nagle only adds latency.
                let _ = stream.set_nodelay(true);
                spawn_connection(stream, remote, info, tls, shared, held);
            }
            Ok(Accepted::Unix(stream)) => {
                spawn_connection(stream, Arc::from("127.0.0.1"), info, tls, shared, held);
            }
            Err(e) => {
                // EMFILE and friends: back off briefly instead of spinning.
                warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    }
}

/// What a connection's task holds until it ends: its place in the drain
/// count and its `max_connections` slot.
type Held = (ConnectionGuard, Option<OwnedSemaphorePermit>);

/// Serves an accepted connection in its own task, which holds `held` until it
/// ends. Plaintext and TLS connections get tasks of their own types on
/// purpose: a future is as large as its largest state and stays allocated
/// while its connection is open, parked or not. One task type with a `match`
/// on `tls` made every plaintext connection's task as large as the TLS one
/// (6.5 KiB instead of 1.8); `connection_tasks_stay_small` checks both sizes.
fn spawn_connection<S>(
    stream: S,
    remote_addr: Arc<str>,
    info: &Arc<ServerInfo>,
    tls: &Option<TlsAcceptor>,
    shared: &Arc<Shared>,
    held: Held,
) where
    S: ConnectionStream + AsRawFd + Peek,
{
    let (info, shared) = (info.clone(), shared.clone());
    let peer = Peer {
        remote_addr,
        client_cert: None,
    };
    match tls {
        None => tokio::spawn(plaintext_task(stream, peer, info, shared, held)),
        Some(acceptor) => {
            let acceptor = acceptor.clone();
            tokio::spawn(tls_task(acceptor, stream, peer, info, shared, held))
        }
    };
}

/// A plaintext connection's whole task.
async fn plaintext_task<S>(
    stream: S,
    peer: Peer,
    info: Arc<ServerInfo>,
    shared: Arc<Shared>,
    held: Held,
) where
    S: ConnectionStream + AsRawFd + Peek,
{
    // Declared first, dropped last: the socket closes before the slot frees.
    let _held = held;
    serve_plaintext(stream, peer, info, shared).await
}

/// A TLS connection's whole task.
async fn tls_task<S>(
    acceptor: TlsAcceptor,
    stream: S,
    peer: Peer,
    info: Arc<ServerInfo>,
    shared: Arc<Shared>,
    held: Held,
) where
    S: AsyncRead + AsyncWrite + Peek + Unpin + Send + 'static,
{
    // As in `plaintext_task`.
    let _held = held;
    serve_tls(acceptor, stream, peer, info, shared).await
}

enum Accepted {
    Tcp(tokio::net::TcpStream, Arc<str>),
    Unix(tokio::net::UnixStream),
}

/// The next connection on any listener, and which listener it came from.
/// Listeners are tried from `next` on, which then moves past the one that
/// answered.
fn accept_any<'a>(
    endpoints: &'a [Serving],
    next: &'a mut usize,
) -> impl std::future::Future<Output = (usize, io::Result<Accepted>)> + 'a {
    std::future::poll_fn(move |cx| {
        let count = endpoints.len();
        for offset in 0..count {
            let index = (*next + offset) % count;
            if let Poll::Ready(accepted) = poll_accept(&endpoints[index].0, cx) {
                *next = (index + 1) % count;
                return Poll::Ready((index, accepted));
            }
        }
        Poll::Pending
    })
}

fn poll_accept(listener: &AsyncListener, cx: &mut Context<'_>) -> Poll<io::Result<Accepted>> {
    match listener {
        AsyncListener::Tcp(l) => l
            .poll_accept(cx)
            .map_ok(|(stream, peer)| Accepted::Tcp(stream, Arc::from(peer.ip().to_string()))),
        AsyncListener::Unix(l) => l
            .poll_accept(cx)
            .map_ok(|(stream, _)| Accepted::Unix(stream)),
    }
}

/// Who is on the other end of a connection, as the env reports it.
#[derive(Clone)]
pub(crate) struct Peer {
    pub(crate) remote_addr: Arc<str>,
    /// PEM of a verified client certificate (mTLS).
    pub(crate) client_cert: Option<Arc<str>>,
}

/// With the PROXY protocol on, takes the header that must open the
/// connection (within `read_timeout`) and the client it names. False: the
/// connection is refused and must be closed.
async fn take_proxy_header<S>(stream: &mut S, peer: &mut Peer, options: &ServerOptions) -> bool
where
    S: AsyncRead + Peek + Unpin,
{
    let version = options.remote_address.proxy_protocol();
    take_header(stream, version, options.read_timeout, &mut peer.remote_addr).await
}

/// Serves a plaintext connection: HTTP/2 when it opens with the HTTP/2
/// preface (h2c with prior knowledge), HTTP/1.1 otherwise. A connection that
/// sends nothing within `read_timeout` gets 408. With the PROXY protocol on,
/// its header comes first.
async fn serve_plaintext<S>(
    mut stream: S,
    mut peer: Peer,
    info: Arc<ServerInfo>,
    shared: Arc<Shared>,
) where
    S: ConnectionStream + AsRawFd + Peek,
{
    if !take_proxy_header(&mut stream, &mut peer, &shared.options).await {
        return;
    }
    let fd = stream.as_raw_fd();
    let Some((protocol, prefix)) = sniff(&mut stream, shared.options.read_timeout).await else {
        // SAFETY: `stream` owns the descriptor and is alive here.
        unsafe { write_request_timeout(fd) };
        return;
    };
    serve_connection(stream, protocol, prefix, peer, info, shared).await
}

/// Runs the TLS handshake (bounded by `read_timeout`), then serves. A failed
/// or stalled handshake only ends this connection. With the PROXY protocol
/// on, its header comes first, in plaintext.
async fn serve_tls<S>(
    acceptor: TlsAcceptor,
    mut stream: S,
    mut peer: Peer,
    info: Arc<ServerInfo>,
    shared: Arc<Shared>,
) where
    S: AsyncRead + AsyncWrite + Peek + Unpin + Send + 'static,
{
    if !take_proxy_header(&mut stream, &mut peer, &shared.options).await {
        return;
    }
    // Boxed as soon as the handshake returns it: the rustls connection takes
    // 1.2 KiB, and inline it would take a slot in this task's future once per
    // nested future that holds it (a local, once borrowed, keeps its slot
    // too), for the connection's whole life.
    let stream = match timeout(shared.options.read_timeout, acceptor.accept(stream)).await {
        Ok(Ok(stream)) => Box::new(stream),
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
    serve_connection(stream, protocol, Bytes::new(), peer, info, shared).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dispatch::Pop;
    use crate::response::{AppResponse, ResponseBody};
    use bytes::Bytes;
    use hyper::StatusCode;
    use std::io::{Read, Write};
    use std::net::TcpStream;
    use std::sync::atomic::AtomicBool;

    /// A plain endpoint on a fresh 127.0.0.1 port, and that port.
    fn plain_endpoint() -> (Endpoint, u16) {
        let listener = Listener::bind_reuseport("127.0.0.1", 0).unwrap();
        let port = listener.local_addr().unwrap().port();
        let info = ServerInfo {
            scheme: "http",
            host: "127.0.0.1".into(),
            port,
        };
        let endpoint = Endpoint {
            listener,
            info,
            tls: None,
        };
        (endpoint, port)
    }

    /// Starts a server on `endpoints` whose "app" (a plain thread standing in
    /// for Ruby) answers with the method, path and body length it saw, then
    /// the scheme and port of the listener the request came in on. For
    /// /hints it sends a 103 Early Hints first, when it can.
    fn echo_server_on(
        endpoints: Vec<Endpoint>,
    ) -> (Server, Arc<Shared>, std::thread::JoinHandle<()>) {
        echo_server_with(endpoints, ServerOptions::default())
    }

    /// Starts a server on `endpoints` whose "app" is `app`, called with each
    /// job on one plain thread standing in for Ruby's, until the queue
    /// closes (`stop_server`).
    fn app_server(
        endpoints: Vec<Endpoint>,
        options: ServerOptions,
        mut app: impl FnMut(Job) + Send + 'static,
    ) -> (Server, Arc<Shared>, std::thread::JoinHandle<()>) {
        let shared = Shared::new(options, None);
        let server = Server::start(endpoints, shared.clone()).unwrap();
        let consumer = {
            let shared = shared.clone();
            std::thread::spawn(move || {
                let flag = AtomicBool::new(false);
                let consumer = shared.queue.consumer();
                while let Pop::Job(job) = shared.queue.pop(&consumer, &flag) {
                    app(job);
                }
            })
        };
        (server, shared, consumer)
    }

    fn echo_server_with(
        endpoints: Vec<Endpoint>,
        options: ServerOptions,
    ) -> (Server, Arc<Shared>, std::thread::JoinHandle<()>) {
        app_server(endpoints, options, |job| {
            if let (Some(hints), "/hints") = (&job.request.early_hints, job.request.head.uri.path())
            {
                let mut fields = http::HeaderMap::new();
                fields.insert("link", http::HeaderValue::from_static("</a.css>"));
                hints.send(fields);
            }
            let text = format!(
                "{} {} {} {}:{}",
                job.request.head.method,
                job.request.head.uri,
                job.request.body.known_len().unwrap_or_default(),
                job.request.server.scheme,
                job.request.server.port,
            );
            let _ = job.reply.send(AppResponse::new(
                StatusCode::OK,
                Default::default(),
                ResponseBody::from_chunks(vec![Bytes::from(text)]),
            ));
        })
    }

    fn echo_server() -> (Server, Arc<Shared>, u16, std::thread::JoinHandle<()>) {
        let (endpoint, port) = plain_endpoint();
        let (server, shared, consumer) = echo_server_on(vec![endpoint]);
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
        let (server, shared, port, consumer) = echo_server();
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
        let http = format!("http:{port}");
        assert_eq!(
            bodies,
            vec![
                format!("GET /a 0 {http}"),
                format!("POST /b 5 {http}"),
                format!("GET /c 0 {http}")
            ],
            "{out}"
        );
        assert!(out.contains("date: "), "hyper adds a Date header: {out}");
        stop_server(server, shared, consumer);
    }

    #[test]
    fn early_hints_precede_their_response_and_never_reach_http_1_0() {
        let (endpoint, port) = plain_endpoint();
        let options = ServerOptions {
            early_hints: true,
            ..ServerOptions::default()
        };
        let (server, shared, consumer) = echo_server_with(vec![endpoint], options);
        let out = exchange(
            port,
            b"GET /hints HTTP/1.1\r\nHost: x\r\n\r\n\
              GET /hints HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        );
        let without_bodies = out.replace(&format!("GET /hints 0 http:{port}"), "");
        let heads: Vec<&str> = without_bodies
            .split("\r\n")
            .filter(|line| line.starts_with("HTTP/1.1") || line.starts_with("link"))
            .collect();
        assert_eq!(
            heads,
            [
                "HTTP/1.1 103 Early Hints",
                "link: </a.css>",
                "HTTP/1.1 200 OK",
                "HTTP/1.1 103 Early Hints",
                "link: </a.css>",
                "HTTP/1.1 200 OK"
            ],
            "{out}"
        );
        let out = exchange(port, b"GET /hints HTTP/1.0\r\nHost: x\r\n\r\n");
        assert!(out.starts_with("HTTP/1.0 200 OK"), "{out}");
        assert!(!out.contains("103"), "{out}");
        stop_server(server, shared, consumer);
    }

    #[test]
    fn a_full_queue_answers_503_with_retry_after() {
        let (endpoint, port) = plain_endpoint();
        let shared = Shared::new(ServerOptions::default(), Some(1));
        let server = Server::start(vec![endpoint], shared.clone()).unwrap();
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

    #[test]
    fn every_endpoint_is_served_with_its_own_server_info_and_all_stop_together() {
        let (first, first_port) = plain_endpoint();
        let (mut second, second_port) = plain_endpoint();
        second.info.scheme = "https-in-name-only";
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.sock");
        let unix = Endpoint {
            listener: Listener::Unix(std::os::unix::net::UnixListener::bind(&path).unwrap()),
            info: ServerInfo {
                scheme: "http",
                host: "localhost".into(),
                port: 0,
            },
            tls: None,
        };
        let (mut server, shared, consumer) = echo_server_on(vec![first, second, unix]);
        let request = b"GET /x HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n";
        let out = exchange(first_port, request);
        assert!(
            out.ends_with(&format!("GET /x 0 http:{first_port}")),
            "{out}"
        );
        let out = exchange(second_port, request);
        assert!(
            out.ends_with(&format!("GET /x 0 https-in-name-only:{second_port}")),
            "{out}"
        );
        let mut stream = std::os::unix::net::UnixStream::connect(&path).unwrap();
        stream.write_all(request).unwrap();
        let mut out = String::new();
        stream.read_to_string(&mut out).unwrap();
        assert!(out.ends_with("GET /x 0 http:0"), "{out}");

        shared.stop.stop();
        assert!(server.wait_stopped(&Notify::new()));
        // Every listener is closed once the loops have stopped.
        assert!(TcpStream::connect(("127.0.0.1", first_port)).is_err());
        assert!(TcpStream::connect(("127.0.0.1", second_port)).is_err());
        assert!(std::os::unix::net::UnixStream::connect(&path).is_err());
        shared.queue.close();
        consumer.join().unwrap();
        server.shutdown();
    }

    /// Every open connection holds its task's future, parked or not, and a
    /// future is as large as its largest state: these bounds keep an idle
    /// connection cheap (a plaintext task grew to 6.5 KiB once, when it also
    /// held the TLS handshake's states; see bench/RESULTS.md).
    #[tokio::test]
    async fn connection_tasks_stay_small() {
        // Both measure about 1.8 KiB (rustc 1.95, tokio 1.54, hyper 1.12,
        // rustls 0.23). Sharing the TLS task's type made a plaintext task
        // 6.5 KiB; each rustls connection held inline adds 1.2 KiB.
        const MAX_TASK_BYTES: usize = 2560;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let connect = || tokio::net::TcpStream::connect(addr);
        let shared = Shared::new(ServerOptions::default(), None);
        let info = Arc::new(ServerInfo {
            scheme: "http",
            host: "127.0.0.1".into(),
            port: addr.port(),
        });
        let peer = Peer {
            remote_addr: Arc::from("127.0.0.1"),
            client_cert: None,
        };
        let connections = Arc::new(ConnectionCount::default());
        let acceptor = crate::tls::acceptor(&crate::tls::TlsSettings {
            certificate: crate::tls::Certificate::SelfSigned,
            client_auth: crate::tls::ClientAuth::None,
        })
        .unwrap();

        let plaintext = plaintext_task(
            connect().await.unwrap(),
            peer.clone(),
            info.clone(),
            shared.clone(),
            (connections.enter(), None),
        );
        let tls = tls_task(
            acceptor,
            connect().await.unwrap(),
            peer,
            info,
            shared,
            (connections.enter(), None),
        );
        let (plaintext, tls) = (
            std::mem::size_of_val(&plaintext),
            std::mem::size_of_val(&tls),
        );
        assert!(
            plaintext <= MAX_TASK_BYTES,
            "a plaintext connection's task takes {plaintext} bytes (limit {MAX_TASK_BYTES}): \
             does it hold TLS states, or a socket more than once?"
        );
        assert!(
            tls <= MAX_TASK_BYTES,
            "a TLS connection's task takes {tls} bytes (limit {MAX_TASK_BYTES}): \
             does it hold the rustls connection inline?"
        );
    }

    #[test]
    fn at_max_connections_nothing_is_accepted_on_any_listener_until_one_closes() {
        let (first, first_port) = plain_endpoint();
        let (second, second_port) = plain_endpoint();
        let options = ServerOptions {
            max_connections: Some(1),
            ..ServerOptions::default()
        };
        let (server, shared, consumer) = echo_server_with(vec![first, second], options);
        let mut open = TcpStream::connect(("127.0.0.1", first_port)).unwrap();
        open.write_all(b"GET /kept HTTP/1.1\r\nHost: x\r\n\r\n")
            .unwrap();
        let mut answer = [0u8; 256];
        assert!(open.read(&mut answer).unwrap() > 0);

        let mut waiting = TcpStream::connect(("127.0.0.1", second_port)).unwrap();
        waiting
            .write_all(b"GET /waiting HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .unwrap();
        waiting
            .set_read_timeout(Some(Duration::from_millis(300)))
            .unwrap();
        let early = waiting.read(&mut answer);
        assert!(
            early.is_err(),
            "answered at the limit: {:?}",
            early.map(|n| String::from_utf8_lossy(&answer[..n]).into_owned())
        );
        drop(open);
        waiting
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let mut out = String::new();
        waiting.read_to_string(&mut out).unwrap();
        assert!(
            out.ends_with(&format!("GET /waiting 0 http:{second_port}")),
            "{out}"
        );

        stop_server(server, shared, consumer);
    }

    /// A server whose "app" answers /hijack by taking the connection over:
    /// on the socket it is handed it writes "<kind>:", reads one line,
    /// answers "got <line>" and closes. Other paths get a plain answer.
    fn hijack_server(
        options: ServerOptions,
    ) -> (Server, Arc<Shared>, u16, std::thread::JoinHandle<()>) {
        let (endpoint, port) = plain_endpoint();
        let (server, shared, consumer) = app_server(vec![endpoint], options, |job| {
            if job.request.head.uri.path() == "/outside" {
                // Answered outside hyper, which then goes on.
                let takeover = job.request.takeover.clone().unwrap();
                takeover.take_over(Box::new(AnswerOutsideHyper)).unwrap();
                return;
            }
            let Some(takeover) = (job.request.head.uri.path() == "/hijack")
                .then_some(job.request.takeover.clone())
                .flatten()
            else {
                let _ = job.reply.send(AppResponse::new(
                    StatusCode::OK,
                    Default::default(),
                    ResponseBody::from_chunks(vec![Bytes::from_static(b"plain")]),
                ));
                return;
            };
            let (hand_over, socket) = crate::hijack::HandOver::new(Bytes::new());
            takeover.take_over(hand_over).unwrap();
            let handed = socket.blocking_recv().unwrap().unwrap();
            // The reply is dropped unsent, as Ruby's would be.
            drop(job);
            std::thread::spawn(move || {
                let mut app = std::os::unix::net::UnixStream::from(handed.fd);
                app.set_nonblocking(false).unwrap();
                let _ = app.write_all(format!("{:?}:", handed.kind).as_bytes());
                let mut line = Vec::new();
                let mut byte = [0u8; 1];
                while app.read_exact(&mut byte).is_ok() && byte[0] != b'\n' {
                    line.push(byte[0]);
                }
                let answer = format!("got {}", String::from_utf8_lossy(&line));
                let _ = app.write_all(answer.as_bytes());
            });
        });
        (server, shared, port, consumer)
    }

    /// The seam for responses written outside hyper (sendfile): writes a
    /// whole response through the stream, then resumes HTTP.
    struct AnswerOutsideHyper;

    impl crate::takeover::TakeoverJob for AnswerOutsideHyper {
        fn run(self: Box<Self>, mut taken: crate::takeover::Taken) -> crate::takeover::JobFuture {
            Box::pin(async move {
                use tokio::io::AsyncWriteExt;
                let written = taken
                    .stream
                    .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 7\r\n\r\noutside")
                    .await;
                match written {
                    Ok(()) => crate::takeover::AfterTakeover::Resume(taken),
                    Err(_) => crate::takeover::AfterTakeover::Released,
                }
            })
        }
    }

    fn stop_server(mut server: Server, shared: Arc<Shared>, consumer: std::thread::JoinHandle<()>) {
        shared.stop.stop();
        assert!(server.wait_stopped(&Notify::new()));
        shared.queue.close();
        consumer.join().unwrap();
        server.shutdown();
    }

    #[test]
    fn a_takeover_gets_the_socket_itself_or_a_bridge_with_the_bytes_read_ahead_first() {
        let (server, shared, port, consumer) = hijack_server(ServerOptions::default());
        // Bytes right behind the request: hyper has read them, so the app
        // gets a bridged socketpair that delivers them first.
        let out = exchange(port, b"GET /hijack HTTP/1.1\r\nHost: x\r\n\r\nearly\n");
        assert_eq!(
            out, "Unix:got early",
            "no HTTP from the server after a takeover"
        );

        // Nothing read ahead (the client sends its line only once the app
        // has the connection): the client's own TCP socket.
        let mut client = TcpStream::connect(("127.0.0.1", port)).unwrap();
        client
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        client
            .write_all(b"GET /hijack HTTP/1.1\r\nHost: x\r\n\r\n")
            .unwrap();
        let mut kind = [0u8; 4];
        client.read_exact(&mut kind).unwrap();
        assert_eq!(&kind, b"Tcp:");
        client.write_all(b"late\n").unwrap();
        let mut out = String::new();
        client.read_to_string(&mut out).unwrap();
        assert_eq!(out, "got late");

        // After a pipelined request, its response first.
        let out = exchange(
            port,
            b"GET /a HTTP/1.1\r\nHost: x\r\n\r\nGET /hijack HTTP/1.1\r\nHost: x\r\n\r\npipelined\n",
        );
        assert!(out.starts_with("HTTP/1.1 200 OK\r\n"), "{out}");
        assert!(out.ends_with("\r\n\r\nplainUnix:got pipelined"), "{out}");
        stop_server(server, shared, consumer);
    }

    #[test]
    fn a_takeover_can_answer_outside_hyper_then_resume_http_with_the_bytes_read_ahead() {
        let (server, shared, port, consumer) = hijack_server(ServerOptions::default());
        // The second request is read ahead with the first: it goes back to
        // the new hyper session, and keep-alive goes on.
        let out = exchange(
            port,
            b"GET /outside HTTP/1.1\r\nHost: x\r\n\r\nGET /a HTTP/1.1\r\nHost: x\r\n\r\n\
              GET /outside HTTP/1.1\r\nHost: x\r\n\r\nGET /b HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        );
        let bodies: Vec<&str> = out
            .split("HTTP/1.1 200 OK\r\n")
            .skip(1)
            .map(|response| response.split("\r\n\r\n").nth(1).unwrap())
            .collect();
        assert_eq!(bodies, ["outside", "plain", "outside", "plain"], "{out}");
        stop_server(server, shared, consumer);
    }

    #[test]
    fn a_taken_over_connection_leaves_the_drain_and_frees_its_connection_slot() {
        let options = ServerOptions {
            max_connections: Some(1),
            ..ServerOptions::default()
        };
        let (mut server, shared, port, consumer) = hijack_server(options);
        let mut hijacked = TcpStream::connect(("127.0.0.1", port)).unwrap();
        hijacked
            .write_all(b"GET /hijack HTTP/1.1\r\nHost: x\r\n\r\n")
            .unwrap();
        let mut kind = [0u8; 4];
        hijacked.read_exact(&mut kind).unwrap();
        // The only slot is free again once the connection is the app's.
        let out = exchange(
            port,
            b"GET /b HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        );
        assert!(out.ends_with("plain"), "{out}");
        // The hijacked connection, still open, does not hold up a stop.
        shared.stop.stop();
        assert!(server.wait_stopped(&Notify::new()));
        hijacked.write_all(b"after stop\n").unwrap();
        hijacked
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let mut out = String::new();
        hijacked.read_to_string(&mut out).unwrap();
        assert!(out.ends_with("got after stop"), "{out}");
        shared.queue.close();
        consumer.join().unwrap();
        server.shutdown();
    }

    /// A server whose "app" answers /file with the file at `path` as a
    /// to_path body, and /bytes with the same bytes as a body hyper writes;
    /// both with the same header fields (/…-length: the app's own
    /// content-length too). Anything else gets "end".
    fn file_server(
        path: std::path::PathBuf,
    ) -> (Server, Arc<Shared>, u16, std::thread::JoinHandle<()>) {
        let (endpoint, port) = plain_endpoint();
        let content = Bytes::from(std::fs::read(&path).unwrap());
        let (server, shared, consumer) =
            app_server(vec![endpoint], ServerOptions::default(), move |job| {
                let target = job.request.head.uri.path().to_owned();
                let mut headers = http::HeaderMap::new();
                headers.insert("content-type", http::HeaderValue::from_static("text/plain"));
                headers.append("x-multi", http::HeaderValue::from_static("a"));
                headers.append("x-multi", http::HeaderValue::from_static("b"));
                if target.ends_with("-length") {
                    headers.insert("content-length", http::HeaderValue::from(content.len()));
                }
                let body = if target.starts_with("/file") {
                    ResponseBody::File(crate::file_body::FileBody::open(&path).unwrap())
                } else if target.starts_with("/bytes") {
                    ResponseBody::from_chunks(vec![content.clone()])
                } else {
                    ResponseBody::from_chunks(vec![Bytes::from_static(b"end")])
                };
                let _ = job
                    .reply
                    .send(AppResponse::new(StatusCode::OK, headers, body));
            });
        (server, shared, port, consumer)
    }

    #[test]
    fn a_file_sent_with_sendfile_looks_on_the_wire_as_hyper_would_have_sent_it() {
        let mut file = tempfile::NamedTempFile::new().unwrap();
        let content: String = (0..40_000).map(|i| format!("{i:07}\n")).collect();
        file.write_all(content.as_bytes()).unwrap();
        let (server, shared, port, consumer) = file_server(file.path().to_owned());
        let without_date = |out: String| -> String {
            out.split("\r\n")
                .filter(|line| !line.starts_with("date: "))
                .collect::<Vec<_>>()
                .join("\r\n")
        };
        let mut expected_sendfiles = 0;
        // Each ends with a request that closes (answered only when the
        // connection stays open after the file).
        for (request, keeps_alive) in [
            ("GET /{} HTTP/1.1\r\nHost: x\r\n\r\n", true),
            (
                "GET /{} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
                false,
            ),
            ("GET /{} HTTP/1.0\r\n\r\n", false),
            ("GET /{} HTTP/1.0\r\nConnection: keep-alive\r\n\r\n", true),
        ] {
            for suffix in ["", "-length"] {
                let raw = |what: &str| {
                    let mut raw = request.replace("{}", &format!("{what}{suffix}"));
                    raw.push_str("GET /end HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
                    raw
                };
                let by_hyper = without_date(exchange(port, raw("bytes").as_bytes()));
                let by_sendfile = without_date(exchange(port, raw("file").as_bytes()));
                expected_sendfiles += 1;
                assert!(by_hyper.contains(&content), "{request}: {by_hyper:.300}");
                assert_eq!(by_hyper.ends_with("end"), keeps_alive, "{request}");
                assert!(
                    by_sendfile == by_hyper,
                    "{request}{suffix}:\n{by_sendfile:.300}\nvs hyper's\n{by_hyper:.300}"
                );
                let stats = shared.stats.snapshot();
                assert_eq!(stats.sendfile_responses, expected_sendfiles);
                assert_eq!(
                    stats.sendfile_bytes,
                    expected_sendfiles * content.len() as u64
                );
            }
        }
        // HEAD: headers only, as hyper sends them.
        let head = |what: &str| {
            without_date(exchange(
                port,
                format!("HEAD /{what} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
            ))
        };
        assert_eq!(head("file"), head("bytes"));
        assert!(head("file").ends_with("\r\n\r\n"));
        assert_eq!(
            shared.stats.snapshot().sendfile_responses,
            expected_sendfiles
        );
        stop_server(server, shared, consumer);
    }

    #[test]
    fn start_refuses_no_endpoints() {
        let shared = Shared::new(ServerOptions::default(), None);
        let err = Server::start(Vec::new(), shared)
            .err()
            .expect("should fail");
        assert!(err.to_string().contains("no listening socket"), "{err}");
    }
}
