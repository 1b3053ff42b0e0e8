//! Taking an HTTP/1.x connection back from hyper in the middle of a request.
//!
//! Full and partial `rack.hijack` need the connection itself, and so does a
//! response written outside hyper (a file sent with sendfile(2), then HTTP
//! again on the same connection, `sendfile`). All of them go through here:
//!
//! 1. each request of an HTTP/1.x connection gets a `TakeoverHandle` (it
//!    travels to the Ruby thread in `RequestData`); its request is "open"
//!    while its service future waits for the response (`OpenRequest`);
//! 2. the handler calls `TakeoverHandle::take_over` with a `TakeoverJob`,
//!    which wakes the connection's task (`connection::drive`);
//! 3. the task waits until hyper has written everything it buffered (an
//!    earlier pipelined response), then takes the socket back with hyper's
//!    `into_parts`: hyper has written nothing for this request, and its read
//!    buffer holds the bytes it read past the request (a client's first
//!    WebSocket frame sent right behind the handshake);
//! 4. the job runs on the connection's task with the stream and those bytes
//!    (`Taken`), and says what becomes of the connection:
//!    `AfterTakeover::Released` (handed to the app, bridged, or closed: the
//!    task ends, so the connection leaves the drain count and frees its
//!    `max_connections` slot) or `AfterTakeover::Resume` (serve HTTP again on
//!    the same stream, with the leftover bytes first).
//!
//! A handle only works while its request is open: a job offered once the
//! response is on its way, or once the connection is gone, is handed back.
//! A job queued when the connection ends is dropped, which tells whoever
//! waits on it.

use std::any::Any;
use std::fmt;
use std::future::Future;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{ready, Context, Poll};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::{HeaderMap, StatusCode, Version};
use tokio::io::{AsyncRead, AsyncWrite, Interest};
use tokio::sync::Notify;

/// A connection's stream as a takeover gets it, whatever its type (plain TCP
/// or Unix socket, TLS): readable and writable, and, for a plain socket, the
/// socket itself.
pub trait ConnectionStream: AsyncRead + AsyncWrite + Unpin + Send + 'static {
    /// The socket, when this stream is a plain one (sendfile writes to it).
    fn socket(&self) -> Option<BorrowedFd<'_>>;

    /// The socket out of tokio's hands, when this stream is a plain socket
    /// (an error if tokio could not let go of it); otherwise the stream back.
    fn into_socket(self: Box<Self>) -> IntoSocket;

    /// For `connection::serve` to get its own stream type back on `Resume`.
    fn into_any(self: Box<Self>) -> Box<dyn Any + Send>;

    /// One write of the caller's own to the plain socket (sendfile(2)),
    /// made once tokio reports it writable; a `WouldBlock` from `write`
    /// clears that readiness and waits for the next. `Unsupported` when this
    /// stream is not a plain socket.
    fn poll_write_socket(
        &self,
        _cx: &mut Context<'_>,
        _write: &mut dyn FnMut(BorrowedFd<'_>) -> io::Result<usize>,
    ) -> Poll<io::Result<usize>> {
        Poll::Ready(Err(io::ErrorKind::Unsupported.into()))
    }
}

/// `poll_write_socket` for tokio's plain sockets, which have the same
/// readiness methods but no trait for them.
macro_rules! poll_write_socket {
    () => {
        fn poll_write_socket(
            &self,
            cx: &mut Context<'_>,
            write: &mut dyn FnMut(BorrowedFd<'_>) -> io::Result<usize>,
        ) -> Poll<io::Result<usize>> {
            loop {
                ready!(self.poll_write_ready(cx))?;
                match self.try_io(Interest::WRITABLE, || write(self.as_fd())) {
                    Err(e)
                        if matches!(
                            e.kind(),
                            io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
                        ) =>
                    {
                        continue
                    }
                    done => return Poll::Ready(done),
                }
            }
        }
    };
}

/// What kind of socket a handed-over descriptor is (the Ruby class it gets).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SocketKind {
    Tcp,
    Unix,
}

/// What `ConnectionStream::into_socket` gives: the socket (or why it was
/// lost), or the stream back when it is not a plain socket.
pub type IntoSocket = Result<io::Result<HandedSocket>, Box<dyn ConnectionStream>>;

/// A plain socket out of tokio's hands (non-blocking, close-on-exec).
#[derive(Debug)]
pub struct HandedSocket {
    pub fd: OwnedFd,
    pub kind: SocketKind,
}

impl ConnectionStream for tokio::net::TcpStream {
    fn socket(&self) -> Option<BorrowedFd<'_>> {
        Some(self.as_fd())
    }

    fn into_socket(self: Box<Self>) -> IntoSocket {
        Ok((*self).into_std().map(|socket| HandedSocket {
            fd: socket.into(),
            kind: SocketKind::Tcp,
        }))
    }

    fn into_any(self: Box<Self>) -> Box<dyn Any + Send> {
        self
    }
    poll_write_socket!();
}

impl ConnectionStream for tokio::net::UnixStream {
    fn socket(&self) -> Option<BorrowedFd<'_>> {
        Some(self.as_fd())
    }

    fn into_socket(self: Box<Self>) -> IntoSocket {
        Ok((*self).into_std().map(|socket| HandedSocket {
            fd: socket.into(),
            kind: SocketKind::Unix,
        }))
    }

    fn into_any(self: Box<Self>) -> Box<dyn Any + Send> {
        self
    }
    poll_write_socket!();
}

impl<S> ConnectionStream for Box<tokio_rustls::server::TlsStream<S>>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    /// Under TLS the socket carries records, not the bytes an app wants.
    fn socket(&self) -> Option<BorrowedFd<'_>> {
        None
    }

    fn into_socket(self: Box<Self>) -> IntoSocket {
        Err(self)
    }

    fn into_any(self: Box<Self>) -> Box<dyn Any + Send> {
        self
    }
}

impl ConnectionStream for tokio::io::DuplexStream {
    fn socket(&self) -> Option<BorrowedFd<'_>> {
        None
    }

    fn into_socket(self: Box<Self>) -> IntoSocket {
        Err(self)
    }

    fn into_any(self: Box<Self>) -> Box<dyn Any + Send> {
        self
    }
}

/// The connection as a job gets it.
pub struct Taken {
    pub stream: Box<dyn ConnectionStream>,
    /// Bytes read from the client past the request, not yet handled: they
    /// come before anything still unread on the stream.
    pub leftover: Bytes,
    /// The connection's `write_timeout`, to bound the job's own writes.
    pub write_timeout: Duration,
}

impl fmt::Debug for Taken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Taken({} leftover bytes)", self.leftover.len())
    }
}

/// What becomes of a connection once its job has run.
#[derive(Debug)]
pub enum AfterTakeover {
    /// No longer Hyperion's: handed over, bridged (on a task of its own) or
    /// closed. The connection's task ends.
    Released,
    /// Serve HTTP on it again: a new hyper session reads `leftover` first.
    /// The request that took it over counts as answered.
    Resume(Taken),
}

pub type JobFuture = Pin<Box<dyn Future<Output = AfterTakeover> + Send>>;

/// What a request does with its connection once hyper lets go of it. Runs
/// on the connection's own task.
///
/// A response written outside hyper is one (`sendfile::SendFile`): it
/// writes the head and the file with `taken.stream.poll_write_socket`, and
/// returns `AfterTakeover::Resume(taken)` so that HTTP goes on.
pub trait TakeoverJob: Send + 'static {
    fn run(self: Box<Self>, taken: Taken) -> JobFuture;
}

impl fmt::Debug for dyn TakeoverJob {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("TakeoverJob")
    }
}

struct PointState {
    /// The request that may take the connection over (0: none).
    open: u64,
    /// Numbers given to requests so far.
    opened: u64,
    /// The number of the last request whose job the task took.
    taken: u64,
    job: Option<Box<dyn TakeoverJob>>,
}

/// Where the requests of one HTTP/1.x connection ask its task for the
/// connection (see the module docs).
pub struct TakeoverPoint {
    state: Mutex<PointState>,
    requested: Notify,
}

impl fmt::Debug for TakeoverPoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("TakeoverPoint")
    }
}

impl TakeoverPoint {
    pub fn new() -> Arc<Self> {
        Arc::new(Self {
            state: Mutex::new(PointState {
                open: 0,
                opened: 0,
                taken: 0,
                job: None,
            }),
            requested: Notify::new(),
        })
    }

    fn lock(&self) -> MutexGuard<'_, PointState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A request starts waiting for its response: its handle, and the guard
    /// that closes it (the service future holds it until the response is
    /// ready, or until it is dropped with the connection).
    pub fn open(self: &Arc<Self>, version: Version) -> (TakeoverHandle, OpenRequest) {
        let id = {
            let mut state = self.lock();
            state.opened += 1;
            state.open = state.opened;
            drop(state.job.take());
            state.opened
        };
        (
            TakeoverHandle {
                point: self.clone(),
                id,
                version,
            },
            OpenRequest {
                point: self.clone(),
                id,
            },
        )
    }

    /// Resolves once a job waits (for the connection's task).
    pub async fn requested(&self) {
        loop {
            let notified = self.requested.notified();
            if self.lock().job.is_some() {
                return;
            }
            notified.await;
        }
    }

    /// The waiting job, if any; the request stops being open.
    pub fn take_job(&self) -> Option<Box<dyn TakeoverJob>> {
        let mut state = self.lock();
        if state.job.is_some() {
            state.taken = state.open;
        }
        state.open = 0;
        state.job.take()
    }
}

/// Held by a request's service future while it waits for the response;
/// when dropped, the request can no longer take the connection over, and a
/// job it queued that the task has not taken is dropped.
pub struct OpenRequest {
    point: Arc<TakeoverPoint>,
    id: u64,
}

impl OpenRequest {
    /// The response is ready: the request can no longer be taken over.
    /// False when a takeover was asked for first: then the response must
    /// not be sent, and the caller keeps this guard and waits (the task
    /// takes the connection, dropping the caller with it).
    pub fn close(&self) -> bool {
        let mut state = self.point.lock();
        if state.open != self.id {
            return true;
        }
        if state.job.is_some() {
            return false;
        }
        state.open = 0;
        true
    }
}

impl OpenRequest {
    /// The connection's task took this request's job: the request no longer
    /// has a response of the server's to send.
    pub fn taken_over(&self) -> bool {
        self.point.lock().taken == self.id
    }
}

impl Drop for OpenRequest {
    fn drop(&mut self) {
        let job = {
            let mut state = self.point.lock();
            if state.open != self.id {
                return;
            }
            state.open = 0;
            state.job.take()
        };
        // Dropped outside the lock: dropping tells the job's waiter.
        drop(job);
    }
}

/// A request's right to take its connection over (plain Rust data, carried
/// to the Ruby thread in `RequestData`).
#[derive(Clone)]
pub struct TakeoverHandle {
    point: Arc<TakeoverPoint>,
    id: u64,
    version: Version,
}

impl fmt::Debug for TakeoverHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TakeoverHandle({})", self.id)
    }
}

impl TakeoverHandle {
    /// The request's HTTP version (a head written outside hyper uses it).
    pub fn version(&self) -> Version {
        self.version
    }

    /// Asks the connection's task to run `job` with the connection. The job
    /// is handed back when the response is on its way, the connection was
    /// already taken over, or the connection is gone.
    pub fn take_over(&self, job: Box<dyn TakeoverJob>) -> Result<(), Box<dyn TakeoverJob>> {
        self.offer(job, |job| job)
    }

    /// `take_over` for a job of a known type, handed back as that type
    /// (whose contents the caller can then use otherwise).
    pub fn take_over_typed<J: TakeoverJob>(&self, job: Box<J>) -> Result<(), Box<J>> {
        self.offer(job, |job| job)
    }

    fn offer<J>(&self, job: J, queued: impl FnOnce(J) -> Box<dyn TakeoverJob>) -> Result<(), J> {
        {
            let mut state = self.point.lock();
            if state.open != self.id || state.job.is_some() {
                return Err(job);
            }
            state.job = Some(queued(job));
        }
        self.point.requested.notify_one();
        Ok(())
    }
}

/// An HTTP/1.x response head as hyper would write it, for a response
/// written outside hyper (partial hijack, a streamed body): the status line
/// (`status_line`), then the app's fields, and a `date` field when the app
/// gave none. No framing field is added: the writer owns the body.
pub fn http1_head(version: Version, status: StatusCode, headers: &HeaderMap) -> Bytes {
    let mut out = BytesMut::with_capacity(128 + headers.len() * 32);
    status_line(&mut out, version, status);
    for (name, value) in headers {
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    if !headers.contains_key(http::header::DATE) {
        out.extend_from_slice(b"date: ");
        out.extend_from_slice(crate::http2::http_date().as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"\r\n");
    out.freeze()
}

/// `HTTP/1.x CODE REASON\r\n` as hyper writes it: the request's version
/// (HTTP/1.0 for an HTTP/1.0 request) and the canonical reason, or hyper's
/// `<none>` for a code without one.
pub fn status_line(out: &mut BytesMut, version: Version, status: StatusCode) {
    out.extend_from_slice(if version == Version::HTTP_10 {
        b"HTTP/1.0 "
    } else {
        b"HTTP/1.1 "
    });
    out.extend_from_slice(status.as_str().as_bytes());
    out.extend_from_slice(b" ");
    out.extend_from_slice(status.canonical_reason().unwrap_or("<none>").as_bytes());
    out.extend_from_slice(b"\r\n");
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};

    /// A job that records whether it was dropped without running.
    struct Probe(Arc<AtomicBool>);

    impl TakeoverJob for Probe {
        fn run(self: Box<Self>, _taken: Taken) -> JobFuture {
            Box::pin(async { AfterTakeover::Released })
        }
    }

    impl Drop for Probe {
        fn drop(&mut self) {
            self.0.store(true, Ordering::Release);
        }
    }

    fn probe() -> (Box<dyn TakeoverJob>, Arc<AtomicBool>) {
        let dropped = Arc::new(AtomicBool::new(false));
        (Box::new(Probe(dropped.clone())), dropped)
    }

    #[tokio::test]
    async fn a_job_offered_while_the_request_is_open_reaches_the_task() {
        let point = TakeoverPoint::new();
        let (handle, open) = point.open(Version::HTTP_11);
        let (job, _) = probe();
        let waiting = tokio::spawn({
            let point = point.clone();
            async move { point.requested().await }
        });
        handle.take_over(job).unwrap();
        tokio::time::timeout(Duration::from_secs(5), waiting)
            .await
            .expect("the task is woken")
            .unwrap();
        assert!(
            !open.close(),
            "a response after a takeover must not be sent"
        );
        assert!(point.take_job().is_some());
        drop(open); // with the service future, after the task took the job
        let (again, _) = probe();
        assert!(
            handle.take_over(again).is_err(),
            "a connection is taken over once"
        );
    }

    #[test]
    fn a_handle_refuses_once_its_response_is_on_its_way() {
        let point = TakeoverPoint::new();
        let (handle, open) = point.open(Version::HTTP_11);
        assert!(open.close());
        drop(open);
        let (job, dropped) = probe();
        let Err(job) = handle.take_over(job) else {
            panic!("accepted after the response");
        };
        drop(job);
        assert!(dropped.load(Ordering::Acquire));

        // The next request on the connection has a handle of its own; the
        // old one stays refused.
        let (next, _open) = point.open(Version::HTTP_11);
        let (job, _) = probe();
        assert!(handle.take_over(job).is_err());
        let (job, _) = probe();
        assert!(next.take_over(job).is_ok());
    }

    #[test]
    fn a_job_queued_when_the_connection_ends_is_dropped() {
        let point = TakeoverPoint::new();
        let (handle, open) = point.open(Version::HTTP_11);
        let (job, dropped) = probe();
        handle.take_over(job).unwrap();
        drop(open); // the service future goes with the connection
        assert!(dropped.load(Ordering::Acquire), "its waiter must be told");
        assert!(point.take_job().is_none());
    }

    #[test]
    fn a_head_written_outside_hyper_has_the_request_version_and_a_date() {
        let mut headers = HeaderMap::new();
        headers.insert("upgrade", http::HeaderValue::from_static("websocket"));
        let head = http1_head(Version::HTTP_11, StatusCode::SWITCHING_PROTOCOLS, &headers);
        let text = std::str::from_utf8(&head).unwrap();
        assert!(
            text.starts_with("HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\ndate: "),
            "{text}"
        );
        assert!(text.ends_with(" GMT\r\n\r\n"), "{text}");
        let head = http1_head(Version::HTTP_10, StatusCode::OK, &HeaderMap::new());
        assert!(head.starts_with(b"HTTP/1.0 200 OK\r\n"));
        // A code without a reason reads as hyper writes it for a response
        // it frames itself.
        let head = http1_head(
            Version::HTTP_11,
            StatusCode::from_u16(299).unwrap(),
            &HeaderMap::new(),
        );
        assert!(head.starts_with(b"HTTP/1.1 299 <none>\r\n"), "{head:?}");
    }
}
