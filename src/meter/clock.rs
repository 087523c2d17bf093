//! Wall-clock minutes for the windows, read from a monotonic clock.
//!
//! Windows are stamped with minutes since the Unix epoch so that a snapshot taken before a
//! restart means the same minutes after it. The time is read from `tokio::time::Instant` plus
//! the wall-clock time at start-up: monotonic (a clock step cannot double-count a minute), one
//! vDSO call per read, and tests can pause and advance it.

use std::time::{SystemTime, UNIX_EPOCH};
use tokio::time::Instant;

use super::window::Minute;

/// Source of "now" for the meter. Cheap to clone.
#[derive(Debug, Clone, Copy)]
pub struct Clock {
    base: Instant,
    base_unix_ms: u64,
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
        }
    }

    /// Milliseconds since the Unix epoch.
    #[inline]
    pub fn unix_ms(&self) -> u64 {
        self.base_unix_ms + self.base.elapsed().as_millis() as u64
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
}
