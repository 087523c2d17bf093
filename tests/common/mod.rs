//! Shared set-up for the end-to-end tests: a simulated org, the real proxy in front of it on
//! ports picked by the OS, and a small HTTP client.
#![allow(dead_code)] // each test binary uses a different part of this module

pub mod smtp;

use std::path::Path;

use bytes::Bytes;
use callmeter::{app, config, sim};
use http::{HeaderMap, Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

pub struct Env {
    /// Holds the store's directory for the test's lifetime.
    pub dir: tempfile::TempDir,
    pub sim: sim::SimHandle,
    pub server: app::Server,
    /// Base URL of the proxy listener "main".
    pub proxy: String,
    /// Base URL of the admin listener.
    pub admin: String,
    pub http: Http,
}

/// Starts a simulated org and the proxy with `integrations` (TOML `[[integration]]` tables) and
/// `org_extra` (more keys of the `[[org]]` table).
pub async fn start(opts: sim::SimOptions, org_extra: &str, integrations: &str) -> Env {
    let sim = sim::spawn(opts).await.expect("simulator starts");
    let toml = config_text(&sim.url, org_extra, integrations);
    start_with(sim, &toml).await
}

pub fn config_text(upstream: &str, org_extra: &str, integrations: &str) -> String {
    format!(
        r#"
[admin]
listen = "127.0.0.1:0"

[store]
path = "STORE_PATH"

[proxy]
shutdown_grace = "2s"

[[listener]]
name = "main"
listen = "127.0.0.1:0"

[[org]]
id = "acme"
instance_url = "{upstream}"
allow_plain_http = true
{org_extra}

{integrations}
"#
    )
}

pub async fn start_with(sim: sim::SimHandle, toml: &str) -> Env {
    let dir = tempfile::tempdir().expect("tempdir");
    let toml = toml.replace(
        "STORE_PATH",
        &dir.path().join("callmeter.db").display().to_string(),
    );
    let cfg = config::parse(&toml, Path::new("test.toml")).expect("test config is valid");
    let server = app::start(&cfg).await.expect("proxy starts");
    let proxy = format!("http://{}", server.listener("main").expect("main listener"));
    let admin = format!("http://{}", server.admin_addr);
    Env {
        dir,
        sim,
        server,
        proxy,
        admin,
        http: Http::new(),
    }
}

impl Env {
    /// The simulator's own count (`/_sim/count`).
    pub async fn sim_count(&self) -> serde_json::Value {
        let (status, _, body) = self
            .http
            .get(&format!("{}/_sim/count", self.sim.url), &[])
            .await;
        assert_eq!(status, StatusCode::OK);
        serde_json::from_slice(&body).expect("sim count is JSON")
    }

    /// The proxy's `/api/v1/usage`.
    pub async fn usage(&self) -> serde_json::Value {
        let (status, _, body) = self
            .http
            .get(&format!("{}/api/v1/usage", self.admin), &[])
            .await;
        assert_eq!(status, StatusCode::OK);
        serde_json::from_slice(&body).expect("usage is JSON")
    }

    /// An integration's window count from `/api/v1/usage`.
    pub async fn window(&self, integration: &str) -> u64 {
        let usage = self.usage().await;
        usage["orgs"][0]["integrations"]
            .as_array()
            .expect("integrations")
            .iter()
            .find(|i| i["id"] == integration)
            .unwrap_or_else(|| panic!("integration {integration} in usage: {usage}"))["window"]
            .as_u64()
            .expect("window count")
    }

    pub async fn metrics(&self) -> String {
        let (status, _, body) = self.http.get(&format!("{}/metrics", self.admin), &[]).await;
        assert_eq!(status, StatusCode::OK);
        String::from_utf8(body.to_vec()).expect("metrics are UTF-8")
    }
}

/// A plain HTTP/1.1 client.
#[derive(Clone)]
pub struct Http {
    client: Client<HttpConnector, Full<Bytes>>,
}

impl Default for Http {
    fn default() -> Self {
        Self::new()
    }
}

impl Http {
    pub fn new() -> Self {
        Http {
            client: Client::builder(TokioExecutor::new()).build(HttpConnector::new()),
        }
    }

    pub async fn send(
        &self,
        method: Method,
        url: &str,
        headers: &[(&str, &str)],
        body: impl Into<Bytes>,
    ) -> (StatusCode, HeaderMap, Bytes) {
        let mut req = Request::builder().method(method).uri(url);
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let req = req.body(Full::new(body.into())).expect("request");
        let resp = self
            .client
            .request(req)
            .await
            .unwrap_or_else(|e| panic!("{url}: {e}"));
        let (parts, body) = resp.into_parts();
        let body = body.collect().await.expect("response body").to_bytes();
        (parts.status, parts.headers, body)
    }

    pub async fn get(&self, url: &str, headers: &[(&str, &str)]) -> (StatusCode, HeaderMap, Bytes) {
        self.send(Method::GET, url, headers, Bytes::new()).await
    }
}

pub const SOAP_LOGIN: &str = r#"<?xml version="1.0" encoding="utf-8"?><soapenv:Envelope xmlns:soapenv="http://schemas.xmlsoap.org/soap/envelope/" xmlns:urn="urn:partner.soap.sforce.com"><soapenv:Body><urn:login><urn:username>u@example.com</urn:username><urn:password>secret</urn:password></urn:login></soapenv:Body></soapenv:Envelope>"#;

pub const SOAP_QUERY: &str = r#"<?xml version="1.0" encoding="utf-8"?><soapenv:Envelope xmlns:soapenv="http://schemas.xmlsoap.org/soap/envelope/" xmlns:urn="urn:partner.soap.sforce.com"><soapenv:Header><urn:SessionHeader><urn:sessionId>00Dx!AQ</urn:sessionId></urn:SessionHeader></soapenv:Header><soapenv:Body><urn:query><urn:queryString>SELECT Id FROM Lead</urn:queryString></urn:query></soapenv:Body></soapenv:Envelope>"#;

pub fn soap_headers(action: &'static str) -> [(&'static str, &'static str); 2] {
    [
        ("content-type", "text/xml; charset=utf-8"),
        ("soapaction", action),
    ]
}

/// `batchRequests` with `n` subrequests.
pub fn composite_batch(n: usize) -> String {
    let subs: Vec<String> = (0..n)
        .map(|i| format!(r#"{{"method":"GET","url":"v62.0/sobjects/Account/001{i:015}"}}"#))
        .collect();
    format!(r#"{{"batchRequests":[{}]}}"#, subs.join(","))
}

/// Extracts the text of the first `<tag>` element.
pub fn xml_text<'a>(xml: &'a str, tag: &str) -> Option<&'a str> {
    let open = format!("<{tag}>");
    let close = format!("</{tag}>");
    let start = xml.find(&open)? + open.len();
    let end = xml[start..].find(&close)? + start;
    Some(&xml[start..end])
}

/// Polls `check` every 50 ms until it holds or `secs` pass.
pub async fn eventually<F, Fut>(secs: u64, what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(secs);
    while !check().await {
        assert!(
            std::time::Instant::now() < deadline,
            "timed out waiting for: {what}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

/// A raw TCP origin on a free port: each connection it accepts goes to `serve`, in a task.
pub async fn raw_origin<F, Fut>(serve: F) -> u16
where
    F: Fn(tokio::net::TcpStream) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let port = listener.local_addr().expect("addr").port();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            tokio::spawn(serve(tcp));
        }
    });
    port
}

/// An origin that accepts connections and never says a word (a TLS handshake that never
/// finishes); its port.
pub async fn silent_origin() -> u16 {
    raw_origin(|tcp| async move {
        tokio::time::sleep(std::time::Duration::from_secs(60)).await;
        drop(tcp);
    })
    .await
}

/// A child process killed on drop, so a failing test leaves nothing behind.
pub struct Proc(pub std::process::Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A free port of 127.0.0.1 for a process that cannot be told to bind port 0, or for a server a
/// test stops and starts again on the same port.
///
/// A port the OS picked (bind port 0) and that is then closed can be handed out again at once,
/// as the local port of any outgoing connection of a test running beside it; the server that
/// binds it a moment later then fails with "address in use". So the ports come from below the
/// kernel's ephemeral range, which neither outgoing connections nor port 0 draw from, each one
/// once per test process (a counter), starting at an offset of the process id so that two test
/// processes side by side start apart; each is checked free by binding it.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    const LOW: u32 = 10_000;
    let ephemeral_start = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|range| range.split_whitespace().next()?.parse::<u32>().ok())
        .unwrap_or(32_768);
    let span = ephemeral_start.saturating_sub(LOW);
    if span < 1_000 {
        // No room below the ephemeral range: let the OS pick.
        return std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("bind 127.0.0.1:0")
            .port();
    }
    let start = std::process::id().wrapping_mul(7_919) % span;
    for _ in 0..span {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let port = u16::try_from(LOW + (start + n) % span).expect("below the ephemeral range");
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free port between {LOW} and {ephemeral_start}");
}

impl Env {
    /// A raw TCP connection to the proxy listener "main", for requests written by hand.
    pub async fn tcp(&self) -> tokio::net::TcpStream {
        let addr = self.proxy.trim_start_matches("http://");
        tokio::net::TcpStream::connect(addr)
            .await
            .expect("connect to the proxy")
    }

    /// Sends the SOAP `query()` call to org `00D000000000001AAA` through `prefix`.
    pub async fn soap_query(&self, prefix: &str) -> (StatusCode, HeaderMap, Bytes) {
        let url = format!(
            "{}{prefix}/services/Soap/u/62.0/00D000000000001AAA",
            self.proxy
        );
        self.http
            .send(Method::POST, &url, &soap_headers("query"), SOAP_QUERY)
            .await
    }
}

/// Sends `GET /a/services/data/v62.0/sobjects` (closing the connection after it) on a TLS
/// `stream` and returns the whole answer as text.
pub async fn get_over_tls(
    stream: &mut tokio_rustls::client::TlsStream<tokio::net::TcpStream>,
) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    stream
        .write_all(b"GET /a/services/data/v62.0/sobjects HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .await
        .expect("write");
    let mut answer = Vec::new();
    // A TLS peer that closes without close_notify is an error here, after the answer.
    let _ = stream.read_to_end(&mut answer).await;
    String::from_utf8_lossy(&answer).into_owned()
}
