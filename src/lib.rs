//! callmeter: a metering reverse proxy for the Salesforce API.
//!
//! Every integration of a Salesforce org points at the proxy instead of Salesforce. The proxy
//! forwards the traffic unchanged, attributes each call to an integration, counts it over the
//! same rolling 24 hours Salesforce uses, and learns the org-wide figure Salesforce reports.
//!
//! # Layout
//!
//! The modules follow a request's path.
//!
//! - `config`: the TOML file, validated into typed settings at start-up; every error names the
//!   file, the key and the line.
//! - `proxy`: listeners (TCP/TLS, HTTP/1.1 and HTTP/2), routing a request to its integration,
//!   forwarding it to the org's configured upstream, observing and rewriting the response.
//! - `salesforce`: the platform's rules as pure functions — what a request is and how many
//!   calls it costs, usage headers and SOAP envelopes, Salesforce-shaped errors, login URLs.
//! - `meter`: lock-free per-minute windows per integration and org, token buckets, the usage
//!   estimate, and the decision for each call (forward, or limited by which budget).
//! - `queue`: where limited calls of `on_limit = "queue"` wait for budget, in order.
//! - `store`: the embedded SQLite database — saved windows, deferred calls, history.
//! - `metrics`: the Prometheus registry and its text rendering.
//! - `admin`: the admin listener — `/metrics`, health checks, `/api/v1/usage`.
//! - `console`: the rest of the admin listener — the status page at `/`, the threshold API
//!   (`/api/v1/orgs/{org}/threshold`) and the history API (`/api/v1/history`).
//! - `notify`: thresholds (configured or set at run time), the watcher that sees a level
//!   crossed, and the threshold emails (lettre, SMTP), all off the request path.
//! - `history`: counted calls per calendar day and integration, recorded from the meter's
//!   per-minute windows into the store and kept 30 days.
//! - `app`: assembles the modules from a config and runs them until shutdown.
//! - `sim`: a simulated Salesforce org, independent of the proxy's own rules, for tests,
//!   benchmarks and the demo; `demo` puts the proxy in front of it with some traffic.
//! - `logging`: the tracing subscriber; `markup`: escaping for XML and HTML.

pub mod admin;
pub mod app;
pub mod config;
pub mod console;
pub mod demo;
pub mod history;
pub mod logging;
pub mod markup;
pub mod meter;
pub mod metrics;
pub mod notify;
pub mod proxy;
pub mod queue;
pub mod salesforce;
pub mod sim;
pub mod store;
