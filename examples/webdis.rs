//! The page counter on Redis through Webdis (HTTP or HTTPS): run several copies and they
//! share sessions, with each other and with the Redis store on the same Redis.
//!
//! ```text
//! redis-server --port 6379 &
//! webdis /etc/webdis/webdis.json &                  # Debian's config: http://127.0.0.1:7379
//! cargo run --example webdis --features webdis      # http://127.0.0.1:8000/
//! WEBDIS_URL=http://user:password@127.0.0.1:7379 PORT=8001 cargo run --example webdis --features webdis
//! WEBDIS_URL=https://webdis.internal:7380 WEBDIS_CA=ca.pem cargo run --example webdis --features webdis
//! ```
//!
//! Each visit costs two requests to Webdis (load, then the compare-and-set save), over
//! keep-alive connections; the session's key is `session:<id>` with a TTL of a day.

use std::convert::Infallible;
use std::net::SocketAddr;

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_sessions::native_tls::{Certificate, TlsConnector};
use hyper_sessions::{Session, SessionLayer, WebdisStore};
use hyper_util::rt::TokioIo;

async fn counter(req: Request<Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
    let session = Session::from_request(&req).expect("the SessionLayer wraps this service");
    Ok(
        match session
            .update("pageCount", |n: Option<u64>| n.unwrap_or(0) + 1)
            .await
        {
            Ok(n) => Response::new(Full::new(Bytes::from(format!("Visited {n} times")))),
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
        },
    )
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let port: u16 = std::env::var("PORT")
        .ok()
        .and_then(|p| p.parse().ok())
        .unwrap_or(8000);
    let url = std::env::var("WEBDIS_URL").unwrap_or_else(|_| "http://127.0.0.1:7379".to_owned());
    let mut builder = WebdisStore::builder();
    // A private CA for an https:// Webdis (behind stunnel, nginx, ...).
    if let Ok(ca) = std::env::var("WEBDIS_CA") {
        let ca = Certificate::from_pem(&std::fs::read(ca)?)?;
        builder = builder.tls_connector(TlsConnector::builder().add_root_certificate(ca).build()?);
    }
    let store = builder.open(&url).await?;
    println!("{store:?}");
    let service = SessionLayer::new(store).wrap(service_fn(counter));
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let listener = tokio::net::TcpListener::bind(addr).await?;
    println!("counter on Webdis, listening on http://{addr}/");
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
