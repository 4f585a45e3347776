//! Fuzzes the heki page-list decoder: guest memory is the input.
#![no_main]

use heki::abi::{GuestMemoryReader, RamLayout, decode_page_list};
use libfuzzer_sys::fuzz_target;

struct Memory<'a>(&'a [u8]);

impl GuestMemoryReader for Memory<'_> {
    fn read(&self, gpa: u64, buf: &mut [u8]) -> bool {
        let Ok(start) = usize::try_from(gpa) else { return false };
        match start.checked_add(buf.len()).and_then(|end| self.0.get(start..end)) {
            Some(src) => {
                buf.copy_from_slice(src);
                true
            }
            None => false,
        }
    }
}

fuzz_target!(|data: &[u8]| {
    if data.len() < 8 {
        return;
    }
    let first = u64::from_le_bytes(data[..8].try_into().unwrap_or_default()) % (data.len() as u64 + 8192);
    let memory = Memory(&data[8..]);
    let ram = RamLayout { regions: vec![(0, data.len() as u64 - 8)] };
    if let Ok(ranges) = decode_page_list(&memory, &ram, first) {
        for r in ranges {
            assert!(r.start < r.end);
        }
    }
});
