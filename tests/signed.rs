//! Signed cookies (`SessionLayerBuilder::signing_keys`) over a real server and a real store:
//! the cookie's format, key rotation, forged cookies refused before any store lookup, short
//! keys refused at build time. Store calls are counted by `common::Observed`, a wrapper that
//! forwards every call to the real store and counts it.

mod common;

use std::sync::atomic::Ordering;
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use common::{Conn, Observed, Resp, serve};
use hyper::StatusCode;
use hyper_sessions::store::SessionStore;
use hyper_sessions::{Expiry, Id, MemoryStore, SessionLayer};

const A: [u8; 32] = [0xa1; 32];
const B: [u8; 32] = [0xb2; 32];
const C: [u8; 32] = [0xc3; 32];

/// The signed value of `id` for cookie `name` under `key`, computed here from the documented
/// format, independently of the library: `<id>.<base64url(BLAKE3-keyed(k, "<name>=<id>"))>`,
/// the MAC's first 16 bytes,
/// with `k` derived from `key` in the documented context.
fn sign(key: &[u8], name: &str, id: &str) -> String {
    let mac_key = blake3::derive_key("hyper-sessions 2026-12-01 session cookie MAC key", key);
    let tag = blake3::keyed_hash(&mac_key, format!("{name}={id}").as_bytes());
    format!("{id}.{}", URL_SAFE_NO_PAD.encode(&tag.as_bytes()[..16]))
}

/// The key among `keys` whose MAC the cookie pair `id=<value>` carries, and its id.
fn signed_by(pair: &str, keys: &[&[u8]]) -> Option<(usize, String)> {
    let value = pair.strip_prefix("id=")?;
    let (id, _) = value.split_once('.')?;
    let _: Id = id.parse().ok()?;
    let i = keys.iter().position(|k| sign(k, "id", id) == value)?;
    Some((i, id.to_owned()))
}

fn layer<S: SessionStore>(store: S, keys: &[[u8; 32]]) -> SessionLayer {
    SessionLayer::builder(store)
        .signing_keys(keys)
        .build()
        .unwrap()
}

fn loads<S>(store: &Observed<S>) -> usize {
    store.loads.load(Ordering::SeqCst)
}

fn writes<S>(store: &Observed<S>) -> usize {
    store.writes.load(Ordering::SeqCst)
}

fn max_age(resp: &Resp) -> Option<u64> {
    let cookie = resp
        .set_cookies()
        .into_iter()
        .find(|c| c.starts_with("id="))?;
    cookie
        .split("; ")
        .find_map(|a| a.strip_prefix("Max-Age="))
        .map(|v| v.parse().unwrap())
}

/// A new session (count 1) on a server of `layer`; answers its cookie pair.
async fn login(conn: &mut Conn) -> String {
    let r = conn.get("/counter", None).await;
    assert_eq!((r.status, r.body.as_str()), (StatusCode::OK, "1"));
    r.cookie_pair().expect("a new session sets its cookie")
}

#[tokio::test]
async fn set_cookie_of_a_signed_layer_verifies() {
    let server = serve(&layer(MemoryStore::default(), &[A])).await;
    let mut conn = Conn::http1(server.addr).await;
    let r = conn.get("/counter", None).await;
    let set = r.session_cookie().unwrap();
    for attribute in [
        "; HttpOnly",
        "; SameSite=Lax",
        "; Secure",
        "; Path=/",
        "; Max-Age=",
    ] {
        assert!(set.contains(attribute), "{set}");
    }
    let pair = r.cookie_pair().unwrap();
    assert_eq!(pair.len(), "id=".len() + 59, "{pair}");
    let (key, _) = signed_by(&pair, &[&A]).expect("the cookie verifies under the key");
    assert_eq!(key, 0);
    assert!(
        signed_by(&pair, &[&B]).is_none(),
        "it verifies under another key"
    );
    // And it is the session.
    let r = conn.get("/counter", Some(&pair)).await;
    assert_eq!(r.body, "2");
}

#[tokio::test]
async fn rotation_keeps_users_logged_in_and_dropping_a_key_ends_its_cookies() {
    let store = Observed::new(MemoryStore::default());
    let old = serve(&layer(store.clone(), &[A])).await;
    let a_cookie = login(&mut Conn::http1(old.addr).await).await;
    let (_, id) = signed_by(&a_cookie, &[&A]).unwrap();

    // Rotated: B signs, A still verifies.
    let rotated = serve(&layer(store.clone(), &[B, A])).await;
    let mut conn = Conn::http1(rotated.addr).await;
    let (loads0, writes0) = (loads(&store), writes(&store));
    let r = conn.get("/untouched", Some(&a_cookie)).await;
    assert!(
        r.set_cookies().is_empty(),
        "an untouched session is not re-signed: {r:?}"
    );
    assert_eq!(
        loads(&store),
        loads0,
        "an untouched request loaded the session"
    );
    let r = conn.get("/read", Some(&a_cookie)).await;
    assert_eq!(
        (r.status, r.body.as_str()),
        (StatusCode::OK, "1"),
        "logged out"
    );
    assert_eq!(
        (loads(&store) - loads0, writes(&store) - writes0),
        (1, 0),
        "re-signing cost store I/O beyond the read's load"
    );
    let b_cookie = r
        .cookie_pair()
        .expect("the A-signed cookie was not re-signed");
    assert_eq!(signed_by(&b_cookie, &[&A, &B]), Some((1, id.clone())));
    // The lifetime the session has left: a day, minus the moments this test took.
    let age = max_age(&r).expect("a persistent cookie keeps its Max-Age");
    assert!((86_000..=86_400).contains(&age), "Max-Age={age}");

    // The B-signed cookie is the same session, and is not re-sent again.
    let r = conn.get("/counter", Some(&b_cookie)).await;
    assert_eq!(r.body, "2");
    let r = conn.get("/read", Some(&b_cookie)).await;
    assert_eq!(r.body, "2");
    assert!(
        r.set_cookies().is_empty(),
        "a current cookie was re-sent: {r:?}"
    );

    // A dropped: A-signed cookies start fresh sessions, without a store lookup.
    let dropped = serve(&layer(store.clone(), &[B])).await;
    let mut conn = Conn::http1(dropped.addr).await;
    let before = loads(&store);
    let r = conn.get("/read", Some(&a_cookie)).await;
    assert_eq!(r.body, "0", "an A-signed cookie still works without A");
    assert_eq!(
        loads(&store),
        before,
        "a cookie of a dropped key was looked up"
    );
    let r = conn.get("/read", Some(&b_cookie)).await;
    assert_eq!(r.body, "2");
}

#[tokio::test]
async fn a_resigned_browser_session_cookie_gets_no_max_age() {
    let store = MemoryStore::default();
    let policy = Expiry::OnSessionEnd(Duration::from_secs(3600));
    let build = |keys: &[[u8; 32]]| {
        SessionLayer::builder(store.clone())
            .expiry(policy)
            .signing_keys(keys)
            .build()
            .unwrap()
    };
    let old = serve(&build(&[A])).await;
    let a_cookie = login(&mut Conn::http1(old.addr).await).await;
    let rotated = serve(&build(&[B, A])).await;
    let r = Conn::http1(rotated.addr)
        .await
        .get("/read", Some(&a_cookie))
        .await;
    assert_eq!(r.body, "1");
    let b_cookie = r.cookie_pair().expect("re-signed");
    assert_eq!(signed_by(&b_cookie, &[&A, &B]).map(|(k, _)| k), Some(1));
    assert_eq!(
        max_age(&r),
        None,
        "a browser-session cookie became persistent"
    );
}

#[tokio::test]
async fn a_cycled_id_is_signed_with_the_current_key() {
    let store = MemoryStore::default();
    let old = serve(&layer(store.clone(), &[A])).await;
    let a_cookie = login(&mut Conn::http1(old.addr).await).await;
    let (_, old_id) = signed_by(&a_cookie, &[&A]).unwrap();
    let rotated = serve(&layer(store, &[B, A])).await;
    let r = Conn::http1(rotated.addr)
        .await
        .get("/cycle", Some(&a_cookie))
        .await;
    assert_eq!(r.status, StatusCode::OK);
    let (key, new_id) = signed_by(&r.cookie_pair().unwrap(), &[&B]).unwrap();
    assert_eq!(key, 0);
    assert_ne!(new_id, old_id);
    assert_eq!(r.set_cookies().len(), 1, "{r:?}");
}

#[tokio::test]
async fn forged_cookies_get_a_fresh_session_without_a_store_lookup() {
    let store = Observed::new(MemoryStore::default());
    let server = serve(&layer(store.clone(), &[A])).await;
    let mut conn = Conn::http1(server.addr).await;
    let good = login(&mut conn).await;
    let value = good.strip_prefix("id=").unwrap().to_owned();
    let (id, mac) = value.split_once('.').unwrap();
    let flipped = {
        let mut m = mac.as_bytes().to_vec();
        m[10] = if m[10] == b'A' { b'B' } else { b'A' };
        String::from_utf8(m).unwrap()
    };
    let upper_id = id.to_uppercase();
    let forged: Vec<String> = vec![
        format!("id={id}"),                          // unsigned
        format!("id={id}.{flipped}"),                // bad MAC
        format!("id={}", sign(&C, "id", id)),        // unknown key
        format!("id={}", sign(&A, "sid", id)),       // the value of another cookie name
        format!("id={}", &value[..value.len() - 1]), // truncated
        format!("id={id}."),                         // no MAC
        format!("id={id}..{mac}"),                   // extra dots
        format!("id={value}."),
        format!("id={value}.{mac}"),
        format!("id={id}.{}", "!".repeat(22)), // not base64
        format!("id={id}.{mac}=="),            // padded
        format!("id={id}.+{}", &mac[1..]),     // standard alphabet
        format!(
            "id={upper_id}.{}",
            sign(&A, "id", &upper_id).split_once('.').unwrap().1
        ),
        format!(
            "id={}",
            sign(&A, "id", "6ba7b810-9dad-11d1-80b4-00c04fd430c8")
        ), // a v1 UUID
        format!("id=.{mac}"),
        "id=".to_owned(),
    ];
    let before = loads(&store);
    for cookie in &forged {
        // `/counter` and `/id` would both look the cookie's session up if it were accepted.
        let r = conn.get("/read", Some(cookie)).await;
        assert_eq!(
            (r.status, r.body.as_str()),
            (StatusCode::OK, "0"),
            "{cookie}"
        );
        assert!(r.set_cookies().is_empty(), "{cookie}: {r:?}");
        let r = conn.get("/counter", Some(cookie)).await;
        assert_eq!(r.body, "1", "{cookie}");
        let fresh = r.cookie_pair().expect("a fresh session gets a cookie");
        let (_, fresh_id) = signed_by(&fresh, &[&A]).expect("a signed fresh cookie");
        assert_ne!(fresh_id, id, "{cookie}: the forged cookie's id was adopted");
    }
    assert_eq!(loads(&store), before, "a forged cookie reached the store");
    // Still the good one works, with one load.
    let r = conn.get("/read", Some(&good)).await;
    assert_eq!(r.body, "1");
    assert_eq!(loads(&store), before + 1);
}

#[tokio::test]
async fn short_keys_are_refused_at_build() {
    for keys in [
        vec![vec![7u8; 31]],
        vec![A.to_vec(), b"hunter2hunter2".to_vec()],
        vec![Vec::new()],
    ] {
        let err = SessionLayer::builder(MemoryStore::default())
            .signing_keys(&keys)
            .build()
            .unwrap_err();
        assert!(err.is_config(), "{err:?}");
        let cause = std::error::Error::source(&err).unwrap().to_string();
        assert!(cause.contains("at least 32"), "{cause}");
        assert!(
            !format!("{err:?} {cause}").contains("hunter2"),
            "a key was printed"
        );
    }
    // Exactly 32 bytes, and longer, are fine; no keys means unsigned cookies.
    let long = [9u8; 100];
    let keys: [&[u8]; 2] = [&[1u8; 32], &long];
    assert!(
        SessionLayer::builder(MemoryStore::default())
            .signing_keys(keys)
            .build()
            .is_ok()
    );
    let none: [&[u8]; 0] = [];
    assert!(
        SessionLayer::builder(MemoryStore::default())
            .signing_keys(none)
            .build()
            .is_ok()
    );
    // The builder's and the layer's Debug never show a key.
    let builder = SessionLayer::builder(MemoryStore::default()).signing_keys([[0x5a; 32]]);
    let debug_builder = format!("{builder:?}");
    let text = format!("{debug_builder} {:?}", builder.build().unwrap());
    assert!(!text.contains("90, 90") && !text.contains("5a5a"), "{text}");
}

#[tokio::test]
async fn an_unsigned_layer_works_as_before_and_refuses_signed_values() {
    let store = Observed::new(MemoryStore::default());
    let server = serve(&SessionLayer::new(store.clone())).await;
    let mut conn = Conn::http1(server.addr).await;
    let pair = login(&mut conn).await;
    let id: Id = pair
        .strip_prefix("id=")
        .unwrap()
        .parse()
        .expect("a bare id");
    assert_eq!(conn.get("/counter", Some(&pair)).await.body, "2");
    let before = loads(&store);
    let signed = format!("id={}", sign(&A, "id", &id.to_string()));
    assert_eq!(conn.get("/read", Some(&signed)).await.body, "0");
    assert_eq!(
        loads(&store),
        before,
        "a signed value was looked up by an unsigned layer"
    );
}

/// Rotation on a real `SQLite` store: the same rules as on the memory store.
#[cfg(feature = "sqlite")]
#[tokio::test]
async fn rotation_on_sqlite() {
    let store = Observed::new(hyper_sessions::SqliteStore::open_in_memory().await.unwrap());
    let old = serve(&layer(store.clone(), &[A])).await;
    let a_cookie = login(&mut Conn::http1(old.addr).await).await;
    let rotated = serve(&layer(store.clone(), &[B, A])).await;
    let mut conn = Conn::http1(rotated.addr).await;
    let before = loads(&store);
    let r = conn.get("/read", Some(&a_cookie)).await;
    assert_eq!(r.body, "1");
    assert_eq!(loads(&store), before + 1);
    let b_cookie = r.cookie_pair().expect("re-signed");
    assert_eq!(signed_by(&b_cookie, &[&A, &B]).map(|(k, _)| k), Some(1));
    let dropped = serve(&layer(store.clone(), &[B])).await;
    let mut conn = Conn::http1(dropped.addr).await;
    let before = loads(&store);
    assert_eq!(conn.get("/read", Some(&a_cookie)).await.body, "0");
    assert_eq!(loads(&store), before);
    assert_eq!(conn.get("/read", Some(&b_cookie)).await.body, "1");
}
