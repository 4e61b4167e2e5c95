//! The memory store: the conformance suite, plus what is particular to it.

mod common;

use hyper_sessions::MemoryStore;

#[allow(clippy::unused_async)] // the suite awaits every fixture
async fn fixture() -> (MemoryStore, ()) {
    (MemoryStore::default(), ())
}

conformance_suite!(fixture);
