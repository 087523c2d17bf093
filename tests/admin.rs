//! The admin listener's HTTP surface end to end: `HEAD` on every `GET` endpoint (HTTP/1.1 and
//! h2c), 405 with `Allow` for a known path and a wrong method, the limits on a request body,
//! and the 421 that names the listener's own address.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use bytes::Bytes;
use callmeter::sim::{self, SimOptions};
use callmeter::{app, config};
use common::*;
use http::{header, HeaderMap, Method, Request, StatusCode, Version};
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

const TOKEN: &str = "admin-t0ken";

/// What a test runs against; each part serves as long as it is held.
struct Running {
    server: app::Server,
    _sim: sim::SimHandle,
    _dir: tempfile::TempDir,
}

impl Running {
    /// The admin listener's base URL, on loopback (whatever address it is bound to).
    fn admin(&self) -> String {
        format!("http://127.0.0.1:{}", self.server.admin_addr.port())
    }
}

/// The proxy in front of a simulated org, with the admin token set; `proxy_extra`: more keys
/// of `[proxy]`, `admin_listen`: the admin listener's address.
async fn start(proxy_extra: &str, admin_listen: &str) -> Running {
    let sim = sim::spawn(SimOptions::default()).await.expect("sim");
    let dir = tempfile::tempdir().expect("tempdir");
    let toml = config_text(&sim.url, "", "")
        .replacen(
            "listen = \"127.0.0.1:0\"",
            &format!("listen = \"{admin_listen}\""),
            1,
        )
        .replace(
            "shutdown_grace = \"2s\"",
            &format!("shutdown_grace = \"2s\"\n{proxy_extra}"),
        )
        .replace(
            "STORE_PATH",
            &dir.path().join("callmeter.db").display().to_string(),
        );
    let env = |name: &str| (name == "CALLMETER_ADMIN_TOKEN").then(|| TOKEN.to_owned());
    let cfg = config::parse_with_env(&toml, Path::new("test.toml"), &env).expect("valid config");
    let server = app::start(&cfg).await.expect("proxy starts");
    Running {
        server,
        _sim: sim,
        _dir: dir,
    }
}

/// Every endpoint the admin listener answers `GET` on.
const GET_PATHS: [&str; 9] = [
    "/healthz",
    "/readyz",
    "/metrics",
    "/api/v1/usage",
    "/api/v1/deferred",
    "/",
    "/status.js",
    "/api/v1/history",
    "/api/v1/orgs/acme/threshold",
];

async fn exchange(
    client: &Client<HttpConnector, Empty<Bytes>>,
    method: Method,
    url: &str,
) -> (Version, StatusCode, HeaderMap, Bytes) {
    let req = Request::builder()
        .method(method)
        .uri(url)
        .body(Empty::new())
        .expect("request");
    let resp = client
        .request(req)
        .await
        .unwrap_or_else(|e| panic!("{url}: {e}"));
    let (parts, body) = resp.into_parts();
    let body = body.collect().await.expect("body").to_bytes();
    (parts.version, parts.status, parts.headers, body)
}

/// A health checker or monitor that probes with `HEAD` gets what `GET` answers, without the
/// body, over HTTP/1.1 and h2c alike. (`HEAD /healthz` was 404: the proxy looked down; over
/// h2c the console's pages, which took `HEAD`, sent their body and the client reset the stream.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_get_endpoint_answers_head_as_get_without_a_body() {
    let running = start("", "127.0.0.1:0").await;
    for (h2, version) in [(false, Version::HTTP_11), (true, Version::HTTP_2)] {
        let client = Client::builder(TokioExecutor::new())
            .http2_only(h2)
            .build(HttpConnector::new());
        for path in GET_PATHS {
            let url = format!("{}{path}", running.admin());
            let (_, get_status, get_headers, get_body) = exchange(&client, Method::GET, &url).await;
            assert_eq!(get_status, StatusCode::OK, "GET {path}");
            let (v, status, headers, body) = exchange(&client, Method::HEAD, &url).await;
            assert_eq!(v, version);
            assert_eq!(status, get_status, "HEAD {path} over {version:?}");
            assert!(
                body.is_empty(),
                "HEAD {path} over {version:?} came with a body"
            );
            assert_eq!(
                headers.get(header::CONTENT_TYPE),
                get_headers.get(header::CONTENT_TYPE),
                "HEAD {path}"
            );
            assert!(!get_body.is_empty(), "GET {path}");
        }
    }
}

/// A known path with a method it does not take answers 405 and says which it takes in
/// `Allow`, in the error shape of its part of the listener: plain text for `/metrics` and the
/// health checks, `{"error"}` for the usage and deferred-call API, `{"message"}` for the
/// console's. (`POST /api/v1/usage` and `GET /api/v1/deferred/1/retry` were 404 "not found".)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_method_on_a_known_path_is_405_with_allow() {
    let running = start("", "127.0.0.1:0").await;
    let http = Http::new();
    let get = "GET, HEAD";
    let cases: [(Method, &str, &str, &str); 13] = [
        (Method::POST, "/metrics", get, "text"),
        (Method::POST, "/healthz", get, "text"),
        (Method::DELETE, "/readyz", get, "text"),
        (Method::POST, "/api/v1/usage", get, "error"),
        (Method::DELETE, "/api/v1/deferred", get, "error"),
        (Method::GET, "/api/v1/deferred/1/retry", "POST", "error"),
        (Method::HEAD, "/api/v1/deferred/1/discard", "POST", "error"),
        (Method::PUT, "/api/v1/deferred/1/retry", "POST", "error"),
        (Method::POST, "/", get, "message"),
        (Method::POST, "/status.js", get, "message"),
        (Method::POST, "/api/v1/history", get, "message"),
        (
            Method::PATCH,
            "/api/v1/orgs/acme/threshold",
            "GET, HEAD, PUT, DELETE",
            "message",
        ),
        (
            Method::POST,
            "/api/v1/orgs/acme/threshold",
            "GET, HEAD, PUT, DELETE",
            "message",
        ),
    ];
    let call = |method: Method, path: &str| {
        let url = format!("{}{path}", running.admin());
        let http = http.clone();
        async move { http.send(method, &url, &[], Bytes::new()).await }
    };
    for (method, path, allow, shape) in cases {
        let what = format!("{method} {path}");
        let (status, headers, body) = call(method.clone(), path).await;
        assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED, "{what}: {body:?}");
        assert_eq!(
            headers.get(header::ALLOW).and_then(|v| v.to_str().ok()),
            Some(allow),
            "{what}"
        );
        let content_type = headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        if method == Method::HEAD {
            assert!(body.is_empty(), "{what}");
            continue;
        }
        if shape == "text" {
            assert!(
                content_type.starts_with("text/plain"),
                "{what}: {content_type}"
            );
            assert!(!body.is_empty(), "{what}");
        } else {
            assert_eq!(content_type, "application/json", "{what}");
            let json: serde_json::Value = serde_json::from_slice(&body).expect("JSON");
            assert!(json[shape].is_string(), "{what}: {json}");
        }
    }
    // Paths the listener does not serve stay 404, whatever the method.
    for (method, path) in [
        (Method::GET, "/nothing"),
        (Method::POST, "/nothing"),
        (Method::GET, "/api/v1/deferred/1/bogus"),
    ] {
        let (status, _, _) = call(method.clone(), path).await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{method} {path}");
    }
}

/// Writes `request` to `addr` on a new connection: all that comes back within 5 s, and how
/// long the answer took.
async fn raw_exchange(addr: &str, request: &str) -> (String, Duration) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let sent = Instant::now();
    tcp.write_all(request.as_bytes()).await.expect("write");
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), tcp.read_to_end(&mut out)).await;
    (String::from_utf8_lossy(&out).into_owned(), sent.elapsed())
}

fn threshold_put(content_length: u64, body: &str) -> String {
    format!(
        "PUT /api/v1/orgs/acme/threshold HTTP/1.1\r\nHost: 127.0.0.1\r\n\
         Authorization: Bearer {TOKEN}\r\nContent-Type: application/json\r\n\
         Content-Length: {content_length}\r\n\r\n{body}"
    )
}

/// A body declared larger than the API reads is refused before any of it is read, and one
/// that does not come within the listener's `header_timeout` is answered 408: neither holds
/// the connection (a `Content-Length: 999999999` with one byte sent hung for minutes).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_threshold_body_too_large_is_413_at_once_and_a_stalled_one_408() {
    let running = start("header_timeout = \"1s\"", "127.0.0.1:0").await;
    let addr = running.server.admin_addr.to_string();

    let (answer, took) = raw_exchange(&addr, &threshold_put(999_999_999, "{")).await;
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    assert!(answer.contains("65536"), "says the limit: {answer}");
    assert!(took < Duration::from_secs(1), "413 after {took:?}");

    let (answer, took) = raw_exchange(&addr, &threshold_put(100, "{")).await;
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("\"message\""), "{answer}");
    assert!(took >= Duration::from_millis(900), "408 after {took:?}");

    // One that declares no length is cut off where it passes the limit.
    let chunked = threshold_put(0, "").replace(
        "Content-Length: 0\r\n\r\n",
        &format!(
            "Transfer-Encoding: chunked\r\n\r\n11170\r\n{}",
            " ".repeat(70_000)
        ),
    );
    let (answer, _) = raw_exchange(&addr, &chunked).await;
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");

    // A body of the size it declares is read as before.
    let body = r#"{"levels": ["80%"], "notify": []}"#;
    let (answer, _) = raw_exchange(
        &addr,
        &threshold_put(body.len() as u64, body)
            .replace("\r\n\r\n", "\r\nConnection: close\r\n\r\n"),
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
}

/// The 421 tells the client how to reach the listener from this machine: by its own port, on
/// loopback when it is bound to every address (the message named 127.0.0.1:9464 whatever the
/// listener's address).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_421_names_the_admin_listeners_own_address() {
    for listen in ["127.0.0.1:0", "0.0.0.0:0"] {
        let running = start("", listen).await;
        let port = running.server.admin_addr.port();
        let (answer, _) = raw_exchange(
            &format!("127.0.0.1:{port}"),
            "GET /healthz HTTP/1.1\r\nHost: evil.com\r\nConnection: close\r\n\r\n",
        )
        .await;
        assert!(answer.starts_with("HTTP/1.1 421"), "{answer}");
        assert!(
            answer.contains(&format!("http://127.0.0.1:{port}/")),
            "{listen}: {answer}"
        );
    }
}
