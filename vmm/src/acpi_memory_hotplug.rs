//! The DSDT's part of memory hotplug: one ACPI memory device (`PNP0C80`)
//! per slot of the hotplug window (`memory/hotplug.rs`), each with its
//! fixed range in `_CRS` and `_STA` through the controller's registers
//! (`devices/hotplug_slots.rs`, methods from `acpi_slots.rs`); and
//! `\_SB_.MHPC.MSCN`, which the Generic Event Device's `_EVT` calls to
//! send a device check for each slot the host plugged. Linux's ACPI memory
//! driver then adds the range, and onlines it as its configuration says
//! (the drivers kernel: automatically). Memory is never taken back: the
//! devices have no `_EJ0`.

use acpi_tables::Aml;
use acpi_tables::aml;

use crate::acpi_slots::{SlotController, SlotNotifications};
use crate::layout::ports::{MEMORY_HOTPLUG, MEMORY_HOTPLUG_LEN};
use crate::memory::HotplugWindow;

fn controller(slots: u32) -> SlotController {
    SlotController {
        path: "\\_SB_.MHPC",
        uid: 3,
        port: MEMORY_HOTPLUG,
        len: MEMORY_HOTPLUG_LEN,
        region: "MHPR",
        lock: "MLCK",
        select: *b"MSEL",
        status: *b"MSTA",
        status_method: "MSTS",
        eject_method: "MEJ0",
        scan_method: "MSCN",
        notify_method: "\\_SB_.MTFY",
        slots,
    }
}

fn slot_name(slot: u32) -> String {
    format!("M{slot:03X}")
}

/// One memory device.
struct MemoryDevice<'a> {
    slot: u32,
    window: &'a HotplugWindow,
    controller: &'a SlotController,
}

impl Aml for MemoryDevice<'_> {
    fn to_aml_bytes(&self, sink: &mut dyn acpi_tables::AmlSink) {
        let range = self.window.slot(self.slot);
        let hid = aml::Name::new("_HID".into(), &aml::EISAName::new("PNP0C80"));
        let uid = aml::Name::new("_UID".into(), &self.slot);
        let memory = aml::AddressSpace::new_memory(
            aml::AddressSpaceCacheable::Cacheable,
            true,
            range.start,
            range.end().saturating_sub(1),
            None,
        );
        let crs = aml::Name::new("_CRS".into(), &aml::ResourceTemplate::new(vec![&memory]));
        let msts = self.controller.method(self.controller.status_method);
        let status = aml::MethodCall::new(msts.as_str().into(), vec![&self.slot]);
        let return_status = aml::Return::new(&status);
        let sta = aml::Method::new("_STA".into(), 0, false, vec![&return_status]);
        aml::Device::new(slot_name(self.slot).as_str().into(), vec![&hid, &uid, &crs, &sta]).to_aml_bytes(sink);
    }
}

/// Appends the controller and a memory device per slot of `window`.
pub fn append_memory_hotplug_aml(window: &HotplugWindow, body: &mut Vec<u8>) {
    let controller = controller(window.slots());
    controller.append(body);
    let devices: Vec<MemoryDevice> =
        (0..window.slots()).map(|slot| MemoryDevice { slot, window, controller: &controller }).collect();
    let notifications = SlotNotifications { slots: window.slots(), name: slot_name };
    let mtfy = aml::Method::new("MTFY".into(), 2, false, vec![&notifications]);
    let mut children: Vec<&dyn Aml> = devices.iter().map(|d| d as &dyn Aml).collect();
    children.push(&mtfy);
    aml::Scope::new("\\_SB_".into(), children).to_aml_bytes(body);
}

/// What the Generic Event Device's `_EVT` calls for memory.
pub const SCAN_METHOD: &str = "\\_SB_.MHPC.MSCN";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_slot_of_the_window_is_a_memory_device_with_its_range() {
        let window = HotplugWindow { start: 4 << 30, size: 512 << 20 };
        let mut body = Vec::new();
        append_memory_hotplug_aml(&window, &mut body);
        let count = |needle: &[u8]| body.windows(needle.len()).filter(|w| *w == needle).count();
        // Each slot: its device name and one Notify target.
        assert_eq!(count(b"M000"), 2);
        assert_eq!(count(b"M003"), 2);
        assert_eq!(count(b"M004"), 0);
        // Slot 3's first byte, little-endian, as the QWordMemory minimum.
        assert_eq!(count(&((4u64 << 30) + (384 << 20)).to_le_bytes()), 1);
    }
}
