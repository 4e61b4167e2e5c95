//! [`SessionLayer`] and [`SessionService`]: the middleware around a hyper service.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use http::{Request, Response};
use pin_project_lite::pin_project;

use crate::config::{
    Config, CookieSettings, ErrorHandler, Expiry, SameSite, default_error_handler,
};
use crate::cookie::{self, CookieAction, CookieLookup, find_session_id};
use crate::error::{Chain, Error};
use crate::session::{Owners, Session, Shared};
use crate::sign::Keys;
use crate::store::SessionStore;

#[cfg(feature = "tower")]
mod tower;

/// The default limit on a session record's encoded size: 1 MiB.
pub const DEFAULT_MAX_RECORD_BYTES: usize = 1 << 20;

/// Adds sessions to a hyper service: the configuration, and [`wrap`](SessionLayer::wrap) to
/// apply it.
///
/// Build it with [`SessionLayer::new`] (secure defaults) or [`SessionLayer::builder`]. Cloning is
/// cheap; every clone shares the store. With the `tower` feature it is also a
/// `tower_layer::Layer`, for `tower::ServiceBuilder` stacks and axum's `Router::layer`.
///
/// # Examples
/// ```no_run
/// use std::convert::Infallible;
/// use std::time::Duration;
///
/// use http_body_util::Full;
/// use hyper::body::{Bytes, Incoming};
/// use hyper::service::service_fn;
/// use hyper::{Request, Response};
/// use hyper_sessions::{Expiry, MemoryStore, Session, SessionLayer};
///
/// async fn handler(req: Request<Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
///     let session = Session::from_request(&req).expect("layer installed");
///     let n: u64 = session.get("n").await.ok().flatten().unwrap_or(0);
///     let _ = session.insert("n", &(n + 1)).await;
///     Ok(Response::new(Full::new(Bytes::from(n.to_string()))))
/// }
///
/// # async fn run() -> Result<(), Box<dyn std::error::Error>> {
/// let layer = SessionLayer::builder(MemoryStore::default())
///     .expiry(Expiry::OnInactivity(Duration::from_secs(3600)))
///     .build()?;
/// let service = layer.wrap(service_fn(handler));
/// let listener = tokio::net::TcpListener::bind("127.0.0.1:8000").await?;
/// loop {
///     let (stream, _) = listener.accept().await?;
///     let service = service.clone();
///     tokio::spawn(async move {
///         let io = hyper_util::rt::TokioIo::new(stream);
///         let _ = hyper::server::conn::http1::Builder::new()
///             .serve_connection(io, service)
///             .await;
///     });
/// }
/// # }
/// ```
#[derive(Clone)]
#[must_use]
pub struct SessionLayer {
    shared: Arc<Shared>,
}

impl SessionLayer {
    /// A layer with the default settings: cookie `id` (`HttpOnly; SameSite=Lax; Secure;
    /// Path=/`), a day of inactivity, records up to 1 MiB.
    pub fn new<S: SessionStore>(store: S) -> Self {
        match SessionLayer::builder(store).build() {
            Ok(layer) => layer,
            // The defaults are valid; the tests check it.
            Err(e) => unreachable!("default session layer configuration is invalid: {e}"),
        }
    }

    /// A builder to configure the layer, starting from the defaults.
    pub fn builder<S: SessionStore>(store: S) -> SessionLayerBuilder {
        SessionLayerBuilder {
            store: Box::new(store),
            cookie: CookieSettings::default(),
            expiry: Expiry::default(),
            absolute_lifetime: None,
            max_record_bytes: DEFAULT_MAX_RECORD_BYTES,
            error_handler: Arc::new(default_error_handler),
            signing_keys: Vec::new(),
        }
    }

    /// The sessions of any owner, for code outside a request (an administrator ending a
    /// user's sessions, say); see [`Owners`].
    pub fn owners(&self) -> Owners {
        Owners {
            shared: Arc::clone(&self.shared),
        }
    }

    /// Wraps a service: every request it gets carries a [`Session`].
    pub fn wrap<S>(&self, inner: S) -> SessionService<S> {
        SessionService {
            inner,
            shared: Arc::clone(&self.shared),
        }
    }
}

impl fmt::Debug for SessionLayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SessionLayer")
            .field("config", &self.shared.config)
            .finish_non_exhaustive()
    }
}

/// Configures a [`SessionLayer`]; [`build`](SessionLayerBuilder::build) checks the result.
#[must_use]
pub struct SessionLayerBuilder {
    store: Box<dyn crate::store::DynStore>,
    cookie: CookieSettings,
    expiry: Expiry,
    absolute_lifetime: Option<Duration>,
    max_record_bytes: usize,
    error_handler: ErrorHandler,
    signing_keys: Vec<Vec<u8>>,
}

impl SessionLayerBuilder {
    /// The cookie's name (default `id`). Names starting with `__Host-` or `__Secure-` are
    /// checked against the rules browsers apply to them when the layer is built.
    pub fn cookie_name(mut self, name: impl Into<String>) -> Self {
        self.cookie.name = name.into();
        self
    }

    /// The cookie's `Domain` (default: none, so the cookie is sent to this host only).
    ///
    /// # Warning
    /// A domain makes the browser send the session cookie to every subdomain too.
    pub fn cookie_domain(mut self, domain: impl Into<String>) -> Self {
        self.cookie.domain = Some(domain.into());
        self
    }

    /// The cookie's `Path` (default `/`).
    pub fn cookie_path(mut self, path: impl Into<String>) -> Self {
        self.cookie.path = path.into();
        self
    }

    /// The cookie's `SameSite` (default `Lax`).
    ///
    /// # Warning
    /// `SameSite=None` sends the session cookie on cross-site requests: protect state-changing
    /// endpoints against CSRF yourself.
    pub fn cookie_same_site(mut self, same_site: SameSite) -> Self {
        self.cookie.same_site = same_site;
        self
    }

    /// Whether the cookie is `Secure` (default `true`).
    ///
    /// # Warning
    /// Without `Secure` the browser sends the session id over plain HTTP, where anyone on the
    /// path can read it. Turn it off only for local development over `http://`.
    pub fn cookie_secure(mut self, secure: bool) -> Self {
        self.cookie.secure = secure;
        self
    }

    /// Whether the cookie is `HttpOnly` (default `true`).
    ///
    /// # Warning
    /// Without `HttpOnly`, any script on the page (an XSS payload included) can read the
    /// session id.
    pub fn cookie_http_only(mut self, http_only: bool) -> Self {
        self.cookie.http_only = http_only;
        self
    }

    /// Whether the cookie is `Partitioned` (CHIPS; default `false`). Requires `Secure`.
    pub fn cookie_partitioned(mut self, partitioned: bool) -> Self {
        self.cookie.partitioned = partitioned;
        self
    }

    /// The expiry policy (default: [`Expiry::OnInactivity`] of a day).
    pub fn expiry(mut self, expiry: Expiry) -> Self {
        self.expiry = expiry;
        self
    }

    /// Ends every session this long after it was created, however active (default: no limit).
    pub fn absolute_lifetime(mut self, lifetime: Duration) -> Self {
        self.absolute_lifetime = Some(lifetime);
        self
    }

    /// The largest encoded session record (default 1 MiB). `insert` refuses values that would
    /// exceed it, and stored records larger than it are treated as corrupt.
    pub fn max_record_bytes(mut self, max: usize) -> Self {
        self.max_record_bytes = max;
        self
    }

    /// Chooses the response when saving the session fails after the handler answered (the
    /// store is down, the session was destroyed concurrently, ...). The error has already been
    /// logged with its cause; the handler's response is replaced by the status and headers
    /// returned here, with an empty body. The default answers 503 when
    /// [`Error::is_unavailable`], 500 otherwise.
    ///
    /// # Examples
    /// ```
    /// use http::{Response, StatusCode};
    /// use hyper_sessions::{MemoryStore, SessionLayer};
    ///
    /// let layer = SessionLayer::builder(MemoryStore::default())
    ///     .error_handler(|err| {
    ///         let mut resp = Response::new(());
    ///         *resp.status_mut() = if err.is_gone() {
    ///             StatusCode::CONFLICT
    ///         } else {
    ///             StatusCode::SERVICE_UNAVAILABLE
    ///         };
    ///         resp
    ///     })
    ///     .build()
    ///     .unwrap();
    /// # let _ = layer;
    /// ```
    pub fn error_handler<F>(mut self, handler: F) -> Self
    where
        F: Fn(&Error) -> Response<()> + Send + Sync + 'static,
    {
        self.error_handler = Arc::new(handler);
        self
    }

    /// Signs the session cookie with the first of these keys and accepts cookies signed with
    /// any of them (default: none, unsigned cookies). Each key is at least 32 random bytes (64
    /// hex digits' worth); keep them as secret as a database password.
    ///
    /// With keys, the cookie's value is `<id>.<mac>`: the id, a dot, and the unpadded base64url
    /// of the first 16 bytes of the keyed BLAKE3 hash of `"<name>=<id>"` under a MAC key
    /// derived from the key (`blake3::derive_key("hyper-sessions 2026-12-01 session cookie MAC
    /// key", key)`), 59 characters. Keyed BLAKE3 is a MAC like HMAC-SHA256, at a tenth of its
    /// cost on CPUs without SHA instructions; the crate already uses BLAKE3. The MAC binds the
    /// cookie's name too, so a value cannot be replayed under another cookie name. A cookie that is unsigned,
    /// malformed, or signed with a key not in the list is dropped before any store lookup, as
    /// an invalid id is: the request gets a fresh session.
    ///
    /// Signing does not make a leaked cookie any less valid (the id is already a 122-bit
    /// secret); it lets the layer refuse forged and stale cookies without asking the store, and
    /// it lets you end every cookie at once by dropping a key.
    ///
    /// # Rotating keys
    /// Put a new key first and keep the old one after it: `[new, old]`. Cookies signed with
    /// `old` are still accepted, and **the response of the first request that loads the
    /// session** (reads or writes it) re-sends the cookie signed with `new`, with the lifetime
    /// the stored session has left, even when nothing else changed. A request that never
    /// touches its session is not re-signed: re-sending needs the session's expiry, which only
    /// a store round trip would tell, and such requests cost no store I/O. Keep `old` listed
    /// for as long as the idle timeout (or the longest per-session expiry you set), then drop
    /// it: cookies still signed with it then start fresh sessions.
    ///
    /// Verification tries the keys in order, so keep the list short (two or three).
    ///
    /// # Examples
    /// ```
    /// use hyper_sessions::{MemoryStore, SessionLayer};
    ///
    /// let current = [7u8; 32]; // in production: 32 random bytes from your secret store
    /// let previous = [9u8; 32];
    /// let layer = SessionLayer::builder(MemoryStore::default())
    ///     .signing_keys([current, previous])
    ///     .build()
    ///     .unwrap();
    /// # let _ = layer;
    ///
    /// // Keys shorter than 32 bytes are refused when the layer is built.
    /// let err = SessionLayer::builder(MemoryStore::default())
    ///     .signing_keys([b"too short"])
    ///     .build()
    ///     .unwrap_err();
    /// assert!(err.is_config());
    /// ```
    pub fn signing_keys<I>(mut self, keys: I) -> Self
    where
        I: IntoIterator,
        I::Item: AsRef<[u8]>,
    {
        self.signing_keys = keys.into_iter().map(|k| k.as_ref().to_vec()).collect();
        self
    }

    /// Checks the configuration and builds the layer.
    ///
    /// # Errors
    /// [`Error::is_config`]: a cookie name that is not a token, a `__Host-` name with a domain
    /// or a path other than `/`, a `__Secure-`/`__Host-` name, `SameSite=None` or `Partitioned`
    /// without `Secure`, a path or domain with `;` or control characters, a zero idle timeout
    /// or lifetime, a zero record size limit, or a signing key shorter than 32 bytes.
    pub fn build(self) -> Result<SessionLayer, Error> {
        let (cookie_prefix, cookie_attributes) = self.cookie.render()?;
        let config_error = |msg: &str| Error::with(crate::error::Kind::Config, msg.to_owned());
        if self.expiry.idle_timeout().is_zero() {
            return Err(config_error("the idle timeout must be longer than zero"));
        }
        if self.absolute_lifetime.is_some_and(|l| l.is_zero()) {
            return Err(config_error(
                "the absolute lifetime must be longer than zero",
            ));
        }
        if self.max_record_bytes == 0 {
            return Err(config_error("the record size limit must be above zero"));
        }
        let signing_keys = Keys::new(&self.signing_keys)?;
        let config = Config {
            cookie_name: self.cookie.name,
            cookie_prefix,
            cookie_attributes,
            expiry: self.expiry,
            absolute_lifetime: self.absolute_lifetime,
            max_record_bytes: self.max_record_bytes,
            max_save_attempts: 24,
            error_handler: self.error_handler,
            signing_keys,
        };
        Ok(SessionLayer {
            shared: Arc::new(Shared {
                store: self.store,
                config,
            }),
        })
    }
}

impl fmt::Debug for SessionLayerBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SessionLayerBuilder")
            .field("cookie", &self.cookie)
            .field("expiry", &self.expiry)
            .field("absolute_lifetime", &self.absolute_lifetime)
            .field("max_record_bytes", &self.max_record_bytes)
            // How many, never the keys.
            .field("signing_keys", &self.signing_keys.len())
            .finish_non_exhaustive()
    }
}

/// A hyper service with sessions: made by [`SessionLayer::wrap`] (or, with the `tower` feature,
/// by `SessionLayer` as a `tower_layer::Layer`).
///
/// It has the inner service's request and response types and error, and is served exactly like
/// it: a `hyper::service::Service` when the inner service is one, and with the `tower` feature a
/// `tower_service::Service` when the inner service is a `Clone` one. The response body type
/// must implement `Default` (an empty body), used when a failed save replaces the response.
#[derive(Clone)]
pub struct SessionService<S> {
    inner: S,
    shared: Arc<Shared>,
}

impl<S: fmt::Debug> fmt::Debug for SessionService<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SessionService")
            .field("inner", &self.inner)
            .finish_non_exhaustive()
    }
}

impl<S> SessionService<S> {
    /// The wrapped service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }
}

/// Creates the session for a request and puts it in the extensions: the part of a call that
/// comes before the inner service, shared by the hyper and tower paths.
fn attach<B>(shared: &Arc<Shared>, req: &mut Request<B>) -> Session {
    let config = &shared.config;
    let lookup = find_session_id(
        req.headers(),
        &config.cookie_name,
        config.signing_keys.as_ref(),
    );
    if lookup == CookieLookup::Invalid {
        crate::trace::event!(
            debug,
            "hyper-sessions: malformed or forged session cookie ignored"
        );
    }
    let session = Session::new(Arc::clone(shared), lookup);
    req.extensions_mut().insert(session.clone());
    session
}

impl<S, ReqBody, ResBody> hyper::service::Service<Request<ReqBody>> for SessionService<S>
where
    S: hyper::service::Service<Request<ReqBody>, Response = Response<ResBody>>,
    ResBody: Default + Send + 'static,
{
    type Response = Response<ResBody>;
    type Error = S::Error;
    type Future = ResponseFuture<S::Future, ResBody>;

    fn call(&self, mut req: Request<ReqBody>) -> Self::Future {
        let session = attach(&self.shared, &mut req);
        ResponseFuture::new(self.inner.call(req), session)
    }
}

type CommitFuture<B> = Pin<Box<dyn Future<Output = Response<B>> + Send>>;

pin_project! {
    /// The response future of [`SessionService`]: the inner service's answer, then the save.
    pub struct ResponseFuture<F, B> {
        #[pin]
        inner: F,
        session: Option<Session>,
        commit: Option<CommitFuture<B>>,
    }
}

impl<F, B> ResponseFuture<F, B> {
    /// The inner service's future for a request that carries `session`: the part of a call that
    /// comes after the inner service, shared by the hyper and tower paths.
    fn new(inner: F, session: Session) -> Self {
        ResponseFuture {
            inner,
            session: Some(session),
            commit: None,
        }
    }
}

impl<F, B> fmt::Debug for ResponseFuture<F, B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponseFuture")
            .field("saving", &self.commit.is_some())
            .finish_non_exhaustive()
    }
}

impl<F, B, E> Future for ResponseFuture<F, B>
where
    F: Future<Output = Result<Response<B>, E>>,
    B: Default + Send + 'static,
{
    type Output = Result<Response<B>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        if let Some(commit) = this.commit.as_mut() {
            return commit.as_mut().poll(cx).map(Ok);
        }
        // An inner error aborts the exchange; nothing this request changed is saved.
        let mut response = ready!(this.inner.poll(cx))?;
        let session = this
            .session
            .take()
            .expect("ResponseFuture polled after completion");
        if let Some(action) = session.finish_without_io() {
            cookie::apply(session.config(), response.headers_mut(), action);
            return Poll::Ready(Ok(response));
        }
        let mut commit: CommitFuture<B> = Box::pin(finish(session, response));
        let poll = commit.as_mut().poll(cx);
        *this.commit = Some(commit);
        poll.map(Ok)
    }
}

/// Saves the session and adds the cookie, or turns the response into the error hook's.
///
/// An `async` block rather than an `async fn`: the block keeps the response once, where an
/// `async fn` holds its arguments twice.
#[allow(clippy::manual_async_fn)]
fn finish<B: Default>(
    session: Session,
    response: Response<B>,
) -> impl Future<Output = Response<B>> {
    async move {
        let (result, action) = session.finish().await;
        complete(session.config(), response, result, action)
    }
}

/// The response after a commit: the handler's with the cookie, or the error hook's.
fn complete<B: Default>(
    config: &Config,
    response: Response<B>,
    result: Result<(), Error>,
    action: CookieAction,
) -> Response<B> {
    let mut response = match result {
        Ok(()) => response,
        Err(err) => {
            crate::trace::event!(
                error,
                "hyper-sessions: saving the session failed: {}",
                Chain(&err)
            );
            let (parts, ()) = (config.error_handler)(&err).into_parts();
            Response::from_parts(parts, B::default())
        }
    };
    cookie::apply(config, response.headers_mut(), action);
    response
}
