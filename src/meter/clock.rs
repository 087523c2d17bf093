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
//!
//! Monotonic clocks stop while the machine is suspended (a laptop, a paused VM), and the
//! meter's minutes would then trail the real ones by the suspend for the rest of the run: calls
//! aging out of the window late, times an hour behind on the status page. [`follow_suspends`]
//! adds the time spent suspended (`CLOCK_BOOTTIME` minus `CLOCK_MONOTONIC`) once a second;
//! reading it costs the hot path one relaxed load of a value that changes only on a resume.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::sync::watch;
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

/// Milliseconds the machine has spent suspended since boot, as last seen by a new clock or by
/// [`follow_suspends`]; it only grows.
static SUSPENDED_MS: AtomicU64 = AtomicU64::new(0);

/// Source of "now" for the meter. Cheap to clone.
#[derive(Debug, Clone, Copy)]
pub struct Clock {
    base: Instant,
    base_unix_ms: u64,
    /// The time spent suspended, and its value when `base` was taken.
    suspended_ms: &'static AtomicU64,
    base_suspended_ms: u64,
    /// The coarse clock's reading when `base` was taken, in ms.
    #[cfg(all(target_os = "linux", not(test)))]
    coarse_base_ms: u64,
}

impl Clock {
    pub fn new() -> Self {
        Self::following(&SUSPENDED_MS, suspended_since_boot_ms())
    }

    /// A clock that adds the time spent suspended as `suspended_ms` counts it from now on;
    /// `suspended_now`: the time spent suspended so far, which the wall-clock time it starts
    /// from already includes (taken up into `suspended_ms` first, so it is not added again).
    fn following(suspended_ms: &'static AtomicU64, suspended_now: u64) -> Self {
        suspended_ms.fetch_max(suspended_now, Ordering::Relaxed);
        let base_unix_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        Clock {
            base: Instant::now(),
            base_unix_ms,
            suspended_ms,
            base_suspended_ms: suspended_ms.load(Ordering::Relaxed),
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
        let suspended = self
            .suspended_ms
            .load(Ordering::Relaxed)
            .saturating_sub(self.base_suspended_ms);
        #[cfg(all(target_os = "linux", not(test)))]
        let running = coarse_ms().saturating_sub(self.coarse_base_ms);
        #[cfg(not(all(target_os = "linux", not(test))))]
        let running = self.base.elapsed().as_millis() as u64;
        running + suspended
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

/// The time spent suspended since boot, in ms (0 where the kernel does not tell).
fn suspended_since_boot_ms() -> u64 {
    #[cfg(target_os = "linux")]
    {
        use rustix::time::{clock_gettime, ClockId};
        let ms = |t: rustix::time::Timespec| t.tv_sec as u64 * 1_000 + t.tv_nsec as u64 / 1_000_000;
        // Boot time first: a pause between the two reads makes the difference smaller than
        // the truth, never larger (it is only ever raised, see `SUSPENDED_MS`).
        let since_boot = ms(clock_gettime(ClockId::Boottime));
        since_boot.saturating_sub(ms(clock_gettime(ClockId::Monotonic)))
    }
    #[cfg(not(target_os = "linux"))]
    0
}

/// Keeps every [`Clock`] abreast of suspends: checks once a second until `stop`.
pub async fn follow_suspends(mut stop: watch::Receiver<bool>) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    while !*stop.borrow() {
        tokio::select! {
            _ = tick.tick() => {
                SUSPENDED_MS.fetch_max(suspended_since_boot_ms(), Ordering::Relaxed);
            }
            _ = stop.changed() => {}
        }
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

    #[tokio::test(start_paused = true)]
    async fn time_spent_suspended_moves_the_clock_on() {
        let suspended: &'static AtomicU64 = Box::leak(Box::new(AtomicU64::new(0)));
        let clock = Clock::following(suspended, 700);
        let ms = clock.unix_ms();
        tokio::time::advance(Duration::from_secs(60)).await;
        suspended.fetch_max(700 + 3_600_000, Ordering::Relaxed); // an hour's suspend
        assert_eq!(clock.unix_ms() - ms, 60_000 + 3_600_000);
    }

    /// The machine had been suspended an hour before the proxy started: the wall-clock time
    /// the clock starts from includes that hour already, so seeing it later adds nothing.
    #[tokio::test(start_paused = true)]
    async fn a_suspend_before_the_clock_was_made_is_not_added() {
        let suspended: &'static AtomicU64 = Box::leak(Box::new(AtomicU64::new(0)));
        let clock = Clock::following(suspended, 3_600_000);
        let ms = clock.unix_ms();
        suspended.fetch_max(3_600_000, Ordering::Relaxed); // what `follow_suspends` finds
        assert_eq!(clock.unix_ms(), ms);
    }

    /// The real clock and follower, in a process where the kernel says the machine was
    /// suspended an hour before it started: this test binary run again in a Linux time
    /// namespace whose CLOCK_BOOTTIME is an hour ahead of CLOCK_MONOTONIC.
    #[cfg(target_os = "linux")]
    #[test]
    fn the_clock_keeps_to_the_wall_clock_after_an_hours_suspend_before_the_start() {
        let exe = std::env::current_exe().expect("test binary");
        let out = std::process::Command::new("unshare")
            .args(["--user", "--map-root-user", "--time", "--boottime", "3600"])
            .arg(exe)
            .args([
                "meter::clock::tests::the_clock_keeps_to_the_wall_clock",
                "--exact",
                "--nocapture",
            ])
            .output();
        let out = match out {
            Ok(out) if !String::from_utf8_lossy(&out.stderr).starts_with("unshare:") => out,
            // No util-linux, or no user/time namespaces here (a locked-down container).
            _ => return eprintln!("skipped: cannot make a time namespace here"),
        };
        let text = String::from_utf8_lossy(&out.stdout).into_owned()
            + &String::from_utf8_lossy(&out.stderr);
        assert!(text.contains("1 passed"), "{text}");
    }

    /// Run by the test above, in its time namespace (and on its own, where it checks the same
    /// on this machine's own past suspends).
    #[tokio::test]
    async fn the_clock_keeps_to_the_wall_clock() {
        let clock = Clock::new(); // as `app::start` makes it, before the follower runs
        let (stop, stopped) = watch::channel(false);
        let following = tokio::spawn(follow_suspends(stopped));
        tokio::time::sleep(Duration::from_millis(1_200)).await; // its first looks
        let _ = stop.send(true);
        following.await.expect("follow_suspends");
        let wall_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .expect("after 1970")
            .as_millis() as i64;
        let ahead_ms = clock.unix_ms() as i64 - wall_ms;
        assert!(
            ahead_ms.abs() < 1_000,
            "the meter's clock is {ahead_ms} ms off the wall clock; suspended {} ms since boot",
            suspended_since_boot_ms()
        );
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn suspended_time_is_read_from_the_kernel() {
        // This machine may have been suspended before (a VM migrated): the reading is whatever
        // it was, but it is steady between two reads and never goes back.
        let first = suspended_since_boot_ms();
        std::thread::sleep(Duration::from_millis(20));
        let second = suspended_since_boot_ms();
        assert!(
            second + 1 >= first && second <= first + 5,
            "{first} -> {second}"
        );
    }

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
