//! [`WebdisStore`]: sessions in Redis, reached over HTTP(S) through a Webdis server, with
//! hyper-util's client (keep-alive pool) and hyper-tls: the family's
//! [protocol](super::protocol) over Webdis's HTTP interface.

pub(crate) mod reply;
mod url;

use std::fmt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{AUTHORIZATION, CONTENT_TYPE, HeaderValue};
use http::{Method, Request, Uri};
use http_body_util::{BodyExt, Full, Limited};
use hyper_tls::HttpsConnector;
use hyper_tls::native_tls;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};

use self::reply::{ReplyError, parse_reply};
use self::url::Target;
use super::protocol::{
    Command, Protocol, SendError, Sent, Transport, opening_failed, session_store_on_protocol,
};
use crate::error::StoreError;
use crate::key::Key;

/// Sessions in Redis (7.0 or newer), reached through a [Webdis](https://webdis.io/) server over
/// HTTP or HTTPS.
///
/// For deployments where the application may speak HTTP(S) only, or where Webdis's ACLs guard
/// Redis. It speaks to Webdis with hyper-util's client, keeping connections alive in a pool
/// (no new TCP or TLS handshake per request), and with hyper-tls (the system's TLS library) for
/// `https://` URLs.
///
/// Keys, values and commands are those of the [`RedisStore`](crate::RedisStore) (feature
/// `redis`): both stores run one protocol, so on the same Redis database, with the same key
/// prefix, they serve the same sessions. Each key holds one string: a short header (version,
/// expiry, write token, length) and the session payload, so a read is one plain `GET`. Redis
/// keeps the expiry too (`PXAT` on every key); expired sessions disappear without any sweeping.
///
/// # Requests
/// Each operation is one HTTP request, one Redis command:
///
/// | request | Webdis request |
/// |---|---|
/// | does not touch the session | none |
/// | reads | `GET /GET/<key>` |
/// | reads, with an idle expiry due to slide | the load + `GET /EVALSHA/<touch>/1/<key>/<version>/<ms>` |
/// | writes | the load + `PUT /EVALSHA/<save>/1/<key>/<version>/<ms>` |
/// | new session | `PUT /EVALSHA/<create>/1/<key>/<ms>` |
/// | empties the session | the load + `GET /EVALSHA/<remove>/1/<key>/<version>` |
/// | destroy | `GET /DEL/<key>` |
///
/// Session data never travels in the URL: a `PUT` sends the stored value as its body (Webdis
/// appends the body as the command's last argument, byte for byte), and every path segment is
/// percent-encoded. A script missing from Redis's cache (after a restart) costs one more
/// request, once: `EVAL` with the script itself.
///
/// # Values Webdis cannot carry
/// Webdis answers in JSON, which it writes for UTF-8 text only: a value that is not UTF-8
/// becomes `{}`, and one with a NUL byte is cut there. The layer stores JSON text, so its
/// records always fit; a record with other bytes is refused by `create` and `save`
/// ([`StoreError::other`], nothing written), and a value that does not come back whole (its
/// header carries its length) is [`StoreError::corrupt`].
///
/// # Failures
/// A refused or broken connection, a timeout, a `5xx` (Webdis answers `503` when it cannot
/// reach Redis) and a loading, read-only or out-of-memory Redis are
/// [`StoreError::unavailable`] (the layer answers 503). A `401`/`403` (wrong credentials, or
/// the ACL forbids a command this store needs: `GET`, `EVALSHA`, `EVAL`, `DEL`, `SCRIPT`),
/// a reply that is not Webdis's JSON and any other Redis error are [`StoreError::other`],
/// with the reply parser's error as the cause. Each operation is bounded by the
/// [request timeout](WebdisStoreBuilder::request_timeout) (2 s by default). Every operation is
/// retried once on a broken connection (a write carries a token that recognises an earlier
/// attempt of it, and the conditional ones check the version, so none is applied twice). A
/// retried write that does not find its own effect (a `save` or `touch` answering a conflict
/// or a missing record, a `remove` finding nothing, a `create` finding the id taken) may be
/// hiding the first attempt's effect behind another writer's: its outcome is unknown, and it
/// fails with [`StoreError::unavailable`] rather than report a conflict that would make the
/// layer apply the request's changes a second time. Connections are made again as needed, so
/// the same store serves again once Webdis is back.
///
/// # Examples
/// ```no_run
/// use std::time::Duration;
/// use hyper_sessions::{SessionLayer, WebdisStore};
///
/// # async fn run() -> Result<(), Box<dyn std::error::Error>> {
/// // Credentials for a Webdis ACL go in the URL (sent as HTTP Basic auth).
/// let store = WebdisStore::builder()
///     .key_prefix("myapp:session:")
///     .database(2)
///     .request_timeout(Duration::from_millis(500))
///     .open("http://app:secret@127.0.0.1:7379")
///     .await?;
/// let layer = SessionLayer::new(store);
///
/// // Webdis behind a TLS terminator whose certificate a private CA signed.
/// let ca = std::fs::read("ca.pem")?;
/// let tls = hyper_sessions::native_tls::TlsConnector::builder()
///     .add_root_certificate(hyper_sessions::native_tls::Certificate::from_pem(&ca)?)
///     .build()?;
/// let secure = WebdisStore::builder()
///     .tls_connector(tls)
///     .open("https://webdis.internal:7380")
///     .await?;
/// # let _ = (layer, secure);
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct WebdisStore {
    protocol: Arc<Protocol<Http>>,
}

/// The transport: HTTP requests to Webdis, one per command.
struct Http {
    client: Client<HttpsConnector<HttpConnector>, Full<Bytes>>,
    /// `scheme://host:port[/path][/db]`, without credentials or a trailing `/`.
    base: String,
    auth: Option<HeaderValue>,
    max_reply_bytes: usize,
}

/// Configures a [`WebdisStore`]: key prefix, database, timeouts and TLS, then the URL.
#[must_use]
pub struct WebdisStoreBuilder {
    prefix: String,
    timeout: Duration,
    database: Option<u32>,
    tls: Option<native_tls::TlsConnector>,
    max_idle: usize,
    idle_timeout: Duration,
    max_reply_bytes: usize,
}

impl Default for WebdisStoreBuilder {
    fn default() -> Self {
        WebdisStoreBuilder {
            prefix: "session:".to_owned(),
            timeout: Duration::from_secs(2),
            database: None,
            tls: None,
            max_idle: 64,
            idle_timeout: Duration::from_secs(30),
            max_reply_bytes: 64 << 20,
        }
    }
}

impl fmt::Debug for WebdisStoreBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WebdisStoreBuilder")
            .field("key_prefix", &self.prefix)
            .field("request_timeout", &self.timeout)
            .field("database", &self.database)
            .field("custom_tls", &self.tls.is_some())
            .field("max_idle_connections", &self.max_idle)
            .field("idle_timeout", &self.idle_timeout)
            .field("max_reply_bytes", &self.max_reply_bytes)
            .finish()
    }
}

impl WebdisStoreBuilder {
    /// The prefix of every key (default `session:`); the key is the prefix and the session key.
    ///
    /// # Examples
    /// ```
    /// let builder = hyper_sessions::WebdisStore::builder().key_prefix("shop:sess:");
    /// # let _ = builder;
    /// ```
    pub fn key_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.prefix = prefix.into();
        self
    }

    /// The longest one store operation may take, connecting and a retry included (default
    /// 2 s; at least 1 ms). Past it the operation fails with [`StoreError::unavailable`]; a
    /// write that timed out may or may not have been applied, and is reported as not stored.
    ///
    /// # Examples
    /// ```
    /// use std::time::Duration;
    /// let builder = hyper_sessions::WebdisStore::builder()
    ///     .request_timeout(Duration::from_millis(300));
    /// # let _ = builder;
    /// ```
    pub fn request_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout.max(Duration::from_millis(1));
        self
    }

    /// The Redis database number (default: Webdis's configured `database`, usually 0); sent as
    /// the first path segment of every request (`/2/GET/...`).
    ///
    /// # Examples
    /// ```
    /// let builder = hyper_sessions::WebdisStore::builder().database(2);
    /// # let _ = builder;
    /// ```
    pub fn database(mut self, database: u32) -> Self {
        self.database = Some(database);
        self
    }

    /// The TLS settings for `https://` URLs, for example to trust a private CA (default: the
    /// system's trusted roots, with hostname verification).
    ///
    /// # Warning
    /// Whatever the connector accepts, this store trusts: a connector built with
    /// `danger_accept_invalid_certs` or `danger_accept_invalid_hostnames` lets anyone on the
    /// path read and forge every session.
    ///
    /// # Examples
    /// ```no_run
    /// use hyper_sessions::native_tls::{Certificate, TlsConnector};
    ///
    /// # fn run() -> Result<(), Box<dyn std::error::Error>> {
    /// let ca = Certificate::from_pem(&std::fs::read("ca.pem")?)?;
    /// let tls = TlsConnector::builder().add_root_certificate(ca).build()?;
    /// let builder = hyper_sessions::WebdisStore::builder().tls_connector(tls);
    /// # let _ = builder;
    /// # Ok(())
    /// # }
    /// ```
    pub fn tls_connector(mut self, tls: native_tls::TlsConnector) -> Self {
        self.tls = Some(tls);
        self
    }

    /// How many idle keep-alive connections the pool keeps (default 64), and how long an idle
    /// one is kept (default 30 s).
    ///
    /// # Examples
    /// ```
    /// use std::time::Duration;
    /// let builder = hyper_sessions::WebdisStore::builder()
    ///     .idle_connections(16, Duration::from_secs(10));
    /// # let _ = builder;
    /// ```
    pub fn idle_connections(mut self, max: usize, idle_timeout: Duration) -> Self {
        self.max_idle = max;
        self.idle_timeout = idle_timeout;
        self
    }

    /// The largest reply body read (default 64 MiB); a larger one fails the operation. Raise it
    /// only with the layer's record size limit (a value may grow up to six times as JSON).
    ///
    /// # Examples
    /// ```
    /// let builder = hyper_sessions::WebdisStore::builder().max_reply_bytes(8 << 20);
    /// # let _ = builder;
    /// ```
    pub fn max_reply_bytes(mut self, max: usize) -> Self {
        self.max_reply_bytes = max;
        self
    }

    /// Builds the store for the Webdis server at `url` and checks that it answers, by loading
    /// the store's scripts into Redis's cache.
    ///
    /// `url` is `http://` or `https://`, with the host and port of Webdis, optionally
    /// `user:password@` (percent-encoded; sent as HTTP Basic auth, which Webdis ACLs match) and
    /// a path prefix (for a Webdis behind a reverse proxy). No query, no fragment.
    ///
    /// # Errors
    /// [`StoreError::other`] for a URL this store cannot use, a TLS setup failure, refused
    /// credentials or an ACL that forbids `SCRIPT`; [`StoreError::unavailable`] when Webdis or
    /// Redis cannot be reached within the request timeout.
    pub async fn open(self, url: &str) -> Result<WebdisStore, StoreError> {
        let target = Target::parse(url).map_err(|e| opening_failed(Http::NAME, other(e)))?;
        let mut base = target.base;
        if let Some(db) = self.database {
            base.push('/');
            base.push_str(itoa::Buffer::new().format(db));
        }
        let tls = match self.tls {
            Some(tls) => tls,
            None => native_tls::TlsConnector::new().map_err(|e| {
                opening_failed(Http::NAME, other(WebdisError::new("cannot set up TLS", e)))
            })?,
        };
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_nodelay(true);
        http.set_connect_timeout(Some(self.timeout));
        let https = HttpsConnector::from((http, tls.into()));
        let client = Client::builder(TokioExecutor::new())
            .pool_max_idle_per_host(self.max_idle)
            .pool_idle_timeout(self.idle_timeout)
            .pool_timer(TokioTimer::new())
            .build(https);
        let transport = Http {
            client,
            base,
            auth: target.auth,
            max_reply_bytes: self.max_reply_bytes,
        };
        let store = WebdisStore {
            protocol: Arc::new(Protocol::new(transport, self.prefix, self.timeout, None)),
        };
        // Checks the URL, the credentials and that Redis answers.
        store.protocol.load_scripts().await?;
        Ok(store)
    }
}

impl WebdisStore {
    /// A builder, to set the key prefix, database, timeout or TLS before connecting.
    pub fn builder() -> WebdisStoreBuilder {
        WebdisStoreBuilder::default()
    }

    /// The store for the Webdis server at `url`, with the default settings; see
    /// [`WebdisStoreBuilder::open`].
    pub async fn open(url: &str) -> Result<WebdisStore, StoreError> {
        WebdisStoreBuilder::default().open(url).await
    }

    /// The key prefix.
    pub fn key_prefix(&self) -> &str {
        &self.protocol.prefix
    }

    /// The Redis key of a session: the prefix, then the session's [`Key`] in hex (never the id).
    ///
    /// # Examples
    /// ```no_run
    /// # async fn run() -> Result<(), hyper_sessions::store::StoreError> {
    /// let store = hyper_sessions::WebdisStore::open("http://127.0.0.1:7379").await?;
    /// let key = hyper_sessions::store::Key::of(hyper_sessions::Id::random());
    /// assert_eq!(store.key(&key), format!("session:{}", key.to_hex()));
    /// # Ok(())
    /// # }
    /// ```
    pub fn key(&self, key: &Key) -> String {
        self.protocol.key_string(key)
    }
}

session_store_on_protocol!(WebdisStore);

impl Transport for Http {
    const NAME: &'static str = "webdis";
    const VALUE_LAST: bool = true;
    const BINARY_SAFE: bool = false;
    // Each load is an HTTP request of its own, on a connection of its own.
    const CONCURRENT_LOADS: usize = 32;

    /// The deadline is the protocol's to keep (its timer), as `keeps_deadline` says.
    async fn send(
        &self,
        cmd: &Command<'_>,
        then: Option<&Command<'_>>,
        _deadline: Instant,
    ) -> Result<Sent, SendError> {
        if then.is_some() {
            return Err(other(WebdisError::msg(
                "webdis sends one command per request: it cannot wait for replicas",
            )));
        }
        let (url, body) = url::request(&self.base, cmd).map_err(other)?;
        let name = cmd.head.name();
        let uri: Uri = url.parse().map_err(|e| {
            other(WebdisError::new(
                format!("cannot build the URL of a {name} request"),
                e,
            ))
        })?;
        let (status, body) = self.exchange(&uri, body).await.map_err(|e| {
            // A refused connection never carried the request; a broken one may have.
            let sent = if e.is_connect() {
                SendError::NotSent
            } else if is_broken(&e) {
                SendError::Broken
            } else {
                SendError::Unavailable
            };
            sent(Box::new(WebdisError::new(
                format!("webdis request {name} failed"),
                e,
            )))
        })?;
        let parsed = parse_reply(status, &body, name).map_err(|e| match cmd.key {
            // An error page quoted for the operator never holds the whole key (the store's error
            // names the session by its fingerprint).
            Some(key) => e.redacted(&key.key.to_hex()),
            None => e,
        });
        match parsed {
            Ok(reply) => Ok(Sent { reply, then: None }),
            Err(ReplyError::Redis(e)) => Err(e.into()),
            Err(e @ ReplyError::ServerError { .. }) => Err(SendError::Unavailable(Box::new(e))),
            // A value that is not UTF-8: none of this store's.
            Err(e @ ReplyError::Unencodable) => Err(SendError::Corrupt(Box::new(e))),
            Err(e) => Err(other(e)),
        }
    }
}

fn other(e: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> SendError {
    SendError::Other(e.into())
}

impl Http {
    /// Sends one request and reads the whole reply.
    async fn exchange(
        &self,
        uri: &Uri,
        body: Option<Bytes>,
    ) -> Result<(u16, Bytes), ExchangeError> {
        let method = if body.is_some() {
            Method::PUT
        } else {
            Method::GET
        };
        let mut req = Request::builder().method(method).uri(uri.clone());
        if let Some(auth) = &self.auth {
            req = req.header(AUTHORIZATION, auth.clone());
        }
        if body.is_some() {
            req = req.header(
                CONTENT_TYPE,
                HeaderValue::from_static("application/octet-stream"),
            );
        }
        let req = req
            .body(Full::new(body.unwrap_or_default()))
            .map_err(ExchangeError::Request)?;
        let response = self
            .client
            .request(req)
            .await
            .map_err(ExchangeError::Client)?;
        let status = response.status().as_u16();
        let body = Limited::new(response.into_body(), self.max_reply_bytes)
            .collect()
            .await
            .map_err(ExchangeError::Body)?
            .to_bytes();
        Ok((status, body))
    }
}

/// A failure before a whole reply arrived.
#[derive(Debug)]
enum ExchangeError {
    Request(http::Error),
    Client(hyper_util::client::legacy::Error),
    Body(Box<dyn std::error::Error + Send + Sync>),
}

impl ExchangeError {
    fn is_connect(&self) -> bool {
        matches!(self, ExchangeError::Client(e) if e.is_connect())
    }
}

/// A connection that broke before the reply came (closed by the server, reset).
fn is_broken(e: &ExchangeError) -> bool {
    let ExchangeError::Client(e) = e else {
        return false;
    };
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        if let Some(h) = s.downcast_ref::<hyper::Error>()
            && (h.is_incomplete_message() || h.is_closed() || h.is_canceled())
        {
            return true;
        }
        if s.downcast_ref::<std::io::Error>().is_some() {
            return true;
        }
        source = s.source();
    }
    false
}

impl fmt::Display for ExchangeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ExchangeError::Request(_) => f.write_str("cannot build the request"),
            ExchangeError::Client(e) if e.is_connect() => f.write_str("cannot connect to webdis"),
            ExchangeError::Client(_) => f.write_str("the connection to webdis failed"),
            ExchangeError::Body(_) => f.write_str("cannot read the whole reply"),
        }
    }
}

impl std::error::Error for ExchangeError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            ExchangeError::Request(e) => Some(e),
            ExchangeError::Client(e) => Some(e),
            ExchangeError::Body(e) => Some(&**e),
        }
    }
}

/// An error of this store that is not a reply: a message and maybe a cause.
#[derive(Debug)]
struct WebdisError {
    message: String,
    cause: Option<Box<dyn std::error::Error + Send + Sync>>,
}

impl WebdisError {
    fn msg(message: impl Into<String>) -> WebdisError {
        WebdisError {
            message: message.into(),
            cause: None,
        }
    }

    fn new(
        message: impl Into<String>,
        cause: impl Into<Box<dyn std::error::Error + Send + Sync>>,
    ) -> WebdisError {
        WebdisError {
            message: message.into(),
            cause: Some(cause.into()),
        }
    }
}

impl fmt::Display for WebdisError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for WebdisError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.cause
            .as_ref()
            .map(|c| &**c as &(dyn std::error::Error + 'static))
    }
}

impl fmt::Debug for WebdisStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let p = &self.protocol;
        f.debug_struct("WebdisStore")
            .field("base_url", &p.transport.base)
            .field("basic_auth", &p.transport.auth.is_some())
            .field("key_prefix", &p.prefix)
            .field("request_timeout", &p.timeout)
            .finish_non_exhaustive()
    }
}
