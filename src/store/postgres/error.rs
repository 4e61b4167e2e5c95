//! What goes wrong talking to PostgreSQL ([`Fail`]) and the [`StoreError`] it becomes: named by
//! the operation and the table, never by a session's id, and never with a server message's
//! `DETAIL`, which can quote a row.

use std::error::Error as StdError;
use std::fmt;
use std::time::Duration;

use deadpool_postgres::{HookError, PoolError, TimeoutType};
use tokio_postgres::error::SqlState;

use crate::error::StoreError;
use crate::key::Key;

/// What went wrong.
#[derive(Debug)]
pub(super) enum Fail {
    Pg(tokio_postgres::Error),
    Pool(PoolError),
    /// The operation did not finish within the store's statement timeout.
    Timeout {
        after: Duration,
        /// Still waiting for a pooled connection (else for the statement's answer).
        for_connection: bool,
    },
    /// A row that cannot be read back.
    Corrupt(String),
    /// The database or table cannot be used by this store.
    Setup(String),
}

impl From<tokio_postgres::Error> for Fail {
    fn from(e: tokio_postgres::Error) -> Self {
        Fail::Pg(e)
    }
}

impl From<PoolError> for Fail {
    fn from(e: PoolError) -> Self {
        Fail::Pool(e)
    }
}

/// A PostgreSQL failure with what was being done, where, and why.
#[derive(Debug)]
pub(super) struct PostgresError {
    message: String,
    source: Option<Box<dyn StdError + Send + Sync>>,
}

impl PostgresError {
    pub(super) fn new(message: String, source: Option<Box<dyn StdError + Send + Sync>>) -> Self {
        PostgresError { message, source }
    }
}

impl fmt::Display for PostgresError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl StdError for PostgresError {
    fn source(&self) -> Option<&(dyn StdError + 'static)> {
        self.source
            .as_deref()
            .map(|e| e as &(dyn StdError + 'static))
    }
}

/// An error the server sent: its severity, SQLSTATE and primary message only. The rest of the
/// server's report (`DETAIL`, `HINT`, `WHERE`, the column and constraint fields) is left out:
/// a `DETAIL` can quote a row (`Key (key)=(\x…) already exists`, `Failing row contains …`), and
/// tokio-postgres prints it in its error's `Display` and `Debug`.
#[derive(Debug)]
pub(super) struct ServerError {
    severity: String,
    code: String,
    message: String,
}

impl fmt::Display for ServerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}: {}", self.severity, self.code, self.message)
    }
}

impl StdError for ServerError {}

/// Whether a failure is the store being unavailable (503), or something else (500).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Class {
    Unavailable,
    Other,
}

/// The class of a server error, and a plain-words reason for the common ones.
pub(super) fn classify_code(code: &SqlState) -> (Class, &'static str) {
    use Class::{Other, Unavailable};
    let c = code.code();
    match c {
        "25006" => (
            Unavailable,
            "the server is read-only (a standby, or default_transaction_read_only)",
        ),
        "40001" => (Unavailable, "serialization failure"),
        "40P01" => (Unavailable, "deadlock detected"),
        "57014" => (
            Unavailable,
            "the statement timed out (statement_timeout) or was cancelled",
        ),
        "55P03" => (Unavailable, "a lock was not available (lock_timeout)"),
        "57P01" | "57P02" => (Unavailable, "the server is shutting down"),
        "57P03" => (Unavailable, "the server is starting up or in recovery"),
        "53300" => (Unavailable, "the server has too many connections"),
        "53100" => (Unavailable, "the server's disk is full"),
        "53200" => (Unavailable, "the server is out of memory"),
        "42P01" => (
            Other,
            "the session table does not exist (dropped after the store opened?)",
        ),
        "42703" => (
            Other,
            "a session column does not exist (the table was altered?)",
        ),
        "42501" => (Other, "permission denied"),
        "3D000" => (Other, "the database does not exist"),
        "3F000" => (Other, "the schema does not exist"),
        _ if c.starts_with("08") => (Unavailable, "connection failure"),
        _ if c.starts_with("53") => (Unavailable, "the server is out of resources"),
        _ if c.starts_with("58") => (Unavailable, "the server had a system error"),
        _ if c.starts_with("28") => (Other, "authentication failed"),
        _ => (Other, "PostgreSQL error"),
    }
}

/// Classifies a tokio-postgres error: server errors by SQLSTATE (keeping only their
/// [`ServerError`] part), client-side ones by whether the connection failed.
fn classify(e: tokio_postgres::Error) -> (Class, &'static str, Box<dyn StdError + Send + Sync>) {
    if let Some(db) = e.as_db_error() {
        let (class, reason) = classify_code(db.code());
        let server = ServerError {
            severity: db.severity().to_owned(),
            code: db.code().code().to_owned(),
            message: db.message().chars().take(300).collect(),
        };
        return (class, reason, Box::new(server));
    }
    let mut io = false;
    let mut cause = e.source();
    while let Some(c) = cause {
        io |= c.is::<std::io::Error>();
        cause = c.source();
    }
    let text = e.to_string();
    if e.is_closed() {
        (Class::Unavailable, "the connection is closed", Box::new(e))
    } else if io {
        (Class::Unavailable, "cannot reach the server", Box::new(e))
    } else if text.starts_with("timeout") {
        (Class::Unavailable, "timed out", Box::new(e))
    } else {
        (Class::Other, "PostgreSQL client error", Box::new(e))
    }
}

/// Whether a server error says a prepared statement is stale: the table changed under it
/// (`cached plan must not change result type`) or the statement is gone.
pub(super) fn is_stale_statement(e: &tokio_postgres::Error) -> bool {
    e.code().is_some_and(|c| {
        *c == SqlState::FEATURE_NOT_SUPPORTED || *c == SqlState::INVALID_SQL_STATEMENT_NAME
    })
}

/// Whether a server error says the statement's transaction was rolled back for a conflict with
/// a concurrent one (a serialization failure under `REPEATABLE READ` or `SERIALIZABLE`
/// isolation, or a deadlock): it changed nothing, and running it again may succeed.
pub(super) fn is_transient_conflict(e: &tokio_postgres::Error) -> bool {
    e.code().is_some_and(|c| {
        *c == SqlState::T_R_SERIALIZATION_FAILURE || *c == SqlState::T_R_DEADLOCK_DETECTED
    })
}

pub(super) fn fail_error(op: &str, label: &str, fail: Fail) -> StoreError {
    let (class, reason, source): (Class, String, Option<Box<dyn StdError + Send + Sync>>) =
        match fail {
            Fail::Pg(e) => {
                let (class, reason, source) = classify(e);
                (class, reason.to_owned(), Some(source))
            }
            Fail::Pool(
                PoolError::Backend(e) | PoolError::PostCreateHook(HookError::Backend(e)),
            ) => {
                let (class, reason, source) = classify(e);
                (class, format!("cannot connect: {reason}"), Some(source))
            }
            Fail::Pool(PoolError::Timeout(t)) => (
                Class::Unavailable,
                match t {
                    TimeoutType::Wait => {
                        "no pooled connection became free in time (pool exhausted)"
                    }
                    TimeoutType::Create => "connecting to the server timed out",
                    TimeoutType::Recycle => "checking a pooled connection timed out",
                }
                .to_owned(),
                None,
            ),
            Fail::Pool(PoolError::Closed) => (
                Class::Unavailable,
                "the connection pool is closed".to_owned(),
                None,
            ),
            Fail::Pool(e) => (Class::Other, format!("connection pool error: {e}"), None),
            Fail::Timeout {
                after,
                for_connection,
            } => (
                Class::Unavailable,
                if for_connection {
                    format!(
                        "no connection within the statement timeout ({after:?}; pool exhausted or server unreachable)"
                    )
                } else {
                    format!("no answer within the statement timeout ({after:?})")
                },
                None,
            ),
            Fail::Corrupt(what) => {
                return StoreError::corrupt(PostgresError {
                    message: format!("{op} on {label}: unreadable row: {what}"),
                    source: None,
                });
            }
            Fail::Setup(what) => (Class::Other, what, None),
        };
    let err = PostgresError {
        message: format!("{op} on {label}: {reason}"),
        source,
    };
    match class {
        Class::Unavailable => StoreError::unavailable(err),
        Class::Other => StoreError::other(err),
    }
}

/// Adds which row to a corrupt-row error: the key's fingerprint only.
pub(super) fn name_row(e: StoreError, key: Key) -> StoreError {
    if !e.is_corrupt() {
        return e;
    }
    let cause = StdError::source(&e).map_or_else(|| e.to_string(), ToString::to_string);
    StoreError::corrupt(PostgresError {
        message: format!("session row {}…: {cause}", key.fingerprint()),
        source: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_errors_are_classified() {
        for (code, class) in [
            (SqlState::READ_ONLY_SQL_TRANSACTION, Class::Unavailable),
            (SqlState::T_R_SERIALIZATION_FAILURE, Class::Unavailable),
            (SqlState::T_R_DEADLOCK_DETECTED, Class::Unavailable),
            (SqlState::QUERY_CANCELED, Class::Unavailable),
            (SqlState::ADMIN_SHUTDOWN, Class::Unavailable),
            (SqlState::CRASH_SHUTDOWN, Class::Unavailable),
            (SqlState::CANNOT_CONNECT_NOW, Class::Unavailable),
            (SqlState::TOO_MANY_CONNECTIONS, Class::Unavailable),
            (SqlState::DISK_FULL, Class::Unavailable),
            (SqlState::CONNECTION_FAILURE, Class::Unavailable),
            (SqlState::IO_ERROR, Class::Unavailable),
            (SqlState::LOCK_NOT_AVAILABLE, Class::Unavailable),
            (SqlState::UNDEFINED_TABLE, Class::Other),
            (SqlState::INSUFFICIENT_PRIVILEGE, Class::Other),
            (SqlState::INVALID_PASSWORD, Class::Other),
            (SqlState::UNIQUE_VIOLATION, Class::Other),
        ] {
            assert_eq!(classify_code(&code).0, class, "{}", code.code());
        }
    }

    #[test]
    fn corrupt_errors_name_only_the_keys_fingerprint() {
        let key = Key::random();
        let e = fail_error(
            "load",
            "table \"public\".\"sessions\"",
            Fail::Corrupt("column version holds -1".into()),
        );
        let named = name_row(e, key);
        assert!(named.is_corrupt());
        let text = crate::error::Chain(&named).to_string();
        let full = key.to_hex();
        assert!(text.contains(&full[..8]), "{text}");
        assert!(!text.contains(&full[..9]), "{text}");
        assert!(text.contains("column version holds -1"), "{text}");
    }

    #[test]
    fn timeouts_are_unavailable() {
        let e = fail_error(
            "save",
            "t",
            Fail::Timeout {
                after: Duration::from_millis(300),
                for_connection: false,
            },
        );
        assert!(e.is_unavailable());
        let e = fail_error(
            "save",
            "t",
            Fail::Pool(PoolError::Timeout(TimeoutType::Wait)),
        );
        assert!(e.is_unavailable());
        assert!(
            crate::error::Chain(&e)
                .to_string()
                .contains("pool exhausted")
        );
    }
}
