//! The `hekivisor` command line. Every VM flag builds the same `VmConfig`
//! that the REST API's `vm.create` takes, so the two cannot drift.

use std::path::PathBuf;

use clap::{ArgAction, Parser};

pub use super::cli_values::{
    ApiSocketSpec, EventMonitorSpec, parse_api_socket, parse_console, parse_cpus, parse_disk, parse_event_monitor,
    parse_fs, parse_heki, parse_introspection, parse_landlock_rule, parse_memory, parse_net, parse_platform, parse_rng,
    parse_vsock,
};
use super::{ConfigError, PayloadConfig, VmConfig};

#[derive(Debug, Parser)]
#[command(
    name = "hekivisor",
    version,
    about = "Hekivisor: a KVM virtual machine monitor that enforces guest kernel integrity (heki) from the host.",
    long_about = "Hekivisor: a KVM virtual machine monitor that enforces guest kernel integrity (heki) from the host.\n\n\
Boot a VM at once with --kernel, or start empty with --api-socket and drive it over the\n\
Cloud Hypervisor compatible REST API (see hk-remote). Option values use key=value lists,\n\
e.g. --cpus boot=2 --memory size=1G --heki enabled=on,policy=deny.",
    after_help = "Examples:\n  hekivisor --kernel vmlinux --cmdline console=ttyS0 --cpus boot=2 --memory size=1G\n  \
hekivisor --api-socket /tmp/hk.sock --event-monitor path=/tmp/hk-events.json"
)]
pub struct CliArgs {
    /// Kernel to boot: an ELF vmlinux with a PVH entry note, or a bzImage.
    #[arg(long, value_name = "PATH")]
    pub kernel: Option<PathBuf>,

    /// Initramfs to load for the kernel.
    #[arg(long, value_name = "PATH")]
    pub initramfs: Option<PathBuf>,

    /// Kernel command line.
    #[arg(long, value_name = "STRING")]
    pub cmdline: Option<String>,

    /// vCPUs: boot=N[,max=N][,topology=THREADS:CORES:DIES:PACKAGES] (default
    /// boot=1; max defaults to boot; vCPUs above boot are present but not
    /// started; the topology's product must equal max).
    #[arg(long, value_name = "boot=N")]
    pub cpus: Option<String>,

    /// Guest RAM: size=SIZE in bytes or with a K/M/G suffix (default size=512M)[,shared=on]
    /// [,hugepages=on[,hugepage_size=2M|1G]][,prefault=on][,hotplug_size=SIZE]
    /// (shared=on lets a vhost-user backend such as --fs map it; hugepages=on takes the
    /// RAM from the host's reserved huge pages; hotplug_size reserves address space above RAM).
    #[arg(long, value_name = "size=SIZE")]
    pub memory: Option<String>,

    /// Serial port COM1 output: off|null|tty|file=PATH (default tty; tty also forwards
    /// stdin, unless --console tty takes it).
    #[arg(long, value_name = "MODE")]
    pub serial: Option<String>,

    /// virtio console: off|null|tty|pty|file=PATH (default off). tty writes to stdout and
    /// reads stdin (the serial port then gets no input); pty opens a pseudo-terminal
    /// for both and logs its path (vm.info: console.file).
    #[arg(long, value_name = "MODE")]
    pub console: Option<String>,

    /// Kernel integrity: enabled=on|off,policy=deny|log|pause|shutdown[,cr_check_interval_ms=N][,translation=on|off].
    /// Without --heki it is off; with it, on unless enabled=off (defaults: policy=deny,
    /// cr_check_interval_ms=10).
    #[arg(long, value_name = "enabled=on,...")]
    pub heki: Option<String>,

    /// Introspection agent socket: path=SOCK[,reply_timeout_ms=N][,reply_poll_us=N]
    /// (mode 0600, one agent at a time; see docs/introspection.md).
    #[arg(long, value_name = "path=SOCK")]
    pub introspection: Option<String>,

    /// virtio-block disk: path=FILE[,readonly=on][,id=NAME][,num_queues=N][,queue_size=N] (raw image; repeatable).
    #[arg(long, value_name = "path=FILE")]
    pub disk: Vec<String>,

    /// virtio-net on a host TAP: tap=NAME[,ip=ADDR,mask=MASK][,mac=MAC], or fd=N for a
    /// TAP opened beforehand and inherited (no CAP_NET_ADMIN needed) (repeatable).
    #[arg(long, value_name = "tap=NAME")]
    pub net: Vec<String>,

    /// virtio-fs through a vhost-user backend (e.g. virtiofsd):
    /// tag=TAG,socket=PATH[,num_queues=N][,queue_size=N][,id=NAME] (repeatable; needs
    /// --memory shared=on and heki off).
    #[arg(long, value_name = "tag=TAG,socket=PATH")]
    pub fs: Vec<String>,

    /// virtio-rng entropy source: src=PATH (e.g. src=/dev/urandom)[,pci_segment=N].
    #[arg(long, value_name = "src=PATH")]
    pub rng: Option<String>,

    /// PCI segments: num_pci_segments=N (1..=16); a device flag's pci_segment=N places it.
    #[arg(long, value_name = "num_pci_segments=N")]
    pub platform: Option<String>,

    /// virtio-vsock with a hybrid Unix-socket host end: cid=N,socket=PATH[,id=NAME].
    /// Host clients connect to PATH and send `CONNECT <port>`; a guest connecting to
    /// host port P reaches the listener at PATH_P (see docs/devices.md).
    #[arg(long, value_name = "cid=N,socket=PATH")]
    pub vsock: Option<String>,

    /// REST API socket: path=PATH, fd=N, or a bare PATH (created with mode 0600).
    /// Without --kernel, the VMM starts empty and waits for vm.create.
    #[arg(long, value_name = "path=PATH")]
    pub api_socket: Option<String>,

    /// Write the JSON event stream (see docs/events.md) to path=FILE or fd=N (default: none).
    #[arg(long, value_name = "path=FILE")]
    pub event_monitor: Option<String>,

    /// Exit (status 0) when the guest reboots instead of rebooting it. With
    /// --api-socket the VM shuts down instead and the VMM keeps serving the API.
    #[arg(long)]
    pub no_reboot: bool,

    /// seccomp filters, one allow-list per kind of thread: true (a system call outside
    /// the list kills the process), false, or log (allowed, and logged by the kernel).
    #[arg(long, value_name = "true|false|log", default_value = "true")]
    pub seccomp: String,

    /// landlock: from the boot on, the VMM may open only the files the VM's
    /// configuration names (kernel, initramfs, disks, serial and console files, rng
    /// source, TAP device) and the --landlock-rules paths.
    #[arg(long)]
    pub landlock: bool,

    /// An extra landlock rule: path=PATH,access=r|w|rw (a file, or a directory and what
    /// is below it; repeatable). Needs --landlock.
    #[arg(long, value_name = "path=PATH,access=rw")]
    pub landlock_rules: Vec<String>,

    /// More logging: -v info, -vv debug, -vvv trace (default: warnings).
    #[arg(short = 'v', action = ArgAction::Count)]
    pub verbose: u8,

    /// Write the log to this file instead of stderr.
    #[arg(long, value_name = "PATH")]
    pub log_file: Option<PathBuf>,
}

/// Everything the binary needs to start the VMM.
#[derive(Debug)]
pub struct VmmOptions {
    /// Some iff `--kernel` was given.
    pub vm: Option<VmConfig>,
    pub api_socket: Option<ApiSocketSpec>,
    pub event_monitor: Option<EventMonitorSpec>,
    pub no_reboot: bool,
    pub verbosity: u8,
    pub log_file: Option<PathBuf>,
    pub seccomp: crate::seccomp::SeccompMode,
}

impl CliArgs {
    pub fn into_options(self) -> Result<VmmOptions, ConfigError> {
        let vm_flags_without_kernel = self.kernel.is_none()
            && (self.initramfs.is_some()
                || self.cmdline.is_some()
                || self.cpus.is_some()
                || self.memory.is_some()
                || self.platform.is_some());
        if vm_flags_without_kernel {
            return Err(ConfigError::Cli {
                option: "--kernel",
                message: "VM options were given without --kernel".into(),
            });
        }
        let vm = match &self.kernel {
            Some(kernel) => {
                let mut config = VmConfig {
                    payload: Some(PayloadConfig {
                        kernel: Some(kernel.clone()),
                        cmdline: self.cmdline.clone(),
                        initramfs: self.initramfs.clone(),
                    }),
                    ..VmConfig::default()
                };
                if let Some(cpus) = &self.cpus {
                    config.cpus = parse_cpus(cpus)?;
                }
                if let Some(memory) = &self.memory {
                    config.memory = parse_memory(memory)?;
                }
                if let Some(serial) = &self.serial {
                    config.serial = parse_console("--serial", serial)?;
                }
                if let Some(console) = &self.console {
                    config.console = parse_console("--console", console)?;
                }
                if let Some(heki) = &self.heki {
                    config.heki = parse_heki(heki)?;
                }
                if let Some(agent) = &self.introspection {
                    config.introspection = Some(parse_introspection(agent)?);
                }
                config.landlock_enable = self.landlock;
                if !self.landlock_rules.is_empty() {
                    let rules = self.landlock_rules.iter().map(|r| parse_landlock_rule(r));
                    config.landlock_rules = Some(rules.collect::<Result<Vec<_>, _>>()?);
                }
                if !self.disk.is_empty() {
                    let disks = self.disk.iter().map(|d| parse_disk(d)).collect::<Result<Vec<_>, _>>()?;
                    config.disks = Some(disks);
                }
                if !self.net.is_empty() {
                    config.net = Some(self.net.iter().map(|n| parse_net(n)).collect::<Result<Vec<_>, _>>()?);
                }
                if !self.fs.is_empty() {
                    config.fs = Some(self.fs.iter().map(|f| parse_fs(f)).collect::<Result<Vec<_>, _>>()?);
                }
                if let Some(rng) = &self.rng {
                    config.rng = Some(parse_rng(rng)?);
                }
                if let Some(platform) = &self.platform {
                    config.platform = Some(parse_platform(platform)?);
                }
                if let Some(vsock) = &self.vsock {
                    config.vsock = Some(parse_vsock(vsock)?);
                }
                config.validate()?;
                Some(config)
            }
            None => None,
        };
        Ok(VmmOptions {
            vm,
            api_socket: self.api_socket.as_deref().map(parse_api_socket).transpose()?,
            event_monitor: self.event_monitor.as_deref().map(parse_event_monitor).transpose()?,
            no_reboot: self.no_reboot,
            verbosity: self.verbose,
            log_file: self.log_file,
            seccomp: self
                .seccomp
                .parse::<crate::seccomp::SeccompMode>()
                .map_err(|e| ConfigError::Cli { option: "--seccomp", message: e.to_string() })?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{ConsoleOutputMode, CpuTopology, CpusConfig};

    fn args(list: &[&str]) -> Result<VmmOptions, ConfigError> {
        CliArgs::try_parse_from(std::iter::once("hekivisor").chain(list.iter().copied()))
            .expect("clap accepts the flags")
            .into_options()
    }

    #[test]
    fn cli_flags_build_the_vm_config() {
        let o = args(&[
            "--kernel",
            "k",
            "--cpus",
            "boot=2",
            "--memory",
            "size=1G",
            "--serial",
            "file=/tmp/s",
            "--heki",
            "enabled=on,policy=log",
        ])
        .expect("valid");
        let vm = o.vm.expect("kernel given");
        assert_eq!(vm.cpus, CpusConfig { boot_vcpus: 2, max_vcpus: 2, topology: None });
        assert_eq!(vm.memory.size, 1 << 30);
        assert_eq!(vm.serial.mode, ConsoleOutputMode::File);
        assert!(vm.heki.enabled);
        assert_eq!(vm.heki.policy, heki::Policy::Log);
    }

    #[test]
    fn vsock_takes_a_cid_and_a_socket() {
        let o = args(&["--kernel", "k", "--vsock", "cid=3,socket=/run/v.sock,id=agent"]).expect("valid");
        let vsock = o.vm.and_then(|vm| vm.vsock).expect("vsock");
        assert_eq!(
            vsock,
            crate::config::VsockConfig {
                cid: 3,
                socket: "/run/v.sock".into(),
                id: Some("agent".into()),
                pci_segment: 0
            }
        );
    }

    #[test]
    fn bad_values_are_errors_naming_the_option() {
        for (flags, needle) in [
            (&["--kernel", "k", "--cpus", "boot=0"][..], "boot_vcpus"),
            (&["--kernel", "k", "--cpus", "boot=999"][..], "--cpus"),
            (&["--kernel", "k", "--memory", "size=12Q"][..], "--memory"),
            (&["--kernel", "k", "--memory", "size=99999999999G"][..], "too large"),
            (&["--kernel", "k", "--heki", "enabeld=on"][..], "unknown key 'enabeld'"),
            (&["--kernel", "k", "--heki", "policy=maybe"][..], "unknown heki policy"),
            (&["--kernel", "k", "--serial", "file="][..], "--serial"),
            (&["--cpus", "boot=2"][..], "without --kernel"),
            (&["--api-socket", "fd=-3"][..], "--api-socket"),
            (&["--kernel", "k", "--introspection", "path=/a,reply_poll_us=20000"][..], "introspection.reply_poll_us"),
            (&["--kernel", "k", "--introspection", "path=/a,reply_poll=5"][..], "unknown key 'reply_poll'"),
            (&["--kernel", "k", "--vsock", "socket=/v"][..], "cid=N is required"),
            (&["--kernel", "k", "--vsock", "cid=3"][..], "socket=PATH is required"),
            (&["--kernel", "k", "--vsock", "cid=1,socket=/v"][..], "vsock.cid"),
            (&["--kernel", "k", "--vsock", "cid=3,socket=/v,port=5"][..], "unknown key 'port'"),
        ] {
            let err = args(flags).err().unwrap_or_else(|| panic!("{flags:?} must fail")).to_string();
            assert!(err.contains(needle), "{flags:?}: '{err}' lacks '{needle}'");
        }
    }

    #[test]
    fn cli_and_rest_build_the_same_vm_config() {
        let from_cli = args(&[
            "--kernel",
            "/k",
            "--cmdline",
            "console=ttyS0",
            "--initramfs",
            "/i",
            "--cpus",
            "boot=2,max=2",
            "--memory",
            "size=1G",
            "--serial",
            "file=/tmp/s",
            "--console",
            "null",
            "--heki",
            "policy=log,cr_check_interval_ms=5",
        ])
        .expect("valid")
        .vm
        .expect("kernel given");
        let from_rest = super::super::vm_config_from_json(
            br#"{"cpus": {"boot_vcpus": 2, "max_vcpus": 2}, "memory": {"size": 1073741824},
                 "payload": {"kernel": "/k", "cmdline": "console=ttyS0", "initramfs": "/i"},
                 "serial": {"mode": "File", "file": "/tmp/s"}, "console": {"mode": "Null"},
                 "heki": {"enabled": true, "policy": "log", "cr_check_interval_ms": 5}}"#,
        )
        .expect("valid");
        assert_eq!(from_cli, from_rest);
    }

    #[test]
    fn console_modes_parse() {
        assert_eq!(parse_console("--serial", "off").map(|c| c.mode), Ok(ConsoleOutputMode::Off));
        assert_eq!(parse_console("--serial", "null").map(|c| c.mode), Ok(ConsoleOutputMode::Null));
        assert_eq!(parse_console("--serial", "tty").map(|c| c.mode), Ok(ConsoleOutputMode::Tty));
        let file = parse_console("--console", "file=/tmp/c").expect("file");
        assert_eq!((file.mode, file.file), (ConsoleOutputMode::File, Some(PathBuf::from("/tmp/c"))));
        assert_eq!(parse_console("--console", "pty").map(|c| c.mode), Ok(ConsoleOutputMode::Pty));
        let serial_pty = parse_console("--serial", "pty").expect_err("the serial port has no pty");
        assert!(serial_pty.to_string().starts_with("--serial: pty is supported by --console only"), "{serial_pty}");
        let socket = parse_console("--console", "socket=/x").expect_err("no socket mode");
        assert!(socket.to_string().starts_with("--console: socket=PATH is not supported"), "{socket}");
    }

    #[test]
    fn heki_option_defaults_and_switches() {
        let on = parse_heki("policy=pause").expect("valid");
        assert_eq!((on.enabled, on.policy, on.cr_check_interval_ms), (true, heki::Policy::Pause, 10));
        assert!(!parse_heki("enabled=off").expect("valid").enabled);
        assert_eq!(parse_heki("enabled=on,cr_check_interval_ms=25").map(|h| h.cr_check_interval_ms), Ok(25));
        assert!(parse_heki("enabled=maybe").is_err());
        assert!(parse_heki("cr_check_interval_ms=-1").is_err());
        assert!(args(&["--kernel", "k", "--heki", "cr_check_interval_ms=0"]).is_err());
    }

    #[test]
    fn process_options_are_carried_over() {
        let o =
            args(&["--api-socket", "/tmp/a.sock", "--event-monitor", "fd=5", "--no-reboot", "-vv", "--log-file", "/l"])
                .expect("valid");
        assert!(o.vm.is_none(), "no --kernel, no VM");
        assert_eq!(o.api_socket, Some(ApiSocketSpec::Path("/tmp/a.sock".into())));
        assert_eq!(o.event_monitor, Some(EventMonitorSpec::Fd(5)));
        assert!(o.no_reboot);
        assert_eq!(o.verbosity, 2);
        assert_eq!(o.log_file, Some(PathBuf::from("/l")));
        assert_eq!(parse_event_monitor("path=/tmp/ev").ok(), Some(EventMonitorSpec::Path("/tmp/ev".into())));
        assert!(parse_event_monitor("/tmp/ev").is_err(), "event monitor needs path= or fd=");
        assert!(parse_event_monitor("path=/a,fd=1").is_err());
    }

    #[test]
    fn defaults_without_vm_flags() {
        let vm = args(&["--kernel", "k"]).expect("valid").vm.expect("kernel");
        assert_eq!(vm.cpus, CpusConfig { boot_vcpus: 1, max_vcpus: 1, topology: None });
        assert_eq!(vm.memory.size, 512 << 20);
        assert_eq!(vm.serial.mode, ConsoleOutputMode::Tty);
        assert_eq!(vm.console.mode, ConsoleOutputMode::Off);
        assert!(!vm.heki.enabled);
    }

    #[test]
    fn cpus_and_memory_parse() {
        assert_eq!(parse_cpus("boot=4").ok(), Some(CpusConfig { boot_vcpus: 4, max_vcpus: 4, topology: None }));
        assert!(parse_cpus("max=4").is_err(), "boot is required");
        assert!(parse_cpus("boot=two").is_err());
        let cpus = parse_cpus("boot=2,max=4,topology=2:2:1:1").expect("topology");
        let topology = CpuTopology { threads_per_core: 2, cores_per_die: 2, dies_per_package: 1, packages: 1 };
        assert_eq!((cpus.max_vcpus, cpus.topology), (4, Some(topology)));
        assert!(parse_cpus("boot=2,topology=2:2").is_err(), "four levels");
        assert!(
            args(&["--kernel", "k", "--cpus", "boot=2,max=4,topology=1:2:1:1"])
                .err()
                .is_some_and(|e| e.to_string().contains("cpus.topology")),
            "the product must equal max"
        );
        assert!(args(&["--kernel", "k", "--cpus", "boot=4,max=2"]).is_err(), "max below boot");
        assert_eq!(parse_memory("size=1048576").map(|m| m.size), Ok(1 << 20));
        assert!(parse_memory("512M").is_err(), "size= is required");
        assert!(args(&["--kernel", "k", "--memory", "size=1000000"]).is_err(), "not a multiple of 4 KiB");
        assert!(args(&["--kernel", "k", "--memory", "size=2T"]).is_err(), "over 1 TiB");
    }

    #[test]
    fn api_socket_accepts_path_fd_and_bare_path() {
        assert_eq!(parse_api_socket("/tmp/a.sock").ok(), Some(ApiSocketSpec::Path("/tmp/a.sock".into())));
        assert_eq!(parse_api_socket("path=/tmp/a.sock").ok(), Some(ApiSocketSpec::Path("/tmp/a.sock".into())));
        assert_eq!(parse_api_socket("fd=3").ok(), Some(ApiSocketSpec::Fd(3)));
        assert!(parse_api_socket("path=/a,fd=3").is_err());
    }
}
