//! Micro-benchmarks of the hot pieces (divan): `cargo bench --bench micro`.
//!
//! - finding the session id in a Cookie header (bare, and signed with the current or an older
//!   key);
//! - id generation, parsing and display;
//! - whole requests through `SessionService` in-process (no network): a loaded session's
//!   `get` and `insert`, with records of 100 B, 4 KiB and 64 KiB, which includes decoding the
//!   stored record (`/read`) and encoding it again (`/counter`);
//! - the memory store's `load` and `save` on one and two threads.
#![allow(clippy::wildcard_imports)] // each bench module uses the file's imports
use std::cell::Cell;
use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use divan::{Bencher, black_box};
use http::{HeaderMap, HeaderValue, Request, Response, header::COOKIE};
use http_body_util::{Empty, Full};
use hyper::service::Service;
use hyper_sessions::__fuzz::SignedLookup;
use hyper_sessions::__fuzz::find_session as find_session_id;
use hyper_sessions::store::{Key, Record, SessionStore};
use hyper_sessions::{Id, MemoryStore, Session, SessionLayer, SessionService};

fn main() {
    divan::main();
}

mod cookie {
    use super::*;

    fn headers(value: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(COOKIE, HeaderValue::from_str(value).unwrap());
        h
    }

    #[divan::bench]
    fn id_alone(b: Bencher) {
        let h = headers(&format!("id={}", Id::random()));
        b.bench(|| find_session_id(black_box(&h), "id"));
    }

    #[divan::bench]
    fn id_among_ten_cookies(b: Bencher) {
        let others = "pref=value; ".repeat(9);
        let h = headers(&format!("{others}id={}", Id::random()));
        b.bench(|| find_session_id(black_box(&h), "id"));
    }

    #[divan::bench]
    fn absent(b: Bencher) {
        let h = headers("theme=dark; lang=en");
        b.bench(|| find_session_id(black_box(&h), "id"));
    }

    /// With signing keys: a cookie signed with the current key (one keyed BLAKE3).
    #[divan::bench]
    fn signed_current_key(b: Bencher) {
        let lookup = SignedLookup::new(&[[1; 32], [2; 32]]);
        let h = headers(&format!("id={}", lookup.sign("id", Id::random())));
        assert!(lookup.find(&h, "id"));
        b.bench(|| lookup.find(black_box(&h), "id"));
    }

    /// With signing keys: a cookie signed with the older key (two MACs).
    #[divan::bench]
    fn signed_older_key(b: Bencher) {
        let older = SignedLookup::new(&[[2; 32]]);
        let lookup = SignedLookup::new(&[[1; 32], [2; 32]]);
        let h = headers(&format!("id={}", older.sign("id", Id::random())));
        assert!(lookup.find(&h, "id"));
        b.bench(|| lookup.find(black_box(&h), "id"));
    }
}

mod id {
    use super::*;

    #[divan::bench]
    fn random() -> Id {
        Id::random()
    }

    #[divan::bench]
    fn parse(b: Bencher) {
        let text = Id::random().to_string();
        b.bench(|| black_box(text.as_str()).parse::<Id>());
    }

    #[divan::bench]
    fn display(b: Bencher) {
        let id = Id::random();
        b.bench(|| black_box(id).to_string());
    }

    #[divan::bench]
    fn store_key(b: Bencher) {
        let id = Id::random();
        b.bench(|| Key::of(black_box(id)));
    }
}

type Body = Full<Bytes>;
type Req = Request<Empty<Bytes>>;

async fn app(req: Req) -> Result<Response<Body>, Infallible> {
    let session = Session::from_request(&req).unwrap();
    let body = match req.uri().path() {
        "/read" => session
            .get::<String>("v")
            .await
            .unwrap()
            .unwrap_or_default()
            .len(),
        "/counter" => {
            let n: u64 = session.get("n").await.unwrap().unwrap_or(0);
            session.insert("n", &(n + 1)).await.unwrap();
            0
        }
        "/fill" => {
            let size: usize = req.uri().query().unwrap().parse().unwrap();
            session.insert("v", &"x".repeat(size)).await.unwrap();
            0
        }
        _ => 0,
    };
    Ok(Response::new(Full::new(Bytes::from(body.to_string()))))
}

/// The application as a hyper service.
#[derive(Clone, Copy)]
struct App;

impl Service<Req> for App {
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Response<Body>, Infallible>> + Send>>;

    fn call(&self, req: Req) -> Self::Future {
        Box::pin(app(req))
    }
}

struct InProcess {
    rt: tokio::runtime::Runtime,
    service: SessionService<App>,
    cookie: HeaderValue,
}

impl InProcess {
    /// A service on a memory store with one session holding a string of `size` bytes.
    fn new(size: usize) -> Self {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let service = SessionLayer::new(MemoryStore::default()).wrap(App);
        let fill = Request::get(format!("/fill?{size}"))
            .body(Empty::new())
            .unwrap();
        let resp = rt.block_on(service.call(fill)).unwrap();
        let set = resp.headers().get("set-cookie").unwrap().to_str().unwrap();
        let cookie = HeaderValue::from_str(set.split(';').next().unwrap()).unwrap();
        InProcess {
            rt,
            service,
            cookie,
        }
    }

    fn request(&self, path: &'static str) {
        let req = Request::get(path)
            .header(COOKIE, self.cookie.clone())
            .body(Empty::new())
            .unwrap();
        let resp = self.rt.block_on(self.service.call(req)).unwrap();
        assert!(resp.status().is_success());
    }
}

mod request {
    use super::*;

    const SIZES: [usize; 3] = [100, 4 << 10, 64 << 10];

    #[divan::bench(args = SIZES)]
    fn untouched(b: Bencher, size: usize) {
        let p = InProcess::new(size);
        b.bench(|| p.request("/untouched"));
    }

    /// Load, decode, `get` of the string.
    #[divan::bench(args = SIZES)]
    fn read(b: Bencher, size: usize) {
        let p = InProcess::new(size);
        b.bench(|| p.request("/read"));
    }

    /// Load, decode, `get` and `insert` of a counter, encode, compare-and-set.
    #[divan::bench(args = SIZES)]
    fn counter(b: Bencher, size: usize) {
        let p = InProcess::new(size);
        b.bench(|| p.request("/counter"));
    }
}

mod memory_store {
    use super::*;

    fn filled(n: usize) -> (MemoryStore, Arc<Vec<Key>>) {
        let store = MemoryStore::default();
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let expires = SystemTime::now() + Duration::from_secs(3600);
        let ids: Vec<Key> = (0..n).map(|_| Key::of(Id::random())).collect();
        rt.block_on(async {
            for id in &ids {
                let rec = Record::new(*id, Bytes::from_static(br#"{"d":{"n":1}}"#), 1, expires);
                store.create(&rec).await.unwrap();
            }
        });
        (store, Arc::new(ids))
    }

    thread_local! {
        static NEXT: Cell<usize> = const { Cell::new(0) };
    }

    /// A spread of indices, per thread, outside the timed part.
    fn next_index(len: usize) -> usize {
        NEXT.with(|n| {
            n.set(n.get().wrapping_add(7919));
            n.get() % len
        })
    }

    fn block<F: Future>(f: F) -> F::Output {
        // The memory store never awaits anything: one poll finishes it.
        let waker = std::task::Waker::noop();
        let mut cx = std::task::Context::from_waker(waker);
        let mut f = std::pin::pin!(f);
        match f.as_mut().poll(&mut cx) {
            std::task::Poll::Ready(v) => v,
            std::task::Poll::Pending => unreachable!("the memory store does not wait"),
        }
    }

    #[divan::bench(threads = [1, 2])]
    fn load(b: Bencher) {
        let (store, ids) = filled(10_000);
        b.with_inputs(|| ids[next_index(ids.len())])
            .bench_values(|id| block(store.load(&id)).unwrap());
    }

    #[divan::bench(threads = [1, 2])]
    fn save(b: Bencher) {
        let (store, ids) = filled(10_000);
        let expires = SystemTime::now() + Duration::from_secs(3600);
        b.with_inputs(|| {
            let id = ids[next_index(ids.len())];
            Record::new(id, Bytes::from_static(br#"{"d":{"n":2}}"#), 2, expires)
        })
        // After the first save of an id its version has moved on: a conflict, which costs
        // the same lookup under the shard lock as a save.
        .bench_refs(|rec| block(store.save(rec, 1)).unwrap());
    }
}
