//! [`WebdisStore`]: sessions in Redis, reached over HTTP(S) through a Webdis server, with
//! hyper-util's client (keep-alive pool) and hyper-tls.

pub(crate) mod reply;

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::header::{AUTHORIZATION, CONTENT_TYPE, HeaderValue};
use http::{Method, Request, Uri};
use http_body_util::{BodyExt, Full, Limited};
use hyper_tls::HttpsConnector;
use hyper_tls::native_tls;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, percent_decode_str, percent_encode};

use self::reply::{Reply, ReplyError, parse_reply};
use crate::error::StoreError;
use crate::key::Key;
use crate::record::{Record, from_unix_ms};
use crate::store::redis_common::{
    LOAD_LUA, REMOVE_LUA, SAVE_LUA, TOUCH_LUA, decode, encode, expiry_ms, header, script_outcome,
    settle, settle_create,
};
use crate::store::{CreateOutcome, SaveOutcome, SessionStore};

/// Creates a record unless a live one has its key, recognising its own earlier attempt.
///
/// `KEYS[1]` the key; `ARGV[1]` the expiry (Unix ms); `ARGV[2]` the new value's header
/// `<version>:<token>:`; `ARGV[3]` the new value (last: Webdis sends it as the request body).
/// Answers 1 (created, now or by an earlier attempt of this very write) or 0 (taken, by a
/// live session or by a key of another type).
const CREATE_LUA: &str = r"
local old = redis.pcall('SET', KEYS[1], ARGV[3], 'NX', 'PXAT', ARGV[1], 'GET')
if type(old) == 'table' and old.err then
  if string.sub(old.err, 1, 9) == 'WRONGTYPE' then return 0 end
  return old
end
if not old then return 1 end
if string.sub(old, 1, #ARGV[2]) == ARGV[2] then return 1 end
return 0
";

/// Every byte but ASCII letters, digits, `-` and `_` is percent-encoded in a path segment:
/// `/` would split arguments, `.` would select Webdis's output format, `+` would become a space.
const SEGMENT: &AsciiSet = &NON_ALPHANUMERIC.remove(b'-').remove(b'_');

/// Sessions in Redis (7.0 or newer), reached through a [Webdis](https://webdis.io/) server over
/// HTTP or HTTPS.
///
/// For deployments where the application may speak HTTP(S) only, or where Webdis's ACLs guard
/// Redis. It speaks to Webdis with hyper-util's client, keeping connections alive in a pool
/// (no new TCP or TLS handshake per request), and with hyper-tls (the system's TLS library) for
/// `https://` URLs.
///
/// Keys, values and scripts are those of the [`RedisStore`](crate::RedisStore) (feature
/// `redis`): both stores on the same Redis database, with the same key prefix, serve the same
/// sessions. Redis keeps the expiry (`PXAT` on every key); expired sessions disappear without
/// any sweeping.
///
/// # Requests
/// Each operation is one HTTP request, one Redis command:
///
/// | request | Webdis request |
/// |---|---|
/// | does not touch the session | none |
/// | reads | `GET /EVALSHA/<load>/1/<key>` |
/// | reads, with an idle expiry due to slide | the load + `GET /EVALSHA/<touch>/1/<key>/<version>/<ms>` |
/// | writes | the load + `PUT /EVALSHA/<save>/1/<key>/<version>/<version>/<ms>/<token>` |
/// | new session | `PUT /EVALSHA/<create>/1/<key>/<ms>/<header>` |
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
/// becomes `{}` alone or disappears from an array, and one with a NUL byte is cut there. The layer stores JSON text, so its
/// records always fit; a record with other bytes is refused by `create` and `save`
/// ([`StoreError::other`], nothing written), and a foreign value that does not come back whole
/// (the load script also sends its length) is [`StoreError::corrupt`].
///
/// # Failures
/// A refused or broken connection, a timeout, a `5xx` (Webdis answers `503` when it cannot
/// reach Redis) and a loading, read-only or out-of-memory Redis are
/// [`StoreError::unavailable`] (the layer answers 503). A `401`/`403` (wrong credentials, or
/// the ACL forbids a command this store needs: `EVALSHA`, `EVAL`, `DEL`, `SCRIPT`),
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
    inner: Arc<Inner>,
}

struct Inner {
    client: Client<HttpsConnector<HttpConnector>, Full<Bytes>>,
    /// `scheme://host:port[/path][/db]`, without credentials or a trailing `/`.
    base: String,
    auth: Option<HeaderValue>,
    prefix: String,
    timeout: Duration,
    max_reply_bytes: usize,
    load: Script,
    save: Script,
    create: Script,
    touch: Script,
    remove: Script,
    /// Write tokens: a random start, then one more per write.
    tokens: AtomicU64,
}

/// A script, by source and by its SHA1 in Redis's cache.
struct Script {
    source: &'static str,
    sha: String,
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
        let target = Target::parse(url)?;
        let mut base = target.base;
        if let Some(db) = self.database {
            base.push('/');
            base.push_str(&db.to_string());
        }
        let tls = match self.tls {
            Some(tls) => tls,
            None => native_tls::TlsConnector::new()
                .map_err(|e| StoreError::other(WebdisError::new("cannot set up TLS", e)))?,
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
        let store = WebdisStore {
            inner: Arc::new(Inner {
                client,
                base,
                auth: target.auth,
                prefix: self.prefix,
                timeout: self.timeout,
                max_reply_bytes: self.max_reply_bytes,
                load: Script::unloaded(LOAD_LUA),
                save: Script::unloaded(SAVE_LUA),
                create: Script::unloaded(CREATE_LUA),
                touch: Script::unloaded(TOUCH_LUA),
                remove: Script::unloaded(REMOVE_LUA),
                tokens: AtomicU64::new(uuid::Uuid::new_v4().as_u64_pair().0),
            }),
        };
        store.loaded().await
    }
}

impl Script {
    fn unloaded(source: &'static str) -> Script {
        Script {
            source,
            sha: String::new(),
        }
    }
}

/// A parsed base URL: the part requests start with, and the credentials.
struct Target {
    base: String,
    auth: Option<HeaderValue>,
}

impl Target {
    fn parse(url: &str) -> Result<Target, StoreError> {
        let bad = |why: &str| {
            StoreError::other(WebdisError::msg(format!(
                "invalid webdis URL {:?}: {why}",
                redact(url)
            )))
        };
        let uri: Uri = url.parse().map_err(|_| bad("not a URL"))?;
        let Some(scheme @ ("http" | "https")) = uri.scheme_str() else {
            return Err(bad("the scheme must be http or https"));
        };
        if uri.query().is_some() || url.contains('#') {
            return Err(bad("no query or fragment allowed"));
        }
        let authority = uri.authority().ok_or_else(|| bad("no host"))?.as_str();
        let (userinfo, host) = match authority.rsplit_once('@') {
            Some((userinfo, host)) => (Some(userinfo), host),
            None => (None, authority),
        };
        if host.is_empty() {
            return Err(bad("no host"));
        }
        let auth = match userinfo {
            None => None,
            Some(userinfo) => {
                let decoded: Vec<u8> = userinfo
                    .split(':')
                    .map(|part| percent_decode_str(part).collect::<Vec<u8>>())
                    .collect::<Vec<_>>()
                    .join(&b':');
                let mut value = HeaderValue::try_from(format!("Basic {}", base64(&decoded)))
                    .map_err(|_| bad("credentials cannot be sent"))?;
                value.set_sensitive(true);
                Some(value)
            }
        };
        let path = uri.path().trim_end_matches('/');
        Ok(Target {
            base: format!("{scheme}://{host}{path}"),
            auth,
        })
    }
}

/// A URL with its password replaced by `***`, for messages.
fn redact(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let authority_end = rest.find('/').unwrap_or(rest.len());
    match rest[..authority_end].rsplit_once('@') {
        Some((userinfo, host)) => {
            let user = userinfo.split(':').next().unwrap_or_default();
            format!("{scheme}://{user}:***@{host}{}", &rest[authority_end..])
        }
        None => url.to_owned(),
    }
}

/// Standard base64 with padding (RFC 4648), for the Basic auth header.
fn base64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for (i, shift) in [18, 12, 6, 0].into_iter().enumerate() {
            if i <= chunk.len() {
                out.push(char::from(ALPHABET[(n >> shift) as usize & 63]));
            } else {
                out.push('=');
            }
        }
    }
    out
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

/// Why a request failed: no answer, or an answer that is an error.
enum Failure {
    /// A store error already sorted (connection, timeout, body).
    Store(StoreError),
    /// Webdis answered, with an error.
    Reply(ReplyError),
}

impl Failure {
    fn into_store_error(self, what: &str) -> StoreError {
        match self {
            Failure::Store(e) => e,
            Failure::Reply(e) => reply_error(what, e),
        }
    }
}

/// Sorts a reply error into the store's kinds, keeping it as the cause.
fn reply_error(what: &str, e: ReplyError) -> StoreError {
    let wrapped = |e: ReplyError| WebdisError::new(format!("webdis {what} failed"), e);
    if e.is_unavailable() {
        StoreError::unavailable(wrapped(e))
    } else if e.redis_code() == Some("WRONGTYPE") {
        StoreError::corrupt(wrapped(e))
    } else {
        StoreError::other(wrapped(e))
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
        &self.inner.prefix
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
        key.prefixed(&self.inner.prefix)
    }

    /// Loads the scripts into Redis's cache and learns their SHA1s (which also checks the URL,
    /// the credentials and that Redis answers).
    async fn loaded(mut self) -> Result<WebdisStore, StoreError> {
        let mut shas = Vec::new();
        for source in [LOAD_LUA, SAVE_LUA, CREATE_LUA, TOUCH_LUA, REMOVE_LUA] {
            let reply = self
                .request(
                    "SCRIPT",
                    &["LOAD"],
                    Some(Bytes::from_static(source.as_bytes())),
                )
                .await
                .map_err(|e| e.into_store_error("SCRIPT LOAD"))?;
            match reply {
                Reply::Bulk(sha)
                    if sha.len() == 40 && sha.bytes().all(|b| b.is_ascii_hexdigit()) =>
                {
                    shas.push(sha);
                }
                other => return Err(unexpected("SCRIPT LOAD", &other)),
            }
        }
        let inner = Arc::get_mut(&mut self.inner).ok_or_else(|| {
            StoreError::other(WebdisError::msg("webdis store shared before it was built"))
        })?;
        for (script, sha) in [
            &mut inner.load,
            &mut inner.save,
            &mut inner.create,
            &mut inner.touch,
            &mut inner.remove,
        ]
        .into_iter()
        .zip(shas)
        {
            script.sha = sha;
        }
        Ok(self)
    }

    fn next_token(&self) -> u64 {
        self.inner.tokens.fetch_add(1, Ordering::Relaxed)
    }

    /// `base/COMMAND/arg/...`, every argument percent-encoded.
    fn url(&self, command: &str, args: &[&str]) -> String {
        let mut url = String::with_capacity(
            self.inner.base.len()
                + command.len()
                + args.iter().map(|a| a.len() * 3 + 1).sum::<usize>()
                + 1,
        );
        url.push_str(&self.inner.base);
        url.push('/');
        url.push_str(command);
        for arg in args {
            url.push('/');
            url.extend(percent_encode(arg.as_bytes(), SEGMENT));
        }
        url
    }

    /// One command: `GET`, or `PUT` with `body` as its last argument. The whole exchange,
    /// a retry on a broken connection included, is bounded by the request timeout.
    async fn request(
        &self,
        command: &str,
        args: &[&str],
        body: Option<Bytes>,
    ) -> Result<Reply, Failure> {
        self.request_noting_retry(command, args, body, &mut false)
            .await
    }

    /// [`request`](Self::request), setting `retried` when the reply is a retry's (the first
    /// attempt broke off, and may have been applied: see [`settle`]).
    async fn request_noting_retry(
        &self,
        command: &str,
        args: &[&str],
        body: Option<Bytes>,
        retried: &mut bool,
    ) -> Result<Reply, Failure> {
        let uri: Uri = self.url(command, args).parse().map_err(|e| {
            Failure::Store(StoreError::other(WebdisError::new(
                format!("cannot build the URL of a {command} request"),
                e,
            )))
        })?;
        let exchange = async {
            match self.exchange(&uri, body.clone()).await {
                // Every operation of this store is idempotent: one more try on a broken or
                // refused connection (a pooled connection that the server had just closed).
                Err(e) if e.is_connect() || is_broken(&e) => {
                    // A refused connection never carried the request; a broken one may have.
                    *retried |= !e.is_connect();
                    self.exchange(&uri, body).await
                }
                other => other,
            }
        };
        let response = tokio::time::timeout(self.inner.timeout, exchange)
            .await
            .map_err(|_| Failure::Store(timed_out(self.inner.timeout)))?
            .map_err(|e| {
                Failure::Store(StoreError::unavailable(WebdisError::new(
                    format!("webdis request {command} failed"),
                    e,
                )))
            })?;
        let (status, body) = response;
        parse_reply(status, &body, command).map_err(Failure::Reply)
    }

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
        if let Some(auth) = &self.inner.auth {
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
            .inner
            .client
            .request(req)
            .await
            .map_err(ExchangeError::Client)?;
        let status = response.status().as_u16();
        let body = Limited::new(response.into_body(), self.inner.max_reply_bytes)
            .collect()
            .await
            .map_err(ExchangeError::Body)?
            .to_bytes();
        Ok((status, body))
    }

    /// Runs a script by its SHA1; when Redis's cache lacks it (after a restart), by its source,
    /// which caches it again. Sets `retried` as [`request_noting_retry`](Self::request_noting_retry).
    async fn script(
        &self,
        script: &Script,
        key: &str,
        args: &[&str],
        body: Option<Bytes>,
        retried: &mut bool,
    ) -> Result<Reply, Failure> {
        let mut full: Vec<&str> = Vec::with_capacity(args.len() + 3);
        full.extend([script.sha.as_str(), "1", key]);
        full.extend_from_slice(args);
        match self
            .request_noting_retry("EVALSHA", &full, body.clone(), retried)
            .await
        {
            Err(Failure::Reply(e)) if e.redis_code() == Some("NOSCRIPT") => {
                full[0] = script.source;
                self.request_noting_retry("EVAL", &full, body, retried)
                    .await
            }
            other => other,
        }
    }

    /// Runs a conditional script (`save`, `touch`, `remove`) and sorts its answer.
    async fn conditional(
        &self,
        script: &Script,
        key: &Key,
        args: &[&str],
        body: Option<Bytes>,
        op: &'static str,
    ) -> Result<SaveOutcome, StoreError> {
        let mut retried = false;
        let reply = self
            .script(script, &self.key(key), args, body, &mut retried)
            .await
            .map_err(|e| e.into_store_error(op))?;
        match reply {
            Reply::Int(n) => match script_outcome(n) {
                Some(outcome) => settle(outcome, retried, op),
                None => Err(unexpected(op, &Reply::Int(n))),
            },
            other => Err(unexpected(op, &other)),
        }
    }

    async fn load_record(&self, key: &Key) -> Result<Option<Record>, StoreError> {
        const UNREADABLE: &str = "a session key in redis cannot be read through webdis";
        let reply = self
            .script(&self.inner.load, &self.key(key), &[], None, &mut false)
            .await;
        let reply = match reply {
            Ok(reply) => reply,
            Err(Failure::Reply(ReplyError::Unencodable)) => {
                return Err(StoreError::corrupt(WebdisError::new(
                    UNREADABLE,
                    ReplyError::Unencodable,
                )));
            }
            Err(e) => return Err(e.into_store_error("load")),
        };
        let (value, expires_ms, len) = match reply {
            Reply::Nil => return Ok(None),
            // Webdis leaves a bulk string that is not UTF-8 out of a JSON array.
            Reply::Array(parts) if matches!(parts.as_slice(), [Reply::Int(_), Reply::Int(_)]) => {
                return Err(StoreError::corrupt(WebdisError::new(
                    UNREADABLE,
                    ReplyError::Unencodable,
                )));
            }
            Reply::Array(parts) => match <[Reply; 3]>::try_from(parts) {
                Ok([Reply::Bulk(v), Reply::Int(e), Reply::Int(len)]) => (v, e, len),
                Ok(other) => return Err(unexpected("load", &Reply::Array(other.into()))),
                Err(parts) => return Err(unexpected("load", &Reply::Array(parts))),
            },
            other => return Err(unexpected("load", &other)),
        };
        if usize::try_from(len).ok() != Some(value.len()) {
            return Err(StoreError::corrupt(WebdisError::msg(format!(
                "a session key in redis did not come back whole through webdis ({} of {len} \
                 bytes; its JSON cannot carry NUL bytes)",
                value.len()
            ))));
        }
        let Ok(expires_ms) = u64::try_from(expires_ms) else {
            return Err(StoreError::corrupt(WebdisError::msg(
                "a session key in redis has no expiry; this store always sets one",
            )));
        };
        let (version, data) = decode(&Bytes::from(value)).map_err(|e| {
            StoreError::corrupt(WebdisError::msg(format!("a session key in redis: {e}")))
        })?;
        let expires_at = from_unix_ms(expires_ms);
        // Redis's clock decided the key was live; ours has the last word.
        if expires_at <= SystemTime::now() {
            return Ok(None);
        }
        Ok(Some(Record::new(*key, data, version, expires_at)))
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
        if let Some(h) = s.downcast_ref::<hyper::Error>() {
            if h.is_incomplete_message() || h.is_closed() || h.is_canceled() {
                return true;
            }
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

/// Refuses a record whose payload Webdis could not hand back whole.
fn check_payload(record: &Record) -> Result<(), StoreError> {
    let data = record.data();
    if std::str::from_utf8(data).is_err() || data.contains(&0) {
        return Err(StoreError::other(WebdisError::msg(
            "the webdis store keeps UTF-8 text without NUL bytes only (its JSON replies cannot \
             carry other bytes); the record was not written",
        )));
    }
    Ok(())
}

fn timed_out(after: Duration) -> StoreError {
    StoreError::unavailable(std::io::Error::new(
        std::io::ErrorKind::TimedOut,
        format!("webdis did not answer within {after:?}"),
    ))
}

/// An unexpected reply, described by its shape only (a reply may hold session data).
fn unexpected(op: &str, reply: &Reply) -> StoreError {
    let shape = match reply {
        Reply::Nil => "nil".to_owned(),
        Reply::Int(n) => format!("the integer {n}"),
        Reply::Bulk(b) => format!("a bulk string of {} bytes", b.len()),
        Reply::Status(s) => format!("a status of {} bytes", s.len()),
        Reply::Array(a) => format!("an array of {} replies", a.len()),
    };
    StoreError::other(WebdisError::msg(format!(
        "unexpected webdis reply to {op}: {shape}"
    )))
}

impl fmt::Debug for WebdisStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WebdisStore")
            .field("base_url", &self.inner.base)
            .field("basic_auth", &self.inner.auth.is_some())
            .field("key_prefix", &self.inner.prefix)
            .field("request_timeout", &self.inner.timeout)
            .finish_non_exhaustive()
    }
}

impl SessionStore for WebdisStore {
    async fn load(&self, key: &Key) -> Result<Option<Record>, StoreError> {
        self.load_record(key).await
    }

    async fn create(&self, record: &Record) -> Result<CreateOutcome, StoreError> {
        check_payload(record)?;
        let token = self.next_token();
        let expiry = expiry_ms(record.expires_at()).to_string();
        let header = header(record.version(), token);
        let mut retried = false;
        let reply = self
            .script(
                &self.inner.create,
                &self.key(&record.key()),
                &[&expiry, &header],
                Some(Bytes::from(encode(record, token))),
                &mut retried,
            )
            .await
            .map_err(|e| e.into_store_error("create"))?;
        match reply {
            Reply::Int(1) => settle_create(CreateOutcome::Created, retried),
            Reply::Int(0) => settle_create(CreateOutcome::IdTaken, retried),
            other => Err(unexpected("create", &other)),
        }
    }

    async fn save(
        &self,
        record: &Record,
        expected_version: u64,
    ) -> Result<SaveOutcome, StoreError> {
        check_payload(record)?;
        let token = self.next_token();
        // After a conflict, the layer spreads out its retries.
        self.conditional(
            &self.inner.save,
            &record.key(),
            &[
                &expected_version.to_string(),
                &record.version().to_string(),
                &expiry_ms(record.expires_at()).to_string(),
                &format!("{token:016x}"),
            ],
            Some(Bytes::from(encode(record, token))),
            "save",
        )
        .await
    }

    async fn touch(
        &self,
        key: &Key,
        expected_version: u64,
        expires_at: SystemTime,
    ) -> Result<SaveOutcome, StoreError> {
        self.conditional(
            &self.inner.touch,
            key,
            &[
                &expected_version.to_string(),
                &expiry_ms(expires_at).to_string(),
            ],
            None,
            "touch",
        )
        .await
    }

    async fn remove(&self, key: &Key, expected_version: u64) -> Result<SaveOutcome, StoreError> {
        self.conditional(
            &self.inner.remove,
            key,
            &[&expected_version.to_string()],
            None,
            "remove",
        )
        .await
    }

    async fn delete(&self, key: &Key) -> Result<(), StoreError> {
        match self
            .request("DEL", &[&self.key(key)], None)
            .await
            .map_err(|e| e.into_store_error("DEL"))?
        {
            Reply::Int(_) => Ok(()),
            other => Err(unexpected("DEL", &other)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_matches_rfc_4648() {
        for (input, want) in [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
            ("app:s3cret", "YXBwOnMzY3JldA=="),
        ] {
            assert_eq!(base64(input.as_bytes()), want, "{input}");
        }
    }

    #[test]
    fn urls() {
        let t = Target::parse("http://127.0.0.1:7379").unwrap();
        assert_eq!(t.base, "http://127.0.0.1:7379");
        assert!(t.auth.is_none());
        let t = Target::parse("https://app:p%40ss%3Aw@webdis.example:443/proxy/").unwrap();
        assert_eq!(t.base, "https://webdis.example:443/proxy");
        assert_eq!(
            t.auth.unwrap().to_str().unwrap(),
            format!("Basic {}", base64(b"app:p@ss:w"))
        );
        for bad in [
            "redis://127.0.0.1:6379",
            "127.0.0.1:7379",
            "http://127.0.0.1:7379/?db=1",
            "http://127.0.0.1:7379/#x",
            "",
            "http://",
        ] {
            let e = Target::parse(bad)
                .err()
                .unwrap_or_else(|| panic!("{bad} parsed"));
            assert!(!e.is_unavailable());
        }
        let e = Target::parse("ftp://app:secret@host/").err().unwrap();
        let shown = format!("{e:?}");
        assert!(!shown.contains("secret"), "{shown}");
        assert!(shown.contains("app:***@host"), "{shown}");
    }

    #[test]
    fn segments_cannot_split_or_select_a_format() {
        let encoded: String =
            percent_encode("a/b.json+c d%2F?#\"'\n:é".as_bytes(), SEGMENT).to_string();
        assert_eq!(encoded, "a%2Fb%2Ejson%2Bc%20d%252F%3F%23%22%27%0A%3A%C3%A9");
        assert!(
            encoded
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"%-_".contains(&b))
        );
    }

    #[test]
    fn payload_check() {
        let rec = |data: &'static [u8]| {
            Record::new(
                Key::random(),
                Bytes::from_static(data),
                1,
                SystemTime::now(),
            )
        };
        assert!(check_payload(&rec(b"{\"d\":{\"z\":\"\\u0000 z\xc3\xbcrich\"}}")).is_ok());
        assert!(check_payload(&rec(b"a\0b")).is_err());
        assert!(check_payload(&rec(b"\xff\xfe")).is_err());
    }
}
