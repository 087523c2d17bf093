//! The admin listener: `/metrics` for Prometheus, health checks, the JSON usage API and the
//! deferred calls' "sync failures" list.
//!
//! It listens apart from the proxy (default 127.0.0.1:9464) so that operators can firewall it
//! separately and so that scraping never competes with the integrations' traffic for a
//! connection slot. Reading is open; every call that changes something needs
//! `Authorization: Bearer <token>` with the token from `admin.token_env`.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use serde::Serialize;

use crate::meter::Meter;
use crate::metrics::Metrics;
use crate::proxy::{constant_time_eq, ResponseBody};
use crate::queue::deferred::{now_ms, Deferrals};
use crate::store::{DeferredFilter, DeferredId, DeferredState};

/// What the admin endpoints read and change.
pub struct Admin {
    pub metrics: Arc<Metrics>,
    pub meter: Arc<Meter>,
    pub deferrals: Arc<Deferrals>,
    /// The bearer token for mutating calls; `None`: they are refused.
    pub token: Option<String>,
    pub token_env: String,
    /// False until every listener is bound, and again once shutdown starts.
    pub ready: AtomicBool,
    /// The status page, the threshold and history APIs.
    pub console: Arc<crate::console::Console>,
    /// The address the listener is bound to, for the 421's advice.
    pub addr: SocketAddr,
}

/// Whether a request from this machine names a host other than an IP address or `localhost`:
/// a web page the admin visits can point a name of its own at 127.0.0.1 (DNS rebinding) and
/// read the open API as its own origin (deferred calls' queries, notify addresses). Local
/// clients (curl, Prometheus on the same machine, the browser on `http://127.0.0.1:9464/`)
/// name an address; one that names none (HTTP/1.0 without `Host`, a health checker) is no
/// browser. Clients on other machines reach the listener by the name they know, and a
/// firewall stands between them and it.
fn foreign_host(headers: &http::HeaderMap, uri: &http::Uri) -> bool {
    let Some(host) = uri
        .host()
        .or_else(|| headers.get(header::HOST).and_then(|h| h.to_str().ok()))
    else {
        return false;
    };
    // Drop the port: `[::1]:9464`, `127.0.0.1:9464`, `localhost:9464`.
    let name = match host.strip_prefix('[') {
        Some(v6) => v6.split(']').next().unwrap_or(""),
        None => host.rsplit_once(':').map_or(host, |(name, _)| name),
    };
    !(name.eq_ignore_ascii_case("localhost") || name.parse::<std::net::IpAddr>().is_ok())
}

/// Where a client on this machine reaches a listener bound to `addr`: that address, or
/// loopback on its port when it is bound to every address (`0.0.0.0`, `[::]`), which names none.
fn local_address(addr: SocketAddr) -> SocketAddr {
    match addr.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => (Ipv4Addr::LOCALHOST, addr.port()).into(),
        IpAddr::V6(ip) if ip.is_unspecified() => (Ipv6Addr::LOCALHOST, addr.port()).into(),
        _ => addr,
    }
}

/// The token of an `Authorization: Bearer <token>` header (the scheme's case does not matter,
/// RFC 9110 §11.1), for every admin endpoint that changes something.
pub(crate) fn bearer(headers: &http::HeaderMap) -> Option<&str> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
}

impl Admin {
    /// `local`: the client is on this machine (a loopback peer). `HEAD` is answered as `GET`,
    /// without the body: health checkers and monitors probe with it.
    pub async fn handle(
        self: Arc<Self>,
        req: Request<Incoming>,
        local: bool,
    ) -> Response<ResponseBody> {
        let head = req.method() == Method::HEAD;
        let resp = self.answer(req, local).await;
        if head {
            ResponseBody::head_only(resp)
        } else {
            resp
        }
    }

    async fn answer(
        self: Arc<Self>,
        req: Request<Incoming>,
        local: bool,
    ) -> Response<ResponseBody> {
        if local && foreign_host(req.headers(), req.uri()) {
            return text(
                StatusCode::MISDIRECTED_REQUEST,
                format!(
                    "from this machine, name the admin listener by its address \
                     (http://{}/) or localhost\n",
                    local_address(self.addr)
                ),
            );
        }
        if crate::console::Console::serves(req.uri().path()) {
            // The status page shows each integration's queue depth: a deferring one's is the
            // store's count, read now as `/api/v1/usage` does, not left as of the last scrape.
            if req.uri().path() == "/" {
                if let Err(e) = self.deferrals.refresh_depths(|_| {}).await {
                    tracing::warn!(error = %e, "status page: reading deferred-call counts failed");
                }
            }
            return self.console.clone().handle(req).await;
        }
        let path = req.uri().path().to_owned();
        let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
        let read = req.method() == Method::GET || req.method() == Method::HEAD;
        match (req.method(), segments.as_slice()) {
            (_, ["metrics"]) if read => self.metrics_page().await,
            (_, ["healthz"]) if read => text(StatusCode::OK, "ok\n"),
            (_, ["readyz"]) if read => {
                if self.ready.load(Ordering::Relaxed) {
                    text(StatusCode::OK, "ready\n")
                } else {
                    text(StatusCode::SERVICE_UNAVAILABLE, "not ready\n")
                }
            }
            (_, ["api", "v1", "usage"]) if read => {
                let _ = self.deferrals.refresh_depths(|_| {}).await;
                json(StatusCode::OK, &self.meter.usage())
            }
            (_, ["api", "v1", "deferred"]) if read => self.list_deferred(req.uri().query()).await,
            (&Method::POST, ["api", "v1", "deferred", id, action]) => {
                if let Some(refused) = self.refuse_unauthorized(&req) {
                    return refused;
                }
                self.change_deferred(id, action).await
            }
            // A known path with another method: 405, saying which methods it takes, in the
            // shape of its errors (a 404 read as a wrong URL).
            (method, ["metrics" | "healthz" | "readyz"]) => allow(
                READ,
                text(
                    StatusCode::METHOD_NOT_ALLOWED,
                    format!("{method} is not supported here; use GET or HEAD\n"),
                ),
            ),
            (method, ["api", "v1", "usage" | "deferred"]) => allow(
                READ,
                error(
                    StatusCode::METHOD_NOT_ALLOWED,
                    &format!("{method} is not supported here; use GET"),
                ),
            ),
            (method, ["api", "v1", "deferred", _, "retry" | "discard"]) => allow(
                "POST",
                error(
                    StatusCode::METHOD_NOT_ALLOWED,
                    &format!(
                        "{method} is not supported here; use POST /api/v1/deferred/{{id}}/retry or /discard"
                    ),
                ),
            ),
            _ => text(
                StatusCode::NOT_FOUND,
                "not found; try / (status page), /metrics, /healthz, /readyz, /api/v1/usage, \
                 /api/v1/deferred, /api/v1/history or /api/v1/orgs/{org}/threshold\n",
            ),
        }
    }

    async fn metrics_page(&self) -> Response<ResponseBody> {
        let metrics = &self.metrics;
        let refreshed = self
            .deferrals
            .refresh_depths(|counts| metrics.update_deferred(counts))
            .await;
        if let Err(e) = refreshed {
            tracing::warn!(error = %e, "reading deferred-call counts for /metrics failed")
        }
        let mut resp = text(StatusCode::OK, self.metrics.render(&self.meter.usage()));
        resp.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
        );
        resp
    }

    /// Checks `Authorization: Bearer <token>`; the refusal to send when it does not hold.
    fn refuse_unauthorized(&self, req: &Request<Incoming>) -> Option<Response<ResponseBody>> {
        let Some(token) = &self.token else {
            return Some(error(
                StatusCode::FORBIDDEN,
                &format!("changes through the admin API are off: set the environment variable {} to a token and restart", self.token_env),
            ));
        };
        match bearer(req.headers()) {
            Some(given) if constant_time_eq(given.as_bytes(), token.as_bytes()) => None,
            Some(_) => Some(error(StatusCode::UNAUTHORIZED, "the bearer token is wrong")),
            None => Some(error(
                StatusCode::UNAUTHORIZED,
                "send Authorization: Bearer <admin token>",
            )),
        }
    }

    async fn list_deferred(&self, query: Option<&str>) -> Response<ResponseBody> {
        let mut filter = DeferredFilter::default();
        for (key, value) in query
            .unwrap_or("")
            .split('&')
            .filter_map(|kv| kv.split_once('='))
        {
            match key {
                "org" => filter.org = Some(value.to_owned()),
                "integration" => filter.integration = Some(value.to_owned()),
                "state" => match value.parse::<DeferredState>() {
                    Ok(state) => filter.state = Some(state),
                    Err(_) => return error(StatusCode::BAD_REQUEST, &format!("state={value}: expected pending, in_flight, delivered, failed or discarded")),
                },
                "limit" => match value.parse::<usize>() {
                    Ok(n) if (1..=1000).contains(&n) => filter.limit = n,
                    _ => return error(StatusCode::BAD_REQUEST, &format!("limit={value}: expected 1 to 1000")),
                },
                "before" => match value.parse::<DeferredId>() {
                    Ok(id) => filter.before = Some(id),
                    Err(_) => return error(StatusCode::BAD_REQUEST, &format!("before={value}: expected a deferred call id")),
                },
                _ => return error(StatusCode::BAD_REQUEST, &format!("unknown parameter {key}; use org, integration, state, limit, before")),
            }
        }
        let store = self.deferrals.store().clone();
        match tokio::task::spawn_blocking(move || store.list_deferred(filter)).await {
            Ok(Ok(calls)) => json(StatusCode::OK, &DeferredList { calls }),
            Ok(Err(e)) => error(
                StatusCode::SERVICE_UNAVAILABLE,
                &format!("the store cannot be read: {e}"),
            ),
            Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, &e.to_string()),
        }
    }

    async fn change_deferred(&self, id: &str, action: &str) -> Response<ResponseBody> {
        let Ok(id) = id.parse::<DeferredId>() else {
            return error(
                StatusCode::BAD_REQUEST,
                &format!("{id:?} is not a deferred call id"),
            );
        };
        let retry = match action {
            "retry" => true,
            "discard" => false,
            _ => {
                return error(
                    StatusCode::NOT_FOUND,
                    "use POST /api/v1/deferred/{id}/retry or /discard",
                )
            }
        };
        let store = self.deferrals.store().clone();
        let changed = tokio::task::spawn_blocking(move || {
            let call = store.get_deferred(id)?;
            let changed = if retry {
                store.retry_deferred(id, now_ms())?
            } else {
                store.discard_deferred(id, now_ms())?
            };
            Ok::<_, crate::store::StoreError>((call, changed))
        })
        .await;
        match changed {
            Ok(Ok((None, _))) => error(StatusCode::NOT_FOUND, &format!("no deferred call {id}")),
            Ok(Ok((Some(call), false))) => error(
                StatusCode::CONFLICT,
                &format!("deferred call {id} is {}; only failed calls can be retried, pending or failed ones discarded", call.state.as_str()),
            ),
            Ok(Ok((Some(call), true))) => {
                if retry {
                    self.deferrals.wake(&call.org);
                }
                json(StatusCode::OK, &serde_json::json!({ "id": id.to_string(), "state": if retry { "pending" } else { "discarded" } }))
            }
            Ok(Err(e)) => error(StatusCode::SERVICE_UNAVAILABLE, &format!("the store cannot be changed: {e}")),
            Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, &e.to_string()),
        }
    }
}

/// What the read-only endpoints take, for `Allow`.
pub(crate) const READ: &str = "GET, HEAD";

/// `resp` (a 405) with the methods the path takes in `Allow`, as RFC 9110 §15.5.6 asks.
pub(crate) fn allow(
    methods: &'static str,
    mut resp: Response<ResponseBody>,
) -> Response<ResponseBody> {
    resp.headers_mut()
        .insert(header::ALLOW, HeaderValue::from_static(methods));
    resp
}

#[derive(Serialize)]
struct DeferredList {
    calls: Vec<crate::store::DeferredSummary>,
}

fn text(status: StatusCode, body: impl Into<bytes::Bytes>) -> Response<ResponseBody> {
    let mut resp = Response::new(ResponseBody::full(body));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp
}

fn error(status: StatusCode, message: &str) -> Response<ResponseBody> {
    json(status, &serde_json::json!({ "error": message }))
}

fn json<T: Serialize>(status: StatusCode, value: &T) -> Response<ResponseBody> {
    match serde_json::to_vec_pretty(value) {
        Ok(body) => {
            let mut resp = Response::new(ResponseBody::full(body));
            *resp.status_mut() = status;
            resp.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            );
            resp
        }
        Err(e) => text(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("cannot encode JSON: {e}\n"),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_bearer_scheme_is_read_in_any_case() {
        let mut headers = http::HeaderMap::new();
        assert_eq!(bearer(&headers), None);
        for (value, token) in [
            ("Bearer s3cret", Some("s3cret")),
            ("bearer s3cret", Some("s3cret")),
            ("BEARER  s3cret ", Some("s3cret")),
            ("Basic czNjcmV0", None),
            ("Bearer", None),
        ] {
            headers.insert(header::AUTHORIZATION, http::HeaderValue::from_static(value));
            assert_eq!(bearer(&headers), token, "{value}");
        }
    }

    #[test]
    fn the_421_names_an_address_a_local_client_can_reach() {
        for (bound, named) in [
            ("127.0.0.1:27464", "127.0.0.1:27464"),
            ("10.1.2.3:9464", "10.1.2.3:9464"),
            ("0.0.0.0:27464", "127.0.0.1:27464"),
            ("[::]:27464", "[::1]:27464"),
            ("[::1]:9464", "[::1]:9464"),
        ] {
            let bound: SocketAddr = bound.parse().expect("address");
            assert_eq!(local_address(bound).to_string(), named, "{bound}");
        }
    }

    /// A loopback admin listener answers requests that name an address or `localhost`, not
    /// a name a web page may have pointed at 127.0.0.1 (DNS rebinding).
    #[test]
    fn a_loopback_listener_refuses_foreign_host_names() {
        let foreign = |host: &str| {
            let mut headers = http::HeaderMap::new();
            headers.insert(header::HOST, HeaderValue::from_str(host).expect("host"));
            foreign_host(&headers, &http::Uri::from_static("/api/v1/deferred"))
        };
        for ok in [
            "127.0.0.1:9464",
            "127.0.0.1",
            "[::1]:9464",
            "localhost:9464",
            "LOCALHOST",
        ] {
            assert!(!foreign(ok), "{ok}");
        }
        for bad in [
            "rebind.attacker.example:9464",
            "attacker.example",
            "localhost.evil:9464",
        ] {
            assert!(foreign(bad), "{bad}");
        }
        // No Host at all (HTTP/1.0, a health checker): no browser sent it.
        assert!(!foreign_host(
            &http::HeaderMap::new(),
            &http::Uri::from_static("/healthz")
        ));
    }
}
