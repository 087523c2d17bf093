//! Everything that can go wrong on the request path, and the one place that turns it into a
//! response.
//!
//! Integrations already know Salesforce's error shape (`[{"message":…,"errorCode":…}]`), so the
//! proxy answers in that shape too, with a message that says what failed and whether the call
//! was counted.

use std::time::Duration;

use http::{header, HeaderValue, Response, StatusCode};
use thiserror::Error;

use super::body::ResponseBody;
use crate::salesforce;

#[derive(Debug, Error)]
pub enum ProxyError {
    #[error("this request matches no integration on listener \"{listener}\" ({hint}); it was not forwarded")]
    Unmatched {
        listener: String,
        hint: &'static str,
    },

    #[error(
        "the X-Callmeter-Key header names no integration on this listener whose other match conditions (host, path prefix) this request meets; it was not forwarded"
    )]
    UnknownKey,

    #[error("the request path cannot be forwarded: it does not form a valid URL upstream")]
    BadPath,

    #[error("a request needs exactly one Host header (RFC 9112 section 3.2), this one has {lines}; it was not forwarded")]
    HostLines { lines: usize },

    #[error("callmeter is a reverse proxy for Salesforce's APIs and opens no tunnels: CONNECT is not forwarded")]
    Tunnel,

    #[error("the request's Transfer-Encoding has \"{coding}\", which callmeter cannot pass on (only chunked); send the body with Content-Length, or chunked alone; it was not forwarded")]
    RequestCoding { coding: String },

    #[error("the request body could not be read: {0}; the call did not reach Salesforce whole and was not counted")]
    ClientBody(#[source] hyper::Error),

    #[error("the request body made no progress for {}; the call did not reach Salesforce whole and was not counted", humantime::format_duration(*.after))]
    UploadStalled { after: Duration },

    #[error("could not connect to Salesforce at {upstream}: {source}; the call was not sent and not counted")]
    UpstreamConnect {
        upstream: String,
        #[source]
        source: super::pool::SendError,
    },

    #[error("Salesforce at {upstream} did not process the call, which was not counted and can be sent again: {source}")]
    NotProcessed {
        upstream: String,
        #[source]
        source: super::pool::SendError,
    },

    #[error("Salesforce at {upstream} sent no response within {}; the call may have been processed and stays counted", humantime::format_duration(*.after))]
    UpstreamTimeout { upstream: String, after: Duration },

    #[error("Salesforce at {upstream} {what}; the call may have been processed and stays counted")]
    Unpassable {
        upstream: String,
        what: super::headers::Unpassable,
    },

    #[error("the exchange with Salesforce at {upstream} failed: {source}; the call may have been processed and stays counted")]
    Upstream {
        upstream: String,
        #[source]
        source: super::pool::SendError,
    },
}

impl ProxyError {
    pub fn status(&self) -> StatusCode {
        match self {
            ProxyError::Unmatched { .. } | ProxyError::UnknownKey => StatusCode::FORBIDDEN,
            ProxyError::ClientBody(_) | ProxyError::BadPath | ProxyError::HostLines { .. } => {
                StatusCode::BAD_REQUEST
            }
            ProxyError::Tunnel | ProxyError::RequestCoding { .. } => StatusCode::NOT_IMPLEMENTED,
            ProxyError::UploadStalled { .. } => StatusCode::REQUEST_TIMEOUT,
            // A server that took its connection but never finished the handshakes timed out,
            // as gateways report it (nginx too); one that refused or failed it is a bad gateway.
            ProxyError::UpstreamConnect {
                source: super::pool::SendError::ConnectTimeout(_),
                ..
            }
            | ProxyError::UpstreamTimeout { .. } => StatusCode::GATEWAY_TIMEOUT,
            ProxyError::UpstreamConnect { .. }
            | ProxyError::NotProcessed { .. }
            | ProxyError::Upstream { .. }
            | ProxyError::Unpassable { .. } => StatusCode::BAD_GATEWAY,
        }
    }

    /// The `errorCode` of the Salesforce-shaped body.
    pub fn error_code(&self) -> &'static str {
        match self {
            ProxyError::Unmatched { .. } => "CALLMETER_UNMATCHED",
            ProxyError::UnknownKey => "CALLMETER_UNKNOWN_KEY",
            ProxyError::ClientBody(_) | ProxyError::BadPath | ProxyError::HostLines { .. } => {
                "CALLMETER_BAD_REQUEST"
            }
            ProxyError::Tunnel | ProxyError::RequestCoding { .. } => "CALLMETER_NOT_IMPLEMENTED",
            ProxyError::UploadStalled { .. } => "CALLMETER_REQUEST_TIMEOUT",
            // Not processed: to the client, as good as never reached (not counted, safe to
            // send again).
            ProxyError::UpstreamConnect { .. } | ProxyError::NotProcessed { .. } => {
                "CALLMETER_UPSTREAM_UNREACHABLE"
            }
            ProxyError::UpstreamTimeout { .. } => "CALLMETER_UPSTREAM_TIMEOUT",
            ProxyError::Upstream { .. } | ProxyError::Unpassable { .. } => {
                "CALLMETER_UPSTREAM_ERROR"
            }
        }
    }

    /// Whether the call failed before Salesforce could have processed it, so that the meter
    /// gives its units back: no connection, Salesforce said it did not process it, or a
    /// request body that broke off or stalled on the client's side (Salesforce never had all
    /// of it).
    pub fn not_sent(&self) -> bool {
        matches!(
            self,
            ProxyError::UpstreamConnect { .. }
                | ProxyError::NotProcessed { .. }
                | ProxyError::ClientBody(_)
                | ProxyError::UploadStalled { .. }
        )
    }

    /// Whether this is the upstream's fault (logged at warn) or the client's (debug).
    pub fn is_upstream(&self) -> bool {
        matches!(
            self,
            ProxyError::UpstreamConnect { .. }
                | ProxyError::NotProcessed { .. }
                | ProxyError::UpstreamTimeout { .. }
                | ProxyError::Upstream { .. }
                | ProxyError::Unpassable { .. }
        )
    }

    /// The answer to the client: a SOAP fault for a SOAP call (`soap`), whose toolkit reads
    /// nothing else, the REST JSON shape otherwise.
    pub fn into_response(self, soap: bool) -> Response<ResponseBody> {
        let message = format!("callmeter: {}", error_chain(&self));
        error_response(self.status(), &message, self.error_code(), soap)
    }
}

/// A Salesforce-shaped error response: a SOAP fault (`soap`) or the REST JSON shape.
pub fn error_response(
    status: StatusCode,
    message: &str,
    error_code: &str,
    soap: bool,
) -> Response<ResponseBody> {
    if !soap {
        return json_error(status, message, error_code);
    }
    let fault = salesforce::soap_fault_body(&format!("sf:{error_code}"), message, error_code);
    let mut resp = Response::new(ResponseBody::full(fault));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/xml;charset=UTF-8"),
    );
    resp
}

/// A Salesforce-shaped JSON error response.
pub fn json_error(status: StatusCode, message: &str, error_code: &str) -> Response<ResponseBody> {
    let mut resp = Response::new(ResponseBody::full(salesforce::rest_error_body(
        message, error_code,
    )));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json;charset=UTF-8"),
    );
    resp
}

/// The error and its causes on one line, each cause once (a message often embeds its direct
/// source already): hyper's errors keep the useful part, e.g. "Connection refused", in their
/// sources.
pub(super) fn error_chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut text = err.to_string();
    let mut cause = err.source();
    while let Some(e) = cause {
        let next = e.to_string();
        if !text.contains(&next) {
            text.push_str(": ");
            text.push_str(&next);
        }
        cause = e.source();
    }
    text
}
