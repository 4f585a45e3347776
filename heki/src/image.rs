//! What was locked is what was loaded: the kernel image the VMM loaded, the
//! byte ranges the kernel legitimately rewrites while it boots (read from the
//! image's own patch-site tables), the comparison of locked text with the
//! image outside those ranges, and the SHA-256 digests of locked ranges.
//!
//! Everything here takes bytes and addresses already extracted from the
//! image (the VMM parses the ELF); nothing panics on malformed input: an
//! entry that points nowhere sensible is skipped.

use sha2::{Digest, Sha256};

use crate::perms::Permissions;

/// A SHA-256 digest.
pub type Sha256Digest = [u8; 32];

/// SHA-256 of `bytes`.
pub fn sha256(bytes: &[u8]) -> Sha256Digest {
    Sha256::digest(bytes).into()
}

/// Lower-case hex, as events and `vm.heki` print digests.
pub fn hex(digest: &Sha256Digest) -> String {
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

/// One loadable segment of the image: its file bytes at their guest-physical
/// and virtual addresses (`memsz` beyond the bytes is zero-filled by the
/// loader and not compared).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Segment {
    pub gpa: u64,
    pub va: u64,
    pub memsz: u64,
    pub bytes: Vec<u8>,
}

/// One ELF section, by name, virtual address and content; or a table the
/// linker script merged into a larger section, bounded by its symbols
/// (`__start_static_call_sites`..), named as its input section.
#[derive(Clone, Copy, Debug)]
pub struct Section<'a> {
    pub name: &'a str,
    pub va: u64,
    pub data: &'a [u8],
}

/// Why bytes of the image may legitimately differ once the kernel runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum PatchKind {
    /// `.altinstructions`: alternatives (and their NOP padding).
    Alternative,
    /// `.smp_locks`: LOCK prefixes turned into `ds` on one CPU.
    SmpLock,
    /// `__jump_table`: jump labels (static keys).
    JumpLabel,
    /// `.static_call_sites`: static calls.
    StaticCall,
    /// `.retpoline_sites`: indirect-thunk calls and jumps.
    Retpoline,
    /// `.return_sites`: return-thunk jumps.
    Return,
    /// `.call_sites`: call-depth-tracking call sites.
    CallSite,
    /// `.ibt_endbr_seal`: sealed ENDBR instructions.
    EndbrSeal,
    /// `.parainstructions`: paravirt patch sites (kernels before 6.8).
    Paravirt,
    /// `runtime_ptr_*`: 8-byte immediates set once at boot (runtime constants).
    RuntimePtr,
    /// `runtime_shift_*`: 1-byte shift counts set once at boot.
    RuntimeShift,
    /// `__mcount_loc`: ftrace call sites turned into NOPs at boot.
    Mcount,
    /// `.static_call.text`: the static-call trampolines, rewritten whole.
    StaticCallText,
}

impl PatchKind {
    pub const ALL: [PatchKind; 13] = [
        PatchKind::Alternative,
        PatchKind::SmpLock,
        PatchKind::JumpLabel,
        PatchKind::StaticCall,
        PatchKind::Retpoline,
        PatchKind::Return,
        PatchKind::CallSite,
        PatchKind::EndbrSeal,
        PatchKind::Paravirt,
        PatchKind::RuntimePtr,
        PatchKind::RuntimeShift,
        PatchKind::Mcount,
        PatchKind::StaticCallText,
    ];

    /// The section that lists these sites (a prefix for runtime constants).
    pub fn section(self) -> &'static str {
        match self {
            PatchKind::Alternative => ".altinstructions",
            PatchKind::SmpLock => ".smp_locks",
            PatchKind::JumpLabel => "__jump_table",
            PatchKind::StaticCall => ".static_call_sites",
            PatchKind::Retpoline => ".retpoline_sites",
            PatchKind::Return => ".return_sites",
            PatchKind::CallSite => ".call_sites",
            PatchKind::EndbrSeal => ".ibt_endbr_seal",
            PatchKind::Paravirt => ".parainstructions",
            PatchKind::RuntimePtr => "runtime_ptr_",
            PatchKind::RuntimeShift => "runtime_shift_",
            PatchKind::Mcount => "__mcount_loc",
            PatchKind::StaticCallText => ".static_call.text",
        }
    }

    fn of_section(name: &str) -> Option<PatchKind> {
        PatchKind::ALL.into_iter().find(|k| match k {
            PatchKind::RuntimePtr | PatchKind::RuntimeShift => name.starts_with(k.section()),
            _ => name == k.section(),
        })
    }
}

/// `struct alt_instr` (Linux 6.12, packed): s32 instr_offset, s32
/// repl_offset, u32 ft_flags, u8 instrlen, u8 replacementlen.
pub const ALT_INSTR_SIZE: usize = 14;
/// `struct jump_entry` on x86-64: s32 code, s32 target, long key.
pub const JUMP_ENTRY_SIZE: usize = 16;
/// `struct static_call_site`: s32 addr, s32 key.
pub const STATIC_CALL_SITE_SIZE: usize = 8;
/// `struct paravirt_patch_site`: u8 *instr, u8 type, u8 len (padded).
pub const PARAVIRT_SITE_SIZE: usize = 16;

fn le_i32(data: &[u8], at: usize) -> Option<i32> {
    let bytes = data.get(at..at.checked_add(4)?)?;
    Some(i32::from_le_bytes(bytes.try_into().ok()?))
}

fn le_u64(data: &[u8], at: usize) -> Option<u64> {
    let bytes = data.get(at..at.checked_add(8)?)?;
    Some(u64::from_le_bytes(bytes.try_into().ok()?))
}

/// The address a self-relative s32 field at `section.va + at` points to.
fn relative(section: &Section<'_>, at: usize) -> Option<u64> {
    let offset = le_i32(section.data, at)?;
    Some(section.va.checked_add(at as u64)?.wrapping_add_signed(i64::from(offset)))
}

/// One masked run: `len` bytes at virtual address `va`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Site {
    pub va: u64,
    pub len: u64,
    pub kind: PatchKind,
}

/// The sites one section lists. `first_byte` reads the image at a virtual
/// address (to tell a 6-byte Jcc from a 5-byte CALL/JMP at thunk sites).
pub fn sites(section: &Section<'_>, first_byte: impl Fn(u64) -> Option<u8>) -> Vec<Site> {
    let Some(kind) = PatchKind::of_section(section.name) else {
        return Vec::new();
    };
    let site = |va: u64, len: u64| Site { va, len, kind };
    let entries = |size: usize| (0..section.data.len() / size).map(move |i| i.saturating_mul(size));
    let each_s32 = |len: u64| entries(4).filter_map(|at| relative(section, at)).map(|va| site(va, len)).collect();
    // CALL/JMP rel32 (5 bytes), or Jcc rel32 / CS-prefixed (6 bytes).
    let thunk_len = |va: u64| match first_byte(va) {
        Some(0x0f | 0x2e) => 6,
        _ => 5,
    };
    match kind {
        PatchKind::Alternative => entries(ALT_INSTR_SIZE)
            .filter_map(|at| {
                let len = *section.data.get(at.checked_add(12)?)?;
                Some(site(relative(section, at)?, u64::from(len)))
            })
            .filter(|s| s.len > 0)
            .collect(),
        PatchKind::SmpLock | PatchKind::RuntimeShift => each_s32(1),
        PatchKind::RuntimePtr => each_s32(8),
        PatchKind::EndbrSeal => each_s32(4),
        PatchKind::CallSite => each_s32(5),
        PatchKind::JumpLabel => {
            entries(JUMP_ENTRY_SIZE).filter_map(|at| relative(section, at)).map(|va| site(va, 5)).collect()
        }
        PatchKind::StaticCall => {
            entries(STATIC_CALL_SITE_SIZE).filter_map(|at| relative(section, at)).map(|va| site(va, 5)).collect()
        }
        PatchKind::Retpoline | PatchKind::Return => {
            entries(4).filter_map(|at| relative(section, at)).map(|va| site(va, thunk_len(va))).collect()
        }
        PatchKind::Paravirt => entries(PARAVIRT_SITE_SIZE)
            .filter_map(|at| {
                let va = le_u64(section.data, at)?;
                let len = *section.data.get(at.checked_add(9)?)?;
                Some(site(va, u64::from(len)))
            })
            .filter(|s| s.len > 0)
            .collect(),
        PatchKind::Mcount => entries(8).filter_map(|at| le_u64(section.data, at)).map(|va| site(va, 5)).collect(),
        PatchKind::StaticCallText if !section.data.is_empty() => vec![site(section.va, section.data.len() as u64)],
        PatchKind::StaticCallText => Vec::new(),
    }
}

/// One run of locked bytes that differs from the image outside the masks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Mismatch {
    pub gpa: u64,
    /// Offset from the start of the loaded image (its lowest segment).
    pub offset: u64,
    /// The kernel virtual address of the first byte (for `nm`).
    pub va: u64,
    pub len: u64,
}

/// Masked bytes, per kind, as the image reports them.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MaskStats {
    /// (kind, sites, bytes) for kinds present in the image.
    pub by_kind: Vec<(PatchKind, u64, u64)>,
    /// Bytes masked in all, overlaps counted once.
    pub total_bytes: u64,
}

/// The kernel image the VMM loaded, with the runs the kernel may rewrite.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct KernelImage {
    segments: Vec<Segment>,
    /// Sorted, disjoint GPA runs [start, end) the comparison skips.
    masks: Vec<(u64, u64)>,
    stats: MaskStats,
}

impl KernelImage {
    /// Builds the image from its loadable segments and its sections; sites
    /// that fall outside every segment are dropped.
    pub fn new(mut segments: Vec<Segment>, sections: &[Section<'_>]) -> KernelImage {
        segments.retain(|s| !s.bytes.is_empty() || s.memsz > 0);
        segments.sort_by_key(|s| s.gpa);
        let mut image = KernelImage { segments, masks: Vec::new(), stats: MaskStats::default() };
        let mut runs = Vec::new();
        let mut by_kind: Vec<(PatchKind, u64, u64)> = Vec::new();
        for section in sections {
            let found = sites(section, |va| image.byte_at_va(va));
            for s in found {
                let Some(gpa) = image.va_to_gpa(s.va) else { continue };
                let Some(end) = gpa.checked_add(s.len) else { continue };
                runs.push((gpa, end));
                match by_kind.iter_mut().find(|(k, _, _)| *k == s.kind) {
                    Some(entry) => {
                        entry.1 = entry.1.saturating_add(1);
                        entry.2 = entry.2.saturating_add(s.len);
                    }
                    None => by_kind.push((s.kind, 1, s.len)),
                }
            }
        }
        by_kind.sort();
        image.masks = crate::memslot_plan::merge_ranges(runs);
        let total_bytes = image.masks.iter().map(|&(s, e)| e - s).fold(0, u64::saturating_add);
        image.stats = MaskStats { by_kind, total_bytes };
        image
    }

    pub fn segments(&self) -> &[Segment] {
        &self.segments
    }

    pub fn masks(&self) -> &[(u64, u64)] {
        &self.masks
    }

    pub fn mask_stats(&self) -> &MaskStats {
        &self.stats
    }

    /// The lowest guest-physical address of the image (its offset 0).
    pub fn base(&self) -> u64 {
        self.segments.first().map_or(0, |s| s.gpa)
    }

    /// [base, end): from the first segment to the end of the last one's memory.
    pub fn span(&self) -> (u64, u64) {
        let end = self.segments.iter().map(|s| s.gpa.saturating_add(s.memsz)).max().unwrap_or(0);
        (self.base(), end)
    }

    /// Whether `[start, end)` overlaps the image.
    pub fn overlaps(&self, start: u64, end: u64) -> bool {
        let (base, image_end) = self.span();
        start < image_end && base < end
    }

    fn va_to_gpa(&self, va: u64) -> Option<u64> {
        self.segments
            .iter()
            .find(|s| va >= s.va && va - s.va < s.memsz.max(s.bytes.len() as u64))
            .and_then(|s| s.gpa.checked_add(va - s.va))
    }

    fn byte_at_va(&self, va: u64) -> Option<u8> {
        self.segments.iter().find_map(|s| {
            let off = usize::try_from(va.checked_sub(s.va)?).ok()?;
            s.bytes.get(off).copied()
        })
    }

    fn gpa_to_va(&self, gpa: u64) -> u64 {
        self.segments
            .iter()
            .find(|s| gpa >= s.gpa && gpa - s.gpa < s.memsz.max(s.bytes.len() as u64))
            .map_or(0, |s| s.va.wrapping_add(gpa - s.gpa))
    }

    /// Whether the byte at `gpa` is masked.
    pub fn is_masked(&self, gpa: u64) -> bool {
        let i = self.masks.partition_point(|&(_, end)| end <= gpa);
        self.masks.get(i).is_some_and(|&(start, _)| start <= gpa)
    }

    /// Compares `locked`, the content of guest memory at `gpa`, with the
    /// image's file bytes, skipping masked bytes; returns each differing run.
    pub fn compare(&self, gpa: u64, locked: &[u8]) -> Vec<Mismatch> {
        let mut found = Vec::new();
        let Some(locked_end) = gpa.checked_add(locked.len() as u64) else {
            return found;
        };
        for seg in &self.segments {
            let seg_end = seg.gpa.saturating_add(seg.bytes.len() as u64);
            let (start, end) = (gpa.max(seg.gpa), locked_end.min(seg_end));
            if start >= end {
                continue;
            }
            let mut run: Option<(u64, u64)> = None;
            let mut flush = |run: &mut Option<(u64, u64)>| {
                if let Some((s, e)) = run.take() {
                    found.push(Mismatch { gpa: s, offset: s - self.base(), va: self.gpa_to_va(s), len: e - s });
                }
            };
            for at in start..end {
                let (Ok(l), Ok(i)) = (usize::try_from(at - gpa), usize::try_from(at - seg.gpa)) else { break };
                let differs = locked.get(l) != seg.bytes.get(i) && !self.is_masked(at);
                match (&mut run, differs) {
                    (Some((_, e)), true) => *e = at + 1,
                    (None, true) => run = Some((at, at + 1)),
                    (Some(_), false) => flush(&mut run),
                    (None, false) => {}
                }
            }
            flush(&mut run);
        }
        found
    }
}

/// The digest of one locked range, as locked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Measurement {
    /// [start, end) in bytes (guest-physical).
    pub start: u64,
    pub end: u64,
    pub perms: Permissions,
    pub sha256: Sha256Digest,
    /// Whether it is kernel text: EXEC, overlapping the loaded image.
    pub kernel: bool,
}

/// The digests of the ranges currently locked, one per PROTECT_MEMORY entry.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Measurements {
    records: Vec<Measurement>,
}

impl Measurements {
    /// Records a PROTECT_MEMORY entry: what it overlaps was re-protected and
    /// is forgotten; an entry that gives back the default permissions is an
    /// unlock and leaves no record.
    pub fn record(&mut self, m: Measurement) {
        self.records.retain(|r| r.end <= m.start || m.end <= r.start);
        if m.perms != Permissions::DEFAULT {
            let at = self.records.partition_point(|r| r.start < m.start);
            self.records.insert(at, m);
        }
    }

    /// In GPA order.
    pub fn iter(&self) -> impl Iterator<Item = &Measurement> {
        self.records.iter()
    }

    /// The record for exactly `[start, end)`.
    pub fn exact(&self, start: u64, end: u64) -> Option<&Measurement> {
        self.records.iter().find(|r| r.start == start && r.end == end)
    }

    /// The records inside `[start, end)`.
    pub fn within(&self, start: u64, end: u64) -> impl Iterator<Item = &Measurement> {
        self.records.iter().filter(move |r| start <= r.start && r.end <= end)
    }

    /// One digest over the kernel's locked text: SHA-256 over, for each
    /// `kernel` range in GPA order, its GPA and size (u64 little-endian) and
    /// its SHA-256. `None` before any is locked. (Read-only data is left
    /// out: its `__ro_after_init` part holds per-boot values.)
    pub fn kernel_sha256(&self) -> Option<Sha256Digest> {
        let mut hasher = Sha256::new();
        let mut any = false;
        for r in self.records.iter().filter(|r| r.kernel) {
            hasher.update(r.start.to_le_bytes());
            hasher.update(r.end.saturating_sub(r.start).to_le_bytes());
            hasher.update(r.sha256);
            any = true;
        }
        any.then(|| hasher.finalize().into())
    }
}

#[cfg(test)]
#[allow(clippy::arithmetic_side_effects)]
mod tests {
    use super::*;

    const VA: u64 = 0xffff_ffff_8100_0000;
    const GPA: u64 = 0x100_0000;

    fn s32(v: i64) -> [u8; 4] {
        i32::try_from(v).expect("fits").to_le_bytes()
    }

    /// An alt_instr at `entry_va` for the site at `site_va`.
    fn alt_instr(entry_va: u64, site_va: u64, len: u8) -> Vec<u8> {
        let mut e = s32(site_va as i64 - entry_va as i64).to_vec();
        e.extend(s32(-8));
        e.extend(0x1234u32.to_le_bytes());
        e.extend([len, len]);
        e
    }

    fn text(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i * 7 % 251) as u8).collect()
    }

    fn image(sections: &[Section<'_>]) -> KernelImage {
        let seg = Segment { gpa: GPA, va: VA, memsz: 0x3000, bytes: text(0x2000) };
        KernelImage::new(vec![seg], sections)
    }

    #[test]
    fn an_alt_instr_masks_instrlen_bytes_at_its_relative_site() {
        let table_va = VA + 0x1800;
        let mut data = alt_instr(table_va, VA + 0x100, 5);
        data.extend(alt_instr(table_va + 14, VA + 0x40, 3));
        let section = Section { name: ".altinstructions", va: table_va, data: &data };
        let found = sites(&section, |_| None);
        assert_eq!(
            found,
            vec![
                Site { va: VA + 0x100, len: 5, kind: PatchKind::Alternative },
                Site { va: VA + 0x40, len: 3, kind: PatchKind::Alternative },
            ]
        );
        let img = image(&[section]);
        assert_eq!(img.masks(), &[(GPA + 0x40, GPA + 0x43), (GPA + 0x100, GPA + 0x105)]);
        assert_eq!(img.mask_stats().total_bytes, 8);
    }

    #[test]
    fn each_site_table_masks_its_documented_length() {
        let at = VA + 0x1000;
        let rel = |target: u64, field: u64| s32(target as i64 - field as i64);
        let one = |name: &'static str, data: Vec<u8>| {
            let section = Section { name, va: at, data: &data };
            sites(&section, |va| (va == VA + 0x30).then_some(0x0f))
                .into_iter()
                .map(|s| (s.va, s.len))
                .collect::<Vec<_>>()
        };
        assert_eq!(one(".smp_locks", rel(VA + 0x10, at).to_vec()), vec![(VA + 0x10, 1)]);
        let mut jump = rel(VA + 0x20, at).to_vec();
        jump.extend(rel(VA + 0x90, at + 4));
        jump.extend(0u64.to_le_bytes());
        jump.extend(rel(VA + 0x28, at + 16));
        jump.extend([0; 12]);
        assert_eq!(one("__jump_table", jump), vec![(VA + 0x20, 5), (VA + 0x28, 5)]);
        let mut call = rel(VA + 0x40, at).to_vec();
        call.extend([0; 4]);
        assert_eq!(one(".static_call_sites", call), vec![(VA + 0x40, 5)]);
        let mut thunks = rel(VA + 0x30, at).to_vec();
        thunks.extend(rel(VA + 0x50, at + 4));
        assert_eq!(one(".retpoline_sites", thunks.clone()), vec![(VA + 0x30, 6), (VA + 0x50, 5)]);
        assert_eq!(one(".return_sites", thunks), vec![(VA + 0x30, 6), (VA + 0x50, 5)]);
        assert_eq!(one(".call_sites", rel(VA + 0x60, at).to_vec()), vec![(VA + 0x60, 5)]);
        assert_eq!(one(".ibt_endbr_seal", rel(VA + 0x70, at).to_vec()), vec![(VA + 0x70, 4)]);
        assert_eq!(one("runtime_ptr_USER_PTR_MAX", rel(VA + 0x80, at).to_vec()), vec![(VA + 0x80, 8)]);
        assert_eq!(one("runtime_shift_d_hash_shift", rel(VA + 0x88, at).to_vec()), vec![(VA + 0x88, 1)]);
        let mut pv = (VA + 0x98).to_le_bytes().to_vec();
        pv.extend([3, 7, 0, 0, 0, 0, 0, 0]);
        assert_eq!(one(".parainstructions", pv), vec![(VA + 0x98, 7)]);
        assert_eq!(one("__mcount_loc", (VA + 0xa0).to_le_bytes().to_vec()), vec![(VA + 0xa0, 5)]);
        assert_eq!(one(".static_call.text", vec![0xcc; 24]), vec![(at, 24)]);
        assert_eq!(one(".text", vec![1, 2, 3, 4]), vec![]);
    }

    #[test]
    fn malformed_tables_yield_what_parses_and_never_panic() {
        // A truncated last entry, a site outside the image, an offset that wraps.
        let table_va = VA + 0x1800;
        let mut data = alt_instr(table_va, VA + 0x10, 2);
        data.extend(alt_instr(table_va + 14, VA + 0x10_0000, 4));
        data.extend([1, 2, 3]);
        let img = image(&[
            Section { name: ".altinstructions", va: table_va, data: &data },
            Section { name: ".smp_locks", va: u64::MAX - 1, data: &[0xff, 0xff, 0xff, 0x7f, 9] },
            Section { name: ".retpoline_sites", va: 0, data: &[] },
        ]);
        assert_eq!(img.masks(), &[(GPA + 0x10, GPA + 0x12)]);
        for len in 0..40 {
            let garbage: Vec<u8> = (0..len).map(|i| (i * 37) as u8 ^ 0xa5).collect();
            for kind in PatchKind::ALL {
                let name = kind.section();
                let _ = KernelImage::new(
                    vec![Segment { gpa: u64::MAX - 4, va: u64::MAX - 2, memsz: u64::MAX, bytes: garbage.clone() }],
                    &[Section { name, va: u64::MAX - 3, data: &garbage }],
                );
            }
        }
    }

    #[test]
    fn identical_text_has_no_mismatch_and_masked_bytes_may_differ() {
        let table_va = VA + 0x1800;
        let data = alt_instr(table_va, VA + 0x100, 5);
        let img = image(&[Section { name: ".altinstructions", va: table_va, data: &data }]);
        let mut locked = text(0x1000);
        assert!(img.compare(GPA, &locked).is_empty());
        locked[0x100..0x105].copy_from_slice(&[0x90; 5]);
        assert!(img.compare(GPA, &locked).is_empty(), "the alternative site is masked");
    }

    #[test]
    fn a_byte_changed_outside_the_masks_is_a_mismatch_with_its_offset() {
        let table_va = VA + 0x1800;
        let data = alt_instr(table_va, VA + 0x100, 5);
        let img = image(&[Section { name: ".altinstructions", va: table_va, data: &data }]);
        let mut locked = text(0x1000)[0x800..].to_vec();
        // Locked at GPA + 0x800: patch 3 bytes at image offset 0x900, and one
        // right after a masked run that does not cover it.
        locked[0x100..0x103].iter_mut().for_each(|b| *b ^= 0xff);
        locked[0x200] ^= 1;
        let found = img.compare(GPA + 0x800, &locked);
        assert_eq!(
            found,
            vec![
                Mismatch { gpa: GPA + 0x900, offset: 0x900, va: VA + 0x900, len: 3 },
                Mismatch { gpa: GPA + 0xa00, offset: 0xa00, va: VA + 0xa00, len: 1 },
            ]
        );
    }

    #[test]
    fn only_the_part_inside_the_image_file_bytes_is_compared() {
        let img = image(&[]);
        assert_eq!(img.span(), (GPA, GPA + 0x3000));
        assert!(img.overlaps(GPA - 0x1000, GPA + 1) && !img.overlaps(GPA + 0x3000, GPA + 0x4000));
        let mut locked = vec![0xcc; 0x1000];
        locked.extend(text(0x1000));
        assert_eq!(img.compare(GPA - 0x1000, &locked), vec![], "bytes before the image are not the image's");
        let zeros = vec![0u8; 0x2000];
        let found = img.compare(GPA + 0x2000, &zeros);
        assert!(found.is_empty(), "memsz beyond the file bytes (bss) is not compared");
    }

    #[test]
    fn measurements_replace_what_they_overlap_and_unlock_leaves_none() {
        let ro = Permissions::from_abi(9).expect("valid");
        let m = |start, end, perms, kernel| Measurement { start, end, perms, sha256: sha256(&[start as u8]), kernel };
        let mut set = Measurements::default();
        set.record(m(0x3000, 0x4000, ro, true));
        set.record(m(0x1000, 0x2000, ro, true));
        set.record(m(0x8000, 0x9000, ro, false));
        let starts: Vec<u64> = set.iter().map(|r| r.start).collect();
        assert_eq!(starts, [0x1000, 0x3000, 0x8000]);
        let k1 = set.kernel_sha256().expect("kernel ranges");
        set.record(m(0x8000, 0xa000, Permissions::DEFAULT, false));
        assert_eq!(set.iter().count(), 2);
        assert_eq!(set.kernel_sha256(), Some(k1), "only kernel ranges count");
        set.record(m(0x3800, 0x5000, ro, true));
        assert!(set.exact(0x3000, 0x4000).is_none());
        assert!(set.exact(0x3800, 0x5000).is_some());
        assert_ne!(set.kernel_sha256(), Some(k1));
        assert_eq!(set.within(0, 0x10000).count(), 2);
        assert_eq!(Measurements::default().kernel_sha256(), None);
    }

    #[test]
    fn digests_are_sha256() {
        assert_eq!(hex(&sha256(b"abc")), "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
    }
}
