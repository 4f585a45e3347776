//! The CPUID a vCPU presents: KVM's supported set, with topology and the
//! hypervisor leaves filled in.

use hypervisor::CpuidEntry;

use crate::config::CpuTopology;

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

/// Builds the CPUID table for vCPU `cpu_id` (its APIC id) in `topology`.
pub fn vcpu_cpuid(
    supported: &[CpuidEntry],
    cpu_id: u8,
    topology: &CpuTopology,
    extra: &[CpuidEntry],
) -> Vec<CpuidEntry> {
    let mut table: Vec<CpuidEntry> = supported.to_vec();
    // Every level we describe, and the invalid one that ends the list.
    add_sub_leaves(&mut table, LEAF_EXT_TOPOLOGY, 3);
    add_sub_leaves(&mut table, LEAF_EXT_TOPOLOGY_V2, if topology.dies_per_package > 1 { 4 } else { 3 });
    let per_package = topology.per_package();
    for entry in table.iter_mut() {
        match entry.function {
            LEAF_FEATURES => {
                // EBX[31:24] initial APIC id, EBX[23:16] logical processors per package.
                let per_package = per_package.min(0xff);
                entry.ebx = (entry.ebx & 0x0000_ffff) | (u32::from(cpu_id) << 24) | (per_package << 16);
                entry.ecx |= ECX_HYPERVISOR;
                if per_package > 1 {
                    entry.edx |= EDX_HTT;
                } else {
                    entry.edx &= !EDX_HTT;
                }
            }
            LEAF_CACHE_TOPOLOGY => cache_leaf(entry, topology),
            LEAF_EXT_TOPOLOGY => topology_leaf(entry, cpu_id, topology, false),
            LEAF_EXT_TOPOLOGY_V2 => topology_leaf(entry, cpu_id, topology, true),
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

/// Makes sure `leaf`, if the host offers it at all, has sub-leaves
/// `0..count`: a host may list fewer levels than the guest's topology has
/// (one with a single core per package lists only the SMT level).
fn add_sub_leaves(table: &mut Vec<CpuidEntry>, leaf: u32, count: u32) {
    let Some(first) = table.iter().find(|e| e.function == leaf).copied() else { return };
    for index in 0..count {
        if !table.iter().any(|e| e.function == leaf && e.index == index) {
            table.push(CpuidEntry { index, flags: first.flags | KVM_CPUID_FLAG_SIGNIFCANT_INDEX, ..first });
        }
    }
}

/// KVM_CPUID_FLAG_SIGNIFCANT_INDEX (KVM's spelling): the sub-leaf matters.
const KVM_CPUID_FLAG_SIGNIFCANT_INDEX: u32 = 1;

/// Leaf 0x15 (TSC and core crystal clock): KVM's local APIC timer counts at
/// 1 GHz, so that is the crystal; the TSC/crystal ratio is the closest
/// fraction whose terms keep Linux's `crystal kHz × numerator` within 32 bits.
/// Without it, a guest must time its TSC against the PIT, which fails on a
/// loaded host here; a hardware-reduced ACPI guest has no PIT tick to fall
/// back on and never gets a timer interrupt (docs/linux-guest.md).
const LEAF_TSC: u32 = 0x15;
const CRYSTAL_HZ: u32 = 1_000_000_000;

pub fn tsc_frequency_leaf(tsc_khz: u32) -> Option<CpuidEntry> {
    let crystal_khz = u64::from(CRYSTAL_HZ / 1000);
    let largest = u64::from(u32::MAX) / crystal_khz;
    let tsc_khz = u64::from(tsc_khz);
    let (error, denominator, numerator) = (1..=largest)
        .filter_map(|denominator| {
            let numerator = (tsc_khz * denominator + crystal_khz / 2) / crystal_khz;
            let error = (numerator * crystal_khz).abs_diff(tsc_khz * denominator) * 1_000_000 / denominator;
            (1..=largest).contains(&numerator).then_some((error, denominator, numerator))
        })
        .min()?;
    log::debug!("TSC {tsc_khz} kHz as 1 GHz x {numerator}/{denominator} (off by {} ppm)", error / tsc_khz.max(1));
    Some(CpuidEntry {
        function: LEAF_TSC,
        eax: denominator as u32,
        ebx: numerator as u32,
        ecx: CRYSTAL_HZ,
        ..Default::default()
    })
}

/// Leaf 4 (deterministic cache parameters), one sub-leaf per cache:
/// EAX[25:14] is the number of APIC ids sharing the cache - 1 (L1 and L2
/// per core, L3 per package), EAX[31:26] the number of core ids in the
/// package - 1.
fn cache_leaf(entry: &mut CpuidEntry, topology: &CpuTopology) {
    let level = (entry.eax >> 5) & 0x7;
    let sharing_width = if level >= 3 { topology.die_width() } else { topology.thread_width() };
    let sharing = ((1u32 << sharing_width) - 1).min(0xfff);
    let cores = ((1u32 << (topology.die_width() - topology.thread_width())) - 1).min(0x3f);
    entry.eax = (entry.eax & 0x0000_3fff) | (sharing << 14) | (cores << 26);
}

/// Level types in ECX[15:8] of leaves 0xB and 0x1F.
const LEVEL_INVALID: u32 = 0;
const LEVEL_SMT: u32 = 1;
const LEVEL_CORE: u32 = 2;
const LEVEL_DIE: u32 = 5;

/// Leaves 0xB and 0x1F, one sub-leaf per level: EAX the shift to the next
/// level's id, EBX the logical processors at this level, ECX the level
/// number and type, EDX the x2APIC id. Leaf 0xB knows no dies: its core
/// level spans the package. Leaf 0x1F has a die level when there are
/// several dies.
fn topology_leaf(entry: &mut CpuidEntry, cpu_id: u8, topology: &CpuTopology, v2: bool) {
    let dies = v2 && topology.dies_per_package > 1;
    let mut levels = vec![(topology.thread_width(), u32::from(topology.threads_per_core), LEVEL_SMT)];
    if dies {
        levels.push((topology.core_width(), topology.per_die(), LEVEL_CORE));
        levels.push((topology.die_width(), topology.per_package(), LEVEL_DIE));
    } else {
        levels.push((topology.die_width(), topology.per_package(), LEVEL_CORE));
    }
    let (eax, ebx, kind) = levels.get(entry.index as usize).copied().unwrap_or((0, 0, LEVEL_INVALID));
    entry.eax = eax;
    entry.ebx = ebx;
    entry.ecx = (kind << 8) | (entry.index & 0xff);
    entry.edx = u32::from(cpu_id);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_tsc_leaf_gives_linux_the_tsc_frequency_without_overflow() {
        for tsc_khz in [2_599_998u32, 1_000_000, 3_000_000, 4_500_123, 800_000] {
            let entry = tsc_frequency_leaf(tsc_khz).expect("a leaf");
            assert_eq!(entry.ecx, CRYSTAL_HZ);
            // Linux: crystal_khz * ebx / eax, in 32-bit unsigned arithmetic.
            let crystal_khz = entry.ecx / 1000;
            let product = crystal_khz.checked_mul(entry.ebx).expect("no 32-bit overflow");
            let guest_khz = f64::from(product / entry.eax);
            let off = (guest_khz - f64::from(tsc_khz)).abs() / f64::from(tsc_khz);
            // A few ppm at 2.6 GHz; the 32-bit bound costs precision on faster TSCs.
            assert!(off < 1e-4, "{tsc_khz} kHz read as {guest_khz} ({}/{})", entry.ebx, entry.eax);
        }
        assert!(tsc_frequency_leaf(0).is_none());
    }

    fn leaf(function: u32, index: u32) -> CpuidEntry {
        CpuidEntry { function, index, ..Default::default() }
    }

    #[test]
    fn leaf1_reports_apic_id_count_and_hypervisor_bit() {
        let table = vcpu_cpuid(&[leaf(1, 0)], 3, &CpuTopology::flat(4), &[]);
        let l1 = table[0];
        assert_eq!(l1.ebx >> 24, 3);
        assert_eq!((l1.ebx >> 16) & 0xff, 4);
        assert_ne!(l1.ecx & ECX_HYPERVISOR, 0);
        assert_ne!(l1.edx & EDX_HTT, 0);
    }

    #[test]
    fn topology_leaf_gives_x2apic_id_and_core_count() {
        let table = vcpu_cpuid(&[leaf(0xb, 0), leaf(0xb, 1)], 2, &CpuTopology::flat(3), &[]);
        assert_eq!(table[0].edx, 2);
        assert_eq!(table[1].ebx, 3);
        assert_eq!(table[1].eax, 2);
    }

    /// The registers Linux reads for `/sys/devices/system/cpu/cpuN/topology`.
    #[test]
    fn two_threads_two_cores_two_dies_two_packages() {
        let topology = CpuTopology { threads_per_core: 2, cores_per_die: 2, dies_per_package: 2, packages: 2 };
        let mut l4_l1 = leaf(4, 0);
        l4_l1.eax = 1 << 5; // level 1
        let mut l4_l3 = leaf(4, 3);
        l4_l3.eax = 3 << 5; // level 3
        // A host that lists only the first level of each topology leaf.
        let host = [leaf(1, 0), l4_l1, l4_l3, leaf(0xb, 0), leaf(0x1f, 0)];
        // vCPU 13 = thread 1 of core 0 of die 1 of package 1.
        let table = vcpu_cpuid(&host, 13, &topology, &[]);
        let get = |f: u32, i: u32| *table.iter().find(|e| e.function == f && e.index == i).expect("leaf present");
        assert_eq!((get(1, 0).ebx >> 16) & 0xff, 8, "logical processors per package");
        assert_ne!(get(1, 0).edx & EDX_HTT, 0);
        assert_eq!((get(4, 0).eax >> 14) & 0xfff, 1, "L1 shared by the two threads of a core");
        assert_eq!((get(4, 3).eax >> 14) & 0xfff, 7, "L3 shared by the package");
        assert_eq!(get(4, 0).eax >> 26, 3, "four core ids per package");
        let regs = |e: CpuidEntry| (e.eax, e.ebx, e.ecx, e.edx);
        assert_eq!(regs(get(0xb, 0)), (1, 2, 1 << 8, 13), "SMT: shift 1, 2 threads");
        assert_eq!(regs(get(0xb, 1)), (3, 8, (2 << 8) | 1, 13), "core level spans the package");
        assert_eq!(regs(get(0xb, 2)), (0, 0, 2, 13), "end of the list");
        assert_eq!(regs(get(0x1f, 1)), (2, 4, (2 << 8) | 1, 13), "cores: shift 2, 4 per die");
        assert_eq!(regs(get(0x1f, 2)), (3, 8, (5 << 8) | 2, 13), "dies: shift 3, 8 per package");
        assert_eq!(regs(get(0x1f, 3)), (0, 0, 3, 13), "end of the list");
        assert_eq!(get(0x1f, 3).flags & KVM_CPUID_FLAG_SIGNIFCANT_INDEX, 1, "sub-leaves are told apart");
    }

    #[test]
    fn one_vcpu_has_no_htt() {
        let table = vcpu_cpuid(&[leaf(1, 0)], 0, &CpuTopology::flat(1), &[]);
        assert_eq!(table[0].edx & EDX_HTT, 0);
    }

    #[test]
    fn extra_leaves_replace_existing_ones() {
        let extra = CpuidEntry { function: 0x4000_0100, eax: 7, ..Default::default() };
        let table = vcpu_cpuid(&[leaf(0x4000_0100, 0)], 0, &CpuTopology::flat(1), &[extra]);
        assert_eq!(table.iter().filter(|e| e.function == 0x4000_0100).count(), 1);
        assert_eq!(table.iter().find(|e| e.function == 0x4000_0100).map(|e| e.eax), Some(7));
    }
}
