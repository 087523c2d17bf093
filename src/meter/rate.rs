//! A lock-free token bucket (GCRA: the generic cell rate algorithm) for an integration's `rate`.
//!
//! Instead of a token count that must be refilled, the bucket keeps one number: the
//! "theoretical arrival time" (TAT) at which the bucket would be full again. A call of `n` units
//! at time `t` moves it to `max(TAT, t) + n·T` (T = time per token) and is allowed if that stays
//! within `burst·T` of `t`. One CAS per call, exact under concurrency, no timer.
//!
//! A call of more units than the burst (a composite batch of 25 under a burst of 5) could
//! never stay within it: such a call goes once the bucket is full, and the calls after it wait
//! for the tokens it took beyond the burst, so the rate holds over time.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use super::budget::RateParams;

/// The state of a token bucket; its settings (`RateParams`) come with each call, so that a
/// reload can change them without losing the state.
#[derive(Debug, Default)]
pub struct TokenBucket {
    /// Theoretical arrival time, in microseconds of the meter's clock.
    tat_us: AtomicU64,
}

impl TokenBucket {
    /// Takes `units` tokens at `now_us`, or says how long until they would be there.
    pub fn take(&self, rate: RateParams, units: u32, now_us: u64) -> Result<(), Duration> {
        let cost = rate.interval_us.saturating_mul(u64::from(units));
        let mut tat = self.tat_us.load(Ordering::Acquire);
        loop {
            let next = tat.max(now_us).saturating_add(cost);
            let ahead = next - now_us;
            if ahead > rate.tolerance_us {
                if cost <= rate.tolerance_us {
                    return Err(Duration::from_micros(ahead - rate.tolerance_us));
                }
                if tat > now_us {
                    // Larger than the burst: it waits for the bucket to be full.
                    return Err(Duration::from_micros(tat - now_us));
                }
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

    /// A full bucket again (a reload changed the rate).
    pub fn reset(&self) {
        self.tat_us.store(0, Ordering::Release);
    }

    /// Gives back tokens taken for a call that a later budget refused.
    pub fn give_back(&self, rate: RateParams, units: u32) {
        let cost = rate.interval_us.saturating_mul(u64::from(units));
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
        let (b, r) = (TokenBucket::default(), RateParams::new(10.0, 3));
        let t0 = 5_000_000;
        for _ in 0..3 {
            assert_eq!(b.take(r, 1, t0), Ok(()));
        }
        // The bucket is empty: the next token comes 100 ms later.
        assert_eq!(b.take(r, 1, t0), Err(Duration::from_millis(100)));
        assert_eq!(b.take(r, 1, t0 + 40_000), Err(Duration::from_millis(60)));
        assert_eq!(b.take(r, 1, t0 + 100_000), Ok(()));
        // After a quiet second the full burst is back, and no more.
        let t1 = t0 + 2_000_000;
        assert_eq!(b.take(r, 3, t1), Ok(()));
        assert!(b.take(r, 1, t1).is_err());
    }

    #[test]
    fn a_call_larger_than_the_burst_waits_for_its_tokens() {
        let (b, r) = (TokenBucket::default(), RateParams::new(10.0, 5));
        let t0 = 10_000_000;
        // One call in the last 100 ms: 25 units (a composite batch, more than the burst of
        // 5) go once the bucket is full again.
        assert_eq!(b.take(r, 1, t0), Ok(()));
        assert_eq!(b.take(r, 25, t0), Err(Duration::from_millis(100)));
        assert_eq!(b.take(r, 25, t0 + 100_000), Ok(()));
        // It took 20 tokens beyond the burst: the next call waits for those and one more.
        let t1 = t0 + 100_000;
        assert_eq!(b.take(r, 1, t1), Err(Duration::from_millis(2_100)));
        assert_eq!(b.take(r, 1, t1 + 2_100_000), Ok(()));
        // A full bucket lets it through at once.
        let t2 = t1 + 60_000_000;
        assert_eq!(b.take(r, 25, t2), Ok(()));
    }

    #[test]
    fn given_back_tokens_are_usable_again() {
        let (b, r) = (TokenBucket::default(), RateParams::new(1.0, 1));
        assert_eq!(b.take(r, 1, 10_000_000), Ok(()));
        assert!(b.take(r, 1, 10_000_000).is_err());
        b.give_back(r, 1);
        assert_eq!(b.take(r, 1, 10_000_000), Ok(()));
    }
}
