//! End-to-end `on_limit = "defer"`: 202 and a status URL, replay when budget frees, the
//! admin's sync-failures list, and no acknowledged call lost across `kill -9`.

mod common;

use std::sync::Arc;
use std::time::Duration;

use callmeter::sim::{self, SimOptions};
use common::*;
use http::{Method, StatusCode};

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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limited_calls_are_stored_answered_202_and_replayed() {
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
        let read = || {
            let (http, status_url) = (env.http.clone(), status_url.clone());
            async move {
                let (_, _, body) = http
                    .get(&status_url, &[("authorization", "Bearer 00Dsession")])
                    .await;
                serde_json::from_slice::<serde_json::Value>(&body).unwrap_or_default()
            }
        };
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
