use kvm_bindings::{KVM_MEM_READONLY, kvm_enable_cap, kvm_pit_config, kvm_userspace_memory_region};
use kvm_ioctls::{Cap, MsrExitReason, MsrFilterDefaultAction, MsrFilterRange, MsrFilterRangeFlags, VmFd};

use crate::error::{HypervisorError, Result, ioctl_err};
use crate::pit::PitState;
use crate::vcpu::Vcpu;

/// One KVM memory slot: guest physical range backed by host memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MemSlot {
    pub slot: u32,
    pub guest_addr: u64,
    pub size: u64,
    pub host_addr: u64,
    /// Guest writes exit to user space as MMIO writes instead of landing.
    pub readonly: bool,
}

/// A KVM virtual machine.
pub struct Vm {
    fd: VmFd,
    max_memslots: usize,
    readonly_memory: bool,
    /// The MSI routes last installed, `(gsi, address, data)`: every routing
    /// table KVM gets is the legacy routes plus these, whoever installs it.
    msi_routes: std::sync::Mutex<Vec<(u32, u64, u32)>>,
}

impl Drop for Vm {
    fn drop(&mut self) {
        if crate::teardown::in_background_on_this_thread() {
            use std::os::fd::AsRawFd;
            // On failure the close below tears the VM down here, as it always did.
            if let Err(e) = crate::teardown::hand_to_collector(self.fd.as_raw_fd()) {
                log::debug!("cannot hand the VM to the kernel for teardown; closing it here: {e}");
            }
        }
    }
}

impl Vm {
    pub(crate) fn new(fd: VmFd, max_memslots: usize, readonly_memory: bool) -> Self {
        Vm { fd, max_memslots, readonly_memory, msi_routes: std::sync::Mutex::new(Vec::new()) }
    }

    /// Creates the x86 platform pieces that live in the kernel from the
    /// start: TSS and identity-map pages and the PIC/IOAPIC/LAPIC irqchip.
    /// The PIT is not among them: see [`Vm::create_pit`].
    ///
    /// Call it after the boot memslots are installed. Every in-kernel device
    /// registered here waits for an SRCU grace period on the VM, and the
    /// kernel spaces back-to-back grace periods a jiffy apart: a memslot
    /// installed after the irqchip waited 4-10 ms for that, one installed on
    /// the fresh VM takes 0.2 ms.
    pub fn setup_platform(&self, tss_addr: u64, identity_map_addr: u64) -> Result<()> {
        self.fd.set_identity_map_address(identity_map_addr).map_err(ioctl_err("KVM_SET_IDENTITY_MAP_ADDR"))?;
        self.fd.set_tss_address(tss_addr as usize).map_err(ioctl_err("KVM_SET_TSS_ADDR"))?;
        self.fd.create_irq_chip().map_err(ioctl_err("KVM_CREATE_IRQCHIP"))?;
        self.enable_emulation_failure_exits();
        Ok(())
    }

    /// Creates the in-kernel 8254 PIT, with port 0x61 (speaker, channel 2
    /// gate) handled in the kernel too; the irqchip must exist. From then on
    /// KVM answers ports 0x40-0x43 and 0x61 without exits.
    ///
    /// The VMM calls this on the guest's first access to those ports rather
    /// than at boot: a VM with a PIT takes 8-16 ms longer to close (the PIT's
    /// teardown waits for SRCU grace periods), and its creation starts a
    /// kernel thread. A Linux guest without kvmclock needs the PIT for its
    /// ticks and calibration; a guest that never touches the ports does not.
    /// Works while vCPUs run; fails with EEXIST if the PIT already exists.
    ///
    /// KVM's PIT raises GSI 0, which KVM's default routing sends to IOAPIC
    /// pin 0; the MP table and the MADT say ISA IRQ 0 is on pin 2, as on a
    /// PC. So this also installs our routing table, which sends GSI 0 to pin
    /// 2 (and the PIC's pin 0). With pin 0, Linux found no ticks on pin 2
    /// ("MP-BIOS bug: 8254 timer not connected to IO-APIC") and spent three
    /// timer checks (0.7 s here) before settling on ExtINT through the PIC.
    pub fn create_pit(&self) -> Result<()> {
        // Flag 1 (KVM_PIT_SPEAKER_DUMMY) keeps port 0x61 in the kernel.
        let pit = kvm_pit_config { flags: 1, ..Default::default() };
        self.fd.create_pit2(pit).map_err(ioctl_err("KVM_CREATE_PIT2"))?;
        let msi = self.msi_routes.lock().unwrap_or_else(|p| p.into_inner());
        self.install_routes(&msi)
    }

    /// The in-kernel PIT's counters and speaker bit.
    pub fn pit_state(&self) -> Result<PitState> {
        self.fd.get_pit2().map(|s| PitState::from(&s)).map_err(ioctl_err("KVM_GET_PIT2"))
    }

    /// Replaces the in-kernel PIT's state. KVM reloads each counter from
    /// its `count`, restarting channel 0's timer in modes 0-5.
    pub fn set_pit_state(&self, state: &PitState) -> Result<()> {
        self.fd.set_pit2(&state.into()).map_err(ioctl_err("KVM_SET_PIT2"))
    }

    /// Asks KVM to include the instruction bytes when its emulator fails;
    /// hosts without the capability still report the failure, without bytes.
    fn enable_emulation_failure_exits(&self) {
        let cap = kvm_enable_cap {
            cap: kvm_bindings::KVM_CAP_EXIT_ON_EMULATION_FAILURE,
            args: [1, 0, 0, 0],
            ..Default::default()
        };
        if let Err(e) = self.fd.enable_cap(&cap) {
            log::debug!("KVM_CAP_EXIT_ON_EMULATION_FAILURE unavailable: {e}");
        }
    }

    pub fn max_memslots(&self) -> usize {
        self.max_memslots
    }

    pub fn has_readonly_memory(&self) -> bool {
        self.readonly_memory
    }

    /// Installs (or replaces) a memory slot.
    ///
    /// # Safety
    /// `host_addr..host_addr + size` must be a mapping owned by the caller that
    /// stays valid until the slot is removed or the VM is dropped.
    pub unsafe fn set_memslot(&self, slot: &MemSlot) -> Result<()> {
        if slot.readonly && !self.readonly_memory {
            return Err(HypervisorError::MissingCapability("KVM_CAP_READONLY_MEM"));
        }
        let region = kvm_userspace_memory_region {
            slot: slot.slot,
            guest_phys_addr: slot.guest_addr,
            memory_size: slot.size,
            userspace_addr: slot.host_addr,
            flags: if slot.readonly { KVM_MEM_READONLY } else { 0 },
        };
        // SAFETY: the caller guarantees the host range is a live mapping for the slot's lifetime.
        unsafe { self.fd.set_user_memory_region(region) }.map_err(ioctl_err("KVM_SET_USER_MEMORY_REGION"))
    }

    /// Deletes a memory slot; guest accesses to its range become MMIO exits.
    pub fn remove_memslot(&self, slot: u32, guest_addr: u64) -> Result<()> {
        let region = kvm_userspace_memory_region {
            slot,
            guest_phys_addr: guest_addr,
            memory_size: 0,
            userspace_addr: 0,
            flags: 0,
        };
        // SAFETY: a zero-sized region deletes the slot; KVM keeps no host pointer afterwards.
        unsafe { self.fd.set_user_memory_region(region) }.map_err(ioctl_err("KVM_SET_USER_MEMORY_REGION"))
    }

    /// Raises or lowers a legacy interrupt line (PIC / IOAPIC pin).
    pub fn set_irq_line(&self, irq: u32, level: bool) -> Result<()> {
        self.fd.set_irq_line(irq, level).map_err(ioctl_err("KVM_IRQ_LINE"))
    }

    /// Delivers an interrupt on `gsi` each time `fd` is signalled.
    pub fn register_irqfd(&self, fd: &vmm_sys_util::eventfd::EventFd, gsi: u32) -> Result<()> {
        self.fd.register_irqfd(fd, gsi).map_err(ioctl_err("KVM_IRQFD"))
    }

    /// Signals `fd` (inside KVM, without an exit) on every guest write to `addr`.
    pub fn register_mmio_ioevent(&self, fd: &vmm_sys_util::eventfd::EventFd, addr: u64) -> Result<()> {
        self.fd
            .register_ioevent(fd, &kvm_ioctls::IoEventAddress::Mmio(addr), kvm_ioctls::NoDatamatch)
            .map_err(ioctl_err("KVM_IOEVENTFD"))
    }

    /// Stops delivering `gsi` on `fd` (a device that was removed).
    pub fn unregister_irqfd(&self, fd: &vmm_sys_util::eventfd::EventFd, gsi: u32) -> Result<()> {
        self.fd.unregister_irqfd(fd, gsi).map_err(ioctl_err("KVM_IRQFD"))
    }

    /// Removes the ioeventfd `register_mmio_ioevent` set for `addr` (a device that was removed).
    pub fn unregister_mmio_ioevent(&self, fd: &vmm_sys_util::eventfd::EventFd, addr: u64) -> Result<()> {
        self.fd
            .unregister_ioevent(fd, &kvm_ioctls::IoEventAddress::Mmio(addr), kvm_ioctls::NoDatamatch)
            .map_err(ioctl_err("KVM_IOEVENTFD"))
    }

    /// Installs the interrupt routing: the legacy PIC/IOAPIC routes
    /// ([`legacy_route_pins`]) plus one MSI route per `(gsi, address, data)`.
    pub fn set_msi_routes(&self, msi: &[(u32, u64, u32)]) -> Result<()> {
        let mut current = self.msi_routes.lock().unwrap_or_else(|p| p.into_inner());
        self.install_routes(msi)?;
        *current = msi.to_vec();
        Ok(())
    }

    fn install_routes(&self, msi: &[(u32, u64, u32)]) -> Result<()> {
        use kvm_bindings::{KVM_IRQ_ROUTING_IRQCHIP, KVM_IRQ_ROUTING_MSI, KvmIrqRouting, kvm_irq_routing_entry};
        let mut entries = Vec::new();
        for (gsi, chip, pin) in legacy_route_pins() {
            let mut e = kvm_irq_routing_entry { gsi, type_: KVM_IRQ_ROUTING_IRQCHIP, ..Default::default() };
            e.u.irqchip.irqchip = chip;
            e.u.irqchip.pin = pin;
            entries.push(e);
        }
        for &(gsi, address, data) in msi {
            let mut e = kvm_irq_routing_entry { gsi, type_: KVM_IRQ_ROUTING_MSI, ..Default::default() };
            e.u.msi.address_lo = address as u32;
            e.u.msi.address_hi = (address >> 32) as u32;
            e.u.msi.data = data;
            entries.push(e);
        }
        let routing = KvmIrqRouting::from_entries(&entries).map_err(|_| HypervisorError::Ioctl {
            op: "KVM_SET_GSI_ROUTING",
            source: std::io::Error::from_raw_os_error(libc::E2BIG),
        })?;
        self.fd.set_gsi_routing(&routing).map_err(ioctl_err("KVM_SET_GSI_ROUTING"))
    }

    pub fn create_vcpu(&self, id: u8) -> Result<Vcpu> {
        let fd = self.fd.create_vcpu(u64::from(id)).map_err(ioctl_err("KVM_CREATE_VCPU"))?;
        Ok(Vcpu::new(fd, id))
    }

    /// Sends filtered `rdmsr`/`wrmsr` to user space as MSR exits.
    pub fn enable_msr_filter_exits(&self) -> Result<()> {
        if !self.fd.check_extension(Cap::X86UserSpaceMsr) {
            return Err(HypervisorError::MissingCapability("KVM_CAP_X86_USER_SPACE_MSR"));
        }
        let cap = kvm_enable_cap {
            cap: kvm_bindings::KVM_CAP_X86_USER_SPACE_MSR,
            args: [u64::from(MsrExitReason::Filter.bits()), 0, 0, 0],
            ..Default::default()
        };
        self.fd.enable_cap(&cap).map_err(ioctl_err("KVM_ENABLE_CAP(X86_USER_SPACE_MSR)"))
    }

    /// Makes guest writes to exactly these MSRs exit to user space; reads and
    /// every other MSR stay in the kernel. An empty list removes the filter.
    pub fn set_msr_write_filter(&self, msrs: &[u32]) -> Result<()> {
        const DENY_ONE: [u8; 1] = [0];
        if msrs.len() > kvm_bindings::KVM_MSR_FILTER_MAX_RANGES as usize {
            return Err(HypervisorError::Ioctl {
                op: "KVM_X86_SET_MSR_FILTER",
                source: std::io::Error::from_raw_os_error(libc::E2BIG),
            });
        }
        let ranges: Vec<MsrFilterRange<'_>> = msrs
            .iter()
            .map(|&base| MsrFilterRange { flags: MsrFilterRangeFlags::WRITE, base, msr_count: 1, bitmap: &DENY_ONE })
            .collect();
        self.fd.set_msr_filter(MsrFilterDefaultAction::ALLOW, &ranges).map_err(ioctl_err("KVM_X86_SET_MSR_FILTER"))
    }
}

/// The legacy interrupt routes as `(gsi, irqchip, pin)`: GSIs 0-15 to the
/// PICs' pins (master 0-7, slave 8-15) and GSIs 0-23 to the IOAPIC's pins,
/// except that GSI 0, the PIT's, goes to IOAPIC pin 2 as the MP table and
/// the MADT's interrupt source override say, and GSI 2, the PICs' cascade,
/// has no route (as QEMU does).
fn legacy_route_pins() -> Vec<(u32, u32, u32)> {
    use kvm_bindings::{KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE};
    let mut routes = Vec::new();
    for gsi in (0..24u32).filter(|&gsi| gsi != 2) {
        routes.push((gsi, KVM_IRQCHIP_IOAPIC, if gsi == 0 { 2 } else { gsi }));
        match gsi {
            0..8 => routes.push((gsi, KVM_IRQCHIP_PIC_MASTER, gsi)),
            8..16 => routes.push((gsi, KVM_IRQCHIP_PIC_SLAVE, gsi - 8)),
            _ => {}
        }
    }
    routes
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvm_bindings::{KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE};

    #[test]
    fn the_pit_gsi_reaches_ioapic_pin_2_and_the_pic_pin_0() {
        let routes = legacy_route_pins();
        let gsi0: Vec<_> = routes.iter().filter(|r| r.0 == 0).collect();
        assert_eq!(gsi0, [&(0, KVM_IRQCHIP_IOAPIC, 2), &(0, KVM_IRQCHIP_PIC_MASTER, 0)]);
        assert!(routes.iter().all(|r| r.0 != 2), "the cascade GSI has no route");
        assert!(!routes.iter().any(|r| r.1 == KVM_IRQCHIP_IOAPIC && r.2 == 0), "nothing else on IOAPIC pin 0");
    }

    #[test]
    fn other_isa_gsis_keep_their_pins() {
        let routes = legacy_route_pins();
        assert!(routes.contains(&(4, KVM_IRQCHIP_IOAPIC, 4)));
        assert!(routes.contains(&(4, KVM_IRQCHIP_PIC_MASTER, 4)));
        assert!(routes.contains(&(12, KVM_IRQCHIP_PIC_SLAVE, 4)));
        assert!(routes.contains(&(23, KVM_IRQCHIP_IOAPIC, 23)));
        assert!(!routes.iter().any(|r| r.0 >= 16 && r.1 != KVM_IRQCHIP_IOAPIC));
    }
}
