//! Listening: TCP accept, optional TLS (rustls, ALPN h2 + http/1.1), HTTP/1.1 and HTTP/2 on
//! every connection (prior-knowledge h2c on plaintext), graceful shutdown.
//!
//! The accept loop never ends on an accept error (e.g. EMFILE when file descriptors run out):
//! it logs, backs off and retries. On shutdown it stops accepting, asks every connection to
//! finish its in-flight requests, and waits for them up to the grace period.

use std::future::Future;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use http::{HeaderValue, Request, Response};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use thiserror::Error;
use tokio::net::TcpListener;
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

/// TLS termination for a listener.
#[derive(Clone)]
pub struct TlsSetup(TlsAcceptor);

impl TlsSetup {
    /// Loads a PEM certificate chain and private key; offers h2 and http/1.1 by ALPN.
    pub fn from_pem_files(cert: &Path, key: &Path) -> Result<Self, ListenerSetupError> {
        let cert_path = cert.display().to_string();
        let key_path = key.display().to_string();
        let chain = CertificateDer::pem_file_iter(cert)
            .and_then(|it| it.collect::<Result<Vec<_>, _>>())
            .map_err(|source| ListenerSetupError::Cert {
                path: cert_path.clone(),
                source,
            })?;
        let key_der =
            PrivateKeyDer::from_pem_file(key).map_err(|source| ListenerSetupError::Key {
                path: key_path.clone(),
                source,
            })?;
        let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .and_then(|b| b.with_no_client_auth().with_single_cert(chain, key_der))
        .map_err(|source| ListenerSetupError::Pair {
            cert: cert_path,
            key: key_path,
            source,
        })?;
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(TlsSetup(TlsAcceptor::from(Arc::new(config))))
    }
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
    /// by the request's headers (README "Performance": 2.5 % of the instructions per
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
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        // Head and body copied into one buffer and written with one `write`: for Salesforce's
        // mostly small responses cheaper than hyper's queue of buffers for `writev`
        // (README "Performance"); a large body streams through that buffer, bounded by its size.
        .writev(false)
        .half_close(!options.watch_hangups)
        .header_read_timeout(Some(options.header_timeout))
        // hyper's floor for the read buffer is 8 KiB.
        .max_buf_size(options.max_header_bytes.max(8192));
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(options.max_header_bytes as u32);
    let graceful = GracefulShutdown::new();
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
        // Each connection gets its own header-read timer (`timer.rs`), so the builder is
        // copied per connection (once per connection, against a timer registration saved on
        // every request).
        let mut builder = builder.clone();
        builder.http1().timer(ConnTimer::new());
        let handler = handler.clone();
        let client = Peer::new(peer);
        let service = service_fn(move |req| {
            let (handler, client) = (handler.clone(), client.clone());
            async move { Ok::<_, std::convert::Infallible>(handler(client, req).await) }
        });
        match &tls {
            None => {
                let conn = builder
                    .serve_connection(TokioIo::new(stream), service)
                    .into_owned();
                let conn = graceful.watch(conn);
                tokio::spawn(async move {
                    if let Err(e) = conn.await {
                        tracing::debug!(%peer, error = %e, "connection ended with an error");
                    }
                });
            }
            Some(TlsSetup(acceptor)) => {
                let acceptor = acceptor.clone();
                let watcher = graceful.watcher();
                tokio::spawn(async move {
                    let stream =
                        match tokio::time::timeout(options.header_timeout, acceptor.accept(stream))
                            .await
                        {
                            Ok(Ok(s)) => s,
                            Ok(Err(e)) => {
                                return tracing::debug!(%peer, error = %e, "TLS handshake failed")
                            }
                            Err(_) => return tracing::debug!(%peer, "TLS handshake timed out"),
                        };
                    let conn = builder
                        .serve_connection(TokioIo::new(stream), service)
                        .into_owned();
                    if let Err(e) = watcher.watch(conn).await {
                        tracing::debug!(%peer, error = %e, "connection ended with an error");
                    }
                });
            }
        }
    }

    drop(listener);
    tokio::select! {
        () = graceful.shutdown() => tracing::debug!("all connections drained"),
        () = tokio::time::sleep(grace) => tracing::warn!(?grace, "grace period over; closing connections with requests in flight"),
    }
}
