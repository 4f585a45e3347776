//! Device-level benchmark: 1,000,000 4 KiB virtio-block reads pushed through
//! the queue path (available ring → device → heki-checked memory → used ring)
//! against an in-memory image, with 1,000 protected ranges and with none, in
//! one run. Every access goes through `CheckedMemory` either way (devices
//! have no other path); "off" is heki with nothing protected. Prints requests
//! per second and the guard's overhead.
//! Usage: cargo run --release --example bench-virtio-block [-- REQUESTS]

use std::sync::Arc;
use std::time::Instant;

use vm_memory::{Bytes, GuestAddress};
use vmm::devices::MmioDevice;
use vmm::devices::gate::DeviceGate;
use vmm::devices::virtio::block::Block;
use vmm::devices::virtio::pci::VirtioPci;
use vmm::devices::virtio::{DeviceCounters, DeviceMemory};
use vmm::guest_access::{Accessor, CheckedMemory};
use vmm::heki::HekiSettings;
use vmm::heki::{Enforcer, HekiRuntime};
use vmm::testing::{RecordingControl, RecordingSlots};

const QUEUE: u64 = 0x10_0000; // descriptor table; rings follow
const AVAIL: u64 = QUEUE + 0x1000;
const USED: u64 = QUEUE + 0x2000;
const HEADER: u64 = 0x20_0000;
const STATUS: u64 = 0x20_1000;
const DATA: u64 = 0x30_0000;
const QSIZE: u16 = 256;

fn write<T: vm_memory::ByteValued>(mem: &vm_memory::GuestMemoryMmap, addr: u64, v: T) {
    mem.write_obj(v, GuestAddress(addr)).expect("guest memory");
}

/// What heki does while the benchmark runs.
#[derive(Clone, Copy, PartialEq)]
enum Guard {
    /// Nothing protected.
    Off,
    /// 1,000 protected ranges.
    On,
    /// As `On`, and the guest's memory private except the rings and buffers
    /// (device reads are judged too).
    Private,
}

fn run(requests: u64, guard: Guard) -> f64 {
    let regions = vmm::memory::ram_regions(256 << 20);
    let ram = vmm::memory::create_guest_ram(&regions).expect("memory");
    let mem = ram.host.clone();
    let slots = vmm::memory::boot_slot_plan(&regions);
    let enforcer = Arc::new(Enforcer::new(heki::Policy::Deny, Arc::new(RecordingControl::default())));
    let _heki = (guard != Guard::Off).then(|| {
        let rt = Arc::new(HekiRuntime::new(
            &HekiSettings::default(),
            enforcer.clone(),
            Arc::new(RecordingSlots::default()),
            &ram,
            &slots,
            0,
        ));
        // 1,000 protected ranges away from the buffers the benchmark uses.
        let ranges: Vec<heki::ProtectRange> = (0..1000u64)
            .map(|i| heki::ProtectRange {
                start: 0x1000 + i * 4,
                end: 0x1000 + i * 4 + 2,
                perms: heki::Permissions::READ,
            })
            .collect();
        rt.protect_pages(&ranges, "bench").expect("protect");
        if guard == Guard::Private {
            rt.enable_private_memory().expect("private memory");
            // Rings, headers, status bytes and data buffers: 0x100000..0x400000.
            rt.set_shared(QUEUE, 0x30_0000, 1).expect("share the device's memory");
        }
        rt
    });
    let image = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(format!("/dev/shm/hekivisor-bench-{}.img", std::process::id()))
        .expect("in-memory image");
    image.set_len(64 << 20).expect("size");
    let counters = Arc::new(DeviceCounters::default());
    let accessor = Arc::new(Accessor::new("bench"));
    let memory = DeviceMemory::new(CheckedMemory::new(mem.clone(), enforcer, accessor), counters);
    let block = Block::new(image, false, "bench".into()).expect("block");
    let mut dev = VirtioPci::new(Box::new(block), 0xc000_0000, memory, 0x018000, None).expect("transport");
    let gate = DeviceGate::default();
    let w32 = |dev: &mut VirtioPci, off: u64, v: u32| dev.write(off, &v.to_le_bytes());
    // Driver side: reset, features, one queue, DRIVER_OK.
    dev.write(0x14, &[0]);
    dev.write(0x14, &[3]);
    w32(&mut dev, 0x08, 1);
    w32(&mut dev, 0x0c, 1);
    dev.write(0x14, &[11]);
    dev.write(0x18, &QSIZE.to_le_bytes());
    for (off, addr) in [(0x20, QUEUE), (0x28, AVAIL), (0x30, USED)] {
        w32(&mut dev, off, addr as u32);
        w32(&mut dev, off + 4, 0);
    }
    dev.write(0x1c, &1u16.to_le_bytes());
    dev.write(0x14, &[15]);
    // Every chain: header (read IN, sector s) → 4 KiB data (device writes) → status.
    for i in 0..u64::from(QSIZE) / 4 {
        let d = QUEUE + i * 3 * 16;
        write(&mem, HEADER + i * 16, 0u32);
        write(&mem, HEADER + i * 16 + 8, (i % 1000) * 8);
        let head = (i * 3) as u16;
        for (k, (addr, len, flags, next)) in
            [(HEADER + i * 16, 16u32, 1u16, head + 1), (DATA + i * 4096, 4096, 3, head + 2), (STATUS + i, 1, 2, 0)]
                .into_iter()
                .enumerate()
        {
            write(&mem, d + k as u64 * 16, addr);
            write(&mem, d + k as u64 * 16 + 8, len);
            write(&mem, d + k as u64 * 16 + 12, flags);
            write(&mem, d + k as u64 * 16 + 14, next);
        }
    }
    let batch = u64::from(QSIZE) / 4;
    let mut avail_idx: u16 = 0;
    let start = Instant::now();
    let mut done = 0;
    while done < requests {
        for i in 0..batch {
            write(&mem, AVAIL + 4 + u64::from(avail_idx.wrapping_add(i as u16) % QSIZE) * 2, (i * 3) as u16);
        }
        avail_idx = avail_idx.wrapping_add(batch as u16);
        write(&mem, AVAIL + 2, avail_idx);
        dev.process_queue(0, &gate);
        done += batch;
    }
    let elapsed = start.elapsed().as_secs_f64();
    let used_idx: u16 = mem.read_obj(GuestAddress(USED + 2)).expect("used idx");
    assert_eq!(used_idx, avail_idx, "every request completed");
    let status: u8 = mem.read_obj(GuestAddress(STATUS)).expect("status");
    assert_eq!(status, 0, "requests succeeded");
    let _ = std::fs::remove_file(format!("/dev/shm/hekivisor-bench-{}.img", std::process::id()));
    done as f64 / elapsed
}

fn main() {
    let requests: u64 = std::env::args().nth(1).and_then(|n| n.parse().ok()).unwrap_or(1_000_000);
    // `on` / `off` run one configuration once (for instruction counting under callgrind).
    match std::env::args().nth(2).as_deref() {
        Some("on") => return println!("guard on: {:.0} requests/s", run(requests, Guard::On)),
        Some("off") => return println!("guard off: {:.0} requests/s", run(requests, Guard::Off)),
        Some("private") => return println!("private memory: {:.0} requests/s", run(requests, Guard::Private)),
        _ => {}
    }
    // Interleave to share machine noise; report the median of nine each.
    let (mut off, mut on, mut private) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..9 {
        off.push(run(requests, Guard::Off));
        on.push(run(requests, Guard::On));
        private.push(run(requests, Guard::Private));
    }
    let median = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let (off, on, private) = (median(off), median(on), median(private));
    println!("requests per run:         {requests} x 4 KiB reads");
    println!("DMA guard off:            {off:.0} requests/s");
    println!("DMA guard on (1,000 ranges): {on:.0} requests/s");
    println!("guard overhead:           {:.2}% (goal <= 3%)", (off / on - 1.0) * 100.0);
    println!("private memory on too:    {private:.0} requests/s");
    println!("private memory overhead:  {:.2}% (goal <= 3%)", (off / private - 1.0) * 100.0);
}
