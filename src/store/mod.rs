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
//! a failed call or discard a pending or failed one. A crash leaves claimed calls `in_flight`,
//! maybe sent, maybe not; [`Store::settle_in_flight`] at start-up marks them failed, so the
//! admin, not the proxy, decides whether they go again (unless sending them twice does them
//! once: idempotent methods go back to pending).
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
//!
//! The files: this one opens the database, migrates its schema and keeps the window buckets
//! and small key/value state; `deferred` the deferred calls, `history` the daily history.

use std::fmt;
use std::fs::{self, OpenOptions};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use rusqlite::{params, Connection, OptionalExtension, Transaction, TransactionBehavior};
use serde::Serialize;

mod deferred;
mod history;
#[cfg(test)]
mod tests;

pub use deferred::{
    DeferredCall, DeferredFilter, DeferredId, DeferredState, DeferredSummary, InFlightCall,
    NewDeferred,
};
pub use history::HistoryRow;

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
        "the store database {} is in use by another callmeter process; give each instance a \
         `store.path` of its own (two would both replay the deferred calls), or stop the other \
         one first",
        .path.display()
    )]
    InUse { path: PathBuf },

    #[error(
        "cannot lock the store database {}: {source}; put `store.path` on a local filesystem",
        .path.display()
    )]
    Lock { path: PathBuf, source: io::Error },

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

/// The embedded database. Share it as `Arc<Store>`; see the module docs for use from async code.
pub struct Store {
    conn: Mutex<Connection>,
    path: Option<PathBuf>,
    /// The database file, locked (`flock`, apart from SQLite's own locks) for as long as this
    /// store is open: a second `callmeter serve` on the same store would take the deferred
    /// calls this one is sending for ones a crash left behind, and send them again. Declared
    /// after `conn`, so it is closed after the connection.
    _owner: Option<fs::File>,
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

/// How long an open waits for a lock that another holder is letting go of.
#[cfg(unix)]
const LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(1);

/// Opens the database file (created with mode 0600) and takes its exclusive `flock`, or says
/// that another store holds it. The lock is the file's own, so every name of the database (a
/// symlink, a hard link) meets it. A refused open keeps its descriptor for the life of the
/// process: closing a descriptor of the database drops every POSIX lock this process holds on
/// it, SQLite's for an owner in this same process included.
///
/// A lock held is retried for up to [`LOCK_WAIT`]: a store just closed can still be locked
/// for a moment by a child process that a thread of this process was starting, which holds
/// a copy of every descriptor between its fork and its exec.
#[cfg(unix)]
fn lock_owner(path: &Path) -> Result<fs::File, StoreError> {
    use rustix::fs::{flock, FlockOperation};
    use std::os::fd::IntoRawFd;

    let file = open_private(path)?;
    let deadline = std::time::Instant::now() + LOCK_WAIT;
    let locked = loop {
        match flock(&file, FlockOperation::NonBlockingLockExclusive) {
            Err(rustix::io::Errno::WOULDBLOCK) if std::time::Instant::now() < deadline => {
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            locked => break locked,
        }
    };
    match locked {
        Ok(()) => Ok(file),
        Err(errno) => {
            let _kept_open = file.into_raw_fd();
            Err(match errno {
                rustix::io::Errno::WOULDBLOCK => StoreError::InUse {
                    path: path.to_path_buf(),
                },
                errno => StoreError::Lock {
                    path: path.to_path_buf(),
                    source: errno.into(),
                },
            })
        }
    }
}

impl Store {
    /// Opens (or creates) the database at `path`: creates missing parent directories, creates
    /// the file with mode 0600 before SQLite writes to it (an existing file readable by group or
    /// others is set to 0600 with a warning), locks it against a second process, turns on WAL
    /// and `synchronous=FULL`, and migrates the schema to [`SCHEMA_VERSION`].
    pub fn open(path: &Path) -> Result<Store, StoreError> {
        if let Some(dir) = path.parent().filter(|dir| !dir.as_os_str().is_empty()) {
            fs::create_dir_all(dir).map_err(|source| StoreError::Create {
                path: path.to_path_buf(),
                source,
            })?;
        }
        // The lock first: until it is ours, another store may be using these files.
        #[cfg(unix)]
        let owner = {
            let file = lock_owner(path)?;
            secure_files(path, &file)?;
            Some(file)
        };
        #[cfg(not(unix))]
        let owner = secure_files(path).map(|()| None)?;
        let conn = Connection::open(path).map_err(|source| StoreError::Open {
            path: path.to_path_buf(),
            source,
        })?;
        let store = Store {
            conn: Mutex::new(conn),
            path: Some(path.to_path_buf()),
            _owner: owner,
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

    /// Opens the database at `path` to read it while a running proxy owns it (an operator's
    /// look, a test's): no lock taken, no schema change; any write fails.
    pub fn open_read_only(path: &Path) -> Result<Store, StoreError> {
        let flags =
            rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX;
        let conn = Connection::open_with_flags(path, flags).map_err(|source| StoreError::Open {
            path: path.to_path_buf(),
            source,
        })?;
        Ok(Store {
            conn: Mutex::new(conn),
            path: Some(path.to_path_buf()),
            _owner: None,
        })
    }

    /// A private in-memory database with the same schema, for tests.
    pub fn open_in_memory() -> Result<Store, StoreError> {
        let conn = Connection::open_in_memory()?;
        let store = Store {
            conn: Mutex::new(conn),
            path: None,
            _owner: None,
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

/// Sets the database file (`db`, open) and any `-wal`/`-shm`/`-journal` file beside it back
/// to 0600 if group or others may read them. (Called with the store's lock held, before the
/// connection opens: the descriptors it closes are nobody's locks.)
#[cfg(unix)]
fn secure_files(path: &Path, db: &fs::File) -> Result<(), StoreError> {
    restrict_mode(path, db)?;
    for suffix in ["-wal", "-shm", "-journal"] {
        let side = beside(path, suffix);
        match OpenOptions::new().read(true).open(&side) {
            Ok(file) => restrict_mode(&side, &file)?,
            Err(error) if error.kind() == io::ErrorKind::NotFound => {}
            Err(source) => return Err(StoreError::Permissions { path: side, source }),
        }
    }
    Ok(())
}

/// `path` with `suffix` added to its file name: the files SQLite keeps beside it.
#[cfg(unix)]
fn beside(path: &Path, suffix: &str) -> PathBuf {
    let mut side = path.as_os_str().to_owned();
    side.push(suffix);
    PathBuf::from(side)
}

/// Opens `path` for reading and writing, created with mode 0600 if it is missing.
#[cfg(unix)]
fn open_private(path: &Path) -> Result<fs::File, StoreError> {
    use std::os::unix::fs::OpenOptionsExt;

    OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(path)
        .map_err(|source| StoreError::Create {
            path: path.to_path_buf(),
            source,
        })
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
