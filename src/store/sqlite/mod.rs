//! [`SqliteStore`]: sessions in one `SQLite` file (or in memory), on threads of its own.
//!
//! Here the store's face: its builder, the contract's methods and the cleanup task. `thread`
//! runs the connections, `schema` makes and checks the table and its statements, `error` says
//! what failed.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::Sender;
use std::time::{Duration, SystemTime};

use rusqlite::params;

use self::error::{Fail, fail_error, name_row, thread_stopped};
use self::schema::validate_table_name;
use self::thread::{Job, Msg, Query, Read, Stmts, deadline_after, serve, serve_reads, spawn};
use crate::error::StoreError;
use crate::key::Key;
use crate::store::cleanup;
use crate::store::{CreateOutcome, Record, SaveOutcome, SessionStore, unix_ms};

mod error;
mod schema;
mod thread;

/// Rows removed per round trip by [`SqliteStore::delete_expired`], so requests interleave.
const CLEANUP_BATCH: i64 = 1000;

/// Sessions in an `SQLite` database: they survive a restart, on one file and no server.
///
/// The `SQLite` library is bundled (a fresh machine needs no system package). All `SQLite` work
/// runs on dedicated threads, each owning its connection and keeping its statements prepared,
/// so nothing blocks the async runtime: one writer thread, whose connection is the store's
/// single writer (writes never wait on each other's locks), and for a file in WAL mode
/// [`readers`](SqliteStoreBuilder::readers) read-only connections (one by default) that answer
/// `load` beside it, never queued behind a write nor blocked by another process's write lock.
///
/// # Storage
/// One table (default `sessions`, see [`SqliteStoreBuilder::table`]) holding, per session, the
/// id as a 16-byte blob primary key, the encoded record, its version, its expiry as integer
/// Unix milliseconds and its [owner](Record::owner) (`TEXT`, `NULL` for none), with an index on
/// the expiry and a partial one on the owner (`WHERE owner IS NOT NULL`: sessions without an
/// owner cost it nothing):
///
/// ```sql
/// CREATE TABLE sessions (
///     id BLOB PRIMARY KEY NOT NULL,  -- a digest of the session id, never the id
///     data BLOB NOT NULL,            -- the encoded record
///     version INTEGER NOT NULL,
///     expires_at INTEGER NOT NULL,   -- Unix milliseconds
///     owner TEXT                     -- the session's owner, if it has one
/// ) WITHOUT ROWID;
/// CREATE INDEX sessions_expires_at ON sessions (expires_at);
/// CREATE INDEX sessions_owner ON sessions (owner) WHERE owner IS NOT NULL;
/// ```
///
/// [`owned`](SessionStore::owned) is one statement through the owner index, run on a reader
/// like a load. Expired rows are never returned nor changed
/// (every statement compares the expiry, as an integer, with the time it runs), and each contract
/// method is one round trip to a store thread (a reader for a load, else the writer) running one
/// to three statements, all prepared once when the store opens. Every change to a loaded record
/// (`save`, `touch`, `remove`) is a conditional statement (`... WHERE id = ? AND version = ? AND
/// expires_at > now`); only when it matches no row does one more statement tell a conflict (a
/// live row of another version) from a missing row.
/// The schema version is kept in a small `hyper_sessions_schema` table, so that a release can
/// migrate the data: a table of schema version 1 (before owners) gets the `owner` column
/// (`NULL` in every row; no row is rewritten) and its index when a store of this release opens
/// it, in the transaction that checks the schema. Building the index reads the table once,
/// under the write lock. A process of an older release that already has the file open keeps
/// working (its sessions have no owner); one that opens it afterwards refuses the newer schema.
///
/// A file database runs in WAL mode with `synchronous=NORMAL`: readers never block the writer,
/// and a committed write survives the process being killed (it can be lost only to a power
/// failure or OS crash before the next checkpoint).
///
/// # Writes
/// Writes that arrive while the writer thread is busy are committed together in one
/// transaction (a group commit: under 32 concurrent load-and-save loops this halved the time per
/// pair, about 55 µs to 30 µs on a file); a lone write is its own transaction and waits for
/// nothing. Each write still checks its own conditions, and is reported done only once its
/// transaction has committed; if anything in a batch fails, the batch is rolled back and each
/// write is retried alone, so one write's failure is reported to that write only.
///
/// # Locks held by other processes
/// Every operation has a deadline: the moment it was asked for plus the
/// [`busy_timeout`](SqliteStoreBuilder::busy_timeout). While another connection holds the write
/// lock, a write waits for it until its own deadline and then fails as
/// [`StoreError::unavailable`] (503), however many writes are queued with it: a batch waits
/// until its earliest deadline, fails the writes whose time is up (none of them ran) and waits
/// on for the rest; a write retried alone keeps its deadline. The lock is polled every few
/// milliseconds, so queued writes go through as soon as it is released. Loads, on their own
/// connections, are answered meanwhile (WAL readers take no lock a writer holds).
///
/// # Expired rows
/// [`delete_expired`](SqliteStore::delete_expired) removes them, and a background task does so
/// every [`cleanup_interval`](SqliteStoreBuilder::cleanup_interval) (default five minutes); it
/// stops when the last clone of the store is dropped.
///
/// # Errors
/// A database locked by another process past the busy timeout, a full disk (or the
/// [`max_size`](SqliteStoreBuilder::max_size) reached) and I/O failures are
/// [`StoreError::unavailable`] (the layer answers 503); a row that cannot be read back (wrong
/// column types) is [`StoreError::corrupt`] (the layer starts a fresh session and leaves the row
/// alone); a read-only or unopenable file is [`StoreError::other`]. Every error names the
/// operation, the table and file, and keeps `SQLite`'s error as its source. A session id never
/// appears in full in an error (ids are secrets): at most its first eight characters.
///
/// # Examples
/// ```no_run
/// use hyper_sessions::{SessionLayer, SqliteStore};
///
/// # async fn run() -> Result<(), hyper_sessions::store::StoreError> {
/// let store = SqliteStore::open("sessions.db").await?;
/// let layer = SessionLayer::new(store);
/// # let _ = layer;
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct SqliteStore {
    inner: Arc<Inner>,
}

struct Inner {
    /// To the writer thread (see [`serve`]); it stops when this is dropped.
    tx: Sender<Msg>,
    /// The reader threads (see [`serve_reads`]), each with its own read-only connection; empty
    /// when loads go to the writer (a database in memory or not in WAL mode, or `readers(0)`).
    readers: Box<[Reader]>,
    /// How long an operation may wait, from the moment it is asked for, for a lock held by
    /// another connection.
    busy_timeout: Duration,
    /// `table "sessions" in /path/to/file.db`, for error messages.
    label: Arc<str>,
}

/// One reader thread: its queue, and how many loads are in it or under way.
struct Reader {
    tx: Sender<Read>,
    queued: Arc<AtomicUsize>,
}

/// Where the database lives.
#[derive(Debug, Clone)]
pub(super) enum Location {
    File(PathBuf),
    Memory,
}

/// Configures and opens a [`SqliteStore`].
///
/// # Examples
/// ```no_run
/// use std::time::Duration;
/// use hyper_sessions::SqliteStore;
///
/// # async fn run() -> Result<(), hyper_sessions::store::StoreError> {
/// let store = SqliteStore::builder("/var/lib/myapp/sessions.db")
///     .table("web_sessions")
///     .busy_timeout(Duration::from_secs(2))
///     .cleanup_interval(Some(Duration::from_secs(60)))
///     .open()
///     .await?;
/// # let _ = store;
/// # Ok(())
/// # }
/// ```
#[derive(Debug, Clone)]
#[must_use]
pub struct SqliteStoreBuilder {
    location: Location,
    table: String,
    busy_timeout: Duration,
    cleanup_interval: Option<Duration>,
    max_size: Option<u64>,
    readers: usize,
}

/// The most reader threads a store starts.
const MAX_READERS: usize = 16;

impl SqliteStoreBuilder {
    fn new(location: Location) -> Self {
        SqliteStoreBuilder {
            location,
            table: "sessions".to_owned(),
            busy_timeout: Duration::from_secs(5),
            cleanup_interval: Some(Duration::from_secs(300)),
            max_size: None,
            readers: 1,
        }
    }

    /// The table that holds the sessions (default `sessions`), created if missing.
    ///
    /// The name must be 1 to 64 ASCII letters, digits and underscores, not starting with a digit
    /// nor with `sqlite_`; anything else makes [`open`](Self::open) fail (it never reaches SQL).
    /// Several stores can share one file under different table names.
    pub fn table(mut self, name: impl Into<String>) -> Self {
        self.table = name.into();
        self
    }

    /// How long an operation may wait for a lock held by another connection (another process on
    /// the same file) before it fails as [`StoreError::unavailable`] (default 5 s).
    ///
    /// The time counts from the moment the operation is asked for, not per statement: a write
    /// queued behind others that are waiting for the same lock gives up at its own deadline,
    /// not after theirs, and an operation that has spent its time in the queue still runs if
    /// the lock is free, but does not wait for it.
    pub fn busy_timeout(mut self, timeout: Duration) -> Self {
        self.busy_timeout = timeout;
        self
    }

    /// How often the background task deletes expired rows (default every five minutes); `None`
    /// starts no task (call [`SqliteStore::delete_expired`] yourself).
    ///
    /// The task is spawned on the tokio runtime that [`open`](Self::open) runs on and stops when
    /// the last clone of the store is dropped.
    pub fn cleanup_interval(mut self, interval: Option<Duration>) -> Self {
        self.cleanup_interval = interval.map(|i| i.max(Duration::from_millis(1)));
        self
    }

    /// Caps the database at about this many bytes (default: no cap beyond the disk's).
    ///
    /// At the cap, creating or growing a session fails with [`StoreError::unavailable`] (a 503 by
    /// default) and existing sessions keep working, as on a full disk: a flood of new visitors
    /// cannot fill the disk. Expired rows are cleaned up to make room.
    pub fn max_size(mut self, bytes: u64) -> Self {
        self.max_size = Some(bytes);
        self
    }

    /// How many read-only connections serve [`load`](SessionStore::load), each on a thread of
    /// its own (default 1, at most 16).
    ///
    /// In WAL mode readers never wait for the writer, nor for another process's write lock, so
    /// loads are answered while writes wait. With several, loads can run on several cores: a
    /// load goes to the reader with the fewest loads queued. More readers than free cores cost
    /// throughput (each load is more often a thread wake-up: on one CPU, two readers served
    /// about 40 % fewer `/read` requests per second than one). Each reader holds its own page
    /// cache (up to 8 MiB, as the writer's), which `SQLite` empties whenever another connection
    /// has written since its last load.
    ///
    /// `0` runs loads on the writer's connection, between its write batches; so does a
    /// database in memory (a private in-memory database has one connection) or a file whose
    /// journal cannot be switched to WAL.
    pub fn readers(mut self, readers: usize) -> Self {
        self.readers = readers.min(MAX_READERS);
        self
    }

    /// Opens the database (creating the file, the table and its index if missing), checks the
    /// schema version and starts the cleanup task.
    ///
    /// # Errors
    /// [`StoreError::other`] for an invalid table name, a missing directory, a file that is not
    /// a database or is read-only, a table of that name that is not a session table, or a schema
    /// written by a newer release; [`StoreError::unavailable`] when the file is locked or the
    /// disk is full.
    pub async fn open(self) -> Result<SqliteStore, StoreError> {
        validate_table_name(&self.table)?;
        let label: Arc<str> = match &self.location {
            Location::File(path) => format!("table \"{}\" in {}", self.table, path.display()),
            Location::Memory => format!("table \"{}\" in memory", self.table),
        }
        .into();
        let (tx, rx) = std::sync::mpsc::channel();
        let (ready_tx, ready) = tokio::sync::oneshot::channel();
        let config = self.clone();
        spawn("hyper-sessions-sqlite", &label, move || {
            serve(&config, &rx, ready_tx);
        })?;
        let wal = match ready.await {
            Ok(Ok(wal)) => wal,
            Ok(Err(fail)) => return Err(fail_error("open", &label, fail)),
            Err(_) => return Err(thread_stopped("open", &label)),
        };
        // The readers open once the writer has set the file up (WAL mode, the table).
        let mut readers = Vec::new();
        if let (Location::File(path), true) = (&self.location, wal) {
            let mut ready = Vec::new();
            for _ in 0..self.readers {
                let (tx, rx) = std::sync::mpsc::channel();
                let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
                let queued = Arc::new(AtomicUsize::new(0));
                let (path, table, busy) = (path.clone(), self.table.clone(), self.busy_timeout);
                let count = Arc::clone(&queued);
                spawn("hyper-sessions-sqlite-read", &label, move || {
                    serve_reads(&path, &table, busy, &rx, &count, ready_tx);
                })?;
                readers.push(Reader { tx, queued });
                ready.push(ready_rx);
            }
            for ready in ready {
                match ready.await {
                    Ok(Ok(())) => {}
                    Ok(Err(fail)) => return Err(fail_error("open", &label, fail)),
                    Err(_) => return Err(thread_stopped("open", &label)),
                }
            }
        }
        let store = SqliteStore {
            inner: Arc::new(Inner {
                tx,
                readers: readers.into(),
                busy_timeout: self.busy_timeout,
                label,
            }),
        };
        if let Some(interval) = self.cleanup_interval {
            if let Ok(handle) = tokio::runtime::Handle::try_current() {
                handle.spawn(cleanup::every(
                    Arc::downgrade(&store.inner),
                    interval,
                    "SQLite",
                    |inner| async move { delete_expired(&inner).await },
                ));
            } else {
                crate::trace::event!(
                    warn,
                    "hyper-sessions: SqliteStore opened outside a tokio runtime; no cleanup task \
                     (call delete_expired yourself)"
                );
            }
        }
        Ok(store)
    }
}

impl SqliteStore {
    /// Opens (or creates) the database file at `path` with the default settings: table
    /// `sessions`, WAL mode, a 5 s busy timeout, expired rows cleaned every five minutes.
    ///
    /// # Errors
    /// As [`SqliteStoreBuilder::open`].
    pub async fn open(path: impl AsRef<Path>) -> Result<Self, StoreError> {
        Self::builder(path).open().await
    }

    /// A store in a private in-memory database, gone when the store is dropped: for tests.
    ///
    /// # Errors
    /// As [`SqliteStoreBuilder::open`].
    pub async fn open_in_memory() -> Result<Self, StoreError> {
        Self::builder_in_memory().open().await
    }

    /// A builder for a store on the database file at `path`.
    ///
    /// `SQLite` `file:` URIs are accepted too (e.g. `file:sessions.db?mode=rwc`).
    pub fn builder(path: impl AsRef<Path>) -> SqliteStoreBuilder {
        SqliteStoreBuilder::new(Location::File(path.as_ref().to_owned()))
    }

    /// A builder for a store in a private in-memory database.
    pub fn builder_in_memory() -> SqliteStoreBuilder {
        SqliteStoreBuilder::new(Location::Memory)
    }

    /// Deletes every expired row now, in batches so that requests run in between; answers how
    /// many were deleted.
    ///
    /// # Examples
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), hyper_sessions::store::StoreError> {
    /// let store = hyper_sessions::SqliteStore::open_in_memory().await?;
    /// assert_eq!(store.delete_expired().await?, 0);
    /// # Ok(())
    /// # }
    /// ```
    pub async fn delete_expired(&self) -> Result<u64, StoreError> {
        delete_expired(&self.inner).await
    }
}

/// Runs a read (a load, an owner's listing): on the reader with the fewest reads queued, or on
/// the writer thread when there are no readers.
async fn read<T>(
    inner: &Inner,
    op: &'static str,
    query: impl FnOnce(tokio::sync::oneshot::Sender<Result<T, Fail>>) -> Query,
) -> Result<T, StoreError> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    let job = Read {
        query: query(tx),
        deadline: deadline_after(inner.busy_timeout),
    };
    let sent = match inner
        .readers
        .iter()
        .min_by_key(|r| r.queued.load(Ordering::Relaxed))
    {
        Some(reader) => {
            reader.queued.fetch_add(1, Ordering::Relaxed);
            let sent = reader.tx.send(job).is_ok();
            if !sent {
                reader.queued.fetch_sub(1, Ordering::Relaxed);
            }
            sent
        }
        None => inner.tx.send(Msg::Read(job)).is_ok(),
    };
    if !sent {
        return Err(thread_stopped(op, &inner.label));
    }
    match rx.await {
        Ok(result) => result.map_err(|e| fail_error(op, &inner.label, e)),
        Err(_) => Err(thread_stopped(op, &inner.label)),
    }
}

/// Runs a write on the writer thread, in one transaction with the writes queued beside it; it
/// waits for another connection's lock until `busy_timeout` after this call at most.
///
/// The job is sent in the caller's first poll, so a cancelled caller either sent nothing or has
/// its write committed all the same (its outcome then goes nowhere).
async fn write<T, F>(inner: &Inner, op: &'static str, f: F) -> Result<T, StoreError>
where
    T: Send + 'static,
    F: Fn(&mut Stmts<'_>) -> Result<T, Fail> + Send + 'static,
{
    let (tx, rx) = tokio::sync::oneshot::channel();
    let job = Box::new(Job {
        f,
        deadline: deadline_after(inner.busy_timeout),
        out: None,
        tx: Some(tx),
    });
    if inner.tx.send(Msg::Write(job)).is_err() {
        return Err(thread_stopped(op, &inner.label));
    }
    match rx.await {
        Ok(result) => result.map_err(|e| fail_error(op, &inner.label, e)),
        Err(_) => Err(thread_stopped(op, &inner.label)),
    }
}

async fn delete_expired(inner: &Inner) -> Result<u64, StoreError> {
    let mut total = 0;
    loop {
        let n = write(inner, "delete_expired", move |s| {
            Ok(s.delete_expired.execute(params![CLEANUP_BATCH])?)
        })
        .await?;
        total += u64::try_from(n).unwrap_or(u64::MAX);
        if i64::try_from(n).unwrap_or(i64::MAX) < CLEANUP_BATCH {
            return Ok(total);
        }
        tokio::task::yield_now().await;
    }
}

impl fmt::Debug for SqliteStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SqliteStore")
            .field("location", &self.inner.label)
            .finish_non_exhaustive()
    }
}

impl SessionStore for SqliteStore {
    async fn load(&self, key: &Key) -> Result<Option<Record>, StoreError> {
        let (key, bytes) = (*key, key.to_bytes());
        let stored = read(&self.inner, "load", |tx| Query::Load { key: bytes, tx })
            .await
            .map_err(|e| name_row(e, key))?;
        Ok(stored.map(|s| s.into_record(key)))
    }

    async fn create(&self, record: &Record) -> Result<CreateOutcome, StoreError> {
        let key = record.key().to_bytes();
        let data = record.data().clone();
        let version = version_param(record.version())?;
        let expires = ms(record.expires_at());
        let owner = record.owner_shared().cloned();
        let n = write(&self.inner, "create", move |s| {
            Ok(s.create
                .execute(params![key, &data[..], version, expires, owner.as_deref()])?)
        })
        .await?;
        Ok(if n == 0 {
            CreateOutcome::IdTaken
        } else {
            CreateOutcome::Created
        })
    }

    async fn save(
        &self,
        record: &Record,
        expected_version: u64,
    ) -> Result<SaveOutcome, StoreError> {
        let key = record.key().to_bytes();
        let data = record.data().clone();
        let version = version_param(record.version())?;
        // No stored version is beyond SQLite's integers: such an expectation matches no row.
        let expected = i64::try_from(expected_version).ok();
        let expires = ms(record.expires_at());
        let owner = record.owner_shared().cloned();
        write(&self.inner, "save", move |s| {
            if let Some(expected) = expected {
                let args = params![key, &data[..], version, expires, expected, owner.as_deref()];
                // Most saves keep the stored expiry (the core slides it only now and then) and
                // owner. An UPDATE that names `expires_at` rewrites its index entry even when the
                // value is the same (about 8,000 instructions and one more WAL page per commit),
                // and so for `owner`, so that case goes first, without them; a changed expiry or
                // owner matches no row there and takes the full statement. Each statement checks
                // the version on its own, so either is a compare-and-set.
                if s.save_same_expiry.execute(args)? > 0 || s.save.execute(args)? > 0 {
                    return Ok(SaveOutcome::Saved);
                }
            }
            not_written(s, &key)
        })
        .await
    }

    async fn touch(
        &self,
        key: &Key,
        expected_version: u64,
        expires_at: SystemTime,
    ) -> Result<SaveOutcome, StoreError> {
        let key = key.to_bytes();
        let expected = i64::try_from(expected_version).ok();
        let expires = ms(expires_at);
        write(&self.inner, "touch", move |s| {
            if let Some(expected) = expected
                && s.touch.execute(params![key, expires, expected])? > 0
            {
                return Ok(SaveOutcome::Saved);
            }
            not_written(s, &key)
        })
        .await
    }

    async fn remove(&self, key: &Key, expected_version: u64) -> Result<SaveOutcome, StoreError> {
        let key = key.to_bytes();
        let expected = i64::try_from(expected_version).ok();
        write(&self.inner, "remove", move |s| {
            if let Some(expected) = expected
                && s.remove.execute(params![key, expected])? > 0
            {
                return Ok(SaveOutcome::Saved);
            }
            not_written(s, &key)
        })
        .await
    }

    async fn delete(&self, key: &Key) -> Result<(), StoreError> {
        let key = key.to_bytes();
        write(&self.inner, "delete", move |s| {
            s.delete.execute(params![key])?;
            Ok(())
        })
        .await
    }

    async fn owned(&self, owner: &str) -> Result<Vec<Record>, StoreError> {
        let owner: Arc<str> = Arc::from(owner);
        read(&self.inner, "owned", |tx| Query::Owned { owner, tx }).await
    }
}

/// Why a conditional write matched no row: a live row with another version is a conflict, no
/// live row is missing.
///
/// Runs right after the write, in the same job on the same connection (and in the same
/// transaction when the write is batched); the write itself changed nothing either way, so the
/// answer never hides a write that was made.
fn not_written(s: &mut Stmts<'_>, key: &[u8; 16]) -> Result<SaveOutcome, Fail> {
    Ok(if s.exists.exists(params![key])? {
        SaveOutcome::Conflict
    } else {
        SaveOutcome::Missing
    })
}

/// Unix milliseconds as `SQLite`'s integer, saturating.
fn ms(t: SystemTime) -> i64 {
    i64::try_from(unix_ms(t)).unwrap_or(i64::MAX)
}

fn version_param(version: u64) -> Result<i64, StoreError> {
    i64::try_from(version).map_err(|_| {
        StoreError::other(format!(
            "record version {version} exceeds SQLite's integers"
        ))
    })
}
