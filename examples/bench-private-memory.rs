//! Cost of the private-memory calls: PRIVATE_MEMORY over 256 MiB, and
//! SET_SHARED / make-private of 1 page and of 1,000 contiguous pages (one
//! mprotect per contiguous run, under heki's write lock), without a VM.
//! Usage: cargo run --release --example bench-private-memory

use std::sync::Arc;
use std::time::{Duration, Instant};

use vmm::heki::HekiSettings;
use vmm::heki::{Enforcer, HekiRuntime};
use vmm::testing::{RecordingControl, RecordingSlots};

const ROUNDS: u32 = 1000;

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn main() {
    let regions = vmm::memory::ram_regions(256 << 20);
    let ram = vmm::memory::create_guest_ram(&regions).expect("memory");
    let slots = vmm::memory::boot_slot_plan(&regions);
    let enforcer = Arc::new(Enforcer::new(heki::Policy::Deny, Arc::new(RecordingControl::default())));
    let config = HekiSettings::default();
    let rt = HekiRuntime::new(&config, enforcer, Arc::new(RecordingSlots::default()), &ram, &slots, 0);
    // Fault the pages in through the host view, so mprotect has page tables to change.
    for page in (0..(201u64 << 20)).step_by(4096) {
        vm_memory::Bytes::write_obj(&ram.host, 1u8, vm_memory::GuestAddress(page)).expect("RAM");
    }
    let start = Instant::now();
    rt.enable_private_memory().expect("private");
    println!("PRIVATE_MEMORY, 256 MiB:           {:?}", start.elapsed());
    for pages in [1u64, 1000] {
        let (mut share, mut unshare) = (Vec::new(), Vec::new());
        for round in 0..u64::from(ROUNDS) {
            // Walk through RAM so every round touches fresh pages.
            let gpa = 0x10_0000 + (round * pages * 4096) % (200 << 20);
            let t = Instant::now();
            rt.set_shared(gpa, pages * 4096, 1).expect("share");
            share.push(t.elapsed());
            let t = Instant::now();
            rt.set_shared(gpa, pages * 4096, 0).expect("make private");
            unshare.push(t.elapsed());
        }
        println!(
            "SET_SHARED {pages:>4} page(s), median of {ROUNDS}: share {:?}, make private {:?}",
            median(share),
            median(unshare)
        );
    }
}
