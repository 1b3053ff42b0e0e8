//! The access log: one line per response on stdout, as text or JSON.
//!
//! A finished exchange (`crate::exchange`) emits a `tracing` event with the
//! target [`TARGET`] and the request's fields, on the tokio thread that saw
//! the response end: no Ruby thread is involved. [`AccessLayer`] (installed
//! by `crate::logging`) formats those events and hands the line to a
//! [`LineWriter`]: a buffer that a thread of its own writes to stdout in
//! batches, so an I/O thread never waits for stdout (a slow pipe, a full
//! disk) and the write system calls are shared by many lines. Embedding
//! programs with a subscriber of their own receive the same events.

use std::fmt::Write as _;
use std::os::fd::FromRawFd;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard, OnceLock};
use std::time::Duration;

use tracing::field::{Field, Visit};
use tracing::{Event, Subscriber};
use tracing_subscriber::layer::{Context, Layer};

/// The `tracing` target of access-log events.
pub const TARGET: &str = "hyperion::access";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Text,
    Json,
}

impl Format {
    /// `--log-format`'s default: JSON unless stdout is a terminal.
    pub fn for_stdout() -> Self {
        use std::io::IsTerminal;
        if std::io::stdout().is_terminal() {
            Format::Text
        } else {
            Format::Json
        }
    }
}

/// The format lines are written in; one worker per process sets it.
static FORMAT: AtomicU8 = AtomicU8::new(0);

pub fn set_format(format: Format) {
    FORMAT.store(format as u8, Ordering::Relaxed);
}

fn format() -> Format {
    if FORMAT.load(Ordering::Relaxed) == Format::Json as u8 {
        Format::Json
    } else {
        Format::Text
    }
}

/// The fields of one access-log event.
#[derive(Debug, Default, PartialEq)]
pub struct Line {
    pub time: String,
    pub remote_addr: String,
    pub method: String,
    pub path: String,
    pub query: String,
    pub protocol: String,
    pub status: u64,
    pub bytes: u64,
    pub duration: f64,
    pub request_id: Option<String>,
    pub worker: u64,
}

impl Visit for Line {
    fn record_str(&mut self, field: &Field, value: &str) {
        let slot = match field.name() {
            "time" => &mut self.time,
            "remote_addr" => &mut self.remote_addr,
            "method" => &mut self.method,
            "path" => &mut self.path,
            "query" => &mut self.query,
            "protocol" => &mut self.protocol,
            "request_id" => {
                self.request_id = Some(value.to_owned());
                return;
            }
            _ => return,
        };
        value.clone_into(slot);
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        match field.name() {
            "status" => self.status = value,
            "bytes" => self.bytes = value,
            "worker" => self.worker = value,
            _ => {}
        }
    }

    fn record_f64(&mut self, field: &Field, value: f64) {
        if field.name() == "duration" {
            self.duration = value;
        }
    }

    fn record_debug(&mut self, _: &Field, _: &dyn std::fmt::Debug) {}
}

impl Line {
    /// The line as written, newline included.
    pub fn render(&self, format: Format, out: &mut String) {
        match format {
            Format::Json => self.render_json(out),
            Format::Text => self.render_text(out),
        }
        out.push('\n');
    }

    fn render_json(&self, out: &mut String) {
        out.push_str("{\"time\":");
        json_string(out, &self.time);
        for (key, value) in [
            ("remote_addr", &self.remote_addr),
            ("method", &self.method),
            ("path", &self.path),
            ("query", &self.query),
            ("protocol", &self.protocol),
        ] {
            let _ = write!(out, ",\"{key}\":");
            json_string(out, value);
        }
        let _ = write!(
            out,
            ",\"status\":{},\"bytes\":{},\"duration\":{:.6},\"request_id\":",
            self.status, self.bytes, self.duration
        );
        match &self.request_id {
            Some(id) => json_string(out, id),
            None => out.push_str("null"),
        }
        let _ = write!(out, ",\"worker\":{}}}", self.worker);
    }

    /// `TIME REMOTE "METHOD TARGET PROTOCOL" STATUS BYTES SECONDS worker=N
    /// [request_id=ID]`, quoted parts escaped so a line stays one line.
    fn render_text(&self, out: &mut String) {
        let _ = write!(out, "{} ", self.time);
        text_escaped(out, &self.remote_addr);
        out.push_str(" \"");
        text_escaped(out, &self.method);
        out.push(' ');
        text_escaped(out, &self.path);
        if !self.query.is_empty() {
            out.push('?');
            text_escaped(out, &self.query);
        }
        out.push(' ');
        text_escaped(out, &self.protocol);
        let _ = write!(
            out,
            "\" {} {} {:.6} worker={}",
            self.status, self.bytes, self.duration, self.worker
        );
        if let Some(id) = &self.request_id {
            out.push_str(" request_id=");
            text_escaped(out, id);
        }
    }
}

/// Appends `value` as a JSON string.
pub fn json_string(out: &mut String, value: &str) {
    out.push('"');
    for c in value.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if u32::from(c) < 0x20 || c == '\u{7f}' => {
                let _ = write!(out, "\\u{:04x}", u32::from(c));
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

/// Appends `value` with `"`, `\`, spaces' lookalikes and control characters
/// escaped, so a text line cannot be split or forged by a request.
fn text_escaped(out: &mut String, value: &str) {
    for c in value.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if c.is_control() => {
                let _ = write!(out, "\\x{:02x}", u32::from(c));
            }
            c => out.push(c),
        }
    }
}

/// Formats access-log events and queues the lines for stdout.
pub struct AccessLayer;

impl<S: Subscriber> Layer<S> for AccessLayer {
    fn on_event(&self, event: &Event<'_>, _: Context<'_, S>) {
        if event.metadata().target() != TARGET {
            return;
        }
        let mut line = Line::default();
        event.record(&mut line);
        thread_local! {
            static BUFFER: std::cell::RefCell<String> = const { std::cell::RefCell::new(String::new()) };
        }
        BUFFER.with(|buffer| {
            let Ok(mut buffer) = buffer.try_borrow_mut() else {
                return;
            };
            buffer.clear();
            line.render(format(), &mut buffer);
            stdout_writer().push(buffer.as_bytes());
        });
    }
}

/// Lines waiting for the writer thread beyond this are dropped (and counted):
/// a stdout that takes nothing must not grow the process without bound.
const MAX_PENDING_BYTES: usize = 4 << 20;
/// A push wakes a lingering writer once this much is waiting.
const WAKE_AT_BYTES: usize = 256 << 10;
/// After a write, the writer gathers lines for this long before the next.
const LINGER: Duration = Duration::from_millis(10);

struct Pending {
    bytes: Vec<u8>,
    /// The writer sleeps until woken (nothing came during its last linger).
    asleep: bool,
    /// The writer holds a batch it has not finished writing.
    writing: bool,
    /// Lines dropped since the writer last reported it.
    dropped: u64,
    flush_requested: bool,
}

/// A buffer of lines that one thread writes to a file descriptor.
pub struct LineWriter {
    pending: Mutex<Pending>,
    wake: Condvar,
    written: Condvar,
}

impl LineWriter {
    fn new() -> Self {
        Self {
            pending: Mutex::new(Pending {
                bytes: Vec::new(),
                asleep: false,
                writing: false,
                dropped: 0,
                flush_requested: false,
            }),
            wake: Condvar::new(),
            written: Condvar::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Pending> {
        self.pending
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Queues a whole line (or several). Never blocks on the output.
    pub fn push(&self, line: &[u8]) {
        let mut pending = self.lock();
        if pending.bytes.len() + line.len() > MAX_PENDING_BYTES {
            pending.dropped += 1;
            return;
        }
        pending.bytes.extend_from_slice(line);
        if pending.asleep || pending.bytes.len() >= WAKE_AT_BYTES {
            pending.asleep = false;
            self.wake.notify_one();
        }
    }

    /// Waits (up to `within`) until every line queued so far is written.
    pub fn flush(&self, within: Duration) {
        let deadline = std::time::Instant::now() + within;
        let mut pending = self.lock();
        while !pending.bytes.is_empty() || pending.writing {
            pending.flush_requested = true;
            self.wake.notify_one();
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                return;
            }
            pending = self
                .written
                .wait_timeout(pending, left)
                .unwrap_or_else(|poisoned| poisoned.into_inner())
                .0;
        }
    }

    /// The writer thread's loop: write what is queued, linger, repeat.
    fn run(&self, out: &mut impl std::io::Write) {
        let mut batch = Vec::new();
        let mut pending = self.lock();
        loop {
            if pending.bytes.is_empty() {
                self.written.notify_all();
                let lingering = !pending.flush_requested;
                pending.flush_requested = false;
                pending = if lingering {
                    // Gather more lines before the next write.
                    let (guard, _) = self
                        .wake
                        .wait_timeout(pending, LINGER)
                        .unwrap_or_else(|poisoned| poisoned.into_inner());
                    guard
                } else {
                    pending
                };
                if pending.bytes.is_empty() {
                    pending.asleep = true;
                    while pending.asleep {
                        pending = self
                            .wake
                            .wait(pending)
                            .unwrap_or_else(|poisoned| poisoned.into_inner());
                    }
                }
                continue;
            }
            std::mem::swap(&mut batch, &mut pending.bytes);
            pending.writing = true;
            let dropped = std::mem::take(&mut pending.dropped);
            drop(pending);
            if let Err(e) = write_all_waiting(out, &batch) {
                tracing::warn!(error = %e, "access log: could not write to stdout; lines lost");
            }
            if dropped > 0 {
                tracing::warn!(
                    lines = dropped,
                    "access log: lines dropped because stdout took them too slowly"
                );
            }
            batch.clear();
            pending = self.lock();
            pending.writing = false;
        }
    }
}

/// `write_all`, also on a non-blocking descriptor: waits for it to take more.
fn write_all_waiting(out: &mut impl std::io::Write, mut bytes: &[u8]) -> std::io::Result<()> {
    while !bytes.is_empty() {
        match out.write(bytes) {
            Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
            Ok(n) => bytes = &bytes[n..],
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                let mut poll = nix::libc::pollfd {
                    fd: 1,
                    events: nix::libc::POLLOUT,
                    revents: 0,
                };
                // SAFETY: one valid pollfd, for the length passed.
                unsafe { nix::libc::poll(&mut poll, 1, 100) };
            }
            Err(e) => return Err(e),
        }
    }
    out.flush()
}

/// The process's stdout writer; its thread starts at the first use.
pub fn stdout_writer() -> &'static LineWriter {
    static WRITER: OnceLock<&'static LineWriter> = OnceLock::new();
    WRITER.get_or_init(|| {
        let writer: &'static LineWriter = Box::leak(Box::new(LineWriter::new()));
        let started = std::thread::Builder::new()
            .name("hyperion-access-log".into())
            .spawn(move || {
                // fd 1 itself, not a copy: `stdout_redirect` and HUP point it
                // elsewhere with dup2, and the lines must follow.
                // SAFETY: fd 1 stays open for the life of the process; the
                // ManuallyDrop keeps this File from ever closing it.
                let mut stdout =
                    std::mem::ManuallyDrop::new(unsafe { std::fs::File::from_raw_fd(1) });
                writer.run(&mut *stdout)
            });
        if let Err(e) = started {
            tracing::error!(error = %e, "could not start the access log writer");
        }
        writer
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::sync::Arc;

    fn sample() -> Line {
        Line {
            time: "2026-11-30T12:00:00.123Z".into(),
            remote_addr: "127.0.0.1".into(),
            method: "GET".into(),
            path: "/a\"b".into(),
            query: "q=1".into(),
            protocol: "HTTP/1.1".into(),
            status: 200,
            bytes: 12,
            duration: 0.0012,
            request_id: Some("id-1".into()),
            worker: 3,
        }
    }

    #[test]
    fn text_and_json_lines() {
        let mut text = String::new();
        sample().render(Format::Text, &mut text);
        assert_eq!(
            text,
            "2026-11-30T12:00:00.123Z 127.0.0.1 \"GET /a\\\"b?q=1 HTTP/1.1\" 200 12 0.001200 worker=3 request_id=id-1\n"
        );
        let mut json = String::new();
        Line {
            request_id: None,
            ..sample()
        }
        .render(Format::Json, &mut json);
        assert_eq!(
            json,
            "{\"time\":\"2026-11-30T12:00:00.123Z\",\"remote_addr\":\"127.0.0.1\",\"method\":\"GET\",\
             \"path\":\"/a\\\"b\",\"query\":\"q=1\",\"protocol\":\"HTTP/1.1\",\"status\":200,\"bytes\":12,\
             \"duration\":0.001200,\"request_id\":null,\"worker\":3}\n"
        );
    }

    proptest! {
        /// Whatever a request puts in its path or request id, a JSON line
        /// parses back to the same strings, and a text line stays one line.
        #[test]
        fn lines_survive_any_request_text(path in ".*", id in any::<Vec<u8>>()) {
            let id = String::from_utf8_lossy(&id).into_owned();
            let line = Line { path: path.clone(), request_id: Some(id.clone()), ..sample() };
            let mut json = String::new();
            line.render(Format::Json, &mut json);
            prop_assert_eq!(json.matches('\n').count(), 1);
            let parsed: serde_json::Value = serde_json::from_str(&json).unwrap();
            prop_assert_eq!(parsed["path"].as_str().unwrap(), path.as_str());
            prop_assert_eq!(parsed["request_id"].as_str().unwrap(), id.as_str());
            let mut text = String::new();
            line.render(Format::Text, &mut text);
            prop_assert_eq!(text.matches('\n').count(), 1);
            prop_assert!(text.ends_with('\n'));
        }
    }

    /// A sink that records each write and can be told to refuse writes.
    #[derive(Clone, Default)]
    struct Sink(Arc<Mutex<Vec<Vec<u8>>>>);

    impl std::io::Write for Sink {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().push(bytes.to_vec());
            Ok(bytes.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn lines_are_written_in_order_in_batches_and_flush_waits_for_them() {
        let writer: &'static LineWriter = Box::leak(Box::new(LineWriter::new()));
        let sink = Sink::default();
        let mut out = sink.clone();
        std::thread::spawn(move || writer.run(&mut out));
        for n in 0..1000 {
            writer.push(format!("line {n}\n").as_bytes());
        }
        writer.flush(Duration::from_secs(10));
        let writes = sink.0.lock().unwrap().clone();
        let all: String = writes.iter().map(|w| String::from_utf8_lossy(w)).collect();
        let expected: String = (0..1000).map(|n| format!("line {n}\n")).collect();
        assert_eq!(all, expected);
        assert!(
            writes.len() < 1000,
            "lines pushed together are written together ({} writes)",
            writes.len()
        );
        // A lone line after the writer fell asleep is written promptly too.
        writer.push(b"late\n");
        writer.flush(Duration::from_secs(10));
        assert_eq!(sink.0.lock().unwrap().last().unwrap(), b"late\n");
    }

    #[test]
    fn past_the_limit_lines_are_dropped_not_buffered() {
        let writer = LineWriter::new(); // no thread: nothing is ever written
        let line = vec![b'x'; 1024];
        for _ in 0..(MAX_PENDING_BYTES / 1024 + 10) {
            writer.push(&line);
        }
        let pending = writer.lock();
        assert!(pending.bytes.len() <= MAX_PENDING_BYTES);
        assert_eq!(pending.dropped, 10);
    }
}
