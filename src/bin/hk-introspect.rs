//! `hk-introspect`: a command-line agent on a hekivisor introspection socket
//! (`docs/introspection.md`). One agent at a time may be connected; each run
//! of this tool is one connection, and everything it tracked is undone when
//! it exits.

use std::process::ExitCode;

use api_client::introspect::{Action, Agent, Error};
use clap::{Parser, Subcommand};
use serde_json::{Value, json};

#[derive(Parser)]
#[command(
    name = "hk-introspect",
    version,
    about = "Connect to a hekivisor introspection socket as the agent.",
    after_help = "Prints JSON: one line per result or event. A refused command prints its errno and message \
and exits 1.\nExample: hk-introspect --socket /tmp/agent.sock watch 0x163000 --reply deny"
)]
struct Cli {
    /// The introspection socket (`--introspection path=...` of hekivisor).
    #[arg(long, value_name = "PATH")]
    socket: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Print the hello: protocol version, the VM's vCPUs and memory, capabilities.
    Hello,
    /// Print events as JSON lines; events that hold a vCPU are answered with --reply.
    Events {
        #[arg(long, default_value = "continue", value_parser = parse_action)]
        reply: Action,
        /// Stop after this many events (default: until the VMM closes the socket).
        #[arg(long)]
        count: Option<u64>,
    },
    /// Print a vCPU's general registers.
    Regs {
        #[arg(long, default_value = "0")]
        vcpu: u8,
    },
    /// Print a vCPU's special registers (CRs, segments, EFER, GDT, IDT).
    Sregs {
        #[arg(long, default_value = "0")]
        vcpu: u8,
    },
    /// Read guest-physical memory (at most 64 KiB): {"gpa", "size", "data" (hex)}.
    Read {
        #[arg(value_parser = parse_number)]
        gpa: u64,
        #[arg(value_parser = parse_number)]
        size: u64,
    },
    /// Write guest-physical memory: GPA and the bytes in hex.
    Write {
        #[arg(value_parser = parse_number)]
        gpa: u64,
        hex: String,
    },
    /// Translate a guest-virtual address through a vCPU's page tables.
    Translate {
        #[arg(value_parser = parse_number)]
        gva: u64,
        #[arg(long, default_value = "0")]
        vcpu: u8,
    },
    /// Track writes to pages and answer each write there with --reply; prints every event.
    Watch {
        #[arg(value_parser = parse_number)]
        gpa: u64,
        /// Pages from the one holding GPA.
        #[arg(long, default_value = "1", value_parser = parse_number)]
        pages: u64,
        /// The answer to each write to the watched pages: continue, deny, retry or crash.
        #[arg(long, default_value = "continue", value_parser = parse_action)]
        reply: Action,
        /// Stop after this many writes to the watched pages (default: until the VMM closes the socket).
        #[arg(long)]
        count: Option<u64>,
    },
    /// Send any command: NAME and its arguments as a JSON object.
    Call {
        cmd: String,
        #[arg(default_value = "{}")]
        args: String,
    },
}

fn parse_number(s: &str) -> Result<u64, String> {
    let parsed = match s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        Some(hex) => u64::from_str_radix(hex, 16),
        None => s.parse(),
    };
    parsed.map_err(|_| format!("'{s}' is not a number"))
}

fn parse_action(s: &str) -> Result<Action, String> {
    Action::parse(s).ok_or_else(|| format!("'{s}' is not one of continue, deny, retry, crash"))
}

fn print(value: &Value) {
    println!("{value}");
}

/// Prints events until `count` matched `answer` (all events match when no filter is given).
fn follow(agent: &mut Agent, count: Option<u64>, answer: impl Fn(&Value) -> Option<Action>) -> Result<(), Error> {
    let mut matched = 0u64;
    while count.is_none_or(|c| matched < c) {
        let event = match agent.next_event(None) {
            Ok(Some(event)) => event,
            Ok(None) => continue,
            // The VM powered off: the VMM closed the socket.
            Err(Error::Closed) => return Ok(()),
            Err(e) => return Err(e),
        };
        print(&event);
        let chosen = answer(&event);
        if chosen.is_some() {
            matched += 1;
        }
        if event.get("reply_required") == Some(&Value::Bool(true))
            && let Some(seq) = event.get("seq").and_then(Value::as_u64)
        {
            agent.reply(seq, chosen.unwrap_or(Action::Continue))?;
        }
    }
    Ok(())
}

fn run(cli: Cli) -> Result<(), Error> {
    let mut agent = Agent::connect(&cli.socket)?;
    match cli.command {
        Command::Hello => print(&agent.call("hello", json!({}))?),
        Command::Events { reply, count } => follow(&mut agent, count, |_| Some(reply))?,
        Command::Regs { vcpu } => print(&agent.call("get-registers", json!({"vcpu": vcpu}))?),
        Command::Sregs { vcpu } => print(&agent.call("get-sregs", json!({"vcpu": vcpu}))?),
        Command::Read { gpa, size } => print(&agent.call("read-memory", json!({"gpa": gpa, "size": size}))?),
        Command::Write { gpa, hex } => print(&agent.call("write-memory", json!({"gpa": gpa, "data": hex}))?),
        Command::Translate { gva, vcpu } => print(&agent.call("translate", json!({"vcpu": vcpu, "gva": gva}))?),
        Command::Watch { gpa, pages, reply, count } => {
            let tracked = agent.call("track-write", json!({"gpa": gpa, "pages": pages}))?;
            eprintln!("hk-introspect: watching {tracked}; answering writes there with {}", reply.as_str());
            let start = tracked.get("gpa").and_then(Value::as_u64).unwrap_or(gpa);
            let end = start.saturating_add(pages.saturating_mul(4096));
            let in_range = move |event: &Value| {
                let gpa = event.get("gpa").and_then(Value::as_u64)?;
                (event.get("event").and_then(Value::as_str) == Some("write") && (start..end).contains(&gpa))
                    .then_some(reply)
            };
            follow(&mut agent, count, in_range)?;
        }
        Command::Call { cmd, args } => {
            let args: Value = serde_json::from_str(&args)
                .map_err(|e| Error::Protocol(format!("the arguments are not a JSON object: {e}")))?;
            print(&agent.call(&cmd, args)?);
        }
    }
    Ok(())
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let mut message = e.to_string();
            let mut source = std::error::Error::source(&e);
            while let Some(cause) = source {
                message.push_str(&format!(": {cause}"));
                source = cause.source();
            }
            eprintln!("hk-introspect: {message}");
            ExitCode::FAILURE
        }
    }
}
