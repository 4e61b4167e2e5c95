//! The page counter on Redis: run several copies on different ports and they share sessions.
//!
//! ```text
//! redis-server --port 6379 &                       # or any Redis 7+ / Valkey
//! cargo run --example redis --features redis       # http://127.0.0.1:8000/
//! REDIS_URL=redis://:password@host:6379/2 PORT=8001 cargo run --example redis --features redis
//! REDIS_CLUSTER=1 REDIS_URL=redis://127.0.0.1:7000 cargo run --example redis --features redis
//! ```
//!
//! Each visit costs Redis two commands (load, then the compare-and-set save); the session's
//! key is `session:<id>` with a TTL of a day, sliding on every visit.

use std::convert::Infallible;
use std::net::SocketAddr;

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_sessions::{RedisStore, Session, SessionLayer};
use hyper_util::rt::TokioIo;

async fn counter(req: Request<Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
    let session = Session::from_request(&req).expect("the SessionLayer wraps this service");
    // `update` is atomic across app servers: concurrent visits are all counted.
    Ok(
        match session
            .update("pageCount", |n: Option<u64>| n.unwrap_or(0) + 1)
            .await
        {
            Ok(n) => Response::new(Full::new(Bytes::from(format!("Visited {n} times")))),
            Err(e) => {
                // Redis down or slow: the layer would answer 503 too; say nothing more.
                eprintln!("session error: {e}");
                let mut resp = Response::new(Full::default());
                *resp.status_mut() = if e.is_unavailable() {
                    StatusCode::SERVICE_UNAVAILABLE
                } else {
                    StatusCode::INTERNAL_SERVER_ERROR
                };
                resp
            }
        },
    )
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let port: u16 = std::env::var("PORT")
        .ok()
        .and_then(|p| p.parse().ok())
        .unwrap_or(8000);
    let url = std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".to_owned());
    let store = if std::env::var_os("REDIS_CLUSTER").is_some() {
        RedisStore::open_cluster([url.as_str()]).await?
    } else {
        RedisStore::open(url.as_str()).await?
    };
    let service = SessionLayer::new(store).wrap(service_fn(counter));
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let listener = tokio::net::TcpListener::bind(addr).await?;
    println!("counter on Redis at {url}, listening on http://{addr}/");
    loop {
        let (stream, _) = listener.accept().await?;
        let service = service.clone();
        tokio::spawn(async move {
            if let Err(e) = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await
            {
                eprintln!("connection error: {e}");
            }
        });
    }
}
