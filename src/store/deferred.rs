//! Deferred calls: stored before the proxy answers 202, claimed by a replayer, and moved
//! through their states (`pending` → `in_flight` → `delivered` | `pending` | `failed`).

use std::fmt;
use std::str::FromStr;

use rusqlite::{params, OptionalExtension, Row, Transaction, TransactionBehavior};
use serde::Serialize;

use super::*;

/// The columns of a full deferred call, in the order [`call_from_row`] reads them.
macro_rules! call_columns {
    () => {
        "id, org, integration, method, path_and_query, headers, body, units, state, attempts, \
         next_attempt_ms, created_ms, updated_ms, last_error, upstream_status, upstream_body"
    };
}

/// The columns of a deferred call's summary, in the order [`summary_from_row`] reads them.
macro_rules! summary_columns {
    () => {
        "id, org, integration, method, path_and_query, units, state, attempts, next_attempt_ms, \
         created_ms, updated_ms, last_error, upstream_status, length(body)"
    };
}

/// The id of a deferred call: positive, increasing, never reused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(transparent)]
pub struct DeferredId(pub i64);

impl fmt::Display for DeferredId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

impl FromStr for DeferredId {
    type Err = ParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.parse::<i64>() {
            Ok(id) if id > 0 && !s.starts_with('+') => Ok(DeferredId(id)),
            _ => Err(ParseError::new(
                "deferred call id",
                "a positive whole number such as 42",
                s,
            )),
        }
    }
}

/// Where a deferred call is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum DeferredState {
    /// Waiting to be sent (first time or again after a failed attempt).
    Pending,
    /// Claimed by a replayer, being sent.
    InFlight,
    /// Salesforce answered; the answer is kept until purged.
    Delivered,
    /// Gave up (permanent error or out of retries); waits for the admin.
    Failed,
    /// The admin dropped it.
    Discarded,
}

impl DeferredState {
    pub const ALL: [DeferredState; 5] = [
        DeferredState::Pending,
        DeferredState::InFlight,
        DeferredState::Delivered,
        DeferredState::Failed,
        DeferredState::Discarded,
    ];

    /// The name used in the database, the admin API and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            DeferredState::Pending => "pending",
            DeferredState::InFlight => "in_flight",
            DeferredState::Delivered => "delivered",
            DeferredState::Failed => "failed",
            DeferredState::Discarded => "discarded",
        }
    }
}

impl fmt::Display for DeferredState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for DeferredState {
    type Err = ParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        DeferredState::ALL
            .into_iter()
            .find(|state| state.as_str() == s)
            .ok_or_else(|| {
                ParseError::new(
                    "deferred call state",
                    "pending, in_flight, delivered, failed or discarded",
                    s,
                )
            })
    }
}

/// A call to store durably and replay later.
#[derive(Clone, PartialEq, Eq)]
pub struct NewDeferred {
    pub org: String,
    pub integration: String,
    pub method: String,
    pub path_and_query: String,
    /// Header names and raw values, in the order received; values may be any bytes.
    pub headers: Vec<(String, Vec<u8>)>,
    pub body: Vec<u8>,
    /// Calls Salesforce will count for it (composite and batch requests count more than one).
    pub units: u32,
    pub created_ms: u64,
}

impl fmt::Debug for NewDeferred {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NewDeferred")
            .field("org", &self.org)
            .field("integration", &self.integration)
            .field("method", &self.method)
            .field("path_and_query", &self.path_and_query)
            .field("headers", &HeaderNames(&self.headers))
            .field("body_len", &self.body.len())
            .field("units", &self.units)
            .field("created_ms", &self.created_ms)
            .finish()
    }
}

/// A stored deferred call with its delivery state.
#[derive(Clone, PartialEq, Eq)]
pub struct DeferredCall {
    pub id: DeferredId,
    pub org: String,
    pub integration: String,
    pub method: String,
    pub path_and_query: String,
    pub headers: Vec<(String, Vec<u8>)>,
    pub body: Vec<u8>,
    pub units: u32,
    pub state: DeferredState,
    /// Sends whose outcome was recorded (delivered, retry or failed); reset by an admin retry.
    pub attempts: u32,
    pub next_attempt_ms: u64,
    pub created_ms: u64,
    pub updated_ms: u64,
    pub last_error: Option<String>,
    pub upstream_status: Option<u16>,
    pub upstream_body: Option<Vec<u8>>,
}

impl fmt::Debug for DeferredCall {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DeferredCall")
            .field("id", &self.id)
            .field("org", &self.org)
            .field("integration", &self.integration)
            .field("method", &self.method)
            .field("path_and_query", &self.path_and_query)
            .field("headers", &HeaderNames(&self.headers))
            .field("body_len", &self.body.len())
            .field("units", &self.units)
            .field("state", &self.state)
            .field("attempts", &self.attempts)
            .field("next_attempt_ms", &self.next_attempt_ms)
            .field("created_ms", &self.created_ms)
            .field("updated_ms", &self.updated_ms)
            .field("last_error", &self.last_error)
            .field("upstream_status", &self.upstream_status)
            .field(
                "upstream_body_len",
                &self.upstream_body.as_ref().map(Vec::len),
            )
            .finish()
    }
}

/// Prints header names only: values may be bearer tokens.
struct HeaderNames<'a>(&'a [(String, Vec<u8>)]);

impl fmt::Debug for HeaderNames<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list()
            .entries(self.0.iter().map(|(name, _)| name))
            .finish()
    }
}

/// A call found in flight at start-up, as [`Store::settle_in_flight`] shows it to the rule
/// that decides whether it is sent again.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InFlightCall {
    pub org: String,
    pub integration: String,
    pub method: String,
    pub path_and_query: String,
    /// Sends made before the one the stop cut off.
    pub attempts: u32,
}

/// A deferred call for the admin list: everything but headers and bodies.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DeferredSummary {
    pub id: DeferredId,
    pub org: String,
    pub integration: String,
    pub method: String,
    pub path_and_query: String,
    pub units: u32,
    pub state: DeferredState,
    pub attempts: u32,
    pub next_attempt_ms: u64,
    pub created_ms: u64,
    pub updated_ms: u64,
    pub last_error: Option<String>,
    pub upstream_status: Option<u16>,
    pub body_len: u64,
}

/// Which deferred calls [`Store::list_deferred`] returns: all filters that are set must match.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeferredFilter {
    pub org: Option<String>,
    pub integration: Option<String>,
    pub state: Option<DeferredState>,
    /// Only calls with a smaller id (the next page after the last id shown).
    pub before: Option<DeferredId>,
    /// At most this many, newest first.
    pub limit: usize,
}

impl Default for DeferredFilter {
    fn default() -> Self {
        DeferredFilter {
            org: None,
            integration: None,
            state: None,
            before: None,
            limit: 100,
        }
    }
}

impl Store {
    // ----- deferred calls ---------------------------------------------------------------

    /// Stores `call` as pending, due at once. When this returns, the row has been fsync'd: the
    /// proxy may answer 202.
    pub fn defer(&self, call: &NewDeferred) -> Result<DeferredId, StoreError> {
        let headers = encode_headers(&call.headers);
        let created = sql_ms(call.created_ms);
        let conn = self.lock();
        conn.prepare_cached(
            "INSERT INTO deferred (org, integration, method, path_and_query, headers, body, units, \
             state, attempts, next_attempt_ms, created_ms, updated_ms) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, 'pending', 0, ?8, ?8, ?8)",
        )?
        .execute(params![
            call.org,
            call.integration,
            call.method,
            call.path_and_query,
            headers,
            call.body,
            call.units,
            created,
        ])?;
        Ok(DeferredId(conn.last_insert_rowid()))
    }

    /// The oldest pending calls of `org` due at `now_ms` (`next_attempt_ms <= now_ms`), in id
    /// order, at most `limit`, leaving out the integrations in `skip` (those out of budget for
    /// now, whose calls must not hold back the others'); marks them in flight in the same
    /// transaction, so a second replayer (or process) cannot take them. A row that cannot be
    /// decoded is marked failed (with the reason in `last_error`) and skipped, so it cannot
    /// block the queue. Cost: the pending rows of `org` scanned in id order until `limit` due
    /// ones are found.
    pub fn claim_due(
        &self,
        org: &str,
        now_ms: u64,
        limit: usize,
        skip: &[&str],
    ) -> Result<Vec<DeferredCall>, StoreError> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        let now = sql_ms(now_ms);
        let mut conn = self.lock();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let mut calls = Vec::new();
        let mut broken = Vec::new();
        {
            let mut select = tx.prepare_cached(concat!(
                "SELECT ",
                call_columns!(),
                " FROM deferred WHERE org = ?1 AND state = 'pending' AND next_attempt_ms <= ?2 \
                 AND integration NOT IN (SELECT value FROM json_each(?4)) ORDER BY id LIMIT ?3"
            ))?;
            let mut rows = select.query(params![org, now, sql_count(limit), json_list(skip)])?;
            while let Some(row) = rows.next()? {
                let id: i64 = row.get(0)?;
                match call_from_row(row) {
                    Ok(call) => calls.push(call),
                    Err(StoreError::Corrupt(reason)) => broken.push((id, reason)),
                    Err(other) => return Err(other),
                }
            }
            let mut claim = tx.prepare_cached(
                "UPDATE deferred SET state = 'in_flight', updated_ms = ?2 WHERE id = ?1",
            )?;
            for call in &mut calls {
                claim.execute(params![call.id.0, now])?;
                call.state = DeferredState::InFlight;
                call.updated_ms = now_ms;
            }
            let mut fail = tx.prepare_cached(
                "UPDATE deferred SET state = 'failed', updated_ms = ?2, last_error = ?3 \
                 WHERE id = ?1",
            )?;
            for (id, reason) in &broken {
                tracing::error!(id, %reason, "deferred call cannot be read; marked failed");
                fail.execute(params![
                    id,
                    now,
                    format!("unreadable in the store: {reason}")
                ])?;
            }
        }
        tx.commit()?;
        Ok(calls)
    }

    /// Settles every in-flight call at start-up, before any replayer runs: a call left in
    /// flight by a crash (or a shutdown that cut its send off) may or may not have reached
    /// Salesforce (attempts + 1: it was most likely sent). One that `resend` takes for safe
    /// to send again goes back to pending; any other is marked failed with `error`, as
    /// sending it again could apply a write twice: the admin decides. Returns `(pending
    /// again, failed)`.
    pub fn settle_in_flight(
        &self,
        resend: impl Fn(&InFlightCall) -> bool,
        error: &str,
        now_ms: u64,
    ) -> Result<(usize, usize), StoreError> {
        let mut conn = self.lock();
        let tx = conn.transaction()?;
        let calls: Vec<(i64, InFlightCall)> = tx
            .prepare(
                "SELECT id, org, integration, method, path_and_query, attempts FROM deferred \
                 WHERE state = 'in_flight'",
            )?
            .query_map([], |row| {
                let call = InFlightCall {
                    org: row.get(1)?,
                    integration: row.get(2)?,
                    method: row.get(3)?,
                    path_and_query: row.get(4)?,
                    attempts: row.get(5)?,
                };
                Ok((row.get(0)?, call))
            })?
            .collect::<Result<_, _>>()?;
        let (mut again, mut failed) = (0, 0);
        for (id, call) in calls {
            if resend(&call) {
                again += tx.execute(
                    "UPDATE deferred SET state = 'pending', attempts = attempts + 1, \
                     updated_ms = ?2 WHERE id = ?1",
                    params![id, sql_ms(now_ms)],
                )?;
            } else {
                failed += tx.execute(
                    "UPDATE deferred SET state = 'failed', attempts = attempts + 1, \
                     updated_ms = ?2, last_error = ?3 WHERE id = ?1",
                    params![id, sql_ms(now_ms), error],
                )?;
            }
        }
        tx.commit()?;
        Ok((again, failed))
    }

    /// Marks failed every pending call of `org`, with `error`, and returns how many: at
    /// start-up, for an org no replayer serves any more. They then wait for the admin.
    pub fn fail_pending(&self, org: &str, error: &str, now_ms: u64) -> Result<usize, StoreError> {
        let n = self.lock().execute(
            "UPDATE deferred SET state = 'failed', updated_ms = ?2, last_error = ?3 \
             WHERE org = ?1 AND state = 'pending'",
            params![org, sql_ms(now_ms), error],
        )?;
        Ok(n)
    }

    /// Records that Salesforce answered the call (any status the replayer takes as final
    /// success). Accepts an in-flight call, or a pending one (a call requeued while its answer
    /// was on its way: recording the delivery avoids a second send).
    pub fn mark_delivered(
        &self,
        id: DeferredId,
        upstream_status: u16,
        upstream_body: &[u8],
        now_ms: u64,
    ) -> Result<(), StoreError> {
        let mut conn = self.lock();
        let tx = conn.transaction()?;
        let n = tx
            .prepare_cached(
                "UPDATE deferred SET state = 'delivered', attempts = attempts + 1, \
                 updated_ms = ?2, last_error = NULL, upstream_status = ?3, upstream_body = ?4 \
                 WHERE id = ?1 AND state IN ('in_flight', 'pending')",
            )?
            .execute(params![
                id.0,
                sql_ms(now_ms),
                upstream_status,
                upstream_body
            ])?;
        finish_transition(tx, n, id, "in_flight or pending")
    }

    /// Records a failed attempt to try again at `next_attempt_ms`: attempts + 1, back to pending.
    pub fn mark_retry(
        &self,
        id: DeferredId,
        error: &str,
        next_attempt_ms: u64,
        now_ms: u64,
    ) -> Result<(), StoreError> {
        self.back_to_pending(id, error, 1, next_attempt_ms, now_ms)
    }

    /// Records a claimed call that waits for budget: back to pending, to be taken again at
    /// `next_attempt_ms`, with `error` but no attempt used. Salesforce refused it for the org's
    /// daily limit (`REQUEST_LIMIT_EXCEEDED`: not processed, and waiting for budget is what
    /// deferring is for), or its integration's budget is now smaller than the call.
    pub fn mark_waiting_for_budget(
        &self,
        id: DeferredId,
        error: &str,
        next_attempt_ms: u64,
        now_ms: u64,
    ) -> Result<(), StoreError> {
        self.back_to_pending(id, error, 0, next_attempt_ms, now_ms)
    }

    /// An in-flight call back to pending with `error`, `attempts_used` more attempts.
    fn back_to_pending(
        &self,
        id: DeferredId,
        error: &str,
        attempts_used: u32,
        next_attempt_ms: u64,
        now_ms: u64,
    ) -> Result<(), StoreError> {
        let mut conn = self.lock();
        let tx = conn.transaction()?;
        let n = tx
            .prepare_cached(
                "UPDATE deferred SET state = 'pending', attempts = attempts + ?5, \
                 next_attempt_ms = ?2, updated_ms = ?3, last_error = ?4 \
                 WHERE id = ?1 AND state = 'in_flight'",
            )?
            .execute(params![
                id.0,
                sql_ms(next_attempt_ms),
                sql_ms(now_ms),
                error,
                attempts_used
            ])?;
        finish_transition(tx, n, id, "in_flight")
    }

    /// Puts a claimed call back, untried, to be taken again at `next_attempt_ms` (the budget
    /// was spent when its turn came: that is not a failed attempt).
    pub fn release(
        &self,
        id: DeferredId,
        next_attempt_ms: u64,
        now_ms: u64,
    ) -> Result<(), StoreError> {
        let mut conn = self.lock();
        let tx = conn.transaction()?;
        let n = tx
            .prepare_cached(
                "UPDATE deferred SET state = 'pending', next_attempt_ms = ?2, updated_ms = ?3 \
                 WHERE id = ?1 AND state = 'in_flight'",
            )?
            .execute(params![id.0, sql_ms(next_attempt_ms), sql_ms(now_ms)])?;
        finish_transition(tx, n, id, "in_flight")
    }

    /// Records a final failure (attempts + 1); the call waits for the admin.
    pub fn mark_failed(
        &self,
        id: DeferredId,
        error: &str,
        upstream_status: Option<u16>,
        upstream_body: Option<&[u8]>,
        now_ms: u64,
    ) -> Result<(), StoreError> {
        let mut conn = self.lock();
        let tx = conn.transaction()?;
        let n = tx
            .prepare_cached(
                "UPDATE deferred SET state = 'failed', attempts = attempts + 1, \
                 updated_ms = ?2, last_error = ?3, upstream_status = ?4, upstream_body = ?5 \
                 WHERE id = ?1 AND state = 'in_flight'",
            )?
            .execute(params![
                id.0,
                sql_ms(now_ms),
                error,
                upstream_status,
                upstream_body
            ])?;
        finish_transition(tx, n, id, "in_flight")
    }

    /// One deferred call with headers and body.
    pub fn get_deferred(&self, id: DeferredId) -> Result<Option<DeferredCall>, StoreError> {
        let conn = self.lock();
        let mut stmt = conn.prepare_cached(concat!(
            "SELECT ",
            call_columns!(),
            " FROM deferred WHERE id = ?1"
        ))?;
        let mut rows = stmt.query([id.0])?;
        match rows.next()? {
            Some(row) => Ok(Some(call_from_row(row)?)),
            None => Ok(None),
        }
    }

    /// Deferred calls matching `filter`, newest first, without headers or bodies.
    pub fn list_deferred(
        &self,
        filter: DeferredFilter,
    ) -> Result<Vec<DeferredSummary>, StoreError> {
        let mut sql = String::from(concat!("SELECT ", summary_columns!(), " FROM deferred"));
        let mut args: Vec<rusqlite::types::Value> = Vec::new();
        let mut clauses: Vec<String> = Vec::new();
        let mut push = |clause: &str, value: rusqlite::types::Value| {
            args.push(value);
            clauses.push(format!("{clause} ?{}", args.len()));
        };
        if let Some(org) = filter.org {
            push("org =", org.into());
        }
        if let Some(integration) = filter.integration {
            push("integration =", integration.into());
        }
        if let Some(state) = filter.state {
            push("state =", state.as_str().to_owned().into());
        }
        if let Some(before) = filter.before {
            push("id <", before.0.into());
        }
        if !clauses.is_empty() {
            sql.push_str(" WHERE ");
            sql.push_str(&clauses.join(" AND "));
        }
        args.push(sql_count(filter.limit).into());
        sql.push_str(&format!(" ORDER BY id DESC LIMIT ?{}", args.len()));

        let conn = self.lock();
        let mut stmt = conn.prepare_cached(&sql)?;
        let mut rows = stmt.query(rusqlite::params_from_iter(args))?;
        let mut out = Vec::new();
        while let Some(row) = rows.next()? {
            out.push(summary_from_row(row)?);
        }
        Ok(out)
    }

    /// Admin retry: a failed call goes back to pending, due at `now_ms`, attempts and errors
    /// cleared. False if the call does not exist or is not failed.
    pub fn retry_deferred(&self, id: DeferredId, now_ms: u64) -> Result<bool, StoreError> {
        let now = sql_ms(now_ms);
        let n = self
            .lock()
            .prepare_cached(
                "UPDATE deferred SET state = 'pending', attempts = 0, next_attempt_ms = ?2, \
                 updated_ms = ?2, last_error = NULL, upstream_status = NULL, \
                 upstream_body = NULL WHERE id = ?1 AND state = 'failed'",
            )?
            .execute(params![id.0, now])?;
        Ok(n > 0)
    }

    /// Admin discard: a pending or failed call is dropped (kept as discarded until purged).
    /// False if the call does not exist or is in flight, delivered or already discarded.
    pub fn discard_deferred(&self, id: DeferredId, now_ms: u64) -> Result<bool, StoreError> {
        let n = self
            .lock()
            .prepare_cached(
                "UPDATE deferred SET state = 'discarded', updated_ms = ?2 \
                 WHERE id = ?1 AND state IN ('pending', 'failed')",
            )?
            .execute(params![id.0, sql_ms(now_ms)])?;
        Ok(n > 0)
    }

    /// Deletes delivered and discarded calls last updated before `older_than_ms`; returns how
    /// many. Pending, in-flight and failed calls are never purged.
    pub fn purge_deferred(&self, older_than_ms: u64) -> Result<usize, StoreError> {
        let n = self
            .lock()
            .prepare_cached(
                "DELETE FROM deferred WHERE state IN ('delivered', 'discarded') \
                 AND updated_ms < ?1",
            )?
            .execute([sql_ms(older_than_ms)])?;
        Ok(n)
    }

    /// How many calls each `(org, integration)` has in each state (states with none are
    /// absent), ordered by org, integration, state name. Reads the whole `deferred_owner` index:
    /// call it at start-up or per scrape, not per request.
    pub fn deferred_counts(&self) -> Result<Vec<(String, String, DeferredState, u64)>, StoreError> {
        let conn = self.lock();
        let mut stmt = conn.prepare_cached(
            "SELECT org, integration, state, COUNT(*) FROM deferred \
             GROUP BY org, integration, state ORDER BY org, integration, state",
        )?;
        let mut rows = stmt.query([])?;
        let mut out = Vec::new();
        while let Some(row) = rows.next()? {
            let org: String = row.get(0)?;
            let integration: String = row.get(1)?;
            let state: String = row.get(2)?;
            let count: i64 = row.get(3)?;
            let state = state.parse().map_err(|error: ParseError| {
                StoreError::Corrupt(format!("deferred calls of {org}/{integration}: {error}"))
            })?;
            let count = u64::try_from(count).unwrap_or(0);
            out.push((org, integration, state, count));
        }
        Ok(out)
    }

    /// The earliest `next_attempt_ms` of the pending calls of `org`, leaving out the
    /// integrations in `skip`, or `None` if it has none: when its replayer next has work.
    /// Cost: the pending rows of `org`.
    pub fn next_due(&self, org: &str, skip: &[&str]) -> Result<Option<u64>, StoreError> {
        let next: Option<i64> = self
            .lock()
            .prepare_cached(
                "SELECT MIN(next_attempt_ms) FROM deferred WHERE org = ?1 AND state = 'pending' \
                 AND integration NOT IN (SELECT value FROM json_each(?2))",
            )?
            .query_row(params![org, json_list(skip)], |row| row.get(0))?;
        Ok(next.map(|ms| u64::try_from(ms).unwrap_or(0)))
    }
}

/// Commits a state transition that changed `n` rows, or explains why it changed none.
fn finish_transition(
    tx: Transaction<'_>,
    n: usize,
    id: DeferredId,
    expected: &'static str,
) -> Result<(), StoreError> {
    if n > 0 {
        tx.commit()?;
        return Ok(());
    }
    let state: Option<String> = tx
        .prepare_cached("SELECT state FROM deferred WHERE id = ?1")?
        .query_row([id.0], |row| row.get(0))
        .optional()?;
    match state {
        None => Err(StoreError::NotFound(id)),
        Some(state) => {
            let found = parse_state(&state, id)?;
            Err(StoreError::WrongState {
                id,
                found,
                expected,
            })
        }
    }
}

fn parse_state(text: &str, id: DeferredId) -> Result<DeferredState, StoreError> {
    text.parse()
        .map_err(|error: ParseError| StoreError::Corrupt(format!("deferred call {id}: {error}")))
}

/// Reads a non-negative integer column of deferred call `id` into `T`.
fn column<T: TryFrom<i64>>(
    row: &Row<'_>,
    idx: usize,
    name: &str,
    id: DeferredId,
) -> Result<T, StoreError> {
    let value: i64 = row.get(idx)?;
    T::try_from(value).map_err(|_| {
        StoreError::Corrupt(format!(
            "deferred call {id}: {name} {value} is out of range"
        ))
    })
}

fn call_from_row(row: &Row<'_>) -> Result<DeferredCall, StoreError> {
    let id = DeferredId(row.get(0)?);
    let headers: String = row.get(5)?;
    let state: String = row.get(8)?;
    let upstream_status: Option<i64> = row.get(14)?;
    Ok(DeferredCall {
        id,
        org: row.get(1)?,
        integration: row.get(2)?,
        method: row.get(3)?,
        path_and_query: row.get(4)?,
        headers: decode_headers(&headers).map_err(|reason| {
            StoreError::Corrupt(format!("deferred call {id}: headers {reason}"))
        })?,
        body: row.get(6)?,
        units: column(row, 7, "units", id)?,
        state: parse_state(&state, id)?,
        attempts: column(row, 9, "attempts", id)?,
        next_attempt_ms: column(row, 10, "next_attempt_ms", id)?,
        created_ms: column(row, 11, "created_ms", id)?,
        updated_ms: column(row, 12, "updated_ms", id)?,
        last_error: row.get(13)?,
        upstream_status: upstream_status
            .map(|status| {
                u16::try_from(status).map_err(|_| {
                    StoreError::Corrupt(format!(
                        "deferred call {id}: upstream_status {status} is out of range"
                    ))
                })
            })
            .transpose()?,
        upstream_body: row.get(15)?,
    })
}

fn summary_from_row(row: &Row<'_>) -> Result<DeferredSummary, StoreError> {
    let id = DeferredId(row.get(0)?);
    let state: String = row.get(6)?;
    let upstream_status: Option<i64> = row.get(12)?;
    let body_len: Option<i64> = row.get(13)?;
    Ok(DeferredSummary {
        id,
        org: row.get(1)?,
        integration: row.get(2)?,
        method: row.get(3)?,
        path_and_query: row.get(4)?,
        units: column(row, 5, "units", id)?,
        state: parse_state(&state, id)?,
        attempts: column(row, 7, "attempts", id)?,
        next_attempt_ms: column(row, 8, "next_attempt_ms", id)?,
        created_ms: column(row, 9, "created_ms", id)?,
        updated_ms: column(row, 10, "updated_ms", id)?,
        last_error: row.get(11)?,
        upstream_status: upstream_status.and_then(|status| u16::try_from(status).ok()),
        body_len: body_len
            .and_then(|len| u64::try_from(len).ok())
            .unwrap_or(0),
    })
}

/// Headers as JSON text, readable with sqlite3: `[[name, value], ...]` where a value is a
/// string when it is UTF-8 and an array of byte values otherwise.
pub(super) fn encode_headers(headers: &[(String, Vec<u8>)]) -> String {
    use serde_json::Value;
    let list = headers
        .iter()
        .map(|(name, value)| {
            let value = match std::str::from_utf8(value) {
                Ok(text) => Value::from(text),
                Err(_) => Value::from(value.clone()),
            };
            Value::Array(vec![Value::from(name.as_str()), value])
        })
        .collect();
    Value::Array(list).to_string()
}

pub(super) fn decode_headers(text: &str) -> Result<Vec<(String, Vec<u8>)>, String> {
    use serde_json::Value;
    let value: Value =
        serde_json::from_str(text).map_err(|error| format!("are not JSON: {error}"))?;
    let Value::Array(list) = value else {
        return Err("are not a JSON array".to_owned());
    };
    list.into_iter()
        .enumerate()
        .map(|(i, entry)| {
            let bad = || format!("entry {i} is not [name, value]");
            let Value::Array(pair) = entry else {
                return Err(bad());
            };
            let [Value::String(name), value] = <[Value; 2]>::try_from(pair).map_err(|_| bad())?
            else {
                return Err(bad());
            };
            let value = match value {
                Value::String(text) => text.into_bytes(),
                Value::Array(bytes) => bytes
                    .iter()
                    .map(|byte| byte.as_u64().and_then(|b| u8::try_from(b).ok()))
                    .collect::<Option<Vec<u8>>>()
                    .ok_or_else(|| format!("entry {i} has a byte value out of 0..=255"))?,
                _ => return Err(bad()),
            };
            Ok((name, value))
        })
        .collect()
}
