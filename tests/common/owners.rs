//! A user's sessions on every store: listing and revoking them over HTTP, and the races of a
//! revocation with requests of the sessions it revokes (parked between their load and commit).
//! Part of the conformance suite (`conformance_suite!` runs each on every store).

use std::collections::BTreeSet;
use std::sync::atomic::Ordering;
use std::time::SystemTime;

use hyper::StatusCode;
use hyper_sessions::store::{Key, SessionStore};
use hyper_sessions::{Id, SessionLayer};
use serde_json::Value;

use super::script::ScriptServer;
use super::{Browser, Conn, Observed, Resp, serve, unix_ms};

/// An owner no other test uses (stores may be shared between tests).
fn new_owner() -> String {
    format!("user-{}", &Key::of(Id::random()).to_hex()[..12])
}

fn cookie(browser: &Browser) -> String {
    browser
        .cookie
        .clone()
        .expect("the browser holds a session cookie")
}

/// The example app's `/sessions` list, as this browser's session sees it.
async fn sessions(browser: &mut Browser) -> Vec<Value> {
    let r = browser.get("/sessions").await;
    assert_eq!(r.status, StatusCode::OK, "{r:?}");
    serde_json::from_str::<Vec<Value>>(&r.body).expect("a JSON array")
}

fn field<'a>(list: &'a [Value], label: &str, name: &str) -> &'a Value {
    let session = list
        .iter()
        .find(|s| s["label"] == label)
        .unwrap_or_else(|| panic!("no session labelled {label} in {list:?}"));
    &session[name]
}

fn handle(list: &[Value], label: &str) -> String {
    field(list, label, "handle").as_str().unwrap().to_owned()
}

/// An owner's sessions are listed with their labels, times and handles, the asker's marked as
/// current; one is revoked by handle, the others all at once, and the revoked ones start fresh.
pub async fn owner_lists_and_revokes_sessions<S: SessionStore + Clone>(store: S) {
    let layer = SessionLayer::new(store.clone());
    let server = serve(&layer).await;
    let owner = new_owner();
    let mut devices = Vec::new();
    for label in ["laptop", "phone", "tablet"] {
        let mut b = Browser::new(server.addr).await;
        let r = b.get(&format!("/owner/{owner}?label={label}")).await;
        assert_eq!(r.body, "ok");
        devices.push(b);
    }
    let mut stranger = Browser::new(server.addr).await;
    stranger.get(&format!("/owner/{}", new_owner())).await;

    let list = sessions(&mut devices[0]).await;
    assert_eq!(list.len(), 3, "{list:?}");
    let labels: BTreeSet<&str> = list.iter().map(|s| s["label"].as_str().unwrap()).collect();
    assert_eq!(labels, BTreeSet::from(["laptop", "phone", "tablet"]));
    let current: Vec<&Value> = list.iter().filter(|s| s["current"] == true).collect();
    assert_eq!(current.len(), 1);
    assert_eq!(current[0]["label"], "laptop");
    let now = unix_ms(SystemTime::now());
    let handles: BTreeSet<&str> = list.iter().map(|s| s["handle"].as_str().unwrap()).collect();
    assert_eq!(handles.len(), 3, "handles are not distinct");
    for s in &list {
        let handle = s["handle"].as_str().unwrap();
        assert_eq!(handle.len(), 16);
        for b in &devices {
            let id = b.id().unwrap().to_string().replace('-', "");
            let key = b.key().unwrap().to_hex();
            assert!(
                !id.contains(handle) && !key.contains(handle),
                "a handle shows the id or key"
            );
        }
        let (created, seen, expires) = (
            s["created"].as_u64().unwrap(),
            s["last_seen"].as_u64().unwrap(),
            s["expires"].as_u64().unwrap(),
        );
        assert!(created <= seen && seen <= now && now < expires, "{s}");
        assert!(now - created < 60_000, "{s}");
    }
    assert_eq!(layer.owners().list(&owner).await.unwrap().len(), 3);

    // One by handle: it is gone from the store and the list, its next request starts fresh.
    let phone = handle(&list, "phone");
    let phone_key = devices[1].key().unwrap();
    assert_eq!(devices[0].get(&format!("/revoke/{phone}")).await.body, "ok");
    assert_eq!(
        devices[0].get(&format!("/revoke/{phone}")).await.status,
        StatusCode::NOT_FOUND
    );
    assert!(
        store.load(&phone_key).await.unwrap().is_none(),
        "a revoked session is stored"
    );
    assert_eq!(devices[1].get("/sessions").await.body, "[]");
    // Another owner's session cannot be revoked by its handle.
    let theirs = sessions(&mut stranger).await;
    let r = devices[0]
        .get(&format!(
            "/revoke/{}",
            theirs[0]["handle"].as_str().unwrap()
        ))
        .await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    assert_eq!(sessions(&mut stranger).await.len(), 1);

    // Every other one.
    assert_eq!(devices[0].get("/revoke-others").await.body, "1");
    assert_eq!(devices[2].get("/sessions").await.body, "[]");
    let list = sessions(&mut devices[0]).await;
    assert_eq!(list.len(), 1);
    assert_eq!(list[0]["current"], true);

    // Its own handle: the session is destroyed and its cookie removed.
    let me = list[0]["handle"].as_str().unwrap().to_owned();
    assert!(
        devices[0]
            .get(&format!("/revoke/{me}"))
            .await
            .removes_cookie()
    );
    assert!(layer.owners().list(&owner).await.unwrap().is_empty());

    // From outside a request: everything of an owner's.
    let owner = new_owner();
    for _ in 0..3 {
        Browser::new(server.addr)
            .await
            .get(&format!("/owner/{owner}"))
            .await;
    }
    assert_eq!(layer.owners().revoke_all(&owner).await.unwrap(), 3);
    assert!(layer.owners().list(&owner).await.unwrap().is_empty());
}

/// The owner and label move with the session when its id is cycled (under a new handle), and
/// go with `clear` and `destroy`.
pub async fn owner_survives_cycle_and_goes_with_clear<S: SessionStore + Clone>(store: S) {
    let layer = SessionLayer::new(store.clone());
    let server = serve(&layer).await;
    let owner = new_owner();
    let mut b = Browser::new(server.addr).await;
    b.get(&format!("/owner/{owner}?label=desk")).await;
    let before = sessions(&mut b).await;
    let old_key = b.key().unwrap();
    b.get("/cycle").await;
    assert_ne!(b.key().unwrap(), old_key, "the id did not change");
    let after = sessions(&mut b).await;
    assert_eq!(after.len(), 1, "{after:?}");
    assert_eq!(
        (&after[0]["label"], &after[0]["current"]),
        (&"desk".into(), &true.into())
    );
    assert_ne!(after[0]["handle"], before[0]["handle"]);
    assert_eq!(after[0]["created"], before[0]["created"]);

    let mut other = Browser::new(server.addr).await;
    other.get(&format!("/owner/{owner}")).await;
    assert_eq!(sessions(&mut other).await.len(), 2);
    assert!(
        b.get("/clear").await.removes_cookie(),
        "an emptied session was kept"
    );
    assert_eq!(sessions(&mut other).await.len(), 1);
    other.get("/destroy").await;
    assert!(layer.owners().list(&owner).await.unwrap().is_empty());
}

/// Two sessions of one owner, `a` and `b`; `b`'s request `parked` (a script ending in
/// `park:p`, then its last steps) is held at its park point while `a` revokes every other
/// session of theirs, then let go. Answers both browsers and `b`'s parked response.
async fn revoke_others_while_parked(
    server: &ScriptServer,
    parked: &str,
) -> (Browser, Browser, Resp) {
    let owner = new_owner();
    let (mut a, mut b) = (
        Browser::new(server.addr).await,
        Browser::new(server.addr).await,
    );
    a.get(&format!("/owner:{owner}/set:k=a")).await;
    b.get(&format!("/owner:{owner}/set:k=b")).await;
    let mut park = server.park("p");
    let (addr, b_cookie, parked) = (server.addr, cookie(&b), parked.to_owned());
    let late =
        tokio::spawn(async move { Conn::http1(addr).await.get(&parked, Some(&b_cookie)).await });
    park.arrived().await;
    assert_eq!(a.get("/others").await.body, "1");
    park.release();
    (a, b, late.await.unwrap())
}

/// A request of a session parked between its load and its commit while the session is
/// revoked: its write fails, the session stays revoked, and its next request starts fresh.
pub async fn revoked_session_racing_a_write_stays_revoked<S: SessionStore + Clone>(store: S) {
    let server = ScriptServer::start(&SessionLayer::new(store.clone())).await;
    let (mut a, mut b, late) =
        revoke_others_while_parked(&server, "/get:k/park:p/set:late=1").await;
    assert_eq!(
        late.status,
        StatusCode::INTERNAL_SERVER_ERROR,
        "a lost write was reported as stored"
    );
    assert!(late.set_cookies().is_empty(), "{late:?}");
    assert!(
        store.load(&b.key().unwrap()).await.unwrap().is_none(),
        "a revoked session came back"
    );
    assert_eq!(b.get("/get:k").await.body, "-");
    assert_eq!(a.get("/sessions").await.body, "1");
}

/// A cycle parked while its session is revoked: neither the old id nor the new one survives.
pub async fn revoked_session_racing_a_cycle_stays_revoked<S: SessionStore + Clone>(store: S) {
    let observed = Observed::new(store.clone());
    let server = ScriptServer::start(&SessionLayer::new(observed.clone())).await;
    let (mut a, b, late) = revoke_others_while_parked(&server, "/get:k/park:p/cycle").await;
    assert_eq!(late.status, StatusCode::INTERNAL_SERVER_ERROR, "{late:?}");
    // Every record created meanwhile (the cycle's copy) is gone, as is the old one.
    for key in observed.created_ids().iter().skip(2) {
        assert!(
            store.load(key).await.unwrap().is_none(),
            "the cycled copy outlived the revocation"
        );
    }
    assert!(store.load(&b.key().unwrap()).await.unwrap().is_none());
    assert_eq!(a.get("/sessions").await.body, "1");
}

/// Listing while every listed session is being written misses none and lists none twice.
pub async fn listing_misses_no_session_being_written<S: SessionStore + Clone>(store: S) {
    const SESSIONS: usize = 12;
    let server = ScriptServer::start(&SessionLayer::new(store)).await;
    let owner = new_owner();
    let mut cookies = Vec::new();
    for _ in 0..SESSIONS {
        let mut b = Browser::new(server.addr).await;
        b.get(&format!("/owner:{owner}/set:x=0")).await;
        cookies.push(cookie(&b));
    }
    let addr = server.addr;
    let writers: Vec<_> = cookies
        .iter()
        .cloned()
        .map(|c| {
            tokio::spawn(async move {
                let mut conn = Conn::http1(addr).await;
                for _ in 0..10 {
                    assert_eq!(conn.get("/incr:n", Some(&c)).await.status, StatusCode::OK);
                    assert_eq!(conn.get("/set:x=1", Some(&c)).await.status, StatusCode::OK);
                }
            })
        })
        .collect();
    let mut lister = Browser::with_cookie(addr, &cookies[0]).await;
    for _ in 0..10 {
        assert_eq!(lister.get("/sessions").await.body, SESSIONS.to_string());
    }
    for w in writers {
        w.await.unwrap();
    }
    assert_eq!(lister.get("/sessions").await.body, SESSIONS.to_string());
}

/// An owned session costs the store calls of any other: a read one load, a write one load and
/// one write; only listing asks the store for the owner's sessions.
pub async fn owners_cost_no_store_calls<S: SessionStore + Clone>(store: S) {
    let observed = Observed::new(store);
    let server = ScriptServer::start(&SessionLayer::new(observed.clone())).await;
    let mut b = Browser::new(server.addr).await;
    b.get(&format!("/owner:{}/set:k=1", new_owner())).await;
    let calls = || {
        (
            observed.loads.load(Ordering::SeqCst),
            observed.writes.load(Ordering::SeqCst),
        )
    };
    let before = calls();
    assert_eq!(b.get("/get:k").await.body, "1");
    let read = calls();
    assert_eq!(
        (read.0 - before.0, read.1 - before.1),
        (1, 0),
        "a read of an owned session"
    );
    b.get("/set:k=2").await;
    let write = calls();
    assert_eq!(
        (write.0 - read.0, write.1 - read.1),
        (1, 1),
        "a write of an owned session"
    );
}
