//! For store authors: the contract every store implements ([`SessionStore`]) and what it deals
//! in ([`Record`], [`Key`], the outcomes, [`StoreError`]).
//!
//! The stores that ship with the crate are at its root ([`MemoryStore`](crate::MemoryStore)
//! and, with their features, `RedisStore`, `WebdisStore`, `SqliteStore` and `PostgresStore`).

use std::future::Future;
use std::pin::{Pin, pin};
use std::task::{Context, Poll, Waker};
use std::time::SystemTime;

pub use crate::error::{StoreError, StoreErrorKind};
pub use crate::key::Key;

pub(crate) mod record;

pub use self::record::Record;
pub(crate) use self::record::{from_unix_ms, unix_ms};

#[cfg(any(feature = "sqlite", feature = "postgres"))]
pub(crate) mod cleanup;
#[cfg(feature = "memory")]
pub(crate) mod memory;
#[cfg(feature = "postgres")]
pub(crate) mod postgres;
#[cfg(any(feature = "redis", feature = "webdis"))]
pub(crate) mod redis;
#[cfg(feature = "sqlite")]
pub(crate) mod sqlite;

/// What [`SessionStore::create`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum CreateOutcome {
    /// The record was stored.
    Created,
    /// A live record with this key already exists; nothing was written.
    IdTaken,
}

/// What a conditional write ([`save`](SessionStore::save), [`touch`](SessionStore::touch),
/// [`remove`](SessionStore::remove)) did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum SaveOutcome {
    /// The stored version was the expected one; the change was made.
    Saved,
    /// The stored record has another version (someone saved in between); nothing was written.
    Conflict,
    /// There is no live record with this key (deleted or expired); nothing was written.
    Missing,
}

/// Where sessions live: the contract every store implements.
///
/// A store keeps [`Record`]s by [`Key`]: opaque payload bytes, a version and an expiry instant.
/// The key is a digest of the session's id, never the id itself (the cookie's bearer secret), so
/// nothing a store keeps, logs or sends over its wire can be replayed as a cookie; a store
/// names a session in its errors by the key's [`fingerprint`](Key::fingerprint) at most.
/// The middleware does the rest (encoding, expiry policy, retries). Every method is one atomic
/// operation on one record; a store needs no locking across calls.
///
/// # The contract
/// Every change the layer makes to a record it loaded is conditional on the version it loaded,
/// so that no acknowledged write is lost; the only unconditional change is `delete`, which is
/// how a session is destroyed, and a destroyed session stays destroyed.
///
/// - **`load`** returns the live record, or `None` when there is none or it has expired
///   (`expires_at <= now`): an expired record is never returned, whether or not it has been
///   removed yet. (The middleware checks again, but a store must not rely on that.)
/// - **`create`** stores a new record only if no live record has that key, and says which
///   happened. It must never overwrite a live record (ids are random, but a collision or a
///   replay must not hand one user another's session).
/// - **`save`** is a compare-and-set: it replaces the record only if a live record with that key
///   exists *and* its version is `expected_version`; the record passed in carries the new
///   version (`expected_version + 1`). Otherwise it writes nothing and answers
///   [`SaveOutcome::Conflict`] or [`SaveOutcome::Missing`]. A missing record is never
///   re-created by `save` (so a destroyed session stays destroyed).
/// - **`touch`** moves a live record's expiry to `expires_at` if its version is
///   `expected_version`, without changing its data or version; otherwise as `save`.
/// - **`remove`** deletes a live record if its version is `expected_version`; otherwise as
///   `save` (an emptied session, and the old record of a cycled one).
/// - **`delete`** removes the record whatever its version (a destroyed session, a revoked
///   one); deleting a missing record succeeds.
/// - **Owners.** A record may carry an [`owner`](Record::owner). `create` and `save` keep the
///   record's owner (none included) with it, `touch` leaves it as it is, and `load` returns it.
///   **`owned`** returns every live record whose owner is the one asked for, and nothing else:
///   a record removed, deleted, expired or saved with another owner is not listed. A store
///   whose owner index cannot change atomically with the record (Redis Cluster, where they live
///   in different slots) writes the index entry before the record, so that a record never
///   exists without its entry, and drops entries whose record is gone or belongs to another
///   owner when it lists or sweeps them. Requests that do not change a session's owner must
///   cost no more round trips than without owners.
/// - Failures are [`StoreError`]s with their cause: [`StoreError::unavailable`] for an
///   unreachable, slow or full store (the middleware answers 503 by default),
///   [`StoreError::corrupt`] for a record that cannot be read back (the middleware starts a
///   fresh session), [`StoreError::other`] for the rest. A store never reports success for a
///   write it did not make, and never reports `Conflict` or `Missing` for a write it may have
///   made: when the outcome of a write is unknown (its reply was lost), the answer is
///   [`StoreError::unavailable`], and the layer answers 503 without replaying anything.
///
/// A store that answers every operation without waiting (in this process's memory, say) can set
/// [`NEVER_WAITS`](SessionStore::NEVER_WAITS): the layer then runs its operations in place
/// instead of boxing a future for each.
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
/// use hyper_sessions::store::{CreateOutcome, Key, Record, SaveOutcome, SessionStore, StoreError};
///
/// #[derive(Clone, Default)]
/// struct MapStore(Arc<Mutex<HashMap<Key, Record>>>);
///
/// impl SessionStore for MapStore {
///     async fn load(&self, key: &Key) -> Result<Option<Record>, StoreError> {
///         let map = self.0.lock().map_err(|_| StoreError::other("poisoned"))?;
///         Ok(map
///             .get(key)
///             .filter(|r| !r.is_expired_at(SystemTime::now()))
///             .cloned())
///     }
///
///     async fn create(&self, record: &Record) -> Result<CreateOutcome, StoreError> {
///         let mut map = self.0.lock().map_err(|_| StoreError::other("poisoned"))?;
///         let now = SystemTime::now();
///         if map.get(&record.key()).is_some_and(|r| !r.is_expired_at(now)) {
///             return Ok(CreateOutcome::IdTaken);
///         }
///         map.insert(record.key(), record.clone());
///         Ok(CreateOutcome::Created)
///     }
///
///     async fn save(&self, record: &Record, expected: u64) -> Result<SaveOutcome, StoreError> {
///         let mut map = self.0.lock().map_err(|_| StoreError::other("poisoned"))?;
///         let now = SystemTime::now();
///         match map.get_mut(&record.key()) {
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
///     async fn touch(
///         &self,
///         key: &Key,
///         expected: u64,
///         expires_at: SystemTime,
///     ) -> Result<SaveOutcome, StoreError> {
///         let mut map = self.0.lock().map_err(|_| StoreError::other("poisoned"))?;
///         let now = SystemTime::now();
///         match map.get_mut(key) {
///             Some(r) if !r.is_expired_at(now) => {
///                 if r.version() != expected {
///                     return Ok(SaveOutcome::Conflict);
///                 }
///                 *r = r.clone().with_expires_at(expires_at);
///                 Ok(SaveOutcome::Saved)
///             }
///             _ => Ok(SaveOutcome::Missing),
///         }
///     }
///
///     async fn remove(&self, key: &Key, expected: u64) -> Result<SaveOutcome, StoreError> {
///         let mut map = self.0.lock().map_err(|_| StoreError::other("poisoned"))?;
///         let now = SystemTime::now();
///         match map.get(key) {
///             Some(r) if !r.is_expired_at(now) => {
///                 if r.version() != expected {
///                     return Ok(SaveOutcome::Conflict);
///                 }
///                 map.remove(key);
///                 Ok(SaveOutcome::Saved)
///             }
///             _ => Ok(SaveOutcome::Missing),
///         }
///     }
///
///     async fn delete(&self, key: &Key) -> Result<(), StoreError> {
///         let mut map = self.0.lock().map_err(|_| StoreError::other("poisoned"))?;
///         map.remove(key);
///         Ok(())
///     }
///
///     async fn owned(&self, owner: &str) -> Result<Vec<Record>, StoreError> {
///         // A real store keeps an index by owner; a scan keeps the example short.
///         let map = self.0.lock().map_err(|_| StoreError::other("poisoned"))?;
///         let now = SystemTime::now();
///         Ok(map
///             .values()
///             .filter(|r| r.owner() == Some(owner) && !r.is_expired_at(now))
///             .cloned()
///             .collect())
///     }
/// }
///
/// // Used like any other store:
/// let layer = hyper_sessions::SessionLayer::new(MapStore::default());
/// # let _ = layer;
/// ```
pub trait SessionStore: Send + Sync + 'static {
    /// Whether every operation of this store completes on its first poll, without waiting (an
    /// in-process store whose operations take no lock across an `.await`). The layer then runs
    /// them in place, without boxing a future per call. Default `false`. An operation of a
    /// store that says `true` and then waits fails with an error rather than being waited for.
    const NEVER_WAITS: bool = false;

    /// The live record with this key, or `None` if there is none or it has expired.
    fn load(&self, key: &Key) -> impl Future<Output = Result<Option<Record>, StoreError>> + Send;

    /// Stores a new record unless a live record with its key exists.
    fn create(
        &self,
        record: &Record,
    ) -> impl Future<Output = Result<CreateOutcome, StoreError>> + Send;

    /// Replaces the live record with this key if its version is `expected_version`.
    fn save(
        &self,
        record: &Record,
        expected_version: u64,
    ) -> impl Future<Output = Result<SaveOutcome, StoreError>> + Send;

    /// Moves the expiry of the live record with this key if its version is `expected_version`.
    fn touch(
        &self,
        key: &Key,
        expected_version: u64,
        expires_at: SystemTime,
    ) -> impl Future<Output = Result<SaveOutcome, StoreError>> + Send;

    /// Deletes the live record with this key if its version is `expected_version`.
    fn remove(
        &self,
        key: &Key,
        expected_version: u64,
    ) -> impl Future<Output = Result<SaveOutcome, StoreError>> + Send;

    /// Removes the record with this key whatever its version, if there is one.
    fn delete(&self, key: &Key) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Every live record whose [`owner`](Record::owner) is `owner`, in any order.
    fn owned(&self, owner: &str) -> impl Future<Output = Result<Vec<Record>, StoreError>> + Send;
}

type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T, StoreError>> + Send + 'a>>;

/// A store operation under way: answered in place (a store that never waits), or a boxed
/// future.
pub(crate) enum Call<'a, T> {
    Ready(Option<Result<T, StoreError>>),
    Waiting(BoxFuture<'a, T>),
}

// Nothing in a `Call` is pinned in place: the boxed future is pinned in its box.
impl<T> Unpin for Call<'_, T> {}

impl<T> Future for Call<'_, T> {
    type Output = Result<T, StoreError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match &mut *self {
            Call::Ready(answer) => Poll::Ready(answer.take().unwrap_or_else(|| {
                Err(StoreError::other(
                    "store operation polled after it completed",
                ))
            })),
            Call::Waiting(future) => future.as_mut().poll(cx),
        }
    }
}

/// Starts an operation of a store: in place when the store never waits, else boxed.
fn call<'a, T, F>(never_waits: bool, operation: F) -> Call<'a, T>
where
    F: Future<Output = Result<T, StoreError>> + Send + 'a,
{
    if !never_waits {
        return Call::Waiting(Box::pin(operation));
    }
    let mut operation = pin!(operation);
    match operation
        .as_mut()
        .poll(&mut Context::from_waker(Waker::noop()))
    {
        Poll::Ready(answer) => Call::Ready(Some(answer)),
        Poll::Pending => Call::Ready(Some(Err(StoreError::other(
            "a store that declares NEVER_WAITS waited",
        )))),
    }
}

/// The object-safe twin of [`SessionStore`], so that `Session` need not be generic.
pub(crate) trait DynStore: Send + Sync + 'static {
    /// The store's short type name, for spans.
    #[cfg(feature = "tracing")]
    fn name(&self) -> &'static str;
    fn load<'a>(&'a self, key: &'a Key) -> Call<'a, Option<Record>>;
    fn create<'a>(&'a self, record: &'a Record) -> Call<'a, CreateOutcome>;
    fn save<'a>(&'a self, record: &'a Record, expected: u64) -> Call<'a, SaveOutcome>;
    fn touch<'a>(
        &'a self,
        key: &'a Key,
        expected: u64,
        expires_at: SystemTime,
    ) -> Call<'a, SaveOutcome>;
    fn remove<'a>(&'a self, key: &'a Key, expected: u64) -> Call<'a, SaveOutcome>;
    fn delete<'a>(&'a self, key: &'a Key) -> Call<'a, ()>;
    fn owned<'a>(&'a self, owner: &'a str) -> Call<'a, Vec<Record>>;
}

impl<S: SessionStore> DynStore for S {
    #[cfg(feature = "tracing")]
    fn name(&self) -> &'static str {
        crate::trace::store_name(std::any::type_name::<S>())
    }
    fn load<'a>(&'a self, key: &'a Key) -> Call<'a, Option<Record>> {
        call(S::NEVER_WAITS, SessionStore::load(self, key))
    }
    fn create<'a>(&'a self, record: &'a Record) -> Call<'a, CreateOutcome> {
        call(S::NEVER_WAITS, SessionStore::create(self, record))
    }
    fn save<'a>(&'a self, record: &'a Record, expected: u64) -> Call<'a, SaveOutcome> {
        call(S::NEVER_WAITS, SessionStore::save(self, record, expected))
    }
    fn touch<'a>(
        &'a self,
        key: &'a Key,
        expected: u64,
        expires_at: SystemTime,
    ) -> Call<'a, SaveOutcome> {
        call(
            S::NEVER_WAITS,
            SessionStore::touch(self, key, expected, expires_at),
        )
    }
    fn remove<'a>(&'a self, key: &'a Key, expected: u64) -> Call<'a, SaveOutcome> {
        call(S::NEVER_WAITS, SessionStore::remove(self, key, expected))
    }
    fn delete<'a>(&'a self, key: &'a Key) -> Call<'a, ()> {
        call(S::NEVER_WAITS, SessionStore::delete(self, key))
    }
    fn owned<'a>(&'a self, owner: &'a str) -> Call<'a, Vec<Record>> {
        call(S::NEVER_WAITS, SessionStore::owned(self, owner))
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, Ordering};

    use bytes::Bytes;

    use super::*;

    /// A store that claims never to wait; `waits` makes its loads wait once anyway.
    struct Claims {
        waits: AtomicBool,
    }

    impl SessionStore for Claims {
        const NEVER_WAITS: bool = true;

        async fn load(&self, key: &Key) -> Result<Option<Record>, StoreError> {
            if self.waits.load(Ordering::SeqCst) {
                tokio::task::yield_now().await;
            }
            Ok(Some(Record::from_unix_ms(*key, Bytes::new(), 1, u64::MAX)))
        }
        async fn create(&self, _: &Record) -> Result<CreateOutcome, StoreError> {
            Ok(CreateOutcome::Created)
        }
        async fn save(&self, _: &Record, _: u64) -> Result<SaveOutcome, StoreError> {
            Ok(SaveOutcome::Saved)
        }
        async fn touch(&self, _: &Key, _: u64, _: SystemTime) -> Result<SaveOutcome, StoreError> {
            Ok(SaveOutcome::Saved)
        }
        async fn remove(&self, _: &Key, _: u64) -> Result<SaveOutcome, StoreError> {
            Ok(SaveOutcome::Saved)
        }
        async fn delete(&self, _: &Key) -> Result<(), StoreError> {
            Ok(())
        }
        async fn owned(&self, _: &str) -> Result<Vec<Record>, StoreError> {
            Ok(Vec::new())
        }
    }

    #[tokio::test]
    async fn a_store_that_never_waits_is_answered_in_place() {
        let store = Claims {
            waits: AtomicBool::new(false),
        };
        let key = Key::random();
        let call = DynStore::load(&store, &key);
        assert!(matches!(call, Call::Ready(Some(Ok(Some(_))))));
        assert!(call.await.unwrap().is_some());
    }

    #[tokio::test]
    async fn a_store_that_claims_never_to_wait_and_waits_fails_clearly() {
        let store = Claims {
            waits: AtomicBool::new(true),
        };
        let err = DynStore::load(&store, &Key::random()).await.unwrap_err();
        assert!(!err.is_unavailable() && !err.is_corrupt(), "{err}");
        let cause = std::error::Error::source(&err).unwrap().to_string();
        assert!(cause.contains("NEVER_WAITS"), "{cause}");
    }
}
