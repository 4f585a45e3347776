//! Guest memory as heki's pure code reads it (page lists, page tables).

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

/// Adapts guest memory for heki's page-list decoder.
pub(super) struct GuestReader<'a>(pub(super) &'a GuestMemoryMmap);

impl heki::GuestMemoryReader for GuestReader<'_> {
    fn read(&self, gpa: u64, buf: &mut [u8]) -> bool {
        self.0.read_slice(buf, GuestAddress(gpa)).is_ok()
    }
}
