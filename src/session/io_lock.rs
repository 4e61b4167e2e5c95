//! The per-handle I/O lock: a request's clones of its `Session` do their store I/O one at a time.

use std::sync::atomic::{AtomicBool, Ordering};

/// An async lock without a queue of its own: a flag, and a `Notify` that only a waiting clone
/// of the handle ever parks on (a request's clones rarely do I/O at the same time).
#[derive(Default)]
pub(super) struct IoLock {
    busy: AtomicBool,
    released: tokio::sync::Notify,
}

/// Holds an [`IoLock`]; releasing wakes one waiter, if any.
pub(super) struct IoGuard<'a>(&'a IoLock);

impl Drop for IoGuard<'_> {
    fn drop(&mut self) {
        self.0.busy.store(false, Ordering::Release);
        self.0.released.notify_one();
    }
}

impl IoLock {
    pub(super) fn try_lock(&self) -> Option<IoGuard<'_>> {
        // `then`, not `then_some`: a guard made and dropped on failure would release the lock.
        (!self.busy.swap(true, Ordering::Acquire)).then(|| IoGuard(self))
    }

    pub(super) async fn lock(&self) -> IoGuard<'_> {
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

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::AtomicUsize;
    use std::time::Duration;

    use super::*;

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
