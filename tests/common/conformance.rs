//! The store conformance suite: every store runs all of it through `conformance_suite!`.
//!
//! The first half calls the `SessionStore` contract directly; the second half drives the
//! session layer over real HTTP on top of the store, so the promises of the middleware (no lost
//! updates, destroy wins, expiry, corrupt records) are checked on every store.

use std::collections::BTreeSet;
use std::time::{Duration, SystemTime};

use super::ExpiresMs;
use bytes::Bytes;
use hyper::StatusCode;
use hyper_sessions::store::{Key, Record, SessionStore};
use hyper_sessions::{Expiry, Id, SessionLayer};

// The suite's other half; unused by the test binaries that do not run the suite.
#[allow(unused_imports)]
pub use super::lifecycle::*;
#[allow(unused_imports)]
pub use super::model::model_check;
#[allow(unused_imports)]
pub use super::owners::*;
use super::{Browser, Conn, serve};

/// The store contract's checks (`src/testing.rs`, the `testing` feature's module), included as
/// they are: the suite runs exactly what third-party store authors run.
#[path = "../../src/testing.rs"]
pub mod contract;

/// Calls `$callback!{ $($args)* [checks] }` with the checks of the session layer over HTTP
/// that every server stack runs: the one list of them.
#[macro_export]
macro_rules! layer_checks {
    ($($callback:ident)::+! { $($args:tt)* }) => {
        $($callback)::+! { $($args)* [
            cookie_lifecycle, counter_and_read, flash_lives_for_one_read,
            destroy_removes_everything, cycle_id_moves_the_data,
            unknown_and_corrupt_ids_start_fresh, concurrent_updates_are_all_counted,
            concurrent_writers_keep_distinct_keys, write_racing_destroy_stays_destroyed,
            emptied_session_is_deleted, idle_expiry_slides_on_reads,
            absolute_lifetime_caps_activity, too_large_is_refused,
        ] }
    };
}

/// Calls `$callback!{ $($args)* [checks] }` with the lifecycle races (`lifecycle.rs`) and the
/// model check (`model.rs`): the one list of them.
#[macro_export]
macro_rules! lifecycle_checks {
    ($($callback:ident)::+! { $($args:tt)* }) => {
        $($callback)::+! { $($args)* [
            emptying_keeps_a_concurrent_write, cycle_racing_destroy_stays_destroyed,
            cycle_keeps_a_concurrent_write, own_shorter_expiry_survives_reads,
            sliding_reads_resend_the_cookie, replayed_flash_read_keeps_a_newer_flash,
            pre_login_cookie_never_logs_out, refresh_never_overwrites_a_concurrent_expiry,
            absolute_lifetime_caps_older_sessions, reset_expiry_undoes_remember_me, model_check,
        ] }
    };
}

/// Calls `$callback!{ $($args)* [checks] }` with the checks of a user's sessions (`owners.rs`):
/// the one list of them.
#[macro_export]
macro_rules! owner_checks {
    ($($callback:ident)::+! { $($args:tt)* }) => {
        $($callback)::+! { $($args)* [
            owner_lists_and_revokes_sessions, owner_survives_cycle_and_goes_with_clear,
            revoked_session_racing_a_write_stays_revoked,
            revoked_session_racing_a_cycle_stays_revoked,
            listing_misses_no_session_being_written, owners_cost_no_store_calls,
        ] }
    };
}

/// The whole suite on a store: the contract's checks (one test), and one `#[tokio::test]` per
/// check of the layer over HTTP and per lifecycle race. `$fixture` is an async fn returning
/// `(store, guard)`: a fresh store, and whatever keeps its server alive.
#[macro_export]
macro_rules! conformance_suite {
    ($fixture:path) => {
        #[test]
        fn every_check_is_listed() {
            $crate::common::conformance::every_check_is_listed();
        }
        $crate::conformance_suite!(@contract $fixture);
        $crate::layer_checks!($crate::conformance_suite! { @tests $fixture; });
        $crate::lifecycle_checks!($crate::conformance_suite! { @tests $fixture; });
        $crate::owner_checks!($crate::conformance_suite! { @tests $fixture; });
    };
    (@contract $fixture:path) => {
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn store_contract() {
            let (store, _guard) = $fixture().await;
            $crate::common::conformance::contract::check_store(store).await;
        }
    };
    (@tests $fixture:path; [$($name:ident),* $(,)?]) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() {
                let (store, _guard) = $fixture().await;
                $crate::common::conformance::$name(store).await;
            }
        )*
    };
}

/// The names of the checks in a list of `layer_checks!` or `lifecycle_checks!`.
macro_rules! check_names {
    ([$($name:ident),* $(,)?]) => {
        &[$(stringify!($name)),*]
    };
}

/// Every check written in this file, `lifecycle.rs` and `owners.rs` (a `pub async fn` taking a
/// store) is in one of the lists, so none is written and then never run.
pub fn every_check_is_listed() {
    let layer: &[&str] = layer_checks!(check_names! {});
    let lifecycle: &[&str] = lifecycle_checks!(check_names! {});
    let owners: &[&str] = owner_checks!(check_names! {});
    let sources = [
        include_str!("conformance.rs"),
        include_str!("lifecycle.rs"),
        include_str!("owners.rs"),
    ];
    for source in sources {
        for line in source.lines() {
            let Some(rest) = line.strip_prefix("pub async fn ") else {
                continue;
            };
            let name = rest.split(['<', '(']).next().unwrap_or_default();
            assert!(
                layer.contains(&name) || lifecycle.contains(&name) || owners.contains(&name),
                "the check `{name}` is in no list: add it to layer_checks!, lifecycle_checks! \
                 or owner_checks!"
            );
        }
    }
    assert!(lifecycle.contains(&"model_check"));
}

fn in_ms(ms: u64) -> SystemTime {
    SystemTime::now() + Duration::from_millis(ms)
}

fn record(key: Key, data: &str, version: u64, expires_at: SystemTime) -> Record {
    Record::new(key, Bytes::from(data.to_owned()), version, expires_at)
}

const DATA: &str = r#"{"d":{"count":1}}"#;

// ---- the session layer over HTTP, on this store ----

fn layer<S: SessionStore>(store: S) -> SessionLayer {
    SessionLayer::new(store)
}

async fn stored<S: SessionStore>(store: &S, browser: &Browser) -> Option<Record> {
    store.load(&browser.key()?).await.unwrap()
}

pub async fn cookie_lifecycle<S: SessionStore + Clone>(store: S) {
    let server = serve(&layer(store.clone())).await;
    let mut b = Browser::new(server.addr).await;
    let r = b.get("/untouched").await;
    assert_eq!(r.body, "ok");
    assert!(r.set_cookies().is_empty(), "untouched session set a cookie");
    let r = b.get("/read").await;
    assert_eq!(r.body, "0");
    assert!(
        r.set_cookies().is_empty(),
        "an empty new session is never saved"
    );
    let r = b.get("/counter").await;
    assert_eq!(r.body, "1");
    let cookie = r.session_cookie().expect("new session sets its cookie");
    for attr in [
        "HttpOnly",
        "SameSite=Lax",
        "Secure",
        "Path=/",
        "Max-Age=86400",
    ] {
        assert!(cookie.contains(attr), "{attr} missing from {cookie}");
    }
    assert_eq!(r.headers.get("vary").unwrap(), "Cookie");
    assert_eq!(r.headers.get("cache-control").unwrap(), "private");
    let id = b.id().expect("cookie holds a canonical id");
    assert_eq!(id.to_string().len(), 36);
    assert!(stored(&store, &b).await.is_some());
}

pub async fn counter_and_read<S: SessionStore + Clone>(store: S) {
    let server = serve(&layer(store.clone())).await;
    let mut b = Browser::new(server.addr).await;
    for n in 1..=5 {
        assert_eq!(b.get("/counter").await.body, n.to_string());
    }
    let r = b.get("/read").await;
    assert_eq!(r.body, "5");
    assert!(r.set_cookies().is_empty(), "a read re-sent the cookie");
    assert_eq!(b.get("/untouched").await.body, "ok");
    assert_eq!(stored(&store, &b).await.unwrap().version(), 5);
    // Typed values and key listing.
    b.get("/set/name?v=ada%20lovelace").await;
    assert_eq!(b.get("/get/name").await.body, "ada lovelace");
    assert_eq!(b.get("/get/missing").await.status, StatusCode::NOT_FOUND);
    assert_eq!(b.get("/keys").await.body, "count\nname");
    b.get("/remove/name").await;
    assert_eq!(b.get("/keys").await.body, "count");
}

pub async fn flash_lives_for_one_read<S: SessionStore + Clone>(store: S) {
    let server = serve(&layer(store)).await;
    let mut b = Browser::new(server.addr).await;
    b.get("/flash/notice?v=Saved!").await;
    // A request that does not read it keeps it (a redirect target that shows it later).
    assert_eq!(b.get("/keys").await.body, "notice");
    assert_eq!(b.get("/get/notice").await.body, "Saved!");
    assert_eq!(b.get("/get/notice").await.status, StatusCode::NOT_FOUND);
    // Overwritten by a plain insert, it stops being a flash.
    b.get("/flash/a?v=1").await;
    b.get("/set/a?v=2").await;
    assert_eq!(b.get("/get/a").await.body, "2");
    assert_eq!(b.get("/get/a").await.body, "2");
}

pub async fn destroy_removes_everything<S: SessionStore + Clone>(store: S) {
    let server = serve(&layer(store.clone())).await;
    let mut b = Browser::new(server.addr).await;
    b.get("/counter").await;
    let old = b.cookie.clone().unwrap();
    let old_id = b.id().unwrap();
    let r = b.get("/destroy").await;
    assert!(r.removes_cookie(), "destroy must remove the cookie");
    let removal = r.session_cookie().unwrap();
    for attr in [
        "HttpOnly",
        "SameSite=Lax",
        "Secure",
        "Path=/",
        "Max-Age=0",
        "Expires=",
    ] {
        assert!(
            removal.contains(attr),
            "removal cookie lacks {attr}: {removal}"
        );
    }
    assert!(
        store.load(&Key::of(old_id)).await.unwrap().is_none(),
        "record left in the store"
    );
    // Replaying the old cookie gives nothing back.
    let mut c = Conn::http1(server.addr).await;
    assert_eq!(c.get("/read", Some(&old)).await.body, "0");
    let r = c.get("/counter", Some(&old)).await;
    assert_eq!(r.body, "1");
    assert_ne!(r.cookie_pair().unwrap(), old, "a destroyed id was reused");
}

pub async fn cycle_id_moves_the_data<S: SessionStore + Clone>(store: S) {
    let server = serve(&layer(store.clone())).await;
    let mut b = Browser::new(server.addr).await;
    b.get("/counter").await;
    b.get("/counter").await;
    let old = b.cookie.clone().unwrap();
    let old_id = b.id().unwrap();
    let r = b.get("/cycle").await;
    let new = r.cookie_pair().expect("cycle sets a new cookie");
    assert_ne!(new, old);
    assert_eq!(
        b.get("/read").await.body,
        "2",
        "data kept across the new id"
    );
    assert!(
        store.load(&Key::of(old_id)).await.unwrap().is_none(),
        "old record not deleted"
    );
    let mut c = Conn::http1(server.addr).await;
    assert_eq!(
        c.get("/read", Some(&old)).await.body,
        "0",
        "old id still works"
    );
    assert_eq!(b.get("/id").await.body, b.id().unwrap().to_string());
}

pub async fn unknown_and_corrupt_ids_start_fresh<S: SessionStore + Clone>(store: S) {
    let server = serve(&layer(store.clone())).await;
    let mut c = Conn::http1(server.addr).await;
    // A well-formed id the store does not hold is never adopted.
    let planted = Id::random();
    let cookie = format!("id={planted}");
    let r = c.get("/counter", Some(&cookie)).await;
    assert_eq!(r.body, "1");
    let issued = r.cookie_pair().unwrap();
    assert_ne!(issued, cookie, "a client-chosen id was adopted");
    assert!(store.load(&Key::of(planted)).await.unwrap().is_none());
    // A record that is not a session payload: a fresh session, the record left alone.
    let corrupt = Id::random();
    store
        .create(&record(Key::of(corrupt), "{not json", 1, in_ms(60_000)))
        .await
        .unwrap();
    let cookie = format!("id={corrupt}");
    assert_eq!(c.get("/read", Some(&cookie)).await.status, StatusCode::OK);
    let r = c.get("/counter", Some(&cookie)).await;
    assert_eq!(r.body, "1");
    assert_ne!(r.cookie_pair().unwrap(), cookie);
    assert_eq!(
        store.load(&Key::of(corrupt)).await.unwrap().unwrap().data(),
        &Bytes::from("{not json"),
        "the corrupt record was overwritten"
    );
}

pub async fn concurrent_updates_are_all_counted<S: SessionStore + Clone>(store: S) {
    let server = serve(&layer(store)).await;
    let mut b = Browser::new(server.addr).await;
    b.get("/incr/n").await;
    let cookie = b.cookie.clone().unwrap();
    let mut tasks = Vec::new();
    for i in 0..64 {
        let cookie = cookie.clone();
        let addr = server.addr;
        tasks.push(tokio::spawn(async move {
            // Several HTTP/1.1 connections and HTTP/2 streams at once.
            let mut conn = if i % 2 == 0 {
                Conn::http1(addr).await
            } else {
                Conn::http2(addr).await
            };
            let r = conn.get("/incr/n", Some(&cookie)).await;
            assert_eq!(r.status, StatusCode::OK, "{r:?}");
            r.body.parse::<i64>().unwrap()
        }));
    }
    let mut seen = BTreeSet::new();
    for t in tasks {
        seen.insert(t.await.unwrap());
    }
    assert_eq!(b.get("/get/n").await.body, "65");
    // Each update returns the value it stored: all distinct.
    assert_eq!(
        seen.len(),
        64,
        "two updates returned the same value: {seen:?}"
    );

    // The same on one HTTP/2 connection carrying many streams at once.
    let h2 = Conn::http2(server.addr).await;
    let mut tasks = Vec::new();
    for _ in 0..32 {
        let cookie = cookie.clone();
        let mut stream = h2.share();
        tasks.push(tokio::spawn(async move {
            stream.get("/incr/n", Some(&cookie)).await.status
        }));
    }
    for t in tasks {
        assert_eq!(t.await.unwrap(), StatusCode::OK);
    }
    let mut h2 = h2;
    assert_eq!(h2.get("/get/n", Some(&cookie)).await.body, "97");
}

pub async fn concurrent_writers_keep_distinct_keys<S: SessionStore + Clone>(store: S) {
    let server = serve(&layer(store)).await;
    let mut b = Browser::new(server.addr).await;
    b.get("/counter").await;
    let cookie = b.cookie.clone().unwrap();
    let addr = server.addr;
    // A slow request loads the session, then writes `slow` after others have saved.
    let slow = {
        let cookie = cookie.clone();
        tokio::spawn(async move {
            Conn::http1(addr)
                .await
                .get("/sleep/300/set/slow", Some(&cookie))
                .await
        })
    };
    tokio::time::sleep(Duration::from_millis(50)).await;
    let mut fast = Vec::new();
    for i in 0..8 {
        let cookie = cookie.clone();
        fast.push(tokio::spawn(async move {
            Conn::http1(addr)
                .await
                .get(&format!("/set/k{i}"), Some(&cookie))
                .await
        }));
    }
    for f in fast {
        assert_eq!(f.await.unwrap().status, StatusCode::OK);
    }
    assert_eq!(slow.await.unwrap().status, StatusCode::OK);
    assert_eq!(
        b.get("/keys").await.body,
        "count\nk0\nk1\nk2\nk3\nk4\nk5\nk6\nk7\nslow",
        "a concurrent write was lost"
    );
}

pub async fn write_racing_destroy_stays_destroyed<S: SessionStore + Clone>(store: S) {
    let server = serve(&layer(store.clone())).await;
    let mut b = Browser::new(server.addr).await;
    b.get("/counter").await;
    let cookie = b.cookie.clone().unwrap();
    let id = b.id().unwrap();
    let addr = server.addr;
    let slow = {
        let cookie = cookie.clone();
        tokio::spawn(async move {
            Conn::http1(addr)
                .await
                .get("/sleep/300/set/late", Some(&cookie))
                .await
        })
    };
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(b.get("/destroy").await.removes_cookie());
    let late = slow.await.unwrap();
    assert_eq!(
        late.status,
        StatusCode::INTERNAL_SERVER_ERROR,
        "a lost write was reported as stored"
    );
    assert!(late.body.is_empty(), "error response leaked a body");
    // The destroying response removed the cookie; this one destroyed nothing, and must not
    // remove a cookie the browser may have been given since (a new login, say).
    assert!(
        late.set_cookies().is_empty(),
        "a request that destroyed nothing touched the cookie"
    );
    assert!(
        store.load(&Key::of(id)).await.unwrap().is_none(),
        "destroyed session came back"
    );
}

pub async fn emptied_session_is_deleted<S: SessionStore + Clone>(store: S) {
    let server = serve(&layer(store.clone())).await;
    let mut b = Browser::new(server.addr).await;
    b.get("/set/a").await;
    let id = b.id().unwrap();
    let r = b.get("/clear").await;
    assert!(r.removes_cookie());
    assert!(store.load(&Key::of(id)).await.unwrap().is_none());
    b.get("/set/a").await;
    let id = b.id().unwrap();
    let r = b.get("/remove/a").await;
    assert!(r.removes_cookie());
    assert!(store.load(&Key::of(id)).await.unwrap().is_none());
}

pub async fn idle_expiry_slides_on_reads<S: SessionStore + Clone>(store: S) {
    let layer = SessionLayer::builder(store.clone())
        .expiry(Expiry::OnInactivity(Duration::from_secs(1)))
        .build()
        .unwrap();
    let server = serve(&layer).await;
    let mut b = Browser::new(server.addr).await;
    b.get("/counter").await;
    let first = stored(&store, &b).await.unwrap().expires_at_unix_ms();
    // Reads alone keep the session alive past its first expiry.
    for _ in 0..6 {
        tokio::time::sleep(Duration::from_millis(250)).await;
        let r = b.get("/read").await;
        assert_eq!(r.body, "1", "an active reader was logged out");
        if let Some(c) = r.session_cookie() {
            assert!(
                c.contains("Max-Age="),
                "a refreshed cookie carries its new lifetime: {c}"
            );
        }
    }
    let rec = stored(&store, &b).await.unwrap();
    assert!(
        rec.expires_at_unix_ms() > first + 1000,
        "reads did not slide the expiry"
    );
    assert_eq!(
        rec.version(),
        1,
        "sliding on reads must not rewrite the record"
    );
    // Then idle past the window: gone.
    tokio::time::sleep(Duration::from_millis(1300)).await;
    assert_eq!(b.get("/read").await.body, "0");
}

pub async fn absolute_lifetime_caps_activity<S: SessionStore + Clone>(store: S) {
    let layer = SessionLayer::builder(store)
        .expiry(Expiry::OnInactivity(Duration::from_secs(3600)))
        .absolute_lifetime(Duration::from_millis(800))
        .build()
        .unwrap();
    let server = serve(&layer).await;
    let mut b = Browser::new(server.addr).await;
    b.get("/counter").await;
    for _ in 0..3 {
        tokio::time::sleep(Duration::from_millis(150)).await;
        b.get("/counter").await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        b.get("/read").await.body,
        "0",
        "the absolute lifetime was exceeded"
    );
}

pub async fn too_large_is_refused<S: SessionStore + Clone>(store: S) {
    let layer = SessionLayer::builder(store)
        .max_record_bytes(1000)
        .build()
        .unwrap();
    let server = serve(&layer).await;
    let mut b = Browser::new(server.addr).await;
    b.get("/set/small?v=x").await;
    let big = "y".repeat(2000);
    let r = b.get(&format!("/set/big?v={big}")).await;
    assert_eq!(r.status, StatusCode::INTERNAL_SERVER_ERROR);
    assert_eq!(
        b.get("/keys").await.body,
        "small",
        "the refused value was kept"
    );
}
