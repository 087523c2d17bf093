//! The raw types: the file as written. Every key is optional so that missing keys are reported
//! with their path by validation; spans are kept where an error may need a line number.

use std::fmt;

use serde::de::{self, Deserializer, Unexpected, Visitor};
use serde::Deserialize;
use toml::Spanned;

use super::*;

pub(super) type S<T> = Spanned<T>;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawConfig {
    pub(super) admin: Option<S<RawAdmin>>,
    pub(super) store: Option<S<RawStore>>,
    pub(super) log: Option<S<RawLog>>,
    pub(super) proxy: Option<S<RawProxy>>,
    #[serde(default)]
    pub(super) listener: Vec<S<RawListener>>,
    #[serde(default)]
    pub(super) org: Vec<S<RawOrg>>,
    #[serde(default)]
    pub(super) integration: Vec<S<RawIntegration>>,
    pub(super) smtp: Option<S<RawSmtp>>,
    pub(super) history: Option<S<RawHistory>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawHistory {
    pub(super) time_zone: Option<S<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawAdmin {
    pub(super) listen: Option<S<String>>,
    pub(super) token_env: Option<S<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawStore {
    pub(super) path: Option<S<String>>,
    pub(super) retention: Option<S<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawLog {
    pub(super) format: Option<LogFormat>,
    pub(super) level: Option<S<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawProxy {
    pub(super) shutdown_grace: Option<S<String>>,
    pub(super) max_header_bytes: Option<S<u64>>,
    pub(super) header_timeout: Option<S<String>>,
    pub(super) trust_forwarded_for: Option<bool>,
    pub(super) worker_threads: Option<S<u64>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawListener {
    pub(super) name: Option<S<String>>,
    pub(super) listen: Option<S<String>>,
    pub(super) public_url: Option<S<String>>,
    pub(super) tls: Option<S<RawTls>>,
    pub(super) org: Option<S<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawTls {
    pub(super) cert: Option<S<String>>,
    pub(super) key: Option<S<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawOrg {
    pub(super) id: Option<S<String>>,
    pub(super) instance_url: Option<S<String>>,
    pub(super) login_url: Option<S<String>>,
    pub(super) upstream_ca: Option<S<String>>,
    pub(super) allow_plain_http: Option<bool>,
    pub(super) daily_limit: Option<S<IntOrStr>>,
    pub(super) window: Option<S<String>>,
    pub(super) reserve: Option<S<IntOrStr>>,
    pub(super) unmatched: Option<Unmatched>,
    pub(super) probe_interval: Option<S<String>>,
    pub(super) connect_timeout: Option<S<String>>,
    pub(super) response_timeout: Option<S<String>>,
    pub(super) counting: Option<RawCounting>,
    pub(super) threshold: Option<S<RawThreshold>>,
    pub(super) max_in_flight: Option<S<u64>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawCounting {
    pub(super) oauth: Option<bool>,
    pub(super) limits_endpoint: Option<bool>,
    pub(super) streaming: Option<bool>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawThreshold {
    pub(super) levels: Option<S<Vec<S<IntOrStr>>>>,
    pub(super) notify: Option<Vec<S<String>>>,
    pub(super) min_interval: Option<S<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawIntegration {
    pub(super) id: Option<S<String>>,
    pub(super) org: Option<S<String>>,
    #[serde(rename = "match")]
    pub(super) matcher: Option<S<RawMatch>>,
    pub(super) quota: Option<S<IntOrStr>>,
    pub(super) rate: Option<S<RawRate>>,
    pub(super) priority: Option<Priority>,
    pub(super) on_limit: Option<OnLimit>,
    pub(super) reject_style: Option<RejectStyle>,
    pub(super) queue: Option<RawQueue>,
    pub(super) defer: Option<RawDefer>,
    pub(super) max_in_flight: Option<S<u64>>,
    pub(super) ratelimit_headers: Option<bool>,
    pub(super) call_options_client: Option<bool>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawMatch {
    pub(super) listener: Option<S<String>>,
    pub(super) host: Option<S<String>>,
    pub(super) path_prefix: Option<S<String>>,
    pub(super) key_env: Option<S<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawRate {
    pub(super) per_second: Option<S<f64>>,
    pub(super) burst: Option<S<i64>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawQueue {
    pub(super) max_depth: Option<S<u64>>,
    pub(super) max_wait: Option<S<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawDefer {
    pub(super) max_body_bytes: Option<S<u64>>,
    pub(super) max_attempts: Option<S<u64>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawSmtp {
    pub(super) host: Option<S<String>>,
    pub(super) port: Option<S<u64>>,
    pub(super) security: Option<SmtpSecurity>,
    pub(super) username: Option<S<String>>,
    pub(super) password_env: Option<S<String>>,
    pub(super) from: Option<S<String>>,
    pub(super) ca: Option<S<String>>,
}

/// A value written either as a TOML integer (`500`) or a string (`"40%"`, `"auto"`); what the
/// string may say depends on the key, so it is interpreted during validation.
pub(super) enum IntOrStr {
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
