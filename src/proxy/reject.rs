//! The answer to a call the meter held back: shaped the way Salesforce answers at its own
//! limit, so integrations' existing handling works, plus the `Retry-After` Salesforce never
//! sends.
//!
//! REST calls get 403 `[{"message":…,"errorCode":"REQUEST_LIMIT_EXCEEDED"}]`, SOAP calls an HTTP
//! 500 SOAP fault `sf:REQUEST_LIMIT_EXCEEDED`. An integration with `reject_style = "http429"`
//! gets 429 with `Retry-After` and the IETF `RateLimit-Policy` / `RateLimit` headers instead.

use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwapOption;
use bytes::BytesMut;
use http::{header, HeaderName, HeaderValue, Response, StatusCode};

use super::body::ResponseBody;
use super::Route;
use crate::config::RejectStyle;
use crate::meter::{Budget, Left, Limited};
use crate::queue::{Oversized, QueueError};
use crate::salesforce::Api;

const LIMIT_CODE: &str = "REQUEST_LIMIT_EXCEEDED";
const RATELIMIT_POLICY: HeaderName = HeaderName::from_static("ratelimit-policy");
const RATELIMIT: HeaderName = HeaderName::from_static("ratelimit");

/// Whole seconds to wait, rounded up (a client retrying early would only be refused again).
pub fn retry_after_secs(wait: Duration) -> u64 {
    let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
    secs.max(1)
}

/// What the message says about the budget.
fn describe(limited: &Limited, route: &Route) -> String {
    let integration = route.id();
    let org = route.org.meter.id();
    let window = window_text(route.org.meter.window_length());
    match limited.budget {
        Budget::Rate if limited.per.as_secs() == 1 => format!("integration \"{integration}\" is over its rate of {} calls per second", limited.size),
        Budget::Rate => format!("integration \"{integration}\" is over its rate of {} call per {} seconds", limited.size, limited.per.as_secs()),
        Budget::Quota => format!("integration \"{integration}\" has used its quota of {} calls per {window}", limited.size),
        Budget::Reserve => format!(
            "org \"{org}\" has used {} calls, its limit less the reserve kept for critical integrations",
            limited.size
        ),
        Budget::OrgLimit => format!("org \"{org}\" has reached its limit of {} calls per {window}", limited.size),
        Budget::Exhausted => format!(
            "Salesforce refuses calls for org \"{org}\" (REQUEST_LIMIT_EXCEEDED); one call per probe interval is let through to see whether budget is back"
        ),
        Budget::InFlight => format!(
            "{} requests of integration \"{integration}\" or org \"{org}\" are already in flight (max_in_flight)",
            limited.size
        ),
    }
}

/// An integration's `RateLimit` headers: its partition key, and the `RateLimit-Policy` value
/// last sent, reused while the budgets' sizes and window stay the same (they change only on a
/// reload or when Salesforce reports a new limit), so a counted response formats only the
/// `RateLimit` value.
pub struct RateLimitHeaders {
    /// The integration id in base64.
    key: String,
    policy: ArcSwapOption<Policy>,
}

struct Policy {
    sizes: [Option<u64>; 2],
    window: u64,
    value: HeaderValue,
}

impl RateLimitHeaders {
    pub fn new(integration: &str) -> Self {
        use base64::Engine;
        RateLimitHeaders {
            key: base64::engine::general_purpose::STANDARD.encode(integration),
            policy: ArcSwapOption::empty(),
        }
    }

    fn policy(&self, budgets: &[(&str, Option<Left>); 2], window: u64) -> Option<HeaderValue> {
        let sizes = budgets.map(|(_, b)| b.map(|l| l.size));
        if let Some(p) = self.policy.load().as_ref() {
            if p.sizes == sizes && p.window == window {
                return Some(p.value.clone());
            }
        }
        let value = self.format(budgets, |buf, budget| {
            buf.extend_from_slice(b"q=");
            buf.extend_from_slice(itoa::Buffer::new().format(budget.size).as_bytes());
            buf.extend_from_slice(b";w=");
            buf.extend_from_slice(itoa::Buffer::new().format(window).as_bytes());
        })?;
        self.policy.store(Some(Arc::new(Policy {
            sizes,
            window,
            value: value.clone(),
        })));
        Some(value)
    }

    /// `"name";<params>;pk=:<key>:` for each budget that applies, comma-separated.
    fn format(
        &self,
        budgets: &[(&str, Option<Left>); 2],
        params: impl Fn(&mut BytesMut, &Left),
    ) -> Option<HeaderValue> {
        let mut buf = BytesMut::with_capacity(96);
        for (name, left) in budgets {
            let Some(left) = left else { continue };
            if !buf.is_empty() {
                buf.extend_from_slice(b", ");
            }
            buf.extend_from_slice(b"\"");
            buf.extend_from_slice(name.as_bytes());
            buf.extend_from_slice(b"\";");
            params(&mut buf, left);
            buf.extend_from_slice(b";pk=:");
            buf.extend_from_slice(self.key.as_bytes());
            buf.extend_from_slice(b":");
        }
        // Handed to the header value without a copy.
        HeaderValue::from_maybe_shared(buf.freeze()).ok()
    }
}

/// The IETF `RateLimit-Policy` / `RateLimit` headers (draft-ietf-httpapi-ratelimit-headers)
/// on a counted response: the integration's quota and the org's daily budget as it applies to
/// the integration, each with the integration as partition key.
pub fn add_ratelimit_headers(headers: &mut http::HeaderMap, route: &Route) {
    let Some(ratelimit) = &route.ratelimit else {
        return;
    };
    let remaining = route.meter.remaining();
    if remaining.quota.is_none() && remaining.org.is_none() {
        return;
    }
    let budgets = [("quota", remaining.quota), ("daily", remaining.org)];
    let window = route.org.meter.window_length().as_secs();
    let policy = ratelimit.policy(&budgets, window);
    let state = ratelimit.format(&budgets, |buf, budget| {
        buf.extend_from_slice(b"r=");
        buf.extend_from_slice(itoa::Buffer::new().format(budget.left).as_bytes());
    });
    if let (Some(p), Some(s)) = (policy, state) {
        headers.insert(RATELIMIT_POLICY, p);
        headers.insert(RATELIMIT, s);
    }
}

/// "24h", "10m": how admins write windows (humantime would say "1day").
fn window_text(window: Duration) -> String {
    let secs = window.as_secs();
    match secs {
        s if s % 3600 == 0 => format!("{}h", s / 3600),
        s if s % 60 == 0 => format!("{}m", s / 60),
        s => format!("{s}s"),
    }
}

/// The response for a held-back call.
pub fn response(limited: &Limited, route: &Route, api: Api) -> Response<ResponseBody> {
    limit_response(
        route,
        api,
        &describe(limited, route),
        Some(limited),
        limited.retry_after,
    )
}

/// The response for a call that waited in the queue and could not be forwarded.
pub fn queue_response(err: &QueueError, route: &Route, api: Api) -> Response<ResponseBody> {
    match err {
        QueueError::ShuttingDown => {
            let mut r = super::error::error_response(
                StatusCode::SERVICE_UNAVAILABLE,
                "callmeter: the proxy is shutting down and did not send this call; retry after 5 s",
                "SERVER_UNAVAILABLE",
                api == Api::Soap,
            );
            r.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(5u32));
            r
        }
        QueueError::Oversized(oversized) => oversized_response(oversized, route, api),
        QueueError::Full { limited, .. } | QueueError::TimedOut { limited, .. } => {
            let what = match limited {
                Some(l) => format!("{err}: {}", describe(l, route)),
                None => format!("integration \"{}\": {err}", route.id()),
            };
            let wait = limited.map_or(Duration::from_secs(1), |l| l.retry_after);
            limit_response(route, api, &what, limited.as_ref(), wait)
        }
    }
}

/// The response for a call worth more than one of its budgets can ever hold: shaped as a
/// limit, but with no `Retry-After` (or `RateLimit` headers), as waiting would not help. In
/// the `http429` style a 413: generic clients send a 429 again, for ever.
pub fn oversized_response(
    oversized: &Oversized,
    route: &Route,
    api: Api,
) -> Response<ResponseBody> {
    let message = format!("callmeter: integration \"{}\": {oversized}", route.id());
    match route.reject_style {
        RejectStyle::Http429 => json(StatusCode::PAYLOAD_TOO_LARGE, &message),
        RejectStyle::Salesforce => shaped(route, api, &message, None, 0),
    }
}

fn limit_response(
    route: &Route,
    api: Api,
    what: &str,
    limited: Option<&Limited>,
    wait: Duration,
) -> Response<ResponseBody> {
    let secs = retry_after_secs(wait);
    let message = format!("callmeter: {what}; retry after {secs} s");
    let mut resp = shaped(route, api, &message, limited, secs);
    resp.headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from(secs));
    resp
}

/// A limit answer in the integration's `reject_style`, `RateLimit` headers from `limited`.
fn shaped(
    route: &Route,
    api: Api,
    message: &str,
    limited: Option<&Limited>,
    secs: u64,
) -> Response<ResponseBody> {
    match (route.reject_style, api) {
        (RejectStyle::Http429, _) => {
            let mut r = json(StatusCode::TOO_MANY_REQUESTS, message);
            // A cap on calls at once is no quota per window: its 429 has Retry-After only.
            if let Some(limited) = limited.filter(|l| !l.per.is_zero()) {
                let window = limited.per.as_secs();
                let policy = format!(
                    "\"{}\";q={};w={window}",
                    limited.budget.as_str(),
                    limited.size
                );
                let state = format!("\"{}\";r=0;t={secs}", limited.budget.as_str());
                if let (Ok(p), Ok(s)) = (
                    HeaderValue::from_str(&policy),
                    HeaderValue::from_str(&state),
                ) {
                    r.headers_mut().insert(RATELIMIT_POLICY, p);
                    r.headers_mut().insert(RATELIMIT, s);
                }
            }
            r
        }
        // Salesforce's own SOAP faults come with 500.
        (RejectStyle::Salesforce, Api::Soap) => super::error::error_response(
            StatusCode::INTERNAL_SERVER_ERROR,
            message,
            LIMIT_CODE,
            true,
        ),
        (RejectStyle::Salesforce, _) => json(StatusCode::FORBIDDEN, message),
    }
}

fn json(status: StatusCode, message: &str) -> Response<ResponseBody> {
    super::error::json_error(status, message, LIMIT_CODE)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_rounds_up_to_whole_seconds() {
        assert_eq!(retry_after_secs(Duration::from_millis(1)), 1);
        assert_eq!(retry_after_secs(Duration::from_millis(1_001)), 2);
        assert_eq!(retry_after_secs(Duration::from_secs(60)), 60);
        assert_eq!(retry_after_secs(Duration::ZERO), 1);
    }

    #[test]
    fn ratelimit_policy_is_reused_only_while_the_sizes_stay() {
        let headers = RateLimitHeaders::new("a");
        let left = |size, left| Some(Left { size, left });
        let day = 86_400;
        let p = headers.policy(&[("quota", left(100, 60)), ("daily", left(5_000, 10))], day);
        assert_eq!(
            p.expect("policy"),
            r#""quota";q=100;w=86400;pk=:YQ==:, "daily";q=5000;w=86400;pk=:YQ==:"#
        );
        // What is left does not enter the policy: the same value comes back.
        let p = headers.policy(&[("quota", left(100, 1)), ("daily", left(5_000, 2))], day);
        assert_eq!(
            p.expect("policy"),
            r#""quota";q=100;w=86400;pk=:YQ==:, "daily";q=5000;w=86400;pk=:YQ==:"#
        );
        // A reload changed the quota; Salesforce reported a new limit; the window changed.
        let p = headers.policy(&[("quota", left(200, 1)), ("daily", left(5_000, 2))], day);
        assert_eq!(
            p.expect("policy"),
            r#""quota";q=200;w=86400;pk=:YQ==:, "daily";q=5000;w=86400;pk=:YQ==:"#
        );
        let p = headers.policy(&[("quota", None), ("daily", left(9_000, 2))], day);
        assert_eq!(p.expect("policy"), r#""daily";q=9000;w=86400;pk=:YQ==:"#);
        let p = headers.policy(&[("quota", None), ("daily", left(9_000, 2))], 3_600);
        assert_eq!(p.expect("policy"), r#""daily";q=9000;w=3600;pk=:YQ==:"#);
    }
}
