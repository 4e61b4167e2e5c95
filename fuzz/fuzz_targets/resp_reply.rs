//! RESP2 bytes through the Redis store's reply parser (its own connections' reader).
//! The invariants live in `hyper_sessions::__fuzz::resp_reply`, shared with `tests/fuzz_seeds.rs`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| hyper_sessions::__fuzz::resp_reply(data));
