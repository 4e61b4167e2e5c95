//! The PostgreSQL store: the conformance suite on a real server (started here from the Debian
//! package `postgresql`), plus what is particular to it (the schema and its checks, hostile
//! names, corrupt rows, locks, timeouts, an exhausted pool, a read-only server, cleanup, a
//! Unix socket, an app restart, and a server crash under load).

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use common::servers::{AppProcess, PostgresServer};
use common::{Browser, Conn, new_key, serve};
use hyper::StatusCode;
use hyper_sessions::store::{Key, Record, SaveOutcome, SessionStore, StoreError, StoreErrorKind};
use hyper_sessions::{PostgresStore, PostgresStoreBuilder, SessionLayer};

/// A table name no other test of this process uses.
fn fresh_table() -> String {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    format!("sessions_{}", NEXT.fetch_add(1, Ordering::SeqCst))
}

/// A builder for a fresh table, without the cleanup task.
fn builder(table: &str) -> PostgresStoreBuilder {
    PostgresStore::builder().table(table).cleanup_interval(None)
}

async fn fixture() -> (PostgresStore, Arc<PostgresServer>) {
    let server = PostgresServer::shared().await;
    let store = builder(&fresh_table()).open(&server.url()).await.unwrap();
    (store, server)
}

conformance_suite!(fixture);

fn in_ms(ms: u64) -> SystemTime {
    SystemTime::now() + Duration::from_millis(ms)
}

fn record(key: Key, data: &str, expires_at: SystemTime) -> Record {
    Record::new(key, Bytes::from(data.to_owned()), 1, expires_at)
}

/// An error with its whole chain of causes.
fn chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        text.push_str(": ");
        text.push_str(&c.to_string());
        cause = c.source();
    }
    text
}

fn check_named_by_fingerprint_only(text: &str, key: Key) {
    let full = key.to_hex();
    assert!(text.contains(&full[..8]), "the row is named: {text}");
    assert!(
        !text.contains(&full[..9]),
        "more than the key's fingerprint leaked: {text}"
    );
}

/// The table and its index are created once, the schema version recorded, and the columns
/// have the types the statements need; opening again finds them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schema_is_created_once_and_versioned() {
    let server = PostgresServer::shared().await;
    let table = fresh_table();
    let store = builder(&table).open(&server.url()).await.unwrap();
    let c = server.client("postgres").await;
    let version: i32 = c
        .query_one(
            "SELECT version FROM public.hyper_sessions_schema WHERE table_name = $1",
            &[&table],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(version, 2);
    let columns: Vec<(String, String)> = c
        .query(
            "SELECT column_name::text, data_type::text FROM information_schema.columns \
             WHERE table_schema = 'public' AND table_name = $1 ORDER BY ordinal_position",
            &[&table],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    let expected = [
        ("key", "bytea"),
        ("data", "bytea"),
        ("version", "bigint"),
        ("expires_at", "timestamp with time zone"),
        ("owner", "text"),
    ];
    assert_eq!(
        columns,
        expected.map(|(n, t)| (n.to_owned(), t.to_owned())).to_vec()
    );
    let index: String = c
        .query_one(
            "SELECT indexdef FROM pg_indexes WHERE tablename = $1 AND indexname = $2",
            &[&table, &format!("{table}_expires_at")],
        )
        .await
        .unwrap()
        .get(0);
    assert!(index.contains("(expires_at)"), "{index}");
    let index: String = c
        .query_one(
            "SELECT indexdef FROM pg_indexes WHERE tablename = $1 AND indexname = $2",
            &[&table, &format!("{table}_owner")],
        )
        .await
        .unwrap()
        .get(0);
    assert!(
        index.contains("(owner)") && index.contains("WHERE (owner IS NOT NULL)"),
        "{index}"
    );
    // A second store on the same table (another app server, a restart) finds it as it is, and
    // both see the same sessions.
    let key = new_key();
    store
        .create(&record(key, "x", in_ms(60_000)))
        .await
        .unwrap();
    let again = builder(&table).open(&server.url()).await.unwrap();
    assert_eq!(
        again.load(&key).await.unwrap().unwrap().data(),
        &Bytes::from("x")
    );
    // Opening many at once (app servers starting together) creates the table once.
    let table = fresh_table();
    let mut opens = Vec::new();
    for _ in 0..6 {
        let (url, table) = (server.url(), table.clone());
        opens.push(tokio::spawn(async move {
            builder(&table).open(&url).await.map(drop)
        }));
    }
    for open in opens {
        open.await.unwrap().unwrap();
    }
}

/// A table of a newer schema version, a table the store did not create, a table whose columns
/// have other types, a missing table when creating is off and a missing schema: each a clear
/// error at open, naming the table and what is wrong.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unusable_tables_are_clear_errors_at_open() {
    let server = PostgresServer::shared().await;
    let c = server.client("postgres").await;
    let open = |table: String| {
        let url = server.url();
        async move { builder(&table).open(&url).await.unwrap_err() }
    };

    let newer = fresh_table();
    builder(&newer).open(&server.url()).await.unwrap();
    c.execute(
        "UPDATE public.hyper_sessions_schema SET version = 3 WHERE table_name = $1",
        &[&newer],
    )
    .await
    .unwrap();
    let err = open(newer.clone()).await;
    assert_eq!(err.kind(), StoreErrorKind::Other);
    let text = chain(&err);
    assert!(text.contains("schema version 3"), "{text}");
    assert!(text.contains(&newer), "{text}");

    let foreign = fresh_table();
    c.batch_execute(&format!("CREATE TABLE {foreign} (id int)"))
        .await
        .unwrap();
    let text = chain(&open(foreign.clone()).await);
    assert!(text.contains("did not create"), "{text}");

    let altered = fresh_table();
    builder(&altered).open(&server.url()).await.unwrap();
    c.batch_execute(&format!(
        "ALTER TABLE {altered} ALTER COLUMN version TYPE text, DROP COLUMN data"
    ))
    .await
    .unwrap();
    let text = chain(&open(altered).await);
    assert!(
        text.contains("version is text, expected bigint")
            && text.contains("data (bytea) is missing"),
        "{text}"
    );

    let missing = fresh_table();
    let err = builder(&missing)
        .create_table(false)
        .open(&server.url())
        .await
        .unwrap_err();
    let text = chain(&err);
    assert!(
        text.contains("does not exist") && text.contains(&missing),
        "{text}"
    );
    let exists: bool = c
        .query_one("SELECT to_regclass($1) IS NOT NULL", &[&missing])
        .await
        .unwrap()
        .get(0);
    assert!(!exists, "create_table(false) created the table");

    let err = builder(&fresh_table())
        .schema("no_such_schema")
        .open(&server.url())
        .await
        .unwrap_err();
    let text = chain(&err);
    assert!(
        text.contains("schema \"no_such_schema\" does not exist"),
        "{text}"
    );

    // Another schema, and a table name in mixed case: used exactly as given.
    c.batch_execute("CREATE SCHEMA IF NOT EXISTS app")
        .await
        .unwrap();
    let store = PostgresStore::builder()
        .schema("app")
        .table("Web_Sessions")
        .cleanup_interval(None)
        .open(&server.url())
        .await
        .unwrap();
    let key = new_key();
    store
        .create(&record(key, "x", in_ms(60_000)))
        .await
        .unwrap();
    let n: i64 = c
        .query_one("SELECT count(*) FROM app.\"Web_Sessions\"", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 1);
    let debug = format!("{store:?}");
    assert!(
        debug.contains("app") && debug.contains("Web_Sessions"),
        "{debug}"
    );
}

/// Creates `table` exactly as the release before owners did (schema version 1), under the
/// stores' setup lock (`0x6879_7065_7273_6573`: other tests' stores may be creating the version
/// table meanwhile).
async fn create_v1_table(c: &tokio_postgres::Client, table: &str) {
    c.batch_execute(&format!(
        "BEGIN; SELECT pg_advisory_xact_lock(7528171833140667763); \
         CREATE TABLE IF NOT EXISTS public.hyper_sessions_schema \
         (table_name text PRIMARY KEY, version integer NOT NULL); \
         CREATE TABLE public.\"{table}\" (\
           key bytea PRIMARY KEY CHECK (octet_length(key) = 16), \
           data bytea NOT NULL, \
           version bigint NOT NULL, \
           expires_at timestamptz NOT NULL\
         ) WITH (fillfactor = 90); \
         CREATE INDEX \"{table}_expires_at\" ON public.\"{table}\" (expires_at); \
         INSERT INTO public.hyper_sessions_schema (table_name, version) VALUES ('{table}', 1); \
         COMMIT;"
    ))
    .await
    .unwrap();
}

/// A version-1 table (no owners) is migrated when stores open it, several at once (app
/// servers starting together): the column and its index are added once, the version row says
/// 2, the rows it held load as they were (without an owner), and owners work from then on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn version_1_tables_are_migrated() {
    let server = PostgresServer::shared().await;
    let c = server.client("postgres").await;
    let table = fresh_table();
    create_v1_table(&c, &table).await;
    let old = new_key();
    c.execute(
        &format!(
            "INSERT INTO {table} (key, data, version, expires_at) \
             VALUES ($1, $2, 3, now() + interval '1 hour')"
        ),
        &[&&old.to_bytes()[..], &&b"{\"d\":{\"n\":1}}"[..]],
    )
    .await
    .unwrap();

    let mut opens = Vec::new();
    for _ in 0..4 {
        let (url, table) = (server.url(), table.clone());
        opens.push(tokio::spawn(
            async move { builder(&table).open(&url).await },
        ));
    }
    let mut stores = Vec::new();
    for open in opens {
        stores.push(open.await.unwrap().unwrap());
    }
    let store = &stores[0];
    let back = store.load(&old).await.unwrap().expect("the old row loads");
    assert_eq!(back.data(), &Bytes::from_static(b"{\"d\":{\"n\":1}}"));
    assert_eq!((back.version(), back.owner()), (3, None));
    let version: i32 = c
        .query_one(
            "SELECT version FROM public.hyper_sessions_schema WHERE table_name = $1",
            &[&table],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(version, 2);
    let index: String = c
        .query_one(
            "SELECT indexdef FROM pg_indexes WHERE tablename = $1 AND indexname = $2",
            &[&table, &format!("{table}_owner")],
        )
        .await
        .unwrap()
        .get(0);
    assert!(index.contains("WHERE (owner IS NOT NULL)"), "{index}");

    // Owners work: the old row given one by a save, a new one created with one; every store
    // on the table sees them.
    let saved =
        Record::new(old, back.data().clone(), 4, back.expires_at()).with_owner(Some("42".into()));
    assert_eq!(store.save(&saved, 3).await.unwrap(), SaveOutcome::Saved);
    let new = new_key();
    let created = record(new, "{}", in_ms(60_000)).with_owner(Some("42".into()));
    store.create(&created).await.unwrap();
    let mut expected = vec![old, new];
    expected.sort();
    for store in &stores {
        let mut listed: Vec<Key> = store
            .owned("42")
            .await
            .unwrap()
            .iter()
            .map(Record::key)
            .collect();
        listed.sort();
        assert_eq!(listed, expected);
    }
    assert_eq!(
        stores[3].load(&old).await.unwrap().unwrap().owner(),
        Some("42")
    );
}

/// A migration that cannot be made (the name of the owner index is taken) changes nothing: the
/// table stays at version 1 without the column, and the store does not open.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_migration_changes_nothing() {
    let server = PostgresServer::shared().await;
    let c = server.client("postgres").await;
    let table = fresh_table();
    create_v1_table(&c, &table).await;
    c.batch_execute(&format!("CREATE TABLE \"{table}_owner\" (x int)"))
        .await
        .unwrap();
    let err = builder(&table).open(&server.url()).await.unwrap_err();
    let text = chain(&err);
    assert!(text.contains(&format!("{table}_owner")), "{text}");
    let version: i32 = c
        .query_one(
            "SELECT version FROM public.hyper_sessions_schema WHERE table_name = $1",
            &[&table],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(version, 1);
    let owner_columns: i64 = c
        .query_one(
            "SELECT count(*) FROM information_schema.columns \
             WHERE table_name = $1 AND column_name = 'owner'",
            &[&table],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(owner_columns, 0, "the column was added without the rest");
}

/// An unreadable row among an owner's makes the listing corrupt (naming the row by its key's
/// fingerprint); an owner column whose type was changed after the store opened makes `load`
/// corrupt (naming the column) and the listing fail; no error names the owner.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreadable_owner_is_a_corrupt_row() {
    let server = PostgresServer::shared().await;
    let table = fresh_table();
    let store = builder(&table).open(&server.url()).await.unwrap();
    let owner = "alice@example.com";
    let key = new_key();
    store
        .create(&record(key, "{}", in_ms(60_000)).with_owner(Some(owner.into())))
        .await
        .unwrap();
    assert_eq!(store.owned(owner).await.unwrap().len(), 1);
    let c = server.client("postgres").await;
    // An unreadable version among the owner's rows: the listing is corrupt, naming the row by
    // its fingerprint and not the owner.
    c.batch_execute(&format!(
        "ALTER TABLE {table} ALTER COLUMN version DROP NOT NULL; \
         UPDATE {table} SET version = NULL"
    ))
    .await
    .unwrap();
    let err = store.owned(owner).await.unwrap_err();
    let text = chain(&err);
    assert_eq!(err.kind(), StoreErrorKind::Corrupt, "{text}");
    assert!(text.contains("column version"), "{text}");
    check_named_by_fingerprint_only(&text, key);
    assert!(!text.contains("alice"), "the owner leaked: {text}");
    c.batch_execute(&format!("UPDATE {table} SET version = 1"))
        .await
        .unwrap();
    c.batch_execute(&format!(
        "ALTER TABLE {table} ALTER COLUMN owner TYPE bytea USING convert_to(owner, 'UTF8')"
    ))
    .await
    .unwrap();
    let err = store.load(&key).await.unwrap_err();
    let text = chain(&err);
    assert_eq!(err.kind(), StoreErrorKind::Corrupt, "{text}");
    assert!(text.contains("column owner"), "{text}");
    check_named_by_fingerprint_only(&text, key);
    assert!(!text.contains("alice"), "the owner leaked: {text}");
    let err = store.owned(owner).await.unwrap_err();
    let text = chain(&err);
    assert!(!text.contains("alice"), "the owner leaked: {text}");
}

/// Table and schema names that are not plain identifiers never reach SQL: `open` refuses them
/// before connecting, and nothing is created.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_names_are_refused() {
    let server = PostgresServer::shared().await;
    let c = server.client("postgres").await;
    let tables = || async {
        let n: i64 = c
            .query_one("SELECT count(*) FROM pg_tables", &[])
            .await
            .unwrap()
            .get(0);
        n
    };
    let before = tables().await;
    for name in [
        "",
        "1abc",
        "a b",
        "public.sessions",
        "sessions\"; DROP TABLE x; --",
        "s'; DROP TABLE x; --",
        "pg_sessions",
        "hyper_sessions_schema",
        "täble",
        "a\0b",
        &"a".repeat(49),
    ] {
        let err = PostgresStore::builder()
            .table(name)
            .open(&server.url())
            .await
            .unwrap_err();
        assert_eq!(err.kind(), StoreErrorKind::Other);
        assert!(
            chain(&err).contains("invalid PostgreSQL table name"),
            "{name:?}: {}",
            chain(&err)
        );
        let name = if name.len() == 49 {
            &"a".repeat(64)
        } else {
            name
        };
        let err = PostgresStore::builder()
            .schema(name)
            .open(&server.url())
            .await
            .unwrap_err();
        assert!(
            chain(&err).contains("invalid PostgreSQL schema name"),
            "{name:?}: {}",
            chain(&err)
        );
    }
    assert_eq!(tables().await, before, "a hostile name created a table");
}

/// Connection strings: a Unix socket works like TCP; an invalid string and a server that is not
/// there are clear errors (the latter unavailable, promptly).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unix_sockets_and_unreachable_servers() {
    let server = PostgresServer::shared().await;
    let table = fresh_table();
    let store = builder(&table).open(&server.socket_url()).await.unwrap();
    let key = new_key();
    store
        .create(&record(key, "over the socket", in_ms(60_000)))
        .await
        .unwrap();
    let tcp = builder(&table).open(&server.url()).await.unwrap();
    assert_eq!(
        tcp.load(&key).await.unwrap().unwrap().data(),
        &Bytes::from("over the socket")
    );

    let err = PostgresStore::open("postgres://u@h:notaport/db")
        .await
        .unwrap_err();
    assert_eq!(err.kind(), StoreErrorKind::Other);
    assert!(
        chain(&err).contains("invalid PostgreSQL connection string"),
        "{}",
        chain(&err)
    );

    let port = common::servers::free_port();
    let t = Instant::now();
    let err = PostgresStore::open(&format!("postgres://postgres:hunter2@127.0.0.1:{port}/db"))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), StoreErrorKind::Unavailable, "{}", chain(&err));
    assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
    let text = format!("{} {err:?}", chain(&err));
    assert!(text.contains(&format!("127.0.0.1:{port}/db")), "{text}");
    assert!(!text.contains("hunter2"), "the password leaked: {text}");
}

/// Rows the store cannot read back (a column's value or type changed by hand): `load` says
/// corrupt, naming the column and the row by its key's fingerprint only; over HTTP the request
/// gets a fresh session and the row is left alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupt_rows_are_reported_and_start_a_fresh_session() {
    let server = PostgresServer::shared().await;
    let table = fresh_table();
    let store = builder(&table).open(&server.url()).await.unwrap();
    let app = serve(&SessionLayer::new(store.clone())).await;
    let c = server.client("postgres").await;
    c.batch_execute(&format!(
        "ALTER TABLE {table} ALTER COLUMN version DROP NOT NULL, \
         ALTER COLUMN data DROP NOT NULL, ALTER COLUMN expires_at DROP NOT NULL"
    ))
    .await
    .unwrap();
    let cases = [
        ("version", "version = NULL"),
        ("version", "version = -3"),
        ("data", "data = NULL"),
    ];
    for (column, garbage) in cases {
        let mut b = Browser::new(app.addr).await;
        assert_eq!(b.get("/counter").await.body, "1");
        let key = b.key().unwrap();
        let cookie = b.cookie.clone().unwrap();
        c.execute(
            &format!("UPDATE {table} SET {garbage} WHERE key = $1"),
            &[&&key.to_bytes()[..]],
        )
        .await
        .unwrap();
        let err = store.load(&key).await.unwrap_err();
        let text = chain(&err);
        assert_eq!(err.kind(), StoreErrorKind::Corrupt, "{text}");
        assert!(text.contains(&format!("column {column}")), "{text}");
        check_named_by_fingerprint_only(&text, key);
        let mut conn = Conn::http1(app.addr).await;
        let r = conn.get("/counter", Some(&cookie)).await;
        assert_eq!((r.status, r.body.as_str()), (StatusCode::OK, "1"));
        assert_ne!(r.cookie_pair().unwrap(), cookie);
        assert!(
            store.load(&key).await.is_err(),
            "the corrupt row was replaced"
        );
    }

    // A column whose type is changed after the store opened (its statements are prepared on
    // every pooled connection): prepared again, and the rows it cannot read are corrupt.
    let mut b = Browser::new(app.addr).await;
    assert_eq!(b.get("/counter").await.body, "1");
    let key = b.key().unwrap();
    c.batch_execute(&format!(
        "ALTER TABLE {table} ALTER COLUMN version TYPE numeric"
    ))
    .await
    .unwrap();
    let err = store.load(&key).await.unwrap_err();
    let text = chain(&err);
    assert_eq!(err.kind(), StoreErrorKind::Corrupt, "{text}");
    assert!(text.contains("column version"), "{text}");
    check_named_by_fingerprint_only(&text, key);
    let r = b.get("/read").await;
    assert_eq!((r.status, r.body.as_str()), (StatusCode::OK, "0"));
    let still: i64 = c
        .query_one(
            &format!("SELECT count(*) FROM {table} WHERE key = $1"),
            &[&&key.to_bytes()[..]],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(still, 1, "the unreadable row was removed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delete_expired_and_the_cleanup_task() {
    let server = PostgresServer::shared().await;
    let table = fresh_table();
    let store = builder(&table).open(&server.url()).await.unwrap();
    let c = server.client("postgres").await;
    let live = new_key();
    store
        .create(&record(live, "live", in_ms(60_000)))
        .await
        .unwrap();
    c.execute(
        &format!(
            "INSERT INTO {table} (key, data, version, expires_at) \
             SELECT substr(sha256(i::text::bytea), 1, 16), 'old', 1, now() - interval '1 second' \
             FROM generate_series(1, 2500) AS i"
        ),
        &[],
    )
    .await
    .unwrap();
    let rows = || async {
        let n: i64 = c
            .query_one(&format!("SELECT count(*) FROM {table}"), &[])
            .await
            .unwrap()
            .get(0);
        n
    };
    assert_eq!(rows().await, 2501);
    assert_eq!(store.delete_expired().await.unwrap(), 2500);
    assert_eq!(rows().await, 1);
    assert!(store.load(&live).await.unwrap().is_some());
    assert_eq!(store.delete_expired().await.unwrap(), 0);

    // The task: runs on its interval, and stops with the store.
    let store = builder(&table)
        .cleanup_interval(Some(Duration::from_millis(100)))
        .open(&server.url())
        .await
        .unwrap();
    for _ in 0..10 {
        store
            .create(&record(new_key(), "old", in_ms(20)))
            .await
            .unwrap();
    }
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(rows().await, 1, "the cleanup task did not run");
    drop(store);
    tokio::time::sleep(Duration::from_millis(150)).await;
    c.execute(
        &format!(
            "INSERT INTO {table} (key, data, version, expires_at) \
             VALUES ('\\x00112233445566778899aabbccddeeff', 'x', 1, now())"
        ),
        &[],
    )
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_millis(350)).await;
    assert_eq!(rows().await, 2, "a cleanup task outlived its store");
}

/// Another connection holds a session's row lock (a long transaction): writes to that row
/// answer 503 after the statement timeout (and the server cancels them too), reads of it are
/// answered at once (MVCC readers take no row lock), other sessions are untouched, and once the
/// lock is released the same layer writes again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_locked_row_times_out_writes_but_not_reads() {
    let server = PostgresServer::shared().await;
    let table = fresh_table();
    let store = builder(&table)
        .statement_timeout(Duration::from_millis(300))
        .open(&server.url())
        .await
        .unwrap();
    let app = serve(&SessionLayer::new(store.clone())).await;
    let mut b = Browser::new(app.addr).await;
    assert_eq!(b.get("/counter").await.body, "1");
    let key = b.key().unwrap();
    let mut locker = server.client("postgres").await;
    let tx = locker.transaction().await.unwrap();
    tx.execute(
        &format!("SELECT 1 FROM {table} WHERE key = $1 FOR UPDATE"),
        &[&&key.to_bytes()[..]],
    )
    .await
    .unwrap();

    let t = Instant::now();
    let r = b.get("/counter").await;
    let took = t.elapsed();
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(r.body.is_empty() && r.set_cookies().is_empty());
    assert!(
        took >= Duration::from_millis(250) && took < Duration::from_millis(1500),
        "{took:?}"
    );
    let t = Instant::now();
    assert_eq!(b.get("/read").await.body, "1");
    assert!(
        t.elapsed() < Duration::from_millis(250),
        "a read waited for a row lock"
    );
    let mut other = Browser::new(app.addr).await;
    assert_eq!(other.get("/counter").await.body, "1");
    assert_eq!(other.get("/counter").await.body, "2");
    // The timed-out statement is cancelled on the server too (its statement_timeout, which
    // started a little after the client's clock when the connection had to be opened first),
    // so it does not wait on behind the client's back.
    lock_waiters_end(&server, &table).await;
    let err = store
        .save(&Record::new(key, Bytes::from("{}"), 2, in_ms(60_000)), 1)
        .await
        .unwrap_err();
    assert!(err.is_unavailable(), "{}", chain(&err));
    assert!(chain(&err).contains("statement timeout"), "{}", chain(&err));
    check_no_whole_key(&chain(&err), key);
    lock_waiters_end(&server, &table).await;

    tx.rollback().await.unwrap();
    assert_eq!(b.get("/counter").await.body, "2");
}

/// Waits until no statement on `table` waits for a lock any more (the server's statement timeout
/// cancels the ones the store gave up on); fails after 2 s.
async fn lock_waiters_end(server: &PostgresServer, table: &str) {
    let c = server.client("postgres").await;
    let t = Instant::now();
    loop {
        let waiting: i64 = c
            .query_one(
                "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' \
                 AND strpos(query, $1) > 0",
                &[&format!("\"{table}\"")],
            )
            .await
            .unwrap()
            .get(0);
        if waiting == 0 {
            return;
        }
        assert!(
            t.elapsed() < Duration::from_secs(2),
            "a statement the store gave up on still waits for its lock"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn check_no_whole_key(text: &str, key: Key) {
    assert!(!text.contains(&key.to_hex()[..9]), "{text}");
}

/// Every pooled connection busy past the statement timeout (an application's own pool, shared
/// with the store through `with_pool`, its only connection held by the application): store
/// operations answer 503 promptly, saying so, and serve again once a connection is free. A
/// statement stuck behind a row lock past the timeout is cancelled on the server and its
/// connection closed (not handed on to the next operation, which would queue behind it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_exhausted_pool_is_unavailable() {
    use hyper_sessions::deadpool_postgres::{Manager, Pool, tokio_postgres};

    let server = PostgresServer::shared().await;
    let table = fresh_table();
    let manager = Manager::new(server.url().parse().unwrap(), tokio_postgres::NoTls);
    let pool = Pool::builder(manager).max_size(1).build().unwrap();
    let store = builder(&table)
        .statement_timeout(Duration::from_millis(300))
        .open_with_pool(pool.clone())
        .await
        .unwrap();
    let key = new_key();
    store
        .create(&record(key, "x", in_ms(60_000)))
        .await
        .unwrap();

    let held = pool.get().await.unwrap();
    let t = Instant::now();
    let err = store.load(&key).await.unwrap_err();
    let took = t.elapsed();
    assert!(err.is_unavailable(), "{}", chain(&err));
    assert!(
        took >= Duration::from_millis(250) && took < Duration::from_secs(1),
        "{took:?}"
    );
    assert!(chain(&err).contains("pool exhausted"), "{}", chain(&err));
    drop(held);
    assert_eq!(store.load(&key).await.unwrap().unwrap().version(), 1);

    let mut locker = server.client("postgres").await;
    let tx = locker.transaction().await.unwrap();
    tx.execute(
        &format!("SELECT 1 FROM {table} WHERE key = $1 FOR UPDATE"),
        &[&&key.to_bytes()[..]],
    )
    .await
    .unwrap();
    let err = store.touch(&key, 1, in_ms(120_000)).await.unwrap_err();
    assert!(err.is_unavailable(), "{}", chain(&err));
    // This pool's connections have no server-side statement timeout: the store cancelled the
    // statement it gave up on (else it would wait for the lock, then write, behind our back).
    lock_waiters_end(&server, &table).await;
    // The connection that waited for the lock was closed: the next operation has a fresh one
    // and is answered at once, while the lock is still held.
    let t = Instant::now();
    assert_eq!(store.load(&key).await.unwrap().unwrap().version(), 1);
    assert!(
        t.elapsed() < Duration::from_millis(250),
        "{:?}",
        t.elapsed()
    );
    tx.rollback().await.unwrap();
    assert_eq!(
        store.touch(&key, 1, in_ms(120_000)).await.unwrap(),
        SaveOutcome::Saved
    );
}

/// The server's connections are ended by an administrator (SQLSTATE 57P01), then the database
/// turns read-only (25006, what a standby answers): requests that need a write answer 503, reads
/// go on, and the same store writes again once the database is writable; no restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_only_or_restarted_server_is_unavailable_not_fatal() {
    let server = PostgresServer::shared().await;
    let admin = server.client("postgres").await;
    let db = format!("ro_{}", std::process::id());
    admin
        .batch_execute(&format!("DROP DATABASE IF EXISTS {db}"))
        .await
        .unwrap();
    admin
        .batch_execute(&format!("CREATE DATABASE {db}"))
        .await
        .unwrap();
    let store = builder("sessions")
        .open(&server.url_for(&db))
        .await
        .unwrap();
    let app = serve(&SessionLayer::new(store.clone())).await;
    let mut b = Browser::new(app.addr).await;
    assert_eq!(b.get("/counter").await.body, "1");

    let terminate = format!(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
         WHERE datname = '{db}' AND pid <> pg_backend_pid()"
    );
    admin
        .batch_execute(&format!(
            "ALTER DATABASE {db} SET default_transaction_read_only = on; {terminate}"
        ))
        .await
        .unwrap();
    let mut statuses = Vec::new();
    for _ in 0..3 {
        statuses.push(b.get("/counter").await.status);
    }
    assert!(
        statuses
            .iter()
            .all(|s| *s == StatusCode::SERVICE_UNAVAILABLE),
        "{statuses:?}"
    );
    let err = store
        .create(&record(new_key(), "x", in_ms(60_000)))
        .await
        .unwrap_err();
    assert!(err.is_unavailable(), "{}", chain(&err));
    assert!(chain(&err).contains("25006"), "{}", chain(&err));
    assert_eq!(b.get("/read").await.body, "1", "reads go on");

    admin
        .batch_execute(&format!(
            "ALTER DATABASE {db} SET default_transaction_read_only = off; {terminate}"
        ))
        .await
        .unwrap();
    let t = Instant::now();
    loop {
        let r = b.get("/counter").await;
        if r.status == StatusCode::OK {
            assert_eq!(r.body, "2");
            break;
        }
        assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE);
        assert!(t.elapsed() < Duration::from_secs(5), "no recovery");
    }
    drop((app, store));
    let _ = admin.batch_execute(&terminate).await;
    let _ = admin
        .batch_execute(&format!("DROP DATABASE IF EXISTS {db}"))
        .await;
}

/// With `SERIALIZABLE` as the database's default isolation, two writes of one session conflict
/// with a serialization failure (40001) instead of one waiting for the other's row lock: the
/// store runs such a statement again, so concurrent updates are all counted (the conformance
/// check), not answered 503.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serializable_isolation_keeps_concurrent_updates() {
    let server = PostgresServer::shared().await;
    let admin = server.client("postgres").await;
    let db = format!("ser_{}", std::process::id());
    for sql in [
        format!("DROP DATABASE IF EXISTS {db}"),
        format!("CREATE DATABASE {db}"),
        format!("ALTER DATABASE {db} SET default_transaction_isolation = 'serializable'"),
    ] {
        admin.batch_execute(&sql).await.unwrap();
    }
    let isolation: String = server
        .client(&db)
        .await
        .query_one("SHOW transaction_isolation", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(isolation, "serializable");
    let store = builder("sessions")
        .open(&server.url_for(&db))
        .await
        .unwrap();
    common::conformance::concurrent_updates_are_all_counted(store.clone()).await;
    common::conformance::concurrent_writers_keep_distinct_keys(store.clone()).await;
    drop(store);
    let _ = admin
        .batch_execute(&format!(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{db}'"
        ))
        .await;
    let _ = admin
        .batch_execute(&format!("DROP DATABASE IF EXISTS {db}"))
        .await;
}

/// PostgreSQL stops (an immediate shutdown, as a crash) while requests run, then starts again:
/// prompt 503s meanwhile, nothing acknowledged lost, and the same layer serves again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_crash_and_restart() {
    let mut server = PostgresServer::start().await;
    let store = builder("sessions")
        .statement_timeout(Duration::from_millis(500))
        .open(&server.url())
        .await
        .unwrap();
    common::faults::crash_and_restart(&SessionLayer::new(store), &mut server).await;
}

/// The round trips the issue promises, counted as calls into the store (each call is one
/// prepared statement, one round trip, on a connection that has prepared it): an untouched
/// request none, a new session one, a read one, a write two, a destroy one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn store_calls_per_request() {
    let server = PostgresServer::shared().await;
    let table = fresh_table();
    let store = builder(&table).open(&server.url()).await.unwrap();
    let counting = Counting::new(store);
    let app = serve(&SessionLayer::new(counting.clone())).await;
    let mut b = Browser::new(app.addr).await;
    for (path, expected) in [
        ("/untouched", 0),
        ("/counter", 1), // a new session: create
        ("/read", 1),
        ("/counter", 2),
        ("/untouched", 0),
        ("/destroy", 1),
    ] {
        let before = counting.calls();
        assert_eq!(b.get(path).await.status, StatusCode::OK, "{path}");
        assert_eq!(counting.calls() - before, expected, "{path}");
    }
}

/// The same, counted on the wire: a proxy between the store and PostgreSQL counts the client's
/// `Sync` and `Query` messages, each of which ends a round trip (the client waits for the
/// server's `ReadyForQuery`). With one pooled connection whose statements are all prepared, an
/// untouched request makes none, a new session one, a read one, a write two, a destroy one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn round_trips_per_request_on_the_wire() {
    let server = PostgresServer::shared().await;
    let proxy = RoundTripCounter::start(server.port()).await;
    let url = format!(
        "postgres://postgres@127.0.0.1:{}/postgres?sslmode=disable",
        proxy.port
    );
    let store = builder(&fresh_table())
        .pool_size(1)
        .open(&url)
        .await
        .unwrap();
    let app = serve(&SessionLayer::new(store)).await;
    // Every statement prepared once on the connection.
    let mut warm = Browser::new(app.addr).await;
    for path in ["/counter", "/read", "/counter", "/destroy"] {
        assert_eq!(warm.get(path).await.status, StatusCode::OK);
    }
    let mut b = Browser::new(app.addr).await;
    for (path, expected) in [
        ("/untouched", 0),
        ("/counter", 1),
        ("/read", 1),
        ("/counter", 2),
        ("/read", 1),
        ("/destroy", 1),
    ] {
        let before = proxy.round_trips();
        assert_eq!(b.get(path).await.status, StatusCode::OK, "{path}");
        assert_eq!(proxy.round_trips() - before, expected, "{path}");
    }
}

/// A TCP proxy in front of PostgreSQL that counts the round trips clients make: their `Sync`
/// (extended protocol) and `Query` (simple protocol) messages.
struct RoundTripCounter {
    port: u16,
    count: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl RoundTripCounter {
    async fn start(target: u16) -> RoundTripCounter {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};

        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let count = Arc::new(AtomicUsize::new(0));
        let counter = Arc::clone(&count);
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let server = tokio::net::TcpStream::connect(("127.0.0.1", target))
                    .await
                    .unwrap();
                let (mut client_read, mut client_write) = client.into_split();
                let (mut server_read, mut server_write) = server.into_split();
                tokio::spawn(async move {
                    let _ = tokio::io::copy(&mut server_read, &mut client_write).await;
                });
                let counter = Arc::clone(&counter);
                tokio::spawn(async move {
                    let (mut buf, mut pending) = ([0u8; 8192], Vec::new());
                    let mut started = false;
                    loop {
                        let n = match client_read.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => n,
                        };
                        if server_write.write_all(&buf[..n]).await.is_err() {
                            return;
                        }
                        pending.extend_from_slice(&buf[..n]);
                        // Whole messages: the startup message has no type byte, the others do.
                        loop {
                            let header = usize::from(started);
                            if pending.len() < header + 4 {
                                break;
                            }
                            let len =
                                u32::from_be_bytes(pending[header..header + 4].try_into().unwrap())
                                    as usize;
                            if pending.len() < header + len {
                                break;
                            }
                            if started && matches!(pending[0], b'S' | b'Q') {
                                counter.fetch_add(1, Ordering::SeqCst);
                            }
                            pending.drain(..header + len);
                            started = true;
                        }
                    }
                });
            }
        });
        RoundTripCounter { port, count, task }
    }

    fn round_trips(&self) -> usize {
        self.count.load(Ordering::SeqCst)
    }
}

impl Drop for RoundTripCounter {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A store that counts the calls made to the PostgreSQL store.
#[derive(Clone)]
struct Counting {
    inner: PostgresStore,
    calls: Arc<AtomicUsize>,
}

impl Counting {
    fn new(inner: PostgresStore) -> Counting {
        Counting {
            inner,
            calls: Arc::new(AtomicUsize::new(0)),
        }
    }

    fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }

    fn count(&self) {
        self.calls.fetch_add(1, Ordering::SeqCst);
    }
}

impl SessionStore for Counting {
    async fn load(&self, key: &Key) -> Result<Option<Record>, StoreError> {
        self.count();
        self.inner.load(key).await
    }
    async fn create(
        &self,
        record: &Record,
    ) -> Result<hyper_sessions::store::CreateOutcome, StoreError> {
        self.count();
        self.inner.create(record).await
    }
    async fn save(&self, record: &Record, expected: u64) -> Result<SaveOutcome, StoreError> {
        self.count();
        self.inner.save(record, expected).await
    }
    async fn touch(
        &self,
        key: &Key,
        expected: u64,
        expires_at: SystemTime,
    ) -> Result<SaveOutcome, StoreError> {
        self.count();
        self.inner.touch(key, expected, expires_at).await
    }
    async fn remove(&self, key: &Key, expected: u64) -> Result<SaveOutcome, StoreError> {
        self.count();
        self.inner.remove(key, expected).await
    }
    async fn delete(&self, key: &Key) -> Result<(), StoreError> {
        self.count();
        self.inner.delete(key).await
    }
    async fn owned(&self, owner: &str) -> Result<Vec<Record>, StoreError> {
        self.count();
        self.inner.owned(owner).await
    }
}

// ---- a real restart: the app process is killed and started again on the same table ----

const SERVE_ENV: &str = "HYPER_SESSIONS_POSTGRES_SERVE";

/// Not a test of its own: when the restart test runs this binary again with `SERVE_ENV` set to
/// `URL TABLE`, this serves the example app on that table and prints its port.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_server_entry() {
    let Ok(spec) = std::env::var(SERVE_ENV) else {
        return;
    };
    let (url, table) = spec.split_once(' ').unwrap();
    let store = builder(table).open(url).await.unwrap();
    let server = serve(&SessionLayer::new(store)).await;
    println!("LISTENING {}", server.addr.port());
    std::future::pending::<()>().await;
}

/// The app is killed (SIGKILL) and started again: its sessions are all there, a destroyed one
/// stays destroyed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_survive_an_app_restart() {
    let server = PostgresServer::shared().await;
    let spec = format!("{} {}", server.url(), fresh_table());
    common::servers::sessions_survive_an_app_restart(|| {
        AppProcess::start("restart_server_entry", SERVE_ENV, &spec)
    })
    .await;
}

/// With `postgres-tls`: a connector trusting the test CA and `sslmode=require` connect over TLS
/// (the server says so in `pg_stat_ssl`); the system's default trust, which lacks the test CA,
/// is refused at open.
#[cfg(feature = "postgres-tls")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_connections() {
    use hyper_sessions::native_tls::{Certificate, TlsConnector};

    let ca = common::servers::TestCa::generate();
    let server = PostgresServer::start_with_tls(&ca).await;
    let url = format!("{}?sslmode=require&application_name=tls_test", server.url());
    let connector = TlsConnector::builder()
        .add_root_certificate(Certificate::from_pem(&ca.ca_pem()).unwrap())
        .build()
        .unwrap();
    let store = builder("sessions").tls(connector).open(&url).await.unwrap();
    let key = new_key();
    store
        .create(&record(key, "over TLS", in_ms(60_000)))
        .await
        .unwrap();
    assert_eq!(
        store.load(&key).await.unwrap().unwrap().data(),
        &Bytes::from("over TLS")
    );
    let tls: i64 = server
        .client("postgres")
        .await
        .query_one(
            "SELECT count(*) FROM pg_stat_ssl JOIN pg_stat_activity USING (pid) \
             WHERE ssl AND application_name = 'tls_test'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(tls >= 1, "the store's connections are not encrypted");

    let untrusted = TlsConnector::new().unwrap();
    let err = builder("sessions")
        .tls(untrusted)
        .open(&url)
        .await
        .unwrap_err();
    assert!(chain(&err).contains("cannot connect"), "{}", chain(&err));
}
