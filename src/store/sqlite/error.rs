//! What goes wrong on a store thread ([`Fail`]) and the [`StoreError`] it becomes: named by
//! the operation, the table and the file, never by a session's id.

use std::borrow::Cow;
use std::fmt;

use rusqlite::{self, ErrorCode, types::ValueRef};

use crate::error::StoreError;
use crate::key::Key;

/// What went wrong on a store thread.
#[derive(Debug)]
pub(super) enum Fail {
    Sql(rusqlite::Error),
    /// Another connection held the lock past the write's deadline, before the write ran.
    Busy,
    /// A row whose columns have the wrong types.
    Corrupt(String),
    /// The database or table cannot be used by this store.
    Setup(String),
}

impl Fail {
    pub(super) fn corrupt(column: &str, value: ValueRef<'_>, expected: &str) -> Self {
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

    /// An owner column of another type than TEXT: its type is said, never its value (an owner
    /// names a user).
    pub(super) fn corrupt_owner(value: ValueRef<'_>) -> Self {
        let found = match value {
            ValueRef::Null | ValueRef::Text(_) => "TEXT",
            ValueRef::Integer(_) => "an INTEGER",
            ValueRef::Real(_) => "a REAL",
            ValueRef::Blob(_) => "a BLOB",
        };
        Fail::Corrupt(format!("column owner holds {found}, expected TEXT or NULL"))
    }
}

impl From<rusqlite::Error> for Fail {
    fn from(e: rusqlite::Error) -> Self {
        Fail::Sql(e)
    }
}

/// An `SQLite` failure with what was being done, where, and why.
#[derive(Debug)]
pub(super) struct SqliteError {
    pub(super) message: String,
    pub(super) source: Option<rusqlite::Error>,
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

pub(super) fn fail_error(op: &str, label: &str, fail: Fail) -> StoreError {
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

pub(super) fn thread_stopped(op: &str, label: &str) -> StoreError {
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
pub(super) fn name_row(e: StoreError, key: Key) -> StoreError {
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
