//! The application behind `bench_server` and the end-to-end tests: the endpoints of
//! `shared/bench/SPEC.md` plus the hyper-sessions extras, on any store.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use http_body_util::Full;
use hyper::body::Bytes;
use hyper::header::CONTENT_TYPE;
use hyper::{Request, Response, StatusCode};
use hyper_sessions::{Error, Expiry, Session};

/// The response type of every endpoint.
pub type Body = Full<Bytes>;

fn text(status: StatusCode, body: impl Into<Bytes>) -> Response<Body> {
    let mut resp = Response::new(Full::new(body.into()));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp
}

fn ok(body: impl Into<Bytes>) -> Response<Body> {
    text(StatusCode::OK, body)
}

/// A session error as the handler reports it: 503 when the store is unavailable, 500 otherwise,
/// never with the error's text.
fn failure(err: &Error) -> Response<Body> {
    let status = if err.is_unavailable() {
        StatusCode::SERVICE_UNAVAILABLE
    } else {
        StatusCode::INTERNAL_SERVER_ERROR
    };
    text(status, Bytes::new())
}

/// Decodes `%XX` escapes and `+` (as in a query string); invalid escapes are kept as they are.
pub fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).ok();
                if let Some(v) = hex.and_then(|h| u8::from_str_radix(h, 16).ok()) {
                    out.push(v);
                    i += 3;
                    continue;
                }
                out.push(b'%');
            }
            b'+' => out.push(b' '),
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn query_value(query: Option<&str>) -> String {
    query
        .and_then(|q| q.split('&').find_map(|kv| kv.strip_prefix("v=")))
        .map_or_else(|| "1".to_owned(), percent_decode)
}

/// What a request asks for, decided before any await so that the future of [`handle`] holds
/// no request: hyper moves that future a few times, and its size is copied each time.
enum Endpoint {
    /// `/untouched`: the session is not touched at all.
    Untouched,
    /// One of the benchmark's session endpoints.
    Spec(Session, Spec),
    /// Anything else, in a boxed future.
    Other(Pin<Box<dyn Future<Output = Response<Body>> + Send>>),
    /// The layer is missing.
    NoSession,
}

#[derive(Clone, Copy)]
enum Spec {
    Read,
    Counter,
    Login,
}

/// Serves one request.
pub fn handle<B>(req: Request<B>) -> impl Future<Output = Result<Response<Body>, Infallible>> + Send
where
    B: Send + 'static,
{
    let endpoint = match req.uri().path() {
        "/untouched" => Endpoint::Untouched,
        path => match Session::from_request(&req) {
            Err(_) => Endpoint::NoSession,
            Ok(session) => match path {
                "/read" => Endpoint::Spec(session, Spec::Read),
                "/counter" => Endpoint::Spec(session, Spec::Counter),
                "/login" => Endpoint::Spec(session, Spec::Login),
                _ => Endpoint::Other(Box::pin(async move {
                    let uri = req.uri();
                    respond(&session, uri.path(), uri.query()).await
                })),
            },
        },
    };
    async move {
        Ok(match endpoint {
            // This endpoint does not touch its session at all.
            Endpoint::Untouched => ok("ok"),
            Endpoint::Spec(session, spec) => spec_endpoint(&session, spec)
                .await
                .unwrap_or_else(|e| failure(&e)),
            Endpoint::Other(future) => future.await,
            Endpoint::NoSession => text(StatusCode::INTERNAL_SERVER_ERROR, Bytes::new()),
        })
    }
}

/// Serves one request whose session was taken by the caller (the axum extractor in the tests,
/// and every endpoint of `handle` but the benchmark's).
pub async fn respond(session: &Session, path: &str, query: Option<&str>) -> Response<Body> {
    let spec = match path {
        "/read" => Spec::Read,
        "/counter" => Spec::Counter,
        "/login" => Spec::Login,
        _ => {
            return extras(session, path, query)
                .await
                .unwrap_or_else(|e| failure(&e));
        }
    };
    spec_endpoint(session, spec)
        .await
        .unwrap_or_else(|e| failure(&e))
}

/// `n` in decimal, in a buffer of its own size (one allocation, as a static body has none).
fn decimal(n: i64) -> Bytes {
    Bytes::copy_from_slice(itoa::Buffer::new().format(n).as_bytes())
}

/// The benchmark's endpoints, without allocating beyond the response body.
async fn spec_endpoint(session: &Session, spec: Spec) -> Result<Response<Body>, Error> {
    match spec {
        Spec::Read => {
            let n: i64 = session.get("count").await?.unwrap_or(0);
            Ok(ok(decimal(n)))
        }
        Spec::Counter => {
            let n: i64 = session.get("count").await?.unwrap_or(0);
            session.insert("count", &(n + 1)).await?;
            Ok(ok(decimal(n + 1)))
        }
        Spec::Login => {
            session.insert("count", &0_i64).await?;
            Ok(ok("0"))
        }
    }
}

/// `/sleep/{ms}/{path}` split into `ms` and `/{path}` (the rest still percent-encoded: the
/// endpoint it names decodes its own key and value).
fn sleep_then(path: &str) -> Option<(&str, &str)> {
    let rest = path.strip_prefix("/sleep/")?;
    let slash = rest.find('/')?;
    Some(rest.split_at(slash))
}

async fn extras(
    session: &Session,
    path: &str,
    query: Option<&str>,
) -> Result<Response<Body>, Error> {
    if let Some((ms, then)) = sleep_then(path) {
        // Load first (one store read), so that the sleep holds a loaded session open while
        // other requests on it commit; then serve `then` as its own request would be served.
        session.contains("count").await?;
        tokio::time::sleep(Duration::from_millis(ms.parse().unwrap_or(0))).await;
        // Boxed: `respond` comes back here, and a recursive future needs a known size.
        return Ok(Box::pin(respond(session, then, query)).await);
    }
    let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    Ok(match segments.as_slice() {
        // `handle` answers it before taking the session; `respond` comes here.
        ["untouched"] => ok("ok"),
        ["set", key] => {
            session
                .insert(&percent_decode(key), &query_value(query))
                .await?;
            ok("ok")
        }
        // A flash is read once: taken when the key holds one.
        ["get", key] => match take_or_get(session, &percent_decode(key)).await? {
            Some(serde_json::Value::String(s)) => ok(s),
            Some(v) => ok(v.to_string()),
            None => text(StatusCode::NOT_FOUND, Bytes::new()),
        },
        ["keys"] => ok(session.keys().await?.join("\n")),
        ["incr", key] => {
            let n: i64 = session
                .update(&percent_decode(key), |n: Option<i64>| n.unwrap_or(0) + 1)
                .await?;
            ok(n.to_string())
        }
        ["flash", key] => {
            session
                .flash(&percent_decode(key), &query_value(query))
                .await?;
            ok("ok")
        }
        ["remove", key] => {
            session.remove(&percent_decode(key)).await?;
            ok("ok")
        }
        ["clear"] => {
            session.clear().await?;
            ok("ok")
        }
        ["cycle"] => {
            session.cycle_id().await?;
            ok("ok")
        }
        ["destroy"] => {
            session.destroy().await?;
            ok("ok")
        }
        ["id"] => {
            // Loaded first, so that a cookie naming no live session answers no id.
            session.contains("").await?;
            ok(session.id().map(|id| id.to_string()).unwrap_or_default())
        }
        ["owner", owner] => {
            session.set_owner(&percent_decode(owner)).await?;
            let label = query.and_then(|q| q.split('&').find_map(|kv| kv.strip_prefix("label=")));
            if let Some(label) = label {
                session.set_label(&percent_decode(label)).await?;
            }
            ok("ok")
        }
        ["sessions"] => {
            let ms = |t: std::time::SystemTime| {
                t.duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
            };
            let list: Vec<serde_json::Value> = session
                .owner_sessions()
                .await?
                .iter()
                .map(|s| {
                    serde_json::json!({
                        "handle": s.handle.to_string(),
                        "current": s.current,
                        "label": s.label,
                        "created": ms(s.created),
                        "last_seen": ms(s.last_seen),
                        "expires": ms(s.expires),
                    })
                })
                .collect();
            ok(serde_json::Value::from(list).to_string())
        }
        ["revoke", handle] => match handle.parse() {
            Ok(handle) if session.revoke(handle).await? => ok("ok"),
            _ => text(StatusCode::NOT_FOUND, Bytes::new()),
        },
        ["revoke-others"] => ok(session.revoke_others().await?.to_string()),
        ["remember", secs] => {
            let secs = secs.parse().unwrap_or(60);
            session
                .set_expiry(Expiry::OnInactivity(Duration::from_secs(secs)))
                .await?;
            ok("ok")
        }
        _ => text(StatusCode::NOT_FOUND, Bytes::new()),
    })
}

/// The app as an axum `Router` behind `layer`: `/untouched` takes no session (as the peers'
/// servers do), every other path goes to [`respond`] through the `Session` extractor.
#[cfg(feature = "axum")]
pub fn axum_router(layer: &hyper_sessions::SessionLayer) -> axum::Router {
    async fn handler(session: Session, uri: hyper::Uri) -> Response<Body> {
        respond(&session, uri.path(), uri.query()).await
    }
    axum::Router::new()
        .route("/untouched", axum::routing::get(|| async { "ok" }))
        .fallback(handler)
        .layer(layer.clone())
}

/// The flash under `key`, consumed, or else the plain value under it.
async fn take_or_get(session: &Session, key: &str) -> Result<Option<serde_json::Value>, Error> {
    match session.take_flash(key).await? {
        Some(flash) => Ok(Some(flash)),
        None => session.get(key).await,
    }
}
