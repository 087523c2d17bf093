//! The proxy: accept a request, attribute it, count it, forward it, learn from the answer.
//!
//! A request takes these steps, each one function:
//! 1. **route** (`route.rs`): which integration and org it belongs to;
//! 2. **classify** (`salesforce::classify`): its API family and how many calls Salesforce counts;
//! 3. **decide** (`meter`): count it before it leaves, so concurrent calls see each other;
//! 4. **forward** (`forward.rs`, connections in `pool.rs`): to the org's configured upstream,
//!    headers cleaned (`headers.rs`);
//! 5. **observe**: usage figures and limit errors in the response, as it streams (`observe.rs`);
//! 6. **rewrite**: login responses point the client back at the proxy (`observe.rs`);
//! 7. **respond** and **record** the outcome in the metrics.
//!
//! Errors on the way are `ProxyError`s, turned into Salesforce-shaped responses in one place.

mod body;
mod deferred;
mod error;
mod forward;
mod headers;
mod listener;
mod observe;
mod pool;
mod reject;
mod route;
mod timer;

use std::sync::Arc;

use http::uri::PathAndQuery;
use http::{header, HeaderValue, Request, Response, Uri};
use hyper::body::Incoming;
use tokio::time::Instant;

pub use body::{decoded_prefix, RequestBody, ResponseBody};
pub use deferred::{constant_time_eq, DeferRoute};
pub use error::ProxyError;
pub use forward::{Upstream, UpstreamSetupError};
pub use listener::{serve_listener, ConnOptions, ListenerSetupError, Peer, TlsSetup};
pub use pool::{Handover, UpstreamBody};
pub use reject::RateLimitHeaders;
pub use route::{Route, RouteTable};

use crate::meter::{OrgMeter, Ticket, Verdict};
use crate::metrics::{Metrics, OrgMetrics, Outcome};
use crate::queue::Oversized;
use crate::salesforce::{self, Api, CallKind, CountingRules};
use headers::ClientInfo;

/// Everything the request path needs about one org.
pub struct OrgRoute {
    pub meter: Arc<OrgMeter>,
    pub metrics: OrgMetrics,
    pub upstream: Arc<Upstream>,
    pub counting: CountingRules,
}

/// One proxy listener's view: its routes and how it is reached.
pub struct ListenerContext {
    pub routes: RouteTable,
    /// Base URL login responses are rewritten to; `None`: derived from the request's Host.
    pub public_url: Option<String>,
    pub tls: bool,
    pub trust_forwarded: bool,
    pub metrics: Arc<Metrics>,
}

/// Handles one request end to end. Never fails: errors become responses here.
pub async fn handle(
    ctx: Arc<ListenerContext>,
    peer: Peer,
    req: Request<Incoming>,
) -> Response<ResponseBody> {
    let started = Instant::now();
    // Kept for the log line of a failed request: cheap clones (an enum, a shared buffer).
    let method = req.method().clone();
    let uri = req.uri().clone();
    match proxy(&ctx, &peer, req, started).await {
        Ok(resp) => resp,
        Err(err) => {
            let path = uri.path();
            if err.is_upstream() {
                tracing::warn!(%method, %path, listener = ctx.routes.listener(), error = %err, "upstream failure");
            } else {
                tracing::debug!(%method, %path, listener = ctx.routes.listener(), error = %err, "request refused");
            }
            if matches!(err, ProxyError::Unmatched { .. } | ProxyError::UnknownKey) {
                ctx.metrics.unmatched(ctx.routes.listener());
            }
            err.into_response(salesforce::is_soap_path(path))
        }
    }
}

/// The steps off the common path (deferred calls, waits in the queue, login rewrites, reading a
/// body prefix) await boxed futures: their state would otherwise make every request's future
/// several KiB larger, and the HTTP/2 server copies that future into a task per stream.
async fn proxy(
    ctx: &ListenerContext,
    peer: &Peer,
    req: Request<Incoming>,
    started: Instant,
) -> Result<Response<ResponseBody>, ProxyError> {
    let (mut parts, body) = req.into_parts();
    headers::check_request(&parts, &body)?;

    // 1. route
    let matched = ctx.routes.route(&parts)?;
    let route = matched.route;
    tracing::trace!(integration = route.id(), method = %parts.method, uri = %salesforce::redact_body(&parts.uri.to_string()), headers = %headers::Redacted(&parts.headers), "request");
    // A request refused from here on is the client's error, recorded under the API its path
    // names (its body, read to cost it, may be what failed).
    let client_error = |path: &str, err: ProxyError| {
        let api = salesforce::classify(&parts.method, path).api();
        route
            .metrics
            .record(api, Outcome::ClientError, started.elapsed());
        err
    };
    let upstream_pq = upstream_path_and_query(&parts.uri, matched.strip)
        .map_err(|e| client_error(parts.uri.path(), e))?;
    let upstream_path = upstream_pq.path();
    if let (Some(defer), Some(id)) = (&route.defer, deferred::status_id(upstream_path)) {
        return Ok(Box::pin(deferred::status(defer, &route, &parts, id)).await);
    }

    // 2. classify
    let (kind, units, body) = classify(&route, &parts, upstream_path, body)
        .await
        .map_err(|e| client_error(upstream_path, e))?;
    let api = kind.api();
    // Where the client reaches this integration: for login rewrites and deferred status URLs.
    let base = (kind.is_login() || route.defer.is_some()).then(|| public_base(ctx, &parts, &route));
    let client = ClientInfo {
        ip: &peer.ip_header,
        tls: ctx.tls,
        trust_forwarded: ctx.trust_forwarded,
    };
    headers::to_upstream(&mut parts.headers, &client, route.call_options.as_ref());
    if parts.version == http::Version::HTTP_2 {
        headers::join_cookies(&mut parts.headers);
    }
    if kind.is_login() || kind.is_soap_call() {
        // The proxy reads these bodies (login URLs, SOAP usage headers): ask for them plain.
        parts.headers.remove(header::ACCEPT_ENCODING);
    }
    let body = if is_get_with_unsized_body(&parts.method, &body) {
        let stall = route.org.upstream.response_timeout();
        Box::pin(settle_get_body(&mut parts.headers, body, stall))
            .await
            .map_err(|e| client_error(upstream_path, e))?
    } else {
        body
    };

    // 3. decide
    let (ticket, admitted) = match admit(&route, api, units, started).await {
        Ok(admitted) => admitted,
        Err(Held::Answered(resp)) => {
            route.meter.note_rejected();
            route
                .metrics
                .record(api, Outcome::Rejected, started.elapsed());
            return Ok(resp);
        }
        Err(Held::Defer(limited)) => {
            let (defer, base) = (route.defer.as_ref(), base.as_deref().unwrap_or(""));
            let answer = match defer {
                Some(defer) => {
                    let call = deferred::Limited {
                        parts: &parts,
                        path_and_query: upstream_pq.as_str(),
                        body,
                        units,
                        limited: &limited,
                        base,
                    };
                    Box::pin(deferred::defer(defer, &route, call)).await
                }
                None => Err((reject::response(&limited, &route, api), Outcome::Rejected)),
            };
            return Ok(match answer {
                Ok(accepted) => {
                    route
                        .metrics
                        .record(api, Outcome::Deferred, started.elapsed());
                    accepted
                }
                Err((refused, outcome)) => {
                    if outcome == Outcome::Rejected {
                        route.meter.note_rejected();
                    }
                    route.metrics.record(api, outcome, started.elapsed());
                    refused
                }
            });
        }
    };

    if kind == CallKind::SoapDebugging {
        route.org.meter.count_debugging();
    }

    // 4. forward
    let login = kind.is_login();
    // A HEAD response has no body to rewrite, and its Content-Length is the GET's.
    let rewrite = login && parts.method != http::Method::HEAD;
    parts.uri = route
        .org
        .upstream
        .uri(login, upstream_pq)
        .map_err(|_| ProxyError::BadPath)?;
    parts.version = http::Version::HTTP_11;
    let mut unsent = Unsent {
        route: &route,
        ticket: Some(ticket),
        handover: Handover::default(),
        api,
        admitted,
        started,
    };
    let sent = route
        .org
        .upstream
        .send(login, Request::from_parts(parts, body), &unsent.handover)
        .await;
    let ticket = unsent.ticket.take().expect("taken only here");
    let response = match sent {
        Ok(resp) => resp,
        Err(err) => {
            if err.not_sent() {
                route.meter.refund(ticket);
            }
            let outcome = if err.is_upstream() {
                Outcome::UpstreamError
            } else {
                Outcome::ClientError
            };
            route.metrics.record(api, outcome, started.elapsed());
            return Err(err);
        }
    };

    // 5. observe, 6. rewrite
    let (mut parts, body) = response.into_parts();
    let body = observe::response(&route.org, &route.meter, kind, &ticket, &parts, body);
    let body = match base {
        Some(base) if rewrite && parts.status.is_success() => {
            let upstream = &route.org.upstream;
            match Box::pin(observe::rewrite_login(
                kind, &mut parts, body, &base, upstream,
            ))
            .await
            {
                Ok(body) => body,
                Err(err) => {
                    let outcome = Outcome::UpstreamError;
                    route.metrics.record(api, outcome, started.elapsed());
                    return Err(err);
                }
            }
        }
        _ => body,
    };

    // 7. respond, record
    if let Err(what) = headers::to_client(&mut parts) {
        route
            .metrics
            .record(api, Outcome::UpstreamError, started.elapsed());
        let upstream = route.org.upstream.name(login).to_owned();
        return Err(ProxyError::Unpassable { upstream, what });
    }
    if ticket.units() > 0 {
        reject::add_ratelimit_headers(&mut parts.headers, &route);
    }
    route.metrics.record(api, admitted, started.elapsed());
    tracing::debug!(
        integration = route.id(),
        api = api.as_str(),
        units = ticket.units(),
        status = parts.status.as_u16(),
        "forwarded"
    );
    Ok(Response::from_parts(
        parts,
        body.hold(ticket.into_in_flight()),
    ))
}

/// A GET or HEAD whose body has no length yet: HTTP/1.1 chunked, or HTTP/2 DATA frames without
/// a `content-length`. hyper's HTTP/1.1 client would send it with no body at all.
fn is_get_with_unsized_body(method: &http::Method, body: &RequestBody) -> bool {
    use http_body::Body;
    (method == http::Method::GET || method == http::Method::HEAD)
        && !body.is_end_stream()
        && body.size_hint().exact().is_none()
}

/// The most of such a body (see `is_get_with_unsized_body`) read to learn its length.
const GET_BODY_READ: usize = 64 * 1024;

/// Settles how such a body (see `is_get_with_unsized_body`) goes on. Read up to
/// `GET_BODY_READ`: none at all (an HTTP/2 stream ended by an empty DATA frame, a chunked body
/// of no chunks) and it goes on without a body, as it came; all of it (a query's few bytes), with
/// its length; more, or a body that ended with trailers (which a length-framed message cannot
/// carry), chunked. One already read in part to cost the call goes on chunked as it streams.
async fn settle_get_body(
    headers: &mut http::HeaderMap,
    body: RequestBody,
    stall: std::time::Duration,
) -> Result<RequestBody, ProxyError> {
    let chunked = |headers: &mut http::HeaderMap| {
        headers.insert(
            header::TRANSFER_ENCODING,
            HeaderValue::from_static("chunked"),
        )
    };
    let incoming = match body {
        RequestBody::Stream(incoming) => incoming,
        body => {
            chunked(headers);
            return Ok(body);
        }
    };
    // One byte more than the limit: a body of exactly `GET_BODY_READ` is read whole.
    let (prefix, complete, body) =
        RequestBody::read_prefix(incoming, GET_BODY_READ + 1, stall, &body::HELD_BYTES).await?;
    match (complete && !body.has_read_trailers(), prefix.len()) {
        (true, 0) => return Ok(RequestBody::Empty),
        (true, length) => headers.insert(header::CONTENT_LENGTH, HeaderValue::from(length)),
        (false, _) => chunked(headers),
    };
    Ok(body)
}

/// A counted call on its way to an upstream connection. Should the request's future be dropped
/// (the client reset its HTTP/2 stream, or hung up on a queueing listener) before a connection
/// took the request, or before all of its body went on, Salesforce cannot have processed it:
/// it is refunded, and recorded as the client's error. Otherwise it stays counted, recorded
/// with the outcome it was admitted with.
struct Unsent<'a> {
    route: &'a Route,
    ticket: Option<Ticket>,
    handover: Handover,
    api: salesforce::Api,
    admitted: Outcome,
    started: Instant,
}

impl Drop for Unsent<'_> {
    fn drop(&mut self) {
        if let Some(ticket) = self.ticket.take() {
            let outcome = if self.handover.may_be_processed() {
                self.admitted
            } else {
                self.route.meter.refund(ticket);
                Outcome::ClientError
            };
            let elapsed = self.started.elapsed();
            self.route.metrics.record(self.api, outcome, elapsed);
        }
    }
}

/// Step 2: what the call is and how many calls Salesforce counts for it. Composite batches
/// and SOAP calls need the start of their body for that; it is read and replayed.
async fn classify(
    route: &Route,
    parts: &http::request::Parts,
    path: &str,
    body: Incoming,
) -> Result<(CallKind, u32, RequestBody), ProxyError> {
    let kind = salesforce::classify(&parts.method, path);
    if !kind.needs_body_prefix() {
        let units = salesforce::counted_units(kind, &route.org.counting, None);
        return Ok((kind, units, RequestBody::Stream(body)));
    }
    let (prefix, complete, body) = Box::pin(RequestBody::read_prefix(
        body,
        salesforce::BODY_PREFIX_LIMIT,
        route.org.upstream.response_timeout(),
        &body::HELD_BYTES,
    ))
    .await?;
    let (bytes, complete) = body::decoded_prefix(
        &parts.headers,
        &prefix,
        complete,
        salesforce::BODY_PREFIX_LIMIT,
    );
    let prefix = salesforce::BodyPrefix {
        bytes: &bytes,
        complete,
    };
    // The body tells a SOAP login() apart from an ordinary call on the same path.
    let kind = salesforce::refine(kind, path, prefix);
    Ok((
        kind,
        salesforce::counted_units(kind, &route.org.counting, Some(prefix)),
        body,
    ))
}

/// A call the meter held back.
enum Held {
    /// Answered already (rejected, or the queue gave up on it).
    Answered(Response<ResponseBody>),
    /// To be stored and replayed (`on_limit = "defer"`).
    Defer(crate::meter::Limited),
}

/// Step 3: the meter's verdict, and for a limited call the integration's `on_limit`. Returns
/// the ticket and whether the call went straight through (`Forwarded`) or waited (`Queued`).
/// A limited call worth more than a budget can ever hold is refused at once, whatever the
/// `on_limit`: waiting or storing it would only delay the same answer (the queue checks its
/// own calls).
async fn admit(
    route: &Route,
    api: Api,
    units: u32,
    started: Instant,
) -> Result<(Ticket, Outcome), Held> {
    let Some(queue) = route.queue.as_ref().filter(|_| units > 0) else {
        let limited = match route.meter.decide(units) {
            Verdict::Forward(ticket) => return Ok((ticket, Outcome::Forwarded)),
            Verdict::Limited(limited) => limited,
        };
        if let Some(oversized) = Oversized::check(&route.meter, units) {
            let refused = reject::oversized_response(&oversized, route, api);
            return Err(Held::Answered(refused));
        }
        return Err(match route.defer {
            Some(_) => Held::Defer(limited),
            None => Held::Answered(reject::response(&limited, route, api)),
        });
    };
    // While calls wait, a new one queues behind them rather than overtaking.
    let limited = if queue.is_busy() {
        None
    } else {
        match route.meter.decide(units) {
            Verdict::Forward(ticket) => return Ok((ticket, Outcome::Forwarded)),
            Verdict::Limited(limited) => Some(limited),
        }
    };
    let mut waiting = Waiting {
        route,
        api,
        started,
        left: true,
    };
    let answer = Box::pin(queue.wait(units, limited)).await;
    waiting.left = false;
    match answer {
        Ok(ticket) => Ok((ticket, Outcome::Queued)),
        Err(err) => Err(Held::Answered(reject::queue_response(&err, route, api))),
    }
}

/// A call in the wait queue. Should its request be dropped there (the client hung up), nothing
/// else records it: it is recorded here, once, as the client's error (neither sent nor
/// counted). Once the queue answers, the caller records the outcome.
struct Waiting<'a> {
    route: &'a Route,
    api: Api,
    started: Instant,
    left: bool,
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        if self.left {
            let elapsed = self.started.elapsed();
            self.route
                .metrics
                .record(self.api, Outcome::ClientError, elapsed);
        }
    }
}

/// The path and query to send upstream: the request's, less the integration's path prefix.
/// Without a prefix it is the request's own (a reference-counted clone, no copy).
fn upstream_path_and_query(uri: &Uri, strip: usize) -> Result<PathAndQuery, ProxyError> {
    let original = uri
        .path_and_query()
        .cloned()
        .unwrap_or_else(|| PathAndQuery::from_static("/"));
    if strip == 0 {
        return Ok(original);
    }
    let rest = original.as_str().get(strip..).unwrap_or("");
    let stripped = if rest.is_empty() || rest.starts_with('?') {
        PathAndQuery::try_from(format!("/{rest}"))
    } else {
        PathAndQuery::try_from(rest)
    };
    stripped.map_err(|_| ProxyError::BadPath)
}

/// Where a client that logged in through this listener should send its next calls: the
/// listener's public URL (or the request's own scheme and Host), plus the integration's prefix.
fn public_base(ctx: &ListenerContext, parts: &http::request::Parts, route: &Route) -> String {
    let request_host = || {
        parts
            .uri
            .authority()
            .map(|a| a.as_str())
            .or_else(|| {
                parts
                    .headers
                    .get(header::HOST)
                    .and_then(|v| v.to_str().ok())
            })
            .unwrap_or("localhost")
    };
    let prefix = route.path_prefix.as_deref().unwrap_or("");
    match &ctx.public_url {
        Some(url) if !route.keep_host => format!("{}{prefix}", url.trim_end_matches('/')),
        Some(url) => {
            let scheme = url.split("://").next().unwrap_or("https");
            format!("{scheme}://{}{prefix}", request_host())
        }
        None => {
            let scheme = if ctx.tls { "https" } else { "http" };
            format!("{scheme}://{}{prefix}", request_host())
        }
    }
}

/// `client=<id>` for an integration's `Sforce-Call-Options`.
pub fn call_options_value(integration: &str) -> Option<HeaderValue> {
    HeaderValue::from_str(&format!("client={integration}")).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_is_stripped_keeping_the_query() {
        let uri: Uri = "/sl/services/data/v60.0/query?q=SELECT+Id"
            .parse()
            .expect("uri");
        assert_eq!(
            upstream_path_and_query(&uri, 3).expect("pq"),
            "/services/data/v60.0/query?q=SELECT+Id"
        );
        let uri: Uri = "/sl?x=1".parse().expect("uri");
        assert_eq!(upstream_path_and_query(&uri, 3).expect("pq"), "/?x=1");
        let uri: Uri = "/sl".parse().expect("uri");
        assert_eq!(upstream_path_and_query(&uri, 3).expect("pq"), "/");
        assert_eq!(upstream_path_and_query(&uri, 0).expect("pq"), "/sl");
    }
}
