//! The memory store's resident bytes per session beyond its JSON payload:
//! `cargo bench --bench footprint` (Linux: reads /proc/self/statm).
//!
//! Creates 1,000,000 sessions with a small payload through the store, then divides the growth
//! of the resident set by the count and subtracts the payload's length, and prints it beside
//! what the store counts for each session against its byte bound
//! (`MemoryStore::SESSION_OVERHEAD`), which it should not fall far short of.

use std::time::{Duration, SystemTime};

use bytes::Bytes;
use hyper_sessions::store::{Key, Record, SessionStore};
use hyper_sessions::{Id, MemoryStore};

fn resident_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").expect("Linux /proc");
    let pages: u64 = statm.split_whitespace().nth(1).unwrap().parse().unwrap();
    pages * 4096
}

#[allow(clippy::cast_precision_loss)] // counts far below 2^52
fn main() {
    const N: usize = 1_000_000;
    let payload = r#"{"d":{"count":0,"user":"ada"}}"#;
    let expires = SystemTime::now() + Duration::from_secs(3600);
    let ids: Vec<Key> = (0..N).map(|_| Key::of(Id::random())).collect();
    // Bounds well above the sessions made: nothing is evicted.
    let store = MemoryStore::builder()
        .max_sessions(2 * N)
        .max_bytes(2 * N * (MemoryStore::SESSION_OVERHEAD + payload.len()))
        .build();
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let before = resident_bytes();
    rt.block_on(async {
        for id in &ids {
            // Each session owns its bytes, as a loaded-and-saved session does.
            let data = Bytes::copy_from_slice(payload.as_bytes());
            store
                .create(&Record::new(*id, data, 1, expires))
                .await
                .unwrap();
        }
        // A load shares the stored bytes instead of copying them.
        for id in ids.iter().step_by(2) {
            store.load(id).await.unwrap().unwrap();
        }
    });
    let after = resident_bytes();
    let per_session = (after - before) as f64 / N as f64;
    println!(
        "memory store: {N} sessions, {:.1} resident bytes each, {:.1} beyond the {}-byte JSON",
        per_session,
        per_session - payload.len() as f64,
        payload.len()
    );
    println!(
        "counted against max_bytes: {} bytes each ({} beyond the JSON)",
        store.bytes() / N,
        MemoryStore::SESSION_OVERHEAD
    );
    assert_eq!(store.len(), N);
    assert_eq!(store.evictions(), 0);
}
