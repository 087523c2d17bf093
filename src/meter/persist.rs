//! Keeping the meter across restarts: window counts and org state are saved to the store
//! every few seconds and at shutdown, and put back at start-up.
//!
//! After a crash (even `kill -9`) the proxy forgets at most one snapshot interval of calls.
//! The store is SQLite, so saving runs on the blocking pool, off the request path.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use super::{Meter, OrgState};
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
                org.restore_state(state);
            }
        }
    }
    Ok(restored)
}

/// Each window's buckets, oldest first, by `(org, integration)` (`""` for the org's own).
type Buckets = HashMap<(String, String), Vec<(u32, u32)>>;

/// The windows as the store holds them since the last save, so that the next save writes only
/// the minutes that changed: with thousands of integrations busy all day, rewriting every bucket
/// every few seconds would hold the store (and the deferred calls waiting on it) for seconds.
#[derive(Default)]
pub struct Saved {
    /// `None` until the first save, and after a failed one: the next save then replaces
    /// whatever the store holds.
    windows: Option<Buckets>,
}

/// The buckets that differ from `saved` in `now` (each window's buckets oldest first): new and
/// changed counts, and a count of 0 for a minute that is gone (aged out, refunded to zero).
fn changes(saved: &Buckets, now: &[WindowSnapshot]) -> Vec<WindowSnapshot> {
    let mut out = Vec::new();
    for window in now {
        let key = (window.org.clone(), window.integration.clone());
        let before = saved.get(&key).map(Vec::as_slice).unwrap_or_default();
        let buckets = diff(before, &window.buckets);
        if !buckets.is_empty() {
            out.push(WindowSnapshot {
                org: window.org.clone(),
                integration: window.integration.clone(),
                buckets,
            });
        }
    }
    out
}

/// `(minute, count)` lists, both oldest first: what turns `before` into `after`.
fn diff(before: &[(u32, u32)], after: &[(u32, u32)]) -> Vec<(u32, u32)> {
    let (mut b, mut a) = (before.iter().peekable(), after.iter().peekable());
    let mut out = Vec::new();
    loop {
        match (b.peek(), a.peek()) {
            (None, None) => return out,
            (Some(&&(minute, _)), None) => {
                out.push((minute, 0));
                b.next();
            }
            (None, Some(&&bucket)) => {
                out.push(bucket);
                a.next();
            }
            (Some(&&(old_minute, old)), Some(&&(minute, count))) => {
                if old_minute < minute {
                    out.push((old_minute, 0));
                    b.next();
                } else if minute < old_minute {
                    out.push((minute, count));
                    a.next();
                } else {
                    if old != count {
                        out.push((minute, count));
                    }
                    b.next();
                    a.next();
                }
            }
        }
    }
}

/// Saves everything once: the windows' changes since `saved` (all of them the first time),
/// and the orgs' state.
pub async fn save(meter: &Meter, store: &Arc<Store>, saved: &mut Saved) -> Result<(), StoreError> {
    let windows: Vec<WindowSnapshot> = meter
        .windows()
        .into_iter()
        .map(|w| WindowSnapshot {
            org: w.org,
            integration: w.integration.unwrap_or_default(),
            buckets: w.buckets,
        })
        .collect();
    // Rows of minutes older than every window go, whatever wrote them.
    let oldest = meter
        .orgs()
        .map(|o| o.clock.minute().saturating_sub(o.window.minutes()))
        .min()
        .unwrap_or(0);
    let states: Vec<(String, String)> = meter
        .orgs()
        .map(|o| {
            let value = serde_json::to_string(&o.saved_state()).unwrap_or_default();
            (state_key(o.id().as_str()), value)
        })
        .collect();
    let (store, before) = (store.clone(), saved.windows.take());
    // Comparing every bucket of every window is work for the blocking pool too, not for a
    // thread serving requests.
    let (outcome, now_saved) = tokio::task::spawn_blocking(move || {
        let write = || {
            match &before {
                Some(before) => store.update_windows(&changes(before, &windows), oldest)?,
                None => store.save_windows(&windows)?,
            }
            for (key, value) in &states {
                store.put_state(key, value)?;
            }
            Ok::<_, StoreError>(())
        };
        match write() {
            Ok(()) => {
                let map = windows
                    .into_iter()
                    .map(|w| ((w.org, w.integration), w.buckets));
                (Ok(()), Some(map.collect()))
            }
            // Which writes took is unknown: the next save replaces all.
            Err(e) => (Err(e), None),
        }
    })
    .await
    .map_err(|e| StoreError::Corrupt(format!("saving windows: {e}")))?;
    saved.windows = now_saved;
    outcome
}

/// Saves every `SNAPSHOT_INTERVAL` until `stop`, then once more.
pub async fn run(meter: Arc<Meter>, store: Arc<Store>, mut stop: watch::Receiver<bool>) {
    let mut saved = Saved::default();
    let mut tick = tokio::time::interval(SNAPSHOT_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.wait_for(|s| *s) => break,
        }
        if let Err(e) = save(&meter, &store, &mut saved).await {
            tracing::warn!(error = %e, "saving the meter's windows failed; will retry");
        }
    }
    match save(&meter, &store, &mut saved).await {
        Ok(()) => tracing::debug!("meter saved at shutdown"),
        Err(e) => tracing::error!(error = %e, "saving the meter at shutdown failed"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// What the store does with a save's changes: a count sets the minute, 0 removes it.
    fn apply(before: &[(u32, u32)], changes: &[(u32, u32)]) -> Vec<(u32, u32)> {
        let mut rows: std::collections::BTreeMap<u32, u32> = before.iter().copied().collect();
        for &(minute, count) in changes {
            if count == 0 {
                rows.remove(&minute);
            } else {
                rows.insert(minute, count);
            }
        }
        rows.into_iter().collect()
    }

    /// A window's buckets as the meter gives them: oldest first, counts above 0.
    fn buckets() -> impl Strategy<Value = Vec<(u32, u32)>> {
        proptest::collection::btree_map(0u32..60, 1u32..5, 0..20)
            .prop_map(|m| m.into_iter().collect())
    }

    proptest! {
        /// The changes turn what the store held into what the meter holds, and name no minute
        /// whose count stayed the same.
        #[test]
        fn changes_turn_the_saved_window_into_the_current_one(
            before in buckets(),
            after in buckets(),
        ) {
            let changes = diff(&before, &after);
            prop_assert_eq!(apply(&before, &changes), after.clone());
            for (minute, count) in &changes {
                prop_assert!(!before.contains(&(*minute, *count)), "{minute} unchanged");
            }
        }
    }

    #[test]
    fn only_windows_that_changed_are_written() {
        let window = |integration: &str, buckets: Vec<(u32, u32)>| WindowSnapshot {
            org: "acme".into(),
            integration: integration.into(),
            buckets,
        };
        let saved: Buckets = [
            (("acme".into(), "".into()), vec![(10, 3), (11, 1)]),
            (("acme".into(), "a".into()), vec![(10, 3), (11, 1)]),
        ]
        .into_iter()
        .collect();
        let now = [
            window("", vec![(10, 3), (11, 2)]),
            window("a", vec![(10, 3), (11, 1)]), // unchanged
            window("b", vec![(11, 1)]),          // new
        ];
        let written = changes(&saved, &now);
        let written: Vec<_> = written
            .iter()
            .map(|w| (w.integration.as_str(), w.buckets.clone()))
            .collect();
        assert_eq!(written, [("", vec![(11, 2)]), ("b", vec![(11, 1)])]);
    }
}
