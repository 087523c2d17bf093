//! Threshold emails end to end: the real proxy in front of the simulated org, usage driven with
//! the simulator's external calls and proxied calls, and a real SMTP server (Debian's
//! python3-aiosmtpd) that the test starts on a free port and kills on drop.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use callmeter::sim::{self, SimOptions};
use callmeter::{app, config};
use common::smtp::{SmtpOptions, SmtpServer};
use common::*;
use http::{Method, StatusCode};

/// Longer than the watcher's check interval (2 s) plus an SMTP exchange.
const EMAIL_WAIT: Duration = Duration::from_secs(10);
/// How long "no further email" is watched for: two checks and then some.
const QUIET: Duration = Duration::from_millis(4_500);

const REST: &str = "/a/services/data/v62.0/sobjects/Account/001000000000001AAA";

fn smtp_section(port: u16, extra: &str) -> String {
    format!(
        "\n[smtp]\nhost = \"127.0.0.1\"\nport = {port}\nsecurity = \"none\"\n\
         from = \"callmeter <callmeter@example.com>\"\n{extra}\n"
    )
}

fn integration(id: &str, extra: &str) -> String {
    format!(
        "[[integration]]\nid = \"{id}\"\norg = \"acme\"\nmatch = {{ path_prefix = \"/{id}\" }}\n{extra}\n"
    )
}

/// Starts the proxy from `toml` (with `STORE_PATH` pointing into `dir`).
async fn start_proxy(toml: &str, dir: &Path) -> (app::Server, String, String) {
    let toml = toml.replace(
        "STORE_PATH",
        &dir.join("callmeter.db").display().to_string(),
    );
    let cfg = config::parse(&toml, Path::new("test.toml")).expect("test config is valid");
    let server = app::start(&cfg).await.expect("proxy starts");
    let proxy = format!("http://{}", server.listener("main").expect("main"));
    let admin = format!("http://{}", server.admin_addr);
    (server, proxy, admin)
}

/// A simulated org that has used 850 of its 1,000 calls: one more through the proxy crosses
/// 80 %.
async fn org_at_850_of_1000() -> sim::SimHandle {
    sim::spawn(SimOptions {
        limit: 1_000,
        used: 850,
        ..SimOptions::default()
    })
    .await
    .expect("sim")
}

async fn external(http: &Http, sim: &sim::SimHandle, n: u64) {
    let (status, _, body) = http
        .send(
            Method::POST,
            &format!("{}/_sim/external?n={n}", sim.url),
            &[],
            "",
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body:?}");
}

async fn call(http: &Http, proxy: &str, path: &str) {
    let (status, _, body) = http.get(&format!("{proxy}{path}"), &[]).await;
    assert_eq!(status, StatusCode::OK, "{}", String::from_utf8_lossy(&body));
}

/// The value of a series in `/metrics` (0 if absent).
async fn metric(http: &Http, admin: &str, series: &str) -> u64 {
    let (_, _, body) = http.get(&format!("{admin}/metrics"), &[]).await;
    let text = String::from_utf8_lossy(&body);
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse::<f64>().ok())
        .map_or(0, |v| v as u64)
}

/// Waits until a series in `/metrics` has `value`: the server writes the email down before its
/// 250 reaches the proxy, so the proxy may count it a moment after the test sees the email.
async fn metric_becomes(http: &Http, admin: &str, series: &str, value: u64) {
    let what = format!("{series} = {value}");
    eventually(10, &what, || async {
        metric(http, admin, series).await == value
    })
    .await;
}

fn subjects(messages: &[serde_json::Value]) -> Vec<String> {
    messages
        .iter()
        .map(|m| m["subject"].as_str().unwrap_or_default().to_owned())
        .collect()
}

#[tokio::test]
async fn crossing_80_then_90_percent_sends_two_emails_and_a_restart_none_twice() {
    let smtp = SmtpServer::start(free_port(), SmtpOptions::default());
    let sim = sim::spawn(SimOptions {
        limit: 1_000,
        used: 700,
        ..SimOptions::default()
    })
    .await
    .expect("sim");
    // min_interval is long: the 90 % email still goes out at once, as an escalation.
    let org = "[org.threshold]\nlevels = [\"80%\", \"90%\"]\n\
               notify = [\"admin@example.com\", \"ops@example.com\"]\nmin_interval = \"4h\"\n";
    let toml = config_text(&sim.url, org, &integration("a", "")) + &smtp_section(smtp.port, "");
    let dir = tempfile::tempdir().expect("tempdir");
    let http = Http::new();

    let (server, proxy, admin) = start_proxy(&toml, dir.path()).await;
    call(&http, &proxy, REST).await; // 701 of 1000: below every level
    tokio::time::sleep(QUIET).await;
    assert!(smtp.messages().is_empty(), "{:#?}", smtp.messages());

    external(&http, &sim, 110).await;
    call(&http, &proxy, REST).await; // Salesforce reports 812
    let first = smtp.wait_for(1, EMAIL_WAIT).await;
    assert_eq!(
        subjects(&first),
        ["[callmeter] acme: 81% of daily Salesforce API calls used (812 / 1,000)"]
    );
    let m = &first[0];
    assert_eq!(
        m["rcpt_tos"],
        serde_json::json!(["admin@example.com", "ops@example.com"])
    );
    assert_eq!(m["from"], "callmeter <callmeter@example.com>");
    assert_eq!(m["content_type"], "multipart/alternative");
    let html = m["html"].as_str().expect("an HTML part");
    assert!(
        html.contains("data-color=\"orange\"") && html.contains("#ef6c00"),
        "the bar is orange at 81 %: {html}"
    );
    let plain = m["plain"].as_str().expect("a plain-text part");
    assert!(
        plain.contains("past your threshold of 80% (800 calls)"),
        "{plain}"
    );
    assert!(
        plain.contains("Top integrations by calls in the last 24 hours:")
            && plain.contains("What to do:"),
        "the top integrations and advice: {plain}"
    );
    metric_becomes(
        &http,
        &admin,
        "callmeter_notifications_total{org=\"acme\",result=\"sent\"}",
        1,
    )
    .await;

    // A restart: usage is still above 80 % and the state says it was told.
    server.shutdown().await;
    let (server, proxy, admin) = start_proxy(&toml, dir.path()).await;
    tokio::time::sleep(Duration::from_millis(2_500)).await; // the proxy's own count only
    call(&http, &proxy, REST).await; // Salesforce reports 813
    tokio::time::sleep(QUIET).await;
    assert_eq!(
        smtp.messages().len(),
        1,
        "no second email for the same crossing"
    );

    external(&http, &sim, 90).await;
    call(&http, &proxy, REST).await; // 904
    let both = smtp.wait_for(2, EMAIL_WAIT).await;
    assert_eq!(
        subjects(&both)[1],
        "[callmeter] acme: 90% of daily Salesforce API calls used (904 / 1,000)"
    );
    assert!(both[1]["html"]
        .as_str()
        .is_some_and(|h| h.contains("data-color=\"red\"")));
    tokio::time::sleep(QUIET).await;
    assert_eq!(smtp.messages().len(), 2, "exactly two emails");
    assert_eq!(
        metric(
            &http,
            &admin,
            "callmeter_notifications_total{org=\"acme\",result=\"failed\"}"
        )
        .await,
        0
    );
    server.shutdown().await;
}

/// An org at `used` of 1,000 calls with a threshold at `level` and an `[smtp]` server on
/// `port`, where nothing listens yet (`smtp_extra`: more `[smtp]` keys).
struct SmtpDown {
    port: u16,
    _sim: sim::SimHandle,
    toml: String,
    dir: tempfile::TempDir,
    http: Http,
}

impl SmtpDown {
    async fn at_850_of_1000() -> SmtpDown {
        SmtpDown::at(free_port(), 850, "80%", "").await
    }

    async fn at(port: u16, used: u64, level: &str, smtp_extra: &str) -> SmtpDown {
        let sim = sim::spawn(SimOptions {
            limit: 1_000,
            used,
            ..SimOptions::default()
        })
        .await
        .expect("sim");
        let org =
            format!("[org.threshold]\nlevels = [\"{level}\"]\nnotify = [\"admin@example.com\"]\n");
        let toml =
            config_text(&sim.url, &org, &integration("a", "")) + &smtp_section(port, smtp_extra);
        SmtpDown {
            port,
            _sim: sim,
            toml,
            dir: tempfile::tempdir().expect("tempdir"),
            http: Http::new(),
        }
    }
}

#[tokio::test]
async fn smtp_down_is_retried_and_counted_and_proxying_goes_on() {
    let down = SmtpDown::at_850_of_1000().await;
    let (port, toml, dir, http) = (down.port, &down.toml, &down.dir, &down.http);
    let (server, proxy, admin) = start_proxy(toml, dir.path()).await;
    let failed = "callmeter_notifications_total{org=\"acme\",result=\"failed\"}";
    let sent = "callmeter_notifications_total{org=\"acme\",result=\"sent\"}";
    let pending = "callmeter_notifications_pending{org=\"acme\"}";
    assert_eq!(
        metric(http, &admin, failed).await,
        0,
        "the series exists at 0"
    );
    assert!(
        String::from_utf8_lossy(&http.get(&format!("{admin}/metrics"), &[]).await.2)
            .contains(pending)
    );
    assert!(
        String::from_utf8_lossy(&http.get(&format!("{admin}/metrics"), &[]).await.2)
            .contains(failed)
    );

    call(http, &proxy, REST).await; // 851 of 1000: past 80 %
                                    // Proxying is not held up while the email fails: every call is answered at once.
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let started = Instant::now();
        call(http, &proxy, REST).await;
        assert!(started.elapsed() < Duration::from_secs(1));
        if metric(http, &admin, failed).await >= 2 {
            break; // the first attempt and a retry
        }
        assert!(Instant::now() < deadline, "no failed attempts counted");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(metric(http, &admin, sent).await, 0);
    assert_eq!(metric(http, &admin, pending).await, 1, "the email waits");

    // The server comes up: a later retry delivers the email, once.
    let smtp = SmtpServer::start(port, SmtpOptions::default());
    let messages = smtp.wait_for(1, Duration::from_secs(15)).await;
    // The figure is the one of the first check that saw the crossing (calls went on).
    let subject = &subjects(&messages)[0];
    assert!(
        subject.starts_with("[callmeter] acme: 8")
            && subject.contains("% of daily Salesforce API calls used ("),
        "{messages:#?}"
    );
    metric_becomes(http, &admin, sent, 1).await;
    metric_becomes(http, &admin, pending, 0).await;
    tokio::time::sleep(QUIET).await;
    assert_eq!(smtp.messages().len(), 1);
    server.shutdown().await;
}

#[tokio::test]
async fn an_integration_at_its_quota_levels_gets_its_own_emails() {
    let smtp = SmtpServer::start(free_port(), SmtpOptions::default());
    let sim = sim::spawn(SimOptions::default()).await.expect("sim"); // 15,000: org far below
    let org = "[org.threshold]\nlevels = [\"80%\", \"90%\"]\nnotify = [\"admin@example.com\"]\n";
    let toml = config_text(
        &sim.url,
        org,
        &(integration("a", "quota = 10\non_limit = \"queue\"") + &integration("b", "")),
    ) + &smtp_section(smtp.port, "");
    let dir = tempfile::tempdir().expect("tempdir");
    let http = Http::new();
    let (server, proxy, _) = start_proxy(&toml, dir.path()).await;
    for _ in 0..8 {
        call(&http, &proxy, REST).await;
    }
    call(&http, &proxy, "/b/services/data/v62.0/limits").await;
    let first = smtp.wait_for(1, EMAIL_WAIT).await;
    assert_eq!(
        subjects(&first),
        ["[callmeter] acme/a: 80% of its Salesforce API call quota used (8 / 10)"]
    );
    assert!(
        first[0]["plain"]
            .as_str()
            .is_some_and(|p| p.contains("held in a queue")),
        "{first:#?}"
    );
    call(&http, &proxy, REST).await;
    let both = smtp.wait_for(2, EMAIL_WAIT).await;
    assert_eq!(
        subjects(&both)[1],
        "[callmeter] acme/a: 90% of its Salesforce API call quota used (9 / 10)"
    );
    tokio::time::sleep(QUIET).await;
    assert_eq!(
        smtp.messages().len(),
        2,
        "b has no quota, the org is at 0 %"
    );
    server.shutdown().await;
}

#[tokio::test]
async fn starttls_with_a_private_ca_and_auth_with_the_password_from_the_environment() {
    let tls = tempfile::tempdir().expect("tempdir");
    let cert = rcgen::generate_simple_self_signed(vec!["127.0.0.1".into()]).expect("cert");
    let (cert_path, key_path) = (tls.path().join("cert.pem"), tls.path().join("key.pem"));
    std::fs::write(&cert_path, cert.cert.pem()).expect("write cert");
    std::fs::write(&key_path, cert.signing_key.serialize_pem()).expect("write key");
    let smtp = SmtpServer::start(
        free_port(),
        SmtpOptions {
            auth: Some("callmeter:s3cret-pw".into()),
            starttls: Some((cert_path.clone(), key_path)),
            ..SmtpOptions::default()
        },
    );
    let extra = format!(
        "security = \"starttls\"\nusername = \"callmeter\"\npassword_env = \"TEST_SMTP_PASSWORD\"\nca = \"{}\"",
        cert_path.display()
    );
    let org = SmtpDown::at(smtp.port, 950, "90%", &extra).await;
    let toml = org.toml.replace("security = \"none\"\n", "").replace(
        "STORE_PATH",
        &org.dir.path().join("callmeter.db").display().to_string(),
    );
    let env = |name: &str| (name == "TEST_SMTP_PASSWORD").then(|| "s3cret-pw".to_owned());
    let cfg = config::parse_with_env(&toml, Path::new("test.toml"), &env).expect("valid");
    let server = app::start(&cfg).await.expect("proxy starts");
    let proxy = format!("http://{}", server.listener("main").expect("main"));
    call(&Http::new(), &proxy, REST).await;
    let messages = smtp.wait_for(1, EMAIL_WAIT).await;
    assert_eq!(messages[0]["tls"], true, "{messages:#?}");
    assert_eq!(messages[0]["authenticated"], true, "{messages:#?}");
    assert!(subjects(&messages)[0].starts_with("[callmeter] acme: 95% of daily"));
    server.shutdown().await;
}

/// A reload (SIGHUP) takes a changed `[org.threshold]`: the API, the metric and the watcher
/// all use the new levels.
#[tokio::test]
async fn a_reload_applies_a_changed_org_threshold() {
    let sim = sim::spawn(SimOptions::default()).await.expect("sim");
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = |levels: &str| {
        let org = format!("daily_limit = 1000\n[org.threshold]\nlevels = [{levels}]\n");
        let toml = config_text(
            &sim.url,
            &org,
            "[[integration]]\nid = \"a\"\norg = \"acme\"\nmatch = { path_prefix = \"/a\" }\n",
        )
        .replace(
            "STORE_PATH",
            &dir.path().join("callmeter.db").display().to_string(),
        );
        config::parse(&toml, Path::new("test.toml")).expect("valid config")
    };
    let server = app::start(&cfg("\"80%\"")).await.expect("start");
    let admin = format!("http://{}", server.admin_addr);
    let http = Http::new();
    let threshold = || async {
        let (_, _, body) = http
            .get(&format!("{admin}/api/v1/orgs/acme/threshold"), &[])
            .await;
        serde_json::from_slice::<serde_json::Value>(&body).expect("JSON")
    };
    assert_eq!(
        threshold().await["threshold"]["levels"],
        serde_json::json!(["80%"])
    );

    server.reload(&cfg("\"50%\""));
    let view = threshold().await;
    assert_eq!(view["source"], "config");
    assert_eq!(
        view["threshold"]["levels"],
        serde_json::json!(["50%"]),
        "{view}"
    );
    let (_, _, metrics) = http.get(&format!("{admin}/metrics"), &[]).await;
    let metrics = String::from_utf8_lossy(&metrics);
    assert!(
        metrics.contains("callmeter_org_api_calls_threshold{org=\"acme\"} 500"),
        "{metrics}"
    );
    server.shutdown().await;
}

/// The SMTP server is down when the org crosses 80 %; callmeter restarts (e.g. to apply a
/// fixed `[smtp]`) before the email went out. The crossing's email was kept with the state:
/// it is sent after the restart, once, without a new crossing.
#[tokio::test]
async fn an_email_not_sent_before_a_restart_is_sent_after_it() {
    let down = SmtpDown::at_850_of_1000().await;
    let (port, toml, dir, http) = (down.port, &down.toml, &down.dir, &down.http);

    let (server, proxy, admin) = start_proxy(toml, dir.path()).await;
    call(http, &proxy, REST).await; // 851 of 1000: past 80 %
    let failed = "callmeter_notifications_total{org=\"acme\",result=\"failed\"}";
    let deadline = Instant::now() + Duration::from_secs(15);
    while metric(http, &admin, failed).await == 0 {
        assert!(Instant::now() < deadline, "no failed attempt");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    server.shutdown().await;

    let smtp = SmtpServer::start(port, SmtpOptions::default());
    let (server, _proxy, admin) = start_proxy(toml, dir.path()).await;
    let messages = smtp.wait_for(1, EMAIL_WAIT).await;
    let subject = &subjects(&messages)[0];
    assert!(subject.starts_with("[callmeter] acme: 8"), "{messages:#?}");
    let sent = "callmeter_notifications_total{org=\"acme\",result=\"sent\"}";
    metric_becomes(http, &admin, sent, 1).await;
    tokio::time::sleep(QUIET).await;
    assert_eq!(smtp.messages().len(), 1, "sent once");
    server.shutdown().await;

    // Sent, it left the outbox: another restart sends nothing.
    let (server, _proxy, _admin) = start_proxy(toml, dir.path()).await;
    tokio::time::sleep(QUIET).await;
    assert_eq!(smtp.messages().len(), 1, "not sent again");
    server.shutdown().await;
}

/// A graceful shutdown while a threshold email is in its SMTP transaction: the shutdown waits
/// for the server's answer (within `shutdown_grace`) and records the email as sent, so the
/// next start does not send it again. (The watcher stopped at once and the email stayed in the
/// saved outbox: a duplicate on an ordinary restart.)
#[tokio::test]
async fn an_email_taken_during_a_graceful_shutdown_is_not_sent_again() {
    let smtp = SmtpServer::start(
        free_port(),
        SmtpOptions {
            data_delay: Some(2.0),
            ..SmtpOptions::default()
        },
    );
    let sim = org_at_850_of_1000().await;
    let org = "[org.threshold]\nlevels = [\"80%\"]\nnotify = [\"admin@example.com\"]\n";
    let toml = config_text(&sim.url, org, &integration("a", "")) + &smtp_section(smtp.port, "");
    let dir = tempfile::tempdir().expect("tempdir");
    let http = Http::new();

    let (server, proxy, _admin) = start_proxy(&toml, dir.path()).await;
    call(&http, &proxy, REST).await; // 851 of 1,000: past 80 %
    smtp.wait_for(1, EMAIL_WAIT).await; // the server has the email; its 250 comes in 2 s
    server.shutdown().await; // e.g. SIGTERM for a deploy
    tokio::time::sleep(Duration::from_secs(3)).await; // the 250 arrives

    let (server, _proxy, _admin) = start_proxy(&toml, dir.path()).await;
    tokio::time::sleep(QUIET + Duration::from_secs(2)).await;
    server.shutdown().await;
    assert_eq!(
        subjects(&smtp.messages()).len(),
        1,
        "one crossing, one email: {:#?}",
        subjects(&smtp.messages())
    );
}

/// One address in `notify` that the SMTP server refuses at `RCPT TO` (a colleague who left:
/// 550 user unknown) does not cost the other recipients the email. lettre aborts a whole
/// transaction at the first refused recipient, so the email was retried for an hour and
/// nobody got it.
#[tokio::test]
async fn one_refused_recipient_does_not_keep_the_email_from_the_others() {
    let smtp = SmtpServer::start(
        free_port(),
        SmtpOptions {
            reject_rcpt: vec!["left-the-company@example.com".into()],
            ..SmtpOptions::default()
        },
    );
    let sim = org_at_850_of_1000().await;
    let org = "[org.threshold]\nlevels = [\"80%\"]\n\
               notify = [\"left-the-company@example.com\", \"admin@example.com\"]\n";
    let toml = config_text(&sim.url, org, &integration("a", "")) + &smtp_section(smtp.port, "");
    let dir = tempfile::tempdir().expect("tempdir");
    let http = Http::new();
    let (server, proxy, _admin) = start_proxy(&toml, dir.path()).await;
    call(&http, &proxy, REST).await; // 851 of 1000: past 80 %
    let messages = smtp.wait_for(1, EMAIL_WAIT).await;
    assert_eq!(
        messages[0]["rcpt_tos"],
        serde_json::json!(["admin@example.com"]),
        "{messages:#?}"
    );
    server.shutdown().await;
}

/// The only notify address has a typo; the SMTP server refuses it (550) and the email is
/// retried. The admin fixes the address on the status page (PUT, same levels): the crossing
/// stays told, and its waiting email goes to the corrected address. (It kept the address it
/// was built with, so the corrected one never heard of the crossing.)
#[tokio::test]
async fn a_corrected_notify_address_gets_the_email_of_a_crossing_not_yet_delivered() {
    let smtp = SmtpServer::start(
        free_port(),
        SmtpOptions {
            reject_rcpt: vec!["amdin@example.com".into()],
            ..SmtpOptions::default()
        },
    );
    let sim = org_at_850_of_1000().await;
    let org = "[org.threshold]\nlevels = [\"80%\"]\nnotify = [\"amdin@example.com\"]\n";
    let dir = tempfile::tempdir().expect("tempdir");
    let toml = (config_text(&sim.url, org, &integration("a", "")) + &smtp_section(smtp.port, ""))
        .replace(
            "STORE_PATH",
            &dir.path().join("callmeter.db").display().to_string(),
        );
    let env = |name: &str| (name == "CALLMETER_ADMIN_TOKEN").then(|| "t0ken".to_owned());
    let cfg = config::parse_with_env(&toml, Path::new("test.toml"), &env).expect("valid");
    let server = app::start(&cfg).await.expect("proxy starts");
    let proxy = format!("http://{}", server.listener("main").expect("main"));
    let admin = format!("http://{}", server.admin_addr);
    let http = Http::new();

    call(&http, &proxy, REST).await; // 851 of 1,000: past 80 %
    let failed = "callmeter_notifications_total{org=\"acme\",result=\"failed\"}";
    let deadline = Instant::now() + Duration::from_secs(15);
    while metric(&http, &admin, failed).await == 0 {
        assert!(Instant::now() < deadline, "no failed attempt");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    let (status, _, body) = http
        .send(
            Method::PUT,
            &format!("{admin}/api/v1/orgs/acme/threshold"),
            &[
                ("authorization", "Bearer t0ken"),
                ("content-type", "application/json"),
            ],
            r#"{"levels": ["80%"], "notify": ["admin@example.com"]}"#.to_owned(),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{}", String::from_utf8_lossy(&body));
    call(&http, &proxy, REST).await; // still 85 %

    let deadline = Instant::now() + Duration::from_secs(20);
    while smtp.messages().is_empty() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let attempts = metric(&http, &admin, failed).await;
    server.shutdown().await;
    assert_eq!(
        smtp.messages().len(),
        1,
        "20 s after the fix, admin@example.com has no email about the 80 % crossing \
         ({attempts} failed attempts to amdin@example.com so far)"
    );
}
