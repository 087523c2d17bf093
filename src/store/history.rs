//! The daily history: counted calls per calendar day, org and integration.

use rusqlite::{params, TransactionBehavior};
use serde::Serialize;

use super::*;

/// Counted calls of one integration of one org on one calendar day.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct HistoryRow {
    pub day: String,
    pub org: String,
    pub integration: String,
    pub calls: u64,
}

impl Store {
    // ----- daily history ----------------------------------------------------------------

    /// Adds `calls` to the count of `integration` in `org` on `day` (`YYYY-MM-DD`), creating
    /// the row if needed. The sum saturates at `i64::MAX`.
    pub fn add_history(
        &self,
        day: &str,
        org: &str,
        integration: &str,
        calls: u64,
    ) -> Result<(), StoreError> {
        check_day(day)?;
        self.lock()
            .prepare_cached(
                "INSERT INTO history (day, org, integration, calls) VALUES (?1, ?2, ?3, ?4) \
                 ON CONFLICT (day, org, integration) DO UPDATE SET calls = \
                 CASE WHEN calls > 9223372036854775807 - excluded.calls \
                 THEN 9223372036854775807 ELSE calls + excluded.calls END",
            )?
            .execute(params![day, org, integration, sql_count_u64(calls)])?;
        Ok(())
    }

    /// History rows with `day >= from_day`, of one org or all, ordered by day, org, integration.
    pub fn history(
        &self,
        org: Option<&str>,
        from_day: &str,
    ) -> Result<Vec<HistoryRow>, StoreError> {
        check_day(from_day)?;
        let conn = self.lock();
        let mut stmt = conn.prepare_cached(
            "SELECT day, org, integration, calls FROM history \
             WHERE day >= ?1 AND (?2 IS NULL OR org = ?2) ORDER BY day, org, integration",
        )?;
        let mut rows = stmt.query(params![from_day, org])?;
        let mut out = Vec::new();
        while let Some(row) = rows.next()? {
            let day: String = row.get(0)?;
            let org: String = row.get(1)?;
            let integration: String = row.get(2)?;
            let calls: i64 = row.get(3)?;
            let calls = u64::try_from(calls).map_err(|_| {
                StoreError::Corrupt(format!(
                    "history row ({day}, {org:?}, {integration:?}) has {calls} calls"
                ))
            })?;
            out.push(HistoryRow {
                day,
                org,
                integration,
                calls,
            });
        }
        Ok(out)
    }

    /// Adds every row's `calls` to its day's count (as [`Store::add_history`]) and sets the state
    /// `key` to `value`, in one transaction: the history recorder's mark of what it has recorded
    /// moves with the counts, so a crash can neither count a minute twice nor lose it.
    pub fn record_history(
        &self,
        rows: &[HistoryRow],
        key: &str,
        value: &str,
    ) -> Result<(), StoreError> {
        for row in rows {
            check_day(&row.day)?;
        }
        let mut conn = self.lock();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        {
            let mut add = tx.prepare_cached(
                "INSERT INTO history (day, org, integration, calls) VALUES (?1, ?2, ?3, ?4) \
                 ON CONFLICT (day, org, integration) DO UPDATE SET calls = \
                 CASE WHEN calls > 9223372036854775807 - excluded.calls \
                 THEN 9223372036854775807 ELSE calls + excluded.calls END",
            )?;
            for row in rows {
                add.execute(params![
                    row.day,
                    row.org,
                    row.integration,
                    sql_count_u64(row.calls)
                ])?;
            }
            tx.prepare_cached(
                "INSERT INTO state (key, value) VALUES (?1, ?2) \
                 ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            )?
            .execute(params![key, value])?;
        }
        tx.commit()?;
        Ok(())
    }

    /// Deletes history rows with `day < before_day`; returns how many.
    pub fn purge_history(&self, before_day: &str) -> Result<usize, StoreError> {
        check_day(before_day)?;
        let n = self
            .lock()
            .prepare_cached("DELETE FROM history WHERE day < ?1")?
            .execute([before_day])?;
        Ok(n)
    }
}

/// Checks that `day` is `YYYY-MM-DD`, so that text order is date order.
fn check_day(day: &str) -> Result<(), StoreError> {
    let b = day.as_bytes();
    let digits = |range: std::ops::Range<usize>| b[range].iter().all(u8::is_ascii_digit);
    let valid = b.len() == 10
        && b[4] == b'-'
        && b[7] == b'-'
        && digits(0..4)
        && digits(5..7)
        && digits(8..10)
        && matches!(
            &day[5..7],
            "01" | "02" | "03" | "04" | "05" | "06" | "07" | "08" | "09" | "10" | "11" | "12"
        )
        && (b"01".as_slice()..=b"31".as_slice()).contains(&&b[8..10]);
    if valid {
        Ok(())
    } else {
        Err(StoreError::Invalid(format!(
            "{:?} is not a calendar day; use YYYY-MM-DD such as 2024-05-31",
            day.chars().take(32).collect::<String>()
        )))
    }
}
