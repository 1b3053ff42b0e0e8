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
//!
//! "Which process am I" is asked on every request (each request's hijack
//! object is dropped through here), so [`current_pid`] caches the answer
//! instead of making a getpid(2) system call each time (about 5% of an app
//! thread's time on hello); a fork handler forgets it in the child.

use std::mem::ManuallyDrop;
use std::ops::Deref;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Once;

/// The cached process id; 0 until read, and again in a fresh child.
static CACHED_PID: AtomicU32 = AtomicU32::new(0);

extern "C" fn forget_pid_in_child() {
    // Only an atomic store: async-signal-safe, as a fork handler must be.
    CACHED_PID.store(0, Ordering::Relaxed);
}

/// This process's id, as `std::process::id()`, without a system call once
/// known. Correct after `fork` (Ruby's `fork` and `Process.fork` call libc's
/// fork, which runs the handler registered here); a child made without
/// running fork handlers (vfork, `posix_spawn`) execs at once and never asks.
pub fn current_pid() -> u32 {
    static REGISTER: Once = Once::new();
    REGISTER.call_once(|| {
        // SAFETY: registers a handler that only stores into an atomic; the
        // function lives for the whole process. A failure (ENOMEM) leaves no
        // handler, and then the cache is not used at all (below).
        let registered =
            unsafe { nix::libc::pthread_atfork(None, None, Some(forget_pid_in_child)) } == 0;
        if !registered {
            CACHED_PID.store(u32::MAX, Ordering::Relaxed);
        }
    });
    match CACHED_PID.load(Ordering::Relaxed) {
        u32::MAX => std::process::id(),
        0 => {
            let pid = std::process::id();
            // Kept unless a fork handler ran meanwhile (it would be stale).
            let _ = CACHED_PID.compare_exchange(0, pid, Ordering::Relaxed, Ordering::Relaxed);
            pid
        }
        pid => pid,
    }
}

pub struct ForkSafe<T> {
    value: ManuallyDrop<T>,
    owner: u32,
}

impl<T> ForkSafe<T> {
    pub fn new(value: T) -> Self {
        Self {
            value: ManuallyDrop::new(value),
            owner: current_pid(),
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
        // Right even just after a fork (see `current_pid`).
        if current_pid() == self.owner {
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
    fn the_cached_pid_is_the_childs_own_after_a_fork() {
        assert_eq!(current_pid(), std::process::id()); // cached now
                                                       // SAFETY: the child only compares two process ids and calls _exit.
        let child = unsafe { libc::fork() };
        if child == 0 {
            let right = current_pid() == std::process::id();
            // SAFETY: ends the child at once, without running destructors.
            unsafe { libc::_exit(if right { 0 } else { 1 }) };
        }
        assert!(child > 0, "fork failed");
        let mut status = 0;
        // SAFETY: waits for our own child.
        assert_eq!(unsafe { libc::waitpid(child, &mut status, 0) }, child);
        assert!(libc::WIFEXITED(status));
        assert_eq!(
            libc::WEXITSTATUS(status),
            0,
            "the child saw its parent's pid"
        );
        assert_eq!(current_pid(), std::process::id());
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
