//! The [`Session`] handle: typed access, flash values, the change log and the commit.

mod commit;
mod json;
mod owners;
pub(crate) mod payload;
mod state;

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError};
use std::task::{Context, Poll};
use std::time::SystemTime;

use serde::Serialize;
use serde::de::DeserializeOwned;

use self::json::to_json;
use self::state::{Change, Phase, State, UpdateFn, too_large};
use crate::config::{Config, Expiry};
use crate::cookie::{CookieAction, CookieLookup};
use crate::error::{Chain, Error, Kind};
use crate::id::Id;
use crate::key::{Fingerprint, IdKey};
use crate::store::DynStore;
use crate::store::record::{Record, unix_ms};
use crate::trace::{Op, event, op};

pub use self::owners::{Handle, MAX_OWNER_BYTES, Owners, SessionInfo};

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
    /// The cookie's id with its store key, derived on first use (a request that never touches
    /// its session pays nothing for the digest).
    cookie_key: OnceLock<IdKey>,
    /// Serialises this handle's own store I/O (load, commit, destroy) so clones used
    /// concurrently within one request do not race each other. Per request, never shared.
    io: tokio::sync::Mutex<()>,
    /// Never held across an `.await`.
    state: Mutex<State>,
}

/// The future of [`Session::load`].
struct Load<'a> {
    session: &'a Session,
    /// What is loaded: the cookie's session (none without one).
    id: Option<IdKey>,
    store: Option<Op<'a, Option<Record>>>,
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
                event!(
                    error,
                    "hyper-sessions: ignoring unreadable session record: {}; starting a fresh session",
                    Chain(&e)
                );
                None
            }
            Err(e) => return Poll::Ready(Err(e.into())),
        };
        let session = self.session;
        let mut st = session.state();
        if let Some(id) = self.id {
            st.install(id, record, session.config(), self.now_ms);
        }
        Poll::Ready(st.check_live())
    }
}

fn serde_error(e: serde_json::Error) -> Error {
    Error::with(Kind::Serde, e)
}

impl Session {
    pub(crate) fn new(shared: Arc<Shared>, cookie: CookieLookup) -> Self {
        // Without a valid id there is nothing to load.
        let (cookie, state) = match cookie {
            CookieLookup::FoundOlderKey(id) => {
                (CookieLookup::Found(id), State::new(true).resigning())
            }
            other => (other, State::new(matches!(other, CookieLookup::Found(_)))),
        };
        Session {
            inner: Arc::new(Inner {
                shared,
                cookie,
                cookie_key: OnceLock::new(),
                // Built at compile time: `Mutex::new` at run time cost 160 instructions a request.
                io: const { tokio::sync::Mutex::const_new(()) },
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

    /// The cookie's id with its store key, if the cookie named a session.
    fn cookie_id(&self) -> Option<&IdKey> {
        match self.inner.cookie {
            CookieLookup::Found(id) => Some(self.inner.cookie_key.get_or_init(|| IdKey::new(id))),
            _ => None,
        }
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
            if st.phase != Phase::Unloaded {
                return st.check_live();
            }
        }
        self.load().await
    }

    /// The load, as one boxed store call and a small named future around it. Clones of the
    /// handle that load at the same time each ask the store; the first answer is installed.
    fn load(&self) -> Load<'_> {
        let now_ms = unix_ms(SystemTime::now());
        let id = self.cookie_id();
        Load {
            session: self,
            id: id.copied(),
            store: id.map(|id| {
                let store = self.store();
                op(store, "load", 1, store.load(&id.key))
            }),
            now_ms,
        }
    }

    /// The value under `key`, deserialized as `T`, or `None` if there is none. It never changes
    /// the session: a [`flash`](Session::flash) value is returned too, and stays (read it with
    /// [`take_flash`](Session::take_flash) to consume it).
    ///
    /// # Errors
    /// A store error while loading, or [`Error::is_serde`] when the value is not a `T`.
    #[allow(clippy::manual_async_fn)] // see the comment in the body
    pub fn get<T: DeserializeOwned>(
        &self,
        key: &str,
    ) -> impl Future<Output = Result<Option<T>, Error>> + Send {
        // A block, not an `async fn`: an `async fn`'s future holds its arguments twice, and
        // handlers keep this future (inside their own) across their awaits.
        async move {
            self.ready().await?;
            let st = self.state();
            let Some(raw) = st.data.get_bytes(key) else {
                return Ok(None);
            };
            serde_json::from_slice(raw).map(Some).map_err(serde_error)
        }
    }

    /// The [`flash`](Session::flash) value under `key`, removed by this read: a flash is read
    /// once, here, then gone (the removal is saved with the request's other changes; a flash
    /// stored again meanwhile by another request is kept). `None` if there is no flash under
    /// `key`, also when the key holds a plain value (which is left alone).
    ///
    /// # Errors
    /// A store error while loading, or [`Error::is_serde`] when the value is not a `T` (the
    /// flash is then kept).
    #[allow(clippy::manual_async_fn)] // as for `get`
    pub fn take_flash<T: DeserializeOwned>(
        &self,
        key: &str,
    ) -> impl Future<Output = Result<Option<T>, Error>> + Send {
        async move {
            self.ready().await?;
            let mut st = self.state();
            let Some(raw) = st.data.get_bytes(key).filter(|_| st.data.is_flash(key)) else {
                return Ok(None);
            };
            let value = serde_json::from_slice(raw).map_err(serde_error)?;
            // The flash read, as it was read: a replay removes this one only.
            let read = String::from_utf8_lossy(raw).into();
            st.data.remove(key);
            st.push(Change::TakeFlash(key.into(), read));
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

    /// Stores a flash value: the next [`take_flash`](Session::take_flash) of `key`, in this
    /// request or a later one (after a redirect, say), returns it and removes it.
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
                st.push(Change::Flash(key.into(), raw));
            } else {
                st.data.set(key, raw.clone());
                st.push(Change::Set(key.into(), raw));
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
            st.push(Change::Remove(key.into()));
        }
        Ok(existed)
    }

    /// Whether there is a value under `key`, a flash included (which stays).
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
        st.push(Change::Clear);
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
            st.push(Change::Update(key.into(), op));
        }
        if let Err(e) = self.commit().await {
            self.state().fail();
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
        let targets = {
            let mut st = self.state();
            st.used = true;
            match (st.phase, self.inner.cookie) {
                (Phase::Unloaded, CookieLookup::Found(_)) => (self.cookie_id().copied(), None),
                _ => st.destroy_targets(),
            }
        };
        for id in [targets.0, targets.1].into_iter().flatten() {
            let store = self.store();
            op(store, "delete", 1, store.delete(&id.key)).await?;
        }
        self.state().destroyed(self.client_sent_cookie());
        Ok(())
    }

    /// Gives the session a new id, keeping its data (and its creation time). At the end of the
    /// request the session moves: the new record is created, then the old one is removed at the
    /// version the new one was built from; a write another request made to the old id meanwhile
    /// is carried over, and if the old id was destroyed meanwhile the new record is deleted too
    /// and the request fails with [`Error::is_gone`]. Call it when a user logs in (or their
    /// privileges change) so that an id planted before login is worthless after it.
    ///
    /// # Errors
    /// A store error while loading.
    pub async fn cycle_id(&self) -> Result<(), Error> {
        self.ready().await?;
        self.state().cycle();
        Ok(())
    }

    /// The session's id, as far as this request knows without asking the store: after a load,
    /// the id the session is stored under, or will be once saved (after
    /// [`cycle_id`](Session::cycle_id), the new one; for a new session that holds data, the id it
    /// will be created under); before any load, the id the cookie names, which the store may
    /// not hold (a later read can find the session gone and start a fresh one). `None` when
    /// there is no session to name: no cookie and nothing stored yet, or after
    /// [`destroy`](Session::destroy).
    ///
    /// The id is the cookie's bearer secret: never log it. Log the
    /// [`fingerprint`](Session::fingerprint).
    pub fn id(&self) -> Option<Id> {
        self.current().map(|id| id.id)
    }

    /// A short, log-safe name of the session (see [`Key::fingerprint`](crate::store::Key::fingerprint)):
    /// the first 8 hex digits of the digest of [`id`](Session::id), never part of the id
    /// itself. Use it to correlate an application's logs with a session.
    pub fn fingerprint(&self) -> Option<Fingerprint> {
        self.current().map(|id| id.key.fingerprint())
    }

    /// The id and key behind [`id`](Session::id).
    fn current(&self) -> Option<IdKey> {
        let mut st = self.state();
        match st.phase {
            Phase::Destroyed => return None,
            Phase::Unloaded => return self.cookie_id().copied(),
            Phase::Live | Phase::Failed => {}
        }
        if let Some(id) = st.new_id {
            return Some(id);
        }
        if let Some(stored) = st.stored {
            return Some(stored.id);
        }
        if st.data.is_empty() {
            return None;
        }
        Some(*st.new_id.get_or_insert_with(IdKey::random))
    }

    /// Sets this session's own expiry policy, kept with the session (for "remember me", say):
    /// it replaces the layer's policy for this session, in every refresh of its expiry, until
    /// [`reset_expiry`](Session::reset_expiry). The response re-sends the cookie with the
    /// policy's lifetime. The layer's absolute lifetime still caps it.
    ///
    /// # Errors
    /// A store error while loading.
    pub async fn set_expiry(&self, expiry: Expiry) -> Result<(), Error> {
        self.ready().await?;
        let mut st = self.state();
        st.data.expiry = Some(expiry);
        st.push(Change::SetExpiry(Some(expiry)));
        Ok(())
    }

    /// Drops this session's own expiry policy (set by [`set_expiry`](Session::set_expiry)): the
    /// layer's policy applies to it again from now on, and the response re-sends the cookie
    /// with that policy's lifetime (undoing "remember me", say).
    ///
    /// # Errors
    /// A store error while loading.
    pub async fn reset_expiry(&self) -> Result<(), Error> {
        self.ready().await?;
        let mut st = self.state();
        st.data.expiry = None;
        st.push(Change::SetExpiry(None));
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

    /// Serialises this handle's store I/O. Uncontended (the usual case) `try_lock` takes it at
    /// once; the waiting future is boxed so that it does not grow every commit's future.
    async fn io_lock(&self) -> tokio::sync::MutexGuard<'_, ()> {
        match self.inner.io.try_lock() {
            Ok(guard) => guard,
            Err(_) => Box::pin(self.inner.io.lock()).await,
        }
    }

    /// The commit, boxed: `update` and the layer's response future need not grow by it.
    fn commit(&self) -> Pin<Box<dyn Future<Output = Result<(), Error>> + Send + '_>> {
        Box::pin(self.commit_now())
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
        Some(st.cookie_action(self.config()))
    }

    /// Commits and returns the cookie action for the response.
    pub(crate) async fn finish(&self) -> (Result<(), Error>, CookieAction) {
        let result = self.commit_now().await;
        let action = self.state().cookie_action(self.config());
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
            .field("phase", &st.phase)
            .field("stored", &st.stored.is_some())
            .field("keys", &st.data.len())
            .field("pending_changes", &st.pending_changes())
            .finish_non_exhaustive()
    }
}
