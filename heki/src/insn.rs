//! Just enough x86-64 decoding to find the memory operand of an instruction
//! the hypervisor could not emulate, so a write aimed at protected memory is
//! judged as a violation instead of ending the VM. Untrusted input: every
//! malformed byte sequence yields `None`.
// Decodes guest-supplied numbers: no unchecked arithmetic here.
#![deny(clippy::arithmetic_side_effects)]

/// General registers in the order ModRM/SIB numbers them (RAX=0 .. R15=15).
pub type GprFile = [u64; 16];

/// A decoded memory operand.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MemoryOperand {
    /// Guest virtual address of the operand (segment bases other than FS/GS are 0 in long mode).
    pub address: u64,
    /// Bytes the instruction writes there.
    pub size: u64,
    /// Length of the whole instruction.
    pub length: usize,
}

/// Two-byte opcodes (after 0F) that write memory through ModRM and carry no
/// immediate, with how many bytes they write (`None`: depends on REX.W).
fn writes_memory(opcode: u8, reg: u8) -> Option<Option<u64>> {
    match (opcode, reg) {
        (0xc7, 1) => Some(None),              // cmpxchg8b / cmpxchg16b
        (0xae, 0 | 4 | 6) => Some(Some(512)), // fxsave, xsave, xsaveopt (at least the legacy area)
        (0xc3, _) => Some(Some(8)),           // movnti
        (0x2b | 0xe7, _) => Some(Some(16)),   // movntps, movntq/movntdq
        _ => None,
    }
}

/// Decodes `bytes` at `rip` (64-bit mode) with `regs`; `fs_base`/`gs_base`
/// apply to segment-override prefixes.
pub fn decode_memory_write(
    bytes: &[u8],
    rip: u64,
    regs: &GprFile,
    fs_base: u64,
    gs_base: u64,
) -> Option<MemoryOperand> {
    let mut i = 0;
    let mut segment_base = 0;
    let mut address_size_32 = false;
    while let Some(&b) = bytes.get(i) {
        match b {
            0xf0 | 0xf2 | 0xf3 | 0x2e | 0x36 | 0x3e | 0x26 | 0x66 => {}
            0x64 => segment_base = fs_base,
            0x65 => segment_base = gs_base,
            0x67 => address_size_32 = true,
            _ => break,
        }
        i = i.saturating_add(1);
    }
    let mut rex = 0u8;
    if let Some(&b) = bytes.get(i)
        && (0x40..=0x4f).contains(&b)
    {
        rex = b;
        i = i.saturating_add(1);
    }
    if *bytes.get(i)? != 0x0f {
        return None;
    }
    let opcode = *bytes.get(i.saturating_add(1))?;
    let modrm = *bytes.get(i.saturating_add(2))?;
    i = i.saturating_add(3);
    let (mode, reg, rm) = (modrm >> 6, (modrm >> 3) & 7, modrm & 7);
    if mode == 3 {
        return None;
    }
    let size = writes_memory(opcode, reg)?.unwrap_or(if rex & 0x8 != 0 { 16 } else { 8 });
    let rex_b = (rex & 1) << 3;
    let rex_x = ((rex >> 1) & 1) << 3;
    let mut address: u64;
    let mut rip_relative = false;
    if rm == 4 {
        let sib = *bytes.get(i)?;
        i = i.saturating_add(1);
        let (scale, index, base) = (sib >> 6, ((sib >> 3) & 7) | rex_x, (sib & 7) | rex_b);
        address = if index == 4 { 0 } else { regs[usize::from(index)] << scale };
        if sib & 7 == 5 && mode == 0 {
            address = address.wrapping_add(read_disp(bytes, &mut i, 4)?);
        } else {
            address = address.wrapping_add(regs[usize::from(base)]);
        }
    } else if rm == 5 && mode == 0 {
        rip_relative = true;
        address = read_disp(bytes, &mut i, 4)?;
    } else {
        address = regs[usize::from(rm | rex_b)];
    }
    match mode {
        1 => address = address.wrapping_add(read_disp(bytes, &mut i, 1)?),
        2 => address = address.wrapping_add(read_disp(bytes, &mut i, 4)?),
        _ => {}
    }
    if i > 15 {
        return None;
    }
    if rip_relative {
        address = address.wrapping_add(rip).wrapping_add(i as u64);
    }
    if address_size_32 {
        address &= 0xffff_ffff;
    }
    Some(MemoryOperand { address: address.wrapping_add(segment_base), size, length: i })
}

/// Reads a sign-extended displacement of `n` bytes.
fn read_disp(bytes: &[u8], i: &mut usize, n: usize) -> Option<u64> {
    let end = i.checked_add(n)?;
    let raw = bytes.get(*i..end)?;
    *i = end;
    Some(match n {
        1 => raw[0] as i8 as i64 as u64,
        _ => i32::from_le_bytes([raw[0], raw[1], raw[2], raw[3]]) as i64 as u64,
    })
}

#[cfg(test)]
#[allow(clippy::arithmetic_side_effects)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn regs() -> GprFile {
        let mut r = [0u64; 16];
        r[1] = 0x1000; // rcx
        r[5] = 0x2000; // rbp
        r[13] = 0x3000; // r13
        r
    }

    #[test]
    fn lock_cmpxchg16b_rip_relative() {
        // f0 48 0f c7 0d 10 00 00 00: lock cmpxchg16b 0x10(%rip)
        let op = decode_memory_write(&[0xf0, 0x48, 0x0f, 0xc7, 0x0d, 0x10, 0, 0, 0], 0x100000, &regs(), 0, 0)
            .expect("decoded");
        assert_eq!(op, MemoryOperand { address: 0x100000 + 9 + 0x10, size: 16, length: 9 });
    }

    #[test]
    fn base_register_with_displacement_and_rex_b() {
        // 49 0f c7 4d 08: cmpxchg16b 0x8(%r13)
        let op = decode_memory_write(&[0x49, 0x0f, 0xc7, 0x4d, 0x08], 0, &regs(), 0, 0).expect("decoded");
        assert_eq!((op.address, op.size, op.length), (0x3008, 16, 5));
        // 0f c7 09: cmpxchg8b (%rcx)
        let op = decode_memory_write(&[0x0f, 0xc7, 0x09], 0, &regs(), 0, 0).expect("decoded");
        assert_eq!((op.address, op.size, op.length), (0x1000, 8, 3));
    }

    #[test]
    fn sib_and_segment_override() {
        // 65 0f c7 0c 4d 00 01 00 00: cmpxchg8b %gs:0x100(,%rcx,2)
        let op = decode_memory_write(&[0x65, 0x0f, 0xc7, 0x0c, 0x4d, 0, 1, 0, 0], 0, &regs(), 0, 0x9000_0000)
            .expect("decoded");
        assert_eq!(op.address, 0x9000_0000 + 0x100 + 0x2000);
    }

    #[test]
    fn register_operands_and_other_instructions_are_not_memory_writes() {
        assert_eq!(decode_memory_write(&[0x0f, 0xc7, 0xc8], 0, &regs(), 0, 0), None); // mod=3
        assert_eq!(decode_memory_write(&[0x0f, 0xa2], 0, &regs(), 0, 0), None); // cpuid
        assert_eq!(decode_memory_write(&[0x90], 0, &regs(), 0, 0), None);
        assert_eq!(decode_memory_write(&[0x0f, 0xc7], 0, &regs(), 0, 0), None); // truncated
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..20), rip in any::<u64>()) {
            if let Some(op) = decode_memory_write(&bytes, rip, &[u64::MAX; 16], u64::MAX, 1) {
                prop_assert!(op.length <= bytes.len().min(15));
            }
        }
    }
}
