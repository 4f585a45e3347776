//! The DSDT's part of PCI hotplug on segment 0, in the style of Cloud
//! Hypervisor's: the controller's registers (`devices/pci_hotplug.rs`) as
//! an I/O operation region with methods around them, one hotplug slot
//! device per PCI slot under the host bridge, and a Generic Event Device
//! (`ACPI0013`, the only event source a hardware-reduced FADT allows) whose
//! interrupt makes the guest read the registers and notify the slots.
//!
//! Device check (1) on a slot makes Linux's acpiphp scan it; eject request
//! (3) makes it release the slot's device and call `_EJ0`.

use acpi_tables::Aml;
use acpi_tables::aml::{self, FieldAccessType, FieldEntry, FieldLockRule, FieldUpdateRule, OpRegionSpace};

use crate::devices::pci::SLOTS;
use crate::layout::ports::{GED_IRQ, PCI_HOTPLUG, PCI_HOTPLUG_LEN};

/// ACPI notification values (ACPI 6.5, table 5.169).
const DEVICE_CHECK: u8 = 1;
const EJECT_REQUEST: u8 = 3;
/// `_STA` of an occupied slot: present, enabled, shown, functioning.
const STA_PRESENT: u8 = 0x0f;

fn slot_name(slot: usize) -> String {
    format!("SL{slot:02X}")
}

/// `\_SB_.PHPC`: the register block and the methods that use it.
fn controller(body: &mut Vec<u8>) {
    let hid = aml::Name::new("_HID".into(), &aml::EISAName::new("PNP0C02"));
    let uid = aml::Name::new("_UID".into(), &aml::ONE);
    let ports = aml::IO::new(PCI_HOTPLUG, PCI_HOTPLUG, 1, PCI_HOTPLUG_LEN as u8);
    let crs = aml::Name::new("_CRS".into(), &aml::ResourceTemplate::new(vec![&ports]));
    let region = aml::OpRegion::new("PHPR".into(), OpRegionSpace::SystemIO, &PCI_HOTPLUG, &PCI_HOTPLUG_LEN);
    let field = aml::Field::new(
        "PHPR".into(),
        FieldAccessType::DWord,
        FieldLockRule::NoLock,
        FieldUpdateRule::Preserve,
        vec![
            FieldEntry::Named(*b"PCIU", 32),
            FieldEntry::Named(*b"PCID", 32),
            FieldEntry::Named(*b"PCEJ", 32),
            FieldEntry::Named(*b"PCIP", 32),
        ],
    );
    let lock = aml::Mutex::new("PHLK".into(), 0);
    let acquire = aml::Acquire::new("PHLK".into(), 0xffff);
    let release = aml::Release::new("PHLK".into());

    // SCAN: read (and so clear) both bitmaps, then notify their slots.
    let (up, down) = (aml::Path::new("PCIU"), aml::Path::new("PCID"));
    let take_up = aml::Store::new(&aml::Local(0), &up);
    let take_down = aml::Store::new(&aml::Local(1), &down);
    let notify = aml::MethodCall::new("\\_SB_.PC00.SNFY".into(), vec![&aml::Local(0), &aml::Local(1)]);
    let scan = aml::Method::new("SCAN".into(), 0, true, vec![&acquire, &take_up, &take_down, &release, &notify]);

    // EJCT(slot): the guest has released the slot.
    let bit = aml::ShiftLeft::new(&aml::Local(0), &aml::ONE, &aml::Arg(0));
    let eject_register = aml::Path::new("PCEJ");
    let eject = aml::Store::new(&eject_register, &aml::Local(0));
    let ejct = aml::Method::new("EJCT".into(), 1, true, vec![&bit, &acquire, &eject, &release]);

    // PRES(slot): the slot's _STA.
    let present = aml::Path::new("PCIP");
    let read_present = aml::Store::new(&aml::Local(0), &present);
    let bit = aml::ShiftLeft::new(&aml::Local(1), &aml::ONE, &aml::Arg(0));
    let occupied = aml::And::new(&aml::Local(2), &aml::Local(0), &aml::Local(1));
    let sta = aml::Return::new(&STA_PRESENT);
    let is_occupied = aml::NotEqual::new(&aml::Local(2), &aml::ZERO);
    let when_occupied = aml::If::new(&is_occupied, vec![&sta]);
    let absent = aml::Return::new(&aml::ZERO);
    let pres = aml::Method::new(
        "PRES".into(),
        1,
        true,
        vec![&acquire, &read_present, &release, &bit, &occupied, &when_occupied, &absent],
    );

    aml::Device::new("\\_SB_.PHPC".into(), vec![&hid, &uid, &crs, &region, &field, &lock, &scan, &ejct, &pres])
        .to_aml_bytes(body);
}

/// One slot device: its address, its number, its eject and status methods.
struct HotplugSlot(usize);

impl Aml for HotplugSlot {
    fn to_aml_bytes(&self, sink: &mut dyn acpi_tables::AmlSink) {
        let slot = self.0 as u32;
        let adr = aml::Name::new("_ADR".into(), &(slot << 16));
        let sun = aml::Name::new("_SUN".into(), &slot);
        let number = aml::Path::new("_SUN");
        let call_eject = aml::MethodCall::new("\\_SB_.PHPC.EJCT".into(), vec![&number]);
        let ej0 = aml::Method::new("_EJ0".into(), 1, false, vec![&call_eject]);
        let status = aml::MethodCall::new("\\_SB_.PHPC.PRES".into(), vec![&number]);
        let return_status = aml::Return::new(&status);
        let sta = aml::Method::new("_STA".into(), 0, false, vec![&return_status]);
        aml::Device::new(slot_name(self.0).as_str().into(), vec![&adr, &sun, &ej0, &sta]).to_aml_bytes(sink);
    }
}

/// One `If` per slot and bitmap: `Notify` needs the slot by name.
struct SlotNotifications;

impl Aml for SlotNotifications {
    fn to_aml_bytes(&self, sink: &mut dyn acpi_tables::AmlSink) {
        for slot in 1..SLOTS {
            let bit = 1u32 << slot;
            let name = aml::Path::new(&slot_name(slot));
            for (bitmap, value) in [(0, DEVICE_CHECK), (1, EJECT_REQUEST)] {
                let bitmap = aml::Arg(bitmap);
                let set = aml::And::new(&aml::ZERO, &bitmap, &bit);
                let notify = aml::Notify::new(&name, &value);
                aml::If::new(&aml::NotEqual::new(&set, &aml::ZERO), vec![&notify]).to_aml_bytes(sink);
            }
        }
    }
}

/// Segment 0's slots (never slot 0, the host bridge) and `SNFY(up, down)`.
fn slots(body: &mut Vec<u8>) {
    let devices: Vec<HotplugSlot> = (1..SLOTS).map(HotplugSlot).collect();
    let snfy = aml::Method::new("SNFY".into(), 2, false, vec![&SlotNotifications]);
    let mut children: Vec<&dyn Aml> = devices.iter().map(|d| d as &dyn Aml).collect();
    children.push(&snfy);
    aml::Scope::new("\\_SB_.PC00".into(), children).to_aml_bytes(body);
}

/// `\_SB_.GED_`: its interrupt runs `_EVT`, which scans the PCI controller
/// and the others named in `scans` (CPU, memory).
fn generic_event_device(body: &mut Vec<u8>, scans: &[&str]) {
    let hid = aml::Name::new("_HID".into(), &"ACPI0013");
    let uid = aml::Name::new("_UID".into(), &aml::ZERO);
    let interrupt = aml::Interrupt::new(true, true, false, false, GED_IRQ);
    let crs = aml::Name::new("_CRS".into(), &aml::ResourceTemplate::new(vec![&interrupt]));
    // Every controller is scanned: each event is read once and cleared.
    let scan = aml::MethodCall::new("\\_SB_.PHPC.SCAN".into(), vec![]);
    let others: Vec<aml::MethodCall> = scans.iter().map(|m| aml::MethodCall::new((*m).into(), vec![])).collect();
    let mut steps: Vec<&dyn Aml> = vec![&scan];
    steps.extend(others.iter().map(|m| m as &dyn Aml));
    let evt = aml::Method::new("_EVT".into(), 1, true, steps);
    aml::Device::new("\\_SB_.GED_".into(), vec![&hid, &uid, &crs, &evt]).to_aml_bytes(body);
}

/// Appends the controller, the slots and the GED (after the host bridges);
/// the GED also calls the scan methods `scans` of the other controllers.
pub fn append_hotplug_aml(body: &mut Vec<u8>, scans: &[&str]) {
    controller(body);
    slots(body);
    generic_event_device(body, scans);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_slot_but_the_host_bridges_is_described_and_notified() {
        let mut body = Vec::new();
        append_hotplug_aml(&mut body, &[]);
        let count = |needle: &[u8]| body.windows(needle.len()).filter(|w| *w == needle).count();
        assert_eq!(count(b"SL00"), 0);
        // Each slot: its device name and two Notify targets.
        assert_eq!(count(b"SL01"), 3);
        assert_eq!(count(b"SL1F"), 3);
        assert_eq!(count(b"_EJ0"), SLOTS - 1);
        assert_eq!(count(b"ACPI0013"), 1);
    }
}
