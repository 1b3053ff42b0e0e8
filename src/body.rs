//! Request bodies, read completely by Rust before the app runs, so no Ruby
//! thread ever waits on the network holding the GVL. Small bodies stay in
//! memory; past a threshold they spill to an unlinked temporary file.

use std::fs::File;
use std::io::{self, Seek, SeekFrom, Write};

use bytes::{Bytes, BytesMut};
use http_body::Body;
use http_body_util::BodyExt;

/// Bodies up to this size stay in memory (Puma's threshold is 112 KiB).
pub const DEFAULT_MEMORY_LIMIT: usize = 1024 * 1024;

#[derive(Debug)]
pub enum RequestBody {
    Empty,
    Memory(Bytes),
    /// Positioned at the start; `len` bytes long.
    File {
        file: File,
        len: u64,
    },
    /// Still arriving: the app reads it as it comes (gRPC-style streaming).
    Stream(BodyStream),
}

impl RequestBody {
    /// The length of a body that has been read whole; `None` while streaming.
    pub fn known_len(&self) -> Option<u64> {
        match self {
            RequestBody::Empty => Some(0),
            RequestBody::Memory(bytes) => Some(bytes.len() as u64),
            RequestBody::File { len, .. } => Some(*len),
            RequestBody::Stream(_) => None,
        }
    }
}

/// Chunks of a request body that the app reads while the client still sends.
#[derive(Debug)]
pub struct BodyStream {
    pub chunks: tokio::sync::mpsc::Receiver<Result<Bytes, BodyError>>,
}

/// Chunks buffered between the socket and an app reading a streamed body.
pub const STREAM_CHUNKS: usize = 16;

/// Starts moving `body` into a `BodyStream` on the current runtime, refusing
/// more than `max_bytes` and giving up at `deadline`.
pub fn stream_body<B>(mut body: B, max_bytes: u64, deadline: tokio::time::Instant) -> BodyStream
where
    B: Body<Data = Bytes> + Unpin + Send + 'static,
    B::Error: std::fmt::Display,
{
    let (tx, rx) = tokio::sync::mpsc::channel(STREAM_CHUNKS);
    tokio::spawn(async move {
        let mut total: u64 = 0;
        loop {
            let frame = match tokio::time::timeout_at(deadline, body.frame()).await {
                Err(_) => Err(BodyError::Client(
                    "request body not received in time".into(),
                )),
                Ok(None) => return,
                Ok(Some(Err(e))) => Err(BodyError::Client(e.to_string())),
                Ok(Some(Ok(frame))) => match frame.into_data() {
                    Ok(data) => {
                        total += data.len() as u64;
                        if total > max_bytes {
                            Err(BodyError::TooLarge)
                        } else {
                            Ok(data)
                        }
                    }
                    Err(_) => continue, // trailers
                },
            };
            let failed = frame.is_err();
            // The app stopped reading (dropped the input): stop pumping.
            if tx.send(frame).await.is_err() || failed {
                return;
            }
        }
    });
    BodyStream { chunks: rx }
}

#[derive(Debug)]
pub enum BodyError {
    /// The client sent a malformed body or went away mid-body.
    Client(String),
    /// The body grew past the configured maximum (decided mid-stream for
    /// chunked bodies).
    TooLarge,
    /// The temporary file could not be written.
    Spill(io::Error),
}

/// Reads and discards up to `max_bytes` of a body the server refuses, for at
/// most `max_time`. Over HTTP/2 a refusal cannot close the connection; taking
/// the rest of a small upload lets the client finish sending and read the
/// answer, where a stream reset mid-upload makes some clients drop it.
pub async fn discard_briefly<B>(mut body: B, max_bytes: u64, max_time: std::time::Duration)
where
    B: Body<Data = Bytes> + Unpin,
{
    let discard = async {
        let mut seen: u64 = 0;
        while let Some(Ok(frame)) = body.frame().await {
            seen += frame.data_ref().map_or(0, |data| data.len() as u64);
            if seen > max_bytes {
                break;
            }
        }
    };
    let _ = tokio::time::timeout(max_time, discard).await;
}

/// Reads `body` to its end, keeping up to `memory_limit` bytes in memory and
/// refusing more than `max_bytes` in all.
pub async fn read_body<B>(
    mut body: B,
    memory_limit: usize,
    max_bytes: u64,
) -> Result<RequestBody, BodyError>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: std::fmt::Display,
{
    if body.is_end_stream() {
        return Ok(RequestBody::Empty);
    }
    let mut memory = BytesMut::new();
    let mut spilled: Option<(File, u64)> = None;
    let mut total: u64 = 0;
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| BodyError::Client(e.to_string()))?;
        let Ok(data) = frame.into_data() else {
            continue; // trailers carry no body bytes
        };
        total += data.len() as u64;
        if total > max_bytes {
            return Err(BodyError::TooLarge);
        }
        match spilled.as_mut() {
            Some((file, len)) => {
                // A blocking write to an unlinked temp file lands in the page
                // cache; it is short, and cheaper than a spawn_blocking hop.
                file.write_all(&data).map_err(BodyError::Spill)?;
                *len += data.len() as u64;
            }
            None if memory.len() + data.len() > memory_limit => {
                let mut file = tempfile::tempfile().map_err(BodyError::Spill)?;
                file.write_all(&memory).map_err(BodyError::Spill)?;
                file.write_all(&data).map_err(BodyError::Spill)?;
                spilled = Some((file, (memory.len() + data.len()) as u64));
                memory = BytesMut::new();
            }
            None => memory.extend_from_slice(&data),
        }
    }
    match spilled {
        Some((mut file, len)) => {
            file.seek(SeekFrom::Start(0)).map_err(BodyError::Spill)?;
            Ok(RequestBody::File { file, len })
        }
        None if memory.is_empty() => Ok(RequestBody::Empty),
        None => Ok(RequestBody::Memory(memory.freeze())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::{Full, StreamBody};
    use std::io::Read;

    fn chunks(parts: Vec<&'static [u8]>) -> impl Body<Data = Bytes, Error = io::Error> + Unpin {
        let frames = parts
            .into_iter()
            .map(|p| Ok::<_, io::Error>(http_body::Frame::data(Bytes::from_static(p))));
        StreamBody::new(futures_util::stream::iter(frames))
    }

    #[tokio::test(start_paused = true)]
    async fn discarding_stops_at_the_byte_limit_or_the_time_limit() {
        // Counts the frames taken from an endless body.
        let taken = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counter = taken.clone();
        let endless = futures_util::stream::repeat_with(move || {
            counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            Ok::<_, io::Error>(http_body::Frame::data(Bytes::from_static(b"0123456789")))
        });
        discard_briefly(
            StreamBody::new(endless),
            95,
            std::time::Duration::from_secs(1),
        )
        .await;
        assert_eq!(taken.load(std::sync::atomic::Ordering::Relaxed), 10);

        let silent = StreamBody::new(futures_util::stream::pending::<
            Result<http_body::Frame<Bytes>, io::Error>,
        >());
        let started = tokio::time::Instant::now();
        discard_briefly(silent, 95, std::time::Duration::from_secs(1)).await;
        assert_eq!(started.elapsed(), std::time::Duration::from_secs(1));
    }

    #[tokio::test]
    async fn small_bodies_stay_in_memory() {
        let body = read_body(Full::new(Bytes::from_static(b"hello")), 16, 100)
            .await
            .unwrap();
        assert!(matches!(body, RequestBody::Memory(ref b) if &b[..] == b"hello"));
        let empty = read_body(Full::new(Bytes::new()), 16, 100).await.unwrap();
        assert!(matches!(empty, RequestBody::Empty));
    }

    #[tokio::test]
    async fn large_bodies_spill_to_a_rewound_file() {
        let body = read_body(chunks(vec![b"0123456789", b"abcdefghij", b"XYZ"]), 12, 100)
            .await
            .unwrap();
        let RequestBody::File { mut file, len } = body else {
            panic!("expected a spilled body, got {body:?}");
        };
        assert_eq!(len, 23);
        let mut text = String::new();
        file.read_to_string(&mut text).unwrap();
        assert_eq!(text, "0123456789abcdefghijXYZ");
    }

    proptest::proptest! {
        #[test]
        fn the_limit_counts_every_byte(sizes in proptest::collection::vec(0usize..300, 0..12), max in 0u64..2000, memory in 1usize..600) {
            let runtime = tokio::runtime::Builder::new_current_thread().build().unwrap();
            let total: u64 = sizes.iter().map(|&n| n as u64).sum();
            let frames = sizes
                .iter()
                .map(|&n| Ok::<_, io::Error>(http_body::Frame::data(Bytes::from(vec![b'x'; n]))))
                .collect::<Vec<_>>();
            let result = runtime.block_on(read_body(StreamBody::new(futures_util::stream::iter(frames)), memory, max));
            match result {
                Err(BodyError::TooLarge) => proptest::prop_assert!(total > max),
                Ok(body) => {
                    proptest::prop_assert!(total <= max);
                    proptest::prop_assert_eq!(body.known_len(), Some(total));
                    proptest::prop_assert_eq!(matches!(body, RequestBody::File { .. }), total > memory as u64);
                }
                Err(other) => proptest::prop_assert!(false, "unexpected {:?}", other),
            }
        }
    }

    #[tokio::test]
    async fn bodies_over_the_maximum_are_refused_mid_stream() {
        let result = read_body(chunks(vec![b"0123456789", b"abcdefghij"]), 100, 15).await;
        assert!(matches!(result, Err(BodyError::TooLarge)));
    }

    #[tokio::test]
    async fn streamed_bodies_arrive_chunk_by_chunk_and_respect_the_limit() {
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(5);
        let mut stream = stream_body(chunks(vec![b"ab", b"cd"]), 100, deadline);
        assert_eq!(&stream.chunks.recv().await.unwrap().unwrap()[..], b"ab");
        assert_eq!(&stream.chunks.recv().await.unwrap().unwrap()[..], b"cd");
        assert!(stream.chunks.recv().await.is_none());

        let mut limited = stream_body(chunks(vec![b"ab", b"cd"]), 3, deadline);
        assert!(limited.chunks.recv().await.unwrap().is_ok());
        assert!(matches!(
            limited.chunks.recv().await.unwrap(),
            Err(BodyError::TooLarge)
        ));
    }
}
