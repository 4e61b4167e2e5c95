//! The stored record ([`Record`]): what a store keeps, and the millisecond clock of its expiry.

use std::fmt;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;

use crate::key::Key;

/// One stored session, as a [`SessionStore`](crate::store::SessionStore) keeps it.
///
/// The store treats `data` as opaque bytes (the middleware encodes and decodes it), and keeps
/// `version` and the expiry beside it: `version` drives the compare-and-set of
/// [`SessionStore::save`](crate::store::SessionStore::save), and the expiry is when the store must
/// stop returning the record. Expiry instants have millisecond precision.
///
/// A record may name its session's **owner** (the user it belongs to, as the application named
/// it with [`Session::set_owner`](crate::Session::set_owner)). A store keeps the owner with the
/// record and indexes it: [`SessionStore::owned`](crate::store::SessionStore::owned) lists an
/// owner's live records.
#[derive(Clone, PartialEq, Eq)]
pub struct Record {
    key: Key,
    data: Bytes,
    version: u64,
    expires_ms: u64,
    owner: Option<Arc<str>>,
}

impl Record {
    /// A record with these parts. Stores call this when they load one.
    pub fn new(key: Key, data: Bytes, version: u64, expires_at: SystemTime) -> Self {
        Record::from_unix_ms(key, data, version, unix_ms(expires_at))
    }

    /// A record whose expiry is given in milliseconds since the Unix epoch, the form the
    /// crate's stores keep (`PXAT` in Redis, an integer column in `SQLite`).
    pub(crate) fn from_unix_ms(
        key: Key,
        data: Bytes,
        version: u64,
        expires_at_unix_ms: u64,
    ) -> Self {
        Record {
            key,
            data,
            version,
            expires_ms: expires_at_unix_ms,
            owner: None,
        }
    }

    /// The same record with this owner (or none). Stores call this when they load a record
    /// that has one.
    #[must_use]
    pub fn with_owner(mut self, owner: Option<Arc<str>>) -> Self {
        self.owner = owner;
        self
    }

    /// The owner of the session, if the application named one. A store keeps it with the record
    /// and answers [`owned`](crate::store::SessionStore::owned) from it. It names a user: like
    /// the data, it belongs in no log or error.
    pub fn owner(&self) -> Option<&str> {
        self.owner.as_deref()
    }

    /// The owner, shared (an in-process store keeps it without copying).
    #[cfg(feature = "memory")]
    pub(crate) fn owner_shared(&self) -> Option<&Arc<str>> {
        self.owner.as_ref()
    }

    /// The same record with another expiry.
    #[must_use]
    pub fn with_expires_at(mut self, expires_at: SystemTime) -> Self {
        self.expires_ms = unix_ms(expires_at);
        self
    }

    /// The session's store key (a digest of its id; see [`Key`]).
    pub fn key(&self) -> Key {
        self.key
    }

    /// The encoded session payload. Stores keep it byte for byte.
    pub fn data(&self) -> &Bytes {
        &self.data
    }

    /// The record's version: 1 when created, one more on each successful save.
    pub fn version(&self) -> u64 {
        self.version
    }

    /// When the record expires. A store must not return it from `load` at or after this instant.
    pub fn expires_at(&self) -> SystemTime {
        from_unix_ms(self.expires_ms)
    }

    /// The expiry in whole milliseconds since the Unix epoch.
    pub(crate) fn expires_at_unix_ms(&self) -> u64 {
        self.expires_ms
    }

    /// Whether the record has expired at `now`.
    pub fn is_expired_at(&self, now: SystemTime) -> bool {
        self.expires_ms <= unix_ms(now)
    }
}

impl fmt::Debug for Record {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Record")
            .field("key", &self.key)
            .field("data_len", &self.data.len())
            .field("version", &self.version)
            .field("expires_at_unix_ms", &self.expires_ms)
            .field("owned", &self.owner.is_some())
            .finish()
    }
}

/// Milliseconds since the Unix epoch, saturating at 0 and `u64::MAX`.
pub(crate) fn unix_ms(t: SystemTime) -> u64 {
    // Whole seconds and millis in u64 arithmetic (`as_millis` divides a u128).
    t.duration_since(UNIX_EPOCH).map_or(0, |d| {
        d.as_secs()
            .saturating_mul(1000)
            .saturating_add(u64::from(d.subsec_millis()))
    })
}

/// The instant `ms` milliseconds after the Unix epoch.
pub(crate) fn from_unix_ms(ms: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(ms)
}
