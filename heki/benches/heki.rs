//! heki hot paths: permission lookup at growing map sizes, and memslot
//! re-layout for 1,000 protected ranges.

use std::hint::black_box;

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use heki::{MemoryProtections, Permissions, ProtectRange, RamLayout, diff_slots};

/// `n` read-only ranges of 2 pages, 4 pages apart.
fn protections(n: u64) -> MemoryProtections {
    let mut p = MemoryProtections::default();
    let ranges: Vec<ProtectRange> =
        (0..n).map(|i| ProtectRange { start: i * 4, end: i * 4 + 2, perms: Permissions::READ }).collect();
    p.protect_pages(&ranges).expect("no immutable pages");
    p
}

fn lookup(c: &mut Criterion) {
    let mut group = c.benchmark_group("permission_lookup");
    for n in [10u64, 1_000, 100_000] {
        let p = protections(n);
        let span = n * 4;
        group.bench_with_input(BenchmarkId::from_parameter(n), &n, |b, _| {
            let mut page = 0u64;
            b.iter(|| {
                page = (page + 7919) % span;
                black_box(p.pages.get(black_box(page)))
            })
        });
    }
    group.finish();
}

fn write_check(c: &mut Criterion) {
    let p = protections(100_000);
    c.bench_function("check_write_8_bytes_100k_ranges", |b| {
        let mut gpa = 0u64;
        b.iter(|| {
            gpa = (gpa + 4096 * 7 + 8) % (400_000 * 4096);
            black_box(p.check_write(black_box(gpa), 8))
        })
    });
}

fn relayout(c: &mut Criterion) {
    let p = protections(1_000);
    let ram = RamLayout { regions: vec![(0, 8 << 30)] };
    c.bench_function("memslot_plan_1000_ranges", |b| b.iter(|| black_box(p.plan(&ram, 32_764).expect("fits"))));
    // What one more PROTECT_MEMORY call costs the planner: plan again and diff.
    let installed = p.plan(&ram, 32_764).expect("fits");
    let mut next = p.clone();
    next.protect_pages(&[ProtectRange { start: 5_000, end: 5_001, perms: Permissions::READ }]).expect("not immutable");
    c.bench_function("memslot_replan_and_diff_1000_ranges", |b| {
        b.iter(|| {
            let wanted = next.plan(&ram, 32_764).expect("fits");
            black_box(diff_slots(&installed, &wanted))
        })
    });
}

/// Guest memory for the translation benchmark: 4 KiB tables in a map.
#[derive(Default)]
struct Tables(std::collections::HashMap<u64, [u64; 512]>);

impl heki::PhysRead for Tables {
    fn read_u64(&self, gpa: u64) -> Option<u64> {
        self.0.get(&(gpa & !0xfff)).map(|t| t[((gpa & 0xfff) >> 3) as usize])
    }
}

/// The steady-state translation check a vCPU runs at each register check:
/// kernel text (8 MiB in 2 MiB pages) and rodata locked, checked from
/// another process's CR3 whose kernel top-level entry is a copy.
fn translation_check(c: &mut Criterion) {
    use heki::translation::{TranslationLocks, expect};
    const TEXT: u64 = 0xffff_ffff_8100_0000;
    let (cr3, pdpt, pd) = (0x10_0000u64, 0x10_1000u64, 0x10_2000u64);
    let mut mem = Tables::default();
    mem.0.insert(cr3, [0; 512]);
    mem.0.insert(pdpt, [0; 512]);
    mem.0.insert(pd, [0; 512]);
    mem.0.get_mut(&cr3).expect("pml4")[511] = pdpt | 3;
    mem.0.get_mut(&pdpt).expect("pdpt")[510] = pd | 3;
    for i in 0..8u64 {
        // 2 MiB read-only pages: 8 of text, then 8 of rodata with NX.
        mem.0.get_mut(&pd).expect("pd")[8 + i as usize] = (0x100_0000 + i * 0x20_0000) | 0x81;
        mem.0.get_mut(&pd).expect("pd")[16 + i as usize] = (0x200_0000 + i * 0x20_0000) | 0x81 | (1 << 63);
    }
    let mode = heki::PagingMode::long_mode(false, true);
    let mut locks = TranslationLocks::default();
    for (va, expectations) in [(TEXT, expect::READ_ONLY), (TEXT + (8 << 21), expect::READ_ONLY | expect::NO_EXEC)] {
        let lock = locks.prepare(&mem, cr3, mode, va, 8 << 21, expectations).expect("mapped");
        locks.commit(lock, mode);
    }
    let process = 0x20_0000u64;
    let mut copy = [0u64; 512];
    copy[511] = (pdpt | 3) | 0x20;
    mem.0.insert(process, copy);
    c.bench_function("translation_check_steady_state", |b| b.iter(|| black_box(locks.check(&mem, black_box(process)))));
    // What a remap costs to find and describe (once per attack).
    let private = 0x30_0000u64;
    mem.0.insert(private, [0; 512]);
    c.bench_function("translation_check_remapped_full_walk", |b| {
        b.iter(|| black_box(locks.check(&mem, black_box(private))))
    });
}

criterion_group!(benches, lookup, write_check, relayout, translation_check);
criterion_main!(benches);
