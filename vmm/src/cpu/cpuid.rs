//! The CPUID a vCPU presents: KVM's supported set, with topology and the
//! hypervisor leaves filled in.

use hypervisor::CpuidEntry;

const LEAF_FEATURES: u32 = 0x1;
const LEAF_CACHE_TOPOLOGY: u32 = 0x4;
const LEAF_EXT_TOPOLOGY: u32 = 0xb;
const LEAF_EXT_TOPOLOGY_V2: u32 = 0x1f;
const LEAF_HYPERVISOR: u32 = 0x4000_0000;

const ECX_HYPERVISOR: u32 = 1 << 31;
const EDX_HTT: u32 = 1 << 28;
/// Hypervisor signature: "HekiHekiHeki" is ours; KVM's leaves stay at 0x40000000.
const KVM_SIGNATURE: [u32; 3] = [0x4b4d_564b, 0x564b_4d56, 0x0000_004d];

/// Extra leaves the VMM adds (the heki discovery leaves).
pub type ExtraLeaves = Vec<CpuidEntry>;

/// Builds the CPUID table for vCPU `cpu_id` of `cpu_count`.
pub fn vcpu_cpuid(supported: &[CpuidEntry], cpu_id: u8, cpu_count: u8, extra: &[CpuidEntry]) -> Vec<CpuidEntry> {
    let mut table: Vec<CpuidEntry> = supported.to_vec();
    for entry in table.iter_mut() {
        match entry.function {
            LEAF_FEATURES => {
                entry.ebx = (entry.ebx & 0x0000_ffff) | (u32::from(cpu_id) << 24) | (u32::from(cpu_count) << 16);
                entry.ecx |= ECX_HYPERVISOR;
                if cpu_count > 1 {
                    entry.edx |= EDX_HTT;
                } else {
                    entry.edx &= !EDX_HTT;
                }
            }
            LEAF_CACHE_TOPOLOGY => {
                // EAX[31:26]: cores per package - 1; one thread per core.
                entry.eax = (entry.eax & 0x03ff_ffff) | (u32::from(cpu_count.saturating_sub(1)) << 26);
            }
            LEAF_EXT_TOPOLOGY | LEAF_EXT_TOPOLOGY_V2 => topology_leaf(entry, cpu_id, cpu_count),
            LEAF_HYPERVISOR => {
                entry.ebx = KVM_SIGNATURE[0];
                entry.ecx = KVM_SIGNATURE[1];
                entry.edx = KVM_SIGNATURE[2];
            }
            _ => {}
        }
    }
    for leaf in extra {
        table.retain(|e| !(e.function == leaf.function && e.index == leaf.index));
        table.push(*leaf);
    }
    table
}

/// Leaf 0xB/0x1F: level 0 = SMT (1 thread), level 1 = core (all vCPUs).
fn topology_leaf(entry: &mut CpuidEntry, cpu_id: u8, cpu_count: u8) {
    let core_bits = u32::from(cpu_count).next_power_of_two().trailing_zeros();
    entry.edx = u32::from(cpu_id);
    match entry.index {
        0 => {
            entry.eax = 0;
            entry.ebx = 1;
            entry.ecx = 1 << 8;
        }
        1 => {
            entry.eax = core_bits;
            entry.ebx = u32::from(cpu_count);
            entry.ecx = (2 << 8) | 1;
        }
        level => {
            entry.eax = 0;
            entry.ebx = 0;
            entry.ecx = level;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn leaf(function: u32, index: u32) -> CpuidEntry {
        CpuidEntry { function, index, ..Default::default() }
    }

    #[test]
    fn leaf1_reports_apic_id_count_and_hypervisor_bit() {
        let table = vcpu_cpuid(&[leaf(1, 0)], 3, 4, &[]);
        let l1 = table[0];
        assert_eq!(l1.ebx >> 24, 3);
        assert_eq!((l1.ebx >> 16) & 0xff, 4);
        assert_ne!(l1.ecx & ECX_HYPERVISOR, 0);
        assert_ne!(l1.edx & EDX_HTT, 0);
    }

    #[test]
    fn topology_leaf_gives_x2apic_id_and_core_count() {
        let table = vcpu_cpuid(&[leaf(0xb, 0), leaf(0xb, 1)], 2, 3, &[]);
        assert_eq!(table[0].edx, 2);
        assert_eq!(table[1].ebx, 3);
        assert_eq!(table[1].eax, 2);
    }

    #[test]
    fn extra_leaves_replace_existing_ones() {
        let extra = CpuidEntry { function: 0x4000_0100, eax: 7, ..Default::default() };
        let table = vcpu_cpuid(&[leaf(0x4000_0100, 0)], 0, 1, &[extra]);
        assert_eq!(table.iter().filter(|e| e.function == 0x4000_0100).count(), 1);
        assert_eq!(table.iter().find(|e| e.function == 0x4000_0100).map(|e| e.eax), Some(7));
    }
}
