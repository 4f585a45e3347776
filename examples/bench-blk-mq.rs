//! Multi-queue virtio-block: the same number of 4 KiB reads from an in-memory
//! image through one queue, then split over two queues, each with its own
//! device worker (the real `spawn_workers` threads, woken through the
//! queues' notify eventfds as KVM's ioeventfds would) and its own driver
//! thread posting batches and waiting for their completions. Every access
//! goes through heki-checked memory, with 1,000 protected ranges. Prints
//! requests per second for each and the ratio.
//! Usage: cargo run --release -p vmm --example bench-blk-mq [-- REQUESTS]

use std::sync::Arc;
use std::time::{Duration, Instant};

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm::devices::MmioDevice;
use vmm::devices::gate::DeviceGate;
use vmm::devices::virtio::block::Block;
use vmm::devices::virtio::pci::VirtioPci;
use vmm::devices::virtio::{DeviceCounters, DeviceMemory};
use vmm::guest_access::{Accessor, CheckedMemory};
use vmm::heki::{Enforcer, HekiRuntime, HekiSettings};
use vmm::testing::{RecordingControl, RecordingSlots};
use vmm_sys_util::eventfd::EventFd;

const QSIZE: u16 = 256;
/// Chains in flight per queue: three descriptors each.
const BATCH: u16 = 64;
/// Each queue's rings, headers, status bytes and buffers in a region of their own.
const REGION: u64 = 0x40_0000;
/// Above the protected ranges (pages 0x1000..0x1fa2, 16 to 32 MiB).
const BASE: u64 = 0x300_0000;

struct Layout {
    desc: u64,
    avail: u64,
    used: u64,
    header: u64,
    status: u64,
    data: u64,
}

fn layout(queue: u64) -> Layout {
    let base = BASE + queue * REGION;
    Layout {
        desc: base,
        avail: base + 0x1000,
        used: base + 0x2000,
        header: base + 0x3000,
        status: base + 0x4000,
        data: base + 0x10_0000,
    }
}

fn write<T: vm_memory::ByteValued>(mem: &GuestMemoryMmap, addr: u64, v: T) {
    mem.write_obj(v, GuestAddress(addr)).expect("guest memory");
}

/// A driver thread: `requests` reads on `queue`, BATCH at a time.
fn drive(mem: GuestMemoryMmap, queue: u64, notify: EventFd, requests: u64) {
    let l = layout(queue);
    for i in 0..u64::from(BATCH) {
        let d = l.desc + i * 3 * 16;
        let head = (i * 3) as u16;
        write(&mem, l.header + i * 16, 0u32); // VIRTIO_BLK_T_IN
        write(&mem, l.header + i * 16 + 8, (i % 1000) * 8);
        let chain = [
            (l.header + i * 16, 16u32, 1u16, head + 1),
            (l.data + i * 4096, 4096, 3, head + 2),
            (l.status + i, 1, 2, 0),
        ];
        for (k, (addr, len, flags, next)) in chain.into_iter().enumerate() {
            let at = d + k as u64 * 16;
            write(&mem, at, addr);
            write(&mem, at + 8, len);
            write(&mem, at + 12, flags);
            write(&mem, at + 14, next);
        }
    }
    let mut avail_idx: u16 = 0;
    let mut done = 0;
    while done < requests {
        for i in 0..BATCH {
            let slot = u64::from(avail_idx.wrapping_add(i) % QSIZE);
            write(&mem, l.avail + 4 + slot * 2, i * 3);
        }
        avail_idx = avail_idx.wrapping_add(BATCH);
        write(&mem, l.avail + 2, avail_idx);
        notify.write(1).expect("notify");
        let deadline = Instant::now() + Duration::from_secs(30);
        while mem.read_obj::<u16>(GuestAddress(l.used + 2)).expect("used idx") != avail_idx {
            assert!(Instant::now() < deadline, "queue {queue} stalled");
            // Yield rather than spin: the workers need the cores more.
            std::thread::yield_now();
        }
        done += u64::from(BATCH);
    }
    let status: u8 = mem.read_obj(GuestAddress(l.status)).expect("status");
    assert_eq!(status, 0, "requests succeeded");
}

/// `requests` reads spread evenly over `queues` queues; requests per second.
fn run(requests: u64, queues: u16) -> f64 {
    let regions = vmm::memory::ram_regions(64 << 20);
    let ram = vmm::memory::create_guest_ram(&regions).expect("memory");
    let mem = ram.host.clone();
    let enforcer = Arc::new(Enforcer::new(heki::Policy::Deny, Arc::new(RecordingControl::default())));
    let heki = Arc::new(HekiRuntime::new(
        &HekiSettings::default(),
        enforcer.clone(),
        Arc::new(RecordingSlots::default()),
        &ram,
        &vmm::memory::boot_slot_plan(&regions),
        0,
    ));
    let ranges: Vec<heki::ProtectRange> = (0..1000u64)
        .map(|i| heki::ProtectRange { start: 0x1000 + i * 4, end: 0x1000 + i * 4 + 2, perms: heki::Permissions::READ })
        .collect();
    heki.protect_pages(&ranges, "bench").expect("protect");
    let path = format!("/dev/shm/hekivisor-bench-mq-{}.img", std::process::id());
    let image = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&path)
        .expect("in-memory image");
    image.set_len(64 << 20).expect("size");
    let memory = DeviceMemory::new(
        CheckedMemory::new(mem.clone(), enforcer, Arc::new(Accessor::new("bench"))),
        Arc::new(DeviceCounters::default()),
    );
    let block = Block::new(image, false, "bench".into()).expect("block").with_queues(usize::from(queues), 256);
    let mut dev = VirtioPci::new(Box::new(block), 0xc000_0000, memory, 0x018000, None).expect("transport");
    let w32 = |dev: &mut VirtioPci, off: u64, v: u32| dev.write(off, &v.to_le_bytes());
    // Driver side: features (VERSION_1, and MQ with two queues), the queues, DRIVER_OK.
    dev.write(0x14, &[3]);
    w32(&mut dev, 0x08, 1);
    w32(&mut dev, 0x0c, 1);
    w32(&mut dev, 0x08, 0);
    w32(&mut dev, 0x0c, if queues > 1 { 1 << 12 } else { 0 });
    dev.write(0x14, &[11]);
    for q in 0..queues {
        let l = layout(u64::from(q));
        dev.write(0x16, &q.to_le_bytes());
        dev.write(0x18, &QSIZE.to_le_bytes());
        for (off, addr) in [(0x20, l.desc), (0x28, l.avail), (0x30, l.used)] {
            w32(&mut dev, off, addr as u32);
            w32(&mut dev, off + 4, 0);
        }
        dev.write(0x1c, &1u16.to_le_bytes());
    }
    dev.write(0x14, &[15]);
    let notifiers: Vec<EventFd> = dev.notifiers().map(|(_, fd)| fd.try_clone().expect("notify fd")).collect();
    let (stop, gate) = (EventFd::new(libc::EFD_NONBLOCK).expect("eventfd"), Arc::new(DeviceGate::default()));
    let workers = dev.spawn_workers("bench", &stop, &gate).expect("workers");
    let per_queue = requests / u64::from(queues);
    let start = Instant::now();
    let drivers: Vec<_> = notifiers
        .into_iter()
        .enumerate()
        .map(|(q, notify)| {
            let mem = mem.clone();
            std::thread::spawn(move || drive(mem, q as u64, notify, per_queue))
        })
        .collect();
    drivers.into_iter().for_each(|d| d.join().expect("driver"));
    let elapsed = start.elapsed().as_secs_f64();
    stop.write(1).expect("stop");
    workers.into_iter().for_each(|w| w.join().expect("worker"));
    let _ = std::fs::remove_file(&path);
    (per_queue * u64::from(queues)) as f64 / elapsed
}

fn main() {
    let requests: u64 = std::env::args().nth(1).and_then(|n| n.parse().ok()).unwrap_or(200_000);
    // Interleave to share machine noise; report the median of five each.
    let (mut one, mut two) = (Vec::new(), Vec::new());
    for _ in 0..5 {
        one.push(run(requests, 1));
        two.push(run(requests, 2));
    }
    let median = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let (one, two) = (median(one), median(two));
    println!("requests per run:   {requests} x 4 KiB reads, {BATCH} in flight per queue");
    println!("one queue:          {one:.0} requests/s");
    println!("two queues:         {two:.0} requests/s");
    println!("two / one:          {:.2}", two / one);
}
