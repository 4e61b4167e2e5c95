//! Listing one owner's sessions among many, per store:
//! `cargo bench --bench owners --features sqlite,postgres` (the PostgreSQL part needs the Debian
//! package `postgresql`; it runs `initdb` and `postgres` as the `postgres` user when run as root).
//!
//! Each store is filled with 1,000,000 live sessions (a 100-byte payload): 1,000 of the owner
//! listed, spread evenly through the fill (every 1,000th session, so never on neighbouring
//! pages), 899,000 over about 100,000 other owners (about 9 each) and 100,000 without an owner.
//! Then `SessionStore::owned` is timed for the listed owner, and for a typical one (9
//! sessions): one warm-up call, then the median and the slowest of 20. Each listing must answer
//! exactly the owner's sessions.
//!
//! The memory store is filled through `SessionStore::create`. The SQL stores are filled behind
//! the store's back, in their own table with its real indexes (the store created both when it
//! opened): one transaction with a prepared `INSERT` for `SQLite` (a file in a temporary
//! directory), one `INSERT ... SELECT FROM generate_series` for PostgreSQL (then `VACUUM
//! ANALYZE`, as autovacuum would do after such a fill); the fill is not what is measured.
//!
//! Then, per SQL store, the time to open a version-1 table (before owners) of as many sessions,
//! which the store migrates (adds the column, builds the owner index) before it answers.
//! `OWNERS_BENCH_SKIP=postgres` (or `sqlite`, `memory`, comma-separated) leaves stores out.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use hyper_sessions::store::{Key, Record, SessionStore};
use hyper_sessions::{Id, MemoryStore, PostgresStore, SqliteStore};

const SESSIONS: u64 = 1_000_000;
/// Every this many sessions, one is the listed owner's.
const EVERY: u64 = 1_000;
const LISTED: usize = (SESSIONS / EVERY) as usize;
/// The other owners the rest are spread over.
const OWNERS: u64 = 100_003;
const RUNS: usize = 20;
const TARGET: &str = "user:the-one-listed";
const PAYLOAD: usize = 100;

/// Who owns the `i`-th session of the fill (`i` from 1): the same rule for every store.
fn owner_of(i: u64) -> Option<String> {
    if i.is_multiple_of(EVERY) {
        Some(TARGET.to_owned())
    } else if i % 10 == 1 {
        None
    } else {
        Some(format!("user:{}", i % OWNERS))
    }
}

fn main() {
    let skip = std::env::var("OWNERS_BENCH_SKIP").unwrap_or_default();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    println!(
        "owned({TARGET:?}): {LISTED} sessions among {SESSIONS}; median and slowest of {RUNS} \
         listings"
    );
    rt.block_on(async {
        if !skip.contains("memory") {
            memory().await;
        }
        if !skip.contains("sqlite") {
            sqlite().await;
        }
        if !skip.contains("postgres") {
            postgres().await;
        }
    });
}

/// A typical other owner, listed too (about 9 sessions).
const TYPICAL: &str = "user:4242";

/// How many sessions of the fill `owner` has.
fn count_of(owner: &str) -> usize {
    (1..=SESSIONS)
        .filter(|&i| owner_of(i).as_deref() == Some(owner))
        .count()
}

/// Times `owned` for the listed owner and a typical one, and prints the median and the
/// slowest, in milliseconds.
async fn time_listing<S: SessionStore>(name: &str, store: &S) {
    for (owner, expected) in [(TARGET, LISTED), (TYPICAL, count_of(TYPICAL))] {
        let warm = store.owned(owner).await.unwrap();
        assert_eq!(warm.len(), expected, "{name}: the listing is not exact");
        let mut times = Vec::with_capacity(RUNS);
        for _ in 0..RUNS {
            let started = Instant::now();
            let listed = store.owned(owner).await.unwrap();
            times.push(started.elapsed());
            assert_eq!(listed.len(), expected, "{name}: the listing is not exact");
            assert!(listed.iter().all(|r| r.owner() == Some(owner)));
        }
        times.sort();
        let ms = |d: Duration| d.as_secs_f64() * 1000.0;
        println!(
            "{name:>10}: {expected:>5} sessions: {:8.3} ms median, {:8.3} ms slowest",
            ms(times[RUNS / 2]),
            ms(times[RUNS - 1])
        );
    }
}

fn expires_at() -> SystemTime {
    SystemTime::now() + Duration::from_secs(24 * 3600)
}

async fn memory() {
    let store = MemoryStore::builder()
        .max_sessions(2 * usize::try_from(SESSIONS).unwrap())
        .max_bytes(usize::MAX / 2)
        .build();
    let expires = expires_at();
    let started = Instant::now();
    for i in 1..=SESSIONS {
        let data = Bytes::from(vec![b'x'; PAYLOAD]);
        let record = Record::new(Key::of(Id::random()), data, 1, expires)
            .with_owner(owner_of(i).map(Arc::from));
        store.create(&record).await.unwrap();
    }
    eprintln!("memory: filled in {:.1} s", started.elapsed().as_secs_f64());
    assert_eq!(store.len(), usize::try_from(SESSIONS).unwrap());
    time_listing("memory", &store).await;
}

/// A directory of this run, removed when dropped.
struct Scratch(PathBuf);

impl Scratch {
    fn new(tag: &str) -> Scratch {
        let dir = std::env::temp_dir().join(format!(
            "hyper-sessions-owners-{tag}-{}",
            std::process::id()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Scratch(dir)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

async fn sqlite() {
    let dir = Scratch::new("sqlite");
    let path = dir.0.join("sessions.db");
    let store = SqliteStore::builder(&path)
        .cleanup_interval(None)
        .open()
        .await
        .unwrap();
    let started = Instant::now();
    let expires = i64::try_from(
        expires_at()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap()
            .as_millis(),
    )
    .unwrap();
    let mut c = rusqlite::Connection::open(&path).unwrap();
    c.busy_timeout(Duration::from_secs(30)).unwrap();
    let tx = c.transaction().unwrap();
    {
        let mut insert = tx
            .prepare(
                "INSERT INTO sessions (id, data, version, expires_at, owner) \
                 VALUES (?1, ?2, 1, ?3, ?4)",
            )
            .unwrap();
        let data = vec![b'x'; PAYLOAD];
        for i in 1..=SESSIONS {
            let key = Key::of(Id::random()).to_bytes();
            insert
                .execute(rusqlite::params![key, data, expires, owner_of(i)])
                .unwrap();
        }
    }
    tx.commit().unwrap();
    c.execute_batch("PRAGMA wal_checkpoint(TRUNCATE); ANALYZE;")
        .unwrap();
    eprintln!(
        "sqlite: filled in {:.1} s ({} MB)",
        started.elapsed().as_secs_f64(),
        std::fs::metadata(&path).unwrap().len() / 1_000_000
    );
    drop(c);
    time_listing("sqlite", &store).await;
    drop(store);
    sqlite_migration(&dir.0.join("v1.db")).await;
}

/// How long opening a version-1 table (before owners) of 1,000,000 sessions takes: the
/// migration adds the column and builds the owner index.
async fn sqlite_migration(path: &Path) {
    let mut c = rusqlite::Connection::open(path).unwrap();
    c.execute_batch(
        "PRAGMA journal_mode = WAL; \
         CREATE TABLE hyper_sessions_schema \
         (table_name TEXT PRIMARY KEY NOT NULL, version INTEGER NOT NULL) WITHOUT ROWID; \
         CREATE TABLE sessions (id BLOB PRIMARY KEY NOT NULL, data BLOB NOT NULL, \
         version INTEGER NOT NULL, expires_at INTEGER NOT NULL) WITHOUT ROWID; \
         CREATE INDEX sessions_expires_at ON sessions (expires_at); \
         INSERT INTO hyper_sessions_schema VALUES ('sessions', 1);",
    )
    .unwrap();
    let tx = c.transaction().unwrap();
    {
        let mut insert = tx
            .prepare("INSERT INTO sessions VALUES (?1, ?2, 1, 4102444800000)")
            .unwrap();
        let data = vec![b'x'; PAYLOAD];
        for _ in 0..SESSIONS {
            insert
                .execute(rusqlite::params![Key::of(Id::random()).to_bytes(), data])
                .unwrap();
        }
    }
    tx.commit().unwrap();
    drop(c);
    let started = Instant::now();
    let store = SqliteStore::builder(path)
        .cleanup_interval(None)
        .open()
        .await
        .unwrap();
    println!(
        "{:>10}: opening a version-1 table of {SESSIONS} sessions (the migration): {:.0} ms",
        "sqlite",
        started.elapsed().as_secs_f64() * 1000.0
    );
    drop(store);
}

async fn postgres() {
    let dir = Scratch::new("postgres");
    let server = Postgres::start(&dir.0).await;
    let url = format!("postgres://postgres@127.0.0.1:{}/postgres", server.port);
    let store = PostgresStore::builder()
        .cleanup_interval(None)
        .statement_timeout(Duration::from_secs(30))
        .open(&url)
        .await
        .unwrap();
    let (c, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(connection);
    let started = Instant::now();
    // The same rule as `owner_of`, in SQL; keys are the md5 of the row number (16 bytes).
    c.batch_execute(&format!(
        "INSERT INTO sessions (key, data, version, expires_at, owner) \
         SELECT decode(md5(i::text), 'hex'), convert_to(repeat('x', {PAYLOAD}), 'UTF8'), 1, \
           now() + interval '1 day', \
           CASE WHEN i % {EVERY} = 0 THEN '{TARGET}' WHEN i % 10 = 1 THEN NULL \
             ELSE 'user:' || (i % {OWNERS}) END \
         FROM generate_series(1, {SESSIONS}) AS i"
    ))
    .await
    .unwrap();
    c.batch_execute("VACUUM ANALYZE sessions").await.unwrap();
    let size: i64 = c
        .query_one("SELECT pg_total_relation_size('sessions')", &[])
        .await
        .unwrap()
        .get(0);
    eprintln!(
        "postgres: filled in {:.1} s ({} MB with indexes)",
        started.elapsed().as_secs_f64(),
        size / 1_000_000
    );
    let plan: Vec<String> = c
        .query(
            &format!(
                "EXPLAIN SELECT key, data, version, expires_at, owner FROM sessions \
                 WHERE owner = '{TARGET}' AND expires_at > clock_timestamp()"
            ),
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    eprintln!("postgres plan:\n  {}", plan.join("\n  "));
    time_listing("postgres", &store).await;
    // The server's part of a listing (the rest is the wire and decoding the rows).
    let analyzed: Vec<String> = c
        .query(
            &format!(
                "EXPLAIN (ANALYZE, BUFFERS) SELECT key, data, version, expires_at, owner \
                 FROM sessions WHERE owner = '{TARGET}' AND expires_at > clock_timestamp()"
            ),
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    eprintln!("postgres, on the server:\n  {}", analyzed.join("\n  "));

    // Opening a version-1 table (before owners) of as many sessions: the migration.
    c.batch_execute(&format!(
        "CREATE TABLE sessions_v1 (key bytea PRIMARY KEY CHECK (octet_length(key) = 16), \
           data bytea NOT NULL, version bigint NOT NULL, expires_at timestamptz NOT NULL) \
           WITH (fillfactor = 90); \
         CREATE INDEX sessions_v1_expires_at ON sessions_v1 (expires_at); \
         INSERT INTO hyper_sessions_schema (table_name, version) VALUES ('sessions_v1', 1); \
         INSERT INTO sessions_v1 (key, data, version, expires_at) \
         SELECT decode(md5(i::text), 'hex'), convert_to(repeat('x', {PAYLOAD}), 'UTF8'), 1, \
           now() + interval '1 day' FROM generate_series(1, {SESSIONS}) AS i"
    ))
    .await
    .unwrap();
    c.batch_execute("VACUUM ANALYZE sessions_v1").await.unwrap();
    let started = Instant::now();
    let migrated = PostgresStore::builder()
        .table("sessions_v1")
        .cleanup_interval(None)
        .statement_timeout(Duration::from_secs(30))
        .open(&url)
        .await
        .unwrap();
    println!(
        "{:>10}: opening a version-1 table of {SESSIONS} sessions (the migration): {:.0} ms",
        "postgres",
        started.elapsed().as_secs_f64() * 1000.0
    );
    drop(migrated);
    drop(store);
    drop(server);
}

/// A throwaway PostgreSQL server (as `benches/postgres.sh` starts one), killed when dropped.
struct Postgres {
    child: Child,
    port: u16,
}

impl Postgres {
    async fn start(dir: &Path) -> Postgres {
        let root = std::fs::metadata("/proc/self")
            .is_ok_and(|m| std::os::unix::fs::MetadataExt::uid(&m) == 0);
        if root {
            let ok = Command::new("chown")
                .args(["-R", "postgres:"])
                .arg(dir)
                .status()
                .is_ok_and(|s| s.success());
            assert!(ok, "cannot give {} to the postgres user", dir.display());
        }
        let command = |binary: &str| {
            let path = pg_bin(binary);
            if root {
                let mut c = Command::new("setpriv");
                c.args([
                    "--reuid=postgres",
                    "--regid=postgres",
                    "--clear-groups",
                    "--",
                ])
                .arg(path);
                c
            } else {
                Command::new(path)
            }
        };
        let data = dir.join("data");
        let out = command("initdb")
            .arg("-D")
            .arg(&data)
            .args(["-U", "postgres", "-A", "trust", "-E", "UTF8", "--no-locale"])
            .args(["--no-sync", "--no-instructions"])
            .output()
            .expect("initdb runs (apt-get install postgresql)");
        assert!(
            out.status.success(),
            "initdb failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let child = command("postgres")
            .arg("-D")
            .arg(&data)
            .args(["-p", &port.to_string(), "-h", "127.0.0.1", "-k"])
            .arg(dir)
            .args(["-c", "fsync=off", "-c", "shared_buffers=128MB"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("postgres runs");
        let server = Postgres { child, port };
        // Wait until it accepts a session, not only a connection.
        let url = format!("postgres://postgres@127.0.0.1:{port}/postgres");
        let deadline = Instant::now() + Duration::from_secs(30);
        while tokio_postgres::connect(&url, tokio_postgres::NoTls)
            .await
            .is_err()
        {
            assert!(Instant::now() < deadline, "postgres did not start");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        server
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-INT", &self.child.id().to_string()])
            .status();
        let _ = self.child.wait();
    }
}

/// A PostgreSQL server binary: under the newest `/usr/lib/postgresql/<version>/bin`, else on
/// `PATH`.
fn pg_bin(name: &str) -> PathBuf {
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let version = e.file_name().to_str()?.parse::<u32>().ok()?;
            let path = e.path().join("bin").join(name);
            path.is_file().then_some((version, path))
        })
        .collect();
    versions.sort();
    versions
        .pop()
        .map_or_else(|| PathBuf::from(name), |(_, p)| p)
}
