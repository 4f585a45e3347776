//! A `rep stos`/`rep movs` over a trapped page exits once per element (4,096
//! exits for a `rep stosb` over a locked page). At the first element's exit
//! the VMM completes the instruction's run in that page itself: each locked
//! byte is judged as a trapped write would be, every other byte lands as the
//! CPU would write it, the registers move past the elements done, and one
//! violation record carries the byte counts. A run that leaves the page
//! re-executes the instruction (RIP unchanged), so the work per exit stays
//! bounded by one page whatever RCX says.
//!
//! Anything not exactly modelled (not 64-bit mode, a source that is not RAM,
//! a watched instruction, an exit that does not fit the instruction at RIP,
//! a page the introspection agent tracks) keeps the one-exit-per-element path.

use heki::string_op::{self, ExitedWrite, SourceSegment, StringChunk, StringInsn, StringKind, StringRegs};
use heki::{Access, PAGE_SIZE, Protections, judge};
use vm_memory::{Bytes, GuestAddress};

use super::runtime::HekiRuntime;
pub use super::string_memo::StringWriteMemo;
use crate::traps::ports::StringExitAccess;

/// EFER.LMA: the vCPU is in long mode.
const EFER_LMA: u64 = 1 << 10;
/// The longest x86 instruction.
const MAX_INSN_LEN: usize = 15;

/// A string instruction at RIP whose element just exited, checked against
/// that exit, with the rest of its run in the page planned.
struct Found {
    insn: StringInsn,
    chunk: StringChunk,
    regs: hypervisor::Regs,
    cpl: u8,
    /// The source page for `movs` (guest physical).
    source_page: Option<u64>,
}

impl HekiRuntime {
    /// An unclaimed MMIO write: if it is one element of a REP string
    /// instruction, completes the instruction's run in that page and returns
    /// true; false leaves the write to `on_unclaimed_mmio_write`.
    pub fn complete_string_write(&self, vcpu: &mut dyn StringExitAccess, gpa: u64, data: &[u8]) -> bool {
        let page = gpa & !(PAGE_SIZE - 1);
        if !matches!(data.len(), 1 | 2 | 4 | 8) || !self.ram().contains(page, PAGE_SIZE) {
            return false;
        }
        let Some(found) = self.find_string_insn(vcpu, gpa, data) else { return false };
        self.apply_string_run(vcpu, page, data, &found)
    }

    fn find_string_insn(&self, vcpu: &mut dyn StringExitAccess, gpa: u64, data: &[u8]) -> Option<Found> {
        let id = vcpu.id();
        let rip = vcpu.exit_rip()?;
        if self.string_memo().knows_not_string(id, rip) {
            return None;
        }
        let sregs = vcpu.sregs().ok()?;
        if sregs.efer & EFER_LMA == 0 || sregs.cs.l == 0 {
            self.string_memo().note_not_string(id, rip);
            return None;
        }
        let Some(insn) = self.instruction_bytes(vcpu, rip).and_then(|b| string_op::decode_rep_string(&b)) else {
            self.string_memo().note_not_string(id, rip);
            return None;
        };
        // A shorter write is the fragment of an element split across two
        // pages; completing its exit would return the next fragment's.
        if data.len() != usize::from(insn.element) || vcpu.instructions_watched().unwrap_or(true) {
            return None;
        }
        // KVM has written the registers back at the exit (count down,
        // pointers moved); everything is checked on them before the exit is
        // completed, so a write that is not this instruction's element (the
        // first 8 bytes of a wider store, say) is never completed here.
        let regs = vcpu.regs().ok()?;
        if regs.rip != rip {
            return None;
        }
        let source_base = match insn.kind {
            StringKind::Move { source: SourceSegment::Fs } => sregs.fs.base,
            StringKind::Move { source: SourceSegment::Gs } => sregs.gs.base,
            _ => 0,
        };
        let now = StringRegs { rcx: regs.rcx, rdi: regs.rdi, rsi: regs.rsi, rip: regs.rip, rflags: regs.rflags };
        let chunk = string_op::plan(&insn, now, ExitedWrite { gpa, len: data.len() }, source_base)?;
        // The exit must be this instruction's element: same address, same data.
        if vcpu.translate_gva(chunk.exited_dest).ok()?? != gpa {
            return None;
        }
        let source_page = match chunk.exited_source {
            None if regs.rax.to_le_bytes().get(..data.len()) == Some(data) => None,
            None => return None,
            Some(source) => {
                let source_gpa = vcpu.translate_gva(source).ok()??;
                let source_page = source_gpa & !(PAGE_SIZE - 1);
                // A device or a hole: its reads have effects; element by element.
                if !self.ram().contains(source_page, PAGE_SIZE) {
                    return None;
                }
                let mut element = vec![0u8; data.len()];
                self.kvm_memory().read_slice(&mut element, GuestAddress(source_gpa)).ok()?;
                if element != data {
                    return None;
                }
                Some(source_page)
            }
        };
        // The agent sees every write to the pages it tracks, one by one.
        if self.traps().slots().agent_tracks_page(gpa >> heki::PAGE_SHIFT) {
            return None;
        }
        // The element is retired only once KVM completes the exit; then the
        // registers are final and ours to change. They must not have moved.
        if !self.complete_exit(vcpu) || vcpu.regs().ok()? != regs {
            return None;
        }
        Some(Found { insn, chunk, regs, cpl: sregs.cpl(), source_page })
    }

    /// Completes the pending exit; false if it was not one element. Should
    /// the write that exited be the first piece of a wider store that merely
    /// looked like the element, its further pieces come back here: each is
    /// judged as a trapped write, and the caller judges the first one.
    fn complete_exit(&self, vcpu: &mut dyn StringExitAccess) -> bool {
        let id = vcpu.id();
        let mut whole = true;
        loop {
            match vcpu.complete_pending_exit() {
                Ok(None) => return whole,
                Ok(Some((piece, data))) => {
                    whole = false;
                    // RAM no device claims; the agent's pages go to the agent only.
                    let len = data.len() as u64;
                    let last = piece.saturating_add(len.saturating_sub(1)) >> heki::PAGE_SHIFT;
                    let tracked = {
                        let slots = self.traps().slots();
                        (piece >> heki::PAGE_SHIFT..=last).any(|p| slots.agent_tracks_page(p))
                    };
                    if self.ram().contains(piece, len) && !tracked {
                        let site = super::ExitSite::of(&*vcpu);
                        self.on_unclaimed_mmio_write(id, piece, &data, || site);
                    } else {
                        crate::rate_limited!(
                            warn,
                            "heki: vcpu {id}: a wide store's piece at {piece:#x} is not heki's to judge; dropped"
                        );
                    }
                }
                Err(e) => {
                    crate::rate_limited!(warn, "heki: cannot complete a string write's exit on vcpu {id}: {e}");
                    return false;
                }
            }
        }
    }

    /// Up to 15 bytes at `rip`, through the vCPU's page tables (both pages
    /// when the instruction may cross one).
    fn instruction_bytes(&self, vcpu: &dyn StringExitAccess, rip: u64) -> Option<Vec<u8>> {
        let mut bytes = Vec::with_capacity(MAX_INSN_LEN);
        while bytes.len() < MAX_INSN_LEN {
            let at = rip.wrapping_add(bytes.len() as u64);
            let in_page = (PAGE_SIZE - (at & (PAGE_SIZE - 1))) as usize;
            let mut part = vec![0u8; in_page.min(MAX_INSN_LEN - bytes.len())];
            let read = vcpu
                .translate_gva(at)
                .ok()
                .flatten()
                .is_some_and(|gpa| self.kvm_memory().read_slice(&mut part, GuestAddress(gpa)).is_ok());
            if !read {
                // What was read may still be a whole instruction.
                break;
            }
            bytes.extend_from_slice(&part);
        }
        (!bytes.is_empty()).then_some(bytes)
    }

    /// Judges and performs the run, moves the registers, records one
    /// violation. False (nothing done) if the registers cannot be set.
    fn apply_string_run(&self, vcpu: &mut dyn StringExitAccess, page: u64, data: &[u8], found: &Found) -> bool {
        let Found { insn, chunk, regs, cpl, source_page } = found;
        let size = usize::from(insn.element);
        let (span_offset, span_len) = chunk.dest_span(insn.element);
        let span_gpa = page + span_offset;
        let (Ok(span_start), Ok(span_len)) = (usize::try_from(span_offset), usize::try_from(span_len)) else {
            return false;
        };
        let mut after = *regs;
        after.rcx = chunk.after.rcx;
        after.rdi = chunk.after.rdi;
        after.rsi = chunk.after.rsi;
        after.rip = chunk.after.rip;
        let verdict = {
            let protections = self.enforcer().protections();
            let access = Access::StringWrite { gpa: span_gpa, len: span_len };
            let verdict = judge(access, Protections { memory: &protections, pins: None }, self.policy());
            let runs = verdict.bytes_to_apply(span_len);
            let mut lands = vec![false; span_len];
            for &(offset, len) in &runs {
                lands.iter_mut().skip(offset).take(len).for_each(|b| *b = true);
            }
            // The page as it is, then each element in order, as the CPU
            // would: a `movs` reading its own destination sees what landed.
            let mut dest = vec![0u8; PAGE_SIZE as usize];
            let mut source = Vec::new();
            let memory = self.kvm_memory();
            if memory.read_slice(&mut dest, GuestAddress(page)).is_err() {
                return false;
            }
            if let Some(source_page) = source_page.filter(|&s| s != page) {
                source = vec![0u8; PAGE_SIZE as usize];
                if memory.read_slice(&mut source, GuestAddress(source_page)).is_err() {
                    return false;
                }
            }
            let stored = regs.rax.to_le_bytes();
            let mut element = [0u8; 8];
            for i in 0..=chunk.elements {
                let value = &mut element[..size];
                match chunk.source_offset(insn.element, i) {
                    _ if i == 0 => value.copy_from_slice(data),
                    None => value.copy_from_slice(&stored[..size]),
                    Some(at) => {
                        let from = if source.is_empty() { &dest } else { &source };
                        let Some(bytes) = from.get(at as usize..at as usize + size) else { return false };
                        value.copy_from_slice(bytes);
                    }
                }
                // `plan` keeps every element inside the span, itself inside the page.
                let at = chunk.dest_offset(insn.element, i) as usize;
                for (j, &byte) in value.iter().enumerate() {
                    let lands_here = (at + j).checked_sub(span_start).and_then(|k| lands.get(k)) == Some(&true);
                    if let Some(slot) = dest.get_mut(at + j).filter(|_| lands_here) {
                        *slot = byte;
                    }
                }
            }
            // Registers first: if they cannot move, nothing has happened and
            // the exited element takes the per-element path.
            if let Err(e) = vcpu.set_regs(&after) {
                crate::rate_limited!(warn, "heki: cannot move vcpu {} past a string write: {e}", vcpu.id());
                return false;
            }
            for (offset, len) in runs {
                let at = span_start + offset;
                let Some(bytes) = dest.get(at..at + len) else { continue };
                if let Err(e) = memory.write_slice(bytes, GuestAddress(page + at as u64)) {
                    crate::rate_limited!(warn, "heki: cannot apply a string write at {:#x}: {e}", page + at as u64);
                }
            }
            verdict
        };
        if verdict.is_violation() {
            let id = vcpu.id();
            let first = span_gpa + verdict.first_forbidden().unwrap_or(0);
            self.enforcer().enforce(&verdict, &format!("vcpu {id}"), |record| {
                record.vcpu = Some(u32::from(id));
                record.gpa = Some(first);
                record.rip = Some(regs.rip);
                record.details.insert("cpl".into(), cpl.to_string());
                record.details.insert("instruction".into(), insn.mnemonic().into());
                record.details.insert("elements".into(), (chunk.elements + 1).to_string());
            });
        }
        true
    }
}

#[cfg(test)]
mod tests;
