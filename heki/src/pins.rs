//! Register pins: control-register bits and syscall-entry MSRs a vCPU may no
//! longer change (PIN_CR, PIN_MSR).

use std::collections::BTreeMap;

use serde::Serialize;

/// CR0 bits that may be pinned: WP.
pub const CR0_PINNABLE: u64 = 1 << 16;
/// CR4 bits that may be pinned: UMIP, FSGSBASE, SMEP, SMAP, CET.
pub const CR4_PINNABLE: u64 = (1 << 11) | (1 << 16) | (1 << 20) | (1 << 21) | (1 << 23);
/// MSRs that may be pinned: SYSENTER_CS/ESP/EIP, EFER, STAR, LSTAR, CSTAR, SFMASK.
pub const PINNABLE_MSRS: [u32; 8] =
    [0x174, 0x175, 0x176, 0xc000_0080, 0xc000_0081, 0xc000_0082, 0xc000_0083, 0xc000_0084];

/// Why a pin request was refused (the guest gets -EINVAL for each).
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PinError {
    #[error("only CR0 and CR4 can be pinned")]
    UnknownRegister,
    #[error("the mask is empty or has bits that cannot be pinned")]
    BitsNotPinnable,
    #[error("a bit in the mask is not set on this vCPU now")]
    BitsNotSet,
    #[error("MSR {0:#x} cannot be pinned")]
    MsrNotPinnable(u32),
    #[error("descriptor table {0} is not 0 (IDTR) or 1 (GDTR)")]
    UnknownTable(u64),
}

/// Which control register.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ControlRegister {
    Cr0,
    Cr4,
}

impl ControlRegister {
    pub fn from_number(n: u64) -> Result<Self, PinError> {
        match n {
            0 => Ok(ControlRegister::Cr0),
            4 => Ok(ControlRegister::Cr4),
            _ => Err(PinError::UnknownRegister),
        }
    }

    fn pinnable(self) -> u64 {
        match self {
            ControlRegister::Cr0 => CR0_PINNABLE,
            ControlRegister::Cr4 => CR4_PINNABLE,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            ControlRegister::Cr0 => "cr0",
            ControlRegister::Cr4 => "cr4",
        }
    }
}

/// A pinned CR bit found cleared.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CrViolation {
    pub register: ControlRegister,
    pub pinned: u64,
    /// The value found.
    pub value: u64,
    /// The value with the pinned bits set again.
    pub restored: u64,
}

/// What a guest `wrmsr` to a pinned MSR amounts to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MsrWriteVerdict {
    /// Nobody pinned this MSR on this vCPU.
    NotPinned,
    /// The pinned value is written again: harmless.
    SameValue,
    /// Any other value: a violation.
    Violation { pinned: u64 },
}

/// The pins of one vCPU. They only ever grow until the guest reboots.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct VcpuPins {
    pub cr0: u64,
    pub cr4: u64,
    pub msrs: BTreeMap<u32, u64>,
    /// Pinned IDTR (base, limit).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub idtr: Option<(u64, u16)>,
    /// Pinned GDTR (base, limit).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gdtr: Option<(u64, u16)>,
}

/// The descriptor-table registers PIN_DTR can pin.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum DescriptorTable {
    Idtr,
    Gdtr,
}

impl DescriptorTable {
    /// PIN_DTR's arg0: 0 = IDTR, 1 = GDTR.
    pub fn from_number(n: u64) -> Result<Self, PinError> {
        match n {
            0 => Ok(DescriptorTable::Idtr),
            1 => Ok(DescriptorTable::Gdtr),
            _ => Err(PinError::UnknownTable(n)),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            DescriptorTable::Idtr => "idtr",
            DescriptorTable::Gdtr => "gdtr",
        }
    }
}

/// A pinned descriptor-table register found changed: (base, limit) pairs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DtrViolation {
    pub table: DescriptorTable,
    pub pinned: (u64, u16),
    pub value: (u64, u16),
}

impl VcpuPins {
    /// PIN_CR: every bit of `mask` must be pinnable and set in `current`.
    pub fn pin_cr(&mut self, register: ControlRegister, mask: u64, current: u64) -> Result<(), PinError> {
        if mask == 0 || mask & !register.pinnable() != 0 {
            return Err(PinError::BitsNotPinnable);
        }
        if current & mask != mask {
            return Err(PinError::BitsNotSet);
        }
        match register {
            ControlRegister::Cr0 => self.cr0 |= mask,
            ControlRegister::Cr4 => self.cr4 |= mask,
        }
        Ok(())
    }

    /// PIN_MSR: pins the MSR at its current value.
    pub fn pin_msr(&mut self, index: u32, current: u64) -> Result<(), PinError> {
        if !PINNABLE_MSRS.contains(&index) {
            return Err(PinError::MsrNotPinnable(index));
        }
        self.msrs.insert(index, current);
        Ok(())
    }

    /// Checks CR0/CR4 against the pins.
    pub fn check_crs(&self, cr0: u64, cr4: u64) -> Vec<CrViolation> {
        [(ControlRegister::Cr0, self.cr0, cr0), (ControlRegister::Cr4, self.cr4, cr4)]
            .into_iter()
            .filter(|(_, pinned, value)| value & pinned != *pinned)
            .map(|(register, pinned, value)| CrViolation { register, pinned, value, restored: value | pinned })
            .collect()
    }

    pub fn check_msr_write(&self, index: u32, value: u64) -> MsrWriteVerdict {
        match self.msrs.get(&index) {
            None => MsrWriteVerdict::NotPinned,
            Some(&pinned) if pinned == value => MsrWriteVerdict::SameValue,
            Some(&pinned) => MsrWriteVerdict::Violation { pinned },
        }
    }

    /// PIN_DTR: pins the register at its current base and limit.
    pub fn pin_dtr(&mut self, table: DescriptorTable, current: (u64, u16)) {
        match table {
            DescriptorTable::Idtr => self.idtr = Some(current),
            DescriptorTable::Gdtr => self.gdtr = Some(current),
        }
    }

    /// Checks IDTR and GDTR against the pins.
    pub fn check_dtrs(&self, idtr: (u64, u16), gdtr: (u64, u16)) -> Vec<DtrViolation> {
        [(DescriptorTable::Idtr, self.idtr, idtr), (DescriptorTable::Gdtr, self.gdtr, gdtr)]
            .into_iter()
            .filter_map(|(table, pinned, value)| {
                let pinned = pinned?;
                (pinned != value).then_some(DtrViolation { table, pinned, value })
            })
            .collect()
    }

    pub fn has_dtr_pins(&self) -> bool {
        self.idtr.is_some() || self.gdtr.is_some()
    }

    pub fn is_empty(&self) -> bool {
        self.cr0 == 0 && self.cr4 == 0 && self.msrs.is_empty() && !self.has_dtr_pins()
    }
}

#[cfg(test)]
#[allow(clippy::arithmetic_side_effects)]
mod tests {
    use super::*;

    const WP: u64 = 1 << 16;
    const SMEP: u64 = 1 << 20;
    const SMAP: u64 = 1 << 21;

    #[test]
    fn a_pinned_idtr_or_gdtr_that_changes_is_found_with_both_values() {
        let mut pins = VcpuPins::default();
        assert!(pins.check_dtrs((0x1000, 0xfff), (0x2000, 0x7f)).is_empty(), "nothing pinned yet");
        assert_eq!(DescriptorTable::from_number(2), Err(PinError::UnknownTable(2)));
        pins.pin_dtr(DescriptorTable::from_number(0).expect("idtr"), (0x1000, 0xfff));
        assert!(pins.check_dtrs((0x1000, 0xfff), (0x9000, 0x1)).is_empty(), "GDTR is not pinned");
        let found = pins.check_dtrs((0x5000, 0xfff), (0x2000, 0x7f));
        assert_eq!(
            found,
            [DtrViolation { table: DescriptorTable::Idtr, pinned: (0x1000, 0xfff), value: (0x5000, 0xfff) }]
        );
        // A limit change alone is a change too (a shorter IDT drops vectors).
        assert_eq!(pins.check_dtrs((0x1000, 0xff), (0, 0)).len(), 1);
        pins.pin_dtr(DescriptorTable::Gdtr, (0x2000, 0x7f));
        assert_eq!(pins.check_dtrs((0x5000, 0xfff), (0x3000, 0x7f)).len(), 2);
        assert!(!pins.is_empty());
    }

    #[test]
    fn pinning_a_set_bit_succeeds_and_accumulates() {
        let mut pins = VcpuPins::default();
        pins.pin_cr(ControlRegister::Cr4, SMEP, SMEP | SMAP).expect("SMEP is set");
        pins.pin_cr(ControlRegister::Cr4, SMAP, SMEP | SMAP).expect("SMAP is set");
        assert_eq!(pins.cr4, SMEP | SMAP);
    }

    #[test]
    fn pin_requests_are_validated() {
        let mut pins = VcpuPins::default();
        assert_eq!(ControlRegister::from_number(3), Err(PinError::UnknownRegister));
        assert_eq!(pins.pin_cr(ControlRegister::Cr0, 0, u64::MAX), Err(PinError::BitsNotPinnable));
        assert_eq!(pins.pin_cr(ControlRegister::Cr0, 1, u64::MAX), Err(PinError::BitsNotPinnable));
        assert_eq!(pins.pin_cr(ControlRegister::Cr0, WP, 0), Err(PinError::BitsNotSet));
        assert_eq!(pins.pin_msr(0x10, 0), Err(PinError::MsrNotPinnable(0x10)));
        assert!(pins.is_empty());
    }

    #[test]
    fn cleared_pinned_bit_is_reported_with_the_restored_value() {
        let mut pins = VcpuPins::default();
        pins.pin_cr(ControlRegister::Cr0, WP, 0x8001_0033).expect("WP set");
        assert!(pins.check_crs(0x8001_0033, 0).is_empty());
        let v = pins.check_crs(0x8000_0033, 0);
        assert_eq!(v.len(), 1);
        assert_eq!(v[0].register, ControlRegister::Cr0);
        assert_eq!(v[0].restored, 0x8001_0033);
    }

    #[test]
    fn msr_writes_are_judged_against_the_pinned_value() {
        let mut pins = VcpuPins::default();
        pins.pin_msr(0xc000_0082, 0xffff_8000_0000_1000).expect("LSTAR pinnable");
        assert_eq!(pins.check_msr_write(0xc000_0082, 0xffff_8000_0000_1000), MsrWriteVerdict::SameValue);
        assert_eq!(
            pins.check_msr_write(0xc000_0082, 0xdead),
            MsrWriteVerdict::Violation { pinned: 0xffff_8000_0000_1000 }
        );
        assert_eq!(pins.check_msr_write(0x176, 1), MsrWriteVerdict::NotPinned);
    }
}
