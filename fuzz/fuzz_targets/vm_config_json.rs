//! Fuzzes `vm.create` body parsing: network bytes are the input.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = vmm::config::vm_config_from_json(data);
});
