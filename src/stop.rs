//! The stop request shared by `Worker#stop`, signal traps and the server.
//! It remembers when the stop began, so every step of the drain (connections,
//! app threads) shares one deadline instead of each getting the full
//! `graceful_timeout` in turn.

use std::sync::OnceLock;
use std::time::{Duration, Instant};

use tokio::sync::watch;

pub struct StopSignal {
    watch: watch::Sender<bool>,
    began: OnceLock<Instant>,
}

impl Default for StopSignal {
    fn default() -> Self {
        Self {
            watch: watch::Sender::new(false),
            began: OnceLock::new(),
        }
    }
}

impl StopSignal {
    /// Requests a stop. Idempotent; safe from any thread.
    pub fn stop(&self) {
        self.began.get_or_init(Instant::now);
        self.watch.send_replace(true);
    }

    pub fn is_stopped(&self) -> bool {
        *self.watch.borrow()
    }

    /// When the whole stop must be over: `grace` after the first `stop`
    /// (or after now, if no stop was requested yet).
    pub fn deadline(&self, grace: Duration) -> Instant {
        *self.began.get().unwrap_or(&Instant::now()) + grace
    }

    /// For async code: resolves once a stop has been requested.
    pub async fn stopped(&self) {
        let mut receiver = self.watch.subscribe();
        // An error means the sender is gone, which cannot happen while `self`
        // lives; treat it as a stop either way.
        let _ = receiver.wait_for(|stopped| *stopped).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_deadline_counts_from_the_first_stop() {
        let signal = StopSignal::default();
        signal.stop();
        let first = signal.deadline(Duration::from_secs(5));
        std::thread::sleep(Duration::from_millis(20));
        signal.stop();
        assert_eq!(signal.deadline(Duration::from_secs(5)), first);
        assert!(signal.is_stopped());
    }
}
