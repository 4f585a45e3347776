//! Fuzzes the heki page-list decoder: guest memory is the input.
//!
//! Guest RAM is 12 pages with a hole (pages 6 and 7). The input's first two
//! bytes pick the first list page (and sometimes misalign it); the rest is
//! cut into 512-byte chunks laid at the start of page 0, 1, 2... so small
//! inputs already form chained lists with up to 21 entries per page.
#![no_main]

use heki::PAGE_SIZE;
use heki::abi::{GuestMemoryReader, RamLayout, decode_page_list};
use libfuzzer_sys::fuzz_target;

const PAGES: u64 = 12;
const CHUNK: usize = 512;

struct Memory<'a> {
    bytes: &'a [u8],
    ram: &'a RamLayout,
}

impl GuestMemoryReader for Memory<'_> {
    fn read(&self, gpa: u64, buf: &mut [u8]) -> bool {
        if !self.ram.contains(gpa, buf.len() as u64) {
            return false;
        }
        let Ok(start) = usize::try_from(gpa) else { return false };
        match start.checked_add(buf.len()).and_then(|end| self.bytes.get(start..end)) {
            Some(src) => {
                buf.copy_from_slice(src);
                true
            }
            None => false,
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let [page, misalign, rest @ ..] = data else { return };
    let ram = RamLayout { regions: vec![(0, 6 * PAGE_SIZE), (8 * PAGE_SIZE, PAGES * PAGE_SIZE)] };
    let mut bytes = vec![0u8; (PAGES * PAGE_SIZE) as usize];
    for (i, chunk) in rest.chunks(CHUNK).take(PAGES as usize).enumerate() {
        let at = i * PAGE_SIZE as usize;
        bytes[at..at + chunk.len()].copy_from_slice(chunk);
    }
    // Page PAGES is outside RAM; an odd `misalign` byte misaligns the list.
    let offset = if misalign & 1 == 1 { u64::from(*misalign) } else { 0 };
    let first = u64::from(*page) % (PAGES + 1) * PAGE_SIZE + offset;
    let memory = Memory { bytes: &bytes, ram: &ram };
    if let Ok(ranges) = decode_page_list(&memory, &ram, first) {
        for r in ranges {
            assert!(r.start < r.end, "empty range accepted");
            assert!(ram.contains(r.start * PAGE_SIZE, (r.end - r.start) * PAGE_SIZE), "range outside RAM accepted");
            assert!(r.perms.contains(heki::Permissions::READ), "READ missing");
        }
    }
});
