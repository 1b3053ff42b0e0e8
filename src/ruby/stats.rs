//! `Hyperion::StatsPage`: a worker's counters in a page shared with the
//! process that made it (`crate::stats`). The cluster master makes one per
//! worker before forking it, passes it as `Worker.new(stats:)`, and reads it
//! for `/stats` and `/metrics`: `#status` is Puma's per-worker
//! `last_status`, `#absorb` folds a dead worker's counters into a totals
//! page, `StatsPage.prometheus` renders the sum of several pages.

use std::sync::Arc;

use magnus::prelude::*;
use magnus::{function, method, Error, RArray, RHash, RModule, Ruby, Symbol};

use super::errors::hyperion_error;
use crate::fork_safe::ForkSafe;
use crate::metrics::{self, Processes};
use crate::stats::{Snapshot, StatsPage};

#[magnus::wrap(class = "Hyperion::StatsPage", free_immediately, size)]
pub(crate) struct RubyStatsPage(ForkSafe<Arc<StatsPage>>);

impl RubyStatsPage {
    /// A zeroed page shared with the processes forked after this call.
    fn new(ruby: &Ruby) -> Result<Self, Error> {
        let page = StatsPage::new(true)
            .map_err(|e| hyperion_error(ruby, format!("could not map a stats page: {e}")))?;
        Ok(Self(ForkSafe::new(Arc::new(page))))
    }

    pub(crate) fn page(&self) -> Arc<StatsPage> {
        Arc::clone(&self.0)
    }

    fn status(ruby: &Ruby, rb_self: &Self) -> Result<RHash, Error> {
        status_hash(ruby, &rb_self.0.snapshot())
    }

    /// Adds `other`'s counters (not its gauges) to this page's.
    fn absorb(&self, other: &RubyStatsPage) {
        self.0.absorb(&other.0.snapshot());
    }

    /// `StatsPage.prometheus(pages, workers, booted_workers, boots, restarts)`:
    /// the Prometheus text of every page summed.
    fn prometheus(
        pages: RArray,
        workers: u64,
        booted_workers: u64,
        boots: u64,
        restarts: u64,
    ) -> Result<String, Error> {
        let mut sum = Snapshot::default();
        for page in pages.into_iter() {
            let page = <&RubyStatsPage>::try_convert(page)?;
            sum.add(&page.0.snapshot());
        }
        let processes = Processes {
            workers,
            booted_workers,
            boots,
            restarts,
        };
        Ok(metrics::render(&sum, &processes))
    }
}

/// Puma's per-server stats, with symbol keys (Puma's `stats_hash`).
pub(crate) fn status_hash(ruby: &Ruby, snapshot: &Snapshot) -> Result<RHash, Error> {
    let hash = ruby.hash_new();
    for (key, value) in [
        ("backlog", snapshot.backlog),
        ("running", snapshot.app_threads),
        ("pool_capacity", snapshot.pool_capacity()),
        ("max_threads", snapshot.max_threads),
        ("requests_count", snapshot.requests_taken),
        ("busy_threads", snapshot.busy_threads()),
    ] {
        hash.aset(Symbol::new(key), value)?;
    }
    Ok(hash)
}

pub(crate) fn init(ruby: &Ruby, module: RModule) -> Result<(), Error> {
    let class = module.define_class("StatsPage", ruby.class_object())?;
    class.undef_default_alloc_func();
    class.define_singleton_method("new", function!(RubyStatsPage::new, 0))?;
    class.define_singleton_method("prometheus", function!(RubyStatsPage::prometheus, 5))?;
    class.define_method("status", method!(RubyStatsPage::status, 0))?;
    class.define_method("absorb", method!(RubyStatsPage::absorb, 1))?;
    Ok(())
}
