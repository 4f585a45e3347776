//! Pins for vCPUs the host adds at run time (`pins.rs`, `inherit_cr_pins`).

use heki::{Policy, ViolationKind};

use super::tests::rig;
use crate::testing::FakeVcpu;

/// A vCPU the host adds after boot takes vCPU 0's CR pins: in long mode at
/// once when the kernel has set the bits, so nothing is reported; and a
/// vCPU kept out of long mode gets them anyway after the grace, reported.
#[test]
fn a_hot_added_vcpu_takes_vcpu_0s_cr_pins_once_in_long_mode() {
    const LONG_MODE_CR0: u64 = 0x8000_0011; // PG, ET, PE
    const WP: u64 = 1 << 16;
    const LMA: u64 = 1 << 10;
    let rig = rig(Policy::Deny);
    let boot = FakeVcpu::default();
    boot.sregs.lock().expect("sregs").cr0 = LONG_MODE_CR0 | WP;
    rig.heki.pin_cr(&boot, 0, WP).expect("vCPU 0 pins WP");

    // Added, still in real mode (WP clear is normal there): nothing happens.
    let added = FakeVcpu { id: 1, ..FakeVcpu::default() };
    rig.heki.pins().expect_inheritance(1);
    added.sregs.lock().expect("sregs").cr0 = 0x10;
    rig.heki.check_crs(&added);
    assert_eq!(rig.heki.pins().snapshot()[1].cr0, 0, "not yet");
    // In long mode with WP set, as Linux brings a CPU up: pinned, silently.
    {
        let mut sregs = added.sregs.lock().expect("sregs");
        sregs.cr0 = LONG_MODE_CR0 | WP;
        sregs.efer = LMA;
    }
    rig.heki.check_crs(&added);
    assert_eq!(rig.heki.pins().snapshot()[1].cr0, WP);
    added.sregs.lock().expect("sregs").cr0 = LONG_MODE_CR0;
    rig.heki.check_crs(&added);
    assert_ne!(added.sregs.lock().expect("sregs").cr0 & WP, 0, "a later clear is put back");
    assert_eq!(rig.heki.violations().counts().get(ViolationKind::Cr), 1);

    // Removed (its pins forgotten) and added again, kept in real mode by the
    // guest: once the grace has passed it is pinned all the same and WP is
    // restored (harmless without paging), reported.
    rig.heki.pins().forget_vcpu(1);
    rig.heki.pins().expect_inheritance(1);
    {
        let mut sregs = added.sregs.lock().expect("sregs");
        sregs.cr0 = 0x10;
        sregs.efer = 0;
    }
    rig.heki.check_crs(&added);
    assert_eq!(rig.heki.pins().snapshot()[1].cr0, 0, "within the grace");
    std::thread::sleep(super::pins::INHERIT_GRACE + std::time::Duration::from_millis(50));
    rig.heki.check_crs(&added);
    assert_eq!(rig.heki.pins().snapshot()[1].cr0, WP);
    assert_ne!(added.sregs.lock().expect("sregs").cr0 & WP, 0, "restored after the grace");
    assert_eq!(rig.heki.violations().counts().get(ViolationKind::Cr), 2);
}
