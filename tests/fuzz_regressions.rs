//! The fuzz targets' harnesses (`vmm::testing::fuzz`), run on stable in the
//! normal suite: over every input a fuzzer once crashed on
//! (`fuzz/regressions/TARGET/`), and over a few thousand pseudo-random
//! inputs each, so the harnesses cannot rot between fuzzing runs.

use std::path::Path;

use vmm::testing::fuzz as h;

/// A fuzz target: its name in `fuzz/` and the harness it calls.
type Target = (&'static str, fn(&[u8]));

const TARGETS: &[Target] = &[
    ("virtio_queue", h::virtio_queue),
    ("pci_config", h::pci_accesses),
    ("insn", h::instruction),
    ("http_api", h::http_request),
    ("vm_config_json", h::vm_config_json),
    ("kernel_image", h::kernel_image),
    ("introspection", h::introspection_line),
];

/// xorshift64*: deterministic inputs without a dependency.
fn inputs(seed: u64, count: usize, max_len: usize) -> impl Iterator<Item = Vec<u8>> {
    let mut state = seed | 1;
    let mut next = move || {
        state ^= state >> 12;
        state ^= state << 25;
        state ^= state >> 27;
        state.wrapping_mul(0x2545_f491_4f6c_dd1d)
    };
    (0..count).map(move |_| {
        let len = (next() as usize) % max_len;
        (0..len).map(|_| next() as u8).collect()
    })
}

#[test]
fn every_recorded_crash_input_runs_clean() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/regressions");
    let mut ran = 0;
    for (name, target) in TARGETS {
        let Ok(entries) = std::fs::read_dir(root.join(name)) else { continue };
        for entry in entries.flatten() {
            let data = std::fs::read(entry.path()).expect("regression input");
            target(&data);
            ran += 1;
        }
    }
    eprintln!("{ran} recorded inputs");
}

#[test]
fn every_harness_survives_random_inputs() {
    for (i, (name, target)) in TARGETS.iter().enumerate() {
        let count = if *name == "kernel_image" { 200 } else { 2000 };
        for data in inputs(0x9e37_79b9 + i as u64, count, 600) {
            target(&data);
        }
    }
}

#[test]
fn a_device_never_writes_the_protected_page_through_a_crafted_chain() {
    // rng (byte 0 = 0), queue 0, one entry offered; descriptor 0 points its
    // writable buffer at the protected page, 64 bytes.
    let mut input = vec![0u8, 0, 1, 0];
    let mut memory = vec![0u8; 0x1010];
    memory[0..8].copy_from_slice(&h::PROTECTED_PAGE.to_le_bytes());
    memory[8..12].copy_from_slice(&64u32.to_le_bytes());
    memory[12..14].copy_from_slice(&2u16.to_le_bytes()); // VIRTQ_DESC_F_WRITE
    input.extend_from_slice(&memory);
    // The harness panics if the page changed.
    h::virtio_queue(&input);
}

/// Issue 20: an rng chain whose second buffer heki refuses reports the
/// bytes of the first buffer, which it did fill (it used to report 0).
#[test]
fn an_rng_chain_partly_refused_reports_the_bytes_it_filled() {
    let mut input = vec![0u8, 0, 1, 0];
    let mut memory = vec![0u8; 0x1010];
    let buffer = 0x3000u64;
    // Descriptor 0: 32 writable bytes at 0x3000, then descriptor 1.
    memory[0..8].copy_from_slice(&buffer.to_le_bytes());
    memory[8..12].copy_from_slice(&32u32.to_le_bytes());
    memory[12..14].copy_from_slice(&3u16.to_le_bytes()); // NEXT | WRITE
    memory[14..16].copy_from_slice(&1u16.to_le_bytes());
    // Descriptor 1: 64 writable bytes in the protected page.
    memory[16..24].copy_from_slice(&h::PROTECTED_PAGE.to_le_bytes());
    memory[24..28].copy_from_slice(&64u32.to_le_bytes());
    memory[28..30].copy_from_slice(&2u16.to_le_bytes()); // WRITE
    input.extend_from_slice(&memory);
    let used = h::virtio_queue_used(&input);
    assert_eq!(used, [(0, 32)], "the first buffer was filled and is reported; the refused one is not");
}
