//! A Webdis HTTP reply (status, command, body) through the store's strict reply parser.
//! The invariants live in `hyper_sessions::__fuzz::webdis_reply`, shared with `tests/fuzz_seeds.rs`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| hyper_sessions::__fuzz::webdis_reply(data));
