//! The layer's own behaviour, independent of the store: cookie handling, bad input, store
//! failures, expiry policies, the round-trip budget.

mod common;

use std::sync::atomic::Ordering;
use std::time::Duration;

use common::{Browser, Conn, Observed, serve};
use hyper::StatusCode;
use hyper_sessions::store::SessionStore;
use hyper_sessions::{Expiry, Id, MemoryStore, SameSite, Session, SessionLayer};

fn observed() -> Observed<MemoryStore> {
    Observed::new(MemoryStore::default())
}

fn counts(s: &Observed<MemoryStore>) -> (usize, usize) {
    (
        s.loads.load(Ordering::SeqCst),
        s.writes.load(Ordering::SeqCst),
    )
}

fn reset(s: &Observed<MemoryStore>) {
    s.loads.store(0, Ordering::SeqCst);
    s.writes.store(0, Ordering::SeqCst);
}

#[tokio::test]
async fn round_trip_budget_per_request_kind() {
    let store = observed();
    let server = serve(&SessionLayer::new(store.clone())).await;
    let mut b = Browser::new(server.addr).await;
    b.get("/login").await;
    assert_eq!(counts(&store), (0, 1), "new session: one create, no load");
    reset(&store);
    b.get("/untouched").await;
    assert_eq!(counts(&store), (0, 0), "untouched: no store I/O");
    b.get("/read").await;
    assert_eq!(counts(&store), (1, 0), "read: one load");
    reset(&store);
    b.get("/counter").await;
    assert_eq!(counts(&store), (1, 1), "write: load + compare-and-set");
    reset(&store);
    b.get("/incr/n").await;
    assert_eq!(counts(&store), (1, 1), "update: load + compare-and-set");
    reset(&store);
    b.get("/destroy").await;
    assert_eq!(counts(&store), (0, 1), "destroy: one delete");
}

#[tokio::test]
async fn impossible_ids_never_reach_the_store() {
    let store = observed();
    let server = serve(&SessionLayer::new(store.clone())).await;
    let mut c = Conn::http1(server.addr).await;
    let valid = Id::random().to_string();
    let bad: Vec<Vec<u8>> = vec![
        b"id=".to_vec(),
        b"id=garbage".to_vec(),
        format!("id={}", valid.to_uppercase()).into_bytes(),
        format!("id={}", valid.replace('-', "")).into_bytes(),
        format!("id={valid}x").into_bytes(),
        format!("id=\"{valid}\"").into_bytes(),
        b"id=6ba7b810-9dad-11d1-80b4-00c04fd430c8".to_vec(), // a v1 UUID
        b"id=\xc3\xa9\xff\xfe".to_vec(),                     // not UTF-8
        format!("id={}", "a".repeat(4000)).into_bytes(),
        b"id".to_vec(),
        b";;;===;".to_vec(),
    ];
    for cookie in &bad {
        let r = c.get_with("/read", &[cookie]).await;
        assert_eq!(r.status, StatusCode::OK, "{cookie:?}");
        assert_eq!(r.body, "0");
        let r = c.get_with("/counter", &[cookie]).await;
        assert_eq!(r.body, "1", "{cookie:?}");
        assert!(r.cookie_pair().is_some(), "a fresh session gets a fresh id");
    }
    assert_eq!(counts(&store).0, 0, "an impossible id was looked up");
}

#[tokio::test]
async fn duplicated_and_mixed_cookies() {
    let store = observed();
    let server = serve(&SessionLayer::new(store.clone())).await;
    let mut b = Browser::new(server.addr).await;
    b.get("/counter").await;
    b.get("/counter").await;
    let mine = b.cookie.clone().unwrap();
    let mut c = Conn::http1(server.addr).await;
    // The first valid session cookie wins; junk before it and other names are ignored.
    let header = format!("theme=dark; id=junk; {mine}; id={}", Id::random());
    assert_eq!(c.get_with("/read", &[header.as_bytes()]).await.body, "2");
    // Split across two Cookie headers (HTTP/2 clients do this).
    assert_eq!(
        c.get_with("/read", &[b"a=1; id=nope", mine.as_bytes()])
            .await
            .body,
        "2"
    );
}

#[tokio::test]
async fn huge_cookie_header_is_refused_or_ignored_without_panic() {
    let server = serve(&SessionLayer::new(MemoryStore::default())).await;
    let mut c = Conn::http1(server.addr).await;
    let big = format!("x={}", "y".repeat(60_000));
    let r = c.get_with("/read", &[big.as_bytes()]).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.body, "0");
    let huge = "z=1; ".repeat(200_000);
    let stream = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http1::handshake::<
        _,
        http_body_util::Empty<bytes::Bytes>,
    >(hyper_util::rt::TokioIo::new(stream))
    .await
    .unwrap();
    tokio::spawn(conn);
    let req = hyper::Request::get("/read")
        .header("host", "x")
        .header("cookie", huge)
        .body(http_body_util::Empty::new())
        .unwrap();
    match sender.send_request(req).await {
        Ok(resp) => assert_eq!(resp.status(), StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE),
        Err(e) => assert!(!e.is_user(), "unexpected client error {e}"),
    }
    // The server is still serving.
    assert_eq!(
        Conn::http1(server.addr).await.get("/read", None).await.body,
        "0"
    );
}

#[tokio::test]
async fn store_down_while_loading_is_an_error_not_a_fresh_session() {
    let store = observed();
    let server = serve(&SessionLayer::new(store.clone())).await;
    let mut b = Browser::new(server.addr).await;
    b.get("/counter").await;
    let cookie = b.cookie.clone();
    store.down.store(true, Ordering::SeqCst);
    let r = b.get("/read").await;
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(r.body.is_empty());
    assert!(
        r.set_cookies().is_empty(),
        "an outage must not drop the cookie"
    );
    assert_eq!(b.cookie, cookie);
    assert_eq!(
        b.get("/untouched").await.status,
        StatusCode::OK,
        "untouched needs no store"
    );
    store.down.store(false, Ordering::SeqCst);
    assert_eq!(
        b.get("/read").await.body,
        "1",
        "the session survived the outage"
    );
}

/// A store that loads fine but fails every write: the failure happens after the handler
/// answered, so the error hook decides the response.
#[tokio::test]
async fn failed_save_replaces_the_response() {
    let store = observed();
    let server = serve(&SessionLayer::new(store.clone())).await;
    let mut b = Browser::new(server.addr).await;
    b.get("/counter").await;
    // Load works, then the store goes down before the save.
    let down = store.down.clone();
    let mut c = Conn::http1(server.addr).await;
    let cookie = b.cookie.clone().unwrap();
    let sleeper = tokio::spawn(async move {
        let mut c2 = Conn::http1(b.conn_addr()).await;
        c2.get("/sleep/200/set/x", Some(&cookie)).await
    });
    tokio::time::sleep(Duration::from_millis(80)).await;
    down.store(true, Ordering::SeqCst);
    let r = sleeper.await.unwrap();
    assert_eq!(
        r.status,
        StatusCode::SERVICE_UNAVAILABLE,
        "a failed save was reported as success"
    );
    assert!(r.body.is_empty(), "no internals leak into the body");
    // A new session whose create fails sets no cookie.
    let r = c.get("/counter", None).await;
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(r.set_cookies().is_empty());
    store.down.store(false, Ordering::SeqCst);
}

#[tokio::test]
async fn custom_error_handler_decides_the_status() {
    let store = observed();
    let layer = SessionLayer::builder(store.clone())
        .error_handler(|err| {
            assert!(err.is_store() && err.is_unavailable());
            assert!(
                std::error::Error::source(err).is_some(),
                "the cause is kept"
            );
            let mut resp = hyper::Response::new(());
            *resp.status_mut() = StatusCode::IM_A_TEAPOT;
            resp.headers_mut()
                .insert("retry-after", "5".parse().unwrap());
            resp
        })
        .build()
        .unwrap();
    let server = serve(&layer).await;
    store.down.store(true, Ordering::SeqCst);
    let r = Conn::http1(server.addr).await.get("/login", None).await;
    assert_eq!(r.status, StatusCode::IM_A_TEAPOT);
    assert_eq!(r.headers.get("retry-after").unwrap(), "5");
}

#[tokio::test]
async fn configured_cookie_attributes_are_repeated_on_removal() {
    let layer = SessionLayer::builder(MemoryStore::default())
        .cookie_name("__Secure-sid")
        .cookie_domain("example.test")
        .cookie_path("/app")
        .cookie_same_site(SameSite::Strict)
        .cookie_partitioned(true)
        .build()
        .unwrap();
    let server = serve(&layer).await;
    let mut c = Conn::http1(server.addr).await;
    let r = c.get("/counter", None).await;
    let set = r.session_cookie().unwrap();
    assert!(set.starts_with("__Secure-sid="));
    let pair = set.split(';').next().unwrap().to_owned();
    let r = c.get("/destroy", Some(&pair)).await;
    let removal = r.session_cookie().unwrap();
    for attr in [
        "Domain=example.test",
        "Path=/app",
        "SameSite=Strict",
        "Secure",
        "HttpOnly",
        "Partitioned",
        "Max-Age=0",
    ] {
        assert!(
            set.contains(attr) || attr == "Max-Age=0",
            "{attr} missing in {set}"
        );
        assert!(
            removal.contains(attr),
            "{attr} missing in removal {removal}"
        );
    }
}

#[tokio::test]
async fn misconfigured_cookies_fail_at_build_time() {
    let host_with_domain = SessionLayer::builder(MemoryStore::default())
        .cookie_name("__Host-id")
        .cookie_domain("example.test")
        .build();
    assert!(host_with_domain.unwrap_err().is_config());
    let insecure_none = SessionLayer::builder(MemoryStore::default())
        .cookie_secure(false)
        .cookie_same_site(SameSite::None)
        .build();
    assert!(insecure_none.unwrap_err().is_config());
    let zero = SessionLayer::builder(MemoryStore::default())
        .expiry(Expiry::OnInactivity(Duration::ZERO))
        .build();
    assert!(zero.unwrap_err().is_config());
    assert!(
        SessionLayer::builder(MemoryStore::default())
            .cookie_name("__Host-id")
            .build()
            .is_ok()
    );
}

#[tokio::test]
async fn browser_session_cookie_has_no_max_age_but_a_server_bound() {
    let store = MemoryStore::default();
    let layer = SessionLayer::builder(store.clone())
        .expiry(Expiry::OnSessionEnd(Duration::from_millis(400)))
        .build()
        .unwrap();
    let server = serve(&layer).await;
    let mut b = Browser::new(server.addr).await;
    let set = b.get("/counter").await.session_cookie().unwrap();
    assert!(
        !set.contains("Max-Age") && !set.contains("Expires"),
        "{set}"
    );
    let r = b.get("/counter").await;
    assert!(
        r.set_cookies().is_empty(),
        "a browser-session cookie need not be re-sent"
    );
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(
        b.get("/read").await.body,
        "0",
        "the server-side bound was not applied"
    );
}

#[tokio::test]
async fn per_session_expiry_remember_me() {
    let store = MemoryStore::default();
    let server = serve(&SessionLayer::new(store.clone())).await;
    let mut b = Browser::new(server.addr).await;
    b.get("/counter").await;
    let r = b.get("/remember/2592000").await;
    let set = r
        .session_cookie()
        .expect("a new lifetime re-sends the cookie");
    assert!(
        set.contains("Max-Age=2592000") || set.contains("Max-Age=2591999"),
        "{set}"
    );
    let rec = store.load(&b.key().unwrap()).await.unwrap().unwrap();
    let remaining = rec
        .expires_at()
        .duration_since(std::time::SystemTime::now())
        .unwrap();
    assert!(remaining > Duration::from_secs(29 * 86_400));
    // The override is kept with the session.
    b.get("/counter").await;
    let rec = store.load(&b.key().unwrap()).await.unwrap().unwrap();
    let remaining = rec
        .expires_at()
        .duration_since(std::time::SystemTime::now())
        .unwrap();
    assert!(remaining > Duration::from_secs(29 * 86_400));
}

#[tokio::test]
async fn memory_store_sweeps_expired_sessions_in_the_background() {
    let store = MemoryStore::builder()
        .sweep_interval(Duration::from_millis(100))
        .build();
    let layer = SessionLayer::builder(store.clone())
        .expiry(Expiry::OnInactivity(Duration::from_millis(150)))
        .build()
        .unwrap();
    let server = serve(&layer).await;
    for _ in 0..20 {
        Conn::http1(server.addr).await.get("/counter", None).await;
    }
    assert_eq!(store.len(), 20);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(store.len(), 0, "expired sessions were not swept");
}

#[tokio::test]
async fn missing_layer_is_a_clear_error() {
    let req = hyper::Request::new(());
    let err = Session::from_request(&req).unwrap_err();
    assert!(err.is_missing_layer());
    assert!(err.to_string().contains("SessionLayer"));
}

#[tokio::test]
async fn handler_errors_and_destroyed_handles() {
    let store = MemoryStore::default();
    let server = serve(&SessionLayer::new(store)).await;
    let mut b = Browser::new(server.addr).await;
    b.get("/set/n?v=text").await;
    // /incr on a string: a typed error, answered 500 by the app, and nothing changed.
    assert_eq!(
        b.get("/incr/n").await.status,
        StatusCode::INTERNAL_SERVER_ERROR
    );
    assert_eq!(b.get("/get/n").await.body, "text");
}

/// An `update` whose save fails: the handler gets the error (503 here), and nothing more is
/// written for that request (no second attempt at the end), so the count stays as it was.
#[tokio::test]
async fn failed_update_reports_the_error_and_writes_nothing_more() {
    let store = observed();
    let server = serve(&SessionLayer::new(store.clone())).await;
    let mut b = Browser::new(server.addr).await;
    assert_eq!(b.get("/incr/n").await.body, "1");
    let cookie = b.cookie.clone();
    reset(&store);
    store.writes_down.store(true, Ordering::SeqCst);
    let r = b.get("/incr/n").await;
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(r.body.is_empty());
    assert!(
        r.set_cookies().is_empty(),
        "a failed write must not touch the cookie"
    );
    assert_eq!(
        counts(&store),
        (1, 1),
        "one load, one failed save, and no retry at the end"
    );
    store.writes_down.store(false, Ordering::SeqCst);
    assert_eq!(b.cookie, cookie);
    assert_eq!(
        b.get("/get/n").await.body,
        "1",
        "the failed increment was stored after all"
    );
}

/// A save that never wins the compare-and-set gives up after a bounded number of attempts
/// (each reloading and replaying), answers 500 with an empty body, and stores nothing.
#[tokio::test]
async fn endless_conflicts_give_up_with_an_error() {
    let store = observed();
    let server = serve(&SessionLayer::new(store.clone())).await;
    let mut b = Browser::new(server.addr).await;
    b.get("/counter").await;
    reset(&store);
    store.always_conflict.store(true, Ordering::SeqCst);
    let started = std::time::Instant::now();
    let r = b.get("/counter").await;
    assert_eq!(r.status, StatusCode::INTERNAL_SERVER_ERROR);
    assert!(r.body.is_empty());
    let (loads, writes) = counts(&store);
    assert_eq!(writes, 24, "save attempts are bounded");
    assert_eq!(
        loads,
        1 + 23,
        "the first load, then a reload after each conflict but the last"
    );
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
    store.always_conflict.store(false, Ordering::SeqCst);
    assert_eq!(b.get("/read").await.body, "1", "nothing was stored");
}

/// `get` never changes the session, a flash included; `take_flash` is the one read that
/// consumes a flash, and it leaves plain values alone.
#[tokio::test]
async fn only_take_flash_consumes_a_flash() {
    let server =
        common::script::ScriptServer::start(&SessionLayer::new(MemoryStore::default())).await;
    let mut b = Browser::new(server.addr).await;
    assert_eq!(
        b.get("/flash:m=hello/get:m/get:m").await.body,
        "hello hello"
    );
    assert_eq!(
        b.get("/get:m/take:m/take:m/get:m").await.body,
        "hello hello - -"
    );
    assert_eq!(b.get("/set:p=1/take:p/get:p").await.body, "- 1");
    assert_eq!(b.get("/get:p").await.body, "1");
}

/// `id` and `fingerprint` answer without a store round trip: the cookie's id before any load,
/// the new id after `cycle_id`, nothing after `destroy`; the fingerprint is the start of the
/// key's digest, never of the id.
#[tokio::test]
async fn the_id_and_fingerprint_need_no_store_round_trip() {
    async fn handler(
        req: hyper::Request<hyper::body::Incoming>,
    ) -> Result<hyper::Response<String>, std::convert::Infallible> {
        let session = Session::from_request(&req).unwrap();
        let before = session.id();
        let fingerprint = session.fingerprint();
        let body = match req.uri().path() {
            "/new" => {
                session.insert("a", &1).await.unwrap();
                format!("{:?}", session.id().is_some())
            }
            "/cycle" => {
                session.cycle_id().await.unwrap();
                let after = session.id();
                format!("{} {}", before != after, after.is_some())
            }
            "/destroy" => {
                session.destroy().await.unwrap();
                format!("{:?}", session.id())
            }
            _ => format!(
                "{} {}",
                before.map(|id| id.to_string()).unwrap_or_default(),
                fingerprint.map(|f| f.to_string()).unwrap_or_default()
            ),
        };
        Ok(hyper::Response::new(body))
    }
    let store = Observed::new(MemoryStore::default());
    let layer = SessionLayer::new(store.clone());
    let server = common::serve_service(layer.wrap(hyper::service::service_fn(handler))).await;
    let mut b = Browser::new(server.addr).await;
    assert_eq!(
        b.get("/peek").await.body,
        " ",
        "no cookie, no session, no id"
    );
    assert_eq!(b.get("/new").await.body, "true");
    let id = b.id().unwrap();
    let loads = store.loads.load(Ordering::SeqCst);
    let r = b.get("/peek").await;
    assert_eq!(
        store.loads.load(Ordering::SeqCst),
        loads,
        "id() loaded the session"
    );
    let fingerprint = hyper_sessions::store::Key::of(id).fingerprint().to_string();
    assert_eq!(r.body, format!("{id} {fingerprint}"));
    assert!(!id.to_string().replace('-', "").contains(&fingerprint));
    assert_eq!(b.get("/cycle").await.body, "true true");
    assert_ne!(b.id().unwrap(), id);
    assert_eq!(b.get("/destroy").await.body, "None");
}
