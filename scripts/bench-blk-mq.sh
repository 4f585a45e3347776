#!/usr/bin/env bash
# Multi-queue virtio-blk: 4 KiB reads through one queue, then the same number
# over two queues, each with its own device worker and driver thread
# (examples/bench-blk-mq.rs). Prints the load average with each run: with
# four busy threads, the ratio means something only on a machine with cores
# to spare.
#   scripts/bench-blk-mq.sh [REQUESTS] (default 200000; RUNS=3 runs)
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --quiet --example bench-blk-mq
bench=${CARGO_TARGET_DIR:-target}/release/examples/bench-blk-mq
for _ in $(seq "${RUNS:-3}"); do
    echo "load: $(cut -d' ' -f1-3 /proc/loadavg), cores: $(nproc)"
    "$bench" "${1:-200000}"
done
