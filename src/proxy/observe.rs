//! Learning from Salesforce's answers: usage figures, limit errors, and login URLs to rewrite.
//!
//! REST responses report usage in the `Sforce-Limit-Info` header, read at once. SOAP responses
//! report it in the envelope's `LimitInfoHeader`, and limit errors are in bodies too: those
//! bodies stream to the client through a `BodyScanner` that looks at a bounded prefix only.
//! Login responses (OAuth token, SOAP `loginResponse`) are small and read whole, so their
//! instance URLs can be pointed back at the proxy.

use std::sync::Arc;

use bytes::Bytes;
use http::response::Parts;
use http::{header, HeaderValue, StatusCode};

use super::body::{Observer, ResponseBody};
use super::headers::LIMIT_INFO;
use super::pool::UpstreamBody;
use super::OrgRoute;
use crate::salesforce::{self, BodyScanner, CallKind, LimitExceeded};

/// Login responses are a few KiB; anything far larger is not one and passes untouched.
const LOGIN_BODY_LIMIT: usize = 256 * 1024;
/// `/limits` answers are some tens of KiB.
const LIMITS_BODY_LIMIT: usize = 1024 * 1024;

/// Reads what the response tells about the org's usage, and returns the body to send on.
pub fn response(
    org: &Arc<OrgRoute>,
    kind: CallKind,
    units: u32,
    parts: &Parts,
    body: UpstreamBody,
) -> ResponseBody {
    if let Some(value) = parts.headers.get(LIMIT_INFO) {
        match salesforce::parse_limit_info(value.as_bytes()) {
            Ok(report) => {
                org.meter.observe_report(report);
                org.metrics.usage_report(true);
            }
            Err(e) => {
                tracing::debug!(org = org.metrics.label(), error = %e, "ignoring malformed Sforce-Limit-Info");
                org.metrics.usage_report(false);
            }
        }
    }
    let status = parts.status;
    if status.is_success() && units > 0 {
        org.meter.observe_success();
    }
    let encoded = parts.headers.contains_key(header::CONTENT_ENCODING);
    let mode = if kind == CallKind::Limits && status == StatusCode::OK && !encoded {
        Some(Watch::Limits(Vec::new()))
    } else if !encoded && (kind == CallKind::Soap || is_limit_status(status)) {
        Some(Watch::Scan(BodyScanner::new()))
    } else {
        None
    };
    match mode {
        Some(mode) => ResponseBody::observed(
            body,
            Box::new(UsageWatcher {
                org: org.clone(),
                mode,
            }),
        ),
        None => ResponseBody::Stream(body),
    }
}

/// Statuses Salesforce uses for REQUEST_LIMIT_EXCEEDED: 403 (REST), 500 (SOAP fault).
fn is_limit_status(status: StatusCode) -> bool {
    status == StatusCode::FORBIDDEN || status == StatusCode::INTERNAL_SERVER_ERROR
}

enum Watch {
    Scan(BodyScanner),
    Limits(Vec<u8>),
}

struct UsageWatcher {
    org: Arc<OrgRoute>,
    mode: Watch,
}

impl Observer for UsageWatcher {
    fn chunk(&mut self, data: &[u8]) -> bool {
        match &mut self.mode {
            Watch::Scan(scanner) => {
                scanner.feed(data);
                !scanner.is_done()
            }
            Watch::Limits(buf) => {
                if buf.len() + data.len() > LIMITS_BODY_LIMIT {
                    buf.clear();
                    return false;
                }
                buf.extend_from_slice(data);
                true
            }
        }
    }

    fn finish(&mut self) {
        let (report, exceeded) = match &mut self.mode {
            Watch::Scan(scanner) => {
                scanner.finish();
                (scanner.report(), scanner.limit_exceeded())
            }
            Watch::Limits(buf) => (salesforce::parse_limits_body(buf), None),
        };
        if let Some(report) = report {
            self.org.meter.observe_report(report);
            self.org.metrics.usage_report(true);
        }
        match exceeded {
            Some(LimitExceeded::Daily) => {
                tracing::warn!(
                    org = self.org.metrics.label(),
                    "Salesforce reports the daily API limit exceeded"
                );
                self.org.meter.observe_exhausted();
            }
            // The concurrency limit says nothing about the daily budget.
            Some(LimitExceeded::ConcurrentLongRunning) | None => {}
        }
    }
}

/// Points the URLs of a login response at the proxy (`public_base`), so the client's next
/// calls come back through it.
pub async fn rewrite_login(
    kind: CallKind,
    parts: &mut Parts,
    body: ResponseBody,
    public_base: &str,
) -> ResponseBody {
    let ResponseBody::Stream(inner) = body else {
        return body;
    };
    if parts.headers.contains_key(header::CONTENT_ENCODING) {
        tracing::warn!("login response is content-encoded; its URLs cannot be rewritten");
        return ResponseBody::Stream(inner);
    }
    let bytes: Bytes = match ResponseBody::collect_bounded(inner, LOGIN_BODY_LIMIT).await {
        Ok(Ok(bytes)) => bytes,
        Ok(Err(too_large)) => return too_large,
        Err(e) => {
            tracing::warn!(error = %e, "reading the login response failed");
            parts
                .headers
                .insert(header::CONTENT_LENGTH, HeaderValue::from(0));
            return ResponseBody::empty();
        }
    };
    let rewritten = match kind {
        CallKind::OAuth => salesforce::rewrite_oauth_token(&bytes, public_base),
        _ => salesforce::rewrite_soap_login(&bytes, public_base),
    };
    if tracing::enabled!(tracing::Level::TRACE) {
        let text = String::from_utf8_lossy(&bytes);
        tracing::trace!(body = %salesforce::redact_body(&text), "login response from Salesforce");
    }
    let body = rewritten.map(Bytes::from).unwrap_or(bytes);
    parts
        .headers
        .insert(header::CONTENT_LENGTH, HeaderValue::from(body.len()));
    ResponseBody::full(body)
}
