//! `VmConfig::validate`: the checks of values a user can get wrong, each
//! error naming its field.

use super::{ConfigError, ConsoleOutputMode, MAX_PCI_SEGMENTS, MAX_REPLY_POLL_US, MAX_VCPUS, VmConfig, invalid};
use super::{FS_MAX_QUEUES, FS_TAG_MAX, MAX_VSOCK_CID, MAX_VSOCK_SOCKET_PATH, MIN_VSOCK_CID};

impl VmConfig {
    /// Checks the values a user can get wrong.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let cpus = &self.cpus;
        if cpus.boot_vcpus == 0 || cpus.boot_vcpus > MAX_VCPUS {
            return Err(invalid("cpus.boot_vcpus", format!("must be 1..={MAX_VCPUS}, got {}", cpus.boot_vcpus)));
        }
        if cpus.max_vcpus < cpus.boot_vcpus || cpus.max_vcpus > MAX_VCPUS {
            return Err(invalid(
                "cpus.max_vcpus",
                format!("must be boot_vcpus ({})..={MAX_VCPUS}, got {}", cpus.boot_vcpus, cpus.max_vcpus),
            ));
        }
        if let Some(t) = &cpus.topology {
            let levels = [t.threads_per_core, t.cores_per_die, t.dies_per_package, t.packages];
            if levels.contains(&0) {
                return Err(invalid("cpus.topology", "every level needs at least 1"));
            }
            if t.vcpus() != u32::from(cpus.max_vcpus) {
                return Err(invalid(
                    "cpus.topology",
                    format!(
                        "threads_per_core × cores_per_die × dies_per_package × packages is {}, but max_vcpus is {}",
                        t.vcpus(),
                        cpus.max_vcpus
                    ),
                ));
            }
            if !t.apic_ids_are_dense() {
                return Err(invalid(
                    "cpus.topology",
                    "every level below the highest one above 1 needs a power-of-two count \
                     (Hekivisor gives vCPU i APIC id i; sparse APIC ids are not supported yet)",
                ));
            }
        }
        self.memory.validate()?;
        self.validate_pci_segments()?;
        if self.serial.mode == ConsoleOutputMode::Pty {
            return Err(invalid("serial.mode", "mode Pty is supported by the virtio console only"));
        }
        for (field, console) in [("serial.file", &self.serial), ("console.file", &self.console)] {
            if console.mode == ConsoleOutputMode::File && console.file.is_none() {
                return Err(invalid(field, "mode File needs a file"));
            }
        }

        let disks = self.disks.as_deref().unwrap_or_default();
        if disks.len() > 16 {
            return Err(invalid("disks", "at most 16 disks"));
        }
        for disk in disks {
            if disk.num_queues == 0 || disk.num_queues > super::DISK_MAX_QUEUES {
                let (got, max) = (disk.num_queues, super::DISK_MAX_QUEUES);
                return Err(invalid("disks.num_queues", format!("must be 1..={max}, got {got}")));
            }
            if !disk.queue_size.is_power_of_two() || disk.queue_size > 32768 {
                let got = disk.queue_size;
                return Err(invalid("disks.queue_size", format!("must be a power of two up to 32768, got {got}")));
            }
        }
        for (i, net) in self.net.iter().flatten().enumerate() {
            net.mac_bytes(i)?;
            if net.ip.is_some() != net.mask.is_some() {
                return Err(invalid("net", "ip and mask go together"));
            }
            if let Some(fds) = &net.fds {
                if fds.len() != 1 || fds[0] < 0 {
                    return Err(invalid("net.fds", "one open TAP descriptor (one queue pair)"));
                }
                if net.tap.is_some() {
                    return Err(invalid("net.fds", "give a TAP name or a descriptor, not both"));
                }
            }
        }
        if let Some(vsock) = &self.vsock {
            if !(MIN_VSOCK_CID..=MAX_VSOCK_CID).contains(&vsock.cid) {
                return Err(invalid(
                    "vsock.cid",
                    format!("must be {MIN_VSOCK_CID}..={MAX_VSOCK_CID}, got {}", vsock.cid),
                ));
            }
            let len = vsock.socket.as_os_str().len();
            if len == 0 || len > MAX_VSOCK_SOCKET_PATH {
                return Err(invalid(
                    "vsock.socket",
                    format!("a Unix socket path of 1..={MAX_VSOCK_SOCKET_PATH} bytes"),
                ));
            }
        }
        self.validate_fs()?;
        if self.rng.as_ref().is_some_and(|r| r.iommu) {
            return Err(invalid("rng.iommu", "not supported by Hekivisor"));
        }
        if self.heki.cr_check_interval_ms == 0 || self.heki.cr_check_interval_ms > 60_000 {
            return Err(invalid("heki.cr_check_interval_ms", "must be 1..=60000"));
        }
        if let Some(agent) = &self.introspection
            && (agent.reply_timeout_ms == 0 || agent.reply_timeout_ms > 600_000)
        {
            return Err(invalid("introspection.reply_timeout_ms", "must be 1..=600000"));
        }
        if let Some(agent) = &self.introspection
            && agent.reply_poll_us > MAX_REPLY_POLL_US
        {
            return Err(invalid("introspection.reply_poll_us", format!("must be 0..={MAX_REPLY_POLL_US}")));
        }
        for rule in self.landlock_rules.iter().flatten() {
            if !matches!(rule.access.as_str(), "r" | "w" | "rw") {
                return Err(invalid("landlock_rules.access", format!("'{}': expected r, w or rw", rule.access)));
            }
        }
        if let Some(payload) = &self.payload
            && payload.kernel.is_none()
        {
            return Err(invalid("payload.kernel", "a kernel is required"));
        }
        Ok(())
    }

    /// Every device sits on a segment the platform has.
    fn validate_pci_segments(&self) -> Result<(), ConfigError> {
        let segments = self.pci_segments();
        if segments == 0 || segments > MAX_PCI_SEGMENTS {
            return Err(invalid(
                "platform.num_pci_segments",
                format!("must be 1..={MAX_PCI_SEGMENTS}, got {segments}"),
            ));
        }
        let placed =
            [("rng.pci_segment", self.rng.iter().map(|r| r.pci_segment).collect::<Vec<_>>())].into_iter().chain([
                ("disks.pci_segment", self.disks.iter().flatten().map(|d| d.pci_segment).collect()),
                ("net.pci_segment", self.net.iter().flatten().map(|n| n.pci_segment).collect()),
                ("fs.pci_segment", self.fs.iter().flatten().map(|f| f.pci_segment).collect()),
                ("vsock.pci_segment", self.vsock.iter().map(|v| v.pci_segment).collect()),
            ]);
        for (field, wanted) in placed {
            for (i, segment) in wanted.into_iter().enumerate() {
                if segment >= segments {
                    return Err(invalid(
                        field,
                        format!(
                            "device {i} asks for segment {segment}, but platform.num_pci_segments is {segments} \
                             (segments 0..={})",
                            segments - 1
                        ),
                    ));
                }
            }
        }
        Ok(())
    }

    /// virtio-fs shares: well-formed, on shared memory, and never under heki
    /// (`docs/heki.md`, "vhost-user devices").
    fn validate_fs(&self) -> Result<(), ConfigError> {
        let shares = self.fs.as_deref().unwrap_or_default();
        if shares.is_empty() {
            return Ok(());
        }
        if self.heki.enabled {
            return Err(invalid(
                "fs",
                "not available with heki enabled: a vhost-user backend maps all of guest RAM and writes it \
                 outside the VMM, where heki's DMA guard cannot refuse a write to locked or private memory",
            ));
        }
        if !self.memory.shared {
            return Err(invalid("fs", "needs memory.shared=true: the vhost-user backend maps guest RAM"));
        }
        if shares.len() > 8 {
            return Err(invalid("fs", "at most 8 virtio-fs devices"));
        }
        for fs in shares {
            if fs.tag.is_empty() || fs.tag.len() > FS_TAG_MAX {
                return Err(invalid("fs.tag", format!("'{}': 1 to {FS_TAG_MAX} bytes", fs.tag)));
            }
            if fs.num_queues == 0 || fs.num_queues > FS_MAX_QUEUES {
                return Err(invalid("fs.num_queues", format!("must be 1..={FS_MAX_QUEUES}, got {}", fs.num_queues)));
            }
            if !fs.queue_size.is_power_of_two() || fs.queue_size > 32768 {
                return Err(invalid(
                    "fs.queue_size",
                    format!("must be a power of two up to 32768, got {}", fs.queue_size),
                ));
            }
        }
        Ok(())
    }
}
