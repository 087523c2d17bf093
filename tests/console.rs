//! The admin console end to end: the threshold API (validation, tokens, persistence across a
//! restart, the threshold metric), the history API after traffic, and the status page as a real
//! browser (Debian's headless Chromium, started by the test) renders it.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use callmeter::sim::{self, SimOptions};
use callmeter::{app, config};
use common::*;
use http::{Method, StatusCode};
use serde_json::{json, Value};

const TOKEN: &str = "t0ken-for-tests";
const REST: &str = "services/data/v62.0/sobjects/Account/001000000000001AAA";

fn integration(id: &str, org: &str, extra: &str) -> String {
    format!(
        "[[integration]]\nid = \"{id}\"\norg = \"{org}\"\nmatch = {{ path_prefix = \"/{id}\" }}\n{extra}\n"
    )
}

/// Starts the proxy from `toml` with the store in `dir`; `token`: the admin token's value.
async fn start(toml: &str, dir: &Path, token: Option<&str>) -> (app::Server, String, String) {
    let toml = toml.replace(
        "STORE_PATH",
        &dir.join("callmeter.db").display().to_string(),
    );
    let token = token.map(str::to_owned);
    let env = move |name: &str| {
        if name == "CALLMETER_ADMIN_TOKEN" {
            token.clone()
        } else {
            None
        }
    };
    let cfg = config::parse_with_env(&toml, Path::new("test.toml"), &env).expect("valid config");
    let server = app::start(&cfg).await.expect("proxy starts");
    let proxy = format!("http://{}", server.listener("main").expect("main"));
    let admin = format!("http://{}", server.admin_addr);
    (server, proxy, admin)
}

async fn put(http: &Http, url: &str, auth: Option<&str>, body: &str) -> (StatusCode, Value) {
    let header = auth.map(|t| format!("Bearer {t}"));
    let headers: Vec<(&str, &str)> = header
        .as_deref()
        .map(|h| vec![("authorization", h), ("content-type", "application/json")])
        .unwrap_or_default();
    let (status, _, body) = http.send(Method::PUT, url, &headers, body.to_owned()).await;
    (status, serde_json::from_slice(&body).expect("JSON answer"))
}

async fn get_json(http: &Http, url: &str) -> (StatusCode, Value) {
    let (status, _, body) = http.get(url, &[]).await;
    (
        status,
        serde_json::from_slice(&body).unwrap_or_else(|_| json!(String::from_utf8_lossy(&body))),
    )
}

async fn metric(http: &Http, admin: &str, series: &str) -> Option<u64> {
    let (_, _, body) = http.get(&format!("{admin}/metrics"), &[]).await;
    String::from_utf8_lossy(&body)
        .lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse::<f64>().ok())
        .map(|v| v as u64)
}

#[tokio::test]
async fn thresholds_are_validated_need_the_token_and_survive_a_restart() {
    let sim = sim::spawn(SimOptions::default()).await.expect("sim");
    let org = "daily_limit = 1000\n[org.threshold]\nlevels = [\"80%\"]\n";
    let toml = config_text(&sim.url, org, &integration("a", "acme", ""));
    let dir = tempfile::tempdir().expect("tempdir");
    let http = Http::new();
    let (server, _, admin) = start(&toml, dir.path(), Some(TOKEN)).await;
    let url = format!("{admin}/api/v1/orgs/acme/threshold");
    let threshold_metric = "callmeter_org_api_calls_threshold{org=\"acme\"}";

    let (status, view) = get_json(&http, &url).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(view["source"], "config");
    assert_eq!(
        view["threshold"],
        json!({"levels": ["80%"], "notify": [], "min_interval": "4h"})
    );
    assert_eq!(
        view["levels_in_calls"],
        json!([{"level": "80%", "calls": 800}])
    );
    assert_eq!(metric(&http, &admin, threshold_metric).await, Some(800));

    let good = r#"{"levels": ["50%", 700], "notify": ["admin@example.com"], "min_interval": "1h"}"#;
    // No token, a wrong one, another scheme: 401, and nothing changes.
    for auth in [None, Some("wrong"), Some(&format!("{TOKEN}x"))] {
        let (status, body) = put(&http, &url, auth, good).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{auth:?}: {body}");
        assert!(body["message"]
            .as_str()
            .unwrap()
            .contains("CALLMETER_ADMIN_TOKEN"));
    }
    let (_, _, basic) = http
        .send(
            Method::PUT,
            &url,
            &[("authorization", &format!("Basic {TOKEN}"))],
            good,
        )
        .await;
    assert!(String::from_utf8_lossy(&basic).contains("bearer token"));

    // Bad values: 400 naming the field.
    for (body, field, words) in [
        ("not json", None, "not JSON"),
        (r#"{"levels": []}"#, Some("levels"), "must not be empty"),
        (
            r#"{"notify": ["a@example.com"]}"#,
            Some("levels"),
            "missing",
        ),
        (r#"{"levels": ["120%"]}"#, Some("levels[0]"), "at most 100%"),
        (
            r#"{"levels": ["80%", "ninety"]}"#,
            Some("levels[1]"),
            "not a number of calls",
        ),
        (
            r#"{"levels": ["80%"], "notify": ["admin"]}"#,
            Some("notify[0]"),
            "not an email address",
        ),
        (
            r#"{"levels": ["80%"], "min_interval": "often"}"#,
            Some("min_interval"),
            "not a duration",
        ),
        (
            r#"{"levels": ["80%"], "extra": 1}"#,
            Some("extra"),
            "unknown key",
        ),
    ] {
        let (status, answer) = put(&http, &url, Some(TOKEN), body).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{body}: {answer}");
        assert_eq!(answer["field"].as_str(), field, "{body}: {answer}");
        let message = answer["message"].as_str().unwrap();
        assert!(message.contains(words), "{body}: {message}");
    }
    assert_eq!(get_json(&http, &url).await.1["source"], "config");

    let (status, view) = put(&http, &url, Some(TOKEN), good).await;
    assert_eq!(status, StatusCode::OK, "{view}");
    assert_eq!(view["source"], "runtime");
    assert_eq!(
        view["levels_in_calls"],
        json!([{"level": "50%", "calls": 500}, {"level": "700", "calls": 700}])
    );
    assert_eq!(metric(&http, &admin, threshold_metric).await, Some(500));
    assert_eq!(
        get_json(&http, &format!("{admin}/api/v1/usage")).await.1["orgs"][0]["threshold"],
        500
    );
    let (status, _) = put(
        &http,
        &format!("{admin}/api/v1/orgs/nope/threshold"),
        Some(TOKEN),
        good,
    )
    .await;
    assert_eq!(status, StatusCode::NOT_FOUND);

    // A restart keeps the run-time threshold, over the config's.
    server.shutdown().await;
    let (server, _, admin) = start(&toml, dir.path(), Some(TOKEN)).await;
    let url = format!("{admin}/api/v1/orgs/acme/threshold");
    let (_, view) = get_json(&http, &url).await;
    assert_eq!(view["source"], "runtime");
    assert_eq!(
        view["threshold"],
        json!({"levels": ["50%", 700], "notify": ["admin@example.com"], "min_interval": "1h"})
    );
    assert_eq!(metric(&http, &admin, threshold_metric).await, Some(500));

    // DELETE goes back to the config's threshold.
    let (status, _, body) = http
        .send(
            Method::DELETE,
            &url,
            &[("authorization", &format!("Bearer {TOKEN}"))],
            "",
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body:?}");
    assert_eq!(get_json(&http, &url).await.1["source"], "config");
    assert_eq!(metric(&http, &admin, threshold_metric).await, Some(800));
    server.shutdown().await;

    // Without a token in the environment, changes are refused with what to do.
    let (server, _, admin) = start(&toml, dir.path(), None).await;
    let url = format!("{admin}/api/v1/orgs/acme/threshold");
    let (status, body) = put(&http, &url, Some(TOKEN), good).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    let message = body["message"].as_str().unwrap();
    assert!(
        message.contains("CALLMETER_ADMIN_TOKEN") && message.contains("admin.token_env"),
        "{message}"
    );
    server.shutdown().await;
}

fn today_utc() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs() as i64;
    callmeter::history::day_string(secs.div_euclid(86_400))
}

#[tokio::test]
async fn history_counts_calls_per_day_and_integration() {
    let sim = sim::spawn(SimOptions::default()).await.expect("sim");
    let ints = integration("a", "acme", "")
        + &integration("b", "acme", "")
        + &integration("idle", "acme", "");
    let toml = config_text(&sim.url, "", &ints);
    let dir = tempfile::tempdir().expect("tempdir");
    let http = Http::new();
    let (server, proxy, admin) = start(&toml, dir.path(), None).await;
    for (id, n) in [("a", 3), ("b", 5)] {
        for _ in 0..n {
            let (status, _, _) = http.get(&format!("{proxy}/{id}/{REST}"), &[]).await;
            assert_eq!(status, StatusCode::OK);
        }
    }
    // Not counted by Salesforce: not in the history either.
    let (status, _, _) = http.get(&format!("{proxy}/b/services/data/"), &[]).await;
    assert_eq!(status, StatusCode::OK);

    let check = |history: &Value| {
        assert_eq!(history["time_zone"], "UTC");
        let days = history["orgs"][0]["days"].as_array().expect("days");
        assert_eq!(days.len(), 7, "{history}");
        let today = &days[6];
        assert_eq!(today["day"], today_utc().as_str(), "{history}");
        assert_eq!(today["integrations"], json!({"a": 3, "b": 5, "idle": 0}));
        assert_eq!(today["total"], 8);
        assert!(days[..6].iter().all(|d| d["total"] == 0), "{history}");
    };
    let (status, history) = get_json(&http, &format!("{admin}/api/v1/history?days=7")).await;
    assert_eq!(status, StatusCode::OK);
    check(&history);
    let (_, one) = get_json(&http, &format!("{admin}/api/v1/history?days=1&org=acme")).await;
    assert_eq!(one["orgs"][0]["days"].as_array().map(Vec::len), Some(1));
    for (query, status) in [
        ("days=0", StatusCode::BAD_REQUEST),
        ("days=31", StatusCode::BAD_REQUEST),
        ("days=week", StatusCode::BAD_REQUEST),
        ("org=nope", StatusCode::NOT_FOUND),
    ] {
        let (got, body) = get_json(&http, &format!("{admin}/api/v1/history?{query}")).await;
        assert_eq!(got, status, "{query}: {body}");
        assert!(body["message"].is_string(), "{query}: {body}");
    }

    // After a restart the same counts: the minutes not recorded yet come back with the windows.
    server.shutdown().await;
    let (server, _, admin) = start(&toml, dir.path(), None).await;
    check(&get_json(&http, &format!("{admin}/api/v1/history")).await.1);
    server.shutdown().await;
}

/// Debian's Chromium, headless, with a profile in `profile`; what it prints. It runs on the
/// blocking pool: the proxy it looks at is served by this test's runtime.
/// A browser that hangs (it happened once in a full run on a loaded 2-core machine: no output
/// in 25 s) is killed and started once more; what the page shows is checked by the caller.
async fn chromium(profile: &Path, args: &[String]) -> String {
    let (profile, args) = (profile.to_owned(), args.to_vec());
    tokio::task::spawn_blocking(move || {
        chromium_blocking(&profile, &args)
            // A profile of its own: what is left of the killed one may still hold its lock.
            .or_else(|| chromium_blocking(&profile.join("retry"), &args))
            .expect("chromium did not finish within 25 s, twice")
    })
    .await
    .expect("chromium thread")
}

/// Its output, or `None` if it was killed after 25 s.
fn chromium_blocking(profile: &Path, args: &[String]) -> Option<String> {
    let bin = ["chromium", "chromium-browser", "google-chrome"]
        .into_iter()
        .find(|b| {
            Command::new(b)
                .arg("--version")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        })
        .expect("no chromium: install Debian's chromium package (bash scripts/test.sh does)");
    let mut child = Command::new(bin)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--no-first-run",
            "--hide-scrollbars",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start chromium");
    // Read stdout on a thread so that a hung browser can be killed after the deadline.
    let mut stdout = child.stdout.take().expect("stdout");
    let reader = std::thread::spawn(move || {
        let mut out = String::new();
        let _ = std::io::Read::read_to_string(&mut stdout, &mut out);
        out
    });
    let deadline = Instant::now() + Duration::from_secs(25);
    loop {
        if child.try_wait().expect("chromium status").is_some() {
            break;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return None;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Some(reader.join().expect("chromium output"))
}

/// The attributes of the first element in `html` after `from` whose attributes contain `marker`.
fn element_with<'h>(html: &'h str, from: usize, marker: &str) -> &'h str {
    let at = from
        + html[from..]
            .find(marker)
            .unwrap_or_else(|| panic!("{marker} not found"));
    let start = html[..at].rfind('<').expect("tag start");
    let end = at + html[at..].find('>').expect("tag end");
    &html[start..end]
}

#[tokio::test]
async fn the_status_page_shows_green_orange_and_red_bars_in_a_real_browser() {
    // Three orgs, each in front of its own simulated org, at 50 %, 85 % and 95 % of 1,000.
    let mut sims = Vec::new();
    // at50 gets 4 calls through the proxy, the others 1.
    for used in [496, 849, 949] {
        sims.push(
            sim::spawn(SimOptions {
                limit: 1_000,
                used,
                ..SimOptions::default()
            })
            .await
            .expect("sim"),
        );
    }
    let mut toml = config_text(
        &sims[0].url,
        "[org.threshold]\nlevels = [\"80%\", \"90%\"]\nnotify = [\"admin@example.com\"]\n",
        "",
    )
    .replace("id = \"acme\"", "id = \"at50\"");
    for (org, sim) in [("at85", &sims[1]), ("at95", &sims[2])] {
        toml += &format!(
            "[[org]]\nid = \"{org}\"\ninstance_url = \"{}\"\nallow_plain_http = true\n\
             [org.threshold]\nlevels = [\"80%\"]\n\n",
            sim.url
        );
    }
    toml += &integration("salestool", "at50", "quota = 5");
    toml += &integration("etl", "at85", "");
    toml += &integration("erp", "at95", "quota = \"10%\"");
    let dir = tempfile::tempdir().expect("tempdir");
    let http = Http::new();
    let (server, proxy, admin) = start(&toml, dir.path(), Some(TOKEN)).await;
    for prefix in ["salestool", "etl", "erp"] {
        let (status, _, _) = http.get(&format!("{proxy}/{prefix}/{REST}"), &[]).await;
        assert_eq!(status, StatusCode::OK);
    }
    // 4 of salestool's 5: orange.
    for _ in 0..3 {
        http.get(&format!("{proxy}/salestool/{REST}"), &[]).await;
    }

    let profile = tempfile::tempdir().expect("profile");
    let dom = chromium(profile.path(), &["--dump-dom".into(), format!("{admin}/")]).await;
    assert!(
        dom.contains("<title>callmeter: Salesforce API usage</title>"),
        "{dom}"
    );
    assert!(
        dom.contains("name=\"viewport\""),
        "readable on a phone: {dom}"
    );
    for (org, total, threshold) in [
        ("at50", ("green", "50.0"), "green"), // 500 of the 800 threshold: 62 %
        ("at85", ("orange", "85.0"), "red"),  // 850 of 800
        ("at95", ("red", "95.0"), "red"),
    ] {
        let section = dom
            .find(&format!("data-org=\"{org}\""))
            .unwrap_or_else(|| panic!("no card for {org}: {dom}"));
        let bar = element_with(&dom, section, "data-bar=\"total\"");
        assert!(
            bar.contains(&format!("data-color=\"{}\"", total.0))
                && bar.contains(&format!("data-percent=\"{}\"", total.1)),
            "{org}: {bar}"
        );
        let bar_at = section + dom[section..].find("data-bar=\"total\"").expect("bar");
        let fill = element_with(&dom, bar_at, "class=\"fill");
        assert!(
            fill.contains(&format!("fill {}", total.0))
                && fill.contains(&format!("width:{}%", total.1)),
            "{org}: {fill}"
        );
        let bar = element_with(&dom, section, "data-bar=\"threshold\"");
        assert!(
            bar.contains(&format!("data-color=\"{threshold}\"")),
            "{org}: {bar}"
        );
    }
    let salestool = element_with(&dom, 0, "data-integration=\"salestool\"");
    assert!(salestool.contains("data-color=\"orange\""), "{salestool}");
    let erp = element_with(&dom, 0, "data-integration=\"erp\"");
    assert!(erp.contains("data-color=\"green\""), "1 of 100: {erp}");
    assert!(dom.contains("Total API calls used") && dom.contains("API usage threshold"));
    assert!(
        dom.contains("id=\"threshold-form\""),
        "the form to change it"
    );
    assert!(dom.contains("data-queue-depth=\"0\""), "the queue depth");
    assert!(dom.contains("Last 7 days"), "the history");

    // The live part the page refreshes is the same markup.
    let (status, _, live) = http.get(&format!("{admin}/?part=live"), &[]).await;
    assert_eq!(status, StatusCode::OK);
    assert!(String::from_utf8_lossy(&live).contains("data-org=\"at95\""));

    // A phone-sized screenshot, kept for people to look at.
    let shot: PathBuf = Path::new(env!("CARGO_TARGET_TMPDIR")).join("status-page-412x900.png");
    let _ = std::fs::remove_file(&shot);
    chromium(
        profile.path(),
        &[
            format!("--screenshot={}", shot.display()),
            "--window-size=412,900".into(),
            format!("{admin}/"),
        ],
    )
    .await;
    let png = std::fs::read(&shot).expect("screenshot written");
    assert!(
        png.starts_with(b"\x89PNG") && png.len() > 10_000,
        "a real picture"
    );
    eprintln!("status page screenshot: {}", shot.display());
    server.shutdown().await;
}

/// Debian's ChromeDriver on a free port, killed on drop; spoken to in plain WebDriver JSON.
struct Driver {
    child: std::process::Child,
    url: String,
    http: Http,
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Driver {
    /// Starts chromedriver on a free port and waits until it says it is ready for sessions. A
    /// free port can be taken by a parallel test before chromedriver binds it (it then exits,
    /// and a bare connect would reach the other test's server): such a start is tried again on
    /// another port.
    async fn start() -> Driver {
        for _ in 0..3 {
            let port = common::free_port();
            let mut child = Command::new("chromedriver")
                .arg(format!("--port={port}"))
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect(
                    "start chromedriver: install Debian's chromium-driver (bash scripts/test.sh does)",
                );
            let deadline = Instant::now() + Duration::from_secs(15);
            loop {
                if child.try_wait().ok().flatten().is_some() {
                    break; // it could not bind: another port
                }
                if chromedriver_ready(port).await {
                    return Driver {
                        child,
                        url: format!("http://127.0.0.1:{port}"),
                        http: Http::new(),
                    };
                }
                assert!(Instant::now() < deadline, "chromedriver did not start");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        panic!("chromedriver did not start on three free ports");
    }

    async fn call(&self, method: Method, path: &str, body: Value) -> Value {
        let (status, _, answer) = self
            .http
            .send(
                method,
                &format!("{}{path}", self.url),
                &[("content-type", "application/json")],
                if body.is_null() {
                    String::new()
                } else {
                    body.to_string()
                },
            )
            .await;
        let answer: Value = serde_json::from_slice(&answer).expect("WebDriver JSON");
        assert!(status.is_success(), "WebDriver {path}: {status} {answer}");
        answer["value"].clone()
    }
}

/// Whether chromedriver on `port` answers `/status` as ready for new sessions.
async fn chromedriver_ready(port: u16) -> bool {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let Ok(mut tcp) = tokio::net::TcpStream::connect(("127.0.0.1", port)).await else {
        return false;
    };
    let request = "GET /status HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n";
    if tcp.write_all(request.as_bytes()).await.is_err() {
        return false;
    }
    // Read until the answer says so (chromedriver may keep the connection open), or 2 s.
    let mut answer = Vec::new();
    let mut buf = [0u8; 1024];
    let ready = |answer: &[u8]| {
        let text = String::from_utf8_lossy(answer);
        text.contains("\"ready\":true") && text.contains("ChromeDriver")
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
    while !ready(&answer) {
        match tokio::time::timeout_at(deadline, tcp.read(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => answer.extend_from_slice(&buf[..n]),
            _ => return false,
        }
    }
    true
}

/// A browser session of `driver`, on a phone-sized window.
struct Session<'d> {
    driver: &'d Driver,
    id: String,
}

impl<'d> Session<'d> {
    async fn new(driver: &'d Driver, profile: &Path) -> Session<'d> {
        let caps = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": "/usr/bin/chromium",
                "args": ["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                         "--no-first-run", "--window-size=412,900",
                         format!("--user-data-dir={}", profile.display())]
            }
        }}});
        let value = driver.call(Method::POST, "/session", caps).await;
        let id = value["sessionId"].as_str().expect("session id").to_owned();
        Session { driver, id }
    }

    async fn go(&self, url: &str) {
        let path = format!("/session/{}/url", self.id);
        self.driver
            .call(Method::POST, &path, json!({"url": url}))
            .await;
    }

    async fn element(&self, css: &str) -> String {
        let path = format!("/session/{}/element", self.id);
        let found = self
            .driver
            .call(
                Method::POST,
                &path,
                json!({"using": "css selector", "value": css}),
            )
            .await;
        found["element-6066-11e4-a52e-4f735466cecf"]
            .as_str()
            .expect("element id")
            .to_owned()
    }

    async fn fill(&self, css: &str, text: &str) {
        let e = self.element(css).await;
        let base = format!("/session/{}/element/{e}", self.id);
        self.driver
            .call(Method::POST, &format!("{base}/clear"), json!({}))
            .await;
        self.driver
            .call(
                Method::POST,
                &format!("{base}/value"),
                json!({"text": text}),
            )
            .await;
    }

    async fn click(&self, css: &str) {
        let e = self.element(css).await;
        let path = format!("/session/{}/element/{e}/click", self.id);
        self.driver.call(Method::POST, &path, json!({})).await;
    }

    /// Waits until the text of `css` contains `want`; returns it.
    async fn wait_text(&self, css: &str, want: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let e = self.element(css).await;
            let path = format!("/session/{}/element/{e}/text", self.id);
            let text = self.driver.call(Method::GET, &path, Value::Null).await;
            let text = text.as_str().unwrap_or_default().to_owned();
            if text.contains(want) {
                return text;
            }
            assert!(
                Instant::now() < deadline,
                "{css} says {text:?}, not {want:?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn source(&self) -> String {
        let path = format!("/session/{}/source", self.id);
        let s = self.driver.call(Method::GET, &path, Value::Null).await;
        s.as_str().unwrap_or_default().to_owned()
    }

    async fn close(self) {
        let path = format!("/session/{}", self.id);
        self.driver.call(Method::DELETE, &path, Value::Null).await;
    }
}

#[tokio::test]
async fn the_threshold_form_changes_the_threshold_from_a_browser() {
    let sim = sim::spawn(SimOptions {
        limit: 1_000,
        used: 599,
        ..SimOptions::default()
    })
    .await
    .expect("sim");
    let org = "[org.threshold]\nlevels = [\"80%\"]\n";
    let toml = config_text(&sim.url, org, &integration("a", "acme", ""));
    let dir = tempfile::tempdir().expect("tempdir");
    let http = Http::new();
    let (server, proxy, admin) = start(&toml, dir.path(), Some(TOKEN)).await;
    let (status, _, _) = http.get(&format!("{proxy}/a/{REST}"), &[]).await; // 600 of 1000
    assert_eq!(status, StatusCode::OK);

    let driver = Driver::start().await;
    let profile = tempfile::tempdir().expect("profile");
    let session = Session::new(&driver, profile.path()).await;
    session.go(&format!("{admin}/")).await;
    // The form is filled with the threshold in force.
    assert!(session.source().await.contains("data-levels=\"80%\""));

    session.fill("input[name=levels]", "50 %, 95%").await;
    session
        .fill("input[name=notify]", "admin@example.com ops@example.com")
        .await;
    session.fill("input[name=min_interval]", "2h").await;
    session.fill("input[name=token]", "not-the-token").await;
    session.click("button[type=submit]").await;
    let refused = session.wait_text("#form-result", "Not saved").await;
    assert!(refused.contains("401"), "{refused}");

    session.fill("input[name=token]", TOKEN).await;
    session.click("button[type=submit]").await;
    session.wait_text("#form-result", "Saved.").await;
    let (_, view) = get_json(&http, &format!("{admin}/api/v1/orgs/acme/threshold")).await;
    assert_eq!(view["source"], "runtime");
    assert_eq!(
        view["threshold"],
        json!({"levels": ["50%", "95%"], "notify": ["admin@example.com", "ops@example.com"], "min_interval": "2h"})
    );
    // The live part follows: 600 of the new 500-call threshold is red.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let page = session.source().await;
        let at = page.find("data-bar=\"threshold\"").expect("threshold bar");
        if element_with(&page, at, "data-bar=\"threshold\"").contains("data-color=\"red\"") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the threshold bar did not turn red"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // Invalid input is answered with the field and what is wrong.
    session.fill("input[name=levels]", "80%, lots").await;
    session.click("button[type=submit]").await;
    let bad = session.wait_text("#form-result", "Not saved").await;
    assert!(bad.contains("400") && bad.contains("levels[1]"), "{bad}");

    session.click("#threshold-reset").await;
    session.wait_text("#form-result", "config file").await;
    let (_, view) = get_json(&http, &format!("{admin}/api/v1/orgs/acme/threshold")).await;
    assert_eq!(view["source"], "config");
    session.close().await;
    server.shutdown().await;
}

/// An admin token read from the environment with a trailing newline (a Kubernetes secret made
/// with `kubectl create secret --from-file`, an env file written with `echo`) is taken without
/// it: a header value cannot carry the newline, so the token could never be presented.
#[tokio::test]
async fn an_admin_token_with_a_trailing_newline_still_works() {
    let sim = sim::spawn(SimOptions::default()).await.expect("sim");
    let toml = config_text(
        &sim.url,
        "daily_limit = 1000\n",
        &integration("a", "acme", ""),
    );
    let dir = tempfile::tempdir().expect("tempdir");
    let http = Http::new();
    let (server, _, admin) = start(&toml, dir.path(), Some(&format!("{TOKEN}\n"))).await;
    let url = format!("{admin}/api/v1/orgs/acme/threshold");
    let (status, body) = put(&http, &url, Some(TOKEN), r#"{"levels": ["80%"]}"#).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    server.shutdown().await;
}

/// `/api/v1/usage`'s `percent` and `color` agree: at 7,996 of 10,000 calls, not
/// `"percent": 80.0` (rounded) with `"color": "green"` (from 79.96).
#[tokio::test]
async fn usage_percent_and_color_agree() {
    let sim = sim::spawn(SimOptions {
        limit: 10_000,
        used: 7_995,
        ..SimOptions::default()
    })
    .await
    .expect("sim");
    let toml = config_text(&sim.url, "", &integration("a", "acme", ""));
    let dir = tempfile::tempdir().expect("tempdir");
    let http = Http::new();
    let (server, proxy, admin) = start(&toml, dir.path(), None).await;
    let (status, _, _) = http.get(&format!("{proxy}/a/{REST}"), &[]).await;
    assert_eq!(status, StatusCode::OK);
    let (_, usage) = get_json(&http, &format!("{admin}/api/v1/usage")).await;
    let org = &usage["orgs"][0];
    assert_eq!(org["used"], 7_996, "{usage}");
    let percent = org["percent"].as_f64().expect("percent");
    let expected = if percent >= 90.0 {
        "red"
    } else if percent >= 80.0 {
        "orange"
    } else {
        "green"
    };
    assert_eq!(org["color"], expected, "{usage}");
    server.shutdown().await;
}

/// The status page's "Queue depth: N waiting" for a deferring integration is the store's count
/// read for the page. It was the count as of the last `/metrics` scrape or `/api/v1/usage`
/// read: with nobody scraping, an integration with deferred calls waiting showed 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_status_page_counts_deferred_calls_waiting_now() {
    let integration =
        "[[integration]]\nid = \"d\"\norg = \"acme\"\nmatch = { path_prefix = \"/d\" }\n\
                       quota = 1\non_limit = \"defer\"\n";
    let env = common::start(SimOptions::default(), "", integration).await;
    let url = format!("{}/d/services/data/v62.0/sobjects/Contact", env.proxy);
    let auth = [("content-type", "application/json")];
    let first = env
        .http
        .send(http::Method::POST, &url, &auth, r#"{"LastName":"a"}"#)
        .await;
    assert_eq!(first.0, http::StatusCode::CREATED);
    for _ in 0..2 {
        let (status, _, _) = env
            .http
            .send(http::Method::POST, &url, &auth, r#"{"LastName":"b"}"#)
            .await;
        assert_eq!(status, http::StatusCode::ACCEPTED);
    }
    let (status, _, page) = env.http.get(&format!("{}/", env.admin), &[]).await;
    assert_eq!(status, http::StatusCode::OK);
    let page = String::from_utf8_lossy(&page);
    assert!(
        page.contains("data-queue-depth=\"2\""),
        "two deferred calls wait (quota spent for a day), the status page says: {:?}",
        page.find("data-queue-depth").map(|at| &page[at..at + 60])
    );
}
