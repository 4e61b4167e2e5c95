//! Stored record bytes through the payload decoder: decode → encode → decode.
//! The invariants live in `hyper_sessions::__fuzz::record_decode`, shared with `tests/fuzz_seeds.rs`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| hyper_sessions::__fuzz::record_decode(data));
