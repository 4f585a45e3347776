//! `hekivisor`: boot a VM from the command line, or serve the REST API.

use std::process::ExitCode;

use clap::Parser;
use vmm::config::cli::CliArgs;
use vmm::config::{ApiSocketSpec, VmmOptions};

fn main() -> ExitCode {
    vmm::seccomp::prepare_process();
    // Before any thread starts: only the signal thread will take SIGTERM and SIGINT.
    if let Err(e) = vmm::signals::block_termination_signals() {
        eprintln!("hekivisor: cannot block SIGTERM and SIGINT: {e}");
        return ExitCode::FAILURE;
    }
    let args = CliArgs::parse();
    let options = match args.into_options() {
        Ok(options) => options,
        Err(e) => return fail(&e),
    };
    vmm::seccomp::set_mode(options.seccomp);
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
    let bound_path = match (&api_listener, &options.api_socket) {
        (Some(_), Some(ApiSocketSpec::Path(path))) => Some(path.clone()),
        _ => None,
    };
    let result = vmm::run(vmm::VmmRunConfig {
        vm: options.vm,
        api_listener,
        no_reboot: options.no_reboot,
        api_socket_path: bound_path.clone(),
    });
    // The socket we created goes with us (an inherited fd is the parent's business).
    if let Some(path) = bound_path {
        let _ = std::fs::remove_file(path);
    }
    Ok(result?)
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
