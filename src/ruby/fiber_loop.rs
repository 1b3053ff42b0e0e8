//! The app thread's loop in `async_io` mode: each request runs in a fiber of
//! its own under the thread's `FiberScheduler`, and this loop, on the
//! thread's root fiber, starts them and resumes the ones whose waits are
//! over. When there is nothing to run it waits without the GVL, in one place
//! (`Dispatcher::wait_for_event`), for either a new request or a nudge from
//! the reactor that a fiber is ready.
//!
//! A request is taken only with one of the worker's `max_fibers` slots;
//! without one, requests wait in the job queue (where `max_pending` answers
//! 503 as in thread mode). A fiber that computes for long is not preempted:
//! the others wait until it waits or ends.
//!
//! On a stop the loop takes what is still queued, runs every fiber to its
//! end, then returns. When the thread is killed (by `Thread#kill`, or at the
//! end of `graceful_timeout`) the fibers still waiting are resumed with
//! `Hyperion::FiberTerminated`, so each request is answered 500 and unwinds.

use std::sync::Arc;

use magnus::typed_data::Obj;
use magnus::{Error, Ruby};

use super::app_thread::AppContext;
use super::errors::{is_non_local_exit, log_exception};
use super::nogvl::wait_interruptibly;
use super::scheduler::FiberScheduler;
use crate::dispatch::{Consumer, Event};
use crate::fiber_reactor::{FiberReactor, FiberSlots};
use crate::request::Job;

/// New requests started per round before the ready fibers get their turn,
/// so a burst of arrivals does not starve requests already in flight.
const STARTS_PER_ROUND: usize = 64;

/// Serves jobs as fibers until the queue is closed and every fiber ended, or
/// until the thread is killed (the exit is returned).
pub(crate) fn serve(
    ruby: &Ruby,
    context: &Arc<AppContext>,
    slots: &Arc<FiberSlots>,
) -> Result<(), Error> {
    let consumer = context.shared.queue.consumer();
    let nudged = Arc::clone(&context.shared);
    let id = consumer.id();
    let reactor = FiberReactor::new(context.runtime.clone(), move || nudged.queue.nudge(id));
    let scheduler = FiberScheduler::install(
        ruby,
        Arc::clone(context),
        Arc::clone(slots),
        Arc::clone(&reactor),
    )?;
    let result = run(ruby, context, slots, &consumer, scheduler, &reactor);
    if scheduler.live() > 0 {
        scheduler.terminate_all(ruby);
    }
    let uninstalled = FiberScheduler::uninstall(ruby);
    result.and(uninstalled)
}

fn run(
    ruby: &Ruby,
    context: &AppContext,
    slots: &FiberSlots,
    consumer: &Consumer<'_, Job>,
    scheduler: Obj<FiberScheduler>,
    reactor: &FiberReactor,
) -> Result<(), Error> {
    let queue = &context.shared.queue;
    let mut closed = false;
    loop {
        let mut ran = false;
        for resume in reactor.take_ready() {
            ran = true;
            scheduler.resume(ruby, resume)?;
        }
        for _ in 0..STARTS_PER_ROUND {
            if !slots.try_take() {
                break;
            }
            let Some(job) = queue.try_pop(consumer) else {
                slots.give_back();
                break;
            };
            ran = true;
            FiberScheduler::start_request(ruby, scheduler, job)?;
        }
        if ran {
            continue;
        }
        if closed && scheduler.live() == 0 {
            return Ok(());
        }
        // Nothing to run. A slot is taken before waiting for a request, so
        // the request handed out has one.
        let room = !closed && slots.try_take();
        let idle = room.then(|| context.shared.health.idle_thread());
        let event = wait_interruptibly(
            |flag| match queue.wait_for_event(consumer, flag, room) {
                Event::Interrupted => None,
                event => Some(event),
            },
            |flag| queue.interrupt(consumer, flag),
        );
        drop(idle);
        match event {
            Ok(Event::Job(job)) => FiberScheduler::start_request(ruby, scheduler, job)?,
            other => {
                if room {
                    slots.give_back();
                }
                match other {
                    Ok(Event::Closed) => closed = true,
                    Ok(_) => {}
                    Err(e) if is_non_local_exit(&e) => return Err(e),
                    Err(e) => log_exception(
                        "an exception was raised into an idle app thread; it keeps serving",
                        &e,
                    ),
                }
            }
        }
    }
}
