//! [`PostgresStore`]: sessions in one PostgreSQL table, through a pool of tokio-postgres
//! connections.
//!
//! Here the store's face: its builder, the contract's methods and the cleanup task. `schema`
//! checks names, makes and checks the table and holds the statements; `error` says what failed.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime};

use bytes::{Bytes, BytesMut};
use deadpool_postgres::{ClientWrapper, Manager, ManagerConfig, Object, Pool, RecyclingMethod};
use tokio_postgres::Row;
use tokio_postgres::types::{IsNull, ToSql, Type, to_sql_checked};

use self::error::{Fail, fail_error, is_stale_statement, is_transient_conflict, name_row};
use self::schema::{Sql, setup, validate_name};
use crate::error::StoreError;
use crate::key::Key;
use crate::store::cleanup;
use crate::store::{CreateOutcome, Record, SaveOutcome, SessionStore, from_unix_ms, unix_ms};

mod error;
mod schema;

/// Rows removed per statement by [`PostgresStore::delete_expired`], so requests interleave.
const CLEANUP_BATCH: i64 = 1000;

/// Sessions in a PostgreSQL table: shared by every app server that reaches the database, and
/// kept across restarts, where most applications already keep their data.
///
/// Connections come from a [`deadpool_postgres`] pool of tokio-postgres clients, plain TCP or a
/// Unix socket by default, TLS with the `postgres-tls` feature; each keeps the store's
/// statements prepared, so every contract method is one statement and one round trip: a request
/// that reads its session costs one, one that changes it two (the load, then the conditional
/// save), a new session one, a destroy one. Nothing blocks the async runtime, and no lock is held
/// across an `.await`.
///
/// # Storage
/// One table (default `sessions` in the connection's current schema, see
/// [`PostgresStoreBuilder::table`] and [`schema`](PostgresStoreBuilder::schema)), created on first
/// open:
///
/// ```sql
/// CREATE TABLE sessions (
///     key bytea PRIMARY KEY CHECK (octet_length(key) = 16),  -- a digest of the id, never the id
///     data bytea NOT NULL,                                    -- the encoded record
///     version bigint NOT NULL,
///     expires_at timestamptz NOT NULL,
///     owner text                                              -- the session's owner, if any
/// ) WITH (fillfactor = 90);
/// CREATE INDEX sessions_expires_at ON sessions (expires_at);
/// CREATE INDEX sessions_owner ON sessions (owner) WHERE owner IS NOT NULL;
/// ```
///
/// The [owner](Record::owner) is written by `create` and `save` (`NULL` for none) and left
/// alone by `touch`; [`owned`](SessionStore::owned) is one statement through the partial owner
/// index (sessions without an owner cost it nothing).
///
/// Its schema version is kept in a `hyper_sessions_schema` table beside it (one row per session
/// table), so that a release can migrate: a table of schema version 1 (before owners) gets the
/// `owner` column (nullable, no default: no row is rewritten) and its index when a store of this
/// release opens it, in the transaction and under the advisory lock that check the schema.
/// Building the index reads the table once, while the `ALTER TABLE`'s lock holds off other
/// statements on it; like every setup statement it is bounded by the statement timeout, so open
/// a large version-1 table once with a longer one. App servers of the older release that are
/// already running keep working (their sessions have no owner); one started afterwards refuses
/// the newer schema. A table of that name that the store did not create,
/// one of a newer schema version, or one whose columns have other types is refused when the
/// store opens, with an error saying which.
///
/// Expired rows are never returned nor changed: every statement compares the expiry with the
/// server's clock as it looks at the row. `save`, `touch` and `remove` lock the live row
/// (`SELECT ... FOR UPDATE`), change it only if its version is the one expected, and answer the
/// version they found, all in one statement, so a conflict and a missing row are told apart
/// without a second round trip. Saves that keep the expiry change no indexed value, and with the
/// table's fill factor are usually heap-only updates.
///
/// # Expired rows
/// [`delete_expired`](PostgresStore::delete_expired) removes them, and a background task does so
/// every [`cleanup_interval`](PostgresStoreBuilder::cleanup_interval) (default five minutes); it
/// stops when the last clone of the store is dropped. Several app servers may run it at once
/// (rows another one is deleting are skipped).
///
/// # Errors
/// Every operation, from waiting for a pooled connection to the statement's answer, is bounded
/// by the [`statement_timeout`](PostgresStoreBuilder::statement_timeout) (2 s by default, also set
/// as the server's `statement_timeout` on the store's own connections). A refused or broken
/// connection, an exhausted pool, a timeout, a read-only server (a standby, SQLSTATE 25006), a
/// serialization failure or deadlock (40001, 40P01) that persists over 8 attempts of the
/// statement (each changed nothing; under `SERIALIZABLE` as the database's default isolation,
/// concurrent saves of one session conflict that way), a server shutting down or out of
/// resources (57P01, 53xxx) are [`StoreError::unavailable`] (the layer answers 503); the pool
/// opens new connections when the server is back, without a restart. A row that cannot be read back (a
/// `NULL` or negative version, columns whose types were changed after the store opened) is
/// [`StoreError::corrupt`] (the layer starts a fresh session and leaves the row alone). The rest
/// (permissions, a table dropped under the store) is [`StoreError::other`].
///
/// Errors name the operation and the table, and keep the server's SQLSTATE and primary message,
/// never its `DETAIL` (which can quote a row); a session is named by its key's
/// [`fingerprint`](Key::fingerprint) at most. Statement parameters carrying a key or session data
/// print as `<N bytes>` in tokio-postgres's own debug log.
///
/// # Examples
/// ```no_run
/// use hyper_sessions::{PostgresStore, SessionLayer};
///
/// # async fn run() -> Result<(), hyper_sessions::store::StoreError> {
/// let store = PostgresStore::open("postgres://app:secret@db.internal/app").await?;
/// // or over a Unix socket: "host=/var/run/postgresql user=app dbname=app"
/// let layer = SessionLayer::new(store);
/// # let _ = layer;
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct PostgresStore {
    inner: Arc<Inner>,
}

struct Inner {
    pool: Pool,
    sql: Sql,
    /// The bound on each operation, from asking for a connection to the answer.
    timeout: Duration,
    /// `table "public"."sessions" on 127.0.0.1:5432/app`, for error messages.
    label: Arc<str>,
    /// The TLS connector of the store's own connections, for cancel requests.
    tls: Option<CancelTls>,
}

/// Configures and opens a [`PostgresStore`].
///
/// # Examples
/// ```no_run
/// use std::time::Duration;
/// use hyper_sessions::PostgresStore;
///
/// # async fn run() -> Result<(), hyper_sessions::store::StoreError> {
/// let store = PostgresStore::builder()
///     .schema("app")
///     .table("web_sessions")
///     .pool_size(32)
///     .statement_timeout(Duration::from_secs(1))
///     .cleanup_interval(Some(Duration::from_secs(60)))
///     .open("postgres://app@db.internal/app")
///     .await?;
/// # let _ = store;
/// # Ok(())
/// # }
/// ```
#[must_use]
pub struct PostgresStoreBuilder {
    schema: Option<String>,
    table: String,
    pool_size: usize,
    statement_timeout: Duration,
    cleanup_interval: Option<Duration>,
    create_table: bool,
    #[cfg(feature = "postgres-tls")]
    tls: Option<native_tls::TlsConnector>,
}

impl fmt::Debug for PostgresStoreBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut d = f.debug_struct("PostgresStoreBuilder");
        d.field("schema", &self.schema)
            .field("table", &self.table)
            .field("pool_size", &self.pool_size)
            .field("statement_timeout", &self.statement_timeout)
            .field("cleanup_interval", &self.cleanup_interval)
            .field("create_table", &self.create_table);
        #[cfg(feature = "postgres-tls")]
        d.field("tls", &self.tls.is_some());
        d.finish()
    }
}

impl Default for PostgresStoreBuilder {
    fn default() -> Self {
        PostgresStoreBuilder {
            schema: None,
            table: "sessions".to_owned(),
            pool_size: 16,
            statement_timeout: Duration::from_secs(2),
            cleanup_interval: Some(Duration::from_secs(300)),
            create_table: true,
            #[cfg(feature = "postgres-tls")]
            tls: None,
        }
    }
}

impl PostgresStoreBuilder {
    /// The schema of the session table (default: the connection's current schema, as
    /// `current_schema()` names it when the store opens; usually `public`). It must exist.
    ///
    /// The name must be 1 to 63 ASCII letters, digits and underscores, not starting with a digit
    /// nor with `pg_`; anything else makes `open` fail (it never reaches SQL). It is quoted in
    /// every statement, so it is used exactly as given, case included.
    pub fn schema(mut self, name: impl Into<String>) -> Self {
        self.schema = Some(name.into());
        self
    }

    /// The table that holds the sessions (default `sessions`), created if missing (see
    /// [`create_table`](Self::create_table)).
    ///
    /// The name must be 1 to 48 ASCII letters, digits and underscores, not starting with a digit
    /// nor with `pg_`, and not `hyper_sessions_schema`; anything else makes `open` fail (it
    /// never reaches SQL). It is quoted in every statement, so it is used exactly as given, case
    /// included. Several stores can share a database under different table names.
    pub fn table(mut self, name: impl Into<String>) -> Self {
        self.table = name.into();
        self
    }

    /// The most connections the store's pool opens (default 16). Not used by
    /// [`open_with_pool`](Self::open_with_pool), whose pool has its own size.
    pub fn pool_size(mut self, size: usize) -> Self {
        self.pool_size = size.max(1);
        self
    }

    /// The longest an operation may take, from waiting for a pooled connection to the
    /// statement's answer, before it fails as [`StoreError::unavailable`] (default 2 s).
    ///
    /// A statement that did not answer in time is cancelled on the server (a cancel request, as
    /// `psql`'s Ctrl-C sends), so that one waiting for a row lock does not go on, and perhaps
    /// write, after the caller was told it failed; its connection is closed, not handed to
    /// another request. On the store's own connections ([`open`](Self::open)) the timeout is
    /// also the server's `statement_timeout` (unless the connection string sets one) and the
    /// connect timeout. A write that timed out may still have been made (its answer was not
    /// waited for): the layer answers 503 and replays nothing, as the store contract says.
    pub fn statement_timeout(mut self, timeout: Duration) -> Self {
        self.statement_timeout = timeout.max(Duration::from_millis(1));
        self
    }

    /// How often the background task deletes expired rows (default every five minutes); `None`
    /// starts no task (call [`PostgresStore::delete_expired`] yourself, or leave it to another
    /// app server).
    ///
    /// The task is spawned on the tokio runtime that opens the store and stops when the last
    /// clone of the store is dropped.
    pub fn cleanup_interval(mut self, interval: Option<Duration>) -> Self {
        self.cleanup_interval = interval.map(|i| i.max(Duration::from_millis(1)));
        self
    }

    /// Whether `open` creates the table (and the `hyper_sessions_schema` table) when it is
    /// missing (default `true`). With `false`, a missing table is an error at open: for an
    /// application whose role may not create tables, once the table has been made by one that
    /// may (a migration step opening the store once).
    pub fn create_table(mut self, create: bool) -> Self {
        self.create_table = create;
        self
    }

    /// Connects with TLS through this `native-tls` connector (feature `postgres-tls`), e.g. one
    /// that trusts a private CA. Without it, connections are plain TCP or a Unix socket.
    ///
    /// The connection string's `sslmode` decides whether TLS is required: the default
    /// (`prefer`) falls back to plain TCP when the server offers no TLS; put
    /// `sslmode=require` in it to refuse that.
    #[cfg(feature = "postgres-tls")]
    #[cfg_attr(docsrs, doc(cfg(feature = "postgres-tls")))]
    pub fn tls(mut self, connector: native_tls::TlsConnector) -> Self {
        self.tls = Some(connector);
        self
    }

    /// Opens a pool on the database at `url` (a `postgres://` URL or a `key=value` connection
    /// string, as tokio-postgres reads them: `host=/var/run/postgresql` for a Unix socket),
    /// creates or checks the table and starts the cleanup task.
    ///
    /// # Errors
    /// [`StoreError::other`] for an invalid name or connection string, failed authentication, a
    /// missing schema, a table of that name that is not a session table (or has other column
    /// types, or a newer schema version), a missing table with
    /// [`create_table(false)`](Self::create_table), or a role that may not create it;
    /// [`StoreError::unavailable`] when the server cannot be reached.
    pub async fn open(self, url: &str) -> Result<PostgresStore, StoreError> {
        self.validate()?;
        let mut config: tokio_postgres::Config = url.parse().map_err(|e| {
            StoreError::other(error::PostgresError::new(
                "invalid PostgreSQL connection string".to_owned(),
                Some(Box::new(e)),
            ))
        })?;
        let ms = self.statement_timeout.as_millis();
        if !config
            .get_options()
            .is_some_and(|o| o.contains("statement_timeout"))
        {
            let options = match config.get_options() {
                Some(o) if !o.trim().is_empty() => format!("{o} -c statement_timeout={ms}"),
                _ => format!("-c statement_timeout={ms}"),
            };
            config.options(options);
        }
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(self.statement_timeout);
        }
        if config.get_application_name().is_none() {
            config.application_name("hyper-sessions");
        }
        let server = describe(&config);
        let manager_config = ManagerConfig {
            recycling_method: RecyclingMethod::Fast,
        };
        #[cfg(feature = "postgres-tls")]
        let manager = match &self.tls {
            Some(connector) => Manager::from_config(
                config,
                postgres_native_tls::MakeTlsConnector::new(connector.clone()),
                manager_config,
            ),
            None => Manager::from_config(config, tokio_postgres::NoTls, manager_config),
        };
        #[cfg(not(feature = "postgres-tls"))]
        let manager = Manager::from_config(config, tokio_postgres::NoTls, manager_config);
        let pool = Pool::builder(manager)
            .max_size(self.pool_size)
            .build()
            .map_err(|e| {
                StoreError::other(error::PostgresError::new(
                    format!("cannot build the connection pool: {e}"),
                    None,
                ))
            })?;
        self.finish(pool, Some(server)).await
    }

    /// Uses `pool`, an application's own [`deadpool_postgres::Pool`], instead of opening one:
    /// creates or checks the table and starts the cleanup task.
    ///
    /// [`pool_size`](Self::pool_size) and TLS are the pool's own business then (a `tls`
    /// connector given here is used only for cancel requests), and the
    /// [`statement_timeout`](Self::statement_timeout) bounds each operation on the client side
    /// (a statement that did not answer in time is cancelled and its connection closed; set
    /// the server's `statement_timeout` in the pool's configuration too if you want it).
    /// Give the pool a recycling method that checks connections
    /// ([`RecyclingMethod::Fast`] at least, deadpool's default), so that it drops broken ones.
    ///
    /// # Errors
    /// As [`open`](Self::open).
    pub async fn open_with_pool(self, pool: Pool) -> Result<PostgresStore, StoreError> {
        self.validate()?;
        self.finish(pool, None).await
    }

    fn validate(&self) -> Result<(), StoreError> {
        validate_name("table", &self.table)?;
        if let Some(schema) = &self.schema {
            validate_name("schema", schema)?;
        }
        Ok(())
    }

    async fn finish(self, pool: Pool, server: Option<String>) -> Result<PostgresStore, StoreError> {
        let mut label = format!("table \"{}\"", self.table);
        if let Some(server) = &server {
            label = format!("{label} on {server}");
        }
        let fail = |fail: Fail| fail_error("open", &label, fail);
        let setup_done = async {
            let mut client = pool.get().await?;
            let schema = if let Some(schema) = &self.schema {
                schema.clone()
            } else {
                let row = client.query_one("SELECT current_schema()", &[]).await?;
                let schema: Option<String> = row.try_get(0)?;
                schema.ok_or_else(|| {
                    Fail::Setup(
                        "the connection has no current schema (search_path names none that \
                         exists); choose one with PostgresStoreBuilder::schema"
                            .to_owned(),
                    )
                })?
            };
            validate_name("schema", &schema).map_err(|e| {
                Fail::Setup(
                    std::error::Error::source(&e).map_or_else(String::new, ToString::to_string),
                )
            })?;
            setup(&mut client, &schema, &self.table, self.create_table).await?;
            Ok::<String, Fail>(schema)
        };
        let schema = match tokio::time::timeout(self.statement_timeout * 5, setup_done).await {
            Ok(result) => result.map_err(fail)?,
            Err(_) => {
                return Err(fail(Fail::Timeout {
                    after: self.statement_timeout * 5,
                    for_connection: false,
                }));
            }
        };
        let mut label = format!("table \"{schema}\".\"{}\"", self.table);
        if let Some(server) = server {
            label = format!("{label} on {server}");
        }
        let store = PostgresStore {
            inner: Arc::new(Inner {
                pool,
                sql: Sql::new(&schema, &self.table),
                timeout: self.statement_timeout,
                label: label.into(),
                #[cfg(feature = "postgres-tls")]
                tls: self
                    .tls
                    .clone()
                    .map(postgres_native_tls::MakeTlsConnector::new),
                #[cfg(not(feature = "postgres-tls"))]
                tls: None,
            }),
        };
        if let Some(interval) = self.cleanup_interval {
            if let Ok(handle) = tokio::runtime::Handle::try_current() {
                handle.spawn(cleanup::every(
                    Arc::downgrade(&store.inner),
                    interval,
                    "PostgreSQL",
                    |inner| async move { delete_expired(&inner).await },
                ));
            } else {
                crate::trace::event!(
                    warn,
                    "hyper-sessions: PostgresStore opened outside a tokio runtime; no cleanup \
                     task (call delete_expired yourself)"
                );
            }
        }
        Ok(store)
    }
}

/// `127.0.0.1:5432/app`, or the socket directory: where the store connects, without the user
/// or password.
fn describe(config: &tokio_postgres::Config) -> String {
    use tokio_postgres::config::Host;
    let host = match config.get_hosts().first() {
        Some(Host::Tcp(host)) => host.clone(),
        #[cfg(unix)]
        Some(Host::Unix(dir)) => dir.display().to_string(),
        None => "localhost".to_owned(),
    };
    let port = config.get_ports().first().copied().unwrap_or(5432);
    let db = config
        .get_dbname()
        .or(config.get_user())
        .unwrap_or("postgres");
    format!("{host}:{port}/{db}")
}

impl PostgresStore {
    /// Opens a store on the database at `url` with the default settings: table `sessions` in
    /// the current schema (created if missing), a pool of up to 16 connections, a 2 s statement
    /// timeout, expired rows cleaned every five minutes.
    ///
    /// # Errors
    /// As [`PostgresStoreBuilder::open`].
    pub async fn open(url: &str) -> Result<Self, StoreError> {
        Self::builder().open(url).await
    }

    /// A store on an application's own pool, with the default settings (see
    /// [`PostgresStoreBuilder::open_with_pool`]).
    ///
    /// # Errors
    /// As [`PostgresStoreBuilder::open`].
    pub async fn with_pool(pool: Pool) -> Result<Self, StoreError> {
        Self::builder().open_with_pool(pool).await
    }

    /// A builder for a store.
    pub fn builder() -> PostgresStoreBuilder {
        PostgresStoreBuilder::default()
    }

    /// Deletes every expired row now, in batches so that requests run in between; answers how
    /// many were deleted.
    ///
    /// # Errors
    /// As any operation: [`StoreError::unavailable`] when the server cannot be reached in time.
    pub async fn delete_expired(&self) -> Result<u64, StoreError> {
        delete_expired(&self.inner).await
    }
}

impl fmt::Debug for PostgresStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PostgresStore")
            .field("location", &self.inner.label)
            .finish_non_exhaustive()
    }
}

/// A `bytea` parameter whose `Debug` shows its length only: tokio-postgres logs every
/// statement's parameters at debug level, and these are keys and session data.
struct Secret<'a>(&'a [u8]);

impl fmt::Debug for Secret<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "<{} bytes>", self.0.len())
    }
}

impl ToSql for Secret<'_> {
    fn to_sql(
        &self,
        ty: &Type,
        out: &mut BytesMut,
    ) -> Result<IsNull, Box<dyn std::error::Error + Sync + Send>> {
        self.0.to_sql(ty, out)
    }

    fn accepts(ty: &Type) -> bool {
        <&[u8] as ToSql>::accepts(ty)
    }

    to_sql_checked!();
}

/// An owner (`text`, `NULL` for none) as a parameter whose `Debug` hides it: an owner names a
/// user, and tokio-postgres logs every statement's parameters at debug level.
struct Owner<'a>(Option<&'a str>);

impl fmt::Debug for Owner<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Some(owner) => write!(f, "<owner, {} bytes>", owner.len()),
            None => f.write_str("NULL"),
        }
    }
}

impl ToSql for Owner<'_> {
    fn to_sql(
        &self,
        ty: &Type,
        out: &mut BytesMut,
    ) -> Result<IsNull, Box<dyn std::error::Error + Sync + Send>> {
        self.0.to_sql(ty, out)
    }

    fn accepts(ty: &Type) -> bool {
        <Option<&str> as ToSql>::accepts(ty)
    }

    to_sql_checked!();
}

/// A pooled connection lent to one statement. Dropped before the statement answered (the
/// timeout fired, or the caller gave up), it asks the server to cancel the statement (which may
/// be waiting for a row lock, and would otherwise go on, and perhaps write, behind the caller's
/// back) and closes the connection rather than return it to the pool, where the next statement
/// would queue behind the unanswered one.
struct Lent<'a> {
    client: Option<Object>,
    /// The store's TLS connector, for the cancel request.
    tls: &'a Option<CancelTls>,
}

/// The TLS connector a cancel request uses: the store's, when it has one.
#[cfg(feature = "postgres-tls")]
type CancelTls = postgres_native_tls::MakeTlsConnector;
#[cfg(not(feature = "postgres-tls"))]
type CancelTls = tokio_postgres::NoTls;

impl Drop for Lent<'_> {
    fn drop(&mut self) {
        let Some(client) = self.client.take() else {
            return;
        };
        let token = client.cancel_token();
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            // A cancel request is a connection of its own (bounded by the connect timeout);
            // whether it arrives in time is racy, as cancellation is.
            // `NoTls` (without `postgres-tls`) is `Copy`, the TLS connector only `Clone`.
            #[allow(clippy::clone_on_copy)]
            match self.tls.clone() {
                Some(tls) => runtime.spawn(async move {
                    let _ = token.cancel_query(tls).await;
                }),
                None => runtime.spawn(async move {
                    let _ = token.cancel_query(tokio_postgres::NoTls).await;
                }),
            };
        }
        drop(Object::take(client));
    }
}

impl Inner {
    /// Runs one prepared statement, bounded by the timeout; answers its row, if any.
    async fn query(
        &self,
        op: &'static str,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Option<Row>, StoreError> {
        let rows = self.query_rows(op, sql, params, false).await?;
        Ok(rows.into_iter().next())
    }

    /// Runs one prepared statement, bounded by the timeout; answers its rows (`many`), or its
    /// row if any (else more than one row is an error).
    async fn query_rows(
        &self,
        op: &'static str,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
        many: bool,
    ) -> Result<Vec<Row>, StoreError> {
        let waiting = AtomicBool::new(true);
        match tokio::time::timeout(self.timeout, self.query_now(sql, params, many, &waiting)).await
        {
            Ok(result) => result.map_err(|e| fail_error(op, &self.label, e)),
            Err(_) => Err(fail_error(
                op,
                &self.label,
                Fail::Timeout {
                    after: self.timeout,
                    for_connection: waiting.load(Ordering::Relaxed),
                },
            )),
        }
    }

    async fn query_now(
        &self,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
        many: bool,
        waiting: &AtomicBool,
    ) -> Result<Vec<Row>, Fail> {
        let mut lent = Lent {
            client: Some(self.pool.get().await?),
            tls: &self.tls,
        };
        waiting.store(false, Ordering::Relaxed);
        let answer = match lent.client.as_deref() {
            Some(client) => run(client, sql, params, many).await,
            None => return Err(Fail::Setup("no pooled connection".to_owned())),
        };
        // Answered (rows, none, or an error): the connection goes back to the pool, which
        // drops it when it is closed.
        drop(lent.client.take());
        Ok(answer?)
    }
}

/// Attempts of a statement whose transaction was rolled back for a conflict with a concurrent
/// one (serialization failure, deadlock) before the failure is reported (as unavailable).
const CONFLICT_ATTEMPTS: usize = 8;

/// Prepares (once per connection) and runs one statement: all its rows (`many`), or its one
/// row if any.
///
/// A statement that failed changed nothing, so two failures are retried here, within the
/// caller's timeout: a stale prepared statement (the table changed under it, or the statement
/// is gone) is prepared again, once; a statement rolled back for a conflict with a concurrent
/// transaction (under `REPEATABLE READ` or `SERIALIZABLE` as the database's default isolation,
/// two saves of one session conflict that way instead of one waiting for the other's row lock)
/// runs again, up to [`CONFLICT_ATTEMPTS`] times in all, and then sees the other's result (a
/// conditional write answers a conflict, which the layer replays).
async fn run(
    client: &ClientWrapper,
    sql: &str,
    params: &[&(dyn ToSql + Sync)],
    many: bool,
) -> Result<Vec<Row>, tokio_postgres::Error> {
    let mut stmt = client.prepare_cached(sql).await?;
    let mut prepared_again = false;
    let mut attempt = 1;
    loop {
        let answer = if many {
            client.query(&stmt, params).await
        } else {
            client
                .query_opt(&stmt, params)
                .await
                .map(|row| row.into_iter().collect())
        };
        match answer {
            Err(e) if is_stale_statement(&e) && !prepared_again => {
                prepared_again = true;
                client.statement_cache.remove(sql, &[]);
                stmt = client.prepare_cached(sql).await?;
            }
            Err(e) if is_transient_conflict(&e) && attempt < CONFLICT_ATTEMPTS => attempt += 1,
            answer => return answer,
        }
    }
}

/// A stored row (`data, version, expires_at, owner` from column `at` on) as a record; a value
/// that cannot be read is a corrupt row. `shared` is the owner the row was selected by, if any:
/// shared by each row instead of copied.
fn decode(row: &Row, at: usize, key: Key, shared: Option<&Arc<str>>) -> Result<Record, Fail> {
    let column =
        |name: &str, e: tokio_postgres::Error| Fail::Corrupt(format!("column {name}: {e}"));
    let data: &[u8] = row.try_get(at).map_err(|e| column("data", e))?;
    let version: i64 = row.try_get(at + 1).map_err(|e| column("version", e))?;
    let version = u64::try_from(version).map_err(|_| {
        Fail::Corrupt(format!(
            "column version holds {version}, expected a version >= 0"
        ))
    })?;
    let expires_at: SystemTime = row.try_get(at + 2).map_err(|e| column("expires_at", e))?;
    // The owner names a user: the error says the column, never the value (tokio-postgres's
    // conversion errors name types, not values).
    let owner = match row.try_get::<_, Option<&str>>(at + 3) {
        Ok(None) => None,
        Ok(Some(text)) => match shared {
            Some(owner) if &**owner == text => Some(owner.clone()),
            _ => Some(Arc::from(text)),
        },
        Err(e) => return Err(column("owner", e)),
    };
    Ok(Record::new(key, Bytes::copy_from_slice(data), version, expires_at).with_owner(owner))
}

/// A row of an owner's listing (`key` first, then as [`decode`] reads them).
fn decode_owned(row: &Row, owner: &Arc<str>) -> Result<Record, Fail> {
    let key: &[u8] = row
        .try_get(0)
        .map_err(|e| Fail::Corrupt(format!("column key: {e}")))?;
    let key = <[u8; 16]>::try_from(key)
        .map_err(|_| Fail::Corrupt("column key is not 16 bytes".to_owned()))?;
    let key = Key::from_bytes(key);
    // Named by the key's fingerprint, as a load names its row.
    decode(row, 1, key, Some(owner)).map_err(|fail| match fail {
        Fail::Corrupt(what) => Fail::Corrupt(format!("session row {}…: {what}", key.fingerprint())),
        other => other,
    })
}

/// What a conditional write found: no live row is missing, the expected version saved (the
/// statement changed the row in the same breath), another version a conflict.
fn outcome(
    inner: &Inner,
    op: &str,
    row: Option<Row>,
    expected: i64,
) -> Result<SaveOutcome, StoreError> {
    let Some(row) = row else {
        return Ok(SaveOutcome::Missing);
    };
    match row.try_get::<_, i64>(0) {
        Ok(found) if found == expected => Ok(SaveOutcome::Saved),
        Ok(_) => Ok(SaveOutcome::Conflict),
        Err(e) => Err(fail_error(
            op,
            &inner.label,
            Fail::Setup(format!("unexpected answer (was the table altered?): {e}")),
        )),
    }
}

fn version_param(version: u64) -> Result<i64, StoreError> {
    i64::try_from(version).map_err(|_| {
        StoreError::other(format!(
            "record version {version} exceeds PostgreSQL's bigint"
        ))
    })
}

/// An expected version as a parameter: one beyond `bigint` matches no stored version.
fn expected_param(version: u64) -> i64 {
    i64::try_from(version).unwrap_or(-1)
}

impl SessionStore for PostgresStore {
    async fn load(&self, key: &Key) -> Result<Option<Record>, StoreError> {
        let inner = &*self.inner;
        let k = key.to_bytes();
        let Some(row) = inner.query("load", &inner.sql.load, &[&Secret(&k)]).await? else {
            return Ok(None);
        };
        decode(&row, 0, *key, None)
            .map(Some)
            .map_err(|e| name_row(fail_error("load", &inner.label, e), *key))
    }

    async fn create(&self, record: &Record) -> Result<CreateOutcome, StoreError> {
        let inner = &*self.inner;
        let k = record.key().to_bytes();
        let version = version_param(record.version())?;
        let row = inner
            .query(
                "create",
                &inner.sql.create,
                &[
                    &Secret(&k),
                    &Secret(record.data()),
                    &version,
                    &record.expires_at(),
                    &Owner(record.owner()),
                ],
            )
            .await?;
        Ok(if row.is_some() {
            CreateOutcome::Created
        } else {
            CreateOutcome::IdTaken
        })
    }

    async fn save(
        &self,
        record: &Record,
        expected_version: u64,
    ) -> Result<SaveOutcome, StoreError> {
        let inner = &*self.inner;
        let k = record.key().to_bytes();
        let version = version_param(record.version())?;
        let expected = expected_param(expected_version);
        let row = inner
            .query(
                "save",
                &inner.sql.save,
                &[
                    &Secret(&k),
                    &Secret(record.data()),
                    &version,
                    &record.expires_at(),
                    &expected,
                    &Owner(record.owner()),
                ],
            )
            .await?;
        outcome(inner, "save", row, expected)
    }

    async fn touch(
        &self,
        key: &Key,
        expected_version: u64,
        expires_at: SystemTime,
    ) -> Result<SaveOutcome, StoreError> {
        let inner = &*self.inner;
        let k = key.to_bytes();
        let expected = expected_param(expected_version);
        // Whole milliseconds, as every store keeps them.
        let expires_at = from_unix_ms(unix_ms(expires_at));
        let row = inner
            .query(
                "touch",
                &inner.sql.touch,
                &[&Secret(&k), &expires_at, &expected],
            )
            .await?;
        outcome(inner, "touch", row, expected)
    }

    async fn remove(&self, key: &Key, expected_version: u64) -> Result<SaveOutcome, StoreError> {
        let inner = &*self.inner;
        let k = key.to_bytes();
        let expected = expected_param(expected_version);
        let row = inner
            .query("remove", &inner.sql.remove, &[&Secret(&k), &expected])
            .await?;
        outcome(inner, "remove", row, expected)
    }

    async fn delete(&self, key: &Key) -> Result<(), StoreError> {
        let inner = &*self.inner;
        let k = key.to_bytes();
        inner
            .query("delete", &inner.sql.delete, &[&Secret(&k)])
            .await?;
        Ok(())
    }

    async fn owned(&self, owner: &str) -> Result<Vec<Record>, StoreError> {
        let inner = &*self.inner;
        let rows = inner
            .query_rows("owned", &inner.sql.owned, &[&Owner(Some(owner))], true)
            .await?;
        let owner: Arc<str> = Arc::from(owner);
        rows.iter()
            .map(|row| decode_owned(row, &owner))
            .collect::<Result<_, _>>()
            .map_err(|e| fail_error("owned", &inner.label, e))
    }
}

async fn delete_expired(inner: &Inner) -> Result<u64, StoreError> {
    let mut total = 0;
    loop {
        let row = inner
            .query(
                "delete_expired",
                &inner.sql.delete_expired,
                &[&CLEANUP_BATCH],
            )
            .await?;
        let n: i64 = row
            .map(|r| r.try_get(0))
            .transpose()
            .map_err(|e| fail_error("delete_expired", &inner.label, Fail::Pg(e)))?
            .unwrap_or(0);
        total += u64::try_from(n).unwrap_or(0);
        if n < CLEANUP_BATCH {
            return Ok(total);
        }
        tokio::task::yield_now().await;
    }
}
