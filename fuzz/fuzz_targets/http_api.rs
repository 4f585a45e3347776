//! See `vmm::testing::fuzz::http_request` for how the input is read.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| vmm::testing::fuzz::http_request(data));
