//! Shared test harness: a real hyper server on 127.0.0.1:0 running the example app behind a
//! `SessionLayer`, a real HTTP client, and the store conformance suite.
#![allow(dead_code, clippy::missing_panics_doc)]

pub mod conformance;
pub mod servers;

#[path = "../../examples/common/app.rs"]
pub mod app;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::SystemTime;

use http_body_util::{BodyExt, Empty};
use hyper::body::Bytes;
use hyper::header::{COOKIE, SET_COOKIE};
use hyper::{Request, StatusCode};
use hyper_sessions::{
    CreateOutcome, Id, Record, SaveOutcome, SessionLayer, SessionStore, StoreError,
};
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

/// Serves the example app behind `layer` on a free loopback port, HTTP/1.1 and HTTP/2.
pub async fn serve(layer: &SessionLayer) -> TestServer {
    let service = layer.wrap(hyper::service::service_fn(app::handle));
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
}

impl<S> Observed<S> {
    pub fn new(inner: S) -> Self {
        Observed {
            inner,
            loads: Arc::default(),
            writes: Arc::default(),
            down: Arc::default(),
        }
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
    async fn load(&self, id: &Id) -> Result<Option<Record>, StoreError> {
        self.loads.fetch_add(1, Ordering::SeqCst);
        self.check()?;
        self.inner.load(id).await
    }
    async fn create(&self, record: &Record) -> Result<CreateOutcome, StoreError> {
        self.writes.fetch_add(1, Ordering::SeqCst);
        self.check()?;
        self.inner.create(record).await
    }
    async fn save(&self, record: &Record, expected: u64) -> Result<SaveOutcome, StoreError> {
        self.writes.fetch_add(1, Ordering::SeqCst);
        self.check()?;
        self.inner.save(record, expected).await
    }
    async fn delete(&self, id: &Id) -> Result<(), StoreError> {
        self.writes.fetch_add(1, Ordering::SeqCst);
        self.check()?;
        self.inner.delete(id).await
    }
    async fn touch(&self, id: &Id, expires_at: SystemTime) -> Result<bool, StoreError> {
        self.writes.fetch_add(1, Ordering::SeqCst);
        self.check()?;
        self.inner.touch(id, expires_at).await
    }
}
