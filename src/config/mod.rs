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
//! The files follow those steps: this one holds the typed configuration and the entry points,
//! `raw` the serde types, `position` the offset-to-key-path mapping, `values` the checks every
//! section shares, `validate` the sections and their cross-references, `error` the messages.
//!
//! This module is standalone on purpose (no `crate::` references) so it can be built and tested
//! on its own; it depends only on `serde`, `toml`, `humantime`, `thiserror`, `http`, `tracing`,
//! `tz-rs` (time zones of `[history]`) and `lettre` (its address parser).

use std::borrow::Borrow;
use std::fmt;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;
use toml::de::DeTable;

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

mod error;
mod position;
mod raw;
mod reload;
#[cfg(test)]
mod tests;
mod validate;
mod values;

pub use error::{ConfigError, Problem};
use raw::RawConfig;
pub use reload::restart_needed;
pub use validate::{check_log_level, parse_threshold};
use values::Ctx;

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
    /// Largest request head accepted, approximately: it bounds hyper's read buffer, which
    /// lets heads up to about 1.75 times this through. Default 64 KiB; 8 KiB to 16 MiB.
    pub max_header_bytes: usize,
    /// How long a client may take to send a request head, counted from when the proxy starts
    /// waiting for it (so also how long an idle keep-alive connection stays open), and to
    /// finish a TLS handshake; on the admin listener also how long a request body may take to
    /// come whole. Default 30 s.
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

    /// The org whose unmatched traffic listener `l` takes: its `org`, or the only org when
    /// there is exactly one.
    pub fn unmatched_org<'a>(&'a self, l: &'a ListenerConfig) -> Option<&'a OrgId> {
        match (&l.org, self.orgs.as_slice()) {
            (Some(org), _) => Some(org),
            (None, [only]) => Some(&only.id),
            (None, _) => None,
        }
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
            // A second org turns off the one-org default of `[[listener]] org`: the setting
            // then silently stops applying, and unmatched calls are refused.
            let reachable = self
                .listeners
                .iter()
                .any(|l| self.unmatched_org(l) == Some(&org.id));
            if org.unmatched == Unmatched::Unattributed && !reachable {
                out.push(format!(
                    "org {id:?}: unmatched = \"unattributed\" applies to no listener (with more than one org, a listener takes unmatched traffic only for the org its `org` names): requests matching no integration are refused 403 CALLMETER_UNMATCHED; add org = {id:?} to the [[listener]] that carries them",
                    id = org.id.as_str()
                ));
            }
            let notifies = org.threshold.as_ref().is_some_and(|t| !t.notify.is_empty());
            if notifies && self.smtp.is_none() {
                out.push(format!(
                    "org {:?}: threshold.notify is set but there is no [smtp] section: no email will be sent",
                    org.id.as_str()
                ));
            }
        }
        if let Some(smtp) = self.smtp.as_ref() {
            if smtp.security == SmtpSecurity::None && smtp.username.is_some() {
                out.push(format!(
                    "smtp: security = \"none\" with a username: the SMTP password crosses the network to {} in clear text; use starttls or tls unless it is a local relay",
                    smtp.host
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
