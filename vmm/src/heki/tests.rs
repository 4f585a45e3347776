//! The heki exit path driven without a VM: fakes stand in for KVM
//! (`testing::RecordingSlots`, `FakeVcpu`) and for the run control.

use std::sync::Arc;
use std::time::Duration;

use heki::{Outcome, Permissions, PlannedSlot, Policy, ProtectRange, ViolationKind};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::{Enforcer, HekiRuntime};
use crate::cpu::hook::MsrDecision;
use crate::guest_access::{AccessPolicy, Accessor, CheckedMemory};
use crate::heki::HekiSettings;
use crate::testing::{FakeVcpu, RecordingControl, RecordingSlots};

const RAM: u64 = 1 << 20;
const LSTAR: u32 = 0xc000_0082;

pub(super) struct Rig {
    /// The guest's view (what the vCPU sees); devices get the host view.
    mem: GuestMemoryMmap,
    host_view: GuestMemoryMmap,
    control: Arc<RecordingControl>,
    slots: Arc<RecordingSlots>,
    pub(super) heki: Arc<HekiRuntime>,
}

pub(super) fn rig(policy: Policy) -> Rig {
    let ram = crate::memory::create_guest_ram(&[crate::memory::RamRegion { start: 0, size: RAM }]).expect("memory");
    let control = Arc::new(RecordingControl::default());
    let slots = Arc::new(RecordingSlots::default());
    let enforcer = Arc::new(Enforcer::new(policy, control.clone()));
    let config = HekiSettings::default();
    let boot = [(PlannedSlot { gpa: 0, size: RAM, readonly: false }, 0)];
    let heki = Arc::new(HekiRuntime::new(&config, enforcer, slots.clone(), &ram, &boot, 2));
    Rig { mem: ram.kvm, host_view: ram.host, control, slots, heki }
}

impl Rig {
    fn device(&self, name: &str) -> CheckedMemory {
        let accessor = Arc::new(Accessor::new(name));
        CheckedMemory::new(self.host_view.clone(), self.heki.enforcer().clone(), accessor)
    }

    fn lock_page(&self, page: u64) {
        let range = ProtectRange { start: page, end: page + 1, perms: Permissions::READ };
        self.heki.protect_pages(&[range], "test").expect("lock");
    }

    fn byte(&self, gpa: u64) -> u8 {
        self.mem.read_obj(GuestAddress(gpa)).expect("RAM")
    }

    fn stops(&self) -> Vec<Outcome> {
        self.control.stops.lock().expect("stops").iter().map(|(o, _)| *o).collect()
    }
}

#[test]
fn a_lock_installs_a_read_only_slot_with_vcpus_held() {
    let rig = rig(Policy::Deny);
    rig.lock_page(3);
    let slots = rig.slots.slots.lock().expect("slots").clone();
    assert!(slots.iter().any(|&(_, gpa, size, readonly)| (gpa, size, readonly) == (0x3000, 0x1000, true)), "{slots:?}");
    assert_eq!(*rig.control.max_holds.lock().expect("holds"), 1);
    assert_eq!(*rig.control.holds.lock().expect("holds"), 0, "released");
}

#[test]
fn a_trapped_write_keeps_its_allowed_bytes_and_is_reported() {
    let rig = rig(Policy::Deny);
    rig.heki.protect_bytes(0x5004, 2, "test").expect("lock bytes");
    rig.heki
        .on_unclaimed_mmio_write(1, 0x5000, &[0xaa; 8], || crate::heki::ExitSite { rip: Some(0x1234), cpl: Some(0) });
    let bytes: Vec<u8> = (0x5000..0x5008).map(|g| rig.byte(g)).collect();
    assert_eq!(bytes, [0xaa, 0xaa, 0xaa, 0xaa, 0, 0, 0xaa, 0xaa]);
    let recent = rig.heki.violations().recent();
    assert_eq!(recent.len(), 1);
    assert_eq!((recent[0].kind, recent[0].gpa, recent[0].size), (ViolationKind::Write, Some(0x5004), Some(2)));
    assert_eq!(recent[0].rip, Some(0x1234));
    assert!(rig.stops().is_empty(), "deny goes on");
}

#[test]
fn a_trapped_write_under_pause_stops_the_vm_once_per_trap() {
    let rig = rig(Policy::Pause);
    rig.lock_page(2);
    rig.heki.on_unclaimed_mmio_write(0, 0x2000, &[1], crate::heki::ExitSite::default);
    assert_eq!(rig.byte(0x2000), 0);
    assert_eq!(rig.stops(), vec![Outcome::Pause]);
}

#[test]
fn a_write_outside_ram_is_not_heki_business() {
    let rig = rig(Policy::Shutdown);
    rig.heki.on_unclaimed_mmio_write(0, RAM + 0x1000, &[1], crate::heki::ExitSite::default);
    assert!(rig.heki.violations().recent().is_empty());
    assert!(rig.stops().is_empty());
}

#[test]
fn dma_into_a_locked_page_follows_the_policy() {
    for (policy, lands, outcome) in [
        (Policy::Deny, false, None),
        (Policy::Log, true, None),
        (Policy::Pause, false, Some(Outcome::Pause)),
        (Policy::Shutdown, false, Some(Outcome::Shutdown)),
    ] {
        let rig = rig(policy);
        rig.lock_page(4);
        let device = rig.device("_rng");
        let result = device.write_slice(&[7; 16], GuestAddress(0x4ff8));
        assert_eq!(result.is_ok(), lands, "{policy:?}");
        assert_eq!(rig.byte(0x4ff8), if lands { 7 } else { 0 }, "{policy:?}: nothing lands unless log");
        assert_eq!(rig.byte(0x5000), if lands { 7 } else { 0 }, "{policy:?}: all or nothing");
        let recent = rig.heki.violations().recent();
        assert_eq!(recent.len(), 1, "{policy:?}");
        assert_eq!(recent[0].kind, ViolationKind::DmaWrite);
        assert_eq!(recent[0].details.get("device").map(String::as_str), Some("_rng"));
        assert_eq!(rig.stops().first().copied(), outcome, "{policy:?}");
        assert_eq!(device.accessor().refused.load(std::sync::atomic::Ordering::Relaxed), u64::from(!lands));
    }
}

#[test]
fn devices_may_read_locked_memory() {
    let rig = rig(Policy::Deny);
    rig.mem.write_obj(0x55u8, GuestAddress(0x6000)).expect("RAM");
    rig.lock_page(6);
    let value: u8 = rig.device("_disk0").read_obj(GuestAddress(0x6000)).expect("allowed");
    assert_eq!(value, 0x55);
    assert!(rig.heki.violations().recent().is_empty());
}

#[test]
fn a_lock_returns_only_after_the_dma_in_flight_has_landed() {
    for warm in [false, true] {
        lock_waits_for_dma_in_flight(warm);
    }
}

/// `warm`: the device wrote the page before, so its next write takes the
/// lock-free path (a memo hit) instead of the read lock.
fn lock_waits_for_dma_in_flight(warm: bool) {
    let rig = rig(Policy::Deny);
    let device = rig.device("_disk0");
    if warm {
        device.write_slice(&[1; 4], GuestAddress(0x7000)).expect("writable");
    }
    let (checked_tx, checked_rx) = std::sync::mpsc::channel();
    let writer = std::thread::spawn(move || {
        // A device access checked under the old permissions, still copying.
        let slices =
            vm_memory::GuestMemory::get_slices(&device, GuestAddress(0x7000), 4, vm_memory::Permissions::Write)
                .expect("writable now");
        checked_tx.send(()).expect("main thread");
        std::thread::sleep(Duration::from_millis(100));
        for slice in slices {
            slice.expect("slice").copy_from(&[9u8; 4]);
        }
    });
    checked_rx.recv().expect("device checked");
    rig.heki.protect_bytes(0x7000, 4, "test").expect("lock");
    // The lock returned: the in-flight write has landed already, and none can follow.
    assert_eq!(rig.byte(0x7000), 9, "the lock waited for the access in flight");
    writer.join().expect("writer");
    assert!(rig.device("_disk0").write_slice(&[1; 4], GuestAddress(0x7000)).is_err());
    assert_eq!(rig.byte(0x7003), 9);
}

#[test]
fn a_host_pin_captures_each_vcpus_live_value_and_installs_the_filter_while_held() {
    let rig = rig(Policy::Deny);
    let served = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let vcpus: Vec<_> = (0..2u8)
        .map(|id| {
            let (heki, done) = (rig.heki.clone(), served.clone());
            std::thread::spawn(move || {
                let vcpu = FakeVcpu { id, ..FakeVcpu::default() };
                vcpu.msrs.lock().expect("msrs").insert(LSTAR, 0xffff_8000_0000_0000 + u64::from(id));
                // A held vCPU serves requests until the pin is done.
                while !done.load(std::sync::atomic::Ordering::SeqCst) {
                    heki.serve_pin_request(&vcpu);
                    std::thread::sleep(Duration::from_millis(1));
                }
            })
        })
        .collect();
    let request = super::pin_state::PinRequest { msrs: vec![LSTAR], ..Default::default() };
    rig.heki.pin_from_host(request, 2).expect("pinned");
    served.store(true, std::sync::atomic::Ordering::SeqCst);
    vcpus.into_iter().for_each(|t| t.join().expect("vCPU"));
    let pins = rig.heki.pins().snapshot();
    assert_eq!(pins[0].msrs.get(&LSTAR), Some(&0xffff_8000_0000_0000));
    assert_eq!(pins[1].msrs.get(&LSTAR), Some(&0xffff_8000_0000_0001));
    assert_eq!(*rig.slots.msr_filter.lock().expect("filter"), vec![LSTAR]);
    assert_eq!(*rig.control.max_holds.lock().expect("holds"), 1, "vCPUs were held for the whole pin");
    assert_eq!(*rig.control.holds.lock().expect("holds"), 0);
}

#[test]
fn a_pinned_msr_write_is_refused_with_gp_and_the_same_value_passes() {
    let rig = rig(Policy::Deny);
    let vcpu = FakeVcpu { id: 0, ..FakeVcpu::default() };
    vcpu.msrs.lock().expect("msrs").insert(LSTAR, 0x1000);
    rig.heki.pin_msr(&vcpu, u64::from(LSTAR)).expect("pinned");
    assert_eq!(rig.heki.on_msr_write(&vcpu, LSTAR, 0xbad), MsrDecision::Refuse, "#GP");
    assert_eq!(vcpu.msrs.lock().expect("msrs").get(&LSTAR), Some(&0x1000));
    assert_eq!(rig.heki.on_msr_write(&vcpu, LSTAR, 0x1000), MsrDecision::Write);
    assert_eq!(rig.heki.violations().counts().get(ViolationKind::Msr), 1);
}

#[test]
fn a_cleared_wp_is_restored_under_deny_and_left_under_log() {
    for (policy, restored) in [(Policy::Deny, true), (Policy::Log, false)] {
        let rig = rig(policy);
        let vcpu = FakeVcpu::default();
        vcpu.sregs.lock().expect("sregs").cr0 = 0x8001_0011;
        rig.heki.pin_cr(&vcpu, 0, 1 << 16).expect("pin WP");
        vcpu.sregs.lock().expect("sregs").cr0 = 0x8000_0011;
        rig.heki.check_crs(&vcpu);
        assert_eq!(vcpu.sregs.lock().expect("sregs").cr0 & 1 << 16 != 0, restored, "{policy:?}");
        assert_eq!(rig.heki.violations().counts().get(ViolationKind::Cr), 1);
    }
}

#[test]
fn an_unemulable_write_to_locked_memory_is_skipped_and_judged() {
    let rig = rig(Policy::Log);
    rig.lock_page(8);
    let vcpu = FakeVcpu::default();
    {
        let mut regs = vcpu.regs.lock().expect("regs");
        regs.rip = 0x40_0000;
        regs.rdi = 0x8000;
    }
    // cmpxchg16b [rdi]: 48 0f c7 0f
    assert!(rig.heki.on_emulation_failure(&vcpu, &[0x48, 0x0f, 0xc7, 0x0f]));
    assert_eq!(vcpu.regs.lock().expect("regs").rip, 0x40_0004, "skipped");
    let recent = rig.heki.violations().recent();
    assert_eq!(recent[0].action, heki::RecordedAction::Denied, "not even log can perform it");
}

#[test]
fn a_host_read_of_a_private_page_is_refused_and_reported() {
    let rig = rig(Policy::Log);
    rig.mem.write_obj(0x5eu8, GuestAddress(0x9000)).expect("guest writes its secret");
    rig.heki.enable_private_memory().expect("private");
    rig.heki.set_shared(0xa000, 0x1000, 1).expect("share one page");
    let api = rig.device("api");
    assert!(api.read_obj::<u8>(GuestAddress(0x9000)).is_err(), "not even audit mode reads private memory");
    assert!(api.read_obj::<u8>(GuestAddress(0xa000)).is_ok(), "shared pages are readable");
    let recent = rig.heki.violations().recent();
    assert_eq!(recent.len(), 1);
    assert_eq!((recent[0].kind, recent[0].gpa), (ViolationKind::PrivateAccess, Some(0x9000)));
    assert_eq!(recent[0].action, heki::RecordedAction::Denied);
    assert_eq!(rig.heki.query(0x9000).map(|bits| bits & 0x600), Ok(0x200), "private, but this host keeps a mapping");
}

#[test]
fn making_a_page_private_waits_for_the_dma_in_flight() {
    let rig = rig(Policy::Deny);
    rig.heki.enable_private_memory().expect("private");
    rig.heki.set_shared(0xb000, 0x1000, 1).expect("share");
    let device = rig.device("_disk0");
    let (checked_tx, checked_rx) = std::sync::mpsc::channel();
    let writer = std::thread::spawn(move || {
        let slices =
            vm_memory::GuestMemory::get_slices(&device, GuestAddress(0xb000), 4, vm_memory::Permissions::Write)
                .expect("shared now");
        checked_tx.send(()).expect("main thread");
        std::thread::sleep(Duration::from_millis(100));
        for slice in slices {
            slice.expect("slice").copy_from(&[7u8; 4]);
        }
    });
    checked_rx.recv().expect("device checked");
    rig.heki.set_shared(0xb000, 0x1000, 0).expect("make private again");
    assert_eq!(rig.byte(0xb000), 7, "the call returned after the access in flight landed");
    writer.join().expect("writer");
    assert!(rig.device("_disk0").write_slice(&[1; 4], GuestAddress(0xb000)).is_err());
}

/// Issue 20, break 1: a device read that started while all memory was
/// shared (no batch) holds PRIVATE_MEMORY(1) off until its copy is done;
/// the read after it is refused. Before the fix the change did not wait,
/// the copy hit the `PROT_NONE` view and the VMM died.
#[test]
fn turning_private_memory_on_waits_for_a_read_in_flight() {
    let rig = rig(Policy::Deny);
    rig.mem.write_obj(0x5au8, GuestAddress(0xc000)).expect("guest data");
    let device = rig.device("_disk0");
    let (checked_tx, checked_rx) = std::sync::mpsc::channel();
    let reader = std::thread::spawn(move || {
        let slices = vm_memory::GuestMemory::get_slices(&device, GuestAddress(0xc000), 4, vm_memory::Permissions::Read)
            .expect("all memory is shared");
        checked_tx.send(()).expect("main thread");
        std::thread::sleep(Duration::from_millis(150));
        let mut byte = [0u8; 4];
        for slice in slices {
            slice.expect("slice").copy_to(&mut byte[..]);
        }
        (byte[0], device.read_obj::<u8>(GuestAddress(0xc000)).is_ok())
    });
    checked_rx.recv().expect("device checked");
    let started = std::time::Instant::now();
    rig.heki.enable_private_memory().expect("private");
    assert!(started.elapsed() >= Duration::from_millis(100), "PRIVATE_MEMORY(1) waited for the read in flight");
    let (byte, read_after) = reader.join().expect("reader");
    assert_eq!(byte, 0x5a, "the copy in flight completed");
    assert!(!read_after, "the read after the change is refused");
    let recent = rig.heki.violations().recent();
    assert_eq!(recent.iter().map(|r| r.kind).collect::<Vec<_>>(), [ViolationKind::PrivateAccess]);
}

/// A read that meets a pending PRIVATE_MEMORY(1) is judged after it: refused.
#[test]
fn a_read_that_loses_the_race_to_private_memory_is_refused() {
    let rig = rig(Policy::Deny);
    let device = rig.device("agent");
    let enforcer = rig.heki.enforcer().clone();
    // The change, as `enable_private_memory` makes it, held open.
    let mut change = enforcer.protections_mut();
    let reader = std::thread::spawn(move || device.read_obj::<u8>(GuestAddress(0xd000)).is_ok());
    std::thread::sleep(Duration::from_millis(50));
    assert!(!reader.is_finished(), "the read waits for the pending change");
    change.private.enable();
    enforcer.epoch().judge_reads();
    drop(change);
    assert!(!reader.join().expect("reader"), "judged after the change: the page is private");
    assert_eq!(rig.heki.violations().recent()[0].kind, ViolationKind::PrivateAccess);
}

/// A device batch holds a make-private until its next checkpoint; after
/// it, the batch's reads of the page are refused (its window of shared pages
/// is from the old generation).
#[test]
fn making_a_page_private_waits_for_a_device_batch_and_its_next_read_is_refused() {
    let rig = rig(Policy::Deny);
    rig.mem.write_obj(0x42u8, GuestAddress(0xb000)).expect("guest data");
    rig.heki.enable_private_memory().expect("private");
    rig.heki.set_shared(0xa000, 0x2000, 1).expect("share two pages");
    let device = rig.device("_disk0");
    let (tx, rx) = std::sync::mpsc::channel();
    let (go_tx, go_rx) = std::sync::mpsc::channel::<()>();
    let worker = std::thread::spawn(move || {
        let batch = device.batch();
        let first: u8 = device.read_obj(GuestAddress(0xb000)).expect("shared while the batch reads");
        tx.send(first).expect("main thread");
        go_rx.recv().expect("main thread");
        // Still in the batch: the change is held off, the page still shared.
        let still: u8 = device.read_obj(GuestAddress(0xb000)).expect("shared until the checkpoint");
        tx.send(still).expect("main thread");
        batch.checkpoint();
        // Let the change land, then read again in the same batch.
        std::thread::sleep(Duration::from_millis(200));
        batch.checkpoint();
        let after = device.read_obj::<u8>(GuestAddress(0xb000));
        let neighbour = device.read_obj::<u8>(GuestAddress(0xa000));
        (after.is_ok(), neighbour.is_ok())
    });
    assert_eq!(rx.recv().expect("worker"), 0x42);
    let started = std::time::Instant::now();
    let changer = {
        let heki = rig.heki.clone();
        std::thread::spawn(move || heki.set_shared(0xb000, 0x1000, 0))
    };
    std::thread::sleep(Duration::from_millis(100));
    assert!(!changer.is_finished(), "the make-private waits for the batch");
    go_tx.send(()).expect("worker");
    assert_eq!(rx.recv().expect("worker"), 0x42);
    changer.join().expect("changer").expect("make private");
    assert!(started.elapsed() >= Duration::from_millis(100));
    let (after, neighbour) = worker.join().expect("worker");
    assert!(!after, "a read after the change is refused, even in the same batch");
    assert!(neighbour, "the page left shared is still readable");
    assert_eq!(rig.heki.violations().recent().len(), 1, "one private-access violation");
}

/// Disk I/O runs outside the batch: a change does not wait for it.
#[test]
fn a_change_does_not_wait_for_io_outside_the_batch() {
    let rig = rig(Policy::Deny);
    rig.heki.enable_private_memory().expect("private");
    rig.heki.set_shared(0xa000, 0x1000, 1).expect("share");
    let device = rig.device("_disk0");
    let (tx, rx) = std::sync::mpsc::channel();
    let worker = std::thread::spawn(move || {
        let _batch = device.batch();
        device.read_obj::<u8>(GuestAddress(0xa000)).expect("shared");
        device.outside_batch(|| {
            tx.send(()).expect("main thread");
            std::thread::sleep(Duration::from_millis(500));
        });
        device.read_obj::<u8>(GuestAddress(0xa000)).is_ok()
    });
    rx.recv().expect("worker in I/O");
    let started = std::time::Instant::now();
    rig.heki.set_shared(0xa000, 0x1000, 0).expect("make private");
    assert!(started.elapsed() < Duration::from_millis(400), "the change did not wait for the I/O");
    assert!(!worker.join().expect("worker"), "the read after the I/O is refused");
}

#[test]
fn vm_heki_lists_the_locked_ranges_with_their_permissions() {
    let rig = rig(Policy::Deny);
    rig.lock_page(3);
    let ranges = rig.heki.protected_ranges();
    assert_eq!(ranges.len(), 1);
    assert_eq!((ranges[0].0, ranges[0].1, ranges[0].2.names()), (0x3000, 0x1000, vec!["read"]));
}

/// A kernel image of two text pages at 0x10000 (VA 0xffffffff81000000),
/// with one alternative site of 5 bytes at offset 0x100, copied into RAM.
fn rig_with_image(policy: Policy) -> (Rig, Vec<u8>) {
    const VA: u64 = 0xffff_ffff_8100_0000;
    let rig = rig(policy);
    let text: Vec<u8> = (0..0x2000u32).map(|i| (i * 13 % 251) as u8).collect();
    // alt_instr at VA + 0x3000: instr_offset -0x2f00 (site VA + 0x100), instrlen 5.
    let mut alt = (-0x2f00i32).to_le_bytes().to_vec();
    alt.extend([0; 8]);
    alt.extend([5, 5]);
    let section = heki::image::Section { name: ".altinstructions", va: VA + 0x3000, data: &alt };
    let segment = heki::image::Segment { gpa: 0x10000, va: VA, memsz: 0x2000, bytes: text.clone() };
    rig.heki.set_kernel_image(heki::KernelImage::new(vec![segment], &[section]));
    rig.mem.write_slice(&text, GuestAddress(0x10000)).expect("RAM");
    (rig, text)
}

fn lock_text(rig: &Rig) {
    let perms = Permissions::from_abi(13).expect("read+exec+immutable");
    rig.heki.protect_pages(&[ProtectRange { start: 0x10, end: 0x12, perms }], "test").expect("lock");
}

#[test]
fn locked_text_that_is_the_image_outside_the_masks_is_measured_and_not_reported() {
    let (rig, text) = rig_with_image(Policy::Shutdown);
    rig.mem.write_slice(&[0x90; 5], GuestAddress(0x10100)).expect("patch the alternative site");
    lock_text(&rig);
    assert!(rig.heki.violations().recent().is_empty());
    assert!(rig.stops().is_empty());
    let (measured, kernel) = rig.heki.measurements();
    let mut locked = text;
    locked[0x100..0x105].fill(0x90);
    assert_eq!(measured.len(), 1);
    assert_eq!((measured[0].start, measured[0].end), (0x10000, 0x12000));
    assert_eq!(measured[0].sha256, heki::image::sha256(&locked), "the digest of the content as locked");
    assert!(measured[0].kernel && kernel.is_some());
}

#[test]
fn locked_text_unlike_the_image_is_an_image_mismatch_with_its_offset_and_the_lock_stands() {
    let (rig, _) = rig_with_image(Policy::Pause);
    rig.mem.write_slice(&[0xcc, 0xcc], GuestAddress(0x11234)).expect("a pre-lock patch");
    lock_text(&rig);
    let recent = rig.heki.violations().recent();
    assert_eq!(recent.len(), 1, "{recent:?}");
    let v = &recent[0];
    assert_eq!((v.kind, v.gpa, v.size), (ViolationKind::ImageMismatch, Some(0x11234), Some(2)));
    assert_eq!(v.details.get("offset").map(String::as_str), Some("0x1234"));
    assert_eq!(v.details.get("va").map(String::as_str), Some("0xffffffff81001234"));
    assert_eq!(rig.stops(), vec![Outcome::Pause], "enforced per policy");
    assert_eq!(rig.heki.query(0x11000), Ok(13), "the text is locked all the same");
}
