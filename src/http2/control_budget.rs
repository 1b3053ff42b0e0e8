//! A per-connection budget for HTTP/2 frames that carry no request work.
//! h2 answers PING and SETTINGS by itself, so a client flooding them and
//! reading the acks could keep a connection's task (and the I/O thread it
//! shares with everyone else) busy forever. The frames are counted as h2
//! reads them (`BudgetedIo`, using `FrameScanner`); past the budget the
//! connection gets GOAWAY `ENHANCE_YOUR_CALM` and closes, and the rest of
//! what was read is never handed to h2.
//!
//! Counted: PING, SETTINGS, PRIORITY, GOAWAY and frame types h2 does not
//! know (extensions, which it ignores). Not counted: HEADERS, CONTINUATION,
//! DATA and RST_STREAM (request work, limited by h2's own header-size,
//! small-frame and reset-stream rules), WINDOW_UPDATE (an honest client sends
//! one per chunk of a large download, and it elicits no answer). A PING that
//! arrives after the server sent response data since the previous PING is
//! free: gRPC clients send one per round trip of a download to size their
//! windows (BDP probing), and gRPC's own servers exempt those the same way.

use std::ops::ControlFlow;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Instant;

use super::frame_scanner::{FrameHeader, FrameScanner};
use super::session::ConnectionShared;

/// Control frames a connection may send at once; no honest client sends
/// anywhere near this many (a browser sends a handful of SETTINGS and
/// PRIORITY frames, a keep-alive PING every few seconds).
pub const BURST: u32 = 1_000;
/// Control frames per second a connection earns back.
pub const PER_SECOND: u32 = 100;

const PRIORITY: u8 = 0x2;
const SETTINGS: u8 = 0x4;
const PING: u8 = 0x6;
const GOAWAY: u8 = 0x7;
const ACK: u8 = 0x1;
/// The highest frame type RFC 9113 defines (CONTINUATION).
const LAST_KNOWN: u8 = 0x9;

/// Whether a frame carries no request work (see the module docs).
pub fn is_control(kind: u8) -> bool {
    matches!(kind, PRIORITY | SETTINGS | PING | GOAWAY) || kind > LAST_KNOWN
}

/// A token bucket: `BURST` tokens, `PER_SECOND` earned back each second.
#[derive(Debug, Clone)]
pub struct ControlBudget {
    tokens: u32,
    /// When the last whole token was earned.
    earned_at: Instant,
}

impl ControlBudget {
    pub fn new(now: Instant) -> Self {
        Self {
            tokens: BURST,
            earned_at: now,
        }
    }

    /// Spends a token; false when none is left.
    pub fn take(&mut self, now: Instant) -> bool {
        let per_token = Duration::from_secs(1) / PER_SECOND;
        let elapsed = now.saturating_duration_since(self.earned_at);
        let earned = (elapsed.as_nanos() / per_token.as_nanos()).min(u128::from(BURST)) as u32;
        if earned > 0 {
            self.tokens = (self.tokens + earned).min(BURST);
            self.earned_at = if self.tokens == BURST {
                now
            } else {
                self.earned_at + per_token * earned
            };
        }
        match self.tokens.checked_sub(1) {
            Some(left) => {
                self.tokens = left;
                true
            }
            None => false,
        }
    }
}

/// The connection's socket as h2 reads it, with its control frames counted.
pub struct BudgetedIo<T> {
    inner: T,
    scanner: FrameScanner,
    budget: Option<ControlBudget>,
    /// Where the flood is reported, and the count of response data sent.
    connection: Arc<ConnectionShared>,
    sends_at_last_ping: u64,
}

impl<T> BudgetedIo<T> {
    pub fn new(inner: T, connection: Arc<ConnectionShared>) -> Self {
        Self {
            inner,
            scanner: FrameScanner::new(),
            budget: None,
            connection,
            sends_at_last_ping: 0,
        }
    }

    /// Counts one frame; breaks when it is over the budget.
    fn count(&mut self, header: &FrameHeader) -> ControlFlow<()> {
        if !is_control(header.kind) {
            return ControlFlow::Continue(());
        }
        if header.kind == PING && header.flags & ACK == 0 {
            let sends = self.connection.sends.load(Ordering::Relaxed);
            if sends != self.sends_at_last_ping {
                self.sends_at_last_ping = sends;
                return ControlFlow::Continue(());
            }
        }
        let now = Instant::now();
        let budget = self.budget.get_or_insert_with(|| ControlBudget::new(now));
        if budget.take(now) {
            ControlFlow::Continue(())
        } else {
            ControlFlow::Break(())
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for BudgetedIo<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = &mut *self;
        if this.connection.control_flood.load(Ordering::Relaxed) {
            // Nothing more for h2: the session is closing the connection.
            return Poll::Pending;
        }
        let before = buf.filled().len();
        match Pin::new(&mut this.inner).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {}
            other => return other,
        }
        let mut scanner = std::mem::take(&mut this.scanner);
        let stopped = scanner.feed(&buf.filled()[before..], |header| this.count(header));
        this.scanner = scanner;
        let Some(offset) = stopped else {
            return Poll::Ready(Ok(()));
        };
        this.connection.control_flood.store(true, Ordering::Relaxed);
        // h2 gets the frames before the one over the budget, and no more.
        buf.set_filled(before + offset);
        if offset == 0 {
            // An empty read would mean end of stream.
            return Poll::Pending;
        }
        Poll::Ready(Ok(()))
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for BudgetedIo<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_frames_are_the_ones_without_request_work() {
        let control: Vec<u8> = (0..=0x0b).filter(|&kind| is_control(kind)).collect();
        assert_eq!(control, vec![0x2, 0x4, 0x6, 0x7, 0xa, 0xb]);
        assert!(is_control(0xff));
    }

    #[tokio::test(start_paused = true)]
    async fn the_budget_allows_a_burst_then_earns_tokens_back_over_time() {
        let mut budget = ControlBudget::new(Instant::now());
        for _ in 0..BURST {
            assert!(budget.take(Instant::now()));
        }
        assert!(!budget.take(Instant::now()), "the burst is spent");
        tokio::time::advance(Duration::from_millis(25)).await;
        // 100 per second: two tokens in 25 ms, the half token is kept.
        assert!(budget.take(Instant::now()));
        assert!(budget.take(Instant::now()));
        assert!(!budget.take(Instant::now()));
        tokio::time::advance(Duration::from_millis(5)).await;
        assert!(
            budget.take(Instant::now()),
            "25 + 5 ms make the third token"
        );
        tokio::time::advance(Duration::from_secs(3600)).await;
        for _ in 0..BURST {
            assert!(budget.take(Instant::now()));
        }
        assert!(!budget.take(Instant::now()), "never more than the burst");
    }

    #[tokio::test(start_paused = true)]
    async fn a_steady_honest_rate_never_runs_out() {
        let mut budget = ControlBudget::new(Instant::now());
        for _ in 0..10_000 {
            tokio::time::advance(Duration::from_millis(1000 / PER_SECOND as u64)).await;
            assert!(budget.take(Instant::now()));
        }
    }
}
