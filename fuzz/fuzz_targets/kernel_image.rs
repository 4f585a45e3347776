//! See `vmm::testing::fuzz::kernel_image` for how the input is read.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| vmm::testing::fuzz::kernel_image(data));
