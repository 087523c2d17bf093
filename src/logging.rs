//! Logs on stderr, human-readable or JSON, filtered by a level or `RUST_LOG`-style directives.
//!
//! The proxy never logs credentials: header values named by `salesforce::is_secret_header` and
//! SOAP/OAuth tokens in bodies (`salesforce::redact_body`) are redacted wherever the request
//! path logs headers or bodies.

use std::ffi::OsString;

use thiserror::Error;
use tracing_subscriber::EnvFilter;

/// Why `RUST_LOG` is ignored. `EnvFilter` reads a word that is no level (`warning`) as a target
/// name and then logs nothing of callmeter, errors included: such a value is not used.
#[derive(Debug, Error)]
pub enum RustLogError {
    #[error("RUST_LOG={value:?} is ignored, logging at {fallback:?} instead: {reason}; write a level (\"trace\", \"debug\", \"info\", \"warn\", \"error\", \"off\") or directives like \"info,callmeter=debug\"")]
    NotALevel {
        value: String,
        reason: String,
        fallback: String,
    },
    #[error("RUST_LOG={value:?} is ignored, logging at {fallback:?} instead: {source}")]
    Invalid {
        value: String,
        fallback: String,
        #[source]
        source: tracing_subscriber::filter::ParseError,
    },
    #[error("RUST_LOG is ignored, logging at {fallback:?} instead: it is not valid UTF-8")]
    NotUnicode { fallback: String },
}

/// Installs the global subscriber. `RUST_LOG`, when set, wins over `level`; when it is not a
/// valid filter it is ignored for `level`, and returned for the caller to report (on stderr
/// directly: a warning through the filter could itself be filtered out).
pub fn init(level: &str, json: bool) -> Option<RustLogError> {
    let (filter, ignored) = filter(std::env::var_os("RUST_LOG"), level);
    // Colours only on a terminal: journald, files and log shippers get plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(std::io::stderr);
    // A second init (tests, demo) keeps the first subscriber.
    let _ = if json {
        builder.json().try_init()
    } else {
        builder.try_init()
    };
    ignored
}

/// What `init` would make of the current `RUST_LOG`: `Some` when it is set but not used.
/// For `callmeter check`, which reports it without starting anything.
pub fn check_rust_log(level: &str) -> Option<RustLogError> {
    filter(std::env::var_os("RUST_LOG"), level).1
}

/// The filter from `rust_log` (the variable's value), or from `level` when it is unset, empty
/// or not valid; the reason when it is set but not used. `level` has been validated
/// (`config::check_log_level`), so its `info` fallback is for the impossible case.
fn filter(rust_log: Option<OsString>, level: &str) -> (EnvFilter, Option<RustLogError>) {
    let fallback = || EnvFilter::try_new(level).unwrap_or_else(|_| EnvFilter::new("info"));
    let Some(value) = rust_log else {
        return (fallback(), None);
    };
    let value = match value.into_string() {
        // `RUST_LOG=` (set but empty) is the shell's way of unsetting it.
        Ok(v) if v.trim().is_empty() => return (fallback(), None),
        Ok(v) => v,
        Err(_) => {
            let ignored = RustLogError::NotUnicode {
                fallback: level.to_owned(),
            };
            return (fallback(), Some(ignored));
        }
    };
    if let Err(reason) = crate::config::check_log_level(&value) {
        let ignored = RustLogError::NotALevel {
            value,
            reason,
            fallback: level.to_owned(),
        };
        return (fallback(), Some(ignored));
    }
    match EnvFilter::try_new(&value) {
        Ok(filter) => (filter, None),
        Err(source) => {
            let ignored = RustLogError::Invalid {
                value,
                fallback: level.to_owned(),
                source,
            };
            (fallback(), Some(ignored))
        }
    }
}

/// Log lines captured in tests: `capture(filter)` makes the calling thread's default
/// subscriber one that writes into the returned buffer, until the guard is dropped.
#[cfg(test)]
pub(crate) fn capture(
    filter: &str,
) -> (
    tracing::subscriber::DefaultGuard,
    std::sync::Arc<std::sync::Mutex<Vec<u8>>>,
) {
    use std::sync::{Arc, Mutex};

    struct Sink(Arc<Mutex<Vec<u8>>>);
    impl std::io::Write for Sink {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().expect("log").extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    let written = Arc::new(Mutex::new(Vec::new()));
    let sink = written.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(move || Sink(sink.clone()))
        .finish();
    (tracing::subscriber::set_default(subscriber), written)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ignored(rust_log: Option<&str>) -> Option<RustLogError> {
        filter(rust_log.map(OsString::from), "info").1
    }

    /// `RUST_LOG=warning` was taken as a target name and silenced every line: ignored now, as
    /// `[log] level = "warning"` is refused, and the reason names the variable.
    #[test]
    fn a_rust_log_that_is_no_filter_is_ignored_with_its_reason() {
        for bad in [
            "warning",
            "info,callmeter=verbose",
            "callmeter=debug[",
            "DEBUGG",
            "debugg",
            "fatal",
            "err",
            // A crate's or a module's lines only: callmeter's own, errors included, would be
            // off.
            "hyper",
            "callmeter::proxy",
        ] {
            let e = ignored(Some(bad)).unwrap_or_else(|| panic!("{bad} is used"));
            let text = e.to_string();
            assert!(text.starts_with("RUST_LOG="), "{text}");
            assert!(text.contains("\"info\""), "names the level used: {text}");
        }
        for good in [
            "warn",
            "callmeter=debug,hyper=off",
            "callmeter::proxy,warn",
            "TRACE",
            // Crate names alone and span filters are targets, not misspelt levels.
            "callmeter",
            "hyper,warn",
            "callmeter[{org=acme}]",
            "info,callmeter[request{integration=etl}]=debug",
        ] {
            assert!(ignored(Some(good)).is_none(), "{good}");
        }
        assert!(ignored(None).is_none());
        assert!(ignored(Some("")).is_none(), "set but empty: as unset");
    }

    #[cfg(unix)]
    #[test]
    fn a_rust_log_that_is_not_utf8_is_ignored() {
        use std::os::unix::ffi::OsStringExt;
        let value = OsString::from_vec(vec![0x66, 0xff]);
        assert!(matches!(
            filter(Some(value), "warn").1,
            Some(RustLogError::NotUnicode { .. })
        ));
    }
}
