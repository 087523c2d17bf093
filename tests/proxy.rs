//! End-to-end: the real proxy over real sockets in front of the simulated org.

mod common;

use std::time::Duration;

use bytes::Bytes;
use callmeter::sim::SimOptions;
use common::*;
use http::{HeaderMap, Method, StatusCode};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const THREE_INTEGRATIONS: &str = r#"
[[integration]]
id = "salesloft"
org = "acme"
match = { path_prefix = "/salesloft" }

[[integration]]
id = "etl"
org = "acme"
match = { key_env = "CALLMETER_TEST_ETL_KEY" }

[[integration]]
id = "middleware"
org = "acme"
match = { host = "middleware.internal" }
"#;

fn set_etl_key() {
    // Once per test process: setting the environment while another thread reads it is a
    // data race in the C library.
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| std::env::set_var("CALLMETER_TEST_ETL_KEY", "etl-secret-key"));
}

/// One integration's share of the mixed load: every API family, counted and free.
async fn mixed_calls(env: &Env, who: &'static str, rounds: usize) {
    let (base, extra): (String, Vec<(&str, &str)>) = match who {
        "salesloft" => (format!("{}/salesloft", env.proxy), vec![]),
        "etl" => (
            env.proxy.clone(),
            vec![("x-callmeter-key", "etl-secret-key")],
        ),
        _ => (env.proxy.clone(), vec![("host", "middleware.internal")]),
    };
    let with = |more: &[(&'static str, &'static str)]| {
        let mut h = extra.clone();
        h.extend_from_slice(more);
        h
    };
    let json = with(&[("content-type", "application/json")]);
    let soap = with(&soap_headers("query"));
    let batch = composite_batch(3);
    for n in 0..rounds {
        let (status, _, body) = match n % 7 {
            0 => {
                env.http
                    .get(
                        &format!("{base}/services/data/v62.0/query?q=SELECT+Id+FROM+Contact"),
                        &extra,
                    )
                    .await
            }
            1 => {
                env.http
                    .get(&format!("{base}/services/data/"), &extra)
                    .await
            } // free
            2 => {
                let composite = r#"{"allOrNone":false,"compositeRequest":[{"method":"GET","url":"/services/data/v62.0/sobjects/Account/001","referenceId":"a"}]}"#;
                env.http
                    .send(
                        Method::POST,
                        &format!("{base}/services/data/v62.0/composite"),
                        &json,
                        composite,
                    )
                    .await
            }
            3 => {
                env.http
                    .send(
                        Method::POST,
                        &format!("{base}/services/data/v62.0/composite/batch"),
                        &json,
                        batch.clone(),
                    )
                    .await
            }
            4 => {
                env.http
                    .send(
                        Method::POST,
                        &format!("{base}/services/Soap/u/62.0/00D000000000001AAA"),
                        &soap,
                        SOAP_QUERY,
                    )
                    .await
            }
            5 => {
                let form = with(&[("content-type", "application/x-www-form-urlencoded")]);
                env.http
                    .send(
                        Method::POST,
                        &format!("{base}/services/oauth2/token"),
                        &form,
                        "grant_type=password&username=u&password=p",
                    )
                    .await
            }
            _ => {
                env.http
                    .get(&format!("{base}/services/data/v62.0/jobs/ingest"), &extra)
                    .await
            }
        };
        assert!(
            status.is_success(),
            "{who} call {n}: {status} {}",
            String::from_utf8_lossy(&body)
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_mixed_load_is_counted_exactly_per_integration() {
    set_etl_key();
    let env = start(
        SimOptions {
            limit: 100_000,
            ..Default::default()
        },
        "",
        THREE_INTEGRATIONS,
    )
    .await;
    let mut tasks = Vec::new();
    let env = std::sync::Arc::new(env);
    for who in ["salesloft", "etl", "middleware"] {
        for _ in 0..6 {
            let env = env.clone();
            tasks.push(tokio::spawn(
                async move { mixed_calls(&env, who, 35).await },
            ));
        }
    }
    for t in tasks {
        t.await.expect("load task");
    }

    let sim = env.sim_count().await;
    // 6 tasks x 35 calls: per 7 calls, query 1 + versions 0 + composite 1 + batch 3 + SOAP 1
    // + OAuth 0 + bulk 1 = 7 counted.
    for who in ["salesloft", "etl", "middleware"] {
        assert_eq!(
            sim["by_client"][who],
            6 * 35,
            "simulator's count for {who}: {sim}"
        );
        assert_eq!(env.window(who).await, 6 * 35, "proxy's count for {who}");
    }
    let usage = env.usage().await;
    assert_eq!(
        usage["orgs"][0]["used"], sim["used"],
        "org estimate vs simulator: {usage} {sim}"
    );
    assert_eq!(usage["orgs"][0]["limit"], 100_000);
    let metrics = env.metrics().await;
    assert!(metrics
        .contains(r#"callmeter_integration_api_calls_window{integration="etl",org="acme"} 210"#));
    assert!(
        metrics.contains(r#"callmeter_org_api_calls_used{org="acme"} 630"#),
        "{metrics}"
    );
}

#[tokio::test]
async fn external_calls_show_up_after_the_next_proxied_call() {
    set_etl_key();
    let env = start(SimOptions::default(), "", THREE_INTEGRATIONS).await;
    let url = format!(
        "{}/salesloft/services/data/v62.0/sobjects/Account/001",
        env.proxy
    );
    env.http.get(&url, &[]).await;
    assert_eq!(env.usage().await["orgs"][0]["used"], 1);
    // 500 calls made by something that does not use the proxy.
    let (status, _, _) = env
        .http
        .send(
            Method::POST,
            &format!("{}/_sim/external?n=500", env.sim.url),
            &[],
            "",
        )
        .await;
    assert!(status.is_success());
    assert_eq!(
        env.usage().await["orgs"][0]["used"],
        1,
        "the proxy cannot know before Salesforce says"
    );
    env.http.get(&url, &[]).await;
    let usage = env.usage().await;
    assert_eq!(usage["orgs"][0]["used"], 502);
    assert_eq!(usage["orgs"][0]["proxied"], 2);
    assert_eq!(usage["orgs"][0]["reported_used"], 502);
}

#[tokio::test]
async fn oauth_login_keeps_the_client_on_the_proxy() {
    set_etl_key();
    let env = start(SimOptions::default(), "", THREE_INTEGRATIONS).await;
    let form = [("content-type", "application/x-www-form-urlencoded")];
    // Path-prefix integration: the prefix survives in instance_url.
    let (status, _, body) = env
        .http
        .send(
            Method::POST,
            &format!("{}/salesloft/services/oauth2/token", env.proxy),
            &form,
            "grant_type=password&username=u&password=p",
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    let token: serde_json::Value = serde_json::from_slice(&body).expect("token JSON");
    let instance = token["instance_url"].as_str().expect("instance_url");
    assert_eq!(
        instance.trim_end_matches('/'),
        format!("{}/salesloft", env.proxy)
    );
    assert!(
        token["id"].as_str().expect("id").starts_with(&env.sim.url),
        "id stays on the login host"
    );
    let (status, _, _) = env
        .http
        .get(
            &format!(
                "{}/services/data/v62.0/limits",
                instance.trim_end_matches('/')
            ),
            &[],
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(env.window("salesloft").await, 1);

    // Host-matched integration: the Host stays, so attribution survives.
    let host = [
        ("content-type", "application/x-www-form-urlencoded"),
        ("host", "middleware.internal"),
    ];
    let (_, _, body) = env
        .http
        .send(
            Method::POST,
            &format!("{}/services/oauth2/token", env.proxy),
            &host,
            "grant_type=refresh_token&refresh_token=r",
        )
        .await;
    let token: serde_json::Value = serde_json::from_slice(&body).expect("token JSON");
    assert_eq!(
        token["instance_url"]
            .as_str()
            .expect("instance_url")
            .trim_end_matches('/'),
        "http://middleware.internal"
    );
}

#[tokio::test]
async fn soap_login_keeps_the_client_on_the_proxy() {
    set_etl_key();
    let env = start(SimOptions::default(), "", THREE_INTEGRATIONS).await;
    let (status, _, body) = env
        .http
        .send(
            Method::POST,
            &format!("{}/salesloft/services/Soap/u/62.0", env.proxy),
            &soap_headers("login"),
            SOAP_LOGIN,
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{}", String::from_utf8_lossy(&body));
    let text = String::from_utf8(body.to_vec()).expect("utf-8");
    let server_url = xml_text(&text, "serverUrl").expect("serverUrl");
    assert!(
        server_url.starts_with(&format!("{}/salesloft/services/Soap/u/62.0/", env.proxy)),
        "{server_url}"
    );
    let metadata_url = xml_text(&text, "metadataServerUrl").expect("metadataServerUrl");
    assert!(
        metadata_url.starts_with(&format!("{}/salesloft/services/Soap/m/62.0/", env.proxy)),
        "{metadata_url}"
    );
    assert_eq!(env.window("salesloft").await, 0, "login() is not counted");

    let (status, _, body) = env
        .http
        .send(Method::POST, server_url, &soap_headers("query"), SOAP_QUERY)
        .await;
    assert_eq!(status, StatusCode::OK, "{}", String::from_utf8_lossy(&body));
    assert_eq!(env.window("salesloft").await, 1);
    let sim = env.sim_count().await;
    assert_eq!(sim["by_client"]["salesloft"], 1);
    // The LimitInfoHeader of the SOAP response was read as it streamed.
    assert_eq!(env.usage().await["orgs"][0]["reported_used"], sim["used"]);
}

/// GET of integration `a`'s sObject list through the proxy, with `headers`.
async fn get_sobjects(env: &Env, headers: &[(&str, &str)]) -> (StatusCode, HeaderMap, Bytes) {
    let url = format!("{}/a/services/data/v62.0/sobjects", env.proxy);
    env.http.get(&url, headers).await
}

/// The proxy with integration `a` in front of `upstream` instead of the simulated org (which
/// runs only for the helpers that expect one).
async fn in_front_of(upstream: &str, org_extra: &str) -> Env {
    let sim = callmeter::sim::spawn(SimOptions::default())
        .await
        .expect("sim");
    start_with(sim, &config_text(upstream, org_extra, ONE_INTEGRATION)).await
}

/// Sends a call of integration `a` that cannot reach Salesforce; checks the answer is a
/// Salesforce-shaped CALLMETER_UPSTREAM_UNREACHABLE that says the call was not counted, and
/// that it was not; returns the status.
async fn unreachable_and_not_counted(env: &Env) -> StatusCode {
    let (status, headers, body) = get_sobjects(env, &[]).await;
    assert!(headers["content-type"]
        .to_str()
        .expect("ct")
        .starts_with("application/json"));
    let err: serde_json::Value = serde_json::from_slice(&body).expect("JSON body");
    assert_eq!(err[0]["errorCode"], "CALLMETER_UPSTREAM_UNREACHABLE");
    let message = err[0]["message"].as_str().expect("message");
    assert!(message.contains("not counted"), "{err}");
    assert_eq!(env.window("a").await, 0);
    status
}

#[tokio::test]
async fn upstream_down_is_a_502_with_a_salesforce_shaped_body_and_not_counted() {
    let port = free_port(); // nothing listens there, and no other test is given it
    let env = in_front_of(
        &format!("http://127.0.0.1:{port}"),
        r#"connect_timeout = "1s""#,
    )
    .await;
    let status = unreachable_and_not_counted(&env).await;
    assert_eq!(status, StatusCode::BAD_GATEWAY);
    assert!(env
        .metrics()
        .await
        .contains(r#"outcome="upstream_error"} 1"#));
}

#[tokio::test]
async fn slow_upstream_is_a_504_after_the_response_timeout() {
    let env = start(
        SimOptions::default(),
        r#"response_timeout = "300ms""#,
        "[[integration]]\nid = \"a\"\norg = \"acme\"\nmatch = { path_prefix = \"/a\" }\n",
    )
    .await;
    let started = std::time::Instant::now();
    let (status, _, body) = get_sobjects(&env, &[("x-sim-delay-ms", "3000")]).await;
    assert_eq!(status, StatusCode::GATEWAY_TIMEOUT);
    assert!(
        started.elapsed() < Duration::from_millis(2500),
        "answered at the timeout, not after the upstream"
    );
    let err: serde_json::Value = serde_json::from_slice(&body).expect("JSON body");
    assert_eq!(err[0]["errorCode"], "CALLMETER_UPSTREAM_TIMEOUT");
}

const ONE_INTEGRATION: &str =
    "[[integration]]\nid = \"a\"\norg = \"acme\"\nmatch = { path_prefix = \"/a\" }\n";

/// Reads one HTTP/1.1 response (head and a Content-Length body) from a raw connection.
async fn read_response(tcp: &mut TcpStream) -> String {
    let mut out = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let n = match tokio::time::timeout(Duration::from_secs(10), tcp.read(&mut chunk)).await {
            Ok(Ok(n)) if n > 0 => n,
            _ => break,
        };
        out.extend_from_slice(&chunk[..n]);
        let text = String::from_utf8_lossy(&out);
        if let Some(end) = text.find("\r\n\r\n") {
            let length: usize = text[..end]
                .to_ascii_lowercase()
                .lines()
                .find_map(|l| l.strip_prefix("content-length:").map(str::to_owned))
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(0);
            if out.len() >= end + 4 + length {
                break;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The proxy in front of the simulated org with `org_extra`, and a raw connection to it on
/// which a POST's head for `length` bytes of body went out.
async fn upload_started(org_extra: &str, length: usize) -> (Env, TcpStream) {
    let env = start(SimOptions::default(), org_extra, ONE_INTEGRATION).await;
    let addr = env.proxy.trim_start_matches("http://").to_owned();
    let mut tcp = TcpStream::connect(&addr).await.expect("connect");
    let head = format!(
        "POST /a/services/data/v62.0/sobjects/Contact HTTP/1.1\r\nhost: x\r\n\
         authorization: Bearer 00Dsession\r\ncontent-type: application/json\r\n\
         content-length: {length}\r\n\r\n"
    );
    tcp.write_all(head.as_bytes()).await.expect("head");
    (env, tcp)
}

/// An upload that takes longer than the response timeout but keeps moving is not timed out:
/// the timeout runs from the request's last byte.
#[tokio::test]
async fn a_slow_upload_is_not_cut_off_by_the_response_timeout() {
    // About 3 s in all, longer than the 2 s timeout, but never 2 s without progress (a
    // loaded machine may stretch a 300 ms pause a lot before that).
    let body = br#"{"LastName":"Slow","Title":"uploaded in ten parts, 300 ms apart"}"#;
    let (env, mut tcp) = upload_started(r#"response_timeout = "2s""#, body.len()).await;
    for part in body.chunks(body.len() / 10 + 1) {
        tokio::time::sleep(Duration::from_millis(300)).await;
        tcp.write_all(part).await.expect("body");
    }
    let resp = read_response(&mut tcp).await;
    assert!(resp.starts_with("HTTP/1.1 201"), "{resp}");
    assert_eq!(env.window("a").await, 1);
}

/// A client that sends part of its body and stops is answered 408 once the body made no
/// progress for the response timeout, and the call is not counted (Salesforce never had it).
#[tokio::test]
async fn a_stalled_upload_is_a_408_and_not_counted() {
    let (env, mut tcp) = upload_started(r#"response_timeout = "500ms""#, 100).await;
    tcp.write_all(br#"{"LastName""#).await.expect("write");
    let resp = read_response(&mut tcp).await;
    assert!(resp.starts_with("HTTP/1.1 408"), "{resp}");
    assert!(resp.contains("CALLMETER_REQUEST_TIMEOUT"), "{resp}");
    assert_eq!(env.window("a").await, 0);
    assert_eq!(
        env.sim_count().await["by_client"]["a"],
        serde_json::Value::Null
    );
}

/// A client that hangs up halfway through its upload gets a 400 (its fault, not Salesforce's:
/// no upstream_error) and the call is not counted.
#[tokio::test]
async fn an_upload_the_client_breaks_off_is_a_client_error_and_not_counted() {
    let (env, mut tcp) = upload_started("", 100).await;
    tcp.write_all(br#"{"LastName""#).await.expect("write");
    tokio::time::sleep(Duration::from_millis(200)).await;
    tcp.shutdown().await.expect("half-close");
    let resp = read_response(&mut tcp).await;
    assert!(resp.starts_with("HTTP/1.1 400"), "{resp}");
    assert!(resp.contains("not counted"), "{resp}");
    assert_eq!(env.window("a").await, 0);
    let metrics = env.metrics().await;
    assert!(
        metrics.contains(r#"outcome="client_error"} 1"#),
        "{metrics}"
    );
    assert!(
        !metrics.contains(r#"outcome="upstream_error""#),
        "{metrics}"
    );
}

/// An upstream that accepts TCP but never completes the TLS handshake: the connect timeout
/// covers the handshake, the answer is a 504 that says the call was not sent, and it is not
/// counted.
#[tokio::test]
async fn a_stalled_tls_handshake_is_a_connect_timeout_and_not_counted() {
    let port = silent_origin().await; // never answers the ClientHello
    let timeouts = "connect_timeout = \"500ms\"\nresponse_timeout = \"30s\"";
    let env = in_front_of(&format!("https://127.0.0.1:{port}"), timeouts).await;
    let started = std::time::Instant::now();
    let status = unreachable_and_not_counted(&env).await;
    assert_eq!(status, StatusCode::GATEWAY_TIMEOUT);
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "answered at the connect timeout"
    );
}

/// An upstream response framed by Transfer-Encoding that also carries a Content-Length reaches
/// the client whole, without the stale length (RFC 9112 §6.3).
#[tokio::test]
async fn a_chunked_response_with_a_content_length_reaches_the_client_whole() {
    let port = raw_origin(|mut tcp| async move {
        let mut buf = [0u8; 4096];
        let _ = tcp.read(&mut buf).await;
        let _ = tcp
            .write_all(
                b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\ncontent-length: 5\r\n\
                  content-type: text/plain\r\n\r\na\r\n0123456789\r\n0\r\n\r\n",
            )
            .await;
        tokio::time::sleep(Duration::from_secs(5)).await;
    })
    .await;
    let env = in_front_of(&format!("http://127.0.0.1:{port}"), "").await;
    let (status, headers, body) = get_sobjects(&env, &[]).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(&body[..], b"0123456789");
    assert!(
        headers.get("content-length").is_none_or(|v| v == "10"),
        "{headers:?}"
    );
}

#[tokio::test]
async fn unmatched_traffic_is_refused_or_attributed_as_configured() {
    let one = "[[integration]]\nid = \"a\"\norg = \"acme\"\nmatch = { path_prefix = \"/a\" }\n";
    let env = start(SimOptions::default(), "", one).await;
    // At 0 from the start, so that rate() sees the first unmatched request.
    let unmatched = r#"callmeter_unmatched_requests_total{listener="main"}"#;
    assert!(env.metrics().await.contains(&format!("{unmatched} 0")));
    let (status, _, body) = env
        .http
        .get(&format!("{}/services/data/v62.0/sobjects", env.proxy), &[])
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let err: serde_json::Value = serde_json::from_slice(&body).expect("JSON body");
    assert_eq!(err[0]["errorCode"], "CALLMETER_UNMATCHED");
    assert!(env.metrics().await.contains(&format!("{unmatched} 1")));
    let (status, _, _) = get_sobjects(&env, &[("x-callmeter-key", "nope")]).await;
    assert_eq!(
        status,
        StatusCode::FORBIDDEN,
        "a wrong key is refused, not attributed by path"
    );
    assert_eq!(env.sim_count().await["used"], 0);

    let env = start(SimOptions::default(), r#"unmatched = "unattributed""#, one).await;
    let (status, _, _) = env
        .http
        .get(&format!("{}/services/data/v62.0/sobjects", env.proxy), &[])
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(env.window("unattributed").await, 1);
    assert_eq!(env.sim_count().await["by_client"]["unattributed"], 1);
}

#[tokio::test]
async fn upstream_sees_forwarding_headers_and_no_proxy_secrets() {
    set_etl_key();
    let env = start(SimOptions::default(), "", THREE_INTEGRATIONS).await;
    // The caller's own client name wins over the integration id.
    let (status, _, _) = env
        .http
        .get(
            &format!("{}/services/data/v62.0/sobjects", env.proxy),
            &[
                ("x-callmeter-key", "etl-secret-key"),
                ("sforce-call-options", "client=nightly-etl"),
            ],
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    let sim = env.sim_count().await;
    assert_eq!(sim["by_client"]["nightly-etl"], 1, "{sim}");
    assert_eq!(
        env.window("etl").await,
        1,
        "attribution is by match rule, not by the client option"
    );
}

#[tokio::test]
async fn salesforce_refusing_for_the_daily_limit_marks_the_org_exhausted() {
    let one = "[[integration]]\nid = \"a\"\norg = \"acme\"\nmatch = { path_prefix = \"/a\" }\n";
    let env = start(
        SimOptions {
            limit: 3,
            used: 1,
            ..Default::default()
        },
        // Long enough that the SOAP call below comes before the next probe is due.
        r#"probe_interval = "3s""#,
        one,
    )
    .await;
    let url = format!("{}/a/services/data/v62.0/sobjects/Account/001", env.proxy);
    let (status, _, _) = env.http.get(&url, &[]).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(env.usage().await["orgs"][0]["exhausted"], false);
    // Something outside the proxy spends the rest: the proxy believes 2 of 3 are used, so it
    // sends the next call, and Salesforce answers 403 REQUEST_LIMIT_EXCEEDED, passed on as is.
    env.http
        .send(
            Method::POST,
            &format!("{}/_sim/external?n=5", env.sim.url),
            &[],
            "",
        )
        .await;
    let (status, _, body) = env.http.get(&url, &[]).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert!(String::from_utf8_lossy(&body).contains("REQUEST_LIMIT_EXCEEDED"));
    let usage = env.usage().await;
    assert_eq!(usage["orgs"][0]["exhausted"], true, "{usage}");
    // Salesforce does not count the call it refused: neither does the integration's window.
    assert_eq!(env.sim_count().await["by_client"]["a"], 1);
    assert_eq!(env.window("a").await, 1, "the refused call was given back");
    assert_eq!(usage["orgs"][0]["color"], "red");
    assert!(env
        .metrics()
        .await
        .contains(r#"callmeter_org_exhausted{org="acme"} 1"#));

    // While exhausted the proxy itself holds calls back (one probe per interval), in the same
    // shapes: SOAP faults for SOAP.
    let (status, _, body) = env.soap_query("/a").await;
    assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR);
    assert!(String::from_utf8_lossy(&body).contains("sf:REQUEST_LIMIT_EXCEEDED"));
    assert_eq!(
        env.sim_count().await["requests"],
        2,
        "the SOAP call was held back, not sent"
    );

    // Budget comes back (here: the limit is raised); the next probe's report clears the state.
    env.http
        .send(
            Method::POST,
            &format!("{}/_sim/limit?n=100", env.sim.url),
            &[],
            "",
        )
        .await;
    tokio::time::sleep(Duration::from_millis(3_100)).await;
    let (status, _, _) = env.http.get(&url, &[]).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(env.usage().await["orgs"][0]["exhausted"], false);
}

#[tokio::test]
async fn login_urls_use_the_public_url_but_host_matched_integrations_keep_their_host() {
    set_etl_key();
    let sim = callmeter::sim::spawn(SimOptions::default())
        .await
        .expect("sim");
    let toml = config_text(&sim.url, "", THREE_INTEGRATIONS).replacen(
        "listen = \"127.0.0.1:0\"\n\n[[org]]",
        "listen = \"127.0.0.1:0\"\npublic_url = \"https://sfproxy.example.com:8443\"\n\n[[org]]",
        1,
    );
    let env = start_with(sim, &toml).await;
    let form = [("content-type", "application/x-www-form-urlencoded")];
    let body = "grant_type=password&username=u&password=p";
    let (_, _, token) = env
        .http
        .send(
            Method::POST,
            &format!("{}/salesloft/services/oauth2/token", env.proxy),
            &form,
            body,
        )
        .await;
    let token: serde_json::Value = serde_json::from_slice(&token).expect("JSON");
    assert_eq!(
        token["instance_url"]
            .as_str()
            .expect("url")
            .trim_end_matches('/'),
        "https://sfproxy.example.com:8443/salesloft"
    );

    let host = [
        ("content-type", "application/x-www-form-urlencoded"),
        ("host", "middleware.internal:8443"),
    ];
    let (_, _, token) = env
        .http
        .send(
            Method::POST,
            &format!("{}/services/oauth2/token", env.proxy),
            &host,
            body,
        )
        .await;
    let token: serde_json::Value = serde_json::from_slice(&token).expect("JSON");
    assert_eq!(
        token["instance_url"]
            .as_str()
            .expect("url")
            .trim_end_matches('/'),
        "https://middleware.internal:8443"
    );
}

/// Salesforce takes gzip-compressed request bodies: the proxy decodes the start of one to cost
/// it, so a compressed batch of 3 counts 3, and a compressed SOAP query on the login() path is
/// an ordinary call (not a free login).
#[tokio::test]
async fn compressed_request_bodies_are_costed_by_what_they_hold() {
    use std::io::Write;
    let gzip = |body: &str| {
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        e.write_all(body.as_bytes()).expect("compress");
        e.finish().expect("compress")
    };
    let env = start(SimOptions::default(), "", ONE_INTEGRATION).await;
    let batch = r#"{"batchRequests":[{"method":"GET","url":"v62.0/limits"},{"method":"GET","url":"v62.0/limits"},{"method":"GET","url":"v62.0/limits"}]}"#;
    let headers = [
        ("content-type", "application/json"),
        ("content-encoding", "gzip"),
    ];
    let url = format!("{}/a/services/data/v62.0/composite/batch", env.proxy);
    env.http
        .send(Method::POST, &url, &headers, gzip(batch))
        .await;
    assert_eq!(env.window("a").await, 3);
    let mut soap = soap_headers("query").to_vec();
    soap.push(("content-encoding", "gzip"));
    let url = format!("{}/a/services/Soap/u/62.0", env.proxy);
    env.http
        .send(Method::POST, &url, &soap, gzip(SOAP_QUERY))
        .await;
    assert_eq!(env.window("a").await, 4);
}

/// Most HTTP clients ask for gzip, and Salesforce then compresses its 403 REQUEST_LIMIT_EXCEEDED
/// too: the proxy decodes what it scans, so the org is marked exhausted all the same.
#[tokio::test]
async fn a_compressed_limit_error_marks_the_org_exhausted() {
    use std::io::Write;
    let body =
        br#"[{"message":"TotalRequests Limit exceeded.","errorCode":"REQUEST_LIMIT_EXCEEDED"}]"#;
    let mut gzip = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    gzip.write_all(body).expect("compress");
    let gzip = gzip.finish().expect("compress");
    let port = raw_origin(move |mut tcp| {
        let gzip = gzip.clone();
        async move {
            let mut buf = [0u8; 4096];
            let _ = tcp.read(&mut buf).await;
            let head = format!(
                "HTTP/1.1 403 Forbidden\r\ncontent-type: application/json\r\n\
                 content-encoding: gzip\r\ncontent-length: {}\r\n\r\n",
                gzip.len()
            );
            let _ = tcp.write_all(head.as_bytes()).await;
            let _ = tcp.write_all(&gzip).await;
            tokio::time::sleep(Duration::from_secs(5)).await;
        }
    })
    .await;
    let env = in_front_of(&format!("http://127.0.0.1:{port}"), "").await;
    let (status, _, _) = get_sobjects(&env, &[("accept-encoding", "gzip")]).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let usage = env.usage().await;
    assert_eq!(usage["orgs"][0]["exhausted"], true, "{usage}");
}

/// A SOAP or Composite Batch call whose client sends part of its body and stops gets the same
/// 408 as a REST call does. The proxy reads the start of those bodies to cost them; without a
/// timeout there, the request, its connection and its buffer were held for as long as the
/// client liked, and the client never got an answer.
#[tokio::test]
async fn a_stalled_body_read_for_costing_is_a_408() {
    let env = start(
        SimOptions::default(),
        r#"response_timeout = "500ms""#,
        ONE_INTEGRATION,
    )
    .await;
    let soap = (
        "POST /a/services/Soap/u/62.0/00D000000000001AAA HTTP/1.1\r\nhost: x\r\n\
         content-type: text/xml; charset=utf-8\r\nsoapaction: query\r\n\
         content-length: 1000\r\n\r\n",
        &br#"<?xml version="1.0" encoding="utf-8"?><soapenv:Envelope"#[..],
    );
    let batch = (
        "POST /a/services/data/v62.0/composite/batch HTTP/1.1\r\nhost: x\r\n\
         content-type: application/json\r\ncontent-length: 1000\r\n\r\n",
        &br#"{"batchRequests":["#[..],
    );
    for (head, part) in [soap, batch] {
        let mut tcp = env.tcp().await;
        tcp.write_all(head.as_bytes()).await.expect("head");
        tcp.write_all(part).await.expect("part of the body");
        let resp = read_response(&mut tcp).await;
        assert!(
            resp.starts_with("HTTP/1.1 408"),
            "no 408 within 10 s of a 500 ms response_timeout: {resp:?}\n{head}"
        );
    }
}

/// A SOAP client whose call cannot reach Salesforce gets the proxy's 502 as a SOAP fault: a
/// SOAP toolkit parses nothing else (JSON was an XML parse error, and the message, what failed
/// and that the call was not counted, was lost).
#[tokio::test]
async fn a_soap_call_that_cannot_reach_salesforce_gets_a_soap_fault() {
    let port = free_port(); // nothing listens there
    let sim = callmeter::sim::spawn(SimOptions::default())
        .await
        .expect("sim");
    let env = start_with(
        sim,
        &config_text(
            &format!("http://127.0.0.1:{port}"),
            r#"connect_timeout = "1s""#,
            ONE_INTEGRATION,
        ),
    )
    .await;
    let (status, headers, body) = env.soap_query("/a").await;
    assert_eq!(status, StatusCode::BAD_GATEWAY);
    let ct = headers["content-type"].to_str().expect("ct");
    let body = String::from_utf8_lossy(&body);
    assert!(
        ct.starts_with("text/xml") && body.contains("<soapenv:Fault>"),
        "content-type {ct}, body {body}"
    );
}

/// The same for a SOAP call refused because it matches no integration.
#[tokio::test]
async fn an_unmatched_soap_call_gets_a_soap_fault() {
    let env = start(SimOptions::default(), "", ONE_INTEGRATION).await;
    let (status, headers, body) = env.soap_query("/nobody").await;
    assert_eq!(status.as_u16() / 100, 4, "{status}");
    let ct = headers["content-type"].to_str().expect("ct");
    let body = String::from_utf8_lossy(&body);
    assert!(
        ct.starts_with("text/xml") && body.contains("<soapenv:Fault>"),
        "content-type {ct}, body {body}"
    );
}

fn set_key() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| std::env::set_var("CALLMETER_REVIEW_KEY", "k-secret"));
}

/// A request with an X-Callmeter-Key that matches no integration is refused (403) rather than
/// attributed by path, also when the key has a non-ASCII byte (a typo, a paste from a
/// document), which was not read at all: the call was charged to the integration its path
/// named.
#[tokio::test]
async fn a_key_that_is_not_ascii_is_refused_not_attributed_by_path() {
    set_key();
    let env = start(
        SimOptions::default(),
        "",
        "[[integration]]\nid = \"a\"\norg = \"acme\"\nmatch = { path_prefix = \"/a\" }\n\
         [[integration]]\nid = \"k\"\norg = \"acme\"\nmatch = { key_env = \"CALLMETER_REVIEW_KEY\" }\n",
    )
    .await;
    let mut tcp = env.tcp().await;
    tcp.write_all(
        b"GET /a/services/data/v62.0/sobjects HTTP/1.1\r\nhost: x\r\n\
          x-callmeter-key: k-secr\xe9t\r\n\r\n",
    )
    .await
    .expect("request");
    let resp = read_response(&mut tcp).await;
    assert!(resp.starts_with("HTTP/1.1 403"), "{resp}");
    assert!(resp.contains("CALLMETER_UNKNOWN_KEY"), "{resp}");
    assert_eq!(env.window("a").await, 0, "integration a was charged");
}

/// A valid key whose integration's rule has another condition that does not hold (here its
/// path prefix) is refused: it fell through to the other rules, and the call was charged to
/// whichever integration the path named (or to `unattributed`), the key silently dropped.
#[tokio::test]
async fn a_known_key_whose_rule_does_not_hold_is_not_charged_to_another_integration() {
    set_key();
    let env = start(
        SimOptions::default(),
        "",
        "[[integration]]\nid = \"a\"\norg = \"acme\"\nmatch = { path_prefix = \"/a\" }\n\
         [[integration]]\nid = \"k\"\norg = \"acme\"\n\
         match = { key_env = \"CALLMETER_REVIEW_KEY\", path_prefix = \"/k\" }\n",
    )
    .await;
    let (status, _, body) = env
        .http
        .get(
            &format!("{}/a/services/data/v62.0/sobjects", env.proxy),
            &[("x-callmeter-key", "k-secret")],
        )
        .await;
    assert_eq!(
        env.window("a").await,
        0,
        "charged to integration a ({status}, {})",
        String::from_utf8_lossy(&body)
    );
}

/// With a response timeout shorter than the connect timeout, a call whose TLS handshake never
/// finishes is not counted: it never left the proxy. It was cut off as
/// `CALLMETER_UPSTREAM_TIMEOUT` ("may have been processed and stays counted"), so every call
/// during a Salesforce connectivity outage burnt quota.
#[tokio::test]
async fn a_call_that_never_connected_is_not_counted_whatever_the_response_timeout() {
    let port = silent_origin().await; // never answers the ClientHello
    let sim = callmeter::sim::spawn(SimOptions::default())
        .await
        .expect("sim");
    let env = start_with(
        sim,
        &config_text(
            &format!("https://127.0.0.1:{port}"),
            "connect_timeout = \"5s\"\nresponse_timeout = \"500ms\"",
            ONE_INTEGRATION,
        ),
    )
    .await;
    let (status, _, body) = env
        .http
        .get(
            &format!("{}/a/services/data/v62.0/sobjects", env.proxy),
            &[],
        )
        .await;
    let body = String::from_utf8_lossy(&body);
    assert_eq!(env.window("a").await, 0, "counted: {status} {body}");
    assert!(
        body.contains("CALLMETER_UPSTREAM_UNREACHABLE"),
        "{status} {body}"
    );
}

/// An origin that answers every request with `head` then `body`, then holds the connection
/// for `hold` before closing it.
async fn origin_answering(head: String, body: Vec<u8>, hold: Duration) -> u16 {
    raw_origin(move |mut tcp| {
        let (head, body) = (head.clone(), body.clone());
        async move {
            let mut buf = [0u8; 8192];
            let _ = tcp.read(&mut buf).await;
            let _ = tcp.write_all(head.as_bytes()).await;
            let _ = tcp.write_all(&body).await;
            let _ = tcp.flush().await;
            tokio::time::sleep(hold).await;
        }
    })
    .await
}

async fn token_request(env: &Env, accept: &str) -> (StatusCode, String) {
    let (status, _, body) = env
        .http
        .send(
            Method::POST,
            &format!("{}/a/services/oauth2/token", env.proxy),
            &[
                ("content-type", "application/x-www-form-urlencoded"),
                ("accept", accept),
            ],
            "grant_type=password&username=u&password=p",
        )
        .await;
    (status, String::from_utf8_lossy(&body).into_owned())
}

/// Salesforce's token endpoint answers in XML when asked (`Accept: application/xml` or
/// `format=xml`). Its instance URL points at the proxy like the JSON one's, or the
/// integration's next calls would go straight to Salesforce, unmetered.
#[tokio::test]
async fn oauth_token_response_in_xml_keeps_the_client_on_the_proxy() {
    let body = r#"<?xml version="1.0" encoding="UTF-8"?><OAuth><access_token>00Dx!AQ</access_token><signature>sig</signature><scope>api</scope><instance_url>https://acme.my.salesforce.com</instance_url><id>https://login.salesforce.com/id/00Dx/005x</id><token_type>Bearer</token_type><issued_at>1278448832702</issued_at></OAuth>"#;
    let (env, text) = token_through_the_proxy("application/xml", body).await;
    let instance = xml_text(&text, "instance_url").expect("instance_url");
    assert!(
        instance.starts_with(&format!("{}/a", env.proxy)),
        "the client is sent to {instance}, not to the proxy"
    );
}

/// Same with `format=urlencoded` (or `Accept: application/x-www-form-urlencoded`).
#[tokio::test]
async fn oauth_token_response_urlencoded_keeps_the_client_on_the_proxy() {
    let body = "access_token=00Dx%21AQ&signature=sig&scope=api&instance_url=https%3A%2F%2Facme.my.salesforce.com&id=https%3A%2F%2Flogin.salesforce.com%2Fid%2F00Dx%2F005x&token_type=Bearer&issued_at=1278448832702";
    let (_, text) = token_through_the_proxy("application/x-www-form-urlencoded", body).await;
    assert!(
        !text.contains("acme.my.salesforce.com"),
        "the client is sent straight to Salesforce: {text}"
    );
}

/// A token request through the proxy, whose upstream answers `body` as `content_type` (which
/// the client asked for): the proxy and the body the client got.
async fn token_through_the_proxy(content_type: &str, body: &str) -> (Env, String) {
    let head = format!(
        "HTTP/1.1 200 OK\r\ncontent-type: {content_type};charset=UTF-8\r\ncontent-length: {}\r\n\r\n",
        body.len()
    );
    let port = origin_answering(head, body.as_bytes().to_vec(), Duration::from_secs(5)).await;
    let env = in_front_of(&format!("http://127.0.0.1:{port}"), "").await;
    let (status, text) = token_request(&env, content_type).await;
    assert_eq!(status, StatusCode::OK);
    (env, text)
}

/// A chunked JSON token response is rewritten and framed correctly.
#[tokio::test]
async fn chunked_json_token_response_is_rewritten() {
    let json = r#"{"access_token":"00Dx!AQ","instance_url":"https://acme.my.salesforce.com","id":"https://login.salesforce.com/id/00Dx/005x","token_type":"Bearer"}"#;
    let (a, b) = json.split_at(40);
    let body = format!("{:x}\r\n{a}\r\n{:x}\r\n{b}\r\n0\r\n\r\n", a.len(), b.len());
    let head =
        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\n\r\n"
            .to_owned();
    let port = origin_answering(head, body.into_bytes(), Duration::from_secs(5)).await;
    let env = in_front_of(&format!("http://127.0.0.1:{port}"), "").await;
    let (status, text) = token_request(&env, "application/json").await;
    assert_eq!(status, StatusCode::OK);
    let token: serde_json::Value = serde_json::from_str(&text).expect("JSON");
    assert_eq!(token["instance_url"], format!("{}/a", env.proxy));
}

/// The upstream breaks off the token response half-way (connection closed before the
/// announced Content-Length): the client gets the upstream failure, not the clean `200 OK`
/// with an empty body it got before (a "successful" login with nothing in it).
#[tokio::test]
async fn a_login_response_cut_off_upstream_is_not_a_clean_empty_200() {
    let json = r#"{"access_token":"00Dx!AQ","instance_url":"https://acme.my.salesforce.com","#;
    let head = "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 400\r\n\r\n"
        .to_owned();
    let port = origin_answering(head, json.as_bytes().to_vec(), Duration::from_millis(50)).await;
    let env = in_front_of(&format!("http://127.0.0.1:{port}"), "").await;
    let (status, text) = token_request(&env, "application/json").await;
    assert!(
        status != StatusCode::OK,
        "an upstream failure became `{status}` with body {text:?}"
    );
}

/// The upstream sends the token response's head, then nothing. The proxy reads login bodies
/// whole before answering: within `response_timeout` (1 s here), or the client never got even
/// a status line.
#[tokio::test]
async fn a_stalled_login_response_is_answered_within_the_response_timeout() {
    let head = "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 400\r\n\r\n"
        .to_owned();
    let port = origin_answering(
        head,
        b"{\"access_token\":".to_vec(),
        Duration::from_secs(60),
    )
    .await;
    let env = in_front_of(
        &format!("http://127.0.0.1:{port}"),
        r#"response_timeout = "1s""#,
    )
    .await;
    let answered = tokio::time::timeout(
        Duration::from_secs(8),
        token_request(&env, "application/json"),
    )
    .await;
    assert!(
        answered.is_ok(),
        "no response at all 8 s into a login whose upstream stalled (response_timeout = 1s)"
    );
}

/// The most specific rule wins, and a `listener` condition counts: `{ path_prefix = "/etl",
/// listener = "main" }` after `{ path_prefix = "/etl" }` tied with it and lost on file order,
/// so it never received a request.
#[tokio::test]
async fn a_listener_qualified_prefix_rule_is_reachable() {
    let env = start(
        SimOptions::default(),
        "",
        r#"
[[integration]]
id = "etl_any"
org = "acme"
match = { path_prefix = "/etl" }

[[integration]]
id = "etl_main"
org = "acme"
match = { path_prefix = "/etl", listener = "main" }
"#,
    )
    .await;
    let (status, _, body) = env
        .http
        .get(
            &format!("{}/etl/services/data/v62.0/sobjects", env.proxy),
            &[],
        )
        .await;
    assert!(status.is_success(), "{status} {body:?}");
    assert_eq!(
        (env.window("etl_main").await, env.window("etl_any").await),
        (1, 0),
        "the more specific rule (prefix + listener) should take the call"
    );
}

/// `callmeter_requests_total` counts each request once: a Composite Batch upload the client
/// breaks off while the proxy reads its start to cost it is a `client_error` (and not counted).
#[tokio::test]
async fn a_composite_batch_upload_broken_off_is_a_client_error() {
    let env = start(SimOptions::default(), "", ONE_INTEGRATION).await;
    let addr = env.proxy.trim_start_matches("http://").to_owned();
    let mut tcp = TcpStream::connect(&addr).await.expect("connect");
    let head = "POST /a/services/data/v62.0/composite/batch HTTP/1.1\r\nhost: x\r\n\
         authorization: Bearer 00Dsession\r\ncontent-type: application/json\r\n\
         content-length: 100\r\n\r\n";
    tcp.write_all(head.as_bytes()).await.expect("head");
    tcp.write_all(br#"{"batchRequests""#).await.expect("write");
    tokio::time::sleep(Duration::from_millis(200)).await;
    tcp.shutdown().await.expect("half-close");
    let resp = read_response(&mut tcp).await;
    assert!(resp.starts_with("HTTP/1.1 400"), "{resp}");
    assert_eq!(env.window("a").await, 0);
    let metrics = env.metrics().await;
    assert!(
        metrics.contains(r#"outcome="client_error"} 1"#),
        "{metrics}"
    );
}

/// The same for a SOAP call whose body stalls while the proxy reads its start: a 408 and a
/// `client_error`.
#[tokio::test]
async fn a_stalled_soap_upload_is_a_client_error() {
    let env = start(
        SimOptions::default(),
        r#"response_timeout = "500ms""#,
        ONE_INTEGRATION,
    )
    .await;
    let addr = env.proxy.trim_start_matches("http://").to_owned();
    let mut tcp = TcpStream::connect(&addr).await.expect("connect");
    let head = "POST /a/services/Soap/u/62.0/00D000000000001 HTTP/1.1\r\nhost: x\r\n\
         content-type: text/xml\r\nsoapaction: query\r\ncontent-length: 500\r\n\r\n";
    tcp.write_all(head.as_bytes()).await.expect("head");
    tcp.write_all(b"<?xml version=\"1.0\"?><soapenv:Envelope")
        .await
        .expect("write");
    let resp = read_response(&mut tcp).await;
    assert!(resp.starts_with("HTTP/1.1 408"), "{resp}");
    let metrics = env.metrics().await;
    assert!(
        metrics.contains(r#"outcome="client_error"} 1"#),
        "{metrics}"
    );
}

/// Requests at the edges of the costing rules cost on the proxy what the simulated org charges
/// for them: a Composite Batch whose `batchRequests` key comes twice (the last array runs), one
/// over Salesforce's 25 subrequests (refused whole, one call), the Tooling API's Composite
/// Batch (per subrequest), and a CORS preflight (free).
#[tokio::test]
async fn edge_cases_of_costing_cost_what_salesforce_charges() {
    let env = start(SimOptions::default(), "", ONE_INTEGRATION).await;
    let sub = r#"{"method":"GET","url":"v62.0/sobjects/Account/001000000000001"}"#;
    let repeated = format!(
        r#"{{"batchRequests":[],"batchRequests":[{}]}}"#,
        vec![sub; 25].join(",")
    );
    let cases = [
        (Method::POST, "composite/batch", repeated),
        (Method::POST, "composite/batch", composite_batch(30)),
        (Method::POST, "tooling/composite/batch", composite_batch(4)),
        (Method::OPTIONS, "sobjects/Account", String::new()),
    ];
    for (method, resource, body) in cases {
        let before = env.window("a").await;
        let url = format!("{}/a/services/data/v62.0/{resource}", env.proxy);
        let headers = [
            ("content-type", "application/json"),
            ("origin", "https://app.example.com"),
        ];
        let (status, _, _) = env.http.send(method.clone(), &url, &headers, body).await;
        let charged = env.sim_count().await["by_client"]["a"]
            .as_u64()
            .unwrap_or(0);
        let counted = env.window("a").await;
        assert_eq!(
            counted, charged,
            "{method} {resource} (status {status}): the proxy counted {} where Salesforce charged {}",
            counted - before,
            charged.saturating_sub(before)
        );
    }
}

/// A SOAP call with a `DebuggingHeader` draws on Salesforce's separate allocation (1,000 per
/// 24 h): not in the integration's window or the org's daily count, but counted apart, in
/// `/api/v1/usage` and `callmeter_org_debugging_calls`.
#[tokio::test]
async fn soap_calls_with_a_debugging_header_are_counted_apart() {
    let env = start(SimOptions::default(), "", ONE_INTEGRATION).await;
    let url = format!("{}/a/services/Soap/u/62.0/00D000000000001AAA", env.proxy);
    let debugging = SOAP_QUERY.replace(
        "<soapenv:Header>",
        "<soapenv:Header><urn:DebuggingHeader><urn:debugLevel>DEBUGONLY</urn:debugLevel></urn:DebuggingHeader>",
    );
    for body in [debugging.as_str(), debugging.as_str(), SOAP_QUERY] {
        let (status, _, answer) = env
            .http
            .send(Method::POST, &url, &soap_headers("query"), body.to_owned())
            .await;
        assert_eq!(
            status,
            StatusCode::OK,
            "{}",
            String::from_utf8_lossy(&answer)
        );
    }
    let org = env.usage().await["orgs"][0].clone();
    assert_eq!(env.window("a").await, 1, "{org}");
    assert_eq!(
        (&org["proxied"], &org["debugging_calls"]),
        (&1.into(), &2.into()),
        "{org}"
    );
    assert!(env
        .metrics()
        .await
        .contains(r#"callmeter_org_debugging_calls{org="acme"} 2"#));
}
