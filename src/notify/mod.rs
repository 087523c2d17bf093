//! Thresholds and threshold emails.
//!
//! - [`Thresholds`]: each org's threshold (levels, recipients, `min_interval`), from
//!   `[org.threshold]` or set at run time through the admin API; a run-time threshold is kept in
//!   the store, wins over the config and survives restarts.
//! - [`Watcher`]: a task that reads the meter's usage every [`CHECK_INTERVAL`] (and at once when
//!   a threshold changes), runs each subject's [`crossing`] state machine — the org against its
//!   limit, and each integration with a quota against that quota, at the org's percentage levels
//!   — saves the state with the emails it makes, then hands them to [`mail::deliver`] tasks.
//!   An email stays in the saved state until the SMTP server took it: one that could not be
//!   sent is retried while the proxy runs, and one still waiting at a restart goes out at the
//!   next start, until its crossing is a day old. It goes to the org's notify addresses as
//!   they are when it is sent. At shutdown, deliveries under way may finish (within
//!   `shutdown_grace`) and be recorded, so that the next start does not send them again.
//!   None of it is on the request path.

pub mod crossing;
pub mod mail;

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::{watch, Notify};
use tokio::task::JoinSet;

use crate::config::{Amount, Config, ConfigError, OnLimit, OrgId, ThresholdConfig};
use crate::meter::{Meter, OrgReport};
use crate::metrics::Metrics;
use crate::store::{Store, StoreError};

use self::crossing::{Decision, Level, Reading, SubjectState};
use self::mail::{Alert, Delivery, Mailer, Outgoing, QuotaAlert};

/// How often the watcher reads the usage.
pub const CHECK_INTERVAL: Duration = Duration::from_secs(2);
/// Integrations listed in an org's email.
const TOP_INTEGRATIONS: usize = 5;
/// An email still waiting at start-up is sent if its crossing is younger than this; an older
/// one would only confuse (the usage it reports has moved on).
const OUTBOX_MAX_AGE: Duration = Duration::from_secs(24 * 3600);

/// Where an org's threshold comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Source {
    /// `[org.threshold]`.
    Config,
    /// Set through the admin API; kept in the store.
    Runtime,
    /// No threshold.
    None,
}

/// A threshold the admin API refused: the field (`levels[1]`) and what is wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}{message}", field.as_deref().map(|f| format!("{f}: ")).unwrap_or_default())]
pub struct InvalidThreshold {
    pub field: Option<String>,
    pub message: String,
}

struct OrgThreshold {
    org: OrgId,
    /// `[org.threshold]`; a reload (SIGHUP) replaces it.
    configured: RwLock<Option<ThresholdConfig>>,
    runtime: RwLock<Option<ThresholdConfig>>,
}

/// Every org's threshold. Read by the watcher and the admin pages, written by the admin API.
pub struct Thresholds {
    orgs: Vec<OrgThreshold>,
    /// Told when a threshold may have changed: a delivery waiting to retry sends to corrected
    /// notify addresses at once.
    changes: watch::Sender<()>,
}

impl Thresholds {
    pub fn from_config(config: &Config) -> Self {
        Thresholds {
            orgs: config
                .orgs
                .iter()
                .map(|o| OrgThreshold {
                    org: o.id.clone(),
                    configured: RwLock::new(o.threshold.clone()),
                    runtime: RwLock::new(None),
                })
                .collect(),
            changes: watch::channel(()).0,
        }
    }

    /// Changes whenever a threshold may have changed.
    pub fn subscribe(&self) -> watch::Receiver<()> {
        self.changes.subscribe()
    }

    /// The notify addresses of `org`'s threshold in force (none without a threshold).
    pub fn notify(&self, org: &str) -> Vec<String> {
        self.get(org)
            .and_then(|(t, _)| t)
            .map(|t| t.notify)
            .unwrap_or_default()
    }

    /// Takes the run-time thresholds saved in the store (they win over the config) and gives
    /// the meter their levels. A saved threshold that no longer validates is ignored, loudly.
    pub async fn load(&self, store: &Arc<Store>, meter: &Meter) -> Result<(), StoreError> {
        let s = store.clone();
        let saved = tokio::task::spawn_blocking(move || s.thresholds())
            .await
            .map_err(|e| StoreError::Corrupt(format!("loading thresholds: {e}")))??;
        for (org, json) in saved {
            let Some(entry) = self.orgs.iter().find(|o| o.org.as_str() == org) else {
                continue; // an org no longer configured
            };
            let parsed = serde_json::from_str(&json)
                .map_err(|e| InvalidThreshold {
                    field: None,
                    message: e.to_string(),
                })
                .and_then(|v| from_json(&v));
            match parsed {
                Ok(threshold) => {
                    meter.set_thresholds(&org, threshold.levels.clone());
                    *write(&entry.runtime) = Some(threshold);
                    tracing::info!(%org, "using the threshold set through the admin API");
                }
                Err(e) => tracing::error!(%org, error = %e,
                    "the threshold saved in the store is invalid; using the configured one"),
            }
        }
        Ok(())
    }

    /// The threshold in force for `org` and where it comes from; `None` for an unknown org.
    pub fn get(&self, org: &str) -> Option<(Option<ThresholdConfig>, Source)> {
        let entry = self.orgs.iter().find(|o| o.org.as_str() == org)?;
        let runtime = read(&entry.runtime).clone();
        Some(match (runtime, read(&entry.configured).clone()) {
            (Some(t), _) => (Some(t), Source::Runtime),
            (None, Some(t)) => (Some(t), Source::Config),
            (None, None) => (None, Source::None),
        })
    }

    /// Takes the `[org.threshold]` of a reloaded config. Where no threshold was set through
    /// the admin API, the new one is in force at once and the meter's levels follow. Returns
    /// the orgs whose configured threshold changed, each with whether it is in force (false:
    /// one set through the admin API still is).
    pub fn reload(&self, config: &Config, meter: &Meter) -> Vec<(OrgId, bool)> {
        let mut changed = Vec::new();
        for org in &config.orgs {
            let Some(entry) = self.orgs.iter().find(|o| o.org == org.id) else {
                continue; // a new org needs a restart (logged by the caller)
            };
            let mut configured = write(&entry.configured);
            if *configured == org.threshold {
                continue;
            }
            configured.clone_from(&org.threshold);
            let in_force = read(&entry.runtime).is_none();
            if in_force {
                let levels = org.threshold.as_ref().map(|t| t.levels.clone());
                meter.set_thresholds(org.id.as_str(), levels.unwrap_or_default());
            }
            changed.push((org.id.clone(), in_force));
        }
        if !changed.is_empty() {
            self.changes.send_replace(());
        }
        changed
    }

    /// Sets (`Some`) or forgets (`None`: the configured one applies again) the run-time
    /// threshold of `org`: saved in the store first, then in force, and the meter's levels
    /// follow. False for an unknown org.
    pub async fn set(
        &self,
        org: &str,
        threshold: Option<ThresholdConfig>,
        store: &Arc<Store>,
        meter: &Meter,
    ) -> Result<bool, StoreError> {
        let Some(entry) = self.orgs.iter().find(|o| o.org.as_str() == org) else {
            return Ok(false);
        };
        let (s, key) = (store.clone(), org.to_owned());
        let json = threshold.as_ref().map(|t| to_json(t).to_string());
        tokio::task::spawn_blocking(move || match json {
            Some(json) => s.put_threshold(&key, &json),
            None => s.delete_threshold(&key).map(|_| ()),
        })
        .await
        .map_err(|e| StoreError::Corrupt(format!("saving the threshold: {e}")))??;
        let levels = threshold
            .clone()
            .or_else(|| read(&entry.configured).clone())
            .map(|t| t.levels)
            .unwrap_or_default();
        *write(&entry.runtime) = threshold;
        meter.set_thresholds(org, levels);
        self.changes.send_replace(());
        Ok(true)
    }
}

fn read<T>(lock: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    lock.read()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn write<T>(lock: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    lock.write()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// A threshold as the admin API shows and takes it: `levels` (numbers of calls, or strings
/// such as `"80%"`), `notify`, `min_interval` (`"4h"`).
pub fn to_json(t: &ThresholdConfig) -> serde_json::Value {
    let levels: Vec<serde_json::Value> = t
        .levels
        .iter()
        .map(|a| match a {
            Amount::Calls(n) => serde_json::Value::from(*n),
            pct @ Amount::Percent(_) => serde_json::Value::from(pct.to_string()),
        })
        .collect();
    serde_json::json!({
        "levels": levels,
        "notify": t.notify,
        "min_interval": humantime::format_duration(t.min_interval).to_string(),
    })
}

/// Validates a threshold given as JSON with the rules of `[org.threshold]` (the same code
/// `callmeter check` runs): the JSON object becomes the TOML table `[threshold]`.
pub fn from_json(value: &serde_json::Value) -> Result<ThresholdConfig, InvalidThreshold> {
    let invalid = |field: Option<&str>, message: String| InvalidThreshold {
        field: field.map(str::to_owned),
        message,
    };
    let Some(object) = value.as_object() else {
        return Err(invalid(
            None,
            "expected a JSON object such as {\"levels\": [\"80%\", \"90%\"], \"notify\": [\"admin@example.com\"], \"min_interval\": \"4h\"}".to_owned(),
        ));
    };
    let mut table = toml::Table::new();
    for (key, value) in object {
        if value.is_null() {
            continue; // as if absent: the default applies
        }
        let value = toml::Value::try_from(value).map_err(|e| {
            invalid(
                Some(key),
                format!("{e}; use numbers, strings and arrays of them"),
            )
        })?;
        table.insert(key.clone(), value);
    }
    let mut doc = toml::Table::new();
    doc.insert("threshold".to_owned(), toml::Value::Table(table));
    let text = toml::to_string(&doc).map_err(|e| invalid(None, e.to_string()))?;
    crate::config::parse_threshold(&text, Path::new("request body")).map_err(|e| match e {
        ConfigError::Invalid { key, problem, .. } => invalid(Some(&key), problem.to_string()),
        other => invalid(None, other.to_string()),
    })
}

/// The saved notification state of one org.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
struct OrgState {
    #[serde(default)]
    org: SubjectState,
    /// Integrations with a quota, by id.
    #[serde(default)]
    integrations: BTreeMap<String, SubjectState>,
    /// Emails of recorded crossings the SMTP server has not taken yet.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    outbox: Vec<Outgoing>,
}

/// A delivery task's report: org, the email's key, how it ended.
type Done = (String, u64, Delivery);
/// The delivery tasks under way.
type Deliveries = JoinSet<Done>;

/// The threshold watcher.
pub struct Watcher {
    pub meter: Arc<Meter>,
    pub thresholds: Arc<Thresholds>,
    pub store: Arc<Store>,
    pub metrics: Arc<Metrics>,
    /// `None` without `[smtp]`: crossings are still tracked and logged.
    pub mailer: Option<Arc<Mailer>>,
    /// `on_limit` of each integration, for quota emails.
    pub on_limit: HashMap<(String, String), OnLimit>,
    /// Notified when a threshold changes, to check at once.
    pub poke: Arc<Notify>,
    /// `[proxy] shutdown_grace`: how long a shutdown waits for deliveries under way, as it
    /// waits for requests in flight.
    pub shutdown_grace: Duration,
}

impl Watcher {
    /// Checks every [`CHECK_INTERVAL`], or when poked, until `stop`.
    pub async fn run(self, stop: watch::Receiver<bool>) {
        let mut states = self.load_states().await;
        let mut deliveries = Deliveries::new();
        self.resume(&mut states, &mut deliveries, &stop).await;
        let mut tick = tokio::time::interval(CHECK_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut stopped = stop.clone();
        loop {
            let delivered = tokio::select! {
                _ = tick.tick() => None,
                _ = self.poke.notified() => None,
                Some(done) = deliveries.join_next() => Some(done),
                _ = stopped.wait_for(|s| *s) => break,
            };
            match delivered {
                Some(done) => self.delivered(&mut states, done).await,
                None => self.check(&mut states, &mut deliveries, &stop).await,
            }
        }
        // A delivery in its SMTP transaction goes on after the stop; if the server takes the
        // email and nobody records it, the next start sends it again. Wait for them (retries
        // end at once on the stop) within the grace the requests in flight get.
        let drained = tokio::time::timeout(self.shutdown_grace, async {
            while let Some(done) = deliveries.join_next().await {
                self.delivered(&mut states, done).await;
            }
        })
        .await;
        if drained.is_err() {
            tracing::warn!(
                emails = deliveries.len(),
                "threshold emails were still being sent after shutdown_grace; they are sent again at the next start"
            );
            deliveries.shutdown().await;
        }
    }

    /// Records how a delivery ended: sent or too old, out of the outbox; stopped, it waits
    /// there for the next start.
    async fn delivered(
        &self,
        states: &mut HashMap<String, OrgState>,
        done: Result<Done, tokio::task::JoinError>,
    ) {
        let (org, key) = match done {
            Ok((org, key, Delivery::Sent | Delivery::Expired)) => (org, key),
            Ok((_, _, Delivery::Stopped)) => return,
            Err(error) => {
                tracing::error!(%error, "a threshold email delivery task failed; the email is sent again at the next start");
                return;
            }
        };
        if let Some(state) = states.get_mut(&org) {
            state.outbox.retain(|e| e.key != key);
            self.save(&org, state).await;
        }
    }

    /// Sends the emails a previous run recorded and could not send; drops those older than
    /// [`OUTBOX_MAX_AGE`].
    async fn resume(
        &self,
        states: &mut HashMap<String, OrgState>,
        deliveries: &mut Deliveries,
        stop: &watch::Receiver<bool>,
    ) {
        let now_ms = self.meter.orgs().next().map_or(0, |o| o.clock().unix_ms());
        let max_age = OUTBOX_MAX_AGE.as_millis() as u64;
        for (org, state) in states.iter_mut() {
            let waiting = state.outbox.len();
            state
                .outbox
                .retain(|e| now_ms.saturating_sub(e.created_ms) < max_age);
            if state.outbox.len() < waiting {
                tracing::warn!(%org, dropped = waiting - state.outbox.len(),
                    "threshold emails older than a day that were never sent are dropped");
                self.save(org, state).await;
            }
            self.metrics.notifications_pending(org, state.outbox.len());
            for email in &state.outbox {
                tracing::info!(%org, subject = %email.subject, "sending a threshold email a previous run could not send");
                self.spawn_delivery(org, email.clone(), now_ms, deliveries, stop);
            }
        }
    }

    /// Saves `state` for `org`; on failure an email may be sent twice after a restart. The
    /// pending-emails gauge follows the outbox.
    async fn save(&self, org: &str, state: &OrgState) {
        self.metrics.notifications_pending(org, state.outbox.len());
        let (s, id) = (self.store.clone(), org.to_owned());
        let json = serde_json::to_string(state).unwrap_or_default();
        let saved = tokio::task::spawn_blocking(move || s.put_notify_state(&id, &json))
            .await
            .map_err(|e| e.to_string())
            .and_then(|r| r.map_err(|e| e.to_string()));
        if let Err(error) = saved {
            tracing::error!(%org, %error,
                "cannot save the notification state; after a restart an email may be sent again");
        }
    }

    async fn load_states(&self) -> HashMap<String, OrgState> {
        let mut states = HashMap::new();
        for org in self.meter.orgs() {
            let (s, id) = (self.store.clone(), org.id().to_string());
            let key = id.clone();
            let saved = tokio::task::spawn_blocking(move || s.get_notify_state(&key)).await;
            match saved {
                Ok(Ok(Some(json))) => match serde_json::from_str::<OrgState>(&json) {
                    Ok(state) => {
                        states.insert(id, state);
                    }
                    Err(e) => tracing::warn!(org = %id, error = %e,
                        "ignoring unreadable notification state; a crossing may be told again"),
                },
                Ok(Ok(None)) => {}
                Ok(Err(e)) => tracing::warn!(org = %id, error = %e,
                    "cannot read the notification state; a crossing may be told again"),
                Err(e) => tracing::warn!(org = %id, error = %e, "reading notification state"),
            }
        }
        states
    }

    /// One look at every org's usage.
    async fn check(
        &self,
        states: &mut HashMap<String, OrgState>,
        deliveries: &mut Deliveries,
        stop: &watch::Receiver<bool>,
    ) {
        let usage = self.meter.usage();
        let now_ms = self.meter.orgs().next().map_or(0, |o| o.clock().unix_ms());
        for org in &usage.orgs {
            let threshold = self.thresholds.get(&org.id).and_then(|(t, _)| t);
            let state = states.entry(org.id.clone()).or_default();
            let before = state.clone();
            let alerts = match &threshold {
                Some(t) => evaluate(org, t, state, now_ms, &self.on_limit),
                None => {
                    // No threshold: nothing to track, but emails already due still go out.
                    let outbox = std::mem::take(&mut state.outbox);
                    *state = OrgState {
                        outbox,
                        ..OrgState::default()
                    };
                    Vec::new()
                }
            };
            let mut new = Vec::new();
            for alert in alerts {
                let key = state.outbox.iter().map(|e| e.key + 1).max().unwrap_or(0);
                if let Some(email) = self.email(&alert, key, now_ms) {
                    state.outbox.push(email.clone());
                    new.push(email);
                }
            }
            if *state != before {
                // Saved with its emails before any leaves: a restart neither tells the same
                // crossing twice nor forgets an email not yet sent.
                self.save(&org.id, state).await;
            }
            for email in new {
                self.spawn_delivery(&org.id, email, now_ms, deliveries, stop);
            }
        }
    }

    /// The email for `alert`, or `None` (with the reason logged) when there is nobody to send
    /// it to or no way to send it.
    fn email(&self, alert: &Alert, key: u64, now_ms: u64) -> Option<Outgoing> {
        let subject = alert.subject();
        if alert.recipients.is_empty() {
            tracing::info!(org = %alert.org, %subject, "threshold crossed; no email: the threshold has no notify addresses");
            return None;
        }
        let Some(mailer) = &self.mailer else {
            tracing::warn!(org = %alert.org, %subject, "threshold crossed; no email: there is no [smtp] section");
            return None;
        };
        match alert.message(mailer.from()) {
            Ok(message) => Some(Outgoing::new(key, subject, &message, now_ms)),
            Err(error) => {
                self.metrics.notification(&alert.org, false);
                tracing::error!(org = %alert.org, %subject, %error, "cannot build the threshold email");
                None
            }
        }
    }

    /// Sends `email` in a task of `deliveries`, until [`OUTBOX_MAX_AGE`] after its crossing.
    fn spawn_delivery(
        &self,
        org: &str,
        email: Outgoing,
        now_ms: u64,
        deliveries: &mut Deliveries,
        stop: &watch::Receiver<bool>,
    ) {
        let Some(mailer) = self.mailer.clone() else {
            return;
        };
        let age = Duration::from_millis(now_ms.saturating_sub(email.created_ms));
        let expires = tokio::time::Instant::now() + OUTBOX_MAX_AGE.saturating_sub(age);
        let (org, metrics, thresholds, stop) = (
            org.to_owned(),
            self.metrics.clone(),
            self.thresholds.clone(),
            stop.clone(),
        );
        deliveries.spawn(async move {
            let delivery =
                mail::deliver(mailer, &email, &org, metrics, thresholds, expires, stop).await;
            (org, email.key, delivery)
        });
    }
}

/// Runs the crossing state machines of one org and its integrations; returns the emails due.
fn evaluate(
    org: &OrgReport,
    threshold: &ThresholdConfig,
    state: &mut OrgState,
    now_ms: u64,
    on_limit: &HashMap<(String, String), OnLimit>,
) -> Vec<Alert> {
    let window = Duration::from_secs(u64::from(org.window_minutes) * 60);
    // Only an email needs the integrations by use.
    let top = || {
        let mut top: Vec<(String, u64, Option<u64>)> = org
            .integrations
            .iter()
            .filter(|i| i.window > 0)
            .map(|i| (i.id.clone(), i.window, i.quota))
            .collect();
        top.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        top.truncate(TOP_INTEGRATIONS);
        top
    };
    let alert = |integration: Option<QuotaAlert>, level: Level, used, budget| Alert {
        org: org.id.clone(),
        integration,
        level: level.key,
        level_calls: level.calls,
        used,
        org_used: org.used,
        budget,
        window_minutes: org.window_minutes,
        top: top(),
        outside: org
            .reported_used
            .map(|_| org.used.saturating_sub(org.proxied)),
        recipients: threshold.notify.clone(),
    };
    let mut out = Vec::new();

    let levels: Vec<Level> = threshold
        .levels
        .iter()
        .filter_map(|a| resolve(a, org.limit, true))
        .collect();
    let reading = Reading {
        used: org.used,
        budget: org.limit,
        reported: org.reported_used.is_some(),
        now_ms,
        window,
    };
    match state
        .org
        .evaluate(&levels, &reading, threshold.min_interval)
    {
        Decision::Email(level) => out.push(alert(None, level, org.used, org.limit)),
        Decision::HeldBack(level) => tracing::info!(org = %org.id, level = %level.key,
            "threshold crossed again within min_interval; no email"),
        Decision::Nothing => {}
    }

    // Integrations with a quota: the org's percentage levels, of the quota.
    state.integrations.retain(|id, _| {
        org.integrations
            .iter()
            .any(|i| &i.id == id && i.quota.is_some())
    });
    for i in &org.integrations {
        let Some(quota) = i.quota else { continue };
        let levels: Vec<Level> = threshold
            .levels
            .iter()
            .filter_map(|a| resolve(a, Some(quota), false))
            .collect();
        if levels.is_empty() {
            continue;
        }
        let reading = Reading {
            used: i.window,
            budget: Some(quota),
            reported: false,
            now_ms,
            window,
        };
        let subject = state.integrations.entry(i.id.clone()).or_default();
        match subject.evaluate(&levels, &reading, threshold.min_interval) {
            Decision::Email(level) => {
                let quota_alert = QuotaAlert {
                    id: i.id.clone(),
                    on_limit: on_limit
                        .get(&(org.id.clone(), i.id.clone()))
                        .map_or("reject", |o| o.as_str()),
                };
                out.push(alert(Some(quota_alert), level, i.window, Some(quota)));
            }
            Decision::HeldBack(level) => tracing::info!(org = %org.id, integration = %i.id,
                level = %level.key, "quota threshold crossed again within min_interval; no email"),
            Decision::Nothing => {}
        }
        if subject.is_empty() {
            state.integrations.remove(&i.id);
        }
    }
    out
}

/// A level in calls against `budget` (the limit or a quota). A percentage needs the budget;
/// a number of calls applies to the org only (`calls_apply`). At least 1 call.
fn resolve(level: &Amount, budget: Option<u64>, calls_apply: bool) -> Option<Level> {
    let calls = match level {
        Amount::Calls(n) if calls_apply => *n,
        Amount::Calls(_) => return None,
        Amount::Percent(_) => level.resolve(budget?),
    };
    Some(Level {
        key: level.to_string(),
        calls: calls.max(1),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn json_thresholds_are_validated_like_the_config() {
        let t = from_json(
            &json!({"levels": ["80%", 95000], "notify": ["a@example.com"], "min_interval": "30m"}),
        )
        .expect("valid");
        assert_eq!(t.levels, vec![Amount::Percent(80.0), Amount::Calls(95_000)]);
        assert_eq!(t.min_interval, Duration::from_secs(1800));
        assert_eq!(
            to_json(&t),
            json!({"levels": ["80%", 95000], "notify": ["a@example.com"], "min_interval": "30m"})
        );
        assert_eq!(from_json(&to_json(&t)), Ok(t));

        let defaults = from_json(&json!({"levels": ["90%"], "notify": null})).expect("valid");
        assert_eq!(defaults.min_interval, Duration::from_secs(4 * 3600));
        assert!(defaults.notify.is_empty());

        for (body, field, words) in [
            (json!({}), Some("levels"), "missing"),
            (json!({"levels": []}), Some("levels"), "empty"),
            (
                json!({"levels": ["180%"]}),
                Some("levels[0]"),
                "at most 100%",
            ),
            (
                json!({"levels": ["80%", "lots"]}),
                Some("levels[1]"),
                "not a number of calls",
            ),
            (
                json!({"levels": [80.5]}),
                Some("levels[0]"),
                "floating point",
            ),
            (json!({"levels": [0]}), Some("levels[0]"), "at least 1 call"),
            (
                json!({"levels": ["80%"], "notify": ["nobody"]}),
                Some("notify[0]"),
                "not an email address",
            ),
            (
                json!({"levels": ["80%"], "min_interval": "soon"}),
                Some("min_interval"),
                "not a duration",
            ),
            (
                json!({"levels": ["80%"], "colour": "red"}),
                Some("colour"),
                "unknown key",
            ),
            (json!(["80%"]), None, "JSON object"),
        ] {
            let e = from_json(&body).expect_err(&body.to_string());
            assert_eq!(e.field.as_deref(), field, "{body}: {e}");
            assert!(e.message.contains(words), "{body}: {e}");
        }
    }

    /// A config of one org, `acme`, with `threshold` (TOML of `[org.threshold]`, or "").
    fn config(threshold: &str) -> Config {
        crate::config::parse(
            &format!(
                "[[listener]]\nname = \"main\"\nlisten = \"127.0.0.1:0\"\n[[org]]\nid = \"acme\"\n\
                 instance_url = \"https://acme.my.salesforce.com\"\n{threshold}\n"
            ),
            std::path::Path::new("test.toml"),
        )
        .expect("config")
    }

    /// A reload says whether the org's new `[org.threshold]` is in force: not while one set
    /// through the admin API is (the log said "applied" either way).
    #[tokio::test]
    async fn a_reloaded_threshold_is_in_force_unless_one_was_set_at_run_time() {
        let thresholds = Thresholds::from_config(&config(""));
        let (meter, store) = (
            Meter::new(),
            Arc::new(Store::open_in_memory().expect("store")),
        );
        let eighty = config("[org.threshold]\nlevels = [\"80%\"]");
        let acme = |in_force| vec![(OrgId::new("acme").expect("id"), in_force)];
        assert_eq!(thresholds.reload(&eighty, &meter), acme(true));
        let runtime = from_json(&json!({"levels": ["50%"]})).expect("valid");
        thresholds
            .set("acme", Some(runtime), &store, &meter)
            .await
            .expect("set");
        let ninety = config("[org.threshold]\nlevels = [\"90%\"]");
        assert_eq!(thresholds.reload(&ninety, &meter), acme(false));
    }

    /// Without `[smtp]` or without notify addresses a crossing is only logged (README), each
    /// way: with neither, it was not logged at all.
    #[tokio::test]
    async fn a_crossing_no_email_is_sent_for_is_logged() {
        let config = config("");
        let watcher = Watcher {
            meter: Arc::new(Meter::new()),
            thresholds: Arc::new(Thresholds::from_config(&config)),
            store: Arc::new(Store::open_in_memory().expect("store")),
            metrics: Metrics::new(),
            mailer: None,
            on_limit: HashMap::new(),
            poke: Arc::new(Notify::new()),
            shutdown_grace: Duration::from_secs(1),
        };
        for (recipients, said) in [
            (vec![], "no notify addresses"),
            (vec!["ops@example.com".to_owned()], "no [smtp] section"),
        ] {
            let alert = Alert {
                org: "acme".into(),
                integration: None,
                level: "80%".into(),
                level_calls: 800,
                used: 812,
                org_used: 812,
                budget: Some(1_000),
                window_minutes: 1440,
                top: vec![],
                outside: None,
                recipients,
            };
            let (guard, logged) = crate::logging::capture("info");
            assert!(watcher.email(&alert, 0, 0).is_none());
            drop(guard);
            let logged = String::from_utf8_lossy(&logged.lock().expect("log")).into_owned();
            assert!(
                logged.contains("threshold crossed") && logged.contains(said),
                "{logged}"
            );
        }
    }

    #[test]
    fn levels_resolve_against_the_limit_or_the_quota() {
        let pct = Amount::Percent(90.0);
        let calls = Amount::Calls(500);
        assert_eq!(resolve(&pct, Some(1_000), true).map(|l| l.calls), Some(900));
        assert_eq!(resolve(&pct, None, true), None);
        assert_eq!(resolve(&calls, None, true).map(|l| l.calls), Some(500));
        // Numbers of calls are org levels; only percentages apply to quotas.
        assert_eq!(resolve(&calls, Some(1_000), false), None);
        assert_eq!(
            resolve(&Amount::Percent(1.0), Some(10), false).map(|l| l.calls),
            Some(1)
        );
    }
}
