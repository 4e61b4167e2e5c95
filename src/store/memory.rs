//! [`MemoryStore`]: sessions in this process's memory, sharded, bounded and swept.

use std::collections::HashMap;
use std::collections::hash_map::{self, OccupiedEntry};
use std::fmt;
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};
use std::time::{Duration, SystemTime};

use bytes::Bytes;

use crate::error::StoreError;
use crate::id::Id;
use crate::record::{Record, unix_ms};
use crate::store::{CreateOutcome, SaveOutcome, SessionStore};

/// Sessions kept in this process's memory: fast, and gone when the process exits.
///
/// The sessions are spread over independently locked shards (64 by default), so concurrent
/// requests rarely wait for each other and no lock is held across an `.await`. Expired
/// sessions are never returned, and a background task (started on the first write, when a
/// tokio runtime is running) sweeps them out every minute; it stops when the last clone of the
/// store is dropped.
///
/// # The bound
/// The store holds at most [`max_sessions`](MemoryStoreBuilder::max_sessions) live sessions
/// (default 1,000,000), so a flood of new visitors cannot exhaust memory. At the bound, creating a
/// session first sweeps expired sessions out of its shard; if the shard is still full, the
/// create fails with [`StoreError::unavailable`], which the layer answers with a 503 by
/// default. Existing sessions keep working, and nobody is logged out to make room. Each session
/// is also bounded in size by the layer's record size limit.
///
/// # Examples
/// ```
/// use std::time::Duration;
/// use hyper_sessions::{MemoryStore, SessionLayer};
///
/// let store = MemoryStore::builder()
///     .max_sessions(100_000)
///     .sweep_interval(Duration::from_secs(30))
///     .build();
/// let layer = SessionLayer::new(store.clone());
/// assert_eq!(store.len(), 0);
/// # let _ = layer;
/// ```
#[derive(Clone, Default)]
pub struct MemoryStore {
    inner: Arc<Inner>,
}

struct Inner {
    shards: Box<[Mutex<Shard>]>,
    shard_capacity: usize,
    sweep_interval: Duration,
    sweeper_started: AtomicBool,
}

type Shard = HashMap<Id, Entry, BuildHasherDefault<IdHasher>>;

struct Entry {
    version: u64,
    expires_ms: u64,
    data: Bytes,
}

impl Entry {
    fn live(&self, now_ms: u64) -> bool {
        self.expires_ms > now_ms
    }
}

/// Ids are random: their low 64 bits are a hash already.
#[derive(Default)]
struct IdHasher(u64);

impl Hasher for IdHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        // Not used by `Id` (which writes a u128); a plain FNV-1a keeps it correct anyway.
        for &b in bytes {
            self.0 = (self.0 ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
        }
    }

    #[allow(clippy::cast_possible_truncation)]
    fn write_u128(&mut self, n: u128) {
        self.0 = n as u64;
    }
}

impl Default for Inner {
    fn default() -> Self {
        MemoryStoreBuilder::default().inner()
    }
}

/// Configures a [`MemoryStore`].
#[derive(Debug, Clone)]
#[must_use]
pub struct MemoryStoreBuilder {
    max_sessions: usize,
    shards: usize,
    sweep_interval: Duration,
}

impl Default for MemoryStoreBuilder {
    fn default() -> Self {
        MemoryStoreBuilder {
            max_sessions: 1_000_000,
            shards: 64,
            sweep_interval: Duration::from_secs(60),
        }
    }
}

impl MemoryStoreBuilder {
    /// The most live sessions the store holds (default 1,000,000). Each shard holds an equal
    /// part, so the store may refuse a new session a little before the total is reached (there
    /// are never more shards than sessions).
    pub fn max_sessions(mut self, max: usize) -> Self {
        self.max_sessions = max.max(1);
        self
    }

    /// How many independently locked shards (default 64; at least 1).
    pub fn shards(mut self, shards: usize) -> Self {
        self.shards = shards.max(1);
        self
    }

    /// How often the background task sweeps out expired sessions (default a minute).
    pub fn sweep_interval(mut self, interval: Duration) -> Self {
        self.sweep_interval = interval.max(Duration::from_millis(1));
        self
    }

    /// The store.
    pub fn build(self) -> MemoryStore {
        MemoryStore {
            inner: Arc::new(self.inner()),
        }
    }

    fn inner(self) -> Inner {
        // Never more shards than sessions: a small bound stays close to exact.
        let shards = self.shards.min(self.max_sessions);
        Inner {
            shards: (0..shards).map(|_| Mutex::default()).collect(),
            shard_capacity: self.max_sessions.div_ceil(shards),
            sweep_interval: self.sweep_interval,
            sweeper_started: AtomicBool::new(false),
        }
    }
}

impl MemoryStore {
    /// A store with the default settings.
    pub fn new() -> Self {
        MemoryStore::default()
    }

    /// A builder for a store with other settings.
    pub fn builder() -> MemoryStoreBuilder {
        MemoryStoreBuilder::default()
    }

    /// How many sessions the store holds, counting expired ones not yet swept.
    pub fn len(&self) -> usize {
        self.inner.shards.iter().map(|s| lock(s).len()).sum()
    }

    /// Whether the store holds no sessions at all.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Removes every expired session now; answers how many were removed.
    pub fn sweep_expired(&self) -> usize {
        let now_ms = now_ms();
        self.inner
            .shards
            .iter()
            .map(|s| sweep_shard(&mut lock(s), now_ms))
            .sum()
    }

    fn shard(&self, id: &Id) -> MutexGuard<'_, Shard> {
        let n = self.inner.shards.len();
        // The id's high bits pick the shard; its low bits hash within it.
        let index = usize::try_from(id.high_bits()).unwrap_or(0) % n;
        lock(&self.inner.shards[index])
    }

    fn start_sweeper(&self) {
        if self.inner.sweeper_started.load(Ordering::Relaxed)
            || self.inner.sweeper_started.swap(true, Ordering::AcqRel)
        {
            return;
        }
        let Ok(handle) = tokio::runtime::Handle::try_current() else {
            // No runtime here; try again on a later write.
            self.inner.sweeper_started.store(false, Ordering::Release);
            return;
        };
        let weak = Arc::downgrade(&self.inner);
        handle.spawn(sweep_forever(weak, self.inner.sweep_interval));
    }
}

async fn sweep_forever(store: Weak<Inner>, interval: Duration) {
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ticker.tick().await;
    loop {
        ticker.tick().await;
        let Some(inner) = store.upgrade() else { return };
        let shards = inner.shards.len();
        drop(inner);
        for i in 0..shards {
            let Some(inner) = store.upgrade() else { return };
            sweep_shard(&mut lock(&inner.shards[i]), now_ms());
            drop(inner);
            // Let requests run between shards.
            tokio::task::yield_now().await;
        }
    }
}

fn sweep_shard(shard: &mut Shard, now_ms: u64) -> usize {
    let before = shard.len();
    shard.retain(|_, e| e.live(now_ms));
    before - shard.len()
}

fn lock(m: &Mutex<Shard>) -> MutexGuard<'_, Shard> {
    // Nothing panics while a shard is locked; if something did, the map is still consistent.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

fn now_ms() -> u64 {
    unix_ms(SystemTime::now())
}

impl fmt::Debug for MemoryStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemoryStore")
            .field("shards", &self.inner.shards.len())
            .field("shard_capacity", &self.inner.shard_capacity)
            .field("sweep_interval", &self.inner.sweep_interval)
            .finish_non_exhaustive()
    }
}

impl MemoryStore {
    /// Runs `change` on the live entry with this id if its version is `expected`.
    fn change_if(
        &self,
        id: &Id,
        expected: u64,
        change: impl FnOnce(OccupiedEntry<'_, Id, Entry>),
    ) -> SaveOutcome {
        let mut shard = self.shard(id);
        match shard.entry(*id) {
            hash_map::Entry::Occupied(e) if e.get().live(now_ms()) => {
                if e.get().version != expected {
                    return SaveOutcome::Conflict;
                }
                change(e);
                SaveOutcome::Saved
            }
            _ => SaveOutcome::Missing,
        }
    }
}

/// Every operation is one lock of one shard, never held across an `.await`: the store never
/// waits, and the layer runs its operations in place.
impl SessionStore for MemoryStore {
    const NEVER_WAITS: bool = true;

    async fn load(&self, id: &Id) -> Result<Option<Record>, StoreError> {
        let shard = self.shard(id);
        Ok(shard
            .get(id)
            .filter(|e| e.live(now_ms()))
            .map(|e| Record::from_unix_ms(*id, e.data.clone(), e.version, e.expires_ms)))
    }

    async fn create(&self, record: &Record) -> Result<CreateOutcome, StoreError> {
        self.start_sweeper();
        let now_ms = now_ms();
        let mut shard = self.shard(&record.id());
        if shard.get(&record.id()).is_some_and(|e| e.live(now_ms)) {
            return Ok(CreateOutcome::IdTaken);
        }
        if shard.len() >= self.inner.shard_capacity && sweep_shard(&mut shard, now_ms) == 0 {
            return Err(StoreError::unavailable(format!(
                "memory store is full ({} sessions per shard)",
                self.inner.shard_capacity
            )));
        }
        shard.insert(
            record.id(),
            Entry {
                version: record.version(),
                expires_ms: record.expires_at_unix_ms(),
                data: record.data().clone(),
            },
        );
        Ok(CreateOutcome::Created)
    }

    async fn save(
        &self,
        record: &Record,
        expected_version: u64,
    ) -> Result<SaveOutcome, StoreError> {
        let id = record.id();
        Ok(self.change_if(&id, expected_version, |mut e| {
            let e = e.get_mut();
            e.version = record.version();
            e.expires_ms = record.expires_at_unix_ms();
            e.data = record.data().clone();
        }))
    }

    async fn touch(
        &self,
        id: &Id,
        expected_version: u64,
        expires_at: SystemTime,
    ) -> Result<SaveOutcome, StoreError> {
        Ok(self.change_if(id, expected_version, |mut e| {
            e.get_mut().expires_ms = unix_ms(expires_at);
        }))
    }

    async fn remove(&self, id: &Id, expected_version: u64) -> Result<SaveOutcome, StoreError> {
        Ok(self.change_if(id, expected_version, |e| {
            e.remove();
        }))
    }

    async fn delete(&self, id: &Id) -> Result<(), StoreError> {
        self.shard(id).remove(id);
        Ok(())
    }
}
