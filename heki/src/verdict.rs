//! The one place heki decides: every access the VMM polices (a trapped vCPU
//! write, an instruction KVM could not emulate, device DMA, an MSR write, CR
//! values, a heki call) goes through `judge`, and the VMM only applies the
//! `Verdict` it returns. The record of a violation lives here too.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::pins::{CrViolation, MsrWriteVerdict, VcpuPins};
use crate::policy::Policy;
use crate::{MemoryProtections, SpanCheck, WriteCheck};

/// What kind of guest (or device) action broke a protection.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ViolationKind {
    /// A vCPU write to a protected page or byte.
    Write,
    /// A heki call from CPL != 0.
    Hypercall,
    /// A pinned CR bit found cleared.
    Cr,
    /// A write to a pinned MSR.
    Msr,
    /// A device (virtio) write to protected memory.
    DmaWrite,
    /// A device (or other host) access to memory the guest made private.
    PrivateAccess,
    /// A locked virtual range found translated other than it was locked
    /// (a changed or private page table).
    Translation,
    /// A pinned IDTR or GDTR found changed.
    DescriptorTable,
    /// Locked kernel text that differs from the image the VMM loaded,
    /// outside the sites the kernel rewrites at boot.
    ImageMismatch,
}

impl ViolationKind {
    pub const ALL: [ViolationKind; 9] = [
        ViolationKind::Write,
        ViolationKind::Hypercall,
        ViolationKind::Cr,
        ViolationKind::Msr,
        ViolationKind::DmaWrite,
        ViolationKind::PrivateAccess,
        ViolationKind::Translation,
        ViolationKind::DescriptorTable,
        ViolationKind::ImageMismatch,
    ];

    /// The name in events and JSON.
    pub fn as_str(self) -> &'static str {
        match self {
            ViolationKind::Write => "write",
            ViolationKind::Hypercall => "hypercall",
            ViolationKind::Cr => "cr",
            ViolationKind::Msr => "msr",
            ViolationKind::DmaWrite => "dma-write",
            ViolationKind::PrivateAccess => "private-access",
            ViolationKind::Translation => "translation",
            ViolationKind::DescriptorTable => "descriptor-table",
            ViolationKind::ImageMismatch => "image-mismatch",
        }
    }

    /// Dense index (0..9) for per-kind tables.
    pub fn index(self) -> usize {
        self as usize
    }
}

/// What the VMM does with one access.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Action {
    /// Nothing forbidden: perform it, report nothing.
    Allow,
    /// Drop the forbidden part, report, continue.
    Deny,
    /// Drop the forbidden part, report, pause the VM.
    DenyAndPause,
    /// Drop the forbidden part, report, stop the VM.
    DenyAndShutdown,
    /// Audit mode: perform all of it and report.
    AllowAndReport,
}

impl Action {
    /// The action for an access that breaks a protection under `policy`.
    pub fn for_violation(policy: Policy) -> Action {
        match policy {
            Policy::Deny => Action::Deny,
            Policy::Log => Action::AllowAndReport,
            Policy::Pause => Action::DenyAndPause,
            Policy::Shutdown => Action::DenyAndShutdown,
        }
    }

    /// Whether the forbidden part is carried out anyway.
    pub fn performs_forbidden_part(self) -> bool {
        matches!(self, Action::Allow | Action::AllowAndReport)
    }

    /// Whether a violation must be recorded.
    pub fn is_violation(self) -> bool {
        self != Action::Allow
    }

    /// What the VM as a whole does next.
    pub fn outcome(self) -> Outcome {
        match self {
            Action::DenyAndPause => Outcome::Pause,
            Action::DenyAndShutdown => Outcome::Shutdown,
            _ => Outcome::Continue,
        }
    }

    /// How the violation is recorded; `None` for `Allow`.
    pub fn recorded(self) -> Option<RecordedAction> {
        match self {
            Action::Allow => None,
            Action::Deny => Some(RecordedAction::Denied),
            Action::AllowAndReport => Some(RecordedAction::Logged),
            Action::DenyAndPause => Some(RecordedAction::Paused),
            Action::DenyAndShutdown => Some(RecordedAction::Shutdown),
        }
    }
}

/// What happens to the VM after a verdict.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    Continue,
    Pause,
    Shutdown,
}

/// The `action` field of a violation record.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RecordedAction {
    Denied,
    Logged,
    Paused,
    Shutdown,
    /// A pinned CR bit was set again (detect-and-restore under `deny`).
    Restored,
}

impl RecordedAction {
    pub fn as_str(self) -> &'static str {
        match self {
            RecordedAction::Denied => "denied",
            RecordedAction::Logged => "logged",
            RecordedAction::Paused => "paused",
            RecordedAction::Shutdown => "shutdown",
            RecordedAction::Restored => "restored",
        }
    }
}

/// One access the VMM asks heki about.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    /// A vCPU write that a read-only memslot turned into an exit (at most
    /// `MAX_CHECKED_WRITE` bytes are judged byte by byte).
    VcpuWrite { gpa: u64, len: usize },
    /// The run of a string instruction (`rep stos`/`rep movs`) in one page
    /// that the VMM completes itself after one element exited; judged byte
    /// by byte over its whole length.
    StringWrite { gpa: u64, len: usize },
    /// A vCPU write KVM could not emulate: the VMM cannot carry it out, so
    /// not even `log` performs it.
    UnemulableWrite { gpa: u64, len: usize },
    /// A device writing guest memory.
    DmaWrite { gpa: u64, len: u64 },
    /// A device reading guest memory.
    DmaRead { gpa: u64, len: u64 },
    /// A guest `wrmsr` to a filtered MSR.
    MsrWrite { index: u32, value: u64 },
    /// The control registers found on a vCPU.
    ControlRegisters { cr0: u64, cr4: u64 },
    /// A heki call made at this privilege level.
    Call { cpl: u8 },
    /// The descriptor-table registers found on a vCPU (base, limit).
    DescriptorTables { idtr: (u64, u16), gdtr: (u64, u16) },
    /// A locked translation as found from a vCPU's live CR3: `intact` when
    /// it still reaches the locked pages with the locked flags.
    Translation { intact: bool },
    /// Text being locked, compared with the loaded kernel image: `len`
    /// bytes at `offset` into the image differ outside the masked sites
    /// (`len == 0`: it matches).
    ImageText { offset: u64, len: u64 },
}

/// What the protections say about an access, before policy.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Breach {
    /// Nothing is broken.
    None,
    /// These bytes of a short write are forbidden.
    Bytes(WriteCheck),
    /// These bytes of a string instruction's run are forbidden.
    Span(SpanCheck),
    /// A device range overlaps protected memory.
    Range,
    /// A device range touches a private page.
    Private,
    /// A pinned MSR would change.
    Msr { pinned: u64 },
    /// Pinned CR bits were found cleared.
    Crs(Vec<CrViolation>),
    /// A heki call from user mode.
    Privilege,
    /// Pinned descriptor-table registers were found changed.
    Dtrs(Vec<crate::pins::DtrViolation>),
    /// A locked translation was found changed.
    Remapped,
    /// Locked text is not the loaded image's: `len` bytes at `offset`.
    NotImage { offset: u64, len: u64 },
}

/// What the VMM must do with one access.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Verdict {
    pub kind: ViolationKind,
    pub action: Action,
    pub breach: Breach,
    /// Whether the access can be performed at all (false for an instruction
    /// KVM could not emulate and for a refused heki call).
    performable: bool,
}

/// The state an access is judged against.
#[derive(Clone, Copy, Debug)]
pub struct Protections<'a> {
    pub memory: &'a MemoryProtections,
    /// The accessing vCPU's pins (none for devices).
    pub pins: Option<&'a VcpuPins>,
}

/// Judges one access: the only function that turns protections and policy
/// into what happens.
pub fn judge(access: Access, protections: Protections<'_>, policy: Policy) -> Verdict {
    let (kind, breach, performable) = match access {
        Access::VcpuWrite { gpa, len } => (ViolationKind::Write, bytes_breach(protections.memory, gpa, len), true),
        Access::StringWrite { gpa, len } => {
            let check = protections.memory.check_span(gpa, len);
            let breach = if check.forbidden_count() == 0 { Breach::None } else { Breach::Span(check) };
            (ViolationKind::Write, breach, true)
        }
        Access::UnemulableWrite { gpa, len } => {
            (ViolationKind::Write, bytes_breach(protections.memory, gpa, len), false)
        }
        // Private pages first: the host has no business there at all, and
        // cannot perform the access (its view has no such page), even to audit.
        Access::DmaWrite { gpa, len } | Access::DmaRead { gpa, len }
            if !protections.memory.private.range_shared(gpa, len) =>
        {
            (ViolationKind::PrivateAccess, Breach::Private, false)
        }
        Access::DmaWrite { gpa, len } => {
            let breach = if protections.memory.range_writable(gpa, len) { Breach::None } else { Breach::Range };
            (ViolationKind::DmaWrite, breach, true)
        }
        // Devices may read locked memory: a lock is about writes.
        Access::DmaRead { .. } => (ViolationKind::DmaWrite, Breach::None, true),
        Access::MsrWrite { index, value } => {
            let verdict = protections.pins.map_or(MsrWriteVerdict::NotPinned, |p| p.check_msr_write(index, value));
            let breach = match verdict {
                MsrWriteVerdict::Violation { pinned } => Breach::Msr { pinned },
                MsrWriteVerdict::NotPinned | MsrWriteVerdict::SameValue => Breach::None,
            };
            (ViolationKind::Msr, breach, true)
        }
        Access::ControlRegisters { cr0, cr4 } => {
            let found = protections.pins.map(|p| p.check_crs(cr0, cr4)).unwrap_or_default();
            (ViolationKind::Cr, if found.is_empty() { Breach::None } else { Breach::Crs(found) }, true)
        }
        Access::Call { cpl } => {
            (ViolationKind::Hypercall, if cpl == 0 { Breach::None } else { Breach::Privilege }, cpl == 0)
        }
        Access::DescriptorTables { idtr, gdtr } => {
            let found = protections.pins.map(|p| p.check_dtrs(idtr, gdtr)).unwrap_or_default();
            (ViolationKind::DescriptorTable, if found.is_empty() { Breach::None } else { Breach::Dtrs(found) }, true)
        }
        Access::Translation { intact } => {
            (ViolationKind::Translation, if intact { Breach::None } else { Breach::Remapped }, true)
        }
        // The lock itself goes through either way: the text is locked, the
        // violation says it is not the image's.
        Access::ImageText { offset, len } => {
            (ViolationKind::ImageMismatch, if len == 0 { Breach::None } else { Breach::NotImage { offset, len } }, true)
        }
    };
    let action = match (&breach, performable) {
        (Breach::None, _) => Action::Allow,
        // What cannot be performed is denied even in audit mode.
        (_, false) if policy == Policy::Log => Action::Deny,
        _ => Action::for_violation(policy),
    };
    Verdict { kind, action, breach, performable }
}

fn bytes_breach(memory: &MemoryProtections, gpa: u64, len: usize) -> Breach {
    let check = memory.check_write(gpa, len);
    if check.allowed() { Breach::None } else { Breach::Bytes(check) }
}

impl Verdict {
    pub fn is_violation(&self) -> bool {
        self.action.is_violation()
    }

    /// Whether the whole access is carried out.
    pub fn performs_access(&self) -> bool {
        self.performable && self.action.performs_forbidden_part()
    }

    pub fn outcome(&self) -> Outcome {
        self.action.outcome()
    }

    /// How the violation is recorded; a CR bit put back under `deny` is "restored".
    pub fn recorded(&self) -> Option<RecordedAction> {
        match (self.kind, self.action) {
            // Detect-and-restore: under `deny` the VMM puts the pinned value back.
            (ViolationKind::Cr | ViolationKind::DescriptorTable | ViolationKind::Translation, Action::Deny) => {
                Some(RecordedAction::Restored)
            }
            // Nothing to deny: the text is locked as found, and reported.
            (ViolationKind::ImageMismatch, Action::Deny) => Some(RecordedAction::Logged),
            (_, action) => action.recorded(),
        }
    }

    /// For a short write: the (offset, length) runs the VMM performs itself.
    pub fn bytes_to_apply(&self, len: usize) -> Vec<(usize, usize)> {
        match &self.breach {
            _ if self.performs_access() => {
                if len == 0 {
                    Vec::new()
                } else {
                    vec![(0, len)]
                }
            }
            Breach::Bytes(check) if self.performable => check.allowed_runs(),
            Breach::Span(check) if self.performable => check.allowed_runs(),
            _ => Vec::new(),
        }
    }

    /// Whether the VMM must put a pinned register or a locked translation
    /// back (every policy but `log`).
    pub fn restores(&self) -> bool {
        matches!(self.breach, Breach::Crs(_) | Breach::Dtrs(_) | Breach::Remapped)
            && !self.action.performs_forbidden_part()
    }

    /// For descriptor-table registers: the pinned values to write back.
    pub fn restored_dtrs(&self) -> Vec<crate::pins::DtrViolation> {
        match &self.breach {
            Breach::Dtrs(found) if !self.action.performs_forbidden_part() => found.clone(),
            _ => Vec::new(),
        }
    }

    /// For CR values: the registers to write back (pinned bits set again),
    /// unless audit mode leaves them.
    pub fn restored_crs(&self) -> Vec<CrViolation> {
        match &self.breach {
            Breach::Crs(found) if !self.action.performs_forbidden_part() => found.clone(),
            _ => Vec::new(),
        }
    }

    /// The violation record, with what is known from the verdict alone;
    /// the VMM adds vCPU, RIP and details.
    pub fn record(&self) -> Option<ViolationRecord> {
        let action = self.recorded()?;
        let mut record = ViolationRecord::new(self.kind, action);
        match &self.breach {
            Breach::Bytes(check) => {
                record.size = Some(u64::from(check.forbidden.count_ones()));
            }
            Breach::Span(check) => {
                record.size = Some(check.forbidden_count());
                record.length = Some(check.len as u64);
            }
            Breach::Msr { pinned } => {
                record.details.insert("pinned".into(), format!("{pinned:#x}"));
            }
            Breach::Crs(found) => {
                if let Some(first) = found.first() {
                    record.details.insert("register".into(), first.register.name().into());
                    record.details.insert("pinned".into(), format!("{:#x}", first.pinned));
                    record.details.insert("value".into(), format!("{:#x}", first.value));
                }
            }
            Breach::Dtrs(found) => {
                if let Some(first) = found.first() {
                    record.details.insert("register".into(), first.table.name().into());
                    // Bases as `pinned`/`value` (like a CR), limits beside them.
                    record.details.insert("pinned".into(), format!("{:#x}", first.pinned.0));
                    record.details.insert("value".into(), format!("{:#x}", first.value.0));
                    record.details.insert("pinned_limit".into(), format!("{:#x}", first.pinned.1));
                    record.details.insert("limit".into(), format!("{:#x}", first.value.1));
                }
            }
            Breach::NotImage { offset, len } => {
                record.size = Some(*len);
                record.details.insert("offset".into(), format!("{offset:#x}"));
            }
            Breach::None | Breach::Range | Breach::Private | Breach::Privilege | Breach::Remapped => {}
        }
        Some(record)
    }

    /// Offset of the first forbidden byte of a short write.
    pub fn first_forbidden(&self) -> Option<u64> {
        match &self.breach {
            Breach::Bytes(check) if check.forbidden != 0 => Some(u64::from(check.forbidden.trailing_zeros())),
            Breach::Span(check) => check.first_forbidden().map(|i| i as u64),
            _ => None,
        }
    }
}

/// One violation, as events and `vm.heki-violations` report it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ViolationRecord {
    /// Order of recording, from 1; 0 until the VMM records it.
    #[serde(default)]
    pub seq: u64,
    pub kind: ViolationKind,
    pub action: RecordedAction,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vcpu: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gpa: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rip: Option<u64>,
    /// Protected bytes the access tried to write (for writes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size: Option<u64>,
    /// For a string instruction completed by the VMM: all the bytes it
    /// wrote in this run, protected or not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub length: Option<u64>,
    /// Extra properties: device, register, MSR index, pinned value...
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub details: BTreeMap<String, String>,
}

impl ViolationRecord {
    /// A record with only kind and action; fill the rest as known.
    pub fn new(kind: ViolationKind, action: RecordedAction) -> Self {
        ViolationRecord {
            seq: 0,
            kind,
            action,
            vcpu: None,
            gpa: None,
            rip: None,
            size: None,
            length: None,
            details: BTreeMap::new(),
        }
    }

    /// The event properties: hex strings for addresses, as the event list documents.
    pub fn properties(&self) -> Vec<(&str, String)> {
        let mut props = vec![("kind", self.kind.as_str().to_string()), ("action", self.action.as_str().to_string())];
        if let Some(v) = self.vcpu {
            props.push(("vcpu", v.to_string()));
        }
        if let Some(g) = self.gpa {
            props.push(("gpa", format!("{g:#x}")));
        }
        if let Some(r) = self.rip {
            props.push(("rip", format!("{r:#x}")));
        }
        if let Some(s) = self.size {
            props.push(("size", s.to_string()));
        }
        if let Some(l) = self.length {
            props.push(("length", l.to_string()));
        }
        props.extend(self.details.iter().map(|(k, v)| (k.as_str(), v.clone())));
        props.push(("seq", self.seq.to_string()));
        props
    }
}

#[cfg(test)]
#[allow(clippy::arithmetic_side_effects)]
mod tests {
    use super::*;
    use crate::pins::ControlRegister;
    use crate::{Permissions, ProtectRange, RamLayout};

    const POLICIES: [Policy; 4] = [Policy::Deny, Policy::Log, Policy::Pause, Policy::Shutdown];
    const LSTAR: u32 = 0xc000_0082;

    /// Page 1 read-only, bytes 0x2004..0x2006 protected.
    fn memory() -> MemoryProtections {
        let mut m = MemoryProtections::default();
        let ro = Permissions::from_abi(1).expect("valid");
        m.protect_pages(&[ProtectRange { start: 1, end: 2, perms: ro }]).expect("valid");
        m.protect_bytes(&RamLayout { regions: vec![(0, 1 << 20)] }, 0x2004, 2).expect("valid");
        m
    }

    fn pins() -> VcpuPins {
        let mut p = VcpuPins::default();
        p.pin_cr(ControlRegister::Cr0, 1 << 16, 1 << 16).expect("WP is set");
        p.pin_msr(LSTAR, 0xffff_8000_0000_1000).expect("pinnable");
        p
    }

    fn judge_with(access: Access, policy: Policy) -> Verdict {
        let (m, p) = (memory(), pins());
        judge(access, Protections { memory: &m, pins: Some(&p) }, policy)
    }

    #[test]
    fn a_changed_translation_or_descriptor_table_is_restored_under_deny_and_reported_under_log() {
        let memory = MemoryProtections::default();
        let none = Protections { memory: &memory, pins: None };
        let intact = judge(Access::Translation { intact: true }, none, Policy::Deny);
        assert!(!intact.is_violation());
        let remapped = judge(Access::Translation { intact: false }, none, Policy::Deny);
        assert_eq!((remapped.kind, remapped.recorded()), (ViolationKind::Translation, Some(RecordedAction::Restored)));
        assert!(remapped.restores());
        let logged = judge(Access::Translation { intact: false }, none, Policy::Log);
        assert_eq!(logged.recorded(), Some(RecordedAction::Logged));
        assert!(!logged.restores(), "audit mode leaves it in place");
        let paused = judge(Access::Translation { intact: false }, none, Policy::Pause);
        assert_eq!((paused.outcome(), paused.restores()), (Outcome::Pause, true));

        let mut pins = VcpuPins::default();
        pins.pin_dtr(crate::pins::DescriptorTable::Idtr, (0x1000, 0xfff));
        let pinned = Protections { memory: &memory, pins: Some(&pins) };
        let moved = judge(Access::DescriptorTables { idtr: (0x8000, 0xfff), gdtr: (0, 0) }, pinned, Policy::Deny);
        assert_eq!(moved.kind, ViolationKind::DescriptorTable);
        assert_eq!(moved.restored_dtrs()[0].pinned, (0x1000, 0xfff));
        let record = moved.record().expect("a violation");
        assert_eq!(record.details["register"], "idtr");
        let same = judge(Access::DescriptorTables { idtr: (0x1000, 0xfff), gdtr: (0, 0) }, pinned, Policy::Deny);
        assert!(!same.is_violation());
    }

    #[test]
    fn an_allowed_access_is_performed_under_every_policy_and_not_recorded() {
        let allowed = [
            Access::VcpuWrite { gpa: 0x3000, len: 8 },
            Access::DmaWrite { gpa: 0x3000, len: 0x1000 },
            Access::DmaRead { gpa: 0x1000, len: 0x1000 },
            Access::MsrWrite { index: LSTAR, value: 0xffff_8000_0000_1000 },
            Access::MsrWrite { index: 0xc000_0081, value: 5 },
            Access::ControlRegisters { cr0: 1 << 16, cr4: 0 },
            Access::Call { cpl: 0 },
        ];
        for policy in POLICIES {
            for access in allowed {
                let v = judge_with(access, policy);
                assert_eq!(v.action, Action::Allow, "{access:?} {policy:?}");
                assert!(v.performs_access());
                assert_eq!(v.record(), None);
                assert_eq!(v.outcome(), Outcome::Continue);
            }
        }
    }

    #[test]
    fn every_kind_of_breach_follows_the_policy_the_same_way() {
        let breaches = [
            (Access::VcpuWrite { gpa: 0x1000, len: 4 }, ViolationKind::Write),
            (Access::DmaWrite { gpa: 0x1800, len: 0x1000 }, ViolationKind::DmaWrite),
            (Access::MsrWrite { index: LSTAR, value: 0xdead }, ViolationKind::Msr),
        ];
        let expected = [
            (Policy::Deny, false, Outcome::Continue, RecordedAction::Denied),
            (Policy::Log, true, Outcome::Continue, RecordedAction::Logged),
            (Policy::Pause, false, Outcome::Pause, RecordedAction::Paused),
            (Policy::Shutdown, false, Outcome::Shutdown, RecordedAction::Shutdown),
        ];
        for (access, kind) in breaches {
            for (policy, performs, outcome, recorded) in expected {
                let v = judge_with(access, policy);
                assert_eq!(v.kind, kind);
                assert_eq!(v.performs_access(), performs, "{access:?} {policy:?}");
                assert_eq!(v.outcome(), outcome, "{access:?} {policy:?}");
                assert_eq!(v.record().map(|r| r.action), Some(recorded), "{access:?} {policy:?}");
            }
        }
    }

    #[test]
    fn a_dma_write_touching_one_protected_byte_is_a_breach() {
        let v = judge_with(Access::DmaWrite { gpa: 0x2000, len: 5 }, Policy::Deny);
        assert_eq!(v.breach, Breach::Range);
        assert!(!judge_with(Access::DmaWrite { gpa: 0x2000, len: 4 }, Policy::Deny).is_violation());
    }

    #[test]
    fn a_dma_range_that_wraps_the_address_space_is_refused() {
        let v = judge_with(Access::DmaWrite { gpa: u64::MAX - 2, len: 8 }, Policy::Log);
        assert_eq!(v.breach, Breach::Range);
    }

    #[test]
    fn a_short_write_keeps_its_allowed_bytes_unless_policy_is_log() {
        for (policy, runs) in [
            (Policy::Deny, vec![(0, 4), (6, 2)]),
            (Policy::Pause, vec![(0, 4), (6, 2)]),
            (Policy::Shutdown, vec![(0, 4), (6, 2)]),
            (Policy::Log, vec![(0, 8)]),
        ] {
            let v = judge_with(Access::VcpuWrite { gpa: 0x2000, len: 8 }, policy);
            assert_eq!(v.bytes_to_apply(8), runs, "{policy:?}");
            assert_eq!(v.first_forbidden(), Some(4));
            assert_eq!(v.record().and_then(|r| r.size), Some(2));
        }
    }

    #[test]
    fn an_unemulable_write_is_never_performed_and_log_records_it_as_denied() {
        let v = judge_with(Access::UnemulableWrite { gpa: 0x1000, len: 16 }, Policy::Log);
        assert!(!v.performs_access());
        assert!(v.bytes_to_apply(16).is_empty());
        assert_eq!(v.record().map(|r| r.action), Some(RecordedAction::Denied));
        assert_eq!(
            judge_with(Access::UnemulableWrite { gpa: 0x1000, len: 16 }, Policy::Pause).outcome(),
            Outcome::Pause
        );
        assert!(!judge_with(Access::UnemulableWrite { gpa: 0x3000, len: 16 }, Policy::Deny).is_violation());
    }

    #[test]
    fn a_cleared_pinned_cr_bit_is_restored_except_in_audit_mode() {
        let cleared = Access::ControlRegisters { cr0: 0x11, cr4: 0 };
        let deny = judge_with(cleared, Policy::Deny);
        assert_eq!(deny.record().map(|r| r.action), Some(RecordedAction::Restored));
        assert_eq!(deny.restored_crs().first().map(|c| c.restored), Some(0x11 | 1 << 16));
        let log = judge_with(cleared, Policy::Log);
        assert_eq!(log.record().map(|r| r.action), Some(RecordedAction::Logged));
        assert!(log.restored_crs().is_empty());
        let pause = judge_with(cleared, Policy::Pause);
        assert_eq!((pause.outcome(), pause.restored_crs().len()), (Outcome::Pause, 1));
    }

    #[test]
    fn a_user_mode_call_is_refused_under_every_policy() {
        for policy in POLICIES {
            let v = judge_with(Access::Call { cpl: 3 }, policy);
            assert!(!v.performs_access(), "{policy:?}");
            assert_eq!(v.kind, ViolationKind::Hypercall);
        }
        let log = judge_with(Access::Call { cpl: 3 }, Policy::Log);
        assert_eq!(log.record().map(|r| r.action), Some(RecordedAction::Denied));
    }

    #[test]
    fn a_device_touching_a_private_page_is_refused_even_in_audit_mode() {
        let mut m = memory();
        m.private.enable();
        let ram = RamLayout { regions: vec![(0, 1 << 20)] };
        m.private.set_shared(&ram, 0x8000, 0x2000, 1).expect("share two pages");
        for policy in POLICIES {
            for access in [Access::DmaRead { gpa: 0x9000, len: 0x1001 }, Access::DmaWrite { gpa: 0x7fff, len: 2 }] {
                let v = judge(access, Protections { memory: &m, pins: None }, policy);
                assert_eq!((v.kind, &v.breach), (ViolationKind::PrivateAccess, &Breach::Private), "{access:?}");
                assert!(!v.performs_access(), "{policy:?}: the host view has no private page");
            }
        }
        let shared =
            judge(Access::DmaRead { gpa: 0x8000, len: 0x2000 }, Protections { memory: &m, pins: None }, Policy::Deny);
        assert_eq!(shared.action, Action::Allow);
    }

    #[test]
    fn sharing_never_weakens_a_lock() {
        let mut m = memory();
        m.private.enable();
        let ram = RamLayout { regions: vec![(0, 1 << 20)] };
        m.private.set_shared(&ram, 0x1000, 0x1000, 1).expect("share the locked page");
        let v = judge(Access::DmaWrite { gpa: 0x1000, len: 4 }, Protections { memory: &m, pins: None }, Policy::Deny);
        assert_eq!((v.kind, v.breach), (ViolationKind::DmaWrite, Breach::Range));
    }

    #[test]
    fn devices_have_no_pins_so_msr_and_cr_checks_pass() {
        let m = memory();
        let v =
            judge(Access::MsrWrite { index: LSTAR, value: 1 }, Protections { memory: &m, pins: None }, Policy::Deny);
        assert_eq!(v.action, Action::Allow);
    }

    #[test]
    fn locked_text_unlike_the_image_is_reported_under_every_policy_and_the_lock_stands() {
        assert_eq!(judge_with(Access::ImageText { offset: 0x40, len: 0 }, Policy::Shutdown).action, Action::Allow);
        for (policy, recorded, outcome) in [
            (Policy::Deny, RecordedAction::Logged, Outcome::Continue),
            (Policy::Log, RecordedAction::Logged, Outcome::Continue),
            (Policy::Pause, RecordedAction::Paused, Outcome::Pause),
            (Policy::Shutdown, RecordedAction::Shutdown, Outcome::Shutdown),
        ] {
            let v = judge_with(Access::ImageText { offset: 0x1234, len: 3 }, policy);
            assert_eq!((v.kind, v.outcome()), (ViolationKind::ImageMismatch, outcome), "{policy:?}");
            assert!(!v.restores());
            let record = v.record().expect("a violation");
            assert_eq!((record.action, record.size), (recorded, Some(3)), "{policy:?}");
            assert_eq!(record.details.get("offset").map(String::as_str), Some("0x1234"));
        }
    }

    #[test]
    fn a_string_run_is_judged_byte_by_byte_and_recorded_once_with_its_length() {
        // 0x1f00..0x2100: 256 bytes of the locked page 1, then 256 of page 2 with bytes 0x2004/5 locked.
        let v = judge_with(Access::StringWrite { gpa: 0x1f00, len: 512 }, Policy::Deny);
        assert_eq!(v.bytes_to_apply(512), vec![(256, 4), (262, 250)], "only unprotected bytes land");
        assert_eq!(v.first_forbidden(), Some(0));
        let record = v.record().expect("a violation");
        assert_eq!((record.kind, record.size, record.length), (ViolationKind::Write, Some(258), Some(512)));
        let logged = judge_with(Access::StringWrite { gpa: 0x1f00, len: 512 }, Policy::Log);
        assert_eq!(logged.bytes_to_apply(512), vec![(0, 512)], "log writes everything");
        let clean = judge_with(Access::StringWrite { gpa: 0x3000, len: 4096 }, Policy::Deny);
        assert!(!clean.is_violation());
        assert_eq!(clean.bytes_to_apply(4096), vec![(0, 4096)]);
    }

    #[test]
    fn records_serialize_with_the_documented_names() {
        let record = ViolationRecord {
            gpa: Some(16),
            seq: 3,
            ..ViolationRecord::new(ViolationKind::DmaWrite, RecordedAction::Denied)
        };
        let json = serde_json::to_string(&record).expect("serializable");
        assert_eq!(json, r#"{"seq":3,"kind":"dma-write","action":"denied","gpa":16}"#);
        let back: ViolationRecord = serde_json::from_str(&json).expect("round trip");
        assert_eq!(back, record);
        for kind in ViolationKind::ALL {
            assert_eq!(serde_json::to_string(&kind).expect("serializable"), format!("\"{}\"", kind.as_str()));
        }
        let props = record.properties();
        assert!(props.contains(&("gpa", "0x10".to_string())));
        assert!(props.contains(&("seq", "3".to_string())));
    }
}
