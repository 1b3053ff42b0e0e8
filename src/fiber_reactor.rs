//! The Ruby-free half of `async_io`'s fiber scheduler: what each suspended
//! fiber of one app thread waits for, the tokio tasks that do the waiting,
//! and the queue of fibers that are ready to run again.
//!
//! Why: with `async_io`, a request's fiber that would block (`sleep`, a
//! socket read, `Queue#pop`, `Net::HTTP`) hands its wait to this reactor and
//! lets the thread run the other fibers. The waiting itself is tokio's: the
//! runtime that serves the sockets also watches the app's file descriptors
//! (a `dup` of each, in an `AsyncFd`) and timers. A wait that ends crosses
//! back as plain data (fiber id, wait id, what happened) into `ready`, and
//! the `nudge` callback wakes the app thread if it sleeps. No Ruby object is
//! ever touched here; only the app thread resumes fibers
//! (src/ruby/scheduler.rs).
//!
//! Each fiber has at most one wait at a time, and every wait has an id. A
//! wait ends once: whichever of its timeout, its fd, an `unblock` (from any
//! thread), a deadline or a cancellation comes first removes it, and every
//! later completion finds no wait of that id and is dropped. So a fiber is
//! resumed exactly once per wait, and never by a stale event.
//!
//! Deadlines are `Timeout.timeout`'s (`timeout_after`): when one passes while
//! its fiber waits, the wait ends with [`Outcome::Expired`]; when it passes
//! while the fiber runs (nothing preempts a running fiber), it is kept until
//! the fiber next tries to wait, which then ends at once with it.

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::net::IpAddr;
use std::os::fd::{BorrowedFd, OwnedFd, RawFd};
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use tokio::io::unix::AsyncFd;
use tokio::io::{Interest, Ready};
use tokio::runtime::Handle;
use tokio::task::AbortHandle;

/// A fiber, as the scheduler names it (unique among live fibers).
pub type FiberId = u64;

/// One wait of one fiber.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct WaitId(u64);

/// One `timeout_after` deadline.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct DeadlineId(u64);

/// Ruby's event bits (`IO::READABLE`, `IO::PRIORITY`, `IO::WRITABLE`).
pub mod events {
    pub const READABLE: u8 = 1;
    pub const PRIORITY: u8 = 2;
    pub const WRITABLE: u8 = 4;
}

/// A future a fiber waits for (run as a task on the runtime): Hyperion's own
/// waits, such as a streamed response's chunk waiting for buffer space.
pub type Task = Pin<Box<dyn Future<Output = ()> + Send + 'static>>;

/// What a fiber waits for.
pub enum Wait {
    /// `sleep(duration)`.
    Sleep(Duration),
    /// `Mutex`, `Queue`, `ConditionVariable`, `Thread#join`, `sleep` with no
    /// duration: until [`FiberReactor::unblock`], or the timeout.
    Block(Option<Duration>),
    /// `io_wait`: until the descriptor is ready for one of `events`, or the
    /// timeout. The descriptor is duplicated; the caller's stays its own.
    Io {
        fd: RawFd,
        events: u8,
        timeout: Option<Duration>,
    },
    /// `address_resolve`: the addresses of a host name.
    Resolve(String),
    /// Run again as soon as the thread gets to it (a fiber that has just
    /// started another one).
    Yield,
    /// Until the future has run to its end (it hands its result over
    /// itself); cancelling the wait drops it.
    Task(Task),
}

impl std::fmt::Debug for Wait {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Wait::Sleep(d) => f.debug_tuple("Sleep").field(d).finish(),
            Wait::Block(t) => f.debug_tuple("Block").field(t).finish(),
            Wait::Io {
                fd,
                events,
                timeout,
            } => f
                .debug_struct("Io")
                .field("fd", fd)
                .field("events", events)
                .field("timeout", timeout)
                .finish(),
            Wait::Resolve(host) => f.debug_tuple("Resolve").field(host).finish(),
            Wait::Yield => f.write_str("Yield"),
            Wait::Task(_) => f.write_str("Task"),
        }
    }
}

/// How a wait ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The descriptor is ready for these of the events asked for (all of
    /// them when it could not be watched, e.g. a regular file: the I/O call
    /// that follows will not block, or will say why).
    Ready(u8),
    /// The wait's own timeout passed (for a sleep: it is over).
    TimedOut,
    Unblocked,
    /// `Yield`: the thread got back to the fiber; `Task`: the future ended.
    Resumed,
    Resolved(Vec<IpAddr>),
    /// The name did not resolve.
    Unresolved,
    /// A deadline of the fiber passed.
    Expired(DeadlineId),
}

/// What `begin_wait` did.
#[derive(Debug, PartialEq, Eq)]
pub enum Begun {
    /// The fiber must now give up the thread until a `Resume` for this wait.
    Waiting(WaitId),
    /// No need to wait: this is the outcome already.
    Done(Outcome),
}

/// A fiber whose wait has ended, to be resumed by its thread.
#[derive(Debug, PartialEq, Eq)]
pub struct Resume {
    pub fiber: FiberId,
    pub wait: WaitId,
    pub outcome: Outcome,
}

struct Pending {
    id: WaitId,
    /// Whether `unblock` ends it.
    unblockable: bool,
    task: Option<AbortHandle>,
}

struct Deadline {
    fiber: FiberId,
    task: AbortHandle,
}

#[derive(Default)]
struct State {
    next_id: u64,
    waits: HashMap<FiberId, Pending>,
    deadlines: HashMap<DeadlineId, Deadline>,
    /// Deadlines that passed while their fiber was not waiting.
    expired: HashMap<FiberId, DeadlineId>,
    ready: VecDeque<Resume>,
}

impl State {
    fn next(&mut self) -> u64 {
        self.next_id += 1;
        self.next_id
    }
}

/// The waits of one app thread's fibers (see the module docs).
pub struct FiberReactor {
    state: Mutex<State>,
    runtime: Handle,
    /// Wakes the app thread if it is waiting (`Dispatcher::nudge`).
    nudge: Box<dyn Fn() + Send + Sync>,
    /// For the tasks, which must not keep the reactor alive.
    this: Weak<FiberReactor>,
}

impl FiberReactor {
    /// A reactor whose waits run on `runtime`; `nudge` is called (from any
    /// thread, no lock held) whenever a fiber becomes ready.
    pub fn new(runtime: Handle, nudge: impl Fn() + Send + Sync + 'static) -> Arc<Self> {
        Arc::new_cyclic(|this| Self {
            state: Mutex::new(State::default()),
            runtime,
            nudge: Box::new(nudge),
            this: this.clone(),
        })
    }

    /// Locks the state. A poisoned lock is recovered: nothing that can panic
    /// runs under it.
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Starts a wait for `fiber`, which must then give up the thread until
    /// its `Resume` comes out of [`take_ready`](Self::take_ready), unless the
    /// outcome is already known. A deadline of the fiber that passed while it
    /// ran ends the wait before it starts.
    pub fn begin_wait(&self, fiber: FiberId, wait: Wait) -> Begun {
        let mut state = self.lock();
        if let Some(deadline) = state.expired.remove(&fiber) {
            return Begun::Done(Outcome::Expired(deadline));
        }
        let id = WaitId(state.next());
        let (unblockable, task) = match wait {
            Wait::Sleep(duration) => (false, Some(self.spawn_timer(fiber, id, duration))),
            Wait::Block(timeout) => (true, timeout.map(|t| self.spawn_timer(fiber, id, t))),
            Wait::Io {
                fd,
                events,
                timeout,
            } => match self.watch(fd, events) {
                Some(watched) => (
                    false,
                    Some(self.spawn_io(fiber, id, watched, events, timeout)),
                ),
                None => return Begun::Done(Outcome::Ready(events)),
            },
            Wait::Resolve(host) => (false, Some(self.spawn_resolve(fiber, id, host))),
            Wait::Task(task) => (false, Some(self.spawn_task(fiber, id, task))),
            Wait::Yield => {
                state.ready.push_back(Resume {
                    fiber,
                    wait: id,
                    outcome: Outcome::Resumed,
                });
                (false, None)
            }
        };
        // A task cannot complete before this insert: it needs the lock held here.
        let replaced = state.waits.insert(
            fiber,
            Pending {
                id,
                unblockable,
                task,
            },
        );
        drop(state);
        if let Some(old) = replaced.and_then(|p| p.task) {
            debug_assert!(false, "a fiber began a wait while already waiting");
            old.abort();
        }
        Begun::Waiting(id)
    }

    /// Ends `fiber`'s wait if it is one that `unblock` ends (`block`); any
    /// thread may call this. False if the fiber was not in such a wait.
    pub fn unblock(&self, fiber: FiberId) -> bool {
        let state = self.lock();
        let Some(id) = state
            .waits
            .get(&fiber)
            .filter(|p| p.unblockable)
            .map(|p| p.id)
        else {
            return false;
        };
        self.finish(state, fiber, id, Outcome::Unblocked, true);
        true
    }

    /// A `timeout_after` deadline for `fiber`, `after` from now.
    pub fn deadline(&self, fiber: FiberId, after: Duration) -> DeadlineId {
        let mut state = self.lock();
        let id = DeadlineId(state.next());
        let reactor = self.this.clone();
        let task = self
            .runtime
            .spawn(async move {
                tokio::time::sleep(after).await;
                if let Some(reactor) = reactor.upgrade() {
                    reactor.expire(id);
                }
            })
            .abort_handle();
        state.deadlines.insert(id, Deadline { fiber, task });
        id
    }

    /// Drops a deadline (its block ended), and its expiry if it passed
    /// without reaching the fiber.
    pub fn cancel_deadline(&self, id: DeadlineId) {
        let mut state = self.lock();
        if let Some(deadline) = state.deadlines.remove(&id) {
            deadline.task.abort();
            if state.expired.get(&deadline.fiber) == Some(&id) {
                state.expired.remove(&deadline.fiber);
            }
        }
    }

    /// A deadline of `fiber` that passed since it last waited, if any (the
    /// fiber checks after it is resumed, as it may have been ready already).
    pub fn take_expired(&self, fiber: FiberId) -> Option<DeadlineId> {
        self.lock().expired.remove(&fiber)
    }

    /// Ends `fiber`'s wait without resuming it (the fiber is being resumed
    /// by other means). Returns the id of the wait that was dropped.
    pub fn cancel_wait(&self, fiber: FiberId) -> Option<WaitId> {
        let pending = self.lock().waits.remove(&fiber)?;
        if let Some(task) = pending.task {
            task.abort();
        }
        Some(pending.id)
    }

    /// Drops everything of `fiber`'s: its wait, its deadlines and their
    /// expiries (the fiber has ended, or will never run again).
    pub fn forget(&self, fiber: FiberId) {
        let mut state = self.lock();
        state.expired.remove(&fiber);
        state.deadlines.retain(|_, deadline| {
            let keep = deadline.fiber != fiber;
            if !keep {
                deadline.task.abort();
            }
            keep
        });
        if let Some(task) = state.waits.remove(&fiber).and_then(|p| p.task) {
            task.abort();
        }
    }

    /// The fibers whose waits have ended, oldest first.
    pub fn take_ready(&self) -> VecDeque<Resume> {
        std::mem::take(&mut self.lock().ready)
    }

    /// How many fibers wait.
    pub fn waiting(&self) -> usize {
        self.lock().waits.len()
    }

    /// Ends wait `id` of `fiber` (if it still is the fiber's wait) with
    /// `outcome`, then nudges the thread. `abort` stops the wait's task (not
    /// wanted when the task itself is finishing).
    fn finish(
        &self,
        mut state: MutexGuard<'_, State>,
        fiber: FiberId,
        id: WaitId,
        outcome: Outcome,
        abort: bool,
    ) {
        if state.waits.get(&fiber).map(|p| p.id) != Some(id) {
            return;
        }
        let pending = state.waits.remove(&fiber);
        state.ready.push_back(Resume {
            fiber,
            wait: id,
            outcome,
        });
        drop(state);
        if let (true, Some(task)) = (abort, pending.and_then(|p| p.task)) {
            task.abort();
        }
        (self.nudge)();
    }

    /// Called by a wait's own task.
    fn complete(&self, fiber: FiberId, id: WaitId, outcome: Outcome) {
        let state = self.lock();
        self.finish(state, fiber, id, outcome, false);
    }

    /// Called by a deadline's task.
    fn expire(&self, id: DeadlineId) {
        let mut state = self.lock();
        let Some(deadline) = state.deadlines.get(&id) else {
            return; // cancelled meanwhile
        };
        let fiber = deadline.fiber;
        match state.waits.get(&fiber).map(|p| p.id) {
            Some(wait) => self.finish(state, fiber, wait, Outcome::Expired(id), true),
            None => {
                // Running (or already ready): it finds out when it next waits.
                state.expired.entry(fiber).or_insert(id);
            }
        }
    }

    fn spawn_timer(&self, fiber: FiberId, id: WaitId, after: Duration) -> AbortHandle {
        let reactor = self.this.clone();
        self.runtime
            .spawn(async move {
                tokio::time::sleep(after).await;
                if let Some(reactor) = reactor.upgrade() {
                    reactor.complete(fiber, id, Outcome::TimedOut);
                }
            })
            .abort_handle()
    }

    /// Registers a duplicate of `fd` with the runtime's poller; `None` when
    /// it cannot be watched (a regular file, which is always ready, or no
    /// descriptor left: the I/O call that follows then reports the problem).
    fn watch(&self, fd: RawFd, events: u8) -> Option<AsyncFd<OwnedFd>> {
        // SAFETY: the caller (Ruby's io_wait) holds `fd` open for this call;
        // it is only read here to make a duplicate that this reactor owns.
        let borrowed = unsafe { BorrowedFd::borrow_raw(fd) };
        let owned = borrowed.try_clone_to_owned().ok()?;
        let _runtime = self.runtime.enter();
        // SAFETY: the AsyncFd owns `owned`, a descriptor of its own that stays
        // open (and the same) until the AsyncFd drops it.
        unsafe { AsyncFd::register_with_interest(owned, interest_of(events)) }.ok()
    }

    fn spawn_io(
        &self,
        fiber: FiberId,
        id: WaitId,
        watched: AsyncFd<OwnedFd>,
        events: u8,
        timeout: Option<Duration>,
    ) -> AbortHandle {
        let reactor = self.this.clone();
        self.runtime
            .spawn(async move {
                let ready = async {
                    match watched.ready(interest_of(events)).await {
                        Ok(guard) => Outcome::Ready(events_of(guard.ready(), events)),
                        Err(_) => Outcome::Ready(events),
                    }
                };
                let outcome = match timeout {
                    Some(t) => tokio::time::timeout(t, ready)
                        .await
                        .unwrap_or(Outcome::TimedOut),
                    None => ready.await,
                };
                // Deregistered and closed before the fiber runs again.
                drop(watched);
                if let Some(reactor) = reactor.upgrade() {
                    reactor.complete(fiber, id, outcome);
                }
            })
            .abort_handle()
    }

    fn spawn_task(&self, fiber: FiberId, id: WaitId, task: Task) -> AbortHandle {
        let reactor = self.this.clone();
        self.runtime
            .spawn(async move {
                task.await;
                if let Some(reactor) = reactor.upgrade() {
                    reactor.complete(fiber, id, Outcome::Resumed);
                }
            })
            .abort_handle()
    }

    fn spawn_resolve(&self, fiber: FiberId, id: WaitId, host: String) -> AbortHandle {
        let reactor = self.this.clone();
        self.runtime
            .spawn(async move {
                let outcome = match tokio::net::lookup_host((host.as_str(), 0)).await {
                    Ok(found) => {
                        let mut addresses: Vec<IpAddr> = Vec::new();
                        for address in found.map(|a| a.ip()) {
                            if !addresses.contains(&address) {
                                addresses.push(address);
                            }
                        }
                        Outcome::Resolved(addresses)
                    }
                    Err(_) => Outcome::Unresolved,
                };
                if let Some(reactor) = reactor.upgrade() {
                    reactor.complete(fiber, id, outcome);
                }
            })
            .abort_handle()
    }
}

impl Drop for FiberReactor {
    fn drop(&mut self) {
        let state = self.lock();
        for pending in state.waits.values() {
            if let Some(task) = &pending.task {
                task.abort();
            }
        }
        for deadline in state.deadlines.values() {
            deadline.task.abort();
        }
    }
}

fn interest_of(events: u8) -> Interest {
    let mut interest = Interest::ERROR;
    if events & events::READABLE != 0 {
        interest = interest.add(Interest::READABLE);
    }
    if events & events::WRITABLE != 0 {
        interest = interest.add(Interest::WRITABLE);
    }
    if events & events::PRIORITY != 0 {
        interest = interest.add(Interest::PRIORITY);
    }
    interest
}

/// The events of `wanted` that `ready` satisfies. An error or a hang-up
/// satisfies every one: the I/O call that follows reports it.
fn events_of(ready: Ready, wanted: u8) -> u8 {
    if ready.is_error() {
        return wanted;
    }
    let mut got = 0;
    if ready.is_readable() || ready.is_read_closed() {
        got |= events::READABLE;
    }
    if ready.is_writable() || ready.is_write_closed() {
        got |= events::WRITABLE;
    }
    if ready.is_priority() {
        got |= events::PRIORITY;
    }
    match got & wanted {
        0 => wanted,
        some => some,
    }
}

/// The worker-wide cap on request fibers (`max_fibers`): a thread takes a
/// request only after taking a slot, and gives it back when the request's
/// fiber ends. Beyond the cap, requests wait in the job queue, where
/// `max_pending` applies as in thread mode.
#[derive(Debug)]
pub struct FiberSlots {
    max: usize,
    taken: AtomicUsize,
}

impl FiberSlots {
    pub fn new(max: usize) -> Self {
        Self {
            max: max.max(1),
            taken: AtomicUsize::new(0),
        }
    }

    /// Takes a slot if one is free.
    pub fn try_take(&self) -> bool {
        self.taken
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |taken| {
                (taken < self.max).then_some(taken + 1)
            })
            .is_ok()
    }

    pub fn give_back(&self) {
        let _ = self
            .taken
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |taken| {
                taken.checked_sub(1)
            });
    }

    pub fn taken(&self) -> usize {
        self.taken.load(Ordering::Acquire)
    }

    pub fn max(&self) -> usize {
        self.max
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::os::fd::AsRawFd;
    use std::os::unix::net::UnixStream;
    use std::sync::{Condvar, Mutex};
    use std::thread;
    use std::time::Instant;

    /// A multi-threaded runtime, as the worker's I/O runtime is.
    fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap()
    }

    /// The "app thread" side: a flag the nudge raises, and a wait for it.
    #[derive(Default)]
    struct Doorbell {
        rung: Mutex<usize>,
        changed: Condvar,
    }

    impl Doorbell {
        fn ring(&self) {
            *self.rung.lock().unwrap() += 1;
            self.changed.notify_all();
        }

        fn rings(&self) -> usize {
            *self.rung.lock().unwrap()
        }
    }

    fn reactor(runtime: &tokio::runtime::Runtime) -> (Arc<FiberReactor>, Arc<Doorbell>) {
        let bell = Arc::new(Doorbell::default());
        let ring = bell.clone();
        (
            FiberReactor::new(runtime.handle().clone(), move || ring.ring()),
            bell,
        )
    }

    /// Waits (generously) until the reactor has `count` resumes ready.
    fn resumes(reactor: &FiberReactor, bell: &Doorbell, count: usize) -> Vec<Resume> {
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut got = Vec::new();
        let mut rung = bell.rung.lock().unwrap();
        loop {
            got.extend(reactor.take_ready());
            if got.len() >= count || Instant::now() > deadline {
                return got;
            }
            rung = bell
                .changed
                .wait_timeout(rung, Duration::from_millis(50))
                .unwrap()
                .0;
        }
    }

    fn waiting(begun: Begun) -> WaitId {
        match begun {
            Begun::Waiting(id) => id,
            other => panic!("expected a wait, got {other:?}"),
        }
    }

    #[test]
    fn a_sleep_ends_after_its_duration_and_nudges_the_thread() {
        let runtime = runtime();
        let (reactor, bell) = reactor(&runtime);
        let started = Instant::now();
        let wait = waiting(reactor.begin_wait(7, Wait::Sleep(Duration::from_millis(30))));
        let got = resumes(&reactor, &bell, 1);
        assert!(started.elapsed() >= Duration::from_millis(30));
        assert_eq!(
            got,
            vec![Resume {
                fiber: 7,
                wait,
                outcome: Outcome::TimedOut
            }]
        );
        assert!(bell.rings() >= 1);
        assert_eq!(reactor.waiting(), 0);
    }

    #[test]
    fn many_sleeping_fibers_wait_at_once() {
        let runtime = runtime();
        let (reactor, bell) = reactor(&runtime);
        let started = Instant::now();
        for fiber in 0..500 {
            waiting(reactor.begin_wait(fiber, Wait::Sleep(Duration::from_millis(50))));
        }
        let got = resumes(&reactor, &bell, 500);
        assert_eq!(got.len(), 500);
        // 500 sleeps of 50 ms one after the other would take 25 s.
        assert!(started.elapsed() < Duration::from_secs(15));
    }

    #[test]
    fn a_descriptor_wait_ends_when_the_peer_writes() {
        let runtime = runtime();
        let (reactor, bell) = reactor(&runtime);
        let (ours, mut theirs) = UnixStream::pair().unwrap();
        let wait = waiting(reactor.begin_wait(
            1,
            Wait::Io {
                fd: ours.as_raw_fd(),
                events: events::READABLE,
                timeout: None,
            },
        ));
        thread::sleep(Duration::from_millis(20));
        assert!(reactor.take_ready().is_empty(), "nothing was written yet");
        theirs.write_all(b"x").unwrap();
        assert_eq!(
            resumes(&reactor, &bell, 1),
            vec![Resume {
                fiber: 1,
                wait,
                outcome: Outcome::Ready(events::READABLE)
            }]
        );
        // The caller's descriptor is untouched (only the duplicate was closed).
        let mut byte = [0u8; 1];
        assert_eq!(std::io::Read::read(&mut &ours, &mut byte).unwrap(), 1);
    }

    #[test]
    fn a_descriptor_wait_times_out_and_a_writable_one_is_ready_at_once() {
        let runtime = runtime();
        let (reactor, bell) = reactor(&runtime);
        let (ours, _theirs) = UnixStream::pair().unwrap();
        let read = waiting(reactor.begin_wait(
            1,
            Wait::Io {
                fd: ours.as_raw_fd(),
                events: events::READABLE,
                timeout: Some(Duration::from_millis(20)),
            },
        ));
        let write = waiting(reactor.begin_wait(
            2,
            Wait::Io {
                fd: ours.as_raw_fd(),
                events: events::READABLE | events::WRITABLE,
                timeout: None,
            },
        ));
        let mut got = resumes(&reactor, &bell, 2);
        got.sort_by_key(|r| r.fiber);
        assert_eq!(
            got,
            vec![
                Resume {
                    fiber: 1,
                    wait: read,
                    outcome: Outcome::TimedOut
                },
                Resume {
                    fiber: 2,
                    wait: write,
                    outcome: Outcome::Ready(events::WRITABLE)
                }
            ]
        );
    }

    #[test]
    fn a_hang_up_ends_a_read_wait() {
        let runtime = runtime();
        let (reactor, bell) = reactor(&runtime);
        let (ours, theirs) = UnixStream::pair().unwrap();
        waiting(reactor.begin_wait(
            1,
            Wait::Io {
                fd: ours.as_raw_fd(),
                events: events::READABLE,
                timeout: None,
            },
        ));
        drop(theirs);
        let got = resumes(&reactor, &bell, 1);
        assert_eq!(got[0].outcome, Outcome::Ready(events::READABLE));
    }

    #[test]
    fn a_regular_file_is_ready_without_waiting() {
        let runtime = runtime();
        let (reactor, _bell) = reactor(&runtime);
        let file = tempfile::tempfile().unwrap();
        assert_eq!(
            reactor.begin_wait(
                1,
                Wait::Io {
                    fd: file.as_raw_fd(),
                    events: events::READABLE,
                    timeout: None,
                },
            ),
            Begun::Done(Outcome::Ready(events::READABLE))
        );
        assert_eq!(reactor.waiting(), 0);
    }

    #[test]
    fn unblock_from_other_threads_resumes_a_blocked_fiber_exactly_once() {
        let runtime = runtime();
        let (reactor, bell) = reactor(&runtime);
        for round in 0..200u64 {
            let wait =
                waiting(reactor.begin_wait(round, Wait::Block(Some(Duration::from_millis(1)))));
            thread::scope(|scope| {
                for _ in 0..4 {
                    scope.spawn(|| reactor.unblock(round));
                }
            });
            let got = resumes(&reactor, &bell, 1);
            thread::sleep(Duration::from_millis(2));
            let late = reactor.take_ready();
            assert_eq!(got.len() + late.len(), 1, "round {round}: {got:?} {late:?}");
            assert_eq!(got[0].wait, wait);
            assert!(matches!(
                got[0].outcome,
                Outcome::Unblocked | Outcome::TimedOut
            ));
        }
    }

    #[test]
    fn unblock_ends_only_block_waits() {
        let runtime = runtime();
        let (reactor, _bell) = reactor(&runtime);
        waiting(reactor.begin_wait(1, Wait::Sleep(Duration::from_secs(60))));
        assert!(!reactor.unblock(1));
        assert!(!reactor.unblock(2), "not waiting at all");
        reactor.forget(1);
    }

    #[test]
    fn a_block_without_timeout_waits_for_unblock() {
        let runtime = runtime();
        let (reactor, bell) = reactor(&runtime);
        let wait = waiting(reactor.begin_wait(3, Wait::Block(None)));
        thread::sleep(Duration::from_millis(20));
        assert!(reactor.take_ready().is_empty());
        assert!(thread::scope(|s| s
            .spawn(|| reactor.unblock(3))
            .join()
            .unwrap()));
        assert_eq!(
            resumes(&reactor, &bell, 1),
            vec![Resume {
                fiber: 3,
                wait,
                outcome: Outcome::Unblocked
            }]
        );
    }

    #[test]
    fn a_deadline_ends_the_wait_it_finds() {
        let runtime = runtime();
        let (reactor, bell) = reactor(&runtime);
        let deadline = reactor.deadline(5, Duration::from_millis(20));
        let wait = waiting(reactor.begin_wait(5, Wait::Sleep(Duration::from_secs(60))));
        assert_eq!(
            resumes(&reactor, &bell, 1),
            vec![Resume {
                fiber: 5,
                wait,
                outcome: Outcome::Expired(deadline)
            }]
        );
        assert_eq!(reactor.waiting(), 0, "the sleep is gone too");
        reactor.cancel_deadline(deadline);
    }

    #[test]
    fn a_deadline_that_passes_while_the_fiber_runs_ends_its_next_wait_at_once() {
        let runtime = runtime();
        let (reactor, _bell) = reactor(&runtime);
        let deadline = reactor.deadline(5, Duration::from_millis(10));
        let until = Instant::now() + Duration::from_secs(20);
        while reactor.lock().expired.is_empty() && Instant::now() < until {
            thread::sleep(Duration::from_millis(2));
        }
        assert_eq!(
            reactor.begin_wait(5, Wait::Block(None)),
            Begun::Done(Outcome::Expired(deadline))
        );
        // Reported once.
        assert!(matches!(
            reactor.begin_wait(5, Wait::Yield),
            Begun::Waiting(_)
        ));
    }

    #[test]
    fn a_cancelled_deadline_never_fires() {
        let runtime = runtime();
        let (reactor, _bell) = reactor(&runtime);
        let deadline = reactor.deadline(5, Duration::from_millis(10));
        reactor.cancel_deadline(deadline);
        thread::sleep(Duration::from_millis(40));
        assert_eq!(reactor.take_expired(5), None);
        waiting(reactor.begin_wait(5, Wait::Sleep(Duration::from_millis(30))));
        thread::sleep(Duration::from_millis(10));
        assert!(reactor.take_ready().is_empty());
    }

    #[test]
    fn a_cancelled_wait_is_never_resumed() {
        let runtime = runtime();
        let (reactor, bell) = reactor(&runtime);
        let old = waiting(reactor.begin_wait(9, Wait::Sleep(Duration::from_millis(10))));
        assert_eq!(reactor.cancel_wait(9), Some(old));
        assert_eq!(reactor.cancel_wait(9), None);
        let new = waiting(reactor.begin_wait(9, Wait::Sleep(Duration::from_millis(40))));
        let got = resumes(&reactor, &bell, 1);
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].wait, new);
    }

    #[test]
    fn a_forgotten_fiber_gets_nothing_more() {
        let runtime = runtime();
        let (reactor, bell) = reactor(&runtime);
        reactor.deadline(9, Duration::from_millis(5));
        reactor.deadline(9, Duration::from_secs(60));
        let other = reactor.deadline(8, Duration::from_secs(60));
        waiting(reactor.begin_wait(9, Wait::Sleep(Duration::from_millis(5))));
        reactor.forget(9);
        thread::sleep(Duration::from_millis(30));
        assert!(reactor.take_ready().is_empty());
        assert_eq!(reactor.take_expired(9), None);
        assert_eq!(bell.rings(), 0);
        assert_eq!(
            reactor.lock().deadlines.keys().collect::<Vec<_>>(),
            vec![&other]
        );
    }

    #[test]
    fn yield_is_ready_at_once_without_a_nudge() {
        let runtime = runtime();
        let (reactor, bell) = reactor(&runtime);
        let wait = waiting(reactor.begin_wait(4, Wait::Yield));
        assert_eq!(
            reactor.take_ready(),
            VecDeque::from([Resume {
                fiber: 4,
                wait,
                outcome: Outcome::Resumed
            }])
        );
        assert_eq!(bell.rings(), 0);
    }

    #[test]
    fn a_task_wait_ends_with_its_future_and_a_cancelled_one_drops_it() {
        let runtime = runtime();
        let (reactor, bell) = reactor(&runtime);
        let (tx, rx) = tokio::sync::oneshot::channel::<u8>();
        let got = Arc::new(Mutex::new(None));
        let slot = got.clone();
        let wait = waiting(reactor.begin_wait(
            1,
            Wait::Task(Box::pin(async move {
                *slot.lock().unwrap() = rx.await.ok();
            })),
        ));
        thread::sleep(Duration::from_millis(10));
        assert!(reactor.take_ready().is_empty());
        tx.send(5).unwrap();
        assert_eq!(
            resumes(&reactor, &bell, 1),
            vec![Resume {
                fiber: 1,
                wait,
                outcome: Outcome::Resumed
            }]
        );
        assert_eq!(*got.lock().unwrap(), Some(5));

        let (tx, rx) = tokio::sync::oneshot::channel::<u8>();
        waiting(reactor.begin_wait(
            2,
            Wait::Task(Box::pin(async move {
                let _ = rx.await;
            })),
        ));
        reactor.cancel_wait(2);
        let until = Instant::now() + Duration::from_secs(20);
        while !tx.is_closed() && Instant::now() < until {
            thread::sleep(Duration::from_millis(1));
        }
        assert!(tx.is_closed(), "the cancelled task was dropped");
    }

    #[test]
    fn localhost_resolves() {
        let runtime = runtime();
        let (reactor, bell) = reactor(&runtime);
        waiting(reactor.begin_wait(1, Wait::Resolve("localhost".into())));
        waiting(reactor.begin_wait(2, Wait::Resolve("127.0.0.1".into())));
        let mut got = resumes(&reactor, &bell, 2);
        got.sort_by_key(|r| r.fiber);
        let Outcome::Resolved(local) = &got[0].outcome else {
            panic!("{got:?}");
        };
        assert!(local.iter().all(|a| a.is_loopback()) && !local.is_empty());
        assert_eq!(
            got[1].outcome,
            Outcome::Resolved(vec!["127.0.0.1".parse().unwrap()])
        );
    }

    #[test]
    fn dropping_the_reactor_stops_its_tasks() {
        let runtime = runtime();
        let (reactor, bell) = reactor(&runtime);
        let (ours, mut theirs) = UnixStream::pair().unwrap();
        waiting(reactor.begin_wait(
            1,
            Wait::Io {
                fd: ours.as_raw_fd(),
                events: events::READABLE,
                timeout: None,
            },
        ));
        waiting(reactor.begin_wait(2, Wait::Sleep(Duration::from_millis(5))));
        drop(reactor);
        thread::sleep(Duration::from_millis(30));
        theirs.write_all(b"x").unwrap();
        thread::sleep(Duration::from_millis(10));
        assert_eq!(bell.rings(), 0);
    }

    #[test]
    fn slots_cap_the_fibers_across_threads() {
        let slots = FiberSlots::new(10);
        let taken = AtomicUsize::new(0);
        thread::scope(|scope| {
            for _ in 0..4 {
                scope.spawn(|| {
                    for _ in 0..100 {
                        if slots.try_take() {
                            taken.fetch_add(1, Ordering::AcqRel);
                        }
                    }
                });
            }
        });
        assert_eq!(taken.load(Ordering::Acquire), 10);
        assert!(!slots.try_take());
        slots.give_back();
        assert!(slots.try_take());
        assert_eq!(slots.taken(), 10);
    }
}
