//! The bare-hyper baseline of the benchmark (`shared/bench/SPEC.md`): the same endpoints as
//! `bench_server` with constant bodies and no sessions, so the load benchmark can show what
//! the session layer costs. `bare_server --port PORT` (other flags are ignored).

use std::convert::Infallible;
use std::net::SocketAddr;

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::header::{CONTENT_TYPE, HeaderValue};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;

async fn handle(req: Request<Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
    let body: &'static str = match req.uri().path() {
        "/untouched" => "ok",
        "/read" | "/login" => "0",
        "/counter" => "1",
        _ => {
            let mut resp = Response::new(Full::default());
            *resp.status_mut() = StatusCode::NOT_FOUND;
            return Ok(resp);
        }
    };
    let mut resp = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    resp.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    Ok(resp)
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut port = 3000;
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        if flag == "--port" {
            port = args.next().ok_or("--port needs a value")?.parse()?;
        }
    }
    let listener = tokio::net::TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], port))).await?;
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let _ = stream.set_nodelay(true);
        tokio::spawn(async move {
            let _ = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service_fn(handle))
                .await;
        });
    }
}
