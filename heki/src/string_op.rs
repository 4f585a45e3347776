//! A `rep stos`/`rep movs` that writes a trapped page exits once per
//! element. To make it cost O(1) exits per page, the VMM completes the rest
//! of the instruction's run in that page itself. This module is the pure
//! part: it decodes the instruction (iced-x86), checks that it is the one
//! whose element just exited, and computes which elements remain in the
//! page and the registers after them, exactly as the CPU would.
//!
//! Only 64-bit mode is handled (64- or 32-bit address size); everything else
//! is `None`, and the VMM keeps the one-exit-per-element path.
// Guest-supplied numbers: no unchecked arithmetic here.
#![deny(clippy::arithmetic_side_effects)]

use iced_x86::{Code, Decoder, DecoderOptions, OpKind, Register};

use crate::{PAGE_SHIFT, PAGE_SIZE};

/// EFLAGS.TF: single-stepping traps after each element, so never batch.
pub const RFLAGS_TF: u64 = 1 << 8;
/// EFLAGS.DF: elements go downwards.
pub const RFLAGS_DF: u64 = 1 << 10;

/// What the string instruction writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StringKind {
    /// `stos`: the low bytes of RAX.
    Store,
    /// `movs`: an element read at the source.
    Move { source: SourceSegment },
}

/// The segment of a `movs` source (only FS and GS have a base in 64-bit mode).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SourceSegment {
    Flat,
    Fs,
    Gs,
}

/// A decoded `rep stos`/`rep movs`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StringInsn {
    pub kind: StringKind,
    /// Bytes per element: 1, 2, 4 or 8.
    pub element: u8,
    /// 64, or 32 with the 0x67 prefix: RCX/RDI/RSI or ECX/EDI/ESI.
    pub address_bits: u8,
    /// Instruction length in bytes.
    pub length: u8,
}

impl StringInsn {
    pub fn mnemonic(&self) -> &'static str {
        match (self.kind, self.element) {
            (StringKind::Store, 1) => "rep stosb",
            (StringKind::Store, 2) => "rep stosw",
            (StringKind::Store, 4) => "rep stosd",
            (StringKind::Store, _) => "rep stosq",
            (StringKind::Move { .. }, 1) => "rep movsb",
            (StringKind::Move { .. }, 2) => "rep movsw",
            (StringKind::Move { .. }, 4) => "rep movsd",
            (StringKind::Move { .. }, _) => "rep movsq",
        }
    }

    fn mask(&self) -> u64 {
        if self.address_bits == 32 { u64::from(u32::MAX) } else { u64::MAX }
    }
}

/// Decodes `bytes` (read at the guest RIP, 64-bit mode): a REP-prefixed
/// `stos` or `movs`, or `None` for anything else (including LOCK, REPNE and
/// a truncated instruction).
pub fn decode_rep_string(bytes: &[u8]) -> Option<StringInsn> {
    let insn = Decoder::new(64, bytes, DecoderOptions::NONE).decode();
    if insn.is_invalid() || !insn.has_rep_prefix() || insn.has_repne_prefix() || insn.has_lock_prefix() {
        return None;
    }
    let (store, element) = match insn.code() {
        Code::Stosb_m8_AL => (true, 1),
        Code::Stosw_m16_AX => (true, 2),
        Code::Stosd_m32_EAX => (true, 4),
        Code::Stosq_m64_RAX => (true, 8),
        Code::Movsb_m8_m8 => (false, 1),
        Code::Movsw_m16_m16 => (false, 2),
        Code::Movsd_m32_m32 => (false, 4),
        Code::Movsq_m64_m64 => (false, 8),
        _ => return None,
    };
    let address_bits = match insn.op0_kind() {
        OpKind::MemoryESRDI => 64,
        OpKind::MemoryESEDI => 32,
        _ => return None,
    };
    let kind = if store {
        StringKind::Store
    } else {
        let source = match (insn.op1_kind(), insn.memory_segment()) {
            (OpKind::MemorySegRSI | OpKind::MemorySegESI, Register::FS) => SourceSegment::Fs,
            (OpKind::MemorySegRSI | OpKind::MemorySegESI, Register::GS) => SourceSegment::Gs,
            // ES, CS, SS, DS: base 0 in 64-bit mode.
            (OpKind::MemorySegRSI | OpKind::MemorySegESI, _) => SourceSegment::Flat,
            _ => return None,
        };
        StringKind::Move { source }
    };
    Some(StringInsn { kind, element, address_bits, length: u8::try_from(insn.len()).ok()? })
}

/// The registers a string instruction reads and writes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StringRegs {
    pub rcx: u64,
    pub rdi: u64,
    pub rsi: u64,
    pub rip: u64,
    pub rflags: u64,
}

/// The element that exited: where (guest physical) and how many bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ExitedWrite {
    pub gpa: u64,
    pub len: usize,
}

/// Elements of the instruction that remain in the page of the element that
/// exited, with the registers after them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StringChunk {
    /// Linear address of the element that exited (its GPA is the exit's).
    pub exited_dest: u64,
    /// ... and of its source, for `movs` (its page is where the chunk reads).
    pub exited_source: Option<u64>,
    /// Elements to complete after the exited one (at least 1).
    pub elements: u64,
    pub descending: bool,
    /// The registers once those elements are done: RIP moves past the
    /// instruction only when the count reaches zero.
    pub after: StringRegs,
}

impl StringChunk {
    /// Offset in the destination page of element `i` (0: the exited one).
    pub fn dest_offset(&self, element: u8, i: u64) -> u64 {
        step(self.exited_dest, element, i, self.descending) & (PAGE_SIZE - 1)
    }

    /// Offset in the source page of element `i` (0: the exited one).
    pub fn source_offset(&self, element: u8, i: u64) -> Option<u64> {
        self.exited_source.map(|s| step(s, element, i, self.descending) & (PAGE_SIZE - 1))
    }

    /// The destination bytes the chunk covers, the exited element included,
    /// as (page offset, length).
    pub fn dest_span(&self, element: u8) -> (u64, u64) {
        let last = self.dest_offset(element, self.elements);
        let first = self.dest_offset(element, 0);
        let low = first.min(last);
        let len = self.elements.saturating_add(1).saturating_mul(u64::from(element));
        (low, len)
    }
}

/// `base ± i * element`, wrapping like the address arithmetic it models
/// (callers keep every element inside one page, so no wrap happens there).
fn step(base: u64, element: u8, i: u64, descending: bool) -> u64 {
    let delta = i.wrapping_mul(u64::from(element));
    if descending { base.wrapping_sub(delta) } else { base.wrapping_add(delta) }
}

/// Writes `value` into `reg` as an `address_bits` register update does in
/// 64-bit mode: a 32-bit write zero-extends.
fn assign(value: u64, address_bits: u8) -> u64 {
    if address_bits == 32 { value & u64::from(u32::MAX) } else { value }
}

/// Plans the rest of `insn` given the registers after the element that
/// exited (KVM has already retired it: count decremented, pointers moved).
/// `source_base` is the FS or GS base when the source uses one.
///
/// `None` when the state does not fit that element having come from this
/// instruction (wrong size, another page offset, count already zero, a
/// trap flag) or when no whole element of it remains in the same page.
pub fn plan(insn: &StringInsn, regs: StringRegs, exited: ExitedWrite, source_base: u64) -> Option<StringChunk> {
    if regs.rflags & RFLAGS_TF != 0 || exited.len != usize::from(insn.element) {
        return None;
    }
    let mask = insn.mask();
    let size = u64::from(insn.element);
    let descending = regs.rflags & RFLAGS_DF != 0;
    let count = regs.rcx & mask;
    if count == 0 {
        // The exited element was the last: RIP has moved on, nothing is left.
        return None;
    }
    let back = |reg: u64| (if descending { reg.wrapping_add(size) } else { reg.wrapping_sub(size) }) & mask;
    let exited_dest = back(regs.rdi);
    let page_offset = exited_dest & (PAGE_SIZE - 1);
    if page_offset != exited.gpa & (PAGE_SIZE - 1) || page_offset.checked_add(size)? > PAGE_SIZE {
        return None;
    }
    // Whole elements left in the page, in the direction of travel.
    let room = |at: u64| {
        let offset = at & (PAGE_SIZE - 1);
        let bytes = if descending { offset } else { PAGE_SIZE.saturating_sub(offset).saturating_sub(size) };
        bytes.checked_div(size).unwrap_or(0)
    };
    let mut elements = count.min(room(exited_dest));
    let exited_source = match insn.kind {
        StringKind::Store => None,
        StringKind::Move { source } => {
            // With a segment base, a 32-bit ESI may wrap inside a page:
            // not worth modelling.
            if source != SourceSegment::Flat && insn.address_bits == 32 {
                return None;
            }
            let base = if source == SourceSegment::Flat { 0 } else { source_base };
            let exited_source = base.wrapping_add(back(regs.rsi));
            if (exited_source & (PAGE_SIZE - 1)).checked_add(size)? > PAGE_SIZE {
                return None;
            }
            elements = elements.min(room(exited_source));
            Some(exited_source)
        }
    };
    // A 32-bit pointer that wraps leaves the page: `room` already stops
    // there, since 2^32 is page aligned.
    if elements == 0 {
        return None;
    }
    let moved = elements.checked_mul(size)?;
    let advance = |reg: u64| {
        let next = if descending { reg.wrapping_sub(moved) } else { reg.wrapping_add(moved) };
        assign(next & mask, insn.address_bits)
    };
    let left = count.checked_sub(elements)?;
    let after = StringRegs {
        rcx: assign(left, insn.address_bits),
        rdi: advance(regs.rdi),
        rsi: if exited_source.is_some() { advance(regs.rsi) } else { regs.rsi },
        rip: if left == 0 { regs.rip.wrapping_add(u64::from(insn.length)) } else { regs.rip },
        rflags: regs.rflags,
    };
    debug_assert!(exited_dest >> PAGE_SHIFT == step(exited_dest, insn.element, elements, descending) >> PAGE_SHIFT);
    Some(StringChunk { exited_dest, exited_source, elements, descending, after })
}

#[cfg(test)]
#[allow(clippy::arithmetic_side_effects)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const REP_STOSB: &[u8] = &[0xf3, 0xaa];
    const REP_STOSQ: &[u8] = &[0xf3, 0x48, 0xab];
    const REP_MOVSB: &[u8] = &[0xf3, 0xa4];
    const ADDR32_REP_STOSD: &[u8] = &[0x67, 0xf3, 0xab];
    const REP_MOVSQ_GS: &[u8] = &[0x65, 0xf3, 0x48, 0xa5];

    fn regs(rcx: u64, rdi: u64, rsi: u64, rflags: u64) -> StringRegs {
        StringRegs { rcx, rdi, rsi, rip: 0x1000, rflags }
    }

    #[test]
    fn decodes_rep_stos_and_movs_of_every_width() {
        let stosb = decode_rep_string(REP_STOSB).expect("stosb");
        assert_eq!((stosb.kind, stosb.element, stosb.address_bits, stosb.length), (StringKind::Store, 1, 64, 2));
        assert_eq!(decode_rep_string(&[0xf3, 0x66, 0xab]).map(|i| i.element), Some(2));
        assert_eq!(decode_rep_string(&[0xf3, 0xab]).map(|i| i.element), Some(4));
        assert_eq!(decode_rep_string(REP_STOSQ).map(|i| i.element), Some(8));
        let movsb = decode_rep_string(REP_MOVSB).expect("movsb");
        assert_eq!(movsb.kind, StringKind::Move { source: SourceSegment::Flat });
        let gs = decode_rep_string(REP_MOVSQ_GS).expect("movsq gs");
        assert_eq!((gs.kind, gs.element, gs.length), (StringKind::Move { source: SourceSegment::Gs }, 8, 4));
        assert_eq!(decode_rep_string(ADDR32_REP_STOSD).map(|i| i.address_bits), Some(32));
    }

    #[test]
    fn anything_but_a_rep_stos_or_movs_is_refused() {
        assert_eq!(decode_rep_string(&[0xaa]), None, "no REP: one element, nothing left after its exit");
        assert_eq!(decode_rep_string(&[0xf2, 0xaa]), None, "REPNE");
        assert_eq!(decode_rep_string(&[0xf0, 0xf3, 0xaa]), None, "LOCK");
        assert_eq!(decode_rep_string(&[0xf3, 0xae]), None, "scas");
        assert_eq!(decode_rep_string(&[0x88, 0x07]), None, "mov");
        assert_eq!(decode_rep_string(&[0xf3, 0x48]), None, "truncated");
        assert_eq!(decode_rep_string(&[]), None);
    }

    #[test]
    fn a_rep_stosb_over_a_page_completes_to_the_end_of_the_page_in_one_go() {
        let insn = decode_rep_string(REP_STOSB).expect("stosb");
        // The first byte at 0x5000 exited: RCX 4096 -> 4095, RDI +1.
        let chunk = plan(&insn, regs(4095, 0x5001, 0, 0), ExitedWrite { gpa: 0x9000, len: 1 }, 0).expect("chunk");
        assert_eq!(chunk.elements, 4095);
        assert_eq!(chunk.after.rcx, 0);
        assert_eq!(chunk.after.rdi, 0x6000);
        assert_eq!(chunk.after.rip, 0x1002, "done: RIP past the instruction");
        assert_eq!(chunk.dest_span(1), (0, 4096));
    }

    #[test]
    fn a_huge_count_stops_at_the_page_end_and_the_guest_re_executes() {
        let insn = decode_rep_string(REP_STOSQ).expect("stosq");
        let chunk =
            plan(&insn, regs(u64::MAX - 1, 0x5008, 0, 0), ExitedWrite { gpa: 0x9000, len: 8 }, 0).expect("chunk");
        assert_eq!(chunk.elements, 511);
        assert_eq!(chunk.after.rcx, u64::MAX - 512);
        assert_eq!(chunk.after.rdi, 0x6000);
        assert_eq!(chunk.after.rip, 0x1000, "not done: RIP stays on the instruction");
    }

    #[test]
    fn descending_elements_go_down_to_the_page_start() {
        let insn = decode_rep_string(REP_STOSQ).expect("stosq");
        // DF=1: the element at 0x5ff8 exited; RDI is now 0x5ff0.
        let chunk =
            plan(&insn, regs(1000, 0x5ff0, 0, RFLAGS_DF), ExitedWrite { gpa: 0x9ff8, len: 8 }, 0).expect("chunk");
        assert_eq!(chunk.elements, 511);
        assert_eq!(chunk.after.rdi, 0x4ff8);
        assert_eq!(chunk.after.rcx, 1000 - 511);
        assert_eq!(chunk.dest_span(8), (0, 4096));
    }

    #[test]
    fn a_32_bit_address_size_wraps_edi_and_zero_extends_the_registers() {
        let insn = decode_rep_string(ADDR32_REP_STOSD).expect("stosd");
        // EDI 0xfffffff0 exited (upper RDI bits are ignored); 3 dwords remain in the page, then EDI wraps to 0.
        let rcx = 0xdead_0000_0000_0010;
        let chunk =
            plan(&insn, regs(rcx - 1, 0xbeef_ffff_fff4, 0, 0), ExitedWrite { gpa: 0x7ff0, len: 4 }, 0).expect("chunk");
        assert_eq!(chunk.exited_dest, 0xffff_fff0);
        assert_eq!(chunk.elements, 3);
        assert_eq!(chunk.after.rdi, 0, "EDI wrapped, upper half cleared");
        assert_eq!(chunk.after.rcx, 0xc, "ECX written: upper half cleared");
        assert_eq!(chunk.after.rip, 0x1000);
    }

    #[test]
    fn movs_stops_at_the_end_of_the_source_page_too() {
        let insn = decode_rep_string(REP_MOVSB).expect("movsb");
        let chunk = plan(&insn, regs(4000, 0x5001, 0x8f01, 0), ExitedWrite { gpa: 0x9000, len: 1 }, 0).expect("chunk");
        assert_eq!(chunk.exited_source, Some(0x8f00));
        assert_eq!(chunk.elements, 255, "the source page ends first");
        assert_eq!(chunk.after.rsi, 0x9000);
        assert_eq!(chunk.after.rdi, 0x5100);
        let gs = decode_rep_string(REP_MOVSQ_GS).expect("gs");
        let chunk = plan(&gs, regs(10, 0x5008, 0x8, 0), ExitedWrite { gpa: 0x9000, len: 8 }, 0x7000_0000).expect("gs");
        assert_eq!(chunk.exited_source, Some(0x7000_0000), "the GS base applies to the source");
    }

    #[test]
    fn an_exit_that_does_not_fit_the_instruction_is_refused() {
        let insn = decode_rep_string(REP_STOSQ).expect("stosq");
        let exited = ExitedWrite { gpa: 0x9000, len: 8 };
        assert_eq!(plan(&insn, regs(10, 0x5010, 0, 0), exited, 0), None, "another page offset");
        assert_eq!(plan(&insn, regs(10, 0x5008, 0, 0), ExitedWrite { gpa: 0x9000, len: 4 }, 0), None, "size");
        assert_eq!(plan(&insn, regs(0, 0x5008, 0, 0), exited, 0), None, "count already zero");
        assert_eq!(plan(&insn, regs(10, 0x5008, 0, RFLAGS_TF), exited, 0), None, "single-stepping");
        // The last qword of the page exited: the next one is in another page.
        let last = ExitedWrite { gpa: 0x9ff8, len: 8 };
        assert_eq!(plan(&insn, regs(10, 0x6000, 0, 0), last, 0), None);
    }

    proptest! {
        /// Every planned element lies in the exited element's page, and the
        /// registers move by exactly the elements done.
        #[test]
        fn chunks_stay_in_one_page_and_registers_add_up(
            rcx in any::<u64>(), rdi in any::<u64>(), rsi in any::<u64>(), df in any::<bool>(),
            width in 0usize..4, movs in any::<bool>(), addr32 in any::<bool>(),
        ) {
            let element = [1u8, 2, 4, 8][width];
            let insn = StringInsn {
                kind: if movs { StringKind::Move { source: SourceSegment::Flat } } else { StringKind::Store },
                element, address_bits: if addr32 { 32 } else { 64 }, length: 3,
            };
            let rflags = if df { RFLAGS_DF } else { 0 };
            let back = if df { rdi.wrapping_add(u64::from(element)) } else { rdi.wrapping_sub(u64::from(element)) };
            let exited = ExitedWrite { gpa: 0x9000 | (back & (PAGE_SIZE - 1)), len: usize::from(element) };
            if let Some(chunk) = plan(&insn, StringRegs { rcx, rdi, rsi, rip: 0x1000, rflags }, exited, 0) {
                let page = chunk.exited_dest >> PAGE_SHIFT;
                for i in 0..=chunk.elements {
                    let at = step(chunk.exited_dest, element, i, df);
                    prop_assert_eq!(at >> PAGE_SHIFT, page);
                    prop_assert_eq!((at + u64::from(element) - 1) >> PAGE_SHIFT, page);
                }
                prop_assert_eq!(chunk.after.rcx & insn.mask(), (rcx & insn.mask()) - chunk.elements);
                let moved = chunk.elements * u64::from(element);
                let want = if df { rdi.wrapping_sub(moved) } else { rdi.wrapping_add(moved) } & insn.mask();
                prop_assert_eq!(chunk.after.rdi, want);
            }
        }
    }
}
