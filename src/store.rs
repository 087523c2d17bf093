//! The embedded database: everything the proxy must remember across a restart or a `kill -9`.
//!
//! It holds the per-minute window buckets of every org and integration (snapshotted every few
//! seconds and on shutdown), small key/value state (the org's "exhausted" flag, the last usage
//! report), the deferred calls of integrations with `on_limit = "defer"` and their delivery
//! state, thresholds set at run time, which threshold level was last emailed per org, and the
//! daily history of counted calls.
//!
//! # Why SQLite
//!
//! SQLite (bundled through rusqlite) rather than redb: the admin's "sync failures" list and its
//! filters are plain SQL; the file is one well-known format an SRE can open with `sqlite3` to
//! inspect or repair; and WAL mode lets readers (admin API, a second `sqlite3`) run while the
//! proxy writes. The database is small and written a few times per second at most.
//!
//! # Durability
//!
//! The database runs with `journal_mode=WAL` and `synchronous=FULL` on every connection, so each
//! committed transaction has been fsync'd to the write-ahead log when the call returns. That is
//! what [`Store::defer`] needs (a deferred call is on disk before the proxy answers 202); the
//! other writes are few (a window snapshot every few seconds, one transition per replayed call),
//! so one fsync each is cheap and keeps a single, simple durability rule.
//!
//! Deferred calls move through [`DeferredState`]: `pending` → `in_flight` (claimed by a replayer,
//! [`Store::claim_due`]) → `delivered` | `pending` again (retry) | `failed`; the admin can retry
//! a failed call or discard a pending or failed one. A crash leaves claimed calls `in_flight`;
//! [`Store::requeue_in_flight`] at start-up puts them back, so delivery is at-least-once.
//!
//! # Security
//!
//! Deferred calls carry the integration's headers, bearer tokens included, so the file is
//! created with mode 0600 before SQLite writes to it (SQLite gives its `-wal` and `-shm` files
//! the same mode). An existing file readable by group or others is set back to 0600 with a
//! warning. `Debug` of [`NewDeferred`] and [`DeferredCall`] prints header names only.
//!
//! # Use from async code
//!
//! The API is synchronous: methods take `&self` and lock one `std::sync::Mutex` around the
//! connection. Every call touches only the rows it reads or writes (through an index) and the
//! fsync of a write is the longest part, typically well under a millisecond to a few
//! milliseconds. Callers on the request path (`defer`) or with many rows (`save_windows`,
//! `list_deferred`) should run them in `tokio::task::spawn_blocking` (share the store as
//! `Arc<Store>`); short, rare calls may accept the brief block of a runtime thread.
//!
//! The schema is versioned in the `schema_version` table and migrated forward on open; a file
//! from a newer build is refused rather than misread.

use std::fmt;
use std::fs::{self, OpenOptions};
use std::io;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use rusqlite::{params, Connection, OptionalExtension, Row, Transaction, TransactionBehavior};
use serde::Serialize;

/// How long a statement waits for a lock held by another connection (e.g. `sqlite3` run by an
/// SRE, or a second process) before it fails with "database is locked".
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// The schema migrations, in order: entry `i` brings the schema from version `i` to `i + 1`.
/// Never edit a released entry; append a new one.
const MIGRATIONS: &[&str] = &[
    // Version 1.
    r#"
    CREATE TABLE window_bucket (
        org         TEXT    NOT NULL,
        integration TEXT    NOT NULL,          -- '' is the org-level window
        minute      INTEGER NOT NULL,          -- minutes since the Unix epoch
        count       INTEGER NOT NULL,
        PRIMARY KEY (org, integration, minute)
    ) WITHOUT ROWID;
    CREATE INDEX window_bucket_minute ON window_bucket (minute);

    CREATE TABLE state (
        key   TEXT NOT NULL PRIMARY KEY,
        value TEXT NOT NULL
    ) WITHOUT ROWID;

    CREATE TABLE deferred (
        id              INTEGER PRIMARY KEY AUTOINCREMENT,
        org             TEXT    NOT NULL,
        integration     TEXT    NOT NULL,
        method          TEXT    NOT NULL,
        path_and_query  TEXT    NOT NULL,
        headers         TEXT    NOT NULL,      -- JSON: [[name, "text" | [bytes]], ...]
        body            BLOB    NOT NULL,
        units           INTEGER NOT NULL,
        state           TEXT    NOT NULL CHECK (state IN
                            ('pending', 'in_flight', 'delivered', 'failed', 'discarded')),
        attempts        INTEGER NOT NULL DEFAULT 0,
        next_attempt_ms INTEGER NOT NULL,
        created_ms      INTEGER NOT NULL,
        updated_ms      INTEGER NOT NULL,
        last_error      TEXT,
        upstream_status INTEGER,
        upstream_body   BLOB
    );
    CREATE INDEX deferred_claim ON deferred (org, state, id);
    CREATE INDEX deferred_owner ON deferred (org, integration, state);
    CREATE INDEX deferred_purge ON deferred (state, updated_ms);

    CREATE TABLE history (
        day         TEXT    NOT NULL,          -- YYYY-MM-DD (UTC calendar day)
        org         TEXT    NOT NULL,
        integration TEXT    NOT NULL,
        calls       INTEGER NOT NULL,
        PRIMARY KEY (day, org, integration)
    ) WITHOUT ROWID;

    CREATE TABLE org_threshold (
        org  TEXT NOT NULL PRIMARY KEY,
        json TEXT NOT NULL
    ) WITHOUT ROWID;

    CREATE TABLE org_notify (
        org   TEXT NOT NULL PRIMARY KEY,
        value TEXT NOT NULL
    ) WITHOUT ROWID;
    "#,
];

/// The schema version this build writes and understands.
pub const SCHEMA_VERSION: u32 = MIGRATIONS.len() as u32;

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

/// What can go wrong with the store. Every message says what to check or do.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error(
        "cannot create the store database {} or its directory: {source}; check that `store.path` \
         points into a directory this user may write",
        .path.display()
    )]
    Create { path: PathBuf, source: io::Error },

    #[error(
        "cannot set the mode of the store database {} to 0600 (it holds bearer tokens of deferred \
         calls): {source}; run the proxy as the file's owner or fix the mode by hand",
        .path.display()
    )]
    Permissions { path: PathBuf, source: io::Error },

    #[error(
        "cannot open the store database {}: {source}; check that `store.path` names a callmeter \
         database (or a new file) on a local, writable filesystem",
        .path.display()
    )]
    Open {
        path: PathBuf,
        source: rusqlite::Error,
    },

    #[error(
        "the store database {} has schema version {found}, but this build understands up to \
         {supported}; run a newer callmeter or point `store.path` at another file",
        .path.display()
    )]
    NewerSchema {
        path: PathBuf,
        found: i64,
        supported: u32,
    },

    #[error(
        "store database error: {0}; if it persists, check disk space and the file's health \
         with `sqlite3 FILE 'PRAGMA integrity_check'`"
    )]
    Sql(#[from] rusqlite::Error),

    #[error(
        "the store database holds invalid data: {0}; inspect the row with sqlite3 and fix or \
         delete it"
    )]
    Corrupt(String),

    #[error("invalid input to the store: {0}")]
    Invalid(String),

    #[error(
        "deferred call {0} does not exist (it may have been purged); list the current ones with \
         GET /api/v1/deferred"
    )]
    NotFound(DeferredId),

    #[error(
        "deferred call {id} is {found}, not {expected}; another replayer or the admin changed \
         it first"
    )]
    WrongState {
        id: DeferredId,
        found: DeferredState,
        expected: &'static str,
    },
}

/// A text value that does not parse as a [`DeferredId`] or a [`DeferredState`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{input:?} is not a valid {what}; expected {expected}")]
pub struct ParseError {
    pub what: &'static str,
    pub expected: &'static str,
    pub input: String,
}

impl ParseError {
    fn new(what: &'static str, expected: &'static str, input: &str) -> Self {
        // The input may come from a URL: keep the message short.
        let input = input.chars().take(64).collect();
        ParseError {
            what,
            expected,
            input,
        }
    }
}

/// The window buckets of one org (`integration` empty) or one integration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct WindowSnapshot {
    pub org: String,
    /// The integration's id; empty for the org-level window.
    pub integration: String,
    /// `(minute, count)`: minutes since the Unix epoch and the calls counted in that minute.
    pub buckets: Vec<(u32, u32)>,
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

/// Counted calls of one integration of one org on one calendar day.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct HistoryRow {
    pub day: String,
    pub org: String,
    pub integration: String,
    pub calls: u64,
}

/// The embedded database. Share it as `Arc<Store>`; see the module docs for use from async code.
pub struct Store {
    conn: Mutex<Connection>,
    path: Option<PathBuf>,
}

impl fmt::Debug for Store {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Store").field("path", &self.path).finish()
    }
}

/// One of the small key → text tables: its three statements.
struct Kv {
    upsert: &'static str,
    select: &'static str,
    delete: &'static str,
}

const STATE: Kv = Kv {
    upsert: "INSERT INTO state (key, value) VALUES (?1, ?2) ON CONFLICT (key) DO UPDATE SET value = excluded.value",
    select: "SELECT value FROM state WHERE key = ?1",
    delete: "DELETE FROM state WHERE key = ?1",
};

const THRESHOLD: Kv = Kv {
    upsert: "INSERT INTO org_threshold (org, json) VALUES (?1, ?2) ON CONFLICT (org) DO UPDATE SET json = excluded.json",
    select: "SELECT json FROM org_threshold WHERE org = ?1",
    delete: "DELETE FROM org_threshold WHERE org = ?1",
};

const NOTIFY: Kv = Kv {
    upsert: "INSERT INTO org_notify (org, value) VALUES (?1, ?2) ON CONFLICT (org) DO UPDATE SET value = excluded.value",
    select: "SELECT value FROM org_notify WHERE org = ?1",
    delete: "DELETE FROM org_notify WHERE org = ?1",
};

impl Store {
    /// Opens (or creates) the database at `path`: creates missing parent directories, creates
    /// the file with mode 0600 before SQLite writes to it (an existing file readable by group or
    /// others is set to 0600 with a warning), turns on WAL and `synchronous=FULL`, and migrates
    /// the schema to [`SCHEMA_VERSION`].
    pub fn open(path: &Path) -> Result<Store, StoreError> {
        if let Some(dir) = path.parent().filter(|dir| !dir.as_os_str().is_empty()) {
            fs::create_dir_all(dir).map_err(|source| StoreError::Create {
                path: path.to_path_buf(),
                source,
            })?;
        }
        secure_files(path)?;
        let conn = Connection::open(path).map_err(|source| StoreError::Open {
            path: path.to_path_buf(),
            source,
        })?;
        let store = Store {
            conn: Mutex::new(conn),
            path: Some(path.to_path_buf()),
        };
        store.init().map_err(|error| match error {
            StoreError::Sql(source) => StoreError::Open {
                path: path.to_path_buf(),
                source,
            },
            other => other,
        })?;
        Ok(store)
    }

    /// A private in-memory database with the same schema, for tests.
    pub fn open_in_memory() -> Result<Store, StoreError> {
        let conn = Connection::open_in_memory()?;
        let store = Store {
            conn: Mutex::new(conn),
            path: None,
        };
        store.init()?;
        Ok(store)
    }

    /// The database file, `None` in memory.
    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    fn init(&self) -> Result<(), StoreError> {
        let mut conn = self.lock();
        conn.busy_timeout(BUSY_TIMEOUT)?;
        let mode: String =
            conn.pragma_update_and_check(None, "journal_mode", "WAL", |row| row.get(0))?;
        if self.path.is_some() && !mode.eq_ignore_ascii_case("wal") {
            tracing::warn!(
                path = %self.display_path(),
                journal_mode = %mode,
                "the store database could not switch to WAL mode; readers will block writers"
            );
        }
        conn.pragma_update(None, "synchronous", "FULL")?;
        self.migrate(&mut conn)
    }

    fn migrate(&self, conn: &mut Connection) -> Result<(), StoreError> {
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        tx.execute_batch("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")?;
        let found: Option<i64> =
            tx.query_row("SELECT MAX(version) FROM schema_version", [], |row| {
                row.get(0)
            })?;
        let found = found.unwrap_or(0);
        if found > i64::from(SCHEMA_VERSION) {
            return Err(StoreError::NewerSchema {
                path: self.path.clone().unwrap_or_default(),
                found,
                supported: SCHEMA_VERSION,
            });
        }
        let start = usize::try_from(found).map_err(|_| {
            StoreError::Corrupt(format!("schema_version holds {found}, expected 0 or more"))
        })?;
        if start == MIGRATIONS.len() {
            return Ok(());
        }
        for sql in &MIGRATIONS[start..] {
            tx.execute_batch(sql)?;
        }
        tx.execute("DELETE FROM schema_version", [])?;
        tx.execute(
            "INSERT INTO schema_version (version) VALUES (?1)",
            [SCHEMA_VERSION],
        )?;
        tx.commit()?;
        tracing::info!(
            path = %self.display_path(),
            from = found,
            to = SCHEMA_VERSION,
            "store database schema migrated"
        );
        Ok(())
    }

    fn display_path(&self) -> String {
        match &self.path {
            Some(path) => path.display().to_string(),
            None => ":memory:".to_owned(),
        }
    }

    /// The connection. A panic while it was held rolled its transaction back (a `Transaction`
    /// rolls back on drop), so a poisoned lock still guards a consistent connection.
    fn lock(&self) -> MutexGuard<'_, Connection> {
        self.conn.lock().unwrap_or_else(PoisonError::into_inner)
    }

    // ----- window snapshots -------------------------------------------------------------

    /// Replaces every stored bucket with `snapshot`, in one transaction. Buckets are applied in
    /// order: a later `(org, integration, minute)` overrides an earlier one, and a count of 0
    /// stores nothing. Cost: the rows deleted plus the rows written.
    pub fn save_windows(&self, snapshot: &[WindowSnapshot]) -> Result<(), StoreError> {
        let mut conn = self.lock();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        tx.execute("DELETE FROM window_bucket", [])?;
        apply_buckets(&tx, snapshot, 0)?;
        tx.commit()?;
        Ok(())
    }

    /// Updates only the buckets in `snapshot` (a count of 0 removes the bucket) and deletes
    /// buckets older than `oldest_minute`, in one transaction; buckets in `snapshot` older than
    /// `oldest_minute` are ignored. The cheap periodic snapshot: pass the minutes changed since
    /// the last one. Cost: the rows written plus the rows aged out.
    pub fn update_windows(
        &self,
        snapshot: &[WindowSnapshot],
        oldest_minute: u32,
    ) -> Result<(), StoreError> {
        let mut conn = self.lock();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        tx.execute(
            "DELETE FROM window_bucket WHERE minute < ?1",
            [oldest_minute],
        )?;
        apply_buckets(&tx, snapshot, oldest_minute)?;
        tx.commit()?;
        Ok(())
    }

    /// Deletes buckets older than `oldest_minute` and returns the rest: one snapshot per
    /// `(org, integration)` that has buckets left, ordered by org then integration, buckets by
    /// minute.
    pub fn load_windows(&self, oldest_minute: u32) -> Result<Vec<WindowSnapshot>, StoreError> {
        let mut conn = self.lock();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        tx.execute(
            "DELETE FROM window_bucket WHERE minute < ?1",
            [oldest_minute],
        )?;
        let mut out: Vec<WindowSnapshot> = Vec::new();
        {
            let mut stmt = tx.prepare(
                "SELECT org, integration, minute, count FROM window_bucket \
                 ORDER BY org, integration, minute",
            )?;
            let mut rows = stmt.query([])?;
            while let Some(row) = rows.next()? {
                let org: String = row.get(0)?;
                let integration: String = row.get(1)?;
                let minute: i64 = row.get(2)?;
                let count: i64 = row.get(3)?;
                let what = || format!("window bucket ({org:?}, {integration:?}, minute {minute})");
                let minute_u32 = u32::try_from(minute).map_err(|_| {
                    StoreError::Corrupt(format!("{}: the minute is out of range", what()))
                })?;
                let count = u32::try_from(count).map_err(|_| {
                    StoreError::Corrupt(format!("{}: count {count} is out of range", what()))
                })?;
                match out.last_mut() {
                    Some(last) if last.org == org && last.integration == integration => {
                        last.buckets.push((minute_u32, count));
                    }
                    _ => out.push(WindowSnapshot {
                        org,
                        integration,
                        buckets: vec![(minute_u32, count)],
                    }),
                }
            }
        }
        tx.commit()?;
        Ok(out)
    }

    // ----- key/value state --------------------------------------------------------------

    fn kv_put(&self, kv: &Kv, key: &str, value: &str) -> Result<(), StoreError> {
        self.lock()
            .prepare_cached(kv.upsert)?
            .execute(params![key, value])?;
        Ok(())
    }

    fn kv_get(&self, kv: &Kv, key: &str) -> Result<Option<String>, StoreError> {
        Ok(self
            .lock()
            .prepare_cached(kv.select)?
            .query_row([key], |row| row.get(0))
            .optional()?)
    }

    fn kv_delete(&self, kv: &Kv, key: &str) -> Result<bool, StoreError> {
        Ok(self.lock().prepare_cached(kv.delete)?.execute([key])? > 0)
    }

    /// Sets `key` to `value` (durable when it returns).
    pub fn put_state(&self, key: &str, value: &str) -> Result<(), StoreError> {
        self.kv_put(&STATE, key, value)
    }

    /// The value of `key`, if set.
    pub fn get_state(&self, key: &str) -> Result<Option<String>, StoreError> {
        self.kv_get(&STATE, key)
    }

    /// Removes `key`; false if it was not set.
    pub fn delete_state(&self, key: &str) -> Result<bool, StoreError> {
        self.kv_delete(&STATE, key)
    }

    // ----- thresholds and notification state --------------------------------------------

    /// Stores the threshold the admin set for `org` at run time, as JSON text (checked to be
    /// valid JSON; its shape is the caller's).
    pub fn put_threshold(&self, org: &str, json: &str) -> Result<(), StoreError> {
        serde_json::from_str::<serde_json::Value>(json).map_err(|error| {
            StoreError::Invalid(format!("the threshold of org {org:?} is not JSON: {error}"))
        })?;
        self.kv_put(&THRESHOLD, org, json)
    }

    /// The threshold JSON stored for `org`, if any.
    pub fn get_threshold(&self, org: &str) -> Result<Option<String>, StoreError> {
        self.kv_get(&THRESHOLD, org)
    }

    /// Every stored threshold as `(org, json)`, by org.
    pub fn thresholds(&self) -> Result<Vec<(String, String)>, StoreError> {
        let conn = self.lock();
        let mut stmt = conn.prepare_cached("SELECT org, json FROM org_threshold ORDER BY org")?;
        let rows = stmt.query_map([], |row| Ok((row.get(0)?, row.get(1)?)))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Forgets the run-time threshold of `org` (the configured one applies again).
    pub fn delete_threshold(&self, org: &str) -> Result<bool, StoreError> {
        self.kv_delete(&THRESHOLD, org)
    }

    /// Records the notification state of `org` (e.g. which threshold level was last emailed).
    pub fn put_notify_state(&self, org: &str, value: &str) -> Result<(), StoreError> {
        self.kv_put(&NOTIFY, org, value)
    }

    /// The notification state of `org`, if recorded.
    pub fn get_notify_state(&self, org: &str) -> Result<Option<String>, StoreError> {
        self.kv_get(&NOTIFY, org)
    }

    /// Clears the notification state of `org`; false if there was none.
    pub fn delete_notify_state(&self, org: &str) -> Result<bool, StoreError> {
        self.kv_delete(&NOTIFY, org)
    }

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

    /// Puts every in-flight call back to pending and returns how many. Call it once at
    /// start-up, before any replayer runs: calls left in flight by a crash may or may not have
    /// reached Salesforce, so they are sent again (at-least-once).
    pub fn requeue_in_flight(&self) -> Result<usize, StoreError> {
        let n = self.lock().execute(
            "UPDATE deferred SET state = 'pending' WHERE state = 'in_flight'",
            [],
        )?;
        Ok(n)
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
        let mut conn = self.lock();
        let tx = conn.transaction()?;
        let n = tx
            .prepare_cached(
                "UPDATE deferred SET state = 'pending', attempts = attempts + 1, \
                 next_attempt_ms = ?2, updated_ms = ?3, last_error = ?4 \
                 WHERE id = ?1 AND state = 'in_flight'",
            )?
            .execute(params![
                id.0,
                sql_ms(next_attempt_ms),
                sql_ms(now_ms),
                error
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

/// Writes each bucket of `snapshot` not older than `oldest_minute`: a count sets the bucket,
/// 0 deletes it.
fn apply_buckets(
    tx: &Transaction<'_>,
    snapshot: &[WindowSnapshot],
    oldest_minute: u32,
) -> Result<(), StoreError> {
    let mut upsert = tx.prepare_cached(
        "INSERT INTO window_bucket (org, integration, minute, count) VALUES (?1, ?2, ?3, ?4) \
         ON CONFLICT (org, integration, minute) DO UPDATE SET count = excluded.count",
    )?;
    let mut delete = tx.prepare_cached(
        "DELETE FROM window_bucket WHERE org = ?1 AND integration = ?2 AND minute = ?3",
    )?;
    for window in snapshot {
        for &(minute, count) in &window.buckets {
            if minute < oldest_minute {
                continue;
            }
            if count == 0 {
                delete.execute(params![window.org, window.integration, minute])?;
            } else {
                upsert.execute(params![window.org, window.integration, minute, count])?;
            }
        }
    }
    Ok(())
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

/// Creates the database file with mode 0600 if it is missing, and sets the database file and
/// any `-wal`/`-shm`/`-journal` file beside it back to 0600 if group or others may read them.
#[cfg(unix)]
fn secure_files(path: &Path) -> Result<(), StoreError> {
    use std::os::unix::fs::OpenOptionsExt;

    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(path)
        .map_err(|source| StoreError::Create {
            path: path.to_path_buf(),
            source,
        })?;
    restrict_mode(path, &file)?;
    drop(file);
    for suffix in ["-wal", "-shm", "-journal"] {
        let mut side = path.as_os_str().to_owned();
        side.push(suffix);
        let side = PathBuf::from(side);
        match OpenOptions::new().read(true).open(&side) {
            Ok(file) => restrict_mode(&side, &file)?,
            Err(error) if error.kind() == io::ErrorKind::NotFound => {}
            Err(source) => return Err(StoreError::Permissions { path: side, source }),
        }
    }
    Ok(())
}

#[cfg(unix)]
fn restrict_mode(path: &Path, file: &fs::File) -> Result<(), StoreError> {
    use std::os::unix::fs::PermissionsExt;

    let permissions = |source| StoreError::Permissions {
        path: path.to_path_buf(),
        source,
    };
    let mode = file.metadata().map_err(permissions)?.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        tracing::warn!(
            path = %path.display(),
            mode = format_args!("{mode:o}"),
            "store database file was readable by group or others; setting its mode to 0600"
        );
        file.set_permissions(fs::Permissions::from_mode(0o600))
            .map_err(permissions)?;
    }
    Ok(())
}

#[cfg(not(unix))]
fn secure_files(path: &Path) -> Result<(), StoreError> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
        .map(drop)
        .map_err(|source| StoreError::Create {
            path: path.to_path_buf(),
            source,
        })
}

/// A millisecond timestamp as SQLite's signed integer; values past `i64::MAX` (292 million
/// years) saturate.
fn sql_ms(ms: u64) -> i64 {
    i64::try_from(ms).unwrap_or(i64::MAX)
}

/// A list of names as the JSON array SQLite's `json_each` reads (one statement for any length).
fn json_list(names: &[&str]) -> String {
    serde_json::to_string(names).unwrap_or_else(|_| "[]".to_owned())
}

fn sql_count(n: usize) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

fn sql_count_u64(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
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
fn encode_headers(headers: &[(String, Vec<u8>)]) -> String {
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

fn decode_headers(text: &str) -> Result<Vec<(String, Vec<u8>)>, String> {
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

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeMap;

    fn call(org: &str, n: u64) -> NewDeferred {
        NewDeferred {
            org: org.to_owned(),
            integration: "etl".to_owned(),
            method: "POST".to_owned(),
            path_and_query: format!("/services/data/v60.0/sobjects/Account?n={n}"),
            headers: vec![
                ("authorization".to_owned(), b"Bearer 00Dxx!secret".to_vec()),
                ("x-binary".to_owned(), vec![0xff, 0x00, b'a']),
            ],
            body: format!("{{\"Name\":\"n{n}\"}}").into_bytes(),
            units: 1,
            created_ms: 1_000 + n,
        }
    }

    fn mode_of(path: &Path) -> u32 {
        use std::os::unix::fs::PermissionsExt;
        fs::metadata(path).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn open_creates_parent_dirs_and_a_0600_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a/b/callmeter.db");
        let store = Store::open(&path).unwrap();
        assert!(path.is_file());
        assert_eq!(mode_of(&path), 0o600);
        store.defer(&call("acme", 1)).unwrap();
        let wal = dir.path().join("a/b/callmeter.db-wal");
        assert!(wal.exists(), "WAL mode keeps a -wal file while open");
        assert_eq!(mode_of(&wal), 0o600);
        assert_eq!(store.path(), Some(path.as_path()));
    }

    #[test]
    fn open_restricts_an_existing_world_readable_file() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db");
        drop(Store::open(&path).unwrap());
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
        let store = Store::open(&path).unwrap();
        assert_eq!(mode_of(&path), 0o600);
        store.put_state("k", "v").unwrap();
    }

    #[test]
    fn open_refuses_a_file_that_is_not_a_database() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notes.txt");
        fs::write(
            &path,
            "this is not SQLite, just some text long enough to have a header....",
        )
        .unwrap();
        let error = Store::open(&path).unwrap_err();
        assert!(matches!(error, StoreError::Open { .. }), "{error:?}");
        assert!(error.to_string().contains("store.path"), "{error}");
    }

    #[test]
    fn open_refuses_a_newer_schema() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db");
        drop(Store::open(&path).unwrap());
        Connection::open(&path)
            .unwrap()
            .execute("UPDATE schema_version SET version = 99", [])
            .unwrap();
        let error = Store::open(&path).unwrap_err();
        assert!(
            matches!(
                error,
                StoreError::NewerSchema {
                    found: 99,
                    supported: 1,
                    ..
                }
            ),
            "{error:?}"
        );
    }

    #[test]
    fn open_reports_an_unwritable_directory() {
        let dir = tempfile::tempdir().unwrap();
        let blocker = dir.path().join("file");
        fs::write(&blocker, "x").unwrap();
        let error = Store::open(&blocker.join("sub/db")).unwrap_err();
        assert!(matches!(error, StoreError::Create { .. }), "{error:?}");
    }

    #[test]
    fn reopening_keeps_data_and_schema_version() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db");
        {
            let store = Store::open(&path).unwrap();
            store.put_state("exhausted:acme", "true").unwrap();
            store.defer(&call("acme", 1)).unwrap();
            store
                .save_windows(&[WindowSnapshot {
                    org: "acme".into(),
                    integration: String::new(),
                    buckets: vec![(100, 5)],
                }])
                .unwrap();
            store.add_history("2024-05-01", "acme", "etl", 7).unwrap();
            store
                .put_threshold("acme", r#"{"levels":["80%"]}"#)
                .unwrap();
            store.put_notify_state("acme", "80%").unwrap();
        }
        let store = Store::open(&path).unwrap();
        assert_eq!(
            store.get_state("exhausted:acme").unwrap().as_deref(),
            Some("true")
        );
        assert_eq!(
            store
                .list_deferred(DeferredFilter::default())
                .unwrap()
                .len(),
            1
        );
        assert_eq!(store.load_windows(0).unwrap()[0].buckets, vec![(100, 5)]);
        assert_eq!(store.history(None, "2024-01-01").unwrap()[0].calls, 7);
        assert_eq!(
            store.get_threshold("acme").unwrap().as_deref(),
            Some(r#"{"levels":["80%"]}"#)
        );
        assert_eq!(
            store.get_notify_state("acme").unwrap().as_deref(),
            Some("80%")
        );
        let version: i64 = store
            .lock()
            .query_row("SELECT version FROM schema_version", [], |r| r.get(0))
            .unwrap();
        assert_eq!(version, 1);
    }

    #[test]
    fn windows_round_trip_and_old_buckets_are_dropped() {
        let store = Store::open_in_memory().unwrap();
        let snapshot = vec![
            WindowSnapshot {
                org: "acme".into(),
                integration: String::new(),
                buckets: vec![(10, 1), (20, 2), (30, 3)],
            },
            WindowSnapshot {
                org: "acme".into(),
                integration: "etl".into(),
                buckets: vec![(5, 9), (25, 4)],
            },
        ];
        store.save_windows(&snapshot).unwrap();
        assert_eq!(store.load_windows(0).unwrap(), snapshot);
        let loaded = store.load_windows(20).unwrap();
        assert_eq!(loaded[0].buckets, vec![(20, 2), (30, 3)]);
        assert_eq!(loaded[1].buckets, vec![(25, 4)]);
        // The dropped buckets are gone from the file too.
        assert_eq!(store.load_windows(0).unwrap(), loaded);
        // A second save replaces everything.
        store
            .save_windows(&[WindowSnapshot {
                org: "other".into(),
                integration: String::new(),
                buckets: vec![(40, 1)],
            }])
            .unwrap();
        let loaded = store.load_windows(0).unwrap();
        assert_eq!(loaded.len(), 1);
        assert_eq!(loaded[0].org, "other");
    }

    #[test]
    fn update_windows_sets_removes_and_ages_out() {
        let store = Store::open_in_memory().unwrap();
        let w = |integration: &str, buckets: Vec<(u32, u32)>| WindowSnapshot {
            org: "acme".into(),
            integration: integration.into(),
            buckets,
        };
        store
            .save_windows(&[w("", vec![(10, 1), (20, 2)])])
            .unwrap();
        store
            .update_windows(
                &[
                    w("", vec![(20, 5), (30, 1), (5, 7)]),
                    w("etl", vec![(30, 0)]),
                ],
                15,
            )
            .unwrap();
        assert_eq!(
            store.load_windows(0).unwrap(),
            vec![w("", vec![(20, 5), (30, 1)])]
        );
        store.update_windows(&[w("", vec![(30, 0)])], 0).unwrap();
        assert_eq!(store.load_windows(0).unwrap(), vec![w("", vec![(20, 5)])]);
    }

    #[test]
    fn state_put_get_overwrite_delete() {
        let store = Store::open_in_memory().unwrap();
        assert_eq!(store.get_state("k").unwrap(), None);
        store.put_state("k", "1").unwrap();
        store.put_state("k", "2").unwrap();
        assert_eq!(store.get_state("k").unwrap().as_deref(), Some("2"));
        assert!(store.delete_state("k").unwrap());
        assert!(!store.delete_state("k").unwrap());
        assert_eq!(store.get_state("k").unwrap(), None);
    }

    #[test]
    fn thresholds_and_notify_state() {
        let store = Store::open_in_memory().unwrap();
        let error = store.put_threshold("acme", "{not json").unwrap_err();
        assert!(matches!(error, StoreError::Invalid(_)), "{error:?}");
        store.put_threshold("b", "[1]").unwrap();
        store.put_threshold("a", "{}").unwrap();
        store.put_threshold("a", r#"{"x":1}"#).unwrap();
        assert_eq!(
            store.thresholds().unwrap(),
            vec![
                ("a".into(), r#"{"x":1}"#.into()),
                ("b".into(), "[1]".into())
            ]
        );
        assert!(store.delete_threshold("b").unwrap());
        assert_eq!(store.get_threshold("b").unwrap(), None);
        assert_eq!(store.get_notify_state("a").unwrap(), None);
        store.put_notify_state("a", "90%").unwrap();
        assert_eq!(store.get_notify_state("a").unwrap().as_deref(), Some("90%"));
        assert!(store.delete_notify_state("a").unwrap());
    }

    #[test]
    fn deferred_lifecycle() {
        let store = Store::open_in_memory().unwrap();
        let new = call("acme", 1);
        let id = store.defer(&new).unwrap();
        assert_eq!(store.next_due("acme", &[]).unwrap(), Some(new.created_ms));

        let stored = store.get_deferred(id).unwrap().unwrap();
        assert_eq!(stored.headers, new.headers);
        assert_eq!(stored.body, new.body);
        assert_eq!(stored.state, DeferredState::Pending);
        assert!(
            !format!("{stored:?}").contains("secret"),
            "Debug hides header values"
        );

        let claimed = store.claim_due("acme", 5_000, 10, &[]).unwrap();
        assert_eq!(claimed.len(), 1);
        assert_eq!(claimed[0].id, id);
        assert_eq!(claimed[0].state, DeferredState::InFlight);
        assert!(
            store.claim_due("acme", 5_000, 10, &[]).unwrap().is_empty(),
            "claimed once"
        );
        assert_eq!(
            store.get_deferred(id).unwrap().unwrap().state,
            DeferredState::InFlight
        );
        assert!(
            !store.discard_deferred(id, 5_000).unwrap(),
            "in flight cannot be discarded"
        );

        store
            .mark_delivered(id, 201, b"{\"id\":\"001\"}", 6_000)
            .unwrap();
        let done = store.get_deferred(id).unwrap().unwrap();
        assert_eq!(done.state, DeferredState::Delivered);
        assert_eq!(done.attempts, 1);
        assert_eq!(done.upstream_status, Some(201));
        assert_eq!(
            done.upstream_body.as_deref(),
            Some(&b"{\"id\":\"001\"}"[..])
        );
        assert_eq!(done.updated_ms, 6_000);
        let error = store.mark_retry(id, "late", 0, 6_000).unwrap_err();
        assert!(
            matches!(
                error,
                StoreError::WrongState {
                    found: DeferredState::Delivered,
                    ..
                }
            ),
            "{error:?}"
        );
        let error = store
            .mark_failed(DeferredId(999), "x", None, None, 0)
            .unwrap_err();
        assert!(
            matches!(error, StoreError::NotFound(DeferredId(999))),
            "{error:?}"
        );

        // Retry → failed → admin retry → pending.
        let id2 = store.defer(&call("acme", 2)).unwrap();
        assert_eq!(store.claim_due("acme", 7_000, 10, &[]).unwrap()[0].id, id2);
        store
            .mark_retry(id2, "502 from upstream", 9_000, 7_000)
            .unwrap();
        let waiting = store.get_deferred(id2).unwrap().unwrap();
        assert_eq!(waiting.state, DeferredState::Pending);
        assert_eq!(waiting.attempts, 1);
        assert_eq!(waiting.last_error.as_deref(), Some("502 from upstream"));
        assert!(
            store.claim_due("acme", 8_999, 10, &[]).unwrap().is_empty(),
            "not yet due"
        );
        assert_eq!(store.next_due("acme", &[]).unwrap(), Some(9_000));
        assert_eq!(store.claim_due("acme", 9_000, 10, &[]).unwrap()[0].id, id2);
        store
            .mark_failed(id2, "400 INVALID_FIELD", Some(400), Some(b"[]"), 9_500)
            .unwrap();
        let failed = store.get_deferred(id2).unwrap().unwrap();
        assert_eq!(failed.state, DeferredState::Failed);
        assert_eq!(failed.attempts, 2);
        assert_eq!(failed.upstream_status, Some(400));
        assert!(store.claim_due("acme", 99_999, 10, &[]).unwrap().is_empty());
        assert!(
            !store.retry_deferred(id, 10_000).unwrap(),
            "delivered is not retried"
        );
        assert!(!store.retry_deferred(DeferredId(999), 10_000).unwrap());
        assert!(store.retry_deferred(id2, 10_000).unwrap());
        let again = store.get_deferred(id2).unwrap().unwrap();
        assert_eq!(again.state, DeferredState::Pending);
        assert_eq!(again.attempts, 0);
        assert_eq!(again.next_attempt_ms, 10_000);
        assert_eq!(again.last_error, None);

        // Discard.
        assert!(store.discard_deferred(id2, 11_000).unwrap());
        assert!(!store.discard_deferred(id2, 11_000).unwrap());
        assert!(store.claim_due("acme", 99_999, 10, &[]).unwrap().is_empty());

        // Lists and counts.
        let id3 = store.defer(&call("acme", 3)).unwrap();
        let all = store.list_deferred(DeferredFilter::default()).unwrap();
        assert_eq!(
            all.iter().map(|s| s.id).collect::<Vec<_>>(),
            vec![id3, id2, id]
        );
        assert_eq!(all[2].body_len, new.body.len() as u64);
        let discarded = store
            .list_deferred(DeferredFilter {
                state: Some(DeferredState::Discarded),
                ..DeferredFilter::default()
            })
            .unwrap();
        assert_eq!(
            discarded.iter().map(|s| s.id).collect::<Vec<_>>(),
            vec![id2]
        );
        let page = store
            .list_deferred(DeferredFilter {
                org: Some("acme".into()),
                integration: Some("etl".into()),
                before: Some(id3),
                limit: 1,
                ..DeferredFilter::default()
            })
            .unwrap();
        assert_eq!(page.iter().map(|s| s.id).collect::<Vec<_>>(), vec![id2]);
        assert!(store
            .list_deferred(DeferredFilter {
                org: Some("other".into()),
                ..DeferredFilter::default()
            })
            .unwrap()
            .is_empty());
        assert_eq!(
            store.deferred_counts().unwrap(),
            vec![
                ("acme".into(), "etl".into(), DeferredState::Delivered, 1),
                ("acme".into(), "etl".into(), DeferredState::Discarded, 1),
                ("acme".into(), "etl".into(), DeferredState::Pending, 1),
            ]
        );

        // Purge: only delivered and discarded calls updated before the cut-off.
        assert_eq!(store.purge_deferred(6_000).unwrap(), 0);
        assert_eq!(store.purge_deferred(11_001).unwrap(), 2);
        assert!(store.get_deferred(id).unwrap().is_none());
        assert!(store.get_deferred(id2).unwrap().is_none());
        assert!(store.get_deferred(id3).unwrap().is_some());
        // Ids are never reused after a purge.
        assert!(store.defer(&call("acme", 4)).unwrap() > id3);
    }

    #[test]
    fn claim_due_is_fifo_per_org_and_limited() {
        let store = Store::open_in_memory().unwrap();
        let a: Vec<_> = (0..5)
            .map(|n| store.defer(&call("a", n)).unwrap())
            .collect();
        let b = store.defer(&call("b", 9)).unwrap();
        let ids = |calls: Vec<DeferredCall>| calls.into_iter().map(|c| c.id).collect::<Vec<_>>();
        assert!(
            store.claim_due("a", 0, 10, &[]).unwrap().is_empty(),
            "none due before created"
        );
        assert!(store.claim_due("a", 99_999, 0, &[]).unwrap().is_empty());
        assert_eq!(ids(store.claim_due("a", 99_999, 2, &[]).unwrap()), a[0..2]);
        // A retried call waits; later ones overtake it while it is not due.
        store.mark_retry(a[0], "e", 50_000, 2_000).unwrap();
        assert_eq!(ids(store.claim_due("a", 10_000, 2, &[]).unwrap()), a[2..4]);
        assert_eq!(
            ids(store.claim_due("a", 60_000, 10, &[]).unwrap()),
            vec![a[0], a[4]]
        );
        assert_eq!(ids(store.claim_due("b", 60_000, 10, &[]).unwrap()), vec![b]);
    }

    /// Calls of an integration out of budget are left where they are; the next integration's
    /// calls are taken past them.
    #[test]
    fn claim_due_passes_over_skipped_integrations() {
        let store = Store::open_in_memory().unwrap();
        let held: Vec<_> = (0..3)
            .map(|n| store.defer(&call("acme", n)).unwrap())
            .collect();
        let other = store
            .defer(&NewDeferred {
                integration: "billing".to_owned(),
                ..call("acme", 9)
            })
            .unwrap();
        assert_eq!(store.next_due("acme", &["etl"]).unwrap(), Some(1_009));
        let claimed = store.claim_due("acme", 99_999, 1, &["etl"]).unwrap();
        assert_eq!(claimed.iter().map(|c| c.id).collect::<Vec<_>>(), [other]);
        assert!(store
            .claim_due("acme", 99_999, 10, &["etl"])
            .unwrap()
            .is_empty());
        assert_eq!(store.next_due("acme", &["etl", "billing"]).unwrap(), None);
        let ids: Vec<_> = store
            .claim_due("acme", 99_999, 10, &[])
            .unwrap()
            .into_iter()
            .map(|c| c.id)
            .collect();
        assert_eq!(ids, held);
    }

    #[test]
    fn fail_pending_fails_only_that_orgs_pending_calls() {
        let store = Store::open_in_memory().expect("store");
        let a1 = store.defer(&call("a", 1)).expect("defer");
        let a2 = store.defer(&call("a", 2)).expect("defer");
        let b = store.defer(&call("b", 3)).expect("defer");
        let claimed = store.claim_due("a", u64::MAX / 2, 1, &[]).expect("claim");
        assert_eq!(claimed[0].id, a1);
        assert_eq!(store.fail_pending("a", "gone", 10).expect("fail"), 1);
        let state = |id| store.get_deferred(id).expect("get").expect("call").state;
        assert_eq!(state(a1), DeferredState::InFlight);
        assert_eq!(state(a2), DeferredState::Failed);
        assert_eq!(state(b), DeferredState::Pending);
        let failed = store.get_deferred(a2).expect("get").expect("call");
        assert_eq!(failed.last_error.as_deref(), Some("gone"));
    }

    #[test]
    fn requeue_in_flight_after_a_crash() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db");
        let (claimed, waiting) = {
            let store = Store::open(&path).unwrap();
            let claimed = store.defer(&call("acme", 1)).unwrap();
            let waiting = store.defer(&call("acme", 2)).unwrap();
            assert_eq!(store.claim_due("acme", 10_000, 1, &[]).unwrap().len(), 1);
            (claimed, waiting)
            // Dropped without marking: the "crash".
        };
        let store = Store::open(&path).unwrap();
        assert_eq!(
            store.get_deferred(claimed).unwrap().unwrap().state,
            DeferredState::InFlight
        );
        assert_eq!(store.requeue_in_flight().unwrap(), 1);
        assert_eq!(store.requeue_in_flight().unwrap(), 0);
        let ids: Vec<_> = store
            .claim_due("acme", 10_000, 10, &[])
            .unwrap()
            .into_iter()
            .map(|c| c.id)
            .collect();
        assert_eq!(ids, vec![claimed, waiting]);
        // A requeued call whose answer arrives late may still be recorded as delivered.
        store.requeue_in_flight().unwrap();
        store.mark_delivered(claimed, 200, b"", 11_000).unwrap();
    }

    #[test]
    fn a_second_connection_sees_a_deferred_call_at_once_and_cannot_claim_it_twice() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db");
        let writer = Store::open(&path).unwrap();
        let reader = Store::open(&path).unwrap();
        let id = writer.defer(&call("acme", 1)).unwrap();
        assert_eq!(
            reader.get_deferred(id).unwrap().unwrap().body,
            call("acme", 1).body
        );
        assert_eq!(reader.claim_due("acme", 10_000, 10, &[]).unwrap().len(), 1);
        assert!(writer
            .claim_due("acme", 10_000, 10, &[])
            .unwrap()
            .is_empty());
    }

    const CHILD_ENV: &str = "CALLMETER_STORE_TEST_CHILD_DB";

    /// The child half of `deferred_calls_survive_an_abort`: does nothing unless started by it.
    #[test]
    fn child_defer_then_abort() {
        let Some(path) = std::env::var_os(CHILD_ENV) else {
            return;
        };
        let store = Store::open(Path::new(&path)).unwrap();
        store.defer(&call("acme", 1)).unwrap();
        store.claim_due("acme", 10_000, 1, &[]).unwrap();
        store.defer(&call("acme", 2)).unwrap();
        // Like `kill -9`: no destructor, no checkpoint, no close.
        std::process::abort();
    }

    #[test]
    fn deferred_calls_survive_an_abort() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db");
        let module = module_path!().split_once("::").map_or("", |(_, rest)| rest);
        let output = std::process::Command::new(std::env::current_exe().unwrap())
            .args([
                &format!("{module}::child_defer_then_abort"),
                "--exact",
                "--test-threads=1",
                "--nocapture",
            ])
            .env(CHILD_ENV, &path)
            .output()
            .unwrap();
        assert!(!output.status.success(), "the child aborts: {output:?}");
        let store = Store::open(&path).unwrap();
        let calls = store.list_deferred(DeferredFilter::default()).unwrap();
        assert_eq!(calls.len(), 2, "child output: {output:?}");
        assert_eq!(calls[1].state, DeferredState::InFlight);
        assert_eq!(calls[0].state, DeferredState::Pending);
        assert_eq!(store.requeue_in_flight().unwrap(), 1);
        let replay = store.claim_due("acme", 10_000, 10, &[]).unwrap();
        assert_eq!(replay.len(), 2);
        assert_eq!(replay[0].headers, call("acme", 1).headers);
    }

    #[test]
    fn history_upsert_adds_filters_and_purges() {
        let store = Store::open_in_memory().unwrap();
        store.add_history("2024-05-02", "acme", "etl", 5).unwrap();
        store.add_history("2024-05-02", "acme", "etl", 7).unwrap();
        store.add_history("2024-05-02", "acme", "crm", 1).unwrap();
        store.add_history("2024-05-01", "acme", "etl", 3).unwrap();
        store.add_history("2024-05-03", "beta", "etl", 2).unwrap();
        let rows = store.history(Some("acme"), "2024-05-01").unwrap();
        let flat: Vec<_> = rows
            .iter()
            .map(|r| (r.day.as_str(), r.integration.as_str(), r.calls))
            .collect();
        assert_eq!(
            flat,
            vec![
                ("2024-05-01", "etl", 3),
                ("2024-05-02", "crm", 1),
                ("2024-05-02", "etl", 12)
            ]
        );
        assert_eq!(store.history(None, "2024-05-02").unwrap().len(), 3);
        assert_eq!(store.purge_history("2024-05-02").unwrap(), 1);
        assert_eq!(store.history(None, "2000-01-01").unwrap().len(), 3);
        store
            .add_history("2024-05-03", "beta", "etl", u64::MAX)
            .unwrap();
        store
            .add_history("2024-05-03", "beta", "etl", u64::MAX)
            .unwrap();
        assert_eq!(
            store.history(Some("beta"), "2024-05-03").unwrap()[0].calls,
            i64::MAX as u64
        );
        for bad in [
            "2024-5-1",
            "2024-13-01",
            "2024-05-32",
            "yesterday",
            "2024-05-01x",
            "",
        ] {
            let error = store.add_history(bad, "acme", "etl", 1).unwrap_err();
            assert!(matches!(error, StoreError::Invalid(_)), "{bad}: {error:?}");
        }
        assert!(store.purge_history("soon").is_err());
    }

    #[test]
    fn ids_and_states_parse_and_print() {
        assert_eq!("42".parse::<DeferredId>().unwrap(), DeferredId(42));
        assert_eq!(DeferredId(42).to_string(), "42");
        for bad in ["0", "-1", "+1", "x", "", "99999999999999999999"] {
            assert!(bad.parse::<DeferredId>().is_err(), "{bad}");
        }
        for state in DeferredState::ALL {
            assert_eq!(state.as_str().parse::<DeferredState>().unwrap(), state);
            assert_eq!(
                serde_json::to_string(&state).unwrap(),
                format!("\"{}\"", state.as_str())
            );
        }
        let error = "lost".parse::<DeferredState>().unwrap_err();
        assert!(error.to_string().contains("pending, in_flight"), "{error}");
    }

    #[test]
    fn corrupt_rows_are_reported_not_panicked_on() {
        let store = Store::open_in_memory().unwrap();
        let bad = store.defer(&call("acme", 1)).unwrap();
        let good = store.defer(&call("acme", 2)).unwrap();
        store
            .lock()
            .execute(
                "UPDATE deferred SET headers = '{oops' WHERE id = ?1",
                [bad.0],
            )
            .unwrap();
        let error = store.get_deferred(bad).unwrap_err();
        assert!(matches!(error, StoreError::Corrupt(_)), "{error:?}");
        // The replayer is not blocked by it: the row is failed and skipped.
        let claimed = store.claim_due("acme", 10_000, 10, &[]).unwrap();
        assert_eq!(claimed.iter().map(|c| c.id).collect::<Vec<_>>(), vec![good]);
        let summary = store
            .list_deferred(DeferredFilter {
                state: Some(DeferredState::Failed),
                ..DeferredFilter::default()
            })
            .unwrap();
        assert_eq!(summary[0].id, bad);
        assert!(summary[0]
            .last_error
            .as_deref()
            .unwrap_or("")
            .contains("headers"));

        store
            .lock()
            .execute(
                "INSERT INTO window_bucket (org, integration, minute, count) \
                 VALUES ('a', '', 1, -5)",
                [],
            )
            .unwrap();
        assert!(matches!(store.load_windows(0), Err(StoreError::Corrupt(_))));
    }

    #[test]
    fn headers_encoding_round_trips_and_rejects_garbage() {
        let headers = vec![
            ("a".to_owned(), b"text".to_vec()),
            ("b".to_owned(), vec![0, 255, 128]),
            ("c".to_owned(), Vec::new()),
        ];
        assert_eq!(decode_headers(&encode_headers(&headers)).unwrap(), headers);
        for bad in [
            "{}",
            "[1]",
            "[[\"a\"]]",
            "[[1, \"x\"]]",
            "[[\"a\", [256]]]",
            "[[\"a\", 1]]",
        ] {
            assert!(decode_headers(bad).is_err(), "{bad}");
        }
    }

    /// What `save_windows` followed by `load_windows(oldest)` must return.
    fn model(snapshot: &[WindowSnapshot], oldest: u32) -> Vec<WindowSnapshot> {
        let mut map: BTreeMap<(String, String), BTreeMap<u32, u32>> = BTreeMap::new();
        for w in snapshot {
            let buckets = map
                .entry((w.org.clone(), w.integration.clone()))
                .or_default();
            for &(minute, count) in &w.buckets {
                if count == 0 {
                    buckets.remove(&minute);
                } else {
                    buckets.insert(minute, count);
                }
            }
        }
        map.into_iter()
            .map(|((org, integration), buckets)| WindowSnapshot {
                org,
                integration,
                buckets: buckets.into_iter().filter(|&(m, _)| m >= oldest).collect(),
            })
            .filter(|w| !w.buckets.is_empty())
            .collect()
    }

    fn snapshot_strategy() -> impl Strategy<Value = Vec<WindowSnapshot>> {
        let bucket = (
            prop_oneof![0u32..64, any::<u32>()],
            prop_oneof![Just(0u32), 1u32..10, any::<u32>()],
        );
        let window = (
            prop::sample::select(vec!["acme", "beta", "ünï"]),
            prop::sample::select(vec!["", "etl", "crm"]),
            prop::collection::vec(bucket, 0..20),
        )
            .prop_map(|(org, integration, buckets)| WindowSnapshot {
                org: org.to_owned(),
                integration: integration.to_owned(),
                buckets,
            });
        prop::collection::vec(window, 0..8)
    }

    proptest! {
        #![proptest_config(ProptestConfig {
            cases: 64,
            failure_persistence: None,
            ..ProptestConfig::default()
        })]

        #[test]
        fn save_then_load_round_trips(
            first in snapshot_strategy(),
            second in snapshot_strategy(),
            oldest in prop_oneof![Just(0u32), 0u32..64, any::<u32>()],
        ) {
            let store = Store::open_in_memory().unwrap();
            store.save_windows(&first).unwrap();
            store.save_windows(&second).unwrap();
            prop_assert_eq!(store.load_windows(0).unwrap(), model(&second, 0));
            prop_assert_eq!(store.load_windows(oldest).unwrap(), model(&second, oldest));
        }

        #[test]
        fn update_is_save_of_the_merged_snapshot(
            first in snapshot_strategy(),
            second in snapshot_strategy(),
            oldest in prop_oneof![Just(0u32), 0u32..64],
        ) {
            let store = Store::open_in_memory().unwrap();
            store.save_windows(&first).unwrap();
            store.update_windows(&second, oldest).unwrap();
            let mut merged = first.clone();
            merged.extend(second);
            prop_assert_eq!(store.load_windows(oldest).unwrap(), model(&merged, oldest));
        }
    }
}
