//! Deferred calls (`on_limit = "defer"`): a limited call is written to the store, synced, and
//! answered `202 Accepted`; a replayer per org sends stored calls in order when budget frees.
//!
//! The replayer never sends a write twice by itself: only a send Salesforce certainly did not
//! process is tried again (or one whose method is idempotent, which done twice is done once). A call is marked in flight in the store before it is sent and
//! delivered (or retried, or failed) after the answer, in the same process: a shutdown waits
//! for the sends under way (up to `shutdown_grace`), and an outcome the store refuses to record
//! (locked, a full disk) is written again until it takes. An answer with a success status
//! counts as delivered even if its body breaks off, as Salesforce has done the work.
//!
//! When the proxy cannot know whether Salesforce processed a send (no answer within
//! `response_timeout`, the exchange broke after the request went, a gateway's 502 or 504, or
//! a call found in flight at start after a crash or a shutdown that cut a send off), the call
//! is `failed` with an "outcome unknown" error: sending it again could apply a write twice, so
//! the admin checks and retries or discards it (`/api/v1/deferred`). Idempotent calls (`GET`,
//! `PUT`, `DELETE`, ...) are retried instead.
//!
//! What certainly was not processed is retried: connection failures before the request went,
//! 429, 5xx answers other than 502 and 504 (Salesforce's 500 and 503 say the request was not
//! completed) and the concurrent-request limit, with exponential backoff, up to
//! `defer.max_attempts` sends; then the call is `failed`. The daily limit's
//! `REQUEST_LIMIT_EXCEEDED` uses no attempt: the org is out of calls, which is what deferring
//! waits out, and the meter lets one call per `probe_interval` go to see if budget is back.
//! A call worth more than its integration's budgets now hold (a reload or restart shrank a
//! budget since it was stored) waits without using an attempt, looked at again every
//! `OVERSIZED_RECHECK`, and does not hold back the calls stored after it.

use std::borrow::Cow;
use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::{HeaderName, HeaderValue, Method, Request, StatusCode};
use tokio::sync::{watch, Notify, Semaphore};

use crate::meter::{IntegrationMeter, OrgMeter, Ticket, Verdict};
use crate::proxy::{decoded_prefix, Handover, RequestBody, ResponseBody, Upstream};
use crate::queue::Oversized;
use crate::salesforce::{self, BodyScanner, LimitExceeded};
use crate::store::{
    DeferredCall, DeferredId, DeferredState, InFlightCall, NewDeferred, Store, StoreError,
};

/// Calls of one org sent at the same time by the replayer.
const REPLAY_CONCURRENCY: usize = 4;
/// First retry delay; doubled per attempt up to `MAX_BACKOFF`.
const BASE_BACKOFF: Duration = Duration::from_secs(1);
const MAX_BACKOFF: Duration = Duration::from_secs(300);
/// The upstream's answer is kept for the integration to read at its status URL, up to this.
const KEPT_RESPONSE_BYTES: usize = 64 * 1024;
/// Without anything due, the replayer still looks again this often (an admin retry or a new
/// call wakes it sooner).
const IDLE_RECHECK: Duration = Duration::from_secs(60);
/// How often a stored call larger than its budget now holds is looked at again (a reload may
/// have grown the budget back).
const OVERSIZED_RECHECK: Duration = Duration::from_secs(10);
/// How soon a store write the store refused is tried again; doubled up to `MAX_RECORD_RETRY`.
const FIRST_RECORD_RETRY: Duration = Duration::from_millis(100);
const MAX_RECORD_RETRY: Duration = Duration::from_secs(5);
/// Why a call found in flight at start is failed rather than sent again.
const IN_FLIGHT_AT_START: &str = "outcome unknown: the proxy stopped while this call was being sent, so Salesforce may have applied it; check, then retry or discard it";
/// The path, under an integration's base URL, where it reads a deferred call's outcome.
pub const STATUS_PATH: &str = "/callmeter/deferred/";

pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// What the replayer needs about one integration.
struct Target {
    meter: Arc<IntegrationMeter>,
    max_attempts: u32,
}

/// The replayer of one org.
struct OrgReplayer {
    org: String,
    meter: Arc<OrgMeter>,
    upstream: Arc<Upstream>,
    targets: HashMap<String, Target>,
    wake: Notify,
    slots: Arc<Semaphore>,
}

/// Deferred calls of every org: storing them, replaying them, reporting on them.
pub struct Deferrals {
    store: Arc<Store>,
    orgs: HashMap<String, Arc<OrgReplayer>>,
    /// One `refresh_depths` at a time (see there).
    refreshing: tokio::sync::Mutex<()>,
    /// Signs status URLs (see `status_tag`).
    status_key: ring::hmac::Key,
}

/// Where the store keeps the status URLs' key.
const STATUS_KEY: &str = "deferred/status-key";

/// The key that signs status URLs: the store's, made at its first use. A `:memory:` store
/// makes one per process, as its calls live no longer.
fn status_key(store: &Store) -> Result<ring::hmac::Key, StoreError> {
    use base64::Engine;
    let engine = base64::engine::general_purpose::STANDARD;
    let saved = store.get_state(STATUS_KEY)?;
    let bytes = match saved
        .and_then(|k| engine.decode(k).ok())
        .filter(|k| k.len() == 32)
    {
        Some(bytes) => bytes,
        None => {
            let mut bytes = vec![0u8; 32];
            ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut bytes)
                .map_err(|_| StoreError::Corrupt("no randomness for the status key".into()))?;
            store.put_state(STATUS_KEY, &engine.encode(&bytes))?;
            bytes
        }
    };
    Ok(ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &bytes))
}

/// Builds `Deferrals`: one `add_integration` per integration with `on_limit = "defer"`.
pub struct DeferralsBuilder {
    store: Arc<Store>,
    orgs: HashMap<String, OrgReplayer>,
}

impl DeferralsBuilder {
    pub fn new(store: Arc<Store>) -> Self {
        DeferralsBuilder {
            store,
            orgs: HashMap::new(),
        }
    }

    pub fn add_integration(
        &mut self,
        meter: Arc<IntegrationMeter>,
        upstream: Arc<Upstream>,
        max_attempts: u32,
    ) {
        let org_meter = meter.org().clone();
        let org = org_meter.id().to_string();
        let replayer = self.orgs.entry(org.clone()).or_insert_with(|| OrgReplayer {
            org,
            meter: org_meter,
            upstream,
            targets: HashMap::new(),
            wake: Notify::new(),
            slots: Arc::new(Semaphore::new(REPLAY_CONCURRENCY)),
        });
        replayer.targets.insert(
            meter.id().to_string(),
            Target {
                meter,
                max_attempts,
            },
        );
    }

    /// Marks failed the calls a crash (or a shutdown past its grace) left in flight, whose
    /// outcome is unknown, and starts a replayer per org. At `stop` a replayer waits up to
    /// `grace` for the sends under way.
    pub async fn start(
        self,
        stop: watch::Receiver<bool>,
        grace: Duration,
        tasks: &mut tokio::task::JoinSet<()>,
    ) -> Result<Arc<Deferrals>, StoreError> {
        // The same rule as a send that timed out at run time: an idempotent call with
        // attempts left goes again, the send cut off counting as one.
        // Keyed by org and integration: an integration's id is unique within its org only.
        let max_attempts: HashMap<(String, String), u32> = self
            .orgs
            .iter()
            .flat_map(|(org, r)| {
                r.targets
                    .iter()
                    .map(move |(id, target)| ((org.clone(), id.clone()), target.max_attempts))
            })
            .collect();
        let resend = move |call: &InFlightCall| {
            max_attempts
                .get(&(call.org.clone(), call.integration.clone()))
                .is_some_and(|&max| call.attempts.saturating_add(1) < max)
                && idempotent(&call.method, &call.path_and_query)
        };
        let store = self.store.clone();
        let (again, unknown) =
            blocking(move || store.settle_in_flight(resend, IN_FLIGHT_AT_START, now_ms())).await?;
        if again > 0 {
            tracing::info!(
                calls = again,
                "idempotent deferred calls were being sent when the proxy stopped; they are sent again"
            );
        }
        if unknown > 0 {
            tracing::warn!(
                calls = unknown,
                "deferred calls were being sent when the proxy stopped; whether Salesforce processed them is unknown, so they are marked failed for the admin to retry or discard (see /api/v1/deferred)"
            );
        }
        let (store, replayed) = (self.store.clone(), self.orgs.keys().cloned().collect());
        let orphaned = blocking(move || fail_orphans(&store, &replayed)).await?;
        if orphaned > 0 {
            tracing::warn!(
                calls = orphaned,
                "deferred calls of orgs without an integration using on_limit = \"defer\" are marked failed; see /api/v1/deferred"
            );
        }
        let store = self.store.clone();
        let status_key = blocking(move || status_key(&store)).await?;
        let deferrals = Arc::new(Deferrals {
            status_key,
            store: self.store,
            orgs: self
                .orgs
                .into_iter()
                .map(|(k, v)| (k, Arc::new(v)))
                .collect(),
            refreshing: tokio::sync::Mutex::new(()),
        });
        for replayer in deferrals.orgs.values() {
            tasks.spawn(replay(
                replayer.clone(),
                deferrals.store.clone(),
                stop.clone(),
                grace,
            ));
        }
        Ok(deferrals)
    }
}

/// Marks failed the pending calls of orgs that no replayer serves (the org, or every one of its
/// integrations using `on_limit = "defer"`, left the config): they would otherwise wait as
/// pending for ever, out of sight of the admin's list of failures.
fn fail_orphans(store: &Store, replayed: &HashSet<String>) -> Result<usize, StoreError> {
    let mut failed = 0;
    for (org, _, state, _) in store.deferred_counts()? {
        if state == DeferredState::Pending && !replayed.contains(&org) {
            let error = format!(
                "org \"{org}\" has no integration configured with on_limit = \"defer\" any more"
            );
            failed += store.fail_pending(&org, &error, now_ms())?;
        }
    }
    Ok(failed)
}

/// Runs a store call on the blocking pool.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, StoreError> + Send + 'static,
) -> Result<T, StoreError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| StoreError::Corrupt(format!("store task failed: {e}")))?
}

impl Deferrals {
    pub fn store(&self) -> &Arc<Store> {
        &self.store
    }

    /// The tag a status URL carries: 128 bits of an HMAC of the call's org, integration and
    /// id under the store's key. Ids are sequential, and a call need not carry an
    /// `Authorization` to compare (a SOAP call's session is in its body): the URL handed out
    /// with the 202 is what lets its holder read the outcome.
    pub fn status_tag(&self, org: &str, integration: &str, id: DeferredId) -> String {
        use base64::Engine;
        let message = format!("{org}/{integration}/{id}");
        let tag = ring::hmac::sign(&self.status_key, message.as_bytes());
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(&tag.as_ref()[..16])
    }

    /// Stores a call durably (synced before this returns) and wakes its org's replayer.
    pub async fn defer(&self, call: NewDeferred) -> Result<DeferredId, StoreError> {
        let org = call.org.clone();
        let store = self.store.clone();
        let id = blocking(move || store.defer(&call)).await?;
        self.wake(&org);
        Ok(id)
    }

    /// Wakes an org's replayer (a new call, an admin retry).
    pub fn wake(&self, org: &str) {
        if let Some(r) = self.orgs.get(org) {
            r.wake.notify_one();
        }
    }

    /// One deferred call, if it belongs to `org` / `integration`.
    pub async fn get(&self, id: DeferredId) -> Result<Option<DeferredCall>, StoreError> {
        let store = self.store.clone();
        blocking(move || store.get_deferred(id)).await
    }

    /// Sets each deferred integration's queue depth (pending + in flight) on its meter, and
    /// hands the store's counts to `apply` (the metrics). One reading at a time, each set and
    /// applied before the next is read: two Prometheus servers scraping at once would otherwise
    /// apply their readings out of order, the older removing series the newer had just set.
    pub async fn refresh_depths(
        &self,
        apply: impl FnOnce(&[(String, String, crate::store::DeferredState, u64)]),
    ) -> Result<(), StoreError> {
        let _one_at_a_time = self.refreshing.lock().await;
        let store = self.store.clone();
        let counts = blocking(move || store.deferred_counts()).await?;
        for replayer in self.orgs.values() {
            for (id, target) in &replayer.targets {
                let waiting: u64 = counts
                    .iter()
                    .filter(|(o, i, state, _)| {
                        o == &replayer.org
                            && i == id
                            && matches!(
                                state,
                                crate::store::DeferredState::Pending
                                    | crate::store::DeferredState::InFlight
                            )
                    })
                    .map(|(_, _, _, n)| n)
                    .sum();
                target.meter.set_queue_depth(waiting as usize);
            }
        }
        apply(&counts);
        Ok(())
    }

    /// Deletes delivered and discarded calls older than `retention`, every hour.
    pub async fn purge_loop(self: Arc<Self>, retention: Duration, mut stop: watch::Receiver<bool>) {
        let mut tick = tokio::time::interval(Duration::from_secs(3600));
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = stop.wait_for(|s| *s) => return,
            }
            let store = self.store.clone();
            let before = now_ms().saturating_sub(retention.as_millis() as u64);
            match blocking(move || store.purge_deferred(before)).await {
                Ok(0) => {}
                Ok(n) => tracing::info!(calls = n, "purged delivered and discarded deferred calls"),
                Err(e) => tracing::warn!(error = %e, "purging deferred calls failed"),
            }
        }
    }
}

fn backoff(attempt: u32) -> Duration {
    BASE_BACKOFF
        .saturating_mul(1u32 << attempt.min(16))
        .min(MAX_BACKOFF)
}

/// The replayer of one org: takes due calls in order, one budget decision each, and sends up
/// to `REPLAY_CONCURRENCY` at once. A call refused by its integration's own budget (rate,
/// quota, reserve, in flight) keeps its place, and that integration is passed over until its
/// budget is due back, so that it does not hold back the other integrations' calls; a call
/// refused by the org's limit stops the replayer until budget frees, as it stops them all.
async fn replay(
    r: Arc<OrgReplayer>,
    store: Arc<Store>,
    mut stop: watch::Receiver<bool>,
    grace: Duration,
) {
    r.meter.watch();
    let mut held = Held::default();
    let mut sends = tokio::task::JoinSet::new();
    loop {
        while sends.try_join_next().is_some() {}
        if *stop.borrow() {
            break;
        }
        // Registered for "budget freed" before anything is decided, as the queue's dispatcher
        // does: a refund or a lower report during the store writes below would otherwise be
        // missed, and the replayer sleep until its timer.
        let freed = r.meter.budget_freed();
        tokio::pin!(freed);
        freed.as_mut().enable();
        let slot = tokio::select! {
            slot = r.slots.clone().acquire_owned() => match slot {
                Ok(slot) => slot,
                Err(_) => break,
            },
            _ = stop.wait_for(|s| *s) => break,
        };
        let now = now_ms();
        let skip = held.current(tokio::time::Instant::now());
        let (s, org, skip2) = (store.clone(), r.org.clone(), skip.clone());
        let claimed = match blocking(move || s.claim_due(&org, now, 1, &names(&skip2))).await {
            Ok(mut calls) => calls.pop(),
            Err(e) => {
                tracing::warn!(org = %r.org, error = %e, "reading deferred calls failed; retrying");
                drop(slot);
                pause(&r, &mut stop, Duration::from_secs(5)).await;
                continue;
            }
        };
        let Some(call) = claimed else {
            drop(slot);
            let (s, org) = (store.clone(), r.org.clone());
            let next = blocking(move || s.next_due(&org, &names(&skip)))
                .await
                .ok()
                .flatten();
            let due = next.map_or(IDLE_RECHECK, |due| {
                Duration::from_millis(due.saturating_sub(now_ms()))
            });
            // A held integration's budget may come back sooner than its retry-after says (a
            // refund, a lower report): then the freed signal wakes the replayer.
            let wait = held
                .next_release(tokio::time::Instant::now())
                .map_or(due, |release| release.min(due));
            tokio::select! {
                () = pause(&r, &mut stop, wait.min(IDLE_RECHECK)) => {}
                () = &mut freed, if !held.is_empty() => held.clear(),
            }
            continue;
        };
        let Some(target) = r.targets.get(&call.integration) else {
            let s = store.clone();
            let error = format!(
                "integration \"{}\" is no longer configured with on_limit = \"defer\"",
                call.integration
            );
            let id = call.id;
            record(&stop, id, move || {
                s.mark_failed(id, &error, None, None, now_ms())
            })
            .await;
            continue;
        };
        let verdict = target.meter.decide(call.units);
        let oversized = match verdict {
            Verdict::Limited(_) => Oversized::check(&target.meter, call.units),
            Verdict::Forward(_) => None,
        };
        if let Some(oversized) = oversized {
            // Acknowledged with a 202 when it fitted: a reload or restart shrank the budget
            // since. It waits, without using an attempt, for the budget to grow back (or the
            // admin to discard it), and lets the calls behind it go meanwhile.
            let error = oversized.to_string();
            // Once per call and reason: it is looked at again every `OVERSIZED_RECHECK`.
            if call.last_error.as_deref() == Some(error.as_str()) {
                tracing::debug!(id = %call.id, %error, "deferred call still larger than its budget");
            } else {
                tracing::warn!(id = %call.id, %error, "deferred call larger than its budget now; it waits for the budget to grow");
            }
            let (s, id) = (store.clone(), call.id);
            let at = now_ms() + OVERSIZED_RECHECK.as_millis() as u64;
            record(&stop, id, move || {
                s.mark_waiting_for_budget(id, &error, at, now_ms())
            })
            .await;
            continue;
        }
        match verdict {
            Verdict::Limited(limited) => {
                // Not an attempt: the call keeps its place (still due, first in line).
                let s = store.clone();
                let id = call.id;
                record(&stop, id, move || s.release(id, now_ms(), now_ms())).await;
                drop(slot);
                if limited.budget.is_integrations() {
                    held.hold(call.integration, limited.retry_after);
                    continue;
                }
                // The org's budget: every call waits. It can come back sooner than the meter
                // says (a refund, a lower report, a restart with a larger quota).
                tokio::select! {
                    () = tokio::time::sleep(limited.retry_after) => {}
                    () = &mut freed => {}
                    () = r.wake.notified() => {}
                    _ = stop.wait_for(|s| *s) => {}
                }
            }
            Verdict::Forward(ticket) => {
                let (r2, s, meter, max, stop) = (
                    r.clone(),
                    store.clone(),
                    target.meter.clone(),
                    target.max_attempts,
                    stop.clone(),
                );
                sends.spawn(async move {
                    send(&r2, &s, &stop, &meter, max, call, ticket).await;
                    drop(slot);
                });
            }
        }
    }
    // A send stopped midway would leave its call in flight, its outcome unknown (failed at the
    // next start for the admin): let the sends under way finish and record it first.
    let drained =
        tokio::time::timeout(grace, async { while sends.join_next().await.is_some() {} }).await;
    if drained.is_err() {
        tracing::warn!(
            org = %r.org,
            calls = sends.len(),
            "deferred calls were still being sent after shutdown_grace; their outcome is unknown, and the next start marks them failed for the admin to retry or discard"
        );
        sends.shutdown().await;
    }
    r.meter.unwatch();
}

/// Writes what became of a deferred call. The store can refuse for a while (locked by another
/// writer past its busy timeout, a full disk); an outcome not written would leave the call in
/// flight, out of the admin's reach until a restart, so the write is tried again until it
/// takes. At shutdown it is given up after one more try: the next start then marks the call
/// failed, its outcome unknown, as after a crash.
async fn record(
    stop: &watch::Receiver<bool>,
    id: DeferredId,
    write: impl Fn() -> Result<(), StoreError> + Clone + Send + 'static,
) {
    let mut stop = stop.clone();
    let mut wait = FIRST_RECORD_RETRY;
    loop {
        let error = match blocking(write.clone()).await {
            Ok(()) => return,
            // The row moved on or went away (an admin's discard, a hand edit): nothing that
            // writing again would change.
            Err(e @ (StoreError::NotFound(_) | StoreError::WrongState { .. })) => {
                tracing::warn!(id = %id, error = %e, "a deferred call's outcome was not recorded");
                return;
            }
            Err(e) => e,
        };
        if *stop.borrow() {
            tracing::error!(id = %id, error = %error, "recording a deferred call's outcome failed at shutdown; the next start marks it failed, outcome unknown");
            return;
        }
        tracing::warn!(id = %id, error = %error, "recording a deferred call's outcome failed; trying again");
        tokio::select! {
            () = tokio::time::sleep(wait) => {}
            _ = stop.wait_for(|s| *s) => {}
        }
        wait = (wait * 2).min(MAX_RECORD_RETRY);
    }
}

/// Integrations the replayer passes over until their own budget is due back.
#[derive(Default)]
struct Held(HashMap<String, tokio::time::Instant>);

impl Held {
    fn hold(&mut self, integration: String, retry_after: Duration) {
        self.0
            .insert(integration, tokio::time::Instant::now() + retry_after);
    }

    /// Those still held at `now` (the others are released).
    fn current(&mut self, now: tokio::time::Instant) -> Vec<String> {
        self.0.retain(|_, until| *until > now);
        self.0.keys().cloned().collect()
    }

    /// How long until the first is released.
    fn next_release(&self, now: tokio::time::Instant) -> Option<Duration> {
        self.0
            .values()
            .min()
            .map(|until| until.saturating_duration_since(now))
    }

    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    fn clear(&mut self) {
        self.0.clear();
    }
}

fn names(list: &[String]) -> Vec<&str> {
    list.iter().map(String::as_str).collect()
}

async fn pause(r: &OrgReplayer, stop: &mut watch::Receiver<bool>, wait: Duration) {
    tokio::select! {
        () = tokio::time::sleep(wait) => {}
        () = r.wake.notified() => {}
        _ = stop.wait_for(|s| *s) => {}
    }
}

/// How one send ended.
enum Sent {
    Delivered(u16, Bytes),
    /// Certainly not processed, and worth another try: not sent, 429, 5xx other than 502 and
    /// 504, the concurrent-request limit. Uses an attempt.
    Retry(String, Option<u16>, Option<Bytes>),
    /// Salesforce refused it for the org's daily limit: not processed, and no fault of the
    /// call's. It waits for budget like a call not yet tried, without using an attempt.
    OutOfCalls(String),
    /// Sent, and nothing tells whether Salesforce processed it: a call whose method is not
    /// idempotent is never sent again without the admin; one that is is retried (doing it
    /// twice is doing it once).
    Unknown(String, Option<u16>, Option<Bytes>),
}

/// Methods for which sending a call twice has the effect of sending it once (RFC 9110 9.2.2).
/// PATCH and POST are not, Salesforce's upserts by external id aside.
const IDEMPOTENT: [&str; 6] = ["GET", "HEAD", "PUT", "DELETE", "OPTIONS", "TRACE"];

/// Whether a stored call can be sent again when its outcome is unknown: an idempotent method,
/// except on Apex REST, whose `@HttpGet`, `@HttpPut` and `@HttpDelete` run the org's own
/// code, which owes HTTP nothing.
fn idempotent(method: &str, path_and_query: &str) -> bool {
    let path = path_and_query.split('?').next().unwrap_or_default();
    IDEMPOTENT.contains(&method)
        && salesforce::classify(&Method::GET, path) != salesforce::CallKind::ApexRest
}

/// How a send whose outcome is unknown is described to the admin.
fn unknown(what: &str) -> String {
    format!("outcome unknown: {what}; Salesforce may have applied the call, so it is not sent again by itself: check, then retry or discard it")
}

/// A gateway's "bad gateway" or "gateway timeout": something between the proxy and
/// Salesforce's servers lost the exchange or gave up waiting, after which they may have done
/// the work (as with the proxy's own `response_timeout`).
fn gateway_lost_it(status: StatusCode) -> bool {
    status == StatusCode::BAD_GATEWAY || status == StatusCode::GATEWAY_TIMEOUT
}

async fn send(
    r: &OrgReplayer,
    store: &Arc<Store>,
    stop: &watch::Receiver<bool>,
    meter: &IntegrationMeter,
    max_attempts: u32,
    call: DeferredCall,
    ticket: Ticket,
) {
    let outcome = match build_request(r, &call) {
        // Only a shutdown drops a replay midway, and the call stays stored: nothing to watch.
        Ok(req) => match r.upstream.send(false, req, &Handover::default()).await {
            Ok(resp) => {
                let sent = answer(r, resp, &ticket).await;
                match &sent {
                    // A replay may be the probe of an exhausted org: its success ends that.
                    Sent::Delivered(status, _) if (200..300).contains(status) => {
                        r.meter.observe_success(&ticket)
                    }
                    // Salesforce does not count a call it refuses for the daily limit.
                    Sent::OutOfCalls(_) => meter.give_back(ticket.charge()),
                    _ => {}
                }
                sent
            }
            Err(err) if err.not_sent() => {
                meter.refund(ticket);
                Sent::Retry(err.to_string(), None, None)
            }
            // A timeout or a broken exchange after the request went.
            Err(err) => Sent::Unknown(err.to_string(), None, None),
        },
        Err(e) => {
            meter.refund(ticket);
            let s = store.clone();
            let (id, error) = (call.id, format!("the stored call cannot be sent: {e}"));
            record(stop, id, move || {
                s.mark_failed(id, &error, None, None, now_ms())
            })
            .await;
            return;
        }
    };
    let id = call.id;
    let attempt = call.attempts + 1;
    let s = store.clone();
    let outcome = match outcome {
        Sent::Unknown(what, status, body) if idempotent(&call.method, &call.path_and_query) => {
            Sent::Retry(what, status, body)
        }
        outcome => outcome,
    };
    match outcome {
        Sent::Delivered(status, body) => {
            tracing::debug!(id = %id, status, "deferred call delivered");
            record(stop, id, move || {
                s.mark_delivered(id, status, &body, now_ms())
            })
            .await;
        }
        Sent::Unknown(what, status, body) => {
            let error = unknown(&what);
            tracing::warn!(id = %id, %error, "deferred call failed: its outcome is unknown; it waits in /api/v1/deferred");
            record(stop, id, move || {
                s.mark_failed(id, &error, status, body.as_deref(), now_ms())
            })
            .await;
        }
        Sent::OutOfCalls(error) => {
            // The meter holds the org's calls back (one probe per interval) until budget is
            // back; the floor keeps a meter that lets calls through while Salesforce still
            // refuses them from turning this into a loop.
            let at = now_ms() + BASE_BACKOFF.as_millis() as u64;
            tracing::debug!(id = %id, "deferred call refused for the org's daily limit; it waits for budget");
            record(stop, id, move || {
                s.mark_waiting_for_budget(id, &error, at, now_ms())
            })
            .await;
        }
        Sent::Retry(error, status, body) if attempt >= max_attempts => {
            tracing::warn!(id = %id, attempts = attempt, error = %error, "deferred call failed for good; it waits in /api/v1/deferred");
            record(stop, id, move || {
                s.mark_failed(id, &error, status, body.as_deref(), now_ms())
            })
            .await;
        }
        Sent::Retry(error, _, _) => {
            let at = now_ms() + backoff(call.attempts).as_millis() as u64;
            tracing::debug!(id = %id, attempts = attempt, error = %error, "deferred call will be retried");
            record(stop, id, move || s.mark_retry(id, &error, at, now_ms())).await;
        }
    }
    r.wake.notify_one();
}

fn build_request(r: &OrgReplayer, call: &DeferredCall) -> Result<Request<RequestBody>, String> {
    let method = Method::from_bytes(call.method.as_bytes()).map_err(|e| e.to_string())?;
    let pq = http::uri::PathAndQuery::try_from(call.path_and_query.as_str())
        .map_err(|e| e.to_string())?;
    let uri = r.upstream.uri(false, pq).map_err(|e| e.to_string())?;
    let mut req = Request::builder().method(method).uri(uri);
    for (name, value) in &call.headers {
        let name = HeaderName::from_bytes(name.as_bytes()).map_err(|e| e.to_string())?;
        // Nobody is there to decompress the answer: it is scanned for limit errors and kept
        // for the status URL, so it is asked for plain.
        if name == http::header::ACCEPT_ENCODING {
            continue;
        }
        let value = HeaderValue::from_bytes(value).map_err(|e| e.to_string())?;
        req = req.header(name, value);
    }
    req.body(RequestBody::full(Bytes::from(call.body.clone())))
        .map_err(|e| e.to_string())
}

/// Reads an upstream answer: usage report, limit errors, and what to keep for the status URL.
/// `call`: the replay's ticket (a probe of an exhausted org, maybe: a report of budget on its
/// answer ends the exhaustion, as on a live call's).
async fn answer(
    r: &OrgReplayer,
    resp: http::Response<crate::proxy::UpstreamBody>,
    call: &Ticket,
) -> Sent {
    let (parts, body) = resp.into_parts();
    let lines = parts.headers.get_all("sforce-limit-info").iter();
    if let Some(Ok(report)) = salesforce::limit_info_lines(lines.map(|v| v.as_bytes())) {
        r.meter.observe_answer(call, report);
    }
    let status = parts.status;
    let timeout = r.upstream.response_timeout();
    let read = ResponseBody::collect_bounded(body, KEPT_RESPONSE_BYTES);
    let answered = match tokio::time::timeout(timeout, read).await {
        Ok(Ok(Ok(bytes))) => Ok(bytes),
        // Larger than what is kept: the call was answered; keep nothing of the body.
        Ok(Ok(Err(_))) => Ok(Bytes::new()),
        Ok(Err(e)) => Err(format!("reading Salesforce's answer failed: {e}")),
        Err(_) => Err(format!(
            "Salesforce's answer stalled for {}",
            humantime::format_duration(timeout)
        )),
    };
    let body = match answered {
        Ok(bytes) => bytes,
        // Salesforce did the work: sending the call again would do it twice.
        Err(error) if status.is_success() || status.is_redirection() => {
            tracing::warn!(status = status.as_u16(), %error, "a deferred call's answer broke off after its status; it counts as delivered");
            return Sent::Delivered(status.as_u16(), Bytes::new());
        }
        Err(error) if gateway_lost_it(status) => {
            let what = format!("Salesforce's side answered {status}, then {error}");
            return Sent::Unknown(what, Some(status.as_u16()), None);
        }
        Err(error) => return Sent::Retry(error, Some(status.as_u16()), None),
    };
    // The replay asks for a plain answer, but a server may compress it anyway.
    let body = match decoded_prefix(&parts.headers, &body, true, KEPT_RESPONSE_BYTES) {
        (Cow::Owned(plain), _) if !plain.is_empty() => Bytes::from(plain),
        _ => body,
    };
    let mut scanner = BodyScanner::new();
    scanner.feed(&body);
    scanner.finish();
    if let Some(report) = scanner.report() {
        r.meter.observe_answer(call, report);
    }
    match scanner.limit_exceeded() {
        Some(LimitExceeded::Daily) => {
            r.meter.observe_exhausted();
            Sent::OutOfCalls(
                "Salesforce: REQUEST_LIMIT_EXCEEDED (the org is out of calls; waiting for budget)"
                    .into(),
            )
        }
        Some(LimitExceeded::ConcurrentLongRunning) => Sent::Retry(
            "Salesforce: too many concurrent long-running requests".into(),
            Some(status.as_u16()),
            Some(body),
        ),
        None if gateway_lost_it(status) => Sent::Unknown(
            format!("Salesforce's side answered {status}"),
            Some(status.as_u16()),
            Some(body),
        ),
        None if status.is_server_error() || status == StatusCode::TOO_MANY_REQUESTS => Sent::Retry(
            format!("Salesforce answered {status}"),
            Some(status.as_u16()),
            Some(body),
        ),
        None => Sent::Delivered(status.as_u16(), body),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Two scrapes at once: the second reads the store only once the first has applied its
    /// counts, so an older reading can never be applied after a newer one.
    #[tokio::test]
    async fn counts_are_read_and_applied_one_reading_at_a_time() {
        let store = Arc::new(Store::open_in_memory().expect("store"));
        let (_stop, stopped) = watch::channel(false);
        let mut tasks = tokio::task::JoinSet::new();
        let deferrals = DeferralsBuilder::new(store)
            .start(stopped, Duration::ZERO, &mut tasks)
            .await
            .expect("start");
        let applied = std::sync::Mutex::new(Vec::new());
        let read = |n: u32| {
            let (deferrals, applied) = (&deferrals, &applied);
            async move {
                deferrals
                    .refresh_depths(|_| {
                        // No other reading may be under way while this one is applied.
                        let held = deferrals.refreshing.try_lock().is_err();
                        applied.lock().expect("applied").push((n, held));
                    })
                    .await
                    .expect("counts")
            }
        };
        tokio::join!(read(1), read(2));
        let applied = applied.into_inner().expect("applied");
        assert_eq!(applied.len(), 2);
        assert!(applied.iter().all(|&(_, held)| held), "{applied:?}");
    }

    #[test]
    fn backoff_doubles_up_to_five_minutes() {
        assert_eq!(backoff(0), Duration::from_secs(1));
        assert_eq!(backoff(1), Duration::from_secs(2));
        assert_eq!(backoff(5), Duration::from_secs(32));
        assert_eq!(backoff(9), Duration::from_secs(300));
        assert_eq!(backoff(40), Duration::from_secs(300));
    }
}
