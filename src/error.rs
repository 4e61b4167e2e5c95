//! The crate's error types: [`Error`] for users, [`StoreError`] for store implementations.

use std::error::Error as StdError;
use std::fmt;

type Cause = Box<dyn StdError + Send + Sync>;

/// The error returned by [`Session`](crate::Session) methods and handed to the layer's error hook.
///
/// It is opaque: ask it what it is with the `is_*` methods, and follow
/// [`source()`](std::error::Error::source) for the cause (a [`StoreError`], a
/// `serde_json::Error`, ...). `Display` describes this level only.
pub struct Error {
    inner: Box<ErrorImpl>,
}

struct ErrorImpl {
    kind: Kind,
    cause: Option<Cause>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    /// The store failed (see the cause).
    Store,
    /// A value could not be serialized or deserialized to the requested type.
    Serde,
    /// The session record would exceed the configured size limit.
    TooLarge,
    /// The compare-and-set save lost to concurrent writers more times than allowed.
    Conflict,
    /// The session was destroyed or expired by someone else before this request's changes were saved.
    Gone,
    /// The request carries no `Session`: the layer is not installed.
    MissingLayer,
    /// The layer's configuration is invalid.
    Config,
    /// The session was already destroyed in this request.
    Destroyed,
    /// An owner or label the application passed was refused (empty, or too long).
    Invalid,
}

impl Error {
    pub(crate) fn new(kind: Kind) -> Self {
        Error {
            inner: Box::new(ErrorImpl { kind, cause: None }),
        }
    }

    pub(crate) fn with(kind: Kind, cause: impl Into<Cause>) -> Self {
        Error {
            inner: Box::new(ErrorImpl {
                kind,
                cause: Some(cause.into()),
            }),
        }
    }

    /// The store failed; [`source()`](std::error::Error::source) is the [`StoreError`].
    pub fn is_store(&self) -> bool {
        self.inner.kind == Kind::Store
    }

    /// The store is unreachable, timed out or full: worth a 503 rather than a 500.
    pub fn is_unavailable(&self) -> bool {
        self.store_error().is_some_and(StoreError::is_unavailable)
    }

    /// A value could not be (de)serialized as the requested type.
    pub fn is_serde(&self) -> bool {
        self.inner.kind == Kind::Serde
    }

    /// The session would exceed the configured record size limit; nothing was changed.
    pub fn is_too_large(&self) -> bool {
        self.inner.kind == Kind::TooLarge
    }

    /// Saving lost the compare-and-set race too many times; the changes were not stored.
    pub fn is_conflict(&self) -> bool {
        self.inner.kind == Kind::Conflict
    }

    /// The stored session disappeared (destroyed by a concurrent request, or expired) before
    /// this request's changes could be saved; they were not stored and the session stays gone.
    pub fn is_gone(&self) -> bool {
        self.inner.kind == Kind::Gone
    }

    /// The session was destroyed earlier in this request and cannot be used any more.
    pub fn is_destroyed(&self) -> bool {
        self.inner.kind == Kind::Destroyed
    }

    /// The request has no session: the [`SessionLayer`](crate::SessionLayer) is not installed
    /// around this service.
    pub fn is_missing_layer(&self) -> bool {
        self.inner.kind == Kind::MissingLayer
    }

    /// The layer's configuration is invalid (returned by
    /// [`SessionLayerBuilder::build`](crate::SessionLayerBuilder::build)).
    pub fn is_config(&self) -> bool {
        self.inner.kind == Kind::Config
    }

    /// An owner or label passed to [`Session::set_owner`](crate::Session::set_owner) or
    /// [`Session::set_label`](crate::Session::set_label) was refused: empty, or longer than
    /// [`MAX_OWNER_BYTES`](crate::MAX_OWNER_BYTES).
    pub fn is_invalid(&self) -> bool {
        self.inner.kind == Kind::Invalid
    }

    fn store_error(&self) -> Option<&StoreError> {
        self.inner.cause.as_ref()?.downcast_ref::<StoreError>()
    }
}

impl From<StoreError> for Error {
    fn from(e: StoreError) -> Self {
        Error::with(Kind::Store, e)
    }
}

impl fmt::Debug for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut d = f.debug_struct("hyper_sessions::Error");
        d.field("kind", &self.inner.kind);
        if let Some(cause) = &self.inner.cause {
            d.field("cause", cause);
        }
        d.finish()
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self.inner.kind {
            Kind::Store => "session store failed",
            Kind::Serde => "session value could not be (de)serialized",
            Kind::TooLarge => "session record would exceed the size limit",
            Kind::Conflict => "session save kept conflicting with concurrent writers",
            Kind::Gone => "session was destroyed or expired before its changes were saved",
            Kind::MissingLayer => "request has no session: SessionLayer is not installed",
            Kind::Config => "invalid session layer configuration",
            Kind::Destroyed => "session was destroyed earlier in this request",
            Kind::Invalid => "session owner or label refused (empty, or too long)",
        })
    }
}

impl StdError for Error {
    fn source(&self) -> Option<&(dyn StdError + 'static)> {
        self.inner
            .cause
            .as_ref()
            .map(|c| &**c as &(dyn StdError + 'static))
    }
}

/// What kind of failure a [`StoreError`] is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum StoreErrorKind {
    /// The store could not be reached, timed out, or refused service (down, overloaded, full).
    Unavailable,
    /// A stored record could not be read back (bad encoding, wrong types).
    Corrupt,
    /// Anything else: a bug, a permission problem, an unexpected reply.
    Other,
}

/// An error from a [`SessionStore`](crate::store::SessionStore), with its cause.
///
/// Store implementations build one with [`StoreError::unavailable`], [`StoreError::corrupt`] or
/// [`StoreError::other`], passing the underlying error so that it stays reachable through
/// [`source()`](std::error::Error::source).
///
/// # Examples
/// ```
/// use hyper_sessions::store::{StoreError, StoreErrorKind};
///
/// let io = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "refused");
/// let err = StoreError::unavailable(io);
/// assert_eq!(err.kind(), StoreErrorKind::Unavailable);
/// assert!(std::error::Error::source(&err).is_some());
/// ```
pub struct StoreError {
    kind: StoreErrorKind,
    cause: Cause,
}

impl StoreError {
    /// The store cannot serve now (connection refused, timeout, full).
    pub fn unavailable(cause: impl Into<Box<dyn StdError + Send + Sync>>) -> Self {
        StoreError {
            kind: StoreErrorKind::Unavailable,
            cause: cause.into(),
        }
    }

    /// A stored record is unreadable.
    pub fn corrupt(cause: impl Into<Box<dyn StdError + Send + Sync>>) -> Self {
        StoreError {
            kind: StoreErrorKind::Corrupt,
            cause: cause.into(),
        }
    }

    /// Any other failure.
    pub fn other(cause: impl Into<Box<dyn StdError + Send + Sync>>) -> Self {
        StoreError {
            kind: StoreErrorKind::Other,
            cause: cause.into(),
        }
    }

    /// What kind of failure this is.
    pub fn kind(&self) -> StoreErrorKind {
        self.kind
    }

    /// Shorthand for `kind() == StoreErrorKind::Unavailable`.
    pub fn is_unavailable(&self) -> bool {
        self.kind == StoreErrorKind::Unavailable
    }

    /// Shorthand for `kind() == StoreErrorKind::Corrupt`.
    pub fn is_corrupt(&self) -> bool {
        self.kind == StoreErrorKind::Corrupt
    }
}

impl fmt::Debug for StoreError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StoreError")
            .field("kind", &self.kind)
            .field("cause", &self.cause)
            .finish()
    }
}

impl fmt::Display for StoreError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self.kind {
            StoreErrorKind::Unavailable => "session store unavailable",
            StoreErrorKind::Corrupt => "stored session record is corrupt",
            StoreErrorKind::Other => "session store error",
        })
    }
}

impl StdError for StoreError {
    fn source(&self) -> Option<&(dyn StdError + 'static)> {
        Some(&*self.cause)
    }
}

/// Formats an error with its whole chain of causes, for logs.
pub(crate) struct Chain<'a>(pub(crate) &'a (dyn StdError + 'static));

impl fmt::Display for Chain<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)?;
        let mut next = self.0.source();
        while let Some(e) = next {
            write!(f, ": {e}")?;
            next = e.source();
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_the_cause_chain() {
        let io = std::io::Error::new(std::io::ErrorKind::TimedOut, "redis timed out");
        let err = Error::from(StoreError::unavailable(io));
        assert!(err.is_store());
        assert!(err.is_unavailable());
        let store = err.source().unwrap();
        assert!(store.to_string().contains("unavailable"));
        assert_eq!(store.source().unwrap().to_string(), "redis timed out");
        let chain = Chain(&err).to_string();
        assert_eq!(
            chain,
            "session store failed: session store unavailable: redis timed out"
        );
    }
}
