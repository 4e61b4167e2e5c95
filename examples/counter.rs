//! The classic page counter, with a flash message from the previous visit.
//!
//! ```text
//! cargo run --example counter        # then open http://127.0.0.1:8000/ (PORT to change)
//! ```
//!
//! The cookie is `Secure` by default; browsers still keep it on `http://127.0.0.1`, and curl
//! does with a cookie jar: `curl -c jar -b jar http://127.0.0.1:8000/`.

use std::convert::Infallible;
use std::net::SocketAddr;

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_sessions::{MemoryStore, Session, SessionLayer};
use hyper_util::rt::TokioIo;

async fn counter(req: Request<Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
    let session = Session::from_request(&req).expect("the SessionLayer wraps this service");
    let page = async {
        let visits: u64 = session.get("pageCount").await?.unwrap_or(0);
        let previous: Option<String> = session.take_flash("message").await?;
        session.insert("pageCount", &(visits + 1)).await?;
        session
            .flash("message", &format!("Hello from visit {}", visits + 1))
            .await?;
        let body = match previous {
            Some(message) => format!("Visited page {visits} times\nFlash: {message}"),
            None => format!("Visited page {visits} times"),
        };
        Ok::<_, hyper_sessions::Error>(body)
    };
    Ok(match page.await {
        Ok(body) => Response::new(Full::new(Bytes::from(body))),
        Err(e) => {
            eprintln!("session error: {e}");
            let mut resp = Response::new(Full::default());
            *resp.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
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
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let service = SessionLayer::new(MemoryStore::default()).wrap(service_fn(counter));
    let listener = tokio::net::TcpListener::bind(addr).await?;
    println!("counter listening on http://{addr}/");
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
