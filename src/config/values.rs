//! Reading one value: the validation context (source text, file, environment), line numbers,
//! and the checks every section shares (durations, addresses, ids, secrets, files, URLs, amounts).

use std::net::SocketAddr;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Duration;

use toml::de::DeTable;

use super::position::*;
use super::raw::*;
use super::*;

/// The longest duration any key takes: ten years (of 365.25 days, as humantime reads "10y").
const MAX_DURATION: Duration = Duration::from_secs(10 * 31_557_600);

pub(super) struct Ctx<'a> {
    pub(super) text: &'a str,
    pub(super) file: &'a Path,
    pub(super) env: &'a dyn Fn(&str) -> Option<String>,
    /// Byte offsets of every '\n', so a line number is a binary search: validation asks for
    /// one per item and a file may hold thousands of integrations.
    pub(super) newlines: Vec<usize>,
}

/// A validated item with the spans later cross-checks need for their messages.
pub(super) struct Located<T> {
    pub(super) value: T,
    pub(super) key: String,
    pub(super) line: Option<usize>,
}

impl<T> Located<T> {
    /// `integration[0] (line 11)`, for messages that point at an earlier item.
    pub(super) fn where_(&self) -> String {
        describe(&self.key, self.line)
    }
}

pub(super) fn describe(key: &str, line: Option<usize>) -> String {
    match line {
        Some(line) => format!("{key} (line {line})"),
        None => key.to_owned(),
    }
}

impl Ctx<'_> {
    /// 1-based line of the start of `span`.
    pub(super) fn line(&self, span: &Range<usize>) -> usize {
        self.newlines.partition_point(|&nl| nl < span.start) + 1
    }

    pub(super) fn err(
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
    pub(super) fn err_on<T>(
        &self,
        key: impl Into<String>,
        value: &S<T>,
        problem: Problem,
    ) -> ConfigError {
        self.err(key, Some(value.span()), problem)
    }

    pub(super) fn syntax_error(&self, e: &toml::de::Error) -> ConfigError {
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
    pub(super) fn serde_error(&self, e: &toml::de::Error, tree: &DeTable<'_>) -> ConfigError {
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

    pub(super) fn required<'v, T>(
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

    pub(super) fn non_empty(&self, value: &S<String>, key: &str) -> Result<String, ConfigError> {
        let text = value.get_ref().trim();
        if text.is_empty() {
            return Err(self.err_on(key, value, Problem::Empty));
        }
        Ok(text.to_owned())
    }

    /// `max_in_flight`: 1 to 100,000 requests.
    pub(super) fn in_flight(
        &self,
        value: &Option<S<u64>>,
        key: &str,
    ) -> Result<Option<u32>, ConfigError> {
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

    pub(super) fn duration(
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
        // Timers add durations to the present; past a few hundred billion years that overflows
        // (a panic on every connection). Nothing here needs more than ten years.
        if parsed > MAX_DURATION {
            return Err(self.err_on(
                key,
                value,
                Problem::BadDuration {
                    value: value.get_ref().clone(),
                    reason: "it must be at most 10 years".to_owned(),
                },
            ));
        }
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

    pub(super) fn socket_addr(
        &self,
        value: &S<String>,
        key: &str,
    ) -> Result<SocketAddr, ConfigError> {
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

    pub(super) fn id<T>(
        &self,
        value: &S<String>,
        key: &str,
        make: fn(&str) -> Result<T, InvalidId>,
    ) -> Result<T, ConfigError> {
        make(value.get_ref()).map_err(|e| self.err_on(key, value, Problem::BadId(e)))
    }

    pub(super) fn env_name(&self, value: &S<String>, key: &str) -> Result<String, ConfigError> {
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
    pub(super) fn env_secret(
        &self,
        value: &S<String>,
        key: &str,
    ) -> Result<(String, String), ConfigError> {
        let name = self.env_name(value, key)?;
        match self.secret(&name) {
            Some(secret) => Ok((name, secret)),
            None => Err(self.err_on(key, value, Problem::EnvUnset { name })),
        }
    }

    /// A secret from the environment, without the line break a secret file or `echo` leaves at
    /// its end (a Kubernetes secret made `--from-file`): a header cannot carry one, so a token
    /// or key with it could never be presented. `None` when unset or empty.
    pub(super) fn secret(&self, name: &str) -> Option<String> {
        let mut secret = (self.env)(name)?;
        secret.truncate(secret.trim_end_matches(['\r', '\n']).len());
        (!secret.is_empty()).then_some(secret)
    }

    pub(super) fn readable_file(
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
    pub(super) fn url(
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
        // http::Uri takes any digits as a port and then reads one above 65535 as none: the
        // connection would go to the scheme's default port without a word.
        let has_port = (authority.as_str().rsplit_once(':')).is_some_and(|(_, p)| !p.contains(']'));
        if has_port && authority.port_u16().is_none_or(|p| p == 0) {
            return Err(bad("the port must be from 1 to 65535"));
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

    pub(super) fn upstream_url(
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
    pub(super) fn amount(&self, value: &S<IntOrStr>, key: &str) -> Result<Amount, ConfigError> {
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
}
