//! The store conformance suite: every store runs all of it through `conformance_suite!`.
//!
//! The first half calls the `SessionStore` contract directly; the second half drives the
//! session layer over real HTTP on top of the store, so the promises of the middleware (no lost
//! updates, destroy wins, expiry, corrupt records) are checked on every store.

use std::collections::BTreeSet;
use std::time::{Duration, SystemTime};

use super::new_key;
use super::{ExpiresMs, unix_ms};
use bytes::Bytes;
use hyper::StatusCode;
use hyper_sessions::store::{CreateOutcome, Key, Record, SaveOutcome, SessionStore};
use hyper_sessions::{Expiry, Id, SessionLayer};

// The suite's other half; unused by the test binaries that do not run the suite.
#[allow(unused_imports)]
pub use super::lifecycle::*;
#[allow(unused_imports)]
pub use super::model::model_check;
use super::{Browser, Conn, serve};

/// Expands to one `#[tokio::test]` per conformance check. `$fixture` is an async fn returning
/// `(store, guard)`: a fresh store, and whatever keeps its server alive.
#[macro_export]
macro_rules! conformance_suite {
    ($fixture:path) => {
        $crate::conformance_suite!(@tests $fixture;
            round_trip, load_missing, expired_records_are_never_returned, delete,
            create_never_overwrites, create_replaces_expired, compare_and_set,
            save_never_recreates, touch_is_conditional, remove_is_conditional, concurrent_compare_and_set, large_and_awkward_records,
            cookie_lifecycle, counter_and_read, flash_lives_for_one_read, destroy_removes_everything,
            cycle_id_moves_the_data, unknown_and_corrupt_ids_start_fresh,
            concurrent_updates_are_all_counted, concurrent_writers_keep_distinct_keys,
            write_racing_destroy_stays_destroyed, emptied_session_is_deleted,
            idle_expiry_slides_on_reads, absolute_lifetime_caps_activity, too_large_is_refused,
            emptying_keeps_a_concurrent_write, cycle_racing_destroy_stays_destroyed,
            cycle_keeps_a_concurrent_write, own_shorter_expiry_survives_reads,
            sliding_reads_resend_the_cookie, replayed_flash_read_keeps_a_newer_flash,
            pre_login_cookie_never_logs_out, refresh_never_overwrites_a_concurrent_expiry,
            absolute_lifetime_caps_older_sessions, reset_expiry_undoes_remember_me, model_check);
    };
    (@tests $fixture:path; $($name:ident),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() {
                let (store, _guard) = $fixture().await;
                $crate::common::conformance::$name(store).await;
            }
        )*
    };
}

fn in_ms(ms: u64) -> SystemTime {
    SystemTime::now() + Duration::from_millis(ms)
}

fn record(key: Key, data: &str, version: u64, expires_at: SystemTime) -> Record {
    Record::new(key, Bytes::from(data.to_owned()), version, expires_at)
}

const DATA: &str = r#"{"d":{"count":1}}"#;

// ---- the store contract, called directly ----

pub async fn round_trip<S: SessionStore>(store: S) {
    let key = new_key();
    let expires = in_ms(60_000);
    let rec = record(key, DATA, 1, expires);
    assert_eq!(store.create(&rec).await.unwrap(), CreateOutcome::Created);
    let back = store
        .load(&key)
        .await
        .unwrap()
        .expect("created record loads");
    assert_eq!(back.key(), key);
    assert_eq!(back.data(), rec.data());
    assert_eq!(back.version(), 1);
    // Stores may keep millisecond precision.
    assert_eq!(back.expires_at_unix_ms(), rec.expires_at_unix_ms());
}

pub async fn load_missing<S: SessionStore>(store: S) {
    assert!(store.load(&new_key()).await.unwrap().is_none());
}

pub async fn expired_records_are_never_returned<S: SessionStore>(store: S) {
    let key = new_key();
    store
        .create(&record(key, DATA, 1, in_ms(300)))
        .await
        .unwrap();
    assert!(store.load(&key).await.unwrap().is_some());
    tokio::time::sleep(Duration::from_millis(450)).await;
    assert!(
        store.load(&key).await.unwrap().is_none(),
        "expired record returned"
    );
    // Saving or touching an expired record must not revive it.
    let next = record(key, DATA, 2, in_ms(60_000));
    assert_eq!(store.save(&next, 1).await.unwrap(), SaveOutcome::Missing);
    assert_eq!(
        store.touch(&key, 1, in_ms(60_000)).await.unwrap(),
        SaveOutcome::Missing
    );
    assert!(store.load(&key).await.unwrap().is_none());
}

pub async fn delete<S: SessionStore>(store: S) {
    let key = new_key();
    store
        .create(&record(key, DATA, 1, in_ms(60_000)))
        .await
        .unwrap();
    let other = new_key();
    store
        .create(&record(other, DATA, 1, in_ms(60_000)))
        .await
        .unwrap();
    store.delete(&key).await.unwrap();
    assert!(store.load(&key).await.unwrap().is_none());
    assert!(
        store.load(&other).await.unwrap().is_some(),
        "delete removed another record"
    );
    // Deleting what is not there succeeds.
    store.delete(&key).await.unwrap();
    store.delete(&new_key()).await.unwrap();
}

pub async fn create_never_overwrites<S: SessionStore>(store: S) {
    let key = new_key();
    store
        .create(&record(key, DATA, 1, in_ms(60_000)))
        .await
        .unwrap();
    let intruder = record(key, r#"{"d":{"admin":true}}"#, 1, in_ms(60_000));
    assert_eq!(
        store.create(&intruder).await.unwrap(),
        CreateOutcome::IdTaken
    );
    let back = store.load(&key).await.unwrap().unwrap();
    assert_eq!(back.data(), &Bytes::from(DATA));
}

pub async fn create_replaces_expired<S: SessionStore>(store: S) {
    let key = new_key();
    store
        .create(&record(key, DATA, 1, in_ms(200)))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(350)).await;
    let fresh = record(key, r#"{"d":{"new":1}}"#, 1, in_ms(60_000));
    assert_eq!(store.create(&fresh).await.unwrap(), CreateOutcome::Created);
    assert_eq!(
        store.load(&key).await.unwrap().unwrap().data(),
        fresh.data()
    );
}

pub async fn compare_and_set<S: SessionStore>(store: S) {
    let key = new_key();
    store
        .create(&record(key, DATA, 1, in_ms(60_000)))
        .await
        .unwrap();
    let stale = record(key, r#"{"d":{"count":9}}"#, 6, in_ms(60_000));
    assert_eq!(store.save(&stale, 5).await.unwrap(), SaveOutcome::Conflict);
    assert_eq!(
        store.load(&key).await.unwrap().unwrap().data(),
        &Bytes::from(DATA)
    );
    let next = record(key, r#"{"d":{"count":2}}"#, 2, in_ms(120_000));
    assert_eq!(store.save(&next, 1).await.unwrap(), SaveOutcome::Saved);
    let back = store.load(&key).await.unwrap().unwrap();
    assert_eq!(back.version(), 2);
    assert_eq!(back.data(), next.data());
    assert_eq!(back.expires_at_unix_ms(), next.expires_at_unix_ms());
    // The old version no longer matches.
    assert_eq!(store.save(&next, 1).await.unwrap(), SaveOutcome::Conflict);
}

pub async fn save_never_recreates<S: SessionStore>(store: S) {
    let key = new_key();
    let rec = record(key, DATA, 2, in_ms(60_000));
    assert_eq!(store.save(&rec, 1).await.unwrap(), SaveOutcome::Missing);
    assert!(store.load(&key).await.unwrap().is_none());
    store
        .create(&record(key, DATA, 1, in_ms(60_000)))
        .await
        .unwrap();
    store.delete(&key).await.unwrap();
    assert_eq!(store.save(&rec, 1).await.unwrap(), SaveOutcome::Missing);
    assert!(
        store.load(&key).await.unwrap().is_none(),
        "save brought a deleted record back"
    );
}

pub async fn touch_is_conditional<S: SessionStore>(store: S) {
    let key = new_key();
    store
        .create(&record(key, DATA, 1, in_ms(300)))
        .await
        .unwrap();
    let later = in_ms(60_000);
    // At another version: nothing moves.
    assert_eq!(
        store.touch(&key, 2, later).await.unwrap(),
        SaveOutcome::Conflict
    );
    assert!(
        store
            .load(&key)
            .await
            .unwrap()
            .unwrap()
            .expires_at_unix_ms()
            < unix_ms(later)
    );
    assert_eq!(
        store.touch(&key, 1, later).await.unwrap(),
        SaveOutcome::Saved
    );
    tokio::time::sleep(Duration::from_millis(450)).await;
    let back = store
        .load(&key)
        .await
        .unwrap()
        .expect("touch extended the record");
    assert_eq!(back.version(), 1, "touch must not change the version");
    assert_eq!(back.data(), &Bytes::from(DATA));
    assert_eq!(back.expires_at_unix_ms(), unix_ms(later));
    assert_eq!(
        store.touch(&new_key(), 1, later).await.unwrap(),
        SaveOutcome::Missing
    );
    // A save moves the version: a touch at the old one is refused and keeps the save's expiry.
    let saved_expiry = in_ms(30_000);
    let next = record(key, DATA, 2, saved_expiry);
    assert_eq!(store.save(&next, 1).await.unwrap(), SaveOutcome::Saved);
    assert_eq!(
        store.touch(&key, 1, in_ms(90_000)).await.unwrap(),
        SaveOutcome::Conflict
    );
    assert_eq!(
        store
            .load(&key)
            .await
            .unwrap()
            .unwrap()
            .expires_at_unix_ms(),
        unix_ms(saved_expiry)
    );
    // An expired record is not revived.
    let short = new_key();
    store
        .create(&record(short, DATA, 1, in_ms(100)))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(250)).await;
    assert_eq!(
        store.touch(&short, 1, in_ms(60_000)).await.unwrap(),
        SaveOutcome::Missing
    );
    assert!(store.load(&short).await.unwrap().is_none());
}

pub async fn remove_is_conditional<S: SessionStore>(store: S) {
    let key = new_key();
    store
        .create(&record(key, DATA, 1, in_ms(60_000)))
        .await
        .unwrap();
    let next = record(key, r#"{"d":{"count":2}}"#, 2, in_ms(60_000));
    assert_eq!(store.save(&next, 1).await.unwrap(), SaveOutcome::Saved);
    // A removal at the version it saw never removes a newer one.
    assert_eq!(store.remove(&key, 1).await.unwrap(), SaveOutcome::Conflict);
    assert_eq!(store.load(&key).await.unwrap().unwrap().version(), 2);
    assert_eq!(store.remove(&key, 2).await.unwrap(), SaveOutcome::Saved);
    assert!(store.load(&key).await.unwrap().is_none());
    assert_eq!(store.remove(&key, 2).await.unwrap(), SaveOutcome::Missing);
    assert_eq!(
        store.remove(&new_key(), 1).await.unwrap(),
        SaveOutcome::Missing
    );
    // Nor does it create anything, or touch another record.
    let other = new_key();
    store
        .create(&record(other, DATA, 1, in_ms(60_000)))
        .await
        .unwrap();
    assert_eq!(store.remove(&key, 1).await.unwrap(), SaveOutcome::Missing);
    assert!(store.load(&other).await.unwrap().is_some());
    // An expired record is Missing, whatever its version.
    let short = new_key();
    store
        .create(&record(short, DATA, 1, in_ms(100)))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(250)).await;
    assert_eq!(store.remove(&short, 1).await.unwrap(), SaveOutcome::Missing);
}

pub async fn concurrent_compare_and_set<S: SessionStore + Clone>(store: S) {
    let key = new_key();
    store
        .create(&record(key, DATA, 1, in_ms(60_000)))
        .await
        .unwrap();
    let mut tasks = Vec::new();
    for i in 0..32 {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            let rec = record(key, &format!(r#"{{"d":{{"w":{i}}}}}"#), 2, in_ms(60_000));
            store.save(&rec, 1).await.unwrap()
        }));
    }
    let mut saved = 0;
    for t in tasks {
        if t.await.unwrap() == SaveOutcome::Saved {
            saved += 1;
        }
    }
    assert_eq!(saved, 1, "exactly one compare-and-set may win");
    assert_eq!(store.load(&key).await.unwrap().unwrap().version(), 2);
}

pub async fn large_and_awkward_records<S: SessionStore>(store: S) {
    let awkward = serde_json::json!({"d": {
        "path": "/a/b?c=d&e=%2F#frag",
        "quotes": "\"'`",
        "lines": "a\nb\r\nc\t",
        "unicode": "zürich 東京 🦀 \u{0}",
        "big": "x".repeat(1 << 20),
    }})
    .to_string();
    let key = new_key();
    let rec = record(key, &awkward, 1, in_ms(60_000));
    store.create(&rec).await.unwrap();
    let back = store.load(&key).await.unwrap().unwrap();
    assert!(
        back.data() == rec.data(),
        "record did not round-trip byte for byte"
    );
}

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
