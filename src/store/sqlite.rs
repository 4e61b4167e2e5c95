//! [`SqliteStore`]: sessions in one `SQLite` file (or in memory), on threads of its own.

use std::borrow::Cow;
use std::cell::Cell;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, Sender, TryRecvError};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use rusqlite::{
    self, ErrorCode, OptionalExtension, Row, Statement, TransactionBehavior, params,
    types::ValueRef,
};

use crate::error::StoreError;
use crate::key::Key;
use crate::record::{Record, from_unix_ms, unix_ms};
use crate::store::{CreateOutcome, SaveOutcome, SessionStore};

/// The schema version this release writes and reads.
const SCHEMA_VERSION: i64 = 1;

/// The table that records each session table's schema version (one row per table).
const SCHEMA_TABLE: &str = "hyper_sessions_schema";

/// Rows removed per round trip by [`SqliteStore::delete_expired`], so requests interleave.
const CLEANUP_BATCH: i64 = 1000;

/// The longest table name accepted.
const MAX_TABLE_NAME: usize = 64;

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
/// id as a 16-byte blob primary key, the encoded record, its version and its expiry as integer
/// Unix milliseconds, with an index on the expiry. Expired rows are never returned nor changed
/// (every statement compares the expiry, as an integer, with the time it runs), and each contract
/// method is one round trip to a store thread (a reader for a load, else the writer) running one
/// to three statements, all prepared once when the store opens. Every change to a loaded record
/// (`save`, `touch`, `remove`) is a conditional statement (`... WHERE id = ? AND version = ? AND
/// expires_at > now`); only when it matches no row does one more statement tell a conflict (a
/// live row of another version) from a missing row.
/// The schema version is kept in a small `hyper_sessions_schema` table, so a later release can
/// migrate the data.
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
    tx: Sender<Load>,
    queued: Arc<AtomicUsize>,
}

/// A piece of work for the writer thread.
enum Msg {
    /// A load, when there are no reader threads: run at once (outside any write batch).
    Load(Load),
    /// A write, committed together with the writes queued right behind it.
    Write(Box<dyn WriteJob>),
}

/// A load: the id's key, when it must give up waiting for a lock, and where its row goes.
struct Load {
    key: [u8; 16],
    deadline: Instant,
    tx: tokio::sync::oneshot::Sender<Result<Option<Stored>, Fail>>,
}

impl Load {
    /// Runs the load on `stmt` (the prepared `load` statement) and sends its answer.
    fn answer(self, stmt: &mut Statement<'_>) {
        DEADLINE.set(Some(self.deadline));
        let _ = self.tx.send(load_row(stmt, &self.key));
    }
}

thread_local! {
    /// The deadline of the operation this thread's connection is running: [`wait_for_lock`]
    /// waits for another connection's lock until then, and no longer.
    static DEADLINE: Cell<Option<Instant>> = const { Cell::new(None) };
}

/// The busy handler of every connection the store opens (in place of `SQLite`'s busy timeout):
/// while another connection holds a lock this one needs, retries after 1, 2, 4, then every
/// 8 ms, until the deadline of the operation under way ([`DEADLINE`]). So an operation waits
/// for locks at most until its own deadline (the moment it was asked for plus the busy
/// timeout), however many statements or attempts it takes, and an operation already past it
/// tries once without waiting. `attempt` counts the retries of one locking event.
fn wait_for_lock(attempt: i32) -> bool {
    let Some(deadline) = DEADLINE.get() else {
        return false;
    };
    let now = Instant::now();
    if now >= deadline {
        return false;
    }
    let step = Duration::from_millis(1 << attempt.clamp(0, 3));
    std::thread::sleep(step.min(deadline - now));
    true
}

/// When an operation asked for now gives up waiting for a lock.
fn deadline_after(timeout: Duration) -> Instant {
    let now = Instant::now();
    now.checked_add(timeout)
        .unwrap_or_else(|| now + Duration::from_secs(365 * 86_400))
}

/// The statements, prepared once on the writer thread for the connection's lifetime.
struct Stmts<'c> {
    conn: &'c rusqlite::Connection,
    load: Statement<'c>,
    create: Statement<'c>,
    save: Statement<'c>,
    save_same_expiry: Statement<'c>,
    exists: Statement<'c>,
    delete: Statement<'c>,
    touch: Statement<'c>,
    remove: Statement<'c>,
    delete_expired: Statement<'c>,
    begin: Statement<'c>,
    commit: Statement<'c>,
}

impl<'c> Stmts<'c> {
    fn prepare(conn: &'c rusqlite::Connection, sql: &Sql) -> rusqlite::Result<Self> {
        Ok(Stmts {
            conn,
            load: conn.prepare(&sql.load)?,
            create: conn.prepare(&sql.create)?,
            save: conn.prepare(&sql.save)?,
            save_same_expiry: conn.prepare(&sql.save_same_expiry)?,
            exists: conn.prepare(&sql.exists)?,
            delete: conn.prepare(&sql.delete)?,
            touch: conn.prepare(&sql.touch)?,
            remove: conn.prepare(&sql.remove)?,
            delete_expired: conn.prepare(&sql.delete_expired)?,
            begin: conn.prepare("BEGIN IMMEDIATE")?,
            commit: conn.prepare("COMMIT")?,
        })
    }
}

/// The statements, with the table name quoted in.
struct Sql {
    load: String,
    create: String,
    save: String,
    /// [`save`](Sql::save) of a record whose expiry is the stored one: `expires_at` is left out
    /// of the `SET`, so `SQLite` leaves the expiry index alone.
    save_same_expiry: String,
    exists: String,
    delete: String,
    touch: String,
    remove: String,
    delete_expired: String,
}

/// The current time in integer Unix milliseconds, read by `SQLite` when the statement runs:
/// once per statement, after it has taken its lock, so that a write that waited for another
/// connection's lock checks the expiry at the time it is made, not at the time it was asked for.
/// (`unixepoch('subsec')` is the system clock's milliseconds as a float; rounding brings back the
/// exact integer, the same one [`unix_ms`] computes from [`SystemTime::now`].)
const NOW: &str = "CAST(round(unixepoch('subsec') * 1000) AS INTEGER)";

impl Sql {
    fn new(table: &str) -> Self {
        let t = format!("\"{table}\"");
        Sql {
            load: format!(
                "SELECT data, version, expires_at FROM {t} WHERE id = ?1 AND expires_at > {NOW}"
            ),
            create: format!(
                "INSERT INTO {t} (id, data, version, expires_at) VALUES (?1, ?2, ?3, ?4) \
                 ON CONFLICT (id) DO UPDATE SET data = excluded.data, version = excluded.version, \
                 expires_at = excluded.expires_at WHERE {t}.expires_at <= {NOW}"
            ),
            save: format!(
                "UPDATE {t} SET data = ?2, version = ?3, expires_at = ?4 \
                 WHERE id = ?1 AND version = ?5 AND expires_at > {NOW}"
            ),
            save_same_expiry: format!(
                "UPDATE {t} SET data = ?2, version = ?3 \
                 WHERE id = ?1 AND version = ?5 AND expires_at = ?4 AND expires_at > {NOW}"
            ),
            exists: format!("SELECT 1 FROM {t} WHERE id = ?1 AND expires_at > {NOW}"),
            delete: format!("DELETE FROM {t} WHERE id = ?1"),
            touch: format!(
                "UPDATE {t} SET expires_at = ?2 \
                 WHERE id = ?1 AND version = ?3 AND expires_at > {NOW}"
            ),
            remove: format!(
                "DELETE FROM {t} WHERE id = ?1 AND version = ?2 AND expires_at > {NOW}"
            ),
            delete_expired: format!(
                "DELETE FROM {t} WHERE id IN \
                 (SELECT id FROM {t} WHERE expires_at <= {NOW} LIMIT ?1)"
            ),
        }
    }
}

/// Where the database lives.
#[derive(Debug, Clone)]
enum Location {
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
                handle.spawn(clean_forever(Arc::downgrade(&store.inner), interval));
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

/// Starts a thread of the store's.
fn spawn(name: &str, label: &str, f: impl FnOnce() + Send + 'static) -> Result<(), StoreError> {
    std::thread::Builder::new()
        .name(name.to_owned())
        .spawn(f)
        .map(drop)
        .map_err(|e| {
            StoreError::other(SqliteError {
                message: format!("open on {label}: cannot start an SQLite thread: {e}"),
                source: None,
            })
        })
}

/// A busy timeout as `SQLite` takes it (whole milliseconds in an `i32`), for the setup
/// statements run before [`wait_for_lock`] takes over.
fn setup_timeout(busy: Duration) -> Duration {
    busy.min(Duration::from_millis(i32::MAX.unsigned_abs().into()))
}

/// A reader thread: opens a read-only connection on the file (already in WAL mode, the table
/// made), prepares the load statement, answers `ready`, then runs loads until every sender is
/// gone.
fn serve_reads(
    path: &Path,
    table: &str,
    busy: Duration,
    rx: &Receiver<Load>,
    queued: &AtomicUsize,
    ready: tokio::sync::oneshot::Sender<Result<(), Fail>>,
) {
    let opened = (|| -> Result<rusqlite::Connection, Fail> {
        let conn = rusqlite::Connection::open(path)?;
        conn.busy_timeout(setup_timeout(busy))?;
        // Never writes: a statement that would is refused by SQLite itself.
        conn.execute_batch("PRAGMA query_only = ON; PRAGMA cache_size = -8192;")?;
        conn.busy_handler(Some(wait_for_lock))?;
        Ok(conn)
    })();
    let conn = match opened {
        Ok(conn) => conn,
        Err(fail) => {
            let _ = ready.send(Err(fail));
            return;
        }
    };
    let mut load = match conn.prepare(&Sql::new(table).load) {
        Ok(stmt) => stmt,
        Err(e) => {
            let _ = ready.send(Err(Fail::Sql(e)));
            return;
        }
    };
    if ready.send(Ok(())).is_err() {
        return;
    }
    while let Ok(job) = rx.recv() {
        job.answer(&mut load);
        queued.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The writer thread: opens the connection, sets it up, prepares the statements, answers
/// `ready` (with whether the file is in WAL mode, so that readers can run beside it), then
/// serves messages until every sender is gone.
///
/// A write is committed together with the writes queued right behind it (up to [`MAX_BATCH`]);
/// a load found among them (when loads run here) waits until that batch has committed, so
/// loads never see an uncommitted write.
fn serve(
    config: &SqliteStoreBuilder,
    rx: &Receiver<Msg>,
    ready: tokio::sync::oneshot::Sender<Result<bool, Fail>>,
) {
    let opened = match &config.location {
        Location::File(path) => rusqlite::Connection::open(path),
        Location::Memory => rusqlite::Connection::open_in_memory(),
    };
    let mut conn = match opened {
        Ok(conn) => conn,
        Err(e) => {
            let _ = ready.send(Err(Fail::Sql(e)));
            return;
        }
    };
    let is_file = matches!(config.location, Location::File(_));
    let wal = match setup(
        &mut conn,
        &config.table,
        is_file,
        config.busy_timeout,
        config.max_size,
    ) {
        Ok(wal) => wal,
        Err(fail) => {
            let _ = ready.send(Err(fail));
            return;
        }
    };
    let mut stmts = match Stmts::prepare(&conn, &Sql::new(&config.table)) {
        Ok(stmts) => stmts,
        Err(e) => {
            let _ = ready.send(Err(Fail::Sql(e)));
            return;
        }
    };
    if ready.send(Ok(wal)).is_err() {
        return;
    }
    let mut batch: Vec<Box<dyn WriteJob>> = Vec::new();
    let mut next = None;
    loop {
        let msg = match next.take() {
            Some(msg) => msg,
            None => match rx.recv() {
                Ok(msg) => msg,
                Err(_) => return,
            },
        };
        match msg {
            Msg::Load(load) => load.answer(&mut stmts.load),
            Msg::Write(job) => {
                batch.push(job);
                while batch.len() < MAX_BATCH {
                    match rx.try_recv() {
                        Ok(Msg::Write(job)) => batch.push(job),
                        Ok(load) => {
                            next = Some(load);
                            break;
                        }
                        Err(TryRecvError::Empty | TryRecvError::Disconnected) => break,
                    }
                }
                commit(&mut stmts, &mut batch);
            }
        }
    }
}

/// Pragmas, schema creation and the schema version check, on the writer thread; answers whether
/// the database is in WAL mode.
fn setup(
    c: &mut rusqlite::Connection,
    table: &str,
    is_file: bool,
    busy: Duration,
    max_size: Option<u64>,
) -> Result<bool, Fail> {
    c.busy_timeout(setup_timeout(busy))?;
    if c.is_readonly(rusqlite::MAIN_DB)? {
        return Err(Fail::Setup(
            "the database is read-only, and a session store must write".to_owned(),
        ));
    }
    let mut wal = false;
    if is_file {
        // WAL: readers never block the writer; NORMAL: no fsync per commit (a commit survives a
        // process crash, not a power cut before the next checkpoint).
        let mode: String = c.query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0))?;
        wal = mode.eq_ignore_ascii_case("wal");
        if !wal {
            crate::trace::event!(
                warn,
                "hyper-sessions: SQLite kept journal_mode={mode} (WAL unavailable); loads run \
                 on the writer's connection"
            );
        }
        c.execute_batch(
            "PRAGMA synchronous = NORMAL; PRAGMA journal_size_limit = 67108864; \
             PRAGMA temp_store = MEMORY;",
        )?;
    }
    c.execute_batch("PRAGMA cache_size = -8192;")?;
    if let Some(bytes) = max_size {
        let page: i64 = c.query_row("PRAGMA page_size", [], |r| r.get(0))?;
        let pages = i64::try_from(bytes).unwrap_or(i64::MAX) / page.max(512);
        c.query_row(
            &format!("PRAGMA max_page_count = {}", pages.max(1)),
            [],
            |_| Ok(()),
        )?;
    }
    let tx = c.transaction_with_behavior(TransactionBehavior::Immediate)?;
    tx.execute_batch(&format!(
        "CREATE TABLE IF NOT EXISTS {SCHEMA_TABLE} \
         (table_name TEXT PRIMARY KEY NOT NULL, version INTEGER NOT NULL) WITHOUT ROWID;"
    ))?;
    let version: Option<i64> = tx
        .query_row(
            &format!("SELECT version FROM {SCHEMA_TABLE} WHERE table_name = ?1"),
            [table],
            |r| r.get(0),
        )
        .optional()?;
    match version {
        Some(v) if v > SCHEMA_VERSION => {
            return Err(Fail::Setup(format!(
                "table \"{table}\" has schema version {v}, written by a newer release \
                 (this one knows up to {SCHEMA_VERSION})"
            )));
        }
        Some(_) => {}
        None => {
            let exists: bool = tx.query_row(
                "SELECT EXISTS (SELECT 1 FROM sqlite_schema WHERE type = 'table' AND name = ?1)",
                [table],
                |r| r.get(0),
            )?;
            if exists {
                return Err(Fail::Setup(format!(
                    "a table \"{table}\" exists that this store did not create; \
                     choose another table name"
                )));
            }
            tx.execute_batch(&format!(
                "CREATE TABLE \"{table}\" (\
                   id BLOB PRIMARY KEY NOT NULL, \
                   data BLOB NOT NULL, \
                   version INTEGER NOT NULL, \
                   expires_at INTEGER NOT NULL\
                 ) WITHOUT ROWID; \
                 CREATE INDEX \"{table}_expires_at\" ON \"{table}\" (expires_at);"
            ))?;
            tx.execute(
                &format!("INSERT INTO {SCHEMA_TABLE} (table_name, version) VALUES (?1, ?2)"),
                params![table, SCHEMA_VERSION],
            )?;
        }
    }
    // The columns every statement uses must be there (a table altered by hand is refused here,
    // not on the first request).
    tx.prepare(&format!(
        "SELECT id, data, version, expires_at FROM \"{table}\" LIMIT 0"
    ))
    .map_err(|e| {
        Fail::Setup(format!(
            "table \"{table}\" does not have the session columns: {e}"
        ))
    })?;
    tx.commit()?;
    c.busy_handler(Some(wait_for_lock))?;
    Ok(wal)
}

fn validate_table_name(name: &str) -> Result<(), StoreError> {
    let bytes = name.as_bytes();
    let valid = !bytes.is_empty()
        && bytes.len() <= MAX_TABLE_NAME
        && !bytes[0].is_ascii_digit()
        && bytes
            .iter()
            .all(|&b| b.is_ascii_alphanumeric() || b == b'_')
        && !name.to_ascii_lowercase().starts_with("sqlite_")
        && !name.eq_ignore_ascii_case(SCHEMA_TABLE);
    if valid {
        Ok(())
    } else {
        Err(StoreError::other(format!(
            "invalid SQLite table name {:?}: use 1 to {MAX_TABLE_NAME} ASCII letters, digits and \
             underscores, not starting with a digit or `sqlite_`",
            name.chars().take(80).collect::<String>()
        )))
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

/// Loads a row: on the reader with the fewest loads queued, or on the writer thread when there
/// are no readers.
async fn load(inner: &Inner, key: [u8; 16]) -> Result<Option<Stored>, StoreError> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    let job = Load {
        key,
        deadline: deadline_after(inner.busy_timeout),
        tx,
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
        None => inner.tx.send(Msg::Load(job)).is_ok(),
    };
    if !sent {
        return Err(thread_stopped("load", &inner.label));
    }
    match rx.await {
        Ok(result) => result.map_err(|e| fail_error("load", &inner.label, e)),
        Err(_) => Err(thread_stopped("load", &inner.label)),
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

/// One queued write: its statement(s), its deadline, and where its outcome goes once committed.
trait WriteJob: Send {
    /// Until when it may wait for another connection's lock.
    fn deadline(&self) -> Instant;
    /// Runs the statements (again, if a batch had to be retried one by one).
    fn run(&mut self, s: &mut Stmts<'_>) -> Result<(), Fail>;
    /// Sends the outcome: the statements' result if their transaction committed.
    fn finish(&mut self, committed: Result<(), Fail>);
}

struct Job<T, F> {
    f: F,
    deadline: Instant,
    out: Option<T>,
    tx: Option<tokio::sync::oneshot::Sender<Result<T, Fail>>>,
}

impl<T, F> WriteJob for Job<T, F>
where
    T: Send,
    F: Fn(&mut Stmts<'_>) -> Result<T, Fail> + Send,
{
    fn deadline(&self) -> Instant {
        self.deadline
    }

    fn run(&mut self, s: &mut Stmts<'_>) -> Result<(), Fail> {
        self.out = Some((self.f)(s)?);
        Ok(())
    }

    fn finish(&mut self, committed: Result<(), Fail>) {
        let result = committed.and_then(|()| {
            self.out
                .take()
                .ok_or_else(|| Fail::Setup("write was not run".to_owned()))
        });
        if let Some(tx) = self.tx.take() {
            let _ = tx.send(result);
        }
    }
}

/// The most writes committed together.
const MAX_BATCH: usize = 256;

/// On the writer thread: commits `jobs` in one transaction (and empties it), each write
/// waiting for another connection's lock until its own deadline at most.
///
/// While the lock is held elsewhere, `BEGIN IMMEDIATE` waits until the earliest deadline among
/// the writes; when that passes, the writes whose deadline has passed fail as unavailable (none
/// of them ran) and the rest wait on until the next one. If anything else fails, the batch is
/// rolled back and each write is run again on its own, so that one write's failure (a full
/// database, say) is reported to that write only; no write is reported done unless committed.
fn commit(s: &mut Stmts<'_>, jobs: &mut Vec<Box<dyn WriteJob>>) {
    while jobs.len() > 1 {
        DEADLINE.set(jobs.iter().map(|job| job.deadline()).min());
        match s.begin.execute([]) {
            Ok(_) => {}
            Err(e) if is_busy(&e) => {
                let now = Instant::now();
                let before = jobs.len();
                jobs.retain_mut(|job| {
                    let late = job.deadline() <= now;
                    if late {
                        job.finish(Err(Fail::Busy));
                    }
                    !late
                });
                if jobs.len() == before {
                    // Busy before any deadline (not from a lock wait): each on its own.
                    break;
                }
                continue;
            }
            Err(_) => break,
        }
        let batch = (|| -> Result<(), Fail> {
            for job in jobs.iter_mut() {
                job.run(s)?;
            }
            s.commit.execute([])?;
            Ok(())
        })();
        if batch.is_ok() {
            for mut job in jobs.drain(..) {
                job.finish(Ok(()));
            }
            return;
        }
        if !s.conn.is_autocommit() {
            let _ = s.conn.execute_batch("ROLLBACK");
        }
        break;
    }
    // One write, or a batch being retried: each in its own (autocommit) transaction.
    for mut job in jobs.drain(..) {
        DEADLINE.set(Some(job.deadline()));
        let result = job.run(s);
        job.finish(result);
    }
}

/// Whether `SQLite` gave up waiting for another connection's lock.
fn is_busy(e: &rusqlite::Error) -> bool {
    e.sqlite_error_code() == Some(ErrorCode::DatabaseBusy)
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

async fn clean_forever(store: Weak<Inner>, interval: Duration) {
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ticker.tick().await;
    loop {
        ticker.tick().await;
        let Some(inner) = store.upgrade() else { return };
        match delete_expired(&inner).await {
            Ok(n) if n > 0 => {
                crate::trace::event!(debug, "hyper-sessions: deleted {n} expired SQLite sessions");
            }
            Ok(_) => {}
            Err(e) => crate::trace::event!(
                warn,
                "hyper-sessions: cleaning expired sessions failed: {}",
                crate::error::Chain(&e)
            ),
        }
    }
}

impl fmt::Debug for SqliteStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SqliteStore")
            .field("location", &self.inner.label)
            .finish_non_exhaustive()
    }
}

/// A row as read back, before it becomes a [`Record`].
struct Stored {
    data: Bytes,
    version: u64,
    expires_ms: i64,
}

impl Stored {
    fn into_record(self, key: Key) -> Record {
        Record::new(
            key,
            self.data,
            self.version,
            from_unix_ms(u64::try_from(self.expires_ms).unwrap_or(0)),
        )
    }
}

/// Reads `data, version, expires_at` strictly: any other type is a corrupt row.
fn read_row(row: &Row<'_>) -> Result<Stored, Fail> {
    let data = match row.get_ref(0)? {
        ValueRef::Blob(b) | ValueRef::Text(b) => Bytes::copy_from_slice(b),
        other => return Err(Fail::corrupt("data", other, "a BLOB")),
    };
    let version = match row.get_ref(1)? {
        ValueRef::Integer(v) if v >= 0 => u64::try_from(v).unwrap_or(0),
        other => return Err(Fail::corrupt("version", other, "a non-negative INTEGER")),
    };
    let expires_ms = match row.get_ref(2)? {
        ValueRef::Integer(v) => v,
        other => return Err(Fail::corrupt("expires_at", other, "an INTEGER (Unix ms)")),
    };
    Ok(Stored {
        data,
        version,
        expires_ms,
    })
}

fn load_row(load: &mut Statement<'_>, id: &[u8; 16]) -> Result<Option<Stored>, Fail> {
    let mut rows = load.query(params![id])?;
    match rows.next()? {
        Some(row) => read_row(row).map(Some),
        None => Ok(None),
    }
}

impl SessionStore for SqliteStore {
    async fn load(&self, key: &Key) -> Result<Option<Record>, StoreError> {
        let (key, bytes) = (*key, key.to_bytes());
        let stored = load(&self.inner, bytes)
            .await
            .map_err(|e| name_row(e, key))?;
        Ok(stored.map(|s| s.into_record(key)))
    }

    async fn create(&self, record: &Record) -> Result<CreateOutcome, StoreError> {
        let key = record.key().to_bytes();
        let data = record.data().clone();
        let version = version_param(record.version())?;
        let expires = ms(record.expires_at());
        let n = write(&self.inner, "create", move |s| {
            Ok(s.create
                .execute(params![key, &data[..], version, expires])?)
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
        write(&self.inner, "save", move |s| {
            if let Some(expected) = expected {
                let args = params![key, &data[..], version, expires, expected];
                // Most saves keep the stored expiry (the core slides it only now and then). An
                // UPDATE that names `expires_at` rewrites its index entry even when the value is
                // the same (about 8,000 instructions and one more WAL page per commit), so that
                // case goes first, without it; a changed expiry matches no row there and takes
                // the full statement. Each statement checks the version on its own, so either is
                // a compare-and-set.
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

/// What went wrong on a store thread.
#[derive(Debug)]
enum Fail {
    Sql(rusqlite::Error),
    /// Another connection held the lock past the write's deadline, before the write ran.
    Busy,
    /// A row whose columns have the wrong types.
    Corrupt(String),
    /// The database or table cannot be used by this store.
    Setup(String),
}

impl Fail {
    fn corrupt(column: &str, value: ValueRef<'_>, expected: &str) -> Self {
        let found = match value {
            ValueRef::Null => Cow::Borrowed("NULL"),
            ValueRef::Integer(v) => Cow::Owned(format!("the INTEGER {v}")),
            ValueRef::Real(_) => Cow::Borrowed("a REAL"),
            ValueRef::Text(_) => Cow::Borrowed("TEXT"),
            ValueRef::Blob(_) => Cow::Borrowed("a BLOB"),
        };
        Fail::Corrupt(format!(
            "column {column} holds {found}, expected {expected}"
        ))
    }
}

impl From<rusqlite::Error> for Fail {
    fn from(e: rusqlite::Error) -> Self {
        Fail::Sql(e)
    }
}

/// An `SQLite` failure with what was being done, where, and why.
#[derive(Debug)]
struct SqliteError {
    message: String,
    source: Option<rusqlite::Error>,
}

impl fmt::Display for SqliteError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for SqliteError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source
            .as_ref()
            .map(|e| e as &(dyn std::error::Error + 'static))
    }
}

fn fail_error(op: &str, label: &str, fail: Fail) -> StoreError {
    match fail {
        Fail::Sql(e) => sql_error(op, label, e),
        Fail::Busy => StoreError::unavailable(SqliteError {
            message: format!("{op} on {label}: {BUSY}"),
            source: None,
        }),
        Fail::Corrupt(what) => StoreError::corrupt(SqliteError {
            message: format!("{op} on {label}: unreadable row: {what}"),
            source: None,
        }),
        Fail::Setup(what) => StoreError::other(SqliteError {
            message: format!("{op} on {label}: {what}"),
            source: None,
        }),
    }
}

fn thread_stopped(op: &str, label: &str) -> StoreError {
    StoreError::unavailable(SqliteError {
        message: format!("{op} on {label}: the SQLite connection thread has stopped"),
        source: None,
    })
}

/// Why an operation that waited for a lock until its deadline failed.
const BUSY: &str = "the database is locked by another connection (busy timeout exceeded)";

/// Classifies an `SQLite` error, with a plain-words reason for the common causes.
fn sql_error(op: &str, label: &str, e: rusqlite::Error) -> StoreError {
    let (unavailable, reason) = match e.sqlite_error_code() {
        Some(ErrorCode::DatabaseBusy | ErrorCode::DatabaseLocked) => (true, BUSY),
        Some(ErrorCode::DiskFull) => (true, "the disk (or the store's max_size) is full"),
        Some(ErrorCode::SystemIoFailure) => (true, "disk I/O error"),
        Some(ErrorCode::OutOfMemory) => (true, "SQLite is out of memory"),
        Some(ErrorCode::ReadOnly) => (false, "the database is read-only"),
        Some(ErrorCode::CannotOpen) => (
            false,
            "cannot open the database file (does its directory exist and is it writable?)",
        ),
        Some(ErrorCode::PermissionDenied) => (false, "permission denied"),
        Some(ErrorCode::NotADatabase) => (false, "the file is not an SQLite database"),
        Some(ErrorCode::DatabaseCorrupt) => (false, "the database file is corrupt"),
        _ => (false, "SQLite error"),
    };
    let err = SqliteError {
        message: format!("{op} on {label}: {reason}"),
        source: Some(e),
    };
    if unavailable {
        StoreError::unavailable(err)
    } else {
        StoreError::other(err)
    }
}

/// Adds which row to a corrupt-row error: the key's fingerprint only.
fn name_row(e: StoreError, key: Key) -> StoreError {
    if !e.is_corrupt() {
        return e;
    }
    StoreError::corrupt(SqliteError {
        message: format!("session row {}…: {}", key.fingerprint(), ErrorSource(&e)),
        source: None,
    })
}

/// The message of a store error's cause.
struct ErrorSource<'a>(&'a StoreError);

impl fmt::Display for ErrorSource<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match std::error::Error::source(self.0) {
            Some(cause) => write!(f, "{cause}"),
            None => write!(f, "{}", self.0),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_names() {
        for good in ["sessions", "_s", "Web_Sessions_2", &"a".repeat(64)] {
            assert!(validate_table_name(good).is_ok(), "{good}");
        }
        for bad in [
            "",
            "1abc",
            "a b",
            "sessions\"; DROP TABLE x; --",
            "sqlite_master",
            "SQLITE_x",
            "hyper_sessions_schema",
            "täble",
            &"a".repeat(65),
        ] {
            let err = validate_table_name(bad).unwrap_err();
            assert!(
                std::error::Error::source(&err)
                    .unwrap()
                    .to_string()
                    .contains("invalid SQLite table name")
            );
        }
    }

    #[test]
    fn corrupt_errors_name_only_the_keys_fingerprint() {
        let key = Key::random();
        let e = StoreError::corrupt(SqliteError {
            message: "load: unreadable row: column version holds TEXT".into(),
            source: None,
        });
        let named = name_row(e, key);
        let text = crate::error::Chain(&named).to_string();
        let full = key.to_hex();
        assert!(text.contains(&full[..8]), "{text}");
        assert!(!text.contains(&full[..9]), "{text}");
        assert!(text.contains("column version holds TEXT"), "{text}");
    }
}
