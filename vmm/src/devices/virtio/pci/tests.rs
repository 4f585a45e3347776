//! The transport with a started device: rings handed over, locked after
//! DRIVER_OK, paused, and external (vhost-user) hand-over.
#![allow(clippy::arithmetic_side_effects)]

use std::sync::{Arc, Mutex};

use heki::{Permissions, ProtectRange, ViolationKind};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use vmm_sys_util::eventfd::EventFd;

use super::*;
use crate::devices::virtio::rng::Rng;
use crate::devices::virtio::test_rig::{AVAIL, DESC, USED, started};
use crate::devices::virtio::{QueueHandoff, VIRTIO_F_VERSION_1, status};
use crate::heki::HekiRuntime;

const BUFFER: u64 = 0x2_0000;

/// An rng device started by a minimal driver: one queue of 4 in its own pages.
fn started_rng() -> (GuestMemoryMmap, Arc<HekiRuntime>, VirtioPci) {
    let source = std::fs::File::open("/dev/zero").expect("/dev/zero");
    started(Box::new(Rng::new(source)), "_rng", 0)
}

/// Makes one 16-byte write-only buffer available and lets the worker run.
fn request(mem: &GuestMemoryMmap, dev: &VirtioPci, n: u16) {
    mem.write_obj(BUFFER, GuestAddress(DESC)).expect("desc addr");
    mem.write_obj(16u32, GuestAddress(DESC + 8)).expect("desc len");
    mem.write_obj(2u16, GuestAddress(DESC + 12)).expect("desc flags: write-only");
    mem.write_obj(0u16, GuestAddress(AVAIL + 4 + 2 * u64::from(n % 4))).expect("ring");
    mem.write_obj(n + 1, GuestAddress(AVAIL + 2)).expect("avail idx");
    let gate = DeviceGate::default();
    assert!(dev.process_queue(0, &gate));
}

fn used_page(mem: &GuestMemoryMmap) -> Vec<u8> {
    let mut page = vec![0u8; 4096];
    mem.read_slice(&mut page, GuestAddress(USED)).expect("used ring");
    page
}

/// An `external` device (as vhost-user devices are) that records what the transport hands it.
struct Handed {
    log: Arc<Mutex<Vec<String>>>,
    fail: bool,
}

impl VirtioDevice for Handed {
    fn device_type(&self) -> u16 {
        26
    }
    fn external(&self) -> bool {
        true
    }
    fn activate(&mut self, features: u64, queues: &[QueueHandoff<'_>]) -> Result<(), super::super::ActivateError> {
        for q in queues {
            let (desc, avail, used, call) = (q.desc_table, q.avail_ring, q.used_ring, q.call.is_some());
            let line = format!("{features:#x} q{} n{} {desc:#x} {avail:#x} {used:#x} call={call}", q.index, q.size);
            self.log.lock().expect("log").push(line);
        }
        if self.fail { Err(super::super::ActivateError("backend gone".into())) } else { Ok(()) }
    }
    fn reset(&mut self) {
        self.log.lock().expect("log").push("reset".into());
    }
    fn process(
        &mut self,
        _: usize,
        _: virtio_queue::DescriptorChain<&crate::guest_access::CheckedMemory>,
        _: &DeviceMemory,
    ) -> u32 {
        unreachable!("an external device's queues are served elsewhere")
    }
}

fn started_external(fail: bool) -> (Arc<Mutex<Vec<String>>>, VirtioPci) {
    let log = Arc::new(Mutex::new(Vec::new()));
    let (_mem, _heki, dev) = started(Box::new(Handed { log: log.clone(), fail }), "_fs0", 0);
    (log, dev)
}

#[test]
fn an_external_device_gets_its_rings_at_driver_ok_and_runs_no_worker() {
    let (log, dev) = started_external(false);
    let expected = format!("{VIRTIO_F_VERSION_1:#x} q0 n4 {DESC:#x} {AVAIL:#x} {USED:#x} call=false");
    assert_eq!(*log.lock().expect("log"), [expected]);
    assert_eq!(dev.status() & status::NEEDS_RESET, 0);
    let stop = EventFd::new(libc::EFD_NONBLOCK).expect("eventfd");
    let workers = dev.spawn_workers("_fs0", &stop, &Arc::new(DeviceGate::default())).expect("spawn");
    assert!(workers.is_empty(), "the backend drains the queues, not a worker of ours");
}

#[test]
fn a_failed_hand_over_needs_reset_and_a_driver_reset_takes_the_queues_back() {
    let (log, mut dev) = started_external(true);
    assert_ne!(dev.status() & status::NEEDS_RESET, 0);
    dev.write(0x14, &[0]);
    assert_eq!(dev.status(), 0);
    assert_eq!(log.lock().expect("log").last().map(String::as_str), Some("reset"));
}

#[test]
fn a_used_ring_locked_after_driver_ok_is_never_written_again() {
    let (mem, heki, dev) = started_rng();
    request(&mem, &dev, 0);
    assert_eq!(mem.read_obj::<u16>(GuestAddress(USED + 2)).expect("idx"), 1, "the device works");
    let range = ProtectRange { start: USED >> 12, end: (USED >> 12) + 1, perms: Permissions::READ };
    heki.protect_pages(&[range], "guest").expect("lock the used ring");
    let before = used_page(&mem);
    request(&mem, &dev, 1);
    assert_eq!(used_page(&mem), before, "not one byte of the locked ring changed");
    assert_ne!(dev.status() & status::NEEDS_RESET, 0);
    let recent = heki.violations().recent();
    assert!(recent.iter().any(|v| v.kind == ViolationKind::DmaWrite && v.gpa.is_some_and(|g| g >> 12 == USED >> 12)));
}

#[test]
fn a_paused_device_takes_no_request_until_resumed() {
    let (mem, _heki, dev) = started_rng();
    mem.write_obj(1u16, GuestAddress(AVAIL + 2)).expect("avail idx");
    mem.write_obj(BUFFER, GuestAddress(DESC)).expect("desc addr");
    mem.write_obj(16u32, GuestAddress(DESC + 8)).expect("desc len");
    mem.write_obj(2u16, GuestAddress(DESC + 12)).expect("write-only");
    let gate = DeviceGate::default();
    gate.close();
    assert!(!dev.process_queue(0, &gate), "cut short by the pause");
    assert_eq!(mem.read_obj::<u16>(GuestAddress(USED + 2)).expect("idx"), 0);
    gate.resume();
    assert!(dev.process_queue(0, &gate));
    assert_eq!(mem.read_obj::<u16>(GuestAddress(USED + 2)).expect("idx"), 1);
}

/// Two queues, each with a handler of its own: queue 0's requests wait
/// until the test releases them (a slow disk), queue 1's complete at once.
struct SlowAndFast {
    slow: Option<Slow>,
}

/// Tells the test it holds a request, then waits for the release.
struct Slow {
    started: std::sync::mpsc::Sender<()>,
    release: std::sync::mpsc::Receiver<()>,
}
struct Fast;

impl crate::devices::virtio::QueueHandler for Slow {
    fn process(
        &mut self,
        _: virtio_queue::DescriptorChain<&crate::guest_access::CheckedMemory>,
        _: &DeviceMemory,
    ) -> u32 {
        let _ = self.started.send(());
        let _ = self.release.recv_timeout(std::time::Duration::from_secs(10));
        0
    }
}

impl crate::devices::virtio::QueueHandler for Fast {
    fn process(
        &mut self,
        _: virtio_queue::DescriptorChain<&crate::guest_access::CheckedMemory>,
        _: &DeviceMemory,
    ) -> u32 {
        0
    }
}

impl VirtioDevice for SlowAndFast {
    fn device_type(&self) -> u16 {
        2
    }
    fn num_queues(&self) -> usize {
        2
    }
    fn queue_handler(&mut self, queue: usize) -> Option<Box<dyn crate::devices::virtio::QueueHandler>> {
        match queue {
            0 => self.slow.take().map(|slow| Box::new(slow) as Box<dyn crate::devices::virtio::QueueHandler>),
            _ => Some(Box::new(Fast)),
        }
    }
    fn process(
        &mut self,
        _: usize,
        _: virtio_queue::DescriptorChain<&crate::guest_access::CheckedMemory>,
        _: &DeviceMemory,
    ) -> u32 {
        unreachable!("every queue has a handler of its own")
    }
}

/// Makes a one-descriptor chain available on the n-th started queue and notifies queue `index`.
fn post_and_notify(mem: &GuestMemoryMmap, dev: &Mutex<VirtioPci>, n: u64, index: u16) {
    let shift = n * crate::devices::virtio::test_rig::QUEUE_STRIDE;
    mem.write_obj(BUFFER, GuestAddress(DESC + shift)).expect("desc addr");
    mem.write_obj(16u32, GuestAddress(DESC + shift + 8)).expect("desc len");
    mem.write_obj(2u16, GuestAddress(DESC + shift + 12)).expect("write-only");
    mem.write_obj(1u16, GuestAddress(AVAIL + shift + 2)).expect("avail idx");
    let notify = 0x1000 + 4 * u64::from(index);
    dev.lock().expect("dev").write(notify, &index.to_le_bytes());
}

fn used_idx(mem: &GuestMemoryMmap, n: u64) -> u16 {
    let shift = n * crate::devices::virtio::test_rig::QUEUE_STRIDE;
    mem.read_obj::<u16>(GuestAddress(USED + shift + 2)).expect("used idx")
}

fn wait_for(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while !done() {
        assert!(std::time::Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
}

#[test]
fn a_slow_request_on_one_queue_holds_neither_the_other_queue_nor_the_registers_and_a_pause_waits_for_it() {
    use std::time::Duration;
    let (release, held) = std::sync::mpsc::channel();
    let (started, holding) = std::sync::mpsc::channel();
    let device = Box::new(SlowAndFast { slow: Some(Slow { started, release: held }) });
    let (mem, _heki, dev) = crate::devices::virtio::test_rig::started_queues(device, "_disk0", &[0, 1]);
    let dev = Arc::new(Mutex::new(dev));
    let (stop, gate) = (EventFd::new(libc::EFD_NONBLOCK).expect("eventfd"), Arc::new(DeviceGate::default()));
    let workers = dev.lock().expect("dev").spawn_workers("_disk0", &stop, &gate).expect("spawn");
    assert_eq!(workers.len(), 2, "one worker per queue");
    let names: Vec<_> = workers.iter().map(|w| w.thread().name().map(str::to_string)).collect();
    assert_eq!(names, [Some("_disk0".to_string()), Some("_disk0-q1".to_string())]);

    post_and_notify(&mem, &dev, 0, 0);
    holding.recv_timeout(Duration::from_secs(5)).expect("queue 0's worker holds its request");
    post_and_notify(&mem, &dev, 1, 1);
    wait_for("queue 1's completion while queue 0 is busy", || used_idx(&mem, 1) == 1);
    assert_eq!(used_idx(&mem, 0), 0, "queue 0's request is still in progress");
    // A vCPU reading device_status is not held by the request in progress.
    let mut status = [0u8];
    dev.lock().expect("dev").read(0x14, &mut status);
    assert_eq!(status[0], 15);

    assert!(gate.pause(Duration::from_millis(50)).is_err(), "a pause waits for the request in progress");
    release.send(()).expect("release queue 0");
    gate.pause(Duration::from_secs(5)).expect("paused once the request is done");
    assert_eq!(used_idx(&mem, 0), 1);
    gate.resume();
    stop.write(1).expect("stop");
    for w in workers {
        w.join().expect("worker");
    }
}

#[test]
fn a_driver_reset_waits_only_for_the_chain_in_hand_then_the_queue_is_idle() {
    use std::time::Duration;
    let (release, held) = std::sync::mpsc::channel();
    let (started, holding) = std::sync::mpsc::channel();
    let device = Box::new(SlowAndFast { slow: Some(Slow { started, release: held }) });
    let (mem, _heki, dev) = crate::devices::virtio::test_rig::started_queues(device, "_disk0", &[0]);
    let dev = Arc::new(Mutex::new(dev));
    let (stop, gate) = (EventFd::new(libc::EFD_NONBLOCK).expect("eventfd"), Arc::new(DeviceGate::default()));
    let workers = dev.lock().expect("dev").spawn_workers("_disk0", &stop, &gate).expect("spawn");
    // Two chains available (both at descriptor 0); the first is held by the device.
    post_and_notify(&mem, &dev, 0, 0);
    mem.write_obj(2u16, GuestAddress(AVAIL + 2)).expect("avail idx");
    holding.recv_timeout(Duration::from_secs(5)).expect("the worker holds the first chain");
    let resetter = {
        let dev = dev.clone();
        std::thread::spawn(move || dev.lock().expect("dev").write(0x14, &[0]))
    };
    std::thread::sleep(Duration::from_millis(30));
    assert!(!resetter.is_finished(), "the reset waits for the chain in hand");
    release.send(()).expect("release");
    resetter.join().expect("reset");
    assert_eq!(used_idx(&mem, 0), 1, "the chain in hand completed, the next one was left to the reset");
    assert!(holding.try_recv().is_err(), "the second chain never reached the device");
    assert_eq!(dev.lock().expect("dev").status(), 0);
    stop.write(1).expect("stop");
    for w in workers {
        w.join().expect("worker");
    }
}

#[test]
fn a_driver_clearing_driver_ok_stops_the_queue_and_setting_it_again_goes_on_where_it_was() {
    let (mem, _heki, mut dev) = started_rng();
    request(&mem, &dev, 0);
    dev.write(0x14, &[11]);
    request(&mem, &dev, 1);
    assert_eq!(mem.read_obj::<u16>(GuestAddress(USED + 2)).expect("idx"), 1, "stopped");
    dev.write(0x14, &[15]);
    assert!(dev.process_queue(0, &DeviceGate::default()));
    assert_eq!(mem.read_obj::<u16>(GuestAddress(USED + 2)).expect("idx"), 2, "the waiting request only");
}
