//! The session layer on axum 0.8, with the memory store: the classic page counter with a flash
//! message, and a login/logout flow (id cycling on login, destroy on logout).
//!
//! ```text
//! cargo run --example axum --features axum     # http://127.0.0.1:8000/ (PORT or --port to change)
//! curl -c jar -b jar http://127.0.0.1:8000/                            # counter and flash
//! curl -c jar -b jar -i 'http://127.0.0.1:8000/auth/login?user=ada'  # new id, flash, redirect
//! curl -c jar -b jar http://127.0.0.1:8000/auth/me                     # the protected page
//! curl -c jar -b jar -i http://127.0.0.1:8000/auth/logout              # removal cookie
//! ```
//!
//! `/untouched`, `/read`, `/counter` and `/login` answer as the peer benchmark's server contract
//! says (one `count` key, plain-text bodies; `/login` sets `count = 0` without cycling the id),
//! so this server can be measured next to tower-sessions' figures:
//! `cargo run --release --example axum --features axum -- --port PORT`.

use std::net::SocketAddr;

use axum::Router;
use axum::extract::Query;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::get;
use hyper_sessions::{Error, MemoryStore, Session, SessionLayer};
use serde::Deserialize;

/// A session error as a response: 503 when the store is unavailable, 500 otherwise, with no
/// internals in the body. The `?` in the handlers goes through it.
struct SessionError(Error);

impl From<Error> for SessionError {
    fn from(e: Error) -> Self {
        SessionError(e)
    }
}

impl IntoResponse for SessionError {
    fn into_response(self) -> Response {
        eprintln!("session error: {}", self.0);
        if self.0.is_unavailable() {
            StatusCode::SERVICE_UNAVAILABLE.into_response()
        } else {
            StatusCode::INTERNAL_SERVER_ERROR.into_response()
        }
    }
}

type Result<T> = std::result::Result<T, SessionError>;

/// The classic counter: the visit count, and the flash left by the previous visit.
async fn index(session: Session) -> Result<String> {
    let visits: u64 = session.get("pageCount").await?.unwrap_or(0);
    let previous: Option<String> = session.get("message").await?;
    session.insert("pageCount", &(visits + 1)).await?;
    session
        .flash("message", &format!("Hello from visit {}", visits + 1))
        .await?;
    Ok(match previous {
        Some(message) => format!("Visited page {visits} times\nFlash: {message}"),
        None => format!("Visited page {visits} times"),
    })
}

/// `/counter` of the benchmark: `count + 1`, the new value as the body.
async fn counter(session: Session) -> Result<String> {
    let n: i64 = session.get("count").await?.unwrap_or(0);
    session.insert("count", &(n + 1)).await?;
    Ok((n + 1).to_string())
}

/// `/read` of the benchmark: `count`, unchanged.
async fn read(session: Session) -> Result<String> {
    let n: i64 = session.get("count").await?.unwrap_or(0);
    Ok(n.to_string())
}

/// `/login` of the benchmark: `count = 0`, creating a session when there is none.
async fn bench_login(session: Session) -> Result<&'static str> {
    session.insert("count", &0_i64).await?;
    Ok("0")
}

/// `/untouched` of the benchmark: the session is not extracted, so it costs no store I/O.
async fn untouched() -> &'static str {
    "ok"
}

#[derive(Deserialize)]
struct Login {
    user: Option<String>,
}

/// Logs in: a new session id (an id planted before login is worthless after it), the user, and
/// a flash to show after the redirect.
async fn login(session: Session, Query(login): Query<Login>) -> Result<Redirect> {
    let user = login
        .user
        .filter(|u| !u.is_empty() && u.bytes().all(|b| b.is_ascii_alphanumeric()))
        .unwrap_or_else(|| "guest".to_owned());
    session.cycle_id().await?;
    session.insert("user", &user).await?;
    session
        .flash("notice", &format!("Welcome, {user}!"))
        .await?;
    Ok(Redirect::to("/auth/me"))
}

/// A page for logged-in users only.
async fn me(session: Session) -> Result<Response> {
    let Some(user) = session.get::<String>("user").await? else {
        return Ok((
            StatusCode::UNAUTHORIZED,
            "Not logged in. Visit /auth/login?user=NAME\n",
        )
            .into_response());
    };
    let notice = session.get::<String>("notice").await?.unwrap_or_default();
    Ok(format!("{notice}\nHello {user}, this page is protected.\n").into_response())
}

/// Logs out: the record is deleted and the cookie removed.
async fn logout(session: Session) -> Result<Redirect> {
    session.destroy().await?;
    Ok(Redirect::to("/auth/me"))
}

fn port() -> u16 {
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        if arg == "--port" {
            if let Some(port) = args.next().and_then(|p| p.parse().ok()) {
                return port;
            }
        }
    }
    std::env::var("PORT")
        .ok()
        .and_then(|p| p.parse().ok())
        .unwrap_or(8000)
}

#[tokio::main]
async fn main() -> std::result::Result<(), Box<dyn std::error::Error>> {
    let app = Router::new()
        .route("/", get(index))
        .route("/counter", get(counter))
        .route("/read", get(read))
        .route("/untouched", get(untouched))
        .route("/login", get(bench_login))
        .route("/auth/login", get(login))
        .route("/auth/me", get(me))
        .route("/auth/logout", get(logout))
        .layer(SessionLayer::new(MemoryStore::default()));
    let addr = SocketAddr::from(([127, 0, 0, 1], port()));
    let listener = tokio::net::TcpListener::bind(addr).await?;
    println!("axum example on http://{addr}/");
    axum::serve(listener, app).await?;
    Ok(())
}
