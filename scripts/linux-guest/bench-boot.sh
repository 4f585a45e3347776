#!/usr/bin/env bash
# Linux boot benchmark: time from starting the VMM to the guest's first
# userspace line ("init: userspace up"), for the same heki kernel, initramfs
# and command line under hekivisor and Debian's QEMU microvm
# (-cpu kvm64,-cx16,vendor=GenuineIntel), RUNS runs each (default 3),
# interleaved, MEM_MIB of guest RAM (default 256). The VMM is killed once the
# line appears. Prints each run and the medians; see docs/benchmarks.md.
# Besides the wall time it prints the CPU time (user + system, all threads)
# each VMM process had used by then: on this host the guest's instructions
# are emulated in the vCPU thread's system time, so when other work shares
# the cores the wall time follows the scheduler and the CPU time is the
# steadier measure of the work done. It also prints the load average.
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
hk=${CARGO_TARGET_DIR:-target}/release/hekivisor
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# CPU time (user + system) of process $1 so far, in milliseconds.
cpu_ms() {
    local stat
    stat=$(cat "/proc/$1/stat" 2>/dev/null) || { echo 0; return; }
    stat=${stat##*) }
    # shellcheck disable=SC2086
    set -- $stat
    echo $(((${12} + ${13}) * 1000 / $(getconf CLK_TCK)))
}

# Runs "$@" with serial output in $work/serial; prints milliseconds until the
# first userspace line and the CPU milliseconds the VMM used until then, then
# kills the VMM.
time_to_userspace() {
    local out="$work/serial" start pid now cpu
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
    cpu=$(cpu_ms "$pid")
    kill "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
    echo "$(((now - start) / 1000000)) $cpu"
}

hk_times=()
qemu_times=()
hk_cpu=()
qemu_cpu=()
echo "load average before: $(cut -d' ' -f1-3 /proc/loadavg)"
for run in $(seq "$runs"); do
    read -r t c < <(time_to_userspace "$hk" --kernel "$guest/vmlinux" --initramfs "$guest/initramfs.cpio" \
        --cmdline "$cmdline" --memory "size=${mem}M" --serial tty --no-reboot)
    [ -n "${t:-}" ] || exit 1
    hk_times+=("$t")
    hk_cpu+=("$c")
    read -r q qc < <(time_to_userspace qemu-system-x86_64 -M microvm -enable-kvm \
        -cpu kvm64,-cx16,vendor=GenuineIntel -m "$mem" -nodefaults -no-user-config -nographic \
        -serial stdio -monitor none -no-reboot \
        -kernel "$guest/vmlinux" -initrd "$guest/initramfs.cpio" -append "$cmdline")
    [ -n "${q:-}" ] || exit 1
    qemu_times+=("$q")
    qemu_cpu+=("$qc")
    echo "run $run: hekivisor ${t} ms (CPU ${c} ms), qemu microvm ${q} ms (CPU ${qc} ms)"
done
echo "load average after: $(cut -d' ' -f1-3 /proc/loadavg)"

median() { printf '%s\n' "$@" | sort -n | awk '{a[NR]=$1} END {print (NR%2) ? a[(NR+1)/2] : int((a[NR/2]+a[NR/2+1])/2)}'; }
hk_median=$(median "${hk_times[@]}")
qemu_median=$(median "${qemu_times[@]}")
echo "median to first userspace line: hekivisor ${hk_median} ms, qemu microvm ${qemu_median} ms," \
    "ratio $(awk -v a="$hk_median" -v b="$qemu_median" 'BEGIN {printf "%.2f", a / b}')"
hk_cpu_median=$(median "${hk_cpu[@]}")
qemu_cpu_median=$(median "${qemu_cpu[@]}")
echo "median CPU time to that line: hekivisor ${hk_cpu_median} ms, qemu microvm ${qemu_cpu_median} ms," \
    "ratio $(awk -v a="$hk_cpu_median" -v b="$qemu_cpu_median" 'BEGIN {printf "%.2f", a / b}')"
