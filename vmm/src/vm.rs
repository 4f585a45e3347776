//! One virtual machine: memory, devices, vCPUs, built from a `VmConfig`.

use std::io::Write;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::Sender;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use hypervisor::{Hypervisor, Vcpu};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

use crate::boot::{BootInputs, Loaded, load_payload};
use crate::config::{ConsoleOutputMode, VmConfig};
use crate::cpu::hook::ExitHook;
use crate::cpu::run_control::VmControl;
use crate::cpu::{ExitCounters, VcpuContext, VcpuEvent, VcpuSetup, boot_registers, kick};
use crate::device_manager::{PciDeviceInfo, PciDevices, build};
use crate::devices::virtio::console::ConsoleHost;
use crate::devices::{AcpiPmDevice, CmosRtc, I8042Device, MmioBus, OnDemandPit, PioBus, SerialDevice};
use crate::guest_access::AccessPolicy;
use crate::guest_access::{Accessor, CheckedMemory};
use crate::heki::{Enforcer, HekiRuntime, HekiSettings};
use crate::introspection::{AgentLink, Hub};
use crate::layout::{self, ports};
use crate::memory::{self, RamRegion};
use crate::traps::VmTraps;
use crate::traps::ports::KvmSlots;

pub use crate::cpu::run_control::VCPU_STOP_TIMEOUT;
pub use crate::vm_error::VmError;

mod memory_hotplug;
mod vcpu_hotplug;

pub use memory_hotplug::MemoryResizeError;

/// Where the guest's serial output goes; it outlives a VM across reboots.
pub type SharedOutput = Arc<Mutex<Box<dyn Write + Send>>>;

/// A `Write` that forwards to the VMM-wide serial output.
struct SharedWriter(SharedOutput);

impl Write for SharedWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).write(buf)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).flush()
    }
}

pub struct Vm {
    // Field order matters on drop: vCPU threads end before KVM objects and memory go.
    threads: Vec<JoinHandle<()>>,
    /// How many vCPU threads have returned from `run_vcpu`; each then unparks
    /// the thread that started it, so `stop` wakes at once instead of polling.
    vcpus_done: Arc<AtomicUsize>,
    /// Non-vCPU threads of this VM (the CR check timer; device workers live in `devices`).
    helpers: Vec<JoinHandle<()>>,
    devices: PciDevices,
    /// Signalled to end the CR-check thread.
    device_stop: EventFd,
    pending_vcpus: Vec<Vcpu>,
    ctx: Arc<VcpuContext>,
    /// heki and the introspection agent; the vCPUs see them as `ctx.hooks`.
    heki: Option<Arc<HekiRuntime>>,
    agent: Option<Arc<AgentLink>>,
    kvm_vm: Arc<hypervisor::Vm>,
    serial: Option<Arc<Mutex<SerialDevice>>>,
    /// Which vCPUs exist, and how to add more (`vm.resize`).
    vcpus: vcpu_hotplug::VcpuSlots,
    /// Memory plugged into the hotplug window (`vm.resize`).
    memory: Option<memory_hotplug::MemoryPlug>,
}

impl Vm {
    /// Builds the VM and loads the payload; vCPUs do not run until `start`.
    pub fn new(
        hv: &Hypervisor,
        config: &VmConfig,
        serial_out: Option<SharedOutput>,
        events: Sender<VcpuEvent>,
        events_wake: &EventFd,
        agent: Option<&Arc<Hub>>,
        console: ConsoleHost<'_>,
    ) -> Result<Vm, VmError> {
        kick::install_kick_handler().map_err(VmError::SpawnVcpu)?;
        let kvm_vm = Arc::new(hv.create_vm()?);
        let ram = memory::ram_regions(config.memory.size);
        let backing = memory::RamBacking::for_config(&config.memory)?;
        let mut guest_ram = memory::create_guest_ram_backed(&ram, &backing)?;
        // The hotplug window, mapped now so that plugged memory needs no new
        // memory map anywhere (`memory/hotplug.rs`); not with huge pages.
        let window = memory::hotplug_window(config).filter(|_| backing.huge_page_size.is_none());
        if let Some(window) = &window {
            guest_ram = memory::map_window(&guest_ram, window, &backing)?;
        }
        // Everything but KVM and the guest-CPU paths uses the host view.
        crate::host_view::watch(&guest_ram.host);
        let mem = guest_ram.host.clone();
        // RAM before the irqchip: a memslot on a fresh VM costs no grace-period wait.
        let boot_slots = memory::register_ram(&kvm_vm, &guest_ram.kvm, window.as_ref())?;
        kvm_vm.setup_platform(layout::KVM_TSS_ADDRESS, layout::KVM_IDENTITY_MAP_ADDRESS)?;
        let control = Arc::new(VmControl::new(events, events_wake.try_clone().map_err(VmError::EventFd)?));
        // Every device access to RAM is judged here, heki enabled or not.
        let enforcer = Arc::new(Enforcer::new(config.heki.policy, control.clone()));
        if let Some(window) = &window {
            enforcer.epoch().unplugged().reserve(window.start, window.end());
        }
        // Read-only memslots and the MSR filter, shared by heki and the introspection agent.
        let traps = (config.heki.enabled || agent.is_some()).then(|| {
            let slots: Vec<(heki::PlannedSlot, u32)> = boot_slots
                .iter()
                .map(|s| (heki::PlannedSlot { gpa: s.guest_addr, size: s.size, readonly: s.readonly }, s.slot))
                .collect();
            let host: Arc<dyn crate::traps::ports::VmSlots> =
                Arc::new(KvmSlots { vm: kvm_vm.clone(), ram: guest_ram.kvm.clone() });
            let budget = crate::heki::runtime::memslot_budget(host.as_ref());
            Arc::new(VmTraps::new(host, enforcer.control_arc(), &slots, budget))
        });
        let heki = match (&traps, config.heki.enabled) {
            (Some(traps), true) => Some(Arc::new(HekiRuntime::with_traps(
                &HekiSettings {
                    cr_check_interval_ms: config.heki.cr_check_interval_ms,
                    translation: config.heki.translation,
                },
                enforcer.clone(),
                traps.clone(),
                &guest_ram,
                // Per-vCPU state for every vCPU the guest may get (hotplug).
                usize::from(config.cpus.max_vcpus),
            ))),
            _ => None,
        };
        let heki_features = heki.as_ref().map(|h| h.features()).unwrap_or(0);
        let heki_leaves: Vec<hypervisor::CpuidEntry> = HekiRuntime::cpuid_leaves(heki.is_some(), heki_features)
            .iter()
            .map(|(leaf, [eax, ebx, ecx, edx])| hypervisor::CpuidEntry {
                function: *leaf,
                eax: *eax,
                ebx: *ebx,
                ecx: *ecx,
                edx: *edx,
                ..Default::default()
            })
            .collect();

        // vCPUs above boot_vcpus are in the tables (for hotplug) but not created.
        let cpus = config.cpus.boot_vcpus;
        let counts = crate::boot::mptable::CpuCounts { boot: cpus, max: config.cpus.max_vcpus };
        let topology = config.cpus.effective_topology();
        let machine = crate::acpi::Machine { cpus: counts, pci_segments: config.pci_segments(), memory_window: window };
        let rsdp = crate::acpi::create_acpi_tables(&mem, machine)?;
        let loaded = load_kernel(&mem, config, &ram, rsdp.0)?;
        let entry = loaded.entry;
        if let (Some(heki), Some(image)) = (&heki, loaded.image) {
            heki.set_kernel_image(image);
        }

        let mut pio = PioBus::default();
        let serial = match (&serial_out, config.serial.mode) {
            (Some(out), mode) if mode != ConsoleOutputMode::Off => {
                let irq = EventFd::new(libc::EFD_NONBLOCK).map_err(VmError::EventFd)?;
                kvm_vm.register_irqfd(&irq, ports::COM1_IRQ)?;
                let dev = Arc::new(Mutex::new(SerialDevice::new(irq, Box::new(SharedWriter(out.clone())))));
                pio.insert(ports::COM1, 8, dev.clone());
                Some(dev)
            }
            _ => None,
        };
        let mut mmio = MmioBus::default();
        let wanted = build::boot_devices(config, &mem, console)?;
        let devices = PciDevices::new(
            config.pci_segments(),
            &kvm_vm,
            &mem,
            &enforcer,
            control.devices.clone(),
            &mut pio,
            &mut mmio,
            wanted,
        )?;
        I8042Device::attach(&mut pio);
        OnDemandPit::new(kvm_vm.clone()).attach(&mut pio);
        pio.insert(ports::CMOS_INDEX, 2, Arc::new(Mutex::new(CmosRtc::default())));
        pio.insert(ports::ACPI_SLEEP_CONTROL, 3, Arc::new(Mutex::new(AcpiPmDevice)));

        let setup = VcpuSetup {
            supported: hv.supported_cpuid()?,
            extra_leaves: heki_leaves,
            topology,
            register_sync: heki.is_some() || agent.is_some(),
        };
        let mut pending_vcpus = Vec::new();
        let mut vcpu_cpuid = Vec::new();
        for id in 0..cpus {
            let (vcpu, leaves) = setup.create(&kvm_vm, id)?;
            vcpu_cpuid.push(leaves);
            if id == 0 {
                let (regs, sregs) = boot_registers(&mem, entry, vcpu.sregs()?).map_err(VmError::BootRegisters)?;
                vcpu.set_sregs(&sregs)?;
                vcpu.set_regs(&regs)?;
            }
            pending_vcpus.push(vcpu);
        }
        // What the agent sees of the vCPUs the host may add later.
        let tsc_khz = pending_vcpus.first().and_then(|v: &hypervisor::Vcpu| v.tsc_khz().ok());
        vcpu_cpuid.extend((cpus..config.cpus.max_vcpus).map(|id| setup.cpuid(id, tsc_khz)));
        let cpu_hotplug = vcpu_hotplug::install(&kvm_vm, config, &mut pio)?;
        let plug = memory_hotplug::MemoryPlug::install(
            &kvm_vm,
            window,
            &guest_ram,
            traps.clone(),
            enforcer.clone(),
            boot_slots.len(),
            &mut pio,
        )?;

        let agent = match (agent, &traps) {
            (Some(hub), Some(traps)) => {
                let memory = CheckedMemory::new(mem.clone(), enforcer.clone(), Arc::new(Accessor::new("agent")));
                let link = Arc::new(AgentLink::new(
                    hub.clone(),
                    traps.clone(),
                    memory,
                    guest_ram.kvm.clone(),
                    control.clone(),
                    heki.clone(),
                    vcpu_cpuid,
                ));
                // Before any vCPU runs: the agent's tracking applies from the first instruction.
                hub.attach(link.clone(), &enforcer);
                Some(link)
            }
            _ => None,
        };
        let ctx = Arc::new(VcpuContext {
            pio,
            mmio,
            mem: guest_ram.kvm.clone(),
            control,
            heki_port: heki.is_some().then_some(ports::HEKI_DOORBELL),
            // The agent first: it may hold an exit for its answer; heki then
            // judges what it let through, so a heki lock holds whatever it says.
            hooks: agent
                .iter()
                .map(|a| a.clone() as Arc<dyn ExitHook>)
                .chain(heki.iter().map(|h| h.clone() as Arc<dyn ExitHook>))
                .collect(),
            counters: (0..config.cpus.max_vcpus).map(|_| ExitCounters::default()).collect(),
            parking: Default::default(),
        });
        let device_stop = EventFd::new(libc::EFD_NONBLOCK).map_err(VmError::EventFd)?;
        Ok(Vm {
            threads: Vec::new(),
            vcpus_done: Arc::new(AtomicUsize::new(0)),
            helpers: Vec::new(),
            devices,
            device_stop,
            pending_vcpus,
            ctx,
            heki,
            agent,
            kvm_vm,
            serial,
            vcpus: vcpu_hotplug::VcpuSlots::new(setup, cpu_hotplug, cpus),
            memory: plug,
        })
    }

    /// Starts every vCPU thread.
    pub fn start(&mut self) -> Result<(), VmError> {
        let vcpus: Vec<hypervisor::Vcpu> = self.pending_vcpus.drain(..).collect();
        for vcpu in vcpus {
            self.spawn_vcpu(vcpu)?;
        }
        self.devices.start()?;
        if let Some(heki) = self.heki.clone() {
            let ctx = self.ctx.clone();
            let interval = Duration::from_millis(heki.cr_check_interval_ms);
            let stop = self.device_stop.try_clone().map_err(VmError::EventFd)?;
            let checker = std::thread::Builder::new()
                .name("heki-cr-check".into())
                .spawn(move || {
                    crate::seccomp::apply_or_exit(crate::seccomp::ThreadKind::CrCheck);
                    // Kick vCPUs out of KVM_RUN so each checks its pinned CR bits;
                    // the stop event ends the wait at once, whatever the interval.
                    while !wait_readable(&stop, interval) {
                        if heki.needs_register_checks() && !ctx.control.vcpus.is_paused() {
                            ctx.control.vcpus.kick_all();
                        }
                    }
                })
                .map_err(VmError::SpawnVcpu)?;
            self.helpers.push(checker);
        }
        Ok(())
    }

    /// `vm.pause`: vCPUs out of guest mode, devices idle.
    pub fn pause(&self) -> Result<(), VmError> {
        Ok(self.ctx.control.pause()?)
    }

    pub fn resume(&self) {
        self.ctx.control.resume();
    }

    /// Whether the run control holds the VM paused (the one place that knows).
    pub fn is_paused(&self) -> bool {
        self.ctx.control.is_paused()
    }

    /// Closes the gates after a heki pause (already closed by whoever
    /// trapped; closing again is harmless and keeps state and gates agreeing).
    pub fn hold_for_heki(&self) {
        self.ctx.control.vcpus.pause();
        self.ctx.control.devices.close();
    }

    /// Feeds host input to the guest's serial port.
    pub fn serial_input(&self, bytes: &[u8]) {
        if let Some(serial) = &self.serial {
            serial.lock().unwrap_or_else(|p| p.into_inner()).enqueue_input(bytes);
        }
    }

    /// Counters for `vm.counters`, one object per component.
    pub fn counters(&self) -> serde_json::Value {
        let mut all = serde_json::Map::new();
        // The vCPUs that exist (a parked one keeps its counts), not every possible one.
        for (id, c) in self.ctx.counters.iter().enumerate().take(usize::from(self.vcpus.created())) {
            all.insert(format!("vcpu{id}"), c.to_json());
        }
        if let Some(heki) = &self.heki {
            all.insert("heki".into(), crate::heki_api::counters(heki));
        }
        if let Some(agent) = &self.agent {
            all.insert("introspection".into(), agent.counters());
        }
        for dev in self.devices.handles() {
            all.insert(dev.name.clone(), dev.to_json());
        }
        serde_json::Value::Object(all)
    }

    /// Per-device I/O and DMA-guard counters.
    pub fn device_counters(&self) -> serde_json::Value {
        self.devices.handles().iter().map(|d| (d.name.clone(), d.to_json())).collect::<serde_json::Map<_, _>>().into()
    }

    /// Adds a device while the VM runs (`vm.add-*`); the guest finds it at the returned slot.
    pub fn add_device(&mut self, device: build::NewDevice) -> Result<PciDeviceInfo, VmError> {
        self.devices.add(device)
    }

    /// Removes a device (`vm.remove-device`); `None` if no device has that id.
    pub fn remove_device(&mut self, id: &str) -> Option<PciDeviceInfo> {
        self.devices.remove(id)
    }

    /// The guest memory devices are built against (virtio-fs shares it).
    pub fn guest_memory(&self) -> &GuestMemoryMmap {
        self.devices.guest_memory()
    }

    pub fn heki(&self) -> Option<&Arc<HekiRuntime>> {
        self.heki.as_ref()
    }

    /// The vCPUs the guest has now (boot ones plus those added, less those removed).
    pub fn vcpu_count(&self) -> usize {
        usize::from(self.vcpus.live())
    }

    /// Stops and joins every vCPU and helper thread, each within a deadline.
    pub fn stop(&mut self) {
        if let Some(agent) = &self.agent {
            agent.detach();
        }
        self.ctx.control.stop();
        self.ctx.parking.wake_all();
        let deadline = std::time::Instant::now() + VCPU_STOP_TIMEOUT;
        let all_done = |vm: &Vm| vm.vcpus_done.load(Ordering::Acquire) >= vm.threads.len();
        while !all_done(self) && std::time::Instant::now() < deadline {
            self.ctx.control.vcpus.kick_all();
            // A returning vCPU thread unparks us (stop runs on the thread that started the VM).
            std::thread::park_timeout(Duration::from_millis(1));
        }
        let _ = self.device_stop.write(1);
        self.devices.stop();
        // Helpers only kick; once they are gone no signal can reach an exited vCPU thread.
        join_within(self.helpers.drain(..), VCPU_STOP_TIMEOUT, "device or CR-check");
        self.ctx.control.vcpus.clear_threads();
        if all_done(self) {
            // Past run_vcpu: only the threads' own exit is left to wait for.
            self.threads.drain(..).for_each(|t| drop(t.join()));
        } else {
            join_within(self.threads.drain(..), Duration::ZERO, "vCPU");
        }
        let _ = &self.kvm_vm;
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Joins threads that finish within `timeout`; the others are left detached.
fn join_within(threads: impl Iterator<Item = JoinHandle<()>>, timeout: Duration, what: &str) {
    let deadline = std::time::Instant::now() + timeout;
    for t in threads {
        while !t.is_finished() && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(1));
        }
        if t.is_finished() {
            let _ = t.join();
        } else {
            log::error!("a {what} thread did not stop in time; leaving it detached");
        }
    }
}

/// Waits up to `timeout` for `fd` to become readable (without reading it).
fn wait_readable(fd: &EventFd, timeout: Duration) -> bool {
    let mut pollfd = libc::pollfd { fd: std::os::fd::AsRawFd::as_raw_fd(fd), events: libc::POLLIN, revents: 0 };
    let millis = libc::c_int::try_from(timeout.as_millis()).unwrap_or(libc::c_int::MAX);
    // SAFETY: `pollfd` is one valid pollfd for the duration of the call.
    let ready = unsafe { libc::poll(&mut pollfd, 1, millis) };
    ready > 0 && pollfd.revents != 0
}

fn load_kernel(mem: &GuestMemoryMmap, config: &VmConfig, ram: &[RamRegion], rsdp: u64) -> Result<Loaded, VmError> {
    let payload = config.payload.as_ref().ok_or(crate::boot::BootError::NoKernel)?;
    let kernel = payload.kernel.as_deref().ok_or(crate::boot::BootError::NoKernel)?;
    let inputs = BootInputs {
        kernel,
        initramfs: payload.initramfs.as_deref(),
        cmdline: payload.cmdline.as_deref().unwrap_or(""),
        ram,
        rsdp,
        keep_image: config.heki.enabled,
    };
    Ok(load_payload(mem, &inputs)?)
}
