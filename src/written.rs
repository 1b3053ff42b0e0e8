//! Tells a waiter when a response's last byte has been written, or that it
//! never will be (the client went away, the connection was aborted).
//!
//! `rack.after_reply` and `rack.response_finished` run after the response is
//! written. Most requests register neither, and their Ruby thread must not
//! wait for a slow client; so a notice is attached to a response only when
//! there are callbacks to run (see `ruby/callbacks.rs`). It rides in the
//! response's extensions to the side that writes it:
//!
//! - HTTP/1.1: once hyper has taken the body's last frame, the connection
//!   (`connection::Activity`) fires the notice at hyper's next flush of the
//!   socket, which hyper makes once its own write buffer is empty;
//! - HTTP/2: when the last DATA (or the trailers) is handed to h2, which
//!   writes it with the connection's next flush.
//!
//! Dropped unfired, it tells the waiter the response was not written.

use std::sync::{Arc, Mutex};

use tokio::sync::oneshot;

/// Whether a response was written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Written {
    /// The last byte went to the socket (HTTP/2: to the connection).
    Yes,
    /// The connection ended first.
    No,
}

/// The writing side's half. `Clone` because http's extensions require it;
/// the waiter learns `Written::No` once every clone is dropped unfired.
#[derive(Clone)]
pub struct WrittenNotice(Arc<Mutex<Option<oneshot::Sender<()>>>>);

impl std::fmt::Debug for WrittenNotice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("WrittenNotice")
    }
}

/// The waiter's half.
pub struct WrittenWait(oneshot::Receiver<()>);

/// A notice and its waiter.
pub fn channel() -> (WrittenNotice, WrittenWait) {
    let (sender, receiver) = oneshot::channel();
    (
        WrittenNotice(Arc::new(Mutex::new(Some(sender)))),
        WrittenWait(receiver),
    )
}

impl WrittenNotice {
    /// The response's last byte has been written.
    pub fn fire(&self) {
        let sender = self.0.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(sender) = sender {
            let _ = sender.send(());
        }
    }
}

impl WrittenWait {
    /// Resolves once the response was written or will never be.
    pub async fn wait(self) -> Written {
        match self.0.await {
            Ok(()) => Written::Yes,
            Err(_) => Written::No,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_fired_notice_says_written_and_a_dropped_one_says_not() {
        let (notice, wait) = channel();
        let copy = notice.clone();
        drop(notice);
        copy.fire();
        assert_eq!(wait.wait().await, Written::Yes);

        let (notice, wait) = channel();
        let copy = notice.clone();
        drop(notice);
        drop(copy);
        assert_eq!(wait.wait().await, Written::No);
    }
}
