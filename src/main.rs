// TEMPORARY test main; replaced when the CLI lands.
fn main() {
    env_logger::init();
    let args: Vec<String> = std::env::args().collect();
    let mut cfg = vmm::config::VmConfig::default();
    let mut no_reboot = false;
    let mut i = 1;
    while i < args.len() {
        match args[i].as_str() {
            "--kernel" => {
                i += 1;
                cfg.payload.get_or_insert_with(Default::default).kernel =
                    Some(args[i].clone().into());
            }
            "--cpus" => {
                i += 1;
                cfg.cpus.boot_vcpus = args[i].parse().unwrap();
                cfg.cpus.max_vcpus = cfg.cpus.boot_vcpus;
            }
            "--no-reboot" => no_reboot = true,
            _ => {}
        }
        i += 1;
    }
    match vmm::run(vmm::VmmRunConfig {
        vm: Some(cfg),
        api_listener: None,
        no_reboot,
    }) {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            eprintln!("hekivisor: {e}");
            std::process::exit(1)
        }
    }
}
