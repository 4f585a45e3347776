//! The VMM thread: owns the VM, reacts to vCPU events and API requests.
//!
//! Other threads never touch VM state: vCPU threads send `VcpuEvent`s, the
//! API thread sends requests, each over a channel plus an eventfd that wakes
//! this thread's epoll loop.

use std::io::Read;
use std::sync::mpsc::{Receiver, Sender, channel};
use std::sync::{Arc, Mutex};

use hypervisor::Hypervisor;
use thiserror::Error;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use crate::config::{ConsoleOutputMode, VmConfig};
use crate::cpu::VcpuEvent;
use crate::devices::virtio::console::{ConsoleHost, Pty};
use crate::vm::{SharedOutput, Vm, VmError};
pub use crate::vm_state::VmState;

#[derive(Debug, Error)]
pub enum VmmError {
    #[error(transparent)]
    Hypervisor(#[from] hypervisor::HypervisorError),
    #[error(transparent)]
    Vm(#[from] VmError),
    #[error("cannot open serial output file {path}")]
    SerialFile {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("serial mode File needs a file path")]
    SerialFileMissing,
    #[error("VMM event loop failed")]
    EventLoop(#[source] std::io::Error),
    #[error("the guest failed: {0}")]
    GuestFailed(String),
    #[error(transparent)]
    Introspection(#[from] crate::introspection::IntrospectionError),
    #[error(transparent)]
    Seccomp(#[from] crate::seccomp::SeccompError),
    #[error(transparent)]
    Sandbox(#[from] crate::sandbox::SandboxError),
}

/// How to run the VMM.
pub struct VmmRunConfig {
    /// Boot this VM at once (the CLI's `--kernel`).
    pub vm: Option<VmConfig>,
    /// Serve the REST API on this socket.
    pub api_listener: Option<std::os::unix::net::UnixListener>,
    /// A guest reboot ends the VMM (exit 0) instead of rebooting.
    pub no_reboot: bool,
    /// The API socket file the binary removes at exit (landlock keeps that allowed).
    pub api_socket_path: Option<std::path::PathBuf>,
}

const TOKEN_VCPU: u64 = 1;
const TOKEN_API: u64 = 2;
const TOKEN_STDIN: u64 = 3;
const TOKEN_SIGNAL: u64 = 4;

pub(crate) struct Vmm {
    pub(crate) hv: Hypervisor,
    pub(crate) config: Option<VmConfig>,
    pub(crate) vm: Option<Vm>,
    /// The lifecycle (Created, Running, Shutdown): never `Paused`, which is
    /// the run control's to know (its gates); `state()` combines the two.
    pub(crate) state: VmState,
    serial_out: Option<SharedOutput>,
    vcpu_tx: Sender<VcpuEvent>,
    vcpu_rx: Receiver<VcpuEvent>,
    vcpu_wake: EventFd,
    stdin_rx: Receiver<Vec<u8>>,
    stdin_wake: EventFd,
    stdin_forwarding: bool,
    no_reboot: bool,
    /// With an API socket the VMM outlives its VM.
    api_mode: bool,
    /// Set when the VMM should exit, with its exit status.
    pub(crate) exit_status: Option<Result<i32, VmmError>>,
    api_socket_path: Option<std::path::PathBuf>,
    /// landlock binds this thread for good once the first VM boots.
    landlocked: bool,
    /// The introspection agent's channel, once a VM config asked for one.
    introspection: Option<crate::introspection::Introspection>,
    /// The virtio console's pseudo-terminal (mode `Pty`): one per VM
    /// configuration, kept across reboots.
    pub(crate) console_pty: Option<Pty>,
    /// TAP descriptors `vm.add-net` received, by device id: the config
    /// names them, and every boot of this config duplicates them.
    pub(crate) hotplug_fds: std::collections::HashMap<String, Vec<std::os::fd::OwnedFd>>,
}

/// Runs the VMM until the guest powers off (CLI) or `vmm.shutdown` (API).
pub fn run(run_config: VmmRunConfig) -> Result<i32, VmmError> {
    // The VMM thread's filter also bounds every thread started from here on.
    crate::seccomp::apply(crate::seccomp::ThreadKind::Vmm)?;
    let hv = Hypervisor::new()?;
    let (vcpu_tx, vcpu_rx) = channel();
    let (_stdin_tx, stdin_rx) = channel();
    let new_fd = || EventFd::new(libc::EFD_NONBLOCK).map_err(VmmError::EventLoop);
    let mut vmm = Vmm {
        hv,
        config: None,
        vm: None,
        state: VmState::Shutdown,
        serial_out: None,
        vcpu_tx,
        vcpu_rx,
        vcpu_wake: new_fd()?,
        stdin_rx,
        stdin_wake: new_fd()?,
        stdin_forwarding: false,
        no_reboot: run_config.no_reboot,
        api_mode: run_config.api_listener.is_some(),
        exit_status: None,
        api_socket_path: run_config.api_socket_path.clone(),
        landlocked: false,
        introspection: None,
        console_pty: None,
        hotplug_fds: Default::default(),
    };
    // A VM given on the command line has its landlock rules known now: restrict
    // before the signal and API threads start, so that they are bound too
    // (landlock binds the calling thread and the threads it starts later).
    if let Some(config) = run_config.vm.as_ref().filter(|c| c.landlock_enable) {
        vmm.open_console_pty(config)?;
        crate::sandbox::restrict(&crate::sandbox::rules(config, vmm.api_socket_path.as_deref()))?;
        vmm.landlocked = true;
    }
    let epoll = Epoll::new().map_err(VmmError::EventLoop)?;
    let watch = |fd: &EventFd, token: u64| {
        epoll
            .ctl(ControlOperation::Add, std::os::fd::AsRawFd::as_raw_fd(fd), EpollEvent::new(EventSet::IN, token))
            .map_err(VmmError::EventLoop)
    };
    watch(&vmm.vcpu_wake, TOKEN_VCPU)?;
    watch(&vmm.stdin_wake, TOKEN_STDIN)?;
    let signal_wake = new_fd()?;
    watch(&signal_wake, TOKEN_SIGNAL)?;
    crate::signals::start_signal_thread(signal_wake.try_clone().map_err(VmmError::EventLoop)?)
        .map_err(VmmError::EventLoop)?;
    let api = match run_config.api_listener {
        Some(listener) => {
            let (api, wake) = crate::api_handler::start(listener).map_err(VmmError::EventLoop)?;
            watch(&wake, TOKEN_API)?;
            Some((api, wake))
        }
        None => None,
    };
    crate::events::emit("vmm", "starting", &[]);

    if let Some(config) = run_config.vm {
        vmm.create(config);
        if let Err(e) = vmm.boot() {
            crate::events::emit("vmm", "shutdown", &[]);
            return Err(e);
        }
    }

    let mut events = vec![EpollEvent::default(); 4];
    while vmm.exit_status.is_none() {
        let n = match epoll.wait(-1, &mut events) {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(VmmError::EventLoop(e)),
        };
        for event in &events[..n] {
            match event.data() {
                TOKEN_VCPU => vmm.drain_vcpu_events(),
                TOKEN_STDIN => {
                    let _ = vmm.stdin_wake.read();
                    while let Ok(bytes) = vmm.stdin_rx.try_recv() {
                        if let Some(vm) = &vmm.vm {
                            vm.serial_input(&bytes);
                        }
                    }
                }
                TOKEN_SIGNAL => {
                    let _ = signal_wake.read();
                    let signal = crate::signals::received().map_or("signal", crate::signals::name);
                    log::info!("{signal}: stopping the VM");
                    crate::events::emit("vmm", "signal", &[("signal", signal.to_string())]);
                    vmm.exit_status = Some(Ok(0));
                }
                TOKEN_API => {
                    if let Some((api, wake)) = &api {
                        let _ = wake.read();
                        // vCPU events first: a heki pause already in the gates is
                        // in the state before any request reads or changes it.
                        vmm.drain_vcpu_events();
                        api.drain(&mut vmm);
                    }
                }
                _ => {}
            }
        }
    }
    // The process exits next: KVM's own teardown of the VM (8-16 ms of grace
    // periods) need not hold up the exit status or the last event.
    hypervisor::tear_down_vms_in_background_on_this_thread();
    vmm.shutdown_vm();
    crate::events::emit("vmm", "shutdown", &[]);
    crate::events::flush();
    if api.is_some() {
        crate::api::drain_connections(std::time::Duration::from_secs(5));
    }
    vmm.exit_status.unwrap_or(Ok(0))
}

impl Vmm {
    /// Records the configuration (state Created).
    pub(crate) fn create(&mut self, config: VmConfig) {
        self.config = Some(config);
        self.state = VmState::Created;
        // An agent may connect before the boot; a failure is reported by `boot`.
        if let Err(e) = self.start_introspection() {
            log::warn!("{}", crate::error_chain(&e));
        }
    }

    /// Opens the agent socket the configuration names (once per VMM and path).
    fn start_introspection(&mut self) -> Result<(), VmmError> {
        let Some(config) = self.config.as_ref() else { return Ok(()) };
        let Some(wanted) = &config.introspection else { return Ok(()) };
        let ram = crate::memory::ram_regions(config.memory.size)
            .iter()
            .map(|r| (r.start, r.start.saturating_add(r.size)))
            .collect();
        let vcpus = usize::from(config.cpus.boot_vcpus);
        if self.introspection.as_ref().is_none_or(|i| i.socket() != wanted.socket.as_path()) {
            let caps = crate::introspection::HostCaps {
                readonly_memory: self.hv.has_readonly_memory(),
                msr_filter: self.hv.has_msr_filter(),
                guest_debug: self.hv.has_guest_debug(),
            };
            self.introspection = Some(crate::introspection::Introspection::start(wanted, caps)?);
        }
        if let Some(introspection) = &self.introspection {
            introspection.set_vm_shape(vcpus, ram, config.heki.enabled);
        }
        Ok(())
    }

    /// Builds and starts the VM from the stored configuration.
    pub(crate) fn boot(&mut self) -> Result<(), VmmError> {
        let mut config = self.config.clone().ok_or(VmmError::GuestFailed("no VM configured".into()))?;
        crate::events::emit("vm", "booting", &[]);
        if self.serial_out.is_none() {
            self.serial_out = serial_output(&config)?;
        }
        self.open_console_pty(&config)?;
        if let Some(pty) = &self.console_pty {
            // Reported where Cloud Hypervisor reports it: vm.info's console.file.
            config.console.file = Some(pty.path.clone());
            if let Some(stored) = self.config.as_mut() {
                stored.console.file = Some(pty.path.clone());
            }
        }
        // Before any thread this boot starts (stdin, introspection, the VM's own).
        if config.landlock_enable && !self.landlocked {
            crate::sandbox::restrict(&crate::sandbox::rules(&config, self.api_socket_path.as_deref()))?;
            self.landlocked = true;
        }
        // stdin goes to one reader: the virtio console when both are Tty (as
        // its input; the serial port still writes to stdout), else the serial port.
        let console_tty = config.console.mode == ConsoleOutputMode::Tty;
        if config.serial.mode == ConsoleOutputMode::Tty && !console_tty && !self.stdin_forwarding {
            self.start_stdin_forwarding();
        }
        if console_tty && self.stdin_forwarding {
            log::warn!("virtio console: stdin already feeds the serial port (an earlier VM); the console has no input");
        }
        let console_stdin = console_tty && !self.stdin_forwarding;
        self.start_introspection()?;
        let agent = match (&config.introspection, &self.introspection) {
            (Some(_), Some(introspection)) => Some(introspection.hub().clone()),
            _ => None,
        };
        let console = ConsoleHost { pty: self.console_pty.as_ref(), stdin: console_stdin };
        let mut vm = Vm::new(
            &self.hv,
            &config,
            self.serial_out.clone(),
            self.vcpu_tx.clone(),
            &self.vcpu_wake,
            agent.as_ref(),
            console,
        )?;
        vm.start()?;
        self.vm = Some(vm);
        self.state = VmState::Running;
        crate::events::emit("vm", "booted", &[]);
        Ok(())
    }

    /// Opens the console's pseudo-terminal if `config` asks for one and none
    /// is open yet. Before landlock: /dev/ptmx is not among its paths.
    fn open_console_pty(&mut self, config: &VmConfig) -> Result<(), VmmError> {
        if config.console.mode == ConsoleOutputMode::Pty && self.console_pty.is_none() {
            let pty =
                Pty::open().map_err(|e| VmmError::GuestFailed(format!("cannot open a pty for the console: {e}")))?;
            log::info!("virtio console: pty {}", pty.path.display());
            self.console_pty = Some(pty);
        }
        Ok(())
    }

    /// Stops the VM's vCPUs and frees it; the configuration stays.
    pub(crate) fn shutdown_vm(&mut self) {
        if !self.api_mode {
            // Without an API the process ends with the VM (`finish_if_cli`), so
            // KVM's own teardown (8-16 ms of grace periods) can run after it.
            hypervisor::tear_down_vms_in_background_on_this_thread();
        }
        if let Some(mut vm) = self.vm.take() {
            vm.stop();
            if let Some(heki) = vm.heki() {
                heki.violations().flush_suppressed();
            }
            if let Some(out) = &self.serial_out {
                let _ = out.lock().unwrap_or_else(|p| p.into_inner()).flush();
            }
            crate::events::emit("vm", "shutdown", &[]);
        }
        if self.config.is_some() {
            self.state = VmState::Shutdown;
        }
    }

    /// Reboots: a fresh VM from the same configuration (fresh RAM, kernel reloaded).
    pub(crate) fn reboot(&mut self) -> Result<(), VmmError> {
        crate::events::emit("vm", "rebooting", &[]);
        if let Some(mut vm) = self.vm.take() {
            vm.stop();
        }
        // Events from the old vCPUs are stale now.
        while self.vcpu_rx.try_recv().is_ok() {}
        // Before the new guest runs, so that the event precedes anything it does.
        if self.config.as_ref().is_some_and(|c| c.heki.enabled) {
            crate::events::emit(
                "heki",
                "reset",
                &[("reason", "guest reboot: protections and pins cleared, all memory shared again".to_string())],
            );
        }
        self.boot()?;
        crate::events::emit("vm", "rebooted", &[]);
        Ok(())
    }

    /// The VM's state: its lifecycle, and for a running VM whether the run
    /// control holds it paused (by `vm.pause` or by a heki violation).
    pub(crate) fn state(&self) -> VmState {
        match &self.vm {
            Some(vm) if self.state == VmState::Running && vm.is_paused() => VmState::Paused,
            _ => self.state,
        }
    }

    /// Holds every vCPU out of guest mode (API `vm.pause`, heki `pause` policy).
    pub(crate) fn pause(&mut self) -> Result<(), VmmError> {
        let Some(vm) = &self.vm else { return Ok(()) };
        if self.state() != VmState::Running {
            return Ok(());
        }
        crate::events::emit("vm", "pausing", &[]);
        vm.pause()?;
        crate::events::emit("vm", "paused", &[]);
        Ok(())
    }

    pub(crate) fn resume(&mut self) {
        let Some(vm) = &self.vm else { return };
        if self.state() != VmState::Paused {
            return;
        }
        crate::events::emit("vm", "resuming", &[]);
        vm.resume();
        crate::events::emit("vm", "resumed", &[]);
    }

    /// Per-component counters for `vm.counters`.
    pub(crate) fn counters(&self) -> serde_json::Value {
        match &self.vm {
            Some(vm) => vm.counters(),
            None => serde_json::json!({}),
        }
    }

    fn drain_vcpu_events(&mut self) {
        let _ = self.vcpu_wake.read();
        while let Ok(event) = self.vcpu_rx.try_recv() {
            self.on_vcpu_event(event);
        }
    }

    fn on_vcpu_event(&mut self, event: VcpuEvent) {
        if self.vm.is_none() {
            return;
        }
        match event {
            VcpuEvent::PowerOff { vcpu } => {
                log::info!("guest powered off (vCPU {vcpu})");
                crate::events::emit("guest", "poweroff", &[("vcpu", vcpu.to_string())]);
                self.shutdown_vm();
                self.finish_if_cli(Ok(0));
            }
            VcpuEvent::Reset { vcpu, cause } => {
                log::info!("guest reset ({cause}, vCPU {vcpu})");
                crate::events::emit("guest", "reboot", &[("vcpu", vcpu.to_string()), ("cause", cause.to_string())]);
                if self.no_reboot {
                    self.shutdown_vm();
                    self.finish_if_cli(Ok(0));
                } else if let Err(e) = self.reboot() {
                    log::error!("reboot failed: {e}");
                    self.shutdown_vm();
                    self.finish_if_cli(Err(e));
                }
            }
            VcpuEvent::HekiPaused { source } => {
                log::warn!("heki policy paused the VM ({source}); vm.resume continues");
                if let Some(vm) = &self.vm {
                    vm.hold_for_heki();
                }
                // The run control is paused already (whoever trapped closed
                // its gates); only a live VM's pause is announced.
                if self.state == VmState::Running {
                    crate::events::emit("vm", "pausing", &[("cause", "heki".to_string())]);
                    crate::events::emit("vm", "paused", &[("cause", "heki".to_string()), ("source", source)]);
                }
            }
            VcpuEvent::HekiShutdown { source } => {
                log::warn!("heki policy stopped the VM ({source})");
                self.shutdown_vm();
                self.finish_if_cli(Err(VmmError::GuestFailed(format!(
                    "heki policy 'shutdown' stopped the VM after a violation ({source})"
                ))));
            }
            VcpuEvent::Failed { vcpu, error } => {
                log::error!("vCPU {vcpu}: {error}");
                crate::events::emit("vm", "failed", &[("vcpu", vcpu.to_string()), ("error", error.clone())]);
                self.shutdown_vm();
                self.finish_if_cli(Err(VmmError::GuestFailed(format!("vCPU {vcpu}: {error}"))));
            }
        }
    }

    /// Without an API socket, the end of the VM is the end of the VMM.
    fn finish_if_cli(&mut self, status: Result<i32, VmmError>) {
        if !self.api_mode {
            self.exit_status = Some(status);
        } else if let Err(e) = status {
            log::error!("{e}");
        }
    }

    fn start_stdin_forwarding(&mut self) {
        let (tx, rx) = channel();
        self.stdin_rx = rx;
        let Ok(wake) = self.stdin_wake.try_clone() else {
            return;
        };
        self.stdin_forwarding = true;
        let spawned = std::thread::Builder::new().name("stdin".into()).spawn(move || {
            crate::seccomp::apply_or_exit(crate::seccomp::ThreadKind::Stdin);
            let mut buf = [0u8; 256];
            let mut stdin = std::io::stdin();
            while let Ok(n) = stdin.read(&mut buf) {
                if n == 0 || tx.send(buf[..n].to_vec()).is_err() {
                    break;
                }
                let _ = wake.write(1);
            }
        });
        if let Err(e) = spawned {
            log::warn!("cannot forward stdin to the serial port: {e}");
        }
    }
}

fn serial_output(config: &VmConfig) -> Result<Option<SharedOutput>, VmmError> {
    let out: Box<dyn std::io::Write + Send> = match config.serial.mode {
        // `VmConfig::validate` refuses Pty for the serial port.
        ConsoleOutputMode::Off | ConsoleOutputMode::Pty => return Ok(None),
        ConsoleOutputMode::Null => Box::new(std::io::sink()),
        ConsoleOutputMode::Tty => Box::new(std::io::stdout()),
        ConsoleOutputMode::File => {
            let path = config.serial.file.as_ref().ok_or(VmmError::SerialFileMissing)?;
            Box::new(std::fs::File::create(path).map_err(|source| VmmError::SerialFile { path: path.clone(), source })?)
        }
    };
    Ok(Some(Arc::new(Mutex::new(out))))
}
