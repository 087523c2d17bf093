//! A rolling window of counted calls, kept as one bucket per minute, exact and lock-free.
//!
//! Salesforce blocks calls "until usage for the preceding 24 hours drops below the limit", so a
//! count must age out the minute Salesforce's would. A window of `N` minutes is a ring of `N`
//! buckets; each bucket packs the minute it belongs to and the calls counted in it into one
//! `AtomicU64`, so a rollover (the slot now belongs to a newer minute) is a single
//! compare-and-swap that exactly one thread wins, and the winner alone counts the old calls as
//! expired. The window's total is two running sums, the calls ever added (less refunds) and the
//! calls ever expired: reading it is O(1), and counting a call moves only the first, which
//! doubles as the count of calls ever made that the org's usage estimate needs.
//!
//! The newest minute's bucket (the head) sits beside the sums instead of in the ring, so that
//! counting a call touches only the window's own few words: with thousands of integrations
//! the ring's slot was a cache miss of its own on every call. When a newer minute begins, the
//! thread that rolls the head over files the old minute's count into the ring. A call whose
//! minute was read a moment before another thread rolled the head over counts in the newer
//! minute: it leaves the window at most a minute late, never early. The ring
//! (11 KiB for 24 hours) is allocated when a minute is first filed, so idle integrations cost
//! only the few words of the struct.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

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

/// The calls a bucket word holds for `minute` (0 if it holds another minute).
fn count_of(word: u64, minute: Minute) -> u32 {
    let (stamp, count) = unpack(word);
    if stamp == minute {
        count
    } else {
        0
    }
}

/// Where the calls a bucket gives up go: out of the window by age, or back to the caller.
#[derive(Clone, Copy)]
enum Taken {
    Expired,
    Refunded,
}

/// A window's two running sums, read together (see `Window::try_add_with`).
#[derive(Clone, Copy, Debug)]
pub struct Sums {
    /// Calls ever counted, less refunds.
    pub added: u64,
    /// Calls ever expired.
    pub expired: u64,
}

impl Sums {
    /// Calls inside the window.
    #[inline]
    pub fn total(self) -> u64 {
        self.added.saturating_sub(self.expired)
    }
}

/// Exact count of calls over the last `minutes` minutes, to the minute. Buckets cannot tell
/// where in its minute a call came, and Salesforce counts a call for the 24 hours after it to
/// the second: so a call stays until the minute `minutes` after its own has ended, at least
/// `minutes` and at most one minute more, rather than leaving up to a minute early (when budget
/// Salesforce has not yet freed would be handed out). The ring has a bucket for that extra
/// minute.
///
/// All operations take the current minute from the caller, so the window itself has no clock
/// and its arithmetic is tested with plain numbers.
#[derive(Debug)]
pub struct Window {
    /// The newest minute counted and its calls, packed (see the module docs). Its minute only
    /// moves forward.
    head: AtomicU64,
    /// Calls ever counted, less refunds. `added - expired` is the window's total: the sum of
    /// the head and the ring.
    added: AtomicU64,
    /// Calls ever taken off as their minute left the window (see `advance`).
    expired: AtomicU64,
    /// The newest minute whose expired slot has been swept. Only moves forward.
    swept: AtomicU64,
    /// Buckets in the window: its length in minutes, plus the minute a call may stay beyond.
    span: u32,
    /// The ring of buckets of the minutes before the head's, allocated by the first one filed.
    ring: OnceLock<Box<[AtomicU64]>>,
}

impl Window {
    /// A window of `minutes` buckets (at least one).
    pub fn new(minutes: u32) -> Self {
        Window {
            head: AtomicU64::new(0),
            added: AtomicU64::new(0),
            expired: AtomicU64::new(0),
            swept: AtomicU64::new(0),
            span: minutes.max(1) + 1,
            ring: OnceLock::new(),
        }
    }

    /// Length of the window in minutes.
    #[inline]
    pub fn minutes(&self) -> u32 {
        self.span - 1
    }

    /// Minutes a call can be in the window: calls of `now - span` and older have left it.
    #[inline]
    fn span(&self) -> u32 {
        self.span
    }

    /// The slot of `minute`, if the ring exists (before a minute is filed nothing is in it).
    #[inline]
    fn slot(&self, minute: Minute) -> Option<&AtomicU64> {
        self.ring
            .get()
            .map(|ring| &ring[(minute % self.span) as usize])
    }

    /// The slot of `minute`, allocating the ring if this is the first minute filed.
    fn slot_mut(&self, minute: Minute) -> &AtomicU64 {
        let ring = self
            .ring
            .get_or_init(|| (0..self.span()).map(|_| AtomicU64::new(0)).collect());
        &ring[(minute % self.span) as usize]
    }

    /// Whether calls of `minute` are still inside the window ending at `now`.
    #[inline]
    fn inside(&self, minute: Minute, now: Minute) -> bool {
        minute <= now && u64::from(minute) + u64::from(self.span()) > u64::from(now)
    }

    /// Calls the ring holds for `minute`.
    fn ring_count(&self, minute: Minute) -> u32 {
        self.slot(minute)
            .map_or(0, |slot| count_of(slot.load(Ordering::Acquire), minute))
    }

    /// Counts the calls of minutes that left the window as expired.
    ///
    /// Cheap when nothing changed (one load). When the minute moved on, the thread that moves
    /// `swept` forward clears the head if its minute left the window and the ring slots of the
    /// minutes in between; each is cleared by a CAS, so a concurrent `add` that rolls the same
    /// bucket over cannot make the old count vanish twice.
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
        self.expire_head(now);
        if self.ring.get().is_none() {
            return; // nothing was ever filed
        }
        // At most one full turn of the ring needs clearing, however long we were idle.
        let len = u64::from(self.span());
        let from = (swept + 1).max(u64::from(now).saturating_sub(len - 1));
        for minute in from..=u64::from(now) {
            self.expire_slot(minute as Minute);
        }
    }

    /// Empties the head if its minute left the window ending at `now` (an idle window: a busy
    /// one rolls its head over first).
    fn expire_head(&self, now: Minute) {
        self.take(&self.head, Taken::Expired, |stamp, count| {
            (count > 0 && stamp <= now && !self.inside(stamp, now)).then_some(count)
        });
    }

    /// Lowers the count of `bucket` by what `amount(minute, count)` says (`None`: nothing) in
    /// one CAS that keeps the bucket's minute, and the total with it. Returns what it took.
    fn take(
        &self,
        bucket: &AtomicU64,
        why: Taken,
        amount: impl Fn(Minute, u32) -> Option<u32>,
    ) -> u32 {
        let mut word = bucket.load(Ordering::Acquire);
        loop {
            let (stamp, count) = unpack(word);
            let Some(give) = amount(stamp, count) else {
                return 0;
            };
            match bucket.compare_exchange_weak(
                word,
                pack(stamp, count - give),
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => {
                    match why {
                        Taken::Expired => self.expire(give),
                        Taken::Refunded => {
                            self.added.fetch_sub(u64::from(give), Ordering::AcqRel);
                        }
                    }
                    return give;
                }
                Err(actual) => word = actual,
            }
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
                    self.expire(count);
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
        self.added.fetch_add(u64::from(units), Ordering::AcqRel);
        self.add_to_head(now, units);
    }

    /// Counts `units` calls at minute `now` only if the window total stays within `cap`.
    /// Returns the total after counting, or `Err(total)` when the call does not fit.
    #[inline]
    pub fn try_add(&self, now: Minute, units: u32, cap: u64) -> Result<u64, u64> {
        let units64 = u64::from(units);
        self.try_add_with(now, units, |sums| {
            let total = sums.total();
            if total.saturating_add(units64) > cap {
                Err(total)
            } else {
                Ok(total + units64)
            }
        })
    }

    /// Counts `units` calls at minute `now` if `check` accepts the window's sums as they are
    /// before the call; returns what `check` says.
    ///
    /// The check and the increment are one CAS on `added`, so concurrent callers can never
    /// overshoot a cap together. `expired` is read once, before: a minute that expires during
    /// the check only makes the total seen larger than it is (a call may be refused that just
    /// fitted, none is let through that did not).
    #[inline]
    pub fn try_add_with<T, E>(
        &self,
        now: Minute,
        units: u32,
        check: impl Fn(Sums) -> Result<T, E>,
    ) -> Result<T, E> {
        self.advance(now);
        let expired = self.expired.load(Ordering::Acquire);
        let mut added = self.added.load(Ordering::Acquire);
        let fits = loop {
            let fits = check(Sums { added, expired })?;
            match self.added.compare_exchange_weak(
                added,
                added + u64::from(units),
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => break fits,
                Err(actual) => added = actual,
            }
        };
        if units > 0 {
            self.add_to_head(now, units);
        }
        Ok(fits)
    }

    /// Counts `calls` that left the window.
    fn expire(&self, calls: u32) {
        if calls > 0 {
            self.expired.fetch_add(u64::from(calls), Ordering::AcqRel);
        }
    }

    /// Puts `units` (already in the total) into the head, rolling it over to `now` if it holds
    /// an older minute; the thread whose CAS rolls it files the old minute into the ring.
    #[inline]
    fn add_to_head(&self, now: Minute, units: u32) {
        let mut word = self.head.load(Ordering::Acquire);
        loop {
            let (stamp, count) = unpack(word);
            let next = if stamp >= now {
                // Same minute (or, with a clock read a moment earlier than another thread's,
                // a newer one: the call still belongs in the window, one minute later).
                pack(stamp, count.saturating_add(units))
            } else {
                pack(now, units)
            };
            match self
                .head
                .compare_exchange_weak(word, next, Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) => {
                    if stamp < now && count > 0 {
                        self.file(stamp, count);
                    }
                    return;
                }
                Err(actual) => word = actual,
            }
        }
    }

    /// Adds `count` calls of `minute` (already in the total) to the ring: an old head's, or
    /// restored ones. If the minute's slot already belongs to a newer minute, `minute` has
    /// left the window and its calls come off the total instead.
    fn file(&self, minute: Minute, count: u32) {
        let slot = self.slot_mut(minute);
        let mut word = slot.load(Ordering::Acquire);
        loop {
            let (stamp, old) = unpack(word);
            let next = match stamp.cmp(&minute) {
                std::cmp::Ordering::Greater => {
                    self.expire(count);
                    return;
                }
                std::cmp::Ordering::Equal => pack(minute, old.saturating_add(count)),
                // The slot's minute is a whole window older than `minute`: it has expired.
                std::cmp::Ordering::Less => pack(minute, count),
            };
            match slot.compare_exchange_weak(word, next, Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => {
                    if stamp < minute {
                        self.expire(old);
                    }
                    break;
                }
                Err(actual) => word = actual,
            }
        }
        // A sweep may have passed this minute while its calls were on their way here: one
        // that ran before the ring existed had no slot to clear. Calls of a minute that left
        // the window come back out as expired.
        let newest = self.swept.load(Ordering::Acquire) as Minute;
        if !self.inside(minute, newest.max(minute)) {
            self.take(slot, Taken::Expired, |stamp, count| {
                (stamp == minute && count > 0).then_some(count)
            });
        }
    }

    /// Gives back `units` counted at minute `at` (the call never reached Salesforce).
    /// Nothing happens if that minute has already left the window. A refund that meets the
    /// head in the instant between its roll-over and the filing of its old minute finds the
    /// calls in neither place and is dropped: the window then over-counts, it never
    /// under-counts.
    pub fn refund(&self, at: Minute, units: u32) {
        // The head first: it holds the newest minute, the one most refunds are for.
        let of_at = |left: u32| {
            move |stamp: Minute, count: u32| (stamp == at && count > 0).then(|| count.min(left))
        };
        let left = units - self.take(&self.head, Taken::Refunded, of_at(units));
        if left > 0 {
            if let Some(slot) = self.slot(at) {
                self.take(slot, Taken::Refunded, of_at(left));
            }
        }
    }

    /// Calls counted in the window ending at minute `now`.
    #[inline]
    pub fn total(&self, now: Minute) -> u64 {
        self.advance(now);
        self.sums().total()
    }

    /// Calls ever counted in this window, less refunds: it only grows but by a refund, so the
    /// difference of two readings is the calls counted in between.
    #[inline]
    pub fn added(&self) -> u64 {
        self.added.load(Ordering::Acquire)
    }

    /// Both running sums as the last count left them (each count moves the window on to its
    /// minute); `expired` is read first, so a minute expiring in between makes the total larger
    /// than it is, never smaller.
    #[inline]
    pub fn sums(&self) -> Sums {
        let expired = self.expired.load(Ordering::Acquire);
        Sums {
            added: self.added.load(Ordering::Acquire),
            expired,
        }
    }

    /// How many minutes until at least `needed` calls have aged out of the window, seen from
    /// `now`; `None` if fewer than `needed` calls are in it. Used for `Retry-After`: it scans
    /// the ring, so it is for the limited path, not for every call.
    pub fn minutes_until_freed(&self, now: Minute, needed: u64) -> Option<u32> {
        self.advance(now);
        let len = self.span();
        let oldest = now.saturating_sub(len - 1);
        let mut freed = 0u64;
        for minute in oldest..=now {
            let head = count_of(self.head.load(Ordering::Acquire), minute);
            freed += u64::from(self.ring_count(minute)) + u64::from(head);
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
        for &(minute, count) in buckets {
            if self.inside(minute, now) && count > 0 {
                self.added.fetch_add(u64::from(count), Ordering::AcqRel);
                self.file(minute, count);
            }
        }
    }

    /// Per-minute counts still in the window, oldest first, for snapshots.
    pub fn buckets(&self, now: Minute) -> Vec<(Minute, u32)> {
        self.advance(now);
        let len = self.span();
        let mut buckets: Vec<(Minute, u32)> = (now.saturating_sub(len - 1)..=now)
            .filter_map(|minute| {
                let count = self.ring_count(minute);
                (count > 0).then_some((minute, count))
            })
            .collect();
        let (stamp, count) = unpack(self.head.load(Ordering::Acquire));
        if count > 0 && self.inside(stamp, now) {
            match buckets.binary_search_by_key(&stamp, |&(minute, _)| minute) {
                Ok(i) => buckets[i].1 = buckets[i].1.saturating_add(count),
                Err(i) => buckets.insert(i, (stamp, count)),
            }
        }
        buckets
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const T0: Minute = 29_000_000; // some minute in 2025

    impl Window {
        /// A window of `span` buckets: calls of `now - span` and older have left it. The tests
        /// of the ring's arithmetic count in buckets.
        fn with_span(span: u32) -> Window {
            Window::new(span - 1)
        }
    }

    #[test]
    fn counts_age_out_after_the_window() {
        let w = Window::new(1440);
        w.add(T0, 3); // 05:00 Wednesday in Salesforce's example (any second of the minute)
        w.add(T0 + 18 * 60, 2); // 23:00
        assert_eq!(w.total(T0 + 18 * 60), 5);
        // In minute T0 + 24 h a call of 05:00:59 is not yet 24 hours old.
        assert_eq!(w.total(T0 + 1440), 5);
        // At 05:01 on Thursday every 05:00 call is: they have aged out.
        assert_eq!(w.total(T0 + 1441), 2);
        assert_eq!(w.total(T0 + 18 * 60 + 1441), 0);
    }

    #[test]
    fn restore_keeps_only_what_is_still_in_the_window() {
        let w = Window::with_span(60);
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
        let w = Window::with_span(1440);
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
        let w = Window::with_span(10);
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
        let w = Window::with_span(5);
        assert_eq!(w.try_add(T0, 3, 4), Ok(3));
        assert_eq!(w.try_add(T0, 2, 4), Err(3));
        assert_eq!(w.try_add(T0, 1, 4), Ok(4));
        // Five minutes on, the first calls are gone.
        assert_eq!(w.try_add(T0 + 5, 4, 4), Ok(4));
    }

    #[test]
    fn refund_takes_back_only_what_is_still_in_the_window() {
        let w = Window::with_span(3);
        w.add(T0, 2);
        w.refund(T0, 1);
        assert_eq!(w.total(T0), 1);
        w.add(T0 + 3, 1); // T0's slot is reused
        w.refund(T0, 1); // too late: nothing to give back
        assert_eq!(w.total(T0 + 3), 1);
    }

    #[test]
    fn minutes_until_freed_points_at_the_oldest_calls() {
        let w = Window::with_span(60);
        w.add(T0, 1);
        w.add(T0 + 10, 1);
        // At T0+20 the first call leaves at T0+60: 40 minutes.
        assert_eq!(w.minutes_until_freed(T0 + 20, 1), Some(40));
        assert_eq!(w.minutes_until_freed(T0 + 20, 2), Some(50));
        assert_eq!(w.minutes_until_freed(T0 + 20, 3), None);
    }

    /// Runs `op(window, minute, i)` for `i` in `0..iterations` on 4 threads whose minutes
    /// straddle minute boundaries, to race sweeps and roll-overs against counting.
    fn race(w: &std::sync::Arc<Window>, iterations: u32, op: fn(&Window, Minute, u32)) {
        let threads: Vec<_> = (0..4)
            .map(|t| {
                let w = w.clone();
                std::thread::spawn(move || {
                    for i in 0..iterations {
                        op(&w, T0 + (i / 2_500) + t % 2, i);
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().expect("thread");
        }
    }

    #[test]
    fn concurrent_adds_are_exact() {
        let w = std::sync::Arc::new(Window::with_span(3));
        race(&w, 10_000, |w, minute, _| w.add(minute, 1));
        let expected: u64 = w.buckets(T0 + 4).iter().map(|&(_, c)| u64::from(c)).sum();
        assert_eq!(w.total(T0 + 4), expected);
        // At T0 + 4 the window holds T0 + 2 ..= T0 + 4: 2 of the 4 minutes of two threads
        // (2 x 5,000 calls), 3 of the 4 of the other two (2 x 7,500). A thread a minute behind
        // the head counts into the head's newer minute, so calls may leave late, never early.
        assert!((25_000..=40_000).contains(&expected), "{expected}");
    }

    #[test]
    fn concurrent_try_add_stops_exactly_at_the_cap() {
        let w = std::sync::Arc::new(Window::with_span(1440));
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

    #[test]
    fn an_idle_head_ages_out() {
        // One minute counted and nothing since: the calls live in the head alone, with no ring.
        let w = Window::with_span(60);
        w.add(T0, 4);
        assert!(w.ring.get().is_none());
        assert_eq!(w.total(T0 + 59), 4);
        assert_eq!(w.buckets(T0 + 59), vec![(T0, 4)]);
        assert_eq!(w.total(T0 + 60), 0);
        assert_eq!(w.buckets(T0 + 60), vec![]);
        // The next call rolls the emptied head over without counting the old minute again.
        w.add(T0 + 200, 1);
        assert_eq!(w.total(T0 + 200), 1);
    }

    #[test]
    fn a_head_filed_after_its_minute_left_comes_off_the_total() {
        // The race this stands for: one thread sweeps minute T0 + 3 (the head's T0 is still
        // inside at that moment, or another thread has emptied it), while a second thread,
        // already past its own sweep check, rolls over a head that still holds T0.
        let w = Window::with_span(3);
        w.add(T0, 2);
        w.slot_mut(T0 + 3).store(pack(T0 + 3, 0), Ordering::Release);
        w.swept.store(u64::from(T0 + 3), Ordering::Release);
        w.add(T0 + 3, 1);
        assert_eq!(w.total(T0 + 3), 1);
        assert_eq!(w.buckets(T0 + 3), vec![(T0 + 3, 1)]);
    }

    #[test]
    fn restored_and_new_calls_of_one_minute_add_up() {
        let w = Window::with_span(60);
        w.restore(T0, &[(T0 - 1, 3), (T0, 5)]);
        w.add(T0, 2); // the head now holds T0 too, beside the restored slot
        assert_eq!(w.buckets(T0), vec![(T0 - 1, 3), (T0, 7)]);
        assert_eq!(w.minutes_until_freed(T0, 4), Some(60));
        // A refund takes from the head first, then from the ring.
        w.refund(T0, 4);
        assert_eq!(w.total(T0), 6);
        assert_eq!(w.buckets(T0), vec![(T0 - 1, 3), (T0, 3)]);
        // Rolling the head over files its minute into the slot that already holds it.
        w.add(T0 + 1, 1);
        assert_eq!(w.buckets(T0 + 1), vec![(T0 - 1, 3), (T0, 3), (T0 + 1, 1)]);
        assert_eq!(w.total(T0 + 58), 7);
        assert_eq!(w.total(T0 + 59), 4); // T0 - 1 has left
        assert_eq!(w.total(T0 + 60), 1);
    }

    #[test]
    fn concurrent_adds_and_refunds_keep_total_and_buckets_equal() {
        let w = std::sync::Arc::new(Window::with_span(3));
        race(&w, 20_000, |w, minute, i| {
            w.add(minute, 2);
            if i % 2 == 0 {
                w.refund(minute, 1);
            }
        });
        let now = T0 + 9;
        let expected: u64 = w.buckets(now).iter().map(|&(_, c)| u64::from(c)).sum();
        assert_eq!(w.total(now), expected);
        assert!(expected > 0);
        assert_eq!(w.total(now + 3), 0);
    }

    #[test]
    fn try_add_with_counts_only_what_its_check_accepts() {
        let w = Window::with_span(2);
        w.add(T0, 5);
        w.add(T0 + 1, 2);
        // T0's 5 calls have left the window at T0 + 2: the check sees them as expired.
        let seen = w.try_add_with(T0 + 2, 1, |sums| Ok::<_, ()>((sums.added, sums.total())));
        assert_eq!(seen, Ok((7, 2)));
        assert_eq!((w.added(), w.total(T0 + 2)), (8, 3));
        let refused = w.try_add_with(T0 + 2, 4, |sums| Err::<(), _>(sums.total()));
        assert_eq!(refused, Err(3));
        assert_eq!(
            (w.added(), w.total(T0 + 2)),
            (8, 3),
            "a refused call is not counted"
        );
        assert_eq!(w.try_add(T0 + 2, 2, 4), Err(3));
        assert_eq!(w.try_add(T0 + 2, 1, 4), Ok(4));
    }

    proptest! {
        /// The window agrees with a naive list of (minute, units) for any sequence of calls.
        #[test]
        fn matches_a_naive_model(len in 2u32..30, steps in proptest::collection::vec((0u32..5, 0u32..4, any::<bool>()), 1..200)) {
            let w = Window::with_span(len);
            let mut model: Vec<(Minute, u32)> = Vec::new();
            let mut ever = 0u64; // calls added, less the refunds that found their minute
            let mut now = T0;
            for (dt, units, refund) in steps {
                // The last step's `total(now)` swept the window up to here; a refund finds its
                // calls while their minute is not swept out, a moment longer than it counts.
                let swept = now;
                now += dt;
                if refund {
                    if let Some(&(at, u)) = model.last() {
                        w.refund(at, u);
                        if at + len > swept {
                            model.pop();
                            ever -= u64::from(u);
                        }
                    }
                } else {
                    w.add(now, units);
                    ever += u64::from(units);
                    if units > 0 { model.push((now, units)); }
                }
                let expected: u64 = model.iter().filter(|&&(m, _)| m + len > now).map(|&(_, u)| u64::from(u)).sum();
                prop_assert_eq!(w.total(now), expected);
                prop_assert_eq!(w.added(), ever, "aging out does not lower the calls ever added");
            }
        }
    }

    /// A sweep that ran before the window had a ring cleared nothing; the head it did not see
    /// rolling over then files a minute that left the window long ago: its calls must come
    /// out as expired, not count for another turn of the window.
    #[test]
    fn a_head_filed_after_a_sweep_passed_its_minute_is_expired() {
        let w = Window::with_span(1440);
        let t0: Minute = 29_000_000;
        w.add(t0, 2);
        let now = t0 + 2_000;
        // The sweeper's step: `swept` moves on; there is no ring, so nothing else happens.
        w.swept.store(u64::from(now), Ordering::Release);
        // The adder skips its own sweep (swept is current), rolls the head over, files t0.
        w.add(now, 1);
        assert_eq!(w.total(now), 1);
    }
}
