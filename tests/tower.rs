//! The session layer in the tower ecosystem: the HTTP half of the conformance suite and the
//! store-failure behaviours through an axum `Router` and through a tower `ServiceBuilder` stack
//! (a timeout around the layer, a concurrency limit inside it); the axum extractor; readiness
//! forwarding.

mod common;

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll};
use std::time::Duration;

use common::{Browser, Conn, Observed, STACK, Stack, conformance, serve, serve_on};
use http_body_util::BodyExt;
use hyper::{Request, Response, StatusCode};
use hyper_sessions::{MemoryStore, Session, SessionLayer};
use tower::{Layer, Service, ServiceExt};

/// Runs one conformance check on a fresh memory store with [`serve`] building `stack`.
async fn over<F, Fut>(stack: Stack, check: F)
where
    F: FnOnce(MemoryStore) -> Fut,
    Fut: Future<Output = ()>,
{
    STACK.scope(stack, check(MemoryStore::default())).await;
}

/// One test per conformance check of the session layer over HTTP, in module `$module`, on
/// `$stack`.
macro_rules! conformance_over {
    ($module:ident, $stack:expr; $($name:ident),* $(,)?) => {
        mod $module {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::over($stack, super::conformance::$name).await;
                }
            )*
        }
    };
}

macro_rules! conformance_over_both {
    ([$($name:ident),* $(,)?]) => {
        conformance_over!(axum_router, super::Stack::Axum; $($name),*);
        conformance_over!(tower_stack, super::Stack::Tower; $($name),*);
    };
}

// Every check of the layer over HTTP, on both stacks.
layer_checks!(conformance_over_both! {});

const STACKS: [(Stack, &str); 2] = [(Stack::Axum, "axum"), (Stack::Tower, "tower")];

#[tokio::test]
async fn the_scope_really_switches_the_stack() {
    let layer = SessionLayer::new(MemoryStore::default());
    for (stack, name) in STACKS {
        let server = STACK.scope(stack, serve(&layer)).await;
        let r = Conn::http1(server.addr).await.get("/__stack", None).await;
        assert_eq!(r.body, name);
    }
    let server = serve(&layer).await;
    let r = Conn::http1(server.addr).await.get("/__stack", None).await;
    assert_eq!(r.body, "hyper", "outside a scope the hyper path is served");
}

// ---- store failures, on each stack ----

#[tokio::test]
async fn store_down_while_loading_is_an_error_not_a_fresh_session() {
    for (stack, name) in STACKS {
        let store = Observed::new(MemoryStore::default());
        let server = serve_on(stack, &SessionLayer::new(store.clone())).await;
        let mut b = Browser::new(server.addr).await;
        assert_eq!(b.get("/counter").await.body, "1", "{name}");
        let cookie = b.cookie.clone();
        store.down.store(true, Ordering::SeqCst);
        let r = b.get("/read").await;
        assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE, "{name}");
        assert!(r.body.is_empty(), "{name}");
        assert!(
            r.set_cookies().is_empty(),
            "{name}: an outage dropped the cookie"
        );
        assert_eq!(b.cookie, cookie);
        assert_eq!(b.get("/untouched").await.status, StatusCode::OK, "{name}");
        store.down.store(false, Ordering::SeqCst);
        assert_eq!(
            b.get("/read").await.body,
            "1",
            "{name}: the session was lost"
        );
    }
}

#[tokio::test]
async fn failed_save_replaces_the_response() {
    for (stack, name) in STACKS {
        let store = Observed::new(MemoryStore::default());
        let server = serve_on(stack, &SessionLayer::new(store.clone())).await;
        let mut b = Browser::new(server.addr).await;
        b.get("/counter").await;
        let cookie = b.cookie.clone().unwrap();
        let addr = server.addr;
        // The load works, then the store goes down before the save.
        let sleeper = tokio::spawn(async move {
            Conn::http1(addr)
                .await
                .get("/sleep/200/set/x", Some(&cookie))
                .await
        });
        tokio::time::sleep(Duration::from_millis(80)).await;
        store.down.store(true, Ordering::SeqCst);
        let r = sleeper.await.unwrap();
        assert_eq!(
            r.status,
            StatusCode::SERVICE_UNAVAILABLE,
            "{name}: a failed save was reported as success"
        );
        assert!(r.body.is_empty(), "{name}: the handler's body leaked");
        // A new session whose create fails sets no cookie.
        let r = Conn::http1(server.addr).await.get("/counter", None).await;
        assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE, "{name}");
        assert!(r.set_cookies().is_empty(), "{name}");
        store.down.store(false, Ordering::SeqCst);
        assert_eq!(b.get("/keys").await.body, "count", "{name}: x was saved");
    }
}

#[tokio::test]
async fn custom_error_handler_decides_the_status() {
    for (stack, name) in STACKS {
        let store = Observed::new(MemoryStore::default());
        let layer = SessionLayer::builder(store.clone())
            .error_handler(|err| {
                assert!(err.is_store() && err.is_unavailable());
                let mut resp = Response::new(());
                *resp.status_mut() = StatusCode::IM_A_TEAPOT;
                resp.headers_mut()
                    .insert("retry-after", "5".parse().unwrap());
                resp
            })
            .build()
            .unwrap();
        let server = serve_on(stack, &layer).await;
        store.down.store(true, Ordering::SeqCst);
        let r = Conn::http1(server.addr).await.get("/login", None).await;
        assert_eq!(r.status, StatusCode::IM_A_TEAPOT, "{name}");
        assert_eq!(r.headers.get("retry-after").unwrap(), "5", "{name}");
        assert!(r.body.is_empty(), "{name}");
    }
}

/// A layer around the session layer that gives up on the request (here tower's timeout) drops
/// the session's response future: nothing that request changed is saved.
#[tokio::test]
async fn an_outer_timeout_cancels_the_save() {
    let store = MemoryStore::default();
    let server = common::serve_tower(
        &SessionLayer::new(store.clone()),
        Duration::from_millis(150),
    )
    .await;
    let mut b = Browser::new(server.addr).await;
    b.get("/counter").await;
    let cookie = b.cookie.clone().unwrap();
    let stream = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http1::handshake::<
        _,
        http_body_util::Empty<bytes::Bytes>,
    >(hyper_util::rt::TokioIo::new(stream))
    .await
    .unwrap();
    tokio::spawn(conn);
    let req = Request::get("/sleep/400/set/late")
        .header("host", "localhost")
        .header("cookie", &cookie)
        .body(http_body_util::Empty::new())
        .unwrap();
    assert!(
        sender.send_request(req).await.is_err(),
        "the timeout did not abort the exchange"
    );
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(
        b.get("/keys").await.body,
        "count",
        "a cancelled write was saved"
    );
    assert_eq!(b.get("/read").await.body, "1");
}

// ---- the axum extractor ----

async fn body_text(resp: axum::response::Response) -> String {
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    String::from_utf8(bytes.to_vec()).unwrap()
}

#[tokio::test]
async fn extractor_without_the_layer_is_a_clear_500() {
    async fn handler(_session: Session) -> &'static str {
        "unreachable"
    }
    let router: axum::Router = axum::Router::new().route("/", axum::routing::get(handler));
    let resp = router
        .oneshot(Request::get("/").body(axum::body::Body::empty()).unwrap())
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::INTERNAL_SERVER_ERROR);
    assert_eq!(
        resp.headers().get("content-type").unwrap(),
        "text/plain; charset=utf-8"
    );
    let body = body_text(resp).await;
    assert!(body.contains("SessionLayer is missing"), "{body}");
}

/// A route added after `Router::layer` is outside the layer: the extractor says so instead of
/// running the handler with a session that would never be saved.
#[tokio::test]
async fn extractor_on_a_route_added_after_the_layer() {
    async fn count(session: Session) -> String {
        let n = session
            .update("n", |n: Option<u64>| n.unwrap_or(0) + 1)
            .await
            .unwrap();
        n.to_string()
    }
    let router: axum::Router = axum::Router::new()
        .route("/inside", axum::routing::get(count))
        .layer(SessionLayer::new(MemoryStore::default()))
        .route("/outside", axum::routing::get(count));
    let resp = router
        .clone()
        .oneshot(
            Request::get("/inside")
                .body(axum::body::Body::empty())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert!(resp.headers().get("set-cookie").is_some());
    assert_eq!(body_text(resp).await, "1");
    let resp = router
        .oneshot(
            Request::get("/outside")
                .body(axum::body::Body::empty())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::INTERNAL_SERVER_ERROR);
}

/// A handler can answer a session error with `?`: 503 for an unavailable store, 500 for the
/// rest, an empty body either way, and the layer still never drops the cookie on an outage.
#[tokio::test]
async fn handlers_answer_session_errors_with_question_mark() {
    async fn read(session: Session) -> Result<String, hyper_sessions::Error> {
        Ok(session.get::<u64>("n").await?.unwrap_or(0).to_string())
    }
    async fn count(session: Session) -> Result<String, hyper_sessions::Error> {
        let n = session
            .update("n", |n: Option<u64>| n.unwrap_or(0) + 1)
            .await?;
        Ok(n.to_string())
    }
    async fn big(session: Session) -> Result<String, hyper_sessions::Error> {
        session
            .update("big", |_: Option<String>| "x".repeat(10_000))
            .await?;
        Ok("stored".to_owned())
    }
    let store = Observed::new(MemoryStore::default());
    let layer = SessionLayer::builder(store.clone())
        .max_record_bytes(1_000)
        .build()
        .unwrap();
    let router = axum::Router::new()
        .route("/read", axum::routing::get(read))
        .route("/count", axum::routing::get(count))
        .route("/big", axum::routing::get(big))
        .layer(layer);
    let server = common::serve_axum(router).await;
    let mut b = Browser::new(server.addr).await;
    assert_eq!(b.get("/count").await.body, "1");
    let r = b.get("/big").await;
    assert_eq!(r.status, StatusCode::INTERNAL_SERVER_ERROR, "too large");
    assert!(r.body.is_empty());
    store.down.store(true, Ordering::SeqCst);
    let r = b.get("/read").await;
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE, "store down");
    assert!(r.body.is_empty());
    assert!(r.set_cookies().is_empty(), "an outage dropped the cookie");
    store.down.store(false, Ordering::SeqCst);
    assert_eq!(b.get("/read").await.body, "1");
}

// ---- readiness ----

/// The inner service admits one request at a time (`ConcurrencyLimit`): `poll_ready` must wait
/// for it, and `call` must go to the instance that was polled ready (its clones hold no permit,
/// and `ConcurrencyLimit::call` panics without one).
#[tokio::test]
async fn poll_ready_is_forwarded_and_readiness_is_not_lost() {
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let inner = {
        let gate = Arc::clone(&gate);
        tower::service_fn(move |req: Request<String>| {
            let gate = Arc::clone(&gate);
            async move {
                let session = Session::from_request(&req).unwrap();
                session.insert("seen", req.body()).await.unwrap();
                gate.acquire().await.unwrap().forget();
                Ok::<_, Infallible>(Response::new(String::from("done")))
            }
        })
    };
    let layer = SessionLayer::new(MemoryStore::default());
    let mut svc = layer.layer(tower::limit::ConcurrencyLimit::new(inner, 1));

    svc.ready().await.unwrap();
    let first = tokio::spawn(svc.call(Request::new("first".to_owned())));
    // The one permit is held by `first`: not ready until it finishes.
    assert!(
        tokio::time::timeout(Duration::from_millis(100), svc.ready())
            .await
            .is_err(),
        "poll_ready did not wait for the inner service"
    );
    gate.add_permits(1);
    let resp = first.await.unwrap().unwrap();
    assert_eq!(resp.body(), "done");
    assert!(
        resp.headers().get("set-cookie").is_some(),
        "the session was not saved on the tower path"
    );
    // Ready again once the first request is over, and the permit reaches the call.
    tokio::time::timeout(Duration::from_secs(5), svc.ready())
        .await
        .expect("readiness never came back")
        .unwrap();
    gate.add_permits(1);
    let resp = svc.call(Request::new("second".to_owned())).await.unwrap();
    assert_eq!(resp.body(), "done");
}

/// An inner service that is not ready until signalled, and whose readiness errors pass through.
#[derive(Clone, Default)]
struct Gated {
    /// 0: not ready, 1: ready, 2: failed; and the waker of the last pending `poll_ready`.
    state: Arc<std::sync::Mutex<(u8, Option<std::task::Waker>)>>,
}

impl Gated {
    fn set(&self, to: u8) {
        let mut state = self.state.lock().unwrap();
        state.0 = to;
        if let Some(waker) = state.1.take() {
            waker.wake();
        }
    }
}

impl Service<Request<String>> for Gated {
    type Response = Response<String>;
    type Error = &'static str;
    type Future = std::future::Ready<Result<Response<String>, &'static str>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        let mut state = self.state.lock().unwrap();
        match state.0 {
            0 => {
                state.1 = Some(cx.waker().clone());
                Poll::Pending
            }
            1 => Poll::Ready(Ok(())),
            _ => Poll::Ready(Err("inner service failed")),
        }
    }

    fn call(&mut self, req: Request<String>) -> Self::Future {
        assert_eq!(self.state.lock().unwrap().0, 1, "called while not ready");
        let session = Session::from_request(&req).expect("the layer attached a session");
        drop(session);
        std::future::ready(Ok(Response::new("ok".to_owned())))
    }
}

#[tokio::test]
async fn poll_ready_pending_and_errors_come_from_the_inner_service() {
    let gated = Gated::default();
    let mut svc = SessionLayer::new(MemoryStore::default()).layer(gated.clone());
    let waiting = tokio::spawn(async move {
        svc.ready().await.unwrap();
        svc
    });
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(
        !waiting.is_finished(),
        "ready while the inner service is not"
    );
    gated.set(1);
    let mut svc = tokio::time::timeout(Duration::from_secs(5), waiting)
        .await
        .expect("the inner service's wake-up did not reach the caller")
        .unwrap();
    assert_eq!(
        svc.call(Request::new(String::new())).await.unwrap().body(),
        "ok"
    );
    gated.set(2);
    assert_eq!(svc.ready().await.err(), Some("inner service failed"));
}
