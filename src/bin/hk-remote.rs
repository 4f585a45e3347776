//! `hk-remote`: drive a running hekivisor over its API socket.

use std::io::Read;
use std::process::ExitCode;

use api_client::ApiClient;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "hk-remote", version, about = "Control a running hekivisor through its REST API socket.")]
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
    /// Create a VM from a VmConfig JSON file (or - for stdin).
    Create {
        file: String,
    },
    /// Boot the created VM.
    Boot,
    /// Print the VM's config and state.
    Info,
    /// Print the VM's counters.
    Counters,
    Pause,
    Resume,
    /// Stop the VM (it can be booted again).
    Shutdown,
    Reboot,
    PowerButton,
    /// Delete the VM.
    Delete,
    /// Stop the VMM process.
    ShutdownVmm,
    /// Print heki status, features and counters.
    Heki,
    /// Lock guest memory from the host: GPA SIZE PERMISSIONS (e.g. 0x100000 0x1000 read,exec).
    HekiProtect {
        gpa: String,
        size: String,
        permissions: String,
    },
    /// Set the heki violation policy: deny, log, pause or shutdown.
    HekiPolicy {
        policy: String,
    },
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

fn request(cli: &Cli) -> Result<(&'static str, &'static str, Option<String>), String> {
    Ok(match &cli.command {
        Command::Ping => ("GET", "vmm.ping", None),
        Command::Create { file } => {
            let mut body = String::new();
            if file == "-" {
                std::io::stdin().read_to_string(&mut body).map_err(|e| format!("cannot read stdin: {e}"))?;
            } else {
                body = std::fs::read_to_string(file).map_err(|e| format!("cannot read {file}: {e}"))?;
            }
            ("PUT", "vm.create", Some(body))
        }
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
        Command::HekiProtect { gpa, size, permissions } => {
            let perms: Vec<String> = permissions.split(',').map(|p| format!("\"{}\"", p.trim())).collect();
            let body = format!(
                "{{\"ranges\":[{{\"gpa\":{},\"size\":{},\"permissions\":[{}]}}]}}",
                parse_number(gpa)?,
                parse_number(size)?,
                perms.join(",")
            );
            ("PUT", "vm.heki-protect", Some(body))
        }
        Command::HekiPolicy { policy } => ("PUT", "vm.heki-policy", Some(format!("{{\"policy\":\"{policy}\"}}"))),
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
            eprintln!("hk-remote: {e}");
            ExitCode::FAILURE
        }
    }
}
