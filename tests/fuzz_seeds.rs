//! Replays every committed fuzz seed (`fuzz/corpus/<target>/seed-*`) through the same functions
//! the cargo-fuzz targets call, so stable CI checks the targets' invariants without the fuzzer.
//!
//! In the published package these tests pass without checking anything, saying so on stderr:
//! `fuzz/` is a cargo package of its own, and `cargo package` never includes a nested package,
//! so the seeds and the targets are not there. A repository checkout always has them, and
//! there a missing corpus or target still fails.

use std::path::{Path, PathBuf};

use hyper_sessions::__fuzz;

/// A fuzz target's name and the function that checks one input.
type Target = (&'static str, fn(&[u8]));

/// Every fuzz target and the function its `fuzz/fuzz_targets/<name>.rs` calls. A target behind
/// a cargo feature gets `#[cfg(feature = "...")]` on its entry.
const TARGETS: &[Target] = &[
    ("cookie_header", __fuzz::cookie_header),
    ("signed_cookie", __fuzz::signed_cookie),
    ("session_id", __fuzz::session_id),
    ("record_decode", __fuzz::record_decode),
    #[cfg(feature = "webdis")]
    ("webdis_reply", __fuzz::webdis_reply),
    #[cfg(feature = "redis")]
    ("resp_reply", __fuzz::resp_reply),
];

/// Targets that need a cargo feature this build may not have: their files exist whatever the
/// features, so the file/`TARGETS` comparison skips them when they are compiled out.
const FEATURE_TARGETS: &[(&str, bool)] = &[
    ("webdis_reply", cfg!(feature = "webdis")),
    ("resp_reply", cfg!(feature = "redis")),
];

fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz")
}

/// Whether this is the unpacked published package without `fuzz/` (cargo writes
/// `Cargo.toml.orig` into every package it makes, and a checkout has no such file). Prints why
/// the test checks nothing; a checkout without `fuzz/` still fails.
fn packaged_without_fuzz() -> bool {
    let manifest_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    let packaged = manifest_dir.join("Cargo.toml.orig").is_file() && !fuzz_dir().exists();
    if packaged {
        eprintln!(
            "skipped: {} is a published package, which has no fuzz/ (a cargo package of its \
             own, never packaged); the repository's tests replay the seeds",
            manifest_dir.display()
        );
    }
    packaged
}

/// The committed seeds of a target, sorted; panics if there are none, so a moved or emptied
/// corpus cannot make this test pass by testing nothing.
fn seeds(target: &str) -> Vec<PathBuf> {
    let dir = fuzz_dir().join("corpus").join(target);
    let entries = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("corpus dir {} unreadable: {e}", dir.display()));
    let mut seeds: Vec<PathBuf> = entries
        .map(|e| e.expect("corpus dir entry").path())
        .filter(|p| {
            p.is_file()
                && p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with("seed-"))
        })
        .collect();
    seeds.sort();
    assert!(
        !seeds.is_empty(),
        "no seed-* files in {}: every target needs committed seeds",
        dir.display()
    );
    seeds
}

fn replay(target: &str) {
    if packaged_without_fuzz() {
        return;
    }
    let Some(&(_, run)) = TARGETS.iter().find(|(name, _)| *name == target) else {
        panic!("{target} is not in TARGETS");
    };
    let seeds = seeds(target);
    for seed in &seeds {
        let data = std::fs::read(seed).expect("seed readable");
        // Printed only when the test fails: names the seed that broke an invariant.
        eprintln!("replaying {}", seed.display());
        run(&data);
    }
    eprintln!("{target}: {} seeds replayed", seeds.len());
}

#[test]
fn cookie_header_seeds() {
    replay("cookie_header");
}

#[test]
fn signed_cookie_seeds() {
    replay("signed_cookie");
}

#[test]
fn session_id_seeds() {
    replay("session_id");
}

#[test]
fn record_decode_seeds() {
    replay("record_decode");
}

#[cfg(feature = "webdis")]
#[test]
fn webdis_reply_seeds() {
    replay("webdis_reply");
}

#[cfg(feature = "redis")]
#[test]
fn resp_reply_seeds() {
    replay("resp_reply");
}

/// Each target in `fuzz/fuzz_targets/` is replayed here, and each replayed target exists there.
#[test]
fn every_fuzz_target_is_replayed() {
    if packaged_without_fuzz() {
        return;
    }
    let dir = fuzz_dir().join("fuzz_targets");
    let mut on_disk: Vec<String> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{} unreadable: {e}", dir.display()))
        .filter_map(|e| {
            let path = e.expect("fuzz_targets entry").path();
            (path.extension()? == "rs").then(|| path.file_stem()?.to_str().map(str::to_owned))?
        })
        .filter(|name: &String| {
            FEATURE_TARGETS
                .iter()
                .all(|&(target, enabled)| enabled || name != target)
        })
        .collect();
    on_disk.sort();
    let mut listed: Vec<String> = TARGETS.iter().map(|(n, _)| (*n).to_owned()).collect();
    listed.sort();
    assert_eq!(on_disk, listed, "fuzz/fuzz_targets/*.rs vs TARGETS");
    for (name, _) in TARGETS {
        assert!(
            !seeds(name).is_empty(),
            "{name} has no seeds (checked in seeds())"
        );
    }
}
