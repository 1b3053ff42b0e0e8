//! One request/response exchange as the metrics and the access log see it.
//!
//! An [`Exchange`] starts when a request head has been parsed and travels
//! with the response to the place where the connection learns it is over
//! (HTTP/1.1: hyper drops the response body, `session::TrackedBody`;
//! HTTP/2: the stream's task ends, `http2::stream`). Dropping it records the
//! status class and duration in the worker's stats and, with the access log
//! on, emits the access-log event — on the tokio thread, after the last
//! byte was handed to the protocol. An exchange dropped before any response
//! (the client left while the app worked) is recorded as nginx's 499.

use std::sync::Arc;
use std::time::SystemTime;

use http::header::HeaderName;
use http::{HeaderValue, Method, Request, Response, Uri, Version};
use tokio::time::Instant;

use crate::stats::StatsPage;

/// Status recorded for an exchange whose connection the app took over.
pub const HANDED_OVER: u16 = 101;

/// Status recorded for an exchange whose client left before any response
/// (nginx's "client closed request").
pub const CLIENT_CLOSED: u16 = 499;

const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// How a worker logs its exchanges.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AccessLog {
    pub format: crate::access_log::Format,
    /// Written into every line.
    pub worker_index: u32,
}

pub struct Exchange {
    stats: Arc<StatsPage>,
    started: Instant,
    status: Option<u16>,
    bytes: u64,
    /// Only with the access log on.
    entry: Option<Box<Entry>>,
}

/// What the access log needs beyond the metrics.
struct Entry {
    at: SystemTime,
    remote_addr: Arc<str>,
    method: Method,
    uri: Uri,
    version: Version,
    request_id: Option<HeaderValue>,
    worker_index: u32,
}

impl Exchange {
    /// An exchange for `request`, whose head began at `started`.
    pub fn begin<B>(
        stats: &Arc<StatsPage>,
        access_log: Option<AccessLog>,
        request: &Request<B>,
        remote_addr: &Arc<str>,
        started: Instant,
    ) -> Self {
        let entry = access_log.map(|log| {
            Box::new(Entry {
                at: SystemTime::now(),
                remote_addr: remote_addr.clone(),
                method: request.method().clone(),
                uri: request.uri().clone(),
                version: request.version(),
                request_id: request.headers().get(REQUEST_ID).cloned(),
                worker_index: log.worker_index,
            })
        });
        Self {
            stats: stats.clone(),
            started,
            status: None,
            bytes: 0,
            entry,
        }
    }

    /// The response is decided: its status, and its `x-request-id` when the
    /// request had none (Rails' RequestId middleware makes one up).
    pub fn responded<B>(&mut self, response: &Response<B>) {
        self.status = Some(response.status().as_u16());
        if let Some(entry) = &mut self.entry {
            if entry.request_id.is_none() {
                entry.request_id = response.headers().get(REQUEST_ID).cloned();
            }
        }
    }

    /// The app took the connection over (full hijack): nothing more is sent
    /// by the server.
    pub fn handed_over(&mut self) {
        self.status = Some(HANDED_OVER);
    }

    /// `n` bytes of the response body were handed to the protocol.
    pub fn sent(&mut self, n: usize) {
        self.bytes += n as u64;
    }
}

impl Drop for Exchange {
    fn drop(&mut self) {
        let took = self.started.elapsed();
        let status = self.status.unwrap_or(CLIENT_CLOSED);
        self.stats.response_finished(status, took);
        let Some(entry) = self.entry.take() else {
            return;
        };
        let time = crate::utc_time::rfc3339(entry.at, true);
        let request_id = entry
            .request_id
            .as_ref()
            .map(|id| String::from_utf8_lossy(id.as_bytes()));
        let path = match entry.uri.path() {
            "" => "/",
            path => path,
        };
        tracing::info!(
            target: crate::access_log::TARGET,
            time = time.as_str(),
            remote_addr = &*entry.remote_addr,
            method = entry.method.as_str(),
            path,
            query = entry.uri.query().unwrap_or(""),
            protocol = protocol(entry.version),
            status = u64::from(status),
            bytes = self.bytes,
            duration = took.as_secs_f64(),
            request_id = request_id.as_deref(),
            worker = u64::from(entry.worker_index),
        );
    }
}

fn protocol(version: Version) -> &'static str {
    match version {
        Version::HTTP_09 => "HTTP/0.9",
        Version::HTTP_10 => "HTTP/1.0",
        Version::HTTP_2 => "HTTP/2",
        Version::HTTP_3 => "HTTP/3",
        _ => "HTTP/1.1",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_dropped_exchange_records_its_status_or_499() {
        let stats = Arc::new(StatsPage::new(false).unwrap());
        let request = Request::get("/x").body(()).unwrap();
        let remote: Arc<str> = Arc::from("127.0.0.1");
        let mut answered = Exchange::begin(&stats, None, &request, &remote, Instant::now());
        tokio::time::advance(std::time::Duration::from_millis(30)).await;
        answered.responded(&Response::builder().status(404).body(()).unwrap());
        drop(answered);
        drop(Exchange::begin(
            &stats,
            None,
            &request,
            &remote,
            Instant::now(),
        ));
        let seen = stats.snapshot();
        assert_eq!(seen.responses[3], 2, "404 and 499");
        assert_eq!(seen.duration.count, 2);
        assert!(seen.duration.sum_micros >= 30_000);
    }
}
