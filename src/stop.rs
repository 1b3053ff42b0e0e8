//! The stop request shared by `Worker#stop`, signal traps and the server.

use tokio::sync::watch;

pub struct StopSignal {
    watch: watch::Sender<bool>,
}

impl Default for StopSignal {
    fn default() -> Self {
        Self {
            watch: watch::Sender::new(false),
        }
    }
}

impl StopSignal {
    /// Requests a stop. Idempotent; safe from any thread.
    pub fn stop(&self) {
        self.watch.send_replace(true);
    }

    pub fn is_stopped(&self) -> bool {
        *self.watch.borrow()
    }

    /// For async code: resolves once a stop has been requested.
    pub async fn stopped(&self) {
        let mut receiver = self.watch.subscribe();
        // An error means the sender is gone, which cannot happen while `self`
        // lives; treat it as a stop either way.
        let _ = receiver.wait_for(|stopped| *stopped).await;
    }
}
