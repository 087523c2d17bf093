use super::deferred::{decode_headers, encode_headers};
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

/// Sent again when left in flight: a DELETE, not on an Apex REST path.
fn resend(call: &InFlightCall) -> bool {
    call.method == "DELETE"
        && !call
            .path_and_query
            .to_ascii_lowercase()
            .contains("/apexrest/")
}

/// A call a crash left in flight may have reached Salesforce: at the next start it is failed
/// for the admin (its error says why), not put back to be sent again; unless its method is
/// one of those sending twice does once, which goes back to pending.
#[test]
fn calls_in_flight_after_a_crash_are_failed_not_requeued() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("db");
    let (claimed, waiting, deleting, apex) = {
        let store = Store::open(&path).unwrap();
        let claimed = store.defer(&call("acme", 1)).unwrap();
        let waiting = store.defer(&call("acme", 2)).unwrap();
        assert_eq!(store.claim_due("acme", 10_000, 1, &[]).unwrap().len(), 1);
        let deleting = store
            .defer(&NewDeferred {
                method: "DELETE".to_owned(),
                ..call("other", 3)
            })
            .unwrap();
        assert_eq!(store.claim_due("other", 10_000, 1, &[]).unwrap().len(), 1);
        // An Apex REST DELETE runs the org's own code: not taken for idempotent.
        let apex = store
            .defer(&NewDeferred {
                method: "DELETE".to_owned(),
                path_and_query: "/services/ApexRest/Cleanup/1".to_owned(),
                ..call("apex", 4)
            })
            .unwrap();
        assert_eq!(store.claim_due("apex", 10_000, 1, &[]).unwrap().len(), 1);
        (claimed, waiting, deleting, apex)
        // Dropped without marking: the "crash".
    };
    let store = Store::open(&path).unwrap();
    assert_eq!(
        store.get_deferred(claimed).unwrap().unwrap().state,
        DeferredState::InFlight
    );
    let settle = || {
        store
            .settle_in_flight(resend, "outcome unknown", 11_000)
            .unwrap()
    };
    assert_eq!(settle(), (1, 2));
    assert_eq!(settle(), (0, 0));
    assert_eq!(
        store.get_deferred(apex).unwrap().unwrap().state,
        DeferredState::Failed
    );
    let again = store.get_deferred(deleting).unwrap().unwrap();
    assert_eq!((again.state, again.attempts), (DeferredState::Pending, 1));
    let failed = store.get_deferred(claimed).unwrap().unwrap();
    assert_eq!(failed.state, DeferredState::Failed);
    assert_eq!(failed.last_error.as_deref(), Some("outcome unknown"));
    assert_eq!(failed.attempts, 1);
    let ids: Vec<_> = store
        .claim_due("acme", 10_000, 10, &[])
        .unwrap()
        .into_iter()
        .map(|c| c.id)
        .collect();
    assert_eq!(ids, vec![waiting], "only the call never claimed goes");
    // The admin's retry puts it back in line.
    assert!(store.retry_deferred(claimed, 12_000).unwrap());
}

/// A send refused for the org's daily limit goes back to pending with its error, its attempts
/// unchanged.
#[test]
fn a_call_refused_for_the_daily_limit_uses_no_attempt() {
    let store = Store::open_in_memory().unwrap();
    let id = store.defer(&call("acme", 1)).unwrap();
    store.claim_due("acme", 10_000, 1, &[]).unwrap();
    store
        .mark_waiting_for_budget(id, "REQUEST_LIMIT_EXCEEDED", 12_000, 11_000)
        .unwrap();
    let c = store.get_deferred(id).unwrap().unwrap();
    assert_eq!(c.state, DeferredState::Pending);
    assert_eq!(c.attempts, 0);
    assert_eq!(c.next_attempt_ms, 12_000);
    assert_eq!(c.last_error.as_deref(), Some("REQUEST_LIMIT_EXCEEDED"));
    // Only a call in flight can be refused.
    assert!(store.mark_waiting_for_budget(id, "x", 0, 0).is_err());
}

/// An SRE's `sqlite3` beside the running proxy sees a deferred call as soon as it is stored.
#[test]
fn an_outside_reader_sees_a_deferred_call_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("db");
    let writer = Store::open(&path).unwrap();
    let reader = rusqlite::Connection::open(&path).unwrap();
    let id = writer.defer(&call("acme", 1)).unwrap();
    let found: i64 = reader
        .query_row(
            "SELECT count(*) FROM deferred WHERE id = ?1",
            [id.0],
            |row| row.get(0),
        )
        .unwrap();
    assert_eq!(found, 1);
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
    assert_eq!(
        store
            .settle_in_flight(resend, "outcome unknown", 11_000)
            .unwrap(),
        (0, 1)
    );
    assert!(store.retry_deferred(calls[1].id, 11_000).unwrap());
    let replay = store.claim_due("acme", 11_000, 10, &[]).unwrap();
    assert_eq!(replay.len(), 2);
    assert_eq!(replay[0].headers, call("acme", 1).headers);
}

const REFUSED_CHILD_ENV: &str = "CALLMETER_STORE_TEST_REFUSED_CHILD_DB";

/// The child half of `a_refused_second_open_leaves_the_first_store_durable`.
#[test]
fn child_refused_open_then_abort() {
    let Some(path) = std::env::var_os(REFUSED_CHILD_ENV) else {
        return;
    };
    let path = Path::new(&path);
    let store = Store::open(path).unwrap();
    store.defer(&call("acme", 1)).unwrap();
    // A second open in the same process is refused ...
    assert!(matches!(Store::open(path), Err(StoreError::InUse { .. })));
    // ... an SRE looks at the store with sqlite3, as the README invites ...
    let look = std::process::Command::new("sqlite3")
        .arg(path)
        .arg("SELECT count(*) FROM deferred;")
        .output()
        .expect("sqlite3 (scripts/test.sh installs it)");
    assert!(look.status.success(), "{look:?}");
    // ... and a call is deferred (answered 202: stored durably).
    store.defer(&call("acme", 2)).unwrap();
    // Like `kill -9`.
    std::process::abort();
}

/// A refused open must not close a descriptor of the database in the owner's process: that
/// drops the POSIX locks SQLite holds for the owner's connection, and the next outside
/// connection to close (an SRE's `sqlite3`) believes it is the last, checkpoints and deletes
/// the WAL under the running store, whose later commits are then lost at a crash.
#[test]
fn a_refused_second_open_leaves_the_first_store_durable() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("db");
    let module = module_path!().split_once("::").map_or("", |(_, rest)| rest);
    let output = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            &format!("{module}::child_refused_open_then_abort"),
            "--exact",
            "--test-threads=1",
            "--nocapture",
        ])
        .env(REFUSED_CHILD_ENV, &path)
        .output()
        .unwrap();
    assert!(!output.status.success(), "the child aborts: {output:?}");
    let store = Store::open(&path).unwrap();
    let calls = store.list_deferred(DeferredFilter::default()).unwrap();
    assert_eq!(
        calls.len(),
        2,
        "a call stored before the crash is lost: {output:?}"
    );
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

/// One process at a time: a second open of the same database is refused while the first
/// store is open, and taken once it is closed.
#[test]
fn a_database_is_opened_by_one_store_at_a_time() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("callmeter.db");
    let first = Store::open(&path).unwrap();
    let error = Store::open(&path).unwrap_err();
    assert!(matches!(error, StoreError::InUse { .. }), "{error}");
    assert!(error.to_string().contains("store.path"), "{error}");
    drop(first);
    Store::open(&path).unwrap();
}

#[test]
fn a_store_in_use_can_be_read_not_written() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("callmeter.db");
    let owner = Store::open(&path).unwrap();
    let id = owner.defer(&call("acme", 1)).unwrap();
    let look = Store::open_read_only(&path).unwrap();
    assert_eq!(
        look.get_deferred(id).unwrap().unwrap().body,
        call("acme", 1).body
    );
    assert!(look.defer(&call("acme", 2)).is_err());
}

/// The lock is the database file's own: the same database reached by another name (a symlink,
/// as a deploy's `current` link) is refused too.
#[cfg(unix)]
#[test]
fn a_second_open_through_a_symlink_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("callmeter.db");
    let link = dir.path().join("current.db");
    let _store = Store::open(&path).unwrap();
    std::os::unix::fs::symlink(&path, &link).unwrap();
    let second = Store::open(&link);
    assert!(
        matches!(second, Err(StoreError::InUse { .. })),
        "a second owner"
    );
}

/// A store closed and opened again by the same process while another thread starts child
/// processes: each child holds a copy of the lock's descriptor between its fork and its exec,
/// which made the reopen fail with `InUse` (257 of 300 reopens under this load, before the
/// open waited for the lock to come free).
#[test]
fn a_reopen_is_not_refused_while_another_thread_starts_processes() {
    use std::sync::atomic::{AtomicBool, Ordering};
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("db");
    let stop = std::sync::Arc::new(AtomicBool::new(false));
    let spawner = std::thread::spawn({
        let stop = stop.clone();
        move || {
            while !stop.load(Ordering::Relaxed) {
                let _ = std::process::Command::new("true").status();
            }
        }
    });
    let refused = (0..100)
        .filter(|_| matches!(Store::open(&path), Err(StoreError::InUse { .. })))
        .count();
    stop.store(true, Ordering::Relaxed);
    spawner.join().unwrap();
    assert_eq!(refused, 0, "reopens refused");
}
