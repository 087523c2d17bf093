//! The real `callmeter serve` process: graceful shutdown on SIGTERM, and logs without secrets.

mod common;

use std::io::Read;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use callmeter::sim::{self, SimOptions};
use common::*;
use http::{Method, StatusCode};

/// Starts `callmeter serve` in front of `upstream`; returns the process and the proxy/admin URLs.
async fn serve(
    upstream: &str,
    dir: &std::path::Path,
    env: &[(&str, &str)],
) -> (Proc, String, String) {
    serve_with(upstream, dir, env, "").await
}

/// Writes the config `serve` uses, with `extra` keys for integration "a" (and any line of it
/// starting with `[proxy] ` for the `[proxy]` section, `[listener] ` for the listener).
fn write_config(
    upstream: &str,
    dir: &std::path::Path,
    ports: (u16, u16),
    extra: &str,
) -> std::path::PathBuf {
    let section = |prefix: &str| -> String {
        let lines: Vec<&str> = extra
            .lines()
            .filter_map(|l| l.strip_prefix(prefix))
            .collect();
        lines.join("\n")
    };
    let (proxy_extra, listener_extra) = (section("[proxy] "), section("[listener] "));
    let extra: Vec<&str> = extra
        .lines()
        .filter(|l| !l.starts_with("[proxy] ") && !l.starts_with("[listener] "))
        .collect();
    let extra = extra.join("\n");
    let (proxy_port, admin_port) = ports;
    let store = dir.join("callmeter.db").display().to_string();
    let toml = format!(
        r#"
[admin]
listen = "127.0.0.1:{admin_port}"
[store]
path = "{store}"
[proxy]
shutdown_grace = "10s"
{proxy_extra}
[[listener]]
name = "main"
listen = "127.0.0.1:{proxy_port}"
{listener_extra}
[[org]]
id = "acme"
instance_url = "{upstream}"
allow_plain_http = true
[[integration]]
id = "a"
org = "acme"
match = {{ path_prefix = "/a" }}
{extra}
"#
    );
    let path = dir.join("callmeter.toml");
    std::fs::write(&path, toml).expect("write config");
    path
}

/// Kills the process and returns everything it logged.
fn stop_and_read_logs(proc: &mut Proc) -> String {
    let _ = proc.0.kill();
    let mut stderr = String::new();
    proc.0
        .stderr
        .take()
        .expect("stderr")
        .read_to_string(&mut stderr)
        .expect("read logs");
    stderr
}

/// Sends SIGHUP and returns the lines the process logs up to the reload's last one ("config
/// reloaded: budgets …" or "reload refused"). Reads stderr a byte at a time, so that nothing
/// after that line is taken from the pipe: the next call reads on from there.
async fn reload_and_read_logs(proc: &mut Proc) -> Vec<String> {
    use std::io::BufRead;
    let hup = Command::new("kill")
        .args(["-HUP", &proc.0.id().to_string()])
        .status()
        .expect("kill");
    assert!(hup.success());
    let stderr = proc.0.stderr.take().expect("stderr");
    let reading = std::thread::spawn(move || {
        let mut seen = Vec::new();
        let mut reader = std::io::BufReader::with_capacity(1, stderr);
        let mut line = String::new();
        while reader.read_line(&mut line).is_ok_and(|n| n > 0) {
            let done = line.contains("config reloaded: budgets") || line.contains("reload refused");
            seen.push(std::mem::take(&mut line).trim_end().to_owned());
            if done {
                break;
            }
        }
        (seen, reader.into_inner())
    });
    let deadline = Instant::now() + Duration::from_secs(10);
    while !reading.is_finished() {
        assert!(Instant::now() < deadline, "no reload logged");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (seen, stderr) = reading.join().expect("logs");
    proc.0.stderr = Some(stderr);
    seen
}

async fn serve_with(
    upstream: &str,
    dir: &std::path::Path,
    env: &[(&str, &str)],
    extra: &str,
) -> (Proc, String, String) {
    let (proc, proxy, admin) = spawn_serve(upstream, dir, env, extra);
    wait_ready(&admin).await;
    (proc, proxy, admin)
}

/// Starts `callmeter serve` (logs on a pipe) without waiting; its proxy and admin URLs.
fn spawn_serve(
    upstream: &str,
    dir: &std::path::Path,
    env: &[(&str, &str)],
    extra: &str,
) -> (Proc, String, String) {
    let (proxy_port, admin_port) = (free_port(), free_port());
    let path = write_config(upstream, dir, (proxy_port, admin_port), extra);
    let child = Command::new(env!("CARGO_BIN_EXE_callmeter"))
        .args(["serve", "--config", path.to_str().expect("path")])
        .envs(env.iter().copied())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start callmeter serve");
    (
        Proc(child),
        format!("http://127.0.0.1:{proxy_port}"),
        format!("http://127.0.0.1:{admin_port}"),
    )
}

/// The port of a `http://127.0.0.1:PORT` URL.
fn port_of(url: &str) -> u16 {
    url.rsplit(':')
        .next()
        .and_then(|p| p.parse::<u16>().ok())
        .expect("port")
}

/// Waits until the admin listener's `/readyz` answers 200.
async fn wait_ready(admin: &str) {
    let admin_port = port_of(admin);
    let http = Http::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if tokio::net::TcpStream::connect(("127.0.0.1", admin_port))
            .await
            .is_ok()
        {
            let (status, _, _) = http.get(&format!("{admin}/readyz"), &[]).await;
            if status == StatusCode::OK {
                break;
            }
        }
        assert!(
            Instant::now() < deadline,
            "callmeter serve did not become ready"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_threads_sizes_the_runtime() {
    let org = sim::spawn(SimOptions::default()).await.expect("sim");
    for threads in [1, 3] {
        let dir = tempfile::tempdir().expect("tempdir");
        let (mut proc, proxy, _) = serve_with(
            &org.url,
            dir.path(),
            &[("RUST_LOG", "callmeter=info")],
            &format!("[proxy] worker_threads = {threads}"),
        )
        .await;
        let http = Http::new();
        let url = format!("{proxy}/a/services/data/v62.0/sobjects");
        assert_eq!(http.get(&url, &[]).await.0, StatusCode::OK);
        let stderr = stop_and_read_logs(&mut proc);
        assert!(
            stderr.contains(&format!("worker_threads={threads}")),
            "{stderr}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trace_logs_redact_credentials() {
    let org = sim::spawn(SimOptions::default()).await.expect("sim");
    let dir = tempfile::tempdir().expect("tempdir");
    let (mut proc, proxy, _) =
        serve(&org.url, dir.path(), &[("RUST_LOG", "callmeter=trace")]).await;
    let http = Http::new();
    let (status, _, body) = http
        .send(
            Method::POST,
            &format!("{proxy}/a/services/oauth2/token"),
            &[("content-type", "application/x-www-form-urlencoded")],
            "grant_type=password&username=u&password=p",
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    let token: serde_json::Value = serde_json::from_slice(&body).expect("JSON");
    let access = token["access_token"]
        .as_str()
        .expect("access_token")
        .to_owned();
    let (status, _, body) = http
        .send(
            Method::POST,
            &format!("{proxy}/a/services/Soap/u/62.0"),
            &soap_headers("login"),
            SOAP_LOGIN,
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    let session = xml_text(std::str::from_utf8(&body).expect("utf-8"), "sessionId")
        .expect("sessionId")
        .to_owned();
    let (status, _, _) = http
        .get(
            &format!("{proxy}/a/services/data/v62.0/sobjects"),
            &[
                ("authorization", "Bearer 00Dsecret!token"),
                ("cookie", "sid=cookie-secret"),
            ],
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    // Tokens in a query string: OAuth revoke, frontdoor.jsp.
    http.get(
        &format!("{proxy}/a/services/oauth2/revoke?token=revoke-secret"),
        &[],
    )
    .await;
    http.get(
        &format!("{proxy}/a/secur/frontdoor.jsp?sid=frontdoor-secret&retURL=/"),
        &[],
    )
    .await;

    let stderr = stop_and_read_logs(&mut proc);
    assert!(stderr.contains("[redacted]"), "{stderr}");
    for secret in [
        access.as_str(),
        session.as_str(),
        "00Dsecret!token",
        "cookie-secret",
        "revoke-secret",
        "frontdoor-secret",
    ] {
        assert!(
            !stderr.contains(secret),
            "{secret} leaked into the logs:\n{stderr}"
        );
    }
    assert!(
        stderr.contains("/services/data/v62.0/sobjects"),
        "the request itself is logged"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_budgets_and_keeps_counts() {
    let org = sim::spawn(SimOptions::default()).await.expect("sim");
    let dir = tempfile::tempdir().expect("tempdir");
    let (proc, proxy, admin) = serve_with(&org.url, dir.path(), &[], "quota = 2").await;
    let http = Http::new();
    let url = format!("{proxy}/a/services/data/v62.0/sobjects");
    for _ in 0..2 {
        assert_eq!(http.get(&url, &[]).await.0, StatusCode::OK);
    }
    assert_eq!(http.get(&url, &[]).await.0, StatusCode::FORBIDDEN);

    // The admin raises the quota and sends SIGHUP.
    write_config(
        &org.url,
        dir.path(),
        (port_of(&proxy), port_of(&admin)),
        "quota = 4",
    );
    let hup = Command::new("kill")
        .args(["-HUP", &proc.0.id().to_string()])
        .status()
        .expect("kill");
    assert!(hup.success());
    let deadline = Instant::now() + Duration::from_secs(5);
    let quota = || async {
        let body = http.get(&format!("{admin}/api/v1/usage"), &[]).await.2;
        let usage: serde_json::Value = serde_json::from_slice(&body).expect("JSON");
        usage["orgs"][0]["integrations"][0]["quota"].as_u64()
    };
    while quota().await != Some(4) {
        assert!(Instant::now() < deadline, "the new quota did not apply");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for _ in 0..2 {
        assert_eq!(http.get(&url, &[]).await.0, StatusCode::OK);
    }
    assert_eq!(
        http.get(&url, &[]).await.0,
        StatusCode::FORBIDDEN,
        "4 in all: the first 2 still count"
    );
    assert_eq!(org.count().by_client.get("a"), Some(&4));
}

/// SIGHUP's default action ends a process: one sent while `serve` is still starting (a
/// config-management reload right after a restart) must not kill it, and is applied once the
/// proxy is up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sighup_while_starting_is_applied_once_started() {
    use std::io::BufRead;
    let org = sim::spawn(SimOptions::default()).await.expect("sim");
    let dir = tempfile::tempdir().expect("tempdir");
    let (mut proc, proxy, admin) = spawn_serve(&org.url, dir.path(), &[], "");
    let stderr = proc.0.stderr.take().expect("stderr");
    // The "starting" line comes before the windows are restored and the sockets bound.
    let mut lines = std::io::BufReader::new(stderr).lines();
    assert!(
        lines.any(|l| l.is_ok_and(|l| l.contains("starting"))),
        "no start line"
    );
    let ports = (port_of(&proxy), port_of(&admin));
    write_config(&org.url, dir.path(), ports, "quota = 7");
    for _ in 0..3 {
        let hup = Command::new("kill")
            .args(["-HUP", &proc.0.id().to_string()])
            .status()
            .expect("kill");
        assert!(hup.success());
    }
    std::thread::spawn(move || lines.for_each(drop)); // keeps the pipe drained
    wait_ready(&admin).await;
    assert!(proc.0.try_wait().expect("wait").is_none(), "still running");
    let http = Http::new();
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let body = http.get(&format!("{admin}/api/v1/usage"), &[]).await.2;
        let usage: serde_json::Value = serde_json::from_slice(&body).expect("JSON");
        if usage["orgs"][0]["integrations"][0]["quota"].as_u64() == Some(7) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the reload sent while starting was lost"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A second `callmeter serve` on a store a running one owns (a deploy that starts the new
/// version beside the old, a manual run beside the systemd unit) does not start: at start it
/// would put the deferred call the first one is sending back in line, as if a crash had left
/// it, and Salesforce would get the write twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_serve_on_the_same_store_refuses_to_start() {
    let org = sim::spawn(SimOptions::default()).await.expect("sim");
    let dir = tempfile::tempdir().expect("tempdir");
    let defer = "rate = { per_second = 1, burst = 1 }\non_limit = \"defer\"";
    let (_first, proxy, _) = serve_with(&org.url, dir.path(), &[], defer).await;
    let http = Http::new();
    let url = format!("{proxy}/a/services/data/v62.0/sobjects/Contact");
    let post = |delay: &'static str| {
        let headers = [
            ("authorization", "Bearer 00Dsession"),
            ("content-type", "application/json"),
            ("x-sim-delay-ms", delay),
        ];
        let body = r#"{"LastName":"X"}"#.to_owned();
        let (http, url) = (http.clone(), url.clone());
        async move { http.send(Method::POST, &url, &headers, body).await.0 }
    };
    assert_eq!(post("0").await, StatusCode::CREATED, "the burst token");
    // Deferred; its replay takes 3 s at the org.
    assert_eq!(post("3000").await, StatusCode::ACCEPTED);
    eventually(10, "the deferred call is being replayed", || async {
        org.count().by_client.get("a") == Some(&2)
    })
    .await;

    let (mut second, _, _) = spawn_serve(&org.url, dir.path(), &[], defer);
    let deadline = Instant::now() + Duration::from_secs(10);
    let exit = loop {
        if let Some(exit) = second.0.try_wait().expect("wait") {
            break exit;
        }
        assert!(Instant::now() < deadline, "the second serve started");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let logs = stop_and_read_logs(&mut second);
    assert_eq!(exit.code(), Some(1), "{logs}");
    assert!(
        logs.contains("in use by another callmeter process"),
        "{logs}"
    );
    // The replay under way ends; nothing sends the call again.
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert_eq!(org.count().by_client.get("a"), Some(&2));
    let (status, _, _) = http
        .get(&format!("{proxy}/a/services/data/v62.0/sobjects"), &[])
        .await;
    assert_eq!(status, StatusCode::OK, "the first one serves on");
}

/// With `[log] format = "json"` a log shipper parses stderr line by line: every line is a JSON
/// object, also the line that says why the proxy did not start (here: the admin port is taken).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_logs_are_json_on_every_line_even_when_the_start_fails() {
    let org = sim::spawn(SimOptions::default()).await.expect("sim");
    let dir = tempfile::tempdir().expect("tempdir");
    let (proxy_port, admin_port) = (free_port(), free_port());
    let config = write_config(
        &org.url,
        dir.path(),
        (proxy_port, admin_port),
        "[log]\nformat = \"json\"",
    );
    let taken = std::net::TcpListener::bind(("127.0.0.1", admin_port)).expect("bind");
    // Also under a filter that silences everything but one module (an operator debugging it):
    // the reason is still given.
    for filter in [None, Some("callmeter::proxy=debug")] {
        let mut serve = Command::new(env!("CARGO_BIN_EXE_callmeter"));
        serve.args(["serve", "--config", config.to_str().expect("path")]);
        match filter {
            Some(filter) => serve.env("RUST_LOG", filter),
            None => serve.env_remove("RUST_LOG"),
        };
        let out = serve.output().expect("run callmeter serve");
        assert_eq!(out.status.code(), Some(1), "cannot start");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.contains("Address already in use"),
            "{filter:?}: {stderr:?}"
        );
        for line in stderr.lines().filter(|l| !l.trim().is_empty()) {
            assert!(
                serde_json::from_str::<serde_json::Value>(line).is_ok_and(|v| v.is_object()),
                "not a JSON log line: {line:?}\nall of stderr:\n{stderr}"
            );
        }
    }
    drop(taken);
}

/// A reload names what it could not apply: an operator who switches an integration to
/// `reject_style = "http429"`, or deletes one, and sends SIGHUP must not read only "config
/// reloaded" and believe it took effect.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_warns_of_each_change_that_waits_for_a_restart() {
    let org = sim::spawn(SimOptions::default()).await.expect("sim");
    let dir = tempfile::tempdir().expect("tempdir");
    let b = "[[integration]]\nid = \"b\"\norg = \"acme\"\nmatch = { path_prefix = \"/b\" }";
    let (mut proc, proxy, admin) =
        serve_with(&org.url, dir.path(), &[], &format!("quota = 1\n{b}")).await;
    let ports = (port_of(&proxy), port_of(&admin));
    write_config(
        &org.url,
        dir.path(),
        ports,
        "quota = 1\nreject_style = \"http429\"\nmax_in_flight = 2",
    );
    let logs = reload_and_read_logs(&mut proc).await;
    let warned = |what: &str| {
        logs.iter()
            .any(|l| l.contains("WARN") && l.contains("next restart") && l.contains(what))
    };
    assert!(
        warned("org \"acme\" integration \"a\".reject_style"),
        "{logs:#?}"
    );
    assert!(
        warned("org \"acme\" integration \"b\" removed"),
        "{logs:#?}"
    );
    assert!(!warned("quota"), "the quota is applied: {logs:#?}");
    // A cap added by a reload does not see the calls already in flight: said so.
    assert!(
        logs.iter().any(|l| l.contains("WARN")
            && l.contains("org \"acme\" integration \"a\": max_in_flight is added by this reload")),
        "{logs:#?}"
    );
}

/// A reload reads the files a config names as `check` and `serve` do: a file whose CA holds no
/// certificate (which `serve` would refuse to start with, exit 2) is refused, and the running
/// config, budgets included, stays.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_with_a_file_serve_would_refuse_is_refused() {
    let org = sim::spawn(SimOptions::default()).await.expect("sim");
    let dir = tempfile::tempdir().expect("tempdir");
    let (mut proc, proxy, admin) = serve_with(&org.url, dir.path(), &[], "quota = 2").await;
    let not_pem = dir.path().join("ca.pem");
    std::fs::write(&not_pem, "not a certificate\n").expect("write");
    let ports = (port_of(&proxy), port_of(&admin));
    let path = write_config(&org.url, dir.path(), ports, "quota = 4");
    let toml = std::fs::read_to_string(&path).expect("read").replace(
        "allow_plain_http = true",
        &format!(
            "allow_plain_http = true\nupstream_ca = \"{}\"",
            not_pem.display()
        ),
    );
    std::fs::write(&path, toml).expect("write");
    let check = Command::new(env!("CARGO_BIN_EXE_callmeter"))
        .args(["check", "--config"])
        .arg(&path)
        .output()
        .expect("check");
    assert_eq!(check.status.code(), Some(2), "check refuses the file");
    let logs = reload_and_read_logs(&mut proc).await;
    let line = logs.last().cloned().unwrap_or_default();
    assert!(line.contains("reload refused"), "{line}");
    let http = Http::new();
    let body = http.get(&format!("{admin}/api/v1/usage"), &[]).await.2;
    let usage: serde_json::Value = serde_json::from_slice(&body).expect("JSON");
    assert_eq!(
        usage["orgs"][0]["integrations"][0]["quota"].as_u64(),
        Some(2)
    );
    // Prometheus sees it too (an alert fires on it), and sees the next reload that takes.
    let reload_ok = || async {
        let metrics = http.get(&format!("{admin}/metrics"), &[]).await.2;
        let metrics = String::from_utf8_lossy(&metrics).into_owned();
        metrics
            .lines()
            .find_map(|l| l.strip_prefix("callmeter_config_last_reload_successful "))
            .map(str::to_owned)
    };
    assert_eq!(reload_ok().await.as_deref(), Some("0"));
    write_config(&org.url, dir.path(), ports, "quota = 4");
    let logs = reload_and_read_logs(&mut proc).await;
    assert!(
        logs.last().is_some_and(|l| l.contains("config reloaded")),
        "{logs:#?}"
    );
    assert_eq!(reload_ok().await.as_deref(), Some("1"));
}

/// A second SIGTERM (an operator's second Ctrl-C, an orchestrator's impatience) during the
/// drain stops the proxy at once instead of after the grace period (10 s here).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_sigterm_stops_without_waiting_for_the_drain() {
    let org = sim::spawn(SimOptions::default()).await.expect("sim");
    let dir = tempfile::tempdir().expect("tempdir");
    let (mut proc, proxy, _) = serve(&org.url, dir.path(), &[]).await;
    let http = Http::new();
    let url = format!("{proxy}/a/services/data/v62.0/sobjects");
    let slow = tokio::spawn(async move { http.get(&url, &[("x-sim-delay-ms", "30000")]).await });
    eventually(10, "the slow call reached the org", || async {
        org.count().requests == 1
    })
    .await;
    let pid = proc.0.id().to_string();
    let term = || {
        let killed = Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .expect("kill");
        assert!(killed.success());
    };
    term();
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(proc.0.try_wait().expect("wait").is_none(), "draining");
    term();
    let deadline = Instant::now() + Duration::from_secs(5);
    let exit = loop {
        if let Some(exit) = proc.0.try_wait().expect("wait") {
            break exit;
        }
        assert!(
            Instant::now() < deadline,
            "callmeter still draining after a second SIGTERM"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(exit.success(), "{exit:?}");
    slow.abort();
}

/// SIGTERM drains the requests in flight, then the process exits 0. Meanwhile the admin
/// listener still answers (each probe on a new connection, as a load balancer's): `/readyz` 503
/// so that the load balancer stops sending, `/healthz` 200 so that a liveness probe does not
/// kill the drain, `/metrics` for the last scrape. It stops once the drain is over. (It stopped
/// with the proxy listeners at the signal: every probe was refused for up to `shutdown_grace`.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_requests_in_flight_while_readyz_answers_503_then_exits() {
    let org = sim::spawn(SimOptions::default()).await.expect("sim");
    let dir = tempfile::tempdir().expect("tempdir");
    let (mut proc, proxy, admin) = serve(&org.url, dir.path(), &[]).await;
    let url = format!("{proxy}/a/services/data/v62.0/sobjects");
    let slow =
        tokio::spawn(async move { Http::new().get(&url, &[("x-sim-delay-ms", "2000")]).await });
    eventually(10, "the slow call reached the org", || async {
        org.count().requests == 1
    })
    .await;
    let killed = Command::new("kill")
        .args(["-TERM", &proc.0.id().to_string()])
        .status()
        .expect("kill");
    assert!(killed.success());

    let probe = |path: &'static str| {
        let url = format!("{admin}{path}");
        async move { Http::new().get(&url, &[]).await.0 }
    };
    eventually(
        5,
        "/readyz answers 503 once the shutdown has begun",
        || async { probe("/readyz").await == StatusCode::SERVICE_UNAVAILABLE },
    )
    .await;
    assert_eq!(probe("/healthz").await, StatusCode::OK);
    assert_eq!(probe("/metrics").await, StatusCode::OK);
    assert!(proc.0.try_wait().expect("wait").is_none(), "still draining");

    let (status, _, _) = slow.await.expect("slow call");
    assert_eq!(status, StatusCode::OK, "the call in flight completed");
    let deadline = Instant::now() + Duration::from_secs(10);
    let exit = loop {
        if let Some(exit) = proc.0.try_wait().expect("wait") {
            break exit;
        }
        assert!(
            Instant::now() < deadline,
            "callmeter did not exit after the drain"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(exit.success(), "{exit:?}");
    for (listener, url) in [("proxy", &proxy), ("admin", &admin)] {
        assert!(
            tokio::net::TcpStream::connect(url.trim_start_matches("http://"))
                .await
                .is_err(),
            "the {listener} listener stopped with the process"
        );
    }
}

/// `RUST_LOG=warning` (no level: `EnvFilter` takes it for a target name) silenced every line,
/// the config's warnings and errors included. It is ignored now for `[log] level`, with a line
/// that says so; the proxy still starts (a misspelt override should not cause an outage).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rust_log_warning_does_not_silence_every_log_line() {
    let org = sim::spawn(SimOptions::default()).await.expect("sim");
    let dir = tempfile::tempdir().expect("tempdir");
    let (mut proc, _, _) = serve(&org.url, dir.path(), &[("RUST_LOG", "warning")]).await;
    let logs = stop_and_read_logs(&mut proc);
    assert!(
        logs.contains("RUST_LOG=\"warning\" is ignored"),
        "the ignored variable is named: {logs}"
    );
    // The config's warning (plain http upstream) and the start-up lines at the file's level.
    assert!(logs.contains("plain http"), "{logs}");
    assert!(logs.contains("proxy listening"), "{logs}");
}

/// `serve` logs at start, and `check` prints, the warnings of a valid config that probably
/// does not do what the admin meant. A reload applies `[org.threshold]`, `notify` included, so
/// it must say them too: an admin who adds `notify` addresses without an `[smtp]` section and
/// sends SIGHUP otherwise reads only "the org's threshold applied", and no email ever comes.
/// (review-reload)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_logs_the_config_warnings_check_prints() {
    let org = sim::spawn(SimOptions::default()).await.expect("sim");
    let dir = tempfile::tempdir().expect("tempdir");
    let (mut proc, proxy, admin) = serve_with(&org.url, dir.path(), &[], "quota = 1").await;
    let ports = (port_of(&proxy), port_of(&admin));
    write_config(
        &org.url,
        dir.path(),
        ports,
        "quota = 1\n[org.threshold]\nlevels = [\"80%\"]\nnotify = [\"ops@example.com\"]",
    );
    let logs = reload_and_read_logs(&mut proc).await;
    assert!(
        logs.iter().any(|l| l.contains("WARN")
            && l.contains("threshold.notify is set but there is no [smtp] section")),
        "{logs:#?}"
    );
}

/// A self-signed certificate for "localhost": its DER, and its PEM files' contents.
struct TestCert {
    der: rustls_pki_types::CertificateDer<'static>,
    cert_pem: String,
    key_pem: String,
}

impl TestCert {
    fn new() -> Self {
        let cert = rcgen::generate_simple_self_signed(vec!["localhost".into()]).expect("cert");
        TestCert {
            der: cert.cert.der().clone(),
            cert_pem: cert.cert.pem(),
            key_pem: cert.signing_key.serialize_pem(),
        }
    }

    /// Writes the certificate and key over `files` (cert, key), as a renewal does.
    fn write(&self, files: &(std::path::PathBuf, std::path::PathBuf)) {
        std::fs::write(&files.0, &self.cert_pem).expect("write cert");
        std::fs::write(&files.1, &self.key_pem).expect("write key");
    }
}

/// The `[listener] ` line that serves TLS from `files` (cert, key).
fn tls_listener(files: &(std::path::PathBuf, std::path::PathBuf)) -> String {
    format!(
        "[listener] tls = {{ cert = \"{}\", key = \"{}\" }}",
        files.0.display(),
        files.1.display()
    )
}

/// A TLS connection to the listener on `port` (trusting each of `trusted`, without ALPN: it
/// speaks HTTP/1.1), and the certificate the listener served. A new client configuration each
/// time, so that no session is resumed with the certificate of an earlier one.
async fn tls_connect(
    port: u16,
    trusted: &[&TestCert],
) -> (
    tokio_rustls::client::TlsStream<tokio::net::TcpStream>,
    rustls_pki_types::CertificateDer<'static>,
) {
    let mut roots = rustls::RootCertStore::empty();
    for cert in trusted {
        roots.add(cert.der.clone()).expect("root");
    }
    let config = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("versions")
    .with_root_certificates(roots)
    .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config));
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect");
    let name = rustls_pki_types::ServerName::try_from("localhost").expect("name");
    let stream = connector.connect(name, tcp).await.expect("TLS handshake");
    let served = stream
        .get_ref()
        .1
        .peer_certificates()
        .expect("certificates")[0]
        .clone();
    (stream, served)
}

/// A certificate renewed in place (same files, new contents: what certbot and cert-manager do
/// before they send a reload) is served to new connections after SIGHUP; a connection opened
/// before keeps its certificate and is served on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_serves_a_tls_certificate_renewed_in_place() {
    let org = sim::spawn(SimOptions::default()).await.expect("sim");
    let dir = tempfile::tempdir().expect("tempdir");
    let files = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    let (a, b) = (TestCert::new(), TestCert::new());
    a.write(&files);
    let (mut proc, proxy, _) = serve_with(&org.url, dir.path(), &[], &tls_listener(&files)).await;
    let port = port_of(&proxy);
    let (mut before, served) = tls_connect(port, &[&a, &b]).await;
    assert!(served == a.der, "the certificate the listener started with");

    b.write(&files);
    let logs = reload_and_read_logs(&mut proc).await;
    let (_, served) = tls_connect(port, &[&a, &b]).await;
    assert!(
        served == b.der,
        "a new connection gets the renewed certificate: {logs:#?}"
    );
    assert!(
        logs.iter()
            .any(|l| l.contains("TLS certificate reloaded") && l.contains("main")),
        "{logs:#?}"
    );
    assert!(
        get_over_tls(&mut before).await.starts_with("HTTP/1.1 200"),
        "the connection opened before the reload is served on"
    );
}

/// A renewal that leaves the files broken — a key that does not fit the certificate, a
/// certificate file that holds no certificate — is refused as `serve` would refuse the files,
/// with the listener and the files named, and the old certificate stays in service; once the
/// files are right, the next SIGHUP applies them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_tls_renewal_leaves_the_old_certificate_in_service() {
    let org = sim::spawn(SimOptions::default()).await.expect("sim");
    let dir = tempfile::tempdir().expect("tempdir");
    let files = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    let (a, b, c) = (TestCert::new(), TestCert::new(), TestCert::new());
    a.write(&files);
    let (mut proc, proxy, _) = serve_with(&org.url, dir.path(), &[], &tls_listener(&files)).await;
    let port = port_of(&proxy);
    let trusted = [&a, &b, &c];

    // B's certificate with C's key.
    std::fs::write(&files.0, &b.cert_pem).expect("write cert");
    std::fs::write(&files.1, &c.key_pem).expect("write key");
    let logs = reload_and_read_logs(&mut proc).await;
    let line = logs.last().cloned().unwrap_or_default();
    assert!(line.contains("reload refused"), "{logs:#?}");
    assert!(line.contains("listener \"main\""), "{line}");
    assert!(line.contains(&files.1.display().to_string()), "{line}");
    let (mut conn, served) = tls_connect(port, &trusted).await;
    assert!(served == a.der, "the old certificate stays: {logs:#?}");
    assert!(get_over_tls(&mut conn).await.starts_with("HTTP/1.1 200"));

    // No certificate at all.
    std::fs::write(&files.0, "not a certificate\n").expect("write cert");
    b.write(&(dir.path().join("unused.pem"), files.1.clone()));
    let logs = reload_and_read_logs(&mut proc).await;
    let line = logs.last().cloned().unwrap_or_default();
    assert!(line.contains("reload refused"), "{logs:#?}");
    assert!(line.contains("listener \"main\""), "{line}");
    assert!(line.contains(&files.0.display().to_string()), "{line}");
    let (_, served) = tls_connect(port, &trusted).await;
    assert!(served == a.der, "the old certificate stays: {logs:#?}");

    // Fixed.
    b.write(&files);
    let logs = reload_and_read_logs(&mut proc).await;
    let (_, served) = tls_connect(port, &trusted).await;
    assert!(served == b.der, "the mended files are applied: {logs:#?}");
}
