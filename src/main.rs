//! The `callmeter` command: parse arguments, load the config, run the chosen job.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use callmeter::config::{self, LogFormat};
use callmeter::{app, demo, sim};

#[derive(Parser)]
#[command(
    name = "callmeter",
    version,
    about = "A metering reverse proxy for the Salesforce API: every integration points at it, \
             and it attributes, counts and reports each call against the org's rolling 24-hour limit."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the proxy with a config file (listeners, admin endpoint, metrics).
    Serve {
        /// The TOML config file.
        #[arg(
            long,
            env = "CALLMETER_CONFIG",
            default_value = "config/callmeter.toml"
        )]
        config: PathBuf,
    },
    /// Validate a config file and exit: 0 when valid, 2 with the file, key and line when not.
    Check {
        /// The TOML config file.
        #[arg(
            long,
            env = "CALLMETER_CONFIG",
            default_value = "config/callmeter.toml"
        )]
        config: PathBuf,
    },
    /// Run a simulated Salesforce org (REST, SOAP, Bulk, Composite, OAuth, /limits) that counts
    /// calls by Salesforce's rules and refuses them at its limit. For tests, benchmarks, demos.
    Sim {
        /// Address to listen on.
        #[arg(long, default_value = "127.0.0.1:9000")]
        listen: SocketAddr,
        /// The org's daily API call limit.
        #[arg(long, default_value_t = 15_000)]
        limit: u64,
        /// Calls already used when the simulator starts (as if made outside the proxy).
        #[arg(long, default_value_t = 0)]
        used: u64,
        /// Length of the rolling window, e.g. "24h" or "10m".
        #[arg(long, default_value = "24h", value_parser = humantime::parse_duration)]
        window: std::time::Duration,
    },
    /// Start a simulated org, the proxy in front of it and a little traffic from three
    /// integrations, then print where to look. Runs until Ctrl-C (or exits with --once).
    Demo {
        /// Address of the demo proxy listener.
        #[arg(long, default_value = "127.0.0.1:8080")]
        listen: SocketAddr,
        /// Address of the admin listener (/metrics, /api/v1/usage).
        #[arg(long, default_value = "127.0.0.1:9464")]
        admin: SocketAddr,
        /// Calls each integration makes.
        #[arg(long, default_value_t = 100)]
        calls: u32,
        /// Exit after the traffic instead of serving until Ctrl-C.
        #[arg(long)]
        once: bool,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // `serve` reads its config first: the runtime's size comes from it.
    let (threads, command) = match cli.command {
        Command::Serve { config: path } => match config::load(&path) {
            Ok(cfg) => (
                cfg.proxy.worker_threads,
                Job::Serve {
                    cfg: Box::new(cfg),
                    path,
                },
            ),
            Err(e) => return config_error(&e),
        },
        other => (None, Job::Other(other)),
    };
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    if let Some(n) = threads {
        // (A current-thread runtime for n = 1 measured no cheaper per request.)
        builder.worker_threads(n);
    }
    let runtime = builder.enable_all().build();
    let runtime = match runtime {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("callmeter: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match command {
        Job::Serve { cfg, path } => runtime.block_on(serve(*cfg, &path)),
        Job::Other(command) => runtime.block_on(run(command)),
    }
}

/// What `main` runs once the runtime is up.
enum Job {
    Serve {
        cfg: Box<config::Config>,
        path: PathBuf,
    },
    Other(Command),
}

async fn serve(cfg: config::Config, path: &std::path::Path) -> ExitCode {
    let json = cfg.log.format == LogFormat::Json;
    let ignored = callmeter::logging::init(&cfg.log.level, json);
    // A misspelt RUST_LOG (an override typed by hand, not in the file `check` validated) does
    // not keep the proxy from starting: it runs at the file's level and says why.
    if let Some(e) = ignored {
        direct_line(json, "WARN", &e.to_string());
    }
    cfg.log_warnings();
    // Why the proxy did not start: one line in the log's own format (see `direct_line`).
    let fatal = |message: String| direct_line(json, "ERROR", &message);
    // The files the config names (TLS, CA bundles) are part of it: a mistake there is a config
    // mistake, reported as `check` reports it (exit code 2), not a failure to start.
    if let Err(e) = app::check_files(&cfg) {
        fatal(format!("{}: {e}", path.display()));
        return ExitCode::from(2);
    }
    let worker_threads = tokio::runtime::Handle::current().metrics().num_workers();
    // Before the start, so that a SIGHUP sent while starting neither kills the proxy nor is lost.
    let reload = app::Reload::listen(path)
        .inspect_err(|e| tracing::warn!("SIGHUP will not reload the config: {e}"))
        .ok();
    tracing::info!(worker_threads, "starting");
    match app::start(&cfg).await {
        Ok(server) => {
            server.run_until_signal(reload).await;
            ExitCode::SUCCESS
        }
        Err(e) => {
            fatal(format!("cannot start: {e}"));
            ExitCode::FAILURE
        }
    }
}

/// A line on stderr in the log's own format, so that a shipper parsing JSON lines keeps the one
/// line the on-call engineer needs. Written directly, not as a log event: a filter
/// (`RUST_LOG=callmeter::proxy=debug`) must not leave an exit or an ignored setting unexplained.
fn direct_line(json: bool, level: &str, message: &str) {
    if json {
        let line = serde_json::json!({
            "timestamp": humantime::format_rfc3339_micros(std::time::SystemTime::now()).to_string(),
            "level": level,
            "fields": { "message": message },
            "target": "callmeter",
        });
        eprintln!("{line}");
    } else if level == "ERROR" {
        eprintln!("callmeter: {message}");
    } else {
        eprintln!("callmeter: {}: {message}", level.to_ascii_lowercase());
    }
}

async fn run(command: Command) -> ExitCode {
    match command {
        Command::Check { config } => match config::load(&config) {
            Ok(cfg) => {
                if let Err(e) = app::check_files(&cfg) {
                    eprintln!("callmeter: {}: {e}", config.display());
                    return ExitCode::from(2);
                }
                // What `serve` would log as warnings: valid, but probably not meant.
                for warning in cfg.warnings() {
                    eprintln!("warning: {}: {warning}", config.display());
                }
                if let Some(e) = callmeter::logging::check_rust_log(&cfg.log.level) {
                    eprintln!("warning: {e}");
                }
                println!(
                    "{}: ok ({} listener(s), {} org(s), {} integration(s))",
                    config.display(),
                    cfg.listeners.len(),
                    cfg.orgs.len(),
                    cfg.integrations.len()
                );
                ExitCode::SUCCESS
            }
            Err(e) => config_error(&e),
        },
        // `main` serves with a runtime sized from the config; this is the same on any runtime.
        Command::Serve { config } => match config::load(&config) {
            Ok(cfg) => serve(cfg, &config).await,
            Err(e) => config_error(&e),
        },
        Command::Sim {
            listen,
            limit,
            used,
            window,
        } => {
            if let Some(e) = callmeter::logging::init("info", false) {
                eprintln!("callmeter sim: warning: {e}");
            }
            let opts = sim::SimOptions {
                limit,
                used,
                window,
                ..Default::default()
            };
            let listener = match tokio::net::TcpListener::bind(listen).await {
                Ok(l) => l,
                Err(e) => {
                    eprintln!("callmeter sim: cannot listen on {listen}: {e}");
                    return ExitCode::FAILURE;
                }
            };
            eprintln!("simulated Salesforce org on http://{listen} (limit {limit}, used {used}); Ctrl-C stops it");
            match sim::serve(listener, opts, app::wait_for_signal()).await {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("callmeter sim: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Demo {
            listen,
            admin,
            calls,
            once,
        } => {
            if let Some(e) = callmeter::logging::init("warn", false) {
                eprintln!("callmeter demo: warning: {e}");
            }
            match demo::run(demo::DemoOptions {
                listen,
                admin,
                calls,
                once,
            })
            .await
            {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("callmeter demo: {e}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

fn config_error(e: &config::ConfigError) -> ExitCode {
    eprintln!("callmeter: {e}");
    ExitCode::from(e.exit_code() as u8)
}
