//! API latency: p50 and p99 of `vmm.ping` and `vm.info`, one connection per
//! request (as hk-remote does) and over one kept-alive connection.
//! Usage: cargo run --release -p api_client --example bench -- SOCKET [REQUESTS]

use std::process::ExitCode;
use std::time::Instant;

use api_client::ApiClient;

fn percentile(sorted: &[u128], p: f64) -> u128 {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

fn measure(client: &ApiClient, command: &str, n: usize) -> Result<Vec<u128>, api_client::Error> {
    let mut micros = Vec::with_capacity(n);
    for _ in 0..n {
        let start = Instant::now();
        client.request("GET", command, None)?;
        micros.push(start.elapsed().as_micros());
    }
    micros.sort_unstable();
    Ok(micros)
}

fn main() -> ExitCode {
    let mut args = std::env::args().skip(1);
    let Some(socket) = args.next() else {
        eprintln!("usage: bench SOCKET [REQUESTS]");
        return ExitCode::FAILURE;
    };
    let n: usize = args.next().and_then(|n| n.parse().ok()).filter(|n| *n > 0).unwrap_or(10_000);
    let kept = match ApiClient::connect(&socket) {
        Ok(client) => client,
        Err(e) => {
            eprintln!("bench: {e}");
            return ExitCode::FAILURE;
        }
    };
    let per_request = ApiClient::new(&socket);
    for (mode, client) in [("new connection", &per_request), ("keep-alive", &kept)] {
        for command in ["vmm.ping", "vm.info"] {
            match measure(client, command, n) {
                Ok(micros) => println!(
                    "{command:9} {mode:14} n={n} p50={}us p99={}us",
                    percentile(&micros, 0.5),
                    percentile(&micros, 0.99)
                ),
                Err(e) => {
                    eprintln!("bench: {command}: {e}");
                    return ExitCode::FAILURE;
                }
            }
        }
    }
    ExitCode::SUCCESS
}
