//! End-to-end: HTTP/2 over TLS, h2c, chunked and large streamed uploads and downloads,
//! malformed requests, and the message handling an intermediary must get right.

mod common;

use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use callmeter::sim::{self, SimOptions};
use common::*;
use futures_util::stream;
use http::{Method, Request, StatusCode, Version};
use http_body_util::{BodyExt, Empty, StreamBody};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const ONE: &str = "[[integration]]\nid = \"a\"\norg = \"acme\"\nmatch = { path_prefix = \"/a\" }\n";

#[tokio::test]
async fn h2c_prior_knowledge() {
    let env = start(SimOptions::default(), "", ONE).await;
    let client = Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build(HttpConnector::new());
    let req = Request::get(format!("{}/a/services/data/v62.0/sobjects", env.proxy))
        .body(Empty::<Bytes>::new())
        .expect("request");
    let resp = client.request(req).await.expect("h2c response");
    assert_eq!(resp.version(), Version::HTTP_2);
    assert_eq!(resp.status(), StatusCode::OK);
    assert!(resp.headers().contains_key("sforce-limit-info"));
    assert_eq!(env.window("a").await, 1);
}

#[tokio::test]
async fn http2_over_tls_with_alpn() {
    let dir = tempfile::tempdir().expect("tempdir");
    let tls = TestTls::new(dir.path());

    let sim = sim::spawn(SimOptions::default()).await.expect("sim");
    let toml = tls.on_listener(&config_text(&sim.url, "", ONE));
    let env = start_with(sim, &toml).await;
    let port = env.server.listener("main").expect("listener").port();

    let mut roots = rustls::RootCertStore::empty();
    roots.add(tls.cert.clone()).expect("root");
    let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("versions")
    .with_root_certificates(roots)
    .with_no_client_auth();
    for (h2, version) in [(true, Version::HTTP_2), (false, Version::HTTP_11)] {
        let builder = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls.clone())
            .https_only();
        let connector = if h2 {
            builder.enable_http2().build()
        } else {
            builder.enable_http1().build()
        };
        let client = Client::builder(TokioExecutor::new())
            .http2_only(h2)
            .build(connector);
        let req = Request::get(format!(
            "https://localhost:{port}/a/services/data/v62.0/sobjects"
        ))
        .body(Empty::<Bytes>::new())
        .expect("request");
        let resp = client.request(req).await.expect("TLS response");
        assert_eq!(resp.version(), version);
        assert_eq!(resp.status(), StatusCode::OK);
    }
    // A client that offers no ALPN at all speaks HTTP/1.1.
    let connector = tokio_rustls::TlsConnector::from(Arc::new(tls));
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect");
    let name = rustls_pki_types::ServerName::try_from("localhost").expect("name");
    let mut stream = connector.connect(name, tcp).await.expect("TLS handshake");
    assert_eq!(stream.get_ref().1.alpn_protocol(), None);
    let answer = get_over_tls(&mut stream).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");

    assert_eq!(env.window("a").await, 3);
    assert_eq!(env.usage().await["orgs"][0]["used"], 3);
}

/// Salesforce is reached over TLS, where ALPN picks HTTP/2: an "edge" proxy sends to a
/// "front" proxy that terminates TLS with a test CA (`upstream_ca`) and forwards to the
/// simulator. Sequential and concurrent calls, with and without bodies, arrive counted on both.
#[tokio::test]
async fn tls_upstream_with_a_private_ca() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (front, edge) = edge_and_front(dir.path()).await;

    let url = format!("{}/e/services/data/v62.0/sobjects", edge.proxy);
    let (status, headers, _) = edge.http.get(&url, &[]).await;
    assert_eq!(status, StatusCode::OK);
    assert!(headers.contains_key("sforce-limit-info"));
    let calls = (0..8).map(|_| edge.http.get(&url, &[]));
    for (status, _, _) in futures_util::future::join_all(calls).await {
        assert_eq!(status, StatusCode::OK);
    }
    let composite = format!("{}/e/services/data/v62.0/composite/batch", edge.proxy);
    let (status, _, _) = edge
        .http
        .send(
            Method::POST,
            &composite,
            &[("content-type", "application/json")],
            composite_batch(3),
        )
        .await;
    assert_eq!(status, StatusCode::OK);

    assert_eq!(edge.window("e").await, 12);
    assert_eq!(front.window("a").await, 12);
    // Salesforce's usage reports reach the edge through the TLS hop.
    assert_eq!(front.sim_count().await["used"], 12);
    let usage = edge.usage().await;
    assert_eq!(usage["orgs"][0]["used"], 12, "{usage}");
}

/// A "front" proxy with a TLS listener (ALPN h2) for all of its traffic, in front of a
/// simulated org, and an "edge" proxy whose integration `e` (prefix `/e`) has the front as
/// its Salesforce: the edge reaches its upstream over TLS and HTTP/2, as it reaches Salesforce.
async fn edge_and_front(dir: &std::path::Path) -> (Env, Env) {
    let tls = TestTls::new(dir);
    let sim = sim::spawn(SimOptions::default()).await.expect("sim");
    let whole_listener =
        "[[integration]]\nid = \"a\"\norg = \"acme\"\nmatch = { listener = \"main\" }\n";
    let front_toml = tls.on_listener(&config_text(&sim.url, "", whole_listener));
    let front = start_with(sim, &front_toml).await;
    let front_port = front.server.listener("main").expect("listener").port();
    let edge_sim = sim::spawn(SimOptions::default()).await.expect("sim");
    let edge_toml = config_text(
        &format!("https://localhost:{front_port}"),
        &format!("upstream_ca = \"{}\"", tls.cert_path.display()),
        "[[integration]]\nid = \"e\"\norg = \"acme\"\nmatch = { path_prefix = \"/e\" }\n",
    );
    (front, start_with(edge_sim, &edge_toml).await)
}

/// A self-signed certificate for "localhost", written as PEM files for a listener's `tls`.
struct TestTls {
    cert: rustls_pki_types::CertificateDer<'static>,
    cert_path: std::path::PathBuf,
    key_path: std::path::PathBuf,
}

impl TestTls {
    fn new(dir: &std::path::Path) -> Self {
        let cert = rcgen::generate_simple_self_signed(vec!["localhost".into()]).expect("cert");
        let cert_path = dir.join("cert.pem");
        let key_path = dir.join("key.pem");
        std::fs::write(&cert_path, cert.cert.pem()).expect("write cert");
        std::fs::write(&key_path, cert.signing_key.serialize_pem()).expect("write key");
        TestTls {
            cert: cert.cert.der().clone(),
            cert_path,
            key_path,
        }
    }

    /// `toml` (from `config_text`) with its listener serving TLS with this certificate.
    fn on_listener(&self, toml: &str) -> String {
        let with_tls = toml.replace(
            "listen = \"127.0.0.1:0\"\n\n[[org]]",
            &format!(
                "listen = \"127.0.0.1:0\"\ntls = {{ cert = \"{}\", key = \"{}\" }}\n\n[[org]]",
                self.cert_path.display(),
                self.key_path.display()
            ),
        );
        assert!(with_tls.contains("tls = "), "the test config has TLS");
        with_tls
    }
}

/// Streams `total` bytes in `chunk`-sized frames, with no Content-Length: chunked on HTTP/1.1.
fn streamed(
    total: usize,
    chunk: usize,
) -> StreamBody<impl futures_util::Stream<Item = Result<http_body::Frame<Bytes>, Infallible>>> {
    let block = Bytes::from(vec![b'x'; chunk]);
    let frames = total / chunk;
    StreamBody::new(stream::iter(
        (0..frames).map(move |_| Ok(http_body::Frame::data(block.clone()))),
    ))
}

#[tokio::test]
async fn chunked_and_large_uploads_stream_through_whole() {
    let env = start(SimOptions::default(), "", ONE).await;
    let client = Client::builder(TokioExecutor::new()).build(HttpConnector::new());
    // A Bulk API 1.0 batch upload, 64 MiB, chunked.
    let total = 64 * 1024 * 1024;
    let req = Request::builder()
        .method(Method::POST)
        .uri(format!(
            "{}/a/services/async/62.0/job/750000000000001/batch",
            env.proxy
        ))
        .header("content-type", "text/csv")
        .body(streamed(total, 64 * 1024))
        .expect("request");
    let resp = client.request(req).await.expect("response");
    let status = resp.status();
    let received = resp.headers().get("x-sim-body-bytes").cloned();
    let body = resp.into_body().collect().await.expect("body").to_bytes();
    assert!(
        status.is_success(),
        "{status}: {}",
        String::from_utf8_lossy(&body)
    );
    assert_eq!(
        received.expect("x-sim-body-bytes").to_str().expect("str"),
        total.to_string()
    );

    // Composite batch sent chunked: the proxy reads the body prefix to count subrequests and
    // forwards all of it.
    let batch = Bytes::from(composite_batch(4));
    let len = batch.len();
    let frames: Vec<Result<http_body::Frame<Bytes>, Infallible>> = batch
        .chunks(10)
        .map(|c| Ok(http_body::Frame::data(Bytes::copy_from_slice(c))))
        .collect();
    let req = Request::post(format!(
        "{}/a/services/data/v62.0/composite/batch",
        env.proxy
    ))
    .header("content-type", "application/json")
    .body(StreamBody::new(stream::iter(frames)))
    .expect("request");
    let client = Client::builder(TokioExecutor::new()).build(HttpConnector::new());
    let resp = client.request(req).await.expect("response");
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(
        resp.headers()["x-sim-body-bytes"].to_str().expect("str"),
        len.to_string()
    );
    assert_eq!(env.window("a").await, 1 + 4);
    assert_eq!(env.sim_count().await["used"], 5);
}

/// The frames of a large Bulk query result: odd sizes (from 1 byte to more than the proxy's
/// write buffer) so that the proxy's buffering of response bodies meets every case, each
/// frame filled with its own byte so that a lost, repeated or reordered frame shows.
fn result_frames() -> Vec<Bytes> {
    const SIZES: [usize; 6] = [1, 100, 65_536, 300_000, 7, 16_384];
    (0..240)
        .map(|i| Bytes::from(vec![b'a' + (i % 26) as u8; SIZES[i % SIZES.len()]]))
        .collect()
}

#[tokio::test]
async fn large_responses_stream_through_whole() {
    use hyper::service::service_fn;
    use hyper_util::rt::TokioIo;

    // An origin answering every request with the frames above, chunked, and a usage report.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let origin = format!("http://{}", listener.local_addr().expect("addr"));
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let service = service_fn(|_req: Request<hyper::body::Incoming>| async {
                let frames = result_frames()
                    .into_iter()
                    .map(|b| Ok::<_, Infallible>(http_body::Frame::data(b)));
                let resp = http::Response::builder()
                    .header("content-type", "text/csv")
                    .header("sforce-limit-info", "api-usage=7/15000")
                    .body(StreamBody::new(stream::iter(frames)))
                    .expect("response");
                Ok::<_, Infallible>(resp)
            });
            tokio::spawn(async move {
                let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
                let _ = builder.serve_connection(TokioIo::new(tcp), service).await;
            });
        }
    });
    let sim = sim::spawn(SimOptions::default()).await.expect("sim");
    let env = start_with(sim, &config_text(&origin, "", ONE)).await;

    let expected: Vec<u8> = result_frames().concat();
    // One client connection: after a large body it carries the next request as well.
    let client = Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(1)
        .build(HttpConnector::new());
    let url = format!(
        "{}/a/services/data/v62.0/jobs/query/750000000000001/results",
        env.proxy
    );
    for _ in 0..2 {
        let resp = client
            .request(Request::get(&url).body(Empty::<Bytes>::new()).expect("req"))
            .await
            .expect("response");
        assert_eq!(resp.status(), StatusCode::OK);
        assert_eq!(resp.version(), Version::HTTP_11);
        let body = resp.into_body().collect().await.expect("body").to_bytes();
        assert_eq!(body.len(), expected.len());
        assert!(body == expected, "the body arrived altered");
    }
    assert_eq!(env.usage().await["orgs"][0]["reported_used"], 7);
}

/// Sends raw bytes and returns the status line of the answer.
async fn raw(addr: &str, request: &[u8]) -> String {
    let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    stream.write_all(request).await.expect("write");
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(std::time::Duration::from_secs(5), stream.read(&mut buf))
        .await
        .expect("answer in time")
        .unwrap_or(0);
    String::from_utf8_lossy(&buf[..n])
        .lines()
        .next()
        .unwrap_or("")
        .to_owned()
}

#[tokio::test]
async fn malformed_requests_get_4xx_and_the_server_keeps_serving() {
    let env = start(SimOptions::default(), "", ONE).await;
    let addr = env.proxy.trim_start_matches("http://").to_owned();

    let bad_header = raw(
        &addr,
        b"GET /a/services/data/ HTTP/1.1\r\nHost: x\r\nBad Header Line\r\n\r\n",
    )
    .await;
    assert!(bad_header.starts_with("HTTP/1.1 400"), "{bad_header}");

    let mut huge = b"GET /a/services/data/ HTTP/1.1\r\nHost: x\r\nX-Big: ".to_vec();
    huge.extend(std::iter::repeat_n(b'a', 200 * 1024));
    huge.extend_from_slice(b"\r\n\r\n");
    let too_big = raw(&addr, &huge).await;
    assert!(too_big.starts_with("HTTP/1.1 431"), "{too_big}");

    let bad_uri = raw(
        &addr,
        b"GET /a/serv ices/<>\x01 HTTP/1.1\r\nHost: x\r\n\r\n",
    )
    .await;
    assert!(bad_uri.starts_with("HTTP/1.1 400"), "{bad_uri}");

    let garbage = raw(
        &addr,
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03garbage\r\n\r\n",
    )
    .await;
    assert!(
        garbage.is_empty() || garbage.starts_with("HTTP/1.1 400"),
        "{garbage}"
    );

    let (status, _, _) = env
        .http
        .get(
            &format!("{}/a/services/data/v62.0/sobjects", env.proxy),
            &[],
        )
        .await;
    assert_eq!(status, StatusCode::OK, "still serving");
    assert_eq!(env.window("a").await, 1);
}

/// Reads until the proxy closes the connection; returns what came and when the end came.
async fn read_to_close(stream: &mut tokio::net::TcpStream) -> (Vec<u8>, std::time::Instant) {
    let mut got = Vec::new();
    tokio::time::timeout(
        std::time::Duration::from_secs(10),
        stream.read_to_end(&mut got),
    )
    .await
    .expect("the proxy closes the connection")
    .ok(); // a reset is a close too
    (got, std::time::Instant::now())
}

#[tokio::test]
async fn slow_request_heads_and_idle_connections_are_closed_after_the_header_timeout() {
    use std::time::{Duration, Instant};
    let sim = sim::spawn(SimOptions::default()).await.expect("sim");
    let toml = config_text(&sim.url.clone(), "", ONE).replace(
        "shutdown_grace = \"2s\"",
        "shutdown_grace = \"2s\"\nheader_timeout = \"2s\"",
    );
    let env = start_with(sim, &toml).await;
    let addr = env.proxy.trim_start_matches("http://").to_owned();
    let request = b"GET /a/services/data/v62.0/limits HTTP/1.1\r\nHost: x\r\n\r\n";

    // A head that never ends (slowloris): closed after the timeout, nothing forwarded.
    let mut slow = tokio::net::TcpStream::connect(&addr)
        .await
        .expect("connect");
    let started = Instant::now();
    slow.write_all(b"GET /a/services/data/v62.0/limits HTTP/1.1\r\nHost: x\r\n")
        .await
        .expect("write");
    let (answer, closed) = read_to_close(&mut slow).await;
    let waited = closed - started;
    assert!(
        waited >= Duration::from_millis(1500),
        "closed after {waited:?}"
    );
    let answer = String::from_utf8_lossy(&answer);
    assert!(
        answer.is_empty() || answer.starts_with("HTTP/1.1 408"),
        "{answer}"
    );

    // A connection that sends nothing at all: closed after the timeout too.
    let mut silent = tokio::net::TcpStream::connect(&addr)
        .await
        .expect("connect");
    let started = Instant::now();
    let (answer, closed) = read_to_close(&mut silent).await;
    let waited = closed - started;
    assert!(
        waited >= Duration::from_millis(1500),
        "closed after {waited:?}"
    );
    assert!(answer.is_empty(), "{}", String::from_utf8_lossy(&answer));

    // A connection that sends a request every 600 ms lives well past the 2 s timeout, since
    // each request head restarts it; once idle it is closed after the timeout. (600 ms leaves
    // a wide margin for a loaded CI machine.)
    let mut busy = tokio::net::TcpStream::connect(&addr)
        .await
        .expect("connect");
    let mut buf = vec![0u8; 64 * 1024];
    let mut answered = Instant::now();
    for _ in 0..7 {
        busy.write_all(request)
            .await
            .expect("write on a live connection");
        let n = tokio::time::timeout(Duration::from_secs(5), busy.read(&mut buf))
            .await
            .expect("answer in time")
            .expect("read");
        assert!(
            buf[..n].starts_with(b"HTTP/1.1 200"),
            "{}",
            String::from_utf8_lossy(&buf[..n])
        );
        answered = Instant::now();
        tokio::time::sleep(Duration::from_millis(600)).await;
    }
    // From the last answer: a sleep that overran does not shorten the idle time measured.
    let (_, closed) = read_to_close(&mut busy).await;
    let idle = closed - answered;
    assert!(
        idle >= Duration::from_millis(1500) && idle < Duration::from_secs(8),
        "idle connection closed after {idle:?}"
    );
    assert_eq!(
        env.sim_count().await["used"],
        7,
        "the slow head was not forwarded"
    );
}

/// HTTP/2 has no request-head timer in hyper: the proxy closes an h2c connection that has had
/// no request in flight for `header_timeout` (a GOAWAY, then the close), while one whose
/// request takes longer than that is left to finish it.
#[tokio::test]
async fn idle_http2_connections_are_closed_after_the_header_timeout() {
    use std::time::{Duration, Instant};
    let sim = sim::spawn(SimOptions::default()).await.expect("sim");
    let toml = config_text(&sim.url.clone(), "", ONE).replace(
        "shutdown_grace = \"2s\"",
        "shutdown_grace = \"2s\"\nheader_timeout = \"1s\"",
    );
    let env = start_with(sim, &toml).await;
    let addr = env.proxy.trim_start_matches("http://").to_owned();

    // The preface and then nothing: closed after the timeout.
    let mut silent = tokio::net::TcpStream::connect(&addr)
        .await
        .expect("connect");
    let started = Instant::now();
    silent
        .write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
        .await
        .expect("preface");
    let (_, closed) = read_to_close(&mut silent).await;
    let waited = closed - started;
    assert!(
        // Not at once (the timeout is 1 s; the lower bound leaves room for a loaded machine).
        waited >= Duration::from_millis(500) && waited < Duration::from_secs(8),
        "closed after {waited:?}"
    );

    // A request that takes twice the timeout is answered; the connection closes once idle.
    let (mut send, driver) = h2c_connect(&addr).await;
    let req = Request::get(format!("http://{addr}/a/services/data/v62.0/limits"))
        .header("x-sim-delay-ms", "2000")
        .body(Empty::new())
        .expect("request");
    let resp = send.send_request(req).await.expect("slow response");
    assert_eq!(resp.status(), StatusCode::OK);
    let idle_since = Instant::now();
    tokio::time::timeout(Duration::from_secs(10), driver)
        .await
        .expect("the idle connection is closed")
        .expect("driver task")
        .ok();
    let idle = idle_since.elapsed();
    assert!(
        idle >= Duration::from_millis(500),
        "closed after {idle:?} idle"
    );
}

/// A client that breaks off its upload to a proxy whose upstream speaks HTTP/2 (TLS, ALPN, as
/// Salesforce does) gets a 400, and the call is not counted: HTTP/2 reports only a reset
/// stream upstream, yet Salesforce never had the whole request.
#[tokio::test]
async fn an_upload_broken_off_towards_an_http2_upstream_is_not_counted() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (_front, edge) = edge_and_front(dir.path()).await;
    // One call first, so that the edge holds its HTTP/2 connection to the front.
    let url = format!("{}/e/services/data/v62.0/sobjects", edge.proxy);
    assert_eq!(edge.http.get(&url, &[]).await.0, StatusCode::OK);

    let mut tcp = edge.tcp().await;
    tcp.write_all(
        b"POST /e/services/data/v62.0/sobjects/Contact HTTP/1.1\r\nhost: x\r\n\
          content-type: application/json\r\ncontent-length: 100\r\n\r\n{\"LastName\"",
    )
    .await
    .expect("write");
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    tcp.shutdown().await.expect("half-close");
    let (answer, _) = read_to_close(&mut tcp).await;
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    assert_eq!(edge.window("e").await, 1, "only the first call counts");
}

/// An HTTP/2 client that resets its stream while the proxy is still connecting upstream (here a
/// TLS handshake that never finishes): the call never left the proxy, so it is refunded.
#[tokio::test]
async fn a_call_cancelled_while_connecting_upstream_is_not_counted() {
    let upstream = format!("https://127.0.0.1:{}", silent_origin().await);
    let sim = sim::spawn(SimOptions::default()).await.expect("sim");
    let toml = config_text(&upstream, "connect_timeout = \"30s\"", ONE);
    let env = start_with(sim, &toml).await;
    cancel_once_counted(&env, Request::get("/a/services/data/v62.0/limits"), false).await;
    eventually(10, "the cancelled call refunded", || async {
        env.window("a").await == 0
    })
    .await;
}

/// A call cancelled once Salesforce has it (the simulated org answers after 2 s) stays counted:
/// only a call that never reached an upstream connection is refunded.
#[tokio::test]
async fn a_call_cancelled_after_it_went_upstream_stays_counted() {
    let env = start(SimOptions::default(), "", ONE).await;
    let req = Request::get("/a/services/data/v62.0/limits").header("x-sim-delay-ms", "2000");
    cancel_once_counted(&env, req, true).await;
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    assert_eq!(env.window("a").await, 1);
}

/// Sends `req` (its URI a path) to the proxy over h2c and resets the stream once the proxy has
/// counted the call and, with `at_sim`, the simulated org has received it.
async fn cancel_once_counted(env: &Env, req: http::request::Builder, at_sim: bool) {
    let addr = env.proxy.trim_start_matches("http://").to_owned();
    let (mut send, _driver) = h2c_connect(&addr).await;
    let path = req.uri_ref().expect("path").to_string();
    let req = req
        .uri(format!("http://{addr}{path}"))
        .body(Empty::new())
        .expect("request");
    let waiting = tokio::spawn(send.send_request(req));
    eventually(10, "the call counted while it waits", || async {
        env.window("a").await == 1 && (!at_sim || env.sim_count().await["requests"] == 1)
    })
    .await;
    waiting.abort(); // the client resets the stream
}

/// An h2c connection (prior knowledge) to `addr`: its sender, and the task driving it.
async fn h2c_connect(
    addr: &str,
) -> (
    hyper::client::conn::http2::SendRequest<Empty<Bytes>>,
    tokio::task::JoinHandle<hyper::Result<()>>,
) {
    let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let (send, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
        .handshake(hyper_util::rt::TokioIo::new(tcp))
        .await
        .expect("h2c handshake");
    (send, tokio::spawn(conn))
}

/// Trailers pass in both directions: `Trailer` names fields that follow the body, and travels
/// with the message (RFC 9110 6.6.2); without it hyper's HTTP/1 encoder drops the fields.
#[tokio::test]
async fn trailers_pass_both_ways() {
    let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
    let port = {
        let seen = seen.clone();
        raw_origin(move |mut tcp| {
            let seen = seen.clone();
            async move {
                let mut got = Vec::new();
                let mut buf = [0u8; 4096];
                // The request ends with its (chunked) trailer section.
                while !got.ends_with(b"\r\n\r\n") || !got.windows(5).any(|w| w == b"\r\n0\r\n") {
                    match tcp.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => got.extend_from_slice(&buf[..n]),
                    }
                }
                seen.lock().expect("lock").push(got);
                let _ = tcp
                    .write_all(
                        b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n\
                          transfer-encoding: chunked\r\ntrailer: x-checksum\r\n\r\n\
                          2\r\n{}\r\n0\r\nx-checksum: abc\r\n\r\n",
                    )
                    .await;
            }
        })
        .await
    };
    let sim = sim::spawn(SimOptions::default()).await.expect("sim");
    let env = start_with(
        sim,
        &config_text(&format!("http://127.0.0.1:{port}"), "", ONE),
    )
    .await;
    let mut tcp = env.tcp().await;
    tcp.write_all(
        b"POST /a/services/data/v62.0/sobjects/Contact HTTP/1.1\r\nhost: x\r\n\
          content-type: application/json\r\ntransfer-encoding: chunked\r\n\
          trailer: x-request-sum\r\nte: trailers\r\nconnection: close\r\n\r\n\
          2\r\n{}\r\n0\r\nx-request-sum: def\r\n\r\n",
    )
    .await
    .expect("request");
    let (answer, _) = read_to_close(&mut tcp).await;
    let answer = String::from_utf8_lossy(&answer).to_ascii_lowercase();
    assert!(answer.starts_with("http/1.1 200"), "{answer}");
    assert!(
        answer.contains("x-checksum: abc"),
        "response trailer lost:\n{answer}"
    );
    let request = String::from_utf8_lossy(&seen.lock().expect("lock")[0]).to_ascii_lowercase();
    assert!(
        request.contains("x-request-sum: def"),
        "request trailer lost:\n{request}"
    );
}

/// An HTTP/2 client that resets its stream mid-upload (RST_STREAM after part of the body):
/// Salesforce never had the whole request, as for an HTTP/1.1 client that breaks off its
/// upload, so the call does not stay counted.
#[tokio::test]
async fn an_http2_upload_reset_mid_body_is_not_counted() {
    let got = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let port = {
        let got = got.clone();
        raw_origin(move |mut tcp| {
            let got = got.clone();
            async move {
                // Reads the head and whatever of the body comes; never answers.
                let mut buf = [0u8; 4096];
                loop {
                    match tcp.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => {
                            got.fetch_add(n, std::sync::atomic::Ordering::SeqCst);
                        }
                    }
                }
            }
        })
        .await
    };
    let sim = sim::spawn(SimOptions::default()).await.expect("sim");
    let env = start_with(
        sim,
        &config_text(&format!("http://127.0.0.1:{port}"), "", ONE),
    )
    .await;
    let addr = env.proxy.trim_start_matches("http://").to_owned();
    let tcp = tokio::net::TcpStream::connect(&addr)
        .await
        .expect("connect");
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<http_body::Frame<Bytes>, std::io::Error>>(4);
    let body = StreamBody::new(Box::pin(stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|item| (item, rx))
    })));
    let (mut send, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
        .handshake(hyper_util::rt::TokioIo::new(tcp))
        .await
        .expect("h2c handshake");
    let _driver = tokio::spawn(conn);
    let req = Request::post(format!(
        "http://{addr}/a/services/data/v62.0/sobjects/Contact"
    ))
    .header("content-type", "application/json")
    .body(body)
    .expect("request");
    let waiting = tokio::spawn(send.send_request(req));
    tx.send(Ok(http_body::Frame::data(Bytes::from_static(
        b"{\"LastName\"",
    ))))
    .await
    .expect("first chunk");
    eventually(10, "the call counted and its body upstream", || async {
        env.window("a").await == 1 && got.load(std::sync::atomic::Ordering::SeqCst) > 0
    })
    .await;
    // The client breaks off: hyper resets the stream (RST_STREAM) on a body error.
    tx.send(Err(std::io::Error::other("client gives up")))
        .await
        .expect("error");
    let _ = tokio::time::timeout(std::time::Duration::from_secs(5), waiting).await;
    eventually(5, "the broken-off upload refunded", || async {
        env.window("a").await == 0
    })
    .await;
}

/// A TLS origin on a free port, with `alpn`, certified by `tls`: each connection, once its
/// handshake is done, goes to `serve`.
async fn tls_origin<F, Fut>(tls: &TestTls, alpn: &[&[u8]], serve: F) -> u16
where
    F: Fn(tokio_rustls::server::TlsStream<tokio::net::TcpStream>) -> Fut
        + Clone
        + Send
        + Sync
        + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    use rustls_pki_types::pem::PemObject;
    let key = rustls_pki_types::PrivateKeyDer::from_pem_file(&tls.key_path).expect("key");
    let mut server = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("versions")
    .with_no_client_auth()
    .with_single_cert(vec![tls.cert.clone()], key)
    .expect("server config");
    server.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server));
    raw_origin(move |tcp| {
        let (acceptor, serve) = (acceptor.clone(), serve.clone());
        async move {
            if let Ok(stream) = acceptor.accept(tcp).await {
                serve(stream).await;
            }
        }
    })
    .await
}

/// The proxy (integration `a`) in front of the TLS origin on `port`, trusting `tls`'s CA.
async fn proxy_for_tls(port: u16, tls: &TestTls) -> Env {
    let sim = sim::spawn(SimOptions::default()).await.expect("sim");
    let toml = config_text(
        &format!("https://localhost:{port}"),
        &format!("upstream_ca = \"{}\"", tls.cert_path.display()),
        ONE,
    );
    start_with(sim, &toml).await
}

/// Salesforce (HTTP/2 over TLS) refuses a stream with REFUSED_STREAM, which guarantees it did
/// no processing (RFC 9113 8.7): the call is not counted, and the client is told so (it was
/// answered "may have been processed and stays counted", and the call counted).
#[tokio::test]
async fn a_stream_refused_by_an_http2_upstream_is_not_counted() {
    let dir = tempfile::tempdir().expect("tempdir");
    let tls = TestTls::new(dir.path());
    let port = tls_origin(&tls, &[b"h2"], |stream| async move {
        let Ok(mut conn) = h2::server::handshake(stream).await else {
            return;
        };
        while let Some(Ok((_req, mut respond))) = conn.accept().await {
            respond.send_reset(h2::Reason::REFUSED_STREAM);
        }
    })
    .await;
    let env = proxy_for_tls(port, &tls).await;
    let url = format!("{}/a/services/data/v62.0/sobjects", env.proxy);
    let (status, _, body) = env.http.get(&url, &[]).await;
    let body = String::from_utf8_lossy(&body);
    assert_eq!(status, StatusCode::BAD_GATEWAY, "{body}");
    assert!(body.contains("not counted"), "{body}");
    assert_eq!(
        env.window("a").await,
        0,
        "a refused stream was never processed"
    );
}

// What an intermediary must get right (RFC 9110, RFC 9112), checked against a raw origin that
// records the bytes that reach it.

const BY_HOST: &str =
    "[[integration]]\nid = \"m\"\norg = \"acme\"\nmatch = { host = \"middleware.internal\" }\n";
const OK: &[u8] =
    b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n{}";

type Seen = Arc<Mutex<Vec<Vec<u8>>>>;

/// An origin that records each request as it arrives (what came until 300 ms of silence) and
/// answers it with `response`, on the same connection for as long as the client keeps it.
async fn recording_origin(response: &'static [u8]) -> (u16, Seen) {
    let seen: Seen = Arc::new(Mutex::new(Vec::new()));
    let log = seen.clone();
    let port = raw_origin(move |mut tcp| {
        let log = log.clone();
        async move {
            let mut buf = [0u8; 8192];
            loop {
                let mut got = Vec::new();
                loop {
                    match tokio::time::timeout(Duration::from_millis(300), tcp.read(&mut buf)).await
                    {
                        Ok(Ok(0)) | Ok(Err(_)) => return,
                        Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
                        Err(_) if !got.is_empty() => break,
                        Err(_) => {}
                    }
                }
                log.lock().expect("lock").push(got);
                if tcp.write_all(response).await.is_err() {
                    return;
                }
            }
        }
    })
    .await;
    (port, seen)
}

async fn proxy_for(port: u16, integrations: &str) -> Env {
    let sim = sim::spawn(SimOptions::default()).await.expect("sim");
    let upstream = format!("http://127.0.0.1:{port}");
    start_with(sim, &config_text(&upstream, "", integrations)).await
}

/// Writes `request` on a new connection to the proxy; returns all it answers within 2 s (or
/// until it closes), and whether it closed the connection.
async fn exchange(env: &Env, request: &[u8]) -> (String, bool) {
    let mut tcp = env.tcp().await;
    tcp.write_all(request).await.expect("write");
    let mut got = Vec::new();
    let mut buf = [0u8; 8192];
    let closed = loop {
        match tokio::time::timeout(Duration::from_secs(2), tcp.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => break true,
            Err(_) => break false,
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
        }
    };
    (String::from_utf8_lossy(&got).into_owned(), closed)
}

fn assert_nothing_forwarded(seen: &Seen) {
    assert!(
        seen.lock().expect("lock").is_empty(),
        "{}",
        upstream_saw(seen)
    );
}

fn upstream_saw(seen: &Seen) -> String {
    let seen = seen.lock().expect("lock");
    let all: Vec<String> = seen
        .iter()
        .map(|r| String::from_utf8_lossy(r).into_owned())
        .collect();
    all.join("\n-----\n")
}

/// RFC 9112 §3.2: "A server MUST respond with a 400 (Bad Request) status code to any HTTP/1.1
/// request message that lacks a Host header field and to any request message that contains
/// more than one Host header field line". With two, a `host` rule and a load balancer in front
/// could each read another line, and charge the call to another integration.
#[tokio::test]
async fn http11_requests_with_no_host_or_two_hosts_are_400_and_not_forwarded() {
    let (port, seen) = recording_origin(OK).await;
    let env = proxy_for(port, &format!("{ONE}\n{BY_HOST}")).await;

    let (two, _) = exchange(
        &env,
        b"GET /services/data/v62.0/sobjects HTTP/1.1\r\nHost: middleware.internal\r\n\
          Host: crm.example.com\r\nconnection: close\r\n\r\n",
    )
    .await;
    let (none, _) = exchange(
        &env,
        b"GET /a/services/data/v62.0/sobjects HTTP/1.1\r\nconnection: close\r\n\r\n",
    )
    .await;
    assert!(
        two.starts_with("HTTP/1.1 400") && none.starts_with("HTTP/1.1 400"),
        "two Host lines got:\n{two}\nno Host got:\n{none}\nupstream saw:\n{}",
        upstream_saw(&seen)
    );
    assert_nothing_forwarded(&seen);
}

/// RFC 9110 §6.2: an intermediary "MUST send its own HTTP-version in forwarded messages". An
/// HTTP/1.0 relay behind the proxy must not turn its answers into HTTP/1.0 ones, which an
/// HTTP/1.1 client treats as not persistent (RFC 9112 §9.3), and whose unknown-length bodies
/// end by a close (a cut-off undetectable).
#[tokio::test]
async fn the_client_gets_the_proxys_http_version_not_the_upstreams() {
    let (port, _) = recording_origin(
        b"HTTP/1.0 200 OK\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n{}",
    )
    .await;
    let env = proxy_for(port, ONE).await;
    let (answer, _) = exchange(
        &env,
        b"GET /a/services/data/v62.0/sobjects HTTP/1.1\r\nHost: x\r\n\r\n",
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 200"), "client got:\n{answer}");
}

/// RFC 9112 §6.1/§7: a transfer coding other than `chunked` is not silently lost. hyper decodes
/// only `chunked`; the still gzip-coded bytes must not go on as if they were the content (a
/// server "SHOULD respond with 501" to a coding it does not understand).
#[tokio::test]
async fn a_request_transfer_coding_other_than_chunked_is_not_silently_dropped() {
    let (port, seen) = recording_origin(OK).await;
    let env = proxy_for(port, ONE).await;
    let (answer, _) = exchange(
        &env,
        b"POST /a/services/data/v62.0/sobjects/Contact HTTP/1.1\r\nHost: x\r\n\
          content-type: application/json\r\ntransfer-encoding: gzip, chunked\r\n\
          connection: close\r\n\r\n4\r\nGZIP\r\n0\r\n\r\n",
    )
    .await;
    let upstream = upstream_saw(&seen).to_ascii_lowercase();
    let refused = answer.starts_with("HTTP/1.1 501") && upstream.is_empty();
    let kept = upstream.contains("transfer-encoding: gzip");
    assert!(
        refused || kept,
        "client got:\n{answer}\nupstream saw (coding lost):\n{upstream}"
    );
}

/// The same for a response: the client must not get the coded bytes as the content, with
/// nothing saying they are compressed.
#[tokio::test]
async fn a_response_transfer_coding_other_than_chunked_is_not_silently_dropped() {
    let (port, _) = recording_origin(
        b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n\
          transfer-encoding: gzip, chunked\r\n\r\n4\r\nGZIP\r\n0\r\n\r\n",
    )
    .await;
    let env = proxy_for(port, ONE).await;
    let (answer, _) = exchange(
        &env,
        b"GET /a/services/data/v62.0/sobjects HTTP/1.1\r\nHost: x\r\nconnection: close\r\n\r\n",
    )
    .await;
    let head = answer
        .split("\r\n\r\n")
        .next()
        .unwrap_or("")
        .to_ascii_lowercase();
    assert!(
        head.contains("gzip") || answer.starts_with("HTTP/1.1 502"),
        "gzip coding lost; client got:\n{answer:?}"
    );
}

/// A reverse proxy does not tunnel: CONNECT is answered by the proxy (501), not sent on as
/// `CONNECT / HTTP/1.1` (a request target CONNECT cannot have, RFC 9112 §3.2.3).
#[tokio::test]
async fn connect_is_refused_not_forwarded() {
    let (port, seen) = recording_origin(OK).await;
    let env = proxy_for(port, BY_HOST).await;
    let (answer, _) = exchange(
        &env,
        b"CONNECT middleware.internal:443 HTTP/1.1\r\nHost: middleware.internal:443\r\n\r\n",
    )
    .await;
    assert!(
        answer.starts_with("HTTP/1.1 4") || answer.starts_with("HTTP/1.1 5"),
        "client got {answer:?}; upstream saw:\n{}",
        upstream_saw(&seen)
    );
    assert_nothing_forwarded(&seen);
}

/// With `trust_forwarded_for` off the proxy replaces `X-Forwarded-For`/`-Proto` (the client
/// could have forged them), and the standard `Forwarded` field (RFC 7239) and its
/// `X-Forwarded-Host` / `X-Real-IP` siblings do not reach Salesforce as the client wrote them.
#[tokio::test]
async fn untrusted_forwarding_fields_do_not_reach_salesforce_as_forged() {
    let (port, seen) = recording_origin(OK).await;
    let env = proxy_for(port, ONE).await;
    let (answer, _) = exchange(
        &env,
        b"GET /a/services/data/v62.0/sobjects HTTP/1.1\r\nHost: x\r\n\
          forwarded: for=6.6.6.6;proto=https\r\nx-forwarded-for: 6.6.6.6\r\n\
          x-forwarded-host: evil.example\r\nx-real-ip: 6.6.6.6\r\nconnection: close\r\n\r\n",
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    let upstream = upstream_saw(&seen).to_ascii_lowercase();
    assert!(
        !upstream.contains("6.6.6.6") && !upstream.contains("evil.example"),
        "forged client fields forwarded:\n{upstream}"
    );
}

/// The proxy removes `Upgrade` from every request (it tunnels no protocol), so a `101 Switching
/// Protocols` from upstream is a protocol violation: a Salesforce-shaped 502, not a bare 101.
#[tokio::test]
async fn an_upstream_101_is_a_502() {
    let (port, _) = recording_origin(
        b"HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\nconnection: upgrade\r\n\r\n",
    )
    .await;
    let env = proxy_for(port, ONE).await;
    let (status, _, body) = env
        .http
        .get(
            &format!("{}/a/services/data/v62.0/sobjects", env.proxy),
            &[],
        )
        .await;
    assert_eq!(status, StatusCode::BAD_GATEWAY);
    let body = String::from_utf8_lossy(&body);
    assert!(
        body.contains("CALLMETER_UPSTREAM_ERROR") && body.contains("101"),
        "{body}"
    );
}

/// A GET body's frames, for `h2_get_with_body`.
type Frames = std::pin::Pin<
    Box<dyn futures_util::Stream<Item = Result<http_body::Frame<Bytes>, Infallible>> + Send>,
>;

/// Sends an HTTP/2 (h2c) GET of `path` through the proxy with `frames` as its body, no
/// `content-length`; its status.
async fn h2_get_with_body(env: &Env, path: &str, frames: Frames) -> StatusCode {
    let client = Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build(HttpConnector::new());
    let req = Request::get(format!("{}{path}", env.proxy))
        .body(StreamBody::new(frames))
        .expect("request");
    client.request(req).await.expect("h2c response").status()
}

/// An HTTP/2 client may end a GET with an empty DATA frame (END_STREAM) after its HEADERS
/// rather than on them: the request has no content, and goes on to an HTTP/1.1 upstream as a
/// bodiless GET, not one declaring a chunked body (which some servers and WAFs refuse).
#[tokio::test]
async fn an_http2_get_ended_by_an_empty_data_frame_goes_on_without_a_body() {
    let (port, seen) = recording_origin(OK).await;
    let env = proxy_for(port, ONE).await;
    let ends_late = Box::pin(stream::once(async {
        tokio::time::sleep(Duration::from_millis(200)).await;
        Ok(http_body::Frame::data(Bytes::new()))
    }));
    let path = "/a/services/data/v62.0/sobjects";
    assert_eq!(
        h2_get_with_body(&env, path, ends_late).await,
        StatusCode::OK
    );
    let upstream = upstream_saw(&seen).to_ascii_lowercase();
    assert!(
        !upstream.contains("transfer-encoding"),
        "a GET with no content went on declaring a chunked body:\n{upstream}"
    );
}

/// A GET whose body comes in HTTP/2 DATA frames without a `content-length` reaches an HTTP/1.1
/// upstream with its body: hyper's client sends a GET of unknown length with none unless the
/// request says how it is framed.
#[tokio::test]
async fn an_http2_get_body_is_forwarded_not_dropped() {
    let (port, seen) = recording_origin(OK).await;
    let env = proxy_for(port, ONE).await;
    let frames = Box::pin(stream::iter([
        Ok(http_body::Frame::data(Bytes::from_static(b"hel"))),
        Ok(http_body::Frame::data(Bytes::from_static(b"lo"))),
    ]));
    let path = "/a/services/data/v62.0/query";
    assert_eq!(h2_get_with_body(&env, path, frames).await, StatusCode::OK);
    let upstream = upstream_saw(&seen);
    assert!(
        upstream.contains("hel") && upstream.contains("lo"),
        "upstream saw (no body):\n{upstream}"
    );
}

/// A GET body of unknown length reaches Salesforce (hyper's client would send it with none):
/// one that was all there once read (a chunked body's one chunk and its end together, an
/// HTTP/2 GET of one DATA frame) goes on with its length, not declaring a chunked body (which
/// some servers and WAFs refuse on a GET).
#[tokio::test]
async fn a_get_body_read_whole_goes_on_with_its_length() {
    let (port, seen) = recording_origin(OK).await;
    let env = proxy_for(port, ONE).await;
    let (answer, _) = exchange(
        &env,
        b"GET /a/services/data/v62.0/query HTTP/1.1\r\nHost: x\r\ntransfer-encoding: chunked\r\n\
          connection: close\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    let one_frame = Box::pin(stream::iter([Ok(http_body::Frame::data(
        Bytes::from_static(b"hello"),
    ))]));
    let path = "/a/services/data/v62.0/query";
    assert_eq!(
        h2_get_with_body(&env, path, one_frame).await,
        StatusCode::OK
    );
    let seen = seen.lock().expect("lock").clone();
    assert_eq!(seen.len(), 2);
    for request in seen {
        let request = String::from_utf8_lossy(&request).to_ascii_lowercase();
        assert!(
            request.contains("content-length: 5")
                && !request.contains("transfer-encoding")
                && request.ends_with("hello"),
            "{request}"
        );
    }
}

/// A GET on a path whose body the proxy reads to cost it (Composite Batch), with a body longer
/// than what it reads: the rest of the body goes on too.
#[tokio::test]
async fn a_long_chunked_get_body_on_a_costed_path_is_not_dropped() {
    let (port, seen) = recording_origin(OK).await;
    let env = proxy_for(port, ONE).await;
    let chunk = vec![b'x'; 64 * 1024];
    let mut request = b"GET /a/services/data/v62.0/composite/batch HTTP/1.1\r\nHost: x\r\n\
        transfer-encoding: chunked\r\nconnection: close\r\n\r\n"
        .to_vec();
    // 1 MiB + 64 KiB: past what the proxy reads to cost a call.
    for _ in 0..17 {
        request.extend_from_slice(format!("{:x}\r\n", chunk.len()).as_bytes());
        request.extend_from_slice(&chunk);
        request.extend_from_slice(b"\r\n");
    }
    request.extend_from_slice(b"0\r\n\r\n");
    let (answer, _) = exchange(&env, &request).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    let upstream = upstream_saw(&seen);
    let body = upstream.split_once("\r\n\r\n").map_or("", |(_, body)| body);
    let xs = body.bytes().filter(|&b| b == b'x').count();
    assert_eq!(xs, 17 * 64 * 1024, "the body reached the upstream whole");
}

/// A GET body that announces trailers keeps them (as a POST's do, `trailers_pass_both_ways`):
/// it goes on chunked as it streams, not read whole and sent with a length that cannot carry
/// them.
#[tokio::test]
async fn a_chunked_get_bodys_trailers_are_not_dropped() {
    let (port, seen) = recording_origin(OK).await;
    let env = proxy_for(port, ONE).await;
    let (answer, _) = exchange(
        &env,
        b"GET /a/services/data/v62.0/query HTTP/1.1\r\nHost: x\r\ntransfer-encoding: chunked\r\n\
          trailer: x-request-sum\r\nte: trailers\r\nconnection: close\r\n\r\n\
          5\r\nhello\r\n0\r\nx-request-sum: def\r\n\r\n",
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    let upstream = upstream_saw(&seen).to_ascii_lowercase();
    assert!(upstream.contains("hello"), "{upstream}");
    assert!(
        upstream.contains("x-request-sum: def"),
        "trailer lost:\n{upstream}"
    );
}

/// A body the proxy reads to cost the call (a SOAP call, a Composite Batch) keeps its trailers,
/// as a body it only streams does (`trailers_pass_both_ways`); a GET whose body is read to learn
/// its length, too.
#[tokio::test]
async fn a_costed_bodys_trailers_are_not_dropped() {
    let (port, seen) = recording_origin(OK).await;
    let env = proxy_for(port, ONE).await;
    let soap = "<soapenv:Envelope xmlns:soapenv=\"http://schemas.xmlsoap.org/soap/envelope/\">\
                <soapenv:Body><query/></soapenv:Body></soapenv:Envelope>";
    let batch = r#"{"batchRequests":[{"method":"GET","url":"v62.0/limits"}]}"#;
    for (method, path, body) in [
        ("POST", "/a/services/Soap/u/62.0", soap),
        ("POST", "/a/services/data/v62.0/composite/batch", batch),
        ("GET", "/a/services/data/v62.0/query", "hello"),
    ] {
        let request = format!(
            "{method} {path} HTTP/1.1\r\nHost: x\r\ntransfer-encoding: chunked\r\n\
             trailer: x-request-sum\r\nte: trailers\r\nconnection: close\r\n\r\n\
             {:x}\r\n{body}\r\n0\r\nx-request-sum: def\r\n\r\n",
            body.len()
        );
        seen.lock().expect("lock").clear();
        let (answer, _) = exchange(&env, request.as_bytes()).await;
        assert!(answer.starts_with("HTTP/1.1 200"), "{path}: {answer}");
        let upstream = upstream_saw(&seen).to_ascii_lowercase();
        assert!(upstream.contains(&body.to_ascii_lowercase()), "{upstream}");
        assert!(
            upstream.contains("x-request-sum: def"),
            "{path}: trailer lost:\n{upstream}"
        );
    }
}

/// A GET body of exactly what the proxy reads to learn a length (64 KiB) goes on with its
/// length, as a smaller one does.
#[tokio::test]
async fn a_get_body_of_exactly_the_read_limit_goes_on_with_its_length() {
    let (port, seen) = recording_origin(OK).await;
    let env = proxy_for(port, ONE).await;
    let mut request = b"GET /a/services/data/v62.0/query HTTP/1.1\r\nHost: x\r\n\
        transfer-encoding: chunked\r\nconnection: close\r\n\r\n"
        .to_vec();
    let chunk = vec![b'x'; 64 * 1024];
    request.extend_from_slice(format!("{:x}\r\n", chunk.len()).as_bytes());
    request.extend_from_slice(&chunk);
    request.extend_from_slice(b"\r\n0\r\n\r\n");
    let (answer, _) = exchange(&env, &request).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    let upstream = upstream_saw(&seen).to_ascii_lowercase();
    let (head, body) = upstream.split_once("\r\n\r\n").unwrap_or((&upstream, ""));
    assert!(
        head.contains("content-length: 65536") && !head.contains("transfer-encoding"),
        "{head}"
    );
    assert_eq!(body.bytes().filter(|&b| b == b'x').count(), 64 * 1024);
}

/// As `an_http2_upload_reset_mid_body_is_not_counted`, but Salesforce reads the upload slowly
/// (here: not at all after the head, as a busy instance does with a large blob): the upstream
/// connection is waiting to write when the client resets, so the request's future is dropped
/// before the upstream side sees the body break off. Salesforce never had the whole request,
/// and it must not stay counted.
#[tokio::test]
async fn an_http2_upload_reset_while_upstream_reads_slowly_is_not_counted() {
    let got = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let port = {
        let got = got.clone();
        raw_origin(move |mut tcp| {
            let got = got.clone();
            async move {
                // Reads the request head, then stops reading (and never answers).
                let mut head = Vec::new();
                let mut buf = [0u8; 1024];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match tcp.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                got.fetch_add(head.len(), std::sync::atomic::Ordering::SeqCst);
                tokio::time::sleep(Duration::from_secs(60)).await;
                drop(tcp);
            }
        })
        .await
    };
    let sim = sim::spawn(SimOptions::default()).await.expect("sim");
    // A short response timeout: a request future still alive would see its upload stall after
    // 3 s and refund the call (`UploadStalled`); only one that was dropped cannot.
    let env = start_with(
        sim,
        &config_text(
            &format!("http://127.0.0.1:{port}"),
            "response_timeout = \"3s\"",
            ONE,
        ),
    )
    .await;
    let (_response, mut upload) = h2_post(&env, None).await;
    // Upload until the proxy stops taking more: Salesforce's socket is full.
    let mut sent = 0usize;
    loop {
        upload.reserve_capacity(64 * 1024);
        let capacity = std::future::poll_fn(|cx| upload.poll_capacity(cx));
        match tokio::time::timeout(Duration::from_secs(1), capacity).await {
            Ok(Some(Ok(n))) => {
                upload
                    .send_data(Bytes::from(vec![b'x'; n]), false)
                    .expect("data");
                sent += n;
            }
            Ok(other) => panic!("upload broke off: {other:?}"),
            Err(_) => break, // no capacity for a second: the upload is stuck upstream
        }
    }
    eventually(10, "the call counted and its head upstream", || async {
        env.window("a").await == 1 && got.load(std::sync::atomic::Ordering::SeqCst) > 0
    })
    .await;
    // The client gives up on the upload (a timeout, a cancelled job): RST_STREAM.
    upload.send_reset(h2::Reason::CANCEL);
    eventually(
        10,
        &format!("the broken-off upload ({sent} bytes sent of an unfinished body) refunded"),
        || async { env.window("a").await == 0 },
    )
    .await;
}

/// `callmeter_requests_total` counts each request once: a call cancelled once Salesforce has
/// it, which stays counted against the budget (see
/// `a_call_cancelled_after_it_went_upstream_stays_counted`), too.
#[tokio::test]
async fn a_call_cancelled_after_it_went_upstream_is_in_the_request_metrics() {
    let env = start(SimOptions::default(), "", ONE).await;
    let req = Request::get("/a/services/data/v62.0/limits").header("x-sim-delay-ms", "2000");
    cancel_once_counted(&env, req, true).await;
    // Past the simulated org's answer: whatever the proxy was to record, it has.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(env.window("a").await, 1, "counted: Salesforce has it");
    let metrics = env.metrics().await;
    let series: Vec<&str> = metrics
        .lines()
        .filter(|l| l.starts_with("callmeter_requests_total{") && l.contains("integration=\"a\""))
        .collect();
    let total: f64 = series
        .iter()
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    assert_eq!(
        total, 1.0,
        "one request, counted against the budget, recorded {total} times: {series:?}"
    );
}

/// Starts an HTTP/2 (h2c) POST of a Contact through the proxy, declaring `content-length` if
/// given: its response and the stream of its body, to send, end or reset as a test likes.
async fn h2_post(
    env: &Env,
    length: Option<usize>,
) -> (h2::client::ResponseFuture, h2::SendStream<Bytes>) {
    let addr = env.proxy.trim_start_matches("http://").to_owned();
    let tcp = tokio::net::TcpStream::connect(&addr)
        .await
        .expect("connect");
    let (client, conn) = h2::client::handshake(tcp).await.expect("h2c handshake");
    tokio::spawn(conn);
    let mut client = client.ready().await.expect("ready");
    let mut req = Request::post(format!(
        "http://{addr}/a/services/data/v62.0/sobjects/Contact"
    ))
    .header("content-type", "application/json");
    if let Some(length) = length {
        req = req.header("content-length", length);
    }
    client
        .send_request(req.body(()).expect("request"), false)
        .expect("send")
}

/// An origin that reads a request whole (head and `content-length` body), flags it,
/// then answers `answer` after `delay` (or never, `None`).
async fn whole_request_origin(
    whole: Arc<std::sync::atomic::AtomicBool>,
    answer: Option<(Duration, &'static [u8])>,
) -> u16 {
    raw_origin(move |mut tcp| {
        let whole = whole.clone();
        async move {
            let mut got = Vec::new();
            let mut buf = [0u8; 16 * 1024];
            let head_end = loop {
                if let Some(at) = got.windows(4).position(|w| w == b"\r\n\r\n") {
                    break at + 4;
                }
                match tcp.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => got.extend_from_slice(&buf[..n]),
                }
            };
            let head = String::from_utf8_lossy(&got[..head_end]).to_ascii_lowercase();
            let length: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .map(|v| v.trim().parse().expect("length"))
                .expect("a content-length request");
            while got.len() < head_end + length {
                match tcp.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => got.extend_from_slice(&buf[..n]),
                }
            }
            // Salesforce has the whole call: it processes it.
            whole.store(true, std::sync::atomic::Ordering::SeqCst);
            match answer {
                Some((delay, response)) => {
                    tokio::time::sleep(delay).await;
                    let _ = tcp.write_all(response).await;
                    tokio::time::sleep(Duration::from_secs(60)).await;
                }
                None => tokio::time::sleep(Duration::from_secs(60)).await,
            }
        }
    })
    .await
}

/// An HTTP/2 client sends a body of known length (`content-length`), then ends its stream with
/// an empty DATA frame (what hyper's own client does for a streamed body; .NET's HttpClient
/// does it for an empty POST): the proxy hands all of it to Salesforce over HTTP/1.1 (whose
/// client stops at the length, and never polls an empty body at all), and Salesforce has the
/// whole call. Then either the client gives up waiting (`reset`) or Salesforce takes longer
/// than the 2 s response timeout to answer. Returns the client's status, if it got one, and
/// the integration's count.
async fn a_whole_upload(body: &'static [u8], reset: bool) -> (Option<StatusCode>, u64) {
    let whole = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let answer =
        b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n{}";
    let late = (!reset).then_some((Duration::from_secs(5), &answer[..]));
    let port = whole_request_origin(whole.clone(), late).await;
    let sim = sim::spawn(SimOptions::default()).await.expect("sim");
    let upstream = format!("http://127.0.0.1:{port}");
    let env = start_with(
        sim,
        &config_text(&upstream, "response_timeout = \"2s\"", ONE),
    )
    .await;
    let (response, mut upload) = h2_post(&env, Some(body.len())).await;
    if !body.is_empty() {
        upload
            .send_data(Bytes::from_static(body), false)
            .expect("data");
    }
    eventually(10, "the call whole at Salesforce", || async {
        whole.load(std::sync::atomic::Ordering::SeqCst)
    })
    .await;
    upload.send_data(Bytes::new(), true).expect("end of stream");
    if reset {
        upload.send_reset(h2::Reason::CANCEL);
        tokio::time::sleep(Duration::from_secs(1)).await;
        return (None, env.window("a").await);
    }
    let response = tokio::time::timeout(Duration::from_secs(10), response)
        .await
        .expect("an answer")
        .expect("response");
    (Some(response.status()), env.window("a").await)
}

/// Salesforce had the whole call: the client's reset leaves it counted.
#[tokio::test]
async fn an_http2_upload_sent_whole_then_reset_stays_counted() {
    let smith = b"{\"LastName\":\"Smith\"}";
    assert_eq!(a_whole_upload(smith, true).await, (None, 1));
    assert_eq!(a_whole_upload(b"", true).await, (None, 1), "an empty body");
}

/// Salesforce had the whole call and is slow to answer: that is a response timeout (504, the
/// call stays counted), not a stalled upload (408, refunded).
#[tokio::test]
async fn an_http2_upload_sent_whole_times_out_as_a_response() {
    let smith = b"{\"LastName\":\"Smith\"}";
    let timed_out = (Some(StatusCode::GATEWAY_TIMEOUT), 1);
    assert_eq!(a_whole_upload(smith, false).await, timed_out);
    assert_eq!(a_whole_upload(b"", false).await, timed_out, "an empty body");
}

/// Salesforce sends the response head and part of the body, then nothing more (a stalled
/// server, a dropped connection nobody reset): once the body has sent nothing for
/// `response_timeout`, the proxy ends it, and the HTTP/1.1 client sees its connection close
/// before the announced length (as nginx's `proxy_read_timeout` does). It held the client's
/// request, the upstream connection and the call's `max_in_flight` slot for as long as the
/// client waited.
#[tokio::test]
async fn a_response_body_that_stalls_upstream_is_cut_off() {
    let port = raw_origin(|mut tcp| async move {
        let mut buf = [0u8; 8192];
        let _ = tcp.read(&mut buf).await;
        let _ = tcp
            .write_all(
                b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n\
                  content-length: 1000\r\n\r\n{\"records\":[",
            )
            .await;
        tokio::time::sleep(Duration::from_secs(60)).await;
    })
    .await;
    let sim = sim::spawn(SimOptions::default()).await.expect("sim");
    let upstream = format!("http://127.0.0.1:{port}");
    let toml = config_text(&upstream, "response_timeout = \"1s\"", ONE);
    let env = start_with(sim, &toml).await;
    let mut tcp = env.tcp().await;
    tcp.write_all(b"GET /a/services/data/v62.0/query?q=x HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .expect("write");
    let started = std::time::Instant::now();
    let mut got = Vec::new();
    let mut buf = [0u8; 8192];
    let ended = tokio::time::timeout(Duration::from_secs(8), async {
        loop {
            match tcp.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await;
    let got = String::from_utf8_lossy(&got);
    assert!(got.starts_with("HTTP/1.1 200"), "{got}");
    assert!(
        ended.is_ok(),
        "8 s after the body stalled (response_timeout = 1s) the proxy still holds the \
         response open ({:?} elapsed); client has: {got:?}",
        started.elapsed()
    );
    assert!(
        started.elapsed() >= Duration::from_millis(900),
        "cut off early"
    );
    assert_eq!(
        got.split("\r\n\r\n").nth(1),
        Some("{\"records\":["),
        "the connection closes short of the announced 1000 bytes"
    );
}

/// One shared HTTP/2 connection carries all of an org's calls. Three clients downloading large
/// results (Bulk API 2.0 query results, say) that pause after the head pin only their streams'
/// windows: another integration's small call still gets its answer. (With hyper's default
/// windows, 2 MiB per stream and 5 MiB per connection, they held the whole connection window
/// and the small call got no body until they resumed.)
#[tokio::test]
async fn slow_readers_of_large_responses_do_not_stall_other_calls_on_a_shared_http2_upstream() {
    use hyper::service::service_fn;
    use hyper_util::rt::TokioIo;

    let dir = tempfile::tempdir().expect("tempdir");
    let tls = TestTls::new(dir.path());
    // An HTTP/2 origin: 32 MiB for a results path, `{}` for anything else.
    let port = tls_origin(&tls, &[b"h2", b"http/1.1"], |stream| async move {
        let service = service_fn(|req: Request<hyper::body::Incoming>| async move {
            let body = if req.uri().path().ends_with("/results") {
                Bytes::from(vec![b'x'; 32 << 20])
            } else {
                Bytes::from_static(b"{}")
            };
            Ok::<_, Infallible>(http::Response::new(http_body_util::Full::new(body)))
        });
        let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
        let _ = builder
            .serve_connection(TokioIo::new(stream), service)
            .await;
    })
    .await;
    let env = proxy_for_tls(port, &tls).await;
    let small = format!("{}/a/services/data/v62.0/sobjects", env.proxy);
    assert_eq!(env.http.get(&small, &[]).await.0, StatusCode::OK); // HTTP/2 is known now

    // Three downloads whose clients read the head and then pause (tiny receive buffers, so
    // the kernel does not soak up the body).
    let addr: std::net::SocketAddr = env
        .proxy
        .trim_start_matches("http://")
        .parse()
        .expect("addr");
    let mut readers = Vec::new();
    for i in 0..3 {
        let socket = tokio::net::TcpSocket::new_v4().expect("socket");
        socket.set_recv_buffer_size(4096).expect("rcvbuf");
        let mut tcp = socket.connect(addr).await.expect("connect");
        let req = format!(
            "GET /a/services/data/v62.0/jobs/query/75000000000000{i}/results HTTP/1.1\r\nHost: x\r\n\r\n"
        );
        tcp.write_all(req.as_bytes()).await.expect("write");
        let mut head = [0u8; 1024];
        let n = tcp.read(&mut head).await.expect("head");
        assert!(head[..n].starts_with(b"HTTP/1.1 200"));
        readers.push(tcp);
    }
    tokio::time::sleep(Duration::from_secs(1)).await;

    let other = tokio::time::timeout(Duration::from_secs(10), env.http.get(&small, &[])).await;
    assert!(
        other.is_ok(),
        "another integration's 2-byte call got no answer within 10 s while 3 large \
         downloads were paused"
    );
    drop(readers);
}

/// VmRSS of this process (the proxy runs in it), in bytes.
fn rss_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
    let line = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .expect("VmRSS");
    let kib: u64 = line
        .split_whitespace()
        .nth(1)
        .and_then(|n| n.parse().ok())
        .expect("VmRSS value");
    kib * 1024
}

/// "Memory: bounded by configuration, not by traffic". A call whose body the proxy reads to
/// cost it (Composite Batch, SOAP) has up to 1 MiB of its body held before the meter is asked,
/// for as long as the client sends a frame per stall timeout. One h2c connection opens 200
/// streams, each sends just under 1 MiB and stalls: the proxy held 207 MiB. The bodies held
/// over all requests are bounded (`HELD_BYTES`, 64 MiB); past it they are costed unread and
/// stream on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_connection_cannot_make_the_proxy_buffer_hundreds_of_mib() {
    static ZEROS: [u8; 1 << 20] = [b' '; 1 << 20];
    const STREAMS: usize = 200;
    const EACH: usize = (1 << 20) - 64;
    // An origin that reads what comes and keeps none of it: the growth is the proxy's.
    let port = raw_origin(|mut tcp| async move {
        let mut buf = vec![0u8; 64 * 1024];
        while let Ok(n) = tcp.read(&mut buf).await {
            if n == 0 {
                return;
            }
        }
    })
    .await;
    let env = proxy_for(port, ONE).await;
    let addr = env.proxy.trim_start_matches("http://").to_owned();
    let tcp = tokio::net::TcpStream::connect(&addr)
        .await
        .expect("connect");
    let (client, conn) = h2::client::handshake(tcp).await.expect("h2c handshake");
    tokio::spawn(conn);
    let before = rss_bytes();
    let mut held = Vec::new();
    let mut sending = Vec::new();
    for _ in 0..STREAMS {
        let mut client = client.clone().ready().await.expect("ready");
        let req = Request::post(format!(
            "http://{addr}/a/services/data/v62.0/composite/batch"
        ))
        .header("content-type", "application/json")
        .body(())
        .expect("request");
        let (resp, mut body) = client.send_request(req, false).expect("send");
        held.push(resp);
        sending.push(tokio::spawn(async move {
            let mut sent = 0;
            while sent < EACH {
                body.reserve_capacity(EACH - sent);
                let n = match std::future::poll_fn(|cx| body.poll_capacity(cx)).await {
                    Some(Ok(n)) => n.min(EACH - sent),
                    _ => return (sent, body),
                };
                let chunk = Bytes::from_static(&ZEROS[sent..sent + n]);
                body.send_data(chunk, false).expect("data");
                sent += n;
            }
            (sent, body) // never ended: the proxy waits for the rest
        }));
    }
    let mut bodies = Vec::new();
    let mut total = 0;
    for s in sending {
        let (sent, body) = tokio::time::timeout(Duration::from_secs(60), s)
            .await
            .expect("uploads within a minute")
            .expect("task");
        total += sent;
        bodies.push(body);
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let grown = rss_bytes().saturating_sub(before);
    eprintln!(
        "sent {} MiB on one connection; the process grew by {} MiB",
        total >> 20,
        grown >> 20
    );
    assert!(
        grown < 128 << 20,
        "one unauthenticated connection made the proxy hold {} MiB",
        grown >> 20
    );
    drop((held, bodies));
}

/// RFC 9110 §9.3.2: a HEAD response's Content-Length is the one a GET would have had. OAuth and
/// identity URLs go through the login rewriter, which set it to the length of the (empty) body
/// it read: a HEAD on `/services/oauth2/userinfo` or an identity URL answered `content-length: 0`
/// where Salesforce said 1234, unlike any other path.
#[tokio::test]
async fn a_head_on_an_oauth_or_identity_url_keeps_its_content_length() {
    let (port, _) = recording_origin(
        b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 1234\r\n\r\n",
    )
    .await;
    let env = proxy_for(port, ONE).await;
    for path in [
        "/a/services/data/v62.0/sobjects",
        "/a/services/oauth2/userinfo",
        "/a/id/00D000000000001AAA/005000000000001AAA",
    ] {
        let request = format!("HEAD {path} HTTP/1.1\r\nHost: x\r\nconnection: close\r\n\r\n");
        let (answer, _) = exchange(&env, request.as_bytes()).await;
        assert!(
            answer.starts_with("HTTP/1.1 200") && answer.contains("content-length: 1234\r\n"),
            "HEAD {path} got:\n{answer}"
        );
    }
}

/// An origin answering every request with `lines`, each sent as its own `Sforce-Limit-Info`
/// header line.
async fn origin_with_limit_info(lines: &'static [&'static str]) -> u16 {
    raw_origin(move |mut tcp| async move {
        let mut buf = [0u8; 8192];
        while tcp.read(&mut buf).await.is_ok_and(|n| n > 0) {
            let mut head = String::from(
                "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 2\r\n",
            );
            for l in lines {
                head.push_str(&format!("Sforce-Limit-Info: {l}\r\n"));
            }
            head.push_str("\r\n{}");
            if tcp.write_all(head.as_bytes()).await.is_err() {
                return;
            }
        }
    })
    .await
}

/// `Sforce-Limit-Info` on several header lines is one list (RFC 9110 §5.3), as it is
/// comma-joined: the usage is read from whichever line has it (only the first line was read,
/// so `api-bursts` before `api-usage` hid the figure and the report counted as malformed).
#[tokio::test]
async fn limit_info_on_several_header_lines_is_read() {
    for lines in [
        &["api-bursts=1/750", "api-usage=900/1000"][..],
        &["api-usage=900/1000", "api-bursts=1/750"][..],
        &["per-app-api-usage=17/250(appName=x), api-usage=900/1000"][..],
    ] {
        let port = origin_with_limit_info(lines).await;
        let sim = sim::spawn(SimOptions::default()).await.expect("sim");
        let env = start_with(
            sim,
            &config_text(&format!("http://127.0.0.1:{port}"), "", ONE),
        )
        .await;
        let url = format!("{}/a/services/data/v62.0/sobjects", env.proxy);
        assert_eq!(env.http.get(&url, &[]).await.0, StatusCode::OK);
        let org = env.usage().await["orgs"][0].clone();
        assert_eq!(
            (org["used"].as_u64(), org["limit"].as_u64()),
            (Some(900), Some(1000)),
            "{lines:?}"
        );
    }
}

/// A Composite Batch uploading files (ContentVersion, multipart with the JSON part first)
/// larger than the 1 MiB the proxy reads costs its subrequests, since its JSON part is whole
/// in that prefix: it cost 25, Salesforce's maximum, and an integration with a quota of 20
/// was refused a batch of 2.
#[tokio::test]
async fn a_multipart_batch_with_large_files_costs_its_subrequests() {
    let env = start(
        SimOptions::default(),
        "",
        "[[integration]]\nid = \"a\"\norg = \"acme\"\nmatch = { path_prefix = \"/a\" }\nquota = 20\n",
    )
    .await;
    let json = r#"{"batchRequests":[{"method":"POST","url":"v62.0/sobjects/ContentVersion","richInput":{"Title":"f1","PathOnClient":"f1.bin"},"binaryPartName":"f1","binaryPartNameAlias":"VersionData"},{"method":"POST","url":"v62.0/sobjects/ContentVersion","richInput":{"Title":"f2","PathOnClient":"f2.bin"},"binaryPartName":"f2","binaryPartNameAlias":"VersionData"}]}"#;
    let file = "x".repeat(800 * 1024);
    let body = format!(
        "--bnd\r\nContent-Disposition: form-data; name=\"json\"\r\nContent-Type: application/json\r\n\r\n{json}\r\n\
         --bnd\r\nContent-Disposition: form-data; name=\"f1\"; filename=\"f1.bin\"\r\nContent-Type: application/octet-stream\r\n\r\n{file}\r\n\
         --bnd\r\nContent-Disposition: form-data; name=\"f2\"; filename=\"f2.bin\"\r\nContent-Type: application/octet-stream\r\n\r\n{file}\r\n--bnd--\r\n"
    );
    let url = format!("{}/a/services/data/v62.0/composite/batch", env.proxy);
    let multipart = [("content-type", "multipart/form-data; boundary=bnd")];
    let (status, _, answer) = env.http.send(Method::POST, &url, &multipart, body).await;
    assert_ne!(
        status,
        StatusCode::FORBIDDEN,
        "{}",
        String::from_utf8_lossy(&answer)
    );
    assert_eq!(env.window("a").await, 2);
}
