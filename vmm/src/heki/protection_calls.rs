//! The guest's protection calls (PROTECT_MEMORY, PROTECT_BYTES, QUERY), the
//! lock-time measurement of the kernel image, and what `vm.heki` reports of
//! the protections.

use heki::abi::{self};
use heki::{
    AbiError, Access, Measurement, MemoryProtections, Mismatch, PAGE_SHIFT, Permissions, ProtectRange, Protections,
    judge,
};
use vm_memory::{Bytes, GuestAddress};

use super::guest_reader::GuestReader;

use super::private_memory::PrivateMode;
use super::runtime::HekiRuntime;

/// What measuring one PROTECT_MEMORY request found.
#[derive(Default)]
struct LockReport {
    /// The digest of each entry, in request order (`None`: RAM unreadable).
    digests: Vec<Option<heki::image::Sha256Digest>>,
    /// Whether any EXEC range inside the image was compared.
    compared: bool,
    mismatches: Vec<Mismatch>,
}

impl HekiRuntime {
    /// PROTECT_MEMORY / `vm.heki-protect`: locks, then measures each range
    /// as locked (SHA-256, through KVM's view of RAM, under the same update)
    /// and compares EXEC ranges inside the loaded kernel image with it.
    pub fn protect_pages(&self, ranges: &[ProtectRange], who: &str) -> Result<(), AbiError> {
        let mut report = LockReport::default();
        let mut kernel_sha256 = None;
        self.update_measured(
            |p| p.protect_pages(ranges),
            |p| {
                report = self.measure(ranges, &mut p.measurements);
                kernel_sha256 = p.measurements.kernel_sha256();
            },
        )?;
        let pages: u64 = ranges.iter().map(|r| r.end.saturating_sub(r.start)).fold(0, u64::saturating_add);
        let list = |f: &dyn Fn(usize, &ProtectRange) -> String| {
            ranges.iter().enumerate().map(|(i, r)| f(i, r)).collect::<Vec<_>>().join(",")
        };
        let mut props = vec![
            ("by", who.to_string()),
            ("pages", pages.to_string()),
            ("ranges", list(&|_, r| format!("{:#x}-{:#x}", r.start << PAGE_SHIFT, r.end << PAGE_SHIFT))),
            (
                "sha256",
                list(&|i, _| {
                    report.digests.get(i).copied().flatten().map_or_else(String::new, |d| heki::image::hex(&d))
                }),
            ),
        ];
        if let Some(digest) = kernel_sha256 {
            props.push(("kernel_sha256", heki::image::hex(&digest)));
        }
        if report.compared {
            props.push(("image_mismatches", report.mismatches.len().to_string()));
        }
        crate::events::emit("heki", "protected", &props);
        for m in &report.mismatches {
            self.report_mismatch(m, who);
        }
        Ok(())
    }

    /// Digests every entry of a lock, records them, and compares EXEC ranges
    /// inside the image; called with the lock in place.
    fn measure(&self, ranges: &[ProtectRange], measurements: &mut heki::Measurements) -> LockReport {
        let image = self.kernel_image.get();
        let mut report = LockReport::default();
        for r in ranges {
            let (start, end) = (r.start << PAGE_SHIFT, r.end << PAGE_SHIFT);
            let text = r.perms.contains(Permissions::EXEC) && image.is_some_and(|i| i.overlaps(start, end));
            let mut content = vec![0u8; usize::try_from(end.saturating_sub(start)).unwrap_or(0)];
            if let Err(e) = self.ram_mem.read_slice(&mut content, GuestAddress(start)) {
                log::warn!("heki: cannot measure the lock at {start:#x}: {e}");
                report.digests.push(None);
                continue;
            }
            let sha256 = heki::image::sha256(&content);
            report.digests.push(Some(sha256));
            measurements.record(Measurement { start, end, perms: r.perms, sha256, kernel: text });
            if let Some(image) = image.filter(|_| text) {
                report.compared = true;
                report.mismatches.extend(image.compare(start, &content));
            }
        }
        report
    }

    /// One run of locked text that is not the image's, through the judge.
    fn report_mismatch(&self, m: &Mismatch, who: &str) {
        let memory = MemoryProtections::default();
        let access = Access::ImageText { offset: m.offset, len: m.len };
        let verdict = judge(access, Protections { memory: &memory, pins: None }, self.policy());
        if verdict.is_violation() {
            let source = if who == "guest" { "guest lock".to_string() } else { format!("{who} lock") };
            self.enforcer.enforce(&verdict, &source, |record| {
                record.gpa = Some(m.gpa);
                record.details.insert("va".into(), format!("{:#x}", m.va));
            });
        }
    }

    /// PROTECT_BYTES.
    pub fn protect_bytes(&self, gpa: u64, len: u64, who: &str) -> Result<(), AbiError> {
        let ram = (*self.ram()).clone();
        self.update(|p| p.protect_bytes(&ram, gpa, len))?;
        crate::events::emit(
            "heki",
            "protected",
            &[("by", who.to_string()), ("bytes", len.to_string()), ("gpa", format!("{gpa:#x}"))],
        );
        Ok(())
    }

    pub fn query(&self, gpa: u64) -> Result<u64, AbiError> {
        let bits = self.enforcer.protections().query(&self.ram(), gpa)?;
        // This host always keeps a (PROT_NONE) mapping of private pages.
        let unmapped = bits & heki::private::QUERY_PRIVATE != 0 && self.private_mode() == PrivateMode::Kernel;
        Ok(bits | if unmapped { heki::private::QUERY_UNMAPPED } else { 0 })
    }

    /// Decodes a page list from guest memory.
    pub fn decode_page_list(&self, list: u64) -> Result<Vec<ProtectRange>, AbiError> {
        abi::decode_page_list(&GuestReader(&self.ram_mem), &self.ram(), list)
    }

    /// The page ranges whose permissions differ from the default, as
    /// (GPA, size in bytes, permissions), for `vm.heki`.
    pub fn protected_ranges(&self) -> Vec<(u64, u64, heki::Permissions)> {
        let protections = self.enforcer.protections();
        protections
            .pages
            .iter()
            .map(|(start, end, perms)| (start << PAGE_SHIFT, (end - start) << PAGE_SHIFT, perms))
            .collect()
    }

    /// The digests of the locked ranges (in GPA order), and the one over
    /// the kernel's ranges.
    pub fn measurements(&self) -> (Vec<Measurement>, Option<heki::image::Sha256Digest>) {
        let protections = self.enforcer.protections();
        (protections.measurements.iter().copied().collect(), protections.measurements.kernel_sha256())
    }

    /// Counts of protected pages and bytes, and memslot use.
    pub fn stats(&self) -> (u64, u64, usize, usize) {
        let (pages, bytes) = {
            let p = self.enforcer.protections();
            (p.pages.protected_pages(), p.bytes.total_bytes())
        };
        let slots = self.traps.slots();
        (pages, bytes, slots.slot_count(), slots.max_slots())
    }
}
