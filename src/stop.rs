//! The stop request shared by `Worker#stop`, signal traps and the server.

use std::sync::atomic::AtomicBool;

use tokio::sync::watch;

use crate::wait::{WaitCell, Waited};

pub struct StopSignal {
    stopped: WaitCell<bool>,
    watch: watch::Sender<bool>,
}

impl Default for StopSignal {
    fn default() -> Self {
        Self {
            stopped: WaitCell::new(false),
            watch: watch::Sender::new(false),
        }
    }
}

impl StopSignal {
    /// Requests a stop. Idempotent; safe from any thread.
    pub fn stop(&self) {
        self.stopped.update(true, |stopped| *stopped = true);
        self.watch.send_replace(true);
    }

    pub fn is_stopped(&self) -> bool {
        *self.stopped.lock()
    }

    /// Blocks until stopped (`Ready`) or until `interrupted` is raised.
    pub fn wait(&self, interrupted: &AtomicBool) -> Waited<()> {
        self.stopped
            .wait_until(interrupted, |stopped| stopped.then_some(()))
    }

    pub fn interrupt(&self, flag: &AtomicBool) {
        self.stopped.interrupt(flag);
    }

    /// For async code: resolves once a stop has been requested.
    pub async fn stopped(&self) {
        let mut receiver = self.watch.subscribe();
        // An error means the sender is gone, which cannot happen while `self`
        // lives; treat it as a stop either way.
        let _ = receiver.wait_for(|stopped| *stopped).await;
    }
}
