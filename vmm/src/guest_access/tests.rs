//! The layer with a policy of its own (no heki): what it asks, what it
//! remembers, and that a change waits for an access in flight.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use vm_memory::{Bytes, GuestAddress, GuestMemory, GuestMemoryMmap, Permissions};

use super::*;

/// Refuses writes to one page (and reads of it once `locked_reads`); counts questions.
#[derive(Default)]
struct OnePageLocked {
    epoch: AccessEpoch,
    page: u64,
    questions: AtomicU64,
    refused: Mutex<Vec<(String, u64, u64, bool)>>,
    locked_reads: AtomicBool,
}

impl AccessPolicy for OnePageLocked {
    fn epoch(&self) -> &AccessEpoch {
        &self.epoch
    }

    fn judge(&self, access: DeviceAccess<'_>) -> Decision {
        self.questions.fetch_add(1, Ordering::SeqCst);
        if self.permits(access.gpa, access.len, access.write) {
            return Decision::Allow { whole_page: true };
        }
        let record = (access.accessor.to_string(), access.gpa, access.len, access.write);
        self.refused.lock().expect("refusals").push(record);
        Decision::Refuse
    }

    fn permits(&self, gpa: u64, len: u64, write: bool) -> bool {
        let touches =
            gpa >> PAGE_SHIFT <= self.page && self.page <= gpa.saturating_add(len.saturating_sub(1)) >> PAGE_SHIFT;
        !touches || (!write && !self.locked_reads.load(Ordering::SeqCst))
    }
}

fn view(policy: &Arc<OnePageLocked>, name: &str) -> CheckedMemory {
    let ram = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x10_0000)]).expect("RAM");
    CheckedMemory::new(ram, policy.clone(), Arc::new(Accessor::new(name)))
}

fn locked_page(page: u64) -> Arc<OnePageLocked> {
    Arc::new(OnePageLocked { page, ..OnePageLocked::default() })
}

#[test]
fn a_write_the_policy_refuses_fails_is_counted_and_names_the_accessor() {
    let policy = locked_page(5);
    let memory = view(&policy, "_disk0");
    let err = memory.write_obj(0xabu8, GuestAddress(0x5010)).expect_err("refused");
    assert!(is_refusal(&err), "{err}");
    assert_eq!(memory.accessor().refused.load(Ordering::Relaxed), 1);
    assert_eq!(*policy.refused.lock().expect("refusals"), vec![("_disk0".to_string(), 0x5010, 1, true)]);
    assert_eq!(memory.read_obj::<u8>(GuestAddress(0x5010)).expect("reads are allowed"), 0);
}

#[test]
fn a_page_found_writable_is_not_asked_about_again_until_the_policy_changes() {
    let policy = locked_page(5);
    let memory = view(&policy, "_rng");
    memory.write_obj(1u32, GuestAddress(0x7000)).expect("write");
    memory.write_obj(2u32, GuestAddress(0x7100)).expect("same page");
    assert_eq!(policy.questions.load(Ordering::SeqCst), 1);
    drop(policy.epoch().change());
    memory.write_obj(3u32, GuestAddress(0x7200)).expect("write");
    assert_eq!(policy.questions.load(Ordering::SeqCst), 2, "a change makes the memo stale");
}

#[test]
fn check_range_answers_without_reporting() {
    let policy = locked_page(5);
    let memory = view(&policy, "agent");
    assert!(!GuestMemory::check_range(&memory, GuestAddress(0x5000), 8, Permissions::ReadWrite));
    assert!(GuestMemory::check_range(&memory, GuestAddress(0x5000), 8, Permissions::Read));
    assert!(!GuestMemory::check_range(&memory, GuestAddress(0x20_0000), 8, Permissions::Read), "not RAM");
    assert!(policy.refused.lock().expect("refusals").is_empty());
}

#[test]
fn a_change_waits_for_a_read_in_flight_and_reads_judged_after_it_are_refused() {
    let policy = locked_page(9);
    let memory = view(&policy, "agent");
    let change = policy.epoch().change();
    let reader = {
        let memory = memory.clone();
        std::thread::spawn(move || memory.read_obj::<u8>(GuestAddress(0x9000)).is_ok())
    };
    std::thread::sleep(Duration::from_millis(50));
    assert!(!reader.is_finished(), "a read meeting a pending change waits for it");
    policy.locked_reads.store(true, Ordering::SeqCst);
    policy.epoch().judge_reads();
    policy.epoch().mark_reads_judged(0x100, 9, 10, true);
    drop(change);
    assert!(!reader.join().expect("reader"), "judged under the new answers");
    assert!(memory.read_obj::<u8>(GuestAddress(0xa000)).is_ok(), "other pages still read");
}

#[test]
fn memory_reserved_for_hotplug_is_out_of_reach_until_plugged_and_nobody_is_asked() {
    let policy = locked_page(0xff);
    let memory = view(&policy, "_rng");
    // The upper half of this RAM stands for a hotplug window not plugged in yet.
    policy.epoch.unplugged().reserve(0x8_0000, 0x10_0000);
    for (gpa, len) in [(0x8_0000, 1), (0x7_fff0, 0x20), (0xf_fff0, 0x10)] {
        let err = memory.write_slice(&vec![0xaa; len], GuestAddress(gpa)).expect_err("not RAM yet");
        assert!(!is_refusal(&err), "out of RAM, not a policy refusal: {err}");
        assert!(memory.read_slice(&mut vec![0; len], GuestAddress(gpa)).is_err());
        assert!(!memory.check_range(GuestAddress(gpa), len, Permissions::Write));
    }
    assert_eq!(policy.questions.load(Ordering::SeqCst), 0, "no policy question, so no event");
    memory.write_obj(0x11u8, GuestAddress(0x7_ff00)).expect("boot RAM below the window");
    policy.epoch.unplugged().plug_up_to(0x9_0000);
    memory.write_obj(0x5eedu32, GuestAddress(0x8_0100)).expect("plugged in");
    assert_eq!(memory.read_obj::<u32>(GuestAddress(0x8_0100)).expect("read back"), 0x5eed);
    assert!(memory.write_obj(0u8, GuestAddress(0x9_0000)).is_err(), "the rest stays out of reach");
}
