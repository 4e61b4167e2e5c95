//! The [`Session`] handle: typed access, flash values, the change log and the commit.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::config::{Config, Expiry};
use crate::cookie::{CookieAction, CookieLookup};
use crate::error::{Chain, Error, Kind, StoreError};
use crate::id::Id;
use crate::record::{Record, SessionData, from_unix_ms, unix_ms};
use crate::store::{Call, CreateOutcome, DynStore, SaveOutcome};

/// What every request of one layer shares: the store and the configuration.
pub(crate) struct Shared {
    pub(crate) store: Box<dyn DynStore>,
    pub(crate) config: Config,
}

/// The session of one request.
///
/// The layer puts one in every request's extensions; get it with [`Session::from_request`]
/// (or `req.extensions().get::<Session>()`). It is cheap to clone (an `Arc`) and `Send + Sync`,
/// so it can be passed to tasks the handler spawns; changes made after the response has been
/// sent are not saved (except through [`update`](Session::update), which saves at once).
///
/// Nothing is loaded until the first method that needs the data: a request that never uses
/// its session costs no store I/O. After the inner service answers, the layer saves what
/// changed in one compare-and-set; when another request of the same session saved in between,
/// this request's own changes (the keys it set, removed or cleared, its updates) are replayed
/// on the fresh record, so concurrent requests that write different keys both keep their
/// writes.
///
/// # Examples
/// ```
/// use hyper::{Request, Response};
/// use hyper_sessions::Session;
///
/// async fn handler<B>(req: Request<B>) -> Result<Response<String>, hyper_sessions::Error> {
///     let session = Session::from_request(&req)?;
///     let visits: u64 = session.get("visits").await?.unwrap_or(0);
///     session.insert("visits", &(visits + 1)).await?;
///     if let Some(message) = session.get::<String>("message").await? {
///         // A flash from an earlier request, shown once.
///         println!("{message}");
///     }
///     Ok(Response::new(format!("visit {visits}")))
/// }
/// ```
#[derive(Clone)]
pub struct Session {
    inner: Arc<Inner>,
}

struct Inner {
    shared: Arc<Shared>,
    cookie: CookieLookup,
    /// Serialises this handle's own store I/O (load, commit, destroy) so clones used
    /// concurrently within one request do not race each other. Per request, never shared.
    io: IoLock,
    /// Never held across an `.await`.
    state: Mutex<State>,
}

/// An async lock without a queue of its own: a flag, and a `Notify` that only a waiting clone
/// of the handle ever parks on (a request's clones rarely do I/O at the same time).
#[derive(Default)]
struct IoLock {
    busy: AtomicBool,
    released: tokio::sync::Notify,
}

/// Holds an [`IoLock`]; releasing wakes one waiter, if any.
struct IoGuard<'a>(&'a IoLock);

impl Drop for IoGuard<'_> {
    fn drop(&mut self) {
        self.0.busy.store(false, Ordering::Release);
        self.0.released.notify_one();
    }
}

impl IoLock {
    fn try_lock(&self) -> Option<IoGuard<'_>> {
        // `then`, not `then_some`: a guard made and dropped on failure would release the lock.
        (!self.busy.swap(true, Ordering::Acquire)).then(|| IoGuard(self))
    }

    async fn lock(&self) -> IoGuard<'_> {
        loop {
            if let Some(guard) = self.try_lock() {
                return guard;
            }
            let notified = std::pin::pin!(self.released.notified());
            let mut notified = notified;
            // Registered before the second look, so a release in between is not missed.
            notified.as_mut().enable();
            if let Some(guard) = self.try_lock() {
                return guard;
            }
            notified.await;
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct Stored {
    id: Id,
    version: u64,
    expires_ms: u64,
}

type UpdateFn = Arc<dyn Fn(Option<&str>) -> Result<Arc<str>, Error> + Send + Sync>;

/// One change this request made, kept so it can be replayed on a fresher record.
#[derive(Clone)]
enum Change {
    Set(Box<str>, Arc<str>),
    Flash(Box<str>, Arc<str>),
    Remove(String),
    Clear,
    Update(String, UpdateFn),
    SetExpiry(Expiry),
}

impl Change {
    fn apply(&self, data: &mut SessionData) -> Result<(), Error> {
        match self {
            Change::Set(k, v) => data.set(k, v.clone()),
            Change::Flash(k, v) => data.set_flash(k, v.clone()),
            Change::Remove(k) => {
                data.remove(k);
            }
            Change::Clear => data.clear(),
            Change::Update(k, f) => {
                let new = f(data.get(k))?;
                data.set(k, new);
            }
            Change::SetExpiry(e) => data.expiry = Some(*e),
        }
        Ok(())
    }
}

#[derive(Default)]
struct State {
    /// The handler called a method (only then may the response carry a removal cookie).
    used: bool,
    loaded: bool,
    /// The stored record behind this session, if any.
    stored: Option<Stored>,
    data: SessionData,
    changes: Vec<Change>,
    /// The id a new or cycled session will be created under.
    new_id: Option<Id>,
    cycle: bool,
    expiry_changed: bool,
    destroyed: bool,
    /// An explicit save (`update`) failed: nothing more is written for this request.
    failed: bool,
    /// When this request last read the clock (Unix ms): at the load, or at a commit.
    clock_ms: u64,
    /// The cookie to send: set after a create, a cycle or an expiry refresh.
    set_cookie: Option<(Id, Option<Duration>)>,
}

/// The future of [`Session::load`].
struct Load<'a> {
    session: &'a Session,
    store: Option<Call<'a, Option<Record>>>,
    now_ms: u64,
}

impl Future for Load<'_> {
    type Output = Result<(), Error>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        // Taken out, so that every way out of this poll but `Pending` leaves the load done.
        let Some(mut store) = self.store.take() else {
            return Poll::Ready(Ok(()));
        };
        let answer = match Pin::new(&mut store).poll(cx) {
            Poll::Ready(answer) => answer,
            Poll::Pending => {
                self.store = Some(store);
                return Poll::Pending;
            }
        };
        let record = match answer {
            Ok(record) => record,
            Err(e) if e.is_corrupt() => {
                log::error!(
                    "hyper-sessions: ignoring unreadable session record: {}; starting a fresh session",
                    Chain(&e)
                );
                None
            }
            Err(e) => return Poll::Ready(Err(e.into())),
        };
        let session = self.session;
        let mut st = session.state();
        st.install(record, session.config(), self.now_ms);
        Poll::Ready(st.check_live())
    }
}

/// The store work a commit has to do next, decided under the state lock.
enum Plan {
    Nothing,
    Create {
        record: Record,
        applied: usize,
        replaces: Option<Id>,
    },
    Save {
        record: Record,
        expected: u64,
        applied: usize,
    },
    Delete(Id),
    Touch(Id, u64, u64),
}

/// The store's expiry is refreshed once this fraction of the idle window has passed.
const REFRESH_DIVISOR: u32 = 10;

impl State {
    fn check_live(&self) -> Result<(), Error> {
        if self.destroyed {
            Err(Error::new(Kind::Destroyed))
        } else if self.failed {
            Err(Error::new(Kind::Store))
        } else {
            Ok(())
        }
    }

    fn policy(&self, config: &Config) -> Expiry {
        self.data.expiry.unwrap_or(config.expiry)
    }

    /// The expiry a save at `now` should give the record.
    fn target_expiry(&self, config: &Config, now_ms: u64) -> u64 {
        let idle = duration_ms(self.policy(config).idle_timeout());
        let target = now_ms.saturating_add(idle);
        self.data.deadline.map_or(target, |d| target.min(d))
    }

    fn refresh_due(&self, config: &Config, stored: &Stored, now_ms: u64) -> bool {
        let idle = duration_ms(self.policy(config).idle_timeout());
        let target = self.target_expiry(config, now_ms);
        target > stored.expires_ms
            && target - stored.expires_ms >= idle / u64::from(REFRESH_DIVISOR)
    }

    fn dirty(&self) -> bool {
        !self.changes.is_empty() || self.cycle || self.expiry_changed
    }

    /// Whether the end of the request needs store I/O.
    fn needs_commit(&self, config: &Config, now_ms: u64) -> bool {
        if !self.loaded || self.destroyed || self.failed {
            return false;
        }
        match &self.stored {
            None => self.dirty() && !self.data.is_empty(),
            Some(stored) => self.dirty() || self.refresh_due(config, stored, now_ms),
        }
    }

    /// Installs a loaded record (or its absence), unless a concurrent load already did.
    fn install(&mut self, record: Option<Record>, config: &Config, now_ms: u64) {
        if self.loaded {
            return;
        }
        self.loaded = true;
        self.clock_ms = now_ms;
        let Some(record) = record else { return };
        if record.expires_at_unix_ms() <= now_ms {
            return;
        }
        match SessionData::decode(record.data(), config.max_record_bytes) {
            Ok(data) => {
                if data.deadline.is_some_and(|d| d <= now_ms) {
                    return;
                }
                self.data = data;
                self.stored = Some(Stored {
                    id: record.id(),
                    version: record.version(),
                    expires_ms: record.expires_at_unix_ms(),
                });
            }
            Err(e) => {
                log::error!(
                    "hyper-sessions: ignoring unreadable session record (version {}): {}; \
                     starting a fresh session",
                    record.version(),
                    Chain(&e)
                );
            }
        }
    }

    fn record(
        &self,
        id: Id,
        version: u64,
        expires_ms: u64,
        config: &Config,
    ) -> Result<Record, Error> {
        let bytes = self.data.encode();
        if bytes.len() > config.max_record_bytes {
            return Err(too_large(bytes.len(), config.max_record_bytes));
        }
        Ok(Record::from_unix_ms(id, bytes, version, expires_ms))
    }

    fn plan(&mut self, config: &Config, now_ms: u64) -> Result<Plan, Error> {
        self.clock_ms = now_ms;
        if !self.needs_commit(config, now_ms) {
            return Ok(Plan::Nothing);
        }
        let applied = self.changes.len();
        let Some(stored) = self.stored else {
            if self.data.deadline.is_none() {
                self.data.deadline = config
                    .absolute_lifetime
                    .map(|l| now_ms.saturating_add(duration_ms(l)));
            }
            let id = *self.new_id.get_or_insert_with(Id::random);
            let record = self.record(id, 1, self.target_expiry(config, now_ms), config)?;
            return Ok(Plan::Create {
                record,
                applied,
                replaces: None,
            });
        };
        if self.data.is_empty() {
            if self.dirty() {
                return Ok(Plan::Delete(stored.id));
            }
        } else if self.cycle {
            let id = *self.new_id.get_or_insert_with(Id::random);
            let record = self.record(id, 1, self.target_expiry(config, now_ms), config)?;
            return Ok(Plan::Create {
                record,
                applied,
                replaces: Some(stored.id),
            });
        } else if self.dirty() {
            let expires_ms = if self.expiry_changed || self.refresh_due(config, &stored, now_ms) {
                self.target_expiry(config, now_ms)
            } else {
                stored.expires_ms
            };
            let record = self.record(stored.id, stored.version + 1, expires_ms, config)?;
            return Ok(Plan::Save {
                record,
                expected: stored.version,
                applied,
            });
        }
        Ok(Plan::Touch(
            stored.id,
            stored.version,
            self.target_expiry(config, now_ms),
        ))
    }

    /// A record now holds the changes up to `applied`.
    fn stored_as(&mut self, record: &Record, applied: usize, config: &Config, now_ms: u64) {
        let new_id = self.stored.is_none_or(|s| s.id != record.id());
        let refreshed = new_id
            || self
                .stored
                .is_some_and(|s| s.expires_ms != record.expires_at_unix_ms());
        self.stored = Some(Stored {
            id: record.id(),
            version: record.version(),
            expires_ms: record.expires_at_unix_ms(),
        });
        if applied == self.changes.len() {
            self.changes.clear();
        } else {
            self.changes.drain(..applied);
        }
        self.cycle = false;
        self.expiry_changed = false;
        self.new_id = None;
        if refreshed {
            self.cookie_for(
                record.id(),
                record.expires_at_unix_ms(),
                new_id,
                config,
                now_ms,
            );
        }
    }

    /// Sends the cookie when the id is new, or when a persistent cookie's lifetime moved.
    fn cookie_for(&mut self, id: Id, expires_ms: u64, new_id: bool, config: &Config, now_ms: u64) {
        let persistent = self.policy(config).persistent_cookie();
        if new_id || persistent {
            let max_age =
                persistent.then(|| Duration::from_millis(expires_ms.saturating_sub(now_ms)));
            self.set_cookie = Some((id, max_age));
        }
    }

    /// The stored session vanished under us: it stays gone.
    fn gone(&mut self) {
        self.stored = None;
        self.data.clear();
        self.changes.clear();
        self.set_cookie = None;
        self.destroyed = true;
    }

    /// Rebases this request's changes on a fresher copy of the record.
    fn rebase(&mut self, fresh: Option<Record>, config: &Config, now_ms: u64) -> Result<(), Error> {
        let mut probe = State::default();
        probe.install(fresh, config, now_ms);
        let Some(stored) = probe.stored else {
            self.gone();
            return Err(Error::new(Kind::Gone));
        };
        let mut data = probe.data;
        for change in &self.changes {
            change.apply(&mut data)?;
        }
        self.data = data;
        self.stored = Some(stored);
        Ok(())
    }

    fn cookie_action(&self, client_sent_cookie: bool) -> CookieAction {
        if let Some((id, max_age)) = self.set_cookie {
            CookieAction::Set(id, max_age)
        } else if client_sent_cookie
            && self.used
            && (self.destroyed || (self.loaded && self.stored.is_none()))
        {
            CookieAction::Remove
        } else {
            CookieAction::None
        }
    }
}

fn duration_ms(d: Duration) -> u64 {
    d.as_secs()
        .saturating_mul(1000)
        .saturating_add(u64::from(d.subsec_millis()))
}

/// A random pause below 0.5 ms, doubled per attempt up to 32 ms.
fn conflict_backoff(attempt: u32) -> Duration {
    let window_us = 500u64 << attempt.min(6);
    // Jitter from the clock's nanoseconds and this task's stack address, well mixed; it needs
    // to differ between the colliding requests, not to be unpredictable.
    let seed = u64::from(
        SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .subsec_nanos(),
    ) ^ (&raw const window_us as u64);
    let mut z = seed.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    Duration::from_micros((z ^ (z >> 31)) % window_us)
}

fn too_large(len: usize, max: usize) -> Error {
    Error::with(
        Kind::TooLarge,
        format!("session record of about {len} bytes exceeds the limit of {max} bytes"),
    )
}

fn serde_error(e: serde_json::Error) -> Error {
    Error::with(Kind::Serde, e)
}

fn to_json<T: Serialize + ?Sized>(value: &T) -> Result<Arc<str>, Error> {
    let mut out = JsonBuf {
        stack: [0; 64],
        len: 0,
        heap: Vec::new(),
    };
    serde_json::to_writer(&mut out, value).map_err(serde_error)?;
    // serde_json writes UTF-8.
    std::str::from_utf8(out.bytes())
        .map(Arc::from)
        .map_err(|e| Error::with(Kind::Serde, e))
}

/// Where a value is serialized before it is copied once into its `Arc`: on the stack while it
/// fits (most values are small), then in a `Vec` that takes over what was written so far.
struct JsonBuf {
    stack: [u8; 64],
    len: usize,
    heap: Vec<u8>,
}

impl JsonBuf {
    fn bytes(&self) -> &[u8] {
        if self.heap.is_empty() {
            &self.stack[..self.len]
        } else {
            &self.heap
        }
    }
}

impl std::io::Write for JsonBuf {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        if self.heap.is_empty() && self.len + data.len() <= self.stack.len() {
            self.stack[self.len..self.len + data.len()].copy_from_slice(data);
            self.len += data.len();
        } else {
            if self.heap.is_empty() {
                self.heap.reserve(2 * (self.len + data.len()));
                self.heap.extend_from_slice(&self.stack[..self.len]);
            }
            self.heap.extend_from_slice(data);
        }
        Ok(data.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Session {
    pub(crate) fn new(shared: Arc<Shared>, cookie: CookieLookup) -> Self {
        let state = State {
            // Without a valid id there is nothing to load.
            loaded: !matches!(cookie, CookieLookup::Found(_)),
            ..State::default()
        };
        Session {
            inner: Arc::new(Inner {
                shared,
                cookie,
                io: IoLock::default(),
                state: Mutex::new(state),
            }),
        }
    }

    /// The session of a request that went through the [`SessionLayer`](crate::SessionLayer).
    ///
    /// # Errors
    /// An error that answers `true` to [`Error::is_missing_layer`] when the layer is not
    /// installed around this service.
    pub fn from_request<B>(req: &http::Request<B>) -> Result<Session, Error> {
        Session::from_extensions(req.extensions())
    }

    /// The session kept in a request's extensions (for code that holds `http::request::Parts`).
    ///
    /// # Errors
    /// [`Error::is_missing_layer`] when there is none.
    pub fn from_extensions(extensions: &http::Extensions) -> Result<Session, Error> {
        extensions
            .get::<Session>()
            .cloned()
            .ok_or_else(|| Error::new(Kind::MissingLayer))
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // A panic in user code (a Deserialize impl) must not wedge the session.
        self.inner
            .state
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    pub(crate) fn config(&self) -> &Config {
        &self.inner.shared.config
    }

    fn store(&self) -> &dyn DynStore {
        &*self.inner.shared.store
    }

    /// Loads the record on first use. The fast path (already loaded) is synchronous, so the
    /// futures of `get`, `insert` and the rest stay small; the load itself is boxed.
    async fn ready(&self) -> Result<(), Error> {
        {
            let mut st = self.state();
            st.used = true;
            if st.loaded {
                return st.check_live();
            }
        }
        self.load().await
    }

    /// The load, as one boxed store call and a small named future around it. Clones of the
    /// handle that load at the same time each ask the store; the first answer is installed.
    fn load(&self) -> Load<'_> {
        let now_ms = unix_ms(SystemTime::now());
        let store = match &self.inner.cookie {
            CookieLookup::Found(id) => Some(self.store().load(id)),
            // `loaded` starts true for every other lookup.
            _ => None,
        };
        Load {
            session: self,
            store,
            now_ms,
        }
    }

    /// The value under `key`, deserialized as `T`, or `None` if there is none.
    ///
    /// A value stored with [`flash`](Session::flash) is removed by this read: it is returned
    /// once, then gone.
    ///
    /// # Errors
    /// A store error while loading, or [`Error::is_serde`] when the value is not a `T` (a flash
    /// value is then kept).
    #[allow(clippy::manual_async_fn)] // see the comment in the body
    pub fn get<T: DeserializeOwned>(
        &self,
        key: &str,
    ) -> impl Future<Output = Result<Option<T>, Error>> + Send {
        // A block, not an `async fn`: an `async fn`'s future holds its arguments twice, and
        // handlers keep this future (inside their own) across their awaits.
        async move {
            self.ready().await?;
            let mut st = self.state();
            let Some(raw) = st.data.get_bytes(key) else {
                return Ok(None);
            };
            let value = serde_json::from_slice(raw).map_err(serde_error)?;
            if st.data.is_flash(key) {
                st.data.remove(key);
                st.changes.push(Change::Remove(key.to_owned()));
            }
            Ok(Some(value))
        }
    }

    /// Stores `value` under `key`, replacing what was there (a flash becomes a plain value).
    ///
    /// # Errors
    /// [`Error::is_serde`] when `value` does not serialize, [`Error::is_too_large`] when the
    /// session would exceed the layer's record size limit (nothing is changed then), or a
    /// store error while loading.
    pub fn insert<'a, T: Serialize + ?Sized>(
        &'a self,
        key: &'a str,
        value: &T,
    ) -> impl Future<Output = Result<(), Error>> + Send + use<'a, T> {
        self.write(key, to_json(value), false)
    }

    /// Stores a flash value: the next [`get`](Session::get) of `key`, in this request or a
    /// later one (after a redirect, say), returns it and removes it.
    ///
    /// # Errors
    /// As for [`insert`](Session::insert).
    pub fn flash<'a, T: Serialize + ?Sized>(
        &'a self,
        key: &'a str,
        value: &T,
    ) -> impl Future<Output = Result<(), Error>> + Send + use<'a, T> {
        self.write(key, to_json(value), true)
    }

    /// The value is serialized by the caller, before the future exists, so the future does not
    /// hold it (and, a block rather than an `async fn`, holds its arguments once).
    #[allow(clippy::manual_async_fn)]
    fn write<'a>(
        &'a self,
        key: &'a str,
        raw: Result<Arc<str>, Error>,
        flash: bool,
    ) -> impl Future<Output = Result<(), Error>> + Send + use<'a> {
        async move {
            let raw = raw?;
            self.ready().await?;
            let mut st = self.state();
            self.check_size(&st, key, &raw)?;
            if flash {
                st.data.set_flash(key, raw.clone());
                st.changes.push(Change::Flash(key.into(), raw));
            } else {
                st.data.set(key, raw.clone());
                st.changes.push(Change::Set(key.into(), raw));
            }
            Ok(())
        }
    }

    fn check_size(&self, st: &State, key: &str, raw: &str) -> Result<(), Error> {
        let max = self.config().max_record_bytes;
        let new = st.data.approx_len() - st.data.entry_len(key) + key.len() + raw.len() + 4;
        if new > max {
            return Err(too_large(new, max));
        }
        Ok(())
    }

    /// Removes the value under `key`; answers whether there was one.
    ///
    /// # Errors
    /// A store error while loading.
    pub async fn remove(&self, key: &str) -> Result<bool, Error> {
        self.ready().await?;
        let mut st = self.state();
        let existed = st.data.remove(key);
        if existed {
            st.changes.push(Change::Remove(key.to_owned()));
        }
        Ok(existed)
    }

    /// Whether there is a value under `key` (a flash is not consumed by this).
    ///
    /// # Errors
    /// A store error while loading.
    pub async fn contains(&self, key: &str) -> Result<bool, Error> {
        self.ready().await?;
        Ok(self.state().data.contains(key))
    }

    /// The keys of the session's values, sorted.
    ///
    /// # Errors
    /// A store error while loading.
    pub async fn keys(&self) -> Result<Vec<String>, Error> {
        self.ready().await?;
        Ok(self.state().data.keys())
    }

    /// Whether the session holds no values.
    ///
    /// # Errors
    /// A store error while loading.
    pub async fn is_empty(&self) -> Result<bool, Error> {
        self.ready().await?;
        Ok(self.state().data.is_empty())
    }

    /// Removes every value. A session left empty is deleted from the store at the end of the
    /// request and its cookie removed.
    ///
    /// # Errors
    /// A store error while loading.
    pub async fn clear(&self) -> Result<(), Error> {
        self.ready().await?;
        let mut st = self.state();
        st.data.clear();
        st.changes.push(Change::Clear);
        Ok(())
    }

    /// Atomically replaces the value under `key` with `f(current)` and saves the session at
    /// once; returns the value as stored.
    ///
    /// When another request of the same session saved in between, `f` runs again on the fresh
    /// value, so concurrent updates are never lost: 64 concurrent increments of a counter end at
    /// 64. `f` may therefore run more than once and should have no side effects. Every other
    /// change this request made so far is saved along with it.
    ///
    /// If the save fails, the error is returned and nothing more is written for this request.
    ///
    /// # Examples
    /// ```no_run
    /// # async fn f(session: hyper_sessions::Session) -> Result<(), hyper_sessions::Error> {
    /// let hits: u64 = session.update("hits", |n: Option<u64>| n.unwrap_or(0) + 1).await?;
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    /// [`Error::is_serde`] when the current value is not a `T`, a store error, or
    /// [`Error::is_gone`] when the session was destroyed concurrently.
    pub async fn update<T, F>(&self, key: &str, f: F) -> Result<T, Error>
    where
        T: Serialize + DeserializeOwned,
        F: Fn(Option<T>) -> T + Send + Sync + 'static,
    {
        let op: UpdateFn = Arc::new(move |current: Option<&str>| {
            let current = current
                .map(serde_json::from_str::<T>)
                .transpose()
                .map_err(serde_error)?;
            to_json(&f(current))
        });
        self.ready().await?;
        {
            let mut st = self.state();
            let new = op(st.data.get(key))?;
            self.check_size(&st, key, &new)?;
            st.data.set(key, new);
            st.changes.push(Change::Update(key.to_owned(), op));
        }
        if let Err(e) = self.commit().await {
            let mut st = self.state();
            if !st.destroyed {
                st.failed = true;
            }
            return Err(e);
        }
        let st = self.state();
        let raw = st.data.get(key).ok_or_else(|| Error::new(Kind::Gone))?;
        serde_json::from_str(raw).map_err(serde_error)
    }

    /// Deletes the session from the store now; the response removes the cookie. The handle
    /// cannot be used afterwards (its methods answer [`Error::is_destroyed`]).
    ///
    /// # Errors
    /// A store error from the delete; the session is then left as it was.
    pub async fn destroy(&self) -> Result<(), Error> {
        let _io = self.io_lock().await;
        let id = {
            let mut st = self.state();
            st.used = true;
            if st.loaded {
                st.stored.map(|s| s.id)
            } else if let CookieLookup::Found(id) = self.inner.cookie {
                Some(id)
            } else {
                None
            }
        };
        if let Some(id) = id {
            self.store().delete(&id).await?;
        }
        let mut st = self.state();
        st.gone();
        st.loaded = true;
        Ok(())
    }

    /// Gives the session a new id, keeping its data; the old record is deleted when the new one
    /// is saved at the end of the request. Call it when a user logs in (or their privileges
    /// change) so that an id planted before login is worthless after it.
    ///
    /// # Errors
    /// A store error while loading.
    pub async fn cycle_id(&self) -> Result<(), Error> {
        self.ready().await?;
        let mut st = self.state();
        st.cycle = true;
        st.new_id = Some(Id::random());
        Ok(())
    }

    /// The session's id: the id it is stored under, or will be once saved (after
    /// [`cycle_id`](Session::cycle_id), the new one). `None` for a new session that holds
    /// nothing yet, and after [`destroy`](Session::destroy).
    ///
    /// # Errors
    /// A store error while loading.
    pub async fn id(&self) -> Result<Option<Id>, Error> {
        self.ready().await?;
        let mut st = self.state();
        if let Some(id) = st.new_id {
            return Ok(Some(id));
        }
        if let Some(stored) = st.stored {
            return Ok(Some(stored.id));
        }
        if st.data.is_empty() {
            return Ok(None);
        }
        Ok(Some(*st.new_id.get_or_insert_with(Id::random)))
    }

    /// Sets this session's own expiry policy, kept with the session (for "remember me", say):
    /// it replaces the layer's policy for this session from now on.
    ///
    /// # Errors
    /// A store error while loading.
    pub async fn set_expiry(&self, expiry: Expiry) -> Result<(), Error> {
        self.ready().await?;
        let mut st = self.state();
        st.data.expiry = Some(expiry);
        st.changes.push(Change::SetExpiry(expiry));
        st.expiry_changed = true;
        Ok(())
    }

    /// The expiry policy in force for this session.
    ///
    /// # Errors
    /// A store error while loading.
    pub async fn expiry(&self) -> Result<Expiry, Error> {
        self.ready().await?;
        let st = self.state();
        Ok(st.policy(self.config()))
    }

    /// Serialises this handle's store I/O. Uncontended (the usual case) it is one atomic swap;
    /// the waiting future is boxed so that it does not grow every commit's future.
    async fn io_lock(&self) -> IoGuard<'_> {
        match self.inner.io.try_lock() {
            Some(guard) => guard,
            None => Box::pin(self.inner.io.lock()).await,
        }
    }

    /// Saves what changed, as the layer does after the response (and `update` at once).
    fn commit(&self) -> Pin<Box<dyn Future<Output = Result<(), Error>> + Send + '_>> {
        Box::pin(self.commit_inner())
    }

    async fn commit_inner(&self) -> Result<(), Error> {
        let _io = self.io_lock().await;
        let config = self.config();
        let store = self.store();
        for attempt in 0..config.max_save_attempts {
            let now = unix_ms(SystemTime::now());
            let plan = self.state().plan(config, now)?;
            match &plan {
                Plan::Nothing => return Ok(()),
                Plan::Delete(id) => {
                    store.delete(id).await?;
                    let mut st = self.state();
                    st.stored = None;
                    st.changes.clear();
                    st.cycle = false;
                    st.set_cookie = None;
                    return Ok(());
                }
                Plan::Touch(id, expected, expires_ms) => {
                    let (id, expires_ms) = (*id, *expires_ms);
                    let outcome = store
                        .touch(&id, *expected, from_unix_ms(expires_ms))
                        .await?;
                    let mut st = self.state();
                    if outcome == SaveOutcome::Saved {
                        if let Some(stored) = &mut st.stored {
                            stored.expires_ms = expires_ms;
                        }
                        st.cookie_for(id, expires_ms, false, config, now);
                    } else {
                        // Expired or deleted meanwhile; nothing of ours was unsaved.
                        st.gone();
                    }
                    return Ok(());
                }
                Plan::Create {
                    record,
                    applied,
                    replaces,
                } => match store.create(record).await? {
                    CreateOutcome::Created => {
                        self.state().stored_as(record, *applied, config, now);
                        if let Some(old) = replaces {
                            store.delete(old).await?;
                        }
                        return Ok(());
                    }
                    CreateOutcome::IdTaken => {
                        log::warn!("hyper-sessions: new session id collided; drawing another");
                        self.state().new_id = Some(Id::random());
                    }
                },
                Plan::Save {
                    record,
                    expected,
                    applied,
                } => match store.save(record, *expected).await? {
                    SaveOutcome::Saved => {
                        self.state().stored_as(record, *applied, config, now);
                        return Ok(());
                    }
                    SaveOutcome::Conflict => {
                        // Writers that collided would collide again if they all retried at
                        // once: spread them out, wider on each attempt.
                        // Boxed: the rare path should not grow every commit's future.
                        Box::pin(tokio::time::sleep(conflict_backoff(attempt))).await;
                        let fresh = store.load(&record.id()).await?;
                        self.state()
                            .rebase(fresh, config, unix_ms(SystemTime::now()))?;
                    }
                    SaveOutcome::Missing => {
                        self.state().gone();
                        return Err(Error::new(Kind::Gone));
                    }
                },
            }
        }
        Err(Error::new(Kind::Conflict))
    }

    /// The cookie action for a response when no store I/O is due, or `None` if a commit is.
    pub(crate) fn finish_without_io(&self) -> Option<CookieAction> {
        let st = self.state();
        if !st.used {
            return Some(CookieAction::None);
        }
        // The clock as read at the load (or last commit) is recent enough to decide.
        if st.needs_commit(self.config(), st.clock_ms) {
            return None;
        }
        Some(st.cookie_action(self.client_sent_cookie()))
    }

    /// Commits and returns the cookie action for the response.
    pub(crate) async fn finish(&self) -> (Result<(), Error>, CookieAction) {
        let result = self.commit_inner().await;
        let action = self.state().cookie_action(self.client_sent_cookie());
        (result, action)
    }

    fn client_sent_cookie(&self) -> bool {
        !matches!(self.inner.cookie, CookieLookup::Absent)
    }
}

impl fmt::Debug for Session {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let st = self.state();
        f.debug_struct("Session")
            .field("loaded", &st.loaded)
            .field("stored", &st.stored.is_some())
            .field("keys", &st.data.len())
            .field("pending_changes", &st.changes.len())
            .field("destroyed", &st.destroyed)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicUsize;

    use super::*;

    #[test]
    fn values_serialize_as_serde_json_writes_them_across_the_stack_buffer_edge() {
        for len in [0, 1, 61, 62, 63, 64, 65, 127, 4096] {
            let value = "x".repeat(len);
            let ours = to_json(&value).unwrap();
            assert_eq!(&*ours, serde_json::to_string(&value).unwrap(), "{len}");
        }
        let nested = serde_json::json!({"a": vec!["b"; 40], "c": {"d": 1.5}});
        assert_eq!(&*to_json(&nested).unwrap(), nested.to_string());
    }

    #[test]
    fn a_value_that_does_not_serialize_is_a_serde_error() {
        // JSON object keys must be strings.
        let map = std::collections::BTreeMap::from([((1, 2), 3)]);
        let err = to_json(&map).unwrap_err();
        assert!(err.is_serde(), "{err}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn io_lock_admits_one_holder_at_a_time_and_wakes_every_waiter() {
        let lock = Arc::new(IoLock::default());
        let inside = Arc::new(AtomicUsize::new(0));
        let done = Arc::new(AtomicUsize::new(0));
        let mut tasks = Vec::new();
        for _ in 0..16 {
            let (lock, inside, done) = (lock.clone(), inside.clone(), done.clone());
            tasks.push(tokio::spawn(async move {
                for _ in 0..200 {
                    let _guard = lock.lock().await;
                    assert_eq!(inside.fetch_add(1, Ordering::SeqCst), 0, "two holders");
                    tokio::task::yield_now().await;
                    inside.fetch_sub(1, Ordering::SeqCst);
                    done.fetch_add(1, Ordering::SeqCst);
                }
            }));
        }
        for task in tasks {
            tokio::time::timeout(Duration::from_secs(20), task)
                .await
                .expect("a waiter was never woken")
                .unwrap();
        }
        assert_eq!(done.load(Ordering::SeqCst), 16 * 200);
        assert!(lock.try_lock().is_some(), "released at the end");
    }
}
