//! The store contract's conformance checks, for authors of stores (feature `testing`).
//!
//! Every store shipped with this crate passes them; run them on yours with one test:
//! ```no_run
//! # use hyper_sessions::MemoryStore as MyStore;
//! #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
//! async fn my_store_keeps_the_contract() {
//!     // A store over a fresh, empty database or server: the checks create their own
//!     // records under random keys, so one store serves them all.
//!     let store = MyStore::default();
//!     hyper_sessions::testing::check_store(store).await;
//! }
//! ```
//! and enable the feature for tests only:
//! ```toml
//! [dev-dependencies]
//! hyper-sessions = { version = "0.1", features = ["testing"] }
//! ```
//! For example, the crate's own memory store:
//! ```
//! # #[tokio::main(flavor = "multi_thread", worker_threads = 2)]
//! # async fn main() {
//! hyper_sessions::testing::check_store(hyper_sessions::MemoryStore::default()).await;
//! # }
//! ```
//! [`check_store`] runs every check of [`CHECKS`] in turn and panics naming the first that
//! fails. The checks themselves are private, so that they can change without breaking anyone.
//! They take about two seconds (some wait for records to expire) and need a multi-threaded tokio
//! runtime.
//!
//! The checks cover what [`SessionStore`] promises: expired records never returned, creates
//! that never overwrite, every change conditional on the version (`Conflict` and `Missing`
//! answered exactly), concurrent compare-and-sets with one winner, records kept byte for byte,
//! owners kept with their records and listed exactly (through every change, and among many).
//! What the layer builds on top (no lost updates, destroy is final, the races of a request
//! parked between its load and its commit) follows from these; the crate's own test suite checks
//! it over HTTP for its stores.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;

// Public paths only: the crate's own tests include this file as it is (`tests/common/`).
use hyper_sessions::Id;
use hyper_sessions::store::{CreateOutcome, Key, Record, SaveOutcome, SessionStore};

fn new_key() -> Key {
    Key::of(Id::random())
}

/// Milliseconds since the Unix epoch: stores keep expiries to the millisecond.
fn unix_ms(t: SystemTime) -> u64 {
    let since = t.duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    u64::try_from(since.as_millis()).unwrap_or(u64::MAX)
}

/// A record's expiry in milliseconds since the Unix epoch.
fn expiry_ms(record: &Record) -> u64 {
    unix_ms(record.expires_at())
}

fn in_ms(ms: u64) -> SystemTime {
    SystemTime::now() + Duration::from_millis(ms)
}

fn record(key: Key, data: &str, version: u64, expires_at: SystemTime) -> Record {
    Record::new(key, Bytes::from(data.to_owned()), version, expires_at)
}

const DATA: &str = r#"{"d":{"count":1}}"#;

/// A new record of `DATA` at version 1, expiring in `ms` milliseconds, created in `store`: its
/// key.
async fn created<S: SessionStore>(store: &S, ms: u64) -> Key {
    let key = new_key();
    let outcome = store
        .create(&record(key, DATA, 1, in_ms(ms)))
        .await
        .unwrap();
    assert_eq!(outcome, CreateOutcome::Created);
    key
}

/// An owner name no other check or run uses, with the characters a store might trip on
/// (quotes, braces, a colon, a space, non-ASCII).
fn new_owner() -> Arc<str> {
    let unique = new_key().to_hex();
    format!("user:{{{}}} \"zürich\" {}", &unique[..8], &unique[8..]).into()
}

fn owned_record(key: Key, owner: &Arc<str>, version: u64, expires_at: SystemTime) -> Record {
    record(key, DATA, version, expires_at).with_owner(Some(owner.clone()))
}

/// The keys `store` lists for `owner`, checking that each listed record is the stored one.
async fn listed<S: SessionStore>(store: &S, owner: &str) -> BTreeSet<Key> {
    listed_while(store, owner, false).await
}

/// As [`listed`]; with `saving` (saves run meanwhile), a listed record may have been saved
/// again by the time it is loaded: the stored one is then the same or a later version.
async fn listed_while<S: SessionStore>(store: &S, owner: &str, saving: bool) -> BTreeSet<Key> {
    let records = store.owned(owner).await.unwrap();
    let keys: BTreeSet<Key> = records.iter().map(Record::key).collect();
    assert_eq!(keys.len(), records.len(), "a record was listed twice");
    for r in &records {
        assert_eq!(
            r.owner(),
            Some(owner),
            "a record of another owner was listed"
        );
        // Loaded after the listing: a save running meanwhile (`owned_lists_many`) may have
        // stored a later version since, which a store that lists and loads in separate steps
        // cannot rule out.
        let stored = store.load(&r.key()).await.unwrap();
        if saving {
            let stored = stored.expect("a listed record is not stored");
            assert!(
                stored.version() >= r.version(),
                "a listed record is newer than the stored one"
            );
            continue;
        }
        assert_eq!(
            stored.as_ref(),
            Some(r),
            "a listed record differs from the stored one"
        );
    }
    keys
}

/// Defines each check as a public function and lists it in [`CHECKS`] and [`check_store`]: a
/// check is written once and cannot be left out of the run.
macro_rules! checks {
    ($(#[doc = $doc:literal] async fn $name:ident($store:ident) $body:block)*) => {
        /// The names of the checks, in the order [`check_store`] runs them.
        pub const CHECKS: &[&str] = &[$(stringify!($name)),*];

        /// Runs every check on `store`, in turn; panics naming the first that fails.
        ///
        /// # Panics
        /// When the store breaks the contract (or fails an operation).
        pub async fn check_store<S: SessionStore + Clone>(store: S) {
            $(
                let run = tokio::spawn($name(store.clone()));
                if let Err(e) = run.await {
                    panic!("the store failed the check `{}`: {e}", stringify!($name));
                }
            )*
        }

        $(
            #[doc = $doc]
            async fn $name<S: SessionStore + Clone>($store: S) $body
        )*
    };
}

checks! {
    /// A created record loads back byte for byte, with its version and expiry (to the millisecond).
    async fn round_trip(store) {
        let key = new_key();
        let expires = in_ms(60_000);
        let rec = record(key, DATA, 1, expires);
        assert_eq!(store.create(&rec).await.unwrap(), CreateOutcome::Created);
        let back = store
            .load(&key)
            .await
            .unwrap()
            .expect("created record loads");
        assert_eq!(back.key(), key);
        assert_eq!(back.data(), rec.data());
        assert_eq!(back.version(), 1);
        // Stores may keep millisecond precision.
        assert_eq!(expiry_ms(&back), expiry_ms(&rec));
    }

    /// A key the store never saw loads as `None`.
    async fn load_missing(store) {
        assert!(store.load(&new_key()).await.unwrap().is_none());
    }

    /// An expired record is never returned, and neither `save` nor `touch` revives it.
    async fn expired_records_are_never_returned(store) {
        let key = created(&store, 300).await;
        assert!(store.load(&key).await.unwrap().is_some());
        tokio::time::sleep(Duration::from_millis(450)).await;
        assert!(
            store.load(&key).await.unwrap().is_none(),
            "expired record returned"
        );
        // Saving or touching an expired record must not revive it.
        let next = record(key, DATA, 2, in_ms(60_000));
        assert_eq!(store.save(&next, 1).await.unwrap(), SaveOutcome::Missing);
        assert_eq!(
            store.touch(&key, 1, in_ms(60_000)).await.unwrap(),
            SaveOutcome::Missing
        );
        assert!(store.load(&key).await.unwrap().is_none());
    }

    /// `delete` removes that record only, and deleting what is not there succeeds.
    async fn delete(store) {
        let key = created(&store, 60_000).await;
        let other = created(&store, 60_000).await;
        store.delete(&key).await.unwrap();
        assert!(store.load(&key).await.unwrap().is_none());
        assert!(
            store.load(&other).await.unwrap().is_some(),
            "delete removed another record"
        );
        // Deleting what is not there succeeds.
        store.delete(&key).await.unwrap();
        store.delete(&new_key()).await.unwrap();
    }

    /// `create` never overwrites a live record: it answers `IdTaken`.
    async fn create_never_overwrites(store) {
        let key = created(&store, 60_000).await;
        let intruder = record(key, r#"{"d":{"admin":true}}"#, 1, in_ms(60_000));
        assert_eq!(
            store.create(&intruder).await.unwrap(),
            CreateOutcome::IdTaken
        );
        let back = store.load(&key).await.unwrap().unwrap();
        assert_eq!(back.data(), &Bytes::from(DATA));
    }

    /// `create` takes the place of an expired record.
    async fn create_replaces_expired(store) {
        let key = created(&store, 200).await;
        tokio::time::sleep(Duration::from_millis(350)).await;
        let fresh = record(key, r#"{"d":{"new":1}}"#, 1, in_ms(60_000));
        assert_eq!(store.create(&fresh).await.unwrap(), CreateOutcome::Created);
        assert_eq!(
            store.load(&key).await.unwrap().unwrap().data(),
            fresh.data()
        );
    }

    /// `save` replaces the record only at the expected version.
    async fn compare_and_set(store) {
        let key = created(&store, 60_000).await;
        let stale = record(key, r#"{"d":{"count":9}}"#, 6, in_ms(60_000));
        assert_eq!(store.save(&stale, 5).await.unwrap(), SaveOutcome::Conflict);
        assert_eq!(
            store.load(&key).await.unwrap().unwrap().data(),
            &Bytes::from(DATA)
        );
        let next = record(key, r#"{"d":{"count":2}}"#, 2, in_ms(120_000));
        assert_eq!(store.save(&next, 1).await.unwrap(), SaveOutcome::Saved);
        let back = store.load(&key).await.unwrap().unwrap();
        assert_eq!(back.version(), 2);
        assert_eq!(back.data(), next.data());
        assert_eq!(expiry_ms(&back), expiry_ms(&next));
        // The old version no longer matches.
        assert_eq!(store.save(&next, 1).await.unwrap(), SaveOutcome::Conflict);
    }

    /// `save` never re-creates a missing or deleted record.
    async fn save_never_recreates(store) {
        let key = new_key();
        let rec = record(key, DATA, 2, in_ms(60_000));
        assert_eq!(store.save(&rec, 1).await.unwrap(), SaveOutcome::Missing);
        assert!(store.load(&key).await.unwrap().is_none());
        store
            .create(&record(key, DATA, 1, in_ms(60_000)))
            .await
            .unwrap();
        store.delete(&key).await.unwrap();
        assert_eq!(store.save(&rec, 1).await.unwrap(), SaveOutcome::Missing);
        assert!(
            store.load(&key).await.unwrap().is_none(),
            "save brought a deleted record back"
        );
    }

    /// `touch` moves the expiry only at the expected version, keeps data and version, and revives nothing.
    async fn touch_is_conditional(store) {
        let key = created(&store, 300).await;
        let later = in_ms(60_000);
        // At another version: nothing moves.
        assert_eq!(
            store.touch(&key, 2, later).await.unwrap(),
            SaveOutcome::Conflict
        );
        let kept = store.load(&key).await.unwrap().unwrap();
        assert!(expiry_ms(&kept) < unix_ms(later));
        assert_eq!(
            store.touch(&key, 1, later).await.unwrap(),
            SaveOutcome::Saved
        );
        tokio::time::sleep(Duration::from_millis(450)).await;
        let back = store
            .load(&key)
            .await
            .unwrap()
            .expect("touch extended the record");
        assert_eq!(back.version(), 1, "touch must not change the version");
        assert_eq!(back.data(), &Bytes::from(DATA));
        assert_eq!(expiry_ms(&back), unix_ms(later));
        assert_eq!(
            store.touch(&new_key(), 1, later).await.unwrap(),
            SaveOutcome::Missing
        );
        // A save moves the version: a touch at the old one is refused and keeps the save's expiry.
        let saved_expiry = in_ms(30_000);
        let next = record(key, DATA, 2, saved_expiry);
        assert_eq!(store.save(&next, 1).await.unwrap(), SaveOutcome::Saved);
        assert_eq!(
            store.touch(&key, 1, in_ms(90_000)).await.unwrap(),
            SaveOutcome::Conflict
        );
        let kept = store.load(&key).await.unwrap().unwrap();
        assert_eq!(expiry_ms(&kept), unix_ms(saved_expiry));
        // An expired record is not revived.
        let short = created(&store, 100).await;
        tokio::time::sleep(Duration::from_millis(250)).await;
        assert_eq!(
            store.touch(&short, 1, in_ms(60_000)).await.unwrap(),
            SaveOutcome::Missing
        );
        assert!(store.load(&short).await.unwrap().is_none());
    }

    /// `remove` deletes only at the expected version, creates nothing and touches no other record.
    async fn remove_is_conditional(store) {
        let key = created(&store, 60_000).await;
        let next = record(key, r#"{"d":{"count":2}}"#, 2, in_ms(60_000));
        assert_eq!(store.save(&next, 1).await.unwrap(), SaveOutcome::Saved);
        // A removal at the version it saw never removes a newer one.
        assert_eq!(store.remove(&key, 1).await.unwrap(), SaveOutcome::Conflict);
        assert_eq!(store.load(&key).await.unwrap().unwrap().version(), 2);
        assert_eq!(store.remove(&key, 2).await.unwrap(), SaveOutcome::Saved);
        assert!(store.load(&key).await.unwrap().is_none());
        assert_eq!(store.remove(&key, 2).await.unwrap(), SaveOutcome::Missing);
        assert_eq!(
            store.remove(&new_key(), 1).await.unwrap(),
            SaveOutcome::Missing
        );
        // Nor does it create anything, or touch another record.
        let other = created(&store, 60_000).await;
        assert_eq!(store.remove(&key, 1).await.unwrap(), SaveOutcome::Missing);
        assert!(store.load(&other).await.unwrap().is_some());
        // An expired record is Missing, whatever its version.
        let short = created(&store, 100).await;
        tokio::time::sleep(Duration::from_millis(250)).await;
        assert_eq!(store.remove(&short, 1).await.unwrap(), SaveOutcome::Missing);
    }

    /// Of 32 concurrent saves at the same version, exactly one wins.
    async fn concurrent_compare_and_set(store) {
        let key = created(&store, 60_000).await;
        let mut tasks = Vec::new();
        for i in 0..32 {
            let store = store.clone();
            tasks.push(tokio::spawn(async move {
                let rec = record(key, &format!(r#"{{"d":{{"w":{i}}}}}"#), 2, in_ms(60_000));
                store.save(&rec, 1).await.unwrap()
            }));
    }
    let mut saved = 0;
    for t in tasks {
        if t.await.unwrap() == SaveOutcome::Saved {
            saved += 1;
        }
    }
    assert_eq!(saved, 1, "exactly one compare-and-set may win");
    assert_eq!(store.load(&key).await.unwrap().unwrap().version(), 2);
    }

    /// A 1 MiB record of awkward text (quotes, newlines, NUL, non-ASCII) round-trips byte for byte.
    async fn large_and_awkward_records(store) {
        let awkward = serde_json::json!({"d": {
            "path": "/a/b?c=d&e=%2F#frag",
            "quotes": "\"'`",
            "lines": "a\nb\r\nc\t",
            "unicode": "zürich 東京 🦀 \u{0}",
            "big": "x".repeat(1 << 20),
        }})
        .to_string();
        let key = new_key();
        let rec = record(key, &awkward, 1, in_ms(60_000));
        store.create(&rec).await.unwrap();
        let back = store.load(&key).await.unwrap().unwrap();
        assert!(
            back.data() == rec.data(),
            "record did not round-trip byte for byte"
        );
    }

    /// Owners are kept by create, save and touch, and `owned` lists exactly an owner's live records.
    async fn owners_are_kept_and_listed(store) {
        let (me, other) = (new_owner(), new_owner());
        let mine: Vec<Key> = (0..4).map(|_| new_key()).collect();
        for &key in &mine {
            let rec = owned_record(key, &me, 1, in_ms(60_000));
            assert_eq!(store.create(&rec).await.unwrap(), CreateOutcome::Created);
        }
        let theirs = new_key();
        store.create(&owned_record(theirs, &other, 1, in_ms(60_000))).await.unwrap();
        let nobody = created(&store, 60_000).await;
        assert_eq!(store.load(&nobody).await.unwrap().unwrap().owner(), None);
        assert_eq!(store.load(&mine[0]).await.unwrap().unwrap().owner(), Some(&*me));
        assert_eq!(listed(&store, &me).await, mine.iter().copied().collect());
        assert_eq!(listed(&store, &other).await, BTreeSet::from([theirs]));
        assert!(listed(&store, &new_owner()).await.is_empty());

        // A touch keeps the owner.
        let touched = store.touch(&mine[0], 1, in_ms(120_000)).await.unwrap();
        assert_eq!(touched, SaveOutcome::Saved);
        assert_eq!(store.load(&mine[0]).await.unwrap().unwrap().owner(), Some(&*me));
        // A save under another owner moves the record to that owner's list; one without an
        // owner takes it out of every list.
        let moved = owned_record(mine[1], &other, 2, in_ms(60_000));
        assert_eq!(store.save(&moved, 1).await.unwrap(), SaveOutcome::Saved);
        let dropped = record(mine[2], DATA, 2, in_ms(60_000));
        assert_eq!(store.save(&dropped, 1).await.unwrap(), SaveOutcome::Saved);
        assert_eq!(listed(&store, &me).await, BTreeSet::from([mine[0], mine[3]]));
        assert_eq!(listed(&store, &other).await, BTreeSet::from([theirs, mine[1]]));
        // Given the owner back, it is listed again.
        let back = owned_record(mine[2], &me, 3, in_ms(60_000));
        assert_eq!(store.save(&back, 2).await.unwrap(), SaveOutcome::Saved);
        assert!(listed(&store, &me).await.contains(&mine[2]));

        // Removed and deleted records are not listed.
        assert_eq!(store.remove(&mine[0], 1).await.unwrap(), SaveOutcome::Saved);
        store.delete(&mine[2]).await.unwrap();
        assert_eq!(listed(&store, &me).await, BTreeSet::from([mine[3]]));

        // Nor are expired ones.
        let brief = new_key();
        store.create(&owned_record(brief, &me, 1, in_ms(300))).await.unwrap();
        assert!(listed(&store, &me).await.contains(&brief));
        tokio::time::sleep(Duration::from_millis(400)).await;
        assert_eq!(listed(&store, &me).await, BTreeSet::from([mine[3]]));
    }

    /// One owner's 150 records among 300 are listed exactly, while saves to them run.
    async fn owned_lists_many(store) {
        let (me, other) = (new_owner(), new_owner());
        let mut mine = BTreeSet::new();
        for i in 0..300 {
            let key = new_key();
            let rec = match i % 4 {
                0 | 1 => {
                    mine.insert(key);
                    owned_record(key, &me, 1, in_ms(60_000))
                }
                2 => owned_record(key, &other, 1, in_ms(60_000)),
                _ => record(key, DATA, 1, in_ms(60_000)),
            };
            store.create(&rec).await.unwrap();
        }
        let writer = {
            let (store, me) = (store.clone(), me.clone());
            let keys: Vec<Key> = mine.iter().copied().collect();
            tokio::spawn(async move {
                for (i, key) in keys.into_iter().enumerate() {
                    let rec = owned_record(key, &me, 2, in_ms(60_000 + i as u64));
                    assert_eq!(store.save(&rec, 1).await.unwrap(), SaveOutcome::Saved);
                }
            })
        };
        for _ in 0..3 {
            assert_eq!(listed_while(&store, &me, true).await, mine);
        }
        writer.await.unwrap();
        assert_eq!(listed(&store, &me).await, mine);
        assert_eq!(store.owned(&other).await.unwrap().len(), 75);
    }
}

#[cfg(all(test, feature = "memory"))]
mod tests {
    use std::time::SystemTime;

    use super::*;
    use hyper_sessions::MemoryStore;
    use hyper_sessions::store::StoreError;

    /// A store that saves whatever version it is told was expected: no compare-and-set.
    #[derive(Clone, Default)]
    struct Careless(MemoryStore);

    impl SessionStore for Careless {
        async fn load(&self, key: &Key) -> Result<Option<Record>, StoreError> {
            self.0.load(key).await
        }
        async fn create(&self, record: &Record) -> Result<CreateOutcome, StoreError> {
            self.0.create(record).await
        }
        async fn save(&self, record: &Record, _expected: u64) -> Result<SaveOutcome, StoreError> {
            match self.0.load(&record.key()).await? {
                Some(stored) => self.0.save(record, stored.version()).await,
                None => Ok(SaveOutcome::Missing),
            }
        }
        async fn touch(
            &self,
            key: &Key,
            expected: u64,
            expires_at: SystemTime,
        ) -> Result<SaveOutcome, StoreError> {
            self.0.touch(key, expected, expires_at).await
        }
        async fn remove(&self, key: &Key, expected: u64) -> Result<SaveOutcome, StoreError> {
            self.0.remove(key, expected).await
        }
        async fn delete(&self, key: &Key) -> Result<(), StoreError> {
            self.0.delete(key).await
        }
        async fn owned(&self, owner: &str) -> Result<Vec<Record>, StoreError> {
            self.0.owned(owner).await
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    #[should_panic(expected = "the store failed the check `compare_and_set`")]
    async fn a_store_without_compare_and_set_fails() {
        check_store(Careless::default()).await;
    }

    #[test]
    fn every_check_is_listed_once() {
        let mut names = CHECKS.to_vec();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), CHECKS.len());
        assert!(CHECKS.len() >= 12, "checks went missing");
    }
}
