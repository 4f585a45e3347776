#!/usr/bin/env bash
# Boot benchmark: the same tiny PVH guest (prints one line, powers off) under
# hekivisor, Debian's QEMU microvm and, when a `cloud-hypervisor` binary is on
# PATH, Cloud Hypervisor: whole process, 20 runs each, interleaved, 256 MiB.
# Prints the median wall time of each, the ratios, and hekivisor's peak RSS.
set -euo pipefail
cd "$(dirname "$0")/.."
runs=${RUNS:-20}
mem=${MEM_MIB:-256}
ch=$(command -v cloud-hypervisor || true)

if ! command -v qemu-system-x86_64 >/dev/null; then
    apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq qemu-system-x86 >/dev/null
fi
cargo build --release --quiet
guest=$(cargo run --release --quiet --example build-guest -- tiny)
hk=target/release/hekivisor

now_ns() { date +%s%N; }
hk_times=(); qemu_times=(); ch_times=()
for _ in $(seq "$runs"); do
    t0=$(now_ns)
    "$hk" --kernel "$guest" --memory "size=${mem}M" --serial null --no-reboot
    t1=$(now_ns)
    timeout 30 qemu-system-x86_64 -enable-kvm -cpu qemu64,-cx16 -M microvm -m "$mem" -nographic -no-reboot \
        -serial null -monitor none -kernel "$guest" -device isa-debug-exit,iobase=0xf4,iosize=1 >/dev/null 2>&1 || true
    t2=$(now_ns)
    hk_times+=($(( (t1 - t0) / 1000 )))
    qemu_times+=($(( (t2 - t1) / 1000 )))
    if [ -n "$ch" ]; then
        t3=$(now_ns)
        timeout 30 "$ch" --kernel "$guest" --cpus boot=1 --memory "size=${mem}M" --serial null --console off \
            >/dev/null 2>&1 || true
        t4=$(now_ns)
        ch_times+=($(( (t4 - t3) / 1000 )))
    fi
done

median() { printf '%s\n' "$@" | sort -n | awk '{a[NR]=$1} END {print (NR%2) ? a[(NR+1)/2] : int((a[NR/2]+a[NR/2+1])/2)}'; }
hk_med=$(median "${hk_times[@]}")
qemu_med=$(median "${qemu_times[@]}")
rss_kb=$(/usr/bin/time -f '%M' "$hk" --kernel "$guest" --memory "size=${mem}M" --serial null --no-reboot 2>&1 >/dev/null | tail -1)
echo "runs:                 $runs each, interleaved, ${mem} MiB"
echo "hekivisor median:     ${hk_med} us"
echo "qemu microvm median:  ${qemu_med} us"
awk -v a="$hk_med" -v b="$qemu_med" 'BEGIN { printf "ratio hekivisor/qemu: %.3f (goal <= 0.5)\n", a / b }'
if [ -n "$ch" ]; then
    ch_med=$(median "${ch_times[@]}")
    ch_rss_kb=$(/usr/bin/time -f '%M' "$ch" --kernel "$guest" --cpus boot=1 --memory "size=${mem}M" --serial null \
        --console off 2>&1 >/dev/null | tail -1)
    echo "cloud-hypervisor median: ${ch_med} us ($("$ch" --version 2>/dev/null | head -1))"
    awk -v a="$hk_med" -v b="$ch_med" 'BEGIN { printf "ratio hekivisor/ch:   %.3f (goal <= 1)\n", a / b }'
    echo "cloud-hypervisor peak RSS: ${ch_rss_kb} KiB"
else
    echo "cloud-hypervisor:     not on PATH; no CH column"
fi
echo "hekivisor peak RSS:   ${rss_kb} KiB (guest RAM is mapped lazily; this includes the pages the guest touched)"
