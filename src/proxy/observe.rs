//! Learning from Salesforce's answers: usage figures, limit errors, and login URLs to rewrite.
//!
//! REST responses report usage in the `Sforce-Limit-Info` header, read at once. SOAP responses
//! report it in the envelope's `LimitInfoHeader`, and limit errors are in bodies too: those
//! bodies stream to the client through a `BodyScanner` that looks at a bounded prefix only
//! (decoded on the side when the client asked for, and got, a compressed limit error).
//! Login responses (OAuth token, SOAP `loginResponse`) are small and read whole, so their
//! instance URLs can be pointed back at the proxy.

use std::sync::Arc;

use bytes::Bytes;
use http::response::Parts;
use http::{header, HeaderValue, StatusCode};

use super::body::{content_coding, is_zlib, Coding, Observer, ResponseBody};
use super::error::ProxyError;
use super::forward::Upstream;
use super::headers::LIMIT_INFO;
use super::pool::{BodyError, SendError, UpstreamBody};
use super::OrgRoute;
use crate::meter::{Charge, Heard, IntegrationMeter, Ticket};
use crate::salesforce::{self, BodyScanner, CallKind, LimitExceeded};

/// Login responses are a few KiB; anything far larger is not one and passes untouched.
const LOGIN_BODY_LIMIT: usize = 256 * 1024;
/// `/limits` answers are some tens of KiB.
const LIMITS_BODY_LIMIT: usize = 1024 * 1024;

/// Reads what the response tells about the org's usage, and returns the body to send on.
/// `meter`: the integration's, which `call` was counted by.
pub fn response(
    org: &Arc<OrgRoute>,
    meter: &Arc<IntegrationMeter>,
    kind: CallKind,
    call: &Ticket,
    parts: &Parts,
    body: UpstreamBody,
) -> ResponseBody {
    let lines = parts.headers.get_all(LIMIT_INFO).iter();
    match salesforce::limit_info_lines(lines.map(|v| v.as_bytes())) {
        Some(Ok(report)) => {
            org.meter.observe_answer(call, report);
            org.metrics.usage_report(true);
        }
        Some(Err(e)) => {
            tracing::debug!(org = org.metrics.label(), error = %e, "ignoring malformed Sforce-Limit-Info");
            org.metrics.usage_report(false);
        }
        None => {}
    }
    let status = parts.status;
    if status.is_success() && call.units() > 0 {
        org.meter.observe_success(call);
    }
    let coding = content_coding(&parts.headers);
    let plain = coding == Coding::Identity;
    let mode = if kind == CallKind::Limits && status == StatusCode::OK && plain {
        Some(Watch::Limits(Vec::new()))
    } else if plain && (kind.is_soap_call() || is_limit_status(status)) {
        Some(Watch::Scan(BodyScanner::new()))
    } else if is_limit_status(status) {
        // A client that asks for gzip (most HTTP libraries do) gets its limit errors compressed.
        Inflate::for_coding(coding)
            .map(|inflate| Watch::ScanEncoded(Box::new(inflate), BodyScanner::new()))
    } else {
        None
    };
    // Only a limit status can carry Salesforce's refusal.
    let refused =
        (is_limit_status(status) && call.units() > 0).then(|| (meter.clone(), call.charge()));
    match mode {
        Some(mode) => ResponseBody::observed(
            body,
            Box::new(UsageWatcher {
                org: org.clone(),
                mode,
                refused,
                heard: call.heard(),
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
    /// A compressed body, decoded for the scanner as it passes.
    ScanEncoded(Box<Inflate>, BodyScanner),
    Limits(Vec<u8>),
}

/// A gzip or deflate decoder fed the body's chunks, its output taken after each. Which deflate
/// (zlib-wrapped or raw) is known from the first byte.
enum Inflate {
    Gzip(flate2::write::GzDecoder<Vec<u8>>),
    Deflate,
    Zlib(flate2::write::ZlibDecoder<Vec<u8>>),
    Raw(flate2::write::DeflateDecoder<Vec<u8>>),
}

impl Inflate {
    fn for_coding(coding: Coding) -> Option<Inflate> {
        match coding {
            Coding::Gzip => Some(Inflate::Gzip(flate2::write::GzDecoder::new(Vec::new()))),
            Coding::Deflate => Some(Inflate::Deflate),
            Coding::Identity | Coding::Other => None,
        }
    }

    /// Decodes `data` into `scanner`, a few hundred bytes of input at a time so that a
    /// compression bomb never expands far past what the scanner still wants. False once the
    /// scanner has seen enough or the stream is broken.
    fn feed(&mut self, data: &[u8], scanner: &mut BodyScanner) -> bool {
        use std::io::Write;
        if matches!(self, Inflate::Deflate) && !data.is_empty() {
            *self = if is_zlib(data.first().copied()) {
                Inflate::Zlib(flate2::write::ZlibDecoder::new(Vec::new()))
            } else {
                Inflate::Raw(flate2::write::DeflateDecoder::new(Vec::new()))
            };
        }
        for piece in data.chunks(256) {
            let (written, out) = match self {
                Inflate::Gzip(d) => (d.write_all(piece), d.get_mut()),
                Inflate::Zlib(d) => (d.write_all(piece), d.get_mut()),
                Inflate::Raw(d) => (d.write_all(piece), d.get_mut()),
                Inflate::Deflate => return true, // no byte yet
            };
            scanner.feed(out);
            out.clear();
            if written.is_err() || scanner.is_done() {
                return false;
            }
        }
        true
    }

    /// Passes on what the decoder still holds once the body has ended.
    fn finish(&mut self, scanner: &mut BodyScanner) {
        let (_, out) = match self {
            Inflate::Gzip(d) => (d.try_finish(), d.get_mut()),
            Inflate::Zlib(d) => (d.try_finish(), d.get_mut()),
            Inflate::Raw(d) => (d.try_finish(), d.get_mut()),
            Inflate::Deflate => return,
        };
        scanner.feed(out);
        out.clear();
    }
}

struct UsageWatcher {
    org: Arc<OrgRoute>,
    mode: Watch,
    /// The call's charge and meter, should the body say Salesforce refused it for the daily
    /// limit: such a call is not counted, and stays out of the integration's quota too.
    refused: Option<(Arc<IntegrationMeter>, Charge)>,
    /// The reports the org had taken when the call was decided (see `Ticket::heard`).
    heard: Heard,
}

impl Observer for UsageWatcher {
    fn chunk(&mut self, data: &[u8]) -> bool {
        match &mut self.mode {
            Watch::Scan(scanner) => {
                scanner.feed(data);
                !scanner.is_done()
            }
            Watch::ScanEncoded(inflate, scanner) => inflate.feed(data, scanner),
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
        if let Watch::ScanEncoded(inflate, scanner) = &mut self.mode {
            inflate.finish(scanner);
        }
        let (report, exceeded) = match &mut self.mode {
            Watch::Scan(scanner) | Watch::ScanEncoded(_, scanner) => {
                scanner.finish();
                (scanner.report(), scanner.limit_exceeded())
            }
            Watch::Limits(buf) => (salesforce::parse_limits_body(buf), None),
        };
        if let Some(report) = report {
            self.org.meter.observe_report_heard(report, self.heard);
            self.org.metrics.usage_report(true);
        }
        match exceeded {
            Some(LimitExceeded::Daily) => {
                tracing::warn!(
                    org = self.org.metrics.label(),
                    "Salesforce reports the daily API limit exceeded"
                );
                self.org.meter.observe_exhausted();
                if let Some((meter, charge)) = self.refused.take() {
                    meter.give_back(charge);
                }
            }
            // The concurrency limit says nothing about the daily budget.
            Some(LimitExceeded::ConcurrentLongRunning) | None => {}
        }
    }
}

/// Points the URLs of a login response at the proxy (`public_base`), so the client's next
/// calls come back through it. The body is read whole first, within `upstream`'s response
/// timeout: a body that breaks off or stalls is the upstream failure it is (502, 504), not a
/// login the client would take as answered.
pub async fn rewrite_login(
    kind: CallKind,
    parts: &mut Parts,
    body: ResponseBody,
    public_base: &str,
    upstream: &Upstream,
) -> Result<ResponseBody, ProxyError> {
    let ResponseBody::Stream(inner) = body else {
        return Ok(body);
    };
    if content_coding(&parts.headers) != Coding::Identity {
        tracing::warn!("login response is content-encoded; its URLs cannot be rewritten");
        return Ok(ResponseBody::Stream(inner));
    }
    let after = upstream.response_timeout();
    let read = ResponseBody::collect_bounded(inner, LOGIN_BODY_LIMIT);
    let bytes: Bytes = match tokio::time::timeout(after, read).await {
        Ok(Ok(Ok(bytes))) => bytes,
        Ok(Ok(Err(too_large))) => return Ok(too_large),
        Ok(Err(BodyError::Upstream(e))) => {
            return Err(ProxyError::Upstream {
                upstream: upstream.name(true).to_owned(),
                source: SendError::Exchange(e),
            })
        }
        Ok(Err(BodyError::Stalled(after))) => {
            return Err(ProxyError::UpstreamTimeout {
                upstream: upstream.name(true).to_owned(),
                after,
            })
        }
        Err(_) => {
            return Err(ProxyError::UpstreamTimeout {
                upstream: upstream.name(true).to_owned(),
                after,
            })
        }
    };
    let content_type = parts
        .headers
        .get(header::CONTENT_TYPE)
        .map(HeaderValue::as_bytes);
    let rewritten = match kind {
        CallKind::OAuth => salesforce::rewrite_oauth_token(&bytes, content_type, public_base),
        _ => salesforce::rewrite_soap_login(&bytes, public_base),
    };
    if tracing::enabled!(tracing::Level::TRACE) {
        let text = String::from_utf8_lossy(&bytes);
        tracing::trace!(body = %salesforce::redact_body(&text), "login response from Salesforce");
    }
    // Only a rewritten body has a length of its own: one left alone keeps its framing
    // (a chunked one gets its length where the response goes on, from the body).
    let body = match rewritten {
        Some(body) => {
            parts
                .headers
                .insert(header::CONTENT_LENGTH, HeaderValue::from(body.len()));
            Bytes::from(body)
        }
        None => bytes,
    };
    Ok(ResponseBody::full(body))
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::*;

    /// Each deflate (zlib-wrapped or raw) and gzip, in pieces of any size, reach the scanner.
    #[test]
    fn compressed_limit_errors_reach_the_scanner() {
        let body = br#"[{"message":"TotalRequests Limit exceeded.","errorCode":"REQUEST_LIMIT_EXCEEDED"}]"#;
        let level = flate2::Compression::default();
        let mut gzip = flate2::write::GzEncoder::new(Vec::new(), level);
        let mut zlib = flate2::write::ZlibEncoder::new(Vec::new(), level);
        let mut raw = flate2::write::DeflateEncoder::new(Vec::new(), level);
        let encoded = [
            (Coding::Gzip, {
                gzip.write_all(body).ok();
                gzip.finish().expect("gzip")
            }),
            (Coding::Deflate, {
                zlib.write_all(body).ok();
                zlib.finish().expect("zlib")
            }),
            (Coding::Deflate, {
                raw.write_all(body).ok();
                raw.finish().expect("raw")
            }),
        ];
        for (coding, bytes) in encoded {
            for piece in [1, 7, bytes.len()] {
                let mut inflate = Inflate::for_coding(coding).expect("decoder");
                let mut scanner = BodyScanner::new();
                for chunk in bytes.chunks(piece) {
                    inflate.feed(chunk, &mut scanner);
                }
                inflate.finish(&mut scanner);
                scanner.finish();
                assert_eq!(
                    scanner.limit_exceeded(),
                    Some(LimitExceeded::Daily),
                    "{coding:?} in pieces of {piece}"
                );
            }
        }
        assert!(Inflate::for_coding(Coding::Other).is_none());
    }
}
