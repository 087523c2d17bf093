//! `callmeter demo`: a simulated org, the proxy in front of it, and a little traffic from three
//! integrations, so a newcomer sees attribution and usage without a Salesforce org.
//!
//! The integrations log in the way real ones do — OAuth, SOAP `login()`, and a plain key-less
//! client recognised by its Host name — and then follow the URLs the proxy handed back, so the
//! demo also shows that clients stay on the proxy after login.

use std::net::SocketAddr;
use std::path::Path;

use bytes::Bytes;
use http::{Method, Request};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use thiserror::Error;

use crate::{app, config, sim};

pub struct DemoOptions {
    pub listen: SocketAddr,
    pub admin: SocketAddr,
    pub calls: u32,
    pub once: bool,
}

#[derive(Debug, Error)]
pub enum DemoError {
    #[error("cannot start the simulated org: {0}")]
    Sim(#[source] std::io::Error),
    #[error("the demo config is invalid (a bug): {0}")]
    Config(#[from] config::ConfigError),
    #[error("{0}")]
    Start(#[from] app::StartError),
    #[error("demo traffic failed: {0}")]
    Traffic(String),
}

/// Runs the demo; returns after the traffic with `once`, otherwise on Ctrl-C.
pub async fn run(opts: DemoOptions) -> Result<(), DemoError> {
    let org = sim::spawn(sim::SimOptions {
        limit: 15_000,
        used: 0,
        ..Default::default()
    })
    .await
    .map_err(DemoError::Sim)?;
    let toml = demo_config(&org.url, opts.listen, opts.admin);
    let cfg = config::parse(&toml, Path::new("<demo>"))?;
    let server = app::start(&cfg).await?;
    let proxy = server
        .listener("main")
        .ok_or_else(|| DemoError::Traffic("no listener".into()))?;
    let admin = server.admin_addr;

    println!("callmeter demo");
    println!(
        "  simulated Salesforce org : {}  (limit 15,000 calls / 24 h)",
        org.url
    );
    println!("  proxy                    : http://{proxy}");
    println!("  admin                    : http://{admin}");
    println!();
    let client = Client::builder(TokioExecutor::new()).build(HttpConnector::new());
    let http = Http { client };

    // Calls made outside the proxy: Salesforce reports them, so the org's usage includes them.
    http.send(
        Method::POST,
        &format!("{}/_sim/external?n=250", org.url),
        &[],
        Bytes::new(),
    )
    .await?;

    let calls = opts.calls;
    let base = format!("http://{proxy}");
    let (a, b, c) = tokio::join!(
        salesloft(&http, &base, calls),
        etl(&http, &base, calls),
        middleware(&http, &base, calls)
    );
    a?;
    b?;
    c?;

    let usage = server.meter.usage();
    for o in &usage.orgs {
        println!(
            "org {}: {} of {} calls used in the last 24 h ({}%, {}), {} of them through the proxy",
            o.id,
            o.used,
            o.limit.map_or("?".into(), |l| l.to_string()),
            o.percent.unwrap_or(0.0),
            o.color.map_or("-", |c| match c {
                crate::meter::Level::Green => "green",
                crate::meter::Level::Orange => "orange",
                crate::meter::Level::Red => "red",
            }),
            o.proxied,
        );
        for i in &o.integrations {
            println!("  {:<14} {:>6} calls", i.id, i.window);
        }
    }
    let sim_count = http
        .send(
            Method::GET,
            &format!("{}/_sim/count", org.url),
            &[],
            Bytes::new(),
        )
        .await?;
    println!(
        "\nthe simulated org's own count: {}",
        String::from_utf8_lossy(&sim_count)
    );
    println!("\nopen:");
    println!("  http://{admin}/               status page: usage bars, 7 days, threshold form");
    println!("  http://{admin}/api/v1/usage   usage per org and integration (JSON)");
    println!("  http://{admin}/api/v1/history counted calls per day and integration (JSON)");
    println!("  http://{admin}/metrics        Prometheus metrics");
    if opts.once {
        server.shutdown().await;
        return Ok(());
    }
    println!("\nCtrl-C stops the demo.");
    server.run_until_signal(None).await;
    drop(org);
    Ok(())
}

fn demo_config(sim_url: &str, listen: SocketAddr, admin: SocketAddr) -> String {
    format!(
        r#"
[admin]
listen = "{admin}"

[store]
path = ":memory:"

[[listener]]
name = "main"
listen = "{listen}"

[[org]]
id = "acme"
instance_url = "{sim_url}"
allow_plain_http = true
daily_limit = "auto"
unmatched = "unattributed"

[org.threshold]
levels = ["80%", "90%"]
notify = ["admin@example.com"]

[[integration]]
id = "salesloft"
org = "acme"
match = {{ path_prefix = "/salesloft" }}

[[integration]]
id = "etl"
org = "acme"
match = {{ host = "etl.localhost" }}

[[integration]]
id = "middleware"
org = "acme"
match = {{ path_prefix = "/middleware" }}
"#
    )
}

struct Http {
    client: Client<HttpConnector, Full<Bytes>>,
}

impl Http {
    async fn send(
        &self,
        method: Method,
        url: &str,
        headers: &[(&str, &str)],
        body: Bytes,
    ) -> Result<Bytes, DemoError> {
        let mut req = Request::builder().method(method).uri(url);
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let req = req
            .body(Full::new(body))
            .map_err(|e| DemoError::Traffic(e.to_string()))?;
        let resp = self
            .client
            .request(req)
            .await
            .map_err(|e| DemoError::Traffic(format!("{url}: {e}")))?;
        let status = resp.status();
        let body = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| DemoError::Traffic(e.to_string()))?
            .to_bytes();
        if !status.is_success() {
            return Err(DemoError::Traffic(format!(
                "{url}: HTTP {status}: {}",
                String::from_utf8_lossy(&body)
            )));
        }
        Ok(body)
    }
}

/// A sales-engagement tool: OAuth login, then queries and updates at the URL it was given.
async fn salesloft(http: &Http, base: &str, calls: u32) -> Result<(), DemoError> {
    let token = http
        .send(
            Method::POST,
            &format!("{base}/salesloft/services/oauth2/token"),
            &[("content-type", "application/x-www-form-urlencoded")],
            Bytes::from_static(
                b"grant_type=password&client_id=demo&client_secret=x&username=u&password=p",
            ),
        )
        .await?;
    let token: serde_json::Value =
        serde_json::from_slice(&token).map_err(|e| DemoError::Traffic(e.to_string()))?;
    let instance = token["instance_url"]
        .as_str()
        .unwrap_or(base)
        .trim_end_matches('/')
        .to_owned();
    for n in 0..calls {
        let path = if n % 4 == 0 {
            "/services/data/v62.0/sobjects/Contact/003000000000001AAA"
        } else {
            "/services/data/v62.0/query?q=SELECT+Id+FROM+Contact+LIMIT+10"
        };
        http.send(
            Method::GET,
            &format!("{instance}{path}"),
            &[("authorization", "Bearer demo")],
            Bytes::new(),
        )
        .await?;
    }
    Ok(())
}

/// A nightly ETL job, recognised by its Host name: composite batches and Bulk API 2.0.
async fn etl(http: &Http, base: &str, calls: u32) -> Result<(), DemoError> {
    let host = [
        ("host", "etl.localhost"),
        ("content-type", "application/json"),
    ];
    let batch = Bytes::from_static(
        br#"{"batchRequests":[{"method":"GET","url":"v62.0/sobjects/Account/001"},{"method":"GET","url":"v62.0/sobjects/Account/002"},{"method":"GET","url":"v62.0/sobjects/Account/003"}]}"#,
    );
    for n in 0..calls {
        if n % 3 == 0 {
            http.send(
                Method::POST,
                &format!("{base}/services/data/v62.0/composite/batch"),
                &host,
                batch.clone(),
            )
            .await?;
        } else {
            http.send(
                Method::GET,
                &format!("{base}/services/data/v62.0/jobs/ingest"),
                &host,
                Bytes::new(),
            )
            .await?;
        }
    }
    Ok(())
}

/// Middleware speaking SOAP: login(), then calls at the serverUrl the proxy rewrote.
async fn middleware(http: &Http, base: &str, calls: u32) -> Result<(), DemoError> {
    let login = Bytes::from_static(
        br#"<?xml version="1.0" encoding="utf-8"?><soapenv:Envelope xmlns:soapenv="http://schemas.xmlsoap.org/soap/envelope/" xmlns:urn="urn:partner.soap.sforce.com"><soapenv:Body><urn:login><urn:username>u</urn:username><urn:password>p</urn:password></urn:login></soapenv:Body></soapenv:Envelope>"#,
    );
    let soap = [
        ("content-type", "text/xml; charset=utf-8"),
        ("soapaction", "login"),
    ];
    let resp = http
        .send(
            Method::POST,
            &format!("{base}/middleware/services/Soap/u/62.0"),
            &soap,
            login,
        )
        .await?;
    let text = String::from_utf8_lossy(&resp);
    let server_url = text
        .split("<serverUrl>")
        .nth(1)
        .and_then(|rest| rest.split("</serverUrl>").next())
        .ok_or_else(|| DemoError::Traffic("SOAP login response without serverUrl".into()))?
        .to_owned();
    let query = Bytes::from_static(
        br#"<?xml version="1.0" encoding="utf-8"?><soapenv:Envelope xmlns:soapenv="http://schemas.xmlsoap.org/soap/envelope/" xmlns:urn="urn:partner.soap.sforce.com"><soapenv:Header><urn:SessionHeader><urn:sessionId>demo</urn:sessionId></urn:SessionHeader></soapenv:Header><soapenv:Body><urn:query><urn:queryString>SELECT Id FROM Lead</urn:queryString></urn:query></soapenv:Body></soapenv:Envelope>"#,
    );
    let soap = [
        ("content-type", "text/xml; charset=utf-8"),
        ("soapaction", "query"),
    ];
    for _ in 0..calls {
        http.send(Method::POST, &server_url, &soap, query.clone())
            .await?;
    }
    Ok(())
}
