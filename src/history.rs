//! The daily history of counted calls: per calendar day (in `[history] time_zone`), org and
//! integration, kept [`KEEP_DAYS`] days, for `GET /api/v1/history` and the status page.
//!
//! # Where the numbers come from
//!
//! From the meter's per-minute window buckets, not from a counter of its own. Each bucket is
//! stamped with its minute, so every call lands on the calendar day it was made (also when the
//! day changes between two recordings), the request path does no extra work, and after a restart
//! (even `kill -9`) the restored windows still hold the minutes not yet recorded. A window
//! *total* would not do: calls age out of it, so its changes are not the calls made.
//!
//! A task records each finished minute once, [`RECORD_LAG_MINUTES`] after it ends (a call that
//! never reached Salesforce is refunded within seconds, so its refund is in), together with the
//! mark of the last minute recorded, in one transaction: a crash can neither count a minute twice
//! nor lose it. A query adds the minutes not recorded yet, straight from the windows, so the
//! history is always up to the minute.
//!
//! A minute must still be in the window when it is recorded: windows of at least
//! `RECORD_LAG_MINUTES + 1` minutes (Salesforce's is 24 hours) are recorded completely.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;
use tokio::sync::watch;

use crate::config::HistoryConfig;
use crate::meter::{Meter, Minute};
use crate::store::{HistoryRow, Store, StoreError};

/// Calendar days kept in the store, today included; older rows are purged.
pub const KEEP_DAYS: u32 = 30;
/// How often finished minutes are recorded.
const RECORD_INTERVAL: Duration = Duration::from_secs(20);
/// A minute is recorded once this many minutes have begun after it.
const RECORD_LAG_MINUTES: u32 = 2;
/// State key of the last minute recorded.
const MARK_KEY: &str = "history/recorded_through";

/// Days since 1970-01-01 in the history's time zone.
pub type Day = i64;

/// The history: the store's recorded days plus the minutes not recorded yet.
pub struct History {
    meter: Arc<Meter>,
    store: Arc<Store>,
    config: HistoryConfig,
    /// The last minute recorded in the store (`None`: nothing yet). A Tokio mutex held across
    /// recording and across a query's two reads (store, then windows), so that no query counts a
    /// minute from both.
    mark: tokio::sync::Mutex<Option<Minute>>,
}

/// What `GET /api/v1/history` answers.
#[derive(Debug, Clone, Serialize)]
pub struct HistoryReport {
    /// The zone of the calendar days, as configured.
    pub time_zone: String,
    pub orgs: Vec<OrgHistory>,
}

#[derive(Debug, Clone, Serialize)]
pub struct OrgHistory {
    pub id: String,
    /// Oldest first, one entry per day, today last.
    pub days: Vec<DayCount>,
}

#[derive(Debug, Clone, Serialize)]
pub struct DayCount {
    /// `YYYY-MM-DD`.
    pub day: String,
    /// Counted calls of all integrations through the proxy that day.
    pub total: u64,
    /// Per integration; every configured integration of the org appears, with 0 if idle.
    pub integrations: BTreeMap<String, u64>,
}

impl History {
    /// Opens the history over `meter` and `store`, reading the recorder's mark.
    pub async fn open(
        meter: Arc<Meter>,
        store: Arc<Store>,
        config: HistoryConfig,
    ) -> Result<Self, StoreError> {
        let s = store.clone();
        let mark = tokio::task::spawn_blocking(move || s.get_state(MARK_KEY))
            .await
            .map_err(|e| StoreError::Corrupt(format!("reading the history mark: {e}")))??;
        let mark = match mark {
            None => None,
            Some(text) => Some(text.parse::<Minute>().map_err(|_| {
                StoreError::Corrupt(format!("state {MARK_KEY} is {text:?}, not a minute"))
            })?),
        };
        Ok(History {
            meter,
            store,
            config,
            mark: tokio::sync::Mutex::new(mark),
        })
    }

    /// The zone's name as configured.
    pub fn time_zone(&self) -> &str {
        &self.config.time_zone_name
    }

    /// The meter's current minute.
    pub fn now_minute(&self) -> Minute {
        self.meter
            .orgs()
            .next()
            .map(|o| o.clock().minute())
            .unwrap_or_else(|| (unix_ms_now() / 60_000) as Minute)
    }

    /// The calendar day of `minute` in the history's zone.
    pub fn day_of(&self, minute: Minute) -> Day {
        day_in_zone(&self.config.time_zone, i64::from(minute) * 60)
    }

    /// `HH:MM:SS ZONE` of a Unix time in the history's zone, for the status page.
    pub fn local_time(&self, unix_secs: i64) -> String {
        let (offset, name) = match self.config.time_zone.find_local_time_type(unix_secs) {
            Ok(t) => (
                i64::from(t.ut_offset()),
                t.time_zone_designation().to_owned(),
            ),
            Err(_) => (0, "UTC".to_owned()),
        };
        let secs = (unix_secs + offset).rem_euclid(86_400);
        let name = if name.is_empty() {
            self.config.time_zone_name.clone()
        } else {
            name
        };
        format!(
            "{:02}:{:02}:{:02} {name}",
            secs / 3600,
            secs / 60 % 60,
            secs % 60
        )
    }

    /// Records the finished minutes not recorded yet, as of minute `now`, and purges days older
    /// than [`KEEP_DAYS`]. Returns the calls recorded.
    pub async fn record(&self, now: Minute) -> Result<u64, StoreError> {
        let through = now.saturating_sub(RECORD_LAG_MINUTES);
        let mut mark = self.mark.lock().await;
        if mark.is_some_and(|m| m >= through) {
            return Ok(0);
        }
        let from = mark.map_or(0, |m| m + 1);
        let rows = self.collect(from, through, None);
        let calls = rows.iter().map(|r| r.calls).sum();
        let oldest_kept = day_string(self.day_of(now) - i64::from(KEEP_DAYS) + 1);
        let store = self.store.clone();
        tokio::task::spawn_blocking(move || {
            store.record_history(&rows, MARK_KEY, &through.to_string())?;
            store.purge_history(&oldest_kept)
        })
        .await
        .map_err(|e| StoreError::Corrupt(format!("recording history: {e}")))??;
        *mark = Some(through);
        Ok(calls)
    }

    /// Records every [`RECORD_INTERVAL`] until `stop`. What is not recorded at shutdown stays in
    /// the windows, which are saved and restored, and is recorded after the restart.
    pub async fn run(self: Arc<Self>, mut stop: watch::Receiver<bool>) {
        let mut tick = tokio::time::interval(RECORD_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = stop.wait_for(|s| *s) => break,
            }
            if let Err(e) = self.record(self.now_minute()).await {
                tracing::warn!(error = %e, "recording the daily history failed; will retry");
            }
        }
    }

    /// The last `days` calendar days (today included, 1 to [`KEEP_DAYS`]), of one org or all.
    pub async fn report(&self, days: u32, org: Option<&str>) -> Result<HistoryReport, StoreError> {
        let days = days.clamp(1, KEEP_DAYS);
        let mark = self.mark.lock().await;
        let now = self.now_minute();
        let today = self.day_of(now);
        let first = today - i64::from(days) + 1;
        let store = self.store.clone();
        let (org_filter, from_day) = (org.map(str::to_owned), day_string(first));
        let stored =
            tokio::task::spawn_blocking(move || store.history(org_filter.as_deref(), &from_day))
                .await
                .map_err(|e| StoreError::Corrupt(format!("reading history: {e}")))??;
        let live = self.collect(mark.map_or(0, |m| m + 1), now, org);
        drop(mark);

        // org → day → integration → calls, starting from every configured integration at 0.
        let mut table: BTreeMap<String, BTreeMap<String, BTreeMap<String, u64>>> = BTreeMap::new();
        let mut order = Vec::new();
        for o in self.meter.usage().orgs {
            if org.is_some_and(|want| want != o.id) {
                continue;
            }
            let idle: BTreeMap<String, u64> =
                o.integrations.iter().map(|i| (i.id.clone(), 0)).collect();
            let per_day = (first..=today).map(|d| (day_string(d), idle.clone()));
            table.insert(o.id.clone(), per_day.collect());
            order.push(o.id);
        }
        for row in stored.into_iter().chain(live) {
            let Some(per_day) = table.get_mut(&row.org) else {
                continue; // an org no longer configured
            };
            if let Some(counts) = per_day.get_mut(&row.day) {
                *counts.entry(row.integration).or_insert(0) += row.calls;
            }
        }
        // An integration removed from the config has rows only on the days it made calls: list
        // it at 0 on the others, so that every day has the same integrations and a table built
        // from any day adds up to the totals.
        for per_day in table.values_mut() {
            let seen: BTreeSet<String> = per_day.values().flat_map(|d| d.keys().cloned()).collect();
            for counts in per_day.values_mut() {
                for id in &seen {
                    counts.entry(id.clone()).or_insert(0);
                }
            }
        }
        let orgs = order
            .into_iter()
            .filter_map(|id| {
                let per_day = table.remove(&id)?;
                let days = per_day
                    .into_iter()
                    .map(|(day, integrations)| DayCount {
                        day,
                        total: integrations.values().sum(),
                        integrations,
                    })
                    .collect();
                Some(OrgHistory { id, days })
            })
            .collect();
        Ok(HistoryReport {
            time_zone: self.config.time_zone_name.clone(),
            orgs,
        })
    }

    /// Calls per day, org and integration in minutes `from..=through` of the windows.
    fn collect(&self, from: Minute, through: Minute, org: Option<&str>) -> Vec<HistoryRow> {
        if from > through {
            return Vec::new();
        }
        let mut sums: BTreeMap<(Day, String, String), u64> = BTreeMap::new();
        for w in self.meter.windows() {
            let Some(integration) = w.integration else {
                continue; // the org's own window: the integrations' add up to it
            };
            if org.is_some_and(|want| want != w.org) {
                continue;
            }
            for (minute, count) in w.buckets {
                if (from..=through).contains(&minute) {
                    *sums
                        .entry((self.day_of(minute), w.org.clone(), integration.clone()))
                        .or_insert(0) += u64::from(count);
                }
            }
        }
        sums.into_iter()
            .map(|((day, org, integration), calls)| HistoryRow {
                day: day_string(day),
                org,
                integration,
                calls,
            })
            .collect()
    }
}

fn unix_ms_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// The calendar day of Unix time `unix_secs` in `zone`.
pub fn day_in_zone(zone: &tz::TimeZone, unix_secs: i64) -> Day {
    let offset = zone
        .find_local_time_type(unix_secs)
        .map_or(0, |t| i64::from(t.ut_offset()));
    (unix_secs + offset).div_euclid(86_400)
}

/// `YYYY-MM-DD` of a day number (days since 1970-01-01), proleptic Gregorian calendar.
pub fn day_string(day: Day) -> String {
    // Howard Hinnant's civil_from_days.
    let z = day + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}-{m:02}-{d:02}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn day_strings_follow_the_calendar() {
        assert_eq!(day_string(0), "1970-01-01");
        assert_eq!(day_string(-1), "1969-12-31");
        assert_eq!(day_string(19_782), "2024-02-29"); // a leap day
        assert_eq!(day_string(19_783), "2024-03-01");
        assert_eq!(day_string(20_089), "2025-01-01");
    }

    #[test]
    fn days_begin_at_midnight_of_the_zone() {
        // 2024-05-31 22:30 UTC is already June 1st at +02:00, still May 31st in UTC.
        let t = 1_717_194_600;
        let utc = tz::TimeZone::utc();
        let plus2 = tz::TimeZone::fixed(2 * 3600).expect("offset");
        assert_eq!(day_string(day_in_zone(&utc, t)), "2024-05-31");
        assert_eq!(day_string(day_in_zone(&plus2, t)), "2024-06-01");
        let minus5 = tz::TimeZone::fixed(-5 * 3600).expect("offset");
        assert_eq!(day_string(day_in_zone(&minus5, t)), "2024-05-31");
        assert_eq!(
            day_string(day_in_zone(&minus5, t - 20 * 3600)),
            "2024-05-30"
        );
    }

    /// A meter of org acme with integrations a and b, as `app` builds it.
    fn meter() -> (Meter, Vec<Arc<crate::meter::IntegrationMeter>>) {
        let toml = "[[listener]]\nname = \"main\"\nlisten = \"127.0.0.1:0\"\n[[org]]\nid = \"acme\"\n\
                    instance_url = \"https://acme.my.salesforce.com\"\n\
                    [[integration]]\nid = \"a\"\norg = \"acme\"\nmatch = { path_prefix = \"/a\" }\n\
                    [[integration]]\nid = \"b\"\norg = \"acme\"\nmatch = { path_prefix = \"/b\" }\n";
        let cfg = crate::config::parse(toml, std::path::Path::new("t.toml")).expect("config");
        let org = Arc::new(crate::meter::OrgMeter::new(
            &cfg.orgs[0],
            crate::meter::Clock::new(),
        ));
        let mut meter = Meter::new();
        meter.add_org(org.clone(), Vec::new());
        let mut ims = Vec::new();
        for i in &cfg.integrations {
            let im = Arc::new(crate::meter::IntegrationMeter::from_config(i, org.clone()));
            meter.add_integration(im.clone());
            ims.push(im);
        }
        (meter, ims)
    }

    fn count(im: &crate::meter::IntegrationMeter, n: u32) {
        for _ in 0..n {
            assert!(matches!(im.decide(1), crate::meter::Verdict::Forward(_)));
        }
    }

    fn today(report: &HistoryReport) -> &BTreeMap<String, u64> {
        &report.orgs[0].days.last().expect("today").integrations
    }

    #[tokio::test]
    async fn records_finished_minutes_once_and_queries_add_the_rest() {
        let (meter, ims) = meter();
        count(&ims[0], 3);
        count(&ims[1], 5);
        let meter = Arc::new(meter);
        let store = Arc::new(Store::open_in_memory().expect("store"));
        let history = History::open(meter.clone(), store.clone(), HistoryConfig::default())
            .await
            .expect("history");
        let now = history.now_minute();
        let expect = |a: u64, b: u64| BTreeMap::from([("a".to_owned(), a), ("b".to_owned(), b)]);

        // The current minute is not finished: nothing recorded, all of it live.
        assert_eq!(history.record(now).await.expect("record"), 0);
        assert!(store.history(None, "1970-01-01").expect("rows").is_empty());
        assert_eq!(
            today(&history.report(7, None).await.expect("report")),
            &expect(3, 5)
        );

        // Minutes later (as far as the recorder is told), they are in the store, once.
        assert_eq!(history.record(now + 3).await.expect("record"), 8);
        assert_eq!(history.record(now + 3).await.expect("record"), 0);
        let rows = store.history(None, "1970-01-01").expect("rows");
        let stored: Vec<(&str, u64)> = rows
            .iter()
            .map(|r| (r.integration.as_str(), r.calls))
            .collect();
        assert_eq!(stored, [("a", 3), ("b", 5)]);
        assert_eq!(rows[0].day, day_string(history.day_of(now)));
        assert_eq!(
            store.get_state(MARK_KEY).expect("mark"),
            Some((now + 1).to_string())
        );
        let report = history.report(7, None).await.expect("report");
        assert_eq!(today(&report), &expect(3, 5), "not counted twice");
        assert_eq!(report.orgs[0].days.len(), 7);
        assert_eq!(report.orgs[0].days[6].total, 8);

        // A new History (a restart) reads the mark: the recorded minutes are not also taken
        // from the windows.
        let reopened = History::open(meter.clone(), store.clone(), HistoryConfig::default())
            .await
            .expect("history");
        let report = reopened.report(1, Some("acme")).await.expect("report");
        assert_eq!(today(&report), &expect(3, 5));

        // Days older than KEEP_DAYS are purged when minutes are recorded.
        store
            .add_history("2000-01-01", "acme", "a", 7)
            .expect("old row");
        history.record(now + 4).await.expect("record");
        assert!(store
            .history(None, "1970-01-01")
            .expect("rows")
            .iter()
            .all(|r| r.day != "2000-01-01"));
    }

    /// An integration removed from the config has stored rows only on the days it made calls;
    /// every day of the report lists it (0 on the others), so every day has the same
    /// integrations and they add up to its total.
    #[tokio::test]
    async fn every_day_lists_every_integration_of_the_report() {
        let (meter, _) = meter();
        let store = Arc::new(Store::open_in_memory().expect("store"));
        let history = History::open(Arc::new(meter), store.clone(), HistoryConfig::default())
            .await
            .expect("history");
        let yesterday = day_string(history.day_of(history.now_minute()) - 1);
        store
            .add_history(&yesterday, "acme", "old-sync", 700)
            .expect("row");
        let report = history.report(3, None).await.expect("report");
        for day in &report.orgs[0].days {
            let ids: Vec<&str> = day.integrations.keys().map(String::as_str).collect();
            assert_eq!(ids, ["a", "b", "old-sync"], "{}", day.day);
            assert_eq!(day.total, day.integrations.values().sum::<u64>());
        }
        assert_eq!(report.orgs[0].days[1].integrations["old-sync"], 700);
    }

    #[test]
    fn named_zones_follow_daylight_saving_time() {
        let Ok(berlin) = tz::TimeZone::from_posix_tz(":Europe/Berlin") else {
            eprintln!("skipped: no tz database on this machine");
            return;
        };
        // 22:30 UTC is 00:30 the next day in summer (CEST, +2) but 23:30 in winter (CET, +1).
        let summer = 1_717_194_600; // 2024-05-31 22:30 UTC
        let winter = 1_704_061_800; // 2023-12-31 22:30 UTC
        assert_eq!(day_string(day_in_zone(&berlin, summer)), "2024-06-01");
        assert_eq!(day_string(day_in_zone(&berlin, winter)), "2023-12-31");
    }
}
