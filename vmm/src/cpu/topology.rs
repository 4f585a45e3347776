//! The guest's CPU topology (Cloud Hypervisor's `cpus.topology`): how vCPUs
//! group into threads, cores, dies and packages, and the APIC ids that
//! follow from it.
//!
//! An x2APIC id packs the levels into bit fields, each as wide as its count
//! rounded up to a power of two: `package | die | core | thread`. vCPU `i`
//! is thread `i % t` of core `i / t % c`, and so on (Cloud Hypervisor's
//! numbering). Hekivisor creates vCPU `i` with APIC id `i`, so it accepts a
//! topology only where the two agree for every vCPU (`apic_ids_are_dense`):
//! every level below the topmost one that is above 1 has a power-of-two
//! count. Kata's topology (one thread per core, all vCPUs in one die and
//! package) always is.

use crate::config::CpuTopology;

/// Bits needed for `count` distinct ids.
fn width(count: u8) -> u32 {
    u32::from(count.max(1)).next_power_of_two().trailing_zeros()
}

impl CpuTopology {
    /// All vCPUs as cores of one die in one package, one thread each.
    pub fn flat(cpus: u8) -> CpuTopology {
        CpuTopology { threads_per_core: 1, cores_per_die: cpus.max(1), dies_per_package: 1, packages: 1 }
    }

    /// How many vCPUs the topology describes.
    pub fn vcpus(&self) -> u32 {
        u32::from(self.threads_per_core)
            * u32::from(self.cores_per_die)
            * u32::from(self.dies_per_package)
            * u32::from(self.packages)
    }

    /// Logical processors in one package.
    pub fn per_package(&self) -> u32 {
        u32::from(self.threads_per_core) * u32::from(self.cores_per_die) * u32::from(self.dies_per_package)
    }

    /// Logical processors in one die.
    pub fn per_die(&self) -> u32 {
        u32::from(self.threads_per_core) * u32::from(self.cores_per_die)
    }

    /// Shift of the core id in an APIC id (the thread field's width).
    pub fn thread_width(&self) -> u32 {
        width(self.threads_per_core)
    }

    /// Shift of the die id.
    pub fn core_width(&self) -> u32 {
        self.thread_width() + width(self.cores_per_die)
    }

    /// Shift of the package id.
    pub fn die_width(&self) -> u32 {
        self.core_width() + width(self.dies_per_package)
    }

    /// The x2APIC id of vCPU `cpu` under this topology.
    pub fn apic_id(&self, cpu: u32) -> u32 {
        let t = u32::from(self.threads_per_core.max(1));
        let c = u32::from(self.cores_per_die.max(1));
        let d = u32::from(self.dies_per_package.max(1));
        let thread = cpu % t;
        let core = cpu / t % c;
        let die = cpu / (t * c) % d;
        let package = cpu / (t * c * d);
        thread | (core << self.thread_width()) | (die << self.core_width()) | (package << self.die_width())
    }

    /// Whether vCPU `i` has APIC id `i` for every vCPU.
    pub fn apic_ids_are_dense(&self) -> bool {
        (0..self.vcpus()).all(|cpu| self.apic_id(cpu) == cpu)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn topology(t: u8, c: u8, d: u8, p: u8) -> CpuTopology {
        CpuTopology { threads_per_core: t, cores_per_die: c, dies_per_package: d, packages: p }
    }

    #[test]
    fn widths_round_each_level_up_to_a_power_of_two() {
        let t = topology(2, 3, 2, 1);
        assert_eq!((t.thread_width(), t.core_width(), t.die_width()), (1, 3, 4));
        assert_eq!(t.vcpus(), 12);
        // Thread 1 of core 2 of die 1: 1 | 2 << 1 | 1 << 3.
        assert_eq!(t.apic_id(11), 13);
    }

    #[test]
    fn kata_and_power_of_two_topologies_have_dense_apic_ids() {
        for t in [topology(1, 6, 1, 1), topology(1, 8, 1, 1), topology(2, 2, 2, 2), topology(2, 4, 1, 3)] {
            assert!(t.apic_ids_are_dense(), "{t:?}");
        }
        assert!(CpuTopology::flat(254).apic_ids_are_dense());
    }

    #[test]
    fn odd_counts_below_the_top_level_leave_holes() {
        for t in [topology(3, 2, 1, 1), topology(1, 3, 2, 1), topology(2, 3, 1, 2)] {
            assert!(!t.apic_ids_are_dense(), "{t:?}");
        }
    }
}
