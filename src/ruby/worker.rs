//! `Hyperion::Worker`: binds a listener or adopts one or more, runs the boot
//! hooks, serves until a stop, then drains and runs the shutdown hooks.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use magnus::prelude::*;
use magnus::scan_args::{get_kwargs, scan_args};
use magnus::typed_data::Obj;
use magnus::value::Opaque;
use magnus::{
    gc, DataTypeFunctions, Error, Integer, RArray, RHash, RModule, Ruby, Symbol, TypedData, Value,
};
use tokio::sync::Notify;

use super::app_thread::{self, AppContext};
use super::env::EnvFlags;
use super::errors::{hyperion_error, log_exception, to_ruby};
use super::nogvl::{run_bounded_without_gvl, wait_interruptibly};
use super::options;
use super::rust_thread;
use crate::control::commands::CommandQueue;
use crate::control::route::Auth;
use crate::control::server::ControlSettings;
use crate::exchange::AccessLog;
use crate::fiber_reactor::FiberSlots;
use crate::fork_safe::ForkSafe;
use crate::listener::Listener;
use crate::request::ServerInfo;
use crate::server::{Endpoint, Server, ServerOptions, Shared};

/// Settings fixed at `Worker.new`.
struct Settings {
    host: String,
    port: u16,
    thread_count: usize,
    worker_index: i64,
    /// Per listener (one entry when the worker binds its own): serve TLS
    /// with these files (read at `run`), or plain HTTP for `None`.
    tls: Vec<Option<crate::tls::TlsSettings>>,
    /// Run each request in a fiber (see `fiber_loop`).
    async_io: Option<bool>,
    env_flags: EnvFlags,
    /// On TERM, serve this long with `/ready` answering 503 before stopping.
    drain_delay: Option<Duration>,
    access_log_format: crate::access_log::Format,
}

/// `control:`: the control listener's socket (marked), its token, and the
/// handler the control thread calls for the endpoints that need Ruby.
struct Control {
    listener: Opaque<Value>,
    auth_token: Option<String>,
    handler: Option<Opaque<Value>>,
}

#[derive(TypedData)]
#[magnus(class = "Hyperion::Worker", free_immediately, mark, size)]
pub(crate) struct Worker {
    app: Opaque<Value>,
    /// A Thread::Queue that `run` pops to wait for a stop. Waiting in Ruby
    /// (rather than in Rust without the GVL) lets Ruby run signal traps on
    /// the main thread promptly: Ruby only calls a custom unblock function
    /// for Thread#kill/raise and exit, not for an incoming signal.
    stop_requests: Opaque<Value>,
    config: Opaque<Value>,
    /// The adopted sockets: a private frozen Array (see
    /// `options::listeners`), or `None` to bind host:port.
    listeners: Option<Opaque<RArray>>,
    settings: Settings,
    /// Not dropped in a forked child (see `fork_safe`).
    shared: ForkSafe<Arc<Shared>>,
    started: AtomicBool,
    /// The I/O runtime while `run` serves, for the liveness check's ping.
    runtime: ForkSafe<Mutex<Option<tokio::runtime::Handle>>>,
    control: Option<Control>,
}

impl DataTypeFunctions for Worker {
    fn mark(&self, marker: &gc::Marker) {
        marker.mark(self.app);
        marker.mark(self.config);
        marker.mark(self.stop_requests);
        // Marking the Array keeps every socket in it alive.
        if let Some(listeners) = self.listeners {
            marker.mark(listeners);
        }
        if let Some(control) = &self.control {
            marker.mark(control.listener);
            if let Some(handler) = control.handler {
                marker.mark(handler);
            }
        }
    }
}

const REQUIRED: [&str; 4] = ["host", "port", "app", "read_timeout"];
const OPTIONAL: [&str; 9] = [
    "tls",
    "thread_count",
    "config",
    "worker_index",
    "listener",
    "max_pending",
    "max_request_read_seconds",
    "h2_settings",
    "async_io",
];

type Optional = (
    Option<Value>,
    Option<Value>,
    Option<Value>,
    Option<Value>,
    Option<Value>,
    Option<Value>,
    Option<Value>,
    Option<Value>,
    Option<Value>,
);

impl Worker {
    /// `Worker.new(host:, port:, app:, read_timeout:, tls: nil, thread_count: 5,
    /// config: nil, worker_index: 0, listener: nil, max_pending: nil,
    /// max_request_read_seconds: 60, h2_settings: nil, async_io: nil,
    /// remote_address: :socket, proxy_protocol: nil, **limits)` — the limits
    /// and timeouts beyond the seed API are listed in
    /// `options::LIMIT_KEYWORDS`. `listener:` is nil, a server socket or an
    /// Array of them; `tls:` is nil, a Hash (every listener) or, with an
    /// Array `listener:`, an Array of the same length of Hash or nil.
    fn new(ruby: &Ruby, args: &[Value]) -> Result<Obj<Worker>, Error> {
        // Before this worker (or, at boot, the CLI's check) starts threads.
        crate::malloc_arenas::limit_to_one_arena();
        let args = scan_args::<(), (), (), (), RHash, ()>(args)?;
        let kwargs = get_kwargs::<_, (Value, Value, Value, Value), Optional, RHash>(
            args.keywords,
            &REQUIRED,
            &OPTIONAL,
        )?;
        let (host, port, app, read_timeout) = kwargs.required;
        let (
            tls,
            thread_count,
            config,
            worker_index,
            listener,
            max_pending,
            max_request_read,
            h2,
            async_io,
        ) = kwargs.optional;

        let host = options::string(ruby, "host", host)?;
        let port = options::integer(ruby, "port", port, 0, 65_535)? as u16;
        if !app.respond_to("call", false)? {
            return Err(options::type_error(
                ruby,
                "app",
                "an object that responds to #call",
                app,
            ));
        }
        let read_timeout = options::seconds(ruby, "read_timeout", read_timeout)?;
        let thread_count = options::optional_integer(ruby, "thread_count", thread_count, 1, 1024)?
            .unwrap_or(5) as usize;
        let worker_index =
            options::optional_integer(ruby, "worker_index", worker_index, 0, i64::from(u32::MAX))?
                .unwrap_or(0);
        let max_pending =
            options::optional_integer(ruby, "max_pending", max_pending, 1, i64::from(u32::MAX))?;
        let max_request_read = match max_request_read.filter(|v| !v.is_nil()) {
            Some(v) => options::seconds(ruby, "max_request_read_seconds", v)?,
            None => Duration::from_secs(60),
        };
        let config = match config.filter(|v| !v.is_nil()) {
            Some(config) => config,
            None => ruby
                .get_inner(&super::keys::HYPERION)
                .const_get::<_, magnus::RClass>("Config")?
                .new_instance(())?,
        };
        for hook_list in ["on_worker_boot", "on_worker_shutdown"] {
            if !config.respond_to(hook_list, false)? {
                return Err(options::type_error(
                    ruby,
                    "config",
                    "a Hyperion::Config",
                    config,
                ));
            }
        }
        let listeners = options::listeners(ruby, listener)?;
        let tls = options::tls_per_listener(ruby, tls, &listeners)?;
        let h2 = options::h2_settings(ruby, h2)?;
        let async_io = options::boolean(ruby, "async_io", async_io)?;

        let operations = options::take_operations(ruby, kwargs.splat)?;
        let mut server_options = ServerOptions {
            read_timeout,
            max_request_read,
            graceful_timeout: config_seconds(ruby, config, "graceful_timeout")?
                .unwrap_or(Duration::from_secs(30)),
            io_threads: config_integer(ruby, config, "io_threads", 1, 64)?.unwrap_or(1) as usize,
            ..ServerOptions::default()
        };
        server_options.remote_address = super::remote_address::take_keywords(ruby, kwargs.splat)?;
        options::apply_limit_keywords(ruby, kwargs.splat, &mut server_options)?;
        if let Some(h2) = h2 {
            server_options.h2 = h2;
        }
        let access_log_format = operations
            .log_format
            .unwrap_or_else(crate::access_log::Format::for_stdout);
        server_options.access_log = operations.log_requests.then_some(AccessLog {
            format: access_log_format,
            worker_index: worker_index as u32,
        });
        let workers = config_integer(ruby, config, "workers", 1, 1024)?.unwrap_or(1);
        let stop_requests = ruby
            .class_object()
            .const_get::<_, magnus::RClass>("Thread")?
            .const_get::<_, magnus::RClass>("Queue")?
            .new_instance(())?;
        // Until the Worker object exists to mark them, these objects are
        // referenced only from here: keep them on this stack until it does.
        let nil = ruby.qnil().as_value();
        let control = operations.control;
        let live = [
            app,
            config,
            stop_requests,
            listeners.sockets.map_or(nil, |s| s.as_value()),
            control.as_ref().map_or(nil, |c| c.listener),
            control.as_ref().and_then(|c| c.handler).unwrap_or(nil),
        ];
        let shared = match operations.stats {
            Some(page) => Shared::with_stats(server_options, max_pending.map(|n| n as usize), page),
            None => Shared::new(server_options, max_pending.map(|n| n as usize)),
        };
        let worker = ruby.obj_wrap(Worker {
            app: app.into(),
            stop_requests: stop_requests.into(),
            config: config.into(),
            listeners: listeners.sockets.map(Opaque::from),
            settings: Settings {
                host,
                port,
                thread_count,
                worker_index,
                tls,
                async_io,
                env_flags: EnvFlags {
                    // With fibers the app runs concurrently on one thread too.
                    multithread: thread_count > 1 || async_io == Some(true),
                    multiprocess: workers > 1,
                },
                drain_delay: operations.drain_delay,
                access_log_format,
            },
            shared: ForkSafe::new(shared),
            started: AtomicBool::new(false),
            runtime: ForkSafe::new(Mutex::new(None)),
            control: control.map(|c| Control {
                listener: c.listener.into(),
                auth_token: c.auth_token,
                handler: c.handler.map(Opaque::from),
            }),
        });
        gc_guard(&live);
        Ok(worker)
    }

    /// Asks `run` to stop accepting, drain and return. Safe from any thread
    /// and from signal traps; idempotent. A signal trap calls this with the
    /// signal number: with `drain_delay`, the first TERM only begins the
    /// delay (`/ready` answers 503, requests are still served) and the stop
    /// follows when it ends; a second TERM, INT or a call without a signal
    /// stops at once.
    fn stop(ruby: &Ruby, rb_self: Obj<Worker>, args: &[Value]) -> Result<(), Error> {
        let worker = &*rb_self;
        let term = args
            .first()
            .and_then(|v| Integer::from_value(*v))
            .and_then(|signal| signal.to_i32().ok())
            == Some(nix::libc::SIGTERM);
        if let (true, Some(delay)) = (term, worker.settings.drain_delay) {
            let first = !worker.shared.draining.swap(true, Ordering::AcqRel);
            if first && !worker.shared.stop.is_stopped() {
                return start_drain_timer(ruby, rb_self, delay);
            }
        }
        stop_now(ruby, &worker.shared, worker.stop_requests)
    }

    /// `stats`: Puma's single-mode stats (`started_at`, `backlog`,
    /// `running`, `pool_capacity`, `max_threads`, `requests_count`,
    /// `busy_threads`), with symbol keys.
    fn stats(ruby: &Ruby, rb_self: &Worker) -> Result<RHash, Error> {
        let snapshot = rb_self.shared.stats.snapshot();
        let stats = super::stats::status_hash(ruby, &snapshot)?;
        let started = (snapshot.started_at_ms > 0).then(|| {
            let at = std::time::UNIX_EPOCH + Duration::from_millis(snapshot.started_at_ms);
            crate::utc_time::rfc3339(at, false)
        });
        let hash = ruby.hash_new();
        hash.aset(Symbol::new("started_at"), started)?;
        hash.funcall::<_, _, Value>("update", (stats,))?;
        Ok(hash)
    }

    /// `healthy?`: whether the worker still serves (see `crate::health`);
    /// the heartbeat asks this before each beat. True before `run` serves.
    /// Never blocks: it judges the ping the previous call sent.
    fn healthy(&self) -> bool {
        let Some(runtime) = lock(&self.runtime).clone() else {
            return true;
        };
        let (queued, taken) = self.shared.queue.progress();
        let (verdict, ping) =
            self.shared
                .health
                .check(queued, taken, self.shared.stop.is_stopped());
        runtime.spawn(async move { ping() });
        match verdict {
            Ok(()) => true,
            Err(sickness) => {
                tracing::error!("worker is not serving: {sickness}; skipping its heartbeat");
                false
            }
        }
    }

    fn run(ruby: &Ruby, rb_self: Obj<Worker>) -> Result<(), Error> {
        let worker = &*rb_self;
        if worker.started.swap(true, Ordering::AcqRel) {
            return Err(hyperion_error(
                ruby,
                "Worker#run was already called; create a new Worker to serve again",
            ));
        }
        crate::logging::init();
        crate::access_log::set_format(worker.settings.access_log_format);
        // Certificates are checked before binding, so a bad file fails fast.
        let acceptors = tls_acceptors(ruby, &worker.settings.tls)?;
        let listeners = match worker.listeners {
            Some(sockets) => {
                let sockets = ruby.get_inner(sockets);
                let mut adopted = Vec::with_capacity(sockets.len());
                for index in 0..sockets.len() {
                    let socket: Value = sockets.entry(index as isize)?;
                    let fd: i32 = socket.funcall("fileno", ())?;
                    adopted.push(Listener::adopt(fd).map_err(|e| to_ruby(ruby, e))?);
                }
                adopted
            }
            None => vec![
                Listener::bind_reuseport(&worker.settings.host, worker.settings.port)
                    .map_err(|e| to_ruby(ruby, e))?,
            ],
        };
        let mut endpoints = Vec::with_capacity(listeners.len());
        for (listener, tls) in listeners.into_iter().zip(acceptors) {
            let bound = listener
                .local_addr()
                .map_err(|e| hyperion_error(ruby, format!("listener: {e}")))?;
            let scheme = if tls.is_some() { "https" } else { "http" };
            tracing::info!(
                pid = std::process::id(),
                worker_index = worker.settings.worker_index,
                url = %bound.url(scheme),
                "worker listening"
            );
            let info = ServerInfo {
                scheme,
                host: bound.host(),
                port: bound.port(),
            };
            endpoints.push(Endpoint {
                listener,
                info,
                tls,
            });
        }

        let traps = install_traps(ruby, rb_self)?;
        let config = ruby.get_inner(worker.config);
        let served = call_hooks(config, "on_worker_boot", worker.settings.worker_index, true)
            .and_then(|()| {
                let result = serve(ruby, rb_self, endpoints);
                // Seed semantics: shutdown hooks run whenever the loop was
                // entered, also when it ends by error.
                let _ = call_hooks(
                    config,
                    "on_worker_shutdown",
                    worker.settings.worker_index,
                    false,
                );
                result
            });
        restore_traps(ruby, traps);
        served
    }
}

/// Serves until stopped, then drains within one `graceful_timeout` counted
/// from the stop: stop accepting, let in-flight requests finish, stop the app
/// threads (killing those still busy at the deadline), shut the I/O runtime
/// down. The shutdown hooks run after all of that, in `run`.
fn serve(ruby: &Ruby, rb_self: Obj<Worker>, endpoints: Vec<Endpoint>) -> Result<(), Error> {
    let worker = &*rb_self;
    let shared = &worker.shared;
    shared.stats.set_max_threads(worker.settings.thread_count);
    let control_listener = match &worker.control {
        Some(control) => {
            let socket = ruby.get_inner(control.listener);
            let fd: i32 = socket.funcall("fileno", ())?;
            Some(Listener::adopt(fd).map_err(|e| to_ruby(ruby, e))?)
        }
        None => None,
    };
    let mut server = Server::start(endpoints, Arc::clone(shared)).map_err(|e| to_ruby(ruby, e))?;
    // No early return from here on: the runtime must be shut down below,
    // without the GVL, whatever happens.
    *lock(&worker.runtime) = Some(server.handle().clone());
    shared.stats.serving_since(std::time::SystemTime::now());
    let commands = start_control(ruby, rb_self, &server, control_listener);
    let context = Arc::new(AppContext {
        shared: Arc::clone(shared),
        runtime: server.handle().clone(),
        app: worker.app,
        events: worker.stop_requests,
        env_flags: worker.settings.env_flags,
        fibers: (worker.settings.async_io == Some(true))
            .then(|| Arc::new(FiberSlots::new(shared.options.max_fibers))),
    });
    let watchdog = start_dispatch_watchdog(shared);
    let threads = ruby.ary_new_capa(worker.settings.thread_count);
    let result = (0..worker.settings.thread_count)
        .try_for_each(|index| spawn_app_thread(ruby, rb_self, &context, threads, index))
        .and_then(|()| serve_until_stopped(ruby, rb_self, &context, threads));
    shared.stop.stop();
    close_adopted_listeners(worker);
    tracing::debug!("stopping: draining connections");
    let cancel = Notify::new();
    let drained = wait_interruptibly(
        |_| server.wait_stopped(&cancel).then_some(()),
        |_| cancel.notify_one(),
    );
    shared.queue.close();
    if let Some(watchdog) = watchdog {
        let _ = watchdog.join();
    }
    let control_stopped = stop_control_thread(commands);
    tracing::debug!("stopping: joining app threads");
    let deadline = shared.stop.deadline(shared.options.graceful_timeout);
    let joined = join_app_threads(threads, deadline);
    // Jobs nobody will run: dropping their reply channels answers 503.
    drop(shared.queue.drain());
    tracing::debug!("stopping: shutting the runtime down");
    *lock(&worker.runtime) = None;
    let stopped = run_bounded_without_gvl(move || server.shutdown());
    result
        .and(drained)
        .and(joined)
        .and(control_stopped)
        .and(stopped)
}

/// Stops now: the stop signal for the tokio side, and a wake-up for the
/// `run` thread waiting on its event queue.
fn stop_now(ruby: &Ruby, shared: &Shared, stop_requests: Opaque<Value>) -> Result<(), Error> {
    shared.stop.stop();
    ruby.get_inner(stop_requests)
        .funcall::<_, _, Value>("push", (true,))
        .map(|_| ())
}

/// The drain delay's timer: a Ruby thread that sleeps through the delay
/// (in short naps, so it ends soon after a stop that comes another way),
/// then stops the worker.
fn start_drain_timer(ruby: &Ruby, rb_self: Obj<Worker>, delay: Duration) -> Result<(), Error> {
    let shared = Arc::clone(&rb_self.shared);
    let stop_requests = rb_self.stop_requests;
    tracing::info!(
        seconds = delay.as_secs_f64(),
        "stop requested: serving through drain_delay while /ready answers 503"
    );
    let ends = Instant::now() + delay;
    let thread = rust_thread::spawn(ruby, "hyperion-drain-delay", move |ruby| {
        let kernel = ruby.module_kernel();
        loop {
            if shared.stop.is_stopped() {
                return Ok(());
            }
            let left = ends.saturating_duration_since(Instant::now());
            if left.is_zero() {
                tracing::info!("drain_delay over; stopping");
                return stop_now(ruby, &shared, stop_requests);
            }
            kernel.funcall::<_, _, Value>(
                "sleep",
                (left.min(Duration::from_millis(250)).as_secs_f64(),),
            )?;
        }
    })?;
    // The Worker (which marks the stop queue) lives while the thread does.
    hold_worker(ruby, thread, rb_self)
}

/// The control thread and the queue it takes commands from, while it runs.
type ControlThread = Option<(Arc<CommandQueue>, Value)>;

/// Serves the control listener on the worker's runtime and, when a handler
/// was given, starts the control thread for the endpoints that need Ruby.
/// A failure is logged: the worker serves without a control listener
/// rather than not at all.
fn start_control(
    ruby: &Ruby,
    rb_self: Obj<Worker>,
    server: &Server,
    listener: Option<Listener>,
) -> ControlThread {
    let (Some(control), Some(listener)) = (&rb_self.control, listener) else {
        return None;
    };
    let thread = control.handler.and_then(|handler| {
        let queue = Arc::new(CommandQueue::default());
        let serving = queue.clone();
        let started = rust_thread::spawn(ruby, "hyperion-control", move |ruby| {
            super::control::serve_commands(ruby, &serving, handler)
        })
        .and_then(|thread| hold_worker(ruby, thread, rb_self).map(|()| thread));
        match started {
            Ok(thread) => Some((queue, thread)),
            Err(e) => {
                log_exception("could not start the control thread", &e);
                queue.close();
                None
            }
        }
    });
    let settings = ControlSettings {
        auth: Auth::new(control.auth_token.as_deref()),
        commands: thread.as_ref().map(|(queue, _)| queue.clone()),
    };
    let shared = Arc::clone(&rb_self.shared);
    if let Err(e) = crate::control::server::spawn(server.handle(), listener, shared, settings) {
        tracing::error!(error = %e, "could not serve the control listener");
    }
    // The thread Value stays on this stack frame's caller (`serve`) until
    // it is joined; the thread itself is also referenced by Ruby's thread list.
    thread
}

/// Closes the control thread's queue and waits briefly for it to end.
fn stop_control_thread(control: ControlThread) -> Result<(), Error> {
    let Some((queue, thread)) = control else {
        return Ok(());
    };
    queue.close();
    match thread.funcall::<_, _, Value>("join", (KILL_GRACE.as_secs_f64(),)) {
        Ok(joined) if joined.is_nil() => {
            tracing::warn!("the control thread did not end; killing it");
            thread.funcall::<_, _, Value>("kill", ()).map(|_| ())
        }
        Ok(_) => Ok(()),
        Err(e) => {
            log_exception("the control thread ended with an exception", &e);
            Ok(())
        }
    }
}

/// Starts the dispatcher's watchdog (see `crate::dispatch`) on a plain
/// thread that never touches Ruby; it ends when the queue closes. Without
/// it the worker still serves, waking a thread only when none runs.
fn start_dispatch_watchdog(shared: &Arc<Shared>) -> Option<std::thread::JoinHandle<()>> {
    let shared = Arc::clone(shared);
    std::thread::Builder::new()
        .name("hyperion-dispatch".into())
        .spawn(move || shared.queue.watch())
        .inspect_err(|e| tracing::error!("could not start the dispatch watchdog: {e}"))
        .ok()
}

/// Waits in Ruby (so signal traps run) for a stop; replaces app threads that
/// end in the meantime (they push their index on the event queue).
fn serve_until_stopped(
    ruby: &Ruby,
    rb_self: Obj<Worker>,
    context: &Arc<AppContext>,
    threads: RArray,
) -> Result<(), Error> {
    let events = ruby.get_inner(rb_self.stop_requests);
    while !rb_self.shared.stop.is_stopped() {
        let event: Value = events.funcall("pop", ())?;
        if let Some(index) = Integer::from_value(event) {
            if rb_self.shared.stop.is_stopped() {
                break;
            }
            spawn_app_thread(ruby, rb_self, context, threads, index.to_usize()?)?;
        }
    }
    Ok(())
}

/// Builds one acceptor per listener (`None` for plain HTTP), or says in one
/// line what is wrong with the files. Equal settings share one acceptor, so
/// `self_signed: true` on several listeners generates one certificate.
fn tls_acceptors(
    ruby: &Ruby,
    settings: &[Option<crate::tls::TlsSettings>],
) -> Result<Vec<Option<tokio_rustls::TlsAcceptor>>, Error> {
    let mut built: Vec<(&crate::tls::TlsSettings, tokio_rustls::TlsAcceptor)> = Vec::new();
    let mut acceptors = Vec::with_capacity(settings.len());
    for tls in settings {
        let Some(tls) = tls else {
            acceptors.push(None);
            continue;
        };
        if let Some((_, acceptor)) = built.iter().find(|(seen, _)| *seen == tls) {
            acceptors.push(Some(acceptor.clone()));
            continue;
        }
        let acceptor = crate::tls::acceptor(tls).map_err(|e| to_ruby(ruby, e))?;
        if tls.certificate == crate::tls::Certificate::SelfSigned {
            tracing::warn!("serving a self-signed development certificate generated for localhost; do not use it in production");
        }
        built.push((tls, acceptor.clone()));
        acceptors.push(Some(acceptor));
    }
    Ok(acceptors)
}

/// Closes this process's handle on every adopted listener as soon as a stop
/// begins, so new connections are refused during the drain instead of
/// waiting in a backlog nobody accepts from. Siblings that inherited the same
/// sockets keep theirs.
fn close_adopted_listeners(worker: &Worker) {
    let Some(listeners) = worker.listeners else {
        return;
    };
    let Ok(ruby) = Ruby::get() else {
        return;
    };
    let listeners = ruby.get_inner(listeners);
    for index in 0..listeners.len() {
        let Ok(listener) = listeners.entry::<Value>(index as isize) else {
            continue;
        };
        let closed = listener
            .funcall::<_, _, bool>("closed?", ())
            .unwrap_or(true);
        if !closed {
            if let Err(e) = listener.funcall::<_, _, Value>("close", ()) {
                log_exception("could not close a listener", &e);
            }
        }
    }
}

/// Starts app thread `index` (also to replace one that ended).
fn spawn_app_thread(
    ruby: &Ruby,
    rb_self: Obj<Worker>,
    context: &Arc<AppContext>,
    threads: RArray,
    index: usize,
) -> Result<(), Error> {
    let context = context.clone();
    let name = format!("hyperion-app-{index}");
    let thread = rust_thread::spawn(ruby, &name, move |ruby| {
        app_thread::serve(ruby, &context, index)
    })?;
    // The thread references the Worker, which marks the app, so the app
    // stays alive for as long as any app thread runs.
    hold_worker(ruby, thread, rb_self)?;
    threads.store(index as isize, thread)
}

/// Makes `thread` reference the Worker (which marks the app and the
/// queues) for as long as it runs. Kept in the thread's fiber-local storage
/// (`Thread#[]=`), not in an instance variable: a Thread's instance
/// variables are generic ivars, which Ruby 3.1's compaction mishandles (see
/// `block`).
fn hold_worker(ruby: &Ruby, thread: Value, rb_self: Obj<Worker>) -> Result<(), Error> {
    thread.funcall::<_, _, Value>("[]=", (ruby.to_symbol("__hyperion_worker"), rb_self))?;
    Ok(())
}

/// How long killed app threads get to unwind before the shutdown hooks run.
const KILL_GRACE: Duration = Duration::from_secs(2);

/// Waits until `deadline` for the app threads to finish their requests, then
/// kills the stragglers and waits (briefly) until they are really gone.
fn join_app_threads(threads: RArray, deadline: Instant) -> Result<(), Error> {
    let mut stragglers = Vec::new();
    for index in 0..threads.len() {
        let thread: Value = threads.entry(index as isize)?;
        let remaining = deadline.saturating_duration_since(Instant::now());
        match thread.funcall::<_, _, Value>("join", (remaining.as_secs_f64(),)) {
            Ok(joined) if joined.is_nil() => stragglers.push(thread),
            Ok(_) => {}
            Err(e) => log_exception("app thread ended with an exception", &e),
        }
    }
    if stragglers.is_empty() {
        return Ok(());
    }
    tracing::warn!(
        threads = stragglers.len(),
        "app threads still busy at the end of graceful_timeout; killing them"
    );
    for thread in &stragglers {
        thread.funcall::<_, _, Value>("kill", ())?;
    }
    let deadline = Instant::now() + KILL_GRACE;
    for thread in stragglers {
        let remaining = deadline.saturating_duration_since(Instant::now());
        if let Ok(joined) = thread.funcall::<_, _, Value>("join", (remaining.as_secs_f64(),)) {
            if joined.is_nil() {
                tracing::warn!("a killed app thread did not end within {KILL_GRACE:?}");
            }
        }
    }
    Ok(())
}

/// Calls every hook in `config.<list>` with the worker index. Boot hooks
/// propagate their exception (the worker cannot serve); shutdown hooks are
/// logged and the rest still run.
fn call_hooks(config: Value, list: &str, index: i64, propagate: bool) -> Result<(), Error> {
    let hooks: RArray = config.funcall(list, ())?;
    for index_in_list in 0..hooks.len() {
        let hook: Value = hooks.entry(index_in_list as isize)?;
        if let Err(e) = hook.funcall::<_, _, Value>("call", (index,)) {
            log_exception(&format!("{list} hook raised"), &e);
            if propagate {
                return Err(e);
            }
        }
    }
    Ok(())
}

/// TERM and INT call `stop` (the trap only flips state); the previous
/// handlers are restored when `run` returns.
fn install_traps(ruby: &Ruby, rb_self: Obj<Worker>) -> Result<RArray, Error> {
    let signal: RModule = ruby.class_object().const_get("Signal")?;
    let stop: Value = rb_self.funcall("method", (Symbol::new("stop"),))?;
    let previous = ruby.ary_new();
    for name in ["TERM", "INT"] {
        let old: Value = signal.funcall("trap", (name, stop))?;
        previous.push(ruby.ary_new_from_values(&[ruby.str_new(name).as_value(), old]))?;
    }
    Ok(previous)
}

fn restore_traps(ruby: &Ruby, previous: RArray) {
    let Ok(signal) = ruby.class_object().const_get::<_, RModule>("Signal") else {
        return;
    };
    for index in 0..previous.len() {
        if let Ok(pair) = previous.entry::<RArray>(index as isize) {
            let (Ok(name), Ok(old)) = (pair.entry::<Value>(0), pair.entry::<Value>(1)) else {
                continue;
            };
            if let Err(e) = signal.funcall::<_, _, Value>("trap", (name, old)) {
                log_exception("could not restore a signal handler", &e);
            }
        }
    }
}

/// Keeps `values` in this frame's memory until this call, where Ruby's
/// conservative stack scan finds them: the `RB_GC_GUARD` of C extensions.
#[inline(never)]
fn gc_guard(values: &[Value]) {
    std::hint::black_box(values);
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn config_value(config: Value, name: &str) -> Result<Option<Value>, Error> {
    if !config.respond_to(name, false)? {
        return Ok(None);
    }
    let value: Value = config.funcall(name, ())?;
    Ok((!value.is_nil()).then_some(value))
}

fn config_seconds(ruby: &Ruby, config: Value, name: &str) -> Result<Option<Duration>, Error> {
    config_value(config, name)?
        .map(|v| options::seconds(ruby, &format!("config.{name}"), v))
        .transpose()
}

fn config_integer(
    ruby: &Ruby,
    config: Value,
    name: &str,
    min: i64,
    max: i64,
) -> Result<Option<i64>, Error> {
    config_value(config, name)?
        .map(|v| options::integer(ruby, &format!("config.{name}"), v, min, max))
        .transpose()
}

pub(crate) fn init(ruby: &Ruby, module: RModule) -> Result<(), Error> {
    let class = module.define_class("Worker", ruby.class_object())?;
    class.undef_default_alloc_func();
    class.define_singleton_method("new", magnus::function!(Worker::new, -1))?;
    class.define_method("run", magnus::method!(Worker::run, 0))?;
    class.define_method("stop", magnus::method!(Worker::stop, -1))?;
    class.define_method("stats", magnus::method!(Worker::stats, 0))?;
    class.define_method("healthy?", magnus::method!(Worker::healthy, 0))?;
    Ok(())
}
