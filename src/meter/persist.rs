//! Keeping the meter across restarts: window counts and org state are saved to the store
//! every few seconds and at shutdown, and put back at start-up.
//!
//! After a crash (even `kill -9`) the proxy forgets at most one snapshot interval of calls.
//! The store is SQLite, so saving runs on the blocking pool, off the request path.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use super::Meter;
use crate::store::{Store, StoreError, WindowSnapshot};

/// How often the windows are saved: the most a crash can make the proxy forget.
pub const SNAPSHOT_INTERVAL: Duration = Duration::from_secs(5);

fn state_key(org: &str) -> String {
    format!("org/{org}/meter")
}

/// Loads saved windows and org state into a fresh meter; returns the org-level calls restored.
pub async fn restore(meter: &Meter, store: &Arc<Store>) -> Result<usize, StoreError> {
    let oldest = meter
        .orgs()
        .map(|o| o.clock.minute().saturating_sub(o.window.minutes()))
        .min()
        .unwrap_or(0);
    let store2 = store.clone();
    let saved = tokio::task::spawn_blocking(move || store2.load_windows(oldest))
        .await
        .map_err(|e| StoreError::Corrupt(format!("loading windows: {e}")))??;
    let mut restored = 0;
    for snap in &saved {
        let integration = (!snap.integration.is_empty()).then_some(snap.integration.as_str());
        if meter.restore_window(&snap.org, integration, &snap.buckets) && integration.is_none() {
            restored += snap.buckets.iter().map(|&(_, c)| c as usize).sum::<usize>();
        }
    }
    for org in meter.orgs() {
        let key = state_key(org.id().as_str());
        let store2 = store.clone();
        let value = tokio::task::spawn_blocking(move || store2.get_state(&key))
            .await
            .map_err(|e| StoreError::Corrupt(format!("loading org state: {e}")))??;
        if let Some(value) = value {
            if let Ok(state) = serde_json::from_str::<OrgState>(&value) {
                org.restore_state(state.exhausted, state.reported_limit);
            }
        }
    }
    Ok(restored)
}

#[derive(serde::Serialize, serde::Deserialize)]
struct OrgState {
    exhausted: bool,
    reported_limit: u64,
}

/// Saves everything once.
pub async fn save(meter: &Meter, store: &Arc<Store>) -> Result<(), StoreError> {
    let windows: Vec<WindowSnapshot> = meter
        .windows()
        .into_iter()
        .map(|w| WindowSnapshot {
            org: w.org,
            integration: w.integration.unwrap_or_default(),
            buckets: w.buckets,
        })
        .collect();
    let states: Vec<(String, String)> = meter
        .orgs()
        .map(|o| {
            let (exhausted, reported_limit) = o.saved_state();
            let value = serde_json::to_string(&OrgState {
                exhausted,
                reported_limit,
            })
            .unwrap_or_default();
            (state_key(o.id().as_str()), value)
        })
        .collect();
    let store = store.clone();
    tokio::task::spawn_blocking(move || {
        store.save_windows(&windows)?;
        for (key, value) in &states {
            store.put_state(key, value)?;
        }
        Ok(())
    })
    .await
    .map_err(|e| StoreError::Corrupt(format!("saving windows: {e}")))?
}

/// Saves every `SNAPSHOT_INTERVAL` until `stop`, then once more.
pub async fn run(meter: Arc<Meter>, store: Arc<Store>, mut stop: watch::Receiver<bool>) {
    let mut tick = tokio::time::interval(SNAPSHOT_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.wait_for(|s| *s) => break,
        }
        if let Err(e) = save(&meter, &store).await {
            tracing::warn!(error = %e, "saving the meter's windows failed; will retry");
        }
    }
    match save(&meter, &store).await {
        Ok(()) => tracing::debug!("meter saved at shutdown"),
        Err(e) => tracing::error!(error = %e, "saving the meter at shutdown failed"),
    }
}
