//! The store contract ([`SessionStore`]) and the stores that ship with the crate.

use std::future::Future;
use std::pin::Pin;
use std::time::SystemTime;

use crate::error::StoreError;
use crate::id::Id;
use crate::record::{Record, from_unix_ms, unix_ms};

#[cfg(feature = "memory")]
pub(crate) mod memory;
#[cfg(feature = "redis")]
pub(crate) mod redis;
#[cfg(any(feature = "redis", feature = "webdis"))]
pub(crate) mod redis_common;
#[cfg(feature = "sqlite")]
pub(crate) mod sqlite;
#[cfg(feature = "webdis")]
pub(crate) mod webdis;

/// What [`SessionStore::create`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum CreateOutcome {
    /// The record was stored.
    Created,
    /// A live record with this id already exists; nothing was written.
    IdTaken,
}

/// What [`SessionStore::save`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum SaveOutcome {
    /// The stored version was the expected one; the record replaced it.
    Saved,
    /// The stored record has another version (someone saved in between); nothing was written.
    Conflict,
    /// There is no live record with this id (deleted or expired); nothing was written.
    Missing,
}

/// Where sessions live: the contract every store implements.
///
/// A store keeps [`Record`]s by [`Id`]: opaque payload bytes, a version and an expiry instant.
/// The middleware does the rest (encoding, expiry policy, retries). Every method is one atomic
/// operation on one record; a store needs no locking across calls.
///
/// # The contract
/// - **`load`** returns the live record, or `None` when there is none or it has expired
///   (`expires_at <= now`): an expired record is never returned, whether or not it has been
///   removed yet. (The middleware checks again, but a store must not rely on that.)
/// - **`create`** stores a new record only if no live record has that id, and says which
///   happened. It must never overwrite a live record (ids are random, but a collision or a
///   replay must not hand one user another's session).
/// - **`save`** is a compare-and-set: it replaces the record only if a live record with that id
///   exists *and* its version is `expected_version`; the record passed in carries the new
///   version (`expected_version + 1`). Otherwise it writes nothing and answers
///   [`SaveOutcome::Conflict`] or [`SaveOutcome::Missing`]. A missing record is never
///   re-created by `save` (so a destroyed session stays destroyed).
/// - **`delete`** removes the record if present; deleting a missing record succeeds.
/// - **`touch`** moves a live record's expiry to `expires_at` without changing its data or
///   version, and answers whether a live record was there. It never revives an expired one.
/// - **`load_refreshing`** (provided) is `load` plus, when the live record expires before
///   [`Refresh::if_before`] ([`Refresh::is_due`]), a `touch` to [`Refresh::expires_at`]; the record returned carries
///   the expiry it has afterwards. The layer calls it for every load, so that an idle timeout
///   slides on reads. The default makes two calls when a refresh is due; a store that can do
///   both in one round trip (Redis `GETEX`, a Lua script) should override it.
/// - Failures are [`StoreError`]s with their cause: [`StoreError::unavailable`] for an
///   unreachable, slow or full store (the middleware answers 503 by default),
///   [`StoreError::corrupt`] for a record that cannot be read back (the middleware starts a
///   fresh session), [`StoreError::other`] for the rest. A store never reports success for a
///   write it did not make.
///
/// Methods return `impl Future + Send`: implement them with `async fn` bodies or by returning
/// an `async move` block; no `async-trait` is needed.
///
/// # Example: a complete custom store
/// A store over a `HashMap` behind a mutex (the crate's own [`MemoryStore`](crate::MemoryStore)
/// is the sharded, bounded, swept version of this):
/// ```
/// use std::collections::HashMap;
/// use std::sync::{Arc, Mutex};
/// use std::time::SystemTime;
///
/// use hyper_sessions::{CreateOutcome, Id, Record, SaveOutcome, SessionStore, StoreError};
///
/// #[derive(Clone, Default)]
/// struct MapStore(Arc<Mutex<HashMap<Id, Record>>>);
///
/// impl SessionStore for MapStore {
///     async fn load(&self, id: &Id) -> Result<Option<Record>, StoreError> {
///         let map = self.0.lock().map_err(|_| StoreError::other("poisoned"))?;
///         Ok(map
///             .get(id)
///             .filter(|r| !r.is_expired_at(SystemTime::now()))
///             .cloned())
///     }
///
///     async fn create(&self, record: &Record) -> Result<CreateOutcome, StoreError> {
///         let mut map = self.0.lock().map_err(|_| StoreError::other("poisoned"))?;
///         let now = SystemTime::now();
///         if map.get(&record.id()).is_some_and(|r| !r.is_expired_at(now)) {
///             return Ok(CreateOutcome::IdTaken);
///         }
///         map.insert(record.id(), record.clone());
///         Ok(CreateOutcome::Created)
///     }
///
///     async fn save(&self, record: &Record, expected: u64) -> Result<SaveOutcome, StoreError> {
///         let mut map = self.0.lock().map_err(|_| StoreError::other("poisoned"))?;
///         let now = SystemTime::now();
///         match map.get_mut(&record.id()) {
///             Some(r) if !r.is_expired_at(now) => {
///                 if r.version() != expected {
///                     return Ok(SaveOutcome::Conflict);
///                 }
///                 *r = record.clone();
///                 Ok(SaveOutcome::Saved)
///             }
///             _ => Ok(SaveOutcome::Missing),
///         }
///     }
///
///     async fn delete(&self, id: &Id) -> Result<(), StoreError> {
///         let mut map = self.0.lock().map_err(|_| StoreError::other("poisoned"))?;
///         map.remove(id);
///         Ok(())
///     }
///
///     async fn touch(&self, id: &Id, expires_at: SystemTime) -> Result<bool, StoreError> {
///         let mut map = self.0.lock().map_err(|_| StoreError::other("poisoned"))?;
///         let now = SystemTime::now();
///         match map.get_mut(id) {
///             Some(r) if !r.is_expired_at(now) => {
///                 *r = Record::new(r.id(), r.data().clone(), r.version(), expires_at);
///                 Ok(true)
///             }
///             _ => Ok(false),
///         }
///     }
/// }
///
/// // Used like any other store:
/// let layer = hyper_sessions::SessionLayer::new(MapStore::default());
/// # let _ = layer;
/// ```
pub trait SessionStore: Send + Sync + 'static {
    /// The live record with this id, or `None` if there is none or it has expired.
    fn load(&self, id: &Id) -> impl Future<Output = Result<Option<Record>, StoreError>> + Send;

    /// Stores a new record unless a live record with its id exists.
    fn create(
        &self,
        record: &Record,
    ) -> impl Future<Output = Result<CreateOutcome, StoreError>> + Send;

    /// Replaces the live record with this id if its version is `expected_version`.
    fn save(
        &self,
        record: &Record,
        expected_version: u64,
    ) -> impl Future<Output = Result<SaveOutcome, StoreError>> + Send;

    /// Removes the record with this id, if any.
    fn delete(&self, id: &Id) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Moves a live record's expiry; answers whether a live record was there.
    fn touch(
        &self,
        id: &Id,
        expires_at: SystemTime,
    ) -> impl Future<Output = Result<bool, StoreError>> + Send;

    /// Loads the live record and, if it expires before `refresh.if_before`, moves its expiry to
    /// `refresh.expires_at`, returning the record with its new expiry.
    fn load_refreshing(
        &self,
        id: &Id,
        refresh: Refresh,
    ) -> impl Future<Output = Result<Option<Record>, StoreError>> + Send {
        async move {
            let Some(record) = self.load(id).await? else {
                return Ok(None);
            };
            if !refresh.is_due(record.expires_at_unix_ms()) {
                return Ok(Some(record));
            }
            if !self.touch(id, refresh.expires_at()).await? {
                // Deleted or expired between the two calls.
                return Ok(None);
            }
            Ok(Some(record.with_expires_at(refresh.expires_at())))
        }
    }
}

/// The expiry refresh asked of [`SessionStore::load_refreshing`]: move the record's expiry to
/// [`expires_at`](Refresh::expires_at) if it expires before [`if_before`](Refresh::if_before).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Refresh {
    expires_ms: u64,
    if_before_ms: u64,
}

impl Refresh {
    /// A refresh to `expires_at` of a record that expires before `if_before`.
    pub fn new(expires_at: SystemTime, if_before: SystemTime) -> Self {
        Refresh::from_unix_ms(unix_ms(expires_at), unix_ms(if_before))
    }

    /// [`Refresh::new`] with instants in milliseconds since the Unix epoch.
    pub fn from_unix_ms(expires_at_unix_ms: u64, if_before_unix_ms: u64) -> Self {
        Refresh {
            expires_ms: expires_at_unix_ms,
            if_before_ms: if_before_unix_ms,
        }
    }

    /// The expiry to give the record.
    pub fn expires_at(&self) -> SystemTime {
        from_unix_ms(self.expires_ms)
    }

    /// Refresh only a record that expires before this instant.
    pub fn if_before(&self) -> SystemTime {
        from_unix_ms(self.if_before_ms)
    }

    /// [`expires_at`](Refresh::expires_at) in milliseconds since the Unix epoch.
    pub fn expires_at_unix_ms(&self) -> u64 {
        self.expires_ms
    }

    /// [`if_before`](Refresh::if_before) in milliseconds since the Unix epoch.
    pub fn if_before_unix_ms(&self) -> u64 {
        self.if_before_ms
    }

    /// Whether a record expiring at `expires_at_unix_ms` is due for this refresh.
    pub fn is_due(&self, expires_at_unix_ms: u64) -> bool {
        expires_at_unix_ms < self.if_before_ms && expires_at_unix_ms < self.expires_ms
    }
}

pub(crate) type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T, StoreError>> + Send + 'a>>;

/// The object-safe twin of [`SessionStore`], so that `Session` need not be generic.
pub(crate) trait DynStore: Send + Sync + 'static {
    fn load<'a>(&'a self, id: &'a Id) -> BoxFuture<'a, Option<Record>>;
    fn create<'a>(&'a self, record: &'a Record) -> BoxFuture<'a, CreateOutcome>;
    fn save<'a>(&'a self, record: &'a Record, expected: u64) -> BoxFuture<'a, SaveOutcome>;
    fn delete<'a>(&'a self, id: &'a Id) -> BoxFuture<'a, ()>;
    fn touch<'a>(&'a self, id: &'a Id, expires_at: SystemTime) -> BoxFuture<'a, bool>;
    /// Takes the id by value, so the caller need not keep it alive.
    fn load_refreshing(&self, id: Id, refresh: Refresh) -> BoxFuture<'_, Option<Record>>;
    /// The memory store, whose operations never wait: the layer calls them directly rather
    /// than boxing a future per call.
    #[cfg(feature = "memory")]
    fn as_memory(&self) -> Option<&crate::MemoryStore>;
}

impl<S: SessionStore> DynStore for S {
    fn load<'a>(&'a self, id: &'a Id) -> BoxFuture<'a, Option<Record>> {
        Box::pin(SessionStore::load(self, id))
    }
    fn create<'a>(&'a self, record: &'a Record) -> BoxFuture<'a, CreateOutcome> {
        Box::pin(SessionStore::create(self, record))
    }
    fn save<'a>(&'a self, record: &'a Record, expected: u64) -> BoxFuture<'a, SaveOutcome> {
        Box::pin(SessionStore::save(self, record, expected))
    }
    fn delete<'a>(&'a self, id: &'a Id) -> BoxFuture<'a, ()> {
        Box::pin(SessionStore::delete(self, id))
    }
    fn touch<'a>(&'a self, id: &'a Id, expires_at: SystemTime) -> BoxFuture<'a, bool> {
        Box::pin(SessionStore::touch(self, id, expires_at))
    }
    fn load_refreshing(&self, id: Id, refresh: Refresh) -> BoxFuture<'_, Option<Record>> {
        Box::pin(async move { SessionStore::load_refreshing(self, &id, refresh).await })
    }
    #[cfg(feature = "memory")]
    fn as_memory(&self) -> Option<&crate::MemoryStore> {
        (self as &dyn std::any::Any).downcast_ref()
    }
}
