//! A condition variable whose waits can be cut short from another thread.
//!
//! Ruby threads wait here with the GVL released. Ruby interrupts such a wait
//! (signal trap, `Thread#kill`, process exit) by calling an "unblock function"
//! from another thread; that function calls [`WaitCell::interrupt`] with the
//! waiter's flag, and the waiter returns [`Waited::Interrupted`] at once.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard};

/// Result of a wait that may be interrupted.
#[derive(Debug, PartialEq, Eq)]
pub enum Waited<T> {
    Ready(T),
    Interrupted,
}

/// State guarded by a mutex, with a condvar signalled on every update.
pub struct WaitCell<S> {
    state: Mutex<S>,
    changed: Condvar,
}

impl<S> WaitCell<S> {
    pub fn new(state: S) -> Self {
        Self {
            state: Mutex::new(state),
            changed: Condvar::new(),
        }
    }

    /// Locks the state. A poisoned lock is recovered: the guarded states are
    /// plain data that a panicking holder cannot leave half-updated.
    pub fn lock(&self) -> MutexGuard<'_, S> {
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Runs `update` under the lock, then wakes one waiter or all of them.
    pub fn update<R>(&self, wake_all: bool, update: impl FnOnce(&mut S) -> R) -> R {
        let result = update(&mut self.lock());
        if wake_all {
            self.changed.notify_all();
        } else {
            self.changed.notify_one();
        }
        result
    }

    /// Blocks until `ready` returns `Some` or `interrupted` is raised. The flag
    /// is consumed (reset) when it ends the wait.
    pub fn wait_until<R>(
        &self,
        interrupted: &AtomicBool,
        mut ready: impl FnMut(&mut S) -> Option<R>,
    ) -> Waited<R> {
        let mut state = self.lock();
        loop {
            if let Some(value) = ready(&mut state) {
                return Waited::Ready(value);
            }
            if interrupted.swap(false, Ordering::AcqRel) {
                return Waited::Interrupted;
            }
            state = self
                .changed
                .wait(state)
                .unwrap_or_else(|poisoned| poisoned.into_inner());
        }
    }

    /// Ends a wait on `flag`, now or as soon as it starts. Taking the lock
    /// before notifying closes the gap between a waiter's flag check and its
    /// sleep, so the wake-up cannot be lost.
    pub fn interrupt(&self, flag: &AtomicBool) {
        flag.store(true, Ordering::Release);
        drop(self.lock());
        self.changed.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::thread;
    use std::time::Duration;

    #[test]
    fn interrupt_ends_a_wait_that_would_never_be_ready() {
        let cell = Arc::new(WaitCell::new(()));
        let flag = Arc::new(AtomicBool::new(false));
        let waiter = {
            let (cell, flag) = (cell.clone(), flag.clone());
            thread::spawn(move || cell.wait_until(&flag, |_| None::<()>))
        };
        thread::sleep(Duration::from_millis(20));
        cell.interrupt(&flag);
        assert_eq!(waiter.join().unwrap(), Waited::Interrupted);
        assert!(!flag.load(Ordering::Acquire), "flag is consumed");
    }

    #[test]
    fn interrupt_before_the_wait_is_not_lost() {
        let cell = WaitCell::new(());
        let flag = AtomicBool::new(false);
        cell.interrupt(&flag);
        assert_eq!(cell.wait_until(&flag, |_| None::<()>), Waited::Interrupted);
    }

    #[test]
    fn update_wakes_a_waiter() {
        let cell = Arc::new(WaitCell::new(0u32));
        let waiter = {
            let cell = cell.clone();
            thread::spawn(move || {
                let flag = AtomicBool::new(false);
                cell.wait_until(&flag, |n| (*n > 0).then_some(*n))
            })
        };
        thread::sleep(Duration::from_millis(20));
        cell.update(false, |n| *n = 7);
        assert_eq!(waiter.join().unwrap(), Waited::Ready(7));
    }
}
