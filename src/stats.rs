//! A worker's counters and gauges, kept where another process can read them.
//!
//! Every number `Hyperion.stats`, the control listener's `/stats` and
//! `/metrics` report lives in one [`Counters`] block of plain atomics: the
//! tokio side counts responses, durations and connections; the dispatcher
//! keeps the pool's gauges (queued requests, threads on a job, live threads)
//! and the time jobs spent queued. Reading it takes no lock and no Ruby
//! thread, so a control request is answered while every app thread is busy.
//!
//! The block sits in its own memory mapping ([`StatsPage`]). In a cluster the
//! master maps one `MAP_SHARED` page per worker before it forks it: the
//! worker writes, the master reads the same memory at any time. That was
//! chosen over reporting through the heartbeat pipe because the numbers are
//! then live instead of up to a heartbeat old, a worker whose app threads
//! hold the GVL still reports (no Ruby runs to report), and the master can
//! still read a dead worker's last counters and fold them into its totals
//! ([`StatsPage::absorb`]), so aggregated counters do not drop when a worker
//! is replaced. Atomics on `MAP_SHARED` memory are atomic across processes;
//! the block holds no lock and no pointer, so a worker that dies mid-update
//! leaves nothing inconsistent behind.

use std::ptr::NonNull;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use nix::libc;

/// Upper bounds (seconds) of the histogram buckets, then +Inf. They span
/// sub-millisecond hello responses to slow requests of several seconds.
pub const BUCKET_BOUNDS: [f64; 14] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];
const BUCKET_MICROS: [u64; 14] = [
    500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 500_000, 1_000_000,
    2_500_000, 5_000_000, 10_000_000,
];
pub const BUCKETS: usize = BUCKET_BOUNDS.len() + 1;

/// Status classes counted apart: 1xx to 5xx, then anything from 600 on.
pub const STATUS_CLASSES: [&str; 6] = ["1xx", "2xx", "3xx", "4xx", "5xx", "other"];

/// Which HTTP a connection speaks, as the connection gauges count them.
pub const PROTOCOLS: [&str; 2] = ["http1", "http2"];

/// A histogram of durations, with non-cumulative buckets (rendering sums them).
#[repr(C)]
pub struct Histogram {
    buckets: [AtomicU64; BUCKETS],
    sum_micros: AtomicU64,
    count: AtomicU64,
}

impl Histogram {
    pub fn observe(&self, duration: Duration) {
        let micros = duration.as_micros().min(u128::from(u64::MAX)) as u64;
        let bucket = BUCKET_MICROS
            .iter()
            .position(|&bound| micros <= bound)
            .unwrap_or(BUCKETS - 1);
        self.buckets[bucket].fetch_add(1, Ordering::Relaxed);
        self.sum_micros.fetch_add(micros, Ordering::Relaxed);
        self.count.fetch_add(1, Ordering::Relaxed);
    }

    fn snapshot(&self) -> HistogramSnapshot {
        HistogramSnapshot {
            buckets: std::array::from_fn(|i| self.buckets[i].load(Ordering::Relaxed)),
            sum_micros: self.sum_micros.load(Ordering::Relaxed),
            count: self.count.load(Ordering::Relaxed),
        }
    }

    fn add(&self, other: &HistogramSnapshot) {
        for (bucket, n) in self.buckets.iter().zip(other.buckets) {
            bucket.fetch_add(n, Ordering::Relaxed);
        }
        self.sum_micros
            .fetch_add(other.sum_micros, Ordering::Relaxed);
        self.count.fetch_add(other.count, Ordering::Relaxed);
    }
}

/// What one worker counts. `#[repr(C)]`, atomics only, valid when zeroed:
/// it lives in a fresh anonymous mapping, which the kernel zero-fills.
#[repr(C)]
pub struct Counters {
    /// Unix milliseconds when the worker started serving (0: not yet).
    started_at_ms: AtomicU64,
    max_threads: AtomicU64,
    /// App threads alive (Puma's `running`).
    app_threads: AtomicU64,
    /// App threads on a job, or woken to take one.
    on_job: AtomicU64,
    /// Requests waiting for an app thread (Puma's `backlog`).
    backlog: AtomicU64,
    /// Requests handed to app threads so far (Puma's `requests_count`).
    requests_taken: AtomicU64,
    responses: [AtomicU64; STATUS_CLASSES.len()],
    /// From a request's head to the end of its response.
    pub duration: Histogram,
    /// From a request's queueing to an app thread taking it.
    pub queue_wait: Histogram,
    connections_open: [AtomicU64; PROTOCOLS.len()],
    connections_total: [AtomicU64; PROTOCOLS.len()],
    /// Responses whose body went out with sendfile(2) (`crate::sendfile`),
    /// and the body bytes it sent.
    sendfile_responses: AtomicU64,
    sendfile_bytes: AtomicU64,
}

impl Counters {
    pub fn serving_since(&self, at: SystemTime) {
        let ms = at
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_millis() as u64;
        self.started_at_ms.store(ms, Ordering::Relaxed);
    }

    pub fn set_max_threads(&self, n: usize) {
        self.max_threads.store(n as u64, Ordering::Relaxed);
    }

    /// The dispatcher's gauges, published whenever they change.
    pub fn set_pool(&self, app_threads: usize, on_job: usize, backlog: usize, taken: u64) {
        self.app_threads
            .store(app_threads as u64, Ordering::Relaxed);
        self.on_job.store(on_job as u64, Ordering::Relaxed);
        self.backlog.store(backlog as u64, Ordering::Relaxed);
        self.requests_taken.store(taken, Ordering::Relaxed);
    }

    /// A response is over (sent, or its client left): its status class and
    /// how long the exchange took.
    pub fn response_finished(&self, status: u16, took: Duration) {
        let class = match status {
            100..=599 => usize::from(status / 100 - 1),
            _ => STATUS_CLASSES.len() - 1,
        };
        self.responses[class].fetch_add(1, Ordering::Relaxed);
        self.duration.observe(took);
    }

    /// A response's body is going out with sendfile(2).
    pub fn sendfile_started(&self) {
        self.sendfile_responses.fetch_add(1, Ordering::Relaxed);
    }

    /// sendfile(2) sent `n` more body bytes.
    pub fn sendfile_sent(&self, n: usize) {
        self.sendfile_bytes.fetch_add(n as u64, Ordering::Relaxed);
    }

    /// Counts a connection of `protocol` (an index into [`PROTOCOLS`]) as
    /// open until the guard drops.
    pub fn connection_opened(&self, protocol: usize) -> OpenConnection<'_> {
        self.connections_open[protocol].fetch_add(1, Ordering::Relaxed);
        self.connections_total[protocol].fetch_add(1, Ordering::Relaxed);
        OpenConnection {
            counters: self,
            protocol,
        }
    }

    pub fn snapshot(&self) -> Snapshot {
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        Snapshot {
            started_at_ms: load(&self.started_at_ms),
            max_threads: load(&self.max_threads),
            app_threads: load(&self.app_threads),
            on_job: load(&self.on_job),
            backlog: load(&self.backlog),
            requests_taken: load(&self.requests_taken),
            responses: std::array::from_fn(|i| load(&self.responses[i])),
            duration: self.duration.snapshot(),
            queue_wait: self.queue_wait.snapshot(),
            connections_open: std::array::from_fn(|i| load(&self.connections_open[i])),
            connections_total: std::array::from_fn(|i| load(&self.connections_total[i])),
            sendfile_responses: load(&self.sendfile_responses),
            sendfile_bytes: load(&self.sendfile_bytes),
        }
    }
}

/// An open connection, counted until dropped.
pub struct OpenConnection<'a> {
    counters: &'a Counters,
    protocol: usize,
}

impl Drop for OpenConnection<'_> {
    fn drop(&mut self) {
        self.counters.connections_open[self.protocol].fetch_sub(1, Ordering::Relaxed);
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct HistogramSnapshot {
    pub buckets: [u64; BUCKETS],
    pub sum_micros: u64,
    pub count: u64,
}

impl HistogramSnapshot {
    fn add(&mut self, other: &HistogramSnapshot) {
        for (bucket, n) in self.buckets.iter_mut().zip(other.buckets) {
            *bucket += n;
        }
        self.sum_micros += other.sum_micros;
        self.count += other.count;
    }
}

/// The numbers of one worker (or the sum of several) at one moment.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Snapshot {
    pub started_at_ms: u64,
    pub max_threads: u64,
    pub app_threads: u64,
    pub on_job: u64,
    pub backlog: u64,
    pub requests_taken: u64,
    pub responses: [u64; STATUS_CLASSES.len()],
    pub duration: HistogramSnapshot,
    pub queue_wait: HistogramSnapshot,
    pub connections_open: [u64; PROTOCOLS.len()],
    pub connections_total: [u64; PROTOCOLS.len()],
    pub sendfile_responses: u64,
    pub sendfile_bytes: u64,
}

impl Snapshot {
    /// Puma's `busy_threads` (Puma 6): threads on a job plus requests waiting
    /// for one, at most `max_threads`.
    pub fn busy_threads(&self) -> u64 {
        (self.on_job + self.backlog).min(self.max_threads)
    }

    /// Puma's `pool_capacity`: requests that could start at once. Puma's
    /// pool never keeps requests queued beside idle threads; Hyperion's
    /// dispatcher may (it keeps one thread hot), so queued requests count
    /// against the capacity as they do in `busy_threads`.
    pub fn pool_capacity(&self) -> u64 {
        self.max_threads - self.busy_threads()
    }

    /// Adds another worker's numbers (counters and gauges alike).
    pub fn add(&mut self, other: &Snapshot) {
        self.max_threads += other.max_threads;
        self.app_threads += other.app_threads;
        self.on_job += other.on_job;
        self.backlog += other.backlog;
        self.add_counters(other);
        for (open, n) in self.connections_open.iter_mut().zip(other.connections_open) {
            *open += n;
        }
    }

    /// Adds only the monotonic counters (a worker that is gone has no gauges).
    pub fn add_counters(&mut self, other: &Snapshot) {
        self.requests_taken += other.requests_taken;
        for (n, m) in self.responses.iter_mut().zip(other.responses) {
            *n += m;
        }
        self.duration.add(&other.duration);
        self.queue_wait.add(&other.queue_wait);
        for (n, m) in self
            .connections_total
            .iter_mut()
            .zip(other.connections_total)
        {
            *n += m;
        }
        self.sendfile_responses += other.sendfile_responses;
        self.sendfile_bytes += other.sendfile_bytes;
    }

    /// Puma's single-mode `/stats` JSON (`started_at` first, then the
    /// server's numbers, then Puma 6's `busy_threads`).
    pub fn puma_json(&self) -> String {
        let started = UNIX_EPOCH + Duration::from_millis(self.started_at_ms);
        format!(
            "{{\"started_at\":\"{}\",\"backlog\":{},\"running\":{},\"pool_capacity\":{},\
             \"max_threads\":{},\"requests_count\":{},\"busy_threads\":{}}}",
            crate::utc_time::rfc3339(started, false),
            self.backlog,
            self.app_threads,
            self.pool_capacity(),
            self.max_threads,
            self.requests_taken,
            self.busy_threads()
        )
    }
}

/// A [`Counters`] block in a mapping of its own: private to this process, or
/// shared with the processes it forks afterwards.
pub struct StatsPage {
    counters: NonNull<Counters>,
}

// SAFETY: the mapping is owned by the page and lives until it drops; all
// access goes through atomics.
unsafe impl Send for StatsPage {}
// SAFETY: as above: shared references only ever touch atomics.
unsafe impl Sync for StatsPage {}

const PAGE_BYTES: usize = std::mem::size_of::<Counters>();

impl StatsPage {
    /// A zeroed page; `shared`: visible to (and written by) processes forked
    /// after this call.
    pub fn new(shared: bool) -> std::io::Result<Self> {
        let visibility = if shared {
            libc::MAP_SHARED
        } else {
            libc::MAP_PRIVATE
        };
        // SAFETY: an anonymous mapping of PAGE_BYTES with no address hint
        // touches no existing memory; the result is checked below.
        let address = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                PAGE_BYTES,
                libc::PROT_READ | libc::PROT_WRITE,
                visibility | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if address == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        // mmap returns page-aligned memory, which satisfies Counters'
        // alignment; anonymous mappings are zero-filled, and zeroed atomics
        // are valid values.
        let counters = NonNull::new(address.cast::<Counters>())
            .ok_or_else(|| std::io::Error::other("mmap returned null"))?;
        Ok(Self { counters })
    }

    /// Adds `other`'s monotonic counters to this page's (the master folding
    /// a dead worker's totals into its own).
    pub fn absorb(&self, other: &Snapshot) {
        self.requests_taken
            .fetch_add(other.requests_taken, Ordering::Relaxed);
        for (n, m) in self.responses.iter().zip(other.responses) {
            n.fetch_add(m, Ordering::Relaxed);
        }
        self.duration.add(&other.duration);
        self.queue_wait.add(&other.queue_wait);
        for (n, m) in self.connections_total.iter().zip(other.connections_total) {
            n.fetch_add(m, Ordering::Relaxed);
        }
        self.sendfile_responses
            .fetch_add(other.sendfile_responses, Ordering::Relaxed);
        self.sendfile_bytes
            .fetch_add(other.sendfile_bytes, Ordering::Relaxed);
    }
}

impl std::ops::Deref for StatsPage {
    type Target = Counters;

    fn deref(&self) -> &Counters {
        // SAFETY: the mapping is valid, aligned and initialised (zeroed)
        // for as long as `self` lives; Counters is only atomics.
        unsafe { self.counters.as_ref() }
    }
}

impl Drop for StatsPage {
    fn drop(&mut self) {
        // SAFETY: the mapping was made by `new` with PAGE_BYTES and is
        // unmapped once, here; no reference into it outlives `self`.
        unsafe { libc::munmap(self.counters.as_ptr().cast(), PAGE_BYTES) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_upper_bounds() {
        let page = StatsPage::new(false).unwrap();
        page.duration.observe(Duration::from_micros(500));
        page.duration.observe(Duration::from_micros(501));
        page.duration.observe(Duration::from_secs(60));
        let snapshot = page.snapshot().duration;
        assert_eq!(snapshot.buckets[0], 1, "0.5 ms is within le=0.0005");
        assert_eq!(snapshot.buckets[1], 1);
        assert_eq!(snapshot.buckets[BUCKETS - 1], 1, "beyond 10 s is +Inf");
        assert_eq!(snapshot.count, 3);
        assert_eq!(snapshot.sum_micros, 60_001_001);
    }

    #[test]
    fn statuses_count_by_class_and_connections_while_open() {
        let page = StatsPage::new(false).unwrap();
        for status in [200, 204, 404, 499, 503, 103, 700] {
            page.response_finished(status, Duration::ZERO);
        }
        {
            let _h1 = page.connection_opened(0);
            let _h2 = page.connection_opened(1);
            let open = page.snapshot();
            assert_eq!(open.connections_open, [1, 1]);
        }
        let done = page.snapshot();
        assert_eq!(done.responses, [1, 2, 0, 2, 1, 1]);
        assert_eq!(done.connections_open, [0, 0]);
        assert_eq!(done.connections_total, [1, 1]);
    }

    #[test]
    fn puma_shape_follows_pumas_definitions() {
        let page = StatsPage::new(false).unwrap();
        page.set_max_threads(5);
        page.set_pool(5, 2, 1, 42);
        page.serving_since(UNIX_EPOCH + Duration::from_secs(1_700_000_000));
        let snapshot = page.snapshot();
        assert_eq!(snapshot.busy_threads(), 3);
        assert_eq!(snapshot.pool_capacity(), 2);
        assert_eq!(
            snapshot.puma_json(),
            "{\"started_at\":\"2023-11-14T22:13:20Z\",\"backlog\":1,\"running\":5,\
             \"pool_capacity\":2,\"max_threads\":5,\"requests_count\":42,\"busy_threads\":3}"
        );
        page.set_pool(5, 5, 9, 42);
        assert_eq!(page.snapshot().busy_threads(), 5, "at most max_threads");
        assert_eq!(page.snapshot().pool_capacity(), 0);
    }

    #[test]
    fn absorb_adds_counters_but_not_gauges() {
        let dead = StatsPage::new(false).unwrap();
        dead.set_max_threads(5);
        dead.set_pool(5, 1, 3, 10);
        dead.response_finished(200, Duration::from_millis(1));
        let _open = dead.connection_opened(0);
        dead.sendfile_started();
        dead.sendfile_sent(1000);
        let totals = StatsPage::new(false).unwrap();
        totals.absorb(&dead.snapshot());
        totals.absorb(&dead.snapshot());
        let sum = totals.snapshot();
        assert_eq!(sum.requests_taken, 20);
        assert_eq!(sum.responses[1], 2);
        assert_eq!(sum.duration.count, 2);
        assert_eq!(sum.connections_total[0], 2);
        assert_eq!((sum.sendfile_responses, sum.sendfile_bytes), (2, 2000));
        let mut added = Snapshot::default();
        added.add(&dead.snapshot());
        added.add_counters(&dead.snapshot());
        assert_eq!((added.sendfile_responses, added.sendfile_bytes), (2, 2000));
        assert_eq!(
            (sum.backlog, sum.connections_open[0], sum.max_threads),
            (0, 0, 0)
        );
    }

    /// The point of the shared page: a forked child's writes are what the
    /// parent reads, also after the child has exited.
    #[test]
    fn a_shared_page_carries_a_forked_childs_counts_to_the_parent() {
        let page = StatsPage::new(true).unwrap();
        // SAFETY: the child only touches atomics in the mapping and leaves
        // with _exit, running no destructor or atexit handler of the test
        // harness (whose other threads do not exist in the child).
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0, "fork failed");
        if pid == 0 {
            page.response_finished(201, Duration::from_millis(3));
            page.set_pool(4, 1, 0, 7);
            // SAFETY: see above.
            unsafe { libc::_exit(0) };
        }
        let mut status = 0;
        // SAFETY: waits for the child forked above; `status` is a valid out-pointer.
        assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
        let seen = page.snapshot();
        assert_eq!(seen.responses[1], 1);
        assert_eq!((seen.app_threads, seen.requests_taken), (4, 7));

        let private = StatsPage::new(false).unwrap();
        // SAFETY: as above.
        let pid = unsafe { libc::fork() };
        if pid == 0 {
            private.response_finished(201, Duration::ZERO);
            // SAFETY: as above.
            unsafe { libc::_exit(0) };
        }
        // SAFETY: as above.
        unsafe { libc::waitpid(pid, &mut status, 0) };
        assert_eq!(
            private.snapshot().responses[1],
            0,
            "a private page is not shared"
        );
    }
}
