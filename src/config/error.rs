//! Configuration errors: each names the file, the key path and the line when known, and says
//! what to do about it.

use std::path::{Path, PathBuf};

use super::*;

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
    #[error("{value:?} is not a log level filter: {reason}; write a level (\"trace\", \"debug\", \"info\", \"warn\", \"error\", \"off\") or directives like \"info,callmeter=debug\"")]
    BadLogLevel { value: String, reason: String },
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
    BadPathPrefix { value: String, reason: String },
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
