//! The session table, its schema version and the statements: names checked before they reach
//! SQL, the table created and checked when the store opens.

use tokio_postgres::Client;

use super::error::Fail;
use crate::error::StoreError;

/// The schema version this release writes and reads.
///
/// Version 1: `key bytea PRIMARY KEY, data bytea, version bigint, expires_at timestamptz`,
/// indexed on `expires_at`. Version 2 adds the session owners: a nullable `owner text` column
/// with a partial index (`WHERE owner IS NOT NULL`), by an `ALTER TABLE` run when a store of
/// this release opens a version-1 table, under the same advisory lock as the creation here
/// (see [`migrate`]).
pub(super) const SCHEMA_VERSION: i32 = 2;

/// The table that records each session table's schema version (one row per table), in the
/// session table's schema.
pub(super) const SCHEMA_TABLE: &str = "hyper_sessions_schema";

/// The longest table name accepted: PostgreSQL keeps 63 bytes of a name, and the expiry index
/// is named after the table plus `_expires_at`.
const MAX_TABLE_NAME: usize = 48;

/// The longest schema name accepted (PostgreSQL's 63-byte limit).
const MAX_SCHEMA_NAME: usize = 63;

/// An advisory lock key, taken for the transaction that checks or creates the schema, so that
/// app servers starting together do not race to create the same table.
const SETUP_LOCK: i64 = 0x6879_7065_7273_6573; // "hyperses"

/// The columns every statement uses and their types, as `format_type` names them.
const COLUMNS: [(&str, &str); 5] = [
    ("key", "bytea"),
    ("data", "bytea"),
    ("version", "bigint"),
    ("expires_at", "timestamp with time zone"),
    ("owner", "text"),
];

/// The statements, with the schema and table names quoted in. Each is one statement, prepared
/// once per pooled connection.
///
/// Writes to a loaded record lock the live row first (`cur`, `FOR UPDATE`, which in
/// `READ COMMITTED` waits for a concurrent writer and then reads the row as it committed), change
/// it only if its version is the expected one, and answer the version they found: no row means
/// missing, another version a conflict. Expiry is compared with `clock_timestamp()`, the time
/// the row is looked at (after any wait for its lock), not the time the call was made.
#[derive(Debug)]
pub(super) struct Sql {
    pub(super) load: String,
    pub(super) create: String,
    pub(super) save: String,
    pub(super) touch: String,
    pub(super) remove: String,
    pub(super) delete: String,
    pub(super) delete_expired: String,
    /// An owner's live rows, through the owner index.
    pub(super) owned: String,
}

impl Sql {
    pub(super) fn new(schema: &str, table: &str) -> Self {
        let t = format!("\"{schema}\".\"{table}\"");
        let live = "expires_at > clock_timestamp()";
        let cur =
            format!("cur AS (SELECT key, version FROM {t} WHERE key = $1 AND {live} FOR UPDATE)");
        Sql {
            load: format!(
                "SELECT data, version, expires_at, owner FROM {t} WHERE key = $1 AND {live}"
            ),
            create: format!(
                "INSERT INTO {t} AS s (key, data, version, expires_at, owner) \
                 VALUES ($1, $2, $3, $4, $5) \
                 ON CONFLICT (key) DO UPDATE SET data = EXCLUDED.data, \
                 version = EXCLUDED.version, expires_at = EXCLUDED.expires_at, \
                 owner = EXCLUDED.owner \
                 WHERE s.expires_at <= clock_timestamp() RETURNING 1"
            ),
            // An owner set to the value it had changes no indexed value: still a heap-only
            // update when the expiry stays.
            save: format!(
                "WITH {cur}, w AS (UPDATE {t} AS s SET data = $2, version = $3, expires_at = $4, \
                 owner = $6 FROM cur WHERE s.key = cur.key AND cur.version = $5) \
                 SELECT version FROM cur"
            ),
            touch: format!(
                "WITH {cur}, w AS (UPDATE {t} AS s SET expires_at = $2 \
                 FROM cur WHERE s.key = cur.key AND cur.version = $3) SELECT version FROM cur"
            ),
            remove: format!(
                "WITH {cur}, w AS (DELETE FROM {t} AS s \
                 USING cur WHERE s.key = cur.key AND cur.version = $2) SELECT version FROM cur"
            ),
            delete: format!("DELETE FROM {t} WHERE key = $1"),
            // `now()` here (not the clock): a stable value, so the expiry index bounds the scan.
            delete_expired: format!(
                "WITH d AS (DELETE FROM {t} WHERE key IN (SELECT key FROM {t} \
                 WHERE expires_at <= now() LIMIT $1 FOR UPDATE SKIP LOCKED) \
                 AND expires_at <= now() RETURNING 1) SELECT count(*) FROM d"
            ),
            owned: format!(
                "SELECT key, data, version, expires_at, owner FROM {t} \
                 WHERE owner = $1 AND {live}"
            ),
        }
    }
}

/// Checks a table or schema name: ASCII letters, digits and underscores, not starting with a
/// digit, nor with `pg_` (PostgreSQL's own). Names are always quoted in SQL, so they are used
/// exactly as given (case included).
pub(super) fn validate_name(what: &str, name: &str) -> Result<(), StoreError> {
    let max = if what == "table" {
        MAX_TABLE_NAME
    } else {
        MAX_SCHEMA_NAME
    };
    let bytes = name.as_bytes();
    let valid = !bytes.is_empty()
        && bytes.len() <= max
        && !bytes[0].is_ascii_digit()
        && bytes
            .iter()
            .all(|&b| b.is_ascii_alphanumeric() || b == b'_')
        && !name.to_ascii_lowercase().starts_with("pg_")
        && !name.eq_ignore_ascii_case(SCHEMA_TABLE);
    if valid {
        Ok(())
    } else {
        Err(StoreError::other(format!(
            "invalid PostgreSQL {what} name {:?}: use 1 to {max} ASCII letters, digits and \
             underscores, not starting with a digit or `pg_`",
            name.chars().take(80).collect::<String>()
        )))
    }
}

/// Creates or checks the table, in one transaction under an advisory lock: the version table,
/// the session table with its index and version row (if missing and `create` allows), then the
/// columns every statement needs, with their types.
pub(super) async fn setup(
    client: &mut Client,
    schema: &str,
    table: &str,
    create: bool,
) -> Result<(), Fail> {
    let t = format!("\"{schema}\".\"{table}\"");
    let versions = format!("\"{schema}\".{SCHEMA_TABLE}");
    let tx = client.transaction().await?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&SETUP_LOCK])
        .await?;
    let exists = |name: String| {
        let tx = &tx;
        async move {
            let row = tx
                .query_one("SELECT to_regclass($1) IS NOT NULL", &[&name])
                .await?;
            Ok::<bool, Fail>(row.try_get(0)?)
        }
    };
    let schema_exists: bool = tx
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM pg_namespace WHERE nspname = $1)",
            &[&schema],
        )
        .await?
        .try_get(0)?;
    if !schema_exists {
        return Err(Fail::Setup(format!(
            "schema \"{schema}\" does not exist (the store creates tables, not schemas)"
        )));
    }
    let has_versions = exists(versions.clone()).await?;
    let version: Option<i32> = if has_versions {
        tx.query_opt(
            &format!("SELECT version FROM {versions} WHERE table_name = $1"),
            &[&table],
        )
        .await?
        .map(|r| r.try_get(0))
        .transpose()?
    } else {
        None
    };
    match version {
        Some(v) if v > SCHEMA_VERSION => {
            return Err(Fail::Setup(format!(
                "table {t} has schema version {v}, written by a newer release \
                 (this one knows up to {SCHEMA_VERSION})"
            )));
        }
        Some(SCHEMA_VERSION) => {}
        Some(v) => migrate(&tx, &t, &versions, table, v).await?,
        None => {
            if exists(t.clone()).await? {
                return Err(Fail::Setup(format!(
                    "a table {t} exists that this store did not create (no row for it in \
                     {versions}); choose another table name"
                )));
            }
            if !create {
                return Err(Fail::Setup(format!(
                    "table {t} does not exist, and creating it is turned off \
                     (create_table(false)); open the store once with a role that may create it"
                )));
            }
            if !has_versions {
                tx.batch_execute(&format!(
                    "CREATE TABLE {versions} \
                     (table_name text PRIMARY KEY, version integer NOT NULL)"
                ))
                .await?;
            }
            // fillfactor 90: room in each page for a row's next version, so a save (which
            // changes no indexed value unless the expiry moves) is a heap-only update.
            tx.batch_execute(&format!(
                "CREATE TABLE {t} (\
                   key bytea PRIMARY KEY CHECK (octet_length(key) = 16), \
                   data bytea NOT NULL, \
                   version bigint NOT NULL, \
                   expires_at timestamptz NOT NULL, \
                   owner text\
                 ) WITH (fillfactor = 90); \
                 CREATE INDEX \"{table}_expires_at\" ON {t} (expires_at); \
                 {}",
                owner_index(&t, table)
            ))
            .await?;
            tx.execute(
                &format!("INSERT INTO {versions} (table_name, version) VALUES ($1, $2)"),
                &[&table, &SCHEMA_VERSION],
            )
            .await?;
        }
    }
    check_columns(&tx, &t).await?;
    tx.commit().await?;
    Ok(())
}

/// The owner index: partial, so that sessions without an owner cost it nothing (a query's
/// `owner = $1` implies `owner IS NOT NULL`, so the planner uses it for `owned`).
fn owner_index(t: &str, table: &str) -> String {
    format!("CREATE INDEX \"{table}_owner\" ON {t} (owner) WHERE owner IS NOT NULL;")
}

/// Brings a table of an older schema version up to [`SCHEMA_VERSION`], in the setup's
/// transaction (under its advisory lock, all or nothing): version 1 gets the `owner` column
/// (nullable without a default: no row is rewritten) and its index, whose build reads the
/// table once while the `ALTER TABLE`'s lock holds off every other statement on it.
async fn migrate(
    tx: &tokio_postgres::Transaction<'_>,
    t: &str,
    versions: &str,
    table: &str,
    from: i32,
) -> Result<(), Fail> {
    if from < 1 {
        return Err(Fail::Setup(format!(
            "table {t} has schema version {from}, which no release wrote"
        )));
    }
    if from < 2 {
        tx.batch_execute(&format!(
            "ALTER TABLE {t} ADD COLUMN owner text; {}",
            owner_index(t, table)
        ))
        .await?;
    }
    tx.execute(
        &format!("UPDATE {versions} SET version = $2 WHERE table_name = $1"),
        &[&table, &SCHEMA_VERSION],
    )
    .await?;
    Ok(())
}

/// The columns every statement uses must be there with their types: a table altered by hand is
/// refused when the store opens, not on the first request.
async fn check_columns(tx: &tokio_postgres::Transaction<'_>, t: &str) -> Result<(), Fail> {
    let rows = tx
        .query(
            "SELECT attname::text, format_type(atttypid, atttypmod) FROM pg_attribute \
             WHERE attrelid = to_regclass($1) AND attnum > 0 AND NOT attisdropped",
            &[&t],
        )
        .await?;
    let mut wrong = Vec::new();
    for (name, ty) in COLUMNS {
        let found = rows.iter().find_map(|r| {
            let n: &str = r.try_get(0).ok()?;
            (n == name).then(|| r.try_get::<_, String>(1).ok())?
        });
        match found {
            Some(found) if found == ty => {}
            Some(found) => wrong.push(format!("{name} is {found}, expected {ty}")),
            None => wrong.push(format!("{name} ({ty}) is missing")),
        }
    }
    if !wrong.is_empty() {
        return Err(Fail::Setup(format!(
            "table {t} does not have the session columns: {}",
            wrong.join("; ")
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        for good in ["sessions", "_s", "Web_Sessions_2", &"a".repeat(48)] {
            assert!(validate_name("table", good).is_ok(), "{good}");
        }
        assert!(validate_name("schema", &"a".repeat(63)).is_ok());
        for bad in [
            "",
            "1abc",
            "a b",
            "a.b",
            "sessions\"; DROP TABLE x; --",
            "pg_catalog",
            "PG_x",
            "hyper_sessions_schema",
            "täble",
            "a\0b",
            &"a".repeat(49),
        ] {
            let err = validate_name("table", bad).unwrap_err();
            assert!(
                std::error::Error::source(&err)
                    .unwrap()
                    .to_string()
                    .contains("invalid PostgreSQL table name")
            );
        }
        assert!(validate_name("schema", &"a".repeat(64)).is_err());
    }

    #[test]
    fn statements_quote_the_names() {
        let sql = Sql::new("app", "Sessions");
        for s in [
            &sql.load,
            &sql.create,
            &sql.save,
            &sql.touch,
            &sql.remove,
            &sql.delete,
            &sql.delete_expired,
            &sql.owned,
        ] {
            assert!(s.contains("\"app\".\"Sessions\""), "{s}");
        }
    }
}
