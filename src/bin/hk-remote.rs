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

fn request(cli: &Cli) -> Result<(&'static str, &'static str, Option<String>), String> {
    Ok(match &cli.command {
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
    })
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let (method, command, body) = match request(&cli) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("hk-remote: {e}");
            return ExitCode::FAILURE;
        }
    };
    match ApiClient::new(&cli.api_socket).call(method, command, body.as_deref()) {
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
