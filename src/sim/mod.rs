//! A simulated Salesforce org served over HTTP: the upstream behind the proxy in the end-to-end
//! tests, the benchmarks and `callmeter demo`.
//!
//! It is the tests' oracle, so it implements Salesforce's metering rules
//! (`shared/product/salesforce-metering.md`) on its own and imports nothing from the proxy: a
//! mistake in the proxy's classifier cannot hide behind the same mistake here. It answers REST,
//! composite, Bulk API 1.0 and 2.0, Apex REST, SOAP (including `login()`), the OAuth token
//! endpoint and `/limits`; it counts calls in a rolling window, reports usage the way Salesforce
//! does (`Sforce-Limit-Info`, `LimitInfoHeader`, `/limits`) and refuses calls at the limit with
//! Salesforce's own error shapes.
//!
//! # Layout
//! - `mod.rs` (this file): the public API ([`SimOptions`], [`serve`], [`spawn`], [`SimHandle`],
//!   [`SimServer`], [`SimCount`]), the accept loop and the request path: read the body, route,
//!   meter, build the answer, apply the test delay.
//! - `route`: which API family a path belongs to, from the path alone.
//! - `meter`: the rolling window of counted calls and the atomic check-and-count.
//! - `rest`, `bulk`, `soap`, `oauth`: the answers of each API family, as Salesforce shapes them.
//! - `error`: the malformed-request errors and their REST rendering.
//! - `xml`: the little XML reading SOAP and Bulk 1.0 requests need.
//! - `util`: ids, timestamps, form decoding, escaping and response builders.
//!
//! # Test hooks
//! Paths under `/_sim/` are not Salesforce's and never count: `GET /_sim/count`,
//! `POST /_sim/external?n=K`, `POST /_sim/limit?n=L`, `POST /_sim/reset`. The request header
//! `X-Sim-Delay-Ms: N` delays any answer by N ms (after the call is counted, as Salesforce counts
//! a call it processed even if the client stopped waiting). Every answer carries
//! `X-Sim-Body-Bytes`, the number of request body bytes read.

mod bulk;
mod error;
mod meter;
mod oauth;
mod rest;
mod route;
mod soap;
mod util;
mod xml;

#[cfg(test)]
mod tests;

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::fmt::Display;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::request::Parts;
use http::{HeaderMap, HeaderName, HeaderValue, Method, Request, StatusCode};
use http_body::Body;
use http_body_util::BodyExt;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use self::error::SimError;
use self::meter::{Admission, Api, Meter, Usage};
use self::route::{Hook, Route};
use self::util::{IdGen, Resp};

/// How the simulated org starts.
#[derive(Clone, Debug)]
pub struct SimOptions {
    /// The org's daily API request allocation (Developer Edition: 15,000).
    pub limit: u64,
    /// Calls already used at start, as if made by other integrations outside the proxy; they are
    /// attributed to `external` and age out one window after start.
    pub used: u64,
    /// Length of the rolling window (Salesforce: 24 hours).
    pub window: Duration,
    /// The 18-character org id, used in SOAP URLs, tokens and identity URLs.
    pub org_id: String,
    /// Whether `GET /services/data/vXX.X/limits` counts as a call. Salesforce does not say
    /// (*unconfirmed* in the metering notes); counting it is the cautious default.
    pub count_limits: bool,
}

impl Default for SimOptions {
    fn default() -> Self {
        SimOptions {
            limit: 15_000,
            used: 0,
            window: Duration::from_secs(24 * 60 * 60),
            org_id: "00D000000000001AAA".to_owned(),
            count_limits: true,
        }
    }
}

/// What `GET /_sim/count` answers: the window's content and the request totals.
///
/// `used`, `external`, `by_client` and `by_api` are calls inside the rolling window, so
/// `used == sum(by_client) == sum(by_api)`. `requests`, `rejected` and `debugging` count since
/// start or the last reset.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SimCount {
    /// Counted calls in the window, external ones included.
    pub used: u64,
    /// The current limit.
    pub limit: u64,
    /// Calls in the window added by `SimOptions::used` or `POST /_sim/external`.
    pub external: u64,
    /// Calls in the window by the `client=` of `Sforce-Call-Options` (`unknown` without one).
    pub by_client: BTreeMap<String, u64>,
    /// Calls in the window by API family: rest, composite, bulk, soap, apex, external.
    pub by_api: BTreeMap<String, u64>,
    /// HTTP requests received on Salesforce paths (everything but `/_sim/`), counted or not.
    pub requests: u64,
    /// Requests refused with `REQUEST_LIMIT_EXCEEDED`.
    pub rejected: u64,
    /// SOAP requests with a `DebuggingHeader`: Salesforce meters them in a separate allocation,
    /// so they are tallied here and not in `used`.
    pub debugging: u64,
    /// The window length in seconds.
    pub window_secs: u64,
}

/// The simulated org's state, shared by every connection.
pub struct SimServer {
    org_id: String,
    count_limits: bool,
    window: Duration,
    /// The window and its per-client tallies. A `std::sync::Mutex`, not a Tokio one: the critical
    /// section is a few integer updates and never awaits, and holding one lock over "check the
    /// limit, then count" is what makes the check-and-count atomic.
    meter: Mutex<Meter>,
    /// HTTP requests on Salesforce paths; an atomic because it is bumped outside the meter lock.
    requests: AtomicU64,
    ids: IdGen,
    /// Origin of the window's millisecond clock. A Tokio `Instant`, so tests with paused time
    /// move the window with `tokio::time::advance`.
    epoch: Instant,
}

/// Request bodies are kept in memory up to this size for the routes that parse them; beyond it
/// they are only counted, so a test can stream a large upload without the sim holding it.
const KEEP_BODY_BYTES: usize = 8 * 1024 * 1024;

/// How long a stopping server waits for in-flight requests (e.g. delayed ones) to finish.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

impl SimServer {
    /// A fresh org; `opts.used` calls are put in the window now, attributed to `external`.
    pub fn new(opts: SimOptions) -> Self {
        let window_ms = u64::try_from(opts.window.as_millis()).unwrap_or(u64::MAX);
        let server = SimServer {
            org_id: opts.org_id,
            count_limits: opts.count_limits,
            window: opts.window,
            meter: Mutex::new(Meter::new(opts.limit, window_ms)),
            requests: AtomicU64::new(0),
            ids: IdGen::new(),
            epoch: Instant::now(),
        };
        if opts.used > 0 {
            server.add_external(opts.used);
        }
        server
    }

    /// The window's content and the request totals (what `GET /_sim/count` answers).
    pub fn count(&self) -> SimCount {
        let now = self.now_ms();
        let snap = self.meter().snapshot(now);
        SimCount {
            used: snap.usage.used,
            limit: snap.usage.limit,
            external: snap
                .by_api
                .get(Api::External.as_str())
                .copied()
                .unwrap_or(0),
            by_client: snap.by_client,
            by_api: snap.by_api,
            requests: self.requests.load(Ordering::Relaxed),
            rejected: snap.rejected,
            debugging: snap.debugging,
            window_secs: self.window.as_secs(),
        }
    }

    /// Adds `calls` made outside the proxy. They count in the window like any call, but are never
    /// refused: they stand for traffic that already happened, and Salesforce's limit is soft, so
    /// usage may end above the limit.
    pub fn add_external(&self, calls: u64) {
        let now = self.now_ms();
        self.meter()
            .record(now, meter::EXTERNAL, Api::External, calls);
    }

    /// Changes the limit; calls already in the window stay.
    pub fn set_limit(&self, limit: u64) {
        self.meter().set_limit(limit);
    }

    /// Empties the window and zeroes every total; the limit stays.
    pub fn reset(&self) {
        self.meter().reset();
        self.requests.store(0, Ordering::Relaxed);
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// The meter lock. A panic while it was held cannot leave it half-updated (each method
    /// finishes its arithmetic before anything can panic), so a poisoned lock is used as is.
    fn meter(&self) -> MutexGuard<'_, Meter> {
        self.meter
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The request path: route, read the body, answer (counting on the way), then delay.
    async fn handle<B>(&self, req: Request<B>, local: SocketAddr) -> Resp
    where
        B: Body<Data = Bytes>,
        B::Error: Display,
    {
        let (parts, body) = req.into_parts();
        let route = route::classify(parts.uri.path());
        if !matches!(route, Route::Hook(_)) {
            self.requests.fetch_add(1, Ordering::Relaxed);
        }
        let delay = match delay_of(&parts.headers) {
            Ok(delay) => delay,
            Err(err) => return err.to_rest(),
        };
        let body = match read_body(body, KEEP_BODY_BYTES).await {
            Ok(body) => body,
            Err(err) => return err.to_rest(),
        };
        let client = client_name(&parts.headers);
        let mut resp = self.dispatch(&parts, route, &body, client, local);
        resp.headers_mut()
            .insert(X_SIM_BODY_BYTES, HeaderValue::from(body.len));
        if let Some(delay) = delay {
            tokio::time::sleep(delay).await;
        }
        tracing::debug!(
            method = %parts.method,
            path = parts.uri.path(),
            client,
            status = resp.status().as_u16(),
            body_bytes = body.len,
            "sim answered"
        );
        resp
    }

    fn dispatch(
        &self,
        parts: &Parts,
        route: Route<'_>,
        body: &ReadBody,
        client: &str,
        local: SocketAddr,
    ) -> Resp {
        match route {
            Route::Hook(hook) => self.hook(hook, parts),
            // A CORS preflight carries no credentials: answered before any API, charged to no org.
            _ if parts.method == Method::OPTIONS => util::empty(StatusCode::NO_CONTENT),
            Route::NotFound => SimError::NotFound.to_rest(),
            Route::Versions => rest::versions(&parts.method),
            Route::OAuth(op) => {
                let base = base_url(parts, local);
                let ctx = oauth::Ctx {
                    method: &parts.method,
                    query: parts.uri.query(),
                    body,
                    base: &base,
                    org_id: &self.org_id,
                    ids: &self.ids,
                };
                oauth::handle(op, &ctx)
            }
            Route::Identity { org, user } => {
                oauth::identity(&parts.method, &base_url(parts, local), org, user)
            }
            Route::Rest { version, tail } => {
                let ctx = rest::Ctx {
                    method: &parts.method,
                    version,
                    tail: &tail,
                    query: parts.uri.query(),
                    body,
                    ids: &self.ids,
                };
                let kind = rest::Kind::of(&tail);
                // Composite Batch is the one request Salesforce counts per subrequest, so its
                // body is parsed before metering; a malformed one still costs one call.
                let batch = (kind == rest::Kind::Batch && parts.method == Method::POST)
                    .then(|| rest::batch_requests(body));
                let calls = match (&batch, kind) {
                    (Some(Ok(subrequests)), _) => subrequests.len() as u64,
                    (_, rest::Kind::Limits) if !self.count_limits => 0,
                    _ => 1,
                };
                self.metered_rest(client, kind.api(), calls, |usage| {
                    rest::respond(&ctx, kind, batch, usage)
                })
            }
            Route::Bulk1 { version, tail } => {
                let ctx = bulk::V1 {
                    method: &parts.method,
                    version,
                    tail: &tail,
                    headers: &parts.headers,
                    body,
                    ids: &self.ids,
                };
                self.metered_rest(client, Api::Bulk, 1, |_| bulk::v1(&ctx))
            }
            Route::Apex { path } => self.metered_rest(client, Api::Apex, 1, |_| {
                rest::apex(&parts.method, path, parts.uri.query(), body)
            }),
            Route::Soap { api, version, .. } => {
                self.soap(api, version, body, client, &base_url(parts, local))
            }
        }
    }

    /// Meters a REST-family request (REST, composite, bulk, Apex): refuses it with Salesforce's
    /// 403 at the limit, otherwise counts `calls` and builds the answer. Either way the answer
    /// reports usage in `Sforce-Limit-Info`, as every Salesforce REST response does.
    fn metered_rest(
        &self,
        client: &str,
        api: Api,
        calls: u64,
        build: impl FnOnce(Usage) -> Resp,
    ) -> Resp {
        let now = self.now_ms();
        // The guard is a temporary: the lock is released before the answer is built.
        let admission = if calls == 0 {
            Admission::Counted(self.meter().usage(now))
        } else {
            self.meter().try_count(now, client, api, calls)
        };
        let (mut resp, usage) = match admission {
            Admission::Counted(usage) => (build(usage), usage),
            Admission::Rejected(usage) => (SimError::LimitExceeded.to_rest(), usage),
        };
        let info = format!("api-usage={}/{}", usage.used, usage.limit);
        if let Ok(value) = HeaderValue::from_str(&info) {
            resp.headers_mut().insert(SFORCE_LIMIT_INFO, value);
        }
        resp
    }

    /// A SOAP request: `login()` is free, a `DebuggingHeader` moves the call to its own
    /// allocation, anything else (a malformed envelope included) costs one call.
    fn soap(
        &self,
        api: soap::SoapApi,
        version: &str,
        body: &ReadBody,
        client: &str,
        base: &str,
    ) -> Resp {
        let request = body.bytes().and_then(soap::parse);
        let now = self.now_ms();
        match request {
            Ok(req) if req.is_login() && api.has_login() => {
                let session = self.ids.session(&self.org_id);
                soap::login_response(api, version, base, &self.org_id, &session, &req)
            }
            Ok(req) if req.debugging => {
                let usage = {
                    let mut meter = self.meter();
                    meter.count_debugging();
                    meter.usage(now)
                };
                soap::op_response(api, &req, usage, &self.ids, &self.org_id)
            }
            parsed => match self.meter().try_count(now, client, Api::Soap, 1) {
                Admission::Rejected(_) => soap::limit_fault(api),
                Admission::Counted(usage) => match parsed {
                    Ok(req) => soap::op_response(api, &req, usage, &self.ids, &self.org_id),
                    Err(err) => soap::client_fault(api, &err.to_string()),
                },
            },
        }
    }

    fn hook(&self, hook: Hook, parts: &Parts) -> Resp {
        let n = || -> Result<u64, SimError> {
            let value = util::query_param(parts.uri.query(), "n")
                .map_err(SimError::BadParam)?
                .ok_or_else(|| SimError::BadParam("query parameter n is required".into()))?;
            value
                .trim()
                .parse()
                .map_err(|_| SimError::BadParam(format!("n must be a whole number, not {value:?}")))
        };
        let method = &parts.method;
        let outcome = match hook {
            Hook::Count if method == Method::GET || method == Method::HEAD => Ok(()),
            Hook::External if method == Method::POST => n().map(|n| self.add_external(n)),
            Hook::Limit if method == Method::POST => n().map(|n| self.set_limit(n)),
            Hook::Reset if method == Method::POST => {
                self.reset();
                Ok(())
            }
            Hook::Unknown => Err(SimError::NotFound),
            Hook::Count => Err(SimError::method(method, "GET, HEAD")),
            Hook::External | Hook::Limit | Hook::Reset => Err(SimError::method(method, "POST")),
        };
        match outcome {
            Ok(()) => match serde_json::to_vec(&self.count()) {
                Ok(json) => util::respond(StatusCode::OK, util::JSON, json),
                Err(err) => SimError::Internal(err.to_string()).to_rest(),
            },
            Err(err) => err.to_rest(),
        }
    }
}

const SFORCE_LIMIT_INFO: HeaderName = HeaderName::from_static("sforce-limit-info");
const X_SIM_BODY_BYTES: HeaderName = HeaderName::from_static("x-sim-body-bytes");
const X_SIM_DELAY_MS: HeaderName = HeaderName::from_static("x-sim-delay-ms");
const SFORCE_CALL_OPTIONS: HeaderName = HeaderName::from_static("sforce-call-options");

/// A request body after it was read to the end.
struct ReadBody {
    /// Bytes received, whatever the transfer encoding.
    len: u64,
    /// The bytes, unless there were more than the keep limit.
    data: Option<Bytes>,
}

impl ReadBody {
    /// The body for routes that parse it; a body too large to keep is an error there.
    fn bytes(&self) -> Result<&[u8], SimError> {
        self.data.as_deref().ok_or(SimError::TooLarge)
    }
}

/// Reads the body to its end (chunked or not), counting every byte and keeping up to `keep`.
async fn read_body<B>(body: B, keep: usize) -> Result<ReadBody, SimError>
where
    B: Body<Data = Bytes>,
    B::Error: Display,
{
    let mut body = std::pin::pin!(body);
    let mut len = 0u64;
    let mut kept = BytesMut::new();
    let mut overflow = false;
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|err| SimError::Body(err.to_string()))?;
        let Ok(data) = frame.into_data() else {
            continue; // trailers carry nothing the sim needs
        };
        len += data.len() as u64;
        if !overflow {
            if kept.len() + data.len() > keep {
                overflow = true;
                kept = BytesMut::new();
            } else {
                kept.extend_from_slice(&data);
            }
        }
    }
    Ok(ReadBody {
        len,
        data: (!overflow).then(|| kept.freeze()),
    })
}

/// The `client=` option of `Sforce-Call-Options` (options are comma-separated, e.g.
/// `client=salesloft, defaultNamespace=acme`), or `unknown` as Salesforce's Event Monitoring
/// leaves `CLIENT_NAME` empty without one.
fn client_name(headers: &HeaderMap) -> &str {
    headers
        .get_all(SFORCE_CALL_OPTIONS)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .filter_map(|option| option.split_once('='))
        .find(|(key, value)| key.trim().eq_ignore_ascii_case("client") && !value.trim().is_empty())
        .map(|(_, value)| value.trim())
        .unwrap_or("unknown")
}

/// The test delay of `X-Sim-Delay-Ms`; a value that is not a whole number is refused rather than
/// ignored, so a typo in a test cannot silently remove the delay it relies on.
fn delay_of(headers: &HeaderMap) -> Result<Option<Duration>, SimError> {
    let Some(value) = headers.get(X_SIM_DELAY_MS) else {
        return Ok(None);
    };
    let text = value.to_str().unwrap_or("").trim();
    text.parse::<u64>()
        .map(|ms| (ms > 0).then(|| Duration::from_millis(ms)))
        .map_err(|_| {
            SimError::BadParam(format!(
                "X-Sim-Delay-Ms must be a whole number of ms, not {text:?}"
            ))
        })
}

/// The URL the client used to reach the sim, for login answers: the request's authority (HTTP/2
/// `:authority` or an absolute-form URI), else its `Host` header, else the listener address.
/// Always `http`, as the sim serves no TLS.
fn base_url(parts: &Parts, local: SocketAddr) -> String {
    let host = parts
        .uri
        .authority()
        .map(|authority| authority.as_str())
        .or_else(|| parts.headers.get(http::header::HOST)?.to_str().ok())
        .map(str::trim)
        // An authority with user info, or anything that is not one, is not echoed into URLs.
        .filter(|host| !host.contains('@') && host.parse::<http::uri::Authority>().is_ok());
    match host {
        Some(host) => format!("http://{host}"),
        None => format!("http://{local}"),
    }
}

/// Serves the simulated org on an already-bound listener until `shutdown` resolves, then lets
/// in-flight requests finish (up to a few seconds). HTTP/1.1 and prior-knowledge h2c share the
/// port. A failed `accept` (e.g. out of file descriptors) is retried with a backoff, never fatal.
pub async fn serve(
    listener: TcpListener,
    opts: SimOptions,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    run(listener, Arc::new(SimServer::new(opts)), shutdown).await
}

/// The accept loop over a given state, so [`spawn`] can keep a handle on the state.
async fn run(
    listener: TcpListener,
    server: Arc<SimServer>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let listen_addr = listener.local_addr()?;
    let builder = auto::Builder::new(TokioExecutor::new());
    let graceful = GracefulShutdown::new();
    let mut backoff = Duration::from_millis(5);
    tokio::pin!(shutdown);
    loop {
        let accepted = tokio::select! {
            () = &mut shutdown => break,
            accepted = listener.accept() => accepted,
        };
        let stream = match accepted {
            Ok((stream, _peer)) => {
                backoff = Duration::from_millis(5);
                stream
            }
            Err(err) => {
                tracing::warn!(error = %err, "sim: accept failed; retrying");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(1));
                continue;
            }
        };
        // Small answers, many round trips: don't let Nagle hold them back.
        let _ = stream.set_nodelay(true);
        let local = stream.local_addr().unwrap_or(listen_addr);
        let server = server.clone();
        let service = service_fn(move |req| {
            let server = server.clone();
            async move { Ok::<_, Infallible>(server.handle(req, local).await) }
        });
        let conn = builder
            .serve_connection(TokioIo::new(stream), service)
            .into_owned();
        let conn = graceful.watch(conn);
        tokio::spawn(async move {
            if let Err(err) = conn.await {
                tracing::debug!(error = %err, "sim: connection ended with an error");
            }
        });
    }
    drop(listener);
    let _ = tokio::time::timeout(SHUTDOWN_GRACE, graceful.shutdown()).await;
    Ok(())
}

/// Binds `127.0.0.1:0`, serves a simulated org there in the background and returns its handle.
pub async fn spawn(opts: SimOptions) -> std::io::Result<SimHandle> {
    let listener = TcpListener::bind(("127.0.0.1", 0)).await?;
    let addr = listener.local_addr()?;
    let server = Arc::new(SimServer::new(opts));
    let (stop, stopped) = oneshot::channel::<()>();
    // The server stops when the sender is used or dropped, so dropping the handle stops it.
    let task = tokio::spawn(run(listener, server.clone(), async move {
        let _ = stopped.await;
    }));
    Ok(SimHandle {
        addr,
        url: format!("http://{addr}"),
        server,
        stop: Some(stop),
        task: Some(task),
    })
}

/// A simulated org running in the background; stops on [`SimHandle::stop`] or when dropped.
pub struct SimHandle {
    /// The address it listens on.
    pub addr: SocketAddr,
    /// Its base URL, `http://127.0.0.1:PORT`.
    pub url: String,
    server: Arc<SimServer>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<std::io::Result<()>>>,
}

impl SimHandle {
    /// Asks the server to stop; it closes the listener at once and finishes in the background.
    pub fn stop(mut self) {
        self.signal();
    }

    /// Stops the server and waits until it has closed its listener and its connections.
    pub async fn shutdown(mut self) -> std::io::Result<()> {
        self.signal();
        match self.task.take() {
            Some(task) => task.await.map_err(std::io::Error::other)?,
            None => Ok(()),
        }
    }

    /// The org's state, for in-process tests that would rather not go through `/_sim/`.
    pub fn server(&self) -> &Arc<SimServer> {
        &self.server
    }

    /// Shorthand for `self.server().count()`.
    pub fn count(&self) -> SimCount {
        self.server.count()
    }

    fn signal(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

impl Drop for SimHandle {
    fn drop(&mut self) {
        self.signal();
    }
}
