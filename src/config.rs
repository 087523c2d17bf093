//! The configuration file: one TOML document, read once at start-up and turned into the typed
//! [`Config`] the rest of callmeter uses. Loading has three steps. The text is first parsed into
//! toml's spanned document tree, which reports syntax errors and lets us map any byte offset back
//! to a key path. It is then deserialized into raw serde types that mirror the file: every key is
//! optional and unknown keys are refused (`deny_unknown_fields`), so serde only ever reports a
//! misspelt key or a value of the wrong type, while missing keys are reported here, by path.
//! Finally `validate` checks every value and every cross-reference (an
//! integration's org, a match rule's listener, TLS files on disk, secrets in the environment),
//! applies the documented defaults and synthesizes the `unattributed` integration of orgs that
//! want one. A failure is a [`ConfigError`] that names the file, the key path (for example
//! `integration[2].org` or `org "acme".reserve`; array indexes count from 0), the line when it is
//! known, and what to do about it: the process refuses to start rather than fail mid-request.
//!
//! Secrets (integration keys, the admin token, the SMTP password) never appear in the file: the
//! file names environment variables and the values are read at load time. Their `Debug` output is
//! redacted so that a logged config does not leak them. Relative file paths (the store, TLS files,
//! CA bundles) are relative to the working directory, like most servers.
//!
//! This module is standalone on purpose (no `crate::` references) so it can be built and tested
//! on its own; it depends only on `serde`, `toml`, `humantime`, `thiserror`, `http`, `tracing` and
//! `tz-rs` (time zones of `[history]`).

use std::borrow::Borrow;
use std::collections::HashMap;
use std::fmt;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use serde::de::{self, Deserializer, Unexpected, Visitor};
use serde::Deserialize;
use toml::de::{DeTable, DeValue};
use toml::Spanned;

/// Where `callmeter serve` and `callmeter check` look when no `--config` is given.
pub const DEFAULT_PATH: &str = "config/callmeter.toml";
/// Environment variable that overrides [`DEFAULT_PATH`].
pub const CONFIG_ENV: &str = "CALLMETER_CONFIG";
/// Id of the integration that receives an org's unmatched traffic when `unmatched = "unattributed"`.
pub const UNATTRIBUTED: &str = "unattributed";
/// Longest id accepted. Ids end up in metric labels, URL path segments and the
/// `Sforce-Call-Options: client=` header, so a short bound keeps all three tidy.
pub const MAX_ID_LEN: usize = 64;

// Defaults, named so the example file, the docs and the tests agree on one value each.
const DEFAULT_ADMIN_LISTEN: SocketAddr =
    SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::new(127, 0, 0, 1), 9464));
const DEFAULT_ADMIN_TOKEN_ENV: &str = "CALLMETER_ADMIN_TOKEN";
const DEFAULT_STORE_PATH: &str = "data/callmeter.db";
const DEFAULT_LOG_LEVEL: &str = "info";
const DEFAULT_SHUTDOWN_GRACE: Duration = Duration::from_secs(30);
const DEFAULT_HEADER_TIMEOUT: Duration = Duration::from_secs(30);
const DEFAULT_MAX_HEADER_BYTES: u64 = 64 * 1024;
/// hyper's HTTP/1 server panics on a buffer below 8 KiB, so smaller values are refused here.
const MIN_MAX_HEADER_BYTES: u64 = 8 * 1024;
const MAX_MAX_HEADER_BYTES: u64 = 16 * 1024 * 1024;
const DEFAULT_WINDOW: Duration = Duration::from_secs(24 * 60 * 60);
/// Counters keep one bucket per minute of the window; a week bounds that memory per integration.
const MAX_WINDOW: Duration = Duration::from_secs(7 * 24 * 60 * 60);
const DEFAULT_PROBE_INTERVAL: Duration = Duration::from_secs(5 * 60);
const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const DEFAULT_RESPONSE_TIMEOUT: Duration = Duration::from_secs(120);
const DEFAULT_THRESHOLD_MIN_INTERVAL: Duration = Duration::from_secs(4 * 60 * 60);
const DEFAULT_QUEUE_MAX_DEPTH: u64 = 500;
/// The wait queue lives in memory; this bound keeps memory a function of configuration.
const MAX_QUEUE_MAX_DEPTH: u64 = 1_000_000;
const DEFAULT_QUEUE_MAX_WAIT: Duration = Duration::from_secs(30);
/// Deferred calls are stored whole; bodies larger than this are rejected rather than deferred.
const DEFAULT_DEFER_MAX_BODY: u64 = 1024 * 1024;
const MAX_DEFER_MAX_BODY: u64 = 64 * 1024 * 1024;
const DEFAULT_DEFER_MAX_ATTEMPTS: u64 = 8;
const MAX_DEFER_MAX_ATTEMPTS: u64 = 100;
/// How long delivered and discarded deferred calls stay readable at their status URL.
const DEFAULT_DEFERRED_RETENTION: Duration = Duration::from_secs(7 * 24 * 3600);
const DEFAULT_SMTP_PORT: u16 = 587;
/// Implicit TLS (SMTPS) has its own well-known port; 587 would hang in the TLS handshake.
const DEFAULT_SMTPS_PORT: u16 = 465;

// ---------------------------------------------------------------------------------------------
// Ids
// ---------------------------------------------------------------------------------------------

/// Why a string cannot be an org id, integration id or listener name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "{value:?} is not a valid id: use 1 to {MAX_ID_LEN} characters from A-Z a-z 0-9 _ . - \
     (and not \".\" or \"..\"), because ids become metric labels and URL path segments"
)]
pub struct InvalidId {
    pub value: String,
}

fn check_id(value: &str) -> Result<(), InvalidId> {
    let charset_ok = value
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'));
    // "." and ".." would be read as relative segments in `/api/v1/orgs/{org}/...`.
    if value.is_empty() || value.len() > MAX_ID_LEN || !charset_ok || value == "." || value == ".."
    {
        return Err(InvalidId {
            value: value.to_owned(),
        });
    }
    Ok(())
}

/// Defines a cheap-to-clone validated id. `Arc<str>` because ids are cloned into every metric
/// handle, route and queue entry, and comparing/hashing them must not allocate.
macro_rules! id_type {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name(Arc<str>);

        impl $name {
            /// Validates `value` against the id charset ([A-Za-z0-9_.-], 1 to 64 characters).
            pub fn new(value: &str) -> Result<Self, InvalidId> {
                check_id(value)?;
                Ok(Self(Arc::from(value)))
            }

            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl FromStr for $name {
            type Err = InvalidId;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                Self::new(s)
            }
        }

        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }

        // Sound because the derived Hash/Eq/Ord of `Arc<str>` are those of `str`: maps keyed
        // by an id can be queried with a plain `&str` taken from a URL.
        impl Borrow<str> for $name {
            fn borrow(&self) -> &str {
                &self.0
            }
        }

        impl serde::Serialize for $name {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(&self.0)
            }
        }
    };
}

id_type!(
    /// The id of an `[[org]]`, unique in the file.
    OrgId
);
id_type!(
    /// The id of an `[[integration]]`, unique within its org.
    IntegrationId
);

// ---------------------------------------------------------------------------------------------
// Typed configuration
// ---------------------------------------------------------------------------------------------

/// The validated configuration. Every default is applied and every reference resolved.
#[derive(Clone, Debug)]
pub struct Config {
    /// The file this was read from, for messages and for `callmeter check`.
    pub source: PathBuf,
    pub admin: AdminConfig,
    pub store: StoreConfig,
    pub log: LogConfig,
    pub proxy: ProxySettings,
    /// At least one.
    pub listeners: Vec<ListenerConfig>,
    /// At least one.
    pub orgs: Vec<OrgConfig>,
    /// In file order, followed by the synthesized `unattributed` integrations.
    pub integrations: Vec<IntegrationConfig>,
    pub smtp: Option<SmtpConfig>,
    pub history: HistoryConfig,
}

/// `[history]`: the daily history of counted calls (`GET /api/v1/history`, the status page).
#[derive(Clone, Debug, PartialEq)]
pub struct HistoryConfig {
    /// What `time_zone` said (`"UTC"` by default), for messages and the API.
    pub time_zone_name: String,
    /// The zone whose calendar days the history counts in.
    pub time_zone: tz::TimeZone,
}

impl Default for HistoryConfig {
    fn default() -> Self {
        HistoryConfig {
            time_zone_name: "UTC".to_owned(),
            time_zone: tz::TimeZone::utc(),
        }
    }
}

/// `[admin]`: the listener for `/metrics`, health checks and the JSON API.
#[derive(Clone, PartialEq, Eq)]
pub struct AdminConfig {
    /// Default `127.0.0.1:9464`: loopback, because the API can change thresholds.
    pub listen: SocketAddr,
    /// Default `CALLMETER_ADMIN_TOKEN`.
    pub token_env: String,
    /// The bearer token read from `token_env` at load; `None` when unset or empty, in which case
    /// mutating endpoints refuse every request.
    pub token: Option<String>,
}

/// `[store]`: the embedded database.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoreConfig {
    /// Default `data/callmeter.db`, relative to the working directory.
    pub path: PathBuf,
    /// Default 7 days: delivered and discarded deferred calls are purged after this.
    pub retention: Duration,
}

/// `[log]`: logs go to stderr.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LogConfig {
    pub format: LogFormat,
    /// A level (`error`, `warn`, `info`, `debug`, `trace`) or any `EnvFilter` directive string
    /// such as `info,callmeter=debug`; only emptiness is checked here, the filter parses the rest.
    pub level: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

/// `[proxy]`: settings shared by every listener.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProxySettings {
    /// How long in-flight requests may finish after a shutdown signal. Default 30 s.
    pub shutdown_grace: Duration,
    /// Largest request head accepted. Default 64 KiB; 8 KiB to 16 MiB.
    pub max_header_bytes: usize,
    /// How long a client may take to send a request head, counted from when the proxy starts
    /// waiting for it (so also how long an idle keep-alive connection stays open), and to
    /// finish a TLS handshake. Default 30 s.
    pub header_timeout: Duration,
    /// Default false: an incoming `X-Forwarded-For` is replaced by the peer address. True when a
    /// trusted load balancer sits in front: the peer address is appended to the incoming header.
    pub trust_forwarded_for: bool,
    /// Threads of the async runtime; `None` (default): one per core.
    pub worker_threads: Option<usize>,
}

/// `[[listener]]`: one proxy socket.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ListenerConfig {
    pub name: String,
    pub listen: SocketAddr,
    /// Scheme and authority, plus an optional path prefix, that login responses are rewritten
    /// to. A prefix is kept without its trailing slash; see [`ListenerConfig::public_base`].
    pub public_url: Option<http::Uri>,
    /// `None`: plaintext HTTP/1.1 and prior-knowledge h2c.
    pub tls: Option<TlsFiles>,
    /// Org of unmatched traffic on this listener; defaults to the only org when there is exactly one.
    pub org: Option<OrgId>,
}

impl ListenerConfig {
    /// `public_url` as a string without a trailing slash (`https://proxy.example.com` or
    /// `https://proxy.example.com/sf`), ready to prepend to a path when rewriting login responses.
    pub fn public_base(&self) -> Option<String> {
        self.public_url.as_ref().map(|uri| {
            let text = uri.to_string();
            text.trim_end_matches('/').to_owned()
        })
    }
}

/// PEM files for a TLS listener; both were readable regular files at load.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// `[[org]]`: one Salesforce org and its budget.
#[derive(Clone, Debug, PartialEq)]
pub struct OrgConfig {
    pub id: OrgId,
    /// `scheme://host[:port]`, no path. https unless `allow_plain_http`.
    pub instance_url: http::Uri,
    /// Where OAuth and SOAP `login()` go; same rules as `instance_url`.
    pub login_url: Option<http::Uri>,
    /// Extra CA (PEM) trusted for this org's upstreams; existed at load.
    pub upstream_ca: Option<PathBuf>,
    /// Default false. Plain http:// upstreams carry session ids in clear text: simulator only.
    pub allow_plain_http: bool,
    pub daily_limit: DailyLimit,
    /// Default 24 h; a whole number of minutes from 1 min to 7 days.
    pub window: Duration,
    /// Default 0. Budget kept back for critical integrations.
    pub reserve: Amount,
    pub unmatched: Unmatched,
    /// Default 5 min. While the org is exhausted, one call per interval is let through.
    pub probe_interval: Duration,
    /// Default 5 s.
    pub connect_timeout: Duration,
    /// Default 120 s; Salesforce's long-running requests last up to minutes.
    pub response_timeout: Duration,
    pub counting: Counting,
    pub threshold: Option<ThresholdConfig>,
    /// Default none. Requests of the org in flight to Salesforce at once (Salesforce allows 25
    /// long-running requests per production org); more are limited.
    pub max_in_flight: Option<u32>,
}

/// An org's daily API request limit.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DailyLimit {
    /// Learned from Salesforce's responses (`Sforce-Limit-Info`, `LimitInfoHeader`, `/limits`).
    Auto,
    Calls(u64),
}

impl DailyLimit {
    /// The configured number, if any.
    pub fn calls(&self) -> Option<u64> {
        match self {
            DailyLimit::Auto => None,
            DailyLimit::Calls(n) => Some(*n),
        }
    }
}

/// A number of calls, either absolute or relative to the org's daily limit.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Amount {
    Calls(u64),
    /// In (0, 100].
    Percent(f64),
}

impl Amount {
    /// The amount in calls for an org whose limit is `limit`; a percentage rounds down, so a
    /// quota never grants more than the share the admin wrote.
    pub fn resolve(&self, limit: u64) -> u64 {
        match *self {
            Amount::Calls(n) => n,
            Amount::Percent(p) => {
                // Integer arithmetic on millionths of a percent: `limit * p / 100` in floating
                // point can land just below a whole number (e.g. 332.99999 for 33.3 % of 1000).
                let micro = (p * 1_000_000.0).round().clamp(0.0, 100_000_000.0) as u128;
                let calls = u128::from(limit) * micro / 100_000_000;
                u64::try_from(calls).unwrap_or(u64::MAX)
            }
        }
    }
}

impl fmt::Display for Amount {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Amount::Calls(n) => write!(f, "{n}"),
            Amount::Percent(p) => write!(f, "{p}%"),
        }
    }
}

/// What happens to a request that matches no integration of the org.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Unmatched {
    /// Refused with a Salesforce-shaped error.
    Reject,
    /// Forwarded and counted against the org's `unattributed` integration.
    Unattributed,
}

/// `[org.counting]`: the rows salesforce-metering.md marks *unconfirmed*, with its defaults.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Counting {
    /// `/services/oauth2/*`. Default false.
    pub oauth: bool,
    /// `GET /services/data/vXX.X/limits`. Default true: when in doubt, over-count.
    pub limits_endpoint: bool,
    /// CometD and Pub/Sub. Default false: they have their own allocations.
    pub streaming: bool,
}

impl Default for Counting {
    fn default() -> Self {
        Counting {
            oauth: false,
            limits_endpoint: true,
            streaming: false,
        }
    }
}

/// `[org.threshold]`: the initial threshold; the admin API can change it later.
#[derive(Clone, Debug, PartialEq)]
pub struct ThresholdConfig {
    /// At least one level, in file order.
    pub levels: Vec<Amount>,
    /// Email addresses; may be empty (the threshold then only colours the dashboards).
    pub notify: Vec<String>,
    /// Default 4 h: the shortest time between two emails of an org (or of one integration's
    /// quota), except that a higher level than the last one emailed is told at once.
    pub min_interval: Duration,
}

/// `[[integration]]`: one client of an org.
#[derive(Clone, Debug, PartialEq)]
pub struct IntegrationConfig {
    pub id: IntegrationId,
    pub org: OrgId,
    pub matcher: MatchRule,
    /// Counted calls per window; `None`: no quota.
    pub quota: Option<Amount>,
    pub rate: Option<Rate>,
    pub priority: Priority,
    pub on_limit: OnLimit,
    pub reject_style: RejectStyle,
    pub queue: QueueConfig,
    pub defer: DeferConfig,
    /// Default none. This integration's requests in flight at once; more are limited.
    pub max_in_flight: Option<u32>,
    /// Default true: counted responses carry the IETF `RateLimit-Policy` / `RateLimit` headers.
    pub ratelimit_headers: bool,
    /// Default true: add `Sforce-Call-Options: client=<id>` when the caller set none, so
    /// Salesforce's Event Monitoring attributes calls the way the proxy does.
    pub call_options_client: bool,
}

/// How requests are recognised as an integration's. Every set field must hold; all `None` only
/// for the `unattributed` integration, which receives what nothing else matched.
#[derive(Clone, Default, PartialEq, Eq, Hash)]
pub struct MatchRule {
    /// Name of the listener the request arrived on.
    pub listener: Option<String>,
    /// Host header, lowercased, without port.
    pub host: Option<String>,
    /// Starts with '/', no trailing '/', never "/" alone.
    pub path_prefix: Option<String>,
    /// The secret expected in `X-Callmeter-Key`, read from `match.key_env` at load.
    pub key: Option<String>,
}

impl MatchRule {
    pub fn is_empty(&self) -> bool {
        self.listener.is_none()
            && self.host.is_none()
            && self.path_prefix.is_none()
            && self.key.is_none()
    }
}

impl fmt::Debug for MatchRule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MatchRule")
            .field("listener", &self.listener)
            .field("host", &self.host)
            .field("path_prefix", &self.path_prefix)
            .field("key", &redacted(&self.key))
            .finish()
    }
}

/// A token bucket: `per_second` refill, `burst` capacity.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Rate {
    /// > 0.
    pub per_second: f64,
    /// >= 1; defaults to `per_second` rounded up.
    pub burst: u32,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Priority {
    Normal,
    /// May use the org's `reserve`.
    Critical,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnLimit {
    Reject,
    /// Wait in memory up to `queue.max_wait`.
    Queue,
    /// Store durably, answer 202, replay when budget frees.
    Defer,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RejectStyle {
    /// 403 `REQUEST_LIMIT_EXCEEDED` (or the SOAP fault), plus `Retry-After`.
    Salesforce,
    /// 429 with `Retry-After` and `RateLimit` headers.
    Http429,
}

macro_rules! as_str_impl {
    ($name:ident { $($variant:ident => $text:literal),+ $(,)? }) => {
        impl $name {
            /// The spelling used in the file, metrics and JSON.
            pub fn as_str(&self) -> &'static str {
                match self {
                    $($name::$variant => $text),+
                }
            }
        }
    };
}
as_str_impl!(LogFormat { Text => "text", Json => "json" });
as_str_impl!(Unmatched { Reject => "reject", Unattributed => "unattributed" });
as_str_impl!(Priority { Normal => "normal", Critical => "critical" });
as_str_impl!(OnLimit { Reject => "reject", Queue => "queue", Defer => "defer" });
as_str_impl!(RejectStyle { Salesforce => "salesforce", Http429 => "http429" });
as_str_impl!(SmtpSecurity { Starttls => "starttls", Tls => "tls", None => "none" });

/// `defer = { ... }`: how `on_limit = "defer"` stores and replays calls.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct DeferConfig {
    /// Default 1 MiB; 1 byte to 64 MiB. A larger body is rejected, not deferred.
    pub max_body_bytes: usize,
    /// Default 8; 1 to 100 sends before a call is `failed`.
    pub max_attempts: u32,
}

impl Default for DeferConfig {
    fn default() -> Self {
        DeferConfig {
            max_body_bytes: DEFAULT_DEFER_MAX_BODY as usize,
            max_attempts: DEFAULT_DEFER_MAX_ATTEMPTS as u32,
        }
    }
}

/// `queue = { ... }`: the in-memory wait queue of `on_limit = "queue"`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct QueueConfig {
    /// Default 500; 1 to 1,000,000.
    pub max_depth: usize,
    /// Default 30 s.
    pub max_wait: Duration,
}

impl Default for QueueConfig {
    fn default() -> Self {
        QueueConfig {
            max_depth: DEFAULT_QUEUE_MAX_DEPTH as usize,
            max_wait: DEFAULT_QUEUE_MAX_WAIT,
        }
    }
}

/// `[smtp]`: the mailer for threshold emails.
#[derive(Clone, PartialEq, Eq)]
pub struct SmtpConfig {
    pub host: String,
    /// Default 587, or 465 when `security = "tls"`.
    pub port: u16,
    pub security: SmtpSecurity,
    pub username: Option<String>,
    pub password_env: Option<String>,
    /// Read from `password_env` at load.
    pub password: Option<String>,
    /// `addr@example.com` or `Name <addr@example.com>`.
    pub from: String,
    /// Extra CA (PEM) trusted for the server's certificate, besides the webpki roots; existed at
    /// load. For a relay with a private CA.
    pub ca: Option<PathBuf>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SmtpSecurity {
    /// Plain connection upgraded with STARTTLS (port 587).
    Starttls,
    /// Implicit TLS (port 465).
    Tls,
    /// No encryption: a local relay only.
    None,
}

fn redacted(secret: &Option<String>) -> Option<&'static str> {
    secret.as_ref().map(|_| "<redacted>")
}

impl fmt::Debug for AdminConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AdminConfig")
            .field("listen", &self.listen)
            .field("token_env", &self.token_env)
            .field("token", &redacted(&self.token))
            .finish()
    }
}

impl fmt::Debug for SmtpConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SmtpConfig")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("security", &self.security)
            .field("username", &self.username)
            .field("password_env", &self.password_env)
            .field("password", &redacted(&self.password))
            .field("from", &self.from)
            .field("ca", &self.ca)
            .finish()
    }
}

impl Config {
    pub fn org(&self, id: &str) -> Option<&OrgConfig> {
        self.orgs.iter().find(|o| o.id.as_str() == id)
    }

    pub fn listener(&self, name: &str) -> Option<&ListenerConfig> {
        self.listeners.iter().find(|l| l.name == name)
    }

    pub fn integrations_of<'a>(
        &'a self,
        org: &'a OrgId,
    ) -> impl Iterator<Item = &'a IntegrationConfig> + 'a {
        self.integrations.iter().filter(move |i| &i.org == org)
    }

    /// Things that are valid but probably not what the admin wants. Returned rather than logged
    /// during parsing because the log subscriber is only set up once the config is known.
    pub fn warnings(&self) -> Vec<String> {
        let mut out = Vec::new();
        if self.admin.token.is_none() {
            out.push(format!(
                "admin token variable {} is not set: mutating admin endpoints will refuse every request",
                self.admin.token_env
            ));
        }
        for org in &self.orgs {
            for url in std::iter::once(&org.instance_url).chain(org.login_url.as_ref()) {
                if url.scheme_str() == Some("http") {
                    out.push(format!(
                        "org {:?}: upstream {url} is plain http (allow_plain_http = true); use it only with a local simulator",
                        org.id.as_str()
                    ));
                }
            }
            let notifies = org.threshold.as_ref().is_some_and(|t| !t.notify.is_empty());
            if notifies && self.smtp.is_none() {
                out.push(format!(
                    "org {:?}: threshold.notify is set but there is no [smtp] section: no email will be sent",
                    org.id.as_str()
                ));
            }
        }
        out
    }

    /// Logs [`Config::warnings`] at WARN level.
    pub fn log_warnings(&self) {
        for warning in self.warnings() {
            tracing::warn!(config = %self.source.display(), "{warning}");
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Errors
// ---------------------------------------------------------------------------------------------

/// A configuration that cannot be used. Start-up stops; `callmeter check` exits with code 2.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error(
        "{}: cannot read the configuration file: {error}; check the path given with --config or {CONFIG_ENV}",
        .file.display()
    )]
    Read {
        file: PathBuf,
        error: std::io::Error,
    },

    #[error(
        "{}:{line}:{column}: TOML syntax error: {message}; fix the file at that position",
        .file.display()
    )]
    Syntax {
        file: PathBuf,
        line: usize,
        column: usize,
        message: String,
    },

    #[error("{}: {key}: {problem}", location(.file, .line))]
    Invalid {
        file: PathBuf,
        /// 1-based; `None` when the problem has no single place (e.g. no listener at all).
        line: Option<usize>,
        /// The key path, e.g. `integration[1].org` or `org "acme".reserve`.
        key: String,
        /// Boxed because it is large and errors travel through `Result`s.
        problem: Box<Problem>,
    },
}

fn resolved_suffix(resolved: &Option<String>) -> String {
    resolved
        .as_ref()
        .map(|r| format!(" (resolved to {r:?})"))
        .unwrap_or_default()
}

fn location(file: &Path, line: &Option<usize>) -> String {
    match line {
        Some(line) => format!("{}:{line}", file.display()),
        None => file.display().to_string(),
    }
}

impl ConfigError {
    /// The exit code of `callmeter check` and `callmeter serve` for a bad configuration.
    pub fn exit_code(&self) -> i32 {
        2
    }

    pub fn file(&self) -> &Path {
        match self {
            ConfigError::Read { file, .. }
            | ConfigError::Syntax { file, .. }
            | ConfigError::Invalid { file, .. } => file,
        }
    }

    pub fn line(&self) -> Option<usize> {
        match self {
            ConfigError::Read { .. } => None,
            ConfigError::Syntax { line, .. } => Some(*line),
            ConfigError::Invalid { line, .. } => *line,
        }
    }

    pub fn key(&self) -> Option<&str> {
        match self {
            ConfigError::Invalid { key, .. } => Some(key),
            _ => None,
        }
    }

    pub fn problem(&self) -> Option<&Problem> {
        match self {
            ConfigError::Invalid { problem, .. } => Some(problem),
            _ => None,
        }
    }
}

/// What is wrong with the value at a key, and what to do about it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Problem {
    #[error("{detail}; remove the key or fix its spelling")]
    UnknownKey { detail: String },
    #[error("{detail}{hint}")]
    WrongType { detail: String, hint: String },
    #[error("required key is missing; add it, e.g. {example}")]
    Missing { example: String },
    #[error("must not be empty")]
    Empty,
    #[error("{0}")]
    BadId(InvalidId),
    #[error("{value} is also used by {first}; {rule}")]
    Duplicate {
        value: String,
        first: String,
        rule: &'static str,
    },
    #[error(
        "same match rule as {first}: the proxy could not tell their requests apart; make one rule more specific"
    )]
    DuplicateMatch { first: String },
    #[error("org {org:?} is not defined; add an [[org]] with id = {org:?} or fix the name")]
    UndefinedOrg { org: String },
    #[error(
        "listener {name:?} is not defined; add a [[listener]] with name = {name:?} or fix the name"
    )]
    UndefinedListener { name: String },
    #[error("cannot read {what} {path:?}{}: {error}; check the path", resolved_suffix(.resolved))]
    File {
        what: &'static str,
        path: String,
        /// Where a relative path pointed, given the working directory at load.
        resolved: Option<String>,
        error: String,
    },
    #[error(
        "{url:?} is plain http://, so credentials and session ids would cross the network in clear text; \
         use https://, or set allow_plain_http = true in this [[org]] (for a local simulator only)"
    )]
    PlainHttp { url: String },
    #[error("{value:?} is not a usable URL: {reason}; write it like {example:?}")]
    BadUrl {
        value: String,
        reason: String,
        example: &'static str,
    },
    #[error("{value:?} is not a duration: {reason}; write it like \"30s\", \"5m\" or \"24h\"")]
    BadDuration { value: String, reason: String },
    #[error("{value:?} is not a socket address: {reason}; write it like \"127.0.0.1:8080\" or \"[::]:8443\"")]
    BadAddress { value: String, reason: String },
    #[error("{value:?} is out of range: a percentage must be above 0% and at most 100%")]
    PercentOutOfRange { value: String },
    #[error("{value} is not {expected}")]
    BadAmount {
        value: String,
        expected: &'static str,
    },
    #[error("{value} is out of range: expected {expected}")]
    OutOfRange { value: String, expected: String },
    #[error("window {value:?} is not a whole number of minutes from 1m to 7 days; counters keep one bucket per minute")]
    BadWindow { value: String },
    #[error("reserve of {reserve} calls leaves nothing of the daily_limit of {limit} for non-critical integrations; lower the reserve")]
    ReserveTooLarge { reserve: u64, limit: u64 },
    #[error("quota of {quota} calls exceeds the daily_limit of {limit} of org {org:?}; lower it or write a percentage such as \"40%\"")]
    QuotaTooLarge { quota: u64, limit: u64, org: String },
    #[error("{name:?} is not a valid environment variable name; use letters, digits and '_'")]
    BadEnvName { name: String },
    #[error("environment variable {name} is not set, empty or not UTF-8; export it before starting callmeter")]
    EnvUnset { name: String },
    #[error("{value:?} is not a host name: {reason}; write it like \"api.example.com\" (no scheme, no port)")]
    BadHost { value: String, reason: &'static str },
    #[error("{value:?} is not a usable path prefix: {reason}; write it like \"/salesloft\"")]
    BadPathPrefix { value: String, reason: &'static str },
    #[error("{value:?} is not an email address; write it like \"admin@example.com\"")]
    BadEmail { value: String },
    #[error("no [[listener]] is defined; add one, e.g. [[listener]] name = \"main\" listen = \"127.0.0.1:8080\"")]
    NoListener,
    #[error("no [[org]] is defined; add one, e.g. [[org]] id = \"acme\" instance_url = \"https://acme.my.salesforce.com\"")]
    NoOrg,
    #[error("the match rule is empty; give at least one of listener, host, path_prefix, key_env, e.g. match = {{ path_prefix = \"/etl\" }}")]
    EmptyMatch,
    #[error("the \"unattributed\" integration receives the org's unmatched traffic and takes no match rule; remove match")]
    UnattributedMatch,
    #[error("id \"unattributed\" is reserved for the unmatched traffic of org {org:?}, whose unmatched is \"reject\"; set unmatched = \"unattributed\" in that [[org]] or choose another id")]
    UnattributedNotEnabled { org: String },
    #[error("username is set but password_env is not; add password_env = \"CALLMETER_SMTP_PASSWORD\" and export that variable")]
    MissingPasswordEnv,
    #[error("password_env is set but username is not; add username or remove password_env")]
    PasswordWithoutUser,
    #[error("{value:?} is not a time zone: {reason}; write \"UTC\", a fixed offset such as \"+02:00\", or a name from the tz database such as \"Europe/Berlin\"")]
    BadTimeZone { value: String, reason: String },
}

// ---------------------------------------------------------------------------------------------
// Loading
// ---------------------------------------------------------------------------------------------

/// Reads and validates the file at `path`, taking secrets from the process environment.
pub fn load(path: &Path) -> Result<Config, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|error| ConfigError::Read {
        file: path.to_path_buf(),
        error,
    })?;
    let config = parse(&text, path)?;
    tracing::debug!(config = %path.display(), "configuration loaded");
    Ok(config)
}

/// Validates `text`; `source` names the file in messages. Secrets come from the process
/// environment; relative paths in the file are relative to the working directory.
pub fn parse(text: &str, source: &Path) -> Result<Config, ConfigError> {
    parse_with_env(text, source, &process_env)
}

/// [`parse`] with a supplied environment, so tests need not mutate the process's.
pub fn parse_with_env(
    text: &str,
    source: &Path,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Config, ConfigError> {
    let ctx = Ctx {
        text,
        file: source,
        env,
        newlines: text.match_indices('\n').map(|(at, _)| at).collect(),
    };
    let tree = DeTable::parse(text).map_err(|e| ctx.syntax_error(&e))?;
    let raw: RawConfig = toml::from_str(text).map_err(|e| ctx.serde_error(&e, tree.get_ref()))?;
    ctx.validate(raw)
}

fn process_env(name: &str) -> Option<String> {
    // Names were checked by `env_name`, so `var` sees no '=' or NUL.
    std::env::var(name).ok()
}

// ---------------------------------------------------------------------------------------------
// Raw types: the file as written. Every key is optional so that missing keys are reported with
// their path by `validate`; spans are kept where an error may need a line number.
// ---------------------------------------------------------------------------------------------

type S<T> = Spanned<T>;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    admin: Option<S<RawAdmin>>,
    store: Option<S<RawStore>>,
    log: Option<S<RawLog>>,
    proxy: Option<S<RawProxy>>,
    #[serde(default)]
    listener: Vec<S<RawListener>>,
    #[serde(default)]
    org: Vec<S<RawOrg>>,
    #[serde(default)]
    integration: Vec<S<RawIntegration>>,
    smtp: Option<S<RawSmtp>>,
    history: Option<S<RawHistory>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHistory {
    time_zone: Option<S<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAdmin {
    listen: Option<S<String>>,
    token_env: Option<S<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawStore {
    path: Option<S<String>>,
    retention: Option<S<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLog {
    format: Option<LogFormat>,
    level: Option<S<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawProxy {
    shutdown_grace: Option<S<String>>,
    max_header_bytes: Option<S<u64>>,
    header_timeout: Option<S<String>>,
    trust_forwarded_for: Option<bool>,
    worker_threads: Option<S<u64>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawListener {
    name: Option<S<String>>,
    listen: Option<S<String>>,
    public_url: Option<S<String>>,
    tls: Option<S<RawTls>>,
    org: Option<S<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTls {
    cert: Option<S<String>>,
    key: Option<S<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawOrg {
    id: Option<S<String>>,
    instance_url: Option<S<String>>,
    login_url: Option<S<String>>,
    upstream_ca: Option<S<String>>,
    allow_plain_http: Option<bool>,
    daily_limit: Option<S<IntOrStr>>,
    window: Option<S<String>>,
    reserve: Option<S<IntOrStr>>,
    unmatched: Option<Unmatched>,
    probe_interval: Option<S<String>>,
    connect_timeout: Option<S<String>>,
    response_timeout: Option<S<String>>,
    counting: Option<RawCounting>,
    threshold: Option<S<RawThreshold>>,
    max_in_flight: Option<S<u64>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCounting {
    oauth: Option<bool>,
    limits_endpoint: Option<bool>,
    streaming: Option<bool>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawThreshold {
    levels: Option<S<Vec<S<IntOrStr>>>>,
    notify: Option<Vec<S<String>>>,
    min_interval: Option<S<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawIntegration {
    id: Option<S<String>>,
    org: Option<S<String>>,
    #[serde(rename = "match")]
    matcher: Option<S<RawMatch>>,
    quota: Option<S<IntOrStr>>,
    rate: Option<S<RawRate>>,
    priority: Option<Priority>,
    on_limit: Option<OnLimit>,
    reject_style: Option<RejectStyle>,
    queue: Option<RawQueue>,
    defer: Option<RawDefer>,
    max_in_flight: Option<S<u64>>,
    ratelimit_headers: Option<bool>,
    call_options_client: Option<bool>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMatch {
    listener: Option<S<String>>,
    host: Option<S<String>>,
    path_prefix: Option<S<String>>,
    key_env: Option<S<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRate {
    per_second: Option<S<f64>>,
    burst: Option<S<i64>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawQueue {
    max_depth: Option<S<u64>>,
    max_wait: Option<S<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDefer {
    max_body_bytes: Option<S<u64>>,
    max_attempts: Option<S<u64>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSmtp {
    host: Option<S<String>>,
    port: Option<S<u64>>,
    security: Option<SmtpSecurity>,
    username: Option<S<String>>,
    password_env: Option<S<String>>,
    from: Option<S<String>>,
    ca: Option<S<String>>,
}

/// A value written either as a TOML integer (`500`) or a string (`"40%"`, `"auto"`); what the
/// string may say depends on the key, so it is interpreted during validation.
enum IntOrStr {
    Int(i64),
    Str(String),
}

impl<'de> Deserialize<'de> for IntOrStr {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct IntOrStrVisitor;

        impl Visitor<'_> for IntOrStrVisitor {
            type Value = IntOrStr;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a whole number or a string such as \"40%\"")
            }

            fn visit_i64<E: de::Error>(self, v: i64) -> Result<IntOrStr, E> {
                Ok(IntOrStr::Int(v))
            }

            fn visit_u64<E: de::Error>(self, v: u64) -> Result<IntOrStr, E> {
                i64::try_from(v)
                    .map(IntOrStr::Int)
                    .map_err(|_| E::invalid_value(Unexpected::Unsigned(v), &self))
            }

            fn visit_str<E: de::Error>(self, v: &str) -> Result<IntOrStr, E> {
                Ok(IntOrStr::Str(v.to_owned()))
            }
        }

        deserializer.deserialize_any(IntOrStrVisitor)
    }
}

// ---------------------------------------------------------------------------------------------
// Validation
// ---------------------------------------------------------------------------------------------

struct Ctx<'a> {
    text: &'a str,
    file: &'a Path,
    env: &'a dyn Fn(&str) -> Option<String>,
    /// Byte offsets of every '\n', so a line number is a binary search: validation asks for
    /// one per item and a file may hold thousands of integrations.
    newlines: Vec<usize>,
}

/// A validated item with the spans later cross-checks need for their messages.
struct Located<T> {
    value: T,
    key: String,
    line: Option<usize>,
}

impl<T> Located<T> {
    /// `integration[0] (line 11)`, for messages that point at an earlier item.
    fn where_(&self) -> String {
        describe(&self.key, self.line)
    }
}

fn describe(key: &str, line: Option<usize>) -> String {
    match line {
        Some(line) => format!("{key} (line {line})"),
        None => key.to_owned(),
    }
}

impl Ctx<'_> {
    /// 1-based line of the start of `span`.
    fn line(&self, span: &Range<usize>) -> usize {
        self.newlines.partition_point(|&nl| nl < span.start) + 1
    }

    fn err(
        &self,
        key: impl Into<String>,
        span: Option<Range<usize>>,
        problem: Problem,
    ) -> ConfigError {
        ConfigError::Invalid {
            file: self.file.to_path_buf(),
            line: span.map(|s| self.line(&s)),
            key: key.into(),
            problem: Box::new(problem),
        }
    }

    /// An error about the value `value` written at `key`.
    fn err_on<T>(&self, key: impl Into<String>, value: &S<T>, problem: Problem) -> ConfigError {
        self.err(key, Some(value.span()), problem)
    }

    fn syntax_error(&self, e: &toml::de::Error) -> ConfigError {
        let (line, column) = line_col(self.text, e.span().map_or(0, |s| s.start));
        ConfigError::Syntax {
            file: self.file.to_path_buf(),
            line,
            column,
            message: one_line(e.message()),
        }
    }

    /// serde only reports unknown keys and wrong types (every key is optional); the byte offset
    /// it gives is mapped back to a key path through the spanned document tree.
    fn serde_error(&self, e: &toml::de::Error, tree: &DeTable<'_>) -> ConfigError {
        let message = one_line(e.message());
        let span = e.span();
        let key = span
            .as_ref()
            .and_then(|s| key_path_at(tree, s.start))
            .unwrap_or_else(|| "(top level)".to_owned());
        let problem = if let Some(rest) = message.strip_prefix("unknown field") {
            Problem::UnknownKey {
                detail: format!("unknown key{rest}"),
            }
        } else {
            let array_of_tables = ["listener", "org", "integration"].iter().any(|k| key == *k);
            let hint = if array_of_tables && message.contains("expected a sequence") {
                format!("; write [[{key}]] with double brackets, as there may be several")
            } else {
                "; fix the value".to_owned()
            };
            Problem::WrongType {
                detail: message,
                hint,
            }
        };
        self.err(key, span, problem)
    }

    fn required<'v, T>(
        &self,
        value: &'v Option<S<T>>,
        key: &str,
        table_span: &Range<usize>,
        example: &str,
    ) -> Result<&'v S<T>, ConfigError> {
        value.as_ref().ok_or_else(|| {
            self.err(
                key,
                Some(table_span.clone()),
                Problem::Missing {
                    example: example.to_owned(),
                },
            )
        })
    }

    fn non_empty(&self, value: &S<String>, key: &str) -> Result<String, ConfigError> {
        let text = value.get_ref().trim();
        if text.is_empty() {
            return Err(self.err_on(key, value, Problem::Empty));
        }
        Ok(text.to_owned())
    }

    /// `max_in_flight`: 1 to 100,000 requests.
    fn in_flight(&self, value: &Option<S<u64>>, key: &str) -> Result<Option<u32>, ConfigError> {
        match value {
            None => Ok(None),
            Some(v) if (1..=100_000).contains(v.get_ref()) => Ok(Some(*v.get_ref() as u32)),
            Some(v) => Err(self.err_on(
                key.to_owned(),
                v,
                Problem::OutOfRange {
                    value: v.get_ref().to_string(),
                    expected: "1 to 100000 requests in flight".into(),
                },
            )),
        }
    }

    fn duration(
        &self,
        value: &Option<S<String>>,
        key: &str,
        default: Duration,
        allow_zero: bool,
    ) -> Result<Duration, ConfigError> {
        let Some(value) = value else {
            return Ok(default);
        };
        let text = value.get_ref().trim();
        let parsed = humantime::parse_duration(text).map_err(|e| {
            self.err_on(
                key,
                value,
                Problem::BadDuration {
                    value: value.get_ref().clone(),
                    reason: e.to_string(),
                },
            )
        })?;
        if parsed.is_zero() && !allow_zero {
            return Err(self.err_on(
                key,
                value,
                Problem::BadDuration {
                    value: value.get_ref().clone(),
                    reason: "it must be longer than zero".to_owned(),
                },
            ));
        }
        Ok(parsed)
    }

    fn socket_addr(&self, value: &S<String>, key: &str) -> Result<SocketAddr, ConfigError> {
        value
            .get_ref()
            .trim()
            .parse()
            .map_err(|e: std::net::AddrParseError| {
                self.err_on(
                    key,
                    value,
                    Problem::BadAddress {
                        value: value.get_ref().clone(),
                        reason: format!(
                            "{e} (an IP address and a port; host names are not resolved)"
                        ),
                    },
                )
            })
    }

    fn id<T>(
        &self,
        value: &S<String>,
        key: &str,
        make: fn(&str) -> Result<T, InvalidId>,
    ) -> Result<T, ConfigError> {
        make(value.get_ref()).map_err(|e| self.err_on(key, value, Problem::BadId(e)))
    }

    fn env_name(&self, value: &S<String>, key: &str) -> Result<String, ConfigError> {
        let name = value.get_ref().trim();
        let valid = !name.is_empty()
            && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
            && !name.as_bytes()[0].is_ascii_digit();
        if !valid {
            return Err(self.err_on(
                key,
                value,
                Problem::BadEnvName {
                    name: value.get_ref().clone(),
                },
            ));
        }
        Ok(name.to_owned())
    }

    /// Reads a required secret; an unset or empty variable is an error naming `key`.
    fn env_secret(&self, value: &S<String>, key: &str) -> Result<(String, String), ConfigError> {
        let name = self.env_name(value, key)?;
        match (self.env)(&name) {
            Some(secret) if !secret.is_empty() => Ok((name, secret)),
            _ => Err(self.err_on(key, value, Problem::EnvUnset { name })),
        }
    }

    fn readable_file(
        &self,
        value: &S<String>,
        key: &str,
        what: &'static str,
    ) -> Result<PathBuf, ConfigError> {
        let raw = value.get_ref();
        let path = PathBuf::from(raw);
        // Relative paths are relative to the working directory; saying which one it was saves
        // a round of guessing when the service runs from an unexpected directory.
        let resolved = path
            .is_relative()
            .then(|| std::env::current_dir().ok())
            .flatten()
            .map(|cwd| cwd.join(&path).display().to_string());
        let fail = |error: String| {
            self.err_on(
                key,
                value,
                Problem::File {
                    what,
                    path: raw.clone(),
                    resolved: resolved.clone(),
                    error,
                },
            )
        };
        if raw.trim().is_empty() {
            return Err(self.err_on(key, value, Problem::Empty));
        }
        // Opening, not just stat-ing, so that a permission problem shows up now and not at the
        // first TLS handshake.
        let file = std::fs::File::open(&path).map_err(|e| fail(e.to_string()))?;
        let meta = file.metadata().map_err(|e| fail(e.to_string()))?;
        if !meta.is_file() {
            return Err(fail("it is not a regular file".to_owned()));
        }
        Ok(path)
    }

    /// An upstream or public URL: http(s), a host, no user info, query or fragment.
    /// `allow_path`: a path prefix is kept (public URLs); otherwise only "/" is accepted.
    fn url(
        &self,
        value: &S<String>,
        key: &str,
        allow_path: bool,
        example: &'static str,
    ) -> Result<http::Uri, ConfigError> {
        let raw = value.get_ref();
        let bad = |reason: &str| {
            self.err_on(
                key,
                value,
                Problem::BadUrl {
                    value: raw.clone(),
                    reason: reason.to_owned(),
                    example,
                },
            )
        };
        let text = raw.trim();
        // http::Uri silently drops a fragment; refuse it rather than guess.
        if text.contains('#') {
            return Err(bad("it has a #fragment"));
        }
        let uri: http::Uri = text
            .parse()
            .map_err(|e: http::uri::InvalidUri| bad(&e.to_string()))?;
        let (Some(scheme), Some(authority)) = (uri.scheme_str(), uri.authority()) else {
            return Err(bad("it needs a scheme and a host, like https://host"));
        };
        if scheme != "http" && scheme != "https" {
            return Err(bad("the scheme must be https or http"));
        }
        if authority.as_str().contains('@') {
            return Err(bad("user info (user:password@) is not allowed in the URL"));
        }
        if authority.host().is_empty() {
            return Err(bad("it has no host"));
        }
        if uri.query().is_some() {
            return Err(bad("it has a ?query"));
        }
        let path = uri.path().trim_end_matches('/');
        if path.is_empty() {
            return Ok(uri);
        }
        if !allow_path {
            return Err(bad(
                "it must not have a path; give only scheme://host[:port]",
            ));
        }
        let normalized = format!("{scheme}://{authority}{path}");
        normalized
            .parse()
            .map_err(|e: http::uri::InvalidUri| bad(&e.to_string()))
    }

    fn upstream_url(
        &self,
        value: &S<String>,
        key: &str,
        allow_plain_http: bool,
        example: &'static str,
    ) -> Result<http::Uri, ConfigError> {
        let uri = self.url(value, key, false, example)?;
        if uri.scheme_str() == Some("http") && !allow_plain_http {
            return Err(self.err_on(
                key,
                value,
                Problem::PlainHttp {
                    url: value.get_ref().clone(),
                },
            ));
        }
        Ok(uri)
    }

    /// An integer is a number of calls; a string is "40%" or "500".
    fn amount(&self, value: &S<IntOrStr>, key: &str) -> Result<Amount, ConfigError> {
        const EXPECTED: &str =
            "a number of calls (500) or a percentage of the daily limit (\"40%\")";
        let bad = |problem| self.err_on(key, value, problem);
        match value.get_ref() {
            IntOrStr::Int(n) => u64::try_from(*n).map(Amount::Calls).map_err(|_| {
                bad(Problem::BadAmount {
                    value: n.to_string(),
                    expected: EXPECTED,
                })
            }),
            IntOrStr::Str(s) => {
                let text = s.trim();
                if let Some(percent) = text.strip_suffix('%') {
                    let p: f64 = percent.trim().parse().map_err(|_| {
                        bad(Problem::BadAmount {
                            value: format!("{s:?}"),
                            expected: EXPECTED,
                        })
                    })?;
                    if !(p.is_finite() && p > 0.0 && p <= 100.0) {
                        return Err(bad(Problem::PercentOutOfRange { value: s.clone() }));
                    }
                    Ok(Amount::Percent(p))
                } else {
                    text.parse().map(Amount::Calls).map_err(|_| {
                        bad(Problem::BadAmount {
                            value: format!("{s:?}"),
                            expected: EXPECTED,
                        })
                    })
                }
            }
        }
    }

    fn validate(&self, raw: RawConfig) -> Result<Config, ConfigError> {
        let admin = self.admin(raw.admin.as_ref())?;
        let store = self.store(raw.store.as_ref())?;
        let log = self.log(raw.log.as_ref())?;
        let proxy = self.proxy(raw.proxy.as_ref())?;

        if raw.org.is_empty() {
            return Err(self.err("org", None, Problem::NoOrg));
        }
        let mut orgs: Vec<Located<OrgConfig>> = Vec::with_capacity(raw.org.len());
        for (i, org) in raw.org.iter().enumerate() {
            let org = self.org(i, org)?;
            if let Some(first) = orgs.iter().find(|o| o.value.id == org.value.id) {
                return Err(self.err_at(
                    &org,
                    "id",
                    None,
                    Problem::Duplicate {
                        value: format!("id {:?}", org.value.id.as_str()),
                        first: first.where_(),
                        rule: "org ids must be unique",
                    },
                ));
            }
            orgs.push(org);
        }
        let org_ids: Vec<OrgId> = orgs.iter().map(|o| o.value.id.clone()).collect();

        if raw.listener.is_empty() {
            return Err(self.err("listener", None, Problem::NoListener));
        }
        let mut listeners: Vec<Located<ListenerConfig>> = Vec::with_capacity(raw.listener.len());
        for (i, listener) in raw.listener.iter().enumerate() {
            let listener = self.listener(i, listener, &org_ids)?;
            if let Some(first) = listeners
                .iter()
                .find(|l| l.value.name == listener.value.name)
            {
                return Err(self.err_at(
                    &listener,
                    "name",
                    None,
                    Problem::Duplicate {
                        value: format!("name {:?}", listener.value.name),
                        first: first.where_(),
                        rule: "listener names must be unique",
                    },
                ));
            }
            listeners.push(listener);
        }
        self.check_addresses(&admin, raw.admin.as_ref(), &listeners, &raw.listener)?;

        let mut integrations: Vec<Located<IntegrationConfig>> =
            Vec::with_capacity(raw.integration.len() + orgs.len());
        // Maps rather than pairwise scans: start-up stays fast with thousands of integrations.
        let mut by_id: HashMap<(OrgId, IntegrationId), usize> = HashMap::new();
        let mut by_rule: HashMap<MatchRule, usize> = HashMap::new();
        for (i, raw_integration) in raw.integration.iter().enumerate() {
            let integration = self.integration(i, raw_integration, &orgs, &listeners)?;
            let id_key = (integration.value.org.clone(), integration.value.id.clone());
            if let Some(first) = by_id.get(&id_key).map(|&n| &integrations[n]) {
                return Err(self.err_at(
                    &integration,
                    "id",
                    None,
                    Problem::Duplicate {
                        value: format!(
                            "id {:?} in org {:?}",
                            integration.value.id.as_str(),
                            integration.value.org.as_str()
                        ),
                        first: first.where_(),
                        rule: "integration ids must be unique within an org",
                    },
                ));
            }
            // The unattributed integration's empty rule matches nothing by itself; it is the
            // fallback of its org, so two orgs' fallbacks do not collide.
            let rule = &integration.value.matcher;
            let same_rule = if rule.is_empty() {
                None
            } else {
                by_rule.get(rule).map(|&n| &integrations[n])
            };
            if let Some(first) = same_rule {
                let match_span = raw_integration.get_ref().matcher.as_ref().map(|m| m.span());
                return Err(self.err_at(
                    &integration,
                    "match",
                    match_span,
                    Problem::DuplicateMatch {
                        first: first.where_(),
                    },
                ));
            }
            by_id.insert(id_key, integrations.len());
            if !rule.is_empty() {
                by_rule.insert(rule.clone(), integrations.len());
            }
            integrations.push(integration);
        }

        let mut integrations: Vec<IntegrationConfig> =
            integrations.into_iter().map(|i| i.value).collect();
        for org in &orgs {
            let org = &org.value;
            let defined = integrations
                .iter()
                .any(|i| i.org == org.id && i.id.as_str() == UNATTRIBUTED);
            if org.unmatched == Unmatched::Unattributed && !defined {
                integrations.push(unattributed_integration(&org.id));
            }
        }

        let smtp = raw.smtp.as_ref().map(|s| self.smtp(s)).transpose()?;
        let history = self.history(raw.history.as_ref())?;

        Ok(Config {
            source: self.file.to_path_buf(),
            admin,
            store,
            log,
            proxy,
            listeners: listeners.into_iter().map(|l| l.value).collect(),
            orgs: orgs.into_iter().map(|o| o.value).collect(),
            integrations,
            smtp,
            history,
        })
    }

    /// An error about `field` of an already validated item, on the line of `span` when the
    /// field was written, else on the item's own line.
    fn err_at<T>(
        &self,
        item: &Located<T>,
        field: &str,
        span: Option<Range<usize>>,
        problem: Problem,
    ) -> ConfigError {
        ConfigError::Invalid {
            file: self.file.to_path_buf(),
            line: span.map(|s| self.line(&s)).or(item.line),
            key: format!("{}.{field}", item.key),
            problem: Box::new(problem),
        }
    }

    fn admin(&self, raw: Option<&S<RawAdmin>>) -> Result<AdminConfig, ConfigError> {
        let raw = raw.map(|r| r.get_ref());
        let listen = match raw.and_then(|r| r.listen.as_ref()) {
            Some(listen) => self.socket_addr(listen, "admin.listen")?,
            None => DEFAULT_ADMIN_LISTEN,
        };
        let token_env = match raw.and_then(|r| r.token_env.as_ref()) {
            Some(name) => self.env_name(name, "admin.token_env")?,
            None => DEFAULT_ADMIN_TOKEN_ENV.to_owned(),
        };
        // An unset token is not an error: read-only endpoints still work (see `warnings`).
        let token = (self.env)(&token_env).filter(|t| !t.is_empty());
        Ok(AdminConfig {
            listen,
            token_env,
            token,
        })
    }

    fn store(&self, raw: Option<&S<RawStore>>) -> Result<StoreConfig, ConfigError> {
        let path = match raw.and_then(|r| r.get_ref().path.as_ref()) {
            Some(path) => PathBuf::from(self.non_empty(path, "store.path")?),
            None => PathBuf::from(DEFAULT_STORE_PATH),
        };
        let retention = self.duration(
            &raw.and_then(|r| r.get_ref().retention.clone()),
            "store.retention",
            DEFAULT_DEFERRED_RETENTION,
            false,
        )?;
        Ok(StoreConfig { path, retention })
    }

    fn log(&self, raw: Option<&S<RawLog>>) -> Result<LogConfig, ConfigError> {
        let raw = raw.map(|r| r.get_ref());
        let level = match raw.and_then(|r| r.level.as_ref()) {
            Some(level) => self.non_empty(level, "log.level")?,
            None => DEFAULT_LOG_LEVEL.to_owned(),
        };
        Ok(LogConfig {
            format: raw.and_then(|r| r.format).unwrap_or(LogFormat::Text),
            level,
        })
    }

    fn proxy(&self, raw: Option<&S<RawProxy>>) -> Result<ProxySettings, ConfigError> {
        let raw = raw.map(|r| r.get_ref());
        let shutdown_grace = self.duration(
            &raw.and_then(|r| r.shutdown_grace.clone()),
            "proxy.shutdown_grace",
            DEFAULT_SHUTDOWN_GRACE,
            true,
        )?;
        let header_timeout = self.duration(
            &raw.and_then(|r| r.header_timeout.clone()),
            "proxy.header_timeout",
            DEFAULT_HEADER_TIMEOUT,
            false,
        )?;
        let max_header_bytes = match raw.and_then(|r| r.max_header_bytes.as_ref()) {
            Some(v) => {
                let n = *v.get_ref();
                if !(MIN_MAX_HEADER_BYTES..=MAX_MAX_HEADER_BYTES).contains(&n) {
                    return Err(self.err_on(
                        "proxy.max_header_bytes",
                        v,
                        Problem::OutOfRange {
                            value: n.to_string(),
                            expected: format!(
                                "{MIN_MAX_HEADER_BYTES} to {MAX_MAX_HEADER_BYTES} bytes"
                            ),
                        },
                    ));
                }
                n
            }
            None => DEFAULT_MAX_HEADER_BYTES,
        };
        let worker_threads = match raw.and_then(|r| r.worker_threads.as_ref()) {
            None => None,
            Some(v) if (1..=1024).contains(v.get_ref()) => Some(*v.get_ref() as usize),
            Some(v) => {
                return Err(self.err_on(
                    "proxy.worker_threads",
                    v,
                    Problem::OutOfRange {
                        value: v.get_ref().to_string(),
                        expected: "1 to 1024 threads".into(),
                    },
                ))
            }
        };
        Ok(ProxySettings {
            worker_threads,
            shutdown_grace,
            header_timeout,
            // In range of usize on every supported target (at most 16 MiB).
            max_header_bytes: usize::try_from(max_header_bytes).unwrap_or(usize::MAX),
            trust_forwarded_for: raw.and_then(|r| r.trust_forwarded_for).unwrap_or(false),
        })
    }

    fn org(&self, index: usize, raw: &S<RawOrg>) -> Result<Located<OrgConfig>, ConfigError> {
        let span = raw.span();
        let r = raw.get_ref();
        let at = format!("org[{index}]");
        let id_value = self.required(&r.id, &format!("{at}.id"), &span, "id = \"acme\"")?;
        let id = self.id(id_value, &format!("{at}.id"), OrgId::new)?;
        // From here on the id is valid, and a name reads better than an index.
        let at = format!("org {:?}", id.as_str());
        let key = |k: &str| format!("{at}.{k}");

        let allow_plain_http = r.allow_plain_http.unwrap_or(false);
        let instance = self.required(
            &r.instance_url,
            &key("instance_url"),
            &span,
            "instance_url = \"https://acme.my.salesforce.com\"",
        )?;
        let instance_url = self.upstream_url(
            instance,
            &key("instance_url"),
            allow_plain_http,
            "https://acme.my.salesforce.com",
        )?;
        let login_url = r
            .login_url
            .as_ref()
            .map(|v| {
                self.upstream_url(
                    v,
                    &key("login_url"),
                    allow_plain_http,
                    "https://login.salesforce.com",
                )
            })
            .transpose()?;
        let upstream_ca = r
            .upstream_ca
            .as_ref()
            .map(|v| self.readable_file(v, &key("upstream_ca"), "CA certificate file"))
            .transpose()?;

        let daily_limit = match &r.daily_limit {
            None => DailyLimit::Auto,
            Some(v) => self.daily_limit(v, &key("daily_limit"))?,
        };

        let window = self.duration(&r.window, &key("window"), DEFAULT_WINDOW, false)?;
        if let Some(v) = &r.window {
            let whole = window.subsec_nanos() == 0 && window.as_secs() % 60 == 0;
            if !whole || window < Duration::from_secs(60) || window > MAX_WINDOW {
                return Err(self.err_on(
                    key("window"),
                    v,
                    Problem::BadWindow {
                        value: v.get_ref().clone(),
                    },
                ));
            }
        }

        let reserve = match &r.reserve {
            None => Amount::Calls(0),
            Some(v) => {
                let reserve = self.amount(v, &key("reserve"))?;
                let problem = match (reserve, daily_limit) {
                    (Amount::Calls(n), DailyLimit::Calls(limit)) if n >= limit => {
                        Some(Problem::ReserveTooLarge { reserve: n, limit })
                    }
                    // A 100 % reserve leaves nothing for normal integrations whatever the limit.
                    (Amount::Percent(p), _) if p >= 100.0 => Some(Problem::OutOfRange {
                        value: format!("{:?}", reserve.to_string()),
                        expected: "a reserve below 100% of the daily limit".to_owned(),
                    }),
                    _ => None,
                };
                if let Some(problem) = problem {
                    return Err(self.err_on(key("reserve"), v, problem));
                }
                reserve
            }
        };

        let probe_interval = self.duration(
            &r.probe_interval,
            &key("probe_interval"),
            DEFAULT_PROBE_INTERVAL,
            false,
        )?;
        let connect_timeout = self.duration(
            &r.connect_timeout,
            &key("connect_timeout"),
            DEFAULT_CONNECT_TIMEOUT,
            false,
        )?;
        let response_timeout = self.duration(
            &r.response_timeout,
            &key("response_timeout"),
            DEFAULT_RESPONSE_TIMEOUT,
            false,
        )?;

        let defaults = Counting::default();
        let counting = r.counting.as_ref().map_or(defaults, |c| Counting {
            oauth: c.oauth.unwrap_or(defaults.oauth),
            limits_endpoint: c.limits_endpoint.unwrap_or(defaults.limits_endpoint),
            streaming: c.streaming.unwrap_or(defaults.streaming),
        });

        let threshold = r
            .threshold
            .as_ref()
            .map(|t| self.threshold(t, &key("threshold")))
            .transpose()?;
        let max_in_flight = self.in_flight(&r.max_in_flight, &key("max_in_flight"))?;

        Ok(Located {
            key: at.clone(),
            line: Some(self.line(&id_value.span())),
            value: OrgConfig {
                id,
                instance_url,
                login_url,
                upstream_ca,
                allow_plain_http,
                daily_limit,
                window,
                reserve,
                unmatched: r.unmatched.unwrap_or(Unmatched::Reject),
                probe_interval,
                connect_timeout,
                response_timeout,
                counting,
                threshold,
                max_in_flight,
            },
        })
    }

    fn daily_limit(&self, v: &S<IntOrStr>, key: &str) -> Result<DailyLimit, ConfigError> {
        const EXPECTED: &str = "\"auto\" or a number of calls of at least 1";
        let bad = |value: String| {
            self.err_on(
                key,
                v,
                Problem::BadAmount {
                    value,
                    expected: EXPECTED,
                },
            )
        };
        let calls = match v.get_ref() {
            IntOrStr::Str(s) if s.trim() == "auto" => return Ok(DailyLimit::Auto),
            IntOrStr::Str(s) => s.trim().parse::<u64>().map_err(|_| bad(format!("{s:?}")))?,
            IntOrStr::Int(n) => u64::try_from(*n).map_err(|_| bad(n.to_string()))?,
        };
        if calls == 0 {
            return Err(bad("0".to_owned()));
        }
        Ok(DailyLimit::Calls(calls))
    }

    fn threshold(&self, raw: &S<RawThreshold>, at: &str) -> Result<ThresholdConfig, ConfigError> {
        let r = raw.get_ref();
        let levels_key = format!("{at}.levels");
        let levels_value = self.required(
            &r.levels,
            &levels_key,
            &raw.span(),
            "levels = [\"80%\", \"90%\"]",
        )?;
        if levels_value.get_ref().is_empty() {
            return Err(self.err_on(&levels_key, levels_value, Problem::Empty));
        }
        let mut levels = Vec::with_capacity(levels_value.get_ref().len());
        for (i, level) in levels_value.get_ref().iter().enumerate() {
            let key = format!("{levels_key}[{i}]");
            let amount = self.amount(level, &key)?;
            if amount == Amount::Calls(0) {
                return Err(self.err_on(
                    key,
                    level,
                    Problem::OutOfRange {
                        value: "0".to_owned(),
                        expected: "at least 1 call or a percentage".to_owned(),
                    },
                ));
            }
            levels.push(amount);
        }
        let mut notify = Vec::new();
        for (i, address) in r.notify.iter().flatten().enumerate() {
            let text = address.get_ref().trim();
            if !is_email(text) {
                return Err(self.err_on(
                    format!("{at}.notify[{i}]"),
                    address,
                    Problem::BadEmail {
                        value: address.get_ref().clone(),
                    },
                ));
            }
            notify.push(text.to_owned());
        }
        let min_interval = self.duration(
            &r.min_interval,
            &format!("{at}.min_interval"),
            DEFAULT_THRESHOLD_MIN_INTERVAL,
            false,
        )?;
        Ok(ThresholdConfig {
            levels,
            notify,
            min_interval,
        })
    }

    fn listener(
        &self,
        index: usize,
        raw: &S<RawListener>,
        orgs: &[OrgId],
    ) -> Result<Located<ListenerConfig>, ConfigError> {
        let span = raw.span();
        let r = raw.get_ref();
        let at = format!("listener[{index}]");
        let key = |k: &str| format!("{at}.{k}");

        let name_value = self.required(&r.name, &key("name"), &span, "name = \"main\"")?;
        check_id(name_value.get_ref())
            .map_err(|e| self.err_on(key("name"), name_value, Problem::BadId(e)))?;
        let listen_value = self.required(
            &r.listen,
            &key("listen"),
            &span,
            "listen = \"127.0.0.1:8080\"",
        )?;
        let listen = self.socket_addr(listen_value, &key("listen"))?;
        let public_url = r
            .public_url
            .as_ref()
            .map(|v| {
                self.url(
                    v,
                    &key("public_url"),
                    true,
                    "https://sfproxy.example.com:8443",
                )
            })
            .transpose()?;
        let tls = match &r.tls {
            None => None,
            Some(tls) => {
                let t = tls.get_ref();
                // Both keys first, then the files: a missing key is the likelier slip.
                let cert = self.required(
                    &t.cert,
                    &key("tls.cert"),
                    &tls.span(),
                    "cert = \"config/tls/cert.pem\"",
                )?;
                let key_file = self.required(
                    &t.key,
                    &key("tls.key"),
                    &tls.span(),
                    "key = \"config/tls/key.pem\"",
                )?;
                let cert = self.readable_file(cert, &key("tls.cert"), "TLS certificate file")?;
                let key_file = self.readable_file(key_file, &key("tls.key"), "TLS key file")?;
                Some(TlsFiles {
                    cert,
                    key: key_file,
                })
            }
        };
        let org = match &r.org {
            Some(v) => Some(self.org_ref(v, &key("org"), orgs)?),
            None if orgs.len() == 1 => orgs.first().cloned(),
            None => None,
        };
        Ok(Located {
            key: at,
            line: Some(self.line(&name_value.span())),
            value: ListenerConfig {
                name: name_value.get_ref().clone(),
                listen,
                public_url,
                tls,
                org,
            },
        })
    }

    fn org_ref(&self, v: &S<String>, key: &str, orgs: &[OrgId]) -> Result<OrgId, ConfigError> {
        orgs.iter()
            .find(|o| o.as_str() == v.get_ref())
            .cloned()
            .ok_or_else(|| {
                self.err_on(
                    key,
                    v,
                    Problem::UndefinedOrg {
                        org: v.get_ref().clone(),
                    },
                )
            })
    }

    /// Two sockets conflict when they share a port and an address, counting the unspecified
    /// address (0.0.0.0 / ::) as every address of its family. Port 0 (ephemeral, used by tests)
    /// never conflicts.
    fn check_addresses(
        &self,
        admin: &AdminConfig,
        raw_admin: Option<&S<RawAdmin>>,
        listeners: &[Located<ListenerConfig>],
        raw_listeners: &[S<RawListener>],
    ) -> Result<(), ConfigError> {
        let admin_line = raw_admin
            .and_then(|a| a.get_ref().listen.as_ref())
            .map(|l| self.line(&l.span()));
        let mut seen: Vec<(String, Option<usize>, SocketAddr)> =
            vec![("admin.listen".to_owned(), admin_line, admin.listen)];
        for (listener, raw) in listeners.iter().zip(raw_listeners) {
            let addr = listener.value.listen;
            let listen_span = raw.get_ref().listen.as_ref().map(|l| l.span());
            let clash = seen.iter().find(|(_, _, other)| {
                addr.port() != 0
                    && addr.port() == other.port()
                    && addr.is_ipv4() == other.is_ipv4()
                    && (addr.ip() == other.ip()
                        || addr.ip().is_unspecified()
                        || other.ip().is_unspecified())
            });
            if let Some((key, line, _)) = clash {
                return Err(self.err_at(
                    listener,
                    "listen",
                    listen_span.clone(),
                    Problem::Duplicate {
                        value: format!("address {addr}"),
                        first: describe(key, *line),
                        rule: "each listener needs its own address and port",
                    },
                ));
            }
            seen.push((
                format!("{}.listen", listener.key),
                listen_span.map(|s| self.line(&s)),
                listener.value.listen,
            ));
        }
        Ok(())
    }

    fn integration(
        &self,
        index: usize,
        raw: &S<RawIntegration>,
        orgs: &[Located<OrgConfig>],
        listeners: &[Located<ListenerConfig>],
    ) -> Result<Located<IntegrationConfig>, ConfigError> {
        let span = raw.span();
        let r = raw.get_ref();
        let at = format!("integration[{index}]");
        let key = |k: &str| format!("{at}.{k}");

        let id_value = self.required(&r.id, &key("id"), &span, "id = \"salesloft\"")?;
        let id = self.id(id_value, &key("id"), IntegrationId::new)?;
        let org_value = self.required(&r.org, &key("org"), &span, "org = \"acme\"")?;
        let org = orgs
            .iter()
            .map(|o| &o.value)
            .find(|o| o.id.as_str() == org_value.get_ref())
            .ok_or_else(|| {
                self.err_on(
                    key("org"),
                    org_value,
                    Problem::UndefinedOrg {
                        org: org_value.get_ref().clone(),
                    },
                )
            })?;

        let matcher = if id.as_str() == UNATTRIBUTED {
            if org.unmatched != Unmatched::Unattributed {
                return Err(self.err_on(
                    key("id"),
                    id_value,
                    Problem::UnattributedNotEnabled {
                        org: org.id.to_string(),
                    },
                ));
            }
            let rule = match &r.matcher {
                Some(m) => self.match_rule(m, &key("match"), listeners)?,
                None => MatchRule::default(),
            };
            if !rule.is_empty() {
                let span = r.matcher.as_ref().map(|m| m.span());
                return Err(self.err(key("match"), span, Problem::UnattributedMatch));
            }
            rule
        } else {
            let m = self.required(
                &r.matcher,
                &key("match"),
                &span,
                "match = { path_prefix = \"/salesloft\" }",
            )?;
            let rule = self.match_rule(m, &key("match"), listeners)?;
            if rule.is_empty() {
                return Err(self.err_on(key("match"), m, Problem::EmptyMatch));
            }
            rule
        };

        let quota = match &r.quota {
            None => None,
            Some(v) => {
                let quota = self.amount(v, &key("quota"))?;
                if let (Amount::Calls(q), DailyLimit::Calls(limit)) = (quota, org.daily_limit) {
                    if q > limit {
                        return Err(self.err_on(
                            key("quota"),
                            v,
                            Problem::QuotaTooLarge {
                                quota: q,
                                limit,
                                org: org.id.to_string(),
                            },
                        ));
                    }
                }
                Some(quota)
            }
        };

        let rate = r
            .rate
            .as_ref()
            .map(|v| self.rate(v, &key("rate")))
            .transpose()?;

        let queue = match &r.queue {
            None => QueueConfig::default(),
            Some(q) => {
                let max_depth = match &q.max_depth {
                    None => DEFAULT_QUEUE_MAX_DEPTH,
                    Some(v) => {
                        let n = *v.get_ref();
                        if !(1..=MAX_QUEUE_MAX_DEPTH).contains(&n) {
                            return Err(self.err_on(
                                key("queue.max_depth"),
                                v,
                                Problem::OutOfRange {
                                    value: n.to_string(),
                                    expected: format!("1 to {MAX_QUEUE_MAX_DEPTH} waiting calls"),
                                },
                            ));
                        }
                        n
                    }
                };
                QueueConfig {
                    // At most a million: fits usize on every target.
                    max_depth: usize::try_from(max_depth).unwrap_or(usize::MAX),
                    max_wait: self.duration(
                        &q.max_wait,
                        &key("queue.max_wait"),
                        DEFAULT_QUEUE_MAX_WAIT,
                        false,
                    )?,
                }
            }
        };

        let bounded =
            |value: &Option<S<u64>>, name: &str, default: u64, max: u64, unit: &str| match value {
                None => Ok(default),
                Some(v) if (1..=max).contains(v.get_ref()) => Ok(*v.get_ref()),
                Some(v) => Err(self.err_on(
                    key(name),
                    v,
                    Problem::OutOfRange {
                        value: v.get_ref().to_string(),
                        expected: format!("1 to {max} {unit}"),
                    },
                )),
            };
        let max_in_flight = self.in_flight(&r.max_in_flight, &key("max_in_flight"))?;
        let defer = match &r.defer {
            None => DeferConfig::default(),
            Some(d) => DeferConfig {
                max_body_bytes: bounded(
                    &d.max_body_bytes,
                    "defer.max_body_bytes",
                    DEFAULT_DEFER_MAX_BODY,
                    MAX_DEFER_MAX_BODY,
                    "bytes",
                )? as usize,
                max_attempts: bounded(
                    &d.max_attempts,
                    "defer.max_attempts",
                    DEFAULT_DEFER_MAX_ATTEMPTS,
                    MAX_DEFER_MAX_ATTEMPTS,
                    "attempts",
                )? as u32,
            },
        };

        Ok(Located {
            key: at,
            line: Some(self.line(&id_value.span())),
            value: IntegrationConfig {
                id,
                org: org.id.clone(),
                matcher,
                quota,
                rate,
                priority: r.priority.unwrap_or(Priority::Normal),
                on_limit: r.on_limit.unwrap_or(OnLimit::Reject),
                reject_style: r.reject_style.unwrap_or(RejectStyle::Salesforce),
                queue,
                defer,
                max_in_flight,
                ratelimit_headers: r.ratelimit_headers.unwrap_or(true),
                call_options_client: r.call_options_client.unwrap_or(true),
            },
        })
    }

    fn match_rule(
        &self,
        raw: &S<RawMatch>,
        at: &str,
        listeners: &[Located<ListenerConfig>],
    ) -> Result<MatchRule, ConfigError> {
        let r = raw.get_ref();
        let key = |k: &str| format!("{at}.{k}");
        let listener = match &r.listener {
            None => None,
            Some(v) => {
                let name = v.get_ref();
                if !listeners.iter().any(|l| &l.value.name == name) {
                    return Err(self.err_on(
                        key("listener"),
                        v,
                        Problem::UndefinedListener { name: name.clone() },
                    ));
                }
                Some(name.clone())
            }
        };
        let host = match &r.host {
            None => None,
            Some(v) => Some(normalize_host(v.get_ref()).map_err(|reason| {
                self.err_on(
                    key("host"),
                    v,
                    Problem::BadHost {
                        value: v.get_ref().clone(),
                        reason,
                    },
                )
            })?),
        };
        let path_prefix = match &r.path_prefix {
            None => None,
            Some(v) => Some(normalize_path_prefix(v.get_ref()).map_err(|reason| {
                self.err_on(
                    key("path_prefix"),
                    v,
                    Problem::BadPathPrefix {
                        value: v.get_ref().clone(),
                        reason,
                    },
                )
            })?),
        };
        let key_secret = match &r.key_env {
            None => None,
            Some(v) => Some(self.env_secret(v, &key("key_env"))?.1),
        };
        Ok(MatchRule {
            listener,
            host,
            path_prefix,
            key: key_secret,
        })
    }

    fn rate(&self, raw: &S<RawRate>, at: &str) -> Result<Rate, ConfigError> {
        let r = raw.get_ref();
        let per_second_key = format!("{at}.per_second");
        let per_second_value = self.required(
            &r.per_second,
            &per_second_key,
            &raw.span(),
            "per_second = 20",
        )?;
        let per_second = *per_second_value.get_ref();
        // Above a billion per second a bucket is no limit at all and the f64 arithmetic of the
        // refill loses meaning; refuse rather than accept a silent no-op.
        if !(per_second.is_finite() && per_second > 0.0 && per_second <= 1e9) {
            return Err(self.err_on(
                per_second_key,
                per_second_value,
                Problem::OutOfRange {
                    value: per_second.to_string(),
                    expected: "a number of calls per second above 0 and at most 1e9".to_owned(),
                },
            ));
        }
        let burst = match &r.burst {
            // Default: one second's worth of calls, so a steady caller never waits.
            None => (per_second.ceil() as u32).max(1),
            Some(v) => {
                let n = *v.get_ref();
                u32::try_from(n).ok().filter(|b| *b >= 1).ok_or_else(|| {
                    self.err_on(
                        format!("{at}.burst"),
                        v,
                        Problem::OutOfRange {
                            value: n.to_string(),
                            expected: format!("1 to {} calls", u32::MAX),
                        },
                    )
                })?
            }
        };
        Ok(Rate { per_second, burst })
    }

    fn smtp(&self, raw: &S<RawSmtp>) -> Result<SmtpConfig, ConfigError> {
        let span = raw.span();
        let r = raw.get_ref();
        let host_value =
            self.required(&r.host, "smtp.host", &span, "host = \"smtp.example.com\"")?;
        let host = self.non_empty(host_value, "smtp.host")?;
        let security = r.security.unwrap_or(SmtpSecurity::Starttls);
        let port = match &r.port {
            None if security == SmtpSecurity::Tls => DEFAULT_SMTPS_PORT,
            None => DEFAULT_SMTP_PORT,
            Some(v) => u16::try_from(*v.get_ref())
                .ok()
                .filter(|p| *p != 0)
                .ok_or_else(|| {
                    self.err_on(
                        "smtp.port",
                        v,
                        Problem::OutOfRange {
                            value: v.get_ref().to_string(),
                            expected: "a port from 1 to 65535".to_owned(),
                        },
                    )
                })?,
        };
        let username = r
            .username
            .as_ref()
            .map(|u| self.non_empty(u, "smtp.username"))
            .transpose()?;
        let (password_env, password) = match (&username, &r.password_env) {
            (Some(_), None) => {
                return Err(self.err(
                    "smtp.username",
                    r.username.as_ref().map(|u| u.span()),
                    Problem::MissingPasswordEnv,
                ))
            }
            (None, Some(v)) => {
                return Err(self.err_on("smtp.password_env", v, Problem::PasswordWithoutUser))
            }
            (None, None) => (None, None),
            (Some(_), Some(v)) => {
                let (name, secret) = self.env_secret(v, "smtp.password_env")?;
                (Some(name), Some(secret))
            }
        };
        let from_value = self.required(
            &r.from,
            "smtp.from",
            &span,
            "from = \"callmeter <callmeter@example.com>\"",
        )?;
        let from = from_value.get_ref().trim();
        // "Name <addr>" or a bare address, as the mailer will read it.
        if from.parse::<lettre::message::Mailbox>().is_err() {
            return Err(self.err_on(
                "smtp.from",
                from_value,
                Problem::BadEmail {
                    value: from_value.get_ref().clone(),
                },
            ));
        }
        let ca =
            r.ca.as_ref()
                .map(|v| self.readable_file(v, "smtp.ca", "CA certificate file"))
                .transpose()?;
        Ok(SmtpConfig {
            host,
            port,
            security,
            username,
            password_env,
            password,
            from: from.to_owned(),
            ca,
        })
    }

    fn history(&self, raw: Option<&S<RawHistory>>) -> Result<HistoryConfig, ConfigError> {
        let Some(value) = raw.and_then(|r| r.get_ref().time_zone.as_ref()) else {
            return Ok(HistoryConfig::default());
        };
        let name = value.get_ref().trim();
        let time_zone = parse_time_zone(name).map_err(|reason| {
            self.err_on(
                "history.time_zone",
                value,
                Problem::BadTimeZone {
                    value: value.get_ref().clone(),
                    reason,
                },
            )
        })?;
        Ok(HistoryConfig {
            time_zone_name: name.to_owned(),
            time_zone,
        })
    }
}

/// `"UTC"`, a fixed offset `"+HH:MM"` / `"-HH:MM"`, or a name of the system's tz database
/// (`/usr/share/zoneinfo`, Debian's `tzdata`), which follows daylight saving time.
fn parse_time_zone(name: &str) -> Result<tz::TimeZone, String> {
    if name.eq_ignore_ascii_case("utc") || name == "Z" {
        return Ok(tz::TimeZone::utc());
    }
    if let Some(rest) = name.strip_prefix('+').or_else(|| name.strip_prefix('-')) {
        let sign = if name.starts_with('-') { -1 } else { 1 };
        let (h, m) = rest
            .split_once(':')
            .ok_or("a fixed offset needs hours and minutes, like +02:00")?;
        let two_digits = |t: &str| t.len() == 2 && t.bytes().all(|b| b.is_ascii_digit());
        if !two_digits(h) || !two_digits(m) {
            return Err("a fixed offset needs hours and minutes, like +02:00".to_owned());
        }
        let (h, m): (i32, i32) = (h.parse().unwrap_or(99), m.parse().unwrap_or(99));
        if h > 14 || m > 59 {
            return Err("offsets range from -14:00 to +14:00".to_owned());
        }
        return tz::TimeZone::fixed(sign * (h * 3600 + m * 60)).map_err(|e| e.to_string());
    }
    let plausible = !name.is_empty()
        && !name.starts_with('/')
        && !name
            .split('/')
            .any(|part| part.is_empty() || part == "." || part == "..")
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'/' | b'_' | b'-' | b'+'));
    if !plausible {
        return Err("not a tz database name".to_owned());
    }
    // The leading ':' makes tz-rs read the zone file and never fall back to a POSIX TZ rule.
    tz::TimeZone::from_posix_tz(&format!(":{name}")).map_err(|e| {
        format!("no such zone in the system's tz database ({e}); is the tzdata package installed?")
    })
}

/// Validates a threshold given on its own, as the table `[threshold]` of a TOML document
/// (`levels`, `notify`, `min_interval`), with exactly the rules of `[org.threshold]`. This is
/// what the admin API's `PUT /api/v1/orgs/{org}/threshold` accepts. The key of an error is
/// relative to the table (`levels[1]`), and `source` names where the text came from.
pub fn parse_threshold(text: &str, source: &Path) -> Result<ThresholdConfig, ConfigError> {
    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Doc {
        threshold: Option<S<RawThreshold>>,
    }
    let ctx = Ctx {
        text,
        file: source,
        env: &process_env,
        newlines: text.match_indices('\n').map(|(at, _)| at).collect(),
    };
    let relative = |e: ConfigError| match e {
        ConfigError::Invalid {
            file,
            line,
            key,
            problem,
        } => ConfigError::Invalid {
            file,
            line,
            key: key
                .strip_prefix("threshold.")
                .map(str::to_owned)
                .unwrap_or(key),
            problem,
        },
        other => other,
    };
    let tree = DeTable::parse(text).map_err(|e| ctx.syntax_error(&e))?;
    let doc: Doc =
        toml::from_str(text).map_err(|e| relative(ctx.serde_error(&e, tree.get_ref())))?;
    let Some(raw) = doc.threshold else {
        return Err(ctx.err(
            "levels",
            None,
            Problem::Missing {
                example: "\"levels\": [\"80%\", \"90%\"]".to_owned(),
            },
        ));
    };
    ctx.threshold(&raw, "threshold").map_err(relative)
}

fn unattributed_integration(org: &OrgId) -> IntegrationConfig {
    IntegrationConfig {
        id: IntegrationId(Arc::from(UNATTRIBUTED)),
        org: org.clone(),
        matcher: MatchRule::default(),
        quota: None,
        rate: None,
        priority: Priority::Normal,
        on_limit: OnLimit::Reject,
        reject_style: RejectStyle::Salesforce,
        queue: QueueConfig::default(),
        defer: DeferConfig::default(),
        max_in_flight: None,
        ratelimit_headers: true,
        call_options_client: true,
    }
}

fn normalize_host(raw: &str) -> Result<String, &'static str> {
    let host = raw.trim().to_ascii_lowercase();
    // A trailing dot (fully qualified form) names the same host; Host headers rarely carry it.
    let host = host.strip_suffix('.').unwrap_or(&host);
    if host.is_empty() {
        return Err("it is empty");
    }
    if host.contains("://") || host.contains('/') {
        return Err("give the host only, not a URL");
    }
    if host.contains(':') {
        return Err("give the host without a port");
    }
    let charset_ok = host
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_'));
    if !charset_ok || host.starts_with('.') || host.contains("..") {
        return Err("use letters, digits, '-', '_' and dots between labels");
    }
    Ok(host.to_owned())
}

fn normalize_path_prefix(raw: &str) -> Result<String, &'static str> {
    let text = raw.trim();
    if !text.starts_with('/') {
        return Err("it must start with '/'");
    }
    let prefix = text.trim_end_matches('/');
    if prefix.is_empty() {
        return Err("\"/\" alone would match every request");
    }
    if prefix.contains("//") {
        return Err("it has an empty segment (\"//\")");
    }
    if prefix
        .bytes()
        .any(|b| b.is_ascii_whitespace() || b.is_ascii_control() || matches!(b, b'?' | b'#'))
    {
        return Err("it must not contain spaces, '?' or '#'");
    }
    if prefix.split('/').any(|seg| seg == "." || seg == "..") {
        return Err("it must not contain \".\" or \"..\" segments");
    }
    // The prefix is stripped before forwarding, so "/services" would swallow Salesforce's own
    // paths and send them upstream without their first segment.
    if prefix == "/services" || prefix.starts_with("/services/") {
        return Err("it would capture Salesforce's own /services/... paths");
    }
    Ok(prefix.to_owned())
}

/// An address the mailer can send to: lettre's own parser decides, so that no address the
/// config accepts makes a threshold email impossible to build for all its recipients.
fn is_email(text: &str) -> bool {
    text.parse::<lettre::Address>().is_ok()
}

// ---------------------------------------------------------------------------------------------
// Positions and key paths
// ---------------------------------------------------------------------------------------------

/// 1-based line and column (in characters) of a byte offset; offsets past the end or inside a
/// multi-byte character are clamped rather than trusted.
fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let before = &text.as_bytes()[..offset.min(text.len())];
    let line = before.iter().filter(|&&b| b == b'\n').count() + 1;
    let line_start = before
        .iter()
        .rposition(|&b| b == b'\n')
        .map_or(0, |p| p + 1);
    let column = String::from_utf8_lossy(&before[line_start..])
        .chars()
        .count()
        + 1;
    (line, column)
}

/// toml's messages sometimes span lines; a config error is one line so it greps well.
fn one_line(message: &str) -> String {
    message
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join("; ")
}

enum Segment<'a> {
    Key(&'a str),
    Index(usize),
}

/// The path of the deepest key whose key or value covers byte `pos`.
fn key_path_at(tree: &DeTable<'_>, pos: usize) -> Option<String> {
    let mut path = Vec::new();
    find_in_table(tree, pos, &mut path).then(|| render_path(tree, &path))
}

fn find_in_table<'a>(table: &'a DeTable<'_>, pos: usize, path: &mut Vec<Segment<'a>>) -> bool {
    for (key, value) in table.iter() {
        path.push(Segment::Key(key.get_ref().as_ref()));
        if key.span().contains(&pos) || find_in_value(value, pos, path) {
            return true;
        }
        path.pop();
    }
    false
}

fn find_in_value<'a>(
    value: &'a Spanned<DeValue<'_>>,
    pos: usize,
    path: &mut Vec<Segment<'a>>,
) -> bool {
    // Children first: a dotted key's implicit table has no useful span of its own.
    let found_inside = match value.get_ref() {
        DeValue::Table(table) => find_in_table(table, pos, path),
        DeValue::Array(items) => items.iter().enumerate().any(|(i, item)| {
            path.push(Segment::Index(i));
            let found = find_in_value(item, pos, path);
            if !found {
                path.pop();
            }
            found
        }),
        _ => false,
    };
    found_inside || value.span().contains(&pos)
}

/// Renders `org[0].threshold` as `org "acme".threshold` when that org has a valid id, matching
/// the paths `validate` produces; other arrays keep their index.
fn render_path(tree: &DeTable<'_>, path: &[Segment<'_>]) -> String {
    let mut out = String::new();
    let mut i = 0;
    while i < path.len() {
        match &path[i] {
            Segment::Key(key) => {
                if !out.is_empty() {
                    out.push('.');
                }
                let org_id = match (i, *key, path.get(1)) {
                    (0, "org", Some(Segment::Index(n))) => org_id_at(tree, *n),
                    _ => None,
                };
                if let Some(id) = org_id {
                    out.push_str(&format!("org {id:?}"));
                    i += 2;
                    continue;
                }
                let bare = !key.is_empty()
                    && key
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-'));
                if bare {
                    out.push_str(key);
                } else {
                    out.push_str(&format!("{key:?}"));
                }
            }
            Segment::Index(n) => out.push_str(&format!("[{n}]")),
        }
        i += 1;
    }
    out
}

fn org_id_at<'a>(tree: &'a DeTable<'_>, index: usize) -> Option<&'a str> {
    let orgs = tree.get("org")?.get_ref().as_array()?;
    let org = orgs.get(index)?.get_ref().as_table()?;
    let id = org.get("id")?.get_ref().as_str()?;
    check_id(id).ok().map(|_| id)
}

// ---------------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------------

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::io::Write;

    const EXAMPLE: &str = include_str!("../config/callmeter.toml");

    fn no_env(_: &str) -> Option<String> {
        None
    }

    fn try_parse(text: &str) -> Result<Config, ConfigError> {
        parse_with_env(text, Path::new("test.toml"), &no_env)
    }

    fn ok(text: &str) -> Config {
        match try_parse(text) {
            Ok(config) => config,
            Err(e) => panic!("expected a valid config, got: {e}"),
        }
    }

    fn fail(text: &str) -> ConfigError {
        match try_parse(text) {
            Ok(config) => panic!("expected an error, got {config:?}"),
            Err(e) => e,
        }
    }

    /// Asserts key, line and that the rendered message carries both.
    fn assert_err(e: &ConfigError, key: &str, line: Option<usize>) {
        assert_eq!(e.key(), Some(key), "wrong key in: {e}");
        assert_eq!(e.line(), line, "wrong line in: {e}");
        let text = e.to_string();
        let prefix = match line {
            Some(line) => format!("test.toml:{line}: {key}: "),
            None => format!("test.toml: {key}: "),
        };
        assert!(
            text.starts_with(&prefix),
            "{text:?} should start with {prefix:?}"
        );
    }

    /// The smallest valid file; tests append to or replace parts of it.
    const BASE: &str = r#"
[[listener]]
name = "main"
listen = "127.0.0.1:8080"

[[org]]
id = "acme"
instance_url = "https://acme.my.salesforce.com"
"#;

    fn with(extra: &str) -> String {
        format!("{BASE}{extra}")
    }

    #[test]
    fn example_file_loads() {
        let config = parse_with_env(EXAMPLE, Path::new("config/callmeter.toml"), &no_env)
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(config.admin.listen, "127.0.0.1:9464".parse().unwrap());
        assert_eq!(config.listeners.len(), 1);
        let main = &config.listeners[0];
        assert_eq!(main.name, "main");
        assert_eq!(main.listen, "127.0.0.1:8080".parse().unwrap());
        assert!(main.tls.is_none());
        assert_eq!(main.org.as_ref().map(OrgId::as_str), Some("acme"));
        let acme = config.org("acme").expect("org acme");
        assert_eq!(
            acme.instance_url,
            "http://127.0.0.1:9000".parse::<http::Uri>().unwrap()
        );
        assert!(acme.allow_plain_http);
        assert!(acme.threshold.is_some());
        assert!(config.smtp.is_none());
        let ids: Vec<&str> = config.integrations.iter().map(|i| i.id.as_str()).collect();
        assert_eq!(ids, ["salesloft", "etl", "middleware", UNATTRIBUTED]);
        assert!(config.warnings().iter().any(|w| w.contains("plain http")));
    }

    #[test]
    fn example_file_loads_from_disk() {
        let mut file = tempfile::NamedTempFile::new().unwrap();
        file.write_all(EXAMPLE.as_bytes()).unwrap();
        let config = load(file.path()).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(config.source, file.path());
    }

    #[test]
    fn load_reports_a_missing_file() {
        let e = load(Path::new("/nonexistent/callmeter.toml")).unwrap_err();
        assert!(matches!(e, ConfigError::Read { .. }));
        assert!(e
            .to_string()
            .starts_with("/nonexistent/callmeter.toml: cannot read"));
        assert_eq!(e.exit_code(), 2);
    }

    #[test]
    fn defaults_are_as_documented() {
        let config = ok(BASE);
        assert_eq!(
            config.admin.listen,
            SocketAddr::from(([127, 0, 0, 1], 9464))
        );
        assert_eq!(config.admin.token_env, "CALLMETER_ADMIN_TOKEN");
        assert_eq!(config.admin.token, None);
        assert_eq!(config.store.path, PathBuf::from("data/callmeter.db"));
        assert_eq!(config.log.format, LogFormat::Text);
        assert_eq!(config.log.level, "info");
        assert_eq!(
            config.proxy,
            ProxySettings {
                shutdown_grace: Duration::from_secs(30),
                max_header_bytes: 65536,
                header_timeout: Duration::from_secs(30),
                trust_forwarded_for: false,
                worker_threads: None,
            }
        );
        let listener = &config.listeners[0];
        assert_eq!(listener.public_url, None);
        assert_eq!(listener.tls, None);
        assert_eq!(listener.org.as_ref().map(OrgId::as_str), Some("acme"));
        let org = &config.orgs[0];
        assert_eq!(org.login_url, None);
        assert_eq!(org.upstream_ca, None);
        assert!(!org.allow_plain_http);
        assert_eq!(org.daily_limit, DailyLimit::Auto);
        assert_eq!(org.window, Duration::from_secs(86_400));
        assert_eq!(org.reserve, Amount::Calls(0));
        assert_eq!(org.unmatched, Unmatched::Reject);
        assert_eq!(org.probe_interval, Duration::from_secs(300));
        assert_eq!(org.connect_timeout, Duration::from_secs(5));
        assert_eq!(org.response_timeout, Duration::from_secs(120));
        assert_eq!(
            org.counting,
            Counting {
                oauth: false,
                limits_endpoint: true,
                streaming: false
            }
        );
        assert_eq!(org.threshold, None);
        assert!(config.integrations.is_empty());
        assert!(config.smtp.is_none());
    }

    #[test]
    fn integration_and_threshold_defaults() {
        let config = ok(&with(
            r#"
[org.threshold]
levels = ["80%", 90000]

[[integration]]
id = "etl"
org = "acme"
match = { path_prefix = "/etl/" }
rate = { per_second = 2.5 }
"#,
        ));
        let t = config.orgs[0].threshold.as_ref().unwrap();
        assert_eq!(t.levels, [Amount::Percent(80.0), Amount::Calls(90_000)]);
        assert!(t.notify.is_empty());
        assert_eq!(t.min_interval, Duration::from_secs(4 * 3600));
        let i = &config.integrations[0];
        assert_eq!(i.matcher.path_prefix.as_deref(), Some("/etl"));
        assert_eq!(i.quota, None);
        assert_eq!(
            i.rate,
            Some(Rate {
                per_second: 2.5,
                burst: 3
            })
        );
        assert_eq!(i.priority, Priority::Normal);
        assert_eq!(i.on_limit, OnLimit::Reject);
        assert_eq!(i.reject_style, RejectStyle::Salesforce);
        assert_eq!(
            i.queue,
            QueueConfig {
                max_depth: 500,
                max_wait: Duration::from_secs(30)
            }
        );
        assert!(i.call_options_client);
    }

    #[test]
    fn smtp_defaults_and_secrets() {
        let text = with(
            r#"
[smtp]
host = "smtp.example.com"
username = "callmeter"
password_env = "SMTP_PW"
from = "callmeter <callmeter@example.com>"
"#,
        );
        let env = |name: &str| (name == "SMTP_PW").then(|| "hunter2".to_owned());
        let config = parse_with_env(&text, Path::new("test.toml"), &env).unwrap();
        let smtp = config.smtp.as_ref().unwrap();
        assert_eq!(smtp.port, 587);
        assert_eq!(smtp.security, SmtpSecurity::Starttls);
        assert_eq!(smtp.password.as_deref(), Some("hunter2"));
        assert!(!format!("{smtp:?}").contains("hunter2"));

        let e = fail(&text);
        assert_err(&e, "smtp.password_env", Some(13));
        assert!(matches!(e.problem(), Some(Problem::EnvUnset { name }) if name == "SMTP_PW"));

        let tls = ok(&with(
            "[smtp]\nhost = \"mx\"\nsecurity = \"tls\"\nfrom = \"a@b\"\n",
        ));
        assert_eq!(tls.smtp.unwrap().port, 465);

        let e = fail(&with(
            "[smtp]\nhost = \"mx\"\nusername = \"u\"\nfrom = \"a@b\"\n",
        ));
        assert_err(&e, "smtp.username", Some(11));
        let e = fail(&with("[smtp]\nhost = \"mx\"\nfrom = \"nobody\"\n"));
        assert_err(&e, "smtp.from", Some(11));
        let e = fail(&with(
            "[smtp]\nhost = \"mx\"\nport = 70000\nfrom = \"a@b\"\n",
        ));
        assert_err(&e, "smtp.port", Some(11));
    }

    #[test]
    fn error_display_follows_the_documented_shape() {
        let e = fail(&with(
            "\n[[integration]]\nid = \"etl\"\norg = \"acmee\"\nmatch = { path_prefix = \"/etl\" }\n",
        ));
        assert_eq!(
            e.to_string(),
            "test.toml:12: integration[0].org: org \"acmee\" is not defined; \
             add an [[org]] with id = \"acmee\" or fix the name"
        );
        assert_eq!(e.exit_code(), 2);
        assert_eq!(e.file(), Path::new("test.toml"));
    }

    #[test]
    fn unknown_keys_are_named_with_their_line() {
        let e = fail(&with("\n[admin]\nlisten = \"127.0.0.1:1\"\nbogus = 1\n"));
        assert_err(&e, "admin.bogus", Some(12));
        assert!(matches!(e.problem(), Some(Problem::UnknownKey { .. })));
        assert!(e.to_string().contains("unknown key `bogus`"), "{e}");

        let e = fail("top = 1\n");
        assert_err(&e, "top", Some(1));

        let e = fail(&with("reserved = 5\n"));
        assert_err(&e, "org \"acme\".reserved", Some(9));

        let e = fail(&with(
            "[[integration]]\nid = \"a\"\norg = \"acme\"\nmatch = { path = \"/a\" }\n",
        ));
        assert_err(&e, "integration[0].match.path", Some(12));
    }

    #[test]
    fn wrong_types_are_named_with_their_line() {
        let e = fail(&with("\n[proxy]\nmax_header_bytes = \"big\"\n"));
        assert_err(&e, "proxy.max_header_bytes", Some(11));
        assert!(matches!(e.problem(), Some(Problem::WrongType { .. })));

        let e = fail(&with("allow_plain_http = \"yes\"\n"));
        assert_err(&e, "org \"acme\".allow_plain_http", Some(9));

        let e = fail(&with("[org.threshold]\nlevels = [\"80%\", true]\n"));
        assert_err(&e, "org \"acme\".threshold.levels[1]", Some(10));

        let e = fail(&with("[log]\nformat = \"xml\"\n"));
        assert_err(&e, "log.format", Some(10));
        assert!(e.to_string().contains("`text` or `json`"), "{e}");

        let e = fail("[listener]\nname = \"main\"\n");
        assert_err(&e, "listener", Some(1));
        assert!(e.to_string().contains("[[listener]]"), "{e}");
    }

    #[test]
    fn syntax_errors_give_line_and_column() {
        let e = fail("[admin]\nlisten = \n");
        match &e {
            ConfigError::Syntax { line, .. } => assert_eq!(*line, 2),
            other => panic!("expected a syntax error, got {other}"),
        }
        assert!(e.to_string().starts_with("test.toml:2:"), "{e}");

        let e = fail("[admin]\n[admin]\n");
        assert_eq!(e.line(), Some(2), "{e}");
    }

    #[test]
    fn missing_required_keys_are_named() {
        let e = fail("[[listener]]\nlisten = \"127.0.0.1:8080\"\n[[org]]\nid = \"a\"\ninstance_url = \"https://a.example\"\n");
        assert_err(&e, "listener[0].name", Some(1));
        assert!(matches!(e.problem(), Some(Problem::Missing { .. })));

        let e = fail("[[listener]]\nname = \"m\"\nlisten = \"127.0.0.1:8080\"\n\n[[org]]\ninstance_url = \"https://a.example\"\n");
        assert_err(&e, "org[0].id", Some(5));

        let e = fail(
            "[[listener]]\nname = \"m\"\nlisten = \"127.0.0.1:8080\"\n\n[[org]]\nid = \"a\"\n",
        );
        assert_err(&e, "org \"a\".instance_url", Some(5));

        let e = fail(&with(
            "\n[[integration]]\nid = \"etl\"\nmatch = { path_prefix = \"/etl\" }\n",
        ));
        assert_err(&e, "integration[0].org", Some(10));
        assert!(e.to_string().contains("org = \"acme\""), "{e}");

        let e = fail(&with("\n[[integration]]\nid = \"etl\"\norg = \"acme\"\n"));
        assert_err(&e, "integration[0].match", Some(10));

        let e = fail(&with("[[integration]]\nid = \"x\"\norg = \"acme\"\nrate = { burst = 3 }\nmatch = { host = \"x\" }\n"));
        assert_err(&e, "integration[0].rate.per_second", Some(12));
    }

    #[test]
    fn at_least_one_listener_and_one_org() {
        let e = fail("");
        assert_err(&e, "org", None);
        assert!(matches!(e.problem(), Some(Problem::NoOrg)));
        let e = fail("[[org]]\nid = \"a\"\ninstance_url = \"https://a.example\"\n");
        assert_err(&e, "listener", None);
        assert!(matches!(e.problem(), Some(Problem::NoListener)));
    }

    #[test]
    fn duplicate_listener_names() {
        let e = fail(&with(
            "[[listener]]\nname = \"main\"\nlisten = \"127.0.0.1:8081\"\n",
        ));
        assert_err(&e, "listener[1].name", Some(10));
        assert!(e.to_string().contains("listener[0] (line 3)"), "{e}");
    }

    #[test]
    fn duplicate_org_ids() {
        let e = fail(&with(
            "[[org]]\nid = \"acme\"\ninstance_url = \"https://b.example\"\n",
        ));
        assert_err(&e, "org \"acme\".id", Some(10));
        assert!(e.to_string().contains("org \"acme\" (line 7)"), "{e}");
    }

    #[test]
    fn duplicate_listen_addresses() {
        let e = fail(&with(
            "[[listener]]\nname = \"other\"\nlisten = \"127.0.0.1:8080\"\n",
        ));
        assert_err(&e, "listener[1].listen", Some(11));
        assert!(e.to_string().contains("listener[0].listen (line 4)"), "{e}");

        let e = fail(&with(
            "[[listener]]\nname = \"other\"\nlisten = \"0.0.0.0:8080\"\n",
        ));
        assert_err(&e, "listener[1].listen", Some(11));

        let e = fail(&with("[admin]\nlisten = \"127.0.0.1:8080\"\n"));
        assert_err(&e, "listener[0].listen", Some(4));
        assert!(e.to_string().contains("admin.listen (line 10)"), "{e}");

        // Port 0 asks the OS for a free port: never a conflict (tests rely on it).
        ok("[admin]\nlisten = \"127.0.0.1:0\"\n[[listener]]\nname = \"a\"\nlisten = \"127.0.0.1:0\"\n\
            [[listener]]\nname = \"b\"\nlisten = \"127.0.0.1:0\"\n\
            [[org]]\nid = \"o\"\ninstance_url = \"https://o.example\"\n");
        // Different families do not conflict.
        ok(&with(
            "[[listener]]\nname = \"v6\"\nlisten = \"[::1]:8080\"\n",
        ));
    }

    const TWO_INTEGRATIONS: &str = r#"
[[integration]]
id = "etl"
org = "acme"
match = { path_prefix = "/etl" }

[[integration]]
id = "ID2"
org = "acme"
match = { path_prefix = "/PREFIX2" }
"#;

    #[test]
    fn duplicate_integration_ids_within_an_org() {
        let e = fail(&with(&TWO_INTEGRATIONS.replace("ID2", "etl")));
        assert_err(&e, "integration[1].id", Some(16));
        assert!(e.to_string().contains("integration[0] (line 11)"), "{e}");

        // The same id in another org is fine.
        ok(&with(&format!(
            "[[org]]\nid = \"beta\"\ninstance_url = \"https://b.example\"\n{}",
            TWO_INTEGRATIONS.replace("ID2\"\norg = \"acme", "etl\"\norg = \"beta")
        )));
    }

    #[test]
    fn duplicate_match_rules() {
        let e = fail(&with(&TWO_INTEGRATIONS.replace("PREFIX2", "etl/")));
        assert_err(&e, "integration[1].match", Some(18));
        assert!(matches!(e.problem(), Some(Problem::DuplicateMatch { .. })));
        // Combining keys makes a rule distinct.
        ok(&with(&TWO_INTEGRATIONS.replace(
            "\"/PREFIX2\" }",
            "\"/etl\", host = \"etl.example.com\" }",
        )));
    }

    #[test]
    fn integration_naming_an_undefined_org() {
        let e = fail(&with(
            &TWO_INTEGRATIONS.replace("ID2\"\norg = \"acme", "x\"\norg = \"nope"),
        ));
        assert_err(&e, "integration[1].org", Some(17));
        assert!(matches!(e.problem(), Some(Problem::UndefinedOrg { org }) if org == "nope"));
    }

    #[test]
    fn match_listener_must_exist() {
        let e = fail(&with(
            "[[integration]]\nid = \"a\"\norg = \"acme\"\nmatch = { listener = \"mian\" }\n",
        ));
        assert_err(&e, "integration[0].match.listener", Some(12));
        assert!(
            e.to_string().contains("listener \"mian\" is not defined"),
            "{e}"
        );
        let config = ok(&with(
            "[[integration]]\nid = \"a\"\norg = \"acme\"\nmatch = { listener = \"main\" }\n",
        ));
        assert_eq!(
            config.integrations[0].matcher.listener.as_deref(),
            Some("main")
        );
    }

    #[test]
    fn listener_org_must_exist_and_defaults_only_with_one_org() {
        let e = fail(&BASE.replace("8080\"", "8080\"\norg = \"acm\""));
        assert_err(&e, "listener[0].org", Some(5));

        let two = with("[[org]]\nid = \"beta\"\ninstance_url = \"https://b.example\"\n");
        assert_eq!(ok(&two).listeners[0].org, None);
        let pinned = two.replace("8080\"", "8080\"\norg = \"beta\"");
        assert_eq!(
            ok(&pinned).listeners[0].org.as_ref().map(OrgId::as_str),
            Some("beta")
        );
    }

    #[test]
    fn tls_files_must_exist() {
        let dir = tempfile::tempdir().unwrap();
        let cert = dir.path().join("cert.pem");
        let key = dir.path().join("key.pem");
        std::fs::write(&cert, "cert").unwrap();
        std::fs::write(&key, "key").unwrap();
        let tls = |c: &Path, k: &Path| {
            BASE.replace(
                "8080\"",
                &format!(
                    "8080\"\ntls = {{ cert = {:?}, key = {:?} }}",
                    c.display().to_string(),
                    k.display().to_string()
                ),
            )
        };
        let config = ok(&tls(&cert, &key));
        assert_eq!(
            config.listeners[0].tls,
            Some(TlsFiles {
                cert: cert.clone(),
                key: key.clone()
            })
        );

        let missing = dir.path().join("missing.pem");
        let e = fail(&tls(&missing, &key));
        assert_err(&e, "listener[0].tls.cert", Some(5));
        assert!(matches!(e.problem(), Some(Problem::File { .. })));
        let e = fail(&tls(&cert, &missing));
        assert_err(&e, "listener[0].tls.key", Some(5));
        // A directory is not a certificate.
        let e = fail(&tls(dir.path(), &key));
        assert_err(&e, "listener[0].tls.cert", Some(5));
        assert!(e.to_string().contains("not a regular file"), "{e}");

        let e = fail(&BASE.replace("8080\"", "8080\"\ntls = { cert = \"x\" }"));
        assert_err(&e, "listener[0].tls.key", Some(5));
        let e = fail(&BASE.replace(
            "8080\"",
            "8080\"\ntls = { cert = \"no/such.pem\", key = \"k\" }",
        ));
        assert_err(&e, "listener[0].tls.cert", Some(5));
        assert!(
            e.to_string().contains("/no/such.pem\")"),
            "names the resolved path: {e}"
        );
    }

    #[test]
    fn upstream_ca_must_exist() {
        let e = fail(&with("upstream_ca = \"/nonexistent/ca.pem\"\n"));
        assert_err(&e, "org \"acme\".upstream_ca", Some(9));
        let ca = tempfile::NamedTempFile::new().unwrap();
        let config = ok(&with(&format!(
            "upstream_ca = {:?}\n",
            ca.path().display().to_string()
        )));
        assert_eq!(config.orgs[0].upstream_ca.as_deref(), Some(ca.path()));
    }

    #[test]
    fn plain_http_needs_allow_plain_http() {
        let text = BASE.replace("https://acme.my.salesforce.com", "http://127.0.0.1:9000");
        let e = fail(&text);
        assert_err(&e, "org \"acme\".instance_url", Some(8));
        assert!(matches!(e.problem(), Some(Problem::PlainHttp { .. })));
        let config = ok(&format!("{text}allow_plain_http = true\n"));
        assert_eq!(config.orgs[0].instance_url.scheme_str(), Some("http"));

        let e = fail(&with("login_url = \"http://login.example\"\n"));
        assert_err(&e, "org \"acme\".login_url", Some(9));
    }

    #[test]
    fn bad_urls() {
        for bad in [
            "acme.my.salesforce.com",
            "ftp://acme.example",
            "https://acme.example/services",
            "https://acme.example?x=1",
            "https://user:pw@acme.example",
            "https://acme.example#top",
            "https:// spaced",
            "",
        ] {
            let e = fail(&BASE.replace("https://acme.my.salesforce.com", bad));
            assert_err(&e, "org \"acme\".instance_url", Some(8));
            assert!(
                matches!(e.problem(), Some(Problem::BadUrl { .. })),
                "{bad}: {e}"
            );
        }
        let e = fail(&BASE.replace("8080\"", "8080\"\npublic_url = \"sfproxy.example.com\""));
        assert_err(&e, "listener[0].public_url", Some(5));
    }

    #[test]
    fn public_url_keeps_a_prefix_without_trailing_slash() {
        let url = |u: &str| {
            let config = ok(&BASE.replace("8080\"", &format!("8080\"\npublic_url = {u:?}")));
            (
                config.listeners[0].public_url.clone().unwrap(),
                config.listeners[0].public_base().unwrap(),
            )
        };
        let (uri, base) = url("https://sfproxy.example.com:8443/");
        assert_eq!(
            uri.authority().unwrap().as_str(),
            "sfproxy.example.com:8443"
        );
        assert_eq!(base, "https://sfproxy.example.com:8443");
        let (uri, base) = url("https://sfproxy.example.com/sf/");
        assert_eq!(uri.path(), "/sf");
        assert_eq!(base, "https://sfproxy.example.com/sf");
    }

    #[test]
    fn bad_durations() {
        let e = fail(&with("probe_interval = \"5 minutes-ish\"\n"));
        assert_err(&e, "org \"acme\".probe_interval", Some(9));
        assert!(matches!(e.problem(), Some(Problem::BadDuration { .. })));
        let e = fail(&with("connect_timeout = \"0s\"\n"));
        assert_err(&e, "org \"acme\".connect_timeout", Some(9));
        let e = fail(&with("[proxy]\nshutdown_grace = \"soon\"\n"));
        assert_err(&e, "proxy.shutdown_grace", Some(10));
        // Zero grace is allowed: stop at once.
        let config = ok(&with("[proxy]\nshutdown_grace = \"0s\"\n"));
        assert_eq!(config.proxy.shutdown_grace, Duration::ZERO);
        let config = ok(&with("response_timeout = \"1m 30s\"\n"));
        assert_eq!(config.orgs[0].response_timeout, Duration::from_secs(90));
        // A zero header timeout would close every connection before its first request.
        let e = fail(&with("[proxy]\nheader_timeout = \"0s\"\n"));
        assert_err(&e, "proxy.header_timeout", Some(10));
        let config = ok(&with("[proxy]\nheader_timeout = \"5s\"\n"));
        assert_eq!(config.proxy.header_timeout, Duration::from_secs(5));
    }

    #[test]
    fn window_must_be_whole_minutes() {
        for bad in ["90s", "30s", "8d", "1m 500ms"] {
            let e = fail(&with(&format!("window = {bad:?}\n")));
            assert_err(&e, "org \"acme\".window", Some(9));
            assert!(
                matches!(e.problem(), Some(Problem::BadWindow { .. })),
                "{bad}: {e}"
            );
        }
        assert_eq!(
            ok(&with("window = \"5m\"\n")).orgs[0].window,
            Duration::from_secs(300)
        );
    }

    #[test]
    fn percentages_must_be_in_range() {
        for bad in ["0%", "150%", "-5%", "NaN%"] {
            let e = fail(&with(&format!("reserve = {bad:?}\n")));
            assert_err(&e, "org \"acme\".reserve", Some(9));
            assert!(
                matches!(e.problem(), Some(Problem::PercentOutOfRange { .. })),
                "{bad}: {e}"
            );
        }
        let e = fail(&with("reserve = \"lots\"\n"));
        assert!(
            matches!(e.problem(), Some(Problem::BadAmount { .. })),
            "{e}"
        );
        let e = fail(&with("reserve = -1\n"));
        assert!(
            matches!(e.problem(), Some(Problem::BadAmount { .. })),
            "{e}"
        );
        let e = fail(&with("reserve = \"100%\"\n"));
        assert_err(&e, "org \"acme\".reserve", Some(9));

        let config = ok(&with("reserve = \"5%\"\n"));
        assert_eq!(config.orgs[0].reserve, Amount::Percent(5.0));
        let config = ok(&with("reserve = \"500\"\n"));
        assert_eq!(config.orgs[0].reserve, Amount::Calls(500));
    }

    #[test]
    fn reserve_must_be_below_a_numeric_limit() {
        let e = fail(&with("daily_limit = 15000\nreserve = 15000\n"));
        assert_err(&e, "org \"acme\".reserve", Some(10));
        assert!(matches!(
            e.problem(),
            Some(Problem::ReserveTooLarge {
                reserve: 15000,
                limit: 15000
            })
        ));
        let config = ok(&with("daily_limit = 15000\nreserve = 14999\n"));
        assert_eq!(config.orgs[0].daily_limit, DailyLimit::Calls(15000));
        // With an automatic limit the number cannot be checked yet.
        ok(&with("reserve = 1000000\n"));
    }

    #[test]
    fn daily_limit_forms() {
        assert_eq!(
            ok(&with("daily_limit = \"auto\"\n")).orgs[0].daily_limit,
            DailyLimit::Auto
        );
        assert_eq!(
            ok(&with("daily_limit = \"15000\"\n")).orgs[0]
                .daily_limit
                .calls(),
            Some(15000)
        );
        for bad in ["0", "\"lots\"", "-3"] {
            let e = fail(&with(&format!("daily_limit = {bad}\n")));
            assert_err(&e, "org \"acme\".daily_limit", Some(9));
        }
    }

    #[test]
    fn quota_must_not_exceed_a_numeric_limit() {
        let text = with(
            "daily_limit = 1000\n[[integration]]\nid = \"a\"\norg = \"acme\"\nmatch = { host = \"a.example\" }\nquota = 1001\n",
        );
        let e = fail(&text);
        assert_err(&e, "integration[0].quota", Some(14));
        assert!(matches!(
            e.problem(),
            Some(Problem::QuotaTooLarge {
                quota: 1001,
                limit: 1000,
                ..
            })
        ));
        let config = ok(&text.replace("1001", "\"40%\""));
        assert_eq!(config.integrations[0].quota, Some(Amount::Percent(40.0)));
    }

    #[test]
    fn key_env_must_be_set() {
        let text = with(
            "[[integration]]\nid = \"etl\"\norg = \"acme\"\nmatch = { key_env = \"ETL_KEY\" }\n",
        );
        let e = fail(&text);
        assert_err(&e, "integration[0].match.key_env", Some(12));
        assert!(e.to_string().contains("ETL_KEY is not set"), "{e}");

        let empty = |_: &str| Some(String::new());
        let e = parse_with_env(&text, Path::new("test.toml"), &empty).unwrap_err();
        assert_err(&e, "integration[0].match.key_env", Some(12));

        let set = |name: &str| (name == "ETL_KEY").then(|| "s3cret".to_owned());
        let config = parse_with_env(&text, Path::new("test.toml"), &set).unwrap();
        assert_eq!(
            config.integrations[0].matcher.key.as_deref(),
            Some("s3cret")
        );
        assert!(!format!("{config:?}").contains("s3cret"));

        let e = fail(&text.replace("ETL_KEY", "ETL=KEY"));
        assert!(
            matches!(e.problem(), Some(Problem::BadEnvName { .. })),
            "{e}"
        );
    }

    #[test]
    fn admin_token_comes_from_the_environment() {
        let env = |name: &str| (name == "CALLMETER_ADMIN_TOKEN").then(|| "tok".to_owned());
        let config = parse_with_env(BASE, Path::new("test.toml"), &env).unwrap();
        assert_eq!(config.admin.token.as_deref(), Some("tok"));
        assert!(!format!("{:?}", config.admin).contains("tok\""));
        assert!(config.warnings().is_empty());
        assert!(ok(BASE)
            .warnings()
            .iter()
            .any(|w| w.contains("CALLMETER_ADMIN_TOKEN")));
    }

    #[test]
    fn ids_are_restricted_to_a_safe_charset() {
        let e = fail(&BASE.replace("id = \"acme\"", "id = \"ac me\""));
        assert_err(&e, "org[0].id", Some(7));
        assert!(matches!(e.problem(), Some(Problem::BadId(_))));
        let e = fail(&BASE.replace("name = \"main\"", "name = \"main/1\""));
        assert_err(&e, "listener[0].name", Some(3));
        for bad in ["", "..", "é", "a{b}"] {
            let e = fail(&with(&format!(
                "[[integration]]\nid = {bad:?}\norg = \"acme\"\nmatch = {{ host = \"x\" }}\n"
            )));
            assert_err(&e, "integration[0].id", Some(10));
        }
        assert!(OrgId::new("acme-prod_2.eu").is_ok());
        assert!(OrgId::new(&"a".repeat(MAX_ID_LEN + 1)).is_err());
        assert_eq!(IntegrationId::new("etl").unwrap().to_string(), "etl");
    }

    #[test]
    fn unattributed_is_synthesized_when_asked_for() {
        let config = ok(&with("unmatched = \"unattributed\"\n"));
        assert_eq!(config.integrations.len(), 1);
        let u = &config.integrations[0];
        assert_eq!(u.id.as_str(), UNATTRIBUTED);
        assert_eq!(u.org.as_str(), "acme");
        assert!(u.matcher.is_empty());

        // A user-defined one is kept, with its settings.
        let config = ok(&with(
            "unmatched = \"unattributed\"\n[[integration]]\nid = \"unattributed\"\norg = \"acme\"\nquota = 100\n",
        ));
        assert_eq!(config.integrations.len(), 1);
        assert_eq!(config.integrations[0].quota, Some(Amount::Calls(100)));

        let e = fail(&with(
            "unmatched = \"unattributed\"\n[[integration]]\nid = \"unattributed\"\norg = \"acme\"\nmatch = { host = \"x\" }\n",
        ));
        assert_err(&e, "integration[0].match", Some(13));
        assert!(matches!(e.problem(), Some(Problem::UnattributedMatch)));

        let e = fail(&with(
            "[[integration]]\nid = \"unattributed\"\norg = \"acme\"\n",
        ));
        assert_err(&e, "integration[0].id", Some(10));
        assert!(matches!(
            e.problem(),
            Some(Problem::UnattributedNotEnabled { .. })
        ));

        // An org with unmatched = "reject" gets none.
        assert!(ok(BASE).integrations.is_empty());
    }

    #[test]
    fn empty_match_is_refused() {
        let e = fail(&with(
            "[[integration]]\nid = \"a\"\norg = \"acme\"\nmatch = {}\n",
        ));
        assert_err(&e, "integration[0].match", Some(12));
        assert!(matches!(e.problem(), Some(Problem::EmptyMatch)));
    }

    #[test]
    fn hosts_and_path_prefixes_are_normalized_or_refused() {
        assert_eq!(
            normalize_host("API.Example.com.").as_deref(),
            Ok("api.example.com")
        );
        assert!(normalize_host("api.example.com:8080").is_err());
        assert!(normalize_host("https://api.example.com").is_err());
        assert!(normalize_host("").is_err());
        assert_eq!(normalize_path_prefix("/a/b/").as_deref(), Ok("/a/b"));
        for bad in [
            "/",
            "//",
            "a",
            "/a//b",
            "/a?b",
            "/a b",
            "/../x",
            "/services",
            "/services/data",
        ] {
            assert!(normalize_path_prefix(bad).is_err(), "{bad}");
        }
        let e = fail(&with(
            "[[integration]]\nid = \"a\"\norg = \"acme\"\nmatch = { host = \"a:1\" }\n",
        ));
        assert_err(&e, "integration[0].match.host", Some(12));
        let e = fail(&with(
            "[[integration]]\nid = \"a\"\norg = \"acme\"\nmatch = { path_prefix = \"/\" }\n",
        ));
        assert_err(&e, "integration[0].match.path_prefix", Some(12));
    }

    #[test]
    fn rate_and_queue_bounds() {
        let integration = |extra: &str| {
            with(&format!("[[integration]]\nid = \"a\"\norg = \"acme\"\nmatch = {{ host = \"a\" }}\n{extra}\n"))
        };
        let e = fail(&integration("rate = { per_second = 0 }"));
        assert_err(&e, "integration[0].rate.per_second", Some(13));
        let e = fail(&integration("rate = { per_second = 1, burst = 0 }"));
        assert_err(&e, "integration[0].rate.burst", Some(13));
        let e = fail(&integration("queue = { max_depth = 0 }"));
        assert_err(&e, "integration[0].queue.max_depth", Some(13));
        let e = fail(&integration("queue = { max_wait = \"forever\" }"));
        assert_err(&e, "integration[0].queue.max_wait", Some(13));
        let config = ok(&integration(
            "rate = { per_second = 20, burst = 40 }\non_limit = \"queue\"\npriority = \"critical\"\nreject_style = \"http429\"\ncall_options_client = false",
        ));
        let i = &config.integrations[0];
        assert_eq!(
            i.rate,
            Some(Rate {
                per_second: 20.0,
                burst: 40
            })
        );
        assert_eq!(
            (i.on_limit, i.priority, i.reject_style),
            (OnLimit::Queue, Priority::Critical, RejectStyle::Http429)
        );
        assert!(!i.call_options_client);
    }

    #[test]
    fn proxy_limits() {
        let e = fail(&with("[proxy]\nmax_header_bytes = 100\n"));
        assert_err(&e, "proxy.max_header_bytes", Some(10));
        let config = ok(&with(
            "[proxy]\nmax_header_bytes = 8192\ntrust_forwarded_for = true\n",
        ));
        assert_eq!(config.proxy.max_header_bytes, 8192);
        assert!(config.proxy.trust_forwarded_for);
    }

    #[test]
    fn threshold_validation() {
        let e = fail(&with("[org.threshold]\nlevels = []\n"));
        assert_err(&e, "org \"acme\".threshold.levels", Some(10));
        let e = fail(&with("[org.threshold]\nnotify = [\"a@b\"]\n"));
        assert_err(&e, "org \"acme\".threshold.levels", Some(9));
        let e = fail(&with(
            "[org.threshold]\nlevels = [\"80%\"]\nnotify = [\"admin.example.com\"]\n",
        ));
        assert_err(&e, "org \"acme\".threshold.notify[0]", Some(11));
        let config = ok(&with(
            "[org.threshold]\nlevels = [\"80%\"]\nnotify = [\"admin@example.com\"]\n",
        ));
        assert!(config.warnings().iter().any(|w| w.contains("no [smtp]")));
    }

    #[test]
    fn history_time_zones() {
        let config = ok(BASE);
        assert_eq!(config.history.time_zone_name, "UTC");
        assert_eq!(config.history.time_zone, tz::TimeZone::utc());
        let plus2 = ok(&with("[history]\ntime_zone = \"+02:00\"\n"));
        assert_eq!(plus2.history.time_zone, tz::TimeZone::fixed(7200).unwrap());
        let minus = ok(&with("[history]\ntime_zone = \"-09:30\"\n"));
        assert_eq!(
            minus.history.time_zone,
            tz::TimeZone::fixed(-34_200).unwrap()
        );
        for bad in [
            "Mars/Olympus_Mons",
            "+2",
            "+15:00",
            "../../etc/passwd",
            "/etc/localtime",
            "",
        ] {
            let e = fail(&with(&format!("[history]\ntime_zone = {bad:?}\n")));
            assert_err(&e, "history.time_zone", Some(10));
            assert!(e.to_string().contains("is not a time zone"), "{e}");
        }
        if std::path::Path::new("/usr/share/zoneinfo/Europe/Berlin").exists() {
            let berlin = ok(&with("[history]\ntime_zone = \"Europe/Berlin\"\n"));
            assert_eq!(berlin.history.time_zone_name, "Europe/Berlin");
        }
        let e = fail(&with("[history]\nzone = \"UTC\"\n"));
        assert_eq!(e.key(), Some("history.zone"), "{e}");
    }

    #[test]
    fn smtp_ca_must_exist() {
        let smtp = "[smtp]\nhost = \"mx\"\nfrom = \"a@b\"\n";
        let e = fail(&with(&format!("{smtp}ca = \"/nonexistent/ca.pem\"\n")));
        assert_err(&e, "smtp.ca", Some(12));
        let ca = tempfile::NamedTempFile::new().unwrap();
        let config = ok(&with(&format!("{smtp}ca = {:?}\n", ca.path())));
        assert_eq!(config.smtp.unwrap().ca.as_deref(), Some(ca.path()));
    }

    #[test]
    fn a_threshold_alone_is_validated_like_org_threshold() {
        let source = Path::new("request body");
        let t = parse_threshold(
            "[threshold]\nlevels = [\"80%\", 900]\nnotify = [\"a@example.com\"]\n",
            source,
        )
        .expect("valid");
        assert_eq!(t.levels, vec![Amount::Percent(80.0), Amount::Calls(900)]);
        assert_eq!(t.min_interval, DEFAULT_THRESHOLD_MIN_INTERVAL);
        for (text, key) in [
            ("[threshold]\nlevels = [\"80%\", \"x\"]\n", "levels[1]"),
            ("[threshold]\nlevels = []\n", "levels"),
            ("[threshold]\n", "levels"),
            (
                "[threshold]\nlevels = [\"80%\"]\nmin_interval = \"0s\"\n",
                "min_interval",
            ),
            ("[threshold]\nlevels = [\"80%\"]\nbogus = 1\n", "bogus"),
            ("", "levels"),
        ] {
            let e = parse_threshold(text, source).expect_err(text);
            assert_eq!(e.key(), Some(key), "{text}: {e}");
        }
    }

    #[test]
    fn amounts_resolve_against_the_limit() {
        assert_eq!(Amount::Calls(500).resolve(15_000), 500);
        assert_eq!(Amount::Percent(40.0).resolve(15_000), 6_000);
        assert_eq!(Amount::Percent(33.3).resolve(1_000), 333);
        assert_eq!(Amount::Percent(100.0).resolve(115_000), 115_000);
        assert_eq!(Amount::Percent(0.5).resolve(199), 0);
        assert_eq!(Amount::Percent(100.0).resolve(u64::MAX), u64::MAX);
    }

    #[test]
    fn ids_borrow_as_str() {
        let mut map = HashMap::new();
        map.insert(OrgId::new("acme").unwrap(), 1);
        assert_eq!(map.get("acme"), Some(&1));
    }

    #[test]
    fn line_numbers_agree() {
        let text = "a\n\nbc\nd";
        let ctx = Ctx {
            text,
            file: Path::new("x"),
            env: &no_env,
            newlines: text.match_indices('\n').map(|(at, _)| at).collect(),
        };
        for offset in 0..=text.len() + 2 {
            assert_eq!(
                ctx.line(&(offset..offset)),
                line_col(text, offset).0,
                "at {offset}"
            );
        }
    }

    #[test]
    fn line_col_is_robust() {
        assert_eq!(line_col("", 10), (1, 1));
        assert_eq!(line_col("a\nbc", 3), (2, 2));
        assert_eq!(line_col("é\n", 1), (1, 2));
    }

    proptest! {
        #[test]
        fn parse_never_panics_on_arbitrary_text(text in any::<String>()) {
            let _ = try_parse(&text);
        }

        #[test]
        fn parse_never_panics_on_toml_like_text(text in "([a-z_.\\[\\]\"=0-9%: \n{},-]|listener|org|integration|match|id|true){0,200}") {
            let _ = try_parse(&text);
        }

        /// Edits of the example reach deep into validation, not just the syntax checker.
        #[test]
        fn parse_never_panics_on_edited_example(
            at in 0usize..EXAMPLE.len(),
            cut in 0usize..16,
            insert in "[ -~\n]{0,12}",
        ) {
            let mut text = EXAMPLE.to_owned();
            let start = (0..=at).rev().find(|i| text.is_char_boundary(*i)).unwrap_or(0);
            let end = (start + cut..=text.len()).find(|i| text.is_char_boundary(*i)).unwrap_or(text.len());
            text.replace_range(start..end, &insert);
            let _ = try_parse(&text);
        }
    }
}
