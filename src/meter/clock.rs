//! Wall-clock minutes for the windows, read from a monotonic clock.
//!
//! Windows are stamped with minutes since the Unix epoch so that a snapshot taken before a
//! restart means the same minutes after it. The time is the wall-clock time at start-up plus a
//! monotonic clock's progress, so a clock step cannot double-count a minute.
//!
//! Minutes and report times come from the kernel's coarse monotonic clock (a few ms of
//! resolution, plenty for minute windows, and several times cheaper to read than the precise
//! one, which on virtual machines costs ~25 ns: half of deciding a call). Rate limits need
//! microseconds and read `tokio::time::Instant`. Unit tests pause and advance tokio's clock,
//! which the coarse clock cannot follow, so under `cfg(test)` everything reads tokio's.

use std::time::{SystemTime, UNIX_EPOCH};
use tokio::time::Instant;

use super::window::Minute;

/// How far `minute()` and `unix_ms()` may trail the precise clock that tokio's timers run on:
/// one kernel tick of the coarse clock (4 ms at the common HZ = 250, 10 ms at HZ = 100). A
/// wait computed from them up to a minute boundary adds this, or a timer could fire before
/// the meter sees the new minute and the waiter would go round again.
#[cfg(all(target_os = "linux", not(test)))]
pub const MAX_LAG: std::time::Duration = std::time::Duration::from_millis(10);
#[cfg(not(all(target_os = "linux", not(test))))]
pub const MAX_LAG: std::time::Duration = std::time::Duration::ZERO;

/// Source of "now" for the meter. Cheap to clone.
#[derive(Debug, Clone, Copy)]
pub struct Clock {
    base: Instant,
    base_unix_ms: u64,
    /// The coarse clock's reading when `base` was taken, in ms.
    #[cfg(all(target_os = "linux", not(test)))]
    coarse_base_ms: u64,
}

impl Clock {
    pub fn new() -> Self {
        let base_unix_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        Clock {
            base: Instant::now(),
            base_unix_ms,
            #[cfg(all(target_os = "linux", not(test)))]
            coarse_base_ms: coarse_ms(),
        }
    }

    /// Milliseconds since the Unix epoch.
    #[inline]
    pub fn unix_ms(&self) -> u64 {
        self.base_unix_ms + self.elapsed_ms()
    }

    #[inline]
    fn elapsed_ms(&self) -> u64 {
        #[cfg(all(target_os = "linux", not(test)))]
        return coarse_ms().saturating_sub(self.coarse_base_ms);
        #[cfg(not(all(target_os = "linux", not(test))))]
        return self.base.elapsed().as_millis() as u64;
    }

    /// Microseconds since this clock was made: monotonic, for rate limits.
    #[inline]
    pub fn micros(&self) -> u64 {
        self.base.elapsed().as_micros() as u64
    }

    /// Minutes since the Unix epoch.
    #[inline]
    pub fn minute(&self) -> Minute {
        (self.unix_ms() / 60_000) as Minute
    }
}

/// `CLOCK_MONOTONIC_COARSE` in milliseconds: a vDSO read of the time of the last tick.
#[cfg(target_os = "linux")]
#[inline]
fn coarse_ms() -> u64 {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::MonotonicCoarse);
    t.tv_sec as u64 * 1_000 + t.tv_nsec as u64 / 1_000_000
}

impl Default for Clock {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test(start_paused = true)]
    async fn follows_paused_time() {
        let clock = Clock::new();
        let (ms, minute) = (clock.unix_ms(), clock.minute());
        tokio::time::advance(Duration::from_secs(120)).await;
        assert_eq!(clock.unix_ms() - ms, 120_000);
        assert_eq!(clock.minute() - minute, 2);
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn coarse_clock_keeps_pace_with_the_precise_one() {
        use std::time::Instant;
        // Each coarse reading is bracketed by precise ones, so a thread descheduled between
        // two readings (tests run in parallel) widens the bracket instead of failing the test.
        let read = || {
            let before = Instant::now();
            let coarse = coarse_ms();
            (before, coarse, Instant::now())
        };
        let (start_before, start, start_after) = read();
        std::thread::sleep(Duration::from_millis(30));
        let (end_before, end, end_after) = read();
        let coarse = end - start;
        let shortest = end_before.duration_since(start_after).as_millis() as u64;
        let longest = end_after.duration_since(start_before).as_millis() as u64;
        // Each coarse reading lags by at most one tick (1 to 10 ms by kernel).
        assert!(
            coarse + 20 >= shortest && coarse <= longest + 20,
            "coarse {coarse} ms, precise between {shortest} and {longest} ms"
        );
        assert!(coarse >= 10, "coarse clock did not advance: {coarse} ms");
    }
}
