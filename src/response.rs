//! Responses from the app as hyper sees them. The body is known up front
//! (Content-Length), streamed through a bounded channel from the Ruby thread
//! that iterates it (chunked), or a file the I/O side reads itself.

use std::collections::VecDeque;
use std::fmt;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::header::{HeaderValue, CONNECTION, CONTENT_TYPE, RETRY_AFTER};
use http::{HeaderMap, Response, StatusCode};
use http_body::{Body, Frame, SizeHint};
use tokio::runtime::Handle;
use tokio::sync::{mpsc, Notify};

use crate::file_body::FileBody;
use crate::written::WrittenNotice;

/// Chunks buffered between a streaming Ruby body and the socket.
pub const STREAM_CAPACITY: usize = 16;

#[derive(Debug)]
pub struct AppResponse {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: ResponseBody,
    /// Someone waits for the response to be written (`written`).
    pub written: Option<WrittenNotice>,
}

impl AppResponse {
    pub fn new(status: StatusCode, headers: HeaderMap, body: ResponseBody) -> Self {
        Self {
            status,
            headers,
            body,
            written: None,
        }
    }

    /// The response for hyper or h2; a `WrittenNotice` rides in its
    /// extensions.
    pub fn into_http(self) -> Response<ResponseBody> {
        let mut response = Response::new(self.body);
        *response.status_mut() = self.status;
        *response.headers_mut() = self.headers;
        if let Some(notice) = self.written {
            response.extensions_mut().insert(notice);
        }
        response
    }
}

/// The stream was cut short (the app raised mid-body): the connection is
/// aborted rather than ending a chunked body that looks complete.
#[derive(Debug)]
pub struct StreamAborted;

impl fmt::Display for StreamAborted {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("response body aborted by the application")
    }
}

impl std::error::Error for StreamAborted {}

pub enum ResponseBody {
    Empty,
    Chunks {
        chunks: VecDeque<Bytes>,
        remaining: u64,
        trailers: Option<HeaderMap>,
    },
    Stream {
        chunks: mpsc::Receiver<Bytes>,
        aborted: Arc<AtomicBool>,
        /// Set by the sender before it finishes (`BodySender::finish`).
        trailers: Arc<std::sync::Mutex<Option<HeaderMap>>>,
    },
    /// A file the app named with `to_path`, read by the I/O side.
    File(FileBody),
}

impl fmt::Debug for ResponseBody {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ResponseBody::Empty => f.write_str("Empty"),
            ResponseBody::Chunks { remaining, .. } => write!(f, "Chunks({remaining} bytes)"),
            ResponseBody::Stream { .. } => f.write_str("Stream"),
            ResponseBody::File(file) => write!(f, "File({} bytes)", file.remaining()),
        }
    }
}

impl ResponseBody {
    pub fn from_chunks(chunks: Vec<Bytes>) -> Self {
        let remaining = chunks.iter().map(|c| c.len() as u64).sum();
        ResponseBody::Chunks {
            chunks: chunks.into_iter().filter(|c| !c.is_empty()).collect(),
            remaining,
            trailers: None,
        }
    }

    /// Adds trailing header fields (sent after the data, e.g. gRPC's
    /// `grpc-status`) to a body whose chunks are known.
    pub fn with_trailers(mut self, fields: HeaderMap) -> Self {
        if let ResponseBody::Chunks { trailers, .. } = &mut self {
            *trailers = Some(fields);
        }
        self
    }

    /// A streaming body and the sender the Ruby thread writes into.
    pub fn channel() -> (BodySender, ResponseBody) {
        let (tx, rx) = mpsc::channel(STREAM_CAPACITY);
        let aborted = Arc::new(AtomicBool::new(false));
        let trailers = Arc::new(std::sync::Mutex::new(None));
        let sender = BodySender {
            chunks: tx,
            aborted: aborted.clone(),
            trailers: trailers.clone(),
        };
        (
            sender,
            ResponseBody::Stream {
                chunks: rx,
                aborted,
                trailers,
            },
        )
    }
}

impl Body for ResponseBody {
    type Data = Bytes;
    type Error = StreamAborted;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, StreamAborted>>> {
        match self.get_mut() {
            ResponseBody::Empty => Poll::Ready(None),
            ResponseBody::Chunks {
                chunks,
                remaining,
                trailers,
            } => Poll::Ready(match chunks.pop_front() {
                Some(chunk) => {
                    *remaining -= chunk.len() as u64;
                    Some(Ok(Frame::data(chunk)))
                }
                None => trailers.take().map(|fields| Ok(Frame::trailers(fields))),
            }),
            ResponseBody::Stream {
                chunks,
                aborted,
                trailers,
            } => match chunks.poll_recv(cx) {
                Poll::Ready(Some(chunk)) => Poll::Ready(Some(Ok(Frame::data(chunk)))),
                Poll::Ready(None) if aborted.load(Ordering::Acquire) => {
                    Poll::Ready(Some(Err(StreamAborted)))
                }
                Poll::Ready(None) => {
                    let fields = trailers.lock().unwrap_or_else(|p| p.into_inner()).take();
                    Poll::Ready(fields.map(|fields| Ok(Frame::trailers(fields))))
                }
                Poll::Pending => Poll::Pending,
            },
            ResponseBody::File(file) => Poll::Ready(match file.next_chunk() {
                Ok(Some(chunk)) => Some(Ok(Frame::data(chunk))),
                Ok(None) => None,
                Err(e) => {
                    tracing::error!(error = %e, "reading a to_path body failed; connection aborted");
                    Some(Err(StreamAborted))
                }
            }),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ResponseBody::Empty => true,
            ResponseBody::Chunks {
                chunks, trailers, ..
            } => chunks.is_empty() && trailers.is_none(),
            ResponseBody::Stream { .. } => false,
            ResponseBody::File(file) => file.remaining() == 0,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ResponseBody::Empty => SizeHint::with_exact(0),
            ResponseBody::Chunks { remaining, .. } => SizeHint::with_exact(*remaining),
            ResponseBody::Stream { .. } => SizeHint::default(),
            ResponseBody::File(file) => SizeHint::with_exact(file.remaining()),
        }
    }
}

/// Why a chunk could not be queued.
#[derive(Debug, PartialEq, Eq)]
pub enum SendError {
    /// The client went away (or the connection was dropped).
    Closed,
    /// The wait for buffer space was cancelled (Ruby interrupt).
    Cancelled(Bytes),
}

/// The Ruby side of a streaming body.
pub struct BodySender {
    chunks: mpsc::Sender<Bytes>,
    aborted: Arc<AtomicBool>,
    trailers: Arc<std::sync::Mutex<Option<HeaderMap>>>,
}

impl BodySender {
    /// Queues a chunk without blocking; hands it back when the buffer is full.
    pub fn try_send(&self, chunk: Bytes) -> Result<(), Result<Bytes, SendError>> {
        match self.chunks.try_send(chunk) {
            Ok(()) => Ok(()),
            Err(mpsc::error::TrySendError::Full(chunk)) => Err(Ok(chunk)),
            Err(mpsc::error::TrySendError::Closed(_)) => Err(Err(SendError::Closed)),
        }
    }

    /// Blocks the calling (non-runtime) thread until the chunk is queued, the
    /// client goes away, or `cancel` is notified.
    pub fn send_blocking(
        &self,
        runtime: &Handle,
        chunk: Bytes,
        cancel: &Notify,
    ) -> Result<(), SendError> {
        runtime.block_on(async {
            tokio::select! {
                permit = self.chunks.reserve() => match permit {
                    Ok(permit) => {
                        permit.send(chunk);
                        Ok(())
                    }
                    Err(_) => Err(SendError::Closed),
                },
                _ = cancel.notified() => Err(SendError::Cancelled(chunk)),
            }
        })
    }

    /// Queues a chunk once there is room, as a future that owns what it
    /// needs (for a request fiber, which waits for it on the runtime).
    pub fn send_later(
        &self,
        chunk: Bytes,
    ) -> impl std::future::Future<Output = Result<(), SendError>> {
        let chunks = self.chunks.clone();
        async move { chunks.send(chunk).await.map_err(|_| SendError::Closed) }
    }

    /// Ends the body normally, with trailing header fields (sent once every
    /// handle on this sender is gone).
    pub fn finish(&self, fields: HeaderMap) {
        *self.trailers.lock().unwrap_or_else(|p| p.into_inner()) = Some(fields);
    }

    /// Ends the body as failed: the client sees a broken response, never a
    /// truncated one that looks complete. Like `finish`, it takes effect once
    /// every handle on this sender is gone.
    pub fn abort(&self) {
        self.aborted.store(true, Ordering::Release);
    }
}

impl AppResponse {
    /// A short plain-text answer the server gives on its own (500, 503, 408...).
    pub fn plain(status: StatusCode, close: bool) -> Self {
        let text = format!("{}\n", status.canonical_reason().unwrap_or("Error"));
        let mut headers = HeaderMap::new();
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("text/plain"));
        if close {
            headers.insert(CONNECTION, HeaderValue::from_static("close"));
        }
        if status == StatusCode::SERVICE_UNAVAILABLE {
            headers.insert(RETRY_AFTER, HeaderValue::from_static("1"));
        }
        AppResponse::new(
            status,
            headers,
            ResponseBody::from_chunks(vec![Bytes::from(text)]),
        )
    }
}

pub fn plain_response(status: StatusCode, close: bool) -> Response<ResponseBody> {
    AppResponse::plain(status, close).into_http()
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    #[tokio::test]
    async fn trailers_follow_the_data() {
        let mut fields = HeaderMap::new();
        fields.insert("grpc-status", HeaderValue::from_static("0"));
        let body =
            ResponseBody::from_chunks(vec![Bytes::from_static(b"x")]).with_trailers(fields.clone());
        let collected = body.collect().await.unwrap();
        assert_eq!(collected.trailers(), Some(&fields));

        let (sender, body) = ResponseBody::channel();
        sender.try_send(Bytes::from_static(b"y")).unwrap();
        sender.finish(fields.clone());
        drop(sender);
        let collected = body.collect().await.unwrap();
        assert_eq!(collected.trailers(), Some(&fields));
        assert_eq!(&collected.to_bytes()[..], b"y");
    }

    #[tokio::test]
    async fn chunks_report_exact_length() {
        let body = ResponseBody::from_chunks(vec![
            Bytes::from_static(b"ab"),
            Bytes::new(),
            Bytes::from_static(b"c"),
        ]);
        assert_eq!(body.size_hint().exact(), Some(3));
        assert_eq!(&body.collect().await.unwrap().to_bytes()[..], b"abc");
    }

    #[test]
    fn stream_delivers_then_aborts() {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let (sender, body) = ResponseBody::channel();
        sender.try_send(Bytes::from_static(b"one")).unwrap();
        sender
            .send_blocking(runtime.handle(), Bytes::from_static(b"two"), &Notify::new())
            .unwrap();
        sender.abort();
        drop(sender);
        let mut body = body;
        runtime.block_on(async {
            assert_eq!(
                body.frame().await.unwrap().unwrap().into_data().unwrap(),
                "one"
            );
            assert_eq!(
                body.frame().await.unwrap().unwrap().into_data().unwrap(),
                "two"
            );
            assert!(
                body.frame().await.unwrap().is_err(),
                "abort surfaces as an error"
            );
        });
    }

    #[test]
    fn blocked_send_is_cancellable_and_sees_closed_receivers() {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let (sender, body) = ResponseBody::channel();
        for _ in 0..STREAM_CAPACITY {
            sender.try_send(Bytes::from_static(b"x")).unwrap();
        }
        assert!(matches!(
            sender.try_send(Bytes::from_static(b"y")),
            Err(Ok(_))
        ));
        let cancel = Notify::new();
        cancel.notify_one();
        assert!(matches!(
            sender.send_blocking(runtime.handle(), Bytes::from_static(b"y"), &cancel),
            Err(SendError::Cancelled(_))
        ));
        drop(body);
        assert_eq!(
            sender.send_blocking(runtime.handle(), Bytes::from_static(b"y"), &Notify::new()),
            Err(SendError::Closed)
        );
    }
}
