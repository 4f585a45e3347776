//! The DSDT's part of CPU hotplug: a processor device per possible vCPU
//! (`ACPI0007`, `_UID` = vCPU id = APIC id) under a processor container,
//! each with `_STA` and `_EJ0` through the controller's registers
//! (`devices/hotplug_slots.rs`, methods from `acpi_slots.rs`) and a fixed
//! `_MAT` (its MADT entry, enabled); and `\_SB_.CPHP.CSCN`, which the
//! Generic Event Device's `_EVT` calls to notify the vCPUs the host added
//! (device check) or wants back (eject request). Linux's ACPI processor
//! driver then registers the new CPU (to be onlined through sysfs) or
//! offlines and ejects it.

use acpi_tables::Aml;
use acpi_tables::aml;

use crate::acpi_slots::{SlotController, SlotNotifications};
use crate::layout::ports::{CPU_HOTPLUG, CPU_HOTPLUG_LEN};

const CONTAINER: &str = "\\_SB_.CPUS";

fn controller(max: u8) -> SlotController {
    SlotController {
        path: "\\_SB_.CPHP",
        uid: 2,
        port: CPU_HOTPLUG,
        len: CPU_HOTPLUG_LEN,
        region: "CPHR",
        lock: "CPLK",
        select: *b"CSEL",
        status: *b"CSTA",
        status_method: "CSTS",
        eject_method: "CEJ0",
        scan_method: "CSCN",
        notify_method: "\\_SB_.CPUS.CTFY",
        slots: u32::from(max),
    }
}

fn cpu_name(id: u32) -> String {
    format!("C{id:03X}")
}

/// One processor device.
struct Processor<'a> {
    id: u8,
    controller: &'a SlotController,
}

impl Aml for Processor<'_> {
    fn to_aml_bytes(&self, sink: &mut dyn acpi_tables::AmlSink) {
        let id = self.id;
        let hid = aml::Name::new("_HID".into(), &"ACPI0007");
        let uid = aml::Name::new("_UID".into(), &id);
        // Processor Local APIC: type 0, length 8, UID, APIC id, flags (enabled).
        let mat = aml::Name::new("_MAT".into(), &aml::BufferData::new(vec![0, 8, id, id, 1, 0, 0, 0]));
        let csts = self.controller.method(self.controller.status_method);
        let status = aml::MethodCall::new(csts.as_str().into(), vec![&id]);
        let return_status = aml::Return::new(&status);
        let sta = aml::Method::new("_STA".into(), 0, false, vec![&return_status]);
        let cej0 = self.controller.method(self.controller.eject_method);
        let eject = aml::MethodCall::new(cej0.as_str().into(), vec![&id]);
        let ej0 = aml::Method::new("_EJ0".into(), 1, false, vec![&eject]);
        aml::Device::new(cpu_name(u32::from(id)).as_str().into(), vec![&hid, &uid, &mat, &sta, &ej0])
            .to_aml_bytes(sink);
    }
}

/// Appends the controller and the processor container with `max` vCPUs.
pub fn append_cpu_hotplug_aml(max: u8, body: &mut Vec<u8>) {
    let controller = controller(max);
    controller.append(body);
    let hid = aml::Name::new("_HID".into(), &"ACPI0010");
    let cid = aml::Name::new("_CID".into(), &aml::EISAName::new("PNP0A05"));
    let processors: Vec<Processor> = (0..max).map(|id| Processor { id, controller: &controller }).collect();
    let notifications = SlotNotifications { slots: u32::from(max), name: cpu_name };
    let ctfy = aml::Method::new("CTFY".into(), 2, false, vec![&notifications]);
    let mut children: Vec<&dyn Aml> = vec![&hid, &cid];
    children.extend(processors.iter().map(|p| p as &dyn Aml));
    children.push(&ctfy);
    aml::Device::new(CONTAINER.into(), children).to_aml_bytes(body);
}

/// What the Generic Event Device's `_EVT` calls for CPUs.
pub const SCAN_METHOD: &str = "\\_SB_.CPHP.CSCN";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_possible_vcpu_is_a_processor_device_that_can_be_notified() {
        let mut body = Vec::new();
        append_cpu_hotplug_aml(4, &mut body);
        let count = |needle: &[u8]| body.windows(needle.len()).filter(|w| *w == needle).count();
        // Each vCPU: its device name and one Notify target.
        assert_eq!(count(b"C000"), 2);
        assert_eq!(count(b"C003"), 2);
        assert_eq!(count(b"C004"), 0);
        assert_eq!(count(b"ACPI0007"), 4);
        assert_eq!(count(b"_EJ0"), 4);
    }
}
