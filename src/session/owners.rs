//! A user's sessions: a session's owner and label, the list of an owner's live sessions, and
//! revoking them, from a request ([`Session`]) or from anywhere else ([`Owners`]).

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;
use std::time::SystemTime;

use super::Session;
use super::Shared;
use super::payload::SessionData;
use super::state::Change;
use crate::error::{Chain, Error, Kind};
use crate::key::Key;
use crate::store::{Record, from_unix_ms};
use crate::trace::{event, op};

/// The longest owner or label accepted, in bytes.
pub const MAX_OWNER_BYTES: usize = 256;

/// A name for one of an owner's sessions that is safe to show them and to put in a form: it
/// is derived from the session's store key (itself a digest of the id), so it can neither be
/// turned into a cookie nor found in the store's keys. Its text form is 16 hex digits.
///
/// # Examples
/// ```
/// use hyper_sessions::Handle;
///
/// let handle: Handle = "0123456789abcdef".parse().unwrap();
/// assert_eq!(handle.to_string(), "0123456789abcdef");
/// assert!("not a handle".parse::<Handle>().is_err());
/// ```
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Handle([u8; 8]);

impl Handle {
    /// The handle of the session stored under `key`.
    fn of(key: Key) -> Handle {
        let digest = blake3::Hasher::new_derive_key("hyper-sessions 2026-12 session handle")
            .update(&key.to_bytes())
            .finalize();
        let mut handle = [0; 8];
        handle.copy_from_slice(&digest.as_bytes()[..8]);
        Handle(handle)
    }
}

impl fmt::Display for Handle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for byte in self.0 {
            write!(f, "{byte:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for Handle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Handle({self})")
    }
}

impl FromStr for Handle {
    type Err = Error;

    /// Parses the text form (16 hex digits, either case).
    fn from_str(s: &str) -> Result<Handle, Error> {
        let invalid = || Error::with(Kind::Invalid, "a session handle is 16 hex digits");
        if s.len() != 16 {
            return Err(invalid());
        }
        let digit = |b: u8| char::from(b).to_digit(16).ok_or_else(invalid);
        let mut handle = [0; 8];
        for (byte, pair) in handle.iter_mut().zip(s.as_bytes().chunks_exact(2)) {
            // Two hex digits make a byte.
            *byte = u8::try_from(digit(pair[0])? << 4 | digit(pair[1])?).map_err(|_| invalid())?;
        }
        Ok(Handle(handle))
    }
}

/// One live session of an owner, as [`Session::owner_sessions`] and [`Owners::list`] list it.
///
/// Nothing in it is the session's id or data: the handle is derived from the id's digest, and
/// the label is what the application chose to show (the crate records no address or user
/// agent of its own).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct SessionInfo {
    /// Names the session for [`Session::revoke`] and [`Owners::revoke`].
    pub handle: Handle,
    /// Whether this is the session of the request that asked (always `false` from [`Owners`]).
    pub current: bool,
    /// The label the application gave the session ([`Session::set_label`]), if any.
    pub label: Option<String>,
    /// When the session was created.
    pub created: SystemTime,
    /// When the session was last seen: its last save or expiry refresh, so to within a tenth
    /// of its idle timeout (a request that only reads a session writes nothing).
    pub last_seen: SystemTime,
    /// When the session expires unless it is used again.
    pub expires: SystemTime,
}

/// Checks an owner or label the application passes.
fn checked(what: &'static str, text: &str) -> Result<Arc<str>, Error> {
    if text.is_empty() || text.len() > MAX_OWNER_BYTES {
        return Err(Error::with(
            Kind::Invalid,
            format!(
                "a session {what} must be 1 to {MAX_OWNER_BYTES} bytes long, not {}",
                text.len()
            ),
        ));
    }
    Ok(text.into())
}

/// The live sessions of `owner` as the store has them, each with its store key, most recently
/// seen first. Records that cannot be read back, or that name another owner, are left out.
async fn list(shared: &Shared, owner: &str) -> Result<Vec<(Key, SessionInfo)>, Error> {
    let store = &*shared.store;
    let records = op(store, "owned", 1, store.owned(owner)).await?;
    let now = SystemTime::now();
    let mut sessions: Vec<(Key, SessionInfo)> = records
        .iter()
        .filter(|record| !record.is_expired_at(now))
        .filter_map(|record| info(shared, owner, record, now))
        .collect();
    sessions.sort_by_key(|(_, info)| std::cmp::Reverse(info.last_seen));
    Ok(sessions)
}

/// What the listing says about one record of `owner`'s.
fn info(
    shared: &Shared,
    owner: &str,
    record: &Record,
    now: SystemTime,
) -> Option<(Key, SessionInfo)> {
    let data = match SessionData::decode(record.data(), shared.config.max_record_bytes) {
        Ok(data) => data,
        Err(e) => {
            event!(
                error,
                "hyper-sessions: leaving an unreadable session record out of an owner's list: {}",
                Chain(&e)
            );
            return None;
        }
    };
    if data.owner.as_deref() != Some(owner) {
        return None;
    }
    let expires = record.expires_at();
    let idle = data.expiry.unwrap_or(shared.config.expiry).idle_timeout();
    let created = data.created.map_or(now, from_unix_ms);
    let last_seen = expires
        .checked_sub(idle)
        .unwrap_or(created)
        .clamp(created, now.max(created));
    Some((
        record.key(),
        SessionInfo {
            handle: Handle::of(record.key()),
            current: false,
            label: data.label.as_deref().map(str::to_owned),
            created,
            last_seen,
            expires,
        },
    ))
}

/// Deletes each session, unconditionally (a revoked session stays revoked); answers how many.
async fn revoke(shared: &Shared, keys: impl IntoIterator<Item = Key>) -> Result<usize, Error> {
    let store = &*shared.store;
    let mut revoked = 0;
    for key in keys {
        op(store, "delete", 1, store.delete(&key)).await?;
        revoked += 1;
    }
    Ok(revoked)
}

/// A user's sessions.
impl Session {
    /// Names the user this session belongs to (at login, say), so that it appears in
    /// [`owner_sessions`](Session::owner_sessions) and can be revoked with the owner's other
    /// sessions. Saved with the request's other changes; the owner stays with the session when
    /// its id is cycled, and goes with [`clear`](Session::clear) and
    /// [`destroy`](Session::destroy). A session that has an owner is kept even without values.
    ///
    /// The owner is stored with the session and indexed by the store: use a stable user id,
    /// not a secret.
    ///
    /// # Examples
    /// ```no_run
    /// # async fn f(session: hyper_sessions::Session) -> Result<(), hyper_sessions::Error> {
    /// // At login: a new id, then the owner and a name for the device.
    /// session.cycle_id().await?;
    /// session.set_owner("42").await?;
    /// session.set_label("Firefox on Linux").await?;
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    /// [`Error::is_invalid`] for an empty owner or one longer than [`MAX_OWNER_BYTES`], or a
    /// store error while loading.
    pub async fn set_owner(&self, owner: &str) -> Result<(), Error> {
        let owner = checked("owner", owner)?;
        self.ready().await?;
        let mut st = self.state();
        if st.data.owner.as_ref() != Some(&owner) {
            st.data.owner = Some(owner.clone());
            st.push(Change::SetOwner(owner));
        }
        Ok(())
    }

    /// The owner named by [`set_owner`](Session::set_owner), if any.
    ///
    /// # Errors
    /// A store error while loading.
    pub async fn owner(&self) -> Result<Option<String>, Error> {
        self.ready().await?;
        Ok(self.state().data.owner.as_deref().map(str::to_owned))
    }

    /// Gives the session a label for its owner's list (a device name the application chose,
    /// say). Saved with the request's other changes.
    ///
    /// # Errors
    /// [`Error::is_invalid`] for an empty label or one longer than [`MAX_OWNER_BYTES`], or a
    /// store error while loading.
    pub async fn set_label(&self, label: &str) -> Result<(), Error> {
        let label = checked("label", label)?;
        self.ready().await?;
        let mut st = self.state();
        if st.data.label.as_ref() != Some(&label) {
            st.data.label = Some(label.clone());
            st.push(Change::SetLabel(label));
        }
        Ok(())
    }

    /// The live sessions of this session's owner, most recently seen first, this one marked
    /// [`current`](SessionInfo::current); empty when the session has no owner. The list is
    /// the store's: a session whose owner was set in this request appears once the request has
    /// been saved.
    ///
    /// # Errors
    /// A store error.
    pub async fn owner_sessions(&self) -> Result<Vec<SessionInfo>, Error> {
        let Some((owner, current)) = self.owner_and_key().await? else {
            return Ok(Vec::new());
        };
        let mut sessions = list(&self.inner.shared, &owner).await?;
        for (key, info) in &mut sessions {
            info.current = Some(*key) == current;
        }
        Ok(sessions.into_iter().map(|(_, info)| info).collect())
    }

    /// Revokes one of this session's owner's sessions, named by its handle: it is deleted from
    /// the store at once, for good (as [`destroy`](Session::destroy) does; a request of that
    /// session running meanwhile fails to save, and its next request starts a fresh session).
    /// Revoking this very session destroys it. Answers whether the handle named one of the
    /// owner's live sessions.
    ///
    /// # Errors
    /// A store error.
    pub async fn revoke(&self, handle: Handle) -> Result<bool, Error> {
        let Some((owner, current)) = self.owner_and_key().await? else {
            return Ok(false);
        };
        let sessions = list(&self.inner.shared, &owner).await?;
        let Some((key, _)) = sessions.into_iter().find(|(_, info)| info.handle == handle) else {
            return Ok(false);
        };
        if Some(key) == current {
            self.destroy().await?;
        } else {
            revoke(&self.inner.shared, [key]).await?;
        }
        Ok(true)
    }

    /// Revokes every other session of this session's owner ("log out everywhere else"), as
    /// [`revoke`](Session::revoke) does each; answers how many. Sessions the owner starts
    /// meanwhile are not revoked.
    ///
    /// # Errors
    /// A store error; the sessions revoked before it stay revoked.
    pub async fn revoke_others(&self) -> Result<usize, Error> {
        let Some((owner, current)) = self.owner_and_key().await? else {
            return Ok(0);
        };
        let sessions = list(&self.inner.shared, &owner).await?;
        let others = sessions
            .into_iter()
            .map(|(key, _)| key)
            .filter(|&key| Some(key) != current);
        revoke(&self.inner.shared, others).await
    }

    /// The session's owner and the key it is stored under now, once loaded.
    async fn owner_and_key(&self) -> Result<Option<(Arc<str>, Option<Key>)>, Error> {
        self.ready().await?;
        let st = self.state();
        Ok(st
            .data
            .owner
            .clone()
            .map(|owner| (owner, st.stored.map(|s| s.id.key))))
    }
}

/// The sessions of any owner, outside a request: for an administrator locking an account, or
/// a password change made elsewhere. Get it from [`SessionLayer::owners`](crate::SessionLayer::owners);
/// it is cheap to clone and shares the layer's store.
///
/// # Examples
/// ```
/// # async fn f() -> Result<(), hyper_sessions::Error> {
/// let layer = hyper_sessions::SessionLayer::new(hyper_sessions::MemoryStore::new());
/// let owners = layer.owners();
/// // The account of user 42 was locked: end every session of theirs.
/// let ended = owners.revoke_all("42").await?;
/// assert_eq!(ended, 0);
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct Owners {
    pub(crate) shared: Arc<Shared>,
}

impl Owners {
    /// The live sessions of `owner`, most recently seen first.
    ///
    /// # Errors
    /// A store error.
    pub async fn list(&self, owner: &str) -> Result<Vec<SessionInfo>, Error> {
        let sessions = list(&self.shared, owner).await?;
        Ok(sessions.into_iter().map(|(_, info)| info).collect())
    }

    /// Revokes the session of `owner` named by `handle` (see [`Session::revoke`]); answers
    /// whether there was one.
    ///
    /// # Errors
    /// A store error.
    pub async fn revoke(&self, owner: &str, handle: Handle) -> Result<bool, Error> {
        let sessions = list(&self.shared, owner).await?;
        let keys = sessions
            .into_iter()
            .filter(|(_, info)| info.handle == handle)
            .map(|(key, _)| key);
        Ok(revoke(&self.shared, keys).await? > 0)
    }

    /// Revokes every live session of `owner` ("log out everywhere"); answers how many.
    ///
    /// # Errors
    /// A store error; the sessions revoked before it stay revoked.
    pub async fn revoke_all(&self, owner: &str) -> Result<usize, Error> {
        let sessions = list(&self.shared, owner).await?;
        revoke(&self.shared, sessions.into_iter().map(|(key, _)| key)).await
    }
}

impl fmt::Debug for Owners {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Owners").finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn handles_are_stable_short_and_not_the_key() {
        let key = Key::of(crate::Id::random());
        let handle = Handle::of(key);
        assert_eq!(handle, Handle::of(key));
        let text = handle.to_string();
        assert_eq!(text.len(), 16);
        assert!(!key.to_hex().contains(&text));
        assert_eq!(text.parse::<Handle>().unwrap(), handle);
        assert_eq!(text.to_uppercase().parse::<Handle>().unwrap(), handle);
        for bad in [
            "",
            "0123",
            "0123456789abcdeg",
            "0123456789abcdef0",
            "+123456789abcdef",
        ] {
            assert!(bad.parse::<Handle>().unwrap_err().is_invalid(), "{bad}");
        }
    }

    #[test]
    fn owners_and_labels_are_bounded() {
        assert!(checked("owner", "").unwrap_err().is_invalid());
        assert!(
            checked("owner", &"x".repeat(MAX_OWNER_BYTES + 1))
                .unwrap_err()
                .is_invalid()
        );
        assert_eq!(
            &*checked("owner", &"x".repeat(MAX_OWNER_BYTES)).unwrap(),
            "x".repeat(256)
        );
    }
}
