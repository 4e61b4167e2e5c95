//! The Redis store against real `redis-server` processes started here: the conformance suite on
//! a single node and on a 3-master cluster, the commands Redis receives per request kind, the
//! conditional touch and remove scripts, writes whose reply is lost, and a crash and restart of
//! Redis under load.

mod common;
mod lost_reply;

use std::time::{Duration, Instant};

use common::servers::{
    Garble, GarblingProxy, Monitor, RedisServer, ReplyDroppingProxy, client_commands,
};
use common::{Browser, Conn, new_key, serve};
use common::{ExpiresMs, record_at_ms, unix_ms};
use hyper::StatusCode;
use hyper_sessions::store::{Key, SaveOutcome, SessionStore};
use hyper_sessions::{Id, RedisStore, SessionLayer};

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

/// With signing keys, a forged or stale cookie (unsigned, a bad MAC, a dropped key's) sends
/// Redis nothing: it is refused before any lookup. A rotated key's cookie costs its read only.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_signed_cookies_send_redis_nothing() {
    let (store, server) = single_node().await;
    let (old_key, new_key) = ([0x0a_u8; 32], [0x0b_u8; 32]);
    let old = SessionLayer::builder(store.clone())
        .signing_keys([old_key])
        .build()
        .unwrap();
    let old_app = serve(&old).await;
    let mut b = Browser::new(old_app.addr).await;
    b.get("/counter").await;
    let signed = b.cookie.clone().expect("a signed cookie");
    let (id, mac) = signed.strip_prefix("id=").unwrap().split_once('.').unwrap();
    let flipped: String = mac
        .chars()
        .enumerate()
        .map(|(i, c)| {
            if i == 3 {
                if c == 'A' { 'B' } else { 'A' }
            } else {
                c
            }
        })
        .collect();
    let rotated = SessionLayer::builder(store.clone())
        .signing_keys([new_key, old_key])
        .build()
        .unwrap();
    let dropped = SessionLayer::builder(store)
        .signing_keys([new_key])
        .build()
        .unwrap();
    let (rotated_app, dropped_app) = (serve(&rotated).await, serve(&dropped).await);
    let mut monitor = Monitor::start(&server).await;
    for (addr, cookie, want, what) in [
        (rotated_app.addr, format!("id={id}"), &[][..], "unsigned"),
        (
            rotated_app.addr,
            format!("id={id}.{flipped}"),
            &[],
            "a bad MAC",
        ),
        (dropped_app.addr, signed.clone(), &[], "a dropped key's"),
        (
            rotated_app.addr,
            signed.clone(),
            &["GET"],
            "an older key's: one read",
        ),
    ] {
        let r = Conn::http1(addr).await.get("/read", Some(&cookie)).await;
        assert_eq!(r.status, StatusCode::OK, "{what}: {r:?}");
        let seen = monitor.take().await;
        assert_eq!(
            client_commands(&seen),
            want,
            "{what}: Redis received {seen:#?}"
        );
    }
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
    expect(&mut b, &mut monitor, "/read", &["GET"], "read: one GET").await;
    expect(
        &mut b,
        &mut monitor,
        "/counter",
        &["GET", "EVALSHA"],
        "write: load + compare-and-set",
    )
    .await;
    expect(
        &mut b,
        &mut monitor,
        "/incr/n",
        &["GET", "EVALSHA"],
        "update: load + compare-and-set",
    )
    .await;
    expect(
        &mut b,
        &mut monitor,
        "/read",
        &["GET"],
        "read again: one GET",
    )
    .await;
    expect(
        &mut b,
        &mut monitor,
        "/cycle",
        &["GET", "SET", "EVALSHA"],
        "cycle id: load + create + conditional remove of the old id",
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

    // The script cache emptied (as after a restart): a read needs no script; a write's script
    // goes once more as EVAL (which caches it), then as before.
    b.get("/counter").await;
    monitor.take().await;
    server.cli(&["script", "flush"]).await;
    monitor.take().await;
    expect(
        &mut b,
        &mut monitor,
        "/read",
        &["GET"],
        "read, empty script cache",
    )
    .await;
    expect(
        &mut b,
        &mut monitor,
        "/counter",
        &["GET", "EVALSHA", "EVAL"],
        "write, empty script cache: EVAL",
    )
    .await;
    expect(
        &mut b,
        &mut monitor,
        "/counter",
        &["GET", "EVALSHA"],
        "write, cache warm again",
    )
    .await;
}

/// A read whose idle-expiry refresh is due: the load, then one conditional touch script that
/// moves the expiry, in the value and on the key (and nothing else).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_with_a_due_refresh_adds_one_touch() {
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
    let key = store.key(&b.key().unwrap());
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
    assert_eq!(client_commands(&seen), ["GET", "EVALSHA"], "{seen:#?}");
    let scripted: Vec<&str> = seen
        .iter()
        .filter(|s| s.source == "lua")
        .map(|s| s.command.as_str())
        .collect();
    assert_eq!(
        scripted,
        ["GETRANGE", "SETRANGE", "PEXPIREAT"],
        "the touch: {seen:#?}"
    );
    let after: u64 = server
        .cli(&["pexpiretime", &key])
        .await
        .trim()
        .parse()
        .unwrap();
    assert!(after >= before + 1000, "expiry {before} -> {after}");
    let rec = store.load(&b.key().unwrap()).await.unwrap().unwrap();
    assert_eq!(
        rec.expires_at_unix_ms(),
        after,
        "load reports the key's real expiry"
    );
    assert_eq!(rec.version(), 1);
    assert_eq!(
        value_expiry(&server, &key).await,
        after,
        "the value's expiry moved too"
    );
    // Right after, no refresh is due: the load alone.
    monitor.take().await;
    b.get("/read").await;
    assert_eq!(client_commands(&monitor.take().await), ["GET"]);
}

/// The expiry field of the value at `key` (Unix ms).
async fn value_expiry(server: &RedisServer, key: &str) -> u64 {
    let value = server.cli(&["get", key]).await;
    let fields: Vec<&str> = value.splitn(5, ':').collect();
    assert_eq!(fields[1].len(), 15, "expiry field of {value:?}");
    fields[1].parse().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_server_keeps_the_expiry_and_the_value_layout() {
    let (store, server) = single_node().await;
    let app = serve(&SessionLayer::new(store.clone())).await;
    let mut b = Browser::new(app.addr).await;
    b.get("/counter").await;
    let id = b.key().unwrap();
    let key = format!("session:{}", id.to_hex());
    assert_eq!(store.key(&id), key);
    let ttl: u64 = server.cli(&["pttl", &key]).await.trim().parse().unwrap();
    assert!(
        (86_390_000..=86_400_000).contains(&ttl),
        "TTL {ttl} ms, expected a day"
    );
    let value = server.cli(&["get", &key]).await;
    let value = value.trim_end_matches('\n');
    // `<version>:<expiry, 15 digits>:<token, 16 hex digits>:<length>:<payload>`
    let fields: Vec<&str> = value.splitn(5, ':').collect();
    assert_eq!(fields[0], "1", "stored value {value:?}");
    assert_eq!(fields[1].len(), 15, "stored value {value:?}");
    assert_eq!(
        value_expiry(&server, &key).await,
        server_expiry(&server, &key).await
    );
    assert!(
        fields[2].len() == 16 && fields[2].bytes().all(|b| b.is_ascii_hexdigit()),
        "stored value {value:?}"
    );
    assert_eq!(
        fields[3],
        fields[4].len().to_string(),
        "stored value {value:?}"
    );
    assert!(
        fields[4].starts_with(r#"{"d":{"count":1},"c":"#),
        "stored value {value:?}"
    );
    assert_eq!(server.cli(&["dbsize"]).await.trim(), "1");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn foreign_values_are_corrupt_not_sessions() {
    let (store, server) = single_node().await;
    let cookie_id = Id::random();
    let id = Key::of(cookie_id);
    let key = store.key(&id);
    server
        .cli(&["set", &key, r#"{"d":{"admin":true}}"#, "px", "60000"])
        .await;
    let err = store.load(&id).await.unwrap_err();
    assert!(err.is_corrupt(), "{err:?}");
    let other = new_key();
    server.cli(&["hset", &store.key(&other), "d", "x"]).await;
    let err = store.load(&other).await.unwrap_err();
    assert!(err.is_corrupt(), "{err:?}");
    // The layer starts a fresh session and leaves the value alone.
    let app = serve(&SessionLayer::new(store.clone())).await;
    let mut c = Conn::http1(app.addr).await;
    let r = c.get("/counter", Some(&format!("id={cookie_id}"))).await;
    assert_eq!(r.body, "1");
    assert_ne!(r.cookie_pair().unwrap(), format!("id={cookie_id}"));
    assert!(server.cli(&["get", &key]).await.contains("admin"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_deleted_behind_the_layers_back_is_never_silently_rewritten() {
    let (store, server) = single_node().await;
    let app = serve(&SessionLayer::new(store.clone())).await;
    let mut b = Browser::new(app.addr).await;
    b.get("/counter").await;
    let cookie = b.cookie.clone().unwrap();
    let key = store.key(&b.key().unwrap());
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

/// Many requests at once on the store's one connection to a node, a third of them giving up
/// at random moments (before their command is written, between write and reply, after it):
/// every reply still reaches the request it answers. Each session holds its own number and a
/// third of the loads ask for a session that does not exist, so a reply handed to the wrong
/// request shows as the wrong number, or as a record where there is none.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replies_reach_their_own_requests_when_some_give_up() {
    const SESSIONS: usize = 32;
    let (store, _server) = single_node().await;
    let mut keys = Vec::new();
    for i in 0..SESSIONS {
        let rec = record_at_ms(new_key(), i.to_string().into(), 1, now_ms() + 3_600_000);
        store.create(&rec).await.unwrap();
        keys.push(rec.key());
    }
    let keys = std::sync::Arc::new(keys);
    let tasks: Vec<_> = (0..SESSIONS)
        .map(|t| {
            let (store, keys) = (store.clone(), keys.clone());
            tokio::spawn(async move {
                let (mut answered, mut gave_up) = (0, 0);
                for n in 0..300_usize {
                    let i = (t * 7 + n * 13) % SESSIONS;
                    let (key, want) = if n % 3 == 1 {
                        (new_key(), None)
                    } else {
                        (keys[i], Some(i.to_string()))
                    };
                    let load = store.load(&key);
                    let loaded = if n % 3 == 0 {
                        let patience = Duration::from_micros(u64::try_from(n * 37 % 300).unwrap());
                        let Ok(loaded) = tokio::time::timeout(patience, load).await else {
                            gave_up += 1;
                            continue;
                        };
                        loaded
                    } else {
                        load.await
                    };
                    let got = loaded
                        .unwrap()
                        .map(|rec| String::from_utf8(rec.data().to_vec()).unwrap());
                    assert_eq!(got, want, "task {t}, load {n}: another request's reply");
                    answered += 1;
                }
                (answered, gave_up)
            })
        })
        .collect();
    let (mut answered, mut gave_up) = (0, 0);
    for task in tasks {
        let (a, g) = task.await.unwrap();
        answered += a;
        gave_up += g;
    }
    println!("{answered} loads answered, {gave_up} given up");
    assert!(
        gave_up > 100,
        "too few requests gave up to test it: {gave_up}"
    );
    assert!(answered > 6_000, "{answered}");
}

/// The store's own deadline (one timer per connection, not one per command) under load: while
/// Redis pauses now and then (`DEBUG SLEEP`), requests queued behind the pause fail as
/// unavailable once their 20 ms are up, the others are answered, and every answer is the
/// answering request's own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deadlines_expire_requests_without_crossing_replies() {
    const SESSIONS: usize = 16;
    let server = RedisServer::start_with(&["--enable-debug-command", "yes"]).await;
    let store = RedisStore::builder()
        .command_timeout(Duration::from_millis(20))
        .open(server.url())
        .await
        .unwrap();
    let mut keys = Vec::new();
    for i in 0..SESSIONS {
        let rec = record_at_ms(new_key(), i.to_string().into(), 1, now_ms() + 3_600_000);
        store.create(&rec).await.unwrap();
        keys.push(rec.key());
    }
    let keys = std::sync::Arc::new(keys);
    let port = server.port();
    let connections = || async move {
        let info = common::servers::redis_cli(port, &["info", "stats"]).await;
        info.lines()
            .find_map(|l| l.strip_prefix("total_connections_received:"))
            .and_then(|n| n.trim().parse::<u64>().ok())
            .unwrap()
    };
    let connections_before = connections().await;
    let pauses = tokio::spawn(async move {
        for _ in 0..5 {
            tokio::time::sleep(Duration::from_millis(30)).await;
            common::servers::redis_cli(port, &["debug", "sleep", "0.05"]).await;
        }
    });
    let tasks: Vec<_> = (0..SESSIONS)
        .map(|t| {
            let (store, keys) = (store.clone(), keys.clone());
            tokio::spawn(async move {
                let (mut answered, mut expired) = (0, 0);
                let started = Instant::now();
                let mut n = 0_usize;
                while started.elapsed() < Duration::from_millis(500) {
                    n += 1;
                    let i = (t + n * 5) % SESSIONS;
                    let (key, want) = if n.is_multiple_of(2) {
                        (new_key(), None)
                    } else {
                        (keys[i], Some(i.to_string()))
                    };
                    match store.load(&key).await {
                        Ok(loaded) => {
                            let got = loaded.map(|r| String::from_utf8(r.data().to_vec()).unwrap());
                            assert_eq!(got, want, "task {t}, load {n}: another request's reply");
                            answered += 1;
                        }
                        Err(e) => {
                            assert!(e.is_unavailable(), "{e:?}");
                            expired += 1;
                        }
                    }
                }
                (answered, expired)
            })
        })
        .collect();
    let (mut answered, mut expired) = (0, 0);
    for task in tasks {
        let (a, e) = task.await.unwrap();
        answered += a;
        expired += e;
    }
    pauses.await.unwrap();
    println!("{answered} loads answered, {expired} past their deadline");
    assert!(
        expired >= SESSIONS,
        "the pauses expired too few requests: {expired}"
    );
    assert!(answered > expired, "{answered} answered, {expired} expired");
    // A request past its deadline gives up its reply, not the connection: the only new
    // connections are redis-cli's (five pauses, and this count).
    assert_eq!(
        connections().await - connections_before,
        6,
        "the store reconnected after deadlines"
    );
}

/// Replies that are not what Redis sends (bytes that are not RESP2, a reply nobody asked for)
/// retire the store's connection: the request retries once on a new one, and no later request
/// is ever handed the stray reply; the requests that find the connection retired share one new
/// connection. Bytes that never make sense fail the request as unavailable, without a panic,
/// and the store serves again once the replies are right.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replies_out_of_step_retire_the_connection() {
    let server = RedisServer::start().await;
    let proxy = GarblingProxy::start(server.addr()).await;
    let store = RedisStore::open(format!("redis://{}", proxy.addr))
        .await
        .unwrap();
    let rec = record_at_ms(new_key(), "7".into(), 1, now_ms() + 3_600_000);
    store.create(&rec).await.unwrap();
    let loaded = |key| {
        let store = store.clone();
        async move { store.load(&key).await.map(|r| r.map(|r| r.data().clone())) }
    };
    let before = proxy.accepted();

    // One reply that is not RESP2: retried on a new connection, and answered.
    proxy.garble(Some(Garble::ReplaceNext(b"?what\r\n".to_vec())));
    assert_eq!(loaded(rec.key()).await.unwrap().unwrap(), "7");
    assert_eq!(
        proxy.accepted(),
        before + 1,
        "the garbled connection was kept"
    );

    // A reply nobody asked for after a good one: the good one is used, the connection retired,
    // and the next request (a session that does not exist) gets its own reply, not the stray.
    proxy.garble(Some(Garble::AppendToNext(b"$1\r\n7\r\n".to_vec())));
    assert_eq!(loaded(rec.key()).await.unwrap().unwrap(), "7");
    for _ in 0..3 {
        assert_eq!(
            loaded(new_key()).await.unwrap(),
            None,
            "a stray reply was handed on"
        );
    }
    assert_eq!(
        proxy.accepted(),
        before + 2,
        "the connection with a stray reply was kept"
    );

    // Many requests at once after a connection is retired: one new connection, shared.
    proxy.garble(Some(Garble::AppendToNext(b":1\r\n".to_vec())));
    assert_eq!(loaded(rec.key()).await.unwrap().unwrap(), "7");
    let loads: Vec<_> = (0..32).map(|_| tokio::spawn(loaded(rec.key()))).collect();
    for load in loads {
        assert_eq!(load.await.unwrap().unwrap().unwrap(), "7");
    }
    assert_eq!(
        proxy.accepted(),
        before + 3,
        "one connection per request after a retirement"
    );

    // Nothing but garbage: a clear failure, then service again.
    proxy.garble(Some(Garble::ReplaceAll(b"$x\r\n".to_vec())));
    let err = loaded(rec.key()).await.unwrap_err();
    assert!(err.is_unavailable(), "{err:?}");
    proxy.garble(None);
    assert_eq!(loaded(rec.key()).await.unwrap().unwrap(), "7");
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
    // An ACL user: `AUTH user password` on every new connection.
    let server =
        RedisServer::start_with(&["--user", "app", "on", ">s3cret", "~*", "&*", "+@all"]).await;
    let port = server.port();
    for wrong in ["app:wrong", "nobody:s3cret"] {
        let err = RedisStore::open(format!("redis://{wrong}@127.0.0.1:{port}"))
            .await
            .unwrap_err();
        assert!(!err.is_unavailable(), "{wrong}: {err:?}");
        let shown = format!("{err:?}");
        assert!(shown.contains("authentication failed"), "{shown}");
        assert!(
            !shown.contains("wrong") && !shown.contains("s3cret"),
            "{shown}"
        );
    }
    let store = RedisStore::open(format!("redis://app:s3cret@127.0.0.1:{port}/2"))
        .await
        .unwrap();
    let app = serve(&SessionLayer::new(store)).await;
    let mut b = Browser::new(app.addr).await;
    b.get("/counter").await;
    assert_eq!(b.get("/counter").await.body, "2");
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
    unix_ms(std::time::SystemTime::now())
}

/// The commands `store` sent among `seen`: those from its connection, found by sending a
/// command only it sends (the test's own `redis-cli` checks come from other connections).
async fn store_commands(
    store: &RedisStore,
    monitor: &mut Monitor,
    seen: &[common::servers::Seen],
) -> Vec<String> {
    monitor.take().await;
    store.delete(&new_key()).await.unwrap();
    let mark = monitor.take().await;
    let [del] = mark.as_slice() else {
        panic!("one DEL expected: {mark:#?}");
    };
    seen.iter()
        .filter(|s| s.source == del.source)
        .map(|s| s.command.clone())
        .collect()
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

/// A load is one `GET` that never writes, and reports the expiry in the value; missing keys are
/// `None`; values in another layout and keys of another type are corrupt and left alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn load_is_one_get_and_never_writes() {
    let (store, server) = single_node().await;
    let id = new_key();
    let created = now_ms() + 10_000;
    let data = bytes::Bytes::from_static(br#"{"d":{"n":1}}"#);
    store
        .create(&record_at_ms(id, data.clone(), 3, created))
        .await
        .unwrap();
    let mut monitor = Monitor::start(&server).await;
    let before = dirty(&server).await;
    let rec = store.load(&id).await.unwrap().unwrap();
    let seen = monitor.take().await;
    assert_eq!(store_commands(&store, &mut monitor, &seen).await, ["GET"]);
    assert!(seen.iter().all(|s| s.source != "lua"), "{seen:#?}");
    assert_eq!(rec.expires_at_unix_ms(), created);
    assert_eq!((rec.version(), rec.data()), (3, &data));
    assert_eq!(dirty(&server).await, before, "a load wrote");

    assert!(store.load(&new_key()).await.unwrap().is_none());
    // The value's expiry has the last word: a key whose TTL someone removed is served until
    // the expiry in its value, then never again, and left alone.
    let bare = new_key();
    let bare_key = store.key(&bare);
    let soon = now_ms() + 300;
    let value = format!("1:{soon:015}:0000000000000001:8:{{\"d\":{{}}}}");
    server.cli(&["set", &bare_key, &value]).await;
    assert_eq!(server.cli(&["pttl", &bare_key]).await.trim(), "-1");
    assert_eq!(store.load(&bare).await.unwrap().unwrap().version(), 1);
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert!(store.load(&bare).await.unwrap().is_none());
    assert_eq!(server.cli(&["pttl", &bare_key]).await.trim(), "-1");
    // A value in the layout before this one (`<version>:<token>:<payload>`) is corrupt, its
    // error naming the session by its fingerprint only.
    let old = new_key();
    server
        .cli(&[
            "set",
            &store.key(&old),
            r#"1:0000000000000001:{"d":{}}"#,
            "px",
            "60000",
        ])
        .await;
    let err = store.load(&old).await.unwrap_err();
    assert!(err.is_corrupt(), "{err:?}");
    let shown = format!("{err:?}");
    assert!(!shown.contains(&old.to_hex()), "{shown}");
    assert!(shown.contains(old.fingerprint().as_str()), "{shown}");
    // A key of another type is corrupt too.
    let hash = new_key();
    server.cli(&["hset", &store.key(&hash), "d", "x"]).await;
    let err = store.load(&hash).await.unwrap_err();
    assert!(err.is_corrupt(), "{err:?}");
    assert!(format!("{err:?}").contains("WRONGTYPE"), "{err:?}");
}

/// `touch` and `remove` change the key only on the expected version, each in one script call:
/// right version, the effect and `Saved`; another version, `Conflict` and nothing
/// written; a missing or expired key, `Missing` and nothing revived.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[allow(clippy::too_many_lines)] // one scenario, read top to bottom
async fn conditional_touch_and_remove() {
    let (store, server) = single_node().await;
    let id = new_key();
    let key = store.key(&id);
    let created = now_ms() + 10_000;
    let data = bytes::Bytes::from_static(br#"{"d":{"n":1}}"#);
    store
        .create(&record_at_ms(id, data.clone(), 3, created))
        .await
        .unwrap();
    let value = server.cli(&["get", &key]).await;
    let mut monitor = Monitor::start(&server).await;
    let before = dirty(&server).await;
    let at = |ms| common::from_unix_ms(ms);

    // Touch, wrong versions: nothing moves, nothing is written.
    for wrong in [2, 4, 30, u64::MAX] {
        assert_eq!(
            store.touch(&id, wrong, at(created + 60_000)).await.unwrap(),
            SaveOutcome::Conflict,
            "version {wrong}"
        );
    }
    assert_eq!(server_expiry(&server, &key).await, created);
    assert_eq!(dirty(&server).await, before);
    // Right version: moved (up or down), value and version unchanged; one script per call.
    for to in [created + 60_000, created + 5_000] {
        assert_eq!(
            store.touch(&id, 3, at(to)).await.unwrap(),
            SaveOutcome::Saved
        );
        assert_eq!(server_expiry(&server, &key).await, to);
    }
    // Two changes each: the expiry in the value and the key's.
    assert_eq!(dirty(&server).await, before + 4);
    let rec = store.load(&id).await.unwrap().unwrap();
    assert_eq!(
        (rec.version(), rec.data(), rec.expires_at_unix_ms()),
        (3, &data, created + 5_000)
    );
    let seen = monitor.take().await;
    assert_eq!(
        store_commands(&store, &mut monitor, &seen).await,
        [
            "EVALSHA", "EVALSHA", "EVALSHA", "EVALSHA", "EVALSHA", "EVALSHA", "GET"
        ],
        "one call each: {seen:#?}"
    );
    // Only the expiry field changed in the value, to the key's new expiry.
    let moved = server.cli(&["get", &key]).await;
    assert_eq!(value_expiry(&server, &key).await, created + 5_000);
    assert_eq!(moved.len(), value.len());
    let unchanged = |v: &str| {
        let f: Vec<String> = v.splitn(5, ':').map(str::to_owned).collect();
        (f[0].clone(), f[2].clone(), f[3].clone(), f[4].clone())
    };
    assert_eq!(unchanged(&moved), unchanged(&value));
    // Past the latest expiry Redis accepts: clamped, as every write of this store is.
    assert_eq!(
        store.touch(&id, 3, at(u64::MAX)).await.unwrap(),
        SaveOutcome::Saved
    );
    assert_eq!(server_expiry(&server, &key).await, 253_402_300_799_999);
    assert_eq!(value_expiry(&server, &key).await, 253_402_300_799_999);
    let value = server.cli(&["get", &key]).await;

    // Missing: nothing revived.
    let gone = new_key();
    assert_eq!(
        store.touch(&gone, 1, at(created)).await.unwrap(),
        SaveOutcome::Missing
    );
    assert_eq!(store.remove(&gone, 1).await.unwrap(), SaveOutcome::Missing);
    assert_eq!(server.cli(&["exists", &store.key(&gone)]).await.trim(), "0");

    // Remove, wrong version: the key stays as it was.
    let before = dirty(&server).await;
    monitor.take().await;
    for wrong in [2, 4] {
        assert_eq!(
            store.remove(&id, wrong).await.unwrap(),
            SaveOutcome::Conflict
        );
    }
    assert_eq!(server.cli(&["get", &key]).await, value);
    assert_eq!(dirty(&server).await, before);
    // Right version: gone; a second remove finds nothing.
    assert_eq!(store.remove(&id, 3).await.unwrap(), SaveOutcome::Saved);
    assert_eq!(server.cli(&["exists", &key]).await.trim(), "0");
    assert_eq!(store.remove(&id, 3).await.unwrap(), SaveOutcome::Missing);
    let seen = monitor.take().await;
    assert_eq!(
        store_commands(&store, &mut monitor, &seen).await,
        ["EVALSHA"; 4],
        "one call each"
    );

    // Expired: missing, not revived.
    let short = new_key();
    store
        .create(&record_at_ms(short, data.clone(), 1, now_ms() + 200))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(350)).await;
    assert_eq!(
        store.touch(&short, 1, at(now_ms() + 60_000)).await.unwrap(),
        SaveOutcome::Missing
    );
    assert_eq!(store.remove(&short, 1).await.unwrap(), SaveOutcome::Missing);
    assert!(store.load(&short).await.unwrap().is_none());
    assert_eq!(
        server.cli(&["exists", &store.key(&short)]).await.trim(),
        "0"
    );

    // A value this store did not write (no header) is no version: a conflict, left alone.
    let foreign = new_key();
    server
        .cli(&["set", &store.key(&foreign), r#"{"d":{}}"#, "px", "60000"])
        .await;
    assert_eq!(
        store.touch(&foreign, 1, at(created)).await.unwrap(),
        SaveOutcome::Conflict
    );
    assert_eq!(
        store.remove(&foreign, 1).await.unwrap(),
        SaveOutcome::Conflict
    );
    assert_eq!(
        server.cli(&["exists", &store.key(&foreign)]).await.trim(),
        "1"
    );
    // A key of another type: corrupt, left alone.
    let hash = new_key();
    server.cli(&["hset", &store.key(&hash), "d", "x"]).await;
    let err = store.touch(&hash, 1, at(created)).await.unwrap_err();
    assert!(err.is_corrupt(), "{err:?}");
    let err = store.remove(&hash, 1).await.unwrap_err();
    assert!(err.is_corrupt(), "{err:?}");
    assert_eq!(server.cli(&["exists", &store.key(&hash)]).await.trim(), "1");

    // The scripts flushed from the cache (as after a restart): reloaded once, same answers.
    let id = new_key();
    store
        .create(&record_at_ms(id, data.clone(), 1, created))
        .await
        .unwrap();
    server.cli(&["script", "flush"]).await;
    monitor.take().await;
    assert_eq!(
        store.touch(&id, 1, at(created + 1)).await.unwrap(),
        SaveOutcome::Saved
    );
    assert_eq!(store.remove(&id, 1).await.unwrap(), SaveOutcome::Saved);
    let seen = monitor.take().await;
    assert_eq!(
        store_commands(&store, &mut monitor, &seen).await,
        ["EVALSHA", "EVAL", "EVALSHA", "EVAL"]
    );
}

/// The key's expiry as Redis has it (Unix ms).
async fn server_expiry(server: &RedisServer, key: &str) -> u64 {
    server
        .cli(&["pexpiretime", key])
        .await
        .trim()
        .parse()
        .unwrap()
}

/// The same on a cluster: each script's one key goes to its node.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conditional_touch_and_remove_on_a_cluster() {
    let cluster = common::servers::RedisCluster::shared().await;
    let store = RedisStore::builder()
        .key_prefix("cond:session:")
        .open_cluster(cluster.urls())
        .await
        .unwrap();
    let at = |ms| common::from_unix_ms(ms);
    for _ in 0..20 {
        let id = new_key();
        let created = now_ms() + 10_000;
        store
            .create(&record_at_ms(
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
        assert_eq!(
            store.touch(&id, 2, at(to)).await.unwrap(),
            SaveOutcome::Conflict
        );
        assert_eq!(
            store.touch(&id, 1, at(to)).await.unwrap(),
            SaveOutcome::Saved
        );
        let rec = store.load(&id).await.unwrap().unwrap();
        assert_eq!((rec.version(), rec.expires_at_unix_ms()), (1, to));
        assert_eq!(store.remove(&id, 2).await.unwrap(), SaveOutcome::Conflict);
        assert_eq!(store.remove(&id, 1).await.unwrap(), SaveOutcome::Saved);
        assert!(store.load(&id).await.unwrap().is_none());
        assert_eq!(
            store.touch(&id, 1, at(to)).await.unwrap(),
            SaveOutcome::Missing
        );
    }
}

/// On a cluster, a script call the key's node does not have cached (after a restart, a
/// failover to a replica that never loaded it, `SCRIPT FLUSH`) is sent again as `EVAL` with
/// the script (which caches it on that node): every operation still works.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_empty_script_cache_is_refilled_on_a_cluster() {
    let cluster = common::servers::RedisCluster::start().await;
    let store = RedisStore::builder()
        .open_cluster(cluster.urls())
        .await
        .unwrap();
    let flush = || async {
        for node in &cluster.nodes {
            assert_eq!(node.cli(&["script", "flush"]).await.trim(), "OK");
        }
    };
    let id = new_key();
    let exp = now_ms() + 60_000;
    let rec = |v: u64| record_at_ms(id, bytes::Bytes::from_static(b"{}"), v, exp);
    store.create(&rec(1)).await.unwrap();
    flush().await;
    assert_eq!(store.load(&id).await.unwrap().unwrap().version(), 1);
    flush().await;
    assert_eq!(store.save(&rec(2), 1).await.unwrap(), SaveOutcome::Saved);
    flush().await;
    let later = common::from_unix_ms(exp + 1_000);
    assert_eq!(
        store.touch(&id, 2, later).await.unwrap(),
        SaveOutcome::Saved
    );
    flush().await;
    assert_eq!(store.remove(&id, 2).await.unwrap(), SaveOutcome::Saved);
    assert!(store.load(&id).await.unwrap().is_none());
}

/// Contains `needle`.
fn has(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// The writes as RESP on the wire: a save's `EVALSHA` has 8 elements (sha, key count, key and
/// four arguments), a touch's 6, a remove's 5; a create is `SET` (a load is `GET`). (The owner
/// index's add script has 8 too; these records have no owner.)
const TRIGGERS: lost_reply::Triggers = lost_reply::Triggers {
    create: |b| has(b, b"*7\r\n$3\r\nSET\r\n"),
    save: |b| has(b, b"*8\r\n$7\r\nEVALSHA\r\n"),
    touch: |b| has(b, b"*6\r\n$7\r\nEVALSHA\r\n"),
    remove: |b| has(b, b"*5\r\n$7\r\nEVALSHA\r\n"),
};

/// Issue item 9: a write whose reply was lost is retried; the retry answers `Saved` (or
/// `Created`) when it finds its own effect, and unavailable ("outcome unknown") when another
/// writer's effect may hide it, never `Conflict` or `Missing`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_whose_reply_was_lost_is_saved_or_unknown() {
    let server = RedisServer::start().await;
    let proxy = ReplyDroppingProxy::start(server.addr()).await;
    let through_proxy = RedisStore::open(format!("redis://{}", proxy.addr))
        .await
        .unwrap();
    let direct = RedisStore::open(server.url()).await.unwrap();
    lost_reply::store_level(through_proxy, direct, &proxy, &TRIGGERS).await;
}

/// The same on a Redis Cluster (here one master owning every slot, announcing the proxy's
/// address, so the cluster client talks to it through the proxy): the cluster client must not
/// send a write again by itself after the broken connection, out of the store's sight, which
/// would turn "outcome unknown" into a conflict.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_whose_reply_was_lost_is_saved_or_unknown_on_a_cluster() {
    let node = common::servers::one_node_cluster().await;
    let proxy = ReplyDroppingProxy::start(node.addr()).await;
    common::servers::announce_port(&node, proxy.addr.port()).await;
    let through_proxy = RedisStore::open_cluster([format!("redis://{}", proxy.addr)])
        .await
        .unwrap();
    // The single-node store on the node itself: it owns every slot, so no redirection.
    let direct = RedisStore::open(node.url()).await.unwrap();
    lost_reply::store_level(through_proxy, direct, &proxy, &TRIGGERS).await;
}

/// The same through the layer on a cluster: the `update` answers 503 and is applied once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_update_whose_save_reply_was_lost_is_applied_once_on_a_cluster() {
    let node = common::servers::one_node_cluster().await;
    let proxy = ReplyDroppingProxy::start(node.addr()).await;
    common::servers::announce_port(&node, proxy.addr.port()).await;
    let a = serve(&SessionLayer::new(
        RedisStore::open_cluster([format!("redis://{}", proxy.addr)])
            .await
            .unwrap(),
    ))
    .await;
    let b = serve(&SessionLayer::new(
        RedisStore::open(node.url()).await.unwrap(),
    ))
    .await;
    lost_reply::layer_level(a.addr, b.addr, &proxy, TRIGGERS.save).await;
}

/// Issue item 9 through the layer: an `update` whose save reply was lost while another request
/// saved on top answers 503, and is not applied twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_update_whose_save_reply_was_lost_is_applied_once() {
    let server = RedisServer::start().await;
    let proxy = ReplyDroppingProxy::start(server.addr()).await;
    let a = serve(&SessionLayer::new(
        RedisStore::open(format!("redis://{}", proxy.addr))
            .await
            .unwrap(),
    ))
    .await;
    let b = serve(&SessionLayer::new(
        RedisStore::open(server.url()).await.unwrap(),
    ))
    .await;
    lost_reply::layer_level(a.addr, b.addr, &proxy, TRIGGERS.save).await;
}

/// The command timeout alone bounds an operation: a command slower than the `redis` crate's
/// default response timeout (500 ms) but within the command timeout succeeds, and one slower
/// than the command timeout fails as unavailable, on time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_command_timeout_bounds_each_operation() {
    let server = RedisServer::start_with(&["--enable-debug-command", "yes"]).await;
    let id = new_key();
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
        .create(&record_at_ms(id, data, 1, now_ms() + 60_000))
        .await
        .unwrap();
    loads_are_bounded_by_the_command_timeout(&patient, &hasty, &id, server.port()).await;
}

/// While the node holding `id` sleeps 1.2 s (`DEBUG SLEEP` on `port`), a load through `patient`
/// (5 s timeout) waits it out and succeeds, and one through `hasty` (300 ms) fails as
/// unavailable, on time.
async fn loads_are_bounded_by_the_command_timeout(
    patient: &RedisStore,
    hasty: &RedisStore,
    key: &Key,
    port: u16,
) {
    for (store, sleep_ok) in [(patient, true), (hasty, false)] {
        let sleeper = tokio::spawn(async move {
            common::servers::redis_cli(port, &["debug", "sleep", "1.2"]).await
        });
        // Let the sleep start first.
        tokio::time::sleep(Duration::from_millis(150)).await;
        let started = Instant::now();
        let loaded = store.load(key).await;
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
        // The reply the timed-out load never read is not taken for the next one's.
        let other = new_key();
        assert!(store.load(&other).await.unwrap().is_none());
        assert_eq!(store.load(key).await.unwrap().unwrap().version(), 1);
    }
}

/// One `/incr/n` request of a failover run: when it started and ended, its status, and the
/// counter it answered (on a 200).
#[derive(Debug, Clone, Copy)]
struct Incr {
    start: Instant,
    end: Instant,
    status: StatusCode,
    value: Option<i64>,
}

/// What one failover run observed (printed through `Debug`).
#[derive(Debug, Default)]
#[allow(dead_code)]
struct Failover {
    /// From the first failed request on the killed master's sessions to the end of the first
    /// successful one after it.
    outage: Duration,
    /// Kill to the replica answering `ROLE` as master.
    promoted: Duration,
    /// Kill to a new replica of the promoted one in sync (with `min_replicas_ack` only).
    replica_attached: Option<Duration>,
    /// Requests on the killed master's sessions that failed, by status.
    failed: std::collections::BTreeMap<u16, usize>,
    /// Requests on the other masters' sessions during the outage: answered 200, and failed.
    others_ok: usize,
    others_failed: usize,
    /// Acknowledged increments, and those lost (a later observation below them).
    acknowledged: usize,
    lost: usize,
    /// Sessions on the killed master, and on the others.
    on_victim: usize,
    on_others: usize,
}

/// Acknowledged increments of one session that were lost: an increment acknowledged with value
/// `v` must leave the counter at `v` or above for good, so a later acknowledgement of `u <= v`
/// (the counter was back at `u - 1`) or a final reading below `v` means `v` was lost.
fn lost_increments(history: &[Incr], last: i64) -> usize {
    let acked: Vec<i64> = history.iter().filter_map(|r| r.value).collect();
    (0..acked.len())
        .filter(|&i| acked[i + 1..].iter().any(|&u| u <= acked[i]) || last < acked[i])
        .count()
}

/// Issue 14: a 3-master, 3-replica cluster under load (several clients incrementing their own
/// session's counter); one master is killed (SIGKILL), its replica takes over, and the old
/// master, restarted, rejoins as a replica. Reports the outage on the killed master's slots, the
/// failed requests and their statuses, that the other masters' sessions kept working, and how
/// many acknowledged increments were lost. Run without `min_replicas_ack` (a loss is a race:
/// counted, not asserted) and with `min_replicas_ack(1, ..)` (no acknowledged increment may be
/// lost).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_failover_under_load() {
    let without = failover_run(None).await;
    println!("without min_replicas_ack: {without:#?}");
    let with = failover_run(Some(1)).await;
    println!("with min_replicas_ack(1, 100 ms): {with:#?}");
    assert_eq!(
        with.lost, 0,
        "an acknowledged write was lost despite WAIT: {with:#?}"
    );
}

#[allow(clippy::too_many_lines)] // one scenario, read top to bottom
async fn failover_run(acks: Option<usize>) -> Failover {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};

    let mut cluster = common::servers::RedisCluster::start_with_replicas(
        1,
        1000,
        &[
            "--cluster-replica-validity-factor",
            "0",
            // The other masters serve while one is down (by default the whole cluster
            // refuses queries from when a master is marked failed until its replica takes over).
            "--cluster-require-full-coverage",
            "no",
            // A new replica syncs at once (not after the default 5 s wait for more replicas).
            "--repl-diskless-sync-delay",
            "0",
        ],
    )
    .await;
    let mut builder = RedisStore::builder().command_timeout(Duration::from_secs(1));
    if let Some(n) = acks {
        builder = builder.min_replicas_ack(n, Duration::from_millis(100));
    }
    let store = builder.open_cluster(cluster.urls()).await.unwrap();
    let app = serve(&SessionLayer::new(store.clone())).await;

    // Sessions, until the first master serves at least two and the others two between them.
    let mut browsers = Vec::new();
    let mut masters = Vec::new();
    for _ in 0..40 {
        let mut b = Browser::new(app.addr).await;
        assert_eq!(b.get("/incr/n").await.body, "1");
        masters.push(cluster.master_of(0, &store.key(&b.key().unwrap())).await);
        browsers.push(b);
        let victim = masters[0];
        let on_victim = masters.iter().filter(|&&m| m == victim).count();
        if on_victim >= 3 && masters.len() - on_victim >= 3 {
            break;
        }
    }
    let victim = masters[0];
    let on_victim: Vec<bool> = masters.iter().map(|&m| m == victim).collect();
    assert!(on_victim.iter().filter(|&&v| !v).count() >= 1);
    let replica = cluster.replicas_of(victim).await[0];

    // Load: every session incremented in a loop, each by its own client.
    let stop = Arc::new(AtomicBool::new(false));
    let mut clients = Vec::new();
    for mut b in browsers {
        let stop = stop.clone();
        clients.push(tokio::spawn(async move {
            let mut history = Vec::new();
            while !stop.load(Ordering::SeqCst) && history.len() < 20_000 {
                let start = Instant::now();
                let r = b.get("/incr/n").await;
                history.push(Incr {
                    start,
                    end: Instant::now(),
                    status: r.status,
                    value: (r.status == StatusCode::OK).then(|| r.body.parse().unwrap()),
                });
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            let last = match b.get("/get/n").await {
                r if r.status == StatusCode::OK => r.body.parse().unwrap(),
                r if r.status == StatusCode::NOT_FOUND => 0,
                r => panic!("final read: {r:?}"),
            };
            (history, last)
        }));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    cluster.nodes[victim].kill();
    let killed = Instant::now();

    // The replica takes over; then the old master comes back, as its replica.
    while !cluster.is_master(replica).await {
        assert!(killed.elapsed() < Duration::from_secs(15), "no failover");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let promoted = killed.elapsed();
    let mut replica_attached = None;
    if acks.is_some() {
        // The promoted replica has no replica of its own: writes on its slots cannot be
        // confirmed until one is attached (a fresh node, as an operator replaces the lost one).
        cluster.add_replica(replica).await;
        replica_attached = Some(killed.elapsed());
    }
    // Load goes on until the killed master's slots serve again, then a little longer.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    stop.store(true, Ordering::SeqCst);
    let mut histories = Vec::new();
    for c in clients {
        histories.push(c.await.unwrap());
    }

    let mut report = Failover {
        promoted,
        replica_attached,
        on_victim: on_victim.iter().filter(|&&v| v).count(),
        on_others: on_victim.iter().filter(|&&v| !v).count(),
        ..Failover::default()
    };
    let victim_requests: Vec<Incr> = histories
        .iter()
        .zip(&on_victim)
        .filter(|(_, v)| **v)
        .flat_map(|((h, _), _)| h.iter().copied())
        .collect();
    let first_failure = victim_requests
        .iter()
        .filter(|r| r.status != StatusCode::OK)
        .map(|r| r.start)
        .min()
        .expect("no request on the killed master's slots failed");
    let recovered = victim_requests
        .iter()
        .filter(|r| r.status == StatusCode::OK && r.start > first_failure)
        .map(|r| r.end)
        .min()
        .expect("the killed master's slots never served again");
    report.outage = recovered - first_failure;
    for ((history, last), victim) in histories.iter().zip(&on_victim) {
        for r in history {
            if *victim && r.status != StatusCode::OK {
                *report.failed.entry(r.status.as_u16()).or_default() += 1;
            }
            if !*victim && r.start >= first_failure && r.end <= recovered {
                if r.status == StatusCode::OK {
                    report.others_ok += 1;
                } else {
                    report.others_failed += 1;
                }
            }
            assert!(
                r.status == StatusCode::OK || r.status == StatusCode::SERVICE_UNAVAILABLE,
                "{r:?}"
            );
        }
        report.acknowledged += history.iter().filter(|r| r.value.is_some()).count();
        report.lost += lost_increments(history, *last);
    }
    assert!(
        report.others_ok > 0,
        "the other masters' sessions did not keep working: {report:#?}"
    );
    report
}

/// Issue 14: a master, a replica and three Sentinels; the store finds the master through the
/// Sentinels, the master is killed, the Sentinels promote the replica, and the same layer
/// serves again from it without a restart (503 meanwhile, never another status).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sentinel_failover_without_a_restart() {
    use common::servers::RedisSentinels;

    let mut master = RedisServer::start().await;
    let master_port = master.port().to_string();
    let replica = RedisServer::start_with(&["--replicaof", "127.0.0.1", &master_port]).await;
    let deadline = Instant::now() + Duration::from_secs(20);
    while !replica
        .cli(&["info", "replication"])
        .await
        .contains("master_link_status:up")
    {
        assert!(Instant::now() < deadline, "the replica never synced");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let sentinels = RedisSentinels::start(&master, 3, 1).await;
    let store = RedisStore::builder()
        .command_timeout(Duration::from_secs(1))
        .open_sentinel(sentinels.urls(), RedisSentinels::MASTER)
        .await
        .unwrap();
    assert!(format!("{store:?}").contains("sentinel"), "{store:?}");
    let app = serve(&SessionLayer::new(store)).await;
    let mut b = Browser::new(app.addr).await;
    for n in 1..=5 {
        assert_eq!(b.get("/incr/n").await.body, n.to_string());
    }
    // Replicated before the kill, so the count below is exact.
    replica.cli(&["wait", "1", "0"]).await;
    let mut replica_has = String::new();
    while replica_has.is_empty() {
        replica_has = replica.cli(&["keys", "session:*"]).await.trim().to_owned();
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    master.kill();
    let killed = Instant::now();
    let mut failed = 0;
    let recovered = loop {
        let r = b.get("/incr/n").await;
        match r.status {
            StatusCode::OK => {
                assert_eq!(r.body, "6", "the count went on from the replica's copy");
                break killed.elapsed();
            }
            StatusCode::SERVICE_UNAVAILABLE => failed += 1,
            other => panic!("{other} while failing over: {r:?}"),
        }
        assert!(
            killed.elapsed() < Duration::from_secs(30),
            "never served again"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(
        sentinels.master_port().await,
        replica.port(),
        "the Sentinels promoted the replica"
    );
    assert_eq!(b.get("/incr/n").await.body, "7");
    println!(
        "Sentinel failover: served again {recovered:?} after the kill, {failed} requests \
         answered 503 meanwhile"
    );
}

/// The cluster client's own response timeout is off: a command slower than the `redis` crate's
/// default single-node response timeout (500 ms) succeeds within the store's command timeout,
/// and one slower than the command timeout fails as unavailable, on time (as on a single node).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_command_timeout_bounds_each_operation_on_a_cluster() {
    let cluster = common::servers::RedisCluster::start_with_replicas(
        0,
        5000,
        &["--enable-debug-command", "yes"],
    )
    .await;
    let id = new_key();
    let data = bytes::Bytes::from_static(b"{}");
    let patient = RedisStore::builder()
        .command_timeout(Duration::from_secs(5))
        .open_cluster(cluster.urls())
        .await
        .unwrap();
    let hasty = RedisStore::builder()
        .command_timeout(Duration::from_millis(300))
        .open_cluster(cluster.urls())
        .await
        .unwrap();
    patient
        .create(&record_at_ms(id, data, 1, now_ms() + 60_000))
        .await
        .unwrap();
    let node = cluster.master_of(0, &patient.key(&id)).await;
    let port = cluster.nodes[node].port();
    loads_are_bounded_by_the_command_timeout(&patient, &hasty, &id, port).await;
}

/// `min_replicas_ack`: each write goes with a `WAIT` in the same round trip and is acknowledged
/// once a replica has it; without a replica to confirm it, a write is unavailable (durability
/// unknown) although applied on the master, and reads go on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn min_replicas_ack_confirms_each_write_with_wait() {
    let master = RedisServer::start().await;
    let master_port = master.port().to_string();
    let mut replica = RedisServer::start_with(&["--replicaof", "127.0.0.1", &master_port]).await;
    let deadline = Instant::now() + Duration::from_secs(20);
    while !replica
        .cli(&["info", "replication"])
        .await
        .contains("master_link_status:up")
    {
        assert!(Instant::now() < deadline, "the replica never synced");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let store = RedisStore::builder()
        .min_replicas_ack(1, Duration::from_millis(100))
        .open(master.url())
        .await
        .unwrap();
    let id = new_key();
    let data = bytes::Bytes::from_static(b"{}");
    let mut monitor = Monitor::start(&master).await;
    store
        .create(&record_at_ms(id, data.clone(), 1, now_ms() + 60_000))
        .await
        .unwrap();
    let rec = record_at_ms(id, data.clone(), 2, now_ms() + 60_000);
    assert_eq!(store.save(&rec, 1).await.unwrap(), SaveOutcome::Saved);
    assert!(store.load(&id).await.unwrap().is_some());
    let sent = client_commands(&monitor.take().await);
    assert_eq!(
        sent,
        ["SET", "WAIT", "EVALSHA", "WAIT", "GET"],
        "each write with its WAIT, the load alone"
    );
    // A conflict writes nothing: reported as such.
    assert_eq!(store.save(&rec, 1).await.unwrap(), SaveOutcome::Conflict);

    replica.kill();
    let rec = record_at_ms(id, data, 3, now_ms() + 60_000);
    let err = store.save(&rec, 2).await.unwrap_err();
    assert!(err.is_unavailable(), "{err:?}");
    let cause = std::error::Error::source(&err).map(ToString::to_string);
    let chain = format!("{err} / {cause:?}");
    assert!(chain.contains("durability unknown"), "{chain}");
    println!("{chain}");
    assert!(!chain.contains(&id.to_hex()), "{chain}");
    assert_eq!(
        store.load(&id).await.unwrap().unwrap().version(),
        3,
        "applied on the master all the same"
    );
    let err = store.delete(&id).await.unwrap_err();
    assert!(err.is_unavailable(), "{err:?}");
    assert!(store.load(&id).await.unwrap().is_none());
}

// ---- Owners (#16): the owner index -------------------------------------------------------

/// The Redis key of `owner`'s index under `prefix`: `<prefix>owner:` and the first 128 bits of
/// the owner's BLAKE3 digest in hex (the store's layout, written out here).
fn index_key(prefix: &str, owner: &str) -> String {
    let digest = blake3::hash(owner.as_bytes());
    let mut bytes = [0; 16];
    bytes.copy_from_slice(&digest.as_bytes()[..16]);
    format!("{prefix}owner:{:032x}", u128::from_be_bytes(bytes))
}

/// An owner with the characters that could trip a key or a script: braces (a hash tag), a colon,
/// quotes, a space, non-ASCII.
fn owner_name(tag: &str) -> String {
    format!("user:{{{tag}}} \"zürich\" {}", &new_key().to_hex()[..8])
}

fn owned_at_ms(
    key: Key,
    owner: &str,
    version: u64,
    expires_ms: u64,
) -> hyper_sessions::store::Record {
    record_at_ms(
        key,
        bytes::Bytes::from_static(br#"{"d":{"n":1}}"#),
        version,
        expires_ms,
    )
    .with_owner(Some(owner.into()))
}

/// The index's members (session keys in hex) and scores, as Redis holds them.
async fn index_entries(server: &RedisServer, index: &str) -> Vec<(String, u64)> {
    let out = server
        .cli(&["zrange", index, "0", "-1", "withscores"])
        .await;
    let lines: Vec<&str> = out.lines().filter(|l| !l.is_empty()).collect();
    lines
        .chunks_exact(2)
        .map(|p| (p[0].to_owned(), p[1].parse().unwrap()))
        .collect()
}

fn listed_keys(records: &[hyper_sessions::store::Record]) -> std::collections::BTreeSet<Key> {
    records
        .iter()
        .map(hyper_sessions::store::Record::key)
        .collect()
}

/// Commands per request for an owned session (issue #16): a read is one `GET` and a write
/// `GET` + `EVALSHA` as without owners; only a request that sets or changes the owner pays for
/// the index (its add script before the record's write).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commands_per_request_kind_with_an_owner() {
    let (store, server) = single_node().await;
    let layer = SessionLayer::new(store);
    let app = serve(&layer).await;
    let mut b = Browser::new(app.addr).await;
    // Warm up: the scripts get into the server's cache.
    b.get("/counter").await;
    b.get("/owner/warm").await;
    b.get("/destroy").await;
    let mut monitor = Monitor::start(&server).await;

    expect(
        &mut b,
        &mut monitor,
        "/owner/alice",
        &["EVALSHA", "SET"],
        "login, new session: index add + SET NX",
    )
    .await;
    expect(
        &mut b,
        &mut monitor,
        "/read",
        &["GET"],
        "owned read: one GET",
    )
    .await;
    expect(
        &mut b,
        &mut monitor,
        "/counter",
        &["GET", "EVALSHA"],
        "owned write: load + compare-and-set",
    )
    .await;
    expect(
        &mut b,
        &mut monitor,
        "/incr/n",
        &["GET", "EVALSHA"],
        "owned update: load + compare-and-set",
    )
    .await;
    expect(
        &mut b,
        &mut monitor,
        "/owner/alice",
        &["GET"],
        "same owner again: nothing to write",
    )
    .await;
    expect(
        &mut b,
        &mut monitor,
        "/owner/bob",
        &["GET", "EVALSHA", "EVALSHA", "EVALSHA"],
        "owner change: load + save (answers: owner differs) + index add + save",
    )
    .await;
    expect(
        &mut b,
        &mut monitor,
        "/read",
        &["GET"],
        "read after the change: one GET",
    )
    .await;
    expect(
        &mut b,
        &mut monitor,
        "/sessions",
        &["GET", "EVALSHA", "MGET"],
        "owner's list: load + index script + one MGET for the listed sessions",
    )
    .await;
    expect(
        &mut b,
        &mut monitor,
        "/cycle",
        &["GET", "EVALSHA", "SET", "EVALSHA"],
        "cycle id of an owned session: load + index add for the new key + create + remove",
    )
    .await;
    expect(&mut b, &mut monitor, "/destroy", &["DEL"], "destroy: DEL").await;

    // An anonymous session given an owner (login on an existing session).
    b.get("/counter").await;
    monitor.take().await;
    expect(
        &mut b,
        &mut monitor,
        "/owner/carol",
        &["GET", "EVALSHA", "EVALSHA", "EVALSHA"],
        "login on an anonymous session: load + save (owner differs) + index add + save",
    )
    .await;
    expect(
        &mut b,
        &mut monitor,
        "/counter",
        &["GET", "EVALSHA"],
        "write after login: load + compare-and-set",
    )
    .await;
}

/// Stale entries (record deleted, removed, expired, or saved with another owner) are dropped by
/// a listing once their score (the adding write's expiry) has passed, and by the sweep of the
/// owner's next login; an entry whose score is later (a write under way: entry written, record
/// not yet) is kept; a live record whose entry's score lags its expiry (touched since) is
/// listed and kept.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[allow(clippy::too_many_lines)] // one scenario, read top to bottom
async fn stale_index_entries_are_dropped_and_pending_ones_kept() {
    let (store, server) = single_node().await;
    let (me, other) = (owner_name("me"), owner_name("other"));
    let index = index_key("session:", &me);
    let soon = now_ms() + 500;
    let [deleted, removed, expired, moved, disowned, touched, live] =
        std::array::from_fn(|_| new_key());
    for key in [deleted, removed, expired, moved, disowned, touched] {
        store.create(&owned_at_ms(key, &me, 1, soon)).await.unwrap();
    }
    store
        .create(&owned_at_ms(live, &me, 1, now_ms() + 60_000))
        .await
        .unwrap();
    store.delete(&deleted).await.unwrap();
    assert_eq!(store.remove(&removed, 1).await.unwrap(), SaveOutcome::Saved);
    let later = now_ms() + 60_000;
    assert_eq!(
        store
            .save(&owned_at_ms(moved, &other, 2, later), 1)
            .await
            .unwrap(),
        SaveOutcome::Saved
    );
    let ownerless = record_at_ms(disowned, bytes::Bytes::from_static(b"{}"), 2, later);
    assert_eq!(store.save(&ownerless, 1).await.unwrap(), SaveOutcome::Saved);
    let far = std::time::SystemTime::now() + Duration::from_secs(60);
    assert_eq!(
        store.touch(&touched, 1, far).await.unwrap(),
        SaveOutcome::Saved
    );
    // A write under way: its entry written (score: its expiry, later), its record not yet.
    let pending = new_key();
    let pending_score = (now_ms() + 60_000).to_string();
    server
        .cli(&["zadd", &index, &pending_score, &pending.to_hex()])
        .await;
    // An entry whose score passed long ago and whose record never came.
    let ghost = new_key();
    server.cli(&["zadd", &index, "1000", &ghost.to_hex()]).await;

    // Before the scores pass: nothing but the ghost is due; the listing is exact anyway.
    let listed = store.owned(&me).await.unwrap();
    assert_eq!(listed_keys(&listed), [expired, touched, live].into());
    let left: Vec<String> = index_entries(&server, &index)
        .await
        .into_iter()
        .map(|(m, _)| m)
        .collect();
    assert_eq!(left.len(), 8, "only the ghost dropped: {left:?}");
    assert!(!left.contains(&ghost.to_hex()));

    tokio::time::sleep(Duration::from_millis(600)).await;
    let listed = store.owned(&me).await.unwrap();
    assert_eq!(listed_keys(&listed), [touched, live].into());
    let mut left: Vec<String> = index_entries(&server, &index)
        .await
        .into_iter()
        .map(|(m, _)| m)
        .collect();
    left.sort();
    let mut want = vec![touched.to_hex(), live.to_hex(), pending.to_hex()];
    want.sort();
    assert_eq!(
        left, want,
        "stale entries dropped, the pending and lagging ones kept"
    );
    // The record under way arrives: listed.
    store
        .create(&owned_at_ms(pending, &me, 1, now_ms() + 60_000))
        .await
        .unwrap();
    assert!(listed_keys(&store.owned(&me).await.unwrap()).contains(&pending));
    // The other owner's list has the moved record; nobody's has the ownerless one.
    assert_eq!(
        listed_keys(&store.owned(&other).await.unwrap()),
        [moved].into()
    );

    // The sweep at login: entries turned stale, then a new session of the same owner.
    let short = now_ms() + 300;
    let [gone, elsewhere] = std::array::from_fn(|_| new_key());
    for key in [gone, elsewhere] {
        store
            .create(&owned_at_ms(key, &me, 1, short))
            .await
            .unwrap();
    }
    store.delete(&gone).await.unwrap();
    assert_eq!(
        store
            .save(&owned_at_ms(elsewhere, &other, 2, now_ms() + 60_000), 1)
            .await
            .unwrap(),
        SaveOutcome::Saved
    );
    tokio::time::sleep(Duration::from_millis(400)).await;
    let login = new_key();
    store
        .create(&owned_at_ms(login, &me, 1, now_ms() + 60_000))
        .await
        .unwrap();
    let mut left: Vec<String> = index_entries(&server, &index)
        .await
        .into_iter()
        .map(|(m, _)| m)
        .collect();
    left.sort();
    let mut want = vec![
        touched.to_hex(),
        live.to_hex(),
        pending.to_hex(),
        login.to_hex(),
    ];
    want.sort();
    assert_eq!(left, want, "the login's sweep dropped the stale entries");
    // No owner in any key.
    let keys = server.cli(&["keys", "*"]).await;
    assert!(
        !keys.contains("zürich") && !keys.contains("user:"),
        "{keys}"
    );
}

/// One process's record of when each session was surely the owner's: from after the write that
/// gave it the owner was acknowledged to before the write that took it away was sent.
#[derive(Default)]
struct Ownership {
    spans: std::sync::Mutex<Vec<(Key, Instant, Option<Instant>)>>,
}

impl Ownership {
    fn begin(&self, key: Key) -> usize {
        let mut spans = self.spans.lock().unwrap();
        spans.push((key, Instant::now(), None));
        spans.len() - 1
    }

    fn end(&self, span: usize) {
        self.spans.lock().unwrap()[span].2 = Some(Instant::now());
    }

    /// The sessions that were the owner's all through `from..=to`.
    fn throughout(&self, from: Instant, to: Instant) -> std::collections::BTreeSet<Key> {
        self.spans
            .lock()
            .unwrap()
            .iter()
            .filter(|(_, begin, end)| *begin <= from && end.is_none_or(|end| end >= to))
            .map(|(key, _, _)| *key)
            .collect()
    }
}

/// Many tasks create, save, move to another owner and back, and delete owned sessions while
/// listings run: every session that was the owner's all through a listing is listed (and every
/// listed one is the owner's). The spans are taken conservatively around each write, so the
/// check is exact, not timing-dependent.
async fn the_index_never_misses_a_live_session(store: RedisStore) {
    let me: std::sync::Arc<str> = owner_name("busy").into();
    let other: std::sync::Arc<str> = owner_name("elsewhere").into();
    let spans = std::sync::Arc::new(Ownership::default());
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut workers = tokio::task::JoinSet::new();
    for _ in 0..16 {
        let (store, me, other, spans, stop) = (
            store.clone(),
            me.clone(),
            other.clone(),
            spans.clone(),
            stop.clone(),
        );
        workers.spawn(async move {
            // The writes that add an index entry give it a short expiry (its score), which
            // later writes extend: the entries' scores pass while the sessions live on, so
            // listings do drop entries (of sessions moved away), and a drop that lost a live
            // session's entry would show.
            let exp = || now_ms() + 60_000;
            let brief = || now_ms() + 300;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let key = new_key();
                store
                    .create(&owned_at_ms(key, &me, 1, brief()))
                    .await
                    .unwrap();
                let span = spans.begin(key);
                // Saves that keep the owner (no index write), long enough to span listings.
                let mut v = 1;
                while v < 30 {
                    let saved = store.save(&owned_at_ms(key, &me, v + 1, exp()), v).await;
                    assert_eq!(saved.unwrap(), SaveOutcome::Saved);
                    v += 1;
                }
                spans.end(span);
                let moved = store.save(&owned_at_ms(key, &other, v + 1, exp()), v).await;
                assert_eq!(moved.unwrap(), SaveOutcome::Saved);
                // Away long enough for the entry's score to pass: listings drop it.
                tokio::time::sleep(Duration::from_millis(350)).await;
                let back = store
                    .save(&owned_at_ms(key, &me, v + 2, brief()), v + 1)
                    .await;
                assert_eq!(back.unwrap(), SaveOutcome::Saved);
                v += 2;
                let span = spans.begin(key);
                for _ in 0..10 {
                    let far = std::time::SystemTime::now() + Duration::from_secs(60);
                    assert_eq!(store.touch(&key, v, far).await.unwrap(), SaveOutcome::Saved);
                }
                spans.end(span);
                store.delete(&key).await.unwrap();
            }
        });
    }
    let mut checked = 0;
    for _ in 0..100 {
        let from = Instant::now();
        let listed = store.owned(&me).await.unwrap();
        let to = Instant::now();
        for r in &listed {
            assert_eq!(r.owner(), Some(&*me), "another owner's record listed");
        }
        let must = spans.throughout(from, to);
        let got = listed_keys(&listed);
        let missed: Vec<_> = must.difference(&got).collect();
        assert!(
            missed.is_empty(),
            "live sessions missing from the list: {missed:?}"
        );
        checked += must.len();
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    while let Some(done) = workers.join_next().await {
        done.unwrap();
    }
    assert!(
        checked > 0,
        "no session was the owner's through any listing"
    );
    println!("{checked} sessions checked over 100 listings");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_index_never_misses_a_live_session_under_churn() {
    let (store, _server) = single_node().await;
    the_index_never_misses_a_live_session(store).await;
}

/// The same on a 3-master cluster, where an owner's index and most of their sessions are on
/// different nodes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_index_never_misses_a_live_session_on_a_cluster() {
    let cluster = common::servers::RedisCluster::shared().await;
    let prefix = "owners-churn:session:";
    let store = RedisStore::builder()
        .key_prefix(prefix)
        .open_cluster(cluster.urls())
        .await
        .unwrap();
    // The index and the sessions are on different nodes: an owner's sessions land on every
    // master, and listing them still works.
    let me = owner_name("spread");
    let index_node = cluster.master_of(0, &index_key(prefix, &me)).await;
    let mut elsewhere = 0;
    let mut keys = std::collections::BTreeSet::new();
    for _ in 0..24 {
        let key = new_key();
        store
            .create(&owned_at_ms(key, &me, 1, now_ms() + 60_000))
            .await
            .unwrap();
        if cluster.master_of(0, &store.key(&key)).await != index_node {
            elsewhere += 1;
        }
        keys.insert(key);
    }
    assert!(elsewhere > 0, "every session landed on the index's node");
    assert_eq!(listed_keys(&store.owned(&me).await.unwrap()), keys);
    the_index_never_misses_a_live_session(store).await;
}

/// An owner change whose final save's reply is lost: the retry recognises its own write
/// (`Saved`), and the session is in its new owner's list (its entry was written before either
/// attempt). The first script's "owner differs" answer wrote nothing, so the save after the
/// index add is a first save.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_owner_change_whose_save_reply_was_lost_is_saved_and_listed() {
    let server = RedisServer::start().await;
    let proxy = ReplyDroppingProxy::start(server.addr()).await;
    let through_proxy = RedisStore::open(format!("redis://{}", proxy.addr))
        .await
        .unwrap();
    let direct = RedisStore::open(server.url()).await.unwrap();
    let (me, other) = (owner_name("before"), owner_name("after"));
    let key = new_key();
    let exp = now_ms() + 60_000;
    direct.create(&owned_at_ms(key, &me, 5, exp)).await.unwrap();
    // The save told not to check the owner: its `EVALSHA` holds `1` twice (the key count and
    // the flag); the first, checking one holds `0` as its flag, the add script `1` once.
    proxy.arm(|b| {
        has(b, b"*8\r\n$7\r\nEVALSHA\r\n")
            && b.windows(7).filter(|w| w == b"$1\r\n1\r\n").count() == 2
    });
    let task = {
        let (store, rec) = (through_proxy.clone(), owned_at_ms(key, &other, 6, exp));
        tokio::spawn(async move { store.save(&rec, 5).await })
    };
    proxy.caught().await;
    proxy.release();
    let saved = tokio::time::timeout(Duration::from_secs(10), task)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(saved.unwrap(), SaveOutcome::Saved);
    assert!(!proxy.is_armed());
    let back = direct.load(&key).await.unwrap().unwrap();
    assert_eq!((back.version(), back.owner()), (6, Some(other.as_str())));
    assert_eq!(
        listed_keys(&direct.owned(&other).await.unwrap()),
        [key].into()
    );
    assert!(direct.owned(&me).await.unwrap().is_empty());
}

/// Several requests polled together by one task (`join_all`, `FuturesUnordered`) or by a task
/// each, their commands or replies tens of kilobytes: each is answered, with its own data, well
/// within the command timeout (the store's own connection once left some waiting past it: a
/// request woken to take over the socket's registration returned without registering).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_requests_polled_by_one_task_are_answered() {
    use futures_util::StreamExt;
    use futures_util::future::join_all;
    use futures_util::stream::FuturesUnordered;

    let (store, _server) = single_node().await;
    let store = &store;
    let data = |i: usize, len: usize| {
        let mut v = vec![b"abcdefghijklmnopqrstuvwxyz"[i % 26]; len];
        v[..i.to_string().len()].copy_from_slice(i.to_string().as_bytes());
        bytes::Bytes::from(v)
    };
    let patience = Duration::from_millis(1_500);
    for round in 0..3 {
        // Creates of 12 KB, together from one task.
        let small: Vec<_> = (0..16)
            .map(|i| record_at_ms(new_key(), data(i, 12 << 10), 1, now_ms() + 3_600_000))
            .collect();
        let created =
            tokio::time::timeout(patience, join_all(small.iter().map(|r| store.create(r))))
                .await
                .unwrap_or_else(|_| {
                    panic!("round {round}: creates of 12 KB polled by one task hung")
                });
        for c in created {
            c.unwrap();
        }
        let small: Vec<_> = (0..16)
            .map(|i| record_at_ms(new_key(), data(i, 12 << 10), 1, now_ms() + 3_600_000))
            .collect();
        let mut running: FuturesUnordered<_> = small.iter().map(|r| store.create(r)).collect();
        tokio::time::timeout(patience, async {
            while let Some(created) = running.next().await {
                created.unwrap();
            }
        })
        .await
        .unwrap_or_else(|_| panic!("round {round}: creates of 12 KB by FuturesUnordered hung"));
        for rec in &small {
            assert_eq!(
                store.load(&rec.key()).await.unwrap().unwrap().data(),
                rec.data()
            );
        }
        // Loads of 40 KB, together from one task (`join_all`, then `FuturesUnordered`).
        let large: Vec<_> = (0..16)
            .map(|i| record_at_ms(new_key(), data(i, 40 << 10), 1, now_ms() + 3_600_000))
            .collect();
        for rec in &large {
            store.create(rec).await.unwrap();
        }
        let loaded = tokio::time::timeout(
            patience,
            join_all(
                large
                    .iter()
                    .map(|r| async move { store.load(&r.key()).await }),
            ),
        )
        .await
        .unwrap_or_else(|_| panic!("round {round}: loads of 40 KB by join_all hung"));
        for (rec, got) in large.iter().zip(loaded) {
            assert_eq!(got.unwrap().unwrap().data(), rec.data());
        }
        let mut running: FuturesUnordered<_> = large
            .iter()
            .map(|r| async move { (r, store.load(&r.key()).await) })
            .collect();
        tokio::time::timeout(patience, async {
            while let Some((rec, got)) = running.next().await {
                assert_eq!(got.unwrap().unwrap().data(), rec.data());
            }
        })
        .await
        .unwrap_or_else(|_| panic!("round {round}: loads of 40 KB by FuturesUnordered hung"));
        // And from a task each (they stalled too, the command timeout not firing either).
        let tasks: Vec<_> = large
            .iter()
            .map(|rec| {
                let (store, rec) = (store.clone(), rec.clone());
                tokio::spawn(async move {
                    let got = tokio::time::timeout(patience, store.load(&rec.key())).await;
                    (rec, got)
                })
            })
            .collect();
        for task in tasks {
            let (rec, got) = task.await.unwrap();
            let got = got.unwrap_or_else(|_| panic!("round {round}: a spawned load of 40 KB hung"));
            assert_eq!(got.unwrap().unwrap().data(), rec.data());
        }
    }
}
