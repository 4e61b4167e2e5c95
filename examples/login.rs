//! Login with id cycling, a protected page, logout with destroy, a flash shown after the
//! redirect, and a "your devices" page: the user's sessions, each with a button that ends it,
//! and "log out everywhere else".
//!
//! ```text
//! cargo run --example login          # http://127.0.0.1:8000/ (PORT to change)
//! curl -c jar -b jar -i 'http://127.0.0.1:8000/login?user=ada&device=laptop'
//! curl -c jar2 -b jar2 -i 'http://127.0.0.1:8000/login?user=ada&device=phone'
//! curl -c jar -b jar http://127.0.0.1:8000/
//! curl -c jar -b jar http://127.0.0.1:8000/devices
//! curl -c jar -b jar -i -X POST http://127.0.0.1:8000/devices/revoke-others
//! curl -c jar2 -b jar2 http://127.0.0.1:8000/          # the phone is logged out
//! curl -c jar -b jar -i http://127.0.0.1:8000/logout
//! ```
//!
//! The revoke buttons POST: the session cookie's default `SameSite=Lax` keeps other sites from
//! posting them with the user's cookie.

use std::convert::Infallible;
use std::fmt::Write;
use std::net::SocketAddr;

use http_body_util::{BodyExt, Full, Limited};
use hyper::body::{Bytes, Incoming};
use hyper::header::{CONTENT_TYPE, LOCATION, USER_AGENT};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_sessions::{Error, Handle, MemoryStore, Session, SessionLayer};
use hyper_util::rt::TokioIo;

fn redirect(to: &'static str) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::default());
    *resp.status_mut() = StatusCode::SEE_OTHER;
    resp.headers_mut()
        .insert(LOCATION, to.parse().expect("valid header"));
    resp
}

fn status(code: StatusCode) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::default());
    *resp.status_mut() = code;
    resp
}

/// The value of `name` in a query string or form body, if it is plain (letters, digits, `-`).
fn param<'a>(query: &'a str, name: &str) -> Option<&'a str> {
    query
        .split('&')
        .find_map(|kv| kv.strip_prefix(name)?.strip_prefix('='))
        .filter(|v| !v.is_empty() && v.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-'))
}

/// Text made safe to put in HTML.
fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

fn seconds(t: std::time::SystemTime) -> u64 {
    t.duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The "your devices" page: the user's sessions, most recent first, each with a revoke button.
async fn devices(session: &Session) -> Result<Response<Full<Bytes>>, Error> {
    let mut html = String::from("<h1>Your devices</h1>\n<ul>\n");
    for device in session.owner_sessions().await? {
        let label = device.label.as_deref().unwrap_or("unnamed device");
        let this = if device.current { " (this device)" } else { "" };
        // Writing into a String cannot fail.
        let _ = writeln!(
            html,
            "<li>{}{this}: signed in at {}, last seen at {} (Unix seconds) \
             <form method=post action=/devices/revoke><input type=hidden name=handle value={}>\
             <button>Log out</button></form></li>",
            escape(label),
            seconds(device.created),
            seconds(device.last_seen),
            device.handle,
        );
    }
    html.push_str(
        "</ul>\n<form method=post action=/devices/revoke-others>\
         <button>Log out everywhere else</button></form>\n",
    );
    let mut resp = Response::new(Full::new(Bytes::from(html)));
    resp.headers_mut().insert(
        CONTENT_TYPE,
        "text/html; charset=utf-8".parse().expect("valid header"),
    );
    Ok(resp)
}

async fn app(session: &Session, req: Request<Incoming>) -> Result<Response<Full<Bytes>>, Error> {
    let logged_in = session.owner().await?.is_some();
    match (req.method(), req.uri().path()) {
        (_, "/login") => {
            let query = req.uri().query().unwrap_or_default();
            let user = param(query, "user").unwrap_or("guest").to_owned();
            // The app names the device: from the form, else from the browser's user agent.
            let device = param(query, "device").map(str::to_owned).or_else(|| {
                let agent = req.headers().get(USER_AGENT)?.to_str().ok()?;
                Some(agent.chars().take(64).collect())
            });
            // A new id on login: an id planted before login is worthless after it.
            session.cycle_id().await?;
            // The owner: this session is now one of the user's, listed on /devices.
            session.set_owner(&user).await?;
            if let Some(device) = device.filter(|d| !d.is_empty()) {
                session.set_label(&device).await?;
            }
            session.insert("user", &user).await?;
            session
                .flash("notice", &format!("Welcome, {user}!"))
                .await?;
            Ok(redirect("/"))
        }
        (_, "/logout") => {
            session.destroy().await?;
            Ok(redirect("/"))
        }
        (_, "/devices") if logged_in => devices(session).await,
        (&Method::POST, "/devices/revoke") if logged_in => {
            // A small form body: `handle=...`.
            let body = Limited::new(req.into_body(), 1024).collect().await;
            let body = body
                .map(http_body_util::Collected::to_bytes)
                .unwrap_or_default();
            let form = String::from_utf8_lossy(&body);
            let Some(handle) = param(&form, "handle").and_then(|h| h.parse::<Handle>().ok()) else {
                return Ok(status(StatusCode::BAD_REQUEST));
            };
            // Only this user's sessions can be revoked: a handle of another user's is not found.
            if !session.revoke(handle).await? {
                return Ok(status(StatusCode::NOT_FOUND));
            }
            Ok(redirect("/devices"))
        }
        (&Method::POST, "/devices/revoke-others") if logged_in => {
            let ended = session.revoke_others().await?;
            session
                .flash("notice", &format!("Logged out {ended} other device(s)."))
                .await?;
            Ok(redirect("/"))
        }
        (_, "/devices" | "/devices/revoke" | "/devices/revoke-others") => {
            Ok(status(StatusCode::UNAUTHORIZED))
        }
        (_, "/") => {
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
        _ => Ok(status(StatusCode::NOT_FOUND)),
    }
}

async fn handle(req: Request<Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
    let session = Session::from_request(&req).expect("the SessionLayer wraps this service");
    Ok(app(&session, req).await.unwrap_or_else(|e| {
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
