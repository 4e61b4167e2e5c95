//! The `SQLite` store: the conformance suite on a real file and in memory, plus what is particular
//! to it (corrupt rows, hostile table names, unusable files, cleanup, a real process restart).

mod common;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use common::{ExpiresMs, record_at_ms, unix_ms};
use hyper::StatusCode;
use hyper_sessions::store::{
    CreateOutcome, Key, Record, SaveOutcome, SessionStore, StoreErrorKind,
};
use hyper_sessions::{SessionLayer, SqliteStore};

use common::servers::AppProcess;
use common::{Browser, Conn, new_key, serve};

/// A fresh directory under the system temp dir, removed (with the database in it) when dropped.
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> TempDir {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let nanos = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap()
            .as_nanos();
        let dir = std::env::temp_dir().join(format!(
            "hyper-sessions-sqlite-{}-{}-{nanos}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }

    fn db(&self) -> PathBuf {
        self.0.join("sessions.db")
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

async fn file_fixture() -> (SqliteStore, TempDir) {
    let dir = TempDir::new();
    let store = SqliteStore::open(dir.db()).await.unwrap();
    (store, dir)
}

async fn memory_fixture() -> (SqliteStore, ()) {
    (SqliteStore::open_in_memory().await.unwrap(), ())
}

mod file {
    crate::conformance_suite!(super::file_fixture);
}

mod in_memory {
    crate::conformance_suite!(super::memory_fixture);
}

fn in_ms(ms: u64) -> SystemTime {
    SystemTime::now() + Duration::from_millis(ms)
}

fn record(key: Key, data: &str, expires_at: SystemTime) -> Record {
    Record::new(key, Bytes::from(data.to_owned()), 1, expires_at)
}

/// A second, plain rusqlite connection on the same file: what another process would see.
fn raw(path: &Path) -> rusqlite::Connection {
    let c = rusqlite::Connection::open(path).unwrap();
    c.busy_timeout(Duration::from_secs(5)).unwrap();
    c
}

fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut next = e.source();
    while let Some(cause) = next {
        s.push_str(": ");
        s.push_str(&cause.to_string());
        next = cause.source();
    }
    s
}

#[tokio::test]
async fn schema_and_pragmas() {
    let dir = TempDir::new();
    let store = SqliteStore::open(dir.db()).await.unwrap();
    let id = new_key();
    store
        .create(&record(id, r#"{"d":{}}"#, in_ms(60_000)))
        .await
        .unwrap();
    let c = raw(&dir.db());
    let mode: String = c
        .query_row("PRAGMA journal_mode", [], |r| r.get(0))
        .unwrap();
    assert_eq!(mode, "wal");
    let version: i64 = c
        .query_row(
            "SELECT version FROM hyper_sessions_schema WHERE table_name = 'sessions'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(version, 2);
    // The id is the 16-byte blob; the expiry an integer; an index serves the cleanup.
    let (key, kind): (Vec<u8>, String) = c
        .query_row("SELECT id, typeof(expires_at) FROM sessions", [], |r| {
            Ok((r.get(0)?, r.get(1)?))
        })
        .unwrap();
    assert_eq!(key, id.to_bytes());
    assert_eq!(kind, "integer");
    let index: i64 = c
        .query_row(
            "SELECT count(*) FROM sqlite_schema WHERE type = 'index' AND tbl_name = 'sessions' \
             AND sql LIKE '%expires_at%'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(index, 1);
    // The owner: NULL for none, and a partial index that `owned` uses.
    let owner: Option<String> = c
        .query_row("SELECT owner FROM sessions", [], |r| r.get(0))
        .unwrap();
    assert_eq!(owner, None);
    let index: String = c
        .query_row(
            "SELECT sql FROM sqlite_schema WHERE type = 'index' AND name = 'sessions_owner'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert!(index.contains("WHERE owner IS NOT NULL"), "{index}");
    let plan: String = c
        .query_row(
            "EXPLAIN QUERY PLAN SELECT id, data, version, expires_at, owner FROM sessions \
             WHERE owner = ?1 AND expires_at > 0",
            ["42"],
            |r| r.get(3),
        )
        .unwrap();
    assert!(plan.contains("sessions_owner"), "{plan}");
    // Reopening finds the schema and keeps the data.
    drop(store);
    let store = SqliteStore::open(dir.db()).await.unwrap();
    assert!(store.load(&id).await.unwrap().is_some());
}

#[tokio::test]
async fn newer_schema_and_foreign_tables_are_refused() {
    let dir = TempDir::new();
    drop(SqliteStore::open(dir.db()).await.unwrap());
    let c = raw(&dir.db());
    c.execute(
        "UPDATE hyper_sessions_schema SET version = 99 WHERE table_name = 'sessions'",
        [],
    )
    .unwrap();
    c.execute("CREATE TABLE users (name TEXT)", []).unwrap();
    drop(c);
    let err = SqliteStore::open(dir.db()).await.unwrap_err();
    assert!(chain(&err).contains("schema version 99"), "{}", chain(&err));
    let err = SqliteStore::builder(dir.db())
        .table("users")
        .open()
        .await
        .unwrap_err();
    assert!(chain(&err).contains("did not create"), "{}", chain(&err));
    // Another table name in the same file is a separate store.
    let other = SqliteStore::builder(dir.db())
        .table("admin_sessions")
        .open()
        .await
        .unwrap();
    let id = new_key();
    other.create(&record(id, "x", in_ms(60_000))).await.unwrap();
    assert!(other.load(&id).await.unwrap().is_some());
}

/// The exact version-1 schema (before owners), as the release before it created it.
const V1_SCHEMA: &str = "CREATE TABLE hyper_sessions_schema \
     (table_name TEXT PRIMARY KEY NOT NULL, version INTEGER NOT NULL) WITHOUT ROWID; \
     CREATE TABLE \"sessions\" (\
       id BLOB PRIMARY KEY NOT NULL, \
       data BLOB NOT NULL, \
       version INTEGER NOT NULL, \
       expires_at INTEGER NOT NULL\
     ) WITHOUT ROWID; \
     CREATE INDEX \"sessions_expires_at\" ON \"sessions\" (expires_at); \
     INSERT INTO hyper_sessions_schema (table_name, version) VALUES ('sessions', 1);";

/// A version-1 table (no owners) is migrated when a store opens it: the column and its index
/// are added, the version row says 2, the rows it held load as they were (without an owner),
/// and owners work from then on, on this store and on one opened later.
#[tokio::test]
async fn version_1_tables_are_migrated() {
    let dir = TempDir::new();
    let old = new_key();
    let far = i64::try_from(unix_ms(in_ms(3_600_000))).unwrap();
    let c = raw(&dir.db());
    c.execute_batch(V1_SCHEMA).unwrap();
    c.execute(
        "INSERT INTO sessions (id, data, version, expires_at) VALUES (?1, ?2, 3, ?3)",
        rusqlite::params![old.to_bytes(), &b"{\"d\":{\"n\":1}}"[..], far],
    )
    .unwrap();
    drop(c);

    let store = SqliteStore::open(dir.db()).await.unwrap();
    let back = store.load(&old).await.unwrap().expect("the old row loads");
    assert_eq!(back.data(), &Bytes::from_static(b"{\"d\":{\"n\":1}}"));
    assert_eq!((back.version(), back.owner()), (3, None));
    let c = raw(&dir.db());
    let version: i64 = c
        .query_row(
            "SELECT version FROM hyper_sessions_schema WHERE table_name = 'sessions'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(version, 2);
    let index: i64 = c
        .query_row(
            "SELECT count(*) FROM sqlite_schema WHERE type = 'index' AND name = 'sessions_owner'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(index, 1);

    // Owners work: the old row given one by a save, a new one created with one.
    let saved =
        Record::new(old, back.data().clone(), 4, back.expires_at()).with_owner(Some("42".into()));
    assert_eq!(store.save(&saved, 3).await.unwrap(), SaveOutcome::Saved);
    let new = new_key();
    let created = record(new, "{}", in_ms(60_000)).with_owner(Some("42".into()));
    assert_eq!(
        store.create(&created).await.unwrap(),
        CreateOutcome::Created
    );
    let mut listed: Vec<Key> = store
        .owned("42")
        .await
        .unwrap()
        .iter()
        .map(Record::key)
        .collect();
    listed.sort();
    let mut expected = vec![old, new];
    expected.sort();
    assert_eq!(listed, expected);

    // Reopened (already at version 2): nothing to migrate, everything kept.
    drop(store);
    let store = SqliteStore::open(dir.db()).await.unwrap();
    assert_eq!(store.owned("42").await.unwrap().len(), 2);
    assert_eq!(store.load(&old).await.unwrap().unwrap().owner(), Some("42"));
}

/// A migration that cannot be made (a name the owner index needs is taken) changes nothing:
/// the table stays at version 1, and the store does not open.
#[tokio::test]
async fn a_failed_migration_changes_nothing() {
    let dir = TempDir::new();
    let c = raw(&dir.db());
    c.execute_batch(V1_SCHEMA).unwrap();
    c.execute_batch("CREATE TABLE sessions_owner (x INTEGER)")
        .unwrap();
    drop(c);
    let err = SqliteStore::open(dir.db()).await.unwrap_err();
    assert!(chain(&err).contains("sessions_owner"), "{}", chain(&err));
    let c = raw(&dir.db());
    let version: i64 = c
        .query_row(
            "SELECT version FROM hyper_sessions_schema WHERE table_name = 'sessions'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(version, 1);
    let columns: i64 = c
        .query_row(
            "SELECT count(*) FROM pragma_table_info('sessions') WHERE name = 'owner'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(columns, 0, "the column was added without the rest");
}

#[tokio::test]
async fn hostile_table_names_are_refused() {
    let dir = TempDir::new();
    for name in [
        "sessions; DROP TABLE hyper_sessions_schema; --",
        "x\" (a); DROP TABLE y; --",
        "",
        "9lives",
        "sqlite_master",
        "a-b",
    ] {
        let err = SqliteStore::builder(dir.db())
            .table(name)
            .open()
            .await
            .unwrap_err();
        assert_eq!(err.kind(), StoreErrorKind::Other);
        assert!(
            chain(&err).contains("invalid SQLite table name"),
            "{}",
            chain(&err)
        );
    }
    // Refused before any SQL ran: the file was never even created.
    assert!(!dir.db().exists());
}

#[tokio::test]
async fn missing_directory_and_non_database_files_are_clear_errors() {
    let dir = TempDir::new();
    let err = SqliteStore::open(dir.0.join("no/such/dir/sessions.db"))
        .await
        .unwrap_err();
    let text = chain(&err);
    assert!(text.contains("cannot open the database file"), "{text}");
    assert!(text.contains("no/such/dir/sessions.db"), "{text}");

    let junk = dir.0.join("junk.db");
    std::fs::write(&junk, vec![b'x'; 8192]).unwrap();
    let err = SqliteStore::open(&junk).await.unwrap_err();
    let text = chain(&err);
    assert!(text.contains("not an SQLite database"), "{text}");
    // Nothing was overwritten.
    assert_eq!(std::fs::read(&junk).unwrap(), vec![b'x'; 8192]);
}

#[tokio::test]
async fn read_only_database_is_a_clear_error() {
    let dir = TempDir::new();
    let store = SqliteStore::open(dir.db()).await.unwrap();
    let id = new_key();
    store
        .create(&record(id, r#"{"d":{"a":1}}"#, in_ms(60_000)))
        .await
        .unwrap();
    drop(store);
    // `mode=ro` is how SQLite opens a file it may not write (chmod does not stop root).
    let uri = format!("file:{}?mode=ro", dir.db().display());
    let err = SqliteStore::open(&uri).await.unwrap_err();
    let text = chain(&err);
    assert_eq!(err.kind(), StoreErrorKind::Other, "{text}");
    assert!(text.contains("read-only"), "{text}");
    // The data is still there.
    let store = SqliteStore::open(dir.db()).await.unwrap();
    assert!(store.load(&id).await.unwrap().is_some());
}

#[tokio::test]
async fn a_locked_database_is_unavailable_and_loses_nothing() {
    let dir = TempDir::new();
    let store = SqliteStore::builder(dir.db())
        .busy_timeout(Duration::from_millis(200))
        .open()
        .await
        .unwrap();
    let id = new_key();
    store
        .create(&record(id, r#"{"d":{"a":1}}"#, in_ms(60_000)))
        .await
        .unwrap();
    // Another process holds the write lock.
    let other = raw(&dir.db());
    other.execute_batch("BEGIN IMMEDIATE").unwrap();
    let err = store
        .create(&record(new_key(), "x", in_ms(60_000)))
        .await
        .unwrap_err();
    assert!(err.is_unavailable(), "{}", chain(&err));
    assert!(chain(&err).contains("locked"), "{}", chain(&err));
    // Reads still work under WAL while the writer is busy.
    assert!(store.load(&id).await.unwrap().is_some());
    other.execute_batch("ROLLBACK").unwrap();
    // And writes work again afterwards.
    assert_eq!(
        store
            .create(&record(new_key(), "x", in_ms(60_000)))
            .await
            .unwrap(),
        CreateOutcome::Created
    );

    // Over HTTP: a save that cannot be made is a 503, never a silent success.
    let server = serve(&SessionLayer::new(store.clone())).await;
    let mut b = Browser::new(server.addr).await;
    assert_eq!(b.get("/counter").await.body, "1");
    other.execute_batch("BEGIN IMMEDIATE").unwrap();
    let r = b.get("/counter").await;
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE);
    other.execute_batch("ROLLBACK").unwrap();
    assert_eq!(b.get("/read").await.body, "1", "the failed write was kept");
    assert_eq!(b.get("/counter").await.body, "2");
}

/// `n` concurrent writes through the layer, each on its own connection, timed: half create a
/// session, half save one of `savers` (one save per session at most when `n <= 2 * savers`).
fn timed_writes(
    addr: std::net::SocketAddr,
    savers: &[String],
    n: usize,
) -> Vec<tokio::task::JoinHandle<(StatusCode, Duration)>> {
    (0..n)
        .map(|i| {
            let cookie = savers[i / 2 % savers.len()].clone();
            tokio::spawn(async move {
                let mut conn = Conn::http1(addr).await;
                let start = std::time::Instant::now();
                let r = if i % 2 == 0 {
                    conn.get("/counter", None).await
                } else {
                    conn.get("/incr/n", Some(&cookie)).await
                };
                (r.status, start.elapsed())
            })
        })
        .collect()
}

/// Another process holds the write lock: 20 concurrent writes through the layer each answer 503
/// within about one busy timeout of their own (not one after another), a read beside them is
/// answered at once on a reader connection, and once the lock is released writes go through at
/// once, those already queued included.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_foreign_write_lock_stalls_neither_reads_nor_the_queue() {
    const BUSY: Duration = Duration::from_millis(300);
    // Generous for a loaded 2-core machine, and still far below the sum of several timeouts.
    const MARGIN: Duration = Duration::from_millis(250);
    let dir = TempDir::new();
    let store = SqliteStore::builder(dir.db())
        .busy_timeout(BUSY)
        .open()
        .await
        .unwrap();
    let server = serve(&SessionLayer::new(store.clone())).await;
    let mut reader = Browser::new(server.addr).await;
    assert_eq!(reader.get("/counter").await.body, "1");
    let mut savers = Vec::new();
    for _ in 0..10 {
        let mut saver = Browser::new(server.addr).await;
        assert_eq!(saver.get("/counter").await.body, "1");
        savers.push(saver.cookie.clone().unwrap());
    }

    let other = raw(&dir.db());
    let writes = |n| timed_writes(server.addr, &savers, n);

    other.execute_batch("BEGIN IMMEDIATE").unwrap();
    let locked_at = std::time::Instant::now();
    let blocked = writes(20);
    tokio::time::sleep(Duration::from_millis(50)).await;
    // The writes are waiting for the lock; a read is not.
    let start = std::time::Instant::now();
    let r = reader.get("/read").await;
    let read_took = start.elapsed();
    assert_eq!((r.status, r.body.as_str()), (StatusCode::OK, "1"));
    let start = std::time::Instant::now();
    assert!(store.load(&reader.key().unwrap()).await.unwrap().is_some());
    let load_took = start.elapsed();
    let mut answers = Vec::new();
    for t in blocked {
        answers.push(t.await.unwrap());
    }
    answers.sort_by_key(|&(_, took)| took);
    eprintln!(
        "held lock (busy timeout {BUSY:?}): read {read_took:?} over HTTP, load {load_took:?}; \
         blocked writes answered after {:?}",
        answers.iter().map(|&(_, took)| took).collect::<Vec<_>>()
    );
    for &(status, took) in &answers {
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert!(
            took >= BUSY.saturating_sub(Duration::from_millis(5)),
            "gave up early: {took:?}"
        );
        assert!(
            took <= BUSY + MARGIN,
            "a blocked write answered after {took:?}"
        );
    }
    assert!(
        read_took < Duration::from_millis(100) && load_took < Duration::from_millis(100),
        "a read waited behind blocked writes: {read_took:?} over HTTP, {load_took:?} load"
    );
    assert!(locked_at.elapsed() < BUSY * 3, "{:?}", locked_at.elapsed());

    // Writes queued while the lock is held, released well within their timeout: each goes
    // through as soon as the lock is free, not after a timeout.
    let queued = writes(20);
    tokio::time::sleep(BUSY / 3).await;
    let released = std::time::Instant::now();
    other.execute_batch("ROLLBACK").unwrap();
    for t in queued {
        let (status, took) = t.await.unwrap();
        assert_eq!(status, StatusCode::OK);
        assert!(took < BUSY, "a queued write took {took:?}");
    }
    let after_release = released.elapsed();
    assert!(
        after_release < Duration::from_millis(150),
        "queued writes finished {after_release:?} after the release"
    );
    // And new writes go straight through.
    let start = std::time::Instant::now();
    for t in writes(20) {
        assert_eq!(t.await.unwrap().0, StatusCode::OK);
    }
    let free_took = start.elapsed();
    // The blocked saves stored nothing; the queued ones and the last ones did.
    for cookie in &savers {
        let r = Conn::http1(server.addr)
            .await
            .get("/get/n", Some(cookie))
            .await;
        assert_eq!(r.body, "2");
    }
    eprintln!(
        "queued writes done {after_release:?} after the release; 20 writes on a free lock \
         {free_took:?}"
    );
}

/// With no reader connections (`readers(0)`), loads run on the writer's connection between its
/// batches: everything still works, and under another process's write lock a load queued
/// behind a blocked write waits for that write's deadline at most, never for a chain of them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_readers_loads_wait_one_busy_timeout_at_most() {
    const BUSY: Duration = Duration::from_millis(200);
    let dir = TempDir::new();
    let store = SqliteStore::builder(dir.db())
        .busy_timeout(BUSY)
        .readers(0)
        .open()
        .await
        .unwrap();
    let id = new_key();
    store.create(&record(id, "a", in_ms(60_000))).await.unwrap();
    let next = Record::new(id, Bytes::from_static(b"b"), 2, in_ms(60_000));
    assert_eq!(store.save(&next, 1).await.unwrap(), SaveOutcome::Saved);
    assert_eq!(store.load(&id).await.unwrap().unwrap().data(), "b");

    let other = raw(&dir.db());
    other.execute_batch("BEGIN IMMEDIATE").unwrap();
    let blocked: Vec<_> = (0..10)
        .map(|_| {
            let store = store.clone();
            tokio::spawn(async move { store.create(&record(new_key(), "x", in_ms(60_000))).await })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(20)).await;
    let start = std::time::Instant::now();
    let loaded = store.load(&id).await.unwrap();
    let load_took = start.elapsed();
    for t in blocked {
        assert!(t.await.unwrap().unwrap_err().is_unavailable());
    }
    other.execute_batch("ROLLBACK").unwrap();
    assert_eq!(loaded.unwrap().version(), 2);
    assert!(
        load_took < BUSY + Duration::from_millis(250),
        "a load waited {load_took:?} behind blocked writes"
    );
}

#[tokio::test]
async fn a_full_database_refuses_new_sessions_and_keeps_old_ones() {
    let dir = TempDir::new();
    let store = SqliteStore::builder(dir.db())
        .max_size(64 * 1024)
        .open()
        .await
        .unwrap();
    let first = new_key();
    store
        .create(&record(first, r#"{"d":{"n":1}}"#, in_ms(60_000)))
        .await
        .unwrap();
    let big = format!(r#"{{"d":{{"s":"{}"}}}}"#, "x".repeat(4000));
    let mut err = None;
    for _ in 0..100 {
        match store.create(&record(new_key(), &big, in_ms(60_000))).await {
            Ok(_) => {}
            Err(e) => {
                err = Some(e);
                break;
            }
        }
    }
    let err = err.expect("the size cap was never reached");
    assert!(err.is_unavailable(), "{}", chain(&err));
    assert!(chain(&err).contains("full"), "{}", chain(&err));
    // The sessions already there are intact and still writable in place.
    let back = store.load(&first).await.unwrap().unwrap();
    assert_eq!(back.data(), &Bytes::from(r#"{"d":{"n":1}}"#));
    assert_eq!(
        store.touch(&first, 1, in_ms(120_000)).await.unwrap(),
        SaveOutcome::Saved
    );
}

#[tokio::test]
async fn corrupt_rows_are_reported_and_start_a_fresh_session() {
    let dir = TempDir::new();
    let store = SqliteStore::open(dir.db()).await.unwrap();
    let server = serve(&SessionLayer::new(store.clone())).await;
    let c = raw(&dir.db());
    let far = i64::try_from(unix_ms(in_ms(3_600_000))).unwrap();
    let cases: [(&str, &str); 6] = [
        (
            "version",
            "UPDATE sessions SET version = 'abc' WHERE id = ?1",
        ),
        ("version", "UPDATE sessions SET version = -3 WHERE id = ?1"),
        ("data", "UPDATE sessions SET data = 42 WHERE id = ?1"),
        (
            "expires_at",
            "UPDATE sessions SET expires_at = 'soon' WHERE id = ?1",
        ),
        ("owner", "UPDATE sessions SET owner = x'2a' WHERE id = ?1"),
        (
            "owner",
            "UPDATE sessions SET owner = CAST(x'ff34' AS TEXT) WHERE id = ?1",
        ),
    ];
    for (column, garbage) in cases {
        let mut b = Browser::new(server.addr).await;
        assert_eq!(b.get("/counter").await.body, "1");
        let id = b.key().unwrap();
        let cookie = b.cookie.clone().unwrap();
        c.execute(garbage, [id.to_bytes()]).unwrap();
        c.execute(
            "UPDATE sessions SET expires_at = ?2 WHERE id = ?1 AND typeof(expires_at) = 'integer'",
            rusqlite::params![id.to_bytes(), far],
        )
        .unwrap();
        let err = store.load(&id).await.unwrap_err();
        assert_eq!(err.kind(), StoreErrorKind::Corrupt, "{}", chain(&err));
        let text = chain(&err);
        assert!(text.contains(&format!("column {column}")), "{text}");
        let full = id.to_hex();
        assert!(text.contains(&full[..8]), "the row is named: {text}");
        assert!(
            !text.contains(&full[..9]),
            "more than the key's fingerprint leaked: {text}"
        );
        // Over HTTP: a fresh session under a new id, the bad row left alone.
        let mut conn = Conn::http1(server.addr).await;
        let r = conn.get("/counter", Some(&cookie)).await;
        assert_eq!(r.status, StatusCode::OK);
        assert_eq!(r.body, "1");
        assert_ne!(r.cookie_pair().unwrap(), cookie);
        assert!(
            store.load(&id).await.is_err(),
            "the corrupt row was replaced"
        );
    }
    // Bad JSON in a well-typed row: the store returns it, the layer starts afresh (the suite
    // checks that part); the store itself keeps working for everyone else.
    let mut b = Browser::new(server.addr).await;
    assert_eq!(b.get("/counter").await.body, "1");
    assert_eq!(b.get("/counter").await.body, "2");
}

/// An unreadable row among an owner's fails the listing as corrupt (the layer answers it as a
/// store failure), naming neither the owner nor the rows' data; the other owners' listings and
/// the row's own owner are unaffected.
#[tokio::test]
async fn a_corrupt_row_in_an_owners_listing() {
    let dir = TempDir::new();
    let store = SqliteStore::open(dir.db()).await.unwrap();
    let owner = "alice@example.com";
    let (good, bad) = (new_key(), new_key());
    for key in [good, bad] {
        let r = record(key, "{\"d\":{\"secret\":1}}", in_ms(60_000)).with_owner(Some(owner.into()));
        store.create(&r).await.unwrap();
    }
    let other = new_key();
    store
        .create(&record(other, "{}", in_ms(60_000)).with_owner(Some("bob".into())))
        .await
        .unwrap();
    assert_eq!(store.owned(owner).await.unwrap().len(), 2);
    raw(&dir.db())
        .execute(
            "UPDATE sessions SET version = 'abc' WHERE id = ?1",
            [bad.to_bytes()],
        )
        .unwrap();
    let err = store.owned(owner).await.unwrap_err();
    assert_eq!(err.kind(), StoreErrorKind::Corrupt, "{}", chain(&err));
    let text = chain(&err);
    assert!(text.contains("column version"), "{text}");
    let full = bad.to_hex();
    assert!(text.contains(&full[..8]), "the row is named: {text}");
    assert!(
        !text.contains(&full[..9]),
        "more than the fingerprint: {text}"
    );
    for secret in [owner, "alice", "secret"] {
        assert!(!text.contains(secret), "{secret} leaked: {text}");
    }
    assert_eq!(store.owned("bob").await.unwrap().len(), 1);
    assert_eq!(
        store.load(&good).await.unwrap().unwrap().owner(),
        Some(owner)
    );
}

#[tokio::test]
async fn delete_expired_and_the_cleanup_task() {
    let dir = TempDir::new();
    let store = SqliteStore::builder(dir.db())
        .cleanup_interval(None)
        .open()
        .await
        .unwrap();
    let live = new_key();
    store
        .create(&record(live, "live", in_ms(60_000)))
        .await
        .unwrap();
    for _ in 0..2500 {
        store
            .create(&record(new_key(), "old", in_ms(50)))
            .await
            .unwrap();
    }
    tokio::time::sleep(Duration::from_millis(120)).await;
    let rows = |p: &Path| -> i64 {
        raw(p)
            .query_row("SELECT count(*) FROM sessions", [], |r| r.get(0))
            .unwrap()
    };
    assert_eq!(rows(&dir.db()), 2501);
    assert_eq!(store.delete_expired().await.unwrap(), 2500);
    assert_eq!(rows(&dir.db()), 1);
    assert!(store.load(&live).await.unwrap().is_some());

    // The task: runs on its interval, and stops with the store.
    let dir = TempDir::new();
    let store = SqliteStore::builder(dir.db())
        .cleanup_interval(Some(Duration::from_millis(100)))
        .open()
        .await
        .unwrap();
    for _ in 0..10 {
        store
            .create(&record(new_key(), "old", in_ms(20)))
            .await
            .unwrap();
    }
    store
        .create(&record(new_key(), "live", in_ms(60_000)))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(rows(&dir.db()), 1, "the cleanup task did not run");
    let weak_probe = store.clone();
    drop(store);
    drop(weak_probe);
    // A cleanup already under way when the store was dropped may finish its pass; let it.
    tokio::time::sleep(Duration::from_millis(150)).await;
    // With the store gone, rows that expire stay: nothing is running any more.
    let c = raw(&dir.db());
    c.execute(
        "INSERT INTO sessions (id, data, version, expires_at) VALUES (x'00', x'00', 1, 0)",
        [],
    )
    .unwrap();
    tokio::time::sleep(Duration::from_millis(350)).await;
    assert_eq!(rows(&dir.db()), 2, "a cleanup task outlived its store");
}

/// A save that keeps the stored expiry and one that moves it (they take different statements)
/// both store data, version and expiry exactly, and both are compare-and-sets.
#[tokio::test]
async fn saves_with_the_same_and_a_new_expiry() {
    let (store, dir) = file_fixture().await;
    let c = raw(&dir.db());
    let row = |key: Key| -> (Vec<u8>, i64, i64) {
        c.query_row(
            "SELECT data, version, expires_at FROM sessions WHERE id = ?1",
            [&key.to_bytes()[..]],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
        )
        .unwrap()
    };
    let ms = |v: &str| Bytes::from(v.to_owned());
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap();
    let now = u64::try_from(now.as_millis()).unwrap();
    let (e1, e2) = (now + 60_000, now + 90_000);
    let id = new_key();
    let at = |v, d: &str, e| record_at_ms(id, ms(d), v, e);
    assert_eq!(
        store.create(&at(1, "a", e1)).await.unwrap(),
        CreateOutcome::Created
    );
    let e = |x: u64| i64::try_from(x).unwrap();

    // Same expiry.
    assert_eq!(
        store.save(&at(2, "b", e1), 1).await.unwrap(),
        SaveOutcome::Saved
    );
    assert_eq!(row(id), (b"b".to_vec(), 2, e(e1)));
    // A stale version is a conflict on either path, and changes nothing.
    assert_eq!(
        store.save(&at(3, "x", e1), 1).await.unwrap(),
        SaveOutcome::Conflict
    );
    assert_eq!(
        store.save(&at(3, "x", e2), 1).await.unwrap(),
        SaveOutcome::Conflict
    );
    assert_eq!(row(id), (b"b".to_vec(), 2, e(e1)));
    // A new expiry, later and then earlier.
    assert_eq!(
        store.save(&at(3, "c", e2), 2).await.unwrap(),
        SaveOutcome::Saved
    );
    assert_eq!(row(id), (b"c".to_vec(), 3, e(e2)));
    assert_eq!(
        store.save(&at(4, "d", e1), 3).await.unwrap(),
        SaveOutcome::Saved
    );
    assert_eq!(row(id), (b"d".to_vec(), 4, e(e1)));
    let back = store.load(&id).await.unwrap().unwrap();
    assert_eq!((back.version(), back.expires_at_unix_ms()), (4, e1));
    // The expiry index follows the row: the cleanup finds it by its new expiry.
    let by_index: i64 = c
        .query_row(
            "SELECT count(*) FROM sessions INDEXED BY sessions_expires_at WHERE expires_at = ?1",
            [e(e1)],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(by_index, 1);
    // An expired row is missing to both statements; so is an unknown id.
    c.execute(
        "UPDATE sessions SET expires_at = 1 WHERE id = ?1",
        [&id.to_bytes()[..]],
    )
    .unwrap();
    assert_eq!(
        store.save(&at(5, "e", 1), 4).await.unwrap(),
        SaveOutcome::Missing
    );
    assert_eq!(
        store.save(&at(5, "e", e1), 4).await.unwrap(),
        SaveOutcome::Missing
    );
    let other = record_at_ms(new_key(), ms("z"), 2, e1);
    assert_eq!(store.save(&other, 1).await.unwrap(), SaveOutcome::Missing);
}

/// The row as stored, read on another connection: `(data, version, expires_at)`, or `None`.
fn stored_row(c: &rusqlite::Connection, key: Key) -> Option<(Vec<u8>, i64, i64)> {
    use rusqlite::OptionalExtension;
    c.query_row(
        "SELECT data, version, expires_at FROM sessions WHERE id = ?1",
        [&key.to_bytes()[..]],
        |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
    )
    .optional()
    .unwrap()
}

fn now_unix_ms() -> u64 {
    unix_ms(SystemTime::now())
}

/// A save that keeps the expiry but changes the owner (given, moved, taken away) changes it:
/// the same-expiry statement, which leaves the owner out of its `SET`, must not match then. A
/// touch keeps the owner; a listing follows each change.
#[tokio::test]
async fn saves_that_change_only_the_owner() {
    let (store, dir) = file_fixture().await;
    let c = raw(&dir.db());
    let stored_owner = |key: Key| -> Option<String> {
        c.query_row(
            "SELECT owner FROM sessions WHERE id = ?1",
            [&key.to_bytes()[..]],
            |r| r.get(0),
        )
        .unwrap()
    };
    let expires = u64::try_from(
        SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap()
            .as_millis(),
    )
    .unwrap()
        + 60_000;
    let id = new_key();
    let at = |v, owner: Option<&str>| {
        record_at_ms(id, Bytes::from_static(b"{}"), v, expires).with_owner(owner.map(Into::into))
    };
    store.create(&at(1, None)).await.unwrap();
    let steps: [(u64, Option<&str>); 5] = [
        (2, None),
        (3, Some("ada")),
        (4, Some("ada")),
        (5, Some("bob")),
        (6, None),
    ];
    for (version, owner) in steps {
        let saved = store.save(&at(version, owner), version - 1).await.unwrap();
        assert_eq!(saved, SaveOutcome::Saved, "version {version}");
        assert_eq!(stored_owner(id).as_deref(), owner, "version {version}");
        let back = store.load(&id).await.unwrap().unwrap();
        assert_eq!((back.version(), back.owner()), (version, owner));
        assert_eq!(back.expires_at_unix_ms(), expires);
        for name in ["ada", "bob"] {
            let listed = store.owned(name).await.unwrap();
            assert_eq!(listed.len(), usize::from(owner == Some(name)), "{name}");
        }
    }
    store.save(&at(7, Some("ada")), 6).await.unwrap();
    let later = common::unix_ms(in_ms(120_000));
    assert_eq!(
        store
            .touch(&id, 7, common::from_unix_ms(later))
            .await
            .unwrap(),
        SaveOutcome::Saved
    );
    assert_eq!(stored_owner(id).as_deref(), Some("ada"));
}

/// `touch` and `remove` are compare-and-sets on the version: the right version changes the row
/// (touch: the expiry only), another version is a conflict that changes nothing, and a missing
/// or expired row is missing (and stays as it was: never revived, never counted as removed).
#[tokio::test]
async fn conditional_touch_and_remove() {
    let (store, dir) = file_fixture().await;
    let c = raw(&dir.db());
    let e = |x: u64| i64::try_from(x).unwrap();
    let now = now_unix_ms();
    let (e1, e2, e3) = (now + 60_000, now + 90_000, now + 30_000);
    let id = new_key();
    let at = |v, d: &str, e| record_at_ms(id, Bytes::from(d.to_owned()), v, e);
    store.create(&at(1, "a", e1)).await.unwrap();

    // The right version: the expiry moves (later, then earlier), data and version stay.
    assert_eq!(
        store.touch(&id, 1, from_ms(e2)).await.unwrap(),
        SaveOutcome::Saved
    );
    assert_eq!(stored_row(&c, id), Some((b"a".to_vec(), 1, e(e2))));
    assert_eq!(
        store.touch(&id, 1, from_ms(e3)).await.unwrap(),
        SaveOutcome::Saved
    );
    assert_eq!(stored_row(&c, id), Some((b"a".to_vec(), 1, e(e3))));
    let back = store.load(&id).await.unwrap().unwrap();
    assert_eq!((back.version(), back.expires_at_unix_ms()), (1, e3));
    // The expiry index follows the touch.
    let by_index: i64 = c
        .query_row(
            "SELECT count(*) FROM sessions INDEXED BY sessions_expires_at WHERE expires_at = ?1",
            [e(e3)],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(by_index, 1);

    // Another version (older, newer, beyond SQLite's integers): a conflict, nothing changed.
    for wrong in [0, 2, u64::MAX] {
        assert_eq!(
            store.touch(&id, wrong, from_ms(e1)).await.unwrap(),
            SaveOutcome::Conflict,
            "touch expecting {wrong}"
        );
        assert_eq!(
            store.remove(&id, wrong).await.unwrap(),
            SaveOutcome::Conflict,
            "remove expecting {wrong}"
        );
        assert_eq!(stored_row(&c, id), Some((b"a".to_vec(), 1, e(e3))));
    }

    // A newer version saved in between: the old version's touch and remove change nothing.
    assert_eq!(
        store.save(&at(2, "b", e1), 1).await.unwrap(),
        SaveOutcome::Saved
    );
    assert_eq!(
        store.touch(&id, 1, from_ms(e2)).await.unwrap(),
        SaveOutcome::Conflict
    );
    assert_eq!(store.remove(&id, 1).await.unwrap(), SaveOutcome::Conflict);
    assert_eq!(stored_row(&c, id), Some((b"b".to_vec(), 2, e(e1))));

    // The right version removes it; then it is missing to both.
    assert_eq!(store.remove(&id, 2).await.unwrap(), SaveOutcome::Saved);
    assert_eq!(stored_row(&c, id), None);
    assert!(store.load(&id).await.unwrap().is_none());
    assert_eq!(store.remove(&id, 2).await.unwrap(), SaveOutcome::Missing);
    assert_eq!(
        store.touch(&id, 2, from_ms(e2)).await.unwrap(),
        SaveOutcome::Missing
    );
    assert_eq!(stored_row(&c, id), None, "touch re-created a removed row");

    // An unknown id, whatever the version.
    for v in [0, 1, u64::MAX] {
        let unknown = new_key();
        assert_eq!(
            store.touch(&unknown, v, from_ms(e1)).await.unwrap(),
            SaveOutcome::Missing
        );
        assert_eq!(
            store.remove(&unknown, v).await.unwrap(),
            SaveOutcome::Missing
        );
        assert_eq!(stored_row(&c, unknown), None);
    }

    // An expired row (not yet cleaned up) is missing, for the right version and any other: the
    // touch does not revive it, and the remove leaves it to the cleanup.
    let old = new_key();
    let expired = record_at_ms(old, Bytes::from_static(b"x"), 3, now + 60_000);
    store.create(&expired).await.unwrap();
    c.execute(
        "UPDATE sessions SET expires_at = ?2 WHERE id = ?1",
        rusqlite::params![&old.to_bytes()[..], e(now - 1)],
    )
    .unwrap();
    for v in [3, 2, 4] {
        assert_eq!(
            store.touch(&old, v, from_ms(e1)).await.unwrap(),
            SaveOutcome::Missing
        );
        assert_eq!(store.remove(&old, v).await.unwrap(), SaveOutcome::Missing);
    }
    assert_eq!(stored_row(&c, old), Some((b"x".to_vec(), 3, e(now - 1))));
    assert!(store.load(&old).await.unwrap().is_none());
}

fn from_ms(ms: u64) -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_millis(ms)
}

/// The same outcomes on an in-memory database (the store's other fixture).
#[tokio::test]
async fn conditional_touch_and_remove_in_memory() {
    let (store, ()) = memory_fixture().await;
    let id = new_key();
    store.create(&record(id, "a", in_ms(60_000))).await.unwrap();
    let later = in_ms(120_000);
    assert_eq!(
        store.touch(&id, 2, later).await.unwrap(),
        SaveOutcome::Conflict
    );
    assert_eq!(store.remove(&id, 0).await.unwrap(), SaveOutcome::Conflict);
    let back = store.load(&id).await.unwrap().unwrap();
    assert_eq!(back.version(), 1);
    assert!(back.expires_at_unix_ms() < unix_ms(later));
    assert_eq!(
        store.touch(&id, 1, later).await.unwrap(),
        SaveOutcome::Saved
    );
    let back = store.load(&id).await.unwrap().unwrap();
    assert_eq!(
        (back.version(), back.data(), back.expires_at_unix_ms()),
        (1, &Bytes::from("a"), unix_ms(later))
    );
    assert_eq!(store.remove(&id, 1).await.unwrap(), SaveOutcome::Saved);
    assert!(store.load(&id).await.unwrap().is_none());
    assert_eq!(store.remove(&id, 1).await.unwrap(), SaveOutcome::Missing);
    assert_eq!(
        store.touch(&id, 1, later).await.unwrap(),
        SaveOutcome::Missing
    );
    assert!(store.load(&id).await.unwrap().is_none());
}

/// Racing a save of the next version, queued together so that they are committed in one batch
/// (another connection holds the write lock meanwhile), in either order: a remove of the old
/// version never removes the newer one, and a touch of the old version never overrides the
/// newer one's expiry. Every outcome matches what is stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn touch_and_remove_never_undo_a_newer_version() {
    let (store, dir) = file_fixture().await;
    let other = raw(&dir.db());
    let saved_expiry = now_unix_ms() + 600_000;
    let (mut removed_first, mut saved_first) = (0, 0);
    for round in 0..40 {
        let id = new_key();
        let data = |v: &str| Bytes::from(v.to_owned());
        store
            .create(&record_at_ms(id, data("v1"), 1, saved_expiry - 1000))
            .await
            .unwrap();
        other.execute_batch("BEGIN IMMEDIATE").unwrap();
        // A first write waits for the lock on the store's thread; the two behind it queue up and
        // are then committed together, in the order they were queued.
        let s0 = store.clone();
        let blocker =
            tokio::spawn(async move { s0.create(&record(new_key(), "b", in_ms(60_000))).await });
        tokio::time::sleep(Duration::from_millis(5)).await;
        let next = record_at_ms(id, data("v2"), 2, saved_expiry);
        let (s1, s2) = (store.clone(), store.clone());
        // Alternate which one is queued first.
        let (save, change) = if round % 2 == 0 {
            let save = tokio::spawn(async move { s1.save(&next, 1).await });
            tokio::time::sleep(Duration::from_millis(5)).await;
            let change = tokio::spawn(async move {
                if round % 4 == 0 {
                    s2.remove(&id, 1).await
                } else {
                    s2.touch(&id, 1, from_ms(saved_expiry - 500_000)).await
                }
            });
            (save, change)
        } else {
            let change = tokio::spawn(async move {
                if round % 4 == 1 {
                    s2.remove(&id, 1).await
                } else {
                    s2.touch(&id, 1, from_ms(saved_expiry - 500_000)).await
                }
            });
            tokio::time::sleep(Duration::from_millis(5)).await;
            let save = tokio::spawn(async move { s1.save(&next, 1).await });
            (save, change)
        };
        tokio::time::sleep(Duration::from_millis(20)).await;
        other.execute_batch("ROLLBACK").unwrap();
        assert_eq!(blocker.await.unwrap().unwrap(), CreateOutcome::Created);
        let (save, change) = (save.await.unwrap().unwrap(), change.await.unwrap().unwrap());
        let row = store.load(&id).await.unwrap();
        let is_remove = round % 4 < 2;
        match (is_remove, save, change) {
            // The save came first: the old version's change is a conflict.
            (_, SaveOutcome::Saved, SaveOutcome::Conflict) => {
                saved_first += 1;
                let row = row.expect("the saved version was removed");
                assert_eq!((row.version(), row.expires_at_unix_ms()), (2, saved_expiry));
            }
            // The remove came first: the save finds nothing, and nothing is there.
            (true, SaveOutcome::Missing, SaveOutcome::Saved) => {
                removed_first += 1;
                assert!(row.is_none(), "the save re-created a removed session");
            }
            // The touch came first: the save (same version) still applies, with its expiry.
            (false, SaveOutcome::Saved, SaveOutcome::Saved) => {
                let row = row.expect("the saved version is gone");
                assert_eq!((row.version(), row.expires_at_unix_ms()), (2, saved_expiry));
            }
            outcomes => panic!("round {round}: impossible outcomes {outcomes:?}"),
        }
    }
    // Both orders were exercised (each was queued first in half of the rounds).
    assert!(
        saved_first > 0 && removed_first > 0,
        "{saved_first} {removed_first}"
    );
}

/// The expiry is checked when the statement runs, not when the call was made: a touch that
/// waits for another connection's write lock past the record's expiry finds it expired, and
/// does not revive it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expiry_is_checked_when_the_statement_runs() {
    let (store, dir) = file_fixture().await;
    let other = raw(&dir.db());
    let id = new_key();
    store.create(&record(id, "a", in_ms(300))).await.unwrap();
    other.execute_batch("BEGIN IMMEDIATE").unwrap();
    let s = store.clone();
    let touch = tokio::spawn(async move { s.touch(&id, 1, in_ms(60_000)).await });
    tokio::time::sleep(Duration::from_millis(600)).await;
    other.execute_batch("ROLLBACK").unwrap();
    assert_eq!(touch.await.unwrap().unwrap(), SaveOutcome::Missing);
    assert!(store.load(&id).await.unwrap().is_none(), "touch revived it");
}

/// The store keeps its statements prepared for its whole life: a schema change made by another
/// connection meanwhile (a new table, a new index on the session table) is picked up, not an error.
#[tokio::test]
async fn statements_outlive_schema_changes_by_others() {
    let (store, dir) = file_fixture().await;
    let id = new_key();
    store
        .create(&record(id, r#"{"d":{}}"#, in_ms(60_000)))
        .await
        .unwrap();
    let c = raw(&dir.db());
    c.execute_batch(
        "CREATE TABLE unrelated (x INTEGER); CREATE INDEX sessions_version ON sessions (version);",
    )
    .unwrap();
    let back = store.load(&id).await.unwrap().unwrap();
    let next = Record::new(
        id,
        Bytes::from_static(b"{\"d\":{\"n\":1}}"),
        2,
        back.expires_at(),
    );
    assert_eq!(store.save(&next, 1).await.unwrap(), SaveOutcome::Saved);
    // A second store on the same file, under another table name, changes the schema too.
    let other = SqliteStore::builder(dir.db())
        .table("more_sessions")
        .open()
        .await
        .unwrap();
    other
        .create(&record(new_key(), "{}", in_ms(60_000)))
        .await
        .unwrap();
    assert_eq!(
        store.touch(&id, 2, in_ms(90_000)).await.unwrap(),
        SaveOutcome::Saved
    );
    assert_eq!(store.load(&id).await.unwrap().unwrap().version(), 2);
    assert_eq!(store.remove(&id, 1).await.unwrap(), SaveOutcome::Conflict);
    assert_eq!(store.remove(&id, 2).await.unwrap(), SaveOutcome::Saved);
    assert!(store.load(&id).await.unwrap().is_none());
    store.delete(&id).await.unwrap();
}

// ---- a real restart: a server process is killed and started again on the same file ----

const SERVE_ENV: &str = "HYPER_SESSIONS_SQLITE_SERVE";

/// Not a test of its own: when the restart test runs this binary again with `SERVE_ENV` set to
/// a database path, this serves the example app on that file and prints its port.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_server_entry() {
    let Some(path) = std::env::var_os(SERVE_ENV) else {
        return;
    };
    let store = SqliteStore::open(PathBuf::from(path)).await.unwrap();
    let server = serve(&SessionLayer::new(store)).await;
    println!("LISTENING {}", server.addr.port());
    std::future::pending::<()>().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_survive_a_server_restart() {
    let dir = TempDir::new();
    common::servers::sessions_survive_an_app_restart(|| {
        AppProcess::start("restart_server_entry", SERVE_ENV, dir.db())
    })
    .await;
}

/// What holds on `SQLite` today within the layer's 16 save attempts: concurrent `update`s of one
/// session, each on its own connection, are all counted and each returns a distinct value.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_updates_within_the_retry_budget_are_all_counted() {
    let (store, _dir) = file_fixture().await;
    let server = serve(&SessionLayer::new(store)).await;
    let mut b = Browser::new(server.addr).await;
    b.get("/incr/n").await;
    let cookie = b.cookie.clone().unwrap();
    let mut tasks = Vec::new();
    for _ in 0..12 {
        let cookie = cookie.clone();
        let addr = server.addr;
        tasks.push(tokio::spawn(async move {
            let r = Conn::http1(addr).await.get("/incr/n", Some(&cookie)).await;
            assert_eq!(r.status, StatusCode::OK, "{r:?}");
            r.body.parse::<i64>().unwrap()
        }));
    }
    let mut seen = std::collections::BTreeSet::new();
    for t in tasks {
        seen.insert(t.await.unwrap());
    }
    assert_eq!(
        seen.len(),
        12,
        "two updates returned the same value: {seen:?}"
    );
    assert_eq!(b.get("/get/n").await.body, "13");
}

/// Writes are committed together under load; one write that cannot be made (here: larger than
/// the size cap) fails alone, and every other write beside it is stored and reported so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_failing_write_among_concurrent_ones_fails_alone() {
    let dir = TempDir::new();
    let store = SqliteStore::builder(dir.db())
        .max_size(96 * 1024)
        .busy_timeout(Duration::from_secs(5))
        .open()
        .await
        .unwrap();
    let other = raw(&dir.db());
    let huge = format!(r#"{{"d":{{"s":"{}"}}}}"#, "x".repeat(256 * 1024));
    for _ in 0..3 {
        // Another connection holds the write lock, so that the writes queue up behind the first
        // one and are then committed as a batch.
        other.execute_batch("BEGIN IMMEDIATE").unwrap();
        let mut tasks = Vec::new();
        for i in 0..24 {
            let store = store.clone();
            let data = if i == 12 {
                huge.clone()
            } else {
                format!(r#"{{"d":{{"i":{i}}}}}"#)
            };
            tasks.push(tokio::spawn(async move {
                let id = new_key();
                let outcome = store.create(&record(id, &data, in_ms(60_000))).await;
                (i, id, data, outcome)
            }));
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        other.execute_batch("ROLLBACK").unwrap();
        for t in tasks {
            let (i, id, data, outcome) = t.await.unwrap();
            if i == 12 {
                let err = outcome.unwrap_err();
                assert!(err.is_unavailable(), "{}", chain(&err));
                assert!(store.load(&id).await.unwrap().is_none());
            } else {
                assert_eq!(outcome.unwrap(), CreateOutcome::Created);
                let back = store
                    .load(&id)
                    .await
                    .unwrap()
                    .expect("reported stored, not stored");
                assert_eq!(back.data(), &Bytes::from(data));
                store.delete(&id).await.unwrap();
            }
        }
    }
}
