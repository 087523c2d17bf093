//! Listening: TCP accept, optional TLS (rustls, ALPN h2 + http/1.1), HTTP/1.1 and HTTP/2 on
//! every listener, graceful shutdown. A TLS connection speaks what ALPN chose (HTTP/1.1 when
//! the client offered nothing); a plaintext one is HTTP/2 when it opens with the h2c preface
//! (prior knowledge), else HTTP/1.1.
//!
//! The accept loop never ends on an accept error (e.g. EMFILE when file descriptors run out):
//! it logs, backs off and retries. On shutdown it stops accepting, asks every connection to
//! finish its in-flight requests, and waits for them up to the grace period.
//!
//! No connection stays open doing nothing: an HTTP/1.1 one is closed after `header_timeout`
//! without a request head (hyper's timer), an HTTP/2 one after `header_timeout` with no
//! request in flight (a GOAWAY, so a response still streaming finishes first). Otherwise any
//! client could hold file descriptors until the proxy has none left for the others.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::path::Path;
use std::pin::{pin, Pin};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use http::{HeaderValue, Request, Response};
use hyper::body::Incoming;
use hyper::server::conn::{http1, http2};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use rustls::crypto::CryptoProvider;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use thiserror::Error;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio_rustls::TlsAcceptor;

use super::timer::ConnTimer;

#[derive(Debug, Error)]
pub enum ListenerSetupError {
    #[error("cannot read TLS certificate {path}: {source}")]
    Cert {
        path: String,
        #[source]
        source: rustls_pki_types::pem::Error,
    },
    #[error("cannot read TLS private key {path}: {source}")]
    Key {
        path: String,
        #[source]
        source: rustls_pki_types::pem::Error,
    },
    #[error("TLS certificate {cert} and key {key} do not form a usable pair: {source}")]
    Pair {
        cert: String,
        key: String,
        #[source]
        source: rustls::Error,
    },
}

/// TLS termination for a listener. Its certificate can be replaced while it serves
/// (`reload`): rustls asks `CurrentCert` for it at each handshake.
#[derive(Clone)]
pub struct TlsSetup {
    acceptor: TlsAcceptor,
    current: Arc<CurrentCert>,
}

/// The certificate and key a listener serves. Each handshake takes the one there when it
/// starts (one atomic load and reference count), so a replacement reaches new connections
/// only: an open connection keeps the session it has.
#[derive(Debug)]
struct CurrentCert(ArcSwap<CertifiedKey>);

impl ResolvesServerCert for CurrentCert {
    fn resolve(&self, _: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.load_full())
    }
}

/// What `TlsSetup::reload` found in the files.
#[derive(Debug)]
pub struct Reloaded {
    /// Whether they hold another certificate chain than the one served until now.
    pub changed: bool,
    /// The (first) certificate's notAfter, UTC (e.g. "2027-03-01T12:00:00Z"), when it could
    /// be read.
    pub not_after: Option<String>,
}

impl TlsSetup {
    /// Loads a PEM certificate chain and private key; offers h2 and http/1.1 by ALPN.
    pub fn from_pem_files(cert: &Path, key: &Path) -> Result<Self, ListenerSetupError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let certified = certified_key(cert, key, &provider)?;
        let current = Arc::new(CurrentCert(ArcSwap::from_pointee(certified)));
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|source| ListenerSetupError::Pair {
                cert: cert.display().to_string(),
                key: key.display().to_string(),
                source,
            })?
            .with_no_client_auth()
            .with_cert_resolver(current.clone());
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(TlsSetup {
            acceptor: TlsAcceptor::from(Arc::new(config)),
            current,
        })
    }

    /// Reads the certificate chain and key again (a certificate renewed in place) and serves
    /// them from the next handshake on. On an error (a file unreadable or without PEM, a key
    /// that does not fit the certificate) the certificate served until now stays.
    pub fn reload(&self, cert: &Path, key: &Path) -> Result<Reloaded, ListenerSetupError> {
        let certified = certified_key(cert, key, self.acceptor.config().crypto_provider())?;
        let changed = certified.cert != self.current.0.load().cert;
        let not_after = certified.cert.first().and_then(|c| not_after(c));
        self.current.0.store(Arc::new(certified));
        Ok(Reloaded { changed, not_after })
    }
}

/// A PEM certificate chain and the private key that fits it.
fn certified_key(
    cert: &Path,
    key: &Path,
    provider: &CryptoProvider,
) -> Result<CertifiedKey, ListenerSetupError> {
    let cert_path = cert.display().to_string();
    let key_path = key.display().to_string();
    let chain = CertificateDer::pem_file_iter(cert)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|source| ListenerSetupError::Cert {
            path: cert_path.clone(),
            source,
        })?;
    let key_der = PrivateKeyDer::from_pem_file(key).map_err(|source| ListenerSetupError::Key {
        path: key_path.clone(),
        source,
    })?;
    // What `with_single_cert` checks: the key loads, and fits the first certificate.
    CertifiedKey::from_der(chain, key_der, provider).map_err(|source| ListenerSetupError::Pair {
        cert: cert_path,
        key: key_path,
        source,
    })
}

/// A certificate's notAfter as "YYYY-MM-DDTHH:MM:SSZ", for the reload's log line; None if
/// the certificate does not parse (rustls checks it for use, not this).
fn not_after(der: &[u8]) -> Option<String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let secs = u64::try_from(cert.validity().not_after.timestamp()).ok()?;
    let at = std::time::UNIX_EPOCH + Duration::from_secs(secs);
    Some(humantime::format_rfc3339_seconds(at).to_string())
}

/// How a listener treats every connection.
#[derive(Debug, Clone, Copy)]
pub struct ConnOptions {
    /// Largest request head (request line + headers) accepted; larger gets 431.
    pub max_header_bytes: usize,
    /// How long a client may take to send its request head.
    pub header_timeout: Duration,
    /// Whether an HTTP/1.1 connection is read while its request is in flight, to notice a
    /// client that hangs up: a call waiting in a queue for budget then leaves it instead of
    /// being sent for nobody. Only listeners whose integrations queue need it: hyper's read
    /// ahead takes a new read buffer for every request, as the last one is still referenced
    /// by the request's headers (benches/README.md: 2.5 % of the instructions per
    /// request). Without it a call whose client left is sent and its answer dropped, as for
    /// a client that half-closes (HTTP/2 notices resets either way).
    pub watch_hangups: bool,
}

/// The client end of a connection, as each of its requests sees it.
#[derive(Clone, Debug)]
pub struct Peer {
    pub addr: SocketAddr,
    /// The address's IP as a header value, made once per connection: every request on the
    /// connection sends it upstream in `X-Forwarded-For`, and formatting an IP per request
    /// was a measurable share of the proxy's own work.
    pub ip_header: HeaderValue,
}

impl Peer {
    pub fn new(addr: SocketAddr) -> Self {
        let ip = addr.ip().to_string();
        Peer {
            addr,
            // An IP's text is always a valid header value.
            ip_header: HeaderValue::from_str(&ip).unwrap_or(HeaderValue::from_static("unknown")),
        }
    }
}

/// HTTP/2 with prior knowledge opens with this preface (RFC 9113 §3.4); anything else on a
/// plaintext listener is HTTP/1.
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// The protocol a connection speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Protocol {
    Http1,
    Http2,
}

/// Tells an h2c (prior knowledge) connection from an HTTP/1 one by peeking at its first bytes,
/// which stay in the socket for the protocol's own reader. The request line of every method the
/// Salesforce API takes differs from the preface within its first two bytes; only a preface
/// split across packets makes it look again (after a millisecond: a peek returns at once
/// while any byte is waiting).
async fn sniff(stream: &TcpStream) -> std::io::Result<Protocol> {
    let mut buf = [0u8; H2_PREFACE.len()];
    let mut seen = 0;
    loop {
        let n = stream.peek(&mut buf).await?;
        if n == 0 || buf[..n] != H2_PREFACE[..n] {
            return Ok(Protocol::Http1);
        }
        if n == H2_PREFACE.len() {
            return Ok(Protocol::Http2);
        }
        if n == seen {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        seen = n;
    }
}

/// The HTTP/1.1 and HTTP/2 settings every connection of a listener is served with.
struct Builders {
    http1: http1::Builder,
    http2: http2::Builder<TokioExecutor>,
    /// How long an HTTP/2 connection may stay open with no request in flight.
    idle_timeout: Duration,
}

impl Builders {
    fn new(options: &ConnOptions) -> Self {
        let mut http1 = http1::Builder::new();
        http1
            // Head and body copied into one buffer and written with one `write`: for
            // Salesforce's mostly small responses cheaper than hyper's queue of buffers for
            // `writev` (benches/README.md); a large body streams through that buffer,
            // bounded by its size.
            .writev(false)
            .half_close(!options.watch_hangups)
            .header_read_timeout(Some(options.header_timeout))
            // hyper's floor for the read buffer is 8 KiB.
            .max_buf_size(options.max_header_bytes.max(8192));
        let mut http2 = http2::Builder::new(TokioExecutor::new());
        http2
            .timer(TokioTimer::new())
            .max_header_list_size(options.max_header_bytes as u32);
        Builders {
            http1,
            http2,
            idle_timeout: options.header_timeout,
        }
    }

    /// Serves one connection until it closes, or until `drain` asks it to finish.
    async fn serve<I, H, F>(
        &self,
        io: I,
        protocol: Protocol,
        handler: H,
        client: Peer,
        drain: watch::Receiver<bool>,
    ) -> Result<(), hyper::Error>
    where
        I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
        H: Fn(Peer, Request<Incoming>) -> F + Clone + Send + Sync + 'static,
        F: Future<Output = Response<super::ResponseBody>> + Send + 'static,
    {
        match protocol {
            Protocol::Http1 => {
                // Each connection gets its own header-read timer (`timer.rs`), so the builder
                // is copied per connection (once per connection, against a timer registration
                // saved on every request).
                let mut http1 = self.http1.clone();
                http1.timer(ConnTimer::new());
                let service = service_fn(move |req| {
                    let (handler, client) = (handler.clone(), client.clone());
                    async move { Ok::<_, Infallible>(handler(client, req).await) }
                });
                // hyper's header-read timer closes an idle HTTP/1.1 connection.
                let idle = std::future::pending;
                until_drained(http1.serve_connection(io, service), drain, idle).await
            }
            Protocol::Http2 => {
                // The HTTP/2 server spawns a task per stream and moves the request's future
                // into it, through several layers of tokio, each a copy of the whole future
                // (some KiB, benches/README.md); boxed, only a pointer moves.
                let streams = Arc::new(Streams::new());
                let counted = streams.clone();
                let service = service_fn(move |req| {
                    let (handler, client) = (handler.clone(), client.clone());
                    let stream = Stream::begin(&counted);
                    Box::pin(async move {
                        let response = handler(client, req).await;
                        Ok::<_, Infallible>(response.map(|body| body.keep(stream)))
                    })
                });
                let idle = || streams.idle_for(self.idle_timeout);
                let conn = self.http2.serve_connection(io, service);
                until_drained(conn, drain, idle).await
            }
        }
    }
}

/// Serves `listener` with `handler` until `shutdown` resolves, then drains connections for at
/// most `grace`.
pub async fn serve_listener<H, F>(
    listener: TcpListener,
    tls: Option<TlsSetup>,
    options: ConnOptions,
    handler: H,
    shutdown: impl Future<Output = ()>,
    grace: Duration,
) where
    H: Fn(Peer, Request<Incoming>) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Response<super::ResponseBody>> + Send + 'static,
{
    let builders = Arc::new(Builders::new(&options));
    let acceptor = tls.map(|tls| tls.acceptor);
    let (drain, _) = watch::channel(false);
    // The connections' tasks: cut off when the grace period is over, so that nothing they
    // hold (the store among it) outlives the shutdown.
    let mut connections = tokio::task::JoinSet::new();
    let mut backoff = Duration::from_millis(5);
    tokio::pin!(shutdown);

    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(conn) => {
                    backoff = Duration::from_millis(5);
                    conn
                }
                Err(e) => {
                    // Out of file descriptors, a connection reset before accept: wait and retry.
                    tracing::warn!(error = %e, retry_in = ?backoff, "accept failed");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(1));
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let _ = stream.set_nodelay(true);
        let (builders, handler, tls) = (builders.clone(), handler.clone(), acceptor.clone());
        let client = Peer::new(peer);
        let mut watcher = drain.subscribe();
        while connections.try_join_next().is_some() {} // the ended ones
        connections.spawn(async move {
            // Both the TLS handshake and the first bytes of a plaintext connection come within
            // the header timeout, or the connection is closed; at a shutdown, at once (no
            // request is under way yet).
            let served = match tls {
                None => {
                    let sniffing = tokio::time::timeout(options.header_timeout, sniff(&stream));
                    let protocol = tokio::select! {
                        sniffed = sniffing => match sniffed {
                            Ok(Ok(protocol)) => protocol,
                            Ok(Err(e)) => {
                                return tracing::debug!(%peer, error = %e, "connection failed")
                            }
                            Err(_) => return tracing::debug!(%peer, "no request came in time"),
                        },
                        _ = watcher.wait_for(|draining| *draining) => return,
                    };
                    let io = TokioIo::new(stream);
                    builders.serve(io, protocol, handler, client, watcher).await
                }
                Some(acceptor) => {
                    let handshake =
                        tokio::time::timeout(options.header_timeout, acceptor.accept(stream));
                    let stream = tokio::select! {
                        shaken = handshake => match shaken {
                            Ok(Ok(s)) => s,
                            Ok(Err(e)) => {
                                return tracing::debug!(%peer, error = %e, "TLS handshake failed")
                            }
                            Err(_) => return tracing::debug!(%peer, "TLS handshake timed out"),
                        },
                        _ = watcher.wait_for(|draining| *draining) => return,
                    };
                    let protocol = match stream.get_ref().1.alpn_protocol() {
                        Some(b"h2") => Protocol::Http2,
                        _ => Protocol::Http1,
                    };
                    let io = TokioIo::new(stream);
                    builders.serve(io, protocol, handler, client, watcher).await
                }
            };
            if let Err(e) = served {
                tracing::debug!(%peer, error = %e, "connection ended with an error");
            }
        });
    }

    drop(listener);
    // Every connection holds a receiver until it has ended.
    drain.send_replace(true);
    tokio::select! {
        () = drain.closed() => tracing::debug!("all connections drained"),
        () = tokio::time::sleep(grace) => tracing::warn!(?grace, "grace period over; closing connections with requests in flight"),
    }
    connections.shutdown().await;
}

/// A served connection that can be asked to finish its requests and close.
trait Graceful: Future<Output = Result<(), hyper::Error>> {
    fn finish(self: Pin<&mut Self>);
}

impl<I, S, B> Graceful for http1::Connection<I, S>
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + 'static,
    S: hyper::service::HttpService<Incoming, ResBody = B>,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    B: http_body::Body + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    fn finish(self: Pin<&mut Self>) {
        self.graceful_shutdown();
    }
}

impl<I, S, B, E> Graceful for http2::Connection<I, S, E>
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + 'static,
    S: hyper::service::HttpService<Incoming, ResBody = B>,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    B: http_body::Body + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    E: hyper::rt::bounds::Http2ServerConnExec<S::Future, B>,
{
    fn finish(self: Pin<&mut Self>) {
        self.graceful_shutdown();
    }
}

/// Runs `conn` to its end. When the listener drains or the connection has been `idle` too
/// long, asks it to finish its requests in flight and close; if it is idle as long again
/// without closing (an HTTP/2 client that never completes its handshake or never answers the
/// GOAWAY), drops it.
async fn until_drained<C: Graceful, F: Future<Output = ()>>(
    conn: C,
    mut drain: watch::Receiver<bool>,
    idle: impl Fn() -> F,
) -> Result<(), hyper::Error> {
    let mut conn = pin!(conn);
    tokio::select! {
        // Polled on every wake of the connection: in this order, without select!'s random
        // start (the connection is the one that has work).
        biased;
        done = conn.as_mut() => return done,
        // Err: the listener is gone, which drains too.
        _ = drain.wait_for(|draining| *draining) => {}
        () = idle() => {}
    }
    conn.as_mut().finish();
    tokio::select! {
        done = conn => done,
        () = idle() => Ok(()),
    }
}

/// The requests in flight on an HTTP/2 connection (from the request until its response body
/// is sent), and since when it has had none.
struct Streams {
    start: tokio::time::Instant,
    active: AtomicUsize,
    /// Milliseconds after `start` at which the last request in flight ended.
    idle_since_ms: AtomicU64,
}

/// One request in flight on an HTTP/2 connection, until dropped (with its response body).
struct Stream(Arc<Streams>);

impl Stream {
    fn begin(streams: &Arc<Streams>) -> Self {
        streams.active.fetch_add(1, Ordering::Relaxed);
        Stream(streams.clone())
    }
}

impl Drop for Stream {
    fn drop(&mut self) {
        let streams = &self.0;
        let ms = streams.start.elapsed().as_millis() as u64;
        streams.idle_since_ms.store(ms, Ordering::Relaxed);
        streams.active.fetch_sub(1, Ordering::Release);
    }
}

impl Streams {
    fn new() -> Self {
        Streams {
            start: tokio::time::Instant::now(),
            active: AtomicUsize::new(0),
            idle_since_ms: AtomicU64::new(0),
        }
    }

    /// Resolves once no request has been in flight for `timeout`.
    async fn idle_for(&self, timeout: Duration) {
        loop {
            let since = self.idle_since_ms.load(Ordering::Relaxed);
            tokio::time::sleep_until(self.start + Duration::from_millis(since) + timeout).await;
            let idle = self.active.load(Ordering::Acquire) == 0
                && self.idle_since_ms.load(Ordering::Relaxed) == since;
            if idle {
                return;
            }
            if self.active.load(Ordering::Acquire) > 0 {
                // Busy: look again a timeout from now (the last request to end moves the
                // start of the idle time).
                tokio::time::sleep(timeout).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    /// A connected pair: what the client writes, the server side sniffs.
    async fn pair() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let client = TcpStream::connect(addr).await.expect("connect");
        let (server, _) = listener.accept().await.expect("accept");
        (client, server)
    }

    async fn sniffed(chunks: &[&[u8]]) -> (Protocol, Vec<u8>) {
        let (mut client, mut server) = pair().await;
        let sent: Vec<u8> = chunks.concat();
        let chunks: Vec<Vec<u8>> = chunks.iter().map(|c| c.to_vec()).collect();
        let writer = tokio::spawn(async move {
            for chunk in chunks {
                client.write_all(&chunk).await.expect("write");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            client
        });
        let protocol = sniff(&server).await.expect("sniff");
        let client = writer.await.expect("writer");
        drop(client);
        // Whatever was sniffed is still there for the protocol's reader.
        let mut left = Vec::new();
        server.read_to_end(&mut left).await.expect("read");
        assert_eq!(left, sent, "sniffing consumed bytes");
        (protocol, left)
    }

    /// A self-signed certificate for "localhost" valid until `year`-03-01, written to `dir`
    /// as `name`.pem and `name`.key.
    fn cert_files(dir: &Path, name: &str, year: i32) -> (std::path::PathBuf, std::path::PathBuf) {
        let mut params = rcgen::CertificateParams::new(vec!["localhost".into()]).expect("params");
        params.not_after = rcgen::date_time_ymd(year, 3, 1);
        let key = rcgen::KeyPair::generate().expect("key");
        let cert = params.self_signed(&key).expect("cert");
        let files = (
            dir.join(format!("{name}.pem")),
            dir.join(format!("{name}.key")),
        );
        std::fs::write(&files.0, cert.pem()).expect("write cert");
        std::fs::write(&files.1, key.serialize_pem()).expect("write key");
        files
    }

    fn served(tls: &TlsSetup) -> Vec<CertificateDer<'static>> {
        tls.current.0.load().cert.clone()
    }

    #[test]
    fn a_reload_serves_the_new_files_or_keeps_the_old_certificate() {
        let dir = tempfile::tempdir().expect("tempdir");
        let a = cert_files(dir.path(), "a", 2031);
        let b = cert_files(dir.path(), "b", 2049);
        let tls = TlsSetup::from_pem_files(&a.0, &a.1).expect("setup");
        let first = served(&tls);

        // B's certificate with A's key; a missing key; no certificate in the file.
        let garbage = dir.path().join("garbage.pem");
        std::fs::write(&garbage, "not a certificate\n").expect("write");
        let missing = dir.path().join("missing.key");
        for (cert, key, named) in [
            (&b.0, &a.1, &a.1),
            (&b.0, &missing, &missing),
            (&garbage, &b.1, &garbage),
        ] {
            let e = tls.reload(cert, key).expect_err("refused");
            assert!(e.to_string().contains(&named.display().to_string()), "{e}");
            assert!(served(&tls) == first, "{e}: the old certificate stays");
        }

        let r = tls.reload(&b.0, &b.1).expect("reloaded");
        assert!(r.changed);
        assert_eq!(r.not_after.as_deref(), Some("2049-03-01T00:00:00Z"));
        assert!(served(&tls) != first);
        let r = tls.reload(&b.0, &b.1).expect("reloaded");
        assert!(!r.changed, "the same files again");
    }

    #[test]
    fn not_after_reads_utc_and_generalized_times() {
        let dir = tempfile::tempdir().expect("tempdir");
        // Before 2050 a certificate holds UTCTime, from then on GeneralizedTime.
        for (year, expected) in [
            (2031, "2031-03-01T00:00:00Z"),
            (2051, "2051-03-01T00:00:00Z"),
        ] {
            let (cert, _) = cert_files(dir.path(), "c", year);
            let der = CertificateDer::from_pem_file(&cert).expect("der");
            assert_eq!(not_after(&der).as_deref(), Some(expected));
        }
        assert_eq!(not_after(b"\x30\x03\x02\x01"), None);
        assert_eq!(not_after(b""), None);
    }

    #[tokio::test]
    async fn a_request_line_is_http1() {
        let (protocol, _) = sniffed(&[b"GET /services/data/ HTTP/1.1\r\nHost: x\r\n\r\n"]).await;
        assert_eq!(protocol, Protocol::Http1);
        let (protocol, _) = sniffed(&[b"P", b"OST / HTTP/1.1\r\n\r\n"]).await;
        assert_eq!(protocol, Protocol::Http1);
    }

    #[tokio::test]
    async fn the_preface_is_http2_even_split_across_packets() {
        let (protocol, _) = sniffed(&[H2_PREFACE]).await;
        assert_eq!(protocol, Protocol::Http2);
        let (protocol, _) =
            sniffed(&[&H2_PREFACE[..3], &H2_PREFACE[3..10], &H2_PREFACE[10..]]).await;
        assert_eq!(protocol, Protocol::Http2);
    }

    #[tokio::test]
    async fn a_near_preface_is_http1() {
        let (protocol, _) = sniffed(&[b"PRI * HTTP/1.1\r\n\r\n"]).await;
        assert_eq!(protocol, Protocol::Http1);
    }

    #[tokio::test]
    async fn a_client_that_leaves_at_once_is_http1() {
        let (client, server) = pair().await;
        drop(client);
        assert_eq!(sniff(&server).await.expect("sniff"), Protocol::Http1);
    }
}
