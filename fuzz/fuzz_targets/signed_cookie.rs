//! Cookie header values (split on `\\n`) through the cookie lookup of a layer with signing keys.
//! The invariants live in `hyper_sessions::__fuzz::signed_cookie`, shared with `tests/fuzz_seeds.rs`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| hyper_sessions::__fuzz::signed_cookie(data));
