//! See `vmm::fuzz_harness::introspection_line` for how the input is read.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| vmm::fuzz_harness::introspection_line(data));
