//! The budgets an admin configures, held so that a config reload can swap them while calls
//! are being decided: each meter keeps its budget behind an `ArcSwap`, read lock-free on the
//! hot path, replaced whole by a reload. Counts live in the windows and are not touched.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use super::TokenBucket;
use crate::config::{Amount, DailyLimit, IntegrationConfig, OrgConfig, Priority};

/// An org's budget.
#[derive(Debug)]
pub struct OrgBudget {
    pub configured_limit: Option<u64>,
    /// Kept back for critical integrations.
    pub reserve: Amount,
    /// While exhausted, one call per interval goes through to see whether budget is back.
    pub probe_interval: Duration,
    pub max_in_flight: Option<u32>,
}

impl OrgBudget {
    pub fn from_config(cfg: &OrgConfig) -> Self {
        OrgBudget {
            configured_limit: match cfg.daily_limit {
                DailyLimit::Auto => None,
                DailyLimit::Calls(n) => Some(n),
            },
            reserve: cfg.reserve,
            probe_interval: cfg.probe_interval,
            max_in_flight: cfg.max_in_flight,
        }
    }
}

/// An integration's budget. A reload starts its token bucket afresh (full).
#[derive(Debug, Default)]
pub struct IntegrationBudget {
    pub quota: Option<Amount>,
    pub rate: Option<TokenBucket>,
    pub critical: bool,
    pub max_in_flight: Option<u32>,
}

impl IntegrationBudget {
    pub fn from_config(cfg: &IntegrationConfig) -> Self {
        IntegrationBudget {
            quota: cfg.quota,
            rate: cfg.rate.map(|r| TokenBucket::new(r.per_second, r.burst)),
            critical: cfg.priority == Priority::Critical,
            max_in_flight: cfg.max_in_flight,
        }
    }
}

/// A request in flight, counted against `max_in_flight`; released when dropped (when the
/// response has been sent, or the call failed).
#[derive(Debug, Default)]
pub struct InFlight {
    held: [Option<Arc<AtomicU32>>; 2],
}

impl InFlight {
    /// Takes a slot of `counter` if fewer than `max` are taken.
    pub(super) fn try_take(&mut self, counter: &Arc<AtomicU32>, max: u32) -> bool {
        let taken = counter
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max).then_some(n + 1)
            })
            .is_ok();
        if taken {
            let slot = usize::from(self.held[0].is_some());
            self.held[slot] = Some(counter.clone());
        }
        taken
    }

    pub fn is_empty(&self) -> bool {
        self.held.iter().all(Option::is_none)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        for counter in self.held.iter_mut().filter_map(Option::take) {
            counter.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_taken_up_to_the_max_and_released_on_drop() {
        let counter = Arc::new(AtomicU32::new(0));
        let mut a = InFlight::default();
        assert!(a.try_take(&counter, 2));
        let mut b = InFlight::default();
        assert!(b.try_take(&counter, 2));
        let mut c = InFlight::default();
        assert!(!c.try_take(&counter, 2));
        drop(a);
        assert!(c.try_take(&counter, 2));
        assert_eq!(counter.load(Ordering::Relaxed), 2);
        drop((b, c));
        assert_eq!(counter.load(Ordering::Relaxed), 0);
    }
}
