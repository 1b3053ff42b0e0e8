//! One task per connection: hyper serves HTTP/1.1 on a socket wrapped in
//! `WatchedIo`, and this task enforces the timeouts hyper does not know:
//!
//! - a request head must arrive within `read_timeout` (also the first bytes
//!   of a new connection), and within `max_request_read` of its first byte
//!   → `408` and close; the 408 goes through the connection's own stream, so
//!   TLS encrypts it;
//! - an idle keep-alive connection is closed quietly after `idle_timeout`;
//! - a client that stops reading is dropped after `write_timeout` without
//!   progress, which also frees a Ruby thread streaming to it;
//! - on stop, HTTP/2 gets hyper's graceful shutdown (GOAWAY) at once. An
//!   HTTP/1.1 connection gets `DRAIN_GRACE` first: a request that arrives in
//!   it is answered with `connection: close` (see request_service.rs), so a busy
//!   keep-alive client learns of the stop from a response instead of from a
//!   close racing its next request; then hyper's graceful shutdown closes it
//!   once idle, after the request in flight if there is one.
//!
//! A keep-alive connection idle for `PARK_AFTER` is "parked": hyper's state
//! and buffers (8 KiB of read buffer and more) are dropped and only the socket
//! is kept until the client sends again. Ten thousand idle connections then
//! cost a few KiB each instead of ~13 KiB.
//!
//! A request may also take its HTTP/1.x connection back from hyper while it
//! waits for its response (`rack.hijack`; see `takeover`): the task takes the
//! socket from hyper the same way and runs the request's job with it.

use std::io;
use std::os::fd::{BorrowedFd, RawFd};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use hyper::rt::{Read, ReadBufCursor, Write};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::Notify;
use tokio::time::Instant;

use crate::takeover::{AfterTakeover, ConnectionStream, Taken, TakeoverPoint};
use crate::written::WrittenNotice;

/// How long a keep-alive connection stays idle before hyper's state is
/// dropped (the socket stays open; see the module docs).
pub const PARK_AFTER: Duration = Duration::from_millis(100);

/// How long an idle HTTP/1.1 keep-alive connection stays open after a stop
/// begins, for a request already on its way (see the module docs).
pub const DRAIN_GRACE: Duration = Duration::from_millis(500);

/// The timeouts a connection task enforces.
#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    pub read: Duration,
    /// A whole request's time; it bounds the head too (the body's share is
    /// enforced where the body is read).
    pub max_request_read: Duration,
    pub idle: Duration,
    pub write: Duration,
}

/// What a connection is doing, shared by its IO wrapper, its requests and
/// its task. Times are milliseconds since `epoch` plus one (0 = unset).
pub struct Activity {
    epoch: Instant,
    requests: AtomicU64,
    responses: AtomicU64,
    head_started: AtomicU64,
    idle_since: AtomicU64,
    write_stalled: AtomicU64,
    /// The deadline the task currently sleeps until.
    armed: AtomicU64,
    /// Milliseconds a head may take from its first byte (set by `serve`).
    head_limit: AtomicU64,
    /// Wakes the task when its deadline moves earlier than `armed`: a write
    /// stalls, a head starts or a response finishes while the task sleeps on
    /// a distant deadline. Most request boundaries need no wake-up, which
    /// keeps keep-alive traffic free of per-request task wake-ups.
    changed: Notify,
    /// A response whose last frame hyper has taken, waiting for hyper's
    /// next flush of the socket to count as written (see `written`).
    flush_notice: Mutex<Option<WrittenNotice>>,
    awaiting_flush: AtomicBool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Expiry {
    /// A head (or the first bytes) did not arrive in time: answer 408.
    Head,
    /// Idle keep-alive connection: close quietly.
    Idle,
    /// The client stopped reading: drop.
    Write,
    /// Idle long enough to drop hyper's buffers and keep only the socket.
    Park,
}

impl Activity {
    pub fn new() -> Arc<Self> {
        Arc::new(Self {
            epoch: Instant::now(),
            requests: AtomicU64::new(0),
            responses: AtomicU64::new(0),
            head_started: AtomicU64::new(0),
            idle_since: AtomicU64::new(1),
            write_stalled: AtomicU64::new(0),
            armed: AtomicU64::new(0),
            head_limit: AtomicU64::new(u64::MAX),
            changed: Notify::new(),
            flush_notice: Mutex::new(None),
            awaiting_flush: AtomicBool::new(false),
        })
    }

    fn now(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64 + 1
    }

    fn at(&self, stamp: u64) -> Instant {
        self.epoch + Duration::from_millis(stamp - 1)
    }

    fn stamp(&self, at: Instant) -> u64 {
        at.saturating_duration_since(self.epoch).as_millis() as u64 + 1
    }

    fn in_request(&self) -> bool {
        self.requests.load(Ordering::Acquire) > self.responses.load(Ordering::Acquire)
    }

    /// A request head was parsed and handed to the service. Returns when its
    /// first byte arrived (now, for a head that was already buffered).
    pub fn request_started(&self) -> Instant {
        self.requests.fetch_add(1, Ordering::AcqRel);
        let head_started = self.head_started.swap(0, Ordering::AcqRel);
        if head_started == 0 {
            Instant::now()
        } else {
            self.at(head_started)
        }
    }

    /// hyper is done with a response body (the connection may go idle).
    pub fn response_finished(&self) {
        self.responses.fetch_add(1, Ordering::AcqRel);
        let now = self.now();
        self.idle_since.store(now, Ordering::Release);
        if self.armed.load(Ordering::Acquire) > now + PARK_AFTER.as_millis() as u64 {
            self.changed.notify_one();
        }
    }

    /// hyper has taken a response's last frame: `notice` fires at its next
    /// flush, which hyper makes once its write buffer is empty. Dropped
    /// unfired if the connection ends first.
    pub fn notify_at_next_flush(&self, notice: WrittenNotice) {
        let replaced = lock(&self.flush_notice).replace(notice);
        self.awaiting_flush.store(true, Ordering::Release);
        drop(replaced);
    }

    fn on_flush(&self) {
        if self.awaiting_flush.swap(false, Ordering::AcqRel) {
            let notice = lock(&self.flush_notice).take();
            if let Some(notice) = notice {
                notice.fire();
            }
        }
    }

    fn on_read(&self) {
        if !self.in_request() && self.head_started.load(Ordering::Acquire) == 0 {
            let now = self.now();
            self.head_started.store(now, Ordering::Release);
            // E.g. a new connection's task sleeps until read_timeout from
            // its start, while max_request_read allows its head less.
            let head_deadline = now.saturating_add(self.head_limit.load(Ordering::Acquire));
            if self.armed.load(Ordering::Acquire) > head_deadline {
                self.changed.notify_one();
            }
        }
    }

    fn on_write(&self, stalled: bool) {
        let was = self.write_stalled.load(Ordering::Acquire);
        if stalled && was == 0 {
            self.write_stalled.store(self.now(), Ordering::Release);
            self.changed.notify_one();
        } else if !stalled && was != 0 {
            self.write_stalled.store(0, Ordering::Release);
            // A takeover may be waiting for hyper's buffer to drain.
            self.changed.notify_one();
        }
    }

    /// The earliest deadline that applies now, and what its expiry means.
    /// `may_park`: whether an idle connection may be parked (HTTP/1.1, not
    /// while draining). `multiplexed` (HTTP/2): control frames such as PING
    /// arrive between requests, so there is no head timer, only the idle one.
    fn next_deadline(
        &self,
        timeouts: &Timeouts,
        may_park: bool,
        multiplexed: bool,
    ) -> Option<(Instant, Expiry)> {
        let mut next: Option<(Instant, Expiry)> = None;
        let mut consider = |at: Instant, expiry| {
            if next.map_or(true, |(current, _)| at < current) {
                next = Some((at, expiry));
            }
        };
        let stalled = self.write_stalled.load(Ordering::Acquire);
        if stalled != 0 {
            consider(self.at(stalled) + timeouts.write, Expiry::Write);
        }
        if !self.in_request() && multiplexed {
            let idle_since = self.at(self.idle_since.load(Ordering::Acquire));
            let first = self.requests.load(Ordering::Acquire) == 0;
            consider(
                idle_since + if first { timeouts.read } else { timeouts.idle },
                Expiry::Idle,
            );
        } else if !self.in_request() {
            let head_started = self.head_started.load(Ordering::Acquire);
            if head_started != 0 {
                let head_limit = timeouts.read.min(timeouts.max_request_read);
                consider(self.at(head_started) + head_limit, Expiry::Head);
            } else if self.requests.load(Ordering::Acquire) == 0 {
                // A new connection owes us its first request within read_timeout.
                consider(
                    self.at(self.idle_since.load(Ordering::Acquire)) + timeouts.read,
                    Expiry::Head,
                );
            } else {
                let idle_since = self.at(self.idle_since.load(Ordering::Acquire));
                consider(idle_since + timeouts.idle, Expiry::Idle);
                if may_park && stalled == 0 {
                    consider(idle_since + PARK_AFTER, Expiry::Park);
                }
            }
        }
        next
    }
}

/// The socket as hyper sees it, reporting reads and stalled writes. Bytes
/// read while the connection was parked are handed out first.
pub struct WatchedIo<S> {
    inner: S,
    activity: Arc<Activity>,
    prefix: Bytes,
}

impl<S> WatchedIo<S> {
    pub fn new(inner: S, activity: Arc<Activity>) -> Self {
        Self::with_prefix(inner, activity, Bytes::new())
    }

    /// `prefix`: bytes already read from `inner`, handed out first.
    pub fn with_prefix(inner: S, activity: Arc<Activity>, prefix: Bytes) -> Self {
        Self {
            inner,
            activity,
            prefix,
        }
    }
}

impl<S: tokio::io::AsyncRead + Unpin> Read for WatchedIo<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        mut buf: ReadBufCursor<'_>,
    ) -> Poll<io::Result<()>> {
        let from_prefix = !self.prefix.is_empty();
        if from_prefix {
            let n = self.prefix.len().min(buf.remaining());
            let chunk = self.prefix.split_to(n);
            buf.put_slice(&chunk);
            self.activity.on_read();
            if !self.prefix.is_empty() || buf.remaining() == 0 {
                return Poll::Ready(Ok(()));
            }
            // Read on into the same buffer: the prefix is often a head's
            // first bytes (the h2c sniff's), and handed out alone it makes
            // hyper parse twice and double its read buffer for the rest.
        }
        // SAFETY: the cursor's unfilled part is handed to tokio's ReadBuf,
        // which only writes initialised bytes into it; we then advance the
        // cursor by exactly the number of bytes tokio reports as filled.
        let filled = unsafe {
            let mut read_buf = tokio::io::ReadBuf::uninit(buf.as_mut());
            match tokio::io::AsyncRead::poll_read(Pin::new(&mut self.inner), cx, &mut read_buf) {
                Poll::Ready(Ok(())) => read_buf.filled().len(),
                // The prefix is this read's result; a failed socket fails
                // the next read too (with the error, or as EOF).
                _ if from_prefix => 0,
                other => return other,
            }
        };
        if filled > 0 {
            self.activity.on_read();
        }
        // SAFETY: `filled` bytes were initialised by the read above.
        unsafe { buf.advance(filled) };
        Poll::Ready(Ok(()))
    }
}

impl<S: tokio::io::AsyncWrite + Unpin> Write for WatchedIo<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let result = Pin::new(&mut self.inner).poll_write(cx, buf);
        self.activity.on_write(result.is_pending());
        result
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let result = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        self.activity.on_write(result.is_pending());
        result
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let flushed = Pin::new(&mut self.inner).poll_flush(cx);
        if let Poll::Ready(Ok(())) = flushed {
            self.activity.on_flush();
        }
        flushed
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

const REQUEST_TIMEOUT: &[u8] =
    b"HTTP/1.1 408 Request Timeout\r\nconnection: close\r\ncontent-length: 0\r\n\r\n";

/// Writes a bare 408 straight to a plaintext socket (best effort, one
/// non-blocking write) before the connection is closed: for a connection
/// that timed out before it had a session (see `serve` for the others).
///
/// # Safety
/// `fd` must be an open socket for the whole call: the caller owns (or
/// holds the owner of) the stream it belongs to.
pub unsafe fn write_request_timeout(fd: RawFd) {
    // SAFETY: the caller guarantees `fd` is open for the duration of the call.
    let socket = unsafe { BorrowedFd::borrow_raw(fd) };
    let _ = nix::unistd::write(socket, REQUEST_TIMEOUT);
}

/// How a session ended: `Err` carries the protocol or I/O error, for the log.
pub type SessionResult = Result<(), Box<dyn std::error::Error + Send + Sync>>;

/// One HTTP connection over a `WatchedIo` (hyper's HTTP/1.1, or the h2
/// driver in `http2`), as `serve` drives it.
pub trait Session<S>: std::future::Future<Output = SessionResult> + Unpin {
    /// Stop after the in-flight request (HTTP/1.1) or streams (HTTP/2: GOAWAY).
    fn graceful_shutdown(&mut self);
    /// Takes the socket back from an idle session, with any bytes hyper had
    /// read but not parsed. Only called when `multiplexed` is false.
    fn into_io(self) -> Option<(WatchedIo<S>, Bytes)>;
    /// HTTP/2: many requests at once, never parked, no head timer.
    fn multiplexed(&self) -> bool {
        false
    }
    /// Bytes queued for the client outside hyper and not written yet
    /// (103 Early Hints), taken before a takeover so they go out first.
    fn take_unwritten(&mut self) -> Bytes {
        Bytes::new()
    }
}

enum SessionEnd {
    /// The connection is finished (closed, failed, timed out or drained).
    Closed,
    /// A head did not arrive in time: answer 408, then close.
    HeadTimedOut,
    /// Idle for `PARK_AFTER`: hand the socket back.
    Park,
    /// A request asked for the connection (`takeover`).
    TakeOver,
}

/// Serves a connection until it ends: runs hyper sessions over the socket,
/// parking it between requests when it idles. `start` builds a session.
/// `takeover`: where the requests of an HTTP/1.x connection ask for it.
pub async fn serve<S, C>(
    mut io: WatchedIo<S>,
    start: impl Fn(WatchedIo<S>) -> C,
    activity: Arc<Activity>,
    timeouts: Timeouts,
    stop: &crate::stop::StopSignal,
    takeover: Option<&TakeoverPoint>,
) where
    S: ConnectionStream,
    C: Session<S>,
{
    let head_limit = timeouts.read.min(timeouts.max_request_read);
    activity
        .head_limit
        .store(head_limit.as_millis() as u64, Ordering::Release);
    loop {
        // Boxed so that a parked connection's task holds no hyper state.
        let mut session = Box::new(start(io));
        let end = drive(&mut *session, &activity, &timeouts, stop, takeover).await;
        let job = match end {
            SessionEnd::Closed => return,
            // Taken before hyper lets go of the request: its service future
            // (dropped with the session) would drop the job otherwise.
            SessionEnd::TakeOver => match takeover.and_then(TakeoverPoint::take_job) {
                Some(job) => Some(job),
                None => return,
            },
            SessionEnd::HeadTimedOut | SessionEnd::Park => None,
        };
        let unwritten = match job {
            Some(_) => session.take_unwritten(),
            None => Bytes::new(),
        };
        let Some((socket, unparsed)) = unbox_into_io(session) else {
            return;
        };
        if let SessionEnd::HeadTimedOut = end {
            // hyper holds no unsent response bytes unless a write stalled;
            // then a 408 would land in the middle of one, so just close.
            if activity.write_stalled.load(Ordering::Acquire) == 0 {
                answer_request_timeout(socket.inner, timeouts.write).await;
            }
            return;
        }
        io = socket;
        // Bytes hyper buffered came off the socket before any still in our
        // prefix; both go to the next session, in that order.
        if !unparsed.is_empty() {
            let mut joined = bytes::BytesMut::with_capacity(unparsed.len() + io.prefix.len());
            joined.extend_from_slice(&unparsed);
            joined.extend_from_slice(&io.prefix);
            io.prefix = joined.freeze();
        }
        // Even when empty, `unparsed` owns hyper's whole read buffer: free it
        // before parking rather than at the end of this iteration.
        drop(unparsed);
        if let Some(job) = job {
            let Some((stream, leftover)) = run_takeover(job, io, unwritten, &timeouts).await else {
                return;
            };
            // The job answered the request; HTTP goes on.
            activity.response_finished();
            io = WatchedIo::with_prefix(stream, activity.clone(), leftover);
        }
        if io.prefix.is_empty() {
            // Parked: no hyper state, just the socket, until the client speaks.
            match wait_parked(&mut io, &activity, &timeouts, stop).await {
                Some(first) => io.prefix = first,
                None => return,
            }
        }
        // The next head has begun: its read timeout runs from now, and the
        // new session must not be parked before hyper reads the prefix.
        activity.on_read();
    }
}

/// Runs a takeover job with the socket hyper gave back (its prefix holding
/// the bytes read past the request), after writing `unwritten` (interim
/// responses queued outside hyper). Returns the stream and the bytes to
/// read first when the job resumes HTTP; `None` when the connection is no
/// longer this task's.
async fn run_takeover<S: ConnectionStream>(
    job: Box<dyn crate::takeover::TakeoverJob>,
    io: WatchedIo<S>,
    unwritten: Bytes,
    timeouts: &Timeouts,
) -> Option<(S, Bytes)> {
    let WatchedIo {
        inner,
        prefix: leftover,
        ..
    } = io;
    let mut stream: Box<dyn ConnectionStream> = Box::new(inner);
    if !unwritten.is_empty() {
        let written = tokio::time::timeout(timeouts.write, stream.write_all(&unwritten)).await;
        if !matches!(written, Ok(Ok(()))) {
            // Dropping the job tells the request the connection is gone.
            return None;
        }
    }
    let taken = Taken {
        stream,
        leftover,
        write_timeout: timeouts.write,
    };
    match job.run(taken).await {
        AfterTakeover::Released => None,
        AfterTakeover::Resume(taken) => match taken.stream.into_any().downcast::<S>() {
            Ok(stream) => Some((*stream, taken.leftover)),
            Err(_) => {
                tracing::error!("a takeover job resumed HTTP on another stream; connection closed");
                None
            }
        },
    }
}

/// Resolves once a request of the connection asks for it (never without a
/// takeover point).
async fn takeover_requested(point: Option<&TakeoverPoint>) {
    match point {
        Some(point) => point.requested().await,
        None => std::future::pending().await,
    }
}

/// Writes a 408 through the connection's stream (encrypted under TLS) and
/// closes it (FIN, or TLS close_notify first); best effort, within `within`.
async fn answer_request_timeout<S>(mut stream: S, within: Duration)
where
    S: tokio::io::AsyncWrite + Unpin,
{
    let answered = tokio::time::timeout(within, async {
        stream.write_all(REQUEST_TIMEOUT).await?;
        stream.shutdown().await
    })
    .await;
    if let Ok(Err(e)) = answered {
        tracing::debug!(error = %e, "could not send 408");
    }
}

/// Takes the socket back from a boxed session and frees the box at once (a
/// box moved out of keeps its allocation until its variable goes out of
/// scope, which in `serve` would be after the park). Taking the box by value
/// is the point, hence the allow.
#[allow(clippy::boxed_local)]
fn unbox_into_io<S, C: Session<S>>(session: Box<C>) -> Option<(WatchedIo<S>, Bytes)> {
    (*session).into_io()
}

/// Waits on a parked socket for the next request's first bytes; `None` when
/// the connection should close (idle timeout, stop, client gone).
async fn wait_parked<S>(
    io: &mut WatchedIo<S>,
    activity: &Activity,
    timeouts: &Timeouts,
    stop: &crate::stop::StopSignal,
) -> Option<Bytes>
where
    S: tokio::io::AsyncRead + Unpin,
{
    let idle_deadline = activity.at(activity.idle_since.load(Ordering::Acquire)) + timeouts.idle;
    let mut first = [0u8; 64];
    tokio::select! {
        read = io.inner.read(&mut first) => match read {
            Ok(n) if n > 0 => Some(Bytes::copy_from_slice(&first[..n])),
            _ => None,
        },
        _ = tokio::time::sleep_until(idle_deadline) => None,
        _ = async {
            stop.stopped().await;
            tokio::time::sleep(DRAIN_GRACE).await;
        } => None,
    }
}

/// Drives one session until the connection ends, a timeout expires, it has
/// drained after a stop, it idles long enough to park, or a request takes
/// it over.
async fn drive<S, C: Session<S>>(
    session: &mut C,
    activity: &Activity,
    timeouts: &Timeouts,
    stop: &crate::stop::StopSignal,
    takeover: Option<&TakeoverPoint>,
) -> SessionEnd {
    let stopped = stop.stopped();
    tokio::pin!(stopped);
    let mut draining = false;
    // HTTP/1.1 after a stop: when the grace ends and hyper is told to close.
    let mut grace_ends: Option<Instant> = None;
    // A request asked for the connection: it is taken once hyper has
    // written all it buffered (an earlier pipelined response to a slow
    // client), which `into_parts` would otherwise drop. Until then the
    // write timeout applies as usual.
    let mut taking_over = false;
    loop {
        if taking_over && activity.write_stalled.load(Ordering::Acquire) == 0 {
            // One more turn for hyper: what the request did before it asked
            // (queueing 103 Early Hints) may have come after hyper's last
            // poll in this round; it must reach hyper's side first.
            let polled = std::future::poll_fn(|cx| Poll::Ready(Pin::new(&mut *session).poll(cx)));
            if let Poll::Ready(result) = polled.await {
                if let Err(e) = result {
                    tracing::debug!(error = %e, "connection ended with an error");
                }
                return SessionEnd::Closed;
            }
            return SessionEnd::TakeOver;
        }
        // With no deadline (a request in flight), look again after
        // PARK_AFTER: the response may have finished by then.
        let multiplexed = session.multiplexed();
        let may_park = !draining && !multiplexed;
        let mut sleep_until = activity
            .next_deadline(timeouts, may_park, multiplexed)
            .map_or_else(|| Instant::now() + PARK_AFTER, |(at, _)| at);
        if let Some(at) = grace_ends {
            if at <= Instant::now() {
                grace_ends = None;
                session.graceful_shutdown();
                continue;
            }
            sleep_until = sleep_until.min(at);
        }
        activity
            .armed
            .store(activity.stamp(sleep_until), Ordering::Release);
        tokio::select! {
            result = &mut *session => {
                if let Err(e) = result {
                    tracing::debug!(error = %e, "connection ended with an error");
                }
                return SessionEnd::Closed;
            }
            _ = tokio::time::sleep_until(sleep_until) => {
                match activity.next_deadline(timeouts, may_park, multiplexed) {
                    Some((at, Expiry::Park)) if at <= Instant::now() => return SessionEnd::Park,
                    Some((at, expiry)) if at <= Instant::now() => {
                        tracing::debug!(?expiry, "connection timed out");
                        return match expiry {
                            Expiry::Head => SessionEnd::HeadTimedOut,
                            _ => SessionEnd::Closed,
                        };
                    }
                    _ => continue,
                }
            }
            _ = activity.changed.notified() => continue,
            _ = takeover_requested(takeover), if !taking_over => taking_over = true,
            _ = &mut stopped, if !draining => {
                draining = true;
                if multiplexed {
                    session.graceful_shutdown();
                } else {
                    grace_ends = Some(Instant::now() + DRAIN_GRACE);
                }
            }
        }
    }
}

/// Counts live connections so a stop can wait for them to drain.
#[derive(Default)]
pub struct ConnectionCount {
    live: AtomicUsize,
    drained: Notify,
}

pub struct ConnectionGuard(Arc<ConnectionCount>);

impl ConnectionCount {
    pub fn enter(self: &Arc<Self>) -> ConnectionGuard {
        self.live.fetch_add(1, Ordering::AcqRel);
        ConnectionGuard(self.clone())
    }

    /// Resolves when no connection is live.
    pub async fn drained(&self) {
        loop {
            let notified = self.drained.notified();
            if self.live.load(Ordering::Acquire) == 0 {
                return;
            }
            notified.await;
        }
    }
}

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        if self.0.live.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.drained.notify_waiters();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TIMEOUTS: Timeouts = Timeouts {
        read: Duration::from_secs(5),
        max_request_read: Duration::from_secs(60),
        idle: Duration::from_secs(20),
        write: Duration::from_secs(10),
    };

    #[tokio::test(start_paused = true)]
    async fn deadlines_follow_the_connection_phase() {
        let activity = Activity::new();
        let start = Instant::now();
        let (at, expiry) = activity.next_deadline(&TIMEOUTS, false, false).unwrap();
        assert_eq!(
            expiry,
            Expiry::Head,
            "a new connection owes a request within read_timeout"
        );
        assert!(at >= start + TIMEOUTS.read - Duration::from_millis(2));

        activity.request_started();
        assert_eq!(
            activity.next_deadline(&TIMEOUTS, false, false),
            None,
            "no timer while the app works"
        );
        activity.on_write(true);
        assert_eq!(
            activity.next_deadline(&TIMEOUTS, false, false).unwrap().1,
            Expiry::Write
        );
        activity.on_write(false);
        activity.response_finished();
        assert_eq!(
            activity.next_deadline(&TIMEOUTS, false, false).unwrap().1,
            Expiry::Idle
        );
        assert_eq!(
            activity.next_deadline(&TIMEOUTS, true, false).unwrap().1,
            Expiry::Park,
            "an idle connection parks long before its idle timeout"
        );

        tokio::time::advance(Duration::from_secs(1)).await;
        activity.on_read();
        let (at, expiry) = activity.next_deadline(&TIMEOUTS, false, false).unwrap();
        assert_eq!(
            expiry,
            Expiry::Head,
            "bytes of a new head arm the read timeout"
        );
        assert!(at <= Instant::now() + TIMEOUTS.read);
    }

    #[tokio::test(start_paused = true)]
    async fn a_head_gets_the_shorter_of_read_timeout_and_max_request_read() {
        let short_request = Timeouts {
            max_request_read: Duration::from_secs(2),
            ..TIMEOUTS
        };
        let activity = Activity::new();
        let (at, _) = activity
            .next_deadline(&short_request, false, false)
            .unwrap();
        assert_eq!(
            at,
            activity.epoch + TIMEOUTS.read,
            "before any byte, the connection has read_timeout"
        );
        tokio::time::advance(Duration::from_secs(1)).await;
        activity.on_read();
        let head_started = Instant::now();
        let (at, expiry) = activity
            .next_deadline(&short_request, false, false)
            .unwrap();
        assert_eq!(expiry, Expiry::Head);
        assert!(
            at <= head_started + Duration::from_secs(2) && at > head_started,
            "{:?} after the head began",
            at - head_started
        );
        let (at, _) = activity.next_deadline(&TIMEOUTS, false, false).unwrap();
        assert!(at > head_started + Duration::from_secs(4));
    }

    /// Stands in for hyper reading a head that never completes: reads
    /// whatever arrives, never answers, and hands the socket back.
    struct StalledHead<S>(Option<WatchedIo<S>>);

    impl<S: tokio::io::AsyncRead + Unpin> std::future::Future for StalledHead<S> {
        type Output = SessionResult;
        fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<SessionResult> {
            let Some(io) = self.0.as_mut() else {
                return Poll::Pending;
            };
            let mut storage = [0u8; 64];
            loop {
                let mut buf = hyper::rt::ReadBuf::new(&mut storage);
                match Pin::new(&mut *io).poll_read(cx, buf.unfilled()) {
                    Poll::Ready(Ok(())) if !buf.filled().is_empty() => continue,
                    _ => return Poll::Pending,
                }
            }
        }
    }

    impl<S: tokio::io::AsyncRead + Unpin> Session<S> for StalledHead<S> {
        fn graceful_shutdown(&mut self) {}
        fn into_io(mut self) -> Option<(WatchedIo<S>, Bytes)> {
            Some((self.0.take()?, Bytes::new()))
        }
    }

    /// One `Read::poll_read` on `io` into an 8 KiB buffer, as hyper makes it.
    async fn read_once<S: tokio::io::AsyncRead + Unpin>(io: &mut WatchedIo<S>) -> Vec<u8> {
        let mut raw = [0u8; 8192];
        let mut buf = hyper::rt::ReadBuf::new(&mut raw);
        std::future::poll_fn(|cx| Read::poll_read(Pin::new(&mut *io), cx, buf.unfilled()))
            .await
            .unwrap();
        buf.filled().to_vec()
    }

    #[tokio::test]
    async fn a_prefix_comes_with_the_bytes_behind_it_in_one_read() {
        let (mut client, socket) = tokio::io::duplex(64);
        let mut io = WatchedIo::with_prefix(socket, Activity::new(), Bytes::from_static(b"GE"));
        tokio::io::AsyncWriteExt::write_all(&mut client, b"T / HTTP/1.1\r\n")
            .await
            .unwrap();
        assert_eq!(read_once(&mut io).await, b"GET / HTTP/1.1\r\n");

        // With nothing behind it, the prefix alone is the read.
        let (_client, socket) = tokio::io::duplex(64);
        let mut io = WatchedIo::with_prefix(socket, Activity::new(), Bytes::from_static(b"GE"));
        assert_eq!(read_once(&mut io).await, b"GE");
    }

    /// Stands in for hyper: idle at once; hands back, with the socket, a
    /// read buffer that reports when it is freed.
    struct IdleSession {
        io: WatchedIo<tokio::io::DuplexStream>,
        read_buffer: Bytes,
    }

    struct TrackedBuffer(Arc<std::sync::atomic::AtomicBool>);

    impl AsRef<[u8]> for TrackedBuffer {
        fn as_ref(&self) -> &[u8] {
            &[]
        }
    }

    impl Drop for TrackedBuffer {
        fn drop(&mut self) {
            self.0.store(true, Ordering::Release);
        }
    }

    impl std::future::Future for IdleSession {
        type Output = SessionResult;
        fn poll(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<Self::Output> {
            Poll::Pending
        }
    }

    impl Session<tokio::io::DuplexStream> for IdleSession {
        fn graceful_shutdown(&mut self) {}
        fn into_io(self) -> Option<(WatchedIo<tokio::io::DuplexStream>, Bytes)> {
            Some((self.io, self.read_buffer))
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_stalled_head_gets_408_through_the_stream_within_max_request_read() {
        let (mut client, server) = tokio::io::duplex(4096);
        let activity = Activity::new();
        let io = WatchedIo::new(server, activity.clone());
        let timeouts = Timeouts {
            read: Duration::from_secs(60),
            max_request_read: Duration::from_secs(2),
            ..TIMEOUTS
        };
        let started = Instant::now();
        let serving = tokio::spawn(async move {
            let stop = crate::stop::StopSignal::default();
            serve(
                io,
                |io| StalledHead(Some(io)),
                activity,
                timeouts,
                &stop,
                None,
            )
            .await
        });
        // The task now sleeps on the connection's read_timeout; the head's
        // first bytes must bring its deadline forward.
        tokio::time::sleep(Duration::from_secs(1)).await;
        client.write_all(b"GET /stall HT").await.unwrap();
        let mut answer = Vec::new();
        client.read_to_end(&mut answer).await.unwrap();
        assert_eq!(
            answer, REQUEST_TIMEOUT,
            "sent through the stream, then closed"
        );
        let elapsed = started.elapsed();
        assert!(
            elapsed >= Duration::from_secs(3) && elapsed < Duration::from_secs(4),
            "408 after {elapsed:?}: the head's 2 s, from its first byte at 1 s"
        );
        serving.await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn a_parked_connection_keeps_no_buffer_of_its_session() {
        let (client, socket) = tokio::io::duplex(64);
        let activity = Activity::new();
        activity.request_started();
        activity.response_finished();
        let freed = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let start = |io| IdleSession {
            io,
            // hyper hands back its whole read buffer, empty or not.
            read_buffer: Bytes::from_owner(TrackedBuffer(freed.clone())),
        };
        let stop = crate::stop::StopSignal::default();
        let io = WatchedIo::new(socket, activity.clone());
        let serving = serve(io, start, activity, TIMEOUTS, &stop, None);
        tokio::pin!(serving);
        tokio::select! {
            _ = &mut serving => panic!("the connection ended instead of parking"),
            _ = tokio::time::sleep(PARK_AFTER * 5) => {}
        }
        assert!(
            freed.load(Ordering::Acquire),
            "a parked connection still holds its session's read buffer"
        );
        drop(client);
        tokio::time::timeout(Duration::from_secs(1), serving)
            .await
            .expect("a parked connection ends when its client leaves");
    }

    #[tokio::test]
    async fn drained_resolves_when_the_last_guard_drops() {
        let count = Arc::new(ConnectionCount::default());
        let guard = count.enter();
        let waiter = tokio::spawn({
            let count = count.clone();
            async move { count.drained().await }
        });
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished());
        drop(guard);
        tokio::time::timeout(Duration::from_secs(1), waiter)
            .await
            .unwrap()
            .unwrap();
    }
}
