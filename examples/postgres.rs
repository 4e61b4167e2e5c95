//! The page counter on PostgreSQL: copies on several ports share the sessions, and the count
//! goes on across restarts.
//!
//! ```text
//! POSTGRES_URL=postgres://app@127.0.0.1/app cargo run --example postgres --features postgres
//! # or over a Unix socket: POSTGRES_URL="host=/var/run/postgresql user=app dbname=app"
//! curl -c jar -b jar http://127.0.0.1:8000/               # run it a few times, restart, again
//! ```

use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::Duration;

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_sessions::{PostgresStore, Session, SessionLayer};
use hyper_util::rt::TokioIo;

async fn counter(req: Request<Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
    let session = Session::from_request(&req).expect("the SessionLayer wraps this service");
    let visits = session
        .update("pageCount", |n: Option<u64>| n.unwrap_or(0) + 1)
        .await;
    Ok(match visits {
        Ok(n) => Response::new(Full::new(Bytes::from(format!("Visited page {n} times")))),
        Err(e) => {
            eprintln!("session error: {e}");
            let mut resp = Response::new(Full::default());
            *resp.status_mut() = if e.is_unavailable() {
                StatusCode::SERVICE_UNAVAILABLE
            } else {
                StatusCode::INTERNAL_SERVER_ERROR
            };
            resp
        }
    })
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let port: u16 = std::env::var("PORT")
        .ok()
        .and_then(|p| p.parse().ok())
        .unwrap_or(8000);
    let url = std::env::var("POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_owned());
    let store = PostgresStore::builder()
        .cleanup_interval(Some(Duration::from_secs(60)))
        .open(&url)
        .await?;
    let label = format!("{store:?}");
    let service = SessionLayer::new(store).wrap(service_fn(counter));
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let listener = tokio::net::TcpListener::bind(addr).await?;
    println!("counter on {label} listening on http://{addr}/");
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
