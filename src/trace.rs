//! What the layer tells about its work: `log` records, or with the `tracing` feature `tracing`
//! events (which `log` still receives while no `tracing` subscriber is set) and a span per
//! store operation. Neither ever carries a session id or session data.

#[cfg(feature = "tracing")]
use std::future::Future;
#[cfg(feature = "tracing")]
use std::pin::Pin;
#[cfg(feature = "tracing")]
use std::task::{Context, Poll};
#[cfg(feature = "tracing")]
use std::time::Instant;

#[cfg(feature = "tracing")]
use crate::error::StoreErrorKind;
use crate::store::{Call, DynStore};
#[cfg(feature = "tracing")]
use crate::store::{CreateOutcome, Record, SaveOutcome};

/// An event at a level (`error`, `warn`, `debug`): `tracing::$level!` with the `tracing`
/// feature, `log::$level!` without it.
#[cfg(feature = "tracing")]
macro_rules! event {
    ($level:ident, $($arg:tt)+) => { ::tracing::$level!($($arg)+) };
}

/// An event at a level (`error`, `warn`, `debug`): `tracing::$level!` with the `tracing`
/// feature, `log::$level!` without it.
#[cfg(not(feature = "tracing"))]
macro_rules! event {
    ($level:ident, $($arg:tt)+) => { ::log::$level!($($arg)+) };
}

pub(crate) use event;

/// What a store operation answered, as a span field.
#[cfg(feature = "tracing")]
pub(crate) trait Outcome {
    fn outcome(&self) -> &'static str;
}

#[cfg(feature = "tracing")]
impl Outcome for SaveOutcome {
    fn outcome(&self) -> &'static str {
        match self {
            SaveOutcome::Saved => "saved",
            SaveOutcome::Conflict => "conflict",
            SaveOutcome::Missing => "missing",
        }
    }
}

#[cfg(feature = "tracing")]
impl Outcome for CreateOutcome {
    fn outcome(&self) -> &'static str {
        match self {
            CreateOutcome::Created => "created",
            CreateOutcome::IdTaken => "id_taken",
        }
    }
}

#[cfg(feature = "tracing")]
impl Outcome for Vec<Record> {
    fn outcome(&self) -> &'static str {
        if self.is_empty() { "none" } else { "listed" }
    }
}

#[cfg(feature = "tracing")]
impl Outcome for Option<Record> {
    fn outcome(&self) -> &'static str {
        if self.is_some() { "found" } else { "absent" }
    }
}

#[cfg(feature = "tracing")]
impl Outcome for () {
    fn outcome(&self) -> &'static str {
        "done"
    }
}

#[cfg(feature = "tracing")]
/// A failed operation's outcome: the kind of its error (its message may be long; the events of
/// the layer carry it where the failure is reported).
pub(crate) fn failure(kind: StoreErrorKind) -> &'static str {
    match kind {
        StoreErrorKind::Unavailable => "unavailable",
        StoreErrorKind::Corrupt => "corrupt",
        StoreErrorKind::Other => "error",
    }
}

/// A store operation under way, as the layer awaits it: the operation itself, or with the
/// `tracing` feature the operation inside its span.
#[cfg(not(feature = "tracing"))]
pub(crate) type Op<'a, T> = Call<'a, T>;

/// A store operation under way, as the layer awaits it: the operation itself, or with the
/// `tracing` feature the operation inside its span.
#[cfg(feature = "tracing")]
pub(crate) struct Op<'a, T> {
    call: Call<'a, T>,
    span: tracing::Span,
    started: Instant,
}

/// Starts watching a store operation: `name` (`load`, `save`...) of `store`, the
/// commit's `attempt` (1, then one more after each conflict).
#[cfg(not(feature = "tracing"))]
#[inline]
pub(crate) fn op<'a, T>(
    _store: &dyn DynStore,
    _name: &'static str,
    _attempt: u32,
    call: Call<'a, T>,
) -> Op<'a, T> {
    call
}

/// Starts watching a store operation: `name` (`load`, `save`...) of `store`, the
/// commit's `attempt` (1, then one more after each conflict).
#[cfg(feature = "tracing")]
pub(crate) fn op<'a, T>(
    store: &dyn DynStore,
    name: &'static str,
    attempt: u32,
    call: Call<'a, T>,
) -> Op<'a, T> {
    let span = tracing::debug_span!(
        "hyper_sessions::store",
        store = store.name(),
        op = name,
        attempt,
        outcome = tracing::field::Empty,
        latency_us = tracing::field::Empty,
    );
    Op {
        call,
        span,
        started: Instant::now(),
    }
}

#[cfg(feature = "tracing")]
impl<T: Outcome> Future for Op<'_, T> {
    type Output = Result<T, crate::error::StoreError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = &mut *self;
        let _entered = this.span.enter();
        let answer = std::task::ready!(Pin::new(&mut this.call).poll(cx));
        let outcome = match &answer {
            Ok(value) => value.outcome(),
            Err(e) => failure(e.kind()),
        };
        let latency_us = u64::try_from(this.started.elapsed().as_micros()).unwrap_or(u64::MAX);
        this.span.record("outcome", outcome);
        this.span.record("latency_us", latency_us);
        tracing::debug!(outcome, latency_us, "store operation");
        Poll::Ready(answer)
    }
}

/// A store's short name for spans: its type's name without the module path (`MemoryStore`,
/// `Observed` for `tests::Observed<MemoryStore>`).
#[cfg(feature = "tracing")]
pub(crate) fn store_name(type_name: &'static str) -> &'static str {
    let base = type_name.split('<').next().unwrap_or(type_name);
    base.rsplit("::").next().unwrap_or(base)
}

#[cfg(all(test, feature = "tracing"))]
mod tests {
    use super::*;

    #[test]
    fn store_names_are_short() {
        assert_eq!(
            store_name("hyper_sessions::store::memory::MemoryStore"),
            "MemoryStore"
        );
        assert_eq!(
            store_name("common::Observed<hyper_sessions::MemoryStore>"),
            "Observed"
        );
        assert_eq!(store_name("MapStore"), "MapStore");
    }
}
