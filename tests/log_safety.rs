//! No session id (in any spelling), no whole store key, no stored value and no session owner
//! ever appears in an error or a log line, on every error path of every store.
//!
//! Each case makes a session holding a secret value, breaks the store the way it breaks in
//! production (down, slow, locked, full, a corrupt or foreign record), then drives every
//! operation through the layer and straight against the store. Every log line of the process
//! (a capturing `log` logger) and every error's `Display`, `Debug` and cause chain is searched
//! for the secrets. A case that produced no error at all fails too: it would prove nothing.

mod common;

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Mutex, Once};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use common::{Browser, serve_service};
use http_body_util::Full;
use hyper::{Request, Response, StatusCode};
use hyper_sessions::store::{Key, Record, SessionStore, StoreError};
use hyper_sessions::{Error, Id, MemoryStore, Session, SessionLayer};

/// Every log line of this test process.
static LOGS: Mutex<Vec<String>> = Mutex::new(Vec::new());

struct Capture;

impl log::Log for Capture {
    fn enabled(&self, _: &log::Metadata<'_>) -> bool {
        true
    }

    fn log(&self, record: &log::Record<'_>) {
        let line = format!("{} {}: {}", record.level(), record.target(), record.args());
        LOGS.lock().unwrap().push(line);
    }

    fn flush(&self) {}
}

fn capture_logs() {
    static INSTALL: Once = Once::new();
    INSTALL.call_once(|| {
        log::set_logger(&Capture).expect("no other logger in this test binary");
        log::set_max_level(log::LevelFilter::Trace);
    });
}

/// What must never be printed: the ids' spellings, the whole keys, the values.
#[derive(Default)]
struct Secrets {
    words: Vec<String>,
}

impl Secrets {
    fn id(&mut self, id: Id) {
        let text = id.to_string();
        let hex = text.replace('-', "");
        // Any 12 digits of the id in a row, in either case, hyphens or not.
        for spelling in [text.clone(), text.to_uppercase()] {
            self.words.push(spelling);
        }
        for window in hex.as_bytes().windows(12) {
            let w = String::from_utf8(window.to_vec()).unwrap();
            self.words.push(w.to_uppercase());
            self.words.push(w);
        }
        // The whole key; its fingerprint (the first 8 digits) may be named.
        self.words.push(Key::of(id).to_hex()[..12].to_owned());
        self.words.push(Key::of(id).to_hex());
        // The key's bytes as `Debug` prints a byte slice (`[18, 250, ...]`), as a database
        // client logging its statement parameters would: any 6 of them in a row.
        let bytes = Key::of(id).to_bytes();
        for window in bytes.windows(6) {
            self.words.push(byte_list(window));
        }
    }

    fn value(&mut self, value: &str) {
        self.words.push(value.to_owned());
        // Its bytes as a `Debug` byte list, as in a database client's parameter log.
        self.words.push(byte_list(value.as_bytes()));
    }

    fn check(&self, what: &str, text: &str) {
        for word in &self.words {
            assert!(
                !text.contains(word.as_str()),
                "{what} shows a secret ({word}): {text}"
            );
        }
    }
}

/// `bytes` as `Debug` prints them inside a byte slice: `18, 250, 3`.
fn byte_list(bytes: &[u8]) -> String {
    let list = format!("{bytes:?}");
    list[1..list.len() - 1].to_owned()
}

/// A value nobody else writes: the test searches for it.
fn secret_value() -> String {
    format!("v4lue{}", Id::random().to_string().replace('-', ""))
}

/// Everything an error prints: its `Display`, its `Debug` and each cause's `Display`.
fn error_texts(e: &(dyn std::error::Error + 'static)) -> Vec<String> {
    let mut texts = vec![e.to_string(), format!("{e:?}")];
    let mut cause = e.source();
    while let Some(c) = cause {
        texts.push(c.to_string());
        cause = c.source();
    }
    texts
}

/// The app: one secret under `secret`; every session error is logged, as an app would.
async fn app(req: Request<hyper::body::Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
    let session = Session::from_request(&req).unwrap();
    let value = req
        .uri()
        .query()
        .and_then(|q| q.strip_prefix("v="))
        .unwrap_or("")
        .to_owned();
    let result: Result<(), Error> = match req.uri().path() {
        "/put" => match session.insert("secret", &value).await {
            // The owner names a user: as secret as the data.
            Ok(()) => session.set_owner(&format!("owner-{value}")).await,
            Err(e) => Err(e),
        },
        "/list" => session.owner_sessions().await.map(drop),
        "/revoke-others" => session.revoke_others().await.map(drop),
        "/get" => session.get::<String>("secret").await.map(drop),
        "/incr" => session
            .update("n", |n: Option<u64>| n.unwrap_or(0) + 1)
            .await
            .map(drop),
        "/flash" => session.flash("note", &value).await,
        "/cycle" => session.cycle_id().await,
        "/clear" => session.clear().await,
        "/destroy" => session.destroy().await,
        _ => Ok(()),
    };
    let status = match result {
        Ok(()) => StatusCode::OK,
        Err(e) => {
            log::error!("app: {e} / {e:?}");
            StatusCode::SERVICE_UNAVAILABLE
        }
    };
    let mut resp = Response::new(Full::new(Bytes::new()));
    *resp.status_mut() = status;
    Ok(resp)
}

/// A step of a case: breaking or mending the store, for the session with this key; answers
/// the store errors it met on the way.
type Step = Pin<Box<dyn Future<Output = Vec<StoreError>> + Send>>;

/// A step that does nothing.
fn nothing(_: Key) -> Step {
    Box::pin(async { Vec::new() })
}

/// Makes a session holding a secret, runs `break_store`, drives every operation through the
/// layer and against the store, runs `mend`, and checks every log line and error.
async fn no_secret_leaks<S: SessionStore + Clone>(
    what: &str,
    store: S,
    break_store: impl FnOnce(Key) -> Step,
    mend: impl FnOnce(Key) -> Step,
) {
    capture_logs();
    let layer = SessionLayer::new(store.clone());
    let server = serve_service(layer.wrap(hyper::service::service_fn(app))).await;
    let mut browser = Browser::new(server.addr).await;
    let mut secrets = Secrets::default();
    let value = secret_value();
    secrets.value(&value);
    let owner = format!("owner-{value}");
    let r = browser.get(&format!("/put?v={value}")).await;
    assert_eq!(r.status, StatusCode::OK, "{what}: the session was not made");
    let id = browser.id().expect("a session cookie");
    secrets.id(id);
    let key = Key::of(id);
    let logs_before = LOGS.lock().unwrap().len();

    let mut errors = break_store(key).await;

    let written = secret_value();
    secrets.value(&written);
    let mut statuses = Vec::new();
    for path in [
        "/get".to_owned(),
        "/list".to_owned(),
        "/revoke-others".to_owned(),
        format!("/put?v={written}"),
        "/incr".to_owned(),
        format!("/flash?v={written}"),
        "/cycle".to_owned(),
        "/clear".to_owned(),
        "/destroy".to_owned(),
    ] {
        let mut b = Browser::with_cookie(server.addr, &format!("id={id}")).await;
        statuses.push(b.get(&path).await.status);
    }
    let data = Bytes::from(format!(r#"{{"d":{{"secret":"{written}"}}}}"#));
    let expires = SystemTime::now() + Duration::from_secs(60);
    let user: std::sync::Arc<str> = owner.into();
    let record =
        |version| Record::new(key, data.clone(), version, expires).with_owner(Some(user.clone()));
    errors.extend(store.load(&key).await.err());
    errors.extend(store.owned(&user).await.err());
    errors.extend(store.create(&record(1)).await.err());
    errors.extend(store.save(&record(2), 1).await.err());
    errors.extend(store.touch(&key, 1, expires).await.err());
    errors.extend(store.remove(&key, 1).await.err());
    errors.extend(store.delete(&key).await.err());

    errors.extend(mend(key).await);

    let logs: Vec<String> = LOGS.lock().unwrap()[logs_before..].to_vec();
    let layer_errors = statuses.iter().filter(|s| **s != StatusCode::OK).count();
    assert!(
        !errors.is_empty() || layer_errors > 0 || logs.iter().any(|l| l.starts_with("ERROR")),
        "{what}: no error at all; the case proves nothing"
    );
    for line in &logs {
        secrets.check(&format!("{what}: a log line"), line);
    }
    for e in &errors {
        for text in error_texts(e) {
            secrets.check(&format!("{what}: a store error"), &text);
        }
    }
}

/// Three sessions of an owner whose name is a secret; `break_rows` (given the owner and two of
/// the keys) makes some rows unreadable. Then the owner's listing, the loads and owned writes
/// meet errors, and neither they nor any log line show the owner.
#[cfg(any(feature = "sqlite", feature = "postgres"))]
async fn owners_never_show<S: SessionStore>(
    what: &str,
    store: S,
    break_rows: impl FnOnce(String, Key, Key) -> Step,
) {
    capture_logs();
    let owner = format!("owner{}", secret_value());
    let mut secrets = Secrets::default();
    secrets.value(&owner);
    let logs_before = LOGS.lock().unwrap().len();
    let expires = SystemTime::now() + Duration::from_secs(60);
    let record = |key, version| {
        Record::new(key, Bytes::from_static(b"{\"d\":{}}"), version, expires)
            .with_owner(Some(owner.as_str().into()))
    };
    let keys: Vec<Key> = (0..3).map(|_| Key::of(Id::random())).collect();
    for &key in &keys {
        store.create(&record(key, 1)).await.unwrap();
    }
    assert_eq!(store.owned(&owner).await.unwrap().len(), 3, "{what}");

    let mut errors = break_rows(owner.clone(), keys[0], keys[1]).await;
    errors.extend(store.owned(&owner).await.err());
    for key in &keys {
        errors.extend(store.load(key).await.err());
    }
    errors.extend(store.save(&record(keys[2], 2), 1).await.err());
    errors.extend(store.create(&record(Key::of(Id::random()), 1)).await.err());

    assert!(
        !errors.is_empty(),
        "{what}: no error at all; the case proves nothing"
    );
    let logs: Vec<String> = LOGS.lock().unwrap()[logs_before..].to_vec();
    for line in &logs {
        secrets.check(&format!("{what}: a log line"), line);
    }
    for e in &errors {
        for text in error_texts(e) {
            secrets.check(&format!("{what}: a store error"), &text);
        }
    }
}

/// Replaces the session's record with one the layer cannot read, holding secrets in every
/// part a decoder might quote.
async fn corrupt_payloads<S: SessionStore + Clone>(what: &str, store: S) {
    for payload in [
        r#"{"d":{"secret":"VALUE"},"f":"VALUE"}"#,
        r#"{"d":"VALUE"}"#,
        r#"{"d":{"secret":"VALUE""#,
        "VALUE",
        r#"{"d":{"secret":"VALUE"},"c":"VALUE"}"#,
        r#"{"d":{"secret":"VALUE"},"x":{"i":"VALUE"}}"#,
        "{\"d\":{\"VALUE\":\"\u{1}\"}}",
        r#"{"d":{},"o":["VALUE"]}"#,
        r#"{"d":{},"o":"x","l":{"VALUE":1}}"#,
    ] {
        let target = store.clone();
        no_secret_leaks(
            what,
            store.clone(),
            move |key| {
                Box::pin(async move {
                    let store = target;
                    let value = secret_value();
                    let bytes = Bytes::from(payload.replace("VALUE", &value));
                    store.delete(&key).await.unwrap();
                    let expires = SystemTime::now() + Duration::from_secs(60);
                    let record = Record::new(key, bytes, 1, expires);
                    store.create(&record).await.unwrap();
                    LEAKED_VALUES.lock().unwrap().push(value);
                    Vec::new()
                })
            },
            nothing,
        )
        .await;
    }
    // The values planted in the corrupt records were printed nowhere either; the records were
    // reported (to `log`, with or without the `tracing` feature).
    let planted: Vec<String> = LEAKED_VALUES.lock().unwrap().clone();
    let logs = LOGS.lock().unwrap().clone();
    assert!(
        logs.iter()
            .any(|l| l.contains("ignoring unreadable session record")),
        "{what}: the corrupt records were not logged"
    );
    for value in planted {
        for line in &logs {
            assert!(
                !line.contains(&value),
                "{what}: a corrupt record's value was logged: {line}"
            );
        }
    }
}

/// The values planted in corrupt records by [`corrupt_payloads`].
static LEAKED_VALUES: Mutex<Vec<String>> = Mutex::new(Vec::new());

mod memory {
    use super::*;

    #[tokio::test]
    async fn corrupt_records() {
        corrupt_payloads("memory", MemoryStore::default()).await;
    }

    #[tokio::test]
    async fn a_full_store() {
        // Room for a session, not for one of 100 KB.
        let store = MemoryStore::builder()
            .shards(1)
            .max_bytes(64 * 1024)
            .build();
        let target = store.clone();
        no_secret_leaks(
            "memory, full",
            store,
            move |key| {
                Box::pin(async move {
                    let store = target;
                    let big =
                        Bytes::from(format!(r#"{{"d":{{"secret":"{}"}}}}"#, "x".repeat(100_000)));
                    let expires = SystemTime::now() + Duration::from_secs(60);
                    let err = store
                        .save(&Record::new(key, big, 2, expires), 1)
                        .await
                        .unwrap_err();
                    assert!(err.is_unavailable(), "{err:?}");
                    vec![err]
                })
            },
            nothing,
        )
        .await;
    }
}

#[cfg(feature = "sqlite")]
mod sqlite {
    use hyper_sessions::SqliteStore;

    use super::*;

    struct Db {
        dir: std::path::PathBuf,
    }

    impl Db {
        fn new() -> Db {
            static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
            let n = N.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let dir =
                std::env::temp_dir().join(format!("hs-log-safety-{}-{n}", std::process::id()));
            std::fs::create_dir_all(&dir).unwrap();
            Db { dir }
        }

        fn path(&self) -> std::path::PathBuf {
            self.dir.join("sessions.db")
        }
    }

    impl Drop for Db {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }

    async fn store(db: &Db) -> SqliteStore {
        SqliteStore::builder(db.path())
            .busy_timeout(Duration::from_millis(200))
            .open()
            .await
            .unwrap()
    }

    #[tokio::test]
    async fn corrupt_records() {
        let db = Db::new();
        corrupt_payloads("sqlite", store(&db).await).await;
    }

    #[tokio::test]
    async fn a_row_of_the_wrong_types() {
        let db = Db::new();
        let path = db.path();
        no_secret_leaks(
            "sqlite, wrong types",
            store(&db).await,
            move |key| {
                Box::pin(async move {
                    let c = rusqlite::Connection::open(&path).unwrap();
                    let value = secret_value();
                    LEAKED_VALUES.lock().unwrap().push(value.clone());
                    c.execute(
                        "UPDATE sessions SET version = ?2, expires_at = ?2 WHERE id = ?1",
                        rusqlite::params![&key.to_bytes()[..], value],
                    )
                    .unwrap();
                    Vec::new()
                })
            },
            nothing,
        )
        .await;
    }

    /// An owner's rows with a version that is not one and an owner that is not UTF-8 (the
    /// owner's bytes behind a stray 0xff).
    #[tokio::test]
    async fn an_owners_unreadable_rows() {
        let db = Db::new();
        let path = db.path();
        owners_never_show("sqlite, owners", store(&db).await, move |owner, a, b| {
            Box::pin(async move {
                let c = rusqlite::Connection::open(&path).unwrap();
                c.execute(
                    "UPDATE sessions SET version = 'abc' WHERE id = ?1",
                    [&a.to_bytes()[..]],
                )
                .unwrap();
                c.execute(
                    "UPDATE sessions SET owner = CAST(x'ff' AS TEXT) || ?2 WHERE id = ?1",
                    rusqlite::params![&b.to_bytes()[..], owner],
                )
                .unwrap();
                Vec::new()
            })
        })
        .await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_locked_database() {
        let db = Db::new();
        let path = db.path();
        let locker = std::sync::Arc::new(Mutex::new(None::<rusqlite::Connection>));
        let (hold, release) = (locker.clone(), locker);
        no_secret_leaks(
            "sqlite, locked",
            store(&db).await,
            move |_| {
                Box::pin(async move {
                    let c = rusqlite::Connection::open(&path).unwrap();
                    c.execute_batch("BEGIN EXCLUSIVE").unwrap();
                    *hold.lock().unwrap() = Some(c);
                    Vec::new()
                })
            },
            move |_| {
                Box::pin(async move {
                    drop(release.lock().unwrap().take());
                    Vec::new()
                })
            },
        )
        .await;
    }
}

#[cfg(feature = "redis")]
mod redis {
    use common::servers::RedisServer;
    use hyper_sessions::RedisStore;

    use super::*;

    async fn store(server: &RedisServer) -> RedisStore {
        RedisStore::builder()
            .command_timeout(Duration::from_millis(300))
            .open(server.url())
            .await
            .unwrap()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn corrupt_records() {
        let server = RedisServer::start().await;
        corrupt_payloads("redis", store(&server).await).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn foreign_values_and_types() {
        let server = RedisServer::start().await;
        let store = store(&server).await;
        for kind in ["string", "hash", "list"] {
            let (port, target) = (server.port(), store.clone());
            no_secret_leaks(
                &format!("redis, a foreign {kind}"),
                store.clone(),
                move |key| {
                    Box::pin(async move {
                        let name = target.key(&key);
                        let value = secret_value();
                        LEAKED_VALUES.lock().unwrap().push(value.clone());
                        let cli = |args: Vec<String>| async move {
                            let args: Vec<&str> = args.iter().map(String::as_str).collect();
                            common::servers::redis_cli(port, &args).await
                        };
                        cli(vec!["del".into(), name.clone()]).await;
                        match kind {
                            "string" => cli(vec!["set".into(), name.clone(), value]).await,
                            "hash" => {
                                cli(vec!["hset".into(), name.clone(), value.clone(), value]).await
                            }
                            _ => cli(vec!["rpush".into(), name.clone(), value]).await,
                        };
                        cli(vec!["pexpire".into(), name, "60000".into()]).await;
                        Vec::new()
                    })
                },
                nothing,
            )
            .await;
        }
    }

    /// The owner index's errors (a key of another type where an index belongs, an owner too
    /// long to store, a server that is down) never name the owner, nor log it.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn owner_errors() {
        capture_logs();
        let mut server = RedisServer::start().await;
        let store = store(&server).await;
        let owner = secret_value();
        let mut secrets = Secrets::default();
        secrets.value(&owner);
        let logs_before = LOGS.lock().unwrap().len();
        let expires = SystemTime::now() + Duration::from_secs(60);
        let with_owner = |owner: &str| {
            Record::new(Key::of(Id::random()), Bytes::from_static(b"{}"), 1, expires)
                .with_owner(Some(owner.into()))
        };
        let mut errors = Vec::new();
        // Every key of the database made a hash: the owner's index among them.
        store.create(&with_owner(&owner)).await.unwrap();
        let keys = common::servers::redis_cli(server.port(), &["keys", "*owner:*"]).await;
        for index in keys.lines().filter(|l| !l.is_empty()) {
            common::servers::redis_cli(server.port(), &["del", index]).await;
            common::servers::redis_cli(server.port(), &["hset", index, &owner, &owner]).await;
        }
        errors.extend(store.owned(&owner).await.err());
        errors.extend(store.create(&with_owner(&owner)).await.err());
        let long = format!("{owner}{}", "x".repeat(300));
        secrets.value(&long);
        errors.extend(store.create(&with_owner(&long)).await.err());
        server.kill();
        errors.extend(store.owned(&owner).await.err());
        errors.extend(store.create(&with_owner(&owner)).await.err());
        assert_eq!(errors.len(), 5, "each case an error: {errors:?}");
        for line in &LOGS.lock().unwrap()[logs_before..] {
            secrets.check("redis owners: a log line", line);
        }
        for e in &errors {
            for text in error_texts(e) {
                secrets.check("redis owners: a store error", &text);
            }
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_server_that_is_down() {
        let server = RedisServer::start().await;
        let store = store(&server).await;
        let server = std::sync::Arc::new(Mutex::new(server));
        no_secret_leaks(
            "redis, down",
            store,
            move |_| {
                Box::pin(async move {
                    server.lock().unwrap().kill();
                    Vec::new()
                })
            },
            nothing,
        )
        .await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_server_that_is_slow() {
        let server = RedisServer::start().await;
        let port = server.port();
        no_secret_leaks(
            "redis, slow",
            store(&server).await,
            move |_| {
                Box::pin(async move {
                    tokio::spawn(async move {
                        common::servers::redis_cli(port, &["debug", "sleep", "2"]).await
                    });
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    Vec::new()
                })
            },
            |_| {
                Box::pin(async {
                    tokio::time::sleep(Duration::from_secs(2)).await;
                    Vec::new()
                })
            },
        )
        .await;
    }
}

#[cfg(feature = "webdis")]
mod webdis {
    use common::servers::{RedisServer, WebdisServer};
    use hyper_sessions::WebdisStore;

    use super::*;

    async fn store(webdis: &WebdisServer) -> WebdisStore {
        WebdisStore::builder()
            .request_timeout(Duration::from_millis(500))
            .open(&webdis.url())
            .await
            .unwrap()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn corrupt_records() {
        let redis = RedisServer::start().await;
        let webdis = WebdisServer::start(&redis).await;
        corrupt_payloads("webdis", store(&webdis).await).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_foreign_value() {
        let redis = RedisServer::start().await;
        let webdis = WebdisServer::start(&redis).await;
        let port = redis.port();
        let store = store(&webdis).await;
        let target = store.clone();
        no_secret_leaks(
            "webdis, a foreign value",
            store,
            move |key| {
                Box::pin(async move {
                    let name = target.key(&key);
                    let value = secret_value();
                    LEAKED_VALUES.lock().unwrap().push(value.clone());
                    common::servers::redis_cli(port, &["set", &name, &value, "px", "60000"]).await;
                    Vec::new()
                })
            },
            nothing,
        )
        .await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn webdis_down() {
        let redis = RedisServer::start().await;
        let webdis = WebdisServer::start(&redis).await;
        let store = store(&webdis).await;
        let webdis = std::sync::Arc::new(Mutex::new(webdis));
        no_secret_leaks(
            "webdis, Webdis down",
            store,
            move |_| {
                Box::pin(async move {
                    webdis.lock().unwrap().kill();
                    Vec::new()
                })
            },
            nothing,
        )
        .await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn redis_down_behind_webdis() {
        let redis = RedisServer::start().await;
        let webdis = WebdisServer::start(&redis).await;
        let redis = std::sync::Arc::new(Mutex::new(redis));
        no_secret_leaks(
            "webdis, Redis down behind Webdis",
            store(&webdis).await,
            move |_| {
                Box::pin(async move {
                    redis.lock().unwrap().kill();
                    Vec::new()
                })
            },
            nothing,
        )
        .await;
    }
}

#[cfg(feature = "postgres")]
mod postgres {
    use std::sync::Arc;

    use common::servers::PostgresServer;
    use hyper_sessions::PostgresStore;
    use hyper_sessions::deadpool_postgres::tokio_postgres::types::{
        IsNull, ToSql, Type, to_sql_checked,
    };

    use super::*;

    /// A parameter of the test's own SQL that tokio-postgres's debug log shows as `<hidden>`
    /// (it logs every parameter): the secrets it carries are the test's doing, not the store's.
    struct Hidden<T>(T);

    impl<T> std::fmt::Debug for Hidden<T> {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("<hidden>")
        }
    }

    impl<T: ToSql> ToSql for Hidden<T> {
        fn to_sql(
            &self,
            ty: &Type,
            out: &mut bytes::BytesMut,
        ) -> Result<IsNull, Box<dyn std::error::Error + Sync + Send>> {
            self.0.to_sql(ty, out)
        }

        fn accepts(ty: &Type) -> bool {
            T::accepts(ty)
        }

        to_sql_checked!();
    }

    /// A store on a fresh table of `server`.
    async fn store(server: &PostgresServer) -> (PostgresStore, String) {
        static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let table = format!(
            "log_safety_{}",
            NEXT.fetch_add(1, std::sync::atomic::Ordering::SeqCst)
        );
        let store = PostgresStore::builder()
            .table(&table)
            .statement_timeout(Duration::from_millis(300))
            .cleanup_interval(None)
            .open(&server.url())
            .await
            .unwrap();
        (store, table)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn corrupt_records() {
        let server = PostgresServer::shared().await;
        corrupt_payloads("postgres", store(&server).await.0).await;
    }

    /// A column whose type was changed by hand, holding a secret where a version should be.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_row_of_the_wrong_types() {
        let server = PostgresServer::shared().await;
        let (store, table) = store(&server).await;
        let target = Arc::clone(&server);
        no_secret_leaks(
            "postgres, wrong types",
            store,
            move |key| {
                Box::pin(async move {
                    let c = target.client("postgres").await;
                    let value = secret_value();
                    LEAKED_VALUES.lock().unwrap().push(value.clone());
                    c.batch_execute(&format!(
                        "ALTER TABLE {table} ALTER COLUMN version TYPE text"
                    ))
                    .await
                    .unwrap();
                    c.execute(
                        &format!("UPDATE {table} SET version = $2 WHERE key = $1"),
                        &[&Hidden(&key.to_bytes()[..]), &Hidden(value)],
                    )
                    .await
                    .unwrap();
                    Vec::new()
                })
            },
            nothing,
        )
        .await;
    }

    /// The owner column's type changed by hand under the store (its statements prepared for
    /// `text`): loads, the listing and owned writes fail, showing no owner.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_owner_column_of_another_type() {
        let server = PostgresServer::shared().await;
        let (store, table) = store(&server).await;
        let target = Arc::clone(&server);
        owners_never_show("postgres, owners", store, move |_, _, _| {
            Box::pin(async move {
                let c = target.client("postgres").await;
                c.batch_execute(&format!(
                    "ALTER TABLE {table} ALTER COLUMN owner TYPE bytea \
                     USING convert_to(owner, 'UTF8')"
                ))
                .await
                .unwrap();
                Vec::new()
            })
        })
        .await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_server_that_is_down() {
        let server = PostgresServer::start().await;
        let (store, _) = store(&server).await;
        let server = Arc::new(Mutex::new(server));
        no_secret_leaks(
            "postgres, down",
            store,
            move |_| {
                Box::pin(async move {
                    server.lock().unwrap().kill();
                    Vec::new()
                })
            },
            nothing,
        )
        .await;
    }

    /// The session's row locked by another transaction: writes wait for it until the statement
    /// timeout.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_locked_row() {
        let server = PostgresServer::shared().await;
        let (store, table) = store(&server).await;
        let lock = Arc::clone(&server);
        let (release_tx, release_rx) = tokio::sync::oneshot::channel::<()>();
        let release_tx = Mutex::new(Some(release_tx));
        no_secret_leaks(
            "postgres, locked",
            store,
            move |key| {
                Box::pin(async move {
                    let mut c = lock.client("postgres").await;
                    let (locked_tx, locked) = tokio::sync::oneshot::channel();
                    tokio::spawn(async move {
                        let tx = c.transaction().await.unwrap();
                        tx.execute(
                            &format!("SELECT 1 FROM {table} WHERE key = $1 FOR UPDATE"),
                            &[&Hidden(&key.to_bytes()[..])],
                        )
                        .await
                        .unwrap();
                        let _ = locked_tx.send(());
                        let _ = release_rx.await;
                        tx.rollback().await.unwrap();
                    });
                    locked.await.unwrap();
                    Vec::new()
                })
            },
            move |_| {
                Box::pin(async move {
                    if let Some(tx) = release_tx.lock().unwrap().take() {
                        let _ = tx.send(());
                    }
                    Vec::new()
                })
            },
        )
        .await;
    }
}

/// Signed cookies: a forged or stale cookie is logged as ignored without its id or its MAC,
/// and a short signing key's build error names neither the key nor its bytes.
mod signed {
    use super::*;

    #[tokio::test]
    async fn forged_cookies_and_short_keys() {
        capture_logs();
        let current = [0x4b_u8; 32];
        let dropped = [0x7c_u8; 32];
        let layer = |key: [u8; 32]| {
            SessionLayer::builder(MemoryStore::default())
                .signing_keys([key])
                .build()
                .unwrap()
        };
        // A real signed value, made by a layer whose key is then dropped.
        let old = serve_service(layer(dropped).wrap(hyper::service::service_fn(app))).await;
        let mut browser = Browser::new(old.addr).await;
        assert_eq!(browser.get("/put?v=x").await.status, StatusCode::OK);
        let pair = browser.cookie.clone().expect("a signed cookie");
        let value = pair.strip_prefix("id=").unwrap().to_owned();
        let (id, mac) = value.split_once('.').unwrap();
        let mut secrets = Secrets::default();
        secrets.id(id.parse().unwrap());
        secrets.words.push(mac.to_owned());
        secrets.words.push(mac[..12].to_owned());

        let server = serve_service(layer(current).wrap(hyper::service::service_fn(app))).await;
        let logs_before = LOGS.lock().unwrap().len();
        for cookie in [
            pair.clone(),
            format!("id={id}"),
            format!("id={id}.{}", &mac[..20]),
        ] {
            let mut b = Browser::with_cookie(server.addr, &cookie).await;
            assert_eq!(b.get("/get").await.status, StatusCode::OK);
        }
        let logs: Vec<String> = LOGS.lock().unwrap()[logs_before..].to_vec();
        assert!(
            logs.iter().any(|l| l.contains("forged")),
            "the ignored cookies were not logged: {logs:?}"
        );
        for line in &logs {
            secrets.check("a forged-cookie log line", line);
        }

        let short = b"0123456789abcdef-short-key".to_vec();
        let err = SessionLayer::builder(MemoryStore::default())
            .signing_keys([current.to_vec(), short.clone()])
            .build()
            .unwrap_err();
        let key_secrets = Secrets {
            words: vec![
                "0123456789abcdef-short-key".to_owned(),
                "short-key".to_owned(),
                byte_list(&short[..6]),
                byte_list(&current[..6]),
                "4b4b4b".to_owned(),
            ],
        };
        for text in error_texts(&err) {
            key_secrets.check("a short signing key's error", &text);
        }
    }
}
