//! Values that a forked child must never drop.
//!
//! `fork` copies only the calling thread. A lock that any other thread held
//! at that moment (tokio's scheduler, a channel's waker list, stderr's) stays
//! locked forever in the child. Ruby frees every wrapped Rust object when a
//! process exits, so an app that forks inside a request — the child runs its
//! block and exits — would drop Hyperion's objects there and could block
//! forever on such a lock, or wake tasks of a runtime that has no threads.
//!
//! A [`ForkSafe`] drops its value only in the process that created it; in any
//! other process it leaks it, which is right for a child that is about to
//! exit (or `exec`) and owns none of that state's threads.

use std::mem::ManuallyDrop;
use std::ops::Deref;

pub struct ForkSafe<T> {
    value: ManuallyDrop<T>,
    owner: u32,
}

impl<T> ForkSafe<T> {
    pub fn new(value: T) -> Self {
        Self {
            value: ManuallyDrop::new(value),
            owner: std::process::id(),
        }
    }
}

impl<T> Deref for ForkSafe<T> {
    type Target = T;

    fn deref(&self) -> &T {
        &self.value
    }
}

impl<T> Drop for ForkSafe<T> {
    fn drop(&mut self) {
        // getpid(2) is not cached by glibc (since 2.25), so this is the
        // current process even right after a fork.
        if std::process::id() == self.owner {
            // SAFETY: `value` is dropped exactly once, here, and never used
            // again: `self` is being dropped.
            unsafe { ManuallyDrop::drop(&mut self.value) };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nix::libc;
    use std::sync::{Arc, Mutex};
    use std::time::{Duration, Instant};

    /// Takes the lock when dropped, as a tokio waker or channel would.
    struct LocksOnDrop(Arc<Mutex<()>>);

    impl Drop for LocksOnDrop {
        fn drop(&mut self) {
            drop(self.0.lock());
        }
    }

    #[test]
    fn a_forked_child_does_not_drop_the_value_so_a_lock_held_by_a_lost_thread_cannot_block_it() {
        let lock = Arc::new(Mutex::new(()));
        let guarded = ForkSafe::new(LocksOnDrop(lock.clone()));
        let (held_tx, held_rx) = std::sync::mpsc::channel();
        let (release_tx, release_rx) = std::sync::mpsc::channel::<()>();
        let holder = {
            let lock = lock.clone();
            std::thread::spawn(move || {
                let _held = lock.lock().unwrap();
                held_tx.send(()).unwrap();
                let _ = release_rx.recv();
            })
        };
        held_rx.recv().unwrap();
        // SAFETY: the child only drops the guard (a getpid and a compare) and
        // calls _exit; it touches no lock or allocator state.
        let child = unsafe { libc::fork() };
        if child == 0 {
            drop(guarded);
            // SAFETY: ends the child at once, without running any destructor
            // or atexit handler of the test harness.
            unsafe { libc::_exit(0) };
        }
        assert!(child > 0, "fork failed");
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut status = 0;
        let exited = loop {
            // SAFETY: waits for our own child, without blocking.
            let done = unsafe { libc::waitpid(child, &mut status, libc::WNOHANG) };
            if done == child {
                break true;
            }
            if Instant::now() > deadline {
                // SAFETY: kills and reaps the child this test forked.
                unsafe {
                    libc::kill(child, libc::SIGKILL);
                    libc::waitpid(child, &mut status, 0);
                }
                break false;
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        release_tx.send(()).unwrap();
        holder.join().unwrap();
        assert!(
            exited,
            "the child blocked on a lock its parent's thread held"
        );
        drop(guarded); // the owner drops it normally
    }
}
