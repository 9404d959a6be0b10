//! The codec in both roles and several limit sets, fed whole and in chunks, with its
//! obligations (pong, close echo, failing close) checked.
//! The checks live in `tests/entry/mod.rs`, shared with the stable proptest driver.
#![no_main]

use libfuzzer_sys::fuzz_target;

// Each target uses one entry function of the shared module.
#[allow(dead_code)]
#[path = "../../tests/entry/mod.rs"]
mod entry;

fuzz_target!(|data: &[u8]| entry::codec(data));
