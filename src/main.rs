//! `hekivisor`: boot a VM from the command line, or serve the REST API.

use std::process::ExitCode;

use clap::Parser;
use vmm::config::VmmOptions;
use vmm::config::cli::CliArgs;

fn main() -> ExitCode {
    let args = CliArgs::parse();
    let options = match args.into_options() {
        Ok(options) => options,
        Err(e) => return fail(&e),
    };
    if let Err(e) = init_logging(&options) {
        eprintln!("hekivisor: cannot open log file: {e}");
        return ExitCode::FAILURE;
    }
    match run(options) {
        Ok(0) => ExitCode::SUCCESS,
        Ok(code) => ExitCode::from(code.clamp(1, 255) as u8),
        Err(e) => fail(e.as_ref()),
    }
}

fn run(options: VmmOptions) -> Result<i32, Box<dyn std::error::Error>> {
    if let Some(spec) = &options.event_monitor {
        vmm::start_event_monitor(spec)?;
    }
    let api_listener = match &options.api_socket {
        Some(spec) => Some(vmm::api::bind_api_socket(spec)?),
        None => None,
    };
    if options.vm.is_none() && api_listener.is_none() {
        return Err("nothing to do: give --kernel to boot a VM, or --api-socket to wait for one (see --help)".into());
    }
    Ok(vmm::run(vmm::VmmRunConfig { vm: options.vm, api_listener, no_reboot: options.no_reboot })?)
}

/// Prints the error and its causes on one line, as `hekivisor: ...`.
fn fail(e: &dyn std::error::Error) -> ExitCode {
    eprintln!("hekivisor: {}", vmm::error_chain(e));
    ExitCode::FAILURE
}

fn init_logging(options: &VmmOptions) -> std::io::Result<()> {
    let level = match options.verbosity {
        0 => log::LevelFilter::Warn,
        1 => log::LevelFilter::Info,
        2 => log::LevelFilter::Debug,
        _ => log::LevelFilter::Trace,
    };
    let mut builder = env_logger::Builder::new();
    builder.filter_level(level).parse_env("HEKIVISOR_LOG");
    if let Some(path) = &options.log_file {
        let file = std::fs::OpenOptions::new().create(true).append(true).open(path)?;
        builder.target(env_logger::Target::Pipe(Box::new(file)));
    }
    builder.init();
    Ok(())
}
