//! Initial register state of the boot vCPU for each entry protocol.

use hypervisor::{DescriptorTable, Regs, Segment, SpecialRegs, efer};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::boot::EntryPoint;
use crate::layout::{
    BOOT_GDT_START, BOOT_IDT_START, BOOT_PDE_START, BOOT_PDPTE_START, BOOT_PML4_START, BOOT_STACK_POINTER,
};

const CR0_PE: u64 = 1 << 0;
const CR0_ET: u64 = 1 << 4;
const CR0_PG: u64 = 1 << 31;
const CR4_PAE: u64 = 1 << 5;
const RFLAGS_RESERVED: u64 = 1 << 1;

/// GDT slots: null, unused, code (0x10), data (0x18), TSS (0x20).
const CODE_SELECTOR: u16 = 0x10;
const DATA_SELECTOR: u16 = 0x18;
const TSS_SELECTOR: u16 = 0x20;

/// Packs a segment into an 8-byte GDT descriptor.
fn gdt_entry(seg: &Segment) -> u64 {
    let base = seg.base;
    let limit = u64::from(if seg.g != 0 { seg.limit >> 12 } else { seg.limit });
    let access =
        u64::from(seg.type_) | (u64::from(seg.s) << 4) | (u64::from(seg.dpl) << 5) | (u64::from(seg.present) << 7);
    let flags = (u64::from(seg.avl)) | (u64::from(seg.l) << 1) | (u64::from(seg.db) << 2) | (u64::from(seg.g) << 3);
    (limit & 0xffff)
        | ((base & 0xff_ffff) << 16)
        | (access << 40)
        | (((limit >> 16) & 0xf) << 48)
        | (flags << 52)
        | (((base >> 24) & 0xff) << 56)
}

fn flat_segment(selector: u16, type_: u8, long_mode: bool) -> Segment {
    Segment {
        base: 0,
        limit: 0xffff_ffff,
        selector,
        type_,
        present: 1,
        dpl: 0,
        db: u8::from(!long_mode || type_ < 8),
        s: 1,
        l: u8::from(long_mode && type_ >= 8),
        g: 1,
        avl: 0,
        unusable: 0,
    }
}

fn tss_segment() -> Segment {
    // A 32-bit busy TSS: KVM refuses to enter the guest with an unusable TR.
    Segment { base: 0, limit: 0x67, selector: TSS_SELECTOR, type_: 11, present: 1, ..Default::default() }
}

/// Sets registers for `entry` and writes the GDT (and, for 64-bit entry,
/// identity page tables) to guest memory.
pub fn boot_registers(
    mem: &GuestMemoryMmap,
    entry: EntryPoint,
    base: SpecialRegs,
) -> Result<(Regs, SpecialRegs), vm_memory::GuestMemoryError> {
    let long_mode = matches!(entry, EntryPoint::Linux64 { .. });
    let code = flat_segment(CODE_SELECTOR, 0xb, long_mode);
    let data = flat_segment(DATA_SELECTOR, 0x3, long_mode);
    let tss = tss_segment();
    let gdt = [0u64, 0, gdt_entry(&code), gdt_entry(&data), gdt_entry(&tss)];
    for (i, desc) in gdt.iter().enumerate() {
        mem.write_obj(*desc, GuestAddress(BOOT_GDT_START + 8 * i as u64))?;
    }
    mem.write_obj(0u64, GuestAddress(BOOT_IDT_START))?;

    let mut sregs = base;
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = tss;
    sregs.gdt = DescriptorTable { base: BOOT_GDT_START, limit: (gdt.len() * 8 - 1) as u16 };
    sregs.idt = DescriptorTable { base: BOOT_IDT_START, limit: 7 };

    let mut regs = Regs { rflags: RFLAGS_RESERVED, ..Default::default() };
    match entry {
        EntryPoint::Pvh { entry, start_info } => {
            sregs.cr0 = CR0_PE | CR0_ET;
            sregs.cr4 = 0;
            sregs.efer = 0;
            regs.rip = entry;
            regs.rbx = start_info;
        }
        EntryPoint::Linux64 { entry, boot_params } => {
            write_identity_page_tables(mem)?;
            sregs.cr3 = BOOT_PML4_START;
            sregs.cr4 = CR4_PAE;
            sregs.cr0 = CR0_PE | CR0_ET | CR0_PG;
            sregs.efer = efer::LME | efer::LMA;
            regs.rip = entry;
            regs.rsi = boot_params;
            regs.rsp = BOOT_STACK_POINTER;
            regs.rbp = BOOT_STACK_POINTER;
        }
    }
    Ok((regs, sregs))
}

/// Identity-maps the first 1 GiB with 2 MiB pages, as the 64-bit boot protocol requires.
fn write_identity_page_tables(mem: &GuestMemoryMmap) -> Result<(), vm_memory::GuestMemoryError> {
    const PRESENT_RW: u64 = 0x3;
    const HUGE: u64 = 0x80;
    mem.write_obj(BOOT_PDPTE_START | PRESENT_RW, GuestAddress(BOOT_PML4_START))?;
    mem.write_obj(BOOT_PDE_START | PRESENT_RW, GuestAddress(BOOT_PDPTE_START))?;
    for i in 0..512u64 {
        mem.write_obj((i << 21) | PRESENT_RW | HUGE, GuestAddress(BOOT_PDE_START + i * 8))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flat_code_descriptor_matches_the_architectural_encoding() {
        // 0x00cf9b000000ffff: base 0, limit 0xfffff, G, D, present, code execute/read accessed.
        assert_eq!(gdt_entry(&flat_segment(CODE_SELECTOR, 0xb, false)), 0x00cf_9b00_0000_ffff);
        // 64-bit code: L set, D clear.
        assert_eq!(gdt_entry(&flat_segment(CODE_SELECTOR, 0xb, true)), 0x00af_9b00_0000_ffff);
    }

    #[test]
    fn pvh_entry_starts_in_protected_mode_with_start_info_in_rbx() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).expect("test memory");
        let (regs, sregs) =
            boot_registers(&mem, EntryPoint::Pvh { entry: 0x100000, start_info: 0x6000 }, SpecialRegs::default())
                .expect("boot registers");
        assert_eq!(regs.rip, 0x100000);
        assert_eq!(regs.rbx, 0x6000);
        assert_eq!(sregs.cr0 & (CR0_PE | CR0_PG), CR0_PE);
        assert_eq!(sregs.tr.type_, 11);
    }
}
