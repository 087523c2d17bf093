//! The per-integration series (`callmeter_requests_total`, `callmeter_request_duration_seconds`
//! and the integration gauges) with their own storage and text writer.
//!
//! With 10,000 integrations these families hold a quarter of a million lines. Kept in the
//! `prometheus` crate's vectors, every scrape would copy each series into a protobuf-shaped
//! structure, sort it and encode it again, at about a microsecond a line; here each
//! integration's counters are plain atomics and its label text is escaped once, so `/metrics`
//! writes them straight into the page. The request path pays one relaxed add per counter.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use super::Outcome;
use crate::meter::{IntegrationReport, Usage};
use crate::salesforce::Api;

/// Latency buckets: a proxied Salesforce call takes from a few ms to minutes (Bulk, reports).
/// Upper bounds in microseconds, and as the `le` label shows them.
const BUCKETS_MICROS: [u64; 16] = [
    1_000,
    2_500,
    5_000,
    10_000,
    25_000,
    50_000,
    100_000,
    250_000,
    500_000,
    1_000_000,
    2_500_000,
    5_000_000,
    10_000_000,
    30_000_000,
    60_000_000,
    120_000_000,
];
const BUCKET_LABELS: [&str; 16] = [
    "0.001", "0.0025", "0.005", "0.01", "0.025", "0.05", "0.1", "0.25", "0.5", "1", "2.5", "5",
    "10", "30", "60", "120",
];

const REQUESTS: &str = "callmeter_requests_total";
const DURATION: &str = "callmeter_request_duration_seconds";
const WINDOW: &str = "callmeter_integration_api_calls_window";
const QUOTA: &str = "callmeter_integration_api_calls_quota";
const QUEUE_DEPTH: &str = "callmeter_queue_depth";

/// One integration's request counters and latency histograms.
pub(super) struct Series {
    /// `integration="…",org="…"`, escaped: the labels every line of this integration shares, in
    /// the alphabetical order the rest of the page uses.
    labels: String,
    requests: [[AtomicU64; Outcome::ALL.len()]; Api::ALL.len()],
    /// Allocated on the first request of that API family: most integrations use one or two.
    duration: [OnceLock<Box<Histogram>>; Api::ALL.len()],
}

#[derive(Default)]
struct Histogram {
    /// Per-bucket (not cumulative) counts; the last one is above the largest bound.
    buckets: [AtomicU64; BUCKETS_MICROS.len() + 1],
    sum_micros: AtomicU64,
}

impl Series {
    #[inline]
    pub(super) fn record(&self, api: Api, outcome: Outcome, elapsed: Duration) {
        // Relaxed: each counter is independent and only ever added to; a scrape may see one
        // request in the counter and not yet in the histogram, which the next scrape settles.
        self.requests[api.index()][outcome.index()].fetch_add(1, Ordering::Relaxed);
        let micros = u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX);
        let h = self.duration[api.index()].get_or_init(Box::default);
        let bucket = BUCKETS_MICROS.partition_point(|&bound| bound < micros);
        h.buckets[bucket].fetch_add(1, Ordering::Relaxed);
        h.sum_micros.fetch_add(micros, Ordering::Relaxed);
    }
}

/// Every integration's series, by (org, integration): one series per label set however often
/// the handles are asked for, and a stable, sorted page.
#[derive(Default)]
pub(super) struct SeriesSet {
    by_labels: Mutex<BTreeMap<(String, String), std::sync::Arc<Series>>>,
}

impl SeriesSet {
    /// The series of `integration` of `org`, created on first use (at start-up, not per request).
    pub(super) fn get(&self, org: &str, integration: &str) -> std::sync::Arc<Series> {
        let mut map = self
            .by_labels
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        map.entry((org.to_owned(), integration.to_owned()))
            .or_insert_with(|| {
                let mut labels = String::new();
                push_labels(&mut labels, org, integration);
                std::sync::Arc::new(Series {
                    labels,
                    requests: Default::default(),
                    duration: Default::default(),
                })
            })
            .clone()
    }

    /// Appends the request counters and latency histograms of every integration.
    pub(super) fn render(&self, out: &mut String) {
        let map = self
            .by_labels
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        header(
            out,
            REQUESTS,
            "counter",
            "Requests received, by API family and outcome.",
        );
        for series in map.values() {
            for api in Api::ALL {
                for outcome in Outcome::ALL {
                    let n = series.requests[api.index()][outcome.index()].load(Ordering::Relaxed);
                    // A label set appears from its first request on, as with client libraries'
                    // lazily created children.
                    if n > 0 {
                        line_start(out, REQUESTS, "", api.as_str(), &series.labels);
                        let _ = write!(out, ",outcome=\"{}\"}} ", outcome.as_str());
                        push_u64(out, n);
                    }
                }
            }
        }
        header(
            out,
            DURATION,
            "histogram",
            "Time from request received to response headers sent.",
        );
        for series in map.values() {
            for api in Api::ALL {
                if let Some(h) = series.duration[api.index()].get() {
                    histogram(out, h, api, &series.labels);
                }
            }
        }
    }
}

fn histogram(out: &mut String, h: &Histogram, api: Api, labels: &str) {
    let mut cumulative = 0u64;
    for (i, le) in BUCKET_LABELS.iter().enumerate() {
        cumulative += h.buckets[i].load(Ordering::Relaxed);
        line_start(out, DURATION, "_bucket", api.as_str(), labels);
        let _ = write!(out, ",le=\"{le}\"}} ");
        push_u64(out, cumulative);
    }
    // The count is the +Inf bucket, summed from the same loads, so the two always agree.
    cumulative += h.buckets[BUCKETS_MICROS.len()].load(Ordering::Relaxed);
    line_start(out, DURATION, "_bucket", api.as_str(), labels);
    out.push_str(",le=\"+Inf\"} ");
    push_u64(out, cumulative);
    line_start(out, DURATION, "_sum", api.as_str(), labels);
    let sum = h.sum_micros.load(Ordering::Relaxed) as f64 / 1e6;
    let _ = writeln!(out, "}} {sum}");
    line_start(out, DURATION, "_count", api.as_str(), labels);
    out.push_str("} ");
    push_u64(out, cumulative);
}

/// Appends the gauges of every integration from the meter's snapshot.
pub(super) fn render_gauges(out: &mut String, usage: &Usage) {
    gauge(
        out,
        usage,
        WINDOW,
        "Counted calls of the integration in the rolling window.",
        |i| Some(i.window),
    );
    gauge(
        out,
        usage,
        QUOTA,
        "The integration's quota in calls per window (absent if none).",
        |i| i.quota,
    );
    gauge(
        out,
        usage,
        QUEUE_DEPTH,
        "Calls of the integration waiting for budget (in memory) or deferred (in the store).",
        |i| Some(i.queue_depth),
    );
}

fn gauge(
    out: &mut String,
    usage: &Usage,
    name: &str,
    help: &str,
    value: impl Fn(&IntegrationReport) -> Option<u64>,
) {
    header(out, name, "gauge", help);
    for org in &usage.orgs {
        for i in &org.integrations {
            if let Some(v) = value(i) {
                out.push_str(name);
                out.push('{');
                push_labels(out, &org.id, &i.id);
                out.push_str("} ");
                push_u64(out, v);
            }
        }
    }
}

fn header(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
}

/// `name{suffix}{api="…",integration="…",org="…"`: the caller adds its own labels and the value.
fn line_start(out: &mut String, name: &str, suffix: &str, api: &str, labels: &str) {
    out.push_str(name);
    out.push_str(suffix);
    out.push_str("{api=\"");
    out.push_str(api);
    out.push_str("\",");
    out.push_str(labels);
}

fn push_labels(out: &mut String, org: &str, integration: &str) {
    out.push_str("integration=\"");
    push_escaped(out, integration);
    out.push_str("\",org=\"");
    push_escaped(out, org);
    out.push('"');
}

/// A label value as the text format wants it: backslash, double quote and newline escaped.
fn push_escaped(out: &mut String, value: &str) {
    for c in value.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
}

/// The value and the line's end.
fn push_u64(out: &mut String, v: u64) {
    out.push_str(itoa::Buffer::new().format(v));
    out.push('\n');
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_cumulative_and_count_is_the_inf_bucket() {
        let set = SeriesSet::default();
        let s = set.get("acme", "etl");
        s.record(Api::Bulk, Outcome::Forwarded, Duration::from_micros(1_000));
        s.record(Api::Bulk, Outcome::Forwarded, Duration::from_millis(30));
        s.record(Api::Bulk, Outcome::Rejected, Duration::from_secs(600));
        let mut out = String::new();
        set.render(&mut out);
        let labels = r#"api="bulk",integration="etl",org="acme""#;
        for (le, n) in [
            ("0.001", 1),
            ("0.025", 1),
            ("0.05", 2),
            ("120", 2),
            ("+Inf", 3),
        ] {
            let line = format!("{DURATION}_bucket{{{labels},le=\"{le}\"}} {n}\n");
            assert!(out.contains(&line), "{line} missing in\n{out}");
        }
        assert!(out.contains(&format!("{DURATION}_count{{{labels}}} 3\n")));
        assert!(out.contains(&format!("{DURATION}_sum{{{labels}}} 600.031\n")));
        assert!(out.contains(&format!("{REQUESTS}{{{labels},outcome=\"rejected\"}} 1\n")));
        // Unused families and outcomes have no lines.
        assert!(!out.contains("api=\"rest\""));
        assert!(!out.contains("outcome=\"queued\""));
    }

    #[test]
    fn one_series_per_label_set_and_labels_escaped() {
        let set = SeriesSet::default();
        set.get("acme", "a")
            .record(Api::Rest, Outcome::Forwarded, Duration::ZERO);
        set.get("acme", "a")
            .record(Api::Rest, Outcome::Forwarded, Duration::ZERO);
        set.get("ac\"me", "b\\")
            .record(Api::Rest, Outcome::Forwarded, Duration::ZERO);
        let mut out = String::new();
        set.render(&mut out);
        assert!(out.contains(
            "callmeter_requests_total{api=\"rest\",integration=\"a\",org=\"acme\",outcome=\"forwarded\"} 2\n"
        ));
        assert!(out.contains(r#"integration="b\\",org="ac\"me""#), "{out}");
        assert_eq!(
            out.matches("# TYPE callmeter_requests_total counter")
                .count(),
            1
        );
    }

    /// The value of the line of `out` that starts with `prefix` (labels included).
    fn value(out: &str, prefix: &str) -> Option<f64> {
        out.lines()
            .find_map(|l| l.strip_prefix(prefix))
            .and_then(|v| v.trim().parse().ok())
    }

    proptest::proptest! {
        /// Whatever is recorded: per API family, the requests counters add up to the
        /// histogram's count, buckets never decrease, +Inf equals the count, and the sum is
        /// the recorded time.
        #[test]
        fn rendered_series_agree_with_what_was_recorded(
            calls in proptest::collection::vec((0..Api::ALL.len(), 0..Outcome::ALL.len(), 0u64..200_000_000), 0..200)
        ) {
            let set = SeriesSet::default();
            let series = set.get("acme", "etl");
            let mut count = [0u64; Api::ALL.len()];
            let mut sum = [0u64; Api::ALL.len()];
            for &(api, outcome, micros) in &calls {
                series.record(Api::ALL[api], Outcome::ALL[outcome], Duration::from_micros(micros));
                count[api] += 1;
                sum[api] += micros;
            }
            let mut out = String::new();
            set.render(&mut out);
            for api in Api::ALL {
                let labels = format!(r#"api="{}",integration="etl",org="acme""#, api.as_str());
                let n = count[api.index()];
                let requests: f64 = Outcome::ALL
                    .iter()
                    .filter_map(|o| value(&out, &format!("{REQUESTS}{{{labels},outcome=\"{}\"}}", o.as_str())))
                    .sum();
                proptest::prop_assert_eq!(requests as u64, n);
                let count_line = format!("{DURATION}_count{{{labels}}}");
                if n == 0 {
                    let absent = !out.contains(&count_line);
                    proptest::prop_assert!(absent);
                    continue;
                }
                let mut previous = 0.0;
                for le in BUCKET_LABELS.iter().chain(["+Inf"].iter()) {
                    let b = value(&out, &format!("{DURATION}_bucket{{{labels},le=\"{le}\"}}"));
                    let b = b.ok_or_else(|| proptest::test_runner::TestCaseError::fail(format!("no le={le}")))?;
                    proptest::prop_assert!(b >= previous);
                    previous = b;
                }
                proptest::prop_assert_eq!(previous as u64, n);
                proptest::prop_assert_eq!(value(&out, &count_line), Some(n as f64));
                let sum_line = format!("{DURATION}_sum{{{labels}}}");
                let error = (value(&out, &sum_line).unwrap_or(-1.0) - sum[api.index()] as f64 / 1e6).abs();
                proptest::prop_assert!(error < 1e-6);
            }
        }
    }

    #[test]
    fn bucket_labels_match_bounds() {
        for (bound, label) in BUCKETS_MICROS.iter().zip(BUCKET_LABELS) {
            assert_eq!(format!("{}", *bound as f64 / 1e6), label);
        }
    }
}
