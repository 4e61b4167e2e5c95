//! Server-side sessions for [hyper] 1.x services.
//!
//! Wrap any `hyper::service::Service<Request<B>>` once with a [`SessionLayer`], and every request
//! carries a [`Session`]: typed `get` / `insert` / `remove` / `contains`, flash values that live
//! for one read, atomic `update`s, `clear`, `destroy`, and id cycling on login. Session data
//! lives in a [`store`] chosen by a cargo feature.
//!
//! # Example
//! ```no_run
//! use std::convert::Infallible;
//!
//! use http_body_util::Full;
//! use hyper::body::{Bytes, Incoming};
//! use hyper::server::conn::http1;
//! use hyper::service::service_fn;
//! use hyper::{Request, Response};
//! use hyper_sessions::{MemoryStore, Session, SessionLayer};
//! use hyper_util::rt::TokioIo;
//!
//! async fn handler(req: Request<Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
//!     let session = Session::from_request(&req).expect("SessionLayer is installed");
//!     let body = match session.update("count", |n: Option<u64>| n.unwrap_or(0) + 1).await {
//!         Ok(n) => format!("Visited {n} times"),
//!         Err(_) => "session unavailable".to_owned(),
//!     };
//!     Ok(Response::new(Full::new(Bytes::from(body))))
//! }
//!
//! #[tokio::main]
//! async fn main() -> Result<(), Box<dyn std::error::Error>> {
//!     let service = SessionLayer::new(MemoryStore::default()).wrap(service_fn(handler));
//!     let listener = tokio::net::TcpListener::bind("127.0.0.1:8000").await?;
//!     loop {
//!         let (stream, _) = listener.accept().await?;
//!         let service = service.clone();
//!         tokio::spawn(async move {
//!             let _ = http1::Builder::new()
//!                 .serve_connection(TokioIo::new(stream), service)
//!                 .await;
//!         });
//!     }
//! }
//! ```
//!
//! # How a request goes
//! 1. The layer finds the session cookie and parses the id strictly (and checks its signature,
//!    with signing keys); an id this crate could not have issued is dropped without a store
//!    lookup, and the request gets a fresh session.
//! 2. The [`Session`] goes into the request's extensions. Nothing is loaded yet: a request that
//!    never uses its session costs no store I/O.
//! 3. The first read or write loads the record (one store round trip).
//! 4. After the handler answers: nothing changed, nothing written (but for a throttled expiry
//!    refresh, a conditional `touch`); changes are saved with one compare-and-set; an emptied
//!    session is removed at the version it had and its cookie removed; a cycled session is moved
//!    to a new record and cookie. An empty new session is never stored and sets no cookie.
//! 5. A failed save is never dropped: it is logged (through the [`log`] crate) with its cause
//!    and the response becomes a 503 (store unavailable) or 500, or whatever the
//!    [error handler](SessionLayerBuilder::error_handler) answers.
//!
//! # No lost updates, and destroy is final
//! Every change a request makes to the store is conditional on the version it loaded: saves
//! (compare-and-set), expiry refreshes, removing an emptied session, and the move of
//! [`cycle_id`](Session::cycle_id) (the new record is created, then the old one removed at the
//! version the new one was built from). The only unconditional change is
//! [`destroy`](Session::destroy). When another request of the same session wrote first, the
//! session reloads, replays this request's own changes (the keys it set, removed or cleared, its
//! [`update`](Session::update)s, the flashes it read, its expiry policy) on the fresh record and
//! tries again. Two concurrent requests that write different keys both keep their writes,
//! concurrent `update` increments are all counted, and replaying a flash read removes that flash
//! only, not a newer one. A write or a cycle racing a `destroy` never brings the session back
//! under any id: it fails with [`Error::is_gone`]. A request removes the cookie only for a record
//! it destroyed or emptied itself. When a store cannot tell whether a write was applied (its
//! reply was lost), the request fails with a 503 instead of replaying.
//!
//! # A user's sessions
//! At login, [`Session::set_owner`] names the user a session belongs to (and
//! [`Session::set_label`] a name for it the user will recognise). Every store indexes owners, so
//! [`Session::owner_sessions`] lists the user's live sessions ([`SessionInfo`]: a non-secret
//! [`Handle`], the label, created, last seen, expires, and which one is asking), and
//! [`Session::revoke`] and [`Session::revoke_others`] end them; [`SessionLayer::owners`] does
//! the same outside a request ([`Owners`]). A revoked session is deleted as a destroyed one is,
//! and stays gone: a request of it running at the same time fails to save.
//!
//! # Security model
//! - Ids are 122 random bits from the operating system's CSPRNG (UUID v4), parsed strictly.
//! - A client-chosen id is never adopted: an id the store does not hold starts a fresh session
//!   under a new id, and creating a record never overwrites an existing one.
//! - The cookie is `HttpOnly; SameSite=Lax; Secure; Path=/` by default; each weakening setter
//!   says why in its docs, and `__Host-`/`__Secure-` names are checked when the layer is built.
//! - Responses that set or remove the cookie carry `Vary: Cookie` and `Cache-Control: private`.
//! - Optionally, signed cookies ([`SessionLayerBuilder::signing_keys`]): the id with a MAC
//!   (keyed BLAKE3) of the cookie's name and the id, verified in constant time; unsigned, forged
//!   or unknown-key cookies never reach the store, and keys rotate without logging anyone out.
//! - The record is loaded and its expiry re-checked on every use; a store is never trusted to
//!   have removed expired sessions. Call [`Session::cycle_id`] on login.
//!
//! # Feature flags
//! - `memory` (default): [`MemoryStore`], in-process, sharded, bounded and swept.
//! - `tower`: [`SessionLayer`] is a `tower_layer::Layer` and [`SessionService`] a
//!   `tower_service::Service` (readiness forwarded to the inner service), for
//!   `tower::ServiceBuilder` stacks and axum. Adds only `tower-layer` and `tower-service`.
//! - `axum` (implies `tower`): [`Session`] is an axum extractor (`FromRequestParts`), rejecting
//!   with [`MissingSessionLayer`] (a 500) when the layer is missing. Adds only `axum-core` 0.5
//!   (axum 0.8).
//! - `redis`: [`RedisStore`], sessions shared by every app server through Redis (7.0 or newer,
//!   or Valkey), on a single node (over one pipelined connection of its own) or a Redis Cluster
//!   or under Sentinel (with the `redis` crate); the server keeps the expiry, and a read costs
//!   one command.
//! - `webdis`: [`WebdisStore`], the same sessions in Redis reached over HTTP or HTTPS through a
//!   [Webdis](https://webdis.io/) server (Basic auth for its ACLs, a private CA through
//!   [`native_tls`]), with hyper-util's pooled keep-alive client and hyper-tls; keys and values
//!   are the Redis store's, so both can share one Redis. Adds `hyper-util`, `hyper-tls`
//!   (the system's TLS library), `http-body-util` and `percent-encoding`.
//! - `sqlite`: [`SqliteStore`], sessions in one `SQLite` file that survive a restart (bundled
//!   `SQLite` via rusqlite, on a connection thread of the store's own: no system library needed,
//!   nothing blocks the runtime).
//! - `postgres`: [`PostgresStore`], sessions in one PostgreSQL table shared by every app server,
//!   with tokio-postgres and a deadpool-postgres pool (plain TCP or a Unix socket); one statement
//!   per operation, prepared once per connection. Adds `tokio-postgres` and `deadpool-postgres`.
//! - `postgres-tls` (implies `postgres`): TLS for the PostgreSQL connections
//!   (`PostgresStoreBuilder::tls`) with `postgres-native-tls`, on the system's TLS library.
//!
//! Without any store feature the crate still builds: bring your own
//! [`SessionStore`](store::SessionStore).
//!
//! # Where things are
//! What an application uses is at the crate root: the layer and its builder, [`Session`], the
//! stores and their builders, [`Expiry`], [`SameSite`], [`Error`]. What a store author uses is
//! in [`store`]: the [`SessionStore`](store::SessionStore) contract, [`Record`](store::Record),
//! [`Key`](store::Key), the outcomes and [`StoreError`](store::StoreError). The layer's
//! response future is in [`future`].
//!
//! # Stability
//! The public API is the items re-exported here and in [`store`] and [`future`]. [`Error`] is
//! opaque (ask it `is_*`), and the public enums are `#[non_exhaustive]`, so both can grow
//! without breaking you.
//!
//! [hyper]: https://docs.rs/hyper
#![cfg_attr(docsrs, feature(doc_cfg))]

// `hyper_sessions::` paths inside the crate too: `testing` uses only public paths, so that the
// crate's own tests can include it as it is.
extern crate self as hyper_sessions;

mod config;
mod cookie;
mod error;
#[cfg(feature = "axum")]
mod extract;
mod id;
mod key;
mod service;
mod session;
mod sign;
pub mod store;
mod trace;

/// Entry points for the fuzz targets and their seed replay test, built only with the hidden
/// `__fuzz` feature (which `fuzz/` and the test run turn on): **not part of the public API**,
/// hidden from the docs and exempt from semver.
#[cfg(feature = "__fuzz")]
#[doc(hidden)]
#[path = "fuzz_entry.rs"]
pub mod __fuzz;

#[cfg(feature = "testing")]
#[cfg_attr(docsrs, doc(cfg(feature = "testing")))]
pub mod testing;

/// The future of a [`SessionService`] call.
pub mod future {
    pub use crate::service::ResponseFuture;
}

pub use crate::config::{ErrorHandler, Expiry, SameSite};
pub use crate::error::Error;
#[cfg(feature = "axum")]
#[cfg_attr(docsrs, doc(cfg(feature = "axum")))]
pub use crate::extract::MissingSessionLayer;
pub use crate::id::{Id, InvalidId};
pub use crate::key::Fingerprint;
pub use crate::service::{
    DEFAULT_MAX_RECORD_BYTES, SessionLayer, SessionLayerBuilder, SessionService,
};
pub use crate::session::{Handle, MAX_OWNER_BYTES, Owners, Session, SessionInfo};

#[cfg(feature = "memory")]
#[cfg_attr(docsrs, doc(cfg(feature = "memory")))]
pub use crate::store::memory::{MemoryStore, MemoryStoreBuilder};

#[cfg(feature = "redis")]
#[cfg_attr(docsrs, doc(cfg(feature = "redis")))]
pub use crate::store::redis::conn::{RedisStore, RedisStoreBuilder};

#[cfg(feature = "webdis")]
#[cfg_attr(docsrs, doc(cfg(feature = "webdis")))]
pub use crate::store::redis::webdis::{WebdisStore, WebdisStoreBuilder};

/// The TLS library of the [`WebdisStore`] and of the `PostgresStore` with `postgres-tls` (the
/// `native-tls` crate, the one hyper-tls uses), to build the connector passed to
/// `WebdisStoreBuilder::tls_connector` or `PostgresStoreBuilder::tls`.
#[cfg(feature = "webdis")]
#[cfg_attr(docsrs, doc(cfg(any(feature = "webdis", feature = "postgres-tls"))))]
pub use hyper_tls::native_tls;
/// The TLS library of the `PostgresStore` with `postgres-tls` (the `native-tls` crate), to build
/// the connector passed to `PostgresStoreBuilder::tls`; the same crate as with `webdis`.
#[cfg(all(feature = "postgres-tls", not(feature = "webdis")))]
#[cfg_attr(docsrs, doc(cfg(any(feature = "webdis", feature = "postgres-tls"))))]
pub use native_tls;

#[cfg(feature = "sqlite")]
#[cfg_attr(docsrs, doc(cfg(feature = "sqlite")))]
pub use crate::store::sqlite::{SqliteStore, SqliteStoreBuilder};

#[cfg(feature = "postgres")]
#[cfg_attr(docsrs, doc(cfg(feature = "postgres")))]
pub use crate::store::postgres::{PostgresStore, PostgresStoreBuilder};

/// The connection pool of the [`PostgresStore`] (the `deadpool-postgres` crate, which re-exports
/// `tokio_postgres`), to build a pool of the same version for
/// [`PostgresStore::with_pool`].
#[cfg(feature = "postgres")]
#[cfg_attr(docsrs, doc(cfg(feature = "postgres")))]
pub use deadpool_postgres;
