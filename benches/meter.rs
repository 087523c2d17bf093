//! The cost of metering one call: decide + count, on one thread and on two contending threads,
//! with 10 and 10,000 integrations — next to the obvious alternatives, a `Mutex<HashMap>` and a
//! `DashMap` keyed by integration id. Also what surrounds it: rendering `/metrics` with 10,000
//! integrations, and reading the usage Salesforce reports (`Sforce-Limit-Info`, a SOAP
//! `LimitInfoHeader`).
//!
//! Run: `cargo bench --bench meter`. Results are recorded in the README's performance section.

use std::collections::HashMap;
use std::hint::black_box;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use callmeter::config;
use callmeter::meter::{Clock, IntegrationMeter, Meter, OrgMeter, Verdict};
use callmeter::metrics::{Metrics, Outcome};
use callmeter::salesforce::{parse_limit_info, Api, BodyScanner};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use dashmap::DashMap;

fn org() -> Arc<OrgMeter> {
    let toml = r#"
[[listener]]
name = "main"
listen = "127.0.0.1:0"
[[org]]
id = "acme"
instance_url = "https://acme.my.salesforce.com"
daily_limit = "auto"
"#;
    let cfg = config::parse(toml, Path::new("bench.toml")).expect("bench config");
    Arc::new(OrgMeter::new(&cfg.orgs[0], Clock::new()))
}

fn integrations(n: usize) -> Vec<Arc<IntegrationMeter>> {
    let org = org();
    (0..n)
        .map(|i| {
            Arc::new(IntegrationMeter::new(
                config::IntegrationId::new(&format!("i{i}")).expect("id"),
                org.clone(),
            ))
        })
        .collect()
}

/// Runs `op(i)` `iters` times split over `threads` threads; returns the wall time.
fn contended(threads: usize, iters: u64, op: impl Fn(u64) + Sync) -> Duration {
    let start = Instant::now();
    std::thread::scope(|s| {
        for t in 0..threads as u64 {
            let op = &op;
            s.spawn(move || {
                for i in 0..iters / threads as u64 {
                    op(i * threads as u64 + t);
                }
            });
        }
    });
    start.elapsed()
}

fn decide(c: &mut Criterion) {
    let mut group = c.benchmark_group("decide_and_count");
    for n in [10usize, 10_000] {
        for threads in [1usize, 2] {
            let meters = integrations(n);
            group.bench_with_input(
                BenchmarkId::new(format!("callmeter/{threads}t"), n),
                &n,
                |b, &n| {
                    b.iter_custom(|iters| {
                        contended(threads, iters, |i| {
                            let verdict = meters[(i as usize * 7919) % n].decide(black_box(1));
                            debug_assert!(matches!(verdict, Verdict::Forward(_)));
                            let _ = black_box(verdict);
                        })
                    })
                },
            );

            let ids: Vec<String> = (0..n).map(|i| format!("i{i}")).collect();
            let mutex: Mutex<HashMap<String, u64>> =
                Mutex::new(ids.iter().map(|id| (id.clone(), 0)).collect());
            group.bench_with_input(
                BenchmarkId::new(format!("mutex_hashmap/{threads}t"), n),
                &n,
                |b, &n| {
                    b.iter_custom(|iters| {
                        contended(threads, iters, |i| {
                            let id = &ids[(i as usize * 7919) % n];
                            if let Some(c) = mutex.lock().expect("lock").get_mut(id.as_str()) {
                                *c += 1;
                            }
                        })
                    })
                },
            );

            let dash: DashMap<String, u64> = ids.iter().map(|id| (id.clone(), 0)).collect();
            group.bench_with_input(
                BenchmarkId::new(format!("dashmap/{threads}t"), n),
                &n,
                |b, &n| {
                    b.iter_custom(|iters| {
                        contended(threads, iters, |i| {
                            if let Some(mut c) = dash.get_mut(ids[(i as usize * 7919) % n].as_str())
                            {
                                *c += 1;
                            }
                        })
                    })
                },
            );
        }
    }
    group.finish();
}

/// `GET /metrics` as the admin listener serves it: the meter's usage snapshot, then the text
/// rendering, with 10,000 integrations of which 1,000 or all have been called.
fn metrics_render(c: &mut Criterion) {
    let mut group = c.benchmark_group("metrics_render");
    group.sample_size(10);
    const N: usize = 10_000;
    for active in [1_000usize, N] {
        let metrics = Metrics::new();
        let mut meter = Meter::new();
        let org = org();
        meter.add_org(org.clone(), Vec::new());
        for i in 0..N {
            let id = format!("i{i:05}");
            let im = Arc::new(IntegrationMeter::new(
                config::IntegrationId::new(&id).expect("id"),
                org.clone(),
            ));
            meter.add_integration(im.clone());
            let handles = metrics.integration("acme", &id);
            if i < active {
                let _ = im.decide(1);
                handles.record(Api::Rest, Outcome::Forwarded, Duration::from_millis(40));
            }
        }
        group.bench_with_input(
            BenchmarkId::new("integrations_10000_active", active),
            &active,
            |b, _| b.iter(|| black_box(metrics.render(&meter.usage()))),
        );
    }
    group.finish();
}

/// Reading the org's usage off a response: the REST header, and a SOAP envelope's header.
fn usage_parsing(c: &mut Criterion) {
    let mut group = c.benchmark_group("usage_parsing");
    group.bench_function("sforce_limit_info", |b| {
        b.iter(|| parse_limit_info(black_box(b"api-usage=18234/5000000")))
    });
    let soap = br#"<?xml version="1.0" encoding="UTF-8"?><soapenv:Envelope xmlns:soapenv="http://schemas.xmlsoap.org/soap/envelope/" xmlns="urn:partner.soap.sforce.com"><soapenv:Header><LimitInfoHeader><limitInfo><current>18234</current><limit>5000000</limit><type>API REQUESTS</type></limitInfo></LimitInfoHeader></soapenv:Header><soapenv:Body><queryResponse><result><done>true</done><size>1</size></result></queryResponse></soapenv:Body></soapenv:Envelope>"#;
    group.bench_function("soap_limit_info_header", |b| {
        b.iter(|| {
            let mut scanner = BodyScanner::new();
            scanner.feed(black_box(soap));
            scanner.finish();
            black_box(scanner.report())
        })
    });
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().measurement_time(Duration::from_secs(3)).warm_up_time(Duration::from_secs(1));
    targets = decide, metrics_render, usage_parsing
}
criterion_main!(benches);
