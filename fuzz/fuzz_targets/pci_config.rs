//! See `vmm::testing::fuzz::pci_accesses` for how the input is read.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| vmm::testing::fuzz::pci_accesses(data));
