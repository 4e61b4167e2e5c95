//! The session table, its schema version and the statements: created and checked when the
//! store opens, the statements prepared once per connection.

use std::time::Duration;

use rusqlite::{self, OptionalExtension, TransactionBehavior, params};

use super::error::Fail;
use super::thread::{setup_timeout, wait_for_lock};
use crate::error::StoreError;

/// The schema version this release writes and reads.
///
/// Version 1: `id`, `data`, `version`, `expires_at`, indexed on `expires_at`. Version 2 adds
/// the nullable `owner TEXT` column and its partial index (`WHERE owner IS NOT NULL`); a
/// version-1 table is migrated when a store of this release opens it (see [`setup`]).
const SCHEMA_VERSION: i64 = 2;

/// The table that records each session table's schema version (one row per table).
const SCHEMA_TABLE: &str = "hyper_sessions_schema";

/// The longest table name accepted.
const MAX_TABLE_NAME: usize = 64;

/// The statements, with the table name quoted in.
pub(super) struct Sql {
    pub(super) load: String,
    pub(super) create: String,
    pub(super) save: String,
    /// [`save`](Sql::save) of a record whose expiry is the stored one: `expires_at` is left out
    /// of the `SET`, so `SQLite` leaves the expiry index alone.
    pub(super) save_same_expiry: String,
    pub(super) exists: String,
    pub(super) delete: String,
    pub(super) touch: String,
    pub(super) remove: String,
    pub(super) delete_expired: String,
    /// An owner's live rows, through the owner index.
    pub(super) owned: String,
}

/// The current time in integer Unix milliseconds, read by `SQLite` when the statement runs:
/// once per statement, after it has taken its lock, so that a write that waited for another
/// connection's lock checks the expiry at the time it is made, not at the time it was asked for.
/// (`unixepoch('subsec')` is the system clock's milliseconds as a float; rounding brings back the
/// exact integer, the same one [`unix_ms`](crate::unix_ms) computes from
/// [`SystemTime::now`](std::time::SystemTime::now).)
const NOW: &str = "CAST(round(unixepoch('subsec') * 1000) AS INTEGER)";

impl Sql {
    pub(super) fn new(table: &str) -> Self {
        let t = format!("\"{table}\"");
        Sql {
            load: format!(
                "SELECT data, version, expires_at, owner FROM {t} \
                 WHERE id = ?1 AND expires_at > {NOW}"
            ),
            create: format!(
                "INSERT INTO {t} (id, data, version, expires_at, owner) \
                 VALUES (?1, ?2, ?3, ?4, ?5) \
                 ON CONFLICT (id) DO UPDATE SET data = excluded.data, version = excluded.version, \
                 expires_at = excluded.expires_at, owner = excluded.owner \
                 WHERE {t}.expires_at <= {NOW}"
            ),
            save: format!(
                "UPDATE {t} SET data = ?2, version = ?3, expires_at = ?4, owner = ?6 \
                 WHERE id = ?1 AND version = ?5 AND expires_at > {NOW}"
            ),
            // Neither the expiry nor the owner named in the `SET`: their indexes are left alone.
            save_same_expiry: format!(
                "UPDATE {t} SET data = ?2, version = ?3 \
                 WHERE id = ?1 AND version = ?5 AND expires_at = ?4 AND owner IS ?6 \
                 AND expires_at > {NOW}"
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
            owned: format!(
                "SELECT id, data, version, expires_at, owner FROM {t} \
                 WHERE owner = ?1 AND expires_at > {NOW}"
            ),
        }
    }
}

/// Pragmas, schema creation and the schema version check, on the writer thread; answers whether
/// the database is in WAL mode.
pub(super) fn setup(
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
        Some(SCHEMA_VERSION) => {}
        Some(v) => migrate(&tx, table, v)?,
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
                   expires_at INTEGER NOT NULL, \
                   owner TEXT\
                 ) WITHOUT ROWID; \
                 CREATE INDEX \"{table}_expires_at\" ON \"{table}\" (expires_at); \
                 {}",
                owner_index(table)
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
        "SELECT id, data, version, expires_at, owner FROM \"{table}\" LIMIT 0"
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

/// The owner index: partial, so that sessions without an owner cost it nothing. A query's
/// `owner = ?` implies `owner IS NOT NULL`, so `SQLite` uses it for `owned`.
fn owner_index(table: &str) -> String {
    format!("CREATE INDEX \"{table}_owner\" ON \"{table}\" (owner) WHERE owner IS NOT NULL;")
}

/// Brings a table of an older schema version up to [`SCHEMA_VERSION`], inside the setup's
/// transaction (so under its write lock, and all or nothing): version 1 gets the `owner` column
/// (`NULL` in every existing row: no row is rewritten) and its index.
fn migrate(tx: &rusqlite::Transaction<'_>, table: &str, from: i64) -> Result<(), Fail> {
    if from < 1 {
        return Err(Fail::Setup(format!(
            "table \"{table}\" has schema version {from}, which no release wrote"
        )));
    }
    if from < 2 {
        tx.execute_batch(&format!(
            "ALTER TABLE \"{table}\" ADD COLUMN owner TEXT; {}",
            owner_index(table)
        ))?;
    }
    tx.execute(
        &format!("UPDATE {SCHEMA_TABLE} SET version = ?2 WHERE table_name = ?1"),
        params![table, SCHEMA_VERSION],
    )?;
    Ok(())
}

pub(super) fn validate_table_name(name: &str) -> Result<(), StoreError> {
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
}
