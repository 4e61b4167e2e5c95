//! Cookie header values (split on `\\n`) through the middleware's cookie lookup.
//! The invariants live in `hyper_sessions::__fuzz::cookie_header`, shared with `tests/fuzz_seeds.rs`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| hyper_sessions::__fuzz::cookie_header(data));
