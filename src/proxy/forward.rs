//! The upstream side: per org, the connections to its configured Salesforce URLs (`pool.rs`),
//! the URL each request goes to, and the response timeout.
//!
//! The upstream is chosen by configuration, never by the request's Host header, so the proxy
//! cannot be used as an open proxy. TLS is rustls with the webpki roots plus an optional extra
//! CA; ALPN offers h2 and http/1.1. Plain `http://` upstreams exist only when the org's config
//! allows them (the simulator, a local relay).

use std::sync::Arc;
use std::time::Duration;

use http::uri::{Authority, PathAndQuery, Scheme};
use http::{Request, Response, Uri};
use hyper_util::client::legacy::connect::HttpConnector;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::CertificateDer;
use thiserror::Error;

use super::body::{RequestBody, Stall, Upload};
use super::error::ProxyError;
use super::pool::{Handover, Host, SendError, UpstreamBody};
use crate::config::OrgConfig;

/// How long an idle upstream connection is kept for reuse. Salesforce closes idle keep-alive
/// connections after a while; staying below that avoids sending on a half-closed socket.
const POOL_IDLE: Duration = Duration::from_secs(50);

#[derive(Debug, Error)]
pub enum UpstreamSetupError {
    #[error("org \"{org}\": cannot read upstream_ca {path}: {source}")]
    CaFile {
        org: String,
        path: String,
        #[source]
        source: rustls_pki_types::pem::Error,
    },
    #[error("org \"{org}\": upstream_ca {path} holds no usable certificate")]
    CaEmpty { org: String, path: String },
    #[error("org \"{org}\": TLS client setup failed: {source}")]
    Tls {
        org: String,
        #[source]
        source: rustls::Error,
    },
    #[error("org \"{org}\": instance_url {url} is not an absolute URL (scheme and host)")]
    NotAbsolute { org: String, url: String },
    #[error("org \"{org}\": {url} cannot be used as an upstream: {source}")]
    Url {
        org: String,
        url: String,
        #[source]
        source: http::Error,
    },
}

/// Scheme, host and base path of one Salesforce endpoint.
#[derive(Debug, Clone)]
struct Base {
    scheme: Scheme,
    authority: Authority,
    /// Path the endpoint lives under, without a trailing slash ("" for the root).
    path: String,
    display: String,
}

impl Base {
    fn of(uri: &Uri) -> Option<Base> {
        Some(Base {
            scheme: uri.scheme()?.clone(),
            authority: uri.authority()?.clone(),
            path: uri.path().trim_end_matches('/').to_owned(),
            display: uri.to_string().trim_end_matches('/').to_owned(),
        })
    }

    fn uri(&self, path_and_query: PathAndQuery) -> Result<Uri, http::Error> {
        let pq = if self.path.is_empty() {
            path_and_query
        } else {
            PathAndQuery::try_from(format!("{}{}", self.path, path_and_query))?
        };
        // Origin form: the connection it goes out on adds scheme and host as its protocol
        // wants them (pool.rs), so no absolute URI is built only to be taken apart again.
        Ok(Uri::from(pq))
    }
}

/// The upstream of one org.
pub struct Upstream {
    instance: Base,
    login: Base,
    instance_host: Arc<Host>,
    /// The instance's own when the org has no separate login URL.
    login_host: Arc<Host>,
    response_timeout: Duration,
}

impl Upstream {
    pub fn new(cfg: &OrgConfig) -> Result<Arc<Self>, UpstreamSetupError> {
        let org = cfg.id.to_string();
        let mut roots = rustls::RootCertStore::empty();
        roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
        if let Some(path) = &cfg.upstream_ca {
            let shown = path.display().to_string();
            let certs = CertificateDer::pem_file_iter(path)
                .and_then(|it| it.collect::<Result<Vec<_>, _>>())
                .map_err(|source| UpstreamSetupError::CaFile {
                    org: org.clone(),
                    path: shown.clone(),
                    source,
                })?;
            let (added, _) = roots.add_parsable_certificates(certs);
            if added == 0 {
                return Err(UpstreamSetupError::CaEmpty { org, path: shown });
            }
        }
        let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .map_err(|source| UpstreamSetupError::Tls {
            org: org.clone(),
            source,
        })?
        .with_root_certificates(roots)
        .with_no_client_auth();

        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_nodelay(true);
        http.set_connect_timeout(Some(cfg.connect_timeout));
        http.set_keepalive(Some(Duration::from_secs(60)));
        let builder = hyper_rustls::HttpsConnectorBuilder::new().with_tls_config(tls);
        let connector = if cfg.allow_plain_http {
            builder
                .https_or_http()
                .enable_http1()
                .enable_http2()
                .wrap_connector(http)
        } else {
            builder
                .https_only()
                .enable_http1()
                .enable_http2()
                .wrap_connector(http)
        };

        // Config validation guarantees absolute URLs; fall back to the instance for login.
        let instance =
            Base::of(&cfg.instance_url).ok_or_else(|| UpstreamSetupError::NotAbsolute {
                org: org.clone(),
                url: cfg.instance_url.to_string(),
            })?;
        let login = cfg
            .login_url
            .as_ref()
            .and_then(Base::of)
            .unwrap_or_else(|| instance.clone());
        let host = |base: &Base| {
            Host::new(
                base.scheme.clone(),
                base.authority.clone(),
                connector.clone(),
                POOL_IDLE,
                cfg.connect_timeout,
                cfg.response_timeout,
            )
            .map_err(|source| UpstreamSetupError::Url {
                org: org.clone(),
                url: base.display.clone(),
                source,
            })
        };
        let instance_host = host(&instance)?;
        let login_host = if cfg.login_url.is_some() {
            host(&login)?
        } else {
            instance_host.clone()
        };
        Ok(Arc::new(Upstream {
            instance,
            login,
            instance_host,
            login_host,
            response_timeout: cfg.response_timeout,
        }))
    }

    /// The instance (or, `login`, the login host) as errors name it.
    pub fn name(&self, login: bool) -> &str {
        &self.base(login).display
    }

    /// How long a call may wait for Salesforce's answer, a request body for its next byte, and
    /// a response body for its next (`Host`'s read timeout).
    pub fn response_timeout(&self) -> Duration {
        self.response_timeout
    }

    /// The path and query a request is sent with: under the login URL for login calls, the
    /// instance URL otherwise (`send` with the same `login` picks the host).
    pub fn uri(&self, login: bool, path_and_query: PathAndQuery) -> Result<Uri, http::Error> {
        self.base(login).uri(path_and_query)
    }

    fn base(&self, login: bool) -> &Base {
        if login {
            &self.login
        } else {
            &self.instance
        }
    }

    /// Sends a request and waits for the response headers: within the response timeout, or,
    /// for a request with a body, within the response timeout of the body's last byte (an
    /// upload may take longer than the timeout as long as it keeps moving). `handover` tells,
    /// should this future be dropped, whether the request reached an upstream connection.
    pub async fn send(
        &self,
        login: bool,
        mut req: Request<RequestBody>,
        handover: &Handover,
    ) -> Result<Response<UpstreamBody>, ProxyError> {
        let upstream = || self.base(login).display.clone();
        let host = if login {
            &self.login_host
        } else {
            &self.instance_host
        };
        let upload = if http_body::Body::is_end_stream(req.body()) {
            None
        } else {
            let upload = Upload::new(http_body::Body::size_hint(req.body()).exact());
            let body = std::mem::replace(req.body_mut(), RequestBody::Empty);
            *req.body_mut() = RequestBody::Tracked(Box::new(body), upload.clone());
            handover.carries(upload.clone());
            Some(upload)
        };
        // Pinned where it is: the timeout then holds a pointer to it instead of a copy.
        let sending = std::pin::pin!(host.send(req, handover));
        let sent = match &upload {
            None => tokio::time::timeout(self.response_timeout, sending)
                .await
                .map_err(|_| Stall::Response),
            // Boxed: the watch on an upload is the rarer path, and would make every request's
            // future larger.
            Some(upload) => Box::pin(unless_stalled(sending, upload, self.response_timeout)).await,
        };
        let broken = upload.as_deref().is_some_and(Upload::broken);
        match sent {
            Ok(Ok(resp)) => Ok(resp),
            // The client broke off its upload (hyper reports the body's error over HTTP/1.1,
            // only a reset stream over HTTP/2): not sent whole, not counted.
            Ok(Err(SendError::Exchange(e))) if broken => Err(ProxyError::ClientBody(e)),
            Ok(Err(source @ SendError::Refused(_))) => Err(ProxyError::NotProcessed {
                upstream: upstream(),
                source,
            }),
            Ok(Err(source)) if !source.maybe_sent() => Err(ProxyError::UpstreamConnect {
                upstream: upstream(),
                source,
            }),
            Ok(Err(source)) => Err(ProxyError::Upstream {
                upstream: upstream(),
                source,
            }),
            Err(Stall::Upload) => Err(ProxyError::UploadStalled {
                after: self.response_timeout,
            }),
            // Still connecting when the time ran out (a response timeout shorter than the
            // connect timeout): the call never left, so it is not counted.
            Err(Stall::Response) if !handover.happened() => Err(ProxyError::UpstreamConnect {
                upstream: upstream(),
                source: SendError::ConnectTimeout(self.response_timeout),
            }),
            Err(Stall::Response) => Err(ProxyError::UpstreamTimeout {
                upstream: upstream(),
                after: self.response_timeout,
            }),
        }
    }
}

/// `sending`'s outcome, unless the upload stalls first (see `Upload::stalled`).
async fn unless_stalled<F: std::future::Future>(
    sending: std::pin::Pin<&mut F>,
    upload: &Upload,
    timeout: Duration,
) -> Result<F::Output, Stall> {
    tokio::select! {
        biased;
        sent = sending => Ok(sent),
        stall = upload.stalled(timeout) => Err(stall),
    }
}
