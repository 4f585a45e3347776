//! Register sets in our own types, converted to and from KVM's at the boundary.

use kvm_bindings::{kvm_dtable, kvm_regs, kvm_segment, kvm_sregs};

/// General-purpose registers, instruction pointer and flags.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Regs {
    pub rax: u64,
    pub rbx: u64,
    pub rcx: u64,
    pub rdx: u64,
    pub rsi: u64,
    pub rdi: u64,
    pub rsp: u64,
    pub rbp: u64,
    pub r8: u64,
    pub r9: u64,
    pub r10: u64,
    pub r11: u64,
    pub r12: u64,
    pub r13: u64,
    pub r14: u64,
    pub r15: u64,
    pub rip: u64,
    pub rflags: u64,
}

/// A segment register with its hidden descriptor part.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Segment {
    pub base: u64,
    pub limit: u32,
    pub selector: u16,
    pub type_: u8,
    pub present: u8,
    pub dpl: u8,
    pub db: u8,
    pub s: u8,
    pub l: u8,
    pub g: u8,
    pub avl: u8,
    pub unusable: u8,
}

/// GDTR / IDTR.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DescriptorTable {
    pub base: u64,
    pub limit: u16,
}

/// Segment, control and system registers.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SpecialRegs {
    pub cs: Segment,
    pub ds: Segment,
    pub es: Segment,
    pub fs: Segment,
    pub gs: Segment,
    pub ss: Segment,
    pub tr: Segment,
    pub ldt: Segment,
    pub gdt: DescriptorTable,
    pub idt: DescriptorTable,
    pub cr0: u64,
    pub cr2: u64,
    pub cr3: u64,
    pub cr4: u64,
    pub cr8: u64,
    pub efer: u64,
    pub apic_base: u64,
}

impl SpecialRegs {
    /// The current privilege level: the DPL of the code segment.
    pub fn cpl(&self) -> u8 {
        self.cs.dpl
    }
}

macro_rules! copy_fields {
    ($dst:ident, $src:ident; $($f:ident),*) => {
        $( $dst.$f = $src.$f; )*
    };
}

impl From<kvm_regs> for Regs {
    fn from(k: kvm_regs) -> Self {
        let mut r = Regs::default();
        copy_fields!(r, k; rax, rbx, rcx, rdx, rsi, rdi, rsp, rbp, r8, r9, r10, r11, r12, r13, r14, r15, rip, rflags);
        r
    }
}

impl From<Regs> for kvm_regs {
    fn from(r: Regs) -> Self {
        let mut k = kvm_regs::default();
        copy_fields!(k, r; rax, rbx, rcx, rdx, rsi, rdi, rsp, rbp, r8, r9, r10, r11, r12, r13, r14, r15, rip, rflags);
        k
    }
}

impl From<kvm_segment> for Segment {
    fn from(k: kvm_segment) -> Self {
        let mut s = Segment::default();
        copy_fields!(s, k; base, limit, selector, present, dpl, db, s, l, g, avl, unusable);
        s.type_ = k.type_;
        s
    }
}

impl From<Segment> for kvm_segment {
    fn from(s: Segment) -> Self {
        let mut k = kvm_segment::default();
        copy_fields!(k, s; base, limit, selector, present, dpl, db, s, l, g, avl, unusable);
        k.type_ = s.type_;
        k
    }
}

impl From<kvm_dtable> for DescriptorTable {
    fn from(k: kvm_dtable) -> Self {
        DescriptorTable { base: k.base, limit: k.limit }
    }
}

impl From<DescriptorTable> for kvm_dtable {
    fn from(d: DescriptorTable) -> Self {
        kvm_dtable { base: d.base, limit: d.limit, ..Default::default() }
    }
}

impl From<kvm_sregs> for SpecialRegs {
    fn from(k: kvm_sregs) -> Self {
        SpecialRegs {
            cs: k.cs.into(),
            ds: k.ds.into(),
            es: k.es.into(),
            fs: k.fs.into(),
            gs: k.gs.into(),
            ss: k.ss.into(),
            tr: k.tr.into(),
            ldt: k.ldt.into(),
            gdt: k.gdt.into(),
            idt: k.idt.into(),
            cr0: k.cr0,
            cr2: k.cr2,
            cr3: k.cr3,
            cr4: k.cr4,
            cr8: k.cr8,
            efer: k.efer,
            apic_base: k.apic_base,
        }
    }
}

/// Writes our fields over a KVM struct, keeping what we do not model
/// (the pending-interrupt bitmap).
pub(crate) fn merge_sregs(k: &mut kvm_sregs, s: &SpecialRegs) {
    k.cs = s.cs.into();
    k.ds = s.ds.into();
    k.es = s.es.into();
    k.fs = s.fs.into();
    k.gs = s.gs.into();
    k.ss = s.ss.into();
    k.tr = s.tr.into();
    k.ldt = s.ldt.into();
    k.gdt = s.gdt.into();
    k.idt = s.idt.into();
    k.cr0 = s.cr0;
    k.cr2 = s.cr2;
    k.cr3 = s.cr3;
    k.cr4 = s.cr4;
    k.cr8 = s.cr8;
    k.efer = s.efer;
    k.apic_base = s.apic_base;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn regs_round_trip_through_kvm_layout() {
        let regs = Regs { rax: 1, rbx: 2, rsi: 3, r15: 4, rip: 0x1000, rflags: 2, ..Default::default() };
        assert_eq!(Regs::from(kvm_regs::from(regs)), regs);
    }

    #[test]
    fn sregs_merge_keeps_fields_and_reports_cpl() {
        let mut ours = SpecialRegs::from(kvm_sregs::default());
        ours.cs.dpl = 3;
        ours.cr0 = 0x8001_0033;
        let mut k = kvm_sregs::default();
        k.interrupt_bitmap[0] = 7;
        merge_sregs(&mut k, &ours);
        assert_eq!(k.interrupt_bitmap[0], 7);
        assert_eq!(SpecialRegs::from(k), ours);
        assert_eq!(ours.cpl(), 3);
    }
}
