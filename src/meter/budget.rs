//! The budgets an admin configures, held so that a config reload can change them while calls
//! are being decided: each meter keeps its budget in a few atomics, read with relaxed loads on
//! the hot path (no lock, no reference count) and overwritten field by field by a reload.
//! Counts live in the windows and are not touched. A reader racing a reload may see some
//! fields old and some new for one call; each field on its own is always a valid setting.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::config::{Amount, DailyLimit, IntegrationConfig, OrgConfig, Priority};

/// An org's budget.
#[derive(Debug, Clone, Copy, PartialEq)]
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

/// A token bucket's settings: microseconds per token and of burst.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateParams {
    pub interval_us: u64,
    pub tolerance_us: u64,
}

impl RateParams {
    pub fn new(per_second: f64, burst: u32) -> Self {
        let interval_us = (1_000_000.0 / per_second.max(1e-6)).round().max(1.0) as u64;
        RateParams {
            interval_us,
            tolerance_us: interval_us.saturating_mul(u64::from(burst.max(1))),
        }
    }

    /// The rate as whole calls per whole seconds, never faster than it is, as a client is
    /// told it (`RateLimit-Policy` has integers): 2.5 per second reads 2 per second, 0.1 per
    /// second 1 per 10 seconds.
    pub fn calls_per_whole_seconds(&self) -> (u64, Duration) {
        const SECOND_US: u64 = 1_000_000;
        let interval_us = self.interval_us.max(1);
        if interval_us > SECOND_US {
            (1, Duration::from_secs(interval_us.div_ceil(SECOND_US)))
        } else {
            (SECOND_US / interval_us, Duration::from_secs(1))
        }
    }
}

/// An integration's budget.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct IntegrationBudget {
    pub quota: Option<Amount>,
    pub rate: Option<RateParams>,
    pub critical: bool,
    pub max_in_flight: Option<u32>,
}

impl IntegrationBudget {
    pub fn from_config(cfg: &IntegrationConfig) -> Self {
        IntegrationBudget {
            quota: cfg.quota,
            rate: cfg.rate.map(|r| RateParams::new(r.per_second, r.burst)),
            critical: cfg.priority == Priority::Critical,
            max_in_flight: cfg.max_in_flight,
        }
    }
}

/// `None` in an atomic slot.
const NONE: u64 = u64::MAX;
/// Marks a percentage (stored in millionths of a percent) in a packed `Amount`.
const PERCENT: u64 = 1 << 63;

fn pack_amount(a: Option<Amount>) -> u64 {
    match a {
        None => NONE,
        Some(Amount::Calls(n)) => n.min(PERCENT - 1),
        Some(Amount::Percent(p)) => {
            PERCENT | (p * 1_000_000.0).round().clamp(0.0, 100_000_000.0) as u64
        }
    }
}

fn unpack_amount(word: u64) -> Option<Amount> {
    match word {
        NONE => None,
        w if w & PERCENT != 0 => Some(Amount::Percent((w & !PERCENT) as f64 / 1_000_000.0)),
        n => Some(Amount::Calls(n)),
    }
}

fn pack_opt(v: Option<u64>) -> u64 {
    v.unwrap_or(NONE)
}

fn unpack_opt(w: u64) -> Option<u64> {
    (w != NONE).then_some(w)
}

/// An org's budget as the meter holds it.
#[derive(Debug)]
pub struct LiveOrgBudget {
    limit: AtomicU64,
    reserve: AtomicU64,
    probe_us: AtomicU64,
    max_in_flight: AtomicU64,
}

impl LiveOrgBudget {
    pub fn new(b: OrgBudget) -> Self {
        let live = LiveOrgBudget {
            limit: AtomicU64::new(NONE),
            reserve: AtomicU64::new(NONE),
            probe_us: AtomicU64::new(0),
            max_in_flight: AtomicU64::new(NONE),
        };
        live.store(b);
        live
    }

    #[inline]
    pub fn load(&self) -> OrgBudget {
        OrgBudget {
            configured_limit: unpack_opt(self.limit.load(Ordering::Relaxed)),
            reserve: unpack_amount(self.reserve.load(Ordering::Relaxed))
                .unwrap_or(Amount::Calls(0)),
            probe_interval: Duration::from_micros(self.probe_us.load(Ordering::Relaxed)),
            max_in_flight: unpack_opt(self.max_in_flight.load(Ordering::Relaxed)).map(|n| n as u32),
        }
    }

    pub fn store(&self, b: OrgBudget) {
        self.limit
            .store(pack_opt(b.configured_limit), Ordering::Relaxed);
        self.reserve
            .store(pack_amount(Some(b.reserve)), Ordering::Relaxed);
        self.probe_us
            .store(b.probe_interval.as_micros() as u64, Ordering::Relaxed);
        self.max_in_flight
            .store(pack_opt(b.max_in_flight.map(u64::from)), Ordering::Relaxed);
    }
}

/// An integration's budget as the meter holds it.
#[derive(Debug)]
pub struct LiveIntegrationBudget {
    quota: AtomicU64,
    /// 0: no rate.
    interval_us: AtomicU64,
    tolerance_us: AtomicU64,
    critical: AtomicBool,
    max_in_flight: AtomicU64,
}

impl LiveIntegrationBudget {
    pub fn new(b: IntegrationBudget) -> Self {
        let live = LiveIntegrationBudget {
            quota: AtomicU64::new(NONE),
            interval_us: AtomicU64::new(0),
            tolerance_us: AtomicU64::new(0),
            critical: AtomicBool::new(false),
            max_in_flight: AtomicU64::new(NONE),
        };
        live.store(b);
        live
    }

    #[inline]
    pub fn load(&self) -> IntegrationBudget {
        let interval_us = self.interval_us.load(Ordering::Relaxed);
        IntegrationBudget {
            quota: unpack_amount(self.quota.load(Ordering::Relaxed)),
            rate: (interval_us != 0).then(|| RateParams {
                interval_us,
                tolerance_us: self.tolerance_us.load(Ordering::Relaxed),
            }),
            critical: self.critical.load(Ordering::Relaxed),
            max_in_flight: unpack_opt(self.max_in_flight.load(Ordering::Relaxed)).map(|n| n as u32),
        }
    }

    pub fn store(&self, b: IntegrationBudget) {
        self.quota.store(pack_amount(b.quota), Ordering::Relaxed);
        let rate = b.rate.unwrap_or(RateParams {
            interval_us: 0,
            tolerance_us: 0,
        });
        self.tolerance_us
            .store(rate.tolerance_us, Ordering::Relaxed);
        self.interval_us.store(rate.interval_us, Ordering::Relaxed);
        self.critical.store(b.critical, Ordering::Relaxed);
        self.max_in_flight
            .store(pack_opt(b.max_in_flight.map(u64::from)), Ordering::Relaxed);
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

    /// What a client is told of a rate: whole calls per whole seconds, never faster than the
    /// rate (a client keeping to it is never limited by the bucket).
    #[test]
    fn a_rate_reads_as_whole_calls_per_whole_seconds_never_faster() {
        let told = |per_second: f64| {
            let (q, w) = RateParams::new(per_second, 1).calls_per_whole_seconds();
            (q, w.as_secs())
        };
        assert_eq!(told(1.0), (1, 1));
        assert_eq!(told(100.0), (100, 1));
        assert_eq!(told(2.5), (2, 1));
        assert_eq!(told(0.1), (1, 10));
        assert_eq!(told(0.3), (1, 4));
        for per_second in [0.001, 0.07, 0.5, 0.9, 1.5, 3.3, 1_000.0, 1e6] {
            let (q, w) = told(per_second);
            assert!(q >= 1 && w >= 1, "{per_second}");
            assert!(
                q as f64 / w as f64 <= per_second * 1.000_001,
                "{per_second}: {q}/{w}"
            );
        }
    }

    #[test]
    fn budgets_round_trip_through_the_atomics() {
        let org = OrgBudget {
            configured_limit: Some(100_000),
            reserve: Amount::Percent(5.5),
            probe_interval: Duration::from_secs(300),
            max_in_flight: Some(25),
        };
        assert_eq!(LiveOrgBudget::new(org).load(), org);
        let auto = OrgBudget {
            configured_limit: None,
            reserve: Amount::Calls(0),
            max_in_flight: None,
            ..org
        };
        assert_eq!(LiveOrgBudget::new(auto).load(), auto);
        let i = IntegrationBudget {
            quota: Some(Amount::Calls(40_000)),
            rate: Some(RateParams::new(20.0, 40)),
            critical: true,
            max_in_flight: Some(4),
        };
        let live = LiveIntegrationBudget::new(i);
        assert_eq!(live.load(), i);
        live.store(IntegrationBudget::default());
        assert_eq!(live.load(), IntegrationBudget::default());
    }

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
