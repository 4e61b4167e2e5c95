//! [`RedisStore`]: sessions in Redis, on one node, a Redis Cluster or under Sentinel, with the
//! `redis` crate: the family's [protocol](super::protocol) over the crate's connections.

use std::cell::RefCell;
use std::fmt;
use std::future::Future;
use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use ::redis::aio::ConnectionLike;
use ::redis::aio::{ConnectionManager, ConnectionManagerConfig, MultiplexedConnection};
use ::redis::cluster::ClusterClient;
use ::redis::cluster_async::ClusterConnection;
use ::redis::sentinel::{SentinelClient, SentinelServerType};
use ::redis::{
    AsyncConnectionConfig, Cmd, ConnectionAddr, IntoConnectionInfo, Pipeline, ProtocolVersion,
    RedisError, RedisResult, RedisWrite, ToRedisArgs, Value,
};

use super::pipe::Pipe;
use super::protocol::{
    Arg, Command, Head, KeyName, Protocol, Reply, SendError, Sent, ServerError, Transport,
    opening_failed, session_store_on_protocol,
};
use super::value::Header;
use crate::error::StoreError;
use crate::key::{KEY_HEX_LEN, Key};

/// Sessions in Redis (7.0 or newer, or Valkey), on a single node, a Redis Cluster, or a master
/// managed by Redis Sentinel.
///
/// One key per session, `<prefix><key>` (prefix `session:` by default; the session's
/// [`Key`], a digest of its id, in hex), so no command ever spans two cluster slots. The key
/// holds one string: a short header (version, expiry, write token, length) and the session
/// payload, so that a load is one plain `GET`; Redis keeps the expiry too (every key carries a
/// TTL at the session's `expires_at`, `PXAT`), so expired sessions disappear without any
/// sweeping.
///
/// # Round trips
/// Every operation is one round trip (one command), so one round trip per store call the
/// layer makes:
///
/// | request | commands |
/// |---|---|
/// | does not touch the session | none |
/// | reads | `GET` |
/// | reads, with an idle expiry due to slide | `GET` + `EVALSHA` (conditional touch script) |
/// | writes | `GET` + `EVALSHA` (compare-and-set script) |
/// | new session | `SET key value NX PXAT ms GET` |
/// | empties the session | `GET` + `EVALSHA` (conditional remove script) |
/// | destroy | `DEL` |
/// | new session with an owner (login) | `EVALSHA` (owner index add) + `SET ... NX` |
/// | sets or changes the owner | `GET` + `EVALSHA` (save: owner differs, nothing written) + `EVALSHA` (index add) + `EVALSHA` (save) |
/// | lists the owner's sessions | `EVALSHA` (the index) + one `MGET` per 256 listed sessions (on a cluster, a `GET` each, sent together) |
/// | cycles an owned session's id | `GET` + `EVALSHA` (index add for the new key) + `SET ... NX` + `EVALSHA` (remove) |
///
/// A session's owner costs nothing on requests that keep it: an owned session's read is one
/// `GET` and its write `GET` + `EVALSHA`, as above.
/// `save`, `touch` and `remove` are Lua scripts that check the version in the stored value's
/// header and change the key only when it is the expected one; `touch` rewrites the expiry in
/// the value and the key's TTL in the same atomic step. A load never writes, and never returns
/// a record whose expiry (in the value, checked against this server's clock) has passed.
///
/// A script missing from the server's cache (after a restart or `SCRIPT FLUSH`, or on a cluster
/// node that never saw it) costs one `EVAL` with the script, once, which caches it again.
///
/// # Stored value
/// A Redis string `<version>:<expiry>:<token>:<length>:<payload>`: the version in decimal, the
/// expiry in Unix milliseconds as 15 digits, a 16-hex-digit write token, the payload's length,
/// then the session payload byte for byte. A session with an
/// [owner](crate::store::Record::owner) has it after the length:
/// `<version>:<expiry>:<token>:<length>/<owner length>:<owner><payload>`. The token lets a retried write recognise itself, so
/// a write whose reply was lost and that is retried is not applied twice. A value in another
/// layout (or a key of another type) is reported as corrupt, which the layer answers with a
/// fresh session (leaving the value alone). The `WebdisStore` (feature `webdis`) runs the same
/// protocol on the same keys and values, so both serve the same sessions from one Redis.
///
/// # Owners
/// Each owner has an index, a sorted set at `<prefix>owner:<digest>` (a digest of the owner:
/// no owner appears in a key), of their sessions' keys scored by the expiry of the write that
/// added each. It has no TTL; Redis deletes it once its last entry is dropped. Since the index
/// and the sessions live in different cluster slots, no command spans both: the entry is
/// written before the record that needs it, so a session is never without it, and entries left
/// behind by sessions deleted, expired or given another owner are dropped when the owner's
/// sessions are listed or the owner logs in again, once their score has passed (an entry with a
/// later score may belong to a write under way). An owner's index thus holds their live
/// sessions, plus those ended since their last login or listing, plus those ended before their
/// entry's score. Listing reads the index, loads the sessions (an `MGET` per 256; on a
/// cluster, where they are spread over the nodes, a `GET` each, 256 under way at a time) and
/// answers the live ones that have that owner: an owner's 1,000 sessions among 1,000,000 took
/// 5.7 ms on a single node and 11.5 to 13.8 ms on a 3-master cluster (medians; BENCHMARKS.md,
/// "Owner listing: Redis"); the time grows with the owner's sessions, not with the store's.
///
/// # Failures
/// Connection errors, timeouts, a loading, read-only or out-of-memory server are
/// [`StoreError::unavailable`] (the layer answers 503); a value this store did not write, or a
/// key of another type, is [`StoreError::corrupt`]; anything else is [`StoreError::other`].
/// Each operation is bounded by the [command timeout](RedisStoreBuilder::command_timeout)
/// (2 s by default), so a hung Redis fails requests instead of holding them forever. Every
/// operation is retried once on a broken connection (the first attempt may or may not have
/// reached Redis). A retried write that does not find its own effect (a `save` or `touch`
/// answering a conflict or a missing record, a `remove` finding nothing, a `create` finding the
/// id taken) may be hiding the first attempt's effect behind another writer's: its outcome is
/// unknown, and it fails with [`StoreError::unavailable`] rather than report a conflict that
/// would make the layer apply the request's changes a second time. The connection itself is
/// re-established automatically (on a single node the next command opens a new one, on a
/// cluster the cluster client reconnects, under Sentinel a new master is asked of the
/// Sentinels), so the same store serves again once Redis is back or a replica has taken over.
///
/// On a cluster opened with [`open_cluster`](RedisStoreBuilder::open_cluster), the cluster
/// client's own retries are off: it would send a command again by itself after a broken
/// connection, where the store cannot see it, and a write whose reply was lost would then come
/// back as a conflict instead of "outcome unknown". The store sends a command again only after
/// a broken connection (once, as above) or after an answer saying the cluster did not run it
/// (`MOVED`, `ASK`, `TRYAGAIN`, `CLUSTERDOWN`, `MASTERDOWN`, a node still loading, no connection
/// to the slot's node), after short pauses and within the command timeout; the cluster client
/// still refreshes its slot map after a `MOVED`, so a failover's new master is found.
///
/// # Failover and acknowledged writes
/// Redis replicates asynchronously: a write is acknowledged by its master before any replica
/// has it, so when a master fails and a replica takes over (Redis Cluster, Sentinel), the last
/// writes acknowledged by the old master can be lost. With
/// [`min_replicas_ack(n, timeout)`](RedisStoreBuilder::min_replicas_ack) every write is sent
/// with a `WAIT n timeout` in the same round trip, on the same connection to the same node, and
/// acknowledged only once `n` replicas have it; a write fewer replicas confirm is
/// [`StoreError::unavailable`] (503), though it may still be applied. Off by default.
///
/// # TLS
/// `rediss://` URLs need a TLS stack in the `redis` crate, which this crate does not pull in:
/// enable one of the `redis` crate's features in your own `Cargo.toml` (Cargo unifies the
/// features of the one `redis` crate in your build), for example
/// `redis = { version = "1.2", features = ["tokio-rustls-comp", "tls-rustls-webpki-roots"] }`.
/// Without one, opening a `rediss://` URL fails with an error saying so.
///
/// # Examples
/// ```no_run
/// use std::time::Duration;
/// use hyper_sessions::{RedisStore, SessionLayer};
///
/// # async fn run() -> Result<(), hyper_sessions::store::StoreError> {
/// // Password and database number go in the URL.
/// let store = RedisStore::builder()
///     .key_prefix("myapp:session:")
///     .command_timeout(Duration::from_millis(500))
///     .open("redis://:secret@127.0.0.1:6379/2")
///     .await?;
/// let layer = SessionLayer::new(store);
///
/// // A cluster: any node's URL (or several); the others are discovered.
/// let cluster = RedisStore::open_cluster(["redis://10.0.0.1:7000"]).await?;
///
/// // A master managed by Sentinel, each write confirmed by one replica before it counts.
/// let sentinel = RedisStore::builder()
///     .min_replicas_ack(1, Duration::from_millis(100))
///     .open_sentinel(["redis://10.0.0.1:26379", "redis://10.0.0.2:26379"], "mymaster")
///     .await?;
/// # let _ = (layer, cluster, sentinel);
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct RedisStore {
    protocol: Arc<Protocol<Conn>>,
}

/// The connection: the store's own to a single node, or the `redis` crate's, one of three
/// kinds.
enum Conn {
    Pipe(Pipe),
    Single(ConnectionManager),
    Cluster(ClusterConnection),
    Sentinel(Box<SentinelConn>),
}

/// Configures a [`RedisStore`]: key prefix, command timeout and replica acknowledgements, then
/// the connection.
#[derive(Debug, Clone)]
#[must_use]
pub struct RedisStoreBuilder {
    prefix: String,
    timeout: Duration,
    acks: Option<(usize, Duration)>,
}

impl Default for RedisStoreBuilder {
    fn default() -> Self {
        RedisStoreBuilder {
            prefix: "session:".to_owned(),
            timeout: Duration::from_secs(2),
            acks: None,
        }
    }
}

impl RedisStoreBuilder {
    /// The prefix of every key (default `session:`); the key is the prefix and the session key.
    ///
    /// # Examples
    /// ```
    /// let builder = hyper_sessions::RedisStore::builder().key_prefix("shop:sess:");
    /// # let _ = builder;
    /// ```
    pub fn key_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.prefix = prefix.into();
        self
    }

    /// The longest one store operation may take, reconnecting included (default 2 s; at least
    /// 1 ms). Past it the operation fails with [`StoreError::unavailable`]; a write that timed
    /// out may or may not have been applied, and is reported as not stored.
    ///
    /// # Examples
    /// ```
    /// use std::time::Duration;
    /// let builder = hyper_sessions::RedisStore::builder().command_timeout(Duration::from_millis(300));
    /// # let _ = builder;
    /// ```
    pub fn command_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout.max(Duration::from_millis(1));
        self
    }

    /// Acknowledges a write (`create`, `save`, `touch`, `remove`, `delete`) only once `replicas`
    /// replicas of the node that made it have it, waiting at most `timeout` for them (at least
    /// 1 ms). Off by default, and `0` turns it off again.
    ///
    /// Redis replicates asynchronously: without this, a write the master acknowledged and then
    /// lost in a crash before any replica had it is gone after a failover, although the client
    /// was told it was stored. With it, each write is followed by Redis's `WAIT replicas
    /// timeout` in the same round trip, on the same connection to the same node (on a cluster,
    /// the master of the key's slot), and counts as stored only when `WAIT` reports at least
    /// `replicas` replicas.
    ///
    /// When fewer replicas confirm within `timeout` (replicas down, lagging or not yet attached
    /// after a failover), the write fails with [`StoreError::unavailable`] (the layer answers
    /// 503) **although it may have been applied**: the master has it, its replicas may not. The
    /// same holds for a write retried after a broken connection, whose first attempt may have
    /// been made on another connection that this `WAIT` does not cover. Reads are unaffected.
    ///
    /// The cost: each write waits for a replica's acknowledgement (about one more round trip
    /// between master and replica when all is well). `WAIT` holds the connection it runs on
    /// until it answers, and the store sends every request to a node over one multiplexed
    /// connection, so while replicas lag, other requests to that node wait behind it: keep
    /// `timeout` short (tens of milliseconds to a few hundred) and well under the
    /// [command timeout](Self::command_timeout), which still bounds every operation. This also
    /// means a node left without replicas (a promoted replica whose old master is not back yet)
    /// refuses writes until one attaches. `WAIT` does not make Redis strongly consistent: a
    /// failover may still promote the one replica that lacks the write; ask for as many replicas
    /// as a failover can lose.
    ///
    /// # Examples
    /// ```
    /// use std::time::Duration;
    /// let builder = hyper_sessions::RedisStore::builder()
    ///     .min_replicas_ack(1, Duration::from_millis(100));
    /// # let _ = builder;
    /// ```
    pub fn min_replicas_ack(mut self, replicas: usize, timeout: Duration) -> Self {
        self.acks = (replicas > 0).then_some((replicas, timeout));
        self
    }

    /// Connects to a single Redis node at `url` (`redis://[[user]:password@]host[:port][/db]`,
    /// or `redis+unix:///path`).
    ///
    /// A `redis://` URL is served by the store's own connection: one RESP2 connection over TCP
    /// that all requests share, their commands pipelined (the commands of requests made at the
    /// same moment go out in one write, and their replies come back in one read), with no task
    /// of its own: the waiting requests write and read it. A broken connection fails the
    /// commands in flight on it (each is retried once, as described under
    /// [`RedisStore`]'s failures), and the next command opens a new one, so a restarted Redis
    /// is picked up without a restart of the application. Other URLs (`redis+unix://`,
    /// `rediss://` with a TLS feature of the `redis` crate, `?protocol=resp3`) go through the
    /// crate's `ConnectionManager`, which reconnects by itself.
    ///
    /// # Errors
    /// [`StoreError::unavailable`] if the server cannot be reached within the command timeout,
    /// [`StoreError::other`] for a URL that is not a Redis URL or refused credentials.
    pub async fn open(self, url: impl IntoConnectionInfo) -> Result<RedisStore, StoreError> {
        let info = url.into_connection_info().map_err(open_error)?;
        let settings = info.redis_settings();
        if let (ConnectionAddr::Tcp(host, port), ProtocolVersion::RESP2) =
            (info.addr(), settings.protocol())
        {
            let pipe = Pipe::new(
                host.clone(),
                *port,
                settings.username(),
                settings.password(),
                settings.db(),
                self.timeout,
            );
            return self.build(Conn::Pipe(pipe)).preloaded_boxed().await;
        }
        let client = ::redis::Client::open(info).map_err(open_error)?;
        let config = ConnectionManagerConfig::new()
            // Fail fast while Redis is down (one connection attempt per failed request), and
            // pick the connection up again on the first request after it is back.
            .set_number_of_retries(0)
            .set_connection_timeout(Some(self.timeout))
            // Each store operation is bounded by the command timeout as a whole; a second timer
            // per command (the crate's default 500 ms response timeout) would only cost time
            // and cut the command timeout short.
            .set_response_timeout(None);
        let connect = ConnectionManager::new_with_config(client, config);
        self.connected(connect, Conn::Single).await
    }

    /// Connects to a Redis Cluster through any of its nodes (the others are discovered).
    ///
    /// # Errors
    /// As for [`open`](Self::open).
    pub async fn open_cluster<I, U>(self, urls: I) -> Result<RedisStore, StoreError>
    where
        I: IntoIterator<Item = U>,
        U: IntoConnectionInfo,
    {
        // The cluster client sets no response timeout by default, per command or overall (the
        // overall one follows the per-command one): the command timeout is the only bound, as
        // on a single node. Said explicitly for the overall one, so a change of default there
        // cannot cut operations short.
        //
        // No retries by the cluster client: it would send a command again by itself after a
        // broken connection, out of the store's sight, so that a write whose reply was lost and
        // that another writer overwrote meanwhile would come back as a conflict rather than as
        // "outcome unknown". The store retries instead (see `RedisStore::run`): once after a
        // broken connection, recognising its own write, and as often as the command timeout
        // allows after an answer saying the command did not run (`MOVED`, `ASK`, `TRYAGAIN`,
        // `CLUSTERDOWN`; the client still refreshes its slot map after a `MOVED`).
        let client = ClusterClient::builder(urls)
            .connection_timeout(self.timeout)
            .overall_response_timeout(None)
            .retries(0)
            .build()
            .map_err(open_error)?;
        self.connected(client.get_async_connection(), Conn::Cluster)
            .await
    }

    /// The store on the connection `connect` makes within the command timeout, its scripts
    /// loaded.
    async fn connected<C>(
        self,
        connect: impl Future<Output = RedisResult<C>>,
        conn: impl FnOnce(C) -> Conn,
    ) -> Result<RedisStore, StoreError> {
        let connection = tokio::time::timeout(self.timeout, connect)
            .await
            .map_err(|_| connect_timed_out(self.timeout))?
            .map_err(open_error)?;
        self.build(conn(connection)).preloaded_boxed().await
    }

    /// Connects to the master that Redis Sentinel knows as `master_name`, asking the Sentinels
    /// at `sentinel_urls` (`redis://host:26379`, with the Sentinels' own password if they have
    /// one) where it is, through the `redis` crate's Sentinel support.
    ///
    /// The store keeps one connection to the master. When that connection breaks or the node
    /// answers that it is read-only (a master demoted by a failover), it asks the Sentinels
    /// again on the next request, so after a failover the same store serves from the new master
    /// without a restart; requests meanwhile answer 503. For a password or database number on
    /// the master itself, or TLS, build a `SentinelClient` and use
    /// [`with_sentinel_client`](Self::with_sentinel_client).
    ///
    /// # Errors
    /// As for [`open`](Self::open); a master name no Sentinel knows, or whose master is down,
    /// is [`StoreError::unavailable`].
    pub async fn open_sentinel<I, U>(
        self,
        sentinel_urls: I,
        master_name: &str,
    ) -> Result<RedisStore, StoreError>
    where
        I: IntoIterator<Item = U>,
        U: IntoConnectionInfo,
    {
        let client = SentinelClient::build(
            sentinel_urls.into_iter().collect(),
            master_name.to_owned(),
            None,
            SentinelServerType::Master,
        )
        .map_err(open_error)?;
        self.with_sentinel_client(client).preloaded_boxed().await
    }

    /// A store on the master of an existing `SentinelClient` (with your own authentication,
    /// database, TLS or protocol settings for the Sentinels and the master). The client must be
    /// for a master ([`SentinelServerType::Master`]): the store writes. Connections to the
    /// master are made as by [`open_sentinel`](Self::open_sentinel).
    pub fn with_sentinel_client(self, client: SentinelClient) -> RedisStore {
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(self.timeout))
            // As for a single node: the command timeout is the only bound.
            .set_response_timeout(None);
        self.build(Conn::Sentinel(Box::new(SentinelConn {
            client: tokio::sync::Mutex::new(client),
            current: Mutex::new(None),
            generation: AtomicU64::new(0),
            config,
        })))
    }

    /// A store on an existing single-node `ConnectionManager` (with your own reconnection,
    /// TLS and protocol settings). Its own response timeout, if it has one (the `redis`
    /// crate's default is 500 ms), applies within the command timeout.
    pub fn with_connection_manager(self, manager: ConnectionManager) -> RedisStore {
        self.build(Conn::Single(manager))
    }

    /// A store on an existing async Redis Cluster connection.
    ///
    /// Build its client with `ClusterClientBuilder::retries(0)`, as
    /// [`open_cluster`](Self::open_cluster) does: with the `redis` crate's default retries, the
    /// client sends a command again by itself after a broken connection, where the store cannot
    /// see it, so a write whose reply was lost and that another writer overwrote meanwhile is
    /// reported as a conflict (and the layer applies the request's changes a second time)
    /// rather than as [`StoreError::unavailable`].
    pub fn with_cluster_connection(self, connection: ClusterConnection) -> RedisStore {
        self.build(Conn::Cluster(connection))
    }

    fn build(self, conn: Conn) -> RedisStore {
        RedisStore {
            protocol: Arc::new(Protocol::new(conn, self.prefix, self.timeout, self.acks)),
        }
    }
}

impl RedisStore {
    /// A builder, to set the key prefix or the command timeout before connecting.
    pub fn builder() -> RedisStoreBuilder {
        RedisStoreBuilder::default()
    }

    /// Connects to a single Redis node with the default settings; see
    /// [`RedisStoreBuilder::open`].
    pub async fn open(url: impl IntoConnectionInfo) -> Result<RedisStore, StoreError> {
        RedisStoreBuilder::default().open(url).await
    }

    /// Connects to a Redis Cluster with the default settings; see
    /// [`RedisStoreBuilder::open_cluster`].
    pub async fn open_cluster<I, U>(urls: I) -> Result<RedisStore, StoreError>
    where
        I: IntoIterator<Item = U>,
        U: IntoConnectionInfo,
    {
        RedisStoreBuilder::default().open_cluster(urls).await
    }

    /// Connects to a Sentinel-managed master with the default settings; see
    /// [`RedisStoreBuilder::open_sentinel`].
    pub async fn open_sentinel<I, U>(
        sentinel_urls: I,
        master_name: &str,
    ) -> Result<RedisStore, StoreError>
    where
        I: IntoIterator<Item = U>,
        U: IntoConnectionInfo,
    {
        RedisStoreBuilder::default()
            .open_sentinel(sentinel_urls, master_name)
            .await
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
    /// let store = hyper_sessions::RedisStore::open("redis://127.0.0.1/").await?;
    /// let key = hyper_sessions::store::Key::of(hyper_sessions::Id::random());
    /// assert_eq!(store.key(&key), format!("session:{}", key.to_hex()));
    /// # Ok(())
    /// # }
    /// ```
    pub fn key(&self, key: &Key) -> String {
        self.protocol.key_string(key)
    }

    /// [`preloaded`](Self::preloaded), boxed: opening happens once, and the request path's
    /// nested futures (the retry loops, the script fallback) would otherwise make the future of
    /// every `open` call deep enough to exceed the compiler's default recursion limit when a
    /// caller's own future is laid out around it (seen with clippy on `examples/redis.rs`).
    fn preloaded_boxed(
        self,
    ) -> std::pin::Pin<Box<dyn Future<Output = Result<RedisStore, StoreError>> + Send>> {
        Box::pin(self.preloaded())
    }

    /// Loads the scripts into the server's cache, so that the first requests need no reload.
    async fn preloaded(self) -> Result<RedisStore, StoreError> {
        self.protocol.load_scripts().await?;
        Ok(self)
    }
}

session_store_on_protocol!(RedisStore);

/// A command whose buffers go back to a small per-thread list when it is dropped, so that the
/// next commands need no allocation (two per command otherwise, and as many frees). Commands
/// sized over [`SPARE_CMD_BYTES`] are not kept, so what stays allocated is bounded.
struct PooledCmd {
    cmd: Cmd,
    /// The bytes asked for this use: an upper bound of what the command holds.
    bytes: usize,
}

/// Commands kept per thread.
const SPARE_CMDS: usize = 4;
/// The largest command kept, in bytes of arguments.
const SPARE_CMD_BYTES: usize = 4096;

thread_local! {
    static SPARE: RefCell<Vec<Cmd>> = const { RefCell::new(Vec::new()) };
}

impl PooledCmd {
    fn with_capacity(args: usize, bytes: usize) -> PooledCmd {
        let spare = if bytes <= SPARE_CMD_BYTES {
            SPARE.try_with(|s| s.borrow_mut().pop()).ok().flatten()
        } else {
            None
        };
        let cmd = match spare {
            Some(mut cmd) => {
                cmd.clear();
                cmd
            }
            // Room for the next uses too (small commands differ only a little in size).
            None if bytes <= SPARE_CMD_BYTES => Cmd::with_capacity(args.max(10), bytes.max(256)),
            None => Cmd::with_capacity(args, bytes),
        };
        PooledCmd { cmd, bytes }
    }
}

impl std::ops::Deref for PooledCmd {
    type Target = Cmd;
    fn deref(&self) -> &Cmd {
        &self.cmd
    }
}

impl std::ops::DerefMut for PooledCmd {
    fn deref_mut(&mut self) -> &mut Cmd {
        &mut self.cmd
    }
}

impl Drop for PooledCmd {
    fn drop(&mut self) {
        if self.bytes <= SPARE_CMD_BYTES {
            let cmd = std::mem::take(&mut self.cmd);
            // Gone while the thread exits: then the command is simply freed.
            let _ = SPARE.try_with(|s| {
                let mut spare = s.borrow_mut();
                if spare.len() < SPARE_CMDS {
                    spare.push(cmd);
                }
            });
        }
    }
}

/// A session's key as a command argument, written straight into the command's buffer (no
/// `String` per command).
struct KeyArg<'a>(KeyName<'a>);

impl ToRedisArgs for KeyArg<'_> {
    fn write_redis_args<W: ?Sized + RedisWrite>(&self, out: &mut W) {
        self.0.write(&mut out.writer_for_next_arg());
    }
}

/// A stored value as a command argument: the header, then the payload, written straight into
/// the command's buffer.
struct ValueArg<'a> {
    header: &'a Header,
    data: &'a [u8],
}

impl ToRedisArgs for ValueArg<'_> {
    fn write_redis_args<W: ?Sized + RedisWrite>(&self, out: &mut W) {
        let mut arg = out.writer_for_next_arg();
        // Writes into a command's buffer cannot fail.
        let _ = arg.write_all(self.header.as_bytes());
        let _ = arg.write_all(self.data);
    }
}

/// A protocol command as the `redis` crate's, its buffers reused (see [`PooledCmd`]).
fn packed(cmd: &Command<'_>) -> PooledCmd {
    let mut bytes = cmd.head.name().len() + cmd.key.map_or(0, |k| k.len());
    for arg in cmd.args {
        bytes += match arg {
            Arg::Word(w) => w.len(),
            Arg::Int(_) => 20,
            Arg::Value(header, data) => header.as_bytes().len() + data.len(),
            Arg::Source(source) => source.len(),
            Arg::Key(_) => KEY_HEX_LEN,
            Arg::Name(name) => name.len(),
        };
    }
    let mut out = match cmd.head {
        Head::Name(name) => {
            let mut out = PooledCmd::with_capacity(1 + cmd.args.len() + 1, bytes);
            out.arg(name);
            out
        }
        Head::EvalSha(script) | Head::Eval(script) => {
            let body = match cmd.head {
                Head::Eval(_) => script.source,
                _ => script.sha.as_str(),
            };
            let mut out = PooledCmd::with_capacity(4 + cmd.args.len(), bytes + body.len() + 1);
            out.arg(cmd.head.name()).arg(body).arg(1);
            out
        }
    };
    if let Some(key) = cmd.key {
        out.arg(KeyArg(key));
    }
    for arg in cmd.args {
        match *arg {
            Arg::Word(word) => out.arg(word),
            Arg::Int(n) => out.arg(n),
            Arg::Value(header, data) => out.arg(ValueArg { header, data }),
            Arg::Source(source) => out.arg(source),
            Arg::Key(key) => out.arg(KeyArg(KeyName { prefix: "", key })),
            Arg::Name(name) => out.arg(KeyArg(name)),
        };
    }
    out
}

/// A reply in the protocol's model; the bulk string keeps the crate's buffer. An error reply,
/// or a type the family's commands never get, is an error.
fn reply(value: Value) -> Result<Reply, SendError> {
    Ok(match value {
        Value::Nil => Reply::Nil,
        Value::Int(n) => Reply::Int(n),
        Value::BulkString(b) => Reply::Bulk(b.into()),
        Value::Okay | Value::SimpleString(_) => Reply::Status,
        Value::Array(items) => {
            Reply::Array(items.into_iter().map(reply).collect::<Result<_, _>>()?)
        }
        Value::ServerError(e) => return Err(ServerError::from_code(e.code()).into()),
        _ => {
            return Err(SendError::Other(Box::new(RedisError::from((
                ::redis::ErrorKind::UnexpectedReturnType,
                "a reply of a type the store never asks for",
            )))));
        }
    })
}

/// A `redis` crate error in the protocol's model. An error reply keeps its code only (its text
/// may echo arguments).
fn send_error(e: RedisError) -> SendError {
    use ::redis::ErrorKind;
    if e.is_connection_refusal() {
        return SendError::NotSent(Box::new(e));
    }
    if e.is_io_error() || e.is_connection_dropped() {
        return SendError::Broken(Box::new(e));
    }
    if let Some(code) = e.code() {
        return ServerError::from_code(code).into();
    }
    let unavailable = e.is_timeout()
        || matches!(
            e.kind(),
            ErrorKind::ClusterConnectionNotFound
                | ErrorKind::MasterNameNotFoundBySentinel
                | ErrorKind::NoValidReplicasFoundBySentinel
        );
    if unavailable {
        SendError::Unavailable(Box::new(e))
    } else {
        SendError::Other(Box::new(e))
    }
}

/// An error while connecting, sorted as the protocol sorts a failed command.
fn open_error(e: RedisError) -> StoreError {
    opening_failed(Conn::NAME, send_error(e))
}

/// No connection within the command timeout.
fn connect_timed_out(after: Duration) -> StoreError {
    opening_failed(
        Conn::NAME,
        SendError::Unavailable(Box::new(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            format!("redis did not answer within {after:?}"),
        ))),
    )
}

impl Transport for Conn {
    const NAME: &'static str = "redis";
    const VALUE_LAST: bool = false;
    const BINARY_SAFE: bool = true;
    // One batch of `GET`s on the store's own connection; the cluster client's multiplexed
    // connections take as many.
    const CONCURRENT_LOADS: usize = 256;

    fn keeps_deadline(&self) -> bool {
        matches!(self, Conn::Pipe(_))
    }

    fn one_node(&self) -> bool {
        !matches!(self, Conn::Cluster(_))
    }

    /// Sends a command once (on a cluster, until the cluster has run it: see [`Resend`]), with
    /// `then` (a `WAIT`) after it if given, in one pipeline: one round trip, one connection, one
    /// node (on a cluster, the pipeline goes to the node of its one key; `WAIT` alone would go
    /// to every master).
    ///
    /// The store's own connection keeps `deadline` itself; the `redis` crate's connections
    /// leave it to the protocol's timer.
    async fn send(
        &self,
        cmd: &Command<'_>,
        then: Option<&Command<'_>>,
        deadline: Instant,
    ) -> Result<Sent, SendError> {
        if let Conn::Pipe(pipe) = self {
            return pipe.send(cmd, then, deadline).await;
        }
        let cmd = packed(cmd);
        let then = then.map(packed);
        let mut resend = Resend::new(self);
        let (value, then) = loop {
            let done = match &then {
                None => self.send_one(&cmd).await.map(|v| (v, None)),
                Some(then) => self.send_pipeline(&cmd, then).await,
            };
            match done {
                Err(e) => match resend.again(&e) {
                    Some(pause) => tokio::time::sleep(pause).await,
                    None => return Err(send_error(e)),
                },
                Ok(done) => break done,
            }
        };
        Ok(Sent {
            reply: reply(value)?,
            then: then.and_then(|v| reply(v).ok()),
        })
    }
}

/// The shortest and longest pause before a cluster command is sent again after the cluster
/// answered that it did not run it (see [`not_run`]).
const CLUSTER_PAUSE_MIN: Duration = Duration::from_millis(5);
const CLUSTER_PAUSE_MAX: Duration = Duration::from_millis(100);

/// Whether a cluster answered `e` without running the command: a redirection (`MOVED`, `ASK`),
/// a slot that is not served for the moment (`TRYAGAIN`, `CLUSTERDOWN`, `MASTERDOWN`, a node
/// still loading its data), or no connection to send it on. Sending such a command again
/// cannot apply it twice.
fn not_run(e: &RedisError) -> bool {
    use ::redis::{ErrorKind, ServerErrorKind};
    matches!(
        e.kind(),
        ErrorKind::Server(
            ServerErrorKind::Moved
                | ServerErrorKind::Ask
                | ServerErrorKind::TryAgain
                | ServerErrorKind::ClusterDown
                | ServerErrorKind::MasterDown
                | ServerErrorKind::BusyLoading
        ) | ErrorKind::ClusterConnectionNotFound
    )
}

/// The pauses between the attempts of a cluster command the cluster did not run
/// ([`not_run`]): none before the first resend (after a `MOVED` the cluster client sets about
/// refreshing its slot map at once), then growing up to [`CLUSTER_PAUSE_MAX`]. The cluster client
/// itself is built without retries (see [`RedisStoreBuilder::open_cluster`]). There is no limit
/// on the attempts: the protocol bounds them by the command timeout.
struct Resend {
    cluster: bool,
    pause: Duration,
}

impl Resend {
    fn new(conn: &Conn) -> Resend {
        Resend {
            cluster: matches!(conn, Conn::Cluster(_)),
            pause: Duration::ZERO,
        }
    }

    /// Whether to send the command again after `e`: if so, after how long a pause.
    fn again(&mut self, e: &RedisError) -> Option<Duration> {
        if !(self.cluster && not_run(e)) {
            return None;
        }
        let pause = self.pause;
        self.pause = (pause * 2).clamp(CLUSTER_PAUSE_MIN, CLUSTER_PAUSE_MAX);
        Some(pause)
    }
}

impl Conn {
    async fn send_one(&self, cmd: &Cmd) -> RedisResult<Value> {
        let reply = match self {
            Conn::Single(c) => c.clone().send_packed_command(cmd).await?,
            Conn::Cluster(c) => c.clone().req_packed_command(cmd).await?,
            // Boxed: the Sentinel path's futures (asking the Sentinels for the master) are deep
            // enough to push the layout of callers' futures past the compiler's default
            // recursion limit.
            Conn::Sentinel(c) => return Box::pin(c.send(cmd)).await,
            Conn::Pipe(_) => unreachable_pipe()?,
        };
        server_error(reply)
    }

    /// Sends a command and then another in one pipeline; the first's server error, if any, is
    /// the error, and the second's is no reply.
    async fn send_pipeline(&self, cmd: &Cmd, then: &Cmd) -> RedisResult<(Value, Option<Value>)> {
        let mut pipe = Pipeline::with_capacity(2);
        pipe.add_command(cmd.clone()).add_command(then.clone());
        let replies = match self {
            Conn::Single(c) => c.clone().send_packed_commands(&pipe, 0, 2).await?,
            Conn::Cluster(c) => c.clone().req_packed_commands(&pipe, 0, 2).await?,
            Conn::Sentinel(c) => Box::pin(c.send_pipeline(&pipe)).await?,
            Conn::Pipe(_) => unreachable_pipe()?,
        };
        let mut replies = replies.into_iter();
        let (Some(reply), Some(then), None) = (replies.next(), replies.next(), replies.next())
        else {
            return Err(RedisError::from((
                ::redis::ErrorKind::UnexpectedReturnType,
                "not two replies to two commands",
            )));
        };
        // After a write, `WAIT` may refuse to count its replicas (seen from a node that answered
        // as a replica, during a cluster failover): no replica confirmed the write, which is then
        // reported as not replicated (unavailable), not as an error of its own.
        Ok((server_error(reply)?, server_error(then).ok()))
    }
}

/// The store's own connections send their commands themselves (see [`Transport::send`]).
fn unreachable_pipe<T>() -> RedisResult<T> {
    Err(RedisError::from((
        ::redis::ErrorKind::Client,
        "the store's own connections do not send the redis crate's commands",
    )))
}

/// The connection to a Sentinel-managed master: the one in use, or none until the next request
/// asks the Sentinels where the master is.
struct SentinelConn {
    client: tokio::sync::Mutex<SentinelClient>,
    /// The connection in use and its generation (so that a failure forgets only the connection
    /// it happened on, not a newer one).
    current: Mutex<Option<(u64, MultiplexedConnection)>>,
    generation: AtomicU64,
    config: AsyncConnectionConfig,
}

impl SentinelConn {
    /// The connection in use, or a new one to the master the Sentinels name now.
    async fn connection(&self) -> RedisResult<(u64, MultiplexedConnection)> {
        if let Some(current) = self.lock().clone() {
            return Ok(current);
        }
        // One request at a time asks the Sentinels; the others then find its connection.
        let mut client = self.client.lock().await;
        if let Some(current) = self.lock().clone() {
            return Ok(current);
        }
        let conn = client
            .async_get_client()
            .await?
            .get_multiplexed_async_connection_with_config(&self.config)
            .await?;
        let generation = self.generation.fetch_add(1, Ordering::Relaxed) + 1;
        *self.lock() = Some((generation, conn.clone()));
        Ok((generation, conn))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<(u64, MultiplexedConnection)>> {
        self.current.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Forgets the connection of `generation` after `e` if `e` says it no longer reaches a
    /// master: broken, or a node that is read-only now (demoted by a failover).
    fn after_error(&self, generation: u64, e: &RedisError) {
        let stale = e.is_io_error()
            || e.is_connection_dropped()
            || e.is_connection_refusal()
            || e.is_timeout()
            || e.kind() == ::redis::ErrorKind::Server(::redis::ServerErrorKind::ReadOnly);
        if stale {
            let mut current = self.lock();
            if current.as_ref().is_some_and(|(g, _)| *g == generation) {
                *current = None;
            }
        }
    }

    async fn send(&self, cmd: &Cmd) -> RedisResult<Value> {
        let (generation, mut conn) = self.connection().await?;
        let reply = conn.send_packed_command(cmd).await.and_then(server_error);
        if let Err(e) = &reply {
            self.after_error(generation, e);
        }
        reply
    }

    async fn send_pipeline(&self, pipe: &Pipeline) -> RedisResult<Vec<Value>> {
        let (generation, mut conn) = self.connection().await?;
        let replies = conn.send_packed_commands(pipe, 0, 2).await;
        match &replies {
            Err(e) => self.after_error(generation, e),
            Ok(replies) => {
                for reply in replies {
                    if let Value::ServerError(e) = reply {
                        self.after_error(generation, &e.clone().into());
                    }
                }
            }
        }
        replies
    }
}

/// A reply that is a server error as an error. Only the top level is looked at (unlike
/// `Value::extract_error`, which rebuilds every array): no reply these stores expect nests one.
fn server_error(reply: Value) -> RedisResult<Value> {
    match reply {
        Value::ServerError(e) => Err(e.into()),
        reply => Ok(reply),
    }
}

impl fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let p = &self.protocol;
        f.debug_struct("RedisStore")
            .field(
                "mode",
                &match p.transport {
                    Conn::Pipe(_) | Conn::Single(_) => "single node",
                    Conn::Cluster(_) => "cluster",
                    Conn::Sentinel(_) => "sentinel",
                },
            )
            .field("key_prefix", &p.prefix)
            .field("command_timeout", &p.timeout)
            .field("min_replicas_ack", &p.acks.map(|a| (a.replicas, a.timeout)))
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spare() -> usize {
        SPARE.with_borrow(Vec::len)
    }

    #[test]
    fn pooled_commands_are_reused_cleared_and_bounded() {
        SPARE.with_borrow_mut(Vec::clear);
        let build = |word: &str| {
            let mut cmd = PooledCmd::with_capacity(2, 64);
            cmd.arg("GET").arg(word);
            cmd
        };
        let fresh = {
            let mut cmd = Cmd::new();
            cmd.arg("GET").arg("b");
            cmd.get_packed_command()
        };
        drop(build("a long argument that is left behind"));
        assert_eq!(spare(), 1);
        let reused = build("b");
        assert_eq!(spare(), 0, "the spare command was taken");
        assert_eq!(
            reused.get_packed_command(),
            fresh,
            "a reused command starts empty"
        );
        drop(reused);
        // At most SPARE_CMDS kept.
        let many: Vec<PooledCmd> = (0..SPARE_CMDS + 3).map(|_| build("x")).collect();
        drop(many);
        assert_eq!(spare(), SPARE_CMDS);
        // Large commands are neither taken from nor given to the list.
        let big = PooledCmd::with_capacity(2, SPARE_CMD_BYTES + 1);
        assert_eq!(spare(), SPARE_CMDS);
        SPARE.with_borrow_mut(Vec::clear);
        drop(big);
        assert_eq!(spare(), 0);
    }
}
