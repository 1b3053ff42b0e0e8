//! `Hyperion::FiberScheduler`: the `Fiber.set_scheduler` scheduler of an app
//! thread in `async_io` mode, so that a request's fiber that would block
//! (`sleep`, `IO#read`/`write`/`wait_readable`, sockets, `Net::HTTP`,
//! `Timeout.timeout`, `Queue#pop`, `Mutex`, `Thread#join`, `Process.wait`)
//! gives the thread to the other requests instead.
//!
//! The invariant everything rests on: only the app thread's root fiber
//! (`fiber_loop`) resumes a fiber, and a fiber gives up the thread only by
//! transferring to the root. A hook that must wait hands the wait to the
//! thread's [`FiberReactor`] (tokio does the waiting), records the fiber as
//! suspended, and transfers to the root; the root transfers back when the
//! reactor reports the wait over, after leaving the outcome in `delivery`.
//! `Fiber#transfer` (not `resume`/`yield`) is used throughout so that a fiber
//! the app itself resumed can wait too (as the io-event gem does).
//!
//! Ruby 3.1 calls: `io_wait`, `kernel_sleep`, `block`, `unblock` (also from
//! other threads: it only touches the reactor), `timeout_after`,
//! `process_wait`, `address_resolve`, `fiber` (`Fiber.schedule`) and `close`.
//! `io_read`/`io_write` are not defined: Ruby then reads and writes
//! non-blocking descriptors itself and calls `io_wait` on `EAGAIN`.
//!
//! Ruby objects the scheduler keeps (live and suspended fibers, deadlines'
//! exception classes) are marked, which also pins them: a fiber's id is its
//! `VALUE`, stable while it is held here. Fibers are never abandoned with
//! Rust frames on their stacks while the thread lives: when the thread is
//! killed, every suspended fiber is resumed with `Hyperion::FiberTerminated`
//! so its request unwinds and is answered 500.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use magnus::block::Proc;
use magnus::prelude::*;
use magnus::rb_sys::{AsRawId, AsRawValue, FromRawValue};
use magnus::typed_data::Obj;
use magnus::value::{Id, Lazy, Opaque};
use magnus::{
    gc, kwargs, method, DataTypeFunctions, Error, Exception, ExceptionClass, Fiber, Float, Integer,
    IntoValue, RArray, RClass, RModule, RString, Ruby, TypedData, Value,
};

use super::app_thread::{run_job, AppContext};
use super::errors::{is_non_local_exit, log_exception};
use crate::fiber_reactor::{
    Begun, DeadlineId, FiberId, FiberReactor, FiberSlots, Outcome, Resume, Wait, WaitId,
};
use crate::fork_safe::ForkSafe;
use crate::request::Job;

static FIBER: Lazy<RClass> = Lazy::new(|ruby| {
    ruby.class_object()
        .const_get("Fiber")
        .expect("Fiber is a core class")
});

static PROCESS_STATUS: Lazy<RClass> = Lazy::new(|ruby| {
    ruby.class_object()
        .const_get::<_, RModule>("Process")
        .and_then(|process| process.const_get("Status"))
        .expect("Process::Status is a core class")
});

static FIBER_TERMINATED: Lazy<ExceptionClass> = Lazy::new(|ruby| {
    ruby.get_inner(&super::keys::HYPERION)
        .const_get("FiberTerminated")
        .expect("checked when the extension loads")
});

/// How many times a killed thread resumes a fiber that keeps waiting after
/// being told to end (in an `ensure`, say) before abandoning it.
const TERMINATE_ROUNDS: usize = 3;

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// Runs one request; holds one of the worker's `max_fibers` slots.
    Request,
    /// Started by the app with `Fiber.schedule`.
    Scheduled,
}

struct LiveFiber {
    fiber: Opaque<Value>,
    kind: Kind,
}

struct Suspended {
    fiber: Opaque<Value>,
    wait: WaitId,
}

/// What a fiber the root resumes finds when it wakes.
enum Delivery {
    Outcome(Outcome),
    Terminate,
}

/// A `timeout_after` in progress: its fiber, exception class and arguments.
struct DeadlineEntry {
    fiber: Opaque<Value>,
    class: Opaque<Value>,
    arguments: Opaque<RArray>,
}

#[derive(Default)]
struct State {
    /// Fibers this scheduler started that have not ended.
    live: HashMap<FiberId, LiveFiber>,
    /// Fibers waiting, and the wait each one waits for.
    suspended: HashMap<FiberId, Suspended>,
    deadlines: HashMap<DeadlineId, DeadlineEntry>,
    /// Left by the root for the fiber it is resuming.
    delivery: Option<Delivery>,
    /// The request of the fiber being started.
    starting: Option<Job>,
    /// The thread is ending: waits fail with FiberTerminated.
    terminating: bool,
}

#[derive(TypedData)]
#[magnus(class = "Hyperion::FiberScheduler", free_immediately, mark, size)]
pub(crate) struct FiberScheduler {
    /// Rust state is not dropped in a forked child (see `fork_safe`).
    reactor: ForkSafe<Arc<FiberReactor>>,
    context: ForkSafe<Arc<AppContext>>,
    slots: ForkSafe<Arc<FiberSlots>>,
    state: ForkSafe<Mutex<State>>,
    /// The app thread's root fiber, where every wait transfers to.
    root: Opaque<Value>,
    /// The bodies of request fibers and `Fiber.schedule` fibers (Procs).
    request_body: Opaque<Value>,
    scheduled_body: Opaque<Value>,
}

impl DataTypeFunctions for FiberScheduler {
    fn mark(&self, marker: &gc::Marker) {
        marker.mark(self.root);
        marker.mark(self.request_body);
        marker.mark(self.scheduled_body);
        // Never contended: the state is locked only by Rust code that calls
        // no Ruby (and so cannot start a GC) while it holds the lock.
        let state = self.lock();
        for live in state.live.values() {
            marker.mark(live.fiber);
        }
        for suspended in state.suspended.values() {
            marker.mark(suspended.fiber);
        }
        for deadline in state.deadlines.values() {
            marker.mark(deadline.fiber);
            marker.mark(deadline.class);
            marker.mark(deadline.arguments);
        }
    }
}

fn fiber_id(fiber: Fiber) -> FiberId {
    fiber.as_raw() as FiberId
}

fn terminated(ruby: &Ruby) -> Error {
    Error::new(
        ruby.get_inner(&FIBER_TERMINATED),
        "the app thread running this request is stopping (killed, or past graceful_timeout)",
    )
}

/// A number of seconds from Ruby (Integer, Float, Rational...); `None` for
/// nil or a non-finite number (no timeout). Negative counts as zero.
fn seconds(value: Value) -> Result<Option<Duration>, Error> {
    if value.is_nil() {
        return Ok(None);
    }
    let secs = if let Some(i) = Integer::from_value(value) {
        i.to_i64()? as f64
    } else if let Some(f) = Float::from_value(value) {
        f.to_f64()
    } else {
        value.funcall::<_, _, f64>("to_f", ())?
    };
    Ok(secs
        .is_finite()
        .then(|| Duration::from_secs_f64(secs.clamp(0.0, 86_400.0 * 365.0))))
}

impl FiberScheduler {
    /// Creates the scheduler of the calling app thread and sets it with
    /// `Fiber.set_scheduler`.
    pub(crate) fn install(
        ruby: &Ruby,
        context: Arc<AppContext>,
        slots: Arc<FiberSlots>,
        reactor: Arc<FiberReactor>,
    ) -> Result<Obj<FiberScheduler>, Error> {
        let root = ruby.fiber_current();
        let request_body = ruby.proc_new(request_fiber);
        let scheduled_body = ruby.proc_new(scheduled_fiber);
        let scheduler = ruby.obj_wrap(FiberScheduler {
            reactor: ForkSafe::new(reactor),
            context: ForkSafe::new(context),
            slots: ForkSafe::new(slots),
            state: ForkSafe::new(Mutex::new(State::default())),
            root: root.as_value().into(),
            request_body: request_body.as_value().into(),
            scheduled_body: scheduled_body.as_value().into(),
        });
        // Until here the Procs were referenced only from this stack.
        std::hint::black_box((request_body, scheduled_body));
        ruby.get_inner(&FIBER)
            .funcall::<_, _, Value>("set_scheduler", (scheduler,))?;
        Ok(scheduler)
    }

    /// `Fiber.set_scheduler(nil)` (which calls `close`).
    pub(crate) fn uninstall(ruby: &Ruby) -> Result<(), Error> {
        ruby.get_inner(&FIBER)
            .funcall::<_, _, Value>("set_scheduler", (ruby.qnil(),))
            .map(|_| ())
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Fibers started here that have not ended.
    pub(crate) fn live(&self) -> usize {
        self.lock().live.len()
    }

    /// Runs `job` in a new fiber, until it first waits or ends. The caller
    /// has taken a `max_fibers` slot for it, which the fiber gives back when
    /// it ends.
    pub(crate) fn start_request(ruby: &Ruby, this: Obj<Self>, job: Job) -> Result<(), Error> {
        this.lock().starting = Some(job);
        let fiber = match this.new_fiber(ruby, Kind::Request) {
            Ok(fiber) => fiber,
            Err(e) => {
                // Dropping the job answers it (503).
                drop(this.lock().starting.take());
                this.slots.give_back();
                if is_non_local_exit(&e) {
                    return Err(e);
                }
                log_exception("could not start a fiber for a request", &e);
                return Ok(());
            }
        };
        let result = this.transfer_into(fiber, (this,));
        // An interrupt at the fiber's very start can end it before its body
        // took the job (or said it ended).
        let unstarted = this.lock().starting.take();
        if unstarted.is_some() || !fiber.is_alive() {
            drop(unstarted);
            this.ended(fiber_id(fiber));
        }
        result
    }

    /// Resumes a fiber whose wait is over (ignored if it no longer waits for
    /// that wait).
    pub(crate) fn resume(&self, ruby: &Ruby, resume: Resume) -> Result<(), Error> {
        let target = match self.lock().suspended.get(&resume.fiber) {
            Some(entry) if entry.wait == resume.wait => entry.fiber,
            _ => return Ok(()),
        };
        let Some(fiber) = Fiber::from_value(ruby.get_inner(target)) else {
            return Ok(());
        };
        self.lock().delivery = Some(Delivery::Outcome(resume.outcome));
        let result = self.transfer_into(fiber, ());
        self.lock().delivery = None;
        result
    }

    /// The thread is ending with fibers in flight (killed, or killed at the
    /// end of `graceful_timeout`): resumes each waiting fiber with
    /// `FiberTerminated`, so its request unwinds (`ensure` blocks run) and
    /// answers 500, and forgets whatever still would not end.
    pub(crate) fn terminate_all(&self, ruby: &Ruby) {
        self.lock().terminating = true;
        drop(self.reactor.take_ready());
        for _ in 0..TERMINATE_ROUNDS {
            let waiting: Vec<FiberId> = self.lock().suspended.keys().copied().collect();
            if waiting.is_empty() {
                break;
            }
            for id in waiting {
                let Some(target) = self.lock().suspended.get(&id).map(|s| s.fiber) else {
                    continue;
                };
                self.reactor.cancel_wait(id);
                let Some(fiber) = Fiber::from_value(ruby.get_inner(target)) else {
                    continue;
                };
                self.lock().delivery = Some(Delivery::Terminate);
                if let Err(e) = self.transfer_into(fiber, ()) {
                    tracing::debug!("a non-local exit while ending a fiber: {e}");
                }
                self.lock().delivery = None;
            }
        }
        let (left, requests, job) = {
            let mut state = self.lock();
            let left: Vec<FiberId> = state.live.keys().copied().collect();
            let requests = state
                .live
                .values()
                .filter(|live| live.kind == Kind::Request)
                .count();
            state.live.clear();
            state.suspended.clear();
            state.deadlines.clear();
            (left, requests, state.starting.take())
        };
        drop(job);
        for id in &left {
            self.reactor.forget(*id);
        }
        for _ in 0..requests {
            self.slots.give_back();
        }
        if !left.is_empty() {
            tracing::warn!(
                fibers = left.len(),
                "fibers that would not end when their app thread stopped were abandoned"
            );
        }
    }

    /// A new non-blocking fiber running `kind`'s body, recorded as live.
    fn new_fiber(&self, ruby: &Ruby, kind: Kind) -> Result<Fiber, Error> {
        let body = match kind {
            Kind::Request => self.request_body,
            Kind::Scheduled => self.scheduled_body,
        };
        let body = Proc::from_value(ruby.get_inner(body))
            .ok_or_else(|| Error::new(ruby.exception_type_error(), "fiber body is not a Proc"))?;
        let fiber: Value = ruby.get_inner(&FIBER).funcall_with_block(
            "new",
            (kwargs!(ruby, "blocking" => false),),
            body,
        )?;
        let fiber = Fiber::from_value(fiber).ok_or_else(|| {
            Error::new(ruby.exception_type_error(), "Fiber.new returned no Fiber")
        })?;
        self.lock().live.insert(
            fiber_id(fiber),
            LiveFiber {
                fiber: fiber.as_value().into(),
                kind,
            },
        );
        Ok(fiber)
    }

    /// Transfers to `fiber` until it waits or ends. An exception it ended
    /// with is logged; a non-local exit (the thread is being killed) is
    /// returned.
    fn transfer_into<A: magnus::ArgList>(&self, fiber: Fiber, args: A) -> Result<(), Error> {
        match fiber.transfer::<_, Value>(args) {
            Ok(_) => Ok(()),
            Err(e) if is_non_local_exit(&e) => Err(e),
            Err(e) => {
                log_exception("a fiber ended with an exception", &e);
                Ok(())
            }
        }
    }

    /// A fiber started here has ended.
    fn ended(&self, id: FiberId) {
        let removed = self.lock().live.remove(&id);
        if let Some(live) = removed {
            self.reactor.forget(id);
            if live.kind == Kind::Request {
                self.slots.give_back();
            }
        }
    }

    /// Waits for `what` on the current fiber: gives the thread to the root
    /// until the wait is over.
    fn wait(&self, ruby: &Ruby, what: Wait) -> Result<Outcome, Error> {
        let root = ruby.get_inner(self.root);
        let current = ruby.fiber_current();
        if current.as_raw() == root.as_raw() {
            return Err(Error::new(
                ruby.exception_runtime_error(),
                "hyperion's fiber scheduler cannot wait on the app thread's own fiber",
            ));
        }
        let root = Fiber::from_value(root)
            .ok_or_else(|| Error::new(ruby.exception_type_error(), "root is not a Fiber"))?;
        self.suspend(ruby, current, what, || root.transfer::<_, Value>(()))
    }

    /// Starts wait `what` for `current`, then gives up the thread with
    /// `switch` (a transfer) until the root resumes it.
    fn suspend(
        &self,
        ruby: &Ruby,
        current: Fiber,
        what: Wait,
        switch: impl FnOnce() -> Result<Value, Error>,
    ) -> Result<Outcome, Error> {
        let id = fiber_id(current);
        if self.lock().terminating {
            return Err(terminated(ruby));
        }
        let wait = match self.reactor.begin_wait(id, what) {
            Begun::Waiting(wait) => wait,
            Begun::Done(outcome) => return self.settle(ruby, id, outcome),
        };
        self.lock().suspended.insert(
            id,
            Suspended {
                fiber: current.as_value().into(),
                wait,
            },
        );
        let switched = switch();
        let delivery = {
            let mut state = self.lock();
            state.suspended.remove(&id);
            state.delivery.take()
        };
        if let Err(e) = switched {
            self.reactor.cancel_wait(id);
            return Err(e);
        }
        match delivery {
            Some(Delivery::Outcome(outcome)) => self.settle(ruby, id, outcome),
            Some(Delivery::Terminate) => Err(terminated(ruby)),
            None => {
                // Transferred to by something other than the root: a
                // spurious wake-up, which every caller tolerates.
                self.reactor.cancel_wait(id);
                Ok(Outcome::Unblocked)
            }
        }
    }

    /// The outcome, unless a deadline of the fiber has passed: then its
    /// exception.
    fn settle(&self, ruby: &Ruby, id: FiberId, outcome: Outcome) -> Result<Outcome, Error> {
        let expired = match outcome {
            Outcome::Expired(deadline) => Some(deadline),
            _ => self.reactor.take_expired(id),
        };
        match expired {
            Some(deadline) => Err(self.expiry(ruby, deadline)),
            None => Ok(outcome),
        }
    }

    /// The exception of a `timeout_after` whose deadline passed:
    /// `class.new(*arguments)`.
    fn expiry(&self, ruby: &Ruby, deadline: DeadlineId) -> Error {
        let entry = self
            .lock()
            .deadlines
            .get(&deadline)
            .map(|entry| (entry.class, entry.arguments));
        let Some((class, arguments)) = entry else {
            return Error::new(ruby.exception_runtime_error(), "execution expired");
        };
        let class = ruby.get_inner(class);
        let arguments = ruby.get_inner(arguments);
        let new = Id::new("new");
        let built = magnus::rb_sys::protect(|| {
            // SAFETY: called with the GVL; both values are live (on this
            // stack and marked through the deadline entry); a raise is caught
            // by the surrounding rb_protect.
            unsafe { rb_sys::rb_apply(class.as_raw(), new.as_raw(), arguments.as_raw()) }
        });
        match built.map(|raw| {
            // SAFETY: a VALUE just returned by Ruby, on this stack.
            let value = unsafe { Value::from_raw(raw) };
            Exception::from_value(value)
        }) {
            Ok(Some(exception)) => exception.into(),
            Ok(None) => Error::new(
                ruby.exception_type_error(),
                "Timeout.timeout's exception class did not build an exception",
            ),
            Err(e) => e,
        }
    }

    // The scheduler interface (Ruby calls these).

    fn io_wait(
        ruby: &Ruby,
        rb_self: &Self,
        io: Value,
        events: i64,
        timeout: Value,
    ) -> Result<Value, Error> {
        let fd: i32 = io.funcall("fileno", ())?;
        let events = (events & 0b111) as u8;
        let timeout = seconds(timeout)?;
        Ok(
            match rb_self.wait(
                ruby,
                Wait::Io {
                    fd,
                    events,
                    timeout,
                },
            )? {
                Outcome::Ready(ready) => ready.into_value_with(ruby),
                Outcome::TimedOut => false.into_value_with(ruby),
                // A spurious wake-up: Ruby retries its call.
                _ => events.into_value_with(ruby),
            },
        )
    }

    fn kernel_sleep(ruby: &Ruby, rb_self: &Self, args: &[Value]) -> Result<Value, Error> {
        let what = match args.first().map(|v| seconds(*v)).transpose()?.flatten() {
            Some(duration) => Wait::Sleep(duration),
            None => Wait::Block(None),
        };
        rb_self.wait(ruby, what)?;
        Ok(ruby.qtrue().as_value())
    }

    /// `block(blocker, timeout = nil)`: true when unblocked, false on timeout.
    fn block(ruby: &Ruby, rb_self: &Self, args: &[Value]) -> Result<bool, Error> {
        let timeout = match args.get(1) {
            Some(timeout) => seconds(*timeout)?,
            None => None,
        };
        Ok(rb_self.wait(ruby, Wait::Block(timeout))? != Outcome::TimedOut)
    }

    /// May be called from any Ruby thread (a Queue#push, a Mutex#unlock).
    fn unblock(rb_self: &Self, _blocker: Value, fiber: Value) {
        rb_self.reactor.unblock(fiber.as_raw() as FiberId);
    }

    /// `timeout_after(duration, exception_class, *arguments) { ... }`.
    fn timeout_after(ruby: &Ruby, rb_self: &Self, args: &[Value]) -> Result<Value, Error> {
        let [duration, class, arguments @ ..] = args else {
            return Err(Error::new(
                ruby.exception_arg_error(),
                "timeout_after(duration, exception_class, *arguments)",
            ));
        };
        // Timeout.timeout handles nil and zero itself; a year is forever here.
        let after = seconds(*duration)?.unwrap_or(Duration::from_secs(86_400 * 365));
        let current = ruby.fiber_current();
        let arguments = ruby.ary_new_from_values(arguments);
        let deadline = rb_self.reactor.deadline(fiber_id(current), after);
        rb_self.lock().deadlines.insert(
            deadline,
            DeadlineEntry {
                fiber: current.as_value().into(),
                class: (*class).into(),
                arguments: arguments.into(),
            },
        );
        let result = ruby.yield_value::<_, Value>(*duration);
        rb_self.reactor.cancel_deadline(deadline);
        rb_self.lock().deadlines.remove(&deadline);
        result
    }

    /// Waits in a helper thread (which has no scheduler, so it blocks);
    /// joining it suspends only this fiber (`Thread#join` calls `block`).
    fn process_wait(ruby: &Ruby, _rb_self: &Self, pid: i64, flags: i64) -> Result<Value, Error> {
        // A Proc from a plain function, not magnus' thread_create_from_fn:
        // that keeps its closure in a Thread instance variable, which Ruby
        // 3.1's compaction mishandles (see `block`).
        let waiter: Value = ruby
            .class_object()
            .const_get::<_, RClass>("Thread")?
            .funcall_with_block("new", (pid, flags), ruby.proc_new(wait_for_process))?;
        waiter.funcall("value", ())
    }

    fn address_resolve(ruby: &Ruby, rb_self: &Self, hostname: RString) -> Result<Value, Error> {
        let hostname = hostname.to_string()?;
        Ok(match rb_self.wait(ruby, Wait::Resolve(hostname))? {
            Outcome::Resolved(addresses) => ruby
                .ary_from_iter(addresses.iter().map(|a| a.to_string()))
                .as_value(),
            _ => ruby.qnil().as_value(),
        })
    }

    /// `Fiber.schedule { ... }`: starts the block in a new fiber at once; the
    /// caller runs again as soon as that fiber waits or ends.
    fn fiber(ruby: &Ruby, rb_self: Obj<Self>, args: &[Value]) -> Result<Value, Error> {
        let block = ruby.block_proc()?;
        let current = ruby.fiber_current();
        let started = rb_self.new_fiber(ruby, Kind::Scheduled)?;
        let body_args = ruby.ary_new_from_values(&[rb_self.as_value(), block.as_value()]);
        for arg in args {
            body_args.push(*arg)?;
        }
        let mut ran = false;
        let waited = rb_self.suspend(ruby, current, Wait::Yield, || {
            ran = true;
            started.transfer::<_, Value>((body_args,))
        });
        if !ran {
            rb_self.ended(fiber_id(started));
        }
        waited?;
        Ok(started.as_value())
    }

    /// Called by `Fiber.set_scheduler(nil)` and when the thread ends; the
    /// app thread's loop has normally ended every fiber by then.
    fn close(ruby: &Ruby, rb_self: &Self) {
        if rb_self.live() > 0 {
            rb_self.terminate_all(ruby);
        }
    }
}

/// A wait for one of Hyperion's own futures from a fiber of an `async_io`
/// app thread, suspending only that fiber (a streamed body waiting for the
/// client, a streaming `rack.input` waiting for the next chunk), so the
/// thread's other requests go on meanwhile.
pub(crate) struct FiberWait(Obj<FiberScheduler>);

impl FiberWait {
    /// `Some` when the current fiber runs under an `async_io` scheduler;
    /// otherwise the caller waits without the GVL (`nogvl`) as before.
    pub(crate) fn current() -> Option<FiberWait> {
        // SAFETY: called with the GVL (from Ruby-called code); returns nil
        // unless the current fiber is non-blocking under a scheduler.
        let current = unsafe { Value::from_raw(rb_sys::rb_fiber_scheduler_current()) };
        if current.is_nil() {
            return None;
        }
        Obj::<FiberScheduler>::try_convert(current)
            .ok()
            .map(FiberWait)
    }

    /// Runs `future` on the I/O runtime and returns its output. An
    /// interrupt of the fiber (`FiberTerminated`, a `Timeout.timeout`
    /// deadline) drops the future and is returned.
    pub(crate) fn wait<R, F>(self, ruby: &Ruby, future: F) -> Result<R, Error>
    where
        F: std::future::Future<Output = R> + Send + 'static,
        R: Send + 'static,
    {
        let output = Arc::new(Mutex::new(None));
        let filled = Arc::clone(&output);
        let task = Box::pin(async move {
            let value = future.await;
            *filled.lock().unwrap_or_else(|p| p.into_inner()) = Some(value);
        });
        self.0.wait(ruby, Wait::Task(task))?;
        let value = output.lock().unwrap_or_else(|p| p.into_inner()).take();
        value.ok_or_else(|| {
            Error::new(
                ruby.exception_runtime_error(),
                "a fiber was resumed before the wait it was in had ended",
            )
        })
    }
}

/// The body of `process_wait`'s helper thread: `args` is `[pid, flags]`.
fn wait_for_process(ruby: &Ruby, args: &[Value], _block: Option<Proc>) -> Result<Value, Error> {
    ruby.get_inner(&PROCESS_STATUS).funcall("wait", args)
}

/// The body of a request's fiber: `args` is `[scheduler]`; the job was left
/// in `starting` by `start_request`.
fn request_fiber(ruby: &Ruby, args: &[Value], _block: Option<Proc>) -> Result<(), Error> {
    let scheduler = scheduler_arg(ruby, args)?;
    let id = fiber_id(ruby.fiber_current());
    let job = scheduler.lock().starting.take();
    let result = match job {
        Some(job) => {
            let app = ruby.get_inner(scheduler.context.app);
            run_job(ruby, &scheduler.context, app, job)
        }
        None => Ok(()),
    };
    scheduler.ended(id);
    result
}

/// The body of a `Fiber.schedule` fiber: `args` is
/// `[[scheduler, block, *arguments]]`. An exception is logged (nobody waits
/// for the fiber to report it to); a non-local exit passes on.
fn scheduled_fiber(ruby: &Ruby, args: &[Value], _block: Option<Proc>) -> Result<(), Error> {
    let packed = args
        .first()
        .and_then(|v| RArray::from_value(*v))
        .ok_or_else(|| {
            Error::new(
                ruby.exception_arg_error(),
                "scheduled fiber without arguments",
            )
        })?;
    let scheduler: Obj<FiberScheduler> = packed.entry(0)?;
    let block: Proc = packed.entry(1)?;
    let id = fiber_id(ruby.fiber_current());
    let arguments = ruby.ary_new();
    for index in 2..packed.len() {
        arguments.push(packed.entry::<Value>(index as isize)?)?;
    }
    let result = block.call::<_, Value>(arguments);
    scheduler.ended(id);
    match result {
        Ok(_) => Ok(()),
        Err(e) if is_non_local_exit(&e) => Err(e),
        Err(e) => {
            log_exception("a fiber started with Fiber.schedule raised", &e);
            Ok(())
        }
    }
}

fn scheduler_arg(ruby: &Ruby, args: &[Value]) -> Result<Obj<FiberScheduler>, Error> {
    let first = args
        .first()
        .copied()
        .ok_or_else(|| Error::new(ruby.exception_arg_error(), "fiber without its scheduler"))?;
    Obj::<FiberScheduler>::try_convert(first)
}

pub(crate) fn init(ruby: &Ruby, module: RModule) -> Result<(), Error> {
    module.const_get::<_, ExceptionClass>("FiberTerminated")?;
    let class = module.define_class("FiberScheduler", ruby.class_object())?;
    class.undef_default_alloc_func();
    class.define_method("io_wait", method!(FiberScheduler::io_wait, 3))?;
    class.define_method("kernel_sleep", method!(FiberScheduler::kernel_sleep, -1))?;
    class.define_method("block", method!(FiberScheduler::block, -1))?;
    class.define_method("unblock", method!(FiberScheduler::unblock, 2))?;
    class.define_method("timeout_after", method!(FiberScheduler::timeout_after, -1))?;
    class.define_method("process_wait", method!(FiberScheduler::process_wait, 2))?;
    class.define_method(
        "address_resolve",
        method!(FiberScheduler::address_resolve, 1),
    )?;
    class.define_method("fiber", method!(FiberScheduler::fiber, -1))?;
    class.define_method("close", method!(FiberScheduler::close, 0))?;
    Ok(())
}
