//! From policy and a write check to what the VMM does, and the record of a
//! violation that goes to events and the REST API.

use serde::{Deserialize, Serialize};

use crate::WriteCheck;
use crate::policy::Policy;

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
}

impl ViolationKind {
    pub const ALL: [ViolationKind; 5] = [
        ViolationKind::Write,
        ViolationKind::Hypercall,
        ViolationKind::Cr,
        ViolationKind::Msr,
        ViolationKind::DmaWrite,
    ];

    /// The name in events and JSON.
    pub fn as_str(self) -> &'static str {
        match self {
            ViolationKind::Write => "write",
            ViolationKind::Hypercall => "hypercall",
            ViolationKind::Cr => "cr",
            ViolationKind::Msr => "msr",
            ViolationKind::DmaWrite => "dma-write",
        }
    }

    /// Dense index (0..5) for per-kind tables.
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

/// The verdict on one trapped vCPU write.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WriteVerdict {
    pub action: Action,
    pub check: WriteCheck,
}

impl WriteVerdict {
    pub fn judge(policy: Policy, check: WriteCheck) -> WriteVerdict {
        let action = if check.allowed() { Action::Allow } else { Action::for_violation(policy) };
        WriteVerdict { action, check }
    }

    /// The (offset, length) runs of the write the VMM must perform itself.
    pub fn bytes_to_apply(&self) -> Vec<(usize, usize)> {
        if self.action.performs_forbidden_part() {
            if self.check.len == 0 { Vec::new() } else { vec![(0, self.check.len)] }
        } else {
            self.check.allowed_runs()
        }
    }

    /// How many bytes a protection forbids (reported as the violation's size).
    pub fn forbidden_bytes(&self) -> u64 {
        u64::from(self.check.forbidden.count_ones())
    }

    /// Offset of the first forbidden byte (reported as the violation's gpa).
    pub fn first_forbidden(&self) -> Option<u64> {
        (self.check.forbidden != 0).then(|| u64::from(self.check.forbidden.trailing_zeros()))
    }

    /// The violation record, if this write is one.
    pub fn record(&self, vcpu: u32, gpa: u64, rip: Option<u64>) -> Option<ViolationRecord> {
        let action = self.action.recorded()?;
        let offset = self.first_forbidden()?;
        Some(ViolationRecord {
            kind: ViolationKind::Write,
            action,
            vcpu: Some(vcpu),
            gpa: Some(gpa.wrapping_add(offset)),
            rip,
            size: Some(self.forbidden_bytes()),
        })
    }
}

/// One violation, as events and `vm.heki-violations` report it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ViolationRecord {
    pub kind: ViolationKind,
    pub action: RecordedAction,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vcpu: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gpa: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rip: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size: Option<u64>,
}

impl ViolationRecord {
    /// A record with only kind and action; fill the rest as known.
    pub fn new(kind: ViolationKind, action: RecordedAction) -> Self {
        ViolationRecord { kind, action, vcpu: None, gpa: None, rip: None, size: None }
    }

    /// A heki call from user mode (the call itself fails with -EPERM).
    pub fn unprivileged_call(policy: Policy, vcpu: u32, rip: u64) -> Self {
        let action = Action::for_violation(policy).recorded().unwrap_or(RecordedAction::Denied);
        ViolationRecord { vcpu: Some(vcpu), rip: Some(rip), ..ViolationRecord::new(ViolationKind::Hypercall, action) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(forbidden: u64, len: usize) -> WriteCheck {
        WriteCheck { forbidden, len }
    }

    #[test]
    fn an_allowed_write_is_applied_whole_under_every_policy() {
        for policy in [Policy::Deny, Policy::Log, Policy::Pause, Policy::Shutdown] {
            let v = WriteVerdict::judge(policy, check(0, 8));
            assert_eq!(v.action, Action::Allow);
            assert_eq!(v.bytes_to_apply(), vec![(0, 8)]);
            assert_eq!(v.record(0, 0x1000, None), None);
        }
    }

    #[test]
    fn forbidden_bytes_are_dropped_unless_policy_is_log() {
        let forbidden = check(0b0011_0000, 8);
        let expected = [
            (Policy::Deny, Action::Deny, vec![(0, 4), (6, 2)]),
            (Policy::Pause, Action::DenyAndPause, vec![(0, 4), (6, 2)]),
            (Policy::Shutdown, Action::DenyAndShutdown, vec![(0, 4), (6, 2)]),
            (Policy::Log, Action::AllowAndReport, vec![(0, 8)]),
        ];
        for (policy, action, runs) in expected {
            let v = WriteVerdict::judge(policy, forbidden);
            assert_eq!(v.action, action, "{policy:?}");
            assert_eq!(v.bytes_to_apply(), runs, "{policy:?}");
        }
    }

    #[test]
    fn a_fully_forbidden_write_applies_nothing() {
        let v = WriteVerdict::judge(Policy::Deny, check(0xff, 8));
        assert!(v.bytes_to_apply().is_empty());
    }

    #[test]
    fn the_record_points_at_the_first_forbidden_byte() {
        let v = WriteVerdict::judge(Policy::Pause, check(0b0111_0000, 8));
        let record = v.record(2, 0x3ffc, Some(0xffff_8000_0000_1234)).expect("a violation");
        assert_eq!(record.kind, ViolationKind::Write);
        assert_eq!(record.action, RecordedAction::Paused);
        assert_eq!(record.gpa, Some(0x4000));
        assert_eq!(record.size, Some(3));
        assert_eq!(record.vcpu, Some(2));
    }

    #[test]
    fn records_serialize_with_the_documented_names() {
        let record =
            ViolationRecord { gpa: Some(16), ..ViolationRecord::new(ViolationKind::DmaWrite, RecordedAction::Denied) };
        let json = serde_json::to_string(&record).expect("serializable");
        assert_eq!(json, r#"{"kind":"dma-write","action":"denied","gpa":16}"#);
        let back: ViolationRecord = serde_json::from_str(&json).expect("round trip");
        assert_eq!(back, record);
        for kind in ViolationKind::ALL {
            assert_eq!(serde_json::to_string(&kind).expect("serializable"), format!("\"{}\"", kind.as_str()));
        }
        assert_eq!(serde_json::to_string(&RecordedAction::Restored).expect("serializable"), "\"restored\"");
    }

    #[test]
    fn an_unprivileged_call_is_recorded_per_policy() {
        let r = ViolationRecord::unprivileged_call(Policy::Log, 1, 0x40_1000);
        assert_eq!((r.kind, r.action, r.rip), (ViolationKind::Hypercall, RecordedAction::Logged, Some(0x40_1000)));
        assert_eq!(ViolationRecord::unprivileged_call(Policy::Deny, 0, 0).action, RecordedAction::Denied);
    }
}
