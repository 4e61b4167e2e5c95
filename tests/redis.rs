//! The Redis store against real `redis-server` processes started here: the conformance suite on
//! a single node and on a 3-master cluster, the commands Redis receives per request kind, and a
//! crash and restart of Redis under load.

mod common;

use std::time::{Duration, Instant};

use common::servers::{Monitor, RedisServer, client_commands};
use common::{Browser, Conn, serve};
use hyper::StatusCode;
use hyper_sessions::{Id, Record, RedisStore, Refresh, SessionLayer, SessionStore};

/// A fresh server per test (they start in a few milliseconds).
async fn single_node() -> (RedisStore, RedisServer) {
    let server = RedisServer::start().await;
    let store = RedisStore::open(server.url()).await.unwrap();
    (store, server)
}

mod single {
    use super::single_node as fixture;
    crate::conformance_suite!(fixture);
}

mod cluster {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use crate::common::servers::RedisCluster;
    use hyper_sessions::RedisStore;

    /// One cluster shared by the tests running at the same time, a key prefix per test.
    async fn fixture() -> (RedisStore, Arc<RedisCluster>) {
        static N: AtomicUsize = AtomicUsize::new(0);
        let cluster = RedisCluster::shared().await;
        let prefix = format!("t{}:session:", N.fetch_add(1, Ordering::SeqCst));
        let store = RedisStore::builder()
            .key_prefix(prefix)
            .open_cluster(cluster.urls())
            .await
            .unwrap();
        (store, cluster)
    }

    crate::conformance_suite!(fixture);
}

/// Makes one request and checks the commands Redis received from clients meanwhile.
async fn expect(b: &mut Browser, monitor: &mut Monitor, path: &str, want: &[&str], what: &str) {
    let r = b.get(path).await;
    assert_eq!(r.status, StatusCode::OK, "{what}: {r:?}");
    let seen = monitor.take().await;
    let sent = client_commands(&seen);
    assert_eq!(sent, want, "{what}: Redis received {seen:#?}");
    let scripted: Vec<&str> = seen
        .iter()
        .filter(|s| s.source == "lua")
        .map(|s| s.command.as_str())
        .collect();
    println!("{what:<36} {path:<11} sent {sent:?}, in scripts {scripted:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commands_per_request_kind() {
    let (store, server) = single_node().await;
    let layer = SessionLayer::new(store);
    let app = serve(&layer).await;
    let mut b = Browser::new(app.addr).await;
    // Warm up: the scripts get into the server's cache.
    b.get("/counter").await;
    b.get("/destroy").await;
    let mut monitor = Monitor::start(&server).await;

    expect(
        &mut b,
        &mut monitor,
        "/login",
        &["SET"],
        "new session: SET NX",
    )
    .await;
    expect(
        &mut b,
        &mut monitor,
        "/untouched",
        &[],
        "untouched: nothing",
    )
    .await;
    expect(
        &mut b,
        &mut monitor,
        "/read",
        &["EVALSHA"],
        "read: one load script",
    )
    .await;
    expect(
        &mut b,
        &mut monitor,
        "/counter",
        &["EVALSHA", "EVALSHA"],
        "write: load + compare-and-set",
    )
    .await;
    expect(
        &mut b,
        &mut monitor,
        "/incr/n",
        &["EVALSHA", "EVALSHA"],
        "update: load + compare-and-set",
    )
    .await;
    expect(
        &mut b,
        &mut monitor,
        "/read",
        &["EVALSHA"],
        "read again: one load script",
    )
    .await;
    expect(
        &mut b,
        &mut monitor,
        "/cycle",
        &["EVALSHA", "SET", "DEL"],
        "cycle id: load + create + delete",
    )
    .await;
    expect(&mut b, &mut monitor, "/destroy", &["DEL"], "destroy: DEL").await;
    expect(
        &mut b,
        &mut monitor,
        "/read",
        &[],
        "no session any more: nothing",
    )
    .await;

    // The script cache emptied (as after a restart): one SCRIPT LOAD, then as before.
    b.get("/counter").await;
    monitor.take().await;
    server.cli(&["script", "flush"]).await;
    monitor.take().await;
    expect(
        &mut b,
        &mut monitor,
        "/read",
        &["EVALSHA", "SCRIPT", "EVALSHA"],
        "read, empty script cache: reload",
    )
    .await;
    expect(
        &mut b,
        &mut monitor,
        "/read",
        &["EVALSHA"],
        "read, cache warm again",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_with_a_due_refresh_is_one_command() {
    let (store, server) = single_node().await;
    let layer = SessionLayer::builder(store.clone())
        .expiry(hyper_sessions::Expiry::OnInactivity(Duration::from_secs(
            10,
        )))
        .build()
        .unwrap();
    let app = serve(&layer).await;
    let mut b = Browser::new(app.addr).await;
    b.get("/counter").await;
    let key = store.key(&b.id().unwrap());
    let before: u64 = server
        .cli(&["pexpiretime", &key])
        .await
        .trim()
        .parse()
        .unwrap();
    // A refresh is due once a tenth of the window has passed.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let mut monitor = Monitor::start(&server).await;
    let r = b.get("/read").await;
    assert_eq!(r.body, "1");
    let seen = monitor.take().await;
    assert_eq!(client_commands(&seen), ["EVALSHA"], "{seen:#?}");
    assert!(
        seen.iter()
            .any(|s| s.source == "lua" && s.command == "PEXPIREAT"),
        "the load script did not refresh the expiry: {seen:#?}"
    );
    let after: u64 = server
        .cli(&["pexpiretime", &key])
        .await
        .trim()
        .parse()
        .unwrap();
    assert!(after >= before + 1000, "expiry {before} -> {after}");
    let rec = store.load(&b.id().unwrap()).await.unwrap().unwrap();
    assert_eq!(
        rec.expires_at_unix_ms(),
        after,
        "load reports the key's real expiry"
    );
    assert_eq!(rec.version(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_server_keeps_the_expiry_and_the_value_layout() {
    let (store, server) = single_node().await;
    let app = serve(&SessionLayer::new(store.clone())).await;
    let mut b = Browser::new(app.addr).await;
    b.get("/counter").await;
    let id = b.id().unwrap();
    let key = format!("session:{id}");
    assert_eq!(store.key(&id), key);
    let ttl: u64 = server.cli(&["pttl", &key]).await.trim().parse().unwrap();
    assert!(
        (86_390_000..=86_400_000).contains(&ttl),
        "TTL {ttl} ms, expected a day"
    );
    let value = server.cli(&["get", &key]).await;
    assert!(
        value.starts_with("1:") && value.contains(r#":{"d":{"count":1}}"#),
        "stored value {value:?}"
    );
    assert_eq!(server.cli(&["dbsize"]).await.trim(), "1");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn foreign_values_are_corrupt_not_sessions() {
    let (store, server) = single_node().await;
    let id = Id::random();
    let key = store.key(&id);
    server
        .cli(&["set", &key, r#"{"d":{"admin":true}}"#, "px", "60000"])
        .await;
    let err = store.load(&id).await.unwrap_err();
    assert!(err.is_corrupt(), "{err:?}");
    let other = Id::random();
    server.cli(&["hset", &store.key(&other), "d", "x"]).await;
    let err = store.load(&other).await.unwrap_err();
    assert!(err.is_corrupt(), "{err:?}");
    // The layer starts a fresh session and leaves the value alone.
    let app = serve(&SessionLayer::new(store.clone())).await;
    let mut c = Conn::http1(app.addr).await;
    let r = c.get("/counter", Some(&format!("id={id}"))).await;
    assert_eq!(r.body, "1");
    assert_ne!(r.cookie_pair().unwrap(), format!("id={id}"));
    assert!(server.cli(&["get", &key]).await.contains("admin"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_deleted_behind_the_layers_back_is_never_silently_rewritten() {
    let (store, server) = single_node().await;
    let app = serve(&SessionLayer::new(store.clone())).await;
    let mut b = Browser::new(app.addr).await;
    b.get("/counter").await;
    let cookie = b.cookie.clone().unwrap();
    let key = store.key(&b.id().unwrap());
    let addr = app.addr;
    let slow = tokio::spawn(async move {
        Conn::http1(addr)
            .await
            .get("/sleep/300/set/late", Some(&cookie))
            .await
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    // Deleted (or expired) between the load and the save.
    assert_eq!(server.cli(&["del", &key]).await.trim(), "1");
    let r = slow.await.unwrap();
    assert_eq!(r.status, StatusCode::INTERNAL_SERVER_ERROR, "{r:?}");
    assert_eq!(
        server.cli(&["exists", &key]).await.trim(),
        "0",
        "save re-created the key"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_app_servers_share_sessions() {
    let server = RedisServer::start().await;
    let one = serve(&SessionLayer::new(
        RedisStore::open(server.url()).await.unwrap(),
    ))
    .await;
    let two = serve(&SessionLayer::new(
        RedisStore::open(server.url()).await.unwrap(),
    ))
    .await;
    let mut a = Browser::new(one.addr).await;
    a.get("/counter").await;
    let cookie = a.cookie.clone().unwrap();
    let mut c = Conn::http1(two.addr).await;
    assert_eq!(c.get("/counter", Some(&cookie)).await.body, "2");
    assert_eq!(a.get("/read").await.body, "2");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_problems_are_clear_errors() {
    // Nothing listens on this port.
    let port = common::servers::free_port();
    let started = Instant::now();
    let err = RedisStore::open(format!("redis://127.0.0.1:{port}"))
        .await
        .unwrap_err();
    assert!(err.is_unavailable(), "{err:?}");
    assert!(started.elapsed() < Duration::from_secs(3));
    let err = RedisStore::open("http://example.com/").await.unwrap_err();
    assert!(!err.is_unavailable(), "{err:?}");
    // TLS is not compiled into this build's redis crate: said so, no panic.
    let err = RedisStore::open(format!("rediss://127.0.0.1:{port}"))
        .await
        .unwrap_err();
    let chain = format!("{err:?}");
    assert!(chain.to_lowercase().contains("tls"), "{chain}");
    // Wrong password.
    let server = RedisServer::start_with(&["--requirepass", "sesame"]).await;
    let err = RedisStore::open(format!("redis://:wrong@127.0.0.1:{}", server.port()))
        .await
        .unwrap_err();
    assert!(
        !err.is_unavailable(),
        "a wrong password is no outage: {err:?}"
    );
    assert!(
        format!("{err:?}").contains("authentication failed"),
        "{err:?}"
    );
    let store = RedisStore::open(format!("redis://:sesame@127.0.0.1:{}/3", server.port()))
        .await
        .unwrap();
    let app = serve(&SessionLayer::new(store)).await;
    Browser::new(app.addr).await.get("/counter").await;
    assert_eq!(
        server
            .cli(&["-a", "sesame", "-n", "3", "dbsize"])
            .await
            .trim(),
        "1"
    );
}

/// Kills Redis while requests are in flight, then restarts it on the same port: requests that
/// need the store get 503 meanwhile (never a 200 for a write that was not stored), requests
/// that do not touch the session go on, and the same application serves again afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_crash_and_restart() {
    // Persistence on, so what was acknowledged can be checked after the restart.
    let mut server =
        RedisServer::start_with(&["--appendonly", "yes", "--appendfsync", "always"]).await;
    let store = RedisStore::builder()
        .command_timeout(Duration::from_secs(1))
        .open(server.url())
        .await
        .unwrap();
    common::faults::crash_and_restart(&SessionLayer::new(store), &mut server).await;
}

fn now_ms() -> u64 {
    hyper_sessions::unix_ms(std::time::SystemTime::now())
}

/// The commands the store sent (the `INFO` of [`dirty`] left out).
fn store_commands(seen: &[common::servers::Seen]) -> Vec<String> {
    let mut sent = client_commands(seen);
    sent.retain(|c| c != "INFO");
    sent
}

/// The number of writes since the server started (with saving off, as here).
async fn dirty(server: &RedisServer) -> u64 {
    let info = server.cli(&["info", "persistence"]).await;
    info.lines()
        .find_map(|l| l.strip_prefix("rdb_changes_since_last_save:"))
        .expect("INFO persistence lists the changes since the last save")
        .trim()
        .parse()
        .unwrap()
}

/// A refresh whose `if_before` is not below its new expiry is due exactly when the key expires
/// before that expiry, which `PEXPIREAT … GT` decides alone: such a load (and a plain load) is
/// a pipeline of plain commands, no script. The expiry only ever moves up, is written only when
/// it moves, and a missing key is never revived.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refresh_up_to_its_own_expiry_is_plain_commands() {
    let (store, server) = single_node().await;
    let id = Id::random();
    let key = store.key(&id);
    let created = now_ms() + 10_000;
    let data = bytes::Bytes::from_static(br#"{"d":{"n":1}}"#);
    store
        .create(&Record::from_unix_ms(id, data.clone(), 3, created))
        .await
        .unwrap();
    let mut monitor = Monitor::start(&server).await;

    // Plain load: GET + PEXPIRETIME; nothing written.
    let before = dirty(&server).await;
    let rec = store.load(&id).await.unwrap().unwrap();
    assert_eq!(
        store_commands(&monitor.take().await),
        ["GET", "PEXPIRETIME"]
    );
    assert_eq!(rec.expires_at_unix_ms(), created);
    assert_eq!((rec.version(), rec.data()), (3, &data));

    // Due (the key expires before the new expiry): moved, reported, stored.
    let to = created + 60_000;
    let rec = store
        .load_refreshing(&id, Refresh::from_unix_ms(to, to))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        store_commands(&monitor.take().await),
        ["PEXPIREAT", "GET", "PEXPIRETIME"]
    );
    assert_eq!(rec.expires_at_unix_ms(), to);
    assert_eq!((rec.version(), rec.data()), (3, &data));
    assert_eq!(
        server.cli(&["pexpiretime", &key]).await.trim(),
        to.to_string()
    );
    assert_eq!(dirty(&server).await, before + 1, "one write: the expiry");

    // Not due (an earlier expiry, or the same one again): never moved down, nothing written.
    for earlier in [to - 30_000, to] {
        let rec = store
            .load_refreshing(&id, Refresh::from_unix_ms(earlier, earlier + 5_000))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(rec.expires_at_unix_ms(), to);
    }
    assert_eq!(
        server.cli(&["pexpiretime", &key]).await.trim(),
        to.to_string()
    );
    assert_eq!(dirty(&server).await, before + 1, "a no-op refresh wrote");
    monitor.take().await;

    // A refresh that is never due (`if_before` 0): a plain load.
    let rec = store
        .load_refreshing(&id, Refresh::from_unix_ms(to + 1_000, 0))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(rec.expires_at_unix_ms(), to);
    assert_eq!(
        store_commands(&monitor.take().await),
        ["GET", "PEXPIRETIME"]
    );

    // Past the latest expiry Redis accepts: clamped, as every write of this store is.
    let max = 253_402_300_799_999;
    let rec = store
        .load_refreshing(&id, Refresh::from_unix_ms(u64::MAX - 1, u64::MAX))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(rec.expires_at_unix_ms(), max);
    assert_eq!(
        server.cli(&["pexpiretime", &key]).await.trim(),
        max.to_string()
    );

    // The same through the load script (`if_before` below the new expiry).
    let id2 = Id::random();
    store
        .create(&Record::from_unix_ms(id2, data.clone(), 1, created))
        .await
        .unwrap();
    let rec = store
        .load_refreshing(&id2, Refresh::from_unix_ms(u64::MAX - 1, u64::MAX - 2))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(rec.expires_at_unix_ms(), max);
    assert_eq!((rec.version(), rec.data()), (1, &data));
    assert_eq!(
        store
            .load(&id2)
            .await
            .unwrap()
            .unwrap()
            .expires_at_unix_ms(),
        max
    );
}

/// Missing keys, keys without an expiry and keys of another type, through the pipelines and
/// through the load script: never revived, never given an expiry, corrupt where not missing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refresh_of_missing_and_foreign_keys() {
    let (store, server) = single_node().await;
    let to = now_ms() + 60_000;
    let refresh = Refresh::from_unix_ms(to, to);
    // A missing key stays missing.
    let gone = Id::random();
    for r in [refresh, Refresh::from_unix_ms(to, to - 1_000)] {
        assert!(store.load_refreshing(&gone, r).await.unwrap().is_none());
        assert_eq!(server.cli(&["exists", &store.key(&gone)]).await.trim(), "0");
    }

    // A key without an expiry (never written by this store) is corrupt, and keeps no expiry.
    let bare = Id::random();
    let bare_key = store.key(&bare);
    server
        .cli(&["set", &bare_key, r#"1:0000000000000001:{"d":{}}"#])
        .await;
    let err = store.load_refreshing(&bare, refresh).await.unwrap_err();
    assert!(err.is_corrupt(), "{err:?}");
    assert_eq!(server.cli(&["pttl", &bare_key]).await.trim(), "-1");
    let err = store.load(&bare).await.unwrap_err();
    assert!(err.is_corrupt(), "{err:?}");
    let scripted = Refresh::from_unix_ms(to, to - 1_000);
    let err = store.load_refreshing(&bare, scripted).await.unwrap_err();
    assert!(err.is_corrupt(), "{err:?}");
    assert_eq!(server.cli(&["pttl", &bare_key]).await.trim(), "-1");

    // A key of another type is corrupt too.
    let hash = Id::random();
    server.cli(&["hset", &store.key(&hash), "d", "x"]).await;
    let err = store.load_refreshing(&hash, refresh).await.unwrap_err();
    assert!(err.is_corrupt(), "{err:?}");
}

/// The same pipelines on a cluster: every command of one load goes to the key's node.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refresh_up_to_its_own_expiry_on_a_cluster() {
    let cluster = common::servers::RedisCluster::shared().await;
    let store = RedisStore::builder()
        .key_prefix("gt:session:")
        .open_cluster(cluster.urls())
        .await
        .unwrap();
    for _ in 0..20 {
        let id = Id::random();
        let created = now_ms() + 10_000;
        store
            .create(&Record::from_unix_ms(
                id,
                bytes::Bytes::from_static(b"{}"),
                1,
                created,
            ))
            .await
            .unwrap();
        assert_eq!(
            store.load(&id).await.unwrap().unwrap().expires_at_unix_ms(),
            created
        );
        let to = created + 60_000;
        let refresh = Refresh::from_unix_ms(to, to);
        let rec = store.load_refreshing(&id, refresh).await.unwrap().unwrap();
        assert_eq!(rec.expires_at_unix_ms(), to);
        let lower = Refresh::from_unix_ms(to - 1_000, to);
        let rec = store.load_refreshing(&id, lower).await.unwrap().unwrap();
        assert_eq!(rec.expires_at_unix_ms(), to);
        let gone = Id::random();
        assert!(
            store
                .load_refreshing(&gone, refresh)
                .await
                .unwrap()
                .is_none()
        );
    }
}

/// The command timeout alone bounds an operation: a command slower than the `redis` crate's
/// default response timeout (500 ms) but within the command timeout succeeds, and one slower
/// than the command timeout fails as unavailable, on time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_command_timeout_bounds_each_operation() {
    let server = RedisServer::start_with(&["--enable-debug-command", "yes"]).await;
    let id = Id::random();
    let data = bytes::Bytes::from_static(b"{}");
    let patient = RedisStore::builder()
        .command_timeout(Duration::from_secs(5))
        .open(server.url())
        .await
        .unwrap();
    let hasty = RedisStore::builder()
        .command_timeout(Duration::from_millis(300))
        .open(server.url())
        .await
        .unwrap();
    patient
        .create(&Record::from_unix_ms(id, data, 1, now_ms() + 60_000))
        .await
        .unwrap();
    for (store, sleep_ok) in [(&patient, true), (&hasty, false)] {
        let port = server.port();
        let sleeper = tokio::spawn(async move {
            common::servers::redis_cli(port, &["debug", "sleep", "1.2"]).await
        });
        // Let the sleep start first.
        tokio::time::sleep(Duration::from_millis(150)).await;
        let started = Instant::now();
        let loaded = store.load(&id).await;
        let took = started.elapsed();
        if sleep_ok {
            assert_eq!(loaded.unwrap().unwrap().version(), 1);
            assert!(took >= Duration::from_millis(700), "{took:?}");
        } else {
            let err = loaded.unwrap_err();
            assert!(err.is_unavailable(), "{err:?}");
            assert!(took < Duration::from_millis(800), "{took:?}");
        }
        sleeper.await.unwrap();
    }
}
