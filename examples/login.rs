//! Login with id cycling, a protected page, logout with destroy, and a flash shown after the
//! redirect.
//!
//! ```text
//! cargo run --example login          # http://127.0.0.1:8000/ (PORT to change)
//! curl -c jar -b jar -i 'http://127.0.0.1:8000/login?user=ada'
//! curl -c jar -b jar http://127.0.0.1:8000/
//! curl -c jar -b jar -i http://127.0.0.1:8000/logout
//! ```

use std::convert::Infallible;
use std::net::SocketAddr;

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::header::LOCATION;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_sessions::{Error, MemoryStore, Session, SessionLayer};
use hyper_util::rt::TokioIo;

fn redirect(to: &'static str) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::default());
    *resp.status_mut() = StatusCode::SEE_OTHER;
    resp.headers_mut()
        .insert(LOCATION, to.parse().expect("valid header"));
    resp
}

async fn app(session: &Session, req: &Request<Incoming>) -> Result<Response<Full<Bytes>>, Error> {
    match req.uri().path() {
        "/login" => {
            let user = req
                .uri()
                .query()
                .and_then(|q| q.strip_prefix("user="))
                .filter(|u| !u.is_empty() && u.bytes().all(|b| b.is_ascii_alphanumeric()))
                .unwrap_or("guest")
                .to_owned();
            // A new id on login: an id planted before login is worthless after it.
            session.cycle_id().await?;
            session.insert("user", &user).await?;
            session
                .flash("notice", &format!("Welcome, {user}!"))
                .await?;
            Ok(redirect("/"))
        }
        "/logout" => {
            session.destroy().await?;
            Ok(redirect("/"))
        }
        "/" => {
            let Some(user) = session.get::<String>("user").await? else {
                let mut resp = Response::new(Full::new(Bytes::from(
                    "Not logged in. Visit /login?user=NAME\n",
                )));
                *resp.status_mut() = StatusCode::UNAUTHORIZED;
                return Ok(resp);
            };
            let notice = session
                .take_flash::<String>("notice")
                .await?
                .unwrap_or_default();
            Ok(Response::new(Full::new(Bytes::from(format!(
                "{notice}\nHello {user}, this page is protected.\n"
            )))))
        }
        _ => {
            let mut resp = Response::new(Full::default());
            *resp.status_mut() = StatusCode::NOT_FOUND;
            Ok(resp)
        }
    }
}

async fn handle(req: Request<Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
    let session = Session::from_request(&req).expect("the SessionLayer wraps this service");
    Ok(app(&session, &req).await.unwrap_or_else(|e| {
        eprintln!("session error: {e}");
        let mut resp = Response::new(Full::default());
        *resp.status_mut() = StatusCode::INTERNAL_SERVER_ERROR;
        resp
    }))
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let port: u16 = std::env::var("PORT")
        .ok()
        .and_then(|p| p.parse().ok())
        .unwrap_or(8000);
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let service = SessionLayer::new(MemoryStore::default()).wrap(service_fn(handle));
    let listener = tokio::net::TcpListener::bind(addr).await?;
    println!("login example on http://{addr}/");
    loop {
        let (stream, _) = listener.accept().await?;
        let service = service.clone();
        tokio::spawn(async move {
            let _ = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}
