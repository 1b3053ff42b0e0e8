//! `/metrics`: the Prometheus text exposition format (version 0.0.4) of a
//! worker's stats, or of a cluster's summed over its workers. The single
//! worker's control listener renders its own page; the cluster master sums
//! every worker's page (and the totals of workers that are gone) and renders
//! the sum with the same function. docs/deployment.md lists the metrics.

use std::fmt::Write;

use crate::stats::{HistogramSnapshot, Snapshot, BUCKET_BOUNDS, PROTOCOLS, STATUS_CLASSES};

/// The `Content-Type` of the exposition.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// What the process model adds to the workers' own numbers.
#[derive(Debug, Clone, Copy, Default)]
pub struct Processes {
    /// Worker processes now (1 for a single process).
    pub workers: u64,
    pub booted_workers: u64,
    /// Workers that came up serving, since the server started.
    pub boots: u64,
    /// Workers started in place of another (crashed, killed for a missed
    /// heartbeat, recycled for memory, replaced by a phased restart).
    pub restarts: u64,
}

pub fn render(stats: &Snapshot, processes: &Processes) -> String {
    let mut out = String::with_capacity(4096);
    family(
        &mut out,
        "hyperion_requests_total",
        "counter",
        "Responses finished, by status class (499: the client left before the response).",
    );
    for (class, count) in STATUS_CLASSES.iter().zip(stats.responses) {
        if *class != "other" || count > 0 {
            let _ = writeln!(
                out,
                "hyperion_requests_total{{status_class=\"{class}\"}} {count}"
            );
        }
    }
    histogram(
        &mut out,
        "hyperion_request_duration_seconds",
        "Time from a request's head to the end of its response.",
        &stats.duration,
    );
    gauge(
        &mut out,
        "hyperion_queue_depth",
        "Requests waiting for an app thread.",
        stats.backlog,
    );
    histogram(
        &mut out,
        "hyperion_queue_wait_seconds",
        "Time requests spent queued before an app thread took them.",
        &stats.queue_wait,
    );
    gauge(
        &mut out,
        "hyperion_busy_threads",
        "App threads on a request, plus requests waiting for one (Puma's busy_threads).",
        stats.busy_threads(),
    );
    gauge(
        &mut out,
        "hyperion_app_threads",
        "App threads alive.",
        stats.app_threads,
    );
    gauge(
        &mut out,
        "hyperion_max_threads",
        "App threads configured.",
        stats.max_threads,
    );
    family(
        &mut out,
        "hyperion_connections_open",
        "gauge",
        "Client connections open, by protocol (an HTTP/2 connection is one).",
    );
    for (protocol, open) in PROTOCOLS.iter().zip(stats.connections_open) {
        let _ = writeln!(
            out,
            "hyperion_connections_open{{protocol=\"{protocol}\"}} {open}"
        );
    }
    family(
        &mut out,
        "hyperion_connections_total",
        "counter",
        "Client connections accepted, by protocol.",
    );
    for (protocol, total) in PROTOCOLS.iter().zip(stats.connections_total) {
        let _ = writeln!(
            out,
            "hyperion_connections_total{{protocol=\"{protocol}\"}} {total}"
        );
    }
    counter(
        &mut out,
        "hyperion_sendfile_responses_total",
        "Responses whose body (a to_path file on plain HTTP/1.x) went out with sendfile(2).",
        stats.sendfile_responses,
    );
    counter(
        &mut out,
        "hyperion_sendfile_bytes_total",
        "Body bytes sent with sendfile(2).",
        stats.sendfile_bytes,
    );
    gauge(
        &mut out,
        "hyperion_workers",
        "Worker processes.",
        processes.workers,
    );
    gauge(
        &mut out,
        "hyperion_booted_workers",
        "Worker processes serving.",
        processes.booted_workers,
    );
    counter(
        &mut out,
        "hyperion_worker_boots_total",
        "Workers that came up serving.",
        processes.boots,
    );
    counter(
        &mut out,
        "hyperion_worker_restarts_total",
        "Workers started in place of another (crash, missed heartbeat, memory limit, phased restart).",
        processes.restarts,
    );
    out
}

fn family(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
}

fn gauge(out: &mut String, name: &str, help: &str, value: u64) {
    family(out, name, "gauge", help);
    let _ = writeln!(out, "{name} {value}");
}

fn counter(out: &mut String, name: &str, help: &str, value: u64) {
    family(out, name, "counter", help);
    let _ = writeln!(out, "{name} {value}");
}

fn histogram(out: &mut String, name: &str, help: &str, histogram: &HistogramSnapshot) {
    family(out, name, "histogram", help);
    let mut cumulative = 0;
    for (bound, count) in BUCKET_BOUNDS.iter().zip(histogram.buckets) {
        cumulative += count;
        let _ = writeln!(out, "{name}_bucket{{le=\"{bound}\"}} {cumulative}");
    }
    let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {}", histogram.count);
    let _ = writeln!(
        out,
        "{name}_sum {}",
        histogram.sum_micros as f64 / 1_000_000.0
    );
    let _ = writeln!(out, "{name}_count {}", histogram.count);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stats::StatsPage;
    use std::time::Duration;

    #[test]
    fn a_histogram_is_cumulative_and_ends_with_inf_sum_and_count() {
        let page = StatsPage::new(false).unwrap();
        page.response_finished(200, Duration::from_micros(400));
        page.response_finished(200, Duration::from_millis(2));
        page.response_finished(503, Duration::from_secs(30));
        page.sendfile_started();
        page.sendfile_sent(4096);
        let text = render(&page.snapshot(), &Processes::default());
        for line in [
            "hyperion_requests_total{status_class=\"2xx\"} 2",
            "hyperion_requests_total{status_class=\"5xx\"} 1",
            "hyperion_request_duration_seconds_bucket{le=\"0.0005\"} 1",
            "hyperion_request_duration_seconds_bucket{le=\"0.001\"} 1",
            "hyperion_request_duration_seconds_bucket{le=\"0.0025\"} 2",
            "hyperion_request_duration_seconds_bucket{le=\"10\"} 2",
            "hyperion_request_duration_seconds_bucket{le=\"+Inf\"} 3",
            "hyperion_request_duration_seconds_sum 30.0024",
            "hyperion_request_duration_seconds_count 3",
            "# TYPE hyperion_queue_wait_seconds histogram",
            "hyperion_connections_open{protocol=\"http2\"} 0",
            "# TYPE hyperion_sendfile_responses_total counter",
            "hyperion_sendfile_responses_total 1",
            "hyperion_sendfile_bytes_total 4096",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "{line} missing in:\n{text}"
            );
        }
        assert!(
            !text.contains("status_class=\"other\""),
            "the other class shows only when used"
        );
        assert!(text.ends_with('\n'));
    }
}
