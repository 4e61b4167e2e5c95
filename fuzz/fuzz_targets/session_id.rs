//! Session id text through the strict parser: parse → display → parse.
//! The invariants live in `hyper_sessions::__fuzz::session_id`, shared with `tests/fuzz_seeds.rs`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| hyper_sessions::__fuzz::session_id(data));
