//! The cleanup task of the stores that keep expired records until they are deleted
//! ([`SqliteStore`](crate::SqliteStore), [`PostgresStore`](crate::PostgresStore)): every
//! interval, while the store lives, delete what has expired.

use std::future::Future;
use std::sync::{Arc, Weak};
use std::time::Duration;

use crate::error::StoreError;

/// Runs `sweep` every `interval` (the first after one interval) for as long as `store` has a
/// strong reference left, logging what it deleted at debug level and a failure as a warning
/// (the next tick tries again). `what` names the sessions in the message.
pub(crate) async fn every<T, F, Fut>(store: Weak<T>, interval: Duration, what: &str, sweep: F)
where
    F: Fn(Arc<T>) -> Fut,
    Fut: Future<Output = Result<u64, StoreError>>,
{
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ticker.tick().await;
    loop {
        ticker.tick().await;
        let Some(inner) = store.upgrade() else { return };
        match sweep(inner).await {
            Ok(n) if n > 0 => {
                crate::trace::event!(debug, "hyper-sessions: deleted {n} expired {what} sessions");
            }
            Ok(_) => {}
            Err(e) => crate::trace::event!(
                warn,
                "hyper-sessions: cleaning expired sessions failed: {}",
                crate::error::Chain(&e)
            ),
        }
    }
}
