//! Writes whose reply is lost (issue item 9): a [`ReplyDroppingProxy`] forwards one write to the
//! server and closes the client's connection without its reply, so the store retries a write
//! that was applied. A retry that finds its own effect answers as usual; one that cannot (another
//! writer saved on top meanwhile, or the first attempt deleted the record) must answer
//! unavailable ("outcome unknown"), never `Conflict` or `Missing`, so that the layer does not
//! apply the request's changes a second time. Shared by the Redis and Webdis tests.

use std::net::SocketAddr;
use std::time::Duration;

use crate::common::{ExpiresMs, record_at_ms, unix_ms};
use bytes::Bytes;
use hyper::StatusCode;
use hyper_sessions::store::{CreateOutcome, Key, Record, SaveOutcome, SessionStore, StoreError};

use crate::common::servers::ReplyDroppingProxy;
use crate::common::{Browser, Conn, new_key};

/// Recognises each kind of write on the wire.
pub struct Triggers {
    pub create: fn(&[u8]) -> bool,
    pub save: fn(&[u8]) -> bool,
    pub touch: fn(&[u8]) -> bool,
    pub remove: fn(&[u8]) -> bool,
}

fn now_ms() -> u64 {
    unix_ms(std::time::SystemTime::now())
}

fn counter(key: Key, n: u64, version: u64, expires_ms: u64) -> Record {
    record_at_ms(
        key,
        Bytes::from(format!(r#"{{"d":{{"n":{n}}}}}"#)),
        version,
        expires_ms,
    )
}

fn assert_unknown(err: &StoreError, what: &str) {
    assert!(err.is_unavailable(), "{what}: {err:?}");
    let cause = std::error::Error::source(err).map(ToString::to_string);
    assert!(
        cause
            .as_deref()
            .is_some_and(|c| c.starts_with("outcome unknown")),
        "{what}: {cause:?}"
    );
}

/// Runs `write` on a spawned task with the proxy armed by `trigger`; once the server has
/// applied it (reply held back), runs `meanwhile` (another writer), then loses the reply.
async fn lose_reply<T, W, M>(
    proxy: &ReplyDroppingProxy,
    trigger: fn(&[u8]) -> bool,
    write: W,
    meanwhile: M,
) -> Result<T, StoreError>
where
    T: Send + 'static,
    W: std::future::Future<Output = Result<T, StoreError>> + Send + 'static,
    M: std::future::Future<Output = ()>,
{
    proxy.arm(trigger);
    let task = tokio::spawn(write);
    proxy.caught().await;
    meanwhile.await;
    proxy.release();
    tokio::time::timeout(Duration::from_secs(10), task)
        .await
        .expect("the write did not finish")
        .unwrap()
}

/// `a` reaches the server through `proxy`, `b` directly; both on the same data.
#[allow(clippy::too_many_lines)] // one scenario, read top to bottom
pub async fn store_level<S: SessionStore + Clone>(
    a: S,
    b: S,
    proxy: &ReplyDroppingProxy,
    t: &Triggers,
) {
    let exp = now_ms() + 60_000;
    let id = new_key();
    assert_eq!(
        b.create(&counter(id, 0, 1, exp)).await.unwrap(),
        CreateOutcome::Created
    );

    // 1. A save whose reply was lost, nobody on top: the retry recognises its own write.
    let (a2, rec) = (a.clone(), counter(id, 1, 2, exp));
    let out = lose_reply(
        proxy,
        t.save,
        async move { a2.save(&rec, 1).await },
        async {},
    )
    .await;
    assert_eq!(out.unwrap(), SaveOutcome::Saved);
    let back = b.load(&id).await.unwrap().unwrap();
    assert_eq!(
        (back.version(), back.data()),
        (2, counter(id, 1, 2, exp).data())
    );

    // 2. Another writer saves on top before the reply is lost: unknown, never a conflict.
    let (a2, rec) = (a.clone(), counter(id, 2, 3, exp));
    let out = lose_reply(
        proxy,
        t.save,
        async move { a2.save(&rec, 2).await },
        async {
            assert_eq!(
                b.save(&counter(id, 3, 4, exp), 3).await.unwrap(),
                SaveOutcome::Saved
            );
        },
    )
    .await;
    assert_unknown(&out.unwrap_err(), "save, saved on top");
    let back = b.load(&id).await.unwrap().unwrap();
    assert_eq!(
        (back.version(), back.data()),
        (4, counter(id, 3, 4, exp).data())
    );
    // The store serves again.
    assert_eq!(
        a.save(&counter(id, 4, 5, exp), 4).await.unwrap(),
        SaveOutcome::Saved
    );
    assert_eq!(a.load(&id).await.unwrap().unwrap().version(), 5);

    // 3. A touch whose reply was lost, nobody on top: applied once, answered as saved.
    let later = exp + 60_000;
    let a2 = a.clone();
    let out = lose_reply(
        proxy,
        t.touch,
        async move { a2.touch(&id, 5, crate::common::from_unix_ms(later)).await },
        async {},
    )
    .await;
    assert_eq!(out.unwrap(), SaveOutcome::Saved);
    let back = b.load(&id).await.unwrap().unwrap();
    assert_eq!((back.version(), back.expires_at_unix_ms()), (5, later));

    // 4. A touch, then a save on top before its reply is lost: unknown.
    let a2 = a.clone();
    let out = lose_reply(
        proxy,
        t.touch,
        async move {
            a2.touch(&id, 5, crate::common::from_unix_ms(later + 1_000))
                .await
        },
        async {
            assert_eq!(
                b.save(&counter(id, 5, 6, later), 5).await.unwrap(),
                SaveOutcome::Saved
            );
        },
    )
    .await;
    assert_unknown(&out.unwrap_err(), "touch, saved on top");
    assert_eq!(b.load(&id).await.unwrap().unwrap().version(), 6);

    // 5. A remove whose reply was lost: its retry finds nothing, which may be its own doing.
    let a2 = a.clone();
    let out = lose_reply(
        proxy,
        t.remove,
        async move { a2.remove(&id, 6).await },
        async {},
    )
    .await;
    assert_unknown(&out.unwrap_err(), "remove");
    assert!(b.load(&id).await.unwrap().is_none());

    // 6. A create whose reply was lost: the retry recognises its own record.
    let fresh = new_key();
    let (a2, rec) = (a.clone(), counter(fresh, 0, 1, exp));
    let out = lose_reply(
        proxy,
        t.create,
        async move { a2.create(&rec).await },
        async {},
    )
    .await;
    assert_eq!(out.unwrap(), CreateOutcome::Created);
    assert_eq!(b.load(&fresh).await.unwrap().unwrap().version(), 1);

    // 7. A create, then a save on top before its reply is lost: unknown, not "taken".
    let fresh = new_key();
    let (a2, rec) = (a.clone(), counter(fresh, 0, 1, exp));
    let out = lose_reply(
        proxy,
        t.create,
        async move { a2.create(&rec).await },
        async {
            assert_eq!(
                b.save(&counter(fresh, 1, 2, exp), 1).await.unwrap(),
                SaveOutcome::Saved
            );
        },
    )
    .await;
    assert_unknown(&out.unwrap_err(), "create, saved on top");
    assert_eq!(b.load(&fresh).await.unwrap().unwrap().version(), 2);
    assert!(!proxy.is_armed());
}

/// Through the layer: `app_a` reaches the store through `proxy`, `app_b` directly. A request's
/// `update` (`/incr/n`) whose save reply is lost while another request increments on top is a
/// 503, and the counter holds each increment once.
pub async fn layer_level(
    app_a: SocketAddr,
    app_b: SocketAddr,
    proxy: &ReplyDroppingProxy,
    save: fn(&[u8]) -> bool,
) {
    let mut b = Browser::new(app_b).await;
    assert_eq!(b.get("/incr/n").await.body, "1");
    assert_eq!(b.get("/incr/n").await.body, "2");
    let cookie = b.cookie.clone().unwrap();
    proxy.arm(save);
    let slow =
        tokio::spawn(async move { Conn::http1(app_a).await.get("/incr/n", Some(&cookie)).await });
    proxy.caught().await;
    // The first increment is stored (n = 3); another request increments on top.
    assert_eq!(b.get("/incr/n").await.body, "4");
    proxy.release();
    let r = tokio::time::timeout(Duration::from_secs(10), slow)
        .await
        .expect("the request did not finish")
        .unwrap();
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE, "{r:?}");
    assert_eq!(
        b.get("/get/n").await.body,
        "4",
        "an increment was applied twice"
    );
    // The application serves again through the proxy.
    let cookie = b.cookie.clone().unwrap();
    let r = Conn::http1(app_a).await.get("/incr/n", Some(&cookie)).await;
    assert_eq!((r.status, r.body.as_str()), (StatusCode::OK, "5"));
}
