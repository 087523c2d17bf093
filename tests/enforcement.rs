//! End-to-end enforcement: budgets hold exactly under concurrency, and held-back calls are
//! answered the way Salesforce answers at its own limit.

mod common;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use callmeter::sim::SimOptions;
use common::*;
use http::StatusCode;

/// 256 connections, each making 6 calls of integration `a` one after the other: how many were
/// forwarded (200) and how many refused at a limit (403).
async fn calls_from_256_connections(env: &Arc<Env>) -> (u64, u64) {
    let (ok, limited) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let mut tasks = Vec::new();
    for _ in 0..256 {
        let (env, ok, limited) = (env.clone(), ok.clone(), limited.clone());
        tasks.push(tokio::spawn(async move {
            let http = Http::new();
            for _ in 0..6 {
                let url = format!("{}/a/services/data/v62.0/sobjects", env.proxy);
                match http.get(&url, &[]).await.0 {
                    StatusCode::OK => ok.fetch_add(1, Ordering::Relaxed),
                    StatusCode::FORBIDDEN => limited.fetch_add(1, Ordering::Relaxed),
                    other => panic!("unexpected {other}"),
                };
            }
        }));
    }
    for t in tasks {
        t.await.expect("task");
    }
    (ok.load(Ordering::Relaxed), limited.load(Ordering::Relaxed))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn budget_of_1000_under_256_connections_forwards_exactly_1000() {
    let env = Arc::new(
        start(
            SimOptions { limit: 1_000_000, ..Default::default() },
            "",
            "[[integration]]\nid = \"a\"\norg = \"acme\"\nmatch = { path_prefix = \"/a\" }\nquota = 1000\n",
        )
        .await,
    );
    let (ok, limited) = calls_from_256_connections(&env).await;
    assert_eq!(ok, 1_000);
    assert_eq!(limited, 256 * 6 - 1_000);
    assert_eq!(
        env.sim_count().await["used"],
        1_000,
        "Salesforce saw exactly the budget"
    );
    assert_eq!(env.window("a").await, 1_000);
    let metrics = env.metrics().await;
    assert!(metrics.contains(r#"callmeter_requests_total{api="rest",integration="a",org="acme",outcome="rejected"} 536"#), "{metrics}");
}

#[tokio::test]
async fn rejections_look_like_salesforce_with_retry_after() {
    let env = start(
        SimOptions::default(),
        r#"daily_limit = 100
reserve = 10
probe_interval = "5m""#,
        "[[integration]]\nid = \"a\"\norg = \"acme\"\nmatch = { path_prefix = \"/a\" }\nquota = 2\n\
         [[integration]]\nid = \"b\"\norg = \"acme\"\nmatch = { path_prefix = \"/b\" }\nreject_style = \"http429\"\nrate = { per_second = 1, burst = 1 }\n\
         [[integration]]\nid = \"c\"\norg = \"acme\"\nmatch = { path_prefix = \"/c\" }\nreject_style = \"http429\"\nrate = { per_second = 0.1, burst = 1 }\n\
         [[integration]]\nid = \"d\"\norg = \"acme\"\nmatch = { path_prefix = \"/d\" }\nreject_style = \"http429\"\nmax_in_flight = 1\n",
    )
    .await;
    let rest = format!("{}/a/services/data/v62.0/sobjects", env.proxy);
    // Counted responses say what is left (IETF RateLimit headers; partition key "a").
    let (status, headers, _) = env.http.get(&rest, &[]).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        headers["ratelimit-policy"],
        r#""quota";q=2;w=86400;pk=:YQ==:, "daily";q=90;w=86400;pk=:YQ==:"#
    );
    assert_eq!(
        headers["ratelimit"],
        r#""quota";r=1;pk=:YQ==:, "daily";r=89;pk=:YQ==:"#
    );
    assert_eq!(env.http.get(&rest, &[]).await.0, StatusCode::OK);
    // REST: 403 REQUEST_LIMIT_EXCEEDED, saying which budget and when to retry.
    let (status, headers, body) = env.http.get(&rest, &[]).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let err: serde_json::Value = serde_json::from_slice(&body).expect("JSON");
    assert_eq!(err[0]["errorCode"], "REQUEST_LIMIT_EXCEEDED");
    let message = err[0]["message"].as_str().expect("message");
    assert!(message.contains("quota of 2 calls per 24h"), "{message}");
    let retry: u64 = headers["retry-after"]
        .to_str()
        .expect("ascii")
        .parse()
        .expect("seconds");
    // The quota frees when the first calls leave the 24 h window, once the minute 24 h after
    // theirs has ended: within a minute after 24 h (from a minute before, should a minute end
    // between the calls and the refusal; plus a second of clock lag).
    assert!((86_340..=86_461).contains(&retry), "Retry-After {retry}");
    assert!(
        message.contains(&format!("retry after {retry} s")),
        "{message}"
    );

    // SOAP: HTTP 500 SOAP fault sf:REQUEST_LIMIT_EXCEEDED.
    let (status, headers, body) = env.soap_query("/a").await;
    assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR);
    let text = String::from_utf8_lossy(&body);
    assert!(
        text.contains("<faultcode>sf:REQUEST_LIMIT_EXCEEDED</faultcode>"),
        "{text}"
    );
    assert!(headers.contains_key("retry-after"));

    // 429 style, rate budget: Retry-After of the next token, RateLimit headers.
    let other = format!("{}/b/services/data/v62.0/sobjects", env.proxy);
    assert_eq!(env.http.get(&other, &[]).await.0, StatusCode::OK);
    let (status, headers, _) = env.http.get(&other, &[]).await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(headers["retry-after"], "1");
    assert_eq!(headers["ratelimit-policy"], r#""rate";q=1;w=1"#);
    assert_eq!(headers["ratelimit"], r#""rate";r=0;t=1"#);
    // A rate under one call a second is told in whole seconds, not as one call per second
    // (which a client following the policy would keep to, ten times too fast).
    let slow = format!("{}/c/services/data/v62.0/sobjects", env.proxy);
    assert_eq!(env.http.get(&slow, &[]).await.0, StatusCode::OK);
    let (status, headers, body) = env.http.get(&slow, &[]).await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(headers["ratelimit-policy"], r#""rate";q=1;w=10"#);
    let body = String::from_utf8_lossy(&body);
    assert!(body.contains("rate of 1 call per 10 seconds"), "{body}");
    // A cap on calls at once is no quota per window: Retry-After, and no RateLimit policy
    // (it said one call per day).
    let capped = format!("{}/d/services/data/v62.0/sobjects", env.proxy);
    let slow = env.http.get(&capped, &[("x-sim-delay-ms", "1500")]);
    let second = async {
        tokio::time::sleep(Duration::from_millis(300)).await;
        env.http.get(&capped, &[]).await
    };
    let (first, (status, headers, _)) = tokio::join!(slow, second);
    assert_eq!(first.0, StatusCode::OK);
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(headers["retry-after"], "1");
    assert!(
        headers.get("ratelimit-policy").is_none() && headers.get("ratelimit").is_none(),
        "{headers:?}"
    );
    assert_eq!(
        env.sim_count().await["used"],
        5,
        "nothing held back reached Salesforce"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queued_calls_leave_in_order_and_overflow_or_timeout_is_refused() {
    let env = Arc::new(
        start(
            SimOptions::default(),
            "",
            "[[integration]]\nid = \"q\"\norg = \"acme\"\nmatch = { path_prefix = \"/q\" }\n\
             rate = { per_second = 1, burst = 1 }\non_limit = \"queue\"\nqueue = { max_depth = 3, max_wait = \"10s\" }\n\
             [[integration]]\nid = \"t\"\norg = \"acme\"\nmatch = { path_prefix = \"/t\" }\nquota = 1\n\
             on_limit = \"queue\"\nqueue = { max_depth = 3, max_wait = \"300ms\" }\n",
        )
        .await,
    );
    let url = format!("{}/q/services/data/v62.0/sobjects", env.proxy);
    assert_eq!(
        env.http.get(&url, &[]).await.0,
        StatusCode::OK,
        "the burst token"
    );

    // Three calls queue (one token a second); they must come out in the order they went in.
    // Each is in the queue before the next is sent.
    let done = Arc::new(std::sync::Mutex::new(Vec::new()));
    let mut tasks = Vec::new();
    for n in 0..3 {
        let (env2, url, done) = (env.clone(), url.clone(), done.clone());
        tasks.push(tokio::spawn(async move {
            let (status, _, _) = env2.http.get(&url, &[]).await;
            done.lock().expect("lock").push((n, status));
        }));
        eventually(5, "the call queued", || async {
            env.usage().await["orgs"][0]["integrations"][0]["queue_depth"] == n + 1
        })
        .await;
    }
    // The queue is full: the next call is refused at once, Salesforce-style.
    let (status, headers, body) = env.http.get(&url, &[]).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert!(
        String::from_utf8_lossy(&body).contains("wait queue is full"),
        "{}",
        String::from_utf8_lossy(&body)
    );
    assert!(headers.contains_key("retry-after"));
    for t in tasks {
        t.await.expect("task");
    }
    let done = done.lock().expect("lock").clone();
    assert_eq!(
        done,
        vec![
            (0, StatusCode::OK),
            (1, StatusCode::OK),
            (2, StatusCode::OK)
        ]
    );
    assert!(env
        .metrics()
        .await
        .contains(r#"integration="q",org="acme",outcome="queued"} 3"#));

    // A call that cannot get budget within max_wait is refused when the wait is over.
    let url = format!("{}/t/services/data/v62.0/sobjects", env.proxy);
    assert_eq!(env.http.get(&url, &[]).await.0, StatusCode::OK);
    let started = std::time::Instant::now();
    let (status, _, body) = env.http.get(&url, &[]).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert!(started.elapsed() >= std::time::Duration::from_millis(300));
    let text = String::from_utf8_lossy(&body);
    assert!(
        text.contains("in the queue for budget") && text.contains("quota of 1 calls"),
        "{text}"
    );
    assert_eq!(env.sim_count().await["used"], 5);
}

/// A queued call whose client hangs up leaves the queue: it is neither forwarded nor counted,
/// and the budget it waited for goes to the next call. It is recorded once, as a
/// `client_error` (it was recorded with no outcome at all, so the requests-by-outcome panels
/// and error ratios undercounted exactly the calls that waited in vain).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_queued_call_whose_client_hangs_up_is_not_forwarded() {
    use tokio::io::AsyncWriteExt;
    let env = start(
        SimOptions::default(),
        "",
        "[[integration]]\nid = \"q\"\norg = \"acme\"\nmatch = { path_prefix = \"/q\" }\n\
         rate = { per_second = 1, burst = 1 }\non_limit = \"queue\"\nqueue = { max_depth = 3, max_wait = \"5s\" }\n",
    )
    .await;
    let url = format!("{}/q/services/data/v62.0/sobjects", env.proxy);
    assert_eq!(
        env.http.get(&url, &[]).await.0,
        StatusCode::OK,
        "the burst token"
    );

    // The next call waits for the token due in 1 s; its client leaves before that.
    let addr = env.proxy.trim_start_matches("http://");
    let mut client = tokio::net::TcpStream::connect(addr).await.expect("connect");
    client
        .write_all(b"GET /q/services/data/v62.0/sobjects HTTP/1.1\r\nHost: proxy\r\n\r\n")
        .await
        .expect("send");
    let mut depth = serde_json::Value::Null;
    for _ in 0..50 {
        depth = env.usage().await["orgs"][0]["integrations"][0]["queue_depth"].clone();
        if depth == 1 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    assert_eq!(depth, 1, "the call is queued");
    drop(client);

    // Well past the token's arrival: the abandoned call was dropped, not sent.
    tokio::time::sleep(std::time::Duration::from_millis(1800)).await;
    assert_eq!(
        env.sim_count().await["used"],
        1,
        "Salesforce saw only the first call"
    );
    assert_eq!(env.window("q").await, 1);
    let usage = env.usage().await;
    assert_eq!(
        usage["orgs"][0]["integrations"][0]["queue_depth"], 0,
        "{usage}"
    );
    let metrics = env.metrics().await;
    let lines: Vec<&str> = metrics
        .lines()
        .filter(|l| l.starts_with("callmeter_requests_total"))
        .collect();
    let recorded = |outcome: &str| {
        lines
            .iter()
            .any(|l| l.contains(&format!("outcome=\"{outcome}\"")) && l.ends_with(" 1"))
    };
    assert!(
        lines.len() == 2 && recorded("forwarded") && recorded("client_error"),
        "each request recorded once: {lines:#?}"
    );
    // The budget it waited for is the next call's.
    assert_eq!(env.http.get(&url, &[]).await.0, StatusCode::OK);
    assert_eq!(env.sim_count().await["used"], 2);
}

#[tokio::test]
async fn a_restart_keeps_the_window_and_the_budget_decisions() {
    let sim = callmeter::sim::spawn(SimOptions::default())
        .await
        .expect("sim");
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = on_disk(&sim.url, dir.path(), "", "quota = 5\n");
    let http = Http::new();

    let server = callmeter::app::start(&cfg).await.expect("start");
    let url = format!(
        "http://{}/a/services/data/v62.0/sobjects",
        server.listener("main").expect("main")
    );
    for _ in 0..3 {
        assert_eq!(http.get(&url, &[]).await.0, StatusCode::OK);
    }
    server.shutdown().await;

    let server = callmeter::app::start(&cfg).await.expect("restart");
    let url = format!(
        "http://{}/a/services/data/v62.0/sobjects",
        server.listener("main").expect("main")
    );
    let admin = format!("http://{}/api/v1/usage", server.admin_addr);
    let usage: serde_json::Value =
        serde_json::from_slice(&http.get(&admin, &[]).await.2).expect("JSON");
    assert_eq!(usage["orgs"][0]["integrations"][0]["window"], 3, "{usage}");
    assert_eq!(usage["orgs"][0]["proxied"], 3);
    // Quota 5: two more calls, then the budget is spent, as if there had been no restart.
    for _ in 0..2 {
        assert_eq!(http.get(&url, &[]).await.0, StatusCode::OK);
    }
    assert_eq!(http.get(&url, &[]).await.0, StatusCode::FORBIDDEN);
    server.shutdown().await;
}

/// The org's usage as Salesforce last reported it survives a restart: the proxy's own count
/// after it (one call) would show an org at 95 % as green until the next report, and budget
/// decisions would rest on that.
#[tokio::test]
async fn a_restart_keeps_the_usage_salesforce_reported() {
    let sim = callmeter::sim::spawn(SimOptions {
        limit: 1_000,
        used: 950,
        ..SimOptions::default()
    })
    .await
    .expect("sim");
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = on_disk(&sim.url, dir.path(), "", "");
    let http = Http::new();
    let org_usage = |server: &callmeter::app::Server| {
        let admin = format!("http://{}/api/v1/usage", server.admin_addr);
        let http = http.clone();
        async move {
            let usage: serde_json::Value =
                serde_json::from_slice(&http.get(&admin, &[]).await.2).expect("JSON");
            usage["orgs"][0].clone()
        }
    };
    let server = callmeter::app::start(&cfg).await.expect("start");
    let url = format!(
        "http://{}/a/services/data/v62.0/sobjects",
        server.listener("main").expect("main")
    );
    assert_eq!(http.get(&url, &[]).await.0, StatusCode::OK);
    assert_eq!(org_usage(&server).await["used"], 951);
    server.shutdown().await;

    let server = callmeter::app::start(&cfg).await.expect("restart");
    let org = org_usage(&server).await;
    server.shutdown().await;
    assert_eq!(
        (&org["used"], &org["limit"], &org["color"]),
        (&951.into(), &1_000.into(), &"red".into()),
        "{org}"
    );
}

/// A call counted while the proxy drains (its body still arriving at the stop signal: a SOAP
/// call is counted once its body's start is read) is in the windows saved at shutdown.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_counted_while_draining_is_saved_for_the_restart() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let sim = callmeter::sim::spawn(SimOptions::default())
        .await
        .expect("sim");
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = on_disk(&sim.url, dir.path(), "", "");
    let server = callmeter::app::start(&cfg).await.expect("start");
    let body = SOAP_QUERY.as_bytes();
    let mut tcp = tokio::net::TcpStream::connect(server.listener("main").expect("main"))
        .await
        .expect("connect");
    let head = format!(
        "POST /a/services/Soap/u/62.0/00D000000000001AAA HTTP/1.1\r\nhost: x\r\n\
         content-type: text/xml; charset=utf-8\r\nsoapaction: query\r\ncontent-length: {}\r\n\r\n",
        body.len()
    );
    tcp.write_all(head.as_bytes()).await.expect("head");
    tcp.write_all(&body[..20]).await.expect("body start");
    tokio::time::sleep(Duration::from_millis(300)).await;

    let shutdown = tokio::spawn(server.shutdown());
    tokio::time::sleep(Duration::from_millis(500)).await;
    tcp.write_all(&body[20..]).await.expect("body rest");
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), tcp.read_to_end(&mut answer)).await;
    let answer = String::from_utf8_lossy(&answer);
    assert!(
        answer.starts_with("HTTP/1.1 200"),
        "served while draining: {answer}"
    );
    shutdown.await.expect("shutdown");

    let server = callmeter::app::start(&cfg).await.expect("restart");
    let window = server.meter.usage().orgs[0].integrations[0].window;
    server.shutdown().await;
    assert_eq!(window, 1);
}

/// The config of integration `a` (with `extra` keys) of org `acme` (with `org` keys) in front
/// of `sim`, its store in `dir`: kept over restarts.
fn on_disk(sim: &str, dir: &std::path::Path, org: &str, extra: &str) -> callmeter::config::Config {
    let integration = format!(
        "[[integration]]\nid = \"a\"\norg = \"acme\"\nmatch = {{ path_prefix = \"/a\" }}\n{extra}"
    );
    let toml = config_text(sim, org, &integration).replace(
        "STORE_PATH",
        &dir.join("callmeter.db").display().to_string(),
    );
    callmeter::config::parse(&toml, std::path::Path::new("test.toml")).expect("config")
}

/// A full wait queue answers with a Retry-After of when budget frees (as `reject` would),
/// not a fixed 1 s: here the quota of 1 call is spent for the day.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_queue_says_when_budget_frees_not_one_second() {
    let env = Arc::new(
        start(
            SimOptions::default(),
            "",
            "[[integration]]\nid = \"q\"\norg = \"acme\"\nmatch = { path_prefix = \"/q\" }\nquota = 1\n\
             on_limit = \"queue\"\nqueue = { max_depth = 1, max_wait = \"5s\" }\n",
        )
        .await,
    );
    let url = format!("{}/q/services/data/v62.0/sobjects", env.proxy);
    assert_eq!(
        env.http.get(&url, &[]).await.0,
        StatusCode::OK,
        "the quota's one call"
    );
    // The next call waits in the queue (its quota frees in about a day).
    let waiting = {
        let (env, url) = (env.clone(), url.clone());
        tokio::spawn(async move { env.http.get(&url, &[]).await })
    };
    eventually(5, "the call queued", || async {
        env.usage().await["orgs"][0]["integrations"][0]["queue_depth"] == 1
    })
    .await;
    // What a plain reject says for the same budget, for comparison.
    let (status, headers, body) = env.http.get(&url, &[]).await;
    assert_eq!(
        status,
        StatusCode::FORBIDDEN,
        "{}",
        String::from_utf8_lossy(&body)
    );
    let retry_after: u64 = headers["retry-after"]
        .to_str()
        .expect("text")
        .parse()
        .expect("seconds");
    assert!(
        retry_after >= 60,
        "the quota frees in about a day, but the full queue says Retry-After: {retry_after} ({})",
        String::from_utf8_lossy(&body)
    );
    waiting.abort();
}

/// The org's `daily_limit` holds under concurrency as a quota does. The answers of the first
/// calls report Salesforce's count while hundreds of counted calls are still in flight: the
/// estimate (the report plus calls since) never falls below the proxy's own count, which once
/// forgot those calls and let 1,005-1,035 through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn org_daily_limit_of_1000_under_256_connections_forwards_at_most_1000() {
    let env = Arc::new(
        start(
            SimOptions {
                limit: 1_000_000,
                ..Default::default()
            },
            "daily_limit = 1000",
            "[[integration]]\nid = \"a\"\norg = \"acme\"\nmatch = { path_prefix = \"/a\" }\n",
        )
        .await,
    );
    let (ok, _) = calls_from_256_connections(&env).await;
    let used = env.sim_count().await["used"].as_u64().expect("used");
    assert!(
        used <= 1_000,
        "daily_limit = 1000, Salesforce saw {used} calls ({ok} forwarded)"
    );
}

/// The org was exhausted when the proxy stopped, and Salesforce's budget came back while it was
/// down (an org that hit its limit on Friday, the proxy upgraded on Monday): after the restart
/// the first call goes out as the probe, rather than every call of the org being refused for
/// another whole `probe_interval` after each restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_probes_an_org_saved_exhausted_with_its_first_call() {
    let sim = callmeter::sim::spawn(SimOptions {
        limit: 3,
        used: 1,
        ..Default::default()
    })
    .await
    .expect("sim");
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = on_disk(&sim.url, dir.path(), r#"probe_interval = "5m""#, "");
    let http = Http::new();
    let hook = |path: &str| format!("{}{path}", sim.url);

    let server = callmeter::app::start(&cfg).await.expect("start");
    let url = format!(
        "http://{}/a/services/data/v62.0/sobjects/Account/001",
        server.listener("main").expect("main")
    );
    assert_eq!(http.get(&url, &[]).await.0, StatusCode::OK);
    // Spent outside the proxy: Salesforce refuses the next call, the org is exhausted.
    http.send(http::Method::POST, &hook("/_sim/external?n=5"), &[], "")
        .await;
    assert_eq!(http.get(&url, &[]).await.0, StatusCode::FORBIDDEN);
    assert!(server.meter.usage().orgs[0].exhausted);
    server.shutdown().await;

    // While the proxy is down, the org's budget comes back.
    http.send(http::Method::POST, &hook("/_sim/limit?n=100"), &[], "")
        .await;
    let server = callmeter::app::start(&cfg).await.expect("restart");
    assert!(server.meter.usage().orgs[0].exhausted, "restored exhausted");
    let url = format!(
        "http://{}/a/services/data/v62.0/sobjects/Account/001",
        server.listener("main").expect("main")
    );
    let (status, _, body) = http.get(&url, &[]).await;
    let exhausted = server.meter.usage().orgs[0].exhausted;
    server.shutdown().await;
    assert_eq!(status, StatusCode::OK, "{}", String::from_utf8_lossy(&body));
    assert!(!exhausted, "the probe's answer ends the exhaustion");
}

/// An org held back by its reserve on Salesforce's report (not exhausted) when the proxy
/// stopped: after the restart its calls are still held back until the probe interval after
/// that report is up, as they were before; the first call after the restart does not go out
/// past the reserve as a probe (one call over the budget at every restart).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_does_not_send_the_first_call_past_the_reserve() {
    let sim = callmeter::sim::spawn(SimOptions {
        limit: 1_000,
        used: 990,
        ..Default::default()
    })
    .await
    .expect("sim");
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = on_disk(
        &sim.url,
        dir.path(),
        "probe_interval = \"5m\"\nreserve = \"5%\"",
        "",
    );
    let http = Http::new();

    let server = callmeter::app::start(&cfg).await.expect("start");
    let url = format!(
        "http://{}/a/services/data/v62.0/sobjects/Account/001",
        server.listener("main").expect("main")
    );
    // Before any report the estimate is the proxy's own count: this call goes, and its answer
    // reports 991 of 1,000, past the reserve's 950.
    assert_eq!(http.get(&url, &[]).await.0, StatusCode::OK);
    assert_eq!(http.get(&url, &[]).await.0, StatusCode::FORBIDDEN);
    server.shutdown().await;

    let server = callmeter::app::start(&cfg).await.expect("restart");
    let url = format!(
        "http://{}/a/services/data/v62.0/sobjects/Account/001",
        server.listener("main").expect("main")
    );
    let (status, _, body) = http.get(&url, &[]).await;
    server.shutdown().await;
    assert_eq!(
        status,
        StatusCode::FORBIDDEN,
        "{}",
        String::from_utf8_lossy(&body)
    );
}

/// A restart in the same process (as these tests do, and as an embedding would) after a
/// shutdown that found a client connected but silent: the connection ends with the shutdown
/// instead of holding the store (and its lock) until its header timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_after_a_shutdown_with_a_silent_connection_opens_the_store() {
    let sim = callmeter::sim::spawn(SimOptions::default())
        .await
        .expect("sim");
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = on_disk(&sim.url, dir.path(), "", "");
    let server = callmeter::app::start(&cfg).await.expect("start");
    let proxy = server.listener("main").expect("main");
    let silent = [
        tokio::net::TcpStream::connect(server.admin_addr).await,
        tokio::net::TcpStream::connect(proxy).await,
    ];
    server.shutdown().await;
    let restarted = callmeter::app::start(&cfg).await;
    drop(silent);
    let server = restarted.expect("restart in the same process");
    server.shutdown().await;
}

/// An exhausted org ends its exhaustion once Salesforce's budget is back, even while calls it
/// does not count keep answering with usage reports (a monitor polling `/limits`, with
/// `limits_endpoint = false`): those reports held the probe off for ever, every counted call
/// refused. One of them, sent after the refusals, reporting budget, ends it by itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uncounted_reports_do_not_keep_an_org_exhausted() {
    let env = start(
        SimOptions {
            limit: 3,
            used: 1,
            count_limits: false,
            ..Default::default()
        },
        "probe_interval = \"2s\"\n[org.counting]\nlimits_endpoint = false",
        "[[integration]]\nid = \"a\"\norg = \"acme\"\nmatch = { path_prefix = \"/a\" }\n",
    )
    .await;
    let http = &env.http;
    let hook = |path: &str| format!("{}{path}", env.sim.url);
    let call = format!("{}/a/services/data/v62.0/sobjects/Account/001", env.proxy);
    let limits = format!("{}/a/services/data/v62.0/limits", env.proxy);
    assert_eq!(http.get(&call, &[]).await.0, StatusCode::OK);
    http.send(http::Method::POST, &hook("/_sim/external?n=5"), &[], "")
        .await;
    assert_eq!(http.get(&call, &[]).await.0, StatusCode::FORBIDDEN);
    assert_eq!(env.usage().await["orgs"][0]["exhausted"], true);
    // Polled while Salesforce still refuses: the org stays exhausted.
    assert_eq!(http.get(&limits, &[]).await.0, StatusCode::OK);
    assert_eq!(env.usage().await["orgs"][0]["exhausted"], true);
    // Salesforce's budget comes back; the next poll's report says so.
    http.send(http::Method::POST, &hook("/_sim/limit?n=1000"), &[], "")
        .await;
    assert_eq!(http.get(&limits, &[]).await.0, StatusCode::OK);
    assert_eq!(env.usage().await["orgs"][0]["exhausted"], false);
    assert_eq!(http.get(&call, &[]).await.0, StatusCode::OK);
}

/// A call no amount of waiting lets through (a batch of 11 against a quota of 10) is refused
/// at once; in the `http429` style with a 413, as generic clients send a 429 again, for ever.
#[tokio::test]
async fn a_call_larger_than_the_quota_gets_413_in_the_http429_style() {
    let env = start(
        SimOptions::default(),
        "",
        "[[integration]]\nid = \"b\"\norg = \"acme\"\nmatch = { path_prefix = \"/b\" }\n\
         quota = 10\nreject_style = \"http429\"\n",
    )
    .await;
    let url = format!("{}/b/services/data/v62.0/composite/batch", env.proxy);
    let json = [("content-type", "application/json")];
    let (status, headers, body) = env
        .http
        .send(http::Method::POST, &url, &json, composite_batch(11))
        .await;
    let body = String::from_utf8_lossy(&body);
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE, "{body}");
    assert!(body.contains("can ever hold"), "{body}");
    assert!(headers.get("retry-after").is_none());
    assert_eq!(env.sim_count().await["used"], 0, "not sent");
}
