//! [`MemoryStore`]: sessions in this process's memory, sharded, bounded and swept.

mod shard;

use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};
use std::time::{Duration, SystemTime};

use crate::error::StoreError;
use crate::key::Key;
use crate::store::{CreateOutcome, Record, SaveOutcome, SessionStore, unix_ms};

use self::shard::{ENTRY_OVERHEAD, Limits, Shard};

/// Sessions kept in this process's memory: fast, and gone when the process exits.
///
/// The sessions are spread over independently locked shards (64 by default), so concurrent
/// requests rarely wait for each other and no lock is held across an `.await`. Expired
/// sessions are never returned, and a background task (started on the first write, when a
/// tokio runtime is running) sweeps them out every minute; it stops when the last clone of the
/// store is dropped.
///
/// # The bound
/// The store holds at most [`max_bytes`](MemoryStoreBuilder::max_bytes) (default 256 MiB) and
/// at most [`max_sessions`](MemoryStoreBuilder::max_sessions) sessions (default 1,000,000), so
/// a flood of new visitors cannot exhaust memory. A session counts for the length of its data
/// plus [`SESSION_OVERHEAD`](MemoryStore::SESSION_OVERHEAD) (192 bytes), a fixed estimate of
/// what the store spends on it besides; [`bytes`](MemoryStore::bytes) answers the total. Each
/// shard holds an equal part of both bounds.
///
/// At the bound, a new session (or a save that makes one larger) makes room by **evicting**
/// what is cheapest to lose, in this order:
///
/// 1. expired sessions: the background sweep removes them every minute, and at the bound each
///    make-room first checks the next 8 slots of a sweep that goes round the shard, and
///    removes an expired session it finds at the head of a queue whatever its use;
/// 2. sessions that were never used again after the request that created them: new sessions
///    wait in a probation queue, in creation order, and a flood of visitors who never come
///    back only ever evicts its own kind;
/// 3. among sessions that were used again (loaded, saved or touched after their creation),
///    the least recently used, approximately: eviction gives each a second chance (a `CLOCK`)
///    and takes from them only while they fill more than nine tenths of the shard.
///
/// A use costs one bit in the session's slot (the first use after creation also moves it out
/// of probation), and evicting one session looks at no more than 41 slots (8 for the sweep, up
/// to 32 second chances, the one evicted), so a create at the bound costs about as much as one
/// below it, whatever the size of the shard. An evicted session is gone like an expired one:
/// its next request gets a fresh session, and a write the layer makes to it is answered
/// [`Missing`](crate::store::SaveOutcome::Missing). [`evictions`](MemoryStore::evictions) counts
/// them. So a flood of new sessions never refuses anyone, and a logged-in user who came back
/// once after logging in stays logged in unless the sessions that came back fill the shard.
/// A session just created (a login that cycles the id included) is on probation until its
/// next request: under a flood of new sessions it has as long as the flood takes to fill the
/// shard.
///
/// A record larger than a shard's part of `max_bytes` (4 MiB by default) is refused with
/// [`StoreError::unavailable`] (a 503 from the layer) and nothing is evicted for it: the
/// builder keeps at least 2 MiB per shard (fewer shards for a small bound), twice the layer's
/// default record size limit.
///
/// # Examples
/// ```
/// use std::time::Duration;
/// use hyper_sessions::{MemoryStore, SessionLayer};
///
/// let store = MemoryStore::builder()
///     .max_bytes(64 << 20)
///     .max_sessions(100_000)
///     .sweep_interval(Duration::from_secs(30))
///     .build();
/// let layer = SessionLayer::new(store.clone());
/// assert_eq!(store.len(), 0);
/// assert_eq!(store.bytes(), 0);
/// # let _ = layer;
/// ```
#[derive(Clone, Default)]
pub struct MemoryStore {
    inner: Arc<Inner>,
}

struct Inner {
    shards: Box<[Mutex<Shard>]>,
    limits: Limits,
    sweep_interval: Duration,
    sweeper_started: AtomicBool,
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
    max_bytes: usize,
    shards: usize,
    sweep_interval: Duration,
}

/// The least a shard holds in bytes when the bound allows: twice the layer's default record
/// size limit (1 MiB).
const MIN_SHARD_BYTES: usize = 2 << 20;

impl Default for MemoryStoreBuilder {
    fn default() -> Self {
        MemoryStoreBuilder {
            max_sessions: 1_000_000,
            max_bytes: 256 << 20,
            shards: 64,
            sweep_interval: Duration::from_secs(60),
        }
    }
}

impl MemoryStoreBuilder {
    /// The most sessions the store holds (default 1,000,000). Each shard holds an equal part,
    /// so a shard may evict a little before the total is reached (there are never more shards
    /// than sessions).
    pub fn max_sessions(mut self, max: usize) -> Self {
        self.max_sessions = max.max(1);
        self
    }

    /// The most bytes the store holds, counting each session's data plus a fixed estimate of
    /// its overhead (see [`MemoryStore`], "The bound"). Default 256 MiB: about a million small
    /// sessions (a login and a few values) or 60,000 of 4 KiB, which a small server can spare.
    /// Each shard holds an equal part (the store never holds more than the total), and the
    /// store uses fewer shards when that part would be under 2 MiB.
    pub fn max_bytes(mut self, max: usize) -> Self {
        self.max_bytes = max.max(1);
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
        // Never more shards than sessions, nor shards under 2 MiB: a small bound stays close
        // to exact and still holds a large record.
        let shards = self
            .shards
            .min(self.max_sessions)
            .min((self.max_bytes / MIN_SHARD_BYTES).max(1));
        let limits = Limits {
            // A shard's slots are numbered in a u32.
            sessions: self
                .max_sessions
                .div_ceil(shards)
                .min(u32::MAX as usize - 1),
            bytes: self.max_bytes / shards,
        };
        Inner {
            shards: (0..shards)
                .map(|_| Mutex::new(Shard::new(limits)))
                .collect(),
            limits,
            sweep_interval: self.sweep_interval,
            sweeper_started: AtomicBool::new(false),
        }
    }
}

impl MemoryStore {
    /// The bytes each session counts for beyond its data, against
    /// [`max_bytes`](MemoryStoreBuilder::max_bytes): an estimate of the store's own memory per
    /// session (its slot, its entry in the id map, the headers of its data's allocation and the
    /// spare capacity of the structures), measured by `cargo bench --bench footprint`.
    pub const SESSION_OVERHEAD: usize = ENTRY_OVERHEAD;

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

    /// The bytes the store counts against [`max_bytes`](MemoryStoreBuilder::max_bytes): each
    /// session's data plus a fixed estimate of its overhead, expired sessions not yet swept
    /// included. Never more than the bound.
    pub fn bytes(&self) -> usize {
        self.inner.shards.iter().map(|s| lock(s).bytes()).sum()
    }

    /// How many live sessions were evicted to make room, since the store was built (expired
    /// sessions removed on the way are not counted).
    pub fn evictions(&self) -> u64 {
        self.inner.shards.iter().map(|s| lock(s).evictions()).sum()
    }

    /// Removes every expired session now; answers how many were removed.
    pub fn sweep_expired(&self) -> usize {
        let now_ms = now_ms();
        self.inner
            .shards
            .iter()
            .map(|s| lock(s).sweep(now_ms))
            .sum()
    }

    fn shard(&self, key: &Key) -> MutexGuard<'_, Shard> {
        let n = self.inner.shards.len();
        // The key's high bits pick the shard; its low bits hash within it.
        let index = usize::try_from(key.high_bits()).unwrap_or(0) % n;
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
            lock(&inner.shards[i]).sweep(now_ms());
            drop(inner);
            // Let requests run between shards.
            tokio::task::yield_now().await;
        }
    }
}

fn lock(m: &Mutex<Shard>) -> MutexGuard<'_, Shard> {
    // Nothing panics while a shard is locked; if something did, the shard is still consistent.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

fn now_ms() -> u64 {
    unix_ms(SystemTime::now())
}

impl fmt::Debug for MemoryStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemoryStore")
            .field("shards", &self.inner.shards.len())
            .field("shard_max_sessions", &self.inner.limits.sessions)
            .field("shard_max_bytes", &self.inner.limits.bytes)
            .field("sweep_interval", &self.inner.sweep_interval)
            .finish_non_exhaustive()
    }
}

/// Every operation is one lock of one shard, never held across an `.await`: the store never
/// waits, and the layer runs its operations in place.
impl SessionStore for MemoryStore {
    const NEVER_WAITS: bool = true;

    async fn load(&self, key: &Key) -> Result<Option<Record>, StoreError> {
        Ok(self.shard(key).load(key, now_ms()))
    }

    async fn create(&self, record: &Record) -> Result<CreateOutcome, StoreError> {
        self.start_sweeper();
        let now_ms = now_ms();
        self.shard(&record.key()).create(record, now_ms)
    }

    async fn save(
        &self,
        record: &Record,
        expected_version: u64,
    ) -> Result<SaveOutcome, StoreError> {
        let now_ms = now_ms();
        self.shard(&record.key())
            .save(record, expected_version, now_ms)
    }

    async fn touch(
        &self,
        key: &Key,
        expected_version: u64,
        expires_at: SystemTime,
    ) -> Result<SaveOutcome, StoreError> {
        let now_ms = now_ms();
        Ok(self
            .shard(key)
            .touch(key, expected_version, unix_ms(expires_at), now_ms))
    }

    async fn remove(&self, key: &Key, expected_version: u64) -> Result<SaveOutcome, StoreError> {
        let now_ms = now_ms();
        Ok(self.shard(key).remove(key, expected_version, now_ms))
    }

    async fn delete(&self, key: &Key) -> Result<(), StoreError> {
        self.shard(key).delete(key);
        Ok(())
    }

    /// One shard locked at a time: a listing never holds up the requests of other shards.
    async fn owned(&self, owner: &str) -> Result<Vec<Record>, StoreError> {
        let now_ms = now_ms();
        let mut records = Vec::new();
        for shard in &self.inner.shards {
            lock(shard).owned(owner, now_ms, &mut records);
        }
        Ok(records)
    }
}
