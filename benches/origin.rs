//! A fast stand-in for Salesforce, the origin behind the proxies in `benches/load.sh`.
//!
//! It answers every request — any method, any path, HTTP/1.1 or HTTP/2 with prior knowledge
//! (h2c) — with the same small SOQL-query-shaped JSON body and a `Sforce-Limit-Info:
//! api-usage=N/5000000` header, N counting the requests it answered. It reads no request body
//! and does no other work, so that the proxy in front of it, not the origin, is what a benchmark
//! measures.
//!
//! N wraps at 1,000,000: a full `load.sh` run sends several million requests through this
//! origin (every proxy's, not only callmeter's), and an ever-growing usage figure would drive
//! callmeter's usage estimate to the org's 5,000,000 limit and turn the throughput benchmark
//! into a rejection benchmark. A lower figure after the wrap is simply ignored by callmeter for a
//! minute (see `REPORT_AUTHORITY` in the meter), which keeps the estimate far below the limit.
//!
//! It is a `[[bench]]` target with `harness = false` rather than a `[[bin]]`, so that it is never
//! built into release artifacts or installed with `cargo install`. Build and locate it with
//! `cargo bench --bench origin --no-run --message-format=json` (the `executable` field), then:
//!
//! ```text
//! origin --listen 127.0.0.1:9000 [--threads 1]
//! ```
//!
//! It serves until killed. Run without `--listen` (as a bare `cargo bench` does, passing
//! `--bench`), it prints what it is for and exits at once instead of serving forever.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::header::{HeaderName, HeaderValue, CONTENT_TYPE};
use http::{Request, Response};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;

const BODY: &[u8] =
    br#"{"totalSize":1,"done":true,"records":[{"attributes":{"type":"Account"},"Id":"001000000000001AAA"}]}"#;
const LIMIT_INFO: HeaderName = HeaderName::from_static("sforce-limit-info");
/// The org's daily limit in the usage header (callmeter's benchmark config uses the same).
const DAILY_LIMIT: u64 = 5_000_000;
/// N in `api-usage=N/…` runs from 1 to this, then starts again (see the module docs).
const USAGE_WRAP: u64 = 1_000_000;

static ANSWERED: AtomicU64 = AtomicU64::new(0);

struct Args {
    listen: SocketAddr,
    threads: usize,
}

const USAGE: &str = "usage: origin --listen ADDR [--threads N]\n\
    A fast fake Salesforce origin for benches/load.sh; serves until killed.";

/// `Ok(None)`: no `--listen`, nothing to serve (e.g. run by a bare `cargo bench`).
fn parse_args() -> Result<Option<Args>, String> {
    let mut listen = None;
    let mut threads = 1usize;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--listen" => {
                let value = args.next().ok_or("--listen needs an address")?;
                listen = Some(
                    value
                        .parse()
                        .map_err(|e| format!("--listen {value}: {e}"))?,
                );
            }
            "--threads" => {
                let value = args.next().ok_or("--threads needs a number")?;
                threads = value
                    .parse()
                    .ok()
                    .filter(|&n| n > 0)
                    .ok_or_else(|| format!("--threads {value}: expected a number above 0"))?;
            }
            // Passed by `cargo bench` to every bench target.
            "--bench" => {}
            "-h" | "--help" => return Err(USAGE.to_owned()),
            other => return Err(format!("unknown argument {other}\n{USAGE}")),
        }
    }
    Ok(listen.map(|listen| Args { listen, threads }))
}

fn main() -> ExitCode {
    let args = match parse_args() {
        Ok(Some(args)) => args,
        Ok(None) => {
            eprintln!(
                "origin: not a benchmark by itself; benches/load.sh runs it with --listen ADDR"
            );
            return ExitCode::SUCCESS;
        }
        Err(message) => {
            eprintln!("origin: {message}");
            return ExitCode::from(2);
        }
    };
    let runtime = if args.threads == 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(args.threads)
            .enable_all()
            .build()
    };
    let runtime = match runtime {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("origin: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(serve(args.listen)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("origin: cannot listen on {}: {e}", args.listen);
            ExitCode::FAILURE
        }
    }
}

async fn serve(addr: SocketAddr) -> std::io::Result<()> {
    let listener = TcpListener::bind(addr).await?;
    let builder = auto::Builder::new(TokioExecutor::new());
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                // Out of file descriptors and the like: wait a little rather than spin.
                eprintln!("origin: accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let conn = builder
            .serve_connection(TokioIo::new(stream), service_fn(answer))
            .into_owned();
        tokio::spawn(async move {
            // Clients hanging up mid-request are normal at the end of a benchmark run.
            let _ = conn.await;
        });
    }
}

async fn answer(_req: Request<Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
    let n = ANSWERED.fetch_add(1, Ordering::Relaxed) % USAGE_WRAP + 1;
    let mut resp = Response::new(Full::new(Bytes::from_static(BODY)));
    let headers = resp.headers_mut();
    headers.insert(
        CONTENT_TYPE,
        HeaderValue::from_static("application/json;charset=UTF-8"),
    );
    if let Ok(usage) = HeaderValue::try_from(format!("api-usage={n}/{DAILY_LIMIT}")) {
        headers.insert(LIMIT_INFO, usage);
    }
    Ok(resp)
}
