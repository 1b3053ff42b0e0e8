//! One request/response exchange on an HTTP/2 connection, polled by the
//! connection's own task (see `session.rs`): waits for the app's response
//! (or the client's RST_STREAM), sends its head, then its body, handing h2
//! only as much data as the client's flow-control windows let it send now.
//! Data the client has no window for therefore waits here, where it can be
//! seen, rather than in h2's send buffer: a stream that has data to send and
//! gets no send capacity for `write_timeout` is reset (RST_STREAM CANCEL),
//! so a client cannot pin streams by never sending WINDOW_UPDATE. A body
//! waiting on the app (a slow producer) is not stalled and never cut.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use h2::server::SendResponse;
use h2::{Reason, SendStream};
use http::header::{CONNECTION, CONTENT_LENGTH, DATE, TE, TRANSFER_ENCODING, UPGRADE};
use http::{HeaderMap, HeaderName, HeaderValue, Response, StatusCode};
use http_body::Body;
use pin_project_lite::pin_project;
use tokio::time::{Instant, Sleep};

use super::session::ConnectionShared;
use crate::exchange::Exchange;
use crate::interim::InterimReceiver;
use crate::response::ResponseBody;
use crate::written::WrittenNotice;

/// What a stream's handler produces: the response, and the exchange that
/// records it (stats, access log) when the stream's task ends.
pub type Exchanged = (Response<ResponseBody>, Exchange);

/// The largest capacity h2 accepts in one reservation (a window's maximum).
const MAX_RESERVATION: usize = (1 << 31) - 1;

/// A stream's share of the connection; tells the connection the response is
/// over when dropped, however the exchange ended (sent, reset by either
/// side, connection gone).
pub(super) struct Finished(pub(super) Arc<ConnectionShared>);

impl Drop for Finished {
    fn drop(&mut self) {
        self.0.activity.response_finished();
    }
}

/// How an exchange ended, as the connection needs to know it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum StreamEnd {
    /// Sent, or reset by either side for any reason but a stall.
    Done,
    /// Reset after `write_timeout` without send capacity. `sends`: the
    /// connection's send count when the stall began.
    StalledOut { sends: u64 },
}

pin_project! {
    pub(super) struct StreamTask<F> {
        respond: SendResponse<Bytes>,
        // HEAD: the head is sent, never a body.
        head_only: bool,
        finished: Finished,
        // The app's 103 Early Hints, sent until the final response.
        hints: Option<InterimReceiver>,
        // Once the response is known; dropped with the task.
        exchange: Option<Exchange>,
        // Fired once the response's end is handed to h2 (see `written`).
        written: Option<WrittenNotice>,
        #[pin]
        state: State<F>,
    }
}

pin_project! {
    #[project = StateProj]
    enum State<F> {
        Waiting { #[pin] response: F },
        Sending { pipe: BodyPipe },
    }
}

impl<F> StreamTask<F> {
    pub(super) fn new(
        respond: SendResponse<Bytes>,
        head_only: bool,
        finished: Finished,
        hints: Option<InterimReceiver>,
        response: F,
    ) -> Self {
        Self {
            respond,
            head_only,
            finished,
            hints,
            exchange: None,
            written: None,
            state: State::Waiting { response },
        }
    }
}

impl<F> Future for StreamTask<F>
where
    F: Future<Output = Exchanged>,
{
    type Output = StreamEnd;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<StreamEnd> {
        let mut this = self.project();
        loop {
            match this.state.as_mut().project() {
                StateProj::Waiting { response } => {
                    if let Some(hints) = this.hints {
                        while let Poll::Ready(Some(fields)) = hints.poll_recv(cx) {
                            send_early_hints(this.respond, fields);
                        }
                    }
                    let mut response = match response.poll(cx) {
                        Poll::Ready((response, mut exchange)) => {
                            exchange.responded(&response);
                            *this.exchange = Some(exchange);
                            response
                        }
                        // The client may cancel while the app works; the
                        // app's answer is then dropped unsent.
                        Poll::Pending => {
                            return this.respond.poll_reset(cx).map(|_| StreamEnd::Done)
                        }
                    };
                    if let Some(mut hints) = this.hints.take() {
                        for fields in hints.close() {
                            send_early_hints(this.respond, fields);
                        }
                    }
                    *this.written = response.extensions_mut().remove::<WrittenNotice>();
                    match send_head(this.respond, response, *this.head_only) {
                        Ok(Some((send, body))) => this.state.set(State::Sending {
                            pipe: BodyPipe::new(send, body),
                        }),
                        Ok(None) => {
                            if let Some(written) = this.written.take() {
                                written.fire();
                            }
                            return Poll::Ready(StreamEnd::Done);
                        }
                        Err(()) => return Poll::Ready(StreamEnd::Done),
                    }
                }
                StateProj::Sending { pipe } => {
                    let end =
                        std::task::ready!(pipe.poll(cx, &this.finished.0, this.exchange.as_mut()));
                    if pipe.completed {
                        if let Some(written) = this.written.take() {
                            written.fire();
                        }
                    }
                    return Poll::Ready(end);
                }
            }
        }
    }
}

/// Sends a `103 Early Hints` (informational HEADERS) ahead of the response.
fn send_early_hints(respond: &mut SendResponse<Bytes>, fields: HeaderMap) {
    let mut interim = Response::new(());
    *interim.status_mut() = StatusCode::EARLY_HINTS;
    *interim.headers_mut() = fields;
    if let Err(e) = respond.send_informational(interim) {
        tracing::debug!(error = %e, "could not send 103 Early Hints");
    }
}

/// Sends the response head; returns where its body goes, if it has one
/// (`Ok(None)`: the head ended the stream). `Err`: the stream was reset.
fn send_head(
    respond: &mut SendResponse<Bytes>,
    response: Response<ResponseBody>,
    head_only: bool,
) -> Result<Option<(SendStream<Bytes>, ResponseBody)>, ()> {
    let (mut head, body) = response.into_parts();
    strip_connection_fields(&mut head.headers);
    head.headers.entry(DATE).or_insert_with(super::date::now);
    let ends = head_only || is_bodiless(head.status) || body.is_end_stream();
    if !ends {
        if let Some(length) = body.size_hint().exact() {
            head.headers
                .entry(CONTENT_LENGTH)
                .or_insert_with(|| HeaderValue::from(length));
        }
    }
    match respond.send_response(Response::from_parts(head, ()), ends) {
        Ok(send) => Ok((!ends).then_some((send, body))),
        Err(e) => {
            tracing::debug!(error = %e, "could not send an HTTP/2 response head");
            respond.send_reset(Reason::INTERNAL_ERROR);
            Err(())
        }
    }
}

/// Statuses whose responses never carry content (RFC 9110 §6.4.1).
fn is_bodiless(status: StatusCode) -> bool {
    status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED
}

/// Removes the fields HTTP/2 forbids in a response (RFC 9113 §8.2.2), and
/// any that `connection` names, as hyper does for its HTTP/2 responses.
pub(crate) fn strip_connection_fields(headers: &mut HeaderMap) {
    const KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
    const PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");
    for name in [KEEP_ALIVE, PROXY_CONNECTION, TRANSFER_ENCODING, UPGRADE, TE] {
        headers.remove(name);
    }
    if let Some(named) = headers.remove(CONNECTION) {
        if let Ok(named) = named.to_str() {
            for name in named.split(',') {
                headers.remove(name.trim());
            }
        }
    }
}

/// Moves a response body to h2 within the stream's send capacity.
struct BodyPipe {
    send: SendStream<Bytes>,
    body: ResponseBody,
    /// Taken from the body, waiting for send capacity.
    pending: Bytes,
    /// `pending` is the last of the body (no trailers follow).
    pending_ends: bool,
    /// Set while `pending` waits for capacity the client does not grant.
    stall: Option<Stall>,
    /// The body's end (last DATA or trailers) was handed to h2.
    completed: bool,
}

struct Stall {
    /// The connection's send count when the stall began.
    sends: u64,
    /// Allocated at a stream's first stall, re-armed at later ones.
    timer: Pin<Box<Sleep>>,
    armed: bool,
}

impl BodyPipe {
    fn new(send: SendStream<Bytes>, body: ResponseBody) -> Self {
        Self {
            send,
            body,
            pending: Bytes::new(),
            pending_ends: false,
            stall: None,
            completed: false,
        }
    }

    fn poll(
        &mut self,
        cx: &mut Context<'_>,
        connection: &ConnectionShared,
        mut exchange: Option<&mut Exchange>,
    ) -> Poll<StreamEnd> {
        loop {
            // Also registers for the client's RST_STREAM while waiting below.
            if self.send.poll_reset(cx).is_ready() {
                return Poll::Ready(StreamEnd::Done);
            }
            if !self.pending.is_empty() {
                let capacity = match self.poll_capacity(cx) {
                    Poll::Ready(Some(capacity)) => capacity,
                    Poll::Ready(None) => return Poll::Ready(StreamEnd::Done),
                    Poll::Pending => return self.poll_stall(cx, connection),
                };
                if let Some(stall) = &mut self.stall {
                    stall.armed = false;
                }
                let piece = if capacity >= self.pending.len() {
                    std::mem::take(&mut self.pending)
                } else {
                    self.pending.split_to(capacity)
                };
                let ends = self.pending_ends && self.pending.is_empty();
                connection.sends.fetch_add(1, Ordering::Relaxed);
                if let Some(exchange) = exchange.as_deref_mut() {
                    exchange.sent(piece.len());
                }
                let sent = self.send.send_data(piece, ends).is_ok();
                if !sent || ends {
                    self.completed = sent;
                    return Poll::Ready(StreamEnd::Done);
                }
                continue;
            }
            // Waiting on the app here is never a stall.
            match Pin::new(&mut self.body).poll_frame(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Some(Ok(frame))) => match frame.into_data() {
                    Ok(data) => {
                        let ends = self.body.is_end_stream();
                        if data.is_empty() {
                            if ends {
                                self.completed = self.send.send_data(Bytes::new(), true).is_ok();
                                return Poll::Ready(StreamEnd::Done);
                            }
                            continue;
                        }
                        self.send.reserve_capacity(data.len().min(MAX_RESERVATION));
                        self.pending = data;
                        self.pending_ends = ends;
                    }
                    Err(frame) => {
                        if let Ok(fields) = frame.into_trailers() {
                            self.completed = self.send.send_trailers(fields).is_ok();
                            return Poll::Ready(StreamEnd::Done);
                        }
                    }
                },
                Poll::Ready(Some(Err(aborted))) => {
                    tracing::debug!(error = %aborted, "HTTP/2 response body failed; stream reset");
                    self.send.send_reset(Reason::INTERNAL_ERROR);
                    return Poll::Ready(StreamEnd::Done);
                }
                Poll::Ready(None) => {
                    self.completed = self.send.send_data(Bytes::new(), true).is_ok();
                    return Poll::Ready(StreamEnd::Done);
                }
            }
        }
    }

    /// The send capacity assigned to the stream once there is some;
    /// `Ready(None)`: the stream can no longer send.
    fn poll_capacity(&mut self, cx: &mut Context<'_>) -> Poll<Option<usize>> {
        loop {
            let capacity = self.send.capacity();
            if capacity > 0 {
                return Poll::Ready(Some(capacity));
            }
            match self.send.poll_capacity(cx) {
                Poll::Ready(Some(Ok(_))) => continue,
                Poll::Ready(_) => return Poll::Ready(None),
                Poll::Pending => return Poll::Pending,
            }
        }
    }

    /// Data waits for capacity: starts or checks the stall timer, and resets
    /// the stream once it has run out.
    fn poll_stall(
        &mut self,
        cx: &mut Context<'_>,
        connection: &ConnectionShared,
    ) -> Poll<StreamEnd> {
        let stall = match &mut self.stall {
            Some(stall) if stall.armed => stall,
            Some(stall) => {
                stall.armed = true;
                stall.sends = connection.sends.load(Ordering::Relaxed);
                let deadline = Instant::now() + connection.write_timeout;
                stall.timer.as_mut().reset(deadline);
                stall
            }
            None => self.stall.insert(Stall {
                sends: connection.sends.load(Ordering::Relaxed),
                timer: Box::pin(tokio::time::sleep(connection.write_timeout)),
                armed: true,
            }),
        };
        if stall.timer.as_mut().poll(cx).is_pending() {
            return Poll::Pending;
        }
        tracing::debug!(
            seconds = connection.write_timeout.as_secs_f64(),
            "HTTP/2 stream got no send window within write_timeout; reset"
        );
        self.send.send_reset(Reason::CANCEL);
        Poll::Ready(StreamEnd::StalledOut { sends: stall.sends })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connection_fields_and_the_fields_they_name_are_dropped() {
        let mut headers = HeaderMap::new();
        headers.insert(CONNECTION, HeaderValue::from_static("keep-alive, x-hop"));
        headers.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        headers.insert("x-hop", HeaderValue::from_static("1"));
        headers.insert(TRANSFER_ENCODING, HeaderValue::from_static("chunked"));
        headers.insert("content-type", HeaderValue::from_static("text/plain"));
        strip_connection_fields(&mut headers);
        assert_eq!(headers.len(), 1, "{headers:?}");
        assert!(headers.contains_key("content-type"));
    }
}
