//! Hands requests from the tokio side to the Ruby threads that run the app,
//! keeping one thread hot.
//!
//! Why: under Ruby's GVL only one app thread runs Ruby at a time. A queue
//! that wakes a sleeping thread for every job makes nearly every request pay
//! a hand-off: the woken thread takes the job, then waits for the GVL that a
//! busy thread holds, and the two pass the GVL back and forth. Measured on
//! hello (2 cores): `-t 5` served a third fewer requests than `-t 1`, with
//! 3.6× the context switches per request. More threads only help while the
//! running ones *wait* (I/O, sleep, a database) with the GVL released.
//!
//! The policy:
//! - a thread that finishes a job takes the next queued one without
//!   releasing the GVL (`try_pop`): the hot thread keeps going;
//! - a new job wakes an idle thread only when no thread is running a job
//!   (nobody would take it otherwise). Idle threads are woken last-idle
//!   first, so the one woken is the one whose caches are warm;
//! - otherwise a watchdog looks every `tick` at the threads running jobs,
//!   and wakes one more idle thread while jobs wait if none of the running
//!   threads is using the CPU (they are blocked: I/O, sleep, a lock), or if
//!   every one of them has been on its job for `long_job` (then a second
//!   thread can take the GVL at Ruby's next time slice and serve the short
//!   jobs queued behind the long one).
//!
//! A thread that runs fibers (`async_io`) waits here too, with
//! [`Dispatcher::wait_for_event`]: for a new job or for a [`nudge`] (one of
//! its fibers became ready), whichever comes first, so it sleeps in one
//! place for both kinds of work.
//!
//! [`nudge`]: Dispatcher::nudge
//!
//! "Using the CPU" is read from each thread's CPU clock
//! (`pthread_getcpuclockid`): a thread that ran less than a quarter of the
//! tick looks blocked, unless the kernel says it is runnable (`R` in
//! /proc/self/task/TID/stat: merely descheduled, as happens on a loaded
//! machine). A thread waiting for the GVL is not runnable, so a pool whose
//! running threads all wait on a GVL held elsewhere gets one more thread,
//! which costs one wake-up. This works on every Ruby, including 3.1, which
//! has no GVL event hooks.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::stats::StatsPage;

/// What a blocking pop ended with.
#[derive(Debug, PartialEq, Eq)]
pub enum Pop<T> {
    Job(T),
    /// The waiting thread was interrupted (Ruby wants it to run interrupts).
    Interrupted,
    /// The queue is closed and empty: the consumer should exit.
    Closed,
}

/// What [`Dispatcher::wait_for_event`] ended with.
#[derive(Debug, PartialEq, Eq)]
pub enum Event<T> {
    Job(T),
    /// [`Dispatcher::nudge`] was called for this consumer.
    Nudged,
    /// The waiting thread was interrupted (Ruby wants it to run interrupts).
    Interrupted,
    /// The queue is closed and empty (only reported to a wait that takes jobs).
    Closed,
}

/// Why a push was refused; the job is handed back so it can be answered.
#[derive(Debug, PartialEq, Eq)]
pub enum PushError<T> {
    /// `max_pending` jobs are already waiting.
    Full(T),
    Closed(T),
}

/// When the watchdog adds a thread (see the module docs).
#[derive(Debug, Clone, Copy)]
pub struct Policy {
    pub tick: Duration,
    /// A running thread that got less than this share of a tick's CPU time
    /// (and is not runnable) counts as blocked.
    pub busy_share: f64,
    pub long_job: Duration,
}

impl Default for Policy {
    fn default() -> Self {
        Self {
            tick: Duration::from_millis(1),
            busy_share: 0.25,
            long_job: Duration::from_millis(50),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Phase {
    /// On the idle stack, waiting to be woken.
    Idle,
    /// Taken off the idle stack to take a job; not running yet.
    Woken,
    Running {
        since: Instant,
    },
    /// Waiting, but not on the idle stack (just interrupted, or left).
    Away,
}

#[derive(Debug, Clone, Copy)]
struct Sample {
    cpu: Duration,
    at: Instant,
    /// Looks in a row that found the thread not using the CPU.
    quiet: u32,
}

/// A consumer thread as the dispatcher knows it.
struct Slot {
    phase: Phase,
    wake: Arc<Condvar>,
    clock: Option<ThreadClock>,
    /// The watchdog's last look at the thread's CPU clock.
    sampled: Option<Sample>,
    live: bool,
    /// Set by `nudge`, consumed by `wait_for_event`.
    nudged: bool,
    /// In `wait_for_event`'s sleep (so a nudge must notify).
    waiting: bool,
}

struct State<T> {
    /// Each job with when it was queued.
    jobs: VecDeque<(T, Instant)>,
    closed: bool,
    /// Jobs handed to consumers so far (the worker's liveness check watches it).
    taken: u64,
    slots: Vec<Slot>,
    /// Indices of idle slots; the last one went idle most recently.
    idle: Vec<usize>,
    running: usize,
    woken: usize,
    /// Registered consumers (app threads alive).
    live: usize,
    watchdog_asleep: bool,
    /// Where the pool's gauges and the time jobs waited are published.
    stats: Arc<StatsPage>,
}

pub struct Dispatcher<T> {
    state: Mutex<State<T>>,
    watchdog: Condvar,
    max_pending: Option<usize>,
    policy: Policy,
}

/// A registered consumer thread; unregisters when dropped.
pub struct Consumer<'d, T> {
    dispatcher: &'d Dispatcher<T>,
    index: usize,
    wake: Arc<Condvar>,
}

impl<T> Dispatcher<T> {
    /// A dispatcher publishing to a private stats page of its own.
    pub fn new(max_pending: Option<usize>, policy: Policy) -> Self {
        let stats = StatsPage::new(false).expect("mapping one page for the dispatcher's stats");
        Self::with_stats(max_pending, policy, Arc::new(stats))
    }

    /// A dispatcher that publishes its gauges (queued jobs, threads on a job,
    /// threads alive, jobs taken) and each job's time in the queue to `stats`.
    pub fn with_stats(max_pending: Option<usize>, policy: Policy, stats: Arc<StatsPage>) -> Self {
        Self {
            state: Mutex::new(State {
                jobs: VecDeque::new(),
                closed: false,
                taken: 0,
                slots: Vec::new(),
                idle: Vec::new(),
                running: 0,
                woken: 0,
                live: 0,
                watchdog_asleep: false,
                stats,
            }),
            watchdog: Condvar::new(),
            max_pending,
            policy,
        }
    }

    /// Locks the state. A poisoned lock is recovered: no holder can leave
    /// it half-updated (no code that can panic runs under it).
    fn lock(&self) -> MutexGuard<'_, State<T>> {
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Registers the calling thread as a consumer (its CPU clock is read by
    /// the watchdog). It counts as running until it first waits.
    pub fn consumer(&self) -> Consumer<'_, T> {
        let wake = Arc::new(Condvar::new());
        let slot = Slot {
            phase: Phase::Running {
                since: Instant::now(),
            },
            wake: wake.clone(),
            clock: ThreadClock::of_current_thread(),
            sampled: None,
            live: true,
            nudged: false,
            waiting: false,
        };
        let mut state = self.lock();
        let index = match state.slots.iter().position(|s| !s.live) {
            Some(free) => {
                state.slots[free] = slot;
                free
            }
            None => {
                state.slots.push(slot);
                state.slots.len() - 1
            }
        };
        state.running += 1;
        state.live += 1;
        publish(&state);
        Consumer {
            dispatcher: self,
            index,
            wake,
        }
    }

    pub fn push(&self, job: T) -> Result<(), PushError<T>> {
        let mut state = self.lock();
        if state.closed {
            return Err(PushError::Closed(job));
        }
        if self.max_pending.is_some_and(|max| state.jobs.len() >= max) {
            return Err(PushError::Full(job));
        }
        state.jobs.push_back((job, Instant::now()));
        if state.running == 0 && state.woken == 0 {
            wake_idle(&mut state);
        } else if state.watchdog_asleep && !state.idle.is_empty() {
            // Only when there is a thread it could add: with every thread
            // busy (always so with one thread) waking it would be a context
            // switch per request for nothing.
            state.watchdog_asleep = false;
            self.watchdog.notify_one();
        }
        publish(&state);
        Ok(())
    }

    /// Takes a job if one is waiting, without blocking (the hot path: a
    /// thread that just finished a job, still holding the GVL).
    pub fn try_pop(&self, consumer: &Consumer<'_, T>) -> Option<T> {
        let mut state = self.lock();
        let job = take_job(&mut state)?;
        set_phase(
            &mut state,
            consumer.index,
            Phase::Running {
                since: Instant::now(),
            },
        );
        Some(job)
    }

    /// Blocks until a job is handed out, the queue closes, or `interrupted`
    /// is raised. Jobs still queued when the queue closes are handed out
    /// first. The flag is consumed when it ends the wait.
    pub fn pop(&self, consumer: &Consumer<'_, T>, interrupted: &AtomicBool) -> Pop<T> {
        let index = consumer.index;
        let mut state = self.lock();
        loop {
            if let Some(job) = take_job(&mut state) {
                set_phase(
                    &mut state,
                    index,
                    Phase::Running {
                        since: Instant::now(),
                    },
                );
                return Pop::Job(job);
            }
            if state.closed {
                set_phase(&mut state, index, Phase::Away);
                return Pop::Closed;
            }
            if interrupted.swap(false, Ordering::AcqRel) {
                set_phase(&mut state, index, Phase::Away);
                return Pop::Interrupted;
            }
            if state.slots[index].phase != Phase::Idle {
                set_phase(&mut state, index, Phase::Idle);
                state.idle.push(index);
            }
            state = consumer
                .wake
                .wait(state)
                .unwrap_or_else(|poisoned| poisoned.into_inner());
        }
    }

    /// For a thread that runs fibers: blocks until a job is handed out (only
    /// when `take_jobs`; a thread with no room for another fiber leaves jobs
    /// in the queue), the consumer is [`nudge`](Self::nudge)d, `interrupted`
    /// is raised, or (when `take_jobs`) the queue is closed and empty. A
    /// nudge that came before the call ends it at once. While it waits
    /// taking jobs the thread counts as idle, as in [`pop`](Self::pop);
    /// otherwise as running (it has requests in flight).
    pub fn wait_for_event(
        &self,
        consumer: &Consumer<'_, T>,
        interrupted: &AtomicBool,
        take_jobs: bool,
    ) -> Event<T> {
        let index = consumer.index;
        let mut state = self.lock();
        let event = loop {
            if take_jobs {
                if let Some(job) = take_job(&mut state) {
                    break Event::Job(job);
                }
            }
            if std::mem::take(&mut state.slots[index].nudged) {
                break Event::Nudged;
            }
            if take_jobs && state.closed {
                break Event::Closed;
            }
            if interrupted.swap(false, Ordering::AcqRel) {
                break Event::Interrupted;
            }
            let phase = state.slots[index].phase;
            if take_jobs && phase != Phase::Idle {
                set_phase(&mut state, index, Phase::Idle);
                state.idle.push(index);
            } else if !take_jobs && !matches!(phase, Phase::Running { .. }) {
                let since = Instant::now();
                set_phase(&mut state, index, Phase::Running { since });
            }
            state.slots[index].waiting = true;
            state = consumer
                .wake
                .wait(state)
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            state.slots[index].waiting = false;
        };
        let phase = match event {
            Event::Job(_) | Event::Nudged => Phase::Running {
                since: Instant::now(),
            },
            Event::Interrupted | Event::Closed => Phase::Away,
        };
        set_phase(&mut state, index, phase);
        event
    }

    /// Wakes consumer `id` (a [`Consumer::id`]) from `wait_for_event`, or
    /// makes its next one return at once: a fiber of that thread is ready.
    /// Safe from any thread; cheap when the consumer is not waiting.
    pub fn nudge(&self, id: usize) {
        let mut state = self.lock();
        let Some(slot) = state.slots.get_mut(id).filter(|slot| slot.live) else {
            return;
        };
        slot.nudged = true;
        if slot.waiting {
            slot.wake.notify_one();
        }
    }

    /// Ends `consumer`'s wait on `flag`, now or as soon as it starts (the
    /// Ruby unblock function). Taking the lock before notifying closes the
    /// gap between the waiter's flag check and its sleep.
    pub fn interrupt(&self, consumer: &Consumer<'_, T>, flag: &AtomicBool) {
        flag.store(true, Ordering::Release);
        drop(self.lock());
        consumer.wake.notify_all();
    }

    /// Refuses new jobs; consumers exit once the queue is empty, and the
    /// watchdog ends.
    pub fn close(&self) {
        let mut state = self.lock();
        state.closed = true;
        for slot in &state.slots {
            slot.wake.notify_all();
        }
        state.watchdog_asleep = false;
        self.watchdog.notify_all();
    }

    /// Removes and returns every job still queued.
    pub fn drain(&self) -> Vec<T> {
        let mut state = self.lock();
        let jobs = state.jobs.drain(..).map(|(job, _)| job).collect();
        publish(&state);
        jobs
    }

    pub fn len(&self) -> usize {
        self.lock().jobs.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// How many jobs wait, and how many were taken so far.
    pub fn progress(&self) -> (usize, u64) {
        let state = self.lock();
        (state.jobs.len(), state.taken)
    }

    /// The watchdog (see the module docs): runs on a thread of its own until
    /// the dispatcher closes.
    pub fn watch(&self) {
        let mut state = self.lock();
        loop {
            if state.closed {
                return;
            }
            // Worth watching: jobs wait, threads run (or are about to), and
            // an idle thread could be added. A woken thread that has not
            // taken its job yet is waited for, tick by tick.
            let wanted =
                !state.jobs.is_empty() && state.running + state.woken > 0 && !state.idle.is_empty();
            if !wanted {
                state.watchdog_asleep = true;
                state = self
                    .watchdog
                    .wait(state)
                    .unwrap_or_else(|poisoned| poisoned.into_inner());
                continue;
            }
            drop(state);
            std::thread::sleep(self.policy.tick);
            state = self.lock();
            if self.should_add_thread(&mut state) && !state.jobs.is_empty() && state.woken == 0 {
                wake_idle(&mut state);
            }
        }
    }

    /// Samples the running threads; true when none of them uses the CPU, or
    /// all have been on their job for `long_job`.
    fn should_add_thread(&self, state: &mut State<T>) -> bool {
        let now = Instant::now();
        let mut running = 0;
        let mut blocked = 0;
        let mut long = 0;
        for slot in state.slots.iter_mut().filter(|s| s.live) {
            let Phase::Running { since } = slot.phase else {
                continue;
            };
            running += 1;
            if now.duration_since(since) >= self.policy.long_job {
                long += 1;
            }
            if self.looks_blocked(slot, now) {
                blocked += 1;
            }
        }
        running > 0 && (blocked == running || long == running)
    }

    /// Whether a running thread is blocked: it used less than `busy_share`
    /// of the CPU for two looks in a row and the kernel does not have it
    /// runnable. The /proc read is only paid for a thread that looks quiet.
    fn looks_blocked(&self, slot: &mut Slot, now: Instant) -> bool {
        let Some(clock) = slot.clock.as_ref() else {
            return false; // no clock: never taken for blocked
        };
        let Some(cpu) = clock.cpu_time() else {
            return false;
        };
        let Some(sample) = slot.sampled.replace(Sample {
            cpu,
            at: now,
            quiet: 0,
        }) else {
            return false; // first look: no delta yet
        };
        let wall = now.duration_since(sample.at).as_secs_f64();
        let used = cpu.saturating_sub(sample.cpu).as_secs_f64();
        if used >= wall * self.policy.busy_share {
            return false;
        }
        let quiet = sample.quiet + 1;
        if let Some(current) = slot.sampled.as_mut() {
            current.quiet = quiet;
        }
        quiet >= 2 && !clock.is_runnable()
    }
}

/// Takes the oldest job, counting it and its time in the queue.
fn take_job<T>(state: &mut State<T>) -> Option<T> {
    let (job, queued_at) = state.jobs.pop_front()?;
    state.taken += 1;
    state.stats.queue_wait.observe(queued_at.elapsed());
    Some(job)
}

/// Publishes the pool's gauges (see `crate::stats`): a few relaxed stores.
fn publish<T>(state: &State<T>) {
    state.stats.set_pool(
        state.live,
        state.running + state.woken,
        state.jobs.len(),
        state.taken,
    );
}

/// Wakes the idle consumer that went idle last.
fn wake_idle<T>(state: &mut State<T>) {
    if let Some(index) = state.idle.pop() {
        set_phase(state, index, Phase::Woken);
        state.slots[index].wake.notify_one();
    }
}

/// Moves a slot to `phase`, keeping the running/woken counts and the idle
/// stack in step.
fn set_phase<T>(state: &mut State<T>, index: usize, phase: Phase) {
    let old = state.slots[index].phase;
    match old {
        Phase::Running { .. } => state.running -= 1,
        Phase::Woken => state.woken -= 1,
        Phase::Idle => state.idle.retain(|&i| i != index),
        Phase::Away => {}
    }
    match phase {
        Phase::Running { .. } => state.running += 1,
        Phase::Woken => state.woken += 1,
        Phase::Idle | Phase::Away => {}
    }
    let slot = &mut state.slots[index];
    slot.phase = phase;
    if !matches!(phase, Phase::Running { .. }) {
        slot.sampled = None;
    }
    publish(state);
}

impl<T> Consumer<'_, T> {
    /// What [`Dispatcher::nudge`] takes to reach this consumer.
    pub fn id(&self) -> usize {
        self.index
    }
}

impl<T> Drop for Consumer<'_, T> {
    fn drop(&mut self) {
        let mut state = self.dispatcher.lock();
        set_phase(&mut state, self.index, Phase::Away);
        state.slots[self.index].live = false;
        state.live -= 1;
        publish(&state);
        // A job this consumer was woken for must not wait for it.
        if !state.jobs.is_empty() && state.running == 0 && state.woken == 0 {
            wake_idle(&mut state);
        }
    }
}

/// A thread's CPU clock and kernel id, to tell a thread that works from one
/// that waits.
struct ThreadClock {
    clock: nix::libc::clockid_t,
    tid: nix::libc::pid_t,
}

impl ThreadClock {
    fn of_current_thread() -> Option<Self> {
        let mut clock: nix::libc::clockid_t = 0;
        // SAFETY: pthread_self() is the calling thread, alive for this call;
        // `clock` is a valid out-pointer.
        let found =
            unsafe { nix::libc::pthread_getcpuclockid(nix::libc::pthread_self(), &mut clock) };
        // SAFETY: gettid has no preconditions.
        let tid = unsafe { nix::libc::gettid() };
        (found == 0).then_some(Self { clock, tid })
    }

    /// CPU time the thread has used; `None` once it is gone.
    fn cpu_time(&self) -> Option<Duration> {
        let mut now = nix::libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: `now` is a valid out-pointer; a clock of a thread that
        // ended makes the call fail (EINVAL), which is handled.
        let read = unsafe { nix::libc::clock_gettime(self.clock, &mut now) };
        (read == 0).then(|| Duration::new(now.tv_sec as u64, now.tv_nsec as u32))
    }

    /// Whether the kernel has the thread running or ready to run (as opposed
    /// to sleeping on I/O, a timer or a lock).
    fn is_runnable(&self) -> bool {
        let Ok(stat) = std::fs::read_to_string(format!("/proc/self/task/{}/stat", self.tid)) else {
            return false;
        };
        // "tid (comm) S ...": the state follows the last ')' (comm may hold any byte).
        stat.rsplit_once(')')
            .and_then(|(_, rest)| rest.trim_start().chars().next())
            .is_some_and(|state| state == 'R')
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;
    use std::thread;

    fn dispatcher<T>(max_pending: Option<usize>) -> Arc<Dispatcher<T>> {
        Arc::new(Dispatcher::new(max_pending, Policy::default()))
    }

    #[test]
    fn jobs_come_out_in_order_then_closed() {
        let queue = dispatcher(None);
        let consumer = queue.consumer();
        let flag = AtomicBool::new(false);
        queue.push(1).unwrap();
        queue.push(2).unwrap();
        queue.close();
        assert_eq!(queue.push(3), Err(PushError::Closed(3)));
        assert_eq!(queue.pop(&consumer, &flag), Pop::Job(1));
        assert_eq!(queue.try_pop(&consumer), Some(2));
        assert_eq!(queue.pop(&consumer, &flag), Pop::Closed);
    }

    #[test]
    fn max_pending_refuses_and_returns_the_job() {
        let queue = dispatcher(Some(1));
        let consumer = queue.consumer();
        queue.push("a").unwrap();
        assert_eq!(queue.push("b"), Err(PushError::Full("b")));
        assert_eq!(queue.try_pop(&consumer), Some("a"));
        queue.push("c").unwrap();
        assert_eq!(queue.progress(), (1, 1));
    }

    #[test]
    fn the_pool_gauges_and_queue_waits_are_published_to_the_stats_page() {
        let stats = Arc::new(StatsPage::new(false).unwrap());
        let queue = Dispatcher::with_stats(None, Policy::default(), stats.clone());
        let consumer = queue.consumer();
        queue.push(1).unwrap();
        queue.push(2).unwrap();
        let seen = stats.snapshot();
        assert_eq!(
            (
                seen.app_threads,
                seen.on_job,
                seen.backlog,
                seen.requests_taken
            ),
            (1, 1, 2, 0)
        );
        thread::sleep(Duration::from_millis(3));
        assert_eq!(queue.try_pop(&consumer), Some(1));
        let seen = stats.snapshot();
        assert_eq!((seen.backlog, seen.requests_taken), (1, 1));
        assert_eq!(seen.queue_wait.count, 1);
        assert!(seen.queue_wait.sum_micros >= 3_000, "{seen:?}");
        drop(consumer);
        assert_eq!(stats.snapshot().app_threads, 0);
        assert_eq!(queue.drain(), vec![2]);
        assert_eq!(stats.snapshot().backlog, 0);
    }

    #[test]
    fn interrupt_wakes_an_idle_consumer_and_is_not_lost_before_the_wait() {
        let queue = dispatcher::<u8>(None);
        let consumer = queue.consumer();
        let flag = AtomicBool::new(false);
        thread::scope(|scope| {
            let waiter = scope.spawn(|| queue.pop(&consumer, &flag));
            while queue.lock().idle.is_empty() {
                thread::sleep(Duration::from_millis(1));
            }
            // What Ruby's unblock function does, from another thread.
            queue.interrupt(&consumer, &flag);
            assert_eq!(waiter.join().unwrap(), Pop::Interrupted);
        });
        queue.interrupt(&consumer, &flag);
        assert_eq!(queue.pop(&consumer, &flag), Pop::Interrupted);
    }

    #[test]
    fn a_nudge_wakes_a_consumer_waiting_for_events_and_is_not_lost_before_the_wait() {
        let queue = dispatcher::<u8>(None);
        let consumer = queue.consumer();
        let id = consumer.id();
        let flag = AtomicBool::new(false);
        thread::scope(|scope| {
            let waiter = scope.spawn(|| queue.wait_for_event(&consumer, &flag, true));
            while !queue.lock().slots[id].waiting {
                thread::sleep(Duration::from_millis(1));
            }
            // A fiber's wait ended on an I/O thread.
            queue.nudge(id);
            assert_eq!(waiter.join().unwrap(), Event::Nudged);
        });
        queue.nudge(id);
        assert_eq!(queue.wait_for_event(&consumer, &flag, false), Event::Nudged);
        // Consumed: the next wait sleeps until something happens.
        queue.interrupt(&consumer, &flag);
        assert_eq!(
            queue.wait_for_event(&consumer, &flag, false),
            Event::Interrupted
        );
    }

    #[test]
    fn a_consumer_without_room_for_jobs_leaves_them_queued_and_is_not_told_of_the_close() {
        let queue = dispatcher(None);
        let busy = queue.consumer();
        let flag = AtomicBool::new(false);
        queue.push(1).unwrap();
        queue.close();
        thread::scope(|scope| {
            let waiter = scope.spawn(|| queue.wait_for_event(&busy, &flag, false));
            while !queue.lock().slots[busy.id()].waiting {
                thread::sleep(Duration::from_millis(1));
            }
            assert_eq!(queue.len(), 1);
            queue.nudge(busy.id());
            assert_eq!(waiter.join().unwrap(), Event::Nudged);
        });
        assert_eq!(queue.wait_for_event(&busy, &flag, true), Event::Job(1));
        assert_eq!(queue.wait_for_event(&busy, &flag, true), Event::Closed);
    }

    #[test]
    fn a_push_wakes_a_consumer_waiting_for_events() {
        let queue = dispatcher(None);
        let consumer = queue.consumer();
        let flag = AtomicBool::new(false);
        thread::scope(|scope| {
            let waiter = scope.spawn(|| queue.wait_for_event(&consumer, &flag, true));
            while queue.lock().idle.is_empty() {
                thread::sleep(Duration::from_millis(1));
            }
            queue.push(7).unwrap();
            assert_eq!(waiter.join().unwrap(), Event::Job(7));
        });
        assert_eq!(queue.progress(), (0, 1));
    }

    #[test]
    fn many_consumers_each_get_distinct_jobs() {
        let queue = dispatcher(None);
        let watchdog = {
            let queue = queue.clone();
            thread::spawn(move || queue.watch())
        };
        let consumers: Vec<_> = (0..4)
            .map(|_| {
                let queue = queue.clone();
                thread::spawn(move || {
                    let consumer = queue.consumer();
                    let flag = AtomicBool::new(false);
                    let mut got = Vec::new();
                    while let Pop::Job(n) = queue.pop(&consumer, &flag) {
                        got.push(n);
                    }
                    got
                })
            })
            .collect();
        for n in 0..1000 {
            queue.push(n).unwrap();
        }
        queue.close();
        let mut all: Vec<i32> = consumers
            .into_iter()
            .flat_map(|c| c.join().unwrap())
            .collect();
        all.sort_unstable();
        assert_eq!(all, (0..1000).collect::<Vec<_>>());
        watchdog.join().unwrap();
    }

    /// Runs `jobs` jobs through `threads` consumers, each job doing `work`;
    /// returns how many jobs each consumer ran.
    fn run_pool(threads: usize, jobs: usize, work: fn()) -> Vec<usize> {
        let queue = dispatcher::<()>(None);
        let watchdog = {
            let queue = queue.clone();
            thread::spawn(move || queue.watch())
        };
        let idle = Arc::new(AtomicUsize::new(0));
        let consumers: Vec<_> = (0..threads)
            .map(|_| {
                let (queue, idle) = (queue.clone(), idle.clone());
                thread::spawn(move || {
                    let consumer = queue.consumer();
                    let flag = AtomicBool::new(false);
                    let mut ran = 0;
                    idle.fetch_add(1, Ordering::AcqRel);
                    loop {
                        let job = match queue.try_pop(&consumer) {
                            Some(job) => Pop::Job(job),
                            None => queue.pop(&consumer, &flag),
                        };
                        match job {
                            Pop::Job(()) => {
                                work();
                                ran += 1;
                            }
                            _ => return ran,
                        }
                    }
                })
            })
            .collect();
        while idle.load(Ordering::Acquire) < threads || queue.lock().idle.len() < threads {
            thread::sleep(Duration::from_millis(1));
        }
        for _ in 0..jobs {
            queue.push(()).unwrap();
        }
        while !queue.is_empty() {
            thread::sleep(Duration::from_millis(1));
        }
        queue.close();
        let ran = consumers.into_iter().map(|c| c.join().unwrap()).collect();
        watchdog.join().unwrap();
        ran
    }

    fn spin_200us() {
        let start = Instant::now();
        while start.elapsed() < Duration::from_micros(200) {
            std::hint::spin_loop();
        }
    }

    fn sleep_20ms() {
        thread::sleep(Duration::from_millis(20));
    }

    #[test]
    fn cpu_bound_jobs_stay_on_one_hot_thread() {
        let ran = run_pool(4, 500, spin_200us);
        let hottest = *ran.iter().max().unwrap();
        assert_eq!(ran.iter().sum::<usize>(), 500);
        assert!(hottest >= 450, "jobs were spread across threads: {ran:?}");
    }

    #[test]
    fn blocked_threads_get_company() {
        let ran = run_pool(4, 40, sleep_20ms);
        assert_eq!(ran.iter().sum::<usize>(), 40);
        assert!(
            ran.iter().all(|&n| n > 0),
            "every thread should have been woken while the others slept: {ran:?}"
        );
    }
}
