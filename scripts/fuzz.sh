#!/usr/bin/env bash
# Runs every fuzz target (or the ones named) for a while each and prints a
# summary table: target, runs, coverage, corpus size, crashes.
#
#   scripts/fuzz.sh [-t SECONDS] [-s address|none] [TARGET...]
#
# -t: time per target (default 600 = 10 minutes). -s: sanitizer (default
# address; "none" is about 7x faster and finds panics but not memory errors).
# Corpora are kept in fuzz/corpus/TARGET (so each run starts where the last
# one ended), crash inputs in fuzz/artifacts/TARGET, full logs in
# fuzz/logs/TARGET.log. Needs cargo-fuzz (`cargo install cargo-fuzz`); it runs
# on the stable toolchain through RUSTC_BOOTSTRAP=1. By hand only: CI runs the
# regression tests of past crashes (tests/fuzz_regressions.rs) instead.
set -euo pipefail
cd "$(dirname "$0")/../fuzz"

seconds=600
sanitizer=address
while getopts "t:s:h" opt; do
    case "$opt" in
        t) seconds="$OPTARG" ;;
        s) sanitizer="$OPTARG" ;;
        *) sed -n '2,13p' "$0"; exit 2 ;;
    esac
done
shift $((OPTIND - 1))

if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "fuzz.sh: cargo-fuzz is missing: cargo install cargo-fuzz" >&2
    exit 1
fi
export RUSTC_BOOTSTRAP=1
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
    mapfile -t targets < <(cargo fuzz list)
fi

echo "building ${#targets[@]} targets (sanitizer: $sanitizer)..." >&2
for t in "${targets[@]}"; do
    cargo fuzz build --sanitizer "$sanitizer" "$t" >&2
done

mkdir -p logs
rows=()
for t in "${targets[@]}"; do
    mkdir -p "corpus/$t" "artifacts/$t"
    before=$(find "artifacts/$t" -type f | wc -l)
    echo "fuzzing $t for ${seconds}s..." >&2
    set +e
    cargo fuzz run --sanitizer "$sanitizer" "$t" "corpus/$t" -- \
        -max_total_time="$seconds" -print_final_stats=1 -close_fd_mask=3 >"logs/$t.log" 2>&1
    status=$?
    set -e
    runs=$(grep -oP 'stat::number_of_executed_units:\s*\K[0-9]+' "logs/$t.log" | tail -1 || true)
    cov=$(grep -oP '^#[0-9]+\s+\S+\s+cov: \K[0-9]+' "logs/$t.log" | tail -1 || true)
    ft=$(grep -oP '^#[0-9]+\s+\S+\s+cov: [0-9]+ ft: \K[0-9]+' "logs/$t.log" | tail -1 || true)
    corpus=$(find "corpus/$t" -type f | wc -l)
    crashes=$(( $(find "artifacts/$t" -type f | wc -l) - before ))
    if [ "$status" -ne 0 ] && [ "$crashes" -eq 0 ]; then
        crashes="exit $status"
    fi
    rows+=("$(printf '| %-14s | %12s | %6s | %7s | %7s | %-8s |' "$t" "${runs:-?}" "${cov:-?}" "${ft:-?}" "$corpus" "$crashes")")
done

echo
echo "fuzzing: ${seconds}s per target, sanitizer $sanitizer, $(date -u +%Y-%m-%d)"
echo
printf '| %-14s | %12s | %6s | %7s | %7s | %-8s |\n' target runs cov features corpus crashes
printf '|%s|%s|%s|%s|%s|%s|\n' "----------------" "--------------" "--------" "---------" "---------" "----------"
for row in "${rows[@]}"; do echo "$row"; done
