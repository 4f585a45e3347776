#!/usr/bin/env bash
# What translation integrity costs a real Linux guest: the heki kernel booted
# with heki on (policy deny), once with LOCK_MAPPINGS offered
# (translation=true) and once without (translation=false), RUNS runs each
# (default 3), interleaved. Two figures per run, from the host's clock:
#   boot:     VMM start to the first userspace line ("init: userspace up");
#   syscalls: "bench: start" to "bench: end" around 200,000 system calls
#             (dd bs=1 count=100000 from /dev/zero to /dev/null).
# Prints each run, the medians and the ratios; see docs/benchmarks.md.
set -euo pipefail
cd "$(dirname "$0")/../.."
runs=${RUNS:-3}
cmdline="console=ttyS0 noxsave clearcpuid=smap,popcnt,cx16 panic=-1 hk_bench=syscalls"

cargo build --release --quiet
guest=$(scripts/linux-guest/build.sh heki)
hk=target/release/hekivisor
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

now_ms() { echo $(($(date +%s%N) / 1000000)); }

# Boots with --heki "$1"; prints "boot_ms syscalls_ms".
one_run() {
    local out="$work/serial" start pid t_user="" t_start="" t_end=""
    : >"$out"
    start=$(now_ms)
    "$hk" --kernel "$guest/vmlinux" --initramfs "$guest/initramfs.cpio" --cmdline "$cmdline" \
        --memory size=256M --serial tty --no-reboot --heki "$1" >"$out" 2>&1 </dev/null &
    pid=$!
    while [ -z "$t_end" ]; do
        if ! kill -0 "$pid" 2>/dev/null; then
            echo "bench: the VMM ended early:" >&2
            tail -5 "$out" >&2
            return 1
        fi
        [ -z "$t_user" ] && grep -q "init: userspace up" "$out" && t_user=$(now_ms)
        [ -z "$t_start" ] && grep -q "bench: start" "$out" && t_start=$(now_ms)
        [ -n "$t_start" ] && grep -q "bench: end" "$out" && t_end=$(now_ms)
        if grep -q "bench: failed" "$out"; then
            echo "bench: the guest's syscall loop failed" >&2
            kill "$pid" 2>/dev/null || true
            return 1
        fi
        sleep 0.02
    done
    kill "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
    grep -q "mappings text rodata idt locked" "$out" || [ "$1" != "enabled=on,policy=deny,translation=true" ] || {
        echo "bench: the guest did not lock its mappings:" >&2
        grep "heki:" "$out" >&2
        return 1
    }
    echo "$((t_user - start)) $((t_end - t_start))"
}

on_boot=() on_sys=() off_boot=() off_sys=()
for run in $(seq "$runs"); do
    read -r b s < <(one_run "enabled=on,policy=deny,translation=true")
    on_boot+=("$b") on_sys+=("$s")
    read -r b2 s2 < <(one_run "enabled=on,policy=deny,translation=false")
    off_boot+=("$b2") off_sys+=("$s2")
    echo "run $run: with translation checks boot ${b} ms, syscalls ${s} ms; without: boot ${b2} ms, syscalls ${s2} ms"
done

median() { printf '%s\n' "$@" | sort -n | awk '{a[NR]=$1} END {print (NR%2) ? a[(NR+1)/2] : int((a[NR/2]+a[NR/2+1])/2)}'; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN {printf "%.3f", a / b}'; }
mb=$(median "${on_boot[@]}") ms=$(median "${on_sys[@]}")
nb=$(median "${off_boot[@]}") ns=$(median "${off_sys[@]}")
echo "median boot: ${mb} ms with translation checks, ${nb} ms without, ratio $(ratio "$mb" "$nb")"
echo "median syscall loop: ${ms} ms with translation checks, ${ns} ms without, ratio $(ratio "$ms" "$ns")"
