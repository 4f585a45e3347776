#!/usr/bin/env bash
# API latency: 10,000 vmm.ping and 10,000 vm.info requests, one connection per
# request and over one kept-alive connection; prints p50/p99.
# By default a VM runs the ticker guest; NO_VM=1 benchmarks an empty VMM
# (vm.info then answers 404, which still measures the round trip).
# REQUESTS=N changes the count.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --quiet --bin hekivisor --bin hk-remote
cargo build --release --quiet -p api_client --example bench
bin="${CARGO_TARGET_DIR:-target}/release"
dir=$(mktemp -d /tmp/hekivisor-bench-api.XXXXXX)
sock="$dir/api.sock"
"$bin"/hekivisor --api-socket "path=$sock" </dev/null 2>/dev/null &
pid=$!
trap 'kill $pid 2>/dev/null; rm -rf "$dir"' EXIT
for _ in $(seq 200); do [ -S "$sock" ] && break; sleep 0.05; done
[ -S "$sock" ] || { echo "hekivisor did not create $sock" >&2; exit 1; }
if [ "${NO_VM:-0}" != 1 ]; then
    guest=$(cargo run --release --quiet --example build-guest -- ticker)
    cat > "$dir/vm.json" <<JSON
{"memory":{"size":67108864},"payload":{"kernel":"$guest"},"serial":{"mode":"Null"}}
JSON
    "$bin"/hk-remote --api-socket "$sock" create "$dir/vm.json"
    "$bin"/hk-remote --api-socket "$sock" boot
fi
"$bin/examples/bench" "$sock" "${REQUESTS:-10000}"
echo "(goal: p50 < 150 us)"
