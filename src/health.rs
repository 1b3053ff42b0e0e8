//! Whether a worker still serves, for its heartbeat.
//!
//! The heartbeat is written by a Ruby thread beside the worker, so on its own
//! it only proves that Ruby runs. A worker whose tokio side is wedged, whose
//! accept loops ended, or whose app threads are all gone would still beat and
//! the master would never replace it. The heartbeat therefore asks
//! [`Health::check`] first, which looks at the paths a request takes:
//!
//! - the I/O runtime runs tasks: each check sends a ping task to it, and the
//!   next check (one heartbeat interval later) finds it answered;
//! - the accept loops still run (unless the worker is stopping);
//! - at least one app thread is alive;
//! - jobs do not sit in the queue while app threads idle: if requests wait,
//!   none was taken since the last check, and some app thread is waiting for
//!   work, dispatch is broken. Threads that are all busy inside the app (a
//!   slow request) are not a failure: that is what request timeouts are for.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

/// Why a check failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sickness {
    RuntimeUnresponsive,
    NotAccepting,
    NoAppThreads,
    QueueStalled,
}

impl std::fmt::Display for Sickness {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Sickness::RuntimeUnresponsive => {
                "the I/O runtime did not run a task within a heartbeat"
            }
            Sickness::NotAccepting => "the accept loops have ended",
            Sickness::NoAppThreads => "no app thread is alive",
            Sickness::QueueStalled => {
                "requests wait in the queue while app threads idle and none was taken"
            }
        })
    }
}

#[derive(Default)]
pub struct Health {
    app_threads: AtomicUsize,
    idle_threads: AtomicUsize,
    accept_loops: AtomicUsize,
    pings: AtomicU64,
    pongs: Arc<AtomicU64>,
    /// The queue's `taken` count at the previous check.
    last_taken: AtomicU64,
}

/// Counts something as running while it lives.
pub struct Running<'a>(&'a AtomicUsize);

impl Drop for Running<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

fn enter(counter: &AtomicUsize) -> Running<'_> {
    counter.fetch_add(1, Ordering::AcqRel);
    Running(counter)
}

impl Health {
    /// An app thread runs until the guard drops.
    pub fn app_thread(&self) -> Running<'_> {
        enter(&self.app_threads)
    }

    /// An app thread waits for a job until the guard drops.
    pub fn idle_thread(&self) -> Running<'_> {
        enter(&self.idle_threads)
    }

    /// An accept loop runs until the guard drops.
    pub fn accept_loop(&self) -> Running<'_> {
        enter(&self.accept_loops)
    }

    /// Checks the worker (see the module docs); `queued` and `taken` are the
    /// job queue's length and its count of jobs taken so far. Returns the task
    /// to run on the I/O runtime as the next ping; whoever calls this must
    /// spawn it there.
    pub fn check(
        &self,
        queued: usize,
        taken: u64,
        stopping: bool,
    ) -> (Result<(), Sickness>, impl FnOnce() + Send + 'static) {
        let pings = self.pings.fetch_add(1, Ordering::AcqRel);
        let answered = self.pongs.load(Ordering::Acquire) >= pings;
        let last_taken = self.last_taken.swap(taken, Ordering::AcqRel);
        let verdict = if !answered {
            Err(Sickness::RuntimeUnresponsive)
        } else if stopping {
            Ok(())
        } else if self.accept_loops.load(Ordering::Acquire) == 0 {
            Err(Sickness::NotAccepting)
        } else if self.app_threads.load(Ordering::Acquire) == 0 {
            Err(Sickness::NoAppThreads)
        } else if queued > 0 && taken == last_taken && self.idle_threads.load(Ordering::Acquire) > 0
        {
            Err(Sickness::QueueStalled)
        } else {
            Ok(())
        };
        let pongs = self.pongs.clone();
        (verdict, move || {
            pongs.fetch_add(1, Ordering::AcqRel);
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn serving(health: &Health) -> (Running<'_>, Running<'_>) {
        (health.accept_loop(), health.app_thread())
    }

    #[test]
    fn an_unanswered_ping_fails_the_next_check() {
        let health = Health::default();
        let _running = serving(&health);
        let (first, pong) = health.check(0, 0, false);
        assert_eq!(first, Ok(()));
        let (second, _lost_pong) = health.check(0, 0, false);
        assert_eq!(second, Err(Sickness::RuntimeUnresponsive));
        pong();
        let (third, _) = health.check(0, 0, false);
        assert_eq!(
            third,
            Err(Sickness::RuntimeUnresponsive),
            "the second ping is still unanswered"
        );
    }

    #[test]
    fn no_app_thread_or_no_accept_loop_is_sick_unless_stopping() {
        let health = Health::default();
        let accepting = health.accept_loop();
        let (verdict, pong) = health.check(0, 0, false);
        assert_eq!(verdict, Err(Sickness::NoAppThreads));
        pong();
        let (verdict, pong) = health.check(0, 0, true);
        assert_eq!(verdict, Ok(()));
        pong();
        drop(accepting);
        let _thread = health.app_thread();
        let (verdict, _) = health.check(0, 0, false);
        assert_eq!(verdict, Err(Sickness::NotAccepting));
    }

    #[test]
    fn a_queue_that_waits_beside_idle_threads_is_stalled_but_busy_threads_are_not() {
        let health = Health::default();
        let _running = serving(&health);
        let (verdict, pong) = health.check(3, 10, false);
        pong();
        assert_eq!(verdict, Ok(()), "progress since the start");
        let (verdict, pong) = health.check(3, 10, false);
        pong();
        assert_eq!(verdict, Ok(()), "every thread is busy in the app");
        let idle = health.idle_thread();
        let (verdict, pong) = health.check(3, 10, false);
        pong();
        assert_eq!(verdict, Err(Sickness::QueueStalled));
        let (verdict, pong) = health.check(3, 11, false);
        pong();
        assert_eq!(verdict, Ok(()), "a job was taken");
        drop(idle);
    }
}
