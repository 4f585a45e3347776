//! An introspection agent that protects a guest's IDT and chosen data pages
//! from outside the guest, with heki off: introspection alone enforces.
//!
//! ```sh
//! hekivisor --kernel vmlinux --introspection path=/tmp/agent.sock &
//! cargo run --example protect-idt-agent -- --socket /tmp/agent.sock --page 0x163000
//! ```
//!
//! It finds the IDT through vCPU 0's special registers (`get-sregs`: IDTR
//! base and limit, a guest-virtual range), translates each of its pages
//! (`translate`) and tracks writes to them (`track-write`), together with
//! each `--page`. Every write that touches the IDT's bytes or a protected
//! page is answered `deny` and logged as a JSON line; other writes to the
//! same pages (the IDT may share a page with other data) are let through.
//! `LIDT` does not exit to user space on a stock kernel, so the IDTR is read
//! again every half second and the tracking follows a moved IDT.
//! When the agent exits, the VMM undoes its tracking.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use api_client::introspect::{Action, Agent, Error};
use serde_json::{Value, json};

const PAGE: u64 = 4096;
/// CR0.PG: paging on, so the IDTR base is a virtual address we can translate.
const CR0_PG: u64 = 1 << 31;
/// How often the IDTR is read again (a guest may move its IDT with LIDT).
const RECHECK: Duration = Duration::from_millis(500);

pub struct Options {
    pub socket: PathBuf,
    /// Guest-physical addresses of data pages to protect.
    pub pages: Vec<u64>,
    /// Only this vCPU's IDT (default: every vCPU's).
    pub vcpu: Option<u8>,
}

impl Options {
    fn parse(mut args: impl Iterator<Item = String>) -> Result<Options, String> {
        let mut options = Options { socket: PathBuf::new(), pages: Vec::new(), vcpu: None };
        while let Some(arg) = args.next() {
            let mut value = || args.next().ok_or_else(|| format!("{arg} needs a value"));
            match arg.as_str() {
                "--socket" => options.socket = PathBuf::from(value()?),
                "--page" => options.pages.push(number(&value()?)?),
                "--vcpu" => options.vcpu = Some(u8::try_from(number(&value()?)?).map_err(|_| "--vcpu: 0 to 255")?),
                "--help" | "-h" => return Err(String::new()),
                other => return Err(format!("unknown argument '{other}'")),
            }
        }
        if options.socket.as_os_str().is_empty() {
            return Err("--socket is required".into());
        }
        Ok(options)
    }
}

fn number(text: &str) -> Result<u64, String> {
    let parsed = match text.strip_prefix("0x") {
        Some(hex) => u64::from_str_radix(hex, 16),
        None => text.parse(),
    };
    parsed.map_err(|_| format!("'{text}' is not a number"))
}

/// What is protected: guest-physical byte ranges, and the pages tracked for them.
#[derive(Default)]
struct Guard {
    /// (start, end, what) in guest-physical addresses.
    ranges: Vec<(u64, u64, &'static str)>,
    /// Tracked guest-physical pages (page-aligned addresses).
    tracked: BTreeSet<u64>,
    /// Each vCPU's IDTR last seen: (base, limit).
    idtrs: std::collections::BTreeMap<u8, (u64, u64)>,
}

impl Guard {
    /// The protected range a write of `size` bytes at `gpa` touches.
    fn protected(&self, gpa: u64, size: u64) -> Option<&'static str> {
        let end = gpa.saturating_add(size.max(1));
        self.ranges.iter().find(|(start, stop, _)| gpa < *stop && *start < end).map(|r| r.2)
    }

    /// Tracks exactly `wanted` pages: new ones are tracked, dropped ones untracked.
    fn track(&mut self, agent: &mut Agent, wanted: BTreeSet<u64>) -> Result<(), Error> {
        for &page in wanted.difference(&self.tracked) {
            agent.call("track-write", json!({"gpa": page}))?;
        }
        for &page in self.tracked.difference(&wanted) {
            agent.call("untrack-write", json!({"gpa": page}))?;
        }
        self.tracked = wanted;
        Ok(())
    }

    /// Reads every watched vCPU's IDTR and protects the IDTs where they are
    /// now. `Some` (for the log) when one moved; `None` while there is no VM
    /// or no paged IDT yet.
    fn follow_idts(&mut self, agent: &mut Agent, vcpus: &[u8], options: &Options) -> Result<Option<Value>, Error> {
        let mut idtrs = std::collections::BTreeMap::new();
        for &vcpu in vcpus {
            let sregs = match agent.call("get-sregs", json!({"vcpu": vcpu})) {
                Ok(sregs) => sregs,
                // Not booted yet, rebooting, or a vCPU not started.
                Err(Error::Refused { errno, .. }) if matches!(errno.as_str(), "ENODEV" | "ETIMEDOUT" | "ENOENT") => {
                    continue;
                }
                Err(e) => return Err(e),
            };
            let get = |v: &Value| v.as_u64().unwrap_or(0);
            let (base, limit) = (get(&sregs["idt"]["base"]), get(&sregs["idt"]["limit"]));
            if get(&sregs["cr0"]) & CR0_PG != 0 && limit != 0 {
                idtrs.insert(vcpu, (base, limit));
            }
        }
        if idtrs.is_empty() || idtrs == self.idtrs {
            return Ok(None);
        }
        let mut ranges: Vec<(u64, u64, &'static str)> = self.ranges.iter().filter(|r| r.2 != "idt").copied().collect();
        // vCPUs usually share one IDT: each distinct one is translated once.
        let mut seen = BTreeSet::new();
        for (&vcpu, &(base, limit)) in &idtrs {
            if !seen.insert((base, limit)) {
                continue;
            }
            let mut gva = base;
            let end = base.saturating_add(limit + 1);
            while gva < end {
                let page_end = ((gva / PAGE) + 1).saturating_mul(PAGE).min(end);
                let translated = agent.call("translate", json!({"vcpu": vcpu, "gva": gva}))?;
                let Some(gpa) = translated["gpa"].as_u64() else {
                    // Not mapped (yet): try again at the next check.
                    return Ok(None);
                };
                ranges.push((gpa, gpa + (page_end - gva), "idt"));
                gva = page_end;
            }
        }
        let wanted = ranges.iter().flat_map(|&(start, stop, _)| (start / PAGE..stop.div_ceil(PAGE)).map(|p| p * PAGE));
        self.track(agent, wanted.collect())?;
        self.ranges = ranges;
        let idt: Vec<Value> =
            self.ranges.iter().filter(|r| r.2 == "idt").map(|r| json!({"gpa": r.0, "size": r.1 - r.0})).collect();
        let per_vcpu: Vec<Value> =
            idtrs.iter().map(|(vcpu, (base, limit))| json!({"vcpu": vcpu, "base": base, "limit": limit})).collect();
        self.idtrs = idtrs;
        Ok(Some(json!({"protecting": {"idt": {"idtr": per_vcpu, "ranges": idt}, "pages": options.pages}})))
    }
}

/// Protects until the VMM closes the socket; each log entry goes to `log`.
pub fn run(options: &Options, mut log: impl FnMut(Value)) -> Result<(), Error> {
    let mut agent = connect(options)?;
    let mut guard = Guard::default();
    for &page in &options.pages {
        let start = page / PAGE * PAGE;
        guard.ranges.push((start, start + PAGE, "page"));
    }
    let pages = guard.ranges.iter().map(|r| r.0).collect();
    guard.track(&mut agent, pages)?;
    let vcpus: Vec<u8> = match options.vcpu {
        Some(vcpu) => vec![vcpu],
        None => {
            let count = agent.hello["vm"]["vcpus"].as_u64().unwrap_or(1).clamp(1, 256);
            (0..count).map(|v| v as u8).collect()
        }
    };
    let mut checked: Option<Instant> = None;
    loop {
        if checked.is_none_or(|at| at.elapsed() >= RECHECK) {
            if let Some(entry) = guard.follow_idts(&mut agent, &vcpus, options)? {
                log(entry);
            }
            checked = Some(Instant::now());
        }
        let event = match agent.next_event(Some(RECHECK)) {
            Ok(Some(event)) => event,
            Ok(None) => continue,
            // The VM powered off and the VMM went away.
            Err(Error::Closed) => return Ok(()),
            Err(e) => return Err(e),
        };
        if event["reply_required"] != true {
            continue;
        }
        let Some(seq) = event["seq"].as_u64() else { continue };
        let touched = match (event["event"].as_str(), event["gpa"].as_u64(), event["size"].as_u64()) {
            (Some("write"), Some(gpa), Some(size)) => guard.protected(gpa, size),
            _ => None,
        };
        match touched {
            Some(what) => {
                agent.reply(seq, Action::Deny)?;
                log(json!({"denied": what, "gpa": event["gpa"], "size": event["size"], "value": event["value"],
                           "vcpu": event["vcpu"], "rip": event["rip"]}));
            }
            None => agent.reply(seq, Action::Continue)?,
        }
    }
}

/// Connects, waiting up to 10 s for the socket to appear.
fn connect(options: &Options) -> Result<Agent, Error> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match Agent::connect(&options.socket) {
            Err(Error::Io(_)) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(50)),
            other => return other,
        }
    }
}

fn main() -> std::process::ExitCode {
    let options = match Options::parse(std::env::args().skip(1)) {
        Ok(options) => options,
        Err(e) => {
            if !e.is_empty() {
                eprintln!("protect-idt-agent: {e}");
            }
            eprintln!("usage: protect-idt-agent --socket PATH [--page GPA]... [--vcpu N (default: every vCPU)]");
            return std::process::ExitCode::FAILURE;
        }
    };
    match run(&options, |entry| println!("{entry}")) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("protect-idt-agent: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
