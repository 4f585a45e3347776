//! Exact violation counts per kind. Never rate-limited: events may be
//! summarised, the counts are not.

use serde::{Deserialize, Serialize};

use crate::verdict::ViolationKind;

/// One counter per violation kind; serializes with every kind present.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ViolationCounters {
    pub write: u64,
    pub hypercall: u64,
    pub cr: u64,
    pub msr: u64,
    #[serde(rename = "dma-write")]
    pub dma_write: u64,
    #[serde(rename = "private-access")]
    pub private_access: u64,
    pub translation: u64,
    #[serde(rename = "descriptor-table")]
    pub descriptor_table: u64,
    #[serde(rename = "image-mismatch")]
    pub image_mismatch: u64,
}

impl ViolationCounters {
    fn slot(&mut self, kind: ViolationKind) -> &mut u64 {
        match kind {
            ViolationKind::Write => &mut self.write,
            ViolationKind::Hypercall => &mut self.hypercall,
            ViolationKind::Cr => &mut self.cr,
            ViolationKind::Msr => &mut self.msr,
            ViolationKind::DmaWrite => &mut self.dma_write,
            ViolationKind::PrivateAccess => &mut self.private_access,
            ViolationKind::Translation => &mut self.translation,
            ViolationKind::DescriptorTable => &mut self.descriptor_table,
            ViolationKind::ImageMismatch => &mut self.image_mismatch,
        }
    }

    pub fn record(&mut self, kind: ViolationKind) {
        let slot = self.slot(kind);
        *slot = slot.saturating_add(1);
    }

    pub fn get(&self, kind: ViolationKind) -> u64 {
        match kind {
            ViolationKind::Write => self.write,
            ViolationKind::Hypercall => self.hypercall,
            ViolationKind::Cr => self.cr,
            ViolationKind::Msr => self.msr,
            ViolationKind::DmaWrite => self.dma_write,
            ViolationKind::PrivateAccess => self.private_access,
            ViolationKind::Translation => self.translation,
            ViolationKind::DescriptorTable => self.descriptor_table,
            ViolationKind::ImageMismatch => self.image_mismatch,
        }
    }

    pub fn total(&self) -> u64 {
        ViolationKind::ALL.iter().map(|k| self.get(*k)).fold(0, u64::saturating_add)
    }
}

#[cfg(test)]
#[allow(clippy::arithmetic_side_effects)]
mod tests {
    use super::*;

    #[test]
    fn each_kind_counts_separately() {
        let mut counters = ViolationCounters::default();
        for _ in 0..3 {
            counters.record(ViolationKind::Write);
        }
        counters.record(ViolationKind::DmaWrite);
        assert_eq!(counters.get(ViolationKind::Write), 3);
        assert_eq!(counters.get(ViolationKind::DmaWrite), 1);
        assert_eq!(counters.get(ViolationKind::Msr), 0);
        assert_eq!(counters.total(), 4);
    }

    #[test]
    fn serializes_every_kind_by_its_event_name() {
        let mut counters = ViolationCounters::default();
        counters.record(ViolationKind::Hypercall);
        let json = serde_json::to_string(&counters).expect("serializable");
        assert_eq!(
            json,
            r#"{"write":0,"hypercall":1,"cr":0,"msr":0,"dma-write":0,"private-access":0,"translation":0,"descriptor-table":0,"image-mismatch":0}"#
        );
    }
}
