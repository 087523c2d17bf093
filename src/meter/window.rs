//! A rolling window of counted calls, kept as one bucket per minute, exact and lock-free.
//!
//! Salesforce blocks calls "until usage for the preceding 24 hours drops below the limit", so a
//! count must age out the minute Salesforce's would. A window of `N` minutes is a ring of `N`
//! buckets; each bucket packs the minute it belongs to and the calls counted in it into one
//! `AtomicU64`, so a rollover (the slot now belongs to a newer minute) is a single
//! compare-and-swap that exactly one thread wins, and the winner alone takes the old calls off the
//! running total. The running total makes reading the window O(1) on the hot path. The ring
//! (11 KiB for 24 hours) is allocated with the first call, so idle integrations cost only the
//! few words of the struct.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

use strength_reduce::StrengthReducedU32;

/// Minutes since the Unix epoch. 32 bits last until the year 10136.
pub type Minute = u32;

/// Packs `(minute, count)` into one word so both change in one atomic step.
#[inline]
fn pack(minute: Minute, count: u32) -> u64 {
    (u64::from(minute) << 32) | u64::from(count)
}

#[inline]
fn unpack(word: u64) -> (Minute, u32) {
    ((word >> 32) as Minute, word as u32)
}

/// Exact count of calls over the last `len` minutes (the current minute included).
///
/// All operations take the current minute from the caller, so the window itself has no clock
/// and its arithmetic is tested with plain numbers.
#[derive(Debug)]
pub struct Window {
    /// The window's length in minutes (`slots.get()`), prepared for `minute % len` by
    /// multiplication: a hardware division costs more than the rest of finding a call's slot,
    /// twice per counted call (integration and org).
    slots: StrengthReducedU32,
    /// The ring of buckets, allocated by the first call counted.
    ring: OnceLock<Box<[AtomicU64]>>,
    /// Sum of the counts of the buckets still inside the window (see `advance`).
    total: AtomicU64,
    /// The newest minute whose expired slot has been swept. Only moves forward.
    swept: AtomicU64,
}

impl Window {
    /// A window of `minutes` buckets (at least one).
    pub fn new(minutes: u32) -> Self {
        Window {
            slots: StrengthReducedU32::new(minutes.max(1)),
            ring: OnceLock::new(),
            total: AtomicU64::new(0),
            swept: AtomicU64::new(0),
        }
    }

    /// Length of the window in minutes.
    #[inline]
    pub fn minutes(&self) -> u32 {
        self.slots.get()
    }

    /// The slot of `minute`, if the ring exists (before the first call nothing is in it).
    #[inline]
    fn slot(&self, minute: Minute) -> Option<&AtomicU64> {
        self.ring
            .get()
            .map(|ring| &ring[(minute % self.slots) as usize])
    }

    /// The slot of `minute`, allocating the ring if this is the first call.
    #[inline]
    fn slot_mut(&self, minute: Minute) -> &AtomicU64 {
        let ring = self
            .ring
            .get_or_init(|| (0..self.minutes()).map(|_| AtomicU64::new(0)).collect());
        &ring[(minute % self.slots) as usize]
    }

    /// Takes the calls of minutes that left the window off the total.
    ///
    /// Cheap when nothing changed (one load). When the minute moved on, the thread that moves
    /// `swept` forward clears the slots of the minutes in between; a slot is cleared by a CAS, so
    /// a concurrent `add` that rolls the same slot over cannot make the old count vanish twice.
    #[inline]
    pub fn advance(&self, now: Minute) {
        let swept = self.swept.load(Ordering::Acquire);
        if swept >= u64::from(now) {
            return;
        }
        if self
            .swept
            .compare_exchange(swept, u64::from(now), Ordering::AcqRel, Ordering::Acquire)
            .is_err()
        {
            return; // another thread sweeps
        }
        if self.ring.get().is_none() {
            return; // nothing was ever counted
        }
        // At most one full turn of the ring needs clearing, however long we were idle.
        let from = (swept + 1).max(u64::from(now).saturating_sub(u64::from(self.minutes()) - 1));
        for minute in from..=u64::from(now) {
            self.expire_slot(minute as Minute);
        }
    }

    /// Rolls the slot of `minute` over to `minute` if it still holds an older minute.
    fn expire_slot(&self, minute: Minute) {
        let Some(slot) = self.slot(minute) else {
            return;
        };
        let mut word = slot.load(Ordering::Acquire);
        loop {
            let (stamp, count) = unpack(word);
            if stamp >= minute {
                return;
            }
            match slot.compare_exchange_weak(
                word,
                pack(minute, 0),
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => {
                    if count > 0 {
                        self.total.fetch_sub(u64::from(count), Ordering::AcqRel);
                    }
                    return;
                }
                Err(actual) => word = actual,
            }
        }
    }

    /// Counts `units` calls at minute `now`.
    #[inline]
    pub fn add(&self, now: Minute, units: u32) {
        if units == 0 {
            return;
        }
        self.advance(now);
        self.total.fetch_add(u64::from(units), Ordering::AcqRel);
        self.add_to_bucket(now, units);
    }

    /// Counts `units` calls at minute `now` only if the window total stays within `cap`.
    ///
    /// The check and the increment are one CAS on the total, so concurrent callers can never
    /// overshoot the cap together. Returns the total after counting, or `Err(total)` when the
    /// call does not fit.
    #[inline]
    pub fn try_add(&self, now: Minute, units: u32, cap: u64) -> Result<u64, u64> {
        self.advance(now);
        let units64 = u64::from(units);
        let mut total = self.total.load(Ordering::Acquire);
        loop {
            let next = total.saturating_add(units64);
            if next > cap {
                return Err(total);
            }
            match self
                .total
                .compare_exchange_weak(total, next, Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) => break,
                Err(actual) => total = actual,
            }
        }
        self.add_to_bucket(now, units);
        Ok(total + units64)
    }

    fn add_to_bucket(&self, now: Minute, units: u32) {
        let slot = self.slot_mut(now);
        let mut word = slot.load(Ordering::Acquire);
        loop {
            let (stamp, count) = unpack(word);
            let next = if stamp >= now {
                // Same minute (or, with a clock read a moment earlier than another thread's,
                // a newer one: the call still belongs in the window, one minute later).
                pack(stamp, count.saturating_add(units))
            } else {
                pack(now, units)
            };
            match slot.compare_exchange_weak(word, next, Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => {
                    if stamp < now && count > 0 {
                        // We rolled an expired slot over before the sweeper reached it.
                        self.total.fetch_sub(u64::from(count), Ordering::AcqRel);
                    }
                    return;
                }
                Err(actual) => word = actual,
            }
        }
    }

    /// Gives back `units` counted at minute `at` (the call never reached Salesforce).
    /// Nothing happens if that minute has already left the window.
    pub fn refund(&self, at: Minute, units: u32) {
        if units == 0 {
            return;
        }
        let Some(slot) = self.slot(at) else { return };
        let mut word = slot.load(Ordering::Acquire);
        loop {
            let (stamp, count) = unpack(word);
            if stamp != at || count == 0 {
                return;
            }
            let give = count.min(units);
            match slot.compare_exchange_weak(
                word,
                pack(stamp, count - give),
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => {
                    self.total.fetch_sub(u64::from(give), Ordering::AcqRel);
                    return;
                }
                Err(actual) => word = actual,
            }
        }
    }

    /// Calls counted in the window ending at minute `now`.
    #[inline]
    pub fn total(&self, now: Minute) -> u64 {
        self.advance(now);
        self.total.load(Ordering::Acquire)
    }

    /// How many minutes until at least `needed` calls have aged out of the window, seen from
    /// `now`; `None` if fewer than `needed` calls are in it. Used for `Retry-After`: it scans
    /// the ring, so it is for the limited path, not for every call.
    pub fn minutes_until_freed(&self, now: Minute, needed: u64) -> Option<u32> {
        self.advance(now);
        let len = self.minutes();
        let oldest = now.saturating_sub(len - 1);
        let mut freed = 0u64;
        for minute in oldest..=now {
            let (stamp, count) = unpack(self.slot(minute)?.load(Ordering::Acquire));
            if stamp == minute {
                freed += u64::from(count);
            }
            if freed >= needed && needed > 0 {
                // The calls of `minute` leave the window when `minute + len` begins.
                return Some(minute + len - now);
            }
        }
        None
    }

    /// Puts back counts saved before a restart; minutes outside the window ending at `now`
    /// are skipped. Meant for a window that has counted nothing yet.
    pub fn restore(&self, now: Minute, buckets: &[(Minute, u32)]) {
        self.advance(now);
        let len = self.minutes();
        for &(minute, count) in buckets {
            if minute <= now && minute + len > now && count > 0 {
                self.total.fetch_add(u64::from(count), Ordering::AcqRel);
                self.add_to_bucket(minute, count);
            }
        }
    }

    /// Per-minute counts still in the window, oldest first, for snapshots.
    pub fn buckets(&self, now: Minute) -> Vec<(Minute, u32)> {
        self.advance(now);
        let len = self.minutes();
        (now.saturating_sub(len - 1)..=now)
            .filter_map(|minute| {
                let (stamp, count) = unpack(self.slot(minute)?.load(Ordering::Acquire));
                (stamp == minute && count > 0).then_some((minute, count))
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const T0: Minute = 29_000_000; // some minute in 2025

    #[test]
    fn counts_age_out_after_the_window() {
        let w = Window::new(1440);
        w.add(T0, 3); // 05:00 Wednesday in Salesforce's example
        w.add(T0 + 18 * 60, 2); // 23:00
        assert_eq!(w.total(T0 + 18 * 60), 5);
        // Still inside the 24 h: the minute 1439 after T0 is the window's last minute for T0.
        assert_eq!(w.total(T0 + 1439), 5);
        // At T0 + 24 h the 05:00 calls have aged out.
        assert_eq!(w.total(T0 + 1440), 2);
        assert_eq!(w.total(T0 + 18 * 60 + 1440), 0);
    }

    #[test]
    fn restore_keeps_only_what_is_still_in_the_window() {
        let w = Window::new(60);
        w.restore(
            T0 + 100,
            &[(T0, 5), (T0 + 41, 2), (T0 + 99, 3), (T0 + 101, 9)],
        );
        assert_eq!(w.total(T0 + 100), 5);
        assert_eq!(w.buckets(T0 + 100), vec![(T0 + 41, 2), (T0 + 99, 3)]);
        assert_eq!(w.total(T0 + 101), 3);
    }

    #[test]
    fn the_ring_is_allocated_by_the_first_call() {
        let w = Window::new(1440);
        assert_eq!(w.total(T0), 0);
        assert!(w.ring.get().is_none(), "reading does not allocate");
        assert_eq!(w.minutes_until_freed(T0, 1), None);
        w.refund(T0, 1);
        assert!(w.ring.get().is_none());
        w.add(T0 + 5, 1);
        assert_eq!(w.total(T0 + 5), 1);
        assert_eq!(w.total(T0 + 5 + 1440), 0);
    }

    #[test]
    fn long_idle_clears_everything_once() {
        let w = Window::new(10);
        for m in 0..10 {
            w.add(T0 + m, 1);
        }
        assert_eq!(w.total(T0 + 9), 10);
        assert_eq!(w.total(T0 + 10_000), 0);
        w.add(T0 + 10_000, 4);
        assert_eq!(w.total(T0 + 10_000), 4);
    }

    #[test]
    fn try_add_never_exceeds_the_cap() {
        let w = Window::new(5);
        assert_eq!(w.try_add(T0, 3, 4), Ok(3));
        assert_eq!(w.try_add(T0, 2, 4), Err(3));
        assert_eq!(w.try_add(T0, 1, 4), Ok(4));
        // Five minutes on, the first calls are gone.
        assert_eq!(w.try_add(T0 + 5, 4, 4), Ok(4));
    }

    #[test]
    fn refund_takes_back_only_what_is_still_in_the_window() {
        let w = Window::new(3);
        w.add(T0, 2);
        w.refund(T0, 1);
        assert_eq!(w.total(T0), 1);
        w.add(T0 + 3, 1); // T0's slot is reused
        w.refund(T0, 1); // too late: nothing to give back
        assert_eq!(w.total(T0 + 3), 1);
    }

    #[test]
    fn minutes_until_freed_points_at_the_oldest_calls() {
        let w = Window::new(60);
        w.add(T0, 1);
        w.add(T0 + 10, 1);
        // At T0+20 the first call leaves at T0+60: 40 minutes.
        assert_eq!(w.minutes_until_freed(T0 + 20, 1), Some(40));
        assert_eq!(w.minutes_until_freed(T0 + 20, 2), Some(50));
        assert_eq!(w.minutes_until_freed(T0 + 20, 3), None);
    }

    #[test]
    fn concurrent_adds_are_exact() {
        let w = std::sync::Arc::new(Window::new(3));
        let threads: Vec<_> = (0..4)
            .map(|t| {
                let w = w.clone();
                std::thread::spawn(move || {
                    for i in 0..10_000u32 {
                        // Threads straddle minute boundaries to race sweeps against adds.
                        w.add(T0 + (i / 2_500) + t % 2, 1);
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().expect("thread");
        }
        let expected: u64 = w.buckets(T0 + 4).iter().map(|&(_, c)| u64::from(c)).sum();
        assert_eq!(w.total(T0 + 4), expected);
    }

    #[test]
    fn concurrent_try_add_stops_exactly_at_the_cap() {
        let w = std::sync::Arc::new(Window::new(1440));
        let ok = std::sync::Arc::new(AtomicU64::new(0));
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let (w, ok) = (w.clone(), ok.clone());
                std::thread::spawn(move || {
                    for _ in 0..1_000 {
                        if w.try_add(T0, 1, 1_000).is_ok() {
                            ok.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().expect("thread");
        }
        assert_eq!(ok.load(Ordering::Relaxed), 1_000);
        assert_eq!(w.total(T0), 1_000);
    }

    proptest! {
        /// The window agrees with a naive list of (minute, units) for any sequence of calls.
        #[test]
        fn matches_a_naive_model(len in 1u32..30, steps in proptest::collection::vec((0u32..5, 0u32..4, any::<bool>()), 1..200)) {
            let w = Window::new(len);
            let mut model: Vec<(Minute, u32)> = Vec::new();
            let mut now = T0;
            for (dt, units, refund) in steps {
                now += dt;
                if refund {
                    if let Some(&(at, u)) = model.last() {
                        w.refund(at, u);
                        if at + len > now { model.pop(); }
                    }
                } else {
                    w.add(now, units);
                    if units > 0 { model.push((now, units)); }
                }
                let expected: u64 = model.iter().filter(|&&(m, _)| m + len > now).map(|&(_, u)| u64::from(u)).sum();
                prop_assert_eq!(w.total(now), expected);
            }
        }
    }
}
