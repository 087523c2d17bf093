//! The observability files (`config/prometheus.yml`, `config/alerts.yml`,
//! `config/alerts.test.yml`, `dashboards/*.json`) checked with the real tools against the real
//! binary:
//! - `promtool` checks the scrape config and the rules, and runs the rules' unit tests, each of
//!   which must have a firing and a non-firing case;
//! - `/metrics` of a proxy that has seen traffic passes `promtool check metrics`;
//! - a real Prometheus scrapes a real proxy (in front of `callmeter sim`), and every PromQL
//!   expression of the dashboards and rules is evaluated there: none may fail to parse, every
//!   `callmeter_*` metric and label they name must exist (except the few listed in
//!   [`NOT_EXPORTED_HERE`]), and they return data exactly where the traffic says they should;
//! - the dashboards' panel conventions (thresholds, data source) and that the previous check
//!   sees every query in them.
//!
//! Prometheus' tools come from Debian's `prometheus` package, which `scripts/test.sh` installs.
//! Every process a test starts is killed when the test ends, also when it panics ([`Proc`]).

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::free_port;
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::Value;

/// The org of the test config.
const ORG: &str = "acme";

/// Metrics that the dashboards and rules use but that the proxy does not export after the
/// traffic these tests send, with the labels they will have (from the product brief). Each is
/// exempt from the "must exist in Prometheus" check; the test fails once one does exist, so that
/// the entry is removed and the metric checked like the others.
const NOT_EXPORTED_HERE: &[(&str, &[&str])] = &[
    // Deferred calls by state: exported only for integrations with on_limit = "defer", which
    // the proxy scraped here has none of (the rules' unit tests in alerts.test.yml cover it).
    ("callmeter_deferred_calls", &["org", "integration", "state"]),
];

/// What each Grafana variable in a dashboard query stands for when the test evaluates it.
const GRAFANA_VARIABLES: &[(&str, &str)] = &[
    ("org", ORG),
    // "All" integrations.
    ("integration", ".*"),
    ("__rate_interval", "1m"),
    ("__interval", "1m"),
    ("__range", "1h"),
];

/// Dashboard panels whose queries return no series after the test's traffic, and why. Every
/// other panel's queries must return data.
const PANELS_EMPTY_AFTER_TRAFFIC: &[(&str, &str)] = &[
    (
        "Rejected, queued and deferred calls",
        "the test traffic stays within every budget: nothing is rejected, queued or deferred",
    ),
    ("Waiting and deferred calls", "metrics of later work"),
];

/// Alert rules whose expression holds after the test's traffic: the org is at 86 % of its limit
/// (the simulator starts at 850 of 1000) and one request in six failed upstream. All others
/// must return nothing.
const ALERTS_TRUE_AFTER_TRAFFIC: &[&str] =
    &["CallmeterOrgUsageHigh", "CallmeterUpstreamErrorsHigh"];

/// The thresholds of every bar gauge, gauge and stat panel: green, orange from 80, red from 90.
const STEPS: &[(&str, Option<f64>)] =
    &[("green", None), ("orange", Some(80.0)), ("red", Some(90.0))];

/// Panel types of a stock Grafana 10 / 11.
const STOCK_PANELS: &[&str] = &[
    "row",
    "bargauge",
    "gauge",
    "stat",
    "timeseries",
    "table",
    "barchart",
    "piechart",
    "text",
];

/// How long a process may take to become ready, and the test's waits for Prometheus.
const WAIT: Duration = Duration::from_secs(30);

// ------------------------------------------------------------------------------------------------
// (a) promtool: config, rules, rule unit tests

#[test]
fn promtool_accepts_the_config_and_the_rules_and_their_tests_pass() {
    let promtool = tool("promtool");
    for args in [
        ["check", "config", "config/prometheus.yml"],
        ["check", "rules", "config/alerts.yml"],
        ["test", "rules", "config/alerts.test.yml"],
    ] {
        let out = Command::new(&promtool)
            .args(args)
            .current_dir(repo())
            .output()
            .expect("run promtool");
        assert!(
            out.status.success(),
            "`promtool {}` failed ({}):\n{}{}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[test]
fn every_alert_has_a_firing_and_a_non_firing_unit_test() {
    let rules = read(&repo().join("config/alerts.yml"));
    let alerts: Vec<&str> = rules
        .lines()
        .filter_map(|l| l.trim().strip_prefix("- alert:"))
        .map(str::trim)
        .collect();
    assert!(alerts.len() >= 8, "alerts found in alerts.yml: {alerts:?}");

    // In alerts.test.yml each `alertname: X` is followed by its `exp_alerts:`, which is `[]` for
    // a case where the alert must not fire and a list of alerts otherwise.
    let tests = read(&repo().join("config/alerts.test.yml"));
    let mut fires = BTreeSet::new();
    let mut silent = BTreeSet::new();
    let mut current: Option<&str> = None;
    for line in tests.lines().map(str::trim) {
        if let Some(name) = line.strip_prefix("alertname:") {
            current = Some(name.trim());
        } else if let Some(rest) = line.strip_prefix("exp_alerts:") {
            let name = current
                .take()
                .unwrap_or_else(|| panic!("exp_alerts without alertname: {line}"));
            if rest.trim() == "[]" {
                silent.insert(name);
            } else {
                fires.insert(name);
            }
        }
    }
    for alert in &alerts {
        assert!(
            fires.contains(alert),
            "config/alerts.test.yml has no case where {alert} fires"
        );
        assert!(
            silent.contains(alert),
            "config/alerts.test.yml has no case where {alert} does not fire (exp_alerts: [])"
        );
    }
    for tested in fires.union(&silent) {
        assert!(
            alerts.contains(tested),
            "config/alerts.test.yml tests {tested}, which alerts.yml does not define"
        );
    }
}

// ------------------------------------------------------------------------------------------------
// (b) the exposition format

#[tokio::test]
async fn metrics_after_traffic_pass_promtool_check_metrics() {
    let promtool = tool("promtool");
    let http = Http::new();
    let proxy = Proxy::start(&http).await;
    traffic(&http, &proxy).await;

    let (status, text) = http
        .get(&format!("{}/metrics", proxy.admin), &[])
        .await
        .expect("GET /metrics");
    assert_eq!(status, StatusCode::OK, "{text}");
    for needle in [
        r#"outcome="forwarded""#,
        r#"outcome="upstream_error""#,
        "callmeter_unmatched_requests_total{",
        "callmeter_request_duration_seconds_bucket{",
        "callmeter_integration_api_calls_quota{",
    ] {
        assert!(text.contains(needle), "/metrics lacks {needle}:\n{text}");
    }

    let mut child = Command::new(&promtool)
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run promtool check metrics");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(text.as_bytes())
        .expect("write metrics to promtool");
    let out = child.wait_with_output().expect("promtool check metrics");
    assert!(
        out.status.success(),
        "promtool check metrics rejects /metrics ({}):\n{}{}\n--- /metrics:\n{text}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

// ------------------------------------------------------------------------------------------------
// (c) every query against a real Prometheus scraping a real proxy

#[tokio::test]
async fn every_dashboard_and_alert_query_works_in_prometheus() {
    let http = Http::new();
    let proxy = Proxy::start(&http).await;
    // Traffic before the first scrape creates the series; the same traffic after it makes
    // rate() and increase() see an increase.
    traffic(&http, &proxy).await;
    let mut prom = Prometheus::start(&http, &proxy.admin_addr).await;
    prom.wait_for(
        &http,
        r#"callmeter_requests_total{outcome="upstream_error"} == 1"#,
    )
    .await;
    traffic(&http, &proxy).await;
    prom.wait_for(
        &http,
        r#"count_over_time(callmeter_requests_total{outcome="upstream_error"}[1m]) > 1
           and callmeter_requests_total{outcome="upstream_error"} == 2"#,
    )
    .await;

    // Every expression: the dashboards' targets and variables, and the alert rules as
    // Prometheus loaded them.
    let rules = prom.evaluated_rules(&http).await;
    let rule_count = read(&repo().join("config/alerts.yml"))
        .lines()
        .filter(|l| l.trim().starts_with("- alert:"))
        .count();
    assert_eq!(
        rules.len(),
        rule_count,
        "Prometheus loaded {} rules of alerts.yml's {rule_count}: {rules:?}",
        rules.len()
    );
    let mut queries = all_dashboard_queries();
    queries.extend(rules.iter().map(|(name, expr)| Query {
        source: format!("config/alerts.yml: {name}"),
        kind: QueryKind::Alert(name.clone()),
        expr: expr.clone(),
    }));

    let mut check = Checker::new(&mut prom, &http).await;
    for q in &queries {
        check.query(q).await;
    }
    check.expectations();
    let mut failures = check.failures;
    for (name, expr) in &rules {
        if let Some(err) = prom.rule_error(name) {
            failures.push(format!(
                "rule {name} fails in Prometheus: {err}\n    {expr}"
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "{} problem(s) with the observability queries:\n- {}",
        failures.len(),
        failures.join("\n- ")
    );
}

/// Checks queries against what a Prometheus holds, collecting the failures.
struct Checker<'a> {
    prom: &'a mut Prometheus,
    http: &'a Http,
    /// Every metric name in Prometheus.
    exported: BTreeSet<String>,
    /// Label names of the metrics seen so far (and of [`NOT_EXPORTED_HERE`]).
    labels_of: BTreeMap<String, BTreeSet<String>>,
    /// Every `callmeter_*` metric the queries name.
    referenced: BTreeSet<String>,
    /// Whether all queries of a panel / alert / variable returned series.
    returned_data: BTreeMap<String, bool>,
    failures: Vec<String>,
}

impl<'a> Checker<'a> {
    async fn new(prom: &'a mut Prometheus, http: &'a Http) -> Checker<'a> {
        let exported: BTreeSet<String> = prom
            .api(http, "/api/v1/label/__name__/values", &[])
            .await
            .as_array()
            .expect("names")
            .iter()
            .filter_map(|v| v.as_str().map(str::to_owned))
            .collect();
        let mut labels_of = BTreeMap::new();
        for (name, labels) in NOT_EXPORTED_HERE {
            assert!(
                !exported.contains(*name),
                "{name} is exported now: remove it from NOT_EXPORTED_HERE so that it is checked"
            );
            labels_of.insert(
                (*name).to_owned(),
                with_target_labels(labels.iter().copied()),
            );
        }
        Checker {
            prom,
            http,
            exported,
            labels_of,
            referenced: BTreeSet::new(),
            returned_data: BTreeMap::new(),
            failures: Vec::new(),
        }
    }

    /// The label names of `metric`, if Prometheus has it or it is declared not yet exported.
    async fn labels(&mut self, metric: &str) -> Option<&BTreeSet<String>> {
        if !self.labels_of.contains_key(metric) && self.exported.contains(metric) {
            let labels = self
                .prom
                .api(self.http, "/api/v1/labels", &[("match[]", metric)])
                .await;
            let labels = labels
                .as_array()
                .expect("labels")
                .iter()
                .filter_map(|v| v.as_str().map(str::to_owned))
                .collect();
            self.labels_of.insert(metric.to_owned(), labels);
        }
        self.labels_of.get(metric)
    }

    /// Names (metrics, labels), then evaluation, of one query.
    async fn query(&mut self, q: &Query) {
        let expr = match substitute(&q.expr) {
            Ok(expr) => expr,
            Err(e) => return self.fail(q, &e, &q.expr),
        };
        let shape = PromQl::scan(&expr);
        // Labels that by / on / ... may name: those of the expression's metrics.
        let mut known = with_target_labels(["le"]);
        for metric in shape.metrics() {
            self.referenced.insert(metric.clone());
            match self.labels(metric).await {
                Some(labels) => known.extend(labels.iter().cloned()),
                None => self.fail(
                    q,
                    &format!(
                        "metric {metric} does not exist in Prometheus after traffic (a typo? \
                         or add it to NOT_EXPORTED_HERE if the proxy scraped here cannot export it)"
                    ),
                    &expr,
                ),
            }
        }
        for (metric, label) in &shape.matchers {
            if let Some(labels) = self.labels_of.get(metric) {
                if !labels.contains(label) {
                    let e = format!("{metric} has no label {label:?} (it has {labels:?})");
                    self.fail(q, &e, &expr);
                }
            }
        }
        for label in &shape.grouping {
            if !known.contains(label) {
                let e = format!(
                    "no metric of the expression has the label {label:?} it groups or matches by"
                );
                self.fail(q, &e, &expr);
            }
        }

        let result = match self.prom.query(self.http, &expr).await {
            Ok(result) => result,
            Err(e) => return self.fail(q, &format!("Prometheus refuses it: {e}"), &expr),
        };
        let series = result["result"].as_array().cloned().unwrap_or_default();
        if let QueryKind::Variable { label } = &q.kind {
            if !series
                .iter()
                .any(|s| s["metric"][label.as_str()].is_string())
            {
                self.fail(
                    q,
                    &format!("label_values finds no value of {label:?}"),
                    &expr,
                );
            }
        }
        *self
            .returned_data
            .entry(q.kind.expectation_key())
            .or_insert(true) &= !series.is_empty();
    }

    fn fail(&mut self, q: &Query, what: &str, expr: &str) {
        self.failures
            .push(format!("{}: {what}\n    {expr}", q.source));
    }

    /// Data where the traffic should have produced it, none elsewhere; and the lists of
    /// exceptions name things that exist.
    fn expectations(&mut self) {
        for (key, has_data) in &self.returned_data {
            let expected = if let Some(alert) = key.strip_prefix("alert ") {
                ALERTS_TRUE_AFTER_TRAFFIC.contains(&alert)
            } else if let Some(panel) = key.strip_prefix("panel ") {
                !PANELS_EMPTY_AFTER_TRAFFIC.iter().any(|(p, _)| *p == panel)
            } else {
                true
            };
            if expected && !has_data {
                self.failures.push(format!(
                    "{key}: a query returned no series after traffic (labels or values wrong?)"
                ));
            }
            if !expected && *has_data {
                self.failures.push(format!(
                    "{key}: returns series after the test's traffic, where none were expected"
                ));
            }
        }
        for (panel, _) in PANELS_EMPTY_AFTER_TRAFFIC {
            assert!(
                self.returned_data.contains_key(&format!("panel {panel}")),
                "PANELS_EMPTY_AFTER_TRAFFIC names {panel:?}, which no dashboard has"
            );
        }
        for alert in ALERTS_TRUE_AFTER_TRAFFIC {
            assert!(
                self.returned_data.contains_key(&format!("alert {alert}")),
                "ALERTS_TRUE_AFTER_TRAFFIC names {alert}, which alerts.yml does not define"
            );
        }
        for (name, _) in NOT_EXPORTED_HERE {
            assert!(
                self.referenced.contains(*name),
                "NOT_EXPORTED_HERE names {name}, which no query uses: remove it"
            );
        }
    }
}

// ------------------------------------------------------------------------------------------------
// (d) dashboard conventions

#[test]
fn dashboards_use_the_datasource_and_org_variables() {
    for (name, dash) in dashboards() {
        assert!(
            dash["schemaVersion"].as_u64().is_some_and(|v| v >= 36),
            "{name}: schemaVersion"
        );
        assert!(
            dash["uid"].is_string(),
            "{name}: a fixed uid keeps links stable"
        );
        let vars = dash["templating"]["list"]
            .as_array()
            .expect("templating.list");
        let var = |wanted: &str| {
            vars.iter()
                .find(|v| v["name"] == wanted)
                .unwrap_or_else(|| panic!("{name}: no `{wanted}` variable"))
        };
        let ds = var("datasource");
        assert_eq!(ds["type"], "datasource", "{name}: datasource variable type");
        assert_eq!(
            ds["query"], "prometheus",
            "{name}: datasource variable query"
        );
        // From a series every org has from the start: the limit's is absent while unknown.
        assert_eq!(
            variable_query(var("org")),
            "label_values(callmeter_org_api_calls_used, org)",
            "{name}: org variable"
        );

        // Every panel, target and variable queries through the `datasource` variable.
        let mut datasources = Vec::new();
        collect_key(&dash, "datasource", &mut datasources);
        for ds in datasources {
            let ok = (ds["uid"] == "${datasource}" && ds["type"] == "prometheus")
                || ds["uid"] == "-- Grafana --" // the built-in annotations
                || ds == "${datasource}";
            assert!(ok, "{name}: data source {ds} is not ${{datasource}}");
        }

        let mut ids = BTreeSet::new();
        for panel in panels(&dash) {
            let title = panel["title"].as_str().unwrap_or("(untitled)");
            let kind = panel["type"].as_str().unwrap_or("");
            assert!(
                ids.insert(panel["id"].as_u64().expect("panel id")),
                "{name}: panel id of {title:?} is not unique"
            );
            assert!(
                STOCK_PANELS.contains(&kind),
                "{name}: {title:?} is a {kind:?}, not a stock Grafana panel"
            );
        }
    }
}

#[test]
fn gauge_panels_use_the_80_90_percent_thresholds() {
    let want: Vec<(String, Option<f64>)> =
        STEPS.iter().map(|(c, v)| ((*c).to_owned(), *v)).collect();
    let mut checked = 0;
    for (name, dash) in dashboards() {
        for panel in panels(&dash) {
            let title = panel["title"].as_str().unwrap_or("(untitled)");
            if !["bargauge", "gauge", "stat"].contains(&panel["type"].as_str().unwrap_or("")) {
                continue;
            }
            checked += 1;
            let defaults = &panel["fieldConfig"]["defaults"];
            let steps: Vec<(String, Option<f64>)> = defaults["thresholds"]["steps"]
                .as_array()
                .unwrap_or_else(|| panic!("{name}: {title:?} has no thresholds"))
                .iter()
                .map(|s| {
                    (
                        s["color"].as_str().unwrap_or("").to_owned(),
                        s["value"].as_f64(),
                    )
                })
                .collect();
            assert_eq!(steps, want, "{name}: thresholds of {title:?}");
            assert_eq!(
                defaults["thresholds"]["mode"], "absolute",
                "{name}: threshold mode of {title:?}"
            );
            let overrides = panel["fieldConfig"]["overrides"].to_string();
            assert!(
                !overrides.contains("thresholds") && !overrides.contains("\"unit\""),
                "{name}: {title:?} overrides its thresholds or unit: {overrides}"
            );
            // The steps are percentages: a panel showing a count must not be coloured by them.
            let color = defaults["color"]["mode"].as_str().unwrap_or("thresholds");
            if defaults["unit"] == "percent" {
                assert_eq!(
                    color, "thresholds",
                    "{name}: {title:?} is a percentage coloured by {color:?}"
                );
            } else {
                assert_eq!(
                    color, "fixed",
                    "{name}: {title:?} shows {} coloured by the percent thresholds",
                    defaults["unit"]
                );
            }
        }
    }
    assert!(checked >= 4, "only {checked} gauge panels");
}

#[test]
fn every_dashboard_query_is_evaluated_by_the_prometheus_test() {
    for (name, dash) in dashboards() {
        let file = repo().join(&name);
        let queries = dashboard_queries(&file);

        // Every `expr` anywhere in the file is a panel target the Prometheus test evaluates.
        let mut exprs = Vec::new();
        collect_key(&dash, "expr", &mut exprs);
        let mut all: Vec<&str> = exprs
            .iter()
            .map(|e| e.as_str().expect("expr is a string"))
            .collect();
        let mut covered: Vec<&str> = queries
            .iter()
            .filter(|q| matches!(q.kind, QueryKind::Panel(_)))
            .map(|q| q.expr.as_str())
            .collect();
        all.sort_unstable();
        covered.sort_unstable();
        assert_eq!(
            covered, all,
            "{name}: queries that the Prometheus test misses"
        );
        for panel in panels(&dash) {
            for t in panel["targets"].as_array().into_iter().flatten() {
                assert!(
                    t["expr"].as_str().is_some_and(|e| !e.trim().is_empty()),
                    "{name}: {} has a target without expr: {t}",
                    panel["title"]
                );
            }
        }

        // So is every query variable.
        let variables = dash["templating"]["list"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|v| v["type"] == "query")
            .count();
        let covered = queries
            .iter()
            .filter(|q| matches!(q.kind, QueryKind::Variable { .. }))
            .count();
        assert_eq!(covered, variables, "{name}: query variables missed");

        // Library panels keep their queries outside the file, where no test sees them.
        let mut library = Vec::new();
        collect_key(&dash, "libraryPanel", &mut library);
        assert!(library.is_empty(), "{name}: uses library panels");
    }
}

#[test]
fn substitution_replaces_every_grafana_variable() {
    assert_eq!(
        substitute(
            r#"rate(x{org=~"$org", i=~"${integration}"}[$__rate_interval]) offset $__range"#
        )
        .as_deref(),
        Ok(r#"rate(x{org=~"acme", i=~".*"}[1m]) offset 1h"#)
    );
    assert!(substitute("x[$__nope]").is_err());
    assert!(substitute("x{a=\"[[org]]\"}").is_err());
    let shape = PromQl::scan(
        r#"sum by (org, le) (rate(callmeter_a_total{org=~"x", outcome!="a{b}"}[5m])) / on(org) group_left callmeter_b"#,
    );
    assert_eq!(shape.metrics(), ["callmeter_a_total", "callmeter_b"]);
    assert_eq!(
        shape.matchers,
        [
            ("callmeter_a_total".to_owned(), "org".to_owned()),
            ("callmeter_a_total".to_owned(), "outcome".to_owned())
        ]
    );
    assert_eq!(shape.grouping, ["org", "le", "org"]);
}

// ------------------------------------------------------------------------------------------------
// Processes

/// A child process that is killed when this value is dropped, also while a test panics.
struct Proc {
    name: &'static str,
    child: Child,
    log: PathBuf,
}

impl Proc {
    /// Starts `cmd` with its stdout and stderr going to `log`.
    fn spawn(name: &'static str, cmd: &mut Command, log: PathBuf) -> Proc {
        let out = File::create(&log).expect("create log file");
        let err = out.try_clone().expect("clone log file");
        let child = cmd
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name}: {e}"));
        Proc { name, child, log }
    }

    /// Panics with the process's output if it has exited.
    fn assert_running(&mut self) {
        if let Ok(Some(status)) = self.child.try_wait() {
            panic!(
                "{} exited ({status}); its output:\n{}",
                self.name,
                std::fs::read_to_string(&self.log).unwrap_or_default()
            );
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `callmeter sim` and `callmeter serve` in front of it, on free ports.
struct Proxy {
    // Dropped in this order: the processes before the directory they write to.
    _serve: Proc,
    _sim: Proc,
    _dir: tempfile::TempDir,
    /// Base URL of the proxy listener.
    url: String,
    /// Base URL of the admin listener.
    admin: String,
    admin_addr: String,
}

impl Proxy {
    async fn start(http: &Http) -> Proxy {
        let dir = tempfile::tempdir().expect("tempdir");
        let bin = env!("CARGO_BIN_EXE_callmeter");
        let sim_addr = format!("127.0.0.1:{}", free_port());
        // 850 of 1000 calls used before the proxy starts: the org is past 80 % after traffic.
        let mut sim = Proc::spawn(
            "callmeter sim",
            Command::new(bin).args([
                "sim", "--listen", &sim_addr, "--limit", "1000", "--used", "850",
            ]),
            dir.path().join("sim.log"),
        );
        wait_until_ok(http, &mut sim, &format!("http://{sim_addr}/_sim/count")).await;

        let proxy_addr = format!("127.0.0.1:{}", free_port());
        let admin_addr = format!("127.0.0.1:{}", free_port());
        let config = dir.path().join("callmeter.toml");
        let store = dir.path().join("callmeter.db");
        std::fs::write(
            &config,
            format!(
                r#"
[admin]
listen = "{admin_addr}"

[store]
path = "{store}"

[log]
level = "warn"

[proxy]
shutdown_grace = "1s"

[[listener]]
name = "main"
listen = "{proxy_addr}"

[[org]]
id = "{ORG}"
instance_url = "http://{sim_addr}"
allow_plain_http = true
unmatched = "reject"
# A request the simulator delays longer than this is an upstream_error.
response_timeout = "2s"

[org.threshold]
levels = ["80%", "90%"]

[[integration]]
id = "salesloft"
org = "{ORG}"
match = {{ path_prefix = "/salesloft" }}
quota = "40%"

# No quota: shown by count in the dashboard.
[[integration]]
id = "etl"
org = "{ORG}"
match = {{ path_prefix = "/etl" }}
"#,
                store = store.display()
            ),
        )
        .expect("write config");
        let mut serve = Proc::spawn(
            "callmeter serve",
            Command::new(bin)
                .args(["serve", "--config"])
                .arg(&config)
                .env_remove("CALLMETER_CONFIG")
                .env_remove("RUST_LOG"),
            dir.path().join("serve.log"),
        );
        wait_until_ok(http, &mut serve, &format!("http://{admin_addr}/readyz")).await;
        Proxy {
            _serve: serve,
            _sim: sim,
            _dir: dir,
            url: format!("http://{proxy_addr}"),
            admin: format!("http://{admin_addr}"),
            admin_addr,
        }
    }
}

/// Polls `url` until it answers 200, while `proc` keeps running.
async fn wait_until_ok(http: &Http, proc: &mut Proc, url: &str) {
    let deadline = Instant::now() + WAIT;
    loop {
        proc.assert_running();
        match http.get(url, &[]).await {
            Ok((StatusCode::OK, _)) => return,
            last if Instant::now() > deadline => {
                panic!("{} not ready at {url} within {WAIT:?}: {last:?}", proc.name)
            }
            _ => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}

/// A request path, its extra headers and the status it must get.
type Call = (
    &'static str,
    &'static [(&'static str, &'static str)],
    StatusCode,
);

/// Requests that produce as many series as the proxy can export today: forwarded calls of two
/// integrations (counted, and one free), an upstream timeout, and a request matching no
/// integration.
async fn traffic(http: &Http, proxy: &Proxy) {
    let base = &proxy.url;
    let calls: &[Call] = &[
        (
            "/salesloft/services/data/v62.0/sobjects",
            &[],
            StatusCode::OK,
        ),
        (
            "/salesloft/services/data/v62.0/sobjects",
            &[],
            StatusCode::OK,
        ),
        (
            "/salesloft/services/data/v62.0/query?q=SELECT+Id+FROM+Contact",
            &[],
            StatusCode::OK,
        ),
        // The versions list: forwarded, not counted.
        ("/salesloft/services/data/", &[], StatusCode::OK),
        ("/etl/services/data/v62.0/sobjects", &[], StatusCode::OK),
        // The simulator answers after 5 s, the proxy gives up after 500 ms: upstream_error.
        (
            "/etl/services/data/v62.0/sobjects/Account",
            &[("x-sim-delay-ms", "5000")],
            StatusCode::GATEWAY_TIMEOUT,
        ),
        // No integration has this prefix: refused and counted as unmatched.
        (
            "/nowhere/services/data/v62.0/sobjects",
            &[],
            StatusCode::FORBIDDEN,
        ),
    ];
    for (path, headers, want) in calls {
        let (status, body) = http
            .get(&format!("{base}{path}"), headers)
            .await
            .unwrap_or_else(|e| panic!("{path}: {e}"));
        assert_eq!(status, *want, "{path}: {body}");
    }
}

/// Prometheus scraping the proxy's admin listener every second, with config/alerts.yml loaded.
struct Prometheus {
    proc: Proc,
    _dir: tempfile::TempDir,
    url: String,
    /// The rules as last read from /api/v1/rules.
    rules: Vec<Value>,
}

impl Prometheus {
    async fn start(http: &Http, target: &str) -> Prometheus {
        let bin = tool("prometheus");
        let dir = tempfile::tempdir().expect("tempdir");
        let config = dir.path().join("prometheus.yml");
        let rules = repo().join("config/alerts.yml");
        std::fs::write(
            &config,
            format!(
                r#"
global:
  scrape_interval: 1s
  scrape_timeout: 1s
  evaluation_interval: 1s
rule_files:
  - "{rules}"
scrape_configs:
  - job_name: callmeter
    static_configs:
      - targets: ["{target}"]
"#,
                rules = rules.display()
            ),
        )
        .expect("write prometheus.yml");
        let addr = format!("127.0.0.1:{}", free_port());
        let mut proc = Proc::spawn(
            "prometheus",
            Command::new(bin)
                .arg(format!("--config.file={}", config.display()))
                .arg(format!(
                    "--storage.tsdb.path={}",
                    dir.path().join("data").display()
                ))
                .arg(format!("--web.listen-address={addr}"))
                .arg("--log.level=warn"),
            dir.path().join("prometheus.log"),
        );
        let url = format!("http://{addr}");
        wait_until_ok(http, &mut proc, &format!("{url}/-/ready")).await;
        Prometheus {
            proc,
            _dir: dir,
            url,
            rules: Vec::new(),
        }
    }

    /// `data` of a successful API answer.
    async fn api(&mut self, http: &Http, path: &str, params: &[(&str, &str)]) -> Value {
        self.proc.assert_running();
        match self.call(http, path, params).await {
            Ok(data) => data,
            Err(e) => panic!("{path} {params:?}: {e}"),
        }
    }

    /// GET `path?params`: every API endpoint takes GET, not all take POST.
    async fn call(
        &self,
        http: &Http,
        path: &str,
        params: &[(&str, &str)],
    ) -> Result<Value, String> {
        let query: Vec<String> = params
            .iter()
            .map(|(k, v)| format!("{}={}", urlencode(k), urlencode(v)))
            .collect();
        let (status, body) = http
            .get(&format!("{}{path}?{}", self.url, query.join("&")), &[])
            .await?;
        let answer: Value = serde_json::from_str(&body)
            .map_err(|e| format!("HTTP {status}, not JSON ({e}): {body}"))?;
        if answer["status"] != "success" {
            return Err(format!(
                "{}: {}",
                answer["errorType"].as_str().unwrap_or("?"),
                answer["error"].as_str().unwrap_or(&body)
            ));
        }
        Ok(answer["data"].clone())
    }

    /// Evaluates an instant query now.
    async fn query(&mut self, http: &Http, expr: &str) -> Result<Value, String> {
        self.proc.assert_running();
        self.call(http, "/api/v1/query", &[("query", expr)]).await
    }

    /// Waits until `expr` returns a series.
    async fn wait_for(&mut self, http: &Http, expr: &str) {
        let deadline = Instant::now() + WAIT;
        loop {
            let data = self.query(http, expr).await.expect("wait query");
            if data["result"].as_array().is_some_and(|r| !r.is_empty()) {
                return;
            }
            let up = self.query(http, "up").await;
            assert!(
                Instant::now() < deadline,
                "Prometheus has no data for {expr} after {WAIT:?}; up: {up:?}"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Waits until every rule has been evaluated once, and returns (name, expr) of each.
    async fn evaluated_rules(&mut self, http: &Http) -> Vec<(String, String)> {
        let deadline = Instant::now() + WAIT;
        loop {
            let data = self.api(http, "/api/v1/rules", &[]).await;
            self.rules = data["groups"]
                .as_array()
                .expect("rule groups")
                .iter()
                .flat_map(|g| g["rules"].as_array().cloned().unwrap_or_default())
                .collect();
            // Not evaluated yet: Go's zero time.
            let done = !self.rules.is_empty()
                && self.rules.iter().all(|r| {
                    r["lastEvaluation"]
                        .as_str()
                        .is_some_and(|t| !t.starts_with("0001-"))
                });
            if done {
                return self
                    .rules
                    .iter()
                    .map(|r| {
                        (
                            r["name"].as_str().expect("rule name").to_owned(),
                            r["query"].as_str().expect("rule query").to_owned(),
                        )
                    })
                    .collect();
            }
            assert!(
                Instant::now() < deadline,
                "rules not evaluated within {WAIT:?}: {:?}",
                self.rules
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// The error of rule `name` at its last evaluation, if it had one.
    fn rule_error(&self, name: &str) -> Option<String> {
        let rule = self.rules.iter().find(|r| r["name"] == name)?;
        (rule["health"] != "ok").then(|| format!("{} {}", rule["health"], rule["lastError"]))
    }
}

/// The full path of `name` on PATH, or a panic that says how to install it.
fn tool(name: &str) -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
        .unwrap_or_else(|| {
            panic!(
                "`{name}` is not installed, and the observability tests need Prometheus' own \
                 tools. Install Debian's `prometheus` package (`apt-get install prometheus`, \
                 which brings prometheus and promtool), or run scripts/test.sh, which does."
            )
        })
}

// ------------------------------------------------------------------------------------------------
// HTTP

/// A small HTTP/1.1 client whose errors are values, so that readiness polls can retry.
struct Http {
    client: Client<HttpConnector, Full<Bytes>>,
}

impl Http {
    fn new() -> Http {
        Http {
            client: Client::builder(TokioExecutor::new()).build(HttpConnector::new()),
        }
    }

    async fn send(
        &self,
        method: Method,
        url: &str,
        headers: &[(&str, &str)],
        body: impl Into<Bytes>,
    ) -> Result<(StatusCode, String), String> {
        let mut req = Request::builder().method(method).uri(url);
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let req = req
            .body(Full::new(body.into()))
            .map_err(|e| e.to_string())?;
        let resp = tokio::time::timeout(WAIT, self.client.request(req))
            .await
            .map_err(|_| format!("{url}: no answer within {WAIT:?}"))?
            .map_err(|e| format!("{url}: {e}"))?;
        let status = resp.status();
        let body = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| format!("{url}: body: {e}"))?
            .to_bytes();
        Ok((status, String::from_utf8_lossy(&body).into_owned()))
    }

    async fn get(
        &self,
        url: &str,
        headers: &[(&str, &str)],
    ) -> Result<(StatusCode, String), String> {
        self.send(Method::GET, url, headers, Bytes::new()).await
    }
}

/// Percent-encodes everything but RFC 3986's unreserved characters.
fn urlencode(s: &str) -> String {
    let mut out = String::with_capacity(s.len() * 3);
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

// ------------------------------------------------------------------------------------------------
// The queries of the dashboards

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
}

fn dashboard_files() -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(repo().join("dashboards"))
        .expect("dashboards/")
        .map(|e| e.expect("dir entry").path())
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .collect();
    files.sort();
    files
}

/// Each dashboard file, by its path in the repository, parsed.
fn dashboards() -> Vec<(String, Value)> {
    let files = dashboard_files();
    assert!(!files.is_empty(), "no dashboards/*.json");
    files
        .iter()
        .map(|file| {
            let name = file
                .strip_prefix(repo())
                .unwrap_or(file)
                .display()
                .to_string();
            let dash = serde_json::from_str(&read(file))
                .unwrap_or_else(|e| panic!("{name} is not JSON: {e}"));
            (name, dash)
        })
        .collect()
}

/// One PromQL query to evaluate, and where it comes from.
#[derive(Debug)]
struct Query {
    source: String,
    kind: QueryKind,
    expr: String,
}

#[derive(Debug)]
enum QueryKind {
    /// A panel target (the panel's title).
    Panel(String),
    /// A template variable `label_values(expr, label)`.
    Variable { label: String },
    /// An alerting rule (its name).
    Alert(String),
}

impl QueryKind {
    /// What "returns data" is expected of: a panel (all its targets), an alert, a variable.
    fn expectation_key(&self) -> String {
        match self {
            QueryKind::Panel(title) => format!("panel {title}"),
            QueryKind::Alert(name) => format!("alert {name}"),
            QueryKind::Variable { label } => format!("variable {label}"),
        }
    }
}

fn all_dashboard_queries() -> Vec<Query> {
    dashboard_files()
        .iter()
        .flat_map(|f| dashboard_queries(f))
        .collect()
}

/// Every panel target and query variable of a dashboard file.
fn dashboard_queries(file: &Path) -> Vec<Query> {
    let name = file
        .strip_prefix(repo())
        .unwrap_or(file)
        .display()
        .to_string();
    let dash: Value =
        serde_json::from_str(&read(file)).unwrap_or_else(|e| panic!("{name} is not JSON: {e}"));
    let mut out = Vec::new();
    for panel in panels(&dash) {
        let title = panel["title"].as_str().unwrap_or("(untitled)").to_owned();
        for t in panel["targets"].as_array().into_iter().flatten() {
            if let Some(expr) = t["expr"].as_str() {
                out.push(Query {
                    source: format!("{name}: panel {title:?} target {}", t["refId"]),
                    kind: QueryKind::Panel(title.clone()),
                    expr: expr.to_owned(),
                });
            }
        }
    }
    for var in dash["templating"]["list"].as_array().into_iter().flatten() {
        if var["type"] != "query" {
            continue;
        }
        let query = variable_query(var);
        let var_name = var["name"].as_str().unwrap_or("?");
        let (expr, label) = label_values(&query).unwrap_or_else(|| {
            panic!("{name}: variable {var_name}: only label_values(selector, label) is checked, not {query:?}")
        });
        out.push(Query {
            source: format!("{name}: variable {var_name}"),
            kind: QueryKind::Variable { label },
            expr,
        });
    }
    out
}

/// A variable's query, stored as a string (old) or as `{ "query": ... }` (Grafana 10+).
fn variable_query(var: &Value) -> String {
    var["query"]
        .as_str()
        .or_else(|| var["query"]["query"].as_str())
        .unwrap_or_default()
        .to_owned()
}

/// `label_values(selector, label)` → (selector, label).
fn label_values(query: &str) -> Option<(String, String)> {
    let inner = query
        .trim()
        .strip_prefix("label_values(")?
        .strip_suffix(')')?;
    let (selector, label) = inner.rsplit_once(',')?;
    Some((selector.trim().to_owned(), label.trim().to_owned()))
}

/// Every panel, including those nested in collapsed rows.
fn panels(dash: &Value) -> Vec<&Value> {
    let mut out = Vec::new();
    for p in dash["panels"].as_array().into_iter().flatten() {
        out.push(p);
        out.extend(p["panels"].as_array().into_iter().flatten());
    }
    out
}

/// Every value under `key`, anywhere in `v`.
fn collect_key<'a>(v: &'a Value, key: &str, out: &mut Vec<&'a Value>) {
    match v {
        Value::Object(map) => {
            for (k, child) in map {
                if k == key {
                    out.push(child);
                }
                collect_key(child, key, out);
            }
        }
        Value::Array(items) => items.iter().for_each(|c| collect_key(c, key, out)),
        _ => {}
    }
}

/// `labels` plus the labels Prometheus adds to every scraped series.
fn with_target_labels<'a>(labels: impl IntoIterator<Item = &'a str>) -> BTreeSet<String> {
    labels
        .into_iter()
        .chain(["__name__", "job", "instance"])
        .map(str::to_owned)
        .collect()
}

/// Replaces the Grafana variables (`$name`, `${name}`) by [`GRAFANA_VARIABLES`]; an unknown one,
/// or the deprecated `[[name]]` form, is an error.
fn substitute(expr: &str) -> Result<String, String> {
    if expr.contains("[[") {
        return Err("the [[variable]] form is deprecated: use $variable".into());
    }
    let mut out = String::with_capacity(expr.len());
    let mut rest = expr;
    while let Some(at) = rest.find('$') {
        out.push_str(&rest[..at]);
        let after = &rest[at + 1..];
        let (name, tail) = if let Some(braced) = after.strip_prefix('{') {
            let end = braced
                .find('}')
                .ok_or_else(|| format!("unclosed ${{ in {expr}"))?;
            (&braced[..end], &braced[end + 1..])
        } else {
            let end = after
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(after.len());
            (&after[..end], &after[end..])
        };
        let value = GRAFANA_VARIABLES
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| *v)
            .ok_or_else(|| {
                format!("unknown Grafana variable ${name}: add it to GRAFANA_VARIABLES")
            })?;
        out.push_str(value);
        rest = tail;
    }
    out.push_str(rest);
    Ok(out)
}

/// What a PromQL expression names, read by a small tokenizer: enough to check names, not a
/// parser (Prometheus itself parses each expression).
#[derive(Debug, Default)]
struct PromQl {
    /// `callmeter_*` metric names, in order of appearance.
    metrics: Vec<String>,
    /// (metric, label) of each label matcher in a `callmeter_*` selector.
    matchers: Vec<(String, String)>,
    /// Labels of by / without / on / ignoring / group_left / group_right clauses.
    grouping: Vec<String>,
}

#[derive(Debug, PartialEq)]
enum Token {
    Ident(String),
    Str,
    Punct(char),
    Number,
}

impl PromQl {
    fn scan(expr: &str) -> PromQl {
        let tokens = tokenize(expr);
        let mut shape = PromQl::default();
        let mut i = 0;
        while i < tokens.len() {
            match &tokens[i] {
                Token::Ident(name) if name.starts_with("callmeter_") => {
                    shape.metrics.push(name.clone());
                    if tokens.get(i + 1) == Some(&Token::Punct('{')) {
                        i += 2;
                        while i < tokens.len() && tokens[i] != Token::Punct('}') {
                            if let Token::Ident(label) = &tokens[i] {
                                shape.matchers.push((name.clone(), label.clone()));
                            }
                            i += 1;
                        }
                    }
                }
                Token::Ident(kw)
                    if [
                        "by",
                        "without",
                        "on",
                        "ignoring",
                        "group_left",
                        "group_right",
                    ]
                    .contains(&kw.as_str())
                        && tokens.get(i + 1) == Some(&Token::Punct('(')) =>
                {
                    i += 2;
                    while i < tokens.len() && tokens[i] != Token::Punct(')') {
                        if let Token::Ident(label) = &tokens[i] {
                            shape.grouping.push(label.clone());
                        }
                        i += 1;
                    }
                }
                _ => {}
            }
            i += 1;
        }
        shape
    }

    /// Distinct metric names.
    fn metrics(&self) -> Vec<&String> {
        let mut seen = BTreeSet::new();
        self.metrics.iter().filter(|m| seen.insert(*m)).collect()
    }
}

fn tokenize(expr: &str) -> Vec<Token> {
    let chars: Vec<char> = expr.chars().collect();
    let mut tokens = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        if c.is_whitespace() {
            i += 1;
        } else if c == '#' {
            // A comment, to the end of the line.
            while i < chars.len() && chars[i] != '\n' {
                i += 1;
            }
        } else if c == '"' || c == '\'' || c == '`' {
            i += 1;
            while i < chars.len() && chars[i] != c {
                if chars[i] == '\\' && c != '`' {
                    i += 1;
                }
                i += 1;
            }
            i += 1;
            tokens.push(Token::Str);
        } else if c.is_ascii_alphabetic() || c == '_' || c == ':' {
            let start = i;
            while i < chars.len()
                && (chars[i].is_ascii_alphanumeric() || chars[i] == '_' || chars[i] == ':')
            {
                i += 1;
            }
            tokens.push(Token::Ident(chars[start..i].iter().collect()));
        } else if c.is_ascii_digit() || c == '.' {
            // Numbers and durations (5m, 1.5e3, 0x1f).
            while i < chars.len() && (chars[i].is_ascii_alphanumeric() || chars[i] == '.') {
                i += 1;
            }
            tokens.push(Token::Number);
        } else {
            tokens.push(Token::Punct(c));
            i += 1;
        }
    }
    tokens
}

/// A percentage bar shows its value rounded to `decimals`, but Grafana colours it by the raw
/// value: 79.96 % read "80.0%" in green, 89.96 % read "90.0%" in orange. The status page and
/// `/api/v1/usage` floor the percentage for the same reason, so a bar coloured by the 80/90
/// steps floors its value to the decimals it shows.
#[test]
fn percent_bars_never_show_a_rounded_value_in_the_colour_below() {
    let mut problems = Vec::new();
    for (name, dash) in dashboards() {
        for panel in panels(&dash) {
            let title = panel["title"].as_str().unwrap_or("(untitled)");
            let defaults = &panel["fieldConfig"]["defaults"];
            if defaults["unit"] != "percent"
                || defaults["color"]["mode"].as_str().unwrap_or("thresholds") != "thresholds"
            {
                continue;
            }
            let decimals = defaults["decimals"].as_u64();
            for t in panel["targets"].as_array().into_iter().flatten() {
                let expr = t["expr"].as_str().unwrap_or("");
                let floored = expr.trim_start().starts_with("floor(");
                // What Grafana shows for a value just under the orange step, and its colour.
                let shown = match decimals {
                    Some(d) => format!("{:.*}", d as usize, 79.96_f64),
                    None => "79.96".to_owned(), // auto decimals: Grafana picks and rounds too
                };
                if !floored && shown.parse::<f64>().unwrap_or(0.0) >= 80.0 {
                    problems.push(format!(
                        "{name}: {title:?} shows 79.96 % as \"{shown}%\" coloured green (and \
                         89.96 % as 90 in orange): floor the value to its decimals, e.g. \
                         floor(1000 * used / limit) / 10\n    {expr}"
                    ));
                }
            }
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}
