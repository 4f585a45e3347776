//! The DSDT side of a slot controller (`devices/hotplug_slots.rs`), shared
//! by CPU and memory hotplug: an I/O operation region over its select and
//! status registers, and the methods around it: the status a slot's `_STA`
//! returns, the eject its `_EJ0` writes, and the scan the Generic Event
//! Device's `_EVT` calls, which acknowledges each pending event and passes
//! it to a notify method that `Notify`s the slot's device by name.

use acpi_tables::Aml;
use acpi_tables::aml::{self, FieldAccessType, FieldEntry, FieldLockRule, FieldUpdateRule, OpRegionSpace};

use crate::devices::hotplug_slots::{EJECTED, ENABLED, INSERT_PENDING, REMOVE_PENDING};

/// ACPI notification values (ACPI 6.5, table 5.169).
pub const DEVICE_CHECK: u8 = 1;
pub const EJECT_REQUEST: u8 = 3;
/// `_STA` of an enabled slot: present, enabled, shown, functioning.
const STA_PRESENT: u8 = 0x0f;

/// One controller's names and registers; the four-letter names are its own
/// (`C…` for CPUs, `M…` for memory) so both live in one DSDT.
pub struct SlotController {
    /// The controller device, e.g. `\_SB_.CPHP`.
    pub path: &'static str,
    pub uid: u8,
    pub port: u16,
    pub len: u16,
    /// Operation region, lock, select and status fields.
    pub region: &'static str,
    pub lock: &'static str,
    pub select: [u8; 4],
    pub status: [u8; 4],
    /// Methods: status of slot n, eject of slot n, the scan.
    pub status_method: &'static str,
    pub eject_method: &'static str,
    pub scan_method: &'static str,
    /// `NTFY(slot, event)` of the slots' container, e.g. `\_SB_.CPUS.CTFY`.
    pub notify_method: &'static str,
    pub slots: u32,
}

/// Under the controller's lock: select `slot`, then `body`.
struct Selected<'a> {
    controller: &'a SlotController,
    slot: &'a dyn Aml,
    body: Vec<&'a dyn Aml>,
}

impl Aml for Selected<'_> {
    fn to_aml_bytes(&self, sink: &mut dyn acpi_tables::AmlSink) {
        aml::Acquire::new(self.controller.lock.into(), 0xffff).to_aml_bytes(sink);
        let select = field_name(&self.controller.select);
        aml::Store::new(&aml::Path::new(select), self.slot).to_aml_bytes(sink);
        for step in &self.body {
            step.to_aml_bytes(sink);
        }
        aml::Release::new(self.controller.lock.into()).to_aml_bytes(sink);
    }
}

fn field_name(name: &[u8; 4]) -> &str {
    std::str::from_utf8(name).unwrap_or("____")
}

impl SlotController {
    fn selected<'a>(&'a self, slot: &'a dyn Aml, body: Vec<&'a dyn Aml>) -> Selected<'a> {
        Selected { controller: self, slot, body }
    }

    /// The controller device with its region, fields and methods.
    pub fn append(&self, body: &mut Vec<u8>) {
        let hid = aml::Name::new("_HID".into(), &aml::EISAName::new("PNP0C02"));
        let uid = aml::Name::new("_UID".into(), &self.uid);
        let ports = aml::IO::new(self.port, self.port, 1, self.len as u8);
        let crs = aml::Name::new("_CRS".into(), &aml::ResourceTemplate::new(vec![&ports]));
        let region = aml::OpRegion::new(self.region.into(), OpRegionSpace::SystemIO, &self.port, &self.len);
        let field = aml::Field::new(
            self.region.into(),
            FieldAccessType::DWord,
            FieldLockRule::NoLock,
            FieldUpdateRule::Preserve,
            vec![FieldEntry::Named(self.select, 32), FieldEntry::Named(self.status, 32)],
        );
        let lock = aml::Mutex::new(self.lock.into(), 0);
        let status = aml::Path::new(field_name(&self.status));

        // Status of slot Arg0: its _STA.
        let read = aml::Store::new(&aml::Local(0), &status);
        let steps = self.selected(&aml::Arg(0), vec![&read]);
        let enabled = aml::And::new(&aml::Local(1), &aml::Local(0), &ENABLED);
        let present = aml::Return::new(&STA_PRESENT);
        let is_enabled = aml::NotEqual::new(&aml::Local(1), &aml::ZERO);
        let when_enabled = aml::If::new(&is_enabled, vec![&present]);
        let absent = aml::Return::new(&aml::ZERO);
        let status_method =
            aml::Method::new(self.status_method.into(), 1, true, vec![&steps, &enabled, &when_enabled, &absent]);

        // Eject of slot Arg0: the guest has let it go.
        let eject = aml::Store::new(&status, &EJECTED);
        let steps = self.selected(&aml::Arg(0), vec![&eject]);
        let eject_method = aml::Method::new(self.eject_method.into(), 1, true, vec![&steps]);

        // The scan: every slot's pending events, acknowledged, then notified.
        let slot = aml::Local(0);
        let read = aml::Store::new(&aml::Local(1), &status);
        let scan_read = self.selected(&slot, vec![&read]);
        let ack_insert = aml::Store::new(&status, &INSERT_PENDING);
        let insert_ack = self.selected(&slot, vec![&ack_insert]);
        let ack_remove = aml::Store::new(&status, &REMOVE_PENDING);
        let remove_ack = self.selected(&slot, vec![&ack_remove]);
        let notify_insert = aml::MethodCall::new(self.notify_method.into(), vec![&slot, &DEVICE_CHECK]);
        let notify_remove = aml::MethodCall::new(self.notify_method.into(), vec![&slot, &EJECT_REQUEST]);
        let insert_bit = aml::And::new(&aml::Local(2), &aml::Local(1), &INSERT_PENDING);
        let remove_bit = aml::And::new(&aml::Local(3), &aml::Local(1), &REMOVE_PENDING);
        let inserted = aml::NotEqual::new(&aml::Local(2), &aml::ZERO);
        let if_insert = aml::If::new(&inserted, vec![&insert_ack, &notify_insert]);
        let removed = aml::NotEqual::new(&aml::Local(3), &aml::ZERO);
        let if_remove = aml::If::new(&removed, vec![&remove_ack, &notify_remove]);
        let next = aml::Add::new(&slot, &slot, &aml::ONE);
        let loop_body: Vec<&dyn Aml> = vec![&scan_read, &insert_bit, &remove_bit, &if_insert, &if_remove, &next];
        let start = aml::Store::new(&slot, &aml::ZERO);
        let more = aml::LessThan::new(&slot, &self.slots);
        let scan = aml::While::new(&more, loop_body);
        let scan_method = aml::Method::new(self.scan_method.into(), 0, true, vec![&start, &scan]);

        aml::Device::new(
            self.path.into(),
            vec![&hid, &uid, &crs, &region, &field, &lock, &status_method, &eject_method, &scan_method],
        )
        .to_aml_bytes(body);
    }

    /// `path.method` (a method of the controller, for the slots' devices).
    pub fn method(&self, method: &str) -> String {
        format!("{}.{method}", self.path)
    }
}

/// `NTFY(slot, event)`: one `If` per slot, since `Notify` needs the slot's
/// device by name (`name(slot)`).
pub struct SlotNotifications {
    pub slots: u32,
    pub name: fn(u32) -> String,
}

impl Aml for SlotNotifications {
    fn to_aml_bytes(&self, sink: &mut dyn acpi_tables::AmlSink) {
        for slot in 0..self.slots {
            let name = aml::Path::new(&(self.name)(slot));
            let notify = aml::Notify::new(&name, &aml::Arg(1));
            aml::If::new(&aml::Equal::new(&aml::Arg(0), &slot), vec![&notify]).to_aml_bytes(sink);
        }
    }
}
