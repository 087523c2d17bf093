//! End-to-end `on_limit = "defer"`: 202 and a status URL, replay when budget frees, the
//! admin's sync-failures list, and no acknowledged call lost across `kill -9`.

mod common;

use std::convert::Infallible;
use std::io::Write;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use callmeter::sim::{self, SimOptions};
use callmeter::{app, config};
use common::*;
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};

const TOKEN: &str = "test-admin-token";

fn set_admin_token() {
    // Once per test process: setting the environment while another thread reads it is a
    // data race in the C library.
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| std::env::set_var("CALLMETER_TEST_ADMIN_TOKEN", TOKEN));
}

/// One call a second after the first: the calls a test sends right after it find no token
/// (with a token every 200 ms, a loaded machine let one through at times).
const DEFER: &str = "[[integration]]\nid = \"d\"\norg = \"acme\"\nmatch = { path_prefix = \"/d\" }\n\
                     rate = { per_second = 1, burst = 1 }\non_limit = \"defer\"\ndefer = { max_attempts = 2 }\n";

/// What the integration reads at a deferred call's `status_url` (with its own Authorization).
async fn status_of(http: &Http, status_url: &str) -> serde_json::Value {
    let auth = [("authorization", "Bearer 00Dsession")];
    let (_, _, body) = http.get(status_url, &auth).await;
    serde_json::from_slice(&body).unwrap_or_default()
}

/// POSTs `body` to `url`, which the test expects deferred: checks the 202 and returns its JSON
/// (`id`, `status`, `status_url`).
async fn deferred(
    http: &Http,
    url: &str,
    headers: &[(&str, &str)],
    body: impl Into<String>,
) -> serde_json::Value {
    deferred_by(http, Method::POST, url, headers, body).await
}

/// Sends `body` to `url` with `method`, which the test expects deferred (see `deferred`).
async fn deferred_by(
    http: &Http,
    method: Method,
    url: &str,
    headers: &[(&str, &str)],
    body: impl Into<String>,
) -> serde_json::Value {
    let (status, _, body) = http.send(method, url, headers, body.into()).await;
    assert_eq!(
        status,
        StatusCode::ACCEPTED,
        "{}",
        String::from_utf8_lossy(&body)
    );
    serde_json::from_slice(&body).expect("JSON")
}

/// A deferring integration whose one burst token a first call has spent: the next call is
/// limited. The Contact URL and the headers a call sends.
async fn burst_token_spent() -> (Env, String, [(&'static str, &'static str); 2]) {
    let env = start(SimOptions::default(), "", DEFER).await;
    let url = format!("{}/d/services/data/v62.0/sobjects/Contact", env.proxy);
    let auth = [
        ("authorization", "Bearer 00Dsession"),
        ("content-type", "application/json"),
    ];
    let (status, _, _) = env
        .http
        .send(Method::POST, &url, &auth, r#"{"LastName":"First"}"#)
        .await;
    assert_eq!(status, StatusCode::CREATED, "the burst token");
    (env, url, auth)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limited_calls_are_stored_answered_202_and_replayed() {
    let (env, url, auth) = burst_token_spent().await;
    let mut status_urls = Vec::new();
    for n in 0..3 {
        let (status, _, body) = env
            .http
            .send(
                Method::POST,
                &url,
                &auth,
                format!(r#"{{"LastName":"Deferred {n}"}}"#),
            )
            .await;
        assert_eq!(
            status,
            StatusCode::ACCEPTED,
            "{}",
            String::from_utf8_lossy(&body)
        );
        let accepted: serde_json::Value = serde_json::from_slice(&body).expect("JSON");
        let status_url = accepted["status_url"]
            .as_str()
            .expect("status_url")
            .to_owned();
        assert!(
            status_url.starts_with(&format!("{}/d/callmeter/deferred/", env.proxy)),
            "{status_url}"
        );
        status_urls.push(status_url);
    }
    // At 5 calls per second the replayer delivers all three within a second or so.
    eventually(15, "three deferred calls delivered", || async {
        env.sim_count().await["by_client"]["d"] == 4
    })
    .await;
    for status_url in &status_urls {
        let read = || status_of(&env.http, status_url);
        eventually(15, "delivered state recorded", || async {
            read().await["state"] == "delivered"
        })
        .await;
        let state = read().await;
        assert_eq!(state["upstream_status"], 201);
        assert!(
            state["upstream_body"]
                .as_str()
                .expect("body")
                .contains("\"success\":true"),
            "{state}"
        );
        // Someone else's credentials do not read it.
        let (status, _, _) = env
            .http
            .get(status_url, &[("authorization", "Bearer someone-else")])
            .await;
        assert_eq!(status, StatusCode::NOT_FOUND);
        // A status URL as handed out before URLs were tagged reads it with the call's own
        // credentials, and only with them.
        let (untagged, _) = status_url.rsplit_once('.').expect("a tag");
        assert_eq!(status_of(&env.http, untagged).await["state"], "delivered");
        assert_eq!(env.http.get(untagged, &[]).await.0, StatusCode::NOT_FOUND);
    }
    let metrics = env.metrics().await;
    assert!(metrics.contains(r#"outcome="deferred"} 3"#), "{metrics}");
    assert!(
        metrics.contains(
            r#"callmeter_deferred_calls{integration="d",org="acme",state="delivered"} 3"#
        ),
        "{metrics}"
    );
}

/// A status URL only reads: `DELETE` (or `POST`, `PUT`) on it is answered 405 with `Allow`,
/// in Salesforce's error shape, not 200 with the status, which a client could take for a
/// cancelled call; the call goes on to be delivered. `HEAD` answers as `GET` does, bodiless.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_status_url_refuses_methods_other_than_get_and_head() {
    let (env, url, auth) = burst_token_spent().await;
    let accepted = deferred(&env.http, &url, &auth, r#"{"LastName":"Deferred"}"#).await;
    let status_url = accepted["status_url"].as_str().expect("status_url");
    for method in [Method::DELETE, Method::POST, Method::PUT] {
        let (status, headers, body) = env
            .http
            .send(method.clone(), status_url, &auth, Bytes::new())
            .await;
        let text = String::from_utf8_lossy(&body);
        assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED, "{method}: {text}");
        assert_eq!(
            headers.get("allow").and_then(|v| v.to_str().ok()),
            Some("GET, HEAD"),
            "{method}"
        );
        let error: serde_json::Value = serde_json::from_slice(&body).expect("JSON");
        assert_eq!(
            error[0]["errorCode"], "METHOD_NOT_ALLOWED",
            "{method}: {text}"
        );
    }
    let (status, _, body) = env
        .http
        .send(Method::HEAD, status_url, &auth, Bytes::new())
        .await;
    assert_eq!(status, StatusCode::OK);
    assert!(body.is_empty());
    eventually(15, "the call delivered all the same", || async {
        status_of(&env.http, status_url).await["state"] == "delivered"
    })
    .await;
    assert_eq!(env.sim_count().await["by_client"]["d"], 2);
}

/// Integration `a` has spent its quota (its deferred call waits for a day), `b` only its rate
/// (back within a second): b's deferred call must not wait behind a's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_integrations_spent_quota_does_not_hold_back_anothers_deferred_calls() {
    let integrations =
        "[[integration]]\nid = \"a\"\norg = \"acme\"\nmatch = { path_prefix = \"/a\" }\n\
        quota = 1\non_limit = \"defer\"\n\
        [[integration]]\nid = \"b\"\norg = \"acme\"\nmatch = { path_prefix = \"/b\" }\n\
        rate = { per_second = 1, burst = 1 }\non_limit = \"defer\"\n";
    let env = start(SimOptions::default(), "", integrations).await;
    let auth = [
        ("authorization", "Bearer 00Dsession"),
        ("content-type", "application/json"),
    ];
    let post = |who: &str| format!("{}/{who}/services/data/v62.0/sobjects/Contact", env.proxy);
    for (who, expected) in [
        ("a", StatusCode::CREATED),
        ("a", StatusCode::ACCEPTED),
        ("b", StatusCode::CREATED),
        ("b", StatusCode::ACCEPTED),
    ] {
        let (status, _, body) = env
            .http
            .send(Method::POST, &post(who), &auth, r#"{"LastName":"x"}"#)
            .await;
        assert_eq!(
            status,
            expected,
            "{who}: {}",
            String::from_utf8_lossy(&body)
        );
    }
    eventually(10, "b's deferred call replayed while a's waits", || async {
        let count = env.sim_count().await;
        count["by_client"]["b"] == 2 && count["by_client"]["a"] == 1
    })
    .await;
}

/// A simulated org on a fixed port that can be stopped and started again.
async fn sim_on(addr: std::net::SocketAddr) -> tokio::sync::oneshot::Sender<()> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .expect("bind the org's port");
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(sim::serve(listener, SimOptions::default(), async move {
        let _ = stopped.await;
    }));
    stop
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_replays_wait_in_the_admin_list_and_a_retry_delivers_them() {
    set_admin_token();
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], free_port()));
    let org = sim_on(addr).await;
    let toml = config_text(
        &format!("http://{addr}"),
        r#"connect_timeout = "300ms""#,
        DEFER,
    )
    .replace(
        "[store]",
        "token_env = \"CALLMETER_TEST_ADMIN_TOKEN\"\n\n[store]",
    );
    let env = start_with(sim::spawn(SimOptions::default()).await.expect("sim"), &toml).await;
    let url = format!("{}/d/services/data/v62.0/sobjects/Contact", env.proxy);
    assert_eq!(
        env.http.send(Method::POST, &url, &[], "{}").await.0,
        StatusCode::CREATED
    );

    // Salesforce goes away; the next calls are deferred and their replays fail twice.
    let _ = org.send(());
    eventually(10, "the org stopped listening", || async {
        tokio::net::TcpStream::connect(addr).await.is_err()
    })
    .await;
    for _ in 0..2 {
        assert_eq!(
            env.http.send(Method::POST, &url, &[], "{}").await.0,
            StatusCode::ACCEPTED
        );
    }
    let admin = env.admin.clone();
    let list = |state: &'static str| {
        let (http, admin) = (env.http.clone(), admin.clone());
        async move {
            let (_, _, body) = http
                .get(&format!("{admin}/api/v1/deferred?state={state}"), &[])
                .await;
            serde_json::from_slice::<serde_json::Value>(&body).expect("JSON")
        }
    };
    eventually(10, "two failed deferred calls", || async {
        list("failed").await["calls"].as_array().map_or(0, Vec::len) == 2
    })
    .await;
    let failed = list("failed").await;
    assert!(
        failed["calls"][0]["last_error"]
            .as_str()
            .expect("error")
            .contains("could not connect"),
        "{failed}"
    );
    let ids: Vec<String> = failed["calls"]
        .as_array()
        .expect("calls")
        .iter()
        .map(|c| c["id"].as_i64().expect("id").to_string())
        .collect();

    // Salesforce is back and the admin retries. Without the right token: refused.
    let _org = sim_on(addr).await;
    let retry = format!("{admin}/api/v1/deferred/{}/retry", ids[0]);
    assert_eq!(
        env.http.send(Method::POST, &retry, &[], "").await.0,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        env.http
            .send(
                Method::POST,
                &retry,
                &[("authorization", "Bearer nope")],
                ""
            )
            .await
            .0,
        StatusCode::UNAUTHORIZED
    );
    let bearer = format!("Bearer {TOKEN}");
    let auth = [("authorization", bearer.as_str())];
    for id in &ids {
        let (status, _, body) = env
            .http
            .send(
                Method::POST,
                &format!("{admin}/api/v1/deferred/{id}/retry"),
                &auth,
                "",
            )
            .await;
        assert_eq!(status, StatusCode::OK, "{}", String::from_utf8_lossy(&body));
    }
    eventually(10, "retried calls delivered", || async {
        list("delivered").await["calls"]
            .as_array()
            .map_or(0, Vec::len)
            == 2
    })
    .await;
    // A delivered call cannot be discarded.
    let (status, _, _) = env
        .http
        .send(
            Method::POST,
            &format!("{admin}/api/v1/deferred/{}/discard", ids[0]),
            &auth,
            "",
        )
        .await;
    assert_eq!(status, StatusCode::CONFLICT);
}

/// Starts `callmeter serve` with a deferring integration of quota `quota`; waits until ready.
async fn serve(upstream: &str, dir: &std::path::Path, ports: (u16, u16), quota: u64) -> Proc {
    let (proxy_port, admin_port) = ports;
    let toml = format!(
        r#"
[admin]
listen = "127.0.0.1:{admin_port}"
[store]
path = "{store}"
[log]
level = "warn"
[[listener]]
name = "main"
listen = "127.0.0.1:{proxy_port}"
[[org]]
id = "acme"
instance_url = "{upstream}"
allow_plain_http = true
[[integration]]
id = "d"
org = "acme"
match = {{ path_prefix = "/d" }}
rate = {{ per_second = 200, burst = 1 }}
quota = {quota}
on_limit = "defer"
"#,
        store = dir.join("callmeter.db").display()
    );
    let path = dir.join("callmeter.toml");
    std::fs::write(&path, toml).expect("config");
    let child = std::process::Command::new(env!("CARGO_BIN_EXE_callmeter"))
        .args(["serve", "--config", path.to_str().expect("path")])
        .spawn()
        .expect("start callmeter");
    let proc = Proc(child);
    let http = Http::new();
    eventually(10, "callmeter ready", || {
        let http = http.clone();
        async move {
            tokio::net::TcpStream::connect(("127.0.0.1", admin_port))
                .await
                .is_ok()
                && http
                    .get(&format!("http://127.0.0.1:{admin_port}/readyz"), &[])
                    .await
                    .0
                    == StatusCode::OK
        }
    })
    .await;
    proc
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_calls_survive_kill_9_and_are_delivered_once() {
    let org = sim::spawn(SimOptions {
        limit: 1_000_000,
        ..Default::default()
    })
    .await
    .expect("sim");
    let dir = tempfile::tempdir().expect("tempdir");
    let ports = (free_port(), free_port());
    let mut proc = serve(&org.url, dir.path(), ports, 250).await;

    // 500 calls at once: the rate lets few straight through, the rest are stored (202).
    let url = format!(
        "http://127.0.0.1:{}/d/services/data/v62.0/sobjects/Contact",
        ports.0
    );
    let statuses = Arc::new(std::sync::Mutex::new(Vec::new()));
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut workers = Vec::new();
    for _ in 0..16 {
        let (url, statuses, next) = (url.clone(), statuses.clone(), next.clone());
        workers.push(tokio::spawn(async move {
            let http = Http::new();
            while next.fetch_add(1, std::sync::atomic::Ordering::Relaxed) < 500 {
                let (status, _, _) = http
                    .send(
                        Method::POST,
                        &url,
                        &[("content-type", "application/json")],
                        "{}",
                    )
                    .await;
                statuses.lock().expect("lock").push(status);
            }
        }));
    }
    for w in workers {
        w.await.expect("worker");
    }
    let statuses = statuses.lock().expect("lock").clone();
    let deferred = statuses
        .iter()
        .filter(|s| **s == StatusCode::ACCEPTED)
        .count();
    let direct = statuses
        .iter()
        .filter(|s| **s == StatusCode::CREATED)
        .count();
    assert_eq!(
        deferred + direct,
        500,
        "every call forwarded or stored: {statuses:?}"
    );
    assert!(deferred > 200, "most calls were deferred ({deferred})");

    // Replay runs until the quota of 250 is spent, then waits: nothing is in flight. Kill -9.
    eventually(20, "replay up to the quota", || async {
        org.count().by_client.get("d") == Some(&250)
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(org.count().by_client.get("d"), Some(&250));
    proc.0.kill().expect("kill -9");
    let _ = proc.0.wait();

    // Restart with room for everything: every acknowledged call arrives, none twice.
    let _proc = serve(&org.url, dir.path(), ports, 1_000).await;
    eventually(20, "all 500 calls delivered", || async {
        org.count().by_client.get("d") == Some(&500)
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        org.count().by_client.get("d"),
        Some(&500),
        "no call was sent twice"
    );
    let http = Http::new();
    let (_, _, body) = http
        .get(
            &format!(
                "http://127.0.0.1:{}/api/v1/deferred?state=delivered&limit=1000",
                ports.1
            ),
            &[],
        )
        .await;
    let list: serde_json::Value = serde_json::from_slice(&body).expect("JSON");
    assert_eq!(list["calls"].as_array().map(Vec::len), Some(deferred));
}

/// An origin that records every request body and answers with `answer(body, n, headers)`,
/// where `n` is how many requests with that body it has seen before (0 for the first).
async fn origin<F, Fut>(answer: F) -> (String, Arc<Mutex<Vec<String>>>)
where
    F: Fn(String, usize, http::HeaderMap) -> Fut + Clone + Send + Sync + 'static,
    Fut: std::future::Future<Output = http::Response<Full<Bytes>>> + Send + 'static,
{
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("addr"));
    let seen = Arc::new(Mutex::new(Vec::<String>::new()));
    let seen2 = seen.clone();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let (seen, answer) = (seen2.clone(), answer.clone());
            let service = service_fn(move |req: Request<hyper::body::Incoming>| {
                let (seen, answer) = (seen.clone(), answer.clone());
                async move {
                    let (parts, body) = req.into_parts();
                    let body = body
                        .collect()
                        .await
                        .map(|b| b.to_bytes())
                        .unwrap_or_default();
                    let body = String::from_utf8_lossy(&body).into_owned();
                    let n = {
                        let mut seen = seen.lock().expect("lock");
                        let n = seen.iter().filter(|b| **b == body).count();
                        seen.push(body.clone());
                        n
                    };
                    Ok::<_, Infallible>(answer(body, n, parts.headers).await)
                }
            });
            tokio::spawn(async move {
                let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
                let _ = builder.serve_connection(TokioIo::new(tcp), service).await;
            });
        }
    });
    (url, seen)
}

fn created() -> http::Response<Full<Bytes>> {
    http::Response::builder()
        .status(201)
        .header("content-type", "application/json")
        .header("sforce-limit-info", "api-usage=10/15000")
        .body(Full::new(Bytes::from_static(
            br#"{"id":"003000000000001AAA","success":true,"errors":[]}"#,
        )))
        .expect("response")
}

fn count(seen: &Mutex<Vec<String>>, body: &str) -> usize {
    seen.lock()
        .expect("lock")
        .iter()
        .filter(|b| *b == body)
        .count()
}

/// A client that asks for gzip (most HTTP libraries do) has its deferred call replayed
/// without `Accept-Encoding`, as nobody is there to decompress the answer; a server that
/// compresses Salesforce's REQUEST_LIMIT_EXCEEDED anyway is read through a decoder. Either
/// way the replayer sees the org's limit and keeps the call, rather than recording it as
/// delivered with a garbled body.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_compressed_limit_error_on_replay_is_not_a_delivery() {
    let asked_for_gzip = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let asked = asked_for_gzip.clone();
    let (upstream, seen) = origin(move |body: String, _n, headers: http::HeaderMap| {
        if body.contains("Deferred") && headers.contains_key("accept-encoding") {
            asked.store(true, std::sync::atomic::Ordering::Relaxed);
        }
        async move {
        if body.contains("Deferred") {
            let mut enc =
                flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
            enc.write_all(
                br#"[{"message":"TotalRequests Limit exceeded.","errorCode":"REQUEST_LIMIT_EXCEEDED"}]"#,
            )
            .expect("gzip");
            return http::Response::builder()
                .status(403)
                .header("content-type", "application/json;charset=UTF-8")
                .header("content-encoding", "gzip")
                .body(Full::new(Bytes::from(enc.finish().expect("gzip"))))
                .expect("response");
        }
        created()
        }
    })
    .await;
    let sim = sim::spawn(SimOptions::default()).await.expect("sim");
    let env = start_with(sim, &config_text(&upstream, "", DEFER)).await;
    let url = format!("{}/d/services/data/v62.0/sobjects/Contact", env.proxy);
    let headers = [
        ("authorization", "Bearer 00Dsession"),
        ("content-type", "application/json"),
        ("accept-encoding", "gzip"),
    ];
    let (status, _, _) = env
        .http
        .send(Method::POST, &url, &headers, r#"{"LastName":"Live"}"#)
        .await;
    assert_eq!(status, StatusCode::CREATED, "the burst token");
    let accepted = deferred(&env.http, &url, &headers, r#"{"LastName":"Deferred"}"#).await;
    let status_url = accepted["status_url"]
        .as_str()
        .expect("status_url")
        .to_owned();

    eventually(10, "the replay reached the origin", || async {
        count(&seen, r#"{"LastName":"Deferred"}"#) >= 1
    })
    .await;
    let read = || status_of(&env.http, &status_url);
    eventually(10, "the replay's outcome recorded", || async {
        read().await["state"] != "in_flight"
    })
    .await;
    // Salesforce said the org is out of calls: the call waits (the org's probe is minutes
    // away), its error recorded, no attempt used.
    let state = read().await;
    assert_eq!(state["state"], "pending", "{state}");
    assert_eq!(state["attempts"], 0, "{state}");
    assert!(
        state["last_error"]
            .as_str()
            .is_some_and(|e| e.contains("REQUEST_LIMIT_EXCEEDED")),
        "{state}"
    );
    let usage = env.usage().await;
    assert_eq!(usage["orgs"][0]["exhausted"], true, "{usage}");
    assert!(
        !asked_for_gzip.load(std::sync::atomic::Ordering::Relaxed),
        "the replay asked for a compressed answer"
    );
}

/// An origin that answers the deferred call (its body names "Deferred") after 800 ms, and
/// every other call at once.
async fn slow_on_the_deferred_call() -> (String, Arc<Mutex<Vec<String>>>) {
    origin(|body: String, _n, _headers| async move {
        if body.contains("Deferred") {
            tokio::time::sleep(Duration::from_millis(800)).await;
        }
        created()
    })
    .await
}

/// The proxy (`DEFER`, its store in `dir`, `shutdown_grace` as given) in front of `upstream`:
/// a live call takes the rate's token, the next is deferred, and its replay has reached the
/// origin (`seen`). Returns the server, its config, the store's path and the deferred call's id.
async fn a_deferred_call_on_its_way(
    upstream: &str,
    dir: &Path,
    seen: &Mutex<Vec<String>>,
    grace: &str,
    method: Method,
) -> (
    app::Server,
    config::Config,
    std::path::PathBuf,
    callmeter::store::DeferredId,
) {
    let db = dir.join("callmeter.db");
    let toml = config_text(upstream, "", DEFER)
        .replace("STORE_PATH", &db.display().to_string())
        .replace(
            r#"shutdown_grace = "2s""#,
            &format!("shutdown_grace = {grace:?}"),
        );
    let cfg = config::parse(&toml, Path::new("test.toml")).expect("config");
    let http = Http::new();
    let server = app::start(&cfg).await.expect("start");
    let url = format!(
        "http://{}/d/services/data/v62.0/sobjects/Contact",
        server.listener("main").expect("main")
    );
    let live = http
        .send(Method::POST, &url, &[], r#"{"LastName":"Live"}"#)
        .await;
    assert_eq!(live.0, StatusCode::CREATED);
    let record = format!("{url}/003000000000001");
    let accepted = deferred_by(&http, method, &record, &[], r#"{"LastName":"Deferred"}"#).await;
    let id = accepted["id"]
        .as_str()
        .expect("id")
        .parse()
        .expect("number");
    eventually(10, "the replay reached the origin", || async {
        count(seen, r#"{"LastName":"Deferred"}"#) == 1
    })
    .await;
    (server, cfg, db, callmeter::store::DeferredId(id))
}

/// A graceful shutdown (SIGTERM, a deploy) while a deferred call is being replayed lets that
/// replay finish and record it (within `shutdown_grace`), so the next start does not send it to
/// Salesforce a second time: that happens only after a crash.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_graceful_shutdown_during_a_replay_does_not_send_the_call_twice() {
    let (upstream, seen) = slow_on_the_deferred_call().await;
    let dir = tempfile::tempdir().expect("tempdir");
    // A grace far above the origin's 800 ms: a loaded machine must not cut the replay off.
    let (server, cfg, db, id) =
        a_deferred_call_on_its_way(&upstream, dir.path(), &seen, "20s", Method::POST).await;
    // The replay is on its way to Salesforce: now the SRE restarts the proxy.
    server.shutdown().await;
    let after_shutdown = callmeter::store::Store::open(&db)
        .expect("store")
        .get_deferred(id)
        .expect("read")
        .expect("the call")
        .state;
    let server = app::start(&cfg).await.expect("restart");
    tokio::time::sleep(Duration::from_secs(3)).await;
    let sends = count(&seen, r#"{"LastName":"Deferred"}"#);
    server.shutdown().await;
    assert_eq!(
        sends, 1,
        "Salesforce got the deferred call {sends} times; after the graceful shutdown it was \
         {after_shutdown}"
    );
}

/// The store is briefly locked (an SRE's `sqlite3` session in a write transaction, a VACUUM,
/// a full disk) while a replay's answer comes back: once it is writable again, the outcome is
/// recorded. It was dropped: the delivered call stayed `in_flight` (its status URL never said
/// delivered, the admin could neither retry nor discard it) and was sent again at the next
/// start.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replay_outcome_is_recorded_once_the_store_is_writable_again() {
    let (upstream, seen) = slow_on_the_deferred_call().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let (server, _, db, id) =
        a_deferred_call_on_its_way(&upstream, dir.path(), &seen, "20s", Method::POST).await;
    // While Salesforce answers, someone holds the store's write lock for 6 s.
    let locker = {
        let db = db.clone();
        tokio::task::spawn_blocking(move || {
            let conn = rusqlite::Connection::open(&db).expect("open");
            conn.execute_batch("BEGIN IMMEDIATE").expect("lock");
            std::thread::sleep(Duration::from_secs(6));
            conn.execute_batch("COMMIT").expect("unlock");
        })
    };
    locker.await.expect("locker");
    let store = callmeter::store::Store::open_read_only(&db).expect("store");
    let mut state = None;
    for _ in 0..50 {
        state = Some(
            store
                .get_deferred(id)
                .expect("read")
                .expect("the call")
                .state,
        );
        if state == Some(callmeter::store::DeferredState::Delivered) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    server.shutdown().await;
    assert_eq!(
        state,
        Some(callmeter::store::DeferredState::Delivered),
        "Salesforce answered 201 to the one send, the store is writable again, yet the call \
         is still recorded as {state:?}"
    );
}

/// Salesforce answered `201 Created` to a replayed call, then the connection broke while the
/// body of that answer was being read. The call was done (the status says so); sending it
/// again creates the record twice. The replayer retries it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replay_answered_201_is_not_sent_again_when_its_body_breaks_off() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let sends = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let sends2 = sends.clone();
    let port = raw_origin(move |mut tcp| {
        let sends = sends2.clone();
        async move {
            let mut buf = Vec::new();
            loop {
                // One request: headers, then a Content-Length body.
                let mut chunk = [0u8; 4096];
                let Ok(n) = tcp.read(&mut chunk).await else {
                    return;
                };
                if n == 0 {
                    return;
                }
                buf.extend_from_slice(&chunk[..n]);
                let text = String::from_utf8_lossy(&buf).into_owned();
                let Some(end) = text.find("\r\n\r\n") else {
                    continue;
                };
                let len = text[..end]
                    .lines()
                    .find_map(|l| {
                        let (k, v) = l.split_once(':')?;
                        k.eq_ignore_ascii_case("content-length")
                            .then(|| v.trim().parse::<usize>().ok())?
                    })
                    .unwrap_or(0);
                if buf.len() < end + 4 + len {
                    continue;
                }
                let body = String::from_utf8_lossy(&buf[end + 4..end + 4 + len]).into_owned();
                buf.drain(..end + 4 + len);
                let ok = b"{\"id\":\"003000000000001AAA\",\"success\":true,\"errors\":[]}";
                if body.contains("Deferred") {
                    sends.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    // Created; the answer's body breaks off half way.
                    let head = format!(
                        "HTTP/1.1 201 Created\r\ncontent-type: application/json\r\n\
                         sforce-limit-info: api-usage=10/15000\r\ncontent-length: {}\r\n\r\n",
                        ok.len()
                    );
                    let _ = tcp.write_all(head.as_bytes()).await;
                    let _ = tcp.write_all(&ok[..10]).await;
                    let _ = tcp.flush().await;
                    return; // connection closed mid-body
                }
                let head = format!(
                    "HTTP/1.1 201 Created\r\ncontent-type: application/json\r\n\
                     sforce-limit-info: api-usage=10/15000\r\ncontent-length: {}\r\n\r\n",
                    ok.len()
                );
                let _ = tcp.write_all(head.as_bytes()).await;
                let _ = tcp.write_all(ok).await;
            }
        }
    })
    .await;
    let sim = sim::spawn(SimOptions::default()).await.expect("sim");
    let env = start_with(
        sim,
        &config_text(&format!("http://127.0.0.1:{port}"), "", DEFER),
    )
    .await;
    let url = format!("{}/d/services/data/v62.0/sobjects/Contact", env.proxy);
    let (status, _, _) = env
        .http
        .send(Method::POST, &url, &[], r#"{"LastName":"Live"}"#)
        .await;
    assert_eq!(status, StatusCode::CREATED, "the burst token");
    deferred(&env.http, &url, &[], r#"{"LastName":"Deferred"}"#).await;
    eventually(10, "the replay reached the origin", || async {
        sends.load(std::sync::atomic::Ordering::SeqCst) >= 1
    })
    .await;
    // The retry backoff after a first attempt is 1 s (plus the rate's 1 s token).
    tokio::time::sleep(Duration::from_secs(4)).await;
    let n = sends.load(std::sync::atomic::Ordering::SeqCst);
    assert_eq!(
        n, 1,
        "Salesforce answered 201 Created, yet the call was sent {n} times"
    );
}

/// A deferred call whose org has no integration using `on_limit = "defer"` after a restart
/// (the config changed) is marked failed, to wait in the admin's list, rather than pending for
/// ever with nobody to send it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_of_an_org_no_longer_deferring_are_marked_failed_at_start() {
    let sim = sim::spawn(SimOptions::default()).await.expect("sim");
    let dir = tempfile::tempdir().expect("tempdir");
    let db = dir.path().join("callmeter.db");
    let with = |on_limit: &str| {
        let integration = format!(
            "[[integration]]\nid = \"d\"\norg = \"acme\"\nmatch = {{ path_prefix = \"/d\" }}\n\
             quota = 1\non_limit = \"{on_limit}\"\n"
        );
        let toml = config_text(&sim.url, "", &integration)
            .replace("STORE_PATH", &db.display().to_string());
        config::parse(&toml, Path::new("test.toml")).expect("config")
    };
    let http = Http::new();
    let server = app::start(&with("defer")).await.expect("start");
    let url = format!(
        "http://{}/d/services/data/v62.0/sobjects/Contact",
        server.listener("main").expect("main")
    );
    let auth = [("authorization", "Bearer 00Dsession")];
    assert_eq!(
        http.send(Method::POST, &url, &auth, r#"{"LastName":"A"}"#)
            .await
            .0,
        StatusCode::CREATED,
        "the quota's one call"
    );
    let accepted = deferred(&http, &url, &auth, r#"{"LastName":"B"}"#).await;
    let id = callmeter::store::DeferredId(accepted["id"].as_str().expect("id").parse().expect("n"));
    server.shutdown().await;

    let server = app::start(&with("reject")).await.expect("restart");
    let call = callmeter::store::Store::open_read_only(&db)
        .expect("store")
        .get_deferred(id)
        .expect("read")
        .expect("the call");
    server.shutdown().await;
    assert_eq!(
        call.state,
        callmeter::store::DeferredState::Failed,
        "{call:?}"
    );
    assert!(
        call.last_error
            .as_deref()
            .is_some_and(|e| e.contains("on_limit = \"defer\"")),
        "{call:?}"
    );
}

/// Salesforce's answer when the org is out of calls for the day.
fn limit_exceeded() -> http::Response<Full<Bytes>> {
    http::Response::builder()
        .status(403)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from_static(
            br#"[{"message":"TotalRequests Limit exceeded.","errorCode":"REQUEST_LIMIT_EXCEEDED"}]"#,
        )))
        .expect("response")
}

/// A deferring integration `d` (with `extra` keys) in front of `upstream`, probing every
/// second, whose first live call Salesforce refused for the daily limit: the org is exhausted.
/// The env and the Contact URL.
async fn exhausted_by_salesforce(upstream: &str, extra: &str) -> (Env, String) {
    let sim = sim::spawn(SimOptions::default()).await.expect("sim");
    let integration = format!(
        "[[integration]]\nid = \"d\"\norg = \"acme\"\nmatch = {{ path_prefix = \"/d\" }}\n\
         on_limit = \"defer\"\n{extra}"
    );
    let org = r#"probe_interval = "1s""#;
    let env = start_with(sim, &config_text(upstream, org, &integration)).await;
    let url = format!("{}/d/services/data/v62.0/sobjects/Contact", env.proxy);
    let (status, _, _) = env
        .http
        .send(Method::POST, &url, &[], r#"{"LastName":"Live"}"#)
        .await;
    assert_eq!(
        status,
        StatusCode::FORBIDDEN,
        "Salesforce's own limit error"
    );
    (env, url)
}

/// A replayed call can be the probe of an exhausted org: when Salesforce takes it, the org is
/// no longer exhausted (a success without a usage report said nothing before, so the org
/// stayed closed to live calls until a report came).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replay_that_probes_an_exhausted_org_ends_the_exhaustion() {
    let (upstream, _seen) = origin(|body: String, _n, _headers| async move {
        if body.contains("Live") {
            return limit_exceeded();
        }
        // Taken, without a usage report.
        http::Response::builder()
            .status(201)
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from_static(br#"{"success":true}"#)))
            .expect("response")
    })
    .await;
    let (env, url) = exhausted_by_salesforce(&upstream, "").await;
    assert_eq!(env.usage().await["orgs"][0]["exhausted"], true);
    deferred(&env.http, &url, &[], r#"{"LastName":"Deferred"}"#).await;
    eventually(15, "the replay's success ended the exhaustion", || async {
        env.usage().await["orgs"][0]["exhausted"] == false
    })
    .await;
}

/// A limited call of a deferring integration whose upload the client breaks off was never
/// answered with a limit: a `client_error`, not a rejection (no rejection alert for it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deferred_upload_broken_off_is_a_client_error_not_a_rejection() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (env, _, _) = burst_token_spent().await;
    let addr = env.proxy.trim_start_matches("http://").to_owned();
    let mut tcp = tokio::net::TcpStream::connect(&addr)
        .await
        .expect("connect");
    tcp.write_all(
        b"POST /d/services/data/v62.0/sobjects/Contact HTTP/1.1\r\nhost: x\r\n\
          authorization: Bearer 00Dsession\r\ncontent-type: application/json\r\n\
          content-length: 100\r\n\r\n{\"LastName\"",
    )
    .await
    .expect("write");
    tokio::time::sleep(Duration::from_millis(200)).await;
    tcp.shutdown().await.expect("half-close");
    let mut resp = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), tcp.read_to_end(&mut resp)).await;
    let resp = String::from_utf8_lossy(&resp);
    assert!(resp.starts_with("HTTP/1.1 400"), "{resp}");
    let metrics = env.metrics().await;
    let lines: Vec<&str> = metrics
        .lines()
        .filter(|l| l.starts_with("callmeter_requests_total"))
        .collect();
    assert!(
        metrics.contains(r#"outcome="client_error"} 1"#),
        "{lines:#?}"
    );
    assert!(!metrics.contains(r#"outcome="rejected""#), "{lines:#?}");
}

/// A limited call whose body ends with trailers is not stored: the store keeps a call's head and
/// body, and the call replayed without its trailers would not be the one the client sent. The
/// client hears why, as it does for a body too large to store.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_limited_call_with_trailers_is_refused_not_stored_without_them() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (env, _, _) = burst_token_spent().await;
    let addr = env.proxy.trim_start_matches("http://").to_owned();
    let mut tcp = tokio::net::TcpStream::connect(&addr)
        .await
        .expect("connect");
    tcp.write_all(
        b"POST /d/services/data/v62.0/sobjects/Contact HTTP/1.1\r\nhost: x\r\n\
          authorization: Bearer 00Dsession\r\ncontent-type: application/json\r\n\
          transfer-encoding: chunked\r\ntrailer: x-request-sum\r\nconnection: close\r\n\r\n\
          2\r\n{}\r\n0\r\nx-request-sum: def\r\n\r\n",
    )
    .await
    .expect("write");
    let mut resp = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), tcp.read_to_end(&mut resp)).await;
    let resp = String::from_utf8_lossy(&resp);
    assert!(resp.starts_with("HTTP/1.1 403"), "{resp}");
    assert!(
        resp.contains("REQUEST_LIMIT_EXCEEDED") && resp.contains("trailers"),
        "{resp}"
    );
    let metrics = env.metrics().await;
    let stored: Vec<&str> = metrics
        .lines()
        .filter(|l| l.starts_with("callmeter_deferred_calls{") && !l.ends_with(" 0"))
        .collect();
    assert!(stored.is_empty(), "nothing stored: {stored:?}");
}

/// An org out of calls for hours (a nightly ETL spent it) is the very case `defer` is for: the
/// call waits and is sent when budget is back. While the org is exhausted the replayer sends
/// the oldest deferred call as the org's probe once per `probe_interval`; Salesforce's
/// REQUEST_LIMIT_EXCEEDED to it uses no attempt (it made every such call `failed` after
/// `max_attempts` probes, 8 = 40 min at the defaults).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deferred_call_waits_out_an_exhausted_org_without_using_attempts() {
    let (upstream, seen) =
        origin(|_body: String, _n, _headers| async move { limit_exceeded() }).await;
    let (env, url) = exhausted_by_salesforce(&upstream, "defer = { max_attempts = 3 }\n").await;
    let accepted = deferred(&env.http, &url, &[], r#"{"LastName":"Deferred"}"#).await;
    let status_url = accepted["status_url"]
        .as_str()
        .expect("status_url")
        .to_owned();
    // More probes than max_attempts: the org is still out of calls.
    eventually(30, "four probes sent", || async {
        count(&seen, r#"{"LastName":"Deferred"}"#) >= 4
    })
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let state = status_of(&env.http, &status_url).await;
    assert_eq!(env.usage().await["orgs"][0]["exhausted"], true);
    assert_eq!(state["state"], "pending", "{state}");
    assert_eq!(state["attempts"], 0, "{state}");
    assert!(
        state["last_error"]
            .as_str()
            .is_some_and(|e| e.contains("REQUEST_LIMIT_EXCEEDED")),
        "{state}"
    );
    // Salesforce counted none of the calls it refused: neither does the integration.
    assert_eq!(env.window("d").await, 0);
}

/// A replay whose answer is slower than the org's `response_timeout` may well have been done
/// by Salesforce: it is not sent again (a second Contact) but `failed`, its outcome unknown,
/// for the admin to check and retry or discard. It was sent again, although the README
/// promised "exactly-once on the normal path".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replay_that_times_out_is_failed_for_the_admin_not_sent_twice() {
    let (upstream, seen) = origin(|body: String, n, _headers| async move {
        if body.contains("Deferred") && n == 0 {
            // Salesforce takes the insert, but answers after the proxy's response timeout.
            tokio::time::sleep(Duration::from_secs(3)).await;
        }
        created()
    })
    .await;
    let sim = sim::spawn(SimOptions::default()).await.expect("sim");
    let env = start_with(
        sim,
        &config_text(&upstream, r#"response_timeout = "1s""#, DEFER),
    )
    .await;
    let url = format!("{}/d/services/data/v62.0/sobjects/Contact", env.proxy);
    let live = env
        .http
        .send(Method::POST, &url, &[], r#"{"LastName":"Live"}"#)
        .await;
    assert_eq!(live.0, StatusCode::CREATED, "the burst token");
    let accepted = deferred(&env.http, &url, &[], r#"{"LastName":"Deferred"}"#).await;
    let status_url = accepted["status_url"]
        .as_str()
        .expect("status_url")
        .to_owned();
    eventually(10, "the replay reached the origin", || async {
        count(&seen, r#"{"LastName":"Deferred"}"#) >= 1
    })
    .await;
    eventually(10, "the replay failed", || async {
        status_of(&env.http, &status_url).await["state"] == "failed"
    })
    .await;
    tokio::time::sleep(Duration::from_secs(4)).await;
    let sends = count(&seen, r#"{"LastName":"Deferred"}"#);
    assert_eq!(
        sends, 1,
        "Salesforce received the deferred insert {sends} times"
    );
    let state = status_of(&env.http, &status_url).await;
    assert_eq!(state["state"], "failed", "{state}");
    assert!(
        state["last_error"]
            .as_str()
            .is_some_and(|e| e.contains("outcome unknown") && e.contains("may have applied")),
        "{state}"
    );
}

/// A gateway between the proxy and Salesforce's servers answering 504 gave up waiting for them,
/// which may have done the work: like the proxy's own timeout, the call is failed for the
/// admin, not sent again. A 503 (Salesforce did not process it) is retried, and so is a 504
/// to an idempotent call (a PUT): sending it twice does it once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replay_answered_504_is_failed_for_the_admin_and_503_is_retried() {
    let (upstream, seen) = origin(|body: String, n, _headers| async move {
        let status = match (body.as_str(), n) {
            (r#"{"LastName":"Gateway"}"#, _) => 504,
            (r#"{"LastName":"Busy"}"#, 0) => 503,
            (r#"{"LastName":"Put"}"#, 0) => 504,
            _ => return created(),
        };
        http::Response::builder()
            .status(status)
            .body(Full::new(Bytes::new()))
            .expect("response")
    })
    .await;
    let sim = sim::spawn(SimOptions::default()).await.expect("sim");
    let env = start_with(sim, &config_text(&upstream, "", DEFER)).await;
    let url = format!("{}/d/services/data/v62.0/sobjects/Contact", env.proxy);
    let live = env
        .http
        .send(Method::POST, &url, &[], r#"{"LastName":"Live"}"#)
        .await;
    assert_eq!(live.0, StatusCode::CREATED, "the burst token");
    let gateway = deferred(&env.http, &url, &[], r#"{"LastName":"Gateway"}"#).await;
    let busy = deferred(&env.http, &url, &[], r#"{"LastName":"Busy"}"#).await;
    let record = format!("{url}/003000000000001");
    let put = deferred_by(
        &env.http,
        Method::PUT,
        &record,
        &[],
        r#"{"LastName":"Put"}"#,
    )
    .await;
    let read = |accepted: &serde_json::Value| {
        let url = accepted["status_url"]
            .as_str()
            .expect("status_url")
            .to_owned();
        let http = env.http.clone();
        async move { status_of(&http, &url).await }
    };
    eventually(20, "the replays settled", || async {
        read(&gateway).await["state"] == "failed"
            && read(&busy).await["state"] == "delivered"
            && read(&put).await["state"] == "delivered"
    })
    .await;
    assert_eq!(count(&seen, r#"{"LastName":"Put"}"#), 2);
    let state = read(&gateway).await;
    assert_eq!(state["upstream_status"], 504, "{state}");
    assert!(
        state["last_error"]
            .as_str()
            .is_some_and(|e| e.contains("outcome unknown")),
        "{state}"
    );
    assert_eq!(count(&seen, r#"{"LastName":"Gateway"}"#), 1);
    assert_eq!(count(&seen, r#"{"LastName":"Busy"}"#), 2);
}

/// A deferred call (`method`, store in `dir`) whose replay a shutdown with 200 ms of grace cut
/// off while the origin took 4 s to answer: the config to start again with, the store, the
/// call's id and what the origin saw.
async fn a_replay_cut_off_by_shutdown(
    dir: &Path,
    method: Method,
) -> (
    config::Config,
    std::path::PathBuf,
    callmeter::store::DeferredId,
    Arc<Mutex<Vec<String>>>,
) {
    let (upstream, seen) = origin(|body: String, _n, _headers| async move {
        if body.contains("Deferred") {
            tokio::time::sleep(Duration::from_secs(4)).await;
        }
        created()
    })
    .await;
    let (server, cfg, db, id) =
        a_deferred_call_on_its_way(&upstream, dir, &seen, "200ms", method).await;
    server.shutdown().await;
    (cfg, db, id, seen)
}

/// A shutdown whose grace runs out while a replay waits for Salesforce's answer leaves the call
/// in flight. The next start cannot know whether Salesforce applied it: the call is failed, its
/// outcome unknown, for the admin; it was sent again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replay_cut_off_by_shutdown_is_failed_at_the_next_start_not_sent_again() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (cfg, db, id, seen) = a_replay_cut_off_by_shutdown(dir.path(), Method::POST).await;
    assert_eq!(
        stored(&db, id).state,
        callmeter::store::DeferredState::InFlight
    );

    let server = app::start(&cfg).await.expect("restart");
    tokio::time::sleep(Duration::from_secs(3)).await;
    let call = stored(&db, id);
    let sends = count(&seen, r#"{"LastName":"Deferred"}"#);
    server.shutdown().await;
    assert_eq!(sends, 1, "Salesforce got the deferred call {sends} times");
    assert_eq!(
        call.state,
        callmeter::store::DeferredState::Failed,
        "{call:?}"
    );
    assert!(
        call.last_error
            .as_deref()
            .is_some_and(|e| e.contains("outcome unknown")),
        "{call:?}"
    );
}

/// An idempotent call (a PUT) cut off by a shutdown is sent again at the next start, the
/// cut-off send counting as an attempt; cut off at every start, as in a crash loop, it is
/// failed for the admin once its `max_attempts` (2 here) are spent, not sent for ever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idempotent_replay_cut_off_at_every_start_stops_at_max_attempts() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (cfg, db, id, seen) = a_replay_cut_off_by_shutdown(dir.path(), Method::PUT).await;
    let sends = || count(&seen, r#"{"LastName":"Deferred"}"#);

    let server = app::start(&cfg).await.expect("first restart");
    eventually(10, "the PUT was sent again", || async { sends() == 2 }).await;
    server.shutdown().await;
    let call = stored(&db, id);
    assert_eq!(
        (call.state, call.attempts),
        (callmeter::store::DeferredState::InFlight, 1),
        "{call:?}"
    );

    let server = app::start(&cfg).await.expect("second restart");
    tokio::time::sleep(Duration::from_secs(2)).await;
    let call = stored(&db, id);
    server.shutdown().await;
    assert_eq!(sends(), 2, "not sent a third time");
    assert_eq!(
        (call.state, call.attempts),
        (callmeter::store::DeferredState::Failed, 2),
        "{call:?}"
    );
}

/// A call worth more than the integration's quota can ever hold (a batch of 11 against a quota
/// of 10) is refused at once, saying so, and not stored: replayed, it could never fit, and
/// would hold the integration's later calls back for ever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_larger_than_the_quota_is_refused_not_deferred() {
    let integration =
        "[[integration]]\nid = \"d\"\norg = \"acme\"\nmatch = { path_prefix = \"/d\" }\n\
         quota = 10\non_limit = \"defer\"\n";
    let env = start(SimOptions::default(), "", integration).await;
    let url = format!("{}/d/services/data/v62.0/composite/batch", env.proxy);
    let json = [("content-type", "application/json")];
    let (status, headers, body) = env
        .http
        .send(Method::POST, &url, &json, composite_batch(11))
        .await;
    let body = String::from_utf8_lossy(&body);
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    assert!(
        body.contains("REQUEST_LIMIT_EXCEEDED") && body.contains("can ever hold"),
        "{body}"
    );
    assert!(
        headers.get("retry-after").is_none(),
        "waiting would not help"
    );
    let metrics = env.metrics().await;
    let stored: Vec<&str> = metrics
        .lines()
        .filter(|l| l.starts_with("callmeter_deferred_calls{") && !l.ends_with(" 0"))
        .collect();
    assert!(stored.is_empty(), "nothing stored: {stored:?}");
    assert!(metrics.contains(r#"outcome="rejected"} 1"#), "{metrics}");
}

/// A deferring integration `d` with `quota`, its store on disk at `db` (kept over restarts).
fn deferring_with_quota(sim: &str, db: &Path, quota: u64) -> config::Config {
    let integration = format!(
        "[[integration]]\nid = \"d\"\norg = \"acme\"\nmatch = {{ path_prefix = \"/d\" }}\n\
         quota = {quota}\non_limit = \"defer\"\n"
    );
    let toml = config_text(sim, "", &integration).replace("STORE_PATH", &db.display().to_string());
    config::parse(&toml, Path::new("test.toml")).expect("config")
}

/// Spends one call of `d`'s quota on `server`, then defers `body` to `resource` (which the
/// test expects limited): the deferred call's id.
async fn one_call_then_deferred(
    server: &app::Server,
    resource: &str,
    body: String,
) -> callmeter::store::DeferredId {
    let http = Http::new();
    let base = format!(
        "http://{}/d/services/data/v62.0",
        server.listener("main").expect("main")
    );
    let json = [("content-type", "application/json")];
    let contact = format!("{base}/sobjects/Contact");
    let one = http
        .send(Method::POST, &contact, &json, r#"{"LastName":"A"}"#)
        .await;
    assert_eq!(one.0, StatusCode::CREATED);
    let accepted = deferred(&http, &format!("{base}/{resource}"), &json, body).await;
    callmeter::store::DeferredId(accepted["id"].as_str().expect("id").parse().expect("n"))
}

/// Call `id` as the store holds it, read beside the running proxy.
fn stored(db: &Path, id: callmeter::store::DeferredId) -> callmeter::store::DeferredCall {
    callmeter::store::Store::open_read_only(db)
        .expect("store")
        .get_deferred(id)
        .expect("read")
        .expect("the call")
}

/// Waits up to `secs` for call `id` to be delivered, then stops `server`.
async fn delivered_then_stop(
    server: app::Server,
    db: &Path,
    id: callmeter::store::DeferredId,
    secs: u64,
) {
    eventually(secs, "the call delivered", || async {
        stored(db, id).state == callmeter::store::DeferredState::Delivered
    })
    .await;
    server.shutdown().await;
}

/// A stored call that a restart with a smaller quota makes larger than the quota now holds
/// waits, saying why and using no attempt, and goes once a reload grows the quota back: it was
/// acknowledged with a 202, and the budget is the admin's to change.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stored_call_larger_than_a_shrunk_quota_waits_for_it_to_grow() {
    let sim = sim::spawn(SimOptions::default()).await.expect("sim");
    let dir = tempfile::tempdir().expect("tempdir");
    let db = dir.path().join("callmeter.db");
    let with = |quota| deferring_with_quota(&sim.url, &db, quota);
    let server = app::start(&with(6)).await.expect("start");
    // 1 + 6 > 6, but 6 fits the quota once the first call ages out: stored.
    let id = one_call_then_deferred(&server, "composite/batch", composite_batch(6)).await;
    server.shutdown().await;

    let server = app::start(&with(3)).await.expect("restart");
    eventually(10, "the call says why it waits", || async {
        stored(&db, id).last_error.is_some()
    })
    .await;
    let call = stored(&db, id);
    assert_eq!(
        call.state,
        callmeter::store::DeferredState::Pending,
        "{call:?}"
    );
    assert_eq!(call.attempts, 0, "{call:?}");
    assert!(
        call.last_error
            .as_deref()
            .is_some_and(|e| e.contains("worth 6 calls") && e.contains("quota of 3")),
        "{call:?}"
    );
    server.reload(&with(20));
    delivered_then_stop(server, &db, id, 20).await;
}

/// An admin pauses a deferring integration (a reload with `quota = 0`), then lifts the pause:
/// the calls it had stored wait the pause out and go. A budget of 0 is a pause, not a size no
/// call fits (which failed every stored call the moment the pause was applied).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_integrations_stored_calls_wait_out_the_pause() {
    let sim = sim::spawn(SimOptions::default()).await.expect("sim");
    let dir = tempfile::tempdir().expect("tempdir");
    let db = dir.path().join("callmeter.db");
    let with = |quota| deferring_with_quota(&sim.url, &db, quota);
    let server = app::start(&with(1)).await.expect("start");
    let body = r#"{"LastName":"B"}"#.to_owned();
    let id = one_call_then_deferred(&server, "sobjects/Contact", body).await;
    server.reload(&with(0));
    tokio::time::sleep(Duration::from_secs(1)).await;
    server.reload(&with(100));
    delivered_then_stop(server, &db, id, 10).await;
}

/// A SOAP call carries its session in the envelope, not in `Authorization`: what guards its
/// outcome (and the upstream body kept for it) is the status URL handed out with the 202,
/// which carries a tag no other client can make. Ids are sequential: the id alone, or with a
/// made-up tag, reads nothing. (With the id alone, anyone who reached the integration read
/// it.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deferred_soap_calls_status_is_readable_only_through_its_status_url() {
    let env = start(SimOptions::default(), "", DEFER).await;
    let (status, _, _) = env.soap_query("/d").await;
    assert_eq!(status, StatusCode::OK, "the burst token");
    let url = format!("{}/d/services/Soap/u/62.0/00D000000000001AAA", env.proxy);
    let accepted = deferred(&env.http, &url, &soap_headers("query"), SOAP_QUERY).await;
    let status_url = accepted["status_url"]
        .as_str()
        .expect("status_url")
        .to_owned();
    eventually(15, "the SOAP call delivered", || async {
        let (_, _, body) = env.http.get(&status_url, &[]).await;
        serde_json::from_slice::<serde_json::Value>(&body).unwrap_or_default()["state"]
            == "delivered"
    })
    .await;
    let (untagged, _) = status_url.rsplit_once('.').expect("a tag");
    for guessed in [
        untagged.to_owned(),
        format!("{untagged}.AAAAAAAAAAAAAAAAAAAAAA"),
    ] {
        for headers in [vec![], vec![("authorization", "Bearer someone-else")]] {
            let (status, _, body) = env.http.get(&guessed, &headers).await;
            assert_eq!(
                status,
                StatusCode::NOT_FOUND,
                "{guessed} read the SOAP call's outcome: {}",
                String::from_utf8_lossy(&body)
            );
        }
    }
}

/// The admin listener (on loopback) answers only requests that name it by an address or
/// `localhost`: a web page the admin visits can point a name of its own at 127.0.0.1 (DNS
/// rebinding) and would read, as its own origin, the open API: deferred calls' queries (SOQL
/// with customer data), usage, notify addresses.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_api_refuses_a_foreign_host() {
    let (env, _url, auth) = burst_token_spent().await;
    let query = format!(
        "{}/d/services/data/v62.0/query?q=SELECT+Id+FROM+Contact+WHERE+Email='ceo@customer.example'",
        env.proxy
    );
    let (status, _, _) = env.http.get(&query, &auth).await;
    assert_eq!(status, StatusCode::ACCEPTED, "the query is deferred");
    let list = format!("{}/api/v1/deferred", env.admin);
    let (status, _, body) = env
        .http
        .get(&list, &[("host", "rebind.attacker.example:9464")])
        .await;
    let body = String::from_utf8_lossy(&body);
    assert_eq!(status, StatusCode::MISDIRECTED_REQUEST, "{body}");
    assert!(!body.contains("customer.example"), "{body}");
    assert_eq!(env.http.get(&list, &[]).await.0, StatusCode::OK);
}

/// Writes `request` to `addr` on a new connection; all that comes back within 5 s.
async fn raw_exchange(addr: &str, request: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
    tcp.write_all(request.as_bytes()).await.expect("write");
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), tcp.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

/// The rebinding defence is for clients on this machine, whatever address the admin listener
/// is bound to: on `0.0.0.0` a local browser reaches it at 127.0.0.1 all the same. A request
/// that names no host at all (HTTP/1.0, a health checker's) comes from no browser: answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wildcard_admin_listener_refuses_a_rebinding_host_from_this_machine() {
    let sim = sim::spawn(SimOptions::default()).await.expect("sim");
    let toml = config_text(&sim.url, "", "").replacen(
        "listen = \"127.0.0.1:0\"",
        "listen = \"0.0.0.0:0\"",
        1,
    );
    assert!(toml.contains("0.0.0.0:0"), "the admin listener's line");
    let env = start_with(sim, &toml).await;
    let local = format!("127.0.0.1:{}", env.server.admin_addr.port());
    let rebound = raw_exchange(
        &local,
        "GET /api/v1/deferred HTTP/1.1\r\nHost: rebind.attacker.example:9464\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(rebound.starts_with("HTTP/1.1 421"), "{rebound}");
    let no_host = raw_exchange(&local, "GET /healthz HTTP/1.0\r\n\r\n").await;
    assert!(no_host.starts_with("HTTP/1.0 200"), "{no_host}");
}

/// review-session-diff: two orgs each with an integration "d" (ids are unique per org only),
/// acme's with max_attempts = 2, beta's with 50. An idempotent PUT of acme's "d", cut off
/// once already (attempts = 1) and found in flight at start, has spent acme's 2 attempts:
/// it must be failed, whatever beta's "d" allows. Each start builds its map afresh, so the
/// start is repeated: with the map keyed by integration id alone, beta's 50 wins about half
/// of the time and the call is sent a third time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_attempts_at_start_is_the_calls_own_orgs() {
    let dir = tempfile::tempdir().expect("tempdir");
    let db = dir.path().join("callmeter.db");
    // An origin that holds every call: a call set pending stays undecided while we look.
    let (upstream, _seen) = origin(|_body: String, _n, _headers| async move {
        tokio::time::sleep(Duration::from_secs(60)).await;
        created()
    })
    .await;
    let upstream = upstream.as_str();
    let toml = config_text(upstream, "", DEFER)
        .replace("STORE_PATH", &db.display().to_string())
        .replace(r#"shutdown_grace = "2s""#, r#"shutdown_grace = "100ms""#)
        + &format!(
            "[[org]]\nid = \"beta\"\ninstance_url = \"{upstream}\"\nallow_plain_http = true\n\
             [[integration]]\nid = \"d\"\norg = \"beta\"\nmatch = {{ path_prefix = \"/bd\" }}\n\
             rate = {{ per_second = 1, burst = 1 }}\non_limit = \"defer\"\ndefer = {{ max_attempts = 50 }}\n"
        );
    let cfg = config::parse(&toml, Path::new("test.toml")).expect("config");
    let mut resent = 0;
    for _ in 0..12 {
        let id = {
            let store = callmeter::store::Store::open(&db).expect("open");
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_millis() as u64;
            let id = store
                .defer(&callmeter::store::NewDeferred {
                    org: "acme".into(),
                    integration: "d".into(),
                    method: "PUT".into(),
                    path_and_query: "/services/data/v62.0/sobjects/Contact/003000000000001".into(),
                    headers: vec![],
                    body: b"{}".to_vec(),
                    units: 1,
                    created_ms: now,
                })
                .expect("defer");
            // Sent once and cut off (attempts = 1 after the retry), now in flight again.
            let claimed = store.claim_due("acme", now, 100, &[]).expect("claim");
            assert!(claimed.iter().any(|c| c.id == id));
            store.mark_retry(id, "cut off", now, now).expect("retry");
            let claimed = store.claim_due("acme", now, 100, &[]).expect("claim");
            assert!(claimed.iter().any(|c| c.id == id));
            id
        };
        let server = app::start(&cfg).await.expect("start");
        // Settled before `start` returns.
        let call = stored(&db, id);
        server.shutdown().await;
        if call.state != callmeter::store::DeferredState::Failed {
            resent += 1;
        }
    }
    assert_eq!(
        resent, 0,
        "acme's call, its 2 attempts spent, was set to be sent again"
    );
}
