//! The Redis store against real `redis-server` processes started here: the conformance suite on
//! a single node and on a 3-master cluster, the commands Redis receives per request kind, and a
//! crash and restart of Redis under load.

mod common;

use std::time::{Duration, Instant};

use common::servers::{Monitor, RedisServer, client_commands};
use common::{Browser, Conn, serve};
use hyper::StatusCode;
use hyper_sessions::{Id, RedisStore, SessionLayer, SessionStore};

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
