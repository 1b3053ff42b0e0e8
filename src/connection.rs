//! One task per connection: hyper serves HTTP/1.1 on a socket wrapped in
//! `WatchedIo`, and this task enforces the timeouts hyper does not know:
//!
//! - a request head must arrive within `read_timeout` (also the first bytes
//!   of a new connection) → `408` and close;
//! - an idle keep-alive connection is closed quietly after `idle_timeout`;
//! - a client that stops reading is dropped after `write_timeout` without
//!   progress, which also frees a Ruby thread streaming to it;
//! - on stop, hyper's graceful shutdown: idle connections close at once,
//!   in-flight requests finish and their connection closes after them.

use std::io;
use std::os::fd::{BorrowedFd, RawFd};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use hyper::rt::{Read, ReadBufCursor, Write};
use tokio::sync::Notify;
use tokio::time::Instant;

/// The timeouts a connection task enforces.
#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    pub read: Duration,
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
    /// Wakes the task when its next deadline may have moved.
    changed: Notify,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Expiry {
    /// A head (or the first bytes) did not arrive in time: answer 408.
    Head,
    /// Idle keep-alive connection: close quietly.
    Idle,
    /// The client stopped reading: drop.
    Write,
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
            changed: Notify::new(),
        })
    }

    fn now(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64 + 1
    }

    fn at(&self, stamp: u64) -> Instant {
        self.epoch + Duration::from_millis(stamp - 1)
    }

    fn in_request(&self) -> bool {
        self.requests.load(Ordering::Acquire) > self.responses.load(Ordering::Acquire)
    }

    /// A request head was parsed and handed to the service.
    pub fn request_started(&self) {
        self.requests.fetch_add(1, Ordering::AcqRel);
        self.head_started.store(0, Ordering::Release);
        self.changed.notify_one();
    }

    /// hyper is done with a response body (the connection may go idle).
    pub fn response_finished(&self) {
        self.responses.fetch_add(1, Ordering::AcqRel);
        self.idle_since.store(self.now(), Ordering::Release);
        // The idle deadline may be earlier than the one the task sleeps on.
        self.changed.notify_one();
    }

    fn on_read(&self) {
        if !self.in_request() && self.head_started.load(Ordering::Acquire) == 0 {
            self.head_started.store(self.now(), Ordering::Release);
        }
    }

    fn on_write(&self, stalled: bool) {
        let was = self.write_stalled.load(Ordering::Acquire);
        if stalled && was == 0 {
            self.write_stalled.store(self.now(), Ordering::Release);
            self.changed.notify_one();
        } else if !stalled && was != 0 {
            self.write_stalled.store(0, Ordering::Release);
        }
    }

    /// The earliest deadline that applies now, and what its expiry means.
    fn next_deadline(&self, timeouts: &Timeouts) -> Option<(Instant, Expiry)> {
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
        if !self.in_request() {
            let head_started = self.head_started.load(Ordering::Acquire);
            if head_started != 0 {
                consider(self.at(head_started) + timeouts.read, Expiry::Head);
            } else if self.requests.load(Ordering::Acquire) == 0 {
                // A new connection owes us its first request within read_timeout.
                consider(
                    self.at(self.idle_since.load(Ordering::Acquire)) + timeouts.read,
                    Expiry::Head,
                );
            } else {
                consider(
                    self.at(self.idle_since.load(Ordering::Acquire)) + timeouts.idle,
                    Expiry::Idle,
                );
            }
        }
        next
    }
}

/// The socket as hyper sees it, reporting reads and stalled writes.
pub struct WatchedIo<S> {
    inner: S,
    activity: Arc<Activity>,
}

impl<S> WatchedIo<S> {
    pub fn new(inner: S, activity: Arc<Activity>) -> Self {
        Self { inner, activity }
    }
}

impl<S: tokio::io::AsyncRead + Unpin> Read for WatchedIo<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        mut buf: ReadBufCursor<'_>,
    ) -> Poll<io::Result<()>> {
        // SAFETY: the cursor's unfilled part is handed to tokio's ReadBuf,
        // which only writes initialised bytes into it; we then advance the
        // cursor by exactly the number of bytes tokio reports as filled.
        let filled = unsafe {
            let mut read_buf = tokio::io::ReadBuf::uninit(buf.as_mut());
            match tokio::io::AsyncRead::poll_read(Pin::new(&mut self.inner), cx, &mut read_buf) {
                Poll::Ready(Ok(())) => read_buf.filled().len(),
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
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

const REQUEST_TIMEOUT: &[u8] =
    b"HTTP/1.1 408 Request Timeout\r\nconnection: close\r\ncontent-length: 0\r\n\r\n";

/// Drives `connection` until it ends, a timeout expires, or (after `stop`)
/// it has drained. `fd` is the connection's socket, used only while
/// `connection` (which owns it) is alive.
pub async fn drive<C>(
    connection: Pin<&mut C>,
    graceful_shutdown: impl Fn(Pin<&mut C>),
    fd: RawFd,
    activity: Arc<Activity>,
    timeouts: Timeouts,
    stop: &crate::stop::StopSignal,
) where
    C: std::future::Future<Output = hyper::Result<()>>,
{
    let mut connection = connection;
    let stopped = stop.stopped();
    tokio::pin!(stopped);
    let mut draining = false;
    loop {
        let deadline = activity.next_deadline(&timeouts);
        let sleep_until =
            deadline.map_or_else(|| Instant::now() + Duration::from_secs(3600), |(at, _)| at);
        tokio::select! {
            result = connection.as_mut() => {
                if let Err(e) = result {
                    tracing::debug!(error = %e, "connection ended with an error");
                }
                return;
            }
            _ = tokio::time::sleep_until(sleep_until), if deadline.is_some() => {
                match activity.next_deadline(&timeouts) {
                    Some((at, expiry)) if at <= Instant::now() => {
                        if expiry == Expiry::Head {
                            // SAFETY: `connection` owns the socket and is still
                            // alive (it is dropped by our caller after we return),
                            // so the descriptor is open; the write is a single
                            // non-blocking best-effort send.
                            let socket = unsafe { BorrowedFd::borrow_raw(fd) };
                            let _ = nix::unistd::write(socket, REQUEST_TIMEOUT);
                        }
                        tracing::debug!(?expiry, "connection timed out");
                        return;
                    }
                    _ => continue,
                }
            }
            _ = activity.changed.notified() => continue,
            _ = &mut stopped, if !draining => {
                draining = true;
                graceful_shutdown(connection.as_mut());
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
        idle: Duration::from_secs(20),
        write: Duration::from_secs(10),
    };

    #[tokio::test(start_paused = true)]
    async fn deadlines_follow_the_connection_phase() {
        let activity = Activity::new();
        let start = Instant::now();
        let (at, expiry) = activity.next_deadline(&TIMEOUTS).unwrap();
        assert_eq!(
            expiry,
            Expiry::Head,
            "a new connection owes a request within read_timeout"
        );
        assert!(at >= start + TIMEOUTS.read - Duration::from_millis(2));

        activity.request_started();
        assert_eq!(
            activity.next_deadline(&TIMEOUTS),
            None,
            "no timer while the app works"
        );
        activity.on_write(true);
        assert_eq!(activity.next_deadline(&TIMEOUTS).unwrap().1, Expiry::Write);
        activity.on_write(false);
        activity.response_finished();
        assert_eq!(activity.next_deadline(&TIMEOUTS).unwrap().1, Expiry::Idle);

        tokio::time::advance(Duration::from_secs(1)).await;
        activity.on_read();
        let (at, expiry) = activity.next_deadline(&TIMEOUTS).unwrap();
        assert_eq!(
            expiry,
            Expiry::Head,
            "bytes of a new head arm the read timeout"
        );
        assert!(at <= Instant::now() + TIMEOUTS.read);
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
