//! The string-write path driven without a VM: a fake vCPU in 64-bit mode
//! with identity page tables, a real `HekiRuntime` over 1 MiB of RAM.

use std::sync::Arc;

use heki::{Permissions, PlannedSlot, Policy, ProtectRange, ViolationKind};
use hypervisor::{Regs, SpecialRegs};
use vm_memory::GuestMemoryMmap;

use super::*;
use crate::heki::Enforcer;
use crate::heki::HekiSettings;
use crate::testing::{FakeVcpu, RecordingControl, RecordingSlots};
use crate::traps::ports::{HostError, VcpuAccess};

const RAM: u64 = 1 << 20;
const LOCKED: u64 = 0x10000;
const CODE: u64 = 0x2000;
const REP_STOSB: &[u8] = &[0xf3, 0xaa];

/// `FakeVcpu` (identity page tables) in 64-bit mode, counting completions.
struct StringVcpu {
    inner: FakeVcpu,
    watched: bool,
    completions: u32,
    /// What completing hands back first (a wide store's next piece).
    next_piece: Option<(u64, Vec<u8>)>,
}

impl VcpuAccess for StringVcpu {
    fn id(&self) -> u8 {
        self.inner.id()
    }
    fn regs(&self) -> Result<Regs, HostError> {
        self.inner.regs()
    }
    fn set_regs(&self, regs: &Regs) -> Result<(), HostError> {
        self.inner.set_regs(regs)
    }
    fn sregs(&self) -> Result<SpecialRegs, HostError> {
        self.inner.sregs()
    }
    fn set_sregs(&self, sregs: &SpecialRegs) -> Result<(), HostError> {
        self.inner.set_sregs(sregs)
    }
    fn msr(&self, index: u32) -> Result<u64, HostError> {
        self.inner.msr(index)
    }
    fn set_msr(&self, index: u32, value: u64) -> Result<(), HostError> {
        self.inner.set_msr(index, value)
    }
    fn translate_gva(&self, gva: u64) -> Result<Option<u64>, HostError> {
        self.inner.translate_gva(gva)
    }
    fn exit_rip(&self) -> Option<u64> {
        self.inner.exit_rip()
    }
    fn exit_cpl(&self) -> Option<u8> {
        self.inner.exit_cpl()
    }
}

impl StringExitAccess for StringVcpu {
    fn complete_pending_exit(&mut self) -> Result<Option<(u64, Vec<u8>)>, HostError> {
        self.completions += 1;
        Ok(self.next_piece.take())
    }
    fn instructions_watched(&self) -> Result<bool, HostError> {
        Ok(self.watched)
    }
}

/// The state right after the first element of `rep stosb` (AL = 0xee,
/// RCX = `count`) at the start of the locked page exited.
fn after_first_byte(count: u64) -> StringVcpu {
    let inner = FakeVcpu::default();
    let mut sregs = SpecialRegs { efer: EFER_LMA, ..SpecialRegs::default() };
    sregs.cs.l = 1;
    *inner.sregs.lock().expect("sregs") = sregs;
    *inner.regs.lock().expect("regs") =
        Regs { rip: CODE, rcx: count - 1, rdi: LOCKED + 1, rax: 0xee, ..Regs::default() };
    StringVcpu { inner, watched: false, completions: 0, next_piece: None }
}

fn runtime(policy: Policy, code: &[u8]) -> (Arc<HekiRuntime>, GuestMemoryMmap) {
    let (heki, mem, _) = runtime_with_control(policy, code);
    (heki, mem)
}

fn runtime_with_control(policy: Policy, code: &[u8]) -> (Arc<HekiRuntime>, GuestMemoryMmap, Arc<RecordingControl>) {
    let ram = crate::memory::create_guest_ram(&[crate::memory::RamRegion { start: 0, size: RAM }]).expect("RAM");
    let control = Arc::new(RecordingControl::default());
    let enforcer = Arc::new(Enforcer::new(policy, control.clone()));
    let config = HekiSettings::default();
    let boot = [(PlannedSlot { gpa: 0, size: RAM, readonly: false }, 0)];
    let heki = Arc::new(HekiRuntime::new(&config, enforcer, Arc::new(RecordingSlots::default()), &ram, &boot, 1));
    ram.kvm.write_slice(&[0x11; PAGE_SIZE as usize], GuestAddress(LOCKED)).expect("fill");
    ram.kvm.write_slice(code, GuestAddress(CODE)).expect("code");
    let range = ProtectRange { start: LOCKED >> 12, end: (LOCKED >> 12) + 1, perms: Permissions::READ };
    heki.protect_pages(&[range], "test").expect("lock");
    (heki, ram.kvm, control)
}

fn page(mem: &GuestMemoryMmap) -> Vec<u8> {
    let mut page = vec![0u8; PAGE_SIZE as usize];
    mem.read_slice(&mut page, GuestAddress(LOCKED)).expect("read");
    page
}

#[test]
fn the_first_exit_of_a_rep_stosb_completes_the_page_with_one_violation() {
    let (heki, mem) = runtime(Policy::Deny, REP_STOSB);
    let mut vcpu = after_first_byte(4096);
    assert!(heki.complete_string_write(&mut vcpu, LOCKED, &[0xee]));
    let regs = vcpu.regs().expect("regs");
    assert_eq!((regs.rcx, regs.rdi, regs.rip), (0, LOCKED + PAGE_SIZE, CODE + 2));
    assert_eq!(vcpu.completions, 1, "the pending exit is completed before the registers change");
    assert!(page(&mem).iter().all(|&b| b == 0x11), "nothing lands in the locked page");
    let records = heki.violations().recent();
    assert_eq!(records.len(), 1);
    assert_eq!((records[0].kind, records[0].size, records[0].length), (ViolationKind::Write, Some(4096), Some(4096)));
    assert_eq!(records[0].rip, Some(CODE));
    assert_eq!(records[0].details.get("instruction").map(String::as_str), Some("rep stosb"));
}

#[test]
fn under_log_every_byte_lands_and_one_violation_is_recorded() {
    let (heki, mem) = runtime(Policy::Log, REP_STOSB);
    let mut vcpu = after_first_byte(4096);
    assert!(heki.complete_string_write(&mut vcpu, LOCKED, &[0xee]));
    assert!(page(&mem).iter().all(|&b| b == 0xee));
    assert_eq!(heki.violations().total(), 1);
}

#[test]
fn under_pause_the_run_is_refused_and_the_vm_pauses_once() {
    let (heki, mem, control) = runtime_with_control(Policy::Pause, REP_STOSB);
    let mut vcpu = after_first_byte(4096);
    assert!(heki.complete_string_write(&mut vcpu, LOCKED, &[0xee]));
    assert!(page(&mem).iter().all(|&b| b == 0x11));
    let stops: Vec<_> = control.stops.lock().expect("stops").iter().map(|(o, _)| *o).collect();
    assert_eq!(stops, vec![heki::Outcome::Pause]);
    assert_eq!(heki.violations().recent()[0].action, heki::RecordedAction::Paused);
}

#[test]
fn a_huge_count_is_done_one_page_per_exit_and_the_instruction_re_executes() {
    let (heki, _mem) = runtime(Policy::Deny, REP_STOSB);
    let mut vcpu = after_first_byte(u64::MAX);
    assert!(heki.complete_string_write(&mut vcpu, LOCKED, &[0xee]));
    let regs = vcpu.regs().expect("regs");
    assert_eq!((regs.rcx, regs.rdi, regs.rip), (u64::MAX - 4096, LOCKED + PAGE_SIZE, CODE));
}

#[test]
fn an_exit_that_is_not_the_instruction_at_rip_takes_the_per_element_path() {
    let (heki, _mem) = runtime(Policy::Deny, REP_STOSB);
    // The data is not AL: another instruction wrote it.
    let mut vcpu = after_first_byte(4096);
    let before = vcpu.regs().expect("regs");
    assert!(!heki.complete_string_write(&mut vcpu, LOCKED, &[0x42]));
    assert_eq!(vcpu.regs().expect("regs"), before, "registers untouched");
    assert_eq!(vcpu.completions, 0, "a foreign exit is never completed here");
    // Another page offset.
    assert!(!heki.complete_string_write(&mut vcpu, LOCKED + 8, &[0xee]));
    // Watched instructions (guest breakpoints, single-stepping) run element by element.
    let mut watched = after_first_byte(4096);
    watched.watched = true;
    assert!(!heki.complete_string_write(&mut watched, LOCKED, &[0xee]));
    assert_eq!(watched.completions, 0);
    assert_eq!(heki.violations().total(), 0, "nothing judged here: the caller judges the element");
}

#[test]
fn a_wide_store_that_looked_like_an_element_has_its_next_piece_judged_and_no_run() {
    let (heki, mem) = runtime(Policy::Log, &[0xf3, 0x48, 0xab]);
    let mut vcpu = after_first_byte(4096);
    {
        let mut regs = vcpu.inner.regs.lock().expect("regs");
        regs.rdi = LOCKED + 8;
        regs.rax = 0x0807_0605_0403_0201;
    }
    vcpu.next_piece = Some((LOCKED + 8, vec![0xaa; 8]));
    let before = vcpu.regs().expect("regs");
    assert!(!heki.complete_string_write(&mut vcpu, LOCKED, &0x0807_0605_0403_0201u64.to_le_bytes()));
    assert_eq!(vcpu.regs().expect("regs"), before, "no run: registers untouched");
    let mut piece = [0u8; 8];
    mem.read_slice(&mut piece, GuestAddress(LOCKED + 8)).expect("read");
    assert_eq!(piece, [0xaa; 8], "the second piece was judged (log: it lands)");
    assert_eq!(heki.violations().total(), 1, "the caller judges the first piece");
}

#[test]
fn a_plain_write_is_decoded_once_then_remembered_per_rip() {
    let (heki, _mem) = runtime(Policy::Deny, &[0x88, 0x07]);
    let mut vcpu = after_first_byte(4096);
    assert!(!heki.complete_string_write(&mut vcpu, LOCKED, &[0xee]));
    assert!(heki.string_memo().knows_not_string(0, CODE));
    assert_eq!(vcpu.completions, 0);
}

#[test]
fn a_movs_from_outside_ram_runs_element_by_element() {
    let (heki, _mem) = runtime(Policy::Deny, &[0xf3, 0xa4]);
    let mut vcpu = after_first_byte(4096);
    vcpu.inner.regs.lock().expect("regs").rsi = 0xd000_0001;
    assert!(!heki.complete_string_write(&mut vcpu, LOCKED, &[0xff]));
}

#[test]
fn a_page_the_agent_tracks_keeps_its_per_write_path() {
    let (heki, _mem) = runtime(Policy::Deny, REP_STOSB);
    heki.traps().set_agent_pages(vec![(LOCKED >> 12, (LOCKED >> 12) + 1)]).expect("track");
    let mut vcpu = after_first_byte(4096);
    assert!(!heki.complete_string_write(&mut vcpu, LOCKED, &[0xee]));
}
