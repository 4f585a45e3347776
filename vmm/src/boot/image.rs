//! The loaded kernel image, kept for heki: the file bytes of each loadable
//! segment by guest-physical address, and the sites the kernel rewrites at
//! boot, from the ELF's patch-site sections (`heki::image`).

use heki::image::{KernelImage, Section, Segment};
use object::Endianness;
use object::elf::{FileHeader64, PT_LOAD, SHT_SYMTAB};
use object::read::elf::{FileHeader, ProgramHeader, SectionHeader, Sym};

/// Site tables that Linux's linker script merges into a larger output
/// section (`.init.data`, `.rodata`), found by their bounding symbols, and
/// the input section each would be: (start, stop, name).
const BOUNDED_TABLES: [(&str, &str, &str); 9] = [
    ("__start_static_call_sites", "__stop_static_call_sites", ".static_call_sites"),
    ("__start___jump_table", "__stop___jump_table", "__jump_table"),
    ("__start_mcount_loc", "__stop_mcount_loc", "__mcount_loc"),
    ("__static_call_text_start", "__static_call_text_end", ".static_call.text"),
    ("__retpoline_sites", "__retpoline_sites_end", ".retpoline_sites"),
    ("__return_sites", "__return_sites_end", ".return_sites"),
    ("__call_sites", "__call_sites_end", ".call_sites"),
    ("__ibt_endbr_seal", "__ibt_endbr_seal_end", ".ibt_endbr_seal"),
    ("__smp_locks", "__smp_locks_end", ".smp_locks"),
];

/// The file bytes of [start, stop) (virtual), if one loadable segment holds
/// them all; `loads` is (vaddr, file offset, file size) per segment.
fn file_bytes<'a>(data: &'a [u8], loads: &[(u64, u64, u64)], start: u64, stop: u64) -> Option<&'a [u8]> {
    loads.iter().find_map(|&(va, offset, filesz)| {
        let (from, to) = (start.checked_sub(va)?, stop.checked_sub(va)?);
        if to > filesz {
            return None;
        }
        let at = |o: u64| usize::try_from(offset.checked_add(o)?).ok();
        data.get(at(from)?..at(to)?)
    })
}

/// Why an ELF vmlinux cannot be read for heki.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("not a 64-bit ELF")]
    NotElf64(#[source] object::Error),
    #[error("bad ELF header")]
    Header(#[source] object::Error),
    #[error("bad program headers")]
    ProgramHeaders(#[source] object::Error),
    #[error("a loadable segment lies outside the file")]
    SegmentOutsideFile,
    #[error("bad section headers")]
    SectionHeaders(#[source] object::Error),
}

/// Parses an ELF vmlinux into what heki compares locked text with. Host
/// input, but a malformed file is an error, never a panic.
pub fn kernel_image(data: &[u8]) -> Result<KernelImage, ImageError> {
    let header = FileHeader64::<Endianness>::parse(data).map_err(ImageError::NotElf64)?;
    let endian = header.endian().map_err(ImageError::Header)?;
    let mut segments = Vec::new();
    let mut loads = Vec::new();
    for ph in header.program_headers(endian, data).map_err(ImageError::ProgramHeaders)? {
        if ph.p_type(endian) != PT_LOAD {
            continue;
        }
        let bytes = ph.data(endian, data).map_err(|_| ImageError::SegmentOutsideFile)?;
        loads.push((ph.p_vaddr(endian), ph.p_offset(endian), bytes.len() as u64));
        segments.push(Segment {
            gpa: ph.p_paddr(endian),
            va: ph.p_vaddr(endian),
            memsz: ph.p_memsz(endian),
            bytes: bytes.to_vec(),
        });
    }
    let table = header.sections(endian, data).map_err(ImageError::SectionHeaders)?;
    let mut sections = Vec::new();
    for sh in table.iter() {
        let (Ok(name), Ok(bytes)) = (table.section_name(endian, sh), sh.data(endian, data)) else { continue };
        let Ok(name) = std::str::from_utf8(name) else { continue };
        sections.push(Section { name, va: sh.sh_addr(endian), data: bytes });
    }
    // Tables merged into other sections, unless they kept their own.
    let symbols = table.symbols(endian, data, SHT_SYMTAB).ok();
    let wanted: Vec<&str> = BOUNDED_TABLES.iter().flat_map(|(a, b, _)| [*a, *b]).collect();
    let mut found = std::collections::HashMap::new();
    for sym in symbols.iter().flat_map(|t| t.iter()) {
        let Some(name) = symbols.as_ref().and_then(|t| t.symbol_name(endian, sym).ok()) else { continue };
        if let Some(w) = wanted.iter().find(|w| w.as_bytes() == name) {
            found.insert(*w, sym.st_value(endian));
        }
    }
    for (start, stop, name) in BOUNDED_TABLES {
        let (Some(&start), Some(&stop)) = (found.get(start), found.get(stop)) else { continue };
        if stop <= start || sections.iter().any(|s| s.name == name) {
            continue;
        }
        if let Some(bytes) = file_bytes(data, &loads, start, stop) {
            sections.push(Section { name, va: start, data: bytes });
        }
    }
    Ok(KernelImage::new(segments, &sections))
}

#[cfg(test)]
#[allow(clippy::arithmetic_side_effects)]
mod tests {
    use super::*;
    use heki::image::{ALT_INSTR_SIZE, PatchKind, sites};

    #[test]
    fn a_file_that_is_not_an_elf_is_an_error_not_a_panic() {
        assert!(kernel_image(b"").is_err());
        assert!(kernel_image(&[0x7f, b'E', b'L', b'F', 2, 1, 1, 0]).is_err());
        // A valid header whose tables point past the end of the file.
        let mut header = vec![0u8; 64];
        header[..7].copy_from_slice(&[0x7f, b'E', b'L', b'F', 2, 1, 1]);
        header[32..40].copy_from_slice(&0x1000u64.to_le_bytes()); // e_phoff
        header[54..56].copy_from_slice(&56u16.to_le_bytes()); // e_phentsize
        header[56..58].copy_from_slice(&3u16.to_le_bytes()); // e_phnum
        assert!(kernel_image(&header).is_err());
        for cut in [64, 200, 1000] {
            let mut truncated = header.clone();
            truncated.resize(cut, 0xa5);
            let _ = kernel_image(&truncated);
        }
    }

    /// The project's Linux guest kernel, if it was built (tests/linux_guest.rs).
    fn cached_vmlinux() -> Option<Vec<u8>> {
        let home = std::env::var_os("HOME")?;
        let dir = std::path::Path::new(&home).join(".cache/hekivisor/linux");
        let mut found: Vec<_> = std::fs::read_dir(dir)
            .ok()?
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().starts_with("heki-"))
            .map(|e| e.path().join("vmlinux"))
            .filter(|p| p.is_file())
            .collect();
        found.sort();
        std::fs::read(found.pop()?).ok()
    }

    #[test]
    fn the_real_kernel_image_masks_every_alternative_site() {
        let Some(data) = cached_vmlinux() else {
            eprintln!("skipped: no Linux guest kernel in ~/.cache/hekivisor/linux (scripts/linux-guest/build.sh heki)");
            return;
        };
        let image = kernel_image(&data).expect("the guest kernel parses");
        let stats = image.mask_stats();
        eprintln!("masked: {} bytes; {:?}; span {:x?}", stats.total_bytes, stats.by_kind, image.span());
        // Every alternative site of the ELF is masked, all of its bytes.
        let header = FileHeader64::<Endianness>::parse(&*data).expect("ELF");
        let endian = header.endian().expect("endian");
        let table = header.sections(endian, &*data).expect("sections");
        let (_, alt) = table.section_by_name(endian, b".altinstructions").expect(".altinstructions");
        let alt = Section {
            name: ".altinstructions",
            va: alt.sh_addr(endian),
            data: alt.data(endian, &*data).expect("data"),
        };
        let alt_sites = sites(&alt, |_| None);
        assert_eq!(alt_sites.len(), alt.data.len() / ALT_INSTR_SIZE, "one site per alt_instr");
        let text = image.segments().first().expect("a text segment");
        let mut checked = 0;
        for site in alt_sites {
            let gpa = text.gpa + (site.va - text.va);
            for b in gpa..gpa + site.len {
                assert!(image.is_masked(b), "byte {b:#x} of the alternative at {:#x}", site.va);
            }
            checked += 1;
        }
        assert!(checked > 100, "{checked} alternatives");
        // The text Linux locks, [_text, _etext): the first segment's .text.
        let (_, text_section) = table.section_by_name(endian, b".text").expect(".text");
        let text_end = text.gpa + text_section.sh_size(endian);
        let in_text: u64 = image.masks().iter().map(|&(s, e)| e.min(text_end).saturating_sub(s.max(text.gpa))).sum();
        eprintln!("masked in .text: {in_text} of {} bytes", text_end - text.gpa);
        assert!(in_text > 0 && in_text < stats.total_bytes);
        let static_calls = stats.by_kind.iter().any(|(k, n, _)| *k == PatchKind::StaticCall && *n > 0);
        assert!(static_calls, "static-call sites, from __start_static_call_sites: {stats:?}");
        let alternatives = stats.by_kind.iter().find(|(k, _, _)| *k == PatchKind::Alternative).expect("alternatives");
        assert_eq!(alternatives.1, checked);
        // The image compared with itself matches; one flipped byte outside the masks does not.
        let mut text_bytes = text.bytes.clone();
        assert!(image.compare(text.gpa, &text_bytes).is_empty());
        let unmasked = (0x1000..text_bytes.len() as u64).find(|&o| !image.is_masked(text.gpa + o)).expect("unmasked");
        text_bytes[unmasked as usize] ^= 0x40;
        let found = image.compare(text.gpa, &text_bytes);
        assert_eq!(found.len(), 1);
        assert_eq!((found[0].offset, found[0].len), (unmasked, 1));
    }
}
