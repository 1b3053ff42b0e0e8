//! Control requests that need Ruby (`/restart`, `/stop`, `/gc-stats`...),
//! queued for the worker's control thread: a Ruby thread of its own, not an
//! app thread, which waits here without the GVL. The tokio side queues a
//! [`Command`] and awaits its [`Reply`]; a reply may ask to be told when its
//! response has been written, so a command that ends the process (`/halt`)
//! acts only once its answer is on its way.

use std::collections::VecDeque;
use std::sync::atomic::AtomicBool;

use tokio::sync::oneshot;

use super::route::Endpoint;
use crate::wait::{WaitCell, Waited};

/// Commands waiting beyond this are refused (503): the control thread is
/// busy or stuck, and queueing more would only make callers wait longer.
const MAX_QUEUED: usize = 16;

pub struct Command {
    pub endpoint: Endpoint,
    pub reply: oneshot::Sender<Reply>,
}

pub struct Reply {
    pub status: u16,
    pub content_type: String,
    pub body: Vec<u8>,
    /// Signalled once the response has been written and its connection
    /// closed.
    pub written: Option<std::sync::mpsc::SyncSender<()>>,
}

#[derive(Default)]
struct Queue {
    commands: VecDeque<Command>,
    closed: bool,
}

pub struct CommandQueue {
    cell: WaitCell<Queue>,
}

impl Default for CommandQueue {
    fn default() -> Self {
        Self {
            cell: WaitCell::new(Queue::default()),
        }
    }
}

impl CommandQueue {
    /// Queues a command; hands it back when the queue is closed or full.
    pub fn push(&self, command: Command) -> Result<(), Command> {
        self.cell.update(false, |queue| {
            if queue.closed || queue.commands.len() >= MAX_QUEUED {
                return Err(command);
            }
            queue.commands.push_back(command);
            Ok(())
        })
    }

    /// The next command; `None` once the queue is closed. Interrupted by
    /// `interrupt` with the same flag (Ruby's unblock function).
    pub fn next(&self, interrupted: &AtomicBool) -> Waited<Option<Command>> {
        self.cell.wait_until(interrupted, |queue| {
            if let Some(command) = queue.commands.pop_front() {
                Some(Some(command))
            } else if queue.closed {
                Some(None)
            } else {
                None
            }
        })
    }

    pub fn interrupt(&self, flag: &AtomicBool) {
        self.cell.interrupt(flag);
    }

    /// Ends the control thread's loop; queued commands are dropped, which
    /// answers their requests with 503.
    pub fn close(&self) {
        self.cell.update(true, |queue| {
            queue.closed = true;
            queue.commands.clear();
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn command() -> (Command, oneshot::Receiver<Reply>) {
        let (reply, answer) = oneshot::channel();
        let command = Command {
            endpoint: Endpoint::GcStats,
            reply,
        };
        (command, answer)
    }

    #[test]
    fn a_waiting_thread_takes_commands_until_the_queue_closes() {
        let queue = Arc::new(CommandQueue::default());
        let taker = {
            let queue = queue.clone();
            std::thread::spawn(move || {
                let flag = AtomicBool::new(false);
                let mut taken = Vec::new();
                while let Waited::Ready(Some(command)) = queue.next(&flag) {
                    taken.push(command.endpoint);
                    let _ = command.reply.send(Reply {
                        status: 200,
                        content_type: "application/json".into(),
                        body: b"{}".to_vec(),
                        written: None,
                    });
                }
                taken
            })
        };
        let (first, answer) = command();
        assert!(queue.push(first).is_ok());
        assert_eq!(answer.blocking_recv().unwrap().status, 200);
        queue.close();
        assert_eq!(taker.join().unwrap(), vec![Endpoint::GcStats]);
        assert!(queue.push(command().0).is_err(), "closed");
    }

    #[test]
    fn a_full_queue_refuses_and_dropped_commands_close_their_reply() {
        let queue = CommandQueue::default();
        let mut answers = Vec::new();
        for _ in 0..MAX_QUEUED {
            let (c, answer) = command();
            assert!(queue.push(c).is_ok());
            answers.push(answer);
        }
        assert!(queue.push(command().0).is_err());
        queue.close();
        assert!(answers.pop().unwrap().blocking_recv().is_err());
    }

    #[test]
    fn interrupt_ends_the_wait() {
        let queue = CommandQueue::default();
        let flag = AtomicBool::new(false);
        queue.interrupt(&flag);
        assert!(matches!(queue.next(&flag), Waited::Interrupted));
    }
}
