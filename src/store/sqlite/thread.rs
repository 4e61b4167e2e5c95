//! The store's threads: the writer, which owns the read-write connection and commits the
//! writes queued behind each other in one transaction, and the readers, each with a read-only
//! connection; how long every connection waits for another's lock; rows as read back.

use std::cell::Cell;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, TryRecvError};
use std::time::{Duration, Instant};

use bytes::Bytes;
use rusqlite::{self, ErrorCode, Row, Statement, params, types::ValueRef};

use super::error::{Fail, SqliteError};
use super::schema::{Sql, setup};
use super::{Location, SqliteStoreBuilder};
use crate::error::StoreError;
use crate::key::Key;
use crate::store::{Record, from_unix_ms};

/// A piece of work for the writer thread.
pub(super) enum Msg {
    /// A read, when there are no reader threads: run at once (outside any write batch).
    Read(Read),
    /// A write, committed together with the writes queued right behind it.
    Write(Box<dyn WriteJob>),
}

/// A read: a load or an owner's listing, when it must give up waiting for a lock, and where
/// its rows go.
pub(super) struct Read {
    pub(super) query: Query,
    pub(super) deadline: Instant,
}

/// What a [`Read`] asks, and where its answer goes.
pub(super) enum Query {
    /// The live row with this id.
    Load {
        key: [u8; 16],
        tx: tokio::sync::oneshot::Sender<Result<Option<Stored>, Fail>>,
    },
    /// The live rows of this owner.
    Owned {
        owner: Arc<str>,
        tx: tokio::sync::oneshot::Sender<Result<Vec<Record>, Fail>>,
    },
}

/// The statements a read runs: prepared once per connection (a reader's, or the writer's).
pub(super) struct ReadStmts<'c> {
    pub(super) load: Statement<'c>,
    pub(super) owned: Statement<'c>,
}

impl<'c> ReadStmts<'c> {
    fn prepare(conn: &'c rusqlite::Connection, sql: &Sql) -> rusqlite::Result<Self> {
        Ok(ReadStmts {
            load: conn.prepare(&sql.load)?,
            owned: conn.prepare(&sql.owned)?,
        })
    }
}

impl Read {
    /// Runs the read on its prepared statement and sends its answer.
    fn answer(self, stmts: &mut ReadStmts<'_>) {
        DEADLINE.set(Some(self.deadline));
        match self.query {
            Query::Load { key, tx } => {
                let _ = tx.send(load_row(&mut stmts.load, &key));
            }
            Query::Owned { owner, tx } => {
                let _ = tx.send(owned_rows(&mut stmts.owned, &owner));
            }
        }
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
pub(super) fn wait_for_lock(attempt: i32) -> bool {
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
pub(super) fn deadline_after(timeout: Duration) -> Instant {
    let now = Instant::now();
    now.checked_add(timeout)
        .unwrap_or_else(|| now + Duration::from_secs(365 * 86_400))
}

/// The statements, prepared once on the writer thread for the connection's lifetime.
pub(super) struct Stmts<'c> {
    pub(super) conn: &'c rusqlite::Connection,
    pub(super) read: ReadStmts<'c>,
    pub(super) create: Statement<'c>,
    pub(super) save: Statement<'c>,
    pub(super) save_same_expiry: Statement<'c>,
    pub(super) exists: Statement<'c>,
    pub(super) delete: Statement<'c>,
    pub(super) touch: Statement<'c>,
    pub(super) remove: Statement<'c>,
    pub(super) delete_expired: Statement<'c>,
    pub(super) begin: Statement<'c>,
    pub(super) commit: Statement<'c>,
}

impl<'c> Stmts<'c> {
    fn prepare(conn: &'c rusqlite::Connection, sql: &Sql) -> rusqlite::Result<Self> {
        Ok(Stmts {
            conn,
            read: ReadStmts::prepare(conn, sql)?,
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

/// Starts a thread of the store's.
pub(super) fn spawn(
    name: &str,
    label: &str,
    f: impl FnOnce() + Send + 'static,
) -> Result<(), StoreError> {
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
pub(super) fn setup_timeout(busy: Duration) -> Duration {
    busy.min(Duration::from_millis(i32::MAX.unsigned_abs().into()))
}

/// A reader thread: opens a read-only connection on the file (already in WAL mode, the table
/// made), prepares the read statements, answers `ready`, then runs reads until every sender is
/// gone.
pub(super) fn serve_reads(
    path: &Path,
    table: &str,
    busy: Duration,
    rx: &Receiver<Read>,
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
    let mut stmts = match ReadStmts::prepare(&conn, &Sql::new(table)) {
        Ok(stmts) => stmts,
        Err(e) => {
            let _ = ready.send(Err(Fail::Sql(e)));
            return;
        }
    };
    if ready.send(Ok(())).is_err() {
        return;
    }
    while let Ok(job) = rx.recv() {
        job.answer(&mut stmts);
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
pub(super) fn serve(
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
            Msg::Read(read) => read.answer(&mut stmts.read),
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

/// One queued write: its statement(s), its deadline, and where its outcome goes once committed.
pub(super) trait WriteJob: Send {
    /// Until when it may wait for another connection's lock.
    fn deadline(&self) -> Instant;
    /// Runs the statements (again, if a batch had to be retried one by one).
    fn run(&mut self, s: &mut Stmts<'_>) -> Result<(), Fail>;
    /// Sends the outcome: the statements' result if their transaction committed.
    fn finish(&mut self, committed: Result<(), Fail>);
}

pub(super) struct Job<T, F> {
    pub(super) f: F,
    pub(super) deadline: Instant,
    pub(super) out: Option<T>,
    pub(super) tx: Option<tokio::sync::oneshot::Sender<Result<T, Fail>>>,
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

/// A row as read back, before it becomes a [`Record`].
pub(super) struct Stored {
    pub(super) data: Bytes,
    pub(super) version: u64,
    pub(super) expires_ms: i64,
    pub(super) owner: Option<Arc<str>>,
}

impl Stored {
    pub(super) fn into_record(self, key: Key) -> Record {
        Record::new(
            key,
            self.data,
            self.version,
            from_unix_ms(u64::try_from(self.expires_ms).unwrap_or(0)),
        )
        .with_owner(self.owner)
    }
}

/// Reads `data, version, expires_at, owner` (from column `at` on) strictly: any other type,
/// or an owner that is not UTF-8, is a corrupt row. `owner` is the owner the rows were
/// selected by, if any: shared by each row instead of copied.
fn read_row(row: &Row<'_>, at: usize, owner: Option<&Arc<str>>) -> Result<Stored, Fail> {
    let data = match row.get_ref(at)? {
        ValueRef::Blob(b) | ValueRef::Text(b) => Bytes::copy_from_slice(b),
        other => return Err(Fail::corrupt("data", other, "a BLOB")),
    };
    let version = match row.get_ref(at + 1)? {
        ValueRef::Integer(v) if v >= 0 => u64::try_from(v).unwrap_or(0),
        other => return Err(Fail::corrupt("version", other, "a non-negative INTEGER")),
    };
    let expires_ms = match row.get_ref(at + 2)? {
        ValueRef::Integer(v) => v,
        other => return Err(Fail::corrupt("expires_at", other, "an INTEGER (Unix ms)")),
    };
    // The owner names a user: an error says what kind of value it found, never the value.
    let owner = match (row.get_ref(at + 3)?, owner) {
        (ValueRef::Null, _) => None,
        (ValueRef::Text(text), Some(owner)) if text == owner.as_bytes() => Some(owner.clone()),
        (ValueRef::Text(text), _) => match std::str::from_utf8(text) {
            Ok(text) => Some(Arc::from(text)),
            Err(_) => {
                return Err(Fail::Corrupt(
                    "column owner holds TEXT that is not UTF-8".to_owned(),
                ));
            }
        },
        (other, _) => return Err(Fail::corrupt_owner(other)),
    };
    Ok(Stored {
        data,
        version,
        expires_ms,
        owner,
    })
}

fn load_row(load: &mut Statement<'_>, id: &[u8; 16]) -> Result<Option<Stored>, Fail> {
    let mut rows = load.query(params![id])?;
    match rows.next()? {
        Some(row) => read_row(row, 0, None).map(Some),
        None => Ok(None),
    }
}

/// The live rows of `owner` as records; one unreadable row fails the listing (as corrupt).
fn owned_rows(stmt: &mut Statement<'_>, owner: &Arc<str>) -> Result<Vec<Record>, Fail> {
    let mut rows = stmt.query(params![&**owner])?;
    let mut records = Vec::new();
    while let Some(row) = rows.next()? {
        let key = match row.get_ref(0)? {
            ValueRef::Blob(b) => <[u8; 16]>::try_from(b).ok(),
            _ => None,
        };
        let Some(key) = key else {
            return Err(Fail::Corrupt("column id is not a 16-byte BLOB".to_owned()));
        };
        let key = Key::from_bytes(key);
        // Named by the key's fingerprint, as a load names its row.
        let stored = read_row(row, 1, Some(owner)).map_err(|fail| match fail {
            Fail::Corrupt(what) => {
                Fail::Corrupt(format!("session row {}…: {what}", key.fingerprint()))
            }
            other => other,
        })?;
        records.push(stored.into_record(key));
    }
    Ok(records)
}
