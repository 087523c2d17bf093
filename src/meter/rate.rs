//! A lock-free token bucket (GCRA: the generic cell rate algorithm) for an integration's `rate`.
//!
//! Instead of a token count that must be refilled, the bucket keeps one number: the
//! "theoretical arrival time" (TAT) at which the bucket would be full again. A call of `n` units
//! at time `t` moves it to `max(TAT, t) + n·T` (T = time per token) and is allowed if that stays
//! within `burst·T` of `t`. One CAS per call, exact under concurrency, no timer.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

#[derive(Debug)]
pub struct TokenBucket {
    /// Microseconds per token.
    interval_us: u64,
    /// Microseconds of burst: `burst · interval`.
    tolerance_us: u64,
    /// Theoretical arrival time, in microseconds of the meter's clock.
    tat_us: AtomicU64,
}

impl TokenBucket {
    pub fn new(per_second: f64, burst: u32) -> Self {
        let interval_us = (1_000_000.0 / per_second.max(1e-6)).round().max(1.0) as u64;
        TokenBucket {
            interval_us,
            tolerance_us: interval_us * u64::from(burst.max(1)),
            tat_us: AtomicU64::new(0),
        }
    }

    /// Microseconds per token.
    pub fn interval_us(&self) -> u64 {
        self.interval_us
    }

    /// Takes `units` tokens at `now_us`, or says how long until they would be there.
    pub fn take(&self, units: u32, now_us: u64) -> Result<(), Duration> {
        let cost = self.interval_us.saturating_mul(u64::from(units));
        let mut tat = self.tat_us.load(Ordering::Acquire);
        loop {
            let next = tat.max(now_us).saturating_add(cost);
            let ahead = next - now_us;
            if ahead > self.tolerance_us {
                return Err(Duration::from_micros(ahead - self.tolerance_us));
            }
            match self
                .tat_us
                .compare_exchange_weak(tat, next, Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) => return Ok(()),
                Err(actual) => tat = actual,
            }
        }
    }

    /// Gives back tokens taken for a call that a later budget refused.
    pub fn give_back(&self, units: u32) {
        let cost = self.interval_us.saturating_mul(u64::from(units));
        let _ = self
            .tat_us
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |tat| {
                Some(tat.saturating_sub(cost))
            });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn burst_then_steady_rate() {
        // 10 per second (one token per 100 ms), burst 3.
        let b = TokenBucket::new(10.0, 3);
        let t0 = 5_000_000;
        for _ in 0..3 {
            assert_eq!(b.take(1, t0), Ok(()));
        }
        // The bucket is empty: the next token comes 100 ms later.
        assert_eq!(b.take(1, t0), Err(Duration::from_millis(100)));
        assert_eq!(b.take(1, t0 + 40_000), Err(Duration::from_millis(60)));
        assert_eq!(b.take(1, t0 + 100_000), Ok(()));
        // After a quiet second the full burst is back, and no more.
        let t1 = t0 + 2_000_000;
        assert_eq!(b.take(3, t1), Ok(()));
        assert!(b.take(1, t1).is_err());
    }

    #[test]
    fn a_call_larger_than_the_burst_waits_for_its_tokens() {
        let b = TokenBucket::new(10.0, 5);
        // 25 units (a composite batch) at once: 20 tokens short, 2 s of refill.
        assert_eq!(b.take(25, 1_000_000), Err(Duration::from_secs(2)));
    }

    #[test]
    fn given_back_tokens_are_usable_again() {
        let b = TokenBucket::new(1.0, 1);
        assert_eq!(b.take(1, 10_000_000), Ok(()));
        assert!(b.take(1, 10_000_000).is_err());
        b.give_back(1);
        assert_eq!(b.take(1, 10_000_000), Ok(()));
    }
}
