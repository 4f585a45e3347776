//! Virtqueue descriptor chains through rng, block, net and console over
//! heki-checked memory; see `vmm::testing::fuzz::virtio_queue` for the input.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| vmm::testing::fuzz::virtio_queue(data));
