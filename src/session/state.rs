//! The session's state machine: what the request changed, what the store must be asked next,
//! and what each answer means. Pure and synchronous: no store, no clock, no lock (the handle
//! and the commit loop bring those), so every transition is unit-tested on its own.

use std::sync::Arc;
use std::time::Duration;

use super::payload::SessionData;
use crate::config::{Config, Expiry};
use crate::cookie::CookieAction;
use crate::error::{Chain, Error, Kind};
use crate::id::Id;
use crate::key::IdKey;
use crate::store::Record;

/// Where the session is in its life within this request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Phase {
    /// The cookie named a session that has not been loaded yet.
    Unloaded,
    /// The data is known: loaded, or a new session.
    Live,
    /// Destroyed in this request, or found gone under a write: it stays gone.
    Destroyed,
    /// An explicit save (`update`) failed: nothing more is written for this request.
    Failed,
}

/// The stored record behind the session: which one, at which version, until when.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Stored {
    pub(crate) id: IdKey,
    pub(crate) version: u64,
    pub(crate) expires_ms: u64,
}

impl Stored {
    fn of(id: IdKey, record: &Record) -> Stored {
        Stored {
            id,
            version: record.version(),
            expires_ms: record.expires_at_unix_ms(),
        }
    }
}

/// An `update`'s function, on the raw JSON of the current value.
pub(crate) type UpdateFn = Arc<dyn Fn(Option<&str>) -> Result<Arc<str>, Error> + Send + Sync>;

/// One change this request made, kept so it can be replayed on a fresher record.
#[derive(Clone)]
pub(crate) enum Change {
    Set(Box<str>, Arc<str>),
    Flash(Box<str>, Arc<str>),
    Remove(Box<str>),
    /// A flash was read: replayed, it removes that flash only, not a newer one under the key.
    TakeFlash(Box<str>, Box<str>),
    Clear,
    Update(Box<str>, UpdateFn),
    /// The session's own expiry policy; `None` goes back to the layer's.
    SetExpiry(Option<Expiry>),
    /// The session's owner.
    SetOwner(Arc<str>),
    /// The session's label in its owner's list.
    SetLabel(Arc<str>),
}

impl Change {
    fn apply(&self, data: &mut SessionData) -> Result<(), Error> {
        match self {
            Change::Set(k, v) => data.set(k, v.clone()),
            Change::Flash(k, v) => data.set_flash(k, v.clone()),
            Change::Remove(k) => {
                data.remove(k);
            }
            Change::TakeFlash(k, v) => {
                if data.is_flash(k) && data.get(k) == Some(&**v) {
                    data.remove(k);
                }
            }
            Change::Clear => data.clear(),
            Change::Update(k, f) => {
                let new = f(data.get(k))?;
                data.set(k, new);
            }
            Change::SetExpiry(e) => data.expiry = *e,
            Change::SetOwner(owner) => data.owner = Some(owner.clone()),
            Change::SetLabel(label) => data.label = Some(label.clone()),
        }
        Ok(())
    }
}

/// The cookie the response will carry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Cookie {
    /// Leave the browser's cookie as it is.
    Keep,
    /// Send this id, with this `Max-Age` (a persistent cookie) or none (a browser-session one).
    Set(Id, Option<Duration>),
    /// Remove it: this request destroyed or emptied the record the cookie names.
    Remove,
}

/// The store work a commit has to do next.
#[derive(Debug)]
pub(crate) enum Plan {
    Nothing,
    /// A new record: a new session, or the first step of moving a cycled one.
    Create {
        id: IdKey,
        record: Record,
        applied: usize,
    },
    /// A compare-and-set of the record at `expected`.
    Save {
        id: IdKey,
        record: Record,
        expected: u64,
        applied: usize,
    },
    /// An expiry refresh of the record at `expected`.
    Touch {
        id: IdKey,
        expected: u64,
        expires_ms: u64,
    },
    /// A removal of the record at `expected`: the session was emptied, or this is the last step
    /// of moving a cycled one (its old record).
    Remove {
        id: IdKey,
        expected: u64,
        applied: usize,
    },
}

/// What a commit does after the store answered `Missing`, or after a reload found nothing.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Vanished {
    /// Nothing of this request's was lost (an expiry refresh, an emptied session): carry on.
    Quietly,
    /// A write lost to a destroy (or an expiry): the request fails with [`Error::is_gone`].
    Gone,
    /// As `Gone`, after deleting the record this request had already created for a cycle
    /// whose source was destroyed meanwhile.
    GoneAfterDeleting(IdKey),
}

/// The store's expiry is refreshed once this fraction of the idle window has passed.
const REFRESH_DIVISOR: u64 = 10;

/// Everything one request knows about its session.
pub(crate) struct State {
    pub(crate) phase: Phase,
    /// The handler called a method.
    pub(crate) used: bool,
    /// The stored record behind this session, if any (during a move: the new one).
    pub(crate) stored: Option<Stored>,
    /// A cycle under way: the new record exists (`stored`); this old one is still to be removed,
    /// at this version.
    moving_from: Option<Stored>,
    pub(crate) data: SessionData,
    changes: Vec<Change>,
    /// During a move: how many of `changes` the new record holds.
    moved: usize,
    /// During a move: the source was reloaded, so the new record must be written again.
    rebased: bool,
    /// `cycle_id` was called and the move has not started.
    cycle: bool,
    /// The id a new or cycled session will be created under.
    pub(crate) new_id: Option<IdKey>,
    /// The expiry policy changed and the record must be written with its new expiry.
    expiry_changed: bool,
    /// When this request last read the clock (Unix ms): at the load, or at a commit.
    pub(crate) clock_ms: u64,
    pub(crate) cookie: Cookie,
    /// The cookie was signed with an older signing key: once the session is loaded, the
    /// response re-sends it (signed with the current key) even if nothing else changed.
    resign: bool,
}

impl State {
    /// The state of a request: `Unloaded` when the cookie names a session.
    pub(crate) fn new(has_id: bool) -> State {
        State {
            phase: if has_id { Phase::Unloaded } else { Phase::Live },
            used: false,
            stored: None,
            moving_from: None,
            data: SessionData::default(),
            changes: Vec::new(),
            moved: 0,
            rebased: false,
            cycle: false,
            new_id: None,
            expiry_changed: false,
            clock_ms: 0,
            cookie: Cookie::Keep,
            resign: false,
        }
    }

    /// The state of a request whose cookie was signed with an older key (see `resign`).
    pub(crate) fn resigning(mut self) -> State {
        self.resign = true;
        self
    }

    /// `Ok` while the session can be used.
    pub(crate) fn check_live(&self) -> Result<(), Error> {
        match self.phase {
            Phase::Unloaded | Phase::Live => Ok(()),
            Phase::Destroyed => Err(Error::new(Kind::Destroyed)),
            Phase::Failed => Err(Error::new(Kind::Store)),
        }
    }

    /// The expiry policy in force: the session's own, or the layer's.
    pub(crate) fn policy(&self, config: &Config) -> Expiry {
        self.data.expiry.unwrap_or(config.expiry)
    }

    /// When the layer's absolute lifetime ends this session, if it has one.
    fn deadline(&self, config: &Config) -> Option<u64> {
        let lifetime = duration_ms(config.absolute_lifetime?);
        Some(self.data.created?.saturating_add(lifetime))
    }

    /// The expiry a write at `now` gives the record: the idle window from now, capped by the
    /// absolute lifetime.
    fn target_expiry(&self, config: &Config, now_ms: u64) -> u64 {
        let target = now_ms.saturating_add(duration_ms(self.policy(config).idle_timeout()));
        self.deadline(config).map_or(target, |d| target.min(d))
    }

    /// Whether the stored expiry is a tenth of the idle window or more behind where it should be.
    fn refresh_due(&self, config: &Config, stored: &Stored, now_ms: u64) -> bool {
        let idle = duration_ms(self.policy(config).idle_timeout());
        let target = self.target_expiry(config, now_ms);
        target > stored.expires_ms && target - stored.expires_ms >= idle / REFRESH_DIVISOR
    }

    /// Installs a loaded record (or its absence), unless a concurrent load already did.
    pub(crate) fn install(
        &mut self,
        id: IdKey,
        record: Option<Record>,
        config: &Config,
        now_ms: u64,
    ) {
        if self.phase != Phase::Unloaded {
            return;
        }
        self.phase = Phase::Live;
        self.clock_ms = now_ms;
        if let Some((stored, data)) = live_record(id, record, config, now_ms) {
            self.data = data;
            self.stored = Some(stored);
        }
    }

    fn dirty(&self) -> bool {
        !self.changes.is_empty() || self.cycle || self.expiry_changed
    }

    /// Whether the end of the request needs store I/O.
    pub(crate) fn needs_commit(&self, config: &Config, now_ms: u64) -> bool {
        if self.phase != Phase::Live {
            return false;
        }
        if self.moving_from.is_some() {
            return true;
        }
        match &self.stored {
            None => self.dirty() && !self.data.is_empty(),
            Some(stored) => self.dirty() || self.refresh_due(config, stored, now_ms),
        }
    }

    fn record(
        &self,
        id: IdKey,
        version: u64,
        expires_ms: u64,
        config: &Config,
    ) -> Result<Record, Error> {
        let bytes = self.data.encode();
        if bytes.len() > config.max_record_bytes {
            return Err(too_large(bytes.len(), config.max_record_bytes));
        }
        Ok(Record::from_unix_ms(id.key, bytes, version, expires_ms)
            .with_owner(self.data.owner.clone()))
    }

    /// The store work the commit does next, at `now_ms`.
    pub(crate) fn plan(&mut self, config: &Config, now_ms: u64) -> Result<Plan, Error> {
        self.clock_ms = now_ms;
        if !self.needs_commit(config, now_ms) {
            return Ok(Plan::Nothing);
        }
        let applied = self.changes.len();
        if let (Some(from), Some(to)) = (self.moving_from, self.stored) {
            // Moving: the new record first holds everything, then the old one goes.
            if self.rebased || self.expiry_changed || applied > self.moved {
                let record = self.record(
                    to.id,
                    to.version + 1,
                    self.target_expiry(config, now_ms),
                    config,
                )?;
                return Ok(Plan::Save {
                    id: to.id,
                    record,
                    expected: to.version,
                    applied,
                });
            }
            return Ok(Plan::Remove {
                id: from.id,
                expected: from.version,
                applied,
            });
        }
        let Some(stored) = self.stored else {
            if self.data.created.is_none() {
                self.data.created = Some(now_ms);
            }
            let id = *self.new_id.get_or_insert_with(IdKey::random);
            let record = self.record(id, 1, self.target_expiry(config, now_ms), config)?;
            return Ok(Plan::Create {
                id,
                record,
                applied,
            });
        };
        if self.data.is_empty() && self.dirty() {
            return Ok(Plan::Remove {
                id: stored.id,
                expected: stored.version,
                applied,
            });
        }
        if self.cycle {
            let id = *self.new_id.get_or_insert_with(IdKey::random);
            let record = self.record(id, 1, self.target_expiry(config, now_ms), config)?;
            return Ok(Plan::Create {
                id,
                record,
                applied,
            });
        }
        if self.dirty() {
            // Moved when the policy changed, when a refresh is due, or when the absolute
            // lifetime ends the session before the stored expiry; else kept.
            let target = self.target_expiry(config, now_ms);
            let expires_ms = if self.expiry_changed
                || target < stored.expires_ms
                || self.refresh_due(config, &stored, now_ms)
            {
                target
            } else {
                stored.expires_ms
            };
            let record = self.record(stored.id, stored.version + 1, expires_ms, config)?;
            return Ok(Plan::Save {
                id: stored.id,
                record,
                expected: stored.version,
                applied,
            });
        }
        Ok(Plan::Touch {
            id: stored.id,
            expected: stored.version,
            expires_ms: self.target_expiry(config, now_ms),
        })
    }

    /// The store did what `plan` asked.
    pub(crate) fn done(&mut self, plan: &Plan, config: &Config, now_ms: u64) {
        match *plan {
            Plan::Nothing => {}
            Plan::Create {
                id,
                ref record,
                applied,
            } => {
                if let Some(from) = self.stored.filter(|_| self.cycle) {
                    // The first step of a move: the old record is still there.
                    self.moving_from = Some(from);
                    self.moved = applied;
                } else {
                    self.drain(applied);
                }
                self.stored = Some(Stored::of(id, record));
                self.cycle = false;
                self.expiry_changed = false;
                self.new_id = None;
                self.send_cookie(id.id, record.expires_at_unix_ms(), true, config, now_ms);
            }
            Plan::Save {
                id,
                ref record,
                applied,
                ..
            } => {
                let moved_expiry = self
                    .stored
                    .is_some_and(|s| s.expires_ms != record.expires_at_unix_ms());
                let policy_changed = self.expiry_changed;
                self.stored = Some(Stored::of(id, record));
                self.expiry_changed = false;
                if self.moving_from.is_some() {
                    self.moved = applied;
                    self.rebased = false;
                    // The new id's cookie, with the lifetime just written.
                    self.send_cookie(id.id, record.expires_at_unix_ms(), true, config, now_ms);
                } else {
                    self.drain(applied);
                    if moved_expiry || policy_changed {
                        // A new policy may change the cookie's kind (persistent or not) too.
                        let always = policy_changed;
                        self.send_cookie(
                            id.id,
                            record.expires_at_unix_ms(),
                            always,
                            config,
                            now_ms,
                        );
                    }
                }
            }
            Plan::Touch { id, expires_ms, .. } => {
                if let Some(stored) = &mut self.stored {
                    stored.expires_ms = expires_ms;
                }
                self.send_cookie(id.id, expires_ms, false, config, now_ms);
            }
            Plan::Remove { applied, .. } => {
                if self.moving_from.take().is_some() {
                    // The move is complete.
                    self.drain(self.moved.min(applied));
                } else {
                    self.stored = None;
                    self.drain(applied);
                    self.cycle = false;
                    self.new_id = None;
                    self.cookie = Cookie::Remove;
                }
            }
        }
    }

    /// The new id was taken (a collision, or a create retried after its reply was lost).
    pub(crate) fn id_taken(&mut self) {
        self.new_id = Some(IdKey::random());
    }

    /// The id to reload after a `Conflict`: the record whose version moved.
    pub(crate) fn conflict_source(&self) -> Option<IdKey> {
        self.moving_from.or(self.stored).map(|s| s.id)
    }

    /// The store answered `Missing` to `plan`.
    pub(crate) fn missing(&mut self, plan: &Plan) -> Vanished {
        let quiet = match plan {
            Plan::Touch { .. } => true,
            Plan::Remove { .. } => self.moving_from.is_none(),
            Plan::Nothing | Plan::Create { .. } | Plan::Save { .. } => false,
        };
        self.vanish(quiet)
    }

    /// Rebases this request's changes on a fresher copy of the record that moved.
    pub(crate) fn rebase(
        &mut self,
        fresh: Option<Record>,
        config: &Config,
        now_ms: u64,
    ) -> Result<Option<Vanished>, Error> {
        let source = self.conflict_source();
        let Some((stored, mut data)) = source.and_then(|id| live_record(id, fresh, config, now_ms))
        else {
            let quiet = self.moving_from.is_none() && (self.data.is_empty() || !self.dirty());
            return Ok(Some(self.vanish(quiet)));
        };
        for change in &self.changes {
            change.apply(&mut data)?;
        }
        self.data = data;
        if self.moving_from.is_some() {
            self.moving_from = Some(stored);
            self.rebased = true;
        } else {
            self.stored = Some(stored);
        }
        Ok(None)
    }

    /// The record behind the session is gone. `quiet`: nothing of this request's was lost.
    fn vanish(&mut self, quiet: bool) -> Vanished {
        let created = self.moving_from.take().and(self.stored).map(|s| s.id);
        self.stored = None;
        self.data.clear();
        self.changes.clear();
        self.cycle = false;
        self.expiry_changed = false;
        if quiet {
            return Vanished::Quietly;
        }
        self.phase = Phase::Destroyed;
        // No cookie: this request destroyed nothing, and a newer cookie may be on its way.
        self.cookie = Cookie::Keep;
        created.map_or(Vanished::Gone, Vanished::GoneAfterDeleting)
    }

    /// The ids `destroy` must delete: the stored record, and the old one of a move under way.
    pub(crate) fn destroy_targets(&self) -> (Option<IdKey>, Option<IdKey>) {
        (self.stored.map(|s| s.id), self.moving_from.map(|s| s.id))
    }

    /// `destroy` deleted the session's records.
    pub(crate) fn destroyed(&mut self, client_sent_cookie: bool) {
        self.vanish(false);
        self.cookie = if client_sent_cookie {
            Cookie::Remove
        } else {
            Cookie::Keep
        };
    }

    /// An explicit save failed: nothing more is written for this request.
    pub(crate) fn fail(&mut self) {
        if self.phase == Phase::Live {
            self.phase = Phase::Failed;
        }
    }

    /// Records a change the handler made (its effect on `data` is the caller's).
    pub(crate) fn push(&mut self, change: Change) {
        if matches!(change, Change::SetExpiry(_)) {
            self.expiry_changed = true;
        }
        self.changes.push(change);
    }

    /// `cycle_id`: the session moves to a new id at the commit.
    pub(crate) fn cycle(&mut self) {
        self.cycle = true;
        self.new_id = Some(IdKey::random());
    }

    fn drain(&mut self, applied: usize) {
        if applied >= self.changes.len() {
            self.changes.clear();
        } else {
            self.changes.drain(..applied);
        }
        self.moved = 0;
    }

    /// Sends the cookie: `always` (a new id or policy), or when a persistent cookie's lifetime
    /// moved.
    fn send_cookie(&mut self, id: Id, expires_ms: u64, always: bool, config: &Config, now_ms: u64) {
        let persistent = self.policy(config).persistent_cookie();
        if always || persistent {
            let max_age =
                persistent.then(|| Duration::from_millis(expires_ms.saturating_sub(now_ms)));
            self.cookie = Cookie::Set(id, max_age);
        }
    }

    /// The cookie action for the response.
    ///
    /// A cookie signed with an older key is re-sent (the layer signs it with the current key)
    /// when the session was loaded and is still stored under the cookie's id: the record's
    /// expiry, known from the load, gives a persistent cookie its `Max-Age`. An untouched
    /// session is not re-signed, since its expiry would cost a store round trip.
    pub(crate) fn cookie_action(&self, config: &Config) -> CookieAction {
        match self.cookie {
            Cookie::Keep => match self.stored {
                Some(stored)
                    if self.resign && self.phase == Phase::Live && self.moving_from.is_none() =>
                {
                    let max_age = self.policy(config).persistent_cookie().then(|| {
                        Duration::from_millis(stored.expires_ms.saturating_sub(self.clock_ms))
                    });
                    CookieAction::Set(stored.id.id, max_age)
                }
                _ => CookieAction::None,
            },
            Cookie::Set(id, max_age) => CookieAction::Set(id, max_age),
            Cookie::Remove => CookieAction::Remove,
        }
    }

    pub(crate) fn pending_changes(&self) -> usize {
        self.changes.len()
    }
}

/// A loaded record as the session sees it: `None` unless it is live and readable.
fn live_record(
    id: IdKey,
    record: Option<Record>,
    config: &Config,
    now_ms: u64,
) -> Option<(Stored, SessionData)> {
    let record = record?;
    if record.expires_at_unix_ms() <= now_ms {
        return None;
    }
    let data = match SessionData::decode(record.data(), config.max_record_bytes) {
        Ok(data) => data,
        Err(e) => {
            crate::trace::event!(
                error,
                "hyper-sessions: ignoring unreadable session record (version {}): {}; \
                 starting a fresh session",
                record.version(),
                Chain(&e)
            );
            return None;
        }
    };
    let past_lifetime = config
        .absolute_lifetime
        .zip(data.created)
        .is_some_and(|(l, c)| c.saturating_add(duration_ms(l)) <= now_ms);
    (!past_lifetime).then(|| (Stored::of(id, &record), data))
}

pub(crate) fn duration_ms(d: Duration) -> u64 {
    d.as_secs()
        .saturating_mul(1000)
        .saturating_add(u64::from(d.subsec_millis()))
}

pub(crate) fn too_large(len: usize, max: usize) -> Error {
    Error::with(
        Kind::TooLarge,
        format!("session record of about {len} bytes exceeds the limit of {max} bytes"),
    )
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use bytes::Bytes;

    use super::*;
    use crate::config::default_error_handler;

    const NOW: u64 = 1_800_000_000_000;
    const DAY: u64 = 86_400_000;

    fn config(lifetime: Option<Duration>) -> Config {
        Config {
            cookie_name: "id".into(),
            cookie_prefix: "id=".into(),
            cookie_attributes: String::new(),
            expiry: Expiry::OnInactivity(Duration::from_millis(DAY)),
            absolute_lifetime: lifetime,
            max_record_bytes: 1 << 20,
            max_save_attempts: 24,
            error_handler: Arc::new(default_error_handler),
            signing_keys: None,
        }
    }

    fn record(id: IdKey, payload: &str, version: u64, expires_ms: u64) -> Record {
        Record::from_unix_ms(id.key, Bytes::from(payload.to_owned()), version, expires_ms)
    }

    /// A session loaded from `{"d":{"a":1},"c":NOW}` at version 3, expiring in a day.
    fn loaded(config: &Config) -> (State, IdKey) {
        let id = IdKey::random();
        let mut st = State::new(true);
        let payload = format!(r#"{{"d":{{"a":1}},"c":{NOW}}}"#);
        st.install(id, Some(record(id, &payload, 3, NOW + DAY)), config, NOW);
        (st, id)
    }

    fn set(st: &mut State, key: &str, value: &str) {
        st.data.set(key, value.into());
        st.push(Change::Set(key.into(), value.into()));
    }

    fn values(record: &Record) -> String {
        let v: serde_json::Value = serde_json::from_slice(record.data()).unwrap();
        v["d"].to_string()
    }

    #[test]
    fn install_keeps_only_a_live_readable_record() {
        let config = config(None);
        let (st, id) = loaded(&config);
        assert_eq!(st.phase, Phase::Live);
        assert_eq!(st.stored.map(|s| (s.id, s.version)), Some((id, 3)));
        assert_eq!(st.data.get("a"), Some("1"));
        for record in [
            None,
            Some(record(id, r#"{"d":{"a":1}}"#, 1, NOW)),
            Some(record(id, "{not json", 1, NOW + DAY)),
        ] {
            let mut st = State::new(true);
            st.install(id, record, &config, NOW);
            assert_eq!(st.phase, Phase::Live);
            assert!(st.stored.is_none() && st.data.is_empty());
        }
        // Past the layer's absolute lifetime, measured from the record's creation time.
        let capped = self::config(Some(Duration::from_secs(1)));
        let mut st = State::new(true);
        let payload = format!(r#"{{"d":{{"a":1}},"c":{}}}"#, NOW - 1_000);
        st.install(id, Some(record(id, &payload, 1, NOW + DAY)), &capped, NOW);
        assert!(
            st.stored.is_none(),
            "a session past its lifetime was installed"
        );
        // A second install (a concurrent clone's load) changes nothing.
        let (mut st, id) = loaded(&config);
        st.install(id, None, &config, NOW);
        assert!(st.stored.is_some());
    }

    #[test]
    fn an_older_key_cookie_is_resent_once_loaded_with_the_stored_lifetime() {
        let config = config(None);
        let id = IdKey::random();
        let payload = format!(r#"{{"d":{{"a":1}},"c":{NOW}}}"#);
        let load = |st: &mut State, now| {
            st.install(id, Some(record(id, &payload, 3, NOW + DAY)), &config, now);
        };
        // Unloaded: nothing to re-send (its expiry is unknown).
        let st = State::new(true).resigning();
        assert_eq!(st.cookie_action(&config), CookieAction::None);
        // Loaded an hour later, nothing changed and no refresh due: re-sent with what is left.
        let mut st = State::new(true).resigning();
        load(&mut st, NOW + 3_600_000);
        assert!(matches!(
            st.plan(&config, NOW + 3_600_000).unwrap(),
            Plan::Nothing
        ));
        assert_eq!(
            st.cookie_action(&config),
            CookieAction::Set(id.id, Some(Duration::from_millis(DAY - 3_600_000)))
        );
        // A browser-session policy: no Max-Age.
        let session_end = Config {
            expiry: Expiry::OnSessionEnd(Duration::from_millis(DAY)),
            ..self::config(None)
        };
        let mut st = State::new(true).resigning();
        st.install(
            id,
            Some(record(id, &payload, 3, NOW + DAY)),
            &session_end,
            NOW,
        );
        assert_eq!(
            st.cookie_action(&session_end),
            CookieAction::Set(id.id, None)
        );
        // A current-key cookie is not re-sent; nor one whose session is gone or destroyed.
        let mut st = State::new(true);
        load(&mut st, NOW);
        assert_eq!(st.cookie_action(&config), CookieAction::None);
        let mut st = State::new(true).resigning();
        st.install(id, None, &config, NOW);
        assert_eq!(st.cookie_action(&config), CookieAction::None);
        let mut st = State::new(true).resigning();
        load(&mut st, NOW);
        st.destroyed(true);
        assert_eq!(st.cookie_action(&config), CookieAction::Remove);
        // A cycle sends the new id (the layer signs it with the current key).
        let mut st = State::new(true).resigning();
        load(&mut st, NOW);
        st.cycle();
        let plan = st.plan(&config, NOW).unwrap();
        let Plan::Create { id: new, .. } = plan else {
            panic!("{plan:?}")
        };
        st.done(&plan, &config, NOW);
        assert!(matches!(
            st.cookie_action(&config),
            CookieAction::Set(sent, _) if sent == new.id
        ));
    }

    #[test]
    fn nothing_to_do_plans_nothing() {
        let config = config(None);
        let (mut st, _) = loaded(&config);
        assert!(matches!(st.plan(&config, NOW + 1).unwrap(), Plan::Nothing));
        let mut fresh = State::new(false);
        assert!(matches!(fresh.plan(&config, NOW).unwrap(), Plan::Nothing));
        // An empty new session is never stored, whatever changed.
        fresh.push(Change::SetExpiry(Some(Expiry::OnInactivity(
            Duration::from_secs(5),
        ))));
        assert!(matches!(fresh.plan(&config, NOW).unwrap(), Plan::Nothing));
    }

    #[test]
    fn a_new_session_is_created_with_its_creation_time_and_cookie() {
        let config = config(None);
        let mut st = State::new(false);
        set(&mut st, "k", "1");
        let plan = st.plan(&config, NOW).unwrap();
        let Plan::Create {
            id,
            record,
            applied,
        } = &plan
        else {
            panic!("{plan:?}")
        };
        assert_eq!((record.version(), *applied), (1, 1));
        assert_eq!(record.expires_at_unix_ms(), NOW + DAY);
        assert!(
            std::str::from_utf8(record.data())
                .unwrap()
                .contains(&format!("\"c\":{NOW}"))
        );
        st.done(&plan, &config, NOW);
        assert_eq!(st.pending_changes(), 0);
        assert_eq!(
            st.cookie,
            Cookie::Set(id.id, Some(Duration::from_millis(DAY)))
        );
        assert!(matches!(st.plan(&config, NOW).unwrap(), Plan::Nothing));
    }

    #[test]
    fn a_change_is_a_compare_and_set_at_the_loaded_version() {
        let config = config(None);
        let (mut st, id) = loaded(&config);
        set(&mut st, "b", "2");
        let plan = st.plan(&config, NOW + 5).unwrap();
        let Plan::Save {
            id: saved,
            record,
            expected,
            ..
        } = &plan
        else {
            panic!("{plan:?}")
        };
        assert_eq!((*saved, record.version(), *expected), (id, 4, 3));
        // Not due for a refresh: the stored expiry is kept.
        assert_eq!(record.expires_at_unix_ms(), NOW + DAY);
        // A change made while the save was under way stays pending.
        set(&mut st, "c", "3");
        st.done(&plan, &config, NOW + 5);
        assert_eq!(st.pending_changes(), 1);
        assert_eq!(st.stored.unwrap().version, 4);
        assert_eq!(st.cookie, Cookie::Keep, "nothing moved, no cookie");
    }

    #[test]
    fn a_due_refresh_is_a_touch_at_the_loaded_version_with_the_cookie() {
        let config = config(None);
        let (mut st, id) = loaded(&config);
        let later = NOW + DAY / 10;
        let plan = st.plan(&config, later).unwrap();
        let Plan::Touch {
            id: touched,
            expected,
            expires_ms,
        } = plan
        else {
            panic!("{plan:?}")
        };
        assert_eq!((touched, expected, expires_ms), (id, 3, later + DAY));
        st.done(&plan, &config, later);
        assert_eq!(st.stored.unwrap().expires_ms, later + DAY);
        assert_eq!(
            st.cookie,
            Cookie::Set(id.id, Some(Duration::from_millis(DAY)))
        );
        // Just short of a tenth: no refresh.
        let (mut st, _) = loaded(&config);
        assert!(matches!(
            st.plan(&config, NOW + DAY / 10 - 1).unwrap(),
            Plan::Nothing
        ));
    }

    #[test]
    fn the_sessions_own_policy_drives_its_refresh() {
        let config = config(None);
        let (mut st, id) = loaded(&config);
        let own = Expiry::OnInactivity(Duration::from_secs(2));
        st.data.expiry = Some(own);
        st.push(Change::SetExpiry(Some(own)));
        let plan = st.plan(&config, NOW).unwrap();
        let Plan::Save { record, .. } = &plan else {
            panic!("{plan:?}")
        };
        assert_eq!(record.expires_at_unix_ms(), NOW + 2_000, "the own window");
        st.done(&plan, &config, NOW);
        assert_eq!(st.cookie, Cookie::Set(id.id, Some(Duration::from_secs(2))));
        // A read 300 ms later is due (a tenth of 2 s), and refreshes to 2 s, not a day.
        let plan = st.plan(&config, NOW + 300).unwrap();
        assert!(
            matches!(plan, Plan::Touch { expires_ms, .. } if expires_ms == NOW + 2_300),
            "{plan:?}"
        );
        // Back to the layer's policy: the cookie is re-sent with the layer's lifetime.
        let (mut st, id) = loaded(&config);
        st.data.expiry = None;
        st.push(Change::SetExpiry(None));
        let plan = st.plan(&config, NOW).unwrap();
        st.done(&plan, &config, NOW);
        assert_eq!(
            st.cookie,
            Cookie::Set(id.id, Some(Duration::from_millis(DAY)))
        );
    }

    #[test]
    fn the_absolute_lifetime_caps_every_expiry() {
        let config = config(Some(Duration::from_secs(10)));
        let (mut st, _) = loaded(&config);
        set(&mut st, "b", "2");
        let plan = st.plan(&config, NOW + 1_000).unwrap();
        let Plan::Save { record, .. } = &plan else {
            panic!("{plan:?}")
        };
        // The stored expiry (a day) is past the deadline: the save brings it back to it.
        assert_eq!(record.expires_at_unix_ms(), NOW + 10_000);
        let mut fresh = State::new(false);
        set(&mut fresh, "k", "1");
        let Plan::Create { record, .. } = fresh.plan(&config, NOW).unwrap() else {
            panic!()
        };
        assert_eq!(record.expires_at_unix_ms(), NOW + 10_000);
    }

    #[test]
    fn emptying_is_a_removal_at_the_loaded_version_and_removes_the_cookie() {
        let config = config(None);
        let (mut st, id) = loaded(&config);
        st.data.remove("a");
        st.push(Change::Remove("a".into()));
        let plan = st.plan(&config, NOW).unwrap();
        assert!(
            matches!(plan, Plan::Remove { id: r, expected: 3, .. } if r == id),
            "{plan:?}"
        );
        st.done(&plan, &config, NOW);
        assert!(st.stored.is_none());
        assert_eq!(st.cookie, Cookie::Remove);
        assert!(matches!(st.plan(&config, NOW).unwrap(), Plan::Nothing));
    }

    #[test]
    fn a_conflict_replays_the_changes_on_the_fresh_record() {
        let config = config(None);
        let (mut st, id) = loaded(&config);
        st.data.remove("a");
        st.push(Change::Remove("a".into()));
        // Someone else saved {a, b} at version 4: the removal is replayed, b is kept.
        let fresh = record(
            id,
            &format!(r#"{{"d":{{"a":1,"b":2}},"c":{NOW}}}"#),
            4,
            NOW + DAY,
        );
        assert_eq!(st.conflict_source(), Some(id));
        assert!(st.rebase(Some(fresh), &config, NOW).unwrap().is_none());
        let plan = st.plan(&config, NOW).unwrap();
        let Plan::Save {
            record, expected, ..
        } = &plan
        else {
            panic!("{plan:?}")
        };
        assert_eq!((*expected, values(record)), (4, r#"{"b":2}"#.to_owned()));
    }

    #[test]
    fn a_replayed_flash_read_removes_that_flash_only() {
        let mut data = SessionData::default();
        data.set_flash("msg", r#""new""#.into());
        Change::TakeFlash("msg".into(), r#""old""#.into())
            .apply(&mut data)
            .unwrap();
        assert_eq!(data.get("msg"), Some(r#""new""#), "a newer flash was eaten");
        Change::TakeFlash("msg".into(), r#""new""#.into())
            .apply(&mut data)
            .unwrap();
        assert!(data.get("msg").is_none());
        // A plain value with the same text is not a flash: kept.
        data.set("msg", r#""new""#.into());
        Change::TakeFlash("msg".into(), r#""new""#.into())
            .apply(&mut data)
            .unwrap();
        assert_eq!(data.get("msg"), Some(r#""new""#));
    }

    #[test]
    fn a_vanished_record_fails_a_write_but_not_a_refresh_or_an_emptying() {
        let config = config(None);
        // A save that finds nothing: gone, no cookie change.
        let (mut st, _) = loaded(&config);
        set(&mut st, "b", "2");
        let plan = st.plan(&config, NOW).unwrap();
        assert_eq!(st.missing(&plan), Vanished::Gone);
        assert_eq!((st.phase, st.cookie), (Phase::Destroyed, Cookie::Keep));
        assert!(st.check_live().unwrap_err().is_destroyed());
        // A touch that finds nothing: quiet.
        let (mut st, _) = loaded(&config);
        let plan = st.plan(&config, NOW + DAY / 2).unwrap();
        assert!(matches!(plan, Plan::Touch { .. }));
        assert_eq!(st.missing(&plan), Vanished::Quietly);
        assert_eq!((st.phase, st.cookie), (Phase::Live, Cookie::Keep));
        // An emptying whose record was destroyed meanwhile: what it meant to do is done.
        let (mut st, _) = loaded(&config);
        st.data.clear();
        st.push(Change::Clear);
        let plan = st.plan(&config, NOW).unwrap();
        assert_eq!(st.missing(&plan), Vanished::Quietly);
        // A reload after a conflict that finds nothing, with changes pending: gone.
        let (mut st, _) = loaded(&config);
        set(&mut st, "b", "2");
        assert_eq!(st.rebase(None, &config, NOW).unwrap(), Some(Vanished::Gone));
    }

    /// The cycle's steps: create the new record, then remove the old one at its version.
    fn cycle_to_the_new_record(config: &Config) -> (State, IdKey, IdKey) {
        let (mut st, old) = loaded(config);
        st.cycle();
        set(&mut st, "user", "1");
        let plan = st.plan(config, NOW).unwrap();
        let Plan::Create {
            id: new, record, ..
        } = &plan
        else {
            panic!("{plan:?}")
        };
        assert_eq!(values(record), r#"{"a":1,"user":1}"#);
        assert!(
            std::str::from_utf8(record.data())
                .unwrap()
                .contains(&format!("\"c\":{NOW}"))
        );
        let new = *new;
        assert_ne!(new, old);
        st.done(&plan, config, NOW);
        (st, old, new)
    }

    #[test]
    fn a_cycle_moves_the_session_conditionally() {
        let config = config(None);
        let (mut st, old, new) = cycle_to_the_new_record(&config);
        assert_eq!(
            st.cookie,
            Cookie::Set(new.id, Some(Duration::from_millis(DAY)))
        );
        let plan = st.plan(&config, NOW).unwrap();
        assert!(
            matches!(plan, Plan::Remove { id, expected: 3, .. } if id == old),
            "{plan:?}"
        );
        st.done(&plan, &config, NOW);
        assert_eq!(st.pending_changes(), 0);
        assert_eq!(st.stored.unwrap().id, new);
        assert_eq!(
            st.cookie,
            Cookie::Set(new.id, Some(Duration::from_millis(DAY)))
        );
        assert!(matches!(st.plan(&config, NOW).unwrap(), Plan::Nothing));
    }

    #[test]
    fn a_cycle_carries_over_a_write_to_the_old_id() {
        let config = config(None);
        let (mut st, old, new) = cycle_to_the_new_record(&config);
        // The removal of the old record conflicts: someone saved {a, b} there meanwhile.
        assert_eq!(st.conflict_source(), Some(old));
        let fresh = record(
            old,
            &format!(r#"{{"d":{{"a":1,"b":2}},"c":{NOW}}}"#),
            4,
            NOW + DAY,
        );
        assert!(st.rebase(Some(fresh), &config, NOW).unwrap().is_none());
        // The new record is written again with the write and this request's changes...
        let plan = st.plan(&config, NOW).unwrap();
        let Plan::Save {
            id: saved,
            record,
            expected,
            ..
        } = &plan
        else {
            panic!("{plan:?}")
        };
        assert_eq!((*saved, *expected), (new, 1));
        assert_eq!(values(record), r#"{"a":1,"b":2,"user":1}"#);
        st.done(&plan, &config, NOW);
        // ...then the old one is removed at the version that write came from.
        let plan = st.plan(&config, NOW).unwrap();
        assert!(
            matches!(plan, Plan::Remove { id, expected: 4, .. } if id == old),
            "{plan:?}"
        );
    }

    #[test]
    fn a_cycle_whose_source_was_destroyed_deletes_its_copy_and_fails() {
        let config = config(None);
        let (mut st, _, new) = cycle_to_the_new_record(&config);
        let plan = st.plan(&config, NOW).unwrap();
        assert_eq!(st.missing(&plan), Vanished::GoneAfterDeleting(new));
        assert_eq!((st.phase, st.cookie), (Phase::Destroyed, Cookie::Keep));
        // The same when a reload after a conflict finds the source gone.
        let (mut st, _, new) = cycle_to_the_new_record(&config);
        assert_eq!(
            st.rebase(None, &config, NOW).unwrap(),
            Some(Vanished::GoneAfterDeleting(new))
        );
    }

    #[test]
    fn destroy_deletes_both_records_of_a_move_and_removes_the_cookie() {
        let config = config(None);
        let (mut st, old, new) = cycle_to_the_new_record(&config);
        assert_eq!(st.destroy_targets(), (Some(new), Some(old)));
        st.destroyed(true);
        assert_eq!((st.phase, st.cookie), (Phase::Destroyed, Cookie::Remove));
        let (mut st, _) = loaded(&config);
        st.destroyed(false);
        assert_eq!(st.cookie, Cookie::Keep, "no cookie to remove");
    }

    #[test]
    fn a_failed_update_stops_every_later_write() {
        let config = config(None);
        let (mut st, _) = loaded(&config);
        set(&mut st, "b", "2");
        st.fail();
        assert!(st.check_live().unwrap_err().is_store());
        assert!(matches!(st.plan(&config, NOW).unwrap(), Plan::Nothing));
    }

    #[test]
    fn a_record_over_the_limit_is_refused_before_any_write() {
        let mut config = config(None);
        config.max_record_bytes = 40;
        let (mut st, _) = loaded(&config);
        set(&mut st, "b", &format!("\"{}\"", "x".repeat(100)));
        assert!(st.plan(&config, NOW).unwrap_err().is_too_large());
    }
}
