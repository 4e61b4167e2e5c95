//! `examples/bench_server.rs` as the benchmark runs it, a process of its own spoken to over
//! plain HTTP: lifecycle races driven with `/sleep/{ms}/{path}`, which parks a request between
//! its load and its commit while another request on the same session runs to completion. On
//! the memory store, and with the `redis` feature on a real `redis-server` started here (with
//! `postgres`, on a PostgreSQL started here).

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::servers::BenchServer;
use common::{Browser, Conn, Resp};
use hyper::StatusCode;

/// How long the parked request sleeps between its load and its commit.
const PARK_MS: u64 = 300;
/// How long the parked request is given to load before the other one is sent.
const LOAD_MS: u64 = 100;

/// Sends `/sleep/PARK_MS{parked}` with `cookie`, then, while it sleeps, `meanwhile` with the
/// same cookie; answers both responses once both are done.
async fn race(addr: SocketAddr, cookie: &str, parked: &str, meanwhile: &str) -> (Resp, Resp) {
    let start = Instant::now();
    let first = {
        let (cookie, parked) = (cookie.to_owned(), format!("/sleep/{PARK_MS}{parked}"));
        tokio::spawn(async move { Conn::http1(addr).await.get(&parked, Some(&cookie)).await })
    };
    tokio::time::sleep(Duration::from_millis(LOAD_MS)).await;
    let second = Conn::http1(addr).await.get(meanwhile, Some(cookie)).await;
    // Otherwise the parked request may have committed first, and there was no race.
    assert!(
        start.elapsed() < Duration::from_millis(PARK_MS),
        "`{meanwhile}` took until {:?} after `{parked}` was sent, past its {PARK_MS} ms sleep",
        start.elapsed()
    );
    (first.await.unwrap(), second)
}

/// A browser holding a session with these values (`/set/...` paths).
async fn session_with(addr: SocketAddr, sets: &[&str]) -> Browser {
    let mut browser = Browser::new(addr).await;
    for set in sets {
        let resp = browser.get(set).await;
        assert_eq!((resp.status, resp.body.as_str()), (StatusCode::OK, "ok"));
    }
    assert!(browser.cookie.is_some(), "no session cookie after {sets:?}");
    browser
}

/// `/sleep/300/cycle` racing `/destroy`: the cycle fails as gone (the layer's default error
/// handler answers 500 for it) and hands out no cookie, and neither the old cookie nor any the
/// cycle answered with carries data.
async fn cycle_racing_destroy_stays_destroyed(addr: SocketAddr) {
    let browser = session_with(addr, &["/set/user?v=ada"]).await;
    let cookie = browser.cookie.clone().unwrap();
    let (cycle, destroy) = race(addr, &cookie, "/cycle", "/destroy").await;
    assert_eq!(
        (destroy.status, destroy.body.as_str()),
        (StatusCode::OK, "ok")
    );
    assert!(destroy.removes_cookie(), "{destroy:?}");
    for pair in std::iter::once(cookie.clone()).chain(cycle.cookie_pair()) {
        let mut after = Browser::with_cookie(addr, &pair).await;
        let keys = after.get("/keys").await;
        assert_eq!(
            (keys.status, keys.body.as_str()),
            (StatusCode::OK, ""),
            "the destroyed session came back under {pair}"
        );
        assert_eq!(after.get("/get/user").await.status, StatusCode::NOT_FOUND);
    }
    assert_eq!(
        (cycle.status, cycle.body.as_str()),
        (StatusCode::INTERNAL_SERVER_ERROR, ""),
        "a cycle racing a destroy was not failed as gone"
    );
    assert!(cycle.set_cookies().is_empty(), "{cycle:?}");
}

/// `/sleep/300/remove/a` on a session holding only `a`, racing `/set/b`: the remove is replayed
/// on the session holding `a` and `b`, which is left holding `b` (not emptied, deleted, or
/// its cookie removed).
async fn remove_racing_a_set_keeps_the_set(addr: SocketAddr) {
    let mut browser = session_with(addr, &["/set/a"]).await;
    let cookie = browser.cookie.clone().unwrap();
    let (remove, set) = race(addr, &cookie, "/remove/a", "/set/b").await;
    assert_eq!((set.status, set.body.as_str()), (StatusCode::OK, "ok"));
    assert_eq!(
        (remove.status, remove.body.as_str()),
        (StatusCode::OK, "ok"),
        "{remove:?}"
    );
    assert!(
        remove.set_cookies().is_empty(),
        "the remove touched the cookie: {remove:?}"
    );
    assert_eq!(
        browser.get("/keys").await.body,
        "b",
        "the remove lost the concurrent set"
    );
    assert_eq!(browser.get("/get/b").await.body, "1");
    assert_eq!(browser.cookie.as_deref(), Some(cookie.as_str()));
}

/// The owner endpoints: two sessions of one owner list each other (`/sessions`, the asker
/// marked current), `/revoke-others` from one of them while the other's `/sleep/300/set/late`
/// is parked: the parked write fails as gone, and the revoked session comes back empty.
async fn revoke_racing_a_parked_write_stays_revoked(addr: SocketAddr) {
    let owner = format!("owner-{}", std::process::id());
    let mut laptop = session_with(addr, &[&format!("/owner/{owner}?label=laptop")]).await;
    let phone = session_with(addr, &[&format!("/owner/{owner}?label=phone"), "/set/a"]).await;
    let list: Vec<serde_json::Value> =
        serde_json::from_str(&laptop.get("/sessions").await.body).unwrap();
    assert_eq!(list.len(), 2, "{list:?}");
    assert!(
        list.iter()
            .any(|s| s["label"] == "laptop" && s["current"] == true)
    );
    assert!(
        list.iter()
            .any(|s| s["label"] == "phone" && s["current"] == false)
    );
    let phone_cookie = phone.cookie.clone().unwrap();
    let start = Instant::now();
    let parked = tokio::spawn(async move {
        let path = format!("/sleep/{PARK_MS}/set/late");
        Conn::http1(addr)
            .await
            .get(&path, Some(&phone_cookie))
            .await
    });
    tokio::time::sleep(Duration::from_millis(LOAD_MS)).await;
    assert_eq!(laptop.get("/revoke-others").await.body, "1");
    assert!(
        start.elapsed() < Duration::from_millis(PARK_MS),
        "no race: the revocation was late"
    );
    let late = parked.await.unwrap();
    assert_eq!(
        (late.status, late.body.as_str()),
        (StatusCode::INTERNAL_SERVER_ERROR, "")
    );
    let mut phone = Browser::with_cookie(addr, phone.cookie.as_deref().unwrap()).await;
    assert_eq!(
        phone.get("/keys").await.body,
        "",
        "the revoked session came back"
    );
    assert_eq!(phone.get("/sessions").await.body, "[]");
    let list: Vec<serde_json::Value> =
        serde_json::from_str(&laptop.get("/sessions").await.body).unwrap();
    assert_eq!(list.len(), 1, "{list:?}");
    let handle = list[0]["handle"].as_str().unwrap().to_owned();
    assert_eq!(
        laptop.get("/revoke/0000000000000000").await.status,
        StatusCode::NOT_FOUND
    );
    assert_eq!(laptop.get(&format!("/revoke/{handle}")).await.body, "ok");
    assert_eq!(laptop.get("/sessions").await.body, "[]");
}

mod memory {
    use super::BenchServer;

    async fn server() -> BenchServer {
        BenchServer::start(&["--store", "memory"]).await
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn cycle_racing_destroy_stays_destroyed() {
        let server = server().await;
        super::cycle_racing_destroy_stays_destroyed(server.addr()).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn remove_racing_a_set_keeps_the_set() {
        let server = server().await;
        super::remove_racing_a_set_keeps_the_set(server.addr()).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn revoke_racing_a_parked_write_stays_revoked() {
        let server = server().await;
        super::revoke_racing_a_parked_write_stays_revoked(server.addr()).await;
    }
}

#[cfg(feature = "redis")]
mod redis {
    use crate::common::servers::RedisServer;

    use super::BenchServer;

    /// A fresh `redis-server`, and `bench_server --store redis` on it.
    async fn servers() -> (BenchServer, RedisServer) {
        let redis = RedisServer::start().await;
        let bench = BenchServer::start(&["--store", "redis", "--redis", &redis.url()]).await;
        (bench, redis)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn cycle_racing_destroy_stays_destroyed() {
        let (bench, redis) = servers().await;
        super::cycle_racing_destroy_stays_destroyed(bench.addr()).await;
        // Nor under an id nobody was told: the record the cycle created was deleted too.
        assert_eq!(
            redis.cli(&["dbsize"]).await.trim(),
            "0",
            "a record of the destroyed session is left in Redis"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn remove_racing_a_set_keeps_the_set() {
        let (bench, _redis) = servers().await;
        super::remove_racing_a_set_keeps_the_set(bench.addr()).await;
    }
}

#[cfg(feature = "postgres")]
mod postgres {
    use crate::common::servers::PostgresServer;

    use super::BenchServer;

    /// A fresh PostgreSQL, and `bench_server --store postgres` on it.
    async fn servers() -> (BenchServer, PostgresServer) {
        let postgres = PostgresServer::start().await;
        let bench =
            BenchServer::start(&["--store", "postgres", "--postgres", &postgres.url()]).await;
        (bench, postgres)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn cycle_racing_destroy_stays_destroyed() {
        let (bench, postgres) = servers().await;
        super::cycle_racing_destroy_stays_destroyed(bench.addr()).await;
        // Nor under an id nobody was told: the record the cycle created was deleted too.
        let rows: i64 = postgres
            .client("postgres")
            .await
            .query_one("SELECT count(*) FROM bench_sessions", &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(
            rows, 0,
            "a record of the destroyed session is left in PostgreSQL"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn remove_racing_a_set_keeps_the_set() {
        let (bench, _postgres) = servers().await;
        super::remove_racing_a_set_keeps_the_set(bench.addr()).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn revoke_racing_a_parked_write_stays_revoked() {
        let (bench, _postgres) = servers().await;
        super::revoke_racing_a_parked_write_stays_revoked(bench.addr()).await;
    }
}
