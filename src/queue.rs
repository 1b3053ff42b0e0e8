//! The queue between the tokio side (producers) and the Ruby threads that run
//! the app (consumers). Work is queued per request, not per connection.

use std::collections::VecDeque;
use std::sync::atomic::AtomicBool;

use crate::wait::{WaitCell, Waited};

/// What a blocking pop ended with.
#[derive(Debug, PartialEq, Eq)]
pub enum Pop<T> {
    Job(T),
    /// The waiting thread was interrupted (Ruby wants it to run interrupts).
    Interrupted,
    /// The queue is closed and empty: the consumer should exit.
    Closed,
}

/// Why a push was refused; the job is handed back so it can be answered.
#[derive(Debug, PartialEq, Eq)]
pub enum PushError<T> {
    /// `max_pending` jobs are already waiting.
    Full(T),
    Closed(T),
}

struct State<T> {
    jobs: VecDeque<T>,
    closed: bool,
    /// Jobs handed to consumers so far (the worker's liveness check watches it).
    taken: u64,
}

impl<T> State<T> {
    fn take(&mut self) -> Option<T> {
        let job = self.jobs.pop_front()?;
        self.taken += 1;
        Some(job)
    }
}

pub struct JobQueue<T> {
    cell: WaitCell<State<T>>,
    max_pending: Option<usize>,
}

impl<T> JobQueue<T> {
    pub fn new(max_pending: Option<usize>) -> Self {
        Self {
            cell: WaitCell::new(State {
                jobs: VecDeque::new(),
                closed: false,
                taken: 0,
            }),
            max_pending,
        }
    }

    pub fn push(&self, job: T) -> Result<(), PushError<T>> {
        let mut state = self.cell.lock();
        if state.closed {
            return Err(PushError::Closed(job));
        }
        if self.max_pending.is_some_and(|max| state.jobs.len() >= max) {
            return Err(PushError::Full(job));
        }
        state.jobs.push_back(job);
        drop(state);
        self.cell.update(false, |_| ());
        Ok(())
    }

    /// Takes a job if one is waiting, without blocking.
    pub fn try_pop(&self) -> Option<T> {
        self.cell.lock().take()
    }

    /// Blocks until a job arrives, the queue closes, or `interrupted` is raised.
    /// Jobs still queued when the queue closes are handed out first.
    pub fn pop(&self, interrupted: &AtomicBool) -> Pop<T> {
        let waited = self.cell.wait_until(interrupted, |state| {
            state
                .take()
                .map(Pop::Job)
                .or_else(|| state.closed.then_some(Pop::Closed))
        });
        match waited {
            Waited::Ready(pop) => pop,
            Waited::Interrupted => Pop::Interrupted,
        }
    }

    /// Wakes the consumer waiting on `flag` (the Ruby unblock function).
    pub fn interrupt(&self, flag: &AtomicBool) {
        self.cell.interrupt(flag);
    }

    /// Refuses new jobs; consumers exit once the queue is empty.
    pub fn close(&self) {
        self.cell.update(true, |state| state.closed = true);
    }

    /// Removes and returns every job still queued.
    pub fn drain(&self) -> Vec<T> {
        self.cell.lock().jobs.drain(..).collect()
    }

    pub fn len(&self) -> usize {
        self.cell.lock().jobs.len()
    }

    /// How many jobs wait, and how many were taken so far.
    pub fn progress(&self) -> (usize, u64) {
        let state = self.cell.lock();
        (state.jobs.len(), state.taken)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::thread;

    #[test]
    fn jobs_come_out_in_order_then_closed() {
        let queue = JobQueue::new(None);
        let flag = AtomicBool::new(false);
        queue.push(1).unwrap();
        queue.push(2).unwrap();
        queue.close();
        assert_eq!(queue.push(3), Err(PushError::Closed(3)));
        assert_eq!(queue.pop(&flag), Pop::Job(1));
        assert_eq!(queue.pop(&flag), Pop::Job(2));
        assert_eq!(queue.pop(&flag), Pop::Closed);
    }

    #[test]
    fn max_pending_refuses_and_returns_the_job() {
        let queue = JobQueue::new(Some(1));
        queue.push("a").unwrap();
        assert_eq!(queue.push("b"), Err(PushError::Full("b")));
        assert_eq!(queue.try_pop(), Some("a"));
        queue.push("c").unwrap();
        assert_eq!(queue.progress(), (1, 1));
    }

    #[test]
    fn many_consumers_each_get_distinct_jobs() {
        let queue = Arc::new(JobQueue::new(None));
        let consumers: Vec<_> = (0..4)
            .map(|_| {
                let queue = queue.clone();
                thread::spawn(move || {
                    let flag = AtomicBool::new(false);
                    let mut got = Vec::new();
                    while let Pop::Job(n) = queue.pop(&flag) {
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
    }

    #[test]
    fn interrupt_wakes_an_idle_consumer() {
        let queue = Arc::new(JobQueue::<u8>::new(None));
        let flag = Arc::new(AtomicBool::new(false));
        let consumer = {
            let (queue, flag) = (queue.clone(), flag.clone());
            thread::spawn(move || queue.pop(&flag))
        };
        thread::sleep(std::time::Duration::from_millis(20));
        queue.interrupt(&flag);
        assert_eq!(consumer.join().unwrap(), Pop::Interrupted);
    }
}
