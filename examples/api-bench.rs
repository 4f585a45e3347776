//! Latency of `vmm.ping` and `vm.info` over the API socket: p50 and p99.
//! Usage: cargo run --release --example api-bench -- SOCKET [REQUESTS]

use std::time::Instant;

use api_client::ApiClient;

fn percentile(sorted: &[u128], p: f64) -> u128 {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

fn main() {
    let mut args = std::env::args().skip(1);
    let socket = args.next().expect("usage: api-bench SOCKET [REQUESTS]");
    let n: usize = args.next().and_then(|n| n.parse().ok()).unwrap_or(10_000);
    let client = ApiClient::new(&socket);
    for command in ["vmm.ping", "vm.info"] {
        let mut micros: Vec<u128> = (0..n)
            .map(|_| {
                let start = Instant::now();
                client.call("GET", command, None).expect("request answered");
                start.elapsed().as_micros()
            })
            .collect();
        micros.sort_unstable();
        println!("{command:9} n={n} p50={}us p99={}us", percentile(&micros, 0.5), percentile(&micros, 0.99));
    }
}
