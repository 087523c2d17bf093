//! Connections to one Salesforce host, kept for reuse.
//!
//! A host that negotiates HTTP/2 by ALPN gets one connection that every request shares; it is
//! pinged while in use and replaced when it closes or has been idle too long. An HTTP/1.1 host
//! gets a queue of idle connections: a request takes the oldest one still open, and its
//! response body puts the connection back once it has been read to the end and the connection
//! can take the next request (a body dropped half-read closes it). A connection that turns out
//! closed before the request went out is skipped and the request tries the next one, then a
//! new connection. No connection idles longer than the idle timeout, which stays below
//! Salesforce's keep-alive timeout, so handing out the oldest first does not risk sending on a
//! socket the server is closing (pingora's pool works the same way).
//!
//! This replaces hyper-util's legacy client pool, which on every request hashed its pool key
//! twice under a mutex and spawned a task to return the connection: about a tenth of the
//! proxy's user-space instructions per request. The idle queue is lock-free (as in pingora's
//! connection pool): a request never waits on another to take or return a connection.

use std::error::Error as StdError;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use arc_swap::ArcSwapOption;
use bytes::Bytes;
use crossbeam_queue::ArrayQueue;
use http::uri::{Authority, PathAndQuery, Scheme};
use http::{header, HeaderValue, Request, Response, Uri, Version};
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use hyper::client::conn::{http1, http2, TrySendError};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::{Connection, HttpConnector};
use hyper_util::rt::{TokioExecutor, TokioTimer};
use thiserror::Error;
use tower_service::Service;

use super::body::{RequestBody, Upload};
use super::error::error_chain;
use crate::meter::Clock;

pub type Connector = HttpsConnector<HttpConnector>;
type H1 = http1::SendRequest<RequestBody>;
type H2 = http2::SendRequest<RequestBody>;

/// Idle HTTP/1.1 connections kept per host; one coming back to a full queue is closed.
const MAX_IDLE: usize = 512;
/// HTTP/2 pings while requests are in flight, so a connection that died silently (a NAT or
/// firewall dropped it) is noticed and replaced instead of timing out every request on it.
const H2_PING_INTERVAL: Duration = Duration::from_secs(30);
const H2_PING_TIMEOUT: Duration = Duration::from_secs(10);
/// HTTP/2 receive windows. Every call of an org shares one connection, so no stream may hold
/// a share of the connection window that others need: a response whose client reads slowly (a
/// Bulk API result fetched by a paused consumer) keeps its unread data, up to its stream
/// window, and with hyper's defaults (2 MiB per stream, 5 MiB per connection) three such
/// downloads held the whole connection window and every other call got its head but no body.
/// Here a stream's window bounds what it can pin (1 MiB: at 50 ms to Salesforce still about
/// 20 MB/s per download), and the connection window is the largest HTTP/2 allows, so it never
/// runs out before a stream's own does. Memory stays bounded by the streams: unread data per
/// stream ≤ its window, so per connection ≤ open streams × 1 MiB (at most Salesforce's
/// SETTINGS_MAX_CONCURRENT_STREAMS, and an org's `max_in_flight` when set); an HTTP/1.1
/// connection's kernel receive buffer holds as much. hyper's `adaptive_window` stays off: it
/// sets both windows to one estimate, which gives one stream the whole connection window again.
const H2_STREAM_WINDOW: u32 = 1 << 20;
const H2_CONNECTION_WINDOW: u32 = (1 << 31) - 1;

/// Why a request got no response.
#[derive(Debug, Error)]
pub enum SendError {
    #[error("{}", error_chain(.0.as_ref()))]
    Connect(Box<dyn StdError + Send + Sync>),
    #[error("no connection within {} (TCP connect, TLS and HTTP handshakes)", humantime::format_duration(*.0))]
    ConnectTimeout(Duration),
    #[error("HTTP handshake failed: {}", error_chain(.0))]
    Handshake(hyper::Error),
    #[error("the new connection closed before the request could be sent")]
    ClosedEarly,
    #[error("{}", error_chain(.0))]
    Exchange(hyper::Error),
    #[error("Salesforce did not process the request: {}", error_chain(.0))]
    Refused(hyper::Error),
}

/// Why a response body from upstream ended before its end.
#[derive(Debug, Error)]
pub enum BodyError {
    #[error(transparent)]
    Upstream(#[from] hyper::Error),
    #[error("Salesforce sent no more of the response body for {}; it was cut off", humantime::format_duration(*.0))]
    Stalled(Duration),
}

impl SendError {
    /// Whether the request may have reached Salesforce (and so stays counted).
    pub fn maybe_sent(&self) -> bool {
        matches!(self, SendError::Exchange(_))
    }
}

/// One host's connections.
pub struct Host {
    scheme: Scheme,
    authority: Authority,
    /// `scheme://authority/`: what the connector dials.
    dial: Uri,
    /// The `Host` header of HTTP/1.1 requests (HTTP/2 sends the authority instead).
    host_header: HeaderValue,
    connector: Connector,
    idle: ArrayQueue<Idle>,
    h2: ArcSwapOption<Shared>,
    /// Whether the host's last connection negotiated HTTP/2 (and the connect after it did not
    /// fail): then one request at a time connects (under `h2_connecting`) while the others
    /// wait for its connection.
    speaks_h2: AtomicBool,
    h2_connecting: tokio::sync::Mutex<()>,
    clock: Clock,
    idle_timeout_ms: u64,
    /// How long a response body may send nothing (the org's `response_timeout`): a body that
    /// stalls upstream would otherwise hold its client, its connection (or stream) and the
    /// call's `max_in_flight` slot for good (nginx's `proxy_read_timeout`).
    read_timeout: Duration,
    /// For the whole of making a connection: TCP, TLS and the HTTP handshake. A server that
    /// accepts TCP and then stalls must not hold the request for its response timeout, which
    /// would also count a call that never went out.
    connect_timeout: Duration,
}

struct Idle {
    sender: H1,
    since_ms: u64,
}

/// The shared HTTP/2 connection.
struct Shared {
    sender: H2,
    /// When a request last used it (coarse: updated at most once a second, so requests on
    /// different cores do not all write the same cache line).
    used_ms: AtomicU64,
}

impl Shared {
    /// Usable for the next request: open and not idle past `timeout_ms`.
    fn usable(&self, now_ms: u64, timeout_ms: u64) -> bool {
        let used = self.used_ms.load(Ordering::Relaxed);
        if self.sender.is_closed() || now_ms.saturating_sub(used) > timeout_ms {
            return false;
        }
        if now_ms.saturating_sub(used) >= 1000 {
            self.used_ms.store(now_ms, Ordering::Relaxed);
        }
        true
    }
}

/// Whether a request has been handed to an upstream connection. Until it has, a request that
/// is dropped (its client went away while the proxy was still connecting) never left the proxy;
/// once it has, it may have reached Salesforce even if nobody waits for the answer. On an
/// HTTP/2 connection at the peer's SETTINGS_MAX_CONCURRENT_STREAMS, a request handed over
/// waits inside hyper for a stream, and hyper tells nobody when it gets one: it counts as
/// handed over from the start (README: "Errors the proxy itself returns").
#[derive(Debug, Default)]
pub struct Handover {
    handed: AtomicBool,
    /// The request's upload, when it has a body: until all of it went on, Salesforce cannot
    /// have processed the call, handed over or not.
    upload: std::sync::OnceLock<Arc<Upload>>,
}

impl Handover {
    pub fn happened(&self) -> bool {
        // Read by the request's own future, which also wrote it: no other memory to order.
        self.handed.load(Ordering::Relaxed)
    }

    /// Whether Salesforce may have the whole request: handed over, and its body (if any) all
    /// gone on. A request dropped before that (its client reset the stream mid-upload while
    /// Salesforce read slowly) was not processed.
    pub fn may_be_processed(&self) -> bool {
        self.happened() && self.upload.get().is_none_or(|upload| upload.done())
    }

    /// Watches `upload`, the request's body on its way.
    pub fn carries(&self, upload: Arc<Upload>) {
        let _ = self.upload.set(upload);
    }

    fn mark(&self, handed: bool) {
        self.handed.store(handed, Ordering::Relaxed);
    }
}

/// How one attempt on one connection ended.
enum Attempt {
    /// The connection was closed before the request went out: the request comes back (boxed:
    /// this is the rare path, and it keeps the common result small).
    Unsent(Box<Request<RequestBody>>),
    Failed(SendError),
}

impl From<TrySendError<Request<RequestBody>>> for Attempt {
    /// hyper hands the request back when it did not send it.
    fn from(mut e: TrySendError<Request<RequestBody>>) -> Self {
        match e.take_message() {
            Some(req) => Attempt::Unsent(Box::new(req)),
            None => {
                let error = e.into_error();
                Attempt::Failed(if not_processed(&error) {
                    SendError::Refused(error)
                } else {
                    SendError::Exchange(error)
                })
            }
        }
    }
}

/// Whether an HTTP/2 peer said it did not process the request (RFC 9113 8.7), so the call
/// never happened: a stream it refused (`REFUSED_STREAM`), or one above the last stream id of
/// a `GOAWAY` it sent, whatever its error code (§6.8: those streams were not processed, as
/// when Salesforce recycles the shared connection or sheds load with `ENHANCE_YOUR_CALM`).
/// h2 reports the peer's `GOAWAY` only to those streams (and to requests made after it): one
/// at or below the last stream id that dies with the connection gets the connection's I/O
/// error, and may have been processed.
fn not_processed(error: &hyper::Error) -> bool {
    let mut source = StdError::source(error);
    while let Some(e) = source {
        if let Some(h2) = e.downcast_ref::<h2::Error>() {
            return h2.is_remote()
                && (h2.is_go_away() || h2.reason() == Some(h2::Reason::REFUSED_STREAM));
        }
        source = e.source();
    }
    false
}

impl Host {
    /// `idle_timeout`: how long an idle connection is kept. Salesforce closes idle keep-alive
    /// connections after a while; staying below that avoids sending on a half-closed socket.
    /// `read_timeout`: how long a response body may send nothing before it is cut off.
    pub fn new(
        scheme: Scheme,
        authority: Authority,
        connector: Connector,
        idle_timeout: Duration,
        connect_timeout: Duration,
        read_timeout: Duration,
    ) -> Result<Arc<Host>, http::Error> {
        let dial = Uri::builder()
            .scheme(scheme.clone())
            .authority(authority.clone())
            .path_and_query("/")
            .build()?;
        let default_port = match scheme.as_str() {
            "https" => 443,
            _ => 80,
        };
        // Like browsers and hyper's client: no port in `Host` when it is the scheme's default.
        let host_header = match authority.port_u16() {
            Some(p) if p == default_port => HeaderValue::from_str(authority.host()),
            _ => HeaderValue::from_str(authority.as_str()),
        }
        .map_err(http::Error::from)?;
        Ok(Arc::new(Host {
            scheme,
            authority,
            dial,
            host_header,
            connector,
            idle: ArrayQueue::new(MAX_IDLE),
            h2: ArcSwapOption::empty(),
            speaks_h2: AtomicBool::new(false),
            h2_connecting: tokio::sync::Mutex::new(()),
            clock: Clock::new(),
            idle_timeout_ms: idle_timeout.as_millis() as u64,
            read_timeout,
            connect_timeout,
        }))
    }

    /// Sends `req` (whose URI's path and query are used) and waits for the response head;
    /// `handover` tells, should this future be dropped, whether a connection took the request.
    pub async fn send(
        self: &Arc<Self>,
        mut req: Request<RequestBody>,
        handover: &Handover,
    ) -> Result<Response<UpstreamBody>, SendError> {
        let now = self.clock.unix_ms();
        match self.shared_h2(now).await? {
            Some(Fresh::H2(shared)) => match self.send_h2(&shared, req, handover).await {
                Ok(resp) => return Ok(resp),
                Err(Attempt::Failed(e)) => return Err(e),
                Err(Attempt::Unsent(back)) => {
                    // Gone (GOAWAY, closed): forget it unless another request already did, and
                    // go through the gate again. A closing connection turns back every request
                    // queued on it at once; they share the one new connection.
                    let _ = self.h2.compare_and_swap(&shared, None);
                    req = *back;
                    if let Some(fresh) = self.shared_h2(now).await? {
                        return self.send_fresh(fresh, req, handover).await;
                    }
                }
            },
            // The host answered HTTP/1.1 this time: this request takes that connection.
            Some(Fresh::H1(sender)) => {
                return self.send_fresh(Fresh::H1(sender), req, handover).await
            }
            None => {}
        }
        while let Some(idle) = self.idle.pop() {
            // Every connection in the queue was ready when it went in: one that is not has
            // closed since, and one idle too long may be closing at the server's end.
            if !idle.sender.is_ready() || now.saturating_sub(idle.since_ms) > self.idle_timeout_ms {
                continue; // dropping the sender closes the connection
            }
            match self.send_h1(idle.sender, req, handover).await {
                Ok(resp) => return Ok(resp),
                Err(Attempt::Failed(e)) => return Err(e),
                Err(Attempt::Unsent(back)) => req = *back,
            }
        }
        let fresh = self.connect_boxed().await?;
        self.send_fresh(fresh, req, handover).await
    }

    /// Sends on a connection made for this request.
    async fn send_fresh(
        self: &Arc<Self>,
        fresh: Fresh,
        req: Request<RequestBody>,
        handover: &Handover,
    ) -> Result<Response<UpstreamBody>, SendError> {
        let attempt = match fresh {
            Fresh::H1(sender) => self.send_h1(sender, req, handover).await,
            Fresh::H2(shared) => self.send_h2(&shared, req, handover).await,
        };
        attempt.map_err(|e| match e {
            Attempt::Unsent(_) => SendError::ClosedEarly,
            Attempt::Failed(e) => e,
        })
    }

    async fn send_h1(
        self: &Arc<Self>,
        mut sender: H1,
        mut req: Request<RequestBody>,
        handover: &Handover,
    ) -> Result<Response<UpstreamBody>, Attempt> {
        // A pooled connection is ready, a new one as soon as its task runs; an error: it
        // closed meanwhile.
        if sender.ready().await.is_err() {
            return Err(Attempt::Unsent(Box::new(req)));
        }
        // HTTP/1.1 wants origin form, which the proxy's requests already have (forward.rs),
        // and a Host header.
        if req.uri().scheme().is_some() {
            *req.uri_mut() = Uri::from(take_path_and_query(&mut req));
        }
        *req.version_mut() = Version::HTTP_11;
        req.headers_mut()
            .insert(header::HOST, self.host_header.clone());
        let resp = handed_over(sender.try_send_request(req), handover).await?;
        Ok(resp.map(|body| UpstreamBody::new(body, self.clone(), Some(sender))))
    }

    /// The shared HTTP/2 connection if the host has one in use. Once the host is known to speak
    /// HTTP/2, a request that finds none makes it while concurrent ones wait for it, rather than
    /// each opening a TLS connection of its own; `Fresh::H1` if that connection came up as
    /// HTTP/1.1 (the host changed). `None`: go the HTTP/1.1 way.
    async fn shared_h2(self: &Arc<Self>, now: u64) -> Result<Option<Fresh>, SendError> {
        let current = self.h2.load_full();
        if let Some(shared) = current.filter(|s| s.usable(now, self.idle_timeout_ms)) {
            return Ok(Some(Fresh::H2(shared)));
        }
        if !self.speaks_h2.load(Ordering::Relaxed) {
            return Ok(None);
        }
        let _gate = self.h2_connecting.lock().await;
        let current = self.h2.load_full();
        if let Some(shared) = current.filter(|s| s.usable(now, self.idle_timeout_ms)) {
            return Ok(Some(Fresh::H2(shared)));
        }
        // The request before us under the gate could not connect: rather than each waiter
        // trying in turn (the last waiting for all of them), the rest connect side by side.
        if !self.speaks_h2.load(Ordering::Relaxed) {
            return Ok(None);
        }
        let fresh = self.connect_boxed().await;
        if fresh.is_err() {
            self.speaks_h2.store(false, Ordering::Relaxed);
        }
        fresh.map(Some)
    }

    async fn send_h2(
        self: &Arc<Self>,
        shared: &Shared,
        mut req: Request<RequestBody>,
        handover: &Handover,
    ) -> Result<Response<UpstreamBody>, Attempt> {
        if shared.sender.is_closed() {
            return Err(Attempt::Unsent(Box::new(req)));
        }
        // HTTP/2 takes scheme and authority from the URI (`:scheme`, `:authority`).
        let pq = take_path_and_query(&mut req);
        let mut parts = http::uri::Parts::default();
        parts.scheme = Some(self.scheme.clone());
        parts.authority = Some(self.authority.clone());
        parts.path_and_query = Some(pq);
        if let Ok(uri) = Uri::from_parts(parts) {
            *req.uri_mut() = uri;
        }
        *req.version_mut() = Version::HTTP_2;
        req.headers_mut().remove(header::HOST);
        let sending = shared.sender.clone().try_send_request(req);
        let resp = handed_over(sending, handover).await?;
        Ok(resp.map(|body| UpstreamBody::new(body, self.clone(), None)))
    }

    /// Connecting takes a TLS handshake and an HTTP/2 handshake: a future of several KiB.
    /// Boxed, it is allocated when a request connects instead of making every request's future
    /// that large (the HTTP/2 server copies that future into a task per stream).
    fn connect_boxed(&self) -> Pin<Box<dyn Future<Output = Result<Fresh, SendError>> + Send + '_>> {
        Box::pin(async move {
            tokio::time::timeout(self.connect_timeout, self.connect())
                .await
                .unwrap_or(Err(SendError::ConnectTimeout(self.connect_timeout)))
        })
    }

    async fn connect(&self) -> Result<Fresh, SendError> {
        let stream = self
            .connector
            .clone()
            .call(self.dial.clone())
            .await
            .map_err(SendError::Connect)?;
        if stream.connected().is_negotiated_h2() {
            let (sender, conn) = http2::Builder::new(TokioExecutor::new())
                .timer(TokioTimer::new())
                .initial_stream_window_size(H2_STREAM_WINDOW)
                .initial_connection_window_size(H2_CONNECTION_WINDOW)
                .keep_alive_interval(H2_PING_INTERVAL)
                .keep_alive_timeout(H2_PING_TIMEOUT)
                .handshake(stream)
                .await
                .map_err(SendError::Handshake)?;
            self.drive(conn);
            // Before the host was known to speak HTTP/2, requests that connected at the same
            // time each made a connection; the last one stays shared, the others close when
            // their requests are done.
            let shared = Arc::new(Shared {
                sender,
                used_ms: AtomicU64::new(self.clock.unix_ms()),
            });
            self.h2.store(Some(shared.clone()));
            self.speaks_h2.store(true, Ordering::Relaxed);
            Ok(Fresh::H2(shared))
        } else {
            self.speaks_h2.store(false, Ordering::Relaxed);
            let (sender, conn) = http1::Builder::new()
                .handshake(stream)
                .await
                .map_err(SendError::Handshake)?;
            self.drive(conn);
            Ok(Fresh::H1(sender))
        }
    }

    /// Runs a connection's I/O in a task of its own until it closes.
    fn drive(&self, conn: impl Future<Output = Result<(), hyper::Error>> + Send + 'static) {
        let upstream = self.authority.clone();
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(%upstream, error = %e, "upstream connection ended with an error");
            }
        });
    }

    /// Takes back an HTTP/1.1 connection whose response has been read. It joins the queue once
    /// it can take a request: usually at once; while it still sends the request body (the
    /// server answered before reading all of it), a task waits for that first, so that no
    /// request waits behind an upload in the queue. The wait is bounded by the idle timeout:
    /// hyper 1.12 does not always signal readiness after such an upload ends (seen in
    /// `connection_still_uploading_is_not_handed_out`), and a connection in doubt is closed.
    fn checkin(self: &Arc<Self>, mut sender: H1) {
        if sender.is_ready() {
            let since_ms = self.clock.unix_ms();
            // A full queue: more connections are idle than the host needs; this one closes.
            let _ = self.idle.push(Idle { sender, since_ms });
        } else if !sender.is_closed() {
            let Ok(runtime) = tokio::runtime::Handle::try_current() else {
                return; // shutting down
            };
            let host = self.clone();
            let wait = Duration::from_millis(self.idle_timeout_ms);
            runtime.spawn(async move {
                if let Ok(Ok(())) = tokio::time::timeout(wait, sender.ready()).await {
                    host.checkin(sender);
                }
            });
        }
    }

    /// Idle HTTP/1.1 connections held (for tests and the curious).
    #[cfg(test)]
    fn idle_count(&self) -> usize {
        self.idle.len()
    }
}

/// Awaits the response to a request a connection has just taken (`sending`), the request marked
/// as handed over unless the connection gives it back unsent.
async fn handed_over(
    sending: impl Future<Output = Result<Response<Incoming>, TrySendError<Request<RequestBody>>>>,
    handover: &Handover,
) -> Result<Response<Incoming>, Attempt> {
    handover.mark(true);
    sending.await.map_err(|e| {
        let attempt = Attempt::from(e);
        if matches!(attempt, Attempt::Unsent(_)) {
            handover.mark(false);
        }
        attempt
    })
}

/// The request's path and query, moved out of its URI: a path the proxy built (less an
/// integration's prefix) is not yet shared, and cloning it would allocate to share it.
fn take_path_and_query(req: &mut Request<RequestBody>) -> PathAndQuery {
    std::mem::take(req.uri_mut())
        .into_parts()
        .path_and_query
        .unwrap_or_else(|| PathAndQuery::from_static("/"))
}

enum Fresh {
    H1(H1),
    H2(Arc<Shared>),
}

/// A response body from upstream. When it is an HTTP/1.1 response read to its end, dropping
/// it returns the connection for the next request. One that sends nothing for the host's read
/// timeout ends with `BodyError::Stalled`: the client's connection is then aborted (HTTP/1.1:
/// it closes before the announced length or the last chunk) or its stream reset (HTTP/2), and
/// the upstream connection closed (HTTP/1.1) or the upstream stream reset (HTTP/2).
pub struct UpstreamBody {
    inner: Incoming,
    host: Arc<Host>,
    /// The HTTP/1.1 connection lent to this response.
    lease: Option<H1>,
    ended: bool,
    /// The read timeout's deadline, made the first time the body waits for upstream and moved
    /// on when it waits again after a frame: most responses arrive with their head and never
    /// wait, so they make no timer (boxed: it keeps the body small for them).
    stall: Option<Pin<Box<tokio::time::Sleep>>>,
    /// A frame came since the deadline was last set.
    moved: bool,
}

impl UpstreamBody {
    fn new(inner: Incoming, host: Arc<Host>, lease: Option<H1>) -> Self {
        UpstreamBody {
            inner,
            host,
            lease,
            ended: false,
            stall: None,
            moved: false,
        }
    }

    /// The body waits for upstream: arms the read timeout, or moves it on if a frame came
    /// since, and tells whether it ran out.
    fn poll_stall(&mut self, cx: &mut Context<'_>) -> Poll<BodyError> {
        let timeout = self.host.read_timeout;
        let moved = std::mem::take(&mut self.moved);
        let stall = match &mut self.stall {
            Some(stall) => {
                if moved {
                    stall.as_mut().reset(tokio::time::Instant::now() + timeout);
                }
                stall
            }
            None => self.stall.insert(Box::pin(tokio::time::sleep(timeout))),
        };
        std::task::ready!(stall.as_mut().poll(cx));
        tracing::warn!(
            upstream = %self.host.authority,
            after = %humantime::format_duration(timeout),
            "a response body stalled upstream; cut off"
        );
        Poll::Ready(BodyError::Stalled(timeout))
    }
}

impl Drop for UpstreamBody {
    fn drop(&mut self) {
        if let Some(sender) = self.lease.take() {
            // Half-read, the connection still carries the rest: dropping it closes it.
            if self.ended || self.inner.is_end_stream() {
                self.host.checkin(sender);
            }
        }
    }
}

impl Body for UpstreamBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                this.moved = true;
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(error))) => {
                // The client's response breaks off after its head: say so, as nothing else
                // will (its status was a success).
                tracing::warn!(
                    upstream = %this.host.authority,
                    %error,
                    "a response body from upstream broke off; the client's response is cut off"
                );
                Poll::Ready(Some(Err(BodyError::Upstream(error))))
            }
            Poll::Ready(None) => {
                this.ended = true;
                Poll::Ready(None)
            }
            Poll::Pending => this.poll_stall(cx).map(|e| Some(Err(e))),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.ended || self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl std::fmt::Debug for UpstreamBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UpstreamBody")
            .field("upstream", &self.host.authority)
            .field("http1", &self.lease.is_some())
            .field("ended", &self.ended)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;
    use std::net::SocketAddr;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Mutex;

    use http_body_util::{BodyExt, Full};
    use hyper::service::service_fn;
    use hyper_util::rt::TokioIo;
    use hyper_util::server::conn::auto;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    use super::*;

    /// A test origin: counts the connections it accepted, and records the HTTP version and
    /// host (`Host` header, else the URI's authority) of each request. `/big` answers 256 KiB,
    /// `/slow` answers after 100 ms, `/echo` the request target as it came, anything else a
    /// few bytes.
    struct Origin {
        addr: SocketAddr,
        connections: Arc<AtomicUsize>,
        versions: Arc<Mutex<Vec<Version>>>,
        hosts: Arc<Mutex<Vec<String>>>,
    }

    /// `tls`: the acceptor each new connection is served with (a test may swap it).
    async fn origin(tls: Option<Arc<Mutex<tokio_rustls::TlsAcceptor>>>) -> Origin {
        origin_with(tls, false).await
    }

    /// `first_hangs_up`: the first connection takes one stream at a time, and `/hang-up` on it
    /// closes it 100 ms after the request came (the requests queued behind it never go out).
    async fn origin_with(
        tls: Option<Arc<Mutex<tokio_rustls::TlsAcceptor>>>,
        first_hangs_up: bool,
    ) -> Origin {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let connections = Arc::new(AtomicUsize::new(0));
        let versions = Arc::new(Mutex::new(Vec::new()));
        let hosts = Arc::new(Mutex::new(Vec::new()));
        let (count, seen, seen_hosts) = (connections.clone(), versions.clone(), hosts.clone());
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let hangs_up = first_hangs_up && count.fetch_add(1, Ordering::Relaxed) == 0;
                if !first_hangs_up {
                    count.fetch_add(1, Ordering::Relaxed);
                }
                let (seen, seen_hosts, tls) = (seen.clone(), seen_hosts.clone(), tls.clone());
                let hang_up = Arc::new(tokio::sync::Notify::new());
                let hung_up = hang_up.clone();
                tokio::spawn(async move {
                    let service = service_fn(move |req: Request<Incoming>| {
                        let (seen, seen_hosts, hang_up) =
                            (seen.clone(), seen_hosts.clone(), hang_up.clone());
                        async move {
                            seen.lock().expect("versions").push(req.version());
                            let host = req
                                .headers()
                                .get(header::HOST)
                                .and_then(|h| h.to_str().ok())
                                .or(req.uri().authority().map(|a| a.as_str()))
                                .unwrap_or("")
                                .to_owned();
                            seen_hosts.lock().expect("hosts").push(host);
                            let body = match req.uri().path() {
                                "/big" => Bytes::from(vec![b'x'; 256 * 1024]),
                                "/huge" => Bytes::from(vec![b'x'; 8 << 20]),
                                "/slow" => {
                                    tokio::time::sleep(Duration::from_millis(100)).await;
                                    Bytes::from_static(b"slow")
                                }
                                "/echo" => Bytes::from(req.uri().to_string()),
                                "/hang-up" if hangs_up => {
                                    hang_up.notify_one();
                                    std::future::pending::<()>().await;
                                    Bytes::new()
                                }
                                _ => Bytes::from_static(b"ok"),
                            };
                            Ok::<_, Infallible>(Response::new(Full::new(body)))
                        }
                    });
                    let mut builder = auto::Builder::new(TokioExecutor::new());
                    if hangs_up {
                        builder.http2().max_concurrent_streams(1);
                    }
                    let acceptor = tls.map(|t| t.lock().expect("acceptor").clone());
                    match acceptor {
                        Some(acceptor) => {
                            if let Ok(stream) = acceptor.accept(tcp).await {
                                let serving =
                                    builder.serve_connection(TokioIo::new(stream), service);
                                serve_until(serving, &hung_up).await
                            }
                        }
                        None => {
                            let serving = builder.serve_connection(TokioIo::new(tcp), service);
                            serve_until(serving, &hung_up).await
                        }
                    };
                });
            }
        });
        Origin {
            addr,
            connections,
            versions,
            hosts,
        }
    }

    /// Serves a connection until it ends or `hang_up` is notified; then, 100 ms later, drops it
    /// (closing the socket).
    async fn serve_until<F: Future>(serving: F, hang_up: &tokio::sync::Notify) {
        tokio::pin!(serving);
        tokio::select! {
            _ = &mut serving => return,
            _ = hang_up.notified() => {}
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    fn plain_host(addr: SocketAddr, idle_timeout: Duration) -> Arc<Host> {
        plain_host_with(addr, idle_timeout, Duration::from_secs(60))
    }

    fn plain_host_with(
        addr: SocketAddr,
        idle_timeout: Duration,
        read_timeout: Duration,
    ) -> Arc<Host> {
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_webpki_roots()
            .https_or_http()
            .enable_http1()
            .enable_http2()
            .build();
        Host::new(
            Scheme::HTTP,
            Authority::try_from(addr.to_string()).expect("authority"),
            connector,
            idle_timeout,
            Duration::from_secs(5),
            read_timeout,
        )
        .expect("host")
    }

    /// A GET as the proxy hands it over: the client's `Host` (the proxy's) still on it.
    fn get(path: &str) -> Request<RequestBody> {
        Request::get(path)
            .header(header::HOST, "proxy.example.com")
            .body(RequestBody::Empty)
            .expect("request")
    }

    async fn fetch(host: &Arc<Host>, path: &str) -> Bytes {
        let handover = Handover::default();
        let resp = host.send(get(path), &handover).await.expect("response");
        assert!(handover.happened());
        assert_eq!(resp.status(), 200);
        resp.into_body().collect().await.expect("body").to_bytes()
    }

    #[tokio::test]
    async fn http1_connection_is_reused_once_its_response_is_read() {
        let origin = origin(None).await;
        let host = plain_host(origin.addr, Duration::from_secs(50));
        for _ in 0..5 {
            assert_eq!(fetch(&host, "/").await, "ok");
        }
        assert_eq!(origin.connections.load(Ordering::Relaxed), 1);
        assert_eq!(host.idle_count(), 1);
        let versions = origin.versions.lock().expect("versions").clone();
        assert_eq!(versions, vec![Version::HTTP_11; 5]);
        let hosts = origin.hosts.lock().expect("hosts").clone();
        assert_eq!(hosts, vec![origin.addr.to_string(); 5]);
    }

    /// HTTP/1.1 goes out in origin form with the host's `Host`, also for a request given an
    /// absolute URI.
    #[tokio::test]
    async fn http1_request_goes_out_in_origin_form() {
        let origin = origin(None).await;
        let host = plain_host(origin.addr, Duration::from_secs(50));
        assert_eq!(fetch(&host, "/echo?q=1").await, "/echo?q=1");
        assert_eq!(
            fetch(&host, "http://elsewhere.example/echo?q=2").await,
            "/echo?q=2"
        );
        let hosts = origin.hosts.lock().expect("hosts").clone();
        assert_eq!(hosts, vec![origin.addr.to_string(); 2]);
    }

    #[tokio::test]
    async fn half_read_response_closes_its_connection() {
        let origin = origin(None).await;
        let host = plain_host(origin.addr, Duration::from_secs(50));
        let resp = host
            .send(get("/big"), &Handover::default())
            .await
            .expect("response");
        drop(resp);
        assert_eq!(host.idle_count(), 0, "a half-read connection is not reused");
        assert_eq!(fetch(&host, "/big").await.len(), 256 * 1024);
        assert_eq!(origin.connections.load(Ordering::Relaxed), 2);
        assert_eq!(host.idle_count(), 1, "a fully read one is");
    }

    #[tokio::test]
    async fn concurrent_requests_open_connections_that_later_requests_reuse() {
        let origin = origin(None).await;
        let host = plain_host(origin.addr, Duration::from_secs(50));
        let slow = (0..4).map(|_| fetch(&host, "/slow"));
        let bodies = futures_util::future::join_all(slow).await;
        assert!(bodies.iter().all(|b| b == "slow"));
        assert_eq!(origin.connections.load(Ordering::Relaxed), 4);
        assert_eq!(host.idle_count(), 4);
        let again = (0..4).map(|_| fetch(&host, "/slow"));
        futures_util::future::join_all(again).await;
        assert_eq!(origin.connections.load(Ordering::Relaxed), 4);
    }

    #[tokio::test]
    async fn idle_connections_expire() {
        let origin = origin(None).await;
        let host = plain_host(origin.addr, Duration::from_millis(1));
        fetch(&host, "/").await;
        tokio::time::sleep(Duration::from_millis(30)).await;
        fetch(&host, "/").await;
        assert_eq!(origin.connections.load(Ordering::Relaxed), 2);
    }

    /// A keep-alive server that closes each connection shortly after answering: the request
    /// that finds the closed connection goes out on a new one instead of failing.
    #[tokio::test]
    async fn connection_closed_by_the_server_is_skipped() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let accepted = Arc::new(AtomicUsize::new(0));
        let count = accepted.clone();
        tokio::spawn(async move {
            while let Ok((mut tcp, _)) = listener.accept().await {
                count.fetch_add(1, Ordering::Relaxed);
                tokio::spawn(async move {
                    let mut buf = [0u8; 4096];
                    let _ = tcp.read(&mut buf).await;
                    let _ = tcp
                        .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                        .await;
                    tokio::time::sleep(Duration::from_millis(10)).await;
                });
            }
        });
        let host = plain_host(addr, Duration::from_secs(50));
        fetch(&host, "/").await;
        // The server closes after 10 ms; the connection's task sees it long before this ends,
        // even on a loaded machine.
        tokio::time::sleep(Duration::from_millis(500)).await;
        fetch(&host, "/").await;
        assert_eq!(accepted.load(Ordering::Relaxed), 2);
    }

    /// The server answers before it has read the request body: the connection is not handed
    /// out while the upload goes on, and a request meanwhile takes a new one instead of
    /// waiting behind it. (Whether it comes back afterwards is up to hyper; see `checkin`.)
    #[tokio::test]
    async fn connection_still_uploading_is_not_handed_out() {
        const UPLOAD: usize = 8 << 20;
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let accepted = Arc::new(AtomicUsize::new(0));
        let count = accepted.clone();
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                count.fetch_add(1, Ordering::Relaxed);
                tokio::spawn(answer_early(tcp));
            }
        });
        let host = plain_host(addr, Duration::from_secs(50));
        let upload = Request::post("/upload")
            .header(header::CONTENT_LENGTH, UPLOAD)
            .body(RequestBody::full(Bytes::from(vec![b'u'; UPLOAD])))
            .expect("request");
        let resp = host
            .send(upload, &Handover::default())
            .await
            .expect("early answer");
        assert_eq!(
            resp.into_body().collect().await.expect("body").to_bytes(),
            "ok"
        );
        assert_eq!(host.idle_count(), 0, "still uploading");
        // Well under the 2 s the upload is held up: a loaded machine still answers in time.
        let quick = tokio::time::timeout(Duration::from_secs(1), fetch(&host, "/"));
        assert_eq!(quick.await.expect("not stuck behind the upload"), "ok");
        assert_eq!(accepted.load(Ordering::Relaxed), 2);
    }

    /// Per request: reads the head, answers "ok" at once, then (after 2 s) reads the body
    /// its Content-Length announced.
    async fn answer_early(mut tcp: tokio::net::TcpStream) {
        let mut buf = Vec::new();
        loop {
            let head_end = loop {
                if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                    break i + 4;
                }
                let mut chunk = [0u8; 4096];
                match tcp.read(&mut chunk).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => buf.extend_from_slice(&chunk[..n]),
                }
            };
            let head = String::from_utf8_lossy(&buf[..head_end]).to_ascii_lowercase();
            let length: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(0);
            let reply = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
            if tcp.write_all(reply).await.is_err() {
                return;
            }
            if length > 0 {
                tokio::time::sleep(Duration::from_secs(2)).await;
            }
            buf.drain(..head_end);
            while buf.len() < length {
                let mut chunk = [0u8; 65536];
                match tcp.read(&mut chunk).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => buf.extend_from_slice(&chunk[..n]),
                }
            }
            buf.drain(..length);
        }
    }

    #[tokio::test]
    async fn unreachable_host_is_a_connect_error_that_sent_nothing() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr");
        drop(listener);
        let host = plain_host(addr, Duration::from_secs(50));
        let handover = Handover::default();
        let err = host
            .send(get("/"), &handover)
            .await
            .expect_err("nothing listens");
        assert!(!err.maybe_sent() && !handover.happened());
        assert!(err.to_string().contains("refused"), "{err}");
    }

    /// An origin speaking HTTP/2 and HTTP/1.1 over TLS, and a host for it trusting its CA.
    /// Also returns a switch that makes the origin offer only HTTP/1.1 to new connections.
    async fn tls_origin(idle_timeout: Duration) -> (Origin, Arc<Host>, impl Fn()) {
        tls_origin_with(idle_timeout, false).await
    }

    /// `first_hangs_up`: see `origin_with`.
    async fn tls_origin_with(
        idle_timeout: Duration,
        first_hangs_up: bool,
    ) -> (Origin, Arc<Host>, impl Fn()) {
        let cert = rcgen::generate_simple_self_signed(vec!["localhost".into()]).expect("cert");
        let key = rustls_pki_types::PrivateKeyDer::try_from(cert.signing_key.serialize_der())
            .expect("key");
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut server = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .expect("versions")
            .with_no_client_auth()
            .with_single_cert(vec![cert.cert.der().clone()], key)
            .expect("server config");
        let mut http1_only = server.clone();
        server.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        http1_only.alpn_protocols = vec![b"http/1.1".to_vec()];
        let acceptor = Arc::new(Mutex::new(tokio_rustls::TlsAcceptor::from(Arc::new(
            server,
        ))));
        let origin = origin_with(Some(acceptor.clone()), first_hangs_up).await;
        let to_http1 = move || {
            *acceptor.lock().expect("acceptor") =
                tokio_rustls::TlsAcceptor::from(Arc::new(http1_only.clone()));
        };

        let host = tls_host(&cert, provider, origin.addr.port(), idle_timeout);
        (origin, host, to_http1)
    }

    /// A host for `localhost:port` over TLS, trusting `cert` only.
    fn tls_host(
        cert: &rcgen::CertifiedKey<rcgen::KeyPair>,
        provider: Arc<rustls::crypto::CryptoProvider>,
        port: u16,
        idle_timeout: Duration,
    ) -> Arc<Host> {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(cert.cert.der().clone()).expect("root");
        let client = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("versions")
            .with_root_certificates(roots)
            .with_no_client_auth();
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(client)
            .https_only()
            .enable_http1()
            .enable_http2()
            .build();
        Host::new(
            Scheme::HTTPS,
            Authority::try_from(format!("localhost:{port}")).expect("authority"),
            connector,
            idle_timeout,
            Duration::from_secs(5),
            Duration::from_secs(60),
        )
        .expect("host")
    }

    #[tokio::test]
    async fn http2_host_shares_one_connection() {
        let (origin, host, _) = tls_origin(Duration::from_secs(50)).await;
        fetch(&host, "/").await;
        let many = (0..8).map(|_| fetch(&host, "/slow"));
        futures_util::future::join_all(many).await;
        fetch(&host, "/big").await;
        assert_eq!(origin.connections.load(Ordering::Relaxed), 1);
        assert_eq!(host.idle_count(), 0, "HTTP/2 is shared, never queued");
        let versions = origin.versions.lock().expect("versions").clone();
        assert_eq!(versions, vec![Version::HTTP_2; 10]);
        let hosts = origin.hosts.lock().expect("hosts").clone();
        let authority = format!("localhost:{}", origin.addr.port());
        assert_eq!(hosts, vec![authority; 10]);
    }

    /// An HTTP/2 connection idle too long is replaced, by one new connection however many
    /// requests arrive at once.
    #[tokio::test]
    async fn idle_http2_connection_is_replaced_once() {
        let (origin, host, _) = tls_origin(Duration::from_millis(50)).await;
        fetch(&host, "/").await;
        tokio::time::sleep(Duration::from_millis(150)).await;
        let many = (0..8).map(|_| fetch(&host, "/"));
        futures_util::future::join_all(many).await;
        assert_eq!(origin.connections.load(Ordering::Relaxed), 2);
    }

    /// Requests waiting on a shared HTTP/2 connection that closes (a GOAWAY, a reset) come back
    /// unsent, all at once: they share one new connection rather than each making its own (a
    /// burst of TLS handshakes to Salesforce).
    #[tokio::test]
    async fn requests_turned_back_by_a_closed_http2_connection_share_one_new_one() {
        let (origin, host, _) = tls_origin_with(Duration::from_secs(50), true).await;
        fetch(&host, "/").await; // the connection is up, its one-stream limit known
        let many = (0..8).map(|_| async {
            let handover = Handover::default();
            let _ = host.send(get("/hang-up"), &handover).await;
        });
        futures_util::future::join_all(many).await;
        assert_eq!(origin.connections.load(Ordering::Relaxed), 2);
    }

    /// A host that spoke HTTP/2 and now answers HTTP/1.1 is treated as HTTP/1.1 from then on:
    /// its connections are queued and reused, not made anew for each request.
    #[tokio::test]
    async fn host_going_back_to_http1_reuses_its_connections() {
        // Idle timeout 500 ms: the HTTP/2 connection is dropped after the switch, and the
        // HTTP/1.1 ones are kept between fetches even on a loaded machine.
        let (origin, host, to_http1) = tls_origin(Duration::from_millis(500)).await;
        fetch(&host, "/").await;
        to_http1();
        tokio::time::sleep(Duration::from_millis(1_500)).await;
        let first = (0..3).map(|_| fetch(&host, "/slow"));
        futures_util::future::join_all(first).await;
        let after_switch = origin.connections.load(Ordering::Relaxed);
        assert!(after_switch <= 4, "{after_switch} connections");
        for _ in 0..5 {
            fetch(&host, "/").await;
        }
        assert_eq!(origin.connections.load(Ordering::Relaxed), after_switch);
        let versions = origin.versions.lock().expect("versions").clone();
        assert_eq!(versions[0], Version::HTTP_2);
        assert!(
            versions[1..].iter().all(|v| *v == Version::HTTP_11),
            "{versions:?}"
        );
    }

    /// A few clients that read a large response slowly (or not at all: a Bulk API result
    /// fetched by a stalled consumer) pin at most their stream windows: every other request on
    /// the shared HTTP/2 connection still gets its body (with hyper's default windows, three
    /// such responses held the whole connection window).
    #[tokio::test]
    async fn unread_http2_bodies_do_not_starve_other_requests() {
        const PAUSED: usize = 3;
        let (_origin, host, _) = tls_origin(Duration::from_secs(50)).await;
        fetch(&host, "/").await;
        let mut held = Vec::new();
        for _ in 0..PAUSED {
            let resp = host
                .send(get("/huge"), &Handover::default())
                .await
                .expect("response head");
            held.push(resp); // read later, or slowly, by its client
        }
        tokio::time::sleep(Duration::from_millis(500)).await; // the windows fill
        let other = tokio::time::timeout(Duration::from_secs(5), fetch(&host, "/")).await;
        assert!(
            other.is_ok(),
            "a 2-byte response on the shared connection did not arrive within 5 s \
             while 3 responses were being read slowly"
        );
        drop(held);
    }

    /// A TLS origin speaking raw HTTP/2 frames. Its first connection answers stream 1, then
    /// waits for the HEADERS of two more streams (3 and 5) and sends GOAWAY(last_stream_id =
    /// 3, `code`): stream 5 was provably not processed (RFC 9113 §6.8, §8.7). It then answers
    /// stream 3 (`answers_last`) and closes 2 s later, or closes at once with stream 3
    /// unanswered (which it may have processed). Later connections answer every stream with
    /// 200. Returns a host for it and the connections accepted.
    async fn goaway_origin(code: u32, answers_last: bool) -> (Arc<Host>, Arc<AtomicUsize>) {
        let cert = rcgen::generate_simple_self_signed(vec!["localhost".into()]).expect("cert");
        let key = rustls_pki_types::PrivateKeyDer::try_from(cert.signing_key.serialize_der())
            .expect("key");
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut server = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .expect("versions")
            .with_no_client_auth()
            .with_single_cert(vec![cert.cert.der().clone()], key)
            .expect("server config");
        server.alpn_protocols = vec![b"h2".to_vec()];
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server));
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let accepted = Arc::new(AtomicUsize::new(0));
        let count = accepted.clone();
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let first = count.fetch_add(1, Ordering::Relaxed) == 0;
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    let Ok(mut tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let mut preface = [0u8; 24];
                    if tls.read_exact(&mut preface).await.is_err() {
                        return;
                    }
                    let _ = tls.write_all(&[0, 0, 0, 4, 0, 0, 0, 0, 0]).await; // SETTINGS
                    let status_200 = |id: u32| {
                        let mut f = vec![0, 0, 1, 1, 0x5]; // HEADERS, END_STREAM | END_HEADERS
                        f.extend_from_slice(&id.to_be_bytes());
                        f.push(0x88); // :status 200 (HPACK static index 8)
                        f
                    };
                    let mut waiting = Vec::new();
                    loop {
                        let mut head = [0u8; 9];
                        if tls.read_exact(&mut head).await.is_err() {
                            return;
                        }
                        let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
                        let mut payload = vec![0u8; len];
                        if tls.read_exact(&mut payload).await.is_err() {
                            return;
                        }
                        let (kind, flags) = (head[3], head[4]);
                        let id =
                            u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff;
                        if kind == 4 && flags & 1 == 0 {
                            let _ = tls.write_all(&[0, 0, 0, 4, 1, 0, 0, 0, 0]).await;
                            // ACK
                        }
                        if kind != 1 {
                            continue;
                        }
                        if !first || id == 1 {
                            let _ = tls.write_all(&status_200(id)).await;
                            continue;
                        }
                        waiting.push(id);
                        if waiting.len() == 2 {
                            let mut goaway = vec![0, 0, 8, 7, 0, 0, 0, 0, 0];
                            goaway.extend_from_slice(&waiting[0].to_be_bytes()); // last id
                            goaway.extend_from_slice(&code.to_be_bytes()); // error code
                            let _ = tls.write_all(&goaway).await;
                            if answers_last {
                                let _ = tls.write_all(&status_200(waiting[0])).await;
                                tokio::time::sleep(Duration::from_secs(2)).await;
                            }
                            return;
                        }
                    }
                });
            }
        });
        let host = tls_host(&cert, provider, port, Duration::from_secs(50));
        (host, accepted)
    }

    /// Two requests race for streams 3 and 5 on a connection whose GOAWAY's last stream id is 3;
    /// returns each one's outcome: its status, or whether the error says it may have been sent.
    async fn two_requests_meet_a_goaway(host: &Arc<Host>) -> Vec<Result<u16, bool>> {
        let first = host
            .send(get("/"), &Handover::default())
            .await
            .expect("stream 1");
        assert_eq!(first.status(), 200);
        let (ha, hb) = (Handover::default(), Handover::default());
        let both = futures_util::future::join(host.send(get("/a"), &ha), host.send(get("/b"), &hb));
        let (a, b) = tokio::time::timeout(Duration::from_secs(5), both)
            .await
            .expect("answered in time");
        let mut outcomes: Vec<Result<u16, bool>> = [a, b]
            .into_iter()
            .map(|r| {
                r.map(|resp| resp.status().as_u16())
                    .map_err(|e| e.maybe_sent())
            })
            .collect();
        outcomes.sort();
        outcomes
    }

    /// A request above GOAWAY's last stream id was not processed, whatever the GOAWAY's error
    /// code (RFC 9113 §6.8): its error says so (the call is refunded; the client, answered 502
    /// CALLMETER_UPSTREAM_UNREACHABLE, may send it again), and the next request goes out on a
    /// new connection. (Only NO_ERROR was believed: after ENHANCE_YOUR_CALM the call stayed
    /// counted.) It is not sent again by the proxy: hyper consumes a request it hands to h2,
    /// and keeping a copy of every request for this rare case would cost every request.
    #[tokio::test]
    async fn request_above_a_goaway_last_stream_id_is_not_processed_whatever_the_code() {
        for (code, name) in [(0x0, "NO_ERROR"), (0xb, "ENHANCE_YOUR_CALM")] {
            let (host, accepted) = goaway_origin(code, true).await;
            let outcomes = two_requests_meet_a_goaway(&host).await;
            assert_eq!(outcomes, vec![Ok(200), Err(false)], "{name}");
            assert_eq!(
                fetch(&host, "/").await,
                "",
                "{name}: a new connection answers"
            );
            assert_eq!(accepted.load(Ordering::Relaxed), 2, "{name}");
        }
    }

    /// A request at or below GOAWAY's last stream id that dies with the connection may have
    /// been processed: it stays counted, whatever the code.
    #[tokio::test]
    async fn request_at_a_goaway_last_stream_id_that_dies_with_the_connection_may_be_processed() {
        for (code, name) in [(0x0, "NO_ERROR"), (0xb, "ENHANCE_YOUR_CALM")] {
            let (host, _) = goaway_origin(code, false).await;
            let outcomes = two_requests_meet_a_goaway(&host).await;
            assert_eq!(outcomes, vec![Err(false), Err(true)], "{name}");
        }
    }

    /// Small responses come with their head: reading them never waits for upstream, so they
    /// make no read timer (the hot path stays free of timers), over HTTP/1.1 and HTTP/2.
    #[tokio::test]
    async fn small_responses_make_no_read_timer() {
        let plain = origin(None).await;
        let (_tls, h2_host, _) = tls_origin(Duration::from_secs(50)).await;
        for host in [plain_host(plain.addr, Duration::from_secs(50)), h2_host] {
            fetch(&host, "/").await; // connected
            for _ in 0..20 {
                let resp = host.send(get("/"), &Handover::default()).await;
                let mut body = resp.expect("response").into_body();
                while let Some(frame) = body.frame().await {
                    frame.expect("frame");
                }
                assert!(body.stall.is_none(), "a read timer was made");
            }
        }
    }

    /// An origin that answers every request with 12 bytes of a body and then, `trickle`, ten
    /// more bytes every 100 ms ten times (the whole body), or else nothing more of the 1000
    /// bytes its head announced.
    async fn slow_origin(trickle: bool) -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(async move {
            while let Ok((mut tcp, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let mut buf = [0u8; 4096];
                    let _ = tcp.read(&mut buf).await;
                    let length = if trickle { 112 } else { 1000 };
                    let head = format!("HTTP/1.1 200 OK\r\ncontent-length: {length}\r\n\r\n");
                    let _ = tcp.write_all(head.as_bytes()).await;
                    let _ = tcp.write_all(b"{\"records\":[").await;
                    for _ in 0..10 {
                        if !trickle {
                            break;
                        }
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        let _ = tcp.write_all(b"          ").await;
                    }
                    tokio::time::sleep(Duration::from_secs(60)).await;
                });
            }
        });
        addr
    }

    fn slow_host(addr: SocketAddr, read_timeout: Duration) -> Arc<Host> {
        plain_host_with(addr, Duration::from_secs(50), read_timeout)
    }

    /// A body that sends nothing for the read timeout ends with `Stalled`, and its connection
    /// is not reused.
    #[tokio::test]
    async fn a_body_that_stalls_upstream_ends_after_the_read_timeout() {
        let host = slow_host(slow_origin(false).await, Duration::from_millis(300));
        let resp = host.send(get("/"), &Handover::default()).await;
        let mut body = resp.expect("response head").into_body();
        let started = tokio::time::Instant::now();
        let first = body.frame().await.expect("a frame").expect("data");
        assert_eq!(first.into_data().expect("data"), "{\"records\":[");
        let end = tokio::time::timeout(Duration::from_secs(5), body.frame()).await;
        let error = end
            .expect("cut off in time")
            .expect("an error")
            .expect_err("stalled");
        assert!(matches!(error, BodyError::Stalled(_)), "{error}");
        assert!(started.elapsed() >= Duration::from_millis(300));
        drop(body);
        assert_eq!(host.idle_count(), 0, "a cut-off connection is not reused");
    }

    /// A body that breaks off upstream (a chunk size that is no number) ends with an error,
    /// and a warning says so: the client's response, its head sent with a success status,
    /// is cut off, and nothing else told the SRE.
    #[tokio::test]
    async fn a_body_that_breaks_off_upstream_is_logged() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(async move {
            while let Ok((mut tcp, _)) = listener.accept().await {
                let mut buf = [0u8; 4096];
                let _ = tcp.read(&mut buf).await;
                let head = "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n";
                let _ = tcp.write_all(head.as_bytes()).await;
                tokio::time::sleep(Duration::from_secs(5)).await;
            }
        });
        let (_default, logged) = crate::logging::capture("warn");
        let host = plain_host(addr, Duration::from_secs(50));
        let resp = host.send(get("/"), &Handover::default()).await;
        let body = resp.expect("response head").into_body();
        let error = body.collect().await.expect_err("a broken body");
        assert!(matches!(error, BodyError::Upstream(_)), "{error}");
        let logged = String::from_utf8_lossy(&logged.lock().expect("log")).into_owned();
        assert!(
            logged.contains("WARN") && logged.contains("broke off"),
            "{logged}"
        );
    }

    /// The read timeout counts from the body's last progress: a body whose bytes come closer
    /// together than the timeout is read to its end, however long it takes in all.
    #[tokio::test]
    async fn a_body_that_keeps_moving_is_not_cut_off() {
        let host = slow_host(slow_origin(true).await, Duration::from_millis(500));
        let resp = host.send(get("/"), &Handover::default()).await;
        let body = resp.expect("response head").into_body();
        let read = body.collect().await.expect("the whole body").to_bytes();
        assert_eq!(read.len(), 112);
    }

    /// A client that reads slowly stops the proxy polling upstream: the read timeout does
    /// not cut a healthy body then. The body is armed (it waits for
    /// upstream first), then its consumer pauses for more than the timeout between frames
    /// while upstream has the rest ready.
    #[tokio::test]
    async fn a_slowly_read_body_is_not_cut_off() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        const LEN: usize = 4 << 20;
        tokio::spawn(async move {
            while let Ok((mut tcp, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let mut buf = [0u8; 4096];
                    let _ = tcp.read(&mut buf).await;
                    let head = format!("HTTP/1.1 200 OK\r\ncontent-length: {LEN}\r\n\r\n");
                    let _ = tcp.write_all(head.as_bytes()).await;
                    tokio::time::sleep(Duration::from_millis(100)).await; // the body waits once
                    let _ = tcp.write_all(&vec![b'x'; LEN]).await;
                    tokio::time::sleep(Duration::from_secs(60)).await;
                });
            }
        });
        let host = slow_host(addr, Duration::from_millis(300));
        let resp = host.send(get("/"), &Handover::default()).await;
        let mut body = resp.expect("response head").into_body();
        let mut read = 0;
        let mut frames = 0;
        while let Some(frame) = body.frame().await {
            let frame = frame.expect("a slowly read body is not cut off");
            read += frame.into_data().map(|d| d.len()).unwrap_or(0);
            frames += 1;
            if frames <= 4 {
                // The client is slow: nobody polls upstream for longer than the timeout.
                tokio::time::sleep(Duration::from_millis(700)).await;
            }
        }
        assert_eq!(read, LEN);
        assert!(body.stall.is_some(), "the timer was armed");
    }
}
