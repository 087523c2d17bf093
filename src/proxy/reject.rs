//! The answer to a call the meter held back: shaped the way Salesforce answers at its own
//! limit, so integrations' existing handling works, plus the `Retry-After` Salesforce never
//! sends.
//!
//! REST calls get 403 `[{"message":…,"errorCode":"REQUEST_LIMIT_EXCEEDED"}]`, SOAP calls an HTTP
//! 500 SOAP fault `sf:REQUEST_LIMIT_EXCEEDED`. An integration with `reject_style = "http429"`
//! gets 429 with `Retry-After` and the IETF `RateLimit-Policy` / `RateLimit` headers instead.

use std::time::Duration;

use http::{header, HeaderName, HeaderValue, Response, StatusCode};

use super::body::ResponseBody;
use super::Route;
use crate::config::RejectStyle;
use crate::meter::{Budget, Limited};
use crate::queue::QueueError;
use crate::salesforce::{self, Api};

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
        Budget::Rate => format!("integration \"{integration}\" is over its rate of {} calls per second", limited.size),
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

/// The IETF `RateLimit-Policy` / `RateLimit` headers (draft-ietf-httpapi-ratelimit-headers)
/// on a counted response: the integration's quota and the org's daily budget as it applies to
/// the integration, each with the integration as partition key.
pub fn add_ratelimit_headers(headers: &mut http::HeaderMap, route: &Route) {
    let Some(pk) = &route.ratelimit_key else {
        return;
    };
    let remaining = route.meter.remaining();
    let window = route.org.meter.window_length().as_secs();
    // Written by hand with itoa into two buffers handed to the header values without a copy:
    // this runs for every counted response.
    let mut policy = bytes::BytesMut::with_capacity(128);
    let mut state = bytes::BytesMut::with_capacity(96);
    let mut num = itoa::Buffer::new();
    for (name, budget) in [("quota", remaining.quota), ("daily", remaining.org)] {
        let Some(crate::meter::Left { size, left }) = budget else {
            continue;
        };
        if !policy.is_empty() {
            policy.extend_from_slice(b", ");
            state.extend_from_slice(b", ");
        }
        for (buf, key, value) in [(&mut policy, "q", size), (&mut state, "r", left)] {
            buf.extend_from_slice(b"\"");
            buf.extend_from_slice(name.as_bytes());
            buf.extend_from_slice(b"\";");
            buf.extend_from_slice(key.as_bytes());
            buf.extend_from_slice(b"=");
            buf.extend_from_slice(num.format(value).as_bytes());
        }
        policy.extend_from_slice(b";w=");
        policy.extend_from_slice(num.format(window).as_bytes());
        for buf in [&mut policy, &mut state] {
            buf.extend_from_slice(b";pk=:");
            buf.extend_from_slice(pk.as_bytes());
            buf.extend_from_slice(b":");
        }
    }
    if policy.is_empty() {
        return;
    }
    if let (Ok(p), Ok(s)) = (
        HeaderValue::from_maybe_shared(policy.freeze()),
        HeaderValue::from_maybe_shared(state.freeze()),
    ) {
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
            let mut r = super::error::json_error(
                StatusCode::SERVICE_UNAVAILABLE,
                "callmeter: the proxy is shutting down and did not send this call; retry after 5 s",
                "SERVER_UNAVAILABLE",
            );
            r.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(5u32));
            r
        }
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

fn limit_response(
    route: &Route,
    api: Api,
    what: &str,
    limited: Option<&Limited>,
    wait: Duration,
) -> Response<ResponseBody> {
    let secs = retry_after_secs(wait);
    let message = format!("callmeter: {what}; retry after {secs} s");
    let mut resp = match (route.reject_style, api) {
        (RejectStyle::Http429, _) => {
            let mut r = json(StatusCode::TOO_MANY_REQUESTS, &message);
            if let Some(limited) = limited {
                let window = match limited.budget {
                    Budget::Rate => 1,
                    _ => route.org.meter.window_length().as_secs(),
                };
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
        (RejectStyle::Salesforce, Api::Soap) => {
            let body =
                salesforce::soap_fault_body("sf:REQUEST_LIMIT_EXCEEDED", &message, LIMIT_CODE);
            let mut r = Response::new(ResponseBody::full(body));
            *r.status_mut() = StatusCode::INTERNAL_SERVER_ERROR;
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/xml;charset=UTF-8"),
            );
            r
        }
        (RejectStyle::Salesforce, _) => json(StatusCode::FORBIDDEN, &message),
    };
    resp.headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from(secs));
    resp
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
}
