//! Assembly: turns a validated `Config` into running listeners.
//!
//! It builds each module's state once — meters, metrics handles, upstream clients, one route
//! table per listener — binds every socket (so a port clash fails start-up, not a request), and
//! runs until told to stop. `callmeter serve`, the demo and the end-to-end tests all start the
//! proxy through `start`.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use thiserror::Error;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::admin::Admin;
use crate::config::{Config, ListenerConfig, MatchRule, OnLimit, OrgId};
use crate::meter::{
    persist, Clock, IntegrationBudget, IntegrationMeter, Meter, OrgBudget, OrgMeter,
};
use crate::metrics::Metrics;
use crate::proxy::{
    self, ConnOptions, DeferRoute, ListenerContext, OrgRoute, RateLimitHeaders, Route, RouteTable,
    TlsSetup, Upstream,
};
use crate::queue::deferred::DeferralsBuilder;
use crate::queue::WaitQueue;
use crate::salesforce::CountingRules;
use crate::store::Store;

/// The most the admin listener waits for its requests at shutdown, after the proxy's drain.
const ADMIN_GRACE: std::time::Duration = std::time::Duration::from_secs(2);

#[derive(Debug, Error)]
pub enum StartError {
    #[error("cannot listen on {addr} ({what}): {source}")]
    Bind {
        what: String,
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Upstream(#[from] proxy::UpstreamSetupError),
    #[error("store: {0}")]
    Store(#[from] crate::store::StoreError),
    #[error(transparent)]
    Console(#[from] crate::console::SetupError),
    #[error("listener \"{name}\": {source}")]
    Tls {
        name: String,
        #[source]
        source: Box<proxy::ListenerSetupError>,
    },
}

/// A running proxy.
pub struct Server {
    /// Each proxy listener's name and bound address (the real port when the config said 0).
    pub listeners: Vec<(String, SocketAddr)>,
    pub admin_addr: SocketAddr,
    pub meter: Arc<Meter>,
    admin: Arc<Admin>,
    stop: watch::Sender<bool>,
    tasks: JoinSet<()>,
    /// The admin listener, stopped apart from `tasks` and after them: load balancers read
    /// `/readyz` 503, liveness probes `/healthz` 200 and Prometheus `/metrics` while the proxy
    /// listeners drain.
    admin_listener: (watch::Sender<bool>, JoinSet<()>),
    /// The meter's snapshots, stopped only after every other task: calls counted (and refunds)
    /// while the listeners drain are in its last save.
    persist: (watch::Sender<bool>, JoinSet<()>),
    /// The config it started with: what a reload cannot change stays as this says.
    started_with: Config,
    /// Each TLS listener's name and certificate, which a reload reads again from the files it
    /// started with.
    tls: Vec<(String, TlsSetup)>,
}

/// Builds everything from `config`, binds all sockets and starts serving.
pub async fn start(config: &Config) -> Result<Server, StartError> {
    let metrics = Metrics::new();
    let clock = Clock::new();
    let mut meter = Meter::new();

    let mut orgs: Vec<(OrgId, Arc<OrgRoute>)> = Vec::new();
    for org in &config.orgs {
        let org_meter = Arc::new(OrgMeter::new(org, clock));
        meter.add_org(
            org_meter.clone(),
            org.threshold
                .as_ref()
                .map(|t| t.levels.clone())
                .unwrap_or_default(),
        );
        let counting = CountingRules {
            oauth: org.counting.oauth,
            limits_endpoint: org.counting.limits_endpoint,
            streaming: org.counting.streaming,
        };
        let route = OrgRoute {
            meter: org_meter,
            metrics: metrics.org(org.id.as_str()),
            upstream: Upstream::new(org)?,
            counting,
        };
        orgs.push((org.id.clone(), Arc::new(route)));
    }
    let org_route = |id: &OrgId| orgs.iter().find(|(o, _)| o == id).map(|(_, r)| r.clone());

    // Meters first: the store restores them before any call is counted, and deferred-call
    // replay starts before the routes that feed it exist.
    let mut metered = Vec::new();
    let store = open_store(&config.store.path).await?;
    let mut deferrals = DeferralsBuilder::new(store.clone());
    for i in &config.integrations {
        // Validation guarantees the org exists.
        let Some(org) = org_route(&i.org) else {
            continue;
        };
        let im = Arc::new(IntegrationMeter::from_config(i, org.meter.clone()));
        meter.add_integration(im.clone());
        if i.on_limit == OnLimit::Defer {
            deferrals.add_integration(im.clone(), org.upstream.clone(), i.defer.max_attempts);
        }
        metered.push((i, org, im));
    }
    let restored = persist::restore(&meter, &store).await?;
    if restored > 0 {
        tracing::info!(
            calls = restored,
            "restored the rolling windows saved before the restart"
        );
    }
    let meter = Arc::new(meter);
    let (stop, _) = watch::channel(false);
    let mut tasks = JoinSet::new();
    let deferrals = deferrals
        .start(stop.subscribe(), config.proxy.shutdown_grace, &mut tasks)
        .await?;
    tasks.spawn(
        deferrals
            .clone()
            .purge_loop(config.store.retention, stop.subscribe()),
    );

    let mut routes: Vec<(Arc<Route>, &MatchRule)> = Vec::new();
    for (i, org, im) in metered {
        let route = Route {
            metrics: metrics.integration(i.org.as_str(), i.id.as_str()),
            org,
            meter: im.clone(),
            path_prefix: i.matcher.path_prefix.as_deref().map(Into::into),
            call_options: if i.call_options_client {
                proxy::call_options_value(i.id.as_str())
            } else {
                None
            },
            keep_host: i.matcher.host.is_some(),
            reject_style: i.reject_style,
            queue: (i.on_limit == OnLimit::Queue).then(|| {
                WaitQueue::new(
                    im.clone(),
                    i.queue.max_depth,
                    i.queue.max_wait,
                    stop.subscribe(),
                )
            }),
            ratelimit: i
                .ratelimit_headers
                .then(|| RateLimitHeaders::new(i.id.as_str())),
            defer: (i.on_limit == OnLimit::Defer).then(|| DeferRoute {
                deferrals: deferrals.clone(),
                max_body_bytes: i.defer.max_body_bytes,
            }),
        };
        routes.push((Arc::new(route), &i.matcher));
    }

    let grace = config.proxy.shutdown_grace;
    let options = ConnOptions {
        max_header_bytes: config.proxy.max_header_bytes,
        header_timeout: config.proxy.header_timeout,
        watch_hangups: false,
    };
    let mut bound = Vec::new();
    let mut tls_listeners = Vec::new();

    for l in &config.listeners {
        metrics.listener(&l.name);
        let mut table = RouteTable::new(&l.name);
        let unmatched_org = config.unmatched_org(l);
        for (route, rule) in &routes {
            let is_empty = rule.listener.is_none()
                && rule.host.is_none()
                && rule.path_prefix.is_none()
                && rule.key.is_none();
            if is_empty {
                if unmatched_org == Some(route.org.meter.id()) {
                    table.set_unmatched(route.clone());
                }
            } else if rule.listener.as_ref().is_none_or(|name| name == &l.name) {
                table.add(route.clone(), rule);
            }
        }
        let tls = listener_tls(l)?;
        if let Some(tls) = &tls {
            tls_listeners.push((l.name.clone(), tls.clone()));
        }
        let socket = TcpListener::bind(l.listen)
            .await
            .map_err(|source| StartError::Bind {
                what: format!("listener \"{}\"", l.name),
                addr: l.listen,
                source,
            })?;
        let addr = socket.local_addr().map_err(|source| StartError::Bind {
            what: format!("listener \"{}\"", l.name),
            addr: l.listen,
            source,
        })?;
        let options = ConnOptions {
            watch_hangups: table.queues(),
            ..options
        };
        let ctx = Arc::new(ListenerContext {
            routes: table,
            public_url: l
                .public_url
                .as_ref()
                .map(|u| u.to_string().trim_end_matches('/').to_owned()),
            tls: tls.is_some(),
            trust_forwarded: config.proxy.trust_forwarded_for,
            metrics: metrics.clone(),
        });
        let handler = move |peer, req| proxy::handle(ctx.clone(), peer, req);
        tasks.spawn(proxy::serve_listener(
            socket,
            tls,
            options,
            handler,
            stopped(&stop),
            grace,
        ));
        tracing::info!(listener = %l.name, %addr, tls = l.tls.is_some(), "proxy listening");
        bound.push((l.name.clone(), addr));
    }

    let console =
        crate::console::start(config, &meter, &store, &metrics, &stop, &mut tasks).await?;
    let socket = TcpListener::bind(config.admin.listen)
        .await
        .map_err(|source| StartError::Bind {
            what: "admin".into(),
            addr: config.admin.listen,
            source,
        })?;
    let admin_addr = socket.local_addr().map_err(|source| StartError::Bind {
        what: "admin".into(),
        addr: config.admin.listen,
        source,
    })?;
    let admin = Arc::new(Admin {
        metrics,
        meter: meter.clone(),
        deferrals,
        token: config.admin.token.clone(),
        token_env: config.admin.token_env.clone(),
        ready: Default::default(),
        console,
        addr: admin_addr,
    });
    let handler = {
        let admin = admin.clone();
        move |peer: proxy::Peer, req| {
            // A client on this machine (a browser the admin uses among them), whatever address
            // the listener is bound to.
            let local = peer.addr.ip().to_canonical().is_loopback();
            admin.clone().handle(req, local)
        }
    };
    let (admin_stop, _) = watch::channel(false);
    let mut admin_listener = JoinSet::new();
    admin_listener.spawn(proxy::serve_listener(
        socket,
        None,
        options,
        handler,
        stopped(&admin_stop),
        // Its turn comes after the proxy's drain: a short wait of its own keeps the whole
        // shutdown near `shutdown_grace` (admin requests take milliseconds).
        grace.min(ADMIN_GRACE),
    ));
    tracing::info!(addr = %admin_addr, "admin listening (status page /, /metrics, /healthz, /readyz, /api/v1/usage)");
    let (persist_stop, _) = watch::channel(false);
    let mut persist = JoinSet::new();
    persist.spawn(persist::run(
        meter.clone(),
        store.clone(),
        persist_stop.subscribe(),
    ));
    // Beside the snapshots: counting goes on while the listeners drain.
    persist.spawn(crate::meter::follow_suspends(persist_stop.subscribe()));
    admin.ready.store(true, Ordering::Relaxed);

    Ok(Server {
        listeners: bound,
        admin_addr,
        meter,
        admin,
        stop,
        tasks,
        admin_listener: (admin_stop, admin_listener),
        persist: (persist_stop, persist),
        started_with: config.clone(),
        tls: tls_listeners,
    })
}

/// What SIGHUP reloads: the config file, through a SIGHUP stream taken over before the server
/// starts. SIGHUP's default action ends a process, so one sent while the proxy starts (restoring
/// windows, binding sockets) would kill it; taken over, it waits in the stream and is applied
/// once the server is up.
pub struct Reload<'a> {
    path: &'a std::path::Path,
    #[cfg(unix)]
    hangup: tokio::signal::unix::Signal,
}

impl<'a> Reload<'a> {
    /// Takes SIGHUP over now, for reloads of `path`.
    pub fn listen(path: &'a std::path::Path) -> std::io::Result<Self> {
        Ok(Reload {
            path,
            #[cfg(unix)]
            hangup: tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())?,
        })
    }
}

/// What `callmeter check` adds to the config's validation: the files `start` reads are read the
/// same way (upstream CAs, listener certificates and keys, and that each key fits its
/// certificate), so that a config `check` accepts does not fail `serve` for a file. Binds and
/// opens nothing.
pub fn check_files(config: &Config) -> Result<(), StartError> {
    for org in &config.orgs {
        Upstream::new(org)?;
    }
    for l in &config.listeners {
        listener_tls(l)?;
    }
    if let Some(smtp) = &config.smtp {
        crate::notify::mail::Mailer::new(smtp)
            .map_err(|e| StartError::Console(crate::console::SetupError::Mailer(e)))?;
    }
    Ok(())
}

/// A listener's TLS set-up from its certificate and key files, if it has them.
fn listener_tls(l: &ListenerConfig) -> Result<Option<TlsSetup>, StartError> {
    let Some(files) = &l.tls else {
        return Ok(None);
    };
    TlsSetup::from_pem_files(&files.cert, &files.key)
        .map(Some)
        .map_err(|source| StartError::Tls {
            name: l.name.clone(),
            source: Box::new(source),
        })
}

/// Opens the embedded database (`":memory:"`: nothing is kept across restarts).
async fn open_store(path: &std::path::Path) -> Result<Arc<Store>, StartError> {
    let path = path.to_owned();
    let store = tokio::task::spawn_blocking(move || {
        if path.as_os_str() == ":memory:" {
            Store::open_in_memory()
        } else {
            Store::open(&path)
        }
    })
    .await
    .map_err(|e| crate::store::StoreError::Corrupt(format!("opening the store: {e}")))??;
    Ok(Arc::new(store))
}

/// Resolves once `stop` says so.
fn stopped(stop: &watch::Sender<bool>) -> impl std::future::Future<Output = ()> + Send + 'static {
    let mut rx = stop.subscribe();
    async move {
        let _ = rx.wait_for(|stopped| *stopped).await;
    }
}

impl Server {
    /// The bound address of a proxy listener.
    pub fn listener(&self, name: &str) -> Option<SocketAddr> {
        self.listeners
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, a)| *a)
    }

    /// Stops accepting, drains in-flight requests (up to the grace period) and returns.
    pub async fn shutdown(self) {
        self.shutdown_unless(std::future::pending()).await
    }

    /// `shutdown`, except that once `hurry` resolves (a second signal) the requests and
    /// replays still in flight are cut off rather than waited for. The windows are saved
    /// either way.
    async fn shutdown_unless(mut self, hurry: impl std::future::Future<Output = ()>) {
        // Load balancers see 503 from now on; the admin listener keeps answering until the
        // proxy listeners have drained.
        self.admin.ready.store(false, Ordering::Relaxed);
        let _ = self.stop.send(true);
        tokio::pin!(hurry);
        let drained = async { while self.tasks.join_next().await.is_some() {} };
        let hurried = tokio::select! {
            () = drained => false,
            () = &mut hurry => true,
        };
        if hurried {
            tracing::warn!(
                "second signal: stopping now; requests in flight are cut off, and a deferred \
                 call being replayed is marked failed at the next start (outcome unknown)"
            );
            self.tasks.shutdown().await;
        }
        let (admin_stop, mut admin_listener) = self.admin_listener;
        let _ = admin_stop.send(true);
        if hurried {
            admin_listener.shutdown().await;
        } else {
            // Admin requests are short; a second signal still cuts a slow one off.
            let drained = async { while admin_listener.join_next().await.is_some() {} };
            tokio::select! {
                () = drained => {}
                () = &mut hurry => admin_listener.shutdown().await,
            }
        }
        let (persist_stop, mut persist) = self.persist;
        let _ = persist_stop.send(true);
        while persist.join_next().await.is_some() {}
        tracing::info!("stopped");
    }

    /// Serves until SIGINT or SIGTERM, then shuts down gracefully. With `reload`, SIGHUP
    /// reloads the budgets from its config file (see `reload`).
    pub async fn run_until_signal(self, reload: Option<Reload<'_>>) {
        #[cfg(unix)]
        if let Some(Reload { path, mut hangup }) = reload {
            let stop = wait_for_signal();
            tokio::pin!(stop);
            loop {
                tokio::select! {
                    () = &mut stop => break,
                    _ = hangup.recv() => {
                        let applied = match crate::config::load(path) {
                            // The files the config names are read as `check` and `serve` read
                            // them: a reload `serve` would refuse to start with is refused too.
                            Ok(cfg) => match check_files(&cfg) {
                                Ok(()) => {
                                    self.reload(&cfg);
                                    true
                                }
                                Err(e) => {
                                    tracing::error!(
                                        "reload refused, the running config stays: {}: {e}",
                                        path.display()
                                    );
                                    false
                                }
                            },
                            Err(e) => {
                                tracing::error!("reload refused, the running config stays: {e}");
                                false
                            }
                        };
                        self.admin.metrics.config_reloaded(applied);
                    }
                }
            }
        } else {
            wait_for_signal().await;
        }
        #[cfg(not(unix))]
        {
            let _ = reload;
            wait_for_signal().await;
        }
        tracing::info!(
            "shutting down: no new connections, draining requests in flight (a second SIGINT \
             or SIGTERM stops at once)"
        );
        self.shutdown_unless(wait_for_signal()).await;
    }

    /// Applies the budgets of a changed config — limits, reserves, probe intervals, quotas,
    /// rates, priorities, in-flight caps — and the orgs' `[org.threshold]`, without losing
    /// counts, and reads the TLS listeners' certificates and keys again (see
    /// `reload_certificates`). Every other change needs a restart: each one is logged by its
    /// key, as are new and removed orgs and integrations and a changed window.
    pub fn reload(&self, config: &Config) {
        // What `check` prints and the start logs: a reload applies `[org.threshold]` (its
        // `notify` among it), so a new file's warnings are as much news as at start.
        config.log_warnings();
        for key in crate::config::restart_needed(&self.started_with, config) {
            tracing::warn!(%key, "changed in the config, but takes effect only at the next restart");
        }
        let mut applied = 0;
        for org in &config.orgs {
            match self.meter.org(org.id.as_str()) {
                Some(meter) => {
                    let what = format!("org \"{}\"", org.id);
                    cap_added(meter.max_in_flight(), org.max_in_flight, &what);
                    meter.set_budget(OrgBudget::from_config(org));
                    applied += 1;
                    if meter.window_length() != org.window {
                        tracing::warn!(org = %org.id, "the org's window changed: it takes effect at the next restart");
                    }
                }
                None => tracing::warn!(org = %org.id, "new org in the config: restart to add it"),
            }
        }
        for i in &config.integrations {
            match self.meter.integration(i.org.as_str(), i.id.as_str()) {
                Some(meter) => {
                    let what = format!("org \"{}\" integration \"{}\"", i.org, i.id);
                    cap_added(meter.max_in_flight(), i.max_in_flight, &what);
                    meter.set_budget(IntegrationBudget::from_config(i));
                    applied += 1;
                }
                None => {
                    tracing::warn!(org = %i.org, integration = %i.id, "new integration in the config: restart to add it")
                }
            }
        }
        self.reload_certificates();
        for (org, in_force) in self.admin.console.thresholds.reload(config, &self.meter) {
            if in_force {
                tracing::info!(%org, "config reloaded: the org's threshold applied");
            } else {
                tracing::info!(%org, "config reloaded: the org's [org.threshold] is kept, but the threshold set through the admin API stays in force (DELETE /api/v1/orgs/{org}/threshold to use the config's)");
            }
            // The watcher looks at once: a lowered level may already be crossed.
            self.admin.console.poke.notify_one();
        }
        tracing::info!(
            budgets = applied,
            "config reloaded: budgets (limits, reserves, probe intervals, quotas, rates, \
             priorities, in-flight caps) and thresholds applied, counts kept; any other change \
             is logged above and waits for a restart"
        );
    }

    /// Reads each TLS listener's certificate and key again from the files it started with (a
    /// changed path waits for a restart, as `restart_needed` says): a certificate renewed in
    /// place is served to new connections, while open ones keep theirs. Files that cannot be
    /// read or whose key does not fit the certificate leave the one served until now.
    fn reload_certificates(&self) {
        for l in &self.started_with.listeners {
            let Some(files) = &l.tls else {
                continue;
            };
            let Some((_, tls)) = self.tls.iter().find(|(name, _)| name == &l.name) else {
                continue;
            };
            match tls.reload(&files.cert, &files.key) {
                Ok(r) if r.changed => tracing::info!(
                    listener = %l.name,
                    cert = %files.cert.display(),
                    not_after = %r.not_after.as_deref().unwrap_or("?"),
                    "TLS certificate reloaded: new connections are served the one in the \
                     files, open connections keep theirs"
                ),
                Ok(r) => tracing::info!(
                    listener = %l.name,
                    cert = %files.cert.display(),
                    not_after = %r.not_after.as_deref().unwrap_or("?"),
                    "TLS certificate read again: unchanged"
                ),
                Err(e) => tracing::error!(
                    listener = %l.name,
                    "TLS certificate not reloaded, the one served until now stays: {e}"
                ),
            }
        }
    }
}

/// Warns when a reload sets a `max_in_flight` where there was none: calls are counted in
/// flight only under a cap (counting them all would cost every call two more atomic
/// operations), so the new cap does not see the calls already out until they end.
fn cap_added(before: Option<u32>, after: Option<u32>, what: &str) {
    if before.is_none() && after.is_some() {
        tracing::warn!(
            "{what}: max_in_flight is added by this reload; it counts the calls \
             admitted from now on, not those already in flight (until they end, there may be \
             more in flight than the cap)"
        );
    }
}

/// Waits for Ctrl-C or (on Unix) SIGTERM.
pub async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
