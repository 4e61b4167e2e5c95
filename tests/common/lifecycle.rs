//! The session lifecycle under concurrency, on every store: each check parks a request between
//! its load and its commit while others run to completion, then lets it finish.
//! Part of the conformance suite (`conformance_suite!` runs each on every store).

use std::time::{Duration, SystemTime};

use super::{ExpiresMs, unix_ms};
use hyper::StatusCode;
use hyper_sessions::store::{Key, SessionStore};
use hyper_sessions::{Expiry, SessionLayer};

use super::script::ScriptServer;
use super::{Browser, Observed};

fn cookie(browser: &Browser) -> String {
    browser
        .cookie
        .clone()
        .expect("the browser holds a session cookie")
}

fn now_ms() -> u64 {
    unix_ms(SystemTime::now())
}

async fn expires_ms<S: SessionStore>(store: &S, key: &Key) -> u64 {
    store
        .load(key)
        .await
        .unwrap()
        .expect("the session is stored")
        .expires_at_unix_ms()
}

/// Item 1: a request that empties the session, parked while another writes, keeps that write.
pub async fn emptying_keeps_a_concurrent_write<S: SessionStore + Clone>(store: S) {
    let server = ScriptServer::start(&SessionLayer::new(store.clone())).await;
    let mut browser = Browser::new(server.addr).await;
    browser.get("/set:a=1").await;
    let cookie = cookie(&browser);
    let (a, b) = server.race(&cookie, "/remove:a", "/set:b=2").await;
    assert_eq!(b.status, StatusCode::OK);
    assert_eq!(a.status, StatusCode::OK);
    assert!(
        a.set_cookies().is_empty(),
        "the emptying request touched the cookie: {a:?}"
    );
    assert_eq!(
        browser.get("/keys").await.body,
        "b",
        "a concurrent write was lost"
    );
    assert!(store.load(&browser.key().unwrap()).await.unwrap().is_some());
}

/// Item 2: `cycle_id` racing `destroy` never brings the session back under any id.
pub async fn cycle_racing_destroy_stays_destroyed<S: SessionStore + Clone>(store: S) {
    let store = Observed::new(store);
    let server = ScriptServer::start(&SessionLayer::new(store.clone())).await;
    let mut browser = Browser::new(server.addr).await;
    browser.get("/set:user=ada").await;
    let cookie = cookie(&browser);
    let (a, logout) = server
        .race(&cookie, "/get:user/cycle/set:logged_in=1", "/destroy")
        .await;
    assert_eq!(logout.status, StatusCode::OK);
    assert_eq!(
        a.status,
        StatusCode::INTERNAL_SERVER_ERROR,
        "a login racing a logout was reported as done"
    );
    assert!(a.set_cookies().is_empty(), "{a:?}");
    // Every id the layer ever created for this session: the original and the cycle's.
    let created = store.created_ids();
    assert_eq!(created.len(), 2, "{created:?}");
    for id in created {
        assert!(
            store.load(&id).await.unwrap().is_none(),
            "a destroyed session came back under an id"
        );
    }
}

/// Item 3: `cycle_id` keeps a write made on the old id while it was parked.
pub async fn cycle_keeps_a_concurrent_write<S: SessionStore + Clone>(store: S) {
    let server = ScriptServer::start(&SessionLayer::new(store.clone())).await;
    let mut browser = Browser::new(server.addr).await;
    browser.get("/set:user=ada").await;
    let (cookie, old) = (cookie(&browser), browser.key().unwrap());
    let (a, b) = server
        .race(&cookie, "/get:user/cycle/set:logged_in=1", "/set:b=2")
        .await;
    assert_eq!(b.status, StatusCode::OK);
    assert_eq!(a.status, StatusCode::OK, "{a:?}");
    let new_cookie = a.cookie_pair().expect("the cycle sent a new id");
    assert_ne!(new_cookie, cookie);
    let mut cycled = Browser::with_cookie(server.addr, &new_cookie).await;
    assert_eq!(
        cycled.get("/keys").await.body,
        "b,logged_in,user",
        "the cycle lost a concurrent write"
    );
    assert!(
        store.load(&old).await.unwrap().is_none(),
        "the old id still works"
    );
}

/// Item 4: a session's own, shorter idle window is kept by reads (the layer's is a day).
pub async fn own_shorter_expiry_survives_reads<S: SessionStore + Clone>(store: S) {
    let server = ScriptServer::start(&SessionLayer::new(store.clone())).await;
    let mut browser = Browser::new(server.addr).await;
    browser.get("/set:a=1/inactive:1000").await;
    for _ in 0..3 {
        tokio::time::sleep(Duration::from_millis(150)).await;
        assert_eq!(browser.get("/get:a").await.body, "1");
        let left = expires_ms(&store, &browser.key().unwrap())
            .await
            .saturating_sub(now_ms());
        assert!(left <= 1_000, "a read moved the expiry {left} ms ahead");
    }
    tokio::time::sleep(Duration::from_millis(1_300)).await;
    assert_eq!(
        browser.get("/get:a").await.body,
        "-",
        "an expired session served data"
    );
}

/// Item 5: when a read slides the server-side expiry, the persistent cookie follows it; when it
/// does not, no cookie is sent.
pub async fn sliding_reads_resend_the_cookie<S: SessionStore + Clone>(store: S) {
    let layer = SessionLayer::builder(store.clone())
        .expiry(Expiry::OnInactivity(Duration::from_secs(10)))
        .build()
        .unwrap();
    let server = ScriptServer::start(&layer).await;
    let mut browser = Browser::new(server.addr).await;
    browser.get("/set:a=1").await;
    let (mut resent, mut quiet) = (0, 0);
    for _ in 0..8 {
        tokio::time::sleep(Duration::from_millis(400)).await;
        let before = expires_ms(&store, &browser.key().unwrap()).await;
        let r = browser.get("/get:a").await;
        assert_eq!(r.body, "1");
        let after = expires_ms(&store, &browser.key().unwrap()).await;
        if let Some(c) = r.session_cookie() {
            resent += 1;
            assert!(
                after > before,
                "a cookie was re-sent without a refresh: {c}"
            );
            assert!(
                c.contains("Max-Age=10") || c.contains("Max-Age=9"),
                "the cookie's lifetime does not follow the store's: {c}"
            );
        } else {
            quiet += 1;
            assert_eq!(
                after, before,
                "the store's expiry moved but the cookie did not"
            );
        }
    }
    // A tenth of 10 s is 1 s: reads 400 ms apart refresh about every third time.
    assert!(resent >= 2 && quiet >= 2, "{resent} re-sent, {quiet} quiet");
}

/// Item 6: replaying a flash read removes that flash only, not a newer one.
pub async fn replayed_flash_read_keeps_a_newer_flash<S: SessionStore + Clone>(store: S) {
    let server = ScriptServer::start(&SessionLayer::new(store)).await;
    let mut browser = Browser::new(server.addr).await;
    browser.get("/flash:msg=old").await;
    let cookie = cookie(&browser);
    let (a, b) = server.race(&cookie, "/take:msg", "/flash:msg=new").await;
    assert_eq!(b.status, StatusCode::OK);
    assert_eq!((a.status, a.body.as_str()), (StatusCode::OK, "old"));
    assert_eq!(
        browser.get("/take:msg").await.body,
        "new",
        "a newer flash was eaten"
    );
    assert_eq!(
        browser.get("/take:msg").await.body,
        "-",
        "a flash was read twice"
    );
}

/// Item 7: a request still carrying the pre-login cookie never removes the browser's cookie.
pub async fn pre_login_cookie_never_logs_out<S: SessionStore + Clone>(store: S) {
    let server = ScriptServer::start(&SessionLayer::new(store)).await;
    let mut browser = Browser::new(server.addr).await;
    browser.get("/set:user=ada").await;
    let old = cookie(&browser);
    let r = browser.get("/cycle").await;
    assert!(r.cookie_pair().is_some(), "the cycle sent no new cookie");
    let mut stale = Browser::with_cookie(server.addr, &old).await;
    for path in ["/get:user", "/keys", "/remove:user"] {
        let r = stale.get(path).await;
        assert_eq!(r.status, StatusCode::OK);
        assert!(
            r.set_cookies().is_empty(),
            "{path} with the pre-login cookie touched the cookie: {r:?}"
        );
    }
    assert_eq!(browser.get("/get:user").await.body, "ada");
}

/// Item 8: a read's expiry refresh never overwrites the expiry a concurrent `set_expiry` saved.
pub async fn refresh_never_overwrites_a_concurrent_expiry<S: SessionStore + Clone>(store: S) {
    let layer = SessionLayer::builder(store.clone())
        .expiry(Expiry::OnInactivity(Duration::from_secs(2)))
        .build()
        .unwrap();
    let server = ScriptServer::start(&layer).await;
    let mut browser = Browser::new(server.addr).await;
    browser.get("/set:a=1").await;
    let cookie = cookie(&browser);
    // A tenth of the window has passed: the next read refreshes.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (read, remember) = server.race(&cookie, "/get:a", "/inactive:600000").await;
    assert_eq!(remember.status, StatusCode::OK);
    assert_eq!(read.status, StatusCode::OK);
    let left = expires_ms(&store, &browser.key().unwrap())
        .await
        .saturating_sub(now_ms());
    assert!(
        left > 500_000,
        "a read's refresh overwrote the saved expiry: {left} ms left"
    );
}

/// Item 10: the layer's absolute lifetime caps sessions created before it was configured.
pub async fn absolute_lifetime_caps_older_sessions<S: SessionStore + Clone>(store: S) {
    let before = ScriptServer::start(&SessionLayer::new(store.clone())).await;
    let mut browser = Browser::new(before.addr).await;
    browser.get("/set:a=1").await;
    let cookie = cookie(&browser);
    let capped = SessionLayer::builder(store)
        .absolute_lifetime(Duration::from_millis(600))
        .build()
        .unwrap();
    let after = ScriptServer::start(&capped).await;
    let mut browser = Browser::with_cookie(after.addr, &cookie).await;
    assert_eq!(browser.get("/get:a").await.body, "1");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(browser.get("/get:a").await.body, "1");
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(
        browser.get("/get:a").await.body,
        "-",
        "a session outlived the absolute lifetime"
    );
}

/// Item 11: `reset_expiry` undoes "remember me": the layer's policy and cookie apply again.
pub async fn reset_expiry_undoes_remember_me<S: SessionStore + Clone>(store: S) {
    let layer = SessionLayer::builder(store.clone())
        .expiry(Expiry::OnSessionEnd(Duration::from_secs(3600)))
        .build()
        .unwrap();
    let server = ScriptServer::start(&layer).await;
    let mut browser = Browser::new(server.addr).await;
    let r = browser.get("/set:user=ada").await;
    assert!(!r.session_cookie().unwrap().contains("Max-Age"));
    let r = browser.get("/inactive:2592000000").await;
    let remembered = r.session_cookie().expect("remember-me re-sends the cookie");
    assert!(remembered.contains("Max-Age=2592000"), "{remembered}");
    assert!(expires_ms(&store, &browser.key().unwrap()).await > now_ms() + 29 * 86_400_000);
    let r = browser.get("/reset").await;
    let forgotten = r.session_cookie().expect("reset re-sends the cookie");
    assert!(
        !forgotten.contains("Max-Age"),
        "the cookie still outlives the browser: {forgotten}"
    );
    let left = expires_ms(&store, &browser.key().unwrap())
        .await
        .saturating_sub(now_ms());
    assert!(
        left <= 3_600_000,
        "the store kept the remembered expiry: {left} ms"
    );
    assert_eq!(browser.get("/get:user").await.body, "ada");
}
