#!/usr/bin/env bash
# heki exit-path benchmarks, measured in one run on this host: a guest times
# each kind of exit with its TSC; this script prints the ratios the issues set
# goals for. Absolute numbers mean little where KVM emulates guest code.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --quiet
guest=$(cargo run --release --quiet --example build-guest -- bench)
hk=${CARGO_TARGET_DIR:-target}/release/hekivisor
out=$("$hk" --kernel "$guest" --memory size=64M --heki enabled=on --serial tty --event-monitor path=/dev/null </dev/null)
echo "$out"
val() { echo "$out" | sed -n "s/^bench $1 cycles_per_op=\([0-9]*\)$/\1/p"; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f", a / b }'; }
echo "denied write / PIO exit:                  $(ratio "$(val denied_write)" "$(val pio_exit)") (goal <= 1.3)"
echo "rep stosb over a locked page / denied write: $(ratio "$(val denied_rep_stosb_page)" "$(val denied_write)") (goal <= 4: O(1) exits)"
echo "rep stosq over a locked page / denied write: $(ratio "$(val denied_rep_stosq_page)" "$(val denied_write)") (goal <= 4: O(1) exits)"
echo "byte-neighbour write / plain MMIO exit:   $(ratio "$(val byte_neighbour_write)" "$(val mmio_exit)") (goal <= 1.3)"
echo "pinned MSR write / unintercepted write:   $(ratio "$(val msr_write_pinned)" "$(val msr_write_unintercepted)")"
runs=${RUNS:-5}
plain=(); pinned=()
for _ in $(seq "$runs"); do
    plain+=("$("$hk" --kernel "$guest" --memory size=64M --heki enabled=on --cmdline compute --serial tty </dev/null | sed -n 's/^bench compute cycles=//p')")
    pinned+=("$("$hk" --kernel "$guest" --memory size=64M --heki enabled=on --cmdline 'compute pin' --serial tty </dev/null | sed -n 's/^bench compute cycles=//p')")
done
median() { printf '%s\n' "$@" | sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
echo "compute loop with CR pin / without (median of $runs): $(ratio "$(median "${pinned[@]}")" "$(median "${plain[@]}")") (goal <= 1.02)"
