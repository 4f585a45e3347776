#!/usr/bin/env bash
# Linux boot benchmark: time from starting the VMM to the guest's first
# userspace line ("init: userspace up"), for the same heki kernel, initramfs
# and command line under hekivisor and Debian's QEMU microvm
# (-cpu kvm64,-cx16,vendor=GenuineIntel), RUNS runs each (default 3),
# interleaved, MEM_MIB of guest RAM (default 256). The VMM is killed once the
# line appears. Prints each run and the medians; see docs/benchmarks.md.
set -euo pipefail
cd "$(dirname "$0")/../.."
runs=${RUNS:-3}
mem=${MEM_MIB:-256}
cmdline=${CMDLINE:-"console=ttyS0 noxsave clearcpuid=smap,popcnt,cx16 panic=-1"}

if ! command -v qemu-system-x86_64 >/dev/null; then
    echo "bench: needs qemu-system-x86 (apt-get install qemu-system-x86)" >&2
    exit 1
fi
cargo build --release --quiet
guest=$(scripts/linux-guest/build.sh heki)
hk=target/release/hekivisor
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# Runs "$@" with serial output in $work/serial; prints milliseconds until the
# first userspace line, then kills the VMM.
time_to_userspace() {
    local out="$work/serial" start pid now
    : >"$out"
    start=$(date +%s%N)
    "$@" >"$out" 2>&1 </dev/null &
    pid=$!
    while ! grep -q "init: userspace up" "$out"; do
        if ! kill -0 "$pid" 2>/dev/null; then
            echo "bench: the VMM ended before userspace:" >&2
            tail -5 "$out" >&2
            return 1
        fi
        sleep 0.05
    done
    now=$(date +%s%N)
    kill "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
    echo $(((now - start) / 1000000))
}

hk_times=()
qemu_times=()
for run in $(seq "$runs"); do
    t=$(time_to_userspace "$hk" --kernel "$guest/vmlinux" --initramfs "$guest/initramfs.cpio" \
        --cmdline "$cmdline" --memory "size=${mem}M" --serial tty --no-reboot)
    hk_times+=("$t")
    q=$(time_to_userspace qemu-system-x86_64 -M microvm -enable-kvm \
        -cpu kvm64,-cx16,vendor=GenuineIntel -m "$mem" -nodefaults -no-user-config -nographic \
        -serial stdio -monitor none -no-reboot \
        -kernel "$guest/vmlinux" -initrd "$guest/initramfs.cpio" -append "$cmdline")
    qemu_times+=("$q")
    echo "run $run: hekivisor ${t} ms, qemu microvm ${q} ms"
done

median() { printf '%s\n' "$@" | sort -n | awk '{a[NR]=$1} END {print (NR%2) ? a[(NR+1)/2] : int((a[NR/2]+a[NR/2+1])/2)}'; }
hk_median=$(median "${hk_times[@]}")
qemu_median=$(median "${qemu_times[@]}")
echo "median to first userspace line: hekivisor ${hk_median} ms, qemu microvm ${qemu_median} ms," \
    "ratio $(awk -v a="$hk_median" -v b="$qemu_median" 'BEGIN {printf "%.2f", a / b}')"
