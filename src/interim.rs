//! Interim responses an app sends before its final one: `103 Early Hints`
//! (`rack.early_hints`). The Ruby thread running the app holds an
//! `EarlyHints` (plain Rust data, carried in the request); the tokio side
//! that answers the request holds its `InterimReceiver` and sends what
//! arrives, before the final response:
//!
//! - HTTP/2: the stream sends each as informational HEADERS (http2/stream.rs);
//! - HTTP/1.1: the request's service future turns each into bytes queued in
//!   `InterimQueue`, which `InterimIo` writes when hyper flushes, and holds
//!   the final response back until they are written (see `InterimIo` for why
//!   that ordering is safe).
//!
//! Once the final response is on its way (or the exchange is gone) the
//! receiver is closed and further hints are dropped: a 103 after the final
//! head would land inside the body.

use std::collections::VecDeque;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};

use bytes::{Buf, Bytes, BytesMut};
use http::HeaderMap;
use hyper::rt::{Read, ReadBufCursor, Write};

struct Slot {
    open: bool,
    pending: VecDeque<HeaderMap>,
    /// The task waiting for hints (the stream, or hyper's connection).
    waker: Option<Waker>,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// The app's side: sends hints while the exchange can still take them.
pub struct EarlyHints {
    /// `None`: the client cannot take interim responses (HTTP/1.0).
    slot: Option<Arc<Mutex<Slot>>>,
}

impl std::fmt::Debug for EarlyHints {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.slot.is_some() {
            "EarlyHints"
        } else {
            "EarlyHints(inert)"
        })
    }
}

impl EarlyHints {
    /// Hints for a client that cannot take them: every send is dropped.
    pub fn inert() -> Self {
        Self { slot: None }
    }

    /// Queues a `103 Early Hints` with `fields` (connection-specific fields
    /// removed). False when it will not be sent: the final response is on
    /// its way, the client is gone or cannot take it, or no field is left.
    pub fn send(&self, mut fields: HeaderMap) -> bool {
        crate::http2::strip_connection_fields(&mut fields);
        fields.remove(http::header::CONTENT_LENGTH);
        let Some(slot) = &self.slot else {
            return false;
        };
        if fields.is_empty() {
            return false;
        }
        let mut slot = lock(slot);
        if !slot.open {
            return false;
        }
        slot.pending.push_back(fields);
        if let Some(waker) = slot.waker.take() {
            waker.wake();
        }
        true
    }
}

/// The tokio side of one exchange's hints.
pub struct InterimReceiver {
    slot: Arc<Mutex<Slot>>,
}

/// A channel for one exchange's hints.
pub fn channel() -> (EarlyHints, InterimReceiver) {
    let slot = Arc::new(Mutex::new(Slot {
        open: true,
        pending: VecDeque::new(),
        waker: None,
    }));
    (
        EarlyHints {
            slot: Some(slot.clone()),
        },
        InterimReceiver { slot },
    )
}

impl InterimReceiver {
    /// The next hint; `Pending` (with a wake-up registered) while none is
    /// queued and the receiver is open; `Ready(None)` once closed and empty.
    pub fn poll_recv(&mut self, cx: &mut Context<'_>) -> Poll<Option<HeaderMap>> {
        let mut slot = lock(&self.slot);
        if let Some(fields) = slot.pending.pop_front() {
            return Poll::Ready(Some(fields));
        }
        if !slot.open {
            return Poll::Ready(None);
        }
        if !slot.waker.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
            slot.waker = Some(cx.waker().clone());
        }
        Poll::Pending
    }

    /// The final response is on its way: no new hints. Returns the ones
    /// already queued, which go out first.
    pub fn close(&mut self) -> VecDeque<HeaderMap> {
        let mut slot = lock(&self.slot);
        slot.open = false;
        slot.waker = None;
        std::mem::take(&mut slot.pending)
    }
}

impl Drop for InterimReceiver {
    fn drop(&mut self) {
        self.close();
    }
}

/// The HTTP/1.1 form of a `103 Early Hints` response.
pub fn http1_bytes(fields: &HeaderMap) -> Bytes {
    let mut out = BytesMut::with_capacity(64);
    out.extend_from_slice(b"HTTP/1.1 103 Early Hints\r\n");
    for (name, value) in fields {
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"\r\n");
    out.freeze()
}

/// Waits for an HTTP/1.1 request's final `response`, queueing its hints for
/// the connection as they come; returns it once they are all written.
pub async fn http1_exchange<R>(
    queue: &InterimQueue,
    mut hints: InterimReceiver,
    response: impl std::future::Future<Output = R>,
) -> R {
    let mut response = std::pin::pin!(response);
    let response = std::future::poll_fn(|cx| {
        while let Poll::Ready(Some(fields)) = hints.poll_recv(cx) {
            queue.push(http1_bytes(&fields));
        }
        response.as_mut().poll(cx)
    })
    .await;
    for fields in hints.close() {
        queue.push(http1_bytes(&fields));
    }
    std::future::poll_fn(|cx| queue.poll_written(cx)).await;
    response
}

/// Interim response bytes waiting for an HTTP/1.1 connection's socket.
#[derive(Default)]
pub struct InterimQueue {
    state: Mutex<QueueState>,
}

#[derive(Default)]
struct QueueState {
    bytes: VecDeque<Bytes>,
    /// The request waiting for the queue to be written.
    waiter: Option<Waker>,
}

impl InterimQueue {
    pub fn push(&self, bytes: Bytes) {
        lock(&self.state).bytes.push_back(bytes);
    }

    /// Takes the bytes not written yet (a takeover writes them itself).
    pub fn take_unwritten(&self) -> Bytes {
        let mut state = lock(&self.state);
        let mut out = BytesMut::new();
        for bytes in state.bytes.drain(..) {
            out.extend_from_slice(&bytes);
        }
        if let Some(waiter) = state.waiter.take() {
            waiter.wake();
        }
        out.freeze()
    }

    /// `Ready` once everything pushed has been written to the socket.
    pub fn poll_written(&self, cx: &mut Context<'_>) -> Poll<()> {
        let mut state = lock(&self.state);
        if state.bytes.is_empty() {
            return Poll::Ready(());
        }
        if !state
            .waiter
            .as_ref()
            .is_some_and(|w| w.will_wake(cx.waker()))
        {
            state.waiter = Some(cx.waker().clone());
        }
        Poll::Pending
    }
}

/// An HTTP/1.1 connection's IO as hyper sees it, writing queued interim
/// responses when hyper flushes.
///
/// Why the order is safe: hyper calls `poll_flush` on its IO only once its
/// own write buffer is empty (a previous response is then wholly handed
/// over), and a request holds its final response back until its interim
/// bytes are written (`InterimQueue::poll_written`), so they can neither
/// split an earlier response nor follow their own.
pub struct InterimIo<T> {
    inner: T,
    queue: Option<Arc<InterimQueue>>,
}

impl<T> InterimIo<T> {
    /// `queue`: where this connection's requests put interim bytes (`None`
    /// when early hints are off).
    pub fn new(inner: T, queue: Option<Arc<InterimQueue>>) -> Self {
        Self { inner, queue }
    }

    pub fn into_inner(self) -> T {
        self.inner
    }
}

impl<T: Write + Unpin> InterimIo<T> {
    /// Writes queued interim bytes; `Ready` when none are left.
    fn poll_write_interim(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let Some(queue) = &self.queue else {
            return Poll::Ready(Ok(()));
        };
        loop {
            let mut state = lock(&queue.state);
            let Some(front) = state.bytes.front_mut() else {
                if let Some(waiter) = state.waiter.take() {
                    waiter.wake();
                }
                return Poll::Ready(Ok(()));
            };
            let written = match Pin::new(&mut self.inner).poll_write(cx, front) {
                Poll::Ready(Ok(0)) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                Poll::Ready(Ok(n)) => n,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => return Poll::Pending,
            };
            front.advance(written);
            if front.is_empty() {
                state.bytes.pop_front();
            }
        }
    }
}

impl<T: Read + Unpin> Read for InterimIo<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: ReadBufCursor<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<T: Write + Unpin> Write for InterimIo<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        std::task::ready!(self.poll_write_interim(cx))?;
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn link(value: &'static str) -> HeaderMap {
        let mut fields = HeaderMap::new();
        fields.append("link", HeaderValue::from_static(value));
        fields
    }

    #[test]
    fn hints_arrive_until_the_receiver_closes() {
        let (hints, mut receiver) = channel();
        let waker = futures_util::task::noop_waker();
        let mut cx = Context::from_waker(&waker);
        assert!(receiver.poll_recv(&mut cx).is_pending());
        assert!(hints.send(link("</a.css>; rel=preload")));
        assert!(hints.send(link("</b.js>; rel=preload")));
        let Poll::Ready(Some(first)) = receiver.poll_recv(&mut cx) else {
            panic!("a hint was queued");
        };
        assert_eq!(first["link"], "</a.css>; rel=preload");
        let rest = receiver.close();
        assert_eq!(rest.len(), 1, "queued before the close, still sent");
        assert!(
            !hints.send(link("</c.js>")),
            "after the final response: dropped"
        );
        assert!(matches!(receiver.poll_recv(&mut cx), Poll::Ready(None)));
        drop(receiver);
        assert!(!hints.send(link("</d.js>")));
        assert!(!EarlyHints::inert().send(link("</e.js>")));
    }

    #[test]
    fn connection_fields_are_dropped_and_nothing_left_is_not_sent() {
        let (hints, mut receiver) = channel();
        let mut fields = HeaderMap::new();
        fields.insert("connection", HeaderValue::from_static("close"));
        fields.insert("content-length", HeaderValue::from_static("3"));
        assert!(!hints.send(fields));
        assert!(receiver.close().is_empty());
    }

    #[test]
    fn http1_form_has_one_line_per_field() {
        let mut fields = link("</a.css>; rel=preload");
        fields.append("link", HeaderValue::from_static("</b.js>; rel=preload"));
        assert_eq!(
            &http1_bytes(&fields)[..],
            b"HTTP/1.1 103 Early Hints\r\nlink: </a.css>; rel=preload\r\nlink: </b.js>; rel=preload\r\n\r\n"
        );
    }
}
