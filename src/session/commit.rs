//! The commit loop: plan, write conditionally, and on a conflict reload, replay and retry.

use std::time::{Duration, SystemTime};

use super::Session;
use super::state::{Plan, Vanished};
use crate::error::{Error, Kind};
use crate::record::{from_unix_ms, unix_ms};
use crate::store::{CreateOutcome, SaveOutcome};
use crate::trace::{event, op};

impl Session {
    /// Saves what changed, as the layer does after the response (and `update` at once).
    ///
    /// Every write is conditional on the version this request last saw. When another request
    /// of the same session wrote first, the record is loaded again, this request's changes are
    /// replayed on it, and the write is planned anew; after `max_save_attempts` such conflicts
    /// the commit gives up with [`Error::is_conflict`].
    pub(super) async fn commit_now(&self) -> Result<(), Error> {
        let _io = self.io_lock().await;
        let config = self.config();
        let store = self.store();
        let mut conflicts = 0;
        loop {
            let attempt = conflicts + 1;
            let now = unix_ms(SystemTime::now());
            let plan = self.state().plan(config, now)?;
            let outcome = match &plan {
                Plan::Nothing => return Ok(()),
                Plan::Create { record, .. } => {
                    match op(store, "create", attempt, store.create(record)).await? {
                        CreateOutcome::Created => SaveOutcome::Saved,
                        CreateOutcome::IdTaken => {
                            event!(
                                warn,
                                "hyper-sessions: new session id collided; drawing another"
                            );
                            self.state().id_taken();
                            continue;
                        }
                    }
                }
                Plan::Save {
                    record, expected, ..
                } => op(store, "save", attempt, store.save(record, *expected)).await?,
                Plan::Touch {
                    id,
                    expected,
                    expires_ms,
                } => {
                    let touch = store.touch(&id.key, *expected, from_unix_ms(*expires_ms));
                    op(store, "touch", attempt, touch).await?
                }
                Plan::Remove { id, expected, .. } => {
                    op(store, "remove", attempt, store.remove(&id.key, *expected)).await?
                }
            };
            match outcome {
                SaveOutcome::Saved => self.state().done(&plan, config, now),
                SaveOutcome::Missing => {
                    let vanished = self.state().missing(&plan);
                    return self.after_vanishing(vanished).await;
                }
                SaveOutcome::Conflict => {
                    conflicts += 1;
                    if conflicts >= config.max_save_attempts {
                        return Err(Error::new(Kind::Conflict));
                    }
                    // Writers that collided would collide again if they all retried at once:
                    // spread them out, wider on each attempt. Boxed: the rare path should not
                    // grow every commit's future.
                    Box::pin(tokio::time::sleep(conflict_backoff(conflicts))).await;
                    let Some(source) = self.state().conflict_source() else {
                        continue;
                    };
                    // The reload prepares the next attempt.
                    let fresh = op(store, "load", conflicts + 1, store.load(&source.key)).await?;
                    let now = unix_ms(SystemTime::now());
                    let rebased = self.state().rebase(fresh, config, now)?;
                    if let Some(vanished) = rebased {
                        return self.after_vanishing(vanished).await;
                    }
                }
            }
        }
    }

    /// Ends a commit whose record vanished under it.
    async fn after_vanishing(&self, vanished: Vanished) -> Result<(), Error> {
        match vanished {
            Vanished::Quietly => Ok(()),
            Vanished::Gone => Err(Error::new(Kind::Gone)),
            Vanished::GoneAfterDeleting(id) => {
                // The copy a cycle made of a session destroyed meanwhile must not outlive it.
                let store = self.store();
                op(store, "delete", 1, store.delete(&id.key)).await?;
                Err(Error::new(Kind::Gone))
            }
        }
    }
}

/// A random pause below 0.5 ms, doubled per attempt up to 32 ms.
fn conflict_backoff(attempt: u32) -> Duration {
    let window_us = 500u64 << attempt.saturating_sub(1).min(6);
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
