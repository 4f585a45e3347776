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

criterion_group!(benches, lookup, write_check, relayout);
criterion_main!(benches);
