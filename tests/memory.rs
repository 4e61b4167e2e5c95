//! The memory store: the conformance suite, plus what is particular to it (its bounds and
//! what happens at them).

mod common;

use std::time::{Duration, SystemTime};

use bytes::Bytes;
use common::{Browser, Conn, new_key, serve};
use hyper::StatusCode;
use hyper_sessions::store::{CreateOutcome, Key, Record, SaveOutcome, SessionStore};
use hyper_sessions::{MemoryStore, SessionLayer};

#[allow(clippy::unused_async)] // the suite awaits every fixture
async fn fixture() -> (MemoryStore, ()) {
    (MemoryStore::default(), ())
}

conformance_suite!(fixture);

fn record(len: usize, version: u64, expires_at: SystemTime) -> Record {
    Record::new(new_key(), Bytes::from(vec![b'x'; len]), version, expires_at)
}

fn in_an_hour() -> SystemTime {
    SystemTime::now() + Duration::from_secs(3600)
}

/// Records of every size, and saves that make them larger: the bytes counted never exceed the
/// bound, and they are what the sessions held count for.
#[tokio::test]
async fn the_byte_bound_holds() {
    const MAX: usize = 256 << 10;
    let store = MemoryStore::builder().max_bytes(MAX).build();
    let mut held = Vec::new();
    let mut seed = 7_u64;
    for i in 0..3_000 {
        seed = seed.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
        let len = usize::try_from(seed >> 51).unwrap(); // up to 8 KiB
        if i % 3 == 2 {
            // A save that changes the size of a session created earlier, if still there.
            let (id, version): (Key, u64) = held[i / 2];
            let rec = Record::new(
                id,
                Bytes::from(vec![b'y'; 2 * len]),
                version + 1,
                in_an_hour(),
            );
            if store.save(&rec, version).await.unwrap() == SaveOutcome::Saved {
                held[i / 2].1 = version + 1;
            }
        } else {
            let rec = record(len, 1, in_an_hour());
            assert_eq!(store.create(&rec).await.unwrap(), CreateOutcome::Created);
            held.push((rec.key(), 1));
        }
        assert!(store.bytes() <= MAX, "{} bytes held", store.bytes());
    }
    assert!(store.evictions() > 0);
    let mut counted = 0;
    for (id, _) in &held {
        if let Some(rec) = store.load(id).await.unwrap() {
            counted += rec.data().len() + MemoryStore::SESSION_OVERHEAD;
        }
    }
    assert_eq!(counted, store.bytes());
    assert!(store.bytes() > MAX / 2, "the store should be nearly full");
}

/// A flood of new sessions far beyond the bound: every one gets a 200, a user who keeps using
/// the site stays logged in, and so does one who came back once after logging in and then
/// went quiet for the whole flood. A visitor who never came back is what gets evicted.
#[tokio::test]
async fn a_flood_of_new_sessions_logs_nobody_out() {
    const MAX: usize = 64 << 10;
    const FLOOD: usize = 5_000;
    let store = MemoryStore::builder().max_bytes(MAX).build();
    let server = serve(&SessionLayer::new(store.clone())).await;

    let login = |mut b: Browser| async move {
        assert_eq!(b.get("/set/user?v=ada").await.status, StatusCode::OK);
        assert_eq!(b.get("/cycle").await.status, StatusCode::OK);
        b
    };
    let mut active = login(Browser::new(server.addr).await).await;
    let mut quiet = login(Browser::new(server.addr).await).await;
    assert_eq!(quiet.get("/get/user").await.body, "ada");
    let mut once = Browser::new(server.addr).await;
    assert_eq!(once.get("/counter").await.body, "1");
    let capacity = MAX / (MemoryStore::SESSION_OVERHEAD + 20);

    let mut flood = Conn::http1(server.addr).await;
    let mut count = 0;
    for i in 0..FLOOD {
        let r = flood.get("/counter", None).await;
        assert_eq!(r.status, StatusCode::OK, "flood request {i}");
        assert!(
            r.cookie_pair().is_some(),
            "flood request {i} got no session"
        );
        if i % 25 == 0 {
            let before = active.cookie.clone();
            count += 1;
            assert_eq!(
                active.get("/counter").await.body,
                count.to_string(),
                "the active user lost their session at flood request {i}"
            );
            assert_eq!(active.cookie, before);
        }
        assert!(store.bytes() <= MAX);
    }
    assert_eq!(active.get("/get/user").await.body, "ada");
    assert_eq!(
        quiet.get("/get/user").await.body,
        "ada",
        "a quiet logged-in user was logged out by the flood"
    );
    assert_eq!(
        once.get("/counter").await.body,
        "1",
        "a session never used after its first request goes first"
    );
    assert!(store.len() <= capacity + 10, "{} sessions", store.len());
    assert!(
        store.evictions() >= u64::try_from(FLOOD - capacity).unwrap(),
        "{} evictions",
        store.evictions()
    );
}

/// At the session bound a newcomer gets a session (not a 503) and a session that was not used
/// since it was last passed over makes room; the others keep working.
#[tokio::test]
async fn the_session_bound_evicts_instead_of_refusing() {
    // One shard, so the bound of four is exact (with shards, each holds an equal part).
    let store = MemoryStore::builder().max_sessions(4).shards(1).build();
    let server = serve(&SessionLayer::new(store.clone())).await;
    let mut users = Vec::new();
    for _ in 0..4 {
        let mut b = Browser::new(server.addr).await;
        assert_eq!(b.get("/counter").await.body, "1");
        assert_eq!(b.get("/counter").await.body, "2");
        users.push(b);
    }
    // Users 1 to 3 come back again; user 0 does not.
    for b in &mut users[1..] {
        assert_eq!(b.get("/counter").await.body, "3");
    }
    let mut extra = Browser::new(server.addr).await;
    let r = extra.get("/counter").await;
    assert_eq!(r.status, StatusCode::OK, "the bound refused a newcomer");
    assert_eq!(r.body, "1");
    assert_eq!(store.len(), 4);
    assert_eq!(store.evictions(), 1);
    for b in &mut users[1..] {
        assert_eq!(
            b.get("/counter").await.body,
            "4",
            "a recent user was evicted"
        );
    }
    assert_eq!(
        users[0].get("/counter").await.body,
        "1",
        "the evicted user starts afresh"
    );
}

/// An evicted record is gone like an expired one: not loaded, every conditional write on it
/// answers `Missing`, deleting it succeeds, and its id can be created again.
#[tokio::test]
async fn an_evicted_record_is_missing() {
    let store = MemoryStore::builder().max_sessions(2).shards(1).build();
    let a = record(10, 3, in_an_hour());
    store.create(&a).await.unwrap();
    store.create(&record(10, 1, in_an_hour())).await.unwrap();
    store.create(&record(10, 1, in_an_hour())).await.unwrap();
    assert_eq!(store.evictions(), 1);
    let id = a.key();
    assert!(store.load(&id).await.unwrap().is_none());
    let next = Record::new(id, Bytes::from_static(b"y"), 4, in_an_hour());
    assert_eq!(store.save(&next, 3).await.unwrap(), SaveOutcome::Missing);
    assert_eq!(
        store.touch(&id, 3, in_an_hour()).await.unwrap(),
        SaveOutcome::Missing
    );
    assert_eq!(store.remove(&id, 3).await.unwrap(), SaveOutcome::Missing);
    store.delete(&id).await.unwrap();
    assert!(
        store.load(&id).await.unwrap().is_none(),
        "save re-created it"
    );
    assert_eq!(store.create(&a).await.unwrap(), CreateOutcome::Created);
    assert_eq!(store.load(&id).await.unwrap().unwrap().version(), 3);
    assert_eq!(store.len(), 2);
}

/// At the bound, expired sessions make room before any live one is evicted, even live ones
/// that were never used again.
#[tokio::test]
async fn expired_sessions_are_evicted_first() {
    let store = MemoryStore::builder().max_sessions(8).shards(1).build();
    let mut live = Vec::new();
    for _ in 0..4 {
        let l = record(10, 1, in_an_hour());
        store.create(&l).await.unwrap();
        store
            .create(&record(
                10,
                1,
                SystemTime::now() + Duration::from_millis(20),
            ))
            .await
            .unwrap();
        live.push(l.key());
    }
    tokio::time::sleep(Duration::from_millis(40)).await;
    for _ in 0..4 {
        store.create(&record(10, 1, in_an_hour())).await.unwrap();
    }
    assert_eq!(store.len(), 8);
    assert_eq!(store.evictions(), 0, "a live session was evicted");
    for id in &live {
        assert!(store.load(id).await.unwrap().is_some());
    }
}

/// A record larger than a shard's part of the bound is refused as unavailable (a 503 through
/// the layer), evicting nothing; a smaller one still fits.
#[tokio::test]
async fn a_record_larger_than_the_bound_is_refused() {
    const MAX: usize = 64 << 10;
    const SMALL: usize = 16 << 10;
    let store = MemoryStore::builder().max_bytes(MAX).build();
    let others: Vec<Record> = (0..10).map(|_| record(100, 1, in_an_hour())).collect();
    for r in &others {
        store.create(r).await.unwrap();
    }
    let bytes = store.bytes();
    let err = store
        .create(&record(MAX, 1, in_an_hour()))
        .await
        .unwrap_err();
    assert!(err.is_unavailable(), "{err}");
    let err = store
        .save(
            &Record::new(others[0].key(), Bytes::from(vec![0; MAX]), 2, in_an_hour()),
            1,
        )
        .await
        .unwrap_err();
    assert!(err.is_unavailable(), "{err}");
    assert_eq!((store.bytes(), store.evictions()), (bytes, 0));
    assert_eq!(
        store
            .load(&others[0].key())
            .await
            .unwrap()
            .unwrap()
            .version(),
        1
    );

    // Through the layer, with a record limit above the store's bound (a smaller bound: the
    // value travels in the URL).
    let store = MemoryStore::builder().max_bytes(SMALL).build();
    let layer = SessionLayer::builder(store.clone())
        .max_record_bytes(1 << 20)
        .build()
        .unwrap();
    let server = serve(&layer).await;
    let mut b = Browser::new(server.addr).await;
    assert_eq!(b.get("/set/small?v=x").await.status, StatusCode::OK);
    let big = "y".repeat(SMALL);
    let r = b.get(&format!("/set/big?v={big}")).await;
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(b.get("/keys").await.body, "small");
    let fits = "z".repeat(SMALL / 2);
    assert_eq!(
        b.get(&format!("/set/big?v={fits}")).await.status,
        StatusCode::OK
    );
    assert!(store.bytes() <= SMALL);
}
