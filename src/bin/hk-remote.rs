//! `hk-remote`: drive a running hekivisor over its API socket.

use std::io::Read;
use std::process::ExitCode;

use api_client::ApiClient;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "hk-remote",
    version,
    about = "Control a running hekivisor through its REST API socket.",
    after_help = "Prints the JSON answer; on an HTTP error prints the server's message and exits 1.\n\
Example: hk-remote --api-socket /tmp/hk.sock create vm.json && hk-remote --api-socket /tmp/hk.sock boot"
)]
struct Cli {
    /// The API socket of the hekivisor to talk to.
    #[arg(long, value_name = "PATH")]
    api_socket: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Check the VMM is alive; prints its version and pid.
    Ping,
    /// Create a VM from a VmConfig JSON file (- or nothing: read stdin).
    Create {
        #[arg(value_name = "FILE|-", default_value = "-")]
        file: String,
    },
    /// Boot the created VM.
    Boot,
    /// Print the VM's config and state.
    Info,
    /// Print the VM's counters.
    Counters,
    /// Pause every vCPU.
    Pause,
    /// Resume a paused VM.
    Resume,
    /// Stop the VM (it can be booted again).
    Shutdown,
    /// Reboot the VM (a fresh VM from the same config).
    Reboot,
    /// Press the ACPI power button.
    PowerButton,
    /// Delete the VM.
    Delete,
    /// Stop the VMM process.
    ShutdownVmm,
    /// Print heki status, features and counters.
    Heki,
    /// Lock guest memory from the host: GPA SIZE PERMISSIONS (e.g. 0x100000 0x1000 read,exec),
    /// or --file FILE|- with a full {"ranges":[...]} body.
    HekiProtect {
        /// A JSON body: {"ranges":[{"gpa":N,"size":N,"permissions":["read","exec","immutable"]}]}.
        #[arg(long, value_name = "FILE|-", conflicts_with_all = ["gpa", "size", "permissions"])]
        file: Option<String>,
        /// Guest physical address, page aligned (0x... or decimal).
        #[arg(required_unless_present = "file")]
        gpa: Option<String>,
        /// Bytes, a multiple of the page size (0x... or decimal).
        #[arg(required_unless_present = "file")]
        size: Option<String>,
        /// Comma-separated: read, write, exec, immutable.
        #[arg(required_unless_present = "file")]
        permissions: Option<String>,
    },
    /// Set the heki violation policy: deny, log, pause or shutdown.
    HekiPolicy { policy: String },
    /// Print the most recent heki violations.
    HekiViolations,
    /// Add a disk, as ch-remote does: "path=FILE[,readonly=on][,id=ID]".
    AddDisk { config: String },
    /// Add a network device: "[tap=NAME|fd=[N]][,ip=..,mask=..][,mac=..][,id=ID]"; the descriptors
    /// named by fd= (open in hk-remote) are sent along as SCM_RIGHTS.
    AddNet { config: String },
    /// Add a virtio-fs share: "tag=TAG,socket=PATH[,id=ID]".
    AddFs { config: String },
    /// Add the virtio-vsock device: "cid=N,socket=PATH[,id=ID]".
    AddVsock { config: String },
    /// Remove a device by id (the guest must have released it; docs/api.md).
    RemoveDevice { id: String },
    /// Resize vCPUs or memory (a running VM: only to its current size; docs/api.md).
    Resize {
        #[arg(long)]
        cpus: Option<u32>,
        /// Bytes, or with a K/M/G suffix.
        #[arg(long)]
        memory: Option<String>,
        #[arg(long)]
        balloon: Option<String>,
    },
    /// Pin CR bits and MSRs on every vCPU at their current values,
    /// e.g. --cr0 0x10000 --cr4 0x300000 --msr 0xc0000082.
    HekiPin {
        #[arg(long)]
        cr0: Option<String>,
        #[arg(long)]
        cr4: Option<String>,
        #[arg(long = "msr")]
        msrs: Vec<String>,
    },
}

fn parse_number(s: &str) -> Result<u64, String> {
    let parsed = match s.strip_prefix("0x") {
        Some(hex) => u64::from_str_radix(hex, 16),
        None => s.parse(),
    };
    parsed.map_err(|_| format!("'{s}' is not a number"))
}

/// Reads a request body from FILE, or from stdin for `-`.
fn read_input(file: &str) -> Result<String, String> {
    if file == "-" {
        let mut body = String::new();
        std::io::stdin().read_to_string(&mut body).map_err(|e| format!("cannot read stdin: {e}"))?;
        return Ok(body);
    }
    std::fs::read_to_string(file).map_err(|e| format!("cannot read {file}: {e}"))
}

/// Takes `fd=[3,4]` (Cloud Hypervisor's list) or `fd=3` out of a net config;
/// the rest goes to the option parser.
fn take_fds(config: &str) -> Result<(String, Vec<i32>), String> {
    let Some(at) = config.find("fd=").filter(|&at| at == 0 || config[..at].ends_with(',')) else {
        return Ok((config.to_string(), Vec::new()));
    };
    let value = &config[at + 3..];
    let (list, rest) = match value.strip_prefix('[') {
        Some(inner) => {
            let end = inner.find(']').ok_or("fd=[...: no closing bracket")?;
            (&inner[..end], &inner[end + 1..])
        }
        None => value.split_at(value.find(',').unwrap_or(value.len())),
    };
    let fds = list
        .split(',')
        .filter(|n| !n.trim().is_empty())
        .map(|n| n.trim().parse::<i32>().map_err(|_| format!("fd={list}: '{n}' is not a descriptor number")))
        .collect::<Result<Vec<_>, _>>()?;
    let rest = rest.strip_prefix(',').unwrap_or(rest);
    let before = config[..at].trim_end_matches(',');
    let joined = [before, rest].iter().filter(|p| !p.is_empty()).copied().collect::<Vec<_>>().join(",");
    Ok((joined, fds))
}

fn size(text: &str) -> Result<u64, String> {
    vmm::config::parse_size(text).map_err(|e| e.to_string())
}

/// The request and the descriptors to send with it (`add-net fd=[...]`).
type Request = (&'static str, &'static str, Option<String>, Vec<std::os::fd::OwnedFd>);

fn request(cli: &Cli) -> Result<Request, String> {
    use vmm::config::cli::{parse_disk, parse_fs, parse_net, parse_vsock};
    let plain =
        |(method, command, body): (&'static str, &'static str, Option<String>)| Ok((method, command, body, Vec::new()));
    match &cli.command {
        Command::AddDisk { config } => {
            let disk = parse_disk(config).map_err(|e| e.to_string())?;
            return plain(("PUT", "vm.add-disk", Some(serde_json::to_string(&disk).map_err(|e| e.to_string())?)));
        }
        Command::AddNet { config } => {
            let (rest, numbers) = take_fds(config)?;
            // The numbers mean nothing to the VMM: the descriptors themselves travel.
            let body = if rest.is_empty() {
                "{}".to_string()
            } else {
                let mut net = parse_net(&rest).map_err(|e| e.to_string())?;
                net.fds = None;
                serde_json::to_string(&net).map_err(|e| e.to_string())?
            };
            let fds = numbers
                .iter()
                .map(|&n| vmm::devices::virtio::tap::duplicate(n).map_err(|e| format!("fd={n}: {e}")))
                .collect::<Result<Vec<_>, _>>()?;
            return Ok(("PUT", "vm.add-net", Some(body), fds));
        }
        Command::AddFs { config } => {
            let fs = parse_fs(config).map_err(|e| e.to_string())?;
            return plain(("PUT", "vm.add-fs", Some(serde_json::to_string(&fs).map_err(|e| e.to_string())?)));
        }
        Command::AddVsock { config } => {
            let vsock = parse_vsock(config).map_err(|e| e.to_string())?;
            return plain(("PUT", "vm.add-vsock", Some(serde_json::to_string(&vsock).map_err(|e| e.to_string())?)));
        }
        Command::RemoveDevice { id } => {
            return plain(("PUT", "vm.remove-device", Some(serde_json::json!({ "id": id }).to_string())));
        }
        Command::Resize { cpus, memory, balloon } => {
            let body = serde_json::json!({
                "desired_vcpus": cpus,
                "desired_ram": memory.as_deref().map(size).transpose()?,
                "desired_balloon": balloon.as_deref().map(size).transpose()?,
            });
            return plain(("PUT", "vm.resize", Some(body.to_string())));
        }
        _ => {}
    }
    plain(match &cli.command {
        Command::Ping => ("GET", "vmm.ping", None),
        Command::Create { file } => ("PUT", "vm.create", Some(read_input(file)?)),
        Command::Boot => ("PUT", "vm.boot", None),
        Command::Info => ("GET", "vm.info", None),
        Command::Counters => ("GET", "vm.counters", None),
        Command::Pause => ("PUT", "vm.pause", None),
        Command::Resume => ("PUT", "vm.resume", None),
        Command::Shutdown => ("PUT", "vm.shutdown", None),
        Command::Reboot => ("PUT", "vm.reboot", None),
        Command::PowerButton => ("PUT", "vm.power-button", None),
        Command::Delete => ("PUT", "vm.delete", None),
        Command::ShutdownVmm => ("PUT", "vmm.shutdown", None),
        Command::Heki => ("GET", "vm.heki", None),
        Command::HekiProtect { file: Some(file), .. } => ("PUT", "vm.heki-protect", Some(read_input(file)?)),
        Command::HekiProtect { file: None, gpa, size, permissions } => {
            let (Some(gpa), Some(size), Some(permissions)) = (gpa, size, permissions) else {
                return Err("heki-protect needs GPA SIZE PERMISSIONS or --file".into());
            };
            let permissions: Vec<&str> = permissions.split(',').map(str::trim).filter(|p| !p.is_empty()).collect();
            let body = serde_json::json!({
                "ranges": [{ "gpa": parse_number(gpa)?, "size": parse_number(size)?, "permissions": permissions }]
            });
            ("PUT", "vm.heki-protect", Some(body.to_string()))
        }
        Command::HekiPolicy { policy } => {
            ("PUT", "vm.heki-policy", Some(serde_json::json!({ "policy": policy }).to_string()))
        }
        Command::HekiViolations => ("GET", "vm.heki-violations", None),
        Command::HekiPin { cr0, cr4, msrs } => {
            let body = serde_json::json!({ "cr0": cr0, "cr4": cr4, "msrs": msrs });
            ("PUT", "vm.heki-pin", Some(body.to_string()))
        }
        Command::AddDisk { .. }
        | Command::AddNet { .. }
        | Command::AddFs { .. }
        | Command::AddVsock { .. }
        | Command::RemoveDevice { .. }
        | Command::Resize { .. } => unreachable!("answered above"),
    })
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let (method, command, body, fds) = match request(&cli) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("hk-remote: {e}");
            return ExitCode::FAILURE;
        }
    };
    let client = ApiClient::new(&cli.api_socket);
    let answer = if fds.is_empty() {
        client.call(method, command, body.as_deref())
    } else {
        let borrowed: Vec<_> = fds.iter().map(std::os::fd::AsFd::as_fd).collect();
        client.request_with_fds(method, command, body.as_deref(), &borrowed).and_then(|r| r.into_result())
    };
    match answer {
        Ok(Some(json)) => {
            match serde_json::from_str::<serde_json::Value>(&json) {
                Ok(v) => println!("{}", serde_json::to_string_pretty(&v).unwrap_or(json)),
                Err(_) => println!("{json}"),
            }
            ExitCode::SUCCESS
        }
        Ok(None) => ExitCode::SUCCESS,
        Err(e) => {
            let mut message = e.to_string();
            let mut source = std::error::Error::source(&e);
            while let Some(cause) = source {
                message.push_str(&format!(": {cause}"));
                source = cause.source();
            }
            eprintln!("hk-remote: {message}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::take_fds;

    #[test]
    fn descriptor_lists_in_cloud_hypervisor_syntax_are_taken_out_of_a_net_config() {
        assert_eq!(take_fds("fd=[3,4],mac=52:54:00:00:00:01"), Ok(("mac=52:54:00:00:00:01".into(), vec![3, 4])));
        assert_eq!(take_fds("mac=aa:bb:cc:dd:ee:ff,fd=5,id=n"), Ok(("mac=aa:bb:cc:dd:ee:ff,id=n".into(), vec![5])));
        assert_eq!(take_fds("tap=t0,ip=10.0.0.1"), Ok(("tap=t0,ip=10.0.0.1".into(), vec![])));
        assert!(take_fds("fd=[3,x]").is_err());
        assert!(take_fds("fd=[3").is_err());
    }
}
