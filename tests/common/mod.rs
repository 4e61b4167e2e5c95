//! Shared test harness: a real hyper server on 127.0.0.1:0 running the example app behind a
//! `SessionLayer`, a real HTTP client, and the store conformance suite.
#![allow(dead_code, clippy::missing_panics_doc)]

pub mod conformance;
pub mod faults;
pub mod lifecycle;
pub mod model;
pub mod owners;
pub mod script;
pub mod servers;

#[path = "../../examples/common/app.rs"]
pub mod app;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::SystemTime;

use http_body_util::{BodyExt, Empty};
use hyper::body::{Bytes, Incoming};
use hyper::header::{COOKIE, SET_COOKIE};
use hyper::{Request, StatusCode};
use hyper_sessions::store::{CreateOutcome, Key, Record, SaveOutcome, SessionStore, StoreError};
use hyper_sessions::{Id, SessionLayer};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

/// A server that stops when dropped.
pub struct TestServer {
    pub addr: SocketAddr,
    task: JoinHandle<()>,
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Which server stack [`serve`] puts the session layer in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stack {
    /// `SessionLayer::wrap` around a hyper `service_fn`: the hyper path.
    Hyper,
    /// An axum `Router` with the layer, the handler taking the `Session` extractor, served by
    /// `axum::serve`.
    #[cfg(feature = "axum")]
    Axum,
    /// A tower `ServiceBuilder` stack: a timeout around the session layer, a concurrency limit
    /// inside it (whose readiness the layer must forward), served through hyper-util's
    /// `TowerToHyperService`.
    #[cfg(feature = "tower")]
    Tower,
}

tokio::task_local! {
    /// The stack [`serve`] uses inside `STACK.scope(stack, test)`; [`Stack::Hyper`] outside.
    /// This is how the HTTP half of the conformance suite runs unchanged over every stack.
    pub static STACK: Stack;
}

/// Serves the example app behind `layer` on a free loopback port, HTTP/1.1 and HTTP/2, in the
/// stack chosen by [`STACK`] (the hyper path by default).
pub async fn serve(layer: &SessionLayer) -> TestServer {
    serve_on(STACK.try_with(|s| *s).unwrap_or(Stack::Hyper), layer).await
}

/// Serves the example app behind `layer` in `stack`. Every stack answers `GET /__stack` with
/// its name, so a test can check which one it talks to.
pub async fn serve_on(stack: Stack, layer: &SessionLayer) -> TestServer {
    match stack {
        Stack::Hyper => {
            let service = layer.wrap(hyper::service::service_fn(|req: Request<Incoming>| {
                let stack_probe = req.uri().path() == "/__stack";
                async move {
                    if stack_probe {
                        Ok(hyper::Response::new(app::Body::from("hyper")))
                    } else {
                        app::handle(req).await
                    }
                }
            }));
            serve_service(service).await
        }
        #[cfg(feature = "axum")]
        Stack::Axum => serve_axum(axum_router(layer)).await,
        #[cfg(feature = "tower")]
        Stack::Tower => serve_tower(layer, std::time::Duration::from_secs(30)).await,
    }
}

/// The example app as an axum `Router` (`app::axum_router`), plus `/__stack` naming the stack.
#[cfg(feature = "axum")]
pub fn axum_router(layer: &SessionLayer) -> axum::Router {
    app::axum_router(layer).route("/__stack", axum::routing::get(|| async { "axum" }))
}

/// Serves an axum router with `axum::serve` on a free loopback port.
#[cfg(feature = "axum")]
pub async fn serve_axum(router: axum::Router) -> TestServer {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        axum::serve(listener, router).await.unwrap();
    });
    TestServer { addr, task }
}

/// Serves the example app in a tower stack: `timeout` around the session layer, a concurrency
/// limit of 256 inside it, then the app as a `tower::service_fn`.
#[cfg(feature = "tower")]
pub async fn serve_tower(layer: &SessionLayer, timeout: std::time::Duration) -> TestServer {
    let service = tower::ServiceBuilder::new()
        .timeout(timeout)
        .layer(layer.clone())
        .concurrency_limit(256)
        .service_fn(|req: Request<Incoming>| async move {
            if req.uri().path() == "/__stack" {
                Ok(hyper::Response::new(app::Body::from("tower")))
            } else {
                app::handle(req).await
            }
        });
    serve_service(hyper_util::service::TowerToHyperService::new(service)).await
}

/// Serves a hyper service on a free loopback port, HTTP/1.1 and HTTP/2.
pub async fn serve_service<S, B>(service: S) -> TestServer
where
    S: hyper::service::Service<Request<Incoming>, Response = hyper::Response<B>>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    B: hyper::body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let service = service.clone();
            tokio::spawn(async move {
                let _ = auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    TestServer { addr, task }
}

/// One response, read whole.
#[derive(Debug, Clone)]
pub struct Resp {
    pub status: StatusCode,
    pub headers: hyper::HeaderMap,
    pub body: String,
}

impl Resp {
    pub fn set_cookies(&self) -> Vec<String> {
        self.headers
            .get_all(SET_COOKIE)
            .iter()
            .map(|v| v.to_str().unwrap().to_owned())
            .collect()
    }

    /// The single session `Set-Cookie`, if any.
    pub fn session_cookie(&self) -> Option<String> {
        let all = self.set_cookies();
        assert!(all.len() <= 1, "more than one Set-Cookie: {all:?}");
        all.into_iter().next()
    }

    /// The `id=value` pair of the session cookie set by this response, if it sets one.
    pub fn cookie_pair(&self) -> Option<String> {
        self.session_cookie()
            .filter(|c| !c.contains("Max-Age=0"))
            .map(|c| c.split(';').next().unwrap().to_owned())
    }

    pub fn removes_cookie(&self) -> bool {
        self.session_cookie()
            .is_some_and(|c| c.contains("Max-Age=0"))
    }
}

enum Sender {
    H1(hyper::client::conn::http1::SendRequest<Empty<Bytes>>),
    H2(hyper::client::conn::http2::SendRequest<Empty<Bytes>>),
}

/// One client connection (HTTP/1.1 keep-alive or HTTP/2).
pub struct Conn {
    sender: Sender,
}

impl Conn {
    pub async fn http1(addr: SocketAddr) -> Conn {
        let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .unwrap();
        tokio::spawn(conn);
        Conn {
            sender: Sender::H1(sender),
        }
    }

    pub async fn http2(addr: SocketAddr) -> Conn {
        let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        let (sender, conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
                .await
                .unwrap();
        tokio::spawn(conn);
        Conn {
            sender: Sender::H2(sender),
        }
    }

    /// Another handle on the same HTTP/2 connection (a new stream per request).
    pub fn share(&self) -> Conn {
        match &self.sender {
            Sender::H2(s) => Conn {
                sender: Sender::H2(s.clone()),
            },
            Sender::H1(_) => panic!("only an HTTP/2 connection can be shared"),
        }
    }

    /// GET `path` with these raw Cookie header values.
    pub async fn get_with(&mut self, path: &str, cookies: &[&[u8]]) -> Resp {
        let mut req = Request::get(path).header("host", "localhost");
        for c in cookies {
            req = req.header(COOKIE, hyper::header::HeaderValue::from_bytes(c).unwrap());
        }
        let req = req.body(Empty::new()).unwrap();
        let resp = match &mut self.sender {
            Sender::H1(s) => {
                s.ready().await.unwrap();
                s.send_request(req).await.unwrap()
            }
            Sender::H2(s) => {
                s.ready().await.unwrap();
                s.send_request(req).await.unwrap()
            }
        };
        let (parts, body) = resp.into_parts();
        let body = body.collect().await.unwrap().to_bytes();
        Resp {
            status: parts.status,
            headers: parts.headers,
            body: String::from_utf8(body.to_vec()).unwrap(),
        }
    }

    pub async fn get(&mut self, path: &str, cookie: Option<&str>) -> Resp {
        match cookie {
            Some(c) => self.get_with(path, &[c.as_bytes()]).await,
            None => self.get_with(path, &[]).await,
        }
    }
}

/// A browser-like client: one connection and a jar holding the session cookie.
pub struct Browser {
    addr: SocketAddr,
    conn: Conn,
    pub cookie: Option<String>,
}

impl Browser {
    pub async fn new(addr: SocketAddr) -> Browser {
        Browser {
            addr,
            conn: Conn::http1(addr).await,
            cookie: None,
        }
    }

    /// A browser that already holds `cookie` (`name=value`): a second tab, say.
    pub async fn with_cookie(addr: SocketAddr, cookie: &str) -> Browser {
        let mut browser = Browser::new(addr).await;
        browser.cookie = Some(cookie.to_owned());
        browser
    }

    pub async fn get(&mut self, path: &str) -> Resp {
        let resp = self.conn.get(path, self.cookie.as_deref()).await;
        if let Some(pair) = resp.cookie_pair() {
            self.cookie = Some(pair);
        } else if resp.removes_cookie() {
            self.cookie = None;
        }
        resp
    }

    /// The server this browser talks to.
    pub fn conn_addr(&self) -> SocketAddr {
        self.addr
    }

    /// The id in the jar.
    pub fn id(&self) -> Option<Id> {
        let c = self.cookie.as_ref()?;
        c.split_once('=')?.1.parse().ok()
    }

    /// The store key of the session the cookie names.
    pub fn key(&self) -> Option<Key> {
        self.id().map(Key::of)
    }
}

/// Milliseconds since the Unix epoch: the tests' clock arithmetic (stores keep expiries so).
pub fn unix_ms(t: SystemTime) -> u64 {
    let since = t.duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    u64::try_from(since.as_millis()).unwrap()
}

/// The instant `ms` milliseconds after the Unix epoch.
pub fn from_unix_ms(ms: u64) -> SystemTime {
    std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms)
}

/// A record whose expiry is given in milliseconds since the Unix epoch.
pub fn record_at_ms(key: Key, data: Bytes, version: u64, expires_ms: u64) -> Record {
    Record::new(key, data, version, from_unix_ms(expires_ms))
}

/// A record's expiry in milliseconds since the Unix epoch.
pub trait ExpiresMs {
    fn expires_at_unix_ms(&self) -> u64;
}

impl ExpiresMs for Record {
    fn expires_at_unix_ms(&self) -> u64 {
        unix_ms(self.expires_at())
    }
}

/// The store key of a new random id: a session no store has seen.
pub fn new_key() -> Key {
    Key::of(Id::random())
}

/// Wraps a real store to count its calls and, when switched, fail like a store that is down.
/// Used where a store failure must be provoked on a store that cannot go down by itself (the
/// memory store); the Redis and Webdis tests kill real servers instead.
#[derive(Clone)]
pub struct Observed<S> {
    pub inner: S,
    pub loads: Arc<AtomicUsize>,
    pub writes: Arc<AtomicUsize>,
    pub down: Arc<AtomicBool>,
    /// Only writes fail (loads still work): a store that goes down between load and save.
    pub writes_down: Arc<AtomicBool>,
    /// Every save loses the compare-and-set, as under endless concurrent writers.
    pub always_conflict: Arc<AtomicBool>,
    /// The ids of the records created, in order.
    pub created: Arc<std::sync::Mutex<Vec<Key>>>,
}

impl<S> Observed<S> {
    pub fn new(inner: S) -> Self {
        Observed {
            inner,
            loads: Arc::default(),
            writes: Arc::default(),
            down: Arc::default(),
            writes_down: Arc::default(),
            always_conflict: Arc::default(),
            created: Arc::default(),
        }
    }

    /// The ids of the records created so far, in order.
    pub fn created_ids(&self) -> Vec<Key> {
        self.created.lock().unwrap().clone()
    }

    fn check_write(&self) -> Result<(), StoreError> {
        if self.writes_down.load(Ordering::SeqCst) {
            return Err(StoreError::unavailable(std::io::Error::new(
                std::io::ErrorKind::ConnectionReset,
                "store refuses writes (test)",
            )));
        }
        self.check()
    }

    fn check(&self) -> Result<(), StoreError> {
        if self.down.load(Ordering::SeqCst) {
            Err(StoreError::unavailable(std::io::Error::new(
                std::io::ErrorKind::ConnectionRefused,
                "store is down (test)",
            )))
        } else {
            Ok(())
        }
    }
}

impl<S: SessionStore> SessionStore for Observed<S> {
    async fn load(&self, key: &Key) -> Result<Option<Record>, StoreError> {
        self.loads.fetch_add(1, Ordering::SeqCst);
        self.check()?;
        self.inner.load(key).await
    }
    async fn create(&self, record: &Record) -> Result<CreateOutcome, StoreError> {
        self.writes.fetch_add(1, Ordering::SeqCst);
        self.check_write()?;
        let outcome = self.inner.create(record).await?;
        if outcome == CreateOutcome::Created {
            self.created.lock().unwrap().push(record.key());
        }
        Ok(outcome)
    }
    async fn save(&self, record: &Record, expected: u64) -> Result<SaveOutcome, StoreError> {
        self.writes.fetch_add(1, Ordering::SeqCst);
        self.check_write()?;
        if self.always_conflict.load(Ordering::SeqCst) {
            return Ok(SaveOutcome::Conflict);
        }
        self.inner.save(record, expected).await
    }
    async fn delete(&self, key: &Key) -> Result<(), StoreError> {
        self.writes.fetch_add(1, Ordering::SeqCst);
        self.check_write()?;
        self.inner.delete(key).await
    }
    async fn touch(
        &self,
        key: &Key,
        expected: u64,
        expires_at: SystemTime,
    ) -> Result<SaveOutcome, StoreError> {
        self.writes.fetch_add(1, Ordering::SeqCst);
        self.check_write()?;
        self.inner.touch(key, expected, expires_at).await
    }
    async fn remove(&self, key: &Key, expected: u64) -> Result<SaveOutcome, StoreError> {
        self.writes.fetch_add(1, Ordering::SeqCst);
        self.check_write()?;
        self.inner.remove(key, expected).await
    }
    async fn owned(&self, owner: &str) -> Result<Vec<Record>, StoreError> {
        self.loads.fetch_add(1, Ordering::SeqCst);
        self.check()?;
        self.inner.owned(owner).await
    }
}
