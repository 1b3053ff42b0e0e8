//! An HTTP/2 request body as an `http_body::Body`, so request handling is the
//! same code for hyper's HTTP/1.1 bodies and h2's streams.

use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::Bytes;
use h2::{Reason, RecvStream};
use http_body::{Body, Frame, SizeHint};

/// DATA frames of one stream, then its trailers. Flow-control window is
/// given back to the client as each chunk is taken, so a body the server
/// stops reading stops the client once the window is used up.
pub struct RecvBody {
    stream: RecvStream,
    data_done: bool,
    /// Content-Length still expected, when the client declared one.
    remaining: Option<u64>,
}

impl RecvBody {
    pub fn new(stream: RecvStream, content_length: Option<u64>) -> Self {
        // A stream already ended has no body, whatever it declared.
        let remaining = if stream.is_end_stream() {
            Some(0)
        } else {
            content_length
        };
        Self {
            stream,
            data_done: false,
            remaining,
        }
    }
}

impl Body for RecvBody {
    type Data = Bytes;
    type Error = h2::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, h2::Error>>> {
        let this = &mut *self;
        if !this.data_done {
            match ready!(this.stream.poll_data(cx)) {
                Some(Ok(data)) => {
                    let _ = this.stream.flow_control().release_capacity(data.len());
                    if let Some(remaining) = &mut this.remaining {
                        *remaining = remaining.saturating_sub(data.len() as u64);
                    }
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                // RST_STREAM(NO_ERROR): the client wants no more of the
                // exchange's body sent (RFC 9113 §8.1); the body just ends.
                Some(Err(e)) if e.reason() == Some(Reason::NO_ERROR) => return Poll::Ready(None),
                Some(Err(e)) => return Poll::Ready(Some(Err(e))),
                None => this.data_done = true,
            }
        }
        match ready!(this.stream.poll_trailers(cx)) {
            Ok(trailers) => Poll::Ready(trailers.map(|fields| Ok(Frame::trailers(fields)))),
            Err(e) if e.reason() == Some(Reason::NO_ERROR) => Poll::Ready(None),
            Err(e) => Poll::Ready(Some(Err(e))),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.stream.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.remaining
            .map_or_else(SizeHint::default, SizeHint::with_exact)
    }
}
