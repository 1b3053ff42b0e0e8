//! A worker's control listener, served on the worker's own tokio runtime.
//! `/stats`, `/metrics` and `/ready` are answered here from the stats page
//! and the worker's state, so they answer while every app thread is busy;
//! the endpoints that need Ruby are queued for the control thread
//! (`commands`). It runs until the runtime shuts down, after the drain, so
//! `/ready` keeps answering 503 while the worker stops.

use std::convert::Infallible;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::header::{AUTHORIZATION, CONNECTION, CONTENT_TYPE};
use http::{HeaderValue, Request, Response, StatusCode};
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::runtime::Handle;
use tokio::sync::{oneshot, Semaphore};

use super::commands::{Command, CommandQueue};
use super::route::{route, Auth, Endpoint};
use crate::listener::{AsyncListener, Listener};
use crate::metrics::{self, Processes};
use crate::server::Shared;

/// Control connections served at once; more wait in the backlog.
const MAX_CONNECTIONS: usize = 64;
/// A control request head must arrive within this.
const HEAD_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a request waits for the control thread's answer.
const RUBY_TIMEOUT: Duration = Duration::from_secs(30);

pub struct ControlSettings {
    pub auth: Auth,
    /// Where the endpoints that need Ruby go; `None`: they answer 404.
    pub commands: Option<Arc<CommandQueue>>,
}

/// Serves `listener` on `runtime` until the runtime shuts down.
pub fn spawn(
    runtime: &Handle,
    listener: Listener,
    shared: Arc<Shared>,
    settings: ControlSettings,
) -> io::Result<()> {
    let listener = {
        let _entered = runtime.enter();
        listener.into_async()?
    };
    runtime.spawn(accept_loop(listener, shared, Arc::new(settings)));
    Ok(())
}

async fn accept_loop(listener: AsyncListener, shared: Arc<Shared>, settings: Arc<ControlSettings>) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let Ok(slot) = slots.clone().acquire_owned().await else {
            return;
        };
        let (shared, settings) = (shared.clone(), settings.clone());
        let accepted = match &listener {
            AsyncListener::Tcp(l) => l.accept().await.map(|(stream, _)| {
                tokio::spawn(async move {
                    serve(stream, shared, settings).await;
                    drop(slot);
                });
            }),
            AsyncListener::Unix(l) => l.accept().await.map(|(stream, _)| {
                tokio::spawn(async move {
                    serve(stream, shared, settings).await;
                    drop(slot);
                });
            }),
        };
        if let Err(e) = accepted {
            tracing::warn!(error = %e, "control listener: accept failed");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

/// Who waits for a connection's responses to be on the wire: a command
/// that ends the process (`/halt`) must not act before its answer is out.
type OnClose = Arc<std::sync::Mutex<Vec<std::sync::mpsc::SyncSender<()>>>>;

async fn serve<S>(stream: S, shared: Arc<Shared>, settings: Arc<ControlSettings>)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let on_close = OnClose::default();
    let waiting = on_close.clone();
    let service = service_fn(move |request| {
        let (shared, settings, on_close) = (shared.clone(), settings.clone(), on_close.clone());
        async move { Ok::<_, Infallible>(respond(request, &shared, &settings, &on_close).await) }
    });
    let connection = http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(HEAD_TIMEOUT)
        .serve_connection(TokioIo::new(stream), service);
    if let Err(e) = connection.await {
        tracing::debug!(error = %e, "control connection ended with an error");
    }
    // The connection is closed: whatever it answered has been written.
    let waiting = std::mem::take(&mut *waiting.lock().unwrap_or_else(|p| p.into_inner()));
    for written in waiting {
        let _ = written.try_send(());
    }
}

async fn respond(
    request: Request<Incoming>,
    shared: &Shared,
    settings: &ControlSettings,
    on_close: &OnClose,
) -> Response<ControlBody> {
    let authorization = request.headers().get(AUTHORIZATION).map(|v| v.as_bytes());
    let endpoint = match route(
        request.method().as_str(),
        request.uri().path(),
        request.uri().query(),
        authorization,
        &settings.auth,
    ) {
        Ok(endpoint) => endpoint,
        Err(refusal) => return answer(refusal.status(), "text/plain", refusal.body()),
    };
    match endpoint {
        Endpoint::Stats => answer(200, "application/json", shared.stats.snapshot().puma_json()),
        Endpoint::Metrics => {
            let serving = Processes {
                workers: 1,
                booted_workers: 1,
                boots: 1,
                restarts: 0,
            };
            let text = metrics::render(&shared.stats.snapshot(), &serving);
            answer(200, metrics::CONTENT_TYPE, text)
        }
        Endpoint::Ready if shared.is_ready() => {
            answer(200, "application/json", "{\"status\":\"ready\"}")
        }
        Endpoint::Ready => answer(503, "application/json", "{\"status\":\"draining\"}"),
        endpoint => ask_ruby(endpoint, settings.commands.as_deref(), on_close).await,
    }
}

/// Hands an endpoint to the control thread and waits for its answer.
/// A reply that waits to hear when it was written closes its connection,
/// and is told once the connection is closed (`serve`).
async fn ask_ruby(
    endpoint: Endpoint,
    commands: Option<&CommandQueue>,
    on_close: &OnClose,
) -> Response<ControlBody> {
    let Some(commands) = commands else {
        let body = format!(
            "{{ \"error\": \"{} not available\" }}",
            endpoint.name().replace('-', "_")
        );
        return answer(404, "application/json", body);
    };
    let (reply, answered) = oneshot::channel();
    let unavailable = || {
        answer(
            503,
            "text/plain",
            "The control thread is not taking commands",
        )
    };
    if commands.push(Command { endpoint, reply }).is_err() {
        return unavailable();
    }
    match tokio::time::timeout(RUBY_TIMEOUT, answered).await {
        Ok(Ok(reply)) => {
            let mut response = answer(reply.status, &reply.content_type, reply.body);
            if let Some(written) = reply.written {
                on_close
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push(written);
                response
                    .headers_mut()
                    .insert(CONNECTION, HeaderValue::from_static("close"));
            }
            response
        }
        _ => unavailable(),
    }
}

fn answer(status: u16, content_type: &str, body: impl Into<Bytes>) -> Response<ControlBody> {
    let mut response = Response::new(ControlBody {
        data: Some(body.into()),
    });
    *response.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::OK);
    if let Ok(value) = HeaderValue::from_str(content_type) {
        response.headers_mut().insert(CONTENT_TYPE, value);
    }
    if status == 503 {
        // A draining worker's control connections close, as HAProxy expects.
        response
            .headers_mut()
            .insert(CONNECTION, HeaderValue::from_static("close"));
    }
    response
}

/// A whole response body.
pub struct ControlBody {
    data: Option<Bytes>,
}

impl Body for ControlBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        Poll::Ready(self.data.take().map(|data| Ok(Frame::data(data))))
    }

    fn is_end_stream(&self) -> bool {
        self.data.is_none()
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.data.as_ref().map_or(0, |d| d.len() as u64))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::server::ServerOptions;
    use crate::wait::Waited;
    use std::io::{Read, Write};
    use std::sync::atomic::{AtomicBool, Ordering};

    fn get(port: u16, target: &str) -> String {
        let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        write!(stream, "GET {target} HTTP/1.0\r\n\r\n").unwrap();
        let mut out = String::new();
        stream.read_to_string(&mut out).unwrap();
        out
    }

    #[test]
    fn stats_metrics_ready_and_ruby_commands() {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let listener = Listener::bind_reuseport("127.0.0.1", 0).unwrap();
        let port = listener.local_addr().unwrap().port();
        let shared = Shared::new(ServerOptions::default(), None);
        shared.stats.set_max_threads(3);
        let commands = Arc::new(CommandQueue::default());
        let settings = ControlSettings {
            auth: Auth::new(Some("t")),
            commands: Some(commands.clone()),
        };
        spawn(runtime.handle(), listener, shared.clone(), settings).unwrap();

        let stats = get(port, "/stats?token=t");
        assert!(stats.starts_with("HTTP/1.0 200"), "{stats}");
        assert!(stats.contains("\"max_threads\":3"), "{stats}");
        assert!(get(port, "/stats").starts_with("HTTP/1.0 403"));
        let metrics = get(port, "/metrics?token=t");
        assert!(metrics.contains("text/plain; version=0.0.4"), "{metrics}");
        assert!(metrics.contains("hyperion_max_threads 3"), "{metrics}");
        assert!(get(port, "/ready").starts_with("HTTP/1.0 200"));
        shared.draining.store(true, Ordering::Release);
        assert!(get(port, "/ready").starts_with("HTTP/1.0 503"));

        // The control thread's stand-in answers /gc-stats and asks to hear
        // when the answer was written.
        let control_thread = std::thread::spawn(move || {
            let flag = AtomicBool::new(false);
            let Waited::Ready(Some(command)) = commands.next(&flag) else {
                panic!("no command");
            };
            assert_eq!(command.endpoint, Endpoint::GcStats);
            let (written, was_written) = std::sync::mpsc::sync_channel(1);
            let reply = super::super::commands::Reply {
                status: 200,
                content_type: "application/json".into(),
                body: b"{\"count\":1}".to_vec(),
                written: Some(written),
            };
            let _ = command.reply.send(reply);
            was_written.recv_timeout(Duration::from_secs(10)).is_ok()
        });
        let gc = get(port, "/gc-stats?token=t");
        assert!(gc.ends_with("{\"count\":1}"), "{gc}");
        assert!(control_thread.join().unwrap(), "told when written");
        runtime.shutdown_timeout(Duration::from_secs(1));
    }
}
