#!/usr/bin/env bash
# API latency: 10,000 vmm.ping and 10,000 vm.info requests (one connection
# each, as hk-remote does) against a hekivisor running the ticker guest.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --quiet
guest=$(cargo run --release --quiet --example build-guest -- ticker)
dir=$(mktemp -d /tmp/hekivisor-bench-api.XXXXXX)
sock="$dir/api.sock"
target/release/hekivisor --api-socket "path=$sock" </dev/null 2>/dev/null &
pid=$!
trap 'kill $pid 2>/dev/null; rm -rf "$dir"' EXIT
for _ in $(seq 100); do [ -S "$sock" ] && break; sleep 0.05; done
cat > "$dir/vm.json" <<JSON
{"memory":{"size":67108864},"payload":{"kernel":"$guest"},"serial":{"mode":"Null"}}
JSON
target/release/hk-remote --api-socket "$sock" create "$dir/vm.json"
target/release/hk-remote --api-socket "$sock" boot
cargo run --release --quiet --example api-bench -- "$sock" "${REQUESTS:-10000}"
echo "(goal: p50 < 150 us)"
