//! The admin console, on the admin listener next to `/metrics`:
//!
//! - `GET /`: the status page (server-rendered HTML; `?part=live` is the part it refreshes), and
//!   `GET /status.js`, its script;
//! - `GET|PUT|DELETE /api/v1/orgs/{org}/threshold`: an org's threshold; `PUT` sets it at run time
//!   (kept in the store, wins over the config), `DELETE` goes back to the configured one. Both
//!   need `Authorization: Bearer <token>` with the token from `admin.token_env`;
//! - `GET /api/v1/history?days=7[&org=ID]`: counted calls per calendar day and integration.
//!
//! [`start`] assembles what these read and the tasks behind them: the thresholds, the threshold
//! watcher that sends emails, and the history recorder.

mod status;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use http_body::Body;
use http_body_util::{BodyExt, LengthLimitError, Limited};
use hyper::body::Incoming;
use serde::Serialize;
use tokio::sync::{watch, Notify};
use tokio::task::JoinSet;

use crate::admin::{allow, READ};
use crate::config::Config;
use crate::history::{History, KEEP_DAYS};
use crate::meter::Meter;
use crate::metrics::Metrics;
use crate::notify::mail::{Mailer, MailerError};
use crate::notify::{self, Source, Thresholds, Watcher};
use crate::proxy::ResponseBody;
use crate::store::{Store, StoreError};

/// Largest request body the API reads (a threshold is a few hundred bytes).
const MAX_BODY: usize = 64 * 1024;

/// Why the console's parts could not start.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    #[error("store: {0}")]
    Store(#[from] StoreError),
    #[error("[smtp]: {0}")]
    Mailer(#[from] MailerError),
}

/// What the console's pages and endpoints read and change.
pub struct Console {
    pub meter: Arc<Meter>,
    pub thresholds: Arc<Thresholds>,
    pub history: Arc<History>,
    pub store: Arc<Store>,
    /// The admin token; `None`: mutating endpoints refuse every request.
    pub token: Option<String>,
    /// Where the token comes from, for messages.
    pub token_env: String,
    /// Tells the threshold watcher to look at once.
    pub poke: Arc<Notify>,
    /// How long a request body may take to come whole: the listener's `header_timeout`, so a
    /// client that declares a body and does not send it holds the connection no longer than
    /// one that does not finish its head.
    pub body_timeout: Duration,
}

/// Loads the thresholds saved at run time, opens the history and spawns the threshold watcher
/// and the history recorder (both stop with `stop`).
pub async fn start(
    config: &Config,
    meter: &Arc<Meter>,
    store: &Arc<Store>,
    metrics: &Arc<Metrics>,
    stop: &watch::Sender<bool>,
    tasks: &mut JoinSet<()>,
) -> Result<Arc<Console>, SetupError> {
    let thresholds = Arc::new(Thresholds::from_config(config));
    thresholds.load(store, meter).await?;
    let mailer = config
        .smtp
        .as_ref()
        .map(Mailer::new)
        .transpose()?
        .map(Arc::new);
    let poke = Arc::new(Notify::new());
    let on_limit: HashMap<_, _> = config
        .integrations
        .iter()
        .map(|i| ((i.org.to_string(), i.id.to_string()), i.on_limit))
        .collect();
    let watcher = Watcher {
        meter: meter.clone(),
        thresholds: thresholds.clone(),
        store: store.clone(),
        metrics: metrics.clone(),
        mailer,
        on_limit,
        poke: poke.clone(),
        shutdown_grace: config.proxy.shutdown_grace,
    };
    tasks.spawn(watcher.run(stop.subscribe()));

    let history =
        Arc::new(History::open(meter.clone(), store.clone(), config.history.clone()).await?);
    tasks.spawn(history.clone().run(stop.subscribe()));

    Ok(Arc::new(Console {
        meter: meter.clone(),
        thresholds,
        history,
        store: store.clone(),
        token: config.admin.token.clone(),
        token_env: config.admin.token_env.clone(),
        poke,
        body_timeout: config.proxy.header_timeout,
    }))
}

/// `{"message": ..., "field": ...}`: what every error of the API answers.
#[derive(Serialize)]
struct ApiError<'a> {
    message: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    field: Option<&'a str>,
}

/// What `GET /api/v1/orgs/{org}/threshold` answers.
#[derive(Serialize)]
struct ThresholdView {
    org: String,
    source: Source,
    /// What `PUT` takes; `null` without a threshold.
    threshold: Option<serde_json::Value>,
    /// The levels in calls against the current limit (a percentage is left out while the limit
    /// is unknown), lowest first.
    levels_in_calls: Vec<LevelInCalls>,
    limit: Option<u64>,
    used: u64,
}

#[derive(Serialize)]
struct LevelInCalls {
    level: String,
    calls: u64,
}

impl Console {
    /// The paths this module answers on the admin listener.
    pub fn serves(path: &str) -> bool {
        matches!(path, "/" | "/status.js" | "/api/v1/history") || path.starts_with("/api/v1/orgs/")
    }

    pub async fn handle(self: Arc<Self>, req: Request<Incoming>) -> Response<ResponseBody> {
        let path = req.uri().path().to_owned();
        let query = req.uri().query().unwrap_or("").to_owned();
        let read_only = req.method() == Method::GET || req.method() == Method::HEAD;
        match path.as_str() {
            "/" | "/status.js" | "/api/v1/history" if !read_only => allow(
                READ,
                error(
                    StatusCode::METHOD_NOT_ALLOWED,
                    "only GET (and HEAD) is supported here",
                    None,
                ),
            ),
            "/" => self.status_page(&query).await,
            "/status.js" => {
                let mut resp = with_type(
                    StatusCode::OK,
                    status::SCRIPT,
                    "text/javascript; charset=utf-8",
                );
                resp.headers_mut()
                    .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
                resp
            }
            "/api/v1/history" => self.history(&query).await,
            _ => match path
                .strip_prefix("/api/v1/orgs/")
                .and_then(|rest| rest.strip_suffix("/threshold"))
            {
                Some(org) if !org.contains('/') => {
                    let org = org.to_owned();
                    self.threshold(req, &org).await
                }
                _ => error(
                    StatusCode::NOT_FOUND,
                    "not found; the org endpoints are /api/v1/orgs/{org}/threshold",
                    None,
                ),
            },
        }
    }

    async fn status_page(&self, query: &str) -> Response<ResponseBody> {
        let live_only = param(query, "part") == Some("live");
        let history = match self.history.report(7, None).await {
            Ok(h) => Some(h),
            Err(e) => {
                tracing::warn!(error = %e, "status page: cannot read the history");
                None
            }
        };
        let now = self
            .meter
            .orgs()
            .next()
            .map_or(0, |o| o.clock().unix_ms() / 1000) as i64;
        let data = status::PageData {
            usage: self.meter.usage(),
            thresholds: &self.thresholds,
            history,
            updated: self.history.local_time(now),
            token_set: self.token.is_some(),
            token_env: &self.token_env,
        };
        let html = if live_only {
            status::live(&data)
        } else {
            status::page(&data)
        };
        let mut resp = with_type(StatusCode::OK, html, "text/html; charset=utf-8");
        let h = resp.headers_mut();
        h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        h.insert(
            header::CONTENT_SECURITY_POLICY,
            HeaderValue::from_static(
                "default-src 'none'; script-src 'self'; style-src 'unsafe-inline'; \
                 connect-src 'self'; img-src 'self' data:; form-action 'none'; \
                 frame-ancestors 'none'; base-uri 'none'",
            ),
        );
        h.insert(
            header::X_CONTENT_TYPE_OPTIONS,
            HeaderValue::from_static("nosniff"),
        );
        h.insert(
            header::REFERRER_POLICY,
            HeaderValue::from_static("no-referrer"),
        );
        resp
    }

    async fn history(&self, query: &str) -> Response<ResponseBody> {
        let days = match param(query, "days") {
            None => 7,
            Some(text) => match text.parse::<u32>() {
                Ok(d) if (1..=KEEP_DAYS).contains(&d) => d,
                _ => {
                    return error(
                        StatusCode::BAD_REQUEST,
                        &format!(
                            "days={text:?} is not a whole number from 1 to {KEEP_DAYS} (the history keeps {KEEP_DAYS} days)"
                        ),
                        Some("days"),
                    )
                }
            },
        };
        let org = param(query, "org");
        if let Some(org) = org {
            if !self.meter.orgs().any(|o| o.id().as_str() == org) {
                return error(
                    StatusCode::NOT_FOUND,
                    &format!("org {org:?} is not configured"),
                    Some("org"),
                );
            }
        }
        match self.history.report(days, org).await {
            Ok(report) => json(StatusCode::OK, &report),
            Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, &e.to_string(), None),
        }
    }

    async fn threshold(&self, req: Request<Incoming>, org: &str) -> Response<ResponseBody> {
        let method = req.method().clone();
        match method {
            Method::GET | Method::HEAD => {}
            Method::PUT | Method::DELETE => {
                if let Err(resp) = self.authorize(&req) {
                    return resp;
                }
            }
            _ => {
                return allow(
                    "GET, HEAD, PUT, DELETE",
                    error(
                        StatusCode::METHOD_NOT_ALLOWED,
                        "use GET, PUT (with a JSON threshold) or DELETE (back to the configured threshold)",
                        None,
                    ),
                )
            }
        }
        if self.thresholds.get(org).is_none() {
            return error(
                StatusCode::NOT_FOUND,
                &format!("org {org:?} is not configured"),
                None,
            );
        }
        let new = match method {
            Method::PUT => {
                let body = match self.read_body(req).await {
                    Ok(body) => body,
                    Err(refused) => return refused,
                };
                match parse_threshold(&body) {
                    Ok(t) => Some(Some(t)),
                    Err(e) => {
                        return error(StatusCode::BAD_REQUEST, &e.message, e.field.as_deref())
                    }
                }
            }
            Method::DELETE => Some(None),
            _ => None,
        };
        if let Some(threshold) = new {
            let setting = threshold.is_some();
            match self
                .thresholds
                .set(org, threshold, &self.store, &self.meter)
                .await
            {
                Ok(_) => {
                    tracing::info!(%org, set = setting, "threshold changed through the admin API");
                    self.poke.notify_one();
                }
                Err(e) => {
                    return error(
                        StatusCode::INTERNAL_SERVER_ERROR,
                        &format!("the threshold was not changed: {e}"),
                        None,
                    )
                }
            }
        }
        json(StatusCode::OK, &self.threshold_view(org))
    }

    /// The request's body, whole, or the answer that refuses it: 413 when it declares more
    /// than [`MAX_BODY`] (before any of it is read) or turns out longer, 408 when it has not
    /// all come within `body_timeout`, 400 when it breaks off. A refused body is left unread,
    /// so the connection closes after the answer.
    async fn read_body(&self, req: Request<Incoming>) -> Result<Bytes, Response<ResponseBody>> {
        let version = req.version();
        let closing = |mut resp: Response<ResponseBody>| {
            // `Connection` is an HTTP/1 header; an HTTP/2 stream ends on its own.
            if version < http::Version::HTTP_2 {
                resp.headers_mut()
                    .insert(header::CONNECTION, HeaderValue::from_static("close"));
            }
            resp
        };
        let too_large = || {
            closing(error(
                StatusCode::PAYLOAD_TOO_LARGE,
                &format!("the body is larger than the {MAX_BODY} bytes this API reads"),
                None,
            ))
        };
        // hyper knows the length a request declares (`Content-Length`).
        if req.body().size_hint().lower() > MAX_BODY as u64 {
            return Err(too_large());
        }
        let reading = Limited::new(req.into_body(), MAX_BODY).collect();
        match tokio::time::timeout(self.body_timeout, reading).await {
            Ok(Ok(body)) => Ok(body.to_bytes()),
            Ok(Err(e)) if e.is::<LengthLimitError>() => Err(too_large()),
            Ok(Err(e)) => Err(closing(error(
                StatusCode::BAD_REQUEST,
                &format!("cannot read the body: {e}"),
                None,
            ))),
            Err(_) => Err(closing(error(
                StatusCode::REQUEST_TIMEOUT,
                &format!(
                    "the body did not all come within {:?} (proxy.header_timeout); send it whole",
                    self.body_timeout
                ),
                None,
            ))),
        }
    }

    fn threshold_view(&self, org: &str) -> ThresholdView {
        let (threshold, source) = self.thresholds.get(org).unwrap_or((None, Source::None));
        let report = self.meter.usage().orgs.into_iter().find(|o| o.id == org);
        let limit = report.as_ref().and_then(|r| r.limit);
        let mut levels_in_calls: Vec<LevelInCalls> = threshold
            .iter()
            .flat_map(|t| &t.levels)
            .filter_map(|a| {
                let calls = match a {
                    crate::config::Amount::Calls(n) => Some(*n),
                    pct => limit.map(|l| pct.resolve(l)),
                }?;
                Some(LevelInCalls {
                    level: a.to_string(),
                    calls,
                })
            })
            .collect();
        levels_in_calls.sort_by_key(|l| l.calls);
        ThresholdView {
            org: org.to_owned(),
            source,
            threshold: threshold.as_ref().map(notify::to_json),
            levels_in_calls,
            limit,
            used: report.map_or(0, |r| r.used),
        }
    }

    /// Mutating endpoints need `Authorization: Bearer <admin token>`.
    #[allow(clippy::result_large_err)]
    fn authorize(&self, req: &Request<Incoming>) -> Result<(), Response<ResponseBody>> {
        let Some(token) = &self.token else {
            return Err(error(
                StatusCode::FORBIDDEN,
                &format!(
                    "changes through the admin API are turned off: no admin token is set; export \
                     one in the environment variable {} (admin.token_env) and restart callmeter",
                    self.token_env
                ),
                None,
            ));
        };
        let given = crate::admin::bearer(req.headers());
        match given {
            Some(given) if constant_time_eq(given.as_bytes(), token.as_bytes()) => Ok(()),
            _ => {
                let mut resp = error(
                    StatusCode::UNAUTHORIZED,
                    &format!(
                        "{} bearer token: send Authorization: Bearer <the token in {}>",
                        if given.is_some() { "wrong" } else { "missing" },
                        self.token_env
                    ),
                    None,
                );
                resp.headers_mut().insert(
                    header::WWW_AUTHENTICATE,
                    HeaderValue::from_static("Bearer realm=\"callmeter admin\""),
                );
                Err(resp)
            }
        }
    }
}

fn parse_threshold(
    body: &Bytes,
) -> Result<crate::config::ThresholdConfig, notify::InvalidThreshold> {
    let value: serde_json::Value =
        serde_json::from_slice(body).map_err(|e| notify::InvalidThreshold {
            field: None,
            message: format!(
                "the body is not JSON ({e}); send e.g. {{\"levels\": [\"80%\", \"90%\"], \"notify\": [\"admin@example.com\"], \"min_interval\": \"4h\"}}"
            ),
        })?;
    notify::from_json(&value)
}

/// Compares without stopping at the first difference, so timing does not reveal the token.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The value of `name` in a query string (no percent-decoding: the values are ids and numbers).
fn param<'q>(query: &'q str, name: &str) -> Option<&'q str> {
    query
        .split('&')
        .filter_map(|pair| pair.split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v)
}

fn with_type(
    status: StatusCode,
    body: impl Into<Bytes>,
    content_type: &'static str,
) -> Response<ResponseBody> {
    let mut resp = Response::new(ResponseBody::full(body));
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    resp
}

fn json<T: Serialize>(status: StatusCode, value: &T) -> Response<ResponseBody> {
    match serde_json::to_vec_pretty(value) {
        Ok(body) => with_type(status, body, "application/json"),
        Err(e) => error(
            StatusCode::INTERNAL_SERVER_ERROR,
            &format!("cannot encode JSON: {e}"),
            None,
        ),
    }
}

fn error(status: StatusCode, message: &str, field: Option<&str>) -> Response<ResponseBody> {
    let body = serde_json::to_vec(&ApiError { message, field }).unwrap_or_default();
    with_type(status, body, "application/json")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_parameters_and_token_comparison() {
        assert_eq!(param("days=7&org=acme", "org"), Some("acme"));
        assert_eq!(param("days=7", "org"), None);
        assert_eq!(param("", "days"), None);
        assert!(constant_time_eq(b"secret", b"secret"));
        assert!(!constant_time_eq(b"secret", b"secreT"));
        assert!(!constant_time_eq(b"secret", b"secrets"));
    }

    #[test]
    fn the_console_serves_only_its_paths() {
        for p in [
            "/",
            "/status.js",
            "/api/v1/history",
            "/api/v1/orgs/acme/threshold",
        ] {
            assert!(Console::serves(p), "{p}");
        }
        for p in ["/metrics", "/api/v1/usage", "/healthz", "/api/v1/deferred"] {
            assert!(!Console::serves(p), "{p}");
        }
    }
}
