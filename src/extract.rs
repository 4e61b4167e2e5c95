//! [`Session`] as an axum extractor (feature `axum`).

use std::fmt;

use axum_core::extract::FromRequestParts;
use axum_core::response::{IntoResponse, Response};
use http::request::Parts;
use http::{HeaderValue, StatusCode, header};

use crate::config::default_error_handler;
use crate::error::{Chain, Error};
use crate::session::Session;

/// Takes the request's [`Session`], put there by the [`SessionLayer`](crate::SessionLayer).
///
/// Install the layer with `Router::layer` (it is a `tower::Layer` with the `tower` feature,
/// which `axum` turns on); without it the handler is not run and the request is answered
/// [`MissingSessionLayer`]'s 500.
///
/// # Examples
/// ```no_run
/// use axum::Router;
/// use axum::routing::get;
/// use hyper_sessions::{MemoryStore, Session, SessionLayer};
///
/// async fn counter(session: Session) -> Result<String, hyper_sessions::Error> {
///     let n = session
///         .update("count", |n: Option<u64>| n.unwrap_or(0) + 1)
///         .await?;
///     Ok(format!("Visited {n} times"))
/// }
///
/// # async fn run() -> Result<(), Box<dyn std::error::Error>> {
/// let app = Router::new()
///     .route("/", get(counter))
///     .layer(SessionLayer::new(MemoryStore::default()));
/// let listener = tokio::net::TcpListener::bind("127.0.0.1:8000").await?;
/// axum::serve(listener, app).await?;
/// # Ok(())
/// # }
/// ```
#[cfg_attr(docsrs, doc(cfg(feature = "axum")))]
impl<S: Send + Sync> FromRequestParts<S> for Session {
    type Rejection = MissingSessionLayer;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        Session::from_extensions(&parts.extensions).map_err(|_| MissingSessionLayer(()))
    }
}

/// The rejection of the [`Session`] extractor when the request did not go through a
/// [`SessionLayer`](crate::SessionLayer): a programming error, answered with a 500 and a
/// `text/plain` body that says so.
///
/// The usual cause with axum is a route added to the `Router` after its `.layer(...)` call:
/// a layer wraps only the routes added before it.
#[cfg_attr(docsrs, doc(cfg(feature = "axum")))]
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MissingSessionLayer(());

impl MissingSessionLayer {
    const MESSAGE: &'static str =
        "no session in the request's extensions: the SessionLayer is missing around this route";

    /// The status of the rejection's response: 500.
    pub fn status(&self) -> StatusCode {
        StatusCode::INTERNAL_SERVER_ERROR
    }
}

impl fmt::Display for MissingSessionLayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(Self::MESSAGE)
    }
}

impl std::error::Error for MissingSessionLayer {}

impl IntoResponse for MissingSessionLayer {
    fn into_response(self) -> Response {
        crate::trace::event!(error, "hyper-sessions: {self}");
        let mut resp = Response::new(Self::MESSAGE.into());
        *resp.status_mut() = self.status();
        resp.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; charset=utf-8"),
        );
        resp
    }
}

/// A session error as a handler's answer, so that handlers can use `?`: 503 when the store is
/// unavailable, 500 otherwise, with an empty body (the same mapping as the layer's default
/// [error handler](crate::SessionLayerBuilder::error_handler)). The error and its causes are
/// logged at error level (they never hold a session id or session data); the response says
/// nothing of them.
///
/// # Examples
/// ```
/// use hyper_sessions::{Error, Session};
///
/// async fn greet(session: Session) -> Result<String, Error> {
///     let name: Option<String> = session.get("name").await?;
///     Ok(format!("Hello, {}", name.as_deref().unwrap_or("stranger")))
/// }
/// # let _: axum::Router = axum::Router::new().route("/", axum::routing::get(greet));
/// ```
#[cfg_attr(docsrs, doc(cfg(feature = "axum")))]
impl IntoResponse for Error {
    fn into_response(self) -> Response {
        crate::trace::event!(error, "hyper-sessions: a handler failed: {}", Chain(&self));
        let (parts, ()) = default_error_handler(&self).into_parts();
        Response::from_parts(parts, axum_core::body::Body::empty())
    }
}
