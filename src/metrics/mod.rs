//! Prometheus metrics: every metric defined here, rendered as text for `/metrics`.
//!
//! Org-level and process-wide families live in a `prometheus` registry. The families with one
//! series per integration (thousands of them) are stored and written by [`series`], which
//! renders them an order of magnitude faster. The request path never looks a label set up by
//! name: each integration gets an `IntegrationMetrics` at start-up, and recording a request is
//! three relaxed atomic adds. Gauges that mirror the meter (usage, window counts) are written
//! from the meter's public view when `/metrics` is scraped, so the hot path does not update
//! them at all.

mod series;

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use prometheus::{
    Encoder, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry, TextEncoder,
};

use crate::meter::Usage;
use crate::salesforce::Api;

/// What became of a request, the `outcome` label.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    Forwarded,
    Rejected,
    Queued,
    Deferred,
    UpstreamError,
    /// The client's request failed before Salesforce had all of it (its body broke off or
    /// stalled): nothing counted, and not Salesforce's fault.
    ClientError,
}

impl Outcome {
    pub const ALL: [Outcome; 6] = [
        Outcome::Forwarded,
        Outcome::Rejected,
        Outcome::Queued,
        Outcome::Deferred,
        Outcome::UpstreamError,
        Outcome::ClientError,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Forwarded => "forwarded",
            Outcome::Rejected => "rejected",
            Outcome::Queued => "queued",
            Outcome::Deferred => "deferred",
            Outcome::UpstreamError => "upstream_error",
            Outcome::ClientError => "client_error",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// The registry and the metric families.
pub struct Metrics {
    registry: Registry,
    org_used: IntGaugeVec,
    org_limit: IntGaugeVec,
    org_threshold: IntGaugeVec,
    org_exhausted: IntGaugeVec,
    org_debugging: IntGaugeVec,
    deferred: IntGaugeVec,
    /// The per-integration request counters and latency histograms.
    series: series::SeriesSet,
    unmatched: IntCounterVec,
    usage_reports: IntCounterVec,
    notifications: IntCounterVec,
    notifications_pending: IntGaugeVec,
    /// Whether the last SIGHUP reload took (1), or was refused (0); 1 from the start.
    reload_ok: IntGauge,
    /// When the running config was last read whole: the start, or the last reload that took.
    reload_at: IntGauge,
}

/// Errors are only possible from a programming mistake (a bad metric name or duplicate
/// registration), found by the first test that builds `Metrics`.
fn must<T>(r: prometheus::Result<T>) -> T {
    match r {
        Ok(v) => v,
        Err(e) => panic!("metric definition is invalid: {e}"),
    }
}

impl Metrics {
    pub fn new() -> Arc<Self> {
        let registry = Registry::new();
        let gauge = |name: &str, help: &str, labels: &[&str]| {
            let g = must(IntGaugeVec::new(Opts::new(name, help), labels));
            must(registry.register(Box::new(g.clone())));
            g
        };
        let plain_gauge = |name: &str, help: &str| {
            let g = must(IntGauge::new(name, help));
            must(registry.register(Box::new(g.clone())));
            g
        };
        let counter = |name: &str, help: &str, labels: &[&str]| {
            let c = must(IntCounterVec::new(Opts::new(name, help), labels));
            must(registry.register(Box::new(c.clone())));
            c
        };
        let m = Metrics {
            org_used: gauge(
                "callmeter_org_api_calls_used",
                "Usage estimate of the org in Salesforce's rolling 24 h window: the last figure Salesforce reported plus calls forwarded since.",
                &["org"],
            ),
            org_limit: gauge("callmeter_org_api_calls_limit", "The org's daily API call limit.", &["org"]),
            org_threshold: gauge(
                "callmeter_org_api_calls_threshold",
                "The admin's notification threshold in calls (absent if none).",
                &["org"],
            ),
            org_exhausted: gauge(
                "callmeter_org_exhausted",
                "1 while Salesforce refuses the org's calls with REQUEST_LIMIT_EXCEEDED.",
                &["org"],
            ),
            org_debugging: gauge(
                "callmeter_org_debugging_calls",
                "SOAP calls with a DebuggingHeader in the rolling 24 h window, counted apart from the daily limit (Salesforce allows 1,000 per 24 h).",
                &["org"],
            ),
            deferred: gauge(
                "callmeter_deferred_calls",
                "Deferred calls in the store, by state (pending, in_flight, delivered, failed, discarded).",
                &["org", "integration", "state"],
            ),
            series: series::SeriesSet::default(),
            unmatched: counter(
                "callmeter_unmatched_requests_total",
                "Requests that matched no integration and were refused.",
                &["listener"],
            ),
            usage_reports: counter(
                "callmeter_usage_reports_total",
                "Usage figures read from Salesforce responses (Sforce-Limit-Info, LimitInfoHeader, /limits), by result.",
                &["org", "result"],
            ),
            notifications: counter(
                "callmeter_notifications_total",
                "Threshold email delivery attempts, by result: sent, or failed (each failed attempt; it is retried with backoff).",
                &["org", "result"],
            ),
            notifications_pending: gauge(
                "callmeter_notifications_pending",
                "Threshold emails of recorded crossings the SMTP server has not taken yet (being sent, or waiting for a retry).",
                &["org"],
            ),
            reload_ok: plain_gauge(
                "callmeter_config_last_reload_successful",
                "1 if the last config reload (SIGHUP) was applied, 0 if it was refused and the previous config still runs.",
            ),
            reload_at: plain_gauge(
                "callmeter_config_last_reload_success_timestamp_seconds",
                "When the running config was last read: the start, or the last reload applied (Unix time).",
            ),
            registry,
        };
        m.config_reloaded(true);
        let build = must(IntGaugeVec::new(
            Opts::new(
                "callmeter_build_info",
                "Always 1; the version label says which build runs.",
            ),
            &["version"],
        ));
        must(m.registry.register(Box::new(build.clone())));
        build.with_label_values(&[env!("CARGO_PKG_VERSION")]).set(1);
        Arc::new(m)
    }

    /// A reload was applied (`true`) or refused, the previous config staying.
    pub fn config_reloaded(&self, applied: bool) {
        self.reload_ok.set(i64::from(applied));
        if applied {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs());
            self.reload_at.set(clamp_i64(now));
        }
    }

    /// The handles one integration's requests use.
    pub fn integration(&self, org: &str, integration: &str) -> IntegrationMetrics {
        IntegrationMetrics {
            series: self.series.get(org, integration),
        }
    }

    /// The handles of one org.
    pub fn org(&self, org: &str) -> OrgMetrics {
        // Threshold emails are rare: their series exist from the start at 0, so that rate() and
        // increase() see the first failure.
        for result in ["sent", "failed"] {
            self.notifications.with_label_values(&[org, result]);
        }
        self.notifications_pending.with_label_values(&[org]);
        OrgMetrics {
            reports_ok: self.usage_reports.with_label_values(&[org, "ok"]),
            reports_malformed: self.usage_reports.with_label_values(&[org, "malformed"]),
            label: org.to_owned(),
        }
    }

    /// Sets the org gauges that mirror the meter (called on each scrape; the integration
    /// gauges are written from the same snapshot by [`Metrics::render`]).
    fn update_usage(&self, usage: &Usage) {
        for org in &usage.orgs {
            let id = org.id.as_str();
            self.org_used
                .with_label_values(&[id])
                .set(clamp_i64(org.used));
            self.org_exhausted
                .with_label_values(&[id])
                .set(i64::from(org.exhausted));
            self.org_debugging
                .with_label_values(&[id])
                .set(clamp_i64(org.debugging_calls));
            set_or_remove(&self.org_limit, &[id], org.limit);
            set_or_remove(&self.org_threshold, &[id], org.threshold);
        }
    }

    /// Sets the deferred-call gauges from the store's counts (called on each scrape).
    pub fn update_deferred(&self, counts: &[(String, String, crate::store::DeferredState, u64)]) {
        // Set the counts, then drop the series no longer counted; never reset first: a scrape
        // rendering beside this one would see no deferred calls at all in between (and an alert
        // on them would restart its `for`).
        let mut current = HashSet::new();
        for (org, integration, state, n) in counts {
            let labels = [org.as_str(), integration.as_str(), state.as_str()];
            self.deferred.with_label_values(&labels).set(clamp_i64(*n));
            current.insert(labels);
        }
        for family in prometheus::core::Collector::collect(&self.deferred) {
            for metric in family.get_metric() {
                let labels: HashMap<&str, &str> = metric
                    .get_label()
                    .iter()
                    .map(|pair| (pair.name(), pair.value()))
                    .collect();
                let key =
                    ["org", "integration", "state"].map(|l| labels.get(l).copied().unwrap_or(""));
                if !current.contains(&key) {
                    let _ = self.deferred.remove(&labels);
                }
            }
        }
    }

    /// One delivery attempt of a threshold email of `org`: sent, or failed.
    pub fn notification(&self, org: &str, sent: bool) {
        let result = if sent { "sent" } else { "failed" };
        self.notifications.with_label_values(&[org, result]).inc();
    }

    /// How many threshold emails of `org` wait for the SMTP server.
    pub fn notifications_pending(&self, org: &str, emails: usize) {
        self.notifications_pending
            .with_label_values(&[org])
            .set(i64::try_from(emails).unwrap_or(i64::MAX));
    }

    /// A listener's series, at 0 from the start: unmatched requests are rare, and a counter
    /// that appears with its first events hides them from rate() and increase().
    pub fn listener(&self, listener: &str) {
        self.unmatched.with_label_values(&[listener]);
    }

    /// A request on `listener` that matched no integration.
    pub fn unmatched(&self, listener: &str) {
        self.unmatched.with_label_values(&[listener]).inc();
    }

    /// Every metric in Prometheus' text format, with the meter's `usage` snapshot for the
    /// gauges that mirror it.
    pub fn render(&self, usage: &Usage) -> String {
        self.update_usage(usage);
        let mut out = Vec::with_capacity(64 * 1024);
        // Encoding into a Vec cannot fail for I/O; only for invalid metrics, which `new` rules out.
        if let Err(e) = TextEncoder::new().encode(&self.registry.gather(), &mut out) {
            tracing::error!(error = %e, "encoding metrics failed");
        }
        let mut out = String::from_utf8(out).unwrap_or_default();
        series::render_gauges(&mut out, usage);
        self.series.render(&mut out);
        out
    }
}

fn set_or_remove(vec: &IntGaugeVec, labels: &[&str], value: Option<u64>) {
    match value {
        Some(v) => vec.with_label_values(labels).set(clamp_i64(v)),
        None => {
            let _ = vec.remove_label_values(labels);
        }
    }
}

fn clamp_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// Pre-resolved handles of one org.
pub struct OrgMetrics {
    reports_ok: IntCounter,
    reports_malformed: IntCounter,
    label: String,
}

impl OrgMetrics {
    pub fn label(&self) -> &str {
        &self.label
    }

    pub fn usage_report(&self, ok: bool) {
        if ok {
            self.reports_ok.inc()
        } else {
            self.reports_malformed.inc()
        }
    }
}

/// The metric handles of one integration.
pub struct IntegrationMetrics {
    series: Arc<series::Series>,
}

impl IntegrationMetrics {
    /// Records a finished request: its outcome and its time to response headers.
    #[inline]
    pub fn record(&self, api: Api, outcome: Outcome, elapsed: Duration) {
        self.series.record(api, outcome, elapsed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Each update leaves exactly the counted series: a state no longer counted goes.
    #[test]
    fn deferred_gauges_follow_the_counts() {
        use crate::store::DeferredState::{Failed, Pending};
        let m = Metrics::new();
        let row = |state, n| ("acme".to_owned(), "etl".to_owned(), state, n);
        let series = |m: &Metrics| {
            let mut lines: Vec<String> = m
                .render(&Usage { orgs: Vec::new() })
                .lines()
                .filter(|l| l.starts_with("callmeter_deferred_calls{"))
                .map(str::to_owned)
                .collect();
            lines.sort();
            lines
        };
        m.update_deferred(&[row(Pending, 3), row(Failed, 1)]);
        assert_eq!(
            series(&m),
            [
                r#"callmeter_deferred_calls{integration="etl",org="acme",state="failed"} 1"#,
                r#"callmeter_deferred_calls{integration="etl",org="acme",state="pending"} 3"#,
            ]
        );
        m.update_deferred(&[row(Failed, 2)]);
        assert_eq!(
            series(&m),
            [r#"callmeter_deferred_calls{integration="etl",org="acme",state="failed"} 2"#]
        );
        m.update_deferred(&[]);
        assert!(series(&m).is_empty());
    }

    #[test]
    fn renders_labelled_values() {
        let m = Metrics::new();
        let i = m.integration("acme", "salesloft");
        i.record(Api::Rest, Outcome::Forwarded, Duration::from_millis(3));
        i.record(Api::Rest, Outcome::Forwarded, Duration::from_millis(3));
        let text = m.render(&Usage {
            orgs: vec![crate::meter::OrgReport {
                id: "acme".into(),
                limit: Some(15_000),
                used: 100,
                proxied: 42,
                reported_used: None,
                threshold: None,
                percent: None,
                color: None,
                exhausted: false,
                debugging_calls: 3,
                window_minutes: 1440,
                integrations: vec![crate::meter::IntegrationReport {
                    id: "salesloft".into(),
                    window: 42,
                    quota: None,
                    queue_depth: 2,
                    rejections: 0,
                }],
            }],
        });
        assert!(text.contains(
            r#"callmeter_requests_total{api="rest",integration="salesloft",org="acme",outcome="forwarded"} 2"#
        ));
        assert!(text.contains(
            r#"callmeter_integration_api_calls_window{integration="salesloft",org="acme"} 42"#
        ));
        assert!(text.contains(r#"callmeter_org_api_calls_limit{org="acme"} 15000"#));
        assert!(!text.contains("callmeter_org_api_calls_threshold{"));
        assert!(text.contains(r#"callmeter_build_info{version=""#));
        assert!(text.contains(r#"callmeter_queue_depth{integration="salesloft",org="acme"} 2"#));
    }
}
