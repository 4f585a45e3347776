//! The DSDT's part of CPU hotplug: a processor device per possible vCPU
//! (`ACPI0007`, `_UID` = vCPU id = APIC id) under a processor container,
//! each with `_STA` and `_EJ0` through the controller's registers
//! (`devices/cpu_hotplug.rs`) and a fixed `_MAT` (its MADT entry, enabled);
//! and `\_SB_.CPHP.CSCN`, which the Generic Event Device's `_EVT` calls to
//! notify the vCPUs the host added (device check) or wants back (eject
//! request). Linux's ACPI processor driver then registers the new CPU (to
//! be onlined through sysfs) or offlines and ejects it.

use acpi_tables::Aml;
use acpi_tables::aml::{self, FieldAccessType, FieldEntry, FieldLockRule, FieldUpdateRule, OpRegionSpace};

use crate::devices::cpu_hotplug::{EJECTED, ENABLED, INSERT_PENDING, REMOVE_PENDING};
use crate::layout::ports::{CPU_HOTPLUG, CPU_HOTPLUG_LEN};

/// ACPI notification values (ACPI 6.5, table 5.169).
const DEVICE_CHECK: u8 = 1;
const EJECT_REQUEST: u8 = 3;
/// `_STA` of an enabled vCPU: present, enabled, shown, functioning.
const STA_PRESENT: u8 = 0x0f;
const CONTROLLER: &str = "\\_SB_.CPHP";
const CONTAINER: &str = "\\_SB_.CPUS";

fn cpu_name(id: u8) -> String {
    format!("C{id:03X}")
}

/// Under the controller's lock: select `cpu`, then `body`.
struct Selected<'a> {
    cpu: &'a dyn Aml,
    body: Vec<&'a dyn Aml>,
}

impl Aml for Selected<'_> {
    fn to_aml_bytes(&self, sink: &mut dyn acpi_tables::AmlSink) {
        aml::Acquire::new("CPLK".into(), 0xffff).to_aml_bytes(sink);
        aml::Store::new(&aml::Path::new("CSEL"), self.cpu).to_aml_bytes(sink);
        for step in &self.body {
            step.to_aml_bytes(sink);
        }
        aml::Release::new("CPLK".into()).to_aml_bytes(sink);
    }
}

/// `\_SB_.CPHP`: the registers and the methods that use them.
fn controller(max: u8, body: &mut Vec<u8>) {
    let hid = aml::Name::new("_HID".into(), &aml::EISAName::new("PNP0C02"));
    let uid = aml::Name::new("_UID".into(), &2u8);
    let ports = aml::IO::new(CPU_HOTPLUG, CPU_HOTPLUG, 1, CPU_HOTPLUG_LEN as u8);
    let crs = aml::Name::new("_CRS".into(), &aml::ResourceTemplate::new(vec![&ports]));
    let region = aml::OpRegion::new("CPHR".into(), OpRegionSpace::SystemIO, &CPU_HOTPLUG, &CPU_HOTPLUG_LEN);
    let field = aml::Field::new(
        "CPHR".into(),
        FieldAccessType::DWord,
        FieldLockRule::NoLock,
        FieldUpdateRule::Preserve,
        vec![FieldEntry::Named(*b"CSEL", 32), FieldEntry::Named(*b"CSTA", 32)],
    );
    let lock = aml::Mutex::new("CPLK".into(), 0);
    let status = aml::Path::new("CSTA");

    // CSTS(cpu): its _STA.
    let read = aml::Store::new(&aml::Local(0), &status);
    let steps = Selected { cpu: &aml::Arg(0), body: vec![&read] };
    let enabled = aml::And::new(&aml::Local(1), &aml::Local(0), &ENABLED);
    let present = aml::Return::new(&STA_PRESENT);
    let is_enabled = aml::NotEqual::new(&aml::Local(1), &aml::ZERO);
    let when_enabled = aml::If::new(&is_enabled, vec![&present]);
    let absent = aml::Return::new(&aml::ZERO);
    let csts = aml::Method::new("CSTS".into(), 1, true, vec![&steps, &enabled, &when_enabled, &absent]);

    // CEJ0(cpu): the guest has let it go.
    let eject = aml::Store::new(&status, &EJECTED);
    let steps = Selected { cpu: &aml::Arg(0), body: vec![&eject] };
    let cej0 = aml::Method::new("CEJ0".into(), 1, true, vec![&steps]);

    // CSCN: every vCPU's pending events, acknowledged, then notified.
    let cpu = aml::Local(0);
    let read = aml::Store::new(&aml::Local(1), &status);
    let scan_read = Selected { cpu: &cpu, body: vec![&read] };
    let ack_insert = aml::Store::new(&status, &INSERT_PENDING);
    let insert_ack = Selected { cpu: &cpu, body: vec![&ack_insert] };
    let ack_remove = aml::Store::new(&status, &REMOVE_PENDING);
    let remove_ack = Selected { cpu: &cpu, body: vec![&ack_remove] };
    let notify_path = format!("{CONTAINER}.CTFY");
    let notify_insert = aml::MethodCall::new(notify_path.as_str().into(), vec![&cpu, &DEVICE_CHECK]);
    let notify_remove = aml::MethodCall::new(notify_path.as_str().into(), vec![&cpu, &EJECT_REQUEST]);
    let insert_bit = aml::And::new(&aml::Local(2), &aml::Local(1), &INSERT_PENDING);
    let remove_bit = aml::And::new(&aml::Local(3), &aml::Local(1), &REMOVE_PENDING);
    let inserted = aml::NotEqual::new(&aml::Local(2), &aml::ZERO);
    let if_insert = aml::If::new(&inserted, vec![&insert_ack, &notify_insert]);
    let removed = aml::NotEqual::new(&aml::Local(3), &aml::ZERO);
    let if_remove = aml::If::new(&removed, vec![&remove_ack, &notify_remove]);
    let next = aml::Add::new(&cpu, &cpu, &aml::ONE);
    let loop_body: Vec<&dyn Aml> = vec![&scan_read, &insert_bit, &remove_bit, &if_insert, &if_remove, &next];
    let start = aml::Store::new(&cpu, &aml::ZERO);
    let more = aml::LessThan::new(&cpu, &max);
    let scan = aml::While::new(&more, loop_body);
    let cscn = aml::Method::new("CSCN".into(), 0, true, vec![&start, &scan]);

    aml::Device::new(CONTROLLER.into(), vec![&hid, &uid, &crs, &region, &field, &lock, &csts, &cej0, &cscn])
        .to_aml_bytes(body);
}

/// One processor device.
struct Processor(u8);

impl Aml for Processor {
    fn to_aml_bytes(&self, sink: &mut dyn acpi_tables::AmlSink) {
        let id = self.0;
        let hid = aml::Name::new("_HID".into(), &"ACPI0007");
        let uid = aml::Name::new("_UID".into(), &id);
        // Processor Local APIC: type 0, length 8, UID, APIC id, flags (enabled).
        let mat = aml::Name::new("_MAT".into(), &aml::BufferData::new(vec![0, 8, id, id, 1, 0, 0, 0]));
        let csts = format!("{CONTROLLER}.CSTS");
        let status = aml::MethodCall::new(csts.as_str().into(), vec![&id]);
        let return_status = aml::Return::new(&status);
        let sta = aml::Method::new("_STA".into(), 0, false, vec![&return_status]);
        let cej0 = format!("{CONTROLLER}.CEJ0");
        let eject = aml::MethodCall::new(cej0.as_str().into(), vec![&id]);
        let ej0 = aml::Method::new("_EJ0".into(), 1, false, vec![&eject]);
        aml::Device::new(cpu_name(id).as_str().into(), vec![&hid, &uid, &mat, &sta, &ej0]).to_aml_bytes(sink);
    }
}

/// `CTFY(cpu, event)`: one `If` per vCPU, since `Notify` needs it by name.
struct CpuNotifications(u8);

impl Aml for CpuNotifications {
    fn to_aml_bytes(&self, sink: &mut dyn acpi_tables::AmlSink) {
        for id in 0..self.0 {
            let name = aml::Path::new(&cpu_name(id));
            let notify = aml::Notify::new(&name, &aml::Arg(1));
            aml::If::new(&aml::Equal::new(&aml::Arg(0), &id), vec![&notify]).to_aml_bytes(sink);
        }
    }
}

/// Appends the controller and the processor container with `max` vCPUs.
pub fn append_cpu_hotplug_aml(max: u8, body: &mut Vec<u8>) {
    controller(max, body);
    let hid = aml::Name::new("_HID".into(), &"ACPI0010");
    let cid = aml::Name::new("_CID".into(), &aml::EISAName::new("PNP0A05"));
    let processors: Vec<Processor> = (0..max).map(Processor).collect();
    let notifications = CpuNotifications(max);
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
