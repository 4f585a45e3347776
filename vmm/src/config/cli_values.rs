//! The values of the `hekivisor` VM flags (`--cpus boot=2,max=4`, `--memory
//! size=1G,hugepages=on`, ...), each parsed into its part of `VmConfig`.

use std::path::PathBuf;

use super::options::{OptionValues, parse_size};
use super::{ConfigError, ConsoleConfig, ConsoleOutputMode, CpuTopology, CpusConfig, HekiConfig, MemoryConfig};

/// Where the API socket comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ApiSocketSpec {
    Path(PathBuf),
    /// An already listening socket inherited from the parent.
    Fd(i32),
}

/// Where events go.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum EventMonitorSpec {
    Path(PathBuf),
    Fd(i32),
}

pub fn parse_cpus(input: &str) -> Result<CpusConfig, ConfigError> {
    let o = OptionValues::parse("--cpus", input, &["boot", "max", "topology"])?;
    let boot = o.get_u64("boot")?.ok_or_else(|| o.error("boot=N is required".into()))?;
    let boot = u8::try_from(boot).map_err(|_| o.error(format!("boot={boot}: at most 254 vCPUs")))?;
    let max = match o.get_u64("max")? {
        Some(m) => u8::try_from(m).map_err(|_| o.error(format!("max={m}: at most 254 vCPUs")))?,
        None => boot,
    };
    let topology = match o.get("topology") {
        None => None,
        Some(text) => {
            let levels: Vec<u8> = text.split(':').filter_map(|n| n.parse().ok()).collect();
            let [threads_per_core, cores_per_die, dies_per_package, packages] = levels[..] else {
                return Err(o.error(format!("topology={text}: expected THREADS:CORES:DIES:PACKAGES")));
            };
            Some(CpuTopology { threads_per_core, cores_per_die, dies_per_package, packages })
        }
    };
    Ok(CpusConfig { boot_vcpus: boot, max_vcpus: max, topology })
}

pub fn parse_memory(input: &str) -> Result<MemoryConfig, ConfigError> {
    let o = OptionValues::parse(
        "--memory",
        input,
        &["size", "shared", "hugepages", "hugepage_size", "prefault", "hotplug_size"],
    )?;
    let size = o.get("size").ok_or_else(|| o.error("size=SIZE is required".into()))?;
    let sized = |key: &str| o.get(key).map(|v| parse_size(v).map_err(|e| o.error(format!("{key}: {e}")))).transpose();
    Ok(MemoryConfig {
        size: parse_size(size).map_err(|e| o.error(e.to_string()))?,
        shared: o.get_bool("shared")?.unwrap_or(false),
        hugepages: o.get_bool("hugepages")?.unwrap_or(false),
        hugepage_size: sized("hugepage_size")?,
        prefault: o.get_bool("prefault")?.unwrap_or(false),
        hotplug_size: sized("hotplug_size")?,
        hotplug_method: super::HotplugMethod::Acpi,
    })
}

/// `--platform num_pci_segments=N`.
pub fn parse_platform(input: &str) -> Result<super::PlatformConfig, ConfigError> {
    let o = OptionValues::parse("--platform", input, &["num_pci_segments"])?;
    let n = o.get_u64("num_pci_segments")?.ok_or_else(|| o.error("num_pci_segments=N is required".into()))?;
    let num_pci_segments = u16::try_from(n).map_err(|_| o.error(format!("num_pci_segments={n}: too many")))?;
    Ok(super::PlatformConfig { num_pci_segments })
}

/// The optional `pci_segment=N` of a device flag.
pub fn parse_pci_segment(o: &OptionValues<'_>) -> Result<u16, ConfigError> {
    match o.get_u64("pci_segment")? {
        None => Ok(0),
        Some(n) => u16::try_from(n).map_err(|_| o.error(format!("pci_segment={n}: too large"))),
    }
}

pub fn parse_fs(input: &str) -> Result<super::FsConfig, ConfigError> {
    let o = OptionValues::parse("--fs", input, &["tag", "socket", "num_queues", "queue_size", "id", "pci_segment"])?;
    let tag = o.get("tag").filter(|t| !t.is_empty()).ok_or_else(|| o.error("tag=TAG is required".into()))?;
    let socket = o.get("socket").filter(|p| !p.is_empty()).ok_or_else(|| o.error("socket=PATH is required".into()))?;
    let num_queues = o.get_u64("num_queues")?.unwrap_or(1);
    let queue_size = o.get_u64("queue_size")?.unwrap_or(1024);
    Ok(super::FsConfig {
        tag: tag.to_string(),
        socket: PathBuf::from(socket),
        num_queues: usize::try_from(num_queues).map_err(|_| o.error(format!("num_queues={num_queues}: too many")))?,
        queue_size: u16::try_from(queue_size)
            .map_err(|_| o.error(format!("queue_size={queue_size}: at most 32768")))?,
        id: o.get("id").map(str::to_string),
        pci_segment: parse_pci_segment(&o)?,
    })
}

pub fn parse_console(option: &'static str, input: &str) -> Result<ConsoleConfig, ConfigError> {
    let mode = |mode| Ok(ConsoleConfig { mode, file: None });
    let refuse = |message: &str| Err(ConfigError::Cli { option, message: message.into() });
    match input {
        "off" | "Off" => mode(ConsoleOutputMode::Off),
        "null" | "Null" => mode(ConsoleOutputMode::Null),
        "tty" | "Tty" => mode(ConsoleOutputMode::Tty),
        "pty" | "Pty" if option == "--console" => mode(ConsoleOutputMode::Pty),
        "pty" | "Pty" => refuse("pty is supported by --console only (off, null, tty, file=PATH)"),
        _ if input.starts_with("socket=") => refuse("socket=PATH is not supported (off, null, tty, pty, file=PATH)"),
        _ => {
            let o = OptionValues::parse(option, input, &["file"])?;
            let file =
                o.get("file").filter(|f| !f.is_empty()).ok_or_else(|| o.error("file=PATH needs a path".into()))?;
            Ok(ConsoleConfig { mode: ConsoleOutputMode::File, file: Some(PathBuf::from(file)) })
        }
    }
}

pub fn parse_landlock_rule(input: &str) -> Result<super::LandlockConfig, ConfigError> {
    let o = OptionValues::parse("--landlock-rules", input, &["path", "access"])?;
    let path = o.get("path").filter(|p| !p.is_empty()).ok_or_else(|| o.error("path=PATH is required".into()))?;
    let access = o.get("access").unwrap_or("rw");
    if !matches!(access, "r" | "w" | "rw") {
        return Err(o.error(format!("access={access}: expected r, w or rw")));
    }
    Ok(super::LandlockConfig { path: PathBuf::from(path), access: access.to_string() })
}

pub fn parse_disk(input: &str) -> Result<super::DiskConfig, ConfigError> {
    let o =
        OptionValues::parse("--disk", input, &["path", "readonly", "id", "pci_segment", "num_queues", "queue_size"])?;
    let path = o.get("path").filter(|p| !p.is_empty()).ok_or_else(|| o.error("path=FILE is required".into()))?;
    Ok(super::DiskConfig {
        path: PathBuf::from(path),
        readonly: o.get_bool("readonly")?.unwrap_or(false),
        id: o.get("id").map(str::to_string),
        pci_segment: parse_pci_segment(&o)?,
        num_queues: match o.get_u64("num_queues")? {
            Some(n) => usize::try_from(n).map_err(|_| o.error(format!("num_queues={n}: too many")))?,
            None => super::devices::default_disk_num_queues(),
        },
        queue_size: match o.get_u64("queue_size")? {
            Some(n) => u32::try_from(n).map_err(|_| o.error(format!("queue_size={n}: at most 32768")))?,
            None => super::devices::default_disk_queue_size(),
        },
    })
}

pub fn parse_net(input: &str) -> Result<super::NetConfig, ConfigError> {
    let o = OptionValues::parse("--net", input, &["tap", "fd", "ip", "mask", "mac", "id", "pci_segment"])?;
    let fd = o
        .get("fd")
        .map(|v| v.parse::<i32>().map_err(|_| o.error(format!("fd={v}: not a file descriptor number"))))
        .transpose()?;
    let addr = |key: &str| {
        o.get(key)
            .map(|v| v.parse::<std::net::Ipv4Addr>().map_err(|_| o.error(format!("{key}={v}: not an IPv4 address"))))
            .transpose()
    };
    Ok(super::NetConfig {
        tap: o.get("tap").map(str::to_string),
        ip: addr("ip")?,
        mask: addr("mask")?,
        mac: o.get("mac").map(str::to_string),
        id: o.get("id").map(str::to_string),
        fds: fd.map(|fd| vec![fd]),
        pci_segment: parse_pci_segment(&o)?,
    })
}

pub fn parse_vsock(input: &str) -> Result<super::VsockConfig, ConfigError> {
    let o = OptionValues::parse("--vsock", input, &["cid", "socket", "id", "pci_segment"])?;
    let cid = o.get_u64("cid")?.ok_or_else(|| o.error("cid=N is required".into()))?;
    let socket = o.get("socket").filter(|s| !s.is_empty()).ok_or_else(|| o.error("socket=PATH is required".into()))?;
    Ok(super::VsockConfig {
        cid,
        socket: PathBuf::from(socket),
        id: o.get("id").map(str::to_string),
        pci_segment: parse_pci_segment(&o)?,
    })
}

/// `--rng src=PATH[,pci_segment=N]`.
pub fn parse_rng(input: &str) -> Result<super::RngConfig, ConfigError> {
    let o = OptionValues::parse("--rng", input, &["src", "pci_segment"])?;
    let src = o.get("src").filter(|s| !s.is_empty()).ok_or_else(|| o.error("src=PATH is required".into()))?;
    Ok(super::RngConfig { src: PathBuf::from(src), iommu: false, pci_segment: parse_pci_segment(&o)? })
}

pub fn parse_introspection(input: &str) -> Result<super::IntrospectionConfig, ConfigError> {
    let o = OptionValues::parse("--introspection", input, &["path", "reply_timeout_ms", "reply_poll_us"])?;
    let path = o.get("path").filter(|p| !p.is_empty()).ok_or_else(|| o.error("path=SOCK is required".into()))?;
    let reply_timeout_ms = o.get_u64("reply_timeout_ms")?.unwrap_or(super::DEFAULT_REPLY_TIMEOUT_MS);
    let reply_poll_us = o.get_u64("reply_poll_us")?.unwrap_or(super::DEFAULT_REPLY_POLL_US);
    Ok(super::IntrospectionConfig { socket: PathBuf::from(path), reply_timeout_ms, reply_poll_us })
}

pub fn parse_heki(input: &str) -> Result<HekiConfig, ConfigError> {
    let o = OptionValues::parse("--heki", input, &["enabled", "policy", "cr_check_interval_ms", "translation"])?;
    let mut config = HekiConfig { enabled: true, ..HekiConfig::default() };
    if let Some(enabled) = o.get_bool("enabled")? {
        config.enabled = enabled;
    }
    if let Some(policy) = o.get("policy") {
        config.policy = policy.parse().map_err(|e| o.error(e))?;
    }
    if let Some(ms) = o.get_u64("cr_check_interval_ms")? {
        config.cr_check_interval_ms = ms;
    }
    if let Some(translation) = o.get_bool("translation")? {
        config.translation = translation;
    }
    Ok(config)
}

fn parse_fd(o: &OptionValues<'_>) -> Result<Option<i32>, ConfigError> {
    o.get("fd")
        .map(|fd| {
            fd.parse::<i32>()
                .ok()
                .filter(|fd| *fd >= 0)
                .ok_or_else(|| o.error(format!("fd={fd}: not a file descriptor")))
        })
        .transpose()
}

pub fn parse_api_socket(input: &str) -> Result<ApiSocketSpec, ConfigError> {
    if !input.contains('=') {
        return Ok(ApiSocketSpec::Path(PathBuf::from(input)));
    }
    let o = OptionValues::parse("--api-socket", input, &["path", "fd"])?;
    match (o.get("path"), parse_fd(&o)?) {
        (Some(path), None) if !path.is_empty() => Ok(ApiSocketSpec::Path(PathBuf::from(path))),
        (None, Some(fd)) => Ok(ApiSocketSpec::Fd(fd)),
        _ => Err(o.error("give exactly one of path=PATH or fd=N".into())),
    }
}

pub fn parse_event_monitor(input: &str) -> Result<EventMonitorSpec, ConfigError> {
    let o = OptionValues::parse("--event-monitor", input, &["path", "fd"])?;
    match (o.get("path"), parse_fd(&o)?) {
        (Some(path), None) if !path.is_empty() => Ok(EventMonitorSpec::Path(PathBuf::from(path))),
        (None, Some(fd)) => Ok(EventMonitorSpec::Fd(fd)),
        _ => Err(o.error("give exactly one of path=FILE or fd=N".into())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_takes_huge_pages_prefault_and_a_hotplug_window() {
        let m = parse_memory("size=1G,hugepages=on,hugepage_size=2M,prefault=on,hotplug_size=16G").expect("valid");
        assert_eq!(
            (m.size, m.hugepages, m.hugepage_size, m.prefault, m.hotplug_size),
            (1 << 30, true, Some(2 << 20), true, Some(16 << 30))
        );
        let plain = parse_memory("size=512M").expect("valid");
        assert_eq!((plain.hugepages, plain.hugepage_size, plain.hotplug_size), (false, None, None));
        let err = parse_memory("size=1G,hugepage_size=big").expect_err("not a size").to_string();
        assert!(err.starts_with("--memory: hugepage_size"), "{err}");
    }

    #[test]
    fn platform_and_device_segments_parse() {
        assert_eq!(parse_platform("num_pci_segments=2").map(|p| p.num_pci_segments), Ok(2));
        assert!(parse_platform("num_pci_segments=70000").is_err(), "over u16");
        assert!(parse_platform("").is_err(), "num_pci_segments is required");
        assert_eq!(parse_rng("src=/dev/urandom,pci_segment=1").map(|r| r.pci_segment), Ok(1));
        assert_eq!(parse_disk("path=/d").map(|d| d.pci_segment), Ok(0));
        assert_eq!(parse_net("tap=t0,pci_segment=3").map(|n| n.pci_segment), Ok(3));
        assert_eq!(parse_vsock("cid=3,socket=/v,pci_segment=1").map(|v| v.pci_segment), Ok(1));
        assert_eq!(parse_fs("tag=t,socket=/s,pci_segment=1").map(|f| f.pci_segment), Ok(1));
    }
}
