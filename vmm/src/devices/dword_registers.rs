//! A block of 32-bit registers on the I/O port bus, as the DSDT's `DWordAcc`
//! fields reach it: only aligned 4-byte accesses mean anything; any other
//! read returns zeros and any other write is dropped, whatever the guest tries.

/// Answers a read of `data.len()` bytes at `offset` with `register(offset)`.
pub fn read(offset: u16, data: &mut [u8], register: impl FnOnce(u16) -> u32) {
    if data.len() != 4 || !offset.is_multiple_of(4) {
        data.fill(0);
        return;
    }
    data.copy_from_slice(&register(offset).to_le_bytes());
}

/// The value of an aligned 4-byte write; `None` for any other write.
pub fn written(offset: u16, data: &[u8]) -> Option<u32> {
    let bytes = <[u8; 4]>::try_from(data).ok()?;
    offset.is_multiple_of(4).then(|| u32::from_le_bytes(bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_aligned_dwords_reach_the_registers() {
        let mut data = [0xffu8; 4];
        read(4, &mut data, |offset| u32::from(offset) << 8);
        assert_eq!(data, [0, 4, 0, 0]);
        let mut short = [0xffu8; 2];
        read(4, &mut short, |_| unreachable!("a 2-byte read"));
        assert_eq!(short, [0, 0]);
        read(2, &mut data, |_| unreachable!("an unaligned read"));
        assert_eq!(data, [0; 4]);
        assert_eq!(written(8, &[1, 0, 0, 0]), Some(1));
        assert_eq!((written(6, &[1, 0, 0, 0]), written(8, &[1, 0])), (None, None));
    }
}
