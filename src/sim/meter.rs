//! The rolling window of counted calls: Salesforce's "API requests in the last 24 hours".
//!
//! The window is a queue of timestamped entries, oldest first, with running totals by client and
//! by API family. A call made at millisecond `t` counts while `now < t + window` and ages out
//! exactly one window later (to the millisecond), which is what the tests compare the proxy's
//! per-minute buckets against. Consecutive calls of the same client and API in the same
//! millisecond share one entry, so the queue holds at most one entry per client, API and
//! millisecond, and never more entries than calls.
//!
//! The meter has no lock of its own: the server keeps it in one mutex, and [`Meter::try_count`]
//! does the limit check and the count under that one lock, so concurrent calls can never take
//! the org past its limit.

use std::collections::{BTreeMap, HashMap, VecDeque};

/// The client name of calls added by `SimOptions::used` and `POST /_sim/external`.
pub(super) const EXTERNAL: &str = "external";

/// Distinct client names remembered before further new names are pooled under [`OTHER`]: a
/// client that invents a name per request must not grow the sim's memory without bound.
const MAX_CLIENTS: usize = 4096;
const OTHER: &str = "(other)";

/// The API family of a counted call, as the proxy's `api` metric label names them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Api {
    Rest,
    Composite,
    Bulk,
    Soap,
    Apex,
    /// Calls made outside the proxy, added through the test hooks.
    External,
}

impl Api {
    const ALL: [Api; 6] = [
        Api::Rest,
        Api::Composite,
        Api::Bulk,
        Api::Soap,
        Api::Apex,
        Api::External,
    ];

    pub(super) fn as_str(self) -> &'static str {
        match self {
            Api::Rest => "rest",
            Api::Composite => "composite",
            Api::Bulk => "bulk",
            Api::Soap => "soap",
            Api::Apex => "apex",
            Api::External => "external",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// Calls in the window and the limit, as Salesforce reports them (`api-usage=USED/LIMIT`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Usage {
    pub(super) used: u64,
    pub(super) limit: u64,
}

/// The outcome of [`Meter::try_count`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Admission {
    /// The call was counted; usage includes it.
    Counted(Usage),
    /// The org was at its limit; nothing was counted.
    Rejected(Usage),
}

/// The window's content at one moment, for `/_sim/count`.
pub(super) struct Snapshot {
    pub(super) usage: Usage,
    pub(super) by_client: BTreeMap<String, u64>,
    pub(super) by_api: BTreeMap<String, u64>,
    pub(super) rejected: u64,
    pub(super) debugging: u64,
}

/// Calls counted in one millisecond by one client through one API.
struct Entry {
    at_ms: u64,
    client: u32,
    api: Api,
    calls: u64,
}

pub(super) struct Meter {
    limit: u64,
    window_ms: u64,
    entries: VecDeque<Entry>,
    /// Sum of `entries[..].calls`, kept so the limit check does not walk the queue.
    used: u64,
    /// Calls in the window per interned client id.
    by_client: Vec<u64>,
    /// Interned client names, id → name and name → id: an entry stores 4 bytes, not a String.
    client_names: Vec<String>,
    client_ids: HashMap<String, u32>,
    by_api: [u64; Api::ALL.len()],
    rejected: u64,
    debugging: u64,
}

impl Meter {
    pub(super) fn new(limit: u64, window_ms: u64) -> Self {
        Meter {
            limit,
            window_ms,
            entries: VecDeque::new(),
            used: 0,
            by_client: Vec::new(),
            client_names: Vec::new(),
            client_ids: HashMap::new(),
            by_api: [0; Api::ALL.len()],
            rejected: 0,
            debugging: 0,
        }
    }

    /// Counts `calls` for `client` unless the org is already at its limit. Salesforce checks the
    /// limit before it runs a request, so a Composite Batch admitted just below the limit may
    /// take usage past it, as Salesforce's soft limit allows.
    pub(super) fn try_count(
        &mut self,
        now_ms: u64,
        client: &str,
        api: Api,
        calls: u64,
    ) -> Admission {
        self.expire(now_ms);
        if self.used >= self.limit {
            self.rejected += 1;
            return Admission::Rejected(self.current());
        }
        self.push(now_ms, client, api, calls);
        Admission::Counted(self.current())
    }

    /// Counts `calls` whatever the limit (calls that already happened elsewhere).
    pub(super) fn record(&mut self, now_ms: u64, client: &str, api: Api, calls: u64) {
        self.expire(now_ms);
        self.push(now_ms, client, api, calls);
    }

    /// Usage now, without counting anything.
    pub(super) fn usage(&mut self, now_ms: u64) -> Usage {
        self.expire(now_ms);
        self.current()
    }

    /// Tallies a SOAP request carrying a `DebuggingHeader` (its own allocation, not the limit).
    pub(super) fn count_debugging(&mut self) {
        self.debugging += 1;
    }

    pub(super) fn set_limit(&mut self, limit: u64) {
        self.limit = limit;
    }

    /// Empties the window and zeroes every total; the limit and window length stay.
    pub(super) fn reset(&mut self) {
        *self = Meter::new(self.limit, self.window_ms);
    }

    pub(super) fn snapshot(&mut self, now_ms: u64) -> Snapshot {
        self.expire(now_ms);
        let by_client = self
            .client_names
            .iter()
            .zip(&self.by_client)
            .filter(|(_, &calls)| calls > 0)
            .map(|(name, &calls)| (name.clone(), calls))
            .collect();
        let by_api = Api::ALL
            .iter()
            .filter(|api| self.by_api[api.index()] > 0)
            .map(|api| (api.as_str().to_owned(), self.by_api[api.index()]))
            .collect();
        Snapshot {
            usage: self.current(),
            by_client,
            by_api,
            rejected: self.rejected,
            debugging: self.debugging,
        }
    }

    fn current(&self) -> Usage {
        Usage {
            used: self.used,
            limit: self.limit,
        }
    }

    fn push(&mut self, now_ms: u64, client: &str, api: Api, calls: u64) {
        if calls == 0 {
            return;
        }
        let client = self.intern(client);
        self.used = self.used.saturating_add(calls);
        let slot = &mut self.by_client[client as usize];
        *slot = slot.saturating_add(calls);
        let slot = &mut self.by_api[api.index()];
        *slot = slot.saturating_add(calls);
        if let Some(last) = self.entries.back_mut() {
            if last.at_ms == now_ms && last.client == client && last.api == api {
                last.calls = last.calls.saturating_add(calls);
                return;
            }
        }
        self.entries.push_back(Entry {
            at_ms: now_ms,
            client,
            api,
            calls,
        });
    }

    /// Drops the entries that are a full window old. Entries are pushed with a non-decreasing
    /// clock, so the old ones are all at the front.
    fn expire(&mut self, now_ms: u64) {
        while let Some(first) = self.entries.front() {
            if first.at_ms.saturating_add(self.window_ms) > now_ms {
                break;
            }
            let calls = first.calls;
            let client = first.client as usize;
            let api = first.api.index();
            self.entries.pop_front();
            self.used = self.used.saturating_sub(calls);
            self.by_client[client] = self.by_client[client].saturating_sub(calls);
            self.by_api[api] = self.by_api[api].saturating_sub(calls);
        }
    }

    fn intern(&mut self, name: &str) -> u32 {
        if let Some(&id) = self.client_ids.get(name) {
            return id;
        }
        let name = if self.client_names.len() >= MAX_CLIENTS {
            if let Some(&id) = self.client_ids.get(OTHER) {
                return id;
            }
            OTHER
        } else {
            name
        };
        // At most MAX_CLIENTS + 1 names, so the id always fits.
        let id = self.client_names.len() as u32;
        self.client_names.push(name.to_owned());
        self.client_ids.insert(name.to_owned(), id);
        self.by_client.push(0);
        id
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DAY_MS: u64 = 24 * 60 * 60 * 1000;

    #[test]
    fn counts_until_the_limit_then_rejects_without_counting() {
        let mut meter = Meter::new(3, DAY_MS);
        for used in 1..=3 {
            assert_eq!(
                meter.try_count(0, "a", Api::Rest, 1),
                Admission::Counted(Usage { used, limit: 3 })
            );
        }
        assert_eq!(
            meter.try_count(0, "a", Api::Rest, 1),
            Admission::Rejected(Usage { used: 3, limit: 3 })
        );
        let snap = meter.snapshot(0);
        assert_eq!(snap.usage.used, 3);
        assert_eq!(snap.rejected, 1);
    }

    #[test]
    fn a_batch_below_the_limit_may_overshoot_it() {
        // 2 of 3 used: the check sees room, so all 5 subrequests count (soft limit).
        let mut meter = Meter::new(3, DAY_MS);
        meter.try_count(0, "a", Api::Rest, 2);
        assert_eq!(
            meter.try_count(0, "a", Api::Composite, 5),
            Admission::Counted(Usage { used: 7, limit: 3 })
        );
    }

    #[test]
    fn calls_age_out_exactly_one_window_later() {
        // Window 1000 ms. Calls at t=0 (2 calls) and t=400 (1 call).
        let mut meter = Meter::new(100, 1000);
        meter.try_count(0, "a", Api::Rest, 2);
        meter.try_count(400, "b", Api::Soap, 1);
        // t=999: both still inside (0 + 1000 > 999).
        assert_eq!(meter.usage(999).used, 3);
        // t=1000: the t=0 calls are a full window old and go.
        assert_eq!(meter.usage(1000).used, 1);
        let snap = meter.snapshot(1399);
        assert_eq!(snap.by_client.get("a"), None);
        assert_eq!(snap.by_client.get("b"), Some(&1));
        assert_eq!(snap.by_api.get("soap"), Some(&1));
        // t=1400: the last one goes.
        assert_eq!(meter.usage(1400).used, 0);
        assert!(meter.entries.is_empty());
    }

    #[test]
    fn space_frees_when_old_calls_age_out() {
        let mut meter = Meter::new(2, 1000);
        meter.try_count(0, "a", Api::Rest, 1);
        meter.try_count(500, "a", Api::Rest, 1);
        assert!(matches!(
            meter.try_count(999, "a", Api::Rest, 1),
            Admission::Rejected(_)
        ));
        assert_eq!(
            meter.try_count(1000, "a", Api::Rest, 1),
            Admission::Counted(Usage { used: 2, limit: 2 })
        );
    }

    #[test]
    fn same_millisecond_same_client_shares_an_entry() {
        let mut meter = Meter::new(100, 1000);
        meter.try_count(5, "a", Api::Rest, 1);
        meter.try_count(5, "a", Api::Rest, 1);
        meter.try_count(5, "b", Api::Rest, 1);
        meter.try_count(6, "b", Api::Rest, 1);
        assert_eq!(meter.entries.len(), 3);
        assert_eq!(meter.usage(6).used, 4);
    }

    #[test]
    fn external_calls_ignore_the_limit() {
        let mut meter = Meter::new(10, 1000);
        meter.record(0, EXTERNAL, Api::External, 25);
        let snap = meter.snapshot(0);
        assert_eq!(
            snap.usage,
            Usage {
                used: 25,
                limit: 10
            }
        );
        assert_eq!(snap.by_client.get(EXTERNAL), Some(&25));
        assert_eq!(snap.by_api.get("external"), Some(&25));
    }

    #[test]
    fn reset_keeps_the_limit() {
        let mut meter = Meter::new(10, 1000);
        meter.try_count(0, "a", Api::Rest, 4);
        meter.set_limit(20);
        meter.reset();
        assert_eq!(meter.usage(0), Usage { used: 0, limit: 20 });
        assert!(meter.snapshot(0).by_client.is_empty());
    }

    #[test]
    fn client_names_are_bounded() {
        let mut meter = Meter::new(u64::MAX, 1000);
        for i in 0..MAX_CLIENTS + 10 {
            meter.try_count(0, &format!("c{i}"), Api::Rest, 1);
        }
        let snap = meter.snapshot(0);
        assert_eq!(snap.by_client.len(), MAX_CLIENTS + 1);
        assert_eq!(snap.by_client.get(OTHER), Some(&10));
        assert_eq!(snap.usage.used, (MAX_CLIENTS + 10) as u64);
    }
}
