//! The session layer on axum 0.8, with the memory store: the classic page counter with a flash
//! message, and a login/logout flow with HTML forms that POST (id cycling on login, destroy on
//! logout, "remember me" as the session's own expiry).
//!
//! ```text
//! cargo run --example axum --features axum     # http://localhost:8000/ (PORT or --port to change)
//! curl -c jar -b jar http://localhost:8000/                                  # counter and flash
//! curl -c jar -b jar -i -d user=ada -d remember=on http://localhost:8000/login  # new id, redirect
//! curl -c jar -b jar http://localhost:8000/me                                # the protected page
//! curl -c jar -b jar -i -X POST http://localhost:8000/logout                 # removal cookie
//! ```
//!
//! Handlers return `Result<_, hyper_sessions::Error>` and use `?`: the error answers 503 when
//! the store is unavailable and 500 otherwise, with an empty body, and is logged. Logging in and
//! out changes state, so both are POSTs (a GET that logs out can be triggered by any page the
//! user visits). A real application also checks a CSRF token on them; the session's
//! `SameSite=Lax` cookie already keeps other sites' form posts from carrying it.
//!
//! The benchmark's endpoints on axum are `bench_server --stack axum`.

use std::net::SocketAddr;
use std::time::Duration;

use axum::Form;
use axum::Router;
use axum::http::StatusCode;
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use hyper_sessions::{Error, Expiry, MemoryStore, Session, SessionLayer};
use serde::Deserialize;

/// The classic counter: the visit count, and the flash left by the previous visit.
async fn index(session: Session) -> Result<Html<String>, Error> {
    let visits: u64 = session.get("pageCount").await?.unwrap_or(0);
    let previous: Option<String> = session.take_flash("message").await?;
    session.insert("pageCount", &(visits + 1)).await?;
    session
        .flash("message", &format!("Hello from visit {}", visits + 1))
        .await?;
    let flash = previous
        .map(|m| format!("<p>Flash: {m}</p>"))
        .unwrap_or_default();
    Ok(Html(format!(
        "<p>Visited page {visits} times</p>{flash}\
         <form method=post action=/login>\
         <input name=user placeholder=name> \
         <label><input type=checkbox name=remember> remember me</label> \
         <button>Log in</button></form>"
    )))
}

#[derive(Deserialize)]
struct Login {
    user: String,
    /// A checkbox: present (`on`) when ticked.
    remember: Option<String>,
}

/// Logs in: a new session id (an id planted before login is worthless after it), the user, a
/// flash to show after the redirect, and with "remember me" a month-long persistent session.
async fn login(session: Session, Form(login): Form<Login>) -> Result<Redirect, Error> {
    let user = Some(login.user)
        .filter(|u| !u.is_empty() && u.bytes().all(|b| b.is_ascii_alphanumeric()))
        .unwrap_or_else(|| "guest".to_owned());
    session.cycle_id().await?;
    session.insert("user", &user).await?;
    if login.remember.is_some() {
        let month = Duration::from_secs(30 * 24 * 3600);
        session.set_expiry(Expiry::OnInactivity(month)).await?;
    }
    session
        .flash("notice", &format!("Welcome, {user}!"))
        .await?;
    Ok(Redirect::to("/me"))
}

/// A page for logged-in users only.
async fn me(session: Session) -> Result<Response, Error> {
    let Some(user) = session.get::<String>("user").await? else {
        return Ok((
            StatusCode::UNAUTHORIZED,
            Html("Not logged in. <a href=/>Log in</a>"),
        )
            .into_response());
    };
    let notice = session
        .take_flash::<String>("notice")
        .await?
        .unwrap_or_default();
    Ok(Html(format!(
        "<p>{notice}</p><p>Hello {user}, this page is protected.</p>\
         <form method=post action=/logout><button>Log out</button></form>"
    ))
    .into_response())
}

/// Logs out: the record is deleted and the cookie removed.
async fn logout(session: Session) -> Result<Redirect, Error> {
    session.destroy().await?;
    Ok(Redirect::to("/"))
}

fn port() -> u16 {
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        if arg == "--port"
            && let Some(port) = args.next().and_then(|p| p.parse().ok())
        {
            return port;
        }
    }
    std::env::var("PORT")
        .ok()
        .and_then(|p| p.parse().ok())
        .unwrap_or(8000)
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let app = Router::new()
        .route("/", get(index))
        .route("/login", post(login))
        .route("/me", get(me))
        .route("/logout", post(logout))
        .layer(SessionLayer::new(MemoryStore::default()));
    let addr = SocketAddr::from(([127, 0, 0, 1], port()));
    let listener = tokio::net::TcpListener::bind(addr).await?;
    println!("axum example on http://localhost:{}/", addr.port());
    axum::serve(listener, app).await?;
    Ok(())
}
